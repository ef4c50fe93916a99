//! Real BuildKit, rootless: `buildkitd` (OCI worker, runc) under RootlessKit as the build user,
//! building [`DOCKERFILE`] offline from a local OCI layout (a busybox base image made with
//! umoci, passed as a named build context) and exporting the result as an OCI archive, which is
//! unpacked with umoci as root and described entry by entry. Used by `tests/tests/buildkit.rs`,
//! which compares the image built through rustfuse with the one built on BuildKit's own kernel
//! overlayfs snapshotter.
//!
//! The binaries come from `tests/install-buildkit.sh` (Debian 12 has no BuildKit package):
//! `$RUSTFUSE_BUILDKIT_CACHE/VERSION/{buildkitd,buildctl}`, default `/var/cache/rustfuse-test/buildkit`.
//!
//! Every build runs in its own [`Workspace`]: a scratch directory owned by the build user with
//! `bin/` first on PATH. `bin/rustfuse` and `bin/fuse-overlayfs` are shims that log their
//! arguments to `calls` and exec `real/rustfuse` and `real/fuse-overlayfs` (a symlink to
//! `real/rustfuse`), so a test can tell which program mounted what. RootlessKit runs with
//! `--pidns`, so killing it (on a deadline) takes buildkitd, runc, the snapshotter started
//! inside and every FUSE daemon with it; a snapshotter started outside is killed by the
//! workspace's drop, which also detaches any mount left under the directory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::buildah::{as_user_in, chown_r, ensure_user, in_rootlesskit, sh};
use crate::env::{
    Scratch, bin_under_test, dev_fuse_for_everyone, poll_until, scratch, snapshotter_bin, which,
};
use crate::snapshot::{self, Snapshot};

mod containerd;
mod layers;

pub use containerd::{Containerd, SnapMode};
pub use layers::{Layer, LayerEntry, LinkChange, LinkCopyUp, diff_layers, parse_listing};

/// BuildKit versions the tests run, newest first: the newest release that builds with the Go
/// of the CI machine (1.26), and v0.11.6, the last 0.11 release (whose sources the client
/// contracts in `../shared/docs/client-contracts.md` were read from).
pub const VERSIONS: [&str; 2] = ["v0.34.2", "v0.11.6"];

/// Where `tests/install-buildkit.sh` caches the binaries: `$RUSTFUSE_BUILDKIT_CACHE`, else
/// `/var/cache/rustfuse-test/buildkit`.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("RUSTFUSE_BUILDKIT_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/var/cache/rustfuse-test/buildkit"),
    }
}

/// The directory holding `buildkitd` and `buildctl` of `version`.
pub fn bin_dir(version: &str) -> Result<PathBuf, String> {
    let d = cache_root().join(version);
    for b in ["buildkitd", "buildctl"] {
        if !d.join(b).is_file() {
            return Err(format!(
                "{} is missing (run `bash tests/install-buildkit.sh {version}`)",
                d.join(b).display()
            ));
        }
    }
    Ok(d)
}

/// Programs a build needs, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("rootlesskit", "rootlesskit"),
    ("newuidmap", "uidmap"),
    ("newgidmap", "uidmap"),
    ("runc", "runc"),
    ("umoci", "umoci"),
    ("busybox", "busybox-static"),
    ("setfattr", "attr"),
    ("getfattr", "attr"),
    ("ldd", "libc-bin"),
    ("mount.fuse3", "fuse3"),
    ("setpriv", "util-linux"),
    ("useradd", "passwd"),
];

/// Why a build with BuildKit `version` cannot run here, if it cannot: not root, a missing
/// program or binary, /dev/fuse not usable by the build user.
pub fn unavailable(version: &str) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (to create the build user and unpack images)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    for (what, p) in [
        ("rustfuse", bin_under_test()),
        ("rustfuse-snapshotter", snapshotter_bin()),
    ] {
        if !p.is_file() {
            return Some(format!(
                "{what} binary {} does not exist (cargo build --workspace)",
                p.display()
            ));
        }
    }
    for (prog, pkg) in TOOLS {
        if which(prog).is_none() {
            return Some(format!("{prog} not found (Debian package {pkg})"));
        }
    }
    if let Err(e) = bin_dir(version) {
        return Some(e);
    }
    dev_fuse_for_everyone("rootless BuildKit").err()
}

