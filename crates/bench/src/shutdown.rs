//! Scenario 1: one node with N neighbors shuts down; beside it, two floors with no node at
//! all: the same withdrawal frame to the same number of loopback sockets, then their write
//! halves shut, then a wait for each neighbor to hang up. The **floor** does it over the
//! same encrypted links as the node, read by the very same light neighbors ([`peer::run`]):
//! exactly the work a correct node must do on the wire, and nothing else. The **plaintext
//! floor** sends the frame in the clear to readers that do what a light neighbor does but
//! decrypt; it shows what the cipher costs.
//!
//! Node and floors are measured back to back within one round, so that each ratio compares
//! runs made under the same load of a shared machine: the node and its neighbors are set up
//! (seconds), then the floors (about a second), then the plaintext floor runs, the floor, and
//! at once the node shuts down. A point reports the median of the per-round ratios and every
//! series.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use meshnode::Config;
use meshnode::link::{LinkCodec, LinkWriter, LocalLink, handshake, next_inbound};
use meshnode_protocol::{Frame, FrameCodec, Identity, Inbound, NodeId, NodeRecord};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use crate::peer::{self, Arrival};
use crate::stats::Spread;

/// Longest the setup of one point (connecting every neighbor) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest one shutdown, of the node or of the floor, may take once started.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Neighbors that connect at once; more wait their turn.
const CONNECT_WAVE: usize = 256;
/// Descriptors kept free beside a point's sockets (the runtime, the node's UI, stdio).
const SPARE_FDS: u64 = 256;

/// One run of the node: milliseconds from the request to (a) the last neighbor having the
/// withdrawal, (b) the last neighbor having seen EOF, (c) the node having ended.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NodeRun {
    pub withdrawal_ms: f64,
    pub eof_ms: f64,
    pub done_ms: f64,
    pub frames_sent: u64,
    pub graceful: bool,
}

/// One run of the floor: milliseconds from the start to (a) the last reader having the frame,
/// (b) the last reader having seen EOF, (c) every socket having seen its reader hang up.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FloorRun {
    pub data_ms: f64,
    pub eof_ms: f64,
    pub done_ms: f64,
}

/// One round: the plaintext floor's run, the floor's, and the node's right after them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Round {
    pub plain_floor: FloorRun,
    pub floor: FloorRun,
    pub node: NodeRun,
    /// Node (b) over floor (b), this round.
    pub ratio: f64,
    /// Node (b) over plaintext floor (b), this round.
    pub plain_ratio: f64,
    /// Whether the floors ran just before the node (`false`: just after, when the
    /// descriptors do not allow every set of sockets at once).
    pub floors_first: bool,
    /// The 1-minute load average when the round started.
    pub load_average: f64,
}

/// One size, repeated.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub neighbors: usize,
    pub withdrawal_ms: Spread,
    pub eof_ms: Spread,
    pub done_ms: Spread,
    /// The floor: the same encrypted links and light neighbors as the node's.
    pub floor_data_ms: Spread,
    pub floor_eof_ms: Spread,
    pub floor_done_ms: Spread,
    /// The plaintext floor.
    pub plain_floor_eof_ms: Spread,
    /// The per-round ratios, node (b) over floor (b) of the same round.
    pub ratios: Spread,
    /// Their median: what the goal is judged on.
    pub ratio: f64,
    /// The per-round ratios, node (b) over plaintext floor (b) of the same round.
    pub plain_ratios: Spread,
    /// Gossip frames the node sent during each shutdown (must equal `neighbors`).
    pub frames_sent: Vec<u64>,
    pub all_graceful: bool,
    /// The 1-minute load average at the start of each round.
    pub load_average: Vec<f64>,
    pub rounds: Vec<Round>,
}

