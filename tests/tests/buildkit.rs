//! Real BuildKit building through rustfuse, rootless: `buildkitd` (OCI worker, runc) under
//! RootlessKit as a non-root user builds one multi-stage Dockerfile
//! (`rustfuse_tests::buildkit::DOCKERFILE`: new files, copy-up, deletions of files and trees,
//! an opaque directory, renames, hard links within a step, symlinks, a fifo, chown/chmod,
//! set-id bits, xattrs, mtimes, a 64 MiB file, `COPY --from`) offline from a local OCI layout,
//! exports it as an OCI archive, and the unpacked image is compared entry by entry (type, mode,
//! owner, size, content hash, symlink target, link count and hard-link grouping, xattrs, old
//! mtimes) with the same build on BuildKit's own kernel overlayfs snapshotter (`overlayfs`),
//! built once per BuildKit version. The rustfuse variants:
//!
//! 1. `rustfuse-snapshotter --mode fuse` run by the user outside RootlessKit, as buildkitd's
//!    proxy snapshotter: buildkitd mounts `fuse3.rustfuse` through mount.fuse3 in its
//!    namespace. This is where BuildKit mounts active snapshots read-only by appending `ro`
//!    (`COPY --from` checksums the source stage's last step that way).
//! 2. `rustfuse-snapshotter --mode auto` in the same RootlessKit as buildkitd: doctor and the
//!    log must show it chose kernel overlayfs, and rustfuse must not have run.
//! 3. BuildKit's built-in `fuse-overlayfs` snapshotter with rustfuse installed as
//!    `fuse-overlayfs` first on PATH.
//!
//! Each with the BuildKit versions of `rustfuse_tests::buildkit::VERSIONS` (newest first),
//! built by `tests/install-buildkit.sh`. Needs root (to create the user and unpack as root),
//! the Debian packages of `tests/apt-packages.txt` and the workspace's binaries. Under
//! `CI=true` a test that cannot run fails.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustfuse_tests::buildkit::{self, Build, Image, Snapshotter, Workspace};
use rustfuse_tests::env::skip;

/// How long one RootlessKit run (daemons, build, export) may take.
const BUILD_DEADLINE: Duration = Duration::from_secs(300);

fn can_run(version: &str) -> bool {
    match buildkit::unavailable(version) {
        Some(reason) => skip(&reason),
        None => true,
    }
}

/// Builds in a fresh workspace; panics with every log on failure.
fn build(version: &str, sn: Snapshotter, name: &str) -> (Workspace, Build, Image) {
    let mut ws = Workspace::new(name).unwrap_or_else(|e| panic!("{e}"));
    let b = ws
        .build(version, sn, BUILD_DEADLINE)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "BuildKit {version} on {sn:?}: built, exported and unpacked in {:.1?} ({} rustfuse runs)",
        b.elapsed,
        b.calls.len()
    );
    assert_eq!(
        b.worker_snapshotter().as_deref(),
        Some(sn.worker_name()),
        "the worker's snapshotter label:\n{}",
        b.section("WORKERS_BEGIN", "WORKERS_END")
    );
    let img = Image::describe(&b.rootfs);
    (ws, b, img)
}

/// The image built on BuildKit's kernel overlayfs snapshotter, once per version.
fn reference(version: &str) -> &'static Image {
    static REFS: [OnceLock<Image>; buildkit::VERSIONS.len()] = [OnceLock::new(), OnceLock::new()];
    let i = buildkit::VERSIONS
        .iter()
        .position(|v| *v == version)
        .expect("a version of VERSIONS");
    REFS[i].get_or_init(|| {
        let (_ws, _b, img) = build(version, Snapshotter::KernelOverlay, "reference");
        let bad = img.check_expected();
        assert!(
            bad.is_empty(),
            "the reference image (BuildKit {version}, kernel overlayfs) is not what the Dockerfile makes:\n{}",
            bad.join("\n")
        );
        img
    })
}

