//! The FUSE adapter: decodes a fuser request, calls the overlay, maps the answer.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, Errno as FErrno, FileAttr,
    FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug_span, trace};

use crate::overlay::{
    Attr, Caller, Fh, Ino, Kind, Overlay, ROOT_INO, RenameMode, SetAttr, SetTime,
};
use crate::pacer::{Cost, Pacer};
use crate::sys::{Errno, SplicePipe, Spliced};

/// The one errno map from overlay errors to FUSE replies. Every errno passes through as
/// itself; a zero (no errno known) becomes EIO, never EINVAL.
pub fn fuse_errno(e: Errno) -> FErrno {
    let raw = e.raw_os_error();
    if raw <= 0 {
        FErrno::EIO
    } else {
        FErrno::from_i32(raw)
    }
}

/// Kernel features asked for at INIT, each only when the kernel offers it.
pub const WANTED: InitFlags = InitFlags::FUSE_ASYNC_READ
    .union(InitFlags::FUSE_BIG_WRITES)
    .union(InitFlags::FUSE_MAX_PAGES)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_DO_READDIRPLUS)
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_ATOMIC_O_TRUNC)
    .union(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
    // The daemon drops set-id bits itself, so the kernel marks files without them or file
    // capabilities S_NOSEC and stops asking for `security.capability` before every write.
    .union(InitFlags::FUSE_HANDLE_KILLPRIV_V2);

/// What FUSE protocol 7.27 (Linux 4.18) offers: the compatibility mode asks for no more.
pub const PROTO_7_27: InitFlags = InitFlags::FUSE_ASYNC_READ
    .union(InitFlags::FUSE_POSIX_LOCKS)
    .union(InitFlags::FUSE_ATOMIC_O_TRUNC)
    .union(InitFlags::FUSE_EXPORT_SUPPORT)
    .union(InitFlags::FUSE_BIG_WRITES)
    .union(InitFlags::FUSE_DONT_MASK)
    .union(InitFlags::FUSE_FLOCK_LOCKS)
    .union(InitFlags::FUSE_AUTO_INVAL_DATA)
    .union(InitFlags::FUSE_DO_READDIRPLUS)
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_ASYNC_DIO)
    .union(InitFlags::FUSE_WRITEBACK_CACHE)
    .union(InitFlags::FUSE_NO_OPEN_SUPPORT)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_HANDLE_KILLPRIV)
    .union(InitFlags::FUSE_POSIX_ACL)
    .union(InitFlags::FUSE_ABORT_ERROR);

/// Attributes sent with a negative entry (only the zero node id matters).
const NEGATIVE: Attr = Attr {
    ino: Ino(0),
    size: 0,
    blocks: 0,
    atime: (0, 0),
    mtime: (0, 0),
    ctime: (0, 0),
    kind: Kind::File,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
};

/// One inode's open files, for FUSE passthrough: the kernel fails (EIO) an open that mixes
/// passthrough and cached files on one inode, or names a second backing file for it.
#[derive(Default)]
struct IoMode {
    cached: u32,
    passthrough: u32,
    /// Registered with the kernel while `passthrough > 0`; closed when the last one goes.
    backing: Option<BackingId>,
}

const IO_SHARDS: usize = 32;

/// FUSE passthrough (Linux 6.9+, a privileged daemon): the kernel reads and writes an open
/// upper file itself, with no request to the daemon. Only upper files: a read handle of a
/// lower file moves to the copy after a copy-up (kernel overlayfs semantics), which a backing
/// file cannot. An inode still open through such a cached handle keeps its new opens cached
/// until that handle is released.
struct Passthrough {
    /// Negotiated at INIT.
    negotiated: AtomicBool,
    /// New backing files may be registered (off once the kernel refused one for good).
    usable: AtomicBool,
    inodes: Vec<parking_lot::Mutex<HashMap<Ino, IoMode>>>,
    /// Open file handle -> (inode, passthrough?).
    handles: Vec<parking_lot::Mutex<HashMap<Fh, (Ino, bool)>>>,
}

