//! Frames between neighbors: a 4-byte big-endian length, then that many bytes of body: a type
//! byte, then binary records (docs/protocol.md, "Frames").
//!
//! [`FrameCodec`] enforces [`MAX_FRAME_LEN`]. Unlike a plain length-delimited codec it does not
//! give up on an oversized frame: it reports it as [`Inbound::Oversized`] and skips its body, so
//! the connection survives one bad frame and the caller decides when a peer has sent too many.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::digest::{DIGEST, Digest, DigestError};
use crate::record::{
    Cursor, NodeId, RECORD_FIXED_LEN, SignedRecord, VerifiedRecord, WireError, WireRecord,
    peek_record,
};

/// Largest frame body either side sends or accepts, in bytes.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Gossip is packed into frames of about this many bytes (a single larger record goes alone).
pub const GOSSIP_FRAME_TARGET: usize = 256 * 1024;
/// The neighbor protocol version of these frames (binary; 2 was JSON).
pub const PROTOCOL_VERSION: u16 = 3;
const HEADER_LEN: usize = 4;
/// The type byte of a hello: one record.
pub const HELLO: u8 = 1;
/// The type byte of gossip: a u32 count, then the records back to back.
pub const GOSSIP: u8 = 2;
/// Bytes of a gossip body before its records: the type and the count.
const GOSSIP_HEAD_LEN: usize = 1 + 4;

/// A message between neighbors, as values: what tests and tools build and read. The node itself
/// reads [`WireFrame`]s, which keep each record's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame on a stream, from each side: who I am, signed.
    Hello { record: SignedRecord },
    /// Standard gossip: records the sender believes the receiver may not have.
    Gossip { records: Vec<SignedRecord> },
    /// Anti-entropy: what the sender stores, by id and version (feature bit 0 only).
    Digest(Digest),
}

/// A frame as read off the wire: each record with the exact bytes it came in, so that it can be
/// verified and forwarded without being encoded again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireFrame {
    Hello(WireRecord),
    Gossip(Vec<WireRecord>),
    Digest(Digest),
}

