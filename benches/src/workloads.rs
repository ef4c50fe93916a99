//! The named workloads and how one run of each goes on one filesystem.
//!
//! Every run gets a fresh upper and work dir and its own mount, so writes of one run never
//! leak into the next. Unless a workload says "cold" (caches dropped) or "warm" (one unmeasured
//! pass first), it runs on a fresh mount: the filesystem's own caches are empty, the page cache
//! of the layers below holds whatever earlier runs left.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::layerset::{Layers, Sizes};
use crate::mount::{self, Fs, Kind, Mount};
use crate::run;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Metadata,
    Read,
    Write,
    Mixed,
    Mount,
    Memory,
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::Metadata => "metadata",
            Group::Read => "read",
            Group::Write => "write",
            Group::Mixed => "mixed",
            Group::Mount => "mount",
            Group::Memory => "memory",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Bytes,
}

/// What the issue asks of rustfuse on a workload, besides beating both fuse-overlayfs.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// Median at most this many times kernel overlayfs's.
    KernelRatio(f64),
    /// Median under this many seconds.
    Seconds(f64),
    /// At most this fraction of the fuse-overlayfs daemons' RSS.
    FuseOverlayfsRss(f64),
    /// Only "faster than both fuse-overlayfs".
    BeatFuseOverlayfs,
    /// buildkit-build: every rustfuse column (rustfuse as BuildKit's fuse-overlayfs, the
    /// snapshotter in FUSE and in auto mode) faster than both fuse-overlayfs, and the
    /// snapshotter in FUSE mode at most this many times BuildKit's kernel overlayfs.
    EveryVariant(f64),
}

pub struct Workload {
    pub name: &'static str,
    pub group: Group,
    pub unit: Unit,
    pub target: Target,
    pub about: &'static str,
}

const fn w(name: &'static str, group: Group, target: Target, about: &'static str) -> Workload {
    Workload {
        name,
        group,
        unit: Unit::Seconds,
        target,
        about,
    }
}

use Group::*;
use Target::*;

