//! End to end with a real containerd: the test starts its own containerd with its own config,
//! root and socket, and `rustfuse-snapshotter` as a proxy plugin; checks `ctr plugins ls`,
//! `ctr snapshots` prepare/commit/view/mounts/usage/tree/rm, imports an image built offline
//! (busybox-static + umoci), runs a container with `ctr run` that changes the image's files in
//! every way a layer can record, and diffs the container's snapshot with `ctr snapshots diff`
//! (containerd's walking differ, which mounts the active snapshot read-only): the layer tar
//! must hold every change, and the same entries in both modes.
//!
//! Against Debian's containerd 1.6 (`containerd_*`) and a containerd 2.x built by
//! `tests/install-containerd2.sh` (`containerd2_*`: the binaries in
//! `$RUSTFUSE_CONTAINERD2_DIR`, else in the script's cache directory).
//!
//! Needs root and the Debian packages containerd, runc, umoci, busybox-static, tar (and fuse3
//! for FUSE mode, whose `mount.fuse3` runs `rustfuse` from PATH: `$RUSTFUSE_BIN` or
//! `target/debug/rustfuse`). Installs nothing; prints `SKIPPED: <reason>` when it cannot run,
//! or fails under `CI=true`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Mode, fuse_program, mounts_under, skip};
use rustix::mount::UnmountFlags;

const BIN: &str = env!("CARGO_BIN_EXE_rustfuse-snapshotter");
/// For a daemon to listen, and for any one command (`ctr run` writes 32 MiB through FUSE in a
/// debug build; the diff reads it back through two mounts).
const DEADLINE: Duration = Duration::from_secs(180);
/// The containerd 2.x release `tests/install-containerd2.sh` installs by default.
const CONTAINERD2_VERSION: &str = "2.4.2";
const BIG_MIB: u64 = 32;

/// Which containerd the test runs.
#[derive(Clone, Debug)]
enum Release {
    /// Debian's 1.6, from PATH.
    Debian,
    /// A 2.x: `containerd`, `ctr` and `containerd-shim-runc-v2` in this directory.
    V2(PathBuf),
}

impl Release {
    fn v2() -> Release {
        let dir = std::env::var_os("RUSTFUSE_CONTAINERD2_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(format!(
                    "/var/cache/rustfuse-test/containerd/{CONTAINERD2_VERSION}/bin"
                ))
            });
        Release::V2(dir)
    }

    fn name(&self) -> &'static str {
        match self {
            Release::Debian => "containerd 1.6",
            Release::V2(_) => "containerd 2",
        }
    }

    fn program(&self, prog: &str) -> Option<PathBuf> {
        match self {
            Release::V2(dir) => Some(dir.join(prog)).filter(|p| p.is_file()),
            Release::Debian => which(prog),
        }
    }
}

use rustfuse_snapshotter::mode::which;

fn unavailable(mode: Mode, release: &Release) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("containerd end-to-end tests need root".into());
    }
    for prog in ["runc", "umoci", "busybox", "tar", "sha256sum"] {
        if which(prog).is_none() {
            return Some(format!(
                "{prog} not found (Debian packages: runc umoci busybox-static tar coreutils)"
            ));
        }
    }
    for prog in ["containerd", "ctr", "containerd-shim-runc-v2"] {
        if release.program(prog).is_none() {
            return Some(match release {
                Release::Debian => format!("{prog} not found (Debian package containerd)"),
                Release::V2(dir) => format!(
                    "{prog} not in {} (run tests/install-containerd2.sh or set \
                     RUSTFUSE_CONTAINERD2_DIR)",
                    dir.display()
                ),
            });
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

/// Run `cmd` (stdin closed) within `limit`, stdout to `stdout` if given (else captured);
/// killed and a panic on overrun.
fn output_within(cmd: &mut Command, limit: Duration, stdout: Option<&Path>) -> Output {
    let mut out = match stdout {
        Some(p) => std::fs::File::create(p).unwrap(),
        None => tempfile::tempfile().unwrap(),
    };
    let mut err = tempfile::tempfile().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let read = |f: &mut std::fs::File| {
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&read(&mut err))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: if stdout.is_some() {
            Vec::new()
        } else {
            read(&mut out)
        },
        stderr: read(&mut err),
    }
}

fn run(cmd: &mut Command) -> String {
    let out = output_within(cmd, DEADLINE, None);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    /// shared by all containerd instances, so each test uses its own.
    ns: &'static str,
    ctr: PathBuf,
    path: std::ffi::OsString,
    // Dropped in reverse order: containerd first, then the snapshotter.
    snap: Option<Proc>,
    containerd: Option<Proc>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            // Kill leftover shims of our namespace via ctr before containerd goes.
            let _ = std::panic::catch_unwind(|| {
                self.ctr_raw(&["tasks", "kill", "-s", "SIGKILL", self.ns])
            });
            c.stop();
        }
        if let Some(mut s) = self.snap.take() {
            s.stop();
        }
        for m in mounts_under(self.dir.path()) {
            let _ = rustix::mount::unmount(&m, UnmountFlags::DETACH);
        }
    }
}

