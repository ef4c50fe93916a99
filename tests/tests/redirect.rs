//! Directory renames with kernel overlayfs's `redirect_dir` (issue 18). The oracle is kernel
//! overlayfs mounted `redirect_dir=on,index=off,metacopy=off`, the side under test rustfuse
//! with `-o redirect_dir=on`: a rename of a directory with lower content succeeds on both (the
//! new name is a directory marked `trusted.overlay.redirect`, the old one a whiteout) and the
//! outcome of every step, the merged view, inode identity, the upper layer (which of its
//! directories are redirected, and where to) and the view after unmount+mount must agree.
//!
//! Also here: `redirect_dir=off` and `nofollow` (EXDEV, as today), each filesystem reading the
//! redirects the other wrote (`follow`, `nofollow`, `off` and `on`), hostile redirect values
//! in a layer, the length limit of a redirect the kernel writes, and rootless.
//!
//! Every case says what the oracle must answer to each step (`Scenario::expecting`), so a
//! case that stops testing what it says (a rename the kernel refuses) fails. To check the
//! cases themselves against kernel overlayfs on both sides, run with
//! `RUSTFUSE_TEST_SELF_CHECK=1`.

use std::path::Path;
use std::time::Duration;

use rustfuse_tests::env::{scratch, skip};
use rustfuse_tests::layers::{Layer, Tree};
use rustfuse_tests::ops::build::*;
use rustfuse_tests::ops::{self, Op};
use rustfuse_tests::scenario::{Fs, Scenario};

/// Lower layers with directories of every kind a rename meets: lower-only (`d`, spread over
/// three layers, with a whiteout and a subdirectory), merged once a step copies it up (`m`),
/// empty (`e`, `e2`), emptied by a whiteout (`ed`), with an opaque subdirectory and
/// whiteouts inside (`t`), nested (`xd/sub`).
fn base() -> Tree {
    Tree::new()
        .lower(
            Layer::new()
                .file("a", "top a")
                .file("d/x", "x from top")
                .whiteout("d/gone")
                .file("d/sub/f1", "f1")
                .file("m/top", "m top")
                .opaque_dir("t/op")
                .file("t/op/a", "op a")
                .whiteout("t/wh")
                .file("t/keep", "keep top"),
        )
        .lower(
            Layer::new()
                .file("d/y", "y from middle")
                .file("d/gone", "hidden by the top whiteout")
                .file("m/mid", "m mid")
                .dir("e")
                .mode(0o711)
                .owner(7, 8)
                .dir("e2")
                .dir("xd")
                .mode(0o750)
                .owner(5, 6)
                .xattr("user.dir", "d")
                .file("xd/sub/deep", "deep")
                .mode(0o640)
                .owner(3, 4)
                .file("t/op/hidden", "hidden by the opaque dir")
                .file("t/wh", "hidden by the whiteout")
                .file("t/low", "t low"),
        )
        .lower(
            Layer::new()
                .file("d/z", "z from bottom")
                .owner(1, 2)
                .xattr("user.z", "zz")
                .file("d/sub/f2", "f2")
                .file("m/bottom", "m bottom")
                .file("ed/only", "only file of ed"),
        )
}

/// A case on [`base`] against kernel overlayfs with `redirect_dir=on`.
fn on(name: &'static str, steps: Vec<(Op, &'static str)>) -> Scenario {
    Scenario::expecting(name, base(), steps)
        .oracle(Fs::kernel_redirect("on"))
        .under_test(Fs::under_test_redirect("on"))
}

// ---------------------------------------------------------------- renames

#[test]
fn rename_lower_dir() {
    on(
        "redirect-lower",
        vec![
            (rename("d", "d2"), "ok"),
            (stat("d"), "ENOENT"),
            (readdir("d2"), "ok: sub:d x:f y:f z:f"),
            (read("d2/x"), "ok: \"x from top\""),
            (read("d2/y"), "ok: \"y from middle\""),
            (read("d2/z"), "ok: \"z from bottom\""),
            (stat("d2/gone"), "ENOENT"),
            (readdir("d2/sub"), "ok: f1:f f2:f"),
            (getxattr("d2/z", "user.z"), "ok: \"zz\""),
            (getxattr("d2", "trusted.overlay.redirect"), "ENODATA"),
            (readdir(""), "*"),
            (mkdir("d"), "ok"),
            (readdir("d"), "ok"),
        ],
    )
    .each_step()
    .check();
}

#[test]
fn rename_merged_dir() {
    on(
        "redirect-merged",
        vec![
            (create("m/new"), "ok"),
            (rename("m", "m2"), "ok"),
            (readdir("m2"), "ok: bottom:f mid:f new:f top:f"),
            (read("m2/new"), "ok: \"\""),
            (read("m2/bottom"), "ok: \"m bottom\""),
            (stat("m"), "ENOENT"),
            (create("m"), "ok"),
            (stat("m"), "ok: f 644*"),
        ],
    )
    .check();
}

