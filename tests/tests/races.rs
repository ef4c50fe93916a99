//! Names changing under inode operations: a few names in one directory tree, three threads
//! renaming (plain and RENAME_EXCHANGE), unlinking, creating files, symlinks and directories
//! and linking them, while five threads lstat, open, read, fstat, append, list and read xattrs
//! of the same names and of files they keep open. The kernel serializes the name changes of a
//! directory but not a getattr, open or setattr of the inode whose name is changing, so the
//! daemon sees them interleaved.
//!
//! What must hold: no answer but success or an errno a racing name space explains (ENOENT,
//! EEXIST, EISDIR, ...). In particular never EIO: the kernel marks an inode bad, and answers
//! EIO for it from then on, when the daemon's attributes for it name another file type (what a
//! file's old name holds for a moment while it is renamed: a whiteout, or the other file of
//! an exchange). Found by this test: renames moved a file before its node was pinned, ~500 EIO
//! in 20 s here; the 8-thread load test met it about once per million operations.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustfuse_tests::env::{self, bin_under_test, scratch, with_deadline};
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::mount::{LoopExt4, Mount, open_fds};
use rustfuse_tests::ops::errno_name;
use rustfuse_tests::rng::Rng;

/// Seconds each whiteout format runs (`$RUSTFUSE_RACE_SECS`).
fn race_secs() -> u64 {
    env::env_number("RUSTFUSE_RACE_SECS").unwrap_or(10)
}

const DIRS: [&str; 4] = ["", "d0/", "d1/", "d0/e/"];
const FILES: usize = 5;

/// Errnos the racing name space explains: the name is missing or of another type (a
/// symlink: ELOOP for O_NOFOLLOW; a directory: EISDIR, ENOTDIR, ENOTEMPTY), link of a
/// directory (EPERM), and EEXIST only for what makes a name.
fn expected(op: &str, errno: &str) -> bool {
    match op {
        // A file once open stays usable, whatever happens to its name (a directory opened
        // for reading answers read with EISDIR).
        "read+fstat after open" | "fstat+read held" => errno == "EISDIR",
        "write+fstat after open" => false,
        _ => match errno {
            "ENOENT" | "EISDIR" | "ENOTDIR" | "ENOTEMPTY" | "ELOOP" => true,
            "EPERM" => op == "link",
            "EEXIST" => matches!(op, "mkdir" | "symlink" | "link"),
            _ => false,
        },
    }
}

/// Operations that must succeed sometimes, or the race did not happen.
const MUST_SUCCEED: &[&str] = &["rename", "exchange", "unlink", "create", "open", "lstat"];

fn names() -> Vec<String> {
    DIRS.iter()
        .flat_map(|d| (0..FILES).map(move |i| format!("{d}f{i}")))
        .collect()
}

/// Two lower layers: files in every directory below, a symlink and a second hard link above.
fn tree() -> Tree {
    let mut bottom = Layer::new();
    let mut top = Layer::new();
    for d in DIRS {
        for i in 0..FILES - 1 {
            if d == "d1/" && i == 3 {
                continue;
            }
            bottom = bottom.file(&format!("{d}f{i}"), vec![b'a' + i as u8; 3000]);
        }
        top = top.symlink(&format!("{d}f{}", FILES - 1), "elsewhere");
    }
    let bottom = bottom.link("d1/f3", "f0");
    Tree::new().lower(top).lower(bottom)
}

type Counts = Arc<Mutex<BTreeMap<(&'static str, String), u64>>>;

fn count(counts: &Counts, op: &'static str, r: std::io::Result<()>) {
    let key = match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.raw_os_error().map(errno_name).unwrap_or(e.to_string()),
    };
    *counts.lock().unwrap().entry((op, key)).or_default() += 1;
}

fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(std::io::Error::from)
}

fn mutate(root: &Path, names: &[String], rng: &mut Rng, counts: &Counts) {
    let a = root.join(&names[rng.below(names.len())]);
    let b = root.join(&names[rng.below(names.len())]);
    let (op, r): (&'static str, std::io::Result<()>) = match rng.below(100) {
        0..=4 => ("rmdir", fs::remove_dir(&a)),
        5..=29 => ("rename", fs::rename(&a, &b)),
        30..=37 => ("exchange", exchange(&a, &b)),
        38..=44 => ("unlink", fs::remove_file(&a)),
        45..=59 => (
            "create",
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&a)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &[b'x'; 1000])),
        ),
        60..=69 => ("symlink", symlink("elsewhere", &a)),
        70..=74 => ("mkdir", fs::create_dir(&a)),
        75..=79 => ("link", fs::hard_link(&a, &b)),
        80..=89 => (
            "chmod",
            rustix::fs::chmod(&a, rustix::fs::Mode::from_raw_mode(0o640))
                .map_err(std::io::Error::from),
        ),
        _ => (
            "truncate",
            fs::OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&a)
                .and_then(|f| f.set_len(10)),
        ),
    };
    // A chmod or truncate through a symlink reaches outside: a missing target is ENOENT.
    count(counts, op, r);
}