impl Env {
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn start(mode: Mode, release: &Release, ns: &'static str) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("snap-e2e-")
            .tempdir()
            .unwrap();
        // PATH for containerd: its shim, and `rustfuse` for mount.fuse3.
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        if let Some(p) = fuse_program() {
            std::os::unix::fs::symlink(std::fs::canonicalize(p).unwrap(), bin.join("rustfuse"))
                .unwrap();
        }
        let mut dirs = vec![bin];
        if let Release::V2(d) = release {
            dirs.push(d.clone());
        }
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
        let mut env = Env {
            dir,
            ns,
            ctr: release.program("ctr").expect("ctr"),
            path: std::env::join_paths(dirs).unwrap(),
            snap: None,
            containerd: None,
        };
        let log = env.p("snapshotter.log");
        let child = Command::new(BIN)
            .arg("--address")
            .arg(env.p("snap.sock"))
            .arg("--root")
            .arg(env.p("snaproot"))
            .args(["--mode", mode.arg()])
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
        // 2.x reads config version 3 (its CRI is several plugins), and ctr imports through
        // its transfer service, which unpacks with the snapshotter its unpack_config names;
        // [proxy_plugins] is the same in both.
        let (version, disabled, tables) = match release {
            Release::Debian => (2, r#""io.containerd.grpc.v1.cri""#, String::new()),
            Release::V2(_) => (
                3,
                r#""io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime""#,
                format!(
                    r#"[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/{}"
  snapshotter = "rustfuse"
  differ = "walking"
"#,
                    match std::env::consts::ARCH {
                        "x86_64" => "amd64",
                        "aarch64" => "arm64",
                        other => other,
                    }
                ),
            ),
        };
        std::fs::write(
            env.p("config.toml"),
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
{tables}"#
            ),
        )
        .unwrap();
        let log = env.p("containerd.log");
        let child = Command::new(release.program("containerd").expect("containerd"))
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

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.ctr);
        c.arg("--address")
            .arg(self.p("containerd.sock"))
            .args(["--namespace", self.ns])
            .args(args)
            .env("PATH", &self.path);
        c
    }

    fn ctr_raw(&self, args: &[&str]) -> Output {
        output_within(&mut self.ctr_cmd(args), DEADLINE, None)
    }

    /// Run ctr (stdout to `to` if given); panics with both logs on failure.
    fn ctr_to(&self, args: &[&str], to: Option<&Path>) -> String {
        let out = output_within(&mut self.ctr_cmd(args), DEADLINE, to);
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

    fn ctr(&self, args: &[&str]) -> String {
        self.ctr_to(args, None)
    }

    fn snaps(&self, args: &[&str]) -> String {
        let mut a = vec!["snapshots", "--snapshotter", "rustfuse"];
        a.extend_from_slice(args);
        self.ctr(&a)
    }
}

// ---------------------------------------------------------------------------------------
// The image, and what the container does to it

/// Applets the container's script uses, as links in the image's /bin.
const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "ls",
    "mkdir",
    "rm",
    "mv",
    "chmod",
    "chown",
    "dd",
    "ln",
    "sync",
    "sha256sum",
];

