//! One resource on one host as a sans-IO state machine: events in, commands out.
//!
//! ```text
//!  events ──► ResourceEngine::on_event(now, event) ──► Output { commands, wake_at }
//!              (pure: no clock, no I/O, no threads)              │
//!                                                                ▼
//!  daemon's resource actor ── executes each command ──► volume, replica copies, peers,
//!              ▲                                          metadata, systemd
//!              └────────── completions come back as events ◄─────┘
//! ```
//!
//! Every decision about the resource is taken here: which role to take up at start, when the
//! designated primary may promote (and the forced drain before it), fencing and stepping down,
//! emergency mode and where the version chain starts again, which version links to publish
//! and which to reclaim, which logfiles may be deleted (report pins and transient pins), the
//! report's contents and when to publish it, where to fetch from and from which position, which
//! copy to accept or to call a fork, replay's entry and end-of-logfile checks, consistency
//! after a full sync, restarting a sync whose source changed, space pressure on a replica, the
//! systemd operation and its retry, the guards of operator commands, and the planned handover
//! as a saga with its compensations. After every event, [`ResourceEngine::on_event`] runs one
//! reconcile pass over the whole state (cheap: no I/O), which emits commands only for what
//! changed.
//!
//! Time comes in with every event ([`Now`]); the engine asks to be woken at
//! [`Output::wake_at`] when a timer matters (a backoff, a deadline, the next report, the expiry
//! of a caught-up confirmation). An idle resource asks for nothing.
//!
//! The module files: `primary.rs` (the primary role), `replica.rs` (fetch, replay, sync and the
//! copies), `promote.rs` (taking over), `saga.rs` (the `primary` command), `ops.rs` (other
//! operator commands), `report.rs` (what this host publishes about itself and shows in `view`),
//! `units.rs` (the systemd stack), `global.rs` (the `*-global` commands' switch requests).

mod command;
mod dry_run;
mod event;
mod global;
mod ops;
mod primary;
mod promote;
mod replica;
mod report;
mod saga;
mod units;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use mars_config::{HostName, ResourceName};

use crate::config::EngineConfig;
use crate::keys;
use crate::model::ResourceMeta;

pub use command::{
    Command, Control, CopyDecision, Level, Marker, OpKey, SessionId, SyncFile, Tag, UnitJob,
};
pub use event::{
    Done, Event, FetchEvent, Liveness, LocalFacts, LogInfo, Now, Op, OpId, OpReply, OpenFailure,
    Opened, ReplayEnd, ReplayEvent, ReplicaFacts, Stats, SyncEvent, VolumeStats,
};
pub use replica::Replica;
pub use report::Status;

use primary::Primary;
use saga::Saga;
use units::Units;

/// What one event produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Output {
    /// In order.
    pub commands: Vec<Command>,
    /// Send an event (fresh [`Stats`], or [`Event::Wake`]) at this time (monotonic ms) at the
    /// latest; `None`: nothing is due by time alone.
    pub wake_at: Option<u64>,
}

/// What this host has set up for the resource.
#[derive(Debug, Clone)]
// One per resource, moved rarely: boxing the replica would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Local {
    /// Nothing open: waiting for the start facts, a deferred primary role after a restart, a
    /// detached primary, or a failure (shown in `view`, retried).
    Idle {
        error: Option<IdleError>,
    },
    /// A command that changes the role is running.
    Busy(Busy),
    Primary(Primary),
    Replica(Replica),
    /// Torn down: the actor ends.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IdleError {
    /// MARS's disk state for it (`DefectiveLog`, `Detached`).
    state: &'static str,
    text: String,
    /// When to try again.
    retry_at: u64,
}

#[derive(Debug, Clone)]
enum Busy {
    Opening,
    Promoting {
        forced: bool,
    },
    /// The primary it was, restored if the step-down fails.
    SteppingDown(Primary),
    OpeningReplica,
    Closing,
}

