//! How many link handshakes (Noise XX with the identity proof, both sides) a machine completes
//! per second: both ends run in this process on loopback TCP, so the figure is the machine's
//! whole capacity, each handshake paid for once by the dialer and once by the listener.

use std::sync::Arc;
use std::time::Duration;

use meshnode::link::{LocalLink, handshake};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::peer;

/// Dialers running at once: enough to keep two cores busy through the round trips.
const CONCURRENCY: usize = 32;

#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub handshakes: usize,
    pub elapsed_ms: f64,
    pub per_second: f64,
}

/// Runs `count` handshakes, [`CONCURRENCY`] at a time, and times them.
pub async fn measure(count: usize) -> Result<Rate, String> {
    let timeout = Duration::from_secs(15);
    let listener_link =
        LocalLink::new(peer::identity(u32::MAX), timeout).map_err(|e| e.to_string())?;
    let dialer_link =
        Arc::new(LocalLink::new(peer::identity(u32::MAX - 1), timeout).map_err(|e| e.to_string())?);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let link = listener_link.clone();
            tokio::spawn(async move {
                let (read, write) = stream.into_split();
                let _ = handshake(read, write, false, &link).await;
            });
        }
    });
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let link = dialer_link.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (read, write) = stream.into_split();
            handshake(read, write, true, &link)
                .await
                .map(|_| ())
                .map_err(|e| format!("handshake: {e}"))
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let elapsed = started.elapsed();
    server.abort();
    Ok(Rate {
        handshakes: count,
        elapsed_ms: elapsed.as_secs_f64() * 1000.0,
        per_second: count as f64 / elapsed.as_secs_f64(),
    })
}
