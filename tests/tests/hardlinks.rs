//! Hard links of lower layers, against kernel overlayfs mounted
//! `redirect_dir=off,index=on,metacopy=off` ([`Fs::kernel_index`]): every name of a lower hard
//! link shows one st_ino and the true st_nlink; a change through one name copies the file up
//! once and every name shows it; unlink, link and rename of one name change the nlink the
//! others show as the kernel's index does; all of it again after a remount.
//!
//! - differential scenarios (steps, merged views, inode identity, nlink, upper dir, remount);
//!   the `.wh.` whiteout format is checked on the side under test against the kernel reading
//!   the same layers with char 0/0 whiteouts;
//! - `tar -c`, `du -s`, `cp -a`, `rsync -aH` of the merged tree, as root and rootless (in a
//!   user namespace kernel overlayfs falls back to index=off, so rootless rustfuse is compared
//!   with the root kernel's output);
//! - kill -9 of the daemon during copy-ups through one name of many link groups;
//! - the upper layer rustfuse wrote, read by kernel overlayfs (index=off, and index=on with a
//!   fresh workdir) and by Debian's fuse-overlayfs.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustfuse_tests::env::{self, rootless_sh, run_command, scratch, skip};
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::ops::build::*;
use rustfuse_tests::ops::{self, Op};
use rustfuse_tests::rng::Rng;
use rustfuse_tests::scenario::{Fs, Scenario, snap};
use rustfuse_tests::snapshot::{Snapshot, snapshot};
use rustfuse_tests::upper::{UKind, describe_upper};

/// Link groups: `a/h1 a/h2 b/h3` (three names, two directories) and `h d/h-link` in the bottom
/// layer, `top/t1 top/t2` in the top one, and `w/a w/b w/c` in the bottom layer with `w/b`
/// whited out above (as `.wh.b` when `wh_files`, which only the FUSE side reads).
fn tree(wh_files: bool) -> Tree {
    let top = Layer::new()
        .file("top/t1", "top group")
        .link("top/t2", "top/t1");
    let top = match wh_files {
        true => top.wh_file("w/b"),
        false => top.whiteout("w/b"),
    };
    Tree::new().lower(top).lower(
        Layer::new()
            .file("a/h1", "three names")
            .xattr("user.k", "v")
            .link("a/h2", "a/h1")
            .link("b/h3", "a/h1")
            .file("h", "two names")
            .mode(0o640)
            .link("d/h-link", "h")
            .file("w/a", "spans a whiteout")
            .link("w/b", "w/a")
            .link("w/c", "w/a")
            .file("plain", "one name"),
    )
}

const NAMES: [&str; 9] = [
    "a/h1", "a/h2", "b/h3", "h", "d/h-link", "top/t1", "top/t2", "w/a", "w/c",
];

fn stat_all() -> Vec<Op> {
    NAMES.iter().map(|n| stat(n)).collect()
}

fn read_all() -> Vec<Op> {
    NAMES.iter().map(|n| read(n)).collect()
}

/// `parts` concatenated, for op lists built from pieces.
fn seq(parts: Vec<Vec<Op>>) -> Vec<Op> {
    parts.concat()
}

fn scenario(name: &'static str, ops: Vec<Op>) -> Scenario {
    Scenario::new(name, tree(false), ops).oracle(Fs::kernel_index())
}

// ------------------------------------------------------------ differential scenarios

#[test]
fn read_every_name() {
    scenario(
        "hl-read",
        seq(vec![
            stat_all(),
            read_all(),
            vec![
                readdir("a"),
                readdir("b"),
                readdir("d"),
                readdir("w"),
                readdir("top"),
                stat("w/b"),
                getxattr("b/h3", "user.k"),
            ],
        ]),
    )
    .each_step()
    .check();
}

#[test]
fn append_through_one_name() {
    scenario(
        "hl-append",
        seq(vec![
            vec![append("a/h1", "+1")],
            read_all(),
            stat_all(),
            vec![append("b/h3", "+3"), read("a/h2"), append("top/t2", "+t")],
            vec![append("w/c", "+w")],
            read_all(),
            stat_all(),
        ]),
    )
    .each_step()
    .check();
}

