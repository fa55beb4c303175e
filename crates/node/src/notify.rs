//! systemd's readiness protocol (`Type=notify`): when the service manager set `NOTIFY_SOCKET`,
//! the binary tells it `READY=1` once the node runs, `STOPPING=1` when a shutdown starts,
//! `EXTEND_TIMEOUT_USEC` so that it waits out the node's deadline, and `STATUS=` lines a person
//! reads in `systemctl status`. Without `NOTIFY_SOCKET` nothing is sent.
//!
//! The notifier only reads: the node's lifecycle and connectivity from `watch` channels, and,
//! while a shutdown runs, the open stream count from the status (each ask bounded by the
//! gateway's own timeout). It never holds the node up.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::ShutdownReport;
use crate::neighborhood::Connectivity;
use crate::node::NodeController;
use crate::ui_gateway::{Lifecycle, ShutdownOutcome, UI_GRACE};

/// The environment variable systemd sets to the socket it listens on.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// How often the open stream count is read while a shutdown runs.
pub const STOPPING_POLL: Duration = Duration::from_millis(200);
/// What the timeout extension adds to the shutdown deadline: the UI grace and a margin for the
/// process's own exit (the same as the binary's watchdog after a signal).
pub const EXTEND_MARGIN: Duration = Duration::from_secs(2);

/// One thing to tell the service manager; [`Notice::lines`] gives its wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready,
    Stopping,
    Status(String),
    /// Wait this much longer, from now, before giving up on the service.
    ExtendTimeout(Duration),
}

impl Notice {
    /// The `KEY=VALUE` line of the protocol (one line; a status has no newline in it).
    pub fn line(&self) -> String {
        match self {
            Notice::Ready => "READY=1".to_owned(),
            Notice::Stopping => "STOPPING=1".to_owned(),
            Notice::Status(text) => format!("STATUS={}", text.replace('\n', " ")),
            Notice::ExtendTimeout(by) => {
                format!("EXTEND_TIMEOUT_USEC={}", extend_usec(*by))
            }
        }
    }
}

/// `by` in microseconds, within the protocol's 32 bits.
fn extend_usec(by: Duration) -> u32 {
    u32::try_from(by.as_micros()).unwrap_or(u32::MAX)
}

/// "4 neighbors", "1 neighbor".
fn count(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// The status line while the node runs.
pub fn running(connectivity: &Connectivity) -> Notice {
    Notice::Status(format!(
        "running, {}",
        count(connectivity.neighbors, "neighbor")
    ))
}

/// What is sent when a shutdown starts: it may take `deadline`, and the node had `neighbors`.
pub fn stopping_notices(neighbors: usize, deadline: Duration) -> Vec<Notice> {
    vec![
        Notice::Stopping,
        Notice::Status(format!("withdrawing from {}", count(neighbors, "neighbor"))),
        Notice::ExtendTimeout(deadline + UI_GRACE + EXTEND_MARGIN),
    ]
}

/// The status line while a shutdown waits for streams to close.
pub fn waiting(streams: u64) -> Notice {
    Notice::Status(format!(
        "waiting for {}",
        count(usize::try_from(streams).unwrap_or(usize::MAX), "stream")
    ))
}

/// The last status line: how the shutdown ended.
pub fn stopped(report: &ShutdownReport) -> Notice {
    let verdict = match report.outcome {
        ShutdownOutcome::Graceful => "graceful",
        ShutdownOutcome::DeadlineExpired => "deadline expired",
        ShutdownOutcome::Failed => "failed",
    };
    let mut text = format!(
        "stopped: {verdict} after {} ms (deadline {} ms)",
        report.elapsed_ms, report.deadline_ms
    );
    if !report.still_running.is_empty() {
        text.push_str(&format!(
            "; still running: {}",
            report.still_running.join(", ")
        ));
    }
    Notice::Status(text)
}

/// Sends notices to `NOTIFY_SOCKET` in order, from a thread of its own: a Unix datagram send
/// blocks while the receiver's queue is full, and a service manager that stopped reading must
/// not stall the node's runtime. At most [`NOTIFY_QUEUE`] batches wait; past that a batch is
/// dropped (and logged at debug). Cloneable; see [`Notifier::start`].
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: std::sync::mpsc::SyncSender<Vec<Notice>>,
}

