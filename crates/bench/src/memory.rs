//! Scenario 3: resident memory of one node per neighbor connection, from the operating
//! system's own accounting (`VmRSS` in /proc), the node in a process of its own.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::future::join_all;
use meshnode_protocol::NodeId;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::{peer, stats};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memory {
    pub neighbors: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub per_neighbor_kib: f64,
}

/// Runs a node in a child process (this same program, `serve-node`), connects `n` light
/// neighbors to it, and reads its resident memory before and after.
pub async fn measure(n: usize) -> Result<Memory, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("serve-node")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the node process: {e}"))?;
    let result = run(&mut child, n).await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Longest the node's record may take to reach every neighbor listing them all.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

async fn run(child: &mut Child, n: usize) -> Result<Memory, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let mut words = line.split_whitespace();
    let addr: SocketAddr = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or("no address")?;
    let id: NodeId = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or("no node id")?;
    let pid = child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = stats::rss_kib(&pid.to_string())?;
    let mut peers = Vec::with_capacity(n);
    let listed = peer::Listed::new(n);
    for wave in (0..n).collect::<Vec<_>>().chunks(256) {
        let mut readies = Vec::new();
        for &i in wave {
            let (ready, is_ready) = oneshot::channel();
            let me = peer::identity(u32::try_from(i).unwrap_or(u32::MAX));
            peers.push(tokio::spawn(peer::run(addr, id, me, ready, listed.clone())));
            readies.push(is_ready);
        }
        for ready in join_all(readies).await {
            ready.map_err(|_| "a neighbor failed to connect".to_owned())?;
        }
    }
    // Let the gossip about the new neighbors die down (the node paces the publishes of its
    // record, so that is once every neighbor has seen it list them all) and the allocator
    // settle.
    listed.wait(SETTLE_LIMIT).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = stats::rss_kib(&pid.to_string())?;
    for peer in peers {
        peer.abort();
    }
    Ok(Memory {
        neighbors: n,
        rss_before_kib: before,
        rss_after_kib: after,
        per_neighbor_kib: after.saturating_sub(before) as f64 / n as f64,
    })
}

/// The child's side: run a node on loopback, print `LISTEN_ADDR NODE_ID`, run until killed.
pub async fn serve_node() -> Result<(), String> {
    let identity = meshnode_protocol::Identity::generate().map_err(|e| e.to_string())?;
    let node = meshnode::start(meshnode::Config::new(identity))
        .await
        .map_err(|e| e.to_string())?;
    println!("{} {}", node.listen_addr(), node.id());
    node.wait().await;
    Ok(())
}
