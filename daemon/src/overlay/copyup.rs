//! Copy-up: a lower file or directory gets its upper copy, built in `work/` and renamed into
//! place (a regular file synced before it is answered: built as an anonymous file and linked
//! into place), so a reader never sees a partial file.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::durable::UNSYNCED_XATTRS;
use super::loc::{DirHandle, Loc};
use super::node::Node;
use super::tree::{self, UpperDir};
use super::{
    Errno, Kind, METACOPY_XATTRS, ORIGIN_XATTR, ORIGIN_XATTR_TRUSTED, Overlay, REDIRECT_XATTRS,
    Result, is_internal_xattr,
};
use crate::sys::{self, OFlags, RenameFlags, Sys, Timespec};

impl Overlay {
    pub(crate) fn work_fd(&self) -> Result<Arc<OwnedFd>> {
        self.work.clone().ok_or(Errno::ROFS)
    }

    /// The upper directory of a directory node, made if there is none yet.
    pub(crate) fn copy_up_dir(&self, node: &Arc<Node>) -> Result<UpperDir> {
        let loc = self.copy_up(node, false)?;
        let h = loc.dir_handle().ok_or(Errno::NOTDIR)?.clone();
        let fd = h.fd()?;
        Ok(UpperDir { h, fd })
    }

    /// The upper copy of a node with its data, made if there is none yet (parents first);
    /// a metacopy gets its data. With `skip_data` the data is not copied (the caller
    /// truncates it to zero anyway).
    pub(crate) fn copy_up(&self, node: &Arc<Node>, skip_data: bool) -> Result<Loc> {
        let data = if skip_data { Data::Skip } else { Data::All };
        self.copy_up_as(node, data)
    }

    /// The upper copy of a node for a change of its metadata only (mode, owner, times,
    /// xattrs): with `metacopy=on` a lower regular file's data stays below until it is
    /// written; otherwise the same as [`Overlay::copy_up`].
    pub(crate) fn copy_up_meta(&self, node: &Arc<Node>) -> Result<Loc> {
        if self.opts.metacopy && node.kind() == Kind::File {
            self.copy_up_as(node, Data::Meta)
        } else {
            self.copy_up(node, false)
        }
    }

    /// The upper copy of a file about to be renamed: with `metacopy=on` a lower regular
    /// file's (or a metacopy's) data stays below, and the upper file records the data's path
    /// from the layer root (kernel overlayfs's absolute `redirect`), which a lookup by the
    /// new name follows. Otherwise the same as [`Overlay::copy_up`].
    pub(crate) fn copy_up_moving(&self, node: &Arc<Node>) -> Result<Loc> {
        if !(self.opts.metacopy && node.kind() == Kind::File) {
            return self.copy_up(node, false);
        }
        let u = self.copy_up_as(node, Data::Meta)?;
        let _guard = node.copyup.lock();
        let st = node.state();
        if !st.metacopy {
            return Ok(u);
        }
        let existing = REDIRECT_XATTRS
            .iter()
            .find_map(|x| u.getxattr(&self.sys, OsStr::new(x)).ok());
        if existing.as_ref().is_some_and(|r| r.starts_with(b"/")) {
            // An absolute redirect holds wherever the file goes.
            return Ok(u);
        }
        // The data found by its name: its directory's path in the layer, and the name. Only
        // written where a lookup walking that path from the top lower layer finds this very
        // file (not a whiteout or another file of a higher layer at the same path); a
        // relative redirect written elsewhere would mean another directory's name.
        let data = st.data()?;
        let path = match (data, &existing) {
            (Loc::At(dir, name), None) => dir.path().join(name),
            _ => PathBuf::new(),
        };
        let same = |found: Option<(u16, Loc)>| -> bool {
            let (Some((_, f)), Ok(d)) = (found, data.stat(&self.sys)) else {
                return false;
            };
            f.stat(&self.sys)
                .is_ok_and(|f| (f.st_dev, f.st_ino) == (d.st_dev, d.st_ino))
        };
        let bytes = path.as_os_str().as_bytes();
        let value = [b"/", bytes].concat();
        let marked = !bytes.is_empty()
            && same(self.walk_redirect(bytes, None).unwrap_or(None))
            && REDIRECT_XATTRS
                .iter()
                .any(|x| u.setxattr(&self.sys, OsStr::new(x), &value, 0).is_ok());
        drop(_guard);
        if marked {
            Ok(u)
        } else {
            // No redirect can be written: the data comes up instead.
            self.copy_up(node, false)
        }
    }

