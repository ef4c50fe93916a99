//! Filesystem operations applied to a mount root; the errno (or the observable result) of every
//! step is recorded so two filesystems can be compared step by step.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{
    AtFlags, CWD, FallocateFlags, FileType, Gid, Mode, RenameFlags, Timespec, Timestamps, Uid,
    XattrFlags,
};

/// Flags of a rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameKind {
    /// Plain rename(2).
    Plain,
    /// renameat2 RENAME_NOREPLACE.
    NoReplace,
    /// renameat2 RENAME_EXCHANGE.
    Exchange,
}

/// One operation; paths are relative to the mount root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// open(O_CREAT|O_EXCL|O_WRONLY, mode) and close.
    Create { path: String, mode: u32 },
    /// open(O_WRONLY|O_TRUNC|O_CREAT) and write `data`.
    WriteAll { path: String, data: Vec<u8> },
    /// pwrite `data` at `offset` (no O_TRUNC, no O_CREAT).
    WriteAt {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// open(O_APPEND) and write.
    Append { path: String, data: Vec<u8> },
    /// truncate(2).
    Truncate { path: String, len: u64 },
    /// Read the whole file (result: content).
    Read { path: String },
    /// mkdir(2).
    Mkdir { path: String, mode: u32 },
    /// mkfifo.
    Mkfifo { path: String, mode: u32 },
    /// mknod of a character device.
    MknodChar {
        path: String,
        major: u32,
        minor: u32,
    },
    /// mknod of a socket.
    MknodSock { path: String },
    /// symlink(2): `path` -> `target`.
    Symlink { target: String, path: String },
    /// readlink(2).
    Readlink { path: String },
    /// link(2): new name `to` for `from`.
    Link { from: String, to: String },
    /// unlink(2).
    Unlink { path: String },
    /// rmdir(2).
    Rmdir { path: String },
    /// rename/renameat2.
    Rename {
        from: String,
        to: String,
        kind: RenameKind,
    },
    /// chmod(2).
    Chmod { path: String, mode: u32 },
    /// lchown(2).
    Chown { path: String, uid: u32, gid: u32 },
    /// utimensat(AT_SYMLINK_NOFOLLOW) to fixed seconds.
    Utimens {
        path: String,
        atime: i64,
        mtime: i64,
    },
    /// lsetxattr(2).
    SetXattr {
        path: String,
        name: String,
        value: Vec<u8>,
    },
    /// lsetxattr(XATTR_CREATE).
    SetXattrCreate {
        path: String,
        name: String,
        value: Vec<u8>,
    },
    /// lremovexattr(2).
    RemoveXattr { path: String, name: String },
    /// lgetxattr(2) (result: value).
    GetXattr { path: String, name: String },
    /// llistxattr(2) (result: sorted names, `security.*` left out).
    ListXattr { path: String },
    /// fallocate(2) with flags.
    Fallocate {
        path: String,
        punch_hole: bool,
        keep_size: bool,
        offset: u64,
        len: u64,
    },
    /// Write then fsync (or fdatasync).
    WriteSync {
        path: String,
        data: Vec<u8>,
        datasync: bool,
    },
    /// copy_file_range from `src` to `dst` (created/truncated), whole file.
    CopyFileRange { src: String, dst: String },
    /// lseek SEEK_DATA / SEEK_HOLE from `offset` (result: offset).
    Seek {
        path: String,
        hole: bool,
        offset: u64,
    },
    /// Shared writable mmap of `path`, write `data` at `offset` (inside the file), msync, munmap.
    MmapWrite {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// Open for read+write, unlink, write `data` through the fd, read it back (result: content).
    OpenUnlinkRw { path: String, data: Vec<u8> },
    /// Open for read, rename it away and back... no: open, rename `path` to `to`, read the fd.
    OpenRenameRead { path: String, to: String },
    /// readdir (result: sorted names with d_type letters).
    Readdir { path: String },
    /// lstat (result: type, mode, size, nlink, uid, gid).
    Stat { path: String },
    /// statfs (result: block size and name length limit).
    Statfs { path: String },
    /// access(2) with W_OK (result: ok or errno).
    AccessWrite { path: String },
}

impl Op {
    /// The paths this op names.
    pub fn paths(&self) -> Vec<&str> {
        use Op::*;
        match self {
            Create { path, .. }
            | WriteAll { path, .. }
            | WriteAt { path, .. }
            | Append { path, .. }
            | Truncate { path, .. }
            | Read { path }
            | Mkdir { path, .. }
            | Mkfifo { path, .. }
            | MknodChar { path, .. }
            | MknodSock { path }
            | Symlink { path, .. }
            | Readlink { path }
            | Unlink { path }
            | Rmdir { path }
            | Chmod { path, .. }
            | Chown { path, .. }
            | Utimens { path, .. }
            | SetXattr { path, .. }
            | SetXattrCreate { path, .. }
            | RemoveXattr { path, .. }
            | GetXattr { path, .. }
            | ListXattr { path }
            | Fallocate { path, .. }
            | WriteSync { path, .. }
            | Seek { path, .. }
            | MmapWrite { path, .. }
            | OpenUnlinkRw { path, .. }
            | Readdir { path }
            | Stat { path }
            | Statfs { path }
            | AccessWrite { path } => vec![path],
            Link { from, to }
            | Rename { from, to, .. }
            | CopyFileRange { src: from, dst: to }
            | OpenRenameRead { path: from, to } => vec![from, to],
        }
    }
}

/// The result of one op: `Ok(observable result)` or `Err(errno name)`.
pub type Outcome = Result<String, String>;

/// Name of an errno value (`ENOENT`), or `errno N`.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        1 => "EPERM",
        2 => "ENOENT",
        5 => "EIO",
        9 => "EBADF",
        13 => "EACCES",
        16 => "EBUSY",
        17 => "EEXIST",
        18 => "EXDEV",
        19 => "ENODEV",
        20 => "ENOTDIR",
        21 => "EISDIR",
        22 => "EINVAL",
        26 => "ETXTBSY",
        27 => "EFBIG",
        28 => "ENOSPC",
        30 => "EROFS",
        31 => "EMLINK",
        34 => "ERANGE",
        36 => "ENAMETOOLONG",
        38 => "ENOSYS",
        39 => "ENOTEMPTY",
        40 => "ELOOP",
        61 => "ENODATA",
        75 => "EOVERFLOW",
        95 => "EOPNOTSUPP",
        107 => "ENOTCONN",
        116 => "ESTALE",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

fn io_err(e: std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_name(n),
        None => format!("error: {e}"),
    }
}