/// The base image, as the OCI layout `$1/img` (tag `latest`): `/sys` (BuildKit v0.11.6's
/// containerd worker leaves the mount point it makes in the first RUN's layer otherwise),
/// busybox, setfattr and getfattr
/// (busybox has no xattr applets; both need only libc and the loader, copied beside them),
/// then a layer of lower files for the Dockerfile to modify, delete, rename, link and chmod
/// (`links/h1` and `links/h2` are one inode; `lower/xat` carries `user.lower=base`;
/// `lower/keep` has a 1999 mtime).
const BASE_SCRIPT: &str = r#"
set -eu
D="$1"
img="$D/img"
umoci init --layout "$img"
umoci new --image "$img:latest"
umoci unpack --image "$img:latest" "$D/bundle" >/dev/null
R="$D/bundle/rootfs"
mkdir -p "$R/bin" "$R/tmp" "$R/etc" "$R/usr/bin" "$R/sys"
cp "$(command -v busybox)" "$R/bin/busybox"
for a in $(busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
for t in setfattr getfattr; do
  cp "$(command -v $t)" "$R/usr/bin/$t"
  for l in $(ldd "$(command -v $t)" | grep -o '/[^ ]*'); do
    mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"
  done
done
umoci repack --image "$img:latest" "$D/bundle" >/dev/null
rm -rf "$D/bundle"
umoci unpack --image "$img:latest" "$D/bundle" >/dev/null
R="$D/bundle/rootfs"
mkdir -p "$R/lower/deldir/sub/deeper" "$R/opq/sub" "$R/rendir/in" "$R/links"
for f in keep mod del ren chm suid; do echo "$f" > "$R/lower/$f"; done
echo d > "$R/lower/deldir/sub/f"; echo d2 > "$R/lower/deldir/sub/deeper/g"
echo a > "$R/opq/a"; echo c > "$R/opq/sub/c"
echo x > "$R/rendir/x"; echo y > "$R/rendir/in/y"
echo h > "$R/links/h1"; ln "$R/links/h1" "$R/links/h2"; echo s > "$R/links/solo"
ln -s keep "$R/lower/sym"
echo x > "$R/lower/xat"; setfattr -n user.lower -v base "$R/lower/xat"
touch -d "1999-01-02 03:04:05" "$R/lower/keep"
umoci repack --image "$img:latest" "$D/bundle" >/dev/null
rm -rf "$D/bundle"
umoci config --image "$img:latest" --config.cmd /bin/sh
"#;

/// The build: every kind of layer change, in two stages.
///
/// - `other`: its last step creates `/out` (so `COPY --from=other /out` checksums the still
///   active snapshot of that step through a read-only mount: BuildKit mounts it with the upper
///   layer and `ro`) from a file made in the step before (a rename out of a lower layer, then
///   an append), with a hard link, a symlink, chmod, chown and an old mtime.
/// - the final stage: new files, hard links within one step (a group of 2 names in one
///   directory, groups of 3 across directories), symlinks (one dangling), a fifo, a 64 MiB
///   file; then a step that fails unless every name of each group made in the step before
///   is one file (`[ a -ef b ]`); then a `chmod` of one name of a 2-name group, then a
///   `chown` of one name of a 3-name group ([`LINK_CHANGES`]: their layers are checked
///   entry by entry); then copy-up of lower files, deletion of files and trees, an opaque
///   directory (`rm -rf DIR && mkdir DIR`), renames of a directory and of a file, a write to
///   one name of a lower hard-link pair, a replaced symlink; then chown/chmod, set-uid and
///   set-gid bits, xattrs, a 1-byte write into the middle of the big file (its copy-up),
///   mtimes; then the COPY; then a check that the copied hard link is one file, and
///   `getfattr` writes the xattrs it sees into the image (BuildKit's layer tars carry only
///   `security.capability`, so user xattrs reach the image only this way).
pub const DOCKERFILE: &str = r#"FROM rfbase AS other
RUN mkdir /prep && yes other | head -c 1048576 > /prep/mb && echo gone > /prep/gone
RUN mkdir -p /out/sub && echo from-other > /out/f && ln /out/f /out/f-hard && ln -s f /out/link \
 && mv /prep/mb /out/sub/mb && echo second >> /out/sub/mb && rm -r /prep \
 && chmod 0750 /out/sub && chown 7:8 /out/f && touch -d "2001-02-03 04:05:06" /out/f

FROM rfbase
RUN mkdir -p /new/d/e && echo one > /new/one && ln /new/one /new/one-link && ln /new/one /new/d/e/one-link2 \
 && ln -s one /new/sym && ln -s /nowhere /new/dangling && mkfifo /new/fifo \
 && yes 0123456789abcdef | head -c 67108864 > /new/big && echo s > /new/suid && echo g > /new/sgid \
 && touch -d "2002-03-04 05:06:07" /new/one \
 && mkdir -p /gen/x /gen/y && echo g > /gen/a && ln /gen/a /gen/b \
 && echo t > /gen/x/t1 && ln /gen/x/t1 /gen/y/t2 && ln /gen/x/t1 /gen/t3
RUN [ /gen/a -ef /gen/b ] && [ /gen/x/t1 -ef /gen/y/t2 ] && [ /gen/y/t2 -ef /gen/t3 ] \
 && [ /new/one -ef /new/one-link ] && [ /new/one -ef /new/d/e/one-link2 ] && echo yes > /gen/ef
RUN chmod 0604 /gen/a
RUN chown 7:8 /gen/y/t2
RUN echo changed >> /lower/mod && rm /lower/del && rm -rf /lower/deldir \
 && rm -rf /opq && mkdir /opq && echo new > /opq/new \
 && mv /rendir /renamed && echo added > /renamed/added && mv /lower/ren /lower/renamed-file \
 && echo changed >> /links/h1 && rm /links/solo && ln -sfn mod /lower/sym
RUN chown 1000:1001 /lower/keep && chmod 0600 /lower/keep && chmod 4755 /new/suid && chmod 2755 /new/sgid \
 && chmod 6711 /lower/suid && chmod 2775 /new/d && chmod 0700 /lower/chm && chown 5:6 /lower/chm \
 && setfattr -n user.rf -v hello /new/suid && setfattr -n user.lower -v changed /lower/xat \
 && setfattr -n user.dir -v d /new/d \
 && printf X | dd of=/new/big bs=1 seek=1000000 conv=notrunc 2>/dev/null \
 && touch -d "2003-04-05 06:07:08" /lower/keep
COPY --from=other /out /copied
RUN [ /copied/f -ef /copied/f-hard ] && mkdir /late && echo l > /late/a && ln /late/a /late/b \
 && getfattr -d -m - /new/suid /new/d /lower/xat > /late/xattrs
"#;

/// The steps of [`DOCKERFILE`] that change one name of a hard link made in an earlier step.
pub const LINK_CHANGES: [LinkChange; 2] = [
    LinkChange {
        step: "RUN chmod 0604 /gen/a",
        changed: "gen/a",
        group: &["gen/a", "gen/b"],
        mode: (0o604, 0o644),
        owner: ("0/0", "0/0"),
    },
    LinkChange {
        step: "RUN chown 7:8 /gen/y/t2",
        changed: "gen/y/t2",
        group: &["gen/t3", "gen/x/t1", "gen/y/t2"],
        mode: (0o644, 0o644),
        owner: ("7/8", "0/0"),
    },
];

/// Layers of the base image under the final stage's.
pub const BASE_LAYERS: usize = 2;

/// The RUN and COPY steps of the final stage, one per layer above [`BASE_LAYERS`], each as its
/// first line.
pub fn final_steps() -> Vec<&'static str> {
    let last = DOCKERFILE.rsplit("\nFROM ").next().unwrap_or_default();
    last.lines()
        .filter(|l| l.starts_with("RUN ") || l.starts_with("COPY "))
        .collect()
}

