//! Anti-entropy (docs/protocol.md, "Anti-entropy: digests"): every few seconds this node tells
//! one neighbor, in turn, the (id, version) of the records it stores, and answers a neighbor's
//! digest with the records it could reach at its last prune that the digest lacks or lists
//! older, and with a newer version (a tombstone included) of any other record the digest lists.
//! Gossip sends a record only when it changes; this is what brings back a record a node missed
//! or dropped.

use std::collections::HashMap;
use std::time::Duration;

use meshnode_protocol::{Digest, Frame, MAX_DIGEST_ENTRIES, NodeId, VerifiedRecord};
use tokio::time::Instant;
use tracing::debug;

use super::state::Neighborhood;

/// How often a digest goes to a neighbor, on average (each period is jittered to between 3/4
/// and 5/4 of it).
pub const DIGEST_EVERY: Duration = Duration::from_secs(5);
/// A record stored more recently than this is still on its way by gossip: not repaired.
pub const REPAIR_AGE: Duration = Duration::from_secs(2);
/// Most bytes of records sent in answer to one digest (one record, whatever its size, if that
/// one alone is larger); the rest goes with a later answer. Small, so that anti-entropy stays a
/// trickle beside gossip: while a large mesh converges, much of what a digest lacks is on its
/// way by gossip along another path, and an answer that sent all of it would send it twice.
pub const MAX_REPAIR_BYTES: usize = 16 * 1024;

/// Least time between two digests of one neighbor that are answered. An honest neighbor sends
/// this node a digest at most every 3.75 s (it takes its neighbors in turn); one sooner is not
/// answered and counts as gossip that changes nothing (see `budget`), so that a digest of a few
/// bytes that claims nothing cannot have this node walk its whole database again and again.
pub const MIN_DIGEST_GAP: Duration = Duration::from_secs(1);

/// Where this node's digests stand.
#[derive(Debug)]
pub(super) struct AntiEntropy {
    /// When the next digest is due.
    pub(super) at: Instant,
    /// The lowest id the next digest covers; `None` is the lowest id there is.
    cursor: Option<NodeId>,
    /// The neighbor the last digest went to: the next goes to the one after it, by id.
    last_peer: Option<NodeId>,
    /// The jitter's pseudo-random state (splitmix64).
    rng: u64,
    /// Most entries in one digest: [`MAX_DIGEST_ENTRIES`] (tests use fewer).
    pub(super) max_entries: usize,
    /// When each immediate neighbor's digest was last answered (forgotten at its disconnect).
    pub(super) answered: HashMap<NodeId, Instant>,
}

impl AntiEntropy {
    /// The first digest is due one jittered period from `now`; `seed` spreads nodes apart.
    pub(super) fn new(seed: &NodeId, now: Instant) -> Self {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&seed.0[..8]);
        let mut state = Self {
            at: now,
            cursor: None,
            last_peer: None,
            rng: u64::from_be_bytes(prefix),
            max_entries: MAX_DIGEST_ENTRIES,
            answered: HashMap::new(),
        };
        state.at = now + state.period();
        state
    }

    /// A period of [`DIGEST_EVERY`] times a factor between 0.75 and 1.25.
    fn period(&mut self) -> Duration {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        DIGEST_EVERY.mul_f64(0.75 + 0.5 * unit)
    }
}

/// The id right after `id` (as a 256-bit big-endian number); `None` past the highest.
fn successor(id: &NodeId) -> Option<NodeId> {
    let mut next = id.0;
    for byte in next.iter_mut().rev() {
        if *byte == u8::MAX {
            *byte = 0;
        } else {
            *byte += 1;
            return Some(NodeId(next));
        }
    }
    None
}

impl Neighborhood {
    /// Sends the digest that is due to the next neighbor in turn, and schedules the next one.
    pub(super) fn send_digest(&mut self, now: Instant) {
        self.anti_entropy.at = now + self.anti_entropy.period();
        if self.withdrawn {
            return;
        }
        let mut peers: Vec<NodeId> = self
            .streams
            .iter()
            .filter(|(peer, streams)| {
                !self.departed.contains(peer)
                    && streams
                        .last()
                        .is_some_and(|s| s.speaks_digest() && !s.is_busy())
            })
            .map(|(peer, _)| *peer)
            .collect();
        if peers.is_empty() {
            return;
        }
        peers.sort_unstable();
        let peer = match self.anti_entropy.last_peer {
            Some(last) => peers
                .iter()
                .find(|p| **p > last)
                .copied()
                .unwrap_or(peers[0]),
            None => peers[0],
        };
        let start = self.anti_entropy.cursor.unwrap_or(NodeId([0; 32]));
        let max = self.anti_entropy.max_entries.min(MAX_DIGEST_ENTRIES);
        let mut entries: Vec<(NodeId, u64)> = self
            .db
            .records_from(&start)
            .take(max + 1)
            .map(|r| (r.id(), r.version()))
            .collect();
        let complete = entries.len() <= max;
        entries.truncate(max);
        let next = if complete {
            None
        } else {
            entries.last().and_then(|(last, _)| successor(last))
        };
        let digest = Digest {
            start,
            complete: complete || next.is_none(),
            entries,
        };
        let body = match Frame::Digest(digest).encode() {
            Ok(body) => body,
            Err(e) => {
                // Only a bug could make the digest of a database invalid.
                debug!(error = %e, "digest not sent");
                return;
            }
        };
        let Some(stream) = self.stream_to(&peer) else {
            return;
        };
        let len = body.len() as u64;
        if stream.try_send(body).is_ok() {
            self.counters.digests_sent += 1;
            self.counters.digest_bytes_sent += len;
            self.anti_entropy.last_peer = Some(peer);
            self.anti_entropy.cursor = next;
        }
    }

