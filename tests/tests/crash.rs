//! Crash consistency: `kill -9` of the FUSE daemon in the middle of a copy-up, of renames or
//! of an untar, then a fresh mount of the same layers. Whatever the moment of the kill, every
//! file shows its old or its new complete content, no name shows twice or vanishes, and the
//! workdir is cleared at mount. Each is repeated at random moments: `$RUSTFUSE_CRASH_ROUNDS`
//! kills (default 20; untar 10), `$RUSTFUSE_TEST_SEED` repeats a run.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustfuse_tests::env;
use rustfuse_tests::mount::{LoopExt4, Mount, Stack, open_fds};

struct Layout {
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
}

impl Layout {
    fn new(root: &Path) -> Layout {
        let l = Layout {
            lower: root.join("lower"),
            upper: root.join("upper"),
            work: root.join("work"),
            mnt: root.join("mnt"),
        };
        for d in [&l.lower, &l.upper, &l.work, &l.mnt] {
            fs::create_dir_all(d).unwrap();
        }
        l
    }

    fn stack(&self) -> Stack {
        Stack {
            lowers: vec![self.lower.clone()],
            upper: Some(self.upper.clone()),
            work: Some(self.work.clone()),
        }
    }

    fn mount(&self) -> Mount {
        Mount::fuse(&env::bin_under_test(), &self.stack(), &[], &self.mnt)
            .unwrap_or_else(|e| panic!("mount: {e}"))
    }

    /// `<workdir>/work` holds nothing once a new mount is up.
    fn assert_work_clean(&self, what: &str) {
        let left: Vec<_> = fs::read_dir(self.work.join("work"))
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "{what}: workdir not cleared at mount: {left:?}"
        );
    }
}

/// Kills per test: `$RUSTFUSE_CRASH_ROUNDS` (default 20; the untar test does half as many).
fn rounds() -> u64 {
    env::env_number("RUSTFUSE_CRASH_ROUNDS").unwrap_or(20)
}

fn kill_daemon(m: &Mount) {
    let pid = m.daemon_pid().expect("daemon pid");
    let pid = rustix::process::Pid::from_raw(pid).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill -9");
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn kill_during_copy_up_shows_old_or_new_never_partial() {
    if !env::require_bin_under_test() {
        return;
    }
    const SIZE: usize = 64 << 20;
    let original = pattern(SIZE);
    let mut rng = seeded_rng();
    for round in 0..rounds() {
        let s = env::scratch("crash-copyup");
        let l = Layout::new(s.path());
        fs::write(l.lower.join("big"), &original).unwrap();
        let m = l.mount();
        let target = l.mnt.join("big");
        // Appending one byte copies the 64 MiB file up first.
        let writer = std::thread::spawn(move || {
            fs::OpenOptions::new()
                .append(true)
                .open(&target)
                .and_then(|mut f| f.write_all(b"!"))
        });
        // A random moment in the copy (64 MiB takes some tens of milliseconds here).
        std::thread::sleep(Duration::from_micros(rng() % 80_000));
        kill_daemon(&m);
        drop(m);
        let _ = writer.join();

        let m = l.mount();
        l.assert_work_clean(&format!("round {round}"));
        let seen = fs::read(l.mnt.join("big")).expect("the file is still there");
        match seen.len() {
            n if n == SIZE => assert!(seen == original, "round {round}: old content damaged"),
            n if n == SIZE + 1 => {
                assert!(
                    seen[..SIZE] == original[..],
                    "round {round}: new content damaged"
                );
                assert_eq!(seen[SIZE], b'!');
            }
            n => panic!("round {round}: a partial file is visible ({n} of {SIZE} bytes)"),
        }
        if let Ok(md) = fs::metadata(l.upper.join("big")) {
            let n = md.len() as usize;
            assert!(
                n == SIZE || n == SIZE + 1,
                "round {round}: partial copy in the upper layer ({n} bytes)"
            );
        }
        m.unmount().unwrap();
    }
}

/// Whether the workdir holds a flag of unsynced copies (`rustfuse-unsynced.PID`, any daemon's).
fn has_unsynced_flag(work: &Path) -> bool {
    fs::read_dir(work).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("rustfuse-unsynced")
    })
}

/// Whether `path` (in a layer, not through the mount) carries a copy-up's unsynced mark.
fn unsynced(path: &Path) -> bool {
    rustfuse_tests::upper::raw_xattrs(path)
        .keys()
        .any(|k| k.ends_with(".overlay.rustfuse.unsynced"))
}

