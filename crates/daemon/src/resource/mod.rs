//! One resource on this host: an actor task that owns the resource's engine and every handle
//! of its local state, and is the only writer of both.
//!
//! ```text
//!  metadata watch ─┐
//!  liveness ───────┤                         ┌─► exec.rs: store writes, control files, volume,
//!  operator ops ───┼─► Actor ─► engine ─► commands   replica copies, sessions, systemd jobs
//!  session events ─┤    (one task)            └─► replies, snapshots for `view` and servers
//!  timers, pokes ──┘
//! ```
//!
//! Everything it knows comes in as an event; it runs the engine and carries out the commands
//! in order (`exec.rs`), then publishes a snapshot for `view` and one for the fetch and sync
//! servers. Disk and store work runs on blocking threads or the store's thread; the actor
//! itself never blocks an async worker.

mod exec;

use exec::Executor;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mars_config::{HostName, ResourceName};
use mars_engine::resource::{
    Event, Liveness, LocalFacts, Now, Op, OpReply, ResourceEngine, Stats, Status,
};
use mars_engine::serve::ServerRole;
use mars_engine::{EngineConfig, ResourceMeta};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::identity::Identity;
use crate::local::{Shared, Tuning};
use crate::meta::MetaStore;
use crate::replication::serve::{ServeView, Served};
use crate::replication::{Rates, Sink, Stop, SyncSlots};
use crate::systemd::Systemd;

/// How much free space the root's filesystem has, measured by the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Space {
    pub free: Option<u64>,
    pub total: Option<u64>,
}

/// What an actor needs from the host: narrow handles, nothing that points back up.
pub struct Env {
    pub ident: Arc<Identity>,
    pub store: MetaStore,
    pub cfg: EngineConfig,
    pub tuning: Tuning,
    pub systemd: Arc<Systemd>,
    pub liveness: watch::Receiver<Liveness>,
    /// Members' peer addresses.
    pub addrs: watch::Receiver<Arc<BTreeMap<HostName, String>>>,
    pub space: watch::Receiver<Space>,
    /// Places for full syncs on this host.
    pub sync_slots: Arc<SyncSlots>,
    /// An actor that ended (teardown) says so here.
    pub ended: mpsc::UnboundedSender<ResourceName>,
    /// The monotonic clock's origin.
    pub epoch: Instant,
}

impl Env {
    pub fn now(&self) -> Now {
        Now {
            ms: self.epoch.elapsed().as_millis() as u64,
            wall_ns: mars_meta::system_time_ns(),
        }
    }
}

enum Msg {
    Op {
        op: Op,
        /// `--dry-run`: the engine checks and describes, nothing happens.
        dry: bool,
        reply: oneshot::Sender<OpReply>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// What `view` reads of a resource without asking its actor.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub status: Status,
    pub meta: Arc<ResourceMeta>,
    pub disk: PathBuf,
    pub device: Option<PathBuf>,
    pub open_count: u64,
}

/// A replica's sync, fetch and replay as `view` shows them (and MARS's amount macros read
/// them, in `marsadm view-…` and in templates): fetch and replay on one scale, from the
/// applied position to the primary's log end. A primary has none.
pub struct Jobs {
    pub sync: Option<mars_api::Progress>,
    pub fetch: Option<mars_api::Progress>,
    pub replay: Option<mars_api::Progress>,
}

pub fn jobs(snap: &Snapshot) -> Jobs {
    let (st, meta) = (&snap.status, &snap.meta);
    let mut out = Jobs {
        sync: None,
        fetch: None,
        replay: None,
    };
    if st.primary {
        return out;
    }
    let r = &st.report;
    out.sync = r.sync.as_ref().map(|y| mars_api::Progress {
        done: y.done,
        total: y.size,
        rate: y.rate,
        logs: None,
    });
    if let Some(applied) = st.applied {
        let primary_end = meta.bytes_after(applied);
        let fetched_rest = st.fetched.and_then(|f| meta.bytes_after(f)).or(primary_end);
        if let Some(total) = primary_end {
            let fetched = total.saturating_sub(fetched_rest.unwrap_or(total));
            out.fetch = Some(mars_api::Progress {
                done: fetched,
                total,
                rate: r.fetch_rate,
                logs: Some(mars_api::LogRange {
                    first: st.logs.0,
                    last: st.logs.1,
                }),
            });
            out.replay = Some(mars_api::Progress {
                done: 0,
                total,
                rate: r.replay_rate,
                logs: Some(mars_api::LogRange {
                    first: st.logs.0,
                    last: st.logs.1,
                }),
            });
        }
    }
    out
}

/// A resource as the rest of the daemon holds it.
#[derive(Clone)]
pub struct Handle {
    pub name: ResourceName,
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    serve_view: watch::Receiver<Arc<ServeView>>,
    events: Sink,
}

/// The actor is gone (torn down or stopping).
#[derive(Debug, thiserror::Error)]
#[error("resource {0} is not served here any more")]
pub struct Gone(pub ResourceName);

impl Handle {
    /// Sends an operator request; the reply comes when the engine gives it.
    pub async fn op(&self, op: Op) -> Result<OpReply, Gone> {
        self.op_or_dry(op, false).await
    }

