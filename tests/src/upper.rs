//! A normalized description of an upper directory, so the layer written by kernel overlayfs,
//! fuse-overlayfs and rustfuse can be compared.
//!
//! What is compared, per path:
//! - type; a whiteout is `Whiteout` whether written as a char device 0/0 or as a `.wh.NAME` file;
//! - for directories, whether they are opaque (`trusted.overlay.opaque=y`,
//!   `user.overlay.opaque=y`, `user.fuseoverlayfs.opaque=y` or a `.wh..wh..opq` file inside);
//! - mode, owner, content, symlink target, device numbers, modification time when old (see
//!   [`crate::snapshot::RECENT`]); owner and mode come from an override_stat xattr when present;
//! - extended attributes other than the internal ones.
//!
//! Ignored: `trusted.overlay.*` other than `opaque` (kernel's origin, impure, nlink...),
//! `user.fuseoverlayfs.*` other than `opaque` (fuse-overlayfs' origin), `user.overlay.*`,
//! `security.*`, the override_stat xattrs themselves; directory sizes, times and link counts;
//! the mode and owner of whiteouts.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::snapshot::{RECENT, show_bytes};

/// The normalized type of an upper entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UKind {
    /// Regular file with this content description.
    File(String),
    /// Directory (opaque or not).
    Dir {
        /// Marked opaque.
        opaque: bool,
    },
    /// Symlink to this target.
    Symlink(String),
    /// A whiteout (either format).
    Whiteout,
    /// Named pipe.
    Fifo,
    /// Socket.
    Socket,
    /// Character device other than 0/0.
    CharDev(u32, u32),
    /// Block device.
    BlockDev(u32, u32),
}

/// One normalized upper entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UEntry {
    /// Type.
    pub kind: UKind,
    /// Permission bits, owner (None for whiteouts).
    pub attrs: Option<(u32, u32, u32)>,
    /// Old modification time, for non-directories.
    pub mtime: Option<i64>,
    /// Non-internal xattrs.
    pub xattrs: BTreeMap<String, String>,
    /// Which whiteout / opaque format was used (informational, not compared by `==`
    /// helpers that call [`UEntry::same_as`]).
    pub format: String,
}

impl UEntry {
    /// Equality ignoring the on-disk format details recorded in `format`.
    pub fn same_as(&self, o: &UEntry) -> bool {
        self.kind == o.kind
            && self.attrs == o.attrs
            && self.mtime == o.mtime
            && self.xattrs == o.xattrs
    }
}

impl fmt::Display for UEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind)?;
        if let Some((m, u, g)) = self.attrs {
            write!(f, " {m:04o} {u}:{g}")?;
        }
        if let Some(t) = self.mtime {
            write!(f, " mtime={t}")?;
        }
        if !self.xattrs.is_empty() {
            write!(f, " xattrs={:?}", self.xattrs)?;
        }
        if !self.format.is_empty() {
            write!(f, " [{}]", self.format)?;
        }
        Ok(())
    }
}

/// The normalized upper directory: relative path (`""` = root) → entry.
pub type Upper = BTreeMap<String, UEntry>;

/// The xattrs that mark a directory opaque (value `y`).
pub const OPAQUE_XATTRS: [&str; 3] = [
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];
/// The owner/mode override xattrs (`uid:gid:octalmode[:type]`).
pub const OVERRIDE_XATTRS: [&str; 3] = [
    "user.containers.override_stat",
    "user.fuseoverlayfs.override_stat",
    "security.fuseoverlayfs.override_stat",
];

fn is_internal(name: &str) -> bool {
    name.starts_with("trusted.overlay.")
        || name.starts_with("user.overlay.")
        || name.starts_with("user.fuseoverlayfs.")
        || name.starts_with("security.")
        || name.starts_with("user.containers.override_")
}

/// All extended attributes of `path` (not following symlinks), raw values.
pub fn raw_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(path, &mut names[..]) else {
        return out;
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut val = vec![0u8; 65536];
        if let Ok(n) = rustix::fs::lgetxattr(path, name.as_str(), &mut val[..]) {
            out.insert(name, val[..n].to_vec());
        }
    }
    out
}

/// Parses an override_stat value `uid:gid:octalmode[:type]`.
pub fn parse_override(v: &[u8]) -> Option<(u32, u32, u32, Option<String>)> {
    let s = std::str::from_utf8(v).ok()?;
    let mut it = s.trim_end_matches('\0').split(':');
    let uid = it.next()?.parse().ok()?;
    let gid = it.next()?.parse().ok()?;
    let mode = u32::from_str_radix(it.next()?, 8).ok()?;
    let ty = it.next().map(str::to_string);
    Some((uid, gid, mode, ty))
}

