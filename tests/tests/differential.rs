//! Differential tests: every case runs on kernel overlayfs (the oracle, mounted with
//! `redirect_dir=off,index=off,metacopy=off`) and on the FUSE overlay under test
//! (`$RUSTFUSE_BIN`, default `target/debug/rustfuse`). Compared: the outcome (errno or result) of
//! every step, the merged view (type, mode, owner, size, content, symlink target, xattrs, link
//! counts, old mtimes), inode identity (st_ino pairs before/after the ops, stat vs readdir,
//! across unmount+mount) and the normalized upper directory.
//!
//! Layers here only use what kernel overlayfs understands (char 0/0 whiteouts and
//! `trusted.overlay.opaque`); the `.wh.` formats are covered in `interop.rs`.

use rustfuse_tests::env::scratch;
use rustfuse_tests::layers::{Layer, Tree};
use rustfuse_tests::ops::build::*;
use rustfuse_tests::ops::{self, Op};
use rustfuse_tests::scenario::{Fs, Pair, Scenario, snap};
use rustfuse_tests::snapshot::Snapshot;

/// Three lower layers exercising merging, whiteouts and opaque directories.
fn base() -> Tree {
    Tree::new()
        .lower(
            Layer::new()
                .file("a", "top a")
                .file("d/x", "x from top")
                .whiteout("d/gone")
                .opaque_dir("o")
                .file("o/new", "new in opaque")
                .file("m/top", "m top")
                .file("sparse", vec![0u8; 0])
                .xattr("user.top", "1"),
        )
        .lower(
            Layer::new()
                .file("a", "middle a")
                .file("b", "bottom b")
                .mode(0o600)
                .owner(1000, 1000)
                .xattr("user.k", "v")
                .xattr("trusted.t", "tv")
                .file("d/gone", "should be hidden")
                .file("d/y", "y from middle")
                .symlink("s", "a")
                .symlink("dangling", "nowhere")
                .file("o/old", "hidden by opaque")
                .file("m/mid", "m mid")
                .fifo("p")
                .chardev("cdev", 1, 3)
                .dir("e")
                .mode(0o711)
                .owner(7, 8)
                .dir("xd")
                .mode(0o750)
                .owner(5, 6)
                .xattr("user.dir", "d")
                .file("xd/sub/deep", "deep")
                .mode(0o640)
                .owner(3, 4)
                .whiteout("w")
                .file("big", big_content())
                .file("exec", "#!/bin/sh\n")
                .mode(0o4755),
        )
        .lower(
            Layer::new()
                .file("m/bottom", "m bottom")
                .file("d/z", "z from bottom")
                .file("w", "hidden by middle whiteout")
                .dir("e")
                .file("ed/only", "only file of ed"),
        )
}

fn big_content() -> Vec<u8> {
    (0..200_000u32).map(|i| (i % 251) as u8).collect()
}

fn check(name: &'static str, ops: Vec<Op>) {
    Scenario::new(name, base(), ops).check();
}

// ---------------------------------------------------------------- read path

#[test]
fn read_lookup_getattr_read() {
    check(
        "read",
        vec![
            read("a"),
            read("b"),
            read("d/x"),
            read("d/y"),
            read("d/z"),
            read("big"),
            stat("a"),
            stat("b"),
            stat("p"),
            stat("cdev"),
            stat("e"),
            stat("xd/sub/deep"),
            read("nonexistent"),
            read("a/notadir"),
            read("d"),
        ],
    );
}

#[test]
fn read_whiteouts_and_opaque() {
    check(
        "whiteout-opaque",
        vec![
            stat("d/gone"),
            read("d/gone"),
            stat("w"),
            stat("o/old"),
            read("o/new"),
            readdir("o"),
            readdir("d"),
            readdir("m"),
            readdir(""),
            getxattr("o", "trusted.overlay.opaque"),
            listxattr("o"),
        ],
    );
}

