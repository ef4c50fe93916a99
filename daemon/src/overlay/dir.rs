//! Directory listing: the layers of a directory merged into one view.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use super::node::NodeState;
use super::{Attr, Errno, Handle, Kind, Overlay, Result, WH_PREFIX, is_whiteout};
use crate::sys;

/// One entry of a merged directory.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    pub kind: Kind,
}

impl Overlay {
    /// The names visible in a directory, in layer order (upper first), without `.`/`..`.
    /// Whiteouts, `.wh.` files and opaque markers are dropped; an upper name hides the same
    /// name below it.
    pub(crate) fn merged_names(&self, st: &NodeState) -> Result<Vec<OsString>> {
        let mut out = Vec::new();
        let mut seen: HashSet<OsString> = HashSet::new();
        let mut hidden: HashSet<OsString> = HashSet::new();
        let layers = st.upper.iter().chain(st.lowers.iter().map(|(_, fd)| fd));
        for fd in layers {
            let mut this_hidden = Vec::new();
            let mut dir = sys::open_dir_stream(fd.as_fd())?;
            while let Some(ent) = dir.read() {
                let ent = ent?;
                let name = ent.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                if let Some(rest) = name.strip_prefix(WH_PREFIX) {
                    if !rest.starts_with(WH_PREFIX) {
                        this_hidden.push(OsStr::from_bytes(rest).to_os_string());
                    }
                    continue;
                }
                let name = OsStr::from_bytes(name);
                if ent.file_type() == sys::FileType::CharacterDevice
                    || ent.file_type() == sys::FileType::Unknown
                {
                    if let Ok(s) = sys::stat_at(fd.as_fd(), name) {
                        if is_whiteout(&s) {
                            this_hidden.push(name.to_os_string());
                            continue;
                        }
                    }
                }
                if seen.contains(name) || hidden.contains(name) {
                    continue;
                }
                seen.insert(name.to_os_string());
                out.push(name.to_os_string());
            }
            hidden.extend(this_hidden);
        }
        Ok(out)
    }

    /// Is the merged directory empty?
    pub(crate) fn merged_is_empty(&self, st: &NodeState) -> Result<bool> {
        Ok(self.merged_names(st)?.is_empty())
    }

    /// Open a directory: its merged listing is taken now and served from the handle.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let node = self.node(ino)?;
        let st = node.state();
        if st.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let mut entries = Vec::new();
        entries.push(DirEntry {
            name: ".".into(),
            ino,
            kind: Kind::Dir,
        });
        entries.push(DirEntry {
            name: "..".into(),
            ino: if ino == super::ROOT_INO {
                ino
            } else {
                st.parent
            },
            kind: Kind::Dir,
        });
        for name in self.merged_names(&st)? {
            // The same resolution as lookup, so that d_ino equals st_ino.
            if let Some(found) = self.resolve(&st, &name)? {
                entries.push(DirEntry {
                    name,
                    ino: found.ino,
                    kind: found.kind,
                });
            }
        }
        Ok(self.add_handle(Handle::Dir { entries }))
    }

    /// Entries from `offset` on; each entry's offset is its index + 1.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64) -> bool,
    ) -> Result<()> {
        let h = self.handle(fh).ok_or(Errno::BADF)?;
        let Handle::Dir { entries } = &*h else {
            return Err(Errno::NOTDIR);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if add(e, i as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    /// Like `readdir`, with a lookup (one kernel reference) for each entry but `.` and `..`.
    /// `add` returns true when the reply is full; that entry's reference is then given back.
    pub fn readdirplus(
        &self,
        fh: u64,
        dir_ino: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64, Option<&Attr>) -> bool,
    ) -> Result<()> {
        let h = self.handle(fh).ok_or(Errno::BADF)?;
        let Handle::Dir { entries } = &*h else {
            return Err(Errno::NOTDIR);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let off = i as u64 + 1;
            if e.name == "." || e.name == ".." {
                if add(e, off, None) {
                    break;
                }
                continue;
            }
            let attr = match self.lookup(dir_ino, &e.name) {
                Ok(a) => a,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e),
            };
            let shown = DirEntry {
                name: e.name.clone(),
                ino: attr.ino,
                kind: attr.kind,
            };
            if add(&shown, off, Some(&attr)) {
                self.forget(attr.ino, 1);
                break;
            }
        }
        Ok(())
    }
}