/// The state machine of one resource on this host. `Clone` for dry runs (`dry_run.rs`): the
/// command runs on the state and the state is put back.
#[derive(Debug, Clone)]
pub struct ResourceEngine {
    cfg: EngineConfig,
    me: HostName,
    res: ResourceName,
    /// The resource's metadata with this host's own writes applied at once (only this host
    /// writes them, so they need not wait for the store's round trip).
    meta: Arc<ResourceMeta>,
    meta_known: bool,
    live: Liveness,
    stats: Stats,
    /// When `stats` were measured.
    stats_at: u64,
    /// Events handled so far, and at which of them the statistics and the metadata last
    /// came: decisions on the open count want measurements taken after the metadata changed
    /// (a device opened a moment ago may not be in older ones).
    seq: u64,
    stats_seq: u64,
    meta_seq: u64,
    /// The resource's size as this host knows it (grows with `resize`).
    size: u64,
    facts: LocalFacts,
    started: bool,
    /// When the start facts arrived.
    started_ms: u64,
    local: Local,
    /// Last `SetDesignated` / `SetFenced` given.
    designated: Option<bool>,
    fenced: bool,
    /// Since when this host has been the designated primary while it holds a replica.
    designated_since: Option<u64>,
    report: report::Publisher,
    units: Units,
    saga: Option<Saga>,
    /// Operator requests that came while the resource was being set up.
    /// (id, op, dry run, deadline)
    pending: Vec<(OpId, Op, bool, u64)>,
    /// Logfiles a replica needs before its report says so: a sync served here starts at a
    /// logfile that must survive until the replica's first report (host → (logfile, since)).
    pins: BTreeMap<HostName, (u64, u64)>,
    next_id: u64,
    /// Operator requests whose reply waits for a completion.
    waiting_ops: BTreeMap<OpId, String>,
    now: event::Now,
    out: Vec<Command>,
    wake: Option<u64>,
    /// The wake time the last reconcile asked for, without the caught-up expiry.
    wake_base: Option<u64>,
    shutting_down: bool,
}

impl ResourceEngine {
    pub fn new(cfg: EngineConfig, me: HostName, res: ResourceName) -> ResourceEngine {
        let meta = Arc::new(ResourceMeta::empty(res.clone()));
        ResourceEngine {
            cfg,
            me,
            res,
            meta,
            meta_known: false,
            live: Liveness::default(),
            stats: Stats::default(),
            stats_at: 0,
            seq: 0,
            stats_seq: 0,
            meta_seq: 0,
            size: 0,
            facts: LocalFacts::default(),
            started: false,
            started_ms: 0,
            local: Local::Idle { error: None },
            designated: None,
            fenced: false,
            designated_since: None,
            report: report::Publisher::default(),
            units: Units::default(),
            saga: None,
            pending: Vec::new(),
            pins: BTreeMap::new(),
            next_id: 1,
            waiting_ops: BTreeMap::new(),
            now: event::Now::default(),
            out: Vec::new(),
            wake: None,
            wake_base: None,
            shutting_down: false,
        }
    }

    pub fn name(&self) -> &ResourceName {
        &self.res
    }

    pub fn host(&self) -> &HostName {
        &self.me
    }

    /// The metadata as the engine sees it (with its own writes).
    pub fn meta(&self) -> &Arc<ResourceMeta> {
        &self.meta
    }

    /// The actor has ended its work: torn down.
    pub fn is_gone(&self) -> bool {
        matches!(self.local, Local::Gone)
    }

    /// The replica's state, while this host holds one.
    pub fn replica(&self) -> Option<&Replica> {
        match &self.local {
            Local::Replica(r) => Some(r),
            _ => None,
        }
    }

    /// The host acts as primary (its volume is open).
    pub fn is_primary(&self) -> bool {
        matches!(self.local, Local::Primary(_))
    }

    /// Handles one event and returns what to do.
    pub fn on_event(&mut self, now: event::Now, ev: Event) -> Output {
        self.now = now;
        // A repeated "caught up" at the same position only refreshes its time: nothing a
        // decision depends on changed, so none is made again (an idle replica hears one every
        // second; a host with a thousand of them would reconcile a thousand times a second).
        // Only its expiry moves.
        if let Event::Fetch(id, FetchEvent::CaughtUp { pos, stamp }) = &ev {
            if self.refresh_caught_up(*id, *pos, *stamp) {
                self.wake = self.wake_base;
                if let Some(at) = self.caught_up_expiry() {
                    self.wake_at(at);
                }
                return Output {
                    commands: Vec::new(),
                    wake_at: self.wake,
                };
            }
        }
        self.wake = None;
        self.handle(ev);
        if !matches!(self.local, Local::Gone) && !self.shutting_down {
            self.reconcile();
        }
        // The confirmation's expiry is kept apart: a refreshed one moves it without a reconcile.
        self.wake_base = self.wake;
        if let Some(at) = self.caught_up_expiry() {
            self.wake_at(at);
        }
        #[cfg(debug_assertions)]
        if let Err(e) = self.validate() {
            panic!("{}: engine invariant broken: {e}", self.res);
        }
        Output {
            commands: std::mem::take(&mut self.out),
            wake_at: self.wake,
        }
    }