/// An answer to OPEN or CREATE, cached or passthrough.
trait OpenReply {
    fn open_backing(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId>;
    fn send(self, fh: Fh, backing: Option<&BackingId>);
}

impl OpenReply for ReplyOpen {
    fn open_backing(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId> {
        ReplyOpen::open_backing(self, fd)
    }

    fn send(self, fh: Fh, backing: Option<&BackingId>) {
        match backing {
            Some(b) => self.opened_passthrough(FileHandle(fh.0), FopenFlags::empty(), b),
            None => self.opened(FileHandle(fh.0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }
}

/// CREATE's answer carries the new entry.
struct Created<'a> {
    reply: ReplyCreate,
    ttl: &'a Duration,
    attr: FileAttr,
}

impl OpenReply for Created<'_> {
    fn open_backing(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId> {
        self.reply.open_backing(fd)
    }

    fn send(self, fh: Fh, backing: Option<&BackingId>) {
        let (ttl, attr, g, fh) = (self.ttl, &self.attr, Generation(0), FileHandle(fh.0));
        match backing {
            Some(b) => self
                .reply
                .created_passthrough(ttl, attr, g, fh, FopenFlags::empty(), b),
            None => self
                .reply
                .created(ttl, attr, g, fh, FopenFlags::FOPEN_KEEP_CACHE),
        }
    }
}

impl Passthrough {
    fn new() -> Passthrough {
        Passthrough {
            negotiated: AtomicBool::new(false),
            usable: AtomicBool::new(true),
            inodes: (0..IO_SHARDS).map(|_| Default::default()).collect(),
            handles: (0..IO_SHARDS).map(|_| Default::default()).collect(),
        }
    }

    fn on(&self) -> bool {
        self.negotiated.load(Ordering::Relaxed)
    }

    /// Answer the open of file `fh` of inode `ino`, passthrough when it may be, while the
    /// inode's mode is locked (no other open or release of it interleaves).
    fn open(&self, ov: &Overlay, ino: Ino, fh: Fh, reply: impl OpenReply) {
        let mut inodes = self.inodes[ino.0 as usize % IO_SHARDS].lock();
        let m = inodes.entry(ino).or_default();
        if m.cached == 0 && m.backing.is_none() && self.usable.load(Ordering::Relaxed) {
            match ov.passthrough_fd(fh, |fd| reply.open_backing(fd)) {
                Some(Ok(b)) => m.backing = Some(b),
                Some(Err(e)) => {
                    // EPERM (not privileged after all), ELOOP (the upper layer is itself
                    // stacked too deep), ...: this file stays cached, and for EPERM, ENOTTY
                    // and EOPNOTSUPP every later one too.
                    let fatal = matches!(
                        e.raw_os_error(),
                        Some(libc::EPERM | libc::ENOTTY | libc::EOPNOTSUPP | libc::ENOSYS)
                    );
                    if fatal {
                        self.usable.store(false, Ordering::Relaxed);
                    }
                    tracing::debug!(ino = ino.0, error = %e, fatal, "passthrough refused; cached I/O");
                }
                None => {}
            }
        }
        // Every open of an inode with a backing file must name it, even one that raced a
        // copy-up (the inode is an upper file now). The handle is recorded before the answer
        // goes out: its RELEASE may come right after, on another thread.
        let pt = m.backing.is_some();
        if pt {
            m.passthrough += 1;
        } else {
            m.cached += 1;
        }
        self.handles[fh.0 as usize % IO_SHARDS]
            .lock()
            .insert(fh, (ino, pt));
        reply.send(fh, m.backing.as_ref());
    }

    fn release(&self, fh: Fh) {
        let Some((ino, pt)) = self.handles[fh.0 as usize % IO_SHARDS].lock().remove(&fh) else {
            return;
        };
        let mut inodes = self.inodes[ino.0 as usize % IO_SHARDS].lock();
        let Some(m) = inodes.get_mut(&ino) else {
            return;
        };
        if pt {
            m.passthrough = m.passthrough.saturating_sub(1);
            if m.passthrough == 0 {
                m.backing = None;
            }
        } else {
            m.cached = m.cached.saturating_sub(1);
        }
        if m.passthrough == 0 && m.cached == 0 {
            inodes.remove(&ino);
        }
    }
}

pub struct OverlayFs {
    ov: Overlay,
    pt: Passthrough,
    /// FUSE_NO_OPENDIR_SUPPORT was negotiated: OPENDIR answers ENOSYS once, and the kernel
    /// then opens directories itself (cached listings, KEEP_CACHE) with no OPENDIR or
    /// RELEASEDIR round trip; READDIR comes with handle 0.
    no_opendir: AtomicBool,
    /// HANDLE_KILLPRIV_V2 taken: set-id bits on write, truncate and chown are ours to drop.
    killpriv: AtomicBool,
    ttl: Duration,
    /// Capabilities to leave out even when offered (the 4.18 compatibility mode).
    limit: Option<InitFlags>,
    writeback: bool,
    /// Which session thread reads the next request (see [`crate::pacer`]).
    pace: Arc<Pacer>,
    /// Pipes for read replies by splice, one pair taken per READ being answered.
    pipes: parking_lot::Mutex<Vec<SplicePipe>>,
    pub(crate) negotiated: std::sync::Arc<parking_lot::Mutex<Option<InitFlags>>>,
}

impl OverlayFs {
    /// The adapter of `ov`, served by `threads` session threads.
    pub fn new(ov: Overlay, threads: usize) -> OverlayFs {
        let ttl = match ov.options().timeout {
            Some(t) => Duration::from_secs_f64(t.min(1e9)),
            None => Duration::from_secs(86400 * 365),
        };
        let writeback = ov.options().writeback.unwrap_or(false);
        OverlayFs {
            ov,
            pt: Passthrough::new(),
            no_opendir: AtomicBool::new(false),
            killpriv: AtomicBool::new(false),
            ttl,
            limit: None,
            writeback,
            pace: Pacer::new(threads),
            pipes: Default::default(),
            negotiated: Default::default(),
        }
    }

    /// Ask for no more than these capabilities (to behave as an older kernel would).
    pub fn limit_capabilities(&mut self, flags: InitFlags) {
        self.limit = Some(flags);
    }

    pub fn overlay(&self) -> &Overlay {
        &self.ov
    }

    /// The pacing of the session threads; give it the session's device once there is one.
    pub fn pacer(&self) -> Arc<Pacer> {
        self.pace.clone()
    }

    /// Answers a READ of `len` bytes at `off` by splice (see [`Sys::splice_read_reply`]) when
    /// the session's device is known and a pipe has room for it.
    fn splice_read(&self, unique: u64, fh: Fh, off: u64, len: usize) -> SpliceRead {
        let Some(dev) = self.pace.device() else {
            return SpliceRead::Copy;
        };
        let pipe = self.pipes.lock().pop();
        let Some(mut pipe) = pipe.or_else(|| SplicePipe::new(SPLICE_PIPE_BYTES).ok()) else {
            return SpliceRead::Copy;
        };
        if !pipe.fits(off, len) {
            self.pipes.lock().push(pipe);
            return SpliceRead::Copy;
        }
        let sent = self.ov.with_data_fd(fh, |sys, fd| {
            sys.splice_read_reply(dev, &mut pipe, unique, fd, off, len)
        });
        if !pipe.broken() {
            self.pipes.lock().push(pipe);
        }
        match sent {
            Ok(Spliced::Sent(_)) => SpliceRead::Sent,
            Ok(Spliced::AtEnd) => SpliceRead::AtEnd,
            Ok(Spliced::NotSent) => SpliceRead::Copy,
            Err(e) => SpliceRead::Failed(e),
        }
    }

    fn fattr(&self, a: &Attr) -> FileAttr {
        fn t((s, ns): (i64, u32)) -> SystemTime {
            if s >= 0 {
                UNIX_EPOCH + Duration::new(s as u64, ns)
            } else {
                UNIX_EPOCH - Duration::from_secs((-s) as u64) + Duration::from_nanos(ns as u64)
            }
        }
        FileAttr {
            ino: INodeNo(a.ino.0),
            size: a.size,
            blocks: a.blocks,
            atime: t(a.atime),
            mtime: t(a.mtime),
            ctime: t(a.ctime),
            crtime: t(a.ctime),
            kind: ftype(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: a.blksize,
            flags: 0,
        }
    }

    fn entry(&self, r: Result<Attr, Errno>, reply: ReplyEntry) {
        answer(r, reply, |reply, a| {
            reply.entry(&self.ttl, &self.fattr(&a), Generation(0))
        });
    }

    /// Drops the set-id bits the kernel's rule says a write or truncate by `req` drops.
    fn drop_setid(&self, ino: Ino, req: &Request) -> Result<(), Errno> {
        if let Some(mode) = self.ov.mode_without_setid(ino, caller(req))? {
            let set = SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            };
            self.ov.setattr(ino, None, set)?;
        }
        Ok(())
    }

    fn attr(&self, r: Result<Attr, Errno>, reply: ReplyAttr) {
        answer(r, reply, |reply, a| reply.attr(&self.ttl, &self.fattr(&a)));
    }
}

fn ftype(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let mut s = -(d.as_secs() as i64);
                let mut ns = d.subsec_nanos();
                if ns > 0 {
                    s -= 1;
                    ns = 1_000_000_000 - ns;
                }
                SetTime::At(s, ns)
            }
        },
    })
}

