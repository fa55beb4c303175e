//! `meshnode demo`: a local mesh on loopback in one process that shows a graceful withdrawal.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use meshnode_protocol::Identity;
use meshnode_protocol::ui::{StatusPayload, short_id};
use serde_json::json;
use tokio::time::Instant;

use crate::client::UiClient;
use crate::ui_gateway::{ShutdownOutcome, ShutdownReport};
use crate::{Config, Node};

/// Fewest and most nodes the demo runs.
pub const NODES: std::ops::RangeInclusive<usize> = 2..=64;
/// Longest the demo waits for the mesh to converge, or for news of the departure to spread.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(1);

/// Why the demo could not finish.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--nodes must be between {} and {}", NODES.start(), NODES.end())]
    Nodes,
    #[error("cannot start node {index}: {source}")]
    Start {
        index: usize,
        source: crate::StartError,
    },
    #[error("{0}")]
    Stuck(String),
    #[error("{0}")]
    Client(#[from] crate::client::ClientError),
}

/// Runs the demo, printing as it goes. Returns the departing node's report.
pub async fn run(nodes: usize, mut print: impl FnMut(&str)) -> Result<ShutdownReport, DemoError> {
    let (mesh, statuses) = start_mesh(nodes, &mut print).await?;
    let mut mesh = mesh;

    let leaving = nodes / 2;
    let departing = mesh.remove(leaving);
    let departing_id = departing.id().to_string();
    let sent_before: u64 = statuses.iter().map(|s| s.stats.gossip_frames_sent).sum();
    let departing_before = statuses
        .iter()
        .find(|s| s.node_id == departing_id)
        .map(|s| s.stats.gossip_frames_sent);
    print(&format!(
        "shutting down node {} ({}) through its websocket, as a UI would",
        short_id(&departing_id),
        departing.ui_addr()
    ));

    let asked = Instant::now();
    let ui = departing.ui_addr();
    let request = async {
        let mut client = UiClient::connect(ui).await?;
        let answer = client
            .request("shutdown", json!({ "report": true }), |_| {})
            .await;
        client.close().await;
        answer?
            .into_payload::<ShutdownReport>()
            .map_err(crate::client::ClientError::Node)
    };
    let watch = learned_times(&mesh, &departing_id, asked);
    let (report, learned) = tokio::join!(request, watch);
    let report = report?;
    let learned = learned?;
    let final_report = departing.wait().await;
    print(&report.render());

    // Let the news settle, then count every gossip frame the mesh sent since before the request.
    let after = settle(&mesh).await?;
    let sent_by_departing = final_report
        .stats
        .as_ref()
        .map_or(0, |s| s.gossip_frames_sent);
    let sent_after: u64 = after
        .iter()
        .map(|s| s.stats.gossip_frames_sent)
        .sum::<u64>()
        + sent_by_departing;
    let frames = sent_after.saturating_sub(sent_before);
    let mut lines = String::from("when each remaining node learned of the departure:\n");
    for (status, at) in after.iter().zip(&learned) {
        let direct = statuses
            .iter()
            .find(|s| s.node_id == departing_id)
            .is_some_and(|d| d.neighbors.iter().any(|n| n.node_id == status.node_id));
        let _ = writeln!(
            lines,
            "  {}  {:>6.1} ms  {}",
            short_id(&status.node_id),
            at.as_secs_f64() * 1000.0,
            if direct { "(was its neighbor)" } else { "" }
        );
    }
    let departing_sent = departing_before
        .and_then(|before| Some(report.stats.as_ref()?.gossip_frames_sent - before))
        .map_or("?".to_owned(), |n| n.to_string());
    let _ = write!(
        lines,
        "gossip frames the whole mesh sent for it: {frames} ({departing_sent} from the departing node)"
    );
    print(&lines);

    print(&format!("shutting down the other {} nodes", mesh.len()));
    let reports = futures::future::join_all(mesh.into_iter().map(|node| async move {
        let _ = node.request_shutdown().await;
        node.wait().await
    }))
    .await;
    let graceful = reports
        .iter()
        .filter(|r| r.outcome == ShutdownOutcome::Graceful)
        .count();
    print(&format!(
        "{graceful} of {} shut down gracefully",
        reports.len()
    ));
    if graceful != reports.len() {
        return Err(DemoError::Stuck(
            "a node did not shut down gracefully".into(),
        ));
    }
    Ok(report)
}

