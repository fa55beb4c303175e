//! The neighborhood driven through its inbox. Each neighbor is a [`StreamHandle`] whose writer
//! queue the test holds, so a test sees exactly the gossip frames queued for each neighbor.
//!
//! These tests run on the current-thread runtime of `#[tokio::test]`: the neighborhood handles a
//! batch and flushes it without an await in between, so once the answer to a status request
//! comes back, every frame owed by that request's batch is already queued.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;

use meshnode_protocol::{Frame, Identity, NodeId, NodeRecord, SignedRecord, VerifiedRecord};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::props_support::identity;
use super::state::Neighborhood;
use super::{GossipCounters, NeighborhoodHandle, NeighborhoodMsg, NeighborhoodStatus};
use crate::link::{BUSY_AT, ConnId, StreamHandle};
use crate::test_support::within;

const ADDR: &str = "127.0.0.1:4000";

fn record(owner: &Identity, version: u64, neighbors: &[NodeId]) -> VerifiedRecord {
    owner
        .sign_verified(NodeRecord {
            id: owner.id(),
            addr: format!("127.0.0.1:{}", 5000 + u16::from(owner.id().0[0])),
            version,
            neighbors: neighbors.iter().copied().collect(),
        })
        .expect("a well-formed record verifies")
}

/// Ids and versions of a frame's records, for comparisons that read well.
fn summary(records: &[SignedRecord]) -> BTreeSet<(NodeId, u64)> {
    records.iter().map(|r| (r.id(), r.version())).collect()
}

fn ids(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

/// A neighbor as the neighborhood sees it: the handle of its stream, and the queue that stream's
/// writer would drain.
struct Neighbor {
    identity: Identity,
    stream: StreamHandle,
    queue: mpsc::Receiver<Bytes>,
    killed: CancellationToken,
    /// Bytes of every body taken from the queue so far.
    bytes: u64,
}

impl Neighbor {
    fn new(seed: u8, conn: u64) -> Self {
        Self::with_identity(identity(seed), conn)
    }

    fn with_identity(identity: Identity, conn: u64) -> Self {
        let killed = CancellationToken::new();
        let (stream, queue) = StreamHandle::new(ConnId(conn), identity.id(), killed.clone());
        Self {
            identity,
            stream,
            queue,
            killed,
            bytes: 0,
        }
    }

    /// The same neighbor over a new stream.
    fn new_stream(&self, conn: u64) -> Self {
        Self::with_identity(self.identity.clone(), conn)
    }

    fn id(&self) -> NodeId {
        self.identity.id()
    }

    fn connected(&self, version: u64, neighbors: &[NodeId]) -> NeighborhoodMsg {
        NeighborhoodMsg::NeighborConnected {
            stream: self.stream.clone(),
            record: record(&self.identity, version, neighbors),
        }
    }

    fn gossip(&self, records: Vec<VerifiedRecord>) -> NeighborhoodMsg {
        NeighborhoodMsg::Gossip {
            from: self.id(),
            records,
        }
    }

    fn disconnected(&self) -> NeighborhoodMsg {
        NeighborhoodMsg::NeighborDisconnected {
            conn: self.stream.id(),
            peer: self.id(),
        }
    }

    /// The records of every gossip frame queued for this neighbor since the last look.
    fn queued(&mut self) -> Vec<Vec<SignedRecord>> {
        let mut frames = Vec::new();
        while let Ok(body) = self.queue.try_recv() {
            self.bytes += body.len() as u64;
            match Frame::decode(&body).expect("the neighborhood queues valid frames") {
                Frame::Gossip { records } => {
                    for r in &records {
                        r.verify().expect("gossiped records verify");
                    }
                    frames.push(records);
                }
                other => panic!("the neighborhood only sends gossip, got {other:?}"),
            }
        }
        frames
    }

    /// The records of the one gossip frame queued since the last look.
    fn one_frame(&mut self) -> Vec<SignedRecord> {
        let mut frames = self.queued();
        assert_eq!(frames.len(), 1, "one frame expected, got {frames:?}");
        frames.remove(0)
    }

    fn nothing_queued(&mut self) {
        let frames = self.queued();
        assert!(frames.is_empty(), "no frame expected, got {frames:?}");
    }
}

/// The neighborhood task, started through the public `spawn`.
struct Running {
    identity: Identity,
    handle: NeighborhoodHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    fn spawn(seed: u8) -> Self {
        let identity = identity(seed);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = super::spawn_counting(
            identity.clone(),
            ADDR.into(),
            super::GossipTiming {
                window: Duration::ZERO,
            },
            cancel.clone(),
            &tracker,
        )
        .expect("the node's first record is valid");
        Self {
            identity,
            handle,
            cancel,
            tracker,
        }
    }

    fn me(&self) -> NodeId {
        self.identity.id()
    }

    async fn send(&self, msg: NeighborhoodMsg) {
        within("the neighborhood takes a message", self.handle.send(msg))
            .await
            .expect("the neighborhood is running");
    }

    /// The status after every message sent before it, the gossip they caused included (the
    /// task answers status after its batch's flush; asking twice also covers a message that
    /// arrived in the same turn as the first request).
    async fn status(&self) -> NeighborhoodStatus {
        within("the neighborhood answers status", self.handle.status())
            .await
            .expect("the neighborhood is running");
        within("the neighborhood answers status", self.handle.status())
            .await
            .expect("the neighborhood is running")
    }

    async fn neighbors(&self) -> BTreeSet<NodeId> {
        self.status()
            .await
            .neighbors
            .iter()
            .map(|n| n.node_id.parse().expect("neighbor ids are hex"))
            .collect()
    }

    /// The own record as the neighborhood would put it in a hello.
    async fn own(&self) -> SignedRecord {
        within("the neighborhood answers", self.handle.own_record())
            .await
            .expect("the neighborhood is running")
            .into_signed()
    }

    /// Cancels the task and checks that it ends.
    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        within("the neighborhood stops", self.tracker.wait()).await;
        let after = within("a stopped neighborhood says so", self.handle.status()).await;
        assert!(after.is_err(), "a stopped neighborhood answers nothing");
    }
}

