//! The `digest` frame of anti-entropy (docs/protocol.md, "Anti-entropy: digests"): the (id,
//! version) of the records a node stores, from an id on, at most [`MAX_DIGEST_ENTRIES`] of
//! them. Its receiver answers with the records it stores that the digest lacks or lists older.

use bytes::{BufMut, Bytes, BytesMut};

use crate::record::NodeId;

/// The type byte of a digest.
pub const DIGEST: u8 = 3;
/// Most entries in one digest.
pub const MAX_DIGEST_ENTRIES: usize = 1024;
/// Bytes of one entry: an id and a version.
pub const DIGEST_ENTRY_LEN: usize = 32 + 8;
/// Bytes of a digest body before its entries: the type, `start`, `complete` and the count.
pub const DIGEST_HEAD_LEN: usize = 1 + 32 + 1 + 4;
/// The largest digest body: 40,998 bytes.
pub const MAX_DIGEST_LEN: usize = DIGEST_HEAD_LEN + DIGEST_ENTRY_LEN * MAX_DIGEST_ENTRIES;

/// What a node stores, by id and version, over a range of ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// The lowest id the digest covers.
    pub start: NodeId,
    /// Whether it covers every id from `start` up; otherwise only up to its last entry.
    pub complete: bool,
    /// (id, version), ids strictly ascending, none below `start`.
    pub entries: Vec<(NodeId, u64)>,
}

/// Why a digest body could not be read or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest cut short in its {0}")]
    Truncated(&'static str),
    #[error("digest has {0} bytes after its last entry")]
    Trailing(usize),
    #[error("digest of {0} entries exceeds the limit of {MAX_DIGEST_ENTRIES}")]
    TooManyEntries(usize),
    #[error("digest ids are not strictly ascending from its start")]
    Unordered,
    #[error("digest's complete flag is {0}, not 0 or 1")]
    BadFlag(u8),
    #[error("an incomplete digest with no entry covers nothing")]
    Empty,
    #[error("not a digest: type {0}")]
    NotDigest(u8),
}

impl Digest {
    /// The range this digest covers holds `id`.
    pub fn covers(&self, id: &NodeId) -> bool {
        *id >= self.start
            && (self.complete || self.entries.last().is_some_and(|(last, _)| id <= last))
    }

    /// Checks the rules a digest must follow (ascending ids from `start`, its bounds).
    pub fn check(&self) -> Result<(), DigestError> {
        if self.entries.len() > MAX_DIGEST_ENTRIES {
            return Err(DigestError::TooManyEntries(self.entries.len()));
        }
        if !self.complete && self.entries.is_empty() {
            return Err(DigestError::Empty);
        }
        let mut floor: Option<&NodeId> = None;
        for (id, _) in &self.entries {
            let ordered = match floor {
                None => *id >= self.start,
                Some(previous) => id > previous,
            };
            if !ordered {
                return Err(DigestError::Unordered);
            }
            floor = Some(id);
        }
        Ok(())
    }

    /// The digest's frame body (its type byte first).
    pub fn encode(&self) -> Result<Bytes, DigestError> {
        self.check()?;
        let mut body =
            BytesMut::with_capacity(DIGEST_HEAD_LEN + DIGEST_ENTRY_LEN * self.entries.len());
        body.put_u8(DIGEST);
        body.put_slice(&self.start.0);
        body.put_u8(u8::from(self.complete));
        // At most MAX_DIGEST_ENTRIES, checked above.
        body.put_u32(self.entries.len() as u32);
        for (id, version) in &self.entries {
            body.put_slice(&id.0);
            body.put_u64(*version);
        }
        Ok(body.freeze())
    }

