//! Starting and stopping one node: binds its sockets, spawns the three subsystems, and hands
//! back a [`Node`].

use std::net::SocketAddr;
use std::time::Duration;

use meshnode_protocol::ui::StatusPayload;
use meshnode_protocol::{NodeId, RecordError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::neighborhood;
use crate::stream_handler_pool;
use crate::ui_gateway::{self, GatewayError, GatewayHandle, NodeInfo};

/// Longest [`Node::stop`] waits for the node's tasks to end.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

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
}

/// A running node. Dropping it does not stop it; call [`Node::stop`].
#[derive(Debug)]
pub struct Node {
    info: NodeInfo,
    gateway: GatewayHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Binds the node's sockets and starts its subsystems.
pub async fn start(config: Config) -> Result<Node, StartError> {
    let Config {
        listen,
        ui,
        neighbors,
        identity,
    } = config;
    let listener = bind(listen).await.map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })?;
    let ui_listener = bind(ui)
        .await
        .map_err(|source| StartError::Ui { addr: ui, source })?;
    let info = NodeInfo {
        node_id: identity.id(),
        listen: listener.local_addr().map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?,
        ui: ui_listener
            .local_addr()
            .map_err(|source| StartError::Ui { addr: ui, source })?,
    };
    if !info.ui.ip().is_loopback() {
        warn!(ui = %info.ui, "the UI listens beyond loopback: anyone who can reach it can drive this node");
    }

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let neighborhood = neighborhood::spawn(
        identity,
        info.listen.to_string(),
        cancel.child_token(),
        &tracker,
    )?;
    let pool = stream_handler_pool::spawn(
        info.node_id,
        listener,
        neighbors,
        neighborhood.clone(),
        cancel.child_token(),
        &tracker,
    );
    let gateway = ui_gateway::spawn(
        ui_listener,
        info,
        neighborhood,
        pool,
        cancel.child_token(),
        &tracker,
    );
    info!(node = %info.node_id, listen = %info.listen, ui = %info.ui, "node started");
    Ok(Node {
        info,
        gateway,
        cancel,
        tracker,
    })
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
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

    /// The same payload as the UI's `status` opcode.
    pub async fn status(&self) -> Result<StatusPayload, GatewayError> {
        self.gateway.status().await
    }

    /// Stops the node at once, without telling its neighbors (they notice the closed streams),
    /// and waits up to [`STOP_TIMEOUT`] for its tasks to end. Returns whether they all did.
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
