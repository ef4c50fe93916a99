//! Copy-ups made durable off the request path.
//!
//! Kernel overlayfs fsyncs every copy-up before the copy appears (a power cut must not leave
//! an empty or partial file where the lower one was); fuse-overlayfs never syncs. Here a
//! copy-up of a regular file is built as before, then, instead of an fsync on the request
//! path:
//!
//! 1. once per mount, the flag file `<workdir>/rustfuse-unsynced.PID` is made: "this upper
//!    layer may hold copies not synced yet" (one per daemon: a daemon still draining after
//!    its unmount must not remove the flag of the next mount of the same layers);
//! 2. the copy gets the mark [`UNSYNCED_XATTRS`] (`BOOT LAYER PATH`: this boot's id, and
//!    where its data came from: the lower layer's index and the file's path in it);
//! 3. the copy is renamed into place and the request answered; the copy's fd goes to the
//!    [`Syncer`], a thread that fsyncs queued copies in batches, then removes their marks
//!    and fsyncs again (so the removal is on disk before the copy counts as synced). It
//!    starts once copy-ups pause ([`QUIET`]), or after [`MAX_AGE`], or with its queue half
//!    full: fsyncs while copy-ups go on would slow them down.
//!
//! A journaled filesystem commits the flag, the mark and the rename in that order, so after
//! a crash every copy that appeared but was not synced carries its mark. Where the upper
//! layer's filesystem is not known to keep that order ([`may_sync_later`]), copy-ups are
//! synced before they are answered instead, as kernel overlayfs syncs them. At the next mount
//! ([`recover`]), when the flag is there, the upper layer is searched for marks: a copy marked
//! in this boot (the daemon was killed; the page cache kept what it wrote) is synced and
//! kept; one marked in an earlier boot (a power cut: its data may be lost) is kept if it
//! begins with its lower file's whole content (the copy survived: what follows is the user's
//! writes as the crash left them, as with any file), else it gets its lower file's content
//! again, the content the file had before the copy-up. A user's fsync of a
//! file still queued syncs it and removes its mark first ([`Syncer::fsync`]), so data a user
//! synced is never replaced by the lower content. A clean unmount drains the queue and
//! removes the flag.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::Layer;
use super::copyup::{copy_data, rewrite_data};
use super::tree;
use super::{Errno, Result};
use crate::sys::{FileType, OFlags, Sys};

/// The mark of a copy not synced yet: `BOOT LAYER PATH` (boot id, lower layer index, the
/// data's path in that layer). `trusted.` where permitted, else `user.`; both hidden by
/// kernel overlayfs and by this overlay.
pub(crate) const UNSYNCED_XATTRS: [&str; 2] = [
    "trusted.overlay.rustfuse.unsynced",
    "user.overlay.rustfuse.unsynced",
];
/// `<workdir>/rustfuse-unsynced.PID`: present while a daemon's copies may be unsynced (from
/// its first deferred copy-up to its clean end). Recovery acts on any name with this stem.
pub(crate) const UNSYNCED_FLAG: &str = "rustfuse-unsynced";

/// Whether a workdir entry is a flag (of any daemon).
fn is_flag(name: &[u8]) -> bool {
    name == UNSYNCED_FLAG.as_bytes()
        || name
            .strip_prefix(UNSYNCED_FLAG.as_bytes())
            .is_some_and(|rest| rest.starts_with(b"."))
}
/// For tests: the syncer leaves a copy unsynced for this many milliseconds (so a test can
/// cut the power while copies are published but not synced), instead of [`QUIET`] and
/// [`MAX_AGE`].
pub const DELAY_ENV: &str = "RUSTFUSE_SYNC_DELAY_MS";
/// The syncer starts once no copy was queued for this long (a burst of copy-ups, a
/// `chmod -R`, is over) ...
const QUIET: Duration = Duration::from_millis(200);
/// ... or once the oldest queued copy is this old, or the queue half full. Syncing while
/// copy-ups go on slows them: each fsync commits the journal, which the copy-ups write to
/// (a `chmod -R` of 1,350 lower files on a journaled ext4: 382 ms syncing at once, 300
/// with the syncs after it, 232 with none).
const MAX_AGE: Duration = Duration::from_secs(2);
/// Copies queued at most (each holds a descriptor); past that a copy-up syncs on the
/// request path again. A quarter of the descriptors the daemon may open, within these.
const MAX_QUEUED: (usize, usize) = (256, 8192);
/// Copies synced per round of the syncer.
const BATCH: usize = 256;

