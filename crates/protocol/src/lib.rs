//! meshnode's wire formats, free of any runtime: node identities and signed records
//! ([`record`]), the binary frames neighbors exchange and their codec ([`frame`]), and the MASQ Node UI
//! envelope with the status payload ([`ui`]).
#![forbid(unsafe_code)]

pub mod digest;
pub mod frame;
pub mod record;
pub mod ui;

pub use digest::{Digest, DigestError, MAX_DIGEST_ENTRIES};
pub use frame::{
    Frame, FrameCodec, FrameError, Inbound, MAX_FRAME_LEN, PROTOCOL_VERSION, WireFrame,
    frame_header, gossip_records,
};
pub use record::{
    Identity, NodeId, NodeRecord, RECORD_FIXED_LEN, RecordError, SignedRecord, VerifiedRecord,
    VerifyCache, WireError, WireRecord, wire_len,
};
