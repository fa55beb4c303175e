//! Where the time of a departure goes, hop by hop: each node's own record of when it stored the
//! news, against its distance (in links) from the node that departed. The slope is the cost of
//! one hop (read, decrypt, verify, the neighborhood's batch, the flush, encrypt, write); the
//! first hop includes the departing node's own shutdown path.

use std::collections::VecDeque;

use serde::Serialize;

/// When the nodes at one distance from the departed node learned of it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Hop {
    /// Links from the departed node.
    pub hops: usize,
    /// Nodes at that distance.
    pub nodes: usize,
    /// The median and the last of their times, in ms from the departure's request.
    pub median_ms: f64,
    pub last_ms: f64,
}

/// Distances in links from `from` over `edges` among `n` nodes; `None` where unreachable.
pub fn distances(n: usize, edges: &[(usize, usize)], from: usize) -> Vec<Option<usize>> {
    let mut adjacency = vec![Vec::new(); n];
    for &(a, b) in edges {
        adjacency[a].push(b);
        adjacency[b].push(a);
    }
    let mut distance = vec![None; n];
    distance[from] = Some(0);
    let mut frontier = VecDeque::from([from]);
    while let Some(x) = frontier.pop_front() {
        let next = distance[x].map_or(0, |d| d + 1);
        for &y in &adjacency[x] {
            if distance[y].is_none() {
                distance[y] = Some(next);
                frontier.push_back(y);
            }
        }
    }
    distance
}

/// The times of `learned` (a node's distance, and when it learned, in ms) grouped by distance.
pub fn per_hop(learned: &[(usize, f64)]) -> Vec<Hop> {
    let Some(farthest) = learned.iter().map(|(d, _)| *d).max() else {
        return Vec::new();
    };
    (1..=farthest)
        .filter_map(|hops| {
            let mut times: Vec<f64> = learned
                .iter()
                .filter(|(d, _)| *d == hops)
                .map(|(_, t)| *t)
                .collect();
            if times.is_empty() {
                return None;
            }
            times.sort_by(f64::total_cmp);
            Some(Hop {
                hops,
                nodes: times.len(),
                median_ms: times[times.len() / 2],
                last_ms: times[times.len() - 1],
            })
        })
        .collect()
}

/// The cost of one hop: the least-squares slope of the per-hop medians, in ms per link.
pub fn slope(hops: &[Hop]) -> Option<f64> {
    if hops.len() < 2 {
        return None;
    }
    let n = hops.len() as f64;
    let mean_x = hops.iter().map(|h| h.hops as f64).sum::<f64>() / n;
    let mean_y = hops.iter().map(|h| h.median_ms).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for h in hops {
        let dx = h.hops as f64 - mean_x;
        num += dx * (h.median_ms - mean_y);
        den += dx * dx;
    }
    (den > 0.0).then(|| num / den)
}

/// What the kernel says the benchmark process's threads did over a stretch of time: ran on a
/// core, or waited for one while runnable (other processes had the cores).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cpu {
    pub wall_ms: f64,
    pub ran_ms: f64,
    pub waited_ms: f64,
}

/// The threads' run and run-queue wait times so far, in ns, summed over /proc/self/task/*/
/// schedstat (threads that ended are not counted).
pub fn sched_ns() -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    let mut total = (0, 0);
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let mut fields = stat
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        total.0 += fields.next().unwrap_or(0);
        total.1 += fields.next().unwrap_or(0);
    }
    total
}

impl Cpu {
    /// From `before` ([`sched_ns`] then) and `wall` until now.
    pub fn since(before: (u64, u64), wall: std::time::Duration) -> Self {
        let now = sched_ns();
        Self {
            wall_ms: wall.as_secs_f64() * 1000.0,
            ran_ms: now.0.saturating_sub(before.0) as f64 / 1e6,
            waited_ms: now.1.saturating_sub(before.1) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_follow_the_links_and_hops_group_by_them() {
        // 0 - 1 - 2 - 3, and 0 - 4.
        let d = distances(5, &[(0, 1), (1, 2), (2, 3), (0, 4)], 0);
        assert_eq!(d, vec![Some(0), Some(1), Some(2), Some(3), Some(1)]);
        let hops = per_hop(&[(1, 4.0), (1, 2.0), (2, 5.0), (3, 9.0)]);
        assert_eq!(hops.len(), 3);
        assert_eq!(
            (hops[0].nodes, hops[0].median_ms, hops[0].last_ms),
            (2, 4.0, 4.0)
        );
        let s = slope(&[
            Hop {
                hops: 1,
                nodes: 1,
                median_ms: 3.0,
                last_ms: 3.0,
            },
            Hop {
                hops: 2,
                nodes: 1,
                median_ms: 5.0,
                last_ms: 5.0,
            },
            Hop {
                hops: 3,
                nodes: 1,
                median_ms: 7.0,
                last_ms: 7.0,
            },
        ]);
        assert_eq!(s, Some(2.0));
    }
}
