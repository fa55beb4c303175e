//! The neighborhood database: the newest verified record of every node this node has heard of.
//! Owned by the neighborhood task alone.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use meshnode_protocol::{NodeId, VerifiedRecord};

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// The record supersedes the stored one (or none was stored) and is now stored.
    Accepted,
    /// The stored record is this one or supersedes it; nothing changed.
    Stale,
}

#[derive(Debug, Default)]
pub struct NodeDb {
    records: BTreeMap<NodeId, VerifiedRecord>,
}

impl NodeDb {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `record` if it supersedes the stored record of its id (see [`supersedes`]).
    /// The database is a join of everything merged into it: the same records merged in any
    /// order, any number of times, leave the same database. Only verified records get here, so
    /// only a record's owner can change it.
    pub fn merge(&mut self, record: VerifiedRecord) -> Merge {
        match self.records.get(&record.id()) {
            Some(stored) if !supersedes(&record, stored) => Merge::Stale,
            _ => {
                self.records.insert(record.id(), record);
                Merge::Accepted
            }
        }
    }

    pub fn get(&self, id: &NodeId) -> Option<&VerifiedRecord> {
        self.records.get(id)
    }

    pub fn records(&self) -> impl Iterator<Item = &VerifiedRecord> {
        self.records.values()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// True when `a` lists `b` among its neighbors (the half-neighborship a->b).
    pub fn lists(&self, a: &NodeId, b: &NodeId) -> bool {
        self.records
            .get(a)
            .is_some_and(|r| r.record().neighbors.contains(b))
    }
}

/// Whether `new` supersedes `old`, two records of one id: the higher version wins. Two
/// different records an owner signed at one version (an earlier life of its key that started
/// again from version 1) are ordered by their signatures, then by their signed bytes, so that
/// every node keeps the same one whichever it heard of first (the owner, once it hears of the
/// other, outbids both).
pub fn supersedes(new: &VerifiedRecord, old: &VerifiedRecord) -> bool {
    rank(new, old) == Ordering::Greater
}

fn rank(a: &VerifiedRecord, b: &VerifiedRecord) -> Ordering {
    a.version()
        .cmp(&b.version())
        .then_with(|| a.signed().signature.cmp(&b.signed().signature))
        // Only for one signature on two contents, which no forger can make: keeps it total.
        .then_with(|| a.record().signing_bytes().cmp(&b.record().signing_bytes()))
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use meshnode_protocol::{Identity, NodeRecord};

    use super::*;

    fn rec(owner: &Identity, version: u64) -> VerifiedRecord {
        rec_at(owner, version, "127.0.0.1:1")
    }

    fn rec_at(owner: &Identity, version: u64, addr: &str) -> VerifiedRecord {
        owner
            .sign_verified(NodeRecord {
                id: owner.id(),
                addr: addr.into(),
                version,
                neighbors: BTreeSet::new(),
            })
            .expect("own record verifies")
    }

    #[test]
    fn only_a_higher_version_replaces_a_record() {
        let a = Identity::from_seed([1; 32]);
        let mut db = NodeDb::new();
        assert_eq!(db.merge(rec(&a, 2)), Merge::Accepted);
        assert_eq!(db.merge(rec(&a, 2)), Merge::Stale);
        assert_eq!(db.merge(rec(&a, 1)), Merge::Stale);
        assert_eq!(db.get(&a.id()).map(VerifiedRecord::version), Some(2));
        assert_eq!(db.merge(rec(&a, 5)), Merge::Accepted);
        assert_eq!(db.get(&a.id()).map(VerifiedRecord::version), Some(5));
        assert_eq!(db.len(), 1);
    }

    /// Regression: at one version the first record heard of used to win, so two nodes that
    /// heard of an owner's two lives in opposite orders kept different records.
    #[test]
    fn two_records_at_one_version_leave_the_same_record_in_either_order() {
        let a = Identity::from_seed([1; 32]);
        let (x, y) = (rec_at(&a, 3, "10.0.0.1:1"), rec_at(&a, 3, "10.0.0.2:1"));
        let (winner, loser) = if supersedes(&x, &y) {
            (x.clone(), y.clone())
        } else {
            (y.clone(), x.clone())
        };
        assert!(!supersedes(&loser, &winner));
        assert!(!supersedes(&winner, &winner), "a copy never supersedes");

        let mut first = NodeDb::new();
        assert_eq!(first.merge(loser.clone()), Merge::Accepted);
        assert_eq!(
            first.merge(winner.clone()),
            Merge::Accepted,
            "a tie-break replaces"
        );
        assert_eq!(first.merge(loser.clone()), Merge::Stale);
        let mut second = NodeDb::new();
        assert_eq!(second.merge(winner.clone()), Merge::Accepted);
        assert_eq!(second.merge(loser), Merge::Stale);
        assert_eq!(first.get(&a.id()), Some(&winner));
        assert_eq!(second.get(&a.id()), Some(&winner));
    }
}
