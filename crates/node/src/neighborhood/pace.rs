//! The pace of the own record: a byte budget for publishing it to the neighbors.
//!
//! The own record lists every neighbor, so one publish of it costs its size times the number of
//! neighbors: O(N²) bytes for a node with N neighbors (about 32 MB at 1000 neighbors), sealed by
//! this node and opened by every neighbor. Changes of a record that large are coalesced: a
//! publish spends its bytes from a budget refilled at [`OWN_RECORD_RATE`], and the next waits
//! until the budget is out of debt. A small node (a few neighbors) never notices: its publishes
//! fit in the [`OWN_RECORD_BURST`]. See docs/protocol.md, "A large own record is paced".

use tokio::time::Instant;

use super::state::Neighborhood;
use super::{OWN_RECORD_BURST, OWN_RECORD_RATE};

/// A byte budget: a burst, refilled at a steady rate, that a publish may overdraw once.
#[derive(Debug, Clone, Copy)]
pub(super) struct ByteBudget {
    /// Bytes left; negative while in debt.
    bytes: f64,
    at: Instant,
}

impl ByteBudget {
    pub(super) fn full() -> Self {
        Self {
            bytes: OWN_RECORD_BURST as f64,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * OWN_RECORD_RATE as f64;
        self.bytes = (self.bytes + earned).min(OWN_RECORD_BURST as f64);
        self.at = now;
    }

    /// When a publish may next go out: now, unless the budget is in debt.
    pub(super) fn ready_at(&self) -> Instant {
        if self.bytes >= 0.0 {
            self.at
        } else {
            self.at + std::time::Duration::from_secs_f64(-self.bytes / OWN_RECORD_RATE as f64)
        }
    }

    pub(super) fn spend(&mut self, bytes: usize, now: Instant) {
        self.refill(now);
        self.bytes -= bytes as f64;
    }
}

impl Neighborhood {
    /// Whether the own record may be published now; if not, it is held back (taken out of the
    /// outbox) until [`Self::own_due`].
    pub(super) fn pace_own(&mut self, now: Instant) {
        let me = self.own.id();
        if self.outbox.changed.contains_key(&me) && self.own_budget.ready_at() > now {
            self.outbox.changed.remove(&me);
            self.own_held = true;
        }
    }

    /// When the own record held back for its pace is due; `None` if none is held.
    pub(super) fn own_due(&self) -> Option<Instant> {
        (self.own_held && !self.withdrawn).then(|| self.own_budget.ready_at())
    }

    /// Puts the held own record back in the outbox once its pace allows; true if it did.
    pub(super) fn release_own(&mut self, now: Instant) -> bool {
        if !self.own_held || self.withdrawn || self.own_budget.ready_at() > now {
            return false;
        }
        self.own_held = false;
        self.outbox.changed.entry(self.own.id()).or_default();
        true
    }

    /// Charges a publish of the own record (its wire bytes) to `neighbors` neighbors to the budget.
    pub(super) fn charge_own(&mut self, neighbors: usize, now: Instant) {
        if neighbors > 0 {
            self.own_held = false;
            self.own_budget
                .spend(self.own.wire().len().saturating_mul(neighbors), now);
        }
    }
}
