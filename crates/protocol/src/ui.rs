//! The MASQ Node UI protocol envelope, as meshnode speaks it over its websocket, and the
//! payloads of the opcodes meshnode answers.
//!
//! A conversation message carries `contextId`; a response reuses the request's opcode and
//! context id and carries either `payload` (a JSON object) or `error` (an unsigned 64-bit code
//! and a message). A broadcast has no `contextId`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The websocket subprotocol every client must offer.
pub const UI_SUBPROTOCOL: &str = "MASQNode-UIv2";
/// MASQ's default UI port.
pub const DEFAULT_UI_PORT: u16 = 5333;
/// Longest UI message accepted, in bytes.
pub const MAX_UI_MESSAGE_LEN: usize = 64 * 1024;

/// Error codes. Those MASQ defines keep MASQ's numbers; meshnode's own sit above them.
pub mod codes {
    const PREFIX: u64 = 0x8000_0000_0000_0000;
    /// MASQ: the node cannot serve the request (it is shutting down or stopped).
    pub const NODE_NOT_RUNNING: u64 = PREFIX | 2;
    /// MASQ: the message is not valid JSON, lacks `opcode`, `contextId` or an object `payload`.
    pub const UNMARSHAL_ERROR: u64 = PREFIX | 4;
    /// MASQ: the node did not finish in time.
    pub const TIMEOUT: u64 = PREFIX | 6;
    /// meshnode: the opcode is not one meshnode answers.
    pub const UNKNOWN_OPCODE: u64 = PREFIX | 0x1_0001;
    /// meshnode: the message exceeds `MAX_UI_MESSAGE_LEN` or is not a text frame.
    pub const BAD_FRAME: u64 = PREFIX | 0x1_0002;
    /// meshnode: the node failed inside while answering.
    pub const INTERNAL: u64 = PREFIX | 0x1_0003;
    /// meshnode: the UI wants a token (`Authorization: Bearer TOKEN`) and the request had none
    /// or a wrong one; sent as the body of an HTTP 401.
    pub const UNAUTHORIZED: u64 = PREFIX | 0x1_0004;
    /// meshnode: the request's `Host` is not an IP address, `localhost` or an allowed name (a
    /// page on a rebound domain, say); sent as the body of an HTTP 403.
    pub const HOST_NOT_ALLOWED: u64 = PREFIX | 0x1_0005;
    /// meshnode: the request comes from a web page of another origin than the UI's own or an
    /// allowed one; sent as the body of an HTTP 403.
    pub const ORIGIN_NOT_ALLOWED: u64 = PREFIX | 0x1_0006;
}

/// One UI message in the MASQ envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UiMessage {
    pub opcode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<UiError>,
}

/// The `error` member of a response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UiError {
    pub code: u64,
    pub message: String,
}

/// A well-formed request: opcode, context id and an object payload.
#[derive(Debug, Clone, PartialEq)]
pub struct UiRequest {
    pub opcode: String,
    pub context_id: u64,
    pub payload: Map<String, Value>,
}

impl UiMessage {
    pub fn response(opcode: &str, context_id: u64, payload: impl Serialize) -> Self {
        let payload = serde_json::to_value(payload).unwrap_or_else(|_| Value::Object(Map::new()));
        Self {
            opcode: opcode.into(),
            context_id: Some(context_id),
            payload: Some(payload),
            error: None,
        }
    }

    pub fn error(
        opcode: &str,
        context_id: Option<u64>,
        code: u64,
        message: impl Into<String>,
    ) -> Self {
        Self {
            opcode: opcode.into(),
            context_id,
            payload: None,
            error: Some(UiError {
                code,
                message: message.into(),
            }),
        }
    }

