//! `rustfuse`: the overlay mount program, a drop-in for fuse-overlayfs.
//!
//! `rustfuse [-f] [-d] [-V] [-h] -o OPTS [SOURCE...] MOUNTPOINT`
//!
//! Lifecycle: parse → check the layers (init) → mount and answer INIT (mounted) → tell the
//! caller and detach → serve → unmounted (stopped). Exit status 0 means the mount is live.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rustfuse::fuse::OverlayFs;
use rustfuse::options::{self, OverlayOptions};
use rustfuse::overlay::{self as overlay, Overlay};
use rustfuse::sys;

const USAGE: &str = "usage: rustfuse [-f] [-d] [-V] [-h] -o lowerdir=A[:B...][,upperdir=U,workdir=W][,OPTS] [SOURCE...] MOUNTPOINT";

struct Cli {
    foreground: bool,
    debug: bool,
    option_strings: Vec<String>,
    source: Option<String>,
    mountpoint: PathBuf,
}

enum Parsed {
    Run(Cli),
    Exit(ExitCode),
}

fn prog_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "rustfuse".into())
}

fn parse_cli(args: Vec<OsString>) -> Result<Parsed, String> {
    let mut foreground = false;
    let mut debug = false;
    let mut option_strings = Vec::new();
    let mut positionals: Vec<String> = Vec::new();
    let mut it = args.into_iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        match a.as_str() {
            "-f" => foreground = true,
            "-d" | "--debug" => {
                debug = true;
                foreground = true;
            }
            "-s" => {}
            // mount(8)'s read-only flag, as fuse-overlayfs takes it.
            "-r" => option_strings.push("ro".into()),
            "-w" => option_strings.push("rw".into()),
            "-V" | "--version" => {
                println!("rustfuse: version {}", env!("CARGO_PKG_VERSION"));
                println!(
                    "fuse-overlayfs: compatible (rustfuse {})",
                    env!("CARGO_PKG_VERSION")
                );
                return Ok(Parsed::Exit(ExitCode::SUCCESS));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                println!(
                    "options: see `man fuse-overlayfs`; every fuse-overlayfs option is accepted"
                );
                return Ok(Parsed::Exit(ExitCode::SUCCESS));
            }
            "-o" => match it.next() {
                Some(o) => option_strings.push(o),
                None => return Err("option -o: needs a value".into()),
            },
            s if s.starts_with("-o") && s.len() > 2 => option_strings.push(s[2..].to_string()),
            s if s.starts_with('-') && s.len() > 1 => {
                eprintln!("{}: unknown argument ignored: {s}", prog_name());
            }
            _ => positionals.push(a),
        }
    }
    let Some(mountpoint) = positionals.pop() else {
        return Err(format!("no mountpoint given\n{USAGE}"));
    };
    Ok(Parsed::Run(Cli {
        foreground,
        debug,
        option_strings,
        source: positionals.first().cloned(),
        mountpoint: PathBuf::from(mountpoint),
    }))
}

/// Checks that need the disk, before anything is mounted.
fn check_paths(o: &OverlayOptions, mountpoint: &Path) -> Result<(), String> {
    for l in &o.lowerdirs {
        match std::fs::metadata(l) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("option lowerdir: {}: not a directory", l.display())),
            Err(e) => return Err(format!("option lowerdir: {}: {e}", l.display())),
        }
    }
    for (name, p) in [("upperdir", &o.upperdir), ("workdir", &o.workdir)] {
        if let Some(p) = p {
            match std::fs::metadata(p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("option {name}: {}: not a directory", p.display())),
                Err(e) => return Err(format!("option {name}: {}: {e}", p.display())),
            }
        }
    }
    if !mountpoint.starts_with("/dev/fd/") {
        match std::fs::metadata(mountpoint) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "mountpoint {}: not a directory",
                    mountpoint.display()
                ));
            }
            Err(e) => return Err(format!("mountpoint {}: {e}", mountpoint.display())),
        }
    }
    Ok(())
}

/// How the kernel mount is made: the `fd=`-less part of mount(2)'s data, its flags, and
/// fuser's equivalent for the fusermount3 fallback.
struct MountPlan {
    data: Vec<String>,
    flags: rustix::mount::MountFlags,
    fuser_opts: Vec<fuser::MountOption>,
    acl: fuser::SessionACL,
}

