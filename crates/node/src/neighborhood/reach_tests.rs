//! Forward only what can matter: a record whose node is not reachable over full neighborships
//! is stored but held, forwarded once it becomes reachable, and never circulates
//! (docs/protocol.md, "Only what can matter is forwarded"). Each test drives the neighborhood's
//! state through its messages and flushes, as the loop does after each batch, in paused time.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use meshnode_protocol::{Frame, Identity, NodeId, NodeRecord, SignedRecord, VerifiedRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::NeighborhoodMsg;
use super::database::{MAX_BYTES, NodeDb};
use super::props_support::identity;
use super::state::Neighborhood;
use crate::link::{ConnId, StreamHandle};

const WINDOW: Duration = Duration::from_millis(10);

fn record(owner: &Identity, version: u64, neighbors: &[NodeId]) -> VerifiedRecord {
    owner
        .sign_verified(NodeRecord {
            id: owner.id(),
            addr: "127.0.0.1:5000".into(),
            version,
            neighbors: neighbors.iter().copied().collect(),
        })
        .expect("a well-formed record verifies")
}

/// An immediate neighbor: its stream, and the queue its writer would drain.
struct Neighbor {
    identity: Identity,
    stream: StreamHandle,
    queue: mpsc::Receiver<Bytes>,
}

impl Neighbor {
    fn new(seed: u8, conn: u64) -> Self {
        let identity = identity(seed);
        let (stream, queue) =
            StreamHandle::new(ConnId(conn), identity.id(), CancellationToken::new());
        Self {
            identity,
            stream,
            queue,
        }
    }

    fn id(&self) -> NodeId {
        self.identity.id()
    }

    fn connected(&self, neighbors: &[NodeId]) -> NeighborhoodMsg {
        NeighborhoodMsg::NeighborConnected {
            stream: self.stream.clone(),
            record: record(&self.identity, 1, neighbors),
        }
    }

    fn gossip(&self, records: Vec<VerifiedRecord>) -> NeighborhoodMsg {
        NeighborhoodMsg::Gossip {
            from: self.id(),
            records,
        }
    }

    /// The ids and versions of every record queued for this neighbor since the last look.
    fn received(&mut self) -> BTreeSet<(NodeId, u64)> {
        let mut records: Vec<SignedRecord> = Vec::new();
        while let Ok(body) = self.queue.try_recv() {
            match Frame::decode(&body).expect("the neighborhood queues valid frames") {
                Frame::Gossip { records: more } => records.extend(more),
                other => panic!("the neighborhood only sends gossip, got {other:?}"),
            }
        }
        records.iter().map(|r| (r.id(), r.version())).collect()
    }
}

/// A node (seed 1) with the full neighbors A (seed 10) and B (seed 11), its gossip drained.
/// A lists `a_also` besides this node.
fn node_with_a_and_b(a_also: &[NodeId]) -> (Neighborhood, Neighbor, Neighbor) {
    let me = identity(1).id();
    let mut hood = Neighborhood::new(identity(1), "127.0.0.1:4000".into())
        .expect("own record")
        .with_window(WINDOW);
    let mut a = Neighbor::new(10, 1);
    let mut b = Neighbor::new(11, 2);
    let mut a_lists = a_also.to_vec();
    a_lists.push(me);
    hood.handle(a.connected(&a_lists));
    hood.handle(b.connected(&[me]));
    hood.flush();
    a.received();
    b.received();
    (hood, a, b)
}

/// What the loop does after a batch: gossip that is due leaves once the window has passed.
async fn after_window(hood: &mut Neighborhood) {
    hood.settle_reach();
    if hood.owes_gossip() {
        hood.flush_at = Some(tokio::time::Instant::now() + WINDOW);
    }
    tokio::time::advance(WINDOW).await;
    hood.run_due();
}

