//! `-o metacopy=on`: a change of mode, owner, times or xattrs of a lower file copies up its
//! metadata only, in kernel overlayfs's format (an upper file of the same size with no data,
//! marked `trusted.overlay.metacopy`), and the data follows at the first open for writing.
//! Checked against kernel overlayfs mounted with `metacopy=on` (the oracle): the outcomes, the
//! merged view, the upper layer and which of its files are metacopies; and each one reading
//! the layers the other wrote.

use std::path::Path;

use rustfuse_tests::env::{bin_under_test, require_bin_under_test, scratch};
use rustfuse_tests::layers::{Layer, Tree};
use rustfuse_tests::mount::{Mount, Stack};
use rustfuse_tests::ops::build::*;
use rustfuse_tests::ops::{self, Op};
use rustfuse_tests::scenario::{Fs, Pair, snap};
use rustfuse_tests::snapshot::diff;
use rustfuse_tests::upper::raw_xattrs;

/// Kernel overlayfs needs redirect_dir for metacopy; index stays off as in the other tests.
const KERNEL_METACOPY: &str = "redirect_dir=on,index=off,metacopy=on";

fn under_test_metacopy() -> Fs {
    Fs::Fuse {
        bin: bin_under_test(),
        opts: vec!["metacopy=on".into()],
        env: Vec::new(),
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn tree() -> Tree {
    let mut top = Layer::new().file("m/shadow", "shadow from the top lower layer");
    let mut low = Layer::new();
    for (i, name) in [
        "chmod", "chown", "times", "xattr", "rmx", "append", "trunc", "trunc0", "ren", "mv", "unl",
        "exec",
    ]
    .iter()
    .enumerate()
    {
        low = low.file(&format!("m/{name}"), pattern(100_000 + i * 4096, i as u8));
        if *name == "rmx" {
            low = low.xattr("user.r", "remove me");
        }
        if *name == "exec" {
            low = low.mode(0o4755);
        }
    }
    low = low.file("m/shadow", "shadowed, never read").owner(3, 4);
    top = top.owner(5, 6);
    Tree::new().lower(top).lower(low)
}

/// Metadata changes and renames, then writes of some of the files.
fn ops_list() -> Vec<Op> {
    vec![
        chmod("m/chmod", 0o600),
        read("m/chmod"),
        chown("m/chown", 12, 34),
        utimens("m/times", 1_000_000, 1_200_000),
        setxattr("m/xattr", "user.new", "1"),
        removexattr("m/rmx", "user.r"),
        chmod("m/shadow", 0o640),
        read("m/shadow"),
        chown("m/exec", 1, 1),
        stat("m/exec"),
        chmod("m/append", 0o600),
        append("m/append", "+more"),
        read("m/append"),
        chmod("m/trunc", 0o600),
        truncate("m/trunc", 3),
        read("m/trunc"),
        chmod("m/trunc0", 0o600),
        truncate("m/trunc0", 0),
        chmod("m/ren", 0o600),
        rename("m/ren", "m/ren2"),
        read("m/ren2"),
        rename("m/mv", "mv-top"),
        read("mv-top"),
        chmod("m/unl", 0o600),
        unlink("m/unl"),
    ]
}

/// Relative paths of the regular files in `upper` marked a metacopy.
fn metacopies(upper: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![upper.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && raw_xattrs(&p).contains_key("trusted.overlay.metacopy") {
                let rel = p.strip_prefix(upper).unwrap().display().to_string();
                // No data (st_blocks may count an xattr block).
                let f = std::fs::File::open(&p).unwrap();
                let first = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0));
                assert_eq!(
                    first.err(),
                    Some(rustix::io::Errno::NXIO),
                    "{rel}: holds data"
                );
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn metadata_changes_copy_up_metadata_only_as_kernel_overlayfs_does() {
    if !require_bin_under_test() {
        return;
    }
    let mut pair = Pair::new(
        "metacopy-diff",
        &tree(),
        Fs::KernelWith(KERNEL_METACOPY.into()),
        under_test_metacopy(),
    )
    .unwrap_or_else(|e| panic!("set-up: {e}"));
    for op in ops_list() {
        pair.step(&op);
    }
    let table = pair.steps_table();
    let kernel = metacopies(pair.a.mat.stack.upper.as_ref().unwrap());
    let ours = metacopies(pair.b.mat.stack.upper.as_ref().unwrap());
    let mut want: Vec<String> = [
        "chmod", "chown", "exec", "ren2", "rmx", "shadow", "times", "xattr",
    ]
    .iter()
    .map(|n| format!("m/{n}"))
    .collect();
    want.push("mv-top".into());
    assert_eq!(
        ours, want,
        "the files with metadata changes only are metacopies\n{table}"
    );
    assert_eq!(
        kernel, ours,
        "kernel overlayfs made the same metacopies\n{table}"
    );
    let f = pair.finish(true);
    for n in &f.notes {
        eprintln!("note: {n}");
    }
    assert!(
        f.failures.is_empty(),
        "differences from kernel overlayfs (metacopy=on):\nsteps:\n{table}\n{}",
        f.failures.join("\n\n")
    );
}

/// Each side writes its metacopies; then the other side reads those layers (the same stack,
/// and the upper stacked as the topmost lower layer, as a committed layer is).
#[test]
fn metacopies_read_the_same_through_kernel_overlayfs_and_rustfuse() {
    if !require_bin_under_test() {
        return;
    }
    let s = scratch("metacopy-interop");
    let meta_ops: Vec<Op> = ops_list()
        .into_iter()
        .filter(|o| {
            matches!(
                o,
                Op::Chmod { .. } | Op::Chown { .. } | Op::Utimens { .. } | Op::Rename { .. }
            )
        })
        .chain([
            setxattr("m/xattr", "user.new", "1"),
            removexattr("m/rmx", "user.r"),
        ])
        .collect();
    let kernel = |stack: &Stack, mnt: &Path| Mount::kernel_with(stack, mnt, KERNEL_METACOPY);
    let ours =
        |stack: &Stack, mnt: &Path| Mount::fuse(&bin_under_test(), stack, &["metacopy=on"], mnt);
    // The default (metacopy off) reads an upper layer's marks too.
    let ours_default = |stack: &Stack, mnt: &Path| Mount::fuse(&bin_under_test(), stack, &[], mnt);
    type MountFn<'a> = &'a dyn Fn(&Stack, &Path) -> Result<Mount, String>;
    let cases: [(&str, MountFn, &str, MountFn); 3] = [
        ("kernel", &kernel, "rustfuse", &ours_default),
        ("rustfuse", &ours, "kernel", &kernel),
        ("rustfuse", &ours, "rustfuse (metacopy off)", &ours_default),
    ];
    let mut failures = Vec::new();
    for (i, (wn, writer, rn, reader)) in cases.iter().enumerate() {
        let m = tree().materialize(&s.path().join(format!("c{i}"))).unwrap();
        let w = writer(&m.stack, &m.mnt).unwrap_or_else(|e| panic!("{wn}: {e}"));
        for (op, out) in meta_ops.iter().zip(ops::run(w.root(), &meta_ops)) {
            assert!(out.is_ok(), "{wn}: {op:?}: {}", ops::show(&out));
        }
        let written = snap(w.root());
        w.unmount().unwrap();
        assert!(
            !metacopies(m.stack.upper.as_ref().unwrap()).is_empty(),
            "{wn} wrote no metacopy"
        );
        let r = reader(&m.stack, &m.mnt).unwrap_or_else(|e| panic!("{rn}: {e}"));
        let got = snap(r.root());
        r.unmount().unwrap();
        let d = diff(&written, wn, &got, rn);
        if !d.is_empty() {
            failures.push(format!(
                "written by {wn}, read by {rn}:\n  {}",
                d.join("\n  ")
            ));
        }
        // The upper as a committed layer: read-only stack, metacopy on where it is read.
        let mut lowers = vec![m.stack.upper.clone().unwrap()];
        lowers.extend(m.stack.lowers.iter().cloned());
        let ro = Stack {
            lowers,
            upper: None,
            work: None,
        };
        let r = if rn.starts_with("kernel") {
            Mount::kernel_with(&ro, &m.mnt, "metacopy=on,redirect_dir=follow")
        } else {
            Mount::fuse(&bin_under_test(), &ro, &["metacopy=on"], &m.mnt)
        }
        .unwrap_or_else(|e| panic!("{rn} read-only: {e}"));
        let got = snap(r.root());
        r.unmount().unwrap();
        let d = diff(&written, wn, &got, rn);
        if !d.is_empty() {
            failures.push(format!(
                "written by {wn}, stacked below and read by {rn}:\n  {}",
                d.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A renamed metacopy keeps its data below (a redirect says where, read after a remount and
/// by kernel overlayfs), and its data comes up with the times it had at the first write; a
/// hard link brings the data up first.
#[test]
fn renamed_metacopies_follow_their_redirect_and_links_bring_the_data_up() {
    if !require_bin_under_test() {
        return;
    }
    let tree = Tree::new().lower(
        Layer::new()
            .file("d/ren", pattern(70_000, 1))
            .mtime(1_000_000)
            .file("d/lnk", pattern(50_000, 2))
            .mtime(1_100_000)
            .file("d/w", pattern(60_000, 3))
            .mtime(1_200_000)
            .dir("e"),
    );
    let s = scratch("metacopy-rename");
    let m = tree.materialize(&s.path().join("r")).unwrap();
    let ours = |extra: &[&str]| Mount::fuse(&bin_under_test(), &m.stack, extra, &m.mnt).unwrap();
    let w = ours(&["metacopy=on"]);
    let steps = [
        chmod("d/ren", 0o600),
        rename("d/ren", "e/ren2"),
        chown("d/lnk", 7, 7),
        link("d/lnk", "d/lnk2"),
        rename("d/w", "w2"),
        append("w2", "!"),
    ];
    for (op, out) in steps.iter().zip(ops::run(w.root(), &steps)) {
        assert!(out.is_ok(), "{op:?}: {}", ops::show(&out));
    }
    let before = snap(w.root());
    w.unmount().unwrap();
    let upper = m.stack.upper.as_ref().unwrap();
    assert_eq!(
        metacopies(upper),
        ["e/ren2"],
        "only the renamed file kept its data below"
    );
    let redirect = raw_xattrs(&upper.join("e/ren2"))
        .get("trusted.overlay.redirect")
        .cloned();
    assert_eq!(redirect.as_deref(), Some(&b"/d/ren"[..]));
    let mut w2 = pattern(60_000, 3);
    w2.push(b'!');
    for (p, want, mtime) in [("d/lnk", pattern(50_000, 2), 1_100_000), ("w2", w2, -1)] {
        let md = std::fs::metadata(upper.join(p)).unwrap();
        assert_eq!(std::fs::read(upper.join(p)).unwrap(), want, "{p}");
        let mt = std::os::unix::fs::MetadataExt::mtime(&md);
        assert!(mtime < 0 || mt == mtime, "{p}: times kept ({mt})");
        assert!(
            !raw_xattrs(&upper.join(p)).contains_key("trusted.overlay.redirect"),
            "{p}: no redirect once the data is up"
        );
    }
    for name in ["rustfuse (remount, metacopy off)", "kernel"] {
        let m2 = match name {
            "kernel" => Mount::kernel_with(&m.stack, &m.mnt, KERNEL_METACOPY).unwrap(),
            _ => ours(&[]),
        };
        let after = snap(m2.root());
        m2.unmount().unwrap();
        let d = diff(&before, "rustfuse", &after, name);
        assert!(d.is_empty(), "{}", d.join("\n"));
    }
}

/// A metacopy renamed by kernel overlayfs (a relative redirect over a whiteout of the old
/// name), committed as a lower layer, renamed again by rustfuse into another directory: the
/// data still reads after a remount (a redirect is written only where its walk finds the
/// data; else the data comes up).
#[test]
fn renaming_a_kernel_renamed_metacopy_again_keeps_its_data() {
    if !require_bin_under_test() {
        return;
    }
    let tree = Tree::new().lower(Layer::new().file("d/y", pattern(40_000, 4)).dir("e"));
    let s = scratch("metacopy-rerename");
    let m = tree.materialize(&s.path().join("k")).unwrap();
    let k = Mount::kernel_with(&m.stack, &m.mnt, KERNEL_METACOPY).unwrap();
    for (op, out) in [rename("d/y", "d/x")]
        .iter()
        .zip(ops::run(k.root(), &[rename("d/y", "d/x")]))
    {
        assert!(out.is_ok(), "kernel {op:?}: {}", ops::show(&out));
    }
    k.unmount().unwrap();
    // The kernel's upper becomes the top lower layer of a new stack.
    let top = m.stack.upper.clone().unwrap();
    let (upper, work) = (s.path().join("u2"), s.path().join("w2"));
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    let stack = Stack {
        lowers: vec![top, m.stack.lowers[0].clone()],
        upper: Some(upper),
        work: Some(work),
    };
    let ours = |extra: &[&str]| Mount::fuse(&bin_under_test(), &stack, extra, &m.mnt).unwrap();
    let w = ours(&["metacopy=on"]);
    let steps = [rename("d/x", "e/z")];
    for (op, out) in steps.iter().zip(ops::run(w.root(), &steps)) {
        assert!(out.is_ok(), "{op:?}: {}", ops::show(&out));
    }
    assert_eq!(
        std::fs::read(w.root().join("e/z")).unwrap(),
        pattern(40_000, 4)
    );
    w.unmount().unwrap();
    let r = ours(&["metacopy=on"]);
    let got = std::fs::read(r.root().join("e/z"));
    r.unmount().unwrap();
    assert_eq!(got.unwrap(), pattern(40_000, 4), "after a remount");
}