/// Starts `nodes` nodes on loopback and waits until they have converged; prints as it goes.
async fn start_mesh(
    nodes: usize,
    print: &mut impl FnMut(&str),
) -> Result<(Vec<Node>, Vec<StatusPayload>), DemoError> {
    if !NODES.contains(&nodes) {
        return Err(DemoError::Nodes);
    }
    // Node i dials nodes i-1 and i-2: a connected mesh where most nodes have four neighbors.
    let mut mesh: Vec<Node> = Vec::with_capacity(nodes);
    // The nodes share the process's cores for their signature checks.
    let verifiers = crate::stream_handler_pool::Verifiers::for_cores();
    for index in 0..nodes {
        let identity = Identity::generate().map_err(|e| DemoError::Stuck(e.to_string()))?;
        let mut config = Config::new(identity);
        config.verifiers = verifiers.clone();
        config.neighbors = mesh
            .iter()
            .rev()
            .take(2)
            .map(|n: &Node| n.listen_addr().to_string())
            .collect();
        let node = crate::start(config)
            .await
            .map_err(|source| DemoError::Start { index, source })?;
        mesh.push(node);
    }
    print(&format!(
        "started {nodes} nodes on loopback; node i dials nodes i-1 and i-2"
    ));

    let started = Instant::now();
    let expected = expected_neighbors(&mesh);
    let statuses = poll_until(&mesh, "the mesh to converge", |all| {
        all.iter()
            .zip(&expected)
            .all(|(s, want)| converged(s, want, mesh.len()))
    })
    .await?;
    print(&format!(
        "converged in {} ms:\n{}",
        started.elapsed().as_millis(),
        table(&statuses)
    ));
    Ok((mesh, statuses))
}

/// `meshnode demo --console`: starts the mesh, prints the URL of each node's console, and keeps
/// the mesh running while people shut nodes down from their pages, printing each node's end as
/// it happens, until `stop` resolves (Ctrl-C) or every node has ended. Then it shuts down the
/// nodes still running and returns every node's report, in the order the nodes ended.
pub async fn console(
    nodes: usize,
    mut print: impl FnMut(&str),
    stop: impl std::future::Future<Output = ()>,
) -> Result<Vec<ShutdownReport>, DemoError> {
    let (mesh, _) = start_mesh(nodes, &mut print).await?;
    let mut urls =
        String::from("consoles (open one in a browser; shut nodes down from the page):\n");
    for (index, node) in mesh.iter().enumerate() {
        let _ = writeln!(
            urls,
            "  {}  http://{}/{}",
            short_id(&node.id().to_string()),
            node.ui_addr(),
            if index == mesh.len() / 2 {
                "   <- start here: most neighbors"
            } else {
                ""
            }
        );
    }
    urls.push_str("press Ctrl-C to shut the rest down and end the demo");
    print(&urls);

    let controllers: Vec<_> = mesh.iter().map(Node::controller).collect();
    let mut ended = tokio::task::JoinSet::new();
    for node in mesh {
        ended.spawn(node.wait());
    }
    let mut reports = Vec::with_capacity(nodes);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            next = ended.join_next() => match next {
                Some(Ok(report)) => {
                    print(&format!(
                        "node {} shut down ({}): {}; {} still running",
                        short_id(&report.node_id),
                        report.trigger,
                        outcome_word(report.outcome),
                        ended.len()
                    ));
                    reports.push(report);
                }
                Some(Err(e)) => return Err(DemoError::Stuck(format!("a node's task failed: {e}"))),
                None => {
                    print("every node has shut down");
                    return Ok(reports);
                }
            },
        }
    }
    print(&format!("shutting down the other {} nodes", ended.len()));
    // Ask the rest to stop; each node's deadline bounds its wait, and the wait below ends when
    // every node has ended.
    let asks = futures::future::join_all(controllers.iter().map(|c| c.shutdown()));
    let ((), rest) = tokio::join!(
        async {
            let _ = asks.await;
        },
        async {
            let mut rest = Vec::new();
            while let Some(next) = ended.join_next().await {
                if let Ok(report) = next {
                    rest.push(report);
                }
            }
            rest
        }
    );
    let graceful = rest
        .iter()
        .filter(|r| r.outcome == ShutdownOutcome::Graceful)
        .count();
    print(&format!(
        "{graceful} of {} shut down gracefully",
        rest.len()
    ));
    reports.extend(rest);
    Ok(reports)
}

fn outcome_word(outcome: ShutdownOutcome) -> &'static str {
    match outcome {
        ShutdownOutcome::Graceful => "graceful",
        ShutdownOutcome::DeadlineExpired => "deadline expired",
        ShutdownOutcome::Failed => "failed",
    }
}

fn expected_neighbors(mesh: &[Node]) -> Vec<BTreeSet<String>> {
    let n = mesh.len();
    (0..n)
        .map(|i| {
            (0..n)
                .filter(|&j| j != i && i.abs_diff(j) <= 2)
                .map(|j| mesh[j].id().to_string())
                .collect()
        })
        .collect()
}

fn converged(s: &StatusPayload, want: &BTreeSet<String>, nodes: usize) -> bool {
    let got: BTreeSet<String> = s.neighbors.iter().map(|n| n.node_id.clone()).collect();
    &got == want && s.neighbors.iter().all(|n| n.full) && s.known_nodes.len() == nodes
}

/// True once `s` shows that `departed` withdrew: no half-neighborship to it, and its record
/// lists nobody.
fn knows_departure(s: &StatusPayload, departed: &str) -> bool {
    !s.neighbors.iter().any(|n| n.node_id == departed)
        && s.known_nodes
            .iter()
            .any(|k| k.node_id == departed && k.neighbors.is_empty())
}

