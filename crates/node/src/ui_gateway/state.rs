//! The gateway task's private state and loop. The gateway owns the node's state and the end of
//! the node: it starts a shutdown, races the done tree against the deadline, answers everyone
//! who asked, and then lets the node go.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use meshnode_protocol::ui::{NodeState, Stats, StatusPayload, StreamDirection, UiMessage};
use meshnode_shutdown::{DoneReport, Outcome};
use serde_json::json;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use super::metrics::{ShutdownFigures, Snapshot};
use super::report::{ShutdownOutcome, ShutdownReport, Trigger};
use super::{GatewayError, GatewayMsg, Lifecycle, NodeInfo, STATUS_TIMEOUT, UI_GRACE};
use crate::neighborhood::NeighborhoodHandle;
use crate::stream_handler_pool::{PoolHandle, PoolMsg};

/// Longest the gateway waits for the final counters before answering a shutdown.
const FINAL_STATS_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest the gateway waits for the UI listener to report itself closed.
const LISTENER_CLOSE_TIMEOUT: Duration = Duration::from_millis(50);
/// The part of [`UI_GRACE`] kept for tearing the node down after the gateway lets it go
/// (`Node::wait` and the process's own exit).
pub const TEARDOWN_RESERVE: Duration = Duration::from_millis(150);

/// How much earlier than the gateway's deadline the pool must answer: a tenth of the deadline,
/// at most 100 ms.
fn pool_margin(deadline: Duration) -> Duration {
    (deadline / 10).min(Duration::from_millis(100))
}

/// What the gateway shares with the UI server and its client tasks.
#[derive(Debug, Clone)]
pub(super) struct Ui {
    /// Broadcasts to UI clients, with the one client (if any) that must not get it.
    pub broadcasts: broadcast::Sender<(Option<std::net::SocketAddr>, UiMessage)>,
    /// Tracks every websocket client task, so the gateway can wait for answered ones to leave.
    pub clients: TaskTracker,
    /// Cancelled once the shutdown is answered: clients that did not ask for it are closed.
    pub release: CancellationToken,
    /// Cancelled to close the UI listening socket.
    pub close_listener: CancellationToken,
}

pub(super) struct Gateway {
    info: NodeInfo,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    tracker: TaskTracker,
    ui: Ui,
    deadline: Duration,
    listener_closed: Option<oneshot::Receiver<()>>,
    /// Where the final report goes: to whoever waits for the node to end.
    exit: Option<oneshot::Sender<ShutdownReport>>,
    /// Where the node is in its life, for a service manager.
    lifecycle: watch::Sender<Lifecycle>,
    phase: Phase,
}

enum Phase {
    Running,
    ShuttingDown(Box<InProgress>),
    /// Answered; waiting for answered UI clients to leave, up to the grace.
    Finishing {
        report: Box<ShutdownReport>,
        until: Instant,
    },
}

struct InProgress {
    trigger: Trigger,
    started: Instant,
    deadline: Instant,
    requests: u64,
    requesters: Vec<oneshot::Sender<ShutdownReport>>,
    /// The pool's done reply, or `Late` at the deadline.
    wait: Pin<Box<dyn Future<Output = DoneReport> + Send>>,
    /// The streams the pool still waits for, as it last said.
    waiting: watch::Receiver<Vec<String>>,
}

pub(super) struct Parts {
    pub info: NodeInfo,
    pub neighborhood: NeighborhoodHandle,
    pub pool: PoolHandle,
    pub tracker: TaskTracker,
    pub ui: Ui,
    pub deadline: Duration,
    pub listener_closed: oneshot::Receiver<()>,
    pub exit: oneshot::Sender<ShutdownReport>,
    pub lifecycle: watch::Sender<Lifecycle>,
}

impl Gateway {
    pub(super) fn new(parts: Parts) -> Self {
        Self {
            info: parts.info,
            neighborhood: parts.neighborhood,
            pool: parts.pool,
            tracker: parts.tracker,
            ui: parts.ui,
            deadline: parts.deadline,
            listener_closed: Some(parts.listener_closed),
            exit: Some(parts.exit),
            lifecycle: parts.lifecycle,
            phase: Phase::Running,
        }
    }