#[test]
fn rename_across_parents() {
    on(
        "redirect-across",
        vec![
            (rename("d", "xd/d3"), "ok"),
            (readdir("xd"), "ok: d3:d sub:d"),
            (readdir("xd/d3"), "ok: sub:d x:f y:f z:f"),
            (rename("xd/sub", "sub2"), "ok"),
            (readdir("sub2"), "ok: deep:f"),
            (read("sub2/deep"), "ok: \"deep\""),
            (stat("sub2/deep"), "ok: f 640 size=4 nlink=1 3:4"),
            (readdir("xd"), "ok: d3:d"),
            (read("xd/d3/sub/f2"), "ok: \"f2\""),
        ],
    )
    .each_step()
    .check();
}

#[test]
fn rename_into_subdir_of_merged_dir() {
    on(
        "redirect-into-merged",
        vec![
            (create("xd/f"), "ok"),
            (create("xd/sub/g"), "ok"),
            (rename("d", "xd/sub/dd"), "ok"),
            (readdir("xd/sub"), "ok: dd:d deep:f g:f"),
            (readdir("xd/sub/dd"), "ok: sub:d x:f y:f z:f"),
            (read("xd/sub/dd/y"), "ok: \"y from middle\""),
            (rename("m", "xd/sub/dd/sub/m"), "ok"),
            (readdir("xd/sub/dd/sub/m"), "ok: bottom:f mid:f top:f"),
            (readdir("xd/sub/dd/sub"), "ok: f1:f f2:f m:d"),
        ],
    )
    .check();
}

#[test]
fn rename_over_empty_dirs() {
    on(
        "redirect-over-empty",
        vec![
            // a lower empty directory
            (rename("d", "e"), "ok"),
            (readdir("e"), "ok: sub:d x:f y:f z:f"),
            (stat("e"), "ok: d 755 size=- nlink=- 0:0"),
            // an upper empty directory
            (mkdir("ue"), "ok"),
            (rename("m", "ue"), "ok"),
            (readdir("ue"), "ok: bottom:f mid:f top:f"),
            // a merged directory emptied by a whiteout
            (unlink("ed/only"), "ok"),
            (rename("xd", "ed"), "ok"),
            (readdir("ed"), "ok: sub:d"),
            (stat("ed"), "ok: d 750 size=- nlink=- 5:6"),
            // an upper-only directory over a lower empty one
            (mkdir("nd"), "ok"),
            (create("nd/f"), "ok"),
            (rename("nd", "e2"), "ok"),
            (readdir("e2"), "ok: f:f"),
            // not empty
            (rename("t", "e"), "ENOTEMPTY"),
            (rename("e", "t"), "ENOTEMPTY"),
            // a directory over a file and the reverse
            (rename("t", "a"), "ENOTDIR"),
            (rename("a", "t"), "EISDIR"),
        ],
    )
    .check();
}

#[test]
fn rename_noreplace_and_exchange_dirs() {
    on(
        "redirect-flags",
        vec![
            (rename_noreplace("d", "m"), "EEXIST"),
            (rename_noreplace("d", "d2"), "ok"),
            (readdir("d2"), "ok: sub:d x:f y:f z:f"),
            (rename_exchange("d2", "m"), "ok"),
            (readdir("d2"), "ok: bottom:f mid:f top:f"),
            (readdir("m"), "ok: sub:d x:f y:f z:f"),
            (rename_exchange("m", "a"), "ok"),
            (read("m"), "ok: \"top a\""),
            (readdir("a"), "ok: sub:d x:f y:f z:f"),
            (mkdir("nd"), "ok"),
            (create("nd/f"), "ok"),
            (rename_exchange("nd", "xd"), "ok"),
            (readdir("nd"), "ok: sub:d"),
            (readdir("xd"), "ok: f:f"),
            (rename_exchange("xd/f", "nd/sub"), "ok"),
            (readdir("xd/f"), "ok: deep:f"),
            (rename_exchange("t", "nonexistent"), "ENOENT"),
        ],
    )
    .each_step()
    .check();
}

#[test]
fn rename_renamed_dir_again() {
    on(
        "redirect-twice",
        vec![
            (rename("d", "d2"), "ok"),
            (rename("d2", "d3"), "ok"),
            (rename("d3", "xd/d4"), "ok"),
            (readdir("xd/d4"), "ok: sub:d x:f y:f z:f"),
            (read("xd/d4/z"), "ok: \"z from bottom\""),
            (rename("xd/d4", "xd/sub/d5"), "ok"),
            (readdir("xd/sub/d5/sub"), "ok: f1:f f2:f"),
            (rename("xd/sub/d5", "d6"), "ok"),
            (readdir("d6"), "ok: sub:d x:f y:f z:f"),
            (readdir("xd/sub"), "ok: deep:f"),
        ],
    )
    .check();
}

