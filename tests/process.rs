//! The real `meshnode` binary, run as a process.

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use meshnode_protocol::ui::{NodeState, StatusPayload};

mod support;

use support::daemon::{BIN, Daemon, TOKEN_ENV, meshnode, runtime, wait_until};
use support::{BOUND, TempDir, knows_departure};

fn get_status(ui: SocketAddr) -> StatusPayload {
    let runtime = runtime();
    runtime.block_on(async {
        let get = reqwest::get(format!("http://{ui}/status"));
        let response = tokio::time::timeout(BOUND, get)
            .await
            .expect("in time")
            .expect("GET");
        assert!(response.status().is_success());
        response.json().await.expect("status JSON")
    })
}

#[test]
fn the_binary_serves_status_and_withdraws_on_sigterm() {
    let mut a = Daemon::start(&[]);
    let neighbor = a.listen.to_string();
    let mut b = Daemon::start(&["--neighbor", &neighbor]);
    b.wait_for_line("neighbor connected");

    let status = get_status(a.ui);
    assert_eq!(status.state, NodeState::Running);
    assert_eq!(status.ui, a.ui.to_string());
    assert_eq!(status.listen, a.listen.to_string());

    let ui = b.ui.to_string();
    let printed = meshnode(&["status", "--ui", &ui]);
    assert!(printed.status.success(), "{printed:?}");
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(text.contains("state      running"), "{text}");
    assert!(
        text.contains(&status.node_id[..8]),
        "B's status names its neighbor A:\n{text}"
    );

    // A withdraws: B hears it from A's gossip, before A's stream closes.
    a.signal("TERM");
    b.wait_for_line("neighbor withdrew from the network");
    assert_eq!(a.wait_exit().code(), Some(0));
    // The log line may come from B's dialer, which sees A's stream end, before B's
    // neighborhood has taken A's withdrawal in.
    wait_until("B knows of A's departure", || {
        knows_departure(&get_status(b.ui), &status.node_id)
    });
    a.wait_for_line("shutdown complete");

    b.signal("INT");
    assert_eq!(b.wait_exit().code(), Some(0));
}

/// A daemon with a neighbor that never hangs up, so its shutdown lasts until the deadline.
fn daemon_with_stuck_neighbor(
    deadline: &str,
) -> (Daemon, support::StuckNeighbor, tokio::runtime::Runtime) {
    let mut daemon = Daemon::start(&["--shutdown-deadline", deadline]);
    let runtime = runtime();
    let stuck = runtime.block_on(support::within(
        "a stuck neighbor",
        support::stuck_neighbor(daemon.listen),
    ));
    daemon.wait_for_line("neighbor connected");
    (daemon, stuck, runtime)
}

#[test]
fn a_second_signal_during_the_shutdown_exits_at_once_with_128_plus_n() {
    let (mut daemon, _stuck, _rt) = daemon_with_stuck_neighbor("60s");
    daemon.signal("TERM");
    daemon.wait_for_line("send it again to exit at once");
    daemon.signal("INT");
    // 130, not 3: the second signal ended the process, not the 60 s deadline (which the
    // bounded wait for the exit could not reach anyway).
    assert_eq!(daemon.wait_exit().code(), Some(130));
}

#[test]
fn a_shutdown_past_its_deadline_exits_3_and_names_the_stuck_stream() {
    let (mut daemon, stuck, _rt) = daemon_with_stuck_neighbor("300ms");
    daemon.signal("TERM");
    let line = daemon.wait_for_line("shutdown incomplete");
    assert!(line.contains("deadline expired"), "{line}");
    assert!(
        line.contains(&format!("stream to {}", &stuck.id.to_string()[..8])),
        "{line}"
    );
    assert_eq!(daemon.wait_exit().code(), Some(3));
}

#[test]
fn meshnode_shutdown_shuts_a_node_down_and_reports() {
    let mut a = Daemon::start(&[]);
    let neighbor = a.listen.to_string();
    let mut b = Daemon::start(&["--neighbor", &neighbor]);
    b.wait_for_line("neighbor connected");
    let ui = b.ui.to_string();
    let out = meshnode(&["shutdown", "--ui", &ui]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("graceful after"), "{text}");
    assert!(text.contains("neighborhood: done"), "{text}");
    assert!(text.contains("notified 1 neighbors"), "{text}");
    assert!(
        text.contains(&format!("the node stopped answering on {ui}")),
        "{text}"
    );
    assert_eq!(b.wait_exit().code(), Some(0));

    // Asking a node that is gone fails with one line and exit 1.
    let again = meshnode(&["shutdown", "--ui", &ui]);
    assert_eq!(again.status.code(), Some(1));
    a.signal("TERM");
    assert_eq!(a.wait_exit().code(), Some(0));
}

