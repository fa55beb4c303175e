//! One stream's life: handshake, admission, then a reader (this task) and a writer (a task of
//! its own that owns the write half and drains the stream's queue).

use bytes::{Buf, Bytes};
use futures::{SinkExt, StreamExt};
use meshnode_protocol::{
    Frame, FrameCodec, Inbound, PROTOCOL_VERSION, VerifiedRecord, frame_header,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Admission, Counters, HANDSHAKE_TIMEOUT, MAX_STRIKES, PoolMsg, Shared, StreamHandle};
use crate::neighborhood::NeighborhoodMsg;
use meshnode_protocol::NodeId;

/// Longest the writer holds this node's last frame waiting for the close, before sending it
/// alone.
const FINAL_HOLD: Duration = Duration::from_millis(20);

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

/// Runs a stream from handshake to end. `dialed` is true when this node dialed it.
pub(super) async fn run<S>(shared: Shared, stream: S, dialed: bool) -> Ended
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let mut reader = FramedRead::new(read, FrameCodec::new());
    let mut writer = FramedWrite::new(write, FrameCodec::new());
    let cancel = shared.cancel.child_token();

    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&shared, &mut reader, &mut writer),
    );
    let record = match cancel.run_until_cancelled(handshake).await {
        None => return Ended::Cancelled,
        Some(Err(_)) => return not_admitted("no hello within the handshake timeout".into()),
        Some(Ok(Err(reason))) => return not_admitted(reason),
        Some(Ok(Ok(record))) => record,
    };
    let peer = record.id();
    let conn = shared.next_conn_id();
    let (handle, queue) = StreamHandle::new(conn, peer, cancel.clone());

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
    shared
        .tracker
        .spawn(write_loop(writer.into_inner(), queue, handle.clone()).instrument(span));
    let connected = NeighborhoodMsg::NeighborConnected {
        stream: handle.clone(),
        record,
    };
    let reason = if shared.neighborhood.send(connected).await.is_err() {
        "the neighborhood has stopped".to_owned()
    } else {
        read_loop(&shared, &mut reader, &handle, &cancel).await
    };
    info!(peer = %peer.short(), %conn, %reason, "stream ended");
    cancel.cancel();
    let _ = shared
        .neighborhood
        .send(NeighborhoodMsg::NeighborDisconnected { conn, peer })
        .await;
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

/// Sends our hello and reads theirs at the same time (a large hello must not wait for the
/// other side to read), then checks theirs.
async fn handshake<R, W>(
    shared: &Shared,
    reader: &mut FramedRead<R, FrameCodec>,
    writer: &mut FramedWrite<W, FrameCodec>,
) -> Result<VerifiedRecord, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let own = shared
        .neighborhood
        .own_record()
        .await
        .map_err(|e| e.to_string())?;
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        record: own,
    }
    .encode()
    .map_err(|e| format!("cannot encode hello: {e}"))?;
    let send = async {
        writer
            .send(hello)
            .await
            .map_err(|e| format!("cannot send hello: {e}"))
    };
    let receive = async {
        match reader.next().await {
            Some(Ok(Inbound::Frame(body))) => match Frame::decode(&body) {
                Ok(Frame::Hello { protocol, record }) if protocol == PROTOCOL_VERSION => {
                    let record = record
                        .into_verified()
                        .map_err(|e| format!("bad hello: {e}"))?;
                    if record.id() == shared.me {
                        return Err("connected to itself".to_owned());
                    }
                    Ok(record)
                }
                Ok(Frame::Hello { protocol, .. }) => Err(format!(
                    "peer speaks protocol {protocol}, not {PROTOCOL_VERSION}"
                )),
                Ok(_) => Err("first frame is not a hello".to_owned()),
                Err(e) => Err(format!("bad hello: {e}")),
            },
            Some(Ok(Inbound::Oversized { len })) => {
                Err(format!("hello of {len} bytes is too large"))
            }
            Some(Err(e)) => Err(format!("read failed: {e}")),
            None => Err("closed before hello".to_owned()),
        }
    };
    let ((), record) = tokio::try_join!(send, receive)?;
    Ok(record)
}

/// Reads frames until the stream ends, is cancelled, or the peer has sent too much garbage.
/// Returns why it stopped.
async fn read_loop<R>(
    shared: &Shared,
    reader: &mut FramedRead<R, FrameCodec>,
    stream: &StreamHandle,
    cancel: &CancellationToken,
) -> String
where
    R: AsyncRead + Unpin,
{
    let counters = &shared.counters;
    let peer = stream.peer();
    let mut strikes = 0u32;
    loop {
        let Some(item) = cancel.run_until_cancelled(reader.next()).await else {
            return "closed by this node".to_owned();
        };
        shrink(reader.read_buffer_mut());
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
            Some(Ok(Inbound::Frame(body))) => match Frame::decode(&body) {
                Ok(Frame::Gossip { records }) => {
                    let total = records.len();
                    let verified: Vec<VerifiedRecord> = records
                        .into_iter()
                        .filter_map(|r| shared.verified.verify(r).ok())
                        .collect();
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
                Ok(Frame::Hello { .. }) => {
                    Counters::bump(&counters.frames_malformed);
                    debug!("hello out of turn");
                    true
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

/// Drains the stream's queue into the socket, in order, until cancelled or asked to close.
/// Closing writes everything queued before it, then shuts the write half down, so the
/// neighbor reads every frame this node handed over before it reads EOF. Frames go from their
/// shared buffers straight to the socket: no per-stream copy of a large frame stays behind.
async fn write_loop<W>(mut writer: W, mut queue: mpsc::Receiver<Bytes>, stream: StreamHandle)
where
    W: AsyncWrite + Unpin,
{
    let (cancel, drain) = (stream.cancel.clone(), stream.drain.clone());
    let result = loop {
        // Cancellation first; then closing, which itself writes out everything still queued.
        let body = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = drain.cancelled() => break close(&mut writer, &mut queue, &cancel).await,
            body = queue.recv() => match body {
                Some(body) => body,
                None => return,
            },
        };
        // The withdrawal is this node's last frame: hold it for the close that follows at once,
        // so that it leaves with the FIN and the neighbor reads both in one go. (If no close
        // comes soon, it goes out alone.)
        if queue.is_empty() && stream.final_queued.load(Ordering::Acquire) {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = drain.cancelled() => {
                    let last = async {
                        write_frame(&mut writer, &body).await?;
                        close(&mut writer, &mut queue, &cancel).await
                    };
                    break cancel.run_until_cancelled(last).await.unwrap_or(Ok(()));
                }
                () = tokio::time::sleep(FINAL_HOLD) => {}
            }
        }
        match cancel
            .run_until_cancelled(write_frame(&mut writer, &body))
            .await
        {
            None => return,
            Some(Ok(())) => {}
            Some(Err(e)) => break Err(e),
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "write failed; ending the stream");
        cancel.cancel();
    }
}

/// One frame: its length, then its body, in one vectored write where the socket allows.
async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, body: &Bytes) -> std::io::Result<()> {
    let header = frame_header(body.len())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut frame = (&header[..]).chain(&body[..]);
    writer.write_all_buf(&mut frame).await
}

/// Writes what is queued, in order, then shuts the write half down.
async fn close<W>(
    writer: &mut W,
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
            write_frame(writer, &body).await?;
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
