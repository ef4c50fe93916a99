//! The `buildkit-build` workload: rootless BuildKit (buildkitd under RootlessKit as the build
//! user, OCI worker, runc) building the multi-stage Dockerfile of `rustfuse_tests::buildkit`
//! (new files, copy-ups, deletions of files and trees, an opaque directory, renames, hard
//! links, a 64 MiB file, `COPY --from`) offline from a busybox OCI layout made with umoci, and
//! exporting it as an OCI archive. The set-up, the build and the checks of which program
//! mounted are the tests' own (`rustfuse_tests::buildkit::Workspace`); one build per run, in
//! a fresh workspace (fresh BuildKit state, no cache).
//!
//! The columns: `kernel` is BuildKit's `overlayfs` snapshotter (kernel overlayfs with
//! `userxattr` in RootlessKit's namespace); `fo1`, `fo2`, `rustfuse` and `rustfuse-b` are
//! BuildKit's built-in `fuse-overlayfs` snapshotter with that binary as `fuse-overlayfs`;
//! `snap-fuse` is rustfuse-snapshotter `--mode fuse` outside RootlessKit as the proxy
//! snapshotter (buildkitd mounts `fuse3.rustfuse` through mount.fuse3); `snap-auto` is
//! rustfuse-snapshotter `--mode auto` inside the same RootlessKit (kernel overlayfs there,
//! where the kernel allows it in a user namespace).
//!
//! Measured: `buildctl build` alone, from its start to its exit (the build and the export:
//! BuildKit's differ runs while exporting), by a `buildctl` shim first on the build user's
//! PATH. Not measured: the workspace, the daemons' start, unpacking the image. buildctl's
//! progress output of every build (each step's time) is kept in
//! `RUN_ROOT/buildkit-logs/PID-N-COLUMN.log`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use rustfuse_tests::buildah::{chown_r, ensure_user};
use rustfuse_tests::buildkit::{self, Image, Snapshotter, Workspace};

use crate::mount::Fs;
use crate::workloads::Ctx;

static READY: OnceLock<std::result::Result<(), String>> = OnceLock::new();
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// `bin/buildctl` of a workspace: runs BuildKit's `buildctl`, and for `build` appends
/// `START_NS END_NS STATUS` to `build-ns`.
fn buildctl_shim(real: &Path, log: &Path) -> String {
    format!(
        "#!/bin/sh\n\
         case \" $* \" in *' build '*)\n\
         s=$(date +%s%N); '{real}' \"$@\"; rc=$?; e=$(date +%s%N)\n\
         echo \"$s $e $rc\" >> '{log}'; exit $rc;;\n\
         esac\n\
         exec '{real}' \"$@\"\n",
        real = real.display(),
        log = log.display()
    )
}

/// Copies `from` to `to` (replacing a file or symlink there), mode 0755, owned by `uid`.
fn install(from: &Path, to: &Path, uid: u32) -> Result<()> {
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to)
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    chown_r(to, uid)?;
    Ok(())
}

