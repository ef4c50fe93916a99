//! The mounts a snapshot answers with, following containerd's overlay snapshotter (kernel
//! mode) and fuse-overlayfs snapshotter (FUSE mode) rules.
//!
//! FUSE-mode overlays carry `redirect_dir=on`: a rename of a directory with parent-layer
//! content (`mv /opt/app /opt/app.old` in a build step) is then one rename and a redirect
//! xattr, not a copy of the tree (see [`crate::redirects`]). Kernel-mode overlays write no
//! redirects; they carry `redirect_dir=follow` when layers written in FUSE mode hold some.

use std::path::{Path, PathBuf};

use crate::api::Mount;
use crate::info::Kind;
use crate::labels;
use crate::store::Record;

/// How N-layer snapshots are mounted; chosen once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountMode {
    /// Kernel overlayfs, with the options the trial mount showed are needed;
    /// `redirect_follow` (`redirect_dir=follow`) when some layer holds directory redirects.
    Overlay {
        index_off: bool,
        userxattr: bool,
        redirect_follow: bool,
    },
    /// Our FUSE filesystem: type `fuse3.<program>` (`fuse3.rustfuse`), with
    /// [`FUSE_REDIRECT_DIR`].
    Fuse { program: String },
}

/// The `redirect_dir=` option of every FUSE-mode overlay mount.
pub const FUSE_REDIRECT_DIR: &str = "redirect_dir=on";

/// The `redirect_dir=` option of kernel overlay mounts over layers that hold redirects.
pub const KERNEL_REDIRECT_FOLLOW: &str = "redirect_dir=follow";

impl MountMode {
    pub fn name(&self) -> &'static str {
        match self {
            MountMode::Overlay { .. } => "overlay",
            MountMode::Fuse { .. } => "fuse",
        }
    }

    /// The `redirect_dir=` option its overlay mounts carry, if any.
    pub fn redirect_dir(&self) -> Option<&'static str> {
        match self {
            MountMode::Overlay {
                redirect_follow: true,
                ..
            } => Some(KERNEL_REDIRECT_FOLLOW),
            MountMode::Overlay { .. } => None,
            MountMode::Fuse { .. } => Some(FUSE_REDIRECT_DIR),
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
        ..
    } = mode
    {
        if *index_off {
            options.push("index=off".to_string());
        }
        if *userxattr {
            options.push("userxattr".to_string());
        }
    }
    if let Some(r) = mode.redirect_dir() {
        options.push(r.to_string());
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
        redirect_follow: false,
    };

    fn fuse() -> MountMode {
        MountMode::Fuse {
            program: "rustfuse".into(),
        }
    }

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
            redirect_follow: false,
        };
        let m = mounts(&mode, &root(), Kind::View, &rec(5, &[3, 2]));
        assert_eq!(
            m[0].options,
            ["userxattr", "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]
        );
    }

    #[test]
    fn fuse_form_with_mappings() {
        let mode = fuse();
        let mut r = rec(5, &[3]);
        r.labels
            .insert(labels::UID_MAPPING.into(), "0:1000:1,1:100000:65536".into());
        let m = mounts(&mode, Path::new("/a:b/snapshots"), Kind::Active, &r);
        assert_eq!(m[0].r#type, "fuse3.rustfuse");
        assert_eq!(m[0].source, "overlay");
        assert_eq!(
            m[0].options,
            [
                "redirect_dir=on",
                "workdir=/a:b/snapshots/5/work",
                "upperdir=/a:b/snapshots/5/fs",
                "lowerdir=/a\\:b/snapshots/3/fs",
                "uidmapping=0:1000:1:1:100000:65536"
            ]
        );
    }

    /// Every FUSE-mode overlay (Active, multi-parent View) writes and follows redirects; the
    /// bind mounts take no option.
    #[test]
    fn fuse_overlays_carry_redirect_dir_on() {
        let m = mounts(&fuse(), &root(), Kind::Active, &rec(5, &[3]));
        assert_eq!(
            m[0].options,
            [
                "redirect_dir=on",
                "workdir=/r/snapshots/5/work",
                "upperdir=/r/snapshots/5/fs",
                "lowerdir=/r/snapshots/3/fs"
            ]
        );
        let m = mounts(&fuse(), &root(), Kind::View, &rec(5, &[3, 2]));
        assert_eq!(m[0].r#type, "fuse3.rustfuse");
        assert_eq!(
            m[0].options,
            [
                "redirect_dir=on",
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"
            ]
        );
        for (kind, r) in [
            (Kind::View, rec(5, &[3])),
            (Kind::Active, rec(1, &[])),
            (Kind::View, rec(1, &[])),
        ] {
            let m = mounts(&fuse(), &root(), kind, &r);
            assert_eq!(m[0].r#type, "bind", "{kind:?} {r:?}");
            assert!(
                !m[0].options.iter().any(|o| o.starts_with("redirect_dir")),
                "{m:?}"
            );
        }
    }

    /// Kernel overlays write no redirects: no option by default, `redirect_dir=follow` when
    /// layers hold redirects, after `index=off`/`userxattr` and before the directories.
    #[test]
    fn kernel_overlays_follow_only_when_asked() {
        for kind in [Kind::Active, Kind::View] {
            let m = mounts(&KERNEL, &root(), kind, &rec(5, &[3, 2]));
            assert!(
                !m[0].options.iter().any(|o| o.starts_with("redirect_dir")),
                "{m:?}"
            );
        }
        let follow = MountMode::Overlay {
            index_off: true,
            userxattr: false,
            redirect_follow: true,
        };
        let m = mounts(&follow, &root(), Kind::Active, &rec(5, &[3]));
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            [
                "index=off",
                "redirect_dir=follow",
                "workdir=/r/snapshots/5/work",
                "upperdir=/r/snapshots/5/fs",
                "lowerdir=/r/snapshots/3/fs"
            ]
        );
        let m = mounts(&follow, &root(), Kind::View, &rec(5, &[3, 2]));
        assert_eq!(
            m[0].options,
            [
                "index=off",
                "redirect_dir=follow",
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"
            ]
        );
        assert_eq!(KERNEL.redirect_dir(), None);
        assert_eq!(follow.redirect_dir(), Some("redirect_dir=follow"));
        assert_eq!(fuse().redirect_dir(), Some("redirect_dir=on"));
    }
}
