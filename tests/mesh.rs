//! In-process meshes on loopback: real nodes, real sockets, one process.

mod support;

use std::collections::BTreeSet;

use meshnode::{Config, Node};
use meshnode_protocol::{Frame, Identity, NodeId, NodeRecord};

use support::{FakePeer, eventually, node, status};

fn ids(nodes: &[&Node]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.id().to_string()).collect()
}

/// True when `node`'s half-neighborships are exactly `expected`, all full.
async fn has_full_neighbors(node: &Node, expected: BTreeSet<String>) -> bool {
    let s = status(node).await;
    let got: BTreeSet<String> = s.neighbors.iter().map(|n| n.node_id.clone()).collect();
    got == expected && s.neighbors.iter().all(|n| n.full)
}

async fn knows(node: &Node, expected: BTreeSet<String>) -> bool {
    let s = status(node).await;
    let got: BTreeSet<String> = s.known_nodes.iter().map(|k| k.node_id.clone()).collect();
    expected.is_subset(&got)
}

#[tokio::test]
async fn three_nodes_become_full_neighbors_and_a_fourth_is_learned_through_gossip() {
    let a = node(1, &[]).await;
    let b = node(2, &[&a]).await;
    let c = node(3, &[&a]).await;
    let all = [&a, &b, &c];

    eventually("A is a full neighbor of B and C", || {
        has_full_neighbors(&a, ids(&[&b, &c]))
    })
    .await;
    eventually("B is a full neighbor of A", || {
        has_full_neighbors(&b, ids(&[&a]))
    })
    .await;
    eventually("C is a full neighbor of A", || {
        has_full_neighbors(&c, ids(&[&a]))
    })
    .await;
    for n in all {
        eventually("every node knows all three records", || knows(n, ids(&all))).await;
    }
    // B learns C's record only through A's gossip. C's first record lists nobody; the one
    // that lists A follows it one gossip window later (longer on a loaded machine), so the
    // wait is for that record itself, not for any record of C.
    let (a_id, c_id) = (a.id().to_string(), c.id().to_string());
    eventually("B holds C's record listing A", || async {
        status(&b)
            .await
            .known_nodes
            .iter()
            .any(|k| k.node_id == c_id && k.neighbors == [a_id.clone()])
    })
    .await;

    let d = node(4, &[&b]).await;
    let everyone = [&a, &b, &c, &d];
    for n in everyone {
        eventually("every node learns of D", || knows(n, ids(&everyone))).await;
    }
    eventually("B is a full neighbor of A and D", || {
        has_full_neighbors(&b, ids(&[&a, &d]))
    })
    .await;
    // A is two hops from D and C three: their view of D's record came through gossip alone.
    let (b_id, d_id) = (b.id().to_string(), d.id().to_string());
    for n in [&a, &c] {
        eventually("D's record, listing B, reaches A and C", || async {
            let s = status(n).await;
            s.known_nodes
                .iter()
                .any(|k| k.node_id == d_id && k.neighbors == [b_id.clone()])
        })
        .await;
        assert!(status(n).await.stats.gossip_frames_received > 0);
    }

    for n in [a, b, c, d] {
        assert!(n.stop().await, "node stops cleanly");
    }
}

#[tokio::test]
async fn a_stopped_neighbor_is_dropped_and_a_restarted_one_is_redialed() {
    let a = node(11, &[]).await;
    let a_addr = a.listen_addr();
    let b = node(12, &[&a]).await;
    eventually("B connects to A", || has_full_neighbors(&b, ids(&[&a]))).await;
    assert!(a.stop().await);
    eventually("B drops A", || async {
        status(&b).await.neighbors.is_empty()
    })
    .await;

    let mut config = Config::new(Identity::from_seed([11; 32]));
    config.listen = a_addr;
    let a = meshnode::start(config)
        .await
        .expect("A restarts on its old address");
    eventually("B redials A", || has_full_neighbors(&b, ids(&[&a]))).await;
    // A restarted at version 1; B held A's old record at a higher version and sent it back,
    // so A outbid its earlier life and B holds the new record.
    eventually("B holds A's current record", || async {
        let mine = status(&a).await.version;
        status(&b)
            .await
            .known_nodes
            .iter()
            .any(|k| k.node_id == a.id().to_string() && k.version == mine)
    })
    .await;
    assert!(b.stop().await && a.stop().await);
}

