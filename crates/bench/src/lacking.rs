//! Why a mesh did not converge: printed with a time-out, and as progress while the benchmark
//! waits, so that a mesh too large for the machine says where its records stop.

use std::collections::{HashMap, HashSet};

use meshnode_protocol::ui::StatusPayload;

/// Where the records the nodes lack are, from every node's status at one moment.
pub fn diagnose(all: &[StatusPayload]) -> String {
    let index: HashMap<&str, &StatusPayload> =
        all.iter().map(|s| (s.node_id.as_str(), s)).collect();
    let held: HashMap<&str, HashMap<&str, u64>> = all
        .iter()
        .map(|s| {
            (
                s.node_id.as_str(),
                s.known_nodes
                    .iter()
                    .map(|k| (k.node_id.as_str(), k.version))
                    .collect(),
            )
        })
        .collect();
    // Each running node's own version: what every other node should hold.
    let current: HashMap<&str, u64> = all
        .iter()
        .map(|s| (s.node_id.as_str(), s.version))
        .collect();
    let mut lacking_nodes = 0;
    let mut pairs = 0;
    let mut no_neighbor_has = 0;
    let mut a_neighbor_has = 0;
    let mut stale_pairs = 0;
    let mut missing_ids: HashMap<&str, usize> = HashMap::new();
    let mut missing_is_lacking = 0;
    let mut digests = (0u64, 0u64, 0u64);
    let lacking: HashSet<&str> = all
        .iter()
        .filter(|s| {
            current
                .keys()
                .any(|id| !held[s.node_id.as_str()].contains_key(id))
        })
        .map(|s| s.node_id.as_str())
        .collect();
    for s in all {
        let mine = &held[s.node_id.as_str()];
        let missing: Vec<&str> = current
            .keys()
            .copied()
            .filter(|id| !mine.contains_key(id))
            .collect();
        stale_pairs += current
            .iter()
            .filter(|(id, v)| mine.get(*id).is_some_and(|have| have < *v))
            .count();
        if missing.is_empty() {
            continue;
        }
        lacking_nodes += 1;
        digests.0 += s.stats.digests_sent;
        digests.1 += s.stats.digests_received;
        digests.2 += s.stats.records_repaired;
        for id in missing {
            pairs += 1;
            *missing_ids.entry(id).or_default() += 1;
            missing_is_lacking += usize::from(lacking.contains(id));
            let has = s
                .neighbors
                .iter()
                .filter(|n| {
                    held.get(n.node_id.as_str())
                        .is_some_and(|h| h.contains_key(id))
                })
                .count();
            if has == 0 {
                no_neighbor_has += 1;
            } else {
                a_neighbor_has += 1;
            }
        }
    }
    let mut most_missed: Vec<usize> = missing_ids.values().copied().collect();
    most_missed.sort_unstable();
    let degree_of = |id: &str| index.get(id).map_or(0, |s| s.neighbors.len());
    let lacking_degree: Vec<usize> = lacking.iter().map(|id| degree_of(id)).collect();
    // A node's version is the wall clock, in ms, when it last changed its record.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let changed_within = |secs: u64| {
        all.iter()
            .filter(|s| now_ms.saturating_sub(s.version) < secs * 1000)
            .count()
    };
    let timed_out: u64 = all.iter().map(|s| s.stats.peers_timed_out).sum();
    let streams: u64 = all
        .iter()
        .map(|s| s.stats.streams_accepted + s.stats.streams_dialed)
        .sum();
    format!(
        "{} nodes changed their record in the last 10 s, {} in the last 60 s; all nodes: {} \
         peers timed out, {} streams set up; {lacking_nodes} nodes lack {pairs} records ({} distinct ids, each missed by {} to {} \
         nodes; in {missing_is_lacking} pairs the record's node lacks records too); in \
         {a_neighbor_has} pairs a neighbor of the node holds the record, in {no_neighbor_has} none does; \
         {stale_pairs} records held at an older version than their node's own; the lacking \
         nodes have {} to {} neighbors, sent {} digests, received {}, repaired {} records",
        changed_within(10),
        changed_within(60),
        timed_out,
        streams,
        missing_ids.len(),
        most_missed.first().copied().unwrap_or(0),
        most_missed.last().copied().unwrap_or(0),
        lacking_degree.iter().min().copied().unwrap_or(0),
        lacking_degree.iter().max().copied().unwrap_or(0),
        digests.0,
        digests.1,
        digests.2,
    )
}

#[cfg(test)]
mod tests {
    use meshnode_protocol::ui::{KnownNode, NeighborStatus, NodeState, Stats};

    use super::*;

    fn status(id: &str, version: u64, neighbors: &[&str], known: &[(&str, u64)]) -> StatusPayload {
        StatusPayload {
            node_id: id.into(),
            listen: String::new(),
            ui: String::new(),
            state: NodeState::Running,
            version,
            software_version: String::new(),
            neighbors: neighbors
                .iter()
                .map(|n| NeighborStatus {
                    node_id: (*n).into(),
                    addr: String::new(),
                    full: true,
                    stream: None,
                })
                .collect(),
            known_nodes: known
                .iter()
                .map(|(k, v)| KnownNode {
                    node_id: (*k).into(),
                    addr: String::new(),
                    version: *v,
                    neighbors: Vec::new(),
                })
                .collect(),
            stats: Stats::default(),
        }
    }

    /// A line a - b - c: c lacks a's record, which its neighbor b holds, and holds b's at an
    /// older version; d lacks a's too, and no neighbor of it has a's.
    #[test]
    fn the_diagnosis_counts_what_is_lacking_and_where_it_is() {
        let all = vec![
            status("a", 1, &["b"], &[("a", 1), ("b", 2), ("c", 1), ("d", 1)]),
            status(
                "b",
                2,
                &["a", "c"],
                &[("a", 1), ("b", 2), ("c", 1), ("d", 1)],
            ),
            status("c", 1, &["b", "d"], &[("b", 1), ("c", 1), ("d", 1)]),
            status("d", 1, &["c"], &[("b", 2), ("c", 1), ("d", 1)]),
        ];
        let text = diagnose(&all);
        assert!(text.contains("2 nodes lack 2 records (1 distinct ids, each missed by 2 to 2 nodes; in 0 pairs the record's node lacks records too)"), "{text}");
        assert!(
            text.contains("in 1 pairs a neighbor of the node holds the record, in 1 none does"),
            "{text}"
        );
        assert!(
            text.contains("1 records held at an older version"),
            "{text}"
        );
        assert!(
            text.contains("the lacking nodes have 1 to 2 neighbors"),
            "{text}"
        );
    }
}
