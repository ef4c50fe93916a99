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
