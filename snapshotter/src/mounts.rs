//! The mounts a snapshot answers with, following containerd's overlay snapshotter (kernel
//! mode) and fuse-overlayfs snapshotter (FUSE mode) rules.

use std::path::{Path, PathBuf};

use crate::api::Mount;
use crate::info::Kind;
use crate::labels;
use crate::store::Record;

/// How N-layer snapshots are mounted; chosen once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountMode {
    /// Kernel overlayfs, with the options the trial mount showed are needed.
    Overlay { index_off: bool, userxattr: bool },
    /// Our FUSE filesystem: type `fuse3.<program>` (`fuse3.rustfuse`).
    Fuse { program: String },
}

impl MountMode {
    pub fn name(&self) -> &'static str {
        match self {
            MountMode::Overlay { .. } => "overlay",
            MountMode::Fuse { .. } => "fuse",
        }
    }
}

/// `<root>/snapshots/<id>`.
pub fn snapshot_dir(snapshots: &Path, id: u64) -> PathBuf {
    snapshots.join(id.to_string())
}

fn fs_dir(snapshots: &Path, id: u64) -> PathBuf {
    snapshot_dir(snapshots, id).join("fs")
}

fn s(p: PathBuf) -> String {
    p.to_string_lossy().into_owned()
}

fn bind(source: PathBuf, ro: bool) -> Vec<Mount> {
    vec![Mount {
        r#type: "bind".into(),
        source: s(source),
        target: String::new(),
        options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
    }]
}

/// The mounts for `rec` of `kind` (Active or View) with snapshot directories under
/// `snapshots`.
pub fn mounts(mode: &MountMode, snapshots: &Path, kind: Kind, rec: &Record) -> Vec<Mount> {
    if rec.parent_ids.is_empty() {
        return bind(fs_dir(snapshots, rec.id), kind == Kind::View);
    }
    let mut options = Vec::new();
    if let MountMode::Overlay {
        index_off,
        userxattr,
    } = mode
    {
        if *index_off {
            options.push("index=off".to_string());
        }
        if *userxattr {
            options.push("userxattr".to_string());
        }
    }
    if kind == Kind::Active {
        options.push(format!(
            "workdir={}",
            s(snapshot_dir(snapshots, rec.id).join("work"))
        ));
        options.push(format!("upperdir={}", s(fs_dir(snapshots, rec.id))));
    } else if rec.parent_ids.len() == 1 {
        return bind(fs_dir(snapshots, rec.parent_ids[0]), true);
    }
    let lowers: Vec<PathBuf> = rec
        .parent_ids
        .iter()
        .map(|id| fs_dir(snapshots, *id))
        .collect();
    options.push(format!(
        "lowerdir={}",
        rustfuse::options::join_lowerdirs(&lowers)
    ));
    let r#type = match mode {
        MountMode::Overlay { .. } => "overlay".to_string(),
        MountMode::Fuse { program } => {
            for (label, opt) in [
                (labels::UID_MAPPING, "uidmapping"),
                (labels::GID_MAPPING, "gidmapping"),
            ] {
                if let Some(v) = rec.labels.get(label) {
                    options.push(format!("{opt}={}", labels::mapping_option(v)));
                }
            }
            format!("fuse3.{program}")
        }
    };
    vec![Mount {
        r#type,
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, parents: &[u64]) -> Record {
        Record {
            id,
            parent_ids: parents.to_vec(),
            ..Default::default()
        }
    }

    const KERNEL: MountMode = MountMode::Overlay {
        index_off: true,
        userxattr: false,
    };

    fn root() -> PathBuf {
        PathBuf::from("/r/snapshots")
    }

    #[test]
    fn no_parent_is_a_bind() {
        let m = mounts(&KERNEL, &root(), Kind::Active, &rec(1, &[]));
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, "/r/snapshots/1/fs");
        assert_eq!(m[0].options, ["rw", "rbind"]);
        let m = mounts(&KERNEL, &root(), Kind::View, &rec(1, &[]));
        assert_eq!(m[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn view_of_one_parent_binds_the_parent() {
        let m = mounts(&KERNEL, &root(), Kind::View, &rec(5, &[3]));
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, "/r/snapshots/3/fs");
        assert_eq!(m[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn active_with_parents_is_an_overlay() {
        let m = mounts(&KERNEL, &root(), Kind::Active, &rec(5, &[3, 2]));
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(m[0].source, "overlay");
        assert_eq!(
            m[0].options,
            [
                "index=off",
                "workdir=/r/snapshots/5/work",
                "upperdir=/r/snapshots/5/fs",
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"
            ]
        );
    }

    #[test]
    fn view_of_two_parents_is_lowerdir_only() {
        let mode = MountMode::Overlay {
            index_off: false,
            userxattr: true,
        };
        let m = mounts(&mode, &root(), Kind::View, &rec(5, &[3, 2]));
        assert_eq!(
            m[0].options,
            ["userxattr", "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]
        );
    }

    #[test]
    fn fuse_form_with_mappings() {
        let mode = MountMode::Fuse {
            program: "rustfuse".into(),
        };
        let mut r = rec(5, &[3]);
        r.labels
            .insert(labels::UID_MAPPING.into(), "0:1000:1,1:100000:65536".into());
        let m = mounts(&mode, Path::new("/a:b/snapshots"), Kind::Active, &r);
        assert_eq!(m[0].r#type, "fuse3.rustfuse");
        assert_eq!(m[0].source, "overlay");
        assert_eq!(
            m[0].options,
            [
                "workdir=/a:b/snapshots/5/work",
                "upperdir=/a:b/snapshots/5/fs",
                "lowerdir=/a\\:b/snapshots/3/fs",
                "uidmapping=0:1000:1:1:100000:65536"
            ]
        );
    }
}