#[test]
fn rename_back_to_origin() {
    on(
        "redirect-back",
        vec![
            (rename("d", "d2"), "ok"),
            (rename("d2", "d"), "ok"),
            (readdir("d"), "ok: sub:d x:f y:f z:f"),
            (stat("d2"), "ENOENT"),
            (rename("xd/sub", "s2"), "ok"),
            (rename("s2", "xd/sub"), "ok"),
            (readdir("xd/sub"), "ok: deep:f"),
            (rename("m", "xd/m"), "ok"),
            (rename("xd", "x2"), "ok"),
            (rename("x2/m", "m"), "ok"),
            (rename("x2", "xd"), "ok"),
            (readdir("m"), "ok: bottom:f mid:f top:f"),
            (readdir("xd"), "ok: sub:d"),
        ],
    )
    .each_step()
    .check();
}

#[test]
fn copy_up_below_redirected_dir() {
    on(
        "redirect-copy-up",
        vec![
            (rename("d", "d2"), "ok"),
            (append("d2/y", "+"), "ok"),
            (read("d2/y"), "ok: \"y from middle+\""),
            (chmod("d2/z", 0o600), "ok"),
            (stat("d2/z"), "ok: f 600 size=13 nlink=1 1:2"),
            (setxattr("d2/x", "user.n", "1"), "ok"),
            (chmod("d2/sub", 0o700), "ok"),
            (write("d2/sub/f2", "new f2"), "ok"),
            (read("d2/sub/f2"), "ok: \"new f2\""),
            (readdir("d2/sub"), "ok: f1:f f2:f"),
            (utimens("d2/sub/f1", 1_100_000_000, 1_200_000_000), "ok"),
            (rename("d2", "d3"), "ok"),
            (read("d3/y"), "ok: \"y from middle+\""),
            (readdir("d3/sub"), "ok: f1:f f2:f"),
        ],
    )
    .each_step()
    .check();
}

#[test]
fn whiteouts_below_redirected_dir() {
    on(
        "redirect-whiteouts",
        vec![
            (rename("d", "d2"), "ok"),
            (unlink("d2/y"), "ok"),
            (unlink("d2/sub/f1"), "ok"),
            (unlink("d2/sub/f2"), "ok"),
            (rmdir("d2/sub"), "ok"),
            (readdir("d2"), "ok: x:f z:f"),
            (rmdir("d2"), "ENOTEMPTY"),
            (create("d2/y"), "ok"),
            (read("d2/y"), "ok: \"\""),
            (mkdir("d2/sub"), "ok"),
            (readdir("d2/sub"), "ok"),
            (rename("d2", "xd/d3"), "ok"),
            (readdir("xd/d3"), "ok: sub:d x:f y:f z:f"),
            (unlink("xd/d3/x"), "ok"),
            (unlink("xd/d3/y"), "ok"),
            (unlink("xd/d3/z"), "ok"),
            (rmdir("xd/d3/sub"), "ok"),
            (rmdir("xd/d3"), "ok"),
            (readdir("xd"), "ok: sub:d"),
            (mkdir("xd/d3"), "ok"),
            (readdir("xd/d3"), "ok"),
        ],
    )
    .each_step()
    .check();
}

#[test]
fn create_below_redirected_dir() {
    on(
        "redirect-create",
        vec![
            (rename("d", "d2"), "ok"),
            (create("d2/new"), "ok"),
            (mkdir("d2/nd"), "ok"),
            (create("d2/nd/f"), "ok"),
            (mkfifo("d2/p"), "ok"),
            (symlink("x", "d2/s"), "ok"),
            (link("d2/x", "d2/xl"), "ok"),
            (stat("d2/xl"), "ok: f 644 size=10 nlink=2 0:0"),
            (create("d2/gone"), "ok"),
            (
                readdir("d2"),
                "ok: gone:f nd:d new:f p:p s:l sub:d x:f xl:f y:f z:f",
            ),
            (create("d2/sub/f3"), "ok"),
            (readdir("d2/sub"), "ok: f1:f f2:f f3:f"),
            (rename("d2/nd", "nd2"), "ok"),
            (rename("d2/sub", "d2/nd3"), "ok"),
            (readdir("d2/nd3"), "ok: f1:f f2:f f3:f"),
        ],
    )
    .check();
}

#[test]
fn rename_dir_with_opaque_subdir_and_whiteouts() {
    on(
        "redirect-opaque",
        vec![
            (rename("t", "t2"), "ok"),
            (readdir("t2"), "ok: keep:f low:f op:d"),
            (readdir("t2/op"), "ok: a:f"),
            (stat("t2/wh"), "ENOENT"),
            (stat("t2/op/hidden"), "ENOENT"),
            (rename("t2/op", "op2"), "ok"),
            (readdir("op2"), "ok: a:f"),
            (create("t2/wh"), "ok"),
            (read("t2/wh"), "ok: \"\""),
            (rename("t2", "xd/t3"), "ok"),
            (readdir("xd/t3"), "ok: keep:f low:f wh:f"),
        ],
    )
    .check();
}

