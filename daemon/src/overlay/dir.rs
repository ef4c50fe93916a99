//! Directory listing: the layers of a directory merged into one view.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;
use std::os::unix::ffi::OsStrExt;

use super::node::NodeState;
use super::probe::{self, LowerHint, is_whiteout};
use super::tree::WH_PREFIX;
use super::{Attr, Errno, Fh, Handle, Ino, Kind, Overlay, Result};
use crate::sys;

/// Listings of directories read with no open handle: once the kernel stops sending OPENDIR
/// (`FUSE_NO_OPENDIR_SUPPORT`), a READDIR names only the directory. A listing is taken at the
/// READDIR at offset 0 and dropped at the one that finds its end; the offsets handed out carry
/// its generation in their high 32 bits, so a reader that started before another one rewound
/// keeps reading its own listing. With no RELEASEDIR to say a reader stopped half way, a
/// listing also goes when its directory's node is forgotten, when it has not been read for
/// [`LISTING_IDLE`], or, past [`LISTING_BUDGET`] entries in all, when it has not been read for
/// a second. A reader whose listing went on reads a new one from its index on (the same names
/// in the same order while the directory is unchanged).
#[derive(Default)]
pub(crate) struct Listings {
    shards: [Mutex<ListingShard>; LISTING_SHARDS],
    next_gen: std::sync::atomic::AtomicU32,
    /// Entries in all listings kept.
    total: std::sync::atomic::AtomicUsize,
}

struct Listing {
    generation: u32,
    entries: Arc<Vec<DirEntry>>,
    used: std::time::Instant,
}

const LISTING_SHARDS: usize = 16;
/// Directory inode -> its listings.
type ListingShard = HashMap<u64, Vec<Listing>>;
/// Listings kept per directory (readers that started at different times).
const LISTINGS_PER_DIR: usize = 4;
/// A listing not read for this long is dropped.
const LISTING_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// Past this many entries in all, listings idle for a second are dropped.
const LISTING_BUDGET: usize = 1 << 20;

impl Listings {
    fn shard(&self, ino: u64) -> &Mutex<ListingShard> {
        &self.shards[ino as usize % LISTING_SHARDS]
    }

    /// The listing `offset` continues (its generation and the index to start at), or a new
    /// one from `list` when there is none (offset 0, or one already dropped).
    fn get(
        &self,
        ino: u64,
        offset: u64,
        list: impl FnOnce() -> Result<Vec<DirEntry>>,
    ) -> Result<(u32, Arc<Vec<DirEntry>>, usize)> {
        let (generation, index) = ((offset >> 32) as u32, (offset & 0xffff_ffff) as usize);
        let now = std::time::Instant::now();
        if offset != 0 {
            let mut sh = self.shard(ino).lock();
            if let Some(l) = sh
                .get_mut(&ino)
                .and_then(|v| v.iter_mut().find(|l| l.generation == generation))
            {
                l.used = now;
                return Ok((generation, l.entries.clone(), index));
            }
        }
        let entries = Arc::new(list()?);
        // Generations 1..2^31: offsets stay positive as an off_t.
        let g = self
            .next_gen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 0x7fff_ffff
            + 1;
        let len = entries.len();
        {
            let mut sh = self.shard(ino).lock();
            self.sweep(&mut sh, now, LISTING_IDLE);
            self.total.fetch_add(len, Ordering::Relaxed);
            let v = sh.entry(ino).or_default();
            v.push(Listing {
                generation: g,
                entries: entries.clone(),
                used: now,
            });
            if v.len() > LISTINGS_PER_DIR {
                let gone = v.remove(0);
                self.total.fetch_sub(gone.entries.len(), Ordering::Relaxed);
            }
        }
        if self.total.load(Ordering::Relaxed) > LISTING_BUDGET {
            for sh in &self.shards {
                self.sweep(&mut sh.lock(), now, std::time::Duration::from_secs(1));
            }
        }
        Ok((g, entries, index))
    }

    /// Drop the listings of `sh` not read for `idle`.
    fn sweep(&self, sh: &mut ListingShard, now: std::time::Instant, idle: std::time::Duration) {
        sh.retain(|_, v| {
            v.retain(|l| {
                let keep = now.saturating_duration_since(l.used) < idle;
                if !keep {
                    self.total.fetch_sub(l.entries.len(), Ordering::Relaxed);
                }
                keep
            });
            !v.is_empty()
        });
    }

