//! Who this daemon is: its root directory, host name, listen address and, once it belongs to
//! one, its cluster (`cluster.toml`). Shared read-mostly by every layer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::RwLock;

use mars_config::HostName;
use mars_wire::ClusterId;

use crate::root::{self, ClusterFile, CLUSTER_FILE};

pub struct Identity {
    pub root: PathBuf,
    pub host: HostName,
    /// The peer listen address (`--listen`).
    pub listen: String,
    pub nbd_tcp: Option<SocketAddr>,
    cluster: RwLock<Option<ClusterFile>>,
}

impl Identity {
    pub fn new(
        root: PathBuf,
        host: HostName,
        listen: String,
        nbd_tcp: Option<SocketAddr>,
        cluster: Option<ClusterFile>,
    ) -> Identity {
        Identity {
            root,
            host,
            listen,
            nbd_tcp,
            cluster: RwLock::new(cluster),
        }
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

    /// The address peers reach this host at (`--ip` of create-cluster, else `--listen`).
    pub fn advertised(&self) -> String {
        self.cluster()
            .map_or_else(|| self.listen.clone(), |c| c.address)
    }

    /// Records the cluster this host created or joined (durably, before it counts).
    pub fn set_cluster(&self, c: ClusterFile) -> anyhow::Result<()> {
        root::write_toml(&self.root, CLUSTER_FILE, &c)?;
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = Some(c);
        Ok(())
    }

    /// Forgets the cluster (leave-cluster).
    pub fn forget_cluster(&self) -> anyhow::Result<()> {
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = None;
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
