//! Lifecycle as callers see it: how the daemon is started (directly, through `mount.fuse3`
//! like containerd, as `fuse-overlayfs` like containers/storage, with a `/dev/fd/N` mount
//! point), what it prints (`--version`), that it lets go of the caller's pipes, that a read-only
//! mount refuses writes with EROFS, and that `fusermount3 -u` and `umount -l` end it.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustfuse_tests::env::{
    self, OP_DEADLINE, bin_alias, bin_under_test, path_with, run_command, scratch, skip,
    with_deadline,
};
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::mount::{MOUNT_DEADLINE, Mount, mount_at};
use rustfuse_tests::ops::{self, build};

const MOUNT_FUSE3: &str = "/sbin/mount.fuse3";

fn tree() -> Tree {
    Tree::new().lower(
        Layer::new()
            .file("hello", "from lower")
            .dir("d")
            .file("d/inner", "inner"),
    )
}

fn materialize(s: &env::Scratch) -> Materialized {
    let mut m = tree().materialize(s.path()).expect("materialize");
    m.mnt = m.mnt.canonicalize().unwrap();
    m
}

fn mount(m: &Materialized) -> Mount {
    Mount::fuse(&bin_under_test(), &m.stack, &[], &m.mnt).unwrap_or_else(|e| panic!("mount: {e}"))
}

/// Reads and writes through the mount, each with a deadline.
fn assert_works(root: &Path) {
    let got = ops::run(
        root,
        &[
            build::read("hello"),
            build::write("new", "written"),
            build::read("new"),
            build::append("hello", "+"),
            build::read("hello"),
        ],
    );
    let shown: Vec<String> = got.iter().map(ops::show).collect();
    assert_eq!(
        shown,
        [
            "ok: \"from lower\"",
            "ok",
            "ok: \"written\"",
            "ok",
            "ok: \"from lower+\""
        ],
        "reads and writes through {}",
        root.display()
    );
}

fn run_ok(cmd: &mut Command) {
    let what = format!("{cmd:?}");
    let out = run_command(cmd, OP_DEADLINE).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{what}: exit {}: {}",
        out.code(),
        out.stderr.trim()
    );
}

#[test]
fn fusermount3_u_ends_the_daemon() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("life-fusermount");
    let m = materialize(&s);
    let mut g = mount(&m);
    assert!(g.daemon_pid().is_some(), "daemon process not found");
    assert_works(g.root());
    run_ok(Command::new("fusermount3").arg("-u").arg(&m.mnt));
    g.wait_gone(MOUNT_DEADLINE)
        .unwrap_or_else(|e| panic!("fusermount3 -u: {e}"));
    // What was written is in the upper layer.
    assert_eq!(
        std::fs::read_to_string(m.stack.upper.as_ref().unwrap().join("new")).unwrap(),
        "written"
    );
}

#[test]
fn lazy_umount_ends_the_daemon_once_the_last_file_is_closed() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("life-lazy");
    let m = materialize(&s);
    let mut g = mount(&m);
    let pid = g.daemon_pid().expect("daemon process not found");
    let mut open = std::fs::File::open(m.mnt.join("hello")).unwrap();
    run_ok(Command::new("umount").arg("-l").arg(&m.mnt));
    assert!(
        mount_at(&m.mnt).is_none(),
        "still in mountinfo after umount -l"
    );
    // The open file keeps the filesystem alive, and still reads.
    let mut buf = String::new();
    let (n, buf) = with_deadline(OP_DEADLINE, "read after umount -l", move || {
        let n = open.read_to_string(&mut buf);
        (n.map_err(|e| e.to_string()), buf)
    });
    assert_eq!(n, Ok(10));
    assert_eq!(buf, "from lower");
    // `open` was moved into the closure and is closed now: the daemon must go.
    g.wait_gone(MOUNT_DEADLINE)
        .unwrap_or_else(|e| panic!("umount -l (daemon pid {pid}): {e}"));
}