    fn drop_listing(&self, ino: u64, generation: u32) {
        let mut sh = self.shard(ino).lock();
        if let Some(v) = sh.get_mut(&ino) {
            v.retain(|l| {
                let keep = l.generation != generation;
                if !keep {
                    self.total.fetch_sub(l.entries.len(), Ordering::Relaxed);
                }
                keep
            });
            if v.is_empty() {
                sh.remove(&ino);
            }
        }
    }

    /// Drop the listings of `ino` once its node is gone (`alive` says whether it is).
    pub(crate) fn forget(&self, ino: u64, alive: impl FnOnce(u64) -> bool) {
        // Every FORGET comes here; most come while no listing is kept at all.
        if self.total.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut sh = self.shard(ino).lock();
        if sh.contains_key(&ino) && !alive(ino) {
            for l in sh.remove(&ino).unwrap_or_default() {
                self.total.fetch_sub(l.entries.len(), Ordering::Relaxed);
            }
        }
    }
}

/// Where a READDIR reads: an open handle's listing, or ([`Fh::NONE`], no OPENDIR) the
/// directory's.
struct Stream {
    entries: Arc<Vec<DirEntry>>,
    start: usize,
    /// The generation of a handle-less listing, carried in the offsets.
    generation: Option<u32>,
}

impl Stream {
    fn offset(&self, i: usize) -> u64 {
        (u64::from(self.generation.unwrap_or(0)) << 32) | (i as u64 + 1)
    }
}

/// One entry of a merged directory.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// The name shown in the directory.
    pub name: OsString,
    /// The inode number shown for it (the one a lookup gives).
    pub ino: Ino,
    /// Its kind.
    pub kind: Kind,
    /// What the listing saw of this name in the lower layers (which never change), so that a
    /// READDIRPLUS lookup probes only the layers that have it.
    pub(crate) hint: Option<LowerHint>,
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
    /// The lower layers below its first one that list it or its `.wh.` file. (The layers
    /// above its first one list neither, or it would not be visible.)
    hint: LowerHint,
}