/// A hand-driven peer: handshakes with a node as `identity`, then sends what a test tells it to.
#[tokio::test]
async fn forged_gossip_changes_nothing() {
    let a = node(21, &[]).await;
    let mut mallory = FakePeer::connect(a.listen_addr(), Identity::from_seed([22; 32])).await;
    let victim = Identity::from_seed([23; 32]);
    let victim_record = |version: u64, addr: &str| {
        victim.sign(NodeRecord {
            id: victim.id(),
            addr: addr.into(),
            version,
            neighbors: BTreeSet::new(),
        })
    };
    // The victim's genuine record, version 5, arrives first (relayed, as gossip does).
    let genuine = victim_record(5, "127.0.0.1:5005");
    mallory
        .send(&Frame::Gossip {
            records: vec![genuine],
        })
        .await;
    eventually("A learns the victim", || async {
        status(&a)
            .await
            .known_nodes
            .iter()
            .any(|k| k.node_id == victim.id().to_string())
    })
    .await;
    let before = status(&a).await;

    // 1. A newer version of the victim's record, signed by Mallory: bad signature.
    let mut forged = mallory.record_at(9, "127.0.0.1:6666");
    forged.record.id = victim.id();
    // 2. A record of Mallory's own, tampered with after signing.
    let mut tampered = mallory.record_at(3, "127.0.0.1:9");
    tampered.record.version = 40;
    // 3. A replay of the victim's genuine record at a lower version.
    let replay = victim_record(4, "127.0.0.1:4004");
    mallory
        .send(&Frame::Gossip {
            records: vec![forged, tampered, replay],
        })
        .await;

    eventually("the forgeries are counted", || async {
        let s = status(&a).await.stats;
        s.records_rejected == 2 && s.records_stale > before.stats.records_stale
    })
    .await;
    let after = status(&a).await;
    assert_eq!(
        after.known_nodes, before.known_nodes,
        "forged gossip changed the database"
    );
    let v = after
        .known_nodes
        .iter()
        .find(|k| k.node_id == victim.id().to_string())
        .expect("victim");
    assert_eq!((v.version, v.addr.as_str()), (5, "127.0.0.1:5005"));
    assert!(a.stop().await);
}

/// Only what can matter is forwarded (docs/protocol.md): records of keys that nobody lists,
/// sent to A by a neighbor, stay at A. A node joining the mesh through that neighbor, sent after
/// them on the same link, reaches B: A forwards over one link in order, so had A forwarded the
/// fresh keys, B would hold them by then.
#[tokio::test]
async fn records_of_keys_nobody_lists_stop_at_the_node_that_got_them() {
    let a = node(31, &[]).await;
    let b = node(32, &[&a]).await;
    eventually("A and B are full neighbors", || {
        has_full_neighbors(&b, ids(&[&a]))
    })
    .await;
    let mut peer = FakePeer::connect(a.listen_addr(), Identity::from_seed([33; 32])).await;
    let sign = |owner: &Identity, version: u64, neighbors: BTreeSet<NodeId>| {
        owner.sign(NodeRecord {
            id: owner.id(),
            addr: "127.0.0.1:9".into(),
            version,
            neighbors,
        })
    };
    let fresh: Vec<Identity> = (40..60).map(|s| Identity::from_seed([s; 32])).collect();
    peer.send(&Frame::Gossip {
        records: fresh.iter().map(|f| sign(f, 1, BTreeSet::new())).collect(),
    })
    .await;
    let fresh_ids: BTreeSet<String> = fresh.iter().map(|f| f.id().to_string()).collect();
    eventually("A stores the fresh keys' records", || {
        knows(&a, fresh_ids.clone())
    })
    .await;

    // The neighbor lists A back, and a newcomer that lists it joins: both are reachable.
    let newcomer = Identity::from_seed([61; 32]);
    let joined = sign(
        &peer.identity,
        2,
        [a.id(), newcomer.id()].into_iter().collect(),
    );
    let arrived = sign(&newcomer, 1, [peer.id()].into_iter().collect());
    peer.send(&Frame::Gossip {
        records: vec![joined, arrived],
    })
    .await;
    let newcomer_id = newcomer.id().to_string();
    eventually("B stores the newcomer's record", || {
        knows(&b, [newcomer_id.clone()].into_iter().collect())
    })
    .await;
    let at_b: BTreeSet<String> = status(&b)
        .await
        .known_nodes
        .into_iter()
        .map(|k| k.node_id)
        .collect();
    assert!(
        at_b.is_disjoint(&fresh_ids),
        "B holds records of keys nobody lists"
    );
    assert!(at_b.contains(&peer.id().to_string()));
    assert!(b.stop().await && a.stop().await);
}
