//! Carrying out the engine's commands, in order. A command whose completion the engine waits
//! for queues it as an event; a failure stops the rest of the output (the caller reports it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::Instrument as _;

use mars_engine::resource::{
    Command, CopyDecision, Done, Event, FetchEvent, Level, OpenFailure, Opened, SyncEvent,
};
use mars_volume::VolumeError;
use tokio::sync::{mpsc, oneshot};

use super::{Env, Worker};
use crate::local::volume::{self, OpenError};
use crate::local::Shared;
use crate::local::{replica, ReplicaDir};
use crate::replication::{fetch, replay, sync, Stop};
use crate::replication::{Rates, Sink};
use mars_config::HostName;
use mars_config::ResourceName;
use mars_engine::resource::{OpReply, Stats};
use mars_wire::ClusterId;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

type Failure = (String, String);
type SessionTarget = (
    String,
    ClusterId,
    Arc<ReplicaDir>,
    Option<Arc<mars_tls::PeerTls>>,
);

/// Runs blocking work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The resource's local state and what it runs: everything the engine's commands act on.
pub(super) struct Executor {
    pub env: Arc<Env>,
    pub name: ResourceName,
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub shared: Arc<Shared>,
    pub replica: Option<Arc<ReplicaDir>>,
    /// Changes whenever the replica is replaced (the servers notice their copies are gone).
    pub replica_gen: u64,
    pub rates: Arc<Rates>,
    pub fetch: Option<Worker>,
    pub sync: Option<Worker>,
    pub replay: Option<Worker>,
    /// Operator requests waiting for the engine's reply.
    pub ops: HashMap<u64, oneshot::Sender<OpReply>>,
    /// Events the executor made itself (completions), handled before anything else.
    pub queue: VecDeque<Event>,
    pub sink: Sink,
    /// The other members (for the reply of a teardown).
    pub others: Vec<String>,
    /// Torn down: the actor ends.
    pub ending: bool,
}

