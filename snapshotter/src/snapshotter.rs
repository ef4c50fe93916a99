//! The semantics of the snapshots API: synchronous, over the metadata store and the
//! snapshot directories. The gRPC layer ([`crate::service`]) only translates.
//!
//! Layout of the root (0700): `metadata.redb`, and `snapshots/` (0700) holding one
//! directory per snapshot named by its numeric id, with `fs/` (0755; the upper directory,
//! or the layer once committed) and `work/` (0711, Active only). A snapshot is built under
//! `snapshots/new-*` and renamed into place inside the store transaction that records it;
//! a removed one is renamed to `snapshots/rm-<id>` and deleted. Anything left over after a
//! crash is unreferenced and goes at the next Cleanup.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::api::Mount;
use crate::error::{Error, Result};
use crate::filter::{self, Adaptor};
use crate::info::{Info, Kind};
use crate::labels;
use crate::mounts::{self, MountMode};
use crate::store::{NewSnapshot, Store};
use crate::usage::{Usage, disk_usage};

/// The snapshotter over one root directory; every method is synchronous and safe to call
/// from many threads at once.
pub struct Snapshotter {
    root: PathBuf,
    snapshots: PathBuf,
    store: Store,
    mode: MountMode,
    /// Creating snapshots holds it shared; Cleanup holds it exclusive, so it never deletes
    /// a directory that is being built.
    dirs: RwLock<()>,
    tmp_counter: AtomicU64,
}

fn mkdir_mode(path: &Path, mode: u32) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => return Err(Error::io("create directory", path, e)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("chmod", path, e))
}

/// Drop labels with empty values, as containerd's stores do.
fn normalize(mut labels: HashMap<String, String>) -> HashMap<String, String> {
    labels.retain(|_, v| !v.is_empty());
    labels
}

/// The containerd filter fields of a snapshot.
struct InfoAdaptor<'a>(&'a Info);

impl Adaptor for InfoAdaptor<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        let info = self.0;
        match path.first()?.as_str() {
            "kind" => Some(info.kind.as_str().to_string()),
            "name" => Some(info.name.clone()),
            "parent" => Some(info.parent.clone()),
            "labels" => {
                if info.labels.is_empty() {
                    return None;
                }
                info.labels.get(&path[1..].join(".")).cloned()
            }
            _ => None,
        }
    }
}

impl Snapshotter {
    /// Open the snapshotter rooted at `root`, creating it if needed.
    pub fn open(root: &Path, mode: MountMode) -> Result<Snapshotter> {
        Snapshotter::open_with(root, |_, _| Ok(mode))
    }

    /// Open the snapshotter rooted at `root`, creating it if needed, with the mode `choose`
    /// picks given its store and its `snapshots/` directory (what the layers hold decides
    /// whether kernel overlayfs can mount them: see [`crate::redirects::holders`]).
    pub fn open_with(
        root: &Path,
        choose: impl FnOnce(&Store, &Path) -> Result<MountMode>,
    ) -> Result<Snapshotter> {
        std::fs::create_dir_all(root).map_err(|e| Error::io("create directory", root, e))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod", root, e))?;
        let snapshots = root.join("snapshots");
        mkdir_mode(&snapshots, 0o700)?;
        let store = Store::open(&root.join("metadata.redb"))?;
        let mode = choose(&store, &snapshots)?;
        Ok(Snapshotter {
            root: root.to_path_buf(),
            snapshots,
            store,
            mode,
            dirs: RwLock::new(()),
            tmp_counter: AtomicU64::new(0),
        })
    }

    /// The root directory it was opened on.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How it mounts snapshots with parents (chosen at start, never changes).
    pub fn mode(&self) -> &MountMode {
        &self.mode
    }