#[test]
fn meshnode_shutdown_into_a_closed_pipe_still_shuts_the_node_down_and_exits_0() {
    // `meshnode shutdown | head -0`: the reader is gone before the first line is written.
    let mut node = Daemon::start(&[]);
    let ui = node.ui.to_string();
    let mut child = std::process::Command::new(BIN)
        .args(["shutdown", "--ui", &ui])
        .env_remove(TOKEN_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("meshnode runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("meshnode ends");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.wait_exit().code(), Some(0));
}

#[test]
fn post_shutdown_answers_with_the_report_and_the_process_exits_0() {
    let mut daemon = Daemon::start(&[]);
    let ui = daemon.ui;
    let runtime = runtime();
    let report: serde_json::Value = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let post = client.post(format!("http://{ui}/shutdown")).send();
        let response = tokio::time::timeout(BOUND, post)
            .await
            .expect("in time")
            .expect("POST");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        response.json().await.expect("a JSON report")
    });
    assert_eq!(report["outcome"], "graceful");
    assert_eq!(report["trigger"]["kind"], "http");
    assert_eq!(report["subsystems"]["subsystem"], "stream_handler_pool");
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    assert!(errors[0].contains(needle), "{needle:?} not in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_input_gives_a_one_line_error_and_a_non_zero_exit() {
    let out = meshnode(&["run", "--listen", "not-an-address"]);
    assert_one_line_error(&out, "invalid value 'not-an-address'");
    let out = meshnode(&["run", "--neighbor", "nohost"]);
    assert_one_line_error(&out, "is not HOST:PORT");
    let out = meshnode(&["run", "--bogus"]);
    assert_one_line_error(&out, "--bogus");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = meshnode(&["run", "--listen", &addr, "--ui", "127.0.0.1:0"]);
    assert_one_line_error(&out, &format!("cannot listen for neighbors on {addr}"));
    let out = meshnode(&["run", "--ui", &addr]);
    assert_one_line_error(&out, &format!("cannot listen for UIs on {addr}"));

    let dir = TempDir::new("process-test");
    let key = dir.path().join("corrupt.key");
    std::fs::write(&key, "definitely not a key\n").expect("write");
    let key = key.to_string_lossy().into_owned();
    let out = meshnode(&["run", "--ui", "127.0.0.1:0", "--key-file", &key]);
    assert_one_line_error(&out, "is corrupt");

    let out = meshnode(&["status", "--ui", &addr]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    drop(taken);
}

#[test]
fn a_key_file_keeps_the_node_id_across_restarts() {
    let dir = TempDir::new("key-restart");
    let key = dir.path().join("node.key").to_string_lossy().into_owned();
    let mut first = Daemon::start(&["--key-file", &key]);
    let id = get_status(first.ui).node_id;
    first.signal("TERM");
    assert!(first.wait_exit().success());
    let second = Daemon::start(&["--key-file", &key]);
    assert_eq!(get_status(second.ui).node_id, id);
    drop(second);
}

#[test]
fn the_demo_shows_a_graceful_withdrawal_and_exits_0() {
    let out = meshnode(&["demo", "--nodes", "4"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("converged in"), "{text}");
    assert!(text.contains(": graceful after"), "{text}");
    assert!(
        text.contains("when each remaining node learned of the departure"),
        "{text}"
    );
    assert!(
        text.contains("gossip frames the whole mesh sent for it"),
        "{text}"
    );
    assert!(text.contains("3 of 3 shut down gracefully"), "{text}");
    let out = meshnode(&["demo", "--nodes", "1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--nodes below 2 is a usage error"
    );
}

/// Neither a neighbor that never hangs up, nor a UI client that stays after its answer, nor
/// one that never finishes its HTTP request, keeps the process past deadline + grace.
#[test]
fn nothing_keeps_the_process_past_the_deadline_plus_the_grace() {
    let (mut daemon, _stuck, runtime) = daemon_with_stuck_neighbor("500ms");
    let ui = daemon.ui;
    let (mut requester, _half_sent) = runtime.block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut raw = tokio::net::TcpStream::connect(ui).await.expect("connect");
        raw.write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .expect("write");
        let client = meshnode::client::UiClient::connect(ui)
            .await
            .expect("websocket");
        (client, raw)
    });
    let answer = runtime.block_on(requester.request("shutdown", serde_json::json!({}), |_| {}));
    assert!(answer.is_ok(), "{answer:?}");
    // The requester keeps its websocket open and the other client never finishes, yet the
    // process exits: the outcome and the order are the test, not how long it took on this
    // machine (paused-time tests pin the deadline and the grace exactly).
    assert_eq!(daemon.wait_exit().code(), Some(3));
    drop(requester);
}

fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt")
}

/// A neighbor whose process is stopped (SIGSTOP) reads nothing and never hangs up: the node
/// names it and exits at its deadline, a responsive neighbor still gets its withdrawal, and
/// the stopped one, resumed, finds the withdrawal waiting and drops the node.
#[test]
fn a_neighbor_stopped_with_sigstop_is_named_and_resumed_learns_of_the_withdrawal() {
    let mut a = Daemon::start(&["--shutdown-deadline", "1s"]);
    let neighbor = a.listen.to_string();
    let mut b = Daemon::start(&["--neighbor", &neighbor]);
    let b_id = get_status(b.ui).node_id;
    b.wait_for_line("neighbor connected");
    let runtime = multi_thread_runtime();
    let responsive = runtime.block_on(async {
        let identity = meshnode_protocol::Identity::from_seed([77; 32]);
        support::FakePeer::connect(a.listen, identity).await
    });
    let a_id: meshnode_protocol::NodeId = get_status(a.ui).node_id.parse().expect("an id");
    let responsive_id = responsive.id().to_string();
    let seen = runtime.spawn(async move {
        let mut responsive = responsive;
        responsive.rest().await
    });
    let lists = |id: &str| get_status(a.ui).neighbors.iter().any(|n| n.node_id == id);
    wait_until("A admits both neighbors", || {
        lists(&responsive_id) && lists(&b_id)
    });

    b.signal("STOP");
    wait_until("B stops", || b.is_stopped());
    a.signal("TERM");
    let frames = runtime
        .block_on(async { tokio::time::timeout(BOUND, seen).await })
        .expect("the responsive neighbor's stream ends")
        .expect("no panic");
    assert!(
        frames.iter().any(|f| support::is_withdrawal_of(f, a_id)),
        "the responsive neighbor got the withdrawal"
    );
    let line = a.wait_for_line("shutdown incomplete");
    assert!(line.contains("deadline expired"), "{line}");
    assert!(
        line.contains(&format!("stream to {}", &b_id[..8])),
        "the stopped neighbor is named: {line}"
    );
    assert_eq!(a.wait_exit().code(), Some(3));

    b.signal("CONT");
    b.wait_for_line("neighbor withdrew from the network");
    b.signal("TERM");
    assert_eq!(b.wait_exit().code(), Some(0));
}

/// A hundred requests at once, over websockets, HTTP and SIGTERM: one shutdown, every requester
/// answered with the same report, exit 0.
#[test]
fn a_hundred_shutdown_requests_from_websockets_http_and_sigterm_get_one_shutdown() {
    const WEBSOCKETS: usize = 50;
    const HTTP: usize = 49;
    // The neighbor, not the deadline, decides when the shutdown ends.
    let mut daemon = Daemon::start(&["--shutdown-deadline", "60s"]);
    let (ui, listen) = (daemon.ui, daemon.listen);
    let runtime = multi_thread_runtime();
    // A neighbor that hangs up only when told: the shutdown stays under way until every
    // request has reached the node.
    let (neighbor, mut websockets, mut posts) = runtime.block_on(async {
        let identity = meshnode_protocol::Identity::from_seed([78; 32]);
        let neighbor = support::FakePeer::connect(listen, identity).await;
        let mut websockets = Vec::new();
        for _ in 0..WEBSOCKETS {
            let client = support::within("a websocket", meshnode::client::UiClient::connect(ui))
                .await
                .expect("connects");
            websockets.push(client);
        }
        let mut posts = Vec::new();
        for _ in 0..HTTP {
            let stream = support::within("a connection", tokio::net::TcpStream::connect(ui))
                .await
                .expect("connects");
            posts.push(stream);
        }
        (neighbor, websockets, posts)
    });
    daemon.wait_for_line("neighbor connected");

    let mut answers = Vec::new();
    for mut client in websockets.drain(..) {
        answers.push(runtime.spawn(async move {
            let answer = client
                .request("shutdown", serde_json::json!({"report": true}), |_| {})
                .await
                .expect("answered");
            answer.payload.expect("a report")
        }));
    }
    for mut stream in posts.drain(..) {
        answers.push(runtime.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let request =
                "POST /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            stream.write_all(request.as_bytes()).await.expect("sent");
            let mut response = String::new();
            stream
                .read_to_string(&mut response)
                .await
                .expect("an answer");
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            let body = &response[response.find("\r\n\r\n").expect("a body") + 4..];
            serde_json::from_str::<serde_json::Value>(body).expect("a JSON report")
        }));
    }
    daemon.signal("TERM");

    // Every request reaches the node: one starts the shutdown, 99 join it.
    daemon.wait_for_line("shutdown started");
    for _ in 1..WEBSOCKETS + HTTP + 1 {
        daemon.wait_for_line("joining the one under way");
    }
    let mut neighbor = neighbor;
    runtime.block_on(async { while neighbor.next().await.is_some() {} });
    drop(neighbor);

    let reports: Vec<serde_json::Value> = answers
        .into_iter()
        .map(|answer| {
            runtime
                .block_on(async { tokio::time::timeout(BOUND, answer).await })
                .expect("answered in time")
                .expect("no panic")
        })
        .collect();
    assert_eq!(reports.len(), WEBSOCKETS + HTTP);
    for report in &reports {
        assert_eq!(report, &reports[0], "one shutdown, one report");
    }
    assert_eq!(reports[0]["outcome"], "graceful");
    assert_eq!(reports[0]["requests"], 100);
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