#[tokio::test]
async fn a_new_neighbor_gets_the_whole_database_and_is_listed_in_a_bumped_own_record() {
    let hood = Running::spawn(1);
    let me = hood.me();
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);

    let first = hood.status().await;
    assert_eq!((first.node_id, first.version), (me, 1));
    assert!(first.neighbors.is_empty());
    assert_eq!(first.known_nodes.len(), 1);

    hood.send(a.connected(1, &[])).await;
    let status = hood.status().await;
    assert_eq!(status.version, 2, "one bump for one new neighbor");
    assert_eq!(hood.neighbors().await, ids(&[a.id()]));
    assert!(!status.neighbors[0].full, "A does not list this node yet");
    // The whole database: this node's record, which now lists A, and A's own (stale there).
    let frame = a.one_frame();
    assert_eq!(summary(&frame), BTreeSet::from([(me, 2), (a.id(), 1)]));
    let own = frame
        .iter()
        .find(|r| r.id() == me)
        .expect("the node's record");
    assert_eq!(own.record.neighbors, ids(&[a.id()]));
    assert_eq!(own.record.addr, ADDR);
    assert_eq!(own, &hood.own().await);

    // B already lists this node, so B is a full neighbor.
    hood.send(b.connected(1, &[me])).await;
    let status = hood.status().await;
    assert_eq!(status.version, 3);
    assert_eq!(hood.neighbors().await, ids(&[a.id(), b.id()]));
    let full: Vec<_> = status.neighbors.iter().map(|n| n.full).collect();
    let b_first = b.id() < a.id();
    assert_eq!(
        full,
        if b_first {
            [true, false]
        } else {
            [false, true]
        }
    );
    assert_eq!(status.known_nodes.len(), 3);
    // B gets the whole database; A gets what changed: the own record and B's.
    assert_eq!(
        summary(&b.one_frame()),
        BTreeSet::from([(me, 3), (a.id(), 1), (b.id(), 1)])
    );
    let frame = a.one_frame();
    assert_eq!(summary(&frame), BTreeSet::from([(me, 3), (b.id(), 1)]));
    assert_eq!(
        status.counters,
        GossipCounters {
            frames_sent: 3,
            bytes_sent: a.bytes + b.bytes,
            records_accepted: 2,
            ..GossipCounters::default()
        }
    );
    hood.stop().await;
}

#[tokio::test]
async fn a_changed_record_goes_to_the_other_neighbors_only_and_a_stale_one_goes_nowhere() {
    let hood = Running::spawn(1);
    let me = hood.me();
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    let mut c = Neighbor::new(12, 3);
    let x = identity(20);
    // Full neighbors; A lists X, so X's record that lists A back is reachable.
    hood.send(a.connected(1, &[me, x.id()])).await;
    for n in [&b, &c] {
        hood.send(n.connected(1, &[me])).await;
    }
    let base = hood.status().await.counters;
    for n in [&mut a, &mut b, &mut c] {
        n.queued();
    }

    hood.send(a.gossip(vec![record(&x, 2, &[a.id()])])).await;
    let status = hood.status().await;
    assert_eq!(summary(&b.one_frame()), BTreeSet::from([(x.id(), 2)]));
    assert_eq!(summary(&c.one_frame()), BTreeSet::from([(x.id(), 2)]));
    a.nothing_queued();
    assert_eq!(
        status.counters,
        GossipCounters {
            frames_received: base.frames_received + 1,
            records_accepted: base.records_accepted + 1,
            frames_sent: base.frames_sent + 2,
            bytes_sent: a.bytes + b.bytes + c.bytes,
            ..base
        }
    );
    let known = status
        .known_nodes
        .iter()
        .find(|k| k.node_id == x.id().to_string())
        .expect("X is known");
    assert_eq!(known.version, 2);
    assert_eq!(known.neighbors, vec![a.id().to_string()]);

    // The same version (an echo) and an older one change nothing and go nowhere.
    hood.send(b.gossip(vec![record(&x, 2, &[a.id()])])).await;
    hood.send(c.gossip(vec![record(&x, 1, &[])])).await;
    let status = hood.status().await;
    for n in [&mut a, &mut b, &mut c] {
        n.nothing_queued();
    }
    assert_eq!(
        status.counters,
        GossipCounters {
            frames_received: base.frames_received + 3,
            records_accepted: base.records_accepted + 1,
            records_stale: base.records_stale + 2,
            frames_useless: base.frames_useless + 2,
            frames_sent: base.frames_sent + 2,
            bytes_sent: a.bytes + b.bytes + c.bytes,
            ..base
        }
    );

    // A newer one from C goes to A and B (X's withdrawal: X was reachable). A listed X back,
    // and a withdrawing node sends its withdrawal to each of its neighbors itself; but A's
    // link carries no digests, which would bring it a withdrawal whose direct frame it missed
    // (see digest_tests), so it is sent to A all the same.
    hood.send(c.gossip(vec![record(&x, 3, &[])])).await;
    let status = hood.status().await;
    assert_eq!(summary(&a.one_frame()), BTreeSet::from([(x.id(), 3)]));
    assert_eq!(summary(&b.one_frame()), BTreeSet::from([(x.id(), 3)]));
    c.nothing_queued();
    assert_eq!(status.counters.records_accepted, base.records_accepted + 2);
    assert_eq!(status.counters.frames_sent, base.frames_sent + 4);
    assert_eq!(status.version, 4, "others' records never bump the own one");
    hood.stop().await;
}

