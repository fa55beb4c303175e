//! The console as HTTP serves it: the page and its files with their headers, the routes
//! non-browser clients use exactly as before, and the login that stands in for the token.

use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderValue, Method, header};
use futures::{SinkExt, StreamExt};
use meshnode_protocol::Identity;
use meshnode_protocol::ui::{UI_SUBPROTOCOL, UiMessage, codes};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use super::*;
use crate::test_support::within;
use crate::{Config, Node};

const TOKEN: &str = "correct-horse-battery-staple";
/// What Chromium sends when it navigates to a page.
const BROWSER_ACCEPT: &str =
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

async fn start(token: Option<&str>) -> Node {
    let mut config = Config::new(Identity::from_seed([21; 32]));
    config.ui_token = token.map(|t| crate::config::UiToken::new(t).expect("a valid token"));
    within("the node starts", crate::start(config))
        .await
        .expect("the node binds loopback ports")
}

async fn stop(node: Node) {
    assert!(within("the node stops", node.stop()).await);
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a plain HTTP client builds")
}

async fn get(ui: SocketAddr, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = http().get(format!("http://{ui}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    within("the UI answers", request.send())
        .await
        .expect("the UI answers HTTP")
}

async fn post(
    ui: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> reqwest::Response {
    let mut request = http()
        .post(format!("http://{ui}{path}"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    within("the UI answers", request.send())
        .await
        .expect("the UI answers HTTP")
}

fn header_of<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Checks the headers every console file carries.
fn assert_console_headers(response: &reqwest::Response, content_type: &str, what: &str) {
    assert_eq!(response.status(), reqwest::StatusCode::OK, "{what}");
    assert_eq!(header_of(response, "content-type"), content_type, "{what}");
    let csp = header_of(response, "content-security-policy");
    assert!(csp.starts_with("default-src 'self'"), "{what}: {csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe"), "{what}: {csp}");
    assert_eq!(
        header_of(response, "x-content-type-options"),
        "nosniff",
        "{what}"
    );
    assert_eq!(header_of(response, "x-frame-options"), "DENY", "{what}");
}

#[test]
fn a_browser_navigation_wants_the_page_and_nothing_else_does() {
    let headers = |pairs: &[(&'static str, &'static str)]| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    };
    assert!(wants_page(&headers(&[("accept", BROWSER_ACCEPT)])));
    assert!(wants_page(&headers(&[("accept", "TEXT/HTML; q=0.5")])));
    assert!(!wants_page(&headers(&[])), "curl without Accept");
    assert!(
        !wants_page(&headers(&[("accept", "*/*")])),
        "curl's default"
    );
    assert!(!wants_page(&headers(&[("accept", "application/json")])));
    assert!(!wants_page(&headers(&[("accept", "text/htmlx")])));
    assert!(
        !wants_page(&headers(&[
            ("accept", BROWSER_ACCEPT),
            ("upgrade", "websocket")
        ])),
        "a websocket upgrade from a browser goes to the websocket"
    );

    let page = headers(&[("accept", BROWSER_ACCEPT)]);
    assert!(is_public(&Method::GET, "/", &page));
    assert!(!is_public(&Method::GET, "/", &HeaderMap::new()));
    assert!(!is_public(&Method::POST, "/", &page));
    assert!(is_public(&Method::GET, SCRIPT_PATH, &HeaderMap::new()));
    assert!(is_public(&Method::GET, STYLE_PATH, &HeaderMap::new()));
    assert!(is_public(&Method::POST, LOGIN_PATH, &HeaderMap::new()));
    assert!(!is_public(&Method::GET, "/status", &page));
    assert!(!is_public(&Method::POST, "/shutdown", &page));
    assert!(!is_public(&Method::GET, "/console/other", &page));
}

#[test]
fn form_fields_decode_as_browsers_encode_them() {
    assert_eq!(form_field(b"token=abc", "token"), Some(b"abc".to_vec()));
    assert_eq!(
        form_field(b"x=1&token=a%2Bb%21+c&y=2", "token"),
        Some(b"a+b! c".to_vec())
    );
    assert_eq!(form_field(b"tok%65n=v", "token"), Some(b"v".to_vec()));
    assert_eq!(form_field(b"token=", "token"), Some(Vec::new()));
    assert_eq!(form_field(b"token", "token"), Some(Vec::new()));
    assert_eq!(form_field(b"other=1", "token"), None);
    assert_eq!(form_field(b"token=%G1", "token"), None, "a bad escape");
    assert_eq!(form_field(b"token=%4", "token"), None, "a cut escape");
    assert_eq!(form_field(b"", "token"), None);
}

#[test]
fn only_the_nodes_own_origin_counts_as_same_origin() {
    let headers = |origin: Option<&'static str>| {
        let mut map = HeaderMap::new();
        map.insert(header::HOST, HeaderValue::from_static("127.0.0.1:5333"));
        if let Some(origin) = origin {
            map.insert(header::ORIGIN, HeaderValue::from_static(origin));
        }
        map
    };
    assert!(
        same_origin(&headers(None)),
        "no Origin: not a cross-site request"
    );
    assert!(same_origin(&headers(Some("http://127.0.0.1:5333"))));
    assert!(
        !same_origin(&headers(Some("http://127.0.0.1:8080"))),
        "another port"
    );
    assert!(!same_origin(&headers(Some("http://evil.example"))));
    assert!(!same_origin(&headers(Some("null"))));
    assert!(!same_origin(&headers(Some("https://127.0.0.1:5333"))));
}

#[test]
fn the_session_cookie_is_checked_by_name_value_and_origin() {
    let session = Session::new(5333).expect("randomness");
    let set = session.set_cookie();
    let set = set.to_str().expect("ASCII");
    assert!(set.starts_with("meshnode_session_5333="), "{set}");
    assert!(set.contains("; HttpOnly"), "{set}");
    assert!(set.contains("; SameSite=Strict"), "{set}");
    assert!(set.contains("; Path=/"), "{set}");
    let pair = set.split(';').next().expect("name=value").to_owned();
    let with = |cookie: &str, origin: Option<&'static str>| {
        let mut map = HeaderMap::new();
        map.insert(header::HOST, HeaderValue::from_static("127.0.0.1:5333"));
        map.insert(
            header::COOKIE,
            HeaderValue::from_str(cookie).expect("value"),
        );
        if let Some(origin) = origin {
            map.insert(header::ORIGIN, HeaderValue::from_static(origin));
        }
        session.presented_in(&map)
    };
    assert_eq!(with(&pair, None), CookieCheck::Valid);
    assert_eq!(with(&format!("a=b; {pair}; c=d"), None), CookieCheck::Valid);
    assert_eq!(
        with(&pair, Some("http://127.0.0.1:5333")),
        CookieCheck::Valid
    );
    assert_eq!(
        with(&pair, Some("http://127.0.0.1:9999")),
        CookieCheck::Wrong
    );
    assert_eq!(with("meshnode_session_5333=00", None), CookieCheck::Wrong);
    assert_eq!(with(&format!("{pair}x"), None), CookieCheck::Wrong);
    assert_eq!(
        with("meshnode_session_5334=00; other=1", None),
        CookieCheck::Absent
    );
    assert_eq!(session.presented_in(&HeaderMap::new()), CookieCheck::Absent);
    let other = Session::new(5333).expect("randomness");
    assert_ne!(other.key, session.key, "a new key for each run");
    assert!(
        !format!("{session:?}").contains(&session.key),
        "Debug hides the key"
    );
}

#[tokio::test]
async fn a_browser_gets_the_page_and_its_files_with_a_strict_policy() {
    let node = start(None).await;
    let ui = node.ui_addr();

    let page = get(ui, "/", &[("accept", BROWSER_ACCEPT)]).await;
    assert_console_headers(&page, "text/html; charset=utf-8", "the page");
    let html = within("the page's body", page.text()).await.expect("text");
    assert!(html.contains(r#"<script src="/console/console.js" defer></script>"#));
    assert!(html.contains(r#"<link rel="stylesheet" href="/console/console.css">"#));
    // Nothing inline that the policy would block, and nothing from elsewhere.
    assert_eq!(html.matches("<script").count(), 1, "one script, by src");
    assert!(!html.contains("<style"), "no inline style element");
    assert!(!html.contains(" style="), "no style attribute");
    let handler = html.split(" on").skip(1).find(|rest| {
        let name_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        name_len > 0 && rest[name_len..].starts_with('=')
    });
    assert_eq!(handler, None, "no inline event handler");
    assert!(!html.contains("http://") && !html.contains("https://"));

    let script = get(ui, SCRIPT_PATH, &[]).await;
    assert_console_headers(&script, "text/javascript; charset=utf-8", "the script");
    let js = within("the script", script.text()).await.expect("text");
    assert!(js.contains("MASQNode-UIv2"));
    assert!(!js.contains("eval("), "the policy forbids eval");
    let style = get(ui, STYLE_PATH, &[]).await;
    assert_console_headers(&style, "text/css; charset=utf-8", "the style");
    let css = within("the style", style.text()).await.expect("text");
    assert!(
        !css.contains("@import") && !css.contains("url("),
        "nothing fetched"
    );
    stop(node).await;
}

#[tokio::test]
async fn non_browser_clients_meet_the_routes_as_before() {
    let node = start(None).await;
    let ui = node.ui_addr();

    // GET / without an upgrade and without Accept: text/html is a failed websocket upgrade, as
    // it always was.
    for accept in [None, Some("*/*"), Some("application/json")] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
        let response = get(ui, "/", &headers).await;
        assert_eq!(
            response.status(),
            reqwest::StatusCode::BAD_REQUEST,
            "{accept:?}"
        );
        assert!(response.headers().get("content-security-policy").is_none());
    }
    let response = get(ui, "/status", &[("accept", BROWSER_ACCEPT)]).await;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert_eq!(header_of(&response, "content-type"), "application/json");

    // A websocket upgrade, even one that also accepts HTML, is the MASQ UI.
    let mut request = format!("ws://{ui}/").into_client_request().expect("a URL");
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(UI_SUBPROTOCOL),
    );
    headers.insert("Accept", HeaderValue::from_static(BROWSER_ACCEPT));
    let (mut socket, _) = within("the upgrade", tokio_tungstenite::connect_async(request))
        .await
        .expect("the upgrade succeeds");
    let status = json!({"opcode": "status", "contextId": 3, "payload": {}}).to_string();
    within("send", socket.send(Message::text(status)))
        .await
        .expect("sent");
    let Some(Ok(Message::Text(answer))) = within("the answer", socket.next()).await else {
        panic!("a text answer expected");
    };
    let answer: UiMessage = serde_json::from_str(answer.as_str()).expect("an envelope");
    assert_eq!(answer.context_id, Some(3));
    assert!(answer.error.is_none());
    let _ = within("close", socket.close(None)).await;

    // Login without a token on the node: nothing to log in to, nothing set.
    let response = post(ui, LOGIN_PATH, &[], "token=x").await;
    assert_eq!(response.status(), reqwest::StatusCode::NO_CONTENT);
    assert!(response.headers().get("set-cookie").is_none());
    stop(node).await;
}

#[tokio::test]
async fn with_a_token_the_page_is_public_and_the_login_cookie_stands_for_the_token() {
    let node = start(Some(TOKEN)).await;
    let ui = node.ui_addr();
    let own_origin = format!("http://{ui}");

    // The page and its files need no token: they are how a person gets to type it.
    let page = get(ui, "/", &[("accept", BROWSER_ACCEPT)]).await;
    assert_console_headers(&page, "text/html; charset=utf-8", "the page");
    let script = get(ui, SCRIPT_PATH, &[]).await;
    assert_eq!(script.status(), reqwest::StatusCode::OK);
    // Everything else still wants it.
    let status = get(ui, "/status", &[]).await;
    assert_eq!(status.status(), reqwest::StatusCode::UNAUTHORIZED);

    // Wrong tokens, a malformed form, and another origin are refused without a cookie (another
    // origin by the UI's Origin check, before the login sees it).
    for (body, origin, want, code) in [
        (
            "token=wrong",
            None,
            reqwest::StatusCode::UNAUTHORIZED,
            codes::UNAUTHORIZED,
        ),
        (
            "token=correct-horse",
            None,
            reqwest::StatusCode::UNAUTHORIZED,
            codes::UNAUTHORIZED,
        ),
        (
            "nothing=here",
            None,
            reqwest::StatusCode::BAD_REQUEST,
            codes::UNAUTHORIZED,
        ),
        (
            "token=correct-horse-battery-staple",
            Some("http://evil.example"),
            reqwest::StatusCode::FORBIDDEN,
            codes::ORIGIN_NOT_ALLOWED,
        ),
    ] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("origin", o)).into_iter().collect();
        let response = post(ui, LOGIN_PATH, &headers, body).await;
        assert_eq!(response.status(), want, "{body} from {origin:?}");
        assert!(response.headers().get("set-cookie").is_none(), "{body}");
        let envelope: UiMessage = within("the body", response.json())
            .await
            .expect("an error envelope");
        assert_eq!(envelope.error.expect("an error").code, code, "{body}");
    }

    // The right token, percent-encoded as a browser's form would send it, from the page.
    let body = format!("token={}", TOKEN.replace('-', "%2D"));
    let response = post(ui, LOGIN_PATH, &[("origin", &own_origin)], &body).await;
    assert_eq!(response.status(), reqwest::StatusCode::NO_CONTENT);
    let set = header_of(&response, "set-cookie").to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(!set.contains(TOKEN), "the cookie is not the token: {set}");
    let cookie = set.split(';').next().expect("name=value").to_owned();

    // The cookie opens the HTTP routes and the websocket, as the token does.
    let status = get(ui, "/status", &[("cookie", &cookie)]).await;
    assert_eq!(status.status(), reqwest::StatusCode::OK);
    // ...but not from a page of another origin (cookies ignore ports): the Origin check
    // refuses it before the cookie is looked at.
    let foreign = get(
        ui,
        "/status",
        &[("cookie", &cookie), ("origin", "http://127.0.0.1:1")],
    )
    .await;
    assert_eq!(foreign.status(), reqwest::StatusCode::FORBIDDEN);
    let other_port = get(ui, "/status", &[("cookie", "meshnode_session_1=00")]).await;
    assert_eq!(other_port.status(), reqwest::StatusCode::UNAUTHORIZED);
    // A cookie of an earlier run: refused, with a message that says so.
    let name = cookie.split('=').next().expect("a name");
    let stale = format!("{name}={}", "0".repeat(64));
    let stale = get(ui, "/status", &[("cookie", &stale)]).await;
    assert_eq!(stale.status(), reqwest::StatusCode::UNAUTHORIZED);
    let envelope: UiMessage = within("the body", stale.json())
        .await
        .expect("an error envelope");
    let error = envelope.error.expect("an error");
    assert_eq!(error.code, codes::UNAUTHORIZED);
    assert!(error.message.contains("log in again"), "{}", error.message);

    let mut request = format!("ws://{ui}/").into_client_request().expect("a URL");
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(UI_SUBPROTOCOL),
    );
    headers.insert("Cookie", HeaderValue::from_str(&cookie).expect("a value"));
    headers.insert(
        "Origin",
        HeaderValue::from_str(&own_origin).expect("a value"),
    );
    let (mut socket, _) = within("the upgrade", tokio_tungstenite::connect_async(request))
        .await
        .expect("the cookie opens the websocket");
    let status = json!({"opcode": "status", "contextId": 1, "payload": {}}).to_string();
    within("send", socket.send(Message::text(status)))
        .await
        .expect("sent");
    let Some(Ok(Message::Text(answer))) = within("the answer", socket.next()).await else {
        panic!("a text answer expected");
    };
    let answer: UiMessage = serde_json::from_str(answer.as_str()).expect("an envelope");
    assert_eq!(answer.payload.expect("a status")["state"], "running");
    let _ = within("close", socket.close(None)).await;

    // Without the cookie the websocket stays shut.
    let mut request = format!("ws://{ui}/").into_client_request().expect("a URL");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(UI_SUBPROTOCOL),
    );
    match within("the upgrade", tokio_tungstenite::connect_async(request)).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(
                response.status(),
                reqwest::StatusCode::UNAUTHORIZED.as_u16()
            );
        }
        other => panic!("401 expected, got {other:?}"),
    }

    // Logout tells the browser to forget the cookie.
    let response = post(ui, LOGOUT_PATH, &[], "").await;
    assert_eq!(response.status(), reqwest::StatusCode::NO_CONTENT);
    assert!(header_of(&response, "set-cookie").contains("Max-Age=0"));
    stop(node).await;
}

