//! Real BuildKit building through rustfuse: one multi-stage Dockerfile
//! (`rustfuse_tests::buildkit::DOCKERFILE`: new files, copy-up, deletions of files and trees,
//! an opaque directory, renames, hard links within a step, symlinks, a fifo, chown/chmod,
//! set-id bits, xattrs, mtimes, a 64 MiB file, `COPY --from`; a step that fails unless the
//! names of hard links made in an earlier step are one file (`[ a -ef b ]`); a chmod and a
//! chown of one name of such a link) built offline from a local OCI layout and exported as an
//! OCI archive. The unpacked image is compared entry by entry (type, mode, owner, size,
//! content hash, symlink target, link count and hard-link grouping, xattrs, old mtimes), and
//! each layer blob's `tar -tv` listing entry by entry (name, type, mode, owner, size, link
//! target), with the same build on BuildKit's own kernel overlayfs snapshotter (`overlayfs`,
//! rootless), built once per BuildKit version. The layers of the chmod and chown steps must
//! hold the changed name alone, as kernel overlayfs (mounted `index=off`) makes them: the
//! other names are never looked up in that step, so the walking differ's read-only views show
//! them unchanged (`LinkCopyUp::Split`; a layer with one file and a hard-link entry per other
//! name, `LinkCopyUp::Kept`, fails). The variants:
//!
//! 1. Rootless (buildkitd's OCI worker under RootlessKit as a non-root user):
//!    `rustfuse-snapshotter --mode fuse` run by the user outside RootlessKit, as buildkitd's
//!    proxy snapshotter: buildkitd mounts `fuse3.rustfuse` through mount.fuse3 in its
//!    namespace. This is where BuildKit mounts active snapshots read-only by appending `ro`
//!    (`COPY --from` checksums the source stage's last step that way).
//! 2. Rootless: `rustfuse-snapshotter --mode auto` in the same RootlessKit as buildkitd: the
//!    doctor and the log must show it chose kernel overlayfs, and rustfuse must not have run.
//! 3. Rootless: BuildKit's built-in `fuse-overlayfs` snapshotter with rustfuse installed as
//!    `fuse-overlayfs` first on PATH.
//! 4. As root: BuildKit's containerd worker (`--oci-worker=false --containerd-worker=true
//!    --containerd-worker-snapshotter=rustfuse`) against a containerd of its own (Debian's
//!    1.6; 2.4.2 from `tests/install-containerd2.sh` with v0.34.2 only) whose proxy plugin
//!    `rustfuse` is rustfuse-snapshotter `--mode overlay` and `--mode fuse`.
//!
//! Each with the BuildKit versions of `rustfuse_tests::buildkit::VERSIONS` (newest first),
//! built by `tests/install-buildkit.sh`. Needs root (to create the user, run variant 4 and
//! unpack as root), the Debian packages of `tests/apt-packages.txt` and the workspace's
//! binaries. Under `CI=true` a test that cannot run fails.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustfuse_tests::buildkit::{
    self, BASE_LAYERS, Build, Containerd, Image, LINK_CHANGES, Layer, LinkCopyUp, SnapMode,
    Snapshotter, Workspace,
};
use rustfuse_tests::env::skip;

/// How long one build (daemons, build, export) may take.
const BUILD_DEADLINE: Duration = Duration::from_secs(300);

fn can_run(version: &str) -> bool {
    match buildkit::unavailable(version) {
        Some(reason) => skip(&reason),
        None => true,
    }
}

/// Builds in a fresh workspace with `run`; panics with every log on failure. `what` names
/// the build, `worker` is the snapshotter label the worker must show.
fn build_with(
    what: &str,
    name: &str,
    worker: &str,
    run: impl FnOnce(&mut Workspace) -> Result<Build, String>,
) -> (Workspace, Build, Image) {
    let mut ws = Workspace::new(name).unwrap_or_else(|e| panic!("{e}"));
    let b = run(&mut ws).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{what}: built, exported and unpacked in {:.1?} ({} rustfuse runs)",
        b.elapsed,
        b.calls.len()
    );
    assert_eq!(
        b.worker_snapshotter().as_deref(),
        Some(worker),
        "the worker's snapshotter label:\n{}",
        b.section("WORKERS_BEGIN", "WORKERS_END")
    );
    let img = Image::describe(&b.rootfs);
    (ws, b, img)
}

/// A rootless build on `sn`.
fn build(version: &str, sn: Snapshotter, name: &str) -> (Workspace, Build, Image) {
    build_with(
        &format!("BuildKit {version} on {sn:?}"),
        name,
        sn.worker_name(),
        |ws| ws.build(version, sn, BUILD_DEADLINE),
    )
}

/// The build on BuildKit's kernel overlayfs snapshotter, once per version.
struct Reference {
    img: Image,
    layers: Vec<Layer>,
}

