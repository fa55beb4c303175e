//! Bad input found automatically: the frame codec, the binary frame decoder and the UI envelope
//! parser on arbitrary input, in arbitrary pieces, and valid frames cut short or mutated. The rules themselves are in `checks/`, shared with
//! the cargo-fuzz targets in `fuzz/` at the workspace root.
//!
//! Each property runs `PROPTEST_CASES` cases (256 by default). For a long run:
//! `PROPTEST_CASES=1000000 cargo test --release -p meshnode-protocol --test fuzz_props`.

mod checks;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use meshnode_protocol::{
    Digest, Frame, FrameError, Identity, Inbound, MAX_FRAME_LEN, NodeId, NodeRecord, SignedRecord,
    WireFrame, wire_len,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use checks::{HEADER_LEN, check_codec, check_frame_body, check_ui_text, decode_in_chunks};

/// Chunk sizes a reader might see: single bytes, small reads, socket-buffer-sized reads, and
/// reads larger than any frame.
fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![
            3 => 1..8usize,
            3 => 1..4096usize,
            1 => 1..3 * MAX_FRAME_LEN,
        ],
        1..16,
    )
}

/// Two records, signed once (signing is slow unoptimized), for frames that really decode.
fn signed_records() -> &'static [SignedRecord] {
    static RECORDS: OnceLock<Vec<SignedRecord>> = OnceLock::new();
    RECORDS.get_or_init(|| {
        let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        vec![
            a.sign(NodeRecord {
                id: a.id(),
                addr: "127.0.0.1:4000".into(),
                version: 7,
                neighbors: BTreeSet::from([b.id()]),
            }),
            b.sign(NodeRecord {
                id: b.id(),
                addr: "[::1]:4001".into(),
                version: u64::MAX,
                neighbors: BTreeSet::new(),
            }),
        ]
    })
}

/// One piece of a stream between neighbors.
#[derive(Debug, Clone)]
enum Piece {
    /// A valid frame.
    Frame(Frame),
    /// A frame within the limit whose body is anything at all.
    Garbage(Vec<u8>),
    /// A frame of exactly the limit.
    Largest,
    /// A frame over the limit, body and all.
    Oversized(usize),
}

/// How the stream ends: cleanly, or cut inside a frame.
#[derive(Debug, Clone)]
enum Tail {
    Clean,
    /// Part of a header.
    InHeader(Vec<u8>),
    /// A header promising `len` bytes, then fewer.
    InBody {
        len: usize,
        have: usize,
    },
    /// The header of a frame over the limit, then less than its body.
    InOversized {
        len: usize,
        have: usize,
    },
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (0..signed_records().len()).prop_map(|i| Frame::Hello {
            record: signed_records()[i].clone(),
        }),
        prop::collection::vec(0..signed_records().len(), 0..4).prop_map(|picks| {
            Frame::Gossip {
                records: picks.iter().map(|&i| signed_records()[i].clone()).collect(),
            }
        }),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        8 => frame().prop_map(Piece::Frame),
        8 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Piece::Garbage),
        1 => Just(Piece::Largest),
        2 => prop_oneof![
            Just(MAX_FRAME_LEN + 1),
            MAX_FRAME_LEN + 1..MAX_FRAME_LEN + 4096,
        ]
        .prop_map(Piece::Oversized),
    ]
}

fn tail() -> impl Strategy<Value = Tail> {
    prop_oneof![
        4 => Just(Tail::Clean),
        1 => prop::collection::vec(any::<u8>(), 1..HEADER_LEN).prop_map(Tail::InHeader),
        1 => (1..=MAX_FRAME_LEN)
            .prop_flat_map(|len| (Just(len), 0..len.min(4096)))
            .prop_map(|(len, have)| Tail::InBody { len, have }),
        1 => (MAX_FRAME_LEN + 1..=u32::MAX as usize, 0..4096usize)
            .prop_map(|(len, have)| Tail::InOversized { len, have }),
    ]
}