pub const WORKLOADS: &[Workload] = &[
    w(
        "lone-getxattr",
        Metadata,
        BeatFuseOverlayfs,
        "getxattr of lower files, one call at a time (median latency per call)",
    ),
    w(
        "lone-open",
        Metadata,
        BeatFuseOverlayfs,
        "open+close of lower files, one at a time (median latency per call)",
    ),
    w(
        "lone-statx",
        Metadata,
        BeatFuseOverlayfs,
        "statx with AT_STATX_FORCE_SYNC, one at a time (median latency per call)",
    ),
    w(
        "find-cold",
        Metadata,
        BeatFuseOverlayfs,
        "find over the mount, caches dropped",
    ),
    w(
        "find-warm",
        Metadata,
        KernelRatio(2.0),
        "find, after one unmeasured find",
    ),
    w(
        "find-remount",
        Metadata,
        KernelRatio(2.0),
        "find, then remount, then the measured find",
    ),
    w(
        "ls-lR",
        Metadata,
        KernelRatio(2.0),
        "ls -lR of the mount, fresh mount",
    ),
    w(
        "stat-all",
        Metadata,
        KernelRatio(2.0),
        "lstat of every visible file by path, fresh mount",
    ),
    w(
        "git-status",
        Metadata,
        KernelRatio(2.0),
        "git status of a repository in a lower layer, after one unmeasured run",
    ),
    w(
        "seqread-cold",
        Read,
        BeatFuseOverlayfs,
        "dd of the large lower file (1 GiB at scale 1), caches dropped",
    ),
    w(
        "seqread-warm",
        Read,
        KernelRatio(1.3),
        "dd of the large lower file, after one unmeasured read",
    ),
    w(
        "seqread-ro",
        Read,
        BeatFuseOverlayfs,
        "seqread-warm on a read-only mount (lower layers only: the snapshotter's views), \
         where lower files may be passed through",
    ),
    w(
        "randread-4k",
        Read,
        KernelRatio(1.3),
        "random 4 KiB preads, 2 threads, warm (256 MiB file at scale 1)",
    ),
    w(
        "tar-small",
        Read,
        BeatFuseOverlayfs,
        "tar of all small files into a pipe, fresh mount",
    ),
    w(
        "untar",
        Write,
        KernelRatio(2.5),
        "tar xf of a 20k-file archive into the mount",
    ),
    w(
        "create-fsync",
        Write,
        BeatFuseOverlayfs,
        "create, write 4 KiB, fsync 1000 new files",
    ),
    w(
        "seqwrite",
        Write,
        BeatFuseOverlayfs,
        "dd 1 GiB of zeros to a new file, conv=fsync",
    ),
    w(
        "append-copyup",
        Write,
        KernelRatio(1.0),
        "append 1 byte to a 512 MiB lower file (copy-up)",
    ),
    w(
        "append-held",
        Write,
        BeatFuseOverlayfs,
        "append a line 200 times to a lower file (an O_APPEND open each) while a read handle \
         opened before the first stays open; checked as well as timed: that handle and a \
         fresh open read every line, and the lower layer's file is unchanged",
    ),
    w(
        "chmod-chown",
        Write,
        KernelRatio(2.5),
        "chmod -R then chown -R of usr/lib (lower files)",
    ),
    w(
        "rm-rf",
        Write,
        KernelRatio(2.5),
        "rm -rf of app/node_modules (a lower tree)",
    ),
    w(
        "renames",
        Write,
        KernelRatio(2.5),
        "rename every file of usr/include (lower files)",
    ),
    w(
        "rename-dir",
        Write,
        BeatFuseOverlayfs,
        "mv of app/node_modules (a lower tree) to a new name; kernel and rustfuse with \
         redirect_dir=on (kernel rootless: userxattr refuses it, so mv copies), fuse-overlayfs: \
         EXDEV, so mv copies",
    ),
    w(
        "cp-a",
        Write,
        KernelRatio(2.5),
        "cp -a of usr/lib to a new dir",
    ),
    w(
        "pkg-replace",
        Write,
        KernelRatio(2.5),
        "write a new file beside each file of usr/bin and var/lib/dpkg, rename it over",
    ),
    w(
        "two-readers",
        Mixed,
        BeatFuseOverlayfs,
        "two dd of the two large lower files at once, after one unmeasured read of each \
         (parallel requests: the pacer must bring in a second thread)",
    ),
    w(
        "untar-find",
        Mixed,
        BeatFuseOverlayfs,
        "tar xf of the 20k-file archive into the mount beside a find of the lower trees",
    ),
    w(
        "make-j2",
        Mixed,
        BeatFuseOverlayfs,
        "make -j2 of a generated C project in a lower layer",
    ),
    w(
        "buildah-bud",
        Mixed,
        BeatFuseOverlayfs,
        "rootless buildah bud (3000 files made, lower files changed, 2000-file COPY); kernel: native overlay",
    ),
    w(
        "buildkit-build",
        Mixed,
        EveryVariant(2.5),
        "rootless BuildKit, multi-stage build exported as OCI; kernel: its overlayfs snapshotter, \
         fo1/fo2/rustfuse: its fuse-overlayfs snapshotter, snap-*: rustfuse-snapshotter",
    ),
    w(
        "mount-1",
        Mount,
        BeatFuseOverlayfs,
        "time until a 1-lower-layer mount is in the mount table",
    ),
    w(
        "mount-10",
        Mount,
        BeatFuseOverlayfs,
        "same, 10 lower layers",
    ),
    w("mount-50", Mount, Seconds(0.050), "same, 50 lower layers"),
    Workload {
        name: "rss-after-find",
        group: Memory,
        unit: Unit::Bytes,
        target: FuseOverlayfsRss(0.5),
        about: "VmRSS of the FUSE daemon after two finds",
    },
];

/// Columns that are rustfuse-snapshotter, not a mount program: they apply to
/// buildkit-build only.
pub const SNAPSHOTTER_COLUMNS: [&str; 2] = ["snap-fuse", "snap-auto"];

/// Whether `w` runs on the column `fs_`.
/// The latency percentiles (p50, p90, p99, seconds) of the last lone-request run, for the
/// report: set by [`Ctx::run`] (or, rootless, from the child's `LAT` line), taken after it.
static LATENCY: std::sync::Mutex<Option<[f64; 3]>> = std::sync::Mutex::new(None);

