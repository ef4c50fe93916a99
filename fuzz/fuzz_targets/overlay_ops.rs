//! A sequence of overlay operations, checked step by step against an in-memory model.
//!
//! The input decodes to two lower layers (written to disk with `.wh.` files or 0/0 devices
//! as whiteouts, `.wh..wh..opq` or `trusted.overlay.opaque` as opaque markers) over three
//! names and three levels, then up to 48 operations: create, write, unlink, mkdir, rmdir,
//! rename (plain, NOREPLACE, EXCHANGE), readdir, lookup, and a remount (a fresh `Overlay`
//! over the same directories). The overlay core is driven directly, no FUSE, the way the
//! kernel would drive it: the driver does the VFS's part (path walk, EEXIST before create,
//! EISDIR/ENOTDIR before unlink/rmdir, rename's ancestor and type checks) with the overlay's
//! own lookups. The model is the merged lower tree plus the changes; each result (errno,
//! listing, kind, size, contents) must match it, an object keeps its inode number while it
//! lives, and at the end (and after each remount) a walk of the whole tree must match the
//! model with distinct inode numbers, readdir's d_ino equal to lookup's.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use rustfuse::overlay::{Attr, Caller, Config, Ino, Kind, Overlay, ROOT_INO, RenameMode};

const NAMES: [&str; 3] = ["a", "b", "c"];
const MAX_DEPTH: usize = 3;
const MAX_OPS: usize = 48;
const CALLER: Caller = Caller { uid: 0, gid: 0 };

type Name = &'static str;
type Errno = i32;

// ------------------------------------------------------------ lower layers

#[derive(Debug, Clone, Copy)]
enum Marker {
    File,
    /// A 0/0 character device (whiteout) or a `trusted.overlay.opaque` xattr (opaque dir).
    Kernel,
}

#[derive(Debug)]
enum LEntry {
    File(Vec<u8>),
    Dir {
        opaque: Option<Marker>,
        children: BTreeMap<Name, LEntry>,
    },
    Whiteout(Marker),
}

type Layer = BTreeMap<Name, LEntry>;

fn data(u: &mut Unstructured<'_>, max: usize) -> AResult<Vec<u8>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| u.arbitrary::<u8>()).collect()
}

fn marker(u: &mut Unstructured<'_>, root: bool) -> AResult<Marker> {
    Ok(if root && u.arbitrary()? {
        Marker::Kernel
    } else {
        Marker::File
    })
}

/// One directory of a layer. Only the top layer (`top`) holds whiteouts and opaque markers:
/// in the bottom one they would mean nothing.
fn gen_layer(u: &mut Unstructured<'_>, depth: usize, top: bool, root: bool) -> AResult<Layer> {
    let mut out = BTreeMap::new();
    for name in NAMES {
        let e = match u.int_in_range(0..=7u8)? {
            4 => LEntry::File(data(u, 4)?),
            5 | 6 if depth < MAX_DEPTH => LEntry::Dir {
                opaque: if top && u.ratio(1, 4)? {
                    Some(marker(u, root)?)
                } else {
                    None
                },
                children: gen_layer(u, depth + 1, top, root)?,
            },
            7 if top => LEntry::Whiteout(marker(u, root)?),
            _ => continue,
        };
        out.insert(name, e);
    }
    Ok(out)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in scratch paths")
}

fn write_layer(dir: &Path, layer: &Layer) {
    for (name, e) in layer {
        let p = dir.join(name);
        match e {
            LEntry::File(d) => fs::write(&p, d).unwrap(),
            LEntry::Whiteout(Marker::File) => {
                fs::write(dir.join(format!(".wh.{name}")), b"").unwrap()
            }
            LEntry::Whiteout(Marker::Kernel) => {
                // SAFETY: a valid NUL-terminated path; mknod does not keep it.
                let r = unsafe { libc::mknod(cpath(&p).as_ptr(), libc::S_IFCHR | 0o600, 0) };
                assert_eq!(r, 0, "mknod {}", p.display());
            }
            LEntry::Dir { opaque, children } => {
                fs::create_dir(&p).unwrap();
                match opaque {
                    Some(Marker::File) => fs::write(p.join(".wh..wh..opq"), b"").unwrap(),
                    Some(Marker::Kernel) => {
                        let name = c"trusted.overlay.opaque";
                        // SAFETY: valid NUL-terminated path and name, a 1-byte value.
                        let r = unsafe {
                            libc::setxattr(
                                cpath(&p).as_ptr(),
                                name.as_ptr(),
                                c"y".as_ptr().cast(),
                                1,
                                0,
                            )
                        };
                        assert_eq!(r, 0, "setxattr {}", p.display());
                    }
                    None => {}
                }
                write_layer(&p, children);
            }
        }
    }
}

