//! The daemon's in-memory state and the operations `marsadm` asks for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use mars_api::{ClusterInfo, ClusterView, ErrorKind, Reply, Request};
use mars_config::{format_size, HostName, ResourceName};
use mars_nbd::{Export, Exports};

use crate::cluster::{Cluster, MEMBER_PREFIX};
use crate::resource::{Resource, Tuning};
use crate::root::{self, ClusterFile, ResourceFile, CLUSTER_FILE, RESOURCE_FILE};

/// The metadata store inside the root.
pub const META_FILE: &str = "meta.redb";

/// MARS refuses resources of 64 KiB and less; so do we.
pub const MIN_RESOURCE_SIZE: u64 = 64 << 10 | 1;

pub struct Daemon {
    pub root: PathBuf,
    pub host: HostName,
    pub listen: String,
    pub nbd_tcp: Option<SocketAddr>,
    pub tuning: Tuning,
    /// This host's cluster identity (`cluster.toml`), `None` before create/join-cluster.
    identity: Mutex<Option<ClusterFile>>,
    /// Replicated metadata and the peer side.
    pub cluster: Cluster,
    resources: RwLock<BTreeMap<ResourceName, Arc<Resource>>>,
    /// Serialises commands that change the configuration.
    pub(crate) admin: Mutex<()>,
    /// Full syncs running on this host (bounded by `defaults/sync-limit`).
    syncs: Arc<AtomicUsize>,
    /// Logfiles a replica needs before its report says so: a sync served here starts at a
    /// logfile that must survive until the replica's first report arrives. (resource, host) →
    /// (logfile, when).
    pub(crate) transient_pins: Mutex<BTreeMap<(ResourceName, HostName), (u64, std::time::Instant)>>,
    /// Runs a reconcile round now instead of at the next tick (a command changed something).
    pub(crate) reconcile_now: tokio::sync::Notify,
    /// When this daemon started: a primary role found on disk is taken up only once every
    /// other member answered since (the cluster may have moved on while we were down).
    pub(crate) started: std::time::Instant,
    /// Unit generation and the resources' systemd stacks.
    pub systemd: crate::systemd::Systemd,
    /// When the reconcile loop last finished a round (for the systemd watchdog).
    pub(crate) last_round: Mutex<std::time::Instant>,
}

/// A running full sync's place under the global limit; dropping it frees the place.
pub struct SyncSlot(Arc<AtomicUsize>);

impl Drop for SyncSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A refusal: what kind, and the one line the operator reads.
#[derive(Debug)]
pub struct Refusal(pub ErrorKind, pub String);

pub(crate) type Outcome = Result<Reply, Refusal>;

pub(crate) fn invalid(msg: impl Into<String>) -> Refusal {
    Refusal(ErrorKind::Invalid, msg.into())
}

impl Daemon {
    /// Loads the cluster file and opens every resource (running crash recovery).
    pub fn load(
        root: PathBuf,
        host: HostName,
        listen: String,
        nbd_tcp: Option<SocketAddr>,
        tuning: Tuning,
        systemd: crate::systemd::Settings,
    ) -> anyhow::Result<Self> {
        let cluster: Option<ClusterFile> = root::read_toml(&root.join(CLUSTER_FILE))?;
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
        let store = mars_meta::Store::open(
            root.join(META_FILE),
            host.clone(),
            mars_meta::system_time_ns,
        )
        .with_context(|| format!("cannot open {}", root.join(META_FILE).display()))?;
        let mut resources = BTreeMap::new();
        let others = store
            .list_prefix(crate::cluster::MEMBER_PREFIX)?
            .iter()
            .filter_map(|e| mars_meta::member_of_key(&e.key))
            .any(|h| h != host);
        for (name, dir) in root::resource_dirs(&root)? {
            let Some(cfg) = root::read_toml::<ResourceFile>(&dir.join(RESOURCE_FILE))? else {
                tracing::warn!("{}: no {RESOURCE_FILE}, ignoring", dir.display());
                continue;
            };
            if cfg.name != name {
                anyhow::bail!("{}: names resource {:?}", dir.display(), cfg.name.as_str());
            }
            let meta = Arc::new(resource_meta(&store, &name)?);
            let r = Resource::open(cfg, dir, &host, tuning.clone(), meta, others);
            resources.insert(name, r);
        }
        Ok(Self {
            root,
            host,
            listen,
            nbd_tcp,
            tuning,
            identity: Mutex::new(cluster),
            cluster: Cluster::new(store),
            resources: RwLock::new(resources),
            admin: Mutex::new(()),
            syncs: Arc::new(AtomicUsize::new(0)),
            transient_pins: Mutex::new(BTreeMap::new()),
            reconcile_now: tokio::sync::Notify::new(),
            started: std::time::Instant::now(),
            systemd: crate::systemd::Systemd::new(systemd),
            last_round: Mutex::new(std::time::Instant::now()),
        })
    }

