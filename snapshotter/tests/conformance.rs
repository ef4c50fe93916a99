//! Conformance suite: the 21 cases of containerd's snapshotter testsuite (plus the error
//! codes and rules of the API notes), driven over gRPC against the real
//! `rustfuse-snapshotter` binary, mounting what Mounts returns and comparing merged trees.
//!
//! Every case runs twice: `overlay_*` (kernel overlayfs, `--mode overlay`) and `fuse_*`
//! (`--mode fuse`; the `fuse3.rustfuse` mounts are made by exec'ing `$RUSTFUSE_BIN`, else
//! `target/debug/rustfuse`, as `BIN -o OPTIONS MOUNTPOINT`). Cases need root (and /dev/fuse
//! for FUSE); when they cannot run they print `SKIPPED: <reason>`, or fail under `CI=true`.
//! The server, client and mount helpers are in `common/`, shared with the other suites.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use rustfuse_snapshotter::api::Mount;
use rustfuse_snapshotter::api::snapshots as pb;
use tonic::Code;

// ---------------------------------------------------------------------------------------
// Trees: apply operations, snapshot a tree, compare

#[derive(Clone, Debug)]
enum Op {
    File(&'static str, Vec<u8>, u32),
    Dir(&'static str, u32),
    RemoveAll(&'static str),
    Chown(&'static str, u32, u32),
    Link(&'static str, &'static str),
    Rename(&'static str, &'static str),
    Symlink(&'static str, &'static str),
}

fn file(p: &'static str, content: &str, mode: u32) -> Op {
    Op::File(p, content.as_bytes().to_vec(), mode)
}

fn rel(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn apply(root: &Path, ops: &[Op]) {
    for op in ops {
        let r = match op {
            Op::File(p, c, m) => std::fs::write(rel(root, p), c).and_then(|()| {
                std::fs::set_permissions(rel(root, p), std::fs::Permissions::from_mode(*m))
            }),
            Op::Dir(p, m) => std::fs::create_dir(rel(root, p)).and_then(|()| {
                std::fs::set_permissions(rel(root, p), std::fs::Permissions::from_mode(*m))
            }),
            Op::RemoveAll(p) => match std::fs::symlink_metadata(rel(root, p)) {
                Ok(md) if md.is_dir() => std::fs::remove_dir_all(rel(root, p)),
                Ok(_) => std::fs::remove_file(rel(root, p)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            },
            Op::Chown(p, u, g) => std::os::unix::fs::lchown(rel(root, p), Some(*u), Some(*g)),
            Op::Link(a, b) => std::fs::hard_link(rel(root, a), rel(root, b)),
            Op::Rename(a, b) => std::fs::rename(rel(root, a), rel(root, b)),
            Op::Symlink(target, p) => std::os::unix::fs::symlink(target, rel(root, p)),
        };
        r.unwrap_or_else(|e| panic!("apply {op:?} in {}: {e}", root.display()));
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    content: Vec<u8>,
    /// Other paths in the tree that are the same inode.
    links: Vec<PathBuf>,
}

/// Everything under `root` except the root itself.
fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let name = p.strip_prefix(root).unwrap().to_path_buf();
            let ft = md.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", Vec::new())
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                ("symlink", t.into_os_string().into_encoded_bytes())
            } else if ft.is_file() {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(name.clone());
                ("file", std::fs::read(&p).unwrap())
            } else {
                ("special", md.rdev().to_le_bytes().to_vec())
            };
            out.insert(
                name,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    content,
                    links: Vec::new(),
                },
            );
        }
    }
    for paths in inodes.values().filter(|v| v.len() > 1) {
        for p in paths {
            let mut others: Vec<PathBuf> = paths.iter().filter(|q| *q != p).cloned().collect();
            others.sort();
            out.get_mut(p).unwrap().links = others;
        }
    }
    out
}

/// The same entries, contents, modes, owners, and which paths share an inode.
fn assert_same_tree(got: &Path, want: &Path, what: &str) {
    let (g, w) = (tree(got), tree(want));
    if g != w {
        let mut diff = String::new();
        for (k, v) in &w {
            match g.get(k) {
                None => diff += &format!("  missing {}\n", k.display()),
                Some(gv) if gv != v => {
                    diff += &format!("  differs {}: got {gv:?}, want {v:?}\n", k.display())
                }
                _ => {}
            }
        }
        for k in g.keys().filter(|k| !w.contains_key(*k)) {
            diff += &format!("  unexpected {}\n", k.display());
        }
        panic!("{what}: trees differ:\n{diff}");
    }
}

struct Ctx {
    server: Server,
    c: Client,
    n: std::cell::Cell<u32>,
}

impl Ctx {
    fn new(mode: Mode) -> Ctx {
        let server = Server::start(mode);
        let c = server.client();
        Ctx {
            server,
            c,
            n: std::cell::Cell::new(0),
        }
    }

    /// A fresh scratch directory.
    fn dir(&self, prefix: &str) -> PathBuf {
        self.n.set(self.n.get() + 1);
        let p = self
            .server
            .work()
            .join(format!("{prefix}-{}", self.n.get()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn mount(&self, mounts: &[Mount], prefix: &str) -> (PathBuf, MountGuard) {
        let d = self.dir(prefix);
        let g = mount_all(mounts, &d);
        (d, g)
    }

    /// containerd's checkSnapshots: each layer prepared on the previous, compared with a
    /// flat directory before and after applying; the final view compared too.
    fn check_layers(&self, layers: &[Vec<Op>]) {
        let same = assert_same_tree;
        let flat = self.dir("flat");
        let mut parent = String::new();
        let mut names = Vec::new();
        for (i, ops) in layers.iter().enumerate() {
            let key = format!("{}/prepare layer {i}", flat.display());
            let mounts = self.c.prepare(&key, &parent).unwrap();
            let (mp, guard) = self.mount(&mounts, "layer");
            same(&mp, &flat, &format!("layer {i} before apply"));
            apply(&flat, ops);
            apply(&mp, ops);
            same(&mp, &flat, &format!("layer {i} after apply"));
            guard.unmount();
            let name = format!("{}/committed layer {i}", flat.display());
            self.c.commit(&name, &key).unwrap();
            parent = name.clone();
            names.push(name);
        }
        let vkey = format!("{}/view", flat.display());
        let mounts = self.c.view(&vkey, &parent).unwrap();
        let (mp, guard) = self.mount(&mounts, "view");
        same(&mp, &flat, "final view");
        guard.unmount();
        self.c.remove(&vkey).unwrap();
        for n in names.iter().rev() {
            self.c.remove(n).unwrap();
        }
    }
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        mod overlay {
            $(
                #[test]
                fn $name() {
                    super::run(super::Mode::Overlay, super::$name);
                }
            )*
        }
        mod fuse {
            $(
                #[test]
                fn $name() {
                    super::run(super::Mode::Fuse, super::$name);
                }
            )*
        }
    };
}

fn run(mode: Mode, case: fn(&Ctx)) {
    if let Some(reason) = unavailable(mode) {
        skip(&reason);
        return;
    }
    let ctx = Ctx::new(mode);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&ctx)));
    if let Err(p) = r {
        eprintln!("--- server log ---\n{}", ctx.server.log_text());
        std::panic::resume_unwind(p);
    }
}

cases!(
    c01_basic,
    c02_stat_active,
    c03_stat_committed,
    c04_transitivity,
    c05_prepare_view_used_key,
    c06_update,
    c07_remove_and_reuse,
    c08_walk_filters,
    c09_layer_file_update,
    c10_remove_directory_in_lower_layer,
    c11_chown,
    c12_directory_owner_on_commit,
    c13_remove_intermediate,
    c14_deleted_files_in_child,
    c15_move_file_from_lower_layer,
    c16_view_readonly,
    c17_stat_in_walk,
    c18_close_twice_and_restart,
    c19_root_permission,
    c20_rename,
    c21_128_layers,
    e01_error_codes_name_the_key,
    e02_bad_requests_change_nothing_on_disk,
    e03_labels_limit,
    e04_remote_snapshot_ref,
    e05_usage,
    e06_cleanup,
    e07_list_batches,
    e08_socket_and_layout,
    e09_hard_links_across_layers,
    e10_update_reads_no_kind,
    b01_buildkit_readonly_mounts_of_an_active_snapshot,
    b02_buildkit_walking_differ_mounts,
    r01_rename_directory_with_lower_content,
);

// ---------------------------------------------------------------------------------------
// The cases

fn c01_basic(x: &Ctx) {
    let c = &x.c;
    let initial = vec![
        file("/foo", "foo\n", 0o777),
        Op::Dir("/a", 0o755),
        Op::Dir("/a/b", 0o755),
        Op::Dir("/a/b/c", 0o755),
    ];
    let diff = vec![
        file("/bar", "bar\n", 0o777),
        file("/foo", "bar\n", 0o777),
        Op::RemoveAll("/a/b"),
    ];
    let w = x.server.work();
    let preparing = format!("{}/preparing", w.display());
    let mounts = c.prepare(&preparing, "").unwrap();
    assert!(!mounts.is_empty());
    let (mp, g) = x.mount(&mounts, "preparing");
    apply(&mp, &initial);
    g.unmount();
    let committed = format!("{}/committed", w.display());
    c.commit(&committed, &preparing).unwrap();
    let si = c.stat(&committed).unwrap();
    assert_eq!(si.parent, "");
    assert_eq!(si.kind, pb::Kind::Committed as i32);
    assert_code(c.stat(&preparing), Code::NotFound, &preparing);

    let next = format!("{}/nextlayer", w.display());
    let mounts = c.prepare(&next, &committed).unwrap();
    let (mp, g) = x.mount(&mounts, "next");
    let expect = x.dir("expect-initial");
    apply(&expect, &initial);
    assert_same_tree(&mp, &expect, "next layer shows the committed content");
    apply(&mp, &diff);
    g.unmount();
    let ni = c.stat(&next).unwrap();
    assert_eq!(ni.parent, committed);
    assert_eq!(ni.kind, pb::Kind::Active as i32);

    let next_committed = format!("{}/committed-next", w.display());
    c.commit(&next_committed, &next).unwrap();
    let si2 = c.stat(&next_committed).unwrap();
    assert_eq!(si2.parent, committed);
    assert_eq!(si2.kind, pb::Kind::Committed as i32);
    assert_code(c.stat(&next), Code::NotFound, &next);

    // Walk equals Stat exactly.
    let walked: HashMap<String, pb::Info> = c
        .list(&[])
        .unwrap()
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    assert_eq!(walked.get(&committed), Some(&si));
    assert_eq!(walked.get(&next_committed), Some(&si2));

    let nextnext = format!("{}/nextnextlayer", w.display());
    let mounts = c.view(&nextnext, &next_committed).unwrap();
    let (mp, g) = x.mount(&mounts, "nextnext");
    let expect = x.dir("expect-both");
    apply(&expect, &initial);
    apply(&expect, &diff);
    assert_same_tree(&mp, &expect, "view shows merged content");
    g.unmount();
    c.remove(&nextnext).unwrap();
    assert_code(c.remove(&committed), Code::FailedPrecondition, &committed);
    c.remove(&next_committed).unwrap();
    c.remove(&committed).unwrap();
}

fn c02_stat_active(x: &Ctx) {
    let c = &x.c;
    let mounts = c.prepare("preparing", "").unwrap();
    let (mp, _g) = x.mount(&mounts, "p");
    std::fs::write(mp.join("foo"), "foo\n").unwrap();
    let si = c.stat("preparing").unwrap();
    assert_eq!(si.name, "preparing");
    assert_eq!(si.kind, pb::Kind::Active as i32);
    assert_eq!(si.parent, "");
}

fn c03_stat_committed(x: &Ctx) {
    let c = &x.c;
    let mounts = c.prepare("preparing", "").unwrap();
    let (mp, _g) = x.mount(&mounts, "p");
    std::fs::write(mp.join("foo"), "foo\n").unwrap();
    // Committed while still mounted, as containerd's suite does.
    c.commit("committed", "preparing").unwrap();
    let si = c.stat("committed").unwrap();
    assert_eq!(si.name, "committed");
    assert_eq!(si.kind, pb::Kind::Committed as i32);
    assert_eq!(si.parent, "");
}

fn c04_transitivity(x: &Ctx) {
    let c = &x.c;
    let (mp, g1) = x.mount(&c.prepare("preparing", "").unwrap(), "p");
    std::fs::write(mp.join("foo"), "foo\n").unwrap();
    c.commit("snapA", "preparing").unwrap();
    let (mp, g2) = x.mount(&c.prepare("next", "snapA").unwrap(), "n");
    std::fs::write(mp.join("foo"), "foo bar\n").unwrap();
    c.commit("snapB", "next").unwrap();
    let a = c.stat("snapA").unwrap();
    let b = c.stat("snapB").unwrap();
    let pb_ = c.stat(&b.parent).unwrap();
    assert_eq!(a.parent, "");
    assert_eq!(b.parent, "snapA");
    assert_eq!(pb_.parent, "");
    drop((g1, g2));
}

fn c05_prepare_view_used_key(x: &Ctx) {
    let c = &x.c;
    c.prepare("preparing", "").unwrap();
    c.commit("snapA", "preparing").unwrap();
    c.prepare("newLayer", "snapA").unwrap();
    assert_code(c.view("newLayer", "snapA"), Code::AlreadyExists, "newLayer");
    c.prepare("prepLayer", "snapA").unwrap();
    assert_code(
        c.prepare("prepLayer", "snapA"),
        Code::AlreadyExists,
        "prepLayer",
    );
    c.view("viewLayer", "snapA").unwrap();
    assert_code(
        c.view("viewLayer", "snapA"),
        Code::AlreadyExists,
        "viewLayer",
    );
    assert_code(
        c.prepare("viewLayer", "snapA"),
        Code::AlreadyExists,
        "viewLayer",
    );
    // Names and keys share one namespace.
    assert_code(c.prepare("snapA", ""), Code::AlreadyExists, "snapA");
}

fn base_snapshots(c: &Client) {
    c.prepare("c1-a", "").unwrap();
    c.commit("c1", "c1-a").unwrap();
    c.prepare("c2-a", "c1").unwrap();
    c.commit("c2", "c2-a").unwrap();
    c.prepare("a1", "c2").unwrap();
    c.prepare("a2", "").unwrap();
    c.view("v1", "c2").unwrap();
    c.view("v2", "").unwrap();
}

fn ts(t: &Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(t.expect("timestamp set")).unwrap()
}

fn c06_update(x: &Ctx) {
    let c = &x.c;
    let t1 = SystemTime::now();
    base_snapshots(c);
    let t2 = SystemTime::now();
    let cases = [
        ("c1", pb::Kind::Committed, ""),
        ("c2", pb::Kind::Committed, "c1"),
        ("a1", pb::Kind::Active, "c2"),
        ("a2", pb::Kind::Active, ""),
        ("v1", pb::Kind::View, "c2"),
        ("v2", pb::Kind::View, ""),
    ];
    for (name, kind, parent) in cases {
        let mut st = c.stat(name).unwrap();
        let created = ts(&st.created_at);
        assert!(
            created >= t1 && created <= t2,
            "{name}: created {created:?}"
        );
        assert_eq!(st.created_at, st.updated_at, "{name}");
        assert_eq!(st.kind, kind as i32);
        assert_eq!(st.parent, parent);
        assert_eq!(st.name, name);

        let root_time = format!("{:?}", SystemTime::now());
        let expected = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            (GC_ROOT, &root_time),
        ]);
        st.parent = "doesnotexist".into();
        st.labels = expected.clone();
        let u1 = SystemTime::now();
        let st2 = c.update(&st, &[]).unwrap();
        let u2 = SystemTime::now();
        assert_eq!(
            st2.created_at.unwrap(),
            st.created_at.unwrap(),
            "{name}: created kept"
        );
        let updated = ts(&st2.updated_at);
        assert!(
            updated >= u1 && updated <= u2,
            "{name}: updated {updated:?}"
        );
        assert_eq!(st2.kind, kind as i32);
        assert_eq!(st2.parent, parent, "{name}: parent is immutable");
        assert_eq!(st2.labels, expected);

