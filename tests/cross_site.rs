//! The UI refuses web pages it did not serve, through the real `meshnode` binary: the requests
//! of the report (a cross-site form POST, a cross-site websocket on a rebound name), the flags
//! that allow more, and a real headless Chromium opening pages of other sites, of a rebound
//! domain, and of the UI itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use meshnode_protocol::ui::{UI_SUBPROTOCOL, UiMessage, codes};
use serde_json::Value;

mod support;

use support::BOUND;
use support::browser::{Browser, PageServer};
use support::daemon::{Daemon, meshnode};

const FOREIGN_ORIGIN: &str = "UI request from a foreign web origin refused";
const UNKNOWN_HOST: &str = "UI request for an unknown Host refused";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends `request` as it is and reads the answer's head and, by its content-length, its body
/// (a refused websocket upgrade keeps the connection open). Returns the status code and body.
fn send(ui: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(ui).expect("the UI listens");
    stream.set_read_timeout(Some(BOUND)).expect("a timeout");
    stream.write_all(request.as_bytes()).expect("written");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |bytes: &[u8]| {
        let at = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = text(&bytes[..at]);
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        (bytes.len() >= at + length).then(|| (head, text(&bytes[at..at + length])))
    };
    let (head, body) = loop {
        if let Some(done) = complete(&bytes) {
            break done;
        }
        let n = stream.read(&mut buf).expect("an answer");
        assert!(n > 0, "the UI hung up before answering: {}", text(&bytes));
        bytes.extend_from_slice(&buf[..n]);
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    (status, body)
}

fn error_code(body: &str) -> u64 {
    let envelope: UiMessage = serde_json::from_str(body).expect("a MASQ error envelope");
    envelope.error.expect("an error").code
}

/// The node answers `meshnode status` (a native client: no Origin) and says it is running.
fn assert_running(ui: SocketAddr) {
    let out = meshnode(&["status", "--ui", &ui.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("state      running"), "{stdout}");
}

#[test]
fn the_reported_cross_site_post_and_rebound_websocket_are_refused_and_logged() {
    let mut daemon = Daemon::start(&[]);
    let ui = daemon.ui;
    let port = ui.port();

    // What a plain HTML form on any web site sends when the operator merely visits it.
    let form = format!(
        "POST /shutdown HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\
         Connection: close\r\n\r\nx=1"
    );
    let (status, body) = send(ui, &form);
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), codes::ORIGIN_NOT_ALLOWED, "{body}");
    let line = daemon.wait_for_line(FOREIGN_ORIGIN);
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    assert!(line.contains("/shutdown"), "{line}");
    assert!(line.contains("http://evil.example"), "{line}");

    // A websocket from a foreign page on a rebound name.
    let upgrade = format!(
        "GET / HTTP/1.1\r\nHost: rebind.evil.example:{port}\r\nOrigin: http://evil.example\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {UI_SUBPROTOCOL}\r\n\r\n"
    );
    let (status, body) = send(ui, &upgrade);
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), codes::HOST_NOT_ALLOWED, "{body}");
    let line = daemon.wait_for_line(UNKNOWN_HOST);
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    assert!(line.contains("rebind.evil.example"), "{line}");

    // Still running; native clients without an Origin work as before, shutdown included.
    assert_running(ui);
    let out = meshnode(&["shutdown", "--ui", &ui.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

#[test]
fn the_allow_flags_are_listed_checked_and_a_star_is_warned_about() {
    let out = meshnode(&["run", "--help"]);
    let help = text(&out.stdout);
    for flag in ["--ui-allow-host <NAME>", "--ui-allow-origin <ORIGIN>"] {
        assert!(help.contains(flag), "{flag} not in:\n{help}");
    }
    assert!(help.contains("DNS rebinding"), "{help}");

    let cases: [(&[&str], &str); 4] = [
        (&["--ui-allow-host", "node.example:5333"], "not a host name"),
        (
            &["--ui-allow-host", "http://node.example"],
            "not a host name",
        ),
        (&["--ui-allow-origin", "null"], "cannot be allowed"),
        (
            &["--ui-allow-origin", "console.example"],
            "scheme://host[:port]",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        let out = meshnode(&all);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in {stderr}"
        );
    }

    // Allowed names and origins are served; a star opens the door and says so.
    let mut daemon = Daemon::start(&[
        "--ui-allow-host",
        "node.example",
        "--ui-allow-origin",
        "http://console.example:8080",
    ]);
    let port = daemon.ui.port();
    let get = |host: &str, origin: &str| {
        format!(
            "GET /status HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n"
        )
    };
    let (status, body) = send(
        daemon.ui,
        &get(
            &format!("node.example:{port}"),
            "http://console.example:8080",
        ),
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = send(
        daemon.ui,
        &get(
            &format!("evil.example:{port}"),
            "http://console.example:8080",
        ),
    );
    assert_eq!(status, 403);
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
    let log = daemon.whole_log();
    assert!(log.contains("http://console.example:8080"), "{log}");
    assert!(log.contains("node.example"), "{log}");
    assert!(!log.contains("--ui-allow-host '*'"), "{log}");

    let mut daemon = Daemon::start(&["--ui-allow-host", "*", "--ui-allow-origin", "*"]);
    let port = daemon.ui.port();
    let (status, body) = send(
        daemon.ui,
        &get(&format!("evil.example:{port}"), "http://evil.example"),
    );
    assert_eq!(status, 200, "{body}");
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
    let log = daemon.whole_log();
    assert!(log.contains("--ui-allow-host '*'"), "{log}");
    assert!(log.contains("--ui-allow-origin '*'"), "{log}");
}

/// What the browser tests' pages can do: `attack(ui)` tries everything a foreign page can do
/// against the UI at `ui`; `socket(url, opcode)` speaks to a UI over a websocket as a UI page
/// would; `fetchPost(url, mode)` posts a form body. Each resolves to what the page saw, as JSON.
/// The test's own page carries it; on pages the node serves, the test evaluates it first, as a
/// script of that page would run. Nothing in it races a timer: each promise resolves on what
/// the page saw, and the evaluation as a whole is bounded by the browser driver's step bound.
const SCRIPT: &str = r#"
function formPost(ui) {
  return new Promise(resolve => {
    const frame = document.createElement('iframe');
    frame.name = 'sink';
    document.body.appendChild(frame);
    frame.onload = () => resolve('submitted');
    const form = document.createElement('form');
    form.method = 'POST';
    form.action = `http://${ui}/shutdown`;
    form.target = 'sink';
    const input = document.createElement('input');
    input.name = 'x';
    input.value = '1';
    form.appendChild(input);
    document.body.appendChild(form);
    form.submit();
  });
}
async function fetchPost(url, mode) {
  try {
    const r = await fetch(url, {method: 'POST', mode,
      headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'x=1'});
    let body = '';
    try { body = await r.text(); } catch (e) {}
    return {status: r.status, type: r.type, body};
  } catch (e) {
    return {error: e.name};
  }
}
function socket(url, opcode) {
  return new Promise(resolve => {
    const events = [];
    const s = new WebSocket(url, 'MASQNode-UIv2');
    s.onopen = () => {
      events.push('open');
      s.send(JSON.stringify({opcode, contextId: 1, payload: {}}));
    };
    s.onmessage = m => { events.push('message ' + m.data); s.close(); };
    s.onerror = () => events.push('error');
    s.onclose = e => { events.push('close ' + e.code); resolve(events); };
  });
}
async function attack(ui) {
  return {
    form: await formPost(ui),
    fetchCors: await fetchPost(`http://${ui}/shutdown`, 'cors'),
    fetchNoCors: await fetchPost(`http://${ui}/shutdown`, 'no-cors'),
    websocket: await socket(`ws://${ui}/`, 'shutdown'),
  };
}
"#;

/// The page of another site, served by the test.
fn page() -> String {
    format!(
        "<!doctype html><title>a web page</title><script>{SCRIPT}</script>\
         <body><p>nothing to see here</p></body>"
    )
}

/// Host names the browser resolves to loopback without any DNS, as a rebound domain would.
const RESOLVER_RULES: &str = "--host-resolver-rules=MAP evil.example 127.0.0.1,MAP *.evil.example 127.0.0.1,MAP console.example 127.0.0.1";

/// Waits for log lines with `needle` until one per path in `paths` has been seen (other paths,
/// such as a favicon, may come between), each from loopback.
fn wait_for_refusals(daemon: &mut Daemon, needle: &str, paths: &[&str]) -> Vec<String> {
    let mut left: Vec<&str> = paths.to_vec();
    let mut lines = Vec::new();
    while !left.is_empty() {
        let line = daemon.wait_for_line(needle);
        assert!(line.contains("client=127.0.0.1:"), "{line}");
        if let Some(at) = left
            .iter()
            .position(|path| line.contains(&format!("path=\"{path}\"")))
        {
            left.remove(at);
        }
        lines.push(line);
    }
    lines
}

fn events(result: &Value, key: &str) -> Vec<String> {
    result[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key}: {result}"))
        .iter()
        .map(|e| e.as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_cannot_drive_the_ui_from_another_site_or_a_rebound_domain() {
    let Some(browser) = Browser::launch(&[RESOLVER_RULES]).await else {
        return;
    };
    let mut browser = browser.expect("the browser starts");
    let page = PageServer::start(page()).await;
    let mut daemon = tokio::task::spawn_blocking(|| Daemon::start(&[]))
        .await
        .expect("the node starts");
    let ui = daemon.ui;
    let port = ui.port();

    // A page of another site: a form POST, fetch POSTs, a websocket sending shutdown.
    let evil = format!("http://evil.example:{}", page.addr.port());
    browser
        .goto(&format!("{evil}/"))
        .await
        .expect("the page opens");
    let seen = browser
        .eval(&format!("attack('127.0.0.1:{port}')"))
        .await
        .expect("the attack runs");
    assert_eq!(seen["form"], "submitted", "{seen}");
    // The CORS fetch fails (no Access-Control-Allow-Origin); the no-cors one is opaque.
    assert!(seen["fetchCors"]["error"].is_string(), "{seen}");
    assert_eq!(seen["fetchNoCors"]["type"], "opaque", "{seen}");
    let websocket = events(&seen, "websocket");
    assert!(!websocket.contains(&"open".to_owned()), "{seen}");
    assert!(websocket.contains(&"close 1006".to_owned()), "{seen}");
    let mut daemon = tokio::task::spawn_blocking(move || {
        let lines = wait_for_refusals(
            &mut daemon,
            FOREIGN_ORIGIN,
            &["/shutdown", "/shutdown", "/shutdown", "/"],
        );
        (daemon, lines)
    })
    .await
    .map(|(daemon, lines)| {
        for line in &lines {
            assert!(line.contains(&evil), "{line}");
        }
        daemon
    })
    .expect("the refusals are logged");
    tokio::task::spawn_blocking(move || assert_running(ui))
        .await
        .expect("still running");

    // A rebound domain: the page's own origin is the rebound name on the UI's port, so to the
    // browser the UI is same-origin; the Host check is what refuses it.
    let rebound = format!("http://rebind.evil.example:{port}");
    browser
        .goto(&format!("{rebound}/status"))
        .await
        .expect("the rebound page opens");
    browser.eval(SCRIPT).await.expect("the helpers load");
    let shown = browser
        .eval("document.body.innerText")
        .await
        .expect("evaluated");
    assert!(
        shown
            .as_str()
            .is_some_and(|s| s.contains("--ui-allow-host")),
        "the refusal is what the page shows: {shown}"
    );
    let seen = browser
        .eval(
            "(async () => ({ post: await fetchPost('/shutdown', 'cors'), \
             websocket: await socket(`ws://${location.host}/`, 'shutdown') }))()",
        )
        .await
        .expect("the script runs on the rebound page");
    assert_eq!(seen["post"]["status"], 403, "{seen}");
    let body = seen["post"]["body"].as_str().unwrap_or_default();
    assert_eq!(error_code(body), codes::HOST_NOT_ALLOWED, "{seen}");
    let websocket = events(&seen, "websocket");
    assert!(!websocket.contains(&"open".to_owned()), "{seen}");
    let mut daemon = tokio::task::spawn_blocking(move || {
        let lines = wait_for_refusals(&mut daemon, UNKNOWN_HOST, &["/status", "/shutdown", "/"]);
        (daemon, lines)
    })
    .await
    .map(|(daemon, lines)| {
        for line in &lines {
            assert!(line.contains("rebind.evil.example"), "{line}");
        }
        daemon
    })
    .expect("the refusals are logged");
    tokio::task::spawn_blocking(move || assert_running(ui))
        .await
        .expect("still running");

    // The UI's own page (a document the node serves) may do what the others could not: speak
    // on the websocket, and shut down. (The page is at 127.0.0.1, not `localhost`, which a
    // browser may try on ::1 first, where this test does not listen; the loopback spellings are
    // checked in `web_policy_tests`.)
    browser
        .goto(&format!("http://127.0.0.1:{port}/status"))
        .await
        .expect("the UI's own page opens");
    browser.eval(SCRIPT).await.expect("the helpers load");
    let seen = browser
        .eval(&format!(
            "(async () => ({{ websocket: await socket('ws://127.0.0.1:{port}/', 'status'), \
             post: await fetchPost('/shutdown', 'cors') }}))()"
        ))
        .await
        .expect("the script runs on the UI's own page");
    let websocket = events(&seen, "websocket");
    assert_eq!(
        websocket.first().map(String::as_str),
        Some("open"),
        "{seen}"
    );
    assert!(
        websocket.iter().any(|e| e.contains("\"nodeId\"")),
        "a status answer: {seen}"
    );
    if seen["post"]["status"] != 200 {
        let log = tokio::task::spawn_blocking(move || {
            daemon.signal("KILL");
            daemon.whole_log()
        })
        .await
        .expect("the log");
        panic!("the UI's own page could not shut the node down: {seen}\n{log}");
    }
    let body = seen["post"]["body"].as_str().unwrap_or_default();
    assert!(body.contains("\"graceful\""), "{seen}");
    let status = tokio::task::spawn_blocking(move || daemon.wait_exit())
        .await
        .expect("the node exits");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_drives_the_ui_from_an_allowed_origin_and_no_other() {
    let Some(browser) = Browser::launch(&[RESOLVER_RULES]).await else {
        return;
    };
    let mut browser = browser.expect("the browser starts");
    let page = PageServer::start(page()).await;
    let console = format!("http://console.example:{}", page.addr.port());
    let allowed = console.clone();
    let mut daemon =
        tokio::task::spawn_blocking(move || Daemon::start(&["--ui-allow-origin", &allowed]))
            .await
            .expect("the node starts");
    let port = daemon.ui.port();

    // The same page on another name is another origin: refused.
    browser
        .goto(&format!("http://evil.example:{}/", page.addr.port()))
        .await
        .expect("the page opens");
    let seen = browser
        .eval(&format!("socket('ws://127.0.0.1:{port}/', 'status')"))
        .await
        .expect("the script runs");
    let refused: Vec<String> = serde_json::from_value(seen.clone()).expect("events");
    assert!(!refused.contains(&"open".to_owned()), "{seen}");
    let read = browser
        .eval(&format!(
            "fetch('http://127.0.0.1:{port}/status').then(r => r.json()).then(j => j.nodeId, e => e.name)"
        ))
        .await
        .expect("the script runs");
    assert_eq!(read, "TypeError", "a foreign page cannot read the status");

    // The allowed origin reads the status, speaks to the UI and shuts the node down.
    browser
        .goto(&format!("{console}/"))
        .await
        .expect("the page opens");
    let read = browser
        .eval(&format!(
            "fetch('http://127.0.0.1:{port}/status').then(r => r.json()).then(j => j.nodeId, e => e.name)"
        ))
        .await
        .expect("the script runs");
    assert!(
        read.as_str().is_some_and(|id| id.len() == 64),
        "the allowed page reads the status: {read}"
    );
    let seen = browser
        .eval(&format!("socket('ws://127.0.0.1:{port}/', 'shutdown')"))
        .await
        .expect("the script runs");
    let events: Vec<String> = serde_json::from_value(seen.clone()).expect("events");
    assert_eq!(events.first().map(String::as_str), Some("open"), "{seen}");
    assert!(
        events.iter().any(|e| e.starts_with("message ")
            && e.contains("\"shutdown\"")
            && !e.contains("error")),
        "the shutdown is answered: {seen}"
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.wait_exit();
        (status, daemon.whole_log())
    })
    .await
    .expect("the node exits");
    assert_eq!(status.0.code(), Some(0), "{}", status.1);
    assert!(status.1.contains(FOREIGN_ORIGIN), "{}", status.1);
}
