//! The write path: creating, removing and renaming names, and changing attributes.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::loc::{DirHandle, Loc};
use super::node::{self, Node, NodeState};
use super::probe::{self, Probe, Whiteout};
use super::redirect;
use super::tree::{self, UpperDir, WH_PREFIX};
use super::{
    Attr, Caller, Errno, Fh, FileHandle, Found, Handle, Ino, Kind, Overlay, REDIRECT_XATTRS,
    RenameMode, Result, SetAttr, SetTime, format_override, is_internal_xattr,
};
use crate::sys::{self, OFlags, RenameFlags, Sys, Timespec};

fn check_new_name(name: &OsStr) -> Result<()> {
    if name.as_bytes().starts_with(WH_PREFIX) {
        return Err(Errno::INVAL);
    }
    if name.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    Ok(())
}

/// A file about to lose the name it is reached by keeps an `O_PATH` handle: it may still be
/// open (fstat reaches the daemon without a file handle) or have other names. The kernel
/// forgets an unlinked inode as soon as nothing holds it, and the handle goes with the node.
/// Unless [`Pin::done`] says the name went, dropping the pin gives the node its named location
/// back: a failed unlink or rename (ENOSPC, EMFILE) must not leave a descriptor open for as
/// long as the kernel keeps the inode.
/// Fails (EMFILE, ...) before anything changed when the handle cannot be opened: without it
/// the node would keep a name that is about to mean another file.
fn pin(sys: &Arc<Sys>, node: &Arc<Node>) -> Result<Pin> {
    let prev = node.update(|s| -> Result<Option<Loc>> {
        if s.kind == Kind::Dir {
            return Ok(None);
        }
        match &s.upper {
            Some(u @ Loc::At(..)) => {
                let p = u.pin(sys)?;
                Ok(s.upper.replace(p))
            }
            _ => Ok(None),
        }
    })?;
    Ok(Pin {
        sys: sys.clone(),
        node: node.clone(),
        prev,
    })
}

struct Pin {
    sys: Arc<Sys>,
    node: Arc<Node>,
    /// The named location to restore, while the removal has not happened.
    prev: Option<Loc>,
}

impl Pin {
    fn done(mut self) {
        self.prev = None;
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let Some(prev) = self.prev.take() else { return };
        self.node.update(|s| {
            let Some(Loc::Fd(fd)) = &s.upper else { return };
            // Kept only when the old name is known to hold something else now (or nothing):
            // then only the fd still reaches the file. A step that cannot tell (EMFILE)
            // leaves the name, which is what a removal failing before the change leaves.
            let moved = match (prev.stat(&self.sys), self.sys.fstat(fd.as_fd())) {
                (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino),
                (Err(Errno::NOENT), _) => true,
                _ => false,
            };
            if !moved {
                s.upper = Some(prev);
            }
        });
    }
}

/// A moved node's new name, and for a file its new location (a file renamed is pinned
/// while its name changes, so its location is an fd until here).
fn relocate(node: &super::node::Node, parent: u64, dir: &UpperDir, name: &OsStr) {
    node.update(|s| {
        s.parent = parent;
        s.name = name.to_os_string();
        match &s.upper {
            Some(Loc::At(..) | Loc::Fd(_)) => {
                s.upper = Some(Loc::At(dir.h.clone(), name.to_os_string()))
            }
            Some(Loc::Dir(h)) => h.moved(&dir.h, name),
            None => {}
        }
    });
}

/// A directory about to be removed (rmdir, or renamed over): its upper part's fd, which
/// [`keep_removed_dir`] keeps in its node once it is gone. A directory's node id is an inode
/// number (its upper one when it has no lower part): while the kernel still holds the node
/// (an open directory, a working directory), the upper filesystem must not give that number
/// to a new file, or the reply naming the new file would carry the old node's id with
/// another type, and the kernel marks an inode whose type changes bad (EIO from then on).
/// Nor may the node reopen its upper part by name, which means another directory by then.
fn removed_dir_fd(node: &Node) -> Result<Option<Arc<OwnedFd>>> {
    let h = node.read(|s| match (&s.kind, &s.upper) {
        (Kind::Dir, Some(u)) => u.dir_handle().cloned(),
        _ => None,
    });
    h.map(|h| h.fd()).transpose()
}

/// The directory is gone from the tree: its node reaches it by `fd` (see
/// [`removed_dir_fd`]) until the kernel forgets it.
fn keep_removed_dir(node: &Node, fd: Option<Arc<OwnedFd>>) {
    node.update(|s| {
        if let Some(fd) = fd {
            s.upper = Some(Loc::Fd(fd));
        }
        s.unlinked = true;
    });
}

/// A file with several names moved from one of them to another.
fn renamed_alias(node: &Node, from: (u64, &OsStr), to: (u64, &OsStr)) {
    if node.aliases().is_empty() {
        return;
    }
    node.remove_alias(from.0, from.1);
    node.add_alias(to.0, to.1);
}

/// A chown that fails with EINVAL inside a user namespace means the id is not mapped there:
/// say so once, with what to do (a missing /etc/subuid range is the usual cause).
fn warn_unmapped(e: Errno, uid: Option<u32>, gid: Option<u32>) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if e == Errno::INVAL
        && sys::in_user_namespace()
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            ?uid,
            ?gid,
            "chown failed: the id is not mapped in this user namespace; does the user have \
             ranges in /etc/subuid and /etc/subgid (e.g. `usermod --add-subuids 100000-165535 \
             --add-subgids 100000-165535 USER`)?"
        );
    }
}

