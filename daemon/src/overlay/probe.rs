//! The layer probe: what one layer directory says about one name. It is the rule at the
//! heart of the overlay, written once: every walk across the layers (lookup, the data of a
//! metacopy, "is the name visible below", the write path's look at the upper layer) asks it,
//! once per layer, and acts on its typed answer. A leaf: it knows the kernel-call seam and
//! the whiteout conventions, nothing of nodes or the write path.

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use super::tree::{self, OPAQUE_FILE, WH_PREFIX};
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

/// [`probe`] of directory `dir` of lower layer `layer`; with a `hint` (from a listing of the
/// same directory), a layer that lists neither the name nor its `.wh.` file answers without a
/// syscall what the probe would find there (lower layers never change). Without one, a name
/// the directory's kept listing (`names`, see [`LowerNames`]) certainly lacks is absent
/// without a syscall too.
pub(crate) fn probe_lower(
    sys: &Sys,
    layer: u16,
    dir: BorrowedFd<'_>,
    names: &LowerNames,
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
    if names.absent(sys, dir, name) {
        return Ok(Probe::Absent);
    }
    probe(sys, dir, name)
}

/// How many probes of one lower directory go to the filesystem before its listing is read
/// once and kept (see [`LowerNames`]).
const LIST_AFTER: u32 = 16;
/// A lower directory listing more names than this is never kept.
const LIST_MAX: usize = 1 << 17;

/// What one lower layer directory lists, kept once lookups have probed it [`LIST_AFTER`]
/// times: a sorted set of 64-bit hashes of its names (8 bytes a name). Lower layers never
/// change, so a name whose hash is not in the set, nor `.wh.NAME`'s, is absent there without
/// a syscall (a lookup of a name in the bottom layer, or of no layer at all, probes every
/// layer above it twice: `fstatat` of the name and of its `.wh.` file). A hash that is in
/// the set may be another name's: the probe then goes to the filesystem as before, so the
/// set is never wrong, only sometimes of no help. A directory that cannot be listed (no read
/// permission) or lists more than [`LIST_MAX`] names is never kept. Only lower directories
/// get one; the upper layer changes and is always probed.
#[derive(Default)]
pub(crate) struct LowerNames {
    probes: AtomicU32,
    set: OnceLock<Option<Box<[u64]>>>,
}

impl LowerNames {
    /// Is `name` certainly absent from `dir` (this set's directory), with neither the name
    /// nor `.wh.NAME` listed? False when not known (the set is not kept yet, or a hash
    /// matches); counts the probe and, at the [`LIST_AFTER`]th, reads the listing.
    fn absent(&self, sys: &Sys, dir: BorrowedFd<'_>, name: &OsStr) -> bool {
        let set = match self.set.get() {
            Some(s) => s,
            None => {
                if self.probes.fetch_add(1, Ordering::Relaxed) + 1 < LIST_AFTER {
                    return false;
                }
                self.set.get_or_init(|| hash_listing(sys, dir))
            }
        };
        let Some(set) = set else { return false };
        let listed = |h: u64| set.binary_search(&h).is_ok();
        !listed(name_hash(&[name.as_bytes()])) && !listed(name_hash(&[WH_PREFIX, name.as_bytes()]))
    }

    /// The set was read (tests).
    #[cfg(test)]
    pub(crate) fn kept(&self) -> bool {
        self.set.get().is_some_and(Option::is_some)
    }
}

/// FNV-1a (64-bit) of the concatenation of `parts`: one name, or `.wh.` and a name.
fn name_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The sorted hashes of every name `dir` lists, or none (it cannot be read, or lists too many).
fn hash_listing(sys: &Sys, dir: BorrowedFd<'_>) -> Option<Box<[u64]>> {
    let mut set = Vec::new();
    tree::each_entry(sys, dir, |n, _| set.push(name_hash(&[n]))).ok()?;
    if set.len() > LIST_MAX {
        return None;
    }
    set.sort_unstable();
    set.dedup();
    Some(set.into_boxed_slice())
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