/// containerd mounts type `fuse3.rustfuse` by running
/// `mount.fuse3 SOURCE TARGET -o OPTS -t rustfuse`; mount.fuse3 finds `rustfuse` on PATH.
#[test]
fn containerd_mount_fuse3_helper() {
    if !env::require_bin_under_test() {
        return;
    }
    if !Path::new(MOUNT_FUSE3).exists() {
        skip("mount.fuse3 missing (apt-get install fuse3)");
        return;
    }
    let s = scratch("life-mountfuse3");
    let m = materialize(&s);
    let alias = bin_alias(s.path(), "rustfuse");
    let path = path_with(alias.parent().unwrap());
    let args: Vec<OsString> = vec![
        "overlay".into(),
        m.mnt.clone().into(),
        "-o".into(),
        format!("{},rw", m.stack.options()).into(),
        "-t".into(),
        "rustfuse".into(),
    ];
    let mut g = Mount::fuse_args(Path::new(MOUNT_FUSE3), &args, &m.mnt, &[("PATH", &path)])
        .unwrap_or_else(|e| panic!("mount.fuse3: {e}"));
    let info = mount_at(&m.mnt).unwrap();
    assert_eq!(info.fstype, "fuse.rustfuse");
    assert!(g.daemon_pid().is_some(), "daemon process not found");
    assert_works(g.root());
    run_ok(Command::new("fusermount3").arg("-u").arg(&m.mnt));
    g.wait_gone(MOUNT_DEADLINE).unwrap();
}

/// `mount -t fuse.rustfuse overlay MNT -o ...` through mount(8), which runs /sbin/mount.fuse
/// (= mount.fuse3) with a sanitized environment: the program must be on the default PATH, so
/// this runs in a private mount namespace with the binary bind-mounted into /usr/local/sbin.
/// `mount -t fuse3.rustfuse` needs a mount.fuse3 that strips the `fuse3.` prefix (newer
/// than Debian 12's 3.14): tried too, only reported when this mount.fuse3 cannot do it.
#[test]
fn mount8_with_fuse_type() {
    if !env::require_bin_under_test() {
        return;
    }
    for tool in [MOUNT_FUSE3, "/usr/bin/unshare"] {
        if !Path::new(tool).exists() {
            skip(&format!("{tool} missing"));
            return;
        }
    }
    let s = scratch("life-mount8");
    let m = materialize(&s);
    let alias = bin_alias(s.path(), "rustfuse");
    let script = r#"
set -u
BIN="$1"; MNT="$2"; OPTS="$3"
mount --make-rprivate / || exit 90
mount --bind "$BIN" /usr/local/sbin || exit 91
for t in fuse.rustfuse fuse3.rustfuse; do
  if ! out=$(mount -t "$t" overlay "$MNT" -o "$OPTS" 2>&1); then
    echo "$t: mount failed: $out"
    continue
  fi
  grep " $MNT " /proc/self/mountinfo | sed "s/^/$t: /"
  echo "$t: content: $(cat "$MNT/hello")"
  fusermount3 -u "$MNT" || umount -l "$MNT"
done
"#;
    let out = run_command(
        Command::new("unshare")
            .args(["-m", "sh", "-c", script, "sh"])
            .arg(alias.parent().unwrap())
            .arg(&m.mnt)
            .arg(m.stack.options()),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}{}", out.stdout, out.stderr);
    assert!(out.status.success(), "exit {}", out.code());
    assert!(
        out.stdout.contains("fuse.rustfuse: content: from lower"),
        "mount -t fuse.rustfuse did not work:\n{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("fuse.rustfuse: ") && l.contains(" - fuse.rustfuse ")),
        "mountinfo does not show type fuse.rustfuse:\n{}",
        out.stdout
    );
    if out.stdout.contains("fuse3.rustfuse: content: from lower") {
        return;
    }
    let unsupported = out.stdout.contains("fuse3.rustfuse: not found");
    assert!(
        unsupported,
        "mount -t fuse3.rustfuse failed for another reason than mount.fuse3 not knowing the fuse3. prefix:\n{}",
        out.stdout
    );
    eprintln!(
        "note: this mount.fuse3 runs the program `fuse3.rustfuse` for type fuse3.rustfuse \
         (it strips only `fuse.`): `mount -t fuse3.rustfuse` cannot work here whatever the \
         program does; containerd calls mount.fuse3 with `-t rustfuse` (tested separately)"
    );
}

