//! Declarative layer trees, materialized as identical copies for each filesystem under test.
//!
//! ```no_run
//! use rustfuse_tests::layers::{Layer, Tree};
//! let tree = Tree::new()
//!     .lower(Layer::new().file("a", "top").whiteout("gone"))
//!     .lower(Layer::new().file("a", "bottom").file("gone", "x").mode(0o600).owner(1, 2));
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};

use crate::mount::Stack;

/// Modification time given to everything the builder creates (an old, recognisable instant;
/// see [`crate::snapshot::RECENT`]).
pub const FIXED_MTIME: i64 = 1_000_000_000;

/// The kind of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Regular file with this content.
    File(Vec<u8>),
    /// Directory.
    Dir,
    /// Directory marked opaque with `trusted.overlay.opaque=y`.
    OpaqueDir,
    /// Directory marked opaque with a `.wh..wh..opq` file (fuse-overlayfs only).
    OpaqueWhDir,
    /// Directory marked opaque with `user.fuseoverlayfs.opaque=y` (fuse-overlayfs only).
    OpaqueUserDir,
    /// Symbolic link to this target.
    Symlink(String),
    /// Hard link to this (earlier) path of the same layer.
    HardLink(String),
    /// Named pipe.
    Fifo,
    /// Character device.
    CharDev(u32, u32),
    /// Whiteout as a character device 0/0 (kernel format).
    Whiteout,
    /// Whiteout as an empty `.wh.NAME` file (fuse-overlayfs / AUFS format).
    WhFile,
}

/// One entry of a layer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the layer root, `/`-separated.
    pub path: String,
    /// What it is.
    pub node: Node,
    /// Permission bits (default 0644 files, 0755 dirs, 0777 symlinks).
    pub mode: Option<u32>,
    /// Owner (default 0:0).
    pub owner: Option<(u32, u32)>,
    /// Extended attributes.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Modification time in seconds (default [`FIXED_MTIME`]).
    pub mtime: Option<i64>,
}