async fn statuses(mesh: &[Node]) -> Result<Vec<StatusPayload>, DemoError> {
    let all = futures::future::join_all(mesh.iter().map(Node::status)).await;
    all.into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| DemoError::Stuck(format!("a node stopped answering: {e}")))
}

async fn poll_until(
    mesh: &[Node],
    what: &str,
    done: impl Fn(&[StatusPayload]) -> bool,
) -> Result<Vec<StatusPayload>, DemoError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let all = statuses(mesh).await?;
        if done(&all) {
            return Ok(all);
        }
        if Instant::now() > deadline {
            return Err(DemoError::Stuck(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// For each node, how long after `since` its status first showed the departure.
async fn learned_times(
    mesh: &[Node],
    departed: &str,
    since: Instant,
) -> Result<Vec<Duration>, DemoError> {
    let mut learned: Vec<Option<Duration>> = vec![None; mesh.len()];
    let deadline = since + SETTLE_TIMEOUT;
    while learned.iter().any(Option::is_none) {
        let all = statuses(mesh).await?;
        let now = since.elapsed();
        for (slot, s) in learned.iter_mut().zip(&all) {
            if slot.is_none() && knows_departure(s, departed) {
                *slot = Some(now);
            }
        }
        if Instant::now() > deadline {
            return Err(DemoError::Stuck(
                "timed out waiting for news of the departure".into(),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(learned.into_iter().flatten().collect())
}

/// Waits until no node's gossip counter moves for a while.
async fn settle(mesh: &[Node]) -> Result<Vec<StatusPayload>, DemoError> {
    let mut last: Option<Vec<u64>> = None;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let all = statuses(mesh).await?;
        let sent: Vec<u64> = all.iter().map(|s| s.stats.gossip_frames_sent).collect();
        if last.as_ref() == Some(&sent) {
            return Ok(all);
        }
        if Instant::now() > deadline {
            return Err(DemoError::Stuck("gossip did not settle".into()));
        }
        last = Some(sent);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn table(statuses: &[StatusPayload]) -> String {
    let mut out =
        String::from("  node      listen                 ui                     neighbors\n");
    for s in statuses {
        let neighbors: Vec<String> = s
            .neighbors
            .iter()
            .map(|n| {
                format!(
                    "{}{}",
                    short_id(&n.node_id),
                    if n.full { "" } else { "(half)" }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  {}  {:<21}  {:<21}  {}",
            short_id(&s.node_id),
            s.listen,
            s.ui,
            neighbors.join(" ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::test_support::within;

    #[tokio::test]
    async fn the_console_demo_runs_until_stopped_and_tells_of_each_node_shut_down_from_a_page() {
        let (tx, mut lines) = mpsc::unbounded_channel::<String>();
        let (stop, stopped) = oneshot::channel::<()>();
        let demo = tokio::spawn(console(
            3,
            move |text| {
                let _ = tx.send(text.to_owned());
            },
            async {
                let _ = stopped.await;
            },
        ));
        let consoles = within("the console URLs", async {
            loop {
                let line = lines.recv().await.expect("the demo prints until it ends");
                if line.starts_with("consoles") {
                    break line;
                }
            }
        })
        .await;
        let urls: Vec<&str> = consoles
            .split_whitespace()
            .filter(|word| word.starts_with("http://"))
            .collect();
        assert_eq!(urls.len(), 3, "{consoles}");

        // What the page's Shut down button does, done over HTTP for brevity.
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a client");
        let report: ShutdownReport = within("the shutdown", async {
            client
                .post(format!("{}shutdown", urls[0]))
                .send()
                .await
                .expect("the node answers")
                .json()
                .await
                .expect("a report")
        })
        .await;
        assert_eq!(report.outcome, ShutdownOutcome::Graceful);
        let told = within("the demo tells of it", async {
            loop {
                let line = lines.recv().await.expect("the demo prints until it ends");
                if line.contains("shut down (") {
                    break line;
                }
            }
        })
        .await;
        let id = short_id(&report.node_id);
        assert!(
            told.starts_with(&format!("node {id} shut down (HTTP request from")),
            "{told}"
        );
        assert!(told.ends_with("graceful; 2 still running"), "{told}");

        // Ctrl-C: the rest shut down, and every report comes back, the first node's first.
        let _ = stop.send(());
        let reports = within("the demo ends", demo)
            .await
            .expect("the demo's task")
            .expect("the demo succeeds");
        assert_eq!(reports.len(), 3);
        assert_eq!(reports[0].node_id, report.node_id);
        assert!(
            reports
                .iter()
                .all(|r| r.outcome == ShutdownOutcome::Graceful)
        );
        let mut rest = Vec::new();
        while let Ok(line) = lines.try_recv() {
            rest.push(line);
        }
        assert_eq!(
            rest,
            [
                "shutting down the other 2 nodes",
                "2 of 2 shut down gracefully"
            ]
        );
    }
}
