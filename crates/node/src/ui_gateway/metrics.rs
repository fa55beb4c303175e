//! `GET /metrics`: the node's figures in the Prometheus text format (OpenMetrics flavour), built
//! with the Prometheus project's own client from a snapshot the gateway gathers per scrape.
//!
//! Every field of the status payload's `stats` becomes a metric through one table,
//! [`STATS_METRICS`], which a test holds equal to the fields of [`Stats`]: a new counter can't
//! be left out of the scrape without failing the build's tests.

use std::time::Duration;

use meshnode_protocol::ui::{NodeState, Stats, StatusPayload};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tracing::debug;

use super::report::ShutdownOutcome;

/// The `Content-Type` of the scrape: the OpenMetrics text format, which Prometheus reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every name starts with this (then `_`).
const PREFIX: &str = "meshnode";

/// What kind of metric a `stats` field is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up; exported with `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One `stats` field as a metric: its JSON name in the status payload, the metric's name
/// (without the `meshnode_` prefix, and without the `_total` a counter gets), its kind and help.
#[derive(Debug, Clone, Copy)]
pub struct StatMetric {
    pub field: &'static str,
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn counter(field: &'static str, name: &'static str, help: &'static str) -> StatMetric {
    StatMetric {
        field,
        name,
        kind: Kind::Counter,
        help,
    }
}

/// The one place that maps each `stats` field to its metric. Add a row with every new field.
pub const STATS_METRICS: &[StatMetric] = &[
    counter(
        "gossipFramesSent",
        "gossip_frames_sent",
        "Gossip frames sent to neighbors.",
    ),
    counter(
        "gossipBytesSent",
        "gossip_bytes_sent",
        "Bytes of the gossip frame bodies sent to neighbors.",
    ),
    counter(
        "gossipFramesReceived",
        "gossip_frames_received",
        "Gossip frames received from neighbors.",
    ),
    counter(
        "recordsAccepted",
        "records_accepted",
        "Records that changed the database.",
    ),
    counter(
        "recordsStale",
        "records_stale",
        "Records no newer than the stored one (replays, echoes).",
    ),
    counter(
        "gossipFramesUseless",
        "gossip_frames_useless",
        "Gossip frames that changed nothing here.",
    ),
    counter(
        "recordsRejected",
        "records_rejected",
        "Records with a bad signature or shape.",
    ),
    counter(
        "gossipDeferred",
        "gossip_deferred",
        "Times gossip for a neighbor was held back because its send queue was busy.",
    ),
    counter(
        "framesMalformed",
        "frames_malformed",
        "Frames that were not valid JSON of a known type, or arrived out of turn.",
    ),
    counter(
        "framesOversized",
        "frames_oversized",
        "Frames over the size limit.",
    ),
    counter(
        "peersDisconnectedForAbuse",
        "peers_disconnected_for_abuse",
        "Neighbors disconnected for sending garbage or flooding useless gossip.",
    ),
    StatMetric {
        field: "streamsOpen",
        name: "streams_open",
        kind: Kind::Gauge,
        help: "Streams to neighbors open now.",
    },
    counter(
        "streamsAccepted",
        "streams_accepted",
        "Streams accepted from neighbors that dialed this node.",
    ),
    counter(
        "streamsDialed",
        "streams_dialed",
        "Streams this node dialed that connected.",
    ),
    counter(
        "streamsRefused",
        "streams_refused",
        "Connections closed at once at the limit of handshakes in progress or of streams.",
    ),
    counter(
        "handshakesRefused",
        "handshakes_refused",
        "Link handshakes refused: a proof that fails, this node's own id, no common version, or a first record that is not the peer's.",
    ),
    counter(
        "handshakesFailed",
        "handshakes_failed",
        "Link handshakes that did not finish: timed out, cut off, or not the link protocol.",
    ),
    counter(
        "framesUnknown",
        "frames_unknown",
        "Frames of an unknown type from neighbors that speak a newer version, skipped.",
    ),
    counter(
        "peersTimedOut",
        "peers_timed_out",
        "Neighbors dropped for silence longer than the neighbor timeout.",
    ),
    counter(
        "digestsSent",
        "digests_sent",
        "Digests (anti-entropy) sent to neighbors; not gossip.",
    ),
    counter(
        "digestBytesSent",
        "digest_bytes_sent",
        "Bytes of the digest frame bodies sent to neighbors.",
    ),
    counter(
        "digestsReceived",
        "digests_received",
        "Digests received from neighbors.",
    ),
    counter(
        "recordsRepaired",
        "records_repaired",
        "Records sent in answer to neighbors' digests (their frames count as gossip).",
    ),
];

/// What a scrape shows, gathered by the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub node_id: String,
    pub state: NodeState,
    /// The neighborhood's and the pool's figures; `None` once the shutdown has been answered
    /// (the subsystems have ended), when only the final counters are known.
    pub status: Option<StatusPayload>,
    /// The final counters, once the shutdown has been answered, if they could be read.
    pub final_stats: Option<Stats>,
    /// Set while the node is stopping.
    pub shutdown: Option<ShutdownFigures>,
}