impl Overlay {
    /// The entries visible in a directory, in layer order (upper first), without `.`/`..`,
    /// with the inode numbers lookup gives them. Whiteouts, `.wh.` files and opaque markers
    /// are dropped; a name in a higher layer hides the same name below it.
    pub(crate) fn merged_entries(&self, st: &NodeState) -> Result<Vec<DirEntry>> {
        let mut out: Vec<Merging> = Vec::new();
        let mut index: HashMap<OsString, usize> = HashMap::new();
        let mut hidden: HashSet<OsString> = HashSet::new();
        // Lookup hints (see `LowerHint`); none when a layer index is 64 or more.
        let mut hintable = true;
        let layers = st
            .upper_dir()?
            .into_iter()
            .map(|(_, fd)| (None, fd))
            .chain(st.lower_dirs()?.into_iter().map(|(l, _, fd)| (Some(l), fd)));
        for (layer, fd) in layers {
            let is_upper = layer.is_none();
            let bit = match layer {
                Some(l) if l < 64 => 1u64 << l,
                Some(_) => {
                    hintable = false;
                    0
                }
                None => 0,
            };
            let dev = self.sys.fstat(fd.as_fd())?.st_dev;
            let mut this_hidden = Vec::new();
            let mut dir = self.sys.open_dir_stream(fd.as_fd())?;
            while let Some(ent) = dir.read() {
                let ent = ent?;
                let raw = ent.file_name().to_bytes();
                if raw == b"." || raw == b".." {
                    continue;
                }
                if let Some(rest) = raw.strip_prefix(WH_PREFIX) {
                    if !rest.starts_with(WH_PREFIX) {
                        let rest = OsStr::from_bytes(rest);
                        // A whiteout also ends the merging of a directory seen above. (A name
                        // not seen above is hidden: it needs no hint.)
                        if let Some(&i) = index.get(rest) {
                            out[i].closed = true;
                            out[i].hint.wh |= bit;
                        }
                        this_hidden.push(rest.to_os_string());
                    }
                    continue;
                }
                let name = OsStr::from_bytes(raw);
                // Seen in a layer above (one lookup serves the whole entry).
                let seen = index.get(name).copied();
                if let Some(i) = seen {
                    out[i].hint.present |= bit;
                }
                let mut ft = ent.file_type();
                let mut real_ino = ent.ino();
                if ft == sys::FileType::CharacterDevice || ft == sys::FileType::Unknown {
                    let Ok(s) = self.sys.stat_at(fd.as_fd(), name) else {
                        continue;
                    };
                    if is_whiteout(&s) {
                        if let Some(i) = seen {
                            out[i].closed = true;
                        }
                        this_hidden.push(name.to_os_string());
                        continue;
                    }
                    ft = sys::FileType::from_raw_mode(s.st_mode);
                    real_ino = s.st_ino;
                }
                let kind = Kind::from_mode(ft.as_raw_mode());
                let ino = self.map_dev_ino(dev, real_ino);
                match seen {
                    Some(i) => {
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
                            hint: LowerHint {
                                present: bit,
                                wh: 0,
                            },
                        };
                        if kind == Kind::Dir {
                            if is_upper {
                                // An opaque upper directory has no lower part.
                                if let Ok(child) = self.sys.open_path_at(fd.as_fd(), name) {
                                    m.closed = probe::is_opaque(&self.sys, child.as_fd());
                                }
                            } else {
                                m.first_lower_dir = Some(ino);
                                m.closed = true;
                            }
                        } else if is_upper {
                            // A copied-up file keeps its lower inode number.
                            let origin =
                                self.sys
                                    .listxattr_at(fd.as_fd(), name)
                                    .ok()
                                    .and_then(|names| {
                                        probe::origin(&names, |x| {
                                            self.sys.getxattr_at(fd.as_fd(), name, x)
                                        })
                                    });
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
                ino: Ino(if m.kind == Kind::Dir {
                    m.first_lower_dir.unwrap_or(m.top_ino)
                } else {
                    m.top_ino
                }),
                hint: hintable.then_some(m.hint),
                name: m.name,
                kind: m.kind,
            })
            .collect())
    }

    /// The names visible in a directory.
    pub(crate) fn merged_names(&self, st: &NodeState) -> Result<Vec<OsString>> {
        Ok(self
            .merged_entries(st)?
            .into_iter()
            .map(|e| e.name)
            .collect())
    }

    /// Is the merged directory empty?
    pub(crate) fn merged_is_empty(&self, st: &NodeState) -> Result<bool> {
        Ok(self.merged_names(st)?.is_empty())
    }

    /// Opens directory `ino` and returns its handle (released with `release`); the merged
    /// listing is taken at the first read. No lookup reference changes.
    pub fn opendir(&self, ino: Ino) -> Result<Fh> {
        let ino = ino.0;
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
    fn dir_entries(&self, fh: Fh) -> Result<Arc<Vec<DirEntry>>> {
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
            ino: Ino(ino),
            kind: Kind::Dir,
            hint: None,
        });
        entries.push(DirEntry {
            name: "..".into(),
            ino: Ino(if ino == super::node::ROOT_INO {
                ino
            } else {
                st.parent
            }),
            kind: Kind::Dir,
            hint: None,
        });
        entries.extend(self.merged_entries(&st)?);
        Ok(entries)
    }

    /// The listing a READDIR of directory `ino` at `offset` reads: the handle's, or with
    /// [`Fh::NONE`] (the kernel sends no OPENDIR) the directory's own.
    fn stream(&self, fh: Fh, ino: u64, offset: u64) -> Result<Stream> {
        if fh != Fh::NONE {
            return Ok(Stream {
                entries: self.dir_entries(fh)?,
                start: offset as usize,
                generation: None,
            });
        }
        if self.node(ino)?.kind() != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let (generation, entries, start) = self.listings.get(ino, offset, || self.list_dir(ino))?;
        if start >= entries.len() {
            // The reader found the end: its listing is done.
            self.listings.drop_listing(ino, generation);
        }
        Ok(Stream {
            entries,
            start,
            generation: Some(generation),
        })
    }

