//! This host: its identity, the registry of its resources (one actor each), and what every
//! actor needs to hear about the host — which members are reachable, their addresses, how much
//! space the root has. Each of those is measured once here and handed to the actors as a
//! `watch`, sent only when it changes in a way that matters to a decision.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use mars_config::{HostName, ResourceName};
use mars_engine::resource::{Liveness, LocalFacts};
use mars_engine::{keys, EngineConfig, HostSettings, Timing};
use tokio::sync::{mpsc, watch};

use crate::identity::Identity;
use crate::local::space::Growth;
use crate::local::{DeviceMode, Tuning};
use crate::meta::{Cluster, MetaStore};
use crate::resource::{self, Env, Handle, Space};
use crate::root::{self, ResourceFile, RESOURCE_FILE};
use crate::systemd::Systemd;

/// How often liveness and free space are measured.
const MEASURE_EVERY: Duration = Duration::from_secs(1);
/// How often the backing disks' sizes are looked at (a grown disk is measured by its
/// resource then: `resize` decides on the members' reported sizes).
const DISKS_EVERY: u32 = 5;

pub struct Host {
    pub ident: Arc<Identity>,
    pub cluster: Arc<Cluster>,
    pub store: MetaStore,
    pub tuning: Tuning,
    pub systemd: Arc<Systemd>,
    env: Arc<Env>,
    registry: RwLock<BTreeMap<ResourceName, Handle>>,
    liveness: watch::Sender<Liveness>,
    addrs: watch::Sender<Arc<BTreeMap<HostName, String>>>,
    space: watch::Sender<Space>,
    ended: std::sync::Mutex<Option<mpsc::UnboundedReceiver<ResourceName>>>,
    /// Serialises commands that create or remove resources.
    pub admin: tokio::sync::Mutex<()>,
    /// When the host last measured (the watchdog pings while it does).
    measured: std::sync::Mutex<std::time::Instant>,
    /// How fast the logfiles on the root grow (sampled with the disks).
    growth: Arc<std::sync::Mutex<Growth>>,
}

impl Host {
    pub fn new(
        ident: Arc<Identity>,
        store: MetaStore,
        tuning: Tuning,
        systemd: Arc<Systemd>,
    ) -> Arc<Host> {
        let cluster = Arc::new(Cluster::new(store.clone(), ident.clone()));
        let (liveness, live_rx) = watch::channel(Liveness::default());
        let (addrs, addrs_rx) = watch::channel(Arc::new(BTreeMap::new()));
        let (space, space_rx) = watch::channel(Space::default());
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let cfg = EngineConfig {
            timing: Timing::standard(),
            host: HostSettings {
                min_free_space: tuning.min_free_space,
                emergency_free_space: tuning.emergency_free_space,
                local_device: tuning.device != DeviceMode::None,
            },
            bugs: Default::default(),
        };
        let env = Arc::new(Env {
            ident: ident.clone(),
            store: store.clone(),
            cfg,
            tuning: tuning.clone(),
            systemd: systemd.clone(),
            liveness: live_rx,
            addrs: addrs_rx,
            space: space_rx,
            sync_slots: Arc::new(crate::replication::SyncSlots::default()),
            ended: ended_tx,
            epoch: tokio::time::Instant::now(),
        });
        let host = Arc::new(Host {
            ident,
            cluster,
            store,
            tuning,
            systemd: systemd.clone(),
            env,
            registry: RwLock::new(BTreeMap::new()),
            liveness,
            addrs,
            space,
            ended: std::sync::Mutex::new(Some(ended_rx)),
            admin: tokio::sync::Mutex::new(()),
            measured: std::sync::Mutex::new(std::time::Instant::now()),
            growth: Arc::default(),
        });
        let weak = Arc::downgrade(&host);
        systemd.set_resources(Box::new(move || {
            weak.upgrade().map_or_else(Vec::new, |h| {
                h.all()
                    .iter()
                    .map(|r| {
                        let snap = r.snapshot();
                        crate::systemd::LocalStack {
                            name: r.name.to_string(),
                            systemd: snap.meta.systemd.clone(),
                            primary: snap.meta.primary.as_ref().map(|p| p.to_string()),
                            emergency: snap.status.report.emergency,
                            roles: roles_of(&snap, &h.ident.host, &h.liveness()),
                            amounts: amounts_of(&snap),
                        }
                    })
                    .collect()
            })
        }));
        host
    }

