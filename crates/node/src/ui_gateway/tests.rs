//! The UI as a client sees it: a real node on loopback, spoken to with `UiClient`, with raw
//! websocket frames through tokio-tungstenite, and with reqwest for `GET /status`.

use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use meshnode_protocol::Identity;
use meshnode_protocol::ui::{StatusPayload, UI_SUBPROTOCOL, UiMessage, codes};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::NodeInfo;
use crate::client::UiClient;
use crate::test_support::within;
use crate::{Config, Node};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn start(seed: u8) -> Node {
    let config = Config::new(Identity::from_seed([seed; 32]));
    within("the node starts", crate::start(config))
        .await
        .expect("the node binds loopback ports")
}

async fn stop(node: Node) {
    assert!(
        within("the node stops", node.stop()).await,
        "every task of the node ends"
    );
}

async fn client(node: &Node) -> UiClient {
    within("the UI accepts a client", UiClient::connect(node.ui_addr()))
        .await
        .expect("the UI accepts a client offering its subprotocol")
}

async fn ask(client: &mut UiClient, opcode: &str, payload: Value) -> UiMessage {
    within("the UI answers", client.request(opcode, payload, |_| {}))
        .await
        .expect("the connection stays up")
}

/// Opens a websocket offering `protocol` in Sec-WebSocket-Protocol, if any.
async fn raw(
    ui: SocketAddr,
    protocol: Option<&'static str>,
) -> Result<(Socket, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut request = format!("ws://{ui}/")
        .into_client_request()
        .expect("a valid URL");
    if let Some(protocol) = protocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
    }
    within(
        "the websocket handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await
}

async fn send(socket: &mut Socket, message: Message) {
    within("the UI takes a message", socket.send(message))
        .await
        .expect("the connection stays up");
}

