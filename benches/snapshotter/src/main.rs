//! `rustfuse-snapshotter-bench`: rustfuse-snapshotter against containerd's built-in
//! overlayfs snapshotter, both driven through one private containerd (Debian's 1.6).
//!
//! - Workload A: cycles of Prepare(parent = a committed base) + Mounts + mount(2) (or the
//!   FUSE program) + write a 4 KiB file + unmount + Commit + Remove, through containerd's
//!   snapshots API on containerd's socket, interleaved in rounds between snapshotters; after
//!   each batch a synchronous garbage collection (where containerd removes the snapshot
//!   directories) is timed too.
//! - Workload B: a 50-layer image built offline with umoci, imported once without unpacking,
//!   then `ctr images mount` (unpack all layers + a view mount), repetitions interleaved.
//!
//! Needs root, containerd/ctr, umoci, busybox-static (and fuse3 + `rustfuse` for `--fuse`).
//! Run by hand only: it refuses to do anything without root.

mod grpc;
mod image;
mod mnt;
mod proc;
mod report;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

use crate::grpc::Client;
use crate::proc::{Proc, Ran, run, which};
use crate::report::{Cycles, Unpacks};

#[derive(Parser, Debug)]
#[command(
    name = "rustfuse-snapshotter-bench",
    about = "rustfuse-snapshotter vs containerd's overlayfs snapshotter, through containerd (needs root)"
)]
struct Args {
    /// Workload A: Prepare+Mount+Commit+Remove cycles per snapshotter.
    #[arg(long, default_value_t = 200)]
    cycles: usize,
    /// Workload A: rounds the cycles are split into, interleaved between snapshotters.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Workload B: layers of the image (including the busybox base layer).
    #[arg(long, default_value_t = 50)]
    layers: usize,
    /// Workload B: small files per layer (each layer also gets one 1 MiB file).
    #[arg(long, default_value_t = 200)]
    files: usize,
    /// Workload B: unpack repetitions per snapshotter.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Also benchmark rustfuse-snapshotter in FUSE mode (`--mode fuse`).
    #[arg(long)]
    fuse: bool,
    /// Workload A also against a rustfuse-snapshotter (overlay mode) not behind containerd,
    /// on its own socket: the cost of containerd's proxy hop.
    #[arg(long)]
    direct: bool,
    /// Skip workload A.
    #[arg(long)]
    no_cycles: bool,
    /// Skip workload B.
    #[arg(long)]
    no_unpack: bool,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Directory for the benchmark's own directory (a real disk, not tmpfs, for fairness).
    #[arg(long, default_value = "/var/tmp", value_name = "DIR")]
    workdir: PathBuf,
    /// Keep the benchmark's directory (logs) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// The rustfuse-snapshotter binary [default: next to this binary, else target/release].
    #[arg(long, value_name = "PATH")]
    snapshotter_bin: Option<PathBuf>,
    /// The rustfuse FUSE program [default: next to this binary, else target/release].
    #[arg(long, value_name = "PATH")]
    rustfuse_bin: Option<PathBuf>,
}

/// One snapshotter as containerd names it.
#[derive(Clone, Copy)]
pub struct Target {
    pub label: &'static str,
    pub sn: &'static str,
}

const OVERLAYFS: Target = Target {
    label: "containerd overlayfs",
    sn: "overlayfs",
};
const RUSTFUSE: Target = Target {
    label: "rustfuse (overlay mode)",
    sn: "rustfuse",
};
const RUSTFUSE_FUSE: Target = Target {
    label: "rustfuse (fuse mode)",
    sn: "rustfuse-fuse",
};

const RUSTFUSE_DIRECT: Target = Target {
    label: "rustfuse (overlay mode) direct, no containerd",
    sn: "rustfuse-direct",
};
const IMPORT_ONLY: Target = Target {
    label: "import only (--no-unpack)",
    sn: "",
};

