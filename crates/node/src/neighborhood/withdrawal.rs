//! Withdrawal: this node's own departure, and the detection of a neighbor's.

use meshnode_protocol::{Frame, NodeId};
use meshnode_shutdown::DoneReply;
use tracing::info;

use super::outbox::Outbox;
use super::state::Neighborhood;
use crate::link::StreamHandle;

impl Neighborhood {
    /// Drops every outgoing half-neighborship in one change (one version, one signature) and
    /// queues exactly one gossip frame showing it on each immediate neighbor's stream, in the
    /// slot each stream keeps for it. The pool closes the streams behind it once this answers.
    pub(super) fn withdraw(&mut self, streams: Vec<StreamHandle>, reply: DoneReply) {
        if self.withdrawn {
            reply.done("already withdrawn", Vec::new());
            return;
        }
        // The pool's list, not this task's: a stream admitted just now may not have announced
        // itself here yet, and it is owed the withdrawal all the same. A neighbor that has
        // itself withdrawn is owed nothing.
        let targets: Vec<StreamHandle> = streams
            .into_iter()
            .filter(|s| !self.departed.contains(&s.peer()))
            .collect();
        self.change_own(|neighbors| {
            let had = !neighbors.is_empty();
            neighbors.clear();
            had
        });
        // Nothing else goes out: not this batch's other changes, not anything later.
        self.withdrawn = true;
        self.outbox = Outbox::default();
        let (bodies, _) = Frame::gossip_bodies([&self.own]);
        let mut notified = 0;
        let mut gone = Vec::new();
        for stream in &targets {
            let queued = stream.try_send_final(&bodies).is_ok();
            if queued {
                notified += 1;
                self.counters.frames_sent += bodies.len() as u64;
                self.counters.bytes_sent += bodies.iter().map(|b| b.len() as u64).sum::<u64>();
            } else {
                gone.push(stream.peer().short());
            }
        }
        info!(
            version = self.own.version(),
            notified,
            neighbors = targets.len(),
            "withdrew from the network"
        );
        let summary = if targets.is_empty() {
            "no neighbors to notify".to_owned()
        } else if gone.is_empty() {
            format!("notified {notified} neighbors")
        } else {
            format!(
                "notified {notified} of {} neighbors; streams already gone: {}",
                targets.len(),
                gone.join(", ")
            )
        };
        reply.done(summary, Vec::new());
    }
    /// Whether a record of immediate neighbor `id` at `version`, which does not list this node,
    /// shows that the neighbor withdrew. It must be the newest record of it stored here, and
    /// either come over the neighbor's own stream (a neighbor sends its own record only as it
    /// is now, and lists this node from the first gossip after the handshake), or, relayed by
    /// another neighbor, be newer than a record of its own that listed this node (an older one
    /// may predate the handshake and proves nothing).
    pub(super) fn is_withdrawal(&self, id: NodeId, from: NodeId, version: u64) -> bool {
        let newest = self.db.get(&id).is_some_and(|r| r.version() == version);
        let after_listing = self
            .listed_since
            .get(&id)
            .is_some_and(|&since| version > since);
        newest && (id == from || after_listing)
    }

    /// A neighbor's own newer record no longer lists this node: it withdrew. Drop the
    /// half-neighborship to it now, in this batch's one gossip round, so
    /// that its stream closing a moment later changes nothing. (The stream's reader has
    /// already noted the departure, so that the neighbor is not redialed.)
    pub(super) fn neighbor_withdrew(&mut self, peer: NodeId) {
        let Some(streams) = self.streams.get(&peer) else {
            return;
        };
        if streams.is_empty() || !self.departed.insert(peer) {
            return;
        }
        // Its withdrawal, forwarded at once, already tells everyone that every link to it is
        // gone (a link is full only while both records list it): the own record that drops it
        // is published lazily, not as a second flood.
        if self.change_own_lazily(|neighbors| neighbors.remove(&peer)) {
            info!(peer = %peer.short(), "neighbor withdrew from the network; half-neighborship removed");
        }
    }
}
