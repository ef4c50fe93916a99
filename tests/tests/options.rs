//! fuse-overlayfs mount options, each checked by what a user of the mount sees and what ends up
//! on disk: uid/gid mapping, squash_to_*, static_nlink, noxattrs, volatile/fsync=0, timeout,
//! xattr_permissions=2, threaded=0, unknown options, SELinux `context=`.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::Path;

use rustfuse_tests::env::{self, Scratch, bin_under_test, scratch};
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::mount::{Mount, timed};
use rustfuse_tests::ops::{self, build};
use rustfuse_tests::upper::parse_override;

/// A mounted tree, with its scratch directory (kept alive as long as the mount).
struct Fixture {
    m: Materialized,
    g: Option<Mount>,
    _s: Scratch,
}

impl Fixture {
    fn new(name: &str, tree: &Tree, opts: &[&str]) -> Fixture {
        let s = scratch(name);
        let mut m = tree.materialize(s.path()).expect("materialize");
        m.mnt = m.mnt.canonicalize().unwrap();
        let g = Mount::fuse(&bin_under_test(), &m.stack, opts, &m.mnt)
            .unwrap_or_else(|e| panic!("mount -o {opts:?}: {e}"));
        Fixture {
            m,
            g: Some(g),
            _s: s,
        }
    }

    fn mnt(&self, rel: &str) -> std::path::PathBuf {
        self.m.mnt.join(rel)
    }
    fn upper(&self, rel: &str) -> std::path::PathBuf {
        self.m.stack.upper.as_ref().unwrap().join(rel)
    }
    fn lower(&self, rel: &str) -> std::path::PathBuf {
        self.m.stack.lowers[0].join(rel)
    }
    fn mount(&self) -> &Mount {
        self.g.as_ref().unwrap()
    }
    fn unmount(&mut self) {
        self.g.take().unwrap().unmount().unwrap();
    }
    /// Runs `ops` through the mount, returning what each showed (`ok`, `ok: "x"`, `EROFS`).
    fn run(&self, list: &[ops::Op]) -> Vec<String> {
        ops::run(self.mount().root(), list)
            .iter()
            .map(ops::show)
            .collect()
    }
}

/// `(uid, gid)` of `p` (not following symlinks), with a deadline.
fn owner(p: &Path) -> (u32, u32) {
    let p2 = p.to_path_buf();
    let md = timed(&format!("lstat {}", p.display()), move || {
        fs::symlink_metadata(&p2)
    })
    .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (md.uid(), md.gid())
}

