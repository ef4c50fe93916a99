//! Concurrency as a user sees it: readers racing a 64 MiB copy-up see the whole old or the
//! whole new file, never a partial one, and never a temporary name; four threads doing random
//! creates/renames/unlinks in their own directories get exactly the answers a model predicts,
//! without hanging, and the result survives a remount; files removed while open by several
//! threads at once give their space back once closed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustfuse_tests::env::{self, bin_under_test, scratch, with_deadline};
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::mount::{Mount, open_fds};
use rustfuse_tests::rng::Rng;

const SIZE: usize = 64 << 20;
const TAIL: &[u8] = b"appended!";

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn mount(m: &Materialized) -> Mount {
    Mount::fuse(&bin_under_test(), &m.stack, &[], &m.mnt).unwrap_or_else(|e| panic!("mount: {e}"))
}

fn names(dir: &Path) -> std::io::Result<BTreeSet<String>> {
    fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect()
}

/// Checks one read of `big`: the whole original or the whole appended content.
fn check_content(seen: &[u8], original: &[u8]) -> Result<bool, String> {
    if seen.len() == SIZE {
        if seen == original {
            return Ok(false);
        }
        let at = seen.iter().zip(original).position(|(a, b)| a != b);
        return Err(format!("old-sized content differs at byte {at:?}"));
    }
    if seen.len() == SIZE + TAIL.len() {
        if &seen[..SIZE] == original && &seen[SIZE..] == TAIL {
            return Ok(true);
        }
        return Err("new-sized content damaged".into());
    }
    Err(format!(
        "partial file: {} bytes (old {SIZE}, new {})",
        seen.len(),
        SIZE + TAIL.len()
    ))
}

/// Opens `p`, and reads the last 4 KiB of the size that the open file shows: old or new tail.
fn check_tail(p: &Path, original: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(p).map_err(|e| format!("open: {e}"))?;
    let n = f.metadata().map_err(|e| format!("fstat: {e}"))?.len() as usize;
    let mut buf = vec![0u8; 4096];
    let got = f
        .read_at(&mut buf, (n - 4096) as u64)
        .map_err(|e| format!("pread: {e}"))?;
    let want: Vec<u8> = if n == SIZE {
        original[SIZE - 4096..].to_vec()
    } else if n == SIZE + TAIL.len() {
        let mut v = original[n - 4096..].to_vec();
        v.truncate(4096 - TAIL.len());
        v.extend_from_slice(TAIL);
        v
    } else {
        return Err(format!("fstat after open: size {n}"));
    };
    if got != 4096 || buf != want {
        return Err(format!(
            "tail of a {n}-byte file: read {got} bytes, content differs"
        ));
    }
    Ok(())
}

