//! Reads give the layer's bytes, whichever way the daemon answers them (a copy through its
//! memory for short READs, splice(2) from the file to the device from 16 KiB up): whole-file
//! reads through the page cache of files whose sizes sit around the shapes a reply takes
//! (16 KiB, the kernel's 128 KiB readahead requests, 1 MiB, a file end inside a request),
//! and O_DIRECT reads, which reach the daemon as READs of exactly the range asked for
//! (unaligned offsets, lengths across the end of the file, offsets past it). On lower files,
//! then on their copies after a copy-up, through handles opened before it too (they follow the
//! copy, as on kernel overlayfs); served by the pool of threads and by one thread. After it
//! all the daemon holds no more pipes than a pair per thread. Sparse lower files read the same
//! after their copy-up, which keeps their holes. Appends to a lower file beside a read handle
//! opened before them reach that handle and the upper layer, never the lower one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use rustfuse_tests::env::{self, bin_under_test, scratch, with_deadline};
use rustfuse_tests::held;
use rustfuse_tests::layers::{Layer, Materialized, Tree};
use rustfuse_tests::mount::Mount;
use rustfuse_tests::rng::Rng;

const SIZES: &[usize] = &[
    0, 1, 4095, 16383, 16384, 16385, 100_000, 131_072, 131_073, 1_048_579, 3_000_001,
];
const LENGTHS: &[usize] = &[
    1,
    4096,
    16383,
    16384,
    20_000,
    65_536,
    131_072,
    300_000,
    1 << 20,
];
const TAIL: &[u8] = b"+appended";
/// Mount options of each test's two mounts, and how a finding names them.
const SIDES: &[(&[&str], &str)] = &[(&[], "pool"), (&["threaded=0"], "one thread")];

fn content(size: usize) -> Vec<u8> {
    let mut r = Rng::new(size as u64 + 1);
    (0..size).map(|_| r.next_u64() as u8).collect()
}

fn name(size: usize) -> String {
    format!("f{size}")
}

fn direct(p: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(p)
}

/// O_DIRECT reads of `f` at offsets and lengths from `rng`: each must return the bytes of
/// `want` in that range, all of them in one call.
fn check_direct(f: &fs::File, want: &[u8], rng: &mut Rng, what: &str, problems: &mut Vec<String>) {
    for i in 0..40 {
        let off = match i % 4 {
            0 => rng.below(want.len() + 1) / 4096 * 4096,
            1 => want.len().saturating_sub(rng.below(20_000)),
            2 => want.len() + rng.below(3),
            _ => rng.below(want.len() + 1),
        };
        let len = *rng.pick(LENGTHS);
        let mut buf = vec![0u8; len];
        let end = (off + len).min(want.len()).max(off.min(want.len()));
        let expect = &want[off.min(want.len())..end];
        match f.read_at(&mut buf, off as u64) {
            Ok(n) if &buf[..n] == expect => {}
            Ok(n) => {
                let at = buf[..n].iter().zip(expect).position(|(a, b)| a != b);
                problems.push(format!(
                    "{what}: O_DIRECT read of {len} at {off}: {n} bytes (want {}), first difference at {at:?}",
                    expect.len()
                ));
            }
            Err(e) => problems.push(format!("{what}: O_DIRECT read of {len} at {off}: {e}")),
        }
    }
}

fn check_all(root: &Path, tail: bool, rng: &mut Rng, side: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for &size in SIZES {
        let mut want = content(size);
        if tail {
            want.extend_from_slice(TAIL);
        }
        let p = root.join(name(size));
        let what = format!("{side}, {} ({} bytes)", name(size), want.len());
        match fs::read(&p) {
            Ok(got) if got == want => {}
            Ok(got) => problems.push(format!(
                "{what}: read gave {} bytes, not the file",
                got.len()
            )),
            Err(e) => problems.push(format!("{what}: read: {e}")),
        }
        match direct(&p) {
            Ok(f) => check_direct(&f, &want, rng, &what, &mut problems),
            Err(e) => problems.push(format!("{what}: open O_DIRECT: {e}")),
        }
    }
    problems
}