/// A neighbor whose process is frozen (SIGSTOP: its kernel keeps the connection open) sends no
/// keepalives: the node drops it at `--neighbor-timeout`, exactly as after a crash.
#[test]
fn a_neighbor_frozen_with_sigstop_is_dropped_at_the_neighbor_timeout() {
    let mut a = Daemon::start(&["--neighbor-timeout", "3s"]);
    let neighbor = a.listen.to_string();
    let mut b = Daemon::start(&["--neighbor", &neighbor]);
    let b_id = get_status(b.ui).node_id;
    let lists = |s: &StatusPayload| s.neighbors.iter().any(|n| n.node_id == b_id);
    wait_until("A admits B", || lists(&get_status(a.ui)));

    b.signal("STOP");
    wait_until("B stops", || b.is_stopped());
    let line = a.wait_for_line("neighbor silent for too long");
    assert!(line.contains(&b_id[..8]), "{line}");
    let dropped = Instant::now() + BOUND;
    let status = loop {
        let status = get_status(a.ui);
        if !lists(&status) && status.stats.peers_timed_out >= 1 {
            break status;
        }
        assert!(Instant::now() < dropped, "A drops B");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!lists(&status));
    assert!(status.stats.peers_timed_out >= 1);

    b.signal("CONT");
    b.signal("TERM");
    assert_eq!(b.wait_exit().code(), Some(0));
    a.signal("TERM");
    assert_eq!(a.wait_exit().code(), Some(0));
}