/// Why a frame could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is malformed: {0}")]
    Malformed(#[from] WireError),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// A frame of a type this node does not know: from a peer that speaks a newer version, it is
    /// skipped; from any other peer it is a bad frame.
    #[error("frame of unknown type {0}")]
    UnknownType(u8),
    #[error("digest is malformed: {0}")]
    BadDigest(#[from] DigestError),
}

impl WireFrame {
    /// Reads a frame body. Never panics and allocates nothing a count claims before the bytes
    /// for it are there.
    pub fn decode(body: &[u8]) -> Result<WireFrame, FrameError> {
        let Some((&kind, rest)) = body.split_first() else {
            return Err(WireError::Empty.into());
        };
        match kind {
            HELLO => {
                let (record, used) = WireRecord::read(rest)?;
                match rest.len() - used {
                    0 => Ok(WireFrame::Hello(record)),
                    extra => Err(WireError::Trailing(extra).into()),
                }
            }
            GOSSIP => {
                let mut r = Cursor {
                    bytes: rest,
                    pos: 0,
                };
                let count = u32::from_be_bytes(r.array("record count")?);
                let left = r.rest();
                if count as usize > left.len() / RECORD_FIXED_LEN {
                    return Err(WireError::TooManyRecords(count).into());
                }
                let mut records = Vec::with_capacity(count as usize);
                let mut left = left;
                for _ in 0..count {
                    let (record, used) = WireRecord::read(left)?;
                    records.push(record);
                    left = &left[used..];
                }
                if !left.is_empty() {
                    return Err(WireError::Trailing(left.len()).into());
                }
                Ok(WireFrame::Gossip(records))
            }
            DIGEST => Ok(WireFrame::Digest(Digest::decode(body)?)),
            other => Err(FrameError::UnknownType(other)),
        }
    }
}

impl From<WireFrame> for Frame {
    fn from(frame: WireFrame) -> Self {
        match frame {
            WireFrame::Hello(record) => Frame::Hello {
                record: record.into_signed(),
            },
            WireFrame::Gossip(records) => Frame::Gossip {
                records: records.into_iter().map(WireRecord::into_signed).collect(),
            },
            WireFrame::Digest(digest) => Frame::Digest(digest),
        }
    }
}

impl Frame {
    pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
        WireFrame::decode(body).map(Frame::from)
    }

    pub fn encode(&self) -> Result<Bytes, FrameError> {
        let mut body = BytesMut::new();
        match self {
            Frame::Hello { record } => {
                body.reserve(1 + record.wire_len());
                body.put_u8(HELLO);
                record.encode_into(&mut body);
            }
            Frame::Gossip { records } => {
                let len =
                    GOSSIP_HEAD_LEN + records.iter().map(SignedRecord::wire_len).sum::<usize>();
                if len > MAX_FRAME_LEN {
                    return Err(FrameError::TooLarge(len));
                }
                body.reserve(len);
                body.put_u8(GOSSIP);
                body.put_u32(u32::try_from(records.len()).map_err(|_| FrameError::TooLarge(len))?);
                for record in records {
                    record.encode_into(&mut body);
                }
            }
            Frame::Digest(digest) => {
                body.extend_from_slice(&digest.encode()?);
            }
        }
        if body.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(body.len()));
        }
        Ok(body.freeze())
    }

    /// The hello body carrying `record`, made from its wire bytes.
    pub fn hello_body(record: &VerifiedRecord) -> Result<Bytes, FrameError> {
        let wire = record.wire();
        if 1 + wire.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(1 + wire.len()));
        }
        let mut body = BytesMut::with_capacity(1 + wire.len());
        body.put_u8(HELLO);
        body.put_slice(wire);
        Ok(body.freeze())
    }

    /// Packs records into as few `gossip` frame bodies as fit [`GOSSIP_FRAME_TARGET`], by
    /// copying each record's wire bytes (none is encoded here). Records too large for any frame
    /// are left out and counted in the second value (a well-formed record never is: see
    /// `record::MAX_NEIGHBORS`).
    pub fn gossip_bodies<'a>(
        records: impl IntoIterator<Item = &'a VerifiedRecord>,
    ) -> (Vec<Bytes>, usize) {
        let (bodies, skipped) = Self::gossip_bodies_marked(records);
        (bodies.into_iter().map(|(body, _)| body).collect(), skipped)
    }

    /// As [`Frame::gossip_bodies`], with each body marked by how many of the input records
    /// (left-out ones included) come up to its end: a sender that could send only the first
    /// `k` bodies knows that the records from the `k`-th body's mark on are still owed.
    pub fn gossip_bodies_marked<'a>(
        records: impl IntoIterator<Item = &'a VerifiedRecord>,
    ) -> (Vec<(Bytes, usize)>, usize) {
        /// Ends a body: writes its count into the head.
        fn finish(mut body: BytesMut, count: u32) -> Bytes {
            body[1..GOSSIP_HEAD_LEN].copy_from_slice(&count.to_be_bytes());
            body.freeze()
        }
        let mut bodies = Vec::new();
        let mut skipped = 0;
        let mut current = BytesMut::new();
        let mut count = 0u32;
        let mut seen = 0;
        for record in records {
            seen += 1;
            let wire = record.wire();
            if GOSSIP_HEAD_LEN + wire.len() > MAX_FRAME_LEN {
                skipped += 1;
                continue;
            }
            if count > 0 && current.len() + wire.len() > GOSSIP_FRAME_TARGET {
                bodies.push((finish(std::mem::take(&mut current), count), seen - 1));
                count = 0;
            }
            if count == 0 {
                current.put_u8(GOSSIP);
                current.put_u32(0);
            }
            current.put_slice(wire);
            count += 1;
        }
        if count > 0 {
            bodies.push((finish(current, count), seen));
        }
        (bodies, skipped)
    }
}

