//! One stream's life: handshake, admission, then a reader (this task) and a writer (a task of
//! its own that owns the write half and drains the stream's queue).

use bytes::Bytes;
use futures::StreamExt;
use meshnode_protocol::{
    Frame, FrameError, Inbound, RecordError, VerifiedRecord, WireFrame, WireRecord,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use std::time::Duration;

use super::{Admission, Counters, HANDSHAKE_TIMEOUT, MAX_STRIKES, PoolMsg, Shared, StreamHandle};
use crate::link::handshake::FEATURE_DIGEST;
use crate::link::{HandshakeError, LinkCodec, LinkItem, LinkWriter, Negotiated, handshake};
use crate::neighborhood::NeighborhoodMsg;
use meshnode_protocol::NodeId;

/// How a stream task ended, for the dialer that may have started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ended {
    /// The handshake failed or the stream was not admitted; nothing reached the neighborhood.
    NotAdmitted(String),
    /// Another stream to this peer is preferred.
    Duplicate(NodeId),
    /// The stream was admitted and has now ended.
    Closed(NodeId),
    /// The stream was admitted and has now ended, after the neighbor withdrew from the network.
    Departed(NodeId),
    /// The node is stopping.
    Cancelled,
}

/// Runs a stream from handshake to end. `dialed` is true when this node dialed it (and so
/// starts the handshake).
/// An accepted stream holds `permit`, one of the node's handshakes in progress, until its
/// handshake is over.
pub(super) async fn run<S>(
    shared: Shared,
    stream: S,
    dialed: bool,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let cancel = shared.cancel.child_token();

    let setup = tokio::time::timeout(HANDSHAKE_TIMEOUT, setup(&shared, read, write, dialed));
    let setup = async move {
        let result = setup.await;
        drop(permit);
        result
    };
    let (link, record, mut reader, writer) = match cancel.run_until_cancelled(setup).await {
        None => return Ended::Cancelled,
        Some(Err(_)) => {
            Counters::bump(&shared.counters.handshakes_failed);
            return not_admitted("no handshake within the handshake timeout".into());
        }
        Some(Ok(Err(e))) => {
            if e.is_refusal() {
                Counters::bump(&shared.counters.handshakes_refused);
            } else {
                Counters::bump(&shared.counters.handshakes_failed);
            }
            e.log();
            return Ended::NotAdmitted(e.to_string());
        }
        Some(Ok(Ok(set_up))) => set_up,
    };
    let peer = record.id();
    let conn = shared.next_conn_id();
    let (handle, queue) = StreamHandle::new(conn, peer, cancel.clone());
    let handle = handle.with_digest(link.features & FEATURE_DIGEST != 0);

    let (reply, admission) = oneshot::channel();
    let admit = PoolMsg::Admit {
        stream: handle.clone(),
        dialed,
        reply,
    };
    if shared.pool.send(admit).await.is_err() {
        return Ended::Cancelled;
    }
    match cancel.run_until_cancelled(admission).await {
        Some(Ok(Admission::Admitted)) => {}
        Some(Ok(Admission::Duplicate)) => return Ended::Duplicate(peer),
        Some(Ok(Admission::Full)) => return not_admitted("the pool is full".into()),
        Some(Ok(Admission::ShuttingDown)) => {
            return not_admitted("the node is shutting down".into());
        }
        // Killed before it heard the answer, with the node still running: the pool admitted it
        // and then a preferred stream to the same peer replaced it.
        None if !shared.cancel.is_cancelled() => return Ended::Duplicate(peer),
        None | Some(Err(_)) => return Ended::Cancelled,
    }

    let _open = OpenGauge::new(&shared.counters);
    let span = tracing::info_span!("writer", %conn);
    shared.tracker.spawn(
        write_loop(writer, queue, handle.clone(), link.keepalive_interval()).instrument(span),
    );
    let connected = NeighborhoodMsg::NeighborConnected {
        stream: handle.clone(),
        record,
    };
    let reason = if shared.neighborhood.send(connected).await.is_err() {
        "the neighborhood has stopped".to_owned()
    } else {
        read_loop(&shared, &mut reader, &handle, &link, &cancel).await
    };
    info!(peer = %peer.short(), %conn, %reason, "stream ended");
    cancel.cancel();
    // A stream that carried this node's withdrawal ends after the neighborhood has withdrawn,
    // which ignores it: at the end of a shutdown, one message per stream less to hand over
    // while other neighbors still wait for their EOF.
    if !handle.final_queued() {
        let _ = shared
            .neighborhood
            .send(NeighborhoodMsg::NeighborDisconnected { conn, peer })
            .await;
    }
    let _ = shared.pool.send(PoolMsg::Closed { conn, peer }).await;
    if shared.cancel.is_cancelled() {
        Ended::Cancelled
    } else if handle.departed() {
        Ended::Departed(peer)
    } else {
        Ended::Closed(peer)
    }
}

