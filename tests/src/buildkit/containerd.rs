//! BuildKit's containerd worker, as root: rustfuse-snapshotter serves containerd as the proxy
//! plugin `rustfuse` (`[proxy_plugins.rustfuse] type = "snapshot"`), buildkitd runs with
//! `--oci-worker=false --containerd-worker=true --containerd-worker-snapshotter=rustfuse`
//! against that containerd, each daemon with its own root, state and socket in the
//! workspace. containerd's runc shims run the RUN steps (and mount their rootfs); buildkitd
//! mounts snapshots itself to checksum and diff them. Every daemon is a child of the
//! workspace, stopped (last started first) on drop; shims of the workspace's containerd left
//! by a build killed on its deadline are killed then too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Build, CLIENT, CLIENT_ARGS, Workspace, bin_dir};
use crate::env::which;

/// The containerd 2.x release `tests/install-containerd2.sh` installs by default.
const CONTAINERD2_VERSION: &str = "2.4.2";

/// Which containerd runs the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Containerd {
    /// Debian's 1.6, from PATH.
    Debian,
    /// 2.x from `tests/install-containerd2.sh`'s cache (or `$RUSTFUSE_CONTAINERD2_DIR`).
    V2,
}

/// rustfuse-snapshotter's `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapMode {
    /// Kernel overlayfs (with `index=off`).
    Overlay,
    /// `fuse3.rustfuse` mounts through mount.fuse3.
    Fuse,
}

impl SnapMode {
    /// The `--mode` value.
    pub fn arg(self) -> &'static str {
        match self {
            SnapMode::Overlay => "overlay",
            SnapMode::Fuse => "fuse",
        }
    }
}

impl Containerd {
    /// The directory of `containerd`, `ctr` and `containerd-shim-runc-v2` for 2.x.
    fn v2_dir() -> PathBuf {
        std::env::var_os("RUSTFUSE_CONTAINERD2_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(format!(
                    "/var/cache/rustfuse-test/containerd/{CONTAINERD2_VERSION}/bin"
                ))
            })
    }

    fn program(self, prog: &str) -> Option<PathBuf> {
        match self {
            Containerd::Debian => which(prog),
            Containerd::V2 => Some(Self::v2_dir().join(prog)).filter(|p| p.is_file()),
        }
    }

    /// Why a build on this containerd with BuildKit `version` cannot run here, if it cannot.
    pub fn unavailable(self, version: &str) -> Option<String> {
        if let Some(r) = super::unavailable(version) {
            return Some(r);
        }
        for prog in ["containerd", "containerd-shim-runc-v2"] {
            if self.program(prog).is_none() {
                return Some(match self {
                    Containerd::Debian => format!("{prog} not found (Debian package containerd)"),
                    Containerd::V2 => format!(
                        "{prog} not in {} (run tests/install-containerd2.sh or set \
                         RUSTFUSE_CONTAINERD2_DIR)",
                        Self::v2_dir().display()
                    ),
                });
            }
        }
        None
    }

    /// containerd's config: its own root, state and sockets under `d`, CRI off, the
    /// snapshotter at `d/snap.sock` as the proxy plugin `rustfuse`.
    fn config(self, d: &Path) -> String {
        let d = d.display();
        // 2.x reads config version 3, where CRI is several plugins.
        let (version, disabled) = match self {
            Containerd::Debian => (2, r#""io.containerd.grpc.v1.cri""#),
            Containerd::V2 => (
                3,
                r#""io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime""#,
            ),
        };
        format!(
            r#"version = {version}
root = "{d}/croot"
state = "{d}/cstate"
disabled_plugins = [{disabled}]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[proxy_plugins]
  [proxy_plugins.rustfuse]
    type = "snapshot"
    address = "{d}/snap.sock"
"#
        )
    }
}