/// A record is forwarded as the bytes it came in: the neighborhood packs frames from the
/// stored wire bytes, two neighbors get the same body, and no JSON is anywhere on the wire.
#[tokio::test(start_paused = true)]
async fn a_forwarded_record_leaves_byte_for_byte_as_it_came() {
    let hood = Running::spawn(1);
    let me = hood.me();
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    let mut c = Neighbor::new(12, 3);
    let x = identity(20);
    hood.send(a.connected(1, &[me, x.id()])).await;
    for n in [&b, &c] {
        hood.send(n.connected(1, &[me])).await;
    }
    hood.status().await;
    for n in [&mut a, &mut b, &mut c] {
        n.queued();
    }
    let wire = record(&x, 2, &[a.id(), b.id()]).wire().clone();
    let received = meshnode_protocol::WireRecord::decode(&wire)
        .expect("well formed")
        .into_verified()
        .expect("verifies");
    hood.send(a.gossip(vec![received])).await;
    hood.status().await;
    let mut expected = vec![2, 0, 0, 0, 1];
    expected.extend_from_slice(&wire);
    for n in [&mut b, &mut c] {
        let body = n.queue.try_recv().expect("one frame");
        assert_eq!(&body[..], &expected[..]);
    }
    a.nothing_queued();
    hood.stop().await;
}

#[test]
fn changes_handled_in_one_batch_leave_as_one_gossip_frame_per_neighbor() {
    let me = identity(1);
    let mut hood = Neighborhood::new(me.clone(), ADDR.into()).expect("own record");
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    let mut c = Neighbor::new(12, 3);
    let xs: Vec<Identity> = (20..25).map(identity).collect();
    let listed = |xs: &[Identity]| {
        let mut ids: Vec<NodeId> = xs.iter().map(Identity::id).collect();
        ids.push(me.id());
        ids
    };
    // Three neighbors connecting in one batch: three bumps, one full database each. A lists
    // three newcomers, B two, so that their records are reachable once they list them back.
    hood.handle(a.connected(1, &listed(&xs[..3])));
    hood.handle(b.connected(1, &listed(&xs[3..])));
    hood.handle(c.connected(1, &listed(&[])));
    a.nothing_queued();
    hood.flush();
    let others = |n: &Neighbor| {
        // Everyone gets the same set, its own record included, so it is encoded once.
        let _ = n;
        [&a, &b, &c]
            .iter()
            .map(|o| (o.id(), 1))
            .chain([(me.id(), 4)])
            .collect::<BTreeSet<_>>()
    };
    let (want_a, want_b, want_c) = (others(&a), others(&b), others(&c));
    assert_eq!(summary(&a.one_frame()), want_a);
    assert_eq!(summary(&b.one_frame()), want_b);
    assert_eq!(summary(&c.one_frame()), want_c);

    // Five changes from two neighbors in one batch.
    for x in &xs[..3] {
        hood.handle(a.gossip(vec![record(x, 1, &[a.id()])]));
    }
    for x in &xs[3..] {
        hood.handle(b.gossip(vec![record(x, 1, &[b.id()])]));
    }
    a.nothing_queued();
    hood.flush();
    let from = |xs: &[Identity]| xs.iter().map(|x| (x.id(), 1)).collect::<BTreeSet<_>>();
    assert_eq!(summary(&a.one_frame()), from(&xs[3..]));
    assert_eq!(summary(&b.one_frame()), from(&xs[..3]));
    assert_eq!(summary(&c.one_frame()), from(&xs));

    // Nothing changed since: nothing to send.
    hood.flush();
    for n in [&mut a, &mut b, &mut c] {
        n.nothing_queued();
    }
    let (reply, mut rx) = oneshot::channel();
    hood.handle(NeighborhoodMsg::Status { reply });
    hood.answer_status();
    let status = rx
        .try_recv()
        .expect("status is answered at the end of the batch");
    assert_eq!(status.version, 4);
    assert_eq!(
        status.counters,
        GossipCounters {
            frames_sent: 6,
            bytes_sent: a.bytes + b.bytes + c.bytes,
            frames_received: 5,
            records_accepted: 8,
            ..GossipCounters::default()
        }
    );
}

#[tokio::test]
async fn messages_sent_back_to_back_to_the_running_task_are_flushed_as_one_batch() {
    let hood = Running::spawn(1);
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    let xs: Vec<Identity> = (20..26).map(identity).collect();
    let mut listed: Vec<NodeId> = xs.iter().map(Identity::id).collect();
    listed.push(hood.me());
    hood.send(a.connected(1, &listed)).await;
    hood.send(b.connected(1, &[hood.me()])).await;
    hood.status().await;
    a.queued();
    b.queued();
    // Back to back: the task does not run until the status request below waits for its answer.
    for x in &xs {
        hood.send(a.gossip(vec![record(x, 1, &[a.id()])])).await;
    }
    let status = hood.status().await;
    let frame = b.one_frame();
    assert_eq!(frame.len(), xs.len());
    assert_eq!(
        summary(&frame),
        xs.iter().map(|x| (x.id(), 1)).collect::<BTreeSet<_>>()
    );
    a.nothing_queued();
    assert_eq!(status.counters.frames_received, 6);
    hood.stop().await;
}

