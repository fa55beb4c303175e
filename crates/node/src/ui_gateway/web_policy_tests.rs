//! The Host and Origin checks on a real node on loopback, route by route, with requests written
//! byte for byte (so that Host, Origin and the request target are exactly what a browser, a
//! rebound page or a native client would send).

use std::net::SocketAddr;

use meshnode_protocol::Identity;
use meshnode_protocol::ui::{UI_SUBPROTOCOL, UiMessage, codes};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::{AllowedHost, AllowedOrigin, ShutdownOutcome};
use crate::client::UiClient;
use crate::config::UiToken;
use crate::test_support::within;
use crate::{Config, Node};

const TOKEN: &str = "web-policy-test-token";

async fn start(config: Config) -> Node {
    within("the node starts", crate::start(config))
        .await
        .expect("the node binds loopback ports")
}

fn config(seed: u8) -> Config {
    Config::new(Identity::from_seed([seed; 32]))
}

/// An answer as read off the wire: the status code, the headers' text, the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    /// The MASQ error envelope of a 403, checked for its opcode and code.
    fn assert_forbidden(&self, opcode: &str, code: u64, what: &str) {
        assert_eq!(self.status, 403, "{what}: {self:?}");
        let envelope: UiMessage = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{what}: an error envelope expected: {e}: {self:?}"));
        assert_eq!(envelope.opcode, opcode, "{what}");
        assert_eq!(envelope.context_id, None, "{what}");
        let error = envelope.error.expect("an error");
        assert_eq!(error.code, code, "{what}: {}", error.message);
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("x-content-type-options: nosniff"),
            "{what}: {}",
            self.head
        );
    }
}

