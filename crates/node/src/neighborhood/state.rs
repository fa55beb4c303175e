//! The neighborhood task's private state and its loop: the messages it handles, the database
//! merges and the own record. Gossip scheduling is in `outbox`, withdrawals in `withdrawal`,
//! the flood budget in `budget`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use meshnode_protocol::ui::{KnownNode, NeighborStatus};
use meshnode_protocol::{Identity, NodeId, NodeRecord, RecordError, VerifiedRecord};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::budget::Budget;
use super::connectivity::Connectivity;
use super::digest::AntiEntropy;
use super::outbox::Outbox;
use super::pace::ByteBudget;
use super::reach::Reach;
use super::{GossipCounters, Merge, NeighborhoodMsg, NeighborhoodStatus, NodeDb};
use crate::link::{ConnId, StreamHandle};

/// Most messages handled before pending gossip is flushed, so that a burst of changes leaves
/// as one gossip per neighbor while a steady stream of them still gets out promptly.
const MAX_BATCH: usize = 256;
/// How often the database is pruned of unreachable records past their grace.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// How often gossip held back for busy neighbors is tried again when nothing else happens.
const BACKLOG_RETRY: Duration = Duration::from_millis(20);

pub(super) struct Neighborhood {
    pub(super) identity: Identity,
    /// Where the own record's versions come from.
    pub(super) clock: VersionClock,
    pub(super) db: NodeDb,
    pub(super) own: VerifiedRecord,
    /// The streams to each immediate neighbor that have connected and not yet disconnected,
    /// oldest first; gossip goes to the newest. The pool admits one stream per neighbor, but a
    /// stream it replaced may still be connecting, in any order relative to its successor.
    pub(super) streams: HashMap<NodeId, Vec<StreamHandle>>,
    pub(super) outbox: Outbox,
    pub(super) counters: GossipCounters,
    /// Immediate neighbors that withdrew from the network: sent nothing more, not redialed.
    pub(super) departed: HashSet<NodeId>,
    /// For each immediate neighbor, the version of the first record of its own, received over
    /// its own stream, that listed this node: a later one that does not is its withdrawal.
    pub(super) listed_since: HashMap<NodeId, u64>,
    /// Set once this node withdrew: from then on it changes and gossips nothing.
    pub(super) withdrawn: bool,
    /// Records owed to neighbors whose send queue was busy, coalesced by record.
    pub(super) backlog: HashMap<NodeId, BTreeSet<NodeId>>,
    /// When each record now stored was stored.
    pub(super) learned_at: HashMap<NodeId, Instant>,
    /// How long changes are gathered before they are gossiped.
    pub(super) window: Duration,
    /// When the changes gathered so far are due to be gossiped.
    pub(super) flush_at: Option<Instant>,
    /// When gossip held back for busy neighbors is next tried again.
    pub(super) retry_at: Option<Instant>,
    /// When the database is next pruned (unreachable records past their grace dropped).
    pub(super) prune_at: Instant,
    /// Set when the batch stored a record that lists nobody (a withdrawal): it is forwarded at
    /// the end of the batch, without waiting for the window.
    pub(super) urgent: bool,
    /// How long an unreachable record is kept.
    pub(super) tombstone_grace: Duration,
    /// For each immediate neighbor, the records it is known to have: those it sent here, by id,
    /// with their version and the first bytes of their signature. Such a record is not sent
    /// back to it.
    pub(super) peer_has: HashMap<NodeId, HashMap<NodeId, (u64, u64)>>,
    /// Status requests of the current batch, answered after its gossip is counted.
    pub(super) status_replies: Vec<oneshot::Sender<NeighborhoodStatus>>,
    /// Each immediate neighbor's budget of gossip frames that change nothing here.
    pub(super) useless: HashMap<NodeId, Budget>,
    /// The node's place in the network, published after every batch for readers that must
    /// never wait on this task.
    pub(super) connectivity: watch::Sender<Connectivity>,
    /// The byte budget of publishing the own record to the neighbors.
    pub(super) own_budget: ByteBudget,
    /// Set while a change of the own record is held back for that budget.
    pub(super) own_held: bool,
    /// Set while the own record carries a change published lazily, not sent yet.
    pub(super) own_unpublished: bool,
    /// The digests this node sends (anti-entropy).
    pub(super) anti_entropy: AntiEntropy,
    /// [`NodeDb::dropped`] when the maps keyed by record were last cleared of dropped ids.
    pub(super) forgotten_up_to: u64,
    /// What is reachable, and the records held back because they are not.
    pub(super) reach: Reach,
}

