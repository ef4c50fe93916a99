//! Rootless snapshotter: `rustfuse-snapshotter` run by a non-root user under RootlessKit
//! (`rootlesskit --net=host --copy-up=/etc --copy-up=/run`), with a rootless containerd in the same
//! namespaces using it as a `[proxy_plugins]` snapshotter (the containerd-worker layout of
//! docs/rootless.md). One script inside RootlessKit runs `rustfuse-snapshotter doctor`, starts
//! the snapshotter and containerd, and drives the snapshots API with `ctr snapshots`:
//! prepare → mounts → mount → write → unmount → commit → prepare child → mounts → mount → modify
//! and delete → unmount → commit → view → mount read-only, all inside that user namespace, in
//! auto mode (kernel overlayfs with `userxattr` where the kernel allows it, rustfuse otherwise)
//! and in FUSE mode (rustfuse through mount.fuse3).
//!
//! Then the snapshotter's conformance suite (the compiled `snapshotter/tests/conformance.rs`
//! binary, found as `conformance_bin` says) runs inside RootlessKit as the same user, with
//! `CI=true` so that no case can skip: its `overlay::` cases after `doctor` shows `--mode auto`
//! picks kernel overlayfs with `userxattr` there, and its `fuse::` cases, all but
//! `ROOTLESS_EXCLUDED` (one reason per case), two at a time.
//!
//! Needs root (to create the user) and the Debian packages rootlesskit, uidmap, containerd,
//! fuse3 (the conformance run needs no containerd). Binaries: `$RUSTFUSE_BIN` (else
//! target/debug/rustfuse) and `$RUSTFUSE_SNAPSHOTTER_BIN` (else `rustfuse-snapshotter` beside
//! the rustfuse binary). If /dev/fuse is not 0666 (Debian's default), the test sets it to 0666
//! so that the user can open it, and says so.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustfuse_tests::buildah::{ensure_user, in_rootlesskit};
use rustfuse_tests::env::{
    Scratch, bin_under_test, dev_fuse_for_everyone, require_bin_under_test, run_command, scratch,
    skip, snapshotter_bin, which, workspace_root,
};

fn sh(script: &str, args: &[&str], deadline: Duration) -> String {
    rustfuse_tests::buildah::sh(script, args, deadline).unwrap_or_else(|e| panic!("{e}"))
}

/// Programs every rootless run needs, with their Debian packages.
const NEEDED: &[(&str, &str)] = &[
    ("rootlesskit", "rootlesskit"),
    ("newuidmap", "uidmap"),
    ("setpriv", "util-linux"),
    ("useradd", "passwd"),
];

/// Root, /dev/fuse usable by the test user, the binaries, and [`NEEDED`] plus `more` on PATH.
fn can_run(more: &[(&str, &str)]) -> bool {
    if !require_bin_under_test() {
        return false;
    }
    if !snapshotter_bin().is_file() {
        return skip(&format!(
            "{} does not exist (cargo build -p rustfuse-snapshotter, or set RUSTFUSE_SNAPSHOTTER_BIN)",
            snapshotter_bin().display()
        ));
    }
    for &(prog, pkg) in NEEDED.iter().chain(more) {
        if which(prog).is_none() {
            return skip(&format!("{prog} not found (Debian package {pkg})"));
        }
    }
    if let Err(e) = dev_fuse_for_everyone("the rootless snapshotter") {
        return skip(&e);
    }
    true
}

/// Runs inside RootlessKit as the user: `$1` = scratch dir, `$2` = --mode.
const INNER: &str = r#"
set -eu
D="$1"; MODE="$2"
export PATH="$D/bin:$PATH"
echo "DOCTOR_BEGIN"
rustfuse-snapshotter doctor --root "$D/snaproot"
echo "DOCTOR_END"
rustfuse-snapshotter --address "$D/snap.sock" --root "$D/snaproot" --mode "$MODE" \
  > "$D/snapshotter.log" 2>&1 &
SP=$!
cat > "$D/containerd.toml" <<EOF
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$D/containerd.sock"
[proxy_plugins]
  [proxy_plugins.rustfuse]
    type = "snapshot"
    address = "$D/snap.sock"