fn inspect(
    root: &Path,
    names: &[String],
    rng: &mut Rng,
    held: &mut Vec<fs::File>,
    counts: &Counts,
) {
    let a = root.join(&names[rng.below(names.len())]);
    let nofollow = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32;
    let open = |write: bool| {
        fs::OpenOptions::new()
            .read(!write)
            .append(write)
            .custom_flags(nofollow)
            .open(&a)
    };
    let (op, r): (&'static str, std::io::Result<()>) = match rng.below(100) {
        0..=24 => ("lstat", fs::symlink_metadata(&a).map(drop)),
        25..=49 => match open(false) {
            Ok(mut f) => {
                count(counts, "open", Ok(()));
                let mut buf = [0u8; 100];
                let r = f
                    .read(&mut buf)
                    .and_then(|_| f.metadata())
                    .and_then(|_| f.read(&mut buf))
                    .map(drop);
                ("read+fstat after open", r)
            }
            Err(e) => ("open", Err(e)),
        },
        50..=64 => ("open and keep", open(false).map(|f| held.push(f))),
        65..=74 => (
            "readdir",
            fs::read_dir(a.parent().unwrap()).and_then(|mut d| d.try_for_each(|e| e.map(drop))),
        ),
        75..=84 => (
            "listxattr",
            rustix::fs::llistxattr(&a, &mut [0u8; 1024])
                .map(drop)
                .map_err(std::io::Error::from),
        ),
        _ => match open(true) {
            Ok(mut f) => {
                count(counts, "open for append", Ok(()));
                let r =
                    std::io::Write::write_all(&mut f, b"+").and_then(|_| f.metadata().map(drop));
                ("write+fstat after open", r)
            }
            Err(e) => ("open for append", Err(e)),
        },
    };
    count(counts, op, r);
    if held.len() > 4 {
        // A file kept open while its name went: fstat and read must still work.
        let mut f = held.remove(0);
        let r = f.metadata().and_then(|_| f.read(&mut [0u8; 10])).map(drop);
        count(counts, "fstat+read held", r);
    }
}

