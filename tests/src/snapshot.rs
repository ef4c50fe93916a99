//! A normalized description of a merged view, and a readable diff of two of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt};
use std::path::Path;

/// Modification times at or after this instant (2020-09-13) are "recent": they depend on when
/// the test ran and are not compared. Times set by the layer builder or by `utimens` ops are
/// older and compared exactly.
pub const RECENT: i64 = 1_600_000_000;

/// File type as seen through the merged view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Socket.
    Socket,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
}

impl Kind {
    /// The kind of `ft`.
    pub fn of(ft: std::fs::FileType) -> Kind {
        if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::CharDev
        } else if ft.is_block_device() {
            Kind::BlockDev
        } else {
            Kind::File
        }
    }
}

/// What is compared about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// File type.
    pub kind: Kind,
    /// Permission bits (mode & 0o7777).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size, for regular files and symlinks.
    pub size: Option<u64>,
    /// Content (short text as is, else length and hash), for regular files.
    pub content: Option<String>,
    /// Symlink target.
    pub target: Option<String>,
    /// Device numbers, for devices.
    pub rdev: Option<(u32, u32)>,
    /// Extended attributes except `security.*` (value as text or hex).
    pub xattrs: BTreeMap<String, String>,
    /// Link count, for non-directories.
    pub nlink: Option<u64>,
    /// Modification time when older than [`RECENT`], else None.
    pub mtime: Option<i64>,
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {:04o} {}:{}",
            self.kind, self.mode, self.uid, self.gid
        )?;
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if let Some(c) = &self.content {
            write!(f, " content={c}")?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {t:?}")?;
        }
        if let Some((a, b)) = self.rdev {
            write!(f, " rdev={a}:{b}")?;
        }
        if let Some(n) = self.nlink {
            write!(f, " nlink={n}")?;
        }
        match self.mtime {
            Some(t) => write!(f, " mtime={t}")?,
            None => write!(f, " mtime=recent")?,
        }
        if !self.xattrs.is_empty() {
            write!(f, " xattrs={:?}", self.xattrs)?;
        }
        Ok(())
    }
}

/// A merged view: every path (relative, `""` is the root) with its [`Info`], and inode data.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Path → what is compared.
    pub entries: BTreeMap<String, Info>,
    /// Path → st_ino (from lstat).
    pub inos: BTreeMap<String, u64>,
    /// Inconsistencies inside the view itself: readdir d_ino ≠ st_ino, d_type ≠ st_mode type,
    /// nlink of hard links not matching the number of names seen, readdir errors.
    pub problems: Vec<String>,
}

/// Renders bytes as text when printable, else hex.
pub fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.chars().all(|c| !c.is_control() || c == '\n') => format!("{s:?}"),
        _ => {
            let mut h = String::from("0x");
            for x in b {
                let _ = write!(h, "{x:02x}");
            }
            h
        }
    }
}

/// FNV-1a, enough to tell contents apart.
pub fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn show_content(b: &[u8]) -> String {
    if b.len() <= 48 {
        show_bytes(b)
    } else {
        format!("<{} bytes fnv={:016x}>", b.len(), fnv(b))
    }
}

/// Extended attributes of `path` (not following symlinks), except `security.*`.
pub fn xattrs(path: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut names[..])?;
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("security.") {
            continue;
        }
        let mut val = vec![0u8; 65536];
        match rustix::fs::lgetxattr(path, name.as_str(), &mut val[..]) {
            Ok(n) => {
                out.insert(name, show_bytes(&val[..n]));
            }
            Err(e) => {
                out.insert(name, format!("<getxattr error {e}>"));
            }
        }
    }
    Ok(out)
}

/// Describes `path` (lstat, content, xattrs).
pub fn describe(path: &Path) -> std::io::Result<Info> {
    let md = std::fs::symlink_metadata(path)?;
    let kind = Kind::of(md.file_type());
    let content = if kind == Kind::File {
        Some(match std::fs::read(path) {
            Ok(c) => show_content(&c),
            Err(e) => format!("<read error: {e}>"),
        })
    } else {
        None
    };
    let target = if kind == Kind::Symlink {
        Some(
            std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|e| format!("<readlink error: {e}>")),
        )
    } else {
        None
    };
    let xattrs = xattrs(path).unwrap_or_else(|e| {
        let mut m = BTreeMap::new();
        m.insert("<listxattr error>".to_string(), e.to_string());
        m
    });
    let mtime = md.mtime();
    Ok(Info {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: matches!(kind, Kind::File | Kind::Symlink).then_some(md.size()),
        content,
        target,
        rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then(|| {
            let d = md.rdev();
            (rustix::fs::major(d), rustix::fs::minor(d))
        }),
        xattrs,
        nlink: (kind != Kind::Dir).then_some(md.nlink()),
        mtime: (mtime < RECENT).then_some(mtime),
    })
}