#[test]
fn rename_parent_after_child() {
    on(
        "redirect-nested",
        vec![
            (rename("xd/sub", "xd/sub2"), "ok"),
            (rename("xd", "xd2"), "ok"),
            (readdir("xd2"), "ok: sub2:d"),
            (readdir("xd2/sub2"), "ok: deep:f"),
            (read("xd2/sub2/deep"), "ok: \"deep\""),
            (rename("d/sub", "d/sub2"), "ok"),
            (rename("d", "xd2/sub2/d"), "ok"),
            (readdir("xd2/sub2/d/sub2"), "ok: f1:f f2:f"),
            (rename("xd2/sub2", "sub3"), "ok"),
            (read("sub3/d/sub2/f2"), "ok: \"f2\""),
            (rename("xd2", "xd"), "ok"),
            (readdir("xd"), "ok"),
            (readdir("sub3"), "ok: d:d deep:f"),
        ],
    )
    .each_step()
    .check();
}

#[test]
fn inode_numbers_stable_across_renames() {
    // The harness compares st_ino identity: (path before, path after) pairs with the same
    // st_ino, after every step here and across unmount+mount (remount is on for every case).
    on(
        "redirect-inodes",
        vec![
            (stat("d/sub/f1"), "*"),
            (rename("d", "d2"), "ok"),
            (rename("xd", "d2/xd"), "ok"),
            (chmod("d2/xd/sub/deep", 0o600), "ok"),
            (create("m/n"), "ok"),
            (rename("m", "d2/sub/m"), "ok"),
            (rename("d2", "d"), "ok"),
        ],
    )
    .each_step()
    .check();
}

#[test]
fn redirect_longer_than_the_kernels_limit() {
    // Kernel overlayfs writes an absolute redirect (the origin's path) when a directory leaves
    // its parent, and answers EXDEV when that path is longer than its `redirect_max` (256
    // by default); a rename within the parent writes the name alone, not limited.
    let long = "l".repeat(60);
    let deep = format!("{long}/{long}/{long}/{long}/{long}");
    let tree = Tree::new().lower(Layer::new().file(&format!("{deep}/f"), "deep file"));
    let max = std::fs::read_to_string("/sys/module/overlay/parameters/redirect_max")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    if max != Some(256) {
        skip(&format!(
            "overlay's redirect_max is {max:?}, the case is written for 256"
        ));
        return;
    }
    let paths: &'static str = Box::leak(deep.clone().into_boxed_str());
    let renamed: &'static str = Box::leak(format!("{deep}2").into_boxed_str());
    let short: &'static str = Box::leak(format!("{long}/short").into_boxed_str());
    Scenario::expecting(
        "redirect-max",
        tree,
        vec![
            (rename(paths, "out"), "EXDEV"),
            (rename(paths, renamed), "ok"),
            (rename(renamed, short), "EXDEV"),
            (readdir(renamed), "ok: f:f"),
        ],
    )
    .oracle(Fs::kernel_redirect("on"))
    .under_test(Fs::under_test_redirect("on"))
    .check();
}

// ---------------------------------------------------------------- off, nofollow

fn exdev_case(name: &'static str, mode: &str) {
    Scenario::expecting(
        name,
        base(),
        vec![
            (rename("d", "d2"), "EXDEV"),
            (create("m/n"), "ok"),
            (rename("m", "m2"), "EXDEV"),
            (rename_exchange("d", "m"), "EXDEV"),
            (rename("xd/sub", "sub2"), "EXDEV"),
            (mkdir("nd"), "ok"),
            (create("nd/f"), "ok"),
            (rename("nd", "nd2"), "ok"),
            (rename("nd2", "xd/nd3"), "ok"),
            (rename("e", "e3"), "EXDEV"),
            (readdir("d"), "ok: sub:d x:f y:f z:f"),
        ],
    )
    .oracle(Fs::kernel_redirect(mode))
    .under_test(Fs::under_test_redirect(mode))
    .check();
}

#[test]
fn redirect_dir_off_answers_exdev() {
    exdev_case("redirect-off", "off");
}

#[test]
fn redirect_dir_nofollow_answers_exdev() {
    exdev_case("redirect-nofollow", "nofollow");
}

// ---------------------------------------------------------------- reading the other's redirects

/// Renames that leave redirects of every form in the upper layer: relative (within the
/// parent), absolute (across parents), nested, a renamed dir renamed again, with copy-ups and
/// whiteouts below.
fn writer_ops() -> Vec<Op> {
    vec![
        rename("d", "d2"),
        rename("xd/sub", "sub2"),
        rename("xd", "d2/xd"),
        create("m/n"),
        rename("m", "d2/sub/m"),
        unlink("d2/y"),
        append("d2/z", "+"),
        rename("t", "t2"),
        rename("t2", "sub2/t3"),
        rmdir("e"),
        mkdir("e"),
    ]
}

