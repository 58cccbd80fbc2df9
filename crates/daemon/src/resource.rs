//! One resource on this host: its configuration, its volume (when attached) and the NBD export
//! in front of it.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use mars_api::{LogView, Progress, ReplicaView, ResourceView};
use mars_config::HostName;
use mars_engine::{Report, ResourceMeta, Role, Todo};
use mars_nbd::Export;
use mars_replica::control::{self, ControlState, Marker};
use mars_storage::real::{open_disk, RealDir};
use mars_storage::{Dir, File};
use mars_volume::{OpenReport, Volume, VolumeConfig, VolumeError};

use crate::replica::Replica;
use crate::root::ResourceFile;

/// Volume tuning taken from the daemon's flags.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub max_dirty: usize,
    pub max_log_file: u64,
    /// Free space the root keeps; below it secondaries drop their logfiles.
    pub min_free_space: u64,
    /// Below this much free space in the root, primaries enter emergency mode; they leave it
    /// once `min_free_space` is free again.
    pub emergency_free_space: u64,
    /// How the primary's device appears under `device_dir` (`None`: NBD sockets only).
    pub device: DeviceMode,
    pub device_dir: Arc<Path>,
}

/// How a primary's resource appears as a local block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMode {
    /// No local device: NBD sockets only.
    None,
    /// A FUSE file behind a direct-I/O loop device (`mars_blockdev`).
    FuseLoop,
}

pub struct Resource {
    pub cfg: ResourceFile,
    pub dir: PathBuf,
    host: HostName,
    tuning: Tuning,
    /// Current logical size (grows with `resize`).
    size: AtomicU64,
    /// Open on the primary.
    volume: RwLock<Option<Arc<Volume>>>,
    /// Present on a secondary.
    replica: RwLock<Option<Arc<Replica>>>,
    /// Why the volume is not open (recovery refused, disk missing …).
    error: RwLock<Option<(String, String)>>,
    open_count: AtomicU64,
    /// This host is the designated primary: only then are new opens of the device accepted.
    designated: AtomicBool,
    /// Another host took over as designated primary while this one still acts as primary
    /// (its device is open): writes fail until the device is closed and the role is left.
    fenced: Arc<AtomicBool>,
    /// The primary role is being left: fetch and sync sessions end so the volume can close.
    leaving: AtomicBool,
    /// The local block device of the primary (`DEVICE_DIR/RES`).
    device: std::sync::Mutex<Option<mars_blockdev::Device>>,
    /// Why the device could not be set up, if it could not.
    device_error: RwLock<Option<String>>,
    /// The durable `chain-start`: where this host's log last continued after a hole.
    chain_start: Mutex<Option<u64>>,
    /// Control files that could not be written where the operation went on anyway: retried
    /// every reconcile round (`retry_control_files`). Markers (wanted state) …
    pending_markers: Mutex<HashMap<Marker, bool>>,
    /// … and a chain start to record (the emergency marker stays until it is).
    pending_chain_start: Mutex<Option<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The resource directory as the control files see it.
fn control_dir(dir: &Path) -> Result<RealDir, mars_replica::Error> {
    RealDir::open(dir).map_err(|source| mars_replica::Error::Io {
        file: dir.display().to_string(),
        op: "open",
        source,
    })
}

/// What the marker's presence means, for messages.
fn marker_meaning(m: Marker) -> &'static str {
    match m {
        Marker::Replica => "replica",
        Marker::ForcePrimary => "forced-switch",
        Marker::Emergency => "emergency",
    }
}

