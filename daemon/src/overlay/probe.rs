//! The layer probe: what one layer directory says about one name. It is the rule at the
//! heart of the overlay, written once: every walk across the layers (lookup, the data of a
//! metacopy, "is the name visible below", the write path's look at the upper layer) asks it,
//! once per layer, and acts on its typed answer. A leaf: it knows the kernel-call seam and
//! the whiteout conventions, nothing of nodes or the write path.

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use super::tree::{self, OPAQUE_FILE};
use super::{Errno, Result};
use super::{OPAQUE_XATTRS, ORIGIN_XATTR, ORIGIN_XATTR_TRUSTED, REDIRECT_XATTRS};
use crate::sys::{Stat, Sys};

/// What a layer directory says about a name.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Probe {
    /// A real entry (not a whiteout), with its `fstatat` attributes.
    Entry(Stat),
    /// The name is deleted in this layer and hides it in the layers below.
    Whiteout(Whiteout),
    /// Nothing here: the layers below decide.
    Absent,
    /// The directory is not a directory in this layer (ENOTDIR on the way).
    NotDir,
}

/// The two ways a layer marks a name deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Whiteout {
    /// A 0/0 character device at the name (kernel overlayfs's format).
    Dev,
    /// A `.wh.NAME` file next to it (fuse-overlayfs's format where mknod is refused).
    File,
}

/// Of lower layers 0..64 (bit = the layer's index): which list the name itself (any type,
/// whiteouts included) and which list `.wh.NAME`. A layer in neither answers ENOENT to both
/// probes of a lookup, so the lookup skips it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LowerHint {
    pub present: u64,
    pub wh: u64,
}

/// Is `st` a whiteout device (a 0/0 character device)?
pub(crate) fn is_whiteout(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// What directory `dir` of a layer says about `name`: `fstatat(NOFOLLOW)` of the name, and
/// only when that finds nothing, of `.wh.NAME`. Other errors are returned as they are.
pub(crate) fn probe(sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr) -> Result<Probe> {
    match sys.stat_at(dir, name) {
        Ok(st) if is_whiteout(&st) => Ok(Probe::Whiteout(Whiteout::Dev)),
        Ok(st) => Ok(Probe::Entry(st)),
        Err(Errno::NOENT) => match tree::wh_file_exists(sys, dir, name) {
            true => Ok(Probe::Whiteout(Whiteout::File)),
            false => Ok(Probe::Absent),
        },
        Err(Errno::NOTDIR) => Ok(Probe::NotDir),
        Err(e) => Err(e),
    }
}

/// [`probe`] of lower layer `layer`; with a `hint` (from a listing of the same directory),
/// a layer that lists neither the name nor its `.wh.` file answers without a syscall what
/// the probe would find there (lower layers never change).
pub(crate) fn probe_lower(
    sys: &Sys,
    layer: u16,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    hint: Option<&LowerHint>,
) -> Result<Probe> {
    if let Some(h) = hint.filter(|_| layer < 64) {
        let bit = 1u64 << layer;
        if h.present & bit == 0 {
            return Ok(match h.wh & bit != 0 {
                true => Probe::Whiteout(Whiteout::File),
                false => Probe::Absent,
            });
        }
    }
    probe(sys, dir, name)
}

/// The inode number an upper file was copied up from, from its xattr names (`names`, one
/// listxattr) and a getter of one xattr's value: none when it has no origin mark.
pub(crate) fn origin(
    names: &[OsString],
    get: impl FnOnce(&OsStr) -> Result<Vec<u8>>,
) -> Option<u64> {
    // In the order copy-up tries to write them (the first one permitted is written).
    let name = [ORIGIN_XATTR_TRUSTED, ORIGIN_XATTR]
        .into_iter()
        .find(|o| names.iter().any(|n| n.as_bytes() == o.as_bytes()))?;
    let v = get(OsStr::new(name)).ok()?;
    std::str::from_utf8(&v).ok()?.parse().ok()
}

/// Is layer directory `dir` opaque (hiding the layers below): an opaque xattr set to `y`
/// (`trusted.overlay.opaque`, `user.overlay.opaque`, `user.fuseoverlayfs.opaque`), or a
/// `.wh..wh..opq` file in it?
pub(crate) fn is_opaque(sys: &Sys, dir: BorrowedFd<'_>) -> bool {
    dir_marks(sys, dir, false).opaque
}

/// What a layer directory's marks say about the layers below it.
#[derive(Debug, Default)]
pub(crate) struct DirMarks {
    /// It hides the layers below (see [`is_opaque`]).
    pub opaque: bool,
    /// Its redirect's value (`trusted.overlay.redirect`, else `user.overlay.redirect`), when
    /// asked for and present; see [`super::redirect`].
    pub redirect: Option<Vec<u8>>,
}

/// The marks of layer directory `dir`: whether it is opaque, and with `redirect` its
/// redirect. One listxattr; a value is read only for a mark that is there.
pub(crate) fn dir_marks(sys: &Sys, dir: BorrowedFd<'_>, redirect: bool) -> DirMarks {
    let mut marks = DirMarks::default();
    if let Ok(names) = sys.flistxattr(dir) {
        let has = |x: &str| names.iter().any(|n| n.as_bytes() == x.as_bytes());
        marks.opaque = OPAQUE_XATTRS
            .iter()
            .filter(|x| has(x))
            .any(|x| sys.fgetxattr(dir, OsStr::new(x)).is_ok_and(|v| v == b"y"));
        if redirect {
            marks.redirect = REDIRECT_XATTRS
                .iter()
                .filter(|x| has(x))
                .find_map(|x| sys.fgetxattr(dir, OsStr::new(x)).ok());
        }
    }
    if !marks.opaque {
        marks.opaque = sys.stat_at(dir, OsStr::new(OPAQUE_FILE)).is_ok();
    }
    marks
}
