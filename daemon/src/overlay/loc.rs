//! Where a layer file is. Files are a directory handle and a name; directories are a handle
//! that holds an `O_PATH` fd only while cached, and otherwise reopens itself from its
//! parent's handle and its name. The number of cached directory fds is bounded (a clock
//! sweep drops the least recently used), so a mount of any size needs a bounded number of
//! descriptors. Layer roots are never dropped. The cache and its budget belong to one
//! overlay ([`DirFdCache`]): every handle of a mount points at its mount's cache.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::Result;
use super::probe::LowerNames;
use crate::sys::{Errno, OFlags, Stat, Sys, Timespec};

/// A directory in one layer.
pub struct DirHandle {
    /// Where it is reopened from: the parent's handle in the same layer and the name there.
    /// `None` for a layer root, whose fd is kept for the mount's lifetime.
    origin: Mutex<Option<(Arc<DirHandle>, OsString)>>,
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// Clock bit: used since the last sweep.
    used: AtomicBool,
    /// The cache of the overlay this handle belongs to.
    cache: Arc<DirFdCache>,
    /// A lower directory's kept listing (see [`LowerNames`]); never used for the upper layer.
    pub names: LowerNames,
}

/// The directory fds one overlay holds open, within a budget; reopens go through the
/// overlay's kernel-call seam.
pub struct DirFdCache {
    sys: Arc<Sys>,
    queue: Mutex<VecDeque<Weak<DirHandle>>>,
    cached: AtomicUsize,
    budget: AtomicUsize,
}

impl DirFdCache {
    /// An empty cache of at most `budget` fds (at least 16), reopening through `sys`.
    pub fn new(sys: Arc<Sys>, budget: usize) -> Arc<DirFdCache> {
        Arc::new(DirFdCache {
            sys,
            queue: Mutex::new(VecDeque::new()),
            cached: AtomicUsize::new(0),
            budget: AtomicUsize::new(budget.max(16)),
        })
    }

    /// How many directory fds may stay open (at least 16).
    pub fn set_budget(&self, n: usize) {
        self.budget.store(n.max(16), Ordering::Relaxed);
    }

    /// Directory fds held open right now (for tests and diagnostics).
    pub fn cached(&self) -> usize {
        self.cached.load(Ordering::Relaxed)
    }

