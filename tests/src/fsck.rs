//! A checker of an upper directory after unmount: does it hold the on-disk format that
//! fuse-overlayfs and rustfuse share (docs: /work/shared/docs/fuse-overlayfs-compat.md,
//! "On-disk format"), and nothing else?
//!
//! What is checked:
//! - whiteouts: a char device 0/0, or an empty regular `.wh.NAME` file; the hidden name is not
//!   empty, does not itself start with `.wh.`, is not also present in the same directory, and
//!   exists (as something other than a whiteout) in some lower layer at the same path (every
//!   parent a real directory there). The rule is "only write a whiteout when the name exists in
//!   some lower layer"; a whiteout under a directory that no lower layer has hides nothing.
//!   Whether that lower name is visible (not itself hidden by a higher lower layer) is not
//!   required: writing a whiteout over an already hidden name is harmless and both programs
//!   decide it per layer probe;
//! - opaque markers: `trusted.overlay.opaque`, `user.overlay.opaque` and
//!   `user.fuseoverlayfs.opaque` only on directories, value exactly `y`; `.wh..wh..opq` (and
//!   the `.wh..opq` fuse-overlayfs writes next to it) only as empty regular files. A directory
//!   marked opaque without a lower counterpart is fine (fuse-overlayfs marks every new one);
//! - override_stat xattrs parse as `uid:gid:octalmode[:type]`, mode within 0o7777, type one of
//!   `dir file symlink pipe socket block-M-m char-M-m`, and consistent with what is on disk:
//!   `dir` exactly on directories, `symlink` exactly on symlinks, `file` on regular files, the
//!   device/pipe/socket types on that type or on a regular file standing in for it (rootless);
//! - no internal temporary names: rustfuse's `#<pid hex>-<n hex>` and `.rustfuse-*`, kernel
//!   overlayfs' `#<n>`;
//! - no leftovers in `<workdir>/work` ([`crate::upper::work_leftovers`]).
//!
//! The xattr reading, the override parser and the work/ scan are [`crate::upper`]'s.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::mount::Stack;
use crate::upper::{OPAQUE_XATTRS, OVERRIDE_XATTRS, parse_override, raw_xattrs, work_leftovers};

/// One problem found in an upper (or work) directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Path relative to the upper directory (`""` = its root), or `work/...` for the workdir.
    pub path: String,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(f, "{shown}: {}", self.problem)
    }
}

/// Checks the upper and work directories of `stack` (read-only stacks have nothing to check).
pub fn fsck(stack: &Stack) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(upper) = &stack.upper {
        out.extend(check_upper(upper, &stack.lowers));
    }
    if let Some(work) = &stack.work {
        out.extend(check_work(work));
    }
    out
}

/// Leftovers in the workdir, as findings.
pub fn check_work(workdir: &Path) -> Vec<Finding> {
    work_leftovers(workdir)
        .into_iter()
        .map(|p| Finding {
            path: format!("workdir/{p}"),
            problem: "left over in the work directory after unmount".into(),
        })
        .collect()
}

/// Checks the upper directory `upper` over `lowers` (topmost first). Empty when well-formed.
pub fn check_upper(upper: &Path, lowers: &[PathBuf]) -> Vec<Finding> {
    let mut c = Checker {
        lowers,
        out: Vec::new(),
    };
    match std::fs::symlink_metadata(upper) {
        Ok(md) if md.is_dir() => c.entry("", upper, &md),
        Ok(_) => c.add("", "the upper directory is not a directory"),
        Err(e) => c.add("", format!("lstat: {e}")),
    }
    c.out
}

struct Checker<'a> {
    lowers: &'a [PathBuf],
    out: Vec<Finding>,
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

/// A name the daemon (or kernel overlayfs) uses for a file being built in work/.
fn is_temp_name(name: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if name.starts_with(".rustfuse-") {
        return true;
    }
    match name.strip_prefix('#') {
        Some(rest) => match rest.split_once('-') {
            Some((pid, n)) => hex(pid) && hex(n),
            None => !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()),
        },
        None => false,
    }
}