/// The records of a gossip body as each one's id and bytes, read from their heads alone: for a
/// light reader that looks for one node's record among many and decodes only that one
/// ([`SignedRecord::from_wire`]). Checks the frame's bounds, not its records' contents.
pub fn gossip_records(body: &[u8]) -> Result<Vec<(NodeId, &[u8])>, FrameError> {
    let Some((&kind, rest)) = body.split_first() else {
        return Err(WireError::Empty.into());
    };
    if kind != GOSSIP {
        return Err(FrameError::UnknownType(kind));
    }
    let mut r = Cursor {
        bytes: rest,
        pos: 0,
    };
    let count = u32::from_be_bytes(r.array("record count")?);
    let mut left = r.rest();
    if count as usize > left.len() / RECORD_FIXED_LEN {
        return Err(WireError::TooManyRecords(count).into());
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (id, used) = peek_record(left)?;
        out.push((id, &left[..used]));
        left = &left[used..];
    }
    if !left.is_empty() {
        return Err(WireError::Trailing(left.len()).into());
    }
    Ok(out)
}

/// What the decoder yields: a frame body, or news that an oversized one was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Frame(Bytes),
    Oversized { len: usize },
}

/// Length-prefixed framing with a size limit that skips, rather than dies on, oversized frames.
#[derive(Debug, Default)]
pub struct FrameCodec {
    state: DecodeState,
}

#[derive(Debug, Default, Clone, Copy)]
enum DecodeState {
    #[default]
    Head,
    Body(usize),
    Skip(usize),
}

impl FrameCodec {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Decoder for FrameCodec {
    type Item = Inbound;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, Self::Error> {
        loop {
            match self.state {
                DecodeState::Skip(remaining) => {
                    let n = remaining.min(src.len());
                    src.advance(n);
                    if n < remaining {
                        self.state = DecodeState::Skip(remaining - n);
                        return Ok(None);
                    }
                    self.state = DecodeState::Head;
                }
                DecodeState::Head => {
                    if src.len() < HEADER_LEN {
                        src.reserve(HEADER_LEN - src.len());
                        return Ok(None);
                    }
                    let len = src.get_u32() as usize;
                    if len > MAX_FRAME_LEN {
                        self.state = DecodeState::Skip(len);
                        return Ok(Some(Inbound::Oversized { len }));
                    }
                    self.state = DecodeState::Body(len);
                }
                DecodeState::Body(len) => {
                    if src.len() < len {
                        src.reserve(len - src.len());
                        return Ok(None);
                    }
                    self.state = DecodeState::Head;
                    return Ok(Some(Inbound::Frame(src.split_to(len).freeze())));
                }
            }
        }
    }

    /// Like [`Decoder::decode`], but a stream that ends inside a frame (its header, its body,
    /// or the body of an oversized frame being skipped) is an error, wherever it was cut.
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, Self::Error> {
        if let Some(item) = self.decode(src)? {
            return Ok(Some(item));
        }
        match self.state {
            DecodeState::Head if src.is_empty() => Ok(None),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "stream ended inside a frame",
            )),
        }
    }
}

/// The 4-byte length prefix of a frame body of `len` bytes, for writers that send the body
/// from its own buffer instead of copying it through [`FrameCodec`].
pub fn frame_header(len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(u32::try_from(len)
        .map_err(|_| FrameError::TooLarge(len))?
        .to_be_bytes())
}

impl Encoder<Bytes> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> Result<(), Self::Error> {
        let header = frame_header(body.len())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        dst.reserve(HEADER_LEN + body.len());
        dst.extend_from_slice(&header);
        dst.extend_from_slice(&body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::record::{Identity, NodeRecord};

    fn signed(seed: u8, neighbors: usize) -> SignedRecord {
        let me = Identity::from_seed([seed; 32]);
        let neighbors: BTreeSet<_> = (0..neighbors)
            .map(|i| Identity::from_seed([i as u8 ^ 0x55; 32]).id())
            .collect();
        me.sign(NodeRecord {
            id: me.id(),
            addr: "127.0.0.1:1".into(),
            version: 1,
            neighbors,
        })
    }

    fn verified(seed: u8, neighbors: usize) -> VerifiedRecord {
        signed(seed, neighbors).into_verified().expect("verifies")
    }

    fn encoded(body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::new()
            .encode(Bytes::copy_from_slice(body), &mut buf)
            .expect("encodes");
        buf
    }

    #[test]
    fn frames_round_trip_even_when_split_across_reads() {
        let frame = Frame::Gossip {
            records: vec![signed(1, 2), signed(2, 0)],
        };
        let wire = encoded(&frame.encode().expect("encodes"));
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            if let Some(item) = codec.decode(&mut buf).expect("decodes") {
                out.push(item);
            }
        }
        let [Inbound::Frame(body)] = out.as_slice() else {
            panic!("one frame, got {out:?}")
        };
        assert_eq!(Frame::decode(body).expect("valid"), frame);
    }

