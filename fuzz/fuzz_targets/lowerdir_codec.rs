//! Any list of directories survives `join_lowerdirs` then `split_lowerdirs`.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|dirs: Vec<String>| {
    let dirs: Vec<PathBuf> = dirs
        .into_iter()
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    let joined = rustfuse::options::join_lowerdirs(&dirs);
    assert_eq!(rustfuse::options::split_lowerdirs(&joined), dirs);
});
