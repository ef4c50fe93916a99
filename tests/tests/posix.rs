//! Cases from an external POSIX conformance run, each against kernel overlayfs as the oracle:
//! the modes of new entries under the caller's umask (a short name, a 255-byte name, a path of
//! 4095 bytes, a directory, a fifo), and renames by a caller who owns neither the entry nor
//! its directories (uid 65534 in root-owned 0777 directories: a root-owned 0700 directory
//! renamed within its parent and back, a root-owned 0644 file moved between two directories),
//! on entries made through the mount and on entries of a lower layer.
//!
//! The commands run in `sh` (and `perl` for bare rename(2)) as the caller would, so the
//! caller's umask and credentials are the real ones.

use std::path::Path;
use std::process::Command;

use rustfuse_tests::env::{
    OP_DEADLINE, bin_under_test, require_bin_under_test, run_command, scratch,
};
use rustfuse_tests::layers::{Layer, Tree};
use rustfuse_tests::mount::Mount;
use rustfuse_tests::scenario::snap;
use rustfuse_tests::snapshot::diff;

/// Lower-layer entries the renames work on too (made by root).
fn tree() -> Tree {
    Tree::new().lower(
        Layer::new()
            .dir("ltop")
            .mode(0o777)
            .dir("ltop/sub")
            .mode(0o700)
            .dir("ld1")
            .mode(0o777)
            .dir("ld2")
            .mode(0o777)
            .file("ld1/f", "f")
            .mode(0o644),
    )
}

const LONG_DIR: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";

/// 20 directories of 200 bytes and their slashes, then a file name: 4095 bytes in all.
fn long_path() -> (String, String) {
    let dirs = vec![LONG_DIR; 20].join("/");
    let file = "f".repeat(4095 - dirs.len() - 1);
    (dirs, file)
}

/// As root: new entries under two umasks (0620 and 0642 files, 0750 directories, fifos),
/// names up to 255 bytes and a path of 4095 bytes; then the entries the renames use, their
/// modes from the umask as the conformance run made them (mkdir(2) with 0777 under umask 0:
/// a daemon applying its own umask made that 0755, and the renames by uid 65534 failed).
fn create_script() -> String {
    let name255 = "n".repeat(255);
    let (dirs, file) = long_path();
    format!(
        "set -e
umask 157; : > short; : > {name255}; mkfifo fifo620; mkdir dir620
umask 135; : > short642; mkdir -p {dirs}; : > {dirs}/{file}
umask 027; mkdir d750
umask 0; mkdir top d1 d2
umask 077; mkdir top/sub
umask 022; echo f > d1/f
stat -c %a {dirs}/{file}
"
    )
}

/// As uid 65534: rename(2) each pair and print what it answered.
const RENAMES: &str = r#"
for my $p (["top/sub", "top/sub2"], ["top/sub2", "top/sub"], ["d1/f", "d2/f"],
           ["ltop/sub", "ltop/sub2"], ["ltop/sub2", "ltop/sub"], ["ld1/f", "ld2/f"]) {
    my $r = rename($p->[0], $p->[1]) ? "ok" : "$!";
    print "$p->[0] -> $p->[1]: $r\n";
}
"#;

/// `tree` materialized under `base/side` and mounted there: kernel overlayfs for side
/// `kernel`, else rustfuse with `fuse_opts`; uid 65534 can reach the mount point.
fn mount_side(base: &Path, side: &str, tree: &Tree, fuse_opts: &[&str]) -> Mount {
    let m = tree.materialize(&base.join(side)).expect("materialize");
    for d in [base, &base.join(side)] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    match side {
        "kernel" => Mount::kernel(&m.stack, &m.mnt),
        _ => Mount::fuse(&bin_under_test(), &m.stack, fuse_opts, &m.mnt),
    }
    .unwrap_or_else(|e| panic!("{side}: {e}"))
}

fn sh(dir: &Path, uid: Option<u32>, program: &str, script: &str) -> String {
    let mut cmd = match uid {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={u}"))
                .arg(format!("--regid={u}"))
                .arg("--clear-groups")
                .arg(program);
            c
        }
        None => Command::new(program),
    };
    let flag = if program == "perl" { "-e" } else { "-c" };
    cmd.arg(flag).arg(script).current_dir(dir);
    let out = run_command(&mut cmd, OP_DEADLINE).unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} in {}: {}",
        dir.display(),
        out.report()
    );
    out.stdout
}

