//! Properties of a departure: whatever order, and however often, the messages a graceful
//! departure causes reach a node (the departed node's withdrawal over its own stream, copies
//! relayed by the other neighbors, their own records published later, the departed stream's
//! end), every node ends with the same view of the records involved, and none keeps a full
//! neighborship with the departed node.
//!
//! `PROPTEST_CASES` sets how many cases run (12 by default: each case drives three nodes, whose every change
//! is a signature, slow in an unoptimized build).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bytes::Bytes;
use meshnode_protocol::{NodeId, NodeRecord, VerifiedRecord};
use proptest::prelude::*;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::NeighborhoodMsg;
use super::props_support::cases;
use super::props_support::identity;
use super::state::Neighborhood;
use crate::link::{ConnId, StreamHandle};

/// The observers (nodes that see the departure), then P (departs), Q and R (stay).
const OBSERVERS: u8 = 3;
const P: u8 = 10;
const Q: u8 = 11;
const R: u8 = 12;

fn sign(owner: u8, version: u64, neighbors: &[NodeId]) -> VerifiedRecord {
    identity(owner)
        .sign_verified(NodeRecord {
            id: identity(owner).id(),
            addr: format!("127.0.0.1:{}", 5000 + u16::from(owner)),
            version,
            neighbors: neighbors.iter().copied().collect(),
        })
        .expect("a well-formed record verifies")
}

/// The records, signed once (signing is slow in an unoptimized build).
struct Records {
    /// P, Q and R as they connect: version 1, nobody listed.
    first: Vec<VerifiedRecord>,
    /// P, Q and R before the departure: each lists every observer and the other two.
    before: Vec<VerifiedRecord>,
    /// P's withdrawal: version 3, nobody listed.
    withdrawal: VerifiedRecord,
    /// Q's and R's records after they dropped P.
    after: Vec<VerifiedRecord>,
}

fn records() -> &'static Records {
    static RECORDS: OnceLock<Records> = OnceLock::new();
    RECORDS.get_or_init(|| {
        let observers: Vec<NodeId> = (1..=OBSERVERS).map(|i| identity(i).id()).collect();
        let with = |others: &[u8]| {
            let mut ids = observers.clone();
            ids.extend(others.iter().map(|&o| identity(o).id()));
            ids
        };
        Records {
            first: vec![sign(P, 1, &[]), sign(Q, 1, &[]), sign(R, 1, &[])],
            before: vec![
                sign(P, 2, &with(&[Q, R])),
                sign(Q, 2, &with(&[P, R])),
                sign(R, 2, &with(&[P, Q])),
            ],
            withdrawal: sign(P, 3, &[]),
            after: vec![sign(Q, 3, &with(&[R])), sign(R, 3, &with(&[Q]))],
        }
    })
}

/// One message a departure causes, as a node receives it.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// P's withdrawal over P's own stream.
    OwnWithdrawal,
    /// P's withdrawal relayed by Q (false) or R (true).
    Relayed(bool),
    /// Q's (false) or R's (true) record without P, from its owner.
    Republished(bool),
    /// P's stream ends.
    Eof,
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    let one = prop_oneof![
        Just(Event::OwnWithdrawal),
        any::<bool>().prop_map(Event::Relayed),
        any::<bool>().prop_map(Event::Republished),
        Just(Event::Eof),
    ];
    // Every event at least once, then any repetitions, in any order.
    proptest::collection::vec(one, 0..8).prop_flat_map(|mut extra| {
        extra.extend([
            Event::OwnWithdrawal,
            Event::Relayed(false),
            Event::Relayed(true),
            Event::Republished(false),
            Event::Republished(true),
            Event::Eof,
        ]);
        Just(extra).prop_shuffle()
    })
}

/// The stored records of P, Q and R (version, signature), the own neighbors, and whether a full
/// neighborship with P is stored.
type View = (Vec<(u64, [u8; 64])>, Vec<NodeId>, bool);

struct Node {
    hood: Neighborhood,
    streams: BTreeMap<u8, (StreamHandle, mpsc::Receiver<Bytes>)>,
}