fn not_admitted(reason: String) -> Ended {
    debug!(%reason, "stream not admitted");
    Ended::NotAdmitted(reason)
}

/// Why a new stream did not become a link to a proven neighbor.
#[derive(Debug, thiserror::Error)]
pub(super) enum SetupError {
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("the neighborhood has stopped")]
    NeighborhoodGone,
    #[error("cannot send the first frame: {0}")]
    Send(std::io::Error),
    #[error("cannot read the first frame: {0}")]
    Read(std::io::Error),
    #[error("the peer closed the link before its first frame")]
    Closed,
    #[error("the peer's first frame is not its record: {0}")]
    BadHello(&'static str),
    #[error("the peer's record does not verify: {0}")]
    BadRecord(#[from] RecordError),
}

impl SetupError {
    /// Whether the peer was refused for what it claimed (a proof that fails, this node's own
    /// id, no common version, a record that is not its own) rather than lost on the way.
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Handshake(
                HandshakeError::BadProof
                    | HandshakeError::BadKey
                    | HandshakeError::OwnId
                    | HandshakeError::NoCommonVersion { .. },
            ) | Self::BadHello(_)
                | Self::BadRecord(_)
        )
    }

    /// Logs why: a refusal is worth a line at info, the rest (a port scan, a peer that hung
    /// up) only at debug.
    fn log(&self) {
        if self.is_refusal() {
            info!(reason = %self, "neighbor refused");
        } else {
            debug!(reason = %self, "stream not admitted");
        }
    }
}

type SetUp<R, W> = (
    Negotiated,
    VerifiedRecord,
    FramedRead<R, LinkCodec>,
    LinkWriter<W>,
);

/// The handshake, then the first frame each way: the node's own signed record, sent only now
/// that the peer has proven its id, and encrypted. The two are sent and read at the same time,
/// so that two large records cannot deadlock on full socket buffers.
async fn setup<R, W>(
    shared: &Shared,
    read: R,
    write: W,
    dialed: bool,
) -> Result<SetUp<R, W>, SetupError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (link, mut reader, mut writer) = handshake(read, write, dialed, &shared.link).await?;
    if link.version != shared.link.versions.1 || link.peer_is_newer() {
        debug!(peer = %link.peer.short(), version = link.version, peer_versions = ?link.peer_versions, "link version negotiated");
    }
    let own = shared
        .neighborhood
        .own_record()
        .await
        .map_err(|_| SetupError::NeighborhoodGone)?;
    let hello = Frame::hello_body(&own)
        .map_err(|_| SetupError::BadHello("this node's own record does not fit a frame"))?;
    let send = async { writer.send_frame(&hello).await.map_err(SetupError::Send) };
    let receive = async {
        loop {
            let body = match reader.next().await {
                Some(Ok(LinkItem::Progress)) => continue,
                Some(Ok(LinkItem::Inbound(Inbound::Frame(body)))) => body,
                Some(Ok(LinkItem::Inbound(Inbound::Oversized { .. }))) => {
                    return Err(SetupError::BadHello("oversized"));
                }
                Some(Err(e)) => return Err(SetupError::Read(e)),
                None => return Err(SetupError::Closed),
            };
            return match WireFrame::decode(&body) {
                Ok(WireFrame::Hello(record)) => {
                    if record.id() != link.peer {
                        return Err(SetupError::BadHello("the record of another node"));
                    }
                    Ok(record.into_verified()?)
                }
                Ok(_) => Err(SetupError::BadHello("another frame type")),
                Err(_) => Err(SetupError::BadHello("malformed")),
            };
        }
    };
    let ((), record) = tokio::try_join!(send, receive)?;
    Ok((link, record, reader, writer))
}