    /// Starts the actors of the resources found under the root, after a first measurement
    /// (they start knowing who is reachable and whether the metadata is fresh).
    pub async fn load_resources(&self) -> Result<()> {
        self.measure().await;
        for (name, dir) in root::resource_dirs(&self.ident.root)? {
            let Some(cfg) = root::read_toml::<ResourceFile>(&dir.join(RESOURCE_FILE))? else {
                tracing::warn!("{}: no {RESOURCE_FILE}, ignoring", dir.display());
                continue;
            };
            if cfg.name != name {
                anyhow::bail!("{}: names resource {:?}", dir.display(), cfg.name.as_str());
            }
            self.start_resource(cfg, &dir)?;
        }
        Ok(())
    }

    /// Starts the actor of a resource whose directory exists.
    pub fn start_resource(&self, cfg: ResourceFile, dir: &Path) -> Result<Handle> {
        let facts = local_facts(dir, cfg.size)?;
        let h = resource::spawn(
            self.env.clone(),
            cfg.name.clone(),
            dir.to_path_buf(),
            cfg.disk.clone(),
            facts,
        );
        self.registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cfg.name, h.clone());
        Ok(h)
    }

    pub fn get(&self, res: &ResourceName) -> Option<Handle> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(res)
            .filter(|h| !h.is_closed())
            .cloned()
    }

    pub fn all(&self) -> Vec<Handle> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|h| !h.is_closed())
            .cloned()
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.all().iter().map(|h| h.name.to_string()).collect()
    }

    /// Measures what the actors need to hear about the host, and forgets ended actors.
    pub async fn run(self: Arc<Self>) {
        let mut ended = self
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("run once");
        let mut global = self.store.watch_global();
        let mut tick = tokio::time::interval(MEASURE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(DISKS_EVERY) {
                        self.look_at_disks().await;
                    }
                }
                _ = global.changed() => {}
                Some(name) = ended.recv() => {
                    let mut reg = self.registry.write().unwrap_or_else(|e| e.into_inner());
                    if reg.get(&name).is_some_and(Handle::is_closed) {
                        reg.remove(&name);
                    }
                    continue;
                }
            }
            self.measure().await;
        }
    }

    /// The engine's timing constants.
    pub fn engine_timing(&self) -> &Timing {
        &self.env.cfg.timing
    }

    pub fn last_measured(&self) -> std::time::Instant {
        *self.measured.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (at most `limit`) until every resource has set itself up: its volume or replica is
    /// open, or it knows why not. A primary role found on disk that waits for the other members
    /// counts as settled (it is not served until they answered).
    pub async fn wait_settled(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let pending: Vec<String> = self
                .all()
                .iter()
                .filter(|h| !h.snapshot().status.settled)
                .map(|h| h.name.to_string())
                .collect();
            if pending.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("still setting up: {}", pending.join(", "));
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Which members are reachable and which still pin logfiles, as last measured.
    pub fn liveness(&self) -> Liveness {
        self.liveness.borrow().clone()
    }

    /// How fast the logfiles on the root grow, in bytes per second (0: they do not).
    pub fn log_growth(&self) -> f64 {
        self.growth.lock().unwrap_or_else(|e| e.into_inner()).rate()
    }

    /// Pokes every resource whose backing disk changed size; samples the logfiles' growth.
    async fn look_at_disks(&self) {
        let all = self.all();
        let growth = self.growth.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let dirs: Vec<_> = all.iter().map(|h| h.dir.clone()).collect();
            growth
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sample(std::time::Instant::now(), &dirs);
            for h in all {
                let now = crate::resource::disk_len(&h.disk).unwrap_or(0);
                let before = h
                    .shared
                    .disk_size
                    .swap(now, std::sync::atomic::Ordering::Relaxed);
                if before != now {
                    h.shared.opened.notify_one();
                }
            }
        })
        .await;
    }

    async fn measure(&self) {
        *self.measured.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        let addrs = self.cluster.members().await;
        self.addrs.send_if_modified(|a| {
            if **a != addrs {
                *a = Arc::new(addrs.clone());
                true
            } else {
                false
            }
        });
        let ages = self.cluster.ages().await;
        let limit = Duration::from_secs(
            self.store
                .value(keys::UNREACHABLE_LIMIT)
                .await
                .ok()
                .flatten()
                .and_then(|v| v.parse().ok())
                .unwrap_or(keys::DEFAULT_UNREACHABLE_SECS),
        );
        let sync_limit = self
            .store
            .value(keys::SYNC_LIMIT)
            .await
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.env.sync_slots.set_limit(sync_limit);
        // MARS's `set-global-enabled-net-compressions`: what fetch and sync streams may use
        // from their next session on (absent: none, as in MARS).
        let compressions = self
            .store
            .value(keys::NET_COMPRESSIONS)
            .await
            .ok()
            .flatten()
            .map_or(mars_wire::Methods::NONE, |v| {
                mars_wire::Methods::from_setting(&v)
            });
        crate::peer::set_net_compressions(compressions);
        let window = Duration::from_millis(self.env.cfg.timing.alive_window);
        let me = &self.ident.host;
        // The rule of `view`'s ALIVE: a member that neither answers us nor refreshes its stamp
        // is gone before the window ends, so that `primary --force` does not count a crashed
        // primary as reachable (and ask for confirmation) after `view` said NOT ALIVE.
        let connected = self.cluster.connected_peers();
        let reachable: BTreeSet<HostName> = ages
            .iter()
            .filter(|(h, a)| {
                *h != me
                    && crate::meta::cluster::alive_for_view(
                        Some(**a),
                        connected.contains(*h),
                        window,
                    )
            })
            .map(|(h, _)| h.clone())
            .collect();
        let pinning: BTreeSet<HostName> = ages
            .iter()
            .filter(|(h, a)| *h != me && **a <= limit)
            .map(|(h, _)| h.clone())
            .collect();
        let fresh = self.cluster.fresh().await;
        let live = Liveness {
            reachable,
            pinning,
            fresh,
        };
        self.liveness.send_if_modified(|l| {
            if *l != live {
                *l = live.clone();
                true
            } else {
                false
            }
        });
        let st = statvfs(&self.ident.root);
        let now = Space {
            free: st.map(|s| s.0),
            total: st.map(|s| s.1),
        };
        let (em, min) = (self.tuning.emergency_free_space, self.tuning.min_free_space);
        // Free space changes with every write; the actors hear of it when it crosses a
        // threshold a decision depends on (they read the current value when they measure).
        let band = |s: &Space| s.free.map(|f| (f < em, f < min));
        self.space.send_if_modified(|s| {
            let changed = band(s) != band(&now);
            *s = now;
            changed
        });
    }

    /// Closes every resource cleanly.
    pub async fn shutdown(&self) {
        for h in self.all() {
            h.shutdown().await;
        }
    }
}