pub async fn point(neighbors: usize, repeat: usize) -> Result<Point, String> {
    let mut rounds = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        rounds.push(round(neighbors).await?);
    }
    let node =
        |f: &dyn Fn(&NodeRun) -> f64| Spread::of(rounds.iter().map(|r| f(&r.node)).collect());
    let floor =
        |f: &dyn Fn(&FloorRun) -> f64| Spread::of(rounds.iter().map(|r| f(&r.floor)).collect());
    let ratios = Spread::of(rounds.iter().map(|r| r.ratio).collect());
    Ok(Point {
        neighbors,
        withdrawal_ms: node(&|r| r.withdrawal_ms),
        eof_ms: node(&|r| r.eof_ms),
        done_ms: node(&|r| r.done_ms),
        floor_data_ms: floor(&|r| r.data_ms),
        floor_eof_ms: floor(&|r| r.eof_ms),
        floor_done_ms: floor(&|r| r.done_ms),
        plain_floor_eof_ms: Spread::of(rounds.iter().map(|r| r.plain_floor.eof_ms).collect()),
        ratio: ratios.median,
        ratios,
        plain_ratios: Spread::of(rounds.iter().map(|r| r.plain_ratio).collect()),
        frames_sent: rounds.iter().map(|r| r.node.frames_sent).collect(),
        all_graceful: rounds.iter().all(|r| r.node.graceful),
        load_average: rounds.iter().map(|r| r.load_average).collect(),
        rounds,
    })
}

/// One round: the node set up with `n` neighbors, then the floors with `n` sockets each, then
/// the floors' runs and at once the node's. Each holds two descriptors per neighbor; where the
/// limit does not allow all six at once, the floors are set up and run right after the node.
async fn round(n: usize) -> Result<Round, String> {
    let load_average = load_average();
    let set_up = set_up_node(n).await?;
    let (frame, plain_id) = withdrawal_frame(set_up.addr)?;
    let floors_first = fd_limit() >= 6 * n as u64 + SPARE_FDS;
    let floors = async {
        let plain = set_up_plain_floor(n, plain_id).await?;
        let plain = run_plain_floor(plain, frame).await?;
        let sealed = set_up_floor(n).await?;
        let sealed = run_floor(sealed).await?;
        Ok::<_, String>((plain, sealed))
    };
    let ((plain_floor, floor), node) = if floors_first {
        let floors = floors.await?;
        (floors, run_node(set_up).await?)
    } else {
        let node = run_node(set_up).await?;
        (floors.await?, node)
    };
    Ok(Round {
        ratio: node.eof_ms / floor.eof_ms,
        plain_ratio: node.eof_ms / plain_floor.eof_ms,
        plain_floor,
        floor,
        node,
        floors_first,
        load_average,
    })
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The 1-minute load average, as `uptime` shows it (NaN where /proc does not say).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The soft limit on this process's descriptors (the node raised it to the hard one).
fn fd_limit() -> u64 {
    rlimit::Resource::NOFILE
        .get()
        .map_or(1024, |(soft, _)| soft)
}

/// A withdrawal frame as the node sends it (length, then body), in plaintext, and the id it
/// is from: a record at the node's address that lists nobody, as the node's last record does.
/// The node's own is 18 bytes longer on the wire (a 2-byte message length and a 16-byte tag).
fn withdrawal_frame(addr: SocketAddr) -> Result<(Bytes, NodeId), String> {
    let me = Identity::from_seed([7; 32]);
    let record = me.sign(NodeRecord {
        id: me.id(),
        addr: addr.to_string(),
        version: 9,
        neighbors: Default::default(),
    });
    let body = Frame::Gossip {
        records: vec![record],
    }
    .encode()
    .map_err(|e| e.to_string())?;
    let header = meshnode_protocol::frame_header(body.len()).map_err(|e| e.to_string())?;
    let mut frame = Vec::with_capacity(header.len() + body.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&body);
    Ok((Bytes::from(frame), me.id()))
}

/// A node with `n` light neighbors, set up and quiet, ready to shut down.
struct NodeSetUp {
    node: meshnode::Node,
    addr: SocketAddr,
    peers: Vec<JoinHandle<Result<Arrival, String>>>,
    sent_before: u64,
}

/// Starts a node and connects `n` light neighbors to it; returns once every neighbor has seen
/// the node's record list them all and the node's gossip has stopped.
async fn set_up_node(n: usize) -> Result<NodeSetUp, String> {
    let identity = Identity::generate().map_err(|e| e.to_string())?;
    let mut config = Config::new(identity);
    config.shutdown_deadline = Duration::from_secs(60);
    let node = meshnode::start(config).await.map_err(|e| e.to_string())?;
    let (addr, id) = (node.listen_addr(), node.id());

    let listed = peer::Listed::new(n);
    let setup_start = Instant::now();
    let setup = async {
        let mut peers = Vec::with_capacity(n);
        for wave in (0..n).collect::<Vec<_>>().chunks(CONNECT_WAVE) {
            let mut readies = Vec::with_capacity(wave.len());
            for &i in wave {
                let (ready, is_ready) = oneshot::channel();
                let me = peer::identity(u32::try_from(i).unwrap_or(u32::MAX));
                peers.push(tokio::spawn(peer::run(addr, id, me, ready, listed.clone())));
                readies.push(is_ready);
            }
            for ready in readies {
                if ready.await.is_err() {
                    let failed = futures::future::select_all(peers.iter_mut()).await.0;
                    let why = match failed {
                        Ok(Err(e)) => e,
                        other => format!("{other:?}"),
                    };
                    return Err(format!("a neighbor failed to connect: {why}"));
                }
            }
        }
        // Let the node's gossip about its growing neighbor set die down: its record, whose
        // publishes it paces, has reached every neighbor listing them all, and then it sends
        // nothing more.
        while !listed.by_all() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut last = None;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let sent = node
                .status()
                .await
                .map_err(|e| e.to_string())?
                .stats
                .gossip_frames_sent;
            if last == Some(sent) {
                let stats = node.status().await.map_err(|e| e.to_string())?.stats;
                eprintln!(
                    "  set-up of {n} neighbors: {:.2} s, {} gossip frames, {:.1} MB of gossip sent by the node, {} handshakes failed",
                    setup_start.elapsed().as_secs_f64(),
                    stats.gossip_frames_sent,
                    stats.gossip_bytes_sent as f64 / 1e6,
                    stats.handshakes_failed
                );
                return Ok::<_, String>((peers, sent));
            }
            last = Some(sent);
        }
    };
    let (peers, sent_before) = tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| format!("{n} neighbors did not connect within {SETUP_TIMEOUT:?}"))??;
    Ok(NodeSetUp {
        node,
        addr,
        peers,
        sent_before,
    })
}

