//! Graceful shutdown of in-process meshes on loopback, driven as UIs drive it.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meshnode::client::UiClient;
use meshnode::{Config, Node, ShutdownOutcome, ShutdownReport};
use meshnode_protocol::Identity;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use support::{
    BOUND, FakePeer, eventually, knows_departure, node, node_dialing, status, websocket, within,
};

mod support;

/// `n` nodes; node i dials nodes i-1 and i-2. Returns them once every node has its expected
/// neighbors, all full, and knows every record.
async fn mesh(n: u8) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for seed in 0..n {
        let mut config = Config::new(Identity::from_seed([seed + 1; 32]));
        config.neighbors = nodes
            .iter()
            .rev()
            .take(2)
            .map(|n| n.listen_addr().to_string())
            .collect();
        nodes.push(support::start(config).await);
    }
    for (i, node) in nodes.iter().enumerate() {
        let want: BTreeSet<String> = (0..nodes.len())
            .filter(|&j| j != i && i.abs_diff(j) <= 2)
            .map(|j| nodes[j].id().to_string())
            .collect();
        eventually("the mesh converges", || async {
            let s = status(node).await;
            let got: BTreeSet<String> = s.neighbors.iter().map(|n| n.node_id.clone()).collect();
            got == want && s.neighbors.iter().all(|n| n.full) && s.known_nodes.len() == nodes.len()
        })
        .await;
    }
    nodes
}

#[tokio::test]
async fn five_nodes_one_leaves_through_its_websocket_and_the_rest_learn_at_once() {
    let mut nodes = mesh(5).await;
    let departing = nodes.remove(2);
    let id = departing.id().to_string();
    let before = status(&departing).await;
    assert_eq!(before.neighbors.len(), 4);
    let versions: Vec<u64> = futures::future::join_all(nodes.iter().map(status))
        .await
        .iter()
        .map(|s| s.version)
        .collect();

    let mut client = within("connect", UiClient::connect(departing.ui_addr()))
        .await
        .expect("UI");
    let answer = within(
        "the answer",
        client.request("shutdown", json!({"report": true}), |_| {}),
    )
    .await
    .expect("answered");
    let report: ShutdownReport = answer.into_payload().expect("a report");
    client.close().await;
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Graceful,
        "{}",
        report.render()
    );
    // One withdrawal queued per neighbor, in the slot kept for it. (The count of frames sent
    // since `before` is no measure of that here: gossip of the mesh's last changes may still
    // be due when `before` is taken. shutdown_tests pins the exact frames over in-memory
    // streams.)
    let hood = &report.subsystems.children[0];
    assert_eq!(
        (hood.subsystem.as_str(), hood.summary.as_str()),
        ("neighborhood", "notified 4 neighbors"),
        "{}",
        report.render()
    );
    assert_eq!(
        within("the node ends", departing.wait()).await.outcome,
        ShutdownOutcome::Graceful
    );

    for (node, version) in nodes.iter().zip(versions) {
        // The departure, and the end of the departed node's stream: a stream stops counting
        // as open only after its end was handed to the neighborhood.
        eventually(
            "every node learns of the departure and its stream ends",
            || async {
                let s = status(node).await;
                knows_departure(&s, &id) && s.stats.streams_open == s.neighbors.len() as u64
            },
        )
        .await;
        // Each of them was a neighbor of the departed node: its own record changed (versions
        // follow the wall clock; the exact count of changes is pinned in paused time by
        // `shutdown_tests`). A status asked now is answered after the neighborhood has handled
        // the stream's end.
        assert!(status(node).await.version > version);
    }
    for node in nodes {
        let report = within("shutdown", node.shutdown()).await.expect("answered");
        assert_eq!(
            report.outcome,
            ShutdownOutcome::Graceful,
            "{}",
            report.render()
        );
    }
}

