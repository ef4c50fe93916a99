//! `rustfuse-compare`: mounts one generated, image-like layer set with kernel overlayfs,
//! fuse-overlayfs 1.x, fuse-overlayfs 2.0 and rustfuse, runs named workloads on each
//! (interleaved: workload by workload, the filesystems' order rotated every repetition), and
//! reports medians and ratios to kernel overlayfs as a table, a JSON file and an SVG chart.

mod build;
mod buildkit;
mod floor;
mod layerset;
mod mount;
mod report;
mod requests;
mod rootless;
mod run;
mod view;
mod worker;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use mount::{Fs, Kind};
use workloads::{Ctx, WORKLOADS, Workload};

const USAGE: &str = "\
usage: rustfuse-compare [OPTIONS]

Mounts the same generated layer set with each filesystem and compares them.
Must run as root (mounts, drop_caches).

options:
  --scale F              size of the layer set and of the large files (1 = ~30k files,
                         1 GiB sequential file); default 1
  --reps N               repetitions of every workload on every filesystem; default 3
  --workloads A,B,...    only these workloads (see --list); default all
  --fs A,B,...           only these filesystems: kernel,fo1,fo2,rustfuse (and
                         rustfuse-b, snap-fuse, snap-auto, floor); default all that
                         apply. floor: libfuse's passthrough_ll example (built from
                         libfuse3-dev) over a flattened copy of the merged tree, on the
                         metadata and read workloads
  --rustfuse PATH        rustfuse binary; default target/release/rustfuse
  --rustfuse-b PATH      a second rustfuse binary (another build), in its own column
                         'rustfuse B' with the ratio rustfuse / rustfuse B beside it
  --snapshotter PATH     rustfuse-snapshotter for the buildkit-build workload's
                         snap-fuse and snap-auto columns; default rustfuse-snapshotter
                         beside --rustfuse
  --buildkit VERSION     BuildKit of tests/install-buildkit.sh's cache for buildkit-build;
                         default the newest the tests run
  --fuse-overlayfs PATH  fuse-overlayfs 1.x; default /usr/bin/fuse-overlayfs
  --fuse-overlayfs2 PATH fuse-overlayfs 2.0; default /opt/fuse-overlayfs2/bin/fuse-overlayfs
  --workdir DIR          layers, uppers and mountpoints (on disk, not tmpfs);
                         default /var/tmp/rustfuse-compare
  --out DIR              where results[-rootless][-metacopy].json and .svg go; default
                         the work dir
  --timeout SECS         deadline of every command; default 600
  --rootless             mount every filesystem as uid 65534 inside a user namespace
                         (setpriv + unshare -Urm; kernel overlayfs with userxattr)
  --metacopy             kernel overlayfs with redirect_dir=on,metacopy=on (root mode
                         only: it refuses metacopy with userxattr) and rustfuse with
                         -o metacopy=on; fuse-overlayfs has no such mode; files
                         results[-rootless]-metacopy.*
  --count-requests       time nothing: run every workload once on each FUSE
                         filesystem with its request log on and print the FUSE
                         requests it got, by opcode (requests[-rootless].md)
  --list                 list the workloads and exit
";

struct Args {
    scale: f64,
    reps: usize,
    workloads: Option<Vec<String>>,
    fs: Option<Vec<String>>,
    rustfuse: PathBuf,
    rustfuse_b: Option<PathBuf>,
    snapshotter: Option<PathBuf>,
    buildkit: String,
    fo1: PathBuf,
    fo2: PathBuf,
    workdir: PathBuf,
    out: Option<PathBuf>,
    timeout: Duration,
    rootless: bool,
    metacopy: bool,
    count: bool,
    list: bool,
}

