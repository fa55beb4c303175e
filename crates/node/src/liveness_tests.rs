//! Liveness, in paused time over in-memory streams: a frozen neighbor is dropped at the
//! neighbor timeout as if it had crashed; a live one, even one that reads nothing, is kept.

use std::collections::BTreeSet;
use std::time::Duration;

use meshnode_protocol::{Frame, NodeId};
use tokio::time::Instant;

use crate::test_support::{Peer, identity, within};
use crate::{Config, Node};

const PIPE: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(3);

async fn node_with_timeout(seed: u8) -> Node {
    let mut config = Config::new(identity(seed));
    config.neighbor_timeout = TIMEOUT;
    within("start", crate::start(config))
        .await
        .expect("the node starts")
}

async fn connect(node: &Node, seed: u8) -> Peer {
    let (mut peer, stream) = Peer::new(identity(seed), PIPE);
    assert!(node.adopt(stream).await, "the pool takes the stream");
    peer.handshake().await;
    peer
}

#[tokio::test(start_paused = true)]
async fn a_frozen_neighbor_is_dropped_at_the_timeout_and_the_others_hear_of_it_as_of_a_crash() {
    let node = node_with_timeout(1).await;
    let me = node.id();
    let mut frozen = connect(&node, 10).await;
    let mut live = connect(&node, 11).await;
    let mut slow = connect(&node, 12).await;
    let all: BTreeSet<NodeId> = [frozen.id(), live.id(), slow.id()].into();
    for peer in [&mut frozen, &mut live, &mut slow] {
        peer.until_node_lists(me, &all).await;
    }
    let started = Instant::now();

    // The slow neighbor is alive (keepalives) but reads nothing from here on.
    let slow_id = slow.id();
    let slow_keepalives = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            slow.keepalive().await;
        }
    });
    // The frozen one sends and reads nothing. The live one reads and sends keepalives until
    // the node's record lists exactly the two that are alive: what a crash of the frozen one
    // would have told it.
    let alive: BTreeSet<NodeId> = [live.id(), slow_id].into();
    let mut next_keepalive = Instant::now() + Duration::from_secs(1);
    loop {
        tokio::select! {
            frame = live.next() => match frame {
                Some(Frame::Gossip { records }) => {
                    if records.iter().any(|r| r.id() == me && r.record.neighbors == alive) {
                        break;
                    }
                }
                other => panic!("gossip expected, got {other:?}"),
            },
            () = tokio::time::sleep_until(next_keepalive) => {
                live.keepalive().await;
                next_keepalive += Duration::from_secs(1);
            }
        }
    }
    let dropped_after = started.elapsed();
    assert!(dropped_after >= TIMEOUT, "{dropped_after:?}");
    assert!(
        dropped_after < TIMEOUT + Duration::from_secs(1),
        "{dropped_after:?}"
    );
    let status = node.status().await.expect("status");
    let listed: BTreeSet<NodeId> = status
        .neighbors
        .iter()
        .map(|n| n.node_id.parse().expect("hex"))
        .collect();
    assert_eq!(listed, alive, "the slow but live neighbor is kept");
    assert_eq!(status.stats.peers_timed_out, 1);
    // The frozen neighbor's stream was closed (after what it had not read).
    frozen.rest().await;

    // Long after, the live and the slow ones are still there.
    for _ in 0..10 {
        live.keepalive().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let status = node.status().await.expect("status");
    assert_eq!(status.neighbors.len(), 2);
    assert_eq!(status.stats.peers_timed_out, 1);
    slow_keepalives.abort();
    assert!(node.stop().await);
}
