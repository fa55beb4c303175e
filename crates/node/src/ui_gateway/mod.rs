//! The UI gateway: the MASQ Node UI websocket and the HTTP routes, and the task that speaks for
//! the node as a whole: its state, its shutdown, and the end of the node.

mod console;
mod http;
mod listener;
pub mod metrics;
mod report;
mod state;
#[cfg(test)]
mod tests;
mod web_policy;
#[cfg(test)]
mod web_policy_tests;
mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use meshnode_protocol::NodeId;
use meshnode_protocol::ui::StatusPayload;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use report::{ShutdownOutcome, ShutdownReport, Trigger};
pub use web_policy::{
    AllowedHost, AllowedOrigin, PolicyError, REFUSALS_LOGGED_PER_SECOND, Refusal, WebPolicy,
};

use crate::config::UiToken;
use crate::neighborhood::{Connectivity, NeighborhoodHandle};
use crate::stream_handler_pool::PoolHandle;

/// How many messages may wait in the gateway's inbox.
pub const GATEWAY_INBOX: usize = 256;
/// Longest the gateway waits for the other subsystems' parts of a status answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time from the first shutdown trigger to the end of the node.
pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);
/// After answering a shutdown, how long the node may wait for answered UI clients to disconnect,
/// teardown included. The node never outlives its deadline by more than this.
pub const UI_GRACE: Duration = Duration::from_secs(1);
/// How many broadcasts may wait for a slow UI client before it misses some.
const BROADCAST_BUFFER: usize = 16;

/// Where the node is, for the status payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    pub ui: SocketAddr,
}

/// Messages the gateway task handles.
#[derive(Debug)]
pub enum GatewayMsg {
    /// The status payload, gathered from the other subsystems.
    Status {
        reply: oneshot::Sender<Result<StatusPayload, GatewayError>>,
    },
    /// Shut the node down, or join the shutdown under way; the report comes when it has ended.
    Shutdown {
        trigger: Trigger,
        reply: Option<oneshot::Sender<ShutdownReport>>,
    },
    /// The node's descriptor (its id and advertised address), or `None` once it is stopping.
    Descriptor {
        reply: oneshot::Sender<Result<Option<String>, GatewayError>>,
    },
    /// What `GET /metrics` shows, in every phase until the node ends.
    Metrics {
        reply: oneshot::Sender<Result<metrics::Snapshot, GatewayError>>,
    },
}

/// Where the node is in its life, as the gateway publishes it for a service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    Running,
    /// A shutdown has started; it may take up to `deadline`.
    ShuttingDown {
        trigger: Trigger,
        deadline: Duration,
    },
    /// The shutdown has been answered; the node ends within its grace.
    Ended {
        outcome: ShutdownOutcome,
        elapsed: Duration,
        deadline: Duration,
    },
}

/// Why the gateway could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("the node is not running")]
    Stopped,
    #[error("{0} did not answer within {STATUS_TIMEOUT:?}")]
    NoAnswer(&'static str),
}

/// A cloneable handle for talking to the gateway task.
#[derive(Debug, Clone)]
pub struct GatewayHandle {
    tx: mpsc::Sender<GatewayMsg>,
    lifecycle: watch::Receiver<Lifecycle>,
}

impl GatewayHandle {
    /// The node's lifecycle as the gateway last published it; a receiver that never waits on
    /// the gateway.
    pub fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.clone()
    }

    pub async fn descriptor(&self) -> Result<Option<String>, GatewayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(GatewayMsg::Descriptor { reply })
            .await
            .map_err(|_| GatewayError::Stopped)?;
        rx.await.unwrap_or(Err(GatewayError::Stopped))
    }

    pub async fn metrics(&self) -> Result<metrics::Snapshot, GatewayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(GatewayMsg::Metrics { reply })
            .await
            .map_err(|_| GatewayError::Stopped)?;
        rx.await.unwrap_or(Err(GatewayError::Stopped))
    }

    pub async fn status(&self) -> Result<StatusPayload, GatewayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(GatewayMsg::Status { reply })
            .await
            .map_err(|_| GatewayError::Stopped)?;
        rx.await.unwrap_or(Err(GatewayError::Stopped))
    }

    /// Asks for a shutdown (or joins one) and waits for its report.
    pub async fn shutdown(&self, trigger: Trigger) -> Result<ShutdownReport, GatewayError> {
        let (reply, rx) = oneshot::channel();
        let msg = GatewayMsg::Shutdown {
            trigger,
            reply: Some(reply),
        };
        self.tx.send(msg).await.map_err(|_| GatewayError::Stopped)?;
        rx.await.map_err(|_| GatewayError::Stopped)
    }

    /// Asks for a shutdown (or joins one) without waiting for it.
    pub async fn request_shutdown(&self, trigger: Trigger) -> Result<(), GatewayError> {
        let msg = GatewayMsg::Shutdown {
            trigger,
            reply: None,
        };
        self.tx.send(msg).await.map_err(|_| GatewayError::Stopped)
    }
}

/// What [`spawn`] needs besides the other subsystems' handles.
#[derive(Debug)]
pub struct GatewayConfig {
    pub listener: TcpListener,
    pub info: NodeInfo,
    pub deadline: Duration,
}

