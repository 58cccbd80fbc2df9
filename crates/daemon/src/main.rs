//! `marsd`: the per-host daemon, and its composition root. It owns everything under its root
//! directory, serves the resources' block devices over NBD and answers `marsadm` on the control
//! socket.
//!
//! The modules, in layers that only point down (a test in `tests/layering.rs` fails on an
//! upward import or a cycle):
//!
//! ```text
//!  main (this file: builds everything, binds the sockets, wires the peer stream handlers)
//!   → control/ (socket, dispatch, view)        nbd (exports)
//!     → host (identity + registry of resource actors; liveness, space, addresses)
//!       → resource/ (one actor per resource: engine + executor)
//!         → replication/ (fetch, replay, sync sessions; fetch and sync servers)   systemd
//!           → local/ (volume, export, device, replica directory)   meta/ (store thread, cluster)
//!             → peer (frames, connect, listen)   identity   root
//! ```

mod control;
mod host;
mod identity;
mod listen;
mod local;
mod meta;
mod metrics;
mod nbd;
mod peer;
mod replication;
mod resource;
mod root;
mod systemd;
mod traffic;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use mars_config::{parse_size, HostName};
use mars_wire::{ClusterId, StreamKind};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use crate::host::Host;
use crate::identity::Identity;
use crate::local::Tuning;
use crate::replication::serve::{Lookup, Served};

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
    /// Peer streams in plaintext, nobody authenticated: only for benchmarks and closed labs.
    /// Every host of the cluster must run with it (a TLS host refuses a plaintext peer, and
    /// the other way round); `view` shows it.
    #[arg(
        long,
        env = "MARS_INSECURE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    insecure: bool,
    /// Also serve NBD over TCP on ADDR:PORT (the Unix socket ROOT/nbd.sock is always served).
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// NBD over TCP only inside TLS (NBD_OPT_STARTTLS): this host presents its cluster
    /// certificate, and a client must present a certificate of the cluster's CA.
    #[arg(
        long,
        env = "MARS_NBD_TLS",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    nbd_tls: bool,
    /// NBD over TCP only inside TLS with the certificate in DIR instead of the cluster's: the
    /// layout of qemu's tls-creds-x509 (server-cert.pem, server-key.pem, and ca-cert.pem, the
    /// CA whose certificates clients must present).
    #[arg(long, env = "MARS_NBD_TLS_DIR", value_name = "DIR")]
    nbd_tls_dir: Option<PathBuf>,
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
    /// Serve Prometheus metrics on ADDR:PORT (`GET /metrics`); off unless given.
    #[arg(long, env = "MARS_METRICS_LISTEN", value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
}

