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
use std::process::Command;
use std::time::Duration;

use rustfuse_tests::env::{
    bin_under_test, fuse_overlayfs_bin, require_bin_under_test, run_command, scratch, skip,
};

/// The build user; shared with rootless_snapshotter.rs.
const USER: &str = "rustfuse-rl";

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn sh(script: &str, args: &[&str], deadline: Duration) -> String {
    let out = run_command(
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(args),
        deadline,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "script failed (exit {}):\n{script}\nstdout:\n{}\nstderr:\n{}",
        out.code(),
        out.stdout,
        out.stderr
    );
    out.stdout
}

fn can_run() -> bool {
    if !require_bin_under_test() {
        return false;
    }
    if fuse_overlayfs_bin().is_none() {
        return skip("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)");
    }
    for (prog, pkg) in [
        ("buildah", "buildah"),
        ("newuidmap", "uidmap"),
        ("newgidmap", "uidmap"),
        ("umoci", "umoci"),
        ("busybox", "busybox-static"),
        ("setpriv", "util-linux"),
        ("useradd", "passwd"),
    ] {
        if which(prog).is_none() {
            return skip(&format!("{prog} not found (Debian package {pkg})"));
        }
    }
    let md = std::fs::metadata("/dev/fuse").unwrap();
    if md.mode() & 0o006 != 0o006 {
        eprintln!(
            "note: /dev/fuse is {:o}; setting it to 0666 (Debian's default) for the rootless build",
            md.mode() & 0o777
        );
        if let Err(e) =
            std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666))
        {
            return skip(&format!("/dev/fuse not usable by a non-root user: {e}"));
        }
    }
    true
}

/// Creates the build user (no home: HOME is set per run) with subordinate id ranges that do not
/// overlap any other entry. Idempotent.
fn ensure_user() {
    let script = r#"
set -eu
U="$1"
id "$U" >/dev/null 2>&1 || useradd -M -d /nonexistent -s /bin/sh "$U" || id "$U" >/dev/null
for f in /etc/subuid /etc/subgid; do
  touch "$f"
  if ! grep -q "^$U:" "$f"; then
    start=$(awk -F: 'BEGIN{m=200000} {e=$2+$3; if (e>m) m=e} END{print m}' "$f")
    echo "$U:$start:65536" >> "$f"
  fi
done
id -u "$U"
"#;
    sh(script, &[USER], Duration::from_secs(30));
}

/// A two-layer busybox base image with lower files to modify, delete, replace and chmod, as an
/// oci-archive tar (tag `latest`).
fn build_base_image(d: &Path) -> PathBuf {
    let script = r#"
set -eu
D="$1"
img="$D/img"
umoci init --layout "$img"
umoci new --image "$img:latest"
umoci unpack --image "$img:latest" "$D/bundle" >/dev/null
R="$D/bundle/rootfs"
mkdir -p "$R/bin" "$R/tmp" "$R/etc"
cp "$(command -v busybox)" "$R/bin/busybox"
for a in $(busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
umoci repack --image "$img:latest" "$D/bundle" >/dev/null
rm -rf "$D/bundle"
umoci unpack --image "$img:latest" "$D/bundle" >/dev/null
R="$D/bundle/rootfs"
mkdir -p "$R/lower/deldir/sub" "$R/replace/a/b" "$R/chm"
i=1
while [ $i -le 50 ]; do
  echo "old$i" > "$R/replace/old$i"; echo x > "$R/replace/a/b/o$i"; i=$((i+1))
done
echo keep > "$R/lower/keep"; echo mod > "$R/lower/mod"; echo del > "$R/lower/del"
echo ren > "$R/lower/ren"; echo d > "$R/lower/deldir/sub/f"; echo c > "$R/chm/file"
ln -s keep "$R/lower/sym"
umoci repack --image "$img:latest" "$D/bundle" >/dev/null
rm -rf "$D/bundle"
umoci config --image "$img:latest" --config.cmd /bin/sh
tar -C "$img" -cf "$D/base.tar" .
"#;
    sh(script, &[d.to_str().unwrap()], Duration::from_secs(120));
    d.join("base.tar")
}

const DOCKERFILE: &str = r#"FROM localhost/rf-base
RUN mkdir -p /many && cd /many && for i in $(seq 1 3000); do echo "file $i" > f$i; done && mkdir -p /many/d/e && echo deep > /many/d/e/x
RUN echo changed >> /lower/mod && rm /lower/del && rm -r /lower/deldir && mv /lower/ren /lower/renamed && ln -s ../many/f1 /lower/link && ln /lower/keep /lower/hard && rm /many/f1?? && echo again >> /many/f2
RUN rm -rf /replace && mkdir /replace && echo new > /replace/new
RUN chmod 0600 /lower/keep && chmod 0700 /chm && chmod 4755 /chm/file && chown 1000:1000 /lower/mod && chmod 0751 /many
COPY files /ctx/
RUN rm -rf /ctx/d3 && chmod 0640 /ctx/d4/c4 && ln /ctx/d5/c5 /ctx/d5/hard && echo h > /ctx/d5/h1 && ln /ctx/d5/h1 /ctx/d5/h2
"#;

/// The build context: the Dockerfile and 2000 files in 20 directories.
fn build_context(d: &Path) -> PathBuf {
    let ctx = d.join("ctx");
    for i in 1..=2000 {
        let dir = ctx.join(format!("files/d{}", i % 20));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("c{i}")), format!("ctx {i}\n")).unwrap();
    }
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    ctx
}

