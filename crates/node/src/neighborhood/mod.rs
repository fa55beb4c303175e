//! The neighborhood: sole owner of the node's identity, its signed record and the database of
//! every record it has heard of. It decides what to gossip and hands ready-made frames straight
//! to the streams' send queues (never waiting on them), so it can never be stalled by a slow
//! neighbor.

mod budget;
pub mod connectivity;
mod database;
#[cfg(test)]
mod departure_props;
mod digest;
#[cfg(test)]
mod digest_tests;
mod outbox;
mod pace;
#[cfg(test)]
mod props_support;
mod reach;
#[cfg(test)]
mod reach_growth_tests;
#[cfg(test)]
mod reach_tests;
mod state;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tie_break_tests;
mod withdrawal;

use meshnode_protocol::ui::{KnownNode, NeighborStatus};
use meshnode_protocol::{Digest, Identity, NodeId, RecordError, VerifiedRecord};
use meshnode_shutdown::DoneReply;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use connectivity::Connectivity;
pub use database::{Merge, NodeDb};
pub use digest::{DIGEST_EVERY, MAX_REPAIR_BYTES, MIN_DIGEST_GAP, REPAIR_AGE};

use crate::link::{ConnId, StreamHandle};

/// How many messages may wait in the neighborhood's inbox.
pub const NEIGHBORHOOD_INBOX: usize = 1024;
/// How long the neighborhood gathers changes before it gossips them, so that news arriving
/// from several neighbors at about the same time leaves as one round.
pub const DEFAULT_GOSSIP_WINDOW: Duration = Duration::from_millis(10);
/// Gossip frames that change nothing here (only records already stored, or older ones) a
/// neighbor may send in a burst before it is disconnected for flooding.
pub const USELESS_GOSSIP_BURST: f64 = 1024.0;
/// How many such frames per second a neighbor earns back. A well-behaved neighbor gossips at
/// most once per gossip window (100 frames a second at the default), and only some of that is
/// stale here, so only a flood runs the budget out.
pub const USELESS_GOSSIP_RATE: f64 = 256.0;

/// Bytes of publishes of the own record (its size, counted as in the database, times the
/// neighbors it goes to) a node may spend in a burst: a node with a few dozen neighbors publishes
/// every change at once.
pub const OWN_RECORD_BURST: usize = 256 * 1024;
/// Bytes of such publishes per second a node earns back. A publish may overdraw the budget; the
/// next waits until it is out of debt, and changes meanwhile coalesce into one record. At 1000
/// neighbors (a record of about 32 KB, so 32 MB a publish) that is one publish every 2 s.
pub const OWN_RECORD_RATE: usize = 16 * 1024 * 1024;

/// Messages the neighborhood task handles.
#[derive(Debug)]
pub enum NeighborhoodMsg {
    /// A stream to the record's owner passed its handshake and was admitted by the pool.
    NeighborConnected {
        stream: StreamHandle,
        record: VerifiedRecord,
    },
    /// A gossip frame from an immediate neighbor; its records are already verified.
    Gossip {
        from: NodeId,
        records: Vec<VerifiedRecord>,
    },
    /// A digest from an immediate neighbor (anti-entropy): it is answered with the records
    /// stored here that it lacks or lists older.
    Digest { from: NodeId, digest: Digest },
    /// The stream `conn` to `peer` has ended.
    NeighborDisconnected { conn: ConnId, peer: NodeId },
    /// This node's current signed record (with its wire bytes), for a handshake.
    OwnRecord {
        reply: oneshot::Sender<VerifiedRecord>,
    },
    /// What the status payload shows of the neighborhood, answered after the current batch's
    /// gossip has gone out.
    Status {
        reply: oneshot::Sender<NeighborhoodStatus>,
    },
    /// Drop every outgoing half-neighborship at once, queue exactly one gossip showing that on
    /// each of `streams` (the pool's admitted streams) whose neighbor has not itself withdrawn,
    /// answer done, and from then on gossip nothing.
    /// When each of `ids`'s current record was stored here (for measurements).
    LearnedAt {
        ids: Vec<NodeId>,
        reply: oneshot::Sender<Vec<Option<Instant>>>,
    },
    WithdrawFromNetwork {
        streams: Vec<StreamHandle>,
        reply: DoneReply,
    },
    /// Panics the task, as a bug would.
    #[cfg(test)]
    Crash,
}

/// The neighborhood's part of the status payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborhoodStatus {
    pub node_id: NodeId,
    pub version: u64,
    pub neighbors: Vec<NeighborStatus>,
    pub known_nodes: Vec<KnownNode>,
    pub counters: GossipCounters,
}

