//! A generic "I am done" reply tree for coordinated shutdown.
//!
//! A parent that asks a child to stop creates a pair with [`channel`]: it keeps the [`DoneWait`]
//! and sends the [`DoneReply`] inside its stop message. The child answers with
//! [`DoneReply::done`] or [`DoneReply::failed`], nesting the reports of its own children. A reply
//! dropped unanswered (the child panicked or its task was aborted) resolves the wait as
//! [`Outcome::Vanished`]; it never hangs the tree. A wait given a deadline resolves as
//! [`Outcome::Late`] when the deadline passes. A parent that is itself bounded answers by its own
//! deadline, nesting a late report for each child still out, so the tree names every straggler.
//!
//! The crate knows nothing of networks or nodes: a subsystem is a name.
#![forbid(unsafe_code)]

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How a subsystem's part of the shutdown ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Outcome {
    /// It finished its part.
    Done,
    /// It gave up, and says why.
    Failed { reason: String },
    /// Its reply was dropped unanswered: the task is gone (usually a panic).
    Vanished,
    /// It had not answered when its parent's deadline passed.
    Late,
}

impl Outcome {
    /// True only for [`Outcome::Done`].
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Done => f.write_str("done"),
            Outcome::Failed { reason } => write!(f, "failed: {reason}"),
            Outcome::Vanished => f.write_str("vanished"),
            Outcome::Late => f.write_str("late"),
        }
    }
}

/// One subsystem's "done" message, with the messages of the children it waited for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DoneReport {
    /// Which subsystem is speaking.
    pub subsystem: String,
    pub outcome: Outcome,
    /// From the moment the reply was created to the moment it was answered (or given up on),
    /// in whole milliseconds.
    #[serde(with = "millis")]
    pub elapsed: Duration,
    /// One line for a person, e.g. "notified 4 neighbors".
    pub summary: String,
    pub children: Vec<DoneReport>,
}

impl DoneReport {
    /// True when this subsystem and every child below it is [`Outcome::Done`].
    pub fn all_done(&self) -> bool {
        self.outcome.is_done() && self.children.iter().all(DoneReport::all_done)
    }

    /// A report for a child that had not answered when its parent's deadline passed.
    pub fn late(
        subsystem: impl Into<String>,
        elapsed: Duration,
        summary: impl Into<String>,
    ) -> Self {
        DoneReport {
            subsystem: subsystem.into(),
            outcome: Outcome::Late,
            elapsed: whole_millis(elapsed),
            summary: summary.into(),
            children: Vec::new(),
        }
    }

    /// The subsystems in this tree, at any depth, that were late.
    pub fn late_names(&self) -> Vec<String> {
        self.flatten()
            .into_iter()
            .filter(|(_, outcome)| **outcome == Outcome::Late)
            .map(|(name, _)| name.to_owned())
            .collect()
    }

    /// Every subsystem in this tree, depth first, with its outcome.
    pub fn flatten(&self) -> Vec<(&str, &Outcome)> {
        let mut out = vec![(self.subsystem.as_str(), &self.outcome)];
        for child in &self.children {
            out.extend(child.flatten());
        }
        out
    }
}

/// Creates the two ends of one subsystem's done reply.
pub fn channel(subsystem: impl Into<String>) -> (DoneReply, DoneWait) {
    let subsystem = subsystem.into();
    let (tx, rx) = oneshot::channel();
    let started = Instant::now();
    let reply = DoneReply {
        tx,
        subsystem: subsystem.clone(),
        started,
    };
    (
        reply,
        DoneWait {
            rx,
            subsystem,
            started,
        },
    )
}

/// The child's end: answer it once. Dropping it unanswered reports [`Outcome::Vanished`].
#[derive(Debug)]
pub struct DoneReply {
    tx: oneshot::Sender<DoneReport>,
    subsystem: String,
    started: Instant,
}

impl DoneReply {
    /// The subsystem this reply speaks for.
    pub fn subsystem(&self) -> &str {
        &self.subsystem
    }

    /// Says "done". Returns false when the parent stopped listening.
    pub fn done(self, summary: impl Into<String>, children: Vec<DoneReport>) -> bool {
        self.answer(Outcome::Done, summary.into(), children)
    }

    /// Says "failed" with a reason. Returns false when the parent stopped listening.
    pub fn failed(self, reason: impl Into<String>, children: Vec<DoneReport>) -> bool {
        let reason = reason.into();
        let summary = reason.clone();
        self.answer(Outcome::Failed { reason }, summary, children)
    }

    fn answer(self, outcome: Outcome, summary: String, children: Vec<DoneReport>) -> bool {
        let report = DoneReport {
            subsystem: self.subsystem,
            outcome,
            elapsed: whole_millis(self.started.elapsed()),
            summary,
            children,
        };
        self.tx.send(report).is_ok()
    }
}

