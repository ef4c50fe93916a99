//! Read-only mounts of a layer stack that has an upper layer: `-o ...,upperdir=U,workdir=W,ro`
//! as BuildKit (`readOnlyMounter`: checksums, cache keys, its walking differ) and containerd
//! (`readonlyMounts`: the walking differ of `ctr snapshots diff` and container commits) mount
//! an active snapshot, also as `rustfuse -r` and through `mount.fuse3 ... -o ...,ro`.
//!
//! What users see: the whole merged view, upper layer included (new files, whiteouts, opaque
//! directories, renames, copy-ups), the same as the read-write mount of the same layers that
//! is live beside it and as kernel overlayfs mounted read-only; every change answers EROFS;
//! and nothing is written anywhere: the upper layer and the workdir are the same, to the
//! ctime and xattr, before and after the read-only mount came and went (a read-write mount of
//! the same layers may be using the workdir at that moment).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustfuse_tests::env::{
    bin_alias, bin_under_test, path_with, require_bin_under_test, scratch, skip,
};
use rustfuse_tests::layers::{Layer, Tree};
use rustfuse_tests::mount::{Mount, Stack, mount_at};
use rustfuse_tests::ops::build::*;
use rustfuse_tests::ops::{self, Op, show};
use rustfuse_tests::scenario::snap;
use rustfuse_tests::snapshot::diff;
use rustfuse_tests::upper::raw_xattrs;

const MOUNT_FUSE3: &str = "/sbin/mount.fuse3";

/// Lower layers in kernel overlayfs's format, so the kernel can be the oracle.
fn tree() -> Tree {
    Tree::new()
        .lower(
            Layer::new()
                .file("a", "top a")
                .whiteout("d/gone")
                .opaque_dir("o")
                .file("o/new", "new in o"),
        )
        .lower(
            Layer::new()
                .file("a", "low a")
                .file("b", "b")
                .mode(0o640)
                .file("c", "c")
                .file("d/gone", "x")
                .file("d/keep", "keep")
                .file("o/old", "old")
                .file("tree/x/y", "y")
                .file("tree/z", "z")
                .file("repl/old1", "1")
                .file("repl/old2", "2")
                .file("mv-me", "moved")
                .symlink("s", "a"),
        )
}

/// What a RUN step does through the read-write mount: every kind of change to the upper layer.
fn run_step() -> Vec<Op> {
    vec![
        create("new"),
        write("new", "new file"),
        append("a", " appended"),
        unlink("c"),
        unlink("d/keep"),
        unlink("tree/x/y"),
        rmdir("tree/x"),
        unlink("tree/z"),
        rmdir("tree"),
        unlink("repl/old1"),
        unlink("repl/old2"),
        rmdir("repl"),
        mkdir("repl"),
        write("repl/fresh", "fresh"),
        rename("mv-me", "moved"),
        chmod("b", 0o600),
        setxattr("o/new", "user.k", "v"),
        mkdir("nd"),
        symlink("../a", "nd/sl"),
        create("d/gone"),
    ]
}

/// Every change a read-only mount must refuse, and a read that must work.
fn refused() -> Vec<Op> {
    vec![
        create("x"),
        write("new", "overwrite"),
        append("a", "more"),
        truncate("moved", 0),
        unlink("new"),
        unlink("b"),
        rmdir("nd"),
        mkdir("nd2"),
        rename("moved", "moved2"),
        chmod("new", 0o644),
        chown("new", 1, 1),
        utimens("new", 1, 1),
        setxattr("new", "user.x", "1"),
        removexattr("o/new", "user.k"),
        symlink("a", "sl2"),
        link("new", "new-link"),
    ]
}