fn reference(version: &str) -> &'static Reference {
    static REFS: [OnceLock<Reference>; buildkit::VERSIONS.len()] =
        [OnceLock::new(), OnceLock::new()];
    let i = buildkit::VERSIONS
        .iter()
        .position(|v| *v == version)
        .expect("a version of VERSIONS");
    REFS[i].get_or_init(|| {
        let (_ws, b, img) = build(version, Snapshotter::KernelOverlay, "reference");
        let mut bad = img.check_expected();
        bad.extend(check_link_changes(&img, &b.layers, LinkCopyUp::Split));
        assert!(
            bad.is_empty(),
            "the reference image (BuildKit {version}, kernel overlayfs) is not what the Dockerfile makes:\n{}",
            bad.join("\n")
        );
        Reference {
            img,
            layers: b.layers,
        }
    })
}

/// The layer of each final-stage step, and what went wrong with the count.
fn step_layer(layers: &[Layer], step: &str) -> Result<usize, String> {
    let steps = buildkit::final_steps();
    if layers.len() != BASE_LAYERS + steps.len() {
        return Err(format!(
            "{} layers, want {BASE_LAYERS} of the base image and one for each of {} steps",
            layers.len(),
            steps.len()
        ));
    }
    let i = steps
        .iter()
        .position(|s| *s == step)
        .ok_or_else(|| format!("no step {step:?} in the Dockerfile"))?;
    Ok(BASE_LAYERS + i)
}

/// Checks that each [`LINK_CHANGES`] step went the way `want` says, in the image and in the
/// step's own layer; what is wrong, one line each.
fn check_link_changes(img: &Image, layers: &[Layer], want: LinkCopyUp) -> Vec<String> {
    let mut bad = Vec::new();
    for c in &LINK_CHANGES {
        match img.link_change(c) {
            Ok(got) if got == want => {}
            Ok(got) => bad.push(format!(
                "`{}`: the image shows {got:?}, want {want:?}",
                c.step
            )),
            Err(e) => bad.push(e),
        }
        let layer = match step_layer(layers, c.step) {
            Ok(i) => &layers[i],
            Err(e) => {
                bad.push(e);
                continue;
            }
        };
        let shown = || {
            let l: Vec<String> = layer.entries.values().map(|e| e.to_string()).collect();
            l.join("\n    ")
        };
        match c.in_layer(layer) {
            Ok(got) if got == want => {}
            Ok(got) => bad.push(format!(
                "`{}`: its layer shows {got:?}, want {want:?}:\n    {}",
                c.step,
                shown()
            )),
            Err(e) => bad.push(format!("{e}; the layer:\n    {}", shown())),
        }
    }
    bad
}

/// The layers of `b` against the reference's, entry by entry (name, type, mode, owner, size,
/// link target); the names of a [`LINK_CHANGES`] group left out of its step's layer where the
/// two took it different ways (`want` against the reference's [`LinkCopyUp::Split`]).
fn diff_layers(n: &str, layers: &[Layer], want: &Reference, links: LinkCopyUp) -> Vec<String> {
    let skip: Vec<(usize, &str)> = if links == LinkCopyUp::Split {
        Vec::new()
    } else {
        LINK_CHANGES
            .iter()
            .filter_map(|c| Some((step_layer(layers, c.step).ok()?, c.group)))
            .flat_map(|(i, g)| g.iter().map(move |n| (i, *n)))
            .collect()
    };
    buildkit::diff_layers(&want.layers, "kernel-overlayfs", layers, n, |i, name| {
        skip.contains(&(i, name))
    })
}

/// Runs `build` (a build of `version` named `what`), runs `check` on what it logged (which
/// program mounted what), then compares the image and each layer with the reference of the
/// same version; `links` is what a copy-up must do to lower hard links there.
fn build_and_compare(
    version: &str,
    what: &str,
    links: LinkCopyUp,
    build: impl FnOnce() -> (Workspace, Build, Image),
    check: impl FnOnce(&Build),
) {
    let start = Instant::now();
    let want = reference(version);
    let (_ws, b, img) = build();
    let ro_active = b
        .calls
        .iter()
        .filter(|c| c.contains("upperdir=") && c.split([' ', ',']).any(|o| o == "ro"))
        .count();
    eprintln!("{ro_active} read-only mounts of active snapshots (upperdir= and ro)");
    check(&b);
    let bad = img.check_expected();
    let link_changes = check_link_changes(&img, &b.layers, links);
    let (entries, hard_links) = img.diff(what, &want.img, "kernel-overlayfs");
    let layers = diff_layers(what, &b.layers, want, links);
    let mut report = String::new();
    for (items, head) in [
        (&bad, "not what the Dockerfile makes".to_string()),
        (
            &link_changes,
            format!("a change of one name of a lower hard link did not go {links:?}"),
        ),
        (
            &entries,
            format!(
                "{} entries differ from the kernel overlayfs build",
                entries.len()
            ),
        ),
        (
            &hard_links,
            "hard-link groups differ from the kernel overlayfs build (BuildKit's walking \
             differ, used for FUSE mounts, groups names by st_ino of a read-only mount in \
             which the step's own layer is a lower layer: names of one lower inode must share \
             st_ino there)"
                .to_string(),
        ),
        (
            &layers,
            format!(
                "{} layer entries differ from the kernel overlayfs build's",
                layers.len()
            ),
        ),
    ] {
        if !items.is_empty() {
            report += &format!("{head}:\n  {}\n", items.join("\n  "));
        }
    }
    assert!(report.is_empty(), "{what}: the image differs:\n{report}");
    eprintln!(
        "{what}: {} entries and {} layers equal to the kernel overlayfs build's (lower hard links \
         {links:?}; {:.1?} with the reference)",
        img.tree.entries.len(),
        b.layers.len(),
        start.elapsed()
    );
}

