//! The inode table: sharded, with per-inode state behind its own lock. No global lock.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::Kind;
use super::loc::{DirHandle, Loc};
use std::os::fd::OwnedFd;

/// FUSE's root node id.
pub const ROOT_INO: u64 = 1;

/// One lower part of a directory: layer index, handle, fd.
pub type LowerDir = (u16, Arc<DirHandle>, Arc<OwnedFd>);

/// What one overlay inode is made of right now.
#[derive(Clone)]
pub struct NodeState {
    pub kind: Kind,
    /// One name of this inode (the last one it was looked up or renamed to), for copy-up.
    pub parent: u64,
    pub name: OsString,
    /// The upper-layer file, once there is one.
    pub upper: Option<Loc>,
    /// Directories: the lower directories merged under this one, topmost first, down to the
    /// first opaque one. Other kinds: the one lower file, while there is no upper; with
    /// `metacopy`, the lower metacopy file (if the metadata is below) and the data file.
    pub lowers: Vec<(u16, Loc)>,
    /// A regular file whose topmost file holds its metadata only: the data is the last of
    /// `lowers`, until the first write copies it up.
    pub metacopy: bool,
    /// (st_dev, st_ino) of the topmost real file: tells a reused inode number from this one.
    pub backing: (u64, u64),
    /// No name reaches this inode any more (it lives on only through open handles).
    pub unlinked: bool,
    /// A lower hard link copied up: its entry in the workdir's index, which every name of it
    /// is a hard link of in the upper layer (see [`super::INDEX_DIR`]).
    pub index_key: Option<OsString>,
    /// A directory: its upper part's redirect (see [`super::redirect`]) as read or written,
    /// where redirects are followed.
    pub redirect: Option<Vec<u8>>,
}

impl NodeState {
    /// The topmost real file.
    pub fn top(&self) -> &Loc {
        self.upper
            .as_ref()
            .unwrap_or_else(|| &self.lowers.first().expect("a node has a layer").1)
    }

    /// Where the file's data is: for a metacopy the lower data file (EIO if no layer has
    /// it), else the topmost file.
    pub fn data(&self) -> super::Result<&Loc> {
        if self.metacopy {
            return match self.lowers.last() {
                Some((_, l)) if !self.top().same_place(l) => Ok(l),
                _ => Err(super::Errno::IO),
            };
        }
        Ok(self.top())
    }

    /// A directory's upper part: its handle and fd.
    pub fn upper_dir(&self) -> super::Result<Option<(Arc<DirHandle>, Arc<OwnedFd>)>> {
        match self.upper.as_ref().and_then(|l| l.dir_handle()) {
            Some(h) => Ok(Some((h.clone(), h.fd()?))),
            None => Ok(None),
        }
    }

    /// A directory's lower parts (layer, handle, fd), topmost first.
    pub fn lower_dirs(&self) -> super::Result<Vec<LowerDir>> {
        let mut out = Vec::with_capacity(self.lowers.len());
        for (l, loc) in &self.lowers {
            if let Some(h) = loc.dir_handle() {
                out.push((*l, h.clone(), h.fd()?));
            }
        }
        Ok(out)
    }

    /// Merged directory: an upper part and lower parts both.
    pub fn is_merged_dir(&self) -> bool {
        self.kind == Kind::Dir && self.upper.is_some() && !self.lowers.is_empty()
    }
}

/// Two lists of a directory's lower parts name the same directories, layer by layer.
fn same_lower_dirs(a: &[(u16, Loc)], b: &[(u16, Loc)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((la, a), (lb, b))| {
            la == lb
                && match (a.dir_handle(), b.dir_handle()) {
                    (Some(a), Some(b)) => a.same_dir(b),
                    _ => false,
                }
        })
}

pub struct Node {
    pub ino: u64,
    nlookup: AtomicU64,
    state: Mutex<NodeState>,
    /// Held while this node is copied up, so that two writers copy it once.
    pub copyup: Mutex<()>,
    /// The names (parent, name) a file with several hard links was found by: its copy-up
    /// links each of them into the upper layer. Empty for files with one name.
    aliases: Mutex<Vec<(u64, OsString)>>,
}

impl Node {
    pub fn new(ino: u64, state: NodeState) -> Node {
        Node {
            ino,
            nlookup: AtomicU64::new(0),
            state: Mutex::new(state),
            copyup: Mutex::new(()),
            aliases: Mutex::new(Vec::new()),
        }
    }

    /// The names this file with several hard links is known by.
    pub fn aliases(&self) -> Vec<(u64, OsString)> {
        self.aliases.lock().clone()
    }

    pub fn add_alias(&self, parent: u64, name: &OsStr) {
        let mut a = self.aliases.lock();
        if !a.iter().any(|(p, n)| *p == parent && n == name) {
            a.push((parent, name.to_os_string()));
        }
    }