/// A layer: entries created in order; missing parents are created as 0755 directories.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    /// The entries.
    pub entries: Vec<Entry>,
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Layer {
        Layer::default()
    }

    fn push(mut self, path: &str, node: Node) -> Layer {
        self.entries.push(Entry {
            path: path.trim_matches('/').to_string(),
            node,
            mode: None,
            owner: None,
            xattrs: Vec::new(),
            mtime: None,
        });
        self
    }

    fn last(&mut self) -> &mut Entry {
        self.entries
            .last_mut()
            .expect("modifier used before any entry")
    }

    /// A regular file.
    pub fn file(self, path: &str, content: impl AsRef<[u8]>) -> Layer {
        self.push(path, Node::File(content.as_ref().to_vec()))
    }
    /// A directory.
    pub fn dir(self, path: &str) -> Layer {
        self.push(path, Node::Dir)
    }
    /// An opaque directory (`trusted.overlay.opaque=y`).
    pub fn opaque_dir(self, path: &str) -> Layer {
        self.push(path, Node::OpaqueDir)
    }
    /// An opaque directory marked by a `.wh..wh..opq` file.
    pub fn opaque_wh_dir(self, path: &str) -> Layer {
        self.push(path, Node::OpaqueWhDir)
    }
    /// An opaque directory marked by `user.fuseoverlayfs.opaque=y`.
    pub fn opaque_user_dir(self, path: &str) -> Layer {
        self.push(path, Node::OpaqueUserDir)
    }
    /// A symbolic link.
    pub fn symlink(self, path: &str, target: &str) -> Layer {
        self.push(path, Node::Symlink(target.to_string()))
    }
    /// A hard link to `existing` (an earlier entry of this layer).
    pub fn link(self, path: &str, existing: &str) -> Layer {
        self.push(path, Node::HardLink(existing.trim_matches('/').to_string()))
    }
    /// A named pipe.
    pub fn fifo(self, path: &str) -> Layer {
        self.push(path, Node::Fifo)
    }
    /// A character device.
    pub fn chardev(self, path: &str, major: u32, minor: u32) -> Layer {
        self.push(path, Node::CharDev(major, minor))
    }
    /// A whiteout hiding `path` in lower layers, as a char device 0/0.
    pub fn whiteout(self, path: &str) -> Layer {
        self.push(path, Node::Whiteout)
    }
    /// A whiteout hiding `path` in lower layers, as an empty `.wh.NAME` file.
    pub fn wh_file(self, path: &str) -> Layer {
        self.push(path, Node::WhFile)
    }
    /// Sets the permission bits of the last entry.
    pub fn mode(mut self, mode: u32) -> Layer {
        self.last().mode = Some(mode);
        self
    }
    /// Sets the owner of the last entry.
    pub fn owner(mut self, uid: u32, gid: u32) -> Layer {
        self.last().owner = Some((uid, gid));
        self
    }
    /// Adds an extended attribute to the last entry.
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Layer {
        self.last()
            .xattrs
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }
    /// Gives the last entry (a directory) kernel overlayfs's `trusted.overlay.redirect` with
    /// `value`: lookups below it continue at that path in the layers below (absolute from the
    /// layer root when it starts with `/`, else a name in the parent's place).
    pub fn redirect(self, value: impl AsRef<[u8]>) -> Layer {
        self.xattr(REDIRECT_XATTRS[0], value)
    }
    /// Sets the modification time (seconds) of the last entry.
    pub fn mtime(mut self, secs: i64) -> Layer {
        self.last().mtime = Some(secs);
        self
    }

    /// True when kernel overlayfs understands every entry (no `.wh.` files, no
    /// `.wh..wh..opq`, no `user.fuseoverlayfs.opaque`).
    pub fn kernel_compatible(&self) -> bool {
        self.entries.iter().all(|e| {
            !matches!(
                e.node,
                Node::WhFile | Node::OpaqueWhDir | Node::OpaqueUserDir
            )
        })
    }

    /// Creates the layer under `root` (which must exist).
    pub fn materialize(&self, root: &Path) -> std::io::Result<()> {
        let mut dirs = vec![PathBuf::new()];
        let mut stamped: Vec<(PathBuf, i64)> = Vec::new();
        for e in &self.entries {
            let rel = Path::new(&e.path);
            let mut parent = PathBuf::new();
            for comp in rel.parent().into_iter().flat_map(|p| p.components()) {
                parent.push(comp);
                let p = root.join(&parent);
                if std::fs::symlink_metadata(&p).is_err() {
                    std::fs::create_dir(&p)?;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
                    dirs.push(parent.clone());
                }
            }
            let (path, target_rel) = match e.node {
                Node::WhFile => {
                    let name = rel.file_name().expect("whiteout has a name");
                    let wh = rel.with_file_name(format!(".wh.{}", name.to_string_lossy()));
                    (root.join(&wh), wh)
                }
                _ => (root.join(rel), rel.to_path_buf()),
            };
            let default_mode = match &e.node {
                Node::File(c) => {
                    std::fs::write(&path, c)?;
                    0o644
                }
                Node::Dir | Node::OpaqueDir | Node::OpaqueWhDir | Node::OpaqueUserDir => {
                    if !path.is_dir() {
                        std::fs::create_dir(&path)?;
                    }
                    match e.node {
                        Node::OpaqueDir => {
                            rustix::fs::lsetxattr(
                                &path,
                                "trusted.overlay.opaque",
                                b"y",
                                XattrFlags::empty(),
                            )?;
                        }
                        Node::OpaqueUserDir => {
                            rustix::fs::lsetxattr(
                                &path,
                                "user.fuseoverlayfs.opaque",
                                b"y",
                                XattrFlags::empty(),
                            )?;
                        }
                        Node::OpaqueWhDir => {
                            let opq = path.join(".wh..wh..opq");
                            std::fs::write(&opq, b"")?;
                            stamped.push((opq, FIXED_MTIME));
                        }
                        _ => {}
                    }
                    dirs.push(target_rel.clone());
                    0o755
                }
                Node::Symlink(t) => {
                    std::os::unix::fs::symlink(t, &path)?;
                    0o777
                }
                Node::HardLink(t) => {
                    std::fs::hard_link(root.join(t), &path)?;
                    0
                }
                Node::Fifo => {
                    rustix::fs::mknodat(CWD, &path, FileType::Fifo, Mode::from(0o644), 0)?;
                    0o644
                }
                Node::CharDev(maj, min) => {
                    rustix::fs::mknodat(
                        CWD,
                        &path,
                        FileType::CharacterDevice,
                        Mode::from(0o644),
                        rustix::fs::makedev(*maj, *min),
                    )?;
                    0o644
                }
                Node::Whiteout => {
                    rustix::fs::mknodat(
                        CWD,
                        &path,
                        FileType::CharacterDevice,
                        Mode::empty(),
                        rustix::fs::makedev(0, 0),
                    )?;
                    0
                }
                Node::WhFile => {
                    std::fs::write(&path, b"")?;
                    0o700
                }
            };
            let is_symlink = matches!(e.node, Node::Symlink(_));
            if let Some((uid, gid)) = e.owner {
                rustix::fs::chownat(
                    CWD,
                    &path,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            if !is_symlink && (default_mode != 0 || e.mode.is_some()) {
                let mode = e.mode.unwrap_or(default_mode);
                rustix::fs::chmodat(CWD, &path, Mode::from(mode), AtFlags::empty())?;
            }
            for (name, value) in &e.xattrs {
                rustix::fs::lsetxattr(&path, name.as_str(), value, XattrFlags::empty())?;
            }
            if !matches!(e.node, Node::HardLink(_)) {
                stamped.push((path, e.mtime.unwrap_or(FIXED_MTIME)));
            }
        }
        for (p, t) in stamped {
            set_mtime(&p, t)?;
        }
        // Directories last, deepest first, so creating children does not bump them.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let t = self
                .entries
                .iter()
                .find(|e| Path::new(&e.path) == d)
                .and_then(|e| e.mtime)
                .unwrap_or(FIXED_MTIME);
            set_mtime(&root.join(d), t)?;
        }
        Ok(())
    }
}

