//! Scenario 6: a flood of validly signed records from fresh keys. A small honest mesh (a ring
//! of real nodes in this process) and an attacker with a real link (real handshake, real hello)
//! to one of them, which sends records of keys nobody lists, every one new, as fast as the link
//! takes them. What it measures: the memory of the process that runs the nodes, what each
//! node's database kept, whether the attacker was disconnected, and what an honest change made
//! meanwhile did (a new node joining the mesh: how long until every node reaches it over full
//! neighborships, against the same join without the flood).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use meshnode::link::next_inbound;
use meshnode::stream_handler_pool::Verifiers;
use meshnode::{Config, Node};
use meshnode_protocol::ui::StatusPayload;
use meshnode_protocol::{Frame, Identity, Inbound, NodeId, NodeRecord, VerifiedRecord};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::{mesh, peer, stats};

/// Longest any wait of this scenario may take: convergence, a join.
const TIMEOUT: Duration = Duration::from_secs(180);
/// Longest the nodes may take to work through the flood.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(240);
/// How often the process's resident memory is sampled during the flood.
const SAMPLE: Duration = Duration::from_millis(20);
/// How often the nodes are polled for completion.
const POLL: Duration = Duration::from_millis(50);
/// Longest a single question to a node (its status, when it stored a record) may take.
const ASK: Duration = Duration::from_secs(10);

/// What one honest node did with the flood.
#[derive(Debug, Clone, Serialize)]
pub struct NodeFlood {
    /// Hops over the ring from the attacked node (0 is the attacked node).
    pub hops: usize,
    /// Records in its database once the flood was over.
    pub stored: usize,
    /// Records that changed its database during the flood (the attacker's, and their copies
    /// from other nodes; each is a record stored, evicting another at the cap).
    pub accepted: u64,
    /// Records no newer than the stored one (copies of what it had).
    pub stale: u64,
    /// Records with a bad signature or shape.
    pub rejected: u64,
    /// Records accepted minus records stored: dropped to make room (evicted) or past grace.
    pub dropped: u64,
    /// Neighbors it disconnected for abuse or flooding.
    pub disconnected_for_abuse: u64,
}

/// An honest change: a new node joins the mesh by dialing one of its nodes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Join {
    /// From the new node's start until every node (the new one included) stored the new node's
    /// record and its neighbor's changed record, by each node's own record of when; `None` if
    /// that did not happen before the wait ran out.
    pub learned_ms: Option<f64>,
    /// Nodes that stored both, out of `nodes`.
    pub reached: usize,
    pub nodes: usize,
    /// Whether, once the flood was over, every node's database had the new full neighborship.
    pub full_everywhere: bool,
}

/// The whole scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Flood {
    /// Honest nodes in the ring.
    pub nodes: usize,
    /// Records the attacker sent, in `frames` gossip frames.
    pub records: usize,
    pub frames: usize,
    /// Generating and signing the records (before the clock starts).
    pub generate_ms: f64,
    /// From the first frame until the attacker had written its last.
    pub send_ms: f64,
    /// From the first frame until every node's counters stopped moving, or until the wait for
    /// that ran out.
    pub absorbed_ms: f64,
    /// Whether the counters stopped moving at all: records that circulate between nodes
    /// without end (stored, evicted, stored again) keep them moving.
    pub died_down: bool,
    /// The process's resident memory (VmRSS, every honest node, the attacker and its
    /// pre-encoded frames included): before the flood, the most seen during it, and after.
    pub rss_before_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
    /// What each node did, the attacked node first.
    pub per_node: Vec<NodeFlood>,
    /// Whether the attacked node closed the attacker's link, and what the attacker saw.
    pub attacker_disconnected: bool,
    pub attacker_end: String,
    /// The same join, without the flood and during it.
    pub join_quiet: Join,
    pub join_flood: Join,
}