    /// Runs until the node ends: after a shutdown, or when `node` is cancelled from outside.
    pub(super) async fn run(
        mut self,
        mut inbox: mpsc::Receiver<GatewayMsg>,
        node: CancellationToken,
    ) {
        loop {
            // Cancellation first (the node was stopped from outside); then the shutdown's own
            // progress, so that a flood of UI requests cannot hold back the end of the node.
            tokio::select! {
                biased;
                () = node.cancelled() => break,
                event = progress(&mut self.phase, &self.ui.clients) => match event {
                    Progress::Tree(tree) => self.answer(tree).await,
                    Progress::Released => break,
                },
                msg = inbox.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
            }
        }
        if let Phase::Finishing { report, .. } = std::mem::replace(&mut self.phase, Phase::Running)
        {
            if let Some(exit) = self.exit.take() {
                let _ = exit.send(*report);
            }
        }
        // The node ends with the gateway, whatever ended the gateway.
        node.cancel();
        debug!("stopped");
    }

    fn handle(&mut self, msg: GatewayMsg) {
        match msg {
            GatewayMsg::Status { reply } => self.status(reply),
            GatewayMsg::Shutdown { trigger, reply } => self.shutdown(trigger, reply),
            GatewayMsg::Descriptor { reply } => self.descriptor(reply),
            GatewayMsg::Metrics { reply } => self.metrics(reply),
        }
    }

    /// The descriptor while the node runs (read from its own record, in a child task); `None`
    /// once it is stopping: it has withdrawn, and nobody should dial it.
    fn descriptor(&self, reply: oneshot::Sender<Result<Option<String>, GatewayError>>) {
        if !matches!(self.phase, Phase::Running) {
            let _ = reply.send(Ok(None));
            return;
        }
        let neighborhood = self.neighborhood.clone();
        let answer = async move {
            let own = tokio::time::timeout(STATUS_TIMEOUT, neighborhood.own_record()).await;
            let descriptor = match own {
                Ok(Ok(own)) => Ok(Some(descriptor(&own.id(), &own.record().addr))),
                Ok(Err(_)) => Err(GatewayError::Stopped),
                Err(_) => Err(GatewayError::NoAnswer("the neighborhood")),
            };
            let _ = reply.send(descriptor);
        };
        self.tracker
            .spawn(answer.instrument(tracing::debug_span!("descriptor")));
    }

    /// What a scrape shows: gathered from the subsystems (in a child task) until the shutdown
    /// is answered, then from the report.
    fn metrics(&self, reply: oneshot::Sender<Result<Snapshot, GatewayError>>) {
        let node_id = self.info.node_id.to_string();
        let (state, shutdown) = match &self.phase {
            Phase::Running => (NodeState::Running, None),
            Phase::ShuttingDown(run) => {
                let figures = ShutdownFigures {
                    outcome: None,
                    elapsed: run.started.elapsed(),
                    deadline: self.deadline,
                    requests: run.requests,
                };
                (NodeState::ShuttingDown, Some(figures))
            }
            Phase::Finishing { report, .. } => {
                let snapshot = Snapshot {
                    node_id,
                    state: NodeState::ShuttingDown,
                    status: None,
                    final_stats: report.stats.clone(),
                    shutdown: Some(ShutdownFigures {
                        outcome: Some(report.outcome),
                        elapsed: Duration::from_millis(report.elapsed_ms),
                        deadline: self.deadline,
                        requests: report.requests,
                    }),
                };
                let _ = reply.send(Ok(snapshot));
                return;
            }
        };
        self.gather_then(state, tracing::debug_span!("metrics"), move |status| {
            let snapshot = status.map(|status| Snapshot {
                node_id,
                state,
                status: Some(status),
                final_stats: None,
                shutdown,
            });
            let _ = reply.send(snapshot);
        });
    }

