//! Forward only what can matter: the set of nodes reachable over full neighborships, kept once
//! per batch, and the records held back because they are not reachable (docs/protocol.md, "Only
//! what can matter is forwarded").
//!
//! A stored record goes to the neighbors only if its node is reachable from this one, or was
//! at the end of the previous batch (a withdrawal, a change that cuts a node off). Any other
//! record is held: stored, but sent nowhere, until it becomes reachable (a newcomer whose
//! neighbor's record listing it back comes later). So a flood of fresh keys that nobody lists
//! stops at the node it reaches, and a record evicted and received again cannot circulate.

use std::collections::{BTreeSet, HashSet, VecDeque};

use meshnode_protocol::{NodeId, VerifiedRecord};

use super::state::Neighborhood;

/// The reachable set as of the last settle, and the records held back.
#[derive(Debug, Default)]
pub(super) struct Reach {
    /// The nodes reachable from this one over full neighborships at the last settle, this node
    /// included.
    reachable: HashSet<NodeId>,
    /// Set when a merge may have made more nodes reachable since the last settle: the search
    /// runs at the end of the batch, so that held records that became reachable leave with it.
    dirty: bool,
    /// Set when the next search must start from this node (the first, and after the own record
    /// changed or a prune that found fewer nodes reachable); otherwise a search only grows the
    /// reachable set from the records in [`Reach::grow`].
    full: bool,
    /// The records whose merges may have made more nodes reachable since the last settle: the
    /// search starts from them, not from this node, so that each of the thousands of changes
    /// of a mesh that converges costs what it adds, not a walk of the whole mesh.
    grow: Vec<NodeId>,
    /// Set when a change can only have made fewer nodes reachable (a withdrawal, a dropped
    /// neighbor, an evicted record): no held record can have become reachable, so the search
    /// waits for the next prune. Meanwhile the nodes cut off still count as reachable, which
    /// is what forwarding wants anyway: the news of a node that was reachable is still news.
    shrunk: bool,
    /// Records stored while not reachable and not forwarded since. Only ids stored in the
    /// database (pruned with it), so bounded by its cap.
    held: HashSet<NodeId>,
    /// Searches run, for tests.
    #[cfg(test)]
    pub(super) searches: u64,
}

impl Reach {
    /// A reach that knows only `me` and must be settled before it is trusted.
    pub(super) fn new(me: NodeId) -> Self {
        Self {
            reachable: HashSet::from([me]),
            dirty: true,
            full: true,
            grow: Vec::new(),
            shrunk: false,
            held: HashSet::new(),
            #[cfg(test)]
            searches: 0,
        }
    }

    /// The nodes reachable at the last settle.
    pub(super) fn reachable_set(&self) -> &HashSet<NodeId> {
        &self.reachable
    }

    /// Whether `id` was reachable at the last settle.
    pub(super) fn was_reachable(&self, id: &NodeId) -> bool {
        self.reachable.contains(id)
    }

    /// The nodes reachable at the last settle.
    #[cfg(test)]
    pub(super) fn reachable(&self) -> HashSet<NodeId> {
        self.reachable.clone()
    }

    /// How many records are held back.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// Notes that more nodes may be reachable (the own record changed).
    pub(super) fn invalidate(&mut self) {
        self.dirty = true;
        self.full = true;
    }

    /// Notes that fewer nodes may be reachable (records were dropped).
    pub(super) fn shrink(&mut self) {
        self.shrunk = true;
    }
}

impl Neighborhood {
    /// Before `record` is merged: notes whether storing it can change what is reachable. It can
    /// only if its node is reachable and its neighbors change, or it lists a reachable node
    /// that lists it back (then it becomes reachable itself, and perhaps others through it). A
    /// record of a fresh key that lists nobody changes nothing, and costs nothing here.
    ///
    /// A reachable record that only loses neighbors (a withdrawal) can only make fewer nodes
    /// reachable: that search waits for the next prune (see [`Reach::shrunk`]).
    pub(super) fn note_merge(&mut self, record: &VerifiedRecord) {
        if self.reach.dirty && self.reach.full {
            return;
        }
        let id = record.id();
        // A copy, or an older version (one that took a longer path here): not stored, so it
        // changes nothing. Many of them arrive while a mesh converges; each would otherwise
        // cost a search.
        if self
            .db
            .get(&id)
            .is_some_and(|stored| !super::database::supersedes(record, stored))
        {
            return;
        }
        let neighbors = &record.record().neighbors;
        if self.reach.reachable.contains(&id) {
            match self.db.get(&id).map(|stored| &stored.record().neighbors) {
                Some(stored) if stored == neighbors => {}
                Some(stored) if neighbors.is_subset(stored) => self.reach.shrunk = true,
                Some(stored) => {
                    // Neighbors added (and perhaps others dropped: that search waits for the
                    // prune, as for a withdrawal).
                    if !neighbors.is_superset(stored) {
                        self.reach.shrunk = true;
                    }
                    self.reach.dirty = true;
                    self.reach.grow.push(id);
                }
                None => {
                    self.reach.dirty = true;
                    self.reach.grow.push(id);
                }
            }
        } else if neighbors
            .iter()
            .any(|n| self.reach.reachable.contains(n) && self.db.lists(n, &id))
        {
            self.reach.dirty = true;
            self.reach.grow.push(id);
        }
    }