    fn insert(&self, h: &Arc<DirHandle>) {
        let n = self.cached.fetch_add(1, Ordering::Relaxed) + 1;
        let mut q = self.queue.lock();
        q.push_back(Arc::downgrade(h));
        // Handles dropped while under budget leave a dead entry behind: prune them once they
        // outnumber the live ones, or the queue grows with every directory ever looked up.
        if q.len() > 2 * n + 64 {
            q.retain(|w| w.strong_count() > 0);
        }
        let budget = self.budget.load(Ordering::Relaxed);
        if n <= budget {
            return;
        }
        // Clock sweep: drop fds of handles not used since the last pass, down to 3/4 of the
        // budget. In-flight operations hold their own clone of an fd, so nothing breaks.
        let target = budget * 3 / 4;
        let mut steps = q.len() * 2;
        while self.cached.load(Ordering::Relaxed) > target && steps > 0 {
            steps -= 1;
            let Some(w) = q.pop_front() else { break };
            let Some(h) = w.upgrade() else { continue };
            if h.used.swap(false, Ordering::Relaxed) {
                q.push_back(w);
                continue;
            }
            // Never wait here: a thread reopening this handle holds its lock while it reopens
            // the parent, which may sweep too (waiting would deadlock on the queue lock).
            match h.fd.try_lock() {
                Some(mut slot) => {
                    if slot.take().is_some() {
                        self.cached.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                None => q.push_back(w),
            }
        }
    }
}

impl DirHandle {
    /// A layer root of the overlay `cache` belongs to; its fd is never dropped.
    pub fn root(cache: &Arc<DirFdCache>, fd: Arc<OwnedFd>) -> Arc<DirHandle> {
        Arc::new(DirHandle {
            origin: Mutex::new(None),
            fd: Mutex::new(Some(fd)),
            used: AtomicBool::new(true),
            cache: cache.clone(),
            names: LowerNames::default(),
        })
    }

    /// A subdirectory `name` of `parent`, with the fd just opened for it.
    pub fn child(parent: &Arc<DirHandle>, name: &OsStr, fd: OwnedFd) -> Arc<DirHandle> {
        let h = Arc::new(DirHandle {
            origin: Mutex::new(Some((parent.clone(), name.to_os_string()))),
            fd: Mutex::new(Some(Arc::new(fd))),
            used: AtomicBool::new(true),
            cache: parent.cache.clone(),
            names: LowerNames::default(),
        });
        h.cache.insert(&h);
        h
    }

    /// The directory's fd, reopened through its parent if it was dropped.
    pub fn fd(self: &Arc<Self>) -> Result<Arc<OwnedFd>> {
        self.used.store(true, Ordering::Relaxed);
        let mut slot = self.fd.lock();
        if let Some(fd) = &*slot {
            return Ok(fd.clone());
        }
        let (parent, name) = self.origin.lock().clone().ok_or(Errno::STALE)?;
        let pfd = parent.fd()?;
        // While a rename moves the directory, its old name may hold a whiteout for a moment:
        // never hand out an fd of something that is not a directory.
        let fd = match self.cache.sys.open_dir_path_at(pfd.as_fd(), &name) {
            Ok(fd) => Arc::new(fd),
            Err(Errno::NOTDIR) => return Err(Errno::NOENT),
            Err(e) => return Err(e),
        };
        *slot = Some(fd.clone());
        drop(slot);
        self.cache.insert(self);
        Ok(fd)
    }

    /// The same directory as `other`: the same handle, or one reached the same way (the same
    /// parent handle and name). For lower directories, which never change.
    pub fn same_dir(self: &Arc<Self>, other: &Arc<DirHandle>) -> bool {
        if Arc::ptr_eq(self, other) {
            return true;
        }
        let a = self.origin.lock().clone();
        let b = other.origin.lock().clone();
        match (a, b) {
            (Some((pa, na)), Some((pb, nb))) => Arc::ptr_eq(&pa, &pb) && na == nb,
            _ => false,
        }
    }

    /// Its path from the layer root (`""` for the root), from the names it is reached by.
    pub fn path(&self) -> std::path::PathBuf {
        let mut names = Vec::new();
        let mut next = self.origin.lock().clone();
        while let Some((parent, name)) = next {
            names.push(name);
            next = parent.origin.lock().clone();
        }
        names.iter().rev().collect()
    }

    /// While the guard lives, the handle is not reopened by name (a caller of
    /// [`DirHandle::fd`] waits): for a change of its name that is not atomic with
    /// [`DirHandle::moved`], such as an exchange of two directories.
    pub fn hold_name(&self) -> parking_lot::MutexGuard<'_, Option<Arc<OwnedFd>>> {
        self.fd.lock()
    }

    /// The directory was renamed (its fd, if held, still points at it).
    pub fn moved(&self, parent: &Arc<DirHandle>, name: &OsStr) {
        let mut o = self.origin.lock();
        if o.is_some() {
            *o = Some((parent.clone(), name.to_os_string()));
        }
    }
}

impl Drop for DirHandle {
    fn drop(&mut self) {
        if self.origin.get_mut().is_some() && self.fd.get_mut().is_some() {
            self.cache.cached.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone)]
pub enum Loc {
    /// A pinned file (an `O_PATH` fd), e.g. one unlinked while open.
    Fd(Arc<OwnedFd>),
    /// A directory.
    Dir(Arc<DirHandle>),
    /// A file: its directory and its name there.
    At(Arc<DirHandle>, OsString),
}

impl Loc {
    /// The same location (not: the same file), to tell a state that moved on since it was read.
    pub fn same_place(&self, other: &Loc) -> bool {
        match (self, other) {
            (Loc::Fd(a), Loc::Fd(b)) => Arc::ptr_eq(a, b),
            (Loc::Dir(a), Loc::Dir(b)) => Arc::ptr_eq(a, b),
            (Loc::At(a, n), Loc::At(b, m)) => Arc::ptr_eq(a, b) && n == m,
            _ => false,
        }
    }

    /// The handle of a directory's location.
    pub fn dir_handle(&self) -> Option<&Arc<DirHandle>> {
        match self {
            Loc::Dir(h) => Some(h),
            _ => None,
        }
    }

    pub fn stat(&self, sys: &Sys) -> Result<Stat> {
        match self {
            Loc::Fd(fd) => sys.fstat(fd.as_fd()),
            Loc::Dir(h) => sys.fstat(h.fd()?.as_fd()),
            Loc::At(d, n) => sys.stat_at(d.fd()?.as_fd(), n),
        }
    }

    /// Open for I/O (never following a final symlink).
    pub fn open(&self, sys: &Sys, flags: OFlags) -> Result<OwnedFd> {
        match self {
            Loc::Fd(fd) => sys.reopen(fd.as_fd(), flags),
            Loc::Dir(h) => sys.reopen(h.fd()?.as_fd(), flags),
            Loc::At(d, n) => sys.open_at(
                d.fd()?.as_fd(),
                n,
                flags & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY),
                0,
            ),
        }
    }