#[tokio::test]
async fn a_disconnect_of_the_current_stream_drops_the_neighbor_once_and_a_stale_one_changes_nothing()
 {
    let hood = Running::spawn(1);
    let me = hood.me();
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    hood.send(a.connected(1, &[])).await;
    hood.send(b.connected(1, &[])).await;
    assert_eq!(hood.status().await.version, 3);
    a.queued();
    b.queued();

    // The pool replaced A's stream: the new one gets the whole database, the own record is
    // unchanged and nobody else hears of it.
    let mut a2 = a.new_stream(3);
    hood.send(a2.connected(1, &[])).await;
    assert_eq!(hood.status().await.version, 3);
    assert_eq!(
        summary(&a2.one_frame()),
        BTreeSet::from([(me, 3), (a.id(), 1), (b.id(), 1)])
    );
    a.nothing_queued();
    b.nothing_queued();

    // The replaced stream's disconnect, and one for a stream that never was, change nothing.
    hood.send(a.disconnected()).await;
    hood.send(NeighborhoodMsg::NeighborDisconnected {
        conn: ConnId(99),
        peer: b.id(),
    })
    .await;
    let status = hood.status().await;
    assert_eq!(status.version, 3);
    assert_eq!(hood.neighbors().await, ids(&[a.id(), b.id()]));
    for n in [&mut a, &mut a2, &mut b] {
        n.nothing_queued();
    }

    // The current stream's disconnect removes the half-neighborship: one bump, gossiped once.
    hood.send(a2.disconnected()).await;
    let status = hood.status().await;
    assert_eq!(status.version, 4);
    assert_eq!(hood.neighbors().await, ids(&[b.id()]));
    let frame = b.one_frame();
    assert_eq!(summary(&frame), BTreeSet::from([(me, 4)]));
    assert_eq!(frame[0].record.neighbors, ids(&[b.id()]));
    a2.nothing_queued();
    assert!(
        status
            .known_nodes
            .iter()
            .any(|k| k.node_id == a.id().to_string()),
        "A's record is kept: only the half-neighborship goes"
    );

    // Hearing it again changes nothing.
    hood.send(a2.disconnected()).await;
    assert_eq!(hood.status().await.version, 4);
    b.nothing_queued();
    hood.stop().await;
}

