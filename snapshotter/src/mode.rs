//! Choosing the mount mode at start-up, and the findings `doctor` prints.
//!
//! Kernel overlayfs is used when a trial mount (two lowers, upper, work) in the snapshotter
//! root succeeds; `index=off` is added when the kernel has the parameter, and in a user
//! namespace the mount must take `userxattr` (Linux 5.11+). Otherwise `fuse3.rustfuse` mounts.
//!
//! Layers written in FUSE mode may hold directory redirects ([`crate::redirects`]). When some
//! do, kernel overlayfs is used only if a second trial mount with `redirect_dir=follow` shows
//! the kernel following a redirect (never judged by kernel version; the kernel refuses the
//! option together with `userxattr`, so never in a user namespace); the mounts then carry
//! `redirect_dir=follow`. Otherwise `--mode auto` keeps FUSE mode and `--mode overlay`
//! refuses to start, both naming the snapshots.

use std::ffi::CString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::error::{Error, Result};
use crate::mounts::{KERNEL_REDIRECT_FOLLOW, MountMode};
use crate::redirects::{self, Holder};

/// The `--mode` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// Kernel overlayfs when a trial mount succeeds, else FUSE.
    Auto,
    /// Kernel overlayfs; refuse to start if the trial mount fails.
    Overlay,
    /// Always `fuse3.rustfuse` mounts.
    Fuse,
}

/// The FUSE program; mounts are typed `fuse3.<this>` and containerd runs it through
/// `mount.fuse3`.
pub const FUSE_PROGRAM: &str = "rustfuse";

/// One attempted trial mount.
#[derive(Debug, Clone)]
pub struct Trial {
    pub options: String,
    pub result: std::result::Result<(), String>,
}

/// What the machine offers.
#[derive(Debug, Clone)]
pub struct Findings {
    pub kernel: String,
    pub euid: u32,
    pub in_user_namespace: bool,
    pub overlay_in_proc: bool,
    pub index_param: bool,
    pub dev_fuse: bool,
    pub fuse_program: Option<PathBuf>,
    pub mount_fuse3: Option<PathBuf>,
    pub trials: Vec<Trial>,
    /// The kernel mode the trial showed works, if any.
    pub kernel_overlay: Option<MountMode>,
    /// With a working kernel mode: the trial of it with `redirect_dir=follow`, which passes
    /// only when the merged view shows a redirected directory's lower content.
    pub follow_trial: Option<Trial>,
    /// What keeps the root's filesystem's metadata in order (rustfuse then syncs copy-ups in
    /// the background), or why it is not known to (it syncs them before answering).
    pub metadata_order: std::result::Result<&'static str, String>,
}

impl Findings {
    /// The kernel mounts follow directory redirects when asked to (`redirect_dir=follow`).
    pub fn kernel_follows(&self) -> bool {
        self.follow_trial.as_ref().is_some_and(|t| t.result.is_ok())
    }
}

/// Where `prog` is: PATH, then the sbin/bin directories (also the snapshotter tests' and
/// benchmark's lookup of the programs they run).
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// True unless the uid map is the initial namespace's identity map.
pub fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let f: Vec<&str> = map.split_whitespace().collect();
            !(f.len() == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295")
        }
        Err(_) => false,
    }
}