/// The names are not looked up before the change (no step-by-step snapshots).
#[test]
fn write_and_truncate_unseen_names() {
    scenario(
        "hl-write-truncate",
        seq(vec![
            vec![
                write_at("h", 0, "TWO"),
                read("d/h-link"),
                truncate("d/h-link", 3),
                stat("h"),
                truncate("w/a", 4),
                write_at("a/h2", 6, "NAMES"),
            ],
            read_all(),
            stat_all(),
        ]),
    )
    .check();
}

#[test]
fn metadata_through_one_name() {
    scenario(
        "hl-metadata",
        seq(vec![
            vec![
                chmod("a/h2", 0o600),
                stat("a/h1"),
                stat("b/h3"),
                chown("b/h3", 5, 6),
                stat("a/h1"),
                setxattr("d/h-link", "user.x", "y"),
                getxattr("h", "user.x"),
                listxattr("h"),
                removexattr("a/h1", "user.k"),
                listxattr("b/h3"),
                utimens("top/t1", 1_100_000_000, 1_200_000_000),
                chmod("w/c", 0o4755),
            ],
            stat_all(),
        ]),
    )
    .each_step()
    .check();
}

#[test]
fn unlink_one_name() {
    scenario(
        "hl-unlink-one",
        seq(vec![
            vec![
                // before any copy-up: the others' nlink drops by one
                unlink("a/h2"),
                stat("a/h1"),
                stat("b/h3"),
                append("a/h1", "+1"),
                read("b/h3"),
                // after a copy-up
                chmod("h", 0o600),
                unlink("d/h-link"),
                stat("h"),
                // a group with a name whited out below
                unlink("w/a"),
                stat("w/c"),
                unlink("top/t1"),
                readdir("a"),
                readdir("w"),
            ],
            stat_all(),
        ]),
    )
    .check();
}

#[test]
fn link_to_new_names() {
    scenario(
        "hl-link",
        seq(vec![
            vec![
                link("a/h1", "a/new"),
                stat("a/h2"),
                link("b/h3", "d/new2"),
                link("w/a", "w/new"),
                link("w/c", "w/b"),
                link("top/t1", "new-top"),
                link("plain", "plain2"),
                append("a/new", "+new"),
                read("a/h2"),
                stat("d/new2"),
                stat("plain"),
            ],
            stat_all(),
        ]),
    )
    .each_step()
    .check();
}

#[test]
fn rename_names() {
    scenario(
        "hl-rename",
        seq(vec![
            vec![
                rename("a/h1", "a/renamed"),
                stat("a/h2"),
                rename("b/h3", "d/moved"),
                // over another name of the same file: nothing happens
                rename("a/h2", "d/moved"),
                stat("a/h2"),
                rename("top/t1", "top/t2"),
                // another file over a name of a group: the group loses a link
                rename("plain", "d/h-link"),
                stat("h"),
                rename("w/a", "w/b"),
                append("d/moved", "+m"),
                read("a/renamed"),
                readdir("a"),
                readdir("d"),
                readdir("w"),
            ],
            stat_all(),
        ]),
    )
    .each_step()
    .check();
}

#[test]
fn exchange_names() {
    scenario(
        "hl-exchange",
        seq(vec![
            vec![
                // two names of one file: nothing happens
                rename_exchange("a/h1", "b/h3"),
                stat("a/h1"),
                rename_exchange("a/h2", "h"),
                rename_exchange("w/a", "plain"),
                append("a/h1", "+1"),
                read("h"),
                read("a/h2"),
                read("plain"),
            ],
            read_all(),
            stat_all(),
        ]),
    )
    .each_step()
    .check();
}

#[test]
fn unlink_every_name() {
    scenario(
        "hl-unlink-all",
        seq(vec![
            vec![
                unlink("a/h1"),
                unlink("a/h2"),
                unlink("b/h3"),
                append("h", "+"),
                unlink("h"),
                unlink("d/h-link"),
                unlink("w/a"),
                unlink("w/c"),
                unlink("top/t2"),
                unlink("top/t1"),
                readdir("a"),
                readdir("w"),
                create("a/h1"),
                stat("a/h1"),
            ],
            stat_all(),
        ]),
    )
    .check();
}