#[tokio::test]
async fn the_own_record_from_an_earlier_life_of_the_key_is_outbid() {
    let hood = Running::spawn(1);
    let me = hood.me();
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    hood.send(a.connected(1, &[])).await;
    hood.send(b.connected(1, &[])).await;
    assert_eq!(hood.status().await.version, 3);
    a.queued();
    b.queued();

    // A relays the record this key signed in an earlier run, at a higher version.
    let earlier = record(&hood.identity, 7, &[identity(30).id()]);
    hood.send(a.gossip(vec![earlier])).await;
    let status = hood.status().await;
    assert_eq!(status.version, 8, "re-signed just above the earlier life");
    let own = hood.own().await;
    assert_eq!(own.version(), 8);
    assert_eq!(
        own.record.neighbors,
        ids(&[a.id(), b.id()]),
        "the current neighbors"
    );
    assert_eq!(own.record.addr, ADDR);
    own.verify().expect("the new record is signed");
    // Every neighbor needs the new record, A included: A holds the earlier one.
    for n in [&mut a, &mut b] {
        let frame = n.one_frame();
        assert_eq!(summary(&frame), BTreeSet::from([(me, 8)]));
        assert_eq!(frame[0], own);
    }
    let stored = status
        .known_nodes
        .iter()
        .find(|k| k.node_id == me.to_string())
        .expect("the own record is in the database");
    assert_eq!(stored.version, 8);

    // An earlier life at the very same version, with other content, is outbid too.
    hood.send(a.gossip(vec![record(&hood.identity, 8, &[])]))
        .await;
    let status = hood.status().await;
    assert_eq!(status.version, 9);
    assert_eq!(summary(&a.one_frame()), BTreeSet::from([(me, 9)]));
    assert_eq!(summary(&b.one_frame()), BTreeSet::from([(me, 9)]));

    // An older copy changes nothing.
    let stale_before = status.counters.records_stale;
    hood.send(b.gossip(vec![record(&hood.identity, 5, &[])]))
        .await;
    let status = hood.status().await;
    assert_eq!(status.version, 9);
    assert_eq!(status.counters.records_stale, stale_before + 1);
    a.nothing_queued();
    b.nothing_queued();
    hood.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_neighbor_has_its_gossip_held_back_coalesced_and_sent_once_it_drains() {
    let hood = Running::spawn(1);
    let mut slow = Neighbor::new(10, 1);
    let mut fine = Neighbor::new(11, 2);
    // `fine` lists the nodes whose records it relays, so that they are reachable.
    let relayed: Vec<NodeId> = (100..=u8::MAX)
        .map(|s| identity(s).id())
        .chain([hood.me()])
        .collect();
    hood.send(slow.connected(1, &[hood.me()])).await;
    hood.send(fine.connected(1, &relayed)).await;
    hood.status().await;
    fine.queued();

    // Every record `fine` relays is one frame for `slow`, which reads nothing, until its
    // queue is busy.
    let mut seed = 100u8;
    while slow.queue.len() < BUSY_AT {
        hood.send(fine.gossip(vec![record(&identity(seed), 1, &[fine.id()])]))
            .await;
        assert_eq!(hood.status().await.counters.deferred, 0);
        seed += 1;
    }
    // From here on `slow`'s gossip is held back, not queued, not dropped, and nothing is killed.
    let held: Vec<NodeId> = (seed..seed + 5).map(|s| identity(s).id()).collect();
    for s in seed..seed + 5 {
        hood.send(fine.gossip(vec![record(&identity(s), 1, &[fine.id()])]))
            .await;
    }
    let status = hood.status().await;
    assert!(status.counters.deferred >= 1);
    assert_eq!(
        slow.queue.len(),
        BUSY_AT,
        "nothing piled up past the busy mark"
    );
    assert!(!slow.killed.is_cancelled());
    assert_eq!(fine.queued().len(), 0, "fine sent those records itself");

    // Once `slow` drains its queue, what it is owed arrives coalesced, in one frame.
    assert_eq!(slow.queued().len(), BUSY_AT);
    tokio::time::sleep(Duration::from_millis(50)).await;
    hood.status().await;
    let frame = slow.one_frame();
    let got: BTreeSet<NodeId> = frame.iter().map(SignedRecord::id).collect();
    assert_eq!(got, held.into_iter().collect());
    hood.stop().await;
}

#[tokio::test]
async fn a_replaced_stream_whose_connect_arrives_late_does_not_cost_the_neighbor() {
    let hood = Running::spawn(1);
    let me = hood.me();
    let mut a_old = Neighbor::new(10, 1);
    let mut a_new = a_old.new_stream(2);
    let mut b = Neighbor::new(11, 3);
    let x = identity(20);
    hood.send(b.connected(1, &[me, x.id()])).await;
    hood.status().await;
    b.queued();

    // The pool admitted the old stream, then the new one, killing the old; the two stream tasks
    // raced, and the new one's connect arrived first.
    a_old.killed.cancel();
    hood.send(a_new.connected(1, &[me])).await;
    hood.status().await;
    assert_eq!(
        summary(&a_new.one_frame()),
        BTreeSet::from([(me, 3), (a_new.id(), 1), (b.id(), 1)])
    );
    hood.send(a_old.connected(1, &[me])).await;
    hood.status().await;
    a_old.queued();
    hood.send(a_old.disconnected()).await;
    let status = hood.status().await;
    assert_eq!(hood.neighbors().await, ids(&[a_new.id(), b.id()]));
    assert_eq!(status.version, 3, "A connected once and was never lost");
    assert_eq!(
        summary(&b.one_frame()),
        BTreeSet::from([(me, 3), (a_new.id(), 1)]),
        "B heard of A once"
    );
    // Gossip meant for A may have gone to the dead stream: the live one gets everything again.
    assert_eq!(
        summary(&a_new.one_frame()),
        BTreeSet::from([(me, 3), (a_new.id(), 1), (b.id(), 1)])
    );
    hood.send(b.gossip(vec![record(&x, 1, &[b.id()])])).await;
    hood.status().await;
    assert_eq!(summary(&a_new.one_frame()), BTreeSet::from([(x.id(), 1)]));
    a_old.nothing_queued();

    // When the live stream ends, A goes.
    hood.send(a_new.disconnected()).await;
    assert_eq!(hood.neighbors().await, ids(&[b.id()]));
    assert_eq!(hood.status().await.version, 4);
    hood.stop().await;
}

#[tokio::test]
async fn a_neighbor_whose_hello_is_older_than_its_stored_record_gets_that_record_back() {
    let hood = Running::spawn(1);
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    hood.send(b.connected(1, &[])).await;
    // B relays A's record from an earlier run of A, then A connects afresh at version 1.
    let earlier = record(&a.identity, 5, &[identity(30).id()]);
    hood.send(b.gossip(vec![earlier.clone()])).await;
    hood.send(a.connected(1, &[])).await;
    hood.status().await;
    let frame = a.one_frame();
    assert!(
        frame.contains(earlier.signed()),
        "A must learn of its earlier life to outbid it: {:?}",
        summary(&frame)
    );

    // A outbids it; the new record replaces it and goes to B.
    b.queued();
    hood.send(a.gossip(vec![record(&a.identity, 6, &[hood.me()])]))
        .await;
    hood.status().await;
    assert_eq!(summary(&b.one_frame()), BTreeSet::from([(a.id(), 6)]));
    let status = hood.status().await;
    let listed = status
        .neighbors
        .iter()
        .find(|n| n.node_id == a.id().to_string())
        .expect("A is a neighbor");
    assert!(listed.full, "A's new record lists this node");

    // A copy of the node's own current record (here from A, that got it back the same way) is
    // not an earlier life: nothing changes.
    let own = hood.own().await;
    let own = own.into_verified().expect("the own record verifies");
    hood.send(a.gossip(vec![own])).await;
    let after = hood.status().await;
    assert_eq!(after.version, status.version);
    assert_eq!(
        after.counters.records_stale,
        status.counters.records_stale + 1
    );
    b.nothing_queued();

    // A neighbor whose hello is current gets its own record back as it sent it: stale there.
    let mut c = Neighbor::new(12, 3);
    hood.send(c.connected(1, &[])).await;
    hood.status().await;
    let own = c
        .one_frame()
        .into_iter()
        .find(|r| r.id() == c.id())
        .expect("its record");
    assert_eq!(own.version(), 1);
    hood.stop().await;
}

/// P has been a full neighbor at version 2; Q and R are neighbors too. Returns them drained.
fn with_full_neighbor_p(hood: &mut Neighborhood, me: &Identity) -> (Neighbor, Neighbor, Neighbor) {
    let mut p = Neighbor::new(10, 1);
    let mut q = Neighbor::new(11, 2);
    let mut r = Neighbor::new(12, 3);
    for n in [&p, &q, &r] {
        hood.handle(n.connected(1, &[]));
    }
    hood.flush();
    hood.handle(p.gossip(vec![record(&p.identity, 2, &[me.id()])]));
    hood.flush();
    for n in [&mut p, &mut q, &mut r] {
        n.queued();
    }
    (p, q, r)
}

fn withdraw_reply() -> meshnode_shutdown::DoneReply {
    meshnode_shutdown::channel("neighborhood").0
}

/// A departure is one flood: the withdrawal is forwarded at once (no window) to the neighbors
/// that do not have it, and the own record that drops the departed neighbor is not a second
/// flood: there is no timer; it waits for the next change of another kind, and any number of
/// such drops ride along with it.
#[tokio::test(start_paused = true)]
async fn a_withdrawal_relayed_before_the_neighbors_own_frame_is_forwarded_alone_and_the_own_change_waits()
 {
    let me = identity(1);
    let mut hood = Neighborhood::new(me.clone(), ADDR.into())
        .expect("own record")
        .with_window(Duration::from_millis(10));
    let (mut p, mut q, mut r) = with_full_neighbor_p(&mut hood, &me);
    let mut s = Neighbor::new(13, 4);
    hood.handle(s.connected(1, &[]));
    hood.flush();
    hood.handle(s.gossip(vec![record(&s.identity, 2, &[me.id()])]));
    hood.flush();
    for n in [&mut p, &mut q, &mut r, &mut s] {
        n.queued();
    }
    let version = hood.status().version;
    let withdrawal = record(&p.identity, 3, &[]);
    // Q relays P's withdrawal before P's own frame gets here.
    hood.handle(q.gossip(vec![withdrawal.clone()]));
    assert!(hood.urgent, "a withdrawal does not wait for the window");
    hood.flush();
    for n in [&mut r, &mut s] {
        assert_eq!(
            summary(&n.one_frame()),
            BTreeSet::from([(p.id(), 3)]),
            "the withdrawal alone"
        );
    }
    q.nothing_queued();
    let status = hood.status();
    assert!(
        !hood_lists(&mut hood, p.id()),
        "the half-neighborship is dropped at once"
    );
    assert_eq!(status.version, version + 1);
    // P's own copy, then P's EOF: nothing more.
    hood.handle(p.gossip(vec![withdrawal]));
    hood.flush();
    hood.handle(p.disconnected());
    hood.flush();
    // S withdraws too: its drop waits with P's.
    hood.handle(s.gossip(vec![record(&s.identity, 3, &[])]));
    hood.flush();
    assert_eq!(summary(&r.one_frame()), BTreeSet::from([(s.id(), 3)]));
    assert_eq!(summary(&q.one_frame()), BTreeSet::from([(s.id(), 3)]));
    hood.handle(s.disconnected());
    hood.flush();
    hood.run_due();
    for n in [&mut p, &mut q, &mut r, &mut s] {
        n.nothing_queued();
    }
    // However long nothing else happens, nothing leaves: there is no timer.
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(60)).await;
        hood.run_due();
    }
    for n in [&mut q, &mut r] {
        n.nothing_queued();
    }
    assert_eq!(
        hood.status().version,
        version + 2,
        "one change per departure, stored and signed at once"
    );
    assert!(!hood_lists(&mut hood, s.id()));
    // The next change of another kind (T connects) carries both drops, in one record.
    let t = Neighbor::new(14, 5);
    hood.handle(t.connected(1, &[]));
    hood.flush();
    let now = ids(&[q.id(), r.id(), t.id()]);
    for n in [&mut q, &mut r] {
        let frame = n.one_frame();
        let own = frame
            .iter()
            .find(|x| x.id() == me.id())
            .expect("own record");
        assert_eq!(own.record.neighbors, now);
    }
}