/// True when `rel` names something other than a whiteout in `lower`, every parent being a real
/// directory of that layer (symlinks are not followed).
fn exists_in_layer(lower: &Path, rel: &str) -> bool {
    let mut p = lower.to_path_buf();
    let comps: Vec<&str> = rel.split('/').collect();
    for (i, comp) in comps.iter().enumerate() {
        p.push(comp);
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            return false;
        };
        let last = i + 1 == comps.len();
        if !last && !md.is_dir() {
            return false;
        }
        if last {
            let whiteout = md.file_type().is_char_device() && md.rdev() == 0;
            let wh_file = p
                .parent()
                .is_some_and(|d| d.join(format!(".wh.{comp}")).exists());
            return !whiteout && !wh_file;
        }
    }
    false
}

impl Checker<'_> {
    fn add(&mut self, path: &str, problem: impl Into<String>) {
        self.out.push(Finding {
            path: path.to_string(),
            problem: problem.into(),
        });
    }

    fn in_some_lower(&self, rel: &str) -> bool {
        self.lowers.iter().any(|l| exists_in_layer(l, rel))
    }

    /// A whiteout at `rel` hiding `hidden` (same path for a 0/0 device, the name without `.wh.`
    /// for a whiteout file); `present` says whether `hidden` is also an entry of that directory.
    fn whiteout(&mut self, at: &str, hidden: &str, present: bool) {
        if hidden.is_empty() {
            self.add(at, "whiteout of an empty name");
            return;
        }
        let name = hidden.rsplit('/').next().unwrap_or(hidden);
        if name.starts_with(".wh.") {
            self.add(
                at,
                "whiteout of a name starting with .wh. (such names are refused)",
            );
        }
        if present {
            self.add(
                at,
                format!("whiteout of {hidden:?}, which is also present in the same directory"),
            );
        }
        if !self.in_some_lower(hidden) {
            self.add(
                at,
                format!("whiteout of {hidden:?}, which no lower layer has (it hides nothing)"),
            );
        }
    }

    fn entry(&mut self, rel: &str, path: &Path, md: &std::fs::Metadata) {
        let ft = md.file_type();
        if ft.is_char_device() && md.rdev() == 0 {
            // Existence of `rel` in the directory is implied; a 0/0 device cannot coexist with
            // another entry of the same name.
            self.whiteout(rel, rel, false);
            return;
        }
        self.xattrs(rel, path, ft);
        if ft.is_dir() {
            self.dir(rel, path);
        }
    }

    fn xattrs(&mut self, rel: &str, path: &Path, ft: std::fs::FileType) {
        let x = raw_xattrs(path);
        for name in OPAQUE_XATTRS {
            let Some(v) = x.get(name) else { continue };
            if !ft.is_dir() {
                self.add(rel, format!("{name} on a non-directory"));
            }
            if v.as_slice() != b"y" {
                self.add(
                    rel,
                    format!("{name} is {:?}, not \"y\"", String::from_utf8_lossy(v)),
                );
            }
        }
        for name in OVERRIDE_XATTRS {
            let Some(v) = x.get(name) else { continue };
            if let Err(e) = check_override(v, ft) {
                self.add(rel, format!("{name}={:?}: {e}", String::from_utf8_lossy(v)));
            }
        }
    }

    fn dir(&mut self, rel: &str, dir: &Path) {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) => return self.add(rel, format!("readdir: {e}")),
        };
        let mut names = Vec::new();
        for ent in rd {
            match ent {
                Ok(e) => names.push(e.file_name().to_string_lossy().into_owned()),
                Err(e) => {
                    self.add(rel, format!("readdir: {e}"));
                    break;
                }
            }
        }
        names.sort();
        for name in &names {
            let child = join(rel, name);
            let path = dir.join(name);
            let md = match std::fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) => {
                    self.add(&child, format!("listed but lstat fails: {e}"));
                    continue;
                }
            };
            if is_temp_name(name) {
                self.add(&child, "internal temporary name in the upper layer");
            }
            if name == ".wh..wh..opq" || name == ".wh..opq" {
                if !md.file_type().is_file() || md.len() != 0 {
                    self.add(&child, "opaque marker file is not an empty regular file");
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                if !md.file_type().is_file() || md.len() != 0 {
                    self.add(&child, "whiteout file is not an empty regular file");
                }
                let present = names.iter().any(|n| n == hidden);
                self.whiteout(&child, &join(rel, hidden), present);
                continue;
            }
            self.entry(&child, &path, &md);
        }
    }
}