/// The next message from the UI, which must be a text frame holding a MASQ envelope.
async fn receive(socket: &mut Socket) -> UiMessage {
    match within("the UI answers", socket.next()).await {
        Some(Ok(Message::Text(text))) => {
            serde_json::from_str(text.as_str()).expect("the UI sends MASQ envelopes")
        }
        other => panic!("a text answer expected, got {other:?}"),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a plain HTTP client builds")
}

#[tokio::test]
async fn the_status_opcode_answers_with_the_whole_payload_in_camel_case() {
    let node = start(1).await;
    let mut ui = client(&node).await;
    let answer = ask(&mut ui, "status", json!({})).await;
    assert_eq!(answer.opcode, "status");
    assert_eq!(answer.context_id, Some(1));
    assert_eq!(answer.error, None);
    let payload = answer.payload.expect("a payload");

    let keys: Vec<&str> = payload
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "nodeId",
        "listen",
        "ui",
        "state",
        "version",
        "softwareVersion",
        "neighbors",
        "knownNodes",
        "stats",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    assert_eq!(payload["nodeId"], node.id().to_string());
    assert_eq!(payload["listen"], node.listen_addr().to_string());
    assert_eq!(payload["ui"], node.ui_addr().to_string());
    assert_eq!(payload["state"], "running");
    // Versions follow the wall clock (ms since the epoch), never below 1.
    let version = payload["version"].as_u64().expect("a version");
    assert!(version >= 1);
    assert_eq!(payload["softwareVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(payload["neighbors"], json!([]));
    assert_eq!(
        payload["knownNodes"],
        json!([{
            "nodeId": node.id().to_string(),
            "addr": node.listen_addr().to_string(),
            "version": version,
            "neighbors": [],
        }])
    );
    let stats = payload["stats"].as_object().expect("stats is an object");
    for key in [
        "gossipFramesSent",
        "gossipBytesSent",
        "gossipFramesReceived",
        "recordsAccepted",
        "recordsStale",
        "gossipFramesUseless",
        "recordsRejected",
        "gossipDeferred",
        "framesMalformed",
        "framesOversized",
        "peersDisconnectedForAbuse",
        "streamsOpen",
        "streamsAccepted",
        "streamsDialed",
        "streamsRefused",
        "handshakesRefused",
        "handshakesFailed",
        "framesUnknown",
        "peersTimedOut",
        "digestsSent",
        "digestBytesSent",
        "digestsReceived",
        "recordsRepaired",
    ] {
        assert_eq!(stats.get(key), Some(&json!(0)), "stats.{key}");
    }
    assert_eq!(stats.len(), 23, "{stats:?}");
    let typed: StatusPayload = serde_json::from_value(payload).expect("the payload parses");
    assert_eq!(typed.node_id, node.id().to_string());

    // The same connection answers again, under the next context id.
    let again = ask(&mut ui, "status", json!({})).await;
    assert_eq!(again.context_id, Some(2));
    assert!(again.payload.is_some());
    within("the client closes", ui.close()).await;
    stop(node).await;
}

#[tokio::test]
async fn bad_requests_get_masq_errors_and_the_connection_carries_on() {
    let node = start(1).await;
    let mut bystander = client(&node).await;
    let (mut socket, _) = raw(node.ui_addr(), Some(UI_SUBPROTOCOL))
        .await
        .expect("the UI accepts the subprotocol");
    let cases = [
        (
            "an unknown opcode",
            Message::text(r#"{"opcode":"frobnicate","contextId":41,"payload":{}}"#),
            ("frobnicate", Some(41), codes::UNKNOWN_OPCODE),
        ),
        (
            "malformed JSON",
            Message::text(r#"{"opcode":"status","contextId":"#),
            ("unmarshalError", None, codes::UNMARSHAL_ERROR),
        ),
        (
            "no payload",
            Message::text(r#"{"opcode":"status","contextId":42}"#),
            ("status", Some(42), codes::UNMARSHAL_ERROR),
        ),
        (
            "a payload that is not an object",
            Message::text(r#"{"opcode":"status","contextId":43,"payload":[1]}"#),
            ("status", Some(43), codes::UNMARSHAL_ERROR),
        ),
        (
            "a binary frame",
            Message::binary(br#"{"opcode":"status","contextId":44,"payload":{}}"#.to_vec()),
            ("unmarshalError", None, codes::BAD_FRAME),
        ),
    ];
    for (i, (what, message, (opcode, context_id, code))) in cases.into_iter().enumerate() {
        send(&mut socket, message).await;
        let answer = receive(&mut socket).await;
        assert_eq!(answer.opcode, opcode, "{what}");
        assert_eq!(answer.context_id, context_id, "{what}");
        assert_eq!(answer.payload, None, "{what}");
        let error = answer.error.expect(what);
        assert_eq!(error.code, code, "{what}: {}", error.message);

        // The same connection still answers.
        let context_id = 100 + i as u64;
        let status = json!({"opcode": "status", "contextId": context_id, "payload": {}});
        send(&mut socket, Message::text(status.to_string())).await;
        let answer = receive(&mut socket).await;
        assert_eq!(answer.context_id, Some(context_id), "after {what}");
        let payload = answer.payload.expect("a status payload");
        assert_eq!(payload["state"], "running", "after {what}");
    }

    // So does a well-behaved client beside it, and UiClient sees the same error codes.
    let answer = ask(&mut bystander, "status", json!({})).await;
    assert_eq!(answer.payload.expect("a payload")["state"], "running");
    let answer = ask(&mut bystander, "shutdown-please", json!({})).await;
    assert_eq!(answer.context_id, Some(2));
    assert_eq!(answer.error.expect("an error").code, codes::UNKNOWN_OPCODE);

    within("the socket closes", socket.close(None))
        .await
        .expect("a clean close");
    within("the client closes", bystander.close()).await;
    stop(node).await;
}

#[tokio::test]
async fn a_client_must_offer_the_ui_subprotocol_and_gets_it_echoed() {
    let node = start(1).await;
    for offered in [None, Some("chat")] {
        match raw(node.ui_addr(), offered).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{offered:?}");
                let body = response.body().clone().unwrap_or_default();
                let body = String::from_utf8_lossy(&body);
                assert!(body.contains(UI_SUBPROTOCOL), "{offered:?}: {body}");
            }
            other => panic!("{offered:?}: refused with 400 expected, got {other:?}"),
        }
    }
    for offered in [UI_SUBPROTOCOL, "chat, MASQNode-UIv2"] {
        let (mut socket, response) = raw(node.ui_addr(), Some(offered))
            .await
            .unwrap_or_else(|e| panic!("{offered}: accepted expected, got {e}"));
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .map(HeaderValue::as_bytes),
            Some(UI_SUBPROTOCOL.as_bytes()),
            "{offered}"
        );
        within("the socket closes", socket.close(None))
            .await
            .expect("a clean close");
    }
    stop(node).await;
}

#[tokio::test]
async fn get_status_returns_the_same_payload_as_json() {
    let node = start(1).await;
    let url = format!("http://{}/status", node.ui_addr());
    let response = within("GET /status", http().get(&url).send())
        .await
        .expect("the UI answers HTTP");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = within("the body", response.json())
        .await
        .expect("the body is JSON");

    let mut ui = client(&node).await;
    let over_ws = ask(&mut ui, "status", json!({}))
        .await
        .payload
        .expect("a payload");
    assert_eq!(body, over_ws);
    let typed = within("status", node.status())
        .await
        .expect("the node answers");
    assert_eq!(
        body,
        serde_json::to_value(typed).expect("the payload serializes")
    );
    within("the client closes", ui.close()).await;
    stop(node).await;
}

#[tokio::test]
async fn a_node_whose_neighborhood_has_stopped_answers_node_not_running() {
    let identity = Identity::from_seed([1; 32]);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let bind = || TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)));
    let neighbors = within("bind", bind()).await.expect("a free port");
    let ui = within("bind", bind()).await.expect("a free port");
    let info = NodeInfo {
        node_id: identity.id(),
        listen: neighbors.local_addr().expect("bound"),
        ui: ui.local_addr().expect("bound"),
    };
    // A neighborhood that stops at once.
    let stopped = CancellationToken::new();
    stopped.cancel();
    let neighborhood =
        crate::neighborhood::spawn(identity.clone(), info.listen.to_string(), stopped, &tracker)
            .expect("the node's first record is valid");
    let pool = crate::stream_handler_pool::spawn(
        crate::test_support::test_link(identity.clone()),
        crate::stream_handler_pool::Verifiers::new(2),
        neighbors,
        Vec::new(),
        neighborhood.clone(),
        cancel.child_token(),
        &tracker,
    );
    let config = super::GatewayConfig {
        listener: ui,
        info,
        deadline: super::DEFAULT_SHUTDOWN_DEADLINE,
    };
    let (gateway, _exit) = super::spawn(config, neighborhood, pool, cancel.clone(), &tracker)
        .expect("the UI listener has an address");

    assert_eq!(
        within("the gateway answers", gateway.status()).await,
        Err(super::GatewayError::Stopped)
    );
    let mut client = within("connect", UiClient::connect(info.ui))
        .await
        .expect("the UI is up");
    let answer = ask(&mut client, "status", json!({})).await;
    assert_eq!(answer.context_id, Some(1));
    assert_eq!(
        answer.error.expect("an error").code,
        codes::NODE_NOT_RUNNING
    );
    let response = within(
        "GET /status",
        http().get(format!("http://{}/status", info.ui)).send(),
    )
    .await
    .expect("the UI answers HTTP");
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: UiMessage = within("the body", response.json())
        .await
        .expect("an error envelope");
    assert_eq!(body.error.expect("an error").code, codes::NODE_NOT_RUNNING);

    within("the client closes", client.close()).await;
    cancel.cancel();
    tracker.close();
    within("the tasks end", tracker.wait()).await;
}

const TOKEN: &str = "correct-horse-battery-staple";

async fn start_guarded(seed: u8) -> Node {
    let mut config = Config::new(Identity::from_seed([seed; 32]));
    config.ui_token = Some(crate::config::UiToken::new(TOKEN).expect("a valid token"));
    within("the node starts", crate::start(config))
        .await
        .expect("the node binds loopback ports")
}

/// A plain HTTP request, with `authorization` as its `Authorization` header if any.
async fn http_request(
    ui: SocketAddr,
    method: reqwest::Method,
    path: &str,
    authorization: Option<&str>,
) -> reqwest::Response {
    let mut request = http().request(method, format!("http://{ui}{path}"));
    if let Some(value) = authorization {
        request = request.header(reqwest::header::AUTHORIZATION, value);
    }
    within("the UI answers HTTP", request.send())
        .await
        .expect("the UI answers HTTP")
}

/// Checks a 401 with a Bearer challenge and a MASQ error envelope with `UNAUTHORIZED`.
async fn assert_unauthorized(response: reqwest::Response, opcode: &str, what: &str) {
    assert_eq!(
        response.status(),
        reqwest::StatusCode::UNAUTHORIZED,
        "{what}"
    );
    let challenge = response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    let body: UiMessage = within("the body", response.json())
        .await
        .unwrap_or_else(|e| panic!("{what}: an error envelope expected: {e}"));
    assert_eq!(body.opcode, opcode, "{what}");
    assert_eq!(body.context_id, None, "{what}");
    assert_eq!(body.payload, None, "{what}");
    let error = body.error.expect(what);
    assert_eq!(error.code, codes::UNAUTHORIZED, "{what}: {}", error.message);
    assert!(!error.message.contains(TOKEN), "{what}: {}", error.message);
}

/// Opens a websocket offering the UI subprotocol and sending `authorization`, if any.
async fn raw_with(
    ui: SocketAddr,
    authorization: Option<&str>,
) -> Result<(Socket, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut request = format!("ws://{ui}/")
        .into_client_request()
        .expect("a valid URL");
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(UI_SUBPROTOCOL),
    );
    if let Some(value) = authorization {
        headers.insert(
            "Authorization",
            HeaderValue::from_str(value).expect("a header value"),
        );
    }
    within(
        "the websocket handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await
}

/// What a client may send that is not the node's token.
fn wrong_credentials() -> Vec<(String, Option<String>)> {
    vec![
        ("no Authorization header".into(), None),
        ("a wrong token".into(), Some("Bearer not-the-token".into())),
        (
            "the token with a suffix".into(),
            Some(format!("Bearer {TOKEN}x")),
        ),
        (
            "a prefix of the token".into(),
            Some(format!("Bearer {}", &TOKEN[..5])),
        ),
        ("an empty bearer token".into(), Some("Bearer ".into())),
        ("the token without a scheme".into(), Some(TOKEN.into())),
        ("the token as Basic".into(), Some(format!("Basic {TOKEN}"))),
    ]
}

#[tokio::test]
async fn with_a_token_every_http_route_refuses_a_request_without_it() {
    let node = start_guarded(1).await;
    let routes = [
        (reqwest::Method::GET, "/status", "status"),
        (reqwest::Method::POST, "/shutdown", "shutdown"),
        (reqwest::Method::GET, "/", "unauthorized"),
        (reqwest::Method::GET, "/no-such-path", "unauthorized"),
        (reqwest::Method::GET, "/shutdown", "shutdown"),
        (reqwest::Method::DELETE, "/status", "status"),
    ];
    for (method, path, opcode) in routes {
        for (what, authorization) in wrong_credentials() {
            let response = http_request(
                node.ui_addr(),
                method.clone(),
                path,
                authorization.as_deref(),
            )
            .await;
            assert_unauthorized(response, opcode, &format!("{method} {path} with {what}")).await;
        }
    }
    // None of the refused shutdowns took effect.
    let status = within("status", node.status())
        .await
        .expect("the node answers");
    assert_eq!(
        status.state,
        meshnode_protocol::ui::NodeState::Running,
        "a refused POST /shutdown must not shut the node down"
    );
    stop(node).await;
}

#[tokio::test]
async fn with_a_token_http_routes_answer_a_request_that_carries_it() {
    let node = start_guarded(1).await;
    let bearer = format!("Bearer {TOKEN}");
    let response = http_request(
        node.ui_addr(),
        reqwest::Method::GET,
        "/status",
        Some(&bearer),
    )
    .await;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let body: StatusPayload = within("the body", response.json())
        .await
        .expect("the status payload");
    assert_eq!(body.node_id, node.id().to_string());

    // The scheme is case-insensitive, as HTTP has it.
    let response = http_request(
        node.ui_addr(),
        reqwest::Method::GET,
        "/status",
        Some(&format!("bearer {TOKEN}")),
    )
    .await;
    assert_eq!(response.status(), reqwest::StatusCode::OK);

    // Past the token, routing is as before.
    let response = http_request(
        node.ui_addr(),
        reqwest::Method::GET,
        "/no-such-path",
        Some(&bearer),
    )
    .await;
    assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);

    let response = http_request(
        node.ui_addr(),
        reqwest::Method::POST,
        "/shutdown",
        Some(&bearer),
    )
    .await;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let report: Value = within("the body", response.json())
        .await
        .expect("the shutdown report");
    assert_eq!(report["outcome"], "graceful", "{report}");
    let report = within("the node ends", node.wait()).await;
    assert_eq!(report.exit_code(), 0);
}

#[tokio::test]
async fn with_a_token_the_websocket_wants_it_in_the_upgrade_request() {
    let node = start_guarded(1).await;
    for (what, authorization) in wrong_credentials() {
        match raw_with(node.ui_addr(), authorization.as_deref()).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
                let challenge = response
                    .headers()
                    .get("WWW-Authenticate")
                    .map(HeaderValue::as_bytes)
                    .unwrap_or_default();
                assert!(challenge.starts_with(b"Bearer"), "{what}");
                let body = response.body().clone().unwrap_or_default();
                let body: UiMessage = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("{what}: an error envelope expected: {e}"));
                assert_eq!(body.opcode, "unauthorized", "{what}");
                assert_eq!(
                    body.error.expect("an error").code,
                    codes::UNAUTHORIZED,
                    "{what}"
                );
            }
            other => panic!("{what}: refused with 401 expected, got {other:?}"),
        }
    }

    // With the header, the websocket is the MASQ UI as before.
    let (mut socket, response) = raw_with(node.ui_addr(), Some(&format!("Bearer {TOKEN}")))
        .await
        .expect("the UI accepts the token");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let request = json!({"opcode": "status", "contextId": 7, "payload": {}});
    send(&mut socket, Message::text(request.to_string())).await;
    let answer = receive(&mut socket).await;
    assert_eq!(answer.context_id, Some(7));
    assert_eq!(answer.payload.expect("a payload")["state"], "running");
    within("the socket closes", socket.close(None))
        .await
        .expect("a clean close");
    stop(node).await;
}