/// The parent's end: resolves to the child's report, or to a report the parent writes itself
/// when the child vanished or is late.
#[derive(Debug)]
pub struct DoneWait {
    rx: oneshot::Receiver<DoneReport>,
    subsystem: String,
    started: Instant,
}

impl DoneWait {
    /// The subsystem this wait is for.
    pub fn subsystem(&self) -> &str {
        &self.subsystem
    }

    /// Waits with no deadline; a dropped reply resolves as [`Outcome::Vanished`].
    pub async fn wait(self) -> DoneReport {
        let Self {
            rx,
            subsystem,
            started,
        } = self;
        match rx.await {
            Ok(report) => report,
            Err(_) => synthesized(
                subsystem,
                started,
                Outcome::Vanished,
                "its reply was dropped",
            ),
        }
    }

    /// Waits until `deadline`; past it, resolves as [`Outcome::Late`].
    pub async fn wait_until(self, deadline: Instant) -> DoneReport {
        let subsystem = self.subsystem.clone();
        let started = self.started;
        match tokio::time::timeout_at(deadline, self.wait()).await {
            Ok(report) => report,
            Err(_) => synthesized(
                subsystem,
                started,
                Outcome::Late,
                "no answer by the deadline",
            ),
        }
    }
}

fn synthesized(subsystem: String, started: Instant, outcome: Outcome, summary: &str) -> DoneReport {
    DoneReport {
        subsystem,
        outcome,
        elapsed: whole_millis(started.elapsed()),
        summary: summary.to_owned(),
        children: Vec::new(),
    }
}

/// Reports speak in whole milliseconds, so a report survives its JSON form unchanged.
fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_done_reply_nests_its_childrens_reports() {
        let (pool, pool_wait) = channel("pool");
        let (hood, hood_wait) = channel("neighborhood");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            hood.done("notified 4 neighbors", vec![]);
        });
        tokio::spawn(async move {
            let child = hood_wait.wait().await;
            pool.done("closed 4 streams", vec![child]);
        });
        let report = tokio::time::timeout(BOUND, pool_wait.wait())
            .await
            .expect("bounded");
        assert!(report.all_done());
        assert_eq!(report.children[0].summary, "notified 4 neighbors");
        assert_eq!(report.children[0].elapsed, Duration::from_millis(30));
        assert_eq!(
            report.flatten(),
            vec![("pool", &Outcome::Done), ("neighborhood", &Outcome::Done)]
        );
        assert!(report.late_names().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_reply_is_vanished_not_a_hang() {
        let (reply, wait) = channel("pool");
        let task = tokio::spawn(async move {
            let _reply = reply;
            panic!("subsystem crashed");
        });
        assert!(task.await.is_err());
        let report = tokio::time::timeout(BOUND, wait.wait())
            .await
            .expect("bounded");
        assert_eq!(report.outcome, Outcome::Vanished);
        assert!(!report.all_done());
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_deadline_the_wait_is_late_and_late_children_are_named() {
        let (pool, pool_wait) = channel("pool");
        let start = Instant::now();
        let report = pool_wait.wait_until(start + Duration::from_secs(5)).await;
        assert_eq!(report.outcome, Outcome::Late);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(report.late_names(), vec!["pool"]);
        drop(pool);

        let stuck = DoneReport::late("stream to x", Duration::from_secs(4), "no EOF");
        let (pool, pool_wait) = channel("pool");
        pool.done("closed 3 of 4 streams", vec![stuck]);
        let report = pool_wait.wait().await;
        assert!(!report.all_done());
        assert_eq!(report.late_names(), vec!["stream to x"]);
    }

    #[tokio::test]
    async fn failed_carries_its_reason_and_answering_a_gone_parent_is_harmless() {
        let (reply, wait) = channel("neighborhood");
        assert!(reply.failed("database closed", vec![]));
        let report = wait.wait().await;
        assert_eq!(
            report.outcome,
            Outcome::Failed {
                reason: "database closed".into()
            }
        );

        let (reply, wait) = channel("pool");
        drop(wait);
        assert!(!reply.done("nobody listens", vec![]));
    }

    #[test]
    fn reports_serialize_with_camel_case_and_millis() {
        let report = DoneReport {
            subsystem: "pool".into(),
            outcome: Outcome::Failed { reason: "x".into() },
            elapsed: Duration::from_millis(1500),
            summary: "x".into(),
            children: vec![],
        };
        let json = serde_json::to_value(&report).expect("serializes");
        assert_eq!(json["elapsed"], 1500);
        assert_eq!(json["outcome"]["kind"], "failed");
        let back: DoneReport = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, report);
    }
}