    /// Remembers that `host` needs logfile `no` of `res` and later (see `transient_pins`).
    pub fn pin_for(&self, res: &ResourceName, host: &HostName, no: u64) {
        self.transient_pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((res.clone(), host.clone()), (no, std::time::Instant::now()));
    }

    /// The oldest logfile of `res` pinned transiently. A pin ends when the replica's report
    /// carries its own pin (or after a minute at the latest).
    pub fn transient_pin(
        &self,
        res: &ResourceName,
        meta: &mars_engine::ResourceMeta,
        unreachable_limit: std::time::Duration,
    ) -> Option<u64> {
        let ages = self.cluster.ages();
        let mut pins = self
            .transient_pins
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pins.retain(|(r, h), (_, t)| {
            // Like a report's pin, a transient one does not hold logs for an unreachable host.
            if ages.get(h).is_none_or(|a| *a > unreachable_limit) {
                return false;
            }
            let reported = r == res
                && meta
                    .members
                    .get(h)
                    .and_then(|m| m.report.as_ref())
                    .is_some_and(|rep| rep.pin.is_some() || rep.needs_sync);
            !reported && t.elapsed() < std::time::Duration::from_secs(60)
        });
        pins.iter()
            .filter(|((r, _), _)| r == res)
            .map(|(_, (no, _))| *no)
            .min()
    }

    /// A place for one more full sync, unless `defaults/sync-limit` are running already.
    pub fn sync_slot(&self) -> Option<SyncSlot> {
        let limit: usize = self
            .cluster
            .store()
            .value(mars_engine::keys::SYNC_LIMIT)
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let prev = self.syncs.fetch_add(1, Ordering::AcqRel);
        if limit > 0 && prev >= limit {
            self.syncs.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SyncSlot(self.syncs.clone()))
    }

    /// What the metadata says about `res` now.
    pub fn meta(&self, res: &ResourceName) -> mars_engine::ResourceMeta {
        resource_meta(&self.cluster.store(), res).unwrap_or_else(|e| {
            tracing::error!("cannot read the metadata of {res}: {e}");
            mars_engine::ResourceMeta::empty(res.clone())
        })
    }

    pub(crate) fn insert_resource(&self, r: Arc<Resource>) {
        self.resources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(r.cfg.name.clone(), r);
    }

    pub(crate) fn remove_resource(&self, res: &ResourceName) -> Option<Arc<Resource>> {
        self.resources
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(res)
    }