    /// `op` for real, or (`dry`) as a dry run: the engine's guards decide, it answers with
    /// what it would do and changes nothing.
    pub async fn op_or_dry(&self, op: Op, dry: bool) -> Result<OpReply, Gone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Op { op, dry, reply })
            .await
            .map_err(|_| Gone(self.name.clone()))?;
        rx.await.map_err(|_| Gone(self.name.clone()))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// The actor ended (torn down).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn served(&self) -> Served {
        Served {
            shared: self.shared.clone(),
            dir: self.dir.clone(),
            view: self.serve_view.clone(),
            events: self.events.clone(),
        }
    }

    /// Closes everything cleanly and waits for it.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// A running session and how to stop it.
struct Worker {
    id: u64,
    stop: Stop,
    join: tokio::task::JoinHandle<()>,
    decisions: Option<mpsc::Sender<(u64, mars_engine::resource::CopyDecision)>>,
    go: Option<oneshot::Sender<(u64, u64)>>,
}

struct Actor {
    engine: ResourceEngine,
    exec: Executor,
    /// When to measure next (the engine's timer, or a poke).
    wake: Option<Instant>,
    stats_due: Option<Instant>,
    last_stats: Option<Instant>,
    /// The device's open count as last counted, and when. Counting walks every process's
    /// descriptors in `/proc` (milliseconds on a busy host, 2-4 % of the daemon's CPU during a
    /// write benchmark when it was done on every event): the stats of pokes reuse it while it
    /// is younger than [`OPEN_RECOUNT`], the snapshot shows it.
    open: Option<(Instant, u64)>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    serve_view: watch::Sender<Arc<ServeView>>,
}

/// Starts the actor of resource `name` in `dir` on `disk`.
pub fn spawn(
    env: Arc<Env>,
    name: ResourceName,
    dir: PathBuf,
    disk: PathBuf,
    facts: LocalFacts,
) -> Handle {
    let (tx, rx) = mpsc::channel(64);
    let (sink, worker_rx) = mpsc::channel(256);
    let shared = Arc::new(Shared::new(name.clone()));
    let engine = ResourceEngine::new(env.cfg.clone(), env.ident.host.clone(), name.clone());
    let status = engine.status();
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot {
        status,
        meta: engine.meta().clone(),
        disk: disk.clone(),
        device: None,
        open_count: 0,
    }));
    let (serve_tx, serve_rx) = watch::channel(Arc::new(ServeView::empty(name.clone())));
    let actor = Actor {
        engine,
        exec: Executor {
            env,
            name: name.clone(),
            dir: dir.clone(),
            disk: disk.clone(),
            shared: shared.clone(),
            replica: None,
            replica_gen: 0,
            rates: Arc::new(Rates::default()),
            fetch: None,
            sync: None,
            replay: None,
            ops: HashMap::new(),
            queue: VecDeque::new(),
            sink: sink.clone(),
            others: Vec::new(),
            ending: false,
        },
        wake: None,
        stats_due: None,
        last_stats: None,
        open: None,
        snapshot: snap_tx,
        serve_view: serve_tx,
    };
    // Every line the actor and its sessions log carries the resource (`res`: a field in the
    // journal and in JSON, the text's prefix).
    let span = tracing::info_span!("resource", res = %name);
    tokio::spawn(tracing::Instrument::instrument(
        actor.run(rx, worker_rx, facts),
        span,
    ));
    Handle {
        name,
        dir,
        disk,
        shared,
        tx,
        snapshot: snap_rx,
        serve_view: serve_rx,
        events: sink,
    }
}

