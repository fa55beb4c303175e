//! The console in a real browser: headless Chromium (through `support::browser`) loads the page a
//! node serves, and the test reads what the page shows and clicks what a person would. The
//! nodes are real `meshnode run` processes, so the exit code checked is the process's own.
//!
//! `MESHNODE_CONSOLE_SCREENSHOT=PATH` saves a PNG of the console (a four-node mesh, one
//! neighbor withdrawn, one crashed) to PATH; docs/console.png is made this way:
//! `MESHNODE_CONSOLE_SCREENSHOT=$PWD/docs/console.png cargo test -p meshnode --test console`.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::BOUND;
use support::browser::Browser;
use support::daemon::{Daemon, meshnode, meshnode_with};

const TOKEN: &str = "console-test-token";
const SCREENSHOT_ENV: &str = "MESHNODE_CONSOLE_SCREENSHOT";

/// What the page shows, read from its DOM in one evaluation.
const SNAPSHOT: &str = r##"(() => {
  const $ = (id) => document.getElementById(id);
  return {
    phase: $("phase").dataset.phase,
    nodeId: $("node-id").textContent,
    login: !$("login").hidden,
    loginError: $("login-error").hidden ? "" : $("login-error").textContent,
    banner: $("banner").hidden ? "" : $("banner").textContent,
    rows: [...document.querySelectorAll("#neighbors tbody tr")].map((r) =>
      [r.dataset.nodeId, r.className, r.querySelector(".stream").textContent]),
    edges: [...document.querySelectorAll("#graph line")].map((l) =>
      [l.dataset.a, l.dataset.b, l.dataset.kind]),
    nodes: [...document.querySelectorAll("#graph g")].map((g) => [g.dataset.nodeId, g.dataset.kind]),
    stats: document.querySelectorAll("#stats tbody tr").length,
    confirm: !$("confirm").hidden,
    outcome: $("report").hidden ? "" : $("report-outcome").dataset.outcome,
    trigger: $("report").hidden ? "" : $("report-trigger").textContent,
    tree: [...document.querySelectorAll("#report-tree li")].map((li) => li.dataset.subsystem),
    cookie: document.cookie,
  };
})()"##;

async fn snapshot(browser: &mut Browser) -> Value {
    browser.eval(SNAPSHOT).await.expect("the page answers")
}

