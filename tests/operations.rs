//! What operators run the node with: `/metrics` read by a real Prometheus parser, systemd's
//! readiness protocol played by the test, JSON logs, `--advertise`, and the MASQ opcodes
//! `descriptor` and `connectionStatus` with the `connectionChange` broadcast, byte for byte.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meshnode::config::{Advertise, UiToken};
use meshnode::ui_gateway::metrics::{Kind, STATS_METRICS};
use meshnode::{Config, Node, ShutdownOutcome};
use meshnode_protocol::Identity;
use tokio_tungstenite::tungstenite::Message;

use support::daemon::{Daemon, meshnode, runtime};
use support::{BOUND, FakePeer, TempDir, Websocket, eventually, node, websocket, within};

// ---------------------------------------------------------------------------------------------
// In-process nodes

/// The next text frame.
async fn next_text(ws: &mut Websocket) -> String {
    loop {
        let message = within("a UI message", ws.next())
            .await
            .expect("the connection is open")
            .expect("a frame");
        match message {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("not a text frame: {other:?}"),
        }
    }
}

/// Sends `request` and returns the text of its response (the one with `contextId`), skipping
/// broadcasts, which have none.
async fn ask(ws: &mut Websocket, context_id: u64, request: &str) -> String {
    within("send", ws.send(Message::Text(request.into())))
        .await
        .expect("sent");
    let tag = format!("\"contextId\":{context_id},");
    loop {
        let text = next_text(ws).await;
        if text.contains(&tag) {
            return text;
        }
    }
}

/// Waits for the broadcast whose text is exactly `expected`, skipping other broadcasts.
async fn broadcast(ws: &mut Websocket, expected: &str) {
    let mut seen = Vec::new();
    let wait = async {
        loop {
            let text = next_text(ws).await;
            if text == expected {
                return;
            }
            seen.push(text);
        }
    };
    if tokio::time::timeout(BOUND, wait).await.is_err() {
        panic!("no broadcast {expected} within {BOUND:?}; saw {seen:?}");
    }
}

fn connection_change(stage: &str) -> String {
    format!(r#"{{"opcode":"connectionChange","payload":{{"stage":"{stage}"}}}}"#)
}

#[tokio::test]
async fn descriptor_connection_status_and_connection_change_byte_for_byte() {
    let a = node(1, &[]).await;
    let mut ui = websocket(a.ui_addr()).await;
    let descriptor = ask(
        &mut ui,
        1,
        r#"{"opcode":"descriptor","contextId":1,"payload":{}}"#,
    )
    .await;
    assert_eq!(
        descriptor,
        format!(
            r#"{{"opcode":"descriptor","contextId":1,"payload":{{"nodeDescriptorOpt":"meshnode://{}@{}"}}}}"#,
            a.id(),
            a.listen_addr()
        )
    );
    let stage = ask(
        &mut ui,
        2,
        r#"{"opcode":"connectionStatus","contextId":2,"payload":{}}"#,
    )
    .await;
    assert_eq!(
        stage,
        r#"{"opcode":"connectionStatus","contextId":2,"payload":{"stage":"NotConnected"}}"#
    );

    // A full neighbor: the stage changes, and every UI hears it.
    let b = node(2, &[&a]).await;
    broadcast(&mut ui, &connection_change("ConnectedToNeighbor")).await;
    let stage = ask(
        &mut ui,
        3,
        r#"{"opcode":"connectionStatus","contextId":3,"payload":{}}"#,
    )
    .await;
    assert_eq!(
        stage,
        r#"{"opcode":"connectionStatus","contextId":3,"payload":{"stage":"ConnectedToNeighbor"}}"#
    );

    // A chain A - B - C - D: D is three hops from A over full neighborships.
    let c = node(3, &[&b]).await;
    let d = node(4, &[&c]).await;
    broadcast(&mut ui, &connection_change("RouteFound")).await;

    // D leaves: the route is gone.
    let report = within("D's shutdown", d.shutdown())
        .await
        .expect("answered");
    assert_eq!(report.outcome, ShutdownOutcome::Graceful);
    broadcast(&mut ui, &connection_change("ConnectedToNeighbor")).await;

    for n in [b, c] {
        within("shutdown", n.shutdown()).await.expect("answered");
    }
    broadcast(&mut ui, &connection_change("NotConnected")).await;
    let _ = within("close", ui.close(None)).await;
    within("A's shutdown", a.shutdown())
        .await
        .expect("answered");
}

/// The samples of a scrape, by name and labels (`name{k="v",...}` with labels sorted).
fn scrape_samples(text: &str) -> HashMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text scrape");
    let mut samples = HashMap::new();
    for sample in scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            other => panic!("{}: unexpected value {other:?}", sample.metric),
        };
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        labels.sort();
        let key = if labels.is_empty() {
            sample.metric.clone()
        } else {
            format!("{}{{{}}}", sample.metric, labels.join(","))
        };
        samples.insert(key, value);
    }
    samples
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(BOUND)
        .build()
        .expect("a client")
}