/// Whether copy-ups of the upper layer open as `upper` (at `path`) may be synced in the
/// background: as `background_sync=0|1` says, else where its filesystem writes metadata
/// back in the order it was changed. The recovery relies on that order (the flag, then each
/// copy's mark, then its rename into place: see the module comment); an ext4 without a
/// journal writes them back in any order, and a power cut could leave a copy in place,
/// unmarked and without its data. There copy-ups are synced before they are answered, as
/// kernel overlayfs syncs them everywhere.
pub(crate) fn may_sync_later(setting: Option<bool>, upper: BorrowedFd<'_>, path: &Path) -> bool {
    if let Some(b) = setting {
        return b;
    }
    match crate::sys::metadata_order(upper) {
        Ok(by) => {
            tracing::debug!(upper = %path.display(), kept_by = by, "copy-ups synced in the background");
            true
        }
        Err(why) => {
            tracing::info!(
                upper = %path.display(),
                "copy-ups are synced before they are answered (background_sync=1 syncs them later all the same): the upper layer is on {why}, not known to write its metadata back in order"
            );
            false
        }
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub(crate) fn boot_id() -> Option<String> {
    let s = crate::sys::read_small("/proc/sys/kernel/random/boot_id")?;
    let s = s.trim();
    (!s.is_empty() && !s.contains(' ')).then(|| s.to_string())
}

/// The mark's value for a copy made in boot `boot` of the file at `path` in lower layer
/// `layer`; none for a path that is empty or not relative.
pub(crate) fn mark(boot: &str, layer: u16, path: &Path) -> Option<Vec<u8>> {
    if !relative_and_plain(path) {
        return None;
    }
    let mut v = format!("{boot} {layer} ").into_bytes();
    v.extend_from_slice(path.as_os_str().as_bytes());
    Some(v)
}

/// A mark's boot id, layer and path.
pub(crate) fn parse_mark(v: &[u8]) -> Option<(&str, u16, PathBuf)> {
    let mut parts = v.splitn(3, |b| *b == b' ');
    let boot = std::str::from_utf8(parts.next()?).ok()?;
    let layer = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let path = PathBuf::from(OsStr::from_bytes(parts.next()?));
    (!boot.is_empty() && relative_and_plain(&path)).then_some((boot, layer, path))
}

fn relative_and_plain(path: &Path) -> bool {
    path.components().next().is_some()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Remove the mark of the file open as `fd`, whichever namespace holds it.
fn clear_mark(sys: &Sys, fd: BorrowedFd<'_>) {
    for x in UNSYNCED_XATTRS {
        match sys.fremovexattr(fd, OsStr::new(x)) {
            Ok(()) | Err(Errno::NODATA) => {}
            Err(e) => tracing::debug!(xattr = x, error = %e, "mark not removed"),
        }
    }
}

/// The file's mark, if it has one.
fn read_mark(sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr) -> Option<Vec<u8>> {
    UNSYNCED_XATTRS
        .iter()
        .find_map(|x| sys.getxattr_at(dir, name, OsStr::new(x)).ok())
}

/// Syncs copy-ups in the background (see the module comment).
pub(crate) struct Syncer {
    shared: Arc<Shared>,
    /// The syncer thread, started with the first deferred copy-up (so a mount that copies
    /// nothing up starts none, and the daemon can fork after the mount with one thread).
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    sys: Arc<Sys>,
    /// The workdir, where the flag is.
    workdir: OwnedFd,
    /// This boot's id, read at the first copy-up to mark (none: every copy-up syncs on the
    /// request path).
    boot: std::sync::OnceLock<Option<String>>,
    /// [`DELAY_ENV`]'s delay, if set.
    delay: Option<Duration>,
    /// Copies queued at most (see [`MAX_QUEUED`]).
    max_queued: usize,
    state: Mutex<State>,
    /// Wakes the syncer.
    work: Condvar,
    /// Wakes callers of [`Syncer::flush`].
    idle: Condvar,
    /// `state.pending.len()`, read without the lock by [`Syncer::fsync`].
    pending: AtomicUsize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Entry>,
    /// (st_dev, st_ino) of every copy queued or being synced, and of every one whose sync
    /// failed: a user's fsync of it must remove its mark.
    pending: HashSet<(u64, u64)>,
    /// Copies taken from the queue and not done yet.
    in_flight: usize,
    /// This daemon's flag (`rustfuse-unsynced.PID`), once made in this mount.
    flag: Option<OsString>,
    /// A sync failed: the flag stays at the end, for the next mount's recovery.
    failed: bool,
    /// Sync what is queued now, delay or not ([`Syncer::flush`]).
    hurry: bool,
    stop: bool,
}

struct Entry {
    fd: OwnedFd,
    key: (u64, u64),
    at: Instant,
    /// The copy's path in the upper layer when it was made, for messages.
    path: PathBuf,
}

impl Syncer {
    /// A syncer for the upper layer whose workdir is `workdir`; none when the workdir
    /// cannot be opened (copy-ups then sync on the request path). Its thread and this
    /// daemon's flag come with the first copy-up it defers, and so does the read of this
    /// boot's id (without it too, copy-ups sync on the request path).
    pub(crate) fn start(sys: Arc<Sys>, workdir: BorrowedFd<'_>) -> Option<Syncer> {
        let workdir = workdir.try_clone_to_owned().ok()?;
        let delay = std::env::var(DELAY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        let max_queued =
            ((crate::sys::nofile_limit() / 4) as usize).clamp(MAX_QUEUED.0, MAX_QUEUED.1);
        let shared = Arc::new(Shared {
            sys,
            workdir,
            boot: Default::default(),
            delay,
            max_queued,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            pending: AtomicUsize::new(0),
        });
        Some(Syncer {
            shared,
            thread: Mutex::new(None),
        })
    }

    /// The mark for a copy of the file at `path` in lower layer `layer`, if this copy may
    /// be synced later: the queue has room and the flag is made. None: sync it now.
    pub(crate) fn mark_for(&self, layer: u16, path: &Path) -> Option<Vec<u8>> {
        let sh = &self.shared;
        let v = mark(sh.boot.get_or_init(boot_id).as_deref()?, layer, path)?;
        let mut st = sh.state.lock();
        if st.queue.len() + st.in_flight >= sh.max_queued {
            return None;
        }
        if st.flag.is_none() {
            // The first deferred copy-up: the syncer thread, then this daemon's flag.
            let mut thread = self.thread.lock();
            if thread.is_none() {
                let s = sh.clone();
                match std::thread::Builder::new()
                    .name("rustfuse-sync".into())
                    .spawn(move || s.run())
                {
                    Ok(t) => *thread = Some(t),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the syncer thread: copy-ups sync on the request path");
                        return None;
                    }
                }
            }
            let flag = OsString::from(format!("{UNSYNCED_FLAG}.{}", std::process::id()));
            if let Err(e) = sh.make_flag(&flag) {
                tracing::warn!(?flag, error = %e, "cannot make the flag in the workdir: copy-ups sync on the request path");
                return None;
            }
            st.flag = Some(flag);
        }
        Some(v)
    }

    /// Queue the copy open as `fd` (marked, in place at `path` of the upper layer).
    pub(crate) fn queue(&self, fd: OwnedFd, path: PathBuf) {
        let sh = &self.shared;
        let key = match sh.sys.fstat(fd.as_fd()) {
            Ok(s) => (s.st_dev, s.st_ino),
            Err(_) => (0, 0),
        };
        let mut st = sh.state.lock();
        st.pending.insert(key);
        sh.pending.store(st.pending.len(), Ordering::Release);
        st.queue.push_back(Entry {
            fd,
            key,
            at: Instant::now(),
            path,
        });
        // The syncer waits for a first copy, else until a time it works out again when it
        // comes (see `next_batch`): woken only for the first copy or a half full queue.
        if st.queue.len() == 1 || sh.half_full(&st) {
            sh.work.notify_one();
        }
    }

    /// A user's fsync of the file open as `fd`: a copy not synced yet is synced and its mark
    /// removed for good before this returns.
    pub(crate) fn fsync(&self, fd: BorrowedFd<'_>, datasync: bool) -> Result<()> {
        let sh = &self.shared;
        if sh.pending.load(Ordering::Acquire) > 0 {
            let s = sh.sys.fstat(fd)?;
            if sh.state.lock().pending.contains(&(s.st_dev, s.st_ino)) {
                sh.sys.fsync(fd, false)?;
                clear_mark(&sh.sys, fd);
                return sh.sys.fsync(fd, false);
            }
        }
        sh.sys.fsync(fd, datasync)
    }

    /// Wait until every copy queued so far is synced (or failed to sync).
    #[cfg(test)]
    pub(crate) fn flush(&self) {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        st.hurry = true;
        sh.work.notify_one();
        while !st.queue.is_empty() || st.in_flight > 0 {
            sh.idle.wait(&mut st);
        }
    }
}

impl Drop for Syncer {
    /// A clean end: everything queued is synced, then the flag goes (unless a sync failed).
    fn drop(&mut self) {
        let sh = &self.shared;
        {
            let mut st = sh.state.lock();
            st.stop = true;
            sh.work.notify_one();
        }
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        let st = sh.state.lock();
        if let Some(flag) = st.flag.as_ref().filter(|_| !st.failed) {
            // Gone already when the next mount's recovery ran while this one drained.
            match sh.sys.unlink_at(sh.workdir.as_fd(), flag) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => {
                    tracing::warn!(?flag, error = %e, "cannot remove the flag from the workdir")
                }
            }
        }
    }
}

impl Shared {
    /// The flag file (a plain mknod: no open). Not synced: a journaled filesystem commits it
    /// before the marks and renames that follow, as it commits each mark before its rename.
    fn make_flag(&self, flag: &OsStr) -> Result<()> {
        match self
            .sys
            .mknod_at(self.workdir.as_fd(), flag, libc::S_IFREG | 0o600, 0)
        {
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn run(&self) {
        while let Some(batch) = self.next_batch() {
            self.sync(batch);
        }
    }

    /// Whether the queue is half full (then it is synced at once, so that copy-ups do not
    /// come to sync on the request path), unless [`DELAY_ENV`] holds copies.
    fn half_full(&self, st: &State) -> bool {
        self.delay.is_none() && st.queue.len() + st.in_flight >= self.max_queued / 2
    }

    /// The next copies to sync, once they are due (see [`QUIET`], [`MAX_AGE`]); none when
    /// stopped with nothing left.
    fn next_batch(&self) -> Option<Vec<Entry>> {
        let mut st = self.state.lock();
        loop {
            if let Some(first) = st.queue.front() {
                let due = match self.delay {
                    Some(d) => first.at + d,
                    None => {
                        let last = st.queue.back().map_or(first.at, |e| e.at);
                        (last + QUIET).min(first.at + MAX_AGE)
                    }
                };
                let now = Instant::now();
                if st.stop || st.hurry || now >= due || self.half_full(&st) {
                    let n = st.queue.len().min(BATCH);
                    st.in_flight += n;
                    return Some(st.queue.drain(..n).collect());
                }
                self.work.wait_for(&mut st, due - now);
            } else if st.stop {
                return None;
            } else {
                self.work.wait(&mut st);
            }
        }
    }

    /// fsync each copy, remove its mark, fsync again (the removal on disk): a copy whose
    /// mark may still be on disk stays pending.
    fn sync(&self, batch: Vec<Entry>) {
        let mut ok = vec![true; batch.len()];
        for (e, ok) in batch.iter().zip(ok.iter_mut()) {
            if let Err(err) = self.sys.fsync(e.fd.as_fd(), false) {
                tracing::error!(path = ?e.path, error = %err, "fsync of a copied-up file failed: it stays marked for the next mount");
                *ok = false;
            }
        }
        for (e, _) in batch.iter().zip(&ok).filter(|(_, ok)| **ok) {
            clear_mark(&self.sys, e.fd.as_fd());
        }
        for (e, ok) in batch.iter().zip(ok.iter_mut()).filter(|(_, ok)| **ok) {
            if let Err(err) = self.sys.fsync(e.fd.as_fd(), false) {
                tracing::error!(path = ?e.path, error = %err, "fsync of a copied-up file's mark removal failed");
                *ok = false;
            }
        }
        let mut st = self.state.lock();
        st.in_flight -= batch.len();
        for (e, ok) in batch.iter().zip(&ok) {
            if *ok {
                st.pending.remove(&e.key);
            } else {
                st.failed = true;
            }
        }
        self.pending.store(st.pending.len(), Ordering::Release);
        if st.queue.is_empty() && st.in_flight == 0 {
            st.hurry = false;
            self.idle.notify_all();
        }
    }
}

/// What [`recover`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// Copies of this boot, synced and kept.
    pub synced: usize,
    /// Copies of an earlier boot found whole (they begin with their lower file's content),
    /// synced and kept.
    pub whole: usize,
    /// Copies of an earlier boot, given their lower file's content again.
    pub restored: usize,
    /// Marked copies left as they are (their lower file is gone, a bad mark, an error).
    pub failed: usize,
}

/// At mount, before anything is served: when the flag says copies may be unsynced, find
/// every marked copy in the upper layer and make it whole (see the module comment). The
/// flag goes when every mark is gone for good.
pub(crate) fn recover(
    sys: &Sys,
    workdir: BorrowedFd<'_>,
    upper: BorrowedFd<'_>,
    lowers: &[Layer],
) -> Result<Recovered> {
    let mut done = Recovered::default();
    let flags: Vec<OsString> = tree::list(sys, workdir)?
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| is_flag(n.as_bytes()))
        .collect();
    if flags.is_empty() {
        return Ok(done);
    }
    let boot = boot_id();
    let mut marks_left = false;
    let mut dirs: Vec<(OwnedFd, PathBuf)> = vec![(
        sys.open_dir_path_at(upper, OsStr::new("."))?,
        PathBuf::new(),
    )];
    while let Some((dir, path)) = dirs.pop() {
        for (name, mut ft) in tree::list(sys, dir.as_fd())? {
            if ft == FileType::Unknown {
                ft = match sys.stat_at(dir.as_fd(), &name) {
                    Ok(s) => FileType::from_raw_mode(s.st_mode),
                    Err(_) => continue,
                };
            }
            if ft == FileType::Directory {
                dirs.push((sys.open_dir_path_at(dir.as_fd(), &name)?, path.join(&name)));
                continue;
            }
            if ft != FileType::RegularFile {
                continue;
            }
            let Some(v) = read_mark(sys, dir.as_fd(), &name) else {
                continue;
            };
            let here = path.join(&name);
            match recover_one(sys, dir.as_fd(), &name, &v, boot.as_deref(), lowers) {
                Ok(Outcome::Synced) => done.synced += 1,
                Ok(Outcome::Whole) => done.whole += 1,
                Ok(Outcome::Restored) => done.restored += 1,
                Err(e) => {
                    tracing::error!(path = ?here, error = %e, "a copy-up not synced before a crash could not be made whole: left as it is");
                    done.failed += 1;
                    marks_left |= read_mark(sys, dir.as_fd(), &name).is_some();
                }
            }
        }
    }
    // The flags stay while a mark does (the next mount tries again). One may be gone
    // already: its daemon was still draining after its unmount, and ended.
    if !marks_left {
        for f in flags {
            match sys.unlink_at(workdir, &f) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(done)
}

/// What [`recover_one`] did with a marked copy.
enum Outcome {
    /// Made in this boot (the page cache kept it): synced as it is.
    Synced,
    /// Made in an earlier boot, and it begins with its lower file's whole content: synced
    /// as it is (what follows is the user's writes, as the crash left them, as with any
    /// file; data a `sync(2)` made durable is kept).
    Whole,
    /// Made in an earlier boot and damaged (empty, short, zeros where data was) or changed
    /// within the old content: given its lower file's content again.
    Restored,
}

/// One marked copy, synced as it is or given its lower file's content again (see
/// [`Outcome`]). A copy that cannot be checked or restored (its lower file is gone, a bad
/// mark) is left as it is, its mark removed, and the error returned.
fn recover_one(
    sys: &Sys,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mark: &[u8],
    boot: Option<&str>,
    lowers: &[Layer],
) -> Result<Outcome> {
    let out = sys.open_at(dir, name, OFlags::RDWR, 0)?;
    let outcome = match parse_mark(mark) {
        Some((made, _, _)) if boot == Some(made) => Ok(Outcome::Synced),
        Some((_, layer, path)) => lowers
            .get(layer as usize)
            .ok_or(Errno::NOENT)
            .and_then(|l| sys.open_at(l.fd.as_fd(), path.as_os_str(), OFlags::RDONLY, 0))
            .and_then(|input| {
                if begins_with(sys, out.as_fd(), input.as_fd())? {
                    Ok(Outcome::Whole)
                } else {
                    restore(sys, out.as_fd(), input.as_fd()).map(|()| Outcome::Restored)
                }
            }),
        None => Err(Errno::INVAL),
    };
    sys.fsync(out.as_fd(), false)?;
    clear_mark(sys, out.as_fd());
    sys.fsync(out.as_fd(), false)?;
    outcome
}

/// Whether the file `copy` begins with the whole content of `lower`.
fn begins_with(sys: &Sys, copy: BorrowedFd<'_>, lower: BorrowedFd<'_>) -> Result<bool> {
    let len = sys.fstat(lower)?.st_size.max(0) as u64;
    if (sys.fstat(copy)?.st_size.max(0) as u64) < len {
        return Ok(false);
    }
    const CHUNK: usize = 1 << 20;
    let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut off = 0u64;
    while off < len {
        let want = ((len - off) as usize).min(CHUNK);
        let n = read_full(sys, lower, &mut a[..want], off)?;
        if n < want || read_full(sys, copy, &mut b[..want], off)? < want || a[..want] != b[..want] {
            return Ok(false);
        }
        off += want as u64;
    }
    Ok(true)
}

/// `buf.len()` bytes from `off`, fewer only at the end of the file.
fn read_full(sys: &Sys, fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match sys.pread(fd, &mut buf[done..], off + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Copy the lower file `input` into `out`, keeping `out`'s times, set-id bits and file
/// capabilities.
fn restore(sys: &Sys, out: BorrowedFd<'_>, input: BorrowedFd<'_>) -> Result<()> {
    let len = sys.fstat(input)?.st_size.max(0) as u64;
    rewrite_data(sys, out, |_| {
        sys.ftruncate(out, 0)?;
        copy_data(sys, input, out, len, true, false).map(drop)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_told_by_their_stem() {
        for n in [
            "rustfuse-unsynced",
            "rustfuse-unsynced.123",
            "rustfuse-unsynced.x",
        ] {
            assert!(is_flag(n.as_bytes()), "{n}");
        }
        for n in [
            "rustfuse-unsynced-1",
            "rustfuse-unsyncedx",
            "work",
            "rustfuse-index",
        ] {
            assert!(!is_flag(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn marks_read_back() {
        let v = mark("b00t-id", 3, Path::new("usr/lib/a b\nc")).unwrap();
        assert_eq!(v, b"b00t-id 3 usr/lib/a b\nc");
        assert_eq!(
            parse_mark(&v),
            Some(("b00t-id", 3, PathBuf::from("usr/lib/a b\nc")))
        );
    }

    #[test]
    fn marks_refuse_paths_that_leave_the_layer() {
        for p in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert_eq!(mark("b", 0, Path::new(p)), None, "{p:?}");
            assert_eq!(parse_mark(format!("b 0 {p}").as_bytes()), None, "{p:?}");
        }
        for v in [&b""[..], b"b", b"b 0", b"b x a", b" 0 a", b"b 70000 a"] {
            assert_eq!(parse_mark(v), None, "{:?}", String::from_utf8_lossy(v));
        }
    }
}
