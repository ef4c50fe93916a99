//! Unit tests of the overlay core without FUSE: real layer directories, and faults injected
//! through the kernel-call seam.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::options;

struct Layers {
    root: PathBuf,
}

impl Layers {
    fn new(name: &str) -> Layers {
        let root =
            std::env::temp_dir().join(format!("rustfuse-unit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["lower", "upper", "work"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        Layers { root }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn overlay(&self) -> Overlay {
        self.overlay_with(&[])
    }

    /// An overlay of these layers with `extra` options too.
    fn overlay_with(&self, extra: &[&str]) -> Overlay {
        let mut opts = vec![format!(
            "lowerdir={},upperdir={},workdir={}",
            self.p("lower").display(),
            self.p("upper").display(),
            self.p("work").display()
        )];
        opts.extend(extra.iter().map(|o| o.to_string()));
        Overlay::new(options::parse(&opts).unwrap()).unwrap()
    }
}

impl Drop for Layers {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Descriptors of this process open on something under `root` (a test's layers): the
/// overlay's own, and none of the tests running alongside, which have their own layers.
fn open_fds(root: &Path) -> usize {
    // The kernel shows an fd's path resolved: compare with the root resolved too.
    let root = fs::canonicalize(root).unwrap();
    fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.starts_with(&root))
                .count()
        })
        .unwrap_or(0)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

const CALLER: Caller = Caller { uid: 0, gid: 0 };

/// The names a listing of directory `ino` gives (`.` and `..` included), sorted.
fn listed(ov: &Overlay, ino: Ino) -> Vec<String> {
    let fh = ov.opendir(ino).unwrap();
    let mut names = Vec::new();
    ov.readdir(fh, ino, 0, |e, _| {
        names.push(e.name.to_string_lossy().into_owned());
        false
    })
    .unwrap();
    ov.release(fh);
    names.sort();
    names
}

#[test]
fn failed_copy_up_leaves_nothing_half_done() {
    // Each step of a copy-up, failing in turn (on a fresh layer set each time). FICLONE
    // failing is not an error: the data is copied another way.
    const LATER: &str = "background_sync=1";
    const NOW: &str = "background_sync=0";
    for (op, errno, must_fail, sync) in [
        ("mkdir", Errno::NOSPC, true, LATER),
        ("ficlone", Errno::IO, false, LATER),
        ("copy_file_range", Errno::NOSPC, true, LATER),
        ("chown", Errno::PERM, true, LATER),
        ("utimens", Errno::IO, true, LATER),
        // The copy's own fsync is off the request path (see `durable`)...
        ("fsync", Errno::IO, false, LATER),
        // ... unless copy-ups sync before they are answered: then the copy is an anonymous
        // file (O_TMPFILE), linked into place.
        ("fsync", Errno::IO, true, NOW),
        ("rename", Errno::NOSPC, true, LATER),
        ("open", Errno::NOSPC, true, NOW),
        ("chown", Errno::PERM, true, NOW),
        ("utimens", Errno::IO, true, NOW),
        ("link", Errno::NOSPC, true, NOW),
    ] {
        let l = Layers::new(&format!("copyup-fault-{op}-{sync}"));
        fs::create_dir_all(l.p("lower/d")).unwrap();
        fs::write(l.p("lower/d/f"), vec![7u8; 1 << 20]).unwrap();
        let ov = l.overlay_with(&[sync]);
        let d = ov.lookup(ROOT_INO, OsStr::new("d")).unwrap();
        let f = ov.lookup(d.ino, OsStr::new("f")).unwrap();
        let fds = open_fds(&l.root);
        assert!(
            fds > 0,
            "{op}: the overlay's descriptors of the layers are counted"
        );
        // `mkdir` fails the parent's copy-up; the others the file's.
        ov.faults().inject(op, 1, errno);
        let r = ov.open(f.ino, libc::O_WRONLY);
        ov.faults().clear();
        match r {
            Err(e) => {
                assert!(
                    must_fail,
                    "{op}: a tolerated failure failed the open: {e:?}"
                );
                assert_eq!(
                    e, errno,
                    "{op}: the caller gets the errno of the failed step"
                );
            }
            Ok(fh) => {
                assert!(
                    !must_fail,
                    "{op}: the fault was not reached or was swallowed"
                );
                ov.release(fh);
                continue;
            }
        }
        // Nothing half-copied in the upper layer, nothing left in work/, no fd leaked.
        assert!(
            !l.p("upper/d/f").exists(),
            "{op}: a partial copy is visible in the upper layer"
        );
        assert_eq!(
            entries(&l.p("work/work")),
            Vec::<String>::new(),
            "{op}: work/ not clean"
        );
        // The parent's copy-up may have succeeded: its node now holds its upper directory.
        let parent_fd = usize::from(l.p("upper/d").exists());
        assert_eq!(
            open_fds(&l.root),
            fds + parent_fd,
            "{op}: descriptor leaked"
        );
        // The lower file still reads whole, and a retry without the fault works.
        let fh = ov.open(f.ino, libc::O_RDONLY).unwrap();
        assert_eq!(ov.read(fh, 0, 1 << 21).unwrap(), vec![7u8; 1 << 20], "{op}");
        ov.release(fh);
        let fh = ov.open(f.ino, libc::O_WRONLY).unwrap();
        assert_eq!(ov.write(fh, 0, b"x").unwrap(), 1);
        ov.release(fh);
        assert_eq!(fs::metadata(l.p("upper/d/f")).unwrap().len(), 1 << 20);
        assert_eq!(
            fs::read(l.p("lower/d/f")).unwrap()[0],
            7,
            "lower layer changed"
        );
    }
}

#[test]
fn failed_create_and_unlink_keep_the_view() {
    let l = Layers::new("create-fault");
    fs::write(l.p("lower/a"), b"a").unwrap();
    let ov = l.overlay();
    ov.faults().inject("open", 1, Errno::NOSPC);
    let r = ov.create(CALLER, ROOT_INO, OsStr::new("new"), 0o644, libc::O_RDWR);
    ov.faults().clear();
    assert_eq!(r.err(), Some(Errno::NOSPC));
    assert_eq!(
        ov.lookup(ROOT_INO, OsStr::new("new")).err(),
        Some(Errno::NOENT)
    );
    // A whiteout that cannot be written: the lower file stays visible.
    let _a = ov.lookup(ROOT_INO, OsStr::new("a")).unwrap();
    // The whiteout is a 0/0 device where mknod works, else a `.wh.` file (an open).
    ov.faults().inject(
        if ov.dev_whiteouts() { "mknod" } else { "open" },
        1,
        Errno::NOSPC,
    );
    let r = ov.unlink(ROOT_INO, OsStr::new("a"));
    ov.faults().clear();
    assert_eq!(
        r.err(),
        Some(Errno::NOSPC),
        "the whiteout's errno reaches the caller"
    );
    assert!(
        ov.lookup(ROOT_INO, OsStr::new("a")).is_ok(),
        "the file is still visible"
    );
    ov.unlink(ROOT_INO, OsStr::new("a")).unwrap();
    assert_eq!(
        ov.lookup(ROOT_INO, OsStr::new("a")).err(),
        Some(Errno::NOENT)
    );
}

#[test]
fn lookup_probes_and_whiteouts() {
    let l = Layers::new("lookup");
    fs::create_dir_all(l.p("lower/d")).unwrap();
    fs::write(l.p("lower/d/x"), b"x").unwrap();
    fs::write(l.p("lower/d/.wh.y"), b"").unwrap();
    fs::write(l.p("lower/d/z"), b"z").unwrap();
    let ov = l.overlay();
    let d = ov.lookup(ROOT_INO, OsStr::new("d")).unwrap();
    assert_eq!(d.kind, Kind::Dir);
    assert!(ov.lookup(d.ino, OsStr::new("x")).is_ok());
    assert_eq!(
        ov.lookup(d.ino, OsStr::new(".wh.y")).err(),
        Some(Errno::NOENT)
    );
    // Listing: the marker file is hidden.
    assert_eq!(listed(&ov, d.ino), [".", "..", "x", "z"]);
    // rm + mkdir of a lower directory: the new one is opaque and empty.
    ov.unlink(d.ino, OsStr::new("x")).unwrap();
    ov.unlink(d.ino, OsStr::new("z")).unwrap();
    ov.rmdir(ROOT_INO, OsStr::new("d")).unwrap();
    let d2 = ov.mkdir(CALLER, ROOT_INO, OsStr::new("d"), 0o755).unwrap();
    assert_eq!(
        listed(&ov, d2.ino).len(),
        2,
        "only . and .. in the recreated directory"
    );
}

#[test]
fn inode_tables_stay_bounded() {
    let l = Layers::new("forget");
    for i in 0..200 {
        fs::write(l.p(&format!("lower/f{i}")), b"").unwrap();
    }
    let ov = l.overlay();
    let base = ov.node_count();
    let inos: Vec<Ino> = (0..200)
        .map(|i| {
            ov.lookup(ROOT_INO, OsStr::new(&format!("f{i}")))
                .unwrap()
                .ino
        })
        .collect();
    assert_eq!(ov.node_count(), base + 200);
    for ino in inos {
        ov.forget(ino, 1);
    }
    assert_eq!(ov.node_count(), base, "FORGET must drop the nodes");
}

/// A READDIRPLUS whose lookup of an entry fails (not ENOENT or EIO) after entries were given
/// answers the error (as kernel overlayfs fails the listing) and keeps no lookup reference
/// of the entries given: the kernel drops them with the error answer, and their references
/// would never be forgotten (an unlinked file's space with them).
#[test]
fn a_listing_that_fails_part_way_keeps_no_lookup() {
    let l = Layers::new("readdirplus-fault");
    for i in 0..8 {
        fs::write(l.p(&format!("upper/f{i}")), b"x").unwrap();
    }
    let ov = l.overlay();
    let base = ov.node_count();
    let fh = ov.opendir(ROOT_INO).unwrap();
    // Lookups stat their entry: the fourth one fails.
    ov.faults().inject("stat", 4, Errno::ACCESS);
    let mut given = 0;
    let r = ov.readdirplus(fh, ROOT_INO, 0, |_, _, a| {
        given += usize::from(a.is_some());
        false
    });
    ov.faults().clear();
    assert_eq!(r.err(), Some(Errno::ACCESS), "the listing fails");
    assert!(given > 0, "entries were given before the failing one");
    assert_eq!(ov.node_count(), base, "no lookup kept for an error answer");
    ov.release(fh);
}

#[test]
fn directory_fds_stay_within_budget() {
    let l = Layers::new("dir-budget");
    for i in 0..300 {
        fs::create_dir_all(l.p(&format!("lower/d{i}/sub"))).unwrap();
        fs::write(l.p(&format!("lower/d{i}/sub/f")), format!("{i}")).unwrap();
    }
    let ov = l.overlay();
    ov.set_dir_fd_budget(32);
    let mut subs = Vec::new();
    for i in 0..300 {
        let d = ov.lookup(ROOT_INO, OsStr::new(&format!("d{i}"))).unwrap();
        subs.push(ov.lookup(d.ino, OsStr::new("sub")).unwrap().ino);
        assert!(
            ov.cached_dir_fds() <= 40,
            "{} directory fds cached over a budget of 32",
            ov.cached_dir_fds()
        );
    }
    // Every directory still works after its fd was dropped: reopened through its parent.
    for (i, sub) in subs.iter().enumerate() {
        let f = ov.lookup(*sub, OsStr::new("f")).unwrap();
        let fh = ov.open(f.ino, libc::O_RDONLY).unwrap();
        assert_eq!(ov.read(fh, 0, 16).unwrap(), format!("{i}").into_bytes());
        ov.release(fh);
    }
    // Writes too: copy-up of a directory whose handles were evicted.
    let fh = ov
        .open(
            ov.lookup(subs[0], OsStr::new("f")).unwrap().ino,
            libc::O_WRONLY,
        )
        .unwrap();
    ov.write(fh, 0, b"x").unwrap();
    ov.release(fh);
    assert!(l.p("upper/d0/sub/f").exists());
}

#[test]
fn directory_fd_eviction_under_concurrent_reopens() {
    let l = Layers::new("dir-evict-mt");
    for i in 0..64 {
        fs::create_dir_all(l.p(&format!("lower/a{i}/b/c"))).unwrap();
        fs::write(l.p(&format!("lower/a{i}/b/c/f")), b"x").unwrap();
    }
    let ov = std::sync::Arc::new(l.overlay());
    ov.set_dir_fd_budget(16);
    // Resolve every level once, so later reopens walk parent chains that were evicted.
    let mut leaves = Vec::new();
    for i in 0..64 {
        let a = ov.lookup(ROOT_INO, OsStr::new(&format!("a{i}"))).unwrap();
        let b = ov.lookup(a.ino, OsStr::new("b")).unwrap();
        leaves.push(ov.lookup(b.ino, OsStr::new("c")).unwrap().ino);
    }
    let leaves = std::sync::Arc::new(leaves);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(800);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (ov, leaves) = (ov.clone(), leaves.clone());
            std::thread::spawn(move || {
                let mut n = t;
                while std::time::Instant::now() < deadline {
                    n = (n * 7 + 13) % leaves.len();
                    let f = ov
                        .lookup(leaves[n], OsStr::new("f"))
                        .expect("lookup after eviction");
                    assert_eq!(f.size, 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no panic, no deadlock");
    }
}

/// READDIRPLUS lookups use what the listing saw of each name in the lower layers to skip the
/// layers that lack it: they must find exactly what a plain lookup finds.
#[test]
fn hinted_lookups_of_a_listing_match_plain_lookups() {
    let l = Layers::new("hints");
    let root = &l.root;
    for d in ["l0/d", "l1/d/sub", "l2/d/sub", "upper2", "work2"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in [
        "l2/d/a",
        "l2/d/b",
        "l2/d/c",
        "l2/d/x",
        "l2/d/y",
        "l2/d/sub/s2",
    ] {
        fs::write(root.join(f), "bottom").unwrap();
    }
    for f in ["l1/d/.wh.a", "l1/d/c", "l1/d/z", "l1/d/sub/s1"] {
        fs::write(root.join(f), "middle").unwrap();
    }
    for f in ["l0/d/y", "l0/d/.wh.x", "l0/d/t"] {
        fs::write(root.join(f), "top").unwrap();
    }
    // A 0/0 whiteout of `b` in the middle layer, where mknod is allowed.
    let _ = rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("l1/d/b"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    );
    fs::hard_link(root.join("l2/d/c"), root.join("l2/d/c-link")).unwrap();
    let mount = |upper: &str, work: &str| {
        let o = options::parse(&[format!(
            "lowerdir={}:{}:{},upperdir={},workdir={}",
            root.join("l0").display(),
            root.join("l1").display(),
            root.join("l2").display(),
            root.join(upper).display(),
            root.join(work).display()
        )])
        .unwrap();
        Overlay::new(o).unwrap()
    };
    let hinted = mount("upper", "work");
    let plain = mount("upper2", "work2");
    let d = hinted.lookup(ROOT_INO, OsStr::new("d")).unwrap();
    let fh = hinted.opendir(d.ino).unwrap();
    let mut seen = Vec::new();
    hinted
        .readdirplus(fh, d.ino, 0, |e, _, a| {
            if let Some(a) = a {
                seen.push((e.name.clone(), a.ino, a.kind, a.size));
            }
            false
        })
        .unwrap();
    hinted.release(fh);
    let pd = plain.lookup(ROOT_INO, OsStr::new("d")).unwrap();
    let mut names: Vec<String> = seen
        .iter()
        .map(|(n, ..)| n.to_string_lossy().into_owned())
        .collect();
    names.sort();
    let want_b = if fs::symlink_metadata(root.join("l1/d/b")).is_ok() {
        vec![]
    } else {
        vec!["b"]
    };
    let mut want: Vec<&str> = ["c", "c-link", "sub", "t", "y", "z"].to_vec();
    want.extend(want_b);
    want.sort();
    assert_eq!(names, want);
    for (name, ino, kind, size) in &seen {
        let a = plain.lookup(pd.ino, name).unwrap();
        assert_eq!(
            (a.ino, a.kind, a.size),
            (*ino, *kind, *size),
            "{name:?}: hinted lookup differs"
        );
    }
    // And the merged subdirectory found by the hinted lookup lists both of its layers.
    let sub = seen.iter().find(|(n, ..)| n == "sub").unwrap().1;
    assert_eq!(listed(&hinted, sub), [".", "..", "s1", "s2"]);
}

/// Lookups enough to keep each lower directory's listing (`probe::LowerNames`) answer as
/// the layers say: names of every layer, whiteouts of both kinds, overrides, absent names;
/// and once kept, an absent name costs no syscall at all.
#[test]
fn kept_lower_listings_answer_lookups_as_the_layers_do() {
    let l = Layers::new("kept-listings");
    let root = &l.root;
    for d in ["l0/d", "l1/d", "l2/d/sub"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for i in 0..40 {
        fs::write(root.join(format!("l2/d/f{i}")), "bottom").unwrap();
    }
    fs::write(root.join("l1/d/.wh.f5"), "").unwrap();
    fs::write(root.join("l1/d/m1"), "middle").unwrap();
    fs::write(root.join("l0/d/f7"), "top!").unwrap();
    fs::write(root.join("l0/d/t0"), "top").unwrap();
    // A 0/0 whiteout of f6 in the middle layer, where mknod is allowed.
    let dev_wh = rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("l1/d/f6"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .is_ok();
    let lowers = format!(
        "lowerdir={}:{}:{}",
        root.join("l0").display(),
        root.join("l1").display(),
        root.join("l2").display()
    );
    let rw = Overlay::new(
        options::parse(&[format!(
            "{lowers},upperdir={},workdir={}",
            l.p("upper").display(),
            l.p("work").display()
        )])
        .unwrap(),
    )
    .unwrap();
    let ro = Overlay::new(options::parse(&[lowers]).unwrap()).unwrap();
    for ov in [&rw, &ro] {
        let d = ov.lookup(ROOT_INO, OsStr::new("d")).unwrap();
        // Twice: the second pass runs with every listing kept.
        for _ in 0..2 {
            for i in 0..40 {
                let name = format!("f{i}");
                let got = ov.lookup(d.ino, OsStr::new(&name)).map(|a| a.size);
                let want = match i {
                    5 => Err(Errno::NOENT),
                    6 if dev_wh => Err(Errno::NOENT),
                    7 => Ok(4),
                    _ => Ok(6),
                };
                assert_eq!(got, want, "{name}");
                let absent = ov.lookup(d.ino, OsStr::new(&format!("nope{i}")));
                assert_eq!(absent.err(), Some(Errno::NOENT));
            }
            assert_eq!(ov.lookup(d.ino, OsStr::new("m1")).map(|a| a.size), Ok(6));
            assert_eq!(ov.lookup(d.ino, OsStr::new("t0")).map(|a| a.size), Ok(3));
            assert_eq!(
                ov.lookup(d.ino, OsStr::new("sub")).map(|a| a.kind),
                Ok(Kind::Dir)
            );
            assert_eq!(
                ov.lookup(d.ino, OsStr::new(".wh.f5")).err(),
                Some(Errno::NOENT)
            );
        }
        let node = ov.node(d.ino.0).unwrap();
        let kept: Vec<bool> = node
            .state()
            .lowers
            .iter()
            .map(|(_, loc)| loc.dir_handle().is_some_and(|h| h.names.kept()))
            .collect();
        assert_eq!(
            kept,
            [true, true, true],
            "every lower part of d keeps its listing"
        );
    }
    // A read-only overlay probes no upper layer: with the listings kept, a lookup of a name
    // no layer has makes no stat at all (a planned stat fault is not met).
    let d = ro.lookup(ROOT_INO, OsStr::new("d")).unwrap();
    ro.faults().inject("stat", 1, Errno::IO);
    assert_eq!(
        ro.lookup(d.ino, OsStr::new("never-there")).err(),
        Some(Errno::NOENT)
    );
    // A name that is listed still goes to the filesystem, and meets the fault.
    assert_eq!(ro.lookup(d.ino, OsStr::new("f9")).err(), Some(Errno::IO));
    ro.faults().clear();
    // Removing a name the middle layer hides, and renaming over a bottom name, in the
    // read-write overlay: whiteouts where a lower layer has the name, none where none does.
    let d = rw.lookup(ROOT_INO, OsStr::new("d")).unwrap();
    let fh = rw
        .create(CALLER, d.ino, OsStr::new("new"), 0o644, libc::O_WRONLY)
        .unwrap()
        .1;
    rw.release(fh);
    rw.rename(
        d.ino,
        OsStr::new("new"),
        d.ino,
        OsStr::new("f9"),
        RenameMode::Replace,
    )
    .unwrap();
    assert!(
        fs::symlink_metadata(l.p("upper/d/new")).is_err(),
        "no whiteout for a new name"
    );
    assert_eq!(rw.lookup(d.ino, OsStr::new("f9")).map(|a| a.size), Ok(0));
    rw.unlink(d.ino, OsStr::new("f9")).unwrap();
    assert_eq!(rw.lookup(d.ino, OsStr::new("f9")).err(), Some(Errno::NOENT));
}

fn metacopy_mark(path: &Path) -> bool {
    METACOPY_XATTRS.iter().any(|m| {
        let dir = fs::File::open(path.parent().unwrap()).unwrap();
        Sys::default()
            .getxattr_at(dir.as_fd(), path.file_name().unwrap(), OsStr::new(m))
            .is_ok()
    })
}

fn chmod_only(mode: u32) -> SetAttr {
    SetAttr {
        mode: Some(mode),
        uid: None,
        gid: None,
        size: None,
        atime: None,
        mtime: None,
    }
}

#[test]
fn metacopy_keeps_the_data_below_until_a_write() {
    let l = Layers::new("metacopy");
    let data = vec![7u8; 1 << 20];
    fs::write(l.p("lower/f"), &data).unwrap();
    let ov = l.overlay_with(&["metacopy=on"]);
    let f = ov.lookup(ROOT_INO, OsStr::new("f")).unwrap();
    let a = ov.setattr(f.ino, None, chmod_only(0o600)).unwrap();
    assert_eq!((a.perm, a.size), (0o600, 1 << 20));
    // The upper file: the metadata, the size, the mark, no data.
    let md = fs::metadata(l.p("upper/f")).unwrap();
    assert_eq!((md.len(), md.blocks()), (1 << 20, 0), "no data copied");
    assert!(metacopy_mark(&l.p("upper/f")), "marked a metacopy");
    assert_eq!(a.blocks, fs::metadata(l.p("lower/f")).unwrap().blocks());
    let r = ov.open(f.ino, libc::O_RDONLY).unwrap();
    assert_eq!(
        ov.read(r, 0, 1 << 21).unwrap(),
        data,
        "reads the lower data"
    );
    // A remount (metacopy off: the mark is still read) sees the same.
    {
        let ov2 = l.overlay();
        let f2 = ov2.lookup(ROOT_INO, OsStr::new("f")).unwrap();
        assert_eq!(f2.perm, 0o600);
        let h = ov2.open(f2.ino, libc::O_RDONLY).unwrap();
        assert_eq!(ov2.read(h, 0, 1 << 21).unwrap(), data);
        ov2.release(h);
    }
    // The first write brings the data up; the earlier read handle follows it.
    let w = ov.open(f.ino, libc::O_WRONLY).unwrap();
    assert_eq!(ov.write(w, 0, b"x").unwrap(), 1);
    ov.release(w);
    assert!(!metacopy_mark(&l.p("upper/f")), "mark removed");
    let got = ov.read(r, 0, 1 << 21).unwrap();
    assert_eq!((got.len(), got[0], got[1]), (1 << 20, b'x', 7));
    ov.release(r);
    let up = fs::read(l.p("upper/f")).unwrap();
    assert_eq!((up.len(), up[0], up[(1 << 20) - 1]), (1 << 20, b'x', 7));
    assert_eq!(
        fs::read(l.p("lower/f")).unwrap(),
        data,
        "lower layer unchanged"
    );
    // A set-uid file with capabilities keeps both through the data copy (a write clears
    // them; the copy is not the caller's write).
    fs::write(l.p("lower/s"), b"setuid").unwrap();
    let s = ov.lookup(ROOT_INO, OsStr::new("s")).unwrap();
    ov.setattr(s.ino, None, chmod_only(0o4755)).unwrap();
    let caps = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let dir = fs::File::open(l.p("upper")).unwrap();
    let has_caps = Sys::default()
        .setxattr_at(
            dir.as_fd(),
            OsStr::new("s"),
            OsStr::new("security.capability"),
            caps,
        )
        .is_ok();
    let w = ov.open(s.ino, libc::O_WRONLY).unwrap();
    ov.release(w);
    assert!(!metacopy_mark(&l.p("upper/s")));
    assert_eq!(
        fs::metadata(l.p("upper/s")).unwrap().mode() & 0o7777,
        0o4755
    );
    if has_caps {
        let got = Sys::default().getxattr_at(
            dir.as_fd(),
            OsStr::new("s"),
            OsStr::new("security.capability"),
        );
        assert_eq!(got.ok().as_deref(), Some(&caps[..]), "capabilities kept");
    }
    assert_eq!(fs::read(l.p("upper/s")).unwrap(), b"setuid");
    // Truncating a metacopy to zero copies nothing.
    fs::write(l.p("lower/g"), b"gggg").unwrap();
    let g = ov.lookup(ROOT_INO, OsStr::new("g")).unwrap();
    ov.setattr(g.ino, None, chmod_only(0o640)).unwrap();
    assert!(metacopy_mark(&l.p("upper/g")));
    let mut t = chmod_only(0o640);
    (t.mode, t.size) = (None, Some(0));
    assert_eq!(ov.setattr(g.ino, None, t).unwrap().size, 0);
    assert!(!metacopy_mark(&l.p("upper/g")));
    assert_eq!(fs::read(l.p("upper/g")).unwrap(), b"");
}

#[test]
fn a_failed_data_copy_of_a_metacopy_keeps_it_reading_below() {
    for (op, errno) in [("copy_file_range", Errno::NOSPC), ("fsync", Errno::IO)] {
        let l = Layers::new(&format!("metacopy-fault-{op}"));
        let data = vec![9u8; 1 << 20];
        fs::write(l.p("lower/f"), &data).unwrap();
        let ov = l.overlay_with(&["metacopy=on"]);
        let f = ov.lookup(ROOT_INO, OsStr::new("f")).unwrap();
        ov.setattr(f.ino, None, chmod_only(0o600)).unwrap();
        ov.faults().inject(op, 1, errno);
        let r = ov.open(f.ino, libc::O_RDWR);
        ov.faults().clear();
        assert_eq!(
            r.err(),
            Some(errno),
            "{op}: the open fails with the step's errno"
        );
        assert!(metacopy_mark(&l.p("upper/f")), "{op}: still a metacopy");
        let h = ov.open(f.ino, libc::O_RDONLY).unwrap();
        assert_eq!(ov.read(h, 0, 1 << 21).unwrap(), data, "{op}: reads below");
        ov.release(h);
        let fresh = l.overlay();
        let f2 = fresh.lookup(ROOT_INO, OsStr::new("f")).unwrap();
        let h = fresh.open(f2.ino, libc::O_RDONLY).unwrap();
        assert_eq!(
            fresh.read(h, 0, 1 << 21).unwrap(),
            data,
            "{op}: after a remount"
        );
        fresh.release(h);
        // A retry works.
        let w = ov.open(f.ino, libc::O_WRONLY).unwrap();
        ov.release(w);
        assert!(!metacopy_mark(&l.p("upper/f")), "{op}");
        assert_eq!(fs::read(l.p("upper/f")).unwrap(), data, "{op}");
    }
}

/// The copy-up's unsynced mark of the upper file at `path`, if it has one.
fn unsynced_mark(path: &Path) -> Option<Vec<u8>> {
    let dir = fs::File::open(path.parent().unwrap()).unwrap();
    durable::UNSYNCED_XATTRS.iter().find_map(|m| {
        Sys::default()
            .getxattr_at(dir.as_fd(), path.file_name().unwrap(), OsStr::new(m))
            .ok()
    })
}

/// Whether the layers' workdir holds a flag of unsynced copies (any daemon's).
fn has_flag(l: &Layers) -> bool {
    fs::read_dir(l.p("work")).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(durable::UNSYNCED_FLAG)
    })
}

fn set_unsynced_mark(path: &Path, value: &[u8]) {
    let dir = fs::File::open(path.parent().unwrap()).unwrap();
    let sys = Sys::default();
    assert!(
        durable::UNSYNCED_XATTRS.iter().any(|m| sys
            .setxattr_at(dir.as_fd(), path.file_name().unwrap(), OsStr::new(m), value)
            .is_ok()),
        "cannot mark {path:?}"
    );
}

#[test]
fn copy_ups_are_synced_in_the_background_and_unmarked() {
    let l = Layers::new("durable-background");
    fs::create_dir_all(l.p("lower/d")).unwrap();
    fs::write(l.p("lower/d/f"), b"old content").unwrap();
    let burst: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
    for n in &burst {
        fs::write(l.p("lower").join(n), n).unwrap();
    }
    fs::write(l.p("lower/g"), b"g").unwrap();
    // In the background whatever the machine's filesystem (see `durable::may_sync_later`).
    let ov = l.overlay_with(&["background_sync=1"]);
    let d = ov.lookup(ROOT_INO, OsStr::new("d")).unwrap();
    let f = ov.lookup(d.ino, OsStr::new("f")).unwrap();
    ov.setattr(f.ino, None, chmod_only(0o600)).unwrap();
    assert_eq!(fs::read(l.p("upper/d/f")).unwrap(), b"old content");
    assert!(
        has_flag(&l),
        "the flag is there while copies may be unsynced"
    );
    ov.syncer.as_ref().unwrap().flush();
    assert_eq!(
        unsynced_mark(&l.p("upper/d/f")),
        None,
        "synced: mark removed"
    );
    // Unasked: the syncer syncs once copy-ups pause (a burst of them, then a pause).
    for n in &burst {
        let b = ov.lookup(ROOT_INO, OsStr::new(n)).unwrap();
        ov.setattr(b.ino, None, chmod_only(0o600)).unwrap();
    }
    let t0 = std::time::Instant::now();
    while burst
        .iter()
        .any(|n| unsynced_mark(&l.p("upper").join(n)).is_some())
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "copies still unsynced 10 s after a burst of copy-ups"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A file of a mount that ends at once: the end syncs it and removes the flag.
    let g = ov.lookup(ROOT_INO, OsStr::new("g")).unwrap();
    ov.setattr(g.ino, None, chmod_only(0o600)).unwrap();
    drop(ov);
    assert_eq!(unsynced_mark(&l.p("upper/g")), None);
    assert!(!has_flag(&l));
}

#[test]
fn a_failed_background_sync_keeps_the_mark_until_the_user_syncs() {
    let l = Layers::new("durable-failed-sync");
    fs::write(l.p("lower/f"), b"old").unwrap();
    // In the background whatever the machine's filesystem (see `durable::may_sync_later`).
    let ov = l.overlay_with(&["background_sync=1"]);
    let f = ov.lookup(ROOT_INO, OsStr::new("f")).unwrap();
    // The syncer's fsync of the copy.
    ov.faults().inject("fsync", 1, Errno::IO);
    let h = ov.open(f.ino, libc::O_WRONLY).unwrap();
    ov.syncer.as_ref().unwrap().flush();
    ov.faults().clear();
    let mark = unsynced_mark(&l.p("upper/f")).expect("still marked after a failed sync");
    let (boot, layer, path) = durable::parse_mark(&mark).unwrap();
    assert_eq!(
        (Some(boot.to_string()), layer, path.as_path()),
        (durable::boot_id(), 0, Path::new("f"))
    );
    assert_eq!(ov.write(h, 3, b" new").unwrap(), 4);
    ov.fsync(h, true).unwrap();
    assert_eq!(
        unsynced_mark(&l.p("upper/f")),
        None,
        "a user's fsync unmarks"
    );
    ov.release(h);
    drop(ov);
    assert!(
        has_flag(&l),
        "after a failed sync the flag stays for the next mount"
    );
    let _again = l.overlay();
    assert!(!has_flag(&l));
    assert_eq!(fs::read(l.p("upper/f")).unwrap(), b"old new");
}

#[test]
fn a_mount_after_a_crash_syncs_this_boots_copies_and_restores_earlier_ones() {
    let l = Layers::new("durable-recover");
    fs::create_dir_all(l.p("lower/d")).unwrap();
    fs::create_dir_all(l.p("upper/d")).unwrap();
    fs::create_dir_all(l.p("upper/moved")).unwrap();
    let lower = vec![5u8; 300_000];
    for n in ["kept", "cut", "renamed", "gone"] {
        fs::write(l.p(&format!("lower/d/{n}")), &lower).unwrap();
    }
    fs::remove_file(l.p("lower/d/gone")).unwrap();
    let boot = durable::boot_id().unwrap();
    // A copy this boot (the daemon was killed): whole, kept.
    fs::write(l.p("upper/d/kept"), b"new").unwrap();
    set_unsynced_mark(&l.p("upper/d/kept"), format!("{boot} 0 d/kept").as_bytes());
    // Copies of an earlier boot (a power cut): the lower content again, wherever the copy
    // is now; the file's mode and times stay.
    fs::write(l.p("upper/d/cut"), b"").unwrap();
    set_unsynced_mark(&l.p("upper/d/cut"), b"earlier-boot 0 d/cut");
    fs::write(l.p("upper/moved/r"), &lower[..10]).unwrap();
    fs::set_permissions(
        l.p("upper/moved/r"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    set_unsynced_mark(&l.p("upper/moved/r"), b"earlier-boot 0 d/renamed");
    let mtime = fs::metadata(l.p("upper/moved/r")).unwrap().mtime();
    // One of an earlier boot that survived whole, with a user's write after it (made
    // durable by a sync(2), which never reaches the daemon): kept as it is.
    fs::write(l.p("lower/d/whole"), &lower).unwrap();
    let mut grown = lower.clone();
    grown.extend_from_slice(b"appended");
    fs::write(l.p("upper/d/whole"), &grown).unwrap();
    set_unsynced_mark(&l.p("upper/d/whole"), b"earlier-boot 0 d/whole");
    // One changed within the old content: not whole, the lower content again.
    fs::write(l.p("lower/d/changed"), &lower).unwrap();
    let mut changed = lower.clone();
    changed[1000] = 9;
    fs::write(l.p("upper/d/changed"), &changed).unwrap();
    set_unsynced_mark(&l.p("upper/d/changed"), b"earlier-boot 0 d/changed");
    // One whose lower file is gone: left as it is.
    fs::write(l.p("upper/d/gone"), b"partial").unwrap();
    set_unsynced_mark(&l.p("upper/d/gone"), b"earlier-boot 0 d/gone");
    fs::write(l.p("work").join(durable::UNSYNCED_FLAG), b"").unwrap();

    let ov = l.overlay();
    assert_eq!(fs::read(l.p("upper/d/kept")).unwrap(), b"new");
    assert_eq!(fs::read(l.p("upper/d/cut")).unwrap(), lower);
    assert_eq!(fs::read(l.p("upper/moved/r")).unwrap(), lower);
    let m = fs::metadata(l.p("upper/moved/r")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.mtime()), (0o640, mtime));
    assert_eq!(fs::read(l.p("upper/d/gone")).unwrap(), b"partial");
    assert_eq!(fs::read(l.p("upper/d/whole")).unwrap(), grown);
    assert_eq!(fs::read(l.p("upper/d/changed")).unwrap(), lower);
    for n in [
        "d/kept",
        "d/cut",
        "moved/r",
        "d/gone",
        "d/whole",
        "d/changed",
    ] {
        assert_eq!(unsynced_mark(&l.p(&format!("upper/{n}"))), None, "{n}");
    }
    assert!(!has_flag(&l));
    // Without the flag nothing is searched: a mark alone is not acted on.
    drop(ov);
    fs::write(l.p("upper/d/cut"), b"x").unwrap();
    set_unsynced_mark(&l.p("upper/d/cut"), b"earlier-boot 0 d/cut");
    let _ov = l.overlay();
    assert_eq!(fs::read(l.p("upper/d/cut")).unwrap(), b"x");
}

#[test]
fn a_mount_recovers_beside_a_daemon_still_draining() {
    // The daemon of the last mount of these layers may still be draining after its unmount
    // when the next mount starts: the new mount syncs that daemon's marked copies (this
    // boot) and removes its flag, and the old daemon's end finds its flag gone.
    let l = Layers::new("durable-draining");
    fs::write(l.p("lower/f"), b"lower").unwrap();
    fs::write(l.p("lower/g"), b"g").unwrap();
    let old = l.overlay_with(&["background_sync=1"]);
    let g = old.lookup(ROOT_INO, OsStr::new("g")).unwrap();
    old.setattr(g.ino, None, chmod_only(0o600)).unwrap();
    assert!(has_flag(&l));
    // Another daemon's flag and marked copy, as a daemon that is still draining leaves them.
    fs::write(l.p("upper/f"), b"lower+new").unwrap();
    let boot = durable::boot_id().unwrap();
    set_unsynced_mark(&l.p("upper/f"), format!("{boot} 0 f").as_bytes());
    fs::write(l.p("work/rustfuse-unsynced.999999999"), b"").unwrap();
    let new = l.overlay();
    assert!(!has_flag(&l), "every flag seen is removed");
    assert_eq!(unsynced_mark(&l.p("upper/f")), None);
    assert_eq!(fs::read(l.p("upper/f")).unwrap(), b"lower+new");
    drop(old);
    assert!(!has_flag(&l));
    drop(new);
    assert_eq!(unsynced_mark(&l.p("upper/g")), None);
}