/// mount.fuse3's `drop_privileges` opens /dev/fuse and mounts itself, then runs the program
/// with the mount point `/dev/fd/N` and no capabilities.
#[test]
fn dev_fd_mountpoint_through_mount_fuse3_drop_privileges() {
    if !env::require_bin_under_test() {
        return;
    }
    if !Path::new(MOUNT_FUSE3).exists() {
        skip("mount.fuse3 missing (apt-get install fuse3)");
        return;
    }
    let helper = std::fs::read(MOUNT_FUSE3).unwrap_or_default();
    if !helper.windows(15).any(|w| w == b"drop_privileges") {
        eprintln!("SKIPPED: this mount.fuse3 has no drop_privileges option (no /dev/fd/N case)");
        return;
    }
    let s = scratch("life-devfd");
    let m = materialize(&s);
    let alias = bin_alias(s.path(), "rustfuse");
    let path = path_with(alias.parent().unwrap());
    let lower = m.stack.lowers[0].display().to_string();
    let args: Vec<OsString> = vec![
        "overlay".into(),
        m.mnt.clone().into(),
        "-o".into(),
        format!("drop_privileges,lowerdir={lower}").into(),
        "-t".into(),
        "rustfuse".into(),
    ];
    let g = Mount::fuse_args(Path::new(MOUNT_FUSE3), &args, &m.mnt, &[("PATH", &path)])
        .unwrap_or_else(|e| panic!("mount.fuse3 -o drop_privileges: {e}"));
    // The daemon really got a /dev/fd/N mount point.
    let cmdlines: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&lower))
        .collect();
    assert!(
        cmdlines.iter().any(|c| c.contains(" /dev/fd/")),
        "no daemon running with a /dev/fd/N mount point: {cmdlines:?}"
    );
    let got = ops::run(
        g.root(),
        &[
            build::read("hello"),
            build::read("d/inner"),
            build::create("x"),
        ],
    );
    let shown: Vec<String> = got.iter().map(ops::show).collect();
    assert_eq!(shown, ["ok: \"from lower\"", "ok: \"inner\"", "EROFS"]);
    g.unmount().unwrap();
}

/// containers/storage runs `fuse-overlayfs -o lowerdir=...,upperdir=...,workdir=...,,volatile
/// MERGED` (an empty option between two commas; lower layers are `l/ID` symlinks) after
/// `fuse-overlayfs --version`, and unmounts with `fusermount3 -u`.
#[test]
fn fuse_overlayfs_alias_as_containers_storage_calls_it() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("life-alias");
    let m = materialize(&s);
    let alias = bin_alias(s.path(), "fuse-overlayfs");
    let out = run_command(Command::new(&alias).arg("--version"), OP_DEADLINE).unwrap();
    assert!(out.status.success(), "fuse-overlayfs --version: {out:?}");
    let l = s.path().join("l");
    std::fs::create_dir(&l).unwrap();
    symlink(&m.stack.lowers[0], l.join("ABCDEF")).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},,volatile",
        l.join("ABCDEF").display(),
        m.stack.upper.as_ref().unwrap().display(),
        m.stack.work.as_ref().unwrap().display()
    );
    let args: Vec<OsString> = vec!["-o".into(), opts.into(), m.mnt.clone().into()];
    let mut g = Mount::fuse_args(&alias, &args, &m.mnt, &[])
        .unwrap_or_else(|e| panic!("fuse-overlayfs alias: {e}"));
    assert_eq!(mount_at(&m.mnt).unwrap().fstype, "fuse.fuse-overlayfs");
    assert!(
        !g.launcher_stderr.to_lowercase().contains("error"),
        "stderr: {}",
        g.launcher_stderr
    );
    assert_works(g.root());
    run_ok(Command::new("fusermount3").arg("-u").arg(&m.mnt));
    g.wait_gone(MOUNT_DEADLINE).unwrap();
    assert_eq!(
        std::fs::read_to_string(m.stack.upper.as_ref().unwrap().join("hello")).unwrap(),
        "from lower+"
    );
}