impl Resource {
    /// Sets up the resource in the role the metadata gives this host: the designated primary
    /// opens its volume (running crash recovery), every other member opens its replica. A
    /// failure leaves the resource present but detached, with the reason shown by `view`.
    ///
    /// `defer_primary`: at daemon start with other cluster members, a primary role found in
    /// the local metadata is taken up by the reconcile loop only once the metadata is fresh
    /// (another host may have taken over while this one was down).
    pub fn open(
        cfg: ResourceFile,
        dir: PathBuf,
        host: &HostName,
        tuning: Tuning,
        meta: Arc<ResourceMeta>,
        defer_primary: bool,
    ) -> Arc<Self> {
        let size = meta.size.unwrap_or(cfg.size).max(cfg.size);
        // What the control files say a restart does (markers: `mars_replica::control`).
        let ctl = control_dir(&dir)
            .and_then(|d| control::read_all(&d))
            .unwrap_or_else(|e| {
                tracing::error!("{}: {e}", cfg.name);
                // The replica marker alone decides the role here; unreadable means replica (a
                // replica never takes up the primary role without catching up).
                let replica = control_dir(&dir)
                    .and_then(|d| control::marker(&d, Marker::Replica))
                    .unwrap_or_else(|e| {
                        tracing::error!("{}: {e}", cfg.name);
                        true
                    });
                ControlState {
                    replica,
                    ..ControlState::default()
                }
            });
        let r = Arc::new(Self {
            cfg,
            dir,
            host: host.clone(),
            tuning,
            size: AtomicU64::new(size),
            volume: RwLock::new(None),
            replica: RwLock::new(None),
            error: RwLock::new(None),
            open_count: AtomicU64::new(0),
            designated: AtomicBool::new(meta.primary.as_ref() == Some(host)),
            fenced: Arc::new(AtomicBool::new(false)),
            leaving: AtomicBool::new(false),
            device: std::sync::Mutex::new(None),
            device_error: RwLock::new(None),
            chain_start: Mutex::new(ctl.chain_start),
            pending_markers: Mutex::new(HashMap::new()),
            pending_chain_start: Mutex::new(None),
        });
        let attach = meta.members.get(host).is_none_or(|m| m.todo.attach);
        if meta.primary.as_ref() == Some(host) && !ctl.replica {
            if attach && !defer_primary {
                r.attach_primary();
            }
        } else {
            r.attach_secondary(meta);
        }
        r
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Is the marker present in the resource directory?
    pub fn marker(&self, m: Marker) -> Result<bool, mars_replica::Error> {
        control::marker(&control_dir(&self.dir)?, m)
    }

    /// Sets or clears a marker durably; a failure is returned, and the caller does not go on.
    /// (It supersedes a pending retry of the same marker.)
    pub fn set_marker(&self, m: Marker, on: bool) -> Result<(), mars_replica::Error> {
        lock(&self.pending_markers).remove(&m);
        control::set_marker(&control_dir(&self.dir)?, m, on)
    }

    /// Sets or clears a marker durably where the operation goes on anyway: a failure is
    /// logged and retried every reconcile round until it succeeds.
    fn set_marker_or_retry(&self, m: Marker, on: bool) {
        if let Err(e) = self.set_marker(m, on) {
            tracing::error!(
                "{}: cannot {} the {} marker: {e} (retried)",
                self.cfg.name,
                if on { "set" } else { "clear" },
                marker_meaning(m)
            );
            lock(&self.pending_markers).insert(m, on);
        }
    }

    /// Emergency mode was not entered after all: the marker goes (retried on failure).
    pub fn clear_emergency_marker(&self) {
        self.set_marker_or_retry(Marker::Emergency, false);
    }

    /// The log continued after a hole at `no` (emergency mode ended): records `chain-start`,
    /// then clears the emergency marker. On failure the chain start is retried every
    /// reconcile round, and the emergency marker stays until it is recorded (a restart
    /// meanwhile makes another hole, which is safe).
    pub fn record_chain_start(&self, no: u64) -> Result<(), mars_replica::Error> {
        let written = control_dir(&self.dir).and_then(|d| control::write_chain_start(&d, no));
        if let Err(e) = written {
            *lock(&self.pending_chain_start) = Some(no);
            return Err(e);
        }
        *lock(&self.chain_start) = Some(no);
        *lock(&self.pending_chain_start) = None;
        self.set_marker_or_retry(Marker::Emergency, false);
        Ok(())
    }

    /// Where this host's log last continued after a hole (durably recorded).
    pub fn chain_start(&self) -> Option<u64> {
        *lock(&self.chain_start)
    }

    /// Retries the control-file writes that failed where the operation went on (called every
    /// reconcile round); success is logged, a failure again only stays pending.
    pub fn retry_control_files(&self) {
        let pending = *lock(&self.pending_chain_start);
        if let Some(no) = pending {
            if self.record_chain_start(no).is_ok() {
                tracing::info!("{}: recorded the chain start {no}", self.cfg.name);
            }
        }
        let markers: Vec<(Marker, bool)> = lock(&self.pending_markers)
            .iter()
            .map(|(m, on)| (*m, *on))
            .collect();
        for (m, on) in markers {
            match self.set_marker(m, on) {
                Ok(()) => tracing::info!(
                    "{}: {} the {} marker",
                    self.cfg.name,
                    if on { "set" } else { "cleared" },
                    marker_meaning(m)
                ),
                Err(_) => {
                    lock(&self.pending_markers).entry(m).or_insert(on);
                }
            }
        }
    }

    /// Users of the resource now: NBD connections plus openers of the local block device
    /// (a mounted filesystem counts as one).
    pub fn open_count(&self) -> u64 {
        let dev = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |d| d.open_count() as u64);
        self.open_count.load(Ordering::Relaxed) + dev
    }