/// The side under test reads `w/b` whited out by a `.wh.b` file, the kernel by char 0/0.
#[test]
fn wh_file_whiteout_in_link_group() {
    scenario(
        "hl-wh-file",
        vec![
            stat("w/a"),
            stat("w/c"),
            stat("w/b"),
            append("w/a", "+a"),
            read("w/c"),
            unlink("w/c"),
            stat("w/a"),
            link("w/a", "w/b"),
            stat("w/b"),
            readdir("w"),
        ],
    )
    .under_test_tree(tree(true))
    .each_step()
    .check();
}

// ------------------------------------------------------------ tools

/// Runs the tools on the merged tree at `$1` into `$2/before` and `$2/after`, with a chmod of
/// `$3` in between. `du` sums the regular files (each inode once): directories are left
/// out, kernel overlayfs with index=on gives its upper directories origin and impure xattrs that
/// take a block of their own (st_blocks 16 where rustfuse's show 8 here).
const TOOLS: &str = r#"
set -eu
R="$1"; O="$2"; CH="$3"
tools() {
    mkdir -p "$1"
    tar -C "$R" -cf "$1/tar.tar" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner .
    tar -tvf "$1/tar.tar" > "$1/tar.txt"
    (cd "$R" && find . -type f -print0 | du -sc --files0-from=- | tail -n1 | cut -f1) > "$1/du.txt"
    (cd "$R" && find . -type f -print0 | du -sbc --files0-from=- | tail -n1 | cut -f1) > "$1/du-bytes.txt"
    cp -a "$R" "$1/cp"
    rsync -aH "$R/" "$1/rsync/"
}
tools "$O/before"
chmod 0600 "$R/$CH"
tools "$O/after"
"#;

/// The name chmod-ed between the two tool runs.
const CHMOD_NAME: &str = "a/h2";

/// A tree as the tools copied it: one line per path (type, mode, size, content, nlink, old
/// mtime, and the first path of its inode group); owners left out (the rootless copy is owned
/// by the namespace's user).
fn describe_copy(root: &Path) -> String {
    let s: Snapshot = snapshot(root);
    let mut first_of: BTreeMap<u64, &str> = BTreeMap::new();
    for (p, ino) in &s.inos {
        first_of.entry(*ino).or_insert(p);
    }
    let mut out = String::new();
    for (p, i) in &s.entries {
        let group = first_of[&s.inos[p]];
        out.push_str(&format!(
            "{p:?} {:?} {:04o} size={:?} {} nlink={:?} mtime={:?} same-inode-as={group:?}\n",
            i.kind,
            i.mode,
            i.size,
            i.content.as_deref().unwrap_or(""),
            i.nlink,
            i.mtime
        ));
    }
    if !s.problems.is_empty() {
        out.push_str(&format!("problems: {:?}\n", s.problems));
    }
    out
}

/// What the tools printed or copied, keyed `before/tar -tv` ...
fn tool_outputs(out: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for phase in ["before", "after"] {
        let d = out.join(phase);
        for (key, file) in [
            ("tar -tv", "tar.txt"),
            ("du -sc (regular files)", "du.txt"),
            (
                "du -sbc (regular files, apparent size in bytes)",
                "du-bytes.txt",
            ),
        ] {
            let text =
                std::fs::read_to_string(d.join(file)).unwrap_or_else(|e| format!("<{file}: {e}>"));
            m.insert(format!("{phase}/{key}"), text);
        }
        m.insert(format!("{phase}/cp -a"), describe_copy(&d.join("cp")));
        m.insert(
            format!("{phase}/rsync -aH"),
            describe_copy(&d.join("rsync")),
        );
    }
    m
}

fn tools_ready() -> bool {
    if !env::require_bin_under_test() {
        return false;
    }
    for tool in ["tar", "du", "cp", "rsync"] {
        if env::which(tool).is_none() {
            return skip(&format!("{tool} is not installed (tests/apt-packages.txt)"));
        }
    }
    true
}