/// Reads (and a few writes) on layers written by [`writer_ops`], with the oracle's expected
/// answers; `renamed` is what a rename of a redirected directory answers.
fn reader_steps(renamed: &'static str) -> Vec<(Op, &'static str)> {
    vec![
        (readdir(""), "ok: a:f d2:d e2:d e:d ed:d sub2:d"),
        (readdir("d2"), "ok: sub:d x:f xd:d z:f"),
        (readdir("d2/sub"), "ok: f1:f f2:f m:d"),
        (readdir("d2/sub/m"), "ok: bottom:f mid:f n:f top:f"),
        (readdir("d2/xd"), "ok"),
        (readdir("sub2"), "ok: deep:f t3:d"),
        (readdir("sub2/t3"), "ok: keep:f low:f op:d"),
        (readdir("sub2/t3/op"), "ok: a:f"),
        (read("d2/z"), "ok: \"z from bottom+\""),
        (read("sub2/deep"), "ok: \"deep\""),
        (readdir("e"), "ok"),
        (create("d2/sub/new"), "ok"),
        (unlink("d2/sub/f1"), "ok"),
        (readdir("d2/sub"), "ok: f2:f m:d new:f"),
        (rename("sub2", "sub3"), renamed),
    ]
}

#[test]
fn follow_reads_kernel_redirects() {
    // Kernel overlayfs (redirect_dir=on) writes; rustfuse with redirect_dir=follow reads what
    // kernel overlayfs with redirect_dir=follow reads. Follow writes no redirect: a rename of
    // a redirected (merged) directory is EXDEV.
    Scenario::expecting("redirect-follow", base(), reader_steps("EXDEV"))
        .prepared_by(
            Fs::kernel_redirect("on"),
            Fs::kernel_redirect("on"),
            writer_ops(),
        )
        .oracle(Fs::kernel_redirect("follow"))
        .under_test(Fs::under_test_redirect("follow"))
        .check();
}

#[test]
fn on_reads_kernel_redirects() {
    Scenario::expecting("redirect-on-reads-kernel", base(), reader_steps("ok"))
        .prepared_by(
            Fs::kernel_redirect("on"),
            Fs::kernel_redirect("on"),
            writer_ops(),
        )
        .oracle(Fs::kernel_redirect("on"))
        .under_test(Fs::under_test_redirect("on"))
        .check();
}

#[test]
fn kernel_reads_rustfuse_redirects() {
    // rustfuse (redirect_dir=on) writes its copy, kernel overlayfs its own; both are then
    // mounted by kernel overlayfs (redirect_dir=on): the same steps, views and upper layers.
    for (name, mode, renamed) in [
        ("redirect-kernel-reads-on", "on", "ok"),
        ("redirect-kernel-reads-follow", "follow", "EXDEV"),
    ] {
        Scenario::expecting(name, base(), reader_steps(renamed))
            .prepared_by(
                Fs::kernel_redirect("on"),
                Fs::under_test_redirect("on"),
                writer_ops(),
            )
            .oracle(Fs::kernel_redirect(mode))
            .under_test(Fs::kernel_redirect(mode))
            .check();
    }
}

#[test]
fn nofollow_refuses_kernel_redirects() {
    // Kernel overlayfs with redirect_dir=nofollow refuses a lookup of a redirected directory
    // whose parent has lower layers to look in (EPERM, "refusing to follow redirect"), and so
    // a listing of that parent (`e2`: it looks the entries of an impure directory up for
    // d_ino; rustfuse's READDIRPLUS looks every entry up). Below a parent that is in the
    // upper layer alone (`rd`) nothing is looked up below and the redirect is not met: the
    // directory reads as its upper part alone.
    Scenario::expecting(
        "redirect-nofollow-reads",
        base(),
        vec![
            (readdir(""), "ok: a:f e2:d e:d ed:d rd:d xd:d"),
            (readdir("e2"), "EPERM"),
            (stat("e2/d2"), "EPERM"),
            (readdir("e2/d2"), "EPERM"),
            (read("e2/d2/z"), "EPERM"),
            (rename("e2/m2", "m3"), "EPERM"),
            (readdir("rd"), "ok: d2:d m2:d"),
            (stat("rd/d2"), "ok: d 755 size=- nlink=- 0:0"),
            (readdir("rd/d2"), "ok"),
            (read("rd/d2/z"), "ENOENT"),
            (rename("rd/m2", "m3"), "ok"),
            (readdir("xd"), "ok"),
            (read("a"), "ok: \"top a\""),
            (rename("ed", "ed2"), "EXDEV"),
        ],
    )
    .prepared_by(
        Fs::kernel_redirect("on"),
        Fs::kernel_redirect("on"),
        vec![
            rename("d", "e2/d2"),
            create("m/n"),
            rename("m", "e2/m2"),
            mkdir("rd"),
            rename("t", "rd/d2"),
            rename("xd/sub", "rd/m2"),
        ],
    )
    .oracle(Fs::kernel_redirect("nofollow"))
    .under_test(Fs::under_test_redirect("nofollow"))
    .check();
}