#[test]
fn read_readdir_merged() {
    check(
        "readdir",
        vec![
            readdir(""),
            readdir("d"),
            readdir("m"),
            readdir("e"),
            readdir("ed"),
            readdir("xd"),
            readdir("xd/sub"),
            readdir("a"),
        ],
    );
}

#[test]
fn read_readlink() {
    check(
        "readlink",
        vec![
            readlink("s"),
            readlink("dangling"),
            readlink("a"),
            read("s"),
            read("dangling"),
            stat("dangling"),
        ],
    );
}

#[test]
fn read_xattrs() {
    check(
        "xattr-read",
        vec![
            getxattr("b", "user.k"),
            getxattr("b", "trusted.t"),
            getxattr("b", "user.missing"),
            listxattr("b"),
            listxattr("sparse"),
            getxattr("xd", "user.dir"),
            listxattr("s"),
            getxattr("a", "trusted.overlay.origin"),
        ],
    );
}

#[test]
fn read_statfs() {
    check(
        "statfs",
        vec![
            Op::Statfs { path: "".into() },
            Op::Statfs { path: "d".into() },
        ],
    );
}

#[test]
fn read_only_mount_erofs() {
    Scenario::new(
        "readonly",
        base(),
        vec![
            read("a"),
            readdir("d"),
            write("a", "x"),
            write("new", "x"),
            mkdir("nd"),
            unlink("a"),
            rmdir("e"),
            chmod("a", 0o600),
            setxattr("a", "user.x", "y"),
            rename("a", "a2"),
            symlink("a", "sl"),
            truncate("a", 0),
            Op::AccessWrite { path: "a".into() },
        ],
    )
    .readonly()
    .check();
}

// ---------------------------------------------------------------- create, mkdir, mknod

#[test]
fn write_create() {
    check(
        "create",
        vec![
            create("newfile"),
            create("newfile"),
            create("a"),
            create("d/new"),
            create("xd/sub/new"),
            create("d/gone"),
            create("w"),
            create("nodir/x"),
            Op::Create {
                path: "modefile".into(),
                mode: 0o4711,
            },
            stat("newfile"),
            stat("d/gone"),
            readdir("d"),
        ],
    );
}

#[test]
fn write_mkdir() {
    check(
        "mkdir",
        vec![
            mkdir("nd"),
            mkdir("nd"),
            mkdir("d"),
            mkdir("d/gone"),
            create("d/gone/f"),
            readdir("d/gone"),
            mkdir("w"),
            readdir("w"),
            mkdir("xd/sub/nd2"),
            mkdir("nodir/x"),
            Op::Mkdir {
                path: "m700".into(),
                mode: 0o700,
            },
            stat("m700"),
        ],
    );
}

#[test]
fn write_mknod() {
    check(
        "mknod",
        vec![
            mkfifo("fifo"),
            mkfifo("p"),
            Op::MknodSock {
                path: "sock".into(),
            },
            Op::MknodChar {
                path: "null2".into(),
                major: 1,
                minor: 3,
            },
            mkfifo("d/gone"),
            stat("fifo"),
            stat("sock"),
            stat("null2"),
        ],
    );
}

#[test]
fn write_symlink() {
    check(
        "symlink",
        vec![
            symlink("a", "s2"),
            symlink("x", "s"),
            symlink("/abs/target", "d/abs"),
            symlink("d/x", "d/gone"),
            readlink("s2"),
            readlink("d/gone"),
            read("s2"),
        ],
    );
}

// ---------------------------------------------------------------- links, unlink, rmdir

#[test]
fn write_link() {
    check(
        "link",
        vec![
            link("a", "a-link"),
            stat("a"),
            stat("a-link"),
            append("a-link", "+"),
            read("a"),
            create("u"),
            link("u", "u2"),
            link("u", "d/u3"),
            stat("u"),
            link("a", "b"),
            link("e", "e2"),
            link("missing", "x"),
        ],
    );
}