// ------------------------------------------------------------ the model

#[derive(Debug, Clone)]
enum MNode {
    File {
        id: u64,
        data: Vec<u8>,
    },
    /// `lower`: merged with a lower directory, so renaming it is EXDEV (no redirect_dir).
    Dir {
        id: u64,
        lower: bool,
        children: BTreeMap<Name, MNode>,
    },
}

impl MNode {
    fn kind(&self) -> Kind {
        match self {
            MNode::File { .. } => Kind::File,
            MNode::Dir { .. } => Kind::Dir,
        }
    }
    fn id(&self) -> u64 {
        match self {
            MNode::File { id, .. } | MNode::Dir { id, .. } => *id,
        }
    }
}

struct Model {
    root: BTreeMap<Name, MNode>,
    next_id: u64,
}

/// Overlay merge of directories given topmost first.
fn merge(dirs: &[&Layer], next_id: &mut u64) -> BTreeMap<Name, MNode> {
    let mut out = BTreeMap::new();
    for name in NAMES {
        let mut file = None;
        let mut below: Vec<&Layer> = Vec::new();
        for d in dirs {
            match d.get(name) {
                None => continue,
                Some(LEntry::Whiteout(_)) => break,
                Some(LEntry::File(data)) => {
                    if below.is_empty() {
                        file = Some(data.clone());
                    }
                    break;
                }
                Some(LEntry::Dir { opaque, children }) => {
                    below.push(children);
                    if opaque.is_some() {
                        break;
                    }
                }
            }
        }
        *next_id += 1;
        let id = *next_id;
        if let Some(data) = file {
            out.insert(name, MNode::File { id, data });
        } else if !below.is_empty() {
            let children = merge(&below, next_id);
            out.insert(
                name,
                MNode::Dir {
                    id,
                    lower: true,
                    children,
                },
            );
        }
    }
    out
}

fn starts_with(long: &[Name], short: &[Name]) -> bool {
    long.len() > short.len() && long[..short.len()] == *short
}

impl Model {
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn dir(&self, path: &[Name]) -> Result<&BTreeMap<Name, MNode>, Errno> {
        let mut d = &self.root;
        for c in path {
            match d.get(c) {
                None => return Err(libc::ENOENT),
                Some(MNode::File { .. }) => return Err(libc::ENOTDIR),
                Some(MNode::Dir { children, .. }) => d = children,
            }
        }
        Ok(d)
    }

    /// The directory at `path`, known to exist.
    fn dir_mut(&mut self, path: &[Name]) -> &mut BTreeMap<Name, MNode> {
        let mut d = &mut self.root;
        for c in path {
            match d.get_mut(c) {
                Some(MNode::Dir { children, .. }) => d = children,
                _ => unreachable!("checked"),
            }
        }
        d
    }

    fn get(&self, path: &[Name]) -> Result<Option<&MNode>, Errno> {
        let (last, parent) = path.split_last().expect("not the root");
        Ok(self.dir(parent)?.get(last))
    }