/// Runs inside RootlessKit as the build user. `$1` scratch dir, `$2` BuildKit's bin dir,
/// `$3` the `--oci-worker-snapshotter` name, `$4` proxy socket (empty: none), `$5` `inside`
/// to start rustfuse-snapshotter here (`--mode $6`) first, `$7` the output's name.
const INNER: &str = r#"
set -eu
D="$1"; BK="$2"; SN="$3"; SOCK="$4"; INSIDE="$5"; MODE="$6"; OUT="$7"
export PATH="$D/bin:$BK:$PATH"
pids=
cleanup() {
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  for p in $pids; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
waitsock() { # socket, pid of its server
  i=0
  until [ -S "$1" ]; do
    if ! kill -0 "$2" 2>/dev/null; then echo "the server of $1 exited"; return 1; fi
    i=$((i+1)); if [ $i -gt 600 ]; then echo "no socket $1 after 60 s"; return 1; fi
    sleep 0.1
  done
}
if [ "$INSIDE" = inside ]; then
  echo DOCTOR_BEGIN
  rustfuse-snapshotter doctor --root "$D/snaproot"
  echo DOCTOR_END
  rustfuse-snapshotter --address "$SOCK" --root "$D/snaproot" --mode "$MODE" \
    > "$D/snapshotter.log" 2>&1 &
  pids="$!"
  waitsock "$SOCK" "$!"
fi
if [ -n "$SOCK" ]; then
  [ -S "$SOCK" ] || { echo "no proxy socket $SOCK"; exit 1; }
  set -- --oci-worker-proxy-snapshotter-path="$SOCK"
else
  set --
fi
buildkitd --addr "unix://$D/buildkitd.sock" --root "$D/bkroot" \
  --oci-worker=true --containerd-worker=false --oci-worker-net=host \
  --oci-worker-snapshotter="$SN" "$@" > "$D/buildkitd.log" 2>&1 &
pids="$! $pids"
waitsock "$D/buildkitd.sock" "$!"
"#;

/// Runs after [`INNER`] in the same shell, or after [`CLIENT_ARGS`], once buildkitd listens on
/// `$D/buildkitd.sock`: lists the workers, builds and exports to `$D/$OUT.tar`.
const CLIENT: &str = r#"
echo WORKERS_BEGIN
buildctl --addr "unix://$D/buildkitd.sock" debug workers -v
echo WORKERS_END
digest=$(sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p' "$D/img/index.json")
buildctl --addr "unix://$D/buildkitd.sock" build --progress=plain --frontend dockerfile.v0 \
  --local context="$D/ctx" --local dockerfile="$D/ctx" \
  --oci-layout rfbase="$D/img" --opt context:rfbase="oci-layout://rfbase@$digest" \
  --output type=oci,dest="$D/$OUT.tar",name=rf-out:latest 2>&1
echo BUILD_OK
"#;

/// Sets what [`CLIENT`] needs when it runs alone: `$1` scratch dir, `$2` BuildKit's bin dir,
/// `$3` the output's name.
const CLIENT_ARGS: &str = r#"
set -eu
D="$1"; BK="$2"; OUT="$3"
export PATH="$D/bin:$BK:$PATH"
"#;

/// Which snapshotter BuildKit's OCI worker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshotter {
    /// BuildKit's own `overlayfs` (kernel overlayfs with `userxattr`): the reference.
    KernelOverlay,
    /// rustfuse-snapshotter `--mode fuse`, run by the build user outside RootlessKit, as the
    /// proxy snapshotter `rustfuse`: buildkitd mounts `fuse3.rustfuse` through mount.fuse3.
    ProxyFuseOutside,
    /// rustfuse-snapshotter `--mode auto` started in the same RootlessKit as buildkitd.
    ProxyAutoInside,
    /// BuildKit's built-in `fuse-overlayfs` snapshotter, with rustfuse as `fuse-overlayfs`.
    BuiltinFuseOverlayfs,
}

impl Snapshotter {
    /// The `--oci-worker-snapshotter` value (also the worker's snapshotter label).
    pub fn worker_name(self) -> &'static str {
        match self {
            Snapshotter::KernelOverlay => "overlayfs",
            Snapshotter::ProxyFuseOutside | Snapshotter::ProxyAutoInside => "rustfuse",
            Snapshotter::BuiltinFuseOverlayfs => "fuse-overlayfs",
        }
    }
}