async fn metrics(node: &Node) -> HashMap<String, f64> {
    let response = within(
        "GET /metrics",
        http()
            .get(format!("http://{}/metrics", node.ui_addr()))
            .send(),
    )
    .await
    .expect("answered");
    assert!(response.status().is_success(), "{response:?}");
    let kind = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(
        kind.as_deref(),
        Some(meshnode::ui_gateway::metrics::CONTENT_TYPE)
    );
    let text = within("the body", response.text()).await.expect("a body");
    scrape_samples(&text)
}

fn value(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {samples:?}"))
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_the_mesh() {
    let a = node(11, &[]).await;
    let before = metrics(&a).await;
    assert_eq!(value(&before, r#"meshnode_state{state="running"}"#), 1.0);
    assert_eq!(
        value(&before, r#"meshnode_state{state="shutting_down"}"#),
        0.0
    );
    assert_eq!(value(&before, r#"meshnode_neighbors{kind="full"}"#), 0.0);
    assert_eq!(value(&before, "meshnode_known_records"), 1.0);
    assert_eq!(value(&before, "meshnode_streams_open"), 0.0);
    for row in STATS_METRICS {
        let name = match row.kind {
            Kind::Counter => format!("meshnode_{}_total", row.name),
            Kind::Gauge => format!("meshnode_{}", row.name),
        };
        assert!(before.contains_key(&name), "no {name} in {before:?}");
    }
    let info = format!(
        r#"meshnode_node_info{{node_id="{}",version="{}"}}"#,
        a.id(),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&before, &info), 1.0);
    assert!(!before.keys().any(|k| k.starts_with("meshnode_shutdown")));

    let b = node(12, &[&a]).await;
    // Polled until every figure asserted below holds (the mesh is then stable).
    let settled = |m: &HashMap<String, f64>| {
        m.get(r#"meshnode_neighbors{kind="full"}"#) == Some(&1.0)
            && m.get(r#"meshnode_neighbors{kind="half"}"#) == Some(&0.0)
            && m.get("meshnode_known_records") == Some(&2.0)
            && m.get("meshnode_streams_open") == Some(&1.0)
            && m.get("meshnode_streams_accepted_total") == Some(&1.0)
            && m.get("meshnode_gossip_frames_received_total") >= Some(&1.0)
            && m.get("meshnode_records_accepted_total") >= Some(&1.0)
    };
    let deadline = tokio::time::Instant::now() + BOUND;
    let mut last = metrics(&a).await;
    while !settled(&last) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's metrics never showed B as a full neighbor: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        last = metrics(&a).await;
    }
    assert_eq!(value(&last, r#"meshnode_neighbors{kind="full"}"#), 1.0);
    assert_eq!(value(&last, r#"meshnode_neighbors{kind="half"}"#), 0.0);
    assert_eq!(value(&last, "meshnode_known_records"), 2.0);
    assert_eq!(value(&last, "meshnode_streams_open"), 1.0);
    assert_eq!(value(&last, "meshnode_streams_accepted_total"), 1.0);
    assert!(value(&last, "meshnode_gossip_frames_received_total") >= 1.0);
    assert!(value(&last, "meshnode_records_accepted_total") >= 1.0);

    within("B's shutdown", b.shutdown())
        .await
        .expect("answered");
    within("A's shutdown", a.shutdown())
        .await
        .expect("answered");
}

#[tokio::test]
async fn a_stopping_node_shows_its_shutdown_in_metrics_and_no_descriptor() {
    let mut config = Config::new(Identity::from_seed([21; 32]));
    // The neighbor, not the deadline, ends the shutdown: it hangs up only once the test has
    // seen the shutdown under way, however long that takes on a loaded machine.
    config.shutdown_deadline = Duration::from_secs(60);
    let a = support::start(config).await;
    let mut neighbor = FakePeer::connect(a.listen_addr(), Identity::from_seed([22; 32])).await;
    let id = neighbor.id().to_string();
    eventually("the neighbor is admitted", || async {
        a.status()
            .await
            .is_ok_and(|s| s.neighbors.iter().any(|n| n.node_id == id))
    })
    .await;
    let mut ui = websocket(a.ui_addr()).await;
    within("the request", a.request_shutdown())
        .await
        .expect("asked");
    broadcast_opcode(&mut ui, "shuttingDown").await;

    let descriptor = ask(
        &mut ui,
        1,
        r#"{"opcode":"descriptor","contextId":1,"payload":{}}"#,
    )
    .await;
    assert_eq!(
        descriptor,
        r#"{"opcode":"descriptor","contextId":1,"payload":{"nodeDescriptorOpt":null}}"#
    );
    let during = metrics(&a).await;
    assert_eq!(
        value(&during, r#"meshnode_state{state="shutting_down"}"#),
        1.0
    );
    assert_eq!(
        value(
            &during,
            r#"meshnode_shutdown_outcome{outcome="in_progress"}"#
        ),
        1.0
    );
    assert_eq!(
        value(&during, r#"meshnode_shutdown_outcome{outcome="graceful"}"#),
        0.0
    );
    assert_eq!(value(&during, "meshnode_shutdown_deadline_seconds"), 60.0);
    assert_eq!(value(&during, "meshnode_shutdown_requests"), 1.0);
    assert!(value(&during, "meshnode_shutdown_elapsed_seconds") >= 0.0);

    // The neighbor reads its withdrawal and the end of stream, then hangs up: the end.
    within("the neighbor reads to the end", neighbor.rest()).await;
    drop(neighbor);
    let report = within("the node ends", a.wait()).await;
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Graceful,
        "{}",
        report.render()
    );
}

/// Waits for a broadcast with `opcode`.
async fn broadcast_opcode(ws: &mut Websocket, opcode: &str) {
    let tag = format!(r#"{{"opcode":"{opcode}","payload":"#);
    loop {
        if next_text(ws).await.starts_with(&tag) {
            return;
        }
    }
}

#[tokio::test]
async fn metrics_want_the_ui_token_like_every_route() {
    let mut config = Config::new(Identity::from_seed([31; 32]));
    config.ui_token = Some(UiToken::new("metrics-secret").expect("a token"));
    let a = support::start(config).await;
    let url = format!("http://{}/metrics", a.ui_addr());
    let refused = within("GET /metrics", http().get(&url).send())
        .await
        .expect("answered");
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    let body = within("the body", refused.text()).await.expect("a body");
    assert!(body.contains(r#""opcode":"metrics""#), "{body}");
    let wrong = within("GET /metrics", http().get(&url).bearer_auth("nope").send())
        .await
        .expect("answered");
    assert_eq!(wrong.status(), reqwest::StatusCode::UNAUTHORIZED);
    let allowed = within(
        "GET /metrics",
        http().get(&url).bearer_auth("metrics-secret").send(),
    )
    .await
    .expect("answered");
    assert!(allowed.status().is_success());
    let text = within("the body", allowed.text()).await.expect("a body");
    assert!(scrape_samples(&text).contains_key(r#"meshnode_state{state="running"}"#));
    within("shutdown", a.shutdown()).await.expect("answered");
}

#[tokio::test]
async fn a_wildcard_listen_advertises_the_given_address_and_needs_one() {
    let public = "203.0.113.7:4000";
    let mut config = Config::new(Identity::from_seed([41; 32]));
    config.listen = SocketAddr::from(([0, 0, 0, 0], 0));
    config.advertise = Some(Advertise::new(public).expect("dialable"));
    let a = support::start(config).await;
    // Neighbors reach it on loopback; its record names the advertised address.
    let port = a.listen_addr().port();
    let mut config = Config::new(Identity::from_seed([42; 32]));
    config.neighbors = vec![format!("127.0.0.1:{port}")];
    let b = support::start(config).await;
    let a_id = a.id().to_string();
    eventually("B has A's record", || async {
        b.status()
            .await
            .is_ok_and(|s| s.known_nodes.iter().any(|k| k.node_id == a_id))
    })
    .await;
    let known = b.status().await.expect("status").known_nodes;
    let record = known
        .iter()
        .find(|k| k.node_id == a_id)
        .expect("A's record");
    assert_eq!(record.addr, public);
    let own = a.status().await.expect("status").known_nodes;
    let own = own
        .iter()
        .find(|k| k.node_id == a_id)
        .expect("its own record");
    assert_eq!(own.addr, public);
    let mut ui = websocket(a.ui_addr()).await;
    let descriptor = ask(
        &mut ui,
        1,
        r#"{"opcode":"descriptor","contextId":1,"payload":{}}"#,
    )
    .await;
    assert!(
        descriptor.contains(&format!("\"meshnode://{a_id}@{public}\"")),
        "{descriptor}"
    );
    let _ = within("close", ui.close(None)).await;
    within("B's shutdown", b.shutdown())
        .await
        .expect("answered");
    within("A's shutdown", a.shutdown())
        .await
        .expect("answered");

    // Without --advertise, a wildcard listen does not start.
    let mut config = Config::new(Identity::from_seed([43; 32]));
    config.listen = SocketAddr::from(([0, 0, 0, 0], 0));
    let err = meshnode::start(config).await.expect_err("a wildcard");
    assert!(matches!(err, meshnode::StartError::Advertise(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// The test's end of `NOTIFY_SOCKET`: every line of every datagram, in order.
struct Systemd {
    socket: UnixDatagram,
    path: PathBuf,
    lines: Vec<String>,
    /// Lines before this one have been looked through by `until`.
    cursor: usize,
    _dir: TempDir,
}

impl Systemd {
    fn new(name: &str) -> Self {
        let dir = TempDir::new(name);
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("the notify socket binds");
        socket
            .set_read_timeout(Some(BOUND))
            .expect("a read timeout");
        Self {
            socket,
            path,
            lines: Vec::new(),
            cursor: 0,
            _dir: dir,
        }
    }

    fn env(&self) -> (&'static str, &str) {
        (
            meshnode::notify::NOTIFY_SOCKET,
            self.path.to_str().expect("a UTF-8 path"),
        )
    }

    /// Reads datagrams until a line after the last one found satisfies `wanted`; returns it.
    fn until(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let mut buffer = vec![0; 4096];
        loop {
            if let Some(at) = self.lines[self.cursor..].iter().position(|l| wanted(l)) {
                self.cursor += at + 1;
                return self.lines[self.cursor - 1].clone();
            }
            let n = self
                .socket
                .recv(&mut buffer)
                .unwrap_or_else(|e| panic!("no {what}: {e}; got {:?}", self.lines));
            let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
            self.lines.extend(text.lines().map(str::to_owned));
        }
    }

    /// The position of the first line equal to or starting with `prefix`.
    fn position(&self, prefix: &str) -> usize {
        self.lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {:?}", self.lines))
    }

    /// Checks that the protocol's messages came in this order.
    fn assert_in_order(&self, prefixes: &[&str]) {
        let positions: Vec<usize> = prefixes.iter().map(|p| self.position(p)).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "not in the order {prefixes:?}: {:?}",
            self.lines
        );
    }
}

#[test]
fn systemd_hears_ready_status_stopping_the_extension_and_the_stream_waited_for() {
    let mut systemd = Systemd::new("notify-graceful");
    let env = [systemd.env()];
    // The neighbor, not the deadline, ends the shutdown: it hangs up only once systemd has
    // heard that the node waits for its stream, however long that takes on a loaded machine.
    let mut node = Daemon::start_with_env(&["--shutdown-deadline", "60s"], &env);
    systemd.until("READY=1", |l| l == "READY=1");
    systemd.until("the running status", |l| l == "STATUS=running, 0 neighbors");
    let runtime = runtime();
    let mut neighbor = runtime.block_on(FakePeer::connect(
        node.listen,
        Identity::from_seed([51; 32]),
    ));
    systemd.until("one neighbor", |l| l == "STATUS=running, 1 neighbor");
    node.signal("TERM");
    let extend = systemd.until("the extension", |l| l.starts_with("EXTEND_TIMEOUT_USEC="));
    // The deadline, the UI grace and the margin for the exit.
    let usec: u64 = extend["EXTEND_TIMEOUT_USEC=".len()..]
        .parse()
        .expect("microseconds");
    assert_eq!(usec, 63_000_000, "60 s + 1 s + 2 s");
    systemd.until("the stream waited for", |l| {
        l == "STATUS=waiting for 1 stream"
    });
    runtime.block_on(async {
        within("the neighbor reads to the end", neighbor.rest()).await;
    });
    drop(neighbor);
    systemd.until("the outcome", |l| l.starts_with("STATUS=stopped: "));
    assert_eq!(node.wait_exit().code(), Some(0));
    systemd.assert_in_order(&[
        "READY=1",
        "STATUS=running, 0 neighbors",
        "STATUS=running, 1 neighbor",
        "STOPPING=1",
        "STATUS=withdrawing from 1 neighbor",
        "EXTEND_TIMEOUT_USEC=",
        "STATUS=waiting for 1 stream",
        "STATUS=stopped: graceful after ",
    ]);
    assert_eq!(
        systemd
            .lines
            .last()
            .map(|l| l.starts_with("STATUS=stopped: graceful")),
        Some(true),
        "{:?}",
        systemd.lines
    );
}

#[test]
fn systemd_hears_a_deadline_expiry() {
    let mut systemd = Systemd::new("notify-deadline");
    let env = [systemd.env()];
    let mut node = Daemon::start_with_env(&["--shutdown-deadline", "1s"], &env);
    let runtime = runtime();
    let stuck = runtime.block_on(within(
        "a stuck neighbor",
        support::stuck_neighbor(node.listen),
    ));
    systemd.until("one neighbor", |l| l == "STATUS=running, 1 neighbor");
    node.signal("TERM");
    systemd.until("the outcome", |l| l.starts_with("STATUS=stopped: "));
    assert_eq!(node.wait_exit().code(), Some(3));
    systemd.assert_in_order(&[
        "READY=1",
        "STATUS=running, 0 neighbors",
        "STATUS=running, 1 neighbor",
        "STOPPING=1",
        "STATUS=withdrawing from 1 neighbor",
        "EXTEND_TIMEOUT_USEC=4000000",
        "STATUS=stopped: deadline expired after ",
    ]);
    let last = systemd.lines.last().cloned().unwrap_or_default();
    assert!(last.contains("still running"), "{last}");
    drop(stuck);
}

#[test]
fn a_notify_socket_nobody_listens_on_changes_nothing() {
    let dir = TempDir::new("notify-gone");
    let path = dir.path().join("nobody.sock");
    let env = [(
        meshnode::notify::NOTIFY_SOCKET,
        path.to_str().expect("a UTF-8 path"),
    )];
    let mut node = Daemon::start_with_env(&[], &env);
    let ui = node.ui;
    runtime().block_on(async {
        let status = within("status", meshnode::client::status(ui)).await;
        assert!(status.is_ok(), "{status:?}");
    });
    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0));
}

#[test]
fn json_logs_are_one_object_per_line_with_level_target_message_and_fields() {
    // The node's start is read from its JSON line: the `ui` and `listen` fields.
    let mut node = Daemon::start_with_env(&["--log-format", "json"], &[]);
    let ui = node.ui;
    // A UI request logs inside spans too.
    runtime().block_on(async {
        let status = within("status", meshnode::client::status(ui)).await;
        assert!(status.is_ok(), "{status:?}");
    });
    node.signal("TERM");
    assert_eq!(node.wait_exit().code(), Some(0));
    let log = node.whole_log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{lines:?}");
    let started = lines
        .iter()
        .find(|l| l.contains("node started"))
        .expect("the start is logged");
    let event: serde_json::Value = serde_json::from_str(started).expect("JSON");
    assert!(event["fields"]["node"].is_string(), "{event}");
    for line in lines.iter().copied() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["level"].is_string(), "{line}");
        assert!(event["target"].is_string(), "{line}");
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["fields"].is_object(), "{line}");
        assert!(event["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l.contains("shutdown complete")),
        "{lines:?}"
    );
}

#[test]
fn a_wildcard_or_port_0_advertise_and_an_unadvertised_wildcard_listen_are_usage_errors() {
    let cases: [&[&str]; 4] = [
        &["--listen", "127.0.0.1:0", "--advertise", "0.0.0.0:4000"],
        &["--listen", "127.0.0.1:0", "--advertise", "[::]:4000"],
        &["--listen", "127.0.0.1:0", "--advertise", "127.0.0.1:0"],
        &["--listen", "0.0.0.0:0"],
    ];
    for args in cases {
        let output = meshnode(&[&["run"], args, &["--ui", "127.0.0.1:0"]].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("wildcard") || stderr.contains("port 0"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("node started"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_names_the_operator_flags() {
    let output = meshnode(&["run", "--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in ["--advertise", "--log-format"] {
        assert!(help.contains(flag), "{flag}:\n{help}");
    }
}
