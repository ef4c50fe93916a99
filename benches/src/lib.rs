//! Benchmarks for rustfuse: helpers shared by the criterion benches of the overlay core.
//! (The comparison tool is the `rustfuse-compare` binary.)

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use rustfuse::overlay::{Ino, Overlay, ROOT_INO};

/// A layer set in a temporary directory on disk, removed on drop.
pub struct TempLayers {
    pub root: PathBuf,
    /// Lower layers, top first.
    pub lowers: Vec<PathBuf>,
}

impl TempLayers {
    /// `layers` lower layers; `fill(layer_index_from_bottom, layer_dir)` populates each.
    pub fn new(name: &str, layers: usize, mut fill: impl FnMut(usize, &Path)) -> TempLayers {
        let root =
            std::env::temp_dir().join(format!("rustfuse-bench-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let mut lowers = Vec::new();
        for i in 0..layers {
            let l = root.join(format!("l{i}"));
            fs::create_dir_all(&l).expect("create layer");
            fill(i, &l);
            lowers.push(l);
        }
        lowers.reverse();
        for d in ["upper", "work"] {
            fs::create_dir_all(root.join(d)).expect("create upper/work");
        }
        TempLayers { root, lowers }
    }

    /// The overlay core over these layers, with an upper and a work dir.
    pub fn overlay(&self) -> Overlay {
        let lower = self
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let opt = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            self.root.join("upper").display(),
            self.root.join("work").display()
        );
        let opts = rustfuse::options::parse(&[opt]).expect("options");
        Overlay::new(opts).expect("overlay")
    }
}

impl Drop for TempLayers {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A file in `dir/rel`, creating parents.
pub fn touch(dir: &Path, rel: &str) {
    let p = dir.join(rel);
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).expect("create dir");
    }
    fs::write(&p, rel.as_bytes()).expect("write file");
}

/// A char-device 0/0 whiteout at `dir/rel` (needs CAP_MKNOD; skipped quietly without it).
pub fn whiteout(dir: &Path, rel: &str) {
    let _ = rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.join(rel),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    );
}

/// Look `path` (slash-separated, relative to the root) up component by component.
pub fn lookup_path(ov: &Overlay, path: &str) -> Ino {
    let mut ino = ROOT_INO;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        ino = ov
            .lookup(ino, &OsString::from(c))
            .unwrap_or_else(|e| panic!("lookup {c}: {e:?}"))
            .ino;
    }
    ino
}