fn run(format: &str, env: &[(&str, &str)]) -> Vec<String> {
    let s = scratch(&format!("races-{format}"));
    let Materialized { stack, mnt } = tree().materialize(s.path()).unwrap();
    let m = Mount::fuse_env(&bin_under_test(), &stack, &[], &mnt, env).unwrap();
    let root: PathBuf = m.root().to_path_buf();
    let secs = race_secs();
    let counts: Counts = Arc::default();
    let c = counts.clone();
    with_deadline(Duration::from_secs(secs + 60), "racing names", move || {
        let names = Arc::new(names());
        let until = Instant::now() + Duration::from_secs(secs);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (root, names, counts) = (root.clone(), names.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(t * 7919 + 1);
                    let mut held = Vec::new();
                    while Instant::now() < until {
                        if t < 3 {
                            mutate(&root, &names, &mut rng, &counts);
                        } else {
                            inspect(&root, &names, &mut rng, &mut held, &counts);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a racing thread panicked");
        }
    });
    m.unmount().unwrap();
    let counts = counts.lock().unwrap();
    let mut per_op: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((op, answer), n) in counts.iter() {
        per_op.entry(op).or_default().push(format!("{answer} {n}"));
    }
    let total: u64 = counts.values().sum();
    println!("races ({format} whiteouts): {total} operations in {secs} s");
    for (op, answers) in &per_op {
        println!("  {op:18} {}", answers.join(", "));
    }
    let mut problems: Vec<String> = counts
        .iter()
        .filter(|((op, answer), _)| answer != "ok" && !expected(op, answer))
        .map(|((op, answer), n)| format!("{format} whiteouts: {op} answered {answer} {n} times"))
        .collect();
    for op in MUST_SUCCEED {
        if !counts.contains_key(&(*op, "ok".to_string())) {
            problems.push(format!("{format} whiteouts: no {op} succeeded"));
        }
    }
    problems
}

#[test]
fn getattr_open_and_setattr_racing_renames_never_see_another_file() {
    if !env::require_bin_under_test() {
        return;
    }
    let mut problems = run("device", &[]);
    problems.extend(run(
        ".wh. file",
        &[("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT", "1")],
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Changes through a descriptor of a lower file opened before its unlink: they reach the open
/// file (copied up to an anonymous file) and the name stays gone, now and after a remount.
/// fuse-overlayfs 1.x does the same; kernel overlayfs answers EEXIST (it copies up to the old
/// name, where the whiteout is). Before, rustfuse answered EEXIST with device whiteouts and,
/// with `.wh.` whiteouts, brought the unlinked file back.
#[test]
fn a_lower_file_changed_through_a_descriptor_after_its_unlink_stays_gone() {
    if !env::require_bin_under_test() {
        return;
    }
    let mut problems = Vec::new();
    for (format, env) in [
        ("device", vec![]),
        (
            ".wh. file",
            vec![("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT", "1")],
        ),
    ] {
        let s = scratch("races-unlinked");
        let tree = Tree::new().lower(Layer::new().file("d/f", "hello").file("d/g", "other"));
        let Materialized { stack, mnt } = tree.materialize(s.path()).unwrap();
        let mount = || Mount::fuse_env(&bin_under_test(), &stack, &[], &mnt, &env).unwrap();
        let m = mount();
        let f = m.root().join("d/f");
        let root = m.root().to_path_buf();
        let seen = with_deadline(Duration::from_secs(60), "change after unlink", move || {
            let mut file = fs::File::open(&f).unwrap();
            fs::remove_file(&f).unwrap();
            let mut seen = Vec::new();
            let mut step = |what: &str, r: std::io::Result<()>| {
                seen.push(match r {
                    Ok(()) => format!("{what}: ok"),
                    Err(e) => format!("{what}: {e}"),
                })
            };
            step(
                "fchmod",
                rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(0o600))
                    .map_err(Into::into),
            );
            step(
                "fsetxattr",
                rustix::fs::fsetxattr(&file, "user.k", b"v", rustix::fs::XattrFlags::empty())
                    .map_err(Into::into),
            );
            step("futimens", file.set_modified(std::time::UNIX_EPOCH));
            let meta = file.metadata().unwrap();
            seen.push(format!("mode {:o}", meta.permissions().mode() & 0o7777));
            let mut content = String::new();
            file.read_to_string(&mut content).unwrap();
            seen.push(format!("content {content:?}"));
            let names: Vec<_> = fs::read_dir(root.join("d"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            seen.push(format!("listing {names:?}"));
            seen
        });
        let want = [
            "fchmod: ok",
            "fsetxattr: ok",
            "futimens: ok",
            "mode 600",
            "content \"hello\"",
            "listing [\"g\"]",
        ];
        if seen != want {
            problems.push(format!("{format} whiteouts: {seen:?}, want {want:?}"));
        }
        m.unmount().unwrap();
        let m = mount();
        if fs::symlink_metadata(m.root().join("d/f")).is_ok() {
            problems.push(format!("{format} whiteouts: d/f is back after a remount"));
        }
        m.unmount().unwrap();
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A descriptor opened for reading while the file is only in a lower layer reads the upper
/// copy once another open has copied it up and written it, as on kernel overlayfs (4.19+):
/// never the old lower data, and never short of the size the kernel shows. (The concurrency
/// test met the short read: a reader opened just before an append's copy-up saw the new size
/// and read the old file.)
#[test]
fn a_file_opened_for_reading_before_its_copy_up_reads_the_copy() {
    use std::os::unix::fs::FileExt;
    if !env::require_bin_under_test() {
        return;
    }
    const SIZE: usize = 1 << 20;
    let mut seen = Vec::new();
    for fs_ in ["kernel overlayfs", "rustfuse"] {
        let s = scratch("races-reader-copyup");
        let tree = Tree::new().lower(Layer::new().file("f", vec![b'a'; SIZE]));
        let Materialized { stack, mnt } = tree.materialize(s.path()).unwrap();
        let m = if fs_ == "rustfuse" {
            Mount::fuse(&bin_under_test(), &stack, &[], &mnt).unwrap()
        } else {
            Mount::kernel(&stack, &mnt).unwrap()
        };
        let f = m.root().join("f");
        let got = with_deadline(
            Duration::from_secs(60),
            "reader across a copy-up",
            move || {
                let reader = fs::File::open(&f).unwrap();
                let mut one = [0u8; 1];
                reader.read_exact_at(&mut one, 0).unwrap();
                let writer = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&f)
                    .unwrap();
                writer.write_all_at(b"B", SIZE as u64 / 2).unwrap();
                writer.write_all_at(b"tail", SIZE as u64).unwrap();
                writer.sync_all().unwrap();
                drop(writer);
                // Out of the page cache, so the next read asks the filesystem.
                rustix::fs::fadvise(&reader, 0, None, rustix::fs::Advice::DontNeed).unwrap();
                let mut mid = [0u8; 1];
                reader.read_exact_at(&mut mid, SIZE as u64 / 2).unwrap();
                let mut end = vec![0u8; 8];
                let n = reader.read_at(&mut end, SIZE as u64 - 4).unwrap();
                end.truncate(n);
                format!(
                    "middle {:?}, end {:?}",
                    mid[0] as char,
                    String::from_utf8_lossy(&end)
                )
            },
        );
        m.unmount().unwrap();
        seen.push(format!("{fs_}: {got}"));
    }
    let want = "middle 'B', end \"aaaatail\"";
    assert!(
        seen.iter().all(|s| s.ends_with(want)),
        "want {want} on both: {seen:?}"
    );
}

/// A directory held open while it is removed stays itself when the upper filesystem gives
/// its inode number to a new file. A directory's node id is its inode number, and the kernel
/// marks an inode bad (EIO from then on) when a reply names its id with another type: the
/// daemon keeps a removed directory open until the kernel forgets it, as it keeps an
/// unlinked file. (The racing test above met this about once in 25 runs, a held directory's
/// fstat answering EIO.) A journaled ext4 gives a freed inode number back at once (one without
/// a journal waits ~30 s); a low descriptor limit makes the daemon's directory cache drop the
/// fd of the removed directory while directories are made.
#[test]
fn a_removed_directory_held_open_stays_itself_when_its_inode_number_comes_back() {
    if !env::require_privileged() || !env::require_bin_under_test() {
        return;
    }
    for tool in ["prlimit", "setpriv", "mkfs.ext4"] {
        if env::which(tool).is_none() {
            env::skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let s = scratch("races-removed-dir");
    let disk = LoopExt4::mount(&s.path().join("disk"), &[]);
    let [lower, upper, work, mnt] = ["lower", "upper", "work", "mnt"].map(|d| {
        let p = disk.path.join(d);
        fs::create_dir_all(&p).unwrap();
        p
    });
    fs::write(lower.join("f"), "lower").unwrap();
    let stack = rustfuse_tests::mount::Stack {
        lowers: vec![lower],
        upper: Some(upper.clone()),
        work: Some(work),
    };
    // 64 descriptors: a directory cache of 16.
    let mnt = mnt.canonicalize().unwrap();
    let m = Mount::fuse_nofile(&bin_under_test(), &stack, 64, &mnt).unwrap();
    let pid = m.daemon_pid().expect("daemon pid");
    let root = m.root().to_path_buf();
    let upper_p = upper.clone();
    let results = with_deadline(Duration::from_secs(120), "removed dir", move || {
        use std::os::unix::fs::MetadataExt;
        let mut results = Vec::new();
        for (round, how) in ["rmdir", "rename over"].into_iter().enumerate() {
            let p = root.join(format!("p{round}"));
            fs::create_dir_all(p.join("d")).unwrap();
            let held = fs::File::open(p.join("d")).unwrap();
            let shown = held.metadata().unwrap().ino();
            let real = fs::metadata(upper_p.join(format!("p{round}/d")))
                .unwrap()
                .ino();
            if how == "rmdir" {
                fs::remove_dir(p.join("d")).unwrap();
            } else {
                fs::create_dir(p.join("e")).unwrap();
                fs::rename(p.join("e"), p.join("d")).unwrap();
            }
            // New directories push the removed one's fd out of the daemon's cache; new files
            // take the lowest free inode numbers, its own among them once it is free.
            let mut reused = false;
            for i in 0..200 {
                fs::create_dir(root.join(format!("c{round}-{i}"))).unwrap();
                fs::write(p.join(format!("f{i}")), "new").unwrap();
                let up = upper_p.join(format!("p{round}/f{i}"));
                reused |= fs::metadata(up).unwrap().ino() == real;
            }
            let after = held.metadata();
            drop(held);
            let report = match after {
                Ok(md) if md.is_dir() && md.ino() == shown => None,
                Ok(md) => Some(format!(
                    "{how}: the held directory (inode {shown}) shows as {:?}, inode {}",
                    md.file_type(),
                    md.ino()
                )),
                Err(e) => Some(format!("{how}: fstat of the held directory: {e}")),
            };
            results.push((how, report, reused));
        }
        results
    });
    // Once the kernel has forgotten it, the daemon lets the directory go.
    let released = env::poll_until(Duration::from_secs(10), || {
        !open_fds(pid)
            .iter()
            .any(|fd| fd.target.starts_with(&upper) && fd.target.ends_with("d (deleted)"))
    });
    m.unmount().unwrap();
    drop(disk);
    for (how, _, reused) in &results {
        println!("{how}: the removed directory's inode number given to a new file: {reused}");
    }
    let problems: Vec<_> = results.into_iter().filter_map(|(_, r, _)| r).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(released, "the daemon still holds a removed directory");
}
