//! The neighborhood task's private state and loop.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use meshnode_protocol::ui::{KnownNode, NeighborStatus};
use meshnode_protocol::{Frame, Identity, NodeId, NodeRecord, RecordError, VerifiedRecord};
use meshnode_shutdown::DoneReply;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    GossipCounters, Merge, NeighborhoodMsg, NeighborhoodStatus, NodeDb, USELESS_GOSSIP_BURST,
    USELESS_GOSSIP_RATE,
};
use crate::link::{ConnId, QueueError, StreamHandle};

/// Most messages handled before pending gossip is flushed, so that a burst of changes leaves
/// as one gossip per neighbor while a steady stream of them still gets out promptly.
const MAX_BATCH: usize = 256;
/// How often gossip held back for busy neighbors is tried again when nothing else happens.
const BACKLOG_RETRY: Duration = Duration::from_millis(20);

pub(super) struct Neighborhood {
    identity: Identity,
    db: NodeDb,
    own: VerifiedRecord,
    /// The streams to each immediate neighbor that have connected and not yet disconnected,
    /// oldest first; gossip goes to the newest. The pool admits one stream per neighbor, but a
    /// stream it replaced may still be connecting, in any order relative to its successor.
    streams: HashMap<NodeId, Vec<StreamHandle>>,
    outbox: Outbox,
    counters: GossipCounters,
    /// Immediate neighbors that withdrew from the network: sent nothing more, not redialed.
    departed: HashSet<NodeId>,
    /// For each immediate neighbor, the version of the first record of its own, received over
    /// its own stream, that listed this node: a later one that does not is its withdrawal.
    listed_since: HashMap<NodeId, u64>,
    /// Set once this node withdrew: from then on it changes and gossips nothing.
    withdrawn: bool,
    /// Records owed to neighbors whose send queue was busy, coalesced by record.
    backlog: HashMap<NodeId, BTreeSet<NodeId>>,
    /// When each record now stored was stored.
    learned_at: HashMap<NodeId, Instant>,
    /// How long changes are gathered before they are gossiped.
    window: Duration,
    /// When the changes gathered so far are due to be gossiped.
    flush_at: Option<Instant>,
    /// Status requests of the current batch, answered after its gossip is counted.
    status_replies: Vec<oneshot::Sender<NeighborhoodStatus>>,
    /// Each immediate neighbor's budget of gossip frames that change nothing here.
    useless: HashMap<NodeId, Budget>,
}

