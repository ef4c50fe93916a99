//! The harness the snapshotter's integration tests share: the real `rustfuse-snapshotter`
//! binary as a child process on its own socket and root (start, SIGTERM stop, SIGKILL), a
//! blocking gRPC client, and mounting what Mounts returns with a guard that unmounts on drop.
//!
//! Each test binary uses its own subset of it, hence the `dead_code` allowance.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the shared harness"
)]

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustfuse_snapshotter::api::Mount;
use rustfuse_snapshotter::api::snapshots::{self as pb, snapshots_client::SnapshotsClient};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

pub const BIN: &str = env!("CARGO_BIN_EXE_rustfuse-snapshotter");
pub const GC_ROOT: &str = "containerd.io/gc.root";
pub const MOUNT_DEADLINE: Duration = Duration::from_secs(20);
pub const START_DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Environment: privileges, mode, skipping

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Overlay,
    Fuse,
}

impl Mode {
    pub fn arg(self) -> &'static str {
        match self {
            Mode::Overlay => "overlay",
            Mode::Fuse => "fuse",
        }
    }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skip (or fail under CI=true) with `reason`.
pub fn skip(reason: &str) {
    if in_ci() {
        panic!("CI=true and this privileged test cannot run: {reason}");
    }
    println!("SKIPPED: {reason}");
    eprintln!("SKIPPED: {reason}");
}

/// The FUSE program the tests exec for `fuse3.rustfuse` mounts.
pub fn fuse_program() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RUSTFUSE_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let mut candidates =
        vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/rustfuse")];
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("debug/rustfuse"));
    }
    // Next to our own binary (same target directory).
    if let Some(dir) = Path::new(BIN).parent() {
        candidates.push(dir.join("rustfuse"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Why `mode` cannot run here, if it cannot.
pub fn unavailable(mode: Mode) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("conformance tests mount and need root".into());
    }
    if mode == Mode::Fuse {
        if !Path::new("/dev/fuse").exists() {
            return Some("/dev/fuse is missing".into());
        }
        if fuse_program().is_none() {
            return Some("no FUSE program: set RUSTFUSE_BIN or build target/debug/rustfuse".into());
        }
    }
    None
}

/// True when `mode` can run here; else reports SKIPPED (or fails under `CI=true`).
pub fn can_run(mode: Mode) -> bool {
    match unavailable(mode) {
        Some(reason) => {
            skip(&reason);
            false
        }
        None => true,
    }
}

// ---------------------------------------------------------------------------------------
// The server under test and a blocking client

pub struct Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub mode: Mode,
    /// The `--mode` given instead of `mode`'s (e.g. `auto`), from the next spawn on.
    pub choice: Option<&'static str>,
    /// A command the server runs under (e.g. `unshare -Urm`), from the next spawn on.
    pub wrapper: Vec<String>,
    log: PathBuf,
    args: Vec<String>,
}

impl Server {
    pub fn start(mode: Mode) -> Server {
        Server::start_with(mode, &[])
    }

    /// [`Server::start`] with more `serve` arguments (e.g. `--group`).
    pub fn start_with(mode: Mode, args: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("snap-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        let mut s = Server {
            child: None,
            log: dir.path().join("server.log"),
            dir,
            mode,
            choice: None,
            wrapper: Vec::new(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn();
        s
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("snap.sock")
    }

    /// A scratch directory for mount points and flat trees.
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Start the server and wait until it listens; a server that exits first is an error
    /// holding its exit status and log.
    pub fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .arg("serve")
            .arg("--address")
            .arg(self.socket())
            .arg("--root")
            .arg(self.root())
            .args([
                "--mode",
                self.choice.unwrap_or(self.mode.arg()),
                "--log-level",
                "rustfuse_snapshotter=debug,info",
            ])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start rustfuse-snapshotter");
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "server exited with {st} before listening:\n{}",
                    self.log_text()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "server did not listen in time:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    assert!(st.success(), "server exit {st}:\n{}", self.log_text());
                    return;
                }
                _ if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("server did not stop on SIGTERM:\n{}", self.log_text());
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket())
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<rustix::process::Pid> {
        let child = self.child.as_ref()?;
        rustix::process::Pid::from_raw(child.id() as i32)
    }