#[test]
fn readers_racing_a_copy_up_see_old_or_new_never_partial() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("conc-copyup");
    let original = Arc::new(pattern(SIZE));
    let mut layer = Layer::new().file("dir/big", &original[..]);
    for i in 0..8 {
        layer = layer.file(&format!("dir/s{i}"), format!("sibling {i}"));
    }
    let mut m = Tree::new().lower(layer).materialize(s.path()).unwrap();
    m.mnt = m.mnt.canonicalize().unwrap();
    let g = mount(&m);
    let root = m.mnt.clone();
    let want_dir: BTreeSet<String> = std::iter::once("big".to_string())
        .chain((0..8).map(|i| format!("s{i}")))
        .collect();

    let problems = with_deadline(Duration::from_secs(60), "copy-up race", move || {
        let done = Arc::new(AtomicBool::new(false));
        let reads_new = Arc::new(AtomicUsize::new(0));
        let reads_old = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        // Two content readers.
        for _ in 0..2 {
            let (root, original, done) = (root.clone(), original.clone(), done.clone());
            let (rn, ro) = (reads_new.clone(), reads_old.clone());
            handles.push(std::thread::spawn(move || {
                let mut problems = Vec::new();
                let mut after_done = 0;
                while after_done < 2 {
                    if done.load(Ordering::SeqCst) {
                        after_done += 1;
                    }
                    match fs::read(root.join("dir/big")) {
                        Ok(c) => match check_content(&c, &original) {
                            Ok(true) => _ = rn.fetch_add(1, Ordering::SeqCst),
                            Ok(false) => _ = ro.fetch_add(1, Ordering::SeqCst),
                            Err(e) => problems.push(format!("read: {e}")),
                        },
                        Err(e) => problems.push(format!("read: {e}")),
                    }
                }
                problems
            }));
        }
        // One thread stats the file and lists the directory and the root.
        {
            let (root, done, want_dir) = (root.clone(), done.clone(), want_dir.clone());
            let original = original.clone();
            handles.push(std::thread::spawn(move || {
                let mut problems = Vec::new();
                let want_root: BTreeSet<String> = ["dir".to_string()].into();
                let mut rounds = 0;
                while !done.load(Ordering::SeqCst) || rounds < 50 {
                    rounds += 1;
                    match fs::metadata(root.join("dir/big")) {
                        Ok(md) => {
                            let n = md.len() as usize;
                            if n != SIZE && n != SIZE + TAIL.len() {
                                problems.push(format!("stat: size {n}"));
                            }
                        }
                        Err(e) => problems.push(format!("stat: {e}")),
                    }
                    // A fresh open, then the tail of what that open shows.
                    if let Err(e) = check_tail(&root.join("dir/big"), &original) {
                        problems.push(e);
                    }
                    match names(&root.join("dir")) {
                        Ok(n) if n == want_dir => {}
                        Ok(n) => problems.push(format!("readdir dir: {n:?}")),
                        Err(e) => problems.push(format!("readdir dir: {e}")),
                    }
                    match names(&root) {
                        Ok(n) if n == want_root => {}
                        Ok(n) => problems.push(format!("readdir /: {n:?}")),
                        Err(e) => problems.push(format!("readdir /: {e}")),
                    }
                }
                problems.truncate(20);
                problems
            }));
        }
        // The writer: one append, after the readers are under way, copies the file up.
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let w = fs::OpenOptions::new()
            .append(true)
            .open(root.join("dir/big"))
            .and_then(|mut f| f.write_all(TAIL));
        eprintln!("append with copy-up took {:?}", t.elapsed());
        done.store(true, Ordering::SeqCst);
        let mut problems: Vec<String> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("reader panicked"))
            .collect();
        if let Err(e) = w {
            problems.insert(0, format!("append failed: {e}"));
        }
        eprintln!(
            "reads: {} old, {} new",
            reads_old.load(Ordering::SeqCst),
            reads_new.load(Ordering::SeqCst)
        );
        if reads_new.load(Ordering::SeqCst) == 0 {
            problems.push("no reader saw the appended content after the append".into());
        }
        problems
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    g.unmount().unwrap();
    let upper = m.stack.upper.as_ref().unwrap();
    assert_eq!(
        fs::metadata(upper.join("dir/big")).unwrap().len() as usize,
        SIZE + TAIL.len()
    );
    assert_eq!(
        names(&upper.join("dir")).unwrap(),
        ["big".to_string()].into()
    );
}

/// xorshift64*: a small deterministic PRNG.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    File(String),
    Dir,
}

/// What one directory holds (the model).
type Model = BTreeMap<String, Entry>;

fn lower_model(t: usize) -> Model {
    (0..20)
        .map(|j| (format!("l{j}"), Entry::File(format!("lower {t} {j}"))))
        .chain((0..3).map(|j| (format!("ld{j}"), Entry::Dir)))
        .collect()
}

fn errkind(r: std::io::Result<()>) -> Result<(), ErrorKind> {
    r.map_err(|e| e.kind())
}