/// A token bucket: a burst, refilled at a steady rate.
#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn full() -> Self {
        Self {
            tokens: USELESS_GOSSIP_BURST,
            at: Instant::now(),
        }
    }

    /// Spends one token, after refilling for the time since the last; false when none is left.
    fn spend(&mut self) -> bool {
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

/// Gossip owed at the end of the current batch.
#[derive(Debug, Default)]
struct Outbox {
    /// Records changed since the last gossip, each with the neighbors known to have its new
    /// version already (they sent it here, first or as a copy): they are not sent it again.
    changed: BTreeMap<NodeId, BTreeSet<NodeId>>,
    /// Newly connected neighbors, owed the whole database: their own stored record included,
    /// which, if it is newer than their hello, is from an earlier run of their key that they
    /// must outbid (and otherwise is merely stale there). One set for all of them, encoded once.
    full_sync: BTreeSet<NodeId>,
}

impl Neighborhood {
    pub(super) fn new(identity: Identity, addr: String) -> Result<Self, RecordError> {
        let record = NodeRecord {
            id: identity.id(),
            addr,
            version: 1,
            neighbors: BTreeSet::new(),
        };
        let own = identity.sign_verified(record)?;
        let mut db = NodeDb::new();
        db.merge(own.clone());
        Ok(Self {
            identity,
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
            withdrawn: false,
            status_replies: Vec::new(),
            useless: HashMap::new(),
        })
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
            // Cancellation first: once the node stops, queued work is moot. Then the inbox;
            // then gossip that is due; then, while gossip is held back for busy neighbors, a
            // retry now and then.
            let msg = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                msg = inbox.recv() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                () = sleep_until(self.flush_at) => {
                    self.flush_at = None;
                    self.flush();
                    continue;
                }
                () = tokio::time::sleep(BACKLOG_RETRY), if !self.backlog.is_empty() => {
                    self.flush();
                    continue;
                }
            };
            self.handle(msg);
            for _ in 1..MAX_BATCH {
                match inbox.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
            if self.window.is_zero() {
                self.flush();
            } else if self.flush_at.is_none() && self.owes_gossip() {
                self.flush_at = Some(Instant::now() + self.window);
            }
            self.answer_status();
        }
        debug!("stopped");
    }

    pub(super) fn handle(&mut self, msg: NeighborhoodMsg) {
        match msg {
            NeighborhoodMsg::NeighborConnected { stream, record } => {
                self.neighbor_connected(stream, record)
            }
            NeighborhoodMsg::Gossip { from, records } => self.gossip(from, records),
            NeighborhoodMsg::NeighborDisconnected { conn, peer } => {
                self.neighbor_disconnected(conn, peer)
            }
            NeighborhoodMsg::OwnRecord { reply } => {
                let _ = reply.send(self.own.signed().clone());
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

    fn owes_gossip(&self) -> bool {
        !self.withdrawn && (!self.outbox.changed.is_empty() || !self.outbox.full_sync.is_empty())
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

    /// Drops every outgoing half-neighborship in one change (one version, one signature) and
    /// queues exactly one gossip frame showing it on each immediate neighbor's stream, in the
    /// slot each stream keeps for it. The pool closes the streams behind it once this answers.
    fn withdraw(&mut self, streams: Vec<StreamHandle>, reply: DoneReply) {
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
        let (bodies, _) = Frame::gossip_bodies([self.own.signed()]);
        let mut notified = 0;
        let mut gone = Vec::new();
        for stream in &targets {
            let queued = bodies
                .iter()
                .all(|body| stream.try_send_final(body.clone()).is_ok());
            if queued {
                notified += 1;
                self.counters.frames_sent += bodies.len() as u64;
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
            self.backlog.remove(&peer);
            self.useless.remove(&peer);
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
            useful |= self.merge(record, Some(from)) == Merge::Accepted;
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

    /// A frame from `from` changed nothing here. That happens now and then to any neighbor
    /// (news reaches this node by several paths); a neighbor that does little else is flooding,
    /// and is disconnected once its budget runs out.
    fn useless_gossip(&mut self, from: NodeId) {
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

    /// Whether a record of immediate neighbor `id` at `version`, which does not list this node,
    /// shows that the neighbor withdrew. It must be the newest record of it stored here, and
    /// either come over the neighbor's own stream (a neighbor sends its own record only as it
    /// is now, and lists this node from the first gossip after the handshake), or, relayed by
    /// another neighbor, be newer than a record of its own that listed this node (an older one
    /// may predate the handshake and proves nothing).
    fn is_withdrawal(&self, id: NodeId, from: NodeId, version: u64) -> bool {
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
    fn neighbor_withdrew(&mut self, peer: NodeId) {
        let Some(streams) = self.streams.get(&peer) else {
            return;
        };
        if streams.is_empty() || !self.departed.insert(peer) {
            return;
        }
        if self.change_own(|neighbors| neighbors.remove(&peer)) {
            info!(peer = %peer.short(), "neighbor withdrew from the network; half-neighborship removed");
        }
    }

    fn merge(&mut self, record: VerifiedRecord, source: Option<NodeId>) -> Merge {
        let (id, signature) = (record.id(), record.signed().signature);
        let merged = self.db.merge(record);
        match merged {
            Merge::Accepted => {
                self.counters.records_accepted += 1;
                self.learned_at.insert(id, Instant::now());
                self.outbox.changed.insert(id, source.into_iter().collect());
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
    fn change_own(&mut self, edit: impl FnOnce(&mut BTreeSet<NodeId>) -> bool) -> bool {
        let mut record = self.own.record().clone();
        if !edit(&mut record.neighbors) {
            return false;
        }
        record.version += 1;
        self.install_own(record)
    }

    fn bump_own_above(&mut self, floor: u64) {
        let mut record = self.own.record().clone();
        record.version = floor + 1;
        self.install_own(record);
    }

    fn install_own(&mut self, record: NodeRecord) -> bool {
        match self.identity.sign_verified(record) {
            Ok(own) => {
                self.own = own;
                self.db.merge(self.own.clone());
                self.outbox.changed.insert(self.own.id(), BTreeSet::new());
                true
            }
            Err(e) => {
                // Only possible past the protocol's neighbor limit, which the pool stays under.
                error!(error = %e, "own record would be invalid; keeping the previous one");
                false
            }
        }
    }

    /// Sends what the batch changed: the whole database to newly connected neighbors, and to
    /// every other neighbor the changed records it did not itself send, together with anything
    /// held back for it earlier. A neighbor whose queue is busy gets nothing now: what it is owed
    /// is coalesced (by record, so it never outgrows the database) and sent once its queue has
    /// drained. Each distinct set of records is encoded once.
    pub(super) fn flush(&mut self) {
        let outbox = std::mem::take(&mut self.outbox);
        if self.withdrawn {
            self.backlog.clear();
            return;
        }
        if outbox.changed.is_empty() && outbox.full_sync.is_empty() && self.backlog.is_empty() {
            return;
        }
        // Each distinct set of records is encoded once: its bodies, each marked with how many
        // of the set's records come up to its end.
        let mut encoded: HashMap<Vec<NodeId>, Vec<(Bytes, usize)>> = HashMap::new();
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
                self.db.records().map(VerifiedRecord::id).collect()
            } else {
                outbox
                    .changed
                    .iter()
                    .filter(|(_, have)| !have.contains(peer))
                    .map(|(id, _)| *id)
                    .collect()
            };
            if let Some(owed) = self.backlog.remove(peer) {
                ids.extend(owed);
            }
            if ids.is_empty() {
                continue;
            }
            if stream.is_busy() {
                self.counters.deferred += 1;
                self.backlog.insert(*peer, ids);
                continue;
            }
            let db = &self.db;
            let key: Vec<NodeId> = ids.into_iter().collect();
            let bodies = encoded.entry(key.clone()).or_insert_with_key(|ids| {
                Frame::gossip_bodies_marked(
                    ids.iter().filter_map(|id| db.get(id)).map(|r| r.signed()),
                )
                .0
            });
            let mut sent = 0;
            for (body, mark) in bodies.iter() {
                match stream.try_send(body.clone()) {
                    Ok(()) => {
                        self.counters.frames_sent += 1;
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

/// Resolves at `at`; never when there is nothing due.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
