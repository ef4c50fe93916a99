//! Scale: one directory of `$RUSTFUSE_SCALE_ENTRIES` entries (default 1,000,000), written
//! straight into a lower layer on disk (under `$RUSTFUSE_TEST_TMPDIR`, else /var/tmp: not a
//! tmpfs), then seen through a rustfuse mount:
//! - readdir returns every name exactly once (and nothing else);
//! - lookups of random names answer, a missing name answers ENOENT;
//! - create and unlink in that directory work and the next readdir shows them;
//! - walking the directory (lstat of every entry) keeps the daemon's VmRSS under
//!   [`RSS_BASE_BOUND`] + [`RSS_PER_ENTRY_BOUND`] per entry, and after
//!   `echo 2 > /proc/sys/vm/drop_caches` (the kernel forgets its inodes and sends FORGET) the
//!   daemon's VmRSS falls back by at least half of what the walk added.
//!
//! Each phase has a deadline (a walk that stops progressing for [`STALL_LIMIT`] fails); the
//! figures (times, RSS samples) are printed.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustfuse_tests::env::{self, bin_under_test, poll_until, with_deadline};
use rustfuse_tests::mount::{Mount, Stack, abort_fuse_connection};
use rustix::fs::{Mode, OFlags};

/// Daemon VmRSS allowed during the walk: this much plus [`RSS_PER_ENTRY_BOUND`] per entry.
const RSS_BASE_BOUND: u64 = 64 << 20;
/// Bytes of daemon memory allowed per entry held by the kernel (a node, its name, its place in
/// the inode table and in the parent's child index). The walk peaked at 520-580 MiB for a
/// million entries while a node took a 256-byte chunk and its lower part a 176-byte one,
/// ~400 MiB since: this bound fails the first.
const RSS_PER_ENTRY_BOUND: u64 = 512;
/// A phase that makes no progress for this long fails.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Lookups of random names.
const LOOKUPS: usize = 2000;
/// Files created and lower files unlinked through the mount.
const CHANGES: usize = 20;

fn entries() -> usize {
    env::env_number("RUSTFUSE_SCALE_ENTRIES").unwrap_or(1_000_000)
}

fn name(i: usize) -> String {
    format!("e{i:07}")
}

