//! The neighborhood with two different records of one node at one version (two lives of its
//! key), which the database orders by signature: the one it keeps reaches every neighbor that
//! sent the other.

use bytes::Bytes;
use meshnode_protocol::{Frame, Identity, NodeRecord, SignedRecord, VerifiedRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::NeighborhoodMsg;
use super::database::supersedes;
use super::state::Neighborhood;
use crate::link::{ConnId, StreamHandle};

fn record(owner: &Identity, addr: &str, neighbors: &[&Identity]) -> VerifiedRecord {
    owner
        .sign_verified(NodeRecord {
            id: owner.id(),
            addr: addr.into(),
            version: 3,
            neighbors: neighbors.iter().map(|n| n.id()).collect(),
        })
        .expect("a well-formed record verifies")
}

fn queued(queue: &mut mpsc::Receiver<Bytes>) -> Vec<SignedRecord> {
    let mut records = Vec::new();
    while let Ok(body) = queue.try_recv() {
        if let Ok(Frame::Gossip { records: more }) = Frame::decode(&body) {
            records.extend(more);
        }
    }
    records
}

/// Regression: a record that lost the tie-break was taken for a copy of the kept one, so its
/// sender was counted as having the kept one and never sent it.
#[test]
fn the_record_kept_at_a_tie_goes_to_the_neighbor_that_sent_the_other() {
    let me = Identity::from_seed([1; 32]);
    let mut hood = Neighborhood::new(me.clone(), "127.0.0.1:4000".into()).expect("own record");
    let (a, b) = (Identity::from_seed([10; 32]), Identity::from_seed([11; 32]));
    // A lists the owner, so the owner's records (which list A) are reachable.
    let owner = Identity::from_seed([50; 32]);
    let (a_stream, mut a_queue) = StreamHandle::new(ConnId(1), a.id(), CancellationToken::new());
    let (b_stream, mut b_queue) = StreamHandle::new(ConnId(2), b.id(), CancellationToken::new());
    for (stream, who, lists) in [(a_stream, &a, vec![&me, &owner]), (b_stream, &b, vec![&me])] {
        hood.handle(NeighborhoodMsg::NeighborConnected {
            stream,
            record: record(who, "127.0.0.1:5000", &lists),
        });
    }
    hood.flush();
    queued(&mut a_queue);
    queued(&mut b_queue);

    let (x, y) = (
        record(&owner, "10.0.0.1:1", &[&a]),
        record(&owner, "10.0.0.2:1", &[&a]),
    );
    let (kept, lost) = if supersedes(&x, &y) { (x, y) } else { (y, x) };
    hood.handle(NeighborhoodMsg::Gossip {
        from: a.id(),
        records: vec![kept.clone()],
    });
    hood.handle(NeighborhoodMsg::Gossip {
        from: b.id(),
        records: vec![lost],
    });
    hood.flush();
    assert!(
        !queued(&mut a_queue).iter().any(|r| r.id() == owner.id()),
        "A sent the kept record itself"
    );
    assert_eq!(
        queued(&mut b_queue)
            .iter()
            .filter(|r| r.id() == owner.id())
            .collect::<Vec<_>>(),
        [kept.signed()],
        "B sent the record that lost, and gets the kept one"
    );
}
