//! Scenario 1: one node with N neighbors shuts down; beside it, the floor: the same bytes to
//! the same number of loopback sockets, then their write halves shut, with no node at all.

use std::time::Duration;

use futures::future::join_all;
use meshnode::Config;
use meshnode_protocol::{Frame, Identity, NodeRecord};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::peer;
use crate::stats::Spread;

/// Longest the setup of one point (connecting every neighbor) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Neighbors that connect at once; more wait their turn.
const CONNECT_WAVE: usize = 256;

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

/// One run of the floor, as (a), (b) and (c) of [`NodeRun`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FloorRun {
    pub data_ms: f64,
    pub eof_ms: f64,
    pub done_ms: f64,
}

/// One size, repeated.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub neighbors: usize,
    pub withdrawal_ms: Spread,
    pub eof_ms: Spread,
    pub done_ms: Spread,
    pub floor_data_ms: Spread,
    pub floor_eof_ms: Spread,
    pub floor_done_ms: Spread,
    /// Median node (b) over median floor (b).
    pub ratio: f64,
    /// Gossip frames the node sent during each shutdown (must equal `neighbors`).
    pub frames_sent: Vec<u64>,
    pub all_graceful: bool,
}

pub async fn point(neighbors: usize, repeat: usize) -> Result<Point, String> {
    let mut node_runs = Vec::new();
    let mut floor_runs = Vec::new();
    for _ in 0..repeat {
        node_runs.push(node_once(neighbors).await?);
        floor_runs.push(floor_once(neighbors, withdrawal_len()?).await?);
    }
    let spread = |f: &dyn Fn(&NodeRun) -> f64| Spread::of(node_runs.iter().map(f).collect());
    let floor = |f: &dyn Fn(&FloorRun) -> f64| Spread::of(floor_runs.iter().map(f).collect());
    let eof_ms = spread(&|r| r.eof_ms);
    let floor_eof_ms = floor(&|r| r.eof_ms);
    Ok(Point {
        neighbors,
        withdrawal_ms: spread(&|r| r.withdrawal_ms),
        ratio: eof_ms.median / floor_eof_ms.median,
        eof_ms,
        done_ms: spread(&|r| r.done_ms),
        floor_data_ms: floor(&|r| r.data_ms),
        floor_eof_ms,
        floor_done_ms: floor(&|r| r.done_ms),
        frames_sent: node_runs.iter().map(|r| r.frames_sent).collect(),
        all_graceful: node_runs.iter().all(|r| r.graceful),
    })
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The length on the wire of a withdrawal frame, for the floor to send as many bytes.
fn withdrawal_len() -> Result<usize, String> {
    let me = Identity::from_seed([7; 32]);
    let record = me.sign(NodeRecord {
        id: me.id(),
        addr: "127.0.0.1:40000".into(),
        version: 9,
        neighbors: Default::default(),
    });
    let body = Frame::Gossip {
        records: vec![record],
    }
    .encode()
    .map_err(|e| e.to_string())?;
    Ok(4 + body.len())
}

/// One node, `n` light neighbors, one graceful shutdown.
pub async fn node_once(n: usize) -> Result<NodeRun, String> {
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

    let controller = node.controller();
    let start = Instant::now();
    let asked = tokio::spawn(async move { controller.shutdown().await });
    let report = node.wait().await;
    let done = start.elapsed();
    let _ = asked.await;
    let mut withdrawal = Duration::ZERO;
    let mut eof = Duration::ZERO;
    for arrival in join_all(peers).await {
        let arrival = arrival.map_err(|e| e.to_string())??;
        withdrawal = withdrawal.max(arrival.withdrawal.saturating_duration_since(start));
        eof = eof.max(arrival.eof.saturating_duration_since(start));
    }
    let sent_after = report.stats.as_ref().map_or(0, |s| s.gossip_frames_sent);
    Ok(NodeRun {
        withdrawal_ms: millis(withdrawal),
        eof_ms: millis(eof),
        done_ms: millis(done),
        frames_sent: sent_after.saturating_sub(sent_before),
        graceful: report.outcome == meshnode::ShutdownOutcome::Graceful,
    })
}

/// The floor: `n` loopback connections; at the start, `len` bytes written to each and its
/// write half shut down, from a task per connection, as the node's writers do.
pub async fn floor_once(n: usize, len: usize) -> Result<FloorRun, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut readers = Vec::with_capacity(n);
    let mut writers = Vec::with_capacity(n);
    for wave in (0..n).collect::<Vec<_>>().chunks(CONNECT_WAVE) {
        let mut connects = Vec::with_capacity(wave.len());
        for _ in wave {
            connects.push(tokio::spawn(TcpStream::connect(addr)));
        }
        for _ in wave {
            let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            writers.push(stream);
        }
        for connect in connects {
            let stream = connect
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            readers.push(tokio::spawn(read_all(stream, len)));
        }
    }
    let bytes = vec![0x42u8; len];
    let start = Instant::now();
    let writes = writers.into_iter().map(|mut stream| {
        let bytes = bytes.clone();
        tokio::spawn(async move {
            stream.write_all(&bytes).await?;
            stream.shutdown().await
        })
    });
    for write in join_all(writes.collect::<Vec<_>>()).await {
        write
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let done = start.elapsed();
    let mut data = Duration::ZERO;
    let mut eof = Duration::ZERO;
    for read in join_all(readers).await {
        let (got, closed) = read.map_err(|e| e.to_string())??;
        data = data.max(got.saturating_duration_since(start));
        eof = eof.max(closed.saturating_duration_since(start));
    }
    Ok(FloorRun {
        data_ms: millis(data),
        eof_ms: millis(eof),
        done_ms: millis(done),
    })
}

/// Reads `len` bytes, then to EOF; returns when each happened.
async fn read_all(mut stream: TcpStream, len: usize) -> Result<(Instant, Instant), String> {
    let mut buf = vec![0u8; len];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    let got = Instant::now();
    let mut rest = [0u8; 64];
    loop {
        if stream.read(&mut rest).await.map_err(|e| e.to_string())? == 0 {
            return Ok((got, Instant::now()));
        }
    }
}
