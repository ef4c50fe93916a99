//! Crash consistency: `kill -9` of the FUSE daemon in the middle of a copy-up or of renames,
//! then a fresh mount of the same layers. Whatever the moment of the kill, every file shows
//! its old or its new complete content, no name shows twice or vanishes, and the workdir is
//! cleared at mount.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustfuse_tests::env;
use rustfuse_tests::mount::{Mount, Stack};

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
    for round in 0..6u64 {
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
        std::thread::sleep(Duration::from_millis(round * 12));
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

#[test]
fn kill_during_renames_loses_no_name() {
    if !env::require_bin_under_test() {
        return;
    }
    const N: usize = 300;
    for round in 0..5u64 {
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
        std::thread::sleep(Duration::from_millis(5 + round * 20));
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
