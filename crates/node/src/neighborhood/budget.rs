//! The flood budget: how many gossip frames that change nothing a neighbor may send.

use meshnode_protocol::NodeId;
use tokio::time::Instant;
use tracing::warn;

use super::state::Neighborhood;
use super::{USELESS_GOSSIP_BURST, USELESS_GOSSIP_RATE};

/// A token bucket: a burst, refilled at a steady rate.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    tokens: f64,
    at: Instant,
}

impl Budget {
    pub(super) fn full() -> Self {
        Self {
            tokens: USELESS_GOSSIP_BURST,
            at: Instant::now(),
        }
    }

    /// Spends one token, after refilling for the time since the last; false when none is left.
    pub(super) fn spend(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * USELESS_GOSSIP_RATE;
        self.tokens = (self.tokens + earned).min(USELESS_GOSSIP_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Neighborhood {
    /// A frame from `from` changed nothing here. That happens now and then to any neighbor
    /// (news reaches this node by several paths); a neighbor that does little else is flooding,
    /// and is disconnected once its budget runs out.
    pub(super) fn useless_gossip(&mut self, from: NodeId) {
        self.counters.frames_useless += 1;
        let Some(streams) = self.streams.get(&from) else {
            return;
        };
        if self
            .useless
            .entry(from)
            .or_insert_with(Budget::full)
            .spend()
        {
            return;
        }
        warn!(peer = %from.short(), "neighbor floods gossip that changes nothing; disconnecting");
        self.counters.peers_disconnected_for_flooding += 1;
        for stream in streams {
            stream.kill();
        }
        // Its disconnects follow; a new stream from it starts with a full budget.
        self.useless.remove(&from);
    }
}
