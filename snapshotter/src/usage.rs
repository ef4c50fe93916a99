//! Disk usage as containerd computes it: sum of `st_blocks * 512` over a tree, each inode
//! (by device and inode number) counted once, so hard links count once. The same walk counts
//! the directories that carry a redirect (see [`crate::redirects`]).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
    /// Directories carrying a redirect xattr (one listxattr per directory).
    pub redirect_dirs: i64,
}

/// Usage of the tree at `root` (root included), and its redirected directories. Symlinks are
/// not followed.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = match std::fs::symlink_metadata(&path) {
            Ok(md) => md,
            // Raced with a removal: containerd's walk skips those too.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path != root => continue,
            Err(e) => return Err(Error::io("stat", &path, e)),
        };
        if seen.insert((md.dev(), md.ino())) {
            usage.inodes += 1;
            usage.size += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            if crate::redirects::is_redirected(&path) {
                usage.redirect_dirs += 1;
            }
            let rd = std::fs::read_dir(&path).map_err(|e| Error::io("read directory", &path, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io("read directory", &path, e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_count_once() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, vec![1u8; 10000]).unwrap();
        let before = disk_usage(d.path()).unwrap();
        assert_eq!(before.inodes, 2);
        std::fs::hard_link(&f, d.path().join("g")).unwrap();
        let after = disk_usage(d.path()).unwrap();
        assert_eq!(after.inodes, 2);
        // The directory itself may grow a block; the file's blocks are not counted twice.
        assert!(after.size - before.size < 10000, "{before:?} {after:?}");
        std::os::unix::fs::symlink("f", d.path().join("l")).unwrap();
        assert_eq!(disk_usage(d.path()).unwrap().inodes, 3);
        assert_eq!(disk_usage(d.path()).unwrap().redirect_dirs, 0);
    }

    #[test]
    fn counts_redirected_directories() {
        let d = tempfile::tempdir().unwrap();
        for sub in ["a", "a/b", "c"] {
            std::fs::create_dir(d.path().join(sub)).unwrap();
        }
        for sub in ["a/b", "c"] {
            if let Err(e) = rustix::fs::setxattr(
                d.path().join(sub),
                "user.overlay.redirect",
                b"/x",
                rustix::fs::XattrFlags::empty(),
            ) {
                println!("SKIPPED: user xattrs cannot be set here: {e}");
                return;
            }
        }
        assert_eq!(disk_usage(d.path()).unwrap().redirect_dirs, 2);
    }
}
