//! EIO injected at chosen kernel calls of a live mount, through the daemon's kernel-call seam:
//! the daemon built with the `fault-injection` feature (`tests/run.sh` builds it into
//! `target/fault-injection`) plans "the next call of OP fails with ERRNO" when the
//! `rustfuse.fault` xattr is set on the mount point.
//!
//! For each step (a read, an open, each step of a copy-up, whiteout, unlink, mkdir, rmdir,
//! rename, write, fsync, xattrs, chmod, truncate, symlink, link, utimens), what must hold:
//! the caller gets EIO, the merged view is exactly what it was before, nothing half-done is left
//! in `work/`, and the same call succeeds right after. At the end: the mount is up, the daemon
//! holds no more descriptors than at the start, and after a remount (by the normal build)
//! every file holds what the successful calls wrote.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use rustfuse_tests::env::{self, bin_under_test, fault_injection_bin, poll_until, scratch};
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::mount::{Mount, open_fds};
use rustfuse_tests::snapshot::{diff, snapshot};

const EIO: i32 = 5;

type Step = fn(&Path) -> std::io::Result<()>;

/// (kernel call planned to fail, what the caller does).
const CASES: &[(&str, &str, Step)] = &[
    ("read", "O_DIRECT read of a lower file", |r| {
        direct(r.join("lower-read"), false)?.read_exact(&mut [0u8; 5])
    }),
    (
        "read",
        "O_DIRECT read of 64 KiB of a lower file (answered by splice)",
        |r| direct(r.join("lower-big-read"), false)?.read_exact(&mut vec![0u8; 65536]),
    ),
    ("open", "open of a lower file", |r| {
        fs::File::open(r.join("lower-open")).map(drop)
    }),
    (
        "open",
        "append to a lower file (copy-up: creating the copy)",
        |r| append(&r.join("lower-c1"), b"+1"),
    ),
    (
        "copy_file_range",
        "append to a lower file (copy-up: data)",
        |r| append(&r.join("lower-c2"), b"+2"),
    ),
    ("utimens", "append to a lower file (copy-up: times)", |r| {
        append(&r.join("lower-c3"), b"+3")
    }),
    (
        "rename",
        "append to a lower file (copy-up: into place)",
        |r| append(&r.join("lower-c4"), b"+4"),
    ),
    ("chown", "chmod of a lower file (copy-up: owner)", |r| {
        fs::set_permissions(r.join("lower-c5"), fs::Permissions::from_mode(0o600))
    }),
    (
        "mkdir",
        "create in a lower directory (copy-up of the directory)",
        |r| fs::write(r.join("lower-dir/new"), "n"),
    ),
    ("mknod", "unlink of a lower file (whiteout)", |r| {
        fs::remove_file(r.join("lower-gone"))
    }),
    ("unlink", "unlink of an upper file", |r| {
        fs::remove_file(r.join("u-unlink"))
    }),
    ("mkdir", "mkdir", |r| fs::create_dir(r.join("new-dir"))),
    ("rmdir", "rmdir of an upper directory", |r| {
        fs::remove_dir(r.join("u-dir"))
    }),
    ("rename", "rename of an upper file", |r| {
        fs::rename(r.join("u-from"), r.join("u-to"))
    }),
    ("write", "O_DIRECT write to an upper file", |r| {
        direct(r.join("u-data"), true)?.write_all(&[b'w'; 4096])
    }),
    ("fsync", "fsync of an upper file", |r| {
        fs::OpenOptions::new()
            .write(true)
            .open(r.join("u-data"))?
            .sync_all()
    }),
    ("setxattr", "setxattr", |r| {
        rustix::fs::lsetxattr(
            r.join("u-data"),
            "user.k",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(Into::into)
    }),
    ("getxattr", "getxattr", |r| {
        rustix::fs::lgetxattr(r.join("u-data"), "user.k", &mut [0u8; 64])
            .map(drop)
            .map_err(Into::into)
    }),
    ("removexattr", "removexattr", |r| {
        rustix::fs::lremovexattr(r.join("u-data"), "user.k").map_err(Into::into)
    }),
    ("chmod", "chmod of an upper file", |r| {
        fs::set_permissions(r.join("u-data"), fs::Permissions::from_mode(0o640))
    }),
    ("truncate", "truncate of an upper file", |r| {
        fs::OpenOptions::new()
            .write(true)
            .open(r.join("u-data"))?
            .set_len(100)
    }),
    ("utimens", "utimens of an upper file", |r| {
        fs::File::open(r.join("u-data"))?.set_modified(std::time::UNIX_EPOCH)
    }),
    ("symlink", "symlink", |r| {
        symlink("target", r.join("new-link"))
    }),
    ("link", "hard link", |r| {
        fs::hard_link(r.join("u-data"), r.join("new-hardlink"))
    }),
];

fn direct(path: std::path::PathBuf, write: bool) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
}

