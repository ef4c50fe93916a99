//! The one seam for kernel calls.
//!
//! Every system call the overlay makes goes through a method of [`Sys`], one value per
//! overlay, so that a test can inject a fault at a chosen step of that overlay ([`faults`])
//! and the 4.18 compatibility limits ([`Compat`]) apply where that mount asked for them; and so
//! that `unsafe` lives in one module. Calls that hold no per-mount state (process set-up,
//! mounting) are free functions. Most calls are rustix's safe wrappers; the few raw ones carry
//! a `// SAFETY:` note. Nothing here is process-wide state.
//!
//! Paths are always relative to a directory fd and never follow a symlink in the last
//! component: a layer's symlink is data, not a way out of the layer.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicU8, Ordering};

pub use rustix::fs::{FileType, Mode, OFlags, RenameFlags, Stat, StatFs, Timespec};
pub use rustix::io::Errno;

pub type Result<T> = std::result::Result<T, Errno>;

/// The kernel-call seam of one overlay: every call that can fail goes through a method here,
/// so that this instance's planned fault ([`faults::Faults`]) and its compatibility settings
/// ([`Compat`]) apply to its calls and to no other instance's. Built once per mount from the
/// configuration; holds no process-wide state.
#[derive(Debug, Default)]
pub struct Sys {
    compat: Compat,
    faults: faults::Faults,
    /// Whether `getxattrat`/`listxattrat` (Linux 6.13+) work here: [`XATTRAT_UNKNOWN`] until
    /// the first call tells.
    xattrat: AtomicU8,
}

impl Sys {
    /// The seam of a mount that behaves as `compat` says.
    pub fn new(compat: Compat) -> Sys {
        Sys {
            compat,
            faults: faults::Faults::default(),
            xattrat: AtomicU8::new(XATTRAT_UNKNOWN),
        }
    }

    /// The compatibility settings this seam applies.
    pub fn compat(&self) -> Compat {
        self.compat
    }

    /// This instance's fault plan (effective in tests and `fault-injection` builds).
    pub fn faults(&self) -> &faults::Faults {
        &self.faults
    }
}

/// Fault injection for tests: make the Nth call of an operation fail with an errno.
pub mod faults {
    use super::{Errno, Result};
    use parking_lot::Mutex;

    #[derive(Debug)]
    struct Plan {
        op: &'static str,
        countdown: u64,
        errno: Errno,
    }

    /// The planned fault of one [`super::Sys`]: only calls through that instance count down
    /// to it, so a test's fault is never taken by another test's overlay.
    #[derive(Debug, Default)]
    pub struct Faults {
        plan: Mutex<Option<Plan>>,
    }

    /// The kernel calls a fault can be planned for (the names `Faults::check` is called
    /// with).
    pub const OPS: &[&str] = &[
        "chmod",
        "chown",
        "copy_file_range",
        "fallocate",
        "ficlone",
        "fsync",
        "getxattr",
        "link",
        "listxattr",
        "mkdir",
        "mknod",
        "open",
        "read",
        "readlink",
        "removexattr",
        "rename",
        "rmdir",
        "setxattr",
        "stat",
        "symlink",
        "truncate",
        "unlink",
        "utimens",
        "write",
    ];

    /// The xattr name that plans a fault on a live mount, in a binary built with the
    /// `fault-injection` feature: `setfattr -n rustfuse.fault -v OP:NTH:ERRNO MOUNTPOINT`
    /// (e.g. `rename:1:5`, the next rename fails with EIO; `off` drops the plan). Without a
    /// namespace prefix it names no real xattr, so in other builds it is refused as any such
    /// name is.
    pub const PLAN_XATTR: &str = "rustfuse.fault";

    impl Faults {
        /// Arrange for the `nth` (1-based) call of `op` to fail with `errno`.
        pub fn inject(&self, op: &'static str, nth: u64, errno: Errno) {
            *self.plan.lock() = Some(Plan {
                op,
                countdown: nth,
                errno,
            });
        }

        /// Remove any planned fault.
        pub fn clear(&self) {
            *self.plan.lock() = None;
        }

        /// Plan a fault from a `OP:NTH:ERRNO` value, or drop the plan with `off` (EINVAL for
        /// anything else).
        pub fn plan(&self, value: &[u8]) -> Result<()> {
            let text = std::str::from_utf8(value).map_err(|_| Errno::INVAL)?;
            if text.trim() == "off" {
                self.clear();
                return Ok(());
            }
            let mut parts = text.trim().split(':');
            let (Some(op), Some(nth), Some(errno), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(Errno::INVAL);
            };
            let op = OPS.iter().find(|o| **o == op).ok_or(Errno::INVAL)?;
            let nth: u64 = nth.parse().map_err(|_| Errno::INVAL)?;
            let errno: i32 = errno.parse().map_err(|_| Errno::INVAL)?;
            if nth == 0 || errno <= 0 {
                return Err(Errno::INVAL);
            }
            self.inject(op, nth, Errno::from_raw_os_error(errno));
            Ok(())
        }