/// Every kind of reply answers an error the same way.
trait ReplyError {
    fn fail(self, e: FErrno);
}

macro_rules! reply_error {
    ($($t:ty),* $(,)?) => {
        $(impl ReplyError for $t {
            fn fail(self, e: FErrno) {
                self.error(e)
            }
        })*
    };
}

reply_error!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr,
);

/// READs of at least this many bytes are answered by splice (four system calls); shorter ones
/// by a copy (two), which costs little for a few pages.
const SPLICE_MIN: usize = 16 << 10;
/// The size asked for each pipe: room for replies up to 248 KiB (a buffer per page, one for the
/// header, one for a misaligned start); the kernel's readahead asks for 128 KiB at a time
/// unless root raised the mount's `read_ahead_kb`, and larger READs are copied. Not more: the
/// size of a user's pipes counts against `/proc/sys/fs/pipe-user-pages-soft` (64 MiB), past
/// which every new pipe of that user gets two pages, and a rootless user may run many mounts.
const SPLICE_PIPE_BYTES: usize = 256 << 10;

/// How a READ was answered by [`OverlayFs::splice_read`], or is to be.
enum SpliceRead {
    Sent,
    /// Nothing to send: the file ends at or before the offset.
    AtEnd,
    /// Answer it the copying way.
    Copy,
    Failed(Errno),
}

