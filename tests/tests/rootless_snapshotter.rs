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
//! Needs root (to create the user) and the Debian packages rootlesskit, uidmap, containerd,
//! fuse3. Binaries: `$RUSTFUSE_BIN` (else target/debug/rustfuse) and `$RUSTFUSE_SNAPSHOTTER_BIN`
//! (else `rustfuse-snapshotter` beside the rustfuse binary). If /dev/fuse is not 0666 (Debian's
//! default), the test sets it to 0666 so that the user can open it, and says so.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rustfuse_tests::env::{bin_under_test, require_bin_under_test, run_command, scratch, skip};

/// The test user; shared with rootless_build.rs.
const USER: &str = "rustfuse-rl";

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn snapshotter_bin() -> PathBuf {
    match std::env::var_os("RUSTFUSE_SNAPSHOTTER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => bin_under_test()
            .parent()
            .map(|d| d.join("rustfuse-snapshotter"))
            .unwrap_or_default(),
    }
}

fn sh(script: &str, args: &[&str], deadline: Duration) -> String {
    let out = run_command(
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(args),
        deadline,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "script failed (exit {}):\n{script}\nstdout:\n{}\nstderr:\n{}",
        out.code(),
        out.stdout,
        out.stderr
    );
    out.stdout
}

fn can_run() -> bool {
    if !require_bin_under_test() {
        return false;
    }
    if !snapshotter_bin().is_file() {
        return skip(&format!(
            "{} does not exist (cargo build -p rustfuse-snapshotter, or set RUSTFUSE_SNAPSHOTTER_BIN)",
            snapshotter_bin().display()
        ));
    }
    for (prog, pkg) in [
        ("rootlesskit", "rootlesskit"),
        ("newuidmap", "uidmap"),
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("mount.fuse3", "fuse3"),
        ("setpriv", "util-linux"),
        ("useradd", "passwd"),
    ] {
        if which(prog).is_none() {
            return skip(&format!("{prog} not found (Debian package {pkg})"));
        }
    }
    let md = std::fs::metadata("/dev/fuse").unwrap();
    if md.mode() & 0o006 != 0o006 {
        eprintln!(
            "note: /dev/fuse is {:o}; setting it to 0666 (Debian's default) for the rootless snapshotter",
            md.mode() & 0o777
        );
        if let Err(e) =
            std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666))
        {
            return skip(&format!("/dev/fuse not usable by a non-root user: {e}"));
        }
    }
    true
}

/// Creates the test user (no home: HOME is set per run) with subordinate id ranges that do not
/// overlap any other entry. Idempotent.
fn ensure_user() -> u32 {
    let script = r#"
set -eu
U="$1"
id "$U" >/dev/null 2>&1 || useradd -M -d /nonexistent -s /bin/sh "$U" || id "$U" >/dev/null
for f in /etc/subuid /etc/subgid; do
  touch "$f"
  if ! grep -q "^$U:" "$f"; then
    start=$(awk -F: 'BEGIN{m=200000} {e=$2+$3; if (e>m) m=e} END{print m}' "$f")
    echo "$U:$start:65536" >> "$f"
  fi
done
id -u "$U"
"#;
    sh(script, &[USER], Duration::from_secs(30))
        .trim()
        .parse()
        .unwrap()
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
i=0
until [ -S "$D/containerd.sock" ] && [ -S "$D/snap.sock" ]; do
  i=$((i+1))
  if [ $i -gt 300 ]; then
    echo "no sockets after 30 s"; cat "$D/snapshotter.log" "$D/containerd.log"; exit 1
  fi
  sleep 0.1
done
snap() { ctr --address "$D/containerd.sock" -n rootless snapshots --snapshotter rustfuse "$@"; }
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

fn run_cycle(mode: &str) {
    if !can_run() {
        return;
    }
    let uid = ensure_user();
    let s = scratch(&format!("rootless-snap-{mode}"));
    let d = s.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (src, name) in [
        (bin_under_test(), "rustfuse"),
        (snapshotter_bin(), "rustfuse-snapshotter"),
    ] {
        std::fs::copy(&src, bin.join(name)).unwrap();
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    sh(
        r#"chown -R "$1" "$2""#,
        &[&uid.to_string(), d.to_str().unwrap()],
        Duration::from_secs(10),
    );
    let out = run_command(
        Command::new("setpriv")
            .args([
                &format!("--reuid={USER}"),
                &format!("--regid={USER}"),
                "--init-groups",
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            ])
            .arg(format!("HOME={}", d.display()))
            .arg(format!("XDG_RUNTIME_DIR={}", d.display()))
            .args([
                "rootlesskit",
                "--net=host",
                "--copy-up=/etc",
                "--copy-up=/run",
            ])
            .arg(format!("--state-dir={}", d.join("rootlesskit").display()))
            .args(["sh", "-c", INNER, "sh"])
            .arg(d)
            .arg(mode)
            .current_dir(d),
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
    let doctor: String = out
        .stdout
        .split("DOCTOR_BEGIN")
        .nth(1)
        .and_then(|r| r.split("DOCTOR_END").next())
        .unwrap_or_default()
        .to_string();
    let field = |name: &str| {
        doctor
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("doctor has no `{name}:` line:\n{doctor}"))
    };
    assert_eq!(field("user namespace"), "yes", "{doctor}");
    assert_eq!(field("effective uid"), "0", "{doctor}");
    let auto_mode = field("mode");
    assert!(
        auto_mode.starts_with("overlay") || auto_mode.starts_with("fuse"),
        "doctor reports no mode:\n{doctor}"
    );
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
