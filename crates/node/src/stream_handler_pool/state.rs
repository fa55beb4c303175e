//! The pool task's private state and loop.

use std::collections::HashMap;
use std::time::Duration;

use meshnode_protocol::NodeId;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, warn};

use super::{Admission, Counters, MAX_STREAMS, PoolMsg, Shared, StreamHandle, connection};

/// Pause after a failed accept (say, out of file descriptors) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

pub(super) struct Pool {
    shared: Shared,
    listener: TcpListener,
    /// The admitted stream to each immediate neighbor, and whether this node dialed it.
    admitted: HashMap<NodeId, (StreamHandle, bool)>,
    /// Dialers waiting for a neighbor's stream to end before they dial it again.
    waiters: HashMap<NodeId, Vec<oneshot::Sender<()>>>,
}

impl Pool {
    pub(super) fn new(shared: Shared, listener: TcpListener) -> Self {
        Self {
            shared,
            listener,
            admitted: HashMap::new(),
            waiters: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self, mut inbox: mpsc::Receiver<PoolMsg>) {
        let cancel = self.shared.cancel.clone();
        loop {
            // Cancellation first; then the inbox before new connections, so that streams
            // already running are served before more are taken on.
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                msg = inbox.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, remote)) => self.accept(stream, remote),
                    Err(e) => {
                        warn!(error = %e, "accept failed; pausing");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
            }
        }
        debug!("stopped");
    }

    fn accept(&mut self, stream: tokio::net::TcpStream, remote: std::net::SocketAddr) {
        Counters::bump(&self.shared.counters.streams_accepted);
        debug!(%remote, "accepted");
        let span = tracing::info_span!("stream", %remote, inbound = true);
        self.shared
            .tracker
            .spawn(connection::run(self.shared.clone(), stream, false).instrument(span));
    }

    pub(super) fn handle(&mut self, msg: PoolMsg) {
        match msg {
            PoolMsg::Admit {
                stream,
                dialed,
                reply,
            } => {
                let _ = reply.send(self.admit(stream, dialed));
            }
            PoolMsg::Closed { conn, peer } => {
                if self
                    .admitted
                    .get(&peer)
                    .is_some_and(|(s, _)| s.id() == conn)
                {
                    self.admitted.remove(&peer);
                    for waiter in self.waiters.remove(&peer).unwrap_or_default() {
                        let _ = waiter.send(());
                    }
                }
            }
            PoolMsg::WaitPeerGone { peer, reply } => {
                if self.admitted.contains_key(&peer) {
                    self.waiters.entry(peer).or_default().push(reply);
                } else {
                    let _ = reply.send(());
                }
            }
            PoolMsg::Counters { reply } => {
                let _ = reply.send(self.shared.counters.snapshot());
            }
        }
    }

    /// One stream per neighbor. When both ends dial each other, both must keep the same
    /// stream, so the rule depends only on the pair: keep the stream dialed by the smaller id.
    /// Between two streams dialed by the same side, the newer wins (the older is likely dead).
    fn admit(&mut self, stream: StreamHandle, dialed: bool) -> Admission {
        let me = self.shared.me;
        let peer = stream.peer();
        let preferred = |dialed: bool| (if dialed { me } else { peer }) == me.min(peer);
        match self.admitted.get(&peer) {
            Some((existing, existing_dialed)) => {
                if preferred(*existing_dialed) && !preferred(dialed) {
                    debug!(peer = %peer.short(), conn = %stream.id(), kept = %existing.id(), "duplicate stream refused");
                    return Admission::Duplicate;
                }
                debug!(peer = %peer.short(), conn = %stream.id(), replaced = %existing.id(), "stream replaces an older one");
                existing.kill();
            }
            None if self.admitted.len() >= MAX_STREAMS => {
                warn!(peer = %peer.short(), limit = MAX_STREAMS, "stream limit reached; refusing neighbor");
                return Admission::Full;
            }
            None => {}
        }
        info!(peer = %peer.short(), conn = %stream.id(), dialed, "stream admitted");
        self.admitted.insert(peer, (stream, dialed));
        Admission::Admitted
    }
}
