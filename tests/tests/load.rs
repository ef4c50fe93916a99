//! Load: 8 threads doing random filesystem operations on one rustfuse mount over a lower tree
//! of a few thousand entries, for `$RUSTFUSE_LOAD_SECS` seconds (default 120). The threads share
//! one name space, so they collide: renames over lower files and directories, unlinks of what
//! another thread just created, rmdir racing create, and so on.
//!
//! What must hold:
//! - no operation takes longer than [`OP_LIMIT`] (a monitor aborts the FUSE connection and the
//!   test fails instead of hanging);
//! - every answer is a success or an errno the operation can legitimately give in a racing name
//!   space (ENOENT, EEXIST, ENOTEMPTY, EXDEV, ...); never EIO, ESTALE, ENOTCONN, EBADF, ...;
//! - each thread's private file reads back what that thread last wrote;
//! - after unmount the upper directory passes [`fsck`];
//! - after a remount the merged view is the one seen before unmounting (every name, type, mode,
//!   owner, content, link target, xattrs, link count), readdir and lstat agree on every name, and
//!   every file's content is readable.
//!
//! Operation counts (successes and errnos per kind) are printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustfuse_tests::env::{self, bin_under_test, scratch, with_deadline};
use rustfuse_tests::fsck::fsck;
use rustfuse_tests::layers::{Layer, Tree};
use rustfuse_tests::mount::{Mount, Stack, abort_fuse_connection, process_alive};
use rustfuse_tests::ops::{Op, RenameKind, apply};
use rustfuse_tests::rng::Rng;
use rustfuse_tests::snapshot::{self, show_bytes};

const THREADS: usize = 8;
/// Longest any single operation may take.
const OP_LIMIT: Duration = Duration::from_secs(30);
/// Directories of the bottom lower layer (`d0..`), each with files `f0..`, subdirectories
/// `s0..s2` holding `g0..`, and symlinks `ln0..`.
const DIRS: usize = 20;
const FILES: usize = 50;
const SUBFILES: usize = 10;
const LINKS: usize = 5;
/// Directories only in the top lower layer (`e0..`).
const TOP_DIRS: usize = 5;

fn load_secs() -> u64 {
    env::env_number("RUSTFUSE_LOAD_SECS").unwrap_or(120)
}

fn content(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + seed * 7) as u8).collect()
}

/// Two lower layers, about 3,000 entries: the bottom one has `d*/{f*,s*/g*,ln*}`; the top one
/// overrides some files, whites out others (device whiteouts), makes `d*/s2` opaque with new
/// content, and adds `e*/f*`.
fn tree() -> Tree {
    let mut bottom = Layer::new();
    for d in 0..DIRS {
        for f in 0..FILES {
            let n = d * FILES + f;
            bottom = bottom.file(&format!("d{d}/f{f}"), content(n, (n * 997) % 20_000));
        }
        for s in 0..3 {
            for g in 0..SUBFILES {
                bottom = bottom.file(&format!("d{d}/s{s}/g{g}"), format!("bottom d{d}/s{s}/g{g}"));
            }
        }
        for l in 0..LINKS {
            bottom = bottom.symlink(&format!("d{d}/ln{l}"), &format!("f{l}"));
        }
    }
    let mut top = Layer::new();
    for d in 0..DIRS / 2 {
        for f in 0..10 {
            top = top.file(&format!("d{d}/f{f}"), format!("top d{d}/f{f}"));
        }
        for f in 40..45 {
            top = top.whiteout(&format!("d{d}/f{f}"));
        }
        top = top.opaque_dir(&format!("d{d}/s2"));
        top = top.file(&format!("d{d}/s2/g0"), "top opaque g0");
    }
    for e in 0..TOP_DIRS {
        for f in 0..FILES {
            top = top.file(&format!("e{e}/f{f}"), format!("top e{e}/f{f}"));
        }
    }
    Tree::new().lower(top).lower(bottom)
}