#[test]
fn off_follows_kernel_redirects_as_the_kernel_does() {
    // Kernel overlayfs with redirect_dir=off follows redirects when the overlay module's
    // redirect_always_follow is Y (its default): it only writes none.
    let always = std::fs::read_to_string("/sys/module/overlay/parameters/redirect_always_follow")
        .unwrap_or_default();
    if always.trim() != "Y" {
        skip(&format!(
            "overlay's redirect_always_follow is {:?}, the case is written for Y",
            always.trim()
        ));
        return;
    }
    Scenario::expecting("redirect-off-reads", base(), reader_steps("EXDEV"))
        .prepared_by(
            Fs::kernel_redirect("on"),
            Fs::kernel_redirect("on"),
            writer_ops(),
        )
        .oracle(Fs::kernel_redirect("off"))
        .under_test(Fs::under_test_redirect("off"))
        .check();
}

// ---------------------------------------------------------------- hostile redirects

/// What kernel overlayfs does with a redirect value, found on Linux 6.18 and kept here as the
/// reason for each case: `.`/`..` components EACCES (its name lookup refuses them), a relative
/// value with `/` inside, `//` or an empty value EINVAL ("invalid redirect"), a component
/// longer than NAME_MAX or a path that names nothing: no lower directory (the directory shows
/// its own entries alone). The filesystem under test must answer what the kernel answers or
/// EIO, and never show what lies outside the layers (`SENTINEL`, `/etc/passwd`); the listing
/// of the parent, which the kernel gives, must not fail for the one bad entry.
const HOSTILE: &[&str] = &[
    "/../etc",
    "/../../etc",
    "/../../../../../../../../../../etc",
    "../etc",
    "a/b",
    "//target",
    "/target/../target",
    "/target/./sub",
    "/.",
    "/..",
    "",
    "/link",
    "/link/sd",
    "/x",
    "/x/x",
];

fn overlong_values() -> Vec<String> {
    vec![
        format!("/{}", "a".repeat(300)),
        "/x".repeat(2000),
        format!("/target{}", "/..".repeat(1000)),
    ]
}

/// Layers where a directory `x` carries the redirect `value`: in the upper layer (`in_upper`)
/// or in the top lower layer; `target` is a real lower directory, `link` a symlink out of the
/// layers to a sentinel directory.
fn hostile_tree(value: &[u8], in_upper: bool) -> Tree {
    let x = Layer::new().dir("x").redirect(value).file("x/own", "own");
    let bottom = Layer::new()
        .file("target/f", "inside")
        .file("target/sub/g", "g")
        .symlink("link", "../etc")
        .file("x/x/low", "x/x");
    match in_upper {
        true => Tree::new().lower(bottom).with_upper(x),
        false => Tree::new().lower(x).lower(bottom),
    }
}

/// Sentinels where an escaping redirect would land: `etc` beside and above the layer roots.
fn plant_sentinels(layer_parent: &Path) {
    for d in [layer_parent.join("etc"), layer_parent.join("../etc")] {
        std::fs::create_dir_all(d.join("sd")).expect("sentinel dir");
        std::fs::write(d.join("secret"), "SENTINEL").expect("sentinel");
        std::fs::write(d.join("sd/SENTINEL"), "SENTINEL").expect("sentinel");
    }
}

fn hostile_ops() -> Vec<Op> {
    vec![
        stat("x"),
        readdir("x"),
        read("x/own"),
        read("x/secret"),
        read("x/f"),
        read("x/passwd"),
        readdir(""),
        create("x/new"),
    ]
}

/// Checks one hostile value on both; returns the problems.
fn hostile_one(value: &[u8], in_upper: bool, under_test: &Fs) -> Vec<String> {
    let shown = rustfuse_tests::snapshot::show_bytes(value);
    let shown = match shown.len() > 60 {
        true => format!("{}… ({} bytes)", &shown[..60], value.len()),
        false => shown,
    };
    let place = if in_upper { "upper" } else { "lower" };
    let s = scratch("redirect-hostile");
    let tree = hostile_tree(value, in_upper);
    let mut outs = Vec::new();
    for (side, fs) in [("a", Fs::kernel_redirect("on")), ("b", under_test.clone())] {
        let m = tree.materialize(&s.path().join(side)).expect("materialize");
        plant_sentinels(&s.path().join(side));
        let g = match fs.mount(&m) {
            Ok(g) => g,
            Err(e) => return vec![format!("{place} redirect {shown}: mount: {e}")],
        };
        outs.push(ops::run(g.root(), &hostile_ops()));
        if let Err(e) = g.unmount() {
            return vec![format!("{place} redirect {shown}: unmount: {e}")];
        }
    }
    let mut problems = Vec::new();
    for (op, (k, t)) in hostile_ops().iter().zip(outs[0].iter().zip(&outs[1])) {
        let (ks, ts) = (ops::show(k), ops::show(t));
        let escaped = ["SENTINEL", "secret", "passwd", "root:"]
            .iter()
            .any(|w| ts.contains(w));
        // Listing the parent follows nothing: the layers' own names are fine there, and where
        // the kernel lists it, a refusal of the whole listing (for one bad entry) is not.
        let parent = matches!(op, Op::Readdir { path } if path.is_empty());
        let own_listing = parent && (ts == "ok: target:d x:d" || ts == "ok: link:l target:d x:d");
        let refusal_allowed = !parent || k.is_err();
        let fine = !escaped && (ts == ks || (ts == "EIO" && refusal_allowed) || own_listing);
        if fine && ts != ks {
            eprintln!("note: {place} redirect {shown}: {op:?}: kernel {ks}, under test {ts}");
        }
        if !fine {
            problems.push(format!(
                "{place} redirect {shown}: {op:?}: kernel {ks}, under test {ts}{}",
                if escaped { " (escaped the layers)" } else { "" }
            ));
        }
    }
    problems
}