/// Builds on `sn`, runs `check` on what the build logged (which program mounted what), then
/// compares the image with the reference of the same version.
fn build_and_compare(version: &str, sn: Snapshotter, check: impl FnOnce(&Build)) {
    if !can_run(version) {
        return;
    }
    let start = Instant::now();
    let want = reference(version);
    let (_ws, b, img) = build(version, sn, &format!("{sn:?}-{version}").to_lowercase());
    let ro_active = b
        .calls
        .iter()
        .filter(|c| c.contains("upperdir=") && c.split([' ', ',']).any(|o| o == "ro"))
        .count();
    eprintln!("{ro_active} read-only mounts of active snapshots (upperdir= and ro)");
    check(&b);
    let bad = img.check_expected();
    let (entries, links) = img.diff(&format!("{sn:?}"), want, "kernel-overlayfs");
    let mut report = String::new();
    if !bad.is_empty() {
        report += &format!("not what the Dockerfile makes:\n  {}\n", bad.join("\n  "));
    }
    if !entries.is_empty() {
        report += &format!(
            "{} entries differ from the kernel overlayfs build:\n  {}\n",
            entries.len(),
            entries.join("\n  ")
        );
    }
    if !links.is_empty() {
        report += &format!(
            "hard-link groups differ from the kernel overlayfs build (BuildKit's walking differ, \
             used for FUSE mounts, groups names by st_ino of a read-only mount in which the \
             step's own layer is a lower layer: names of one lower inode must share st_ino \
             there; cf. issue 14):\n  {}\n",
            links.join("\n  ")
        );
    }
    assert!(
        report.is_empty(),
        "BuildKit {version} on {sn:?}: the image differs:\n{report}"
    );
    eprintln!(
        "BuildKit {version} on {sn:?}: {} entries equal to the kernel overlayfs build ({:.1?} with the reference)",
        img.tree.entries.len(),
        start.elapsed()
    );
}

/// Variant 1: the proxy snapshotter in FUSE mode outside buildkitd's namespaces.
fn proxy_fuse_outside(version: &str) {
    build_and_compare(version, Snapshotter::ProxyFuseOutside, |b| {
        assert!(
            b.calls
                .iter()
                .any(|c| c.starts_with("rustfuse ") && c.contains("lowerdir=")),
            "rustfuse never mounted a layer stack; calls:\n{}",
            b.calls.join("\n")
        );
    });
}

/// Variant 2: the proxy snapshotter in auto mode inside buildkitd's RootlessKit: kernel
/// overlayfs with userxattr.
fn proxy_auto_inside(version: &str) {
    build_and_compare(version, Snapshotter::ProxyAutoInside, |b| {
        let doctor = b.section("DOCTOR_BEGIN", "DOCTOR_END");
        let mode = doctor
            .lines()
            .find_map(|l| l.strip_prefix("mode:"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("doctor has no mode: line:\n{doctor}"));
        assert!(
            mode.starts_with("overlay"),
            "doctor in RootlessKit picks {mode}, not kernel overlayfs:\n{doctor}"
        );
        let log = strip_ansi(&b.snapshotter_log);
        assert!(
            log.lines()
                .any(|l| l.contains("mount mode chosen")
                    && l.replace('"', "").contains("mode=overlay")),
            "the snapshotter did not log choosing overlay:\n{log}"
        );
        assert!(
            b.calls.is_empty(),
            "rustfuse ran although kernel overlayfs was chosen:\n{}",
            b.calls.join("\n")
        );
    });
}

/// Variant 3: BuildKit's fuse-overlayfs snapshotter running rustfuse as `fuse-overlayfs`.
fn builtin_fuse_overlayfs(version: &str) {
    build_and_compare(version, Snapshotter::BuiltinFuseOverlayfs, |b| {
        assert!(
            b.calls
                .iter()
                .any(|c| c.starts_with("fuse-overlayfs ") && c.contains("upperdir=")),
            "rustfuse (as fuse-overlayfs) never mounted an active snapshot; calls:\n{}",
            b.calls.join("\n")
        );
    });
}

/// `s` without ANSI colour sequences (ESC [ ... letter).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn proxy_fuse_outside_rootlesskit_v0_34_2() {
    proxy_fuse_outside(buildkit::VERSIONS[0]);
}

#[test]
fn proxy_fuse_outside_rootlesskit_v0_11_6() {
    proxy_fuse_outside(buildkit::VERSIONS[1]);
}

#[test]
fn proxy_auto_inside_rootlesskit_v0_34_2() {
    proxy_auto_inside(buildkit::VERSIONS[0]);
}

#[test]
fn proxy_auto_inside_rootlesskit_v0_11_6() {
    proxy_auto_inside(buildkit::VERSIONS[1]);
}

#[test]
fn builtin_fuse_overlayfs_is_rustfuse_v0_34_2() {
    builtin_fuse_overlayfs(buildkit::VERSIONS[0]);
}

#[test]
fn builtin_fuse_overlayfs_is_rustfuse_v0_11_6() {
    builtin_fuse_overlayfs(buildkit::VERSIONS[1]);
}
