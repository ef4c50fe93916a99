//! Running commands with a deadline, and noticing Ctrl-C.
//!
//! Every command runs in its own process group so a timeout or an interrupt can kill all of
//! it (a pipeline, make's children). A process stuck in a hung FUSE mount may not die until the
//! connection is aborted; the caller's mount guard does that, so the runner gives up waiting
//! after a grace period instead of blocking forever.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set a flag that every wait checks; the error it causes unwinds
/// through the mount guards, which unmount.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and the
        // function pointer has the `extern "C" fn(c_int)` signature `signal` expects.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// How a finished command went.
pub struct Done {
    pub elapsed: Duration,
    pub status: ExitStatus,
    pub stderr: String,
}

fn kill_group(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
    }
}

fn reader(r: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut r) = r {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            let _ = tx.send(String::from_utf8_lossy(&v).into_owned());
        });
    }
    rx
}

/// Run `cmd` to completion or until `timeout`; the elapsed time is wall time from spawn to
/// exit. Standard output is discarded.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Done> {
    check_interrupted()?;
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    let pid = child.id();
    let err = reader(child.stderr.take());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(st) => {
                let elapsed = start.elapsed();
                let status = st.with_context(|| format!("wait for {what}"))?;
                let grace = Duration::from_secs(2);
                return Ok(Done {
                    elapsed,
                    status,
                    stderr: err.recv_timeout(grace).unwrap_or_default(),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let timed_out = start.elapsed() > timeout;
                if timed_out || interrupted() {
                    kill_group(pid);
                    let _ = rx.recv_timeout(Duration::from_secs(5));
                    if timed_out {
                        bail!("timed out after {:?}: {what}", timeout);
                    }
                    bail!("interrupted: {what}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("lost the wait for {what}"),
        }
    }
}

/// Like `run`, but a non-zero exit is an error that carries the command's stderr.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Done> {
    let what = format!("{cmd:?}");
    let d = run(cmd, timeout)?;
    if !d.status.success() {
        bail!(
            "{what} failed ({}): {}",
            d.status,
            d.stderr.trim().chars().take(600).collect::<String>()
        );
    }
    Ok(d)
}

/// `sh -c SCRIPT` in `dir`.
pub fn sh(dir: &std::path::Path, script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).current_dir(dir);
    c
}
