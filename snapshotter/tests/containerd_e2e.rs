//! End to end with a real containerd (Debian's 1.6): the test starts its own containerd with
//! its own config, root and socket, and `rustfuse-snapshotter` as a proxy plugin; checks
//! `ctr plugins ls`, `ctr snapshots` prepare/commit/view/mounts/usage/tree/rm, imports an
//! image built offline (busybox-static + umoci) and runs a container with `ctr run` that
//! writes files, in both modes.
//!
//! Needs root and the Debian packages containerd, runc, umoci, busybox-static (and fuse3 for
//! FUSE mode, whose `mount.fuse3` runs `rustfuse` from PATH: `$RUSTFUSE_BIN` or
//! `target/debug/rustfuse`). Installs nothing; prints `SKIPPED: <reason>` when it cannot run,
//! or fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::mount::UnmountFlags;

const BIN: &str = env!("CARGO_BIN_EXE_rustfuse-snapshotter");
const DEADLINE: Duration = Duration::from_secs(60);

fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and this privileged test cannot run: {reason}");
    }
    println!("SKIPPED: {reason}");
    eprintln!("SKIPPED: {reason}");
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn fuse_program() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RUSTFUSE_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let mut c = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/rustfuse")];
    if let Some(dir) = Path::new(BIN).parent() {
        c.push(dir.join("rustfuse"));
    }
    c.into_iter().find(|p| p.is_file())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Overlay,
    Fuse,
}

fn unavailable(mode: Mode) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("containerd end-to-end tests need root".into());
    }
    for prog in ["containerd", "ctr", "runc", "umoci", "busybox"] {
        if which(prog).is_none() {
            return Some(format!(
                "{prog} not found (Debian packages: containerd runc umoci busybox-static)"
            ));
        }
    }
    if mode == Mode::Fuse {
        if !Path::new("/dev/fuse").exists() {
            return Some("/dev/fuse is missing".into());
        }
        if which("mount.fuse3").is_none() {
            return Some("mount.fuse3 not found (Debian package fuse3)".into());
        }
        if fuse_program().is_none() {
            return Some("no FUSE program: set RUSTFUSE_BIN or build target/debug/rustfuse".into());
        }
    }
    None
}

/// A child process killed (and waited for) on drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn stop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

fn wait_socket(p: &mut Proc, sock: &Path) {
    let deadline = Instant::now() + DEADLINE;
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!(
                "{} exited with {st}:\n{}",
                p.name,
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen in time",
            p.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Env {
    dir: tempfile::TempDir,
    /// Namespace and container id: runc's state directory (/run/containerd/runc/<ns>) is
    /// shared by all containerd instances, so each mode uses its own.
    ns: &'static str,
    path: std::ffi::OsString,
    // Dropped in reverse order: containerd first, then the snapshotter.
    snap: Option<Proc>,
    containerd: Option<Proc>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            // Kill leftover shims of our namespace via ctr before containerd goes.
            let _ = self.ctr_raw(&["tasks", "kill", "-s", "SIGKILL", self.ns]);
            c.stop();
        }
        if let Some(mut s) = self.snap.take() {
            s.stop();
        }
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mps: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(self.dir.path().to_str().unwrap()))
            .collect();
        mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mps {
            let _ = rustix::mount::unmount(m, UnmountFlags::DETACH);
        }
    }
}

