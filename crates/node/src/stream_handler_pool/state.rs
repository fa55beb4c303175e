//! The pool task's private state and loop.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use meshnode_protocol::NodeId;
use meshnode_shutdown::{DoneReply, DoneReport};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::{Admission, BoxedStream, ConnId, Counters, PoolMsg, Shared, StreamHandle, connection};
use crate::neighborhood::NeighborhoodMsg;

pub(super) struct Pool {
    shared: Shared,
    /// Taken, and so closed, when the shutdown starts: neighbors can no longer reconnect.
    listener: Option<TcpListener>,
    /// The admitted stream to each immediate neighbor, and whether this node dialed it.
    admitted: HashMap<NodeId, (StreamHandle, bool)>,
    /// Dialers waiting for a neighbor's stream to end before they dial it again.
    waiters: HashMap<NodeId, Vec<oneshot::Sender<()>>>,
    phase: Phase,
    /// When connections refused at a limit were last logged at warn, and how many since.
    last_refusal_warning: Option<Instant>,
    refused_since_warning: u64,
    /// During a shutdown, the names of the streams still waited for, for the gateway.
    waiting: Option<watch::Sender<Vec<String>>>,
}

/// Connections refused at a limit are logged at warn at most this often (a flood would
/// otherwise flood the log too).
const REFUSAL_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the pool is in a shutdown.
enum Phase {
    Running,
    /// Waiting for the neighborhood to say that its withdrawal gossip is queued on every stream
    /// (the wait resolves as late at the deadline).
    Withdrawing {
        reply: DoneReply,
        deadline: Instant,
        neighborhood: Pin<Box<dyn Future<Output = DoneReport> + Send>>,
    },
    /// Every stream was told to close after that gossip; waiting for each to end, or the
    /// deadline.
    Closing {
        reply: DoneReply,
        deadline: Instant,
        since: Instant,
        neighborhood: DoneReport,
        /// The streams still open, by name for the report.
        streams: HashMap<ConnId, String>,
        total: usize,
    },
    /// Answered.
    Done,
}

impl Pool {
    pub(super) fn new(shared: Shared, listener: TcpListener) -> Self {
        Self {
            shared,
            listener: Some(listener),
            admitted: HashMap::new(),
            waiters: HashMap::new(),
            phase: Phase::Running,
            last_refusal_warning: None,
            refused_since_warning: 0,
            waiting: None,
        }
    }

