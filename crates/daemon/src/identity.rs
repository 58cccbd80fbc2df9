//! Who this daemon is: its root directory, host name, listen address and, once it belongs to
//! one, its cluster (`cluster.toml`) and its credentials (`tls/`). Shared read-mostly by every
//! layer.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use mars_config::HostName;
use mars_tls::{Credentials, PeerTls, Token, TokenBook};
use mars_wire::ClusterId;

use crate::root::{self, ClusterFile, CLUSTER_FILE, TOKENS_FILE};

pub struct Identity {
    pub root: PathBuf,
    pub host: HostName,
    /// The peer listen address (`listen`, `--listen`).
    pub listen: String,
    /// The address to tell peers (`advertise`, `--advertise`), if configured.
    pub advertise: Option<String>,
    pub nbd_tcp: Option<SocketAddr>,
    /// `--insecure`: peer streams in plaintext, nobody authenticated (every host of the cluster
    /// must run so; for benchmarks and tests of the protocol only).
    pub insecure: bool,
    cluster: RwLock<Option<ClusterFile>>,
    /// This host's TLS, once it has a certificate.
    tls: RwLock<Option<Arc<PeerTls>>>,
    /// Serializes changes of `tls/tokens.toml`.
    tokens: Mutex<()>,
    /// `--nbd-tls`: NBD over TCP only inside TLS.
    pub nbd_tls: std::sync::atomic::AtomicBool,
    /// The NBD server's TLS from this host's credentials (with `--nbd-tls`).
    nbd: RwLock<Option<mars_nbd::NbdTls>>,
    /// The NBD server's TLS from `--nbd-tls-dir` (wins over the cluster's).
    nbd_fixed: RwLock<Option<mars_nbd::NbdTls>>,
}

