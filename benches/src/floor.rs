//! The "FUSE floor" column: libfuse's low-level passthrough example (`passthrough_ll.c`,
//! shipped in Debian's libfuse3-dev), built here from the installed example and run over a
//! flattened copy of the merged tree. It is no overlay: one directory passed through, the
//! cheapest FUSE filesystem there is, so it bounds what any FUSE overlay can reach on the
//! metadata and read workloads (the only ones it runs).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::layerset::Layers;
use crate::run;

/// Where Debian's libfuse3-dev installs the example.
const EXAMPLE: &str = "/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c";

/// Builds the example into `workdir` (once: kept while newer than its source); `Err` says
/// what is missing.
pub fn build(workdir: &Path) -> std::result::Result<PathBuf, String> {
    let src = Path::new(EXAMPLE);
    if !src.is_file() {
        return Err(format!(
            "not installed ({EXAMPLE}: apt-get install libfuse3-dev pkg-config)"
        ));
    }
    let bin = workdir.join("passthrough_ll");
    let fresh = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(b), Some(s)) = (fresh(&bin), fresh(src))
        && b >= s
    {
        return Ok(bin);
    }
    let flags = Command::new("pkg-config")
        .args(["--cflags", "--libs", "fuse3"])
        .output()
        .map_err(|e| format!("not installed (pkg-config: {e})"))?;
    if !flags.status.success() {
        return Err("not installed (pkg-config knows no fuse3: libfuse3-dev)".into());
    }
    let flags = String::from_utf8_lossy(&flags.stdout).to_string();
    let _ = fs::create_dir_all(workdir);
    let out = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(src)
        .args(flags.split_whitespace())
        .output()
        .map_err(|e| format!("not built (cc: {e})"))?;
    if !out.status.success() {
        return Err(format!(
            "not built (cc {EXAMPLE}: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(bin)
}

/// Where [`flatten`] puts the tree.
pub fn tree(layers: &Layers) -> PathBuf {
    let root = layers.file_list.parent().unwrap_or(Path::new("/"));
    root.join("floor").join("tree")
}

/// The merged view of `layers.lowers` copied into one directory (`layers/floor/tree`),
/// made once per layer set: kernel overlayfs mounts the lowers read-only and `cp -a` copies
/// what it shows (whiteouts and opaque directories resolved, xattrs kept).
pub fn flatten(layers: &Layers) -> Result<PathBuf> {
    let tree = tree(layers);
    let base = tree
        .parent()
        .context("floor tree has no parent")?
        .to_path_buf();
    let root = base
        .parent()
        .context("floor dir has no parent")?
        .to_path_buf();
    let marker = base.join(".complete");
    let want = fs::read_to_string(root.join(".complete")).unwrap_or_default();
    if !want.is_empty() && fs::read_to_string(&marker).ok() == Some(want.clone()) {
        return Ok(tree);
    }
    if base.exists() {
        fs::remove_dir_all(&base).with_context(|| format!("remove {}", base.display()))?;
    }
    let mnt = base.join("merged");
    fs::create_dir_all(&mnt)?;
    let lowers = crate::mount::join(&layers.lowers);
    let t = Duration::from_secs(600);
    run::run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("lowerdir={lowers}"))
            .arg(&mnt),
        Duration::from_secs(30),
    )
    .context("mount the lowers read-only to flatten them")?;
    let copied = run::run_ok(Command::new("cp").arg("-a").arg(&mnt).arg(&tree), t);
    let _ = run::run(Command::new("umount").arg(&mnt), Duration::from_secs(30));
    copied.context("cp -a of the merged lowers")?;
    if !tree.is_dir() {
        bail!("flattening left no {}", tree.display());
    }
    fs::write(&marker, want)?;
    Ok(tree)
}