/// Where the random operations happen: directories, and for each kind of directory the names
/// its lower version holds plus a few new ones, so most operations find their target.
struct Space {
    parents: Vec<String>,
    /// Names for the root, for `d*` and `e*`, and for `d*/s*` and `*/n0`.
    root_names: Vec<String>,
    dir_names: Vec<String>,
    sub_names: Vec<String>,
}

impl Space {
    fn new() -> Space {
        let mut parents = vec![String::new()];
        for d in 0..DIRS {
            parents.push(format!("d{d}"));
            for s in 0..3 {
                parents.push(format!("d{d}/s{s}"));
            }
            parents.push(format!("d{d}/n0"));
        }
        for e in 0..TOP_DIRS {
            parents.push(format!("e{e}"));
            parents.push(format!("e{e}/n0"));
        }
        let fresh = || {
            (0..2)
                .map(|n| format!("n{n}"))
                .chain((0..6).map(|x| format!("x{x}")))
        };
        let mut root_names: Vec<String> = (0..DIRS).map(|d| format!("d{d}")).collect();
        root_names.extend((0..TOP_DIRS).map(|e| format!("e{e}")));
        root_names.extend(fresh());
        let mut dir_names: Vec<String> = (0..FILES).map(|f| format!("f{f}")).collect();
        dir_names.extend((0..3).map(|s| format!("s{s}")));
        dir_names.extend((0..LINKS).map(|l| format!("ln{l}")));
        dir_names.extend(fresh());
        let mut sub_names: Vec<String> = (0..SUBFILES).map(|g| format!("g{g}")).collect();
        sub_names.extend(fresh());
        Space {
            parents,
            root_names,
            dir_names,
            sub_names,
        }
    }

    fn path(&self, rng: &mut Rng) -> String {
        let parent = rng.pick(&self.parents);
        if parent.is_empty() {
            return rng.pick(&self.root_names).clone();
        }
        let names = if parent.contains('/') {
            &self.sub_names
        } else {
            &self.dir_names
        };
        format!("{parent}/{}", rng.pick(names))
    }

    fn dir(&self, rng: &mut Rng) -> String {
        rng.pick(&self.parents).clone()
    }
}

/// One random operation (the private-file check is separate, see [`worker`]).
fn random_op(space: &Space, rng: &mut Rng, t: usize) -> Op {
    let path = space.path(rng);
    match rng.below(20) {
        0 => Op::Create { path, mode: 0o644 },
        1 | 2 => Op::WriteAll {
            path,
            data: content(t + rng.below(1000), rng.below(8192)),
        },
        3 => Op::Append {
            path,
            data: format!("+t{t}").into_bytes(),
        },
        4 => Op::Truncate {
            path,
            len: rng.below(10_000) as u64,
        },
        5 => Op::Mkdir { path, mode: 0o755 },
        6 => Op::Rmdir { path },
        7 => Op::Unlink { path },
        8 | 9 => Op::Rename {
            from: path,
            to: space.path(rng),
            kind: match rng.below(8) {
                0 => RenameKind::NoReplace,
                1 => RenameKind::Exchange,
                _ => RenameKind::Plain,
            },
        },
        10 => Op::Chmod {
            path,
            mode: *rng.pick(&[0o644, 0o600, 0o755, 0o700, 0o640, 0o4755]),
        },
        11 => Op::Chown {
            path,
            uid: *rng.pick(&[0, 1, 1000, 65534]),
            gid: *rng.pick(&[0, 2, 1000]),
        },
        12 => Op::SetXattr {
            path,
            name: format!("user.load{}", rng.below(3)),
            value: format!("t{t}").into_bytes(),
        },
        13 => Op::Symlink {
            target: format!("../{}", rng.pick(&space.dir_names)),
            path,
        },
        14 => Op::Link {
            from: path,
            to: space.path(rng),
        },
        15 => Op::Readdir {
            path: space.dir(rng),
        },
        16 | 17 => Op::Stat { path },
        _ => Op::Read { path },
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Create { .. } => "create",
        Op::WriteAll { .. } => "write",
        Op::Append { .. } => "append",
        Op::Truncate { .. } => "truncate",
        Op::Mkdir { .. } => "mkdir",
        Op::Rmdir { .. } => "rmdir",
        Op::Unlink { .. } => "unlink",
        Op::Rename {
            kind: RenameKind::Plain,
            ..
        } => "rename",
        Op::Rename {
            kind: RenameKind::NoReplace,
            ..
        } => "rename-noreplace",
        Op::Rename {
            kind: RenameKind::Exchange,
            ..
        } => "rename-exchange",
        Op::Chmod { .. } => "chmod",
        Op::Chown { .. } => "chown",
        Op::SetXattr { .. } => "setxattr",
        Op::Symlink { .. } => "symlink",
        Op::Link { .. } => "link",
        Op::Readdir { .. } => "readdir",
        Op::Stat { .. } => "stat",
        Op::Read { .. } => "read",
        _ => "other",
    }
}