/// One graceful shutdown of a set-up node, timed from the request.
async fn run_node(set_up: NodeSetUp) -> Result<NodeRun, String> {
    let NodeSetUp {
        node,
        peers,
        sent_before,
        ..
    } = set_up;
    let controller = node.controller();
    let start = Instant::now();
    let asked = tokio::spawn(async move { controller.shutdown().await });
    let report = tokio::time::timeout(RUN_TIMEOUT, node.wait())
        .await
        .map_err(|_| format!("the node did not end within {RUN_TIMEOUT:?}"))?;
    let done = start.elapsed();
    let _ = asked.await;
    let (withdrawal, eof) = last_arrivals(peers, start).await?;
    let sent_after = report.stats.as_ref().map_or(0, |s| s.gossip_frames_sent);
    Ok(NodeRun {
        withdrawal_ms: millis(withdrawal),
        eof_ms: millis(eof),
        done_ms: millis(done),
        frames_sent: sent_after.saturating_sub(sent_before),
        graceful: report.outcome == meshnode::ShutdownOutcome::Graceful,
    })
}

/// When, after `start`, the last neighbor had the withdrawal and the last one saw EOF.
async fn last_arrivals(
    readers: Vec<JoinHandle<Result<Arrival, String>>>,
    start: Instant,
) -> Result<(Duration, Duration), String> {
    let all = tokio::time::timeout(RUN_TIMEOUT, join_all(readers))
        .await
        .map_err(|_| format!("the neighbors did not all see EOF within {RUN_TIMEOUT:?}"))?;
    let mut withdrawal = Duration::ZERO;
    let mut eof = Duration::ZERO;
    for arrival in all {
        let arrival = arrival.map_err(|e| e.to_string())??;
        withdrawal = withdrawal.max(arrival.withdrawal.saturating_duration_since(start));
        eof = eof.max(arrival.eof.saturating_duration_since(start));
    }
    Ok((withdrawal, eof))
}

/// The plaintext floor's `n` loopback connections: the node's side of each, and a reader task
/// on the neighbor's side.
struct PlainSetUp {
    sockets: Vec<TcpStream>,
    readers: Vec<JoinHandle<Result<Arrival, String>>>,
}