    /// Answers `from`'s digest: sends it, in gossip frames, the records this node could reach at
    /// its last prune that the digest lacks or lists at a lower version, and the others that it
    /// lists at a lower version (never a tombstone it lacks), but not those still
    /// on their way by gossip (stored less than [`REPAIR_AGE`] ago, or owed in the outbox) nor
    /// the own record while a change of it waits. At most [`MAX_REPAIR_BYTES`] of them: newer
    /// versions of records the digest lists first, then those it lacks, each stored here longest
    /// ago first (the surest to have been missed rather than to be on their way by another
    /// path). Nothing while gossip to the neighbor is held back (its
    /// queue busy, or a backlog owed to it).
    pub(super) fn answer_digest(&mut self, from: NodeId, digest: Digest) {
        self.counters.digests_received += 1;
        if self.withdrawn || self.departed.contains(&from) {
            return;
        }
        // The field, not `stream_to`: the answer below updates other fields while it holds it.
        let Some(stream) = self.streams.get(&from).and_then(|s| s.last()) else {
            return;
        };
        // Gossip to it held back (its queue was busy): what it is owed leaves with the backlog's
        // retry, and a repair now would send it twice. The next digest asks again.
        if stream.is_busy() || self.backlog.contains_key(&from) {
            return;
        }
        let now = Instant::now();
        // Sooner than an honest neighbor sends them: not answered, and charged to its budget.
        if self
            .anti_entropy
            .answered
            .get(&from)
            .is_some_and(|at| now.saturating_duration_since(*at) < MIN_DIGEST_GAP)
        {
            self.useless_gossip(from);
            return;
        }
        self.anti_entropy.answered.insert(from, now);
        let me = self.own.id();
        let own_waits = self.own_held || self.own_unpublished;
        let mut lacked: Vec<(bool, Option<Instant>, &VerifiedRecord)> = Vec::new();
        for record in self.db.records_from(&digest.start) {
            let id = record.id();
            if !digest.covers(&id) {
                break;
            }
            let has = digest
                .entries
                .binary_search_by(|(e, _)| e.cmp(&id))
                .ok()
                .map(|at| digest.entries[at].1);
            if has.is_some_and(|v| v >= record.version()) {
                continue;
            }
            // The digest is the neighbor's word on what it holds now: what it once sent here
            // may have been dropped since (unreachable there at the end of its grace). Trusted
            // any longer, that memory would keep the record from it for ever: gossip sends a
            // record again only when it changes.
            if let Some(known) = self.peer_has.get_mut(&from) {
                known.remove(&id);
            }
            let learned = self.learned_at.get(&id).copied();
            let in_flight = self.outbox.changed.contains_key(&id)
                || learned.is_some_and(|at| now.saturating_duration_since(at) < REPAIR_AGE);
            // A record not reachable at the last prune (a tombstone, a stray) is sent only as a
            // newer version of one the neighbor holds: then it brings nothing back that the
            // neighbor dropped (a withdrawal whose direct frame it missed is such a record).
            let unreachable = !self.db.reachable_at_last_prune(&id) && has.is_none();
            if unreachable || in_flight || (id == me && own_waits) {
                continue;
            }
            lacked.push((has.is_none(), learned, record));
        }
        // Newer versions of records the neighbor holds first: they are what connects the rest
        // (a bridge node's changed record, without which the records behind it are
        // unreachable there and dropped at the end of their grace, to come back in the next
        // answer and be dropped again). Then the records it lacks. Each oldest first (a record
        // with no time kept counts as the oldest), by id among equals.
        lacked.sort_by_key(|(lacks, learned, record)| (*lacks, *learned, record.id()));
        let mut bytes = 0;
        let mut owed: Vec<&VerifiedRecord> = Vec::new();
        for (_, _, record) in lacked {
            bytes += record.wire().len();
            if bytes > MAX_REPAIR_BYTES && !owed.is_empty() {
                break;
            }
            owed.push(record);
        }
        if owed.is_empty() {
            return;
        }
        let (bodies, _) = Frame::gossip_bodies_marked(owed.iter().copied());
        let mut count = 0;
        for (body, mark) in bodies {
            let len = body.len() as u64;
            if stream.try_send(body).is_err() {
                break;
            }
            self.counters.frames_sent += 1;
            self.counters.bytes_sent += len;
            count = mark;
        }
        self.counters.records_repaired += count as u64;
        debug!(peer = %from.short(), records = count, "records a neighbor lacked sent in answer to its digest");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_of_an_id_carries_and_the_highest_has_none() {
        let mut id = [0u8; 32];
        id[31] = 0xff;
        id[30] = 0x01;
        let mut next = [0u8; 32];
        next[30] = 0x02;
        assert_eq!(successor(&NodeId(id)), Some(NodeId(next)));
        assert_eq!(successor(&NodeId([0xff; 32])), None);
    }

    #[test]
    fn periods_are_jittered_within_a_quarter_of_the_mean() {
        let mut state = AntiEntropy::new(&NodeId([7; 32]), Instant::now());
        let periods: Vec<Duration> = (0..200).map(|_| state.period()).collect();
        assert!(
            periods
                .iter()
                .all(|p| *p >= DIGEST_EVERY.mul_f64(0.75) && *p <= DIGEST_EVERY.mul_f64(1.25))
        );
        assert!(periods.iter().any(|p| *p != periods[0]), "jittered");
    }
}