impl Neighborhood {
    /// A neighborhood whose versions count up from 1, for tests that pin them.
    #[cfg(test)]
    pub(super) fn new(identity: Identity, addr: String) -> Result<Self, RecordError> {
        Self::with_clock(identity, addr, VersionClock::Counter)
    }

    pub(super) fn with_clock(
        identity: Identity,
        addr: String,
        clock: VersionClock,
    ) -> Result<Self, RecordError> {
        let record = NodeRecord {
            id: identity.id(),
            addr,
            version: clock.next(1),
            neighbors: BTreeSet::new(),
        };
        let own = identity.sign_verified(record)?;
        let mut db = NodeDb::new();
        db.merge(own.clone());
        // The own record is reachable from the start, so never evicted.
        db.prune(&own.id(), Instant::now(), super::database::TOMBSTONE_GRACE);
        let reach = Reach::new(own.id());
        Ok(Self {
            clock,
            db,
            own,
            streams: HashMap::new(),
            outbox: Outbox::default(),
            counters: GossipCounters::default(),
            departed: HashSet::new(),
            listed_since: HashMap::new(),
            backlog: HashMap::new(),
            learned_at: HashMap::new(),
            window: Duration::ZERO,
            flush_at: None,
            retry_at: None,
            prune_at: Instant::now() + PRUNE_EVERY,
            urgent: false,
            tombstone_grace: super::database::TOMBSTONE_GRACE,
            peer_has: HashMap::new(),
            withdrawn: false,
            status_replies: Vec::new(),
            useless: HashMap::new(),
            connectivity: watch::Sender::new(Connectivity::default()),
            own_budget: ByteBudget::full(),
            own_held: false,
            own_unpublished: false,
            anti_entropy: AntiEntropy::new(&identity.id(), Instant::now()),
            forgotten_up_to: 0,
            identity,
            reach,
        })
    }

    /// The stream gossip goes to `peer` over: its newest.
    pub(super) fn stream_to(&self, peer: &NodeId) -> Option<&StreamHandle> {
        self.streams.get(peer).and_then(|s| s.last())
    }

    /// A receiver of the node's connectivity, as published after each batch.
    pub(super) fn connectivity(&self) -> watch::Receiver<Connectivity> {
        self.connectivity.subscribe()
    }

    /// Publishes the node's connectivity if it changed (readers wake only then).
    pub(super) fn publish_connectivity(&self) {
        let now = Connectivity::of(&self.db, &self.own.id());
        self.connectivity.send_if_modified(|published| {
            let changed = *published != now;
            *published = now;
            changed
        });
    }