/// Gossip counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipCounters {
    pub frames_sent: u64,
    /// Bytes of those frames' bodies.
    pub bytes_sent: u64,
    pub frames_received: u64,
    /// Times gossip for a neighbor was held back because its send queue was busy.
    pub deferred: u64,
    pub records_accepted: u64,
    pub records_stale: u64,
    /// Gossip frames that changed nothing here.
    pub frames_useless: u64,
    /// Neighbors disconnected for flooding useless gossip.
    pub peers_disconnected_for_flooding: u64,
    /// Records of new ids refused because the database was full of reachable records.
    pub records_refused: u64,
    /// Digests sent (anti-entropy; not counted as gossip).
    pub digests_sent: u64,
    /// Bytes of those digests' bodies.
    pub digest_bytes_sent: u64,
    /// Digests received.
    pub digests_received: u64,
    /// Records sent in answer to digests (their frames count as gossip).
    pub records_repaired: u64,
}

/// The neighborhood task has stopped and can no longer answer.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the neighborhood has stopped")]
pub struct NeighborhoodGone;

/// A cloneable handle for talking to the neighborhood task.
#[derive(Debug, Clone)]
pub struct NeighborhoodHandle {
    tx: mpsc::Sender<NeighborhoodMsg>,
    connectivity: watch::Receiver<Connectivity>,
}

impl NeighborhoodHandle {
    /// A handle whose messages go to `tx`, for tests that play this subsystem themselves.
    #[cfg(test)]
    pub(crate) fn from_sender(tx: mpsc::Sender<NeighborhoodMsg>) -> Self {
        let connectivity = watch::Sender::new(Connectivity::default()).subscribe();
        Self { tx, connectivity }
    }

    /// The node's connectivity as last published (after the neighborhood's latest batch); a
    /// receiver that never waits on the neighborhood. Once the neighborhood has ended it keeps
    /// the last value and `changed` fails.
    pub fn connectivity(&self) -> watch::Receiver<Connectivity> {
        self.connectivity.clone()
    }

    /// Sends a message, waiting for room in the inbox.
    pub async fn send(&self, msg: NeighborhoodMsg) -> Result<(), NeighborhoodGone> {
        self.tx.send(msg).await.map_err(|_| NeighborhoodGone)
    }

    /// Completes when the neighborhood task has ended (stopped, or panicked).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    pub async fn own_record(&self) -> Result<VerifiedRecord, NeighborhoodGone> {
        let (reply, rx) = oneshot::channel();
        self.send(NeighborhoodMsg::OwnRecord { reply }).await?;
        rx.await.map_err(|_| NeighborhoodGone)
    }

    pub async fn learned_at(
        &self,
        ids: Vec<NodeId>,
    ) -> Result<Vec<Option<Instant>>, NeighborhoodGone> {
        let (reply, rx) = oneshot::channel();
        self.send(NeighborhoodMsg::LearnedAt { ids, reply }).await?;
        rx.await.map_err(|_| NeighborhoodGone)
    }

    pub async fn status(&self) -> Result<NeighborhoodStatus, NeighborhoodGone> {
        let (reply, rx) = oneshot::channel();
        self.send(NeighborhoodMsg::Status { reply }).await?;
        rx.await.map_err(|_| NeighborhoodGone)
    }
}

/// When gossip leaves: the window that gathers changes, and the settling delay of lazy changes
/// of the own record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GossipTiming {
    /// How long changes are gathered before they are sent (zero: at the end of every batch).
    /// Withdrawals never wait for it.
    pub window: Duration,
}

impl Default for GossipTiming {
    fn default() -> Self {
        Self {
            window: DEFAULT_GOSSIP_WINDOW,
        }
    }
}

/// Starts the neighborhood task for `identity`, which accepts neighbors on `addr`.
pub fn spawn(
    identity: Identity,
    addr: String,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<NeighborhoodHandle, RecordError> {
    spawn_with(identity, addr, GossipTiming::default(), cancel, tracker)
}

/// [`spawn`] with gossip timing of one's own.
pub fn spawn_with(
    identity: Identity,
    addr: String,
    timing: GossipTiming,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<NeighborhoodHandle, RecordError> {
    spawn_clocked(
        identity,
        addr,
        state::VersionClock::Wall,
        timing,
        cancel,
        tracker,
    )
}

/// [`spawn_with`], with versions counted from 1 (for tests that pin them).
#[cfg(test)]
pub(crate) fn spawn_counting(
    identity: Identity,
    addr: String,
    timing: GossipTiming,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<NeighborhoodHandle, RecordError> {
    spawn_clocked(
        identity,
        addr,
        state::VersionClock::Counter,
        timing,
        cancel,
        tracker,
    )
}

/// [`spawn_with`], with the clock that numbers the node's own record versions.
fn spawn_clocked(
    identity: Identity,
    addr: String,
    clock: state::VersionClock,
    timing: GossipTiming,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<NeighborhoodHandle, RecordError> {
    let (tx, rx) = mpsc::channel(NEIGHBORHOOD_INBOX);
    let span = tracing::info_span!("neighborhood", node = %identity.id().short());
    let task = state::Neighborhood::with_clock(identity, addr, clock)?.with_window(timing.window);
    let connectivity = task.connectivity();
    tracker.spawn(task.run(rx, cancel).instrument(span));
    Ok(NeighborhoodHandle { tx, connectivity })
}