/// Walks the merged view at `root` without following symlinks.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut s = Snapshot::default();
    match describe(root) {
        Ok(info) => {
            s.entries.insert(String::new(), info);
        }
        Err(e) => {
            s.problems.push(format!("lstat of the root: {e}"));
            return s;
        }
    }
    if let Ok(md) = std::fs::symlink_metadata(root) {
        s.inos.insert(String::new(), md.ino());
    }
    walk(root, "", &mut s);
    // Hard links: every name of an inode must report nlink = number of names seen (the tree
    // holds all names as long as the tests create no links outside it).
    let mut by_ino: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
    for (p, ino) in &s.inos {
        if s.entries.get(p).is_some_and(|i| i.kind != Kind::Dir) {
            by_ino.entry(*ino).or_default().push(p);
        }
    }
    let mut problems = Vec::new();
    for names in by_ino.values() {
        for p in names {
            let n = s.entries[p.as_str()].nlink.unwrap_or(0);
            if n != names.len() as u64 {
                problems.push(format!(
                    "{p}: nlink={n} but {} names share its inode: {names:?}",
                    names.len()
                ));
            }
        }
    }
    s.problems.extend(problems);
    s
}

fn walk(root: &Path, rel: &str, s: &mut Snapshot) {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) => {
            s.problems.push(format!("readdir {rel:?}: {e}"));
            return;
        }
    };
    let mut children = Vec::new();
    for ent in rd {
        let ent = match ent {
            Ok(e) => e,
            Err(e) => {
                s.problems.push(format!("readdir {rel:?}: {e}"));
                break;
            }
        };
        let name = ent.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let d_ino = ent.ino();
        let d_kind = ent.file_type().ok().map(Kind::of);
        match std::fs::symlink_metadata(ent.path()) {
            Ok(md) => {
                if md.ino() != d_ino {
                    s.problems.push(format!(
                        "{path}: readdir d_ino={d_ino} but stat st_ino={}",
                        md.ino()
                    ));
                }
                if d_kind.is_some_and(|k| k != Kind::of(md.file_type())) {
                    s.problems.push(format!(
                        "{path}: readdir d_type={d_kind:?} but stat type={:?}",
                        Kind::of(md.file_type())
                    ));
                }
                s.inos.insert(path.clone(), md.ino());
            }
            Err(e) => {
                s.problems
                    .push(format!("{path}: listed by readdir but lstat fails: {e}"));
                continue;
            }
        }
        match describe(&ent.path()) {
            Ok(info) => {
                let is_dir = info.kind == Kind::Dir;
                s.entries.insert(path.clone(), info);
                if is_dir {
                    children.push(path);
                }
            }
            Err(e) => s.problems.push(format!("{path}: {e}")),
        }
    }
    for c in children {
        walk(root, &c, s);
    }
}

/// Differences between two snapshots (`a` named `an`, `b` named `bn`), one line each; empty
/// when equal. Inode numbers are not compared here (see [`ino_links`]).
pub fn diff(a: &Snapshot, an: &str, b: &Snapshot, bn: &str) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = a.entries.keys().chain(b.entries.keys()).collect();
    for k in keys {
        let shown = if k.is_empty() { "/" } else { k.as_str() };
        match (a.entries.get(k), b.entries.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => out.push(format!("{shown}:\n    {an}: {x}\n    {bn}: {y}")),
            (Some(x), None) => out.push(format!("{shown}: only in {an}: {x}")),
            (None, Some(y)) => out.push(format!("{shown}: only in {bn}: {y}")),
            (None, None) => unreachable!(),
        }
    }
    out
}

/// Pairs (path in `before`, path in `after`) that name the same inode: captures inode stability
/// across copy-up and rename, and hard links. Kernel overlayfs on one filesystem keeps st_ino
/// across copy-up, so the FUSE overlay must produce the same pairs.
pub fn ino_links(before: &Snapshot, after: &Snapshot) -> BTreeSet<(String, String)> {
    let mut by_ino: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
    for (p, i) in &after.inos {
        by_ino.entry(*i).or_default().push(p);
    }
    let mut out = BTreeSet::new();
    for (p, i) in &before.inos {
        for q in by_ino.get(i).into_iter().flatten() {
            out.insert((p.clone(), (*q).clone()));
        }
    }
    out
}

/// Paths whose inode number changed between two snapshots (present in both).
pub fn ino_changes(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    before
        .inos
        .iter()
        .filter_map(|(p, i)| {
            let j = after.inos.get(p)?;
            (i != j).then(|| format!("{p}: st_ino {i} -> {j}"))
        })
        .collect()
}