fn mount_plan(o: &OverlayOptions, source: &str, subtype: &str) -> MountPlan {
    use fuser::MountOption as M;
    use rustix::mount::MountFlags as F;
    let root = sys::geteuid() == 0;
    let mut words: Vec<String> = if root {
        ["default_permissions", "allow_other", "suid", "noatime"]
            .map(String::from)
            .to_vec()
    } else {
        ["default_permissions", "noatime"]
            .map(String::from)
            .to_vec()
    };
    words.extend(o.mount_flags.iter().cloned());
    // Later words win within a group (suid/nosuid, dev/nodev, ...).
    let mut groups: std::collections::BTreeMap<&str, &str> = Default::default();
    for w in &words {
        let g = match w.as_str() {
            "suid" | "nosuid" => "suid",
            "dev" | "nodev" => "dev",
            "exec" | "noexec" => "exec",
            "atime" | "noatime" | "strictatime" | "relatime" | "norelatime" => "atime",
            "diratime" | "nodiratime" => "diratime",
            "sync" | "async" => "sync",
            other => other,
        };
        groups.insert(g, w.as_str());
    }
    let mut data = Vec::new();
    let mut flags = F::empty();
    let mut fuser_opts = vec![
        M::FSName(source.to_string()),
        M::Subtype(subtype.to_string()),
    ];
    let mut acl = fuser::SessionACL::Owner;
    if groups.get("dev") != Some(&"dev") {
        flags |= F::NODEV;
    } else {
        fuser_opts.push(M::Dev);
    }
    if groups.get("suid") != Some(&"suid") {
        flags |= F::NOSUID;
    } else {
        fuser_opts.push(M::Suid);
    }
    for w in groups.values() {
        match *w {
            "default_permissions" => {
                data.push("default_permissions".into());
                fuser_opts.push(M::DefaultPermissions);
            }
            "allow_other" => acl = fuser::SessionACL::All,
            "allow_root" if acl != fuser::SessionACL::All => acl = fuser::SessionACL::RootAndOwner,
            "noexec" => {
                flags |= F::NOEXEC;
                fuser_opts.push(M::NoExec);
            }
            "noatime" => {
                flags |= F::NOATIME;
                fuser_opts.push(M::NoAtime);
            }
            "nodiratime" => flags |= F::NODIRATIME,
            "relatime" => flags |= F::RELATIME,
            "strictatime" => flags |= F::STRICTATIME,
            "sync" => {
                flags |= F::SYNCHRONOUS;
                fuser_opts.push(M::Sync);
            }
            "dirsync" => {
                flags |= F::DIRSYNC;
                fuser_opts.push(M::DirSync);
            }
            _ => {}
        }
    }
    if acl == fuser::SessionACL::All {
        data.push("allow_other".into());
    }
    if o.read_only || o.upperdir.is_none() {
        flags |= F::RDONLY;
        fuser_opts.push(M::RO);
    }
    // context= is understood by SELinux, which takes it before FUSE sees the options; where
    // SELinux is off FUSE would refuse it, so it is left out there.
    if let Some(ctx) = &o.context {
        if Path::new("/sys/fs/selinux/enforce").exists() {
            data.push(format!("context=\"{ctx}\""));
            fuser_opts.push(M::CUSTOM(format!("context=\"{ctx}\"")));
        }
    }
    MountPlan {
        data,
        flags,
        fuser_opts,
        acl,
    }
}

/// Why an unprivileged mount may have failed: what is missing on this host.
fn unprivileged_hint() -> String {
    let mut missing = Vec::new();
    if rustix::fs::access(
        "/dev/fuse",
        rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
    )
    .is_err()
    {
        missing.push("/dev/fuse is not readable and writable by this user".to_string());
    }
    let fm = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("fusermount3"))
                .find(|p| p.exists())
        })
        .unwrap_or(None);
    match fm {
        None => missing.push(
            "no fusermount3 on PATH (Debian/Ubuntu: apt install fuse3; RHEL: dnf install fuse3)"
                .into(),
        ),
        Some(p) => {
            use std::os::unix::fs::PermissionsExt;
            let setuid = std::fs::metadata(&p)
                .map(|m| m.permissions().mode() & 0o4000 != 0)
                .unwrap_or(false);
            if !setuid {
                missing.push(format!("{} is not setuid root", p.display()));
            }
        }
    }
    if sys::geteuid() != 0 && !Path::new("/proc/self/uid_map").exists() {
        missing.push("user namespaces are not available".into());
    }
    if missing.is_empty() {
        "mount(2) was refused and fusermount3 failed".into()
    } else {
        format!("mount(2) was refused; {}", missing.join("; "))
    }
}