/// Everything about a tree on disk that a write would change: type, mode, owner, size,
/// inode, mtime and ctime to the nanosecond, content, and every xattr (trusted.* included).
fn disk_state(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let content = if md.is_file() {
            format!(
                "{:x}",
                rustfuse_tests::snapshot::fnv(&std::fs::read(&p).unwrap())
            )
        } else {
            String::new()
        };
        out.insert(
            rel,
            format!(
                "mode={:o} owner={}:{} size={} ino={} mtime={}.{} ctime={}.{} content={content} xattrs={:?}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.size(),
                md.ino(),
                md.mtime(),
                md.mtime_nsec(),
                md.ctime(),
                md.ctime_nsec(),
                raw_xattrs(&p)
            ),
        );
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

fn state_changes(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> String {
    let mut out = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => out.push(format!("removed {k:?}: {v}")),
            Some(w) if w != v => out.push(format!("changed {k:?}:\n  before {v}\n  after  {w}")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            out.push(format!("added {k:?}: {v}"));
        }
    }
    out.join("\n")
}

/// The ways a read-only mount of a stack with an upper layer is asked for.
#[derive(Debug, Clone, Copy)]
enum Ro {
    /// `-o ...,ro` (BuildKit and containerd append `ro` to the options).
    Option,
    /// `rustfuse -r -o ...`, mount(8)'s flag.
    DashR,
    /// `mount.fuse3 overlay MNT -o ...,rw,ro -t rustfuse`, as containerd runs a `fuse3.rustfuse`
    /// mount after dropping `rw` and appending `ro` (here `rw` is kept before `ro`: the last wins).
    MountFuse3,
}

fn mount_ro(how: Ro, stack: &Stack, mnt: &Path, alias_dir: &Path) -> Mount {
    let mnt = mnt.canonicalize().unwrap();
    let r = match how {
        Ro::Option => Mount::fuse(&bin_under_test(), stack, &["ro"], &mnt),
        Ro::DashR => {
            let args: Vec<OsString> = vec![
                "-r".into(),
                "-o".into(),
                stack.options().into(),
                mnt.clone().into(),
            ];
            Mount::fuse_args(&bin_under_test(), &args, &mnt, &[])
        }
        Ro::MountFuse3 => {
            let alias = bin_alias(alias_dir, "rustfuse");
            let path = path_with(alias.parent().unwrap());
            let args: Vec<OsString> = vec![
                "overlay".into(),
                mnt.clone().into(),
                "-o".into(),
                format!("{},rw,ro", stack.options()).into(),
                "-t".into(),
                "rustfuse".into(),
            ];
            Mount::fuse_args(Path::new(MOUNT_FUSE3), &args, &mnt, &[("PATH", &path)])
        }
    };
    let m = r.unwrap_or_else(|e| panic!("read-only mount ({how:?}): {e}"));
    let info = mount_at(&mnt).expect("mounted");
    assert!(
        info.mount_options.split(',').any(|o| o == "ro"),
        "{how:?}: the kernel mount is not read-only: {}",
        info.mount_options
    );
    m
}

/// The read-write mount of a RUN step stays live while read-only mounts of the same layers
/// (each way of asking) come and go: each shows what the read-write mount shows, refuses
/// every change with EROFS, and leaves the upper layer and the workdir untouched; kernel
/// overlayfs mounted read-only on the same layers afterwards shows the same tree.
#[test]
fn ro_mount_shows_the_upper_layer_and_writes_nothing() {
    if !require_bin_under_test() {
        return;
    }
    if !Path::new(MOUNT_FUSE3).exists() {
        skip("mount.fuse3 missing (apt-get install fuse3)");
        return;
    }
    let s = scratch("ro-upper");
    let m = tree().materialize(s.path()).expect("materialize");
    let upper = m.stack.upper.clone().unwrap();
    let work = m.stack.work.clone().unwrap();
    let rw = Mount::fuse(&bin_under_test(), &m.stack, &[], &m.mnt).expect("rw mount");
    let outcomes = ops::run(rw.root(), &run_step());
    for (op, out) in run_step().iter().zip(&outcomes) {
        assert!(
            show(out).starts_with("ok"),
            "{op:?} through the read-write mount: {}",
            show(out)
        );
    }
    let rw_view = snap(rw.root());
    // What a read-write mount may have in its workdir at any moment: a read-only mount of
    // the same layers must leave it alone.
    let marker = work.join("work").join("in-flight");
    std::fs::write(&marker, "copy-up in progress").unwrap();
    let before = (disk_state(&upper), disk_state(&work));

    for how in [Ro::Option, Ro::DashR, Ro::MountFuse3] {
        let mnt = s.path().join(format!("ro-{how:?}"));
        std::fs::create_dir(&mnt).unwrap();
        let ro = mount_ro(how, &m.stack, &mnt, s.path());
        let ro_view = snap(ro.root());
        let d = diff(&rw_view, "read-write mount", &ro_view, "read-only mount");
        assert!(d.is_empty(), "{how:?}: views differ:\n{}", d.join("\n"));
        assert!(
            ro_view.problems.is_empty(),
            "{how:?}: {:?}",
            ro_view.problems
        );
        let got: Vec<String> = ops::run(ro.root(), &refused()).iter().map(show).collect();
        for (op, g) in refused().iter().zip(&got) {
            assert_eq!(g, "EROFS", "{how:?}: {op:?} through the read-only mount");
        }
        let read = ops::run(ro.root(), &[read("new"), read("repl/fresh"), read("a")]);
        let read: Vec<String> = read.iter().map(show).collect();
        assert_eq!(
            read,
            [
                "ok: \"new file\"",
                "ok: \"fresh\"",
                "ok: \"top a appended\""
            ],
            "{how:?}: reads through the read-only mount"
        );
        ro.unmount().expect("unmount read-only");
        let after = (disk_state(&upper), disk_state(&work));
        let changes = [
            state_changes(&before.0, &after.0),
            state_changes(&before.1, &after.1),
        ];
        assert!(
            changes.iter().all(String::is_empty),
            "{how:?}: the read-only mount wrote: upper:\n{}\nworkdir:\n{}",
            changes[0],
            changes[1]
        );
    }
    // The read-write mount still works after the read-only ones went.
    let more = ops::run(rw.root(), &[write("after", "after ro"), read("after")]);
    assert_eq!(show(&more[1]), "ok: \"after ro\"");
    ops::run(rw.root(), &[unlink("after")]);
    let rw_view = snap(rw.root());
    rw.unmount().expect("unmount rw");
    std::fs::remove_file(&marker).unwrap();

    // kernel overlayfs, read-only, on the same layers: the oracle.
    let kmnt = s.path().join("kernel");
    std::fs::create_dir(&kmnt).unwrap();
    let k = Mount::kernel_with(
        &m.stack,
        &kmnt,
        "redirect_dir=off,index=off,metacopy=off,ro",
    )
    .expect("kernel overlayfs, read-only");
    let info = mount_at(&kmnt.canonicalize().unwrap()).expect("kernel mount");
    // `ro` in mount(2)'s data makes the superblock read-only (the mount's own flags stay rw).
    assert!(
        info.super_options.split(',').any(|o| o == "ro"),
        "kernel overlayfs is not read-only: {} / {}",
        info.mount_options,
        info.super_options
    );
    let k_view = snap(k.root());
    k.unmount().expect("unmount kernel");
    let d = diff(&k_view, "kernel overlayfs ro", &rw_view, "rustfuse");
    assert!(d.is_empty(), "kernel overlayfs differs:\n{}", d.join("\n"));
}
