//! Hostile layers: symlinks pointing outside are data, never followed by the daemon; names at
//! the 255-byte limit; trees deeper than PATH_MAX; `.wh.` names in every combination the
//! compatibility notes speak of.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustfuse_tests::env;
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::mount::{Mount, Stack};
use rustfuse_tests::ops::{self, Op, build::*};

fn layout(root: &Path) -> (Stack, PathBuf) {
    for d in ["lower", "upper", "work", "mnt"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    (
        Stack {
            lowers: vec![root.join("lower")],
            upper: Some(root.join("upper")),
            work: Some(root.join("work")),
        },
        root.join("mnt"),
    )
}

fn lxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    rustix::fs::lgetxattr(path, name, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

#[test]
fn symlinks_out_of_the_layer_are_never_followed() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = env::scratch("hostile-symlink");
    let outside = s.path().join("outside");
    fs::write(&outside, "host file").unwrap();
    let (stack, mnt) = layout(s.path());
    let lower = &stack.lowers[0];
    std::os::unix::fs::symlink(&outside, lower.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../outside", lower.join("dotdot")).unwrap();
    let m = Mount::fuse(&env::bin_under_test(), &stack, &[], &mnt).unwrap();
    let before = fs::metadata(&outside).unwrap();
    for link in ["abs", "dotdot"] {
        let p = mnt.join(link);
        // lchown, lsetxattr, rename: all on the link itself.
        rustix::fs::chownat(
            rustix::fs::CWD,
            &p,
            Some(rustix::fs::Uid::from_raw(123)),
            Some(rustix::fs::Gid::from_raw(456)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        rustix::fs::lsetxattr(&p, "trusted.mark", b"1", rustix::fs::XattrFlags::empty()).unwrap();
        assert_eq!(lxattr(&p, "trusted.mark").as_deref(), Some(&b"1"[..]));
        let moved = mnt.join(format!("{link}-moved"));
        fs::rename(&p, &moved).unwrap();
        let md = fs::symlink_metadata(&moved).unwrap();
        assert!(md.file_type().is_symlink(), "{link}: still a symlink");
        assert_eq!((md.uid(), md.gid()), (123, 456));
    }
    let after = fs::metadata(&outside).unwrap();
    assert_eq!(fs::read_to_string(&outside).unwrap(), "host file");
    assert_eq!(
        (after.uid(), after.gid(), after.mode()),
        (before.uid(), before.gid(), before.mode())
    );
    assert_eq!(
        lxattr(&outside, "trusted.mark"),
        None,
        "xattr reached the host file"
    );
    m.unmount().unwrap();
    // The upper layer holds the links, not copies of their targets.
    for link in ["abs-moved", "dotdot-moved"] {
        let md = fs::symlink_metadata(stack.upper.as_ref().unwrap().join(link)).unwrap();
        assert!(md.file_type().is_symlink(), "{link} in the upper layer");
    }
}

#[test]
fn names_of_255_bytes_and_trees_deeper_than_path_max() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = env::scratch("hostile-deep");
    let (stack, mnt) = layout(s.path());
    let long = "n".repeat(255);
    fs::write(stack.lowers[0].join(&long), "long").unwrap();
    // 300 levels of 20-byte names: 6300 bytes of path, over PATH_MAX (4096). Built with
    // directory fds, since no path to the bottom fits in a syscall.
    let seg = "d".repeat(20);
    let mut dir = open_dir_at(rustix::fs::CWD, &stack.lowers[0]);
    for _ in 0..300 {
        rustix::fs::mkdirat(&dir, seg.as_str(), rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
        dir = open_dir_at(&dir, &seg);
    }
    let f = rustix::fs::openat(
        &dir,
        "bottom",
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, b"deep").unwrap();
    drop(f);

    let m = Mount::fuse(&env::bin_under_test(), &stack, &[], &mnt).unwrap();
    assert_eq!(fs::read_to_string(mnt.join(&long)).unwrap(), "long");
    fs::write(mnt.join(&long), "long, changed").unwrap();
    let too_long = "n".repeat(256);
    let e = fs::write(mnt.join(&too_long), "x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc_enametoolong()),
        "256-byte name: {e}"
    );
    // Walk down through the mount with directory fds and copy the bottom file up.
    let mut dir = open_dir_at(rustix::fs::CWD, &mnt);
    for _ in 0..300 {
        dir = open_dir_at(&dir, &seg);
    }
    let f = rustix::fs::openat(
        &dir,
        "bottom",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::APPEND,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    rustix::io::write(&f, b"er").unwrap();
    drop(f);
    let f = rustix::fs::openat(
        &dir,
        "bottom",
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let mut buf = [0u8; 16];
    let n = rustix::io::read(&f, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"deeper");
    drop((f, dir));
    m.unmount().unwrap();
}

/// A directory opened for `*at` calls, relative to `dir` (the walk never needs a full path,
/// which would not fit PATH_MAX).
fn open_dir_at<Fd: std::os::fd::AsFd, P: rustix::path::Arg>(
    dir: Fd,
    name: P,
) -> std::os::fd::OwnedFd {
    rustix::fs::openat(
        dir,
        name,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap()
}

fn libc_enametoolong() -> i32 {
    rustix::io::Errno::NAMETOOLONG.raw_os_error()
}

/// Three lower layers with `.wh.` files: in the top one for names that exist in the bottom
/// one (`f`, the directory `d`), in the middle one for a name of the bottom one (`g`) and for
/// a name no layer has (`only`); a directory made opaque by a `.wh..wh..opq` file (`o`); a
/// merged directory (`m`).
fn wh_tree() -> Tree {
    Tree::new()
        .lower(
            Layer::new()
                .wh_file("f")
                .wh_file("d")
                .file("m/top", "top")
                .opaque_wh_dir("o")
                .file("o/top", "top"),
        )
        .lower(
            Layer::new()
                .wh_file("g")
                .wh_file("only")
                .file("m/mid", "mid"),
        )
        .lower(
            Layer::new()
                .file("f", "bottom f")
                .file("d/inner", "inner")
                .file("g", "bottom g")
                .file("m/bottom", "bottom")
                .file("o/bottom", "bottom"),
        )
}

/// Every entry of a layer directory as it is on disk: path → type letter (`w` for a 0/0
/// character device), `.wh.` files included.
fn raw_layer(dir: &Path) -> BTreeMap<String, char> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(dir.join(&rel)).unwrap() {
            let e = e.unwrap();
            let p = rel.join(e.file_name());
            let md = fs::symlink_metadata(e.path()).unwrap();
            let ft = md.file_type();
            let k = if ft.is_dir() {
                stack.push(p.clone());
                'd'
            } else if ft.is_char_device() && md.rdev() == 0 {
                'w'
            } else if ft.is_file() {
                'f'
            } else {
                '?'
            };
            out.insert(p.to_string_lossy().into_owned(), k);
        }
    }
    out
}

/// What the merged view of [`wh_tree`] shows before and after the changes below, whatever the
/// mount: lower names hidden by `.wh.` files stay hidden, `.wh.` names are never shown.
fn wh_view_cases(after: bool) -> Vec<(Op, &'static str)> {
    let root = if after {
        "ok: ..wh.x:f .WH.x:f .wh:f .whx:f d:d f-moved:f m:d o:d x.wh.y:f"
    } else {
        "ok: m:d o:d"
    };
    vec![
        (readdir(""), root),
        (readdir("m"), "ok: bottom:f mid:f top:f"),
        (readdir("o"), "ok: top:f"),
        (read(".wh.f"), "ENOENT"),
        (read(".wh.g"), "ENOENT"),
        (stat("o/.wh..wh..opq"), "ENOENT"),
        (read("f"), "ENOENT"),
        (read("g"), "ENOENT"),
        (read("only"), "ENOENT"),
        (read("o/bottom"), "ENOENT"),
        (read("d/inner"), "ENOENT"),
    ]
}

#[test]
fn wh_names_follow_the_compatibility_notes() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = env::scratch("hostile-wh");
    let Materialized { stack, mnt } = wh_tree().materialize(s.path()).unwrap();
    let upper = stack.upper.clone().unwrap();
    let mount = || Mount::fuse(&env::bin_under_test(), &stack, &[], &mnt).unwrap();
    let m = mount();
    let mut problems = ops::mismatches(m.root(), "before", &wh_view_cases(false));
    // Names starting `.wh.` are refused with EINVAL by every call that makes a name, also
    // where the name is a whiteout below and where it is the opaque marker, and also in a
    // merged directory (which must stay merged).
    problems.extend(ops::mismatches(
        m.root(),
        "refused",
        &[
            (create(".wh.x"), "EINVAL"),
            (create(".wh.f"), "EINVAL"),
            (create(".wh."), "EINVAL"),
            (create(".wh..wh..opq"), "EINVAL"),
            (create("m/.wh..wh..opq"), "EINVAL"),
            (mkdir("m/.wh..wh..opq"), "EINVAL"),
            (create("m/.wh.top"), "EINVAL"),
            (mkdir(".wh.d"), "EINVAL"),
            (symlink("m/top", ".wh.s"), "EINVAL"),
            (mkfifo(".wh.p"), "EINVAL"),
            (link("m/top", ".wh.l"), "EINVAL"),
            (rename("m/top", "m/.wh.top"), "EINVAL"),
            (rename("m/mid", "m/.wh..wh..opq"), "EINVAL"),
            (unlink(".wh.f"), "ENOENT"),
            (unlink("f"), "ENOENT"),
            (rmdir("d"), "ENOENT"),
            (unlink("g"), "ENOENT"),
        ],
    ));
    // Names that only look like it are ordinary.
    problems.extend(ops::mismatches(
        m.root(),
        "lookalikes",
        &[
            (write(".wh", "a"), "ok"),
            (write(".whx", "b"), "ok"),
            (write("..wh.x", "c"), "ok"),
            (write("x.wh.y", "d"), "ok"),
            (write(".WH.x", "e"), "ok"),
            (read("..wh.x"), "ok: \"c\""),
        ],
    ));
    // A name hidden by a `.wh.` file above can be made again, shows only what is written, and
    // needs no whiteout of its own when it goes: the `.wh.` file below still hides the name.
    problems.extend(ops::mismatches(
        m.root(),
        "recreate",
        &[
            (write("f", "new f"), "ok"),
            (read("f"), "ok: \"new f\""),
            (rename("f", "f-moved"), "ok"),
            (read("f"), "ENOENT"),
            (mkdir("d"), "ok"),
            (readdir("d"), "ok"),
            (write("g", "new g"), "ok"),
            (unlink("g"), "ok"),
            (write("only", "new only"), "ok"),
            (unlink("only"), "ok"),
            (read("g"), "ENOENT"),
            (read("only"), "ENOENT"),
        ],
    ));
    problems.extend(ops::mismatches(m.root(), "after", &wh_view_cases(true)));
    m.unmount().unwrap();
    // On disk: no `.wh.` name and no whiteout was written (every removed name was hidden
    // below already); `m` was not even copied up (every change in it was refused); `d` is a
    // plain directory, which the `.wh.d` below keeps apart from the old one.
    let raw = raw_layer(&upper);
    let want: BTreeMap<String, char> = [
        ("..wh.x", 'f'),
        (".WH.x", 'f'),
        (".wh", 'f'),
        (".whx", 'f'),
        ("d", 'd'),
        ("f-moved", 'f'),
        ("x.wh.y", 'f'),
    ]
    .into_iter()
    .map(|(p, k)| (p.to_string(), k))
    .collect();
    if raw != want {
        problems.push(format!("upper layer: {raw:?}, want {want:?}"));
    }
    // The same view after a remount: nothing of the refused names took effect.
    let m = mount();
    problems.extend(ops::mismatches(m.root(), "remount", &wh_view_cases(true)));
    problems.extend(ops::mismatches(
        m.root(),
        "remount",
        &[(read("f-moved"), "ok: \"new f\""), (readdir("d"), "ok")],
    ));
    m.unmount().unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn wh_file_whiteouts_written_by_the_daemon_stay_hidden() {
    // With FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT the daemon itself writes `.wh.NAME` files:
    // they hide the name, are never shown, cannot be made or reached through the mount, and
    // go when the name is made again.
    if !env::require_bin_under_test() {
        return;
    }
    let s = env::scratch("hostile-whfile");
    let Materialized { stack, mnt } = wh_tree().materialize(s.path()).unwrap();
    let upper = stack.upper.clone().unwrap();
    let env = [("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT", "1")];
    let mount = || Mount::fuse_env(&env::bin_under_test(), &stack, &[], &mnt, &env).unwrap();
    let m = mount();
    let mut problems = ops::mismatches(
        m.root(),
        "remove",
        &[
            (unlink("m/bottom"), "ok"),
            (unlink("m/mid"), "ok"),
            (readdir("m"), "ok: top:f"),
            (read("m/.wh.bottom"), "ENOENT"),
            (create("m/.wh.bottom"), "EINVAL"),
            (unlink("m/.wh.bottom"), "ENOENT"),
            (rename("m/top", "m/.wh.mid"), "EINVAL"),
        ],
    );
    m.unmount().unwrap();
    let raw = raw_layer(&upper);
    for wh in ["m/.wh.bottom", "m/.wh.mid"] {
        if raw.get(wh) != Some(&'f') {
            problems.push(format!("upper layer lacks the whiteout file {wh}: {raw:?}"));
        }
    }
    let m = mount();
    problems.extend(ops::mismatches(
        m.root(),
        "remount",
        &[
            (readdir("m"), "ok: top:f"),
            (write("m/bottom", "again"), "ok"),
            (readdir("m"), "ok: bottom:f top:f"),
            (read("m/bottom"), "ok: \"again\""),
        ],
    ));
    m.unmount().unwrap();
    let raw = raw_layer(&upper);
    if raw.contains_key("m/.wh.bottom") || !raw.contains_key("m/.wh.mid") {
        problems.push(format!("upper layer after re-creating m/bottom: {raw:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