#[test]
fn write_hardlink_copy_up() {
    // h1 and h2 are one inode in a lower layer; writing through one name copies it up.
    // Kernel overlayfs with index=on (the oracle here) keeps the link: every name shows the
    // one inode, the new content and the true nlink, which unlink lowers for the others
    // (tests/tests/hardlinks.rs has the rest).
    let tree = Tree::new().lower(
        Layer::new()
            .file("h1", "shared")
            .owner(1, 1)
            .link("h2", "h1")
            .file("d/h3", "x")
            .link("d/h4", "d/h3"),
    );
    Scenario::new(
        "hardlink-copyup",
        tree,
        vec![
            stat("h1"),
            stat("h2"),
            append("h1", "more"),
            read("h1"),
            read("h2"),
            stat("h1"),
            stat("h2"),
            chmod("d/h3", 0o600),
            stat("d/h4"),
            unlink("d/h3"),
            stat("d/h4"),
        ],
    )
    .oracle(Fs::kernel_index())
    .check();
}

#[test]
fn write_unlink() {
    check(
        "unlink",
        vec![
            unlink("a"),
            unlink("a"),
            stat("a"),
            unlink("d/y"),
            unlink("d/z"),
            readdir("d"),
            unlink("s"),
            unlink("p"),
            unlink("e"),
            create("up"),
            unlink("up"),
            create("a"),
            read("a"),
        ],
    );
}

#[test]
fn write_rmdir() {
    check(
        "rmdir",
        vec![
            rmdir("e"),
            rmdir("e"),
            rmdir("d"),
            rmdir("m"),
            rmdir("a"),
            mkdir("nd"),
            rmdir("nd"),
            unlink("ed/only"),
            rmdir("ed"),
            stat("ed"),
            mkdir("ed"),
            readdir("ed"),
        ],
    );
}

#[test]
fn write_rm_rf_then_mkdir() {
    // Dockerfile `rm -rf DIR && mkdir DIR` on a lower directory: the old entries must not
    // come back (fuse-overlayfs #324/#478).
    check(
        "rm-rf-mkdir",
        vec![
            unlink("m/top"),
            unlink("m/mid"),
            unlink("m/bottom"),
            rmdir("m"),
            mkdir("m"),
            readdir("m"),
            create("m/fresh"),
            readdir("m"),
            unlink("xd/sub/deep"),
            rmdir("xd/sub"),
            rmdir("xd"),
            mkdir("xd"),
            readdir("xd"),
        ],
    );
}

// ---------------------------------------------------------------- rename

#[test]
fn write_rename_files() {
    check(
        "rename-files",
        vec![
            rename("a", "a2"),
            read("a2"),
            stat("a"),
            rename("d/x", "x-moved"),
            rename("d/y", "d/x"),
            readdir("d"),
            create("n1"),
            rename("n1", "d/gone"),
            rename("missing", "x"),
            rename("b", "e"),
            rename("e", "b"),
            rename("s", "s-moved"),
            readlink("s-moved"),
        ],
    );
}

#[test]
fn write_rename_noreplace_exchange() {
    check(
        "rename-flags",
        vec![
            rename_noreplace("a", "sparse"),
            rename_noreplace("a", "a-new"),
            read("a-new"),
            rename_exchange("sparse", "d/x"),
            read("sparse"),
            read("d/x"),
            rename_exchange("b", "nonexistent"),
            create("u1"),
            create("u2"),
            write("u1", "one"),
            rename_exchange("u1", "u2"),
            read("u2"),
        ],
    );
}

#[test]
fn write_rename_dirs() {
    check(
        "rename-dirs",
        vec![
            rename("d", "d2"),
            rename("e", "e2"),
            rename("xd/sub", "sub2"),
            mkdir("nd"),
            create("nd/f"),
            rename("nd", "nd2"),
            readdir("nd2"),
            rename("nd2", "d/nd3"),
            mkdir("empty"),
            rename("empty", "nd4"),
            rename("nd4", "m"),
            rename_exchange("d", "m"),
        ],
    );
}

// ---------------------------------------------------------------- setattr

