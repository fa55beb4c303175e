//! The rules the frame codec, the frame decoder and the UI envelope parser must keep on any
//! input, shared by the property tests (`fuzz_props.rs`) and the cargo-fuzz targets (`fuzz/` at
//! the workspace root) so that both hold them to the same rules. A broken rule panics.
#![allow(dead_code)] // each user calls only some of these

use bytes::BytesMut;
use meshnode_protocol::ui::{UiMessage, codes, parse_request};
use meshnode_protocol::{Frame, FrameCodec, Inbound, MAX_FRAME_LEN, WireFrame, gossip_records};
use serde_json::Value;
use tokio_util::codec::Decoder;

/// The frame header's length.
pub const HEADER_LEN: usize = 4;

/// What decoding a whole stream gave: every item, then how the stream's end went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub items: Vec<Inbound>,
    /// `Err` when the stream ended inside a frame.
    pub end: Result<(), String>,
}

/// Feeds `input` to a fresh codec in chunks of the given sizes (cycled; a size of 0 counts as
/// 1), decoding after each chunk as a reader would, then ends the stream. Checks that the
/// codec never holds more than a header and a frame of the largest size, and never yields a
/// frame over the limit.
pub fn decode_in_chunks(input: &[u8], sizes: &[usize]) -> Decoded {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut rest = input;
    let mut size = sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let n = size.next().unwrap_or(usize::MAX).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(item)) => items.push(checked(item)),
                Ok(None) => break,
                Err(e) => panic!("decode fails only at the end of a stream: {e}"),
            }
        }
        assert!(
            buf.len() < HEADER_LEN + MAX_FRAME_LEN,
            "the codec holds {} bytes waiting for more",
            buf.len()
        );
    }
    let end = loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(item)) => items.push(checked(item)),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.kind().to_string()),
        }
    };
    Decoded { items, end }
}

fn checked(item: Inbound) -> Inbound {
    match &item {
        Inbound::Frame(body) => assert!(body.len() <= MAX_FRAME_LEN, "{} bytes", body.len()),
        Inbound::Oversized { len } => assert!(*len > MAX_FRAME_LEN, "{len} bytes is no oversize"),
    }
    item
}

/// Decodes `input` whole, in chunks of `sizes` and (when short) byte by byte: the same items
/// and the same end every way, and every frame body passes [`check_frame_body`].
pub fn check_codec(input: &[u8], sizes: &[usize]) -> Decoded {
    let whole = decode_in_chunks(input, &[]);
    let split = decode_in_chunks(input, sizes);
    assert_eq!(whole, split, "decoding depends on how the input was split");
    if input.len() <= 64 * 1024 {
        let bytewise = decode_in_chunks(input, &[1]);
        assert_eq!(
            whole, bytewise,
            "decoding depends on how the input was split"
        );
    }
    for item in &whole.items {
        if let Inbound::Frame(body) = item {
            check_frame_body(body);
        }
    }
    whole
}

/// A frame body decodes or is malformed, without panicking; one that decodes encodes again
/// to exactly the same bytes (every field has one encoding), and each of its records keeps
/// exactly its own bytes. The light reader (`gossip_records`, which reads only the records'
/// heads) never panics either, and on a gossip frame that decodes finds exactly its records.
pub fn check_frame_body(body: &[u8]) {
    let light = gossip_records(body);
    let Ok(wire) = WireFrame::decode(body) else {
        return;
    };
    if let WireFrame::Gossip(records) = &wire {
        let light = light.expect("the light reader reads what the decoder reads");
        assert_eq!(light.len(), records.len());
        for ((id, bytes), record) in light.iter().zip(records) {
            assert_eq!(*id, record.id());
            assert_eq!(*bytes, &record.wire()[..]);
        }
    }
    let records = match &wire {
        WireFrame::Hello(record) => std::slice::from_ref(record),
        WireFrame::Gossip(records) => records.as_slice(),
        WireFrame::Digest(_) => &[],
    };
    for record in records {
        assert_eq!(
            &record.signed().to_wire(),
            record.wire(),
            "a record's own bytes"
        );
    }
    let frame = Frame::from(wire);
    let again = frame.encode().expect("a frame that fit once fits again");
    assert_eq!(
        &again[..],
        body,
        "a frame that decodes re-encodes to its bytes"
    );
}

/// A UI client's text is a request, or gets an error response in the MASQ envelope: the
/// request's opcode (`unmarshalError` when it has none), its `contextId` whenever it had an
/// unsigned one, an `error` with the unmarshal code and a message, and no payload.
pub fn check_ui_text(text: &str) {
    let value: Option<Value> = serde_json::from_str(text).ok();
    let object = value.as_ref().and_then(Value::as_object);
    let field = |name: &str| object.and_then(|o| o.get(name));
    let context_id = field("contextId").and_then(Value::as_u64);
    let opcode = field("opcode").and_then(Value::as_str);
    match parse_request(text) {
        Ok(request) => {
            assert_eq!(Some(request.opcode.as_str()), opcode);
            assert_eq!(Some(request.context_id), context_id);
            assert_eq!(
                field("payload"),
                Some(&Value::Object(request.payload.clone()))
            );
        }
        Err(response) => {
            assert_eq!(response.opcode, opcode.unwrap_or("unmarshalError"));
            assert_eq!(response.context_id, context_id, "the contextId is kept");
            assert_eq!(response.payload, None);
            let error = response
                .error
                .as_ref()
                .expect("an error response has an error");
            assert_eq!(error.code, codes::UNMARSHAL_ERROR);
            assert!(!error.message.is_empty());
            check_envelope(&response);
        }
    }
}

/// A response as it goes on the wire: a JSON object of exactly `opcode`, `contextId` (when
/// it has one) and `error` {`code`, `message`}, that reads back as the same message.
pub fn check_envelope(response: &UiMessage) {
    let json = response.to_json();
    let wire: Value = serde_json::from_str(&json).expect("a response is JSON");
    let object = wire.as_object().expect("a response is a JSON object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let expected: &[&str] = if response.context_id.is_some() {
        &["contextId", "error", "opcode"]
    } else {
        &["error", "opcode"]
    };
    assert_eq!(keys, expected, "{json}");
    let error = object["error"].as_object().expect("error is an object");
    assert!(
        error["code"].is_u64() && error["message"].is_string(),
        "{json}"
    );
    assert_eq!(error.len(), 2, "{json}");
    let back: UiMessage = serde_json::from_str(&json).expect("a response reads back");
    assert_eq!(&back, response);
}