#[test]
fn version_output() {
    if !env::require_bin_under_test() {
        return;
    }
    let mut outs = Vec::new();
    for flag in ["--version", "-V"] {
        let out = run_command(Command::new(bin_under_test()).arg(flag), OP_DEADLINE).unwrap();
        assert!(
            out.status.success(),
            "{flag}: exit {}: {}",
            out.code(),
            out.stderr
        );
        let has_version = out.stdout.split(|c: char| c.is_whitespace()).any(|w| {
            let parts: Vec<&str> = w.trim_start_matches('v').split('.').collect();
            parts.len() >= 2
                && parts[..2]
                    .iter()
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        });
        assert!(
            has_version,
            "{flag}: no X.Y version number on stdout: {:?}",
            out.stdout
        );
        outs.push(out.stdout);
    }
    assert_eq!(outs[0], outs[1], "--version and -V print different things");
}

/// containerd (and podman) read the mount program's stdout/stderr pipes to EOF after it exits:
/// the detached daemon must not keep them open.
#[test]
fn stdio_pipes_are_closed_when_the_command_returns() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("life-pipes");
    let m = materialize(&s);
    let mut child = Command::new(bin_under_test())
        .arg("-o")
        .arg(m.stack.options())
        .arg(&m.mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > MOUNT_DEADLINE {
            let _ = child.kill();
            panic!("the mount command did not exit within {MOUNT_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Take charge of the mount first, so it is cleaned up whatever happens below.
    let g = mount_at(&m.mnt)
        .filter(|i| i.fstype.starts_with("fuse"))
        .map(|i| Mount::adopt(&m.mnt, i.dev.1));
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (o, e) = with_deadline(
        Duration::from_secs(3),
        "reading the mount command's stdout/stderr to EOF (daemon kept the pipes open?)",
        move || {
            let (mut o, mut e) = (String::new(), String::new());
            let _ = out.read_to_string(&mut o);
            let _ = err.read_to_string(&mut e);
            (o, e)
        },
    );
    assert!(status.success(), "exit {status}: {e}");
    let g = g.expect("exit 0 but nothing mounted");
    assert!(g.daemon_pid().is_some(), "no daemon serving the mount");
    eprintln!("stdout: {o:?}, stderr: {e:?}");
    assert_works(g.root());
    g.unmount().unwrap();
}

/// Every write is refused with EROFS before anything else is checked (as kernel overlayfs
/// without upperdir: `rmdir` of a non-empty directory is EROFS, not ENOTEMPTY).
#[test]
fn read_only_mount_answers_erofs() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("life-ro");
    let mut m = tree().materialize_ro(s.path()).unwrap();
    m.mnt = m.mnt.canonicalize().unwrap();
    let g = mount(&m);
    let got = ops::run(
        g.root(),
        &[
            build::read("hello"),
            build::create("new"),
            build::unlink("hello"),
            build::chmod("hello", 0o600),
            build::chown("hello", 1, 1),
            build::mkdir("nd"),
            build::rename("hello", "moved"),
            build::append("hello", "x"),
            build::truncate("hello", 0),
            build::setxattr("hello", "user.x", "1"),
            build::utimens("hello", 1, 1),
            build::rmdir("d"),
            build::unlink("d/inner"),
            build::symlink("hello", "sl"),
            build::read("hello"),
        ],
    );
    let shown: Vec<String> = got.iter().map(ops::show).collect();
    let mut want = vec!["EROFS".to_string(); shown.len()];
    want[0] = "ok: \"from lower\"".into();
    *want.last_mut().unwrap() = "ok: \"from lower\"".into();
    assert_eq!(shown, want);
    g.unmount().unwrap();
    let left: Vec<PathBuf> = std::fs::read_dir(&m.stack.lowers[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left.len(), 2, "lower layer changed: {left:?}");
}