/// The xattrs of a redirected directory (kernel overlayfs's; `user.` with `userxattr`, as
/// rustfuse writes it rootless).
pub const REDIRECT_XATTRS: [&str; 2] = ["trusted.overlay.redirect", "user.overlay.redirect"];

/// The directories of the layer at `root` that carry a redirect which changes where lookups
/// below them continue, each with that place: the path (relative to the layers' root, no
/// leading `/`) in the layers below. A relative redirect (`NAME`) is resolved against the
/// place of the parent; a redirect naming the place the directory would have anyway is left
/// out, so that kernel overlayfs's relative form (`d2` renamed back to `d`: `d`) and an
/// absolute one (`/d`) compare equal. A value that is not valid UTF-8 shows as hex.
pub fn dir_redirects(root: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    // (path in this layer, place below)
    let mut stack = vec![(String::new(), String::new())];
    while let Some((rel, place)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let join = |a: &str| match a {
                "" => name.clone(),
                a => format!("{a}/{name}"),
            };
            let (path, natural) = (join(&rel), join(&place));
            let value = REDIRECT_XATTRS.iter().find_map(|x| {
                let mut buf = vec![0u8; 65536];
                let n = rustix::fs::lgetxattr(e.path(), *x, &mut buf[..]).ok()?;
                buf.truncate(n);
                Some(buf)
            });
            let here = match value {
                None => natural.clone(),
                Some(v) => match std::str::from_utf8(&v) {
                    Ok(v) if v.starts_with('/') => v.trim_start_matches('/').to_string(),
                    Ok(v) => match place.as_str() {
                        "" => v.to_string(),
                        p => format!("{p}/{v}"),
                    },
                    Err(_) => crate::snapshot::show_bytes(&v),
                },
            };
            if here != natural {
                out.insert(path.clone(), here.clone());
            }
            stack.push((path, here));
        }
    }
    out
}

/// Sets atime and mtime of `path` (not following symlinks).
pub fn set_mtime(path: &Path, secs: i64) -> std::io::Result<()> {
    let ts = Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// A stack of layers: lower layers (topmost first) and the initial content of the upper layer.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// Lower layers, topmost first.
    pub lowers: Vec<Layer>,
    /// Initial content of the upper layer.
    pub upper: Layer,
}

/// A materialized [`Tree`]: its layer directories and an empty mount point.
#[derive(Debug, Clone)]
pub struct Materialized {
    /// The layer directories.
    pub stack: Stack,
    /// An empty directory to mount on.
    pub mnt: PathBuf,
}

impl Tree {
    /// An empty tree (add layers with [`Tree::lower`]).
    pub fn new() -> Tree {
        Tree::default()
    }
    /// Adds a lower layer below the ones already added.
    pub fn lower(mut self, layer: Layer) -> Tree {
        self.lowers.push(layer);
        self
    }
    /// Sets the initial upper layer content.
    pub fn with_upper(mut self, layer: Layer) -> Tree {
        self.upper = layer;
        self
    }
    /// True when kernel overlayfs understands all layers.
    pub fn kernel_compatible(&self) -> bool {
        self.lowers.iter().all(Layer::kernel_compatible) && self.upper.kernel_compatible()
    }

    /// Creates `base/lower0..N`, `base/upper`, `base/work` and `base/mnt`.
    pub fn materialize(&self, base: &Path) -> std::io::Result<Materialized> {
        std::fs::create_dir_all(base)?;
        let mut lowers = Vec::new();
        for (i, l) in self.lowers.iter().enumerate() {
            let d = base.join(format!("lower{i}"));
            std::fs::create_dir(&d)?;
            l.materialize(&d)?;
            set_mtime(&d, FIXED_MTIME)?;
            lowers.push(d);
        }
        let upper = base.join("upper");
        let work = base.join("work");
        let mnt = base.join("mnt");
        for d in [&upper, &work, &mnt] {
            std::fs::create_dir(d)?;
        }
        self.upper.materialize(&upper)?;
        set_mtime(&upper, FIXED_MTIME)?;
        Ok(Materialized {
            stack: Stack {
                lowers,
                upper: Some(upper),
                work: Some(work),
            },
            mnt,
        })
    }

    /// Like [`Tree::materialize`] but read-only: no upper and work directories (the initial upper
    /// layer, if any, becomes the topmost lower).
    pub fn materialize_ro(&self, base: &Path) -> std::io::Result<Materialized> {
        let mut m = self.materialize(base)?;
        let upper = m.stack.upper.take().expect("upper");
        m.stack.work = None;
        if !self.upper.entries.is_empty() {
            m.stack.lowers.insert(0, upper);
        }
        Ok(m)
    }
}
