//! Rootless buildah: a non-root user (created by the test, with /etc/subuid and /etc/subgid
//! ranges) builds the same Dockerfile three times with containers/storage's overlay driver:
//! `mount_program` = rustfuse, `mount_program` = Debian's fuse-overlayfs, and no mount program
//! (kernel overlayfs in the user's namespace), offline from a busybox image made with umoci.
//! The images are exported (`buildah push ... oci:`), unpacked with umoci and the rustfuse and
//! fuse-overlayfs ones compared entry by entry: type, mode, owner, size, content, symlink target,
//! link count. The rustfuse image is also checked against what the Dockerfile must produce
//! (deleted files gone, `rm -rf DIR && mkdir DIR` leaving only the new entries, ...). A
//! divergence of fuse-overlayfs on the `rm -rf && mkdir` step (a known 1.10 bug) is reported,
//! not required to match.
//!
//! The native build needs kernel overlayfs in the user's namespace, which Linux refuses before
//! 5.11: a trial mount as the build user decides (never the kernel version), and where it is
//! refused the native build is left out, the test says so (`NOTE: no build with the native
//! overlay driver: ...`) and compares the rustfuse image with the fuse-overlayfs one only.
//!
//! For a slow machine (tests/kernel.sh under TCG, where a build takes many minutes):
//! `RUSTFUSE_TEST_BUILDAH_REFERENCES=none` makes rustfuse's build alone, checked against what
//! the Dockerfile must produce and its chmod layer and link groups as above;
//! `RUSTFUSE_TEST_BUILDAH_SIZE=small` makes a tenth of the files with the same steps. The test
//! prints a NOTE for each.
//!
//! Hard links as users make them ([`LINK_STEPS`], after the steps of [`buildah::DOCKERFILE`]):
//! one RUN makes link groups (`ln /gen/a /gen/b`, groups of 2 and 3 names across two
//! directories); a later RUN checks that each group is one file (`[ X -ef Y ]`, link counts);
//! a later one chmods or chowns ONE name of a group and checks that every name shows it, and
//! chmods a name of another group whose other name it never looks at; the last RUN checks all
//! of that again through the committed layers. With rustfuse a failed check fails the build;
//! the other two builds print it (`LINKCHECK FAIL`) and the test reports it. After the builds
//! the layer of the chmod step is listed with `tar -tvf` for all three, the rustfuse one must
//! hold each changed group as one file and hard links to it, and the images' hard-link groups
//! (names sharing an inode) must be the same in all three wherever no step changed a group
//! after making it. Where one did, rootless kernel overlayfs (no index) and fuse-overlayfs 1.10
//! split the group and rustfuse keeps it (as kernel overlayfs with index=on would): reported,
//! see docs/rootless.md.
//!
//! Needs root (to create the user and unpack as root) and the Debian packages buildah, uidmap,
//! fuse-overlayfs, umoci, busybox-static. If /dev/fuse is not 0666 (Debian's default), the test
//! sets it to 0666 so that the user can open it, and says so.
//!
//! Note: buildah 1.28 refuses `--network none` with `--isolation chroot` ("cannot set --network
//! other than host with --isolation chroot"); chroot isolation has no network namespace of its
//! own anyway, and nothing is fetched (`--pull-never`, no RUN step uses the network).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustfuse_tests::buildah::{self, Build, Size, oci};
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

/// Hard-link steps appended to [`buildah::DOCKERFILE`]. `CK` becomes the shell function `ck`,
/// which evaluates a test and, when it is false, prints `LINKCHECK FAIL: <test>` and the
/// listing of /gen and /gen2, then runs `FAIL` (`exit 1` for the build that must pass them,
/// `:` for the reference builds). In the chmod step nothing looks /gen2/u2 up: its change must
/// reach it through the committed layer.
const LINK_STEPS: &str = r#"RUN mkdir -p /gen /gen2 && echo a > /gen/a && ln /gen/a /gen/b \
 && echo t > /gen/t1 && ln /gen/t1 /gen/t2 && ln /gen/t1 /gen2/t3 \
 && echo o > /gen/o1 && ln /gen/o1 /gen2/o2 && echo u > /gen/u1 && ln /gen/u1 /gen2/u2
RUN CK; ck '[ /gen/a -ef /gen/b ]'; ck '[ /gen/t1 -ef /gen/t2 ]'; ck '[ /gen/t1 -ef /gen2/t3 ]'; \
 ck '[ /gen/o1 -ef /gen2/o2 ]'; ck '[ /gen/u1 -ef /gen2/u2 ]'; ck '[ $(stat -c %h /gen/a) = 2 ]'; \
 ck '[ $(stat -c %h /gen/t2) = 3 ]'; ck '[ $(stat -c %h /gen2/o2) = 2 ]'
