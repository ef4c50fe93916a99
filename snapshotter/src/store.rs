//! The metadata store: an embedded, transactional, crash-safe redb database.
//!
//! Keys (and names) live only here; on disk a snapshot is `snapshots/<id>`. Tables:
//! - `meta`: `schema_version` and `next_id` (ids are never reused).
//! - `snapshots`: key → [`Record`] (protobuf-encoded, so fields can be added compatibly).
//! - `children`: parent key → child keys, so Remove can refuse a snapshot with children
//!   without a scan.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::SystemTime;

use redb::{
    Database, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use crate::error::{Error, Result};
use crate::info::{Info, Kind};
use crate::usage::Usage;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");

/// The schema this build writes. Bump it (and keep a test that opens the previous one) when
/// the layout of tables or records changes incompatibly.
pub const SCHEMA_VERSION: u64 = 1;
const KEY_SCHEMA_VERSION: &str = "schema_version";
const KEY_NEXT_ID: &str = "next_id";

/// What the store keeps per snapshot (schema version 1; fields 10 and 11 were added
/// compatibly: older records read them as 0 and false, older builds skip them).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// Directory name under `snapshots/`.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// [`Kind`] as its wire number.
    #[prost(int32, tag = "2")]
    pub kind: i32,
    /// Parent key, empty for none.
    #[prost(string, tag = "3")]
    pub parent: String,
    #[prost(message, optional, tag = "4")]
    pub created: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "5")]
    pub updated: Option<prost_types::Timestamp>,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    /// Disk usage in bytes, stored at Commit.
    #[prost(int64, tag = "7")]
    pub size: i64,
    /// Inode count, stored at Commit.
    #[prost(int64, tag = "8")]
    pub inodes: i64,
    /// Ids of all ancestors, the immediate parent first. Parents are immutable while they
    /// have children, so this never goes stale.
    #[prost(uint64, repeated, tag = "9")]
    pub parent_ids: Vec<u64>,
    /// Directories of its layer carrying a redirect xattr, counted at Commit (a store written
    /// before this field reads 0: its layers were all written by kernel overlayfs or by
    /// rustfuse without `redirect_dir=on`).
    #[prost(int64, tag = "10")]
    pub redirect_dirs: i64,
    /// Prepared (Active, with parents) in FUSE mode: its upper directory may hold redirects,
    /// so a start in overlay mode walks it.
    #[prost(bool, tag = "11")]
    pub fuse_upper: bool,
}

impl Record {
    /// The kind of this record, stored under `key`; a number that is no kind is store
    /// corruption (`Error::Corrupt` naming `key`), never guessed.
    pub fn kind(&self, key: &str) -> Result<Kind> {
        Kind::from_i32(self.kind).ok_or_else(|| {
            Error::Corrupt(format!(
                "record of {key:?}: unknown snapshot kind {}",
                self.kind
            ))
        })
    }

    /// The [`Info`] of this record, stored under `name`; an unknown kind or a time out of
    /// range is store corruption naming `name`.
    pub fn into_info(self, name: &str) -> Result<Info> {
        let time = |what: &str, ts: Option<prost_types::Timestamp>| {
            ts.map(SystemTime::try_from)
                .transpose()
                .map_err(|e| Error::Corrupt(format!("record of {name:?}: {what} time: {e}")))
        };
        Ok(Info {
            kind: self.kind(name)?,
            created: time("created", self.created)?,
            updated: time("updated", self.updated)?,
            name: name.to_string(),
            parent: self.parent,
            labels: self.labels,
        })
    }
}

/// Current time as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

/// A record as stored: any bytes either decode or give `Error::Corrupt` naming `key`
/// (public for the fuzz target).
pub fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    <Record as prost::Message>::decode(bytes)
        .map_err(|e| Error::Corrupt(format!("record of {key:?}: {e}")))
}

/// The stored form of a record; [`decode`] gives it back.
pub fn encode(r: &Record) -> Vec<u8> {
    prost::Message::encode_to_vec(r)
}

