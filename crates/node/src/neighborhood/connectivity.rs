//! How far the node reaches into the network, judged from its database alone: MASQ's
//! connection stage, and the neighbor counts a service manager shows. The neighborhood
//! publishes it on a `watch` channel after every batch, so that readers (the UI gateway's
//! `connectionChange` broadcast, systemd's status line) never wait on the neighborhood.

use std::collections::{HashMap, VecDeque};

use meshnode_protocol::NodeId;
use meshnode_protocol::ui::ConnectionStage;

use super::NodeDb;

/// Hops over full neighborships from which a node counts as a route (MASQ's `RouteFound`):
/// a route needs a node past the immediate neighbors and theirs.
pub const ROUTE_HOPS: usize = 3;

/// What the neighborhood publishes about the node's place in the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connectivity {
    pub stage: ConnectionStage,
    /// Half-neighborships whose neighbor lists this node back.
    pub full_neighbors: usize,
    /// Half-neighborships (this node lists the neighbor), full ones included.
    pub neighbors: usize,
}

impl Connectivity {
    /// Judges `me`'s place in `db`. A full neighborship is a pair of nodes that list each other;
    /// the stage is `NotConnected` without one, `RouteFound` when some node is [`ROUTE_HOPS`]
    /// or more hops away over full neighborships, and `ConnectedToNeighbor` otherwise.
    pub fn of(db: &NodeDb, me: &NodeId) -> Self {
        let Some(own) = db.get(me) else {
            return Self::default();
        };
        let neighbors = own.record().neighbors.len();
        let full_neighbors = own
            .record()
            .neighbors
            .iter()
            .filter(|n| db.lists(n, me))
            .count();
        let stage = if full_neighbors == 0 {
            ConnectionStage::NotConnected
        } else if farthest_hops(db, me, ROUTE_HOPS) >= ROUTE_HOPS {
            ConnectionStage::RouteFound
        } else {
            ConnectionStage::ConnectedToNeighbor
        };
        Self {
            stage,
            full_neighbors,
            neighbors,
        }
    }
}

/// The most hops from `me` to any node over full neighborships, searched breadth first and
/// no further than `enough` (the search stops as soon as a node that far is found).
fn farthest_hops(db: &NodeDb, me: &NodeId, enough: usize) -> usize {
    let mut hops: HashMap<NodeId, usize> = HashMap::from([(*me, 0)]);
    let mut queue = VecDeque::from([*me]);
    let mut farthest = 0;
    while let Some(at) = queue.pop_front() {
        let here = hops.get(&at).copied().unwrap_or_default();
        let Some(record) = db.get(&at) else { continue };
        for next in &record.record().neighbors {
            if hops.contains_key(next) || !db.lists(next, &at) {
                continue;
            }
            let there = here + 1;
            if there >= enough {
                return there;
            }
            farthest = farthest.max(there);
            hops.insert(*next, there);
            queue.push_back(*next);
        }
    }
    farthest
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use meshnode_protocol::{Identity, NodeRecord};

    use super::*;

    fn ids(n: u8) -> Vec<Identity> {
        (1..=n).map(|i| Identity::from_seed([i; 32])).collect()
    }

    /// A database where each node lists the nodes `links` gives it.
    fn db(nodes: &[Identity], links: &[(usize, &[usize])]) -> NodeDb {
        let mut db = NodeDb::new();
        for (i, node) in nodes.iter().enumerate() {
            let neighbors: BTreeSet<NodeId> = links
                .iter()
                .find(|(from, _)| *from == i)
                .map(|(_, to)| to.iter().map(|&t| nodes[t].id()).collect())
                .unwrap_or_default();
            let record = NodeRecord {
                id: node.id(),
                addr: format!("127.0.0.1:{}", 4000 + i),
                version: 1,
                neighbors,
            };
            db.merge(node.sign_verified(record).expect("a valid record"));
        }
        db
    }

    #[test]
    fn alone_or_listed_by_nobody_is_not_connected() {
        let n = ids(3);
        let me = n[0].id();
        assert_eq!(
            Connectivity::of(&NodeDb::new(), &me),
            Connectivity::default()
        );
        let alone = Connectivity::of(&db(&n[..1], &[]), &me);
        assert_eq!(alone.stage, ConnectionStage::NotConnected);
        // I list 1 and 2, neither lists me back: two half neighbors, no full one.
        let half = Connectivity::of(&db(&n, &[(0, &[1, 2]), (1, &[2]), (2, &[1])]), &me);
        assert_eq!(
            half,
            Connectivity {
                stage: ConnectionStage::NotConnected,
                full_neighbors: 0,
                neighbors: 2,
            }
        );
    }

    #[test]
    fn a_full_neighbor_is_connected_and_two_hops_are_not_yet_a_route() {
        let n = ids(3);
        let me = n[0].id();
        let one = Connectivity::of(&db(&n[..2], &[(0, &[1]), (1, &[0])]), &me);
        assert_eq!(one.stage, ConnectionStage::ConnectedToNeighbor);
        assert_eq!((one.full_neighbors, one.neighbors), (1, 1));
        // 0 - 1 - 2: node 2 is two hops away.
        let two = db(&n, &[(0, &[1]), (1, &[0, 2]), (2, &[1])]);
        assert_eq!(
            Connectivity::of(&two, &me).stage,
            ConnectionStage::ConnectedToNeighbor
        );
    }

    #[test]
    fn a_node_three_hops_away_over_full_neighborships_is_a_route() {
        let n = ids(4);
        let me = n[0].id();
        // 0 - 1 - 2 - 3, all full.
        let chain = db(&n, &[(0, &[1]), (1, &[0, 2]), (2, &[1, 3]), (3, &[2])]);
        assert_eq!(
            Connectivity::of(&chain, &me).stage,
            ConnectionStage::RouteFound
        );
        // The last link half only (2 lists 3, 3 does not list 2): no route.
        let half_link = db(&n, &[(0, &[1]), (1, &[0, 2]), (2, &[1, 3]), (3, &[])]);
        assert_eq!(
            Connectivity::of(&half_link, &me).stage,
            ConnectionStage::ConnectedToNeighbor
        );
        // A shortcut 0 - 3 makes 3 one hop away, 2 two hops: no route either.
        let shortcut = db(
            &n,
            &[(0, &[1, 3]), (1, &[0, 2]), (2, &[1, 3]), (3, &[2, 0])],
        );
        assert_eq!(
            Connectivity::of(&shortcut, &me).stage,
            ConnectionStage::ConnectedToNeighbor
        );
    }
}