    pub(super) fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    pub(super) async fn run(
        mut self,
        mut inbox: mpsc::Receiver<NeighborhoodMsg>,
        cancel: CancellationToken,
    ) {
        debug!("started");
        loop {
            // Cancellation first: once the node stops, queued work is moot. Then gossip that
            // is due (and the retry of gossip held back for busy neighbors), ahead of the
            // inbox: a never-empty inbox must not starve it. Then the inbox.
            let msg = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = sleep_until(self.next_due()) => {
                    self.run_due();
                    continue;
                }
                msg = inbox.recv() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            self.handle(msg);
            for _ in 1..MAX_BATCH {
                match inbox.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
            // Once per batch: held records the batch made reachable join the outbox.
            self.settle_reach();
            if self.window.is_zero() || self.urgent {
                self.flush();
            } else if self.flush_at.is_none() && self.owes_gossip() {
                self.flush_at = Some(Instant::now() + self.window);
            }
            // Whatever came due while the batch was handled leaves now, however full the inbox.
            self.run_due();
            self.publish_connectivity();
            self.answer_status();
        }
        debug!("stopped");
    }

    /// Prunes the database (see [`NodeDb::prune`]) and forgets what it dropped everywhere else.
    pub(super) fn prune(&mut self, now: Instant) {
        // The prune judges by the reach's set, searched again first only if a change since the
        // last search may have shrunk it; the records it drops were not in it, so it stays
        // exact.
        self.reach_exactly();
        let me = self.own.id();
        let dropped = self.db.prune_reaching(
            &me,
            Some(self.reach.reachable_set()),
            now,
            self.tombstone_grace,
        );
        if !dropped.is_empty() {
            debug!(
                dropped = dropped.len(),
                kept = self.db.len(),
                "unreachable records past their grace dropped"
            );
        }
        self.prune_reach();
        // Records leave the database here and at a merge that evicts; when none left since the
        // last look there is nothing to forget (with a thousand records and their neighbors'
        // knowledge, that look is not free every second).
        if self.db.dropped() == self.forgotten_up_to {
            return;
        }
        self.forgotten_up_to = self.db.dropped();
        let db = &self.db;
        self.learned_at.retain(|id, _| db.get(id).is_some());
        for known in self.peer_has.values_mut() {
            known.retain(|id, _| db.get(id).is_some());
        }
    }

    /// The earliest of the gossip deadlines: the window's end, the backlog's retry.
    fn next_due(&self) -> Option<Instant> {
        [
            self.flush_at,
            self.retry_at,
            self.own_due(),
            Some(self.prune_at),
            Some(self.anti_entropy.at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the gossip whose deadline has passed, and schedules the next retry while gossip is
    /// held back for busy neighbors.
    pub(super) fn run_due(&mut self) {
        let now = Instant::now();
        let mut flush = false;
        if self.flush_at.is_some_and(|at| at <= now) {
            self.flush_at = None;
            flush = true;
        }
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            flush = true;
        }
        if self.release_own(now) {
            flush = true;
        }
        if flush {
            self.flush();
        }
        if self.prune_at <= now {
            self.prune_at = now + PRUNE_EVERY;
            self.prune(now);
        }
        if self.anti_entropy.at <= now {
            self.send_digest(now);
        }
        if self.backlog.is_empty() {
            self.retry_at = None;
        } else if self.retry_at.is_none() {
            self.retry_at = Some(now + BACKLOG_RETRY);
        }
    }

    pub(super) fn handle(&mut self, msg: NeighborhoodMsg) {
        match msg {
            NeighborhoodMsg::NeighborConnected { stream, record } => {
                self.neighbor_connected(stream, record)
            }
            NeighborhoodMsg::Gossip { from, records } => self.gossip(from, records),
            NeighborhoodMsg::Digest { from, digest } => self.answer_digest(from, digest),
            NeighborhoodMsg::NeighborDisconnected { conn, peer } => {
                self.neighbor_disconnected(conn, peer)
            }
            NeighborhoodMsg::OwnRecord { reply } => {
                let _ = reply.send(self.own.clone());
            }
            NeighborhoodMsg::Status { reply } => self.status_replies.push(reply),
            NeighborhoodMsg::LearnedAt { ids, reply } => {
                let _ = reply.send(
                    ids.iter()
                        .map(|id| self.learned_at.get(id).copied())
                        .collect(),
                );
            }
            NeighborhoodMsg::WithdrawFromNetwork { streams, reply } => {
                self.withdraw(streams, reply)
            }
            #[cfg(test)]
            NeighborhoodMsg::Crash => panic!("the neighborhood crashed, as asked by a test"),
        }
    }

    pub(super) fn answer_status(&mut self) {
        if self.status_replies.is_empty() {
            return;
        }
        let status = self.status();
        for reply in self.status_replies.drain(..) {
            let _ = reply.send(status.clone());
        }
    }
    fn neighbor_connected(&mut self, stream: StreamHandle, record: VerifiedRecord) {
        let peer = stream.peer();
        if self.withdrawn {
            debug!(peer = %peer.short(), "withdrawn; a late neighbor is ignored");
            return;
        }
        // A neighbor that withdrew and came back is a neighbor again.
        self.departed.remove(&peer);
        info!(peer = %peer.short(), conn = %stream.id(), addr = %record.record().addr, "neighbor connected");
        self.merge(record, Some(peer));
        // A replaced stream was closed by the pool; its disconnect removes only itself.
        self.streams.entry(peer).or_default().push(stream);
        self.peer_has.entry(peer).or_default();
        self.outbox.full_sync.insert(peer);
        self.change_own(|neighbors| neighbors.insert(peer));
    }

    fn neighbor_disconnected(&mut self, conn: ConnId, peer: NodeId) {
        let Some(streams) = self.streams.get_mut(&peer) else {
            return;
        };
        let Some(at) = streams.iter().position(|s| s.id() == conn) else {
            return;
        };
        streams.remove(at);
        if streams.is_empty() {
            self.streams.remove(&peer);
            self.departed.remove(&peer);
            self.listed_since.remove(&peer);
            self.peer_has.remove(&peer);
            self.backlog.remove(&peer);
            self.useless.remove(&peer);
            self.anti_entropy.answered.remove(&peer);
            self.outbox.full_sync.remove(&peer);
            if self.change_own(|neighbors| neighbors.remove(&peer)) {
                info!(peer = %peer.short(), %conn, "neighbor gone; half-neighborship removed");
            }
        } else if at == streams.len() {
            // Gossip went to the stream that ended; the one before it may have missed some.
            self.outbox.full_sync.insert(peer);
        }
    }

    fn gossip(&mut self, from: NodeId, records: Vec<VerifiedRecord>) {
        self.counters.frames_received += 1;
        if self.withdrawn {
            return;
        }
        let me = self.own.id();
        let mut useful = false;
        for record in records {
            if record.id() == self.own.id() {
                // Our own record from an earlier life of this key: outbid it, or every
                // neighbor would go on preferring the old one. A copy of the current record
                // is no earlier life.
                let earlier_life = record.version() > self.own.version()
                    || (record.version() == self.own.version() && record != self.own);
                if earlier_life {
                    let floor = record.version();
                    self.counters.records_accepted += 1;
                    self.bump_own_above(floor);
                    useful = true;
                } else {
                    self.counters.records_stale += 1;
                }
                continue;
            }
            let (id, version) = (record.id(), record.version());
            let lists_me = record.record().neighbors.contains(&me);
            let sig = sig_prefix(record.signed());
            useful |= self.merge(record, Some(from)) == Merge::Accepted;
            // What the sender has, for the records stored here (so this never outgrows the
            // database by more than a prune's worth).
            if self.db.get(&id).is_some()
                && let Some(known) = self.peer_has.get_mut(&from)
            {
                known.insert(id, (version, sig));
            }
            if !self.streams.contains_key(&id) {
                continue;
            }
            if lists_me {
                if id == from {
                    let confirmed = self.listed_since.entry(id).or_insert(version);
                    *confirmed = (*confirmed).min(version);
                }
            } else if self.is_withdrawal(id, from, version) {
                self.neighbor_withdrew(id);
            }
        }
        if !useful {
            self.useless_gossip(from);
        }
    }

    pub(super) fn merge(&mut self, record: VerifiedRecord, source: Option<NodeId>) -> Merge {
        let (id, signature) = (record.id(), record.signed().signature);
        // A withdrawal: a record that lists nobody, superseding one of the same node. (The
        // first record heard of a node that lists nobody yet is a newcomer, not news that every
        // link to it is gone: it waits for the window like any change, so that many newcomers
        // leave as one round.)
        let withdrawal = record.record().neighbors.is_empty() && self.db.get(&id).is_some();
        // A withdrawing node sends its withdrawal to every immediate neighbor itself: those it
        // had a full neighborship with, as this database saw it, have it already (or will have
        // it by that direct frame), and are not sent it again. Only over links that carry
        // digests: one that missed the direct frame gets it with its next digest, which lists
        // the departed node's previous record; over a link without them, it is sent.
        let direct: Vec<NodeId> = match self.db.get(&id) {
            Some(stored) if withdrawal => (stored.record().neighbors.iter())
                .filter(|n| self.db.lists(n, &id))
                .filter(|n| self.stream_to(n).is_some_and(StreamHandle::speaks_digest))
                .copied()
                .collect(),
            _ => Vec::new(),
        };
        self.note_merge(&record);
        let dropped = self.db.dropped();
        let merged = self.db.merge(record);
        if self.db.dropped() != dropped {
            // Records evicted at the cap: one may have been reachable since the last prune.
            self.reach.shrink();
        }
        match merged {
            Merge::Accepted => {
                self.counters.records_accepted += 1;
                self.learned_at.insert(id, Instant::now());
                // Forwarded only if it can matter (reachable, or was); held otherwise. A
                // withdrawal that is forwarded goes at once: it is what tells the mesh that
                // every link to its node is gone.
                let have = source.into_iter().chain(direct).collect();
                let owed = self.owe_or_hold(id, have);
                self.urgent |= withdrawal && owed;
            }
            Merge::Refused => {
                self.counters.records_refused += 1;
                debug!(id = %id.short(), "database full of reachable records; a new record is refused");
            }
            Merge::Stale => {
                self.counters.records_stale += 1;
                // Another copy of a change not yet passed on: its sender has it already. (A
                // record that lost a tie-break at the same version is no copy of it.)
                let current = self
                    .db
                    .get(&id)
                    .is_some_and(|r| r.signed().signature == signature);
                if let (true, Some(source), Some(have)) =
                    (current, source, self.outbox.changed.get_mut(&id))
                {
                    have.insert(source);
                }
            }
        }
        merged
    }

    /// Applies `edit` to the own neighbor set; if it changed anything, bumps the version once,
    /// re-signs and queues the new record for every neighbor. Returns whether it changed.
    pub(super) fn change_own(&mut self, edit: impl FnOnce(&mut BTreeSet<NodeId>) -> bool) -> bool {
        let mut record = self.own.record().clone();
        if !edit(&mut record.neighbors) {
            return false;
        }
        record.version = self.clock.next(record.version + 1);
        self.install_own(record, Publish::Now)
    }

    /// [`Self::change_own`] for a change that needs no haste (dropping a neighbor that
    /// withdrew, which its withdrawal already shows to everyone): the new record is stored and
    /// signed now, and published with the next change of any other kind. There is no timer.
    pub(super) fn change_own_lazily(
        &mut self,
        edit: impl FnOnce(&mut BTreeSet<NodeId>) -> bool,
    ) -> bool {
        let mut record = self.own.record().clone();
        if !edit(&mut record.neighbors) {
            return false;
        }
        record.version = self.clock.next(record.version + 1);
        self.install_own(record, Publish::Lazily)
    }

    pub(super) fn bump_own_above(&mut self, floor: u64) {
        let mut record = self.own.record().clone();
        record.version = self.clock.next(floor.saturating_add(1));
        self.install_own(record, Publish::Now);
    }

    pub(super) fn install_own(&mut self, record: NodeRecord, publish: Publish) -> bool {
        match self.identity.sign_verified(record) {
            Ok(own) => {
                self.own = own;
                self.db.merge(self.own.clone());
                self.learned_at.insert(self.own.id(), Instant::now());
                self.reach.invalidate();
                if publish == Publish::Now {
                    // The newest record goes out now, whatever lazy change it carries.
                    self.outbox.changed.insert(self.own.id(), BTreeSet::new());
                    self.own_unpublished = false;
                } else {
                    self.own_unpublished = true;
                }
                true
            }
            Err(e) => {
                // Only possible past the protocol's neighbor limit, which the pool stays under.
                error!(error = %e, "own record would be invalid; keeping the previous one");
                false
            }
        }
    }

    pub(super) fn status(&self) -> NeighborhoodStatus {
        let me = self.own.id();
        let neighbors = self
            .own
            .record()
            .neighbors
            .iter()
            .map(|id| NeighborStatus {
                node_id: id.to_string(),
                addr: self
                    .db
                    .get(id)
                    .map(|r| r.record().addr.clone())
                    .unwrap_or_default(),
                full: self.db.lists(id, &me),
                // The pool's to tell; the gateway fills it in.
                stream: None,
            })
            .collect();
        let known_nodes = self
            .db
            .records()
            .map(|r| KnownNode {
                node_id: r.id().to_string(),
                addr: r.record().addr.clone(),
                version: r.version(),
                neighbors: r.record().neighbors.iter().map(NodeId::to_string).collect(),
            })
            .collect();
        NeighborhoodStatus {
            node_id: me,
            version: self.own.version(),
            neighbors,
            known_nodes,
            counters: self.counters,
        }
    }
}

/// Where the own record's versions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VersionClock {
    /// Each version is the greater of the previous one + 1 and the wall clock in milliseconds
    /// since the Unix epoch: versions survive a restart without being stored or trusted from
    /// peers, so a replayed record of an earlier life of the key is stale (unless that life
    /// changed its record more often than once a millisecond, or the clock went back: then
    /// the node outbids the replay when it hears of it, as before).
    Wall,
    /// Previous + 1, from 1: for tests that pin versions.
    #[cfg(test)]
    Counter,
}

impl VersionClock {
    /// The version to use, given the least one allowed.
    pub(super) fn next(self, floor: u64) -> u64 {
        match self {
            Self::Wall => floor.max(wall_clock_ms()),
            #[cfg(test)]
            Self::Counter => floor,
        }
    }
}

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
pub(super) fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// When a change of the own record is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Publish {
    /// With this batch's gossip.
    Now,
    /// With the next change of any other kind (or to a neighbor that connects: it is sent the
    /// whole database).
    Lazily,
}

/// The first eight bytes of a record's signature: with its version, enough to tell two
/// records of one id apart (two records at one version differ in their signatures).
pub(super) fn sig_prefix(record: &meshnode_protocol::SignedRecord) -> u64 {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&record.signature[..8]);
    u64::from_be_bytes(prefix)
}

/// Resolves at `at`; never when there is nothing due.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