        let mut st3 = st2.clone();
        st3.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let st3 = c.update(&st3, &["labels.l1", "labels.l2"]).unwrap();
        assert_eq!(
            st3.labels,
            labels(&[("l1", "updated"), ("l3", "v3"), (GC_ROOT, &root_time)])
        );

        let mut st4 = st3.clone();
        st4.labels = labels(&[("l4", "v4"), (GC_ROOT, &root_time)]);
        let st4 = c.update(&st4, &["labels"]).unwrap();
        assert_eq!(st4.labels, labels(&[("l4", "v4"), (GC_ROOT, &root_time)]));

        let mut st5 = st4.clone();
        st5.parent = "doesnotexist".into();
        assert_code(c.update(&st5, &["parent"]), Code::InvalidArgument, name);
        // Stat agrees with what Update returned.
        assert_eq!(c.stat(name).unwrap(), st4);
    }
    let mut missing = c.stat("c1").unwrap();
    missing.name = "nope".into();
    assert_code(c.update(&missing, &[]), Code::NotFound, "nope");
}

fn c07_remove_and_reuse(x: &Ctx) {
    let c = &x.c;
    c.prepare("committed-a", "").unwrap();
    c.commit("committed-1", "committed-a").unwrap();
    c.prepare("reuse-1", "committed-1").unwrap();
    c.remove("reuse-1").unwrap();
    c.view("reuse-1", "committed-1").unwrap();
    c.remove("reuse-1").unwrap();
    c.prepare("reuse-1", "").unwrap();
    c.remove("committed-1").unwrap();
    c.commit("committed-1", "reuse-1").unwrap();
    assert_code(c.remove("reuse-1"), Code::NotFound, "reuse-1");
    assert_eq!(
        c.stat("committed-1").unwrap().kind,
        pb::Kind::Committed as i32
    );
}