/// Sends `request` (a whole request head, blank line included) and reads the answer's head
/// and, by its content-length, its body. A 101 has no body to read.
async fn send_raw(ui: SocketAddr, request: &str) -> Answer {
    let mut stream = within("connect", TcpStream::connect(ui))
        .await
        .expect("the UI listens");
    within(
        "the request is written",
        stream.write_all(request.as_bytes()),
    )
    .await
    .expect("written");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = within("the answer's head", stream.read(&mut buf))
            .await
            .expect("read");
        assert!(n > 0, "the UI closed before answering: {bytes:?}");
        bytes.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = bytes[head_end..].to_vec();
    while status != 101 && body.len() < length {
        let n = within("the answer's body", stream.read(&mut buf))
            .await
            .expect("read");
        assert!(n > 0, "the body ended early");
        body.extend_from_slice(&buf[..n]);
    }
    Answer {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A request on `route` (`ws` for the websocket upgrade at `/`), with `host` and `origin` as
/// its headers when given, and `extra` header lines.
fn request(route: &str, host: Option<&str>, origin: Option<&str>, extra: &[&str]) -> String {
    let mut head = match route {
        "ws" => format!(
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: {UI_SUBPROTOCOL}\r\n"
        ),
        "POST /shutdown" => "POST /shutdown HTTP/1.1\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n"
            .to_owned(),
        other => format!("{other} HTTP/1.1\r\nConnection: close\r\n"),
    };
    if let Some(host) = host {
        head.push_str(&format!("Host: {host}\r\n"));
    }
    if let Some(origin) = origin {
        head.push_str(&format!("Origin: {origin}\r\n"));
    }
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    if route == "POST /shutdown" {
        head.push_str("x=1");
    }
    head
}

/// Every route, with the opcode its refusals carry. `/shutdown` comes last where it matters.
const ROUTES: [(&str, &str); 6] = [
    ("ws", "forbidden"),
    ("GET /", "forbidden"),
    ("GET /status", "status"),
    ("GET /no-such-path", "forbidden"),
    ("OPTIONS /status", "status"),
    ("POST /shutdown", "shutdown"),
];

/// The node answers a native client (no Origin), so it is still running.
async fn assert_running(node: &Node) {
    let mut client = within(
        "a native client connects",
        UiClient::connect(node.ui_addr()),
    )
    .await
    .expect("the UI accepts a native client");
    let answer = within("status", client.request("status", json!({}), |_| {}))
        .await
        .expect("an answer");
    let status = answer.payload.expect("a status payload");
    assert_eq!(status["state"], "running", "{status}");
    within("close", client.close()).await;
}

#[tokio::test]
async fn every_route_refuses_a_host_that_is_no_ip_localhost_or_allowed_name() {
    let node = start(config(1)).await;
    let port = node.ui_addr().port();
    let hosts = [
        format!("evil.example:{port}"),
        format!("rebind.evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("LOCALHOST.EVIL.EXAMPLE.:{port}"),
        "evil.example".to_owned(),
    ];
    for (route, opcode) in ROUTES {
        for host in &hosts {
            // With no Origin, and with the rebound page's own origin (same-origin to itself).
            for origin in [None, Some(format!("http://{host}"))] {
                let what = format!("{route} Host {host} Origin {origin:?}");
                let answer = send_raw(
                    node.ui_addr(),
                    &request(route, Some(host), origin.as_deref(), &[]),
                )
                .await;
                answer.assert_forbidden(opcode, codes::HOST_NOT_ALLOWED, &what);
                assert!(
                    answer.body.contains("--ui-allow-host"),
                    "{what}: {answer:?}"
                );
            }
        }
        // A malformed Host: a bare IPv6 address, a port that is no port.
        for host in ["::1", "127.0.0.1:http", "[::1]:"] {
            let answer = send_raw(node.ui_addr(), &request(route, Some(host), None, &[])).await;
            answer.assert_forbidden(opcode, codes::HOST_NOT_ALLOWED, &format!("{route} {host}"));
        }
    }
    // An absolute request target names the host too: it cannot smuggle a foreign one past a
    // good Host header, nor the other way round.
    for (target, host) in [
        ("http://evil.example/status", "127.0.0.1"),
        ("http://127.0.0.1/status", "evil.example"),
    ] {
        let answer = send_raw(
            node.ui_addr(),
            &format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        answer.assert_forbidden("status", codes::HOST_NOT_ALLOWED, target);
    }
    // Two Host headers are refused, even if one is good.
    let answer = send_raw(
        node.ui_addr(),
        &request(
            "GET /status",
            Some("127.0.0.1"),
            None,
            &["Host: evil.example"],
        ),
    )
    .await;
    assert!(answer.status == 400 || answer.status == 403, "{answer:?}");
    assert_running(&node).await;
    assert!(within("stop", node.stop()).await);
}

#[tokio::test]
async fn every_route_refuses_a_page_of_another_origin() {
    let node = start(config(2)).await;
    let ui = node.ui_addr();
    let port = ui.port();
    let origins = [
        "http://evil.example".to_owned(),
        format!("http://evil.example:{port}"),
        "null".to_owned(),
        // The right host on another port, or over https, is another origin.
        format!("http://127.0.0.1:{}", port.wrapping_add(1).max(1)),
        format!("https://127.0.0.1:{port}"),
        format!("http://127.0.0.1.evil.example:{port}"),
        format!("http://localhost.evil.example:{port}"),
        // Not an origin at all.
        format!("http://127.0.0.1:{port}/status"),
    ];
    for (route, opcode) in ROUTES {
        for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            for origin in &origins {
                let what = format!("{route} Host {host} Origin {origin}");
                let answer = send_raw(ui, &request(route, Some(&host), Some(origin), &[])).await;
                answer.assert_forbidden(opcode, codes::ORIGIN_NOT_ALLOWED, &what);
            }
        }
    }
    // The websocket from the report, through a real websocket client: refused at the upgrade.
    let mut ws = format!("ws://{ui}/").into_client_request().expect("a URL");
    let headers = ws.headers_mut();
    headers.insert("Origin", HeaderValue::from_static("http://evil.example"));
    headers.insert(
        "Host",
        HeaderValue::from_str(&format!("rebind.evil.example:{port}")).expect("a header"),
    );
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(UI_SUBPROTOCOL),
    );
    let refused = within("the handshake", tokio_tungstenite::connect_async(ws)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("a refused upgrade expected, got {:?}", other.map(|_| ())),
    }
    assert_running(&node).await;
    assert!(within("stop", node.stop()).await);
}

#[tokio::test]
async fn native_clients_and_the_uis_own_pages_are_served() {
    let node = start(config(3)).await;
    let ui = node.ui_addr();
    let port = ui.port();
    let own = [
        None,
        Some(format!("http://127.0.0.1:{port}")),
        Some(format!("http://localhost:{port}")),
        Some(format!("http://[::1]:{port}")),
        Some(format!("HTTP://LOCALHOST:{port}")),
    ];
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost.:{port}"),
        format!("[::1]:{port}"),
    ] {
        for origin in &own {
            let what = format!("Host {host} Origin {origin:?}");
            let status = send_raw(
                ui,
                &request("GET /status", Some(&host), origin.as_deref(), &[]),
            )
            .await;
            assert_eq!(status.status, 200, "{what}: {status:?}");
            assert!(status.body.contains("\"nodeId\""), "{what}");
            let upgrade = send_raw(ui, &request("ws", Some(&host), origin.as_deref(), &[])).await;
            assert_eq!(upgrade.status, 101, "{what}: {upgrade:?}");
            let missing = send_raw(
                ui,
                &request("GET /nope", Some(&host), origin.as_deref(), &[]),
            )
            .await;
            assert_eq!(missing.status, 404, "{what}: {missing:?}");
        }
    }
    // HTTP/1.0 without a Host, as a minimal native client sends it.
    let old = send_raw(ui, "GET /status HTTP/1.0\r\n\r\n").await;
    assert_eq!(old.status, 200, "{old:?}");
    // A page of the UI's own origin may shut the node down.
    let answer = send_raw(
        ui,
        &request(
            "POST /shutdown",
            Some(&format!("localhost:{port}")),
            Some(&format!("http://127.0.0.1:{port}")),
            &[],
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.body.contains("\"graceful\""), "{answer:?}");
    let report = within("the node ends", node.wait()).await;
    assert_eq!(report.outcome, ShutdownOutcome::Graceful);
}

#[tokio::test]
async fn allowed_names_and_origins_are_served_and_nothing_else_is() {
    let mut config = config(4);
    config
        .ui_web
        .allow_host(AllowedHost::parse("node.example").expect("a name"));
    config
        .ui_web
        .allow_origin(AllowedOrigin::parse("http://console.example:8080").expect("an origin"));
    let node = start(config).await;
    let ui = node.ui_addr();
    let port = ui.port();
    let served = [
        (format!("NODE.example:{port}"), None),
        (
            format!("node.example.:{port}"),
            Some(format!("http://node.example:{port}")),
        ),
        (
            format!("127.0.0.1:{port}"),
            Some("http://console.example:8080".to_owned()),
        ),
        (
            format!("node.example:{port}"),
            Some("http://Console.Example:8080".to_owned()),
        ),
    ];
    for (host, origin) in &served {
        let what = format!("Host {host} Origin {origin:?}");
        let answer = send_raw(
            ui,
            &request("GET /status", Some(host), origin.as_deref(), &[]),
        )
        .await;
        assert_eq!(answer.status, 200, "{what}: {answer:?}");
        let upgrade = send_raw(ui, &request("ws", Some(host), origin.as_deref(), &[])).await;
        assert_eq!(upgrade.status, 101, "{what}: {upgrade:?}");
    }
    let refused = [
        (
            format!("console.example:{port}"),
            None,
            codes::HOST_NOT_ALLOWED,
        ),
        (
            format!("evil.node.example:{port}"),
            None,
            codes::HOST_NOT_ALLOWED,
        ),
        (
            format!("127.0.0.1:{port}"),
            Some("http://console.example:8081".to_owned()),
            codes::ORIGIN_NOT_ALLOWED,
        ),
        (
            format!("127.0.0.1:{port}"),
            Some("https://console.example:8080".to_owned()),
            codes::ORIGIN_NOT_ALLOWED,
        ),
        (
            format!("127.0.0.1:{port}"),
            Some(format!("http://node.example:{port}")),
            codes::ORIGIN_NOT_ALLOWED,
        ),
    ];
    for (host, origin, code) in &refused {
        let what = format!("Host {host} Origin {origin:?}");
        let answer = send_raw(
            ui,
            &request("GET /status", Some(host), origin.as_deref(), &[]),
        )
        .await;
        answer.assert_forbidden("status", *code, &what);
    }
    assert!(within("stop", node.stop()).await);
}

#[tokio::test]
async fn the_token_and_the_web_policy_both_apply() {
    let mut config = config(5);
    config.ui_token = Some(UiToken::new(TOKEN).expect("a valid token"));
    let node = start(config).await;
    let ui = node.ui_addr();
    let port = ui.port();
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let here = format!("127.0.0.1:{port}");
    let own = format!("http://127.0.0.1:{port}");
    for route in ["GET /status", "ws", "POST /shutdown"] {
        // The right token does not let a foreign page or a rebound name in.
        let answer = send_raw(
            ui,
            &request(route, Some(&here), Some("http://evil.example"), &[&bearer]),
        )
        .await;
        assert_eq!(answer.status, 403, "{route}: {answer:?}");
        let answer = send_raw(ui, &request(route, Some("evil.example"), None, &[&bearer])).await;
        assert_eq!(answer.status, 403, "{route}: {answer:?}");
        // The UI's own page still needs the token.
        let answer = send_raw(ui, &request(route, Some(&here), Some(&own), &[])).await;
        assert_eq!(answer.status, 401, "{route}: {answer:?}");
    }
    let answer = send_raw(
        ui,
        &request("GET /status", Some(&here), Some(&own), &[&bearer]),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = send_raw(ui, &request("ws", Some(&here), Some(&own), &[&bearer])).await;
    assert_eq!(answer.status, 101, "{answer:?}");
    assert!(within("stop", node.stop()).await);
}

#[tokio::test]
async fn pages_that_pass_may_read_the_answers_and_preflights_are_answered_before_the_token() {
    let mut config = config(6);
    config.ui_token = Some(UiToken::new(TOKEN).expect("a valid token"));
    config
        .ui_web
        .allow_origin(AllowedOrigin::parse("http://console.example:8080").expect("an origin"));
    let node = start(config).await;
    let ui = node.ui_addr();
    let here = format!("127.0.0.1:{}", ui.port());
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let allowed = "http://console.example:8080";
    let lower = |answer: &Answer| answer.head.to_ascii_lowercase();

    // A preflight from an allowed page: answered at once, no token needed, nothing revealed.
    let answer = send_raw(
        ui,
        &request(
            "OPTIONS /shutdown",
            Some(&here),
            Some(allowed),
            &[
                "Access-Control-Request-Method: POST",
                "Access-Control-Request-Headers: authorization",
            ],
        ),
    )
    .await;
    assert_eq!(answer.status, 204, "{answer:?}");
    let head = lower(&answer);
    for want in [
        "access-control-allow-origin: http://console.example:8080",
        "access-control-allow-methods: get, post",
        "access-control-allow-headers: authorization, content-type",
        "vary: origin",
    ] {
        assert!(head.contains(want), "{want} not in {head}");
    }
    assert!(!head.contains("access-control-allow-credentials"), "{head}");

    // The answers themselves, the token's refusal included, are readable by that page.
    for (extra, status) in [(vec![bearer.as_str()], 200), (vec![], 401)] {
        let answer = send_raw(
            ui,
            &request("GET /status", Some(&here), Some(allowed), &extra),
        )
        .await;
        assert_eq!(answer.status, status, "{answer:?}");
        assert!(
            lower(&answer).contains("access-control-allow-origin: http://console.example:8080"),
            "{answer:?}"
        );
    }
    // The UI's own page under another loopback spelling, too.
    let own = format!("http://localhost:{}", ui.port());
    let answer = send_raw(
        ui,
        &request("GET /status", Some(&here), Some(&own), &[&bearer]),
    )
    .await;
    assert!(
        lower(&answer).contains(&format!("access-control-allow-origin: {own}")),
        "{answer:?}"
    );

    // A foreign page gets no preflight and no header; a native client no header either.
    let answer = send_raw(
        ui,
        &request(
            "OPTIONS /status",
            Some(&here),
            Some("http://evil.example"),
            &["Access-Control-Request-Method: GET"],
        ),
    )
    .await;
    answer.assert_forbidden("status", codes::ORIGIN_NOT_ALLOWED, "a foreign preflight");
    assert!(
        !lower(&answer).contains("access-control-allow-origin"),
        "{answer:?}"
    );
    let answer = send_raw(ui, &request("GET /status", Some(&here), None, &[&bearer])).await;
    assert_eq!(answer.status, 200);
    assert!(
        !lower(&answer).contains("access-control-allow-origin"),
        "{answer:?}"
    );
    assert!(within("stop", node.stop()).await);
}