    fn copy_up_as(&self, node: &Arc<Node>, data: Data) -> Result<Loc> {
        let done = |st: &super::node::NodeState| match &st.upper {
            Some(u) if !st.metacopy || data == Data::Meta => Some(u.clone()),
            _ => None,
        };
        if let Some(u) = done(&node.state()) {
            return Ok(u);
        }
        let work = self.work_fd()?;
        let _guard = node.copyup.lock();
        let st = node.state();
        if let Some(u) = done(&st) {
            return Ok(u);
        }
        if let Some(u) = st.upper.clone() {
            return self.copy_up_data(node, &st, u, data == Data::Skip);
        }
        if st.unlinked && st.kind != Kind::Dir {
            let data = if data == Data::Skip {
                Data::Skip
            } else {
                Data::All
            };
            return self.copy_up_unlinked(node, &work, data);
        }
        let (_, src) = st.lowers.first().ok_or(Errno::IO)?;
        let stat = src.stat(&self.sys)?;
        if stat.st_nlink > 1 && st.kind != Kind::Dir && !st.metacopy && self.index.is_some() {
            return self.copy_up_linked(node, &st, &stat, &work, data);
        }
        let parent = self.node(st.parent)?;
        let pu = self.copy_up_dir(&parent)?;
        let tmp = self.tmp_name();
        let w = work.as_fd();
        let mut data = data;
        if data == Data::Meta && st.metacopy {
            // A lower metacopy: where its data is (its redirect, a chain) is not carried
            // over to a new metacopy, so the data comes up.
            data = Data::All;
        }
        // A regular file's copy is synced later (see [`super::durable`]) where it can be
        // marked: its mark, or none to sync it here.
        let mut defer = match (&self.syncer, st.kind, data) {
            (Some(s), Kind::File, Data::All | Data::Skip) => self
                .data_origin(&st)
                .and_then(|(layer, path)| s.mark_for(layer, &path)),
            _ => None,
        };
        // Synced here instead: built as an anonymous file (O_TMPFILE) and linked into place,
        // as kernel overlayfs builds its copies. Its fsync then writes the file alone: a copy
        // built under a name in work/ is a new entry, and on an ext4 without a journal the
        // fsync of a new entry writes its directory too (every copy-up wrote work/ again).
        let target = if defer.is_none()
            && st.kind == Kind::File
            && data != Data::Meta
            && self.opts.fsync
            && self.tmpfile_copies()
        {
            Target::Anonymous
        } else {
            Target::Named(&tmp)
        };
        let mut file = None;
        let built = self
            .build_copy(&st, &stat, w, target, data, defer.is_none())
            .and_then(|f| {
                file = f;
                if let (Some(mark), Some(out)) = (&defer, &file) {
                    let marked = set_first_permitted(&UNSYNCED_XATTRS, mark, |x, v| {
                        self.sys.setxattr_at(w, &tmp, x, v)
                    });
                    if marked.is_err() {
                        defer = None;
                        self.sys.fsync(out.as_fd(), false)?;
                    }
                }
                if data == Data::Meta && !self.mark_metacopy(w, &tmp) {
                    // Neither mark can be written here: a full copy instead.
                    data = Data::All;
                    let out = self.sys.open_at(w, &tmp, OFlags::WRONLY, 0)?;
                    self.fill(st.data()?, stat.st_size, out.as_fd())?;
                    self.sys
                        .futimens(out.as_fd(), atime_of(&stat), mtime_of(&stat))?;
                    if self.opts.fsync {
                        self.sys.fsync(out.as_fd(), false)?;
                    }
                }
                Ok(())
            });
        // A named copy left behind is removed; an anonymous one goes with its fd.
        let discard = |e| {
            if let Target::Named(tmp) = target {
                let _ = tree::remove_any(&self.sys, w, tmp, st.kind);
            }
            Err(e)
        };
        if let Err(e) = built {
            return discard(e);
        }
        if st.kind != Kind::Dir {
            // The copy keeps the inode number the file had below.
            match (target, &file) {
                (Target::Anonymous, Some(out)) => {
                    self.set_origin(|x, v| self.sys.fsetxattr(out.as_fd(), x, v, 0), node.ino)
                }
                _ => self.set_origin(|x, v| self.sys.setxattr_at(w, &tmp, x, v), node.ino),
            }
        }
        // A copy-up is not a change of the parent directory: keep its times.
        let ptimes = self.sys.fstat(pu.as_fd()).ok();
        let placed = match (target, &file) {
            // Linked: an existing name fails it (EEXIST), as RENAME_NOREPLACE does.
            (Target::Anonymous, Some(out)) => self.sys.link_fd(out.as_fd(), pu.as_fd(), &st.name),
            _ => self
                .sys
                .rename_at(w, &tmp, pu.as_fd(), &st.name, RenameFlags::NOREPLACE),
        };
        if let Err(e) = placed {
            return discard(e);
        }
        if let Some(p) = ptimes {
            let _ = self.sys.futimens(pu.as_fd(), atime_of(&p), mtime_of(&p));
        }
        if let (Some(_), Some(s), Some(out)) = (&defer, &self.syncer, file) {
            s.queue(out, pu.h.path().join(&st.name));
        }
        let upper = if st.kind == Kind::Dir {
            let fd = self.sys.open_path_at(pu.as_fd(), &st.name)?;
            Loc::Dir(DirHandle::child(&pu.h, &st.name, fd))
        } else {
            Loc::At(pu.h.clone(), st.name.clone())
        };
        let ust = upper.stat(&self.sys)?;
        node.update(|s| {
            s.upper = Some(upper.clone());
            s.backing = (ust.st_dev, ust.st_ino);
            s.metacopy = data == Data::Meta;
            if s.kind != Kind::Dir && !s.metacopy {
                s.lowers.clear();
            }
        });
        Ok(upper)
    }

