//! The neighborhood database: the newest verified record of every node this node has heard of.
//! Owned by the neighborhood task alone.

use std::collections::BTreeMap;

use meshnode_protocol::{NodeId, VerifiedRecord};

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// The record was new or newer and is now stored.
    Accepted,
    /// A record of the same or a higher version is already stored; nothing changed.
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

    /// Stores `record` only if no record of its id with an equal or higher version is stored.
    /// Only verified records get here, so only a record's owner can change it.
    pub fn merge(&mut self, record: VerifiedRecord) -> Merge {
        match self.records.get(&record.id()) {
            Some(stored) if stored.version() >= record.version() => Merge::Stale,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use meshnode_protocol::{Identity, NodeRecord};

    use super::*;

    fn rec(owner: &Identity, version: u64) -> VerifiedRecord {
        owner
            .sign_verified(NodeRecord {
                id: owner.id(),
                addr: "127.0.0.1:1".into(),
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
}