/// mount(2) with type `fuse.NAME`; `None` when not permitted (then fusermount3 is tried).
fn mount_direct(
    plan: &MountPlan,
    source: &str,
    subtype: &str,
    mp: &Path,
) -> Result<Option<std::os::fd::OwnedFd>, String> {
    let dev = match sys::open_dev_fuse() {
        Ok(d) => d,
        Err(sys::Errno::PERM) | Err(sys::Errno::ACCESS) => return Ok(None),
        Err(e) => return Err(format!("/dev/fuse: {e}")),
    };
    let rootmode = sys::mode_of(mp).map_err(|e| format!("mountpoint {}: {e}", mp.display()))?;
    let mut data = vec![
        format!("fd={}", std::os::fd::AsRawFd::as_raw_fd(&dev)),
        format!("rootmode={:o}", rootmode & libc::S_IFMT),
        format!("user_id={}", sys::getuid()),
        format!("group_id={}", sys::getgid()),
    ];
    data.extend(plan.data.iter().cloned());
    match sys::mount_fuse(
        source,
        mp,
        &format!("fuse.{subtype}"),
        plan.flags,
        &data.join(","),
    ) {
        Ok(()) => Ok(Some(dev)),
        Err(sys::Errno::PERM) => Ok(None),
        Err(e) => Err(format!("mount {}: {e}", mp.display())),
    }
}

/// The overlay's configuration: the options and what the environment asks for, read here
/// once (no module below `main` reads the environment).
fn config(opts: OverlayOptions) -> overlay::Config {
    let mut config = overlay::Config::new(opts);
    // Behave as Linux 4.18: the syscalls' limits (sys::Compat) and the FUSE protocol 7.27.
    if std::env::var_os("RUSTFUSE_COMPAT_4_18").is_some_and(|v| v != "0") {
        config.compat = sys::Compat::kernel_4_18();
    }
    // fuse-overlayfs's switch: whiteouts as `.wh.` files, never 0/0 devices.
    config.no_dev_whiteouts = std::env::var_os("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT").is_some();
    config
}

fn init_tracing(debug: bool) {
    // Colour codes only for a terminal: a detached daemon's stderr is a log.
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // RUSTFUSE_LOG takes filter directives; without it a plain level, which spares every
    // mount the directive parser's set-up.
    let _ = match std::env::var("RUSTFUSE_LOG") {
        Ok(filter) => fmt
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init(),
        Err(_) => fmt
            .with_max_level(if debug {
                tracing::Level::DEBUG
            } else {
                tracing::Level::WARN
            })
            .try_init(),
    };
}