/// Runs the scenario: `n` honest nodes, `records` records from fresh keys.
pub async fn measure(n: usize, records: usize, window: Duration) -> Result<Flood, String> {
    let n = n.max(2);
    // The attacker's frames, made before any clock starts.
    let generated = Instant::now();
    let bodies = tokio::task::spawn_blocking(move || forge(records))
        .await
        .map_err(|e| e.to_string())??;
    let generate_ms = millis(generated.elapsed());
    let frames = bodies.len();

    let edges = mesh::graph(n, 2, 0xf100d);
    // Every node of the process, the joiners too, shares the process's cores for its checks.
    let verifiers = Verifiers::for_cores();
    let mut nodes = mesh::start(n, &edges, window, &verifiers).await?;
    nodes.reserve(2);
    let result = run(&mut nodes, &edges, bodies, records, window, &verifiers).await;
    join_all(nodes.into_iter().map(Node::stop)).await;
    let (mut flood, frames_sent) = result?;
    flood.generate_ms = generate_ms;
    flood.records = records;
    flood.frames = frames.min(frames_sent);
    Ok(flood)
}

async fn run(
    nodes: &mut Vec<Node>,
    edges: &[(usize, usize)],
    bodies: Vec<Bytes>,
    records: usize,
    window: Duration,
    verifiers: &Verifiers,
) -> Result<(Flood, usize), String> {
    let n = nodes.len();
    let degree: Vec<usize> = (0..n)
        .map(|i| edges.iter().filter(|(a, b)| *a == i || *b == i).count())
        .collect();
    until(nodes, "the mesh to converge", |all| {
        all.iter().zip(&degree).all(|(s, d)| {
            s.neighbors.len() == *d
                && s.neighbors.iter().all(|x| x.full)
                && s.known_nodes.len() == n
        })
    })
    .await?;
    // The node farthest from the attacked one (node 0) is where the honest joins happen.
    let far = n / 2;
    let join_quiet = join(nodes, far, window, verifiers).await?;
    let quiet_joiner = nodes.len() - 1;

    // The attacker links to node 0 and waits until node 0 lists it.
    let attacked = nodes[0].listen_addr();
    let attacker_key = Identity::from_seed([0xa7; 32]);
    let attacker_id = attacker_key.id();
    let link = Attacker::connect(attacked, attacker_key).await?;
    until(
        &nodes[..1],
        "the attacked node to list the attacker",
        |all| {
            all[0]
                .neighbors
                .iter()
                .any(|x| x.node_id == attacker_id.to_string())
        },
    )
    .await?;
    let before = statuses(nodes).await?;
    let rss_before_kib = stats::rss_kib("self")?;

    // The flood: memory sampled throughout; an honest node joins once a quarter of the frames
    // are written.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let stop = sampling.clone();
        async move {
            let mut peak = 0;
            loop {
                peak = peak.max(stats::rss_kib("self").unwrap_or(0));
                tokio::select! {
                    () = stop.cancelled() => break peak,
                    () = tokio::time::sleep(SAMPLE) => {}
                }
            }
        }
    });
    let (quarter_tx, quarter) = oneshot::channel();
    let start = Instant::now();
    let attack = tokio::spawn(link.flood(bodies, quarter_tx));
    let _ = quarter.await;
    let join_flood = join(nodes, far, window, verifiers).await?;
    let (sent, failed, link) = attack.await.map_err(|e| e.to_string())?;
    let send_ms = millis(sent.elapsed_since(start));
    // Over once the attacked node has judged every record sent (or the link is gone) and no
    // node's counters move for a while.
    let judged = |s: &StatusPayload| {
        s.stats.records_accepted + s.stats.records_stale + s.stats.records_rejected
    };
    let expected = judged(&before[0]) + records as u64;
    let (after, died_down) = quiet(nodes, |all| {
        judged(&all[0]) >= expected || link.reader.is_finished()
    })
    .await?;
    let (disconnected, attacker_end) = link.end(failed).await;
    let absorbed_ms = millis(start.elapsed()).max(send_ms);
    sampling.cancel();
    let rss_peak_kib = sampler.await.map_err(|e| e.to_string())?;
    let rss_after_kib = stats::rss_kib("self")?;
    let join_quiet = Join {
        full_everywhere: full_everywhere(&after, nodes, far, quiet_joiner),
        ..join_quiet
    };
    let join_flood = Join {
        full_everywhere: full_everywhere(&after, nodes, far, nodes.len() - 1),
        ..join_flood
    };
    let per_node = (0..n)
        .map(|i| {
            let (b, a) = (&before[i].stats, &after[i].stats);
            let accepted = a.records_accepted.saturating_sub(b.records_accepted);
            let stored = after[i].known_nodes.len();
            NodeFlood {
                hops: i.min(n - i),
                stored,
                accepted,
                stale: a.records_stale.saturating_sub(b.records_stale),
                rejected: a.records_rejected.saturating_sub(b.records_rejected),
                dropped: (before[i].known_nodes.len() as u64 + accepted)
                    .saturating_sub(stored as u64),
                disconnected_for_abuse: a
                    .peers_disconnected_for_abuse
                    .saturating_sub(b.peers_disconnected_for_abuse),
            }
        })
        .collect();
    Ok((
        Flood {
            nodes: n,
            records: 0,
            frames: 0,
            generate_ms: 0.0,
            send_ms,
            absorbed_ms,
            died_down,
            rss_before_kib,
            rss_peak_kib: rss_peak_kib.max(rss_before_kib),
            rss_after_kib,
            per_node,
            attacker_disconnected: disconnected,
            attacker_end,
            join_quiet,
            join_flood,
        },
        sent.frames,
    ))
}

