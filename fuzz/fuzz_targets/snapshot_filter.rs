//! containerd's filter language: the parser never panics on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = rustfuse_snapshotter::filter::parse(s);
        let parts: Vec<&str> = s.split('\n').collect();
        let _ = rustfuse_snapshotter::filter::parse_all(&parts);
    }
});