/// Batches of notices that may wait for the sending thread.
pub const NOTIFY_QUEUE: usize = 64;

/// Resolves when every [`Notifier`] is dropped and the thread has sent what was queued.
#[derive(Debug)]
pub struct Drained {
    done: std::sync::mpsc::Receiver<()>,
}

impl Drained {
    /// Waits until everything queued was sent, at most `within` (a blocking wait: call it once
    /// the node has ended, as the last thing before the exit).
    pub fn wait(self, within: Duration) {
        if self.done.recv_timeout(within).is_err() {
            debug!("the service manager was not told everything before the exit");
        }
    }
}

impl Notifier {
    /// A notifier, when the service manager asked for notices (`NOTIFY_SOCKET` is set).
    pub fn start() -> Option<(Notifier, Drained)> {
        if !wanted() {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Notice>>(NOTIFY_QUEUE);
        let (done_tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for notices in rx {
                    deliver(&notices);
                }
                let _ = done_tx.send(());
            });
        match thread {
            Ok(_) => Some((Notifier { tx }, Drained { done })),
            Err(e) => {
                debug!(error = %e, "cannot start the thread that tells the service manager");
                None
            }
        }
    }

    /// Queues `notices`, to go in one datagram; never waits.
    pub fn send(&self, notices: Vec<Notice>) {
        if notices.is_empty() {
            return;
        }
        for notice in &notices {
            debug!(notice = %notice.line(), "telling the service manager");
        }
        if self.tx.try_send(notices).is_err() {
            debug!("the service manager is not reading; a notice was dropped");
        }
    }
}

/// Sends `notices` in one datagram to `NOTIFY_SOCKET`; a failure is logged at debug (the
/// service manager may have gone) and otherwise ignored.
fn deliver(notices: &[Notice]) {
    #[cfg(unix)]
    {
        let lines: Vec<String> = notices.iter().map(Notice::line).collect();
        let states: Vec<sd_notify::NotifyState> = notices
            .iter()
            .zip(&lines)
            .map(|(notice, line)| match notice {
                Notice::Ready => sd_notify::NotifyState::Ready,
                Notice::Stopping => sd_notify::NotifyState::Stopping,
                Notice::ExtendTimeout(by) => {
                    sd_notify::NotifyState::ExtendTimeoutUsec(extend_usec(*by))
                }
                Notice::Status(_) => {
                    sd_notify::NotifyState::Status(line.strip_prefix("STATUS=").unwrap_or(line))
                }
            })
            .collect();
        if let Err(e) = sd_notify::notify(&states) {
            debug!(error = %e, "cannot tell the service manager");
        }
    }
    #[cfg(not(unix))]
    let _ = notices;
}

/// Whether the service manager asked to be told.
pub fn wanted() -> bool {
    std::env::var_os(NOTIFY_SOCKET).is_some()
}