/// `records` records of fresh keys, each signed by its key, packed into gossip frame bodies.
fn forge(records: usize) -> Result<Vec<Bytes>, String> {
    let signed: Vec<VerifiedRecord> = (0..records)
        .map(|i| {
            let mut seed = [0xf1; 32];
            seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let key = Identity::from_seed(seed);
            key.sign_verified(NodeRecord {
                id: key.id(),
                addr: format!("10.{}.{}.{}:1", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff),
                version: 1,
                neighbors: BTreeSet::new(),
            })
            .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let (bodies, skipped) = Frame::gossip_bodies(&signed);
    if skipped > 0 {
        return Err(format!("{skipped} forged records fit no frame"));
    }
    Ok(bodies)
}

/// How far the attacker got.
struct Sent {
    frames: usize,
    at: Instant,
}

impl Sent {
    fn elapsed_since(&self, start: Instant) -> Duration {
        self.at.duration_since(start)
    }
}

/// The attacker's link: the real handshake and hello, then nothing but gossip.
struct Attacker {
    writer: meshnode::link::LinkWriter<tokio::net::tcp::OwnedWriteHalf>,
    reader: tokio::task::JoinHandle<String>,
}

impl Attacker {
    async fn connect(node: SocketAddr, me: Identity) -> Result<Self, String> {
        let (_, mut reader, writer) = peer::join(node, &me, 1).await?;
        // What the node sends is read and dropped, until it closes the link.
        let reader = tokio::spawn(async move {
            loop {
                match next_inbound(&mut reader).await {
                    None => break "the node closed the link".to_owned(),
                    Some(Ok(Inbound::Frame(_) | Inbound::Oversized { .. })) => {}
                    Some(Err(e)) => break format!("the link failed: {e}"),
                }
            }
        });
        Ok(Self { writer, reader })
    }

    /// Writes every body (signalling `quarter` a quarter of the way). Returns how far it got,
    /// why it stopped early if it did, and the link, still open, to be judged later.
    async fn flood(
        mut self,
        bodies: Vec<Bytes>,
        quarter: oneshot::Sender<()>,
    ) -> (Sent, Option<String>, Self) {
        let total = bodies.len();
        let mut quarter = Some(quarter);
        let mut frames = 0;
        let mut failed = None;
        for body in bodies {
            if frames >= total / 4
                && let Some(q) = quarter.take()
            {
                let _ = q.send(());
            }
            if let Err(e) = self.writer.send_frame(&body).await {
                failed = Some(format!("a write failed after {frames} frames: {e}"));
                break;
            }
            frames += 1;
        }
        if let Some(q) = quarter.take() {
            let _ = q.send(());
        }
        let sent = Sent {
            frames,
            at: Instant::now(),
        };
        (sent, failed, self)
    }

    /// Whether the node closed the link, and how it ended as the attacker saw it.
    async fn end(self, failed: Option<String>) -> (bool, String) {
        let Self { writer, reader } = self;
        if !reader.is_finished() {
            reader.abort();
            drop(writer);
            return (
                false,
                failed.unwrap_or_else(|| "still linked once the flood was over".into()),
            );
        }
        match reader.await {
            Ok(end) => (true, failed.unwrap_or(end)),
            Err(e) => (false, e.to_string()),
        }
    }
}

/// A new node joins by dialing node `at`: how long until every node (the new one included)
/// stored the new node's record and `at`'s changed record. The new node stays in `nodes`.
async fn join(
    nodes: &mut Vec<Node>,
    at: usize,
    window: Duration,
    verifiers: &Verifiers,
) -> Result<Join, String> {
    let mut config = Config::new(Identity::generate().map_err(|e| e.to_string())?);
    config.gossip_window = window;
    config.verifiers = verifiers.clone();
    config.neighbors = vec![nodes[at].listen_addr().to_string()];
    let start = Instant::now();
    let joiner = meshnode::start(config).await.map_err(|e| e.to_string())?;
    let (new, dialed) = (joiner.id(), nodes[at].id());
    nodes.push(joiner);
    let deadline = start + TIMEOUT;
    let mut reached = 0;
    loop {
        let mut last = start;
        let mut all = 0;
        for node in nodes.iter() {
            let ids: Vec<NodeId> = [new, dialed]
                .into_iter()
                .filter(|id| *id != node.id())
                .collect();
            let Ok(Some(times)) = tokio::time::timeout(ASK, node.learned_at(ids)).await else {
                continue;
            };
            if times.iter().all(|t| t.is_some_and(|t| t > start)) {
                all += 1;
                last = times.into_iter().flatten().fold(last, Instant::max);
            }
        }
        reached = reached.max(all);
        if all == nodes.len() {
            return Ok(Join {
                learned_ms: Some(millis(last.duration_since(start))),
                reached: all,
                nodes: nodes.len(),
                full_everywhere: false,
            });
        }
        if Instant::now() > deadline {
            return Ok(Join {
                learned_ms: None,
                reached,
                nodes: nodes.len(),
                full_everywhere: false,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether every status shows `nodes[a]` and `nodes[b]` listing each other.
fn full_everywhere(all: &[StatusPayload], nodes: &[Node], a: usize, b: usize) -> bool {
    let (a, b) = (nodes[a].id().to_string(), nodes[b].id().to_string());
    let lists = |s: &StatusPayload, x: &str, y: &str| {
        s.known_nodes
            .iter()
            .any(|k| k.node_id == x && k.neighbors.iter().any(|n| n == y))
    };
    all.iter().all(|s| lists(s, &a, &b) && lists(s, &b, &a))
}

async fn statuses(nodes: &[Node]) -> Result<Vec<StatusPayload>, String> {
    join_all(nodes.iter().map(|n| tokio::time::timeout(ASK, n.status())))
        .await
        .into_iter()
        .map(|r| match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("a node's status took over {ASK:?}")),
        })
        .collect()
}

async fn until(
    nodes: &[Node],
    what: &str,
    done: impl Fn(&[StatusPayload]) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(all) = statuses(nodes).await
            && done(&all)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `done` holds and no node's record counters move for two seconds (three polls a
/// second apart); returns the last statuses, and false if that did not happen in time.
async fn quiet(
    nodes: &[Node],
    done: impl Fn(&[StatusPayload]) -> bool,
) -> Result<(Vec<StatusPayload>, bool), String> {
    let deadline = Instant::now() + FLOOD_TIMEOUT;
    let mut last: Option<Vec<(u64, u64, usize)>> = None;
    let mut still = 0;
    let mut latest = None;
    loop {
        if let Ok(all) = statuses(nodes).await {
            let now: Vec<_> = all
                .iter()
                .map(|s| {
                    (
                        s.stats.records_accepted,
                        s.stats.records_stale,
                        s.known_nodes.len(),
                    )
                })
                .collect();
            still = if last.as_ref() == Some(&now) {
                still + 1
            } else {
                0
            };
            if still >= 2 && done(&all) {
                return Ok((all, true));
            }
            last = Some(now);
            latest = Some(all);
        }
        if Instant::now() > deadline {
            return latest
                .map(|all| (all, false))
                .ok_or_else(|| format!("no node answered within {FLOOD_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