#[test]
fn kill_while_copies_are_unsynced_keeps_them_at_the_next_mount() {
    // Copy-ups are synced by a background thread; the daemon here holds them unsynced (the
    // test knob) when it is killed. The page cache keeps what it wrote (this boot), so the
    // next mount syncs every marked copy and keeps it; a user's fsync unmarks at once.
    if !env::require_bin_under_test() {
        return;
    }
    let s = env::scratch("crash-unsynced");
    let l = Layout::new(s.path());
    const N: usize = 40;
    let old = |i: usize| pattern(1000 + i * 4099);
    for i in 0..N {
        fs::write(l.lower.join(format!("f{i}")), old(i)).unwrap();
    }
    // In the background on any filesystem (by default not on an ext4 without a journal).
    let m = Mount::fuse_env(
        &env::bin_under_test(),
        &l.stack(),
        &["background_sync=1"],
        &l.mnt,
        &[("RUSTFUSE_SYNC_DELAY_MS", "600000")],
    )
    .unwrap_or_else(|e| panic!("mount: {e}"));
    for i in 0..N {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(l.mnt.join(format!("f{i}")))
            .unwrap();
        f.write_all(format!("+{i}").as_bytes()).unwrap();
        if i % 4 == 0 {
            f.sync_all().unwrap();
        }
    }
    assert!(has_unsynced_flag(&l.work), "the flag shows unsynced copies");
    for i in 0..N {
        let up = l.upper.join(format!("f{i}"));
        assert_eq!(
            unsynced(&up),
            i % 4 != 0,
            "f{i}: marked unless the user synced it"
        );
        let seen = rustfuse_tests::upper::raw_xattrs(&l.mnt.join(format!("f{i}")));
        assert!(
            !seen.keys().any(|k| k.contains("rustfuse")),
            "f{i}: the mark shows through the mount: {seen:?}"
        );
    }
    kill_daemon(&m);
    drop(m);

    let m = l.mount();
    l.assert_work_clean("after the kill");
    for i in 0..N {
        let mut want = old(i);
        want.extend_from_slice(format!("+{i}").as_bytes());
        assert!(
            fs::read(l.mnt.join(format!("f{i}"))).unwrap() == want,
            "f{i}: not its new content after the kill"
        );
        assert!(
            !unsynced(&l.upper.join(format!("f{i}"))),
            "f{i}: still marked after the mount's recovery"
        );
    }
    assert!(!has_unsynced_flag(&l.work), "the flag stays after recovery");
    // A clean unmount: the background sync is drained and the flag removed.
    fs::write(l.lower.join("late"), b"late").unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(l.mnt.join("late"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    m.unmount().unwrap();
    assert!(!unsynced(&l.upper.join("late")));
    assert!(!has_unsynced_flag(&l.work));
}

#[test]
fn copy_ups_sync_before_answering_where_the_upper_has_no_journal() {
    // The background sync's recovery needs the upper filesystem to write its metadata back
    // in order (the mark before the rename). On an ext4 with a journal a copy-up is answered
    // first and synced later (the copy marked meanwhile); on one without, it is synced before
    // it is answered, as kernel overlayfs does (no mark, no flag), unless background_sync=1.
    if !env::require_privileged() || !env::require_bin_under_test() {
        return;
    }
    if env::which("mkfs.ext4").is_none() {
        env::skip("mkfs.ext4 (e2fsprogs) is missing");
        return;
    }
    let s = env::scratch("crash-journal");
    for (name, mkfs, opts, later) in [
        ("journal", &[][..], &[][..], true),
        ("nojournal", &["-O", "^has_journal"][..], &[][..], false),
        (
            "nojournal-later",
            &["-O", "^has_journal"][..],
            &["background_sync=1"][..],
            true,
        ),
    ] {
        let disk = LoopExt4::mount(&s.path().join(name), mkfs);
        let l = Layout::new(&disk.path);
        fs::write(l.lower.join("f"), b"old").unwrap();
        // Copies the syncer would sync stay unsynced (and marked) for ten minutes.
        let m = Mount::fuse_env(
            &env::bin_under_test(),
            &l.stack(),
            opts,
            &l.mnt,
            &[("RUSTFUSE_SYNC_DELAY_MS", "600000")],
        )
        .unwrap_or_else(|e| panic!("{name}: mount: {e}"));
        fs::OpenOptions::new()
            .append(true)
            .open(l.mnt.join("f"))
            .unwrap()
            .write_all(b"+new")
            .unwrap();
        assert_eq!(fs::read(l.mnt.join("f")).unwrap(), b"old+new", "{name}");
        assert_eq!(
            unsynced(&l.upper.join("f")),
            later,
            "{name}: the copy is marked unsynced only where it is synced later"
        );
        assert_eq!(has_unsynced_flag(&l.work), later, "{name}: the flag");
        m.unmount().unwrap();
        assert!(
            !unsynced(&l.upper.join("f")),
            "{name}: marked after the unmount"
        );
        assert!(
            !has_unsynced_flag(&l.work),
            "{name}: flag after the unmount"
        );
    }
}

#[test]
fn kill_during_renames_loses_no_name() {
    if !env::require_bin_under_test() {
        return;
    }
    const N: usize = 300;
    let mut rng = seeded_rng();
    for round in 0..rounds() {
        let s = env::scratch("crash-rename");
        let l = Layout::new(s.path());
        for i in 0..N {
            fs::write(l.lower.join(format!("f{i}")), format!("content {i}")).unwrap();
        }
        let m = l.mount();
        let root = l.mnt.clone();
        let renamer = std::thread::spawn(move || {
            for i in 0..N {
                if fs::rename(root.join(format!("f{i}")), root.join(format!("g{i}"))).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_micros(rng() % 120_000));
        kill_daemon(&m);
        drop(m);
        let _ = renamer.join();

        let m = l.mount();
        l.assert_work_clean(&format!("round {round}"));
        let mut moved = 0;
        for i in 0..N {
            let f = fs::read_to_string(l.mnt.join(format!("f{i}")));
            let g = fs::read_to_string(l.mnt.join(format!("g{i}")));
            match (f, g) {
                (Ok(c), Err(_)) | (Err(_), Ok(c)) => {
                    assert_eq!(c, format!("content {i}"), "round {round}: file {i} damaged");
                }
                (Ok(_), Ok(_)) => panic!("round {round}: f{i} and g{i} both visible"),
                (Err(a), Err(b)) => panic!("round {round}: file {i} lost ({a}; {b})"),
            }
            if fs::symlink_metadata(l.mnt.join(format!("g{i}"))).is_ok() {
                moved += 1;
            }
        }
        eprintln!("round {round}: {moved} of {N} renamed before the kill");
        m.unmount().unwrap();
    }
}

/// `redirect_dir=on`: directories with lower content renamed (half of them into another
/// directory, half within theirs, each after a copy-up below it), killed at a random moment.
/// Each directory shows under exactly one of its names, with all it held.
#[test]
fn kill_during_directory_renames_loses_no_name() {
    if !env::require_bin_under_test() {
        return;
    }
    const N: usize = 150;
    let mut rng = seeded_rng();
    for round in 0..rounds() {
        let s = env::scratch("crash-dir-rename");
        let l = Layout::new(s.path());
        fs::create_dir(l.lower.join("to")).unwrap();
        for i in 0..N {
            let d = l.lower.join(format!("d{i}"));
            fs::create_dir_all(d.join("sub")).unwrap();
            fs::write(d.join("f"), format!("f {i}")).unwrap();
            fs::write(d.join("sub/g"), format!("g {i}")).unwrap();
        }
        let new_name = |i: usize| match i % 2 {
            0 => format!("to/e{i}"),
            _ => format!("e{i}"),
        };
        let mount = |l: &Layout| {
            Mount::fuse(
                &env::bin_under_test(),
                &l.stack(),
                &["redirect_dir=on"],
                &l.mnt,
            )
            .unwrap_or_else(|e| panic!("mount: {e}"))
        };
        let m = mount(&l);
        let root = l.mnt.clone();
        let renamer = std::thread::spawn(move || {
            for i in 0..N {
                let d = root.join(format!("d{i}"));
                // A copy-up below it first: the renamed directory is merged.
                if fs::write(d.join("up"), format!("up {i}")).is_err()
                    || fs::rename(&d, root.join(new_name(i))).is_err()
                {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_micros(rng() % 150_000));
        kill_daemon(&m);
        drop(m);
        let _ = renamer.join();

        let m = mount(&l);
        l.assert_work_clean(&format!("round {round}"));
        let mut moved = 0;
        for i in 0..N {
            let old = l.mnt.join(format!("d{i}"));
            let new = l.mnt.join(new_name(i));
            let dir = match (old.is_dir(), new.is_dir()) {
                (true, false) => old,
                (false, true) => {
                    moved += 1;
                    new
                }
                (true, true) => panic!("round {round}: d{i} and {} both visible", new_name(i)),
                (false, false) => panic!("round {round}: directory {i} lost"),
            };
            let read = |p: &str| fs::read_to_string(dir.join(p));
            assert_eq!(
                read("f").ok(),
                Some(format!("f {i}")),
                "round {round}: {dir:?}/f"
            );
            assert_eq!(
                read("sub/g").ok(),
                Some(format!("g {i}")),
                "round {round}: {dir:?}/sub/g"
            );
            // Created, then written: killed in between, it is empty.
            if let Ok(up) = read("up") {
                assert!(
                    up.is_empty() || up == format!("up {i}"),
                    "round {round}: {dir:?}/up damaged: {up:?}"
                );
            }
        }
        eprintln!("round {round}: {moved} of {N} directories renamed before the kill");
        m.unmount().unwrap();
    }
}

/// What the untar test extracts: a tree of a few thousand files, its archive, and the lower
/// layer it lands on (some of the archive's directories and files already there, with other
/// content, and files of the lower layer alone).
struct Untar {
    archive: PathBuf,
    /// Archive member → content (regular files).
    files: BTreeMap<String, Vec<u8>>,
    dirs: BTreeSet<String>,
    /// Lower-layer file → content.
    lower_files: BTreeMap<String, Vec<u8>>,
    lower_dirs: BTreeSet<String>,
}

const UNTAR_FILES: usize = 2000;

fn untar_content(i: usize) -> Vec<u8> {
    let len = match i % 50 {
        0 => 0,
        // Some files take several write(2) calls of tar's 10 KiB records.
        1 => 200_000 + i,
        _ => (i * 7919) % 16_000,
    };
    (0..len).map(|k| ((k * 31 + i) % 253) as u8).collect()
}

impl Untar {
    /// Builds the tree in `root/src`, archives it as `root/tree.tar`, removes the tree.
    fn new(root: &Path) -> Untar {
        let src = root.join("src");
        let mut u = Untar {
            archive: root.join("tree.tar"),
            files: BTreeMap::new(),
            dirs: BTreeSet::new(),
            lower_files: BTreeMap::new(),
            lower_dirs: BTreeSet::new(),
        };
        for i in 0..UNTAR_FILES {
            let (a, b) = (i % 30, (i / 30) % 3);
            let d = match b {
                0 => format!("a{a}"),
                _ => format!("a{a}/b{b}"),
            };
            fs::create_dir_all(src.join(&d)).unwrap();
            u.dirs.insert(format!("a{a}"));
            u.dirs.insert(d.clone());
            let p = format!("{d}/f{i}");
            let c = untar_content(i);
            fs::write(src.join(&p), &c).unwrap();
            // The first ten top directories exist below, holding an old version of every
            // seventh of their files.
            if a < 10 {
                u.lower_dirs.insert(format!("a{a}"));
                u.lower_dirs.insert(d.clone());
                if i % 7 == 0 {
                    u.lower_files
                        .insert(p.clone(), format!("old {p}").into_bytes());
                }
            }
            u.files.insert(p, c);
        }
        for a in 0..10 {
            let p = format!("a{a}/lower-only");
            u.lower_files.insert(p.clone(), p.into_bytes());
        }
        let out = env::run_command(
            Command::new("tar")
                .arg("-cf")
                .arg(&u.archive)
                .arg("-C")
                .arg(&src)
                .arg("."),
            Duration::from_secs(60),
        )
        .expect("tar -c");
        assert!(out.status.success(), "tar -c: {}", out.stderr);
        fs::remove_dir_all(&src).unwrap();
        u
    }

    /// Fills a fresh lower layer.
    fn populate(&self, lower: &Path) {
        for d in &self.lower_dirs {
            fs::create_dir_all(lower.join(d)).unwrap();
        }
        for (p, c) in &self.lower_files {
            fs::write(lower.join(p), c).unwrap();
        }
    }

    /// Starts `tar -xf` into `mnt`.
    fn spawn(&self, mnt: &Path) -> std::process::Child {
        Command::new("tar")
            .arg("-xf")
            .arg(&self.archive)
            .arg("-C")
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tar -x")
    }

    /// Checks the merged view at `mnt` after a crash: every name is one of the archive's or
    /// the lower layer's; every file is absent, complete with its archived content, or its old
    /// lower content; only a file tar was writing may hold a prefix of its content (tar writes
    /// a file in place; what it wrote before the kill is there, as on any filesystem). Returns
    /// (complete files, prefixes).
    fn check(&self, mnt: &Path, what: &str) -> (usize, Vec<String>) {
        let mut complete = 0;
        let mut partial = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![String::new()];
        while let Some(rel) = stack.pop() {
            for e in fs::read_dir(mnt.join(&rel)).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                let p = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let md = fs::symlink_metadata(mnt.join(&p)).unwrap();
                if md.is_dir() {
                    assert!(
                        self.dirs.contains(&p) || self.lower_dirs.contains(&p),
                        "{what}: unexpected directory {p}"
                    );
                    stack.push(p);
                    continue;
                }
                assert!(md.is_file(), "{what}: {p} is not a regular file");
                let got = fs::read(mnt.join(&p)).unwrap();
                let new = self.files.get(&p);
                let old = self.lower_files.get(&p);
                match (new, old) {
                    (Some(n), _) if got == *n => complete += 1,
                    (_, Some(o)) if got == *o => {}
                    (Some(n), _) if n.starts_with(&got) => partial.push(p.clone()),
                    (None, None) => panic!("{what}: unexpected name {p}"),
                    _ => panic!(
                        "{what}: {p} holds {} bytes that are neither its old nor (a prefix of) its new content",
                        got.len()
                    ),
                }
                seen.insert(p);
            }
        }
        for p in self.lower_files.keys() {
            if !self.files.contains_key(p) {
                assert!(seen.contains(p), "{what}: lower-only {p} lost");
            }
        }
        assert!(
            partial.len() <= 1,
            "{what}: several files hold part of their content: {partial:?}"
        );
        (complete, partial)
    }
}

/// A small xorshift generator; the seed comes from `$RUSTFUSE_TEST_SEED` or the clock and is
/// printed, so a failing run can be repeated.
fn seeded_rng() -> impl FnMut() -> u64 {
    let seed = env::env_number("RUSTFUSE_TEST_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }) | 1;
    eprintln!("seed {seed} (RUSTFUSE_TEST_SEED={seed} repeats it)");
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Waits for `tar` (which fails fast once the daemon is gone) with a deadline.
fn wait_tar(mut tar: std::process::Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = tar.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = tar.kill();
            let _ = tar.wait();
            panic!("{what}: tar did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How far `tar` has read the archive (its file offset), once it has it open.
fn read_offset(pid: u32, archive: &Path) -> Option<u64> {
    open_fds(pid as i32)
        .into_iter()
        .find(|fd| fd.target == archive)?
        .info("pos")?
        .parse()
        .ok()
}

#[test]
fn kill_during_untar_leaves_only_whole_files() {
    if !env::require_bin_under_test() {
        return;
    }
    let kills = rounds().div_ceil(2);
    let mut rng = seeded_rng();
    let shared = env::scratch("crash-untar-archive");
    let u = Untar::new(&shared.path().canonicalize().unwrap());
    let size = fs::metadata(&u.archive).unwrap().len();
    for round in 1..=kills {
        let s = env::scratch("crash-untar");
        let l = Layout::new(s.path());
        u.populate(&l.lower);
        let m = l.mount();
        let what = format!("round {round}");
        // The moment: when tar has read a random 5..95 % of the archive (not a time, which
        // would depend on the machine's load).
        let frac = 0.05 + 0.9 * (rng() % 1000) as f64 / 1000.0;
        let target = (size as f64 * frac) as u64;
        let mut tar = u.spawn(&l.mnt);
        let reached = env::poll_until(Duration::from_secs(120), || {
            tar.try_wait().unwrap().is_some()
                || read_offset(tar.id(), &u.archive).is_some_and(|p| p >= target)
        });
        assert!(reached, "{what}: tar made no progress in 120 s");
        kill_daemon(&m);
        drop(m);
        let _ = wait_tar(tar, &what);

        let m = l.mount();
        l.assert_work_clean(&what);
        let (complete, partial) = u.check(&l.mnt, &what);
        eprintln!(
            "{what}: killed at {:.0} % of the archive: {complete} of {UNTAR_FILES} files complete, partial: {partial:?}",
            frac * 100.0
        );
        if round == kills {
            // The same untar again, to the end, over what the crash left.
            let st = wait_tar(u.spawn(&l.mnt), &what);
            assert!(
                st.success(),
                "{what}: tar -x after the remount failed: {st}"
            );
            let (complete, partial) = u.check(&l.mnt, &what);
            assert_eq!(
                (complete, partial.len()),
                (UNTAR_FILES, 0),
                "{what}: after a second untar"
            );
        }
        m.unmount().unwrap();
        // No temporary name reached the upper layer.
        let mut stack = vec![l.upper.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                assert!(
                    !e.file_name().to_string_lossy().starts_with('#'),
                    "{what}: temporary name {} in the upper layer",
                    e.path().display()
                );
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
}
