//! The neighborhood database: the newest verified record of every node this node has heard of,
//! bounded. Owned by the neighborhood task alone.
//!
//! Bounds. The database keeps every record it can reach from the node's own over full
//! neighborships (both records list each other). A record it cannot reach (a withdrawn node, a
//! key nobody lists back) is kept as a tombstone for a grace period, then dropped by
//! [`NodeDb::prune`]; the grace starts only once no reachable record lists it. On top of that there is a hard cap on records and on bytes: a new record
//! that would pass it first evicts records that were not reachable at the last prune (or came
//! since), oldest stored first; records reachable at the last prune (and the node's own) are
//! never evicted: if nothing else is left, the new record is refused. So a flood of records
//! from fresh keys can only displace other unreachable records, never the mesh the node is in.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use meshnode_protocol::{NodeId, VerifiedRecord};
use tokio::time::Instant;

/// Most records the database holds.
pub const MAX_RECORDS: usize = 20_000;
/// Most bytes of records the database holds (as [`record_bytes`] counts them).
pub const MAX_BYTES: usize = 64 * 1024 * 1024;
/// How long an unreachable record is kept after it was first seen unreachable.
pub const TOMBSTONE_GRACE: Duration = Duration::from_secs(60);

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// The record supersedes the stored one (or none was stored) and is now stored.
    Accepted,
    /// The stored record is this one or supersedes it; nothing changed.
    Stale,
    /// A record of a new id, at the cap with nothing left to evict: not stored.
    Refused,
}

/// The bytes a record is counted for: what it holds, its wire bytes (112 + addr + 32 per
/// neighbor) and its decoded addr and neighbor ids beside them, so 112 + 2 addr + 64 per
/// neighbor. (Allocator and tree overhead are not counted.)
pub fn record_bytes(record: &VerifiedRecord) -> usize {
    let decoded = record.record().addr.len() + 32 * record.record().neighbors.len();
    record.wire().len() + decoded
}

#[derive(Debug)]
pub struct NodeDb {
    records: BTreeMap<NodeId, VerifiedRecord>,
    /// The sum of [`record_bytes`] over the records.
    bytes: usize,
    max_records: usize,
    max_bytes: usize,
    /// Records that may be evicted (not reachable at the last prune, or stored since), by the
    /// order they were stored in: the oldest goes first.
    evictable: BTreeMap<u64, NodeId>,
    /// Each evictable record's key in `evictable`.
    evictable_seq: HashMap<NodeId, u64>,
    next_seq: u64,
    /// When each record was first seen unreachable by a prune (tombstones).
    unreachable_since: HashMap<NodeId, Instant>,
    /// Records dropped (evicted at the cap or past the grace) since start.
    dropped: u64,
    /// Set when the records changed since the last prune: only then is reachability worked
    /// out again (a prune of an unchanged database only drops what its grace ends for).
    changed: bool,
    /// What the last prune was for (the own id, the grace), and when the first tombstone not
    /// listed by a reachable record ends its grace.
    last_prune: Option<(NodeId, Duration)>,
    next_expiry: Option<Instant>,
    /// The tombstones a reachable record listed at the last full prune: their grace starts
    /// again at every prune, the quick ones included.
    listed_tombstones: Vec<NodeId>,
}

impl Default for NodeDb {
    fn default() -> Self {
        Self::with_caps(MAX_RECORDS, MAX_BYTES)
    }
}

impl NodeDb {
    pub fn new() -> Self {
        Self::default()
    }

    /// A database that holds at most `max_records` records and `max_bytes` bytes of them.
    pub fn with_caps(max_records: usize, max_bytes: usize) -> Self {
        Self {
            records: BTreeMap::new(),
            bytes: 0,
            max_records: max_records.max(1),
            max_bytes,
            evictable: BTreeMap::new(),
            evictable_seq: HashMap::new(),
            next_seq: 0,
            unreachable_since: HashMap::new(),
            dropped: 0,
            changed: true,
            last_prune: None,
            next_expiry: None,
            listed_tombstones: Vec::new(),
        }
    }