RUN CK; chmod 0640 /gen2/t3 && chown 1000:1000 /gen2/o2 && chmod 0600 /gen/u1 \
 && for n in /gen/t1 /gen/t2 /gen2/t3; do ck "[ \$(stat -c %a $n) = 640 ]"; done \
 && for n in /gen/o1 /gen2/o2; do ck "[ \$(stat -c %u:%g $n) = 1000:1000 ]"; done \
 && ck '[ /gen/t1 -ef /gen2/t3 ]' && ck '[ /gen/t2 -ef /gen2/t3 ]' && ck '[ /gen/o1 -ef /gen2/o2 ]' \
 && ck '[ $(stat -c %h /gen/t1) = 3 ]'
RUN CK; ck '[ $(stat -c %a /gen2/u2) = 600 ]'; ck '[ /gen/u1 -ef /gen2/u2 ]'; \
 ck '[ $(stat -c %a /gen/t2) = 640 ]'; ck '[ /gen/t1 -ef /gen2/t3 ]'; ck '[ $(stat -c %h /gen2/t3) = 3 ]'; \
 ck '[ $(stat -c %u /gen/o1) = 1000 ]'; ck '[ /gen/o1 -ef /gen2/o2 ]'; ck '[ /gen/a -ef /gen/b ]'
"#;

/// `ln /ctx/d5/c5 /ctx/d5/hard` of [`buildah::DOCKERFILE`]: a link to a file of a lower layer.
/// With a mount_program containers/storage's naive diff commits only the new name (a copy); the
/// native driver commits both names, linked (kernel overlayfs copies `c5` up to link it).
const LINK_TO_LOWER: &[&str] = &["/ctx/d5/c5", "/ctx/d5/hard"];

/// Text of the chmod step's command, to find its layer in the image history.
const CHMOD_STEP: &str = "chmod 0640 /gen2/t3";

/// The link groups the Dockerfile makes (as the unpacked image names them), and whether a
/// step changes the group after making it.
const GROUPS: &[(&[&str], bool)] = &[
    (&["/gen/a", "/gen/b"], false),
    (&["/gen/t1", "/gen/t2", "/gen2/t3"], true),
    (&["/gen/o1", "/gen2/o2"], true),
    (&["/gen/u1", "/gen2/u2"], true),
];

/// The Dockerfile: the shared steps (with the files of `size`), then [`LINK_STEPS`]; a failed
/// link check fails the build when `strict`.
fn dockerfile(size: Size, strict: bool) -> String {
    let ck = format!(
        r#"ck() {{ eval "$1" || {{ echo "LINKCHECK FAIL: $1"; ls -lin /gen /gen2; {}; }}; }}"#,
        if strict { "exit 1" } else { ":" }
    );
    format!("{}{}", size.dockerfile(), LINK_STEPS.replace("CK", &ck))
}

/// One finished build.
struct Built {
    ms: u64,
    /// The exported OCI layout.
    layout: PathBuf,
    /// Its unpacked rootfs.
    rootfs: PathBuf,
    /// The `LINKCHECK FAIL` lines the RUN steps printed.
    link_fails: Vec<String>,
}

/// Builds with one mount program (None: the native overlay driver) and the Dockerfile of
/// [`dockerfile`]`(strict)`, exports and unpacks the image.
fn build_with(d: &Path, size: Size, name: &str, mp: Option<&Path>, strict: bool) -> Built {
    // Builds run one after another: each reads the Dockerfile written just before it.
    std::fs::write(d.join("ctx/Dockerfile"), dockerfile(size, strict)).unwrap();
    let Build { ms, stdout } = buildah::build_as_user(d, name, mp, true, Duration::from_secs(400))
        .unwrap_or_else(|e| panic!("{e}"));
    if mp.is_some() {
        let calls = std::fs::read_to_string(d.join(format!("calls-{name}"))).unwrap_or_default();
        assert!(
            calls.lines().any(|l| l.contains("lowerdir=")),
            "{name} was never called to mount; calls:\n{calls}"
        );
        eprintln!(
            "{name}: {} mount calls",
            calls.lines().filter(|l| l.contains("lowerdir=")).count()
        );
    }
    let layout = d.join(format!("out-{name}"));
    let unpacked = d.join(format!("unpacked-{name}"));
    buildah::sh(
        r#"umoci unpack --image "$1:latest" "$2" >/dev/null"#,
        &[layout.to_str().unwrap(), unpacked.to_str().unwrap()],
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let link_fails = stdout
        .lines()
        .filter(|l| l.starts_with("LINKCHECK FAIL"))
        .map(str::to_string)
        .collect();
    Built {
        ms,
        layout,
        rootfs: unpacked.join("rootfs"),
        link_fails,
    }
}

/// One line of `tar -tvf`.
#[derive(Debug, Clone)]
struct TarEntry {
    /// `-rw-r-----`, `hrw-r-----` (hard link), ...
    mode: String,
    /// `uid/gid`.
    owner: String,
    /// As `/gen/t1`.
    name: String,
    /// Target of a hard link, as `/gen/t1`.
    link: Option<String>,
    line: String,
}

/// The entries under /gen and /gen2 (directories left out) of the layer made by the step whose
/// command contains `step`, in the OCI layout `layout`, as `tar -tvf` lists them.
fn layer_gen_entries(layout: &Path, step: &str) -> Vec<TarEntry> {
    let listing = buildah::sh(
        r#"set -eu
dig=$(umoci stat --image "$1:latest" | grep -F -- "$2" | awk '$1 ~ /^sha256:/ {print $1}')
if [ -z "$dig" ] || [ "$(echo "$dig" | wc -l)" != 1 ]; then
  echo "no single layer for the step: '$dig'" >&2; umoci stat --image "$1:latest" >&2; exit 1
fi
tar -tvf "$1/blobs/sha256/${dig#sha256:}""#,
        &[layout.to_str().unwrap(), step],
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let abs = |n: &str| format!("/{}", n.trim_start_matches("./").trim_start_matches('/'));
    listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = abs(f.get(5)?);
            if f[0].starts_with('d') || !(name.starts_with("/gen/") || name.starts_with("/gen2/")) {
                return None;
            }
            Some(TarEntry {
                mode: f[0].to_string(),
                owner: f[1].to_string(),
                name,
                link: (f.get(6..8) == Some(&["link", "to"][..]))
                    .then(|| f.get(8).map(|t| abs(t)))
                    .flatten(),
                line: l.to_string(),
            })
        })
        .collect()
}

