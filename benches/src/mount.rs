//! Mounting each filesystem under test, and the guard that always unmounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::run;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Kernel,
    Fuse,
    /// libfuse's passthrough_ll over one flattened tree (`lowers[0]`; no upper).
    Floor,
}

/// One filesystem under test.
#[derive(Clone, Debug)]
pub struct Fs {
    /// Short id used in JSON and on the command line.
    pub id: &'static str,
    /// Column title.
    pub label: &'static str,
    pub kind: Kind,
    pub bin: PathBuf,
    pub version: String,
    /// Why it cannot run, when it cannot.
    pub missing: Option<String>,
}

/// How the filesystems are mounted in this run.
#[derive(Debug, Clone, Copy)]
pub struct How {
    /// Inside a user namespace: kernel overlayfs with `userxattr`.
    pub userxattr: bool,
    /// Kernel overlayfs with `redirect_dir=on,metacopy=on` (not with `userxattr`), rustfuse
    /// with `-o metacopy=on`.
    pub metacopy: bool,
    /// Kernel overlayfs (not with `userxattr`, which refuses it) and rustfuse with
    /// `redirect_dir=on`: renames of lower directories without copying them.
    pub redirect_dir: bool,
    /// No upper layer: a read-only mount of the lower layers.
    pub read_only: bool,
    /// `--count-requests`: every FUSE daemon in the foreground, logging each request it
    /// gets to the mount log (see `requests`).
    pub count: bool,
}

const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
const UMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// A mounted overlay; unmounted on drop, forcibly if need be.
pub struct Mount {
    pub mnt: PathBuf,
    /// FUSE connection number (the minor of the mount's device).
    pub conn: Option<u32>,
    /// The mount command; for tools that stay in the foreground it is the daemon.
    child: Option<Child>,
    mounted: bool,
}

/// The entry for `mnt` in /proc/self/mountinfo: (fstype, minor).
pub fn find_mount(mnt: &Path) -> Option<(String, u32)> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_str()?;
    let mut found = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 5 || f[4] != want {
            continue;
        }
        let minor = f[2].split(':').nth(1).and_then(|m| m.parse().ok());
        let fstype = line
            .split(" - ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or("");
        found = Some((fstype.to_string(), minor.unwrap_or(0)));
    }
    found
}

fn abort_connection(conn: u32) {
    let _ = fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
}

/// Unmount whatever is stacked on `mnt` (leftovers of an interrupted run).
pub fn clear_mountpoint(mnt: &Path) {
    for _ in 0..8 {
        let Some((fstype, minor)) = find_mount(mnt) else {
            return;
        };
        if fstype.starts_with("fuse") {
            abort_connection(minor);
        }
        let _ = run::run(
            Command::new("umount").arg("-l").arg(mnt),
            Duration::from_secs(10),
        );
    }
}