        /// The planned errno if this call of `op` is the one planned to fail. Compiled to
        /// nothing outside tests and `fault-injection` builds.
        #[inline]
        pub(crate) fn check(&self, op: &'static str) -> Result<()> {
            if cfg!(any(test, feature = "fault-injection")) {
                let mut plan = self.plan.lock();
                if let Some(p) = plan.as_mut() {
                    if p.op == op {
                        p.countdown -= 1;
                        if p.countdown == 0 {
                            let e = p.errno;
                            *plan = None;
                            return Err(e);
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

/// Behave as Linux 4.18 would (the oldest kernel rustfuse supports), so the test suite can
/// prove nothing quietly needs a newer one (`RUSTFUSE_COMPAT_4_18`, read by `main`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compat {
    kernel_4_18: bool,
    in_userns: bool,
}

impl Compat {
    /// The host kernel as it is.
    pub fn native() -> Compat {
        Compat::default()
    }

    /// Linux 4.18's limits; whether whiteouts are refused is decided here, once, from the
    /// user namespace this process is in.
    pub fn kernel_4_18() -> Compat {
        Compat {
            kernel_4_18: true,
            in_userns: in_user_namespace(),
        }
    }

    /// Does this seam behave as Linux 4.18?
    pub fn is_kernel_4_18(self) -> bool {
        self.kernel_4_18
    }

    /// Before 5.8, whiteouts (0/0 devices, RENAME_WHITEOUT) needed CAP_MKNOD in the initial
    /// user namespace.
    pub(crate) fn whiteouts_refused(self) -> bool {
        self.kernel_4_18 && self.in_userns
    }
}

/// The text of a kernel file (`/proc`, `/sys`): one open, reads of 4 KiB until the end, one
/// close (`std::fs::read_to_string` adds a stat, which tells nothing for these files). None
/// when it cannot be read or is not UTF-8.
pub fn read_small(path: &str) -> Option<String> {
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match rustix::io::read(&fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(Errno::INTR) => {}
            Err(_) => return None,
        }
    }
    String::from_utf8(text).ok()
}

/// Are we in a user namespace other than the initial one?
pub fn in_user_namespace() -> bool {
    read_small("/proc/self/uid_map")
        .is_some_and(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
}

/// The CPUs this process may run on (its affinity mask; 1 if it cannot be read). Unlike
/// `std::thread::available_parallelism` it does not read the cgroup's CPU quota (four
/// `/proc` and `/sys` files at every start): a quota limits CPU time, not how many requests
/// may wait on the disk at once, and libfuse's thread pool does not look at it either.
pub fn cpus_allowed() -> usize {
    rustix::thread::sched_getaffinity(None).map_or(1, |set| (set.count() as usize).max(1))
}

/// May this process register backing files for FUSE passthrough? The kernel wants
/// CAP_SYS_ADMIN in the initial user namespace (`FUSE_DEV_IOC_BACKING_OPEN`); a daemon in a
/// user namespace (rootless) is refused.
pub fn may_open_backing() -> bool {
    if in_user_namespace() {
        return false;
    }
    rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::SYS_ADMIN)
    })
}

fn c(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::INVAL)
}

/// `/proc/self/fd/N`: reaches the file an `O_PATH` fd points at.
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

/// `/proc/self/fd/N/NAME`: a name inside the directory an fd points at.
fn proc_at_path(dir: BorrowedFd<'_>, name: &OsStr) -> Result<CString> {
    let mut v = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    v.extend_from_slice(name.as_bytes());
    CString::new(v).map_err(|_| Errno::INVAL)
}

// ---------------------------------------------------------------- opening and stat

impl Sys {
    /// Open a directory by absolute path as an `O_PATH` handle (layer roots, the workdir).
    pub fn open_dir_path(&self, path: &std::path::Path) -> Result<OwnedFd> {
        self.faults.check("open")?;
        rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    /// `O_PATH|O_NOFOLLOW` handle of `name` in `dir`.
    pub fn open_path_at(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd> {
        self.faults.check("open")?;
        rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    /// `O_PATH|O_DIRECTORY|O_NOFOLLOW` handle of the directory `name` in `dir` (ENOTDIR when
    /// the name holds something else).
    pub fn open_dir_path_at(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd> {
        self.faults.check("open")?;
        rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    /// Open `name` in `dir` for I/O (never following a final symlink).
    pub fn open_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        flags: OFlags,
        mode: u32,
    ) -> Result<OwnedFd> {
        self.faults.check("open")?;
        rustix::fs::openat(
            dir,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
    }

    /// Whether an anonymous file (O_TMPFILE) can be made in directory `dir`: one is opened and
    /// closed, outside the fault plan (a probe, not a step of anything).
    pub fn tmpfile_works(&self, dir: BorrowedFd<'_>) -> Result<()> {
        rustix::fs::openat(
            dir,
            ".",
            OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map(drop)
    }

    /// Reopen the file an `O_PATH` fd points at with real access flags.
    pub fn reopen(&self, fd: BorrowedFd<'_>, flags: OFlags) -> Result<OwnedFd> {
        self.faults.check("open")?;
        let flags = flags & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY | OFlags::NOFOLLOW);
        rustix::fs::open(
            proc_fd_path(fd).as_c_str(),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    /// A readable directory stream of the directory an fd points at.
    pub fn open_dir_stream(&self, dir: BorrowedFd<'_>) -> Result<rustix::fs::Dir> {
        self.faults.check("open")?;
        let fd = rustix::fs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rustix::fs::Dir::new(fd)
    }

    pub fn stat_at(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<Stat> {
        self.faults.check("stat")?;
        rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
    }

    /// `stat` of what an fd (possibly `O_PATH`) points at.
    pub fn fstat(&self, fd: BorrowedFd<'_>) -> Result<Stat> {
        self.faults.check("stat")?;
        rustix::fs::statat(fd, "", rustix::fs::AtFlags::EMPTY_PATH)
    }
}

pub fn fstatfs(fd: BorrowedFd<'_>) -> Result<StatFs> {
    rustix::fs::fstatfs(fd)
}

impl Sys {
    pub fn readlink_at(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<OsString> {
        self.faults.check("readlink")?;
        let s = rustix::fs::readlinkat(dir, name, Vec::new())?;
        Ok(OsString::from_vec(s.into_bytes()))
    }

    /// The target of the symlink an `O_PATH|O_NOFOLLOW` fd points at.
    pub fn readlink_fd(&self, fd: BorrowedFd<'_>) -> Result<OsString> {
        self.faults.check("readlink")?;
        let s = rustix::fs::readlinkat(fd, "", Vec::new())?;
        Ok(OsString::from_vec(s.into_bytes()))
    }

    // ---------------------------------------------------------------- creating and removing

    pub fn mkdir_at(&self, dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
        self.faults.check("mkdir")?;
        rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode))
    }

    pub fn mknod_at(&self, dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> Result<()> {
        self.faults.check("mknod")?;
        self.mknod_unplanned(dir, name, mode, rdev)
    }

    /// mknodat as this seam's kernel answers it, outside the fault plan.
    fn mknod_unplanned(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        mode: u32,
        rdev: u64,
    ) -> Result<()> {
        if self.compat.whiteouts_refused() && mode & libc::S_IFMT == libc::S_IFCHR {
            return Err(Errno::PERM);
        }
        let ft = FileType::from_raw_mode(mode);
        rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(mode & 0o7777), rdev)
    }

    /// Can whiteouts be 0/0 character devices in `dir`? Makes and removes `name` there. Not
    /// in the fault plan: this is a question about the filesystem, asked once per mount at
    /// the first whiteout, and a planned `mknod` or `unlink` fault belongs to that whiteout.
    pub fn dev_whiteouts_work(&self, dir: BorrowedFd<'_>, name: &OsStr) -> bool {
        let _ = rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty());
        let ok = self.mknod_unplanned(dir, name, libc::S_IFCHR, 0).is_ok();
        let _ = rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty());
        ok
    }

    pub fn symlink_at(&self, target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        self.faults.check("symlink")?;
        rustix::fs::symlinkat(target, dir, name)
    }

    /// Hard-link the file an `O_PATH` fd points at to `name` in `dir`.
    pub fn link_fd(&self, fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        self.faults.check("link")?;
        rustix::fs::linkat(
            rustix::fs::CWD,
            proc_fd_path(fd).as_c_str(),
            dir,
            name,
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        )
    }

    pub fn unlink_at(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        self.faults.check("unlink")?;
        rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty())
    }

    pub fn rmdir_at(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        self.faults.check("rmdir")?;
        rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::REMOVEDIR)
    }

    pub fn rename_at(
        &self,
        old_dir: BorrowedFd<'_>,
        old: &OsStr,
        new_dir: BorrowedFd<'_>,
        new: &OsStr,
        flags: RenameFlags,
    ) -> Result<()> {
        self.faults.check("rename")?;
        if self.compat.whiteouts_refused() && flags.contains(RenameFlags::WHITEOUT) {
            return Err(Errno::PERM);
        }
        if flags.is_empty() {
            rustix::fs::renameat(old_dir, old, new_dir, new)
        } else {
            rustix::fs::renameat_with(old_dir, old, new_dir, new, flags)
        }
    }

    // ---------------------------------------------------------------- attributes

    /// chown without following a symlink; works on `O_PATH` fds.
    pub fn fchown(&self, fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        self.faults.check("chown")?;
        rustix::fs::chownat(
            fd,
            "",
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
            rustix::fs::AtFlags::EMPTY_PATH | rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    /// chmod of what an fd points at (not for symlinks, which have no mode of their own).
    pub fn fchmod(&self, fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
        self.faults.check("chmod")?;
        rustix::fs::chmod(proc_fd_path(fd).as_c_str(), Mode::from_raw_mode(mode))
    }

    /// Set times of `name` in `dir` without following a symlink.
    pub fn utimens_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        atime: Timespec,
        mtime: Timespec,
    ) -> Result<()> {
        self.faults.check("utimens")?;
        rustix::fs::utimensat(
            dir,
            name,
            &rustix::fs::Timestamps {
                last_access: atime,
                last_modification: mtime,
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    /// Set times of what an fd points at (not for symlinks).
    pub fn futimens(&self, fd: BorrowedFd<'_>, atime: Timespec, mtime: Timespec) -> Result<()> {
        self.faults.check("utimens")?;
        rustix::fs::utimensat(
            rustix::fs::CWD,
            proc_fd_path(fd).as_c_str(),
            &rustix::fs::Timestamps {
                last_access: atime,
                last_modification: mtime,
            },
            rustix::fs::AtFlags::empty(),
        )
    }
}

pub const UTIME_NOW: i64 = libc::UTIME_NOW;
pub const UTIME_OMIT: i64 = libc::UTIME_OMIT;

// ---------------------------------------------------------------- xattrs
//
// Node xattrs go through `/proc/self/fd/N` (which reaches the inode an O_PATH fd points at,
// symlinks included, without following further); entries of a directory go through
// `/proc/self/fd/D/NAME` with the `l*` calls. Where the kernel has `getxattrat` and
// `listxattrat` (6.13+), entries of a directory and directories themselves are reached from
// the fd with no /proc path to resolve (1.3 us against 8 us a call here); whether it has them
// is learnt from the first call (ENOSYS, or EPERM from a seccomp filter that does not know
// them: the /proc path from then on). An fd the `*xattrat` calls refuse (ENOTDIR: not a
// directory) takes the `f*` call, which a file opened for I/O answers itself (a copy-up's
// xattrs, the syncer's marks); an `O_PATH` one refuses it (EBADF) and goes through /proc.

const XATTRAT_UNKNOWN: u8 = 0;
const XATTRAT_YES: u8 = 1;
const XATTRAT_NO: u8 = 2;

/// The `*xattrat` calls (Linux 6.13+).
#[derive(Clone, Copy)]
enum XattrAt {
    Set,
    Get,
    List,
    Remove,
}

impl XattrAt {
    /// Its syscall number, the same on both architectures (new syscalls share one table);
    /// none elsewhere (the /proc path is taken there).
    fn number(self) -> Option<libc::c_long> {
        if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            return None;
        }
        Some(match self {
            XattrAt::Set => 463,
            XattrAt::Get => 464,
            XattrAt::List => 465,
            XattrAt::Remove => 466,
        })
    }
}

/// `struct xattr_args` of `getxattrat(2)` and `setxattrat(2)`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Make the raw `*xattrat` call `call` on `dir` and `path` with `flags` and the arguments
/// that follow (unused ones 0): the count it gave, or errno (ENOSYS where it has no number).
///
/// # Safety
/// The pointers in `args` must be valid for what `call` does with them.
unsafe fn xattrat_raw(
    call: XattrAt,
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_uint,
    args: [usize; 3],
) -> Result<usize> {
    let Some(nr) = call.number() else {
        return Err(Errno::NOSYS);
    };
    // SAFETY: `path` is NUL-terminated and lives across the call; the caller vouches for
    // the pointers in `args`.
    let r = unsafe {
        libc::syscall(
            nr,
            dir.as_raw_fd() as libc::c_long,
            path.as_ptr(),
            flags,
            args[0],
            args[1],
            args[2],
        )
    };
    match r {
        -1 => Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        )),
        n => Ok(n as usize),
    }
}

/// One `getxattrat(dir, path, flags, name)` into `buf`: the value's length.
fn getxattrat_raw(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_uint,
    name: &CStr,
    buf: &mut [u8],
) -> Result<usize> {
    let mut args = XattrArgs {
        value: buf.as_mut_ptr() as u64,
        size: u32::try_from(buf.len()).unwrap_or(u32::MAX),
        flags: 0,
    };
    let a = &mut args as *mut XattrArgs as usize;
    let size = std::mem::size_of::<XattrArgs>();
    // SAFETY: `name` is NUL-terminated and lives across the call; `args` points at `buf`,
    // writable for `args.size` bytes (never more than its length), and its own size is
    // passed as the struct's size; the kernel writes nothing else.
    unsafe {
        xattrat_raw(
            XattrAt::Get,
            dir,
            path,
            flags,
            [name.as_ptr() as usize, a, size],
        )
    }
}

/// One `setxattrat(dir, path, flags, name)` of `value` (`xflags`: XATTR_CREATE, _REPLACE).
fn setxattrat_raw(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_uint,
    name: &CStr,
    value: &[u8],
    xflags: u32,
) -> Result<()> {
    let args = XattrArgs {
        value: value.as_ptr() as u64,
        size: u32::try_from(value.len()).map_err(|_| Errno::TOOBIG)?,
        flags: xflags,
    };
    let a = &args as *const XattrArgs as usize;
    let size = std::mem::size_of::<XattrArgs>();
    // SAFETY: `name` is NUL-terminated and lives across the call; `args` points at `value`,
    // readable for `args.size` bytes, and its own size is passed as the struct's size; the
    // kernel only reads.
    unsafe {
        xattrat_raw(
            XattrAt::Set,
            dir,
            path,
            flags,
            [name.as_ptr() as usize, a, size],
        )
    }
    .map(drop)
}

/// One `removexattrat(dir, path, flags, name)`.
fn removexattrat_raw(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_uint,
    name: &CStr,
) -> Result<()> {
    // SAFETY: `name` is NUL-terminated and lives across the call.
    unsafe {
        xattrat_raw(
            XattrAt::Remove,
            dir,
            path,
            flags,
            [name.as_ptr() as usize, 0, 0],
        )
    }
    .map(drop)
}

/// One `listxattrat(dir, path, flags)` into `buf`: the list's length.
fn listxattrat_raw(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_uint,
    buf: &mut [u8],
) -> Result<usize> {
    let b = buf.as_mut_ptr() as usize;
    // SAFETY: `buf` is writable for the length passed.
    unsafe { xattrat_raw(XattrAt::List, dir, path, flags, [b, buf.len(), 0]) }
}

/// An xattr value read with `get(buf)` (the value's length, ERANGE when `buf` is short; an
/// empty `buf` asks for the length).
fn xattr_value(mut get: impl FnMut(&mut [u8]) -> Result<usize>) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match get(&mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => {
                let n = get(&mut [0u8; 0][..])?;
                buf.resize(n.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// An xattr name list read with `list(buf)` (its length, ERANGE when `buf` is short).
fn xattr_names(mut list: impl FnMut(&mut [u8]) -> Result<usize>) -> Result<Vec<OsString>> {
    let mut buf = vec![0u8; 1024];
    let n = loop {
        match list(&mut buf[..]) {
            Ok(n) => break n,
            Err(Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e),
        }
    };
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| OsString::from_vec(s.to_vec()))
        .collect())
}

fn xattr_get_path(path: &CStr, follow: bool, name: &CStr) -> Result<Vec<u8>> {
    xattr_value(|buf| match follow {
        true => rustix::fs::getxattr(path, name, buf),
        false => rustix::fs::lgetxattr(path, name, buf),
    })
}

fn xattr_list_path(path: &CStr, follow: bool) -> Result<Vec<OsString>> {
    xattr_names(|buf| match follow {
        true => rustix::fs::listxattr(path, buf),
        false => rustix::fs::llistxattr(path, buf),
    })
}

/// `.`: a directory fd's own inode, for the `*xattrat` calls (ENOTDIR on other fds).
const DOT: &CStr = c".";

/// An xattr call on an fd's own inode: the `*xattrat(fd, ".")` answer `at` where it has one,
/// else (not a directory, or no `*xattrat` here) the `f*` call, which a file opened for I/O
/// answers, else (EBADF: an `O_PATH` fd) the call on its `/proc/self/fd/N` path.
fn on_fd<T>(
    at: Option<Result<T>>,
    f: impl FnOnce() -> Result<T>,
    proc_path: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match at {
        Some(Err(Errno::NOTDIR)) | None => match f() {
            Err(Errno::BADF) => proc_path(),
            r => r,
        },
        Some(r) => r,
    }
}

impl Sys {
    /// Run `call` (a `*xattrat` call) where those work, learning from the first call whether
    /// they do; `None`: they do not here (the caller takes the /proc path).
    fn xattrat<T>(&self, call: impl FnOnce() -> Result<T>) -> Option<Result<T>> {
        let known = self.xattrat.load(Ordering::Relaxed);
        if known == XATTRAT_NO || self.compat.kernel_4_18 {
            return None;
        }
        match call() {
            Err(Errno::NOSYS) | Err(Errno::PERM) if known == XATTRAT_UNKNOWN => {
                self.xattrat.store(XATTRAT_NO, Ordering::Relaxed);
                None
            }
            Err(Errno::NOSYS) => None,
            r => {
                if known == XATTRAT_UNKNOWN && r.is_ok() {
                    self.xattrat.store(XATTRAT_YES, Ordering::Relaxed);
                }
                Some(r)
            }
        }
    }

    /// xattr `name` of `path` in `dir` (`.`: `dir` itself), no symlink followed.
    fn getxattrat(&self, dir: BorrowedFd<'_>, path: &CStr, name: &CStr) -> Option<Result<Vec<u8>>> {
        let nofollow = libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
        self.xattrat(|| xattr_value(|buf| getxattrat_raw(dir, path, nofollow, name, buf)))
    }

    fn listxattrat(&self, dir: BorrowedFd<'_>, path: &CStr) -> Option<Result<Vec<OsString>>> {
        let nofollow = libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
        self.xattrat(|| xattr_names(|buf| listxattrat_raw(dir, path, nofollow, buf)))
    }

    fn setxattrat(
        &self,
        dir: BorrowedFd<'_>,
        path: &CStr,
        name: &CStr,
        value: &[u8],
        flags: i32,
    ) -> Option<Result<()>> {
        let nofollow = libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
        self.xattrat(|| setxattrat_raw(dir, path, nofollow, name, value, flags as u32))
    }

    fn removexattrat(&self, dir: BorrowedFd<'_>, path: &CStr, name: &CStr) -> Option<Result<()>> {
        let nofollow = libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
        self.xattrat(|| removexattrat_raw(dir, path, nofollow, name))
    }
}

impl Sys {
    pub fn fgetxattr(&self, fd: BorrowedFd<'_>, name: &OsStr) -> Result<Vec<u8>> {
        self.faults.check("getxattr")?;
        let cname = c(name)?;
        on_fd(
            self.getxattrat(fd, DOT, &cname),
            || xattr_value(|buf| rustix::fs::fgetxattr(fd, &cname, buf)),
            || xattr_get_path(&proc_fd_path(fd), true, &cname),
        )
    }

    pub fn flistxattr(&self, fd: BorrowedFd<'_>) -> Result<Vec<OsString>> {
        self.faults.check("listxattr")?;
        on_fd(
            self.listxattrat(fd, DOT),
            || xattr_names(|buf| rustix::fs::flistxattr(fd, buf)),
            || xattr_list_path(&proc_fd_path(fd), true),
        )
    }

    pub fn fsetxattr(
        &self,
        fd: BorrowedFd<'_>,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        self.faults.check("setxattr")?;
        let name = c(name)?;
        let xflags = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
        on_fd(
            self.setxattrat(fd, DOT, &name, value, flags),
            || rustix::fs::fsetxattr(fd, name.as_c_str(), value, xflags),
            || rustix::fs::setxattr(proc_fd_path(fd).as_c_str(), name.as_c_str(), value, xflags),
        )
    }

    pub fn fremovexattr(&self, fd: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        self.faults.check("removexattr")?;
        let name = c(name)?;
        on_fd(
            self.removexattrat(fd, DOT, &name),
            || rustix::fs::fremovexattr(fd, name.as_c_str()),
            || rustix::fs::removexattr(proc_fd_path(fd).as_c_str(), name.as_c_str()),
        )
    }

    pub fn getxattr_at(&self, dir: BorrowedFd<'_>, name: &OsStr, attr: &OsStr) -> Result<Vec<u8>> {
        self.faults.check("getxattr")?;
        let (cname, cattr) = (c(name)?, c(attr)?);
        match self.getxattrat(dir, &cname, &cattr) {
            Some(r) => r,
            None => xattr_get_path(&proc_at_path(dir, name)?, false, &cattr),
        }
    }

    pub fn listxattr_at(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<Vec<OsString>> {
        self.faults.check("listxattr")?;
        match self.listxattrat(dir, &c(name)?) {
            Some(r) => r,
            None => xattr_list_path(&proc_at_path(dir, name)?, false),
        }
    }

    pub fn setxattr_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        attr: &OsStr,
        value: &[u8],
    ) -> Result<()> {
        self.setxattr_at_flags(dir, name, attr, value, 0)
    }

    // ---------------------------------------------------------------- data

    pub fn pread(&self, fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<usize> {
        self.faults.check("read")?;
        rustix::io::pread(fd, buf, off)
    }

    /// Answers FUSE request `unique` on `dev` with up to `len` bytes of `file` at `off`,
    /// moved by splice(2) through `pipe`: the page cache's pages go to the device without a
    /// copy through this process (the device copies them once into the request's pages).
    /// The reply carries what a `pread` would have returned. `len` must fit
    /// [`SplicePipe::fits`]. An error is only a planned fault (as [`Sys::pread`] meets one);
    /// any other failure is [`Spliced::NotSent`], for the caller to answer the copying way.
    pub fn splice_read_reply(
        &self,
        dev: BorrowedFd<'_>,
        pipe: &mut SplicePipe,
        unique: u64,
        file: BorrowedFd<'_>,
        off: u64,
        len: usize,
    ) -> Result<Spliced> {
        self.faults.check("read")?;
        Ok(match pipe.send_read_reply(dev, unique, file, off, len) {
            Ok(0) => Spliced::AtEnd,
            Ok(n) => Spliced::Sent(n),
            Err(e) => {
                pipe.broken = true;
                tracing::debug!(error = %e, "splice read reply not sent");
                Spliced::NotSent
            }
        })
    }

    pub fn pwrite(&self, fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> Result<usize> {
        self.faults.check("write")?;
        rustix::io::pwrite(fd, buf, off)
    }

    pub fn ftruncate(&self, fd: BorrowedFd<'_>, size: u64) -> Result<()> {
        self.faults.check("truncate")?;
        rustix::fs::ftruncate(fd, size)
    }

    pub fn fsync(&self, fd: BorrowedFd<'_>, datasync: bool) -> Result<()> {
        self.faults.check("fsync")?;
        if datasync {
            rustix::fs::fdatasync(fd)
        } else {
            rustix::fs::fsync(fd)
        }
    }

    pub fn fallocate(&self, fd: BorrowedFd<'_>, mode: i32, off: u64, len: u64) -> Result<()> {
        self.faults.check("fallocate")?;
        rustix::fs::fallocate(
            fd,
            rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
            off,
            len,
        )
    }
}

pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: i32) -> Result<u64> {
    let pos = match whence {
        libc::SEEK_SET => rustix::fs::SeekFrom::Start(off as u64),
        libc::SEEK_CUR => rustix::fs::SeekFrom::Current(off),
        libc::SEEK_END => rustix::fs::SeekFrom::End(off),
        libc::SEEK_DATA => rustix::fs::SeekFrom::Data(off as u64),
        libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(off as u64),
        _ => return Err(Errno::INVAL),
    };
    rustix::fs::seek(fd, pos)
}

impl Sys {
    pub fn copy_file_range(
        &self,
        fd_in: BorrowedFd<'_>,
        off_in: &mut u64,
        fd_out: BorrowedFd<'_>,
        off_out: &mut u64,
        len: usize,
    ) -> Result<usize> {
        self.faults.check("copy_file_range")?;
        if self.compat.kernel_4_18 {
            // Before 5.3 copy_file_range worked only within one filesystem.
            let (a, b) = (self.fstat(fd_in)?, self.fstat(fd_out)?);
            if a.st_dev != b.st_dev {
                return Err(Errno::XDEV);
            }
        }
        rustix::fs::copy_file_range(fd_in, Some(off_in), fd_out, Some(off_out), len)
    }

    pub fn ficlone(&self, dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> Result<()> {
        self.faults.check("ficlone")?;
        rustix::fs::ioctl_ficlone(dst, src)
    }
}

// ---------------------------------------------------------------- process

/// Raise RLIMIT_NOFILE as far as allowed: the hard limit up to `fs.nr_open` where permitted
/// (root), then the soft limit to the hard one.
pub fn raise_nofile_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let nr_open = read_small("/proc/sys/fs/nr_open").and_then(|s| s.trim().parse::<u64>().ok());
    if let (Some(nr), Some(max)) = (nr_open, lim.maximum) {
        if nr > max {
            let _ = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(nr),
                    maximum: Some(nr),
                },
            );
        }
    }
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
}

/// Grow this process's descriptor table to `n` slots now (a copy of `any` opened at slot
/// `n - 1` and closed again), where RLIMIT_NOFILE allows. The kernel grows a table by
/// doubling it, and in a process with more than one thread each growth waits for an RCU
/// grace period (`synchronize_rcu` in `expand_fdtable`): a daemon that holds a copy-up's fd
/// until it is synced grew from 256 to 2,048 slots during a `chmod -R` of 1,350 lower files,
/// and its `openat` calls took ~50 ms longer in all. Call while single-threaded, after any
/// fork (a child gets a table sized to the descriptors open, not the parent's).
pub fn reserve_fds(any: BorrowedFd<'_>, n: u32) {
    if n > 0 && u64::from(n) <= nofile_limit() {
        // Closed at once: only the table's size stays.
        let _ = rustix::io::fcntl_dupfd_cloexec(any, (n - 1) as _);
    }
}

/// Clear the process umask: the modes of new entries come from the caller (the kernel has
/// already applied the caller's umask to them), never from this process's own umask.
pub fn clear_umask() {
    rustix::process::umask(rustix::fs::Mode::empty());
}

impl Sys {
    /// A stable identity of the filesystem `fd` is on: statfs's `f_fsid` (ext4, btrfs and xfs
    /// derive it from the filesystem's UUID or device), else its device number.
    pub fn fs_id(&self, fd: BorrowedFd<'_>) -> Result<u64> {
        let s = fstatfs(fd)?;
        // SAFETY: fsid_t is `#[repr(C)] struct { __val: [c_int; 2] }`, 8 bytes with no padding and
        // no invalid bit patterns; the crate keeps the field private, so it is read as its bytes.
        let val: [i32; 2] = unsafe { std::mem::transmute(s.f_fsid) };
        let id = ((val[0] as u32 as u64) << 32) | val[1] as u32 as u64;
        if id != 0 {
            return Ok(id);
        }
        Ok(self.fstat(fd)?.st_dev)
    }
}

/// What writes the metadata of the filesystem `fd` is on to disk in the order it was
/// changed (a journal, copy-on-write transactions, checkpoints), so that after a power cut a
/// change is only there if every change made before it is there too, or why that is not
/// so or cannot be told. `statfs`'s filesystem type; for ext2/3/4 whether it has a journal:
/// jbd2 lists each journal in `/proc/fs/jbd2/` as `DEVICE-INODE`, and the device's name is
/// the target of `/sys/dev/block/MAJOR:MINOR`.
pub fn metadata_order(fd: BorrowedFd<'_>) -> std::result::Result<&'static str, String> {
    const EXT: u64 = 0xef53;
    const XFS: u64 = 0x5846_5342;
    const BTRFS: u64 = 0x9123_683e;
    const BCACHEFS: u64 = 0xca45_1a4e;
    const F2FS: u64 = 0xf2f5_2010;
    const ZFS: u64 = 0x2fc1_2fc1;
    const TMPFS: u64 = 0x0102_1994;
    const RAMFS: u64 = 0x8584_58f6;
    let st = fstatfs(fd).map_err(|e| format!("statfs failed: {e}"))?;
    match st.f_type as u64 & 0xffff_ffff {
        XFS => Ok("xfs's log"),
        BTRFS => Ok("btrfs's transactions"),
        BCACHEFS => Ok("bcachefs's journal"),
        F2FS => Ok("f2fs's checkpoints"),
        ZFS => Ok("zfs's transaction groups"),
        TMPFS | RAMFS => Ok("nothing on it outlives a power cut"),
        EXT => {
            let dev = rustix::fs::fstat(fd)
                .map_err(|e| format!("stat failed: {e}"))?
                .st_dev;
            let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
            let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
                .map_err(|e| {
                    format!("an ext2/3/4 whose journal cannot be found (/sys/dev/block/{major}:{minor}: {e})")
                })?;
            let name = link.file_name().unwrap_or_default().to_string_lossy();
            let prefix = format!("{name}-");
            let journaled = std::fs::read_dir("/proc/fs/jbd2")
                .map(|d| {
                    d.flatten().any(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_prefix(&prefix))
                            .is_some_and(|ino| {
                                !ino.is_empty() && ino.bytes().all(|b| b.is_ascii_digit())
                            })
                    })
                })
                .unwrap_or(false);
            if journaled {
                Ok("ext4's journal")
            } else {
                Err(format!(
                    "an ext2/3/4 without a journal (no {name}-* in /proc/fs/jbd2)"
                ))
            }
        }
        other => Err(format!("a filesystem of type {other:#x}")),
    }
}

/// The soft RLIMIT_NOFILE.
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20)
}

pub fn geteuid() -> u32 {
    rustix::process::geteuid().as_raw()
}

pub fn getegid() -> u32 {
    rustix::process::getegid().as_raw()
}

/// What `fork` returned.
pub enum Forked {
    Parent { child: i32 },
    Child,
}

/// Fork the process. Call only while the process has a single thread.
pub fn fork() -> Result<Forked> {
    // SAFETY: fork has no memory-safety preconditions in a single-threaded process, which is
    // the only place the daemon calls it (before any thread is started); the child only
    // continues running ordinary Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        )),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
}

pub fn setsid() -> Result<()> {
    rustix::process::setsid().map(|_| ())
}

/// Point stdin, stdout and stderr at /dev/null (a daemon must not hold its caller's pipes).
pub fn detach_stdio() -> Result<()> {
    let null = rustix::fs::open("/dev/null", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(&null)?;
    rustix::stdio::dup2_stderr(&null)?;
    Ok(())
}

/// Take ownership of an inherited fd number (`/dev/fd/N` mountpoints from mount.fuse3).
pub fn own_fd(raw: RawFd) -> Result<OwnedFd> {
    let borrowed_ok = rustix::io::fcntl_getfd(
        // SAFETY: the fd number is only probed with F_GETFD, which is harmless on any number;
        // the borrow does not outlive this call.
        unsafe { BorrowedFd::borrow_raw(raw) },
    );
    borrowed_ok?;
    // SAFETY: F_GETFD succeeded, so `raw` is an open fd; the caller was handed it on the
    // command line as the one fd it owns (mount.fuse3's /dev/fd/N convention).
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// A borrowed fd that lives as long as the owner.
pub fn borrow<F: AsFd>(f: &F) -> BorrowedFd<'_> {
    f.as_fd()
}

// ---------------------------------------------------------------- read replies by splice

/// What [`Sys::splice_read_reply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spliced {
    /// The reply went with this many bytes (fewer than asked: the file ends there).
    Sent(usize),
    /// The offset is at or past the end of the file: nothing was sent.
    AtEnd,
    /// Nothing was sent (the file cannot be spliced, a pipe or device error); the pipes are
    /// [`SplicePipe::broken`].
    NotSent,
}

/// The two pipes that carry FUSE read replies from a file to the device: see
/// [`Sys::splice_read_reply`].
#[derive(Debug)]
pub struct SplicePipe {
    /// The file's pages, as spliced from it.
    data: (OwnedFd, OwnedFd),
    /// The reply: its header, then the data moved in behind it.
    reply: (OwnedFd, OwnedFd),
    /// Pages the smaller pipe holds (one per buffer).
    slots: usize,
    broken: bool,
}

impl SplicePipe {
    /// Pipes with room for a reply of `bytes`, or as close to it as this user may have
    /// (`/proc/sys/fs/pipe-max-size` bounds an unprivileged user; [`SplicePipe::fits`] tells
    /// which replies they can carry).
    pub fn new(bytes: usize) -> Result<SplicePipe> {
        let data = SplicePipe::pipe_sized(bytes)?;
        let reply = SplicePipe::pipe_sized(bytes)?;
        let slots = rustix::pipe::fcntl_getpipe_size(&data.1)?
            .min(rustix::pipe::fcntl_getpipe_size(&reply.1)?)
            / page_size();
        Ok(SplicePipe {
            data,
            reply,
            slots,
            broken: false,
        })
    }