/// One measured build on the column `fs_`: seconds of `buildctl build`.
pub fn run(ctx: &Ctx, fs_: &Fs) -> Result<f64> {
    let version = ctx.buildkit.as_str();
    READY
        .get_or_init(|| buildkit::unavailable(version).map_or(Ok(()), Err))
        .clone()
        .map_err(|e| anyhow!("rootless BuildKit {version} cannot run: {e}"))?;
    let sn = match fs_.id {
        "kernel" => Snapshotter::KernelOverlay,
        "snap-fuse" => Snapshotter::ProxyFuseOutside,
        "snap-auto" => Snapshotter::ProxyAutoInside,
        _ => Snapshotter::BuiltinFuseOverlayfs,
    };
    let uid = ensure_user().map_err(|e| anyhow!(e))?;
    let mut ws = Workspace::new(&format!("bench-{}", fs_.id)).map_err(|e| anyhow!(e))?;
    let d = ws.dir().to_path_buf();
    // The workspace's shims exec real/rustfuse and real/fuse-overlayfs (a symlink to
    // real/rustfuse); put this column's programs there.
    match fs_.id {
        "fo1" | "fo2" => install(&fs_.bin, &d.join("real/fuse-overlayfs"), uid)?,
        "rustfuse" | "rustfuse-b" => install(&fs_.bin, &d.join("real/rustfuse"), uid)?,
        "snap-fuse" | "snap-auto" => {
            install(&ctx.rustfuse, &d.join("real/rustfuse"), uid)?;
            install(&fs_.bin, &d.join("bin/rustfuse-snapshotter"), uid)?;
        }
        _ => {}
    }
    let real = buildkit::bin_dir(version)
        .map_err(|e| anyhow!(e))?
        .join("buildctl");
    let log = d.join("build-ns");
    let shim = d.join("bin/buildctl");
    std::fs::write(&shim, buildctl_shim(&real, &log))?;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755))?;
    chown_r(&shim, uid)?;

    let b = ws
        .build(version, sn, ctx.timeout)
        .map_err(|e| anyhow!("{e}"))?;
    if b.worker_snapshotter().as_deref() != Some(sn.worker_name()) {
        bail!(
            "the worker's snapshotter is {:?}, not {}",
            b.worker_snapshotter(),
            sn.worker_name()
        );
    }
    // Which program mounted: the shims log `NAME ARGS` for every run.
    let runs = |name: &str| {
        b.calls
            .iter()
            .filter(|c| c.split(' ').next() == Some(name))
            .count()
    };
    let (fo, rf) = (runs("fuse-overlayfs"), runs("rustfuse"));
    let ok = match sn {
        Snapshotter::KernelOverlay | Snapshotter::ProxyAutoInside => fo + rf == 0,
        Snapshotter::ProxyFuseOutside => rf > 0 && fo == 0,
        Snapshotter::BuiltinFuseOverlayfs => fo > 0 && rf == 0,
    };
    if !ok {
        bail!("{sn:?}: {fo} runs of fuse-overlayfs and {rf} of rustfuse");
    }
    // buildctl's progress (each step's time, the export's) for a look at where time went.
    let logs = ctx.run_root.join("buildkit-logs");
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let _ = std::fs::create_dir_all(&logs);
    let name = format!("{}-{n:03}-{}.log", std::process::id(), fs_.id);
    let _ = std::fs::write(logs.join(name), &b.stdout);
    let bad = Image::describe(&b.rootfs).check_expected();
    if !bad.is_empty() {
        eprintln!(
            "\nnote: buildkit-build on {}: the image is not what the Dockerfile makes ({} lines, first: {})",
            fs_.label,
            bad.len(),
            bad[0]
        );
    }
    let stamps = std::fs::read_to_string(&log).with_context(|| format!("{}", log.display()))?;
    let f: Vec<u128> = stamps
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    match f[..] {
        [s, e, 0] if e > s => Ok((e - s) as f64 / 1e9),
        _ => bail!(
            "no timing of buildctl build in {}: {stamps:?}",
            log.display()
        ),
    }
}

