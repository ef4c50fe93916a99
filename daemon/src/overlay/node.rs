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
    /// What few nodes have, out of line (every node of a walked tree stays in memory).
    rare: Option<Box<Rare>>,
}

/// The parts of a node's state that few nodes have.
#[derive(Clone, Default)]
struct Rare {
    /// A lower hard link copied up: its entry in the workdir's index, which every name of it
    /// is a hard link of in the upper layer (see [`super::INDEX_DIR`]).
    index_key: Option<OsString>,
    /// A directory: its upper part's redirect (see [`super::redirect`]) as read or written,
    /// where redirects are followed.
    redirect: Option<Vec<u8>>,
}

impl NodeState {
    /// A state with no index entry and no redirect; `lowers` keeps no spare capacity.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: Kind,
        parent: u64,
        name: OsString,
        upper: Option<Loc>,
        mut lowers: Vec<(u16, Loc)>,
        metacopy: bool,
        backing: (u64, u64),
    ) -> NodeState {
        lowers.shrink_to_fit();
        NodeState {
            kind,
            parent,
            name,
            upper,
            lowers,
            metacopy,
            backing,
            unlinked: false,
            rare: None,
        }
    }

    /// A copied-up lower hard link's entry in the workdir's index (see
    /// [`super::INDEX_DIR`]).
    pub fn index_key(&self) -> Option<&OsString> {
        self.rare.as_ref()?.index_key.as_ref()
    }

    pub fn set_index_key(&mut self, key: Option<OsString>) {
        self.change_rare(|r| r.index_key = key);
    }

    /// A directory's upper redirect (see [`super::redirect`]), where redirects are followed.
    pub fn redirect(&self) -> Option<&Vec<u8>> {
        self.rare.as_ref()?.redirect.as_ref()
    }

    pub fn set_redirect(&mut self, redirect: Option<Vec<u8>>) {
        self.change_rare(|r| r.redirect = redirect);
    }

    /// Change the rare parts; a node left with none holds no box for them.
    fn change_rare(&mut self, f: impl FnOnce(&mut Rare)) {
        let mut r = self.rare.take().map(|b| *b).unwrap_or_default();
        f(&mut r);
        if r.index_key.is_some() || r.redirect.is_some() {
            self.rare = Some(Box::new(r));
        }
    }

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

/// A hard-linked file's names: (parent, name).
type Aliases = Vec<(u64, OsString)>;

pub struct Node {
    pub ino: u64,
    nlookup: AtomicU64,
    state: Mutex<NodeState>,
    /// Held while this node is copied up, so that two writers copy it once.
    pub copyup: Mutex<()>,
    /// The names (parent, name) a file with several hard links was found by: its copy-up
    /// links each of them into the upper layer. Empty for files with one name.
    aliases: Mutex<Option<Box<Aliases>>>,
}

impl Node {
    pub fn new(ino: u64, state: NodeState) -> Node {
        Node {
            ino,
            nlookup: AtomicU64::new(0),
            state: Mutex::new(state),
            copyup: Mutex::new(()),
            aliases: Mutex::new(None),
        }
    }

    /// The names this file with several hard links is known by.
    pub fn aliases(&self) -> Vec<(u64, OsString)> {
        self.aliases.lock().as_deref().cloned().unwrap_or_default()
    }

    pub fn add_alias(&self, parent: u64, name: &OsStr) {
        let mut a = self.aliases.lock();
        let a = a.get_or_insert_default();
        if !a.iter().any(|(p, n)| *p == parent && n == name) {
            a.push((parent, name.to_os_string()));
        }
    }

    pub fn remove_alias(&self, parent: u64, name: &OsStr) {
        let mut a = self.aliases.lock();
        if let Some(v) = a.as_mut() {
            v.retain(|(p, n)| !(*p == parent && n == name));
            if v.is_empty() {
                *a = None;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file a walk meets keeps a node: with its `Arc` counts a node fills a 192-byte
    /// glibc chunk (184 usable) only while it is at most 168 bytes; the next size is 224.
    #[test]
    fn a_node_fits_a_192_byte_chunk() {
        assert!(
            std::mem::size_of::<Node>() <= 168,
            "Node is {} bytes",
            std::mem::size_of::<Node>()
        );
    }

    #[test]
    fn rare_parts_are_kept_out_of_line_only_while_set() {
        let lowers = Vec::with_capacity(4);
        let mut s = NodeState::new(Kind::Dir, ROOT_INO, "d".into(), None, lowers, false, (1, 2));
        assert_eq!(s.lowers.capacity(), 0, "no spare room kept for lower parts");
        assert!(s.rare.is_none() && s.index_key().is_none() && s.redirect().is_none());
        s.set_index_key(Some("k".into()));
        s.set_redirect(Some(b"/a/b".to_vec()));
        assert_eq!(s.index_key().map(|k| k.as_os_str()), Some(OsStr::new("k")));
        s.set_index_key(None);
        assert_eq!(s.redirect().map(|r| &r[..]), Some(&b"/a/b"[..]));
        assert!(s.index_key().is_none());
        s.set_redirect(None);
        assert!(s.rare.is_none(), "an empty box is dropped");
    }

    #[test]
    fn aliases_come_and_go() {
        let n = Node::new(
            5,
            NodeState::new(Kind::File, 1, "a".into(), None, Vec::new(), false, (1, 5)),
        );
        assert!(n.aliases().is_empty());
        n.add_alias(1, OsStr::new("a"));
        n.add_alias(1, OsStr::new("a"));
        n.add_alias(2, OsStr::new("b"));
        assert_eq!(n.aliases().len(), 2);
        n.remove_alias(1, OsStr::new("a"));
        n.remove_alias(2, OsStr::new("b"));
        assert!(n.aliases().is_empty() && n.aliases.lock().is_none());
    }
}