/// MASQ's `masq shutdown`: the exact request, then one TCP probe of the UI port right after the
/// answer, which must be refused, while the websocket is still open.
#[tokio::test]
async fn masq_shutdown_finds_the_ui_port_closed_when_answered() {
    let mut config = Config::new(Identity::from_seed([7; 32]));
    config.shutdown_deadline = Duration::from_secs(5);
    let node = support::start(config).await;
    let ui = node.ui_addr();
    let mut socket = websocket(ui).await;
    let masq = r#"{"opcode": "shutdown", "contextId": 1, "payload": {}}"#;
    within("send", socket.send(Message::text(masq)))
        .await
        .expect("sent");
    let answer = within("the answer", socket.next())
        .await
        .expect("a message")
        .expect("ok");
    assert_eq!(
        answer.to_text().expect("text"),
        r#"{"opcode":"shutdown","contextId":1,"payload":{}}"#
    );
    let probe = within("the probe", tokio::net::TcpStream::connect(ui)).await;
    assert!(
        probe.is_err(),
        "the UI port must refuse connections: {probe:?}"
    );
    // The websocket stays open after the answer until the client leaves.
    within(
        "still open",
        socket.send(Message::text(
            r#"{"opcode":"x","contextId":2,"payload":{}}"#,
        )),
    )
    .await
    .expect("the websocket is still open");
    drop(socket);
    let report = within("the node ends", node.wait()).await;
    assert_eq!(report.outcome, ShutdownOutcome::Graceful);
}

/// The value of the unlabeled metric `name` in a scrape of `node`'s `GET /metrics`, if it shows
/// one (bounded by the client's time-out).
async fn metric(http: &reqwest::Client, node: &Node, name: &str) -> Option<f64> {
    let response = http
        .get(format!("http://{}/metrics", node.ui_addr()))
        .send()
        .await
        .ok()?;
    let text = response.text().await.ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn concurrent_requests_from_websockets_http_and_the_api_get_one_shutdown() {
    let mut config = Config::new(Identity::from_seed([8; 32]));
    // The neighbor, not the deadline, decides when the shutdown ends: it hangs up only once
    // every request below has joined the shutdown, however long they take to arrive.
    config.shutdown_deadline = Duration::from_secs(60);
    let node = support::start(config).await;
    let mut neighbor = FakePeer::connect(node.listen_addr(), Identity::from_seed([18; 32])).await;
    let id = neighbor.id().to_string();
    eventually("the neighbor is admitted", || async {
        status(&node)
            .await
            .neighbors
            .iter()
            .any(|n| n.node_id == id)
    })
    .await;
    let ui = node.ui_addr();
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(within("connect", UiClient::connect(ui)).await.expect("UI"));
    }
    let first = node.controller();
    let first = tokio::spawn(async move { first.shutdown().await });
    eventually("the shutdown is under way", || async {
        status(&node).await.state == meshnode_protocol::ui::NodeState::ShuttingDown
    })
    .await;
    // Intake stops with the first request: neighbors can no longer (re)connect. (The pool
    // closes its listener once the gateway's word reaches it, a moment after the state
    // changes.)
    eventually("the neighbor listener is closed", || async {
        tokio::net::TcpStream::connect(node.listen_addr())
            .await
            .is_err()
    })
    .await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let mut asks = Vec::new();
    for mut client in clients {
        asks.push(tokio::spawn(async move {
            let answer = client
                .request("shutdown", json!({"report": true}), |_| {})
                .await;
            let report: ShutdownReport = answer.expect("answered").into_payload().expect("report");
            report
        }));
    }
    for _ in 0..5 {
        let http = http.clone();
        asks.push(tokio::spawn(async move {
            let response = http
                .post(format!("http://{ui}/shutdown"))
                .send()
                .await
                .expect("POST");
            assert!(response.status().is_success());
            response.json::<ShutdownReport>().await.expect("report")
        }));
    }
    // The node's own count, not its log: a test's log capture is thread-local, but tracing
    // caches whether a log line is wanted process-wide, the first time any thread reaches it,
    // so a line another test on another thread reached first can be lost to this one.
    let scrape = reqwest::Client::builder()
        .no_proxy()
        .timeout(BOUND)
        .build()
        .expect("client");
    eventually("all ten requests join the shutdown", || async {
        metric(&scrape, &node, "meshnode_shutdown_requests").await == Some(11.0)
    })
    .await;
    // Let the shutdown end: read the withdrawal and the end of stream, then hang up.
    within("the neighbor reads to the end", neighbor.rest()).await;
    drop(neighbor);

    let report = within("the first request", first)
        .await
        .expect("no panic")
        .expect("answered");
    for ask in asks {
        let joined = within("a request", ask).await.expect("no panic");
        assert_eq!(joined, report, "every requester gets the same report");
    }
    // One shutdown: the first request and the ten that joined it have the same report.
    assert_eq!(report.requests, 11);
    assert_eq!(
        report.outcome,
        ShutdownOutcome::Graceful,
        "{}",
        report.render()
    );
    assert_eq!(report.deadline_ms, 60_000);
    assert_eq!(within("the node ends", node.wait()).await, report);
}

