//! Mounting what a snapshotter's Mounts answers, as containerd's `mount.All` does: mount(2)
//! for `bind` and `overlay`, and the FUSE program (`rustfuse -o OPTIONS TARGET`, what
//! `mount.fuse3` would exec) for `fuse3.*`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustfuse_snapshotter::api::Mount;
use rustix::mount::{MountFlags, UnmountFlags};

const DEADLINE: Duration = Duration::from_secs(20);

fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(n) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(n);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

fn mount_points() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .collect()
}

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v
}

pub fn is_mountpoint(target: &Path) -> bool {
    mount_points().iter().any(|p| p == target)
}

/// Lazily unmount everything under `dir` (cleanup after errors).
pub fn unmount_all_under(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = rustix::mount::unmount(m.as_path(), UnmountFlags::DETACH);
    }
}

/// Split mount options into flags and the data string, as containerd's mount_linux does.
fn parse_options(options: &[String]) -> (MountFlags, bool, String) {
    let mut flags = MountFlags::empty();
    let mut bind = false;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MountFlags::RDONLY,
            "rw" | "defaults" => {}
            "bind" => bind = true,
            "rbind" => {
                bind = true;
                flags |= MountFlags::REC;
            }
            "nosuid" => flags |= MountFlags::NOSUID,
            "nodev" => flags |= MountFlags::NODEV,
            "noexec" => flags |= MountFlags::NOEXEC,
            "noatime" => flags |= MountFlags::NOATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            "sync" => flags |= MountFlags::SYNCHRONOUS,
            _ => data.push(o.as_str()),
        }
    }
    (flags, bind, data.join(","))
}

/// Mount the single mount of `mounts` at `target` (which must exist).
pub fn mount(mounts: &[Mount], target: &Path, fuse_program: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(mounts.len() == 1, "expected one mount, got {mounts:?}");
    let m = &mounts[0];
    let (flags, bind, data) = parse_options(&m.options);
    if m.r#type == "bind" || bind {
        if flags.contains(MountFlags::REC) {
            rustix::mount::mount_bind_recursive(m.source.as_str(), target)
        } else {
            rustix::mount::mount_bind(m.source.as_str(), target)
        }
        .with_context(|| format!("bind mount {m:?}"))?;
        if flags.contains(MountFlags::RDONLY) {
            rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
                .with_context(|| format!("remount ro {m:?}"))?;
        }
        return Ok(());
    }
    if m.r#type == "overlay" {
        if data.len() >= 4000 {
            // Beyond mount(2)'s page: one `lowerdir+` per layer through fsconfig.
            return mount_overlay_fsconfig(&m.options, target)
                .with_context(|| format!("overlay mount (fsconfig) {m:?}"));
        }
        let data = std::ffi::CString::new(data)?;
        return rustix::mount::mount(m.source.as_str(), target, "overlay", flags, data.as_c_str())
            .with_context(|| format!("overlay mount {m:?}"));
    }
    if m.r#type.starts_with("fuse3.") || m.r#type.starts_with("fuse.") {
        crate::proc::run(
            Command::new(fuse_program)
                .arg("-o")
                .arg(m.options.join(","))
                .arg(target),
            DEADLINE,
            target.parent().unwrap_or(Path::new("/tmp")),
        )?;
        let deadline = Instant::now() + DEADLINE;
        while !is_mountpoint(target) {
            if Instant::now() > deadline {
                bail!("{} not mounted in time ({m:?})", target.display());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        return Ok(());
    }
    bail!("unexpected mount type in {m:?}")
}

fn mount_overlay_fsconfig(options: &[String], target: &Path) -> std::io::Result<()> {
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for o in options {
        match o.split_once('=') {
            Some(("lowerdir", v)) => {
                for l in v.split(':') {
                    rustix::mount::fsconfig_set_string(&fs, "lowerdir+", l)?;
                }
            }
            Some((k, v)) => rustix::mount::fsconfig_set_string(&fs, k, v)?,
            None if o == "ro" || o == "rw" => {}
            None => rustix::mount::fsconfig_set_flag(&fs, o.as_str())?,
        }
    }
    rustix::mount::fsconfig_create(&fs)?;
    let attrs = if options.iter().any(|o| o == "ro") {
        MountAttrFlags::MOUNT_ATTR_RDONLY
    } else {
        MountAttrFlags::empty()
    };
    let m = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    rustix::mount::move_mount(
        &m,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

/// Unmount `target` (retrying while busy, lazily as a last resort).
pub fn unmount(target: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => {
                let _ = rustix::mount::unmount(target, UnmountFlags::DETACH);
                bail!("unmount {}: {e}", target.display());
            }
        }
    }
}