    fn shutdown(&mut self, trigger: Trigger, reply: Option<oneshot::Sender<ShutdownReport>>) {
        match &mut self.phase {
            Phase::Finishing { report, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(ShutdownReport::clone(report));
                }
            }
            // A subsystem's end is no request: the shutdown under way already accounts for it.
            Phase::ShuttingDown(_) if matches!(trigger, Trigger::Fault { .. }) => {
                info!(%trigger, "during the shutdown");
            }
            Phase::ShuttingDown(run) => {
                info!(%trigger, "shutdown requested again; joining the one under way");
                run.requests += 1;
                run.requesters.extend(reply);
            }
            Phase::Running => {
                let started = Instant::now();
                let deadline = started + self.deadline;
                info!(%trigger, deadline_ms = self.deadline.as_millis() as u64, "shutdown started");
                let (pool_reply, pool_wait) = meshnode_shutdown::channel("stream_handler_pool");
                // The pool answers by a deadline of its own, a little earlier, so that its
                // report (naming whatever it still waits for) arrives before this one passes.
                let pool_deadline = deadline - pool_margin(self.deadline);
                // If its report comes too late even so (the machine is loaded), this one still
                // names the streams it waited for, from what the pool said along the way.
                let (waiting_tx, waiting) = watch::channel(Vec::new());
                // The pool's inbox may be busy: send from a child so this loop never waits.
                let pool = self.pool.clone();
                let send = async move {
                    let msg = PoolMsg::Shutdown {
                        reply: pool_reply,
                        deadline: pool_deadline,
                        waiting: waiting_tx,
                    };
                    if pool.send(msg).await.is_err() {
                        debug!("the pool is gone; its reply vanished");
                    }
                };
                self.tracker.spawn(send.in_current_span());
                let broadcast = UiMessage::broadcast(
                    "shuttingDown",
                    json!({ "trigger": &trigger, "deadlineMs": self.deadline.as_millis() as u64 }),
                );
                let requester = match &trigger {
                    Trigger::Ui { client } => Some(*client),
                    _ => None,
                };
                let _ = self.ui.broadcasts.send((requester, broadcast));
                self.lifecycle.send_replace(Lifecycle::ShuttingDown {
                    trigger: trigger.clone(),
                    deadline: self.deadline,
                });
                self.phase = Phase::ShuttingDown(Box::new(InProgress {
                    trigger,
                    started,
                    deadline,
                    requests: 1,
                    requesters: reply.into_iter().collect(),
                    wait: Box::pin(pool_wait.wait_until(deadline)),
                    waiting,
                }));
            }
        }
    }

    /// The tree is in (or the deadline passed): close the UI listener, then answer everyone.
    async fn answer(&mut self, mut tree: DoneReport) {
        let Phase::ShuttingDown(run) = std::mem::replace(&mut self.phase, Phase::Running) else {
            return;
        };
        // The pool did not answer by the deadline: name the streams it last said it waited
        // for, as its own report would have.
        if tree.outcome == Outcome::Late && tree.children.is_empty() {
            tree.children = run
                .waiting
                .borrow()
                .iter()
                .map(|name| {
                    DoneReport::late(
                        name.clone(),
                        tree.elapsed,
                        "the neighbor had not hung up by the deadline",
                    )
                })
                .collect();
        }
        let elapsed_ms = run.started.elapsed().as_millis() as u64;
        // The final counters, if the subsystems answer in time; never past the deadline.
        let left = run.deadline.saturating_duration_since(Instant::now());
        let last = if tree.outcome == Outcome::Late || left.is_zero() {
            None
        } else {
            let (hood, pool) = (self.neighborhood.clone(), self.pool.clone());
            let state = NodeState::ShuttingDown;
            gather(self.info, state, hood, pool, left.min(FINAL_STATS_TIMEOUT))
                .await
                .ok()
        };
        let report = ShutdownReport {
            node_id: self.info.node_id.to_string(),
            trigger: run.trigger,
            requests: run.requests,
            outcome: ShutdownReport::outcome_of(&tree),
            elapsed_ms,
            deadline_ms: self.deadline.as_millis() as u64,
            still_running: tree.late_names(),
            subsystems: tree,
            stats: last.map(|s| s.stats),
        };
        // `masq shutdown` probes the UI port right after the answer and calls a refused
        // connection success: the listener must be closed before anyone is answered.
        self.ui.close_listener.cancel();
        if let Some(closed) = self.listener_closed.take() {
            if tokio::time::timeout(LISTENER_CLOSE_TIMEOUT, closed)
                .await
                .is_err()
            {
                warn!("the UI listener did not report itself closed");
            }
        }
        for requester in run.requesters {
            let _ = requester.send(report.clone());
        }
        match report.outcome {
            ShutdownOutcome::Graceful => info!(report = %report.one_line(), "shutdown complete"),
            _ => warn!(report = %report.one_line(), "shutdown incomplete"),
        }
        self.lifecycle.send_replace(Lifecycle::Ended {
            outcome: report.outcome,
            elapsed: Duration::from_millis(report.elapsed_ms),
            deadline: self.deadline,
        });
        self.ui.release.cancel();
        self.ui.clients.close();
        // Answered UI clients may stay a little, but the node ends by deadline + grace, with
        // room left in the grace for the teardown that follows.
        let until = Instant::now().min(run.deadline) + UI_GRACE - TEARDOWN_RESERVE;
        self.phase = Phase::Finishing {
            report: Box::new(report),
            until,
        };
    }

    /// Gathers the status in a child task, so the gateway's inbox keeps moving meanwhile.
    fn status(&self, reply: oneshot::Sender<Result<StatusPayload, GatewayError>>) {
        let state = match self.phase {
            Phase::Running => NodeState::Running,
            Phase::ShuttingDown(_) => NodeState::ShuttingDown,
            Phase::Finishing { .. } => {
                let _ = reply.send(Err(GatewayError::Stopped));
                return;
            }
        };
        self.gather_then(state, tracing::debug_span!("status"), move |status| {
            let _ = reply.send(status);
        });
    }

    /// Gathers the status for `state` in a child task, so the gateway's inbox keeps moving
    /// meanwhile, and hands what came of it to `answer`.
    fn gather_then(
        &self,
        state: NodeState,
        span: tracing::Span,
        answer: impl FnOnce(Result<StatusPayload, GatewayError>) + Send + 'static,
    ) {
        let gather = gather(
            self.info,
            state,
            self.neighborhood.clone(),
            self.pool.clone(),
            STATUS_TIMEOUT,
        );
        self.tracker
            .spawn(async move { answer(gather.await) }.instrument(span));
    }
}