/// How many ids a `/proc/self/{uid,gid}_map` maps.
fn mapped_ids(file: &str) -> u64 {
    std::fs::read_to_string(file)
        .map(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Probe the machine; trial mounts happen in a scratch directory under `root`.
pub fn probe(root: &Path) -> Findings {
    let uname = rustix::system::uname();
    let kernel = uname.release().to_string_lossy().into_owned();
    let in_userns = in_user_namespace();
    let index_param = Path::new("/sys/module/overlay/parameters/index").exists();
    let overlay_in_proc = std::fs::read_to_string("/proc/filesystems")
        .map(|s| s.lines().any(|l| l.trim_end().ends_with("\toverlay")))
        .unwrap_or(false);
    let mut f = Findings {
        kernel,
        euid: rustix::process::geteuid().as_raw(),
        in_user_namespace: in_userns,
        overlay_in_proc,
        index_param,
        dev_fuse: Path::new("/dev/fuse").exists(),
        fuse_program: which(FUSE_PROGRAM),
        mount_fuse3: which("mount.fuse3"),
        trials: Vec::new(),
        kernel_overlay: None,
        follow_trial: None,
        metadata_order: std::fs::File::open(root)
            .map_err(|e| format!("{}: {e}", root.display()))
            .and_then(|d| rustfuse::sys::metadata_order(std::os::fd::AsFd::as_fd(&d))),
    };
    // In a user namespace only with userxattr: the trusted.* xattrs of opaque directories and
    // redirects cannot be written there. A kernel without the option (before 5.11) that still
    // mounts overlayfs in a user namespace (Ubuntu's 4.15 and 5.4 do) makes layers it cannot
    // mark opaque: FUSE mode then. Outside one, never with userxattr.
    let candidates: Vec<bool> = vec![in_userns];
    for userxattr in candidates {
        let mode = MountMode::Overlay {
            index_off: index_param,
            userxattr,
            redirect_follow: false,
        };
        let (options, result) = trial_mount(root, index_param, userxattr, false);
        let ok = result.is_ok();
        f.trials.push(Trial { options, result });
        if ok {
            f.kernel_overlay = Some(mode);
            let (options, result) = trial_mount(root, index_param, userxattr, true);
            f.follow_trial = Some(Trial { options, result });
            break;
        }
    }
    f
}

/// A trial overlay mount in a scratch directory under `root`: the merged view must show a
/// lower file and take a write. With `redirect_follow` it carries `redirect_dir=follow` and
/// the upper holds a directory redirected (by the xattr rustfuse would write: `trusted.`, or
/// `user.` with `userxattr`) to a lower one, whose file the merged view must show.
fn trial_mount(
    root: &Path,
    index_off: bool,
    userxattr: bool,
    redirect_follow: bool,
) -> (String, std::result::Result<(), String>) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = root.join(format!("trial-{}-{nanos}", std::process::id()));
    let mut opts = Vec::new();
    if index_off {
        opts.push("index=off".to_string());
    }
    if userxattr {
        opts.push("userxattr".to_string());
    }
    if redirect_follow {
        opts.push(KERNEL_REDIRECT_FOLLOW.to_string());
    }
    opts.push(format!(
        "lowerdir={}",
        rustfuse::options::join_lowerdirs(&[dir.join("l2"), dir.join("l1")])
    ));
    opts.push(format!("upperdir={}", dir.join("u").display()));
    opts.push(format!("workdir={}", dir.join("w").display()));
    let options = opts.join(",");
    let shown = opts[..opts.len() - 3]
        .iter()
        .map(String::as_str)
        .chain(["lowerdir=L2:L1", "upperdir=U", "workdir=W"])
        .collect::<Vec<_>>()
        .join(",");
    let result = (|| -> std::result::Result<(), String> {
        for d in ["l1", "l2", "u", "w", "m"] {
            std::fs::create_dir_all(dir.join(d))
                .map_err(|e| format!("create {}: {e}", dir.join(d).display()))?;
        }
        std::fs::write(dir.join("l1/f"), b"1").map_err(|e| format!("write: {e}"))?;
        if redirect_follow {
            // u/moved is l1/d renamed: a redirect to its old name.
            std::fs::create_dir(dir.join("l1/d")).map_err(|e| format!("mkdir: {e}"))?;
            std::fs::write(dir.join("l1/d/f"), b"1").map_err(|e| format!("write: {e}"))?;
            std::fs::create_dir(dir.join("u/moved")).map_err(|e| format!("mkdir: {e}"))?;
            let xattr = redirects::REDIRECT_XATTRS[usize::from(userxattr)];
            rustix::fs::setxattr(
                dir.join("u/moved"),
                xattr,
                b"d",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| format!("set {xattr}: {e}"))?;
        }
        let data = CString::new(options.clone()).map_err(|e| e.to_string())?;
        rustix::mount::mount(
            "overlay",
            dir.join("m").as_path(),
            "overlay",
            MountFlags::empty(),
            data.as_c_str(),
        )
        .map_err(|e| format!("mount: {e}"))?;
        // The merged view must show the lower file and take a write.
        let check = std::fs::read(dir.join("m/f"))
            .map_err(|e| format!("read through the overlay: {e}"))
            .and_then(|_| {
                std::fs::write(dir.join("m/g"), b"2")
                    .map_err(|e| format!("write through the overlay: {e}"))
            })
            .and_then(|()| {
                if !redirect_follow {
                    return Ok(());
                }
                std::fs::read(dir.join("m/moved/f"))
                    .map(drop)
                    .map_err(|e| format!("read below a redirected directory: {e}"))
            });
        let _ = rustix::mount::unmount(dir.join("m").as_path(), UnmountFlags::DETACH);
        check
    })();
    let _ = std::fs::remove_dir_all(&dir);
    (shown, result)
}

/// Pick the mode for `choice`, given the snapshots whose layers hold directory redirects;
/// the string says why.
pub fn choose(choice: ModeChoice, f: &Findings, holders: &[Holder]) -> Result<(MountMode, String)> {
    let fuse = MountMode::Fuse {
        program: FUSE_PROGRAM.to_string(),
    };
    let failed = || {
        f.trials
            .iter()
            .filter_map(|t| {
                t.result
                    .as_ref()
                    .err()
                    .map(|e| format!("[{}] {e}", t.options))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let trial_ok = "a trial kernel overlay mount in the root succeeded";
    match (choice, &f.kernel_overlay) {
        (ModeChoice::Fuse, _) => Ok((fuse, "--mode fuse was given".to_string())),
        (ModeChoice::Overlay | ModeChoice::Auto, Some(m)) if holders.is_empty() => {
            Ok((m.clone(), trial_ok.to_string()))
        }
        (ModeChoice::Overlay | ModeChoice::Auto, Some(m)) => {
            let MountMode::Overlay {
                index_off,
                userxattr,
                ..
            } = *m
            else {
                unreachable!("the kernel mode is an overlay mode")
            };
            let held = format!(
                "snapshots {} hold directory redirects written in FUSE mode",
                redirects::describe(holders)
            );
            if f.kernel_follows() {
                return Ok((
                    MountMode::Overlay {
                        index_off,
                        userxattr,
                        redirect_follow: true,
                    },
                    format!(
                        "{trial_ok}, and one with {KERNEL_REDIRECT_FOLLOW}, which the mounts carry: {held}"
                    ),
                ));
            }
            let trial = match &f.follow_trial {
                Some(Trial {
                    options,
                    result: Err(e),
                }) => format!("[{options}] {e}"),
                _ => "no trial".to_string(),
            };
            let userns = if userxattr {
                "; the kernel refuses redirect_dir=follow together with userxattr, which a user namespace needs"
            } else {
                ""
            };
            let why = format!(
                "{held}, and kernel overlayfs cannot follow them here (the trial mount with {KERNEL_REDIRECT_FOLLOW} failed: {trial}{userns})"
            );
            match choice {
                ModeChoice::Overlay => Err(Error::Unavailable(format!(
                    "--mode overlay: {why}; start with --mode fuse or auto"
                ))),
                _ => Ok((fuse, why)),
            }
        }
        (ModeChoice::Overlay, None) => Err(Error::Unavailable(format!(
            "--mode overlay: the trial kernel overlay mount failed: {}",
            failed()
        ))),
        (ModeChoice::Auto, None) => Ok((
            fuse,
            format!("the trial kernel overlay mount failed ({})", failed()),
        )),
    }
}

/// The human-readable report `doctor` prints; `holders` are the snapshots whose layers hold
/// directory redirects, or why they could not be read.
pub fn report(
    root: &Path,
    f: &Findings,
    choice: ModeChoice,
    holders: &std::result::Result<Vec<Holder>, String>,
) -> String {
    let mut out = String::new();
    let yn = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(out, "root:                 {}", root.display());
    let _ = writeln!(out, "kernel:               {}", f.kernel);
    let _ = writeln!(out, "effective uid:        {}", f.euid);
    let _ = writeln!(out, "user namespace:       {}", yn(f.in_user_namespace));
    if f.in_user_namespace {
        for (what, file, tool) in [
            ("uid", "/proc/self/uid_map", "/etc/subuid"),
            ("gid", "/proc/self/gid_map", "/etc/subgid"),
        ] {
            let n = mapped_ids(file);
            let _ = writeln!(out, "mapped {what}s:          {n}");
            if n <= 1 {
                let _ = writeln!(
                    out,
                    "warning:              only one {what} is mapped: no {tool} range for this user? Files owned by other {what}s (as in most images) cannot be created; add one (e.g. `usermod --add-sub{what}s 100000-165535 USER`) and start the namespace again"
                );
            }
        }
    }
    let _ = writeln!(out, "overlay filesystem:   {}", yn(f.overlay_in_proc));
    let _ = writeln!(out, "overlay index param:  {}", yn(f.index_param));
    let _ = writeln!(out, "/dev/fuse:            {}", yn(f.dev_fuse));
    let show = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not found".into())
    };
    let _ = writeln!(out, "{FUSE_PROGRAM} program:     {}", show(&f.fuse_program));
    let _ = writeln!(out, "mount.fuse3:          {}", show(&f.mount_fuse3));
    for t in &f.trials {
        let r = match &t.result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        let _ = writeln!(out, "trial overlay mount:  [{}] {r}", t.options);
    }
    if let Some(t) = &f.follow_trial {
        let r = match &t.result {
            Ok(()) => "ok: the kernel follows directory redirects".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        let _ = writeln!(out, "trial follow mount:   [{}] {r}", t.options);
    }
    let sync = match &f.metadata_order {
        Ok(by) => format!("in the background ({by} keeps the order of the root's metadata)"),
        Err(why) => format!(
            "before answering each copy-up, as kernel overlayfs (the root is on {why}, not known to keep its metadata in order)"
        ),
    };
    let _ = writeln!(out, "FUSE copy-up syncs:   {sync}");
    let none = Vec::new();
    let held = match holders {
        Ok(h) if h.is_empty() => {
            let _ = writeln!(out, "redirected layers:    none");
            h
        }
        Ok(h) => {
            let _ = writeln!(
                out,
                "redirected layers:    {} snapshot(s): {}",
                h.len(),
                redirects::describe(h)
            );
            h
        }
        Err(e) => {
            let _ = writeln!(out, "redirected layers:    unknown: {e}");
            &none
        }
    };
    match choose(choice, f, held) {
        Ok((m, why)) => {
            let _ = writeln!(out, "mode:                 {} ({why})", m.name());
            let redirect = match (&m, m.redirect_dir()) {
                (MountMode::Fuse { .. }, _) => {
                    "on (FUSE mode: rustfuse renames a directory with lower content by writing a redirect, and follows redirects)".to_string()
                }
                (_, Some(o)) => format!(
                    "{} (kernel overlay mounts follow the redirects FUSE-mode layers hold, and write none)",
                    o.trim_start_matches("redirect_dir=")
                ),
                (_, None) => "not set (no layer holds directory redirects; kernel overlay mounts write none: a rename of a directory with lower content answers EXDEV and is copied)".to_string(),
            };
            let _ = writeln!(out, "redirect_dir:         {redirect}");
            if let MountMode::Fuse { .. } = m {
                if !f.dev_fuse {
                    let _ = writeln!(out, "warning:              /dev/fuse is missing");
                }
                if f.fuse_program.is_none() || f.mount_fuse3.is_none() {
                    let _ = writeln!(
                        out,
                        "warning:              containerd mounts fuse3.{FUSE_PROGRAM} through mount.fuse3, which runs {FUSE_PROGRAM}: both must be on PATH"
                    );
                }
            }
        }
        Err(e) => {
            let _ = writeln!(out, "mode:                 none: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(kernel: Option<bool>, follow: Option<bool>) -> Findings {
        let trial = |ok: bool, options: &str| Trial {
            options: options.to_string(),
            result: if ok {
                Ok(())
            } else {
                Err("mount: Invalid argument (os error 22)".to_string())
            },
        };
        let userxattr = follow == Some(false);
        Findings {
            kernel: "6.18".into(),
            euid: 0,
            in_user_namespace: userxattr,
            overlay_in_proc: true,
            index_param: true,
            dev_fuse: true,
            fuse_program: Some("/usr/bin/rustfuse".into()),
            mount_fuse3: Some("/usr/sbin/mount.fuse3".into()),
            trials: kernel
                .map(|ok| trial(ok, "index=off,lowerdir=L2:L1,upperdir=U,workdir=W"))
                .into_iter()
                .collect(),
            kernel_overlay: (kernel == Some(true)).then_some(MountMode::Overlay {
                index_off: true,
                userxattr,
                redirect_follow: false,
            }),
            metadata_order: Ok("ext4's journal"),
            follow_trial: follow.map(|ok| {
                trial(
                    ok,
                    "index=off,userxattr,redirect_dir=follow,lowerdir=L2:L1,upperdir=U,workdir=W",
                )
            }),
        }
    }

    fn held() -> Vec<Holder> {
        vec![
            Holder {
                key: "ns/1/sha256:aaa".into(),
                count: Some(2),
            },
            Holder {
                key: "ns/1/active".into(),
                count: None,
            },
        ]
    }

    #[test]
    fn no_redirects_no_follow_option() {
        let f = findings(Some(true), Some(true));
        for choice in [ModeChoice::Auto, ModeChoice::Overlay] {
            let (m, _) = choose(choice, &f, &[]).unwrap();
            assert_eq!(m.redirect_dir(), None, "{choice:?}");
        }
        let (m, why) = choose(ModeChoice::Fuse, &f, &held()).unwrap();
        assert_eq!(m.name(), "fuse");
        assert_eq!(m.redirect_dir(), Some("redirect_dir=on"));
        assert_eq!(why, "--mode fuse was given");
    }

    #[test]
    fn redirects_and_a_following_kernel_mount_with_follow() {
        let f = findings(Some(true), Some(true));
        for choice in [ModeChoice::Auto, ModeChoice::Overlay] {
            let (m, why) = choose(choice, &f, &held()).unwrap();
            assert_eq!(m.name(), "overlay");
            assert_eq!(m.redirect_dir(), Some("redirect_dir=follow"));
            assert!(why.contains("\"ns/1/sha256:aaa\" (2 redirected"), "{why}");
        }
    }

    #[test]
    fn redirects_the_kernel_cannot_follow_keep_fuse_mode() {
        let f = findings(Some(true), Some(false));
        let (m, why) = choose(ModeChoice::Auto, &f, &held()).unwrap();
        assert_eq!(m.name(), "fuse");
        for want in [
            "\"ns/1/sha256:aaa\"",
            "\"ns/1/active\" (active",
            "redirect_dir=follow failed",
            "together with userxattr",
        ] {
            assert!(why.contains(want), "{want:?} in {why}");
        }
        let e = choose(ModeChoice::Overlay, &f, &held()).unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("--mode overlay") && e.contains("\"ns/1/active\""),
            "{e}"
        );
        // Without redirects the same machine mounts kernel overlays.
        assert_eq!(
            choose(ModeChoice::Overlay, &f, &[]).unwrap().0.name(),
            "overlay"
        );
    }

    #[test]
    fn no_kernel_overlay_is_fuse_whatever_the_layers() {
        let f = findings(Some(false), None);
        assert_eq!(
            choose(ModeChoice::Auto, &f, &held()).unwrap().0.name(),
            "fuse"
        );
        assert!(choose(ModeChoice::Overlay, &f, &held()).is_err());
    }

    #[test]
    fn report_names_the_redirect_setting() {
        let root = Path::new("/r");
        let r = report(
            root,
            &findings(Some(true), Some(true)),
            ModeChoice::Fuse,
            &Ok(held()),
        );
        assert!(r.contains("redirect_dir:         on (FUSE mode"), "{r}");
        assert!(
            r.contains("FUSE copy-up syncs:   in the background (ext4's journal keeps"),
            "{r}"
        );
        let mut f = findings(Some(true), Some(true));
        f.metadata_order = Err("an ext2/3/4 without a journal".into());
        let r = report(root, &f, ModeChoice::Fuse, &Ok(held()));
        assert!(
            r.contains("FUSE copy-up syncs:   before answering each copy-up, as kernel overlayfs (the root is on an ext2/3/4 without a journal"),
            "{r}"
        );
        assert!(
            r.contains("redirected layers:    2 snapshot(s): \"ns/1/sha256:aaa\""),
            "{r}"
        );
        let r = report(
            root,
            &findings(Some(true), Some(true)),
            ModeChoice::Auto,
            &Ok(held()),
        );
        assert!(r.contains("mode:                 overlay"), "{r}");
        assert!(
            r.contains("redirect_dir:         follow (kernel overlay mounts follow"),
            "{r}"
        );
        assert!(r.contains("trial follow mount:   ["), "{r}");
        let r = report(
            root,
            &findings(Some(true), Some(true)),
            ModeChoice::Auto,
            &Ok(vec![]),
        );
        assert!(r.contains("redirected layers:    none"), "{r}");
        assert!(r.contains("redirect_dir:         not set"), "{r}");
        let r = report(
            root,
            &findings(Some(true), Some(false)),
            ModeChoice::Auto,
            &Ok(held()),
        );
        assert!(r.contains("mode:                 fuse (snapshots"), "{r}");
        assert!(r.contains("redirect_dir:         on (FUSE mode"), "{r}");
        let r = report(
            root,
            &findings(Some(true), Some(false)),
            ModeChoice::Overlay,
            &Ok(held()),
        );
        assert!(
            r.contains("mode:                 none: --mode overlay: snapshots"),
            "{r}"
        );
        let r = report(
            root,
            &findings(Some(true), Some(true)),
            ModeChoice::Auto,
            &Err("the store is in use".into()),
        );
        assert!(
            r.contains("redirected layers:    unknown: the store is in use"),
            "{r}"
        );
    }
}