impl Overlay {
    /// EROFS on a read-only mount (what every change answers first).
    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only() {
            Err(Errno::ROFS)
        } else {
            Ok(())
        }
    }

    /// The owner a new entry gets on disk, and its mode (setgid directories pass their group
    /// and, to directories, their setgid bit on).
    fn new_owner(&self, caller: Caller, parent: &NodeState, mode: u32) -> Result<(u32, u32, u32)> {
        let pst = parent.top().stat(&self.sys)?;
        let uid = self
            .opts
            .uid_map
            .to_disk(caller.uid)
            .ok_or(Errno::OVERFLOW)?;
        let mut mode = mode;
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            if mode & libc::S_IFMT == libc::S_IFDIR {
                mode |= libc::S_ISGID;
            }
            pst.st_gid
        } else {
            self.opts
                .gid_map
                .to_disk(caller.gid)
                .ok_or(Errno::OVERFLOW)?
        };
        Ok((uid, gid, mode))
    }

    /// Give a freshly built entry its owner (or the override xattr that stands for it).
    fn set_new_owner(&self, fd: BorrowedFd<'_>, uid: u32, gid: u32, mode: u32) -> Result<()> {
        if let Some(x) = self.override_xattr_for(Kind::from_mode(mode)) {
            return self
                .sys
                .fsetxattr(fd, OsStr::new(x), &format_override(uid, gid, mode), 0);
        }
        self.sys.fchown(fd, Some(uid), Some(gid))
    }

    /// Put a new entry at `name` in the upper directory `pu`, built by `build(dir, name)`.
    /// A whiteout there is replaced atomically (the entry is built in `work/` and exchanged
    /// with it); a directory made over a whiteout is opaque.
    fn place_new(
        &self,
        pu: BorrowedFd<'_>,
        name: &OsStr,
        is_dir: bool,
        build: &mut dyn FnMut(BorrowedFd<'_>, &OsStr) -> Result<()>,
    ) -> Result<()> {
        match probe::probe(&self.sys, pu, name)? {
            Probe::NotDir => Err(Errno::NOTDIR),
            Probe::Absent => build(pu, name),
            Probe::Entry(_) => Err(Errno::EXIST),
            Probe::Whiteout(Whiteout::File) => {
                build(pu, name)?;
                if is_dir {
                    tree::set_opaque(&self.sys, pu, name)?;
                }
                let _ = self.sys.unlink_at(pu, &tree::wh_name(name));
                Ok(())
            }
            Probe::Whiteout(Whiteout::Dev) => {
                let work = self.work_fd()?;
                let tmp = self.tmp_name();
                build(work.as_fd(), &tmp)?;
                let res = (|| {
                    if is_dir {
                        tree::set_opaque(&self.sys, work.as_fd(), &tmp)?;
                    }
                    self.sys
                        .rename_at(work.as_fd(), &tmp, pu, name, RenameFlags::EXCHANGE)
                })();
                match res {
                    Ok(()) => {
                        let _ = self.sys.unlink_at(work.as_fd(), &tmp);
                        Ok(())
                    }
                    Err(e) => {
                        let _ = tree::remove_any(
                            &self.sys,
                            work.as_fd(),
                            &tmp,
                            if is_dir { Kind::Dir } else { Kind::File },
                        );
                        Err(e)
                    }
                }
            }
        }
    }

    /// The parent directory ready for a new name: exists, is a directory, has an upper part,
    /// and the name is free.
    fn prepare_new(&self, parent: u64, name: &OsStr) -> Result<(NodeState, UpperDir)> {
        self.writable()?;
        check_new_name(name)?;
        let p = self.node(parent)?;
        let ps = p.state();
        if ps.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        // The name is known to be absent from the merged view: FUSE sends create, mkdir,
        // mknod, symlink and link only for a name the kernel has just looked up negative, and
        // holds the directory locked. Layers below never change and this daemon is the only
        // writer of the upper one, so no probe of every layer is needed here; an entry in the
        // upper layer is still refused (EEXIST) when the new one is placed.
        let pu = self.copy_up_dir(&p)?;
        Ok((p.state(), pu))
    }

    /// Creates and opens regular file `name` in `parent` for `caller`; returns its attributes
    /// (adding one lookup reference, see [`Overlay`]) and the open handle.
    pub fn create(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, Fh)> {
        let parent = parent.0;
        // The kernel sends CREATE only for a name it has just looked up negative, with the
        // directory locked (see `prepare_new`): an upper entry found by then answers EEXIST,
        // as it does for the other kinds.
        let (ps, pu) = self.prepare_new(parent, name)?;
        let (uid, gid, mode) = self.new_owner(caller, &ps, libc::S_IFREG | (mode & 0o7777))?;
        let acc = flags & libc::O_ACCMODE;
        let acc = if acc == libc::O_WRONLY {
            OFlags::RDWR
        } else {
            OFlags::from_bits_retain(acc as u32)
        };
        let mut out: Option<OwnedFd> = None;
        self.place_new(pu.as_fd(), name, false, &mut |dir, nm| {
            let fd =
                self.sys
                    .open_at(dir, nm, acc | OFlags::CREATE | OFlags::EXCL, mode & 0o7777)?;
            self.set_new_owner(fd.as_fd(), uid, gid, mode)?;
            if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                self.sys.fchmod(fd.as_fd(), mode & 0o7777)?;
            }
            out = Some(fd);
            Ok(())
        })?;
        let attr = self.intern_new(parent, &pu, name)?;
        let fh = self.add_handle(Handle::File(FileHandle::upper(out.expect("built"))));
        Ok((attr, fh))
    }

    /// Makes directory `name` in `parent` (opaque where it replaces a whiteout); adds one
    /// lookup reference (see [`Overlay`]).
    pub fn mkdir(&self, caller: Caller, parent: Ino, name: &OsStr, mode: u32) -> Result<Attr> {
        let parent = parent.0;
        let (ps, pu) = self.prepare_new(parent, name)?;
        let (uid, gid, mode) = self.new_owner(caller, &ps, libc::S_IFDIR | (mode & 0o7777))?;
        self.place_new(pu.as_fd(), name, true, &mut |dir, nm| {
            self.sys.mkdir_at(dir, nm, mode & 0o777)?;
            let fd = self.sys.open_path_at(dir, nm)?;
            self.set_new_owner(fd.as_fd(), uid, gid, mode)?;
            if mode & 0o7000 != 0 {
                self.sys.fchmod(fd.as_fd(), mode & 0o7777)?;
            }
            Ok(())
        })?;
        self.intern_new(parent, &pu, name)
    }

    /// Makes a device, fifo, socket or regular file `name` in `parent`; adds one lookup
    /// reference (see [`Overlay`]).
    pub fn mknod(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<Attr> {
        let parent = parent.0;
        let (ps, pu) = self.prepare_new(parent, name)?;
        let (uid, gid, mode) = self.new_owner(caller, &ps, mode)?;
        self.place_new(pu.as_fd(), name, false, &mut |dir, nm| {
            self.sys.mknod_at(dir, nm, mode, rdev as u64)?;
            let fd = self.sys.open_path_at(dir, nm)?;
            self.set_new_owner(fd.as_fd(), uid, gid, mode)
        })?;
        self.intern_new(parent, &pu, name)
    }

    /// Makes symlink `name` in `parent` pointing at `target`; adds one lookup reference
    /// (see [`Overlay`]).
    pub fn symlink(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
    ) -> Result<Attr> {
        let parent = parent.0;
        let (ps, pu) = self.prepare_new(parent, name)?;
        let (uid, gid, _) = self.new_owner(caller, &ps, libc::S_IFLNK | 0o777)?;
        self.place_new(pu.as_fd(), name, false, &mut |dir, nm| {
            self.sys.symlink_at(target, dir, nm)?;
            let fd = self.sys.open_path_at(dir, nm)?;
            if self.override_xattr_for(Kind::Symlink).is_some() {
                // Their owner is shown as stored.
                return Ok(());
            }
            self.sys.fchown(fd.as_fd(), Some(uid), Some(gid))
        })?;
        self.intern_new(parent, &pu, name)
    }

    /// Hard-links `ino` (copied up first) as `newname` in `newparent`; adds one lookup
    /// reference (see [`Overlay`]).
    pub fn link(&self, ino: Ino, newparent: Ino, newname: &OsStr) -> Result<Attr> {
        let ino = ino.0;
        let newparent = newparent.0;
        let node = self.node(ino)?;
        if node.kind() == Kind::Dir {
            return Err(Errno::PERM);
        }
        let (_, npu) = self.prepare_new(newparent, newname)?;
        let u = self.copy_up(&node, false)?;
        self.place_new(npu.as_fd(), newname, false, &mut |dir, nm| {
            u.link_to(&self.sys, dir, nm)
        })?;
        self.lookup(Ino(newparent), newname)
    }

    /// The node of an entry just made in the upper directory `pu` (one kernel reference).
    /// A new entry has no lower part, so there is nothing to probe below.
    fn intern_new(&self, parent: u64, pu: &UpperDir, name: &OsStr) -> Result<Attr> {
        let top = self.sys.stat_at(pu.as_fd(), name)?;
        let kind = Kind::from_mode(top.st_mode);
        let loc = if kind == Kind::Dir {
            Loc::Dir(DirHandle::child(
                &pu.h,
                name,
                self.sys.open_path_at(pu.as_fd(), name)?,
            ))
        } else {
            Loc::At(pu.h.clone(), name.to_os_string())
        };
        let found = Found {
            kind,
            upper: Some(loc),
            lowers: Vec::new(),
            ino: self.map_ino(&top),
            top,
            metacopy: false,
            index_key: None,
            link_up: false,
            redirect: None,
        };
        let (node, stat) = self.intern(found, parent, name, true);
        Ok(self.attr_of(&node, &node.state(), &stat))
    }

    /// The node of what `resolve` found, without counting a kernel reference.
    fn node_of(
        &self,
        found: Found,
        parent: u64,
        name: &OsStr,
    ) -> std::sync::Arc<super::node::Node> {
        self.intern(found, parent, name, false).0
    }

    /// Removes non-directory `name` from `parent`, leaving a whiteout where a lower layer has
    /// it; lookup references are not touched (the inode lives until forgotten).
    pub fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        let parent = parent.0;
        self.writable()?;
        let p = self.node(parent)?;
        let ps = p.state();
        let found = self.resolve(&ps, name)?.ok_or(Errno::NOENT)?;
        if found.kind == Kind::Dir {
            return Err(Errno::ISDIR);
        }
        let node = self.node_of(found, parent, name);
        if self.lower_hard_link(&node)? {
            // Copied up first, as kernel overlayfs with index=on does: the index keeps the
            // link count the other names show.
            self.copy_up(&node, false)?;
        }
        let pu = self.copy_up_dir(&p)?;
        // No copy-up of this file (an open for writing racing the unlink) while its name
        // goes: one that waits sees it unlinked and copies it up to an anonymous file.
        let _no_copy_up = node.copyup.lock();
        let (indexed, has_upper) = node.read(|s| (s.index_key().is_some(), s.upper.is_some()));
        let has_upper = if indexed {
            // A copied-up hard link: whether this name is one of its upper links.
            match probe::probe(&self.sys, pu.as_fd(), name)? {
                Probe::NotDir => return Err(Errno::NOTDIR),
                p => matches!(p, Probe::Entry(_)),
            }
        } else {
            has_upper
        };
        let pinned = pin(&self.sys, &node)?;
        let ps = p.state();
        if has_upper {
            if self.lower_positive(&ps, name)? {
                self.replace_with_whiteout(pu.as_fd(), name, Kind::File)?;
            } else {
                self.sys.unlink_at(pu.as_fd(), name)?;
            }
        } else {
            tree::make_whiteout(&self.sys, self.dev_whiteouts(), pu.as_fd(), name)?;
        }
        pinned.done();
        self.name_removed(&node, parent, name, has_upper)?;
        let st = node.state();
        let gone = st.upper.as_ref().is_none_or(|u| self.upper_gone(u));
        if gone {
            node.update(|s| s.unlinked = true);
        }
        Ok(())
    }

    /// Has upper file `u` lost its last name (link count 0, or it cannot be read)?
    fn upper_gone(&self, u: &Loc) -> bool {
        u.stat(&self.sys).map(|s| s.st_nlink == 0).unwrap_or(true)
    }

    /// A lower file with several hard links, not copied up yet (a copy-up goes through the
    /// index, see [`super::INDEX_DIR`]).
    pub(crate) fn lower_hard_link(&self, node: &Arc<Node>) -> Result<bool> {
        let st = node.state();
        if self.index.is_none() || st.upper.is_some() || st.kind == Kind::Dir || st.metacopy {
            return Ok(false);
        }
        match st.lowers.first() {
            Some((_, l)) => Ok(l.stat(&self.sys)?.st_nlink > 1),
            None => Ok(false),
        }
    }

    /// Name `name` in `parent` of `node` is gone (unlinked, or renamed over; `linked`: it was
    /// an upper link of the node's file). A copied-up lower hard link counts it in its index
    /// entry's mark, and the entry goes with the last name.
    fn name_removed(
        &self,
        node: &Arc<Node>,
        parent: u64,
        name: &OsStr,
        linked: bool,
    ) -> Result<()> {
        node.remove_alias(parent, name);
        let Some(key) = node.read(|s| s.index_key().cloned()) else {
            return Ok(());
        };
        let iloc = self.index_loc(&key)?;
        if !linked {
            self.add_to_nlink_delta(&iloc, &key, -1)?;
        }
        let shown = match (iloc.stat(&self.sys), self.nlink_delta(&iloc)) {
            (Ok(st), Some(d)) => st.st_nlink as i64 + d,
            _ => return Ok(()),
        };
        if shown <= 0 {
            let ifd = self.index.as_ref().ok_or(Errno::ROFS)?.fd()?;
            self.sys.unlink_at(ifd.as_fd(), &key)?;
        }
        Ok(())
    }

    /// Replace the upper entry at `name` with a whiteout, atomically where mknod works.
    fn replace_with_whiteout(&self, pu: BorrowedFd<'_>, name: &OsStr, kind: Kind) -> Result<()> {
        let work = self.work_fd()?;
        if self.dev_whiteouts() {
            let tmp = self.tmp_name();
            tree::make_whiteout(&self.sys, self.dev_whiteouts(), work.as_fd(), &tmp)?;
            if kind == Kind::Dir {
                if let Err(e) =
                    self.sys
                        .rename_at(work.as_fd(), &tmp, pu, name, RenameFlags::EXCHANGE)
                {
                    let _ = self.sys.unlink_at(work.as_fd(), &tmp);
                    return Err(e);
                }
                // `tmp` is now the old directory, holding nothing but whiteouts.
                tree::remove_any(&self.sys, work.as_fd(), &tmp, Kind::Dir)?;
            } else if let Err(e) =
                self.sys
                    .rename_at(work.as_fd(), &tmp, pu, name, RenameFlags::empty())
            {
                let _ = self.sys.unlink_at(work.as_fd(), &tmp);
                return Err(e);
            }
            Ok(())
        } else {
            let tmp = self.tmp_name();
            self.behind_wh_file(pu, name, || {
                if kind == Kind::Dir {
                    self.sys
                        .rename_at(pu, name, work.as_fd(), &tmp, RenameFlags::empty())
                } else {
                    self.sys.unlink_at(pu, name)
                }
            })?;
            if kind == Kind::Dir {
                tree::remove_any(&self.sys, work.as_fd(), &tmp, Kind::Dir)?;
            }
            Ok(())
        }
    }

    /// Removes empty directory `name` from `parent` (ENOTEMPTY while its merged listing has
    /// entries), leaving a whiteout where a lower layer has it; no lookup reference changes.
    pub fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        let parent = parent.0;
        self.writable()?;
        let p = self.node(parent)?;
        let ps = p.state();
        let found = self.resolve(&ps, name)?.ok_or(Errno::NOENT)?;
        if found.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let has_upper = found.upper.is_some();
        // A redirected directory's lower content is not at its name: a whiteout is left
        // only where the name has something below.
        let has_lowers = !found.lowers.is_empty() && found.redirect.is_none();
        let node = self.node_of(found, parent, name);
        let cs = node.state();
        if !self.merged_is_empty(&cs)? {
            return Err(Errno::NOTEMPTY);
        }
        let pu = self.copy_up_dir(&p)?;
        let ps = p.state();
        let lower = has_lowers || (has_upper && self.lower_positive(&ps, name)?);
        let keep = removed_dir_fd(&node)?;
        if has_upper {
            if lower {
                self.replace_with_whiteout(pu.as_fd(), name, Kind::Dir)?;
            } else {
                match self.sys.rmdir_at(pu.as_fd(), name) {
                    Ok(()) => {}
                    Err(Errno::NOTEMPTY) => {
                        // Only whiteouts and markers are left in it.
                        let d = self.sys.open_path_at(pu.as_fd(), name)?;
                        tree::remove_tree_contents(&self.sys, d.as_fd())?;
                        self.sys.rmdir_at(pu.as_fd(), name)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        } else {
            tree::make_whiteout(&self.sys, self.dev_whiteouts(), pu.as_fd(), name)?;
        }
        keep_removed_dir(&node, keep);
        Ok(())
    }

    /// Renames `name` in `parent` to `newname` in `newparent`, treating an existing
    /// destination as `mode` says; no lookup reference changes.
    pub fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        mode: RenameMode,
    ) -> Result<()> {
        let parent = parent.0;
        let newparent = newparent.0;
        self.writable()?;
        let exchange = mode == RenameMode::Exchange;
        let noreplace = mode == RenameMode::NoReplace;
        check_new_name(newname)?;
        let p = self.node(parent)?;
        let np = self.node(newparent)?;
        let ps = p.state();
        let nps = np.state();
        if nps.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let src = self.resolve(&ps, name)?.ok_or(Errno::NOENT)?;
        let dst = self.resolve(&nps, newname)?;
        if exchange && dst.is_none() {
            return Err(Errno::NOENT);
        }
        if noreplace && dst.is_some() {
            return Err(Errno::EXIST);
        }
        if let Some(d) = &dst {
            if d.ino == src.ino && d.kind == src.kind && !exchange {
                // Two names of one file: nothing to do.
                return Ok(());
            }
        }
        let src_kind = src.kind;
        // A directory with lower content moves only with a redirect to that content.
        let writes = self.opts.redirect_dir.writes();
        let src_redirect = src_kind == Kind::Dir && !src.lowers.is_empty();
        if src_redirect && !writes {
            return Err(Errno::XDEV);
        }
        let mut dst_node = None;
        let mut dst_kind = None;
        let mut dst_redirect = false;
        if let Some(d) = dst {
            dst_kind = Some(d.kind);
            dst_redirect = exchange && d.kind == Kind::Dir && !d.lowers.is_empty();
            if dst_redirect && !writes {
                return Err(Errno::XDEV);
            }
            if !exchange {
                if src_kind == Kind::Dir && d.kind != Kind::Dir {
                    return Err(Errno::NOTDIR);
                }
                if src_kind != Kind::Dir && d.kind == Kind::Dir {
                    return Err(Errno::ISDIR);
                }
            }
            let n = self.node_of(d, newparent, newname);
            if !exchange && n.kind() == Kind::Dir && !self.merged_is_empty(&n.state())? {
                return Err(Errno::NOTEMPTY);
            }
            dst_node = Some(n);
        }
        let src_node = self.node_of(src, parent, name);
        let pu = self.copy_up_dir(&p)?;
        let npu = self.copy_up_dir(&np)?;
        // The redirects, worked out while the names are still the old ones.
        let samedir = parent == newparent;
        let src_value = match src_redirect {
            true => self.redirect_for_move(&src_node, samedir)?,
            false => None,
        };
        let dst_value = match (&dst_node, dst_redirect) {
            (Some(d), true) => self.redirect_for_move(d, samedir)?,
            _ => None,
        };
        if exchange {
            self.copy_up(&src_node, false)?;
            if let Some(d) = &dst_node {
                self.copy_up(d, false)?;
            }
        } else {
            // With metacopy=on a file's data stays below (a redirect says where).
            self.copy_up_moving(&src_node)?;
            // A lower hard link renamed over is copied up first, as unlinked (index=on).
            if let Some(d) = dst_node.as_ref().filter(|d| !Arc::ptr_eq(d, &src_node)) {
                if self.lower_hard_link(d)? {
                    self.copy_up(d, false)?;
                }
            }
        }
        // While the names change, a getattr, open or setattr of a moving file must reach
        // the file, not what its old name holds for a moment (a whiteout, or the other file
        // of an exchange): the kernel marks an inode whose type changes bad (EIO from then on).
        let src_pin = pin(&self.sys, &src_node)?;
        let xchg_pin = dst_node
            .as_ref()
            .filter(|_| exchange)
            .map(|n| pin(&self.sys, n))
            .transpose()?;
        // A file renamed over is unlinked as a lower one is: no copy-up of it meanwhile, and
        // its pin taken under that lock holds whatever copy an earlier copy-up made.
        let _no_dst_copy_up = dst_node
            .as_ref()
            .filter(|d| !exchange && d.kind() != Kind::Dir && !Arc::ptr_eq(d, &src_node))
            .map(|d| d.copyup.lock());
        // What is renamed over: its pin, and a directory's upper fd (see `removed_dir_fd`).
        let (dst_pin, dst_dir_fd) = match &dst_node {
            Some(d) if !exchange => (Some(pin(&self.sys, d)?), removed_dir_fd(d)?),
            _ => (None, None),
        };
        // Set before the names change: until they do, a redirect names the directory's
        // own place (a crash in between leaves the old name, merged as before).
        if let Some(v) = &src_value {
            self.set_redirect(&src_node, v)?;
        }
        if let (Some(d), Some(v)) = (&dst_node, &dst_value) {
            self.set_redirect(d, v)?;
        }
        let ps = p.state();
        let nps = np.state();
        let src_lower = self.lower_positive(&ps, name)?;
        let (p_merged, np_merged) = (!ps.lowers.is_empty(), !nps.lowers.is_empty());
        // A directory with no lower content of its own, moving into a merged directory, is
        // marked opaque first (kernel overlayfs's rule; EXDEV if it cannot be): it must hide
        // what its new name has below, and a stale redirect of its own, from the moment it
        // is there (one with lower content has its redirect).
        let opaque = |kind: Option<Kind>,
                      has_redirect: bool,
                      merged: bool,
                      dir: BorrowedFd<'_>,
                      at: &OsStr| {
            if kind == Some(Kind::Dir) && !has_redirect && merged {
                tree::set_opaque(&self.sys, dir, at).map_err(|_| Errno::XDEV)?;
            }
            Ok::<(), Errno>(())
        };
        opaque(Some(src_kind), src_redirect, np_merged, pu.as_fd(), name)?;
        if exchange {
            opaque(dst_kind, dst_redirect, p_merged, npu.as_fd(), newname)?;
        }
        // From the moment the names change, the nodes follow them, whatever fails after
        // (`after`: a step that failed once the entries had moved, reported at the end).
        if exchange {
            // Directory handles reopen themselves by (parent, name): between the exchange and
            // their update each name means the other directory, so no reopen meanwhile.
            let mut handles: Vec<Arc<DirHandle>> = Vec::new();
            for n in [Some(&src_node), dst_node.as_ref()].into_iter().flatten() {
                if let Some(h) = n.state().upper.and_then(|u| u.dir_handle().cloned()) {
                    if !handles.iter().any(|x| Arc::ptr_eq(x, &h)) {
                        handles.push(h);
                    }
                }
            }
            let _no_reopen: Vec<_> = handles.iter().map(|h| h.hold_name()).collect();
            self.sys.rename_at(
                pu.as_fd(),
                name,
                npu.as_fd(),
                newname,
                RenameFlags::EXCHANGE,
            )?;
            relocate(&src_node, newparent, &npu, newname);
            src_pin.done();
            if let Some(d) = &dst_node {
                relocate(d, parent, &pu, name);
            }
            if let Some(p) = xchg_pin {
                p.done();
            }
            if let Some(d) = dst_node.as_ref().filter(|d| !Arc::ptr_eq(d, &src_node)) {
                renamed_alias(&src_node, (parent, name), (newparent, newname));
                renamed_alias(d, (newparent, newname), (parent, name));
            }
            return Ok(());
        }
        let at_dst = probe::probe(&self.sys, npu.as_fd(), newname)?;
        let dst_linked = matches!(at_dst, Probe::Entry(_));
        let after = match at_dst {
            Probe::NotDir => return Err(Errno::NOTDIR),
            Probe::Entry(st) if Kind::from_mode(st.st_mode) == Kind::Dir => {
                // An empty merged directory may still hold whiteouts: clear them first.
                let d = self.sys.open_path_at(npu.as_fd(), newname)?;
                tree::remove_tree_contents(&self.sys, d.as_fd())?;
                self.rename_leaving(pu.as_fd(), name, npu.as_fd(), newname, src_lower)?
            }
            Probe::Whiteout(Whiteout::Dev) if src_kind == Kind::Dir => {
                // rename(2) won't put a directory over a device: exchange, then the whiteout
                // sits at the old name, where it is kept if needed.
                self.sys.rename_at(
                    pu.as_fd(),
                    name,
                    npu.as_fd(),
                    newname,
                    RenameFlags::EXCHANGE,
                )?;
                if src_lower {
                    Ok(())
                } else {
                    self.sys.unlink_at(pu.as_fd(), name)
                }
            }
            Probe::Whiteout(Whiteout::File) => {
                let after =
                    self.rename_leaving(pu.as_fd(), name, npu.as_fd(), newname, src_lower)?;
                let _ = self.sys.unlink_at(npu.as_fd(), &tree::wh_name(newname));
                after
            }
            Probe::Absent | Probe::Entry(_) | Probe::Whiteout(Whiteout::Dev) => {
                self.rename_leaving(pu.as_fd(), name, npu.as_fd(), newname, src_lower)?
            }
        };
        if let Some(p) = dst_pin {
            p.done();
        }
        relocate(&src_node, newparent, &npu, newname);
        src_pin.done();
        renamed_alias(&src_node, (parent, name), (newparent, newname));
        if let Some(d) = &dst_node {
            self.name_removed(d, newparent, newname, dst_linked)?;
            let st = d.state();
            let gone = st.upper.as_ref().is_none_or(|u| self.upper_gone(u));
            if st.kind == Kind::Dir {
                keep_removed_dir(d, dst_dir_fd);
            } else if gone {
                d.update(|s| s.unlinked = true);
            }
        }
        after?;
        Ok(())
    }

    /// The redirect a directory with lower content needs before a rename moves it (kernel
    /// overlayfs's rule), or none when its own still holds (a name, within the same
    /// directory; a path, anywhere): within its directory, its old name; elsewhere its old
    /// path from the root, each directory on the way up named by its redirect if it has
    /// one, up to the first absolute one. EXDEV when that path is too long to be one.
    fn redirect_for_move(&self, node: &Node, samedir: bool) -> Result<Option<Vec<u8>>> {
        let st = node.state();
        if let Some(r) = st.redirect() {
            if samedir || r.starts_with(b"/") {
                return Ok(None);
            }
        }
        if samedir {
            return Ok(Some(st.name.as_bytes().to_vec()));
        }
        let mut up = Vec::new();
        let (mut ino, mut st) = (node.ino, st);
        while ino != node::ROOT_INO {
            let part = st
                .redirect()
                .cloned()
                .unwrap_or_else(|| st.name.as_bytes().to_vec());
            let absolute = part.starts_with(b"/");
            up.push(part);
            if absolute {
                break;
            }
            ino = st.parent;
            st = self.node(ino)?.state();
        }
        redirect::absolute(&up).map(Some).ok_or(Errno::XDEV)
    }

    /// Marks directory `node`'s upper part with redirect `value` (`trusted.`, else `user.`
    /// where that cannot be written); EXDEV when neither can be, as kernel overlayfs
    /// answers (`mv` then copies the tree).
    fn set_redirect(&self, node: &Node, value: &[u8]) -> Result<()> {
        let upper = node.state().upper.ok_or(Errno::IO)?;
        let mut last = Errno::XDEV;
        for x in REDIRECT_XATTRS {
            match upper.setxattr(&self.sys, OsStr::new(x), value, 0) {
                Ok(()) => {
                    node.update(|s| s.set_redirect(Some(value.to_vec())));
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        tracing::warn!(
            dir = ?node.state().name,
            error = %super::errstr(last),
            "cannot write a directory redirect: the rename answers EXDEV"
        );
        Err(Errno::XDEV)
    }

    /// rename(2) in the upper layer, leaving a whiteout at the old name when `whiteout`. The
    /// outer error: nothing moved. The inner one: the entry moved, a later step failed.
    fn rename_leaving(
        &self,
        old_dir: BorrowedFd<'_>,
        old: &OsStr,
        new_dir: BorrowedFd<'_>,
        new: &OsStr,
        whiteout: bool,
    ) -> Result<Result<()>> {
        if !whiteout {
            return self
                .sys
                .rename_at(old_dir, old, new_dir, new, RenameFlags::empty())
                .map(Ok);
        }
        if self.dev_whiteouts() {
            match self
                .sys
                .rename_at(old_dir, old, new_dir, new, RenameFlags::WHITEOUT)
            {
                Ok(()) => return Ok(Ok(())),
                Err(Errno::INVAL) | Err(Errno::PERM) | Err(Errno::NOSYS) => {}
                Err(e) => return Err(e),
            }
            // Without RENAME_WHITEOUT: the whiteout is made first (in the workdir), so that
            // failing to make it changes nothing, and put at the old name once that is free.
            let work = self.work_fd()?;
            let tmp = self.tmp_name();
            tree::make_whiteout(&self.sys, self.dev_whiteouts(), work.as_fd(), &tmp)?;
            if let Err(e) = self
                .sys
                .rename_at(old_dir, old, new_dir, new, RenameFlags::empty())
            {
                let _ = self.sys.unlink_at(work.as_fd(), &tmp);
                return Err(e);
            }
            let placed =
                self.sys
                    .rename_at(work.as_fd(), &tmp, old_dir, old, RenameFlags::NOREPLACE);
            if placed.is_err() {
                let _ = self.sys.unlink_at(work.as_fd(), &tmp);
            }
            return Ok(placed);
        }
        self.behind_wh_file(old_dir, old, || {
            self.sys
                .rename_at(old_dir, old, new_dir, new, RenameFlags::empty())
        })
        .map(Ok)
    }

    /// Run `step`, which removes `name` from `dir` or moves it away, behind its `.wh.` file
    /// made first: if the file cannot be made (ENOSPC) nothing has changed, while both exist
    /// the upper entry is what is seen, and if `step` fails a file made here is removed again.
    fn behind_wh_file(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        step: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let made = tree::new_wh_file(&self.sys, dir, name)?;
        step().inspect_err(|_| {
            if made {
                let _ = self.sys.unlink_at(dir, &tree::wh_name(name));
            }
        })
    }

    /// Applies the changes `set` asks for to `ino` (through open file `fh`, if given), copying
    /// it up first; returns the new attributes and adds no lookup reference.
    pub fn setattr(&self, ino: Ino, fh: Option<Fh>, set: SetAttr) -> Result<Attr> {
        let ino = ino.0;
        self.writable()?;
        let node = self.node(ino)?;
        let u = match set.size {
            // Mode, owner and times only: the data may stay below (metacopy=on).
            None => self.copy_up_meta(&node)?,
            Some(size) => self.copy_up(&node, size == 0)?,
        };
        let st = node.state();
        if let Some(x) = self.override_xattr_for(st.kind) {
            if set.mode.is_some() || set.uid.is_some() || set.gid.is_some() {
                let cur = u.stat(&self.sys)?;
                let (mut uid, mut gid, mut mode) = (cur.st_uid, cur.st_gid, cur.st_mode);
                if let Ok(v) = u.getxattr(&self.sys, OsStr::new(x)) {
                    if let Some(o) = super::parse_override(&v) {
                        (uid, gid, mode) = (o.uid, o.gid, o.mode);
                    }
                }
                if let Some(m) = set.mode {
                    mode = (mode & libc::S_IFMT) | (m & 0o7777);
                }
                if let Some(n) = set.uid {
                    uid = self.disk_uid(n)?;
                }
                if let Some(n) = set.gid {
                    gid = self.disk_gid(n)?;
                }
                u.setxattr(
                    &self.sys,
                    OsStr::new(x),
                    &format_override(uid, gid, mode),
                    0,
                )?;
            }
        } else {
            if set.uid.is_some() || set.gid.is_some() {
                let squash = self.opts.squash_to_root
                    || self.opts.squash_to_uid.is_some()
                    || self.opts.squash_to_gid.is_some();
                if !squash {
                    let uid = set.uid.map(|n| self.disk_uid(n)).transpose()?;
                    let gid = set.gid.map(|n| self.disk_gid(n)).transpose()?;
                    u.chown(&self.sys, uid, gid)
                        .inspect_err(|e| warn_unmapped(*e, uid, gid))?;
                }
            }
            if let Some(m) = set.mode {
                if st.kind != Kind::Symlink {
                    u.chmod(&self.sys, m & 0o7777)?;
                }
            }
        }
        if let Some(size) = set.size {
            if st.kind == Kind::Dir {
                return Err(Errno::ISDIR);
            }
            let by_handle = fh.and_then(|fh| self.handle(fh)).and_then(|h| match &*h {
                Handle::File(f) => {
                    Some(self.sys.ftruncate(f.fd_following_copy_up(&self.sys), size))
                }
                Handle::Dir { .. } => None,
            });
            match by_handle {
                Some(r) => r?,
                None => {
                    let fd = u.open(&self.sys, OFlags::WRONLY)?;
                    self.sys.ftruncate(fd.as_fd(), size)?;
                }
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let ts = |t: Option<SetTime>| match t {
                None => Timespec {
                    tv_sec: 0,
                    tv_nsec: sys::UTIME_OMIT as _,
                },
                Some(SetTime::Now) => Timespec {
                    tv_sec: 0,
                    tv_nsec: sys::UTIME_NOW as _,
                },
                Some(SetTime::At(s, ns)) => Timespec {
                    tv_sec: s,
                    tv_nsec: ns as _,
                },
            };
            u.utimens(&self.sys, ts(set.atime), ts(set.mtime))?;
        }
        self.getattr(Ino(ino), fh)
    }

    /// The mode a regular file (any file but a directory, for a change of owner) is left
    /// with once the kernel's rule for a write, truncate or chown by `caller` has dropped
    /// its set-id bits, or `None` when nothing is to drop. The rule (Linux 6.x,
    /// `should_remove_suid`/`setattr_should_drop_sgid`): set-user-id always goes;
    /// set-group-id goes when group-executable, or when the caller is neither root nor of
    /// the file's group (its primary group only: FUSE does not send the others). Only the
    /// callers the kernel would strip for may ask (the FUSE adapter decides: a write or
    /// truncate by a caller without CAP_FSETID, any chown).
    pub fn mode_without_setid(&self, ino: Ino, caller: Caller) -> Result<Option<u32>> {
        let a = self.getattr(ino, None)?;
        if a.kind == Kind::Dir {
            return Ok(None);
        }
        let mode = u32::from(a.perm);
        let mut drop = mode & libc::S_ISUID;
        let foreign = caller.uid != 0 && caller.gid != a.gid;
        if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || foreign) {
            drop |= libc::S_ISGID;
        }
        Ok((drop != 0).then_some(mode & !drop & 0o7777))
    }

    fn disk_uid(&self, shown: u32) -> Result<u32> {
        self.opts.uid_map.to_disk(shown).ok_or(Errno::INVAL)
    }

    fn disk_gid(&self, shown: u32) -> Result<u32> {
        self.opts.gid_map.to_disk(shown).ok_or(Errno::INVAL)
    }

    /// May this xattr be set or removed through the mount?
    fn check_xattr_change(&self, name: &OsStr) -> Result<()> {
        self.writable()?;
        if self.opts.noxattrs {
            return Err(Errno::NOTSUP);
        }
        if is_internal_xattr(name.as_bytes(), self.opts.xattr_permissions) {
            return Err(Errno::PERM);
        }
        Ok(())
    }

    /// Sets xattr `name` of `ino` (copied up first); internal names are refused.
    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let ino = ino.0;
        self.check_xattr_change(name)?;
        let node = self.node(ino)?;
        let u = self.copy_up_meta(&node)?;
        u.setxattr(&self.sys, &self.stored_xattr_name(name), value, flags)
    }

    /// Removes xattr `name` of `ino` (copied up first); internal names are refused.
    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()> {
        let ino = ino.0;
        self.check_xattr_change(name)?;
        let node = self.node(ino)?;
        // Nothing to remove: no need to copy up.
        let st = node.state();
        let stored = self.stored_xattr_name(name);
        st.top().getxattr(&self.sys, &stored)?;
        let u = self.copy_up_meta(&node)?;
        u.removexattr(&self.sys, &stored)
    }
}
