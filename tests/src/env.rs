//! The environment of a test run: binaries, privileges, deadlines, child processes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Root of the Cargo workspace (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// The FUSE overlay binary under test: `$RUSTFUSE_BIN`, else `<workspace>/target/debug/rustfuse`.
///
/// Deliberately not derived from `CARGO_TARGET_DIR`: the tests may be built in another target
/// directory than the daemon.
pub fn bin_under_test() -> PathBuf {
    match std::env::var_os("RUSTFUSE_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/debug/rustfuse"),
    }
}

/// The snapshotter binary: `$RUSTFUSE_SNAPSHOTTER_BIN`, else `rustfuse-snapshotter` beside
/// [`bin_under_test`].
pub fn snapshotter_bin() -> PathBuf {
    match std::env::var_os("RUSTFUSE_SNAPSHOTTER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => bin_under_test()
            .parent()
            .map(|d| d.join("rustfuse-snapshotter"))
            .unwrap_or_default(),
    }
}

/// The daemon built with the `fault-injection` feature (`$RUSTFUSE_FAULT_BIN`, else
/// `<workspace>/target/fault-injection/debug/rustfuse`, where `tests/run.sh` builds it):
/// a fault is planned on a live mount through the `rustfuse.fault` xattr.
pub fn fault_injection_bin() -> PathBuf {
    match std::env::var_os("RUSTFUSE_FAULT_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/fault-injection/debug/rustfuse"),
    }
}

/// `sh -c SCRIPT sh ARGS...` as uid/gid 65534 (no groups) in a new user and mount namespace
/// (`setpriv ... unshare -Urm`), where that user is root: how the rootless tests mount. Add the
/// script's arguments with `.arg()`.
pub fn rootless_sh(script: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "unshare",
        "-Urm",
        "sh",
        "-c",
        script,
        "sh",
    ]);
    c
}

/// Where `prog` is: PATH, then the sbin/bin directories.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Debian's fuse-overlayfs (`$FUSE_OVERLAYFS_BIN`, else `/usr/bin/fuse-overlayfs`), if present.
pub fn fuse_overlayfs_bin() -> Option<PathBuf> {
    let p = match std::env::var_os("FUSE_OVERLAYFS_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/usr/bin/fuse-overlayfs"),
    };
    p.exists().then_some(p)
}

/// Creates `dir/bin/NAME`, a symlink to the binary under test, and returns its path: to run it
/// under another name (`fuse-overlayfs`) or find it on PATH (`mount.fuse3` runs `NAME` through
/// /bin/sh). See [`path_with`].
pub fn bin_alias(dir: &Path, name: &str) -> PathBuf {
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("create bin dir");
    let link = bin_dir.join(name);
    let target = bin_under_test()
        .canonicalize()
        .unwrap_or_else(|_| bin_under_test());
    std::os::unix::fs::symlink(target, &link).expect("symlink to the binary under test");
    link
}

/// `$PATH` with `dir` in front.
pub fn path_with(dir: &Path) -> String {
    match std::env::var("PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", dir.display()),
    }
}