const IMAGE: &str = "localhost/bench-layers:latest";
const CTR_TIMEOUT: Duration = Duration::from_secs(120);
const UNPACK_TIMEOUT: Duration = Duration::from_secs(900);

fn find_bin(explicit: Option<PathBuf>, name: &str) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p);
    }
    let mut c = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        c.push(dir.join(name));
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    c.push(ws.join("release").join(name));
    c.push(ws.join("debug").join(name));
    c.into_iter().find(|p| p.is_file())
}

/// The private containerd, the rustfuse-snapshotter instances, and the directory they use.
/// Dropping it unmounts everything under the directory and stops every process.
struct Env {
    dir: PathBuf,
    scratch: PathBuf,
    path: OsString,
    fuse_program: PathBuf,
    procs: Vec<Proc>,
    gc_counter: u64,
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for Env {
    fn drop(&mut self) {
        mnt::unmount_all_under(&self.dir);
        while let Some(mut p) = self.procs.pop() {
            p.stop();
        }
        mnt::unmount_all_under(&self.dir);
    }
}

impl Env {
    fn start(args: &Args, snap_bin: &Path, fuse_program: &Path) -> anyhow::Result<Env> {
        std::fs::create_dir_all(&args.workdir)?;
        let tmp = tempfile::Builder::new()
            .prefix("rsb-")
            .tempdir_in(&args.workdir)
            .context("create the benchmark directory")?;
        let dir = tmp.path().to_path_buf();
        let bin = dir.join("bin");
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(&scratch)?;
        std::os::unix::fs::symlink(std::fs::canonicalize(fuse_program)?, bin.join("rustfuse"))?;
        let mut path = bin.into_os_string();
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        path.push(":/usr/sbin:/sbin");
        let mut env = Env {
            dir: dir.clone(),
            scratch,
            path,
            fuse_program: fuse_program.to_path_buf(),
            procs: Vec::new(),
            gc_counter: 0,
            _tmp: if args.keep {
                println!("keeping {}", dir.display());
                let _ = tmp.keep();
                None
            } else {
                Some(tmp)
            },
        };
        let d = dir.display();
        let mut proxies = String::new();
        let mut modes = vec![("rustfuse", "overlay", true)];
        if args.fuse {
            modes.push(("rustfuse-fuse", "fuse", true));
        }
        if args.direct {
            modes.push(("rustfuse-direct", "overlay", false));
        }
        for (name, mode, proxy) in modes {
            let sock = dir.join(format!("{name}.sock"));
            let mut p = Proc::spawn(
                name,
                Command::new(snap_bin)
                    .arg("serve")
                    .arg("--address")
                    .arg(&sock)
                    .arg("--root")
                    .arg(dir.join(format!("{name}-root")))
                    .args(["--mode", mode])
                    .env("PATH", &env.path),
                dir.join(format!("{name}.log")),
            )?;
            p.wait_socket(&sock)?;
            env.procs.push(p);
            if !proxy {
                continue;
            }
            proxies.push_str(&format!(
                "  [proxy_plugins.{name}]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                sock.display()
            ));
        }
        std::fs::write(
            dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/croot"
state = "{d}/cstate"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[proxy_plugins]
{proxies}"#
            ),
        )?;
        let mut c = Proc::spawn(
            "containerd",
            Command::new("containerd")
                .arg("--config")
                .arg(dir.join("config.toml"))
                .env("PATH", &env.path),
            dir.join("containerd.log"),
        )?;
        c.wait_socket(&dir.join("containerd.sock"))?;
        env.procs.push(c);
        Ok(env)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn ctr(&self, args: &[&str], timeout: Duration) -> anyhow::Result<Ran> {
        run(
            Command::new("ctr")
                .arg("--address")
                .arg(self.socket())
                .args(["--namespace", grpc::NAMESPACE])
                .args(args)
                .env("PATH", &self.path),
            timeout,
            &self.scratch,
        )
    }

