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
//!           → mars_tree (the MARS-compatible /mars tree, beside local/ and meta/)
//!           → local/ (volume, export, device, replica directory)   meta/ (store thread, cluster)
//!             → peer (frames, connect, listen)   identity   root
//! ```

mod control;
mod host;
mod identity;
mod listen;
mod local;
mod logging;
mod mars_tree;
mod meta;
mod metrics;
mod nbd;
mod peer;
mod replication;
mod resource;
mod root;
mod settings;
mod systemd;
mod traffic;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use mars_config::HostName;
use mars_wire::{ClusterId, StreamKind};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use crate::host::Host;
use crate::identity::Identity;
use crate::local::Tuning;
use crate::replication::serve::{Lookup, Served};

/// The hand-written parts of marsd(8); the rest comes from `settings::Flags` (see
/// `mars-docgen`).
const MAN_PROSE: &str = include_str!("../../../docs/man/marsd.8.prose");

/// `marsd --generate-man DIR`: the package build runs it, so the installed page always matches
/// this binary's options.
fn generate_man(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let path = mars_docgen::write_man(settings::Flags::command(), MAN_PROSE, dir)?;
    println!("{}", path.display());
    Ok(())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

fn main() {
    let flags = settings::Flags::parse();
    // Before the settings are read: packaging runs it without a configuration.
    if let Some(dir) = &flags.generate_man {
        if let Err(e) = generate_man(dir) {
            eprintln!("marsd: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let settings = match settings::load(&flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("marsd: {e:#}");
            std::process::exit(2);
        }
    };
    if flags.print_config {
        print!("{}", settings.to_toml());
        return;
    }
    if let Err(e) = logging::init(settings.logging.format, &settings.logging.level) {
        eprintln!("marsd: {e:#}");
        std::process::exit(2);
    }
    if let Err(e) = run(settings) {
        // Through the log (stderr or the journal), once.
        tracing::error!("marsd: {e:#}");
        std::process::exit(1);
    }
}

fn run(s: settings::Config) -> Result<()> {
    let host = match &s.host {
        Some(h) => h.clone(),
        None => {
            let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            HostName::from_system(&raw).context(
                "the machine's host name is not a valid mars host name; set `host` in \
                 marsd.toml or pass --host NAME",
            )?
        }
    };
    let device = match s.device.mode {
        settings::DeviceMode::None => crate::local::DeviceMode::None,
        settings::DeviceMode::FuseLoop => {
            mars_blockdev::check_support()
                .map_err(|e| anyhow::anyhow!("device.mode fuse-loop (--device): {e}"))?;
            crate::local::DeviceMode::FuseLoop
        }
        settings::DeviceMode::Auto => match mars_blockdev::check_support() {
            Ok(()) => crate::local::DeviceMode::FuseLoop,
            Err(e) => {
                tracing::info!("no local block devices ({e}); resources are served over NBD");
                crate::local::DeviceMode::None
            }
        },
    };
    let root = absolute(&s.root)?;
    let _lock = root::lock_root(&root)?;
    tracing::info!(
        "marsd {} starting as host {host} in {}",
        env!("CARGO_PKG_VERSION"),
        root.display()
    );
    if device != crate::local::DeviceMode::None {
        // Leftovers of a daemon that crashed: FUSE mounts and loop devices nobody serves.
        match mars_blockdev::cleanup_stale(&s.device.dir) {
            Ok(rep) => tracing::debug!("device cleanup: {rep:?}"),
            Err(e) => tracing::warn!("cleanup of {}: {e}", s.device.dir.display()),
        }
    }
    let tuning = Tuning {
        max_dirty: usize::try_from(s.txlog.max_dirty.0).context("txlog.max_dirty too large")?,
        max_log_file: s.txlog.rotate_size.0,
        min_free_space: s.space.min_free.0,
        emergency_free_space: s.emergency_free(),
        device,
        device_dir: s.device.dir.clone().into(),
    };
    let mut systemd = systemd::Settings::mars_defaults();
    if let Some(p) = s.systemd.templates.as_deref().filter(|p| !p.is_empty()) {
        systemd.search_path = mars_unitgen::fs::search_path(Some(p), None, Path::new("/"));
    }
    systemd.unit_dir = absolute(&s.systemd.unit_dir)?;
    systemd.scripts_dir = absolute(&s.systemd.scripts_dir)?;
    systemd.systemctl = s.systemd.systemctl.clone();
    systemd.timeout = std::time::Duration::from_secs(s.systemd.timeout.max(1));
    systemd.mars_tree = match s.systemd.mars_tree.as_deref() {
        Some(p) if !p.as_os_str().is_empty() => Some(p.to_path_buf()),
        _ => None,
    };
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
    // A clock that ran more than 30 days ahead once left its time in the store: every other
    // host would refuse what this one writes, even with the clock fixed now.
    match store_file.rebase_future() {
        Ok(None) => {}
        Ok(Some(r)) => tracing::warn!(
            "the metadata clock was {:.0} s ahead of this host's clock (it ran ahead once): \
             stamped {} entries of this host anew, dropped {} of other hosts with such stamps",
            r.from.saturating_sub(mars_meta::system_time_ns()) as f64 / 1e9,
            r.restamped,
            r.dropped
        ),
        Err(e) => tracing::warn!("cannot bring the metadata clock back: {e}"),
    }
    raise_open_files();
    let in_cluster = cluster.is_some();
    let ident = Arc::new(Identity::new(
        root,
        host,
        s.listen.to_string(),
        s.advertise.is_some().then(|| s.advertised()),
        s.nbd.listen,
        cluster,
        s.insecure,
    ));
    if let Some(dir) = &s.nbd.tls_dir {
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
    } else if s.nbd.tls {
        ident
            .nbd_tls
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if s.insecure {
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
    systemd.open_tree()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("marsd")
        .build()?;
    let result = rt.block_on(serve(ident, store_file, tuning, systemd, s.metrics.listen));
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

    fn merge(
        &self,
        joiner: HostName,
        request: mars_wire::Message,
        from: SocketAddr,
    ) -> peer::JoinFuture {
        let h = self.host.clone();
        Box::pin(async move {
            let r = h.cluster.merge_serve(joiner.clone(), request).await;
            if r.is_ok() {
                tracing::info!("answered a merge request of {joiner} at {from}");
            }
            r
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
    // `metrics.listen` (`--metrics-listen`): where the Prometheus endpoint is served.
    metrics_listen: Option<SocketAddr>,
) -> Result<()> {
    let store = meta::MetaStore::start(store)?;
    let host = Host::new(ident.clone(), store, tuning, systemd);
    host.load_resources().await?;
    host.systemd.spawn_tree();
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