/// Who may use the UI: the token every request must carry (if any), and the Host names and web
/// origins it must come with.
#[derive(Debug, Clone, Default)]
pub struct UiAccess {
    pub token: Option<UiToken>,
    pub web: WebPolicy,
}

/// Starts the gateway task and a UI server with no token and the strict web policy; see
/// [`spawn_guarded`].
pub fn spawn(
    config: GatewayConfig,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    node: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<(GatewayHandle, oneshot::Receiver<ShutdownReport>)> {
    spawn_guarded(
        config,
        UiAccess::default(),
        neighborhood,
        pool,
        node,
        tracker,
    )
}

/// Starts the gateway task and the UI server. Every UI route checks the request's Host and
/// Origin against `access.web` and, with a token, wants it as `Authorization: Bearer TOKEN`.
/// The receiver gets the final report when the node has ended; `node` is the node's root
/// token, which the gateway cancels at the end.
pub fn spawn_guarded(
    config: GatewayConfig,
    access: UiAccess,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    node: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<(GatewayHandle, oneshot::Receiver<ShutdownReport>)> {
    let started = start(config, access, neighborhood, pool, node, tracker)?;
    tracker.spawn(http::serve(started.listener, started.app).instrument(started.server_span));
    Ok((started.handle, started.exit))
}

/// [`spawn`], except that nothing serves the UI: the test calls the UI server's handlers with
/// the state returned, and so decides when it reads their answers.
#[cfg(test)]
fn spawn_unserved(
    config: GatewayConfig,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    node: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<(
    GatewayHandle,
    oneshot::Receiver<ShutdownReport>,
    http::AppState,
)> {
    let started = start(
        config,
        UiAccess::default(),
        neighborhood,
        pool,
        node,
        tracker,
    )?;
    // Closed at once: no connection comes through it.
    drop(started.listener);
    Ok((started.handle, started.exit, started.app))
}

/// The gateway task, started, and what its UI server needs.
struct Started {
    handle: GatewayHandle,
    exit: oneshot::Receiver<ShutdownReport>,
    listener: listener::ClosableListener,
    app: http::AppState,
    server_span: tracing::Span,
}

/// Starts the gateway task and the connection-change announcer; the UI server is the caller's.
fn start(
    config: GatewayConfig,
    access: UiAccess,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    node: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<Started> {
    let GatewayConfig {
        listener,
        info,
        deadline,
    } = config;
    // The console's session key, before anything starts, so a failure leaves nothing running.
    let session = match access.token {
        Some(_) => Some(console::Session::new(info.ui.port()).map_err(std::io::Error::other)?),
        None => None,
    };
    let (tx, rx) = mpsc::channel(GATEWAY_INBOX);
    let lifecycle = watch::Sender::new(Lifecycle::Running);
    let handle = GatewayHandle {
        tx,
        lifecycle: lifecycle.subscribe(),
    };
    let connectivity = neighborhood.connectivity();
    let ui = state::Ui {
        broadcasts: broadcast::channel(BROADCAST_BUFFER).0,
        clients: TaskTracker::new(),
        release: CancellationToken::new(),
        close_listener: CancellationToken::new(),
    };
    let (listener, listener_closed) =
        listener::ClosableListener::new(listener, ui.close_listener.clone())?;
    let (exit, exit_rx) = oneshot::channel();
    let task = state::Gateway::new(state::Parts {
        info,
        neighborhood,
        pool,
        tracker: tracker.clone(),
        ui: ui.clone(),
        deadline,
        listener_closed,
        exit,
        lifecycle,
    });
    let node_span = info.node_id.short();
    let span = tracing::info_span!("ui_gateway", node = %node_span);
    tracker.spawn(task.run(rx, node.clone()).instrument(span));
    let span = tracing::debug_span!("connection_change", node = %node_span);
    tracker.spawn(
        announce_connection_changes(connectivity.clone(), ui.broadcasts.clone(), node.clone())
            .instrument(span),
    );
    let app = http::AppState {
        gateway: handle.clone(),
        node,
        ui,
        token: access.token,
        session,
        web: std::sync::Arc::new(access.web),
        connectivity,
    };
    Ok(Started {
        handle,
        exit: exit_rx,
        listener,
        app,
        server_span: tracing::info_span!("ui_server", node = %node_span, ui = %info.ui),
    })
}

/// Broadcasts `connectionChange` to every UI client each time the connection stage changes,
/// until the node ends or the neighborhood does.
async fn announce_connection_changes(
    mut connectivity: watch::Receiver<Connectivity>,
    broadcasts: broadcast::Sender<(Option<SocketAddr>, meshnode_protocol::ui::UiMessage)>,
    node: CancellationToken,
) {
    use meshnode_protocol::ui::{ConnectionStatusPayload, UiMessage};
    let mut stage = connectivity.borrow_and_update().stage;
    loop {
        tokio::select! {
            biased;
            () = node.cancelled() => break,
            changed = connectivity.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
        let now = connectivity.borrow_and_update().stage;
        if now == stage {
            continue;
        }
        tracing::info!(
            from = stage.as_str(),
            to = now.as_str(),
            "connection stage changed"
        );
        stage = now;
        let message = UiMessage::broadcast("connectionChange", ConnectionStatusPayload { stage });
        // No receiver (no UI client) is fine.
        let _ = broadcasts.send((None, message));
    }
}