/// What the control files of a resource directory say at start.
fn local_facts(dir: &Path, size: u64) -> Result<LocalFacts> {
    let d = mars_storage::real::RealDir::open(dir).with_context(|| format!("{}", dir.display()))?;
    let c = mars_replica::control::read_all(&d).with_context(|| format!("{}", dir.display()))?;
    Ok(LocalFacts {
        replica_marker: c.replica,
        force_marker: c.force_primary,
        emergency_marker: c.emergency,
        chain_start: c.chain_start,
        size,
    })
}

/// `(free, total)` bytes of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize))
}

/// Who acts as primary of a resource, for `%is-primary{}` in templates: this host when its
/// device is open, another member when its last report says so and it is reachable (as
/// `view` shows no role of a member that is not alive).
fn roles_of(
    snap: &crate::resource::Snapshot,
    me: &HostName,
    live: &mars_engine::resource::Liveness,
) -> mars_unitgen::Roles {
    let mut roles = mars_unitgen::Roles::default();
    for (hn, m) in &snap.meta.members {
        let acting = if hn == me {
            snap.status.primary
        } else {
            live.reachable.contains(hn)
                && m.report
                    .as_ref()
                    .is_some_and(|r| r.role == mars_engine::Role::Primary)
        };
        if acting {
            roles.acting.insert(hn.to_string());
        }
        roles.members.push(hn.to_string());
    }
    if snap.status.primary {
        roles.acting.insert(me.to_string());
    }
    roles
}

/// This host's sync, fetch and replay of a resource for the amount macros in templates:
/// the progress `view` shows (`resource::jobs`).
fn amounts_of(snap: &crate::resource::Snapshot) -> mars_unitgen::Amounts {
    let jobs = crate::resource::jobs(snap);
    let p = |p: mars_api::Progress| mars_unitgen::Progress {
        done: p.done,
        total: p.total,
        rate: p.rate,
    };
    mars_unitgen::Amounts {
        size: snap.status.size,
        sync: jobs.sync.map(p),
        fetch: jobs.fetch.map(p),
        replay: jobs.replay.map(p),
    }
}