/// A lazy change of the own record goes out with the next change of any other kind.
#[tokio::test(start_paused = true)]
async fn a_settling_own_change_leaves_with_the_next_change() {
    let me = identity(1);
    let mut hood = Neighborhood::new(me.clone(), ADDR.into()).expect("own record");
    let (p, mut q, mut r) = with_full_neighbor_p(&mut hood, &me);
    hood.handle(p.gossip(vec![record(&p.identity, 3, &[])]));
    hood.flush();
    q.queued();
    r.queued();
    // R's stream ends (a crash, say): that change is published at once, and carries P's drop.
    hood.handle(r.disconnected());
    hood.flush();
    let frame = q.one_frame();
    let own = frame
        .iter()
        .find(|x| x.id() == me.id())
        .expect("own record");
    assert_eq!(own.record.neighbors, ids(&[q.id()]));
    tokio::time::advance(Duration::from_secs(3600)).await;
    hood.run_due();
    q.nothing_queued();
}

#[test]
fn the_withdrawal_goes_to_every_stream_the_pool_names_but_not_to_a_departed_neighbor() {
    let me = identity(1);
    let mut hood = Neighborhood::new(me.clone(), ADDR.into()).expect("own record");
    let (mut p, mut q, mut r) = with_full_neighbor_p(&mut hood, &me);
    // P withdrew first.
    hood.handle(p.gossip(vec![record(&p.identity, 3, &[])]));
    hood.flush();
    q.queued();
    r.queued();
    p.nothing_queued();
    // A stream the pool admitted whose announcement has not arrived here yet.
    let mut late = Neighbor::new(13, 4);
    let streams = vec![
        p.stream.clone(),
        q.stream.clone(),
        r.stream.clone(),
        late.stream.clone(),
    ];
    hood.handle(NeighborhoodMsg::WithdrawFromNetwork {
        streams,
        reply: withdraw_reply(),
    });
    hood.handle(late.connected(1, &[]));
    hood.flush();
    for n in [&mut q, &mut r, &mut late] {
        let frame = n.one_frame();
        assert_eq!(frame.len(), 1);
        assert!(frame[0].record.neighbors.is_empty(), "the withdrawal");
    }
    p.nothing_queued();
}

#[test]
fn a_relayed_record_older_than_the_neighbors_handshake_is_no_withdrawal() {
    let me = identity(1);
    let mut hood = Neighborhood::new(me.clone(), ADDR.into()).expect("own record");
    let mut p = Neighbor::new(10, 1);
    let q = Neighbor::new(11, 2);
    hood.handle(q.connected(1, &[]));
    hood.handle(p.connected(1, &[]));
    hood.flush();
    p.queued();
    // P changed its record for another neighbor just before it admitted this node; Q relays
    // that version before P's own gossip (which lists this node) arrives.
    hood.handle(q.gossip(vec![record(&p.identity, 2, &[q.id()])]));
    hood.flush();
    assert!(hood_lists(&mut hood, p.id()), "P is still a neighbor");
    hood.handle(p.gossip(vec![record(&p.identity, 3, &[q.id(), me.id()])]));
    hood.flush();
    assert!(hood_lists(&mut hood, p.id()));
}

fn hood_lists(hood: &mut Neighborhood, peer: NodeId) -> bool {
    let (reply, mut rx) = oneshot::channel();
    hood.handle(NeighborhoodMsg::Status { reply });
    hood.answer_status();
    let status = rx.try_recv().expect("answered");
    status
        .neighbors
        .iter()
        .any(|n| n.node_id == peer.to_string())
}

