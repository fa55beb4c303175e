//! The UI gateway: the MASQ Node UI websocket and the HTTP routes, and the task that speaks for
//! the node as a whole (its state, and, with graceful shutdown, the end of the process).

mod http;
mod state;
#[cfg(test)]
mod tests;
mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use meshnode_protocol::NodeId;
use meshnode_protocol::ui::StatusPayload;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::neighborhood::NeighborhoodHandle;
use crate::stream_handler_pool::PoolHandle;

/// How many messages may wait in the gateway's inbox.
pub const GATEWAY_INBOX: usize = 256;
/// Longest the gateway waits for the other subsystems' parts of a status answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

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
}

/// Why the gateway could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("the node is stopping")]
    Stopped,
    #[error("{0} did not answer within {STATUS_TIMEOUT:?}")]
    NoAnswer(&'static str),
}

/// A cloneable handle for talking to the gateway task.
#[derive(Debug, Clone)]
pub struct GatewayHandle {
    tx: mpsc::Sender<GatewayMsg>,
}

impl GatewayHandle {
    pub async fn status(&self) -> Result<StatusPayload, GatewayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(GatewayMsg::Status { reply })
            .await
            .map_err(|_| GatewayError::Stopped)?;
        rx.await.unwrap_or(Err(GatewayError::Stopped))
    }
}

/// Starts the gateway task and the UI server on an already bound listener.
pub fn spawn(
    listener: TcpListener,
    info: NodeInfo,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> GatewayHandle {
    let (tx, rx) = mpsc::channel(GATEWAY_INBOX);
    let handle = GatewayHandle { tx };
    let node = info.node_id.short();
    let task = state::Gateway::new(info, neighborhood, pool, tracker.clone());
    let span = tracing::info_span!("ui_gateway", %node);
    tracker.spawn(task.run(rx, cancel.clone()).instrument(span));
    let span = tracing::info_span!("ui_server", %node, ui = %info.ui);
    tracker.spawn(http::serve(listener, handle.clone(), cancel).instrument(span));
    handle
}
