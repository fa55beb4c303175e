//! How many streams and handshakes a node takes on, derived from its file-descriptor limit, so
//! that the UI, dialing and the node's own files always keep descriptors.

use tracing::{info, warn};

use super::MAX_STREAMS;

/// Descriptors kept out of the neighbor budget: the two listeners, UI clients (websockets and
/// HTTP requests), the dialers' sockets, the key file, logs and the runtime's own.
pub const RESERVED_FDS: u64 = 128;
/// Most handshakes in progress at once, whatever the descriptor limit: a handshake is cheap
/// (three small messages) and finishes in a round trip or two, so more than this in flight is
/// a flood, not a busy mesh.
pub const MAX_HANDSHAKES: usize = 256;
/// Fewest handshakes in progress allowed however small the limit, so that a node under a
/// connection flood still lets honest neighbors in.
pub const MIN_HANDSHAKES: usize = 8;

/// The caps a pool enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Admitted streams (one descriptor each).
    pub max_streams: usize,
    /// Connections accepted but not yet through their handshake.
    pub max_handshakes: usize,
}

impl Limits {
    /// The caps for a process allowed `nofile` descriptors: [`RESERVED_FDS`] are kept aside,
    /// an eighth of the rest (within [`MIN_HANDSHAKES`]..=[`MAX_HANDSHAKES`]) may be in a
    /// handshake, and the remainder, at most [`MAX_STREAMS`], may be admitted.
    pub fn from_fd_limit(nofile: u64) -> Self {
        let usable = usize::try_from(nofile.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
        let max_handshakes = (usable / 8).clamp(MIN_HANDSHAKES, MAX_HANDSHAKES);
        let max_streams = usable.saturating_sub(max_handshakes).clamp(1, MAX_STREAMS);
        Self {
            max_streams,
            max_handshakes,
        }
    }

    /// The caps for this process: raises the soft descriptor limit to the hard one first, as
    /// daemons do, then derives them from what is in force.
    pub fn for_this_process() -> Self {
        let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(nofile) => nofile,
            Err(e) => {
                let fallback = rlimit::getrlimit(rlimit::Resource::NOFILE)
                    .map(|(soft, _)| soft)
                    .unwrap_or(1024);
                warn!(error = %e, nofile = fallback, "cannot raise the file-descriptor limit");
                fallback
            }
        };
        let limits = Self::from_fd_limit(nofile);
        if limits.max_streams < MAX_STREAMS {
            info!(
                nofile,
                max_streams = limits.max_streams,
                max_handshakes = limits.max_handshakes,
                "neighbor limits set by the file-descriptor limit"
            );
        }
        limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_1024_keeps_descriptors_for_the_ui_and_dialing() {
        let limits = Limits::from_fd_limit(1024);
        assert_eq!(limits.max_handshakes, 112);
        assert_eq!(limits.max_streams, 1024 - 128 - 112);
        assert!(
            limits.max_streams + limits.max_handshakes + RESERVED_FDS as usize <= 1024,
            "{limits:?}"
        );
    }

    #[test]
    fn a_large_limit_is_capped_and_a_tiny_one_still_admits_someone() {
        let large = Limits::from_fd_limit(1 << 20);
        assert_eq!(
            (large.max_streams, large.max_handshakes),
            (MAX_STREAMS, MAX_HANDSHAKES)
        );
        let tiny = Limits::from_fd_limit(64);
        assert_eq!((tiny.max_streams, tiny.max_handshakes), (1, MIN_HANDSHAKES));
    }
}
