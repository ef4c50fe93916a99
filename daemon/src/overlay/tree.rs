//! Tree helpers of the upper layer and the workdir: whiteouts (both kinds), opaque marks,
//! temporary names, removing an entry or a whole tree. A leaf: it knows directories, names
//! and the kernel-call seam, nothing of nodes, copy-up or the write path, so the write path
//! and copy-up both use it and neither depends on the other for it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;

use super::loc::DirHandle;
use super::{Errno, Kind, Result};
use crate::sys::{self, OFlags, Sys};

/// The file that marks a directory opaque where xattrs cannot (fuse-overlayfs's name).
pub(crate) const OPAQUE_FILE: &str = ".wh..wh..opq";
/// The prefix of a `.wh.NAME` whiteout file.
pub(crate) const WH_PREFIX: &[u8] = b".wh.";

/// A directory's upper part, ready for use: its handle and an fd.
pub(crate) struct UpperDir {
    pub h: Arc<DirHandle>,
    pub fd: Arc<OwnedFd>,
}

impl AsFd for UpperDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `.wh.NAME`: the whiteout file of `name`.
pub(crate) fn wh_name(name: &OsStr) -> OsString {
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// Does `.wh.NAME` exist in `dir`?
pub(crate) fn wh_file_exists(sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr) -> bool {
    sys.stat_at(dir, &wh_name(name)).is_ok()
}

/// Make `.wh.NAME` in `dir`; false if it was there already.
pub(crate) fn new_wh_file(sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr) -> Result<bool> {
    match sys.open_at(
        dir,
        &wh_name(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        0o700,
    ) {
        Ok(_) => Ok(true),
        Err(Errno::EXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Write a whiteout for `name` in `dir`: a 0/0 character device if `dev_whiteouts`, else a
/// `.wh.NAME` file.
pub(crate) fn make_whiteout(
    sys: &Sys,
    dev_whiteouts: bool,
    dir: BorrowedFd<'_>,
    name: &OsStr,
) -> Result<()> {
    if dev_whiteouts {
        sys.mknod_at(dir, name, libc::S_IFCHR, 0)
    } else {
        new_wh_file(sys, dir, name).map(drop)
    }
}

/// Mark directory `name` in `dir` opaque the way fuse-overlayfs does.
pub(crate) fn set_opaque(sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    match sys.setxattr_at(dir, name, OsStr::new("trusted.overlay.opaque"), b"y") {
        Ok(()) => Ok(()),
        Err(Errno::PERM) => {
            let _ = sys.setxattr_at(dir, name, OsStr::new("user.fuseoverlayfs.opaque"), b"y");
            opaque_file(sys, dir, name)
        }
        Err(Errno::NOTSUP) => opaque_file(sys, dir, name),
        Err(e) => Err(e),
    }
}

fn opaque_file(sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let d = sys.open_path_at(dir, name)?;
    sys.open_at(
        d.as_fd(),
        OsStr::new(OPAQUE_FILE),
        OFlags::WRONLY | OFlags::CREATE,
        0o700,
    )
    .map(drop)
}

/// The `n`th temporary name of this process (`#PID-N`, hex), for entries built in the
/// workdir before they appear.
pub(crate) fn tmp_name(n: u64) -> OsString {
    OsString::from(format!("#{:x}-{n:x}", std::process::id()))
}

/// Call `f` with each name in a directory (not `.` and `..`) and its type as the listing
/// gives it (`Unknown` where the filesystem does not say).
pub(crate) fn each_entry(
    sys: &Sys,
    dir: BorrowedFd<'_>,
    mut f: impl FnMut(&[u8], sys::FileType),
) -> Result<()> {
    let mut stream = sys.open_dir_stream(dir)?;
    while let Some(ent) = stream.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            f(n, ent.file_type());
        }
    }
    Ok(())
}

/// The names in a directory and their types (see [`each_entry`]).
pub(crate) fn list(sys: &Sys, dir: BorrowedFd<'_>) -> Result<Vec<(OsString, sys::FileType)>> {
    let mut names = Vec::new();
    each_entry(sys, dir, |n, ft| {
        names.push((OsStr::from_bytes(n).to_os_string(), ft))
    })?;
    Ok(names)
}

/// Remove everything inside a directory (not the directory itself).
pub(crate) fn remove_tree_contents(sys: &Sys, dir: BorrowedFd<'_>) -> Result<()> {
    for (n, ft) in list(sys, dir)? {
        if ft == sys::FileType::Directory {
            let sub = sys.open_path_at(dir, &n)?;
            remove_tree_contents(sys, sub.as_fd())?;
            sys.rmdir_at(dir, &n)?;
        } else {
            match sys.unlink_at(dir, &n) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR) => {
                    let sub = sys.open_path_at(dir, &n)?;
                    remove_tree_contents(sys, sub.as_fd())?;
                    sys.rmdir_at(dir, &n)?;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Remove `name` from `dir`: a directory with everything in it, anything else unlinked.
pub(crate) fn remove_any(sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr, kind: Kind) -> Result<()> {
    if kind == Kind::Dir {
        if let Ok(fd) = sys.open_path_at(dir, name) {
            remove_tree_contents(sys, fd.as_fd())?;
        }
        sys.rmdir_at(dir, name)
    } else {
        sys.unlink_at(dir, name)
    }
}