/// Run as the build user: storage.conf with the given mount program, import the base image,
/// `buildah bud`, export the result as an OCI layout. Prints `BUILD_MS <n>`.
const BUILD_SCRIPT: &str = r#"
set -eu
D="$1"; N="$2"; MP="$3"
export HOME="$D/home-$N" XDG_RUNTIME_DIR="$D/xdg-$N"
mkdir -p "$HOME/.config/containers" "$XDG_RUNTIME_DIR"
chmod 700 "$XDG_RUNTIME_DIR"
cat > "$HOME/.config/containers/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$D/graph-$N"
runroot = "$D/run-$N"

[storage.options.overlay]
mount_program = "$MP"
EOF
id=$(buildah pull -q "oci-archive:$D/base.tar:latest")
buildah tag "$id" localhost/rf-base
s=$(date +%s%N)
buildah bud --isolation chroot --network host --pull-never --layers \
  -t localhost/rf-out -f "$D/ctx/Dockerfile" "$D/ctx"
e=$(date +%s%N)
echo "BUILD_MS $(( (e - s) / 1000000 ))"
buildah push -q localhost/rf-out "oci:$D/out-$N:latest"
buildah info | grep -A2 GraphOptions
buildah rmi -a -f >/dev/null
"#;

fn chown_r(p: &Path, uid: u32) {
    rustix::fs::chownat(
        rustix::fs::CWD,
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(uid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chown_r(&e.path(), uid);
        }
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
    let out = run_command(
        Command::new("setpriv")
            .args([
                &format!("--reuid={USER}"),
                &format!("--regid={USER}"),
                "--init-groups",
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "sh",
                "-c",
                BUILD_SCRIPT,
                "sh",
            ])
            .arg(d)
            .arg(name)
            .arg(mp)
            .current_dir(d),
        Duration::from_secs(400),
    )
    .unwrap_or_else(|e| panic!("rootless build with {name}: {e}"));
    assert!(
        out.status.success(),
        "rootless buildah build with mount_program {} failed (exit {}):\nstdout:\n{}\nstderr:\n{}",
        mp.display(),
        out.code(),
        out.stdout,
        out.stderr
    );
    let ms: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("BUILD_MS "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no BUILD_MS in:\n{}", out.stdout));
    assert!(
        out.stdout
            .contains(&format!("overlay.mount_program={}", mp.display())),
        "buildah does not use the configured mount_program:\n{}",
        out.stdout
    );
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
    sh(
        r#"umoci unpack --image "$1:latest" "$2" >/dev/null"#,
        &[
            d.join(format!("out-{name}")).to_str().unwrap(),
            unpacked.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
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
    ensure_user();
    let uid = sh("id -u \"$1\"", &[USER], Duration::from_secs(10))
        .trim()
        .parse::<u32>()
        .unwrap();
    let s = scratch("rootless-build");
    let d = s.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Programs the user can reach: copies inside the scratch directory.
    let rustfuse = d.join("rustfuse");
    std::fs::copy(bin_under_test(), &rustfuse).unwrap();
    std::fs::set_permissions(&rustfuse, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fo = fuse_overlayfs_bin().unwrap();
    build_base_image(d);
    build_context(d);
    let mp_fo = shim(d, "fuse-overlayfs", &fo);
    let mp_rf = shim(d, "rustfuse", &rustfuse);
    chown_r(d, uid);

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
