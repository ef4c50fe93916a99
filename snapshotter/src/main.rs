//! `rustfuse-snapshotter`: containerd's snapshots service on a unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use rustfuse_snapshotter::config;
use rustfuse_snapshotter::mode::{self, ModeChoice};
use rustfuse_snapshotter::mounts::MountMode;
use rustfuse_snapshotter::redirects;
use rustfuse_snapshotter::service::Service;
use rustfuse_snapshotter::snapshotter::Snapshotter;
use rustfuse_snapshotter::store::Store;

#[derive(Parser, Debug)]
#[command(
    name = "rustfuse-snapshotter",
    version,
    about = "containerd snapshots service over kernel overlayfs or rustfuse",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the snapshots API (the default).
    Serve(ServeArgs),
    /// Report what the machine offers and which mount mode would be used, then exit.
    Doctor(DoctorArgs),
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// Unix socket to listen on [default: /run/rustfuse/rustfuse.sock as root,
    /// $XDG_RUNTIME_DIR/rustfuse/rustfuse.sock rootless].
    #[arg(long, value_name = "SOCK")]
    address: Option<PathBuf>,
    /// Root directory for metadata and snapshots [default: /var/lib/rustfuse as root,
    /// ~/.local/share/rustfuse rootless].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// How snapshots with parents are mounted.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    mode: ModeChoice,
    /// Group allowed to use the socket (mode 0660 instead of 0600).
    #[arg(long, value_name = "GID")]
    group: Option<u32>,
    /// Log level or tracing filter (e.g. debug, rustfuse_snapshotter=trace).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

#[derive(Args, Debug)]
struct DoctorArgs {
    /// Root directory to examine (trial mounts happen in it).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// The --mode to evaluate.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    mode: ModeChoice,
}

/// How long a SIGTERM waits for in-flight calls before the server stops.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Doctor(d)) => doctor(d),
        Some(Command::Serve(s)) => serve(s),
        None => serve(cli.serve),
    }
}

fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let root = args.root.unwrap_or_else(|| config::defaults().root);
    std::fs::create_dir_all(&root).with_context(|| format!("create root {}", root.display()))?;
    let findings = mode::probe(&root);
    let holders = redirect_holders(&root, &findings);
    print!("{}", mode::report(&root, &findings, args.mode, &holders));
    Ok(())
}

/// For `doctor`: the snapshots whose layers hold directory redirects (Active ones walked when
/// kernel overlayfs would be used), read from the store if there is one; the store of a
/// running server is locked, which says so.
fn redirect_holders(
    root: &Path,
    findings: &mode::Findings,
) -> Result<Vec<redirects::Holder>, String> {
    let db = root.join("metadata.redb");
    if !db.exists() {
        return Ok(Vec::new());
    }
    let store = Store::open(&db)
        .map_err(|e| format!("cannot open the store (a running server holds it locked): {e}"))?;
    redirects::holders(
        &store,
        &root.join("snapshots"),
        findings.kernel_overlay.is_some(),
    )
    .map_err(|e| e.to_string())
}

fn init_tracing(level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .with_context(|| format!("bad --log-level {level:?}"))?;
    // Colour codes only for a terminal: logs go to files and journals too.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

/// The mode for `choice`, given the store and snapshot directories of the root: a trial
/// mount decides whether kernel overlayfs works, and whether it follows the directory
/// redirects FUSE-mode layers may hold (Active snapshots prepared in FUSE mode are walked
/// only when kernel overlayfs would be used).
fn choose_mode(
    root: &Path,
    choice: ModeChoice,
    store: &Store,
    snapshots: &Path,
) -> rustfuse_snapshotter::Result<MountMode> {
    if choice == ModeChoice::Fuse {
        let m = MountMode::Fuse {
            program: mode::FUSE_PROGRAM.to_string(),
        };
        tracing::info!(
            mode = m.name(),
            redirect_dir = m.redirect_dir(),
            reason = "--mode fuse was given",
            "mount mode chosen"
        );
        return Ok(m);
    }
    let findings = mode::probe(root);
    for t in findings.trials.iter().chain(&findings.follow_trial) {
        tracing::debug!(options = %t.options, result = ?t.result, "trial overlay mount");
    }
    let holders = redirects::holders(store, snapshots, findings.kernel_overlay.is_some())?;
    let (m, why) = mode::choose(choice, &findings, &holders)?;
    tracing::info!(
        mode = m.name(),
        redirect_dir = m.redirect_dir(),
        reason = %why,
        "mount mode chosen"
    );
    Ok(m)
}

/// Bind the socket: refuse if a live server answers on it, replace a stale one.
fn bind(address: &Path, group: Option<u32>) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = address.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("create socket directory {}", dir.display()))?;
            let mode = if group.is_some() { 0o711 } else { 0o700 };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", dir.display()))?;
        }
    }
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            bail!("{} is in use by a running server", address.display());
        }
        std::fs::remove_file(address)
            .with_context(|| format!("remove stale socket {}", address.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(address)
        .with_context(|| format!("listen on {}", address.display()))?;
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(address, None, Some(gid))
                .with_context(|| format!("chown {} to group {gid}", address.display()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", address.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(&args.log_level)?;
    let defaults = config::defaults();
    let root = args.root.clone().unwrap_or(defaults.root);
    let address = args.address.clone().unwrap_or(defaults.address);
    std::fs::create_dir_all(&root).with_context(|| format!("create root {}", root.display()))?;
    let snapshotter = Snapshotter::open_with(&root, |store, snapshots| {
        choose_mode(&root, args.mode, store, snapshots)
    })
    .with_context(|| format!("open snapshotter root {}", root.display()))?;
    let snapshotter = Arc::new(snapshotter);
    let listener = bind(&address, args.group)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    tracing::info!(address = %address.display(), root = %root.display(), "serving");
    let result = rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let mut drain_rx = stop_tx.subscribe();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let serve = tonic::transport::Server::builder()
            .add_service(Service::new(snapshotter.clone()).into_server())
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            });
        // Clients such as containerd keep their connection open: drain in-flight calls for
        // a bounded time, then stop regardless.
        let deadline = async move {
            let _ = drain_rx.wait_for(|s| *s).await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        tokio::select! {
            r = serve => r.context("serve"),
            () = deadline => {
                tracing::info!(timeout = ?DRAIN_TIMEOUT, "clients still connected; stopping");
                Ok(())
            }
        }
    });
    let _ = std::fs::remove_file(&address);
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    drop(snapshotter);
    tracing::info!("stopped");
    result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}
