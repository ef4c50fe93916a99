//! Command line: bad input is refused with a one-line message naming the option and the path
//! and a non-zero exit, before anything is mounted; unknown options only warn; `-V` prints a
//! version; exit 0 means the mount is already live.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustfuse_tests::env::{CmdOutput, OP_DEADLINE, bin_under_test, run_command, scratch};
use rustfuse_tests::mount::{Mount, mount_at};

struct Dirs {
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
}

fn dirs(base: &Path) -> Dirs {
    let d = Dirs {
        lower: base.join("lower"),
        upper: base.join("upper"),
        work: base.join("work"),
        mnt: base.join("mnt"),
    };
    for p in [&d.lower, &d.upper, &d.work, &d.mnt] {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(d.lower.join("hello"), "merged content").unwrap();
    d
}

/// Runs the binary under test; if it left a mount at `mnt`, takes charge of it (so it is
/// unmounted) and returns it.
fn run(args: &[OsString], mnt: &Path) -> (CmdOutput, Option<Mount>) {
    let out = run_command(Command::new(bin_under_test()).args(args), OP_DEADLINE)
        .unwrap_or_else(|e| panic!("{e}"));
    let mnt = mnt.canonicalize().unwrap();
    let m = mount_at(&mnt)
        .filter(|m| m.fstype.starts_with("fuse"))
        .map(|m| Mount::adopt(&mnt, m.dev.1));
    (out, m)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Asserts a refusal: non-zero exit, one line on stderr naming `words`, nothing mounted.
fn assert_refused(case: &str, out: &CmdOutput, mounted: Option<Mount>, words: &[&str]) {
    let mut problems = Vec::new();
    if mounted.is_some() {
        problems.push("something was mounted".to_string());
    }
    drop(mounted);
    if out.status.success() {
        problems.push("exit status 0".into());
    }
    // Warnings about ignored options (`unknown argument ignored: X`) may precede the error.
    let err: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("unknown argument ignored"))
        .collect();
    if err.len() != 1 {
        problems.push(format!("stderr has {} error lines, want 1", err.len()));
    }
    let err = err.join("\n");
    for w in words {
        if !err.contains(w) {
            problems.push(format!("stderr does not name {w:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{case}: {}\nexit {}\nstderr:\n{}",
        problems.join("; "),
        out.code(),
        out.stderr
    );
}

fn ready() -> bool {
    rustfuse_tests::env::require_bin_under_test()
}

#[test]
fn missing_lowerdir() {
    if !ready() {
        return;
    }
    let s = scratch("cli-nolower");
    let d = dirs(s.path());
    let opts = format!(
        "upperdir={},workdir={}",
        d.upper.display(),
        d.work.display()
    );
    let (out, m) = run(&os(&["-o", &opts, d.mnt.to_str().unwrap()]), &d.mnt);
    assert_refused("missing lowerdir", &out, m, &["lowerdir"]);
}

#[test]
fn nonexistent_lowerdir() {
    if !ready() {
        return;
    }
    let s = scratch("cli-badlower");
    let d = dirs(s.path());
    let missing = s.path().join("does-not-exist");
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        d.lower.display(),
        missing.display(),
        d.upper.display(),
        d.work.display()
    );
    let (out, m) = run(&os(&["-o", &opts, d.mnt.to_str().unwrap()]), &d.mnt);
    assert_refused(
        "nonexistent lowerdir",
        &out,
        m,
        &["lowerdir", missing.to_str().unwrap()],
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

#[test]
fn workdir_on_another_filesystem() {
    if !ready() {
        return;
    }
    let s = scratch("cli-xdev");
    let d = dirs(s.path());
    let t = s.path().join("tmpfs");
    std::fs::create_dir(&t).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &t,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        Some(c"size=4m"),
    )
    .expect("mount tmpfs");
    let _t = Tmpfs(t.clone());
    let work = t.join("work");
    std::fs::create_dir(&work).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d.lower.display(),
        d.upper.display(),
        work.display()
    );
    let (out, m) = run(&os(&["-o", &opts, d.mnt.to_str().unwrap()]), &d.mnt);
    assert_refused(
        "workdir on another filesystem",
        &out,
        m,
        &["workdir", work.to_str().unwrap()],
    );
}

#[test]
fn conflicting_squash_options() {
    if !ready() {
        return;
    }
    let s = scratch("cli-squash");
    let d = dirs(s.path());
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},squash_to_root,squash_to_uid=1",
        d.lower.display(),
        d.upper.display(),
        d.work.display()
    );
    let (out, m) = run(&os(&["-o", &opts, d.mnt.to_str().unwrap()]), &d.mnt);
    assert_refused("squash_to_root + squash_to_uid", &out, m, &["squash_to"]);
}

#[test]
fn unknown_option_warns_but_mounts() {
    if !ready() {
        return;
    }
    let s = scratch("cli-unknown");
    let d = dirs(s.path());
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},frobnicate=1,,context=\"system_u:object_r:container_file_t:s0:c1,c2\"",
        d.lower.display(),
        d.upper.display(),
        d.work.display()
    );
    let (out, m) = run(&os(&["-o", &opts, d.mnt.to_str().unwrap()]), &d.mnt);
    assert!(out.status.success(), "exit {}: {}", out.code(), out.stderr);
    assert!(m.is_some(), "nothing mounted");
    assert!(
        out.stderr.contains("frobnicate"),
        "no warning naming the unknown option: {:?}",
        out.stderr
    );
    m.unwrap().unmount().unwrap();
}