    /// Path of the local block device, while there is one.
    pub fn device_path(&self) -> Option<PathBuf> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|d| d.node_path().to_path_buf())
    }

    /// Sets up `DEVICE_DIR/RES` for the freshly opened volume (primary only). A failure is
    /// reported in `view`; NBD keeps working.
    fn attach_device(&self, vol: Arc<Volume>) {
        if self.tuning.device == DeviceMode::None {
            return;
        }
        let mut slot = self.device.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        let export = Arc::new(VolumeExport {
            vol,
            fenced: self.fenced.clone(),
            name: self.cfg.name.to_string(),
            _opener: None,
        });
        let res = std::fs::create_dir_all(&self.tuning.device_dir)
            .map_err(|e| format!("{}: {e}", self.tuning.device_dir.display()))
            .and_then(|()| {
                mars_blockdev::Device::attach(
                    export,
                    &self.tuning.device_dir,
                    self.cfg.name.as_str(),
                    &mars_blockdev::DeviceOptions::default(),
                )
                .map_err(|e| e.to_string())
            });
        match res {
            Ok(d) => {
                tracing::info!(
                    "{}: device {} ({})",
                    self.cfg.name,
                    d.node_path().display(),
                    d.loop_path().display()
                );
                *slot = Some(d);
                *self.device_error.write().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Err(e) => {
                tracing::error!("{}: cannot set up the block device: {e}", self.cfg.name);
                *self.device_error.write().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    }

    /// Removes the local block device; refused (it stays) while it is in use.
    pub fn detach_device(&self) -> anyhow::Result<()> {
        let mut slot = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let Some(d) = slot.take() else {
            return Ok(());
        };
        match d.detach() {
            Ok(()) => Ok(()),
            Err(e) => {
                *slot = e.device.map(|b| *b);
                anyhow::bail!("{}", e.error)
            }
        }
    }

    pub fn grow_device(&self, size: u64) {
        if let Some(d) = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            if let Err(e) = d.grow(size) {
                tracing::error!("{}: cannot grow the device: {e}", self.cfg.name);
            }
        }
    }

    pub fn set_size(&self, size: u64) {
        if self.size.fetch_max(size, Ordering::Relaxed) < size {
            self.grow_device(size);
        }
    }

    /// Opens the primary's volume (crash recovery included).
    pub fn attach_primary(&self) {
        if self.volume().is_some() {
            return;
        }
        let mut cfg = self.cfg.clone();
        cfg.size = self.size();
        // Not knowing whether it was in emergency mode, the log must not be continued.
        let emergency = match self.marker(Marker::Emergency) {
            Ok(on) => on,
            Err(e) => {
                tracing::error!("{}: cannot attach: {e}", self.cfg.name);
                *self.error.write().unwrap_or_else(|e| e.into_inner()) =
                    Some(("Detached".into(), e.to_string()));
                return;
            }
        };
        match open_volume(&cfg, &self.dir, &self.host, &self.tuning) {
            Ok((v, report)) => {
                if emergency {
                    // Restarted in emergency mode: writes bypassed the log, so the log must not
                    // simply continue; replicas have to stop at a hole.
                    match v.restart_log_after_gap() {
                        Ok(no) => {
                            tracing::warn!(
                                "{}: was in emergency mode: the log continues at {no} after a hole",
                                self.cfg.name
                            );
                            if let Err(e) = self.record_chain_start(no) {
                                tracing::error!(
                                    "{}: cannot record the chain start {no}: {e} (retried; the \
                                     emergency marker stays until it is recorded)",
                                    self.cfg.name
                                );
                            }
                        }
                        Err(e) => {
                            tracing::error!("{}: cannot restart the log: {e}", self.cfg.name);
                            *self.error.write().unwrap_or_else(|e| e.into_inner()) =
                                Some(("Detached".into(), e.to_string()));
                            return;
                        }
                    }
                }
                if report.replayed > 0 || report.truncated.is_some() {
                    tracing::info!(
                        "{}: recovery replayed {} records from {}{}",
                        self.cfg.name,
                        report.replayed,
                        report.from,
                        report
                            .truncated
                            .as_ref()
                            .map(|(f, n)| format!(", cut a torn tail of {n} bytes off {f}"))
                            .unwrap_or_default()
                    );
                }
                let v = Arc::new(v);
                *self.volume.write().unwrap_or_else(|e| e.into_inner()) = Some(v.clone());
                *self.error.write().unwrap_or_else(|e| e.into_inner()) = None;
                self.attach_device(v);
            }
            Err(e) => {
                let state = match &e {
                    OpenError::Volume(VolumeError::Log(_)) => "DefectiveLog",
                    _ => "Detached",
                };
                tracing::error!("{}: cannot attach: {e}", self.cfg.name);
                *self.error.write().unwrap_or_else(|e| e.into_inner()) =
                    Some((state.into(), e.to_string()));
            }
        }
    }

    pub fn attach_secondary(&self, meta: Arc<ResourceMeta>) {
        self.set_marker_or_retry(Marker::Replica, true);
        match Replica::open(
            self.cfg.name.clone(),
            self.host.clone(),
            &self.dir,
            &self.cfg.disk,
            self.size(),
            meta,
        ) {
            Ok(rep) => {
                *self.replica.write().unwrap_or_else(|e| e.into_inner()) = Some(rep);
            }
            Err(e) => {
                tracing::error!("{}: cannot open the replica: {e:#}", self.cfg.name);
                *self.error.write().unwrap_or_else(|e| e.into_inner()) =
                    Some(("Detached".into(), format!("{e:#}")));
            }
        }
    }

    pub fn volume(&self) -> Option<Arc<Volume>> {
        self.volume
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn replica(&self) -> Option<Arc<Replica>> {
        self.replica
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn error(&self) -> Option<String> {
        self.error
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, m)| m.clone())
    }

    /// Closes the volume cleanly (log synced, everything written back) and stops the replica.
    pub fn close(&self) {
        if let Err(e) = self.detach_device() {
            tracing::error!("{}: device: {e}", self.cfg.name);
            // Still held by somebody: drop it anyway (its users see I/O errors from now on).
            drop(self.device.lock().unwrap_or_else(|e| e.into_inner()).take());
        }
        if let Some(rep) = self
            .replica
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            rep.shutdown();
        }
        if let Err(v) = self.close_volume() {
            // Connections still hold it: sync the log at least; writeback finishes when the
            // last holder drops it, and recovery covers the rest.
            if let Err(e) = v.flush() {
                tracing::error!("{}: flush at close: {e}", self.cfg.name);
            }
        }
    }

    /// Takes the volume and closes it; gives it back if somebody still holds it after a
    /// few seconds (fetch and sync sessions hold it only for a moment at a time).
    fn close_volume(&self) -> Result<(), Arc<Volume>> {
        let taken = self
            .volume
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut v) = taken else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            match Arc::try_unwrap(v) {
                Ok(vol) => {
                    if let Err(e) = vol.close() {
                        tracing::error!("{}: close: {e}", self.cfg.name);
                    }
                    return Ok(());
                }
                Err(still) if std::time::Instant::now() < deadline => {
                    v = still;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(still) => return Err(still),
            }
        }
    }

    pub fn set_designated(&self, on: bool) {
        self.designated.store(on, Ordering::Relaxed);
    }

    pub fn set_fenced(&self, on: bool) {
        if self.fenced.swap(on, Ordering::Relaxed) != on && on {
            tracing::error!(
                "{}: another host is the primary now, but the device is still open here: \
                 writes fail until it is closed (split brain)",
                self.cfg.name
            );
        }
    }

    /// The primary role is being left (serving sessions must let go of the volume).
    pub fn leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Leaves the primary role (the device is closed): the log is synced and everything
    /// written back, then the directory becomes a replica that follows the new primary. The
    /// caller publishes the version links of the now complete logfiles.
    pub fn step_down(&self, meta: Arc<ResourceMeta>) -> anyhow::Result<()> {
        if self.volume().is_none() {
            return Ok(());
        }
        self.detach_device()?;
        self.leaving.store(true, Ordering::Release);
        let closed = self.close_volume();
        self.leaving.store(false, Ordering::Release);
        if let Err(v) = closed {
            *self.volume.write().unwrap_or_else(|e| e.into_inner()) = Some(v.clone());
            self.attach_device(v);
            anyhow::bail!("the volume is still in use");
        }
        // A logfile we started but never wrote to is no history: drop it, or the next primary's
        // logfile with the same number would look like a fork.
        let d = control_dir(&self.dir)?;
        mars_replica::copies::drop_empty_tail(&d, &self.host)?;
        // Everything is written back: the replica starts at the end of the last logfile, which
        // is what this host reports as its log end (the next primary must have all of it).
        if let (Some(&(no, len)), Some(pos)) =
            (log_lengths(&self.dir).last(), control::read_position(&d)?)
        {
            if pos.file > no {
                control::write_position(&d, mars_txlog::LogPos::new(no, len))?;
            }
        }
        self.fenced.store(false, Ordering::Relaxed);
        self.attach_secondary(meta);
        match self.error() {
            Some(e) if self.replica().is_none() => anyhow::bail!("{e}"),
            _ => Ok(()),
        }
    }

    /// Takes over the primary role: stops the replica (waiting for its tasks), cuts what was
    /// fetched beyond the replay position (a forced switch takes what it has replayed; a
    /// planned one has replayed everything), and opens the volume, which continues in a new
    /// logfile.
    pub fn promote(&self) -> anyhow::Result<mars_txlog::LogPos> {
        let Some(rep) = self.replica() else {
            anyhow::bail!("no replica to promote");
        };
        if !rep.stop_and_wait(std::time::Duration::from_secs(10)) {
            anyhow::bail!("the replica's tasks did not stop in time");
        }
        // The cut is durable before the marker goes; a crash or a failure in between repeats
        // the cut at the next promotion (it is idempotent).
        let at = rep.cut_for_promotion()?;
        self.set_marker(Marker::Replica, false)
            .map_err(|e| anyhow::anyhow!("cannot clear the replica marker: {e}"))?;
        *self.replica.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.attach_primary();
        if self.volume().is_none() {
            // Back to a replica, with the reason visible.
            let err = self.error().unwrap_or_default();
            self.set_marker_or_retry(Marker::Replica, true);
            anyhow::bail!("cannot open the volume: {err}");
        }
        self.set_marker_or_retry(Marker::ForcePrimary, false);
        Ok(at)
    }

    /// What this host reports about itself for this resource (`actual-HOST`).
    pub fn report(&self, todo: &Todo) -> Report {
        let mut rep = Report {
            open_count: self.open_count(),
            ..Default::default()
        };
        if let Some(v) = self.volume() {
            let s = v.status();
            rep.role = Role::Primary;
            rep.attached = true;
            rep.consistent = true;
            rep.applied = Some(s.written_back);
            rep.log_end = Some(s.durable);
            rep.pin = Some(s.written_back.file.min(s.current_log.no));
            rep.dirty_bytes = s.dirty_bytes;
            rep.disk_size = s.size;
            rep.stuck = s.error.clone();
            rep.emergency = v.passthrough();
            let mut logs = log_lengths(&self.dir);
            // The current logfile counts up to its durable end (what replicas can fetch).
            if let Some(last) = logs.last_mut() {
                if last.0 == s.durable.file {
                    last.1 = s.durable.offset;
                }
            }
            let skip = logs.len().saturating_sub(64);
            rep.logs = logs.split_off(skip);
        } else if let Some(r) = self.replica() {
            let s = r.status();
            rep.role = Role::Secondary;
            rep.attached = todo.attach;
            rep.applied = Some(s.applied);
            rep.log_end = s.fetched.or(Some(s.applied));
            rep.sync = s.sync;
            rep.consistent = s.consistent;
            rep.pin = r.pin();
            rep.needs_sync = s.needs_sync.is_some();
            rep.stuck = s.stuck;
            rep.fetch_rate = s.fetch_rate;
            rep.replay_rate = s.replay_rate;
            rep.caught_up = todo.fetch && s.caught_up_ms.is_some();
            rep.forked = s.forked;
            rep.disk_size = self.size();
        } else {
            rep.stuck = self.error();
        }
        rep
    }

    pub fn view(
        &self,
        meta: &ResourceMeta,
        alive: &dyn Fn(&HostName) -> bool,
        unix_uri: String,
        tcp_uri: Option<String>,
    ) -> ResourceView {
        let vol = self.volume();
        let rep = self.replica();
        let err = self.error.read().unwrap_or_else(|e| e.into_inner()).clone();
        // This host's line is computed from live local state, not from the last published report.
        let todo = meta
            .members
            .get(&self.host)
            .map(|m| m.todo)
            .unwrap_or_default();
        let mut local = meta.clone();
        // Our report as of now, made under the designation we know (as the reconcile loop
        // publishes it): rules that trust only reports under the current designation (the
        // primary's current logfile in `split_brain`) must not discount our own.
        let mut now = self.report(&todo);
        now.designation = meta.designation;
        local.members.entry(self.host.clone()).or_default().report = Some(now);
        let st = mars_engine::member_state(&local, &self.host, &|h| *h == self.host || alive(h));
        let (mut disk_state, repl_state, flags) = (st.disk_state, st.repl_state, st.flags);
        if let (None, None, Some((state, _))) = (&vol, &rep, &err) {
            disk_state = state.clone();
        }
        let log = vol.as_ref().map(|v| {
            let s = v.status();
            let (files, bytes) = log_usage(&self.dir);
            LogView {
                current: s.current_log.to_string(),
                appended: s.appended.to_string(),
                durable: s.durable.to_string(),
                written_back: s.written_back.to_string(),
                dirty_bytes: s.dirty_bytes,
                pending_records: s.pending_records,
                writes: s.writes,
                logfiles: files,
                log_bytes: bytes,
            }
        });
        let mut sync = None;
        let mut fetch = None;
        let mut replay = None;
        let mut stuck = None;
        let mut consistent = vol.is_some();
        let mut caught_up_ms = None;
        if let Some(r) = &rep {
            let s = r.status();
            caught_up_ms = s.caught_up_ms;
            consistent = s.consistent;
            stuck = s.stuck.clone().or(s.fetch_error.clone());
            sync = s.sync.as_ref().map(|y| Progress {
                done: y.done,
                total: y.size,
                rate: y.rate,
                logs: None,
            });
            let primary_end = meta.bytes_after(s.applied);
            let fetched_rest = s.fetched.and_then(|f| meta.bytes_after(f)).or(primary_end);
            if let Some(total) = primary_end {
                let fetched = total.saturating_sub(fetched_rest.unwrap_or(total));
                fetch = Some(Progress {
                    done: fetched,
                    total,
                    rate: s.fetch_rate,
                    logs: Some(s.logs),
                });
                replay = Some(Progress {
                    done: 0,
                    total,
                    rate: s.replay_rate,
                    logs: Some(s.logs),
                });
            }
        }
        let members = meta
            .members
            .keys()
            .map(|h| {
                let m = if *h == self.host { &local } else { meta };
                let st = mars_engine::member_state(m, h, &|x| *x == self.host || alive(x));
                let mem = &m.members[h];
                let r = mem.report.as_ref();
                ReplicaView {
                    host: h.to_string(),
                    disk: mem.disk.clone(),
                    role: match r.map(|r| r.role) {
                        Some(Role::Primary) => "Primary",
                        _ => "Secondary",
                    }
                    .into(),
                    disk_state: st.disk_state,
                    repl_state: st.repl_state,
                    flags: st.flags,
                    alive: *h == self.host || alive(h),
                    consistent: r.is_some_and(|r| r.consistent),
                    applied: r.and_then(|r| r.applied).map(|p| p.to_string()),
                    behind: st.behind,
                    sync: r.and_then(|r| r.sync.as_ref()).map(|y| Progress {
                        done: y.done,
                        total: y.size,
                        rate: y.rate,
                        logs: None,
                    }),
                    stuck: r.and_then(|r| r.stuck.clone()),
                    systemd: meta.systemd.status.get(h).map(|st| st.summary()),
                }
            })
            .collect();
        ResourceView {
            name: self.cfg.name.to_string(),
            size: self.size(),
            disk: self.cfg.disk.clone(),
            role: if vol.is_some() {
                "Primary"
            } else {
                "Secondary"
            }
            .into(),
            primary: meta.primary.as_ref().map_or(
                mars_engine::keys::NO_PRIMARY.to_string(),
                ToString::to_string,
            ),
            disk_state,
            repl_state,
            flags,
            log,
            device: self.device_path().map(|p| p.display().to_string()),
            device_error: self
                .device_error
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            nbd_unix_uri: vol.as_ref().map(|_| unix_uri),
            nbd_tcp_uri: vol.as_ref().and(tcp_uri),
            open_count: self.open_count(),
            error: err.map(|(_, m)| m),
            consistent,
            sync,
            fetch,
            replay,
            stuck,
            caught_up_ms,
            members,
            split_brain: mars_engine::split_brain(&local, &|h| *h == self.host || alive(h)).map(
                |sb| mars_api::SplitBrainView {
                    logfile: sb.logfile,
                    sides: sb
                        .sides
                        .into_iter()
                        .map(|s| mars_api::SplitSide {
                            hosts: s.hosts.iter().map(ToString::to_string).collect(),
                            bytes: s.bytes,
                        })
                        .collect(),
                },
            ),
            systemd: meta
                .systemd
                .start_unit
                .as_ref()
                .map(|start| mars_api::SystemdView {
                    start_unit: start.clone(),
                    stop_unit: meta.systemd.stop().unwrap_or(start).to_string(),
                    want: meta.systemd.want_raw.clone(),
                }),
        }
    }

    /// An export handle for one NBD connection; dropping it lowers the open count. Only the
    /// designated primary accepts new opens.
    pub fn export(self: &Arc<Self>) -> Option<Arc<dyn Export>> {
        if !self.designated.load(Ordering::Relaxed) {
            return None;
        }
        let vol = self.volume()?;
        self.open_count.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(VolumeExport {
            vol,
            fenced: self.fenced.clone(),
            name: self.cfg.name.to_string(),
            _opener: Some(Opener(self.clone())),
        }))
    }
}

