//! Child processes: long-running ones killed on drop, and commands run with a timeout.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub use rustfuse_snapshotter::mode::which;

/// A long-running child: SIGTERM, then SIGKILL after 20 s, on [`Proc::stop`] or drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
        let f = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .with_context(|| format!("start {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until `sock` accepts connections (or the process dies, or 60 s pass).
    pub fn wait_socket(&mut self, sock: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("{} exited with {st}:\n{}", self.name, self.log_text());
            }
            if Instant::now() > deadline {
                bail!("{} did not listen in time:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The result of a command that exited successfully.
pub struct Ran {
    pub stdout: String,
    pub elapsed: Duration,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Run `cmd` (stdin from /dev/null, output to files in `scratch`) and fail if it does not
/// exit with 0 within `timeout` (it is then killed). `elapsed` is spawn to exit, polled
/// every 0.5 ms.
pub fn run(cmd: &mut Command, timeout: Duration, scratch: &Path) -> anyhow::Result<Ran> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let out_p = scratch.join(format!("cmd-{n}.out"));
    let err_p = scratch.join(format!("cmd-{n}.err"));
    let out_f = std::fs::File::create(&out_p)?;
    let err_f = std::fs::File::create(&err_p)?;
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_f)
        .stderr(err_f)
        .spawn()
        .with_context(|| format!("exec {shown}"))?;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{shown}: timed out after {timeout:?}\n{}",
                std::fs::read_to_string(&err_p).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let elapsed = start.elapsed();
    let stdout = std::fs::read_to_string(&out_p).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_p).unwrap_or_default();
    let _ = std::fs::remove_file(&out_p);
    let _ = std::fs::remove_file(&err_p);
    if !status.success() {
        bail!("{shown}: {status}\nstdout: {stdout}\nstderr: {stderr}");
    }
    Ok(Ran { stdout, elapsed })
}
