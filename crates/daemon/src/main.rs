//! `marsd`: the per-host daemon. It owns everything under its root directory, serves the
//! resources' block devices over NBD and answers `marsadm` on the control socket.

mod cluster;
mod lifecycle;
mod logserve;
mod replica;
mod resource;
mod roles;
mod root;
mod serve;
mod state;
mod systemd;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use mars_config::{parse_size, HostName};

use crate::resource::{DeviceMode, Tuning};
use crate::state::Daemon;

#[derive(Debug, Parser)]
#[command(
    name = "marsd",
    version,
    about = "mars daemon: geo-redundant block device replication"
)]
struct Args {
    /// Directory holding all state of this host (logs, metadata, sockets).
    #[arg(long, env = "MARS_ROOT", default_value = "/var/lib/mars")]
    root: PathBuf,
    /// This host's name in the cluster (default: the short hostname).
    #[arg(long)]
    host: Option<String>,
    /// Peer address ADDR[:PORT] (default port 7777): metadata, log fetch and full sync streams
    /// of the other members arrive here; also the address advertised to them.
    #[arg(long, default_value = "0.0.0.0:7777")]
    listen: String,
    /// Also serve NBD over TCP on ADDR:PORT (the Unix socket ROOT/nbd.sock is always served).
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// Configuration file (reserved; no settings are read from it yet).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the primary's block devices appear (DIR/RES). Several daemons on one machine need
    /// different directories.
    #[arg(long, env = "MARS_DEVICE_DIR", default_value = "/dev/mars")]
    device_dir: PathBuf,
    /// How a primary's resource appears as a local block device: `auto` (the FUSE+loop device
    /// where FUSE and loop devices work, else none), `fuse-loop`, or `none` (NBD sockets only).
    #[arg(long, env = "MARS_DEVICE", default_value = "auto")]
    device: String,
    /// Memory per resource for written data not yet on the backing disk (K/M/G suffixes).
    #[arg(long, default_value = "256M")]
    max_dirty: String,
    /// Rotate a logfile once it reaches this size.
    #[arg(long, default_value = "1G")]
    logrotate_size: String,
    /// Free space the root must keep. Below it, secondaries drop their logfiles and stop
    /// fetching (they no longer hold logs for the others and need a full sync later).
    #[arg(long, env = "MARS_MIN_FREE_SPACE", default_value = "1G")]
    min_free_space: String,
    /// Free space below which primaries enter emergency mode: writes go straight to the disk,
    /// replication stops at a hole in the log (default: half of --min-free-space). They leave
    /// it when --min-free-space is free again.
    #[arg(long, env = "MARS_EMERGENCY_FREE_SPACE")]
    emergency_free_space: Option<String>,
    /// Template search path, colon-separated; each entry's `systemd-templates/` subdirectory is
    /// used if it exists (default as MARS: ., ~/.marsadm, /etc/marsadm, /usr/lib/marsadm,
    /// /usr/local/lib/marsadm).
    #[arg(long, env = "MARS_PATH")]
    systemd_templates: Option<String>,
    /// Where generated units go.
    #[arg(
        long,
        env = "MARS_SYSTEMD_UNIT_DIR",
        default_value = "/run/systemd/system"
    )]
    systemd_unit_dir: PathBuf,
    /// Where generated `.script` pseudo-units go (/run is often mounted noexec).
    #[arg(
        long,
        env = "MARS_SYSTEMD_SCRIPTS_DIR",
        default_value = "/etc/marsadm/systemd-generated-scripts"
    )]
    systemd_scripts_dir: PathBuf,
    /// The systemctl to run (tests point this at a wrapper that enters a container).
    #[arg(long, env = "MARS_SYSTEMCTL", default_value = "systemctl")]
    systemctl: PathBuf,
    /// Seconds one systemctl call or script may take before it is killed.
    #[arg(long, default_value_t = 300)]
    systemd_timeout: u64,
}

