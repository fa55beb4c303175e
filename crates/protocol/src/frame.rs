//! Frames between neighbors: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! [`FrameCodec`] enforces [`MAX_FRAME_LEN`]. Unlike a plain length-delimited codec it does not
//! give up on an oversized frame: it reports it as [`Inbound::Oversized`] and skips its body, so
//! the connection survives one bad frame and the caller decides when a peer has sent too many.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::record::SignedRecord;

/// Largest frame body either side sends or accepts, in bytes.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Gossip is packed into frames of about this many bytes (a single larger record goes alone).
pub const GOSSIP_FRAME_TARGET: usize = 256 * 1024;
/// The neighbor protocol version carried in `hello`.
pub const PROTOCOL_VERSION: u32 = 2;
const HEADER_LEN: usize = 4;
/// The frame types this version knows.
const KNOWN_TYPES: [&str; 2] = ["hello", "gossip"];

/// A message between neighbors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Frame {
    /// First frame on a stream, from each side: who I am, signed.
    Hello { protocol: u32, record: SignedRecord },
    /// Standard gossip: records the sender believes the receiver may not have.
    Gossip { records: Vec<SignedRecord> },
}

/// Why a frame could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not valid JSON of a known frame type: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// A well-formed frame of a type this node does not know: from a peer that speaks a newer
    /// version, it is skipped; from any other peer it is a bad frame.
    #[error("frame of unknown type {0:?}")]
    UnknownType(String),
}

impl Frame {
    pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
        serde_json::from_slice(body).map_err(|e| {
            /// Just the tag of a frame, to tell an unknown type from a malformed frame.
            #[derive(Deserialize)]
            struct Tag {
                r#type: String,
            }
            match serde_json::from_slice::<Tag>(body) {
                Ok(Tag { r#type }) if !KNOWN_TYPES.contains(&r#type.as_str()) => {
                    FrameError::UnknownType(r#type)
                }
                _ => FrameError::Malformed(e),
            }
        })
    }

    pub fn encode(&self) -> Result<Bytes, FrameError> {
        let body = serde_json::to_vec(self)?;
        if body.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(body.len()));
        }
        Ok(Bytes::from(body))
    }

    /// Packs records into as few `gossip` frame bodies as fit [`GOSSIP_FRAME_TARGET`], each
    /// record serialized once. Records too large for any frame are left out and counted in the
    /// second value (a well-formed record never is: see `record::MAX_NEIGHBORS`).
    pub fn gossip_bodies<'a>(
        records: impl IntoIterator<Item = &'a SignedRecord>,
    ) -> (Vec<Bytes>, usize) {
        let (bodies, skipped) = Self::gossip_bodies_marked(records);
        (bodies.into_iter().map(|(body, _)| body).collect(), skipped)
    }

    /// As [`Frame::gossip_bodies`], with each body marked by how many of the input records
    /// (left-out ones included) come up to its end: a sender that could send only the first
    /// `k` bodies knows that the records from the `k`-th body's mark on are still owed.
    pub fn gossip_bodies_marked<'a>(
        records: impl IntoIterator<Item = &'a SignedRecord>,
    ) -> (Vec<(Bytes, usize)>, usize) {
        const HEAD: &[u8] = br#"{"type":"gossip","records":["#;
        const TAIL: &[u8] = b"]}";
        let mut bodies = Vec::new();
        let mut skipped = 0;
        let mut current = BytesMut::new();
        let mut seen = 0;
        for record in records {
            seen += 1;
            let Ok(json) = serde_json::to_vec(record) else {
                skipped += 1;
                continue;
            };
            if HEAD.len() + json.len() + TAIL.len() > MAX_FRAME_LEN {
                skipped += 1;
                continue;
            }
            if !current.is_empty()
                && current.len() + 1 + json.len() + TAIL.len() > GOSSIP_FRAME_TARGET
            {
                current.put_slice(TAIL);
                bodies.push((std::mem::take(&mut current).freeze(), seen - 1));
            }
            if current.is_empty() {
                current.put_slice(HEAD);
            } else {
                current.put_u8(b',');
            }
            current.put_slice(&json);
        }
        if !current.is_empty() {
            current.put_slice(TAIL);
            bodies.push((current.freeze(), seen));
        }
        (bodies, skipped)
    }
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
            records: vec![signed(1, 2)],
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
        let mut wire = encoded(b"{\"type\":\"gossip\",\"records\":[]}");
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

    #[test]
    fn garbage_and_wrong_types_are_malformed() {
        for body in [
            &b"not json"[..],
            br#"{"type":"gossip","records":5}"#,
            br#"{"type":"hello"}"#,
            br#"{"type":7}"#,
        ] {
            assert!(matches!(Frame::decode(body), Err(FrameError::Malformed(_))));
        }
    }

    #[test]
    fn a_well_formed_frame_of_an_unknown_type_is_told_apart() {
        assert!(matches!(
            Frame::decode(br#"{"type":"x","more":[1,2]}"#),
            Err(FrameError::UnknownType(kind)) if kind == "x"
        ));
    }

    #[test]
    fn gossip_is_packed_into_bounded_frames_that_decode_to_the_same_records() {
        let records: Vec<_> = (0..40).map(|i| signed(i, 100)).collect();
        let (bodies, skipped) = Frame::gossip_bodies(&records);
        assert_eq!(skipped, 0);
        assert!(
            bodies.len() > 1,
            "40 records of ~7 KB need more than one frame"
        );
        let mut back = Vec::new();
        for body in &bodies {
            assert!(body.len() <= GOSSIP_FRAME_TARGET);
            let Frame::Gossip { records } = Frame::decode(body).expect("valid") else {
                panic!("gossip expected")
            };
            back.extend(records);
        }
        assert_eq!(back, records);
        assert_eq!(Frame::gossip_bodies(&[]).0.len(), 0);
    }
}