impl Env {
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn start(mode: Mode) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("snap-e2e-")
            .tempdir()
            .unwrap();
        // PATH for containerd: mount.fuse3 runs `rustfuse` from it.
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        if let Some(p) = fuse_program() {
            std::os::unix::fs::symlink(std::fs::canonicalize(p).unwrap(), bin.join("rustfuse"))
                .unwrap();
        }
        let mut path = bin.into_os_string();
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        path.push(":/usr/sbin:/sbin");
        let mut env = Env {
            dir,
            ns: if mode == Mode::Fuse {
                "rustfuse-e2e-fuse"
            } else {
                "rustfuse-e2e-overlay"
            },
            path,
            snap: None,
            containerd: None,
        };
        let log = env.p("snapshotter.log");
        let child = Command::new(BIN)
            .arg("--address")
            .arg(env.p("snap.sock"))
            .arg("--root")
            .arg(env.p("snaproot"))
            .args([
                "--mode",
                if mode == Mode::Fuse {
                    "fuse"
                } else {
                    "overlay"
                },
            ])
            .args(["--log-level", "rustfuse_snapshotter=debug,info"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start rustfuse-snapshotter");
        let mut snap = Proc {
            name: "rustfuse-snapshotter",
            child,
            log,
        };
        wait_socket(&mut snap, &env.p("snap.sock"));
        env.snap = Some(snap);

        let d = env.dir.path().display().to_string();
        std::fs::write(
            env.p("config.toml"),
            format!(
                r#"version = 2
root = "{d}/croot"
state = "{d}/cstate"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[proxy_plugins]
  [proxy_plugins.rustfuse]
    type = "snapshot"
    address = "{d}/snap.sock"
"#
            ),
        )
        .unwrap();
        let log = env.p("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(env.p("config.toml"))
            .env("PATH", &env.path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start containerd");
        let mut c = Proc {
            name: "containerd",
            child,
            log,
        };
        wait_socket(&mut c, &env.p("containerd.sock"));
        env.containerd = Some(c);
        env
    }

    fn ctr_raw(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(self.p("containerd.sock"))
            .args(["--namespace", self.ns])
            .args(args)
            .env("PATH", &self.path)
            .stdin(Stdio::null())
            .output()
    }

    /// Run ctr; panics with both logs on failure.
    fn ctr(&self, args: &[&str]) -> String {
        let out = self.ctr_raw(args).expect("exec ctr");
        if !out.status.success() {
            panic!(
                "ctr {args:?}: {}\nstdout: {}\nstderr: {}\n--- snapshotter ---\n{}\n--- containerd ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.p("snapshotter.log")).unwrap_or_default(),
                std::fs::read_to_string(self.p("containerd.log")).unwrap_or_default(),
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn snaps(&self, args: &[&str]) -> String {
        let mut a = vec!["snapshots", "--snapshotter", "rustfuse"];
        a.extend_from_slice(args);
        self.ctr(&a)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A two-layer OCI image (busybox, then a file), built offline with umoci, as a tar.
fn build_image(dir: &Path) -> PathBuf {
    let img = dir.join("img");
    let image = format!("{}:latest", img.display());
    let bundle = dir.join("bundle");
    run(Command::new("umoci").arg("init").arg("--layout").arg(&img));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(which("busybox").unwrap(), rootfs.join("bin/busybox")).unwrap();
    for l in ["sh", "cat", "echo", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l)).unwrap();
    }
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    std::fs::remove_dir_all(&bundle).unwrap();
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    std::fs::write(bundle.join("rootfs/hello"), "from layer 2\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    run(Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "/bin/sh"]));
    let tar = dir.join("img.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&img)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    tar
}

fn e2e(mode: Mode) {
    if let Some(reason) = unavailable(mode) {
        skip(&reason);
        return;
    }
    let env = Env::start(mode);

    // The proxy plugin is loaded.
    let plugins = env.ctr(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .any(|f| f.len() == 4
                && f[0] == "io.containerd.snapshotter.v1"
                && f[1] == "rustfuse"
                && f[3] == "ok"),
        "rustfuse not ok in:\n{plugins}"
    );

    // ctr snapshots.
    env.snaps(&["prepare", "base-a"]);
    let target = env.p("m-base");
    std::fs::create_dir_all(&target).unwrap();
    let mounts = env.snaps(&["mounts", target.to_str().unwrap(), "base-a"]);
    assert!(mounts.contains("bind"), "{mounts}");
    env.snaps(&["commit", "base", "base-a"]);
    env.snaps(&["prepare", "child", "base"]);
    let mounts = env.snaps(&["mounts", target.to_str().unwrap(), "child"]);
    match mode {
        Mode::Overlay => assert!(mounts.contains("-t overlay"), "{mounts}"),
        Mode::Fuse => assert!(mounts.contains("-t fuse3.rustfuse"), "{mounts}"),
    }
    env.snaps(&["commit", "child-c", "child"]);
    env.snaps(&["view", "v", "child-c"]);
    env.snaps(&["label", "v", "e2e=yes"]);
    let info = env.snaps(&["info", "v"]);
    assert!(info.contains("\"e2e\": \"yes\""), "{info}");
    let usage = env.snaps(&["usage"]);
    assert!(usage.contains("child-c"), "{usage}");
    let tree = env.snaps(&["tree"]);
    assert!(tree.contains("\\_ child-c"), "{tree}");
    let ls = env.snaps(&["ls"]);
    assert!(ls.contains("View") && ls.contains("Committed"), "{ls}");
    // Removing a parent with a child fails; children first works.
    assert!(
        !env.ctr_raw(&["snapshots", "--snapshotter", "rustfuse", "rm", "base"])
            .unwrap()
            .status
            .success()
    );
    env.snaps(&["rm", "v"]);
    env.snaps(&["rm", "child-c"]);
    env.snaps(&["rm", "base"]);

    // Import an image and run a container that writes files.
    let tar = build_image(env.dir.path());
    env.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "rustfuse",
        "--base-name",
        "localhost/e2e",
        tar.to_str().unwrap(),
    ]);
    let ls = env.snaps(&["ls"]);
    assert_eq!(
        ls.matches("Committed").count(),
        2,
        "two layers unpacked:\n{ls}"
    );
    let out = env.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "rustfuse",
        "localhost/e2e:latest",
        env.ns,
        "/bin/sh",
        "-c",
        "cat /hello; echo written > /new; mkdir -p /d/e; echo deep > /d/e/f; cat /new /d/e/f; ls /",
    ]);
    assert!(out.contains("from layer 2"), "{out}");
    assert!(out.contains("written") && out.contains("deep"), "{out}");
    // The container's snapshot went with --rm; the image layers stay.
    let ls = env.snaps(&["ls"]);
    assert_eq!(ls.matches("Active").count(), 0, "{ls}");
    env.ctr(&["images", "rm", "--sync", "localhost/e2e:latest"]);
}

#[test]
fn containerd_overlay() {
    e2e(Mode::Overlay);
}

#[test]
fn containerd_fuse() {
    e2e(Mode::Fuse);
}
