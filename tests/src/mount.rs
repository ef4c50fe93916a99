//! Mount guards: kernel overlayfs or a FUSE overlay, always unmounted on drop (also on panic),
//! with a watchdog that aborts a hung FUSE connection so a broken daemon never wedges the run.

use std::ffi::{CString, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, mpsc};
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::env::{OP_DEADLINE, poll_until, run_command, watchdog_deadline};

/// How long a mount may take to appear in /proc/self/mountinfo, and a daemon to exit.
pub const MOUNT_DEADLINE: Duration = Duration::from_secs(10);

/// One line of /proc/self/mountinfo, the fields the tests need.
#[derive(Debug, Clone)]
pub struct MountInfo {
    /// `major:minor` of the mounted filesystem's st_dev.
    pub dev: (u32, u32),
    /// Mount point (unescaped).
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nodev,...`).
    pub mount_options: String,
    /// Filesystem type (`overlay`, `fuse.fuse-overlayfs`, ...).
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Superblock options.
    pub super_options: String,
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All mounts of this process's mount namespace.
pub fn mountinfo() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let (maj, min) = pre.get(2)?.split_once(':')?;
            Some(MountInfo {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                mount_point: PathBuf::from(unescape_mountinfo(pre.get(4)?)),
                mount_options: pre.get(5)?.to_string(),
                fstype: post.first()?.to_string(),
                source: unescape_mountinfo(post.get(1)?),
                super_options: post.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The topmost mount at `path` (already canonical), if any.
pub fn mount_at(path: &Path) -> Option<MountInfo> {
    mountinfo()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Mounts fusectl on /sys/fs/fuse/connections if it is not there yet (needed to abort hung
/// connections).
pub fn ensure_fusectl() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir = Path::new("/sys/fs/fuse/connections");
        if mountinfo()
            .iter()
            .any(|m| m.fstype == "fusectl" && m.mount_point == dir)
        {
            return;
        }
        if let Err(e) = rustix::mount::mount("fusectl", dir, "fusectl", MountFlags::empty(), None) {
            eprintln!("warning: cannot mount fusectl on {}: {e}", dir.display());
        }
    });
}

/// Aborts FUSE connection `conn` (all its pending and future requests fail with ENOTCONN).
pub fn abort_fuse_connection(conn: u32) -> bool {
    std::fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1").is_ok()
}

fn fuse_connection_exists(conn: u32) -> bool {
    Path::new(&format!("/sys/fs/fuse/connections/{conn}")).exists()
}

/// True while process `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    !matches!(process_state_letter(pid), None | Some('Z' | 'X'))
}

/// The state letter of `/proc/PID/stat` (R, S, D, Z, ...); none for a process that is gone
/// (a stat without a state reads as running).
fn process_state_letter(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesized command name.
    Some(
        stat.rsplit_once(") ")
            .and_then(|(_, r)| r.chars().next())
            .unwrap_or('R'),
    )
}

/// One descriptor a process holds: its number and what `/proc/PID/fd/N` links to.
#[derive(Debug, Clone)]
pub struct OpenFd {
    pid: i32,
    fd: String,
    /// What it points at (a path, `pipe:[N]`, `/dev/fuse`, a path ending in ` (deleted)`).
    pub target: PathBuf,
}

impl OpenFd {
    /// A field of its `/proc/PID/fdinfo/N` (`flags`, `pos`, ...), trimmed.
    pub fn info(&self, field: &str) -> Option<String> {
        let text =
            std::fs::read_to_string(format!("/proc/{}/fdinfo/{}", self.pid, self.fd)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    }
}

/// The descriptors process `pid` holds whose link can be read; none once it is gone.
pub fn open_fds(pid: i32) -> Vec<OpenFd> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            Some(OpenFd {
                pid,
                target: std::fs::read_link(e.path()).ok()?,
                fd: e.file_name().into_string().ok()?,
            })
        })
        .collect()
}

/// Finds the daemon serving the FUSE mount at `mnt`: a process with `/dev/fuse` open whose
/// command line names the mount point.
pub fn find_daemon_pid(mnt: &Path) -> Option<i32> {
    let mnt_bytes = mnt.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !cmdline.split(|b| *b == 0).any(|arg| arg == mnt_bytes) {
            continue;
        }
        if open_fds(pid)
            .iter()
            .any(|fd| fd.target == Path::new("/dev/fuse"))
        {
            return Some(pid);
        }
    }
    None
}

struct Watchdog {
    stop: mpsc::Sender<()>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(conn: u32, mnt: PathBuf, deadline: Duration) -> Watchdog {
        let (stop, rx) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let fired2 = fired.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(deadline) {
                eprintln!(
                    "watchdog: FUSE mount {} still in use after {deadline:?}, aborting connection {conn}",
                    mnt.display()
                );
                fired2.store(true, Ordering::SeqCst);
                abort_fuse_connection(conn);
            }
        });
        Watchdog { stop, fired }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kernel,
    Fuse,
}