    pub fn broadcast(opcode: &str, payload: impl Serialize) -> Self {
        let payload = serde_json::to_value(payload).unwrap_or_else(|_| Value::Object(Map::new()));
        Self {
            opcode: opcode.into(),
            context_id: None,
            payload: Some(payload),
            error: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// The payload deserialized as `T`, or the error the message carries.
    pub fn into_payload<T: serde::de::DeserializeOwned>(self) -> Result<T, UiError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let payload = self.payload.unwrap_or(Value::Null);
        serde_json::from_value(payload).map_err(|e| UiError {
            code: codes::UNMARSHAL_ERROR,
            message: format!("unexpected {} payload: {e}", self.opcode),
        })
    }
}

/// Parses a client's text into a request, or into the error response it deserves.
pub fn parse_request(text: &str) -> Result<UiRequest, UiMessage> {
    const UNPARSEABLE: &str = "unmarshalError";
    let value: Value = serde_json::from_str(text).map_err(|e| {
        UiMessage::error(
            UNPARSEABLE,
            None,
            codes::UNMARSHAL_ERROR,
            format!("not JSON: {e}"),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(UiMessage::error(
            UNPARSEABLE,
            None,
            codes::UNMARSHAL_ERROR,
            "message must be a JSON object",
        ));
    };
    let context_id = obj.get("contextId").and_then(Value::as_u64);
    let Some(opcode) = obj.get("opcode").and_then(Value::as_str).map(str::to_owned) else {
        return Err(UiMessage::error(
            UNPARSEABLE,
            context_id,
            codes::UNMARSHAL_ERROR,
            "message has no string opcode",
        ));
    };
    let bad = |msg: &str| UiMessage::error(&opcode, context_id, codes::UNMARSHAL_ERROR, msg);
    let Some(context_id) = context_id else {
        return Err(bad("request has no unsigned integer contextId"));
    };
    match obj.remove("payload") {
        Some(Value::Object(payload)) => Ok(UiRequest {
            opcode,
            context_id,
            payload,
        }),
        Some(_) => Err(bad("payload must be a JSON object")),
        None => Err(bad("request has no payload")),
    }
}

/// The first eight hex digits of a node id as written in payloads, for people and logs.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// What a node is doing, as `state` in the status payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeState {
    Running,
    ShuttingDown,
}

/// The payload of the `status` opcode and of `GET /status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusPayload {
    pub node_id: String,
    /// The address neighbors connect to, as bound.
    pub listen: String,
    /// The UI address, as bound.
    pub ui: String,
    pub state: NodeState,
    /// The version of the node's own signed record.
    pub version: u64,
    /// meshnode's software version.
    pub software_version: String,
    /// The node's half-neighborships.
    pub neighbors: Vec<NeighborStatus>,
    /// Every record in the node's database, its own included.
    pub known_nodes: Vec<KnownNode>,
    pub stats: Stats,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NeighborStatus {
    pub node_id: String,
    pub addr: String,
    /// True when the neighbor's record lists this node back.
    pub full: bool,
    /// The stream the node holds to this neighbor, and which side opened it; `null` while
    /// there is none (the neighbor is listed, its stream not yet or no longer open).
    #[serde(default)]
    pub stream: Option<StreamDirection>,
}

/// Which side opened the stream to a neighbor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StreamDirection {
    /// This node dialed the neighbor.
    Dialed,
    /// The neighbor dialed this node.
    Accepted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KnownNode {
    pub node_id: String,
    pub addr: String,
    pub version: u64,
    pub neighbors: Vec<String>,
}

/// How far the node reaches into the network, as MASQ's `connectionStatus` and
/// `connectionChange` name it. Serialized as MASQ spells it: `"NotConnected"`,
/// `"ConnectedToNeighbor"`, `"RouteFound"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConnectionStage {
    /// No full neighborship: no neighbor lists this node back.
    #[default]
    NotConnected,
    /// At least one full neighbor, but no node three or more hops away.
    ConnectedToNeighbor,
    /// Some node is three or more hops away over full neighborships.
    RouteFound,
}

impl ConnectionStage {
    /// The stage as MASQ spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotConnected => "NotConnected",
            Self::ConnectedToNeighbor => "ConnectedToNeighbor",
            Self::RouteFound => "RouteFound",
        }
    }
}

/// The payload of the `connectionStatus` response and of the `connectionChange` broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatusPayload {
    pub stage: ConnectionStage,
}

/// The payload of the `descriptor` response: the node's descriptor, or `null` while it has
/// none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DescriptorPayload {
    pub node_descriptor_opt: Option<String>,
}