#[tokio::test]
async fn ui_client_sends_the_token_and_names_a_refusal() {
    use crate::client::{self, ClientError};
    use crate::config::UiToken;

    let node = start_guarded(1).await;
    let ui = node.ui_addr();
    let right = UiToken::new(TOKEN).expect("a valid token");
    let wrong = UiToken::new("not-the-token").expect("a valid token");

    match within("connect", UiClient::connect(ui)).await {
        Err(ClientError::Unauthorized { addr, token_sent }) => {
            assert_eq!(addr, ui);
            assert!(!token_sent);
        }
        other => panic!("Unauthorized expected, got {other:?}"),
    }
    let err = within("status", client::status(ui))
        .await
        .expect_err("no token, no status");
    let text = err.to_string();
    assert!(
        text.contains("wants a UI token: pass --ui-token or set MESHNODE_UI_TOKEN"),
        "{text}"
    );
    let err = within("status", client::status_with(ui, Some(&wrong)))
        .await
        .expect_err("a wrong token, no status");
    assert!(
        matches!(
            err,
            ClientError::Unauthorized {
                token_sent: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains("not-the-token"), "{err}");

    let status = within("status", client::status_with(ui, Some(&right)))
        .await
        .expect("the right token is let in");
    assert_eq!(status.node_id, node.id().to_string());
    let mut ui_client = within("connect", UiClient::connect_with(ui, Some(&right)))
        .await
        .expect("the right token is let in");
    let answer = ask(&mut ui_client, "status", json!({})).await;
    assert_eq!(answer.payload.expect("a payload")["state"], "running");
    within("the client closes", ui_client.close()).await;
    stop(node).await;
}

#[tokio::test]
async fn without_a_token_every_route_is_open_as_before() {
    let node = start(1).await;
    for authorization in [None, Some("Bearer anything"), Some("Basic xyz")] {
        let response = http_request(
            node.ui_addr(),
            reqwest::Method::GET,
            "/status",
            authorization,
        )
        .await;
        assert_eq!(
            response.status(),
            reqwest::StatusCode::OK,
            "{authorization:?}"
        );
        let response = http_request(
            node.ui_addr(),
            reqwest::Method::GET,
            "/no-such-path",
            authorization,
        )
        .await;
        assert_eq!(
            response.status(),
            reqwest::StatusCode::NOT_FOUND,
            "{authorization:?}"
        );
        let (mut socket, _) = raw_with(node.ui_addr(), authorization)
            .await
            .expect("the UI is open");
        within("the socket closes", socket.close(None))
            .await
            .expect("a clean close");
    }
    // A client with a token it need not send is let in too.
    let token = crate::config::UiToken::new(TOKEN).expect("a valid token");
    let status = within(
        "status",
        crate::client::status_with(node.ui_addr(), Some(&token)),
    )
    .await
    .expect("an open node ignores the token");
    assert_eq!(status.node_id, node.id().to_string());
    stop(node).await;
}
