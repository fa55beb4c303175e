//! Scenario 2: M real nodes in one process, a connected random graph of degree about k. One
//! node withdraws gracefully; later another crashes (tasks aborted, sockets dropped, nothing
//! said). For each: how long until every remaining node's database shows it, and how many
//! gossip frames the whole mesh sent because of it.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use meshnode::stream_handler_pool::Verifiers;
use meshnode::{Config, Node};
use meshnode_protocol::ui::StatusPayload;
use meshnode_protocol::{Identity, NodeId};
use serde::Serialize;
use tokio::time::Instant;

use crate::stats::Spread;

/// Longest a mesh of up to [`SETTLE_NODES`] nodes may take to converge, or news of a departure
/// to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Past this many nodes the time-out grows as the square of the nodes: every node checks the
/// signature of every version of every record once, so a mesh's set-up in one process is
/// O(N^2) work on the machine's cores (about 150 s of CPU at 600 nodes).
const SETTLE_NODES: usize = 500;
/// How often the mesh is polled for completion; the times themselves come from each node's
/// own record of when it stored what.
const POLL: Duration = Duration::from_millis(50);
/// How many nodes are asked for their status at once.
const POLL_AT_ONCE: usize = 50;
/// How often a long wait says how far it got (on standard error).
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// Longest a diagnosis of where records stop may take (it asks every node for its status): a
/// node that does not answer must not stretch a progress line or a time-out by another
/// [`settle_timeout`].
const DIAGNOSIS_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the mesh is watched, after a graceful departure's flood, for anything more.
pub const SETTLED_WATCH: Duration = Duration::from_secs(2);

/// One departure, graceful or not.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Departure {
    /// From the request (or the crash) until the last remaining node's database showed that no
    /// full neighborship with the departed node is left: for a graceful departure, its
    /// withdrawal stored; for a crash, every former neighbor's record without it.
    pub learned_ms: f64,
    /// Gossip frames sent by every node, the departing one included, from then until quiet.
    pub frames: u64,
    /// Bytes of those frames' bodies.
    pub bytes: u64,
    /// Links of the mesh before the departure.
    pub edges: usize,
    /// Graceful only: the frames and bytes sent in the [`SETTLED_WATCH`] after the flood was
    /// quiet. The former neighbors' own records, without the departed node, wait for their
    /// next change of another kind (no timer), so nothing is expected here.
    pub settled_frames: u64,
    pub settled_bytes: u64,
}

/// One round: a fresh mesh, a graceful departure, then a crash.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub graceful: Departure,
    /// When the nodes at each distance from the gracefully departed node learned of it.
    pub graceful_hops: Vec<crate::hops::Hop>,
    /// The process's threads from the request until the poll saw every node with the
    /// withdrawal stored (a poll's interval, at most, after the last stored it).
    pub graceful_cpu: crate::hops::Cpu,
    pub crash: Departure,
    /// From the last node started until every node knew the whole mesh.
    pub converged_ms: f64,
    /// Records the nodes sent one another in answer to digests (anti-entropy) until the mesh
    /// converged: records that gossip alone had not brought.
    pub repaired_to_converge: u64,
    /// Digest bytes (anti-entropy, not gossip) each node sent per second, on average, from
    /// the convergence to the end of the round.
    pub digest_bytes_per_node_s: f64,
    /// Seconds the nodes took to start, one by one, before the convergence is timed.
    pub started_s: f64,
}

/// Every round of one mesh size.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub nodes: usize,
    pub degree: usize,
    pub rounds: Vec<Round>,
    pub graceful_learned_ms: Spread,
    pub crash_learned_ms: Spread,
    pub graceful_frames_per_edge: Spread,
    pub crash_frames_per_edge: Spread,
    pub graceful_bytes_per_edge: Spread,
    pub crash_bytes_per_edge: Spread,
    pub settled_frames_per_edge: Spread,
    pub settled_bytes_per_edge: Spread,
    /// How long each fresh mesh took to converge (set-up excluded), in ms.
    pub converged_ms: Spread,
    /// Seconds each mesh's nodes took to start (the benchmark starts them one by one).
    pub started_s: Spread,
}