/// A READ answered by splice has had its reply: fuser 0.18 has no way to be told so, and its
/// reply would send EIO when dropped unused. Forgetting it sends nothing and keeps one
/// reference count of the session's channel (no memory, nothing left open that would not be
/// anyway).
fn sent_by_splice(reply: ReplyData) {
    std::mem::forget(reply);
}

/// The one way to answer a request: `ok` with the overlay's value, or its error through the
/// one errno map (and in the request's span).
fn answer<T, R: ReplyError>(r: Result<T, Errno>, reply: R, ok: impl FnOnce(R, T)) {
    match r {
        Ok(v) => ok(reply, v),
        Err(e) => {
            trace!(error = %e, "error");
            reply.fail(fuse_errno(e))
        }
    }
}

/// The rename mode fuser's flags ask for; none (EINVAL) for other flags
/// (`RENAME_WHITEOUT`, unknown bits) or for both `RENAME_NOREPLACE` and `RENAME_EXCHANGE`.
fn rename_mode(flags: RenameFlags) -> Option<RenameMode> {
    if flags.is_empty() {
        Some(RenameMode::Replace)
    } else if flags == RenameFlags::RENAME_NOREPLACE {
        Some(RenameMode::NoReplace)
    } else if flags == RenameFlags::RENAME_EXCHANGE {
        Some(RenameMode::Exchange)
    } else {
        None
    }
}

