//! What started a shutdown, and the report the gateway writes when it ends.

use std::fmt;
use std::net::SocketAddr;

use meshnode_protocol::ui::{Stats, short_id};
use meshnode_shutdown::{DoneReport, Outcome};
use serde::{Deserialize, Serialize};

/// What asked the node to shut down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Trigger {
    /// A `shutdown` request on the UI websocket.
    Ui { client: SocketAddr },
    /// `POST /shutdown`.
    Http { client: SocketAddr },
    /// SIGTERM or SIGINT.
    Signal { name: String },
    /// A call of `Node::shutdown` by the program embedding the node.
    Api,
    /// A subsystem the node cannot run without ended unexpectedly (it panicked).
    Fault { subsystem: String },
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Ui { client } => write!(f, "UI websocket request from {client}"),
            Trigger::Http { client } => write!(f, "HTTP request from {client}"),
            Trigger::Signal { name } => write!(f, "{name}"),
            Trigger::Api => f.write_str("API call"),
            Trigger::Fault { subsystem } => write!(f, "the {subsystem} stopped unexpectedly"),
        }
    }
}

/// How a shutdown ended, and the process exit code that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ShutdownOutcome {
    /// Every subsystem said done before the deadline. Exit code 0.
    Graceful,
    /// The deadline passed first. Exit code 3.
    DeadlineExpired,
    /// A subsystem failed or vanished before the deadline. Exit code 1.
    Failed,
}

impl ShutdownOutcome {
    pub fn exit_code(self) -> u8 {
        match self {
            ShutdownOutcome::Graceful => 0,
            ShutdownOutcome::Failed => 1,
            ShutdownOutcome::DeadlineExpired => 3,
        }
    }
}

/// The gateway's account of a shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShutdownReport {
    pub node_id: String,
    /// The first trigger; later requests joined it.
    pub trigger: Trigger,
    /// How many requests, the first included, were answered with this report.
    pub requests: u64,
    pub outcome: ShutdownOutcome,
    pub elapsed_ms: u64,
    pub deadline_ms: u64,
    /// The subsystems' done messages, as a tree.
    pub subsystems: DoneReport,
    /// Subsystems (streams included) that had not answered when the deadline passed.
    pub still_running: Vec<String>,
    /// The node's counters as the shutdown ended, if the subsystems could still tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

impl ShutdownReport {
    /// Judges a finished tree: graceful when every part of it is done.
    pub fn outcome_of(tree: &DoneReport) -> ShutdownOutcome {
        if tree.all_done() {
            ShutdownOutcome::Graceful
        } else if tree.flatten().iter().any(|(_, o)| **o == Outcome::Late) {
            ShutdownOutcome::DeadlineExpired
        } else {
            ShutdownOutcome::Failed
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.outcome.exit_code()
    }

    /// A few lines for a person: the verdict, then the tree.
    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.headline());
        render_tree(&self.subsystems, 1, &mut out);
        if !self.still_running.is_empty() {
            let names = self.still_running.join(", ");
            out.push_str(&format!("  still running at the deadline: {names}\n"));
        }
        out
    }

    /// The same on one line, for logs.
    pub fn one_line(&self) -> String {
        let mut out = self.headline();
        let mut tree = String::new();
        render_tree(&self.subsystems, 0, &mut tree);
        for line in tree.lines() {
            out.push_str("; ");
            out.push_str(line.trim());
        }
        if !self.still_running.is_empty() {
            let names = self.still_running.join(", ");
            out.push_str(&format!("; still running at the deadline: {names}"));
        }
        out
    }

    fn headline(&self) -> String {
        let verdict = match self.outcome {
            ShutdownOutcome::Graceful => "graceful",
            ShutdownOutcome::DeadlineExpired => "deadline expired",
            ShutdownOutcome::Failed => "failed",
        };
        format!(
            "shutdown of {} ({}): {verdict} after {} ms (deadline {} ms, {} request{})",
            short_id(&self.node_id),
            self.trigger,
            self.elapsed_ms,
            self.deadline_ms,
            self.requests,
            if self.requests == 1 { "" } else { "s" },
        )
    }
}

fn render_tree(report: &DoneReport, depth: usize, out: &mut String) {
    out.push_str(&format!(
        "{:indent$}{}: {} in {} ms: {}\n",
        "",
        report.subsystem,
        report.outcome,
        report.elapsed.as_millis(),
        report.summary,
        indent = depth * 2
    ));
    for child in &report.children {
        render_tree(child, depth + 1, out);
    }
}
