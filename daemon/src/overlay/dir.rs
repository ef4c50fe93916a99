//! Directory listing: the layers of a directory merged into one view.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::sync::Arc;

use parking_lot::Mutex;
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

/// What the merge knows of one name while walking the layers top-down.
struct Merging {
    name: OsString,
    kind: Kind,
    /// Inode number of the topmost entry.
    top_ino: u64,
    /// Directories: inode number of the topmost lower part, which lookup reports.
    first_lower_dir: Option<u64>,
    /// No lower layer can contribute any more (a non-directory, or an opaque directory).
    closed: bool,
}

impl Overlay {
    /// The entries visible in a directory, in layer order (upper first), without `.`/`..`,
    /// with the inode numbers lookup gives them. Whiteouts, `.wh.` files and opaque markers
    /// are dropped; a name in a higher layer hides the same name below it.
    pub(crate) fn merged_entries(&self, dir_ino: u64, st: &NodeState) -> Result<Vec<DirEntry>> {
        let mut out: Vec<Merging> = Vec::new();
        let mut index: HashMap<OsString, usize> = HashMap::new();
        let mut hidden: HashSet<OsString> = HashSet::new();
        let layers = st
            .upper_dir()?
            .into_iter()
            .map(|(_, fd)| (true, fd))
            .chain(st.lower_dirs()?.into_iter().map(|(_, _, fd)| (false, fd)));
        for (is_upper, fd) in layers {
            let dev = sys::fstat(fd.as_fd())?.st_dev;
            let mut this_hidden = Vec::new();
            let mut dir = sys::open_dir_stream(fd.as_fd())?;
            while let Some(ent) = dir.read() {
                let ent = ent?;
                let raw = ent.file_name().to_bytes();
                if raw == b"." || raw == b".." {
                    continue;
                }
                if let Some(rest) = raw.strip_prefix(WH_PREFIX) {
                    if !rest.starts_with(WH_PREFIX) {
                        let rest = OsStr::from_bytes(rest);
                        // A whiteout also ends the merging of a directory seen above.
                        if let Some(&i) = index.get(rest) {
                            out[i].closed = true;
                        }
                        this_hidden.push(rest.to_os_string());
                    }
                    continue;
                }
                let name = OsStr::from_bytes(raw);
                let mut ft = ent.file_type();
                let mut real_ino = ent.ino();
                if ft == sys::FileType::CharacterDevice || ft == sys::FileType::Unknown {
                    let Ok(s) = sys::stat_at(fd.as_fd(), name) else {
                        continue;
                    };
                    if is_whiteout(&s) {
                        if let Some(&i) = index.get(name) {
                            out[i].closed = true;
                        }
                        this_hidden.push(name.to_os_string());
                        continue;
                    }
                    ft = sys::FileType::from_raw_mode(s.st_mode);
                    real_ino = s.st_ino;
                }
                let kind = Kind::from_mode(ft.as_raw_mode());
                let mut ino = self.map_dev_ino(dev, real_ino);
                if !is_upper
                    && kind != Kind::Dir
                    && !index.contains_key(name)
                    && !hidden.contains(name)
                {
                    // Lower hard links get a number per name: lookup's rule needs the count.
                    if let Ok(s) = sys::stat_at(fd.as_fd(), name) {
                        ino = self.lower_file_ino(&s, dir_ino, name);
                    }
                }
                match index.get(name) {
                    Some(&i) => {
                        let m = &mut out[i];
                        if m.closed || m.kind != Kind::Dir {
                            continue;
                        }
                        if kind != Kind::Dir {
                            m.closed = true;
                        } else if m.first_lower_dir.is_none() {
                            m.first_lower_dir = Some(ino);
                            // Lookup reports the topmost lower part; nothing below matters.
                            m.closed = true;
                        }
                    }
                    None => {
                        if hidden.contains(name) {
                            continue;
                        }
                        let mut m = Merging {
                            name: name.to_os_string(),
                            kind,
                            top_ino: ino,
                            first_lower_dir: None,
                            closed: kind != Kind::Dir,
                        };
                        if kind == Kind::Dir {
                            if is_upper {
                                // An opaque upper directory has no lower part.
                                if let Ok(child) = sys::open_path_at(fd.as_fd(), name) {
                                    m.closed = self.is_opaque(child.as_fd());
                                }
                            } else {
                                m.first_lower_dir = Some(ino);
                                m.closed = true;
                            }
                        } else if is_upper {
                            // A copied-up file keeps its lower inode number.
                            let origin = sys::listxattr_at(fd.as_fd(), name)
                                .ok()
                                .and_then(|names| super::find_origin_name(&names))
                                .and_then(|x| sys::getxattr_at(fd.as_fd(), name, x).ok())
                                .and_then(|v| super::parse_origin(&v));
                            if let Some(n) = origin {
                                m.top_ino = n;
                            }
                        }
                        index.insert(name.to_os_string(), out.len());
                        out.push(m);
                    }
                }
            }
            hidden.extend(this_hidden);
        }
        Ok(out
            .into_iter()
            .map(|m| DirEntry {
                ino: if m.kind == Kind::Dir {
                    m.first_lower_dir.unwrap_or(m.top_ino)
                } else {
                    m.top_ino
                },
                name: m.name,
                kind: m.kind,
            })
            .collect())
    }

    /// The names visible in a directory.
    pub(crate) fn merged_names(&self, st: &NodeState) -> Result<Vec<OsString>> {
        Ok(self
            .merged_entries(0, st)?
            .into_iter()
            .map(|e| e.name)
            .collect())
    }

    /// Is the merged directory empty?
    pub(crate) fn merged_is_empty(&self, st: &NodeState) -> Result<bool> {
        Ok(self.merged_names(st)?.is_empty())
    }

    /// Open a directory. Its merged listing is taken at the first read.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let node = self.node(ino)?;
        if node.kind() != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        Ok(self.add_handle(Handle::Dir {
            ino,
            entries: Mutex::new(None),
        }))
    }

    /// The listing of an open directory, taken on first use and then kept by the handle.
    fn dir_entries(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>> {
        let h = self.handle(fh).ok_or(Errno::BADF)?;
        let Handle::Dir { ino, entries } = &*h else {
            return Err(Errno::NOTDIR);
        };
        let mut slot = entries.lock();
        if let Some(e) = &*slot {
            return Ok(e.clone());
        }
        let e = Arc::new(self.list_dir(*ino)?);
        *slot = Some(e.clone());
        Ok(e)
    }

    fn list_dir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let st = node.state();
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
        entries.extend(self.merged_entries(ino, &st)?);
        Ok(entries)
    }

    /// Entries from `offset` on; each entry's offset is its index + 1.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64) -> bool,
    ) -> Result<()> {
        let entries = self.dir_entries(fh)?;
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
        let entries = self.dir_entries(fh)?;
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