    fn pipe_sized(bytes: usize) -> Result<(OwnedFd, OwnedFd)> {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        // Refused (over this user's limits): the pipe keeps the size it has.
        let _ = rustix::pipe::fcntl_setpipe_size(&w, bytes);
        Ok((r, w))
    }

    /// Whether a reply of `len` bytes of a file at `off` fits: one buffer per page the range
    /// touches, and one more for the header.
    pub fn fits(&self, off: u64, len: usize) -> bool {
        let page = page_size();
        let first = (off % page as u64) as usize;
        (first + len).div_ceil(page) < self.slots
    }

    /// Whether the pipes may hold part of a reply that was not sent: drop them.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// [`Sys::splice_read_reply`]'s work: the bytes sent (0: none, the file ends before `off`).
    /// The data goes into its own pipe first, so that the header, written next into the reply
    /// pipe, names the length the file gave; the data's buffers then move behind it (between
    /// pipes by reference, no copy).
    fn send_read_reply(
        &self,
        dev: BorrowedFd<'_>,
        unique: u64,
        file: BorrowedFd<'_>,
        off: u64,
        len: usize,
    ) -> Result<usize> {
        let mut o = off;
        let n = splice_up_to(file, Some(&mut o), self.data.1.as_fd(), len)?;
        if n == 0 {
            return Ok(0);
        }
        write_all(self.reply.1.as_fd(), &fuse_out_header(unique, n))?;
        if splice_up_to(self.data.0.as_fd(), None, self.reply.1.as_fd(), n)? < n {
            return Err(Errno::IO);
        }
        // The device takes a reply in one write or not at all: one call, never a second one
        // that it would read as another reply.
        let all = FUSE_OUT_HEADER + n;
        let sent = loop {
            use rustix::pipe::{SpliceFlags, splice};
            match splice(&self.reply.0, None, dev, None, all, SpliceFlags::NONBLOCK) {
                Err(Errno::INTR) => {}
                r => break r?,
            }
        };
        if sent < all {
            return Err(Errno::IO);
        }
        Ok(n)
    }
}

fn page_size() -> usize {
    rustix::param::page_size()
}

/// The size of `struct fuse_out_header` (len, error, unique).
const FUSE_OUT_HEADER: usize = 16;

fn fuse_out_header(unique: u64, payload: usize) -> [u8; FUSE_OUT_HEADER] {
    let mut h = [0u8; FUSE_OUT_HEADER];
    h[0..4].copy_from_slice(&((FUSE_OUT_HEADER + payload) as u32).to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// Splices from `from` (at `off`, a file; or a pipe) into pipe `to` until `len` bytes went or
/// `from` has no more (the end of a file); the bytes that went. NONBLOCK concerns pipes only
/// (they have room for all of `len`): a file is read as read(2) reads it, waiting for the
/// disk.
fn splice_up_to(
    from: BorrowedFd<'_>,
    mut off: Option<&mut u64>,
    to: BorrowedFd<'_>,
    len: usize,
) -> Result<usize> {
    use rustix::pipe::{SpliceFlags, splice};
    let mut n = 0;
    while n < len {
        match splice(
            from,
            off.as_deref_mut(),
            to,
            None,
            len - n,
            SpliceFlags::NONBLOCK,
        ) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match rustix::io::write(fd, buf) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => buf = &buf[n..],
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- mounting

/// Open `/dev/fuse` for a new connection.
pub fn open_dev_fuse() -> Result<OwnedFd> {
    rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
}

/// What a FUSE device's input queue holds now (a poll(2) that does not wait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuseQueue {
    /// At least one request waits to be read.
    Waiting,
    /// Nothing waits.
    Empty,
    /// The connection has ended (unmounted or aborted): reads answer ENODEV.
    Gone,
}

/// `/proc/loadavg`, open: how many tasks are runnable on the whole machine.
pub struct Loadavg(OwnedFd);

impl Loadavg {
    /// Opened once (a pacer keeps it for its session); none where it cannot be.
    pub fn open() -> Option<Loadavg> {
        rustix::fs::open(
            "/proc/loadavg",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .map(Loadavg)
    }

    /// Tasks runnable right now, the caller included (the fourth field, `RUNNABLE/TOTAL`);
    /// none where it cannot be read.
    pub fn runnable(&self) -> Option<u32> {
        let mut buf = [0u8; 128];
        let n = rustix::io::pread(&self.0, &mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        text.split_ascii_whitespace()
            .nth(3)?
            .split_once('/')?
            .0
            .parse()
            .ok()
    }
}

/// Look at a FUSE device's input queue without reading from it or waiting.
pub fn fuse_queue(dev: BorrowedFd<'_>) -> FuseQueue {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(&dev, PollFlags::IN)];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Err(_) => FuseQueue::Empty,
        Ok(_) => {
            let r = fds[0].revents();
            if r.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
                FuseQueue::Gone
            } else if r.contains(PollFlags::IN) {
                FuseQueue::Waiting
            } else {
                FuseQueue::Empty
            }
        }
    }
}

/// mount(2) a FUSE filesystem. `fstype` is `fuse.NAME`; `data` carries `fd=N,...`.
pub fn mount_fuse(
    source: &str,
    target: &std::path::Path,
    fstype: &str,
    flags: rustix::mount::MountFlags,
    data: &str,
) -> Result<()> {
    let data = CString::new(data).map_err(|_| Errno::INVAL)?;
    rustix::mount::mount(source, target, fstype, flags, Some(data.as_c_str()))
}

/// The mode of a directory (FUSE's `rootmode=`).
pub fn mode_of(path: &std::path::Path) -> Result<u32> {
    Ok(rustix::fs::stat(path)?.st_mode)
}

pub fn getuid() -> u32 {
    rustix::process::getuid().as_raw()
}

pub fn getgid() -> u32 {
    rustix::process::getgid().as_raw()
}

// ---------------------------------------------------------------- by (directory, name)

impl Sys {
    pub fn removexattr_at(&self, dir: BorrowedFd<'_>, name: &OsStr, attr: &OsStr) -> Result<()> {
        self.faults.check("removexattr")?;
        let attr = c(attr)?;
        match self.removexattrat(dir, &c(name)?, &attr) {
            Some(r) => r,
            None => rustix::fs::lremovexattr(proc_at_path(dir, name)?.as_c_str(), attr.as_c_str()),
        }
    }

    pub fn setxattr_at_flags(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        attr: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        self.faults.check("setxattr")?;
        let attr = c(attr)?;
        match self.setxattrat(dir, &c(name)?, &attr, value, flags) {
            Some(r) => r,
            None => rustix::fs::lsetxattr(
                proc_at_path(dir, name)?.as_c_str(),
                attr.as_c_str(),
                value,
                rustix::fs::XattrFlags::from_bits_retain(flags as u32),
            ),
        }
    }

    /// chown of `name` in `dir`, not following a symlink.
    pub fn chown_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        self.faults.check("chown")?;
        rustix::fs::chownat(
            dir,
            name,
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    /// chmod of `name` in `dir` (callers never pass a symlink).
    pub fn chmod_at(&self, dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
        self.faults.check("chmod")?;
        rustix::fs::chmodat(
            dir,
            name,
            Mode::from_raw_mode(mode),
            rustix::fs::AtFlags::empty(),
        )
    }

    /// Hard-link `name` in `dir` to `new` in `new_dir` (a symlink itself, not its target).
    pub fn link_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        new_dir: BorrowedFd<'_>,
        new: &OsStr,
    ) -> Result<()> {
        self.faults.check("link")?;
        rustix::fs::linkat(dir, name, new_dir, new, rustix::fs::AtFlags::empty())
    }
}

/// Allocations of at least this size get their own mapping: above every buffer the daemon
/// uses again and again (a read of at most 1 MiB), below fuser's 16 MiB request buffers.
const MMAP_THRESHOLD: usize = 4 << 20;

/// Sets glibc's allocator up for a daemon that keeps a node per file seen: large
/// allocations get their own mapping at a fixed threshold ([`MMAP_THRESHOLD`]). glibc's
/// default threshold moves up to the size of any mapped block freed (fuser frees a 16 MiB
/// request buffer at start-up), after which each reader thread's 16 MiB buffer comes from
/// the thread's heap, and `calloc` clears the part of it that was already mapped there: ~130
/// KiB of RSS per thread that no request uses. Call before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointers; called before the daemon starts its threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}

/// Hands the memory the allocator holds free back to the kernel (glibc's `malloc_trim`). After
/// the kernel forgets many inodes their nodes are freed, but glibc keeps the pages of a
/// fragmented heap mapped: without this the daemon's RSS stays at its peak.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own free lists, locking each
    // arena; it may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// For tests: threads kept busy on the CPU (runnable all the time) until dropped.
#[cfg(test)]
pub(crate) struct BusyThreads {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

#[cfg(test)]
impl BusyThreads {
    /// `n` busy threads, each on a run queue by the time this returns.
    pub(crate) fn start(n: usize) -> BusyThreads {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = std::sync::Arc::new(std::sync::Barrier::new(n + 1));
        let threads = (0..n)
            .map(|_| {
                let (stop, started) = (stop.clone(), started.clone());
                std::thread::spawn(move || {
                    started.wait();
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        started.wait();
        // A woken thread may reach its CPU's run queue a little later.
        std::thread::sleep(std::time::Duration::from_millis(5));
        BusyThreads { stop, threads }
    }
}

#[cfg(test)]
impl Drop for BusyThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// This process's descriptor table size (`FDSize` of /proc/self/status).
    fn fd_table_size() -> Option<u64> {
        let s = fs::read_to_string("/proc/self/status").ok()?;
        let v = s.lines().find_map(|l| l.strip_prefix("FDSize:"))?;
        v.trim().parse().ok()
    }

    /// The table is grown to the size asked for, within RLIMIT_NOFILE.
    #[test]
    fn the_descriptor_table_is_grown_ahead() {
        let before = fd_table_size().expect("FDSize in /proc/self/status");
        let want = (before * 4).min(nofile_limit()) as u32;
        let null = std::fs::File::open("/dev/null").unwrap();
        reserve_fds(null.as_fd(), want);
        let after = fd_table_size().unwrap();
        assert!(
            after >= u64::from(want),
            "FDSize {before} -> {after}, asked for {want}"
        );
        // Beyond the limit: nothing happens, nothing fails.
        reserve_fds(null.as_fd(), u32::MAX);
    }

    /// Threads busy on the CPU are runnable tasks, the caller too.
    #[test]
    fn loadavg_counts_busy_threads_as_runnable() {
        let busy = BusyThreads::start(4);
        let n = Loadavg::open().and_then(|l| l.runnable());
        drop(busy);
        assert!(n.is_some_and(|n| n >= 5), "runnable: {n:?}");
    }

    /// A read reply by splice is what the FUSE device takes: a header naming the whole length
    /// and the request, then what `pread` returns (here a pipe stands for the device). A reply
    /// cut short by the end of the file says so in its header; at or past the end nothing
    /// goes; a file that cannot be spliced sends nothing and marks the pipe broken; a planned
    /// read fault is the answer, as for `pread`. The pipe serves the next reply after each.
    #[test]
    fn splice_read_replies_carry_what_pread_reads() {
        let p = std::env::temp_dir().join(format!("rustfuse-sys-splice-{}", std::process::id()));
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let file = std::fs::File::open(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        let (dev_r, dev_w) = rustix::pipe::pipe().unwrap();
        rustix::pipe::fcntl_setpipe_size(&dev_w, 1 << 20).unwrap();
        let sys = Sys::default();
        let page = page_size();
        let mut pipe = SplicePipe::new(64 * page).unwrap();
        let take = |n: usize| {
            let mut b = vec![0u8; n];
            read_exact(dev_r.as_fd(), &mut b).unwrap();
            b
        };
        for (unique, off, len, want) in [
            (7u64, 0u64, 16_384usize, Spliced::Sent(16_384)),
            (8, 4_097, 16_384, Spliced::Sent(15_903)),
            (9, 16_384, 16_384, Spliced::Sent(3_616)),
            (10, 20_000, 16_384, Spliced::AtEnd),
            (11, 30_000, 16_384, Spliced::AtEnd),
            (12, 1, 19_999, Spliced::Sent(19_999)),
        ] {
            assert!(pipe.fits(off, len));
            let got = sys
                .splice_read_reply(dev_w.as_fd(), &mut pipe, unique, file.as_fd(), off, len)
                .unwrap();
            assert_eq!(got, want, "read of {len} at {off}");
            assert!(!pipe.broken());
            if let Spliced::Sent(n) = got {
                let h = take(FUSE_OUT_HEADER);
                assert_eq!(h, fuse_out_header(unique, n), "header of the read at {off}");
                let o = off as usize;
                assert!(take(n) == data[o..o + n], "data of the read at {off}");
            }
        }
        assert_eq!(waiting(&dev_r), 0, "nothing more was sent");

        sys.faults().inject("read", 1, Errno::IO);
        let r = sys.splice_read_reply(dev_w.as_fd(), &mut pipe, 13, file.as_fd(), 0, 16_384);
        assert_eq!(r, Err(Errno::IO));
        assert!(!pipe.broken());
        assert_eq!(waiting(&dev_r), 0);

        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let r = sys.splice_read_reply(dev_w.as_fd(), &mut pipe, 14, dir.as_fd(), 0, 16_384);
        assert_eq!(r, Ok(Spliced::NotSent));
        assert!(pipe.broken());
        assert_eq!(waiting(&dev_r), 0);

        // 64 buffers: a header and 63 pages of data, however the data starts.
        assert!(pipe.fits(page as u64 - 1, 62 * page));
        assert!(pipe.fits(0, 63 * page));
        assert!(!pipe.fits(1, 63 * page));
        assert!(!pipe.fits(0, 64 * page));
    }

    fn read_exact(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<()> {
        let mut n = 0;
        while n < buf.len() {
            match rustix::io::read(fd, &mut buf[n..])? {
                0 => return Err(Errno::IO),
                k => n += k,
            }
        }
        Ok(())
    }

    /// Bytes waiting in pipe `r`.
    fn waiting(r: &OwnedFd) -> u64 {
        rustix::io::ioctl_fionread(r).unwrap()
    }

    /// `read_small` reads what `read_to_string` reads: a /proc file generated as it is read,
    /// a file longer than its 4 KiB reads (a uid_map may hold 340 lines), an empty one; a
    /// missing file is none.
    #[test]
    fn read_small_reads_whole_files() {
        let p = std::env::temp_dir().join(format!("rustfuse-sys-read-{}", std::process::id()));
        let long: String = (0..1000).map(|i| format!("{i:>10} {i:>10} 1\n")).collect();
        for text in [long.as_str(), "", "0 0 4294967295\n"] {
            fs::write(&p, text).unwrap();
            assert_eq!(read_small(p.to_str().unwrap()).as_deref(), Some(text));
        }
        fs::remove_file(&p).unwrap();
        assert_eq!(read_small(p.to_str().unwrap()), None);
        let status = read_small("/proc/self/status").unwrap();
        assert!(status.starts_with("Name:") && status.contains("\nCapEff:"));
    }

    /// Where the kernel has the `*xattrat` calls, they read what the /proc paths read (the
    /// 4.18 seam never uses them): values short and long (past the first buffer), absent
    /// ones, names of files, directories, symlinks and of nothing; the fd calls of a
    /// directory and of a file (which falls back to /proc); and what one path sets or
    /// removes, the other sees.
    #[test]
    fn xattrs_read_the_same_through_xattrat_and_proc() {
        let root = std::env::temp_dir().join(format!("rustfuse-sys-xattr-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("f", root.join("l")).unwrap();
        let long = vec![b'v'; 3000];
        let set = |p: &str, n: &str, v: &[u8]| {
            rustix::fs::setxattr(root.join(p), n, v, rustix::fs::XattrFlags::empty()).unwrap()
        };
        set("f", "user.t", b"short");
        set("f", "user.u", b"");
        set("d", "user.t", &long);
        let fast = Sys::new(Compat::native());
        let slow = Sys::new(Compat::kernel_4_18());
        let dir = fast.open_dir_path(&root).unwrap();
        let dir = dir.as_fd();
        for name in ["f", "d", "l", "missing"] {
            let name = OsStr::new(name);
            for attr in ["user.t", "user.u", "user.none"] {
                let attr = OsStr::new(attr);
                assert_eq!(
                    fast.getxattr_at(dir, name, attr),
                    slow.getxattr_at(dir, name, attr),
                    "{name:?} {attr:?}"
                );
            }
            assert_eq!(
                fast.listxattr_at(dir, name),
                slow.listxattr_at(dir, name),
                "{name:?}"
            );
        }
        assert_eq!(
            fast.getxattr_at(dir, OsStr::new("d"), OsStr::new("user.t")),
            Ok(long.clone())
        );
        for name in ["d", "f"] {
            let fd = fast.open_path_at(dir, OsStr::new(name)).unwrap();
            let attr = OsStr::new("user.t");
            assert_eq!(
                fast.fgetxattr(fd.as_fd(), attr),
                slow.fgetxattr(fd.as_fd(), attr)
            );
            assert_eq!(fast.flistxattr(fd.as_fd()), slow.flistxattr(fd.as_fd()));
        }
        // Setting and removing: what one path writes, the other reads.
        let (f, d) = (OsStr::new("f"), OsStr::new("d"));
        let w = OsStr::new("user.w");
        for (by, other) in [(&fast, &slow), (&slow, &fast)] {
            by.setxattr_at_flags(dir, f, w, b"1", 0).unwrap();
            assert_eq!(other.getxattr_at(dir, f, w), Ok(b"1".to_vec()));
            assert_eq!(
                by.setxattr_at_flags(dir, f, w, b"2", libc::XATTR_CREATE),
                Err(Errno::EXIST)
            );
            by.removexattr_at(dir, f, w).unwrap();
            assert_eq!(other.getxattr_at(dir, f, w), Err(Errno::NODATA));
            assert_eq!(by.removexattr_at(dir, f, w), Err(Errno::NODATA));
            let dfd = by.open_path_at(dir, d).unwrap();
            by.fsetxattr(dfd.as_fd(), w, b"3", 0).unwrap();
            assert_eq!(other.getxattr_at(dir, d, w), Ok(b"3".to_vec()));
            by.fremovexattr(dfd.as_fd(), w).unwrap();
            assert_eq!(other.fgetxattr(dfd.as_fd(), w), Err(Errno::NODATA));
        }
        assert_eq!(slow.xattrat.load(Ordering::Relaxed), XATTRAT_UNKNOWN);
        let _ = fs::remove_dir_all(&root);
    }
}
