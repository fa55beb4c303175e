//! Starting and stopping one node: binds its sockets, spawns the three subsystems, and hands
//! back a [`Node`].

use std::net::SocketAddr;
use std::time::Duration;

use meshnode_protocol::ui::StatusPayload;
use meshnode_protocol::{NodeId, RecordError};
use meshnode_shutdown::{DoneReport, Outcome};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{AdvertiseError, Config, UiExposure, advertised_addr};
use crate::neighborhood::{self, Connectivity, NeighborhoodHandle};
use crate::stream_handler_pool::{self, AsyncStream, PoolHandle, PoolMsg};
use crate::ui_gateway::{
    self, GatewayConfig, GatewayError, GatewayHandle, NodeInfo, ShutdownOutcome, ShutdownReport,
    Trigger,
};

/// Longest [`Node::stop`] waits for the node's tasks to end.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest [`Node::wait`] waits for the node's tasks to end once the gateway has let it go
/// (part of the gateway's `TEARDOWN_RESERVE`).
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_millis(100);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen for neighbors on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for UIs on {addr}: {source}")]
    Ui {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot make this node's record: {0}")]
    Record(#[from] RecordError),
    #[error("cannot make this node's link key: {0}")]
    Link(#[from] crate::link::HandshakeError),
    #[error(transparent)]
    Advertise(#[from] AdvertiseError),
}

/// A running node. Dropping it does not stop it: shut it down ([`Node::shutdown`]) and
/// [`Node::wait`] for it, or [`Node::stop`] it at once.
#[derive(Debug)]
pub struct Node {
    info: NodeInfo,
    gateway: GatewayHandle,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
    exit: oneshot::Receiver<ShutdownReport>,
}

/// Binds the node's sockets and starts its subsystems.
pub async fn start(config: Config) -> Result<Node, StartError> {
    let Config {
        listen,
        ui,
        neighbors,
        identity,
        shutdown_deadline,
        gossip_window,
        ui_token,
        neighbor_timeout,
        ui_web,
        advertise,
        verifiers,
    } = config;
    let listen_err = |source| StartError::Listen {
        addr: listen,
        source,
    };
    let ui_err = |source| StartError::Ui { addr: ui, source };
    // Before binding anything: a node that could only advertise a wildcard does not start.
    if advertise.is_none() {
        advertised_addr(listen, None)?;
    }
    let listener = TcpListener::bind(listen).await.map_err(listen_err)?;
    let ui_listener = TcpListener::bind(ui).await.map_err(ui_err)?;
    let info = NodeInfo {
        node_id: identity.id(),
        listen: listener.local_addr().map_err(listen_err)?,
        ui: ui_listener.local_addr().map_err(ui_err)?,
    };
    let advertised = advertised_addr(info.listen, advertise.as_ref())?;
    if let Some(warning) = UiExposure::of(info.ui, ui_token.is_some()).warning() {
        warn!(ui = %info.ui, "{warning}");
    }
    for warning in ui_web.warnings() {
        warn!(ui = %info.ui, "{warning}");
    }
    if !ui_web.is_strict() {
        info!(ui = %info.ui, allowed = %ui_web.describe(), "the UI also answers these web pages");
    }

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let link = crate::link::LocalLink::new(identity.clone(), neighbor_timeout)?;
    let neighborhood = neighborhood::spawn_with(
        identity,
        advertised.clone(),
        neighborhood::GossipTiming {
            window: gossip_window,
        },
        cancel.child_token(),
        &tracker,
    )?;
    let pool = stream_handler_pool::spawn(
        link,
        verifiers,
        listener,
        neighbors,
        neighborhood.clone(),
        cancel.child_token(),
        &tracker,
    );
    let config = GatewayConfig {
        listener: ui_listener,
        info,
        deadline: shutdown_deadline,
    };
    let guarded = ui_token.is_some();
    let access = ui_gateway::UiAccess {
        token: ui_token,
        web: ui_web,
    };
    let (gateway, exit) = ui_gateway::spawn_guarded(
        config,
        access,
        neighborhood.clone(),
        pool.clone(),
        cancel.clone(),
        &tracker,
    )
    .map_err(ui_err)?;
    tracker.spawn(watch_subsystems(
        neighborhood.clone(),
        pool.clone(),
        gateway.clone(),
        cancel.clone(),
    ));
    info!(node = %info.node_id, listen = %info.listen, ui = %info.ui, advertise = %advertised, ui_token = guarded, "node started");
    Ok(Node {
        info,
        gateway,
        neighborhood,
        pool,
        cancel,
        tracker,
        exit,
    })
}

impl Node {
    pub fn id(&self) -> NodeId {
        self.info.node_id
    }

    /// The address neighbors connect to, as bound.
    pub fn listen_addr(&self) -> SocketAddr {
        self.info.listen
    }

    /// The UI address, as bound.
    pub fn ui_addr(&self) -> SocketAddr {
        self.info.ui
    }

    /// The node's place in the network, as the neighborhood last published it (never waits).
    pub fn connectivity(&self) -> tokio::sync::watch::Receiver<Connectivity> {
        self.neighborhood.connectivity()
    }

    /// The node's lifecycle, as the gateway last published it (never waits).
    pub fn lifecycle(&self) -> tokio::sync::watch::Receiver<ui_gateway::Lifecycle> {
        self.gateway.lifecycle()
    }

    /// The same payload as the UI's `status` opcode.
    pub async fn status(&self) -> Result<StatusPayload, GatewayError> {
        self.gateway.status().await
    }

    /// Shuts the node down gracefully (or joins the shutdown under way) and returns the
    /// report once the shutdown has ended. The node then ends; [`Node::wait`] returns at once.
    pub async fn shutdown(&self) -> Result<ShutdownReport, GatewayError> {
        self.gateway.shutdown(Trigger::Api).await
    }

    /// Asks for a graceful shutdown (or joins one) without waiting; see [`Node::wait`].
    pub async fn request_shutdown(&self) -> Result<(), GatewayError> {
        self.gateway.request_shutdown(Trigger::Api).await
    }

    /// When each of `ids`'s current record was stored by this node, for measuring how fast news
    /// spreads.
    pub async fn learned_at(&self, ids: Vec<NodeId>) -> Option<Vec<Option<tokio::time::Instant>>> {
        self.neighborhood.learned_at(ids).await.ok()
    }

    /// A cloneable handle that can ask for the status or a shutdown while another task
    /// [`Node::wait`]s.
    pub fn controller(&self) -> NodeController {
        NodeController {
            gateway: self.gateway.clone(),
        }
    }

    /// Runs an already connected stream (of any transport) as a neighbor, as if accepted.
    pub async fn adopt(&self, stream: impl AsyncStream) -> bool {
        self.pool
            .send(PoolMsg::Adopt {
                stream: Box::new(stream),
            })
            .await
            .is_ok()
    }

    /// Waits until the node has ended (after a shutdown, from any trigger) and returns the
    /// report. If the gateway itself vanished, the report says so.
    pub async fn wait(self) -> ShutdownReport {
        let report = match self.exit.await {
            Ok(report) => report,
            Err(_) => vanished_gateway(&self.info),
        };
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(TEARDOWN_TIMEOUT, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(node = %self.info.node_id.short(), tasks = self.tracker.len(), "tasks still running after the node ended");
        }
        report
    }

    /// Stops the node at once, without telling its neighbors (they notice the closed streams),
    /// as a crash would, and waits up to [`STOP_TIMEOUT`] for its tasks to end. Returns whether
    /// they all did.
    pub async fn stop(self) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        let ended = tokio::time::timeout(STOP_TIMEOUT, self.tracker.wait())
            .await
            .is_ok();
        if !ended {
            warn!(node = %self.info.node_id.short(), tasks = self.tracker.len(), "tasks still running after stop");
        }
        ended
    }
}

#[cfg(test)]
impl Node {
    /// Panics the neighborhood task, as a bug would.
    pub(crate) async fn crash_neighborhood(&self) {
        let crash = crate::neighborhood::NeighborhoodMsg::Crash;
        self.neighborhood.send(crash).await.expect("it is running");
    }

    /// Panics the pool task, as a bug would.
    pub(crate) async fn crash_pool(&self) {
        self.pool.send(PoolMsg::Crash).await.expect("it is running");
    }
}

/// Asks a running node for its status or its shutdown; see [`Node::controller`].
#[derive(Debug, Clone)]
pub struct NodeController {
    gateway: GatewayHandle,
}

impl NodeController {
    pub async fn status(&self) -> Result<StatusPayload, GatewayError> {
        self.gateway.status().await
    }

    /// Asks for a graceful shutdown (or joins one) on behalf of a signal, without waiting.
    pub async fn signal(&self, name: &str) -> Result<(), GatewayError> {
        self.gateway
            .request_shutdown(Trigger::Signal {
                name: name.to_owned(),
            })
            .await
    }

    /// Asks for a graceful shutdown (or joins one) and waits for its report.
    pub async fn shutdown(&self) -> Result<ShutdownReport, GatewayError> {
        self.gateway.shutdown(Trigger::Api).await
    }
}

/// Watches the subsystems the gateway depends on. One that ends while the node runs has
/// panicked: the node then shuts down by itself, so that it withdraws whatever it still can and
/// exits with a report that names the subsystem, instead of running on half dead.
async fn watch_subsystems(
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    gateway: GatewayHandle,
    node: CancellationToken,
) {
    let subsystem = tokio::select! {
        biased;
        () = node.cancelled() => return,
        () = neighborhood.closed() => "neighborhood",
        () = pool.closed() => "stream_handler_pool",
    };
    if node.is_cancelled() {
        return;
    }
    error!(
        subsystem,
        "a subsystem stopped unexpectedly; shutting the node down"
    );
    let trigger = Trigger::Fault {
        subsystem: subsystem.to_owned(),
    };
    if gateway.request_shutdown(trigger).await.is_err() {
        debug!("the gateway has stopped too");
    }
}

fn vanished_gateway(info: &NodeInfo) -> ShutdownReport {
    ShutdownReport {
        node_id: info.node_id.to_string(),
        trigger: Trigger::Api,
        requests: 0,
        outcome: ShutdownOutcome::Failed,
        elapsed_ms: 0,
        deadline_ms: 0,
        subsystems: DoneReport {
            subsystem: "ui_gateway".into(),
            outcome: Outcome::Vanished,
            elapsed: Duration::ZERO,
            summary: "the gateway ended without a report".into(),
            children: Vec::new(),
        },
        still_running: Vec::new(),
        stats: None,
    }
}