fn c08_walk_filters(x: &Ctx) {
    let c = &x.c;
    let gc = || labels(&[(GC_ROOT, "check-walk")]);
    let l = |v: &str| labels(&[("l", v), (GC_ROOT, "check-walk")]);
    c.prepare_l("a-np", "", gc()).unwrap();
    c.prepare_l("p-tmp", "", gc()).unwrap();
    c.commit_l("p", "p-tmp", gc()).unwrap();
    c.prepare_l("a", "p", gc()).unwrap();
    c.view_l("v", "p", gc()).unwrap();
    c.prepare_l("p-wl-tmp", "", gc()).unwrap();
    c.commit_l("p-wl", "p-wl-tmp", l("1")).unwrap();
    c.prepare_l("a-wl", "p-wl", l("2")).unwrap();
    c.view_l("v-wl", "p-wl", l("3")).unwrap();
    c.prepare_l("a-np-wl", "", l("2")).unwrap();

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["a-np", "a", "a-wl", "a-np-wl"],
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["v", "v-wl"],
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["p", "p-wl"],
            &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p", "a-np-wl"], &["name==p", "name==a-np-wl"]),
        (&["a-wl"], &["name==a-wl,labels.l"]),
        (&["a", "v"], &["parent==p"]),
        (
            &["a", "v", "a-wl", "v-wl"],
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p-wl", "a-wl", "v-wl", "a-np-wl"], &["labels.l"]),
        (&["a-wl", "a-np-wl"], &["labels.l==2"]),
        // Beyond containerd's suite: regex, !=, quoting forms, whitespace.
        (&["a-np-wl", "a-wl"], &["name~=^a-.*wl$"]),
        (&["a-np-wl", "a-wl", "p-wl"], &["name~=/-wl$/,kind!=view"]),
        (&["a-np", "a-np-wl"], &[r#"name~="^a-np""#]),
        (&["p-wl"], &[r#" labels."l" == "1" "#]),
        (
            &["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"],
            &[],
        ),
        (&["v", "v-wl"], &["kind==view", "kind==nothing"]),
    ];
    for (i, (want, filters)) in cases.iter().enumerate() {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(c.names(filters), want, "[{i}] filters {filters:?}");
    }
    for bad in ["name==", "labels.", "name~=(", r#"labels."x"#, "kind==a,,"] {
        assert_code(c.list(&[bad]), Code::InvalidArgument, "");
    }
}

/// Sleep to just past the next second boundary.
fn to_next_second() {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(Duration::from_nanos(
        1_000_000_000 - u64::from(now.subsec_nanos()),
    ));
}

fn c09_layer_file_update(x: &Ctx) {
    let l1 = vec![
        Op::Dir("/etc", 0o700),
        file("/etc/hosts", "mydomain 10.0.0.1", 0o644),
        file("/etc/profile", "PATH=/usr/bin", 0o644),
    ];
    let l2 = vec![
        file("/etc/hosts", "mydomain 10.0.0.2", 0o644),
        file("/etc/profile", "PATH=/usr/bin", 0o666),
        Op::Dir("/root", 0o700),
        file("/root/.bashrc", "PATH=/usr/sbin:/usr/bin", 0o644),
    ];
    for _ in 0..3 {
        x.check_layers(&[l1.clone(), l2.clone()]);
        to_next_second();
    }
}

fn c10_remove_directory_in_lower_layer(x: &Ctx) {
    x.check_layers(&[
        vec![Op::Dir("/lib", 0o700), file("/lib/hidden", "", 0o644)],
        vec![
            Op::RemoveAll("/lib"),
            Op::Dir("/lib", 0o700),
            file("/lib/not-hidden", "", 0o644),
        ],
        vec![file("/lib/newfile", "", 0o644)],
    ]);
}

fn c11_chown(x: &Ctx) {
    x.check_layers(&[
        vec![
            Op::Dir("/opt", 0o700),
            Op::Dir("/opt/a", 0o700),
            Op::Dir("/opt/a/b", 0o700),
            file("/opt/a/b/file.txt", "hello", 0o644),
            Op::Symlink("file.txt", "/opt/a/b/link"),
        ],
        vec![
            Op::Chown("/opt", 1, 1),
            Op::Chown("/opt/a", 1, 1),
            Op::Chown("/opt/a/b", 1, 1),
            Op::Chown("/opt/a/b/file.txt", 1, 1),
            Op::Chown("/opt/a/b/link", 2, 2),
        ],
    ]);
}

fn c12_directory_owner_on_commit(x: &Ctx) {
    x.check_layers(&[
        vec![
            Op::Dir("/dir1", 0o700),
            Op::Dir("/dir2", 0o700),
            Op::Dir("/dir3", 0o700),
            Op::Chown("/dir1", 1, 1),
            Op::Chown("/dir3", 1, 1),
        ],
        vec![
            Op::Dir("/dir4", 0o700),
            Op::Chown("/dir4", 1, 1),
            file("/dir1/f", "", 0o644),
            file("/dir3/f", "", 0o644),
        ],
        vec![file("/dir4/f", "", 0o644)],
    ]);
    // The root's owner passes from parent to child fs/.
    let c = &x.c;
    let (mp, g) = x.mount(&c.prepare("base", "").unwrap(), "base");
    std::os::unix::fs::chown(&mp, Some(1), Some(2)).unwrap();
    g.unmount();
    c.commit("base-c", "base").unwrap();
    for (i, key) in ["child", "child2"].iter().enumerate() {
        let parent = if i == 0 { "base-c" } else { "child-c" };
        let (mp, g) = x.mount(&c.prepare(key, parent).unwrap(), key);
        let md = std::fs::metadata(&mp).unwrap();
        assert_eq!((md.uid(), md.gid()), (1, 2), "{key}: root owner");
        g.unmount();
        c.commit(&format!("{key}-c"), key).unwrap();
    }
}

fn c13_remove_intermediate(x: &Ctx) {
    let c = &x.c;
    let (_mp, g) = x.mount(&c.prepare("base", "").unwrap(), "base");
    c.commit("committed-base", "base").unwrap();
    c.prepare("intermediate", "committed-base").unwrap();
    c.commit("committed-inter", "intermediate").unwrap();
    c.prepare("toplayer", "committed-inter").unwrap();
    assert_code(
        c.remove("committed-inter"),
        Code::FailedPrecondition,
        "committed-inter",
    );
    assert_code(
        c.remove("committed-base"),
        Code::FailedPrecondition,
        "committed-base",
    );
    c.remove("toplayer").unwrap();
    c.remove("committed-inter").unwrap();
    g.unmount();
    c.remove("committed-base").unwrap();
}

fn c14_deleted_files_in_child(x: &Ctx) {
    x.check_layers(&[
        vec![
            file("/foo", "foo\n", 0o777),
            file("/foobar", "foobar\n", 0o777),
        ],
        vec![Op::RemoveAll("/foobar")],
        vec![],
    ]);
}

fn c15_move_file_from_lower_layer(x: &Ctx) {
    x.check_layers(&[
        vec![
            Op::Dir("/dir1", 0o700),
            file("/dir1/f1", "Hello", 0o644),
            Op::Dir("/dir2", 0o700),
            file("/dir2/f2", "...", 0o644),
        ],
        vec![
            Op::Dir("/dir3", 0o700),
            file("/dir3/f1", "Hello", 0o644),
            Op::RemoveAll("/dir1"),
            Op::Link("/dir2/f2", "/dir3/f2"),
            Op::RemoveAll("/dir2/f2"),
        ],
    ]);
}

/// Beyond containerd's case 15: a hard link made in one layer is still one inode (two
/// names) when that layer is a lower of the next, as kernel overlayfs shows it.
fn e09_hard_links_across_layers(x: &Ctx) {
    x.check_layers(&[
        vec![file("/a", "shared", 0o644)],
        vec![Op::Link("/a", "/b")],
        vec![file("/c", "x", 0o600)],
    ]);
}

fn c16_view_readonly(x: &Ctx) {
    let c = &x.c;
    c.prepare("preparing", "").unwrap();
    c.commit("committed", "preparing").unwrap();
    c.prepare("p2", "committed").unwrap();
    c.commit("committed2", "p2").unwrap();
    for (view, parent) in [("view", "committed"), ("view2", "committed2")] {
        let mounts = c.view(view, parent).unwrap();
        let (mp, g) = x.mount(&mounts, view);
        let err = std::fs::write(mp.join("testfile"), "testcontent")
            .expect_err("writing to a view must fail");
        assert_eq!(
            err.raw_os_error(),
            Some(30),
            "{view}: EROFS expected, got {err}"
        );
        g.unmount();
        c.remove(view).unwrap();
    }
    // Also a view with no parent.
    let (mp, g) = x.mount(&c.view("v0", "").unwrap(), "v0");
    assert!(std::fs::write(mp.join("t"), "x").is_err());
    g.unmount();
}

fn c17_stat_in_walk(x: &Ctx) {
    let c = &x.c;
    for i in 0..5 {
        c.prepare(&format!("a-{i}"), "").unwrap();
    }
    // Stat from inside the List stream, on the same connection.
    let mut cc = c.c.clone();
    let mut cs = c.c.clone();
    let n = c.rt.block_on(async move {
        let mut stream = cc
            .list(pb::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(msg) = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("no deadlock")
            .unwrap()
        {
            for info in msg.info {
                let st = cs
                    .stat(pb::StatSnapshotRequest {
                        snapshotter: String::new(),
                        key: info.name.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .info
                    .unwrap();
                assert_eq!(st, info);
                n += 1;
            }
        }
        n
    });
    assert_eq!(n, 5);
}

fn c18_close_twice_and_restart(x: &Ctx) {
    // A server of its own, so it can be stopped and started.
    let mut s = Server::start(x.server.mode);
    let c = s.client();
    c.prepare("closeTwice-prepare", "").unwrap();
    c.commit("closeTwice", "closeTwice-prepare").unwrap();
    c.remove("closeTwice").unwrap();
    let g = mount_all(&c.prepare("keep-a", "").unwrap(), &s.work().join("keep"));
    std::fs::write(s.work().join("keep/f"), "kept").unwrap();
    g.unmount();
    c.commit("keep", "keep-a").unwrap();
    c.prepare_l("active", "keep", labels(&[("x", "y")]))
        .unwrap();
    let mut before = c.list(&[]).unwrap();
    before.sort_by(|a, b| a.name.cmp(&b.name));
    drop(c);
    // SIGTERM, then "close" again: the second is a no-op.
    s.stop();
    s.stop();
    assert!(!s.socket().exists(), "socket removed on shutdown");
    s.spawn();
    let c = s.client();
    let mut after = c.list(&[]).unwrap();
    after.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(after, before, "restart finds every snapshot intact");
    let g = mount_all(&c.view("check", "keep").unwrap(), &s.work().join("check"));
    assert_eq!(
        std::fs::read_to_string(s.work().join("check/f")).unwrap(),
        "kept"
    );
    g.unmount();
    c.prepare("after-restart", "keep").unwrap();
    s.stop();
}

fn c19_root_permission(x: &Ctx) {
    let c = &x.c;
    let (mp, _g) = x.mount(&c.prepare("preparing", "").unwrap(), "p");
    let mode = std::fs::metadata(&mp).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "root of a fresh Prepare");
}

fn c20_rename(x: &Ctx) {
    x.check_layers(&[
        vec![
            Op::Dir("/dir1", 0o700),
            Op::Dir("/somefiles", 0o700),
            file("/somefiles/f1", "was here first!", 0o644),
            file("/somefiles/f2", "nothing interesting", 0o644),
        ],
        vec![
            file("/somefiles/f1-overwrite", "new content 1", 0o644),
            Op::Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
            Op::Rename("/somefiles/f2", "/somefiles/f3"),
            Op::Rename("/somefiles/f3", "/dir1/f3"),
            Op::Dir("/newdir", 0o755),
            file("/newdir/x", "x", 0o644),
            Op::Rename("/newdir", "/dir1/newdir"),
        ],
        vec![
            file("/dir1/f3-new", "over", 0o600),
            Op::Rename("/dir1/f3-new", "/dir1/f3"),
        ],
    ]);
}

fn c21_128_layers(x: &Ctx) {
    let c = &x.c;
    let flat = x.dir("flat");
    let mut layers = vec![vec![
        file("/bottom", "way at the bottom\n", 0o777),
        file("/overwriteme", "FIRST!\n", 0o777),
        Op::Dir("/ADDHERE", 0o755),
        Op::Dir("/ONLYME", 0o755),
        file("/ONLYME/bottom", "bye!\n", 0o777),
    ]];
    for i in 1..=127 {
        let add: &'static str = Box::leak(format!("/ADDHERE/file-{i}").into_boxed_str());
        let only: &'static str = Box::leak(format!("/ONLYME/file-{i}").into_boxed_str());
        layers.push(vec![
            Op::File(
                "/overwriteme",
                format!("{i} WAS HERE!\n").into_bytes(),
                0o777,
            ),
            file(add, "same\n", 0o755),
            Op::RemoveAll("/ONLYME"),
            Op::Dir("/ONLYME", 0o755),
            file(only, "only me!\n", 0o777),
        ]);
    }
    let mut parent = String::new();
    for (i, ops) in layers.iter().enumerate() {
        let key = format!("prepare-layer-{i}");
        let mounts = c.prepare(&key, &parent).unwrap();
        let (mp, g) = x.mount(&mounts, "layer");
        assert_same_tree(&mp, &flat, &format!("[layer {i}] before apply"));
        apply(&flat, ops);
        apply(&mp, ops);
        assert_same_tree(&mp, &flat, &format!("[layer {i}] after apply"));
        g.unmount();
        parent = format!("committed-{i}");
        c.commit(&parent, &key).unwrap();
    }
    let mounts = c.view("fullview", &parent).unwrap();
    let lowers = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("overlay of 128 layers");
    assert_eq!(rustfuse::options::split_lowerdirs(lowers).len(), 128);
    let (mp, g) = x.mount(&mounts, "fullview");
    assert_same_tree(&mp, &flat, "fullview");
    g.unmount();
}

// ---- beyond the 21: the rules of the API notes ----------------------------------------

fn e01_error_codes_name_the_key(x: &Ctx) {
    let c = &x.c;
    let key = "ns/1/extract-123 sha256:abc";
    assert_code(c.stat(key), Code::NotFound, key);
    assert_code(c.mounts(key), Code::NotFound, key);
    assert_code(c.remove(key), Code::NotFound, key);
    assert_code(c.usage(key), Code::NotFound, key);
    assert_code(c.commit("n", key), Code::NotFound, key);
    assert_code(c.prepare("k", key), Code::NotFound, key);
    assert_code(c.view("k", key), Code::NotFound, key);
    c.prepare(key, "").unwrap();
    assert_code(c.prepare("child", key), Code::InvalidArgument, key);
    assert_code(c.view("child", key), Code::InvalidArgument, key);
    c.view("a view", "").unwrap();
    assert_code(c.commit("n", "a view"), Code::FailedPrecondition, "a view");
    c.commit("sha256:committed", key).unwrap();
    assert_code(
        c.mounts("sha256:committed"),
        Code::FailedPrecondition,
        "sha256:committed",
    );
    assert_code(
        c.commit("n", "sha256:committed"),
        Code::FailedPrecondition,
        "sha256:committed",
    );
    c.prepare("again", "").unwrap();
    assert_code(
        c.commit("sha256:committed", "again"),
        Code::AlreadyExists,
        "sha256:committed",
    );
    assert_code(c.commit("a view", "again"), Code::AlreadyExists, "a view");
    // The keys with spaces and slashes never became paths.
    let snaps = x.server.root().join("snapshots");
    for e in std::fs::read_dir(&snaps).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(
            n.parse::<u64>().is_ok(),
            "unexpected entry {n:?} in snapshots/"
        );
    }
}

fn e02_bad_requests_change_nothing_on_disk(x: &Ctx) {
    let c = &x.c;
    c.prepare("a", "").unwrap();
    c.commit("c", "a").unwrap();
    c.prepare("b", "c").unwrap();
    let snaps = x.server.root().join("snapshots");
    let before = listing(&snaps);
    let infos = c.list(&[]).unwrap();
    let big = "x".repeat(5000);
    assert_code(c.prepare("x", "missing"), Code::NotFound, "missing");
    assert_code(c.prepare("x", "b"), Code::InvalidArgument, "b");
    assert_code(c.prepare("b", "c"), Code::AlreadyExists, "b");
    assert_code(
        c.prepare_l("x", "", labels(&[("big", &big)])),
        Code::InvalidArgument,
        "x",
    );
    assert_code(c.list(&["kind=="]), Code::InvalidArgument, "");
    assert_code(c.remove("c"), Code::FailedPrecondition, "c");
    assert_code(
        c.commit_l("n", "b", labels(&[("big", &big)])),
        Code::InvalidArgument,
        "n",
    );
    assert_eq!(listing(&snaps), before);
    assert_eq!(c.list(&[]).unwrap(), infos);
}

fn e03_labels_limit(x: &Ctx) {
    let c = &x.c;
    let ok = "v".repeat(4096 - 3);
    c.prepare_l("a", "", labels(&[("key", &ok)])).unwrap();
    let over = "v".repeat(4096 - 2);
    assert_code(
        c.prepare_l("b", "", labels(&[("key", &over)])),
        Code::InvalidArgument,
        "key",
    );
    let mut info = c.stat("a").unwrap();
    info.labels = labels(&[("key", &over)]);
    assert_code(
        c.update(&info, &["labels.key"]),
        Code::InvalidArgument,
        "key",
    );
    assert_eq!(c.stat("a").unwrap().labels["key"], ok);
    // Empty values are dropped.
    info.labels = labels(&[("e", "")]);
    let updated = c.update(&info, &["labels.e"]).unwrap();
    assert!(!updated.labels.contains_key("e"));
}

fn e04_remote_snapshot_ref(x: &Ctx) {
    let c = &x.c;
    c.prepare("extract-1", "").unwrap();
    c.commit("sha256:chain", "extract-1").unwrap();
    let r = labels(&[("containerd.io/snapshot.ref", "sha256:chain")]);
    assert_code(
        c.prepare_l("extract-2", "", r),
        Code::AlreadyExists,
        "sha256:chain",
    );
    assert_code(c.stat("extract-2"), Code::NotFound, "extract-2");
    let r = labels(&[("containerd.io/snapshot.ref", "sha256:other")]);
    c.prepare_l("extract-3", "", r).unwrap();
}

fn e05_usage(x: &Ctx) {
    let c = &x.c;
    let (mp, g) = x.mount(&c.prepare("a", "").unwrap(), "a");
    let (s0, i0) = c.usage("a").unwrap();
    assert_eq!(i0, 1, "just the root");
    std::fs::write(mp.join("f"), vec![7u8; 64 * 1024]).unwrap();
    std::fs::hard_link(mp.join("f"), mp.join("g")).unwrap();
    let (s1, i1) = c.usage("a").unwrap();
    assert_eq!(i1, 2, "hard links count once");
    assert!(s1 - s0 >= 64 * 1024 && s1 - s0 < 2 * 64 * 1024, "{s0} {s1}");
    g.unmount();
    c.commit("c", "a").unwrap();
    assert_eq!(c.usage("c").unwrap(), (s1, i1), "stored at commit");
    c.view("v", "c").unwrap();
    assert_eq!(c.usage("v").unwrap().1, 0);
}

fn e06_cleanup(x: &Ctx) {
    let c = &x.c;
    c.prepare("a", "").unwrap();
    c.prepare("b", "").unwrap();
    let snaps = x.server.root().join("snapshots");
    std::fs::create_dir_all(snaps.join("new-crashed/fs")).unwrap();
    std::fs::create_dir_all(snaps.join("4242/fs")).unwrap();
    c.cleanup().unwrap();
    assert_eq!(listing(&snaps), ["1", "2"]);
    c.remove("b").unwrap();
    c.cleanup().unwrap();
    assert_eq!(listing(&snaps), ["1"]);
}

fn e07_list_batches(x: &Ctx) {
    let c = &x.c;
    for i in 0..250 {
        c.prepare(&format!("s{i:03}"), "").unwrap();
    }
    let (all, batches) = c.list_batches(&[]).unwrap();
    assert_eq!(all.len(), 250);
    assert!(batches >= 3, "{batches} batches");
    assert_eq!(c.names(&["name~=^s00"]).len(), 10);
}

fn e08_socket_and_layout(x: &Ctx) {
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let sock = x.server.socket();
    assert_eq!(
        std::fs::symlink_metadata(&sock)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let root = x.server.root();
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("snapshots")), 0o700);
    x.c.prepare("a", "").unwrap();
    assert_eq!(mode(&root.join("snapshots/1/fs")), 0o755);
    assert_eq!(mode(&root.join("snapshots/1/work")), 0o711);
    // Mount specs per mode.
    x.c.commit("c", "a").unwrap();
    let m = x.c.prepare("b", "c").unwrap();
    match x.server.mode {
        Mode::Overlay => assert_eq!(m[0].r#type, "overlay"),
        Mode::Fuse => assert_eq!(m[0].r#type, "fuse3.rustfuse"),
    }
    assert_eq!(m[0].source, "overlay");
    let uid = labels(&[(
        "containerd.io/snapshot/uidmapping",
        "0:1000:1,1:100000:65536",
    )]);
    let m = x.c.prepare_l("mapped", "c", uid).unwrap();
    if x.server.mode == Mode::Fuse {
        assert!(
            m[0].options
                .contains(&"uidmapping=0:1000:1:1:100000:65536".to_string())
        );
    }
}

// ---------------------------------------------------------------------------------------
// BuildKit's mount contract (docs/snapshotter.md "What BuildKit does with the mounts"),
// replayed without BuildKit; tests/tests/buildkit.rs runs the real one.

/// BuildKit's `readOnlyMounter` (cache/refs.go) applied to what a snapshotter returned: an
/// `overlay` mount loses `workdir=` and its `upperdir=` becomes the topmost lower layer; any
/// other type (`fuse3.rustfuse`, `bind`) keeps every option but `rw` and gets `ro` appended.
fn buildkit_readonly(mounts: &[Mount]) -> Vec<Mount> {
    mounts
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if m.r#type == "overlay" {
                let upper = m
                    .options
                    .iter()
                    .find_map(|o| o.strip_prefix("upperdir=").map(str::to_string));
                m.options
                    .retain(|o| !o.starts_with("upperdir=") && !o.starts_with("workdir="));
                if let Some(u) = upper {
                    for o in m.options.iter_mut() {
                        if let Some(l) = o.strip_prefix("lowerdir=") {
                            *o = format!("lowerdir={u}:{l}");
                        }
                    }
                }
            } else {
                m.options.retain(|o| o != "rw");
                m.options.push("ro".into());
            }
            m
        })
        .collect()
}

/// Every change to the upper layer a RUN step can make, on top of `buildkit_base_layers`.
fn buildkit_run_step() -> Vec<Op> {
    vec![
        file("/new", "new file", 0o644),
        file("/etc/conf", "changed", 0o600),
        Op::RemoveAll("/etc/gone"),
        Op::RemoveAll("/tree"),
        Op::RemoveAll("/repl"),
        Op::Dir("/repl", 0o750),
        file("/repl/fresh", "fresh", 0o644),
        Op::Rename("/mv-me", "/moved"),
        Op::Chown("/etc/owned", 1000, 1000),
        file("/links/a", "linked", 0o644),
        Op::Link("/links/a", "/links/b"),
        Op::Symlink("../new", "/links/s"),
    ]
}

/// The two committed layers below the RUN of the `b` cases.
fn buildkit_base_layers() -> [Vec<Op>; 2] {
    [
        vec![
            Op::Dir("/etc", 0o755),
            file("/etc/conf", "orig", 0o644),
            file("/etc/gone", "x", 0o644),
            file("/etc/owned", "o", 0o644),
            Op::Dir("/tree", 0o755),
            Op::Dir("/tree/sub", 0o755),
            file("/tree/sub/f", "f", 0o644),
            Op::Dir("/repl", 0o755),
            file("/repl/old", "old", 0o644),
        ],
        vec![file("/mv-me", "move me", 0o644), Op::Dir("/links", 0o755)],
    ]
}

/// The base layers committed, and an active snapshot on them: `(active key, its RUN
/// mounts, a flat directory with the same content)`.
fn buildkit_base(x: &Ctx, tag: &str) -> (String, Vec<Mount>, PathBuf) {
    let flat = x.dir("flat");
    let mut parent = String::new();
    for (i, ops) in buildkit_base_layers().iter().enumerate() {
        let key = format!("{tag} base {i} active");
        let mounts = x.c.prepare(&key, &parent).unwrap();
        let (mp, g) = x.mount(&mounts, "base");
        apply(&mp, ops);
        apply(&flat, ops);
        g.unmount();
        parent = format!("{tag} base {i}");
        x.c.commit(&parent, &key).unwrap();
    }
    let key = format!("{tag} run");
    let mounts = x.c.prepare(&key, &parent).unwrap();
    (key, mounts, flat)
}

fn assert_erofs(mp: &Path, what: &str) {
    let err = std::fs::write(mp.join("new-in-ro"), "x").expect_err("a write must fail");
    assert_eq!(
        err.raw_os_error(),
        Some(30),
        "{what}: EROFS expected, got {err}"
    );
    let err = std::fs::remove_file(mp.join("new")).expect_err("an unlink must fail");
    assert_eq!(
        err.raw_os_error(),
        Some(30),
        "{what}: EROFS expected, got {err}"
    );
}

/// Update reads only the name and labels of the Info it carries. containerd's own Update
/// sends the zero kind, which its proxy turns into COMMITTED whatever the snapshot is; other
/// clients leave it UNKNOWN; neither is an error, and the kind stays what it is.
fn e10_update_reads_no_kind(x: &Ctx) {
    let c = &x.c;
    c.prepare("a", "").unwrap();
    let st = c.stat("a").unwrap();
    for kind in [pb::Kind::Committed as i32, pb::Kind::Unknown as i32, 42] {
        let v = kind.to_string();
        let info = pb::Info {
            name: "a".into(),
            kind,
            labels: labels(&[("k", &v)]),
            ..Default::default()
        };
        let out = c.update(&info, &["labels.k"]).unwrap();
        assert_eq!(out.kind, pb::Kind::Active as i32, "kind {kind}");
        assert_eq!(out.labels["k"], v);
        assert_eq!(out.created_at, st.created_at);
        assert_eq!(c.stat("a").unwrap(), out);
    }
}

/// A RUN's read-write mount stays live while BuildKit mounts the same active snapshot
/// read-only, twice at once (checksums, cache keys), then unmounts one read-only mount while
/// the other and the read-write one are live, then the read-write one while a read-only one
/// is live; every read-only mount shows the full result of the RUN and refuses writes.
fn b01_buildkit_readonly_mounts_of_an_active_snapshot(x: &Ctx) {
    let (key, mounts, flat) = buildkit_base(x, "b01");
    let (rw, rw_guard) = x.mount(&mounts, "run");
    apply(&rw, &buildkit_run_step());
    apply(&flat, &buildkit_run_step());
    assert_same_tree(&rw, &flat, "read-write mount after the RUN");
    // BuildKit asks for the mounts again when it mounts for checksums.
    let again = x.c.mounts(&key).unwrap();
    assert_eq!(again, mounts, "Mounts() of an active snapshot changed");
    let (ro1, g1) = x.mount(&buildkit_readonly(&again), "ro1");
    let (ro2, g2) = x.mount(&buildkit_readonly(&again), "ro2");
    for (mp, what) in [
        (&ro1, "first read-only mount"),
        (&ro2, "second read-only mount"),
    ] {
        assert_same_tree(mp, &flat, what);
        assert_erofs(mp, what);
    }
    g1.unmount();
    assert_same_tree(&ro2, &flat, "read-only mount after the other one went");
    assert_same_tree(&rw, &flat, "read-write mount after a read-only one went");
    // The RUN goes on writing after a read-only mount came and went.
    apply(&rw, &[file("/later", "later", 0o644)]);
    apply(&flat, &[file("/later", "later", 0o644)]);
    rw_guard.unmount();
    g2.unmount();
    // A fresh read-only mount, and the committed result as BuildKit mounts it (read-only).
    let (ro3, g3) = x.mount(&buildkit_readonly(&x.c.mounts(&key).unwrap()), "ro3");
    assert_same_tree(&ro3, &flat, "read-only mount after the RUN ended");
    g3.unmount();
    x.c.commit("b01 done", &key).unwrap();
    let v = x.c.view("b01 view", "b01 done").unwrap();
    let (vm, gv) = x.mount(&buildkit_readonly(&v), "view");
    // The hard links are in a lower layer now: still one file.
    assert_same_tree(
        &vm,
        &flat,
        "read-only mount of a view of the committed result",
    );
    assert_erofs(&vm, "view");
    gv.unmount();
}

/// The walking differ (BuildKit's for every snapshotter but overlayfs/stargz on `overlay`
/// mounts, containerd's for `ctr snapshots diff`): the parent and the active snapshot are
/// mounted read-only at once, each through `readOnlyMounter`, while the RUN's read-write
/// mount may still be live; the two trees must differ by exactly the RUN's changes.
fn b02_buildkit_walking_differ_mounts(x: &Ctx) {
    let (key, mounts, flat) = buildkit_base(x, "b02");
    let before = x.dir("flat-before");
    for ops in buildkit_base_layers() {
        apply(&before, &ops);
    }
    let (rw, rw_guard) = x.mount(&mounts, "run");
    apply(&rw, &buildkit_run_step());
    apply(&flat, &buildkit_run_step());
    let parent = x.c.stat(&key).unwrap().parent;
    let lower = x.c.view("b02 lower", &parent).unwrap();
    let (lm, gl) = x.mount(&buildkit_readonly(&lower), "lower");
    let (um, gu) = x.mount(&buildkit_readonly(&mounts), "upper");
    assert_same_tree(&lm, &before, "the differ's lower mount");
    assert_same_tree(
        &um,
        &flat,
        "the differ's upper mount, read-write mount live",
    );
    rw_guard.unmount();
    assert_same_tree(
        &um,
        &flat,
        "the differ's upper mount, read-write mount gone",
    );
    gu.unmount();
    gl.unmount();
    x.c.remove("b02 lower").unwrap();
}

// ---------------------------------------------------------------------------------------
// Directory renames (issue 18): FUSE-mode mounts carry redirect_dir=on

/// Whether `dir` carries a directory redirect (`trusted.overlay.redirect`, or
/// `user.overlay.redirect` where trusted xattrs cannot be written, as rootless).
fn redirected(dir: &Path) -> bool {
    rustfuse_snapshotter::redirects::is_redirected(dir)
}

/// `mv /opt/app /opt/app.old` in a build step, then a new `/opt/app`: in FUSE mode the
/// rename of a directory with parent-layer content is one rename(2) (no EXDEV) that leaves a
/// redirect in the upper and copies nothing; kernel overlay mode (no `redirect_dir=on`)
/// answers EXDEV and `mv` copies, as containerd's overlayfs snapshotter does. Either way the
/// merged view, BuildKit's read-only mount of the active snapshot, and after Commit a child
/// snapshot and a two-layer view show the renamed tree and not the old name.
fn r01_rename_directory_with_lower_content(x: &Ctx) {
    let c = &x.c;
    let base = [
        Op::Dir("/opt", 0o755),
        Op::Dir("/opt/app", 0o750),
        Op::Dir("/opt/app/bin", 0o755),
        file("/opt/app/bin/run", "#!/bin/sh\n", 0o755),
        file("/opt/app/conf", "v1", 0o640),
        Op::Dir("/opt/app/empty", 0o700),
        file("/opt/other", "o", 0o644),
    ];
    let flat = x.dir("flat");
    apply(&flat, &base);
    let (mp, g) = x.mount(&c.prepare("base-a", "").unwrap(), "base");
    apply(&mp, &base);
    g.unmount();
    c.commit("base", "base-a").unwrap();

    let mounts = c.prepare("step-a", "base").unwrap();
    match x.server.mode {
        Mode::Fuse => assert!(
            mounts[0].options.iter().any(|o| o == "redirect_dir=on"),
            "{mounts:?}"
        ),
        Mode::Overlay => assert!(
            !mounts[0]
                .options
                .iter()
                .any(|o| o.starts_with("redirect_dir")),
            "{mounts:?}"
        ),
    }
    let (mp, g) = x.mount(&mounts, "step");
    let renamed = std::fs::rename(mp.join("opt/app"), mp.join("opt/app.old"));
    match (x.server.mode, renamed) {
        (_, Ok(())) => {}
        (Mode::Fuse, Err(e)) => panic!("FUSE mode (redirect_dir=on): rename /opt/app: {e}"),
        (Mode::Overlay, Err(e)) => {
            assert_eq!(e.raw_os_error(), Some(18), "kernel overlay: {e}, not EXDEV");
            let st = std::process::Command::new("mv")
                .arg(mp.join("opt/app"))
                .arg(mp.join("opt/app.old"))
                .status()
                .unwrap();
            assert!(st.success(), "mv by copy: {st}");
        }
    }
    std::fs::rename(flat.join("opt/app"), flat.join("opt/app.old")).unwrap();
    let step = [
        Op::Dir("/opt/app", 0o755),
        file("/opt/app/conf", "v2", 0o644),
        file("/opt/app.old/bin/added", "after the rename", 0o644),
    ];
    apply(&mp, &step);
    apply(&flat, &step);
    assert_same_tree(&mp, &flat, "after the rename");
    assert_eq!(listing(&mp.join("opt")), ["app", "app.old", "other"]);
    let (_, upper) = first_dir(&mounts);
    if x.server.mode == Mode::Fuse {
        let moved = upper.join("opt/app.old");
        assert!(redirected(&moved), "{} holds no redirect", moved.display());
        assert_eq!(
            listing(&moved),
            ["bin"],
            "the rename copied the tree up (only bin/added was written)"
        );
    }
    // BuildKit's read-only mount of the active snapshot, the read-write one still live.
    let (ro, gro) = x.mount(&buildkit_readonly(&mounts), "ro");
    assert_same_tree(&ro, &flat, "read-only mount of the active snapshot");
    gro.unmount();
    g.unmount();
    c.commit("step", "step-a").unwrap();

    let (mp, g) = x.mount(&c.prepare("child", "step").unwrap(), "child");
    assert_same_tree(&mp, &flat, "child of the committed rename");
    assert!(
        !mp.join("opt/app/bin").exists(),
        "the old tree shows under the old name"
    );
    // The child renames the renamed directory again, and back is a plain directory.
    let again = std::fs::rename(mp.join("opt/app.old"), mp.join("app2"));
    if x.server.mode == Mode::Fuse {
        again.expect("FUSE mode: rename of a redirected directory");
        std::fs::rename(flat.join("opt/app.old"), flat.join("app2")).unwrap();
        assert_same_tree(&mp, &flat, "second rename, in the child");
    }
    g.unmount();
    let (vm, gv) = x.mount(&c.view("two layers", "step").unwrap(), "view");
    assert_eq!(
        std::fs::read_to_string(vm.join("opt/app.old/conf")).unwrap(),
        "v1"
    );
    assert_eq!(
        std::fs::read_to_string(vm.join("opt/app/conf")).unwrap(),
        "v2"
    );
    assert_eq!(listing(&vm.join("opt/app")), ["conf"]);
    gv.unmount();
}