/// A new snapshot's parameters.
pub struct NewSnapshot<'a> {
    pub key: &'a str,
    pub parent: &'a str,
    pub kind: Kind,
    pub labels: HashMap<String, String>,
    /// Mounted by rustfuse with `redirect_dir=on` (FUSE mode, Active with a parent).
    pub fuse_upper: bool,
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Open (or create) the database at `path` and check its schema version.
    pub fn open(path: &Path) -> Result<Store> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let version = meta.get(KEY_SCHEMA_VERSION)?.map(|v| v.value());
            match version {
                None => {
                    let snaps = tx.open_table(SNAPSHOTS)?;
                    if snaps.len()? != 0 {
                        return Err(Error::Corrupt(format!(
                            "{}: snapshots but no schema version",
                            path.display()
                        )));
                    }
                    meta.insert(KEY_SCHEMA_VERSION, SCHEMA_VERSION)?;
                    meta.insert(KEY_NEXT_ID, 1)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(v) => {
                    return Err(Error::Corrupt(format!(
                        "{}: schema version {v} is not supported (this build reads {SCHEMA_VERSION})",
                        path.display()
                    )));
                }
            }
            tx.open_multimap_table(CHILDREN)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta
            .get(KEY_SCHEMA_VERSION)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        t.get(key)?.map(|v| decode(key, v.value())).transpose()
    }

    /// Like [`Store::get`] but NotFound names the key.
    pub fn must_get(&self, key: &str) -> Result<Record> {
        self.get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))
    }

    /// All snapshots, in key order.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let key = k.value().to_string();
            let rec = decode(&key, v.value())?;
            out.push((key, rec));
        }
        Ok(out)
    }

    /// Ids of all snapshots, for Cleanup.
    pub fn ids(&self) -> Result<HashSet<u64>> {
        Ok(self.list()?.into_iter().map(|(_, r)| r.id).collect())
    }

    /// Create a snapshot. `place` runs inside the transaction with the new record (its id
    /// allocated); if it fails, nothing is recorded. It is where the directory built under a
    /// temporary name is renamed into place.
    pub fn create(
        &self,
        new: NewSnapshot<'_>,
        place: impl FnOnce(&Record) -> Result<()>,
    ) -> Result<Record> {
        let key = new.key;
        let tx = self.db.begin_write()?;
        let rec = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            if snaps.get(key)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {key:?} already exists"
                )));
            }
            if let Some(target) = new.labels.get(crate::labels::TARGET_SNAPSHOT_REF) {
                let exists = match snaps.get(target.as_str())? {
                    Some(v) => decode(target, v.value())?.kind(target)? == Kind::Committed,
                    None => false,
                };
                if exists {
                    return Err(Error::AlreadyExists(format!(
                        "target snapshot {target:?} already exists (preparing {key:?})"
                    )));
                }
            }
            let parent_ids = if new.parent.is_empty() {
                Vec::new()
            } else {
                let Some(v) = snaps.get(new.parent)? else {
                    return Err(Error::NotFound(format!(
                        "parent snapshot {:?} of {key:?} does not exist",
                        new.parent
                    )));
                };
                let p = decode(new.parent, v.value())?;
                let kind = p.kind(new.parent)?;
                if kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {:?} of {key:?} is {}, not committed",
                        new.parent,
                        kind.as_str()
                    )));
                }
                let mut ids = vec![p.id];
                ids.extend(p.parent_ids);
                ids
            };
            let id = next_id(&tx)?;
            let ts = now();
            let rec = Record {
                id,
                kind: new.kind as i32,
                parent: new.parent.to_string(),
                created: Some(ts),
                updated: Some(ts),
                labels: new.labels,
                size: 0,
                inodes: 0,
                fuse_upper: new.fuse_upper && new.kind == Kind::Active && !parent_ids.is_empty(),
                parent_ids,
                redirect_dirs: 0,
            };
            snaps.insert(key, encode(&rec).as_slice())?;
            if !new.parent.is_empty() {
                tx.open_multimap_table(CHILDREN)?.insert(new.parent, key)?;
            }
            rec
        };
        place(&rec)?;
        tx.commit()?;
        Ok(rec)
    }

    /// Turn Active `key` into Committed `name`, keeping its id and parent, with `usage` as
    /// measured.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
        usage: Usage,
        expect_id: u64,
    ) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let Some(v) = snaps.get(key)? else {
                return Err(Error::NotFound(format!("snapshot {key:?} does not exist")));
            };
            let mut rec = decode(key, v.value())?;
            drop(v);
            let kind = rec.kind(key)?;
            if kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is {}, only an active snapshot can be committed",
                    kind.as_str()
                )));
            }
            if rec.id != expect_id {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} changed while committing"
                )));
            }
            if snaps.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists (committing {key:?})"
                )));
            }
            let mut children = tx.open_multimap_table(CHILDREN)?;
            if children.get(key)?.next().is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} has children"
                )));
            }
            snaps.remove(key)?;
            let ts = now();
            rec.kind = Kind::Committed as i32;
            rec.labels = labels;
            rec.created = Some(ts);
            rec.updated = Some(ts);
            rec.size = usage.size;
            rec.inodes = usage.inodes;
            rec.redirect_dirs = usage.redirect_dirs;
            snaps.insert(name, encode(&rec).as_slice())?;
            if !rec.parent.is_empty() {
                children.remove(rec.parent.as_str(), key)?;
                children.insert(rec.parent.as_str(), name)?;
            }
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Remove `key`; refuses (FailedPrecondition) while it has children.
    pub fn remove(&self, key: &str) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let Some(v) = snaps.get(key)? else {
                return Err(Error::NotFound(format!("snapshot {key:?} does not exist")));
            };
            let rec = decode(key, v.value())?;
            drop(v);
            let mut children = tx.open_multimap_table(CHILDREN)?;
            let kids: Vec<String> = children
                .get(key)?
                .map(|c| c.map(|c| c.value().to_string()))
                .collect::<Result<_, _>>()?;
            if !kids.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has {} child snapshot(s), e.g. {:?}",
                    kids.len(),
                    kids[0]
                )));
            }
            snaps.remove(key)?;
            if !rec.parent.is_empty() {
                children.remove(rec.parent.as_str(), key)?;
            }
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Replace the labels of `key` with `f(old record)` and bump `updated`; nothing is
    /// written when `f` fails.
    pub fn update_labels(
        &self,
        key: &str,
        f: impl FnOnce(&Record) -> Result<HashMap<String, String>>,
    ) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let Some(v) = snaps.get(key)? else {
                return Err(Error::NotFound(format!("snapshot {key:?} does not exist")));
            };
            let mut rec = decode(key, v.value())?;
            drop(v);
            rec.labels = f(&rec)?;
            rec.updated = Some(now());
            snaps.insert(key, encode(&rec).as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }
}