/// Describes the upper directory `upper` (see the module docs for what is normalized).
///
/// `lowers` are the lower layers: a directory's opaque flag only matters (and is only
/// reported) when some lower layer has a directory at the same path; fuse-overlayfs marks every
/// new directory opaque, the kernel only those that replace a deleted one.
pub fn describe_upper(upper: &Path, lowers: &[std::path::PathBuf]) -> Upper {
    let mut out = Upper::new();
    describe_dir(upper, "", &mut out);
    for (path, e) in out.iter_mut() {
        if let UKind::Dir { opaque } = &mut e.kind {
            let in_lower = lowers.iter().any(|l| l.join(path).is_dir());
            if *opaque && !in_lower {
                *opaque = false;
                e.format.push_str(" (opaque marker ignored: no lower dir)");
            }
        }
    }
    out
}

fn describe_dir(root: &Path, rel: &str, out: &mut Upper) {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let join = |name: &str| {
        if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        }
    };
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut subdirs = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let Ok(md) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let ft = md.file_type();
        if name == ".wh..wh..opq" {
            if let Some(d) = out.get_mut(rel) {
                if let UKind::Dir { opaque } = &mut d.kind {
                    *opaque = true;
                }
                d.format.push_str(" opq-file");
            }
            continue;
        }
        if name == ".wh..opq" {
            // fuse-overlayfs writes this whiteout next to `.wh..wh..opq`; it hides a name
            // that cannot exist (names starting `.wh.` are refused), so it means nothing.
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            out.insert(
                join(hidden),
                UEntry {
                    kind: UKind::Whiteout,
                    attrs: None,
                    mtime: None,
                    xattrs: BTreeMap::new(),
                    format: "wh-file".into(),
                },
            );
            continue;
        }
        let entry = describe_entry(&path, &md, ft);
        if entry.kind == (UKind::Dir { opaque: false }) || matches!(entry.kind, UKind::Dir { .. }) {
            subdirs.push(join(&name));
        }
        out.insert(join(&name), entry);
    }
    for d in subdirs {
        describe_dir(root, &d, out);
    }
    if rel.is_empty() {
        if let Ok(md) = std::fs::symlink_metadata(root) {
            let e = describe_entry(root, &md, md.file_type());
            out.insert(String::new(), e);
            // a `.wh..wh..opq` in the root was recorded before the root existed; recheck
            if root.join(".wh..wh..opq").exists() {
                if let Some(UEntry {
                    kind: UKind::Dir { opaque },
                    ..
                }) = out.get_mut("")
                {
                    *opaque = true;
                }
            }
        }
    }
}

fn describe_entry(path: &Path, md: &std::fs::Metadata, ft: std::fs::FileType) -> UEntry {
    let x = raw_xattrs(path);
    let mut format = String::new();
    let kind = if ft.is_dir() {
        let mut opaque = false;
        for n in OPAQUE_XATTRS {
            if x.get(n).is_some_and(|v| v.as_slice() == b"y") {
                opaque = true;
                format.push_str(&format!(" {n}"));
            }
        }
        UKind::Dir { opaque }
    } else if ft.is_symlink() {
        UKind::Symlink(
            std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_default(),
        )
    } else if ft.is_char_device() {
        let d = md.rdev();
        let (a, b) = (rustix::fs::major(d), rustix::fs::minor(d));
        if (a, b) == (0, 0) {
            UKind::Whiteout
        } else {
            UKind::CharDev(a, b)
        }
    } else if ft.is_block_device() {
        let d = md.rdev();
        UKind::BlockDev(rustix::fs::major(d), rustix::fs::minor(d))
    } else if ft.is_fifo() {
        UKind::Fifo
    } else if ft.is_socket() {
        UKind::Socket
    } else {
        let c = std::fs::read(path).unwrap_or_default();
        UKind::File(if c.len() <= 48 {
            show_bytes(&c)
        } else {
            format!("<{} bytes fnv={:016x}>", c.len(), crate::snapshot::fnv(&c))
        })
    };
    if kind == UKind::Whiteout {
        return UEntry {
            kind,
            attrs: None,
            mtime: None,
            xattrs: BTreeMap::new(),
            format: "chardev-0-0".into(),
        };
    }
    let mut attrs = (md.mode() & 0o7777, md.uid(), md.gid());
    for n in OVERRIDE_XATTRS {
        if let Some((u, g, m, _)) = x.get(n).and_then(|v| parse_override(v)) {
            attrs = (m & 0o7777, u, g);
            format.push_str(&format!(" {n}"));
        }
    }
    if ft.is_symlink() {
        attrs.0 = 0o777;
    }
    let mtime = (!ft.is_dir() && md.mtime() < RECENT).then_some(md.mtime());
    UEntry {
        kind,
        attrs: Some(attrs),
        mtime,
        xattrs: x
            .iter()
            .filter(|(k, _)| !is_internal(k))
            .map(|(k, v)| (k.clone(), show_bytes(v)))
            .collect(),
        format: format.trim().to_string(),
    }
}