async fn set_up_plain_floor(n: usize, id: NodeId) -> Result<PlainSetUp, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut readers = Vec::with_capacity(n);
    let mut sockets = Vec::with_capacity(n);
    for wave in (0..n).collect::<Vec<_>>().chunks(CONNECT_WAVE) {
        let mut connects = Vec::with_capacity(wave.len());
        for _ in wave {
            connects.push(tokio::spawn(TcpStream::connect(addr)));
        }
        for _ in wave {
            let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            sockets.push(stream);
        }
        for connect in connects {
            let stream = connect
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            readers.push(tokio::spawn(floor_reader(stream, id)));
        }
    }
    Ok(PlainSetUp { sockets, readers })
}

/// The plaintext floor: as [`run_floor`], with the frame in the clear.
async fn run_plain_floor(set_up: PlainSetUp, frame: Bytes) -> Result<FloorRun, String> {
    let PlainSetUp { sockets, readers } = set_up;
    let start = Instant::now();
    let writes = sockets.into_iter().map(|mut stream| {
        let frame = frame.clone();
        tokio::spawn(async move {
            stream.write_all(&frame).await?;
            stream.shutdown().await?;
            let mut rest = [0u8; 64];
            while stream.read(&mut rest).await? != 0 {}
            Ok::<_, std::io::Error>(())
        })
    });
    let writes = writes.collect::<Vec<_>>();
    let all = tokio::time::timeout(RUN_TIMEOUT, join_all(writes))
        .await
        .map_err(|_| format!("the plaintext floor did not end within {RUN_TIMEOUT:?}"))?;
    for write in all {
        write
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("plaintext floor: {e}"))?;
    }
    let done = start.elapsed();
    let (data, eof) = last_arrivals(readers, start).await?;
    Ok(FloorRun {
        data_ms: millis(data),
        eof_ms: millis(eof),
        done_ms: millis(done),
    })
}

/// A plaintext floor's neighbor: the light neighbor's reading ([`peer::run`]) without the cipher. It
/// reads frames until EOF, looks in each for the record of `id` as a light neighbor looks for
/// the node's ([`peer::node_records`]), notes when the withdrawal (a record listing nobody)
/// and the EOF arrived, then hangs up as a light neighbor does: its write half shut, then the
/// socket closed.
async fn floor_reader(stream: TcpStream, id: NodeId) -> Result<Arrival, String> {
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, FrameCodec::new());
    let mut withdrawal = None;
    while let Some(next) = reader.next().await {
        match next.map_err(|e| format!("read: {e}"))? {
            Inbound::Frame(body) => {
                let records = peer::node_records(&body, id);
                if withdrawal.is_none() && records.iter().any(|r| r.record.neighbors.is_empty()) {
                    withdrawal = Some(Instant::now());
                }
            }
            Inbound::Oversized { len } => return Err(format!("oversized frame of {len}")),
        }
    }
    let eof = Instant::now();
    drop(write);
    drop(reader);
    match withdrawal {
        Some(withdrawal) => Ok(Arrival { withdrawal, eof }),
        None => Err("the floor's reader saw EOF without the frame".into()),
    }
}

/// One link of the floor, on the node's side: what the handshake left.
type FloorLink = (
    FramedRead<OwnedReadHalf, LinkCodec>,
    LinkWriter<OwnedWriteHalf>,
);

/// The floor's `n` encrypted links, the neighbors on them, and the withdrawal to send.
struct FloorSetUp {
    links: Vec<FloorLink>,
    peers: Vec<JoinHandle<Result<Arrival, String>>>,
    withdrawal: Bytes,
}