    /// Stores `record` if it supersedes the stored record of its id (see [`supersedes`]).
    /// Under the caps the database is a join of everything merged into it: the same records
    /// merged in any order, any number of times, leave the same database. Only verified
    /// records get here, so only a record's owner can change it. At a cap, records that are
    /// not known reachable are evicted first, oldest first; a new record that would need a
    /// reachable one evicted is refused.
    pub fn merge(&mut self, record: VerifiedRecord) -> Merge {
        let id = record.id();
        let size = record_bytes(&record);
        let old_size = match self.records.get(&id) {
            Some(stored) if !supersedes(&record, stored) => return Merge::Stale,
            Some(stored) => Some(record_bytes(stored)),
            None => None,
        };
        let new_len = self.records.len() + usize::from(old_size.is_none());
        let mut new_bytes = self.bytes - old_size.unwrap_or(0) + size;
        let mut evict = Vec::new();
        let mut candidates = self.evictable.values().filter(|e| **e != id);
        let mut len = new_len;
        while len > self.max_records || new_bytes > self.max_bytes {
            let Some(victim) = candidates.next() else {
                return Merge::Refused;
            };
            if let Some(r) = self.records.get(victim) {
                new_bytes -= record_bytes(r);
            }
            len -= 1;
            evict.push(*victim);
        }
        for victim in evict {
            self.remove(&victim);
        }
        self.changed = true;
        if let Some(old) = self.records.insert(id, record) {
            self.bytes -= record_bytes(&old);
        }
        self.bytes += size;
        // A changed record that was evictable is news again: it goes to the back of the order.
        // A record reachable at the last prune stays protected across its changes.
        let was_evictable = match self.evictable_seq.remove(&id) {
            Some(seq) => self.evictable.remove(&seq).is_some(),
            None => false,
        };
        if old_size.is_none() || was_evictable {
            self.mark_evictable(id);
        }
        Merge::Accepted
    }

