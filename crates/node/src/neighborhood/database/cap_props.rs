//! The database stays under its caps whatever arrives, never evicts what the node reaches over
//! full neighborships, and keeps taking honest records during a flood of records from fresh
//! keys. Unreachable records are dropped once past their grace.
//!
//! `PROPTEST_CASES` sets how many cases run (32 by default).

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;

use meshnode_protocol::{Identity, NodeId, NodeRecord};
use proptest::prelude::*;
use tokio::time::Instant;

use super::*;
use crate::neighborhood::props_support::{cases, identities};

/// Node 0 is "me"; 1 to 3 are my full neighbors; the rest are fresh keys nobody lists.
const HONEST: usize = 4;
const FRESH: usize = 40;
const MAX_RECORDS_HERE: usize = 10;

fn keys() -> &'static [Identity] {
    static KEYS: OnceLock<Vec<Identity>> = OnceLock::new();
    KEYS.get_or_init(|| identities(HONEST + FRESH))
}

fn sign(i: usize, version: u64, neighbors: &[usize]) -> VerifiedRecord {
    let key = &keys()[i];
    key.sign_verified(NodeRecord {
        id: key.id(),
        addr: format!("127.0.0.1:{}", 6000 + i),
        version,
        neighbors: neighbors.iter().map(|&n| keys()[n].id()).collect(),
    })
    .expect("well formed")
}

/// Records signed once: the honest ones at versions 1 and 2 (a change), the fresh ones at 1.
struct Records {
    honest: Vec<[VerifiedRecord; 2]>,
    fresh: Vec<VerifiedRecord>,
}

fn records() -> &'static Records {
    static RECORDS: OnceLock<Records> = OnceLock::new();
    RECORDS.get_or_init(|| Records {
        honest: (0..HONEST)
            .map(|i| {
                // Me lists 1..3; each of them lists me: full neighborships.
                let n: Vec<usize> = if i == 0 { vec![1, 2, 3] } else { vec![0] };
                [sign(i, 1, &n), sign(i, 2, &n)]
            })
            .collect(),
        fresh: (HONEST..HONEST + FRESH).map(|i| sign(i, 1, &[])).collect(),
    })
}

#[derive(Debug, Clone)]
enum Op {
    Fresh(usize),
    HonestChange(usize),
    Prune,
    /// Time passes, in seconds.
    Wait(u64),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            6 => (0..FRESH).prop_map(Op::Fresh),
            2 => (1..HONEST).prop_map(Op::HonestChange),
            1 => Just(Op::Prune),
            1 => (0..90u64).prop_map(Op::Wait),
        ],
        1..120,
    )
}

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn the_database_stays_under_its_caps_and_keeps_the_mesh_it_reaches(
        ops in ops(),
        byte_cap in 1_500usize..4_000,
    ) {
        let recs = records();
        let me = keys()[0].id();
        let mut db = NodeDb::with_caps(MAX_RECORDS_HERE, byte_cap);
        let t0 = Instant::now();
        let mut now = t0;
        for r in &recs.honest {
            prop_assert_eq!(db.merge(r[0].clone()), Merge::Accepted);
        }
        db.prune(&me, now, TOMBSTONE_GRACE);
        let honest: BTreeSet<NodeId> = (0..HONEST).map(|i| keys()[i].id()).collect();
        for op in ops {
            match op {
                Op::Fresh(i) => {
                    // Never refused: an unreachable record can always make room.
                    prop_assert_ne!(db.merge(recs.fresh[i].clone()), Merge::Refused);
                }
                Op::HonestChange(i) => {
                    prop_assert_ne!(db.merge(recs.honest[i][1].clone()), Merge::Refused);
                }
                Op::Prune => {
                    db.prune(&me, now, TOMBSTONE_GRACE);
                }
                Op::Wait(s) => now += Duration::from_secs(s),
            }
            prop_assert!(db.len() <= MAX_RECORDS_HERE, "{} records", db.len());
            prop_assert!(db.bytes() <= byte_cap, "{} bytes over {byte_cap}", db.bytes());
            let sum: usize = db.records().map(record_bytes).sum();
            prop_assert_eq!(sum, db.bytes(), "the byte count is exact");
            // The honest mesh is always there, at its newest version seen.
            for id in &honest {
                prop_assert!(db.get(id).is_some(), "an honest record was evicted");
            }
            prop_assert_eq!(db.reachable_from(&me).len(), HONEST);
        }
        // Past the grace, a prune leaves only what is reachable.
        now += TOMBSTONE_GRACE;
        db.prune(&me, now, TOMBSTONE_GRACE);
        db.prune(&me, now + TOMBSTONE_GRACE, TOMBSTONE_GRACE);
        let left: BTreeSet<NodeId> = db.records().map(VerifiedRecord::id).collect();
        prop_assert_eq!(left, honest);
    }
}

/// A node with no neighbors yet gets a record of a fresh key: it is kept as a tombstone for the
/// grace period (not at once dropped), then dropped.
#[test]
fn an_unreachable_record_is_kept_for_its_grace_then_dropped() {
    let recs = records();
    let me = keys()[0].id();
    let mut db = NodeDb::new();
    db.merge(recs.honest[0][0].clone());
    let t0 = Instant::now();
    db.prune(&me, t0, TOMBSTONE_GRACE);
    assert_eq!(db.merge(recs.fresh[0].clone()), Merge::Accepted);
    assert!(db.prune(&me, t0, TOMBSTONE_GRACE).is_empty());
    assert!(
        db.prune(&me, t0 + TOMBSTONE_GRACE / 2, TOMBSTONE_GRACE)
            .is_empty()
    );
    assert_eq!(
        db.prune(&me, t0 + TOMBSTONE_GRACE, TOMBSTONE_GRACE),
        vec![recs.fresh[0].id()]
    );
    assert_eq!(db.len(), 1);
    assert_eq!(db.dropped(), 1);
}