/// Kernel overlayfs and rustfuse: the same modes for every new entry, the same answer to
/// every rename by a caller who owns nothing, and the same tree at the end.
#[test]
fn umask_modes_and_renames_by_another_user_match_the_kernel() {
    if !require_bin_under_test() {
        return;
    }
    let s = scratch("posix");
    let mut views = Vec::new();
    for side in ["kernel", "rustfuse"] {
        let g = mount_side(s.path(), side, &tree(), &["allow_other"]);
        let long_mode = sh(g.root(), None, "sh", &create_script());
        let renames = sh(g.root(), Some(65534), "perl", RENAMES);
        views.push((side, renames, snap(g.root()), long_mode));
        g.unmount().unwrap();
    }
    let (k, r) = (&views[0], &views[1]);
    assert_eq!(
        r.1, k.1,
        "renames as uid 65534: rustfuse vs kernel overlayfs"
    );
    for v in &views {
        assert_eq!(
            v.3.trim(),
            "642",
            "{}: mode of the file at a 4095-byte path",
            v.0
        );
    }
    let d = diff(&k.2, "kernel overlayfs", &r.2, "rustfuse");
    assert!(d.is_empty(), "trees differ:\n{}", d.join("\n"));
    // What the kernel shows is what POSIX asks for.
    let mode = |p: &str| k.2.entries.get(p).map(|e| e.mode).unwrap_or(0);
    assert_eq!(mode("short"), 0o620);
    assert_eq!(mode(&"n".repeat(255)), 0o620);
    assert_eq!(mode("dir620"), 0o620);
    assert_eq!(mode("d750"), 0o750);
    assert_eq!(mode("short642"), 0o642);
    assert_eq!(mode("top"), 0o777);
    assert_eq!(mode("top/sub"), 0o700);
    assert_eq!(mode("d2/f"), 0o644);
}

/// Set-id bits and file capabilities a write, a truncate, an `O_TRUNC` open and a chown
/// leave, by root and by a caller without CAP_FSETID (uid 65534), on files made through the
/// mount and on lower files (copied up by the change).
const SETID_ROOT: &str = "set -e
for f in suid sgidx sgid trunc otrunc rootw caps chown chownr; do echo x > $f; done
chmod 4777 suid trunc otrunc rootw caps; chmod 2777 sgidx; chmod 2767 sgid; chmod 6777 chown chownr
setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= caps
getfattr -n security.capability caps >/dev/null && echo caps set
";
const SETID_USER: &str = "set -e
echo y >> suid; echo y >> sgidx; echo y >> sgid; truncate -s 1 trunc; : > otrunc
echo y >> lsuid; echo y >> lsgidx; truncate -s 0 ltrunc
";
const SETID_AFTER: &str = "set -e
echo y >> rootw; echo y >> caps; chown 5:5 chown lchown; chown 0:0 chownr
getfattr -n security.capability caps >/dev/null 2>&1 && echo caps kept || echo caps dropped
stat -c '%n %a %s %u' suid sgidx sgid trunc otrunc rootw caps chown chownr lsuid lsgidx ltrunc lchown
";

/// Kernel overlayfs and rustfuse (with passthrough where the kernel offers it, and without,
/// where HANDLE_KILLPRIV_V2 leaves the set-id bits to the daemon): the same modes after
/// every change, as the caller saw them right away.
#[test]
fn setid_bits_after_writes_truncates_and_chowns_match_the_kernel() {
    if !require_bin_under_test() {
        return;
    }
    let s = scratch("posix-setid");
    let lower = || {
        Tree::new().lower(
            Layer::new()
                .file("lsuid", "x")
                .mode(0o4777)
                .file("lsgidx", "x")
                .mode(0o2777)
                .file("ltrunc", "x")
                .mode(0o4777)
                .file("lchown", "x")
                .mode(0o6755),
        )
    };
    let mut outs = Vec::new();
    for (side, opts) in [
        ("kernel", &[][..]),
        ("rustfuse", &["allow_other"][..]),
        ("rustfuse-nopt", &["allow_other", "passthrough=0"][..]),
    ] {
        let g = mount_side(s.path(), side, &lower(), opts);
        let mut out = sh(g.root(), None, "sh", SETID_ROOT);
        sh(g.root(), Some(65534), "sh", SETID_USER);
        out += &sh(g.root(), None, "sh", SETID_AFTER);
        outs.push((side, out));
        g.unmount().unwrap();
    }
    let kernel = &outs[0].1;
    // What the kernel shows: a write or truncate by uid 65534 drops set-user-id, and
    // set-group-id too (group-executable, or 65534 not of the file's group); root's write
    // keeps both; a write drops file capabilities whoever writes; chown drops set-user-id
    // even to the same owner, and set-group-id where group-executable.
    assert!(
        kernel.contains("caps set\ncaps dropped\n"),
        "kernel: {kernel}"
    );
    for line in [
        "suid 777 4 0",
        "sgidx 777 4 0",
        "trunc 777 1 0",
        "otrunc 777 0 0",
        "rootw 4777 4 0",
        "chown 777 2 5",
        "chownr 777 2 0",
        "lsuid 777 3 0",
        "lsgidx 777 3 0",
        "ltrunc 777 0 0",
        "lchown 755 1 5",
    ] {
        assert!(
            kernel.contains(&format!("{line}\n")),
            "kernel: no `{line}` in {kernel}"
        );
    }
    for (side, out) in &outs[1..] {
        if *side == "rustfuse" {
            // One known difference, with passthrough (root, Linux 6.9+) only: the kernel's
            // FUSE module drops set-id bits on those writes itself, by its older rule, which
            // keeps a set-group-id bit without group-execute (docs/compatibility.md).
            let lines = |o: &str| -> Vec<String> {
                o.lines()
                    .filter(|l| !l.starts_with("sgid "))
                    .map(String::from)
                    .collect()
            };
            assert_eq!(lines(out), lines(kernel), "{side} vs kernel overlayfs");
        } else {
            assert_eq!(out, kernel, "{side} vs kernel overlayfs");
        }
    }
}