fn parse_args(argv: &[String]) -> Result<Args> {
    let mut a = Args {
        scale: 1.0,
        reps: 3,
        workloads: None,
        fs: None,
        rustfuse: PathBuf::from("target/release/rustfuse"),
        rustfuse_b: None,
        snapshotter: None,
        buildkit: rustfuse_tests::buildkit::VERSIONS[0].to_string(),
        fo1: PathBuf::from("/usr/bin/fuse-overlayfs"),
        fo2: PathBuf::from("/opt/fuse-overlayfs2/bin/fuse-overlayfs"),
        workdir: PathBuf::from("/var/tmp/rustfuse-compare"),
        out: None,
        timeout: Duration::from_secs(600),
        rootless: false,
        metacopy: false,
        count: false,
        list: false,
    };
    let mut it = argv.iter();
    while let Some(opt) = it.next() {
        let (key, inline) = match opt.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
            _ => (opt.as_str(), None),
        };
        let mut val = || -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .with_context(|| format!("{key} needs a value")),
            }
        };
        let csv = |s: String| s.split(',').map(str::to_string).collect::<Vec<_>>();
        match key {
            "--scale" => a.scale = val()?.parse().context("--scale")?,
            "--reps" => a.reps = val()?.parse().context("--reps")?,
            "--workloads" => a.workloads = Some(csv(val()?)),
            "--fs" => a.fs = Some(csv(val()?)),
            "--rustfuse" => a.rustfuse = val()?.into(),
            "--rustfuse-b" => a.rustfuse_b = Some(val()?.into()),
            "--snapshotter" => a.snapshotter = Some(val()?.into()),
            "--buildkit" => a.buildkit = val()?,
            "--fuse-overlayfs" => a.fo1 = val()?.into(),
            "--fuse-overlayfs2" => a.fo2 = val()?.into(),
            "--workdir" => a.workdir = val()?.into(),
            "--out" => a.out = Some(val()?.into()),
            "--timeout" => a.timeout = Duration::from_secs(val()?.parse().context("--timeout")?),
            "--rootless" => a.rootless = true,
            "--metacopy" => a.metacopy = true,
            "--count-requests" => a.count = true,
            "--list" => a.list = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown option {opt}\n{USAGE}"),
        }
    }
    if !a.scale.is_finite() || a.scale <= 0.0 || a.reps == 0 {
        bail!("--scale must be > 0 and --reps >= 1");
    }
    Ok(a)
}