/// Directories only the oracle's upper dir `a` holds that change nothing seen through the
/// mount: plain (not opaque) and empty there, absent from `b`. Old kernels copy a parent up
/// before a removal that then fails (Linux 4.15's rmdir of a non-empty directory); such a
/// directory only repeats its lower one. They are removed from `a` and returned as notes.
pub fn drop_empty_copied_up_dirs(a: &mut Upper, an: &str, b: &Upper) -> Vec<String> {
    let lone: Vec<String> = a
        .iter()
        .filter(|(k, e)| {
            matches!(e.kind, UKind::Dir { opaque: false })
                && !k.is_empty()
                && !b.contains_key(*k)
                && !has_child(a, k)
        })
        .map(|(k, _)| k.clone())
        .collect();
    lone.into_iter()
        .map(|k| {
            a.remove(&k);
            format!("upper {k}: an empty plain directory only {an} copied up (changes no view)")
        })
        .collect()
}

/// Whether `dir` has an entry below it in `u` (the first key from `dir/` on, in order).
fn has_child(u: &Upper, dir: &str) -> bool {
    let prefix = format!("{dir}/");
    u.range(prefix.clone()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(&prefix))
}

/// Differences between two normalized upper dirs, one line each.
pub fn diff(a: &Upper, an: &str, b: &Upper, bn: &str) -> Vec<String> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let shown = if k.is_empty() { "/" } else { k.as_str() };
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x.same_as(y) => {}
            (Some(x), Some(y)) => out.push(format!("upper {shown}:\n    {an}: {x}\n    {bn}: {y}")),
            (Some(x), None) => out.push(format!("upper {shown}: only in {an}: {x}")),
            (None, Some(y)) => out.push(format!("upper {shown}: only in {bn}: {y}")),
            (None, None) => unreachable!(),
        }
    }
    out
}

/// Leftovers in `<workdir>/work` after unmount (a partial copy-up that was never renamed into
/// place). Kernel overlayfs and fuse-overlayfs leave the directory itself, empty. The indexes
/// of copied-up lower hard links (kernel overlayfs's `index/` with `index=on`, rustfuse's
/// `rustfuse-index/`) are kept state, not leftovers: their entries are not listed.
pub fn work_leftovers(work: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(work) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && (name == "rustfuse-index" || name == "index") {
            continue;
        }
        if is_dir && name == "work" {
            if let Ok(inner) = std::fs::read_dir(e.path()) {
                for i in inner.flatten() {
                    // kernel overlayfs keeps a spare whiteout (`#N`, char 0/0) to link from
                    if i.file_type().is_ok_and(|t| t.is_char_device())
                        && i.metadata().is_ok_and(|m| m.rdev() == 0)
                    {
                        continue;
                    }
                    out.push(format!("{name}/{}", i.file_name().to_string_lossy()));
                }
            }
        } else {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(opaque: bool) -> UEntry {
        UEntry {
            kind: UKind::Dir { opaque },
            attrs: Some((0o755, 0, 0)),
            mtime: None,
            xattrs: BTreeMap::new(),
            format: String::new(),
        }
    }

    #[test]
    fn only_empty_plain_directories_the_other_side_lacks_are_dropped() {
        let mut a: Upper = ["", "e", "full", "opq", "both"]
            .into_iter()
            .map(|k| (k.to_string(), dir(k == "opq")))
            .collect();
        for f in ["e-x", "full/f"] {
            let mut e = dir(false);
            e.kind = UKind::File("x".into());
            a.insert(f.to_string(), e);
        }
        let b: Upper = [("both".to_string(), dir(false))].into_iter().collect();
        let notes = drop_empty_copied_up_dirs(&mut a, "kernel", &b);
        // "e" is empty although "e-x" sorts between it and "e/"; "full" has a child; "opq" is
        // opaque; "both" is on the other side; the root is never dropped.
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            ["", "both", "e-x", "full", "full/f", "opq"]
        );
    }
}
