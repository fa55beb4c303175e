//! The UI server: the MASQ websocket at `/` and `GET /status`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meshnode_protocol::ui::{UiMessage, codes};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::{GatewayError, GatewayHandle, ws};

#[derive(Debug, Clone)]
pub(super) struct AppState {
    pub gateway: GatewayHandle,
    /// Cancelled when the node stops; open websockets end with it.
    pub cancel: CancellationToken,
}

pub(super) fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(ws::upgrade))
        .route("/status", get(status))
        .with_state(state)
}

/// Serves the UI until the node stops; then the listening socket closes.
pub(super) async fn serve(
    listener: TcpListener,
    gateway: GatewayHandle,
    cancel: CancellationToken,
) {
    let app = router(AppState {
        gateway,
        cancel: cancel.clone(),
    });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        error!(error = %e, "UI server failed");
    }
    debug!("UI server stopped");
}

async fn status(State(app): State<AppState>) -> Response {
    match app.gateway.status().await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => error_response("status", &e),
    }
}

/// An HTTP error carrying the MASQ error envelope as its body.
pub(super) fn error_response(opcode: &str, e: &GatewayError) -> Response {
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