/// Checks one override_stat value against the type of the entry that carries it.
fn check_override(v: &[u8], ft: std::fs::FileType) -> Result<(), String> {
    let (_, _, mode, ty) = parse_override(v)
        .ok_or_else(|| "does not parse as uid:gid:octalmode[:type]".to_string())?;
    if mode & !0o7777 != 0 {
        return Err(format!("mode {mode:o} has bits beyond 07777"));
    }
    let Some(ty) = ty else { return Ok(()) };
    let device = |rest: Option<&str>| {
        rest.and_then(|r| r.split_once('-'))
            .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
    };
    let (valid, on_disk_ok) = match ty.as_str() {
        "dir" => (true, ft.is_dir()),
        "symlink" => (true, ft.is_symlink()),
        "file" => (true, ft.is_file()),
        "pipe" => (true, ft.is_fifo() || ft.is_file()),
        "socket" => (true, ft.is_socket() || ft.is_file()),
        t if t.starts_with("block-") => (
            device(t.strip_prefix("block-")),
            ft.is_block_device() || ft.is_file(),
        ),
        t if t.starts_with("char-") => (
            device(t.strip_prefix("char-")),
            ft.is_char_device() || ft.is_file(),
        ),
        _ => (false, true),
    };
    if !valid {
        return Err(format!(
            "type {ty:?} is not one of dir, file, symlink, pipe, socket, block-M-m, char-M-m"
        ));
    }
    if !on_disk_ok || (ft.is_dir() && ty != "dir") {
        return Err(format!("type {ty:?} does not match the entry on disk"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::scratch;
    use rustix::fs::XattrFlags;

    struct Fixture {
        _s: crate::env::Scratch,
        upper: PathBuf,
        work: PathBuf,
        lower: PathBuf,
    }

    /// A lower layer with `x`, `d/y` and `d/sub/` and an empty upper and work dir.
    fn fixture(name: &str) -> Fixture {
        let s = scratch(&format!("fsck-{name}"));
        let (lower, upper, work) = (
            s.path().join("lower"),
            s.path().join("upper"),
            s.path().join("work"),
        );
        std::fs::create_dir_all(lower.join("d/sub")).unwrap();
        std::fs::write(lower.join("x"), "x").unwrap();
        std::fs::write(lower.join("d/y"), "y").unwrap();
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::create_dir_all(work.join("work")).unwrap();
        Fixture {
            _s: s,
            upper,
            work,
            lower,
        }
    }

    impl Fixture {
        fn run(&self) -> Vec<Finding> {
            fsck(&Stack {
                lowers: vec![self.lower.clone()],
                upper: Some(self.upper.clone()),
                work: Some(self.work.clone()),
            })
        }
        fn u(&self, rel: &str) -> PathBuf {
            self.upper.join(rel)
        }
        fn xattr(&self, rel: &str, name: &str, v: &str) {
            rustix::fs::lsetxattr(self.u(rel), name, v.as_bytes(), XattrFlags::empty()).unwrap();
        }
    }

    /// Asserts exactly one finding, at `path`, mentioning `what`.
    fn expect_one(f: &[Finding], path: &str, what: &str) {
        assert_eq!(
            f.len(),
            1,
            "want one finding at {path} ({what}), got {f:#?}"
        );
        assert_eq!(f[0].path, path, "{f:#?}");
        assert!(f[0].problem.contains(what), "want {what:?} in {f:#?}");
    }

    #[test]
    fn a_well_formed_upper_has_no_findings() {
        let fx = fixture("good");
        std::fs::create_dir_all(fx.u("d")).unwrap();
        std::fs::write(fx.u(".wh.x"), "").unwrap();
        std::fs::write(fx.u("d/.wh.y"), "").unwrap();
        std::fs::write(fx.u("new"), "content").unwrap();
        std::os::unix::fs::symlink("new", fx.u("link")).unwrap();
        // A new directory marked opaque the way fuse-overlayfs does without privileges.
        std::fs::create_dir(fx.u("fresh")).unwrap();
        fx.xattr("fresh", "user.fuseoverlayfs.opaque", "y");
        std::fs::write(fx.u("fresh/.wh..wh..opq"), "").unwrap();
        std::fs::write(fx.u("fresh/.wh..opq"), "").unwrap();
        fx.xattr("new", "user.containers.override_stat", "1000:1000:644:file");
        fx.xattr("d", "user.containers.override_stat", "0:0:755:dir");
        std::fs::write(fx.u("dev"), "").unwrap();
        fx.xattr("dev", "user.containers.override_stat", "0:0:666:char-1-3");
        fx.xattr("fresh", "user.containers.override_stat", "5:6:1777");
        let f = fx.run();
        assert!(f.is_empty(), "{f:#?}");
    }

    #[test]
    fn whiteout_files_must_be_empty_and_hide_a_lower_name() {
        let fx = fixture("whfile");
        std::fs::write(fx.u(".wh.x"), "not empty").unwrap();
        expect_one(&fx.run(), ".wh.x", "not an empty regular file");

        let fx = fixture("whnolower");
        std::fs::write(fx.u(".wh.nothere"), "").unwrap();
        expect_one(&fx.run(), ".wh.nothere", "no lower layer has");

        // d/sub exists in the lower, but not d/sub/z: and an upper-only dir hides nothing.
        let fx = fixture("whdeep");
        std::fs::create_dir_all(fx.u("d/sub")).unwrap();
        std::fs::write(fx.u("d/sub/.wh.z"), "").unwrap();
        expect_one(&fx.run(), "d/sub/.wh.z", "no lower layer has");

        let fx = fixture("whdir");
        std::fs::create_dir(fx.u(".wh.x")).unwrap();
        expect_one(&fx.run(), ".wh.x", "not an empty regular file");
    }

    #[test]
    fn whiteout_and_the_name_it_hides_cannot_coexist() {
        let fx = fixture("whboth");
        std::fs::write(fx.u(".wh.x"), "").unwrap();
        std::fs::write(fx.u("x"), "back").unwrap();
        expect_one(&fx.run(), ".wh.x", "also present");
    }

    #[test]
    fn whiteout_of_a_wh_name_is_refused() {
        let fx = fixture("whwh");
        std::fs::write(fx.lower.join(".wh.q"), "").unwrap();
        std::fs::write(fx.u(".wh..wh.q"), "").unwrap();
        let f = fx.run();
        assert!(
            f.iter()
                .any(|f| f.path == ".wh..wh.q" && f.problem.contains("starting with .wh.")),
            "{f:#?}"
        );
    }

    #[test]
    fn whiteout_over_a_symlinked_lower_parent_hides_nothing() {
        // lower/l -> d: d/y exists through the link, but l/y is not a path of that layer.
        let fx = fixture("whsym");
        std::os::unix::fs::symlink("d", fx.lower.join("l")).unwrap();
        std::fs::create_dir(fx.u("l")).unwrap();
        std::fs::write(fx.u("l/.wh.y"), "").unwrap();
        expect_one(&fx.run(), "l/.wh.y", "no lower layer has");
    }

    #[test]
    fn opaque_markers_are_well_formed() {
        let fx = fixture("opqval");
        std::fs::create_dir(fx.u("d")).unwrap();
        fx.xattr("d", "user.fuseoverlayfs.opaque", "yes");
        expect_one(&fx.run(), "d", "not \"y\"");

        let fx = fixture("opqfile");
        std::fs::write(fx.u("f"), "").unwrap();
        fx.xattr("f", "user.overlay.opaque", "y");
        expect_one(&fx.run(), "f", "on a non-directory");

        let fx = fixture("opqdir");
        std::fs::create_dir_all(fx.u("d/.wh..wh..opq")).unwrap();
        expect_one(&fx.run(), "d/.wh..wh..opq", "not an empty regular file");

        let fx = fixture("opqdata");
        std::fs::create_dir(fx.u("d")).unwrap();
        std::fs::write(fx.u("d/.wh..wh..opq"), "x").unwrap();
        expect_one(&fx.run(), "d/.wh..wh..opq", "not an empty regular file");
    }

    #[test]
    fn override_stat_values_parse_and_match_the_entry() {
        let cases = [
            ("f", "1:2", "does not parse"),
            ("f", "1:2:9z", "does not parse"),
            ("f", "a:2:644", "does not parse"),
            ("f", "1:2:100644", "beyond 07777"),
            ("f", "1:2:644:weird", "is not one of"),
            ("f", "1:2:644:char-1", "is not one of"),
            ("f", "1:2:755:dir", "does not match"),
            ("d", "1:2:644:file", "does not match"),
            ("d", "1:2:644:pipe", "does not match"),
            ("f", "1:2:777:symlink", "does not match"),
        ];
        for (i, (what, value, problem)) in cases.iter().enumerate() {
            let fx = fixture(&format!("ovr{i}"));
            if *what == "d" {
                std::fs::create_dir(fx.u("d")).unwrap();
            } else {
                std::fs::write(fx.u("f"), "").unwrap();
            }
            fx.xattr(what, "user.containers.override_stat", value);
            expect_one(&fx.run(), what, problem);
        }
    }

    #[test]
    fn internal_temporary_names_and_work_leftovers_are_reported() {
        let fx = fixture("tmp");
        std::fs::write(fx.u("#1f2e-a"), "").unwrap();
        std::fs::create_dir(fx.u("#12")).unwrap();
        std::fs::write(fx.u(".rustfuse-whiteout-probe"), "").unwrap();
        std::fs::write(fx.u("#not-temp"), "").unwrap();
        std::fs::write(fx.work.join("work/#1f2e-b"), "").unwrap();
        let mut f = fx.run();
        f.sort_by(|a, b| a.path.cmp(&b.path));
        let paths: Vec<&str> = f.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "#12",
                "#1f2e-a",
                ".rustfuse-whiteout-probe",
                "workdir/work/#1f2e-b"
            ],
            "{f:#?}"
        );
    }

    #[test]
    fn device_whiteouts_hide_a_lower_name() {
        if !crate::env::require_privileged() {
            return;
        }
        let mk = |p: &Path| {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                p,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::empty(),
                0,
            )
            .unwrap()
        };
        let fx = fixture("dev");
        std::fs::create_dir(fx.u("d")).unwrap();
        mk(&fx.u("x"));
        mk(&fx.u("d/y"));
        mk(&fx.u("d/sub"));
        let f = fx.run();
        assert!(f.is_empty(), "{f:#?}");
        mk(&fx.u("d/nothere"));
        expect_one(&fx.run(), "d/nothere", "no lower layer has");
        // A whiteout in the lower hides the name there: a whiteout over it hides nothing.
        mk(&fx.lower.join("gone"));
        mk(&fx.u("gone"));
        let f = fx.run();
        assert!(f.iter().any(|f| f.path == "gone"), "{f:#?}");
    }
}
