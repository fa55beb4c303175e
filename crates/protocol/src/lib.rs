//! meshnode's wire formats, free of any runtime: node identities and signed records
//! ([`record`]), the frames neighbors exchange and their codec ([`frame`]), and the MASQ Node UI
//! envelope with the status payload ([`ui`]).
#![forbid(unsafe_code)]

pub mod frame;
pub mod record;
pub mod ui;

pub use frame::{
    Frame, FrameCodec, FrameError, Inbound, MAX_FRAME_LEN, PROTOCOL_VERSION, frame_header,
};
pub use record::{
    Identity, NodeId, NodeRecord, RecordError, SignedRecord, VerifiedRecord, VerifyCache,
};