#[tokio::test]
async fn status_names_the_stream_to_each_neighbor_and_who_opened_it() {
    use meshnode_protocol::ui::StreamDirection;
    let a = start(None).await;
    let mut config = Config::new(Identity::from_seed([22; 32]));
    config.neighbors = vec![a.listen_addr().to_string()];
    let b = within("B starts", crate::start(config))
        .await
        .expect("B binds loopback ports");
    let neighbors = |s: &meshnode_protocol::ui::StatusPayload| {
        s.neighbors
            .iter()
            .map(|n| (n.node_id.clone(), n.full, n.stream))
            .collect::<Vec<_>>()
    };
    let want_a = vec![(b.id().to_string(), true, Some(StreamDirection::Accepted))];
    let want_b = vec![(a.id().to_string(), true, Some(StreamDirection::Dialed))];
    let (a_status, b_status) = within("A and B are full neighbors over B's stream", async {
        loop {
            if let (Ok(sa), Ok(sb)) = (a.status().await, b.status().await) {
                if neighbors(&sa) == want_a && neighbors(&sb) == want_b {
                    break (sa, sb);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let a_json = serde_json::to_value(&a_status).expect("JSON");
    assert_eq!(a_json["neighbors"][0]["stream"], "accepted");
    let b_json = serde_json::to_value(&b_status).expect("JSON");
    assert_eq!(b_json["neighbors"][0]["stream"], "dialed");
    stop(b).await;
    stop(a).await;
}
