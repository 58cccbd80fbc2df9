//! The NBD sockets: the Unix socket `ROOT/nbd.sock` (always) and TCP (`--nbd-listen`). The
//! export name is the resource name; only a resource whose volume is open here and which is
//! designated to this host accepts new connections.

use std::sync::Arc;

use mars_config::ResourceName;
use mars_nbd::{Export, Exports, ServerConfig};
use tokio::net::{TcpListener, UnixListener};

use crate::host::Host;
use crate::listen::{AcceptErrors, Admission};

/// Most NBD-over-TCP connections served at once.
pub const MAX_TCP_CONNECTIONS: usize = 1_024;
/// Most NBD-over-TCP connections from one address (qemu opens up to 16 per export with
/// multi-conn; a hypervisor serving many guests from one address needs a few hundred).
pub const MAX_TCP_PER_ADDRESS: usize = 256;

/// The NBD side sees the daemon as a set of exports: every attached resource, by name.
pub struct HostExports(pub Arc<Host>);

impl Exports for HostExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        let res = ResourceName::new(name).ok()?;
        self.0.get(&res)?.shared.export()
    }
    fn list(&self) -> Vec<String> {
        self.0
            .all()
            .iter()
            .filter(|r| r.shared.volume().is_some())
            .map(|r| r.name.to_string())
            .collect()
    }
}

pub async fn serve_unix(host: Arc<Host>, l: UnixListener) {
    let exports: Arc<dyn Exports> = Arc::new(HostExports(host));
    let cfg = Arc::new(ServerConfig::default());
    let mut errors = AcceptErrors::new("NBD listener (unix)");
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                errors.accepted();
                let (e, c) = (exports.clone(), cfg.clone());
                tokio::spawn(async move {
                    if let Err(err) = mars_nbd::serve(s, e, c).await {
                        tracing::warn!("NBD connection (unix): {err}");
                    }
                });
            }
            Err(e) => errors.failed(e).await,
        }
    }
}

pub async fn serve_tcp(host: Arc<Host>, l: TcpListener) {
    let exports: Arc<dyn Exports> = Arc::new(HostExports(host.clone()));
    let cfg = Arc::new(ServerConfig::default());
    let mut errors = AcceptErrors::new("NBD listener (tcp)");
    let admission = Admission::new(
        "NBD listener (tcp)",
        MAX_TCP_CONNECTIONS,
        MAX_TCP_PER_ADDRESS,
    );
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                errors.accepted();
                let Some(slot) = admission.admit(peer) else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let c = match host.ident.nbd_tls() {
                    Ok(None) => cfg.clone(),
                    Ok(Some(tls)) => Arc::new(ServerConfig {
                        tls: Some(tls),
                        ..(*cfg).clone()
                    }),
                    Err(e) => {
                        tracing::warn!("refused NBD connection from {peer}: {e:#}");
                        continue;
                    }
                };
                let e = exports.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(err) = mars_nbd::serve(s, e, c).await {
                        tracing::warn!("NBD connection from {peer}: {err}");
                    }
                });
            }
            Err(e) => errors.failed(e).await,
        }
    }
}