fn main() -> ExitCode {
    let prog = prog_name();
    let cli = match parse_cli(std::env::args_os().skip(1).collect()) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Exit(code)) => return code,
        Err(msg) => {
            eprintln!("{prog}: {msg}");
            return ExitCode::from(1);
        }
    };
    let opts = match options::parse(&cli.option_strings) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{prog}: {e}");
            return ExitCode::from(1);
        }
    };
    for u in &opts.unknown {
        eprintln!("{prog}: unknown argument ignored: {u}");
    }
    if let Err(msg) = check_paths(&opts, &cli.mountpoint) {
        eprintln!("{prog}: {msg}");
        return ExitCode::from(1);
    }
    sys::raise_nofile_limit();
    init_tracing(cli.foreground && cli.debug);
    // In the background, as libfuse does: mount (and answer INIT) first, then fork; the
    // parent exits 0 once the mount is live, or 1 with the error, and the child serves.
    // Nothing before the fork starts a thread (the syncer's starts with the first deferred
    // copy-up).
    match run(&cli, opts, &prog, !cli.foreground) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("{prog}: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Descriptor table slots the serving process starts with: room for the directory fd cache
/// and the copies waiting for the syncer of a large `chmod -R`, without the table growing
/// while threads run (see [`sys::reserve_fds`]). 32 KiB of kernel memory.
const FD_TABLE_AT_START: u32 = 4096;

/// Mount and serve until unmounted. With `daemonize`, once the mount is live the process
/// forks: the parent exits 0 and the child, in a new session with stdio detached, serves.
fn run(cli: &Cli, opts: OverlayOptions, prog: &str, daemonize: bool) -> Result<(), String> {
    sys::tune_allocator();
    let threads = match opts.threaded {
        Some(false) => 1,
        _ => sys::cpus_allowed().clamp(2, 8) * 2,
    };
    let source = cli.source.clone().unwrap_or_else(|| prog.to_string());
    let plan = mount_plan(&opts, &source, prog);
    let config = config(opts);
    let kernel_4_18 = config.compat.is_kernel_4_18();
    sys::clear_umask();
    let ov = match Overlay::with_config(config) {
        Ok(o) => o,
        Err(e) => return Err(e.to_string()),
    };
    if cfg!(feature = "fault-injection") {
        // A fault planned from the start, for mounts whose xattrs cannot be set (read-only).
        if let Some(v) = std::env::var_os("RUSTFUSE_FAULT") {
            if ov.faults().plan(v.as_encoded_bytes()).is_err() {
                return Err(format!("RUSTFUSE_FAULT={v:?}: not OP:NTH:ERRNO or off"));
            }
        }
    }
    let mut fs = OverlayFs::new(ov, threads);
    let pacer = fs.pacer();
    if kernel_4_18 {
        fs.limit_capabilities(rustfuse::fuse::PROTO_7_27);
    }
    let acl = plan.acl;
    let mut config = fuser::Config::default();
    config.mount_options = plan.fuser_opts.clone();
    config.acl = acl;
    config.n_threads = Some(threads);
    // One device fd for every thread: a reply must reach the fd its request was read from,
    // and READs answered by splice write to the pacer's copy of the session's fd.
    config.clone_fd = false;
    let mp = cli.mountpoint.to_string_lossy();
    let session = if let Some(n) = mp.strip_prefix("/dev/fd/") {
        let fd = n
            .parse::<i32>()
            .map_err(|_| format!("mountpoint {mp}: not a file descriptor"))
            .and_then(|n| sys::own_fd(n).map_err(|e| format!("mountpoint {mp}: {e}")));
        match fd {
            Ok(fd) => fuser::Session::from_fd(fs, fd, acl, config),
            Err(m) => return Err(m),
        }
    } else {
        match mount_direct(&plan, &source, prog, &cli.mountpoint) {
            Ok(Some(dev)) => fuser::Session::from_fd(fs, dev, acl, config),
            // Not privileged: fuser goes through the setuid fusermount3.
            Ok(None) => fuser::Session::new(fs, &cli.mountpoint, &config).map_err(|e| {
                std::io::Error::new(e.kind(), format!("{e} ({})", unprivileged_hint()))
            }),
            Err(m) => return Err(m),
        }
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => return Err(format!("mount {}: {e}", cli.mountpoint.display())),
    };
    match session.as_fd().try_clone_to_owned() {
        Ok(dev) => pacer.set_device(dev),
        Err(e) => {
            tracing::debug!(error = %e, "no copy of the device fd: the pacer cannot see the queue")
        }
    }
    if daemonize {
        match sys::fork() {
            Err(e) => return Err(format!("fork: {e}")),
            // The mount is live and served from now on by the child: leave with no
            // destructor run (they belong to the child's copy).
            Ok(sys::Forked::Parent { .. }) => std::process::exit(0),
            Ok(sys::Forked::Child) => {
                let _ = sys::setsid();
                let _ = sys::detach_stdio();
            }
        }
    }
    // Before fuser starts the session's threads: see sys::reserve_fds.
    sys::reserve_fds(session.as_fd(), FD_TABLE_AT_START);
    session
        .run()
        .map_err(|e| format!("serving {}: {e}", cli.mountpoint.display()))
}
