//! Resource exhaustion against a live mount: an upper layer that runs out of space (a small
//! tmpfs) and a daemon that runs out of file descriptors (a low RLIMIT_NOFILE). The caller gets
//! ENOSPC or EMFILE, never EIO or a hang; nothing half-built becomes visible; the mount stays up,
//! works again once the resource is back, and the daemon holds no more descriptors than before.

use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustfuse_tests::env;
use rustfuse_tests::mount::{Mount, Stack, mount_at, open_fds, process_alive};
use rustfuse_tests::ops::{self, Op, build::*};
use rustix::io::Errno;

/// A tmpfs mounted for one test, unmounted on drop (declare it before the FUSE mount on top of
/// it, so it is dropped after).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, opts: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let data = std::ffi::CString::new(opts).unwrap();
        rustix::mount::mount(
            "tmpfs",
            path,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            Some(data.as_c_str()),
        )
        .unwrap_or_else(|e| panic!("mount -t tmpfs -o {opts} {}: {e}", path.display()));
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::empty()).is_err() {
            let _ = rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn errno(e: &std::io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw_os_error)
}

/// Fails the test unless `r` is a success or one of the `allowed` errnos; returns whether it
/// succeeded.
fn ok_or<T>(r: std::io::Result<T>, allowed: &[Errno], what: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if errno(&e).is_some_and(|n| allowed.contains(&n)) => None,
        Err(e) => panic!("{what}: {e} (expected success or {allowed:?})"),
    }
}

fn expect_err<T: std::fmt::Debug>(r: std::io::Result<T>, want: Errno, what: &str) {
    match r {
        Err(e) if errno(&e) == Some(want) => {}
        other => panic!("{what}: expected {want:?}, got {other:?}"),
    }
}

/// What the daemon's descriptors point at: the total, and the non-directories inside `under`
/// (open files, never expected to outlive the caller's handles), each with its open flags
/// (`flags:` of its fdinfo; `O_PATH`, 0o10000000, is a pin the kernel's FORGET ends, any
/// other an open handle its RELEASE ends).
fn daemon_fds(pid: i32, under: &Path) -> (usize, Vec<(PathBuf, String)>) {
    let fds = open_fds(pid);
    let files = fds
        .iter()
        .filter(|fd| {
            let deleted = fd.target.to_string_lossy().ends_with(" (deleted)");
            fd.target.starts_with(under) && (deleted || !fd.target.is_dir())
        })
        .map(|fd| (fd.target.clone(), fd.info("flags").unwrap_or_default()))
        .collect();
    (fds.len(), files)
}

/// The daemon holds at most `limit` descriptors and none for a file under `t` other than
/// `fill` (which the test holds open). Polled for a while: the kernel releases a closed file
/// asynchronously.
fn assert_fds_within(pid: i32, t: &Path, limit: usize, what: &str) {
    // The daemon's descriptor count and the files under `t` it holds other than `fill`.
    let held = || {
        let (n, mut files) = daemon_fds(pid, t);
        files.retain(|(f, _)| !f.ends_with("upper/fill"));
        (n, files)
    };
    let check = || {
        let (n, files) = held();
        n <= limit && files.is_empty()
    };
    if !env::poll_until(Duration::from_secs(5), check) {
        let (n, files) = held();
        // Whether the kernel still caches the inodes (it forgets them when told to drop its
        // caches) or the daemon holds them on its own.
        let _ = fs::write("/proc/sys/vm/drop_caches", "2");
        std::thread::sleep(Duration::from_secs(1));
        let after_drop = held().1;
        panic!(
            "{what}: the daemon holds {n} descriptors (at most {limit} expected), files under {} other than upper/fill among them (path, open flags): {files:?}; still held after the kernel dropped its caches: {after_drop:?}",
            t.display(),
        );
    }
}

