//! Rootless buildah: a non-root user (created by the test, with /etc/subuid and /etc/subgid
//! ranges) builds the same Dockerfile twice with containers/storage's overlay driver, once with
//! `mount_program` = rustfuse and once with Debian's fuse-overlayfs, offline from a busybox image
//! made with umoci. Both images are exported (`buildah push ... oci:`), unpacked with umoci and
//! compared entry by entry: type, mode, owner, size, content, symlink target, link count. The
//! rustfuse image is also checked against what the Dockerfile must produce (deleted files gone,
//! `rm -rf DIR && mkdir DIR` leaving only the new entries, ...). A divergence of fuse-overlayfs
//! on the `rm -rf && mkdir` step (a known 1.10 bug) is reported, not required to match.
//!
//! Needs root (to create the user and unpack as root) and the Debian packages buildah, uidmap,
//! fuse-overlayfs, umoci, busybox-static. If /dev/fuse is not 0666 (Debian's default), the test
//! sets it to 0666 so that the user can open it, and says so.
//!
//! Note: buildah 1.28 refuses `--network none` with `--isolation chroot` ("cannot set --network
//! other than host with --isolation chroot"); chroot isolation has no network namespace of its
//! own anyway, and nothing is fetched (`--pull-never`, no RUN step uses the network).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustfuse_tests::buildah::{self, Build};
use rustfuse_tests::env::{
    bin_under_test, fuse_overlayfs_bin, require_bin_under_test, scratch, skip,
};

fn can_run() -> bool {
    if !require_bin_under_test() {
        return false;
    }
    if fuse_overlayfs_bin().is_none() {
        return skip("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)");
    }
    match buildah::unavailable() {
        Some(reason) => skip(&reason),
        None => true,
    }
}