/// A live mount; unmounted on drop (or explicitly with [`Mount::unmount`]).
pub struct Mount {
    mnt: PathBuf,
    kind: Kind,
    conn: Option<u32>,
    pid: Option<i32>,
    mounted: bool,
    watchdog: Option<Watchdog>,
    /// What the FUSE launcher printed on stderr (warnings).
    pub launcher_stderr: String,
}

/// The layer directories of a mount.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// Upper layer (None: read-only mount).
    pub upper: Option<PathBuf>,
    /// Work directory (with `upper`).
    pub work: Option<PathBuf>,
}

impl Stack {
    /// `lowerdir=..,upperdir=..,workdir=..` as both kernel overlayfs and fuse-overlayfs take it.
    pub fn options(&self) -> String {
        let lowers: Vec<String> = self
            .lowers
            .iter()
            .map(|p| p.display().to_string().replace(':', "\\:"))
            .collect();
        let mut s = format!("lowerdir={}", lowers.join(":"));
        if let Some(u) = &self.upper {
            s.push_str(&format!(",upperdir={}", u.display()));
        }
        if let Some(w) = &self.work {
            s.push_str(&format!(",workdir={}", w.display()));
        }
        s
    }
}

impl Mount {
    /// Mounts kernel overlayfs with `redirect_dir=off,index=off,metacopy=off` (the semantics
    /// fuse-overlayfs follows: merged directories cannot be renamed, EXDEV).
    pub fn kernel(stack: &Stack, mnt: &Path) -> Result<Mount, String> {
        let features = match stack.upper {
            Some(_) => "redirect_dir=off,index=off,metacopy=off",
            None => "",
        };
        Self::kernel_with(stack, mnt, features)
    }

    /// Mounts kernel overlayfs with `features` (e.g. `redirect_dir=on,index=off,metacopy=on`)
    /// instead of the defaults of [`Mount::kernel`].
    pub fn kernel_with(stack: &Stack, mnt: &Path, features: &str) -> Result<Mount, String> {
        let mnt = mnt
            .canonicalize()
            .map_err(|e| format!("{}: {e}", mnt.display()))?;
        let mut data = stack.options();
        if !features.is_empty() {
            data.push(',');
            data.push_str(features);
        }
        let mount = |data: &str| {
            let cdata = CString::new(data).expect("no NUL in options");
            rustix::mount::mount(
                "overlay",
                &mnt,
                "overlay",
                MountFlags::empty(),
                Some(cdata.as_c_str()),
            )
        };
        let mut result = mount(&data);
        // A kernel without metacopy (before 4.19) refuses the option (EINVAL) and has the
        // semantics `metacopy=off` asks for: mount again without it.
        if result == Err(rustix::io::Errno::INVAL)
            && features.split(',').any(|o| o == "metacopy=off")
        {
            let without: Vec<&str> = data.split(',').filter(|o| *o != "metacopy=off").collect();
            if mount(&without.join(",")).is_ok() {
                data = without.join(",");
                result = Ok(());
            }
        }
        result.map_err(|e| format!("mount -t overlay -o {data} {}: {e}", mnt.display()))?;
        Ok(Mount {
            mnt,
            kind: Kind::Kernel,
            conn: None,
            pid: None,
            mounted: true,
            watchdog: None,
            launcher_stderr: String::new(),
        })
    }

    /// Runs `bin -o <stack options>[,extra] MNT` and waits for the mount.
    pub fn fuse(
        bin: &Path,
        stack: &Stack,
        extra_opts: &[&str],
        mnt: &Path,
    ) -> Result<Mount, String> {
        Self::fuse_env(bin, stack, extra_opts, mnt, &[])
    }

    /// [`Mount::fuse`] with extra environment variables for the daemon.
    pub fn fuse_env(
        bin: &Path,
        stack: &Stack,
        extra_opts: &[&str],
        mnt: &Path,
        env: &[(&str, &str)],
    ) -> Result<Mount, String> {
        let mut opts = stack.options();
        for o in extra_opts {
            opts.push(',');
            opts.push_str(o);
        }
        let mnt = mnt
            .canonicalize()
            .map_err(|e| format!("{}: {e}", mnt.display()))?;
        let args = vec![
            OsString::from("-o"),
            OsString::from(opts),
            mnt.clone().into(),
        ];
        Self::fuse_args(bin, &args, &mnt, env)
    }