EOF
containerd --config "$D/containerd.toml" > "$D/containerd.log" 2>&1 &
CP=$!
cleanup() {
  umount "$D/m" 2>/dev/null || true
  kill $CP 2>/dev/null || true; wait $CP 2>/dev/null || true
  kill $SP 2>/dev/null || true; wait $SP 2>/dev/null || true
}
trap cleanup EXIT
snap() { ctr --address "$D/containerd.sock" -n rootless snapshots --snapshotter rustfuse "$@"; }
# Ready when a call through containerd reaches the snapshotter: a socket file exists from
# bind(2) on, before its listen(2) (a dial in between is refused).
i=0
until [ -S "$D/containerd.sock" ] && [ -S "$D/snap.sock" ] && snap ls >/dev/null 2>&1; do
  i=$((i+1))
  if [ $i -gt 300 ]; then
    echo "not serving after 30 s"; cat "$D/snapshotter.log" "$D/containerd.log"; exit 1
  fi
  sleep 0.1
done
# What `ctr snapshots mounts` prints, mounted as containerd does: type fuse3.NAME runs
# `mount.fuse3 SRC DST -o OPTS -t NAME` (mount(8) would hand mount.fuse3 `-t fuse3.NAME`).
domount() {
  set -- $1
  case "$3" in
    fuse3.*) mount.fuse3 "$4" "$5" "$6" "$7" -t "${3#fuse3.}" ;;
    *) "$@" ;;
  esac
}
mkdir -p "$D/m"
snap prepare base-a
m=$(snap mounts "$D/m" base-a); echo "MOUNTS base $m"; domount "$m"
echo base > "$D/m/base"; mkdir "$D/m/dir"; echo x > "$D/m/dir/gone"; echo k > "$D/m/dir/kept"
umount "$D/m"
snap commit base base-a
snap prepare child base
m=$(snap mounts "$D/m" child); echo "MOUNTS child $m"; domount "$m"
echo "MOUNTED $(awk -v m="$D/m" '$5 == m { for (i = 7; $i != "-"; i++); print $(i+1) }' /proc/self/mountinfo)"
test "$(cat "$D/m/base")" = base
echo child > "$D/m/new"; rm "$D/m/dir/gone"; echo more >> "$D/m/base"; chmod 0600 "$D/m/dir/kept"
stat -c 'OWNER %u:%g' "$D/m/new"
umount "$D/m"
snap commit child-c child
snap view v child-c
m=$(snap mounts "$D/m" v); echo "MOUNTS view $m"; domount "$m"
echo "VIEW base=$(cat "$D/m/base" | tr '\n' ' ') new=$(cat "$D/m/new") dir=$(ls -A "$D/m/dir" | tr '\n' ' ') kept=$(stat -c %a "$D/m/dir/kept")"
if (echo ro > "$D/m/ro") 2>/dev/null; then echo "the view is writable"; exit 1; fi
umount "$D/m"
snap ls
snap rm v
echo "CYCLE_OK"
"#;

/// The text between the lines `begin` and `end` of `out`.
fn between(out: &str, begin: &str, end: &str) -> String {
    out.split(begin)
        .nth(1)
        .and_then(|r| r.split(end).next())
        .unwrap_or_default()
        .to_string()
}

/// The value of the `NAME:` line of a `rustfuse-snapshotter doctor` report.
fn doctor_field(doctor: &str, name: &str) -> String {
    doctor
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("doctor has no `{name}:` line:\n{doctor}"))
}

/// Checks that `doctor` ran in a user namespace as its root and chose a mode; returns the
/// `mode:` line (`overlay (...)` or `fuse (...)`).
fn check_doctor(doctor: &str) -> String {
    assert_eq!(doctor_field(doctor, "user namespace"), "yes", "{doctor}");
    assert_eq!(doctor_field(doctor, "effective uid"), "0", "{doctor}");
    let mode = doctor_field(doctor, "mode");
    assert!(
        mode.starts_with("overlay") || mode.starts_with("fuse"),
        "doctor reports no mode:\n{doctor}"
    );
    mode
}