    pub fn remove_alias(&self, parent: u64, name: &OsStr) {
        self.aliases
            .lock()
            .retain(|(p, n)| !(*p == parent && n == name));
    }

    /// A copy of the state (fds are shared, not duplicated).
    pub fn state(&self) -> NodeState {
        self.state.lock().clone()
    }

    /// Read part of the state under its lock, without copying the rest.
    pub fn read<R>(&self, f: impl FnOnce(&NodeState) -> R) -> R {
        f(&self.state.lock())
    }

    /// Change the state under its lock.
    pub fn update<R>(&self, f: impl FnOnce(&mut NodeState) -> R) -> R {
        f(&mut self.state.lock())
    }

    pub fn kind(&self) -> Kind {
        self.state.lock().kind
    }
}

const SHARDS: usize = 64;

/// After this many nodes are forgotten, freed memory is handed back to the kernel.
const RELEASE_EVERY: u64 = 1 << 16;

/// Node id → node, in independently locked shards.
pub struct NodeTable {
    shards: Vec<Mutex<HashMap<u64, Arc<Node>>>>,
    /// Nodes removed so far (see [`RELEASE_EVERY`]).
    removed: AtomicU64,
}

impl Default for NodeTable {
    fn default() -> Self {
        NodeTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            removed: AtomicU64::new(0),
        }
    }
}

impl NodeTable {
    fn shard(&self, ino: u64) -> &Mutex<HashMap<u64, Arc<Node>>> {
        // Inode numbers of one directory are often consecutive: spread them.
        let h = ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.shards[h as usize % SHARDS]
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.shard(ino).lock().get(&ino).cloned()
    }

    /// Insert the root (never forgotten).
    pub fn insert_root(&self, node: Node) {
        node.nlookup.store(1 << 40, Ordering::Relaxed);
        self.shard(node.ino).lock().insert(node.ino, Arc::new(node));
    }

    /// The node for `ino`, made from `state` when new; counts one kernel lookup when
    /// `count` is set. An existing node whose backing file differs (the inode number was
    /// reused, or a copy-up happened under another name) takes the new state.
    pub fn get_or_insert(&self, ino: u64, state: NodeState, count: bool) -> Arc<Node> {
        let mut shard = self.shard(ino).lock();
        let node = match shard.get(&ino) {
            Some(n) => {
                n.update(|s| {
                    let reused =
                        s.backing != state.backing && !(s.upper.is_some() && state.upper.is_none());
                    if reused || s.unlinked || s.kind != state.kind {
                        *s = state;
                    } else if s.kind == Kind::Dir {
                        // Keep the directory handles we have; refresh the name and layers.
                        if s.upper.is_none() && state.upper.is_some() {
                            s.upper = state.upper;
                        }
                        // The lower parts found again are the ones it has: they are kept,
                        // with what they know (fds, kept listings).
                        if !same_lower_dirs(&s.lowers, &state.lowers) {
                            s.lowers = state.lowers;
                        }
                        s.parent = state.parent;
                        s.name = state.name;
                    } else if !(s.upper.is_some() && state.upper.is_none()) {
                        // A file: the name it was just found by is its location now. Its
                        // data, once copied up, never goes back below: a lookup that read
                        // the metacopy mark just before the copy removed it is older news.
                        let data_up =
                            s.upper.is_some() && !s.metacopy && s.backing == state.backing;
                        *s = state;
                        if data_up && s.metacopy {
                            s.metacopy = false;
                            s.lowers.clear();
                        }
                    }
                });
                n.clone()
            }
            None => {
                let n = Arc::new(Node::new(ino, state));
                shard.insert(ino, n.clone());
                n
            }
        };
        if count {
            node.nlookup.fetch_add(1, Ordering::Relaxed);
        }
        node
    }

    /// The kernel dropped `n` references; the node goes when none are left.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let removed = {
            let mut shard = self.shard(ino).lock();
            let Some(node) = shard.get(&ino) else { return };
            let prev = node.nlookup.load(Ordering::Relaxed);
            let next = prev.saturating_sub(n);
            node.nlookup.store(next, Ordering::Relaxed);
            if next != 0 {
                return;
            }
            shard.remove(&ino)
        };
        // Freed outside the shard lock; the node may live on in a handle or a child.
        drop(removed);
        if (self.removed.fetch_add(1, Ordering::Relaxed) + 1) % RELEASE_EVERY == 0 {
            // A table that held a burst of entries keeps its buckets unless asked.
            for s in &self.shards {
                let mut s = s.lock();
                if s.capacity() > 1024 && s.len() < s.capacity() / 4 {
                    let len = s.len();
                    s.shrink_to(len * 2);
                }
            }
            crate::sys::release_free_memory();
        }
    }

    /// How many nodes are held (memory is bounded by what the kernel holds).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}