    /// The copy-up of a lower file with several hard links: its copy goes into the index
    /// (see [`super::INDEX_DIR`]), built in `work/` and synced first, its mark saying the
    /// names show the lower link count; then every name of it known here (the one changed
    /// first) is linked into the upper layer. A crash before the entry is placed leaves the
    /// lower file; after, the next lookup of each name links the copy in.
    fn copy_up_linked(
        &self,
        node: &Arc<Node>,
        st: &super::node::NodeState,
        stat: &sys::Stat,
        work: &OwnedFd,
        data: Data,
    ) -> Result<Loc> {
        let key = self.index_key(stat);
        let iloc = self.index_loc(&key)?;
        match iloc.stat(&self.sys) {
            // Made by an earlier mount whose link of this name did not happen (a crash).
            Ok(_) => {}
            Err(Errno::NOENT) => {
                let w = work.as_fd();
                let tmp = self.tmp_name();
                // Metadata-only copies are for files with one name.
                let data = if data == Data::Skip {
                    Data::Skip
                } else {
                    Data::All
                };
                let built = self
                    .build_copy(st, stat, w, Target::Named(&tmp), data, true)
                    .and_then(|_| {
                        self.set_origin(|x, v| self.sys.setxattr_at(w, &tmp, x, v), node.ino);
                        let mark = super::nlink_mark(stat.st_nlink as i64 - 1, &key);
                        set_first_permitted(&super::NLINK_XATTRS, &mark, |x, v| {
                            self.sys.setxattr_at(w, &tmp, x, v)
                        })
                    });
                let placed = built.and_then(|()| {
                    let ifd = self.index.as_ref().ok_or(Errno::ROFS)?.fd()?;
                    match self
                        .sys
                        .rename_at(w, &tmp, ifd.as_fd(), &key, RenameFlags::NOREPLACE)
                    {
                        Ok(()) => Ok(true),
                        // Another thread's copy of another name of it won.
                        Err(Errno::EXIST) => Ok(false),
                        Err(e) => Err(e),
                    }
                });
                if placed.as_ref().is_ok_and(|p| !p) || placed.is_err() {
                    let _ = tree::remove_any(&self.sys, w, &tmp, st.kind);
                }
                placed?;
            }
            Err(e) => return Err(e),
        }
        let mut names = vec![(st.parent, st.name.clone())];
        for a in node.aliases() {
            if !names.contains(&a) {
                names.push(a);
            }
        }
        for (parent, name) in &names {
            // A name that cannot be linked now (its directory forgotten by the kernel, a
            // full disk) still reads the copy through the index, and is linked at its next
            // lookup.
            if let Err(e) = self.link_name(node.ino, &key, *parent, name) {
                tracing::debug!(?name, error = %e, "name of a hard link not linked up");
            }
        }
        let ust = iloc.stat(&self.sys)?;
        node.update(|s| {
            s.upper = Some(iloc.clone());
            s.backing = (ust.st_dev, ust.st_ino);
            s.metacopy = false;
            s.lowers.clear();
            s.set_index_key(Some(key.clone()));
        });
        Ok(iloc)
    }