/// A scratch directory owned by the test user (created if need be), with `bins` copied to
/// `bin/` under the given names. Returns the directory and the user's uid.
fn user_scratch(name: &str, bins: &[(PathBuf, &str)]) -> (Scratch, u32) {
    let uid = ensure_user().unwrap_or_else(|e| panic!("{e}"));
    let s = scratch(name);
    let d = s.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (src, name) in bins {
        std::fs::copy(src, bin.join(name))
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), bin.display()));
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    sh(
        r#"chown -R "$1" "$2""#,
        &[&uid.to_string(), d.to_str().unwrap()],
        Duration::from_secs(10),
    );
    (s, uid)
}

fn run_cycle(mode: &str) {
    if !can_run(&[
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("mount.fuse3", "fuse3"),
    ]) {
        return;
    }
    let (s, uid) = user_scratch(
        &format!("rootless-snap-{mode}"),
        &[
            (bin_under_test(), "rustfuse"),
            (snapshotter_bin(), "rustfuse-snapshotter"),
        ],
    );
    let d = s.path();
    let out = run_command(
        in_rootlesskit(d, "rootlesskit", &[])
            .args(["sh", "-c", INNER, "sh"])
            .arg(d)
            .arg(mode),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let logs = || {
        format!(
            "stdout:\n{}\nstderr:\n{}\nsnapshotter.log:\n{}\ncontainerd.log (tail):\n{}",
            out.stdout,
            out.stderr,
            std::fs::read_to_string(d.join("snapshotter.log")).unwrap_or_default(),
            std::fs::read_to_string(d.join("containerd.log"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    assert!(
        out.status.success() && out.stdout.contains("CYCLE_OK"),
        "the rootless cycle in {mode} mode failed (exit {}):\n{}",
        out.code(),
        logs()
    );
    eprintln!("{}", out.stdout);
    let line = |prefix: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line:\n{}", logs()))
            .trim()
            .to_string()
    };
    // doctor inside RootlessKit: a user namespace, euid 0 there, and a mode.
    let doctor = between(&out.stdout, "DOCTOR_BEGIN", "DOCTOR_END");
    let auto_mode = check_doctor(&doctor);
    eprintln!("doctor inside RootlessKit: mode {auto_mode}");

    // The first snapshot is a bind mount; the child is overlay or FUSE as the mode says.
    assert!(line("MOUNTS base ").contains("-t bind"), "{}", logs());
    let child = line("MOUNTS child ");
    let mounted = line("MOUNTED ");
    let want_fuse = mode == "fuse" || auto_mode.starts_with("fuse");
    if want_fuse {
        assert!(child.contains("-t fuse3.rustfuse"), "{child}");
        assert_eq!(mounted, "fuse.rustfuse", "mounted filesystem type");
    } else {
        assert!(
            child.contains("-t overlay") && child.contains("userxattr"),
            "{child}"
        );
        assert_eq!(mounted, "overlay", "mounted filesystem type");
    }
    assert_eq!(
        line("OWNER "),
        "0:0",
        "owner of a new file in the namespace"
    );
    assert_eq!(
        line("VIEW "),
        "base=base more  new=child dir=kept  kept=600",
        "the committed child seen through a view"
    );

    // Seen from outside: the child layer holds the whiteout of dir/gone (a 0/0 character
    // device), owned by the user, and the parent layer still holds the file.
    let snaps = d.join("snaproot/snapshots");
    let mut whiteouts = 0;
    let mut files = 0;
    for e in std::fs::read_dir(&snaps).unwrap().flatten() {
        let p = e.path().join("fs/dir/gone");
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        assert_eq!(md.uid(), uid, "{} owner", p.display());
        if md.file_type().is_char_device() && md.rdev() == 0 {
            whiteouts += 1;
        } else if md.is_file() {
            files += 1;
        }
    }
    assert_eq!(
        (files, whiteouts),
        (1, 1),
        "dir/gone in the layers under {}",
        snaps.display()
    );
}

#[test]
fn rootlesskit_snapshotter_auto_mode() {
    run_cycle("auto");
}

#[test]
fn rootlesskit_snapshotter_fuse_mode() {
    run_cycle("fuse");
}

// ---------------------------------------------------------------------------------------
// The snapshotter's conformance suite (snapshotter/tests/conformance.rs) as root in a user
// namespace: the compiled test binary runs inside RootlessKit as the test user, with CI=true
// so that a case that cannot run there fails instead of printing SKIPPED.

/// Conformance cases that cannot hold in a user namespace, one reason each. Names are the
/// test names of the conformance binary.
const ROOTLESS_EXCLUDED: &[(&str, &str)] = &[(
    "overlay::e09_hard_links_across_layers",
    "kernel overlayfs encodes a copy-up origin only with CAP_DAC_READ_SEARCH in the initial \
     namespace, so in a user namespace `ln` of a lower file gives the old name the lower inode \
     number and the new name the upper one until remount (seen by hand with unshare -Urm; a \
     property of any overlay mount made in a user namespace, not of the snapshotter); the fuse:: run \
     keeps the case",
)];

/// The conformance test binary: `$RUSTFUSE_CONFORMANCE_BIN`, else the newest
/// `deps/conformance-HASH` under `$CARGO_TARGET_DIR/debug` or `<workspace>/target/debug`
/// (`cargo test --workspace` builds it before running any test; alone:
/// `cargo test -p rustfuse-snapshotter --test conformance --no-run`).
fn conformance_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RUSTFUSE_CONFORMANCE_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let mut targets = vec![workspace_root().join("target")];
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        targets.insert(0, PathBuf::from(t));
    }
    targets
        .iter()
        .filter_map(|t| std::fs::read_dir(t.join("debug/deps")).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("conformance-")
                .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            (md.is_file() && md.mode() & 0o111 != 0).then_some((md.modified().ok()?, e.path()))
        })
        .max()
        .map(|(_, p)| p)
}

/// Says so when the conformance binary is older than the suite's sources (a run of this test
/// alone after editing them): the cases run are then those of the last build.
fn note_if_stale(bin: &Path) {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let tests = workspace_root().join("snapshotter/tests");
    let newer: Vec<String> = std::fs::read_dir(&tests)
        .into_iter()
        .flat_map(|rd| rd.flatten())
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                std::fs::read_dir(&p)
                    .into_iter()
                    .flat_map(|rd| rd.flatten().map(|e| e.path()))
                    .collect()
            } else {
                vec![p]
            }
        })
        .filter(|p| {
            let m = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            matches!((m, built), (Some(m), Some(b)) if m > b)
        })
        .map(|p| p.display().to_string())
        .collect();
    if !newer.is_empty() {
        eprintln!(
            "note: {} is older than {}; rebuild with `cargo test -p rustfuse-snapshotter --test conformance --no-run`",
            bin.display(),
            newer.join(", ")
        );
    }
}