    pub fn resource(&self, res: &ResourceName) -> Option<Arc<Resource>> {
        self.resources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(res)
            .cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Resource>> {
        self.resources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
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

    /// Executes one request. Blocking: call from a blocking thread.
    pub fn handle(&self, req: Request) -> Outcome {
        match req {
            Request::Ping => Ok(Reply::Pong {
                host: self.host.to_string(),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
            }),
            Request::CreateCluster { ip } => self.create_cluster(ip),
            Request::CreateResource { res, disk, size } => self.create_resource(res, &disk, size),
            Request::View { res, window } => self.view(res.as_ref(), window.unwrap_or(60)),
            Request::DeleteHost { host } => self.delete_host(&host),
            Request::SetLinks { pairs } => {
                if self.cluster_id().is_none() {
                    return Err(invalid("this host is not in a cluster"));
                }
                let refs: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let n = self
                    .cluster
                    .store()
                    .set_many(&refs)
                    .map_err(|e| invalid(e.to_string()))?
                    .len();
                self.cluster.poke.notify_waiters();
                Ok(Reply::Done {
                    message: format!("set {n} keys"),
                })
            }
            Request::GetLink { key } => {
                mars_meta::validate_key(&key).map_err(|e| invalid(e.to_string()))?;
                let value = self
                    .cluster
                    .store()
                    .value(&key)
                    .map_err(|e| Refusal(ErrorKind::Failed, e.to_string()))?;
                Ok(Reply::Value { value })
            }
            Request::JoinCluster { .. }
            | Request::LeaveCluster { .. }
            | Request::WaitCluster { .. }
            | Request::UpdateCluster { .. } => Err(Refusal(
                ErrorKind::Failed,
                "internal error: cluster commands are handled asynchronously".into(),
            )),
            Request::JoinResource { res, disk } => self.join_resource(res, &disk),
            Request::LeaveResource { res, force } => self.leave_resource(&res, force),
            Request::DeleteResource { res, force } => self.delete_resource(&res, force),
            Request::Resize { res, size } => self.resize(&res, size),
            Request::Switch { res, switches, on } => self.switch(&res, &switches, on),
            Request::FakeSync { res } => self.fake_sync(&res),
            Request::Invalidate { res } => self.invalidate(&res),
            Request::Cron => self.cron(),
            Request::Secondary { res } => self.secondary(&res),
            Request::LogPurgeAll { res } => self.log_purge_all(&res),
            Request::SetEmergencyLimit { res, pct } => self.set_emergency_limit(&res, pct),
            Request::GetEmergencyLimit { res } => {
                let meta = self.meta(&res);
                if !meta.is_member(&self.host) {
                    return Err(not_found(&res));
                }
                let pct = meta.members[&self.host].emergency_limit.unwrap_or(0);
                Ok(Reply::Done {
                    message: pct.to_string(),
                })
            }
            Request::Primary { .. } => Err(invalid("primary is handled asynchronously")),
            Request::SetSystemdUnit { res, start, stop } => {
                self.set_systemd_unit(&res, &start, stop.as_deref())
            }
            Request::SetSystemdWant { res, want } => self.set_systemd_want(&res, &want),
            Request::SystemdTrigger { res } => self.systemd_trigger(res.as_ref()),
            Request::LogRotate { res } => {
                let r = self.resource(&res).ok_or_else(|| not_found(&res))?;
                let v = r
                    .volume()
                    .ok_or_else(|| invalid(format!("resource {res} is not attached")))?;
                let name = v
                    .rotate()
                    .map_err(|e| Refusal(ErrorKind::Failed, format!("log-rotate {res}: {e}")))?;
                Ok(Reply::Done {
                    message: format!("{res}: now logging to {name}"),
                })
            }
        }
    }

    fn create_cluster(&self, ip: Option<String>) -> Outcome {
        let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let mut cluster = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &*cluster {
            return Err(Refusal(
                ErrorKind::Exists,
                format!(
                    "this host already belongs to cluster {}; create-cluster runs once per cluster",
                    c.uuid
                ),
            ));
        }
        let address = match ip {
            Some(ip) => {
                let bare = ip.rsplit_once(':').map_or(ip.as_str(), |(h, _)| h);
                if bare.parse::<std::net::IpAddr>().is_err() {
                    return Err(invalid(format!("--ip {ip:?} is not an IP address")));
                }
                ip
            }
            None => self.listen.clone(),
        };
        let c = ClusterFile {
            uuid: new_uuid(),
            host: self.host.clone(),
            address,
        };
        self.cluster
            .store()
            .set(&format!("{MEMBER_PREFIX}{}", self.host), &c.address)
            .map_err(|e| Refusal(ErrorKind::Failed, e.to_string()))?;
        root::write_toml(&self.root, CLUSTER_FILE, &c)
            .map_err(|e| Refusal(ErrorKind::Failed, format!("{e:#}")))?;
        let msg = format!(
            "created cluster {} with host {} at {}",
            c.uuid, c.host, c.address
        );
        *cluster = Some(c);
        Ok(Reply::Done { message: msg })
    }

    fn create_resource(&self, res: ResourceName, disk: &Path, size: Option<u64>) -> Outcome {
        let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Err(invalid(
                "this host is not in a cluster yet: run `marsadm create-cluster` first",
            ));
        }
        if self.resource(&res).is_some() {
            return Err(Refusal(
                ErrorKind::Exists,
                format!("resource {res} already exists"),
            ));
        }
        let known = self.meta(&res);
        if known.exists() {
            let members: Vec<String> = known.members.keys().map(ToString::to_string).collect();
            return Err(Refusal(
                ErrorKind::Exists,
                format!(
                    "resource {res} already exists in the cluster (members: {}); use join-resource",
                    members.join(", ")
                ),
            ));
        }
        if !disk.is_absolute() {
            return Err(invalid(format!(
                "disk path {} must be absolute",
                disk.display()
            )));
        }
        let dir = root::resource_dir(&self.root, &res);
        if dir.exists() {
            return Err(Refusal(
                ErrorKind::Exists,
                format!(
                    "{} exists already (leftover of an old resource?)",
                    dir.display()
                ),
            ));
        }
        if let Some(other) = self.all().into_iter().find(|r| r.cfg.disk == disk) {
            return Err(invalid(format!(
                "disk {} is already used by resource {}",
                disk.display(),
                other.cfg.name
            )));
        }
        let disk_len = {
            let f = mars_storage::real::open_disk(disk).map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::NotFound {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::Invalid
                };
                Refusal(kind, format!("cannot use disk {}: {e}", disk.display()))
            })?;
            mars_storage::File::len(&*f)
                .map_err(|e| invalid(format!("cannot size disk {}: {e}", disk.display())))?
        };
        let size = size.unwrap_or(disk_len);
        if size < MIN_RESOURCE_SIZE {
            return Err(invalid(format!(
                "size {} is too small: a resource must be larger than 64 KiB",
                format_size(size)
            )));
        }
        if size % 512 != 0 {
            return Err(invalid(format!(
                "size {size} is not a multiple of 512 bytes"
            )));
        }
        if size > disk_len {
            return Err(invalid(format!(
                "disk {} has {} ({disk_len} bytes), less than the requested {} ({size} bytes)",
                disk.display(),
                format_size(disk_len),
                format_size(size)
            )));
        }
        let cfg = ResourceFile {
            name: res.clone(),
            disk: disk.to_path_buf(),
            size,
        };
        let mut meta = mars_engine::ResourceMeta::empty(res.clone());
        meta.size = Some(size);
        meta.primary = Some(self.host.clone());
        meta.members.insert(
            self.host.clone(),
            mars_engine::Member {
                disk: disk.display().to_string(),
                ..Default::default()
            },
        );
        let created = (|| -> anyhow::Result<Arc<Resource>> {
            std::fs::create_dir(&dir)?;
            root::write_toml(&dir, RESOURCE_FILE, &cfg)?;
            let r = Resource::open(
                cfg,
                dir.clone(),
                &self.host,
                self.tuning.clone(),
                Arc::new(meta),
                false,
            );
            if let Some(e) = r.error() {
                anyhow::bail!("{e}");
            }
            let size_s = size.to_string();
            let disk_s = disk.display().to_string();
            let mut pairs = vec![
                (mars_engine::keys::size(&res), size_s),
                (mars_engine::keys::primary(&res), self.host.to_string()),
                (mars_engine::keys::data(&res, &self.host), disk_s),
            ];
            for sw in mars_api::SwitchKind::ALL {
                pairs.push((
                    mars_engine::keys::todo(&res, &self.host, sw.as_str()),
                    "1".into(),
                ));
            }
            let refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Err(e) = self.cluster.store().set_many(&refs) {
                r.close();
                anyhow::bail!("cannot record the resource in the metadata: {e}");
            }
            Ok(r)
        })();
        let r = match created {
            Ok(r) => r,
            Err(e) => {
                // Leave nothing behind: a refused create changes nothing.
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Refusal(
                    ErrorKind::Failed,
                    format!("cannot create resource {res}: {e:#}"),
                ));
            }
        };
        self.insert_resource(r);
        self.cluster.poke.notify_waiters();
        self.reconcile_now.notify_one();
        tracing::info!(
            "created resource {res} on {} ({size} bytes)",
            disk.display()
        );
        Ok(Reply::Done {
            message: format!(
                "created resource {res} on {} ({}); {} is primary; NBD: {}",
                disk.display(),
                format_size(size),
                self.host,
                self.nbd_unix_uri(res.as_str())
            ),
        })
    }

    fn view(&self, res: Option<&ResourceName>, window: u64) -> Outcome {
        let list = match res {
            Some(r) => vec![self.resource(r).ok_or_else(|| not_found(r))?],
            None => self.all(),
        };
        let ages = self.cluster.ages();
        let win = std::time::Duration::from_secs(window);
        let alive = |h: &HostName| ages.get(h).is_some_and(|a| *a <= win);
        let resources = list
            .iter()
            .map(|r| {
                let n = r.cfg.name.as_str();
                let meta = self.meta(&r.cfg.name);
                r.view(&meta, &alive, self.nbd_unix_uri(n), self.nbd_tcp_uri(n))
            })
            .collect();
        let members = if res.is_none() {
            self.cluster
                .member_views(&self.host, std::time::Duration::from_secs(window))
        } else {
            Vec::new()
        };
        let cluster = self
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| ClusterInfo {
                uuid: c.uuid.clone(),
                host: c.host.to_string(),
                address: c.address.clone(),
            });
        Ok(Reply::View(ClusterView {
            host: self.host.to_string(),
            cluster,
            members,
            resources,
        }))
    }

    /// The cluster id, once this host is in a cluster.
    pub fn cluster_id(&self) -> Option<mars_wire::ClusterId> {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|c| mars_wire::ClusterId::parse(&c.uuid).ok())
    }

    /// The address peers reach this host at (`--ip` of create-cluster, else `--listen`).
    pub fn advertised(&self) -> String {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or_else(|| self.listen.clone(), |c| c.address.clone())
    }

    /// Records the cluster this host joined.
    pub fn set_cluster(&self, id: mars_wire::ClusterId, address: String) -> anyhow::Result<()> {
        let c = ClusterFile {
            uuid: id.to_string(),
            host: self.host.clone(),
            address,
        };
        root::write_toml(&self.root, CLUSTER_FILE, &c)?;
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
        Ok(())
    }

    /// Forgets the cluster (leave-cluster): identity and replicated metadata.
    pub fn forget_cluster(&self) -> anyhow::Result<()> {
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = None;
        std::fs::remove_file(self.root.join(CLUSTER_FILE))?;
        let _ = std::fs::remove_file(self.root.join(crate::cluster::SEEN_FILE));
        let fresh = mars_meta::Store::in_memory(self.host.clone(), mars_meta::system_time_ns)?;
        self.cluster.replace_store(fresh);
        std::fs::remove_file(self.root.join(META_FILE))?;
        let store = mars_meta::Store::open(
            self.root.join(META_FILE),
            self.host.clone(),
            mars_meta::system_time_ns,
        )?;
        self.cluster.replace_store(store);
        Ok(())
    }

    pub fn resource_names(&self) -> Vec<String> {
        self.all().iter().map(|r| r.cfg.name.to_string()).collect()
    }

    /// `lowlevel-delete-host`: removes a (dead) member.
    fn delete_host(&self, host: &str) -> Outcome {
        let host = HostName::new(host).map_err(|e| invalid(e.to_string()))?;
        if host == self.host {
            return Err(invalid("cannot delete this host; use leave-cluster"));
        }
        if !self.cluster.members().contains_key(&host) {
            return Err(Refusal(
                ErrorKind::NotFound,
                format!("host {host} is not a member of this cluster"),
            ));
        }
        self.cluster
            .store()
            .delete(&format!("{MEMBER_PREFIX}{host}"))
            .map_err(|e| Refusal(ErrorKind::Failed, e.to_string()))?;
        self.cluster.poke.notify_waiters();
        Ok(Reply::Done {
            message: format!("removed host {host} from the cluster"),
        })
    }

    /// Closes every volume cleanly.
    pub fn shutdown(&self) {
        for r in self.all() {
            r.close();
        }
    }
}

