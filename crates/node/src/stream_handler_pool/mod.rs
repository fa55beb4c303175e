//! The stream handler pool: sole owner of the TCP streams to immediate neighbors. It accepts
//! and dials them, runs the handshake, admits one stream per neighbor, and gives each admitted
//! stream a reader (feeding the neighborhood) and a writer (fed by a bounded queue).

mod connection;
mod dialer;
mod limits;
mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshnode_protocol::{NodeId, VerifyCache};
use meshnode_shutdown::DoneReply;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::link::{ConnId, LocalLink, StreamHandle};
use crate::neighborhood::NeighborhoodHandle;
pub use limits::{Limits, MAX_HANDSHAKES, RESERVED_FDS};

/// How many messages may wait in the pool's inbox.
pub const POOL_INBOX: usize = 1024;
/// How long a dialer leaves a neighbor that withdrew from the network alone before it tries
/// again (at its slowest pace), in case the neighbor has come back.
pub const DEPARTED_COOLDOWN: Duration = Duration::from_secs(60);
/// Longest a new stream may take for its handshake and first frame each way.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A neighbor silent this long is dropped as crashed. Fifteen seconds: three keepalive intervals
/// of five, so two lost or late keepalives are tolerated, while a frozen neighbor is noticed
/// in about the time memberlist's default suspicion takes, well before a TCP retransmission
/// timeout would (minutes).
pub const DEFAULT_NEIGHBOR_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest one dial may take to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Most admitted streams whatever the descriptor limit (which usually sets a lower cap: see
/// [`Limits`]); more are refused. Kept below the protocol's limit on neighbors per record.
pub const MAX_STREAMS: usize = 8_000;
/// Bad frames (malformed, oversized, forged records, out of turn) a neighbor may send over one
/// stream before it is disconnected.
pub const MAX_STRIKES: u32 = 16;

/// How many verified records each node remembers, to skip checking their copies again.
const VERIFY_CACHE: usize = 16_384;

/// Stream and frame counters since start, and the streams the pool holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolCounters {
    pub frames_malformed: u64,
    pub frames_oversized: u64,
    pub records_rejected: u64,
    pub peers_disconnected_for_abuse: u64,
    pub streams_open: u64,
    pub streams_accepted: u64,
    pub streams_dialed: u64,
    pub streams_refused: u64,
    pub handshakes_refused: u64,
    pub handshakes_failed: u64,
    pub frames_unknown: u64,
    pub peers_timed_out: u64,
    /// The admitted stream to each immediate neighbor, and whether this node dialed it.
    pub admitted: Vec<(NodeId, bool)>,
}

/// The live counters, shared by the pool with its own stream tasks only.
#[derive(Debug, Default)]
struct Counters {
    frames_malformed: AtomicU64,
    frames_oversized: AtomicU64,
    records_rejected: AtomicU64,
    peers_disconnected_for_abuse: AtomicU64,
    streams_open: AtomicU64,
    streams_accepted: AtomicU64,
    streams_dialed: AtomicU64,
    streams_refused: AtomicU64,
    handshakes_refused: AtomicU64,
    handshakes_failed: AtomicU64,
    frames_unknown: AtomicU64,
    peers_timed_out: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> PoolCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolCounters {
            frames_malformed: get(&self.frames_malformed),
            frames_oversized: get(&self.frames_oversized),
            records_rejected: get(&self.records_rejected),
            peers_disconnected_for_abuse: get(&self.peers_disconnected_for_abuse),
            streams_open: get(&self.streams_open),
            streams_accepted: get(&self.streams_accepted),
            streams_dialed: get(&self.streams_dialed),
            streams_refused: get(&self.streams_refused),
            handshakes_refused: get(&self.handshakes_refused),
            handshakes_failed: get(&self.handshakes_failed),
            frames_unknown: get(&self.frames_unknown),
            peers_timed_out: get(&self.peers_timed_out),
            admitted: Vec::new(),
        }
    }
}

/// The pool's answer to a stream that finished its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Another stream to the same neighbor is preferred; this one closes.
    Duplicate,
    /// The pool holds [`MAX_STREAMS`] streams already.
    Full,
    /// The node is shutting down and takes no new neighbors.
    ShuttingDown,
}

/// Messages the pool task handles.
#[derive(Debug)]
pub enum PoolMsg {
    /// A stream passed its handshake and asks to be admitted as the stream to its peer.
    Admit {
        stream: StreamHandle,
        dialed: bool,
        reply: oneshot::Sender<Admission>,
    },
    /// An admitted stream has ended.
    Closed { conn: ConnId, peer: NodeId },
    /// Answers once no admitted stream to `peer` remains.
    WaitPeerGone {
        peer: NodeId,
        reply: oneshot::Sender<()>,
    },
    /// Stream and frame counters for the status payload.
    Counters {
        reply: oneshot::Sender<PoolCounters>,
    },
    /// Run an already connected stream (of any transport) as if it had been accepted.
    Adopt { stream: BoxedStream },
    /// Withdraw from the network and close every stream: stop intake, have the neighborhood
    /// gossip the withdrawal, close each stream after it, wait for the streams to end, then
    /// answer `reply` with the neighborhood's done nested in the pool's. By `deadline` it
    /// answers whatever happens, with a late report for each part still out. `waiting` is
    /// kept current with the names of the streams it still waits for, so that a report the
    /// gateway must write without the pool's answer (a loaded machine can delay that answer
    /// past the gateway's own deadline) still names them.
    Shutdown {
        reply: DoneReply,
        deadline: Instant,
        waiting: watch::Sender<Vec<String>>,
    },
    /// Panics the task, as a bug would.
    #[cfg(test)]
    Crash,
}