    fn mark_evictable(&mut self, id: NodeId) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.evictable.insert(seq, id);
        self.evictable_seq.insert(id, seq);
    }

    fn remove(&mut self, id: &NodeId) -> bool {
        let Some(old) = self.records.remove(id) else {
            return false;
        };
        self.changed = true;
        self.bytes -= record_bytes(&old);
        if let Some(seq) = self.evictable_seq.remove(id) {
            self.evictable.remove(&seq);
        }
        self.unreachable_since.remove(id);
        self.dropped += 1;
        true
    }

    /// Finds what `me` reaches over full neighborships; marks the rest unreachable from `now`
    /// (if not already), drops those unreachable for longer than `grace`, and makes the rest
    /// evictable at the cap. Returns the ids dropped.
    ///
    /// An unreachable record that a reachable record still lists (a withdrawal, listed by a
    /// former neighbor that has not published its drop yet) starts its grace again at every
    /// prune: it is kept, so that a replayed earlier record of that node, which would list the
    /// neighbor back, stays stale. It is still evictable at the cap.
    pub fn prune(&mut self, me: &NodeId, now: Instant, grace: Duration) -> Vec<NodeId> {
        self.prune_reaching(me, None, now, grace)
    }

    /// [`Self::prune`] given what `me` reaches, if the caller keeps it (it must be exactly
    /// [`Self::reachable_from`]`(me)`): the neighborhood does, so a prune does not search the
    /// whole mesh again.
    pub fn prune_reaching(
        &mut self,
        me: &NodeId,
        reachable: Option<&HashSet<NodeId>>,
        now: Instant,
        grace: Duration,
    ) -> Vec<NodeId> {
        // Nothing changed since the last prune (and it was for the same node and grace): the
        // same records are reachable and listed, so only a grace that ended can drop anything.
        // With a thousand records this saves a walk of the whole mesh every second.
        if !self.changed
            && self.last_prune == Some((*me, grace))
            && self.next_expiry.is_none_or(|at| at > now)
        {
            for id in &self.listed_tombstones {
                self.unreachable_since.insert(*id, now);
            }
            return Vec::new();
        }
        self.changed = false;
        self.last_prune = Some((*me, grace));
        self.next_expiry = None;
        self.listed_tombstones.clear();
        let searched;
        let reachable = match reachable {
            Some(reachable) => reachable,
            None => {
                searched = self.reachable_from(me);
                &searched
            }
        };
        // Every reachable node but `me` is stored (a search reaches a node only through its
        // record). When every stored record is reachable, which is the usual case, there is
        // nothing to drop or to keep as a tombstone, and no need to look at every record.
        let stored_reachable = reachable.len() - usize::from(!self.records.contains_key(me));
        let unreachable: Vec<NodeId> = if stored_reachable == self.records.len() {
            Vec::new()
        } else {
            self.records
                .keys()
                .filter(|id| !reachable.contains(*id))
                .copied()
                .collect()
        };
        // Records that were evictable and are reachable now are protected from here on.
        let protected: Vec<NodeId> = self
            .evictable_seq
            .keys()
            .filter(|id| reachable.contains(*id))
            .copied()
            .collect();
        for id in protected {
            if let Some(seq) = self.evictable_seq.remove(&id) {
                self.evictable.remove(&seq);
            }
        }
        if unreachable.is_empty() {
            self.unreachable_since.clear();
            return Vec::new();
        }
        let unreachable_set: HashSet<NodeId> = unreachable.iter().copied().collect();
        self.unreachable_since
            .retain(|id, _| unreachable_set.contains(id));
        // The tombstones a reachable record lists; the search stops once it found them all.
        let mut listed: HashSet<NodeId> = HashSet::new();
        'search: for record in reachable.iter().filter_map(|id| self.records.get(id)) {
            for n in &record.record().neighbors {
                if unreachable_set.contains(n)
                    && listed.insert(*n)
                    && listed.len() == unreachable.len()
                {
                    break 'search;
                }
            }
        }
        let mut dropped = Vec::new();
        for id in unreachable {
            let since = if listed.contains(&id) {
                self.unreachable_since.insert(id, now);
                self.listed_tombstones.push(id);
                now
            } else {
                *self.unreachable_since.entry(id).or_insert(now)
            };
            if now.duration_since(since) >= grace {
                self.remove(&id);
                dropped.push(id);
                continue;
            }
            if !listed.contains(&id) {
                let ends = since + grace;
                self.next_expiry = Some(self.next_expiry.map_or(ends, |at| at.min(ends)));
            }
            if !self.evictable_seq.contains_key(&id) {
                self.mark_evictable(id);
            }
        }
        dropped
    }

    /// The ids reachable from `me` over full neighborships, `me` included.
    pub fn reachable_from(&self, me: &NodeId) -> HashSet<NodeId> {
        let mut seen = HashSet::from([*me]);
        let mut frontier = VecDeque::from([*me]);
        while let Some(x) = frontier.pop_front() {
            let Some(record) = self.records.get(&x) else {
                continue;
            };
            for y in &record.record().neighbors {
                if !seen.contains(y) && self.lists(y, &x) {
                    seen.insert(*y);
                    frontier.push_back(*y);
                }
            }
        }
        seen
    }

    /// Bytes of the stored records, as [`record_bytes`] counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records dropped since start: evicted at a cap or past their grace.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn get(&self, id: &NodeId) -> Option<&VerifiedRecord> {
        self.records.get(id)
    }

    /// The stored records from id `start` up, in id order.
    pub fn records_from(&self, start: &NodeId) -> impl Iterator<Item = &VerifiedRecord> {
        self.records.range(start..).map(|(_, r)| r)
    }

    /// Whether the record of `id` is stored and was reachable at the last prune (a digest's
    /// answer sends such records; a tombstone or a stray only as a newer version of a record
    /// the digest lists).
    pub fn reachable_at_last_prune(&self, id: &NodeId) -> bool {
        self.records.contains_key(id) && !self.evictable_seq.contains_key(id)
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
mod cap_props;
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

    fn listing(owner: &Identity, version: u64, neighbors: &[&Identity]) -> VerifiedRecord {
        owner
            .sign_verified(NodeRecord {
                id: owner.id(),
                addr: "127.0.0.1:1".into(),
                version,
                neighbors: neighbors.iter().map(|n| n.id()).collect(),
            })
            .expect("own record verifies")
    }

    /// A former neighbor of a withdrawn node publishes its drop only with its next change: until
    /// then its stored record still lists the withdrawn node. That withdrawal is kept as long,
    /// so that a replayed earlier record of the withdrawn node (listing the neighbor back) is
    /// stale and never makes the link look full; once no reachable record lists it, its grace
    /// runs and it is dropped. Unreachable records that list only each other are no reason to
    /// keep anything.
    #[test]
    fn a_withdrawal_a_reachable_record_still_lists_is_kept_and_a_replay_of_its_earlier_life_is_stale()
     {
        let (me, n, d) = (
            Identity::from_seed([1; 32]),
            Identity::from_seed([2; 32]),
            Identity::from_seed([3; 32]),
        );
        let (x, y) = (Identity::from_seed([4; 32]), Identity::from_seed([5; 32]));
        let grace = Duration::from_secs(60);
        let mut db = NodeDb::new();
        for record in [
            listing(&me, 1, &[&n]),
            listing(&n, 1, &[&me, &d]),
            listing(&d, 3, &[]),
            listing(&x, 1, &[&y]),
            listing(&y, 1, &[&x]),
        ] {
            assert_eq!(db.merge(record), Merge::Accepted);
        }
        let start = Instant::now();
        let mut dropped = Vec::new();
        for second in 0..=180 {
            dropped.extend(db.prune(&me.id(), start + Duration::from_secs(second), grace));
        }
        assert_eq!(
            dropped.iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([&x.id(), &y.id()]),
            "only the records nobody reachable lists are dropped"
        );
        assert!(db.get(&d.id()).is_some(), "the withdrawal is kept");
        // A replay of D's earlier life, which listed N: stale, so N and D are not linked.
        assert_eq!(db.merge(listing(&d, 2, &[&n])), Merge::Stale);
        assert_eq!(
            db.reachable_from(&me.id()),
            HashSet::from([me.id(), n.id()])
        );
        // N's next change carries its drop: D's grace starts, and it is dropped once it ran.
        assert_eq!(db.merge(listing(&n, 2, &[&me])), Merge::Accepted);
        let later = start + Duration::from_secs(200);
        assert!(db.prune(&me.id(), later, grace).is_empty());
        assert!(db.prune(&me.id(), later + grace / 2, grace).is_empty());
        assert_eq!(db.prune(&me.id(), later + grace, grace), vec![d.id()]);
        assert_eq!(db.len(), 2);
    }

    #[test]
    fn a_record_counts_its_wire_bytes_and_its_decoded_copy() {
        let a = Identity::from_seed([1; 32]);
        let neighbors: BTreeSet<NodeId> = (2..6u8)
            .map(|seed| Identity::from_seed([seed; 32]).id())
            .collect();
        let record = a
            .sign_verified(NodeRecord {
                id: a.id(),
                addr: "127.0.0.1:4000".into(),
                version: 1,
                neighbors,
            })
            .expect("verifies");
        assert_eq!(record.wire().len(), 112 + 14 + 32 * 4);
        assert_eq!(record_bytes(&record), 112 + 2 * 14 + 64 * 4);
        let mut db = NodeDb::new();
        db.merge(record);
        assert_eq!(db.bytes(), 112 + 2 * 14 + 64 * 4);
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