/// An open for writing or with O_TRUNC may copy a lower file up; one for reading does not.
fn open_cost(flags: OpenFlags) -> Cost {
    if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
        Cost::MayBlock
    } else {
        Cost::Quick
    }
}

fn reply_empty(r: Result<(), Errno>, reply: ReplyEmpty) {
    answer(r, reply, |reply, ()| reply.ok());
}

fn reply_xattr(r: Result<Vec<u8>, Errno>, size: u32, reply: ReplyXattr) {
    answer(r, reply, |reply, v| {
        if size == 0 {
            reply.size(v.len() as u32)
        } else if v.len() > size as usize {
            reply.error(FErrno::ERANGE)
        } else {
            reply.data(&v)
        }
    });
}

impl Filesystem for OverlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _s = debug_span!("init").entered();
        let mut want = WANTED;
        if !self.ov.options().noacl {
            // The kernel enforces and caches ACLs itself (no getxattr round trip per access).
            want |= InitFlags::FUSE_POSIX_ACL;
        }
        if self.writeback && !self.ov.read_only() {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        // Passthrough needs a privileged daemon, and is not combined with the writeback cache.
        if self.ov.options().passthrough != Some(false)
            && !self.writeback
            && crate::sys::may_open_backing()
        {
            want |= InitFlags::FUSE_PASSTHROUGH;
        }
        if let Some(limit) = self.limit {
            want &= limit;
        }
        let offered = config.capabilities();
        let mut take = want & offered;
        if take.contains(InitFlags::FUSE_PASSTHROUGH) && config.set_max_stack_depth(1).is_err() {
            take.remove(InitFlags::FUSE_PASSTHROUGH);
        }
        if take.contains(InitFlags::FUSE_PASSTHROUGH) {
            // Passthrough writes never reach the daemon, so it could not drop set-id bits
            // for them: the kernel keeps that job.
            take.remove(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        }
        let _ = config.add_capabilities(take);
        self.no_opendir.store(
            take.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT),
            Ordering::Relaxed,
        );
        self.killpriv.store(
            take.contains(InitFlags::FUSE_HANDLE_KILLPRIV_V2),
            Ordering::Relaxed,
        );
        self.pt.negotiated.store(
            take.contains(InitFlags::FUSE_PASSTHROUGH),
            Ordering::Relaxed,
        );
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        if self.limit.is_some() {
            // fuser asks for MAX_PAGES by itself when offered; before 4.20 requests were at
            // most 32 pages, so keep them there.
            let _ = config.set_max_write(128 << 10);
            let _ = config.set_max_readahead(128 << 10);
        } else {
            let _ = config.set_max_write(1 << 20);
        }
        *self.negotiated.lock() = Some(take);
        tracing::debug!(?take, "FUSE capabilities negotiated");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("lookup", parent = parent.0, ?name).entered();
        match self.ov.lookup(Ino(parent.0), name) {
            // A negative entry the kernel may cache: layers below are immutable and this
            // daemon is the only writer of the upper one.
            Err(Errno::NOENT) => {
                trace!("ENOENT");
                let mut a = self.fattr(&NEGATIVE);
                a.ino = INodeNo(0);
                reply.entry(&self.ttl, &a, Generation(0))
            }
            r => self.entry(r, reply),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // No turn of the pacer: the end of a turn may park the thread (see [`crate::pacer`]),
        // and fuser serves a BATCH_FORGET by calling this once per node, so a thread parked
        // part way through a batch kept the rest (pins of removed files among them, and
        // those files' space) until its next wake-up. A FORGET has no answer to wait for;
        // the thread goes back to read when the batch is done.
        let _s = debug_span!("forget", ino = ino.0, nlookup).entered();
        self.ov.forget(Ino(ino.0), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("getattr", ino = ino.0).entered();
        self.attr(self.ov.getattr(Ino(ino.0), fh.map(|f| Fh(f.0))), reply);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("setattr", ino = ino.0).entered();
        let mut set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        // With HANDLE_KILLPRIV_V2 the kernel leaves set-id bits to us on a truncate by a
        // caller without CAP_FSETID (FATTR_KILL_SUIDGID, which fuser does not pass on: a
        // non-root caller stands for it) and on every chown of a non-directory.
        let chown = uid.is_some() || gid.is_some();
        if mode.is_none()
            && self.killpriv.load(Ordering::Relaxed)
            && (chown || (size.is_some() && req.uid() != 0))
        {
            match self.ov.mode_without_setid(Ino(ino.0), caller(req)) {
                Ok(m) => set.mode = m,
                Err(e) => return reply.error(fuse_errno(e)),
            }
        }
        self.attr(self.ov.setattr(Ino(ino.0), fh.map(|f| Fh(f.0)), set), reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("readlink", ino = ino.0).entered();
        answer(self.ov.readlink(Ino(ino.0)), reply, |reply, t| {
            reply.data(t.as_bytes())
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("mknod", parent = parent.0, ?name).entered();
        let mode = (mode & libc::S_IFMT) | (mode & !umask & 0o7777);
        self.entry(
            self.ov.mknod(caller(req), Ino(parent.0), name, mode, rdev),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("mkdir", parent = parent.0, ?name).entered();
        self.entry(
            self.ov
                .mkdir(caller(req), Ino(parent.0), name, mode & !umask),
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("unlink", parent = parent.0, ?name).entered();
        reply_empty(self.ov.unlink(Ino(parent.0), name), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("rmdir", parent = parent.0, ?name).entered();
        reply_empty(self.ov.rmdir(Ino(parent.0), name), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("symlink", parent = parent.0, ?link_name).entered();
        self.entry(
            self.ov
                .symlink(caller(req), Ino(parent.0), link_name, target.as_os_str()),
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!(
            "rename",
            parent = parent.0,
            ?name,
            newparent = newparent.0,
            ?newname
        )
        .entered();
        let r = match rename_mode(flags) {
            Some(mode) => self
                .ov
                .rename(Ino(parent.0), name, Ino(newparent.0), newname, mode),
            // EROFS before EINVAL, as the core answers any change of a read-only mount.
            None => self.ov.writable().and(Err(Errno::INVAL)),
        };
        reply_empty(r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("link", ino = ino.0, newparent = newparent.0, ?newname).entered();
        self.entry(self.ov.link(Ino(ino.0), Ino(newparent.0), newname), reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _turn = self.pace.begin(open_cost(flags));
        let _s = debug_span!("open", ino = ino.0).entered();
        let mut flags = flags.0;
        // The truncate of an O_TRUNC open is ours (ATOMIC_O_TRUNC), and the kernel's check
        // of set-id bits does not reach it: a caller without CAP_FSETID (non-root) loses
        // them as with truncate(2).
        if flags & libc::O_TRUNC != 0 && req.uid() != 0 {
            if let Err(e) = self.drop_setid(Ino(ino.0), req) {
                return reply.error(fuse_errno(e));
            }
        }
        if self.writeback && flags & libc::O_ACCMODE == libc::O_WRONLY {
            // The page cache may read around a write.
            flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR;
        }
        if self.writeback {
            flags &= !libc::O_APPEND;
        }
        answer(self.ov.open(Ino(ino.0), flags), reply, |reply, fh| {
            if self.pt.on() {
                self.pt.open(&self.ov, Ino(ino.0), fh, reply)
            } else {
                reply.send(fh, None)
            }
        });
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("read", fh = fh.0, offset, size).entered();
        if size as usize >= SPLICE_MIN {
            match self.splice_read(req.unique().0, Fh(fh.0), offset, size as usize) {
                SpliceRead::Sent => return sent_by_splice(reply),
                SpliceRead::AtEnd => return reply.data(&[]),
                SpliceRead::Failed(e) => {
                    trace!(error = %e, "error");
                    return reply.error(fuse_errno(e));
                }
                SpliceRead::Copy => {}
            }
        }
        answer(self.ov.read(Fh(fh.0), offset, size), reply, |reply, d| {
            reply.data(&d)
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("write", fh = fh.0, offset, size = data.len()).entered();
        // Set only with HANDLE_KILLPRIV_V2, for a writer without CAP_FSETID in the initial
        // user namespace: root of a rootless mount's namespace keeps the bits, as on kernel
        // overlayfs there.
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) && req.uid() != 0 {
            if let Err(e) = self.drop_setid(Ino(ino.0), req) {
                return reply.error(fuse_errno(e));
            }
        }
        answer(self.ov.write(Fh(fh.0), offset, data), reply, |reply, n| {
            reply.written(n)
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close: writes reach the layer before WRITE answers, and POSIX
        // locks are the kernel's (no FUSE_POSIX_LOCKS). ENOSYS makes the kernel stop sending
        // FLUSH (one round trip less per close); it still writes back dirty pages itself first
        // with `writeback=1`.
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("flush").entered();
        reply.error(FErrno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("release", fh = fh.0).entered();
        if self.pt.on() {
            self.pt.release(Fh(fh.0));
        }
        self.ov.release(Fh(fh.0));
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("fsync", fh = fh.0, datasync).entered();
        reply_empty(self.ov.fsync(Fh(fh.0), datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("opendir", ino = ino.0).entered();
        if self.no_opendir.load(Ordering::Relaxed) {
            // The kernel stops asking; this open and every later one go on with handle 0.
            return reply.error(FErrno::ENOSYS);
        }
        answer(self.ov.opendir(Ino(ino.0)), reply, |reply, fh| {
            // FOPEN_CACHE_DIR came with protocol 7.28.
            let flags = match self.limit {
                Some(_) => FopenFlags::FOPEN_KEEP_CACHE,
                None => FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            };
            reply.opened(FileHandle(fh.0), flags)
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("readdir", ino = ino.0, offset).entered();
        let r = self.ov.readdir(Fh(fh.0), Ino(ino.0), offset, |e, off| {
            reply.add(INodeNo(e.ino.0), off, ftype(e.kind), &e.name)
        });
        answer(r, reply, |reply, ()| reply.ok());
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("readdirplus", ino = ino.0).entered();
        let zero = Duration::ZERO;
        let r = self
            .ov
            .readdirplus(Fh(fh.0), Ino(ino.0), offset, |e, off, attr| match attr {
                Some(a) => reply.add(
                    INodeNo(e.ino.0),
                    off,
                    &e.name,
                    &self.ttl,
                    &self.fattr(a),
                    Generation(0),
                ),
                None => {
                    // `.` and `..` (the kernel links no dentry for them, by name), and an
                    // entry whose lookup failed: fuser lists the node id as d_ino, so it
                    // cannot be 0 (glibc's readdir skips such entries); the root's id is
                    // one the kernel refuses to link (it sends a FORGET of it, which is
                    // ignored), so the entry is listed with its type, and its own lookup
                    // fails again when made.
                    let dot = e.name == "." || e.name == "..";
                    let fa = FileAttr {
                        ino: INodeNo(if dot { e.ino.0 } else { ROOT_INO.0 }),
                        size: 0,
                        blocks: 0,
                        atime: UNIX_EPOCH,
                        mtime: UNIX_EPOCH,
                        ctime: UNIX_EPOCH,
                        crtime: UNIX_EPOCH,
                        kind: ftype(e.kind),
                        perm: 0,
                        nlink: 0,
                        uid: 0,
                        gid: 0,
                        rdev: 0,
                        blksize: 0,
                        flags: 0,
                    };
                    reply.add(INodeNo(e.ino.0), off, &e.name, &zero, &fa, Generation(0))
                }
            });
        answer(r, reply, |reply, ()| reply.ok());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("releasedir", fh = fh.0).entered();
        self.ov.release(Fh(fh.0));
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("fsyncdir", ino = ino.0, datasync).entered();
        reply_empty(self.ov.fsyncdir(Ino(ino.0), datasync), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("statfs").entered();
        answer(self.ov.statfs(), reply, |reply, s| {
            reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            )
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("setxattr", ino = ino.0, ?name).entered();
        if cfg!(feature = "fault-injection") && name == crate::sys::faults::PLAN_XATTR {
            reply_empty(self.ov.faults().plan(value), reply);
            return;
        }
        reply_empty(self.ov.setxattr(Ino(ino.0), name, value, flags), reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("getxattr", ino = ino.0, ?name).entered();
        reply_xattr(self.ov.getxattr(Ino(ino.0), name), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("listxattr", ino = ino.0).entered();
        reply_xattr(self.ov.listxattr(Ino(ino.0)), size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("removexattr", ino = ino.0, ?name).entered();
        reply_empty(self.ov.removexattr(Ino(ino.0), name), reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions).
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("access").entered();
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("create", parent = parent.0, ?name).entered();
        let mut flags = flags;
        if self.writeback {
            flags &= !libc::O_APPEND;
        }
        let r = self
            .ov
            .create(caller(req), Ino(parent.0), name, mode & !umask, flags);
        answer(r, reply, |reply, (a, fh)| {
            let created = Created {
                reply,
                ttl: &self.ttl,
                attr: self.fattr(&a),
            };
            if self.pt.on() {
                self.pt.open(&self.ov, a.ino, fh, created)
            } else {
                created.send(fh, None)
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("fallocate", fh = fh.0, offset, length, mode).entered();
        reply_empty(self.ov.fallocate(Fh(fh.0), offset, length, mode), reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _turn = self.pace.begin(Cost::Quick);
        let _s = debug_span!("lseek", fh = fh.0, offset, whence).entered();
        answer(
            self.ov.lseek(Fh(fh.0), offset, whence),
            reply,
            |reply, o| reply.offset(o),
        );
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _turn = self.pace.begin(Cost::MayBlock);
        let _s = debug_span!("copy_file_range", fh_in = fh_in.0, fh_out = fh_out.0, len).entered();
        let r = self
            .ov
            .copy_file_range(Fh(fh_in.0), offset_in, Fh(fh_out.0), offset_out, len);
        answer(r, reply, |reply, n| reply.written(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_map_passes_through_and_never_invents_einval() {
        assert_eq!(fuse_errno(Errno::NOENT), FErrno::ENOENT);
        assert_eq!(fuse_errno(Errno::XDEV), FErrno::from_i32(libc::EXDEV));
        assert_eq!(fuse_errno(Errno::PERM), FErrno::EPERM);
        assert_eq!(fuse_errno(Errno::ACCESS), FErrno::EACCES);
        assert_eq!(
            fuse_errno(Errno::NOTEMPTY),
            FErrno::from_i32(libc::ENOTEMPTY)
        );
    }
    #[test]
    fn rename_flags_decode_to_one_mode_or_einval() {
        let f = RenameFlags::from_bits_retain;
        assert_eq!(rename_mode(f(0)), Some(RenameMode::Replace));
        let noreplace = f(libc::RENAME_NOREPLACE);
        assert_eq!(rename_mode(noreplace), Some(RenameMode::NoReplace));
        let exchange = f(libc::RENAME_EXCHANGE);
        assert_eq!(rename_mode(exchange), Some(RenameMode::Exchange));
        assert_eq!(rename_mode(noreplace | exchange), None);
        assert_eq!(rename_mode(f(libc::RENAME_WHITEOUT)), None);
        assert_eq!(rename_mode(f(libc::RENAME_NOREPLACE | 1 << 20)), None);
    }
}