    /// An `O_PATH` fd, for a file about to lose the name it is reached by.
    pub fn pin(&self, sys: &Sys) -> Result<Loc> {
        match self {
            Loc::Fd(_) | Loc::Dir(_) => Ok(self.clone()),
            Loc::At(d, n) => Ok(Loc::Fd(Arc::new(sys.open_path_at(d.fd()?.as_fd(), n)?))),
        }
    }

    pub fn readlink(&self, sys: &Sys) -> Result<OsString> {
        match self {
            Loc::Fd(fd) => sys.readlink_fd(fd.as_fd()),
            Loc::Dir(h) => sys.readlink_fd(h.fd()?.as_fd()),
            Loc::At(d, n) => sys.readlink_at(d.fd()?.as_fd(), n),
        }
    }

    pub fn getxattr(&self, sys: &Sys, attr: &OsStr) -> Result<Vec<u8>> {
        match self {
            Loc::Fd(fd) => sys.fgetxattr(fd.as_fd(), attr),
            Loc::Dir(h) => sys.fgetxattr(h.fd()?.as_fd(), attr),
            Loc::At(d, n) => sys.getxattr_at(d.fd()?.as_fd(), n, attr),
        }
    }

    pub fn listxattr(&self, sys: &Sys) -> Result<Vec<OsString>> {
        match self {
            Loc::Fd(fd) => sys.flistxattr(fd.as_fd()),
            Loc::Dir(h) => sys.flistxattr(h.fd()?.as_fd()),
            Loc::At(d, n) => sys.listxattr_at(d.fd()?.as_fd(), n),
        }
    }

    pub fn setxattr(&self, sys: &Sys, attr: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys.fsetxattr(fd.as_fd(), attr, value, flags),
            Loc::Dir(h) => sys.fsetxattr(h.fd()?.as_fd(), attr, value, flags),
            Loc::At(d, n) => sys.setxattr_at_flags(d.fd()?.as_fd(), n, attr, value, flags),
        }
    }

    pub fn removexattr(&self, sys: &Sys, attr: &OsStr) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys.fremovexattr(fd.as_fd(), attr),
            Loc::Dir(h) => sys.fremovexattr(h.fd()?.as_fd(), attr),
            Loc::At(d, n) => sys.removexattr_at(d.fd()?.as_fd(), n, attr),
        }
    }

    pub fn chown(&self, sys: &Sys, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys.fchown(fd.as_fd(), uid, gid),
            Loc::Dir(h) => sys.fchown(h.fd()?.as_fd(), uid, gid),
            Loc::At(d, n) => sys.chown_at(d.fd()?.as_fd(), n, uid, gid),
        }
    }

    /// Not for symlinks.
    pub fn chmod(&self, sys: &Sys, mode: u32) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys.fchmod(fd.as_fd(), mode),
            Loc::Dir(h) => sys.fchmod(h.fd()?.as_fd(), mode),
            Loc::At(d, n) => sys.chmod_at(d.fd()?.as_fd(), n, mode),
        }
    }

    /// Set times; a symlink's own times where it is reached by name.
    pub fn utimens(&self, sys: &Sys, atime: Timespec, mtime: Timespec) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys.futimens(fd.as_fd(), atime, mtime),
            Loc::Dir(h) => sys.futimens(h.fd()?.as_fd(), atime, mtime),
            Loc::At(d, n) => sys.utimens_at(d.fd()?.as_fd(), n, atime, mtime),
        }
    }

    /// Hard-link this file to `name` in `dir`.
    pub fn link_to(&self, sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys.link_fd(fd.as_fd(), dir, name),
            Loc::Dir(h) => sys.link_fd(h.fd()?.as_fd(), dir, name),
            Loc::At(d, n) => sys.link_at(d.fd()?.as_fd(), n, dir, name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Found by the overlay_ops fuzz target (RSS growing by ~1.5 KiB per run): directory
    /// handles created and dropped under budget each left a dead entry in the sweep queue.
    #[test]
    fn sweep_queue_does_not_grow_with_dropped_handles() {
        let sys = Arc::new(Sys::default());
        let cache = DirFdCache::new(sys.clone(), 4096);
        let root = DirHandle::root(&cache, Arc::new(sys.open_dir_path(Path::new("/")).unwrap()));
        for _ in 0..10_000 {
            let fd = sys
                .open_path_at(root.fd().unwrap().as_fd(), OsStr::new("tmp"))
                .unwrap();
            drop(DirHandle::child(&root, OsStr::new("tmp"), fd));
        }
        let len = cache.queue.lock().len();
        assert!(
            len < 5_000,
            "{len} entries queued for 10000 dropped handles"
        );
    }
}
