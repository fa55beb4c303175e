//! Gossip scheduling: what the neighborhood owes its neighbors and the flush that sends it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use meshnode_protocol::{Frame, NodeId};

use super::state::{Neighborhood, sig_prefix};
use crate::link::QueueError;

/// Gossip owed at the end of the current batch.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// Records changed since the last gossip, each with the neighbors known to have its new
    /// version already (they sent it here, first or as a copy): they are not sent it again.
    pub(super) changed: BTreeMap<NodeId, BTreeSet<NodeId>>,
    /// Newly connected neighbors, owed the whole database: their own stored record included,
    /// which, if it is newer than their hello, is from an earlier run of their key that they
    /// must outbid (and otherwise is merely stale there). One set for all of them, encoded once.
    pub(super) full_sync: BTreeSet<NodeId>,
}

impl Neighborhood {
    /// Whether `peer` is known to have the stored record of `id` (it sent it here).
    pub(super) fn peer_knows(&self, peer: &NodeId, id: &NodeId) -> bool {
        let Some(stored) = self.db.get(id) else {
            return false;
        };
        self.peer_has
            .get(peer)
            .and_then(|known| known.get(id))
            .is_some_and(|&(version, sig)| {
                version > stored.version()
                    || (version == stored.version() && sig == sig_prefix(stored.signed()))
            })
    }

    pub(super) fn owes_gossip(&self) -> bool {
        !self.withdrawn && (!self.outbox.changed.is_empty() || !self.outbox.full_sync.is_empty())
    }
    /// Sends what the batch changed: the whole database to newly connected neighbors, and to
    /// every other neighbor the changed records it did not itself send, together with anything
    /// held back for it earlier. A neighbor whose queue is busy gets nothing now: what it is owed
    /// is coalesced (by record, so it never outgrows the database) and sent once its queue has
    /// drained. Each distinct set of records is encoded once.
    pub(super) fn flush(&mut self) {
        let now = tokio::time::Instant::now();
        self.settle_reach();
        self.pace_own(now);
        let outbox = std::mem::take(&mut self.outbox);
        self.urgent = false;
        if self.withdrawn {
            self.backlog.clear();
            return;
        }
        if outbox.changed.is_empty() && outbox.full_sync.is_empty() && self.backlog.is_empty() {
            return;
        }
        // Each distinct set of records is packed once: its bodies, each marked with how many
        // of the set's records come up to its end. Packing copies each record's stored wire
        // bytes; no record is encoded here.
        let mut encoded: HashMap<Vec<NodeId>, Vec<(Bytes, usize)>> = HashMap::new();
        let me = self.own.id();
        // What can matter of the database, for the newly connected neighbors (held records
        // are not sent).
        let sync = if outbox.full_sync.is_empty() {
            BTreeSet::new()
        } else {
            self.sync_ids()
        };
        let publishes_own = outbox.changed.contains_key(&me);
        let mut own_published = 0;
        for (peer, streams) in &self.streams {
            let Some(stream) = streams.last() else {
                continue;
            };
            if self.departed.contains(peer) {
                continue;
            }
            // The same sets for as many neighbors as possible, so that they share one encoding:
            // a neighbor may be sent its own record (it is stale there).
            let mut ids: BTreeSet<NodeId> = if outbox.full_sync.contains(peer) {
                let mut ids = sync.clone();
                if self.db.get(peer).is_some() {
                    ids.insert(*peer);
                }
                ids
            } else {
                outbox
                    .changed
                    .iter()
                    .filter(|(id, have)| !have.contains(peer) && !self.peer_knows(peer, id))
                    .map(|(id, _)| *id)
                    .collect()
            };
            if let Some(owed) = self.backlog.remove(peer) {
                ids.extend(owed);
            }
            if ids.is_empty() {
                continue;
            }
            if publishes_own && !outbox.full_sync.contains(peer) && ids.contains(&me) {
                own_published += 1;
            }
            if stream.is_busy() {
                self.counters.deferred += 1;
                self.backlog.insert(*peer, ids);
                continue;
            }
            let db = &self.db;
            let key: Vec<NodeId> = ids.into_iter().collect();
            let bodies = encoded.entry(key.clone()).or_insert_with_key(|ids| {
                Frame::gossip_bodies_marked(ids.iter().filter_map(|id| db.get(id))).0
            });
            let mut sent = 0;
            for (body, mark) in bodies.iter() {
                match stream.try_send(body.clone()) {
                    Ok(()) => {
                        self.counters.frames_sent += 1;
                        self.counters.bytes_sent += body.len() as u64;
                        sent = *mark;
                    }
                    // Filled up mid-way: the records not sent yet are owed, and only those (a
                    // neighbor sent the same frames twice would count them as useless).
                    Err(QueueError::Full) => {
                        self.counters.deferred += 1;
                        // The marks count the records encoded: those of the ids stored here.
                        let owed = key.iter().filter(|id| db.get(id).is_some()).skip(sent);
                        self.backlog.insert(*peer, owed.copied().collect());
                        break;
                    }
                    // The stream is ending; its disconnect is on its way.
                    Err(QueueError::Closed) => break,
                }
            }
        }
        self.charge_own(own_published, now);
    }
}