/// `(number, length)` of the logfiles in `dir`, oldest first.
pub fn log_lengths(dir: &Path) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(Some(n)) = mars_txlog::LogName::parse(&e.file_name().to_string_lossy()) {
                v.push((n.no, e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    v.sort();
    v
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("disk {path}: {source}")]
    Disk { path: String, source: io::Error },
    #[error("resource directory {path}: {source}")]
    Dir { path: String, source: io::Error },
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

pub fn open_volume(
    cfg: &ResourceFile,
    dir: &Path,
    host: &HostName,
    tuning: &Tuning,
) -> Result<(Volume, OpenReport), OpenError> {
    let disk: Arc<dyn File> = open_disk(&cfg.disk).map_err(|source| OpenError::Disk {
        path: cfg.disk.display().to_string(),
        source,
    })?;
    let d: Arc<dyn Dir> = Arc::new(RealDir::open(dir).map_err(|source| OpenError::Dir {
        path: dir.display().to_string(),
        source,
    })?);
    let mut vc = VolumeConfig::new(host.clone(), cfg.size);
    vc.max_dirty = tuning.max_dirty;
    vc.log.max_file_size = tuning.max_log_file;
    Ok(Volume::open(vc, d, disk)?)
}

pub fn log_usage(dir: &Path) -> (u64, u64) {
    let mut n = 0;
    let mut bytes = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("log-") {
                n += 1;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (n, bytes)
}

/// A view of the volume for one user of the resource: an NBD connection, or the local block
/// device (whose requests from the FUSE file go straight to the volume, no NBD hop). Writes
/// fail once the resource is fenced.
struct VolumeExport {
    vol: Arc<Volume>,
    fenced: Arc<AtomicBool>,
    name: String,
    /// NBD connections count as openers until dropped; the block device does not (its own
    /// users do).
    _opener: Option<Opener>,
}

/// One counted opener of a resource; dropping it lowers the open count.
struct Opener(Arc<Resource>);

impl Drop for Opener {
    fn drop(&mut self) {
        self.0.open_count.fetch_sub(1, Ordering::Relaxed);
    }
}

fn io_err(e: VolumeError) -> io::Error {
    tracing::debug!("I/O error for the NBD client: {e}");
    io::Error::from_raw_os_error(e.errno())
}

impl VolumeExport {
    fn check_fenced(&self) -> io::Result<()> {
        if self.fenced.load(Ordering::Relaxed) {
            // EIO: the filesystem above sees a failed write, as on a disk that went away.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.vol.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn description(&self) -> String {
        format!("mars resource {}", self.name)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.vol.read(offset, buf).map_err(io_err)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check_fenced()?;
        self.vol
            .write(offset, data, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check_fenced()?;
        self.vol
            .write_zeroes(offset, len, may_trim, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_fenced()?;
        self.vol
            .discard(offset, len, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn flush(&self) -> io::Result<()> {
        self.vol.flush().map(|_| ()).map_err(io_err)
    }
}