#[test]
fn a_change_is_not_sent_back_to_any_neighbor_that_sent_a_copy_of_it() {
    let me = identity(1);
    let me_id = me.id();
    let mut hood = Neighborhood::new(me, ADDR.into()).expect("own record");
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    let mut c = Neighbor::new(12, 3);
    let news_id = identity(50).id();
    for n in [&a, &b, &c] {
        hood.handle(n.connected(1, &[me_id, news_id]));
    }
    hood.flush();
    for n in [&mut a, &mut b, &mut c] {
        n.queued();
    }
    let news = record(&identity(50), 1, &[a.id()]);
    hood.handle(a.gossip(vec![news.clone()]));
    hood.handle(b.gossip(vec![news]));
    hood.flush();
    a.nothing_queued();
    b.nothing_queued();
    assert_eq!(
        c.one_frame().len(),
        1,
        "only C, which had not sent it, gets it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_neighbor_flooding_useless_gossip_is_disconnected_but_a_steady_one_is_not() {
    use super::{DEFAULT_GOSSIP_WINDOW, USELESS_GOSSIP_BURST};
    let me = identity(1);
    let mut hood = Neighborhood::new(me.clone(), ADDR.into()).expect("own record");
    let (p, q, r) = with_full_neighbor_p(&mut hood, &me);
    let known = record(&q.identity, 1, &[]);
    let replay = || vec![known.clone()];

    // Q loses every race: each frame it sends is stale here, but it sends no more than a
    // well-behaved neighbor can (one frame per gossip window), for a whole minute.
    for _ in 0..6_000 {
        hood.handle(q.gossip(replay()));
        tokio::time::advance(DEFAULT_GOSSIP_WINDOW).await;
    }
    assert!(
        !q.killed.is_cancelled(),
        "a steady neighbor keeps its stream"
    );

    // P replays the same record as fast as it can: once its burst is spent, it is cut off.
    let burst = USELESS_GOSSIP_BURST as u64;
    for _ in 0..burst {
        hood.handle(p.gossip(replay()));
    }
    assert!(!p.killed.is_cancelled(), "the burst is allowed");
    hood.handle(p.gossip(replay()));
    assert!(p.killed.is_cancelled(), "the flood is cut off");
    assert!(!r.killed.is_cancelled() && !q.killed.is_cancelled());

    let counters = hood.status().counters;
    assert_eq!(counters.frames_useless, 6_000 + burst + 1);
    assert_eq!(counters.peers_disconnected_for_flooding, 1);
}

#[test]
fn a_full_sync_too_big_for_the_queue_sends_each_record_once_across_retries() {
    let me = identity(1);
    let mut hood = Neighborhood::new(me.clone(), ADDR.into()).expect("own record");
    let source = Neighbor::new(2, 1);
    let owners: Vec<Identity> = (10..45).map(identity).collect();
    let mut listed: Vec<NodeId> = owners.iter().map(Identity::id).collect();
    listed.push(me.id());
    hood.handle(source.connected(1, &listed));
    // Records of about 135 KB: one per gossip frame, more than a send queue holds.
    let fan: Vec<NodeId> = (0..2_000u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            NodeId(id)
        })
        .chain([source.id()])
        .collect();
    hood.handle(source.gossip(owners.iter().map(|o| record(o, 1, &fan)).collect()));
    hood.flush();

    let mut late = Neighbor::new(3, 2);
    hood.handle(late.connected(1, &[]));
    let mut received: Vec<NodeId> = Vec::new();
    for _ in 0..10 {
        hood.flush();
        received.extend(late.queued().iter().flatten().map(SignedRecord::id));
    }
    let mut unique = received.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        received.len(),
        "a record was sent twice to the same neighbor"
    );
    for owner in &owners {
        assert!(unique.contains(&owner.id()), "every record arrives");
    }
}

/// Regression: the gossip timer sat behind the inbox in a biased `select!`, so a neighborhood
/// whose inbox never emptied never gossiped. The test holds an inbox deeper than the task can
/// drain in one turn (tokio's cooperative budget makes it yield after 128 receives of up to
/// `MAX_BATCH` messages each) and tops it up at every turn, in paused time: the inbox is never
/// empty when the task looks at it, and the gossip owed to a new neighbor must still leave
/// within a few windows.
#[tokio::test(start_paused = true)]
async fn gossip_that_is_due_leaves_while_the_inbox_never_empties() {
    const DEPTH: usize = 65_536;
    const TURNS: usize = 100;
    let me = identity(1);
    let (tx, rx) = mpsc::channel(DEPTH);
    let cancel = CancellationToken::new();
    let window = Duration::from_millis(10);
    let hood = Neighborhood::new(me.clone(), ADDR.into())
        .expect("a valid first record")
        .with_window(window);
    let task = tokio::spawn(hood.run(rx, cancel.clone()));
    let mut a = Neighbor::new(10, 1);
    let stranger = identity(30);
    let noise = record(&stranger, 1, &[]);
    tx.send(a.connected(1, &[])).await.expect("running");
    let mut body = None;
    let mut turns = 0;
    while body.is_none() && turns < TURNS {
        turns += 1;
        // Copies of the stranger's record: stored once, stale noise after that.
        while tx
            .try_send(NeighborhoodMsg::Gossip {
                from: stranger.id(),
                records: vec![noise.clone()],
            })
            .is_ok()
        {}
        tokio::time::advance(Duration::from_millis(1)).await;
        body = a.queue.try_recv().ok();
        assert!(
            tx.capacity() < DEPTH,
            "the inbox emptied: the test proved nothing"
        );
    }
    let body = body.unwrap_or_else(|| panic!("no gossip left in {TURNS} turns of a full inbox"));
    let Ok(Frame::Gossip { records }) = Frame::decode(&body) else {
        panic!("a gossip frame expected");
    };
    assert!(records.iter().any(|r| r.id() == me.id()));
    cancel.cancel();
    within("the neighborhood stops", task)
        .await
        .expect("no panic");
}

