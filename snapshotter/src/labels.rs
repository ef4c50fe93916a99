//! Label rules shared with containerd: each key plus value at most 4096 bytes.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// Upper bound on `len(key) + len(value)` of one label, as containerd enforces.
pub const MAX_LABEL_SIZE: usize = 4096;

/// The chain id containerd attaches to an unpack Prepare (remote-snapshot protocol).
pub const TARGET_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Id mapping labels, passed to FUSE mounts as `uidmapping=`/`gidmapping=`.
pub const UID_MAPPING: &str = "containerd.io/snapshot/uidmapping";
pub const GID_MAPPING: &str = "containerd.io/snapshot/gidmapping";

/// Check every label; the error names `key` (the snapshot) and the offending label.
pub fn validate(key: &str, labels: &HashMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        validate_one(key, k, v)?;
    }
    Ok(())
}

fn validate_one(key: &str, k: &str, v: &str) -> Result<()> {
    let size = k.len() + v.len();
    if size > MAX_LABEL_SIZE {
        return Err(Error::InvalidArgument(format!(
            "snapshot {key:?}: label {k:?} is {size} bytes, over the {MAX_LABEL_SIZE}-byte limit"
        )));
    }
    Ok(())
}

/// A mapping label value `0:1000:65536,1:...` in the form FUSE overlays take (`:` only).
pub fn mapping_option(value: &str) -> String {
    value.replace(',', ":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn exactly_4096_bytes_is_fine() {
        let v = "x".repeat(MAX_LABEL_SIZE - 3);
        assert!(validate("k", &map(&[("abc", &v)])).is_ok());
    }

    #[test]
    fn over_4096_bytes_is_invalid_and_named() {
        let v = "x".repeat(MAX_LABEL_SIZE - 2);
        let err = validate("my key", &map(&[("abc", &v)])).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        let msg = err.to_string();
        assert!(msg.contains("my key") && msg.contains("abc"), "{msg}");
    }

    #[test]
    fn long_key_counts_too() {
        let k = "k".repeat(MAX_LABEL_SIZE + 1);
        assert!(validate("s", &map(&[(&k, "")])).is_err());
    }

    #[test]
    fn mapping_commas_become_colons() {
        assert_eq!(
            mapping_option("0:1000:1,1:100000:65536"),
            "0:1000:1:1:100000:65536"
        );
    }
}