/// The bytes of a stream of `pieces` ending in `tail`, and what decoding it must give.
fn stream(pieces: &[Piece], tail: &Tail) -> (Vec<u8>, Vec<Inbound>, bool) {
    let mut wire = BytesMut::new();
    let mut expected = Vec::new();
    let mut frame = |wire: &mut BytesMut, body: Vec<u8>| {
        wire.put_u32(body.len() as u32);
        wire.put_slice(&body);
        if body.len() > MAX_FRAME_LEN {
            expected.push(Inbound::Oversized { len: body.len() });
        } else {
            expected.push(Inbound::Frame(Bytes::from(body)));
        }
    };
    for piece in pieces {
        let body = match piece {
            Piece::Frame(f) => f.encode().expect("small frames encode").to_vec(),
            Piece::Garbage(body) => body.clone(),
            Piece::Largest => vec![b'{'; MAX_FRAME_LEN],
            Piece::Oversized(len) => vec![b'x'; *len],
        };
        frame(&mut wire, body);
    }
    let clean = match tail {
        Tail::Clean => true,
        Tail::InHeader(bytes) => {
            wire.put_slice(bytes);
            false
        }
        Tail::InBody { len, have } | Tail::InOversized { len, have } => {
            wire.put_u32(*len as u32);
            wire.put_bytes(b'x', *have);
            if let Tail::InOversized { len, .. } = tail {
                expected.push(Inbound::Oversized { len: *len });
            }
            false
        }
    };
    (wire.to_vec(), expected, clean)
}

/// Any record the wire can carry (its signature arbitrary: decoding does not check it): any
/// version, an addr of any UTF-8 up to the limit, any set of neighbor ids.
fn any_record() -> impl Strategy<Value = SignedRecord> {
    (
        any::<[u8; 32]>(),
        any::<u64>(),
        "\\PC{0,60}",
        prop::collection::btree_set(any::<[u8; 32]>().prop_map(NodeId), 0..12),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(id, version, addr, neighbors, sig_a, sig_b)| {
            let mut signature = [0u8; 64];
            signature[..32].copy_from_slice(&sig_a);
            signature[32..].copy_from_slice(&sig_b);
            SignedRecord {
                record: NodeRecord {
                    id: NodeId(id),
                    addr,
                    version,
                    neighbors,
                },
                signature,
            }
        })
}

fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        any_record().prop_map(|record| Frame::Hello { record }),
        prop::collection::vec(any_record(), 0..6).prop_map(|records| Frame::Gossip { records }),
        any_digest().prop_map(Frame::Digest),
    ]
}

/// A valid digest: ascending ids from its start, complete or not (an incomplete one has an
/// entry).
fn any_digest() -> impl Strategy<Value = Digest> {
    (
        any::<[u8; 32]>(),
        prop::collection::btree_map(any::<[u8; 32]>(), any::<u64>(), 0..8),
        any::<bool>(),
    )
        .prop_map(|(start, entries, complete)| {
            let start = NodeId(start);
            let entries: Vec<(NodeId, u64)> = entries
                .into_iter()
                .map(|(id, v)| (NodeId(id), v))
                .filter(|(id, _)| *id >= start)
                .collect();
            Digest {
                start,
                complete: complete || entries.is_empty(),
                entries,
            }
        })
}

/// A change to a valid frame body.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip the bits of `xor` in one byte.
    Flip(prop::sample::Index, u8),
    /// Overwrite 4 bytes (a length or a count, if they fall on one) with any value.
    Word(prop::sample::Index, u32),
    /// Insert a byte.
    Insert(prop::sample::Index, u8),
    /// Remove a byte.
    Remove(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(at, xor)| Mutation::Flip(at, xor)),
        (any::<prop::sample::Index>(), any::<u32>()).prop_map(|(at, w)| Mutation::Word(at, w)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Remove),
    ]
}

