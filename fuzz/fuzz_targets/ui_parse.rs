//! The UI envelope parser on arbitrary text: a request, or an error response in the MASQ
//! envelope that keeps whatever opcode and contextId could be read.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/protocol/tests/checks/mod.rs"]
mod checks;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        checks::check_ui_text(text);
    }
});