pub async fn summary(
    nodes: usize,
    degree: usize,
    rounds: usize,
    window: Duration,
) -> Result<Summary, String> {
    let mut all = Vec::new();
    for r in 0..rounds {
        all.push(round(nodes, degree, 0x5eed_0000 + r as u64, window).await?);
    }
    let per_edge = |d: &Departure| d.frames as f64 / d.edges as f64;
    let bytes_per_edge = |d: &Departure| d.bytes as f64 / d.edges as f64;
    Ok(Summary {
        nodes,
        degree,
        graceful_learned_ms: Spread::of(all.iter().map(|r| r.graceful.learned_ms).collect()),
        crash_learned_ms: Spread::of(all.iter().map(|r| r.crash.learned_ms).collect()),
        graceful_frames_per_edge: Spread::of(all.iter().map(|r| per_edge(&r.graceful)).collect()),
        crash_frames_per_edge: Spread::of(all.iter().map(|r| per_edge(&r.crash)).collect()),
        graceful_bytes_per_edge: Spread::of(
            all.iter().map(|r| bytes_per_edge(&r.graceful)).collect(),
        ),
        crash_bytes_per_edge: Spread::of(all.iter().map(|r| bytes_per_edge(&r.crash)).collect()),
        settled_frames_per_edge: Spread::of(
            all.iter()
                .map(|r| r.graceful.settled_frames as f64 / r.graceful.edges as f64)
                .collect(),
        ),
        settled_bytes_per_edge: Spread::of(
            all.iter()
                .map(|r| r.graceful.settled_bytes as f64 / r.graceful.edges as f64)
                .collect(),
        ),
        converged_ms: Spread::of(all.iter().map(|r| r.converged_ms).collect()),
        started_s: Spread::of(all.iter().map(|r| r.started_s).collect()),
        rounds: all,
    })
}

/// A deterministic pseudo-random sequence (splitmix64), so that a round can be run again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A ring (so the graph is connected) plus random chords, up to `n * k / 2` links. Each link
/// is `(dialer, dialed)` with the dialer the later node.
pub fn graph(n: usize, k: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = Rng(seed);
    let mut edges = BTreeSet::new();
    for i in 0..n {
        let j = (i + 1) % n;
        if i != j {
            edges.insert((i.max(j), i.min(j)));
        }
    }
    let target = (n * k / 2).min(n * (n - 1) / 2);
    while edges.len() < target {
        let (a, b) = (rng.below(n), rng.below(n));
        if a != b {
            edges.insert((a.max(b), a.min(b)));
        }
    }
    edges.into_iter().collect()
}

/// How long to wait for a mesh of `nodes` nodes (see [`SETTLE_NODES`]).
fn settle_timeout(nodes: usize) -> Duration {
    let scale = (nodes as f64 / SETTLE_NODES as f64).max(1.0);
    SETTLE_TIMEOUT.mul_f64(scale * scale)
}

/// The pause after a round of polls that took `took`: at least [`POLL`], and three times the
/// round, so that asking a thousand nodes for statuses (each a copy of its whole database)
/// takes at most a quarter of the machine from the mesh it measures. Departure times do not
/// depend on it (each node records when it stored what); the convergence time is known to
/// within a pause.
fn pause_after(took: Duration) -> Duration {
    POLL.max(took * 3)
}