fn version_of(bin: &Path, flag: &str) -> String {
    Command::new(bin)
        .arg(flag)
        .output()
        .ok()
        .map(|o| {
            let t = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            t.lines()
                .find(|l| l.to_lowercase().contains("version") || l.contains('.'))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// rustfuse-snapshotter: `--snapshotter`, else beside the rustfuse binary.
fn snapshotter_path(a: &Args) -> PathBuf {
    let p = a.snapshotter.clone().unwrap_or_else(|| {
        a.rustfuse
            .parent()
            .unwrap_or(Path::new(""))
            .join("rustfuse-snapshotter")
    });
    std::path::absolute(&p).unwrap_or(p)
}

/// The columns: the four filesystems, rustfuse B when given, and the snapshotter's two
/// columns when buildkit-build runs (or `--fs` names them).
fn filesystems(a: &Args, selected: &[&Workload]) -> Vec<Fs> {
    let fuse = |id, label, bin: &Path, flag: &str| {
        let bin = std::path::absolute(bin).unwrap_or_else(|_| bin.to_path_buf());
        let missing = (!bin.is_file()).then(|| format!("not installed ({})", bin.display()));
        Fs {
            id,
            label,
            kind: Kind::Fuse,
            version: if missing.is_none() {
                version_of(&bin, flag)
            } else {
                String::new()
            },
            bin,
            missing,
        }
    };
    let all = vec![
        Fs {
            id: "kernel",
            label: "kernel overlayfs",
            kind: Kind::Kernel,
            bin: PathBuf::from("mount"),
            version: format!(
                "Linux {}",
                rustix::system::uname().release().to_string_lossy()
            ),
            missing: None,
        },
        fuse("fo1", "fuse-overlayfs 1.x", &a.fo1, "--version"),
        fuse("fo2", "fuse-overlayfs 2.0", &a.fo2, "--version"),
        fuse("rustfuse", "rustfuse", &a.rustfuse, "-V"),
    ];
    let mut extra = Vec::new();
    let reads = selected
        .iter()
        .any(|w| matches!(w.group, workloads::Group::Metadata | workloads::Group::Read));
    if reads {
        let (bin, missing) = match floor::build(&a.workdir) {
            Ok(b) => (b, None),
            Err(m) => (PathBuf::from("passthrough_ll"), Some(m)),
        };
        extra.push(Fs {
            id: "floor",
            label: "FUSE floor (passthrough_ll)",
            kind: Kind::Floor,
            bin,
            version: "libfuse3 example".into(),
            missing,
        });
    }
    if let Some(b) = &a.rustfuse_b {
        extra.push(fuse("rustfuse-b", "rustfuse B", b, "-V"));
    }
    let named = |id: &str| a.fs.as_ref().is_some_and(|l| l.iter().any(|x| x == id));
    if selected.iter().any(|w| w.name == "buildkit-build")
        || named("snap-fuse")
        || named("snap-auto")
    {
        let sn = snapshotter_path(a);
        extra.push(fuse(
            "snap-fuse",
            "rustfuse-snapshotter fuse",
            &sn,
            "--version",
        ));
        extra.push(fuse(
            "snap-auto",
            "rustfuse-snapshotter auto",
            &sn,
            "--version",
        ));
    }
    all.into_iter()
        .chain(extra)
        .filter(|f| a.fs.as_ref().is_none_or(|l| l.iter().any(|x| x == f.id)))
        .collect()
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("__worker") {
        if let Err(e) = worker::main(&argv[1..]) {
            eprintln!("worker: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    run::install_signal_handlers();
    if argv.first().map(String::as_str) == Some("__cycle") {
        if let Err(e) = cycle(&argv[1..]) {
            eprintln!("cycle: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = real_main(&argv) {
        eprintln!("rustfuse-compare: {e:#}");
        std::process::exit(1);
    }
}

/// Inside the user namespace: `__cycle OPTIONS -- FS_ID KIND BIN WORKLOAD`.
fn cycle(argv: &[String]) -> Result<()> {
    let split = argv
        .iter()
        .position(|a| a == "--")
        .context("__cycle: missing --")?;
    let a = parse_args(&argv[..split])?;
    let ctx = make_ctx(&a, true)?;
    rootless::cycle_main(&ctx, &argv[split + 1..])
}

fn make_ctx(a: &Args, userns: bool) -> Result<Ctx> {
    let workdir = std::path::absolute(&a.workdir)?;
    let sizes = layerset::Sizes::new(a.scale);
    let t0 = Instant::now();
    let layers = layerset::ensure(&workdir, &sizes)?;
    if !userns {
        eprintln!("layers ready in {:.1}s", t0.elapsed().as_secs_f64());
    }
    Ok(Ctx {
        exe: std::env::current_exe()?,
        rustfuse: std::path::absolute(&a.rustfuse)?,
        buildkit: a.buildkit.clone(),
        layers,
        sizes,
        run_root: workdir.join("run"),
        timeout: a.timeout,
        userns,
        metacopy: a.metacopy,
        count: a.count,
    })
}

/// One measured run of `w` on `f`, in a user namespace with `--rootless` (the buildah and
/// BuildKit builds are rootless in both modes: see `build`, `buildkit`).
fn run_one(
    a: &Args,
    ctx: &Ctx,
    f: &Fs,
    w: &Workload,
    cycle_args: &[String],
) -> Result<Option<f64>> {
    if a.rootless && !workloads::always_rootless(w) {
        rootless::run_in_userns(ctx, f, w.name, cycle_args)
    } else {
        ctx.run(f, w)
    }
}

/// `--count-requests`: one run of each workload on each FUSE filesystem (not the builds,
/// whose daemons the build tools start), the requests counted from the daemon's log.
fn count_requests(
    a: &Args,
    ctx: &Ctx,
    selected: &[&Workload],
    fss: &[Fs],
    cycle_args: &[String],
    workdir: &Path,
) -> Result<()> {
    let mut tables = Vec::new();
    for w in selected {
        if workloads::always_rootless(w) || w.group == workloads::Group::Mount {
            eprintln!("{}: not counted (a build, or a mount timing)", w.name);
            continue;
        }
        let mut cols = Vec::new();
        for f in fss.iter().filter(|f| {
            f.missing.is_none()
                && f.kind != Kind::Kernel
                && workloads::applies(f, w)
                && !workloads::SNAPSHOTTER_COLUMNS.contains(&f.id)
        }) {
            eprint!("\r\x1b[K{} on {}", w.name, f.label);
            let r = run_one(a, ctx, f, w, cycle_args);
            if let Err(e) = r {
                run::check_interrupted()?;
                eprintln!("\n{} on {}: {e:#}", w.name, f.label);
                continue;
            }
            let log = ctx.run_root.join(f.id).join("mount.log");
            let text =
                std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
            cols.push((f.label.to_string(), requests::parse(&text)));
        }
        tables.push((w.name.to_string(), cols));
    }
    eprintln!("\r\x1b[K");
    let md = requests::table(&tables);
    print!("{md}");
    let out = a.out.clone().unwrap_or(workdir.to_path_buf());
    std::fs::create_dir_all(&out)?;
    let p = out.join(format!(
        "requests{}.md",
        if a.rootless { "-rootless" } else { "" }
    ));
    std::fs::write(&p, md).with_context(|| format!("write {}", p.display()))?;
    eprintln!("wrote {}", p.display());
    Ok(())
}

fn real_main(argv: &[String]) -> Result<()> {
    let a = parse_args(argv)?;
    if a.list {
        for w in WORKLOADS {
            println!("{:16} {:9} {}", w.name, w.group.name(), w.about);
        }
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        bail!("must run as root (it mounts and drops caches)");
    }
    let selected: Vec<&Workload> = match &a.workloads {
        None => WORKLOADS.iter().collect(),
        Some(names) => {
            let mut v = Vec::new();
            for n in names {
                v.push(
                    WORKLOADS
                        .iter()
                        .find(|w| w.name == n)
                        .with_context(|| format!("unknown workload {n} (see --list)"))?,
                );
            }
            v
        }
    };
    if selected.iter().any(|w| w.name == "buildkit-build") {
        // rustfuse_tests' BuildKit workspace copies the binaries named by these (the workload
        // then puts each column's own program in place).
        let vars = [
            ("RUSTFUSE_BIN", std::path::absolute(&a.rustfuse)?),
            ("RUSTFUSE_SNAPSHOTTER_BIN", snapshotter_path(&a)),
        ];
        for (k, v) in vars {
            // SAFETY: no other thread exists yet (the signal handlers only set a flag), so
            // nothing reads or writes the environment at the same time.
            unsafe { std::env::set_var(k, v) };
        }
    }
    let fss = filesystems(&a, &selected);
    for f in &fss {
        match &f.missing {
            Some(m) => eprintln!("{}: {m}; its column stays empty", f.label),
            None => eprintln!("{}: {} {}", f.label, f.bin.display(), f.version),
        }
    }
    std::fs::create_dir_all(&a.workdir)?;
    let workdir = std::path::absolute(&a.workdir)?;
    let ctx = make_ctx(&a, false)?;
    eprintln!(
        "rustfuse's copy-ups in {}: synced {}",
        workdir.display(),
        report::workdir_copy_up_syncs(&workdir)
    );
    if fss.iter().any(|f| f.id == "floor" && f.missing.is_none()) {
        let t0 = Instant::now();
        let tree = floor::flatten(&ctx.layers)?;
        eprintln!(
            "FUSE floor tree {} ready in {:.1}s",
            tree.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    let sizes = ctx.sizes;
    let cycle_args: Vec<String> = vec![
        "--workdir".into(),
        workdir.display().to_string(),
        "--scale".into(),
        a.scale.to_string(),
        "--timeout".into(),
        a.timeout.as_secs().to_string(),
    ]
    .into_iter()
    .chain(a.metacopy.then(|| "--metacopy".to_string()))
    .chain(a.count.then(|| "--count-requests".to_string()))
    .collect();
    if a.rootless {
        // The unprivileged user must reach the layers and the run dirs.
        let _ = std::fs::create_dir_all(&ctx.run_root);
        for d in [&workdir, &ctx.run_root] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        // Rootless users own their image layers (podman's storage is the user's): files owned
        // by an id the namespace does not map could not be chmod'ed or chown'ed there.
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(&ctx.layers.lowers[0])?.uid() != rootless::UID {
            eprintln!("giving the layers to uid {}", rootless::UID);
            let d = workdir.join("layers");
            run::run_ok(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{0}:{0}", rootless::UID))
                    .arg(&d),
                Duration::from_secs(600),
            )?;
        }
        // The unprivileged user opens /dev/fuse: 0666 as Debian's udev rule makes it (a
        // machine without udev has devtmpfs's 0600, and every FUSE mount would fail).
        rustfuse_tests::env::dev_fuse_for_everyone(&format!(
            "uid {} in the rootless runs",
            rootless::UID
        ))
        .map_err(anyhow::Error::msg)?;
    }
    let runnable = |w: &Workload| -> Vec<&Fs> {
        fss.iter()
            .filter(|f| f.missing.is_none() && workloads::applies(f, w))
            .collect()
    };
    if a.count {
        return count_requests(&a, &ctx, &selected, &fss, &cycle_args, &workdir);
    }
    let mut results = report::Results::new(
        &fss,
        &selected,
        &sizes,
        a.reps,
        match (a.rootless, a.metacopy) {
            (false, false) => "root",
            (false, true) => "root, metacopy=on (kernel overlayfs and rustfuse)",
            (true, false) => "rootless",
            (true, true) => "rootless, metacopy=on (rustfuse only: not with userxattr)",
        },
    );
    // Every run starts alike: the trash an interrupted run left removed, the caches dropped
    // (see `Ctx::trash`), the layers read once.
    eprintln!("dropping the caches, reading the layers");
    ctx.fresh_start()?;
    let total: usize = selected.iter().map(|w| a.reps * runnable(w).len()).sum();
    let mut done = 0;
    let started = Instant::now();
    let started_at = std::time::SystemTime::now();
    for (wi, w) in selected.iter().enumerate() {
        let runnable = runnable(w);
        for rep in 0..a.reps {
            for k in 0..runnable.len() {
                let f = runnable[(k + rep) % runnable.len()];
                done += 1;
                eprint!(
                    "\r\x1b[K[{done}/{total} {:.0}s] {} rep {}/{} {}",
                    started.elapsed().as_secs_f64(),
                    w.name,
                    rep + 1,
                    a.reps,
                    f.label
                );
                let r = run_one(&a, &ctx, f, w, &cycle_args);
                if let Some(l) = workloads::take_latency() {
                    results.add_latency(wi, f.id, l);
                }
                let seen = view::take();
                match r {
                    Ok(Some(v)) => {
                        results.add(wi, f.id, v);
                        if let Some(d) = seen {
                            results.add_view(wi, f.id, d);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        run::check_interrupted()?;
                        eprintln!("\n{} on {}: {e:#}", w.name, f.label);
                        results.fail(wi, f.id, format!("{e:#}"));
                    }
                }
            }
        }
        eprintln!("\r\x1b[K{}", results.summary_line(wi));
        for f in &runnable {
            if results.view_differs(wi, f.id) == Some(true) {
                eprintln!(
                    "  {}'s view after {} differs from kernel overlayfs's ({}):",
                    f.label,
                    w.name,
                    if f.id == "kernel" {
                        "between its own runs".to_string()
                    } else {
                        format!(
                            "diff {} {}",
                            view::file(&ctx.run_root, "kernel", w.name).display(),
                            view::file(&ctx.run_root, f.id, w.name).display()
                        )
                    }
                );
                let read = |id: &str| {
                    std::fs::read_to_string(view::file(&ctx.run_root, id, w.name))
                        .unwrap_or_default()
                };
                for l in view::differences(&read("kernel"), "kernel", &read(f.id), f.id, 6) {
                    eprintln!("    {l}");
                }
            }
        }
    }
    eprintln!("\r\x1b[Kdone in {:.0}s", started.elapsed().as_secs_f64());
    ctx.remove_trash()?;
    let out = a.out.clone().unwrap_or(workdir.clone());
    std::fs::create_dir_all(&out)?;
    print!("{}", results.table());
    print!("{}", results.latency_table());
    let steps = selected
        .iter()
        .any(|w| w.name == "buildkit-build")
        .then(|| buildkit::steps_table(&ctx.run_root, started_at))
        .flatten();
    if let Some(t) = &steps {
        print!("{t}");
    }
    let stem = format!(
        "results{}{}",
        if a.rootless { "-rootless" } else { "" },
        if a.metacopy { "-metacopy" } else { "" }
    );
    let json = out.join(format!("{stem}.json"));
    let svg = out.join(format!("{stem}.svg"));
    std::fs::write(&json, results.json(&report::machine(&workdir)))
        .with_context(|| format!("write {}", json.display()))?;
    std::fs::write(&svg, results.svg()).with_context(|| format!("write {}", svg.display()))?;
    eprintln!("wrote {} and {}", json.display(), svg.display());
    if let Some(t) = steps {
        let md = out.join(format!("{stem}-buildkit-steps.md"));
        std::fs::write(&md, t).with_context(|| format!("write {}", md.display()))?;
        eprintln!("wrote {}", md.display());
    }
    Ok(())
}
