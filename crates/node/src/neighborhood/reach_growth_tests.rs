//! The reachable set grown from what a batch changed gives what a search from this node gives,
//! as long as links are only added (a change that drops one waits for the prune's full search).

use std::collections::{BTreeSet, HashSet};

use meshnode_protocol::{Identity, NodeId, NodeRecord, VerifiedRecord};

use super::state::Neighborhood;

fn record(owner: &Identity, version: u64, neighbors: &BTreeSet<NodeId>) -> VerifiedRecord {
    owner
        .sign_verified(NodeRecord {
            id: owner.id(),
            addr: "127.0.0.1:4000".into(),
            version,
            neighbors: neighbors.clone(),
        })
        .expect("a well-formed record verifies")
}

/// splitmix64, so that each seed is one fixed order of arrivals.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn a_grown_reachable_set_is_the_searched_one_whatever_the_order_of_arrivals() {
    let me = Identity::from_seed([1; 32]);
    let others: Vec<Identity> = (2..14u8).map(|s| Identity::from_seed([s; 32])).collect();
    for seed in 0..12u64 {
        let mut rng = seed;
        let mut hood = Neighborhood::new(me.clone(), "127.0.0.1:1".into()).expect("valid");
        // This node's neighbors: the first two others.
        for other in &others[..2] {
            hood.change_own(|n| n.insert(other.id()));
        }
        hood.settle_reach();
        // Each other node's record grows one link at a time, in a random order of arrivals,
        // a few records per batch; every link is eventually listed by both of its ends.
        let mut lists: Vec<BTreeSet<NodeId>> = vec![BTreeSet::new(); others.len()];
        let mut pending: Vec<(usize, NodeId)> = Vec::new();
        for (i, other) in others.iter().enumerate() {
            if i < 2 {
                pending.push((i, me.id()));
            }
            for _ in 0..2 {
                let j = (next(&mut rng) % others.len() as u64) as usize;
                if j != i {
                    pending.push((i, others[j].id()));
                    pending.push((j, other.id()));
                }
            }
        }
        let mut version = vec![0u64; others.len()];
        let mut searched_differs = false;
        while !pending.is_empty() {
            let batch = 1 + (next(&mut rng) % 3) as usize;
            for _ in 0..batch.min(pending.len()) {
                let at = (next(&mut rng) % pending.len() as u64) as usize;
                let (i, neighbor) = pending.swap_remove(at);
                if !lists[i].insert(neighbor) {
                    continue;
                }
                version[i] += 1;
                hood.merge(record(&others[i], version[i], &lists[i]), None);
            }
            hood.settle_reach();
            let searched = hood.db.reachable_from(&me.id());
            let grown: HashSet<NodeId> = hood.reach.reachable();
            assert_eq!(grown, searched, "seed {seed}");
            searched_differs |= searched.len() > 1;
        }
        assert!(searched_differs, "the mesh grew beyond this node");
    }
}