    fn apply(&mut self, op: &Op) -> Result<Out, Errno> {
        match op {
            Op::Create(p, data) => {
                if self.get(p)?.is_some() {
                    return Err(libc::EEXIST);
                }
                let id = self.new_id();
                let (last, parent) = p.split_last().unwrap();
                let data = data.clone();
                self.dir_mut(parent).insert(last, MNode::File { id, data });
                Ok(Out::Done)
            }
            Op::Write(p, off, new, trunc) => {
                match self.get(p)? {
                    None => return Err(libc::ENOENT),
                    Some(MNode::Dir { .. }) => return Err(libc::EISDIR),
                    Some(MNode::File { .. }) => {}
                }
                let (last, parent) = p.split_last().unwrap();
                let Some(MNode::File { data, .. }) = self.dir_mut(parent).get_mut(last) else {
                    unreachable!()
                };
                if *trunc {
                    data.clear();
                }
                if !new.is_empty() {
                    let end = *off as usize + new.len();
                    if data.len() < end {
                        data.resize(end, 0);
                    }
                    data[*off as usize..end].copy_from_slice(new);
                }
                Ok(Out::Done)
            }
            Op::Unlink(p) => {
                match self.get(p)? {
                    None => return Err(libc::ENOENT),
                    Some(MNode::Dir { .. }) => return Err(libc::EISDIR),
                    Some(MNode::File { .. }) => {}
                }
                let (last, parent) = p.split_last().unwrap();
                self.dir_mut(parent).remove(last);
                Ok(Out::Done)
            }
            Op::Mkdir(p) => {
                if self.get(p)?.is_some() {
                    return Err(libc::EEXIST);
                }
                let id = self.new_id();
                let (last, parent) = p.split_last().unwrap();
                self.dir_mut(parent).insert(
                    last,
                    MNode::Dir {
                        id,
                        lower: false,
                        children: BTreeMap::new(),
                    },
                );
                Ok(Out::Done)
            }
            Op::Rmdir(p) => {
                match self.get(p)? {
                    None => return Err(libc::ENOENT),
                    Some(MNode::File { .. }) => return Err(libc::ENOTDIR),
                    Some(MNode::Dir { children, .. }) if !children.is_empty() => {
                        return Err(libc::ENOTEMPTY);
                    }
                    Some(MNode::Dir { .. }) => {}
                }
                let (last, parent) = p.split_last().unwrap();
                self.dir_mut(parent).remove(last);
                Ok(Out::Done)
            }
            Op::Rename(src, dst, flags) => {
                let (sl, sp) = src.split_last().unwrap();
                let (dl, dp) = dst.split_last().unwrap();
                self.dir(sp)?;
                let d = self.dir(dp)?.get(dl).cloned();
                let s = self.dir(sp)?.get(sl).cloned().ok_or(libc::ENOENT)?;
                let exchange = *flags == libc::RENAME_EXCHANGE;
                vfs_rename_checks(src, dst, *flags, d.is_some())?;
                if src == dst {
                    return Ok(Out::Done);
                }
                if let Some(d) = &d {
                    if !exchange {
                        type_checks(s.kind(), d.kind())?;
                    }
                }
                // The overlay's own refusals.
                if matches!(s, MNode::Dir { lower: true, .. }) {
                    return Err(libc::EXDEV);
                }
                match &d {
                    Some(MNode::Dir { lower: true, .. }) if exchange => return Err(libc::EXDEV),
                    Some(MNode::Dir { children, .. }) if !exchange && !children.is_empty() => {
                        return Err(libc::ENOTEMPTY);
                    }
                    _ => {}
                }
                self.dir_mut(sp).remove(sl);
                if exchange {
                    let d = self.dir_mut(dp).remove(dl).unwrap();
                    self.dir_mut(sp).insert(sl, d);
                }
                self.dir_mut(dp).insert(dl, s);
                Ok(Out::Done)
            }
            Op::Readdir(p) => {
                let d = self.dir(p)?;
                Ok(Out::Names(
                    d.iter().map(|(n, e)| (n.to_string(), e.kind())).collect(),
                ))
            }
            Op::Lookup(p) => {
                let n = if p.is_empty() {
                    return Ok(Out::Node(Kind::Dir, None, 0));
                } else {
                    self.get(p)?.ok_or(libc::ENOENT)?
                };
                let data = match n {
                    MNode::File { data, .. } => Some((data.len() as u64, data.clone())),
                    MNode::Dir { .. } => None,
                };
                Ok(Out::Node(n.kind(), data, n.id()))
            }
            Op::Remount => Ok(Out::Done),
        }
    }
}