/// Tells the service manager that the node runs, then follows it until `stop` is cancelled:
/// neighbor counts while it runs, the shutdown's start and the streams it waits for. The
/// caller sends [`stopped`] itself once the node has ended and this has returned, so that the
/// last line is the last one sent.
pub async fn follow(
    notifier: Notifier,
    mut lifecycle: tokio::sync::watch::Receiver<Lifecycle>,
    mut connectivity: tokio::sync::watch::Receiver<Connectivity>,
    controller: NodeController,
    stop: CancellationToken,
) {
    let mut neighbors = connectivity.borrow_and_update().neighbors;
    let shown = |neighbors| {
        running(&Connectivity {
            neighbors,
            ..Connectivity::default()
        })
    };
    notifier.send(vec![Notice::Ready, shown(neighbors)]);
    // A shutdown that started before this task first ran is announced at once; one that has
    // also ended is announced as the task ends (the lifecycle does not change again).
    let mut stopping = false;
    if let Lifecycle::ShuttingDown { deadline, .. } = &*lifecycle.borrow_and_update() {
        stopping = true;
        notifier.send(stopping_notices(neighbors, *deadline));
    }
    let mut streams_shown: Option<u64> = None;
    let mut poll = tokio::time::interval(STOPPING_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The end first; then the lifecycle before the connectivity, so that the neighbor
        // count a shutdown announces is the one from before the withdrawal emptied it.
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                // The node may have ended before this task saw its shutdown start (a busy
                // machine, a quick shutdown): announce it still, so that STOPPING=1 always
                // comes before the last status line.
                if !stopping {
                    let deadline = match &*lifecycle.borrow_and_update() {
                        Lifecycle::Running => None,
                        Lifecycle::ShuttingDown { deadline, .. }
                        | Lifecycle::Ended { deadline, .. } => Some(*deadline),
                    };
                    if let Some(deadline) = deadline {
                        notifier.send(stopping_notices(neighbors, deadline));
                    }
                }
                break;
            }
            changed = lifecycle.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = lifecycle.borrow_and_update().clone();
                match now {
                    Lifecycle::Running => {}
                    Lifecycle::ShuttingDown { deadline, .. } => {
                        if !stopping {
                            stopping = true;
                            notifier.send(stopping_notices(neighbors, deadline));
                        }
                    }
                    // The caller sends the outcome; a shutdown that started and ended before
                    // this task woke is still announced first.
                    Lifecycle::Ended { deadline, .. } => {
                        if !stopping {
                            notifier.send(stopping_notices(neighbors, deadline));
                        }
                        break;
                    }
                }
            }
            changed = connectivity.changed(), if !stopping => {
                if changed.is_err() {
                    // The neighborhood ended: the lifecycle tells the rest.
                    stopping = true;
                    continue;
                }
                let now = connectivity.borrow_and_update().neighbors;
                if now != neighbors {
                    neighbors = now;
                    notifier.send(vec![shown(neighbors)]);
                }
            }
            _ = poll.tick(), if stopping => {
                // The ask is bounded by the gateway's status timeout, and the end still wins.
                let status = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    status = controller.status() => status,
                };
                let Ok(status) = status else { continue };
                let open = status.stats.streams_open;
                if open > 0 && streams_shown != Some(open) {
                    streams_shown = Some(open);
                    notifier.send(vec![waiting(open)]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use meshnode_shutdown::{DoneReport, Outcome};

    use super::*;
    use crate::Trigger;
    use crate::test_support::{identity, within};
    use crate::ui_gateway::DEFAULT_SHUTDOWN_DEADLINE;

    #[test]
    fn notices_have_the_wire_form_systemd_reads() {
        assert_eq!(Notice::Ready.line(), "READY=1");
        assert_eq!(Notice::Stopping.line(), "STOPPING=1");
        assert_eq!(
            Notice::Status("a\nb".into()).line(),
            "STATUS=a b",
            "one line"
        );
        assert_eq!(
            Notice::ExtendTimeout(Duration::from_millis(7500)).line(),
            "EXTEND_TIMEOUT_USEC=7500000"
        );
        assert_eq!(
            Notice::ExtendTimeout(Duration::from_secs(9000)).line(),
            format!("EXTEND_TIMEOUT_USEC={}", u32::MAX)
        );
    }

    #[test]
    fn status_lines_read_like_a_sentence() {
        let four = Connectivity {
            neighbors: 4,
            ..Connectivity::default()
        };
        assert_eq!(
            running(&four),
            Notice::Status("running, 4 neighbors".into())
        );
        let one = Connectivity {
            neighbors: 1,
            ..Connectivity::default()
        };
        assert_eq!(running(&one), Notice::Status("running, 1 neighbor".into()));
        assert_eq!(waiting(1), Notice::Status("waiting for 1 stream".into()));
        assert_eq!(waiting(3), Notice::Status("waiting for 3 streams".into()));
        assert_eq!(
            stopping_notices(4, Duration::from_secs(5)),
            vec![
                Notice::Stopping,
                Notice::Status("withdrawing from 4 neighbors".into()),
                Notice::ExtendTimeout(Duration::from_secs(5) + UI_GRACE + EXTEND_MARGIN),
            ]
        );
    }

    /// [`follow`] driven by the test: it runs only when the test says, and its notices go to a
    /// queue the test reads.
    struct Follower {
        task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        sent: std::sync::mpsc::Receiver<Vec<Notice>>,
        stop: CancellationToken,
    }

    impl Follower {
        fn start(
            node: &crate::Node,
            lifecycle: tokio::sync::watch::Receiver<Lifecycle>,
            connectivity: tokio::sync::watch::Receiver<Connectivity>,
        ) -> Self {
            let (tx, sent) = std::sync::mpsc::sync_channel(NOTIFY_QUEUE);
            let stop = CancellationToken::new();
            let task = Box::pin(follow(
                Notifier { tx },
                lifecycle,
                connectivity,
                node.controller(),
                stop.clone(),
            ));
            Self { task, sent, stop }
        }

        /// Runs the follower until it waits; false if it ended instead.
        async fn waits(&mut self) -> bool {
            futures::poll!(&mut self.task).is_pending()
        }

        /// Stops the follower; every notice it sent, in order.
        async fn stop(self) -> Vec<Notice> {
            self.stop.cancel();
            within("the follower ends", self.task).await;
            self.sent.try_iter().flatten().collect()
        }
    }

    /// The node's whole shutdown happens while the follower is not running (a busy machine, a
    /// quick shutdown): the follower, woken by its stop, still announces the shutdown before
    /// it ends, so `STOPPING=1` comes before the caller's last status line.
    #[tokio::test]
    async fn stopping_is_announced_when_the_node_ended_before_the_follower_saw_its_shutdown() {
        let node = within("start", crate::start(crate::Config::new(identity(31))))
            .await
            .expect("the node starts");
        let mut follower = Follower::start(&node, node.lifecycle(), node.connectivity());
        assert!(follower.waits().await, "the follower waits for news");
        let report = within("the shutdown", node.shutdown())
            .await
            .expect("answered");
        assert_eq!(report.outcome, ShutdownOutcome::Graceful);
        within("the node ends", node.wait()).await;
        let sent = follower.stop().await;
        let mut expected = vec![Notice::Ready, Notice::Status("running, 0 neighbors".into())];
        expected.extend(stopping_notices(0, DEFAULT_SHUTDOWN_DEADLINE));
        assert_eq!(sent, expected);
    }

    /// The shutdown started before the follower first ran (a signal at once after the start):
    /// the follower announces it at once, after `READY=1`.
    #[tokio::test]
    async fn stopping_is_announced_when_the_shutdown_started_before_the_follower_first_ran() {
        let node = within("start", crate::start(crate::Config::new(identity(32))))
            .await
            .expect("the node starts");
        let deadline = Duration::from_secs(7);
        let (_lifecycle, lifecycle) = tokio::sync::watch::channel(Lifecycle::ShuttingDown {
            trigger: Trigger::Api,
            deadline,
        });
        let (_connectivity, connectivity) = tokio::sync::watch::channel(Connectivity {
            neighbors: 2,
            ..Connectivity::default()
        });
        let mut follower = Follower::start(&node, lifecycle, connectivity);
        assert!(follower.waits().await, "the follower waits for news");
        let sent = follower.stop().await;
        let mut expected = vec![Notice::Ready, Notice::Status("running, 2 neighbors".into())];
        expected.extend(stopping_notices(2, deadline));
        assert_eq!(sent, expected);
        assert!(node.stop().await, "the node stops");
    }

    #[test]
    fn the_last_line_says_how_the_shutdown_ended() {
        let report = ShutdownReport {
            node_id: "ab".repeat(32),
            trigger: Trigger::Api,
            requests: 1,
            outcome: ShutdownOutcome::DeadlineExpired,
            elapsed_ms: 1000,
            deadline_ms: 1000,
            subsystems: DoneReport {
                subsystem: "stream_handler_pool".into(),
                outcome: Outcome::Late,
                elapsed: Duration::from_secs(1),
                summary: String::new(),
                children: Vec::new(),
            },
            still_running: vec!["stream 1".into()],
            stats: None,
        };
        assert_eq!(
            stopped(&report),
            Notice::Status(
                "stopped: deadline expired after 1000 ms (deadline 1000 ms); still running: stream 1"
                    .into()
            )
        );
    }
}