/// `n` light neighbors ([`peer::run`], as for the node) dial a bare listener that does the
/// node's side of the handshake and sends one record listing them all, as the node's does;
/// returns once every neighbor has seen it.
async fn set_up_floor(n: usize) -> Result<FloorSetUp, String> {
    let identity = Identity::generate().map_err(|e| e.to_string())?;
    let id = identity.id();
    let local = Arc::new(
        LocalLink::new(identity.clone(), Duration::from_secs(3600))
            .map_err(|e| format!("link key: {e}"))?,
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let index = |i: usize| peer::identity(u32::try_from(i).unwrap_or(u32::MAX));
    let ids: BTreeSet<NodeId> = (0..n).map(|i| index(i).id()).collect();
    let body = |version: u64, neighbors: BTreeSet<NodeId>| {
        let record = identity.sign(NodeRecord {
            id,
            addr: addr.to_string(),
            version,
            neighbors,
        });
        Frame::Gossip {
            records: vec![record],
        }
        .encode()
        .map_err(|e| e.to_string())
    };
    let listing = body(1, ids)?;
    let withdrawal = body(2, BTreeSet::new())?;

    let listed = peer::Listed::new(n);
    let setup = async {
        let mut peers = Vec::with_capacity(n);
        let mut links = Vec::with_capacity(n);
        for wave in (0..n).collect::<Vec<_>>().chunks(CONNECT_WAVE) {
            let mut readies = Vec::with_capacity(wave.len());
            for &i in wave {
                let (ready, is_ready) = oneshot::channel();
                peers.push(tokio::spawn(peer::run(
                    addr,
                    id,
                    index(i),
                    ready,
                    listed.clone(),
                )));
                readies.push(is_ready);
            }
            let mut handshakes = Vec::with_capacity(wave.len());
            for _ in wave {
                let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
                let (local, listing) = (local.clone(), listing.clone());
                handshakes.push(tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let (read, write) = stream.into_split();
                    let (_, reader, mut writer) = handshake(read, write, false, &local)
                        .await
                        .map_err(|e| format!("floor handshake: {e}"))?;
                    let mut reader = reader;
                    // The neighbor's hello is read now, as the node reads it during its set-up,
                    // so that the run has nothing more to read than the node's.
                    let send = async {
                        writer
                            .send_frame(&listing)
                            .await
                            .map_err(|e| format!("floor record: {e}"))
                    };
                    let hello = async {
                        match next_inbound(&mut reader).await {
                            Some(Ok(_)) => Ok(()),
                            _ => Err("the floor's neighbor sent no hello".to_owned()),
                        }
                    };
                    tokio::try_join!(send, hello)?;
                    Ok::<_, String>((reader, writer))
                }));
            }
            for link in handshakes {
                links.push(link.await.map_err(|e| e.to_string())??);
            }
            for ready in readies {
                ready
                    .await
                    .map_err(|_| "a floor neighbor failed to connect".to_owned())?;
            }
        }
        listed.wait(SETUP_TIMEOUT).await?;
        Ok::<_, String>((links, peers))
    };
    let (links, peers) = tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| format!("{n} floor neighbors did not connect within {SETUP_TIMEOUT:?}"))??;
    Ok(FloorSetUp {
        links,
        peers,
        withdrawal,
    })
}

/// The floor: what a correct node must do on the wire, and nothing else. From a task per
/// link: write the withdrawal frame (encrypted), shut the write half down, then read to the
/// neighbor's hang-up (the node must know that each stream has ended, to report who was late)
/// and close.
async fn run_floor(set_up: FloorSetUp) -> Result<FloorRun, String> {
    let FloorSetUp {
        links,
        peers,
        withdrawal,
    } = set_up;
    let start = Instant::now();
    let writes = links.into_iter().map(|(mut reader, mut writer)| {
        let withdrawal = withdrawal.clone();
        tokio::spawn(async move {
            writer.send_frame(&withdrawal).await?;
            writer.shutdown().await?;
            // The neighbor's keepalives, if any, then its EOF; a reset ends it too.
            while let Some(Ok(_)) = reader.next().await {}
            Ok::<_, std::io::Error>(())
        })
    });
    let writes = writes.collect::<Vec<_>>();
    let all = tokio::time::timeout(RUN_TIMEOUT, join_all(writes))
        .await
        .map_err(|_| format!("the floor did not end within {RUN_TIMEOUT:?}"))?;
    for write in all {
        write
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("floor: {e}"))?;
    }
    let done = start.elapsed();
    let (data, eof) = last_arrivals(peers, start).await?;
    Ok(FloorRun {
        data_ms: millis(data),
        eof_ms: millis(eof),
        done_ms: millis(done),
    })
}
