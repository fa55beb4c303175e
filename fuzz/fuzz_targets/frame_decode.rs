//! A frame body of arbitrary bytes decodes or is malformed, never panics, and one that decodes
//! encodes again to exactly its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/protocol/tests/checks/mod.rs"]
mod checks;

fuzz_target!(|body: &[u8]| checks::check_frame_body(body));