    /// Link index entry `key` into the upper layer as `name` in directory `parent`, if that
    /// name still shows the indexed lower file of node `ino` and is not linked yet (its upper
    /// directory is made if need be); the entry's mark then counts one upper link more.
    /// Whether a link was made.
    pub(crate) fn link_name(
        &self,
        ino: u64,
        key: &OsStr,
        parent: u64,
        name: &OsStr,
    ) -> Result<bool> {
        let pnode = self.node(parent)?;
        let found = self.resolve(&pnode.state(), name)?;
        if !found.is_some_and(|f| f.link_up && f.ino == ino) {
            return Ok(false);
        }
        let pu = self.copy_up_dir(&pnode)?;
        let iloc = self.index_loc(key)?;
        let ifd = self.index.as_ref().ok_or(Errno::ROFS)?.fd()?;
        // A link is not a change of the directory for the user: keep its times.
        let ptimes = self.sys.fstat(pu.as_fd()).ok();
        match self.sys.link_at(ifd.as_fd(), key, pu.as_fd(), name) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Ok(false),
            Err(e) => return Err(e),
        }
        if let Some(p) = ptimes {
            let _ = self.sys.futimens(pu.as_fd(), atime_of(&p), mtime_of(&p));
        }
        self.add_to_nlink_delta(&iloc, key, -1)?;
        Ok(true)
    }

    /// Add `n` to the mark of index entry `key` at `iloc`.
    pub(crate) fn add_to_nlink_delta(&self, iloc: &Loc, key: &OsStr, n: i64) -> Result<()> {
        let d = self.nlink_delta(iloc).unwrap_or(0);
        let mark = super::nlink_mark(d + n, key);
        set_first_permitted(&super::NLINK_XATTRS, &mark, |x, v| {
            iloc.setxattr(&self.sys, x, v, 0)
        })
    }

    /// A metacopy's data, copied into its upper file in place (it has the size already),
    /// synced, and only then the mark removed: a crash part way leaves a file that still
    /// reads from below. With `skip_data` the file is emptied instead.
    fn copy_up_data(
        &self,
        node: &Arc<Node>,
        st: &super::node::NodeState,
        upper: Loc,
        skip_data: bool,
    ) -> Result<Loc> {
        let out = upper.open(&self.sys, OFlags::WRONLY)?;
        rewrite_data(&self.sys, out.as_fd(), |before| {
            if skip_data {
                self.sys.ftruncate(out.as_fd(), 0)
            } else {
                self.fill(st.data()?, before.st_size, out.as_fd())
            }
        })?;
        if self.opts.fsync {
            self.sys.fsync(out.as_fd(), false)?;
        }
        // Only the marks there are; one that cannot go must not be taken for gone.
        let names = upper.listxattr(&self.sys)?;
        for m in METACOPY_XATTRS.iter().chain(&REDIRECT_XATTRS) {
            if names.iter().any(|n| n.as_bytes() == m.as_bytes()) {
                upper.removexattr(&self.sys, OsStr::new(m))?;
            }
        }
        node.update(|s| {
            s.metacopy = false;
            s.lowers.clear();
        });
        Ok(upper)
    }

    /// Where a node's data is below: the lower layer's index and the file's path in it
    /// (none for a file no name reaches).
    fn data_origin(&self, st: &super::node::NodeState) -> Option<(u16, PathBuf)> {
        let data = st.data().ok()?;
        match st.lowers.iter().find(|(_, l)| l.same_place(data))? {
            (layer, Loc::At(dir, name)) => Some((*layer, dir.path().join(name))),
            _ => None,
        }
    }

    /// Mark `dir/name` a metacopy (`trusted.` where permitted, else `user.`); false if
    /// neither can be written.
    fn mark_metacopy(&self, dir: BorrowedFd<'_>, name: &OsStr) -> bool {
        METACOPY_XATTRS
            .iter()
            .any(|m| self.sys.setxattr_at(dir, name, OsStr::new(m), b"").is_ok())
    }

    /// Copy the first `len` bytes of `src` into `out`, by FICLONE where the lower layer's
    /// filesystem allows it.
    fn fill(&self, src: &Loc, len: i64, out: BorrowedFd<'_>) -> Result<()> {
        if len <= 0 {
            return Ok(());
        }
        let input = src.open(&self.sys, OFlags::RDONLY)?;
        let st = self.sys.fstat(input.as_fd())?;
        let clone = !self.no_clone_from.read().contains(&st.st_dev);
        // Blocks for every byte: no hole to look for (a file with blocks past its end or
        // holes made up by metadata blocks is copied whole, zeros and all: same content).
        let dense = st.st_blocks.saturating_mul(512) >= len;
        let done = copy_data(&self.sys, input.as_fd(), out, len as u64, clone, dense)?;
        if done == Reflink::Refused {
            self.no_clone_from.write().insert(st.st_dev);
        }
        Ok(())
    }

    /// The upper copy of a lower file no name reaches any more (open while it was unlinked
    /// or renamed over): an anonymous file, as the open file it belongs to is. Copying it to
    /// its old name would bring it back, or fail on the whiteout or file there now.
    fn copy_up_unlinked(&self, node: &Arc<Node>, work: &OwnedFd, data: Data) -> Result<Loc> {
        let st = node.state();
        let (_, src) = st.lowers.first().ok_or(Errno::IO)?;
        let stat = src.stat(&self.sys)?;
        let tmp = self.tmp_name();
        let w = work.as_fd();
        let built = self
            .build_copy(&st, &stat, w, Target::Named(&tmp), data, true)
            .and_then(|_| self.sys.open_path_at(w, &tmp));
        let removed = tree::remove_any(&self.sys, w, &tmp, st.kind);
        let fd = built?;
        removed?;
        let upper = Loc::Fd(Arc::new(fd));
        let ust = upper.stat(&self.sys)?;
        node.update(|s| {
            s.upper = Some(upper.clone());
            s.backing = (ust.st_dev, ust.st_ino);
            s.metacopy = false;
            s.lowers.clear();
        });
        Ok(upper)
    }

    /// Make `target` in `work` a copy of the node's topmost lower file `src` (of `stat`):
    /// its data (from where the node's data is) as `data` says, owner, mode, xattrs, times; a
    /// regular file's data synced if `sync` (and `fsync` is on). A regular file's fd
    /// (write-only). An anonymous target is a regular file's only.
    fn build_copy(
        &self,
        st: &super::node::NodeState,
        stat: &sys::Stat,
        work: BorrowedFd<'_>,
        target: Target<'_>,
        data: Data,
        sync: bool,
    ) -> Result<Option<OwnedFd>> {
        let kind = st.kind;
        let mut file = None;
        let (_, src) = st.lowers.first().ok_or(Errno::IO)?;
        let mode = stat.st_mode & 0o7777;
        // Every kind but a regular file's anonymous copy is made under the name.
        let named = || match target {
            Target::Named(tmp) => Ok(tmp),
            Target::Anonymous => Err(Errno::INVAL),
        };
        match kind {
            Kind::Dir => self.sys.mkdir_at(work, named()?, 0o700)?,
            Kind::Symlink => {
                let link = src.readlink(&self.sys)?;
                self.sys.symlink_at(&link, work, named()?)?;
            }
            Kind::File => {
                let out = match target {
                    Target::Named(tmp) => self.sys.open_at(
                        work,
                        tmp,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                        0o600,
                    )?,
                    Target::Anonymous => self.sys.open_at(
                        work,
                        OsStr::new("."),
                        OFlags::WRONLY | OFlags::TMPFILE,
                        0o600,
                    )?,
                };
                match data {
                    Data::All => self.fill(st.data()?, stat.st_size, out.as_fd())?,
                    Data::Skip => {}
                    // The size with no data (a sparse file); nothing to sync, as with
                    // kernel overlayfs: no data was written.
                    Data::Meta => self
                        .sys
                        .ftruncate(out.as_fd(), stat.st_size.max(0) as u64)?,
                }
                if sync && self.opts.fsync && data != Data::Meta {
                    self.sys.fsync(out.as_fd(), false)?;
                }
                file = Some(out);
            }
            Kind::Fifo | Kind::Socket | Kind::Char | Kind::Block => {
                self.sys
                    .mknod_at(work, named()?, kind.mode_bits() | 0o600, stat.st_rdev)?;
            }
        }
        // A regular file's own fd serves; anything else is reached by an O_PATH handle.
        let path_fd;
        let fd = match &file {
            Some(out) => out.as_fd(),
            None => {
                path_fd = self.sys.open_path_at(work, named()?)?;
                path_fd.as_fd()
            }
        };
        self.sys.fchown(fd, Some(stat.st_uid), Some(stat.st_gid))?;
        if kind != Kind::Symlink {
            self.sys.fchmod(fd, mode)?;
        }
        self.copy_xattrs(src, fd, kind)?;
        match &file {
            Some(out) => self
                .sys
                .futimens(out.as_fd(), atime_of(stat), mtime_of(stat))?,
            None => self
                .sys
                .utimens_at(work, named()?, atime_of(stat), mtime_of(stat))?,
        }
        Ok(file)
    }

    /// Record the inode number a copied-up file shows, with `set(name, value)`: in
    /// `trusted.` where permitted (it works on symlinks too), else in `user.`.
    fn set_origin(&self, set: impl Fn(&OsStr, &[u8]) -> Result<()>, ino: u64) {
        let v = ino.to_string();
        let _ = set_first_permitted(&[ORIGIN_XATTR_TRUSTED, ORIGIN_XATTR], v.as_bytes(), set);
    }

    /// Whether copies can be built as anonymous files in the workdir (O_TMPFILE: ext4, xfs,
    /// btrfs, tmpfs, ...): tried once, with a file opened and closed there.
    fn tmpfile_copies(&self) -> bool {
        *self.tmpfile_copies.get_or_init(|| {
            let Some(w) = &self.work else { return false };
            match self.sys.tmpfile_works(w.as_fd()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %super::errstr(e), "no O_TMPFILE in the workdir: copies are built under a name");
                    false
                }
            }
        })
    }

    /// Copy every xattr but the overlay's own markers; tolerate what the upper can't hold.
    fn copy_xattrs(&self, src: &Loc, dst: BorrowedFd<'_>, kind: Kind) -> Result<()> {
        if self.opts.noxattrs {
            return Ok(());
        }
        let names = match src.listxattr(&self.sys) {
            Ok(n) => n,
            Err(Errno::NOTSUP) | Err(Errno::PERM) => return Ok(()),
            Err(e) => return Err(e),
        };
        for n in names {
            let b = n.as_bytes();
            // Opaque markers and origins belong to the layer they are in.
            if is_internal_xattr(b, crate::options::XattrPermissions::Off)
                && !b.starts_with(b"user.containers.")
            {
                continue;
            }
            let v = match src.getxattr(&self.sys, &n) {
                Ok(v) => v,
                Err(Errno::OVERFLOW) | Err(Errno::NODATA) => continue,
                Err(e) => return Err(e),
            };
            match self.sys.fsetxattr(dst, &n, &v, 0) {
                Ok(()) => {}
                Err(Errno::INVAL) | Err(Errno::NOTSUP) | Err(Errno::PERM)
                    if kind == Kind::Symlink || !b.starts_with(b"user.") =>
                {
                    continue;
                }
                Err(Errno::INVAL) | Err(Errno::NOTSUP) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Set xattr `names[0]` to `value`, else (not permitted: rootless) the next one; the last
/// error if none can be set.
fn set_first_permitted(
    names: &[&str],
    value: &[u8],
    set: impl Fn(&OsStr, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut last = Errno::NOTSUP;
    for x in names {
        match set(OsStr::new(x), value) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// File capabilities, which a write clears.
const CAPS: &str = "security.capability";

/// Write the data of the file open as `out` anew with `write` (given the file's stat from
/// before), as a copy of data does: the set-id bits and file capabilities a write clears are
/// put back, and the times kept (copying data is not a change of the file).
pub(crate) fn rewrite_data(
    sys: &Sys,
    out: BorrowedFd<'_>,
    write: impl FnOnce(&sys::Stat) -> Result<()>,
) -> Result<()> {
    let before = sys.fstat(out)?;
    let caps = sys.fgetxattr(out, OsStr::new(CAPS)).ok();
    write(&before)?;
    if before.st_mode & 0o6000 != 0 {
        sys.fchmod(out, before.st_mode & 0o7777)?;
    }
    if let Some(v) = caps {
        sys.fsetxattr(out, OsStr::new(CAPS), &v, 0)?;
    }
    sys.futimens(out, atime_of(&before), mtime_of(&before))
}

/// Where a copy is built in the workdir: under a temporary name, or as an anonymous file
/// (O_TMPFILE) linked into place once complete.
#[derive(Clone, Copy)]
enum Target<'a> {
    Named(&'a OsStr),
    Anonymous,
}

/// What a copy-up brings up of a file's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    All,
    /// Nothing: the caller empties the file anyway.
    Skip,
    /// Nothing yet (`metacopy=on`): the upper file is marked a metacopy.
    Meta,
}

/// What FICLONE did in [`copy_data`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reflink {
    Done,
    /// These filesystems cannot clone (EXDEV, EOPNOTSUPP, EINVAL, ENOTTY, ENOSYS): the
    /// caller stops trying for this layer.
    Refused,
    /// Not tried, or failed otherwise (the data was copied).
    Copied,
}

/// Copy `len` bytes: FICLONE (when `clone`), else copy_file_range, else read/write. Holes
/// stay holes where the source reports them, unless the caller knows it has none (`dense`).
pub(crate) fn copy_data(
    sys: &Sys,
    input: BorrowedFd<'_>,
    out: BorrowedFd<'_>,
    len: u64,
    clone: bool,
    dense: bool,
) -> Result<Reflink> {
    let mut outcome = Reflink::Copied;
    if clone {
        match sys.ficlone(out, input) {
            Ok(()) => return Ok(Reflink::Done),
            Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOTTY | Errno::NOSYS) => {
                outcome = Reflink::Refused
            }
            Err(_) => {}
        }
    }
    let mut off_in = 0u64;
    let mut off_out = 0u64;
    let mut use_cfr = true;
    while off_in < len {
        // Skip holes.
        let end = if dense {
            len
        } else {
            match sys::lseek(input, off_in as i64, libc::SEEK_DATA) {
                Ok(d) if d >= len => break,
                Ok(d) => {
                    off_in = d;
                    off_out = d;
                }
                Err(Errno::NXIO) => break,
                Err(_) => {}
            }
            match sys::lseek(input, off_in as i64, libc::SEEK_HOLE) {
                Ok(h) => h.min(len),
                Err(_) => len,
            }
        };
        while off_in < end {
            let chunk = (end - off_in).min(1 << 30) as usize;
            if use_cfr {
                match sys.copy_file_range(input, &mut off_in, out, &mut off_out, chunk) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(Errno::XDEV)
                    | Err(Errno::NOSYS)
                    | Err(Errno::INVAL)
                    | Err(Errno::OPNOTSUPP) => {
                        use_cfr = false;
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut buf = vec![0u8; chunk.min(1 << 20)];
            let n = sys.pread(input, &mut buf, off_in)?;
            if n == 0 {
                break;
            }
            let mut w = 0;
            while w < n {
                w += sys.pwrite(out, &buf[w..n], off_out + w as u64)?;
            }
            off_in += n as u64;
            off_out += n as u64;
        }
    }
    // A trailing hole (or a source shorter than `len`): set the size.
    if off_out != len {
        sys.ftruncate(out, len)?;
    }
    Ok(outcome)
}

pub(crate) fn atime_of(st: &sys::Stat) -> Timespec {
    Timespec {
        tv_sec: st.st_atime,
        tv_nsec: st.st_atime_nsec as _,
    }
}

pub(crate) fn mtime_of(st: &sys::Stat) -> Timespec {
    Timespec {
        tv_sec: st.st_mtime,
        tv_nsec: st.st_mtime_nsec as _,
    }
}