fn rx_err(e: rustix::io::Errno) -> String {
    errno_name(e.raw_os_error())
}

fn kind_letter(ft: std::fs::FileType) -> char {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        'f'
    }
}

fn ts(secs: i64) -> Timespec {
    Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    }
}

/// Applies one op under `root`.
pub fn apply(root: &Path, op: &Op) -> Outcome {
    let p = |s: &str| root.join(s);
    let ok = |()| String::new();
    match op {
        Op::Create { path, mode } => OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(*mode)
            .open(p(path))
            .map(|_| String::new())
            .map_err(io_err),
        Op::WriteAll { path, data } => std::fs::write(p(path), data)
            .map(|_| String::new())
            .map_err(io_err),
        Op::WriteAt { path, offset, data } => {
            let mut f = OpenOptions::new()
                .write(true)
                .open(p(path))
                .map_err(io_err)?;
            f.seek(SeekFrom::Start(*offset)).map_err(io_err)?;
            f.write_all(data).map_err(io_err)?;
            Ok(String::new())
        }
        Op::Append { path, data } => {
            let mut f = OpenOptions::new()
                .append(true)
                .open(p(path))
                .map_err(io_err)?;
            f.write_all(data).map_err(io_err)?;
            Ok(String::new())
        }
        Op::Truncate { path, len } => {
            rustix::fs::open(p(path), rustix::fs::OFlags::WRONLY, Mode::empty())
                .and_then(|fd| rustix::fs::ftruncate(fd, *len))
                .map(|_| String::new())
                .map_err(rx_err)
        }
        Op::Read { path } => std::fs::read(p(path))
            .map(|c| crate::snapshot::show_bytes(&c))
            .map_err(io_err),
        Op::Mkdir { path, mode } => rustix::fs::mkdirat(CWD, p(path), Mode::from(*mode))
            .map(ok)
            .map_err(rx_err),
        Op::Mkfifo { path, mode } => {
            rustix::fs::mknodat(CWD, p(path), FileType::Fifo, Mode::from(*mode), 0)
                .map(ok)
                .map_err(rx_err)
        }
        Op::MknodChar { path, major, minor } => rustix::fs::mknodat(
            CWD,
            p(path),
            FileType::CharacterDevice,
            Mode::from(0o644),
            rustix::fs::makedev(*major, *minor),
        )
        .map(ok)
        .map_err(rx_err),
        Op::MknodSock { path } => {
            rustix::fs::mknodat(CWD, p(path), FileType::Socket, Mode::from(0o644), 0)
                .map(ok)
                .map_err(rx_err)
        }
        Op::Symlink { target, path } => rustix::fs::symlinkat(target.as_str(), CWD, p(path))
            .map(ok)
            .map_err(rx_err),
        Op::Readlink { path } => std::fs::read_link(p(path))
            .map(|t| t.display().to_string())
            .map_err(io_err),
        Op::Link { from, to } => rustix::fs::linkat(CWD, p(from), CWD, p(to), AtFlags::empty())
            .map(ok)
            .map_err(rx_err),
        Op::Unlink { path } => rustix::fs::unlinkat(CWD, p(path), AtFlags::empty())
            .map(ok)
            .map_err(rx_err),
        Op::Rmdir { path } => rustix::fs::unlinkat(CWD, p(path), AtFlags::REMOVEDIR)
            .map(ok)
            .map_err(rx_err),
        Op::Rename { from, to, kind } => {
            let flags = match kind {
                RenameKind::Plain => RenameFlags::empty(),
                RenameKind::NoReplace => RenameFlags::NOREPLACE,
                RenameKind::Exchange => RenameFlags::EXCHANGE,
            };
            rustix::fs::renameat_with(CWD, p(from), CWD, p(to), flags)
                .map(ok)
                .map_err(rx_err)
        }
        Op::Chmod { path, mode } => {
            rustix::fs::chmodat(CWD, p(path), Mode::from(*mode), AtFlags::empty())
                .map(ok)
                .map_err(rx_err)
        }
        Op::Chown { path, uid, gid } => rustix::fs::chownat(
            CWD,
            p(path),
            Some(Uid::from_raw(*uid)),
            Some(Gid::from_raw(*gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map(ok)
        .map_err(rx_err),
        Op::Utimens { path, atime, mtime } => rustix::fs::utimensat(
            CWD,
            p(path),
            &Timestamps {
                last_access: ts(*atime),
                last_modification: ts(*mtime),
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map(ok)
        .map_err(rx_err),
        Op::SetXattr { path, name, value } => {
            rustix::fs::lsetxattr(p(path), name.as_str(), value, XattrFlags::empty())
                .map(ok)
                .map_err(rx_err)
        }
        Op::SetXattrCreate { path, name, value } => {
            rustix::fs::lsetxattr(p(path), name.as_str(), value, XattrFlags::CREATE)
                .map(ok)
                .map_err(rx_err)
        }
        Op::RemoveXattr { path, name } => rustix::fs::lremovexattr(p(path), name.as_str())
            .map(ok)
            .map_err(rx_err),
        Op::GetXattr { path, name } => {
            let mut buf = vec![0u8; 65536];
            rustix::fs::lgetxattr(p(path), name.as_str(), &mut buf[..])
                .map(|n| crate::snapshot::show_bytes(&buf[..n]))
                .map_err(rx_err)
        }
        Op::ListXattr { path } => {
            let mut buf = vec![0u8; 65536];
            let n = rustix::fs::llistxattr(p(path), &mut buf[..]).map_err(rx_err)?;
            let mut names: Vec<String> = buf[..n]
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .filter(|s| !s.starts_with("security."))
                .collect();
            names.sort();
            Ok(names.join(","))
        }
        Op::Fallocate {
            path,
            punch_hole,
            keep_size,
            offset,
            len,
        } => {
            let f = OpenOptions::new()
                .write(true)
                .open(p(path))
                .map_err(io_err)?;
            let mut flags = FallocateFlags::empty();
            if *punch_hole {
                flags |= FallocateFlags::PUNCH_HOLE;
            }
            if *keep_size {
                flags |= FallocateFlags::KEEP_SIZE;
            }
            rustix::fs::fallocate(&f, flags, *offset, *len)
                .map(ok)
                .map_err(rx_err)
        }
        Op::WriteSync {
            path,
            data,
            datasync,
        } => {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p(path))
                .map_err(io_err)?;
            f.write_all(data).map_err(io_err)?;
            if *datasync {
                f.sync_data().map_err(io_err)?;
            } else {
                f.sync_all().map_err(io_err)?;
            }
            Ok(String::new())
        }
        Op::CopyFileRange { src, dst } => {
            let s = File::open(p(src)).map_err(io_err)?;
            let d = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p(dst))
                .map_err(io_err)?;
            let len = s.metadata().map_err(io_err)?.len();
            let mut done = 0u64;
            while done < len {
                let n = rustix::fs::copy_file_range(&s, None, &d, None, (len - done) as usize)
                    .map_err(rx_err)?;
                if n == 0 {
                    break;
                }
                done += n as u64;
            }
            Ok(format!("copied {done}"))
        }
        Op::Seek { path, hole, offset } => {
            let f = File::open(p(path)).map_err(io_err)?;
            let pos = if *hole {
                rustix::fs::SeekFrom::Hole(*offset)
            } else {
                rustix::fs::SeekFrom::Data(*offset)
            };
            rustix::fs::seek(&f, pos)
                .map(|o| o.to_string())
                .map_err(rx_err)
        }
        Op::MmapWrite { path, offset, data } => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(p(path))
                .map_err(io_err)?;
            let len = f.metadata().map_err(io_err)?.len() as usize;
            let start = *offset as usize;
            if start + data.len() > len {
                return Err("test bug: mmap write past end of file".into());
            }
            // SAFETY: the file is private to the test's scratch directory and nothing else
            // truncates it while it is mapped; the mapping is only accessed as bytes below.
            let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.map_err(io_err)?;
            map[start..start + data.len()].copy_from_slice(data);
            map.flush().map_err(io_err)?;
            drop(map);
            Ok(String::new())
        }
        Op::OpenUnlinkRw { path, data } => {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(p(path))
                .map_err(io_err)?;
            std::fs::remove_file(p(path)).map_err(io_err)?;
            f.seek(SeekFrom::End(0)).map_err(io_err)?;
            f.write_all(data).map_err(io_err)?;
            f.seek(SeekFrom::Start(0)).map_err(io_err)?;
            let mut c = Vec::new();
            f.read_to_end(&mut c).map_err(io_err)?;
            let nlink = f.metadata().map_err(io_err)?.nlink();
            Ok(format!("{} nlink={nlink}", crate::snapshot::show_bytes(&c)))
        }
        Op::OpenRenameRead { path, to } => {
            let mut f = File::open(p(path)).map_err(io_err)?;
            std::fs::rename(p(path), p(to)).map_err(io_err)?;
            let mut c = Vec::new();
            f.read_to_end(&mut c).map_err(io_err)?;
            Ok(crate::snapshot::show_bytes(&c))
        }
        Op::Readdir { path } => {
            let mut names = Vec::new();
            for e in std::fs::read_dir(p(path)).map_err(io_err)? {
                let e = e.map_err(io_err)?;
                let k = e.file_type().map(kind_letter).unwrap_or('?');
                names.push(format!("{}:{k}", e.file_name().to_string_lossy()));
            }
            names.sort();
            Ok(names.join(" "))
        }
        Op::Stat { path } => {
            let md = std::fs::symlink_metadata(p(path)).map_err(io_err)?;
            let size = if md.is_dir() {
                "-".to_string()
            } else {
                md.size().to_string()
            };
            let nlink = if md.is_dir() {
                "-".to_string()
            } else {
                md.nlink().to_string()
            };
            Ok(format!(
                "{} {:o} size={size} nlink={nlink} {}:{}",
                kind_letter(md.file_type()),
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            ))
        }
        Op::Statfs { path } => {
            let s = rustix::fs::statfs(p(path)).map_err(rx_err)?;
            Ok(format!("bsize={} namelen={}", s.f_bsize, s.f_namelen))
        }
        Op::AccessWrite { path } => {
            rustix::fs::accessat(CWD, p(path), rustix::fs::Access::WRITE_OK, AtFlags::empty())
                .map(ok)
                .map_err(rx_err)
        }
    }
}

/// Shows an outcome as `ok`, `ok: result` or the errno name.
pub fn show(o: &Outcome) -> String {
    match o {
        Ok(s) if s.is_empty() => "ok".into(),
        Ok(s) => format!("ok: {s}"),
        Err(e) => e.clone(),
    }
}

/// Applies `ops` in order under `root` (each with a deadline), returning every outcome.
pub fn run(root: &Path, ops: &[Op]) -> Vec<Outcome> {
    ops.iter()
        .map(|op| {
            let root = root.to_path_buf();
            let op2 = op.clone();
            crate::mount::timed(&format!("{op:?}"), move || apply(&root, &op2))
        })
        .collect()
}

/// Runs `(op, expected outcome)` pairs under `root` (expected as [`show`] prints an outcome:
/// `ok`, `ok: result`, `ENOENT`) and returns one line per mismatch, prefixed with `stage`.
pub fn mismatches(root: &Path, stage: &str, cases: &[(Op, &str)]) -> Vec<String> {
    let ops: Vec<Op> = cases.iter().map(|(op, _)| op.clone()).collect();
    cases
        .iter()
        .zip(run(root, &ops))
        .filter(|((_, want), got)| show(got) != *want)
        .map(|((op, want), got)| format!("{stage}: {op:?}: got {}, want {want}", show(&got)))
        .collect()
}

/// Convenience constructors so scenarios read well.
pub mod build {
    use super::{Op, RenameKind};

    fn s(x: &str) -> String {
        x.to_string()
    }
    /// See [`Op::Create`].
    pub fn create(p: &str) -> Op {
        Op::Create {
            path: s(p),
            mode: 0o644,
        }
    }
    /// See [`Op::WriteAll`].
    pub fn write(p: &str, d: &str) -> Op {
        Op::WriteAll {
            path: s(p),
            data: d.as_bytes().to_vec(),
        }
    }
    /// See [`Op::WriteAt`].
    pub fn write_at(p: &str, offset: u64, d: &str) -> Op {
        Op::WriteAt {
            path: s(p),
            offset,
            data: d.as_bytes().to_vec(),
        }
    }
    /// See [`Op::Append`].
    pub fn append(p: &str, d: &str) -> Op {
        Op::Append {
            path: s(p),
            data: d.as_bytes().to_vec(),
        }
    }
    /// See [`Op::Truncate`].
    pub fn truncate(p: &str, len: u64) -> Op {
        Op::Truncate { path: s(p), len }
    }
    /// See [`Op::Read`].
    pub fn read(p: &str) -> Op {
        Op::Read { path: s(p) }
    }
    /// See [`Op::Mkdir`].
    pub fn mkdir(p: &str) -> Op {
        Op::Mkdir {
            path: s(p),
            mode: 0o755,
        }
    }
    /// See [`Op::Mkfifo`].
    pub fn mkfifo(p: &str) -> Op {
        Op::Mkfifo {
            path: s(p),
            mode: 0o640,
        }
    }
    /// See [`Op::Symlink`].
    pub fn symlink(target: &str, p: &str) -> Op {
        Op::Symlink {
            target: s(target),
            path: s(p),
        }
    }
    /// See [`Op::Readlink`].
    pub fn readlink(p: &str) -> Op {
        Op::Readlink { path: s(p) }
    }
    /// See [`Op::Link`].
    pub fn link(from: &str, to: &str) -> Op {
        Op::Link {
            from: s(from),
            to: s(to),
        }
    }
    /// See [`Op::Unlink`].
    pub fn unlink(p: &str) -> Op {
        Op::Unlink { path: s(p) }
    }
    /// See [`Op::Rmdir`].
    pub fn rmdir(p: &str) -> Op {
        Op::Rmdir { path: s(p) }
    }
    /// Plain rename.
    pub fn rename(from: &str, to: &str) -> Op {
        Op::Rename {
            from: s(from),
            to: s(to),
            kind: RenameKind::Plain,
        }
    }
    /// RENAME_NOREPLACE.
    pub fn rename_noreplace(from: &str, to: &str) -> Op {
        Op::Rename {
            from: s(from),
            to: s(to),
            kind: RenameKind::NoReplace,
        }
    }
    /// RENAME_EXCHANGE.
    pub fn rename_exchange(from: &str, to: &str) -> Op {
        Op::Rename {
            from: s(from),
            to: s(to),
            kind: RenameKind::Exchange,
        }
    }
    /// See [`Op::Chmod`].
    pub fn chmod(p: &str, mode: u32) -> Op {
        Op::Chmod { path: s(p), mode }
    }
    /// See [`Op::Chown`].
    pub fn chown(p: &str, uid: u32, gid: u32) -> Op {
        Op::Chown {
            path: s(p),
            uid,
            gid,
        }
    }
    /// See [`Op::Utimens`].
    pub fn utimens(p: &str, atime: i64, mtime: i64) -> Op {
        Op::Utimens {
            path: s(p),
            atime,
            mtime,
        }
    }
    /// See [`Op::SetXattr`].
    pub fn setxattr(p: &str, name: &str, v: &str) -> Op {
        Op::SetXattr {
            path: s(p),
            name: s(name),
            value: v.as_bytes().to_vec(),
        }
    }
    /// See [`Op::RemoveXattr`].
    pub fn removexattr(p: &str, name: &str) -> Op {
        Op::RemoveXattr {
            path: s(p),
            name: s(name),
        }
    }
    /// See [`Op::GetXattr`].
    pub fn getxattr(p: &str, name: &str) -> Op {
        Op::GetXattr {
            path: s(p),
            name: s(name),
        }
    }
    /// See [`Op::ListXattr`].
    pub fn listxattr(p: &str) -> Op {
        Op::ListXattr { path: s(p) }
    }
    /// See [`Op::Readdir`].
    pub fn readdir(p: &str) -> Op {
        Op::Readdir { path: s(p) }
    }
    /// See [`Op::Stat`].
    pub fn stat(p: &str) -> Op {
        Op::Stat { path: s(p) }
    }
}