fn thread_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

fn pipe_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
            })
            .count()
    })
}

#[test]
fn reads_of_every_shape_give_the_layer_bytes_before_and_after_copy_up() {
    if !env::require_bin_under_test() {
        return;
    }
    let mut problems = Vec::new();
    for &(opts, side) in SIDES {
        let s = scratch("reads");
        let mut layer = Layer::new();
        for &size in SIZES {
            layer = layer.file(&name(size), content(size));
        }
        let Materialized { stack, mnt } = Tree::new().lower(layer).materialize(s.path()).unwrap();
        let m = Mount::fuse(&bin_under_test(), &stack, opts, &mnt)
            .unwrap_or_else(|e| panic!("mount ({side}): {e}"));
        let root = m.root().to_path_buf();
        let pid = m.daemon_pid().expect("daemon pid");
        let side = side.to_string();
        problems.extend(with_deadline(
            Duration::from_secs(120),
            "reads",
            move || {
                let mut rng = Rng::new(7);
                let mut problems = check_all(&root, false, &mut rng, &format!("{side}, lower"));
                // Handles opened before the copy-up, read after it: they follow the copy.
                let before: Vec<_> = SIZES.iter().map(|&s| direct(&root.join(name(s)))).collect();
                for &size in SIZES {
                    let appended = fs::OpenOptions::new()
                        .append(true)
                        .open(root.join(name(size)))
                        .and_then(|mut f| f.write_all(TAIL));
                    if let Err(e) = appended {
                        problems.push(format!("{side}: append to {}: {e}", name(size)));
                    }
                }
                for (&size, f) in SIZES.iter().zip(&before) {
                    let mut want = content(size);
                    want.extend_from_slice(TAIL);
                    let what = format!("{side}, {} opened before the copy-up", name(size));
                    match f {
                        Ok(f) => check_direct(f, &want, &mut rng, &what, &mut problems),
                        Err(e) => problems.push(format!("{what}: open O_DIRECT: {e}")),
                    }
                }
                problems.extend(check_all(
                    &root,
                    true,
                    &mut rng,
                    &format!("{side}, copied up"),
                ));
                drop(before);
                // The pipes of the splice replies are kept and used again: a pair per READ
                // answered at once, so no more than a pair per daemon thread (hundreds of
                // reads made here).
                let (pipes, threads) = (pipe_count(pid), thread_count(pid));
                if pipes > 4 * threads {
                    problems.push(format!(
                        "{side}: the daemon holds {pipes} pipe ends with {threads} threads"
                    ));
                }
                problems
            },
        ));
        drop(m);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A sparse lower file: its name, where its data is (offset, length), its size.
type Holey = (&'static str, &'static [(u64, usize)], u64);

const HOLEY: &[Holey] = &[
    ("mid", &[(0, 4096), (5_000_000, 100)], 9_000_000),
    ("lead", &[(1 << 20, 10)], (1 << 20) + 10),
    ("tail", &[(0, 4096)], 10 << 20),
    ("all", &[], 100),
    ("dense", &[(0, 300_000)], 300_000),
];

/// Sparse lower files copied up (a chmod) read as before, zeros in their holes, with their
/// size; the copies keep the holes (no more blocks than the lower file, give or take a few)
/// and a file without holes is copied whole.
#[test]
fn sparse_lower_files_copy_up_with_their_holes() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = scratch("sparse");
    let Materialized { stack, mnt } = Tree::new()
        .lower(Layer::new().file("keep", "x"))
        .materialize(s.path())
        .unwrap();
    let lower = stack.lowers[0].join("holes");
    fs::create_dir(&lower).unwrap();
    let mut want = Vec::new();
    for &(name, data, size) in HOLEY {
        let f = fs::File::create(lower.join(name)).unwrap();
        let mut bytes = vec![0u8; size as usize];
        for &(off, len) in data {
            let chunk = content(len + off as usize % 251);
            f.write_all_at(&chunk[..len], off).unwrap();
            bytes[off as usize..off as usize + len].copy_from_slice(&chunk[..len]);
        }
        f.set_len(size).unwrap();
        want.push(bytes);
    }
    let m = Mount::fuse(&bin_under_test(), &stack, &[], &mnt).expect("mount");
    let root = m.root().to_path_buf();
    let upper = stack.upper.clone().expect("upper").join("holes");
    let problems = with_deadline(Duration::from_secs(60), "sparse", move || {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mut problems = Vec::new();
        for (&(name, _, size), want) in HOLEY.iter().zip(&want) {
            let p = root.join("holes").join(name);
            if let Err(e) = fs::set_permissions(&p, fs::Permissions::from_mode(0o640)) {
                problems.push(format!("chmod {name}: {e}"));
                continue;
            }
            match fs::read(&p) {
                Ok(got) if &got == want => {}
                Ok(got) => problems.push(format!(
                    "{name}: read {} bytes after the copy-up, not the lower file's {size}",
                    got.len()
                )),
                Err(e) => problems.push(format!("{name}: read: {e}")),
            }
            let (Ok(low), Ok(up)) = (
                fs::metadata(lower.join(name)),
                fs::metadata(upper.join(name)),
            ) else {
                problems.push(format!("{name}: no copy in the upper layer"));
                continue;
            };
            if up.len() != size {
                problems.push(format!(
                    "{name}: the copy has {} bytes, not {size}",
                    up.len()
                ));
            }
            if up.blocks() > low.blocks() + 64 {
                problems.push(format!(
                    "{name}: the copy has {} blocks against the lower file's {}: holes filled",
                    up.blocks(),
                    low.blocks()
                ));
            }
        }
        problems
    });
    drop(m);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Appends to a lower file while a read handle opened before them stays open (`tail -f` on
/// a log that short-lived writers append to, `rustfuse_tests::held`): the handle reads each
/// line as it comes, and again once its pages are out of the page cache; once closed, a fresh
/// open reads them all, as on kernel overlayfs; the lower layer's file never changes.
/// (fuse-overlayfs 2.0 as root passes the first handle's reads through to the lower file and
/// then the writers' too, into the lower layer: see docs/benchmarks.md.)
#[test]
fn appends_beside_a_held_read_handle_reach_it_and_only_the_upper_layer() {
    if !env::require_bin_under_test() {
        return;
    }
    let original = held::lower_log();
    let mut problems = Vec::new();
    for &(opts, side) in SIDES {
        let s = scratch("held");
        let Materialized { stack, mnt } = Tree::new()
            .lower(Layer::new().file("app/held.log", original.clone()))
            .materialize(s.path())
            .unwrap();
        let lower_file = stack.lowers[0].join("app/held.log");
        let upper_file = stack
            .upper
            .clone()
            .expect("an upper layer")
            .join("app/held.log");
        let m = Mount::fuse(&bin_under_test(), &stack, opts, &mnt)
            .unwrap_or_else(|e| panic!("mount ({side}): {e}"));
        let p = m.root().join("app/held.log");
        // 200 lines cross the file's first page boundary and the second.
        let (want, found) = with_deadline(Duration::from_secs(60), "held reader", move || {
            held::append_beside_reader(&p, 200)
        })
        .unwrap_or_else(|e| panic!("{side}: {e}"));
        problems.extend(found.into_iter().map(|f| format!("{side}: {f}")));
        drop(m);
        if fs::read(&lower_file).unwrap() != original {
            problems.push(format!("{side}: the lower layer's file changed"));
        }
        if fs::read(&upper_file).ok() != Some(want) {
            problems.push(format!(
                "{side}: the upper layer's copy does not hold the appends"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