/// Reads a resource's metadata from the store.
pub fn resource_meta(
    store: &mars_meta::Store,
    res: &ResourceName,
) -> anyhow::Result<mars_engine::ResourceMeta> {
    let entries = store.list_prefix(&mars_engine::keys::prefix(res))?;
    let mut meta = mars_engine::ResourceMeta::from_entries(
        res.clone(),
        entries
            .iter()
            .filter_map(|e| e.value.as_deref().map(|v| (e.key.as_str(), v))),
    );
    let key = mars_engine::keys::primary(res);
    meta.designation = entries.iter().find(|e| e.key == key).map_or(0, |e| e.stamp);
    Ok(meta)
}

pub(crate) fn not_found(res: &ResourceName) -> Refusal {
    Refusal(
        ErrorKind::NotFound,
        format!("resource {res} does not exist"),
    )
}

fn new_uuid() -> String {
    mars_wire::ClusterId(rand::random()).to_string()
}

/// The NBD side sees the daemon as a set of exports: every attached resource, by name.
pub struct DaemonExports(pub Arc<Daemon>);

impl Exports for DaemonExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        let res = ResourceName::new(name).ok()?;
        self.0.resource(&res)?.export()
    }
    fn list(&self) -> Vec<String> {
        self.0
            .all()
            .iter()
            .filter(|r| r.volume().is_some())
            .map(|r| r.cfg.name.to_string())
            .collect()
    }
}