#[test]
fn hostile_redirects_are_refused() {
    if !rustfuse_tests::env::require_bin_under_test() {
        return;
    }
    let under_test = Fs::under_test_redirect("on");
    let mut values: Vec<Vec<u8>> = HOSTILE.iter().map(|v| v.as_bytes().to_vec()).collect();
    values.extend(overlong_values().into_iter().map(String::into_bytes));
    let mut problems = Vec::new();
    for v in &values {
        for in_upper in [true, false] {
            problems.extend(hostile_one(v, in_upper, &under_test));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with hostile redirects ({:?}):\n{}",
        problems.len(),
        under_test,
        problems.join("\n")
    );
}

#[test]
fn redirect_loops_across_layers() {
    // Redirects that point at each other from layer to layer: kernel overlayfs resolves each
    // one in the layers below it, so none loops; the filesystem under test must end (the
    // harness's deadline) with the kernel's view or EIO.
    let tree = Tree::new()
        .lower(
            Layer::new()
                .dir("a")
                .redirect("/b")
                .file("a/top", "top")
                .dir("c")
                .redirect("/a"),
        )
        .lower(Layer::new().dir("b").redirect("/a").file("b/mid", "mid"))
        .lower(
            Layer::new()
                .file("a/low", "low a")
                .dir("b")
                .redirect("/b")
                .file("b/low", "low b"),
        );
    // a: its own, then b of the middle layer, then (b's redirect) a of the bottom one
    let steps = vec![
        (readdir("a"), "ok: low:f mid:f top:f"),
        (readdir("c"), "ok: low:f"),
        (readdir("b"), "ok: low:f mid:f"),
        (rename("a", "a2"), "ok"),
        (readdir("a2"), "ok: low:f mid:f top:f"),
        (rename("c", "c2"), "ok"),
        (readdir("c2"), "ok: low:f"),
        (rename("b", "a"), "ok"),
        (readdir("a"), "ok: low:f mid:f"),
    ];
    Scenario::expecting("redirect-loops", tree, steps)
        .oracle(Fs::kernel_redirect("on"))
        .under_test(Fs::under_test_redirect("on"))
        .check();
}

#[test]
fn absolute_redirect_below_an_opaque_directory() {
    // Two build steps' layers: the first made `o` anew (opaque) and moved `src` into it as
    // `o/m` (redirect `/src`); the second moved `o/m/x` out as `y` (redirect `/o/m/x`). A
    // lookup of `y` walks `/o/m/x` in the first layer: `o` is opaque, but `m`'s absolute
    // redirect goes on below it (the kernel resets its stop there), so `src/x`'s files of the
    // bottom layer show in `y`. A relative redirect below an opaque directory does not.
    let tree = Tree::new()
        .with_upper(
            Layer::new()
                .dir("y")
                .redirect("/o/m/x")
                .dir("o/m")
                .whiteout("o/m/x"),
        )
        .lower(
            Layer::new()
                .opaque_dir("o")
                .dir("o/m")
                .redirect("/src")
                .dir("o/m/x")
                .file("o/m/x/mid", "mid")
                .whiteout("src")
                .opaque_dir("p")
                .dir("p/n")
                .redirect("q")
                .file("p/n/own", "own"),
        )
        .lower(
            Layer::new()
                .file("src/x/low", "low")
                .file("p/q/hidden", "hidden")
                .file("o/old", "hidden by o"),
        );
    let steps = vec![
        (readdir("y"), "ok: low:f mid:f"),
        (read("y/low"), "ok: \"low\""),
        (readdir("o"), "ok: m:d"),
        (readdir("o/m"), "ok"),
        (readdir(""), "ok: o:d p:d y:d"),
        (readdir("p/n"), "ok: own:f"),
        (rename("y", "y2"), "ok"),
        (readdir("y2"), "ok: low:f mid:f"),
    ];
    Scenario::expecting("redirect-below-opaque", tree, steps)
        .oracle(Fs::kernel_redirect("on"))
        .under_test(Fs::under_test_redirect("on"))
        .check();
}

// ---------------------------------------------------------------- rootless

/// Renames in a mount, a copy-up and a whiteout below the renamed directory, the view, then
/// the view after unmount+mount. `$1` mounts (`$1 MNT`, the layers in `$2`), `$2` the dir.
const ROOTLESS_SCRIPT: &str = r#"
set -eu
MOUNT="$1"; D="$2"
view() { cd "$D/mnt"; find . -printf '%P %y %s\n' | sort; for f in $(find . -type f | sort); do echo "$f: $(cat "$f")"; done; cd /; }
$MOUNT "$D/mnt"
cd "$D/mnt"
perl -e 'for (["d","d2"],["xd/sub","sub2"],["xd","d2/xd"],["m","d2/sub/m"]) { rename($$_[0], $$_[1]) or die "rename $$_[0] $$_[1]: $!\n" }'
echo more >> d2/y
rm d2/sub/f1
cd /
view
umount "$D/mnt"
echo "-- remounted"
$MOUNT "$D/mnt"
view
umount "$D/mnt"
"#;

fn rootless_tree() -> Tree {
    Tree::new()
        .lower(
            Layer::new()
                .file("d/x", "x")
                .whiteout("d/gone")
                .file("d/sub/f1", "f1")
                .file("m/top", "top"),
        )
        .lower(
            Layer::new()
                .file("d/y", "y")
                .file("d/gone", "hidden")
                .file("m/mid", "mid")
                .file("xd/sub/deep", "deep")
                .dir("e"),
        )
}

#[test]
fn rootless_writes_user_overlay_redirects() {
    // Kernel overlayfs refuses redirect_dir=on and follow with userxattr (mount EINVAL,
    // "conflicting options"), so in a user namespace it never writes or follows
    // `user.overlay.redirect`. The oracle is kernel overlayfs as root (`trusted.`): rustfuse
    // rootless must show the same tree, before and after a remount, and mark the same
    // directories redirected to the same places, with `user.overlay.redirect`.
    use std::os::unix::fs::PermissionsExt;
    if !rustfuse_tests::env::require_bin_under_test() {
        return;
    }
    if rustfuse_tests::scenario::self_check() {
        skip("RUSTFUSE_TEST_SELF_CHECK: kernel overlayfs has no rootless redirect_dir to compare");
        return;
    }
    if let Err(e) = rustfuse_tests::env::dev_fuse_for_everyone("the rootless redirect test") {
        skip(&e);
        return;
    }
    let s = scratch("redirect-rootless");
    let mut views = Vec::new();
    let mut uppers = Vec::new();
    for side in ["kernel", "rootless"] {
        let dir = s.path().join(side);
        let m = rootless_tree().materialize(&dir).expect("materialize");
        let opts = m.stack.options();
        let (out, upper) = if side == "kernel" {
            let mount = format!(
                "mount -t overlay overlay -o {opts},{}",
                rustfuse_tests::scenario::kernel_redirect_features("on")
            );
            let out = rustfuse_tests::env::run_command(
                std::process::Command::new("sh")
                    .args(["-c", ROOTLESS_SCRIPT, "sh", &mount])
                    .arg(&dir),
                Duration::from_secs(60),
            );
            (out, m.stack.upper.clone().expect("upper"))
        } else {
            let bin = dir.join("bin-under-test");
            std::fs::copy(rustfuse_tests::env::bin_under_test(), &bin).expect("copy binary");
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            chown_r(&dir);
            std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod scratch");
            let mount = format!("{} -o {opts},redirect_dir=on", bin.display());
            let out = rustfuse_tests::env::run_command(
                rustfuse_tests::env::rootless_sh(ROOTLESS_SCRIPT)
                    .arg(&mount)
                    .arg(&dir),
                Duration::from_secs(60),
            );
            (out, m.stack.upper.clone().expect("upper"))
        };
        let out = out.unwrap_or_else(|e| panic!("{side}: {e}"));
        if side == "rootless" && !out.status.success() && out.stderr.contains("unshare") {
            skip(&format!(
                "unprivileged user namespaces unavailable: {}",
                out.stderr.trim()
            ));
            return;
        }
        assert!(
            out.status.success(),
            "{side}: script failed {}",
            out.report()
        );
        views.push(out.stdout);
        uppers.push(upper);
    }
    let mut failures = Vec::new();
    if views[0] != views[1] {
        failures.push(format!(
            "views differ:\n--- kernel (root)\n{}\n--- rustfuse (rootless)\n{}",
            views[0], views[1]
        ));
    }
    let (rk, rr) = (
        rustfuse_tests::layers::dir_redirects(&uppers[0]),
        rustfuse_tests::layers::dir_redirects(&uppers[1]),
    );
    if rk.is_empty() || rk != rr {
        failures.push(format!(
            "redirected directories differ:\n  kernel: {rk:?}\n  rootless: {rr:?}"
        ));
    }
    for p in rr.keys() {
        let x = rustfuse_tests::upper::raw_xattrs(&uppers[1].join(p));
        if !x.contains_key("user.overlay.redirect") || x.contains_key("trusted.overlay.redirect") {
            failures.push(format!(
                "rootless upper {p}: want user.overlay.redirect alone, has {:?}",
                x.keys().collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn chown_r(p: &Path) {
    let nobody = Some(rustix::fs::Uid::from_raw(65534));
    rustix::fs::chownat(
        rustix::fs::CWD,
        p,
        nobody,
        Some(rustix::fs::Gid::from_raw(65534)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("chown");
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p).expect("read_dir").flatten() {
            chown_r(&e.path());
        }
    }
}