/// What one build left.
#[derive(Debug)]
pub struct Build {
    /// The unpacked image.
    pub rootfs: PathBuf,
    /// The image's layers, bottom first, as the OCI layout has them.
    pub layers: Vec<Layer>,
    /// The script's output: doctor, workers, buildctl's progress.
    pub stdout: String,
    /// The snapshotter's log (empty without one).
    pub snapshotter_log: String,
    /// The shims' log: `NAME ARGS` per run of `rustfuse` or `fuse-overlayfs`.
    pub calls: Vec<String>,
    /// How long the RootlessKit run took (daemons' start, build, export).
    pub elapsed: Duration,
}

impl Build {
    /// The text between the lines `begin` and `end` of the script's output.
    pub fn section(&self, begin: &str, end: &str) -> String {
        self.stdout
            .split(begin)
            .nth(1)
            .and_then(|r| r.split(end).next())
            .unwrap_or_default()
            .to_string()
    }

    /// The worker's snapshotter label, from `buildctl debug workers -v`.
    pub fn worker_snapshotter(&self) -> Option<String> {
        self.section("WORKERS_BEGIN", "WORKERS_END")
            .lines()
            .find(|l| l.contains("buildkit.worker.snapshotter:"))
            .and_then(|l| l.split_whitespace().last())
            .map(str::to_string)
    }
}