    /// A synchronous garbage collection: containerd removes the directories of removed
    /// snapshots only then (its Remove just drops the metadata). Returns its duration.
    fn gc(&mut self) -> anyhow::Result<Duration> {
        self.gc_counter += 1;
        let id = format!("bench-gc-{}", self.gc_counter);
        self.ctr(&["leases", "create", "--id", &id], CTR_TIMEOUT)?;
        Ok(self
            .ctr(&["leases", "rm", "--sync", &id], CTR_TIMEOUT)?
            .elapsed)
    }

    fn check_plugins(&self, targets: &[Target]) -> anyhow::Result<()> {
        let out = self.ctr(&["plugins", "ls"], CTR_TIMEOUT)?.stdout;
        for t in targets {
            let ok = out.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() == 4
                    && f[0] == "io.containerd.snapshotter.v1"
                    && f[1] == t.sn
                    && f[3] == "ok"
            });
            if !ok {
                bail!("snapshotter {} not ok in `ctr plugins ls`:\n{out}", t.sn);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Workload A

fn setup_base(env: &Env, c: &Client, t: Target) -> anyhow::Result<()> {
    let m = c.prepare(t.sn, "base-active", "")?;
    let target = env.dir.join(format!("a-{}", t.sn));
    std::fs::create_dir_all(&target)?;
    mnt::mount(&m, &target, &env.fuse_program)?;
    let r = (|| {
        for i in 0..100 {
            let d = target.join(format!("etc/d{}", i % 10));
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join(format!("f{i}")), format!("base file {i}\n"))?;
        }
        Ok::<_, std::io::Error>(())
    })();
    mnt::unmount(&target)?;
    r?;
    c.commit(t.sn, "base", "base-active")
}

/// One cycle; the durations of the phases in [`report::PHASES`] order.
fn cycle(env: &Env, c: &Client, t: Target, i: usize, check: bool) -> anyhow::Result<[Duration; 7]> {
    let key = format!("a-{i}-active");
    let name = format!("a-{i}");
    let target = env.dir.join(format!("a-{}", t.sn));
    let payload = [0x5au8; 4096];
    let t0 = Instant::now();
    c.prepare(t.sn, &key, "base")?;
    let t1 = Instant::now();
    let m = c.mounts(t.sn, &key)?;
    let t2 = Instant::now();
    mnt::mount(&m, &target, &env.fuse_program)?;
    let t3 = Instant::now();
    let w = std::fs::write(target.join(format!("new-{i}")), payload);
    let t4 = Instant::now();
    let seen = check.then(|| target.join("etc/d3/f13").is_file());
    let t4 = if check { Instant::now() } else { t4 };
    mnt::unmount(&target)?;
    let t5 = Instant::now();
    w.with_context(|| format!("{}: write in the mount", t.sn))?;
    if seen == Some(false) {
        bail!(
            "{}: the base's files are not visible in the mount {m:?}",
            t.sn
        );
    }
    c.commit(t.sn, &name, &key)?;
    let t6 = Instant::now();
    c.remove(t.sn, &name)?;
    let t7 = Instant::now();
    Ok([
        t1 - t0,
        t2 - t1,
        t3 - t2,
        t4 - t3,
        t5 - t4,
        t6 - t5,
        t7 - t6,
    ])
}

fn workload_a(
    env: &mut Env,
    c: &Client,
    targets: &[Target],
    args: &Args,
) -> anyhow::Result<Vec<Cycles>> {
    let direct = if args.direct {
        Some(Client::connect(&env.dir.join("rustfuse-direct.sock"))?)
    } else {
        None
    };
    let mut targets = targets.to_vec();
    if direct.is_some() {
        targets.push(RUSTFUSE_DIRECT);
    }
    let client = |t: Target| match &direct {
        Some(d) if t.sn == RUSTFUSE_DIRECT.sn => d,
        _ => c,
    };
    let mut res: Vec<Cycles> = targets.iter().map(|t| Cycles::new(*t)).collect();
    for t in &targets {
        setup_base(env, client(*t), *t)?;
    }
    env.gc()?;
    let rounds = args.rounds.max(1);
    let per_round = args.cycles.div_ceil(rounds);
    let mut done = 0;
    for r in 0..rounds {
        let n = per_round.min(args.cycles - done);
        if n == 0 {
            break;
        }
        for k in 0..targets.len() {
            let ti = (k + r) % targets.len();
            let t = targets[ti];
            rustix::fs::sync();
            for j in 0..n {
                let i = done + j;
                let phases = cycle(env, client(t), t, i, i == 0)?;
                res[ti].cycles.push(phases);
            }
            let gc = env.gc()?;
            res[ti].gc_per_cycle.push(gc / n as u32);
        }
        done += n;
        eprintln!(
            "workload A: round {}/{rounds} done ({done} cycles each)",
            r + 1
        );
    }
    for t in &targets {
        client(*t).remove_all(t.sn)?;
    }
    env.gc()?;
    Ok(res)
}

// ---------------------------------------------------------------------------------------
// Workload B

/// One import of the image archive: unpacking into `t` (timed), then a View of the top
/// layer mounted (timed separately) and checked, and the snapshots removed; with `t` None,
/// an import without unpacking (the baseline: reading the archive, content already there).
fn unpack_once(
    env: &mut Env,
    c: &Client,
    t: Option<Target>,
    tar: &Path,
    layers: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let tar = tar.to_str().context("non-UTF-8 path")?;
    let base = IMAGE.trim_end_matches(":latest");
    rustix::fs::sync();
    let Some(t) = t else {
        let ran = env.ctr(
            &["images", "import", "--no-unpack", "--base-name", base, tar],
            UNPACK_TIMEOUT,
        )?;
        return Ok((ran.elapsed, Duration::ZERO));
    };
    let ran = env.ctr(
        &[
            "images",
            "import",
            "--snapshotter",
            t.sn,
            "--base-name",
            base,
            tar,
        ],
        UNPACK_TIMEOUT,
    )?;
    let listed = c.list(t.sn)?;
    let committed: Vec<_> = listed
        .iter()
        .filter(|i| i.kind == rustfuse_snapshotter::api::snapshots::Kind::Committed as i32)
        .collect();
    if committed.len() != layers {
        bail!(
            "{}: {} committed snapshots after unpack, expected {layers}: {listed:?}",
            t.sn,
            committed.len()
        );
    }
    let top = committed
        .iter()
        .find(|i| !committed.iter().any(|o| o.parent == i.name))
        .context("no top layer")?
        .name
        .clone();
    let target = env.dir.join(format!("b-{}", t.sn));
    std::fs::create_dir_all(&target)?;
    let t0 = Instant::now();
    let m = c.view(t.sn, "bench-view", &top)?;
    mnt::mount(&m, &target, &env.fuse_program)?;
    let view = t0.elapsed();
    let ok = target.join("bin/busybox").is_file()
        && (layers < 2 || target.join("data/l001/big.bin").is_file())
        && (layers < 11 || !target.join("data/l005").exists());
    mnt::unmount(&target)?;
    if !ok {
        bail!(
            "{}: the unpacked image's tree is not as built ({m:?})",
            t.sn
        );
    }
    c.remove_all(t.sn)?;
    env.gc()?;
    Ok((ran.elapsed, view))
}

fn workload_b(
    env: &mut Env,
    c: &Client,
    targets: &[Target],
    args: &Args,
) -> anyhow::Result<Vec<Unpacks>> {
    let build_dir = env.dir.join("image");
    std::fs::create_dir_all(&build_dir)?;
    let t0 = Instant::now();
    let tar = image::build(&build_dir, args.layers, args.files, &env.scratch)?;
    eprintln!(
        "workload B: {}-layer image built in {:.1?} ({} MiB)",
        args.layers,
        t0.elapsed(),
        std::fs::metadata(&tar)?.len() >> 20
    );
    env.ctr(
        &[
            "images",
            "import",
            "--no-unpack",
            "--base-name",
            IMAGE.trim_end_matches(":latest"),
            tar.to_str().context("non-UTF-8 path")?,
        ],
        UNPACK_TIMEOUT,
    )?;
    let mut res: Vec<Unpacks> = targets.iter().map(|t| Unpacks::new(*t)).collect();
    for t in targets {
        c.remove_all(t.sn)?;
    }
    env.gc()?;
    let mut all: Vec<Option<Target>> = targets.iter().copied().map(Some).collect();
    all.push(None);
    res.push(Unpacks::new(IMPORT_ONLY));
    for rep in 0..args.reps {
        for k in 0..all.len() {
            let ti = (k + rep) % all.len();
            let (unpack, view) = unpack_once(env, c, all[ti], &tar, args.layers)?;
            res[ti].unpack.push(unpack);
            res[ti].view_mount.push(view);
            eprintln!(
                "workload B: rep {}/{}: {} {:.2?}",
                rep + 1,
                args.reps,
                res[ti].target.label,
                unpack
            );
        }
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------

fn main() {
    let args = Args::parse();
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "rustfuse-snapshotter-bench starts containerd and mounts: it needs root; doing nothing"
        );
        std::process::exit(2);
    }
    if let Err(e) = real_main(&args) {
        eprintln!("rustfuse-snapshotter-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run_workloads(
    env: &mut Env,
    client: &Client,
    targets: &[Target],
    args: &Args,
) -> anyhow::Result<(Vec<Cycles>, Vec<Unpacks>)> {
    let a = if args.no_cycles {
        Vec::new()
    } else {
        workload_a(env, client, targets, args)?
    };
    let b = if args.no_unpack {
        Vec::new()
    } else {
        workload_b(env, client, targets, args)?
    };
    Ok((a, b))
}

fn real_main(args: &Args) -> anyhow::Result<()> {
    for prog in ["containerd", "ctr", "umoci", "busybox", "tar"] {
        which(prog).with_context(|| {
            format!("{prog} not found (Debian packages: containerd umoci busybox-static tar)")
        })?;
    }
    let snap_bin = find_bin(args.snapshotter_bin.clone(), "rustfuse-snapshotter")
        .context("rustfuse-snapshotter not found: build it or pass --snapshotter-bin")?;
    let fuse_program = find_bin(args.rustfuse_bin.clone(), "rustfuse")
        .context("rustfuse not found: build it or pass --rustfuse-bin")?;
    if args.fuse {
        anyhow::ensure!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
        which("mount.fuse3").context("mount.fuse3 not found (Debian package fuse3)")?;
    }
    let mut targets = vec![OVERLAYFS, RUSTFUSE];
    if args.fuse {
        targets.push(RUSTFUSE_FUSE);
    }
    let machine = report::Machine::probe(&snap_bin, &fuse_program);
    eprintln!("{}", machine.text());
    let mut env = Env::start(args, &snap_bin, &fuse_program)?;
    env.check_plugins(&targets)?;
    let client = Client::connect(&env.socket())?;
    let (a, b) = match run_workloads(&mut env, &client, &targets, args) {
        Ok(r) => r,
        Err(e) => {
            for p in &env.procs {
                eprintln!("--- {} log (tail) ---", p.name);
                let log = p.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
            return Err(e);
        }
    };
    drop(env);
    let cmdline: Vec<String> = std::env::args().collect();
    print!("{}", report::table(args.cycles, args.layers, &a, &b));
    if let Some(p) = &args.json {
        std::fs::write(p, report::json(&machine, &cmdline.join(" "), &a, &b))
            .with_context(|| format!("write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