    /// A record was stored: it is owed to the neighbors (with those known to have it, `have`)
    /// if its node was reachable at the last settle or a version of it is owed already;
    /// otherwise it is held until a settle finds it reachable.
    pub(super) fn owe_or_hold(&mut self, id: NodeId, have: BTreeSet<NodeId>) -> bool {
        if self.reach.was_reachable(&id) || self.outbox.changed.contains_key(&id) {
            self.reach.held.remove(&id);
            self.outbox.changed.insert(id, have);
            true
        } else {
            self.reach.held.insert(id);
            false
        }
    }

    /// Recomputes what is reachable if the batch may have changed it, and puts the held records
    /// that became reachable in the outbox. Once per batch: a search from the own record that
    /// visits only the reachable records.
    pub(super) fn settle_reach(&mut self) {
        if !self.reach.dirty {
            return;
        }
        self.reach.dirty = false;
        #[cfg(test)]
        {
            self.reach.searches += 1;
        }
        if !self.reach.full {
            self.grow_reach();
            return;
        }
        self.reach.full = false;
        self.reach.shrunk = false;
        self.reach.grow.clear();
        let now = self.db.reachable_from(&self.own.id());
        for id in now.difference(&self.reach.reachable) {
            if self.reach.held.remove(id) {
                self.outbox.changed.entry(*id).or_default();
            }
        }
        self.reach.reachable = now;
    }

    /// The search of [`Self::settle_reach`] when only additions can have made more nodes
    /// reachable: from each record in [`Reach::grow`] that is reachable now (it was, or it lists
    /// a reachable node that lists it back), over full neighborships, through the nodes not
    /// reachable yet. A node newly reachable is linked by a neighborship that became full in
    /// this batch to one reachable already, and one of the two records changed: so this finds
    /// every node a search from this node would add.
    fn grow_reach(&mut self) {
        let db = &self.db;
        let reach = &mut self.reach;
        let mut frontier = VecDeque::new();
        let mut added = Vec::new();
        for id in std::mem::take(&mut reach.grow) {
            if reach.reachable.contains(&id) {
                frontier.push_back(id);
                continue;
            }
            let linked = db.get(&id).is_some_and(|r| {
                r.record()
                    .neighbors
                    .iter()
                    .any(|n| reach.reachable.contains(n) && db.lists(n, &id))
            });
            if linked {
                reach.reachable.insert(id);
                added.push(id);
                frontier.push_back(id);
            }
        }
        while let Some(x) = frontier.pop_front() {
            let Some(record) = db.get(&x) else {
                continue;
            };
            for y in &record.record().neighbors {
                if !reach.reachable.contains(y) && db.lists(y, &x) {
                    reach.reachable.insert(*y);
                    added.push(*y);
                    frontier.push_back(*y);
                }
            }
        }
        for id in added {
            if self.reach.held.remove(&id) {
                self.outbox.changed.entry(id).or_default();
            }
        }
    }

    /// Before a prune: settles the reach, running the search that changes which could only
    /// shrink what is reachable put off, so that the reachable set is exactly what a search
    /// from this node finds now.
    pub(super) fn reach_exactly(&mut self) {
        if self.reach.shrunk {
            self.reach.dirty = true;
            self.reach.full = true;
        }
        self.settle_reach();
        #[cfg(test)]
        assert_eq!(
            self.reach.reachable,
            self.db.reachable_from(&self.own.id()),
            "the reach kept is what a search finds"
        );
    }

    /// After a prune: forgets held records the database no longer stores.
    pub(super) fn prune_reach(&mut self) {
        let db = &self.db;
        self.reach.held.retain(|id| db.get(id).is_some());
    }

    /// What a newly admitted neighbor is sent of the database: every reachable record and
    /// every record a reachable one lists (a neighbor not yet full, a withdrawal a former
    /// neighbor still lists); not the held ones. The flush adds the peer's own stored record.
    /// Call after [`Self::settle_reach`].
    pub(super) fn sync_ids(&self) -> BTreeSet<NodeId> {
        let mut ids = BTreeSet::new();
        for id in &self.reach.reachable {
            let Some(record) = self.db.get(id) else {
                continue;
            };
            ids.insert(*id);
            ids.extend(
                record
                    .record()
                    .neighbors
                    .iter()
                    .filter(|n| self.db.get(n).is_some()),
            );
        }
        ids
    }
}