/// A rootless variant: BuildKit's OCI worker on `sn`.
fn rootless(version: &str, sn: Snapshotter, check: impl FnOnce(&Build)) {
    if !can_run(version) {
        return;
    }
    let what = format!("BuildKit {version} on {sn:?}");
    let name = format!("{sn:?}-{version}").to_lowercase();
    build_and_compare(
        version,
        &what,
        LinkCopyUp::Split,
        || build(version, sn, &name),
        check,
    );
}

/// Asserts that rustfuse mounted a layer stack for the snapshotter.
fn rustfuse_mounted(b: &Build) {
    assert!(
        b.calls
            .iter()
            .any(|c| c.starts_with("rustfuse ") && c.contains("lowerdir=")),
        "rustfuse never mounted a layer stack; calls:\n{}",
        b.calls.join("\n")
    );
}

/// Asserts that the snapshotter logged choosing kernel overlayfs and rustfuse never ran.
fn overlay_chosen(b: &Build) {
    let log = strip_ansi(&b.snapshotter_log);
    assert!(
        log.lines()
            .any(|l| l.contains("mount mode chosen") && l.replace('"', "").contains("mode=overlay")),
        "the snapshotter did not log choosing overlay:\n{log}"
    );
    assert!(
        b.calls.is_empty(),
        "rustfuse ran although kernel overlayfs was chosen:\n{}",
        b.calls.join("\n")
    );
}

/// Variant 1: the proxy snapshotter in FUSE mode outside buildkitd's namespaces.
fn proxy_fuse_outside(version: &str) {
    rootless(version, Snapshotter::ProxyFuseOutside, rustfuse_mounted);
}

/// Variant 2: the proxy snapshotter in auto mode inside buildkitd's RootlessKit: kernel
/// overlayfs with userxattr.
fn proxy_auto_inside(version: &str) {
    rootless(version, Snapshotter::ProxyAutoInside, |b| {
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
        overlay_chosen(b);
    });
}

/// Variant 3: BuildKit's fuse-overlayfs snapshotter running rustfuse as `fuse-overlayfs`.
fn builtin_fuse_overlayfs(version: &str) {
    rootless(version, Snapshotter::BuiltinFuseOverlayfs, |b| {
        assert!(
            b.calls
                .iter()
                .any(|c| c.starts_with("fuse-overlayfs ") && c.contains("upperdir=")),
            "rustfuse (as fuse-overlayfs) never mounted an active snapshot; calls:\n{}",
            b.calls.join("\n")
        );
    });
}

/// Variant 4: BuildKit's containerd worker, as root, with containerd's proxy plugin
/// `rustfuse` served by rustfuse-snapshotter `--mode MODE`.
fn containerd_worker(version: &str, containerd: Containerd, mode: SnapMode) {
    if let Some(reason) = containerd.unavailable(version) {
        skip(&reason);
        return;
    }
    let what = format!("BuildKit {version} containerd worker, {containerd:?} containerd, {mode:?}");
    let name = format!("ctrd-{containerd:?}-{mode:?}-{version}").to_lowercase();
    build_and_compare(
        version,
        &what,
        LinkCopyUp::Split,
        || {
            build_with(&what, &name, "rustfuse", |ws| {
                ws.build_containerd(version, containerd, mode, BUILD_DEADLINE)
            })
        },
        |b| match mode {
            SnapMode::Fuse => rustfuse_mounted(b),
            SnapMode::Overlay => overlay_chosen(b),
        },
    );
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

#[test]
fn containerd_worker_overlay_v0_34_2() {
    containerd_worker(buildkit::VERSIONS[0], Containerd::Debian, SnapMode::Overlay);
}

#[test]
fn containerd_worker_fuse_v0_34_2() {
    containerd_worker(buildkit::VERSIONS[0], Containerd::Debian, SnapMode::Fuse);
}

#[test]
fn containerd_worker_overlay_v0_11_6() {
    containerd_worker(buildkit::VERSIONS[1], Containerd::Debian, SnapMode::Overlay);
}

#[test]
fn containerd_worker_fuse_v0_11_6() {
    containerd_worker(buildkit::VERSIONS[1], Containerd::Debian, SnapMode::Fuse);
}

#[test]
fn containerd2_worker_overlay_v0_34_2() {
    containerd_worker(buildkit::VERSIONS[0], Containerd::V2, SnapMode::Overlay);
}

#[test]
fn containerd2_worker_fuse_v0_34_2() {
    containerd_worker(buildkit::VERSIONS[0], Containerd::V2, SnapMode::Fuse);
}