fn normalize_listen(s: &str) -> Result<String> {
    let with_port = peer::with_default_port(s);
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
        "none" => crate::local::DeviceMode::None,
        "fuse-loop" => {
            mars_blockdev::check_support()
                .map_err(|e| anyhow::anyhow!("--device fuse-loop: {e}"))?;
            crate::local::DeviceMode::FuseLoop
        }
        "auto" => match mars_blockdev::check_support() {
            Ok(()) => crate::local::DeviceMode::FuseLoop,
            Err(e) => {
                tracing::info!("no local block devices ({e}); resources are served over NBD");
                crate::local::DeviceMode::None
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
    if device != crate::local::DeviceMode::None {
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
    let cluster: Option<root::ClusterFile> = root::read_toml(&root.join(root::CLUSTER_FILE))?;
    if let Some(c) = &cluster {
        if c.host != host {
            anyhow::bail!(
                "{} belongs to host {:?}, but this daemon runs as {:?}; host names never change (use --host {})",
                root.display(),
                c.host.as_str(),
                host.as_str(),
                c.host
            );
        }
    }
    let store_existed = root.join(meta::META_FILE).exists();
    let mut store_file = mars_meta::Store::open(
        root.join(meta::META_FILE),
        host.clone(),
        mars_meta::system_time_ns,
    )
    .with_context(|| format!("cannot open {}", root.join(meta::META_FILE).display()))?;
    // redb creates it with the umask's mode; the store is the cluster's metadata.
    root::private(&root.join(meta::META_FILE), store_existed)?;
    raise_open_files();
    let in_cluster = cluster.is_some();
    let ident = Arc::new(Identity::new(
        root,
        host,
        listen,
        args.nbd_listen,
        cluster,
        args.insecure,
    ));
    if let Some(dir) = &args.nbd_tls_dir {
        if args.nbd_listen.is_none() {
            anyhow::bail!("--nbd-tls-dir is for NBD over TCP: give --nbd-listen too");
        }
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .with_context(|| format!("--nbd-tls-dir: cannot read {}", dir.join(f).display()))
        };
        let tls = mars_tls::verify::nbd_server_from_pem(
            &read("server-cert.pem")?,
            &read("server-key.pem")?,
            &read("ca-cert.pem")?,
        )
        .with_context(|| format!("--nbd-tls-dir {}", dir.display()))?;
        ident.set_nbd_tls(mars_nbd::NbdTls(tls));
    } else if args.nbd_tls {
        if args.insecure {
            anyhow::bail!(
                "--nbd-tls uses this host's cluster certificate, which --insecure does not"
            );
        }
        if args.nbd_listen.is_none() {
            anyhow::bail!("--nbd-tls is for NBD over TCP: give --nbd-listen too");
        }
        ident
            .nbd_tls
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if args.insecure {
        tracing::warn!("--insecure: peer streams are plaintext and nobody is authenticated");
    } else {
        match root::load_credentials(&ident.root)? {
            Some(creds) => {
                ident.install_credentials(&creds)?;
                // What this host owns is signed with its key, and what others own is taken
                // only with their signatures.
                let trust = root::load_trust(&ident.root)?;
                store_file.set_authority(Some(meta::authority::PkiAuthority::new(&creds, &trust)?));
                match store_file.resign_own() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("signed {n} metadata entries of this host anew"),
                    Err(e) => tracing::warn!("signing this host's metadata entries: {e}"),
                }
            }
            None if in_cluster => tracing::warn!(
                "this host is in a cluster but has no certificate in {}/ (did it join with \
                 --insecure?): no peer will talk to it; run it with --insecure like the others, \
                 or leave and join again with a token",
                ident.root.join(root::TLS_DIR).display()
            ),
            None => {}
        }
    }
    let systemd = Arc::new(systemd::Systemd::new(systemd, ident.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("marsd")
        .build()?;
    let result = rt.block_on(serve(
        ident,
        store_file,
        tuning,
        systemd,
        args.metrics_listen,
    ));
    // Stop serving before anything else is dropped, so no request races the close.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    tracing::info!("marsd stopped");
    result
}

/// Binds a Unix socket (removing a leftover: we hold the root lock, so a socket file here is a
/// dead daemon's).
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// The peer streams, by kind, to the layers that serve them.
struct PeerHandlers {
    host: Arc<Host>,
    lookup: Arc<dyn Lookup>,
}

impl peer::Handlers for PeerHandlers {
    fn me(&self) -> (HostName, ClusterId) {
        (
            self.host.ident.host.clone(),
            self.host.ident.cluster_id().unwrap_or(ClusterId::UNKNOWN),
        )
    }

    fn accepting(&self) -> peer::Accepting {
        if self.host.ident.insecure {
            return peer::Accepting::Plain;
        }
        match self.host.ident.peer_tls() {
            Ok(Some(t)) => peer::Accepting::Tls(t),
            _ => peer::Accepting::Closed,
        }
    }

    fn admit(&self, host: HostName, fingerprint: String) -> peer::CheckFuture {
        let h = self.host.clone();
        Box::pin(async move {
            let current = h
                .store
                .value(&format!("{}{host}", meta::cluster::CERT_PREFIX))
                .await?;
            match current.map(|c| mars_tls::text_fingerprint(&c)) {
                Some(Ok(fp)) if fp == fingerprint => Ok(()),
                Some(_) => Err(format!(
                    "the certificate of {host} is not its current one (renewed or revoked)"
                )),
                None => Err(format!(
                    "host {host} is not a member of this cluster (left, deleted, or not yet \
                     known here)"
                )),
            }
        })
    }

    fn join(
        &self,
        joiner: HostName,
        token: String,
        host_key: Vec<u8>,
        from: SocketAddr,
    ) -> peer::JoinFuture {
        let h = self.host.clone();
        Box::pin(async move {
            let id = h
                .ident
                .cluster_id()
                .ok_or("this host is not in a cluster")?;
            if h.cluster.members().await.contains_key(&joiner) {
                return Err(format!(
                    "a host named {joiner} is already a member of this cluster"
                ));
            }
            let ident = h.ident.clone();
            let name = joiner.clone();
            let (cert, ca) =
                tokio::task::spawn_blocking(move || ident.redeem_token(&token, &name, &host_key))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("{e:#}"))?;
            tracing::info!("issued a certificate for host {joiner} (at {from}) for a join token");
            Ok(mars_wire::Message::JoinGrant {
                cluster: id.0,
                cert,
                ca,
            })
        })
    }

    fn revoked(
        &self,
        host: HostName,
        fingerprint: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let mut certs = self.host.cluster.certificates();
        Box::pin(async move {
            loop {
                let current = certs.borrow_and_update().get(&host).cloned();
                // An empty map is "not read yet" (right after the start), not "everyone gone".
                if !certs.borrow().is_empty() && current.as_deref() != Some(fingerprint.as_str()) {
                    return;
                }
                if certs.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        })
    }

    fn serve(&self, kind: StreamKind, conn: peer::Incoming) -> peer::ServeFuture {
        let me = self.host.ident.host.clone();
        match kind {
            StreamKind::Meta => Box::pin(self.host.cluster.clone().serve(conn)),
            StreamKind::Fetch => Box::pin(replication::serve::serve_fetch(
                self.lookup.clone(),
                me,
                conn,
            )),
            StreamKind::Sync => Box::pin(replication::serve::serve_sync(
                self.lookup.clone(),
                me,
                conn,
            )),
        }
    }
}

/// The servers find resources in the registry.
struct HostLookup(Arc<Host>);

impl Lookup for HostLookup {
    fn served(&self, res: &str) -> Option<Served> {
        let name = mars_config::ResourceName::new(res).ok()?;
        Some(self.0.get(&name)?.served())
    }
}

async fn serve(
    ident: Arc<Identity>,
    store: mars_meta::Store,
    tuning: Tuning,
    systemd: Arc<systemd::Systemd>,
    metrics_listen: Option<SocketAddr>,
) -> Result<()> {
    let store = meta::MetaStore::start(store)?;
    let host = Host::new(ident.clone(), store, tuning, systemd);
    host.load_resources().await?;
    // Every listener is bound before the control socket: a client that can talk to the control
    // socket finds the NBD sockets and the peer port serving (the backlog accepts at once).
    let nbd_unix = bind_unix(&ident.root.join(mars_api::NBD_SOCKET), 0o600)?;
    let nbd_tcp = match ident.nbd_tcp {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for NBD on {a}"))?,
        ),
        None => None,
    };
    let peers = TcpListener::bind(&ident.listen)
        .await
        .with_context(|| format!("cannot listen for peers on {}", ident.listen))?;
    tracing::info!("listening for peers on {}", ident.listen);
    let metrics = match metrics_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for metrics on {a}"))?,
        ),
        None => None,
    };
    let handlers: Arc<dyn peer::Handlers> = Arc::new(PeerHandlers {
        host: host.clone(),
        lookup: Arc::new(HostLookup(host.clone())),
    });
    tokio::spawn(peer::listen(peers, handlers));
    tokio::spawn(host.cluster.clone().supervise());
    tokio::spawn(host.clone().run());
    tokio::spawn(nbd::serve_unix(host.clone(), nbd_unix));
    if let Some(l) = nbd_tcp {
        tracing::info!("serving NBD on tcp {}", l.local_addr()?);
        tokio::spawn(nbd::serve_tcp(host.clone(), l));
    }
    // Exports the resources will serve are open before this host says it is ready: a
    // primary role found on disk that waits for the other members is the exception (it is
    // not served until they answered).
    host.wait_settled(std::time::Duration::from_secs(60)).await;
    let control = bind_unix(&ident.root.join(mars_api::CONTROL_SOCKET), 0o600)?;
    tokio::spawn(control::serve(host.clone(), control));
    if let Some(l) = metrics {
        tracing::info!("serving metrics on http://{}/metrics", l.local_addr()?);
        tokio::spawn(metrics::serve(host.clone(), l));
    }
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status_text(&host)),
        ],
    );
    tokio::spawn(watchdog(host.clone()));
    tracing::info!(
        "ready: control {}",
        ident.root.join(mars_api::CONTROL_SOCKET).display()
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    host.shutdown().await;
    Ok(())
}