fn append(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(data)?;
    f.seek(std::io::SeekFrom::End(0)).map(drop)
}

fn tree() -> Tree {
    let mut lower = Layer::new();
    for name in [
        "lower-read",
        "lower-open",
        "lower-c1",
        "lower-c2",
        "lower-c3",
        "lower-c4",
        "lower-c5",
        "lower-gone",
    ] {
        lower = lower.file(name, format!("{name} below"));
    }
    lower = lower.file("lower-dir/old", "old");
    lower = lower.file("lower-big-read", vec![7u8; 200_000]);
    Tree::new().lower(lower)
}

fn plan(root: &Path, spec: &str) -> std::io::Result<()> {
    rustix::fs::setxattr(
        root,
        "rustfuse.fault",
        spec.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(Into::into)
}

/// Whether FICLONE works in `dir` (btrfs, XFS; the layers are there): copy-up then never
/// calls copy_file_range.
fn clones_files(dir: &Path) -> bool {
    let (a, b) = (dir.join(".probe-a"), dir.join(".probe-b"));
    let cloned = fs::write(&a, "x").is_ok()
        && fs::File::create(&b)
            .and_then(|out| {
                let src = fs::File::open(&a)?;
                rustix::fs::ioctl_ficlone(&out, &src).map_err(Into::into)
            })
            .is_ok();
    let _ = fs::remove_file(a);
    let _ = fs::remove_file(b);
    cloned
}

/// The daemon's descriptors other than directories (it keeps handles of the directories it
/// has seen, a bounded cache; new ones come with the directories the cases make) and pipes (a
/// pair per READ answered by splice at once, made at the first such READ and kept: `reads.rs`
/// checks there are no more than a pair per thread).
fn fd_count(pid: i32) -> usize {
    open_fds(pid)
        .iter()
        .filter(|fd| !(fd.target.is_dir() || fd.target.to_string_lossy().starts_with("pipe:")))
        .count()
}

#[test]
fn eio_at_each_step_changes_nothing_and_the_mount_stays_up() {
    if !env::require_fault_injection_bin() || !env::require_bin_under_test() {
        return;
    }
    let s = scratch("injected");
    let Materialized { stack, mnt } = tree().materialize(s.path()).unwrap();
    let work = stack.work.clone().unwrap();
    // passthrough=0: reads and writes must reach the daemon, where the faults are.
    // background_sync=1: a copy is built under a name in work/ and renamed into place on any
    // host (copies synced before they are answered are anonymous files linked into place;
    // the daemon's unit tests fail each of those steps).
    let m = Mount::fuse(
        &fault_injection_bin(),
        &stack,
        &["passthrough=0", "background_sync=1"],
        &mnt,
    )
    .unwrap();
    let root = m.root().to_path_buf();
    let pid = m.daemon_pid().expect("daemon pid");
    // Upper-only entries for the cases that need them.
    for f in ["u-unlink", "u-from", "u-data"] {
        fs::write(root.join(f), format!("{f} above")).unwrap();
    }
    fs::create_dir(root.join("u-dir")).unwrap();
    let baseline = fd_count(pid);
    let reflink = clones_files(s.path());
    let problems = env::with_deadline(Duration::from_secs(120), "injected EIO", move || {
        let mut problems = Vec::new();
        for (op, what, step) in CASES {
            if *op == "copy_file_range" && reflink {
                // FICLONE copies the data and copy_file_range is never called.
                println!("injected: {what} skipped: the upper layer's filesystem clones files");
                continue;
            }
            let before = snapshot(&root);
            plan(&root, &format!("{op}:1:{EIO}")).expect("plan a fault");
            let r = step(&root);
            plan(&root, "off").expect("drop the plan");
            match &r {
                Err(e) if e.raw_os_error() == Some(EIO) => {}
                other => problems.push(format!("{what} ({op} fails): got {other:?}, want EIO")),
            }
            let after = snapshot(&root);
            for d in diff(&before, "before", &after, "after the failed call") {
                problems.push(format!("{what} ({op} fails): the view changed: {d}"));
            }
            let left: Vec<_> = fs::read_dir(work.join("work"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            if !left.is_empty() {
                problems.push(format!("{what} ({op} fails): work/ holds {left:?}"));
            }
            if let Err(e) = step(&root) {
                problems.push(format!("{what}: the call after the fault failed: {e}"));
            }
        }
        if let Err(e) = fs::metadata(&root) {
            problems.push(format!("the mount is not up after the faults: {e}"));
        }
        // The kernel releases closed files asynchronously.
        if !poll_until(Duration::from_secs(10), || fd_count(pid) <= baseline) {
            problems.push(format!(
                "daemon descriptors grew from {baseline} to {}",
                fd_count(pid)
            ));
        }
        let view = snapshot(&root);
        (problems, view)
    });
    let (mut problems, view) = problems;
    m.unmount().unwrap();
    // What the successful calls did is on disk: a remount by the normal build shows it all.
    let m = Mount::fuse(&bin_under_test(), &stack, &[], &mnt).unwrap();
    let again = snapshot(m.root());
    for d in diff(&view, "before unmount", &again, "after remount") {
        problems.push(format!("remount: {d}"));
    }
    for (path, want) in [
        ("lower-c1", "lower-c1 below+1"),
        ("lower-c4", "lower-c4 below+4"),
        ("lower-dir/new", "n"),
    ] {
        match fs::read_to_string(m.root().join(path)) {
            Ok(got) if got == want => {}
            other => problems.push(format!("after remount {path}: {other:?}, want {want:?}")),
        }
    }
    for gone in ["lower-gone", "u-unlink", "u-dir", "u-from"] {
        if fs::symlink_metadata(m.root().join(gone)).is_ok() {
            problems.push(format!("after remount {gone} is back"));
        }
    }
    m.unmount().unwrap();
    println!("injected: {} faults, each EIO to the caller", CASES.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Does the running kernel have FUSE passthrough (6.9+)? (A test may ask the version; the
/// daemon decides from what INIT offers.)
fn kernel_has_passthrough() -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 9)
}

/// FUSE passthrough (Linux 6.9+, a daemon with CAP_SYS_ADMIN): writes to an upper file go from
/// the kernel straight to that file, so a fault planned for the daemon's write is not hit,
/// and the data is there. Reads of a lower file still reach the daemon (their handles move to
/// the copy after a copy-up, which a backing file cannot). With `passthrough=0`, or a kernel
/// without it, the write reaches the daemon.
#[test]
fn writes_to_upper_files_go_around_the_daemon_with_passthrough() {
    if !env::require_fault_injection_bin() {
        return;
    }
    let offered = kernel_has_passthrough();
    let mut problems = Vec::new();
    for (opts, bypass) in [(&[][..], offered), (&["passthrough=0"][..], false)] {
        let s = scratch("passthrough");
        let Materialized { stack, mnt } = tree().materialize(s.path()).unwrap();
        let m = Mount::fuse(&fault_injection_bin(), &stack, opts, &mnt).unwrap();
        let root = m.root().to_path_buf();
        fs::write(root.join("u-pt"), "upper").unwrap();
        let steps: [(&str, &str, bool, Step); 2] = [
            ("write", "write to an upper file", bypass, |r| {
                let mut f = fs::OpenOptions::new().write(true).open(r.join("u-pt"))?;
                f.write_all(b"written")
            }),
            ("read", "O_DIRECT read of a lower file", false, |r| {
                direct(r.join("lower-read"), false)?.read_exact(&mut [0u8; 5])
            }),
        ];
        for (op, what, bypass, step) in steps {
            plan(&root, &format!("{op}:1:{EIO}")).expect("plan a fault");
            let r = step(&root);
            plan(&root, "off").expect("drop the plan");
            let ok = match (&r, bypass) {
                (Ok(()), true) => true,
                (Err(e), false) => e.raw_os_error() == Some(EIO),
                _ => false,
            };
            if !ok {
                let want = if bypass {
                    "success (passthrough)"
                } else {
                    "EIO (the daemon's fault)"
                };
                problems.push(format!("-o {opts:?}: {what}: got {r:?}, want {want}"));
            }
        }
        let want = if bypass { "written" } else { "upper" };
        match fs::read_to_string(root.join("u-pt")) {
            Ok(got) if got == want => {}
            other => problems.push(format!("-o {opts:?}: u-pt holds {other:?}, want {want:?}")),
        }
        m.unmount().unwrap();
    }
    println!("passthrough offered by this kernel: {offered}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A read-only mount (no upper layer, or `ro`: the snapshotter's views, BuildKit's reads of
/// an active snapshot) copies nothing up, so lower files are passed through too (as
/// fuse-overlayfs 2.0 does): with the daemon's next read planned to fail, reading a 4 MiB
/// lower file on a fresh mount still succeeds, the daemon never asked. With `passthrough=0`,
/// a writable mount, or a kernel without passthrough, the daemon reads it and the read fails.
/// (Counting the daemon's read bytes cannot tell: it answers large reads by splice(2), which
/// /proc/PID/io does not count.)
#[test]
fn reads_of_lower_files_go_around_the_daemon_in_read_only_mounts() {
    if !env::require_bin_under_test() || !env::require_fault_injection_bin() {
        return;
    }
    const SIZE: usize = 4 << 20;
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let offered = kernel_has_passthrough();
    let mut problems = Vec::new();
    for (upper, opts, bypass) in [
        (false, &[][..], offered),
        (true, &["ro"][..], offered),
        (false, &["passthrough=0"][..], false),
        (true, &[][..], false),
    ] {
        let s = scratch("passthrough-ro");
        let tree = Tree::new().lower(Layer::new().file("big", data.clone()));
        let Materialized { mut stack, mnt } = tree.materialize(s.path()).unwrap();
        if !upper {
            stack.upper = None;
            stack.work = None;
        }
        // Planned at start: a read-only mount takes no xattr.
        let fault = format!("read:1:{EIO}");
        let m = Mount::fuse_env(
            &fault_injection_bin(),
            &stack,
            opts,
            &mnt,
            &[("RUSTFUSE_FAULT", &fault)],
        )
        .unwrap();
        let what = format!("upper {upper}, -o {opts:?}");
        // O_DIRECT: a page-cache read that fails is tried again by the kernel, a page at a
        // time. The buffer is page-aligned for a passthrough read, which the lower
        // filesystem serves directly.
        let read = || {
            let f = direct(m.root().join("big"), false)?;
            let mut buf = memmap2::MmapMut::map_anon(SIZE + 4096)?;
            let mut n = 0;
            loop {
                match f.read_at(&mut buf[n..], n as u64)? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok::<_, std::io::Error>(buf[..n].to_vec())
        };
        let r = read();
        match (&r, bypass) {
            (Ok(seen), true) if *seen == data => {}
            (Ok(seen), true) => {
                problems.push(format!("{what}: read {} bytes, not the file", seen.len()))
            }
            // The plan is spent: the next read is the daemon's, and whole.
            (Err(e), false) if e.raw_os_error() == Some(EIO) => match read() {
                Ok(seen) if seen == data => {}
                r => problems.push(format!(
                    "{what}: read after the fault: {:?}",
                    r.map(|s| s.len())
                )),
            },
            _ => problems.push(format!(
                "{what}: read with the daemon's next read planned to fail: {:?}; want {}",
                r.as_ref().map(|s| s.len()),
                if bypass {
                    "the file (passthrough)"
                } else {
                    "EIO (the daemon reads it)"
                }
            )),
        }
        m.unmount().unwrap();
    }
    println!("passthrough offered by this kernel: {offered}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