#[tokio::test(start_paused = true)]
async fn a_record_of_a_key_nobody_lists_is_stored_but_not_forwarded() {
    let (mut hood, mut a, mut b) = node_with_a_and_b(&[]);
    // A fresh key listing nobody, one listing A (which does not list it back), and one
    // listing a node that is not here at all.
    let fresh: Vec<Identity> = (20..23).map(identity).collect();
    hood.handle(a.gossip(vec![
        record(&fresh[0], 1, &[]),
        record(&fresh[1], 1, &[a.id()]),
        record(&fresh[2], 1, &[identity(99).id()]),
    ]));
    after_window(&mut hood).await;
    for f in &fresh {
        assert!(hood.db.get(&f.id()).is_some(), "stored");
    }
    assert_eq!(hood.reach.held(), 3);
    assert_eq!(b.received(), BTreeSet::new(), "B is sent none of them");
    assert_eq!(a.received(), BTreeSet::new());
    // However long nothing else happens, they stay here.
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(1)).await;
        hood.run_due();
    }
    assert_eq!(b.received(), BTreeSet::new());
    // A newcomer's whole-database exchange leaves them out too.
    let me = identity(1).id();
    let mut c = Neighbor::new(12, 3);
    hood.handle(c.connected(&[me]));
    hood.flush();
    let sync = c.received();
    let ids: BTreeSet<NodeId> = sync.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, BTreeSet::from([me, a.id(), b.id(), c.id()]));
}

#[tokio::test(start_paused = true)]
async fn a_held_record_is_forwarded_once_a_record_listing_it_and_listed_by_it_arrives() {
    let (mut hood, mut a, mut b) = node_with_a_and_b(&[]);
    let me = identity(1).id();
    let newcomer = identity(20);
    // The join: the newcomer's record (listing A) arrives before A's record listing it back.
    let joined = record(&newcomer, 1, &[a.id()]);
    hood.handle(a.gossip(vec![joined]));
    after_window(&mut hood).await;
    assert_eq!(
        b.received(),
        BTreeSet::new(),
        "held: A does not list it yet"
    );
    // A's record listing it back: both leave in the same round.
    hood.handle(a.gossip(vec![record(&a.identity, 2, &[me, newcomer.id()])]));
    after_window(&mut hood).await;
    assert_eq!(
        b.received(),
        BTreeSet::from([(a.id(), 2), (newcomer.id(), 1)])
    );
    assert_eq!(a.received(), BTreeSet::new(), "A sent both itself");
    assert_eq!(hood.reach.held(), 0);
    // Once reachable, its changes go out as they come, its withdrawal at once.
    hood.handle(a.gossip(vec![record(&newcomer, 2, &[])]));
    assert!(
        hood.urgent,
        "the withdrawal of a reachable node is forwarded at once"
    );
    hood.flush();
    assert_eq!(b.received(), BTreeSet::from([(newcomer.id(), 2)]));

    // The other order: the listing record first, then the newcomer's own.
    let second = identity(21);
    hood.handle(a.gossip(vec![record(&a.identity, 3, &[me, second.id()])]));
    after_window(&mut hood).await;
    assert_eq!(b.received(), BTreeSet::from([(a.id(), 3)]));
    hood.handle(a.gossip(vec![record(&second, 1, &[a.id()])]));
    after_window(&mut hood).await;
    assert_eq!(b.received(), BTreeSet::from([(second.id(), 1)]));
}

/// The risk seen once in the flood benchmark: a record evicted at the cap before a neighbor's
/// copy of it arrives was new again, was forwarded again, and the flood fed itself. A record of
/// a key nobody lists is held, evicted or not, so however often it comes back it goes nowhere.
#[tokio::test(start_paused = true)]
async fn a_record_evicted_and_received_again_does_not_circulate() {
    let (mut hood, mut a, mut b) = node_with_a_and_b(&[]);
    // A small database: this node, A, B, and room for four more.
    let mut db = NodeDb::with_caps(7, MAX_BYTES);
    for stored in hood.db.records() {
        db.merge(stored.clone());
    }
    hood.db = db;
    hood.prune(tokio::time::Instant::now());
    let sent = hood.counters.frames_sent;

    let fresh: Vec<VerifiedRecord> = (20..30).map(|s| record(&identity(s), 1, &[])).collect();
    for round in 0..3 {
        for (i, f) in fresh.iter().enumerate() {
            let from = if (i + round) % 2 == 0 { &a } else { &b };
            hood.handle(from.gossip(vec![f.clone()]));
            after_window(&mut hood).await;
        }
    }
    let counters = hood.counters;
    assert!(hood.db.len() <= 7, "the cap holds");
    assert!(
        counters.records_accepted >= 3 * 10,
        "every copy came back evicted and was stored again"
    );
    assert_eq!(counters.frames_sent, sent, "and none was forwarded");
    assert_eq!(a.received(), BTreeSet::new());
    assert_eq!(b.received(), BTreeSet::new());
    // The mesh the node is in was never evicted.
    for id in [identity(1).id(), a.id(), b.id()] {
        assert!(hood.db.get(&id).is_some());
    }
}