/// What the VFS checks before calling the filesystem's rename, in its order.
/// The core's rename mode for the renameat2 flags an operation carries (one of three).
fn rename_mode(flags: u32) -> RenameMode {
    match flags {
        libc::RENAME_NOREPLACE => RenameMode::NoReplace,
        libc::RENAME_EXCHANGE => RenameMode::Exchange,
        _ => RenameMode::Replace,
    }
}

fn vfs_rename_checks(
    src: &[Name],
    dst: &[Name],
    flags: u32,
    dst_exists: bool,
) -> Result<(), Errno> {
    if flags == libc::RENAME_NOREPLACE && dst_exists {
        return Err(libc::EEXIST);
    }
    if flags == libc::RENAME_EXCHANGE && !dst_exists {
        return Err(libc::ENOENT);
    }
    if starts_with(dst, src) {
        return Err(libc::EINVAL);
    }
    if starts_with(src, dst) {
        return Err(if flags == libc::RENAME_EXCHANGE {
            libc::EINVAL
        } else {
            libc::ENOTEMPTY
        });
    }
    Ok(())
}

fn type_checks(src: Kind, dst: Kind) -> Result<(), Errno> {
    match (src == Kind::Dir, dst == Kind::Dir) {
        (true, false) => Err(libc::ENOTDIR),
        (false, true) => Err(libc::EISDIR),
        _ => Ok(()),
    }
}

// ------------------------------------------------------------ operations

#[derive(Debug)]
enum Op {
    Create(Vec<Name>, Vec<u8>),
    /// Open for writing (truncating if asked), write at the offset.
    Write(Vec<Name>, u8, Vec<u8>, bool),
    Unlink(Vec<Name>),
    Mkdir(Vec<Name>),
    Rmdir(Vec<Name>),
    Rename(Vec<Name>, Vec<Name>, u32),
    Readdir(Vec<Name>),
    Lookup(Vec<Name>),
    Remount,
}

/// What an operation shows: done, a sorted listing, or a node (kind, contents, identity:
/// the model's id or the overlay's inode number).
#[derive(Debug)]
enum Out {
    Done,
    Names(Vec<(String, Kind)>),
    Node(Kind, Option<(u64, Vec<u8>)>, u64),
}

impl Out {
    fn same(&self, other: &Out) -> bool {
        match (self, other) {
            (Out::Done, Out::Done) => true,
            (Out::Names(a), Out::Names(b)) => a == b,
            (Out::Node(k1, d1, _), Out::Node(k2, d2, _)) => k1 == k2 && d1 == d2,
            _ => false,
        }
    }
}

fn path(u: &mut Unstructured<'_>, min: usize) -> AResult<Vec<Name>> {
    let n = u.int_in_range(min..=MAX_DEPTH)?;
    (0..n)
        .map(|_| Ok(NAMES[u.int_in_range(0..=2usize)?]))
        .collect()
}

fn gen_op(u: &mut Unstructured<'_>) -> AResult<Op> {
    Ok(match u.int_in_range(0..=16u8)? {
        0 | 1 => Op::Create(path(u, 1)?, data(u, 6)?),
        2 | 3 => Op::Write(
            path(u, 1)?,
            u.int_in_range(0..=8)?,
            data(u, 6)?,
            u.ratio(1, 4)?,
        ),
        4 | 5 => Op::Unlink(path(u, 1)?),
        6 | 7 => Op::Mkdir(path(u, 1)?),
        8 => Op::Rmdir(path(u, 1)?),
        9..=11 => {
            let flags = match u.int_in_range(0..=3u8)? {
                0 => libc::RENAME_NOREPLACE,
                1 => libc::RENAME_EXCHANGE,
                _ => 0,
            };
            Op::Rename(path(u, 1)?, path(u, 1)?, flags)
        }
        12 | 13 => Op::Readdir(path(u, 0)?),
        14 | 15 => Op::Lookup(path(u, 0)?),
        _ => Op::Remount,
    })
}

// ------------------------------------------------------------ the driver