/// True when running under CI (`CI=true`): a test that cannot run must fail, not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Report that a test cannot run. Under `CI=true` this panics with the reason; otherwise it prints
/// `SKIPPED: <reason>` and returns `false`, so a test can `if !skip(..) { return }`.
pub fn skip(reason: &str) -> bool {
    if in_ci() {
        panic!("cannot run under CI=true: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

/// Checks that the test can mount: euid 0 and `/dev/fuse` present. Returns `false` (after
/// printing `SKIPPED: ...`) when it cannot; panics instead under `CI=true`.
pub fn require_privileged() -> bool {
    if !rustix::process::geteuid().is_root() {
        return skip("needs root (euid 0) to mount");
    }
    if !Path::new("/dev/fuse").exists() {
        return skip("/dev/fuse is missing");
    }
    true
}

/// Lets non-root users open /dev/fuse (mode 0666, Debian's udev default), saying so when this
/// changes it; `what` names the test in the note.
pub fn dev_fuse_for_everyone(what: &str) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = std::fs::metadata("/dev/fuse").map_err(|e| format!("/dev/fuse: {e}"))?;
    if md.mode() & 0o006 == 0o006 {
        return Ok(());
    }
    eprintln!(
        "note: /dev/fuse is {:o}; setting it to 0666 (Debian's default) for {what}",
        md.mode() & 0o777
    );
    std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("/dev/fuse not usable by a non-root user: {e}"))
}

/// [`require_privileged`] plus the binary under test must exist.
pub fn require_bin_under_test() -> bool {
    require_built(
        &bin_under_test(),
        "build it with `cargo build -p rustfuse` or set RUSTFUSE_BIN",
    )
}

/// [`require_privileged`] plus the fault-injection build of the daemon must exist.
pub fn require_fault_injection_bin() -> bool {
    require_built(
        &fault_injection_bin(),
        "build it with `cargo build -p rustfuse --features fault-injection --target-dir target/fault-injection` or set RUSTFUSE_FAULT_BIN",
    )
}

/// [`require_privileged`] plus `bin` must exist (`how`: how to make it).
fn require_built(bin: &Path, how: &str) -> bool {
    if !require_privileged() {
        return false;
    }
    if !bin.exists() {
        return skip(&format!(
            "binary under test {} does not exist ({how})",
            bin.display()
        ));
    }
    true
}

/// [`require_privileged`] plus Debian's fuse-overlayfs must be installed.
pub fn require_fuse_overlayfs() -> bool {
    if !require_privileged() {
        return false;
    }
    if fuse_overlayfs_bin().is_none() {
        return skip("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)");
    }
    true
}

/// Default deadline for one filesystem operation or one command.
pub const OP_DEADLINE: Duration = Duration::from_secs(10);

/// The number in environment variable `name`, when it is set and parses.
pub fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// How many times longer every deadline of [`with_deadline`], [`run_command`] and
/// [`poll_until`] is: `$RUSTFUSE_TEST_TIME_SCALE` (a whole number, default 1). tests/kernel.sh
/// sets it in a guest under software emulation (TCG), several times slower than the host.
pub fn time_scale() -> u32 {
    env_number::<u32>("RUSTFUSE_TEST_TIME_SCALE")
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// Per-mount watchdog deadline: after this long a FUSE connection is aborted and the test
/// fails. `$RUSTFUSE_TEST_WATCHDOG_SECS` overrides it.
pub fn watchdog_deadline() -> Duration {
    env_number("RUSTFUSE_TEST_WATCHDOG_SECS")
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(90))
}

/// Runs `f` on another thread and waits at most `deadline` (times [`time_scale`]) for it. On
/// timeout it panics with `what`; the thread is left behind (a blocked filesystem call cannot be
/// cancelled, but the mount guard's watchdog or drop aborts the FUSE connection, which unblocks
/// it).
pub fn with_deadline<T: Send + 'static>(
    deadline: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let deadline = deadline * time_scale();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("deadline: {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn thread");
    match rx.recv_timeout(deadline) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {deadline:?} (filesystem hung?)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// Output of a command run by [`run_command`].
#[derive(Debug)]
pub struct CmdOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// How long the command took.
    pub elapsed: Duration,
}

impl CmdOutput {
    /// `(exit N):` and both outputs, for the message of a command that failed.
    pub fn report(&self) -> String {
        format!(
            "(exit {}):\nstdout:\n{}\nstderr:\n{}",
            self.code(),
            self.stdout,
            self.stderr
        )
    }

    /// Exit code, or -signal when killed.
    pub fn code(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        self.status
            .code()
            .unwrap_or_else(|| -self.status.signal().unwrap_or(0))
    }
}

/// Runs a command with stdout/stderr sent to files (not pipes: a daemon that forgets to close
/// inherited pipes must not make us wait forever) and a deadline: after `deadline` (times
/// [`time_scale`]) the child is killed and an error returned.
pub fn run_command(cmd: &mut Command, deadline: Duration) -> Result<CmdOutput, String> {
    let deadline = deadline * time_scale();
    let out = tempfile::tempfile().map_err(|e| format!("tempfile: {e}"))?;
    let err = tempfile::tempfile().map_err(|e| format!("tempfile: {e}"))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(err.try_clone().map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{cmd:?} did not exit within {deadline:?} (killed); stderr: {}",
                    read_all(err)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("wait for {cmd:?}: {e}")),
        }
    };
    Ok(CmdOutput {
        status,
        stdout: read_all(out),
        stderr: read_all(err),
        elapsed: start.elapsed(),
    })
}

fn read_all(mut f: File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut s = Vec::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.read_to_end(&mut s);
    String::from_utf8_lossy(&s).into_owned()
}

/// Polls `cond` every few milliseconds until it is true or `deadline` (times [`time_scale`])
/// passes.
pub fn poll_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = deadline * time_scale();
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A scratch directory for one test, under `$RUSTFUSE_TEST_TMPDIR` or `/tmp`, removed on drop.
/// Kept (and its path printed) when `$RUSTFUSE_TEST_KEEP` is set, for post-mortems.
pub struct Scratch {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Scratch {
    /// Path of the directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates a [`Scratch`] directory whose name starts with `rustfuse-<name>-`.
pub fn scratch(name: &str) -> Scratch {
    let base = std::env::var_os("RUSTFUSE_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix(&format!("rustfuse-{name}-"))
        .tempdir_in(base)
        .expect("create scratch dir");
    if std::env::var_os("RUSTFUSE_TEST_KEEP").is_some() {
        let path = dir.keep();
        eprintln!("scratch dir kept: {}", path.display());
        return Scratch { path, _dir: None };
    }
    Scratch {
        path: dir.path().to_path_buf(),
        _dir: Some(dir),
    }
}