    // ---------------------------------------------------------------- plumbing

    fn emit(&mut self, c: Command) {
        self.out.push(c);
    }

    fn log(&mut self, level: Level, msg: impl Into<String>) {
        let msg = msg.into();
        self.emit(Command::Log {
            level,
            msg: format!("{}: {msg}", self.res),
        });
    }

    fn reply(&mut self, id: OpId, result: OpReply) {
        self.emit(Command::Reply { id, result });
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Asks to be woken at `at` at the latest.
    fn wake_at(&mut self, at: u64) {
        let at = at.max(self.now.ms);
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    /// Writes keys (and applies this host's own ones to the engine's view at once).
    fn publish(&mut self, set: Vec<(String, String)>, delete: Vec<String>) {
        self.publish_tagged(None, set, delete);
    }

    fn publish_tagged(
        &mut self,
        tag: Option<Tag>,
        set: Vec<(String, String)>,
        delete: Vec<String>,
    ) {
        if set.is_empty() && delete.is_empty() {
            return;
        }
        self.apply_own(&set, &delete);
        self.emit(Command::Publish { tag, set, delete });
    }

    /// Applies this host's own writes to the engine's copy of the metadata, so that decisions
    /// right after see them (the store delivers them again later; they are equal then).
    fn apply_own(&mut self, set: &[(String, String)], delete: &[String]) {
        let me = self.me.clone();
        let meta = Arc::make_mut(&mut self.meta);
        for (k, v) in set {
            apply_key(meta, &me, k, Some(v));
        }
        for k in delete {
            apply_key(meta, &me, k, None);
        }
    }

    fn alive(&self, h: &HostName) -> bool {
        *h == self.me || self.live.reachable.contains(h)
    }

    fn todo(&self) -> crate::Todo {
        self.meta
            .members
            .get(&self.me)
            .map(|m| m.todo)
            .unwrap_or_default()
    }

    fn is_designated(&self) -> bool {
        self.meta.primary.as_ref() == Some(&self.me)
    }

    // ---------------------------------------------------------------- events

    fn handle(&mut self, ev: Event) {
        self.seq += 1;
        match ev {
            Event::Started(facts) => {
                self.size = self.size.max(facts.size);
                self.facts = facts;
                self.started = true;
                self.started_ms = self.now.ms;
            }
            Event::Meta(meta) => {
                self.meta = meta;
                self.meta_known = true;
                self.meta_seq = self.seq;
            }
            Event::Liveness(l) => self.live = l,
            Event::Stats(s) => {
                self.stats = s;
                self.stats_at = self.now.ms;
                self.stats_seq = self.seq;
                self.adopt_volume_passthrough();
            }
            Event::Wake => {}
            Event::Op { id, op } => self.on_op(id, op, false),
            Event::DryRun { id, op } => self.on_op(id, op, true),
            Event::Done(d) => self.on_done(d),
            Event::Fetch(id, e) => self.on_fetch(id, e),
            Event::Replay(id, e) => self.on_replay(id, e),
            Event::Sync(id, e) => self.on_sync(id, e),
            Event::ServingSync { peer, start_file } => {
                self.pins.insert(peer, (start_file, self.now.ms));
            }
            Event::Shutdown => self.shutdown(),
        }
    }

    fn shutdown(&mut self) {
        self.shutting_down = true;
        if let Local::Replica(r) = &mut self.local {
            let stops = r.stop_all();
            self.out.extend(stops);
        }
        if matches!(self.local, Local::Primary(_)) {
            self.emit(Command::CloseVolume);
        }
        for (id, _, _, _) in std::mem::take(&mut self.pending) {
            self.reply(id, Err(crate::reason::OpError::failed("marsd is stopping")));
        }
        if let Some(s) = self.saga.take() {
            self.reply(
                s.id,
                Err(crate::reason::OpError::failed("marsd is stopping")),
            );
        }
        self.local = Local::Idle { error: None };
    }

    fn on_done(&mut self, d: Done) {
        match d {
            Done::VolumeOpened(r) => self.on_volume_opened(r),
            Done::ReplicaOpened(r) => self.on_replica_opened(r),
            Done::StepDownFailed(e) => self.on_step_down_failed(e),
            Done::VolumeClosed => {
                if matches!(self.local, Local::Busy(Busy::Closing)) {
                    self.local = Local::Idle { error: None };
                }
            }
            Done::Passthrough(r) => self.on_passthrough(r),
            Done::LogRestarted(r) => self.on_log_restarted(r),
            Done::Published { tag, stamps } => self.on_published(tag, stamps),
            Done::Failed { what, error } => self.on_failed(what, error),
            Done::Unit { job, status } => self.on_unit(job, status),
            Done::Rotated { reply, result } => self.on_rotated(reply, result),
            Done::Grown {
                reply,
                size,
                result,
            } => self.on_grown(reply, size, result),
            Done::DeviceAttached(r) => self.on_device_attached(r),
            Done::Reclaimed { removed } => {
                if let Local::Primary(p) = &mut self.local {
                    p.reclaiming = false;
                    // What was deleted is gone from the volume's logfiles as the engine knows
                    // them: the pass right after this completion (before fresh statistics) saw
                    // them still and asked to reclaim them again, and again, a busy loop with
                    // the executor (found by mars-sim).
                    if let Some(v) = &mut self.stats.volume {
                        v.logs.retain(|l| {
                            let name = mars_txlog::LogName::new(l.no, l.origin.clone());
                            !removed.contains(&name.to_string())
                        });
                    }
                }
                // The measurements are older than the deletion: forget the deleted logfiles
                // there, or the next pass would ask for them again.
                if let Some(v) = self.stats.volume.as_mut() {
                    v.logs.retain(|l| {
                        !removed
                            .contains(&mars_txlog::LogName::new(l.no, l.origin.clone()).to_string())
                    });
                }
                if !removed.is_empty() {
                    let msg = format!("deleted logfiles {}", removed.join(", "));
                    self.log(Level::Info, msg);
                }
            }
        }
    }

    /// A command failed. A replica's state may now differ from what the engine assumed (the
    /// executor skipped the commands after the failed one): it is opened again from disk.
    fn on_failed(&mut self, what: String, error: String) {
        self.log(Level::Error, format!("{what}: {error}"));
        if let Local::Replica(r) = &mut self.local {
            let stops = r.stop_all();
            self.out.extend(stops);
            let retry_at = self.now.ms + self.cfg.timing.attach_retry;
            self.local = Local::Idle {
                error: Some(IdleError {
                    state: "Detached",
                    text: format!("{what}: {error}"),
                    retry_at,
                }),
            };
        }
    }

    // ---------------------------------------------------------------- the reconcile pass

    /// One pass over the whole state: what the metadata, the local state and the time call for
    /// now. Emits commands only for what changed.
    fn reconcile(&mut self) {
        if !self.started || !self.meta_known {
            self.expire_pending();
            return;
        }
        if !self.meta.exists() || !self.meta.is_member(&self.me) {
            if !matches!(self.local, Local::Busy(_)) {
                let why = if self.meta.exists() {
                    "no longer a member"
                } else {
                    "deleted in the cluster"
                };
                self.teardown(why.to_string(), None);
            }
            return;
        }
        if let Some(size) = self.meta.size.filter(|s| *s > self.size) {
            self.size = size;
            self.emit(Command::SetSize(size));
        }
        let designated = self.is_designated();
        if self.designated != Some(designated) {
            self.designated = Some(designated);
            self.emit(Command::SetDesignated(designated));
        }
        if !designated {
            self.designated_since = None;
        }
        // Before the roles: a request's switch counts in this very pass.
        self.apply_switch_requests();
        match &self.local {
            Local::Primary(_) => self.reconcile_primary(),
            Local::Replica(_) => self.reconcile_replica(),
            Local::Idle { .. } => self.reconcile_idle(),
            Local::Busy(_) | Local::Gone => {}
        }
        if matches!(self.local, Local::Gone) {
            return;
        }
        self.reconcile_units();
        self.reclaim();
        self.expire_pins();
        self.publish_report();
        self.advance_saga();
        self.retry_pending();
    }

    /// Nothing open: take up the role the metadata gives this host.
    fn reconcile_idle(&mut self) {
        let retry_at = match &self.local {
            Local::Idle { error: Some(e) } => Some(e.retry_at),
            _ => None,
        };
        if let Some(at) = retry_at {
            if self.now.ms < at {
                self.wake_at(at);
                return;
            }
        }
        let todo = self.todo();
        if self.is_designated() && !self.facts.replica_marker {
            if !todo.attach {
                return;
            }
            // A primary role found on disk is taken up only with metadata at least as fresh as
            // every member's answer since the restart (another host may have taken over while
            // this one was down), or after a while if some stay silent.
            let waited = self.now.ms.saturating_sub(self.started_ms);
            if !self.live.fresh && waited < self.cfg.timing.stale_primary_wait {
                self.wake_at(self.started_ms + self.cfg.timing.stale_primary_wait);
                return;
            }
            self.local = Local::Busy(Busy::Opening);
            let restart = self.facts.emergency_marker;
            let size = self.size;
            self.emit(Command::OpenVolume {
                size,
                restart_after_gap: restart,
            });
        } else if !self.is_designated() || self.facts.replica_marker {
            self.facts.replica_marker = true;
            self.local = Local::Busy(Busy::OpeningReplica);
            let size = self.size;
            self.emit(Command::OpenReplica { size });
        }
    }

    fn on_volume_opened(&mut self, r: Result<Opened, OpenFailure>) {
        let forced = matches!(self.local, Local::Busy(Busy::Promoting { forced: true }));
        let promoting = matches!(self.local, Local::Busy(Busy::Promoting { .. }));
        match r {
            Ok(o) => {
                if let Some(no) = o.restarted_at {
                    self.log(
                        Level::Warn,
                        format!("was in emergency mode: the log continues at {no} after a hole"),
                    );
                    self.facts.chain_start = Some(no);
                    self.facts.emergency_marker = false;
                    self.emit(Command::Persist(Control::ChainStart(no)));
                    self.emit(Command::Persist(Control::Marker(Marker::Emergency, false)));
                }
                if let Some(Err(e)) = &o.device {
                    self.log(Level::Error, format!("cannot set up the block device: {e}"));
                }
                if promoting {
                    self.log(
                        Level::Info,
                        format!(
                            "primary now{}, continuing in logfile {}",
                            if forced { " (forced)" } else { "" },
                            o.stats.current
                        ),
                    );
                    self.facts.force_marker = false;
                }
                self.facts.replica_marker = false;
                self.designated_since = None;
                self.fenced = false;
                let passthrough = o.stats.passthrough;
                self.stats.volume = Some(o.stats);
                let mut p = Primary::new(o.device, passthrough);
                // A device that could not be set up is tried again after a while.
                p.device_retry_at = self.now.ms + self.cfg.timing.attach_retry;
                self.local = Local::Primary(p);
            }
            Err(f) => {
                let state = match f {
                    OpenFailure::DefectiveLog(_) => "DefectiveLog",
                    OpenFailure::Detached(_) => "Detached",
                };
                self.log(Level::Error, format!("cannot attach: {}", f.text()));
                if promoting {
                    // Back to a replica next (the directory still holds one).
                    self.facts.replica_marker = true;
                    self.emit(Command::Persist(Control::Marker(Marker::Replica, true)));
                }
                let retry_at = self.now.ms + self.cfg.timing.attach_retry;
                self.local = Local::Idle {
                    error: Some(IdleError {
                        state,
                        text: f.text().to_string(),
                        retry_at,
                    }),
                };
            }
        }
    }

    fn on_replica_opened(&mut self, r: Result<ReplicaFacts, String>) {
        let stepped_down = matches!(self.local, Local::Busy(Busy::SteppingDown(_)));
        match r {
            Ok(f) => {
                self.facts.replica_marker = true;
                // Opening the replica removed the marker (see `Marker::Emergency`).
                self.facts.emergency_marker = false;
                self.fenced = false;
                let rep = Replica::open(f, self.size, &self.cfg);
                let logs = rep.logs();
                self.local = Local::Replica(rep);
                if stepped_down {
                    // Every logfile is complete now: the next primary's replicas move past our
                    // last one on these links.
                    self.publish_versions(&logs, u64::MAX, false);
                }
            }
            Err(e) => {
                self.log(Level::Error, format!("cannot open the replica: {e}"));
                let retry_at = self.now.ms + self.cfg.timing.attach_retry;
                self.local = Local::Idle {
                    error: Some(IdleError {
                        state: "Detached",
                        text: e,
                        retry_at,
                    }),
                };
            }
        }
    }

    /// Leaves the resource on this host: everything closed, own keys and directory removed.
    fn teardown(&mut self, why: String, reply: Option<OpId>) {
        if let Local::Replica(r) = &mut self.local {
            let stops = r.stop_all();
            self.out.extend(stops);
        }
        for (id, _, _, _) in std::mem::take(&mut self.pending) {
            self.reply(
                id,
                Err(crate::reason::OpError::not_found(format!(
                    "resource {} does not exist",
                    self.res
                ))),
            );
        }
        if let Some(s) = self.saga.take() {
            self.reply(
                s.id,
                Err(crate::reason::OpError::failed(format!(
                    "{}: {why} meanwhile",
                    self.res
                ))),
            );
        }
        self.local = Local::Gone;
        self.emit(Command::Teardown { why, reply });
    }

    /// Publishes this host's version link of each local logfile below `complete_below` that
    /// has none yet, in order, stopping at the first whose previous link is not known yet.
    /// `own_only`: only logfiles this host wrote (a replica publishes the others when replay
    /// passes them).
    fn publish_versions(&mut self, logs: &[LogInfo], complete_below: u64, own_only: bool) {
        let mut set = Vec::new();
        let mut meta = (*self.meta).clone();
        for l in logs
            .iter()
            .filter(|l| l.no < complete_below && (!own_only || l.origin == self.me))
        {
            if meta.version(l.no, &self.me).is_some() {
                continue;
            }
            let Some(link) = crate::plan::my_link(&meta, &self.me, l.no, &l.origin, l.len) else {
                break;
            };
            meta.versions
                .entry(l.no)
                .or_default()
                .insert(self.me.clone(), link.clone());
            set.push((keys::version(&self.res, l.no, &self.me), link));
        }
        self.publish(set, Vec::new());
    }

    /// The oldest logfile some member still needs (reports of reachable members and transient
    /// pins).
    fn pinned_below(&self) -> Option<u64> {
        let below =
            crate::plan::reclaim_below_by(&self.meta, &self.me, &|h| self.live.pinning.contains(h));
        let transient = self.pins.values().map(|(no, _)| *no).min();
        min_opt(below, transient)
    }

    /// Transient pins end when the replica's report carries its own pin (or says it needs a
    /// full sync), when it is unreachable, or after `Timing::transient_pin`.
    fn expire_pins(&mut self) {
        let now = self.now.ms;
        let life = self.cfg.timing.transient_pin;
        let meta = self.meta.clone();
        let pinning = self.live.pinning.clone();
        self.pins.retain(|h, (_, since)| {
            let reported = meta
                .members
                .get(h)
                .and_then(|m| m.report.as_ref())
                .is_some_and(|r| r.pin.is_some() || r.needs_sync);
            pinning.contains(h) && !reported && now < *since + life
        });
        if let Some(end) = self.pins.values().map(|(_, since)| *since + life).min() {
            self.wake_at(end);
        }
    }

    /// Deletes logfiles nobody needs, and this host's version links older than the logfile
    /// before the oldest one anybody keeps (the chain check of logfile N needs the link of N-1,
    /// as in MARS).
    fn reclaim(&mut self) {
        let below = self.pinned_below();
        let me = self.me.clone();
        // Never delete a logfile whose version link this host has not published: the chain
        // continues from it (and the next logfile's check needs it).
        let unlinked = |logs: &[LogInfo], meta: &ResourceMeta| {
            logs.iter()
                .map(|l| l.no)
                .find(|no| meta.version(*no, &me).is_none())
        };
        let oldest_local;
        let mut own_need = None;
        match &mut self.local {
            Local::Primary(p) => {
                let Some(v) = &self.stats.volume else {
                    return;
                };
                oldest_local = v.logs.first().map(|l| l.no);
                let floor = min_opt(below, unlinked(&v.logs, &self.meta));
                // The volume keeps what is not written back and its current logfile itself.
                let keep = v.written_back.file.min(v.current);
                let effective = floor.map_or(keep, |f| f.min(keep));
                // Once per floor: the volume may keep a logfile for reasons of its own (not
                // written back yet), and asking again would change nothing.
                if !p.reclaiming
                    && effective > p.reclaimed_to
                    && v.logs.first().is_some_and(|l| l.no < effective)
                {
                    p.reclaiming = true;
                    p.reclaimed_to = effective;
                    self.out.push(Command::ReclaimLogs { below: floor });
                }
            }
            Local::Replica(r) => {
                let logs = r.logs();
                oldest_local = logs.first().map(|l| l.no);
                let floor = min_opt(below, unlinked(&logs, &self.meta));
                let limit = floor.map_or(r.applied.file, |b| b.min(r.applied.file));
                if let Some(c) = r.drop_below(limit) {
                    self.out.push(c);
                }
                // What this host needs itself, now: the chain check at its replay position
                // needs the link before it (its published pin may be older: found by mars-sim).
                if !self.cfg.bugs.link_reclaim_uses_published_pin() {
                    own_need = Some(r.applied.file);
                }
            }
            _ => return,
        }
        let floor = [below, oldest_local, own_need].into_iter().flatten().min();
        if let Some(floor) = floor {
            let stale: Vec<String> = self
                .meta
                .versions
                .range(..floor.saturating_sub(1))
                .filter(|(_, hosts)| hosts.contains_key(&self.me))
                .map(|(no, _)| keys::version(&self.res, *no, &self.me))
                .collect();
            self.publish(Vec::new(), stale);
        }
    }

    /// Checks the state's invariants (debug builds, after every event).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    fn validate(&self) -> Result<(), String> {
        if let Local::Replica(r) = &self.local {
            r.validate()?;
        }
        if matches!(self.local, Local::Primary(_)) && self.stats.volume.is_none() {
            return Err("a primary without volume stats".into());
        }
        Ok(())
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Applies one of `me`'s writes (or a shared key `me` writes) to a parsed resource.
fn apply_key(meta: &mut ResourceMeta, me: &HostName, key: &str, value: Option<&str>) {
    use crate::keys::ResourceKey;
    let Some((res, k)) = keys::parse(key) else {
        return;
    };
    if res != meta.name {
        return;
    }
    match (k, value) {
        (ResourceKey::Version(no, h), Some(v)) if h == *me => {
            meta.versions
                .entry(no)
                .or_default()
                .insert(h, v.to_string());
        }
        (ResourceKey::Version(no, h), None) if h == *me => {
            if let Some(l) = meta.versions.get_mut(&no) {
                l.remove(&h);
                if l.is_empty() {
                    meta.versions.remove(&no);
                }
            }
        }
        (ResourceKey::Todo(h, sw), Some(v)) if h == *me => {
            if let Some(m) = meta.members.get_mut(&h) {
                m.todo.set(&sw, v != "0");
            }
        }
        (ResourceKey::Applied(h, sw), Some(v)) if h == *me => {
            if let (Some(m), Some(id)) = (meta.members.get_mut(&h), crate::RequestId::from_json(v))
            {
                m.applied.insert(sw, id);
            }
        }
        (ResourceKey::Actual(h), Some(v)) if h == *me => {
            if let Some(m) = meta.members.get_mut(&h) {
                m.report = crate::Report::from_json(v);
            }
        }
        (ResourceKey::ChainStart(h), Some(v)) if h == *me => {
            if let Ok(no) = v.parse() {
                meta.chain_starts.insert(h, no);
            }
        }
        (ResourceKey::EmergencyLimit(h), Some(v)) if h == *me => {
            if let Some(m) = meta.members.get_mut(&h) {
                m.emergency_limit = v.parse().ok().filter(|p| *p > 0);
            }
        }
        (ResourceKey::SystemdStatus(h), Some(v)) if h == *me => {
            if let Some(st) = crate::UnitStatus::from_json(v) {
                meta.systemd.status.insert(h, st);
            }
        }
        // Shared keys (the designation, the systemd want) wait for the store: decisions need
        // their Lamport stamps, which only the store's entry carries.
        _ => {}
    }
}
