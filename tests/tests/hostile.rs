//! Hostile layers: symlinks pointing outside are data, never followed by the daemon; names at
//! the 255-byte limit; trees deeper than PATH_MAX.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustfuse_tests::env;
use rustfuse_tests::mount::{Mount, Stack};

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