/// Reads frames until the stream ends, is cancelled, or the peer has sent too much garbage.
/// Returns why it stopped.
async fn read_loop<R>(
    shared: &Shared,
    reader: &mut FramedRead<R, LinkCodec>,
    stream: &StreamHandle,
    link: &Negotiated,
    cancel: &CancellationToken,
) -> String
where
    R: AsyncRead + Unpin,
{
    let counters = &shared.counters;
    let peer = stream.peer();
    let mut strikes = 0u32;
    loop {
        // Silence is measured only while waiting to read: time spent handing a frame to a busy
        // neighborhood is not the peer's.
        let next = tokio::time::timeout(shared.link.idle_timeout, reader.next());
        let item = match cancel.run_until_cancelled(next).await {
            None => return "closed by this node".to_owned(),
            Some(Err(_)) => {
                Counters::bump(&counters.peers_timed_out);
                warn!(peer = %peer.short(), timeout = ?shared.link.idle_timeout, "neighbor silent for too long; dropping it as crashed");
                return format!(
                    "nothing from the neighbor for {:?}",
                    shared.link.idle_timeout
                );
            }
            Some(Ok(item)) => item,
        };
        shrink(reader.read_buffer_mut());
        let item = match item {
            Some(Ok(LinkItem::Progress)) => continue,
            Some(Ok(LinkItem::Inbound(inbound))) => Some(Ok(inbound)),
            Some(Err(e)) => Some(Err(e)),
            None => None,
        };
        let strike = match item {
            None => return "end of stream".to_owned(),
            Some(Err(e)) => {
                Counters::bump(&counters.frames_malformed);
                return format!("read failed: {e}");
            }
            Some(Ok(Inbound::Oversized { len })) => {
                Counters::bump(&counters.frames_oversized);
                debug!(len, "oversized frame skipped");
                true
            }
            Some(Ok(Inbound::Frame(body))) => match WireFrame::decode(&body) {
                Ok(WireFrame::Gossip(records)) => {
                    let total = records.len();
                    let Some(verified) = cancel.run_until_cancelled(verify(shared, records)).await
                    else {
                        return "closed by this node".to_owned();
                    };
                    let rejected = total - verified.len();
                    for _ in 0..rejected {
                        Counters::bump(&counters.records_rejected);
                    }
                    if rejected > 0 {
                        debug!(rejected, "records with bad signatures dropped");
                    }
                    // The neighbor's own record without this node in it: it withdrew. Noted
                    // here, before its EOF can arrive, so that its dialer does not redial it.
                    if verified
                        .iter()
                        .any(|r| r.id() == peer && !r.record().neighbors.contains(&shared.me))
                    {
                        stream.mark_departed();
                    }
                    let gossip = NeighborhoodMsg::Gossip {
                        from: peer,
                        records: verified,
                    };
                    if shared.neighborhood.send(gossip).await.is_err() {
                        return "the neighborhood has stopped".to_owned();
                    }
                    rejected > 0
                }
                Ok(WireFrame::Hello(_)) => {
                    Counters::bump(&counters.frames_malformed);
                    debug!("hello out of turn");
                    true
                }
                Ok(WireFrame::Digest(digest)) if stream.speaks_digest() => {
                    let msg = NeighborhoodMsg::Digest { from: peer, digest };
                    if shared.neighborhood.send(msg).await.is_err() {
                        return "the neighborhood has stopped".to_owned();
                    }
                    false
                }
                // A digest on a link that did not settle on the feature: from a newer peer,
                // an optional frame skipped; from any other, a bad frame.
                Ok(WireFrame::Digest(_)) if link.peer_is_newer() => {
                    Counters::bump(&counters.frames_unknown);
                    debug!("digest on a link without the feature skipped");
                    false
                }
                Ok(WireFrame::Digest(_)) => {
                    Counters::bump(&counters.frames_malformed);
                    debug!("digest on a link without the feature");
                    true
                }
                Err(FrameError::UnknownType(kind)) if link.peer_is_newer() => {
                    Counters::bump(&counters.frames_unknown);
                    debug!(kind, "frame of a newer version skipped");
                    false
                }
                Err(e) => {
                    Counters::bump(&counters.frames_malformed);
                    debug!(error = %e, "malformed frame dropped");
                    true
                }
            },
        };
        if strike {
            strikes += 1;
            if strikes >= MAX_STRIKES {
                Counters::bump(&counters.peers_disconnected_for_abuse);
                warn!(peer = %peer.short(), strikes, "neighbor sends too many bad frames; disconnecting");
                return "too many bad frames".to_owned();
            }
        }
    }
}

/// Records of a gossip frame checked inline, on the runtime worker; a frame with more goes to
/// the blocking pool (see [`verify`]).
const INLINE_VERIFY: usize = 4;

