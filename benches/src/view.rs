//! What each run leaves in the merged view, checked against kernel overlayfs's.
//!
//! After the measured part of a run, before the unmount and untimed, the parts of the view the
//! workload reads or changes are described (the tests' normalized snapshot: type, mode, owner,
//! size, content, symlink target, xattrs but `security.*` and the overlays' own, link count,
//! old mtimes; readdir's inode numbers and types against lstat's) and the
//! description is kept under the run dir (`run/FS/views/WORKLOAD.txt`, the last run's) with its
//! hash. A filesystem whose description differs from kernel overlayfs's in any run of a
//! workload is marked in the table: its time is of something else than what users asked for.

use std::collections::{BTreeSet, hash_map::DefaultHasher};
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use rustfuse_tests::snapshot;

/// Paths left out: git's index caches each file's inode number and times as the filesystem
/// reported them (the FUSE floor's flattened tree reports others), so its bytes are no part
/// of what a workload should leave alike.
const VOLATILE: &[&str] = &["app/repo/.git/index"];

/// The overlay filesystems' own xattrs, left out: the layer set marks its opaque
/// directories with both `trusted.overlay.opaque` and `user.overlay.opaque`, and kernel
/// overlayfs in root mode lists the `user.` one as an ordinary xattr, where rustfuse and
/// fuse-overlayfs hide it as their own (docs/compatibility.md, "internal xattrs").
const OVERLAY_XATTRS: &[&str] = &["trusted.overlay.", "user.overlay.", "user.fuseoverlayfs."];

/// The parts of the view (relative to the mount) a workload reads or changes.
pub fn scope(workload: &str) -> &'static [&'static str] {
    const TREE: &[&str] = &["etc", "usr", "var", "app"];
    match workload {
        "lone-getxattr" | "lone-open" | "lone-statx" | "find-cold" | "find-warm"
        | "find-remount" | "ls-lR" | "stat-all" | "tar-small" => TREE,
        "git-status" => &["app/repo"],
        "seqread-cold" | "seqread-warm" | "seqread-ro" => &["big/seq.bin"],
        "randread-4k" => &["big/rand.bin"],
        "two-readers" => &["big/seq.bin", "big/rand.bin"],
        "untar" | "untar-find" => &["untar"],
        "create-fsync" => &["newfiles"],
        "seqwrite" => &["seqwrite.bin"],
        "append-copyup" => &["big/append.bin"],
        "append-held" => &["app/held.log"],
        "chmod-chown" => &["usr/lib"],
        "rm-rf" | "rename-dir" => &["app"],
        "renames" => &["usr/include"],
        "cp-a" => &["usr/lib", "usr/lib.copy"],
        "pkg-replace" => &["usr/bin", "var/lib/dpkg"],
        "make-j2" => &["app/proj"],
        _ => &[],
    }
}

/// The description of `paths` under `mnt`, one line per entry (a missing path says so).
pub fn describe(mnt: &Path, paths: &[&str]) -> String {
    let mut out = String::new();
    for p in paths {
        let root = mnt.join(p);
        if fs::symlink_metadata(&root).is_err() {
            let _ = writeln!(out, "{p}: absent");
            continue;
        }
        let snapshot::Snapshot {
            entries, problems, ..
        } = snapshot::snapshot(&root);
        for (rel, mut info) in entries {
            let shown = if rel.is_empty() {
                p.to_string()
            } else {
                format!("{p}/{rel}")
            };
            if VOLATILE.contains(&shown.as_str()) {
                continue;
            }
            info.xattrs
                .retain(|k, _| !OVERLAY_XATTRS.iter().any(|x| k.starts_with(x)));
            let _ = writeln!(out, "{shown}: {info}");
        }
        for problem in &problems {
            let _ = writeln!(out, "{p}: problem: {problem}");
        }
    }
    out
}

/// The hash a description is compared by.
pub fn digest(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Where the last run of `workload` on `fs_id` left its description.
pub fn file(run_root: &Path, fs_id: &str, workload: &str) -> PathBuf {
    run_root
        .join(fs_id)
        .join("views")
        .join(format!("{workload}.txt"))
}

/// Describe the view after a run of `workload` on `fs_id` mounted at `mnt`, keep the text and
/// record its hash for [`take`].
pub fn record(run_root: &Path, fs_id: &str, workload: &str, mnt: &Path) -> Result<()> {
    let paths = scope(workload);
    if paths.is_empty() {
        return Ok(());
    }
    let text = describe(mnt, paths);
    let f = file(run_root, fs_id, workload);
    if let Some(d) = f.parent() {
        fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    fs::write(&f, &text).with_context(|| format!("write {}", f.display()))?;
    set(digest(&text));
    Ok(())
}

static LAST: Mutex<Option<u64>> = Mutex::new(None);

/// Record the hash of the run that just ended (a rootless run's child prints it, the parent
/// sets it here).
pub fn set(d: u64) {
    *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
}

/// The hash of the run that just ended, if its workload has a scope.
pub fn take() -> Option<u64> {
    LAST.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The first lines (at most `n`) in which two kept descriptions differ, each side named.
pub fn differences(a: &str, an: &str, b: &str, bn: &str, n: usize) -> Vec<String> {
    let la: BTreeSet<&str> = a.lines().collect();
    let lb: BTreeSet<&str> = b.lines().collect();
    let mut out: Vec<String> = la
        .difference(&lb)
        .map(|l| format!("{an}: {l}"))
        .chain(lb.difference(&la).map(|l| format!("{bn}: {l}")))
        .collect();
    // Side by side per path (the text between the side's name and the description; a
    // stable sort keeps `an`'s line first).
    let path = |s: &str| -> String {
        let rest = s.split_once(": ").map_or("", |(_, r)| r);
        rest.split_once(": ").map_or(rest, |(p, _)| p).to_string()
    };
    out.sort_by_key(|l| path(l));
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_names_each_entry_and_a_missing_path() {
        let d = std::env::temp_dir().join(format!("rustfuse-view-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::write(d.join("a/b/f"), b"hello").unwrap();
        std::os::unix::fs::symlink("f", d.join("a/b/l")).unwrap();
        let text = describe(&d, &["a", "gone"]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("a: Dir"), "{text}");
        assert!(
            lines[2].starts_with("a/b/f: File") && lines[2].contains("hello"),
            "{text}"
        );
        assert!(lines[3].contains("-> \"f\""), "{text}");
        assert_eq!(lines[4], "gone: absent");
        fs::write(d.join("a/b/f"), b"hellO").unwrap();
        let changed = describe(&d, &["a", "gone"]);
        assert_ne!(digest(&text), digest(&changed));
        let diff = differences(&text, "kernel", &changed, "fo2", 5);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0].starts_with("kernel: a/b/f") && diff[1].starts_with("fo2: a/b/f"));
        fs::remove_dir_all(&d).unwrap();
    }
}