/// Errnos a racing name space explains. Anything else is a failure.
const EXPECTED: &[&str] = &[
    "ENOENT",    // the name is not there (never was, or another thread removed it)
    "EEXIST",    // create/mkdir/link/symlink/NOREPLACE onto an existing name
    "ENOTDIR",   // a path component or a rename target is not a directory
    "EISDIR",    // write/truncate/unlink/link/rename-over on a directory
    "ENOTEMPTY", // rmdir or rename over a non-empty directory
    "EXDEV",     // rename of a directory that is not purely in the upper layer
    "EINVAL",    // rename of a directory into its own subtree
    "EPERM",     // link of a directory; user.* xattr on a symlink
    "ELOOP",     // a symlink pointing (through ..) back at itself
    "EMLINK",    // link count limit (not expected, but legitimate)
];

/// Per thread: the operation in flight (for the monitor).
#[derive(Default)]
struct Slot {
    /// Milliseconds since the test's epoch when the current op started, +1; 0 when idle.
    started: AtomicU64,
    op: Mutex<Option<Op>>,
}

/// Counts per operation kind: successes, and each errno.
type Counts = BTreeMap<&'static str, BTreeMap<String, u64>>;

struct WorkerResult {
    counts: Counts,
    problems: Vec<String>,
    /// The slowest operation of the thread and its duration.
    slowest: (Duration, String),
}