/// Every node's status, asked [`POLL_AT_ONCE`] at a time (a thousand at once on 2 cores miss
/// their deadline); a node that does not answer in time is asked again, until the deadline.
async fn statuses(nodes: &[Node]) -> Result<Vec<StatusPayload>, String> {
    let deadline = Instant::now() + settle_timeout(nodes.len());
    let mut all = Vec::with_capacity(nodes.len());
    for chunk in nodes.chunks(POLL_AT_ONCE) {
        loop {
            match join_all(chunk.iter().map(Node::status))
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(some) => {
                    all.extend(some);
                    break;
                }
                Err(_) if Instant::now() <= deadline => tokio::time::sleep(POLL).await,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok(all)
}

/// Where records stop, from every node's status at one moment (see `crate::lacking`), or why
/// there is no diagnosis; within [`DIAGNOSIS_TIMEOUT`].
async fn diagnose(nodes: &[Node]) -> String {
    match tokio::time::timeout(DIAGNOSIS_TIMEOUT, statuses(nodes)).await {
        Ok(Ok(all)) => crate::lacking::diagnose(&all),
        Ok(Err(e)) => format!("no diagnosis: {e}"),
        Err(_) => format!(
            "no diagnosis: the nodes' statuses were not all read within {DIAGNOSIS_TIMEOUT:?}"
        ),
    }
}

/// Waits until `done` holds for every node (given its status and its index). A node, once
/// done, is not asked again: each condition waited for here stays true once it holds. Nodes
/// are asked [`POLL_AT_ONCE`] at a time; one that does not answer in time is asked again.
async fn until(
    nodes: &[Node],
    what: &str,
    done: impl Fn(usize, &StatusPayload) -> bool,
) -> Result<Instant, String> {
    let begun = Instant::now();
    let deadline = begun + settle_timeout(nodes.len());
    let mut progress_at = begun + PROGRESS_EVERY;
    let mut pending: Vec<usize> = (0..nodes.len()).collect();
    loop {
        let round = Instant::now();
        let mut still = Vec::new();
        let mut lacking = Lacking::default();
        for chunk in pending.chunks(POLL_AT_ONCE) {
            let answers = join_all(chunk.iter().map(|&i| nodes[i].status())).await;
            for (&i, answer) in chunk.iter().zip(answers) {
                match answer {
                    Ok(s) if done(i, &s) => {}
                    Ok(s) => {
                        lacking.add(&s);
                        still.push(i);
                    }
                    Err(_) => {
                        lacking.unanswered += 1;
                        still.push(i);
                    }
                }
            }
        }
        if still.is_empty() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            let diagnosis = diagnose(nodes).await;
            return Err(format!(
                "timed out waiting for {what} ({} of {} nodes not there: {lacking}; {diagnosis})",
                still.len(),
                nodes.len()
            ));
        }
        if Instant::now() >= progress_at {
            progress_at += PROGRESS_EVERY;
            let diagnosis = diagnose(nodes).await;
            eprintln!(
                "meshnode-bench: still waiting for {what} after {:.0} s: {} of {} nodes not \
                 there ({lacking}; {diagnosis})",
                begun.elapsed().as_secs_f64(),
                still.len(),
                nodes.len()
            );
        }
        pending = still;
        tokio::time::sleep(pause_after(round.elapsed())).await;
    }
}

/// What the nodes not there yet lack, for the message of a time-out: the fewest and most
/// records they hold, and how many of their links are not full yet.
#[derive(Debug, Default)]
struct Lacking {
    nodes: usize,
    fewest_known: Option<usize>,
    most_known: usize,
    links_not_full: usize,
    unanswered: usize,
    /// Records the nodes not there lack although a record they hold lists them.
    listed_missing: usize,
    timed_out: u64,
    abuse: u64,
    handshakes_failed: u64,
    deferred: u64,
    useless: u64,
}

impl Lacking {
    fn add(&mut self, s: &StatusPayload) {
        let known = s.known_nodes.len();
        self.nodes += 1;
        self.fewest_known = Some(self.fewest_known.map_or(known, |f| f.min(known)));
        self.most_known = self.most_known.max(known);
        self.links_not_full += s.neighbors.iter().filter(|n| !n.full).count();
        let held: std::collections::HashSet<&str> =
            s.known_nodes.iter().map(|k| k.node_id.as_str()).collect();
        let listed: std::collections::HashSet<&str> = s
            .known_nodes
            .iter()
            .flat_map(|k| k.neighbors.iter().map(String::as_str))
            .filter(|id| !held.contains(id))
            .collect();
        self.listed_missing += listed.len();
        self.timed_out += s.stats.peers_timed_out;
        self.abuse += s.stats.peers_disconnected_for_abuse;
        self.handshakes_failed += s.stats.handshakes_failed;
        self.deferred += s.stats.gossip_deferred;
        self.useless += s.stats.gossip_frames_useless;
    }
}

impl std::fmt::Display for Lacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "they know {} to {} records, {} of their links are not full, {} did not answer; \
             {} records they lack are listed by records they hold; their counters: {} peers \
             timed out, {} disconnected for abuse, {} handshakes failed, {} gossip deferred, \
             {} useless frames",
            self.fewest_known.unwrap_or(0),
            self.most_known,
            self.links_not_full,
            self.unanswered,
            self.listed_missing,
            self.timed_out,
            self.abuse,
            self.handshakes_failed,
            self.deferred,
            self.useless
        )
    }
}