/// Builds the status payload from the neighborhood's and the pool's parts.
async fn gather(
    info: NodeInfo,
    state: NodeState,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    timeout: Duration,
) -> Result<StatusPayload, GatewayError> {
    let both = async { tokio::join!(neighborhood.status(), pool.counters()) };
    let (hood, pool) = match tokio::time::timeout(timeout, both).await {
        Err(_) => return Err(GatewayError::NoAnswer("the neighborhood or the pool")),
        Ok((Ok(hood), Ok(pool))) => (hood, pool),
        Ok(_) => return Err(GatewayError::Stopped),
    };
    let streams: std::collections::HashMap<String, StreamDirection> = pool
        .admitted
        .iter()
        .map(|(peer, dialed)| {
            let direction = if *dialed {
                StreamDirection::Dialed
            } else {
                StreamDirection::Accepted
            };
            (peer.to_string(), direction)
        })
        .collect();
    let mut neighbors = hood.neighbors;
    for neighbor in &mut neighbors {
        neighbor.stream = streams.get(&neighbor.node_id).copied();
    }
    Ok(StatusPayload {
        node_id: info.node_id.to_string(),
        listen: info.listen.to_string(),
        ui: info.ui.to_string(),
        state,
        version: hood.version,
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
        neighbors,
        known_nodes: hood.known_nodes,
        stats: Stats {
            gossip_frames_sent: hood.counters.frames_sent,
            gossip_bytes_sent: hood.counters.bytes_sent,
            gossip_frames_received: hood.counters.frames_received,
            records_accepted: hood.counters.records_accepted,
            records_stale: hood.counters.records_stale,
            gossip_frames_useless: hood.counters.frames_useless,
            records_rejected: pool.records_rejected,
            gossip_deferred: hood.counters.deferred,
            frames_malformed: pool.frames_malformed,
            frames_oversized: pool.frames_oversized,
            peers_disconnected_for_abuse: pool.peers_disconnected_for_abuse
                + hood.counters.peers_disconnected_for_flooding,
            streams_open: pool.streams_open,
            streams_accepted: pool.streams_accepted,
            streams_dialed: pool.streams_dialed,
            streams_refused: pool.streams_refused,
            handshakes_refused: pool.handshakes_refused,
            handshakes_failed: pool.handshakes_failed,
            frames_unknown: pool.frames_unknown,
            peers_timed_out: pool.peers_timed_out,
            digests_sent: hood.counters.digests_sent,
            digest_bytes_sent: hood.counters.digest_bytes_sent,
            digests_received: hood.counters.digests_received,
            records_repaired: hood.counters.records_repaired,
        },
    })
}

enum Progress {
    /// The pool answered, or the deadline passed.
    Tree(DoneReport),
    /// Every answered UI client left, or the grace passed.
    Released,
}

/// What the current phase is waiting for; never resolves while running.
async fn progress(phase: &mut Phase, clients: &TaskTracker) -> Progress {
    match phase {
        Phase::Running => std::future::pending().await,
        Phase::ShuttingDown(run) => Progress::Tree((&mut run.wait).await),
        Phase::Finishing { until, .. } => {
            let _ = tokio::time::timeout_at(*until, clients.wait()).await;
            Progress::Released
        }
    }
}

/// A node's descriptor, as `descriptor` answers it: `meshnode://ID@HOST:PORT`, the node's id
/// (64 hex digits) and the address its record advertises.
pub(super) fn descriptor(id: &meshnode_protocol::NodeId, addr: &str) -> String {
    format!("meshnode://{id}@{addr}")
}