    /// Reads a digest body (its type byte first). Never panics, and allocates nothing for a
    /// count the bytes cannot hold.
    pub fn decode(body: &[u8]) -> Result<Digest, DigestError> {
        let Some((&kind, rest)) = body.split_first() else {
            return Err(DigestError::Truncated("type"));
        };
        if kind != DIGEST {
            return Err(DigestError::NotDigest(kind));
        }
        let (start, rest) = take::<32>(rest, "start")?;
        let (flag, rest) = take::<1>(rest, "complete flag")?;
        let complete = match flag[0] {
            0 => false,
            1 => true,
            other => return Err(DigestError::BadFlag(other)),
        };
        let (count, mut rest) = take::<4>(rest, "entry count")?;
        let count = u32::from_be_bytes(count) as usize;
        if count > MAX_DIGEST_ENTRIES {
            return Err(DigestError::TooManyEntries(count));
        }
        if rest.len() < count * DIGEST_ENTRY_LEN {
            return Err(DigestError::Truncated("entries"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let (id, after) = take::<32>(rest, "entry id")?;
            let (version, after) = take::<8>(after, "entry version")?;
            entries.push((NodeId(id), u64::from_be_bytes(version)));
            rest = after;
        }
        if !rest.is_empty() {
            return Err(DigestError::Trailing(rest.len()));
        }
        let digest = Digest {
            start: NodeId(start),
            complete,
            entries,
        };
        digest.check()?;
        Ok(digest)
    }
}

/// The first `N` bytes of `bytes` and the rest.
fn take<'a, const N: usize>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<([u8; N], &'a [u8]), DigestError> {
    let Some((head, rest)) = bytes.split_first_chunk::<N>() else {
        return Err(DigestError::Truncated(what));
    };
    Ok((*head, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> NodeId {
        NodeId([byte; 32])
    }

    #[test]
    fn a_digest_has_the_documented_layout_and_reads_back() {
        let digest = Digest {
            start: id(1),
            complete: false,
            entries: vec![(id(2), 7), (id(3), 1 << 40)],
        };
        let body = digest.encode().expect("a valid digest encodes");
        let mut expected = vec![DIGEST];
        expected.extend([1u8; 32]);
        expected.push(0);
        expected.extend(2u32.to_be_bytes());
        expected.extend([2u8; 32]);
        expected.extend(7u64.to_be_bytes());
        expected.extend([3u8; 32]);
        expected.extend((1u64 << 40).to_be_bytes());
        assert_eq!(body.as_ref(), expected.as_slice());
        assert_eq!(body.len(), DIGEST_HEAD_LEN + 2 * DIGEST_ENTRY_LEN);
        assert_eq!(Digest::decode(&body), Ok(digest));
    }

    #[test]
    fn the_largest_digest_is_bounded_and_one_more_entry_is_refused() {
        let entries: Vec<(NodeId, u64)> = (0..=MAX_DIGEST_ENTRIES as u32)
            .map(|i| {
                let mut bytes = [0u8; 32];
                bytes[28..].copy_from_slice(&i.to_be_bytes());
                (NodeId(bytes), 1)
            })
            .collect();
        let largest = Digest {
            start: NodeId([0; 32]),
            complete: true,
            entries: entries[..MAX_DIGEST_ENTRIES].to_vec(),
        };
        let body = largest.encode().expect("the largest digest encodes");
        assert_eq!(body.len(), MAX_DIGEST_LEN);
        assert_eq!(MAX_DIGEST_LEN, 40_998);
        let too_many = Digest { entries, ..largest };
        assert_eq!(
            too_many.encode(),
            Err(DigestError::TooManyEntries(MAX_DIGEST_ENTRIES + 1))
        );
        // A count over the limit is refused before anything is allocated for it.
        let mut forged = vec![DIGEST];
        forged.extend([0u8; 32]);
        forged.push(1);
        forged.extend(u32::MAX.to_be_bytes());
        assert_eq!(
            Digest::decode(&forged),
            Err(DigestError::TooManyEntries(u32::MAX as usize))
        );
    }

    #[test]
    fn malformed_digests_are_refused() {
        let good = Digest {
            start: id(1),
            complete: true,
            entries: vec![(id(2), 1), (id(4), 1)],
        }
        .encode()
        .expect("valid");
        for cut in 0..good.len() {
            assert!(Digest::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert_eq!(Digest::decode(&trailing), Err(DigestError::Trailing(1)));
        let mut flag = good.to_vec();
        flag[33] = 2;
        assert_eq!(Digest::decode(&flag), Err(DigestError::BadFlag(2)));
        let unordered = Digest {
            start: id(1),
            complete: true,
            entries: vec![(id(4), 1), (id(2), 1)],
        };
        assert_eq!(unordered.encode(), Err(DigestError::Unordered));
        let below_start = Digest {
            start: id(3),
            complete: true,
            entries: vec![(id(2), 1)],
        };
        assert_eq!(below_start.encode(), Err(DigestError::Unordered));
        let duplicate = Digest {
            start: id(1),
            complete: true,
            entries: vec![(id(2), 1), (id(2), 2)],
        };
        assert_eq!(duplicate.encode(), Err(DigestError::Unordered));
        let empty = Digest {
            start: id(1),
            complete: false,
            entries: vec![],
        };
        assert_eq!(empty.encode(), Err(DigestError::Empty));
    }

    #[test]
    fn a_digest_covers_its_range() {
        let partial = Digest {
            start: id(2),
            complete: false,
            entries: vec![(id(3), 1), (id(5), 1)],
        };
        assert!(!partial.covers(&id(1)));
        assert!(partial.covers(&id(2)) && partial.covers(&id(4)) && partial.covers(&id(5)));
        assert!(!partial.covers(&id(6)));
        let rest = Digest {
            complete: true,
            ..partial
        };
        assert!(rest.covers(&id(200)) && !rest.covers(&id(1)));
    }
}