/// The shutdown under way or just ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownFigures {
    /// `None` while it runs.
    pub outcome: Option<ShutdownOutcome>,
    /// Time since it started, or how long it took once it has ended.
    pub elapsed: Duration,
    pub deadline: Duration,
    /// Requests for it so far, the first included (later ones join it).
    pub requests: u64,
}

/// The label values of `meshnode_shutdown_outcome`, in order.
const OUTCOMES: [(&str, Option<ShutdownOutcome>); 4] = [
    ("in_progress", None),
    ("graceful", Some(ShutdownOutcome::Graceful)),
    ("deadline_expired", Some(ShutdownOutcome::DeadlineExpired)),
    ("failed", Some(ShutdownOutcome::Failed)),
];

type Labels = Vec<(&'static str, String)>;

/// Encodes `snapshot` in the text format.
pub fn render(snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register(
        "node",
        "The node's id and meshnode's version.",
        Info::new(vec![
            ("node_id", snapshot.node_id.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ]),
    );
    let state = Family::<Labels, Gauge>::default();
    for (label, value) in [
        ("running", NodeState::Running),
        ("shutting_down", NodeState::ShuttingDown),
    ] {
        let on = i64::from(snapshot.state == value);
        state
            .get_or_create(&vec![("state", label.to_owned())])
            .set(on);
    }
    registry.register(
        "state",
        "What the node is doing: 1 for the current state, 0 for the others.",
        state,
    );

    if let Some(status) = &snapshot.status {
        let full = status.neighbors.iter().filter(|n| n.full).count();
        let half = status.neighbors.len() - full;
        let neighbors = Family::<Labels, Gauge>::default();
        for (kind, count) in [("full", full), ("half", half)] {
            neighbors
                .get_or_create(&vec![("kind", kind.to_owned())])
                .set(count as i64);
        }
        registry.register(
            "neighbors",
            "Immediate neighbors: full (each lists the other) and half (listed here only).",
            neighbors,
        );
        let known = Gauge::<i64>::default();
        known.set(status.known_nodes.len() as i64);
        registry.register(
            "known_records",
            "Records in the node's database, its own included.",
            known,
        );
    }

    if let Some(stats) = snapshot
        .status
        .as_ref()
        .map(|s| &s.stats)
        .or(snapshot.final_stats.as_ref())
    {
        register_stats(&mut registry, stats);
    }

    if let Some(shutdown) = snapshot.shutdown {
        let outcome = Family::<Labels, Gauge>::default();
        for (label, value) in OUTCOMES {
            let on = i64::from(shutdown.outcome == value);
            outcome
                .get_or_create(&vec![("outcome", label.to_owned())])
                .set(on);
        }
        registry.register(
            "shutdown_outcome",
            "The shutdown's outcome (in_progress while it runs): 1 for the current, 0 for the others.",
            outcome,
        );
        let elapsed = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        elapsed.set(shutdown.elapsed.as_secs_f64());
        registry.register(
            "shutdown_elapsed_seconds",
            "Time since the shutdown started, or how long it took once it ended.",
            elapsed,
        );
        let deadline = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        deadline.set(shutdown.deadline.as_secs_f64());
        registry.register(
            "shutdown_deadline_seconds",
            "Longest the shutdown may take.",
            deadline,
        );
        let requests = Gauge::<i64>::default();
        requests.set(i64::try_from(shutdown.requests).unwrap_or(i64::MAX));
        registry.register(
            "shutdown_requests",
            "Requests for the shutdown so far, the first included; later ones join it.",
            requests,
        );
    }

    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

/// One metric per row of [`STATS_METRICS`], valued from the serialized `stats`.
fn register_stats(registry: &mut Registry, stats: &Stats) {
    let Ok(Value::Object(fields)) = serde_json::to_value(stats) else {
        debug!("stats did not serialize to an object");
        return;
    };
    for row in STATS_METRICS {
        let Some(value) = fields.get(row.field).and_then(Value::as_u64) else {
            debug!(field = row.field, "no such stats field");
            continue;
        };
        match row.kind {
            Kind::Counter => {
                let metric = Counter::<u64>::default();
                metric.inc_by(value);
                registry.register(row.name, row.help, metric);
            }
            Kind::Gauge => {
                let metric = Gauge::<i64>::default();
                metric.set(i64::try_from(value).unwrap_or(i64::MAX));
                registry.register(row.name, row.help, metric);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use meshnode_protocol::ui::{KnownNode, NeighborStatus};

    use super::*;

    #[test]
    fn every_stats_field_has_exactly_one_metric() {
        let Ok(Value::Object(fields)) = serde_json::to_value(Stats::default()) else {
            panic!("stats serialize to an object");
        };
        let fields: BTreeSet<&str> = fields.keys().map(String::as_str).collect();
        let rows: BTreeSet<&str> = STATS_METRICS.iter().map(|r| r.field).collect();
        let missing: Vec<_> = fields.difference(&rows).collect();
        assert!(
            missing.is_empty(),
            "stats fields without a metric (add a row to STATS_METRICS): {missing:?}"
        );
        let stale: Vec<_> = rows.difference(&fields).collect();
        assert!(stale.is_empty(), "rows for no stats field: {stale:?}");
        assert_eq!(rows.len(), STATS_METRICS.len(), "a field listed twice");
        let names: BTreeSet<&str> = STATS_METRICS.iter().map(|r| r.name).collect();
        assert_eq!(names.len(), STATS_METRICS.len(), "a metric name used twice");
        for row in STATS_METRICS {
            assert!(
                !row.name.ends_with("_total"),
                "{}: the client adds _total",
                row.name
            );
            assert!(
                row.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                row.name
            );
        }
    }

    fn snapshot() -> Snapshot {
        let stats = Stats {
            gossip_frames_sent: 7,
            streams_open: 2,
            ..Stats::default()
        };
        Snapshot {
            node_id: "ab".repeat(32),
            state: NodeState::Running,
            status: Some(StatusPayload {
                node_id: "ab".repeat(32),
                listen: "127.0.0.1:1".into(),
                ui: "127.0.0.1:2".into(),
                state: NodeState::Running,
                version: 3,
                software_version: "0".into(),
                neighbors: vec![
                    NeighborStatus {
                        node_id: "cd".repeat(32),
                        addr: "127.0.0.1:3".into(),
                        full: true,
                        stream: None,
                    },
                    NeighborStatus {
                        node_id: "ef".repeat(32),
                        addr: "127.0.0.1:4".into(),
                        full: false,
                        stream: None,
                    },
                ],
                known_nodes: vec![KnownNode {
                    node_id: "ab".repeat(32),
                    addr: "127.0.0.1:1".into(),
                    version: 3,
                    neighbors: Vec::new(),
                }],
                stats,
            }),
            final_stats: None,
            shutdown: None,
        }
    }

    #[test]
    fn a_running_node_shows_its_mesh_and_every_counter() {
        let text = render(&snapshot()).expect("encodes");
        for line in [
            "meshnode_state{state=\"running\"} 1",
            "meshnode_state{state=\"shutting_down\"} 0",
            "meshnode_neighbors{kind=\"full\"} 1",
            "meshnode_neighbors{kind=\"half\"} 1",
            "meshnode_known_records 1",
            "meshnode_gossip_frames_sent_total 7",
            "meshnode_streams_open 2",
            "# TYPE meshnode_streams_open gauge",
            "# TYPE meshnode_gossip_frames_sent counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        for row in STATS_METRICS {
            let name = match row.kind {
                Kind::Counter => format!("meshnode_{}_total ", row.name),
                Kind::Gauge => format!("meshnode_{} ", row.name),
            };
            assert!(text.lines().any(|l| l.starts_with(&name)), "{name}\n{text}");
        }
        assert!(!text.contains("shutdown"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_stopping_node_shows_the_shutdown_and_its_final_counters() {
        let stats = Stats {
            records_accepted: 4,
            ..Stats::default()
        };
        let ended = Snapshot {
            node_id: "ab".repeat(32),
            state: NodeState::ShuttingDown,
            status: None,
            final_stats: Some(stats),
            shutdown: Some(ShutdownFigures {
                outcome: Some(ShutdownOutcome::DeadlineExpired),
                elapsed: Duration::from_millis(1500),
                deadline: Duration::from_secs(1),
                requests: 3,
            }),
        };
        let text = render(&ended).expect("encodes");
        for line in [
            "meshnode_state{state=\"shutting_down\"} 1",
            "meshnode_shutdown_outcome{outcome=\"deadline_expired\"} 1",
            "meshnode_shutdown_outcome{outcome=\"in_progress\"} 0",
            "meshnode_shutdown_elapsed_seconds 1.5",
            "meshnode_shutdown_deadline_seconds 1.0",
            "meshnode_shutdown_requests 3",
            "meshnode_records_accepted_total 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("meshnode_neighbors"), "{text}");
    }
}
