//! The `buildah-bud` workload: a rootless `buildah bud` (a non-root user, containers/storage's
//! overlay driver) of the Dockerfile in `rustfuse_tests::buildah` (thousands of files created,
//! lower files modified and deleted, chmod, a COPY of a 2000-file context), with each FUSE
//! filesystem as `mount_program`, and for the kernel column with no mount program (the native
//! overlay driver on kernel overlayfs in the user's namespace). Measured: `buildah bud` alone;
//! importing the base image and cleaning up are not. It is rootless in every mode of the tool.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, anyhow};
use rustfuse_tests::buildah;

use crate::mount::{Fs, Kind};
use crate::workloads::Ctx;

struct Prepared {
    dir: PathBuf,
    uid: u32,
}

static PREPARED: OnceLock<std::result::Result<Prepared, String>> = OnceLock::new();
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// The build user, base image and context, made once per run of the tool.
fn prepare(run_root: &Path) -> std::result::Result<Prepared, String> {
    if let Some(reason) = buildah::unavailable() {
        return Err(reason);
    }
    let uid = buildah::ensure_user()?;
    let dir = run_root.join("buildah");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    buildah::build_base_image(&dir)?;
    buildah::build_context(&dir).map_err(|e| format!("build context: {e}"))?;
    buildah::chown_r(&dir, uid).map_err(|e| format!("chown {}: {e}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    for d in [run_root, &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(Prepared { dir, uid })
}

/// One measured build on `fs_`: seconds of `buildah bud`.
pub fn run(ctx: &Ctx, fs_: &Fs) -> Result<f64> {
    let p = PREPARED
        .get_or_init(|| prepare(&ctx.run_root))
        .as_ref()
        .map_err(|e| anyhow!("rootless buildah cannot run: {e}"))?;
    let mp = match fs_.kind {
        Kind::Kernel => None,
        Kind::Fuse | Kind::Floor => {
            // A copy the build user can reach and run.
            let copy = buildah::program_copy(&p.dir, &format!("prog-{}", fs_.id), &fs_.bin)
                .with_context(|| format!("copy {}", fs_.bin.display()))?;
            buildah::chown_r(&copy, p.uid)?;
            Some(copy)
        }
    };
    let name = format!("{}-{}", fs_.id, RUNS.fetch_add(1, Ordering::Relaxed));
    let r = buildah::build_as_user(&p.dir, &name, mp.as_deref(), false, ctx.timeout);
    clean(&p.dir, &name);
    let b = r.map_err(|e| anyhow!(e))?;
    Ok(b.ms as f64 / 1000.0)
}

/// Removes what one build left (as root: the storage holds files of subordinate ids), after
/// detaching any mount still under it.
fn clean(dir: &Path, name: &str) {
    let dirs: Vec<PathBuf> = ["graph", "run", "home", "xdg"]
        .iter()
        .map(|k| dir.join(format!("{k}-{name}")))
        .collect();
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            let Some(target) = line.split_whitespace().nth(1) else {
                continue;
            };
            if dirs.iter().any(|d| Path::new(target).starts_with(d)) {
                let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}