#[test]
fn version_flag() {
    if !ready() {
        return;
    }
    let out = run_command(Command::new(bin_under_test()).arg("-V"), OP_DEADLINE).unwrap();
    assert!(
        out.status.success(),
        "-V exit {}: {}",
        out.code(),
        out.stderr
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.to_lowercase().contains("version") && text.chars().any(|c| c.is_ascii_digit()),
        "-V printed no version: {text:?}"
    );
}

#[test]
fn exit_zero_means_mount_is_live() {
    if !ready() {
        return;
    }
    for i in 0..5 {
        let s = scratch("cli-live");
        let d = dirs(s.path());
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            d.lower.display(),
            d.upper.display(),
            d.work.display()
        );
        let (out, m) = run(&os(&["-o", &opts, d.mnt.to_str().unwrap()]), &d.mnt);
        assert!(out.status.success(), "exit {}: {}", out.code(), out.stderr);
        // No polling: right after exit the merged content must be there.
        let content = std::fs::read_to_string(d.mnt.join("hello"));
        let m = m.unwrap_or_else(|| panic!("round {i}: exit 0 but no mount in mountinfo"));
        assert_eq!(
            content.ok().as_deref(),
            Some("merged content"),
            "round {i}: mount not live when the command returned"
        );
        m.unmount().unwrap();
    }
}

#[test]
fn containerd_style_arguments() {
    // mount.fuse3 runs `NAME SOURCE TARGET -o OPTS`; -o may repeat; the last positional is the
    // mount point.
    if !ready() {
        return;
    }
    let s = scratch("cli-containerd");
    let d = dirs(s.path());
    let args = vec![
        OsString::from("overlay"),
        d.mnt.clone().into(),
        "-o".into(),
        format!(
            "workdir={},upperdir={}",
            d.work.display(),
            d.upper.display()
        )
        .into(),
        "-o".into(),
        format!("lowerdir={},dev,suid,rw", d.lower.display()).into(),
    ];
    let (out, m) = run(&args, &d.mnt);
    assert!(out.status.success(), "exit {}: {}", out.code(), out.stderr);
    let m = m.expect("mounted");
    assert_eq!(
        std::fs::read_to_string(d.mnt.join("hello")).ok().as_deref(),
        Some("merged content")
    );
    m.unmount().unwrap();
}