/// A scratch directory owned by the build user, with the shims, the base image and the build
/// context. Drop kills the daemons it started and detaches mounts left under it; the
/// directory is then removed.
pub struct Workspace {
    scratch: Scratch,
    daemons: Vec<Child>,
}

impl Workspace {
    /// Creates the build user if need be, and the directory `rustfuse-buildkit-NAME-*`.
    pub fn new(name: &str) -> Result<Workspace, String> {
        let uid = ensure_user()?;
        let ws = Workspace {
            scratch: scratch(&format!("buildkit-{name}")),
            daemons: Vec::new(),
        };
        let d = ws.dir();
        let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io("chmod scratch", e))?;
        for sub in ["bin", "real", "ctx"] {
            std::fs::create_dir(d.join(sub)).map_err(|e| io(sub, e))?;
        }
        let copy = |from: &Path, to: &Path| -> Result<(), String> {
            std::fs::copy(from, to)
                .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))?;
            std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| io("chmod", e))
        };
        copy(&bin_under_test(), &d.join("real/rustfuse"))?;
        std::os::unix::fs::symlink("rustfuse", d.join("real/fuse-overlayfs"))
            .map_err(|e| io("symlink", e))?;
        copy(&snapshotter_bin(), &d.join("bin/rustfuse-snapshotter"))?;
        for prog in ["rustfuse", "fuse-overlayfs"] {
            let shim = d.join("bin").join(prog);
            std::fs::write(
                &shim,
                format!(
                    "#!/bin/sh\necho \"{prog} $*\" >> '{calls}'\nexec '{real}' \"$@\"\n",
                    calls = d.join("calls").display(),
                    real = d.join("real").join(prog).display()
                ),
            )
            .map_err(|e| io("shim", e))?;
            std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| io("chmod shim", e))?;
        }
        std::fs::write(d.join("ctx/Dockerfile"), DOCKERFILE).map_err(|e| io("Dockerfile", e))?;
        sh(
            BASE_SCRIPT,
            &[&d.display().to_string()],
            Duration::from_secs(120),
        )?;
        chown_r(d, uid).map_err(|e| io("chown", e))?;
        Ok(ws)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    /// Starts `rustfuse-snapshotter --mode MODE` as the build user outside any namespace
    /// (socket `snap.sock`, root `snaproot`, log `snapshotter.log`) and waits for its socket.
    fn start_snapshotter_outside(&mut self, mode: &str) -> Result<PathBuf, String> {
        let d = self.dir().to_path_buf();
        let sock = d.join("snap.sock");
        self.spawn_daemon(
            as_user_in(&d, &[], "rustfuse-snapshotter")
                .arg("--address")
                .arg(&sock)
                .arg("--root")
                .arg(d.join("snaproot"))
                .args(["--mode", mode]),
            "rustfuse-snapshotter",
            "snapshotter.log",
            &sock,
        )?;
        Ok(sock)
    }

    /// Starts `cmd` (its output to the file `log` in the workspace) as a daemon of the
    /// workspace and waits until it listens on `sock`.
    fn spawn_daemon(
        &mut self,
        cmd: &mut Command,
        what: &str,
        log: &str,
        sock: &Path,
    ) -> Result<(), String> {
        let logp = self.dir().join(log);
        let f = std::fs::File::create(&logp).map_err(|e| format!("{log}: {e}"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().map_err(|e| e.to_string())?)
            .stderr(f)
            .spawn()
            .map_err(|e| format!("start {what}: {e}"))?;
        self.daemons.push(child);
        let listening = || std::os::unix::net::UnixStream::connect(sock).is_ok();
        poll_until(Duration::from_secs(60), || {
            listening()
                || self
                    .daemons
                    .last_mut()
                    .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
        });
        if !listening() {
            return Err(format!(
                "{what} does not listen on {}:\n{}",
                sock.display(),
                std::fs::read_to_string(&logp).unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Builds [`DOCKERFILE`] with BuildKit `version` on `sn`, exports it as an OCI archive and
    /// unpacks it (as root, so owners are kept). The RootlessKit run is killed after
    /// `deadline`. An error carries every log.
    pub fn build(
        &mut self,
        version: &str,
        sn: Snapshotter,
        deadline: Duration,
    ) -> Result<Build, String> {
        let bk = bin_dir(version)?;
        let d = self.dir().to_path_buf();
        let sock = match sn {
            Snapshotter::ProxyFuseOutside => Some(self.start_snapshotter_outside("fuse")?),
            Snapshotter::ProxyAutoInside => Some(d.join("snap.sock")),
            _ => None,
        };
        let inside = sn == Snapshotter::ProxyAutoInside;
        let out = crate::env::run_command(
            in_rootlesskit(&d, "rootlesskit", &[])
                .args(["sh", "-c", &format!("{INNER}{CLIENT}"), "sh"])
                .arg(&d)
                .arg(&bk)
                .arg(sn.worker_name())
                .arg(sock.as_deref().unwrap_or(Path::new("")))
                .arg(if inside { "inside" } else { "outside" })
                .arg("auto")
                .arg("out"),
            deadline,
        );
        self.finish(&format!("BuildKit {version} on {sn:?}"), out)
    }

    /// The rest of a build whose client script ([`CLIENT`]) gave `out`: on success the
    /// exported archive unpacked (as root, so owners are kept) and its layers listed; an
    /// error carries every log.
    fn finish(
        &self,
        what: &str,
        out: Result<crate::env::CmdOutput, String>,
    ) -> Result<Build, String> {
        let d = self.dir();
        let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();
        let calls: Vec<String> = read("calls").lines().map(str::to_string).collect();
        let logs = |head: &str| {
            let mut s = format!("{head}\n");
            for f in ["buildkitd.log", "containerd.log", "snapshotter.log"] {
                let text = read(f);
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(60);
                let _ = write!(s, "--- {f} (last {} lines):\n{}\n", lines.len() - from, {
                    lines[from..].join("\n")
                });
            }
            let _ = write!(
                s,
                "--- {} calls of the rustfuse shims (last 20):\n{}",
                calls.len(),
                calls[calls.len().saturating_sub(20)..].join("\n")
            );
            s
        };
        let out = out.map_err(|e| logs(&format!("{what}: {e}")))?;
        if !out.status.success() || !out.stdout.contains("BUILD_OK") {
            return Err(logs(&format!("{what}: the build failed {}", out.report())));
        }
        let layout = d.join("oci");
        let rootfs = d.join("unpacked");
        sh(
            r#"set -e; mkdir "$2"; tar -C "$2" -xf "$1"; umoci raw unpack --image "$2:latest" "$3""#,
            &[
                &d.join("out.tar").display().to_string(),
                &layout.display().to_string(),
                &rootfs.display().to_string(),
            ],
            Duration::from_secs(120),
        )?;
        let layers = layers::read_layers(&layout)?;
        Ok(Build {
            rootfs,
            layers,
            stdout: out.stdout,
            snapshotter_log: read("snapshotter.log"),
            calls,
            elapsed: out.elapsed,
        })
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // Last started first: buildkitd before containerd before the snapshotter.
        for c in self.daemons.iter_mut().rev() {
            if let Ok(None) = c.try_wait() {
                let pid = rustix::process::Pid::from_child(c);
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                let gone = poll_until(Duration::from_secs(3), || !matches!(c.try_wait(), Ok(None)));
                if !gone {
                    let _ = c.kill();
                }
                let _ = c.wait();
            }
        }
        containerd::kill_leftover_shims(self.dir());
        // Nothing should be mounted here in the host's namespace (but the containerd worker's (buildkitd mounts in
        // RootlessKit's), but a leftover must not keep the directory from being removed.
        let mut left: Vec<PathBuf> = crate::mount::mountinfo()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(self.dir()))
            .collect();
        left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in left {
            eprintln!("note: detaching a mount left at {}", p.display());
            let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// An unpacked image: every entry (type, mode, owner, size, content hash, symlink target,
/// xattrs, link count, mtime where older than [`snapshot::RECENT`]) and the hard-link groups.
#[derive(Debug, Clone)]
pub struct Image {
    /// Path → entry.
    pub tree: Snapshot,
    /// Path of a non-directory with more than one name → all its names, sorted.
    pub links: BTreeMap<String, Vec<String>>,
    /// `late/xattrs`: what `getfattr -d -m -` printed in the last step.
    pub xattrs_seen: String,
}

impl Image {
    /// Describes the tree at `rootfs`.
    pub fn describe(rootfs: &Path) -> Image {
        let tree = snapshot::snapshot(rootfs);
        let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (p, ino) in &tree.inos {
            if tree
                .entries
                .get(p)
                .is_some_and(|i| i.kind != snapshot::Kind::Dir)
            {
                by_ino.entry(*ino).or_default().push(p.clone());
            }
        }
        let mut links = BTreeMap::new();
        for names in by_ino.into_values().filter(|n| n.len() > 1) {
            for n in &names {
                links.insert(n.clone(), names.clone());
            }
        }
        let xattrs_seen = std::fs::read_to_string(rootfs.join("late/xattrs")).unwrap_or_default();
        Image {
            tree,
            links,
            xattrs_seen,
        }
    }

    /// What the Dockerfile must have produced and this image lacks, one line each.
    pub fn check_expected(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let e = &self.tree.entries;
        for p in [
            "copied/f",
            "copied/f-hard",
            "copied/link",
            "copied/sub/mb",
            "new/big",
            "new/fifo",
            "new/dangling",
            "opq/new",
            "renamed/x",
            "renamed/in/y",
            "renamed/added",
            "lower/renamed-file",
            "late/xattrs",
            "gen/ef",
        ] {
            if !e.contains_key(p) {
                bad.push(format!("{p}: missing"));
            }
        }
        for p in [
            "lower/del",
            "lower/deldir",
            "lower/ren",
            "opq/a",
            "opq/sub",
            "rendir",
            "links/solo",
            "prep",
        ] {
            if e.contains_key(p) {
                bad.push(format!("{p}: should be gone"));
            }
        }
        let mode = |p: &str| e.get(p).map(|i| i.mode);
        for (p, m) in [
            ("new/suid", 0o4755),
            ("new/sgid", 0o2755),
            ("lower/suid", 0o6711),
            ("new/d", 0o2775),
            ("copied/sub", 0o750),
            ("lower/keep", 0o600),
        ] {
            if mode(p) != Some(m) {
                let got = mode(p).map_or("none".into(), |m| format!("{m:o}"));
                bad.push(format!("{p}: mode {got}, want {m:o}"));
            }
        }
        let owner = |p: &str| e.get(p).map(|i| (i.uid, i.gid));
        for (p, o) in [
            ("lower/keep", (1000, 1001)),
            ("lower/chm", (5, 6)),
            ("copied/f", (7, 8)),
        ] {
            if owner(p) != Some(o) {
                bad.push(format!("{p}: owner {:?}, want {o:?}", owner(p)));
            }
        }
        for (p, t) in [
            ("lower/keep", 1_049_522_828), // 2003-04-05 06:07:08 UTC
            ("copied/f", 981_173_106),     // 2001-02-03 04:05:06 UTC
            ("new/one", 1_015_218_367),    // 2002-03-04 05:06:07 UTC
        ] {
            if e.get(p).and_then(|i| i.mtime) != Some(t) {
                bad.push(format!(
                    "{p}: mtime {:?}, want {t}",
                    e.get(p).and_then(|i| i.mtime)
                ));
            }
        }
        let content = |p: &str| e.get(p).and_then(|i| i.content.clone()).unwrap_or_default();
        for (p, c) in [
            ("lower/mod", "\"mod\\nchanged\\n\""),
            ("links/h1", "\"h\\nchanged\\n\""),
            ("links/h2", "\"h\\n\""),
            ("copied/f", "\"from-other\\n\""),
        ] {
            if content(p) != c {
                bad.push(format!("{p}: content {}, want {c}", content(p)));
            }
        }
        for want in [
            "# file: new/suid\nuser.rf=\"hello\"\n",
            "# file: new/d\nuser.dir=\"d\"\n",
            "# file: lower/xat\nuser.lower=\"changed\"\n",
        ] {
            if !self.xattrs_seen.contains(want) {
                bad.push(format!(
                    "late/xattrs: no {want:?} in {:?}",
                    self.xattrs_seen
                ));
            }
        }
        for group in [
            &["new/d/e/one-link2", "new/one", "new/one-link"][..],
            &["copied/f", "copied/f-hard"],
            &["late/a", "late/b"],
        ] {
            let got = self.links.get(group[0]).map(Vec::as_slice).unwrap_or(&[]);
            let got: Vec<&str> = got.iter().map(String::as_str).collect();
            if got != group {
                bad.push(format!(
                    "{}: hard-link group {got:?}, want {group:?}",
                    group[0]
                ));
            }
        }
        for c in &LINK_CHANGES {
            if let Err(e) = self.link_change(c) {
                bad.push(e);
            }
        }
        bad.extend(self.tree.problems.iter().cloned());
        bad
    }

    /// What the step `c` did to the other names of the hard link in this image: kept them
    /// one file with the new metadata, or split the changed name off (kernel overlayfs with
    /// `index=off`); an error if neither.
    pub fn link_change(&self, c: &LinkChange) -> Result<LinkCopyUp, String> {
        let e = &self.tree.entries;
        let owner = |o: &str| {
            let (u, g) = o.split_once('/').unwrap_or_default();
            (u.parse().unwrap_or(u32::MAX), g.parse().unwrap_or(u32::MAX))
        };
        let has = |p: &str, (mode, own): (u32, &str)| {
            e.get(p)
                .is_some_and(|i| i.mode == mode && (i.uid, i.gid) == owner(own))
        };
        let group_of = |p: &str| -> Vec<String> {
            self.links
                .get(p)
                .cloned()
                .unwrap_or_else(|| vec![p.to_string()])
        };
        let (new, old) = ((c.mode.0, c.owner.0), (c.mode.1, c.owner.1));
        let others: Vec<&str> = c
            .group
            .iter()
            .copied()
            .filter(|n| *n != c.changed)
            .collect();
        if c.group
            .iter()
            .all(|n| group_of(n) == c.group && has(n, new))
        {
            return Ok(LinkCopyUp::Kept);
        }
        if group_of(c.changed) == [c.changed]
            && has(c.changed, new)
            && others.iter().all(|n| group_of(n) == others && has(n, old))
        {
            return Ok(LinkCopyUp::Split);
        }
        let shown: Vec<String> = c
            .group
            .iter()
            .map(|n| {
                let i = e.get(*n);
                format!(
                    "{n}: mode {:?} owner {:?} names {:?}",
                    i.map(|i| format!("{:o}", i.mode)),
                    i.map(|i| (i.uid, i.gid)),
                    group_of(n)
                )
            })
            .collect();
        Err(format!(
            "after `{}`: {}; want one file (mode {:o}, owner {}) with every name, or {} alone \
             with it and the others unchanged (index=off)",
            c.step,
            shown.join("; "),
            c.mode.0,
            c.owner.0,
            c.changed
        ))
    }

    /// Differences from `reference` (named `rn`; this one `n`), one line each, entries then
    /// hard-link groups. The names of a [`LINK_CHANGES`] group are left out where the two
    /// images took it different ways (each way is checked by [`Image::check_expected`]).
    pub fn diff(&self, n: &str, reference: &Image, rn: &str) -> (Vec<String>, Vec<String>) {
        let skip: Vec<&str> = LINK_CHANGES
            .iter()
            .filter(|c| self.link_change(c).ok() != reference.link_change(c).ok())
            .flat_map(|c| c.group.iter().copied())
            .collect();
        let entries = snapshot::diff(&reference.tree, rn, &self.tree, n)
            .into_iter()
            .filter(|l| !skip.iter().any(|p| l.split(':').next() == Some(p)))
            .collect();
        let mut links = Vec::new();
        let keys: std::collections::BTreeSet<&String> =
            reference.links.keys().chain(self.links.keys()).collect();
        for k in keys.into_iter().filter(|k| !skip.contains(&k.as_str())) {
            let (a, b) = (reference.links.get(k), self.links.get(k));
            if a != b {
                links.push(format!(
                    "{k}: names of its inode: {rn} {:?}, {n} {:?}",
                    a.cloned().unwrap_or_else(|| vec![k.clone()]),
                    b.cloned().unwrap_or_else(|| vec![k.clone()])
                ));
            }
        }
        (entries, links)
    }
}