/// Two thousand connections that never start the handshake, against a node allowed 512
/// descriptors: the node refuses what it cannot take at once, stays under its limit, answers
/// status and admits an honest neighbor.
#[test]
fn a_burst_of_connections_that_never_handshake_leaves_the_node_responsive_within_its_descriptors() {
    const NOFILE: u32 = 512;
    const BURST: usize = 2_000;
    let mut a = Daemon::start_with_fd_limit(NOFILE, &[]);
    let runtime = multi_thread_runtime();
    let listen = a.listen;
    let (sockets, peak) = runtime.block_on(async {
        let mut sockets = Vec::with_capacity(BURST);
        let mut peak = 0;
        for i in 0..BURST {
            let connect = tokio::net::TcpStream::connect(listen);
            if let Ok(Ok(socket)) = tokio::time::timeout(BOUND, connect).await {
                sockets.push(socket);
            }
            if i % 50 == 0 {
                peak = peak.max(a.open_fds());
            }
        }
        (sockets, peak)
    });
    assert!(!sockets.is_empty());
    let status = get_status(a.ui);
    assert!(status.stats.streams_refused > 0, "{:?}", status.stats);
    assert!(peak < NOFILE as usize, "{peak} descriptors open");

    // While the burst's sockets stay open: an honest neighbor gets in.
    let neighbor = a.listen.to_string();
    let mut b = Daemon::start(&["--neighbor", &neighbor]);
    let b_id = get_status(b.ui).node_id;
    let admitted = Instant::now() + BOUND;
    while !get_status(a.ui).neighbors.iter().any(|n| n.node_id == b_id) {
        assert!(Instant::now() < admitted, "A admits the honest neighbor");
        assert!(a.open_fds() < NOFILE as usize);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.open_fds() < NOFILE as usize);
    drop(sockets);
    b.signal("TERM");
    assert_eq!(b.wait_exit().code(), Some(0));
    a.signal("TERM");
    assert_eq!(a.wait_exit().code(), Some(0));
}