/// Random ops in `dir` for `dur`, each checked against the model. Returns the model and the
/// number of ops, or the first unexpected answer.
fn churn(dir: &Path, t: usize, dur: Duration) -> Result<(Model, usize), String> {
    let mut model = lower_model(t);
    let mut rng = Rng::new(t as u64 + 1);
    let start = Instant::now();
    let mut n = 0;
    let mut counter = 0;
    while start.elapsed() < dur {
        n += 1;
        let files: Vec<String> = model
            .iter()
            .filter(|(_, e)| matches!(e, Entry::File(_)))
            .map(|(k, _)| k.clone())
            .collect();
        let new_dirs: Vec<String> = model
            .iter()
            .filter(|(k, e)| **e == Entry::Dir && k.starts_with('n'))
            .map(|(k, _)| k.clone())
            .collect();
        counter += 1;
        let fresh = format!("f{t}_{counter}");
        let what;
        let (got, want) = match rng.below(10) {
            0 | 1 => {
                let content = format!("created {fresh}");
                what = format!("create {fresh}");
                let r = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join(&fresh))
                    .and_then(|mut f| f.write_all(content.as_bytes()));
                model.insert(fresh.clone(), Entry::File(content));
                (errkind(r), Ok(()))
            }
            2 | 3 if !files.is_empty() => {
                let from = &files[rng.below(files.len())];
                // Half the time onto a new name, else over another existing file.
                let to = if rng.below(2) == 0 {
                    fresh.clone()
                } else {
                    files[rng.below(files.len())].clone()
                };
                what = format!("rename {from} -> {to}");
                let r = fs::rename(dir.join(from), dir.join(&to));
                let e = model.remove(from).unwrap();
                model.insert(to, e);
                (errkind(r), Ok(()))
            }
            4 if !files.is_empty() => {
                let f = &files[rng.below(files.len())];
                what = format!("unlink {f}");
                let r = fs::remove_file(dir.join(f));
                model.remove(f);
                (errkind(r), Ok(()))
            }
            5 if !files.is_empty() => {
                let f = &files[rng.below(files.len())];
                what = format!("read {f}");
                let want = match &model[f] {
                    Entry::File(c) => c.clone(),
                    Entry::Dir => unreachable!(),
                };
                match fs::read_to_string(dir.join(f)) {
                    Ok(c) if c == want => (Ok(()), Ok(())),
                    Ok(c) => {
                        return Err(format!("thread {t} op {n}: {what}: {c:?}, want {want:?}"));
                    }
                    Err(e) => (Err(e.kind()), Ok(())),
                }
            }
            6 => {
                let name = format!("n{t}_{counter}");
                what = format!("mkdir {name}");
                let r = fs::create_dir(dir.join(&name));
                model.insert(name, Entry::Dir);
                (errkind(r), Ok(()))
            }
            7 if !new_dirs.is_empty() => {
                let d = &new_dirs[rng.below(new_dirs.len())];
                if rng.below(2) == 0 {
                    what = format!("rmdir {d}");
                    let r = fs::remove_dir(dir.join(d));
                    model.remove(d);
                    (errkind(r), Ok(()))
                } else {
                    // A directory made here is purely in the upper layer: it can move.
                    let to = format!("n{t}_{counter}");
                    what = format!("rename dir {d} -> {to}");
                    let r = fs::rename(dir.join(d), dir.join(&to));
                    model.remove(d);
                    model.insert(to, Entry::Dir);
                    (errkind(r), Ok(()))
                }
            }
            8 => {
                // Expected failures.
                if rng.below(2) == 0 {
                    what = "unlink missing".to_string();
                    (
                        errkind(fs::remove_file(dir.join("never-there"))),
                        Err(ErrorKind::NotFound),
                    )
                } else if let Some(f) = files.first() {
                    what = format!("create_new existing {f}");
                    let r = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(dir.join(f))
                        .map(drop);
                    (errkind(r), Err(ErrorKind::AlreadyExists))
                } else {
                    continue;
                }
            }
            _ => {
                what = "readdir".to_string();
                match names(dir) {
                    Ok(got) => {
                        let want: BTreeSet<String> = model.keys().cloned().collect();
                        if got != want {
                            return Err(format!(
                                "thread {t} op {n}: readdir: extra {:?}, missing {:?}",
                                got.difference(&want).collect::<Vec<_>>(),
                                want.difference(&got).collect::<Vec<_>>()
                            ));
                        }
                        (Ok(()), Ok(()))
                    }
                    Err(e) => (Err(e.kind()), Ok(())),
                }
            }
        };
        if got != want {
            return Err(format!(
                "thread {t} op {n}: {what}: got {got:?}, want {want:?}"
            ));
        }
    }
    Ok((model, n))
}

/// The directory's content compared with the model.
fn compare(dir: &Path, model: &Model) -> Vec<String> {
    let mut problems = Vec::new();
    let got = match names(dir) {
        Ok(n) => n,
        Err(e) => return vec![format!("{}: {e}", dir.display())],
    };
    let want: BTreeSet<String> = model.keys().cloned().collect();
    if got != want {
        problems.push(format!(
            "{}: extra {:?}, missing {:?}",
            dir.display(),
            got.difference(&want).collect::<Vec<_>>(),
            want.difference(&got).collect::<Vec<_>>()
        ));
    }
    for (k, e) in model {
        let p = dir.join(k);
        match e {
            Entry::File(c) => match fs::read_to_string(&p) {
                Ok(s) if &s == c => {}
                other => problems.push(format!("{}: {other:?}, want {c:?}", p.display())),
            },
            Entry::Dir => {
                if !fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                    problems.push(format!("{}: not a directory", p.display()));
                }
            }
        }
    }
    problems
}