    #[test]
    fn an_oversized_frame_is_reported_and_skipped_and_the_next_one_still_decodes() {
        let mut buf = BytesMut::new();
        let big = MAX_FRAME_LEN + 10;
        buf.put_u32(big as u32);
        buf.extend_from_slice(&vec![b'x'; big]);
        buf.extend_from_slice(&encoded(b"{}"));
        let mut codec = FrameCodec::new();
        assert_eq!(
            codec.decode(&mut buf).expect("ok"),
            Some(Inbound::Oversized { len: big })
        );
        assert_eq!(
            codec.decode(&mut buf).expect("ok"),
            Some(Inbound::Frame(Bytes::from("{}")))
        );
        assert_eq!(codec.decode(&mut buf).expect("ok"), None);
    }

    #[test]
    fn a_truncated_frame_is_an_error_at_eof() {
        let mut wire = encoded(&[GOSSIP, 0, 0, 0, 0]);
        wire.truncate(wire.len() - 3);
        let mut codec = FrameCodec::new();
        assert_eq!(codec.decode(&mut wire).expect("ok"), None);
        assert!(codec.decode_eof(&mut wire).is_err());
    }

    /// Regression: a stream cut right after a frame's header, or inside an oversized frame's
    /// body, used to end quietly, while one cut inside a body was an error.
    #[test]
    fn a_stream_cut_anywhere_inside_a_frame_is_an_error_at_eof() {
        let mut oversized = BytesMut::new();
        oversized.put_u32(MAX_FRAME_LEN as u32 + 1);
        oversized.extend_from_slice(b"xyz");
        let whole = encoded(b"{}");
        for (cut, mut wire) in [
            ("inside the header", BytesMut::from(&whole[..2])),
            ("after the header", BytesMut::from(&whole[..4])),
            ("inside the body", BytesMut::from(&whole[..5])),
            ("inside an oversized body", oversized.clone()),
            ("after an oversized header", BytesMut::from(&oversized[..4])),
        ] {
            let mut codec = FrameCodec::new();
            let mut items = Vec::new();
            let end = loop {
                match codec.decode_eof(&mut wire) {
                    Ok(Some(item)) => items.push(item),
                    other => break other,
                }
            };
            assert!(end.is_err(), "cut {cut}: {items:?} then {end:?}");
        }
        let mut wire = whole;
        let mut codec = FrameCodec::new();
        assert!(matches!(
            codec.decode_eof(&mut wire),
            Ok(Some(Inbound::Frame(_)))
        ));
        assert!(
            matches!(codec.decode_eof(&mut wire), Ok(None)),
            "a whole frame ends cleanly"
        );
    }

    fn gossip_body(records: &[SignedRecord]) -> Vec<u8> {
        Frame::Gossip {
            records: records.to_vec(),
        }
        .encode()
        .expect("encodes")
        .to_vec()
    }