/// Records `P50 P90 P99` as printed by the `lone` worker.
pub fn set_latency(line: &str) -> Result<[f64; 3]> {
    let v: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("latency line {line:?}"))?;
    let [a, b, c] = v[..] else {
        bail!("latency line {line:?}: want three numbers");
    };
    *LATENCY.lock().unwrap_or_else(|e| e.into_inner()) = Some([a, b, c]);
    Ok([a, b, c])
}

/// The percentiles of the run that just ended, if it was a lone-request one.
pub fn take_latency() -> Option<[f64; 3]> {
    LATENCY.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Calls per lone-request run.
const LONE_CALLS: &str = "4000";

pub fn applies(fs_: &Fs, w: &Workload) -> bool {
    if fs_.kind == Kind::Floor {
        // One passed-through directory: nothing to write into or mount in layers.
        return matches!(w.group, Metadata | Read);
    }
    w.name == "buildkit-build" || !SNAPSHOTTER_COLUMNS.contains(&fs_.id)
}

/// The builds run as a non-root build user in every mode of the tool.
pub fn always_rootless(w: &Workload) -> bool {
    matches!(w.name, "buildah-bud" | "buildkit-build")
}

/// append-held's file (relative to the mount and to the `app` layer) and its appends.
const HELD_FILE: &str = "app/held.log";
const HELD_APPENDS: usize = 200;

/// Earlier runs' upper and work dirs, under the run dir (see [`Ctx::trash`]).
const TRASH: &str = "trash";
/// The trash is emptied early when the disk has less than this free.
const TRASH_FREE_MIN: u64 = 8 << 30;

/// Read every file under `dir` (its data and metadata into the caches).
fn read_tree(dir: &Path) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_file() {
                let mut f = fs::File::open(e.path())?;
                while std::io::Read::read(&mut f, &mut buf)? > 0 {}
            }
        }
    }
    Ok(())
}

/// What every run needs.
pub struct Ctx {
    pub exe: PathBuf,
    /// The rustfuse binary (`--rustfuse`): the snapshotter columns of buildkit-build mount it.
    pub rustfuse: PathBuf,
    /// The BuildKit version of buildkit-build.
    pub buildkit: String,
    pub layers: Layers,
    pub sizes: Sizes,
    pub run_root: PathBuf,
    pub timeout: Duration,
    /// Running inside the user namespace of a rootless run (see `rootless`): kernel overlayfs
    /// needs `userxattr`, and dropping caches is asked of the root parent.
    pub userns: bool,
    /// `--metacopy`: kernel overlayfs with `redirect_dir=on,metacopy=on` (root mode only) and
    /// rustfuse with `-o metacopy=on`.
    pub metacopy: bool,
    /// `--count-requests`: mount with request logging (see `requests`).
    pub count: bool,
}

pub struct Dirs {
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
    log: PathBuf,
}

impl Ctx {
    pub fn fresh_dirs(&self, fs_: &Fs) -> Result<Dirs> {
        let base = self.run_root.join(fs_.id);
        let mnt = base.join("mnt");
        mount::clear_mountpoint(&mnt);
        for d in ["upper", "work"] {
            let p = base.join(d);
            // Empty already when the root parent of a rootless run made it so.
            if fs::read_dir(&p).is_ok_and(|mut e| e.next().is_some()) {
                self.trash(&p)?;
            }
            fs::create_dir_all(&p)?;
        }
        fs::create_dir_all(&mnt)?;
        let _ = fs::remove_file(base.join("mount.log"));
        // Every run starts on a settled disk: what earlier runs left to write back (an
        // untar's 20k files, a removed upper layer's freed blocks, which a filesystem mounted
        // with `discard` trims at its next commit) is written now, not during this run.
        rustix::fs::sync();
        Ok(Dirs {
            upper: base.join("upper"),
            work: base.join("work"),
            mnt,
            log: base.join("mount.log"),
        })
    }