/// Files of the image's second layer: path, content, mode, owner. Every one but
/// `data/unchanged.txt` is changed by [`SCRIPT`].
const LOWER: &[(&str, &str, u32, (u32, u32))] = &[
    ("hello", "from layer 2\n", 0o644, (0, 0)),
    ("data/unchanged.txt", "unchanged\n", 0o644, (0, 0)),
    ("data/modify.txt", "original\n", 0o640, (42, 43)),
    ("data/delete.txt", "delete me\n", 0o644, (0, 0)),
    ("data/tree/x.txt", "x\n", 0o644, (0, 0)),
    ("data/tree/a/b/c.txt", "c\n", 0o644, (0, 0)),
    ("data/replace/old1.txt", "old1\n", 0o644, (0, 0)),
    ("data/replace/old2/sub.txt", "sub\n", 0o644, (0, 0)),
    ("data/rename-src.txt", "rename me\n", 0o604, (7, 8)),
    ("data/chmod.txt", "chmod me\n", 0o644, (0, 0)),
    ("data/chown.txt", "chown me\n", 0o644, (0, 0)),
    ("data/linked1", "two names\n", 0o644, (0, 0)),
    ("data/app/conf", "app conf\n", 0o640, (5, 6)),
    ("data/app/bin/run", "run\n", 0o755, (0, 0)),
];

/// Hard links of the image's second layer: (new name, existing name).
const LOWER_LINKS: &[(&str, &str)] = &[("data/linked2", "data/linked1")];

/// The container's changes: new files and directories, a copy-up with a write, deletions of
/// a file and a tree, a directory replaced by a new one, a rename, chmod, chown, a big file,
/// a symlink and a hard link pair, a directory with lower content renamed (`redirect_dir=on`
/// in FUSE mode: one rename; kernel mode: EXDEV, and mv copies). Prints the big file's SHA-256.
const SCRIPT: &str = "set -e
cat /hello
echo new file > /new.txt
mkdir -p /data/newdir/deep
echo deep > /data/newdir/deep/f.txt
echo appended >> /data/modify.txt
rm /data/delete.txt
rm -r /data/tree
rm -r /data/replace
mkdir -m 0750 /data/replace
echo replaced > /data/replace/new.txt
mv /data/rename-src.txt /data/renamed.txt
mv /data/app /data/app.old
chmod 0751 /data/chmod.txt
chown 1234:5678 /data/chown.txt
dd if=/dev/urandom of=/data/big.bin bs=1048576 count=32 2>/dev/null
ln -s ../hello /data/link
echo pair > /data/hl1
ln /data/hl1 /data/hl2
chmod 0700 /data/linked1
sync
sha256sum /data/big.bin
";

/// A two-layer OCI image (busybox, then [`LOWER`]), built offline with umoci, as a tar.
fn build_image(dir: &Path) -> PathBuf {
    let img = dir.join("img");
    let image = format!("{}:latest", img.display());
    let bundle = dir.join("bundle");
    let umoci = |args: &[&str]| {
        run(Command::new("umoci").args(args));
    };
    let bundle_s = bundle.to_str().unwrap();
    umoci(&["init", "--layout", img.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, bundle_s]);
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(which("busybox").unwrap(), rootfs.join("bin/busybox")).unwrap();
    for l in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l)).unwrap();
    }
    umoci(&["repack", "--image", &image, bundle_s]);
    std::fs::remove_dir_all(&bundle).unwrap();
    umoci(&["unpack", "--image", &image, bundle_s]);
    for (path, content, mode, (uid, gid)) in LOWER {
        let p = rootfs.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        std::os::unix::fs::chown(&p, Some(*uid), Some(*gid)).unwrap();
    }
    for (new, existing) in LOWER_LINKS {
        std::fs::hard_link(rootfs.join(existing), rootfs.join(new)).unwrap();
    }
    umoci(&["repack", "--image", &image, bundle_s]);
    umoci(&["config", "--image", &image, "--config.cmd", "/bin/sh"]);
    let tar = dir.join("img.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&img)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    tar
}

// ---------------------------------------------------------------------------------------
// Reading a layer tar

/// One entry of a layer tar: its type and link target as `tar -tv` lists them, the rest
/// from what `tar -x` made of it.
#[derive(Debug)]
struct Entry {
    /// `-` file, `d` directory, `l` symlink, `h` hard link to an earlier entry, ...
    kind: char,
    /// Symlink target, or the name a hard link points to.
    link: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    ino: u64,
}