#[test]
fn write_chmod_chown_utimens_copy_up() {
    check(
        "setattr",
        vec![
            chmod("a", 0o640),
            chmod("xd/sub/deep", 0o600),
            chmod("d", 0o700),
            chmod("exec", 0o755),
            chown("b", 2000, 2001),
            chown("s", 3, 3),
            chown("e", 9, 9),
            utimens("d/x", 1_100_000_000, 1_200_000_000),
            utimens("s", 1_100_000_000, 1_300_000_000),
            chmod("missing", 0o600),
            stat("a"),
            stat("b"),
        ],
    );
}

#[test]
fn write_truncate() {
    check(
        "truncate",
        vec![
            truncate("a", 3),
            read("a"),
            truncate("d/x", 100),
            stat("d/x"),
            truncate("big", 0),
            truncate("d", 0),
            truncate("missing", 0),
        ],
    );
}

#[test]
fn write_data_copy_up() {
    check(
        "write-data",
        vec![
            write_at("a", 2, "XY"),
            read("a"),
            append("d/y", " appended"),
            write("d/z", "replaced"),
            write_at("big", 150_000, "in the middle of big"),
            write_at("xd/sub/deep", 10, "!"),
            read("xd/sub/deep"),
            stat("xd/sub"),
            stat("xd"),
        ],
    );
}

// ---------------------------------------------------------------- xattrs

#[test]
fn write_xattrs() {
    check(
        "xattr-write",
        vec![
            setxattr("a", "user.new", "1"),
            getxattr("a", "user.new"),
            removexattr("b", "user.k"),
            listxattr("b"),
            removexattr("b", "user.never"),
            setxattr("d", "user.onDir", "x"),
            Op::SetXattrCreate {
                path: "sparse".into(),
                name: "user.top".into(),
                value: b"2".to_vec(),
            },
            setxattr("sparse", "user.top", "3"),
            setxattr("a", "trusted.mine", "t"),
            listxattr("a"),
        ],
    );
}

// ---------------------------------------------------------------- fallocate, sync, copy, seek, mmap

#[test]
fn write_fallocate() {
    check(
        "fallocate",
        vec![
            Op::Fallocate {
                path: "a".into(),
                punch_hole: false,
                keep_size: false,
                offset: 0,
                len: 8192,
            },
            stat("a"),
            Op::Fallocate {
                path: "big".into(),
                punch_hole: true,
                keep_size: true,
                offset: 4096,
                len: 8192,
            },
            read("big"),
            Op::Fallocate {
                path: "d/x".into(),
                punch_hole: false,
                keep_size: true,
                offset: 0,
                len: 65536,
            },
            stat("d/x"),
        ],
    );
}

#[test]
fn write_fsync_copy_file_range_seek() {
    check(
        "sync-copy-seek",
        vec![
            Op::WriteSync {
                path: "synced".into(),
                data: b"synced data".to_vec(),
                datasync: false,
            },
            Op::WriteSync {
                path: "a".into(),
                data: b"datasynced".to_vec(),
                datasync: true,
            },
            Op::CopyFileRange {
                src: "big".into(),
                dst: "big-copy".into(),
            },
            Op::CopyFileRange {
                src: "d/x".into(),
                dst: "d/y".into(),
            },
            create("holes"),
            write_at("holes", 1 << 20, "data after a hole"),
            Op::Seek {
                path: "holes".into(),
                hole: false,
                offset: 0,
            },
            Op::Seek {
                path: "holes".into(),
                hole: true,
                offset: 0,
            },
            Op::Seek {
                path: "a".into(),
                hole: true,
                offset: 0,
            },
            Op::Seek {
                path: "a".into(),
                hole: false,
                offset: 1000,
            },
        ],
    );
}

#[test]
fn write_shared_mmap() {
    check(
        "mmap",
        vec![
            Op::MmapWrite {
                path: "big".into(),
                offset: 100,
                data: b"mmapped".to_vec(),
            },
            Op::MmapWrite {
                path: "d/x".into(),
                offset: 0,
                data: b"X".to_vec(),
            },
            read("d/x"),
        ],
    );
}