/// `STATUS=` for `systemctl status marsd`: how many resources, and which this host serves.
fn status_text(host: &Host) -> String {
    let all = host.all();
    let primary: Vec<String> = all
        .iter()
        .filter(|r| r.shared.volume().is_some())
        .map(|r| r.name.to_string())
        .collect();
    format!(
        "host {}: {} resource(s), primary of {}",
        host.ident.host,
        all.len(),
        if primary.is_empty() {
            "none".to_string()
        } else {
            primary.join(" ")
        }
    )
}

/// Under `WatchdogSec=`, pings systemd at half the interval, but only while the host keeps
/// measuring (its loop goes through the store's thread: a store stuck in I/O stops the pings,
/// and systemd restarts us). Also refreshes `STATUS=` every few seconds.
async fn watchdog(host: Arc<Host>) {
    let mut usec = 0u64;
    let enabled = sd_notify::watchdog_enabled(false, &mut usec);
    let interval = if enabled {
        std::time::Duration::from_micros(usec / 2).max(std::time::Duration::from_millis(100))
    } else {
        std::time::Duration::from_secs(5)
    };
    let stuck_after = std::time::Duration::from_micros(usec)
        .max(std::time::Duration::from_secs(10))
        .min(std::time::Duration::from_secs(120));
    if enabled {
        tracing::info!("systemd watchdog: pinging every {interval:?}");
    }
    loop {
        tokio::time::sleep(interval).await;
        let status = status_text(&host);
        let mut states = vec![sd_notify::NotifyState::Status(&status)];
        if enabled {
            let last = host.last_measured();
            if last.elapsed() < stuck_after {
                states.push(sd_notify::NotifyState::Watchdog);
            } else {
                tracing::error!(
                    "the host loop has not measured for {:?}: no watchdog ping",
                    last.elapsed()
                );
            }
        }
        let _ = sd_notify::notify(false, &states);
    }
}

/// Every resource holds a few descriptors (its disk, directory, logfiles, peer connections):
/// the soft limit goes up to the hard one, so that a host with many resources does not run
/// out at the default 1024.
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