    /// A FUSE mount of `stack` whose daemon `bin` may open at most `nofile` descriptors:
    /// started under util-linux's `prlimit --nofile`, and without CAP_SYS_RESOURCE
    /// (`setpriv`), with which as root it would raise its own limit. `mnt` must be canonical.
    pub fn fuse_nofile(
        bin: &Path,
        stack: &Stack,
        nofile: u64,
        mnt: &Path,
    ) -> Result<Mount, String> {
        let args: Vec<OsString> = vec![
            format!("--nofile={nofile}:{nofile}").into(),
            "/usr/bin/setpriv".into(),
            "--bounding-set=-sys_resource".into(),
            bin.into(),
            "-o".into(),
            stack.options().into(),
            mnt.into(),
        ];
        Self::fuse_args(Path::new("/usr/bin/prlimit"), &args, mnt, &[])
    }

    /// Runs `bin ARGS...` (which must mount a FUSE filesystem at `mnt`, canonical path) and
    /// waits (deadline) for it to exit 0 and for the mount to show in /proc/self/mountinfo.
    pub fn fuse_args(
        bin: &Path,
        args: &[OsString],
        mnt: &Path,
        env: &[(&str, &str)],
    ) -> Result<Mount, String> {
        ensure_fusectl();
        let mut cmd = Command::new(bin);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_command(&mut cmd, MOUNT_DEADLINE)?;
        let is_fuse_mount = || mount_at(mnt).filter(|m| m.fstype.starts_with("fuse"));
        if !out.status.success() {
            // Whatever happened, don't leave a mount behind.
            if let Some(m) = is_fuse_mount() {
                let mut g = Mount::adopt(mnt, m.dev.1);
                let _ = g.do_unmount();
            }
            return Err(format!(
                "{} {:?} exited with {}: {}",
                bin.display(),
                args,
                out.code(),
                out.stderr.trim()
            ));
        }
        if !poll_until(MOUNT_DEADLINE, || is_fuse_mount().is_some()) {
            return Err(format!(
                "{} exited 0 but no FUSE mount appeared at {} within {MOUNT_DEADLINE:?}; stderr: {}",
                bin.display(),
                mnt.display(),
                out.stderr.trim()
            ));
        }
        let info = is_fuse_mount().expect("mount is there");
        let mut g = Mount::adopt(mnt, info.dev.1);
        g.launcher_stderr = out.stderr;
        Ok(g)
    }

    /// Takes charge of an existing FUSE mount at `mnt` (connection number `conn`).
    pub fn adopt(mnt: &Path, conn: u32) -> Mount {
        let pid = find_daemon_pid(mnt);
        Mount {
            mnt: mnt.to_path_buf(),
            kind: Kind::Fuse,
            conn: Some(conn),
            pid,
            mounted: true,
            watchdog: Some(Watchdog::start(
                conn,
                mnt.to_path_buf(),
                watchdog_deadline(),
            )),
            launcher_stderr: String::new(),
        }
    }

    /// Restarts the watchdog of a FUSE mount so that it fires `deadline` from now instead of
    /// [`watchdog_deadline`] after mounting: for load and scale tests that keep a mount busy
    /// longer on purpose (they watch each operation with a shorter deadline of their own).
    pub fn rearm_watchdog(&mut self, deadline: Duration) {
        if let (Some(conn), Some(w)) = (self.conn, self.watchdog.take()) {
            let _ = w.stop.send(());
            self.watchdog = Some(Watchdog::start(conn, self.mnt.clone(), deadline));
        }
    }

    /// FUSE connection number (`/sys/fs/fuse/connections/N`), for a FUSE mount.
    pub fn connection(&self) -> Option<u32> {
        self.conn
    }

    /// The merged view.
    pub fn root(&self) -> &Path {
        &self.mnt
    }

    /// True for a FUSE mount.
    pub fn is_fuse(&self) -> bool {
        self.kind == Kind::Fuse
    }

    /// PID of the FUSE daemon, when found.
    pub fn daemon_pid(&self) -> Option<i32> {
        self.pid
    }

    /// Unmounts and, for FUSE, waits for the daemon to exit (so the upper dir is final).
    pub fn unmount(mut self) -> Result<(), String> {
        let r = self.do_unmount();
        let fired = self
            .watchdog
            .as_ref()
            .is_some_and(|w| w.fired.load(Ordering::SeqCst));
        if fired {
            return Err(format!(
                "watchdog aborted the FUSE connection of {} (hung filesystem)",
                self.mnt.display()
            ));
        }
        r
    }