fn worker(
    t: usize,
    root: PathBuf,
    space: Arc<Space>,
    slot: Arc<Slot>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> WorkerResult {
    let mut rng = Rng::new(0x5EED_0000 + t as u64);
    let mut counts = Counts::new();
    let mut problems = Vec::new();
    let own = format!("t{t}/own");
    let mut own_content: Option<Vec<u8>> = None;
    let mut n = 0u64;
    let mut slowest = (Duration::ZERO, String::new());
    let mut run = |op: &Op, slot: &Slot| {
        *slot.op.lock().unwrap() = Some(op.clone());
        let t = Instant::now();
        slot.started
            .store(epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let out = apply(&root, op);
        slot.started.store(0, Ordering::SeqCst);
        if t.elapsed() > slowest.0 {
            slowest = (t.elapsed(), format!("{op:?}"));
        }
        out
    };
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        // One op in 16 checks the thread's private file: write, then read back.
        if n % 16 == 0 {
            let op = match &own_content {
                Some(c) if rng.below(2) == 0 => Op::Read { path: own.clone() },
                _ => {
                    let c = content(t * 1000 + rng.below(1000), 1 + rng.below(20_000));
                    own_content = Some(c.clone());
                    Op::WriteAll {
                        path: own.clone(),
                        data: c,
                    }
                }
            };
            let out = run(&op, &slot);
            let expected_read = match (&op, &own_content) {
                (Op::Read { .. }, Some(c)) => Some(show_bytes(c)),
                _ => None,
            };
            match (&out, expected_read) {
                (Ok(got), Some(want)) if *got != want => {
                    problems.push(format!("thread {t}: {own} reads {got}, last wrote {want}"));
                }
                (Err(e), _) => problems.push(format!("thread {t}: {op:?}: {e}")),
                _ => {}
            }
            let key = out.err().unwrap_or_else(|| "ok".into());
            *counts
                .entry("private write/read")
                .or_default()
                .entry(key)
                .or_default() += 1;
            continue;
        }
        let op = random_op(&space, &mut rng, t);
        let out = run(&op, &slot);
        let key = match &out {
            Ok(_) => "ok".to_string(),
            Err(e) => e.clone(),
        };
        if let Err(e) = &out {
            if !EXPECTED.contains(&e.as_str()) && problems.len() < 20 {
                problems.push(format!("thread {t} op {n}: {op:?}: {e}"));
            }
        }
        *counts
            .entry(op_name(&op))
            .or_default()
            .entry(key)
            .or_default() += 1;
    }
    WorkerResult {
        counts,
        problems,
        slowest,
    }
}

/// Watches the slots; an op older than [`OP_LIMIT`] aborts the FUSE connection (so the stuck
/// threads get ENOTCONN) and is reported. Returns the hangs seen.
fn monitor(
    slots: Vec<Arc<Slot>>,
    epoch: Instant,
    conn: Option<u32>,
    done: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut hangs = Vec::new();
    while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_millis(500)) {
        let now = epoch.elapsed().as_millis() as u64;
        for (t, s) in slots.iter().enumerate() {
            let started = s.started.load(Ordering::SeqCst);
            if started != 0 && now.saturating_sub(started - 1) > OP_LIMIT.as_millis() as u64 {
                let op = s.op.lock().unwrap().clone();
                hangs.push(format!(
                    "thread {t}: {op:?} still running after {OP_LIMIT:?}"
                ));
            }
        }
        if !hangs.is_empty() {
            eprintln!(
                "load: hang detected, aborting the FUSE connection:\n{}",
                hangs.join("\n")
            );
            stop.store(true, Ordering::SeqCst);
            if let Some(c) = conn {
                abort_fuse_connection(c);
            }
            break;
        }
    }
    hangs
}

fn mount(stack: &Stack, mnt: &Path) -> Mount {
    Mount::fuse(&bin_under_test(), stack, &[], mnt).unwrap_or_else(|e| panic!("mount: {e}"))
}

/// Snapshot of the merged view with a deadline; its own problems (readdir vs lstat, unreadable
/// content, link counts) fail the test.
fn snapshot_of(root: &Path, what: &str) -> snapshot::Snapshot {
    let r = root.to_path_buf();
    let t = Instant::now();
    let s = with_deadline(Duration::from_secs(300), what, move || {
        snapshot::snapshot(&r)
    });
    eprintln!(
        "load: {what}: {} entries in {:.1?}",
        s.entries.len(),
        t.elapsed()
    );
    assert!(
        s.problems.is_empty(),
        "{what}: {} problems:\n{}",
        s.problems.len(),
        s.problems.join("\n")
    );
    s
}

fn print_counts(total: &Counts, secs: f64) {
    let mut all = 0;
    eprintln!("load: operation counts (ok and errnos per kind):");
    for (kind, by) in total {
        let n: u64 = by.values().sum();
        all += n;
        let detail: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v}")).collect();
        eprintln!("  {kind:<18} {n:>7}  {}", detail.join(", "));
    }
    eprintln!(
        "load: {all} operations in {secs:.0} s ({:.0}/s) by {THREADS} threads",
        all as f64 / secs
    );
}

