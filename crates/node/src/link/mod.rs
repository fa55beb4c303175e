//! The link layer: what the neighborhood and the stream handler pool both need to know about
//! one neighbor link (its id, its send queue, how to close it), below both so that neither
//! imports the other for it; and the link itself: the authenticated, encrypted, versioned
//! handshake ([`handshake`]) and the encrypted transport after it ([`transport`]).

pub mod handshake;
#[cfg(test)]
mod tests;
pub mod transport;

pub use handshake::{HandshakeError, LocalLink, Negotiated, handshake};
pub use transport::{LinkCodec, LinkItem, LinkWriter, next_inbound};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use meshnode_protocol::NodeId;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

/// How many frames may wait for one stream's writer.
pub const WRITER_QUEUE: usize = 32;
/// How many gossip frames may wait for one stream's writer; the remaining slot is kept for the
/// withdrawal.
pub const GOSSIP_QUEUE_LIMIT: usize = WRITER_QUEUE - 1;
/// With this many frames waiting, a stream is busy: the neighborhood holds its gossip back and
/// coalesces it until the queue drains, rather than block, drop gossip or pile up frames.
pub const BUSY_AT: usize = WRITER_QUEUE / 2;

/// Identifies one stream for its whole life; never reused within a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the stream's send queue is full")]
    Full,
    #[error("the stream is closed")]
    Closed,
}

/// The sending side of one admitted stream: queue frames, close the stream after them, or kill
/// it. Cloneable; the pool and the neighborhood each hold one.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    id: ConnId,
    peer: NodeId,
    queue: mpsc::Sender<Bytes>,
    /// Ends the stream at once.
    pub(crate) cancel: CancellationToken,
    /// Asks the writer to write what is queued, then shut the write half down.
    pub(crate) drain: CancellationToken,
    /// Set when the neighbor withdrew from the network, so that its dialer does not redial it.
    departed: Arc<AtomicBool>,
    /// Set once this node's last frames are in the queue (after they are put there).
    final_queued: Arc<AtomicBool>,
    /// The address of the last frame's bytes, set before it is queued (0: none): the writer,
    /// having written the frame whose bytes start there, shuts the write half down in the same
    /// step, so that frame and FIN leave together without waiting for
    /// [`StreamHandle::close`]. Frames alive at the same time never share an address.
    final_frame: Arc<AtomicUsize>,
    /// Whether the link settled on the digest feature: digests may go both ways.
    digest: bool,
}

impl StreamHandle {
    /// A handle and the queue its writer reads; `cancel` ends the stream.
    pub(crate) fn new(
        id: ConnId,
        peer: NodeId,
        cancel: CancellationToken,
    ) -> (Self, mpsc::Receiver<Bytes>) {
        let (queue, rx) = mpsc::channel(WRITER_QUEUE);
        let handle = Self {
            id,
            peer,
            queue,
            cancel,
            drain: CancellationToken::new(),
            departed: Arc::default(),
            final_queued: Arc::default(),
            final_frame: Arc::default(),
            digest: false,
        };
        (handle, rx)
    }

    /// The handle of a link that settled on the digest feature (or not).
    pub(crate) fn with_digest(mut self, digest: bool) -> Self {
        self.digest = digest;
        self
    }

    /// Whether this link may carry digests.
    pub fn speaks_digest(&self) -> bool {
        self.digest
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Queues a gossip frame body without waiting. Fails with [`QueueError::Full`] once
    /// [`GOSSIP_QUEUE_LIMIT`] frames wait: the last slot is kept for the withdrawal.
    pub fn try_send(&self, body: Bytes) -> Result<(), QueueError> {
        if self.queue.capacity() <= WRITER_QUEUE - GOSSIP_QUEUE_LIMIT {
            return if self.queue.is_closed() {
                Err(QueueError::Closed)
            } else {
                Err(QueueError::Full)
            };
        }
        self.send(body)
    }

    /// Whether [`BUSY_AT`] or more frames wait: the neighbor is not keeping up for now.
    pub fn is_busy(&self) -> bool {
        WRITER_QUEUE - self.queue.capacity() >= BUSY_AT
    }

    /// Queues the last frames this node will send on the stream (the withdrawal: one frame in
    /// practice), using the slot that [`StreamHandle::try_send`] leaves free, so that a busy
    /// queue cannot cost a neighbor the news that this node is leaving. The writer writes what
    /// is queued before them, then them, then shuts the write half down at once (the neighbor
    /// reads the frames, then EOF): nothing may be queued after them.
    pub fn try_send_final(&self, bodies: &[Bytes]) -> Result<(), QueueError> {
        // Before it is queued, so that the writer, which takes it after, always knows it.
        if let Some(last) = bodies.last() {
            self.final_frame
                .store(last.as_ptr() as usize, Ordering::Release);
        }
        for body in bodies {
            self.send(body.clone())?;
        }
        self.final_queued.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether this node's last frames were queued on the stream: the neighborhood has
    /// withdrawn from the network, and takes no more notice of streams that end.
    pub(crate) fn final_queued(&self) -> bool {
        self.final_queued.load(Ordering::Acquire)
    }

    /// Whether `body`, the frame the writer has just taken from `queue`, was this node's last
    /// one on the stream (and nothing waits behind it).
    pub(crate) fn took_final(&self, body: &Bytes, queue: &mpsc::Receiver<Bytes>) -> bool {
        self.final_frame.load(Ordering::Acquire) == body.as_ptr() as usize && queue.is_empty()
    }

    fn send(&self, body: Bytes) -> Result<(), QueueError> {
        self.queue.try_send(body).map_err(|e| match e {
            TrySendError::Full(_) => QueueError::Full,
            TrySendError::Closed(_) => QueueError::Closed,
        })
    }

    /// Closes the stream gracefully: every frame queued so far is written, then the write half
    /// is shut down (the neighbor sees EOF after them). Never waits.
    pub fn close(&self) {
        self.drain.cancel();
    }

    /// Ends the stream now: reader and writer stop, queued frames are dropped.
    pub fn kill(&self) {
        self.cancel.cancel();
    }

    /// Records that the neighbor withdrew from the network: when this stream ends, its dialer
    /// (if this node dialed it) waits a while before dialing again.
    pub(crate) fn mark_departed(&self) {
        self.departed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn departed(&self) -> bool {
        self.departed.load(Ordering::Relaxed)
    }
}