    /// Its metadata store, to read (tests); writes go through the methods here.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        mounts::snapshot_dir(&self.snapshots, id).join("fs")
    }

    /// Create Active snapshot `key` on Committed `parent` (empty: none) and return its
    /// read-write mounts; nothing is left behind on failure.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Create View snapshot `key` on Committed `parent` (empty: none) and return its
    /// read-only mounts; nothing is left behind on failure.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        labels::validate(key, &labels)?;
        let _shared = self.dirs.read().unwrap_or_else(|e| e.into_inner());
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .snapshots
            .join(format!("new-{}-{n}", std::process::id()));
        let built = (|| {
            mkdir_mode(&tmp, 0o700)?;
            mkdir_mode(&tmp.join("fs"), 0o755)?;
            if kind == Kind::Active {
                mkdir_mode(&tmp.join("work"), 0o711)?;
            }
            Ok(())
        })();
        let result = built.and_then(|()| {
            self.store.create(
                NewSnapshot {
                    key,
                    parent,
                    kind,
                    labels: normalize(labels),
                    fuse_upper: matches!(self.mode, MountMode::Fuse { .. }),
                },
                |rec| {
                    if let Some(pid) = rec.parent_ids.first() {
                        let pfs = self.fs_dir(*pid);
                        let md = std::fs::metadata(&pfs).map_err(|e| Error::io("stat", &pfs, e))?;
                        let fs = tmp.join("fs");
                        std::os::unix::fs::chown(&fs, Some(md.uid()), Some(md.gid()))
                            .map_err(|e| Error::io("chown", &fs, e))?;
                    }
                    let dst = mounts::snapshot_dir(&self.snapshots, rec.id);
                    // A directory already there was renamed into place by a create that
                    // died before its transaction committed: no record has this id (it is
                    // allocated in this write transaction), so it is an orphan.
                    if dst.exists() {
                        tracing::warn!(dir = %dst.display(), "removing an orphaned snapshot directory left by a crash");
                        std::fs::remove_dir_all(&dst)
                            .map_err(|e| Error::io("remove orphaned directory", &dst, e))?;
                    }
                    std::fs::rename(&tmp, &dst).map_err(|e| Error::io("rename into place", &dst, e))
                },
            )
        });
        match result {
            Ok(rec) => Ok(mounts::mounts(&self.mode, &self.snapshots, kind, &rec)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// The mounts of Active or View snapshot `key`, the same as Prepare or View gave.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let rec = self.store.must_get(key)?;
        let kind = rec.kind(key)?;
        if kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: it has no mounts"
            )));
        }
        Ok(mounts::mounts(&self.mode, &self.snapshots, kind, &rec))
    }

    /// Turn Active `key` into Committed `name` (same parent and directory, `labels`
    /// replacing its labels, its disk usage and redirected directories recorded); `key` is
    /// gone afterwards.
    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "committing {key:?}: name must not be empty"
            )));
        }
        labels::validate(name, &labels)?;
        let rec = self.store.must_get(key)?;
        let kind = rec.kind(key)?;
        if kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is {}, only an active snapshot can be committed",
                kind.as_str()
            )));
        }
        if self.store.get(name)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name:?} already exists (committing {key:?})"
            )));
        }
        let usage = disk_usage(&self.fs_dir(rec.id))?;
        if usage.redirect_dirs > 0 {
            tracing::debug!(
                key,
                name,
                redirect_dirs = usage.redirect_dirs,
                "committed layer holds directory redirects"
            );
        }
        self.store
            .commit(name, key, normalize(labels), usage, rec.id)?;
        Ok(())
    }

    /// Remove `key` unless it has children; the key is free at once, its directory goes now
    /// or at the next Cleanup.
    pub fn remove(&self, key: &str) -> Result<()> {
        let rec = self.store.remove(key)?;
        let dir = mounts::snapshot_dir(&self.snapshots, rec.id);
        let doomed = self.snapshots.join(format!("rm-{}", rec.id));
        // The key is free now; the directory goes now if it can, else at Cleanup.
        let gone = std::fs::rename(&dir, &doomed).and_then(|()| std::fs::remove_dir_all(&doomed));
        if let Err(e) = gone {
            tracing::warn!(key, id = rec.id, error = %e, "removing snapshot directory failed; Cleanup will retry");
        }
        Ok(())
    }

    /// The Info of snapshot `key`, of any kind.
    pub fn stat(&self, key: &str) -> Result<Info> {
        self.store.must_get(key)?.into_info(key)
    }

    /// Update the labels of `new.name` following the field paths (see module docs of the
    /// API notes): none → replace all; `labels` → replace all; `labels.K` → set or delete K.
    /// Only `new.name` and `new.labels` are read: the other fields are immutable, and
    /// containerd sends them unset (its kind then reads Committed, whatever the snapshot is).
    pub fn update(&self, new: &Info, paths: &[String]) -> Result<Info> {
        let key = new.name.as_str();
        for p in paths {
            if p != "labels" && !p.starts_with("labels.") {
                return Err(Error::InvalidArgument(format!(
                    "cannot update {p:?} field on snapshot {key:?}: only labels are mutable"
                )));
            }
        }
        let rec = self.store.update_labels(key, |old| {
            // A record the store cannot read is refused before anything is written.
            let mut labels = old.clone().into_info(key)?.labels;
            if paths.is_empty() {
                labels = new.labels.clone();
            }
            for p in paths {
                if p == "labels" {
                    labels = new.labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match new.labels.get(k) {
                        Some(v) => labels.insert(k.to_string(), v.clone()),
                        None => labels.remove(k),
                    };
                }
            }
            let labels = normalize(labels);
            labels::validate(key, &labels)?;
            Ok(labels)
        })?;
        rec.into_info(key)
    }

    /// The Info of every snapshot matching any of `filters` (containerd filter syntax; none:
    /// all), in key order. A record the store cannot read fails the whole list, naming it.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let f = filter::parse_all(filters).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut out = Vec::new();
        for (name, rec) in self.store.list()? {
            let info = rec.into_info(&name)?;
            if f.matches(&InfoAdaptor(&info)) {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Disk usage of `key`: measured now for an Active snapshot, as recorded at commit for a
    /// Committed one (zero for a View).
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.store.must_get(key)?;
        if rec.kind(key)? == Kind::Active {
            disk_usage(&self.fs_dir(rec.id))
        } else {
            Ok(Usage {
                size: rec.size,
                inodes: rec.inodes,
                redirect_dirs: rec.redirect_dirs,
            })
        }
    }

    /// Delete every directory under `snapshots/` that no snapshot references. Returns how
    /// many were removed.
    pub fn cleanup(&self) -> Result<usize> {
        let _exclusive = self.dirs.write().unwrap_or_else(|e| e.into_inner());
        let ids = self.store.ids()?;
        let rd = std::fs::read_dir(&self.snapshots)
            .map_err(|e| Error::io("read directory", &self.snapshots, e))?;
        let mut doomed = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("read directory", &self.snapshots, e))?;
            let name = entry.file_name();
            let referenced = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !referenced {
                doomed.push(entry.path());
            }
        }
        let total = doomed.len();
        let mut removed = 0;
        for (i, path) in doomed.into_iter().enumerate() {
            let r = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match r {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cleanup could not remove")
                }
            }
            if (i + 1) % 100 == 0 {
                tracing::info!(done = i + 1, total, "cleanup progress");
            }
        }
        if total > 0 {
            tracing::info!(
                removed,
                total,
                "cleanup removed unreferenced snapshot directories"
            );
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> (tempfile::TempDir, Snapshotter) {
        let d = tempfile::tempdir().unwrap();
        let s = Snapshotter::open(
            &d.path().join("root"),
            MountMode::Overlay {
                index_off: false,
                userxattr: false,
                redirect_follow: false,
            },
        )
        .unwrap();
        (d, s)
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layout_and_permissions() {
        let (_d, s) = snap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(s.root()), 0o700);
        assert_eq!(mode(&s.root().join("snapshots")), 0o700);
        s.prepare("a b/c", "", HashMap::new()).unwrap();
        assert_eq!(mode(&s.root().join("snapshots/1/fs")), 0o755);
        assert_eq!(mode(&s.root().join("snapshots/1/work")), 0o711);
        s.view("v", "", HashMap::new()).unwrap();
        assert!(!s.root().join("snapshots/2/work").exists());
    }

    #[test]
    fn update_paths() {
        let (_d, s) = snap();
        s.prepare("a", "", labels(&[("l1", "v1"), ("l2", "v2")]))
            .unwrap();
        let mut i = s.stat("a").unwrap();
        i.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let out = s
            .update(&i, &["labels.l1".into(), "labels.l2".into()])
            .unwrap();
        assert_eq!(out.labels, labels(&[("l1", "updated")]));
        let out = s.update(&i, &["labels".into()]).unwrap();
        assert_eq!(out.labels, i.labels);
        let out = s.update(&i, &[]).unwrap();
        assert_eq!(out.labels, i.labels);
        assert!(matches!(
            s.update(&i, &["parent".into()]),
            Err(Error::InvalidArgument(_))
        ));
        let big = "x".repeat(5000);
        i.labels = labels(&[("k", &big)]);
        assert!(matches!(s.update(&i, &[]), Err(Error::InvalidArgument(_))));
        assert_eq!(
            s.stat("a").unwrap().labels,
            labels(&[("l4", "v4"), ("l1", "updated")])
        );
    }

    /// A stored record whose kind is no kind (store corruption) fails every call that needs
    /// the kind with an error naming its key, which the one status map answers as Unknown;
    /// nothing reads it as Active. Remove, which needs no kind, still clears it.
    #[test]
    fn unknown_kind_is_an_error_naming_the_key() {
        let (_d, s) = snap();
        s.prepare("good", "", labels(&[("l", "v")])).unwrap();
        let key = "ns/1/extract-7 sha256:abc";
        let rec = crate::store::Record {
            id: 99,
            kind: 42,
            labels: labels(&[("l", "v")]),
            ..Default::default()
        };
        crate::store::put_raw(s.store(), key, &rec).unwrap();
        let names_key = |what: &str, e: Error| {
            assert!(matches!(e, Error::Corrupt(_)), "{what}: {e:?}");
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::Unknown, "{what}");
            assert!(status.message().contains(key), "{what}: {status:?}");
            assert!(
                status.message().contains("unknown snapshot kind 42"),
                "{what}: {status:?}"
            );
        };
        names_key("stat", s.stat(key).unwrap_err());
        names_key("list", s.list(&[]).unwrap_err());
        names_key(
            "list kind==active",
            s.list(&["kind==active".into()]).unwrap_err(),
        );
        names_key("mounts", s.mounts(key).unwrap_err());
        names_key("usage", s.usage(key).unwrap_err());
        names_key("commit", s.commit("n", key, HashMap::new()).unwrap_err());
        names_key(
            "prepare on it",
            s.prepare("child", key, HashMap::new()).unwrap_err(),
        );
        let mut new = s.stat("good").unwrap();
        new.name = key.into();
        new.labels = labels(&[("l", "changed")]);
        names_key("update", s.update(&new, &[]).unwrap_err());
        assert_eq!(
            s.store().must_get(key).unwrap(),
            rec,
            "update wrote nothing"
        );
        s.remove(key).unwrap();
        assert_eq!(s.list(&[]).unwrap().len(), 1);
    }

    #[test]
    fn cleanup_removes_unreferenced() {
        let (_d, s) = snap();
        s.prepare("a", "", HashMap::new()).unwrap();
        s.prepare("b", "", HashMap::new()).unwrap();
        std::fs::create_dir_all(s.root().join("snapshots/new-stale/fs")).unwrap();
        std::fs::create_dir_all(s.root().join("snapshots/99/fs")).unwrap();
        assert_eq!(s.cleanup().unwrap(), 2);
        assert!(s.root().join("snapshots/1").exists());
        assert!(s.root().join("snapshots/2").exists());
        s.remove("b").unwrap();
        assert!(!s.root().join("snapshots/2").exists());
    }

    #[test]
    fn create_replaces_a_directory_orphaned_under_its_new_id() {
        let (_d, s) = snap();
        s.prepare("a", "", HashMap::new()).unwrap();
        // What a kill between the rename into place and the commit leaves: the next id's
        // directory exists though no record has that id.
        std::fs::create_dir_all(s.root().join("snapshots/2/fs/stale")).unwrap();
        s.prepare("b", "", HashMap::new()).unwrap();
        assert!(s.root().join("snapshots/2/fs").is_dir());
        assert!(!s.root().join("snapshots/2/fs/stale").exists());
    }

    #[test]
    fn failed_prepare_changes_nothing_on_disk() {
        let (_d, s) = snap();
        s.prepare("a", "", HashMap::new()).unwrap();
        let before: Vec<_> = std::fs::read_dir(s.root().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(s.prepare("b", "missing", HashMap::new()).is_err());
        assert!(s.prepare("c", "a", HashMap::new()).is_err());
        assert!(s.prepare("a", "", HashMap::new()).is_err());
        let after: Vec<_> = std::fs::read_dir(s.root().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(before, after);
    }
}