#[test]
fn eight_threads_of_random_operations_then_fsck_and_remount() {
    if !env::require_bin_under_test() {
        return;
    }
    let secs = load_secs();
    let s = scratch("load");
    let t0 = Instant::now();
    let mut m = tree()
        .materialize(s.path())
        .expect("materialize lower tree");
    m.mnt = m.mnt.canonicalize().unwrap();
    eprintln!("load: lower tree written in {:.1?}", t0.elapsed());

    let mut g = mount(&m.stack, &m.mnt);
    // The run outlasts the guard's default watchdog on purpose; each op has its own limit.
    g.rearm_watchdog(Duration::from_secs(secs) + Duration::from_secs(600));
    let root = m.mnt.clone();
    for t in 0..THREADS {
        std::fs::create_dir(root.join(format!("t{t}"))).expect("private dir");
    }

    let epoch = Instant::now();
    let space = Arc::new(Space::new());
    let stop = Arc::new(AtomicBool::new(false));
    let slots: Vec<Arc<Slot>> = (0..THREADS).map(|_| Arc::new(Slot::default())).collect();
    let (done_tx, done_rx) = mpsc::channel();
    let mon = {
        let (slots, stop, conn) = (slots.clone(), stop.clone(), g.connection());
        std::thread::spawn(move || monitor(slots, epoch, conn, done_rx, stop))
    };
    let (res_tx, res_rx) = mpsc::channel();
    for (t, slot) in slots.iter().enumerate() {
        let (root, space, slot, stop) = (root.clone(), space.clone(), slot.clone(), stop.clone());
        let tx = res_tx.clone();
        std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || {
                let _ = tx.send(worker(t, root, space, slot, epoch, stop));
            })
            .unwrap();
    }
    drop(res_tx);
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::SeqCst);
    // Every worker finishes its op in flight: within OP_LIMIT, or the monitor aborts the
    // connection and it fails with ENOTCONN soon after.
    let mut results = Vec::new();
    let give_up = Instant::now() + OP_LIMIT + Duration::from_secs(30);
    while results.len() < THREADS {
        let left = give_up.saturating_duration_since(Instant::now());
        match res_rx.recv_timeout(left) {
            Ok(r) => results.push(r),
            Err(_) => break,
        }
    }
    let ran = epoch.elapsed().as_secs_f64();
    let _ = done_tx.send(());
    let hangs = mon.join().expect("monitor");
    assert!(hangs.is_empty(), "operations hung:\n{}", hangs.join("\n"));
    assert_eq!(
        results.len(),
        THREADS,
        "{} worker threads never finished",
        THREADS - results.len()
    );

    let mut total = Counts::new();
    let mut problems = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    for r in results {
        if r.slowest.0 > slowest.0 {
            slowest = r.slowest;
        }
        for (k, by) in r.counts {
            let e = total.entry(k).or_default();
            for (errno, n) in by {
                *e.entry(errno).or_default() += n;
            }
        }
        problems.extend(r.problems);
    }
    print_counts(&total, ran);
    let mut shown = slowest.1;
    shown.truncate(160);
    eprintln!("load: slowest operation {:.1?}: {shown}", slowest.0);
    assert!(
        problems.is_empty(),
        "unexpected answers:\n{}",
        problems.join("\n")
    );
    let pid = g.daemon_pid();
    assert!(
        pid.is_none_or(process_alive),
        "the daemon died during the load"
    );

    let before = snapshot_of(&root, "merged view after the load");
    g.unmount().expect("unmount after the load");

    let t = Instant::now();
    let findings = fsck(&m.stack);
    eprintln!(
        "load: fsck of the upper layer: {} findings in {:.1?}",
        findings.len(),
        t.elapsed()
    );
    let shown: Vec<String> = findings.iter().take(50).map(|f| f.to_string()).collect();
    assert!(
        findings.is_empty(),
        "fsck of the upper layer after the load, {} findings:\n{}",
        findings.len(),
        shown.join("\n")
    );

    let g = mount(&m.stack, &m.mnt);
    let after = snapshot_of(&root, "merged view after remount");
    let diff = snapshot::diff(&before, "before unmount", &after, "after remount");
    assert!(
        diff.is_empty(),
        "the merged view changed across the remount ({} paths):\n{}",
        diff.len(),
        diff.iter().take(50).cloned().collect::<Vec<_>>().join("\n")
    );
    g.unmount().expect("unmount after the check");
    eprintln!("load: total wall time {:.1?}", t0.elapsed());
}