#[test]
fn four_threads_random_namespace_ops() {
    if !env::require_bin_under_test() {
        return;
    }
    const THREADS: usize = 4;
    let s = scratch("conc-churn");
    let mut layer = Layer::new();
    for t in 0..THREADS {
        for (k, e) in lower_model(t) {
            let p = format!("t{t}/{k}");
            layer = match e {
                Entry::File(c) => layer.file(&p, c),
                Entry::Dir => layer.dir(&p).file(&format!("{p}/inside"), "x"),
            };
        }
    }
    let mut m = Tree::new().lower(layer).materialize(s.path()).unwrap();
    m.mnt = m.mnt.canonicalize().unwrap();
    let g = mount(&m);
    let root: PathBuf = m.mnt.clone();
    let results = with_deadline(
        Duration::from_secs(40),
        "4 threads of random ops",
        move || {
            let hs: Vec<_> = (0..THREADS)
                .map(|t| {
                    let dir = root.join(format!("t{t}"));
                    std::thread::spawn(move || churn(&dir, t, Duration::from_secs(5)))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("worker panicked"))
                .collect::<Vec<_>>()
        },
    );
    let mut models = Vec::new();
    let mut problems = Vec::new();
    for (t, r) in results.into_iter().enumerate() {
        match r {
            Ok((model, n)) => {
                eprintln!("thread {t}: {n} ops, {} entries at the end", model.len());
                models.push(model);
            }
            Err(e) => problems.push(e),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for (t, model) in models.iter().enumerate() {
        problems.extend(compare(&m.mnt.join(format!("t{t}")), model));
    }
    assert!(problems.is_empty(), "mounted:\n{}", problems.join("\n"));
    g.unmount().unwrap();
    // The same after a remount, and the workdir is empty.
    let g = mount(&m);
    for (t, model) in models.iter().enumerate() {
        problems.extend(compare(&m.mnt.join(format!("t{t}")), model));
    }
    assert!(
        problems.is_empty(),
        "after remount:\n{}",
        problems.join("\n")
    );
    g.unmount().unwrap();
}

/// Reads up to `n` entries from `d`: each name and the `d_off` after it.
fn read_some(d: &mut rustix::fs::Dir, n: usize) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        match d.read() {
            Some(Ok(e)) => {
                let name = e.file_name().to_string_lossy().into_owned();
                out.push((name, e.offset()));
            }
            Some(Err(e)) => panic!("readdir: {e}"),
            None => break,
        }
    }
    out
}

/// Directory streams as users see them, now that the kernel opens directories itself (no
/// OPENDIR round trip) and every READDIR names only the directory: readers of one merged
/// directory that interleave, start over while another is half way, and seekdir back to a
/// telldir position each see every name exactly once, the names kernel overlayfs shows.
#[test]
fn interleaved_directory_readers_see_every_name_once() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("dir-streams");
    let mut top = Layer::new();
    let mut bottom = Layer::new();
    for i in 0..1500 {
        bottom = bottom.file(&format!("d/b{i:04}"), "b");
        if i % 3 == 0 {
            top = top.file(&format!("d/b{i:04}"), "shadow");
        }
        if i % 2 == 0 {
            top = top.file(&format!("d/t{i:04}"), "t");
        }
    }
    for i in (1..1500).step_by(10).filter(|i| i % 3 != 0) {
        top = top.whiteout(&format!("d/b{i:04}"));
    }
    let m = Tree::new()
        .lower(top)
        .lower(bottom)
        .materialize(s.path())
        .unwrap();
    let want: BTreeSet<String> = {
        let k = Mount::kernel(&m.stack, &m.mnt).unwrap();
        let n = names(&k.root().join("d")).unwrap();
        k.unmount().unwrap();
        n
    };
    let mounted = mount(&m);
    let dir = mounted.root().join("d");
    let problems = with_deadline(Duration::from_secs(60), "directory streams", move || {
        let open = || {
            let fd = fs::File::open(&dir).unwrap();
            rustix::fs::Dir::read_from(&fd).unwrap()
        };
        let mut problems = Vec::new();
        let (mut a, mut b) = (open(), open());
        // Interleaved: a reads 100, b reads all, a reads 50 more.
        let mut seen_a = read_some(&mut a, 100);
        let seen_b = read_some(&mut b, usize::MAX);
        seen_a.extend(read_some(&mut a, 50));
        // A third reader starts over while a is half way; then a goes on to the end.
        let mut c = open();
        let seen_c = read_some(&mut c, usize::MAX);
        // seekdir back to where a was after its 120th entry, then read to the end twice over:
        // once before the seek (the rest), once after it (from entry 121 again).
        let mark = seen_a[119].1;
        seen_a.extend(read_some(&mut a, usize::MAX));
        a.seek(mark).unwrap();
        let again = read_some(&mut a, usize::MAX);
        for (who, seen) in [("a", &seen_a), ("b", &seen_b), ("c", &seen_c)] {
            let got: Vec<&String> = seen
                .iter()
                .map(|(n, _)| n)
                .filter(|n| *n != "." && *n != "..")
                .collect();
            let set: BTreeSet<String> = got.iter().map(|n| n.to_string()).collect();
            if got.len() != set.len() {
                problems.push(format!(
                    "reader {who}: {} names, {} distinct",
                    got.len(),
                    set.len()
                ));
            }
            if set != want {
                let missing: Vec<_> = want.difference(&set).take(5).collect();
                let extra: Vec<_> = set.difference(&want).take(5).collect();
                problems.push(format!(
                    "reader {who}: missing {missing:?}, extra {extra:?}"
                ));
            }
        }
        let tail: Vec<&String> = seen_a[120..].iter().map(|(n, _)| n).collect();
        let reread: Vec<&String> = again.iter().map(|(n, _)| n).collect();
        if tail != reread {
            problems.push(format!(
                "after seekdir to entry 120: {} entries, first {:?}; before: {} entries, first {:?}",
                reread.len(),
                reread.first(),
                tail.len(),
                tail.first()
            ));
        }
        problems
    });
    mounted.unmount().unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The daemon's descriptors for removed files under `upper`: while it holds one, the file's
/// space stays used.
fn held_removed(pid: i32, upper: &Path) -> Vec<PathBuf> {
    open_fds(pid)
        .into_iter()
        .map(|fd| fd.target)
        .filter(|t| t.starts_with(upper) && t.to_string_lossy().ends_with(" (deleted)"))
        .collect()
}

/// Files removed while open give their space back once closed, also when many close at once:
/// the kernel then forgets their inodes in batches (BATCH_FORGET), and each node of a batch
/// must be let go right away (a thread that paused part way through a batch, as it may
/// between two requests, kept the rest, and their files' space, until the mount's next busy
/// moment).
#[test]
fn files_removed_while_open_let_go_of_their_space_once_closed_in_a_burst() {
    if !env::require_bin_under_test() {
        return;
    }
    const THREADS: usize = 4;
    const FILES: usize = 100;
    const ROUNDS: usize = 5;
    let s = scratch("conc-forget-burst");
    let mut m = Tree::new()
        .lower(Layer::new().file("keep", "x"))
        .materialize(s.path())
        .unwrap();
    m.mnt = m.mnt.canonicalize().unwrap();
    let upper = m.stack.upper.clone().unwrap().canonicalize().unwrap();
    let g = mount(&m);
    let pid = g.daemon_pid().expect("daemon pid");
    let root = m.mnt.clone();
    with_deadline(Duration::from_secs(90), "bursts of closes", move || {
        for round in 0..ROUNDS {
            // Each thread creates its files, keeps them open, removes them, then closes them all.
            let hs: Vec<_> = (0..THREADS)
                .map(|t| {
                    let root = root.clone();
                    std::thread::spawn(move || {
                        let open: Vec<fs::File> = (0..FILES)
                            .map(|i| {
                                let p = root.join(format!("r{round}-t{t}-{i}"));
                                let mut f = fs::File::create(&p).unwrap();
                                f.write_all(&[7u8; 4096]).unwrap();
                                fs::remove_file(&p).unwrap();
                                f
                            })
                            .collect();
                        drop(open);
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("worker panicked");
            }
            // The kernel releases closed files and forgets their inodes asynchronously.
            if !env::poll_until(Duration::from_secs(5), || {
                held_removed(pid, &upper).is_empty()
            }) {
                let held = held_removed(pid, &upper);
                panic!(
                    "round {round}: 5 s after the last close the daemon still holds {} removed files, e.g. {:?}",
                    held.len(),
                    &held[..held.len().min(5)]
                );
            }
        }
    });
    g.unmount().unwrap();
}