impl Executor {
    pub(super) async fn exec(&mut self, c: Command) -> Result<(), Failure> {
        match c {
            Command::Publish { tag, set, delete } => {
                let entries = self
                    .env
                    .store
                    .write(set, delete)
                    .await
                    .map_err(|e| ("metadata".to_string(), e))?;
                if let Some(tag) = tag {
                    let stamps = entries.iter().map(|e| e.stamp).collect();
                    self.queue
                        .push_back(Event::Done(Done::Published { tag, stamps }));
                }
            }
            Command::Persist(ctl) => {
                let dir = self.dir.clone();
                let what = format!("{ctl:?}");
                blocking(move || -> anyhow::Result<()> {
                    let d = mars_storage::real::RealDir::open(&dir)?;
                    replica::persist(&d, &ctl)
                })
                .await
                .map_err(|e| (format!("control file {what}"), format!("{e:#}")))?;
            }
            Command::SetDesignated(on) => self.shared.designated.store(on, Ordering::Relaxed),
            Command::SetFenced(on) => self.shared.fenced.store(on, Ordering::Relaxed),
            Command::OpenVolume {
                size,
                restart_after_gap,
            } => {
                let r = self.open_volume(size, restart_after_gap, false).await;
                self.queue.push_back(Event::Done(Done::VolumeOpened(r)));
            }
            Command::CloseVolume => {
                let sh = self.shared.clone();
                blocking(move || sh.close_all()).await;
                self.queue.push_back(Event::Done(Done::VolumeClosed));
            }
            Command::StepDown { size } => {
                let sh = self.shared.clone();
                let tuning = self.env.tuning.clone();
                let closed = blocking(move || -> Result<(), String> {
                    // The engine decided on a measurement; an opener that came since wins.
                    let open = sh.open_count();
                    if open > 0 {
                        return Err(format!("the device is in use ({open} open)"));
                    }
                    sh.detach_device()?;
                    sh.leaving.store(true, Ordering::Release);
                    let r = sh.close_volume();
                    sh.leaving.store(false, Ordering::Release);
                    if let Err(e) = r {
                        if let Some(Err(d)) = sh.attach_device(&tuning) {
                            tracing::error!("{}: device: {d}", sh.name);
                        }
                        return Err(e);
                    }
                    Ok(())
                })
                .await;
                if let Err(e) = closed {
                    self.queue.push_back(Event::Done(Done::StepDownFailed(e)));
                    return Ok(());
                }
                let (dir, host) = (self.dir.clone(), self.env.ident.host.clone());
                if let Err(e) =
                    blocking(move || volume::prepare_replica_after_close(&dir, &host)).await
                {
                    self.queue
                        .push_back(Event::Done(Done::ReplicaOpened(Err(format!("{e:#}")))));
                    return Ok(());
                }
                self.open_replica(size).await;
            }
            Command::OpenReplica { size } => self.open_replica(size).await,
            Command::Promote { cut_at, size } => {
                let Some(rep) = self.replica.take() else {
                    self.queue.push_back(Event::Done(Done::VolumeOpened(Err(
                        OpenFailure::Detached("no replica to promote".into()),
                    ))));
                    return Ok(());
                };
                let cut = blocking(move || -> anyhow::Result<()> {
                    rep.copies().cut_for_promotion(cut_at)?;
                    mars_replica::control::set_marker(
                        &*rep.dir,
                        mars_replica::Marker::Replica,
                        false,
                    )?;
                    Ok(())
                })
                .await;
                self.replica_gen += 1;
                if let Err(e) = cut {
                    self.queue.push_back(Event::Done(Done::VolumeOpened(Err(
                        OpenFailure::Detached(format!("cannot cut for promotion: {e:#}")),
                    ))));
                    return Ok(());
                }
                let r = self.open_volume(size, false, true).await;
                self.queue.push_back(Event::Done(Done::VolumeOpened(r)));
            }
            Command::Grow { reply, size } => {
                let sh = self.shared.clone();
                let result = blocking(move || -> Result<(), String> {
                    let v = sh.volume().ok_or("the volume is not open")?;
                    v.grow(size).map_err(|e| e.to_string())?;
                    sh.grow_device(size);
                    Ok(())
                })
                .await;
                self.queue.push_back(Event::Done(Done::Grown {
                    reply,
                    size,
                    result,
                }));
            }
            Command::SetSize(size) => {
                let sh = self.shared.clone();
                blocking(move || {
                    if let Some(v) = sh.volume() {
                        if v.size() < size {
                            if let Err(e) = v.grow(size) {
                                tracing::error!("{}: cannot grow to {size}: {e}", sh.name);
                            }
                        }
                    }
                    sh.grow_device(size);
                })
                .await;
            }
            Command::AttachDevice => {
                let (sh, tuning) = (self.shared.clone(), self.env.tuning.clone());
                let r = blocking(move || sh.attach_device(&tuning)).await;
                self.queue.push_back(Event::Done(Done::DeviceAttached(r)));
            }
            Command::EnterPassthrough => {
                let sh = self.shared.clone();
                let r = blocking(move || -> Result<(), String> {
                    let v = sh.volume().ok_or("the volume is not open")?;
                    v.enter_passthrough(std::time::Duration::from_secs(5))
                        .map_err(|e| e.to_string())
                })
                .await;
                self.queue.push_back(Event::Done(Done::Passthrough(r)));
            }
            Command::RestartLog => {
                let sh = self.shared.clone();
                let r = blocking(move || -> Result<u64, String> {
                    let v = sh.volume().ok_or("the volume is not open")?;
                    v.restart_log_after_gap().map_err(|e| e.to_string())
                })
                .await;
                self.queue.push_back(Event::Done(Done::LogRestarted(r)));
            }
            Command::ReclaimLogs { below } => {
                let sh = self.shared.clone();
                let removed = blocking(move || match sh.volume() {
                    Some(v) => match v.reclaim_logs(below) {
                        Ok(n) => n.iter().map(ToString::to_string).collect(),
                        Err(e) => {
                            tracing::warn!("{}: log reclamation: {e}", sh.name);
                            Vec::new()
                        }
                    },
                    None => Vec::new(),
                })
                .await;
                self.queue
                    .push_back(Event::Done(Done::Reclaimed { removed }));
            }
            Command::Rotate {
                reply,
                only_if_used,
            } => {
                let sh = self.shared.clone();
                let result = blocking(move || -> Result<Option<u64>, String> {
                    let v = sh.volume().ok_or("the volume is not open")?;
                    let before = v.status().current_log.no;
                    if only_if_used {
                        let p = v.rotate_if_used().map_err(|e| e.to_string())?;
                        Ok((p.file != before).then_some(p.file))
                    } else {
                        let n = v.rotate().map_err(|e| e.to_string())?;
                        Ok(Some(n.no))
                    }
                })
                .await;
                self.queue
                    .push_back(Event::Done(Done::Rotated { reply, result }));
            }
            Command::StartFetch {
                id,
                source,
                from,
                prev_link,
            } => {
                let Some((addr, cluster, rep, tls)) = self.session_target(&source) else {
                    self.queue.push_back(Event::Fetch(
                        id,
                        FetchEvent::Ended {
                            error: Some(format!("no address (or no certificate) for {source}")),
                        },
                    ));
                    return Ok(());
                };
                let (dtx, drx) = mpsc::channel(4);
                let stop = Stop::default();
                let job = fetch::FetchJob {
                    id,
                    res: self.name.clone(),
                    me: self.env.ident.host.clone(),
                    cluster,
                    tls,
                    source,
                    addr,
                    from,
                    prev_link,
                    replica: rep,
                    rates: self.rates.clone(),
                    sink: self.sink.clone(),
                    stop: stop.clone(),
                    decisions: drx,
                    ask: self.shared.ask_caught_up.clone(),
                };
                let join = tokio::spawn(fetch::run(job).in_current_span());
                self.fetch = Some(Worker {
                    id,
                    stop,
                    join,
                    decisions: Some(dtx),
                    go: None,
                });
            }
            Command::StopFetch { id } => {
                if let Some(w) = self.fetch.take_if(|w| w.id == id) {
                    w.stop.stop();
                    let _ = w.join.await;
                }
            }
            Command::CopyDecision { id, no, decision } => {
                let sent = self
                    .fetch
                    .as_ref()
                    .filter(|w| w.id == id)
                    .and_then(|w| w.decisions.clone());
                if let Some(tx) = sent {
                    let _ = tx.send((no, decision)).await;
                } else if decision != CopyDecision::Reject {
                    tracing::debug!("{}: decision for a gone fetch session", self.name);
                }
            }
            Command::StartReplay {
                id,
                file,
                origin,
                from,
                to,
                size,
            } => {
                let Some(rep) = self.replica.clone() else {
                    return Err(("replay".into(), "no replica".into()));
                };
                let stop = Stop::default();
                let job = replay::ReplayJob {
                    id,
                    file,
                    origin,
                    from,
                    to,
                    size,
                    replica: rep,
                    rates: self.rates.clone(),
                    sink: self.sink.clone(),
                    stop: stop.clone(),
                };
                // The blocking thread logs inside the resource's span too.
                let span = tracing::Span::current();
                let join = tokio::task::spawn_blocking(move || span.in_scope(|| replay::run(job)));
                let join = tokio::spawn(async move {
                    let _ = join.await;
                });
                self.replay = Some(Worker {
                    id,
                    stop,
                    join,
                    decisions: None,
                    go: None,
                });
            }
            Command::StopReplay { id } => {
                if let Some(w) = self.replay.take_if(|w| w.id == id) {
                    w.stop.stop();
                    let _ = w.join.await;
                }
            }
            Command::StartSync {
                id,
                source,
                done: _,
                size: _,
            } => {
                let Some((addr, cluster, rep, tls)) = self.session_target(&source) else {
                    self.queue.push_back(Event::Sync(
                        id,
                        SyncEvent::Ended {
                            error: Some(format!("no address (or no certificate) for {source}")),
                        },
                    ));
                    return Ok(());
                };
                let (go_tx, go_rx) = oneshot::channel();
                let stop = Stop::default();
                let job = sync::SyncJob {
                    id,
                    res: self.name.clone(),
                    me: self.env.ident.host.clone(),
                    cluster,
                    tls,
                    source,
                    addr,
                    disk: rep.disk.clone(),
                    slots: self.env.sync_slots.clone(),
                    rates: self.rates.clone(),
                    sink: self.sink.clone(),
                    stop: stop.clone(),
                    go: go_rx,
                };
                let join = tokio::spawn(sync::run(job).in_current_span());
                self.sync = Some(Worker {
                    id,
                    stop,
                    join,
                    decisions: None,
                    go: Some(go_tx),
                });
            }
            Command::SyncGo { id, done, size } => {
                if let Some(go) = self
                    .sync
                    .as_mut()
                    .filter(|w| w.id == id)
                    .and_then(|w| w.go.take())
                {
                    let _ = go.send((done, size));
                }
            }
            Command::StopSync { id } => {
                if let Some(w) = self.sync.take_if(|w| w.id == id) {
                    w.stop.stop();
                    let _ = w.join.await;
                }
            }
            Command::RepairCopies { at } => {
                let rep = self.replica.clone();
                blocking(move || -> anyhow::Result<()> {
                    if let Some(r) = rep {
                        r.copies().truncate(at)?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| ("repair of the local log".to_string(), format!("{e:#}")))?;
            }
            Command::ResetCopies => {
                let rep = self.replica.clone();
                blocking(move || -> anyhow::Result<()> {
                    if let Some(r) = rep {
                        r.copies().remove_all()?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| {
                    (
                        "removal of the local logfiles".to_string(),
                        format!("{e:#}"),
                    )
                })?;
            }
            Command::DropCopiesBelow { below } => {
                let rep = self.replica.clone();
                let removed = blocking(move || -> anyhow::Result<Vec<String>> {
                    Ok(match rep {
                        Some(r) => r
                            .copies()
                            .remove_below(below)?
                            .iter()
                            .map(ToString::to_string)
                            .collect(),
                        None => Vec::new(),
                    })
                })
                .await
                .map_err(|e| ("log reclamation".to_string(), format!("{e:#}")))?;
                self.queue
                    .push_back(Event::Done(Done::Reclaimed { removed }));
            }
            Command::RunUnit(job) => {
                // A job may take minutes (systemctl waits for the stack): it runs on its own,
                // and its result comes back as an event.
                let sd = self.env.systemd.clone();
                let sink = self.sink.clone();
                let res = self.name.to_string();
                tokio::task::spawn_blocking(move || {
                    let status = sd.run_job(&res, &job);
                    let _ = sink.blocking_send(Event::Done(Done::Unit { job, status }));
                });
            }
            Command::Teardown { why, reply } => self.teardown(why, reply).await,
            Command::Reply { id, result } => {
                if let Some(r) = self.ops.remove(&id) {
                    let _ = r.send(result);
                }
            }
            Command::Log { level, msg } => match level {
                Level::Debug => tracing::debug!("{msg}"),
                Level::Info => tracing::info!("{msg}"),
                Level::Warn => tracing::warn!("{msg}"),
                Level::Error => tracing::error!("{msg}"),
            },
        }
        Ok(())
    }

    /// Opens the volume (and the device), registers the durable hook.
    /// What a fetch or sync session from `source` needs: its address, the cluster id and the
    /// open replica (`None` while any is missing: the session ends at once, and the engine
    /// retries).
    /// Where a session with `source` goes and how: its address, our cluster, our replica and
    /// the TLS to use (`None` only with `--insecure`; a host without a certificate has no
    /// target, it never falls back to plaintext).
    fn session_target(&self, source: &HostName) -> Option<SessionTarget> {
        Some((
            self.env.addrs.borrow().get(source).cloned()?,
            self.env.ident.cluster_id()?,
            self.replica.clone()?,
            self.env.ident.peer_tls().ok()?,
        ))
    }

    async fn open_volume(
        &mut self,
        size: u64,
        restart_after_gap: bool,
        promoted: bool,
    ) -> Result<Opened, OpenFailure> {
        let (disk, dir, host, tuning, sh) = (
            self.disk.clone(),
            self.dir.clone(),
            self.env.ident.host.clone(),
            self.env.tuning.clone(),
            self.shared.clone(),
        );
        blocking(move || {
            let (v, report) =
                volume::open_volume(&disk, size, &dir, &host, &tuning).map_err(|e| match e {
                    OpenError::Volume(VolumeError::Log(_)) => {
                        OpenFailure::DefectiveLog(e.to_string())
                    }
                    other => OpenFailure::Detached(other.to_string()),
                })?;
            let mut restarted_at = None;
            if restart_after_gap || report.emergency {
                // Restarted in emergency mode: writes bypassed the log, so the log must not
                // simply continue; replicas have to stop at a hole.
                match v.restart_log_after_gap() {
                    Ok(no) => restarted_at = Some(no),
                    // Still no space: the volume stays in emergency mode (it opened in it),
                    // writes go to the disk; the engine restarts the log once space is back.
                    Err(e) if v.passthrough() => {
                        tracing::warn!("{}: stays in emergency mode: {e}", sh.name);
                    }
                    Err(e) => {
                        return Err(OpenFailure::Detached(format!(
                            "cannot restart the log: {e}"
                        )))
                    }
                }
            }
            if report.replayed > 0 || report.truncated.is_some() {
                tracing::info!(
                    "{}: recovery replayed {} records from {}{}",
                    sh.name,
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
            sh.durable.send_replace(v.status().durable);
            {
                let (tx, poke) = (sh.durable.clone(), sh.poke.clone());
                v.on_durable(Arc::new(move |p| {
                    tx.send_replace(p);
                    poke.notify_one();
                }));
                // Emergency mode entered by the volume itself: the engine hears of it from the
                // measurement this poke brings forward.
                let poke = sh.poke.clone();
                v.on_emergency(Arc::new(move || poke.notify_one()));
            }
            *sh.volume.write().unwrap_or_else(|e| e.into_inner()) = Some(v.clone());
            if promoted {
                let d = mars_storage::real::RealDir::open(&dir)
                    .map_err(|e| OpenFailure::Detached(e.to_string()))?;
                if let Err(e) =
                    mars_replica::control::set_marker(&d, mars_replica::Marker::ForcePrimary, false)
                {
                    tracing::error!("{}: cannot remove the force marker: {e}", sh.name);
                }
            }
            let device = sh.attach_device(&tuning);
            let stats = volume::stats(&v, &dir, v.passthrough());
            Ok(Opened {
                stats,
                restarted_at,
                device,
            })
        })
        .await
    }

    async fn open_replica(&mut self, size: u64) {
        let (dir, disk) = (self.dir.clone(), self.disk.clone());
        let r = blocking(move || ReplicaDir::open(&dir, &disk, size)).await;
        let r = match r {
            Ok((rep, facts)) => {
                self.replica = Some(Arc::new(rep));
                self.replica_gen += 1;
                Ok(facts)
            }
            Err(e) => Err(format!("{e:#}")),
        };
        self.queue.push_back(Event::Done(Done::ReplicaOpened(r)));
    }

    /// Closes everything, deletes this host's keys of the resource and its directory.
    async fn teardown(&mut self, why: String, reply: Option<u64>) {
        self.stop_workers().await;
        self.replica = None;
        let sh = self.shared.clone();
        blocking(move || sh.close_all()).await;
        let me = self.env.ident.host.clone();
        let prefix = mars_engine::keys::prefix(&self.name);
        let deleted = self
            .env
            .store
            .call(move |s| -> Result<(), String> {
                let entries = s.list_prefix(&prefix).map_err(|e| e.to_string())?;
                for e in entries {
                    if s.owner_of(&e.key).is_some_and(|o| o == me) {
                        s.delete(&e.key).map_err(|e| e.to_string())?;
                    }
                }
                Ok(())
            })
            .await;
        if let Ok(Err(e)) | Err(e) = deleted.map_err(|e| e.to_string()) {
            tracing::error!("{}: cannot delete this host's keys: {e}", self.name);
        }
        let dir = self.dir.clone();
        let removed = blocking(move || std::fs::remove_dir_all(&dir)).await;
        let msg = match (&removed, why.as_str()) {
            (Err(e), _) => format!("cannot remove {}: {e}", self.dir.display()),
            (Ok(()), "left") => format!(
                "left {}; its logfiles here are deleted, the disk {} is untouched",
                self.name,
                self.disk.display()
            ),
            (Ok(()), "deleted") => {
                let others = &self.others;
                if others.is_empty() {
                    format!("deleted {}", self.name)
                } else {
                    format!(
                        "deleted {}; members {} tear down when they learn it",
                        self.name,
                        others.join(", ")
                    )
                }
            }
            (Ok(()), w) => format!("{}: {w}", self.name),
        };
        tracing::info!("{}: {why}; removed {}", self.name, self.dir.display());
        if let Some(id) = reply {
            if let Some(r) = self.ops.remove(&id) {
                let _ = r.send(match removed {
                    Ok(()) => Ok(msg),
                    Err(_) => Err(mars_engine::OpError::failed(msg)),
                });
            }
        }
        self.ending = true;
    }

    /// Local measurements for the engine (`primary`: the engine acts as primary;
    /// `log_bytes`: the logfiles' size is wanted, for an emergency limit; `open`: a recent
    /// open count to use instead of counting again).
    pub(super) async fn stats(&self, primary: bool, log_bytes: bool, open: Option<u64>) -> Stats {
        let space = *self.env.space.borrow();
        let shared = self.shared.clone();
        let dir = self.dir.clone();
        let disk = self.disk.clone();
        let passthrough = shared.volume().is_some_and(|v| v.passthrough());
        let (volume, bytes, disk_size, open_count) = blocking(move || {
            let volume = shared
                .volume()
                .filter(|_| primary)
                .map(|v| volume::stats(&v, &dir, passthrough));
            let bytes = if log_bytes {
                volume::log_bytes(&dir)
            } else {
                0
            };
            let disk_size = super::disk_len(&disk).unwrap_or(0);
            (
                volume,
                bytes,
                disk_size,
                open.unwrap_or_else(|| shared.open_count()),
            )
        })
        .await;
        Stats {
            open_count,
            free_space: space.free,
            total_space: space.total,
            log_bytes: bytes,
            disk_size,
            volume,
            fetch_rate: Rates::get(&self.rates.fetch),
            replay_rate: Rates::get(&self.rates.replay),
            sync_rate: Rates::get(&self.rates.sync),
        }
    }

    pub(super) async fn stop_workers(&mut self) {
        for w in [self.fetch.take(), self.sync.take(), self.replay.take()]
            .into_iter()
            .flatten()
        {
            w.stop.stop();
            let _ = w.join.await;
        }
    }
}