/// The records of `records` whose signatures check out. A few are checked inline. More (a
/// 1 MiB frame holds thousands: tens of milliseconds of signature checks) are checked with
/// `spawn_blocking`, so that they never hold a runtime worker while other streams, the UI and
/// the neighborhood wait; at most [`Shared::verifiers`] frames of the whole process at a time (one per
/// core), so a flood of fresh keys costs the node its spare cores, not its threads, and the
/// flooding streams wait for their turn (back-pressure to their sockets). Not ed25519-dalek's
/// batch verification: it is not `verify_strict` (it accepts what strict checking refuses) and
/// it would not tell which record of a batch is forged.
async fn verify(shared: &Shared, records: Vec<WireRecord>) -> Vec<VerifiedRecord> {
    if records.len() <= INLINE_VERIFY {
        return records
            .into_iter()
            .filter_map(|r| shared.verified.verify(r).ok())
            .collect();
    }
    let Some(permit) = shared.verifiers.acquire().await else {
        return Vec::new();
    };
    let cache = shared.verified.clone();
    let check = move || {
        let _permit = permit;
        records
            .into_iter()
            .filter_map(|r| cache.verify(r).ok())
            .collect::<Vec<_>>()
    };
    // A panic inside the check (a bug) loses this frame's records, never the stream.
    tokio::task::spawn_blocking(check).await.unwrap_or_default()
}

/// Drains the stream's queue into the link, in order, until cancelled, asked to close, or
/// past this node's last frame ([`StreamHandle::try_send_final`]). Closing writes everything
/// queued before it, then shuts the write half down, so the neighbor reads every frame this
/// node handed over before it reads EOF. A link with nothing to
/// send for `keepalive` sends a keepalive, so that the neighbor knows this node is alive.
async fn write_loop<W>(
    mut writer: LinkWriter<W>,
    mut queue: mpsc::Receiver<Bytes>,
    stream: StreamHandle,
    keepalive: Duration,
) where
    W: AsyncWrite + Unpin,
{
    let (cancel, drain) = (stream.cancel.clone(), stream.drain.clone());
    let result = loop {
        // Cancellation first; then closing, which itself writes out everything still queued;
        // then frames; a keepalive only when the queue stayed empty for its whole interval.
        let body = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = drain.cancelled() => break close(&mut writer, &mut queue, &cancel).await,
            body = queue.recv() => match body {
                Some(body) => body,
                None => return,
            },
            () = tokio::time::sleep(keepalive) => {
                match cancel.run_until_cancelled(writer.keepalive()).await {
                    None => return,
                    Some(Ok(())) => continue,
                    Some(Err(e)) => break Err(e),
                }
            }
        };
        match cancel.run_until_cancelled(writer.send_frame(&body)).await {
            None => return,
            Some(Ok(())) => {}
            Some(Err(e)) => break Err(e),
        }
        // The withdrawal is this node's last frame: shut the write half down right behind it,
        // in this same wake-up, so that it leaves with the FIN and the neighbor reads both in
        // one go, without waiting for the pool to close the stream.
        if stream.took_final(&body, &queue) {
            break close(&mut writer, &mut queue, &cancel).await;
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "write failed; ending the stream");
        cancel.cancel();
    }
}

/// Writes what is queued, in order, then shuts the write half down.
async fn close<W>(
    writer: &mut LinkWriter<W>,
    queue: &mut mpsc::Receiver<Bytes>,
    cancel: &CancellationToken,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    // No frame can be queued after this, and every frame queued before it is still received.
    queue.close();
    let close = async {
        while let Some(body) = queue.recv().await {
            writer.send_frame(&body).await?;
        }
        writer.shutdown().await
    };
    cancel.run_until_cancelled(close).await.unwrap_or(Ok(()))
}

/// Largest buffer an idle stream keeps; a larger, empty one is given back.
const IDLE_BUFFER: usize = 8 * 1024;

fn shrink(buffer: &mut bytes::BytesMut) {
    if buffer.is_empty() && buffer.capacity() > IDLE_BUFFER {
        *buffer = bytes::BytesMut::new();
    }
}

/// Counts a stream as open for as long as it lives.
struct OpenGauge<'a>(&'a Counters);

impl<'a> OpenGauge<'a> {
    fn new(counters: &'a Counters) -> Self {
        Counters::bump(&counters.streams_open);
        Self(counters)
    }
}

impl Drop for OpenGauge<'_> {
    fn drop(&mut self) {
        self.0
            .streams_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