struct Scratch {
    root: PathBuf,
    /// Mount with `.wh.` file whiteouts only (fuse-overlayfs's
    /// `FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT`, passed in the configuration).
    file_whiteouts: bool,
}

impl Scratch {
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn mount(&self) -> Overlay {
        let o = rustfuse::options::parse(&[format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            self.p("l1").display(),
            self.p("l2").display(),
            self.p("upper").display(),
            self.p("work").display()
        )])
        .expect("options");
        let mut config = Config::new(o);
        config.no_dev_whiteouts = self.file_whiteouts;
        Overlay::with_config(config).expect("overlay")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn raw(e: rustfuse::sys::Errno) -> Errno {
    e.raw_os_error()
}

fn os(n: Name) -> &'static OsStr {
    OsStr::new(n)
}

/// The overlay, driven as the kernel's VFS would drive it.
struct Driver {
    ov: Overlay,
}

impl Driver {
    fn dir(&self, path: &[Name]) -> Result<Ino, Errno> {
        let mut ino = ROOT_INO;
        for c in path {
            let a = self.ov.lookup(ino, os(c)).map_err(raw)?;
            if a.kind != Kind::Dir {
                return Err(libc::ENOTDIR);
            }
            ino = a.ino;
        }
        Ok(ino)
    }

    /// Parent inode and the entry, if any.
    fn get(&self, path: &[Name]) -> Result<(Ino, Option<Attr>), Errno> {
        let (last, parent) = path.split_last().expect("not the root");
        let p = self.dir(parent)?;
        match self.ov.lookup(p, os(last)) {
            Ok(a) => Ok((p, Some(a))),
            Err(e) if raw(e) == libc::ENOENT => Ok((p, None)),
            Err(e) => Err(raw(e)),
        }
    }

    fn read_all(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let fh = self.ov.open(ino, libc::O_RDONLY).map_err(raw)?;
        let r = self.ov.read(fh, 0, 4096).map_err(raw);
        self.ov.release(fh);
        r
    }

