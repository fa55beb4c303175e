//! The frame codec on arbitrary bytes, split into reads of arbitrary sizes: it never panics,
//! never holds more than a header and the largest frame, decodes the same however the input is
//! split, and every frame body it yields goes through the frame decoder's checks too.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/protocol/tests/checks/mod.rs"]
mod checks;

fuzz_target!(|input: (Vec<u8>, Vec<u16>)| {
    let (bytes, sizes) = input;
    let sizes: Vec<usize> = sizes.into_iter().map(usize::from).collect();
    checks::check_codec(&bytes, &sizes);
});