    /// For a mount ended from outside (`fusermount3 -u`, `umount -l`, ...): waits up to
    /// `deadline` for the mount to leave /proc/self/mountinfo, its FUSE connection to close and
    /// the daemon to exit, then disarms the guard. On failure the guard stays armed, so dropping
    /// it still cleans up.
    pub fn wait_gone(&mut self, deadline: Duration) -> Result<(), String> {
        let conn = self.conn;
        let still_mounted =
            || mount_at(&self.mnt).is_some_and(|m| conn.is_none_or(|c| m.dev == (0, c)));
        let mut problems = Vec::new();
        if !poll_until(deadline, || !still_mounted()) {
            problems.push(format!("{} still mounted", self.mnt.display()));
        }
        if let Some(pid) = self.pid {
            if !poll_until(deadline, || !process_alive(pid)) {
                problems.push(format!("daemon pid {pid} still running"));
            }
        }
        if let Some(c) = conn {
            if !poll_until(deadline, || !fuse_connection_exists(c)) {
                problems.push(format!("FUSE connection {c} still open"));
            }
        }
        if !problems.is_empty() {
            return Err(format!("after {deadline:?}: {}", problems.join("; ")));
        }
        self.mounted = false;
        if let Some(w) = self.watchdog.take() {
            let _ = w.stop.send(());
        }
        Ok(())
    }

    fn do_unmount(&mut self) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let mut problems = Vec::new();
        if self.kind == Kind::Kernel {
            if let Err(e) = unmount_waiting_while_busy(&self.mnt) {
                problems.push(format!("umount {}: {e}", self.mnt.display()));
                let _ = rustix::mount::unmount(&self.mnt, UnmountFlags::DETACH);
            }
        } else {
            let conn = self.conn.expect("fuse mount has a connection");
            // A plain unmount ends the FUSE connection at once; a lazy one (the fallback,
            // when something still holds a file or a cwd in the mount after 5 s) keeps the
            // connection, and the daemon, alive until the last reference goes.
            if unmount_waiting_while_busy(&self.mnt).is_err() {
                if let Err(e) = rustix::mount::unmount(&self.mnt, UnmountFlags::DETACH) {
                    problems.push(format!("umount -l {}: {e}", self.mnt.display()));
                }
            }
            let gone = || match self.pid {
                Some(pid) => !process_alive(pid),
                None => !fuse_connection_exists(conn),
            };
            if !poll_until(MOUNT_DEADLINE, gone) {
                problems.push(format!(
                    "FUSE daemon (pid {:?}, connection {conn}) still running {MOUNT_DEADLINE:?} after unmount ({}): aborted",
                    self.pid,
                    self.pid.map(process_state).unwrap_or_default()
                ));
                abort_fuse_connection(conn);
                if !poll_until(Duration::from_secs(2), gone) {
                    if let Some(pid) = self.pid.and_then(rustix::process::Pid::from_raw) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                }
            }
        }
        if let Some(w) = self.watchdog.take() {
            let _ = w.stop.send(());
            if w.fired.load(Ordering::SeqCst) {
                // keep the flag visible to `unmount`
                self.watchdog = Some(w);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// umount(2), retried for up to 5 s while it answers EBUSY: that can be brief (another test
/// thread's child, forked but not yet exec'd, holds copies of this thread's close-on-exec
/// descriptors into the mount).
fn unmount_waiting_while_busy(mnt: &Path) -> rustix::io::Result<()> {
    let mut res = rustix::mount::unmount(mnt, UnmountFlags::empty());
    let busy_until = Instant::now() + Duration::from_secs(5);
    while res == Err(rustix::io::Errno::BUSY) && Instant::now() < busy_until {
        std::thread::sleep(Duration::from_millis(10));
        res = rustix::mount::unmount(mnt, UnmountFlags::empty());
    }
    res
}

/// What a process is doing, for a report: its state and where it sleeps in the kernel.
fn process_state(pid: i32) -> String {
    let state = process_state_letter(pid).map_or("gone".to_string(), String::from);
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    format!("state {state}, {threads} threads, wchan {wchan:?}")
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            eprintln!("warning: {e}");
        }
    }
}

/// Runs `f` with a deadline of [`OP_DEADLINE`]; on a FUSE mount a hang is turned into a test
/// failure (the watchdog or the guard's drop aborts the connection to free the stuck thread).
pub fn timed<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    crate::env::with_deadline(OP_DEADLINE, what, f)
}

/// An ext4 in an image file, loop-mounted for one test and unmounted on drop (declare it
/// before a FUSE mount on top of it, so it is dropped after).
pub struct LoopExt4 {
    pub path: PathBuf,
}

impl LoopExt4 {
    /// `mkfs.ext4 MKFS_ARGS` of a 64 MiB image beside `path`, mounted at `path`.
    pub fn mount(path: &Path, mkfs_args: &[&str]) -> LoopExt4 {
        let img = path.with_extension("img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .unwrap_or_else(|e| panic!("create {}: {e}", img.display()));
        let run = |cmd: &mut Command, what: &str| {
            let out =
                run_command(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(out.code() == 0, "{what}: {}", out.report());
        };
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .args(mkfs_args)
                .arg(&img),
            "mkfs.ext4",
        );
        std::fs::create_dir_all(path).unwrap();
        run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(path),
            "mount -o loop",
        );
        LoopExt4 {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
