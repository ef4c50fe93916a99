//! The overlay: layer stack, lookup across layers, whiteouts and opaque directories, copy-up,
//! inode numbers. It knows nothing of FUSE: callers pass inode numbers and names and get
//! [`Attr`]s, handles and errnos back.
#![forbid(unsafe_code)]

mod copyup;
mod dir;
mod durable;
mod loc;
mod node;
mod probe;
mod redirect;
mod tree;
mod write;

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::options::{OverlayOptions, XattrPermissions};
use crate::sys::{self, Compat, Errno, OFlags, Stat, Sys};

pub use dir::DirEntry;
use loc::{DirFdCache, DirHandle, Loc};
use node::{Node, NodeState, NodeTable};
use probe::{LowerHint, Probe};
use redirect::Target;
use tree::WH_PREFIX;

/// What the overlay answers: a value, or the errno the caller gets.
pub type Result<T> = std::result::Result<T, Errno>;

/// File kinds, as the overlay reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
}

impl Kind {
    /// The kind an `st_mode` says (anything unknown is a regular file).
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::Char,
            libc::S_IFBLK => Kind::Block,
            _ => Kind::File,
        }
    }

    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::Char => libc::S_IFCHR,
            Kind::Block => libc::S_IFBLK,
        }
    }
}

/// Attributes of an overlay inode, as shown through the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub size: u64,
    pub blocks: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// An inode number, as the kernel sees it: what `lookup` and the calls that make a name
/// give (in [`Attr::ino`]) and what the calls on an inode take. A type of its own so that it
/// cannot be passed where a handle number or an offset is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(pub u64);

/// The root directory's inode number (FUSE's root id, 1); never forgotten.
pub const ROOT_INO: Ino = Ino(node::ROOT_INO);

/// What a rename does with an existing destination: renameat2's flags the core honours,
/// decoded once by the FUSE adapter (a request with other flags, or with both, is EINVAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    /// No flag: an existing destination is replaced.
    Replace,
    /// `RENAME_NOREPLACE`: an existing destination is EEXIST.
    NoReplace,
    /// `RENAME_EXCHANGE`: the two names swap; a missing destination is ENOENT.
    Exchange,
}

/// The number of an open file or directory handle: what `open`, `create` and `opendir` give
/// and `release` takes back. A type of its own so that it cannot be passed where an inode
/// number is meant (`readdir(fh, ino)` and `getattr(ino, fh)` take both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fh(pub u64);

impl Fh {
    /// No handle: what the kernel sends to READDIR a directory it never opened (with
    /// FOPEN_CACHE_DIR or NO_OPENDIR); the directory's own listing is read.
    pub const NONE: Fh = Fh(0);
}

/// Who asks: the caller's ids as shown through the mount.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set: a value, or "now".
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(i64, u32),
}

/// The parts of `setattr` the caller asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// Statistics of the filesystem holding the upper layer (or the top lower one).
#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

pub(crate) struct Layer {
    pub fd: Arc<OwnedFd>,
    /// Where the layer is, for messages.
    pub path: PathBuf,
}

/// How one overlay is set up: its mount options and what the environment asked for. `main`
/// builds it, reading the environment there and only there; a test builds its own.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `-o` options.
    pub options: OverlayOptions,
    /// Limits of the kernel to behave as (Linux 4.18 with `RUSTFUSE_COMPAT_4_18`).
    pub compat: Compat,
    /// Never make whiteouts as 0/0 character devices, always as `.wh.` files
    /// (`FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT`, as fuse-overlayfs reads it).
    pub no_dev_whiteouts: bool,
}

impl Config {
    /// The options with the host kernel as it is and device whiteouts where they work.
    pub fn new(options: OverlayOptions) -> Config {
        Config {
            options,
            compat: Compat::native(),
            no_dev_whiteouts: false,
        }
    }
}

/// Errors setting up a mount, before anything is mounted.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("option {option}: {path}: {reason}")]
    Path {
        option: &'static str,
        path: PathBuf,
        reason: String,
    },
}

