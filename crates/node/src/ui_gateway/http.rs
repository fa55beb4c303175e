//! The UI server: the MASQ websocket at `/`, `GET /status` and `POST /shutdown`.

use std::future::IntoFuture;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshnode_protocol::ui::{UiMessage, codes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::listener::{ClientAddr, ClosableListener};
use super::report::Trigger;
use super::state::Ui;
use super::{GatewayError, GatewayHandle, ws};

#[derive(Debug, Clone)]
pub(super) struct AppState {
    pub gateway: GatewayHandle,
    /// Cancelled when the node ends; open websockets end with it.
    pub node: CancellationToken,
    pub ui: Ui,
}

pub(super) fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(ws::upgrade))
        .route("/status", get(status))
        .route("/shutdown", post(shutdown))
        .with_state(state)
}

/// Serves the UI until the node ends. The gateway closes the listening socket earlier, when it
/// answers a shutdown; connections already open are served until the node ends, and then
/// dropped without waiting for them (a client that never finishes its request cannot hold the
/// node up).
pub(super) async fn serve(listener: ClosableListener, app: AppState) {
    let end = app.node.clone();
    let service = router(app).into_make_service_with_connect_info::<ClientAddr>();
    tokio::select! {
        served = axum::serve(listener, service).into_future() => {
            if let Err(e) = served {
                error!(error = %e, "UI server failed");
            }
        }
        () = end.cancelled() => {}
    }
    debug!("UI server stopped");
}

async fn status(State(app): State<AppState>) -> Response {
    match app.gateway.status().await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => error_response("status", &e),
    }
}

/// Asks for the shutdown (or joins it) and answers with the report once it has ended.
async fn shutdown(
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    State(app): State<AppState>,
) -> Response {
    match app.gateway.shutdown(Trigger::Http { client }).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => error_response("shutdown", &e),
    }
}

/// An HTTP error carrying the MASQ error envelope as its body.
fn error_response(opcode: &str, e: &GatewayError) -> Response {
    let (http, code) = match e {
        GatewayError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, codes::NODE_NOT_RUNNING),
        GatewayError::NoAnswer(_) => (StatusCode::GATEWAY_TIMEOUT, codes::TIMEOUT),
    };
    (
        http,
        axum::Json(UiMessage::error(opcode, None, code, e.to_string())),
    )
        .into_response()
}
