//! The UI token, through the real `meshnode` binary: `MESHNODE_UI_TOKEN` guards a node, and
//! `meshnode status` / `meshnode shutdown` get in with `--ui-token` (or the variable) and say
//! clearly when they were refused.

use std::net::SocketAddr;

use meshnode_protocol::ui::{UiMessage, codes};

mod support;

use support::BOUND;
use support::daemon::{Daemon, TOKEN_ENV, meshnode_with as meshnode};

const TOKEN: &str = "process-test-token-7f3a";
const ASK_FOR_TOKEN: &str = "wants a UI token: pass --ui-token or set MESHNODE_UI_TOKEN";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `GET /status`, with `Authorization: Bearer TOKEN` if `token` is given.
fn get_status(ui: SocketAddr, token: Option<&str>) -> (reqwest::StatusCode, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let mut request = client.get(format!("http://{ui}/status"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = tokio::time::timeout(BOUND, request.send())
            .await
            .expect("in time")
            .expect("GET");
        let status = response.status();
        let body = tokio::time::timeout(BOUND, response.text())
            .await
            .expect("in time")
            .expect("a body");
        (status, body)
    })
}

#[test]
fn the_token_variable_guards_the_node_and_the_cli_passes_it() {
    let mut daemon = Daemon::start_with(Some(TOKEN), "debug", &[]);
    let ui = daemon.ui.to_string();

    // HTTP without the token: 401 and an error envelope.
    let (status, body) = get_status(daemon.ui, None);
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED, "{body}");
    let envelope: UiMessage = serde_json::from_str(&body).expect("an error envelope");
    assert_eq!(envelope.error.expect("an error").code, codes::UNAUTHORIZED);
    let (status, _) = get_status(daemon.ui, Some(TOKEN));
    assert_eq!(status, reqwest::StatusCode::OK);

    // The CLI without the token says what to do, and fails.
    let out = meshnode(None, &["status", "--ui", &ui]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains(ASK_FOR_TOKEN), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");

    // With a wrong one it says so, without repeating it.
    let out = meshnode(None, &["status", "--ui", &ui, "--ui-token", "wrong-token"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("refused the UI token"), "{stderr}");
    assert!(!stderr.contains("wrong-token"), "{stderr}");

    // With the flag, or the variable, it gets in.
    for (how, out) in [
        (
            "--ui-token",
            meshnode(None, &["status", "--ui", &ui, "--ui-token", TOKEN]),
        ),
        (TOKEN_ENV, meshnode(Some(TOKEN), &["status", "--ui", &ui])),
    ] {
        assert!(out.status.success(), "{how}: {out:?}");
        let stdout = text(&out.stdout);
        assert!(stdout.contains("state      running"), "{how}: {stdout}");
    }

    // A refused shutdown leaves the node running; the right token shuts it down.
    let out = meshnode(None, &["shutdown", "--ui", &ui]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains(ASK_FOR_TOKEN), "{out:?}");
    let (status, _) = get_status(daemon.ui, Some(TOKEN));
    assert_eq!(status, reqwest::StatusCode::OK, "still running");
    let out = meshnode(Some(TOKEN), &["shutdown", "--ui", &ui]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("graceful after"), "{stdout}");
    assert!(
        stdout.contains(&format!("the node stopped answering on {ui}")),
        "{stdout}"
    );
    assert_eq!(daemon.wait_exit().code(), Some(0));

    // The node logged the refusals (at debug and warn) and never the token itself.
    let log = daemon.whole_log();
    assert!(
        log.contains("UI request without the token refused"),
        "{log}"
    );
    assert!(
        log.contains("UI request with a wrong token refused"),
        "{log}"
    );
    assert!(log.contains("ui_token=true"), "{log}");
    assert!(
        !log.contains(TOKEN),
        "the token leaked into the log:\n{log}"
    );
    assert!(
        !log.contains("wrong-token"),
        "a presented token leaked:\n{log}"
    );
}

#[test]
fn a_node_without_a_token_is_open_and_warns_of_nothing_on_loopback() {
    let mut daemon = Daemon::start_with(None, "debug", &[]);
    let ui = daemon.ui.to_string();
    let (status, _) = get_status(daemon.ui, None);
    assert_eq!(status, reqwest::StatusCode::OK);
    let out = meshnode(None, &["status", "--ui", &ui]);
    assert!(out.status.success(), "{out:?}");
    let out = meshnode(None, &["shutdown", "--ui", &ui]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(daemon.wait_exit().code(), Some(0));
    let log = daemon.whole_log();
    assert!(log.contains("ui_token=false"), "{log}");
    assert!(!log.contains("beyond loopback"), "{log}");
}

#[test]
fn an_empty_or_unsendable_token_is_a_one_line_usage_error() {
    let cases: [(Option<&str>, &[&str], &str); 4] = [
        (None, &["run", "--ui-token", ""], "the UI token is empty"),
        (Some(""), &["run"], "the UI token is empty"),
        (
            None,
            &["status", "--ui-token", "has space"],
            "without spaces",
        ),
        (Some("has space"), &["shutdown"], "without spaces"),
    ];
    for (env, args, needle) in cases {
        let out = meshnode(env, args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?} {env:?}: one line expected:\n{stderr}"
        );
        assert!(lines[0].contains("--ui-token"), "{stderr}");
        assert!(lines[0].contains(needle), "{needle:?} not in {stderr}");
        assert!(
            !stderr.contains("has space"),
            "the token is echoed: {stderr}"
        );
    }
}