    /// Passes the entries of directory `ino` (open as `fh`, or [`Fh::NONE`]) from `offset` on
    /// to `add` with the offset the next READDIR starts at, until `add` says the reply is
    /// full; adds no lookup reference.
    pub fn readdir(
        &self,
        fh: Fh,
        ino: Ino,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64) -> bool,
    ) -> Result<()> {
        let ino = ino.0;
        let s = self.stream(fh, ino, offset)?;
        for (i, e) in s.entries.iter().enumerate().skip(s.start) {
            if add(e, s.offset(i)) {
                break;
            }
        }
        Ok(())
    }

    /// [`Overlay::readdir`] with each entry's attributes: adds one lookup reference per entry
    /// passed with attributes (all but `.`, `..` and an entry whose lookup fails with EIO,
    /// see [`Overlay`]); the entry that `add` finds no room for (it returns true) gets its
    /// reference given back.
    pub fn readdirplus(
        &self,
        fh: Fh,
        dir_ino: Ino,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64, Option<&Attr>) -> bool,
    ) -> Result<()> {
        let dir_ino = dir_ino.0;
        let s = self.stream(fh, dir_ino, offset)?;
        // The nodes this answer holds a lookup reference of: entries given to `add` reach
        // the kernel only with a successful answer.
        let mut counted = Vec::new();
        for (i, e) in s.entries.iter().enumerate().skip(s.start) {
            let off = s.offset(i);
            if e.name == "." || e.name == ".." {
                if add(e, off, None) {
                    break;
                }
                continue;
            }
            let attr = match self.lookup_hinted(dir_ino, &e.name, e.hint.as_ref()) {
                Ok(a) => a,
                Err(Errno::NOENT) => continue,
                // An entry whose layers are damaged (an invalid redirect) is listed without
                // attributes, as kernel overlayfs lists it: the directory stays listable,
                // the entry's own lookup fails. Other errors (EPERM of `nofollow`, as the
                // kernel's listing of an impure directory) fail the listing.
                Err(err @ Errno::IO) => {
                    tracing::debug!(name = ?e.name, error = %super::errstr(err), "entry listed without attributes");
                    if add(e, off, None) {
                        break;
                    }
                    continue;
                }
                Err(err) => {
                    // The kernel drops the entries of an error answer: their lookups are
                    // given back here, or they would never be forgotten.
                    for ino in counted {
                        self.forget(ino, 1);
                    }
                    return Err(err);
                }
            };
            let shown = DirEntry {
                name: e.name.clone(),
                ino: attr.ino,
                kind: attr.kind,
                hint: None,
            };
            if add(&shown, off, Some(&attr)) {
                self.forget(attr.ino, 1);
                break;
            }
            counted.push(attr.ino);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(n: usize) -> Vec<DirEntry> {
        (0..n)
            .map(|i| DirEntry {
                name: format!("e{i}").into(),
                ino: Ino(i as u64 + 10),
                kind: Kind::File,
                hint: None,
            })
            .collect()
    }

    #[test]
    fn listings_follow_their_generation_and_go_at_the_end() {
        let l = Listings::default();
        let built = std::cell::Cell::new(0);
        let list = |n| {
            built.set(built.get() + 1);
            Ok(listing(n))
        };
        let (g1, a, i) = l.get(7, 0, || list(5)).unwrap();
        assert_eq!((a.len(), i), (5, 0));
        // A second reader rewinds: a new listing, the first one still there for its reader.
        let (g2, _, _) = l.get(7, 0, || list(6)).unwrap();
        assert_ne!(g1, g2);
        let (g, again, i) = l.get(7, (u64::from(g1) << 32) | 3, || list(9)).unwrap();
        assert_eq!((g, again.len(), i), (g1, 5, 3));
        assert_eq!(built.get(), 2, "the first reader's listing was reused");
        assert_eq!(l.total.load(Ordering::Relaxed), 11);
        l.drop_listing(7, g1);
        assert_eq!(l.total.load(Ordering::Relaxed), 6);
        // Its generation gone, a reader goes on in a new listing from its index.
        let (g3, b, i) = l.get(7, (u64::from(g1) << 32) | 3, || list(6)).unwrap();
        assert!(g3 != g1 && g3 != g2);
        assert_eq!((b.len(), i), (6, 3));
        // Forgotten directory: everything goes.
        l.forget(7, |_| false);
        assert_eq!(l.total.load(Ordering::Relaxed), 0);
        assert!(l.shard(7).lock().is_empty());
    }

    #[test]
    fn listings_of_one_directory_are_bounded() {
        let l = Listings::default();
        for _ in 0..10 {
            l.get(3, 0, || Ok(listing(2))).unwrap();
        }
        assert_eq!(l.shard(3).lock()[&3].len(), LISTINGS_PER_DIR);
        assert_eq!(l.total.load(Ordering::Relaxed), 2 * LISTINGS_PER_DIR);
    }
}
