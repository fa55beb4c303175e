//! One UI client's websocket: MASQ envelopes in, MASQ envelopes out, one request at a time,
//! and the gateway's broadcasts. The server never pings, so clients that do not answer pings
//! (such as `masq`) are fine.

use std::net::SocketAddr;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use meshnode_protocol::ui::{
    ConnectionStatusPayload, DescriptorPayload, MAX_UI_MESSAGE_LEN, UI_SUBPROTOCOL, UiMessage,
    UiRequest, codes, parse_request,
};
use serde_json::Value;
use tokio::sync::broadcast;
use tracing::{Instrument, debug};

use super::GatewayError;
use super::http::AppState;
use super::listener::ClientAddr;
use super::report::Trigger;

/// Opcodes the gateway answers.
pub const OPCODES: &[&str] = &["status", "shutdown", "descriptor", "connectionStatus"];

pub(super) async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    State(app): State<AppState>,
) -> Response {
    let ws = ws
        .protocols([UI_SUBPROTOCOL])
        .max_message_size(MAX_UI_MESSAGE_LEN);
    if ws.selected_protocol().is_none() {
        let message = format!(
            "meshnode's UI speaks the websocket subprotocol {UI_SUBPROTOCOL}: offer it in Sec-WebSocket-Protocol"
        );
        return (StatusCode::BAD_REQUEST, message).into_response();
    }
    let span = tracing::debug_span!("ui_client", %client);
    let clients = app.ui.clients.clone();
    ws.on_upgrade(move |socket| {
        clients.track_future(
            ClientTask {
                socket,
                app,
                client,
                asked_shutdown: false,
            }
            .run()
            .instrument(span),
        )
    })
}

struct ClientTask {
    socket: WebSocket,
    app: AppState,
    client: SocketAddr,
    /// Set once this client has been answered a shutdown: it may then stay until it leaves
    /// (bounded by the gateway's grace), as `masq` expects.
    asked_shutdown: bool,
}

impl ClientTask {
    async fn run(mut self) {
        debug!("UI client connected");
        let mut broadcasts = self.app.ui.broadcasts.subscribe();
        let (node, release) = (self.app.node.clone(), self.app.ui.release.clone());
        loop {
            // The node's end first; then release (a client that did not ask for the shutdown
            // is closed once it is answered); then broadcasts before requests, so a client
            // hears "shutting down" before any answer that follows it.
            let reply = tokio::select! {
                biased;
                () = node.cancelled() => break,
                () = release.cancelled(), if !self.asked_shutdown => {
                    // Whatever was broadcast before the release still goes out.
                    while let Ok((exclude, msg)) = broadcasts.try_recv() {
                        if exclude != Some(self.client)
                            && self.socket.send(Message::Text(msg.to_json().into())).await.is_err()
                        {
                            break;
                        }
                    }
                    break;
                }
                broadcast = broadcasts.recv() => match broadcast {
                    Ok((exclude, msg)) if exclude != Some(self.client) => msg,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                received = self.socket.recv() => match received {
                    None | Some(Ok(Message::Close(_))) => break,
                    Some(Err(e)) => {
                        if too_big(&e) {
                            // Unread, so unanswerable in MASQ terms: say why, then close
                            // with "message too big".
                            debug!("UI message over the limit; closing");
                            self.too_big().await;
                            return;
                        }
                        debug!(error = %e, "UI client connection failed");
                        break;
                    }
                    Some(Ok(Message::Text(text))) => self.answer(text.as_str()).await,
                    Some(Ok(Message::Binary(_))) => UiMessage::error(
                        "unmarshalError",
                        None,
                        codes::BAD_FRAME,
                        "binary frames are not part of the protocol; send JSON text",
                    ),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                },
            };
            if self
                .socket
                .send(Message::Text(reply.to_json().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = self.socket.send(Message::Close(None)).await;
        debug!("UI client gone");
    }

    /// Answers a message over [`MAX_UI_MESSAGE_LEN`] with an error, then closes with 1009.
    async fn too_big(&mut self) {
        let error = UiMessage::error(
            "unmarshalError",
            None,
            codes::BAD_FRAME,
            format!(
                "a message over the limit of {MAX_UI_MESSAGE_LEN} bytes cannot be read; the connection closes"
            ),
        );
        let _ = self
            .socket
            .send(Message::Text(error.to_json().into()))
            .await;
        let close = CloseFrame {
            code: close_code::SIZE,
            reason: "message too big".into(),
        };
        let _ = self.socket.send(Message::Close(Some(close))).await;
    }

    async fn answer(&mut self, text: &str) -> UiMessage {
        let request = match parse_request(text) {
            Ok(request) => request,
            Err(response) => return response,
        };
        let context_id = request.context_id;
        match request.opcode.as_str() {
            "status" => match self.app.gateway.status().await {
                Ok(status) => UiMessage::response("status", context_id, status),
                Err(e) => gateway_error("status", context_id, &e),
            },
            "shutdown" => self.shutdown(request).await,
            "descriptor" => match self.app.gateway.descriptor().await {
                Ok(node_descriptor_opt) => UiMessage::response(
                    "descriptor",
                    context_id,
                    DescriptorPayload {
                        node_descriptor_opt,
                    },
                ),
                Err(e) => gateway_error("descriptor", context_id, &e),
            },
            "connectionStatus" => {
                let stage = self.app.connectivity.borrow().stage;
                UiMessage::response(
                    "connectionStatus",
                    context_id,
                    ConnectionStatusPayload { stage },
                )
            }
            other => UiMessage::error(
                other,
                Some(context_id),
                codes::UNKNOWN_OPCODE,
                format!(
                    "meshnode does not answer opcode '{other}'; it answers: {}",
                    OPCODES.join(", ")
                ),
            ),
        }
    }

    /// Asks for the shutdown (or joins it) and answers when it has ended. The answer is MASQ's
    /// empty payload, unless the request's payload asks for `"report": true`.
    async fn shutdown(&mut self, request: UiRequest) -> UiMessage {
        let context_id = request.context_id;
        let with_report = request.payload.get("report").and_then(Value::as_bool) == Some(true);
        let trigger = Trigger::Ui {
            client: self.client,
        };
        match self.app.gateway.shutdown(trigger).await {
            Ok(report) => {
                self.asked_shutdown = true;
                if with_report {
                    UiMessage::response("shutdown", context_id, report)
                } else {
                    UiMessage::response("shutdown", context_id, serde_json::json!({}))
                }
            }
            Err(e) => gateway_error("shutdown", context_id, &e),
        }
    }
}

/// Whether a websocket error is a message over the size limit.
fn too_big(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    std::error::Error::source(e)
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(|inner| matches!(inner, Error::Capacity(_)))
}

fn gateway_error(opcode: &str, context_id: u64, e: &GatewayError) -> UiMessage {
    let code = match e {
        GatewayError::Stopped => codes::NODE_NOT_RUNNING,
        GatewayError::NoAnswer(_) => codes::TIMEOUT,
    };
    UiMessage::error(opcode, Some(context_id), code, e.to_string())
}