/// A newcomer's whole-database exchange holds every reachable record and the withdrawal of a
/// departed node that a reachable record still lists (a former neighbor publishes its drop
/// lazily): without it, a replay of the departed node's earlier record would make the link look
/// full at the newcomer.
#[tokio::test(start_paused = true)]
async fn the_whole_database_sent_to_a_newcomer_holds_the_withdrawal_a_reachable_record_lists() {
    let d = identity(30);
    let (mut hood, a, mut b) = node_with_a_and_b(&[d.id()]);
    let me = identity(1).id();
    hood.handle(a.gossip(vec![record(&d, 1, &[a.id()])]));
    after_window(&mut hood).await;
    assert_eq!(b.received(), BTreeSet::from([(d.id(), 1)]));
    // D withdraws; A has not published its drop yet.
    hood.handle(a.gossip(vec![record(&d, 2, &[])]));
    hood.flush();
    assert_eq!(b.received(), BTreeSet::from([(d.id(), 2)]));
    tokio::time::advance(Duration::from_secs(2)).await;
    hood.run_due();
    let mut c = Neighbor::new(12, 3);
    hood.handle(c.connected(&[me]));
    hood.flush();
    let sync = c.received();
    assert!(sync.contains(&(d.id(), 2)), "the withdrawal: {sync:?}");
    assert!(sync.contains(&(a.id(), 1)) && sync.contains(&(b.id(), 1)));
}

/// The search for what is reachable runs once per batch that can make more nodes reachable (a
/// join: held records must leave with that batch), and not for a change that can only make
/// fewer reachable (a withdrawal, at every node of the mesh at once): that one waits for the
/// next prune, and the withdrawn node's news is forwarded all the same.
#[tokio::test(start_paused = true)]
async fn a_withdrawal_puts_the_search_off_until_the_prune_and_a_join_does_not() {
    let x = identity(30);
    let (mut hood, a, mut b) = node_with_a_and_b(&[x.id()]);
    hood.handle(a.gossip(vec![record(&x, 1, &[a.id()])]));
    let before = hood.reach.searches;
    after_window(&mut hood).await;
    assert_eq!(
        hood.reach.searches,
        before + 1,
        "the join: searched at once"
    );
    assert_eq!(b.received(), BTreeSet::from([(x.id(), 1)]));

    // X withdraws: forwarded at once, no search.
    let searches = hood.reach.searches;
    hood.handle(a.gossip(vec![record(&x, 2, &[])]));
    hood.flush();
    assert_eq!(b.received(), BTreeSet::from([(x.id(), 2)]));
    assert_eq!(hood.reach.searches, searches, "no search for a withdrawal");
    assert!(hood.reach.was_reachable(&x.id()), "until the prune");
    // The next prune runs it.
    tokio::time::advance(Duration::from_secs(1)).await;
    hood.run_due();
    assert_eq!(hood.reach.searches, searches + 1);
    assert!(!hood.reach.was_reachable(&x.id()));
    // And nothing that comes of X now is forwarded: it is cut off.
    hood.handle(a.gossip(vec![record(&x, 3, &[])]));
    after_window(&mut hood).await;
    assert_eq!(b.received(), BTreeSet::new());
}

/// Copies and older versions of a reachable node's record (those that took a longer path, by
/// the thousand while a large mesh converges) are not stored, so they change nothing: no
/// search at the batch's end, none put off to the prune.
#[tokio::test(start_paused = true)]
async fn a_copy_or_an_older_version_of_a_reachable_record_costs_no_search() {
    let x = identity(30);
    let (mut hood, a, b) = node_with_a_and_b(&[x.id()]);
    hood.handle(a.gossip(vec![record(&x, 2, &[a.id()])]));
    after_window(&mut hood).await;
    assert!(hood.reach.was_reachable(&x.id()));
    let searches = hood.reach.searches;

    // The same version again, and an older one that listed fewer neighbors (a subset: as a
    // stored change, it could only shrink what is reachable).
    hood.handle(b.gossip(vec![record(&x, 2, &[a.id()]), record(&x, 1, &[])]));
    after_window(&mut hood).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    hood.run_due();
    assert_eq!(hood.reach.searches, searches, "nothing to search for");
    assert!(hood.reach.was_reachable(&x.id()));
}
