//! One UI client's websocket: MASQ envelopes in, MASQ envelopes out, one request at a time.
//! The server never pings, so clients that do not answer pings (such as `masq`) are fine.

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use meshnode_protocol::ui::{MAX_UI_MESSAGE_LEN, UI_SUBPROTOCOL, UiMessage, codes, parse_request};
use tracing::debug;

use super::GatewayError;
use super::http::AppState;

/// Opcodes the gateway answers.
pub const OPCODES: &[&str] = &["status"];

pub(super) async fn upgrade(ws: WebSocketUpgrade, State(app): State<AppState>) -> Response {
    let ws = ws
        .protocols([UI_SUBPROTOCOL])
        .max_message_size(MAX_UI_MESSAGE_LEN);
    if ws.selected_protocol().is_none() {
        let message = format!(
            "meshnode's UI speaks the websocket subprotocol {UI_SUBPROTOCOL}: offer it in Sec-WebSocket-Protocol"
        );
        return (StatusCode::BAD_REQUEST, message).into_response();
    }
    ws.on_upgrade(move |socket| serve_client(socket, app))
}

async fn serve_client(mut socket: WebSocket, app: AppState) {
    debug!("UI client connected");
    loop {
        let Some(received) = app.cancel.run_until_cancelled(socket.recv()).await else {
            break;
        };
        let reply = match received {
            None | Some(Ok(Message::Close(_))) => break,
            Some(Err(e)) => {
                // Includes messages over MAX_UI_MESSAGE_LEN: the protocol has no way to answer
                // a message it could not read, so the connection closes.
                debug!(error = %e, "UI client connection failed");
                break;
            }
            Some(Ok(Message::Text(text))) => answer(&app, text.as_str()).await,
            Some(Ok(Message::Binary(_))) => UiMessage::error(
                "unmarshalError",
                None,
                codes::BAD_FRAME,
                "binary frames are not part of the protocol; send JSON text",
            ),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
        };
        if socket
            .send(Message::Text(reply.to_json().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    debug!("UI client gone");
}

async fn answer(app: &AppState, text: &str) -> UiMessage {
    let request = match parse_request(text) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let context_id = Some(request.context_id);
    match request.opcode.as_str() {
        "status" => match app.gateway.status().await {
            Ok(status) => UiMessage::response("status", request.context_id, status),
            Err(e) => {
                let code = match e {
                    GatewayError::Stopped => codes::NODE_NOT_RUNNING,
                    GatewayError::NoAnswer(_) => codes::TIMEOUT,
                };
                UiMessage::error("status", context_id, code, e.to_string())
            }
        },
        other => UiMessage::error(
            other,
            context_id,
            codes::UNKNOWN_OPCODE,
            format!(
                "meshnode does not answer opcode '{other}'; it answers: {}",
                OPCODES.join(", ")
            ),
        ),
    }
}