struct Layer {
    root: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl Layer {
    /// List `tar` and extract it (owners and modes kept, whiteouts as plain files) into `into`.
    fn read(tar: &Path, into: &Path) -> Layer {
        let list = run(Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(tar));
        std::fs::create_dir_all(into).unwrap();
        run(Command::new("tar")
            .args(["--numeric-owner", "--same-owner", "-xpf"])
            .arg(tar)
            .arg("-C")
            .arg(into));
        let norm = |s: &str| s.trim_start_matches("./").trim_end_matches('/').to_string();
        let mut entries = BTreeMap::new();
        for line in list.lines() {
            // perms uid/gid size date time name [-> target | link to target]
            let f: Vec<&str> = line.split_whitespace().collect();
            assert!(f.len() >= 6, "tar listing line: {line:?}");
            let rest = f[5..].join(" ");
            let (name, link) = if let Some((n, t)) = rest.split_once(" -> ") {
                (n.to_string(), t.to_string())
            } else if let Some((n, t)) = rest.split_once(" link to ") {
                (n.to_string(), norm(t))
            } else {
                (rest, String::new())
            };
            let name = norm(&name);
            if name.is_empty() || name == "." {
                continue;
            }
            let md = std::fs::symlink_metadata(into.join(&name))
                .unwrap_or_else(|e| panic!("extracted {name}: {e}"));
            let kind = f[0].chars().next().unwrap();
            let dup = entries.insert(
                name.clone(),
                Entry {
                    kind,
                    link,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if kind == 'd' { 0 } else { md.size() },
                    ino: md.ino(),
                },
            );
            assert!(dup.is_none(), "{name} twice in the layer:\n{list}");
        }
        Layer {
            root: into.to_path_buf(),
            entries,
        }
    }

    fn content(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.root.join(name)).unwrap_or_default()
    }

    /// The entries, one line each, for comparing two layers (no times, no inode numbers;
    /// contents of small files only).
    fn summary(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|(name, e)| {
                let content = if matches!(e.kind, '-' | 'h') && e.size <= 64 {
                    format!("{:?}", String::from_utf8_lossy(&self.content(name)))
                } else {
                    String::new()
                };
                format!(
                    "{name} {} {:o} {}:{} {} {} {content}",
                    e.kind, e.mode, e.uid, e.gid, e.size, e.link
                )
            })
            .collect()
    }
}

/// Directories runc creates in a rootfs as mount points (ctr's default spec): a diff may hold
/// them.
const RUNTIME_DIRS: &[&str] = &["dev", "proc", "sys", "run"];

/// Checks of a layer's entries: what is wrong, and which entries were looked at.
struct Check<'a> {
    l: &'a Layer,
    bad: Vec<String>,
    seen: std::collections::BTreeSet<String>,
}

