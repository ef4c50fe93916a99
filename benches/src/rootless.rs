//! Rootless runs: every filesystem mounted by a non-root user inside a user namespace, the way
//! rootless podman runs them.
//!
//! Each run of a workload is a child `setpriv --reuid 65534 ... unshare -Urm rustfuse-compare
//! __cycle ...`: it mounts, measures and unmounts inside its own user and mount namespace and
//! prints the value. Dropping caches needs real root, so the child asks the parent over its
//! stdout ("DROP") and waits for the answer on its stdin. On a timeout or Ctrl-C the parent
//! kills the child's process group and the FUSE daemons serving its mountpoint (they left the
//! group when they daemonized), which tears the namespace and its mounts down.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::mount::{self, Fs, Kind};
use crate::run;
use crate::workloads::{Ctx, WORKLOADS};

/// The unprivileged user the filesystems run as (outside the namespace).
pub const UID: u32 = 65534;

/// In the child: have the root parent drop the caches.
pub fn ask_parent_to_drop_caches() -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(b"DROP\n")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "ok" {
        bail!("parent could not drop caches: {}", line.trim());
    }
    Ok(())
}

/// In the child (`__cycle FS_ID KIND BIN WORKLOAD`): one measured run.
pub fn cycle_main(ctx: &Ctx, args: &[String]) -> Result<()> {
    let [id, kind, bin, wname] = args else {
        bail!("__cycle needs FS_ID KIND BIN WORKLOAD");
    };
    let id: &'static str = ["kernel", "fo1", "fo2", "rustfuse", "rustfuse-b", "floor"]
        .into_iter()
        .find(|k| k == id)
        .with_context(|| format!("unknown filesystem {id}"))?;
    let fs = Fs {
        id,
        label: id,
        kind: match kind.as_str() {
            "kernel" => Kind::Kernel,
            "floor" => Kind::Floor,
            _ => Kind::Fuse,
        },
        bin: bin.into(),
        version: String::new(),
        missing: None,
    };
    let w = WORKLOADS
        .iter()
        .find(|w| w.name == wname)
        .with_context(|| format!("unknown workload {wname}"))?;
    let v = ctx.run(&fs, w)?;
    let mut out = std::io::stdout().lock();
    if let Some([a, b, c]) = crate::workloads::take_latency() {
        writeln!(out, "LAT {a} {b} {c}")?;
    }
    if let Some(d) = crate::view::take() {
        writeln!(out, "VIEW {d}")?;
    }
    match v {
        Some(v) => writeln!(out, "VALUE {v}")?,
        None => writeln!(out, "NONE")?,
    }
    out.flush()?;
    Ok(())
}

fn chown_tree(p: &Path) -> Result<()> {
    run::run_ok(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{UID}:{UID}"))
            .arg(p),
        Duration::from_secs(120),
    )?;
    Ok(())
}

/// Kill the daemons serving `mnt` (in any namespace: their command line names it).
fn kill_daemons(mnt: &Path) {
    let want = mnt.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline"))
            && c.split(|b| *b == 0).any(|a| a == want)
            && let Some(p) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}

/// In the parent: one run of `wname` on `fs` inside a fresh user namespace.
pub fn run_in_userns(
    ctx: &Ctx,
    fs: &Fs,
    wname: &str,
    cycle_args: &[String],
) -> Result<Option<f64>> {
    run::check_interrupted()?;
    ctx.fresh_dirs(fs)?;
    let base = ctx.run_root.join(fs.id);
    chown_tree(&base)?;
    let mnt = base.join("mnt");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
        .arg("--clear-groups")
        .args(["unshare", "-Urm", "--"])
        .arg(&ctx.exe)
        .arg("__cycle")
        .args(cycle_args)
        .arg("--")
        .args([
            fs.id,
            match fs.kind {
                Kind::Kernel => "kernel",
                Kind::Floor => "floor",
                Kind::Fuse => "fuse",
            },
        ])
        .arg(&fs.bin)
        .arg(wname)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawn setpriv/unshare")?;
    let pid = child.id();
    let mut stdin = child.stdin.take().context("child stdin")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        let _ = etx.send(s);
    });
    // Generous: the child's own commands have the same deadline each.
    let deadline = Instant::now() + ctx.timeout * 4;
    let mut value = None;
    let outcome = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line == "DROP" => {
                let answer = match mount::drop_caches() {
                    Ok(()) => "ok\n".to_string(),
                    Err(e) => format!("{e:#}\n"),
                };
                stdin.write_all(answer.as_bytes())?;
                stdin.flush()?;
            }
            Ok(line) => {
                if let Some(v) = line.strip_prefix("VALUE ") {
                    value = Some(v.parse::<f64>().context("child value")?);
                }
                if let Some(v) = line.strip_prefix("LAT ") {
                    crate::workloads::set_latency(v)?;
                }
                if let Some(v) = line.strip_prefix("VIEW ") {
                    crate::view::set(v.parse().context("child view hash")?);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    break Err(anyhow::anyhow!("timed out"));
                }
                if run::interrupted() {
                    break Err(anyhow::anyhow!("interrupted"));
                }
            }
        }
    };
    if outcome.is_err()
        && let Some(p) = rustix::process::Pid::from_raw(pid as i32)
    {
        let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
    }
    let status = child.wait()?;
    // Daemons that outlive their namespace's last user would keep the mount alive.
    kill_daemons(&mnt);
    outcome?;
    if !status.success() {
        let err = erx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
        bail!(
            "rootless run failed ({status}): {}",
            err.trim().chars().take(600).collect::<String>()
        );
    }
    Ok(value)
}