/// buildctl's step times of the builds kept since `since` (see [`run`]), as a Markdown table
/// of medians per column: every step some column took at least 0.2 s for, and the export's
/// "exporting layers" (where BuildKit's differ reads the mounts). Says where a build's time
/// went; none when no build was kept.
pub fn steps_table(run_root: &Path, since: std::time::SystemTime) -> Option<String> {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let mut cols: Vec<String> = Vec::new();
    // Step label -> column -> seconds of each build; labels in the order first seen.
    let mut times: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut logs: Vec<_> = std::fs::read_dir(run_root.join("buildkit-logs"))
        .ok()?
        .flatten()
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        })
        .map(|e| e.path())
        .collect();
    logs.sort();
    for path in logs {
        let name = path.file_stem()?.to_string_lossy().into_owned();
        // PID-NNN-COLUMN
        let col = name.splitn(3, '-').nth(2)?.to_owned();
        if !cols.contains(&col) {
            cols.push(col.clone());
        }
        let text = std::fs::read_to_string(&path).ok()?;
        let mut labels: BTreeMap<&str, String> = BTreeMap::new();
        let mut done: BTreeMap<String, f64> = BTreeMap::new();
        for line in text.lines() {
            let Some((num, rest)) = line.strip_prefix('#').and_then(|l| l.split_once(' ')) else {
                continue;
            };
            let secs = |s: &str| s.strip_suffix('s')?.parse::<f64>().ok();
            if let Some(t) = rest.strip_prefix("DONE ").and_then(secs) {
                if let Some(l) = labels.get(num) {
                    done.insert(l.clone(), t);
                }
            } else if let Some(t) = rest
                .strip_prefix("exporting layers ")
                .and_then(|r| r.strip_suffix(" done"))
                .and_then(secs)
            {
                done.insert("exporting layers".into(), t);
            } else if rest.starts_with('[') || rest.starts_with("exporting to") {
                let label: String = rest.chars().take(60).collect();
                labels.entry(num).or_insert(label);
            }
        }
        for (label, t) in done {
            if !order.contains(&label) {
                order.push(label.clone());
            }
            let per_col = times.entry(label).or_default();
            per_col.entry(col.clone()).or_default().push(t);
        }
    }
    if order.is_empty() {
        return None;
    }
    let mut out = format!(
        "\nbuildctl's steps, median seconds per column (steps of 0.2 s or more somewhere)\n\n| step | {} |\n|---|{}\n",
        cols.join(" | "),
        "---|".repeat(cols.len())
    );
    for label in order {
        let per_col = &times[&label];
        let medians: Vec<Option<f64>> = cols
            .iter()
            .map(|c| per_col.get(c).and_then(|v| crate::report::median(v)))
            .collect();
        if label != "exporting layers" && !medians.iter().flatten().any(|m| *m >= 0.2) {
            continue;
        }
        let cells: Vec<String> = medians
            .iter()
            .map(|m| m.map_or("-".into(), |m| format!("{m:.1}")))
            .collect();
        let shown = label.replace('|', "\\|");
        let _ = writeln!(out, "| `{shown}` | {} |", cells.join(" | "));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each column's median of each step, the export's layers always, quick steps left out.
    #[test]
    fn steps_table_gives_medians_per_column() {
        let root = std::env::temp_dir().join(format!("rfbench-steps-{}", std::process::id()));
        let logs = root.join("buildkit-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let since = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let log = |secs: [&str; 3]| {
            format!(
                "#5 [other 1/3] RUN mkdir /prep\n#5 DONE {}s\n\n#6 [stage-1 1/9] RUN big\n\
                 #6 ...\n#6 DONE {}s\n\n#15 exporting to oci image format\n\
                 #15 exporting layers\n#15 exporting layers {}s done\n#15 DONE 0.9s\n",
                secs[0], secs[1], secs[2]
            )
        };
        for (i, (col, secs)) in [
            ("fo1", ["0.1", "1.2", "0.7"]),
            ("rustfuse", ["0.1", "0.8", "1.1"]),
            ("fo1", ["0.1", "1.4", "0.8"]),
            ("rustfuse", ["0.1", "0.6", "1.0"]),
            ("fo1", ["0.1", "1.3", "0.9"]),
        ]
        .into_iter()
        .enumerate()
        {
            std::fs::write(logs.join(format!("1-{i:03}-{col}.log")), log(secs)).unwrap();
        }
        let t = steps_table(&root, since).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        assert!(t.contains("| step | fo1 | rustfuse |"), "{t}");
        assert!(t.contains("| `[stage-1 1/9] RUN big` | 1.3 | 0.7 |"), "{t}");
        assert!(t.contains("| `exporting layers` | 0.8 | 1.1 |"), "{t}");
        assert!(
            t.contains("| `exporting to oci image format` | 0.9 | 0.9 |"),
            "{t}"
        );
        assert!(!t.contains("mkdir /prep"), "{t}");
    }
}