fn normalize_listen(s: &str) -> Result<String> {
    let with_port = cluster::with_default_port(s);
    with_port
        .parse::<SocketAddr>()
        .map(|_| with_port)
        .with_context(|| format!("--listen {s:?} is not ADDR[:PORT]"))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MARS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: under systemd, stderr goes to the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("marsd: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let host = match &args.host {
        Some(h) => HostName::new(h).context("--host")?,
        None => {
            let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            HostName::from_system(&raw).context(
                "the machine's host name is not a valid mars host name; pass --host NAME",
            )?
        }
    };
    let listen = normalize_listen(&args.listen)?;
    let max_dirty = parse_size(&args.max_dirty).context("--max-dirty")?;
    let max_log_file = parse_size(&args.logrotate_size).context("--logrotate-size")?;
    if max_log_file < 1 << 20 {
        anyhow::bail!("--logrotate-size must be at least 1M");
    }
    if let Some(c) = &args.config {
        if !c.exists() {
            anyhow::bail!("--config {}: no such file", c.display());
        }
    }
    let device = match args.device.as_str() {
        "none" => DeviceMode::None,
        "fuse-loop" => {
            mars_blockdev::check_support()
                .map_err(|e| anyhow::anyhow!("--device fuse-loop: {e}"))?;
            DeviceMode::FuseLoop
        }
        "auto" => match mars_blockdev::check_support() {
            Ok(()) => DeviceMode::FuseLoop,
            Err(e) => {
                tracing::info!("no local block devices ({e}); resources are served over NBD");
                DeviceMode::None
            }
        },
        "nbd" => anyhow::bail!(
            "--device nbd: attaching the kernel NBD driver is not supported by this build; \
             use fuse-loop, auto or none"
        ),
        other => anyhow::bail!("--device {other:?}: expected auto, fuse-loop or none"),
    };
    if !args.device_dir.is_absolute() {
        anyhow::bail!("--device-dir must be an absolute path");
    }
    let root = absolute(&args.root)?;
    let _lock = root::lock_root(&root)?;
    tracing::info!(
        "marsd {} starting as host {host} in {}",
        env!("CARGO_PKG_VERSION"),
        root.display()
    );
    if device != DeviceMode::None {
        // Leftovers of a daemon that crashed: FUSE mounts and loop devices nobody serves.
        match mars_blockdev::cleanup_stale(&args.device_dir) {
            Ok(rep) => tracing::debug!("device cleanup: {rep:?}"),
            Err(e) => tracing::warn!("cleanup of {}: {e}", args.device_dir.display()),
        }
    }
    let min_free_space = parse_size(&args.min_free_space).context("--min-free-space")?;
    let emergency_free_space = match &args.emergency_free_space {
        Some(s) => parse_size(s).context("--emergency-free-space")?,
        None => min_free_space / 2,
    };
    if emergency_free_space > min_free_space {
        anyhow::bail!("--emergency-free-space must not exceed --min-free-space");
    }
    let tuning = Tuning {
        max_dirty: usize::try_from(max_dirty).context("--max-dirty too large")?,
        max_log_file,
        min_free_space,
        emergency_free_space,
        device,
        device_dir: args.device_dir.clone().into(),
    };
    let mut systemd = systemd::Settings::mars_defaults();
    if let Some(p) = args.systemd_templates.as_deref().filter(|p| !p.is_empty()) {
        systemd.search_path = mars_unitgen::fs::search_path(Some(p), None, Path::new("/"));
    }
    systemd.unit_dir = absolute(&args.systemd_unit_dir)?;
    systemd.scripts_dir = absolute(&args.systemd_scripts_dir)?;
    systemd.systemctl = args.systemctl.clone();
    systemd.timeout = std::time::Duration::from_secs(args.systemd_timeout.max(1));
    let daemon = Arc::new(Daemon::load(
        root,
        host,
        listen,
        args.nbd_listen,
        tuning,
        systemd,
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("marsd")
        .build()?;
    let result = rt.block_on(serve::run(daemon.clone()));
    // Stop serving before closing volumes, so no request races the close.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    daemon.shutdown();
    tracing::info!("marsd stopped");
    result
}