    /// Wait for a server that was sent SIGKILL (by [`Server::pid`]) to be gone, and check
    /// that it was the signal that ended it.
    pub fn reap_killed(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let st = child.wait().expect("wait for the server");
        assert_eq!(
            st.signal(),
            Some(9),
            "server ended by {st}, not SIGKILL:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL now and wait for it.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        self.reap_killed();
    }

    /// The test's scratch directory (root, socket, log and work all live in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything still mounted under our directory goes first.
        for m in mounts_under(self.dir.path()) {
            let _ = rustix::mount::unmount(m.as_path(), UnmountFlags::DETACH);
        }
    }
}

pub struct Client {
    pub rt: tokio::runtime::Runtime,
    pub c: SnapshotsClient<Channel>,
    /// The connection, for calls the generated client cannot make (raw bodies).
    pub channel: Channel,
}

pub type R<T> = Result<T, tonic::Status>;

pub fn gc_labels() -> HashMap<String, String> {
    labels(&[(GC_ROOT, "conformance")])
}

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Client {
    pub fn connect(socket: &Path) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .timeout(Duration::from_secs(60))
                    .connect_with_connector(tower::service_fn(move |_| {
                        let socket = socket.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
            })
            .expect("connect to the snapshotter socket");
        Client {
            rt,
            c: SnapshotsClient::new(channel.clone()),
            channel,
        }
    }

    pub fn prepare_l(&self, key: &str, parent: &str, l: HashMap<String, String>) -> R<Vec<Mount>> {
        let mut c = self.c.clone();
        let req = pb::PrepareSnapshotRequest {
            snapshotter: "rustfuse".into(),
            key: key.into(),
            parent: parent.into(),
            labels: l,
        };
        self.rt
            .block_on(c.prepare(req))
            .map(|r| r.into_inner().mounts)
    }

    pub fn prepare(&self, key: &str, parent: &str) -> R<Vec<Mount>> {
        self.prepare_l(key, parent, gc_labels())
    }

    pub fn view_l(&self, key: &str, parent: &str, l: HashMap<String, String>) -> R<Vec<Mount>> {
        let mut c = self.c.clone();
        let req = pb::ViewSnapshotRequest {
            snapshotter: "rustfuse".into(),
            key: key.into(),
            parent: parent.into(),
            labels: l,
        };
        self.rt.block_on(c.view(req)).map(|r| r.into_inner().mounts)
    }

    pub fn view(&self, key: &str, parent: &str) -> R<Vec<Mount>> {
        self.view_l(key, parent, gc_labels())
    }

    pub fn mounts(&self, key: &str) -> R<Vec<Mount>> {
        let mut c = self.c.clone();
        let req = pb::MountsRequest {
            snapshotter: "rustfuse".into(),
            key: key.into(),
        };
        self.rt
            .block_on(c.mounts(req))
            .map(|r| r.into_inner().mounts)
    }

    pub fn commit_l(&self, name: &str, key: &str, l: HashMap<String, String>) -> R<()> {
        let mut c = self.c.clone();
        let req = pb::CommitSnapshotRequest {
            snapshotter: "rustfuse".into(),
            name: name.into(),
            key: key.into(),
            labels: l,
            parent: String::new(),
        };
        self.rt.block_on(c.commit(req)).map(|_| ())
    }

    pub fn commit(&self, name: &str, key: &str) -> R<()> {
        self.commit_l(name, key, gc_labels())
    }

    pub fn remove(&self, key: &str) -> R<()> {
        let mut c = self.c.clone();
        let req = pb::RemoveSnapshotRequest {
            snapshotter: "rustfuse".into(),
            key: key.into(),
        };
        self.rt.block_on(c.remove(req)).map(|_| ())
    }

    pub fn stat(&self, key: &str) -> R<pb::Info> {
        let mut c = self.c.clone();
        let req = pb::StatSnapshotRequest {
            snapshotter: "rustfuse".into(),
            key: key.into(),
        };
        self.rt
            .block_on(c.stat(req))
            .map(|r| r.into_inner().info.expect("stat returns info"))
    }

    pub fn update(&self, info: &pb::Info, paths: &[&str]) -> R<pb::Info> {
        let mut c = self.c.clone();
        let req = pb::UpdateSnapshotRequest {
            snapshotter: "rustfuse".into(),
            info: Some(info.clone()),
            update_mask: if paths.is_empty() {
                None
            } else {
                Some(prost_types::FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                })
            },
        };
        self.rt
            .block_on(c.update(req))
            .map(|r| r.into_inner().info.expect("update returns info"))
    }

    /// List with `filters`; also returns the number of stream messages.
    pub fn list_batches(&self, filters: &[&str]) -> R<(Vec<pb::Info>, usize)> {
        let mut c = self.c.clone();
        let req = pb::ListSnapshotsRequest {
            snapshotter: "rustfuse".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        self.rt.block_on(async move {
            let mut stream = c.list(req).await?.into_inner();
            let mut out = Vec::new();
            let mut batches = 0;
            while let Some(msg) = stream.message().await? {
                batches += 1;
                out.extend(msg.info);
            }
            Ok((out, batches))
        })
    }

    pub fn list(&self, filters: &[&str]) -> R<Vec<pb::Info>> {
        self.list_batches(filters).map(|(v, _)| v)
    }

    pub fn names(&self, filters: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = self
            .list(filters)
            .unwrap_or_else(|e| panic!("list {filters:?}: {e}"))
            .into_iter()
            .map(|i| i.name)
            .collect();
        v.sort();
        v
    }

    pub fn usage(&self, key: &str) -> R<(i64, i64)> {
        let mut c = self.c.clone();
        let req = pb::UsageRequest {
            snapshotter: "rustfuse".into(),
            key: key.into(),
        };
        self.rt.block_on(c.usage(req)).map(|r| {
            let r = r.into_inner();
            (r.size, r.inodes)
        })
    }

    pub fn cleanup(&self) -> R<()> {
        let mut c = self.c.clone();
        let req = pb::CleanupRequest {
            snapshotter: "rustfuse".into(),
        };
        self.rt.block_on(c.cleanup(req)).map(|_| ())
    }
}