/// A scratch directory on a disk filesystem: `$RUSTFUSE_TEST_TMPDIR` or /var/tmp.
fn disk_scratch() -> tempfile::TempDir {
    let base = std::env::var_os("RUSTFUSE_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    tempfile::Builder::new()
        .prefix("rustfuse-scale-")
        .tempdir_in(base)
        .expect("create scratch dir")
}

/// Creates `dir/e0000000..` (`n` empty files) with one openat each.
fn populate(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let d = rustix::fs::open(dir, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    for i in 0..n {
        rustix::fs::openat(
            &d,
            name(i).as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from(0o644),
        )
        .unwrap_or_else(|e| panic!("create {}: {e}", name(i)));
    }
}

/// VmRSS of `pid` in bytes.
fn vm_rss(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("echo 2 > /proc/sys/vm/drop_caches");
}

/// Lists `dir` through the mount (deadline), returning the names in readdir order.
fn list(dir: &Path, what: &str) -> Vec<OsString> {
    let d = dir.to_path_buf();
    let t = Instant::now();
    let names: Vec<OsString> = with_deadline(Duration::from_secs(600), what, move || {
        std::fs::read_dir(&d)
            .and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect())
            .unwrap_or_else(|e| panic!("readdir {}: {e}", d.display()))
    });
    eprintln!(
        "scale: {what}: {} names in {:.1?}",
        names.len(),
        t.elapsed()
    );
    names
}

/// Checks that `got` holds each of `want` exactly once and nothing else.
fn check_listing(got: Vec<OsString>, want: &HashSet<String>, what: &str) {
    let n = got.len();
    let mut seen = HashSet::with_capacity(n);
    let mut dups = Vec::new();
    let mut extra = Vec::new();
    for g in got {
        let g = g.to_string_lossy().into_owned();
        if !want.contains(&g) {
            extra.push(g.clone());
        }
        if !seen.insert(g.clone()) {
            dups.push(g);
        }
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !seen.contains(*w))
        .take(10)
        .collect();
    dups.truncate(10);
    extra.truncate(10);
    assert!(
        dups.is_empty() && extra.is_empty() && missing.is_empty() && n == want.len(),
        "{what}: {n} names listed, {} expected; duplicates {dups:?}, unexpected {extra:?}, missing {missing:?} (first 10 of each)",
        want.len()
    );
}

/// lstat of `dir/name(i)` for every `i` in `idx`, on two threads, while sampling the daemon's
/// VmRSS every 100 ms. Fails when no lstat completes for [`STALL_LIMIT`] (the FUSE connection is
/// then aborted so the walkers return). Returns the RSS samples.
fn walk(dir: &Path, idx: Vec<usize>, pid: i32, conn: Option<u32>) -> Vec<u64> {
    let idx = Arc::new(idx);
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let walkers: Vec<_> = (0..2)
        .map(|w| {
            let (idx, done, failed, dir) =
                (idx.clone(), done.clone(), failed.clone(), dir.to_path_buf());
            std::thread::spawn(move || {
                for &i in idx.iter().skip(w).step_by(2) {
                    if failed.load(Ordering::Relaxed) {
                        return Err("stopped".to_string());
                    }
                    match std::fs::symlink_metadata(dir.join(name(i))) {
                        Ok(md) if md.is_file() && md.size() == 0 => {}
                        Ok(md) => return Err(format!("{}: {md:?}", name(i))),
                        Err(e) => return Err(format!("lstat {}: {e}", name(i))),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let mut samples = Vec::new();
    let (mut last, mut last_change) = (0, Instant::now());
    while walkers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        samples.extend(vm_rss(pid));
        let d = done.load(Ordering::Relaxed);
        if d != last {
            (last, last_change) = (d, Instant::now());
        } else if last_change.elapsed() > STALL_LIMIT {
            failed.store(true, Ordering::Relaxed);
            if let Some(c) = conn {
                abort_fuse_connection(c);
            }
            panic!("walk stalled: no lstat finished for {STALL_LIMIT:?} after {d} entries");
        }
    }
    for w in walkers {
        if let Err(e) = w.join().expect("walker panicked") {
            panic!("walk: {e}");
        }
    }
    samples.extend(vm_rss(pid));
    samples
}

#[test]
fn a_million_entries_in_one_directory() {
    if !env::require_bin_under_test() {
        return;
    }
    let n = entries();
    let t_all = Instant::now();
    let s = disk_scratch();
    let base = s.path();
    let (lower, upper, work, mnt) = (
        base.join("lower"),
        base.join("upper"),
        base.join("work"),
        base.join("mnt"),
    );
    for d in [&upper, &work, &mnt] {
        std::fs::create_dir_all(d).unwrap();
    }
    let t = Instant::now();
    populate(&lower.join("big"), n);
    eprintln!(
        "scale: {n} files written to {} in {:.1?}",
        lower.display(),
        t.elapsed()
    );

    let stack = Stack {
        lowers: vec![lower],
        upper: Some(upper),
        work: Some(work),
    };
    let mnt = mnt.canonicalize().unwrap();
    let mut g =
        Mount::fuse(&bin_under_test(), &stack, &[], &mnt).unwrap_or_else(|e| panic!("mount: {e}"));
    g.rearm_watchdog(Duration::from_secs(1800));
    let pid = g.daemon_pid().expect("daemon pid");
    let rss_mounted = vm_rss(pid).expect("daemon VmRSS");
    let big = mnt.join("big");

    // 1. readdir: every name exactly once.
    let mut want: HashSet<String> = (0..n).map(name).collect();
    check_listing(list(&big, "readdir"), &want, "readdir");
    let rss_listed = vm_rss(pid).unwrap_or(0);

    // 2. lookups of random names, and of missing ones.
    let t = Instant::now();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..LOOKUPS {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let i = (x >> 33) as usize % n;
        let md = std::fs::symlink_metadata(big.join(name(i)))
            .unwrap_or_else(|e| panic!("lookup {}: {e}", name(i)));
        assert!(md.is_file(), "{}: {md:?}", name(i));
    }
    for missing in [name(n), "e".to_string(), "nothere".to_string()] {
        let r = std::fs::symlink_metadata(big.join(&missing));
        assert_eq!(
            r.map_err(|e| e.raw_os_error()).err(),
            Some(Some(2)),
            "lookup of missing {missing}"
        );
    }
    eprintln!(
        "scale: {LOOKUPS} random lookups and 3 missing ones in {:.1?}",
        t.elapsed()
    );

    // 3. create and unlink in the big directory.
    let t = Instant::now();
    for k in 0..CHANGES {
        let new = format!("new{k}");
        std::fs::write(big.join(&new), format!("new {k}")).expect("create in the big directory");
        want.insert(new);
        let old = name(k * (n / CHANGES));
        std::fs::remove_file(big.join(&old)).expect("unlink in the big directory");
        want.remove(&old);
    }
    for k in 0..CHANGES {
        assert_eq!(
            std::fs::read_to_string(big.join(format!("new{k}"))).unwrap(),
            format!("new {k}")
        );
    }
    eprintln!(
        "scale: {CHANGES} creates and {CHANGES} unlinks in {:.1?}",
        t.elapsed()
    );
    check_listing(
        list(&big, "readdir after the changes"),
        &want,
        "readdir after the changes",
    );

    // 4. RSS across a walk of every entry, and after the kernel forgets.
    drop_caches();
    let mut rss_start = vm_rss(pid).unwrap_or(0);
    // Let the FORGETs of the readdir's entries settle: RSS unchanged over half a second.
    poll_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = vm_rss(pid).unwrap_or(0);
        std::mem::replace(&mut rss_start, now) == now
    });
    let idx: Vec<usize> = (0..n).filter(|i| want.contains(&name(*i))).collect();
    let walked = idx.len();
    let t = Instant::now();
    let samples = walk(&big, idx, pid, g.connection());
    let walk_time = t.elapsed();
    let peak = samples.iter().copied().max().unwrap_or(0);
    let bound = RSS_BASE_BOUND + RSS_PER_ENTRY_BOUND * n as u64;
    eprintln!(
        "scale: lstat of {walked} entries in {walk_time:.1?} ({:.0}/s); daemon VmRSS: {:.0} MiB mounted, {:.0} MiB after readdir, {:.0} MiB before the walk, peak {:.0} MiB during it (bound {:.0} MiB), {} samples",
        walked as f64 / walk_time.as_secs_f64(),
        mib(rss_mounted),
        mib(rss_listed),
        mib(rss_start),
        mib(peak),
        mib(bound),
        samples.len()
    );
    assert!(
        peak <= bound,
        "daemon VmRSS peaked at {:.0} MiB during the walk, bound {:.0} MiB",
        mib(peak),
        mib(bound)
    );

    let t = Instant::now();
    drop_caches();
    let grown = peak.saturating_sub(rss_start);
    let target = peak - grown / 2;
    let mut after = peak;
    let dropped = poll_until(Duration::from_secs(30), || {
        after = vm_rss(pid).unwrap_or(u64::MAX);
        after <= target
    });
    eprintln!(
        "scale: after drop_caches: daemon VmRSS {:.0} MiB after {:.1?} (peak {:.0} MiB, want at most {:.0} MiB)",
        mib(after),
        t.elapsed(),
        mib(peak),
        mib(target)
    );
    assert!(
        dropped,
        "daemon VmRSS stayed at {:.0} MiB after drop_caches (peak {:.0} MiB, before the walk {:.0} MiB): the kernel's FORGETs did not free the nodes",
        mib(after),
        mib(peak),
        mib(rss_start)
    );
    // Still serving after all that.
    assert!(std::fs::symlink_metadata(big.join("new0")).is_ok());
    g.unmount().expect("unmount");

    let t = Instant::now();
    drop(s);
    eprintln!(
        "scale: scratch removed in {:.1?}; total wall time {:.1?}",
        t.elapsed(),
        t_all.elapsed()
    );
}