/// Any bidirectional byte stream the pool can run a neighbor over.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AsyncStream for T {}

/// A stream of any transport, for [`PoolMsg::Adopt`].
pub type BoxedStream = Box<dyn AsyncStream>;

impl fmt::Debug for dyn AsyncStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AsyncStream")
    }
}

/// The pool task has stopped and can no longer answer.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the stream handler pool has stopped")]
pub struct PoolGone;

/// A cloneable handle for talking to the pool task.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    tx: mpsc::Sender<PoolMsg>,
}

impl PoolHandle {
    /// A handle whose messages go to `tx`, for tests that play this subsystem themselves.
    #[cfg(test)]
    pub(crate) fn from_sender(tx: mpsc::Sender<PoolMsg>) -> Self {
        Self { tx }
    }

    pub async fn send(&self, msg: PoolMsg) -> Result<(), PoolGone> {
        self.tx.send(msg).await.map_err(|_| PoolGone)
    }

    /// Completes when the pool task has ended (stopped, or panicked).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    pub async fn counters(&self) -> Result<PoolCounters, PoolGone> {
        let (reply, rx) = oneshot::channel();
        self.send(PoolMsg::Counters { reply }).await?;
        rx.await.map_err(|_| PoolGone)
    }
}

/// What every stream task of one pool shares.
#[derive(Debug, Clone)]
struct Shared {
    me: NodeId,
    /// This node's side of every handshake.
    link: Arc<LocalLink>,
    limits: Limits,
    /// One permit per accepted connection still in its handshake ([`Limits::max_handshakes`]).
    handshakes: Arc<tokio::sync::Semaphore>,
    /// One permit per large gossip frame being verified on the blocking pool, shared by every
    /// node of the process that was given the same [`Verifiers`].
    verifiers: Verifiers,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    /// Cancelled when the node stops; each stream's token is a child of it.
    cancel: CancellationToken,
    /// Cancelled when the pool stops taking on neighbors: dialers stop dialing.
    intake: CancellationToken,
    tracker: TaskTracker,
    counters: Arc<Counters>,
    next_conn: Arc<AtomicU64>,
    /// Records whose signatures checked out, so that copies from other neighbors are not
    /// checked again.
    verified: Arc<VerifyCache>,
}

impl Shared {
    fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }
}

/// The permits to check large gossip frames on tokio's blocking pool: one per core, by default.
///
/// Cores belong to the process, not to a node, so a process that runs many nodes in one
/// runtime (the benchmarks run a thousand, the demo a mesh) gives them all one `Verifiers`
/// (clones share the permits; see [`Config::verifiers`](crate::Config::verifiers)). Were each
/// node to let one check per core run, a thousand nodes would grow tokio's blocking pool to its
/// 512 threads, the kernel would share the cores among them and the runtime's workers alike,
/// and the workers, which run every node's streams, keepalives, handshakes and statuses, would
/// get a few hundredths of the machine: links time out, handshakes fail, statuses go
/// unanswered. With one permit per core the checks wait their turn (back-pressure to the
/// sockets of the frames they hold) and the workers keep their share.
#[derive(Debug, Clone)]
pub struct Verifiers(Arc<tokio::sync::Semaphore>);

impl Verifiers {
    /// One permit per core of the machine (as the standard library counts them).
    pub fn for_cores() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// `permits` checks at a time (at least one).
    pub fn new(permits: usize) -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(permits.max(1))))
    }

    /// Whether `other` shares these permits.
    pub fn shares_with(&self, other: &Verifiers) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Permits free at this moment.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    async fn acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().acquire_owned().await.ok()
    }
}

impl Default for Verifiers {
    fn default() -> Self {
        Self::for_cores()
    }
}

/// Starts the pool on an already bound listener, dialing each of `neighbors` (`HOST:PORT`);
/// `link` is this node's side of every handshake; `verifiers` bounds the large frames checked on
/// the blocking pool at once.
pub fn spawn(
    link: LocalLink,
    verifiers: Verifiers,
    listener: TcpListener,
    neighbors: Vec<String>,
    neighborhood: NeighborhoodHandle,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> PoolHandle {
    let me = link.id();
    let (tx, rx) = mpsc::channel(POOL_INBOX);
    let handle = PoolHandle { tx };
    let limits = Limits::for_this_process();
    let shared = Shared {
        me,
        link: Arc::new(link),
        limits,
        handshakes: Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes)),
        verifiers,
        neighborhood,
        pool: handle.clone(),
        intake: cancel.child_token(),
        cancel,
        tracker: tracker.clone(),
        counters: Arc::default(),
        next_conn: Arc::new(AtomicU64::new(1)),
        verified: Arc::new(VerifyCache::new(VERIFY_CACHE)),
    };
    for target in neighbors {
        let span = tracing::info_span!("dialer", node = %me.short(), %target);
        tracker.spawn(dialer::run(shared.clone(), target).instrument(span));
    }
    let span = tracing::info_span!("stream_handler_pool", node = %me.short());
    tracker.spawn(state::Pool::new(shared, listener).run(rx).instrument(span));
    handle
}
