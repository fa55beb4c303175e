//! The gateway task's private state and loop.

use meshnode_protocol::ui::{NodeState, Stats, StatusPayload};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use super::{GatewayError, GatewayMsg, NodeInfo, STATUS_TIMEOUT};
use crate::neighborhood::NeighborhoodHandle;
use crate::stream_handler_pool::PoolHandle;

pub(super) struct Gateway {
    info: NodeInfo,
    neighborhood: NeighborhoodHandle,
    pool: PoolHandle,
    state: NodeState,
    tracker: TaskTracker,
}

impl Gateway {
    pub(super) fn new(
        info: NodeInfo,
        neighborhood: NeighborhoodHandle,
        pool: PoolHandle,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            info,
            neighborhood,
            pool,
            state: NodeState::Running,
            tracker,
        }
    }

    pub(super) async fn run(
        self,
        mut inbox: mpsc::Receiver<GatewayMsg>,
        cancel: CancellationToken,
    ) {
        loop {
            let msg = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                msg = inbox.recv() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            match msg {
                GatewayMsg::Status { reply } => self.status(reply),
            }
        }
        debug!("stopped");
    }

    /// Gathers the status in a child task, so the gateway's inbox keeps moving meanwhile.
    fn status(&self, reply: oneshot::Sender<Result<StatusPayload, GatewayError>>) {
        let (info, state) = (self.info, self.state);
        let (neighborhood, pool) = (self.neighborhood.clone(), self.pool.clone());
        let gather = async move {
            let both = async { tokio::join!(neighborhood.status(), pool.counters()) };
            let answer = match tokio::time::timeout(STATUS_TIMEOUT, both).await {
                Err(_) => Err(GatewayError::NoAnswer("the neighborhood or the pool")),
                Ok((Err(_), _)) | Ok((_, Err(_))) => Err(GatewayError::Stopped),
                Ok((Ok(hood), Ok(pool))) => Ok(StatusPayload {
                    node_id: info.node_id.to_string(),
                    listen: info.listen.to_string(),
                    ui: info.ui.to_string(),
                    state,
                    version: hood.version,
                    software_version: env!("CARGO_PKG_VERSION").to_owned(),
                    neighbors: hood.neighbors,
                    known_nodes: hood.known_nodes,
                    stats: Stats {
                        gossip_frames_sent: hood.counters.frames_sent,
                        gossip_frames_received: hood.counters.frames_received,
                        records_accepted: hood.counters.records_accepted,
                        records_stale: hood.counters.records_stale,
                        records_rejected: pool.records_rejected,
                        gossip_frames_dropped: hood.counters.frames_dropped,
                        frames_malformed: pool.frames_malformed,
                        frames_oversized: pool.frames_oversized,
                        peers_disconnected_for_abuse: pool.peers_disconnected_for_abuse,
                        streams_open: pool.streams_open,
                        streams_accepted: pool.streams_accepted,
                        streams_dialed: pool.streams_dialed,
                    },
                }),
            };
            let _ = reply.send(answer);
        };
        self.tracker
            .spawn(gather.instrument(tracing::debug_span!("status")));
    }
}