fn work_entries(work: &Path) -> Vec<OsString> {
    fs::read_dir(work.join("work"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

/// Appends to `path` through the mount (a copy-up for a lower file).
fn append(path: &Path, data: &[u8]) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(data)
}

/// Writes `chunk`-sized pieces to `f` until a write fails; returns the bytes the writes
/// reported and the error.
fn write_until_error(f: &mut fs::File, chunk: usize, limit: u64) -> (u64, std::io::Error) {
    let buf = vec![0x5au8; chunk];
    let mut written = 0u64;
    loop {
        match f.write(&buf) {
            Ok(0) => return (written, std::io::Error::from(ErrorKind::WriteZero)),
            Ok(n) => written += n as u64,
            Err(e) => return (written, e),
        }
        assert!(
            written < limit,
            "wrote {written} bytes without running out of space"
        );
    }
}

/// `root/lower` under an upper and workdir on a tmpfs at `root/t` mounted with `opts`.
fn upper_on_tmpfs(root: &Path, opts: &str) -> (Tmpfs, Stack) {
    let tmp = Tmpfs::mount(&root.join("t"), &format!("{opts},mode=0755"));
    let stack = Stack {
        lowers: vec![root.join("lower")],
        upper: Some(tmp.path.join("upper")),
        work: Some(tmp.path.join("work")),
    };
    fs::create_dir_all(tmp.path.join("upper")).unwrap();
    fs::create_dir_all(tmp.path.join("work")).unwrap();
    (tmp, stack)
}

#[test]
fn full_upper_layer_gives_enospc_and_recovers() {
    if !env::require_bin_under_test() {
        return;
    }
    let s = env::scratch("faults-enospc");
    let lower = s.path().join("lower");
    let mnt = s.path().join("mnt");
    fs::create_dir_all(lower.join("d")).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    const BIG: usize = 10 << 20;
    let big = pattern(BIG, 1);
    let small = pattern(64 << 10, 2);
    fs::write(lower.join("big"), &big).unwrap();
    fs::write(lower.join("small"), &small).unwrap();
    for name in ["victim", "small2", "gone", "r1", "t1", "x1"] {
        fs::write(lower.join(name), name).unwrap();
    }
    fs::create_dir_all(lower.join("ld")).unwrap();
    fs::write(lower.join("ld/x"), "ld/x").unwrap();
    for i in 0..4 {
        fs::write(lower.join(format!("d/f{i}")), format!("d/f{i}")).unwrap();
    }
    // 16 MiB and 600 inodes: both data and inodes run out.
    let (tmp, stack) = upper_on_tmpfs(s.path(), "size=16m,nr_inodes=600");
    let (upper, work) = (tmp.path.join("upper"), tmp.path.join("work"));
    let m = Mount::fuse(&env::bin_under_test(), &stack, &[], &mnt).unwrap();
    let pid = m.daemon_pid().expect("daemon pid");
    let root = m.root().to_path_buf();
    let t = tmp.path.clone();
    let body = move || full_upper_body(&root, pid, &t, &big, &small);
    let counts = env::with_deadline(Duration::from_secs(120), "ENOSPC scenario", body);
    m.unmount().unwrap();
    // What the upper layer holds is complete: no partial copy of big, the rest as written.
    assert!(
        work_entries(&work).is_empty(),
        "work/ not empty after unmount"
    );
    let up_big = fs::read(upper.join("big")).unwrap();
    assert_eq!(up_big.len(), BIG + 1, "copied-up big in the upper layer");
    for i in 0..4 {
        assert!(
            fs::read(upper.join(format!("keep{i}"))).unwrap() == pattern(1 << 20, 10 + i as u8),
            "keep{i} in the upper layer"
        );
    }
    eprintln!(
        "ENOSPC: {} failed copy-ups of a 10 MiB file, {} small files created before ENOSPC, \
         {} rounds of 15 failing changes",
        counts.0, counts.1, counts.2
    );
    drop(tmp);
}

fn free_bytes(fs_path: &Path) -> u64 {
    let s = rustix::fs::statvfs(fs_path).unwrap();
    s.f_bavail * s.f_frsize
}

/// Every kind of change, each expected to answer `want` (`ENOSPC` on a full upper layer, `ok`
/// once there is room): copy-up by append, truncate, O_TRUNC write, xattr, chmod, link and
/// rename; creates of each type, in a copied-up and in a lower-only directory and over a
/// whiteout; unlink of a lower file and of an upper file with a lower one below (both need a
/// whiteout).
fn full_changes(want: &'static str) -> Vec<(Op, &'static str)> {
    [
        ops::build::append("small", "!"),
        mkdir("nd"),
        symlink("x", "sl"),
        mkfifo("fifo"),
        create("d/new"),
        create("ld/new"),
        create("gone"),
        unlink("victim"),
        unlink("small2"),
        rename("r1", "r2"),
        truncate("t1", 0),
        write("x1", "x1 new"),
        setxattr("ld/x", "user.k", "v"),
        chmod("d/f1", 0o600),
        link("d/f2", "d/f2-link"),
    ]
    .into_iter()
    .map(|op| (op, want))
    .collect()
}

/// What [`full_changes`] would change, read back.
fn full_view() -> Vec<Op> {
    let mut v = vec![readdir(""), readdir("d"), readdir("ld")];
    for p in ["victim", "small2", "r1", "t1", "x1", "ld/x", "d/f1", "d/f2"] {
        v.push(read(p));
        v.push(stat(p));
    }
    v.push(listxattr("ld/x"));
    v
}

/// The ENOSPC scenario proper (run under a deadline), on the tmpfs at `t`; returns counts of
/// what it did.
fn full_upper_body(
    root: &Path,
    pid: i32,
    t: &Path,
    big: &[u8],
    small: &[u8],
) -> (usize, usize, usize) {
    let work = t.join("work");
    // 4 MiB written and fsynced before anything goes wrong.
    for i in 0..4u8 {
        let mut f = fs::File::create(root.join(format!("keep{i}"))).unwrap();
        f.write_all(&pattern(1 << 20, 10 + i)).unwrap();
        f.sync_all().unwrap();
    }
    // A copy-up that needs the parent copied up too, an upper file with a lower one below, a
    // whiteout: made while there is room.
    append(&root.join("d/f0"), b"+").unwrap();
    append(&root.join("small2"), b"+").unwrap();
    fs::remove_file(root.join("gone")).unwrap();
    // 8 more MiB: about 4 MiB stay free, less than big (10 MiB).
    let mut fill = fs::File::create(root.join("fill")).unwrap();
    fill.write_all(&vec![7u8; 8 << 20]).unwrap();
    let fd_base = daemon_fds(pid, t).0;
    let free_before = free_bytes(t);
    assert!(
        free_before < big.len() as u64,
        "{free_before} bytes free, not less than big"
    );
    // The copy-up of big writes ~4 MiB into work/ and fails: ENOSPC to the caller, the
    // partial copy removed (its space comes back), the lower content still shown.
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        expect_err(
            append(&root.join("big"), b"!"),
            Errno::NOSPC,
            &format!("round {round}: copy-up of big with {free_before} bytes free"),
        );
        let left = work_entries(&work);
        assert!(left.is_empty(), "round {round}: work/ holds {left:?}");
        assert!(
            !t.join("upper/big").exists(),
            "round {round}: partial big in the upper layer"
        );
        assert_eq!(
            free_bytes(t),
            free_before,
            "round {round}: space of the failed copy-up not given back"
        );
        assert_fds_within(pid, t, fd_base, &format!("round {round}"));
    }
    assert!(
        fs::read(root.join("big")).unwrap() == big,
        "big shows other than its lower content"
    );
    // Small files until full (the inodes run out first): each create and each write succeeds
    // or gets ENOSPC, and a created file holds what its write reported.
    let mut small_files = 0;
    loop {
        assert!(small_files < 10_000, "10000 small files fit in 600 inodes");
        let p = root.join(format!("s{small_files}"));
        let Some(mut f) = ok_or(fs::File::create(&p), &[Errno::NOSPC], "create small file") else {
            break;
        };
        let wrote = ok_or(f.write(&[1u8; 4096]), &[Errno::NOSPC], "write small file");
        drop(f);
        let len = fs::metadata(&p).unwrap().len();
        assert_eq!(len, wrote.unwrap_or(0) as u64, "{}: size", p.display());
        small_files += 1;
        if wrote.is_none() {
            break;
        }
    }
    assert!(small_files > 100, "only {small_files} small files fitted");
    // Fill the data: the last write may be short, then ENOSPC; the file holds exactly what
    // the writes reported.
    let (more, e) = write_until_error(&mut fill, 256 << 10, 64 << 20);
    assert_eq!(
        errno(&e),
        Some(Errno::NOSPC),
        "filling the upper layer: {e}"
    );
    let fill_len = fs::metadata(root.join("fill")).unwrap().len();
    assert_eq!(
        fill_len,
        (8 << 20) + more,
        "fill: size differs from what the writes reported"
    );
    // Full: every kind of change gets ENOSPC and changes nothing visible, repeatedly, with no
    // descriptor left behind.
    // The first round opens directories not looked up before: the count is taken after it.
    let mut fd_full = usize::MAX;
    let view_before = ops::run(root, &full_view());
    const FULL_ROUNDS: usize = 20;
    for round in 0..FULL_ROUNDS {
        let what = format!("full, round {round}");
        let mut problems = ops::mismatches(root, &what, &full_changes("ENOSPC"));
        if ops::run(root, &full_view()) != view_before {
            problems.push(format!("{what}: the view changed"));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        assert!(
            fs::read(root.join("small")).unwrap() == small,
            "{what}: small"
        );
        let left = work_entries(&work);
        assert!(left.is_empty(), "{what}: work/ holds {left:?}");
        assert_fds_within(pid, t, fd_full, &what);
        if round == 0 {
            fd_full = daemon_fds(pid, t).0;
        }
    }
    // The mount is up and what was written before is intact.
    for i in 0..4u8 {
        let mut got = Vec::new();
        fs::File::open(root.join(format!("keep{i}")))
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert!(got == pattern(1 << 20, 10 + i), "keep{i} damaged");
    }
    assert_eq!(fs::read_to_string(root.join("d/f0")).unwrap(), "d/f0+");
    // Space freed: everything works again, including the copy-up that failed.
    drop(fill);
    fs::remove_file(root.join("fill")).unwrap();
    for i in 0..small_files {
        fs::remove_file(root.join(format!("s{i}"))).unwrap();
    }
    append(&root.join("big"), b"!").unwrap();
    let got = fs::read(root.join("big")).unwrap();
    assert!(
        got.len() == big.len() + 1 && got[..big.len()] == *big && got[big.len()] == b'!',
        "big after its copy-up"
    );
    let problems = ops::mismatches(root, "space freed", &full_changes("ok"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(fs::read_to_string(root.join("d/new")).unwrap(), "");
    assert_eq!(fs::read_to_string(root.join("r2")).unwrap(), "r1");
    assert!(work_entries(&work).is_empty(), "work/ not empty at the end");
    assert_fds_within(pid, t, usize::MAX, "at the end");
    (ROUNDS, small_files, FULL_ROUNDS)
}

#[test]
fn full_upper_with_wh_file_whiteouts_changes_nothing_on_enospc() {
    // With `.wh.NAME` whiteouts (FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT, as where mknod is not
    // permitted) a removal is two steps: the `.wh.` file and the removal of the upper entry.
    // When the first cannot be made, the second must not happen either: the caller gets
    // ENOSPC and sees what it saw, never the lower file coming back.
    if !env::require_bin_under_test() {
        return;
    }
    let s = env::scratch("faults-enospc-wh");
    let lower = s.path().join("lower");
    let mnt = s.path().join("mnt");
    for d in ["dd", "ld"] {
        fs::create_dir_all(lower.join(d)).unwrap();
    }
    fs::create_dir_all(&mnt).unwrap();
    for name in ["u1", "u2", "r", "ld/x"] {
        fs::write(lower.join(name), name).unwrap();
    }
    let (tmp, stack) = upper_on_tmpfs(s.path(), "size=4m,nr_inodes=64");
    let env = [("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT", "1")];
    let m = Mount::fuse_env(&env::bin_under_test(), &stack, &[], &mnt, &env).unwrap();
    let root = m.root().to_path_buf();
    let problems = env::with_deadline(Duration::from_secs(60), "ENOSPC with .wh.", move || {
        let mut problems = ops::mismatches(
            &root,
            "before",
            &[
                (ops::build::append("u1", "+"), "ok"),
                (ops::build::append("u2", "+"), "ok"),
                (create("dd/t"), "ok"),
                (unlink("dd/t"), "ok"),
            ],
        );
        // Use up the inodes.
        let mut fillers = 0;
        while fs::write(root.join(format!("e{fillers}")), "").is_ok() {
            fillers += 1;
            assert!(fillers < 1000, "64 inodes hold 1000 files");
        }
        let changes = |want| {
            vec![
                (unlink("u1"), want),
                (rename("u2", "u3"), want),
                (rmdir("dd"), want),
                (unlink("r"), want),
                (rename("ld/x", "ld/y"), want),
            ]
        };
        let view = [
            readdir(""),
            readdir("dd"),
            readdir("ld"),
            read("u1"),
            read("u2"),
            read("r"),
        ];
        let before = ops::run(&root, &view);
        for round in 0..5 {
            let what = format!("full, round {round}");
            problems.extend(ops::mismatches(&root, &what, &changes("ENOSPC")));
            if ops::run(&root, &view) != before {
                problems.push(format!(
                    "{what}: the view changed: {:?}",
                    ops::run(&root, &view)
                ));
            }
        }
        for i in 0..fillers {
            fs::remove_file(root.join(format!("e{i}"))).unwrap();
        }
        problems.extend(ops::mismatches(&root, "space freed", &changes("ok")));
        problems.extend(ops::mismatches(
            &root,
            "space freed",
            &[
                (read("u1"), "ENOENT"),
                (read("u2"), "ENOENT"),
                (read("u3"), "ok: \"u2+\""),
                (read("r"), "ENOENT"),
                (readdir("ld"), "ok: y:f"),
                (readdir(""), "ok: ld:d u3:f"),
            ],
        ));
        problems
    });
    m.unmount().unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(tmp);
}

/// Lower tree for the descriptor test: `dirs` directories, each with a subdirectory, three
/// files in each.
fn many_dirs(lower: &Path, dirs: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..dirs {
        for sub in [format!("d{i}"), format!("d{i}/sub")] {
            fs::create_dir_all(lower.join(&sub)).unwrap();
            for j in 0..3 {
                let rel = PathBuf::from(format!("{sub}/f{j}"));
                let content = format!("{} {i} {j}", rel.display()).into_bytes();
                fs::write(lower.join(&rel), &content).unwrap();
                files.push((rel, content));
            }
        }
    }
    files
}

/// Every entry under `dir`, read back: (directories, files) seen. Panics on any error.
fn walk(dir: &Path, root: &Path, want: &Want) -> (usize, usize) {
    let mut dirs = 1;
    let mut files = 0;
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
        let e = e.unwrap();
        let p = e.path();
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        if md.is_dir() {
            let (d, f) = walk(&p, root, want);
            dirs += d;
            files += f;
        } else {
            let got = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            if let Some(w) = want.get(p.strip_prefix(root).unwrap()) {
                assert!(got == *w, "{}: content", p.display());
            }
            files += 1;
        }
    }
    (dirs, files)
}

const NOFILE: u64 = 64;

#[test]
fn few_descriptors_give_emfile_never_eio() {
    if !env::require_bin_under_test() {
        return;
    }
    for tool in ["prlimit", "setpriv"] {
        if !Path::new("/usr/bin").join(tool).exists() {
            env::skip(&format!("{tool} (util-linux) is not installed"));
            return;
        }
    }
    let s = env::scratch("faults-emfile");
    let lower = s.path().join("lower");
    let upper = s.path().join("upper");
    let work = s.path().join("work");
    let mnt = s.path().join("mnt");
    for d in [&lower, &upper, &work, &mnt] {
        fs::create_dir_all(d).unwrap();
    }
    const DIRS: usize = 150;
    let files = many_dirs(&lower, DIRS);
    let stack = Stack {
        lowers: vec![lower.clone()],
        upper: Some(upper.clone()),
        work: Some(work.clone()),
    };
    let mnt = mnt.canonicalize().unwrap();
    let m = Mount::fuse_nofile(&env::bin_under_test(), &stack, NOFILE, &mnt).unwrap();
    let pid = m.daemon_pid().expect("daemon pid");
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().nth(3),
        Some(NOFILE.to_string().as_str()),
        "daemon's RLIMIT_NOFILE: {line}"
    );
    let root = m.root().to_path_buf();
    let scratch_root = s.path().canonicalize().unwrap();
    let report = env::with_deadline(Duration::from_secs(120), "EMFILE scenario", move || {
        emfile_body(&root, pid, &scratch_root, &files)
    });
    assert!(process_alive(pid), "daemon died");
    assert!(mount_at(&mnt).is_some(), "mount gone");
    assert!(work_entries(&work).is_empty(), "work/ not empty");
    m.unmount().unwrap();
    eprintln!("EMFILE ({NOFILE} fds): {report}");
}

type Want = std::collections::HashMap<PathBuf, Vec<u8>>;

/// Appends `byte` to the lower file `rel` through the mount (a copy-up the first time);
/// success or EMFILE/ENFILE, recorded in `want`.
fn try_append(root: &Path, want: &mut Want, rel: &Path, byte: u8, what: &str) -> bool {
    let ok = ok_or(append(&root.join(rel), &[byte]), &EMFILE, what).is_some();
    if ok {
        want.get_mut(rel).unwrap().push(byte);
    }
    ok
}

const EMFILE: [Errno; 2] = [Errno::MFILE, Errno::NFILE];

/// Every file shows what `want` says, or cannot be read for lack of descriptors; `work/` is
/// empty.
fn assert_whole(root: &Path, work: &Path, want: &Want, what: &str) {
    for (rel, w) in want {
        if let Some(got) = ok_or(fs::read(root.join(rel)), &EMFILE, what) {
            assert!(got == *w, "{what}: {}: content", rel.display());
        }
    }
    let left = work_entries(work);
    assert!(left.is_empty(), "{what}: work/ holds {left:?}");
}

fn emfile_body(root: &Path, pid: i32, scratch: &Path, files: &[(PathBuf, Vec<u8>)]) -> String {
    let work = scratch.join("work");
    let mut want: Want = files.iter().cloned().collect();
    let at_mount = daemon_fds(pid, scratch).0;
    // A walk of the whole tree needs no more descriptors than the daemon has: its directory
    // fds are bounded.
    let (d, f) = walk(root, root, &want);
    assert_eq!((d, f), (1 + files.len() / 3, files.len()), "first walk");
    let after_walk = daemon_fds(pid, scratch).0;
    assert!(
        after_walk as u64 <= NOFILE,
        "{after_walk} fds after the walk"
    );
    // Hold every file open: the daemon runs out; each open succeeds or gets EMFILE.
    let mut held = Vec::new();
    let mut refused = 0;
    for (rel, _) in files {
        match ok_or(fs::File::open(root.join(rel)), &EMFILE, "open held") {
            Some(fh) => held.push(fh),
            None => refused += 1,
        }
    }
    assert!(refused > 0, "{} opens held and none refused", held.len());
    let n_held = held.len();
    // Out of descriptors: copy-ups, creates, mkdir, readdir, stat succeed or get EMFILE.
    let mut outcome = [0usize; 2];
    let step = files.len() / 20;
    for (i, (rel, _)) in files.iter().enumerate().step_by(step) {
        let results = [
            try_append(root, &mut want, rel, b'x', "copy-up"),
            ok_or(
                fs::write(root.join(format!("new{i}")), "n"),
                &EMFILE,
                "create",
            )
            .is_some(),
            ok_or(
                fs::create_dir(root.join(format!("nd{i}"))),
                &EMFILE,
                "mkdir",
            )
            .is_some(),
            ok_or(
                fs::read_dir(root.join(rel).parent().unwrap()),
                &EMFILE,
                "opendir",
            )
            .is_some(),
            ok_or(fs::metadata(root.join(rel)), &EMFILE, "stat").is_some(),
        ];
        for ok in results {
            outcome[usize::from(!ok)] += 1;
        }
    }
    assert_whole(root, &work, &want, "out of fds");
    // Give descriptors back one at a time: a copy-up then runs out at a later step each time,
    // until it succeeds; whatever the step, nothing half-copied is left.
    let mut steps = String::new();
    for k in 0..12 {
        let before = daemon_fds(pid, scratch).0;
        drop(held.pop());
        env::poll_until(Duration::from_secs(5), || {
            daemon_fds(pid, scratch).0 < before
        });
        // Lower files not touched yet (indices 3k+1 are never multiples of `step`).
        let rel = &files[3 * k + 1].0;
        let ok = try_append(root, &mut want, rel, b'z', "copy-up with few fds");
        steps.push(if ok { '+' } else { '-' });
        assert_whole(root, &work, &want, &format!("{} fds given back", k + 1));
    }
    drop(held);
    // The kernel releases files asynchronously: wait for the daemon to close them.
    let released = env::poll_until(Duration::from_secs(10), || {
        daemon_fds(pid, scratch).1.is_empty()
    });
    assert!(
        released,
        "daemon still holds {:?} after the files were closed",
        daemon_fds(pid, scratch).1
    );
    // Everything works again.
    for (rel, _) in files.iter().step_by(step) {
        assert!(try_append(root, &mut want, rel, b'y', "append after"));
    }
    for i in 0..20 {
        fs::write(root.join(format!("after{i}")), "a").unwrap();
        fs::create_dir(root.join(format!("after-d{i}"))).unwrap();
    }
    walk(root, root, &want);
    assert_whole(root, &work, &want, "at the end");
    // The reads just made are released asynchronously too.
    env::poll_until(Duration::from_secs(10), || {
        daemon_fds(pid, scratch).1.is_empty()
    });
    let (end, open_files) = daemon_fds(pid, scratch);
    assert!(open_files.is_empty(), "daemon holds {open_files:?}");
    // The directory-fd cache is at least 16 under a low limit: the count may differ from the
    // one after the first walk by what that cache holds, never by more.
    assert!(
        end <= at_mount + 16 && end <= after_walk + 16,
        "daemon fds: {at_mount} at mount, {after_walk} after a walk, {end} at the end"
    );
    format!(
        "{n_held} opens held, {refused} refused with EMFILE; while out: {} ops ok, {} EMFILE; \
         copy-ups as fds came back one by one: {steps}; daemon fds {at_mount} at mount, \
         {after_walk} after the walk, {end} at the end",
        outcome[0], outcome[1]
    )
}