#[tokio::test]
async fn other_ui_clients_hear_that_the_node_is_going_down() {
    let node = node(9, &[]).await;
    let mut bystander = within("connect", UiClient::connect(node.ui_addr()))
        .await
        .expect("UI");
    // A status round trip first, so the bystander is surely subscribed.
    within("status", bystander.request("status", json!({}), |_| {}))
        .await
        .expect("status");
    let ui = node.ui_addr();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let post = tokio::spawn(async move { http.post(format!("http://{ui}/shutdown")).send().await });
    let broadcast = bystander.receive(BOUND).await.expect("a broadcast");
    let response = within("POST", post)
        .await
        .expect("no panic")
        .expect("answered");
    assert!(response.status().is_success());
    assert_eq!(broadcast.opcode, "shuttingDown");
    assert_eq!(broadcast.context_id, None);
    let payload = broadcast.payload.as_ref().expect("payload");
    assert_eq!(payload["trigger"]["kind"], "http");
    assert_eq!(payload["deadlineMs"], 5000);
    // Then the node lets the bystander go.
    assert!(
        bystander.receive(BOUND).await.is_err(),
        "the connection closes"
    );
    within("the node ends", node.wait()).await;
}

/// After a graceful withdrawal the neighbor that dialed the departed node leaves its address
/// alone; after a crash it dials again at once.
#[tokio::test]
async fn a_withdrawn_neighbor_is_not_redialed_but_a_crashed_one_is() {
    for graceful in [true, false] {
        let a = node(20, &[]).await;
        let addr = a.listen_addr();
        let b = node_dialing(21, &[addr]).await;
        let a_id = a.id().to_string();
        eventually("B connects to A", || async {
            status(&b)
                .await
                .neighbors
                .iter()
                .any(|n| n.node_id == a_id && n.full)
        })
        .await;
        if graceful {
            let report = within("A withdraws", a.shutdown()).await.expect("answered");
            assert_eq!(report.outcome, ShutdownOutcome::Graceful);
            within("A ends", a.wait()).await;
        } else {
            assert!(a.stop().await);
        }
        eventually("B drops A", || async {
            status(&b).await.neighbors.is_empty()
        })
        .await;
        // Something listens on A's old address again: does B dial it?
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("A's address is free");
        if graceful {
            // B's backoff starts at 100 ms: a redial would come within this second. (A loaded
            // machine can only make this check miss a redial, never fail a correct node.)
            let dialed = tokio::time::timeout(Duration::from_secs(1), listener.accept()).await;
            assert!(dialed.is_err(), "B redialed a neighbor that withdrew");
        } else {
            // B may have tried A's address a few times while nothing listened, so its backoff
            // may have grown: the wait is bounded, not timed.
            let dialed = within("B redials a crashed neighbor", listener.accept()).await;
            assert!(dialed.is_ok(), "B did not redial a crashed neighbor");
        }
        assert!(b.stop().await);
    }
}