fn lstat(p: &Path) -> fs::Metadata {
    let p2 = p.to_path_buf();
    timed(&format!("lstat {}", p.display()), move || {
        fs::symlink_metadata(&p2)
    })
    .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn do_chown(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let p2 = p.to_path_buf();
    timed(&format!("chown {}", p.display()), move || {
        chown(&p2, Some(uid), Some(gid))
    })
}

fn overflow_id(which: &str) -> u32 {
    fs::read_to_string(format!("/proc/sys/kernel/{which}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65534)
}

fn lgetxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    rustix::fs::lgetxattr(p, name, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

fn owned_tree() -> Tree {
    Tree::new().lower(
        Layer::new()
            .file("a", "content a")
            .owner(5, 6)
            .file("unmapped", "u")
            .owner(500, 600)
            .dir("d")
            .owner(7, 8)
            .file("d/f", "f")
            .owner(9, 10),
    )
}

fn ready() -> bool {
    env::require_bin_under_test()
}

#[test]
fn uidmapping_and_gidmapping() {
    if !ready() {
        return;
    }
    let mut f = Fixture::new(
        "opt-idmap",
        &owned_tree(),
        &["uidmapping=0:1000:100", "gidmapping=0:2000:50:100:3000:50"],
    );
    let (ou, og) = (overflow_id("overflowuid"), overflow_id("overflowgid"));
    assert_eq!(owner(&f.mnt("a")), (1005, 2006), "disk 5:6");
    assert_eq!(owner(&f.mnt("d")), (1007, 2008), "disk 7:8");
    assert_eq!(owner(&f.mnt("d/f")), (1009, 2010), "disk 9:10");
    assert_eq!(owner(&f.mnt("unmapped")), (ou, og), "disk 500:600");
    // chown through the mount stores the disk ids.
    do_chown(&f.mnt("a"), 1007, 3001).expect("chown 1007:3001");
    assert_eq!(owner(&f.mnt("a")), (1007, 3001));
    assert_eq!(owner(&f.upper("a")), (7, 101), "stored on disk");
    assert_eq!(owner(&f.lower("a")), (5, 6), "lower layer untouched");
    assert_eq!(
        fs::read_to_string(f.mnt("a")).unwrap(),
        "content a",
        "content kept by copy-up"
    );
    // A file created through the mount by (mapped) root is stored as disk uid 0... only if
    // 0 is mapped: here uid 0 is not in the shown range, so nothing is asserted about it.
    f.unmount();
    // Remount: the mapping is applied again to what was stored.
    let g = Mount::fuse(
        &bin_under_test(),
        &f.m.stack,
        &["uidmapping=0:1000:100", "gidmapping=0:2000:50:100:3000:50"],
        &f.m.mnt,
    )
    .unwrap();
    assert_eq!(owner(&f.mnt("a")), (1007, 3001), "after remount");
    g.unmount().unwrap();
}

/// Everything shows as 0:0; chown reports success and changes no owner on disk (fuse-overlayfs
/// 1.10 does chown the copied-up file).
#[test]
fn squash_to_root() {
    if !ready() {
        return;
    }
    let f = Fixture::new("opt-squash-root", &owned_tree(), &["squash_to_root"]);
    for p in ["", "a", "unmapped", "d", "d/f"] {
        assert_eq!(owner(&f.mnt(p)), (0, 0), "/{p} shown as");
    }
    do_chown(&f.mnt("a"), 123, 456).expect("chown reports success");
    assert_eq!(owner(&f.mnt("a")), (0, 0), "still shown as root");
    assert_eq!(owner(&f.lower("a")), (5, 6), "lower untouched");
    if let Ok(md) = fs::symlink_metadata(f.upper("a")) {
        assert_eq!((md.uid(), md.gid()), (5, 6), "chown changed the copy-up");
    }
    assert_eq!(fs::read_to_string(f.mnt("a")).unwrap(), "content a");
    // New files show as root too, and are writable.
    assert_eq!(
        f.run(&[build::write("new", "n"), build::read("new")]),
        ["ok", "ok: \"n\""]
    );
    assert_eq!(owner(&f.mnt("new")), (0, 0));
}

#[test]
fn squash_to_uid_and_gid() {
    if !ready() {
        return;
    }
    {
        let f = Fixture::new(
            "opt-squash-ug",
            &owned_tree(),
            &["squash_to_uid=42", "squash_to_gid=43"],
        );
        for p in ["", "a", "unmapped", "d", "d/f"] {
            assert_eq!(owner(&f.mnt(p)), (42, 43), "/{p} shown as");
        }
        do_chown(&f.mnt("d/f"), 1, 2).expect("chown reports success");
        assert_eq!(owner(&f.mnt("d/f")), (42, 43));
        if let Ok(md) = fs::symlink_metadata(f.upper("d/f")) {
            assert_eq!((md.uid(), md.gid()), (9, 10), "chown changed the copy-up");
        }
    }
    // Only the uid squashed: the gid is the real one.
    let f = Fixture::new("opt-squash-u", &owned_tree(), &["squash_to_uid=42"]);
    assert_eq!(owner(&f.mnt("a")), (42, 6));
    assert_eq!(owner(&f.mnt("d")), (42, 8));
    let f = Fixture::new("opt-squash-g", &owned_tree(), &["squash_to_gid=43"]);
    assert_eq!(owner(&f.mnt("a")), (5, 43));
}

#[test]
fn static_nlink() {
    if !ready() {
        return;
    }
    let tree = Tree::new().lower(
        Layer::new()
            .dir("d")
            .dir("d/sub1")
            .dir("d/sub2")
            .file("d/f", "x")
            .link("d/f2", "d/f"),
    );
    let f = Fixture::new("opt-nlink", &tree, &["static_nlink"]);
    assert_eq!(
        f.run(&[build::mkdir("new"), build::mkdir("d/sub3")]),
        ["ok", "ok"]
    );
    for p in ["", "d", "d/sub1", "new"] {
        assert_eq!(lstat(&f.mnt(p)).nlink(), 1, "directory /{p}");
    }
    assert_eq!(
        lstat(&f.mnt("d/f")).nlink(),
        2,
        "files keep their link count"
    );
    drop(f);
    // Without the option, directories count their subdirectories.
    let f = Fixture::new("opt-nlink-off", &tree, &[]);
    assert_eq!(lstat(&f.mnt("d")).nlink(), 4, "d without static_nlink");
}

#[test]
fn noxattrs() {
    if !ready() {
        return;
    }
    let tree = Tree::new().lower(Layer::new().file("a", "x").xattr("user.present", "1"));
    let f = Fixture::new("opt-noxattrs", &tree, &["noxattrs=1"]);
    let got = f.run(&[
        build::getxattr("a", "user.present"),
        build::setxattr("a", "user.new", "v"),
        build::setxattr("", "user.new", "v"),
        build::removexattr("a", "user.present"),
        build::getxattr("a", "user.present"),
        build::listxattr("a"),
        build::write("b", "data"),
        build::append("a", "y"),
        build::read("a"),
    ]);
    eprintln!("noxattrs: {got:?}");
    // ENOTSUP is EOPNOTSUPP on Linux (the kernel turns a daemon's ENOSYS into it, too).
    assert_eq!(got[..5], ["EOPNOTSUPP"; 5], "get/set/remove xattr");
    assert!(
        got[5] == "EOPNOTSUPP" || got[5] == "ok" || got[5] == "ok: []" || got[5] == "ok: ",
        "listxattr must be empty or EOPNOTSUPP, got {}",
        got[5]
    );
    assert_eq!(got[6..], ["ok", "ok", "ok: \"xy\""], "writes still work");
    // Nothing was written to the layers' xattrs.
    assert!(lgetxattr(&f.upper("a"), "user.new").is_none());
    assert!(lgetxattr(f.m.stack.upper.as_ref().unwrap(), "user.new").is_none());
    assert_eq!(
        lgetxattr(&f.lower("a"), "user.present").as_deref(),
        Some(&b"1"[..])
    );
}

/// `volatile` and `fsync=0`: fsync is not done, but the application sees success (the daemon
/// answers ENOSYS, the kernel then answers 0), and the data is written all the same.
#[test]
fn volatile_and_fsync_0() {
    if !ready() {
        return;
    }
    let tree = Tree::new().lower(Layer::new().file("a", "lower").dir("d"));
    for opt in ["volatile", "fsync=0"] {
        let mut f = Fixture::new("opt-volatile", &tree, &[opt]);
        let root = f.mnt("");
        let r = timed("write+fsync", move || -> std::io::Result<()> {
            use std::io::Write;
            for name in ["a", "d/new"] {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(root.join(name))?;
                file.write_all(b"synced?")?;
                file.sync_all()?;
                file.write_all(b" twice")?;
                file.sync_data()?;
                file.sync_all()?;
            }
            fs::File::open(root.join("d"))?.sync_all()?;
            fs::File::open(&root)?.sync_all()?;
            Ok(())
        });
        r.unwrap_or_else(|e| panic!("{opt}: fsync/fdatasync answered {e}"));
        assert_eq!(fs::read_to_string(f.mnt("a")).unwrap(), "synced? twice");
        f.unmount();
        for name in ["a", "d/new"] {
            assert_eq!(
                fs::read_to_string(f.upper(name)).unwrap(),
                "synced? twice",
                "{opt}: upper {name}"
            );
        }
    }
}

#[test]
fn timeout_0_and_fractional() {
    if !ready() {
        return;
    }
    let tree = Tree::new().lower(Layer::new().file("a", "lower").dir("d"));
    for opt in ["timeout=0", "timeout=0.5"] {
        let f = Fixture::new("opt-timeout", &tree, &[opt]);
        assert_eq!(
            f.run(&[
                build::read("a"),
                build::write("a", "changed"),
                build::read("a"),
                build::rename("a", "d/a"),
                build::stat("a"),
                build::read("d/a"),
                build::readdir("d"),
            ])[..6],
            [
                "ok: \"lower\"",
                "ok",
                "ok: \"changed\"",
                "ok",
                "ENOENT",
                "ok: \"changed\""
            ],
            "{opt}"
        );
    }
}

/// `xattr_permissions=2`: chmod/chown are recorded in `user.containers.override_stat` on the
/// upper file (as containers/storage expects), the real owner is left alone, and stat shows
/// the override, also after a remount.
#[test]
fn xattr_permissions_2_override_stat() {
    if !ready() {
        return;
    }
    let tree = Tree::new().lower(
        Layer::new()
            .file("a", "content")
            .owner(5, 6)
            .mode(0o644)
            .dir("d")
            .owner(5, 6),
    );
    const X: &str = "user.containers.override_stat";
    let mut f = Fixture::new("opt-xattrperm", &tree, &["xattr_permissions=2"]);
    fs::set_permissions(f.mnt("a"), fs::Permissions::from_mode(0o600)).expect("chmod 600");
    do_chown(&f.mnt("a"), 123, 456).expect("chown 123:456");
    do_chown(&f.mnt("d"), 77, 88).expect("chown dir 77:88");
    let check = |f: &Fixture, when: &str| {
        let md = lstat(&f.mnt("a"));
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (123, 456, 0o600),
            "{when}: stat of a through the mount"
        );
        assert_eq!(owner(&f.mnt("d")), (77, 88), "{when}: owner of d");
        let v = lgetxattr(&f.upper("a"), X).unwrap_or_else(|| panic!("{when}: upper a has no {X}"));
        let (u, g, mode, _) = parse_override(&v)
            .unwrap_or_else(|| panic!("{when}: bad {X} {:?}", String::from_utf8_lossy(&v)));
        assert_eq!((u, g, mode & 0o7777), (123, 456, 0o600), "{when}: {X} of a");
        let real = fs::symlink_metadata(f.upper("a")).unwrap();
        assert_ne!(
            (real.uid(), real.gid()),
            (123, 456),
            "{when}: the real file was chowned"
        );
        let v = lgetxattr(&f.upper("d"), X).unwrap_or_else(|| panic!("{when}: upper d has no {X}"));
        let (u, g, _, _) = parse_override(&v).expect("override of d");
        assert_eq!((u, g), (77, 88), "{when}: {X} of d");
        assert_eq!(owner(&f.lower("a")), (5, 6), "{when}: lower untouched");
    };
    check(&f, "mounted");
    assert_eq!(fs::read_to_string(f.mnt("a")).unwrap(), "content");
    f.unmount();
    f.g = Some(
        Mount::fuse(
            &bin_under_test(),
            &f.m.stack,
            &["xattr_permissions=2"],
            &f.m.mnt,
        )
        .unwrap(),
    );
    check(&f, "after remount");
}

#[test]
fn threaded_0() {
    if !ready() {
        return;
    }
    let tree = Tree::new().lower(Layer::new().file("a", "lower").dir("d").file("d/b", "b"));
    let f = Fixture::new("opt-threaded", &tree, &["threaded=0"]);
    assert_eq!(
        f.run(&[
            build::read("a"),
            build::append("a", "+"),
            build::read("a"),
            build::mkdir("n"),
            build::write("n/x", "x"),
            build::unlink("d/b"),
            build::readdir("d"),
        ])[..6],
        ["ok: \"lower\"", "ok", "ok: \"lower+\"", "ok", "ok", "ok"]
    );
    // Several readers at once on a single-threaded daemon: all answered.
    let root = f.mnt("");
    timed("parallel reads on threaded=0", move || {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let r = root.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        assert_eq!(fs::read_to_string(r.join("a")).unwrap(), "lower+");
                        assert!(fs::read_dir(&r).unwrap().count() >= 2);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

#[test]
fn unknown_option_warned_not_fatal() {
    if !ready() {
        return;
    }
    let tree = Tree::new().lower(Layer::new().file("a", "lower"));
    let f = Fixture::new("opt-unknown", &tree, &["no_such_option=3", "alsobogus"]);
    let err = &f.mount().launcher_stderr;
    for o in ["no_such_option", "alsobogus"] {
        assert!(
            err.lines()
                .any(|l| l.contains("unknown argument ignored") && l.contains(o)),
            "no `unknown argument ignored: {o}` warning on stderr: {err:?}"
        );
    }
    assert_eq!(f.run(&[build::read("a")]), ["ok: \"lower\""]);
}

/// containers/storage passes `context="system_u:object_r:container_file_t:s0:c1,c2"`, which
/// the comma split cuts in two; without SELinux the mount must still succeed.
#[test]
fn selinux_context_accepted_without_selinux() {
    if !ready() {
        return;
    }
    let tree = Tree::new().lower(Layer::new().file("a", "lower"));
    let f = Fixture::new(
        "opt-context",
        &tree,
        &["context=\"system_u:object_r:container_file_t:s0:c1,c2\""],
    );
    assert_eq!(
        f.run(&[build::read("a"), build::write("b", "x")]),
        ["ok: \"lower\"", "ok"]
    );
}