/// Write `rec` under `key` as it is, with no checks: how a test plants a corrupt record.
#[cfg(test)]
pub(crate) fn put_raw(store: &Store, key: &str, rec: &Record) -> Result<()> {
    let tx = store.db.begin_write()?;
    tx.open_table(SNAPSHOTS)?
        .insert(key, encode(rec).as_slice())?;
    tx.commit()?;
    Ok(())
}

fn next_id(tx: &WriteTransaction) -> Result<u64> {
    let mut meta = tx.open_table(META)?;
    let id = meta.get(KEY_NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
    meta.insert(KEY_NEXT_ID, id + 1)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new<'a>(key: &'a str, parent: &'a str, kind: Kind) -> NewSnapshot<'a> {
        NewSnapshot {
            key,
            parent,
            kind,
            labels: HashMap::new(),
            fuse_upper: false,
        }
    }

    fn used(size: i64, inodes: i64) -> Usage {
        Usage {
            size,
            inodes,
            redirect_dirs: 0,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("metadata.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn record_roundtrip() {
        let r = Record {
            id: 7,
            kind: Kind::Committed as i32,
            parent: "ns/1/sha256:abc def".into(),
            created: Some(now()),
            updated: Some(now()),
            labels: [("a".to_string(), "b".to_string())].into(),
            size: 4096,
            inodes: 3,
            parent_ids: vec![5, 3, 1],
            redirect_dirs: 2,
            fuse_upper: true,
        };
        assert_eq!(decode("k", &encode(&r)).unwrap(), r);
        assert!(decode("k", &[0xff, 0xff]).is_err());
    }

    /// A record as builds before fields 10 and 11 wrote it (tags 1 to 9).
    #[derive(Clone, PartialEq, prost::Message)]
    struct RecordV1 {
        #[prost(uint64, tag = "1")]
        id: u64,
        #[prost(int32, tag = "2")]
        kind: i32,
        #[prost(string, tag = "3")]
        parent: String,
        #[prost(int64, tag = "7")]
        size: i64,
        #[prost(uint64, repeated, tag = "9")]
        parent_ids: Vec<u64>,
    }

    /// Records written before the redirect fields read as holding no redirects and not
    /// prepared in FUSE mode; an older build reading a new record skips the new fields.
    #[test]
    fn records_without_the_redirect_fields() {
        let old = RecordV1 {
            id: 4,
            kind: Kind::Committed as i32,
            parent: "p".into(),
            size: 10,
            parent_ids: vec![3],
        };
        let r = decode("k", &prost::Message::encode_to_vec(&old)).unwrap();
        assert_eq!((r.id, r.size, r.parent_ids.clone()), (4, 10, vec![3]));
        assert_eq!((r.redirect_dirs, r.fuse_upper), (0, false));
        let new = Record {
            redirect_dirs: 5,
            fuse_upper: true,
            ..r
        };
        let back = <RecordV1 as prost::Message>::decode(encode(&new).as_slice()).unwrap();
        assert_eq!(back, old);
    }

    /// The FUSE mark is kept for an Active snapshot with a parent only (a bind-mounted one
    /// has no rustfuse upper), and Commit stores the redirect count it measured.
    #[test]
    fn fuse_upper_and_redirect_count() {
        let (_d, s) = store();
        let fuse = |key: &'static str, parent: &'static str, kind| NewSnapshot {
            fuse_upper: true,
            ..new(key, parent, kind)
        };
        let a = s.create(fuse("a", "", Kind::Active), |_| Ok(())).unwrap();
        assert!(!a.fuse_upper, "no parent: a bind mount");
        s.commit("base", "a", HashMap::new(), used(0, 0), a.id)
            .unwrap();
        let b = s
            .create(fuse("b", "base", Kind::Active), |_| Ok(()))
            .unwrap();
        assert!(b.fuse_upper);
        let v = s.create(fuse("v", "base", Kind::View), |_| Ok(())).unwrap();
        assert!(!v.fuse_upper, "a view has no upper");
        let usage = Usage {
            redirect_dirs: 3,
            ..used(1, 1)
        };
        let c = s.commit("c", "b", HashMap::new(), usage, b.id).unwrap();
        assert_eq!(c.redirect_dirs, 3);
        assert_eq!(s.must_get("c").unwrap().redirect_dirs, 3);
    }

    #[test]
    fn create_commit_remove() {
        let (_d, s) = store();
        let a = s.create(new("a", "", Kind::Active), |_| Ok(())).unwrap();
        assert_eq!(a.id, 1);
        let c = s
            .commit("c", "a", HashMap::new(), used(10, 1), a.id)
            .unwrap();
        assert_eq!(c.id, 1);
        assert_eq!(c.kind("c").unwrap(), Kind::Committed);
        assert!(s.get("a").unwrap().is_none());
        let b = s.create(new("b", "c", Kind::Active), |_| Ok(())).unwrap();
        assert_eq!(b.parent_ids, vec![1]);
        assert!(matches!(s.remove("c"), Err(Error::FailedPrecondition(_))));
        s.remove("b").unwrap();
        s.remove("c").unwrap();
        assert!(matches!(s.remove("c"), Err(Error::NotFound(_))));
        // Ids are never reused.
        let d = s.create(new("a", "", Kind::Active), |_| Ok(())).unwrap();
        assert_eq!(d.id, 3);
    }

    #[test]
    fn create_errors() {
        let (_d, s) = store();
        s.create(new("a", "", Kind::Active), |_| Ok(())).unwrap();
        assert!(matches!(
            s.create(new("a", "", Kind::View), |_| Ok(())),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create(new("x", "missing", Kind::Active), |_| Ok(())),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            s.create(new("x", "a", Kind::Active), |_| Ok(())),
            Err(Error::InvalidArgument(_))
        ));
        // A failing placement records nothing.
        assert!(
            s.create(new("y", "", Kind::Active), |_| Err(Error::Corrupt(
                "no".into()
            )))
            .is_err()
        );
        assert!(s.get("y").unwrap().is_none());
    }

    #[test]
    fn remote_snapshot_ref() {
        let (_d, s) = store();
        let a = s.create(new("x", "", Kind::Active), |_| Ok(())).unwrap();
        s.commit("chain", "x", HashMap::new(), used(0, 0), a.id)
            .unwrap();
        let mut n = new("extract", "", Kind::Active);
        n.labels
            .insert(crate::labels::TARGET_SNAPSHOT_REF.into(), "chain".into());
        assert!(matches!(
            s.create(n, |_| Ok(())),
            Err(Error::AlreadyExists(_))
        ));
        let mut n = new("extract", "", Kind::Active);
        n.labels
            .insert(crate::labels::TARGET_SNAPSHOT_REF.into(), "other".into());
        s.create(n, |_| Ok(())).unwrap();
    }

    #[test]
    fn commit_errors() {
        let (_d, s) = store();
        let a = s.create(new("a", "", Kind::Active), |_| Ok(())).unwrap();
        let v = s.create(new("v", "", Kind::View), |_| Ok(())).unwrap();
        assert!(matches!(
            s.commit("c", "missing", HashMap::new(), used(0, 0), 0),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            s.commit("c", "v", HashMap::new(), used(0, 0), v.id),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.commit("v", "a", HashMap::new(), used(0, 0), a.id),
            Err(Error::AlreadyExists(_))
        ));
    }

    #[test]
    fn reopen_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let s = Store::open(&path).unwrap();
            let a = s
                .create(new("a b/c", "", Kind::Active), |_| Ok(()))
                .unwrap();
            s.commit("n", "a b/c", HashMap::new(), used(1, 1), a.id)
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.must_get("n").unwrap().size, 1);
        assert_eq!(
            s.create(new("b", "n", Kind::Active), |_| Ok(()))
                .unwrap()
                .id,
            2
        );
    }

    #[test]
    fn refuses_unknown_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert(KEY_SCHEMA_VERSION, SCHEMA_VERSION + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        let err = Store::open(&path).err().unwrap();
        assert!(err.to_string().contains("schema version"), "{err}");
    }

    /// A version-1 database written table by table, as a v1 build lays it out, still opens.
    #[test]
    fn opens_a_version_1_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut meta = tx.open_table(META).unwrap();
                meta.insert(KEY_SCHEMA_VERSION, 1).unwrap();
                meta.insert(KEY_NEXT_ID, 5).unwrap();
                let mut snaps = tx.open_table(SNAPSHOTS).unwrap();
                let r = Record {
                    id: 4,
                    kind: 3,
                    ..Default::default()
                };
                snaps.insert("old", encode(&r).as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.must_get("old").unwrap().id, 4);
        assert_eq!(
            s.create(new("x", "old", Kind::Active), |_| Ok(()))
                .unwrap()
                .id,
            5
        );
    }

    /// A stored kind that is no kind is corruption named by its key wherever the kind is
    /// needed, never read as Active.
    #[test]
    fn unknown_kind_is_corruption_naming_the_key() {
        let (_d, s) = store();
        let key = "ns/1/sha256:odd kind";
        let r = Record {
            id: 9,
            kind: 7,
            ..Default::default()
        };
        put_raw(&s, key, &r).unwrap();
        let corrupt = |e: Error| match e {
            Error::Corrupt(msg) => {
                assert!(msg.contains(&format!("{key:?}")), "{msg}");
                assert!(msg.contains("unknown snapshot kind 7"), "{msg}");
            }
            e => panic!("expected Corrupt, got {e:?}"),
        };
        let rec = s.must_get(key).unwrap();
        corrupt(rec.kind(key).unwrap_err());
        corrupt(rec.into_info(key).unwrap_err());
        corrupt(
            s.create(new("child", key, Kind::Active), |_| Ok(()))
                .unwrap_err(),
        );
        let mut n = new("extract", "", Kind::Active);
        n.labels
            .insert(crate::labels::TARGET_SNAPSHOT_REF.into(), key.into());
        corrupt(s.create(n, |_| Ok(())).unwrap_err());
        corrupt(
            s.commit("c", key, HashMap::new(), used(0, 0), 9)
                .unwrap_err(),
        );
        assert!(s.get("child").unwrap().is_none());
        assert!(s.get("extract").unwrap().is_none());
        assert!(s.get("c").unwrap().is_none());
        // The unset kind (0, UNKNOWN on the wire) is no kind either.
        let r0 = Record {
            kind: 0,
            ..Default::default()
        };
        assert!(matches!(r0.kind("z"), Err(Error::Corrupt(m)) if m.contains("\"z\"")));
    }

    #[test]
    fn update_labels_bumps_updated_only() {
        let (_d, s) = store();
        let a = s.create(new("a", "", Kind::Active), |_| Ok(())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = s
            .update_labels("a", |_| Ok([("x".to_string(), "y".to_string())].into()))
            .unwrap();
        assert_eq!(a.created, b.created);
        assert_ne!(b.created, b.updated);
        assert_eq!(b.labels.len(), 1);
    }
}