fn path_err(option: &'static str, path: &Path, reason: impl Into<String>) -> SetupError {
    SetupError::Path {
        option,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Names of internal xattrs: hidden from getxattr/listxattr, refused to setxattr.
pub(crate) fn is_internal_xattr(name: &[u8], perms: XattrPermissions) -> bool {
    name.starts_with(b"user.fuseoverlayfs.")
        || name.starts_with(b"trusted.overlay.")
        || name.starts_with(b"user.overlay.")
        || (perms == XattrPermissions::User
            && (name.starts_with(b"user.containers.override_stat")
                || name.starts_with(b"user.containers.override_security.")))
        || (perms == XattrPermissions::Security && name.starts_with(b"security.fuseoverlayfs."))
}

/// Where a copied-up file keeps the inode number it showed before: in the overlay namespaces
/// that kernel overlayfs and fuse-overlayfs hide, so that a layer written here reads the same
/// through them. `trusted.` where permitted (it also works on symlinks), else `user.`.
pub(crate) const OVERRIDE_USER: &str = "user.containers.override_stat";
pub(crate) const OVERRIDE_USER_LEGACY: &str = "user.fuseoverlayfs.override_stat";
pub(crate) const ORIGIN_XATTR: &str = "user.overlay.rustfuse.origin";
pub(crate) const ORIGIN_XATTR_TRUSTED: &str = "trusted.overlay.rustfuse.origin";
pub(crate) const OPAQUE_XATTRS: [&str; 3] = [
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];
/// The mark of a metacopy upper file (kernel overlayfs's names: `trusted.` for a privileged
/// mount, `user.` with `userxattr`); read in both, written in the first one permitted.
pub(crate) const METACOPY_XATTRS: [&str; 2] = ["trusted.overlay.metacopy", "user.overlay.metacopy"];
/// Where a renamed metacopy's data is (kernel overlayfs's `redirect`): a name in the same
/// directory, or a path from the layer root starting with `/`.
pub const REDIRECT_XATTRS: [&str; 2] = ["trusted.overlay.redirect", "user.overlay.redirect"];
/// `<workdir>/rustfuse-index/`: one entry per copied-up lower hard link, named by the lower
/// file's filesystem id and inode number (`FSID-INO`, hex), a hard link of its upper copy. A
/// lookup of any other name of that lower file finds the copy here, and links it into the
/// upper layer under that name, so every name stays one file, in this mount and the next
/// (kernel overlayfs's `index=on`, in a directory of its own).
pub(crate) const INDEX_DIR: &str = "rustfuse-index";
/// On an index entry: `DELTA KEY`, the link count shown minus the upper inode's own (which
/// counts the index entry and the names linked so far), and the entry's name. `trusted.`
/// where permitted, else `user.`.
pub(crate) const NLINK_XATTRS: [&str; 2] = [
    "trusted.overlay.rustfuse.nlink",
    "user.overlay.rustfuse.nlink",
];

/// What one lower layer said about a lookup's [`Target`] ([`Overlay::probe_target`]).
struct TargetStep {
    probe: Probe,
    /// The directory the last part was probed in, its fd, and that part.
    dir: Arc<DirHandle>,
    fd: Arc<OwnedFd>,
    name: OsString,
    /// An opaque directory on the way: the layers below have nothing to add.
    stop_below: bool,
    /// The target for the layers below (changed by a redirect on the way).
    target: Target,
    /// A redirect was met on the way (with `nofollow`, what is found from here is refused).
    redirected: bool,
}

/// What a lookup of one name across the layers found.
pub(crate) struct Found {
    pub kind: Kind,
    pub upper: Option<Loc>,
    pub lowers: Vec<(u16, Loc)>,
    /// stat of the topmost real file.
    pub top: Stat,
    pub ino: u64,
    /// The upper file is a metacopy; `lowers` holds the data file, if any layer has it.
    pub metacopy: bool,
    /// A copied-up lower hard link: its index entry (see [`INDEX_DIR`]).
    pub index_key: Option<OsString>,
    /// This name is a lower name of an indexed file that is not linked in the upper layer
    /// yet (`upper` is the index entry).
    pub link_up: bool,
    /// A directory: its upper part's redirect (see [`redirect`]), where redirects are
    /// followed.
    pub redirect: Option<Vec<u8>>,
}

enum Handle {
    File(FileHandle),
    /// The merged listing is taken at the first readdir, not at opendir: with the kernel's
    /// directory cache most opens never read.
    Dir {
        ino: u64,
        entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
    },
}

/// An open file.
pub(crate) struct FileHandle {
    fd: OwnedFd,
    /// Opened for reading while the file was only in a lower layer: once it is copied up
    /// (another open writes it), reads go to the copy, as with kernel overlayfs, and never
    /// past the end of the old file while the kernel already shows the new size.
    below: Option<Below>,
    /// The fd is a regular file that stays the file's data for the handle's life (one of
    /// the upper layer, or any in a read-only mount, where nothing is copied up): it can back
    /// FUSE passthrough.
    stable: bool,
}

struct Below {
    node: Arc<Node>,
    flags: OFlags,
    up: std::sync::OnceLock<OwnedFd>,
}

impl FileHandle {
    /// A regular file of the upper layer.
    pub(crate) fn upper(fd: OwnedFd) -> FileHandle {
        FileHandle {
            fd,
            below: None,
            stable: true,
        }
    }

    /// The descriptor I/O goes to: for a handle opened below, the file's copy in the upper
    /// layer once it has its data (opened here the first time it is seen, and kept), else
    /// the handle's own fd (`sys`: the overlay's seam, for that open). The node is only read.
    fn fd_following_copy_up(&self, sys: &Sys) -> BorrowedFd<'_> {
        if let Some(b) = &self.below {
            if b.up.get().is_none() {
                // A metacopy's upper file holds no data until the data is copied up.
                if let Some(loc) = b.node.read(|s| s.upper.clone().filter(|_| !s.metacopy)) {
                    // Only the copy itself: a rename between reading the location and
                    // opening it would leave another file there.
                    if let Ok(fd) = loc.open(sys, b.flags) {
                        let backing = b.node.read(|s| s.backing);
                        if sys
                            .fstat(fd.as_fd())
                            .is_ok_and(|st| (st.st_dev, st.st_ino) == backing)
                        {
                            let _ = b.up.set(fd);
                        }
                    }
                }
            }
            if let Some(up) = b.up.get() {
                return up.as_fd();
            }
        }
        self.fd.as_fd()
    }
}

const HANDLE_SHARDS: usize = 32;

/// The overlay filesystem: one mount's layers, inode table and open handles.
///
/// # Lookup count
///
/// An inode number stays valid while the kernel holds lookup references to it, counted as
/// FUSE counts them. These calls add one reference when they succeed, which the caller (the
/// kernel) gives back with [`Overlay::forget`]: [`lookup`](Overlay::lookup),
/// [`create`](Overlay::create), [`mkdir`](Overlay::mkdir), [`mknod`](Overlay::mknod),
/// [`symlink`](Overlay::symlink), [`link`](Overlay::link), and
/// [`readdirplus`](Overlay::readdirplus) for each entry it passes with attributes. No other
/// call adds or drops one: `getattr`, `open`, `opendir`, `setattr` take an inode number the
/// caller already holds, and `unlink`, `rmdir` and `rename` leave a removed inode in place
/// until it is forgotten. The root ([`ROOT_INO`]) is never forgotten. Open handles (`open`,
/// `create`, `opendir`) are counted apart: each is given back once with
/// [`release`](Overlay::release).
pub struct Overlay {
    pub(crate) opts: OverlayOptions,
    /// This overlay's kernel-call seam: its compatibility limits and its planned fault.
    pub(crate) sys: Arc<Sys>,
    /// This overlay's cached directory fds and their budget.
    dir_fds: Arc<DirFdCache>,
    pub(crate) lowers: Vec<Layer>,
    pub(crate) upper: Option<Layer>,
    /// `<workdir>/work`: where copy-ups and replacements are built before they appear.
    pub(crate) work: Option<Arc<OwnedFd>>,
    nodes: NodeTable,
    handles: Vec<Mutex<std::collections::HashMap<Fh, Arc<Handle>>>>,
    /// Listings of directories read with no open handle (see [`dir::Listings`]).
    listings: dir::Listings,
    next_fh: AtomicU64,
    next_tmp: AtomicU64,
    /// Devices of lower layers whose files the upper layer's filesystem cannot FICLONE:
    /// their copy-ups go straight to copy_file_range (decided per layer, never for all).
    pub(crate) no_clone_from: parking_lot::RwLock<std::collections::HashSet<u64>>,
    /// Whiteouts can be 0/0 character devices (mknod works in the workdir): asked at the
    /// first whiteout ([`Overlay::dev_whiteouts`]); false from the start with
    /// `no_dev_whiteouts` or without a workdir.
    dev_whiteouts: std::sync::OnceLock<bool>,
    /// Copies synced before they are answered can be built as anonymous files (see
    /// `Overlay::tmpfile_copies`): asked at the first such copy.
    tmpfile_copies: std::sync::OnceLock<bool>,
    /// Inode numbers come from more than one filesystem: tag them by layer device.
    devs: Vec<u64>,
    /// The ids shown for ids outside the maps (`/proc/sys/kernel/overflow{u,g}id`), read
    /// when first needed.
    overflow_ids: std::sync::OnceLock<(u32, u32)>,
    pub(crate) override_xattr: Option<&'static str>,
    /// No upper layer, or `ro`: every change answers EROFS and nothing is written.
    read_only: bool,
    /// `<workdir>/rustfuse-index` (see [`INDEX_DIR`]); none without an upper layer, or in a
    /// read-only mount that finds none.
    pub(crate) index: Option<Arc<DirHandle>>,
    /// (st_dev, filesystem id) of each lower layer, for index keys.
    fs_ids: Vec<(u64, u64)>,
    /// Syncs copy-ups off the request path (see [`durable`]); none with `fsync=0`, without
    /// an upper layer, or where the boot id cannot be read (copy-ups then sync in place).
    pub(crate) syncer: Option<durable::Syncer>,
    /// Directories whose redirect was refused and logged: each is logged once (a lookup of
    /// one fails every time).
    refused_logged: Mutex<std::collections::HashSet<PathBuf>>,
}

impl Overlay {
    /// Open the layers and prepare the workdir, with the default [`Config`] for `opts`.
    /// Every problem names the option and path.
    pub fn new(opts: OverlayOptions) -> std::result::Result<Overlay, SetupError> {
        Overlay::with_config(Config::new(opts))
    }

    /// Open the layers and prepare the workdir as `config` says. Every problem names the
    /// option and path.
    pub fn with_config(config: Config) -> std::result::Result<Overlay, SetupError> {
        let Config {
            options: opts,
            compat,
            no_dev_whiteouts,
        } = config;
        let sys = Arc::new(Sys::new(compat));
        // Directory fds are cached within half the descriptor limit; the rest is for open
        // files and the process itself.
        let dir_fds = DirFdCache::new(
            sys.clone(),
            (sys::nofile_limit().saturating_sub(512) / 2) as usize,
        );
        let mut lowers = Vec::new();
        for p in &opts.lowerdirs {
            let fd = sys.open_dir_path(p).map_err(|e| {
                path_err(
                    "lowerdir",
                    p,
                    format!("cannot open directory: {}", errstr(e)),
                )
            })?;
            lowers.push(Layer {
                fd: Arc::new(fd),
                path: p.clone(),
            });
        }
        if lowers.len() > u16::MAX as usize {
            return Err(path_err("lowerdir", Path::new(""), "too many layers"));
        }
        let mut upper = None;
        let mut work = None;
        let mut index = None;
        let dev_whiteouts = std::sync::OnceLock::new();
        let mut syncer = None;
        // A read-only mount (`ro`, BuildKit's and containerd's read-only mounts of an active
        // snapshot) shows the upper layer too, and writes nothing anywhere: the workdir is
        // only checked, never prepared or probed (a read-write mount of the same layers may
        // be live and using it).
        if let (Some(u), Some(w)) = (&opts.upperdir, &opts.workdir) {
            let ufd = sys.open_dir_path(u).map_err(|e| {
                path_err(
                    "upperdir",
                    u,
                    format!("cannot open directory: {}", errstr(e)),
                )
            })?;
            let wfd = sys.open_dir_path(w).map_err(|e| {
                path_err(
                    "workdir",
                    w,
                    format!("cannot open directory: {}", errstr(e)),
                )
            })?;
            let ust = sys
                .fstat(ufd.as_fd())
                .map_err(|e| path_err("upperdir", u, errstr(e)))?;
            let wst = sys
                .fstat(wfd.as_fd())
                .map_err(|e| path_err("workdir", w, errstr(e)))?;
            if ust.st_dev != wst.st_dev {
                return Err(path_err(
                    "workdir",
                    w,
                    format!(
                        "not on the same filesystem as upperdir {} (renames between them would fail)",
                        u.display()
                    ),
                ));
            }
            index = open_index(&sys, &dir_fds, wfd.as_fd(), !opts.read_only).map_err(|e| {
                path_err(
                    "workdir",
                    w,
                    format!("cannot prepare {INDEX_DIR}/: {}", errstr(e)),
                )
            })?;
            if !opts.read_only {
                let wk = prepare_workdir(&sys, wfd.as_fd()).map_err(|e| {
                    path_err("workdir", w, format!("cannot prepare work/: {}", errstr(e)))
                })?;
                if no_dev_whiteouts {
                    let _ = dev_whiteouts.set(false);
                }
                work = Some(Arc::new(wk));
                // Copies a crash left unsynced are made whole before anything is served.
                match durable::recover(&sys, wfd.as_fd(), ufd.as_fd(), &lowers) {
                    Ok(r) if r != durable::Recovered::default() => tracing::warn!(
                        synced = r.synced,
                        whole = r.whole,
                        restored = r.restored,
                        failed = r.failed,
                        "copy-ups not synced before a crash: those of this boot synced, those of an earlier boot kept if whole, else given their lower content again"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(path_err(
                            "workdir",
                            w,
                            format!(
                                "cannot recover the copy-ups a crash left unsynced ({}.*): {}",
                                durable::UNSYNCED_FLAG,
                                errstr(e)
                            ),
                        ));
                    }
                }
                if opts.fsync && durable::may_sync_later(opts.background_sync, ufd.as_fd(), u) {
                    syncer = durable::Syncer::start(sys.clone(), wfd.as_fd());
                }
            }
            upper = Some(Layer {
                fd: Arc::new(ufd),
                path: u.clone(),
            });
        }
        let read_only = work.is_none();
        let mut fs_ids = Vec::new();
        for l in &lowers {
            if let (Ok(st), Ok(id)) = (sys.fstat(l.fd.as_fd()), sys.fs_id(l.fd.as_fd())) {
                fs_ids.push((st.st_dev, id));
            }
        }
        let mut devs = Vec::new();
        for l in upper.iter().chain(lowers.iter()) {
            if let Ok(st) = sys.fstat(l.fd.as_fd()) {
                if !devs.contains(&st.st_dev) {
                    devs.push(st.st_dev);
                }
            }
        }
        let override_xattr = match opts.xattr_permissions {
            XattrPermissions::Off => None,
            XattrPermissions::Security => Some("security.fuseoverlayfs.override_stat"),
            XattrPermissions::User => {
                let legacy = upper.as_ref().is_some_and(|u| {
                    sys.fgetxattr(u.fd.as_fd(), OsStr::new("user.fuseoverlayfs.override_stat"))
                        .is_ok()
                });
                Some(if legacy {
                    OVERRIDE_USER_LEGACY
                } else {
                    OVERRIDE_USER
                })
            }
        };
        let ov = Overlay {
            opts,
            sys,
            dir_fds,
            lowers,
            upper,
            work,
            nodes: NodeTable::default(),
            handles: (0..HANDLE_SHARDS)
                .map(|_| Mutex::new(Default::default()))
                .collect(),
            next_fh: AtomicU64::new(1),
            listings: Default::default(),
            next_tmp: AtomicU64::new(0),
            no_clone_from: Default::default(),
            dev_whiteouts,
            tmpfile_copies: std::sync::OnceLock::new(),
            devs,
            overflow_ids: Default::default(),
            override_xattr,
            read_only,
            index,
            fs_ids,
            refused_logged: Mutex::new(std::collections::HashSet::new()),
            syncer,
        };
        if !ov.read_only {
            ov.clean_index();
        }
        ov.make_root()
            .map_err(|e| path_err("lowerdir", Path::new(""), format!("root: {}", errstr(e))))?;
        Ok(ov)
    }

    /// May whiteouts be 0/0 character devices? Asked of the workdir once, at the first
    /// whiteout (a mount that never removes a lower name never makes the probe).
    pub(crate) fn dev_whiteouts(&self) -> bool {
        *self.dev_whiteouts.get_or_init(|| {
            self.work.as_ref().is_some_and(|w| {
                self.sys
                    .dev_whiteouts_work(w.as_fd(), OsStr::new(".rustfuse-whiteout-probe"))
            })
        })
    }

    /// The uid and gid shown for ids outside the maps, read at the first such id.
    fn overflow_ids(&self) -> (u32, u32) {
        *self.overflow_ids.get_or_init(|| {
            (
                read_overflow("/proc/sys/kernel/overflowuid"),
                read_overflow("/proc/sys/kernel/overflowgid"),
            )
        })
    }

    fn make_root(&self) -> Result<()> {
        let mut lowers = Vec::new();
        for (i, l) in self.lowers.iter().enumerate() {
            lowers.push((
                i as u16,
                Loc::Dir(DirHandle::root(&self.dir_fds, l.fd.clone())),
            ));
            if probe::is_opaque(&self.sys, l.fd.as_fd()) {
                break;
            }
        }
        let upper = self.upper.as_ref().map(|u| u.fd.clone());
        let top = upper.clone().unwrap_or_else(|| self.lowers[0].fd.clone());
        let st = self.sys.fstat(top.as_fd())?;
        // An opaque upper root hides every lower layer.
        if let Some(u) = &upper {
            if probe::is_opaque(&self.sys, u.as_fd()) {
                lowers.clear();
            }
        }
        self.nodes.insert_root(Node::new(
            node::ROOT_INO,
            NodeState::new(
                Kind::Dir,
                node::ROOT_INO,
                OsString::new(),
                upper.map(|u| Loc::Dir(DirHandle::root(&self.dir_fds, u))),
                lowers,
                false,
                (st.st_dev, st.st_ino),
            ),
        ));
        Ok(())
    }

    /// The upper layer (if any) and the lower layers, topmost first.
    pub fn layer_paths(&self) -> (Option<&Path>, Vec<&Path>) {
        (
            self.upper.as_ref().map(|u| u.path.as_path()),
            self.lowers.iter().map(|l| l.path.as_path()).collect(),
        )
    }

    /// Whether changes answer EROFS: no upper layer, or mounted `ro` (the upper layer is then
    /// shown as it is, read-only).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The options this overlay was set up with.
    pub fn options(&self) -> &OverlayOptions {
        &self.opts
    }

    /// This overlay's fault plan: a fault planned here fails a kernel call of this overlay
    /// only (effective in tests and `fault-injection` builds).
    pub fn faults(&self) -> &sys::faults::Faults {
        self.sys.faults()
    }

    /// Directory fds this overlay holds open right now (for tests and diagnostics).
    pub fn cached_dir_fds(&self) -> usize {
        self.dir_fds.cached()
    }

    /// Lets at most `n` (at least 16) directory fds of this overlay stay open.
    pub fn set_dir_fd_budget(&self, n: usize) {
        self.dir_fds.set_budget(n);
    }

    /// How many inodes are held in memory (the root and those the kernel has not forgotten).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn node(&self, ino: u64) -> Result<Arc<Node>> {
        self.nodes.get(ino).ok_or(Errno::STALE)
    }

    pub(crate) fn tmp_name(&self) -> OsString {
        tree::tmp_name(self.next_tmp.fetch_add(1, Ordering::Relaxed))
    }

    // ------------------------------------------------ inode numbers, walks over the layers

    pub(crate) fn map_ino(&self, st: &Stat) -> u64 {
        self.map_dev_ino(st.st_dev, st.st_ino)
    }

    /// The inode number shown for a real (device, inode): the real one when all layers share
    /// a filesystem, else tagged with the layer filesystem's index in the high bits.
    pub(crate) fn map_dev_ino(&self, dev: u64, real: u64) -> u64 {
        let mut ino = real;
        if self.devs.len() > 1 {
            let idx = self
                .devs
                .iter()
                .position(|d| *d == dev)
                .unwrap_or(self.devs.len());
            ino ^= (idx as u64) << 56;
        }
        if ino <= node::ROOT_INO {
            ino |= 1 << 63;
        }
        ino
    }

    /// Look `name` up across the layers under `parent` without touching the node table.
    /// Directories found get a handle per layer; files are located by (directory, name).
    pub(crate) fn resolve(&self, parent: &NodeState, name: &OsStr) -> Result<Option<Found>> {
        self.resolve_hinted(parent, name, None)
    }

    /// [`Overlay::resolve`]; with a `hint`, a lower layer that lists neither the name nor its
    /// `.wh.` file is skipped without a probe (lower layers never change; the upper one is
    /// always probed).
    pub(crate) fn resolve_hinted(
        &self,
        parent: &NodeState,
        name: &OsStr,
        hint: Option<&LowerHint>,
    ) -> Result<Option<Found>> {
        if name.as_bytes().starts_with(WH_PREFIX) {
            return Ok(None);
        }
        if name.len() > 255 {
            return Err(Errno::NAMETOOLONG);
        }
        let mut kind = None;
        let mut upper = None;
        let mut top: Option<Stat> = None;
        let mut lowers: Vec<(u16, Loc)> = Vec::new();
        let mut first_lower: Option<Stat> = None;
        // What the lower layers are asked for: this name, until a redirect says otherwise.
        let mut target = Target::Name(name.to_os_string());
        let mut hint = hint;
        let mut upper_redirect = None;
        // With `nofollow`, a directory whose redirect was met: a lower part found for it
        // is refused (EPERM), as kernel overlayfs refuses it.
        let mut refused: Option<Arc<DirHandle>> = None;
        if let Some((uh, u)) = parent.upper_dir()? {
            match probe::probe(&self.sys, u.as_fd(), name)? {
                Probe::Whiteout(_) => return Ok(None),
                Probe::Absent => {}
                Probe::NotDir => return Err(Errno::NOTDIR),
                Probe::Entry(st) => {
                    let k = Kind::from_mode(st.st_mode);
                    if k != Kind::Dir {
                        let loc = Loc::At(uh.clone(), name.to_os_string());
                        let (ino, metacopy, index_key) = self.upper_file_ino(&loc, &st);
                        let metacopy = metacopy && k == Kind::File;
                        if metacopy {
                            lowers.extend(self.metacopy_data(&loc, parent, name, hint, None)?);
                        }
                        return Ok(Some(Found {
                            kind: k,
                            upper: Some(loc),
                            lowers,
                            top: st,
                            ino,
                            metacopy,
                            index_key,
                            link_up: false,
                            redirect: None,
                        }));
                    }
                    let fd = self.sys.open_path_at(u.as_fd(), name)?;
                    let marks = self.dir_marks(fd.as_fd());
                    let dir = DirHandle::child(&uh, name, fd);
                    upper = Some(Loc::Dir(dir.clone()));
                    top = Some(st);
                    kind = Some(Kind::Dir);
                    if marks.opaque {
                        return Ok(Some(Found {
                            kind: Kind::Dir,
                            upper,
                            lowers,
                            ino: self.map_ino(&st),
                            top: st,
                            metacopy: false,
                            index_key: None,
                            link_up: false,
                            redirect: None,
                        }));
                    }
                    // With `nofollow`, the redirect of a directory whose parent has no
                    // lower part is never met (nothing below is looked at), as in the kernel.
                    let met = !(self.refuses() && parent.lowers.is_empty());
                    if let Some(r) = marks.redirect.filter(|_| met) {
                        target = self.follow(&dir, &target, 0, &r)?;
                        hint = None;
                        refused = self.refuses().then(|| dir.clone());
                        upper_redirect = Some(r);
                    }
                }
            }
        }
        // The layers below, topmost first: the parent's parts, or after an absolute redirect
        // the layer roots (of the layers below the one that said so).
        let parent_lowers = parent.lower_dirs()?;
        let mut root_lowers = None;
        let mut after: Option<u16> = None;
        loop {
            let list = match &target {
                Target::Name(_) => &parent_lowers,
                Target::Path(_) => match &root_lowers {
                    Some(l) => l,
                    None => root_lowers.insert(self.node(node::ROOT_INO)?.state().lower_dirs()?),
                },
            };
            // The lists are topmost first (ascending layer numbers).
            let from = after.map_or(0, |a| list.partition_point(|(l, ..)| *l <= a));
            let Some((layer, lh, dfd)) = list.get(from).cloned() else {
                break;
            };
            after = Some(layer);
            let TargetStep {
                probe: found,
                dir: lh,
                fd: dfd,
                name: at,
                stop_below: mut stop,
                target: mut next,
                redirected,
            } = self.probe_target(layer, &lh, &dfd, &target, hint)?;
            if redirected && self.refuses() && refused.is_none() {
                refused = Some(lh.clone());
            }
            match found {
                Probe::Whiteout(_) | Probe::NotDir => break,
                Probe::Absent => {}
                Probe::Entry(st) => {
                    let k = Kind::from_mode(st.st_mode);
                    match kind {
                        None if k != Kind::Dir => {
                            // Nothing above and no redirect met: `at` is `name`, in `parent`.
                            let loc = Loc::At(lh.clone(), at);
                            // A metacopy in a lower layer (a committed upper stacked below)
                            // counts only where metacopy is on, as with kernel overlayfs.
                            let metacopy = k == Kind::File
                                && self.opts.metacopy
                                && is_metacopy(&self.sys, &loc);
                            if !metacopy && st.st_nlink > 1 {
                                if let Some(f) = self.indexed(k, &st)? {
                                    return Ok(Some(f));
                                }
                            }
                            let data = match metacopy {
                                true => {
                                    self.metacopy_data(&loc, parent, name, hint, Some(layer))?
                                }
                                false => None,
                            };
                            lowers.push((layer, loc));
                            lowers.extend(data);
                            return Ok(Some(Found {
                                kind: k,
                                upper: None,
                                lowers,
                                // Every name of a lower hard link is this one inode (see
                                // `INDEX_DIR` for how its copy-up keeps it so).
                                ino: self.map_ino(&st),
                                top: st,
                                metacopy,
                                index_key: None,
                                link_up: false,
                                redirect: None,
                            }));
                        }
                        Some(Kind::Dir) | None if k == Kind::Dir => {
                            if let Some(d) = &refused {
                                return Err(self.refuse(d));
                            }
                            let fd = self.sys.open_path_at(dfd.as_fd(), &at)?;
                            let marks = self.dir_marks(fd.as_fd());
                            let dir = DirHandle::child(&lh, &at, fd);
                            lowers.push((layer, Loc::Dir(dir.clone())));
                            if first_lower.is_none() {
                                first_lower = Some(st);
                            }
                            if top.is_none() {
                                top = Some(st);
                            }
                            kind = Some(Kind::Dir);
                            if marks.opaque {
                                break;
                            }
                            // The bottom layer's redirects lead nowhere: not read, as in the
                            // kernel (an invalid one there is harmless).
                            if let Some(r) = marks.redirect.filter(|_| !self.bottom(layer)) {
                                let below = list.iter().any(|(l, ..)| *l > layer);
                                if self.refuses() && below {
                                    return Err(self.refuse(&dir));
                                }
                                next = self.follow(&dir, &next, 0, &r)?;
                                // An absolute redirect goes on below an opaque directory on
                                // its way (the kernel's rule).
                                if r.starts_with(b"/") {
                                    stop = false;
                                }
                            }
                        }
                        _ => break,
                    }
                }
            }
            if stop {
                break;
            }
            if next != target {
                target = next;
                hint = None;
            }
        }
        let Some(kind) = kind else { return Ok(None) };
        let top = top.expect("found something");
        // A directory keeps the number of its topmost lower part, which never changes, so
        // that creating its upper part (copy-up) does not change it (nor does a rename: its
        // redirect finds the same lower part).
        let ino = self.map_ino(first_lower.as_ref().unwrap_or(&top));
        Ok(Some(Found {
            kind,
            upper,
            lowers,
            top,
            ino,
            metacopy: false,
            index_key: None,
            link_up: false,
            redirect: upper_redirect,
        }))
    }

    /// The marks of a layer directory, its redirect included (followed, or with `nofollow`
    /// refused).
    fn dir_marks(&self, dir: BorrowedFd<'_>) -> probe::DirMarks {
        probe::dir_marks(&self.sys, dir, true)
    }

    /// Redirects are refused where a lookup would follow one (`nofollow`).
    fn refuses(&self) -> bool {
        !self.opts.redirect_dir.follows()
    }

    /// The error of a lookup that would follow directory `dir`'s redirect where they are
    /// refused (`nofollow`), logged.
    fn refuse(&self, dir: &DirHandle) -> Errno {
        if self.first_refusal(dir) {
            tracing::warn!(
                dir = %dir.path().display(),
                "refusing to follow a directory redirect (redirect_dir=nofollow)"
            );
        }
        Errno::PERM
    }

    /// The first refusal of directory `dir`'s redirect (logged; later ones are not, up to
    /// 1024 directories).
    fn first_refusal(&self, dir: &DirHandle) -> bool {
        let mut seen = self.refused_logged.lock();
        seen.len() < 1024 && seen.insert(dir.path())
    }

    /// The target for the layers below directory `dir`, whose redirect is `r`, met walking
    /// `current` with `post` parts of it left. A value that is not a redirect is refused
    /// with EIO (the directory named in the log).
    fn follow(&self, dir: &DirHandle, current: &Target, post: usize, r: &[u8]) -> Result<Target> {
        match redirect::parse(r) {
            Some(t) => Ok(redirect::redirected(current, post, t)),
            None => {
                if self.first_refusal(dir) {
                    tracing::error!(
                        dir = %dir.path().display(),
                        redirect = %redirect::show(r),
                        "invalid directory redirect: refused (EIO)"
                    );
                }
                Err(Errno::IO)
            }
        }
    }

    /// What lower layer `layer` (its directory `dir`: the parent's part for a name, the
    /// layer root for a path) says about `target`: for a path, each part is probed in
    /// turn, one directory at a time with no symlink followed. A part on the way that is a
    /// whiteout or not a directory ends the lookup (`NotDir`); an opaque one ends it below
    /// this layer; a redirect on one changes the target for the layers below.
    fn probe_target(
        &self,
        layer: u16,
        dir: &Arc<DirHandle>,
        dfd: &Arc<OwnedFd>,
        target: &Target,
        hint: Option<&LowerHint>,
    ) -> Result<TargetStep> {
        let parts = match target {
            Target::Name(n) => {
                return Ok(TargetStep {
                    probe: probe::probe_lower(&self.sys, layer, dfd.as_fd(), &dir.names, n, hint)?,
                    dir: dir.clone(),
                    fd: dfd.clone(),
                    name: n.clone(),
                    stop_below: false,
                    target: target.clone(),
                    redirected: false,
                });
            }
            Target::Path(parts) => parts,
        };
        let mut next = target.clone();
        let mut stop_below = false;
        let mut redirected = false;
        let mut cur = dir.clone();
        let mut cfd = dfd.clone();
        let (last, way) = parts.split_last().ok_or(Errno::IO)?;
        for (i, part) in way.iter().enumerate() {
            let step = |probe| TargetStep {
                probe,
                dir: cur.clone(),
                fd: cfd.clone(),
                name: part.clone(),
                stop_below,
                target: next.clone(),
                redirected,
            };
            match probe::probe_lower(&self.sys, layer, cfd.as_fd(), &cur.names, part, None)? {
                Probe::Entry(st) if Kind::from_mode(st.st_mode) == Kind::Dir => {}
                Probe::Absent => return Ok(step(Probe::Absent)),
                _ => return Ok(step(Probe::NotDir)),
            }
            let fd = self.sys.open_path_at(cfd.as_fd(), part)?;
            let marks = self.dir_marks(fd.as_fd());
            let child = DirHandle::child(&cur, part, fd);
            if marks.opaque {
                stop_below = true;
            } else if let Some(r) = marks.redirect.filter(|_| !self.bottom(layer)) {
                next = self.follow(&child, &next, parts.len() - 1 - i, &r)?;
                redirected = true;
                // An absolute redirect goes on below an opaque directory on its way.
                if r.starts_with(b"/") {
                    stop_below = false;
                }
            }
            cfd = child.fd()?;
            cur = child;
        }
        Ok(TargetStep {
            probe: probe::probe_lower(&self.sys, layer, cfd.as_fd(), &cur.names, last, None)?,
            dir: cur,
            fd: cfd,
            name: last.clone(),
            stop_below,
            target: next,
            redirected,
        })
    }

    /// Lower layer `layer` is the bottom one: nothing is below it.
    fn bottom(&self, layer: u16) -> bool {
        usize::from(layer) + 1 >= self.lowers.len()
    }

    /// The index key of lower file `st`: its filesystem's id and its inode number.
    pub(crate) fn index_key(&self, st: &Stat) -> OsString {
        let fs = self
            .fs_ids
            .iter()
            .find(|(dev, _)| *dev == st.st_dev)
            .map(|(_, id)| *id)
            .unwrap_or(st.st_dev);
        OsString::from(format!("{fs:016x}-{:x}", st.st_ino))
    }

    /// A lower hard link `st` whose copy is in the index: the copy, for this name too.
    fn indexed(&self, kind: Kind, st: &Stat) -> Result<Option<Found>> {
        let Some(index) = &self.index else {
            return Ok(None);
        };
        let key = self.index_key(st);
        let top = match self.sys.stat_at(index.fd()?.as_fd(), &key) {
            Ok(t) if Kind::from_mode(t.st_mode) == kind => t,
            Ok(_) | Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(Found {
            kind,
            upper: Some(Loc::At(index.clone(), key.clone())),
            lowers: Vec::new(),
            top,
            ino: self.map_ino(st),
            metacopy: false,
            index_key: Some(key),
            link_up: true,
            redirect: None,
        }))
    }

    /// The index entry of `key`, as a location.
    pub(crate) fn index_loc(&self, key: &OsStr) -> Result<Loc> {
        let index = self.index.as_ref().ok_or(Errno::ROFS)?;
        Ok(Loc::At(index.clone(), key.to_os_string()))
    }

    /// The link count shown minus the upper inode's own, from an index entry's mark.
    pub(crate) fn nlink_delta(&self, loc: &Loc) -> Option<i64> {
        let v = NLINK_XATTRS
            .iter()
            .find_map(|x| loc.getxattr(&self.sys, OsStr::new(x)).ok())?;
        parse_nlink(&v).map(|(d, _)| d)
    }

    /// Index entries no name reaches any more (a crash between the removal of a file's last
    /// name and of its entry) are removed at mount.
    fn clean_index(&self) {
        let Some(index) = &self.index else { return };
        let Ok(fd) = index.fd() else { return };
        let mut names = Vec::new();
        if let Ok(mut stream) = self.sys.open_dir_stream(fd.as_fd()) {
            while let Some(Ok(ent)) = stream.read() {
                let n = ent.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push(OsStr::from_bytes(n).to_os_string());
                }
            }
        }
        for key in names {
            let loc = Loc::At(index.clone(), key.clone());
            let (Ok(st), Some(d)) = (loc.stat(&self.sys), self.nlink_delta(&loc)) else {
                continue;
            };
            if st.st_nlink as i64 + d <= 0 {
                tracing::info!(entry = ?key, "index entry of a file with no name left: removed");
                let _ = self.sys.unlink_at(fd.as_fd(), &key);
            }
        }
    }

    /// The data of metacopy `meta` (in layer `below`, none: the upper layer): where its
    /// redirect says, else the same name below.
    fn metacopy_data(
        &self,
        meta: &Loc,
        parent: &NodeState,
        name: &OsStr,
        hint: Option<&LowerHint>,
        below: Option<u16>,
    ) -> Result<Option<(u16, Loc)>> {
        let redirect = REDIRECT_XATTRS
            .iter()
            .find_map(|x| meta.getxattr(&self.sys, OsStr::new(x)).ok());
        let Some(r) = redirect else {
            return self.lower_data(parent, name, hint, below);
        };
        let Some(path) = r.strip_prefix(b"/") else {
            // A name in the same directory.
            if r.is_empty() || r.contains(&b'/') {
                return Ok(None);
            }
            return self.lower_data(parent, OsStr::from_bytes(&r), None, below);
        };
        self.walk_redirect(path, below)
    }

    /// The data an absolute redirect `/path` names: the regular file at `path` in the first
    /// lower layer below `below` (none: all) that has it, not a metacopy.
    pub(crate) fn walk_redirect(
        &self,
        path: &[u8],
        below: Option<u16>,
    ) -> Result<Option<(u16, Loc)>> {
        // A path from the root of each lower layer below; no `.`, `..` or empty parts.
        let bad = |c: &[u8]| c.is_empty() || c == b"." || c == b"..";
        if path.split(|b| *b == b'/').any(bad) {
            return Ok(None);
        }
        for (i, layer) in self.lowers.iter().enumerate() {
            let i = i as u16;
            if below.is_some_and(|b| i <= b) {
                continue;
            }
            // One part at a time, following no symlink: the path stays in the layer.
            let mut walked: Result<OwnedFd> = Err(Errno::NOENT);
            for part in path.split(|b| *b == b'/') {
                let dir = match &walked {
                    Ok(fd) => fd.as_fd(),
                    Err(_) => layer.fd.as_fd(),
                };
                walked = self.sys.open_path_at(dir, OsStr::from_bytes(part));
                if walked.is_err() {
                    break;
                }
            }
            let fd = match walked {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) => continue,
                Err(e) => return Err(e),
            };
            let st = self.sys.fstat(fd.as_fd())?;
            if Kind::from_mode(st.st_mode) != Kind::File {
                return Ok(None);
            }
            let loc = Loc::Fd(Arc::new(fd));
            if !is_metacopy(&self.sys, &loc) {
                return Ok(Some((i, loc)));
            }
        }
        Ok(None)
    }

    /// The data of a metacopy: the same name's regular file in the next lower layer that
    /// has the name, below layer `below` (none: all lower layers), past further metacopies
    /// (which hold no data; their own redirects are not followed), or none.
    fn lower_data(
        &self,
        parent: &NodeState,
        name: &OsStr,
        hint: Option<&LowerHint>,
        below: Option<u16>,
    ) -> Result<Option<(u16, Loc)>> {
        for (layer, lh, dfd) in parent.lower_dirs()? {
            if below.is_some_and(|b| layer <= b) {
                continue;
            }
            match probe::probe_lower(&self.sys, layer, dfd.as_fd(), &lh.names, name, hint)? {
                Probe::Entry(st) if Kind::from_mode(st.st_mode) == Kind::File => {
                    let loc = Loc::At(lh.clone(), name.to_os_string());
                    // Never a metacopy as the data (it holds none), whatever the mount says.
                    if is_metacopy(&self.sys, &loc) {
                        continue;
                    }
                    return Ok(Some((layer, loc)));
                }
                Probe::Entry(_) | Probe::Whiteout(_) | Probe::NotDir => return Ok(None),
                Probe::Absent => {}
            }
        }
        Ok(None)
    }

    /// An upper file keeps the inode number of the lower file it was copied up from; and
    /// whether it is a metacopy (read in any mount: the mark says where the data is).
    fn upper_file_ino(&self, loc: &Loc, st: &Stat) -> (u64, bool, Option<OsString>) {
        // One listxattr answers for most files (which have no xattrs at all).
        let names = loc.listxattr(&self.sys).unwrap_or_default();
        let metacopy = names
            .iter()
            .any(|n| METACOPY_XATTRS.iter().any(|m| n.as_bytes() == m.as_bytes()));
        let origin = probe::origin(&names, |n| loc.getxattr(&self.sys, n));
        // A copied-up lower hard link: one of its names.
        let index_key = NLINK_XATTRS
            .iter()
            .filter(|x| names.iter().any(|n| n.as_bytes() == x.as_bytes()))
            .find_map(|x| loc.getxattr(&self.sys, OsStr::new(x)).ok())
            .and_then(|v| parse_nlink(&v))
            .map(|(_, k)| k);
        (
            origin.unwrap_or_else(|| self.map_ino(st)),
            metacopy,
            index_key,
        )
    }

    /// Is the name visible in some lower layer under `parent` (so removing or renaming the
    /// upper entry must leave a whiteout)?
    pub(crate) fn lower_positive(&self, parent: &NodeState, name: &OsStr) -> Result<bool> {
        for (layer, lh, dfd) in parent.lower_dirs()? {
            match probe::probe_lower(&self.sys, layer, dfd.as_fd(), &lh.names, name, None)? {
                Probe::Entry(_) => return Ok(true),
                Probe::Whiteout(_) | Probe::NotDir => return Ok(false),
                Probe::Absent => {}
            }
        }
        Ok(false)
    }

    fn state_from_found(found: Found, parent: u64, name: &OsStr) -> NodeState {
        let mut s = NodeState::new(
            found.kind,
            parent,
            name.to_os_string(),
            found.upper,
            found.lowers,
            found.metacopy,
            (found.top.st_dev, found.top.st_ino),
        );
        s.set_index_key(found.index_key);
        s.set_redirect(found.redirect);
        s
    }

    /// Put what `resolve` found in the node table.
    pub(crate) fn intern(
        &self,
        found: Found,
        parent: u64,
        name: &OsStr,
        count: bool,
    ) -> (Arc<Node>, Stat) {
        let ino = found.ino;
        let top = found.top;
        let several = found.kind != Kind::Dir && (top.st_nlink > 1 || found.index_key.is_some());
        let node =
            self.nodes
                .get_or_insert(ino, Self::state_from_found(found, parent, name), count);
        if several {
            node.add_alias(parent, name);
        }
        (node, top)
    }

    // ------------------------------------------------------------ attributes

    /// The xattr that keeps owner and mode of an entry of kind `kind`, if one does. The
    /// kernel allows `user.*` xattrs only on regular files and directories (EPERM on others),
    /// so in `xattr_permissions=2` symlinks, pipes, sockets and devices are owned for real.
    pub(crate) fn override_xattr_for(&self, kind: Kind) -> Option<&'static str> {
        let x = self.override_xattr?;
        (!x.starts_with("user.") || matches!(kind, Kind::File | Kind::Dir)).then_some(x)
    }

    pub(crate) fn attr_of(&self, node: &Node, st: &NodeState, stat: &Stat) -> Attr {
        let mut mode = stat.st_mode;
        let mut uid = stat.st_uid;
        let mut gid = stat.st_gid;
        let mut rdev = stat.st_rdev;
        let mut kind = Kind::from_mode(stat.st_mode);
        if let Some(x) = self.override_xattr {
            let top = st.top();
            let mut v = top.getxattr(&self.sys, OsStr::new(x));
            if v.is_err() && self.opts.xattr_permissions == XattrPermissions::User {
                // Layers written by fuse-overlayfs 1.x carry the older name.
                let other = if x == OVERRIDE_USER {
                    OVERRIDE_USER_LEGACY
                } else {
                    OVERRIDE_USER
                };
                v = top.getxattr(&self.sys, OsStr::new(other));
            }
            if let Ok(v) = v {
                if let Some(o) = parse_override(&v) {
                    uid = o.uid;
                    gid = o.gid;
                    mode = o.mode;
                    if let Some((k, r)) = o.kind {
                        kind = k;
                        rdev = r;
                    }
                }
            }
        }
        let uid = if self.opts.squash_to_root {
            0
        } else if let Some(u) = self.opts.squash_to_uid {
            u
        } else {
            self.opts
                .uid_map
                .to_shown(uid)
                .unwrap_or_else(|| self.overflow_ids().0)
        };
        let gid = if self.opts.squash_to_root {
            0
        } else if let Some(g) = self.opts.squash_to_gid {
            g
        } else {
            self.opts
                .gid_map
                .to_shown(gid)
                .unwrap_or_else(|| self.overflow_ids().1)
        };
        let mut nlink = stat.st_nlink as u32;
        if st.index_key().is_some() && kind != Kind::Dir {
            // The upper inode counts its index entry and the names linked so far; what
            // the names show is in the entry's mark.
            if let Some(d) = self.nlink_delta(st.top()) {
                nlink = (stat.st_nlink as i64 + d).clamp(0, u32::MAX as i64) as u32;
            }
        }
        if kind == Kind::Dir
            && (self.opts.static_nlink
                || st.is_merged_dir()
                || st.upper.is_none() && st.lowers.len() > 1)
        {
            nlink = 1;
        }
        let mut blocks = stat.st_blocks as u64;
        if st.metacopy {
            // The upper file holds no data: report what the data takes, as kernel overlayfs.
            if let Ok(d) = st.data().and_then(|l| l.stat(&self.sys)) {
                blocks = d.st_blocks as u64;
            }
        }
        Attr {
            ino: Ino(node.ino),
            size: stat.st_size as u64,
            blocks,
            atime: (stat.st_atime, stat.st_atime_nsec as u32),
            mtime: (stat.st_mtime, stat.st_mtime_nsec as u32),
            ctime: (stat.st_ctime, stat.st_ctime_nsec as u32),
            kind,
            perm: (mode & 0o7777) as u16,
            nlink,
            uid,
            gid,
            rdev: rdev as u32,
            blksize: stat.st_blksize as u32,
        }
    }

    fn node_attr(&self, node: &Node) -> Result<Attr> {
        // A name read from the state may hold something else for a moment (a racing rename
        // or unlink pins the node first, but a state read before that still names the old
        // entry). Never answer a different file type: the kernel would mark the inode bad.
        // Likewise an ENOENT from a name the node has just left is not the answer.
        for _ in 0..100 {
            let st = node.state();
            let top = st.top();
            match top.stat(&self.sys) {
                Ok(stat) if Kind::from_mode(stat.st_mode) == st.kind => {
                    return Ok(self.attr_of(node, &st, &stat));
                }
                Ok(_) => {}
                Err(Errno::NOENT) if !node.update(|s| s.top().same_place(top)) => {}
                Err(e) => return Err(e),
            }
            std::thread::yield_now();
        }
        Err(Errno::NOENT)
    }

    // ------------------------------------------------------------ read path

    /// The attributes of `name` in directory `parent`, across the layers; adds one lookup
    /// reference on success (see [`Overlay`]).
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let parent = parent.0;
        self.lookup_hinted(parent, name, None)
    }

    /// [`Overlay::lookup`], probing only the lower layers `hint` (from a listing) says have
    /// the name.
    pub(crate) fn lookup_hinted(
        &self,
        parent: u64,
        name: &OsStr,
        hint: Option<&LowerHint>,
    ) -> Result<Attr> {
        let p = self.node(parent)?;
        let ps = p.state();
        if ps.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let found = self.resolve_hinted(&ps, name, hint)?.ok_or(Errno::NOENT)?;
        let link_up = found.link_up;
        let (node, stat) = self.intern(found, parent, name, true);
        if link_up && !self.read_only {
            // Another name of a copied-up lower hard link: it becomes a hard link of the
            // copy in the upper layer too (the index says which copy).
            if let Some(key) = node.read(|s| s.index_key().cloned()) {
                let linked = {
                    let _g = node.copyup.lock();
                    self.link_name(node.ino, &key, parent, name)
                };
                if let Err(e) = linked {
                    tracing::debug!(?name, error = %e, "name of a hard link not linked up");
                }
                if let Ok(a) = self.node_attr(&node) {
                    return Ok(a);
                }
            }
        }
        let st = node.state();
        Ok(self.attr_of(&node, &st, &stat))
    }

    /// Gives back `nlookup` lookup references of `ino` (the kernel's FORGET, see [`Overlay`]);
    /// the node goes when none are left. Never fails; the root is never dropped.
    pub fn forget(&self, ino: Ino, nlookup: u64) {
        let ino = ino.0;
        self.nodes.forget(ino, nlookup);
        self.listings.forget(ino, |ino| self.node(ino).is_ok());
    }

    /// The attributes of `ino` as shown through the mount (of open file `fh`, if given); adds
    /// no lookup reference.
    pub fn getattr(&self, ino: Ino, fh: Option<Fh>) -> Result<Attr> {
        let ino = ino.0;
        let node = self.node(ino)?;
        if let Some(fh) = fh {
            if let Some(h) = self.handle(fh) {
                let st = node.state();
                // A read handle of a metacopy is the lower file: its metadata is above.
                if let (Handle::File(f), false) = (&*h, st.metacopy) {
                    let stat = self.sys.fstat(f.fd_following_copy_up(&self.sys))?;
                    return Ok(self.attr_of(&node, &st, &stat));
                }
            }
        }
        self.node_attr(&node)
    }

    /// The target of symlink `ino` (EINVAL for anything else).
    pub fn readlink(&self, ino: Ino) -> Result<OsString> {
        let ino = ino.0;
        let node = self.node(ino)?;
        let st = node.state();
        if st.kind != Kind::Symlink {
            return Err(Errno::INVAL);
        }
        st.top().readlink(&self.sys)
    }

    /// Statistics of the filesystem of the upper layer (or the top lower layer).
    pub fn statfs(&self) -> Result<FsStats> {
        let fd = self
            .upper
            .as_ref()
            .map(|u| u.fd.clone())
            .unwrap_or_else(|| self.lowers[0].fd.clone());
        let s = sys::fstatfs(fd.as_fd())?;
        Ok(FsStats {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namelen as u32,
            frsize: s.f_frsize as u32,
        })
    }

    // ------------------------------------------------------------ handles

    fn handle_shard(&self, fh: Fh) -> &Mutex<std::collections::HashMap<Fh, Arc<Handle>>> {
        &self.handles[(fh.0 as usize) % HANDLE_SHARDS]
    }

    fn add_handle(&self, h: Handle) -> Fh {
        let fh = Fh(self.next_fh.fetch_add(1, Ordering::Relaxed));
        self.handle_shard(fh).lock().insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: Fh) -> Option<Arc<Handle>> {
        self.handle_shard(fh).lock().get(&fh).cloned()
    }

    /// The open file handle `fh` (EBADF when there is none, or it is a directory's).
    fn file_handle(&self, fh: Fh) -> Result<Arc<Handle>> {
        match self.handle(fh) {
            Some(h) if matches!(&*h, Handle::File(_)) => Ok(h),
            _ => Err(Errno::BADF),
        }
    }

    /// Opens file `ino` with open(2) `flags` and returns a handle (given back with
    /// `release`); writing or truncating copies it up first. No lookup reference changes.
    pub fn open(&self, ino: Ino, flags: i32) -> Result<Fh> {
        let ino = ino.0;
        let node = self.node(ino)?;
        let acc = flags & libc::O_ACCMODE;
        let writes = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let trunc = flags & libc::O_TRUNC != 0;
        if (writes || trunc) && self.read_only() {
            return Err(Errno::ROFS);
        }
        let st = node.state();
        if st.kind == Kind::Dir && writes {
            return Err(Errno::ISDIR);
        }
        let open_once = |st: &NodeState| {
            if writes || trunc {
                self.copy_up(&node, trunc)?
                    .open(&self.sys, open_flags(flags))
            } else {
                st.data()?.open(&self.sys, open_flags(flags))
            }
        };
        // `st` (or the copy-up's location) may name an entry that a racing unlink or rename is
        // replacing with a whiteout (a 0/0 device: ENXIO) before it pins the node to an O_PATH
        // fd: open what the node is once the unlink has pinned it. If it never settles, the
        // name is gone: answer as an open after the unlink would (ENOENT), never ENXIO.
        // A read-only mount copies nothing up: a handle opened below stays there.
        let below = !(writes || trunc)
            && (st.upper.is_none() || st.metacopy)
            && st.kind == Kind::File
            && !self.read_only();
        let mut res = open_once(&st);
        if !matches!(st.kind, Kind::Char | Kind::Block) {
            let mut tries = 0;
            while matches!(res, Err(Errno::NXIO)) {
                tries += 1;
                if tries > 100 {
                    res = Err(Errno::NOENT);
                    break;
                }
                std::thread::yield_now();
                res = open_once(&node.state());
            }
        }
        let fd = res?;
        let stable = st.kind == Kind::File
            && (writes || trunc || (st.upper.is_some() && !st.metacopy) || self.read_only());
        let below = below.then(|| Below {
            node: node.clone(),
            flags: open_flags(flags),
            up: std::sync::OnceLock::new(),
        });
        Ok(self.add_handle(Handle::File(FileHandle { fd, below, stable })))
    }

    /// Closes file or directory handle `fh` (from `open`, `create` or `opendir`); unknown
    /// handles are ignored. Lookup references are not touched.
    pub fn release(&self, fh: Fh) {
        self.handle_shard(fh).lock().remove(&fh);
    }

    /// Run `f` on the descriptor of open file `fh` if it is a regular file of the upper layer,
    /// or in a read-only mount any regular file (what FUSE passthrough may hand to the
    /// kernel: a file that stays the handle's data); `None` for anything else.
    pub fn passthrough_fd<R>(&self, fh: Fh, f: impl FnOnce(BorrowedFd<'_>) -> R) -> Option<R> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::File(file) if file.stable && file.below.is_none() => Some(f(file.fd.as_fd())),
            _ => None,
        }
    }

    /// Hands `f` this mount's seam and the descriptor I/O on open file `fh` goes to (the copy
    /// once the file was copied up): for reads, writes, fsync, fallocate, lseek,
    /// copy_file_range, and a caller that moves the data itself.
    pub fn with_data_fd<T>(
        &self,
        fh: Fh,
        f: impl FnOnce(&Sys, BorrowedFd<'_>) -> Result<T>,
    ) -> Result<T> {
        let h = self.file_handle(fh)?;
        let Handle::File(file) = &*h else {
            unreachable!()
        };
        f(&self.sys, file.fd_following_copy_up(&self.sys))
    }

    /// Up to `size` bytes of open file `fh` at `off` (fewer only at the end of the file).
    pub fn read(&self, fh: Fh, off: u64, size: u32) -> Result<Vec<u8>> {
        self.with_data_fd(fh, |sys, fd| {
            let mut buf = vec![0u8; size as usize];
            let mut done = 0;
            while done < buf.len() {
                let n = sys.pread(fd, &mut buf[done..], off + done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            buf.truncate(done);
            Ok(buf)
        })
    }

    /// Writes `data` to open file `fh` at `off`; returns how much was written (short only
    /// when a later part failed, as write(2)), the error only when nothing was.
    pub fn write(&self, fh: Fh, off: u64, data: &[u8]) -> Result<u32> {
        self.with_data_fd(fh, |sys, fd| {
            // A write that stops part way (ENOSPC, EFBIG, EDQUOT) reports what it wrote, as
            // write(2) does; its error is the answer to the next write.
            let mut done = 0;
            while done < data.len() {
                match sys.pwrite(fd, &data[done..], off + done as u64) {
                    Ok(0) if done == 0 => return Err(Errno::IO),
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if done == 0 => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(done as u32)
        })
    }

    /// Flushes open file `fh` to disk (its data only with `datasync`); ENOSYS with `fsync=0`.
    pub fn fsync(&self, fh: Fh, datasync: bool) -> Result<()> {
        if !self.opts.fsync {
            return Err(Errno::NOSYS);
        }
        self.with_data_fd(fh, |sys, fd| match &self.syncer {
            Some(s) => s.fsync(fd, datasync),
            None => sys.fsync(fd, datasync),
        })
    }

    /// Flushes the upper directory of `ino` to disk, if it has one; ENOSYS with `fsync=0`.
    pub fn fsyncdir(&self, ino: Ino, datasync: bool) -> Result<()> {
        let ino = ino.0;
        if !self.opts.fsync {
            return Err(Errno::NOSYS);
        }
        let node = self.node(ino)?;
        if let Some(u) = node.state().upper {
            let fd = u.open(&self.sys, OFlags::RDONLY | OFlags::DIRECTORY)?;
            self.sys.fsync(fd.as_fd(), datasync)?;
        }
        Ok(())
    }

    /// `fallocate(2)` on open file `fh` (mode bits passed through).
    pub fn fallocate(&self, fh: Fh, off: u64, len: u64, mode: i32) -> Result<()> {
        self.with_data_fd(fh, |sys, fd| sys.fallocate(fd, mode, off, len))
    }

    /// The offset `lseek(2)` gives on open file `fh` (SEEK_DATA and SEEK_HOLE included).
    pub fn lseek(&self, fh: Fh, off: i64, whence: i32) -> Result<i64> {
        self.with_data_fd(fh, |_, fd| sys::lseek(fd, off, whence).map(|o| o as i64))
    }

    /// Copies up to `len` bytes between two open files in the kernel; returns how many were
    /// copied (at most 4 GiB less 4 KiB per call).
    pub fn copy_file_range(
        &self,
        fh_in: Fh,
        mut off_in: u64,
        fh_out: Fh,
        mut off_out: u64,
        len: u64,
    ) -> Result<u32> {
        let len = len.min(u32::MAX as u64 & !0xfff) as usize;
        self.with_data_fd(fh_in, |sys, fi| {
            self.with_data_fd(fh_out, |_, fo| {
                sys.copy_file_range(fi, &mut off_in, fo, &mut off_out, len)
                    .map(|n| n as u32)
            })
        })
    }

    // ------------------------------------------------------------ xattrs

    /// The value of xattr `name` of `ino` as the mount shows it (internal ones are ENODATA).
    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        let ino = ino.0;
        if self.opts.noxattrs {
            return Err(Errno::NOTSUP);
        }
        if is_internal_xattr(name.as_bytes(), self.opts.xattr_permissions) {
            return Err(Errno::NODATA);
        }
        let node = self.node(ino)?;
        let st = node.state();
        let stored = self.stored_xattr_name(name);
        st.top().getxattr(&self.sys, &stored)
    }

    /// The xattr names of `ino` the mount shows, each NUL-terminated (internal ones hidden).
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        let ino = ino.0;
        if self.opts.noxattrs {
            return Ok(Vec::new());
        }
        let node = self.node(ino)?;
        let st = node.state();
        let mut out = Vec::new();
        for n in st.top().listxattr(&self.sys)? {
            let b = n.as_bytes();
            let shown: Vec<u8> = if self.opts.xattr_permissions == XattrPermissions::User
                && b.starts_with(b"user.containers.override_security.")
            {
                [
                    b"security.",
                    &b[b"user.containers.override_security.".len()..],
                ]
                .concat()
            } else if is_internal_xattr(b, self.opts.xattr_permissions)
                || (self.opts.xattr_permissions == XattrPermissions::User
                    && b.starts_with(b"security."))
            {
                // In `xattr_permissions=2` a `security.*` name reads its override (see
                // stored_xattr_name): an on-disk `security.*` xattr would be listed but
                // unreadable.
                continue;
            } else {
                b.to_vec()
            };
            out.extend_from_slice(&shown);
            out.push(0);
        }
        Ok(out)
    }

    /// In `xattr_permissions=2`, `security.*` xattrs are stored under a user.* name.
    pub(crate) fn stored_xattr_name(&self, name: &OsStr) -> OsString {
        let b = name.as_bytes();
        if self.opts.xattr_permissions == XattrPermissions::User && b.starts_with(b"security.") {
            let mut v = b"user.containers.override_security.".to_vec();
            v.extend_from_slice(&b[b"security.".len()..]);
            return std::os::unix::ffi::OsStringExt::from_vec(v);
        }
        name.to_os_string()
    }
}

/// Does the file carry a metacopy mark?
fn is_metacopy(sys: &Sys, loc: &Loc) -> bool {
    METACOPY_XATTRS
        .iter()
        .any(|m| loc.getxattr(sys, OsStr::new(m)).is_ok())
}

fn open_flags(flags: i32) -> OFlags {
    // Not O_DIRECT: the daemon's buffers are not aligned as the layer's filesystem wants for
    // it (EINVAL on ext4), and the kernel already sends an O_DIRECT caller's I/O straight
    // here, past the mount's page cache.
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_TRUNC
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_NOATIME
        | libc::O_NONBLOCK
        | libc::O_DIRECTORY;
    OFlags::from_bits_retain((flags & keep) as u32)
}

pub(crate) fn errstr(e: Errno) -> String {
    std::io::Error::from_raw_os_error(e.raw_os_error()).to_string()
}

fn read_overflow(path: &str) -> u32 {
    crate::sys::read_small(path)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65534)
}

/// `<workdir>/work`, emptied (leftovers of an interrupted copy-up are removed), mode 0700.
fn prepare_workdir(sys: &Sys, wfd: BorrowedFd<'_>) -> Result<OwnedFd> {
    let name = OsStr::new("work");
    match sys.mkdir_at(wfd, name, 0o700) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    let fd = sys.open_path_at(wfd, name)?;
    let st = sys.fstat(fd.as_fd())?;
    if Kind::from_mode(st.st_mode) != Kind::Dir {
        return Err(Errno::NOTDIR);
    }
    tree::remove_tree_contents(sys, fd.as_fd())?;
    Ok(fd)
}

/// `<workdir>/rustfuse-index`, made if `create` (a read-only mount only opens one there is).
fn open_index(
    sys: &Sys,
    cache: &Arc<DirFdCache>,
    wfd: BorrowedFd<'_>,
    create: bool,
) -> Result<Option<Arc<DirHandle>>> {
    let name = OsStr::new(INDEX_DIR);
    if create {
        match sys.mkdir_at(wfd, name, 0o700) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
    }
    match sys.open_dir_path_at(wfd, name) {
        Ok(fd) => Ok(Some(DirHandle::root(cache, Arc::new(fd)))),
        Err(Errno::NOENT) if !create => Ok(None),
        Err(e) => Err(e),
    }
}

/// The mark of index entry `key`: `DELTA KEY`.
pub(crate) fn nlink_mark(delta: i64, key: &OsStr) -> Vec<u8> {
    format!("{delta} {}", key.to_string_lossy()).into_bytes()
}

/// An index entry's mark: `DELTA KEY`.
pub(crate) fn parse_nlink(v: &[u8]) -> Option<(i64, OsString)> {
    let s = std::str::from_utf8(v).ok()?;
    let (d, k) = s.split_once(' ')?;
    if k.is_empty() || k.contains('/') {
        return None;
    }
    Some((d.parse().ok()?, OsString::from(k)))
}

/// An override_stat value: `uid:gid:octalmode[:type]`.
pub(crate) struct Override {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub kind: Option<(Kind, u64)>,
}

pub(crate) fn parse_override(v: &[u8]) -> Option<Override> {
    let s = std::str::from_utf8(v).ok()?;
    let s = s.trim_end_matches('\0');
    let mut it = s.splitn(4, ':');
    let uid = it.next()?.parse().ok()?;
    let gid = it.next()?.parse().ok()?;
    let mode = u32::from_str_radix(it.next()?, 8).ok()?;
    let kind = match it.next() {
        None => None,
        Some("dir") => Some((Kind::Dir, 0)),
        Some("file") => Some((Kind::File, 0)),
        Some("symlink") => Some((Kind::Symlink, 0)),
        Some("pipe") => Some((Kind::Fifo, 0)),
        Some("socket") => Some((Kind::Socket, 0)),
        Some(t) => {
            let (k, rest) = if let Some(r) = t.strip_prefix("block-") {
                (Kind::Block, r)
            } else if let Some(r) = t.strip_prefix("char-") {
                (Kind::Char, r)
            } else {
                return None;
            };
            let (ma, mi) = rest.split_once('-')?;
            let dev = libc::makedev(ma.parse().ok()?, mi.parse().ok()?);
            Some((k, dev))
        }
    };
    let mode = match kind {
        Some((k, _)) => (mode & 0o7777) | k.mode_bits(),
        None => mode,
    };
    Some(Override {
        uid,
        gid,
        mode,
        kind,
    })
}

pub(crate) fn format_override(uid: u32, gid: u32, mode: u32) -> Vec<u8> {
    let k = Kind::from_mode(mode);
    let t = match k {
        Kind::Dir => "dir".to_string(),
        Kind::File => "file".to_string(),
        Kind::Symlink => "symlink".to_string(),
        Kind::Fifo => "pipe".to_string(),
        Kind::Socket => "socket".to_string(),
        Kind::Char | Kind::Block => String::new(),
    };
    if t.is_empty() {
        format!("{uid}:{gid}:{:o}", mode & 0o7777).into_bytes()
    } else {
        format!("{uid}:{gid}:{:o}:{t}", mode & 0o7777).into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_round_trip() {
        let v = format_override(1000, 100, libc::S_IFREG | 0o644);
        let o = parse_override(&v).unwrap();
        assert_eq!((o.uid, o.gid, o.mode & 0o7777), (1000, 100, 0o644));
        let o = parse_override(b"0:0:755").unwrap();
        assert_eq!(o.mode, 0o755);
        let o = parse_override(b"0:0:600:char-1-3").unwrap();
        assert_eq!(o.kind.unwrap().0, Kind::Char);
    }

    #[test]
    fn internal_xattrs_hidden() {
        assert!(is_internal_xattr(
            b"trusted.overlay.opaque",
            XattrPermissions::Off
        ));
        assert!(is_internal_xattr(
            b"user.fuseoverlayfs.origin",
            XattrPermissions::Off
        ));
        assert!(!is_internal_xattr(b"user.foo", XattrPermissions::Off));
        assert!(is_internal_xattr(
            b"user.containers.override_stat",
            XattrPermissions::User
        ));
    }
}

#[cfg(test)]
mod unit;