/// Versions follow the wall clock (the greater of previous + 1 and the time in ms), so a
/// record of an earlier life of the key, replayed to a node that restarted, is merely stale:
/// nothing to outbid, and nothing is stored from a peer to get there.
#[test]
fn versions_survive_a_restart_so_a_replayed_earlier_life_is_stale() {
    use super::state::{VersionClock, wall_clock_ms};
    let me = identity(1);
    // An earlier life of the key that ended a second ago, after many changes.
    let earlier = record(
        &me,
        wall_clock_ms().saturating_sub(1_000),
        &[identity(9).id()],
    );
    let before = wall_clock_ms();
    let mut hood =
        Neighborhood::with_clock(me.clone(), ADDR.into(), VersionClock::Wall).expect("own record");
    let first = hood.status().version;
    assert!(first >= before && first > earlier.version());
    let mut p = Neighbor::new(10, 1);
    hood.handle(p.connected(1, &[]));
    hood.flush();
    p.queued();
    let second = hood.status().version;
    assert!(second > first, "every change raises the version");
    hood.handle(p.gossip(vec![earlier]));
    hood.flush();
    let status = hood.status();
    assert_eq!(status.version, second, "a stale earlier life is not outbid");
    assert_eq!(status.counters.records_stale, 1);
    p.nothing_queued();
    // The counter clock is previous + 1, from 1.
    assert_eq!(VersionClock::Counter.next(7), 7);
}

/// A neighbor of many, with an identity of its own beyond the 256 that `identity` gives.
fn many(index: u16) -> Neighbor {
    let mut seed = [0x33; 32];
    seed[..2].copy_from_slice(&index.to_be_bytes());
    Neighbor::with_identity(Identity::from_seed(seed), 1000 + u64::from(index))
}

/// The records of every frame queued for `n` since the last look, undecoded signatures and
/// all (checking thousands of signatures would only slow the test down).
fn frames(n: &mut Neighbor) -> Vec<Vec<SignedRecord>> {
    let mut frames = Vec::new();
    while let Ok(body) = n.queue.try_recv() {
        match Frame::decode(&body).expect("the neighborhood queues valid frames") {
            Frame::Gossip { records } => frames.push(records),
            other => panic!("the neighborhood only sends gossip, got {other:?}"),
        }
    }
    frames
}

/// The one frame queued for `n` since the last look.
fn single(n: &mut Neighbor) -> Vec<SignedRecord> {
    let mut all = frames(n);
    assert_eq!(all.len(), 1, "one frame expected");
    all.remove(0)
}

/// The own record in a frame, if any.
fn own_in(frame: &[SignedRecord], me: NodeId) -> Option<&SignedRecord> {
    frame.iter().find(|r| r.id() == me)
}

/// A node with many neighbors publishes its own record (which lists them all, so each publish
/// costs its size times their number) within a byte budget: a change made while the budget is
/// in debt is held back, the next changes coalesce into it, and it leaves once, when the budget
/// allows. A newcomer still sees itself listed at once, in its full sync, and the other
/// neighbors still get the newcomers' records with the window.
#[tokio::test(start_paused = true)]
async fn a_large_own_record_is_published_within_its_byte_budget_and_changes_coalesce() {
    let me = identity(1);
    let window = Duration::from_millis(2);
    let mut hood = Neighborhood::new(me.clone(), ADDR.into())
        .expect("own record")
        .with_window(window);
    let mut old: Vec<Neighbor> = (0..120).map(many).collect();
    for n in &old {
        hood.handle(n.connected(1, &[]));
    }
    hood.flush();
    for n in &mut old {
        frames(n);
    }

    // The first change after that goes out at once: the budget starts full.
    let mut first = many(120);
    hood.handle(first.connected(1, &[]));
    assert!(!hood.urgent, "a newcomer listing nobody is no withdrawal");
    hood.flush();
    let published = hood.own.clone();
    for n in &mut old {
        let frame = single(n);
        assert_eq!(
            own_in(&frame, me.id()).map(SignedRecord::version),
            Some(published.version())
        );
    }
    frames(&mut first);
    let cost = published.wire().len() * old.len();
    assert!(
        cost > super::OWN_RECORD_BURST,
        "the test needs a publish larger than the burst"
    );
    // It left the budget in debt for this long.
    let debt = (cost - super::OWN_RECORD_BURST) as f64 / super::OWN_RECORD_RATE as f64;
    let debt = Duration::from_secs_f64(debt);
    assert!(debt > 4 * window);

    // Two more newcomers within the debt: each sees itself listed in its full sync; the others
    // get each newcomer's record, but not the changed own record.
    let started = tokio::time::Instant::now();
    let mut newcomers = vec![first];
    for index in [121, 122] {
        tokio::time::advance(window).await;
        let mut newcomer = many(index);
        // A newcomer that lists this node: reachable, so its record is forwarded.
        hood.handle(newcomer.connected(1, &[me.id()]));
        hood.flush();
        let sync = frames(&mut newcomer).concat();
        let own = own_in(&sync, me.id()).expect("the full sync holds the own record");
        assert!(own.record.neighbors.contains(&newcomer.id()));
        for n in old.iter_mut().chain(newcomers.iter_mut()) {
            let frame = single(n);
            assert_eq!(summary(&frame), BTreeSet::from([(newcomer.id(), 1)]));
        }
        newcomers.push(newcomer);
    }
    // Not before the budget allows...
    tokio::time::advance(debt.saturating_sub(started.elapsed()) - Duration::from_millis(1)).await;
    hood.run_due();
    for n in old.iter_mut().chain(newcomers.iter_mut()) {
        assert!(frames(n).is_empty(), "nothing before the budget allows");
    }
    // ...then once, with both changes.
    tokio::time::advance(Duration::from_millis(2)).await;
    hood.run_due();
    let everyone: BTreeSet<NodeId> = old.iter().chain(&newcomers).map(Neighbor::id).collect();
    for n in &mut old {
        let frame = single(n);
        assert_eq!(frame.len(), 1);
        assert_eq!(frame[0].id(), me.id());
        assert_eq!(frame[0].record.neighbors, everyone);
    }
    assert_eq!(hood.own.record().neighbors, everyone);
}