    /// Move `p` (an earlier run's upper or work dir) into the trash, which is emptied at the
    /// start and the end of the tool's run, or when the disk runs short. Removing an upper
    /// layer of 20k files just before the next run creates 20k files would cost that run
    /// seconds of CPU, whatever the filesystem under test, where the work dir is on an ext4
    /// without a journal (this project's machine has one): such an ext4 allocates no inode
    /// freed in the last 60 s, 360 s while the inode's table block is dirty (and each
    /// allocation beside it dirties it again), and skips them one by one, a buffer-cache
    /// lookup each (`recently_deleted()` in fs/ext4/ialloc.c). `perf` of a kernel overlayfs
    /// untar after such a removal: 2.6-3.8 s, 75% of it there, against 0.2-0.55 s.
    fn trash(&self, p: &Path) -> Result<()> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let trash = self.run_root.join(TRASH);
        fs::create_dir_all(&trash).with_context(|| format!("create {}", trash.display()))?;
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let to = trash.join(format!("{}-{n}", std::process::id()));
        fs::rename(p, &to).with_context(|| format!("move {} to {}", p.display(), to.display()))?;
        let st = rustix::fs::statvfs(&self.run_root)?;
        if st.f_bavail.saturating_mul(st.f_frsize) < TRASH_FREE_MIN {
            eprintln!("\nthe disk runs short: emptying the trash");
            self.fresh_start()?;
        }
        Ok(())
    }

    /// Remove the trash (see [`Ctx::trash`]), if any, then write everything back and drop
    /// the caches: an ext4 without a journal only skips a freed inode whose table block is
    /// cached, so files removed by anything before (an earlier run, its trash) cost the runs
    /// that follow nothing. The layers are read once more, so those runs find them cached.
    pub fn fresh_start(&self) -> Result<()> {
        self.remove_trash()?;
        mount::drop_caches()?;
        for l in &self.layers.lowers {
            read_tree(l).with_context(|| format!("read the layer {}", l.display()))?;
        }
        Ok(())
    }

    /// Remove the trash, nothing more (the end of a run: the next one starts with
    /// [`Ctx::fresh_start`]).
    pub fn remove_trash(&self) -> Result<()> {
        let trash = self.run_root.join(TRASH);
        if trash.exists() {
            fs::remove_dir_all(&trash).with_context(|| format!("remove {}", trash.display()))?;
        }
        Ok(())
    }

    fn mount(&self, fs_: &Fs, lowers: &[PathBuf], d: &Dirs) -> Result<(Mount, Duration)> {
        self.mount_how(fs_, lowers, d, false, false)
    }

    /// [`Ctx::mount`], with `redirect_dir=on` where the filesystem has it, or read-only (the
    /// lower layers alone).
    fn mount_how(
        &self,
        fs_: &Fs,
        lowers: &[PathBuf],
        d: &Dirs,
        redirect_dir: bool,
        read_only: bool,
    ) -> Result<(Mount, Duration)> {
        let floor;
        let lowers = if fs_.kind == Kind::Floor {
            floor = [crate::floor::tree(&self.layers)];
            &floor[..]
        } else {
            lowers
        };
        Mount::new(
            fs_,
            lowers,
            &d.upper,
            &d.work,
            &d.mnt,
            &d.log,
            mount::How {
                userxattr: self.userns,
                metacopy: self.metacopy,
                redirect_dir,
                read_only,
                count: self.count,
            },
        )
    }

    /// append-held's lower file, in the `app` layer.
    fn held_path(&self) -> PathBuf {
        self.layers.lowers[1].join(HELD_FILE)
    }

    /// Put append-held's lower file in place, as generated (made on its first run; put back
    /// where an earlier run changed it), owned as its directory is (a rootless run's layers
    /// are uid 65534's, and its appends need write permission).
    fn restore_held(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let p = self.held_path();
        let log = rustfuse_tests::held::lower_log();
        if fs::read(&p).ok().as_deref() != Some(log.as_slice()) {
            fs::write(&p, &log).with_context(|| format!("write {}", p.display()))?;
        }
        let dir = p.parent().context("append-held's file has a directory")?;
        let (d, f) = (fs::metadata(dir)?, fs::metadata(&p)?);
        if (d.uid(), d.gid()) != (f.uid(), f.gid()) {
            std::os::unix::fs::chown(&p, Some(d.uid()), Some(d.gid()))
                .with_context(|| format!("chown {} as {}", p.display(), dir.display()))?;
        }
        Ok(())
    }

    /// After append-held, with the filesystem unmounted: the lower layer's file must be as
    /// it was (the appends belong in the upper layer). A changed one is put back for the
    /// next run, and this run fails.
    fn check_held(&self) -> Result<()> {
        let p = self.held_path();
        let now = fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        let log = rustfuse_tests::held::lower_log();
        if now != log {
            self.restore_held()?;
            bail!(
                "the lower layer's {} changed ({} bytes, not {}): the appends went into the \
                 lower layer (put back as generated)",
                p.display(),
                now.len(),
                log.len()
            );
        }
        Ok(())
    }

    fn drop_caches(&self) -> Result<()> {
        if self.userns {
            crate::rootless::ask_parent_to_drop_caches()
        } else {
            mount::drop_caches()
        }
    }

    fn time(&self, mut cmd: Command) -> Result<f64> {
        Ok(run::run_ok(&mut cmd, self.timeout)?.elapsed.as_secs_f64())
    }

    fn sh(&self, mnt: &Path, script: &str) -> Result<f64> {
        self.time(run::sh(mnt, script))
    }

    fn worker(&self, mnt: &Path, args: &[&str]) -> Result<f64> {
        let mut c = Command::new(&self.exe);
        c.arg("__worker").args(args).current_dir(mnt);
        self.time(c)
    }

    /// One measured run of `w` on `fs_`; `None` where the workload does not apply.
    pub fn run(&self, fs_: &Fs, w: &Workload) -> Result<Option<f64>> {
        if w.name == "buildah-bud" {
            return crate::build::run(self, fs_).map(Some);
        }
        if w.name == "buildkit-build" {
            return crate::buildkit::run(self, fs_).map(Some);
        }
        let d = self.fresh_dirs(fs_)?;
        let mount_layers = match w.name {
            "mount-1" => Some(1),
            "mount-10" => Some(10),
            "mount-50" => Some(50),
            _ => None,
        };
        if let Some(n) = mount_layers {
            let (mut m, t) = self.mount(fs_, &self.layers.mount_set[..n], &d)?;
            m.unmount()?;
            return Ok(Some(t.as_secs_f64()));
        }
        if w.name == "append-held" {
            self.restore_held()?;
        }
        let redirect_dir = w.name == "rename-dir";
        let read_only = w.name == "seqread-ro";
        let (mut m, _) = self.mount_how(fs_, &self.layers.lowers, &d, redirect_dir, read_only)?;
        let mnt = d.mnt.clone();
        let list = self.layers.file_list.display().to_string();
        let s = &self.sizes;
        let v = match w.name {
            "find-cold" => {
                self.drop_caches()?;
                self.sh(&mnt, "find . >/dev/null")?
            }
            "find-warm" => {
                self.sh(&mnt, "find . >/dev/null")?;
                self.sh(&mnt, "find . >/dev/null")?
            }
            "find-remount" => {
                self.sh(&mnt, "find . >/dev/null")?;
                m.unmount()?;
                drop(m);
                m = self.mount(fs_, &self.layers.lowers, &d)?.0;
                self.sh(&mnt, "find . >/dev/null")?
            }
            "ls-lR" => self.sh(&mnt, "ls -lR . >/dev/null")?,
            "lone-getxattr" | "lone-open" | "lone-statx" => {
                let op = w.name.trim_start_matches("lone-");
                let mut c = Command::new(&self.exe);
                c.args(["__worker", "lone", op, &list, LONE_CALLS])
                    .current_dir(&mnt);
                let d = run::run_ok(&mut c, self.timeout)?;
                let lat = d
                    .stderr
                    .lines()
                    .find_map(|l| l.strip_prefix("LAT "))
                    .context("the lone worker printed no latencies")?;
                set_latency(lat)?[0]
            }
            "stat-all" => self.worker(&mnt, &["statlist", &list])?,
            "git-status" => {
                let git = "git -c safe.directory='*' -C app/repo status --porcelain >/dev/null";
                self.sh(&mnt, git)?;
                self.sh(&mnt, git)?
            }
            "seqread-cold" => {
                self.drop_caches()?;
                self.sh(&mnt, "dd if=big/seq.bin of=/dev/null bs=1M status=none")?
            }
            "seqread-warm" | "seqread-ro" => {
                self.sh(&mnt, "dd if=big/seq.bin of=/dev/null bs=1M status=none")?;
                self.sh(&mnt, "dd if=big/seq.bin of=/dev/null bs=1M status=none")?
            }
            "randread-4k" => {
                self.sh(&mnt, "cat big/rand.bin >/dev/null")?;
                let ops = s.rand_ops_per_job.to_string();
                self.worker(&mnt, &["randread", "big/rand.bin", "2", &ops])?
            }
            "tar-small" => self.sh(&mnt, "tar cf - etc usr var app | cat >/dev/null")?,
            "untar" => {
                let a = self.layers.untar_archive.display().to_string();
                self.sh(&mnt, &format!("mkdir untar && tar xf '{a}' -C untar"))?
            }
            "create-fsync" => {
                let n = s.fsync_files.to_string();
                self.worker(&mnt, &["createfsync", "newfiles", &n])?
            }
            "seqwrite" => {
                let mib = s.seq_bytes >> 20;
                self.sh(
                    &mnt,
                    &format!(
                        "dd if=/dev/zero of=seqwrite.bin bs=1M count={mib} conv=fsync status=none"
                    ),
                )?
            }
            "append-copyup" => self.sh(&mnt, "printf x >> big/append.bin")?,
            "append-held" => {
                let t = self.worker(&mnt, &["appendheld", HELD_FILE, &HELD_APPENDS.to_string()]);
                if t.is_ok() {
                    crate::view::record(&self.run_root, fs_.id, w.name, &mnt)?;
                }
                m.unmount()?;
                return match (t, self.check_held()) {
                    (Ok(t), Ok(())) => Ok(Some(t)),
                    (t, lower) => {
                        let why: Vec<String> = [t.err(), lower.err()]
                            .into_iter()
                            .flatten()
                            .map(|e| format!("{e:#}"))
                            .collect();
                        bail!("{}", why.join("; "))
                    }
                };
            }
            "chmod-chown" => {
                // In the user namespace only its root is mapped; the lower files show as
                // nobody there, so chown to 0 is a change as 1 is for a root run.
                let id = if self.userns { "0:0" } else { "1:1" };
                self.sh(
                    &mnt,
                    &format!("chmod -R g+w usr/lib && chown -R {id} usr/lib"),
                )?
            }
            "rm-rf" => self.sh(&mnt, "rm -rf app/node_modules")?,
            "renames" => self.worker(&mnt, &["renames", &list, "usr/include/"])?,
            "rename-dir" => self.sh(&mnt, "mv app/node_modules app/node_modules.old")?,
            "cp-a" => self.sh(&mnt, "cp -a usr/lib usr/lib.copy")?,
            "pkg-replace" => self.worker(&mnt, &["replace", &list, "usr/bin/", "var/lib/dpkg/"])?,
            "two-readers" => {
                let both = "dd if=big/seq.bin of=/dev/null bs=1M status=none & p=$!; \
                            dd if=big/rand.bin of=/dev/null bs=1M status=none; wait $p";
                self.sh(&mnt, both)?;
                self.sh(&mnt, both)?
            }
            "untar-find" => {
                let a = self.layers.untar_archive.display().to_string();
                self.sh(
                    &mnt,
                    &format!(
                        "mkdir untar && {{ tar xf '{a}' -C untar & p=$!; \
                         find etc usr var app >/dev/null; wait $p; }}"
                    ),
                )?
            }
            "make-j2" => self.sh(&mnt, "make -s -j2 -C app/proj >/dev/null")?,
            "rss-after-find" => {
                if fs_.kind == Kind::Kernel {
                    m.unmount()?;
                    return Ok(None);
                }
                self.sh(&mnt, "find . >/dev/null")?;
                self.sh(&mnt, "find . >/dev/null")?;
                let pid = m
                    .daemon_pid()
                    .context("cannot find the daemon process of the mount")?;
                mount::rss_bytes(pid)? as f64
            }
            other => bail!("unknown workload {other}"),
        };
        crate::view::record(&self.run_root, fs_.id, w.name, &mnt)?;
        m.unmount()?;
        Ok(Some(v))
    }
}
