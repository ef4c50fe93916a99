//! The `-o` option parser never panics, and what it accepts is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parts: Vec<&str> = s.split('\n').collect();
    if let Ok(o) = rustfuse::options::parse(&parts) {
        assert!(!o.lowerdirs.is_empty(), "accepted without a lowerdir");
        assert_eq!(
            o.upperdir.is_some(),
            o.workdir.is_some(),
            "upperdir without workdir"
        );
        assert!(!(o.squash_to_root && o.squash_to_uid.is_some()));
    }
});
