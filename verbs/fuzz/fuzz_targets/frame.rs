//! Fuzzes the soft backend's frame decoding: any byte stream is either a
//! sequence of valid frames or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_verbs::frame::walk(data);
});