    fn list(&self, ino: Ino) -> Result<Vec<(String, Kind, Ino)>, Errno> {
        let fh = self.ov.opendir(ino).map_err(raw)?;
        let mut v = Vec::new();
        let r = self.ov.readdir(fh, ino, 0, |e, _| {
            if e.name != "." && e.name != ".." {
                v.push((e.name.to_string_lossy().into_owned(), e.kind, e.ino));
            }
            false
        });
        self.ov.release(fh);
        r.map_err(raw)?;
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    fn apply(&self, op: &Op) -> Result<Out, Errno> {
        let last = |p: &[Name]| os(p[p.len() - 1]);
        match op {
            Op::Create(p, data) => {
                let (parent, e) = self.get(p)?;
                if e.is_some() {
                    return Err(libc::EEXIST);
                }
                let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
                let (_, fh) = self
                    .ov
                    .create(CALLER, parent, last(p), 0o644, flags)
                    .map_err(raw)?;
                let r = if data.is_empty() {
                    Ok(0)
                } else {
                    self.ov.write(fh, 0, data)
                };
                self.ov.release(fh);
                r.map_err(raw)?;
                Ok(Out::Done)
            }
            Op::Write(p, off, data, trunc) => {
                let a = self.get(p)?.1.ok_or(libc::ENOENT)?;
                if a.kind == Kind::Dir {
                    return Err(libc::EISDIR);
                }
                let flags = libc::O_WRONLY | if *trunc { libc::O_TRUNC } else { 0 };
                let fh = self.ov.open(a.ino, flags).map_err(raw)?;
                let r = if data.is_empty() {
                    Ok(0)
                } else {
                    self.ov.write(fh, *off as u64, data)
                };
                self.ov.release(fh);
                r.map_err(raw)?;
                Ok(Out::Done)
            }
            Op::Unlink(p) => {
                let (parent, e) = self.get(p)?;
                if e.ok_or(libc::ENOENT)?.kind == Kind::Dir {
                    return Err(libc::EISDIR);
                }
                self.ov.unlink(parent, last(p)).map_err(raw)?;
                Ok(Out::Done)
            }
            Op::Mkdir(p) => {
                let (parent, e) = self.get(p)?;
                if e.is_some() {
                    return Err(libc::EEXIST);
                }
                self.ov.mkdir(CALLER, parent, last(p), 0o755).map_err(raw)?;
                Ok(Out::Done)
            }
            Op::Rmdir(p) => {
                let (parent, e) = self.get(p)?;
                if e.ok_or(libc::ENOENT)?.kind != Kind::Dir {
                    return Err(libc::ENOTDIR);
                }
                self.ov.rmdir(parent, last(p)).map_err(raw)?;
                Ok(Out::Done)
            }
            Op::Rename(src, dst, flags) => {
                let (_, sp_path) = src.split_last().unwrap();
                self.dir(sp_path)?;
                let (dp, d) = self.get(dst)?;
                let (sp, s) = self.get(src)?;
                let s = s.ok_or(libc::ENOENT)?;
                vfs_rename_checks(src, dst, *flags, d.is_some())?;
                if let Some(d) = &d {
                    if d.ino == s.ino {
                        return Ok(Out::Done);
                    }
                    if *flags != libc::RENAME_EXCHANGE {
                        type_checks(s.kind, d.kind)?;
                    }
                }
                self.ov
                    .rename(sp, last(src), dp, last(dst), rename_mode(*flags))
                    .map_err(raw)?;
                Ok(Out::Done)
            }
            Op::Readdir(p) => {
                let ino = self.dir(p)?;
                Ok(Out::Names(
                    self.list(ino)?
                        .into_iter()
                        .map(|(n, k, _)| (n, k))
                        .collect(),
                ))
            }
            Op::Lookup(p) => {
                if p.is_empty() {
                    return Ok(Out::Node(Kind::Dir, None, ROOT_INO.0));
                }
                let a = self.get(p)?.1.ok_or(libc::ENOENT)?;
                let data = match a.kind {
                    Kind::File => Some((a.size, self.read_all(a.ino)?)),
                    _ => None,
                };
                Ok(Out::Node(a.kind, data, a.ino.0))
            }
            Op::Remount => unreachable!("done by the caller"),
        }
    }

    /// Walk the whole tree against the model; record inode numbers by model id.
    fn walk(
        &self,
        ino: Ino,
        want: &BTreeMap<Name, MNode>,
        at: &str,
        inos: &mut Inos,
    ) -> Result<(), String> {
        let got = self
            .list(ino)
            .map_err(|e| format!("readdir {at}/: errno {e}"))?;
        let names: Vec<(String, Kind)> = got.iter().map(|(n, k, _)| (n.clone(), *k)).collect();
        let wanted: Vec<(String, Kind)> = want
            .iter()
            .map(|(n, e)| (n.to_string(), e.kind()))
            .collect();
        ensure(names == wanted, || {
            format!("listing of {at}/: overlay {names:?}, model {wanted:?}")
        })?;
        for (name, kind, d_ino) in got {
            let m = &want[name.as_str()];
            let here = format!("{at}/{name}");
            let a = self
                .ov
                .lookup(ino, OsStr::new(&name))
                .map_err(|e| format!("lookup {here}: {e:?}"))?;
            ensure(a.kind == kind, || {
                format!("{here}: lookup shows {:?}, readdir {kind:?}", a.kind)
            })?;
            ensure(a.ino == d_ino, || {
                format!(
                    "{here}: readdir's d_ino {} is not lookup's st_ino {}",
                    d_ino.0, a.ino.0
                )
            })?;
            inos.see(m.id(), a.ino, &here)?;
            match m {
                MNode::File { data, .. } => {
                    ensure(a.size == data.len() as u64, || {
                        format!("{here}: size {}, model {}", a.size, data.len())
                    })?;
                    let got = self
                        .read_all(a.ino)
                        .map_err(|e| format!("read {here}: errno {e}"))?;
                    ensure(&got == data, || {
                        format!("{here}: contents {got:?}, model {data:?}")
                    })?;
                }
                MNode::Dir { children, .. } => self.walk(a.ino, children, &here, inos)?,
            }
        }
        Ok(())
    }
}

/// Inode numbers seen per model object: an object keeps its number while it lives.
#[derive(Default)]
struct Inos {
    by_id: HashMap<u64, Ino>,
}

impl Inos {
    fn see(&mut self, id: u64, ino: Ino, at: &str) -> Result<(), String> {
        let old = *self.by_id.entry(id).or_insert(ino);
        ensure(old == ino, || {
            format!("{at}: inode number changed from {} to {}", old.0, ino.0)
        })
    }
}

fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(msg()) }
}