impl<'a> Check<'a> {
    /// The entry `name`, if it is there with type `kind`.
    fn want(&mut self, name: &str, kind: char) -> Option<&'a Entry> {
        self.seen.insert(name.to_string());
        match self.l.entries.get(name) {
            Some(e) if e.kind == kind => Some(e),
            Some(e) => {
                self.bad
                    .push(format!("{name}: type {:?}, want {kind:?}", e.kind));
                None
            }
            None => {
                self.bad.push(format!("{name}: missing"));
                None
            }
        }
    }

    /// A regular file with this content and owner (and mode, if given).
    fn file(&mut self, name: &str, content: &str, mode: Option<u32>, owner: (u32, u32)) {
        let Some(e) = self.want(name, '-') else {
            return;
        };
        let got = self.l.content(name);
        if got != content.as_bytes() {
            self.bad.push(format!(
                "{name}: content {:?}, want {content:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        if let Some(m) = mode.filter(|m| *m != e.mode) {
            self.bad
                .push(format!("{name}: mode {:o}, want {m:o}", e.mode));
        }
        if (e.uid, e.gid) != owner {
            self.bad
                .push(format!("{name}: owner {}:{}, want {owner:?}", e.uid, e.gid));
        }
    }
}

/// Everything [`SCRIPT`] changed, checked in the diff; returns what is wrong.
fn check_changes(l: &Layer, big_sha: &str, mode: Mode) -> Vec<String> {
    let mut c = Check {
        l,
        bad: Vec::new(),
        seen: Default::default(),
    };
    c.file("new.txt", "new file\n", None, (0, 0));
    c.file("data/newdir/deep/f.txt", "deep\n", None, (0, 0));
    c.file(
        "data/modify.txt",
        "original\nappended\n",
        Some(0o640),
        (42, 43),
    );
    c.file("data/replace/new.txt", "replaced\n", None, (0, 0));
    c.file("data/renamed.txt", "rename me\n", Some(0o604), (7, 8));
    // The renamed directory: its whole tree under the new name, a whiteout at the old one,
    // whether the rename wrote a redirect (FUSE mode) or mv copied (kernel mode).
    c.file("data/app.old/conf", "app conf\n", Some(0o640), (5, 6));
    c.file("data/app.old/bin/run", "run\n", Some(0o755), (0, 0));
    c.file("data/chmod.txt", "chmod me\n", Some(0o751), (0, 0));
    c.file("data/chown.txt", "chown me\n", Some(0o644), (1234, 5678));
    // The hard link pair: the first one written is the file, the other a link to it.
    let pair = ["data/hl1", "data/hl2"];
    let first = pair
        .into_iter()
        .find(|n| l.entries.get(*n).is_some_and(|e| e.kind == '-'))
        .unwrap_or(pair[0]);
    let other = pair.into_iter().find(|n| *n != first).unwrap();
    c.file(first, "pair\n", None, (0, 0));
    if let Some(e) = c.want(other, 'h') {
        if e.link != first {
            c.bad
                .push(format!("{other}: links to {:?}, want {first:?}", e.link));
        }
        if l.entries.get(first).is_some_and(|f| f.ino != e.ino) {
            c.bad
                .push(format!("{other}: extracted as another inode than {first}"));
        }
    }
    // A chmod of one name of a lower hard link. FUSE mode keeps the names one file (kernel
    // overlayfs's index=on semantics): both are changed, one file and a link entry. Overlay
    // mode mounts kernel overlayfs with index=off, as containerd's own overlayfs snapshotter:
    // the copy-up breaks the link, the other name keeps the old mode and is not in the diff.
    c.file("data/linked1", "two names\n", Some(0o700), (0, 0));
    if mode == Mode::Fuse {
        if let Some(e) = c.want("data/linked2", 'h') {
            if e.link != "data/linked1" {
                c.bad.push(format!(
                    "data/linked2: links to {:?}, want data/linked1",
                    e.link
                ));
            }
        }
    }
    for dir in [
        "data",
        "data/newdir",
        "data/newdir/deep",
        "data/app.old",
        "data/app.old/bin",
    ] {
        c.want(dir, 'd');
    }
    if let Some(e) = c.want("data/replace", 'd') {
        if e.mode != 0o750 {
            c.bad
                .push(format!("data/replace: mode {:o}, want 750", e.mode));
        }
    }
    for wh in [
        "data/.wh.delete.txt",
        "data/.wh.tree",
        "data/.wh.rename-src.txt",
        "data/.wh.app",
    ] {
        c.want(wh, '-');
    }
    // The replaced directory: an opaque marker, or a whiteout of each old entry.
    let opaque = "data/replace/.wh..wh..opq";
    if l.entries.contains_key(opaque) {
        c.seen.insert(opaque.to_string());
    } else {
        for wh in ["data/replace/.wh.old1.txt", "data/replace/.wh.old2"] {
            c.want(wh, '-');
        }
    }
    if let Some(e) = c.want("data/link", 'l') {
        if e.link != "../hello" {
            c.bad
                .push(format!("data/link: target {:?}, want \"../hello\"", e.link));
        }
    }
    if let Some(e) = c.want("data/big.bin", '-') {
        if e.size != BIG_MIB << 20 {
            c.bad.push(format!(
                "data/big.bin: {} bytes, want {BIG_MIB} MiB",
                e.size
            ));
        }
        let sum = run(Command::new("sha256sum").arg(l.root.join("data/big.bin")));
        if sum.split_whitespace().next() != Some(big_sha) {
            c.bad.push(format!(
                "data/big.bin: sha256 {sum:?}, the container wrote {big_sha}"
            ));
        }
    }
    // Nothing else: unchanged files, the deleted trees' contents, the old directory's.
    for (name, e) in &l.entries {
        let runtime_dir = e.kind == 'd' && RUNTIME_DIRS.contains(&name.as_str());
        if !c.seen.contains(name) && !runtime_dir {
            c.bad.push(format!("{name}: in the diff, but not changed"));
        }
    }
    c.bad
}

/// Each test's diff summary, to compare across modes and releases.
static SUMMARIES: Mutex<Vec<(String, Vec<String>)>> = Mutex::new(Vec::new());

/// Compare `summary` with those of the tests that finished before (all must agree), then
/// record it.
fn compare_and_record(what: String, summary: Vec<String>) {
    let mut all = SUMMARIES.lock().unwrap_or_else(|e| e.into_inner());
    for (other, theirs) in all.iter() {
        let only_ours: Vec<&String> = summary.iter().filter(|l| !theirs.contains(l)).collect();
        let only_theirs: Vec<&String> = theirs.iter().filter(|l| !summary.contains(l)).collect();
        assert!(
            only_ours.is_empty() && only_theirs.is_empty(),
            "the diffs of {what} and {other} differ:\nonly in {what}: {only_ours:#?}\n\
             only in {other}: {only_theirs:#?}"
        );
        println!("{what}: the diff is the same as {other}'s");
    }
    all.push((what, summary));
}

// ---------------------------------------------------------------------------------------

fn e2e(mode: Mode, release: Release, ns: &'static str) {
    if let Some(reason) = unavailable(mode, &release) {
        skip(&reason);
        return;
    }
    let started = Instant::now();
    let env = Env::start(mode, &release, ns);

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
            .status
            .success()
    );
    env.snaps(&["rm", "v"]);
    env.snaps(&["rm", "child-c"]);
    env.snaps(&["rm", "base"]);

    // Import an image and run a container that changes its files.
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
        "--snapshotter",
        "rustfuse",
        "localhost/e2e:latest",
        env.ns,
        "/bin/sh",
        "-c",
        SCRIPT,
    ]);
    assert!(out.contains("from layer 2"), "{out}");
    let big_sha = out
        .lines()
        .find(|l| l.ends_with("/data/big.bin"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no sha256sum line in:\n{out}"))
        .to_string();

    // FUSE mode mounts with redirect_dir=on through mount.fuse3: the container's `mv` of a
    // directory from the image left a redirect in its upper directory and copied nothing.
    if mode == Mode::Fuse {
        let uppers: Vec<PathBuf> = std::fs::read_dir(env.p("snaproot/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().path().join("fs/data/app.old"))
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(uppers.len(), 1, "{uppers:?}");
        assert!(
            rustfuse_snapshotter::redirects::is_redirected(&uppers[0]),
            "{} holds no redirect: did mount.fuse3 pass redirect_dir=on?",
            uppers[0].display()
        );
        assert!(
            !uppers[0].join("conf").exists(),
            "the rename copied the tree up"
        );
    }

    // The container's snapshot (key = container id) against its parent, as an uncompressed
    // layer on ctr's stdout.
    let diff = env.p("diff.tar");
    env.ctr_to(
        &[
            "snapshots",
            "--snapshotter",
            "rustfuse",
            "diff",
            "--media-type",
            "application/vnd.oci.image.layer.v1.tar",
            env.ns,
        ],
        Some(&diff),
    );
    let layer = Layer::read(&diff, &env.p("diff"));
    let what = format!("{} {mode:?} mode", release.name());
    let summary = layer.summary();
    let shown = if summary.is_empty() {
        "(empty)".to_string()
    } else {
        summary.join("\n  ")
    };
    println!("{what}: the container's diff:\n  {shown}");
    let bad = check_changes(&layer, &big_sha, mode);
    assert!(
        bad.is_empty(),
        "{what}: `ctr snapshots diff` of the container's snapshot lacks changes:\n  {}\n\
         the diff:\n  {shown}",
        bad.join("\n  "),
    );
    // The other name of the lower hard link differs by mode (see check_changes).
    let common = summary
        .into_iter()
        .filter(|l| !l.starts_with("data/linked2 "))
        .collect();
    compare_and_record(what.clone(), common);

    // Removing the container removes its snapshot; the image layers stay.
    env.ctr(&["containers", "rm", env.ns]);
    let ls = env.snaps(&["ls"]);
    assert_eq!(ls.matches("Active").count(), 0, "{ls}");
    env.ctr(&["images", "rm", "--sync", "localhost/e2e:latest"]);
    println!("{what}: passed in {:?}", started.elapsed());
}

#[test]
fn containerd_overlay() {
    e2e(Mode::Overlay, Release::Debian, "rustfuse-e2e-overlay");
}

#[test]
fn containerd_fuse() {
    e2e(Mode::Fuse, Release::Debian, "rustfuse-e2e-fuse");
}

#[test]
fn containerd2_overlay() {
    e2e(Mode::Overlay, Release::v2(), "rustfuse-e2e2-overlay");
}

#[test]
fn containerd2_fuse() {
    e2e(Mode::Fuse, Release::v2(), "rustfuse-e2e2-fuse");
}