/// Refuses to publish an unspecified address (`0.0.0.0`, `::`) to the peers: they could not
/// reach this host there.
pub fn advertisable(addr: &str) -> Result<(), String> {
    let ip = addr.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| {
        addr.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
    });
    match ip {
        Ok(ip) if ip.is_unspecified() => Err(format!(
            "this host would advertise {addr} to its peers, an unspecified address they cannot \
             reach: set `advertise` in marsd.toml (or --advertise) to an address of this host, \
             or pass --ip"
        )),
        _ => Ok(()),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Identity {
    pub fn new(
        root: PathBuf,
        host: HostName,
        listen: String,
        advertise: Option<String>,
        nbd_tcp: Option<SocketAddr>,
        cluster: Option<ClusterFile>,
        insecure: bool,
    ) -> Identity {
        Identity {
            root,
            host,
            listen,
            advertise,
            nbd_tcp,
            insecure,
            cluster: RwLock::new(cluster),
            tls: RwLock::new(None),
            tokens: Mutex::new(()),
            nbd_tls: std::sync::atomic::AtomicBool::new(false),
            nbd: RwLock::new(None),
            nbd_fixed: RwLock::new(None),
        }
    }

    /// What peer streams run over: `None` in `--insecure` mode, else this host's TLS (an
    /// error before it has a certificate).
    pub fn peer_tls(&self) -> anyhow::Result<Option<Arc<PeerTls>>> {
        if self.insecure {
            return Ok(None);
        }
        self.tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(Some)
            .ok_or_else(|| anyhow!("this host has no certificate (it is in no cluster)"))
    }

    /// Uses `creds` for every new peer stream from now on, trusting the CAs in `tls/` (the
    /// cluster CA, during a rotation the next one too). The certificate must name this host.
    pub fn install_credentials(&self, creds: &Credentials) -> anyhow::Result<()> {
        let named = creds.host().context("this host's certificate")?;
        if named != self.host {
            bail!(
                "the certificate in {} names host {named}, but this is {}",
                self.root.join(root::TLS_DIR).display(),
                self.host
            );
        }
        let trust = root::load_trust(&self.root)?;
        let tls = PeerTls::trusting(creds, &trust).context("this host's certificate")?;
        let nbd = mars_tls::verify::nbd_server(creds, &trust).context("this host's certificate")?;
        *self.nbd.write().unwrap_or_else(|e| e.into_inner()) = Some(mars_nbd::NbdTls(nbd));
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(tls));
        Ok(())
    }

    /// What NBD over TCP runs in: `Ok(None)` plaintext, `Ok(Some)` TLS (`--nbd-tls`), an
    /// error when TLS is required but this host has no certificate yet.
    pub fn nbd_tls(&self) -> anyhow::Result<Option<mars_nbd::NbdTls>> {
        if let Some(fixed) = &*self.nbd_fixed.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(Some(fixed.clone()));
        }
        if !self.nbd_tls.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        self.nbd
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(Some)
            .ok_or_else(|| {
                anyhow!("--nbd-tls, but this host has no certificate (it is in no cluster)")
            })
    }

    /// NBD over TCP only inside TLS with `tls` (`--nbd-tls-dir`), whatever this host's
    /// cluster credentials.
    pub fn set_nbd_tls(&self, tls: mars_nbd::NbdTls) {
        *self.nbd_fixed.write().unwrap_or_else(|e| e.into_inner()) = Some(tls);
    }

    /// The fingerprint of this host's certificate, if it has one.
    pub fn fingerprint(&self) -> Option<String> {
        self.tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|t| t.fingerprint.clone())
    }

    /// A new one-time join token valid for `ttl_secs` (this host must hold the CA's key).
    pub fn issue_token(&self, ttl_secs: u64) -> anyhow::Result<Token> {
        let ca = root::load_ca(&self.root)?.ok_or_else(|| {
            anyhow!(
                "this host cannot issue join tokens: it does not hold the cluster CA's key \
                 (run join-token on the host that created the cluster, or copy its \
                 {}/ca.key here: docs/security.md)",
                root::TLS_DIR
            )
        })?;
        let _g = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let dir = root::tls_dir(&self.root)?;
        let mut book: TokenBook = root::read_toml(&dir.join(TOKENS_FILE))?.unwrap_or_default();
        let t = book.issue(ca.pin(), now_secs(), ttl_secs);
        root::write_toml(&dir, TOKENS_FILE, &book)?;
        Ok(t)
    }

    /// Redeems a token a joiner presented (`ID.SECRET`) and issues its certificate for
    /// `host_key`. The token is used up even if issuing fails afterwards.
    pub fn redeem_token(
        &self,
        presented: &str,
        host: &HostName,
        host_key: &[u8],
    ) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let ca = self.check_token(presented, true)?;
        let cert = ca.issue(host, host_key)?;
        Ok((cert.to_vec(), ca.cert().to_vec()))
    }

    /// Checks a join token presented for `merge-cluster` or a join (`ID.SECRET`) and, with
    /// `redeem`, uses it up (a wrong secret does not; see [`TokenBook::redeem`]). Returns this
    /// cluster's CA (this host must hold its key).
    pub fn check_token(&self, presented: &str, redeem: bool) -> anyhow::Result<mars_tls::Ca> {
        let ca = root::load_ca(&self.root)?
            .ok_or_else(|| anyhow!("this host does not hold the cluster CA's key"))?;
        let _g = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let dir = root::tls_dir(&self.root)?;
        let mut book: TokenBook = root::read_toml(&dir.join(TOKENS_FILE))?.unwrap_or_default();
        let before = book.clone();
        let result = book.redeem(presented, now_secs());
        // A check alone leaves the book as it was (except that an expired token goes).
        let expired_only = result.is_err();
        if book != before && (redeem || expired_only) {
            root::write_toml(&dir, TOKENS_FILE, &book)?;
        }
        result?;
        Ok(ca)
    }

    /// A new certificate for member `host` (authenticated by its current one) and `host_key`,
    /// from the next CA while this host rotates the CA.
    pub fn issue_certificate(
        &self,
        host: &HostName,
        host_key: &[u8],
    ) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        // During a split, this host issues its group's hosts (and nobody else) certificates
        // of the group's new CA (docs/security.md, "Splitting a cluster").
        if let Some((split, group)) = root::load_split_issuer(&self.root, &self.host)? {
            if group.hosts.contains(host) {
                let cert = split.issue(host, host_key)?;
                return Ok((cert.to_vec(), split.cert().to_vec()));
            }
        }
        if let Some(next) = root::load_next_ca(&self.root)? {
            let cert = next.issue(host, host_key)?;
            return Ok((cert.to_vec(), next.cert().to_vec()));
        }
        if root::next_ca_elsewhere(&self.root) {
            // A certificate of the CA about to be retired would be refused soon: the host
            // holding the next CA's key issues (during a merge, the other cluster's).
            bail!(
                "{} does not issue certificates now: the cluster is moving to a CA whose key \
                 another host holds (a CA rotation or a merge-cluster in progress)",
                self.host
            );
        }
        let ca = root::load_ca(&self.root)?.ok_or_else(|| {
            anyhow!(
                "{} cannot issue certificates: it does not hold the cluster CA's key",
                self.host
            )
        })?;
        let cert = ca.issue(host, host_key)?;
        Ok((cert.to_vec(), ca.cert().to_vec()))
    }

    pub fn cluster(&self) -> Option<ClusterFile> {
        self.cluster
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The cluster id, once this host is in a cluster.
    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.cluster().and_then(|c| ClusterId::parse(&c.uuid).ok())
    }

    /// The address peers reach this host at: in a cluster the one it published (`--ip` of
    /// create-cluster or join-cluster, else the configured one when it created or joined);
    /// before, the configured one (`advertise`, else `listen`).
    pub fn advertised(&self) -> String {
        self.cluster()
            .map_or_else(|| self.configured_address(), |c| c.address)
    }

    /// `advertise`, else `listen` (which may be unspecified: see [`advertisable`]).
    pub fn configured_address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.clone())
    }

    /// Records the cluster this host created or joined (durably, before it counts).
    pub fn set_cluster(&self, c: ClusterFile) -> anyhow::Result<()> {
        root::write_toml(&self.root, CLUSTER_FILE, &c)?;
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = Some(c);
        Ok(())
    }

    /// Forgets the cluster and this host's credentials (leave-cluster).
    pub fn forget_cluster(&self) -> anyhow::Result<()> {
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = None;
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = None;
        root::remove_tls(&self.root)?;
        match std::fs::remove_file(self.root.join(CLUSTER_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    pub fn nbd_unix_uri(&self, res: &str) -> String {
        let sock = self.root.join(mars_api::NBD_SOCKET);
        format!("nbd+unix:///{res}?socket={}", sock.display())
    }

    pub fn nbd_tcp_uri(&self, res: &str) -> Option<String> {
        self.nbd_tcp.map(|a| {
            let host = if a.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                a.ip().to_string()
            };
            format!("nbd://{host}:{}/{res}", a.port())
        })
    }
}