/// The whole tree matches the model, each object with its own inode number.
fn full_check(drv: &Driver, model: &Model, inos: &mut Inos) -> Result<(), String> {
    let mut walk = Inos::default();
    drv.walk(ROOT_INO, &model.root, "", &mut walk)?;
    let mut seen: HashMap<Ino, u64> = HashMap::new();
    for (id, ino) in &walk.by_id {
        if let Some(other) = seen.insert(*ino, *id) {
            return Err(format!(
                "inode number {} shown for two objects (model ids {id} and {other})",
                ino.0
            ));
        }
        inos.see(*id, *ino, "walk")?;
    }
    Ok(())
}

fn scratch_base() -> PathBuf {
    if let Some(d) = std::env::var_os("RUSTFUSE_FUZZ_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn run(data: &[u8]) -> AResult<()> {
    let mut u = Unstructured::new(data);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let file_whiteouts = u.arbitrary::<bool>()?;
    let l1 = gen_layer(&mut u, 1, true, root)?;
    let l2 = gen_layer(&mut u, 1, false, root)?;
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS && !u.is_empty() {
        ops.push(gen_op(&mut u)?);
    }

    // Whiteouts the overlay writes: 0/0 devices where mknod works, or `.wh.` files.
    let s = Scratch {
        root: scratch_base().join(format!("rustfuse-fuzz-{}", std::process::id())),
        file_whiteouts,
    };
    let _ = fs::remove_dir_all(&s.root);
    for d in ["l1", "l2", "upper", "work"] {
        fs::create_dir_all(s.p(d)).unwrap();
    }
    write_layer(&s.p("l1"), &l1);
    write_layer(&s.p("l2"), &l2);
    let mut next_id = 0;
    let root_tree = merge(&[&l1, &l2], &mut next_id);
    let mut model = Model {
        root: root_tree,
        next_id,
    };
    let mut drv = Driver { ov: s.mount() };
    let mut inos = Inos::default();
    let mut log = format!(
        "layers (top first):\n  l1 {l1:?}\n  l2 {l2:?}\nfile whiteouts: {file_whiteouts}\n"
    );
    for (i, op) in ops.iter().enumerate() {
        if let Op::Remount = op {
            drop(drv);
            drv = Driver { ov: s.mount() };
            let _ = writeln!(log, "{i}: remount");
            check(&log, full_check(&drv, &model, &mut inos));
            continue;
        }
        let want = model.apply(op);
        let got = drv.apply(op);
        let _ = writeln!(log, "{i}: {op:?} -> {want:?}");
        let same = match (&want, &got) {
            (Ok(w), Ok(g)) => w.same(g),
            (Err(w), Err(g)) => w == g,
            _ => false,
        };
        if !same {
            panic!("{log}overlay: {got:?}\nmodel:   {want:?}");
        }
        if let (Ok(Out::Node(_, _, id)), Ok(Out::Node(_, _, ino))) = (&want, &got) {
            if *id != 0 {
                check(&log, inos.see(*id, Ino(*ino), &format!("{op:?}")));
            }
        }
    }
    let _ = writeln!(log, "end");
    check(&log, full_check(&drv, &model, &mut inos));
    drop(drv);
    let drv = Driver { ov: s.mount() };
    let _ = writeln!(log, "final remount");
    check(&log, full_check(&drv, &model, &mut inos));
    Ok(())
}

/// A failed check panics with the operations that led there.
fn check(log: &str, r: Result<(), String>) {
    if let Err(msg) = r {
        panic!("{log}{msg}");
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