fn mutate(body: &mut Vec<u8>, mutation: &Mutation) {
    if body.is_empty() {
        return;
    }
    match mutation {
        Mutation::Flip(at, xor) => {
            let i = at.index(body.len());
            body[i] ^= xor;
        }
        Mutation::Word(at, word) => {
            let i = at.index(body.len());
            let end = (i + 4).min(body.len());
            body[i..end].copy_from_slice(&word.to_be_bytes()[..end - i]);
        }
        Mutation::Insert(at, byte) => body.insert(at.index(body.len() + 1), *byte),
        Mutation::Remove(at) => {
            body.remove(at.index(body.len()));
        }
    }
}

/// Arbitrary JSON, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects shaped more or less like a UI request: each envelope field absent, of the right
/// type, or of a wrong one, among other fields.
fn envelope_like() -> impl Strategy<Value = Value> {
    let opcode = prop_oneof![
        ".{0,12}".prop_map(Value::String),
        Just(json!("shutdown")),
        json_value(),
    ];
    let context_id = prop_oneof![
        any::<u64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(0)),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        json_value(),
    ];
    let payload = prop_oneof![
        prop::collection::btree_map(".{0,8}", json_value(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        json_value(),
    ];
    (
        prop::option::of(opcode),
        prop::option::of(context_id),
        prop::option::of(payload),
        prop::collection::btree_map(".{0,8}", json_value(), 0..3),
    )
        .prop_map(|(opcode, context_id, payload, extra)| {
            let mut object: Map<String, Value> = extra.into_iter().collect();
            for (key, value) in [
                ("opcode", opcode),
                ("contextId", context_id),
                ("payload", payload),
            ] {
                if let Some(value) = value {
                    object.insert(key.into(), value);
                }
            }
            Value::Object(object)
        })
}

proptest! {
    #[test]
    fn the_codec_takes_arbitrary_bytes_in_arbitrary_chunks(
        input in prop::collection::vec(any::<u8>(), 0..4096),
        sizes in chunk_sizes(),
    ) {
        check_codec(&input, &sizes);
    }

    /// Headers promising little, so that arbitrary bytes make frames rather than one oversize.
    #[test]
    fn the_codec_takes_short_frames_of_arbitrary_bytes_in_arbitrary_chunks(
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16),
        cut in any::<prop::sample::Index>(),
        sizes in chunk_sizes(),
    ) {
        let mut input = Vec::new();
        for body in &frames {
            input.extend_from_slice(&(body.len() as u32).to_be_bytes());
            input.extend_from_slice(body);
        }
        let whole = check_codec(&input, &sizes);
        prop_assert_eq!(whole.items.len(), frames.len());
        prop_assert!(whole.end.is_ok());
        // And cut anywhere inside the last frame, the stream ends in an error.
        if !input.is_empty() {
            let last = frames.last().map_or(0, |b| HEADER_LEN + b.len());
            let at = input.len() - last + 1 + cut.index(last - 1);
            let cut_short = check_codec(&input[..at], &sizes);
            prop_assert_eq!(cut_short.items.len(), frames.len() - 1);
            prop_assert!(cut_short.end.is_err());
        }
    }

    #[test]
    fn frames_among_oversized_and_garbage_come_out_right_however_split(
        pieces in prop::collection::vec(piece(), 0..8),
        tail in tail(),
        one in chunk_sizes(),
        other in chunk_sizes(),
    ) {
        let (wire, expected, clean) = stream(&pieces, &tail);
        for sizes in [&one, &other] {
            let decoded = decode_in_chunks(&wire, sizes);
            prop_assert_eq!(&decoded.items, &expected);
            prop_assert_eq!(decoded.end.is_ok(), clean, "{:?}", decoded.end);
        }
        for (piece, item) in pieces.iter().zip(&expected) {
            match (piece, item) {
                (Piece::Frame(sent), Inbound::Frame(body)) => {
                    prop_assert_eq!(&Frame::decode(body).expect("a valid frame"), sent);
                }
                (_, Inbound::Frame(body)) => check_frame_body(body),
                _ => {}
            }
        }
    }

    #[test]
    fn the_frame_decoder_takes_arbitrary_bytes(
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check_frame_body(&body);
    }

    /// decode(encode(x)) == x, and the body is exactly as long as its records say.
    #[test]
    fn any_frame_round_trips_and_has_the_size_the_formula_says(frame in any_frame()) {
        let body = frame.encode().expect("small frames encode");
        let expected = match &frame {
            Frame::Hello { record } => 1 + wire_len(record.record.addr.len(), record.record.neighbors.len()),
            Frame::Gossip { records } => 5 + records
                .iter()
                .map(|r| wire_len(r.record.addr.len(), r.record.neighbors.len()))
                .sum::<usize>(),
            Frame::Digest(digest) => 1 + 32 + 1 + 4 + 40 * digest.entries.len(),
        };
        prop_assert_eq!(body.len(), expected);
        prop_assert_eq!(&Frame::decode(&body).expect("own encoding decodes"), &frame);
        check_frame_body(&body);
        if let Frame::Gossip { records } = &frame {
            for record in records {
                let wire = record.to_wire();
                prop_assert_eq!(&SignedRecord::from_wire(&wire).expect("decodes"), record);
            }
        }
    }

    /// A valid frame cut short anywhere is malformed, never a shorter frame.
    #[test]
    fn a_frame_cut_short_anywhere_is_malformed(
        frame in any_frame(),
        at in any::<prop::sample::Index>(),
    ) {
        let body = frame.encode().expect("small frames encode");
        let cut = at.index(body.len());
        prop_assert!(
            matches!(
                WireFrame::decode(&body[..cut]),
                Err(FrameError::Malformed(_) | FrameError::BadDigest(_))
            ),
            "cut at {} of {}", cut, body.len()
        );
    }

    /// A valid frame with a byte flipped, a word overwritten, a byte inserted or removed:
    /// decoded or malformed, never a panic, and what decodes re-encodes to its bytes. (Only
    /// the type byte can make it an unknown type.)
    #[test]
    fn a_mutated_frame_never_panics(
        frame in any_frame(),
        mutations in prop::collection::vec(mutation(), 1..4),
        extra in prop::collection::vec(any::<u8>(), 0..3),
    ) {
        let mut body = frame.encode().expect("small frames encode").to_vec();
        for m in &mutations {
            mutate(&mut body, m);
        }
        check_frame_body(&body);
        if let Err(FrameError::UnknownType(kind)) = WireFrame::decode(&body) {
            prop_assert!(kind != 1 && kind != 2 && kind != 3);
        }
        body.extend_from_slice(&extra);
        check_frame_body(&body);
    }

    #[test]
    fn the_ui_parser_takes_arbitrary_text(text in any::<String>()) {
        check_ui_text(&text);
    }

    #[test]
    fn the_ui_parser_takes_arbitrary_json(value in json_value()) {
        check_ui_text(&value.to_string());
    }

    #[test]
    fn the_ui_parser_takes_requests_with_arbitrary_fields(value in envelope_like()) {
        check_ui_text(&value.to_string());
        check_ui_text(&format!("{value} "));
        check_ui_text(&format!("{value}x"));
        let text = value.to_string();
        let half = (0..=text.len() / 2).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        check_ui_text(&text[..half]);
    }
}

#[test]
fn the_checks_accept_what_should_pass() {
    check_ui_text(r#"{"opcode":"shutdown","contextId":1,"payload":{}}"#);
    check_ui_text(r#"{"opcode":"status","contextId":5}"#);
    let (wire, expected, clean) = stream(
        &[Piece::Oversized(MAX_FRAME_LEN + 1), Piece::Largest],
        &Tail::Clean,
    );
    assert!(clean);
    assert_eq!(decode_in_chunks(&wire, &[7]).items, expected);
}