/// A mount_program wrapper that logs each call, so the test can prove which program ran.
fn shim(d: &Path, name: &str, real: &Path) -> PathBuf {
    let p = d.join(format!("mount-program-{name}"));
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            d.join(format!("calls-{name}")).display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Builds with one mount program; returns (build milliseconds, unpacked rootfs).
fn build_with(d: &Path, name: &str, mp: &Path) -> (u64, PathBuf) {
    let Build { ms, .. } =
        buildah::build_as_user(d, name, Some(mp), true, Duration::from_secs(400))
            .unwrap_or_else(|e| panic!("{e}"));
    let calls = std::fs::read_to_string(d.join(format!("calls-{name}"))).unwrap_or_default();
    assert!(
        calls.lines().any(|l| l.contains("lowerdir=")),
        "{name} was never called to mount; calls:\n{calls}"
    );
    eprintln!(
        "{name}: {} mount calls",
        calls.lines().filter(|l| l.contains("lowerdir=")).count()
    );
    let unpacked = d.join(format!("unpacked-{name}"));
    buildah::sh(
        r#"umoci unpack --image "$1:latest" "$2" >/dev/null"#,
        &[
            d.join(format!("out-{name}")).to_str().unwrap(),
            unpacked.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (ms, unpacked.join("rootfs"))
}

#[derive(Debug, PartialEq, Eq, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
    Other(u32),
}

#[derive(Debug, PartialEq, Eq, Clone)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
}

fn walk(root: &Path) -> BTreeMap<String, Entry> {
    fn rec(root: &Path, p: &Path, out: &mut BTreeMap<String, Entry>) {
        let md = std::fs::symlink_metadata(p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_symlink() {
            Kind::Symlink(std::fs::read_link(p).unwrap())
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File(std::fs::read(p).unwrap())
        } else {
            Kind::Other(md.mode() & 0o170000)
        };
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        out.insert(
            rel,
            Entry {
                kind: kind.clone(),
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                nlink: if kind == Kind::Dir { 0 } else { md.nlink() },
            },
        );
        if kind == Kind::Dir {
            let mut names: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            for n in names {
                rec(root, &n, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    rec(root, root, &mut out);
    out
}

fn file<'a>(t: &'a BTreeMap<String, Entry>, p: &str) -> (Vec<u8>, &'a Entry) {
    match t.get(p) {
        Some(
            e @ Entry {
                kind: Kind::File(c),
                ..
            },
        ) => (c.clone(), e),
        other => panic!("{p}: expected a regular file, found {other:?}"),
    }
}

fn children<'a>(t: &'a BTreeMap<String, Entry>, dir: &str) -> Vec<&'a str> {
    let prefix = format!("{dir}/");
    t.keys()
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter(|rest| !rest.contains('/'))
        .collect()
}

/// What the Dockerfile must produce, whatever the mount program.
fn check_expected(t: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut errs = Vec::new();
    let mut check = |ok: bool, msg: String| {
        if !ok {
            errs.push(msg);
        }
    };
    // RUN 1 + deletions in RUN 2: f100..f199 gone, 2900 files and d left.
    let many = children(t, "/many");
    check(
        many.len() == 2901,
        format!("/many has {} entries, want 2901", many.len()),
    );
    check(
        !t.contains_key("/many/f150")
            && t.contains_key("/many/f1")
            && t.contains_key("/many/f3000"),
        "/many/f1?? deleted, others kept".into(),
    );
    check(
        file(t, "/many/f2").0 == b"file 2\nagain\n",
        "/many/f2 appended".into(),
    );
    check(
        file(t, "/many/d/e/x").0 == b"deep\n",
        "/many/d/e/x content".into(),
    );
    check(
        t["/many"].mode == 0o751,
        format!("/many mode {:o}", t["/many"].mode),
    );
    // RUN 2: lower files modified, deleted, renamed, linked.
    let (c, e) = file(t, "/lower/mod");
    check(c == b"mod\nchanged\n", "/lower/mod content".into());
    check(
        e.uid == 1000 && e.gid == 1000,
        format!("/lower/mod owner {}:{}", e.uid, e.gid),
    );
    for gone in [
        "/lower/del",
        "/lower/deldir",
        "/lower/deldir/sub/f",
        "/lower/ren",
    ] {
        check(!t.contains_key(gone), format!("{gone} must be deleted"));
    }
    check(
        file(t, "/lower/renamed").0 == b"ren\n",
        "/lower/renamed".into(),
    );
    check(
        t.get("/lower/link").map(|e| &e.kind) == Some(&Kind::Symlink("../many/f1".into())),
        "/lower/link symlink".into(),
    );
    check(
        t.get("/lower/sym").map(|e| &e.kind) == Some(&Kind::Symlink("keep".into())),
        "/lower/sym symlink".into(),
    );
    let (keep, ke) = file(t, "/lower/keep");
    let (hard, he) = file(t, "/lower/hard");
    check(
        keep == b"keep\n" && hard == b"keep\n",
        "/lower/keep and /lower/hard content".into(),
    );
    // The hard link made in RUN 2 is split by the chmod of RUN 4 (a new copy of `keep` in a
    // later layer), as with any layered image.
    check(he.mode == 0o644, format!("/lower/hard mode {:o}", he.mode));
    check(ke.mode == 0o600, format!("/lower/keep mode {:o}", ke.mode));
    // RUN 3: rm -rf /replace && mkdir /replace: only the new entry.
    let rep = children(t, "/replace");
    check(
        rep == ["new"],
        format!("/replace must hold only `new`, holds {rep:?}"),
    );
    // RUN 4: chmod.
    check(
        t["/chm"].mode == 0o700,
        format!("/chm mode {:o}", t["/chm"].mode),
    );
    check(
        t["/chm/file"].mode == 0o4755,
        format!("/chm/file mode {:o}", t["/chm/file"].mode),
    );
    // COPY + RUN 6.
    let ctx = children(t, "/ctx");
    check(
        ctx.len() == 19 && !ctx.contains(&"d3"),
        format!("/ctx dirs {ctx:?}"),
    );
    let ctx_files = t
        .keys()
        .filter(|k| k.starts_with("/ctx/d") && k.matches('/').count() == 3)
        .count();
    check(
        ctx_files == 1903,
        format!("/ctx files {ctx_files}, want 1903"),
    );
    // A link to a file of a lower layer: containers/storage's naive diff (used with a
    // mount_program) leaves the unchanged `c5` out of the layer, so `hard` becomes a copy.
    check(
        file(t, "/ctx/d5/hard").0 == b"ctx 5\n",
        "/ctx/d5/hard content".into(),
    );
    // Two links made in the same layer stay links.
    let (h1, e1) = file(t, "/ctx/d5/h1");
    let (_, e2) = file(t, "/ctx/d5/h2");
    check(
        h1 == b"h\n" && e1.nlink == 2 && e2.nlink == 2,
        format!(
            "/ctx/d5/h1 and h2: hard links, nlink {} {}",
            e1.nlink, e2.nlink
        ),
    );
    let (c4, e4) = file(t, "/ctx/d4/c4");
    check(c4 == b"ctx 4\n", "/ctx/d4/c4 content".into());
    check(e4.mode == 0o640, format!("/ctx/d4/c4 mode {:o}", e4.mode));
    check(
        file(t, "/ctx/d19/c1999").0 == b"ctx 1999\n",
        "/ctx/d19/c1999 content".into(),
    );
    errs
}

#[test]
fn buildah_bud_with_rustfuse_matches_fuse_overlayfs() {
    if !can_run() {
        return;
    }
    let uid = buildah::ensure_user().unwrap_or_else(|e| panic!("{e}"));
    let s = scratch("rootless-build");
    let d = s.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Programs the user can reach: copies inside the scratch directory.
    let rustfuse = buildah::program_copy(d, "rustfuse", &bin_under_test()).unwrap();
    let fo = fuse_overlayfs_bin().unwrap();
    buildah::build_base_image(d).unwrap_or_else(|e| panic!("{e}"));
    buildah::build_context(d).unwrap();
    let mp_fo = shim(d, "fuse-overlayfs", &fo);
    let mp_rf = shim(d, "rustfuse", &rustfuse);
    buildah::chown_r(d, uid).unwrap();

    let (ms_fo, root_fo) = build_with(d, "fuse-overlayfs", &mp_fo);
    let (ms_rf, root_rf) = build_with(d, "rustfuse", &mp_rf);
    eprintln!(
        "BUILD TIMES (buildah bud, rootless, --layers): rustfuse ({}) {ms_rf} ms, fuse-overlayfs {ms_fo} ms",
        bin_under_test().display()
    );

    let t_rf = walk(&root_rf);
    let t_fo = walk(&root_fo);
    eprintln!(
        "image entries: rustfuse {}, fuse-overlayfs {}",
        t_rf.len(),
        t_fo.len()
    );

    let errs = check_expected(&t_rf);
    assert!(
        errs.is_empty(),
        "the rustfuse-built image is not what the Dockerfile must produce:\n{}",
        errs.join("\n")
    );

    // fuse-overlayfs 1.10 may bring old entries back after `rm -rf /replace && mkdir /replace`:
    // report that, and compare everything else exactly.
    let fo_errs = check_expected(&t_fo);
    if !fo_errs.is_empty() {
        eprintln!(
            "NOTE: the fuse-overlayfs-built image diverges from the correct result:\n{}",
            fo_errs.join("\n")
        );
    }
    let fo_replace_wrong = children(&t_fo, "/replace") != ["new"];
    let skip_path = |p: &str| fo_replace_wrong && p.starts_with("/replace/");
    let mut diffs = Vec::new();
    for (p, e) in &t_rf {
        if skip_path(p) {
            continue;
        }
        match t_fo.get(p) {
            None => diffs.push(format!("{p}: only in the rustfuse image")),
            Some(f) if f != e => {
                let short = |e: &Entry| match &e.kind {
                    Kind::File(c) if c.len() > 64 => Entry {
                        kind: Kind::File(format!("<{} bytes>", c.len()).into_bytes()),
                        ..e.clone()
                    },
                    _ => e.clone(),
                };
                diffs.push(format!(
                    "{p}: rustfuse {:?} / fuse-overlayfs {:?}",
                    short(e),
                    short(f)
                ))
            }
            Some(_) => {}
        }
    }
    for p in t_fo.keys() {
        if !skip_path(p) && !t_rf.contains_key(p) {
            diffs.push(format!("{p}: only in the fuse-overlayfs image"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences between the images built with rustfuse and fuse-overlayfs:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