    pub(super) async fn run(mut self, mut inbox: mpsc::Receiver<PoolMsg>) {
        let cancel = self.shared.cancel.clone();
        loop {
            // Cancellation first; then the shutdown's next step;
            // then the inbox before new connections, so that streams already running are
            // served before more are taken on.
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                step = shutdown_step(&mut self.phase) => match step {
                    Step::NeighborhoodDone(report) => self.neighborhood_done(report),
                    Step::Deadline => self.answer_late_streams(),
                },
                msg = inbox.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                accepted = accept(self.listener.as_ref()) => match accepted {
                    Ok((stream, remote)) => self.accept(stream, remote),
                    Err(e) => {
                        warn!(error = %e, "accept failed; pausing");
                        tokio::time::sleep(crate::ACCEPT_ERROR_PAUSE).await;
                    }
                },
            }
        }
        debug!("stopped");
    }

    fn accept(&mut self, stream: tokio::net::TcpStream, remote: std::net::SocketAddr) {
        // Refused at once, before any work or task: the descriptor is given back now.
        let limits = self.shared.limits;
        if self.admitted.len() >= limits.max_streams {
            return self.refuse(remote, "the stream limit");
        }
        let Ok(permit) = self.shared.handshakes.clone().try_acquire_owned() else {
            return self.refuse(remote, "the limit of handshakes in progress");
        };
        Counters::bump(&self.shared.counters.streams_accepted);
        let _ = stream.set_nodelay(true);
        debug!(%remote, "accepted");
        let span = tracing::info_span!("stream", %remote, inbound = true);
        let run = connection::run(self.shared.clone(), stream, false, Some(permit));
        self.shared.tracker.spawn(run.instrument(span));
    }

    /// Counts a refused connection; warns at most every [`REFUSAL_WARNING_EVERY`].
    fn refuse(&mut self, remote: std::net::SocketAddr, limit: &'static str) {
        Counters::bump(&self.shared.counters.streams_refused);
        self.refused_since_warning += 1;
        let due = self
            .last_refusal_warning
            .is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_EVERY);
        if due {
            warn!(%remote, limit, refused = self.refused_since_warning, max_streams = self.shared.limits.max_streams, max_handshakes = self.shared.limits.max_handshakes, "connections refused at a limit");
            self.last_refusal_warning = Some(Instant::now());
            self.refused_since_warning = 0;
        } else {
            debug!(%remote, limit, "connection refused at a limit");
        }
    }

    fn adopt(&mut self, stream: BoxedStream) {
        if !matches!(self.phase, Phase::Running) {
            debug!("shutting down; an adopted stream is dropped");
            return;
        }
        Counters::bump(&self.shared.counters.streams_accepted);
        let span = tracing::info_span!("stream", adopted = true);
        self.shared
            .tracker
            .spawn(connection::run(self.shared.clone(), stream, false, None).instrument(span));
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
            PoolMsg::Closed { conn, peer } => self.closed(conn, peer),
            PoolMsg::WaitPeerGone { peer, reply } => {
                if self.admitted.contains_key(&peer) {
                    self.waiters.entry(peer).or_default().push(reply);
                } else {
                    let _ = reply.send(());
                }
            }
            PoolMsg::Counters { reply } => {
                let mut counters = self.shared.counters.snapshot();
                counters.admitted = self
                    .admitted
                    .iter()
                    .map(|(peer, (_, dialed))| (*peer, *dialed))
                    .collect();
                let _ = reply.send(counters);
            }
            PoolMsg::Adopt { stream } => self.adopt(stream),
            PoolMsg::Shutdown {
                reply,
                deadline,
                waiting,
            } => {
                self.waiting = Some(waiting);
                self.shutdown(reply, deadline);
            }
            #[cfg(test)]
            PoolMsg::Crash => panic!("the stream handler pool crashed, as asked by a test"),
        }
    }

    fn closed(&mut self, conn: ConnId, peer: NodeId) {
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
        if let Phase::Closing { streams, .. } = &mut self.phase
            && let Some(name) = streams.remove(&conn)
            && let Some(waiting) = &self.waiting
        {
            // One name out of the published list (sorted, so found by a binary search): the
            // list is not rebuilt and re-sorted on each of N closes, which cost O(N² log N)
            // string copies at the end of every shutdown.
            waiting.send_modify(|names| {
                if let Ok(at) = names.binary_search(&name) {
                    names.remove(at);
                }
            });
        }
        self.finish_if_closed();
    }

    /// One stream per neighbor. When both ends dial each other, both must keep the same
    /// stream, so the rule depends only on the pair: keep the stream dialed by the smaller id.
    /// Between two streams dialed by the same side, the newer wins (the older is likely dead).
    fn admit(&mut self, stream: StreamHandle, dialed: bool) -> Admission {
        if !matches!(self.phase, Phase::Running) {
            return Admission::ShuttingDown;
        }
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
            None if self.admitted.len() >= self.shared.limits.max_streams => {
                warn!(peer = %peer.short(), limit = self.shared.limits.max_streams, "stream limit reached; refusing neighbor");
                return Admission::Full;
            }
            None => {}
        }
        info!(peer = %peer.short(), conn = %stream.id(), dialed, "stream admitted");
        self.admitted.insert(peer, (stream, dialed));
        Admission::Admitted
    }

    /// Stops intake and asks the neighborhood to withdraw; the streams stay open meanwhile.
    fn shutdown(&mut self, reply: DoneReply, deadline: Instant) {
        if !matches!(self.phase, Phase::Running) {
            reply.failed("a shutdown is already under way", Vec::new());
            return;
        }
        info!(
            streams = self.admitted.len(),
            "shutting down: intake stopped, withdrawing from the network"
        );
        self.shared.intake.cancel();
        self.listener = None;
        let (hood_reply, hood_wait) = meshnode_shutdown::channel("neighborhood");
        // The withdrawal goes to exactly the streams admitted here, including any whose
        // announcement has not reached the neighborhood yet.
        let streams = self
            .admitted
            .values()
            .map(|(stream, _)| stream.clone())
            .collect();
        // Sent from a child so this loop never waits on the neighborhood's inbox; if the
        // neighborhood is gone the message, and its reply, are dropped: "vanished".
        let neighborhood = self.shared.neighborhood.clone();
        let send = async move {
            let msg = NeighborhoodMsg::WithdrawFromNetwork {
                streams,
                reply: hood_reply,
            };
            if neighborhood.send(msg).await.is_err() {
                debug!("the neighborhood is gone");
            }
        };
        self.shared.tracker.spawn(send.in_current_span());
        let neighborhood = Box::pin(hood_wait.wait_until(deadline));
        self.phase = Phase::Withdrawing {
            reply,
            deadline,
            neighborhood,
        };
    }

    /// The neighborhood has queued its withdrawal gossip on every stream (or is gone, or late):
    /// close every stream behind what is queued on it.
    pub(super) fn neighborhood_done(&mut self, neighborhood: DoneReport) {
        let Phase::Withdrawing {
            reply, deadline, ..
        } = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return;
        };
        debug!(outcome = %neighborhood.outcome, summary = %neighborhood.summary, "neighborhood done; closing streams");
        let streams: HashMap<ConnId, String> = self
            .admitted
            .iter()
            .map(|(peer, (stream, _))| {
                stream.close();
                (
                    stream.id(),
                    format!("stream to {} ({})", peer.short(), stream.id()),
                )
            })
            .collect();
        let total = streams.len();
        let since = Instant::now();
        self.phase = Phase::Closing {
            reply,
            deadline,
            since,
            neighborhood,
            streams,
            total,
        };
        self.publish_waiting();
        self.finish_if_closed();
    }

    /// Tells the gateway which streams the shutdown still waits for, by name, sorted.
    fn publish_waiting(&self) {
        let (Some(waiting), Phase::Closing { streams, .. }) = (&self.waiting, &self.phase) else {
            return;
        };
        let mut names: Vec<String> = streams.values().cloned().collect();
        names.sort();
        waiting.send_replace(names);
    }

    fn finish_if_closed(&mut self) {
        if !matches!(&self.phase, Phase::Closing { streams, .. } if streams.is_empty()) {
            return;
        }
        if let Phase::Closing {
            reply,
            neighborhood,
            total,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Done)
        {
            info!(streams = total, "every stream closed");
            reply.done(format!("closed {total} streams"), vec![neighborhood]);
        }
    }

    /// The deadline passed with streams still open (their neighbors have not hung up): answer
    /// now, naming each of them, so the report says which neighbor held the node up.
    fn answer_late_streams(&mut self) {
        let Phase::Closing {
            reply,
            since,
            neighborhood,
            streams,
            total,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return;
        };
        warn!(
            open = streams.len(),
            total, "streams still open at the deadline"
        );
        let elapsed = since.elapsed();
        let mut children = vec![neighborhood];
        let mut late: Vec<(ConnId, String)> = streams.into_iter().collect();
        late.sort();
        children.extend(late.into_iter().map(|(_, name)| {
            DoneReport::late(
                name,
                elapsed,
                "the neighbor had not hung up by the deadline",
            )
        }));
        let closed = total - (children.len() - 1);
        reply.done(format!("closed {closed} of {total} streams"), children);
    }
}

/// What moves a shutdown on.
enum Step {
    NeighborhoodDone(DoneReport),
    Deadline,
}

/// The neighborhood's done while withdrawing, the deadline while closing; never resolves
/// otherwise.
async fn shutdown_step(phase: &mut Phase) -> Step {
    match phase {
        Phase::Withdrawing { neighborhood, .. } => Step::NeighborhoodDone(neighborhood.await),
        Phase::Closing { deadline, .. } => {
            tokio::time::sleep_until(*deadline).await;
            Step::Deadline
        }
        _ => std::future::pending().await,
    }
}

/// The next connection, while the listener is open; never resolves otherwise.
async fn accept(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}