/// `lowerdir=`'s value: the paths joined with `:`.
pub fn join(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

impl Mount {
    /// Mount `lowers` (top first) with `upper`/`work` at `mnt`; returns the guard and the time
    /// until the mount was visible in the mount table.
    pub fn new(
        fs: &Fs,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        mnt: &Path,
        log: &Path,
        how: How,
    ) -> Result<(Mount, Duration)> {
        let How {
            userxattr,
            metacopy,
            redirect_dir,
            read_only,
            count,
        } = how;
        run::check_interrupted()?;
        clear_mountpoint(mnt);
        let mut opts = match read_only {
            true => format!("lowerdir={}", join(lowers)),
            false => format!(
                "lowerdir={},upperdir={},workdir={}",
                join(lowers),
                upper.display(),
                work.display()
            ),
        };
        let mut cmd = match fs.kind {
            Kind::Kernel => {
                if userxattr {
                    opts.push_str(",userxattr");
                } else if metacopy {
                    // Not with userxattr: kernel overlayfs refuses metacopy there.
                    opts.push_str(",redirect_dir=on,metacopy=on");
                } else if redirect_dir {
                    opts.push_str(",redirect_dir=on");
                }
                let mut c = Command::new("mount");
                c.args(["-t", "overlay", "overlay", "-o", &opts]);
                c
            }
            Kind::Floor => {
                let mut c = Command::new(&fs.bin);
                let tree = lowers.first().context("the floor needs its tree")?;
                c.arg("-o").arg(format!("source={},xattr", tree.display()));
                if count {
                    // libfuse's debug output names every opcode (and implies -f).
                    c.arg("-d");
                }
                c
            }
            Kind::Fuse => {
                if metacopy && fs.id.starts_with("rustfuse") {
                    opts.push_str(",metacopy=on");
                }
                if redirect_dir && fs.id.starts_with("rustfuse") {
                    opts.push_str(",redirect_dir=on");
                }
                let mut c = Command::new(&fs.bin);
                c.arg("-o").arg(&opts);
                if count {
                    match fs.id {
                        // libfuse: `-d` logs every opcode and stays in the foreground.
                        "fo1" => {
                            c.arg("-d");
                        }
                        // fuser logs every request at debug level (fuse-overlayfs 2.0 through
                        // `log`, rustfuse through its tracing filter).
                        _ => {
                            c.arg("-f")
                                .env("RUST_LOG", "fuser::request=debug")
                                .env("RUSTFUSE_LOG", "fuser::request=debug");
                        }
                    }
                }
                c
            }
        };
        // Appended to while counting (find-remount mounts twice), else one mount's log.
        let logf = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(count)
            .truncate(!count)
            .open(log)
            .with_context(|| format!("create {}", log.display()))?;
        cmd.arg(mnt)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", fs.bin.display()))?;
        let mut exited = false;
        loop {
            if let Some((fstype, minor)) = find_mount(mnt) {
                let elapsed = start.elapsed();
                let conn = fstype.starts_with("fuse").then_some(minor);
                return Ok((
                    Mount {
                        mnt: mnt.to_path_buf(),
                        conn,
                        child: Some(child),
                        mounted: true,
                    },
                    elapsed,
                ));
            }
            if !exited && let Some(st) = child.try_wait()? {
                exited = true;
                if !st.success() {
                    let msg = fs::read_to_string(log).unwrap_or_default();
                    bail!(
                        "{} mount failed ({st}): {}",
                        fs.label,
                        msg.trim().chars().take(600).collect::<String>()
                    );
                }
            }
            if start.elapsed() > MOUNT_TIMEOUT || run::interrupted() {
                let _ = child.kill();
                let _ = child.wait();
                clear_mountpoint(mnt);
                bail!("{} did not mount {} in time", fs.label, mnt.display());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The FUSE daemon serving this mount: the process whose command line names the
    /// mountpoint (the tools fork, so the spawned pid is not always it).
    pub fn daemon_pid(&self) -> Option<i32> {
        let me = std::process::id() as i32;
        let want = self.mnt.as_os_str().as_encoded_bytes();
        let mut best = None;
        for e in fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if cmdline.split(|b| *b == 0).any(|a| a == want) {
                best = Some(pid);
            }
        }
        best
    }

    /// Unmount; a stuck unmount aborts the FUSE connection and detaches lazily.
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        // A FUSE daemon may still be at work after the unmount (rustfuse syncs the copy-ups
        // it had not synced yet): wait for it below, so that work is not measured as part of
        // the next workload, whichever filesystem that runs on.
        let daemon = self.conn.and_then(|_| self.daemon_pid());
        let r = run::run(Command::new("umount").arg(&self.mnt), UMOUNT_TIMEOUT);
        let clean = matches!(&r, Ok(d) if d.status.success());
        if !clean || find_mount(&self.mnt).is_some() {
            self.force();
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
        if let Some(pid) = daemon {
            wait_for_exit(pid, DAEMON_EXIT_TIMEOUT);
        }
        match r {
            Ok(d) if d.status.success() => Ok(()),
            Ok(d) => bail!("umount {} failed: {}", self.mnt.display(), d.stderr.trim()),
            Err(e) => Err(e),
        }
    }

    fn force(&mut self) {
        if let Some(c) = self.conn {
            abort_connection(c);
        }
        clear_mountpoint(&self.mnt);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            if std::thread::panicking() || run::interrupted() {
                // Do not trust the daemon: abort first so nothing below blocks.
                self.force();
                self.mounted = false;
            } else if let Err(e) = self.unmount() {
                eprintln!("warning: {e:#}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.try_wait();
        }
    }
}

/// How long a FUSE daemon may take to end after its unmount before the run goes on.
const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Wait until process `pid` is gone (or a zombie), `timeout` at most; a warning if not.
fn wait_for_exit(pid: i32, timeout: Duration) {
    let ended = rustfuse_tests::env::poll_until(timeout, || {
        !rustfuse_tests::mount::process_alive(pid) || run::interrupted()
    });
    if !ended {
        eprintln!(
            "warning: the daemon (pid {pid}) was still running {}s after its unmount",
            timeout.as_secs()
        );
    }
}

/// Drop the page, dentry and inode caches (the cold cases).
pub fn drop_caches() -> Result<()> {
    rustix::fs::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context("write /proc/sys/vm/drop_caches")
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: i32) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("VmRSS:") {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse()?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmRSS for pid {pid}")
}