pub fn assert_code<T: std::fmt::Debug>(r: R<T>, code: Code, names: &str) {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code: {s:?}");
            assert!(
                s.message().contains(names),
                "message {:?} should name {names:?}",
                s.message()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Mounting what Mounts returns

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v
}

pub fn unescape_mountinfo(s: &str) -> PathBuf {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(n) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(n);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

pub fn is_mountpoint(target: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mountinfo(p) == target)
}

/// Unmounts (lazily) on drop, even on panic.
pub struct MountGuard {
    target: PathBuf,
    mounted: bool,
}

impl MountGuard {
    /// The guard of a mount made at `target` by other means.
    pub fn adopt(target: &Path) -> MountGuard {
        MountGuard {
            target: target.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmount now (as before a Commit) and wait until it is gone.
    pub fn unmount(mut self) {
        self.do_unmount();
    }

    fn do_unmount(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        let deadline = Instant::now() + MOUNT_DEADLINE;
        loop {
            match rustix::mount::unmount(self.target.as_path(), UnmountFlags::empty()) {
                Ok(()) => break,
                Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(_) => {
                    let _ = rustix::mount::unmount(self.target.as_path(), UnmountFlags::DETACH);
                    break;
                }
            }
        }
        while is_mountpoint(&self.target) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.mounted {
            let _ = rustix::mount::unmount(self.target.as_path(), UnmountFlags::DETACH);
        }
    }
}

pub fn wait_mounted(target: &Path) {
    let deadline = Instant::now() + MOUNT_DEADLINE;
    while !is_mountpoint(target) {
        assert!(
            Instant::now() < deadline,
            "{} not mounted in time",
            target.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kernel overlay through the new mount API: one `lowerdir+` per layer, so 128-layer
/// option strings that exceed a page still mount (containerd works around the same limit
/// by shortening paths).
pub fn mount_overlay(options: &[String], target: &Path) -> std::io::Result<()> {
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for o in options {
        match o.split_once('=') {
            Some(("lowerdir", v)) => {
                for l in rustfuse::options::split_lowerdirs(v) {
                    rustix::mount::fsconfig_set_string(&fs, "lowerdir+", l.as_path())?;
                }
            }
            Some((k, v)) => rustix::mount::fsconfig_set_string(&fs, k, v)?,
            None => rustix::mount::fsconfig_set_flag(&fs, o.as_str())?,
        }
    }
    rustix::mount::fsconfig_create(&fs)?;
    let m = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
    rustix::mount::move_mount(
        &m,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

/// Mount the (single) mount `mounts` describes at `target`.
pub fn mount_all(mounts: &[Mount], target: &Path) -> MountGuard {
    assert_eq!(mounts.len(), 1, "expected one mount, got {mounts:?}");
    let m = &mounts[0];
    std::fs::create_dir_all(target).unwrap();
    match m.r#type.as_str() {
        "bind" => {
            rustix::mount::mount_bind_recursive(m.source.as_str(), target)
                .unwrap_or_else(|e| panic!("bind {m:?}: {e}"));
            if m.options.iter().any(|o| o == "ro") {
                rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
                    .unwrap_or_else(|e| panic!("remount ro {m:?}: {e}"));
            }
        }
        "overlay" => {
            if let Err(e) = mount_overlay(&m.options, target) {
                // Kernels without `lowerdir+`: plain mount(2).
                let data = CString::new(m.options.join(",")).unwrap();
                rustix::mount::mount(
                    "overlay",
                    target,
                    "overlay",
                    MountFlags::empty(),
                    data.as_c_str(),
                )
                .unwrap_or_else(|e2| panic!("overlay {m:?}: fsopen: {e}; mount: {e2}"));
            }
        }
        t if t.starts_with("fuse3.") => {
            let prog = fuse_program().expect("FUSE program");
            let out = Command::new(&prog)
                .arg("-o")
                .arg(m.options.join(","))
                .arg(target)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("exec {}: {e}", prog.display()));
            assert!(
                out.status.success(),
                "{} -o {} {}: {}\n{}",
                prog.display(),
                m.options.join(","),
                target.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        other => panic!("unexpected mount type {other:?}"),
    }
    wait_mounted(target);
    MountGuard {
        target: target.to_path_buf(),
        mounted: true,
    }
}

/// The entry names of `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// Randomness without a dependency, and reading snapshots back

/// `$var` as a number, else `default`.
pub fn env_number(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (xorshift64*). The seed is printed so a failing run can
/// be repeated with `RUSTFUSE_TEST_SEED=N`.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `$RUSTFUSE_TEST_SEED`, else from the clock; prints the seed with `what`.
    pub fn from_env(what: &str) -> Rng {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let seed = env_number("RUSTFUSE_TEST_SEED", clock);
        eprintln!("{what}: RUSTFUSE_TEST_SEED={seed}");
        Rng::new(seed)
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// Every regular file under `root` (relative path → content); panics on anything that is
/// neither a file nor a directory.
pub fn read_files(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let ft = std::fs::symlink_metadata(&p).unwrap().file_type();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(name, std::fs::read(&p).unwrap());
            } else {
                panic!("unexpected {ft:?} at {}", p.display());
            }
        }
    }
    out
}

/// The snapshot directory (`<root>/snapshots/<id>/fs`) a mount spec reads from first: a bind
/// mount's source, else an overlay's upperdir, else its topmost lowerdir. Returns the id too.
pub fn first_dir(mounts: &[Mount]) -> (u64, PathBuf) {
    let m = &mounts[0];
    let dir = if m.r#type == "bind" {
        PathBuf::from(&m.source)
    } else {
        let opt = |k: &str| m.options.iter().find_map(|o| o.strip_prefix(k));
        match opt("upperdir=") {
            Some(u) => PathBuf::from(u),
            None => {
                let l = opt("lowerdir=").unwrap_or_else(|| panic!("no lowerdir in {m:?}"));
                rustfuse::options::split_lowerdirs(l)[0].clone()
            }
        }
    };
    assert_eq!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("fs"),
        "{m:?}"
    );
    let id = dir
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no snapshot id in {}", dir.display()));
    (id, dir)
}