#[test]
fn write_open_unlink_and_rename() {
    check(
        "open-unlink",
        vec![
            Op::OpenUnlinkRw {
                path: "a".into(),
                data: b" +written after unlink".to_vec(),
            },
            stat("a"),
            create("u"),
            Op::OpenUnlinkRw {
                path: "u".into(),
                data: b"upper only".to_vec(),
            },
            Op::OpenRenameRead {
                path: "d/x".into(),
                to: "x-renamed".into(),
            },
            readdir("d"),
        ],
    );
}

// ---------------------------------------------------------------- compat-doc rules (not kernel)

/// Mounts `base()` with the binary under test, runs `ops`, returns outcomes and the views before
/// the ops and after a remount.
fn under_test_only(name: &str, steps: &[Op]) -> Option<(Vec<ops::Outcome>, Snapshot, Snapshot)> {
    if !rustfuse_tests::env::require_bin_under_test() {
        return None;
    }
    let s = scratch(name);
    let m = base().materialize(s.path()).expect("materialize");
    let fs = Fs::under_test();
    let g = fs.mount(&m).expect("mount");
    let before = snap(g.root());
    let out = ops::run(g.root(), steps);
    g.unmount().expect("unmount");
    let g = fs.mount(&m).expect("remount");
    let after = snap(g.root());
    g.unmount().expect("unmount");
    Some((out, before, after))
}