/// Runs the conformance cases of module `module` (`overlay` or `fuse`) inside RootlessKit as
/// the test user, all but [`ROOTLESS_EXCLUDED`], two at a time, and checks they all passed.
fn run_conformance(name: &str, module: &str, doctor_mode: Option<&str>) {
    if !can_run(&[]) {
        return;
    }
    let Some(conf) = conformance_bin() else {
        skip(
            "no conformance test binary (cargo test -p rustfuse-snapshotter --test conformance --no-run, or set RUSTFUSE_CONFORMANCE_BIN)",
        );
        return;
    };
    note_if_stale(&conf);
    let listed = run_command(
        Command::new(&conf).args(["--list", "--format=terse"]),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(listed.status.success(), "{conf:?} --list: {listed:?}");
    let prefix = format!("{module}::");
    let cases: Vec<&str> = listed
        .stdout
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|n| n.starts_with(&prefix))
        .filter(|n| ROOTLESS_EXCLUDED.iter().all(|(x, _)| x != n))
        .collect();
    assert!(
        cases.len() >= 20,
        "only {} `{prefix}` cases listed by {}:\n{}",
        cases.len(),
        conf.display(),
        listed.stdout
    );
    for (case, why) in ROOTLESS_EXCLUDED {
        if case.starts_with(&prefix) {
            eprintln!("not run under RootlessKit: {case}: {why}");
        }
    }
    let (s, _uid) = user_scratch(
        name,
        &[
            (bin_under_test(), "rustfuse"),
            (snapshotter_bin(), "rustfuse-snapshotter"),
            (conf.clone(), "conformance"),
        ],
    );
    let d = s.path();
    if let Some(mut want) = doctor_mode {
        if want == "overlay" && !overlay_in_user_namespace(d) {
            // Linux 5.10 and older (tests/kernel.sh boots 5.10): auto mode must fall back.
            eprintln!(
                "note: kernel overlayfs does not mount in a user namespace here: --mode auto must pick fuse"
            );
            want = "fuse";
        }
        // What `--mode auto` picks in this namespace; the suite's `overlay` module runs
        // `--mode overlay`, which takes the same trial mount and the same mount options.
        let out = run_command(
            in_rootlesskit(d, "rootlesskit-doctor", &[]).args([
                "rustfuse-snapshotter",
                "doctor",
                "--root",
                d.join("doctor-root").to_str().unwrap(),
            ]),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "doctor in RootlessKit: {out:?}");
        let mode = check_doctor(&out.stdout);
        assert!(
            mode.starts_with(want),
            "--mode auto in RootlessKit picks {mode}, not {want}:\n{}",
            out.stdout
        );
        if want == "overlay" {
            assert!(
                out.stdout
                    .lines()
                    .any(|l| l.contains("trial overlay mount:")
                        && l.contains("userxattr")
                        && l.ends_with("] ok")),
                "no successful userxattr trial mount:\n{}",
                out.stdout
            );
        }
        eprintln!("--mode auto in RootlessKit: {mode}");
        if want != module {
            // `--mode overlay` cannot run where auto mode picks FUSE; the fuse:: cases run in
            // rootlesskit_conformance_fuse_mode.
            eprintln!(
                "`{module}::` cases not run: --mode auto picks {want} in a user namespace on this kernel"
            );
            return;
        }
    }
    let env = [
        "CI=true".to_string(),
        format!("TMPDIR={}", d.display()),
        format!("RUSTFUSE_BIN={}", d.join("bin/rustfuse").display()),
    ];
    let out = run_command(
        in_rootlesskit(d, "rootlesskit", &env)
            .arg(d.join("bin/conformance"))
            .args(["--exact", "--test-threads=2"])
            .args(&cases),
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} `{prefix}` conformance cases under RootlessKit: exit {} in {:.1?}",
        cases.len(),
        out.code(),
        out.elapsed
    );
    let summary = format!("test result: ok. {} passed; 0 failed", cases.len());
    assert!(
        out.status.success() && out.stdout.contains(&summary),
        "the conformance run under RootlessKit failed (exit {}), want `{summary}`:\nstdout:\n{}\nstderr:\n{}",
        out.code(),
        out.stdout,
        out.stderr
    );
    assert!(
        !out.stdout.contains("SKIPPED") && !out.stderr.contains("SKIPPED"),
        "a conformance case skipped under RootlessKit:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

/// Whether kernel overlayfs mounts in a user namespace here: a trial mount with `userxattr`
/// by the test user in `unshare -Urm` (Linux 5.11 and later allow it, 5.10 refuses it). The
/// expectation follows what this kernel does, not its version.
fn overlay_in_user_namespace(d: &Path) -> bool {
    let script = r#"
P="$1/userns-overlay-probe"
mkdir -p "$P/l" "$P/u" "$P/w" "$P/m"
unshare -Urm mount -t overlay overlay -o "lowerdir=$P/l,upperdir=$P/u,workdir=$P/w,userxattr" "$P/m"
"#;
    let out = run_command(
        rustfuse_tests::buildah::as_user_in(d, &[], "sh")
            .args(["-c", script, "sh"])
            .arg(d),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    if !out.status.success() {
        eprintln!(
            "kernel overlayfs in a user namespace: {}",
            out.stderr.trim()
        );
    }
    out.status.success()
}

/// `--mode auto` as root in a user namespace: doctor must pick kernel overlayfs with
/// `userxattr` where the kernel mounts it there (Linux 5.11 and later), and the suite's
/// overlay cases run there; where it does not (5.10), doctor must pick FUSE.
#[test]
fn rootlesskit_conformance_auto_mode() {
    run_conformance("rootless-conf-auto", "overlay", Some("overlay"));
}

/// `--mode fuse` as root in a user namespace: every case, rustfuse mounting in the namespace.
#[test]
fn rootlesskit_conformance_fuse_mode() {
    run_conformance("rootless-conf-fuse", "fuse", None);
}
