//! Where a layer file is: an `O_PATH` fd (directories, and files whose name is gone), or a
//! directory fd and a name (every other file). Files hold no descriptor of their own, so a
//! mount of millions of files needs descriptors only for the directories in use.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::Result;
use crate::sys::{self, Errno, OFlags, Stat, Timespec};

#[derive(Clone)]
pub enum Loc {
    Fd(Arc<OwnedFd>),
    At(Arc<OwnedFd>, OsString),
}

impl Loc {
    /// The directory handle of a directory's location.
    pub fn dir(&self) -> Result<&Arc<OwnedFd>> {
        match self {
            Loc::Fd(fd) => Ok(fd),
            Loc::At(..) => Err(Errno::NOTDIR),
        }
    }

    pub fn stat(&self) -> Result<Stat> {
        match self {
            Loc::Fd(fd) => sys::fstat(fd.as_fd()),
            Loc::At(d, n) => sys::stat_at(d.as_fd(), n),
        }
    }

    /// Open for I/O (never following a final symlink).
    pub fn open(&self, flags: OFlags) -> Result<OwnedFd> {
        match self {
            Loc::Fd(fd) => sys::reopen(fd.as_fd(), flags),
            Loc::At(d, n) => sys::open_at(
                d.as_fd(),
                n,
                flags & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY),
                0,
            ),
        }
    }

    /// An `O_PATH` fd, for a file about to lose the name it is reached by.
    pub fn pin(&self) -> Result<Loc> {
        match self {
            Loc::Fd(_) => Ok(self.clone()),
            Loc::At(d, n) => Ok(Loc::Fd(Arc::new(sys::open_path_at(d.as_fd(), n)?))),
        }
    }

    pub fn readlink(&self) -> Result<OsString> {
        match self {
            Loc::Fd(fd) => sys::readlink_fd(fd.as_fd()),
            Loc::At(d, n) => sys::readlink_at(d.as_fd(), n),
        }
    }

    pub fn getxattr(&self, attr: &OsStr) -> Result<Vec<u8>> {
        match self {
            Loc::Fd(fd) => sys::fgetxattr(fd.as_fd(), attr),
            Loc::At(d, n) => sys::getxattr_at(d.as_fd(), n, attr),
        }
    }

    pub fn listxattr(&self) -> Result<Vec<OsString>> {
        match self {
            Loc::Fd(fd) => sys::flistxattr(fd.as_fd()),
            Loc::At(d, n) => sys::listxattr_at(d.as_fd(), n),
        }
    }

    pub fn setxattr(&self, attr: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys::fsetxattr(fd.as_fd(), attr, value, flags),
            Loc::At(d, n) => sys::setxattr_at_flags(d.as_fd(), n, attr, value, flags),
        }
    }

    pub fn removexattr(&self, attr: &OsStr) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys::fremovexattr(fd.as_fd(), attr),
            Loc::At(d, n) => sys::removexattr_at(d.as_fd(), n, attr),
        }
    }

    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys::fchown(fd.as_fd(), uid, gid),
            Loc::At(d, n) => sys::chown_at(d.as_fd(), n, uid, gid),
        }
    }

    /// Not for symlinks.
    pub fn chmod(&self, mode: u32) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys::fchmod(fd.as_fd(), mode),
            Loc::At(d, n) => sys::chmod_at(d.as_fd(), n, mode),
        }
    }

    /// Set times; a symlink's own times where it is reached by name.
    pub fn utimens(&self, atime: Timespec, mtime: Timespec) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys::futimens(fd.as_fd(), atime, mtime),
            Loc::At(d, n) => sys::utimens_at(d.as_fd(), n, atime, mtime),
        }
    }

    /// Hard-link this file to `name` in `dir`.
    pub fn link_to(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        match self {
            Loc::Fd(fd) => sys::link_fd(fd.as_fd(), dir, name),
            Loc::At(d, n) => sys::link_at(d.as_fd(), n, dir, name),
        }
    }
}
