//! Directory redirects in snapshot layers: which layers hold them, and so whether kernel
//! overlayfs can mount them.
//!
//! In FUSE mode rustfuse mounts with `redirect_dir=on`, so a rename of a directory with
//! parent-layer content marks the new name with `trusted.overlay.redirect` (rootless:
//! `user.overlay.redirect`) instead of copying the tree. Kernel overlayfs reads such a layer
//! right only when it follows redirects (`redirect_dir=follow`). Commit counts the redirected
//! directories of a layer while it walks it for disk usage (one listxattr per directory) and
//! the store keeps the count; an Active snapshot prepared in FUSE mode is walked at start-up
//! when the mode is to be overlay. Where the kernel cannot follow (it refuses
//! `redirect_dir=follow` with `userxattr`, i.e. in a user namespace), the snapshots named here
//! keep the snapshotter in FUSE mode.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};
use crate::info::Kind;
use crate::store::Store;

/// The xattrs that mark a redirected directory, as kernel overlayfs and rustfuse write them
/// (the mount program's own list).
pub use rustfuse::overlay::REDIRECT_XATTRS;

/// Whether `dir` carries a redirect xattr (one listxattr; symlinks not followed). A
/// directory whose xattrs cannot be listed (gone, or no xattr support) carries none.
pub fn is_redirected(dir: &Path) -> bool {
    let mut buf = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(dir, &mut buf[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => match rustix::fs::llistxattr_query(dir) {
                Ok(want) => buf.resize(want.max(buf.len() * 2), 0),
                Err(_) => return false,
            },
            Err(_) => return false,
        }
    };
    buf[..n]
        .split(|b| *b == 0)
        .any(|name| REDIRECT_XATTRS.iter().any(|x| x.as_bytes() == name))
}

/// Whether any directory of the tree at `root` (root included) is redirected; stops at the
/// first. Symlinks are not followed; entries that vanish while walking are skipped.
pub fn tree_has_redirects(root: &Path) -> Result<bool> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if is_redirected(&dir) {
            return Ok(true);
        }
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
            Err(e) => return Err(Error::io("read directory", &dir, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("read directory", &dir, e))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    Ok(false)
}

/// A snapshot whose own layer holds directory redirects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub key: String,
    /// Redirected directories counted at Commit; `None` for an Active snapshot found by a
    /// walk (which stops at the first).
    pub count: Option<i64>,
}

/// The snapshots whose layers hold directory redirects, in key order: Committed ones by the
/// count their Commit stored, and with `walk_active` the Active snapshots prepared in FUSE
/// mode, by walking their upper directories under `snapshots` (their ids' `fs/`).
pub fn holders(store: &Store, snapshots: &Path, walk_active: bool) -> Result<Vec<Holder>> {
    let mut out = Vec::new();
    for (key, rec) in store.list()? {
        match rec.kind(&key)? {
            Kind::Committed if rec.redirect_dirs > 0 => out.push(Holder {
                key,
                count: Some(rec.redirect_dirs),
            }),
            Kind::Active if walk_active && rec.fuse_upper => {
                let fs = crate::mounts::snapshot_dir(snapshots, rec.id).join("fs");
                if tree_has_redirects(&fs)? {
                    out.push(Holder { key, count: None });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// How many keys [`describe`] names before it says how many more there are.
const NAMED: usize = 10;

/// `"a" (2 redirected directories), "b" (active) and 3 more`: the holders for a message.
pub fn describe(holders: &[Holder]) -> String {
    let mut s = String::new();
    for (i, h) in holders.iter().take(NAMED).enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{:?}", h.key);
        match h.count {
            Some(1) => s.push_str(" (1 redirected directory)"),
            Some(n) => {
                let _ = write!(s, " ({n} redirected directories)");
            }
            None => s.push_str(" (active, prepared in FUSE mode)"),
        }
    }
    if holders.len() > NAMED {
        let _ = write!(s, " and {} more", holders.len() - NAMED);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_keys_and_counts() {
        let h = |key: &str, count| Holder {
            key: key.into(),
            count,
        };
        assert_eq!(
            describe(&[h("a", Some(1)), h("ns/1/b c", Some(3)), h("x", None)]),
            "\"a\" (1 redirected directory), \"ns/1/b c\" (3 redirected directories), \"x\" (active, prepared in FUSE mode)"
        );
        let many: Vec<Holder> = (0..12).map(|i| h(&format!("k{i}"), Some(1))).collect();
        let d = describe(&many);
        assert!(
            d.ends_with("\"k9\" (1 redirected directory) and 2 more"),
            "{d}"
        );
        assert!(!d.contains("k10"), "{d}");
    }

    /// `user.overlay.redirect` can be set without privilege where the filesystem takes user
    /// xattrs (tmpfs since 6.6, ext4, xfs, btrfs); elsewhere the case says SKIPPED.
    #[test]
    fn finds_a_redirected_directory_deep_in_a_tree() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(d.path().join("a/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/", d.path().join("a/link")).unwrap();
        assert!(!tree_has_redirects(d.path()).unwrap());
        if let Err(e) = rustix::fs::setxattr(
            &deep,
            "user.overlay.redirect",
            b"/old",
            rustix::fs::XattrFlags::empty(),
        ) {
            println!("SKIPPED: user xattrs cannot be set here: {e}");
            return;
        }
        std::fs::write(d.path().join("a/b/g"), b"y").unwrap();
        assert!(is_redirected(&deep));
        assert!(!is_redirected(&d.path().join("a")));
        assert!(!is_redirected(&d.path().join("a/f")));
        assert!(tree_has_redirects(d.path()).unwrap());
        let other = d.path().join("a/other");
        std::fs::create_dir(&other).unwrap();
        rustix::fs::setxattr(
            &other,
            "user.overlay.other",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        assert!(!is_redirected(&other), "another xattr is no redirect");
    }
}