#[test]
fn names_starting_wh_are_refused() {
    // Kernel overlayfs accepts `.wh.` names; fuse-overlayfs-compatible layers would read them
    // as whiteouts, so the compat notes say they are refused. fuse-overlayfs 1.10 refuses
    // `.wh.foo` but accepts `mkdir .wh..wh..opq`, which makes the root opaque after a remount.
    let ops = [
        create(".wh.foo"),
        mkdir(".wh..wh..opq"),
        create("d/.wh.x"),
        rename("a", ".wh.b"),
        symlink("a", ".wh.s"),
    ];
    let Some((out, before, after)) = under_test_only("wh-names", &ops) else {
        return;
    };
    let mut failures = Vec::new();
    for (op, o) in ops.iter().zip(&out) {
        if o.is_ok() {
            failures.push(format!("{op:?} succeeded"));
        }
    }
    for p in before.entries.keys() {
        if !after.entries.contains_key(p) {
            failures.push(format!("{p} disappeared after remount"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn internal_xattrs_hidden() {
    // Compat notes: trusted.overlay.*, user.overlay.*, user.fuseoverlayfs.* are hidden:
    // getxattr ENODATA, set/remove EPERM, not listed. (Kernel 6.7+ overlayfs instead escapes
    // trusted.overlay.* for nested overlays, so this is not a differential case.)
    let mut ops = Vec::new();
    for name in [
        "trusted.overlay.opaque",
        "user.overlay.opaque",
        "user.fuseoverlayfs.origin",
    ] {
        ops.push(getxattr("o", name));
        ops.push(setxattr("a", name, "y"));
        ops.push(removexattr("o", name));
    }
    ops.push(listxattr("o"));
    ops.push(listxattr("a"));
    let Some((out, _, after)) = under_test_only("internal-xattrs", &ops) else {
        return;
    };
    let mut failures = Vec::new();
    for (i, (op, o)) in ops.iter().zip(&out).enumerate() {
        let want: Result<&str, &str> = match (i % 3, i >= 9) {
            (_, true) => Ok(""),
            (0, _) => Err("ENODATA"),
            _ => Err("EPERM"),
        };
        let got = o.as_ref().map(String::as_str).map_err(String::as_str);
        if got != want {
            failures.push(format!("{op:?}: got {}, want {want:?}", ops::show(o)));
        }
    }
    if after.entries.contains_key("o/old") {
        failures.push("o lost its opaque marker".into());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------- inode numbers

#[test]
fn inode_stable_across_copy_up_and_remount() {
    // Snapshots before/after record st_ino; `Pair::finish` compares (before, after) pairs with
    // the kernel's and the views after a remount.
    check(
        "inodes",
        vec![
            chmod("a", 0o600),
            append("d/y", "x"),
            setxattr("d/z", "user.a", "b"),
            rename("sparse", "sparse2"),
            mkdir("nd"),
            create("nd/f"),
            link("nd/f", "nd/g"),
        ],
    );
}

#[test]
fn many_lower_layers() {
    let mut tree = Tree::new();
    for i in 0..12 {
        tree = tree.lower(
            Layer::new()
                .file(&format!("dir/f{i}"), format!("layer {i}"))
                .file("dir/shadowed", format!("layer {i}"))
                .file(&format!("l{i}"), "x"),
        );
    }
    Scenario::new(
        "many-layers",
        tree,
        vec![
            readdir("dir"),
            read("dir/shadowed"),
            read("dir/f11"),
            unlink("dir/f5"),
            write("dir/f0", "changed"),
            readdir("dir"),
        ],
    )
    .check();
}

#[test]
fn wide_directory() {
    let mut l = Layer::new();
    for i in 0..2000 {
        l = l.file(&format!("wide/f{i:05}"), "");
    }
    Scenario::new(
        "wide",
        Tree::new().lower(l),
        vec![
            stat("wide/f01999"),
            unlink("wide/f00000"),
            create("wide/new"),
        ],
    )
    .check();
}

// ---------------------------------------------------------------- property-based

mod random {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestCaseError};

    const NAMES: &[&str] = &[
        "a", "b", "d", "d/x", "d/y", "d/gone", "m", "m/top", "m/bottom", "e", "s", "nd", "nd/f",
        "o/old", "o/new", "w",
    ];

    fn name() -> impl Strategy<Value = String> {
        proptest::sample::select(NAMES).prop_map(str::to_string)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            name().prop_map(|p| create(&p)),
            (name(), "[a-z]{0,6}").prop_map(|(p, d)| write(&p, &d)),
            (name(), 0u64..8, "[A-Z]{1,3}").prop_map(|(p, o, d)| write_at(&p, o, &d)),
            (name(), 0u64..10).prop_map(|(p, l)| truncate(&p, l)),
            name().prop_map(|p| mkdir(&p)),
            name().prop_map(|p| mkfifo(&p)),
            (name(), name()).prop_map(|(t, p)| symlink(&t, &p)),
            (name(), name()).prop_map(|(a, b)| link(&a, &b)),
            name().prop_map(|p| unlink(&p)),
            name().prop_map(|p| rmdir(&p)),
            (name(), name()).prop_map(|(a, b)| rename(&a, &b)),
            (name(), name()).prop_map(|(a, b)| rename_noreplace(&a, &b)),
            (name(), name()).prop_map(|(a, b)| rename_exchange(&a, &b)),
            (
                name(),
                prop_oneof![Just(0o600u32), Just(0o755), Just(0o4711)]
            )
                .prop_map(|(p, m)| chmod(&p, m)),
            (name(), 0u32..3).prop_map(|(p, u)| chown(&p, u * 1000, u)),
            (name(), "[a-c]").prop_map(|(p, n)| setxattr(&p, &format!("user.{n}"), "v")),
            (name(), "[a-c]").prop_map(|(p, n)| removexattr(&p, &format!("user.{n}"))),
            name().prop_map(|p| readdir(&p)),
            name().prop_map(|p| read(&p)),
            name().prop_map(|p| stat(&p)),
        ]
    }

    fn tree() -> Tree {
        Tree::new()
            .lower(
                Layer::new()
                    .file("a", "top a")
                    .file("d/x", "x")
                    .whiteout("d/gone")
                    .opaque_dir("o")
                    .file("o/new", "new")
                    .file("m/top", "t"),
            )
            .lower(
                Layer::new()
                    .file("a", "low a")
                    .file("b", "b")
                    .xattr("user.a", "1")
                    .file("d/y", "y")
                    .file("d/gone", "g")
                    .file("o/old", "old")
                    .file("m/bottom", "b")
                    .dir("e")
                    .symlink("s", "a")
                    .file("w", "w"),
            )
    }

    /// Directory paths for the directory-rename variant: every directory of [`tree_dirs`] and
    /// places below them (renames into subdirectories, over files, onto themselves).
    const DIR_NAMES: &[&str] = &[
        "d", "d/sub", "d/sub/f", "d/x", "m", "m/d", "m/top", "nd", "e", "o", "r", "r/d", "r/d/f",
        "a",
    ];

    fn dir_name() -> impl Strategy<Value = String> {
        proptest::sample::select(DIR_NAMES).prop_map(str::to_string)
    }

    /// [`op`] and directory renames, for kernel overlayfs `redirect_dir=on` against the binary
    /// under test with `-o redirect_dir=on`. `op` itself is unchanged: the same seed gives the
    /// same sequences to [`random_op_sequences_match_kernel`].
    fn op_with_dir_renames() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => op(),
            3 => (dir_name(), dir_name()).prop_map(|(a, b)| rename(&a, &b)),
            1 => (dir_name(), dir_name()).prop_map(|(a, b)| rename_noreplace(&a, &b)),
            1 => (dir_name(), dir_name()).prop_map(|(a, b)| rename_exchange(&a, &b)),
            1 => dir_name().prop_map(|p| readdir(&p)),
            1 => dir_name().prop_map(|p| rmdir(&p)),
            1 => dir_name().prop_map(|p| unlink(&p)),
            1 => dir_name().prop_map(|p| mkdir(&p)),
            1 => dir_name().prop_map(|p| create(&p)),
            1 => (dir_name(), "[a-z]{0,4}").prop_map(|(p, d)| write(&p, &d)),
        ]
    }

    /// [`tree`] with a bottom layer that gives directories more depth.
    fn tree_dirs() -> Tree {
        tree().lower(
            Layer::new()
                .file("d/sub/f", "sub f")
                .file("m/d/f", "m d f")
                .file("r/d/f", "r d f")
                .file("r/top", "r top")
                .dir("e"),
        )
    }

    fn run_case(ops: &[Op]) -> Result<(), TestCaseError> {
        run_case_on(ops, &tree(), Fs::Kernel, Fs::under_test())
    }

    fn run_case_on(ops: &[Op], tree: &Tree, a: Fs, b: Fs) -> Result<(), TestCaseError> {
        let mut pair = Pair::new("prop", tree, a, b).map_err(TestCaseError::fail)?;
        for op in ops {
            if let Some(m) = pair.step(op) {
                let table = pair.steps_table();
                return Err(TestCaseError::fail(format!("{m}\nsteps so far:\n{table}")));
            }
        }
        let table = pair.steps_table();
        let f = pair.finish(false);
        if !f.failures.is_empty() {
            return Err(TestCaseError::fail(format!(
                "steps:\n{table}\n{}",
                f.failures.join("\n\n")
            )));
        }
        Ok(())
    }

    fn config() -> Config {
        let cases = rustfuse_tests::env::env_number("RUSTFUSE_PROPTEST_CASES").unwrap_or(32);
        Config {
            cases,
            max_shrink_iters: 64,
            failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
                "proptest-regressions",
            ))),
            rng_seed: RngSeed::Fixed(0x7275_7374_6675_7365),
            ..Config::default()
        }
    }

    #[test]
    fn random_op_sequences_match_kernel() {
        if !rustfuse_tests::env::require_bin_under_test() {
            return;
        }
        proptest!(config(), |(ops in proptest::collection::vec(op(), 1..14))| {
            run_case(&ops)?;
        });
    }

    #[test]
    fn random_dir_rename_sequences_match_kernel_redirect_dir_on() {
        if !rustfuse_tests::env::require_bin_under_test() {
            return;
        }
        proptest!(config(), |(ops in proptest::collection::vec(op_with_dir_renames(), 1..14))| {
            run_case_on(
                &ops,
                &tree_dirs(),
                Fs::kernel_redirect("on"),
                Fs::under_test_redirect("on"),
            )?;
        });
    }
}
