//! What operating a node costs it: judging its connection stage (done by the neighborhood after
//! every batch) on databases of growing size, and serving `GET /metrics` over loopback.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshnode::neighborhood::{Connectivity, NodeDb};
use meshnode::{Config, Node};
use meshnode_protocol::{Identity, NodeId, NodeRecord};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stats::Spread;

/// Each node of the benchmark's databases lists this many others on each side of a ring, all
/// listing each other back: degree 4, and the farthest node N/4 hops away.
const RING_REACH: usize = 2;
/// Longest one scrape may take before the scenario gives up.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct Operations {
    /// Microseconds to judge the connection stage, per database size.
    pub connectivity: Vec<ConnectivityPoint>,
    /// Milliseconds per `GET /metrics` (a new connection each), and the body's size.
    pub scrape_ms: Spread,
    pub scrape_bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct ConnectivityPoint {
    pub records: usize,
    /// In microseconds.
    pub judge_us: Spread,
}

pub async fn measure(sizes: &[usize], scrapes: usize) -> Result<Operations, String> {
    let mut connectivity = Vec::new();
    for &records in sizes {
        let (db, me) = ring(records)?;
        let mut samples = Vec::new();
        for _ in 0..50 {
            let started = Instant::now();
            let judged = Connectivity::of(&db, &me);
            samples.push(started.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(judged);
        }
        connectivity.push(ConnectivityPoint {
            records,
            judge_us: Spread::of(samples),
        });
    }
    let node = meshnode::start(Config::new(Identity::from_seed([7; 32])))
        .await
        .map_err(|e| format!("the node did not start: {e}"))?;
    let scraped = scrape_many(&node, scrapes).await;
    let _ = node.shutdown().await;
    let (samples, bytes) = scraped?;
    Ok(Operations {
        connectivity,
        scrape_ms: Spread::of(samples),
        scrape_bytes: bytes,
    })
}

/// A database of `n` records on a ring, each listing its [`RING_REACH`] nearest on each side.
fn ring(n: usize) -> Result<(NodeDb, NodeId), String> {
    let nodes: Vec<Identity> = (0..n)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            Identity::from_seed(seed)
        })
        .collect();
    let mut db = NodeDb::new();
    for (i, node) in nodes.iter().enumerate() {
        let neighbors: BTreeSet<NodeId> = (1..=RING_REACH.min(n.saturating_sub(1) / 2))
            .flat_map(|d| [(i + d) % n, (i + n - d) % n])
            .map(|j| nodes[j].id())
            .collect();
        let record = NodeRecord {
            id: node.id(),
            addr: format!("127.0.0.1:{}", 10_000 + i % 50_000),
            version: 1,
            neighbors,
        };
        let signed = node
            .sign_verified(record)
            .map_err(|e| format!("a ring record: {e}"))?;
        db.merge(signed);
    }
    let me = nodes.first().map(Identity::id).ok_or("an empty ring")?;
    Ok((db, me))
}

async fn scrape_many(node: &Node, scrapes: usize) -> Result<(Vec<f64>, usize), String> {
    let mut samples = Vec::new();
    let mut bytes = 0;
    for _ in 0..scrapes {
        let started = Instant::now();
        let body = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(node.ui_addr()))
            .await
            .map_err(|_| format!("a scrape took over {SCRAPE_TIMEOUT:?}"))??;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
        bytes = body.len();
    }
    Ok((samples, bytes))
}

/// One `GET /metrics` over a new connection; the body.
async fn scrape(ui: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(ui)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {ui}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("a response without a body")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("the scrape was refused: {head}"));
    }
    if !body.contains("# EOF") {
        return Err("a scrape without # EOF".into());
    }
    Ok(body.to_owned())
}