/// Gossip frames and bytes sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sent {
    frames: u64,
    bytes: u64,
}

impl Sent {
    fn since(self, before: Sent) -> Sent {
        Sent {
            frames: self.frames.saturating_sub(before.frames),
            bytes: self.bytes.saturating_sub(before.bytes),
        }
    }
}

/// Waits until no node's gossip counters move for a while; returns the sum of them.
async fn quiet(nodes: &[Node]) -> Result<Sent, String> {
    let mut last = None;
    let deadline = Instant::now() + settle_timeout(nodes.len());
    loop {
        let round = Instant::now();
        let all = statuses(nodes).await?;
        let sent: Vec<(u64, u64)> = all
            .iter()
            .map(|s| (s.stats.gossip_frames_sent, s.stats.gossip_bytes_sent))
            .collect();
        if last.as_ref() == Some(&sent) {
            return Ok(Sent {
                frames: sent.iter().map(|s| s.0).sum(),
                bytes: sent.iter().map(|s| s.1).sum(),
            });
        }
        if Instant::now() > deadline {
            return Err("gossip did not settle".into());
        }
        last = Some(sent);
        tokio::time::sleep(pause_after(round.elapsed()).max(Duration::from_millis(100))).await;
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Starts `n` real nodes with gossip window `window`, in order, each dialing the earlier nodes
/// that `edges` (dialer, dialed) give it. They share `verifiers`: the process's cores.
pub async fn start(
    n: usize,
    edges: &[(usize, usize)],
    window: Duration,
    verifiers: &Verifiers,
) -> Result<Vec<Node>, String> {
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for i in 0..n {
        let mut config = Config::new(Identity::generate().map_err(|e| e.to_string())?);
        config.gossip_window = window;
        config.verifiers = verifiers.clone();
        config.neighbors = edges
            .iter()
            .filter(|(dialer, _)| *dialer == i)
            .map(|(_, dialed)| nodes[*dialed].listen_addr().to_string())
            .collect();
        nodes.push(meshnode::start(config).await.map_err(|e| e.to_string())?);
    }
    Ok(nodes)
}

pub async fn round(n: usize, k: usize, seed: u64, window: Duration) -> Result<Round, String> {
    let edges = graph(n, k, seed);
    let starting = Instant::now();
    let mut nodes = start(n, &edges, window, &Verifiers::for_cores()).await?;
    let started_s = starting.elapsed().as_secs_f64();
    let degree: Vec<usize> = (0..n)
        .map(|i| edges.iter().filter(|(a, b)| *a == i || *b == i).count())
        .collect();
    let started = Instant::now();
    let converged = until(&nodes, "the mesh to converge", |i, s| {
        s.neighbors.len() == degree[i]
            && s.neighbors.iter().all(|x| x.full)
            && s.known_nodes.len() == n
    })
    .await?;
    eprintln!(
        "meshnode-bench: {n} nodes converged {:.1} s after the last one started; measuring",
        converged.duration_since(started).as_secs_f64()
    );
    let at_convergence = statuses(&nodes).await?;
    let repaired_to_converge = at_convergence
        .iter()
        .map(|s| s.stats.records_repaired)
        .sum();
    let digest_bytes_then: std::collections::HashMap<String, u64> = at_convergence
        .iter()
        .map(|s| (s.node_id.clone(), s.stats.digest_bytes_sent))
        .collect();
    let measuring = Instant::now();
    drop(at_convergence);

    // A graceful withdrawal of the best-connected node whose loss leaves the mesh connected.
    let mut adjacency = vec![Vec::new(); n];
    for &(a, b) in &edges {
        adjacency[a].push(b);
        adjacency[b].push(a);
    }
    let leaving = (0..n)
        .filter(|&i| connected_without(&adjacency, i))
        .max_by_key(|&i| degree[i])
        .ok_or("every node's loss would split the mesh")?;
    let before = quiet(&nodes).await?;
    let departing = nodes.remove(leaving);
    let departed = departing.id().to_string();
    let changed = vec![departing.id()];
    let controller = departing.controller();
    let sched = crate::hops::sched_ns();
    let start = Instant::now();
    let asked = tokio::spawn(async move { controller.shutdown().await });
    until_learned(&nodes, changed[0], start).await?;
    let graceful_cpu = crate::hops::Cpu::since(sched, start.elapsed());
    let learned = last_learned(&nodes, &changed).await?;
    // What the cheap poll found, checked once on the statuses.
    until(&nodes, "news of the withdrawal", |_, s| {
        withdrawn(s, &departed)
    })
    .await?;
    let graceful_hops = learned_by_hop(&nodes, &edges, leaving, changed[0], start).await?;
    let report = departing.wait().await;
    let _ = asked.await;
    let mut after = quiet(&nodes).await?;
    if let Some(stats) = &report.stats {
        after.frames += stats.gossip_frames_sent;
        after.bytes += stats.gossip_bytes_sent;
    }
    let flood = after.since(before);
    // The former neighbors' own records wait for their next change of another kind: whatever
    // the mesh sends in a while of nothing else happening is counted apart.
    tokio::time::sleep(SETTLED_WATCH).await;
    let mut settled = quiet(&nodes).await?;
    if let Some(stats) = &report.stats {
        settled.frames += stats.gossip_frames_sent;
        settled.bytes += stats.gossip_bytes_sent;
    }
    let settled = settled.since(after);
    let graceful = Departure {
        learned_ms: millis(learned.duration_since(start)),
        frames: flood.frames,
        bytes: flood.bytes,
        edges: edges.len(),
        settled_frames: settled.frames,
        settled_bytes: settled.bytes,
    };

    // A crash of the best-connected remaining node whose loss leaves the mesh connected (news
    // cannot cross a partition, graceful or not).
    let now = statuses(&nodes).await?;
    let index: std::collections::HashMap<&str, usize> = now
        .iter()
        .enumerate()
        .map(|(i, s)| (s.node_id.as_str(), i))
        .collect();
    let adjacency: Vec<Vec<usize>> = now
        .iter()
        .map(|s| {
            s.neighbors
                .iter()
                .filter_map(|n| index.get(n.node_id.as_str()).copied())
                .collect()
        })
        .collect();
    let degree: Vec<usize> = adjacency.iter().map(Vec::len).collect();
    let crashing = (0..nodes.len())
        .filter(|&i| connected_without(&adjacency, i))
        .max_by_key(|&i| degree[i])
        .ok_or("every node's loss would split the mesh")?;
    let edges_now = degree.iter().sum::<usize>() / 2;
    let crashed = nodes.remove(crashing);
    let crashed_id = crashed.id().to_string();
    let changed = neighbor_ids(&crashed).await?;
    let before = quiet(&nodes).await?;
    let start = Instant::now();
    crashed.stop().await;
    until(&nodes, "news of the crash", |_, s| {
        forgotten(s, &crashed_id)
    })
    .await?;
    let learned = last_learned(&nodes, &changed).await?;
    let spent = quiet(&nodes).await?.since(before);
    // The nodes still running, each from its figure at the convergence.
    let digest_bytes: u64 = statuses(&nodes)
        .await?
        .iter()
        .map(|s| {
            let then = digest_bytes_then.get(&s.node_id).copied().unwrap_or(0);
            s.stats.digest_bytes_sent.saturating_sub(then)
        })
        .sum();
    let digest_bytes_per_node_s =
        digest_bytes as f64 / nodes.len().max(1) as f64 / measuring.elapsed().as_secs_f64();
    let crash = Departure {
        learned_ms: millis(learned.duration_since(start)),
        frames: spent.frames,
        bytes: spent.bytes,
        edges: edges_now,
        settled_frames: 0,
        settled_bytes: 0,
    };
    join_all(nodes.into_iter().map(Node::stop)).await;
    Ok(Round {
        graceful,
        graceful_hops,
        graceful_cpu,
        crash,
        converged_ms: millis(converged.duration_since(started)),
        repaired_to_converge,
        digest_bytes_per_node_s,
        started_s,
    })
}

/// Whether the graph stays connected without node `removed`.
fn connected_without(adjacency: &[Vec<usize>], removed: usize) -> bool {
    let Some(start) = (0..adjacency.len()).find(|&i| i != removed) else {
        return true;
    };
    let mut seen = vec![false; adjacency.len()];
    seen[removed] = true;
    seen[start] = true;
    let mut frontier = vec![start];
    while let Some(x) = frontier.pop() {
        for &y in &adjacency[x] {
            if !seen[y] {
                seen[y] = true;
                frontier.push(y);
            }
        }
    }
    seen.iter().all(|&s| s)
}

/// The ids of `node`'s neighbors: the records a departure of `node` changes.
async fn neighbor_ids(node: &Node) -> Result<Vec<NodeId>, String> {
    let status = node.status().await.map_err(|e| e.to_string())?;
    status
        .neighbors
        .iter()
        .map(|n| n.node_id.parse().map_err(|_| "bad id".to_owned()))
        .collect()
}

/// When the last node stored the last of `changed` (a node's own record excepted).
async fn last_learned(nodes: &[Node], changed: &[NodeId]) -> Result<Instant, String> {
    let mut last: Option<Instant> = None;
    for node in nodes {
        let ids: Vec<NodeId> = changed
            .iter()
            .copied()
            .filter(|id| *id != node.id())
            .collect();
        let times = node
            .learned_at(ids)
            .await
            .ok_or("a node stopped answering")?;
        for at in times.into_iter().flatten() {
            last = Some(last.map_or(at, |l| l.max(at)));
        }
    }
    last.ok_or_else(|| "nobody learned anything".to_owned())
}

/// Waits until every node stored a record of `id` after `start`: a poll of one instant per
/// node, so that the waiting costs the nodes, which share the machine's cores with it, next to
/// nothing (a status lists every record).
async fn until_learned(nodes: &[Node], id: NodeId, start: Instant) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut pending: Vec<usize> = (0..nodes.len()).collect();
    loop {
        let answers = join_all(pending.iter().map(|&i| nodes[i].learned_at(vec![id]))).await;
        pending = pending
            .into_iter()
            .zip(answers)
            .filter(|(_, at)| !matches!(at.as_deref(), Some([Some(at)]) if *at > start))
            .map(|(i, _)| i)
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out waiting for news of the withdrawal ({} of {} nodes without it)",
                pending.len(),
                nodes.len()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// When each node (`nodes`: the mesh of `edges` without node `left`) stored the record of
/// `departed`, grouped by its distance from it in the graph (see [`crate::hops`]).
async fn learned_by_hop(
    nodes: &[Node],
    edges: &[(usize, usize)],
    left: usize,
    departed: NodeId,
    start: Instant,
) -> Result<Vec<crate::hops::Hop>, String> {
    let distance = crate::hops::distances(nodes.len() + 1, edges, left);
    let mut learned = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        // Nodes after the departed one moved down one place when it was taken out.
        let original = if i < left { i } else { i + 1 };
        let times = node
            .learned_at(vec![departed])
            .await
            .ok_or("a node stopped answering")?;
        if let (Some(d), Some(Some(at))) = (distance[original], times.first()) {
            learned.push((d, millis(at.saturating_duration_since(start))));
        }
    }
    Ok(crate::hops::per_hop(&learned))
}

/// `departed` withdrew, as `s` sees it: its record lists nobody, so no full neighborship with
/// it is left (a link is full only while both records list it).
fn withdrawn(s: &StatusPayload, departed: &str) -> bool {
    s.known_nodes
        .iter()
        .any(|k| k.node_id == departed && k.neighbors.is_empty())
}

/// No record in `s`'s database, but the crashed node's own, lists `gone`.
fn forgotten(s: &StatusPayload, gone: &str) -> bool {
    s.known_nodes
        .iter()
        .all(|k| k.node_id == gone || !k.neighbors.iter().any(|n| n == gone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_is_connected_and_has_about_the_degree_asked() {
        let edges = graph(100, 4, 1);
        assert_eq!(edges.len(), 200);
        assert!(edges.iter().all(|(a, b)| a > b));
        // Connected: a walk from node 0 reaches every node.
        let mut seen = BTreeSet::from([0usize]);
        let mut frontier = vec![0usize];
        while let Some(x) = frontier.pop() {
            for &(a, b) in &edges {
                let y = if a == x {
                    b
                } else if b == x {
                    a
                } else {
                    continue;
                };
                if seen.insert(y) {
                    frontier.push(y);
                }
            }
        }
        assert_eq!(seen.len(), 100);
        assert_eq!(
            graph(100, 4, 1),
            edges,
            "the same seed gives the same graph"
        );
    }
}