impl Node {
    /// An observer with P, Q and R as full neighbors, its gossip drained.
    fn new(seed: u8) -> Self {
        let mut hood =
            Neighborhood::new(identity(seed), "127.0.0.1:4000".into()).expect("own record");
        let mut streams = BTreeMap::new();
        let records = records();
        for (conn, owner) in [P, Q, R].into_iter().enumerate() {
            let (stream, queue) = StreamHandle::new(
                ConnId(conn as u64 + 1),
                identity(owner).id(),
                CancellationToken::new(),
            );
            hood.handle(NeighborhoodMsg::NeighborConnected {
                stream: stream.clone(),
                record: records.first[conn].clone(),
            });
            hood.flush();
            hood.handle(NeighborhoodMsg::Gossip {
                from: identity(owner).id(),
                records: vec![records.before[conn].clone()],
            });
            hood.flush();
            streams.insert(owner, (stream, queue));
        }
        let mut node = Self { hood, streams };
        node.drain();
        node
    }

    fn drain(&mut self) {
        for (_, queue) in self.streams.values_mut() {
            while queue.try_recv().is_ok() {}
        }
    }

    fn gossip(&mut self, from: u8, record: &VerifiedRecord) {
        self.hood.handle(NeighborhoodMsg::Gossip {
            from: identity(from).id(),
            records: vec![record.clone()],
        });
    }

    /// Applies `events`; P's frames after its stream ended cannot arrive and are skipped.
    fn apply(&mut self, events: &[Event]) {
        let mut ended = false;
        for event in events {
            match *event {
                Event::OwnWithdrawal if !ended => self.gossip(P, &records().withdrawal),
                Event::OwnWithdrawal => {}
                Event::Relayed(r) => self.gossip(if r { R } else { Q }, &records().withdrawal),
                Event::Republished(r) => {
                    let (from, record) = if r {
                        (R, &records().after[1])
                    } else {
                        (Q, &records().after[0])
                    };
                    self.gossip(from, record);
                }
                Event::Eof => {
                    ended = true;
                    let conn = self.streams[&P].0.id();
                    self.hood.handle(NeighborhoodMsg::NeighborDisconnected {
                        conn,
                        peer: identity(P).id(),
                    });
                }
            }
            self.hood.flush();
        }
    }

    /// The stored records of P, Q and R (version and signature), the own record's neighbors,
    /// and whether any stored record pair makes a full neighborship with P.
    fn view(&mut self) -> View {
        let (reply, mut rx) = oneshot::channel();
        self.hood.handle(NeighborhoodMsg::Status { reply });
        self.hood.answer_status();
        let status = rx.try_recv().expect("answered");
        let own: Vec<NodeId> = status
            .neighbors
            .iter()
            .map(|n| n.node_id.parse().expect("hex"))
            .collect();
        let records = [P, Q, R]
            .iter()
            .map(|&o| {
                let r = self.hood.db.get(&identity(o).id()).expect("stored");
                (r.version(), r.signed().signature)
            })
            .collect();
        let p = identity(P).id();
        let full_with_p = self
            .hood
            .db
            .records()
            .any(|r| self.hood.db.lists(&p, &r.id()) && self.hood.db.lists(&r.id(), &p));
        (records, own, full_with_p)
    }
}

proptest! {
    #![proptest_config(cases(12))]

    #[test]
    fn any_order_and_repetition_of_a_departure_leaves_every_node_the_same_view(
        orders in proptest::collection::vec(events(), OBSERVERS as usize),
    ) {
        let mut views = Vec::new();
        for (i, order) in orders.iter().enumerate() {
            let mut node = Node::new(i as u8 + 1);
            node.apply(order);
            let (records, own, full_with_p) = node.view();
            prop_assert!(!full_with_p, "a full neighborship with the departed node survived");
            prop_assert!(!own.contains(&identity(P).id()), "the node still lists P");
            prop_assert_eq!(own, vec![identity(Q).id(), identity(R).id()]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>());
            views.push(records);
        }
        for view in &views[1..] {
            prop_assert_eq!(view, &views[0]);
        }
        prop_assert_eq!(views[0][0].0, 3, "P's withdrawal is stored");
    }
}