/// Runs [`TOOLS`] as root on `tree` mounted by `fs`; returns the outputs.
fn tools_as_root(name: &str, fs: &Fs) -> BTreeMap<String, String> {
    let s = scratch(name);
    let m = tree(false)
        .materialize(&s.path().join("layers"))
        .expect("materialize");
    let mnt = fs
        .mount(&m)
        .unwrap_or_else(|e| panic!("{name}: mount: {e}"));
    let out = s.path().join("out");
    let r = run_command(
        Command::new("sh")
            .args(["-c", TOOLS, "tools"])
            .arg(mnt.root())
            .arg(&out)
            .arg(CHMOD_NAME),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(r.status.success(), "{name}: tools failed {}", r.report());
    mnt.unmount().expect("unmount");
    tool_outputs(&out)
}

fn compare_outputs(an: &str, a: &BTreeMap<String, String>, bn: &str, b: &BTreeMap<String, String>) {
    let mut failures = Vec::new();
    for (k, x) in a {
        let y = b.get(k).map(String::as_str).unwrap_or("<missing>");
        if x != y {
            failures.push(format!("{k}:\n--- {an}:\n{x}--- {bn}:\n{y}"));
        }
    }
    assert!(
        failures.is_empty(),
        "tools see the merged tree differently ({} of {}, chmod of {CHMOD_NAME} between before and after):\n{}",
        failures.len(),
        a.len(),
        failures.join("\n")
    );
}

#[test]
fn tools_as_root_match_kernel() {
    if !tools_ready() {
        return;
    }
    let k = tools_as_root("hl-tools-kernel", &Fs::kernel_index());
    let r = tools_as_root("hl-tools-rustfuse", &Fs::under_test());
    compare_outputs("kernel index=on (root)", &k, "rustfuse (root)", &r);
}

/// Rootless rustfuse (uid 65534 in `unshare -Urm`) against the root kernel's output: kernel
/// overlayfs in a user namespace cannot open file handles and falls back to index=off.
#[test]
fn tools_rootless_match_root_kernel() {
    if !tools_ready() {
        return;
    }
    for tool in ["setpriv", "unshare", "chown"] {
        if env::which(tool).is_none() {
            skip(&format!("{tool} missing (util-linux)"));
            return;
        }
    }
    if let Err(e) = env::dev_fuse_for_everyone("the rootless hard-link tools test") {
        skip(&e);
        return;
    }
    let k = tools_as_root("hl-tools-kernel-for-rootless", &Fs::kernel_index());
    let s = scratch("hl-tools-rootless");
    let base = s.path();
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m: Materialized = tree(false).materialize(&base.join("layers")).unwrap();
    let bin = base.join("rustfuse");
    std::fs::copy(env::bin_under_test(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let chown = run_command(
        Command::new("chown").args(["-R", "65534:65534"]).arg(base),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(chown.status.success(), "chown {}", chown.report());
    let script = format!(
        r#"set -eu
B="$1"; OPTS="$2"; MNT="$3"; OUT="$4"
"$B" -o "$OPTS" "$MNT"
rc=0
timeout 90 sh -c '{}' tools "$MNT" "$OUT" {CHMOD_NAME} || rc=$?
umount "$MNT"
exit $rc
"#,
        TOOLS.replace('\'', r"'\''")
    );
    let out = base.join("out");
    let r = run_command(
        rootless_sh(&script)
            .arg(&bin)
            .arg(m.stack.options())
            .arg(&m.mnt)
            .arg(&out),
        Duration::from_secs(150),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.status.success(),
        "rootless tools run failed {}",
        r.report()
    );
    compare_outputs(
        "kernel index=on (root)",
        &k,
        "rustfuse (rootless)",
        &tool_outputs(&out),
    );
}

// ------------------------------------------------------------ crash

const GROUPS: usize = 24;
const GROUP_FILE: usize = 768 << 10;

/// Names of link group `g`: three, in three directories.
fn group_names(g: usize) -> [String; 3] {
    [
        format!("d{}/g{g}-a", g % 3),
        format!("e/g{g}-b"),
        format!("g{g}-c"),
    ]
}

fn group_content(g: usize) -> Vec<u8> {
    (0..GROUP_FILE).map(|i| ((i + g * 7) % 251) as u8).collect()
}

fn crash_tree() -> Tree {
    let mut l = Layer::new();
    for g in 0..GROUPS {
        let [a, b, c] = group_names(g);
        l = l.file(&a, group_content(g)).link(&b, &a).link(&c, &a);
    }
    Tree::new().lower(l)
}

/// Every group after the crash: all names there, one st_ino, nlink 3, one content that is the
/// old one or the old one plus `!`. Returns how many groups hold the new content.
fn check_groups(root: &Path, what: &str) -> usize {
    let mut appended = 0;
    for g in 0..GROUPS {
        let names = group_names(g);
        let mut seen = Vec::new();
        for n in &names {
            let p = root.join(n);
            let md =
                std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{what}: {n} lost: {e}"));
            let c = std::fs::read(&p).unwrap_or_else(|e| panic!("{what}: read {n}: {e}"));
            seen.push((md.ino(), md.nlink(), c));
        }
        let old = group_content(g);
        let ids: Vec<(u64, u64)> = seen.iter().map(|(i, l, _)| (*i, *l)).collect();
        assert!(
            ids.iter().all(|id| *id == (ids[0].0, 3)),
            "{what}: group {g}: {names:?} show (st_ino, nlink) {ids:?}, want one st_ino and nlink 3"
        );
        let c = &seen[0].2;
        for (n, (_, _, c2)) in names.iter().zip(&seen) {
            assert!(
                c2 == c,
                "{what}: group {g}: {n} and {} differ ({} and {} bytes)",
                names[0],
                c2.len(),
                c.len()
            );
        }
        if *c == old {
            continue;
        }
        assert!(
            c.len() == old.len() + 1 && c[..old.len()] == old[..] && c[old.len()] == b'!',
            "{what}: group {g} holds {} bytes that are neither the old nor the new content",
            c.len()
        );
        appended += 1;
    }
    appended
}

/// Kill -9 of the daemon at a random moment while one name of each group is appended to (a
/// copy-up of 768 KiB each); after a remount every group is whole, old or new.
#[test]
fn kill_during_hard_link_copy_ups() {
    if !env::require_bin_under_test() {
        return;
    }
    let rounds: u64 = env::env_number("RUSTFUSE_CRASH_ROUNDS").unwrap_or(8);
    let seed = env::env_number("RUSTFUSE_TEST_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("seed {seed} (RUSTFUSE_TEST_SEED={seed} repeats it)");
    let mut rng = Rng::new(seed);
    let fs = Fs::under_test();
    for round in 0..rounds {
        let what = format!("round {round}");
        let s = scratch("hl-crash");
        let m = crash_tree().materialize(s.path()).expect("materialize");
        let mnt = fs
            .mount(&m)
            .unwrap_or_else(|e| panic!("{what}: mount: {e}"));
        let root = mnt.root().to_path_buf();
        let writer = std::thread::spawn(move || {
            for g in 0..GROUPS {
                let p = root.join(&group_names(g)[0]);
                let r = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .and_then(|mut f| f.write_all(b"!"));
                if r.is_err() {
                    return g;
                }
            }
            GROUPS
        });
        std::thread::sleep(Duration::from_micros(rng.next_u64() % 250_000));
        let pid = mnt.daemon_pid().expect("daemon pid");
        let pid = rustix::process::Pid::from_raw(pid).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill -9");
        drop(mnt);
        let done = writer.join().expect("writer");
        let mnt = fs
            .mount(&m)
            .unwrap_or_else(|e| panic!("{what}: remount: {e}"));
        let appended = check_groups(mnt.root(), &what);
        eprintln!("{what}: {done} appends returned before the kill, {appended} groups new");
        assert!(
            appended >= done,
            "{what}: {done} appends had returned, only {appended} groups hold them"
        );
        mnt.unmount().expect("unmount");
    }
}

// ------------------------------------------------------------ interop

/// The groups' names in the upper dir `upper` as regular files, by group (first name).
fn upper_names(upper: &Path) -> BTreeMap<&'static str, Vec<&'static str>> {
    let up = describe_upper(upper, &[]);
    let groups: [&[&str]; 4] = [
        &["a/h1", "a/h2", "b/h3"],
        &["h", "d/h-link"],
        &["w/a", "w/c"],
        &["top/t1", "top/t2"],
    ];
    let mut out = BTreeMap::new();
    for g in groups {
        let there: Vec<&str> = g
            .iter()
            .copied()
            .filter(|n| matches!(up.get(*n).map(|e| &e.kind), Some(UKind::File(_))))
            .collect();
        out.insert(g[0], there);
    }
    out
}

/// After rustfuse copied up hard-linked files (writes through two names of one group), other
/// overlays mounting its upper dir read every copied-up name of a group as one file (plain
/// hard links in the upper dir) with the new content and mode.
#[test]
fn copied_up_links_read_by_other_overlays() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("hl-interop");
    let m = tree(false).materialize(s.path()).expect("materialize");
    let writes = vec![
        append("a/h1", "+1"),
        chmod("b/h3", 0o600),
        chmod("d/h-link", 0o600),
        append("w/c", "+w"),
    ];
    let w = Fs::under_test().mount(&m).expect("mount rustfuse");
    let outcomes = ops::run(w.root(), &writes);
    assert!(outcomes.iter().all(Result::is_ok), "writes: {outcomes:?}");
    let written = snap(w.root());
    w.unmount().expect("unmount rustfuse");
    let upper = m.stack.upper.clone().expect("upper");
    let in_upper = upper_names(&upper);
    eprintln!("names in rustfuse's upper dir: {in_upper:?}");
    let mut failures = Vec::new();
    for must in ["a/h1", "b/h3", "d/h-link", "w/c"] {
        if !in_upper.values().flatten().any(|n| *n == must) {
            failures.push(format!("{must}: written through but not in the upper dir"));
        }
    }
    for names in in_upper.values() {
        let inos: Vec<u64> = names
            .iter()
            .map(|n| {
                std::fs::metadata(upper.join(n))
                    .map(|m| m.ino())
                    .unwrap_or(0)
            })
            .collect();
        if inos.windows(2).any(|w| w[0] != w[1]) {
            failures.push(format!(
                "upper dir: {names:?} are not hard links of one file: st_ino {inos:?}"
            ));
        }
    }
    let mut readers: Vec<(String, Fs, Option<PathBuf>)> = vec![
        ("kernel index=off".into(), Fs::Kernel, None),
        (
            "kernel index=on, fresh workdir".into(),
            Fs::kernel_index(),
            Some(s.path().join("work-kernel-index")),
        ),
    ];
    match env::fuse_overlayfs_bin() {
        Some(bin) => readers.push((
            "fuse-overlayfs".into(),
            Fs::Fuse {
                bin,
                opts: Vec::new(),
                env: Vec::new(),
            },
            Some(s.path().join("work-fuse-overlayfs")),
        )),
        None => {
            skip("fuse-overlayfs is not installed: its part of the interop test");
        }
    }
    for (rn, fs, work) in readers {
        let mut mat = m.clone();
        if let Some(w) = work {
            std::fs::create_dir(&w).unwrap();
            mat.stack.work = Some(w);
        }
        let r = fs
            .mount(&mat)
            .unwrap_or_else(|e| panic!("{rn}: mount: {e}"));
        let seen = snap(r.root());
        r.unmount().expect("unmount reader");
        for names in in_upper.values() {
            let mut inos = Vec::new();
            for n in names {
                let (want, got) = (written.entries.get(*n), seen.entries.get(*n));
                let same = match (want, got) {
                    (Some(x), Some(y)) => x.content == y.content && x.mode == y.mode,
                    _ => false,
                };
                if !same {
                    failures.push(format!(
                        "{rn}: {n}: rustfuse wrote {}, {rn} reads {}",
                        want.map(|i| i.to_string()).unwrap_or_default(),
                        got.map(|i| i.to_string()).unwrap_or_default()
                    ));
                }
                inos.push(seen.inos.get(*n).copied());
                if let Some(i) = got {
                    eprintln!("{rn}: {n}: {i}");
                }
            }
            if inos.windows(2).any(|w| w[0] != w[1]) {
                failures.push(format!(
                    "{rn}: {names:?} show different st_ino {inos:?}, not one file"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
