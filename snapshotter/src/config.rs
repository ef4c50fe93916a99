//! Default socket and root locations, as root and rootless.

use std::path::PathBuf;

/// Socket and root paths when none are given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub address: PathBuf,
    pub root: PathBuf,
}

/// As root (in the initial user namespace): `/run/rustfuse/rustfuse.sock` and
/// `/var/lib/rustfuse`. Rootless, including root in a user namespace:
/// `$XDG_RUNTIME_DIR/rustfuse/rustfuse.sock` and `$XDG_DATA_HOME/rustfuse` (default
/// `~/.local/share/rustfuse`).
pub fn defaults() -> Defaults {
    let euid = rustix::process::geteuid();
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    // Root inside a user namespace (RootlessKit, `unshare -Ur`) is a rootless user: the
    // system paths are not writable there.
    defaults_for(
        euid.is_root() && !crate::mode::in_user_namespace(),
        env("XDG_RUNTIME_DIR"),
        env("XDG_DATA_HOME"),
        env("HOME"),
        euid.as_raw(),
    )
}

fn defaults_for(
    root: bool,
    runtime_dir: Option<PathBuf>,
    data_home: Option<PathBuf>,
    home: Option<PathBuf>,
    uid: u32,
) -> Defaults {
    if root {
        return Defaults {
            address: "/run/rustfuse/rustfuse.sock".into(),
            root: "/var/lib/rustfuse".into(),
        };
    }
    let runtime = runtime_dir.unwrap_or_else(|| PathBuf::from(format!("/run/user/{uid}")));
    let data = data_home
        .or_else(|| home.map(|h| h.join(".local/share")))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/rustfuse-{uid}")));
    Defaults {
        address: runtime.join("rustfuse/rustfuse.sock"),
        root: data.join("rustfuse"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_defaults() {
        let d = defaults_for(true, Some("/x".into()), None, Some("/root".into()), 0);
        assert_eq!(d.address, PathBuf::from("/run/rustfuse/rustfuse.sock"));
        assert_eq!(d.root, PathBuf::from("/var/lib/rustfuse"));
    }

    #[test]
    fn rootless_defaults() {
        let d = defaults_for(
            false,
            Some("/run/user/1000".into()),
            None,
            Some("/home/u".into()),
            1000,
        );
        assert_eq!(
            d.address,
            PathBuf::from("/run/user/1000/rustfuse/rustfuse.sock")
        );
        assert_eq!(d.root, PathBuf::from("/home/u/.local/share/rustfuse"));
        let d = defaults_for(false, None, Some("/d".into()), None, 1000);
        assert_eq!(
            d.address,
            PathBuf::from("/run/user/1000/rustfuse/rustfuse.sock")
        );
        assert_eq!(d.root, PathBuf::from("/d/rustfuse"));
    }
}