/// Counters since start. Gossip counters are the neighborhood's; frame and stream counters
/// are the stream handler pool's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub gossip_frames_sent: u64,
    /// Bytes of the gossip frames' bodies queued to neighbors (the length prefix excluded).
    #[serde(default)]
    pub gossip_bytes_sent: u64,
    pub gossip_frames_received: u64,
    /// Records that changed the database.
    pub records_accepted: u64,
    /// Records no newer than the stored one (replays, echoes).
    pub records_stale: u64,
    /// Gossip frames that changed nothing (every record in them stale): a neighbor that
    /// sends little else is disconnected for flooding.
    pub gossip_frames_useless: u64,
    /// Records with a bad signature or shape.
    pub records_rejected: u64,
    /// Times gossip for a neighbor was held back, to be coalesced and sent when its send
    /// queue drains, because the queue was busy.
    pub gossip_deferred: u64,
    /// Frames that were not valid JSON of a known type, or arrived out of turn.
    pub frames_malformed: u64,
    /// Frames over the size limit.
    pub frames_oversized: u64,
    /// Neighbors disconnected for sending too much garbage or flooding useless gossip.
    pub peers_disconnected_for_abuse: u64,
    pub streams_open: u64,
    pub streams_accepted: u64,
    pub streams_dialed: u64,
    /// New streams refused at once because the node was at its limit of handshakes in progress
    /// or of streams (derived from its file-descriptor limit).
    #[serde(default)]
    pub streams_refused: u64,
    /// Handshakes refused for what the peer claimed: a proof that does not verify, this node's
    /// own id, no common protocol version, or a first record that is not the peer's.
    #[serde(default)]
    pub handshakes_refused: u64,
    /// Handshakes that did not finish: timed out, cut off, or not the link protocol at all.
    #[serde(default)]
    pub handshakes_failed: u64,
    /// Frames of a type this node does not know, from a neighbor that speaks a newer version:
    /// skipped, not held against it.
    #[serde(default)]
    pub frames_unknown: u64,
    /// Neighbors dropped for silence longer than the neighbor timeout, as if they had crashed.
    #[serde(default)]
    pub peers_timed_out: u64,
    /// Digests sent to neighbors (anti-entropy): not gossip, not in the gossip counters.
    #[serde(default)]
    pub digests_sent: u64,
    /// Bytes of those digests' bodies.
    #[serde(default)]
    pub digest_bytes_sent: u64,
    /// Digests received from neighbors.
    #[serde(default)]
    pub digests_received: u64,
    /// Records sent in answer to neighbors' digests, because they lacked them or held an older
    /// version (their frames are counted as gossip).
    #[serde(default)]
    pub records_repaired: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masq_shutdown_request_parses() {
        let req = parse_request(r#"{"opcode": "shutdown", "contextId": 1, "payload": {}}"#)
            .expect("well formed");
        assert_eq!((req.opcode.as_str(), req.context_id), ("shutdown", 1));
    }

    #[test]
    fn responses_and_broadcasts_have_the_masq_shape() {
        let resp = UiMessage::response("shutdown", 1, serde_json::json!({}));
        assert_eq!(
            resp.to_json(),
            r#"{"opcode":"shutdown","contextId":1,"payload":{}}"#
        );
        let b = UiMessage::broadcast("x", serde_json::json!({"a": 1}));
        assert_eq!(b.to_json(), r#"{"opcode":"x","payload":{"a":1}}"#);
    }

    #[test]
    fn descriptor_and_connection_payloads_have_the_masq_shape() {
        let some = DescriptorPayload {
            node_descriptor_opt: Some("meshnode://ab@1.2.3.4:5".into()),
        };
        let json = UiMessage::response("descriptor", 3, some).to_json();
        assert_eq!(
            json,
            r#"{"opcode":"descriptor","contextId":3,"payload":{"nodeDescriptorOpt":"meshnode://ab@1.2.3.4:5"}}"#
        );
        let none = DescriptorPayload {
            node_descriptor_opt: None,
        };
        let json = UiMessage::response("descriptor", 4, none).to_json();
        assert_eq!(
            json,
            r#"{"opcode":"descriptor","contextId":4,"payload":{"nodeDescriptorOpt":null}}"#
        );
        for stage in [
            ConnectionStage::NotConnected,
            ConnectionStage::ConnectedToNeighbor,
            ConnectionStage::RouteFound,
        ] {
            let json = UiMessage::broadcast("connectionChange", ConnectionStatusPayload { stage })
                .to_json();
            let want = format!(
                r#"{{"opcode":"connectionChange","payload":{{"stage":"{}"}}}}"#,
                stage.as_str()
            );
            assert_eq!(json, want);
        }
    }

    #[test]
    fn error_codes_above_i64_max_survive_a_round_trip() {
        let err = UiMessage::error("shutdown", Some(1), codes::NODE_NOT_RUNNING, "no");
        let json = err.to_json();
        assert!(json.contains("9223372036854775810"), "{json}");
        let back: UiMessage = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.error.expect("error").code, 0x8000_0000_0000_0002);
    }

    #[test]
    fn bad_requests_get_unmarshal_errors_that_keep_what_could_be_read() {
        let cases = [
            ("{", None, "unmarshalError"),
            ("[1]", None, "unmarshalError"),
            (r#"{"contextId": 4}"#, Some(4), "unmarshalError"),
            (r#"{"opcode": "status", "payload": {}}"#, None, "status"),
            (r#"{"opcode": "status", "contextId": 5}"#, Some(5), "status"),
            (
                r#"{"opcode": "status", "contextId": 6, "payload": []}"#,
                Some(6),
                "status",
            ),
        ];
        for (text, context_id, opcode) in cases {
            let err = parse_request(text).expect_err(text);
            assert_eq!(err.opcode, opcode, "{text}");
            assert_eq!(err.context_id, context_id, "{text}");
            assert_eq!(err.error.expect("error").code, codes::UNMARSHAL_ERROR);
        }
    }
}