impl Workspace {
    /// Builds [`super::DOCKERFILE`] as root with BuildKit `version`'s containerd worker on
    /// `containerd`, whose proxy snapshotter `rustfuse` is rustfuse-snapshotter `--mode
    /// mode`; exports and unpacks as [`Workspace::build`] does. The build (not the daemons'
    /// start) is killed after `deadline`.
    pub fn build_containerd(
        &mut self,
        version: &str,
        containerd: Containerd,
        mode: SnapMode,
        deadline: Duration,
    ) -> Result<Build, String> {
        let bk = bin_dir(version)?;
        let d = self.dir().to_path_buf();
        let mut path = vec![d.join("bin")];
        if containerd == Containerd::V2 {
            path.push(Containerd::v2_dir());
        }
        path.push(bk.clone());
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        path.extend(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from));
        let path = std::env::join_paths(path).map_err(|e| e.to_string())?;
        let what = format!("BuildKit {version} containerd worker on {containerd:?} {mode:?}");

        self.spawn_daemon(
            Command::new(d.join("bin/rustfuse-snapshotter"))
                .arg("--address")
                .arg(d.join("snap.sock"))
                .arg("--root")
                .arg(d.join("snaproot"))
                .args(["--mode", mode.arg()])
                .env("PATH", &path),
            "rustfuse-snapshotter",
            "snapshotter.log",
            &d.join("snap.sock"),
        )?;
        std::fs::write(d.join("containerd.toml"), containerd.config(&d))
            .map_err(|e| format!("containerd.toml: {e}"))?;
        let ctrd = containerd.program("containerd").ok_or("no containerd")?;
        self.spawn_daemon(
            Command::new(ctrd)
                .arg("--config")
                .arg(d.join("containerd.toml"))
                .env("PATH", &path),
            "containerd",
            "containerd.log",
            &d.join("containerd.sock"),
        )?;
        // The namespace and the trace socket (else /run/buildkit/otel-grpc.sock, which a
        // rootless buildkitd started later could not replace) have no flags. runc's state directory
        // (/run/containerd/runc/NAMESPACE) is shared by every containerd: one per build.
        let ns = d
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
            })
            .unwrap_or_default();
        std::fs::write(
            d.join("buildkitd.toml"),
            format!(
                "[worker.containerd]\n  namespace = \"{ns}\"\n[otel]\n  socketPath = \"{}\"\n",
                d.join("otel-grpc.sock").display()
            ),
        )
        .map_err(|e| format!("buildkitd.toml: {e}"))?;
        self.spawn_daemon(
            Command::new(bk.join("buildkitd"))
                .arg("--config")
                .arg(d.join("buildkitd.toml"))
                .arg(format!(
                    "--addr=unix://{}",
                    d.join("buildkitd.sock").display()
                ))
                .arg("--root")
                .arg(d.join("bkroot"))
                .args(["--oci-worker=false", "--containerd-worker=true"])
                .arg(format!(
                    "--containerd-worker-addr={}",
                    d.join("containerd.sock").display()
                ))
                .args([
                    "--containerd-worker-snapshotter=rustfuse",
                    "--containerd-worker-net=host",
                ])
                .env("PATH", &path),
            "buildkitd",
            "buildkitd.log",
            &d.join("buildkitd.sock"),
        )?;
        let out = crate::env::run_command(
            Command::new("sh")
                .args(["-c", &format!("{CLIENT_ARGS}{CLIENT}"), "sh"])
                .arg(&d)
                .arg(&bk)
                .arg("out")
                .env("PATH", &path),
            deadline,
        );
        self.finish(&what, out)
    }
}

/// Kills the runc shims of a containerd whose socket is under `dir` (left when a build was
/// killed on its deadline: a shim outlives its containerd).
pub(super) fn kill_leftover_shims(dir: &Path) {
    let sock = dir.join("containerd.sock");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
        let ours = args
            .iter()
            .any(|a| *a == sock.as_os_str().as_encoded_bytes());
        if is_shim && ours {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                eprintln!("note: killing containerd shim {pid:?} left by a build");
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}
