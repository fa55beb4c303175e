//! A client for a running node's UI websocket, used by `meshnode status` and by tests. It sends
//! the node's UI token, when given one, as `Authorization: Bearer TOKEN`.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meshnode_protocol::ui::{StatusPayload, UI_SUBPROTOCOL, UiError, UiMessage};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::UiToken;

/// Longest the client waits to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the client waits for an answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a UI conversation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach a meshnode UI at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("the connection to {addr} failed: {reason}")]
    Connection { addr: SocketAddr, reason: String },
    #[error("the node answered with error {}: {}", .0.code, .0.message)]
    Node(UiError),
    /// The node answered HTTP 401: it has a UI token and the client sent none, or another.
    #[error("{}", unauthorized_message(*.addr, *.token_sent))]
    Unauthorized { addr: SocketAddr, token_sent: bool },
}

fn unauthorized_message(addr: SocketAddr, token_sent: bool) -> String {
    if token_sent {
        format!("the node at {addr} refused the UI token: check --ui-token or MESHNODE_UI_TOKEN")
    } else {
        format!("the node at {addr} wants a UI token: pass --ui-token or set MESHNODE_UI_TOKEN")
    }
}

/// One websocket conversation with a node's UI.
#[derive(Debug)]
pub struct UiClient {
    addr: SocketAddr,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_context: u64,
}

impl UiClient {
    /// Connects, offering the MASQ subprotocol, without a UI token.
    pub async fn connect(addr: SocketAddr) -> Result<Self, ClientError> {
        Self::connect_with(addr, None).await
    }

    /// Connects, offering the MASQ subprotocol and sending `token`, if any, as
    /// `Authorization: Bearer TOKEN`.
    pub async fn connect_with(
        addr: SocketAddr,
        token: Option<&UiToken>,
    ) -> Result<Self, ClientError> {
        let fail = |reason: String| ClientError::Connect { addr, reason };
        let mut request = format!("ws://{addr}/")
            .into_client_request()
            .map_err(|e| fail(e.to_string()))?;
        let headers = request.headers_mut();
        headers.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(UI_SUBPROTOCOL),
        );
        if let Some(token) = token {
            let value = HeaderValue::try_from(format!("Bearer {}", token.expose()))
                .map_err(|_| fail("the UI token cannot be sent in a header".into()))?;
            headers.insert(header::AUTHORIZATION, value);
        }
        let connect = tokio_tungstenite::connect_async(request);
        let (socket, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| fail(format!("no handshake within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| match &e {
                tungstenite::Error::Http(response)
                    if response.status() == StatusCode::UNAUTHORIZED =>
                {
                    ClientError::Unauthorized {
                        addr,
                        token_sent: token.is_some(),
                    }
                }
                _ => fail(describe(&e)),
            })?;
        Ok(Self {
            addr,
            socket,
            next_context: 1,
        })
    }

    /// Sends a request and waits for the response with the same context id, returning every
    /// broadcast that arrived meanwhile to `on_broadcast`.
    pub async fn request(
        &mut self,
        opcode: &str,
        payload: serde_json::Value,
        on_broadcast: impl FnMut(UiMessage),
    ) -> Result<UiMessage, ClientError> {
        self.request_within(opcode, payload, ANSWER_TIMEOUT, on_broadcast)
            .await
    }

    /// [`UiClient::request`] with a bound of its own on the wait for the answer.
    pub async fn request_within(
        &mut self,
        opcode: &str,
        payload: serde_json::Value,
        timeout: Duration,
        mut on_broadcast: impl FnMut(UiMessage),
    ) -> Result<UiMessage, ClientError> {
        let context_id = self.next_context;
        self.next_context += 1;
        let text = json!({"opcode": opcode, "contextId": context_id, "payload": payload});
        let addr = self.addr;
        let broken = |e: tungstenite::Error| ClientError::Connection {
            addr,
            reason: describe(&e),
        };
        self.socket
            .send(Message::text(text.to_string()))
            .await
            .map_err(broken)?;
        let wait = async {
            loop {
                let msg = self.next_message().await?;
                if msg.context_id == Some(context_id) {
                    return Ok(msg);
                }
                if msg.context_id.is_none() {
                    on_broadcast(msg);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout { addr, timeout })?
    }

    /// Waits up to `timeout` for the next message from the node, whatever it is.
    pub async fn receive(&mut self, timeout: Duration) -> Result<UiMessage, ClientError> {
        let addr = self.addr;
        tokio::time::timeout(timeout, self.next_message())
            .await
            .map_err(|_| ClientError::Timeout { addr, timeout })?
    }

    /// The next text message, parsed; other frames are skipped.
    async fn next_message(&mut self) -> Result<UiMessage, ClientError> {
        let addr = self.addr;
        loop {
            let text = match self.socket.next().await {
                None => {
                    let reason = "the node closed the connection".into();
                    return Err(ClientError::Connection { addr, reason });
                }
                Some(Err(e)) => {
                    return Err(ClientError::Connection {
                        addr,
                        reason: describe(&e),
                    });
                }
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
            };
            return serde_json::from_str(text.as_str()).map_err(|e| ClientError::Connection {
                addr,
                reason: format!("unreadable message: {e}"),
            });
        }
    }

    /// Closes the websocket politely.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, self.socket.close(None)).await;
    }
}

/// Asks the node at `addr` for its status, without a UI token.
pub async fn status(addr: SocketAddr) -> Result<StatusPayload, ClientError> {
    status_with(addr, None).await
}

/// Asks the node at `addr` for its status, sending `token`, if any.
pub async fn status_with(
    addr: SocketAddr,
    token: Option<&UiToken>,
) -> Result<StatusPayload, ClientError> {
    let mut client = UiClient::connect_with(addr, token).await?;
    let answer = client.request("status", json!({}), |_| {}).await?;
    client.close().await;
    answer.into_payload().map_err(ClientError::Node)
}

fn describe(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}