    #[test]
    fn empty_truncated_trailing_and_overcounted_bodies_are_malformed() {
        let record = signed(1, 2);
        let good = gossip_body(std::slice::from_ref(&record));
        let mut trailing = good.clone();
        trailing.push(0);
        let mut overcounted = good.clone();
        overcounted[1..5].copy_from_slice(&2u32.to_be_bytes());
        // A count that no frame could hold is refused before anything is allocated for it.
        let mut huge_count = good[..5].to_vec();
        huge_count[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut hello = vec![HELLO];
        hello.extend_from_slice(&record.to_wire());
        let mut hello_trailing = hello.clone();
        hello_trailing.extend_from_slice(&record.to_wire());
        for (what, body) in [
            ("empty", Vec::new()),
            ("type alone", vec![GOSSIP]),
            ("half a count", vec![GOSSIP, 0, 0]),
            ("cut in a record", good[..good.len() - 1].to_vec()),
            ("a byte after", trailing),
            ("a count of more records", overcounted),
            ("a count of u32::MAX", huge_count),
            ("hello with nothing", vec![HELLO]),
            ("hello with two records", hello_trailing),
        ] {
            assert!(
                matches!(Frame::decode(&body), Err(FrameError::Malformed(_))),
                "{what}: {:?}",
                Frame::decode(&body)
            );
        }
        assert!(Frame::decode(&hello).is_ok());
        assert_eq!(
            Frame::decode(&[GOSSIP, 0, 0, 0, 0]).expect("empty gossip is well formed"),
            Frame::Gossip {
                records: Vec::new()
            }
        );
    }

    #[test]
    fn an_unknown_type_byte_is_told_apart_from_a_malformed_frame() {
        for kind in [0u8, 4, 0x7b, 255] {
            assert!(matches!(
                Frame::decode(&[kind, 1, 2, 3]),
                Err(FrameError::UnknownType(k)) if k == kind
            ));
        }
        // A version 2 (JSON) frame reads as an unknown type: `{` is 0x7b.
        assert!(matches!(
            Frame::decode(br#"{"type":"gossip","records":[]}"#),
            Err(FrameError::UnknownType(0x7b))
        ));
    }

    #[test]
    fn gossip_is_packed_into_bounded_frames_that_decode_to_the_same_records() {
        let records: Vec<_> = (128..208).map(|i| verified(i, 100)).collect();
        let (bodies, skipped) = Frame::gossip_bodies(&records);
        assert_eq!(skipped, 0);
        assert!(
            bodies.len() > 1,
            "80 records of ~3.3 KB need more than one frame"
        );
        let mut back = Vec::new();
        for body in &bodies {
            assert!(body.len() <= GOSSIP_FRAME_TARGET);
            let Frame::Gossip { records } = Frame::decode(body).expect("valid") else {
                panic!("gossip expected")
            };
            back.extend(records);
        }
        let sent: Vec<SignedRecord> = records.iter().map(|r| r.signed().clone()).collect();
        assert_eq!(back, sent);
        assert_eq!(Frame::gossip_bodies(&[]).0.len(), 0);
    }

    #[test]
    fn packed_gossip_is_byte_for_byte_the_frame_of_its_records() {
        let records: Vec<_> = (0..3).map(|i| verified(i, i as usize)).collect();
        let (bodies, _) = Frame::gossip_bodies(&records);
        let sent: Vec<SignedRecord> = records.iter().map(|r| r.signed().clone()).collect();
        assert_eq!(bodies, vec![Bytes::from(gossip_body(&sent))]);
        let hello = Frame::hello_body(&records[0]).expect("fits");
        let expected = Frame::Hello {
            record: sent[0].clone(),
        };
        assert_eq!(hello, expected.encode().expect("encodes"));
    }

    /// Golden bytes, also in docs/protocol.md: the wire format must not drift.
    #[test]
    fn a_gossip_frame_is_byte_for_byte_as_documented() {
        let body = gossip_body(&[crate::record::tests::golden()]);
        assert_eq!(body.len(), 5 + 158);
        assert_eq!(
            hex::encode(&body),
            format!("0200000001{}", crate::record::tests::GOLDEN_RECORD_HEX)
        );
        let hello = Frame::Hello {
            record: crate::record::tests::golden(),
        }
        .encode()
        .expect("encodes");
        assert_eq!(
            hex::encode(&hello),
            format!("01{}", crate::record::tests::GOLDEN_RECORD_HEX)
        );
    }

    #[test]
    fn gossip_records_finds_each_record_without_decoding_it() {
        let records: Vec<_> = (0..3).map(|i| signed(i, 3)).collect();
        let body = gossip_body(&records);
        let found = gossip_records(&body).expect("well formed");
        assert_eq!(found.len(), 3);
        for ((id, bytes), record) in found.iter().zip(&records) {
            assert_eq!(*id, record.id());
            assert_eq!(&SignedRecord::from_wire(bytes).expect("decodes"), record);
        }
        assert!(gossip_records(&body[..body.len() - 1]).is_err());
        assert!(gossip_records(&[HELLO]).is_err());
    }
}