/// That `layer` holds the link group `names` as one regular file and hard links to it, with
/// permissions `perm` (as `tar -tvf` shows them, without the type) and owner `owner`.
fn check_layer_group(layer: &[TarEntry], names: &[&str], perm: &str, owner: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let of_group: Vec<&TarEntry> = layer
        .iter()
        .filter(|e| names.contains(&e.name.as_str()))
        .collect();
    let files: Vec<&&TarEntry> = of_group
        .iter()
        .filter(|e| e.mode.starts_with('-'))
        .collect();
    if of_group.len() != names.len() || files.len() != 1 {
        errs.push(format!(
            "{names:?}: want one regular file and {} hard links to it, the layer has {:?}",
            names.len() - 1,
            of_group.iter().map(|e| &e.line).collect::<Vec<_>>()
        ));
        return errs;
    }
    for e in &of_group {
        if e.mode.starts_with('h') && e.link.as_deref() != Some(files[0].name.as_str()) {
            errs.push(format!("{}: not a link to {}", e.line, files[0].name));
        }
        if e.mode[1..] != *perm || e.owner != owner {
            errs.push(format!("{}: want {perm} {owner}", e.line));
        }
    }
    errs
}

/// Names of one inode (non-directories with more than one name), each group sorted.
fn link_groups(root: &Path) -> BTreeSet<Vec<String>> {
    fn rec(root: &Path, p: &Path, by_ino: &mut BTreeMap<(u64, u64), Vec<String>>) {
        let md = std::fs::symlink_metadata(p).unwrap();
        if md.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                rec(root, &e.unwrap().path(), by_ino);
            }
        } else if md.nlink() > 1 {
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            by_ino.entry((md.dev(), md.ino())).or_default().push(rel);
        }
    }
    let mut by_ino = BTreeMap::new();
    rec(root, root, &mut by_ino);
    by_ino
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect()
}

/// Names of the groups a step changes after making them.
fn changed_names() -> BTreeSet<&'static str> {
    GROUPS
        .iter()
        .filter(|(_, changed)| *changed)
        .flat_map(|(names, _)| names.iter().copied())
        .collect()
}

