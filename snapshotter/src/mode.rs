//! Choosing the mount mode at start-up, and the findings `doctor` prints.
//!
//! Kernel overlayfs is used when a trial mount (two lowers, upper, work) in the snapshotter
//! root succeeds; `index=off` is added when the kernel has the parameter, and in a user
//! namespace the mount must take `userxattr` (Linux 5.11+). Otherwise `fuse3.rustfuse` mounts.

use std::ffi::CString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::error::{Error, Result};
use crate::mounts::MountMode;

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
        };
        let (options, result) = trial_mount(root, index_param, userxattr);
        let ok = result.is_ok();
        f.trials.push(Trial { options, result });
        if ok {
            f.kernel_overlay = Some(mode);
            break;
        }
    }
    f
}

fn trial_mount(
    root: &Path,
    index_off: bool,
    userxattr: bool,
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
            });
        let _ = rustix::mount::unmount(dir.join("m").as_path(), UnmountFlags::DETACH);
        check
    })();
    let _ = std::fs::remove_dir_all(&dir);
    (shown, result)
}

/// Pick the mode for `choice`; the string says why.
pub fn choose(choice: ModeChoice, f: &Findings) -> Result<(MountMode, String)> {
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
    match (choice, &f.kernel_overlay) {
        (ModeChoice::Overlay, Some(m)) | (ModeChoice::Auto, Some(m)) => Ok((
            m.clone(),
            "a trial kernel overlay mount in the root succeeded".to_string(),
        )),
        (ModeChoice::Overlay, None) => Err(Error::Unavailable(format!(
            "--mode overlay: the trial kernel overlay mount failed: {}",
            failed()
        ))),
        (ModeChoice::Auto, None) => Ok((
            fuse,
            format!("the trial kernel overlay mount failed ({})", failed()),
        )),
        (ModeChoice::Fuse, _) => Ok((fuse, "--mode fuse was given".to_string())),
    }
}

/// The human-readable report `doctor` prints.
pub fn report(root: &Path, f: &Findings, choice: ModeChoice) -> String {
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
    match choose(choice, f) {
        Ok((m, why)) => {
            let _ = writeln!(out, "mode:                 {} ({why})", m.name());
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