/// Reads the page until `check` holds, failing after [`BOUND`] with the last snapshot.
async fn page_until(browser: &mut Browser, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let seen = snapshot(browser).await;
        if check(&seen) {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}; the page shows {seen:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Evaluates `script` (which clicks or types) and checks it returned `true`.
async fn act(browser: &mut Browser, script: &str) {
    assert_eq!(
        browser.eval(script).await.expect("the page answers"),
        Value::Bool(true),
        "{script}"
    );
}

async fn status(ui: SocketAddr, token: Option<&str>) -> Value {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a client");
    let mut request = client.get(format!("http://{ui}/status"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    support::within("the status", async {
        request
            .send()
            .await
            .expect("the node answers")
            .json()
            .await
            .expect("a status payload")
    })
    .await
}

async fn node_id(ui: SocketAddr) -> String {
    status(ui, None).await["nodeId"]
        .as_str()
        .expect("a node id")
        .to_owned()
}

fn sorted_pair(a: &str, b: &str) -> (String, String) {
    if a < b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

/// The page's neighbor rows as (id, "full"/"half", stream).
fn rows(seen: &Value) -> BTreeSet<(String, String, String)> {
    seen["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let s = |i: usize| r[i].as_str().unwrap_or_default().to_owned();
            (s(0), s(1), s(2))
        })
        .collect()
}

/// The page's graph edges as (sorted pair, kind).
fn edges(seen: &Value) -> BTreeSet<((String, String), String)> {
    seen["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let s = |i: usize| e[i].as_str().unwrap_or_default().to_owned();
            (sorted_pair(&s(0), &s(1)), s(2))
        })
        .collect()
}

fn graph_kind(seen: &Value, id: &str) -> String {
    seen["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n[0] == id)
        .and_then(|n| n[1].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn full_edges(pairs: &[(&str, &str)]) -> BTreeSet<((String, String), String)> {
    pairs
        .iter()
        .map(|(a, b)| (sorted_pair(a, b), "full".to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_mesh_follows_a_withdrawal_and_shuts_its_node_down() {
    let Some(browser) = Browser::launch(&[]).await else {
        return;
    };
    let mut browser = browser.expect("the browser starts");

    // A four-node mesh: B, C and D dial A, and D dials B too.
    let mut a = Daemon::start(&[]);
    let a_listen = a.listen.to_string();
    let b = Daemon::start(&["--neighbor", &a_listen]);
    let b_listen = b.listen.to_string();
    let mut c = Daemon::start(&["--neighbor", &a_listen]);
    let d = Daemon::start(&["--neighbor", &a_listen, "--neighbor", &b_listen]);
    let (ida, idb, idc, idd) = (
        node_id(a.ui).await,
        node_id(b.ui).await,
        node_id(c.ui).await,
        node_id(d.ui).await,
    );

    browser
        .goto(&format!("http://{}/", a.ui))
        .await
        .expect("the console loads");
    let accepted = |id: &str| (id.to_owned(), "full".to_owned(), "accepted".to_owned());
    let mesh = full_edges(&[(&ida, &idb), (&ida, &idc), (&ida, &idd), (&idb, &idd)]);
    let seen = page_until(
        &mut browser,
        "the page shows A, its three neighbors and the mesh",
        |s| {
            s["phase"] == "running"
                && s["nodeId"] == ida.as_str()
                && rows(s) == BTreeSet::from([accepted(&idb), accepted(&idc), accepted(&idd)])
                && edges(s) == mesh
        },
    )
    .await;
    assert_eq!(graph_kind(&seen, &ida), "self", "this node is highlighted");
    assert_eq!(graph_kind(&seen, &idc), "node");
    assert!(
        seen["stats"].as_u64().unwrap_or_default() >= 12,
        "the counters"
    );

    // C withdraws: its row and its edge go, and its node turns grey.
    let out = meshnode(&["shutdown", "--ui", &c.ui.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.wait_exit().code(), Some(0));
    let after = full_edges(&[(&ida, &idb), (&ida, &idd), (&idb, &idd)]);
    let seen = page_until(&mut browser, "the page shows C withdrawn", |s| {
        rows(s) == BTreeSet::from([accepted(&idb), accepted(&idd)])
            && edges(s) == after
            && graph_kind(s, &idc) == "gone"
    })
    .await;
    assert_eq!(seen["phase"], "running");

    // D crashes (SIGKILL): A and B drop it, but its last record still lists them, so its edges
    // turn half (dashed) rather than vanish.
    d.signal("KILL");
    let half = |a: &str, b: &str| (sorted_pair(a, b), "half".to_owned());
    let crashed = BTreeSet::from([
        (sorted_pair(&ida, &idb), "full".to_owned()),
        half(&ida, &idd),
        half(&idb, &idd),
    ]);
    let seen = page_until(&mut browser, "the page shows D dropped", |s| {
        rows(s) == BTreeSet::from([accepted(&idb)]) && edges(s) == crashed
    })
    .await;
    assert_eq!(
        graph_kind(&seen, &idd),
        "node",
        "its record still lists neighbors"
    );
    if let Some(path) = std::env::var_os(SCREENSHOT_ENV) {
        let png = browser.screenshot().await.expect("a screenshot");
        std::fs::write(&path, png).expect("the screenshot is written");
    }

    // Shut down, confirm: the report appears, and the process exits 0.
    act(
        &mut browser,
        r#"document.getElementById("shutdown").click(); true"#,
    )
    .await;
    page_until(&mut browser, "the confirmation shows", |s| {
        s["confirm"] == true
    })
    .await;
    act(
        &mut browser,
        r#"document.getElementById("confirm-yes").click(); true"#,
    )
    .await;
    let seen = page_until(&mut browser, "the report shows", |s| s["outcome"] != "").await;
    assert_eq!(seen["outcome"], "graceful", "{seen:#}");
    let trigger = seen["trigger"].as_str().unwrap_or_default();
    assert!(
        trigger.starts_with("a UI websocket request from 127.0.0.1:"),
        "{trigger}"
    );
    let tree: Vec<&str> = seen["tree"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(tree.first(), Some(&"stream_handler_pool"), "{tree:?}");
    assert!(tree.contains(&"neighborhood"), "{tree:?}");
    assert_eq!(a.wait_exit().code(), Some(0), "{}", a.whole_log());

    // The page says the node stopped, and then leaves it alone: no request reaches the
    // address while the page sits there (a listener now holds the port to count them).
    let seen = page_until(&mut browser, "the page says the node stopped", |s| {
        s["phase"] == "stopped"
            && s["banner"]
                .as_str()
                .is_some_and(|b| b.contains("it no longer answers"))
    })
    .await;
    assert_eq!(seen["outcome"], "graceful", "the report stays");
    let listener = tokio::net::TcpListener::bind(a.ui)
        .await
        .expect("the node's UI port is free again");
    let quiet = tokio::time::timeout(Duration::from_secs(3), listener.accept()).await;
    assert!(
        quiet.is_err(),
        "the stopped page connected again: {quiet:?}"
    );
    assert_eq!(snapshot(&mut browser).await["phase"], "stopped");
    drop((b, d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_console_logs_in_and_says_when_another_ui_shuts_its_node_down() {
    let Some(browser) = Browser::launch(&[]).await else {
        return;
    };
    let mut browser = browser.expect("the browser starts");
    let mut node = Daemon::start_with(Some(TOKEN), "info", &[]);
    let id = status(node.ui, Some(TOKEN)).await["nodeId"]
        .as_str()
        .expect("a node id")
        .to_owned();

    browser
        .goto(&format!("http://{}/", node.ui))
        .await
        .expect("the console loads");
    page_until(&mut browser, "the page asks for the token", |s| {
        s["phase"] == "login" && s["login"] == true
    })
    .await;
    let submit = |token: &str| {
        format!(
            r#"document.getElementById("token").value = {};
               document.getElementById("login-form").requestSubmit(); true"#,
            json!(token)
        )
    };
    act(&mut browser, &submit("not-the-token")).await;
    page_until(&mut browser, "the page refuses a wrong token", |s| {
        s["loginError"] == "That is not this node's token."
    })
    .await;
    act(&mut browser, &submit(TOKEN)).await;
    let seen = page_until(&mut browser, "the page logs in and goes live", |s| {
        s["phase"] == "running"
            && s["nodeId"] == id.as_str()
            && !s["login"].as_bool().unwrap_or(true)
    })
    .await;
    assert_eq!(
        seen["cookie"], "",
        "the session cookie is HttpOnly: the script cannot read it"
    );

    // Another UI shuts the node down: the page says who, and that the node stopped.
    let out = meshnode_with(Some(TOKEN), &["shutdown", "--ui", &node.ui.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.wait_exit().code(), Some(0));
    let seen = page_until(&mut browser, "the page says the node was shut down", |s| {
        s["phase"] == "stopped"
            && s["banner"].as_str().is_some_and(|b| {
                b.starts_with("Shut down by a UI websocket request from 127.0.0.1:")
                    && b.contains("it no longer answers")
            })
    })
    .await;
    assert_eq!(seen["outcome"], "", "no report: this page did not ask");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_whose_node_vanishes_says_so_and_retries_ever_more_slowly() {
    let Some(browser) = Browser::launch(&[]).await else {
        return;
    };
    let mut browser = browser.expect("the browser starts");
    let mut node = Daemon::start(&[]);
    let id = node_id(node.ui).await;
    browser
        .goto(&format!("http://{}/", node.ui))
        .await
        .expect("the console loads");
    page_until(&mut browser, "the page is live", |s| {
        s["phase"] == "running" && s["nodeId"] == id.as_str()
    })
    .await;

    // No shuttingDown, no report: the node is just gone. The page says it does not answer and
    // tries again, each pause twice the last (1 s, 2 s, 4 s), which it states.
    node.signal("KILL");
    let _ = node.wait_exit();
    let seen = page_until(&mut browser, "the page backs off to 4 s", |s| {
        s["phase"] == "unreachable"
            && s["banner"]
                .as_str()
                .is_some_and(|b| b.contains("trying again in 4 s"))
    })
    .await;
    let banner = seen["banner"].as_str().unwrap_or_default();
    assert!(banner.starts_with("The node is not answering"), "{banner}");
    assert_eq!(seen["nodeId"], id.as_str(), "what it last showed stays");
}