/// `ls -ln`-like line of each name of the changed groups in `root`.
fn describe_changed(root: &Path) -> Vec<String> {
    changed_names()
        .into_iter()
        .map(|n| match std::fs::symlink_metadata(root.join(&n[1..])) {
            Ok(md) => format!(
                "{n}: ino {} nlink {} mode {:o} owner {}:{}",
                md.ino(),
                md.nlink(),
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            ),
            Err(e) => format!("{n}: {e}"),
        })
        .collect()
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

/// What the Dockerfile (with the files of `size`) must produce, whatever the mount program.
fn check_expected(t: &BTreeMap<String, Entry>, size: Size) -> Vec<String> {
    let mut errs = Vec::new();
    let mut check = |ok: bool, msg: String| {
        if !ok {
            errs.push(msg);
        }
    };
    // RUN 1 + deletions in RUN 2: f100..f199 gone, the other files and d left.
    let many = children(t, "/many");
    let want = size.many as usize - 100 + 1;
    check(
        many.len() == want,
        format!("/many has {} entries, want {want}", many.len()),
    );
    check(
        !t.contains_key("/many/f150")
            && t.contains_key("/many/f1")
            && t.contains_key(&format!("/many/f{}", size.many)),
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
    // The context's files but d3's, and hard, h1, h2 of RUN 6.
    let want = (size.context - size.context / 20 + 3) as usize;
    check(
        ctx_files == want,
        format!("/ctx files {ctx_files}, want {want}"),
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
    let last = size.context - 1; // in d19
    check(
        file(t, &format!("/ctx/d19/c{last}")).0 == format!("ctx {last}\n").as_bytes(),
        format!("/ctx/d19/c{last} content"),
    );
    // LINK_STEPS: each group one file with its content; the chmod and chown of one name shown
    // by all names (the groups themselves are checked with `link_groups`).
    for (names, content, mode, owner) in [
        (&["/gen/a", "/gen/b"][..], "a", 0o644, 0),
        (&["/gen/t1", "/gen/t2", "/gen2/t3"][..], "t", 0o640, 0),
        (&["/gen/o1", "/gen2/o2"][..], "o", 0o644, 1000),
        (&["/gen/u1", "/gen2/u2"][..], "u", 0o600, 0),
    ] {
        for n in names {
            let (c, e) = file(t, n);
            check(
                c == format!("{content}\n").as_bytes()
                    && e.nlink == names.len() as u64
                    && e.mode == mode
                    && e.uid == owner
                    && e.gid == owner,
                format!(
                    "{n}: nlink {} mode {:o} owner {}:{}, want nlink {} mode {mode:o} owner {owner}:{owner}",
                    e.nlink,
                    e.mode,
                    e.uid,
                    e.gid,
                    names.len()
                ),
            );
        }
    }
    errs
}

/// Kills, when dropped, what a failed or killed build left running as the build user with the
/// scratch directory on its command line (FUSE daemons, buildah), by pid.
struct LeftoverKiller {
    uid: u32,
    dir: PathBuf,
}

impl Drop for LeftoverKiller {
    fn drop(&mut self) {
        let dir = self.dir.as_os_str().as_encoded_bytes();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in procs.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let real_uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok());
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if real_uid == Some(self.uid) && cmdline.windows(dir.len()).any(|w| w == dir) {
                eprintln!(
                    "note: killing pid {pid} left by the build: {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                );
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// Whether to make the reference builds beside rustfuse's (`$RUSTFUSE_TEST_BUILDAH_REFERENCES`:
/// `all`, the default: fuse-overlayfs's, and the native driver's where the kernel allows it;
/// `none`: rustfuse's build alone, its image and layers checked against what the Dockerfile
/// must produce, for tests/kernel.sh, where a build takes minutes under TCG). Says so when not.
fn references_wanted() -> bool {
    match std::env::var("RUSTFUSE_TEST_BUILDAH_REFERENCES").as_deref() {
        Err(_) | Ok("") | Ok("all") => true,
        Ok("none") => {
            eprintln!(
                "NOTE: RUSTFUSE_TEST_BUILDAH_REFERENCES=none: no reference builds; the rustfuse image is checked against what the Dockerfile must produce only"
            );
            false
        }
        Ok(other) => panic!("RUSTFUSE_TEST_BUILDAH_REFERENCES={other:?}: want all or none"),
    }
}

/// How many files the builds make (`$RUSTFUSE_TEST_BUILDAH_SIZE`: `full`, the default, or
/// `small`: a tenth, the same steps, for tests/kernel.sh under TCG). Says so when small.
fn size_wanted() -> Size {
    match std::env::var("RUSTFUSE_TEST_BUILDAH_SIZE").as_deref() {
        Err(_) | Ok("") | Ok("full") => Size::FULL,
        Ok("small") => {
            eprintln!(
                "NOTE: RUSTFUSE_TEST_BUILDAH_SIZE=small: {:?} (full: {:?})",
                Size::SMALL,
                Size::FULL
            );
            Size::SMALL
        }
        Ok(other) => panic!("RUSTFUSE_TEST_BUILDAH_SIZE={other:?}: want full or small"),
    }
}

#[test]
fn buildah_bud_with_rustfuse_matches_fuse_overlayfs() {
    if !can_run() {
        return;
    }
    let uid = buildah::ensure_user().unwrap_or_else(|e| panic!("{e}"));
    let s = scratch("rootless-build");
    let d = s.path();
    // Dropped before `s`: nothing of the builds may outlive the directory.
    let _leftovers = LeftoverKiller {
        uid,
        dir: d.to_path_buf(),
    };
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Programs the user can reach: copies inside the scratch directory.
    let rustfuse = buildah::program_copy(d, "rustfuse", &bin_under_test()).unwrap();
    let fo = fuse_overlayfs_bin().unwrap();
    buildah::build_base_image(d).unwrap_or_else(|e| panic!("{e}"));
    let size = size_wanted();
    buildah::build_context_of(d, size).unwrap();
    let mp_fo = shim(d, "fuse-overlayfs", &fo);
    let mp_rf = shim(d, "rustfuse", &rustfuse);
    buildah::chown_r(d, uid).unwrap();

    // The native overlay driver needs kernel overlayfs in the user's namespace (Linux 5.11+):
    // where a trial mount shows it refused, the reference is fuse-overlayfs's build alone.
    let with_refs = references_wanted();
    let native_refused = with_refs
        .then(|| buildah::native_overlay_refused(d).unwrap_or_else(|e| panic!("{e}")))
        .flatten();
    if let Some(why) = &native_refused {
        eprintln!(
            "NOTE: no build with the native overlay driver: {why}; the rustfuse image is compared with the fuse-overlayfs one only"
        );
    }

    let b_fo = with_refs.then(|| build_with(d, size, "fuse-overlayfs", Some(&mp_fo), false));
    let b_rf = build_with(d, size, "rustfuse", Some(&mp_rf), true);
    let b_na =
        (with_refs && native_refused.is_none()).then(|| build_with(d, size, "native", None, false));
    let ms = |b: &Option<Built>| match b {
        Some(b) => format!("{} ms", b.ms),
        None => "not built".to_string(),
    };
    eprintln!(
        "BUILD TIMES (buildah bud, rootless, --layers): rustfuse ({}) {} ms, fuse-overlayfs {}, native overlay {}",
        bin_under_test().display(),
        b_rf.ms,
        ms(&b_fo),
        ms(&b_na)
    );
    let root_rf = &b_rf.rootfs;

    // Hard links: what each build's RUN steps saw, what containers/storage committed for the
    // chmod step, and the link groups of the final images.
    let mut refs = Vec::new();
    refs.extend(b_fo.as_ref().map(|b| ("fuse-overlayfs", b)));
    refs.extend(b_na.as_ref().map(|b| ("native overlay", b)));
    for &(name, b) in &refs {
        if !b.link_fails.is_empty() {
            eprintln!(
                "FINDING: link checks failed in the RUN steps of the {name} build:\n  {}",
                b.link_fails.join("\n  ")
            );
        }
    }
    let layer_rf = layer_gen_entries(&b_rf.layout, CHMOD_STEP);
    for &(name, b) in [("rustfuse", &b_rf)].iter().chain(&refs) {
        let layer = if name == "rustfuse" {
            layer_rf.clone()
        } else {
            layer_gen_entries(&b.layout, CHMOD_STEP)
        };
        eprintln!(
            "LAYER of `{CHMOD_STEP} ...` built with {name}, under /gen and /gen2 (tar -tvf):\n  {}",
            layer
                .iter()
                .map(|e| e.line.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    let mut errs = Vec::new();
    errs.extend(check_layer_group(
        &layer_rf,
        &["/gen/t1", "/gen/t2", "/gen2/t3"],
        "rw-r-----",
        "0/0",
    ));
    errs.extend(check_layer_group(
        &layer_rf,
        &["/gen/o1", "/gen2/o2"],
        "rw-r--r--",
        "1000/1000",
    ));
    errs.extend(check_layer_group(
        &layer_rf,
        &["/gen/u1", "/gen2/u2"],
        "rw-------",
        "0/0",
    ));
    if let Some(e) = layer_rf
        .iter()
        .find(|e| e.name == "/gen/a" || e.name == "/gen/b")
    {
        errs.push(format!("unchanged /gen/a, /gen/b in the layer: {}", e.line));
    }
    assert!(
        errs.is_empty(),
        "the rustfuse build's layer of the chmod step:\n{}",
        errs.join("\n")
    );

    let changed = changed_names();
    // Groups of the changed names, and (native only) the link to a lower file, which the
    // naive diff of a mount_program build commits as a copy: compared apart.
    let unchanged_groups = |root: &Path, skip_lower_link: bool| -> BTreeSet<Vec<String>> {
        link_groups(root)
            .into_iter()
            .filter(|g| {
                !g.iter().any(|n| {
                    changed.contains(n.as_str())
                        || (skip_lower_link && LINK_TO_LOWER.contains(&n.as_str()))
                })
            })
            .collect()
    };
    let groups_rf = link_groups(root_rf);
    for (names, _) in GROUPS {
        let want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        assert!(
            groups_rf.contains(&want),
            "rustfuse image: {want:?} must be one file; its link groups: {groups_rf:?}"
        );
    }
    for &(name, b) in &refs {
        let native = name == "native overlay";
        let (mine, theirs) = (
            unchanged_groups(root_rf, native),
            unchanged_groups(&b.rootfs, native),
        );
        assert_eq!(
            mine, theirs,
            "hard-link groups no step changed after making them: rustfuse image / {name} image"
        );
        let lower_link: Vec<String> = LINK_TO_LOWER.iter().map(|n| n.to_string()).collect();
        eprintln!(
            "{LINK_TO_LOWER:?} (ln to a file of a lower layer) one file in the {name} image: {}, in the rustfuse image: {}",
            link_groups(&b.rootfs).contains(&lower_link),
            groups_rf.contains(&lower_link)
        );
        eprintln!(
            "FINDING: names of the link groups changed through one name, in the {name} image (rustfuse: one inode each, the change on all names):\n  {}",
            describe_changed(&b.rootfs).join("\n  ")
        );
    }
    eprintln!(
        "rustfuse image:\n  {}",
        describe_changed(root_rf).join("\n  ")
    );

    let t_rf = walk(root_rf);
    eprintln!("image entries: rustfuse {}", t_rf.len());
    let errs = check_expected(&t_rf, size);
    assert!(
        errs.is_empty(),
        "the rustfuse-built image is not what the Dockerfile must produce:\n{}",
        errs.join("\n")
    );
    if let Some(b_fo) = &b_fo {
        compare_with_fuse_overlayfs(&t_rf, &walk(&b_fo.rootfs), size);
    }
}

/// Compares the rustfuse image `t_rf` with the fuse-overlayfs one `t_fo` entry by entry, but
/// for what fuse-overlayfs 1.10 is known to get wrong (reported, not compared).
fn compare_with_fuse_overlayfs(
    t_rf: &BTreeMap<String, Entry>,
    t_fo: &BTreeMap<String, Entry>,
    size: Size,
) {
    eprintln!("image entries: fuse-overlayfs {}", t_fo.len());
    let changed = changed_names();

    // fuse-overlayfs 1.10 may bring old entries back after `rm -rf /replace && mkdir /replace`:
    // report that, and compare everything else exactly.
    let fo_errs = check_expected(t_fo, size);
    if !fo_errs.is_empty() {
        eprintln!(
            "NOTE: the fuse-overlayfs-built image diverges from the correct result:\n{}",
            fo_errs.join("\n")
        );
    }
    let fo_replace_wrong = children(t_fo, "/replace") != ["new"];
    // The link groups changed through one name are compared above: fuse-overlayfs splits them.
    let skip_path =
        |p: &str| (fo_replace_wrong && p.starts_with("/replace/")) || changed.contains(p);
    let mut diffs = Vec::new();
    for (p, e) in t_rf {
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

/// Environment of [`buildah_bud_quick_same_layers_as_reference`]: where to keep the image it
/// built (an OCI layout `DIR/layout`, its listing `DIR/layers.txt`) and its base image
/// (`DIR/base.tar`).
const KEEP_ENV: &str = "RUSTFUSE_TEST_BUILDAH_KEEP";
/// Environment of [`buildah_bud_quick_same_layers_as_reference`]: a directory that the same
/// test filled through [`KEEP_ENV`] elsewhere (on the host, for tests/kernel.sh), whose image
/// this build must match layer by layer, built on the same base image (`DIR/base.tar`).
const REFERENCE_ENV: &str = "RUSTFUSE_TEST_BUILDAH_REFERENCE";

/// The entry `path` of layer `layer`, if there.
fn entry<'a>(layer: &'a oci::Layer, path: &str) -> Option<&'a oci::TarEntry> {
    layer.entries.iter().find(|e| e.path == path)
}

/// That `path` is deleted by `layer`: a `.wh.NAME` whiteout beside it or an opaque marker
/// (`.wh..wh..opq`) in a directory above it, and no entry of its own.
fn deleted(layer: &oci::Layer, path: &str) -> bool {
    let (dir, name) = path.rsplit_once('/').unwrap();
    let whiteout = entry(layer, &format!("{dir}/.wh.{name}")).is_some();
    let mut opaque = false;
    let mut d = dir;
    while !d.is_empty() {
        opaque |= entry(layer, &format!("{d}/.wh..wh..opq")).is_some();
        d = d.rsplit_once('/').map_or("", |(p, _)| p);
    }
    (whiteout || opaque) && entry(layer, path).is_none()
}

/// That `layer` holds the names as one regular file with `mode`, `uid` and `content`, and hard
/// links to it.
fn one_file(layer: &oci::Layer, names: &[&str], mode: u32, uid: u64, content: &str) -> bool {
    let es: Vec<&oci::TarEntry> = names.iter().filter_map(|n| entry(layer, n)).collect();
    let files: Vec<&&oci::TarEntry> = es.iter().filter(|e| e.kind == '0').collect();
    es.len() == names.len()
        && files.len() == 1
        && files[0].mode == mode
        && files[0].uid == uid
        && files[0].content == content.as_bytes()
        && es
            .iter()
            .all(|e| e.kind == '0' || (e.kind == '1' && e.link == files[0].path))
}

/// What the layers of [`buildah::QUICK_DOCKERFILE`] must hold, whatever the kernel: the two
/// base layers, then one per step.
fn check_quick_layers(img: &oci::Image) -> Vec<String> {
    let mut errs = Vec::new();
    if img.layers.len() != 6 {
        return vec![format!(
            "{} layers, want 6 (2 of the base image, 4 steps)",
            img.layers.len()
        )];
    }
    let mut check = |ok: bool, what: &str| {
        if !ok {
            errs.push(what.to_string());
        }
    };
    let (run1, run2, copy, run3) = (
        &img.layers[2],
        &img.layers[3],
        &img.layers[4],
        &img.layers[5],
    );
    // RUN 1: copy-ups, whiteouts over the base, new files, link groups.
    for p in [
        "/lower/del",
        "/lower/deldir",
        "/lower/ren",
        "/replace/a/b/o7",
    ] {
        check(deleted(run1, p), &format!("RUN 1: {p} deleted"));
    }
    check(
        entry(run1, "/lower/mod").is_some_and(|e| e.content == b"mod\nchanged\n"),
        "RUN 1: /lower/mod appended",
    );
    check(
        entry(run1, "/lower/renamed").is_some_and(|e| e.content == b"ren\n"),
        "RUN 1: /lower/renamed",
    );
    check(
        entry(run1, "/lower/link").is_some_and(|e| e.kind == '2' && e.link == "../many/f1"),
        "RUN 1: /lower/link symlink",
    );
    check(
        entry(run1, "/lower/hard").is_some_and(|e| e.kind == '0' || e.kind == '1'),
        "RUN 1: /lower/hard",
    );
    check(
        (1..=40).all(|i| entry(run1, &format!("/many/f{i}")).is_some()),
        "RUN 1: /many/f1..f40",
    );
    check(
        one_file(run1, &["/gen/a", "/gen/b"], 0o644, 0, "a\n"),
        "RUN 1: /gen/a, /gen/b one file",
    );
    check(
        one_file(run1, &["/gen/t1", "/gen/t2", "/gen2/t3"], 0o644, 0, "t\n"),
        "RUN 1: /gen/t1, /gen/t2, /gen2/t3 one file",
    );
    // RUN 2: rm -rf && mkdir, chmods and chowns (copy-ups of metadata), renames of a file and
    // a directory of RUN 1's layer, link groups changed through one name.
    check(
        entry(run2, "/replace/new").is_some_and(|e| e.content == b"new\n"),
        "RUN 2: /replace/new",
    );
    for i in [1, 25, 50] {
        let p = format!("/replace/old{i}");
        check(deleted(run2, &p), &format!("RUN 2: {p} deleted"));
    }
    check(deleted(run2, "/replace/a"), "RUN 2: /replace/a deleted");
    for i in 10..=19 {
        let p = format!("/many/f{i}");
        check(deleted(run2, &p), &format!("RUN 2: {p} deleted"));
    }
    check(deleted(run2, "/many/d"), "RUN 2: /many/d renamed away");
    check(deleted(run2, "/many/f3"), "RUN 2: /many/f3 renamed away");
    check(
        entry(run2, "/many/dd/f3").is_some_and(|e| e.content == b"file 3\n")
            && entry(run2, "/many/dd/e/x").is_some_and(|e| e.content == b"deep\n"),
        "RUN 2: /many/dd/f3, /many/dd/e/x",
    );
    for (p, mode) in [
        ("/lower/keep", 0o600),
        ("/chm", 0o700),
        ("/chm/file", 0o4755),
        ("/many", 0o751),
    ] {
        check(
            entry(run2, p).is_some_and(|e| e.mode == mode),
            &format!("RUN 2: {p} mode {mode:o}"),
        );
    }
    check(
        entry(run2, "/lower/mod").is_some_and(|e| (e.uid, e.gid) == (1000, 1000)),
        "RUN 2: /lower/mod owner 1000",
    );
    check(
        one_file(run2, &["/gen/t1", "/gen/t2", "/gen2/t3"], 0o640, 0, "t\n"),
        "RUN 2: /gen/t1, /gen/t2, /gen2/t3 one file, mode 640",
    );
    check(
        one_file(run2, &["/gen/o1", "/gen2/o2"], 0o644, 1000, "o\n"),
        "RUN 2: /gen/o1, /gen2/o2 one file, owner 1000",
    );
    check(
        one_file(run2, &["/gen/u1", "/gen2/u2"], 0o600, 0, "u\n"),
        "RUN 2: /gen/u1, /gen2/u2 one file, mode 600",
    );
    check(
        entry(run2, "/gen/a").is_none() && entry(run2, "/gen/b").is_none(),
        "RUN 2: /gen/a, /gen/b unchanged, not in the layer",
    );
    // COPY, then RUN 3 over it.
    check(
        (1..=20).all(|i| entry(copy, &format!("/ctx/d{}/c{i}", i % 20)).is_some()),
        "COPY: /ctx/dN/cI",
    );
    check(deleted(run3, "/ctx/d3"), "RUN 3: /ctx/d3 deleted");
    check(
        entry(run3, "/ctx/d4/c4").is_some_and(|e| e.mode == 0o640),
        "RUN 3: /ctx/d4/c4 mode 640",
    );
    check(
        one_file(run3, &["/ctx/d5/h1", "/ctx/d5/h2"], 0o644, 0, "h\n"),
        "RUN 3: /ctx/d5/h1, /ctx/d5/h2 one file",
    );
    check(
        entry(run3, "/ctx/d5/hard").is_some_and(|e| e.content == b"ctx 5\n"),
        "RUN 3: /ctx/d5/hard",
    );
    errs
}

/// The build tests/kernel.sh runs on the booted old kernel and, before it boots, on the host:
/// rootless `buildah bud` of [`buildah::QUICK_DOCKERFILE`] with rustfuse as mount_program, its
/// layers checked against what the steps must produce ([`check_quick_layers`]; the last RUN
/// step checks the merged view through the committed layers). With `$RUSTFUSE_TEST_BUILDAH_KEEP`
/// the image is kept there; with `$RUSTFUSE_TEST_BUILDAH_REFERENCE` it must be the same as the
/// one kept there, layer by layer (diff IDs, and every entry's type, mode, owner, size, mtime,
/// link target, xattrs and content): `--timestamp 0` makes the build reproducible.
/// Not in `cargo test` (`--ignored` runs it): on the host, buildah_bud_with_rustfuse_matches_
/// fuse_overlayfs makes the same kinds of changes at full size.
#[test]
#[ignore = "tests/kernel.sh runs it, on the host and in the guest"]
fn buildah_bud_quick_same_layers_as_reference() {
    if !require_bin_under_test() {
        return;
    }
    if let Some(reason) = buildah::unavailable() {
        skip(&reason);
        return;
    }
    let reference = std::env::var_os(REFERENCE_ENV).map(PathBuf::from);
    let keep = std::env::var_os(KEEP_ENV).map(PathBuf::from);
    // Read before building: a missing reference fails at once.
    let ref_img = reference.as_ref().map(|r| {
        oci::read_layout(&r.join("layout"))
            .unwrap_or_else(|e| panic!("{REFERENCE_ENV}={}: {e}", r.display()))
    });
    let uid = buildah::ensure_user().unwrap_or_else(|e| panic!("{e}"));
    let s = scratch("rootless-build-quick");
    let d = s.path();
    let _leftovers = LeftoverKiller {
        uid,
        dir: d.to_path_buf(),
    };
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let rustfuse = buildah::program_copy(d, "rustfuse", &bin_under_test()).unwrap();
    // The reference's base image, byte for byte (umoci stamps the files it packs with the time),
    // so that every layer and diff ID can be compared.
    match &reference {
        Some(r) => {
            std::fs::copy(r.join("base.tar"), d.join("base.tar"))
                .unwrap_or_else(|e| panic!("{}/base.tar: {e}", r.display()));
        }
        None => {
            buildah::build_base_image(d).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    buildah::build_context_of(d, buildah::QUICK_SIZE).unwrap();
    let mp = shim(d, "rustfuse", &rustfuse);
    buildah::chown_r(d, uid).unwrap();
    let t0 = std::time::Instant::now();
    let b = buildah::build_quick(d, "rustfuse", &mp, Duration::from_secs(150))
        .unwrap_or_else(|e| panic!("{e}"));
    let calls = std::fs::read_to_string(d.join("calls-rustfuse")).unwrap_or_default();
    let mounts = calls.lines().filter(|l| l.contains("lowerdir=")).count();
    assert!(
        mounts > 0,
        "rustfuse was never called to mount; calls:\n{calls}"
    );
    eprintln!(
        "BUILD TIME (buildah bud, rootless, 4 steps): {} ms; with the import and export {} ms; {mounts} mount calls",
        b.ms,
        t0.elapsed().as_millis()
    );
    let layout = d.join("out-rustfuse");
    let img = oci::read_layout(&layout).unwrap_or_else(|e| panic!("{e}"));
    let listing = img.listing();
    if let Some(k) = &keep {
        let _ = std::fs::remove_dir_all(k);
        std::fs::create_dir_all(k).unwrap();
        buildah::sh(
            r#"cp -a "$1" "$2/layout" && cp "$3" "$2/base.tar""#,
            &[
                layout.to_str().unwrap(),
                k.to_str().unwrap(),
                d.join("base.tar").to_str().unwrap(),
            ],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(k.join("layers.txt"), &listing).unwrap();
        eprintln!("kept the image in {} (listing: layers.txt)", k.display());
    }
    let errs = check_quick_layers(&img);
    assert!(
        errs.is_empty(),
        "the layers of the rustfuse build are not what the steps must produce:\n  {}\nlayers:\n{listing}",
        errs.join("\n  ")
    );
    match (&ref_img, &reference) {
        (Some(r), Some(dir)) => {
            let diffs = oci::compare(r, "reference", &img, "this build");
            if !diffs.is_empty() {
                let mine = dir.join("layers-compared.txt");
                let _ = std::fs::write(&mine, &listing);
                panic!(
                    "this build's image differs from the reference in {} ({} vs {}):\n{}",
                    dir.display(),
                    dir.join("layers.txt").display(),
                    mine.display(),
                    diffs.join("\n")
                );
            }
            eprintln!(
                "the same image as the reference in {}: {} layers, diff IDs {:?}",
                dir.display(),
                img.layers.len(),
                img.diff_ids
            );
        }
        _ => eprintln!(
            "NOTE: no {REFERENCE_ENV}: the image is checked against what the steps must produce only"
        ),
    }
}