/// Stats are measured at most this often on pokes (each durable advance of the log pokes).
const POKE_EVERY: Duration = Duration::from_millis(200);
/// Stats measured because the log advanced (pokes, up to five a second while writes arrive)
/// count the device's users again only this long after the last count; stats the engine asks
/// for (its timers, an NBD open or close, a change of free space) always count. Writes that
/// poke are made by a user of the device, so a count during them has nothing to decide: the
/// engine acts on a count of 0 only, which it gets from its own timers.
const OPEN_RECOUNT: Duration = Duration::from_secs(1);

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        mut worker_rx: mpsc::Receiver<Event>,
        facts: LocalFacts,
    ) {
        let env = self.exec.env.clone();
        let name = self.exec.name.clone();
        let mut meta_rx = env.store.watch_resource(&name);
        let mut live_rx = env.liveness.clone();
        let mut space_rx = env.space.clone();
        let poke = self.exec.shared.poke.clone();
        let opened = self.exec.shared.opened.clone();
        let mut shutdown_done: Option<oneshot::Sender<()>> = None;
        let mut next_op = 1u64;
        // The start: the metadata, who is reachable, the local facts, first measurements.
        meta_rx.mark_changed();
        self.exec
            .queue
            .push_back(Event::Liveness(live_rx.borrow_and_update().clone()));
        self.exec.queue.push_back(Event::Started(facts));
        loop {
            let ev = if let Some(e) = self.exec.queue.pop_front() {
                e
            } else {
                let due = [self.wake, self.stats_due].into_iter().flatten().min();
                tokio::select! {
                    biased;
                    m = rx.recv() => match m {
                        Some(Msg::Op { op, dry, reply }) => {
                            let id = next_op;
                            next_op += 1;
                            self.exec.ops.insert(id, reply);
                            if dry {
                                Event::DryRun { id, op }
                            } else {
                                Event::Op { id, op }
                            }
                        }
                        Some(Msg::Shutdown { done }) => {
                            shutdown_done = Some(done);
                            Event::Shutdown
                        }
                        None => Event::Shutdown,
                    },
                    Some(e) = worker_rx.recv() => e,
                    r = meta_rx.changed() => {
                        if r.is_err() {
                            continue;
                        }
                        meta_rx.borrow_and_update();
                        match env.store.resource_meta(&name).await {
                            Ok(m) => Event::Meta(Arc::new(m)),
                            Err(e) => {
                                tracing::error!("{name}: cannot read the metadata: {e}");
                                continue;
                            }
                        }
                    }
                    r = live_rx.changed() => {
                        if r.is_err() {
                            continue;
                        }
                        Event::Liveness(live_rx.borrow_and_update().clone())
                    }
                    r = space_rx.changed() => {
                        if r.is_err() {
                            continue;
                        }
                        space_rx.borrow_and_update();
                        Event::Stats(self.stats(true).await)
                    }
                    _ = opened.notified() => Event::Stats(self.stats(true).await),
                    _ = poke.notified() => {
                        let at = self.last_stats.map_or(Instant::now(), |t| t + POKE_EVERY);
                        self.stats_due = Some(self.stats_due.map_or(at, |d| d.min(at)));
                        continue;
                    }
                    _ = sleep_until(due), if due.is_some() => {
                        // A poke's measurement (`stats_due`) or the engine's timer (`wake`).
                        let engine_asked = self.wake.is_some_and(|w| w <= Instant::now());
                        self.stats_due = None;
                        Event::Stats(self.stats(engine_asked).await)
                    }
                }
            };
            let shutting = matches!(ev, Event::Shutdown);
            if tracing::enabled!(tracing::Level::TRACE) {
                tracing::trace!("{name}: event {}", describe(&ev));
            }
            let meta_event = matches!(ev, Event::Meta(_));
            let out = self.engine.on_event(env.now(), ev);
            self.wake = out.wake_at.map(|ms| env.epoch + Duration::from_millis(ms));
            if meta_event {
                self.exec.others = self
                    .engine
                    .meta()
                    .members
                    .keys()
                    .filter(|h| **h != env.ident.host)
                    .map(ToString::to_string)
                    .collect();
            }
            // A unit job regenerates from every resource's published metadata, this one's
            // included: it must see what the engine decided on. Published only after the
            // commands, a job starting on its blocking thread before that read the metadata
            // of before (a removed stack was regenerated as it was and stayed: the systemd
            // test, under load).
            if out
                .commands
                .iter()
                .any(|c| matches!(c, mars_engine::resource::Command::RunUnit(_)))
            {
                self.publish();
            }
            for c in out.commands {
                if tracing::enabled!(tracing::Level::TRACE) {
                    tracing::trace!("{name}: command {c:?}");
                }
                if let Err((what, error)) = self.exec.exec(c).await {
                    // The commands after a failed one are not carried out: the engine hears
                    // of the failure and decides again from what it knows.
                    self.exec
                        .queue
                        .push_back(Event::Done(mars_engine::resource::Done::Failed {
                            what,
                            error,
                        }));
                    break;
                }
            }
            self.publish();
            if shutting {
                self.exec.stop_workers().await;
                let sh = self.exec.shared.clone();
                let _ = tokio::task::spawn_blocking(move || sh.close_all()).await;
                for (_, r) in self.exec.ops.drain() {
                    let _ = r.send(Err(mars_engine::OpError::failed("marsd is stopping")));
                }
                if let Some(d) = shutdown_done.take() {
                    let _ = d.send(());
                }
                return;
            }
            if self.exec.ending {
                env.store.unwatch_resource(&name);
                let _ = env.ended.send(name.clone());
                return;
            }
        }
    }

    /// Measures for the engine; `count_open`: count the device's users even if they were
    /// counted less than [`OPEN_RECOUNT`] ago.
    async fn stats(&mut self, count_open: bool) -> Stats {
        let now = Instant::now();
        self.last_stats = Some(now);
        let reuse = self
            .open
            .filter(|(at, _)| !count_open && now.duration_since(*at) < OPEN_RECOUNT)
            .map(|(_, n)| n);
        let limit_set = self
            .engine
            .meta()
            .members
            .get(self.engine.host())
            .is_some_and(|m| m.emergency_limit.is_some());
        let stats = self
            .exec
            .stats(self.engine.is_primary(), limit_set, reuse)
            .await;
        if reuse.is_none() {
            self.open = Some((now, stats.open_count));
        }
        stats
    }

    /// Publishes what `view` and the servers read.
    fn publish(&mut self) {
        let status = self.engine.status();
        let shared = &self.exec.shared;
        let role = if self.engine.is_primary() {
            ServerRole::Primary {
                passthrough: shared.volume().is_some_and(|v| v.passthrough()),
            }
        } else if self.engine.replica().is_some() {
            ServerRole::Replica
        } else {
            ServerRole::None
        };
        let copies = self
            .engine
            .replica()
            .map(|r| {
                r.logs()
                    .into_iter()
                    .map(|l| (l.no, l.len, l.complete))
                    .collect()
            })
            .unwrap_or_default();
        let meta = self.engine.meta().clone();
        self.serve_view.send_replace(Arc::new(ServeView {
            role,
            meta: meta.clone(),
            copies,
            replica_gen: self.exec.replica_gen,
        }));
        // The last measured count, not a new walk of `/proc` per event: `view` (and with it
        // the metrics) counts afresh when asked and uses this only if it cannot.
        let open_count = self.open.map_or(0, |(_, n)| n);
        self.snapshot.send_replace(Arc::new(Snapshot {
            open_count,
            device: shared.device_path(),
            status,
            meta,
            disk: self.exec.disk.clone(),
        }));
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Length of a file or block device, without taking it exclusively.
pub fn disk_len(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::End(0))
}

/// An event for the trace log, without its bulk (metadata, statistics).
fn describe(ev: &Event) -> String {
    match ev {
        Event::Meta(m) => format!(
            "Meta(designation {}, primary {:?})",
            m.designation, m.primary
        ),
        Event::Stats(s) => format!(
            "Stats(open {}, volume {})",
            s.open_count,
            s.volume.is_some()
        ),
        other => format!("{other:?}"),
    }
}
