//! What the cross-crate and process-level tests share.
// Each test file uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use meshnode_protocol::{Frame, Identity, NodeId, NodeRecord, PROTOCOL_VERSION};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A neighbor that sends its hello and then neither reads nor hangs up, so that a node's
/// shutdown stays under way until its deadline. Dropping it closes the connection.
pub struct StuckNeighbor {
    pub id: NodeId,
    _stream: TcpStream,
}

pub async fn stuck_neighbor(node: SocketAddr) -> StuckNeighbor {
    let mut stream = TcpStream::connect(node).await.expect("the node listens");
    let me = Identity::from_seed([99; 32]);
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        record: me.sign(NodeRecord {
            id: me.id(),
            addr: "127.0.0.1:9".into(),
            version: 1,
            neighbors: BTreeSet::new(),
        }),
    };
    let body = hello.encode().expect("encodes");
    let len = u32::try_from(body.len()).expect("a small frame");
    let mut wire = len.to_be_bytes().to_vec();
    wire.extend_from_slice(&body);
    stream.write_all(&wire).await.expect("hello sent");
    StuckNeighbor {
        id: me.id(),
        _stream: stream,
    }
}

/// Bound on every wait in these tests: generous, so that only a bug reaches it.
pub const BOUND: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test after [`BOUND`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {BOUND:?}"))
}

/// Polls `check` until it holds, failing the test after [`BOUND`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
