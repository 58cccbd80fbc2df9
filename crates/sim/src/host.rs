//! One simulated host: its metadata store, its logfiles and disk, and the role it plays for
//! the resource — the daemon's reconcile round (`daemon/src/lifecycle.rs`), the replica's
//! fetch, replay and full sync (`daemon/src/replica.rs`), and the serving side of the fetch and
//! sync streams (`daemon/src/logserve.rs`), cut down to the decisions. Every decision that the
//! daemon asks `mars_engine` for is asked here in the same way.

use std::collections::BTreeMap;

use mars_config::{HostName, ResourceName};
use mars_engine::model::{Report, ResourceMeta, Role as ReportRole, SyncReport};
use mars_engine::{keys, plan, roles, Promotion};
use mars_meta::{Changes, Store};
use mars_txlog::LogPos;

use crate::ghost::{Ghost, StepDown};
use crate::SimConfig;

mod commands;
mod replica;

/// A member counts as reachable for role decisions if heard from this recently (ms), as
/// `ALIVE_WINDOW` in the daemon.
pub const ALIVE_WINDOW: u64 = 10_000;
/// A restarted ex-primary waits at most this long for the others' metadata.
const STALE_PRIMARY_WAIT: u64 = 10_000;
/// The designated primary waits this long before opening its volume (`PROMOTE_SETTLE`).
const PROMOTE_SETTLE: u64 = 500;
/// A caught-up confirmation counts this long (`CAUGHT_UP_VALID`).
const CAUGHT_UP_VALID: u64 = 3_000;
/// Moving positions are republished at most this often; state changes at once.
const REPORT_EVERY: u64 = 1_000;
/// Records per fetch answer and per replay round: small, so that catching up takes steps
/// during which other things happen.
const FETCH_CHUNK: usize = 6;
const REPLAY_CHUNK: usize = 8;
/// A request without an answer is given up after this long (ms) and sent again.
const REQUEST_TIMEOUT: u64 = 1_000;
/// How long the primary holds a sync's start logfile for the replica (`pin_for`).
const TRANSIENT_PIN: u64 = 60_000;
/// Seconds after which an unreachable member stops pinning logfiles. Short, so that long
/// partitions exercise the "needs a full sync" path.
pub const UNREACHABLE_LIMIT_SECS: u64 = 30;

pub fn res() -> ResourceName {
    ResourceName::new("r").expect("valid")
}

/// A logfile in a host's resource directory (its own or a verified copy). Records are ids
/// into the ghost's table; the offset of a position counts records.
#[derive(Debug, Clone)]
pub struct LogFile {
    pub origin: HostName,
    pub recs: Vec<u64>,
    /// Records made durable (a copy's records are durable on arrival: the replica accounts
    /// fetched bytes only after its fdatasync).
    pub durable: usize,
    /// A copy known to be complete (end seen, or a later logfile began).
    pub complete: bool,
}

/// The primary's volume.
#[derive(Debug, Clone)]
pub struct Vol {
    /// Everything before this position is on the disk (the persisted writeback position).
    pub wb: LogPos,
    /// The application has the device open (NBD client, mounted filesystem).
    pub open: bool,
}

#[derive(Debug, Clone)]
pub struct SyncState {
    pub start: Option<LogPos>,
    pub end: Option<LogPos>,
    /// Ghost: the timeline of the primary's data the copy carried.
    pub copy_tl: Option<Vec<u64>>,
    /// The host that gave the start position (persisted with it).
    pub from: Option<HostName>,
}

#[derive(Debug, Clone)]
pub struct Rep {
    // Persistent (files in the resource directory).
    pub applied: LogPos,
    pub sync: Option<SyncState>,
    pub needs_sync: bool,
    // In memory only: lost in a crash.
    pub gen: u64,
    pub stuck: Option<String>,
    pub forked: Option<u64>,
    pub waiting: Option<String>,
    pub role_wait: Option<String>,
    /// The primary's last "you have everything": its stamp (ms), the position, who said it.
    pub caught_up: Option<(u64, LogPos, HostName)>,
    pub source: Option<HostName>,
    pub fetch_until: u64,
    pub sync_until: u64,
}

impl Rep {
    fn new(applied: LogPos, sync: Option<SyncState>, needs_sync: bool) -> Self {
        Rep {
            applied,
            sync,
            needs_sync,
            gen: 0,
            stuck: None,
            forked: None,
            waiting: None,
            role_wait: None,
            caught_up: None,
            source: None,
            fetch_until: 0,
            sync_until: 0,
        }
    }

    pub fn consistent(&self) -> bool {
        self.sync.is_none() && !self.needs_sync
    }
}

/// What the host has set up for the resource.
#[derive(Debug, Clone)]
// Boxing the replica would save a few hundred bytes for four hosts and cost a box in every match.
#[allow(clippy::large_enum_variant)]
pub enum Local {
    /// Not a member (never joined, or left).
    None,
    /// Was primary, restarted: neither volume nor replica open yet (the reconcile loop decides).
    Closed {
        wb: LogPos,
    },
    Primary(Vol),
    Replica(Rep),
}

/// A role command in progress (the `marsadm primary` client waiting on this host).
#[derive(Debug, Clone)]
#[allow(clippy::enum_variant_names)] // the phases are waits, as in `roles.rs`
pub enum Command {
    /// Planned, phase 0b: the old primary's device must close.
    WaitClosed { old: HostName, deadline: u64 },
    /// Phase 2: the old primary must leave its role, else it gets the role back.
    WaitLeft { old: HostName, deadline: u64 },
    /// Phase 3 (and forced): this host must open its volume.
    WaitPromoted { forced: bool, deadline: u64 },
}

/// Messages between hosts. Fetch and sync are modelled as requests and answers that each
/// carry their own position: the daemon's replica checks every chunk against the end of its
/// copy and resumes by offset, so a lost, late or repeated answer is simply dropped.
#[derive(Debug, Clone)]
pub enum Body {
    /// Anti-entropy answer to "changes after N" (`None`: nothing new, a heartbeat).
    Meta(Option<Changes>),
    FetchReq {
        file: u64,
        off: u64,
        /// The asker's version link of logfile `file - 1` (the fix: the daemon's `FetchFrom`
        /// carries none, so the server cannot see that the asker's history differs before
        /// `file`).
        prev_link: Option<String>,
        gen: u64,
    },
    /// Logfile pieces in order: the asked-for one from the asked offset and, once it is
    /// complete, the start of the next (the daemon's session goes on with the next logfile).
    FetchData {
        segs: Vec<Seg>,
        /// "You have everything durable here" (the primary's `LogCaughtUp`).
        caught_up: bool,
        stamp: u64,
        gen: u64,
    },
    FetchRefuse {
        reason: String,
        from: u64,
        gen: u64,
    },
    FetchGone {
        file: u64,
        gen: u64,
    },
    SyncReq {
        want_copy: bool,
        gen: u64,
    },
    SyncInfo {
        start: LogPos,
        /// The source's version link of the logfile before `start`: the history the copy
        /// continues (the fix: `SyncInfo::prev_link` in the daemon).
        prev_link: Option<String>,
        gen: u64,
    },
    SyncCopy {
        disk: BTreeMap<u32, u64>,
        tl: Option<Vec<u64>>,
        end: LogPos,
        gen: u64,
    },
    /// The operator (through systemd on that host) stops the application: the handover's
    /// request to the old primary.
    StopApp,
}

/// A piece of logfile `file` from record `off` on (`LogFile` + `LogData` [+ `LogEnd`]).
#[derive(Debug, Clone)]
pub struct Seg {
    pub file: u64,
    pub origin: HostName,
    pub off: u64,
    pub recs: Vec<u64>,
    /// The logfile is complete here and this piece reaches its end.
    pub end: bool,
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub from: HostName,
    pub to: HostName,
    pub body: Body,
}

/// What a host's step may touch besides itself.
pub struct Ctx<'a> {
    pub now: u64,
    pub step: u64,
    /// Ghost: every other host (a forced switch gives up their histories).
    pub others: Vec<HostName>,
    pub cfg: &'a SimConfig,
    pub ghost: &'a mut Ghost,
    pub out: &'a mut Vec<Msg>,
    pub trace: &'a mut Vec<String>,
}

impl Ctx<'_> {
    pub fn note(&mut self, s: String) {
        self.trace.push(format!(
            "{:>8.2}s {:>4} {s}",
            self.now as f64 / 1000.0,
            self.step
        ));
    }
}

pub struct Host {
    pub name: HostName,
    pub up: bool,
    pub store: Store,
    meta_cache: Option<(u64, ResourceMeta)>,
    pub local: Local,
    pub logs: BTreeMap<u64, LogFile>,
    pub disk: BTreeMap<u32, u64>,
    /// The FORCE marker file of a forced switch in progress.
    pub forced_marker: bool,
    /// Ghost: the records this host's data is built from, in order (`None`: inconsistent).
    pub tl: Option<Vec<u64>>,
    /// Ghost: the timeline prefix a completed FLUSH made durable here (length, last record).
    pub mark: Option<(usize, Option<u64>)>,
    // In memory only.
    pub started_at: u64,
    pub heard: BTreeMap<HostName, u64>,
    pub seen: BTreeMap<HostName, u64>,
    pub pull_until: BTreeMap<HostName, u64>,
    published: Option<(String, String, u64)>,
    designated_since: Option<u64>,
    pub cmd: Option<Command>,
    transient_pins: BTreeMap<HostName, (u64, u64)>,
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The parts of a report others act on (`state_of` in the daemon): published at once.
fn state_of(r: &Report) -> String {
    format!(
        "{}|{:?}|{:?}|{}|{}|{}|{:?}|{:?}|{}|{:?}|{}",
        r.designation,
        r.forked,
        r.role,
        r.open_count,
        r.attached,
        r.consistent,
        r.sync.as_ref().map(|s| (s.start, s.end_known())),
        r.pin,
        r.needs_sync,
        r.stuck,
        r.caught_up
    )
}

impl Host {
    pub fn new(name: HostName, store: Store) -> Self {
        Host {
            name,
            up: true,
            store,
            meta_cache: None,
            local: Local::None,
            logs: BTreeMap::new(),
            disk: BTreeMap::new(),
            forced_marker: false,
            tl: None,
            mark: None,
            started_at: 0,
            heard: BTreeMap::new(),
            seen: BTreeMap::new(),
            pull_until: BTreeMap::new(),
            published: None,
            designated_since: None,
            cmd: None,
            transient_pins: BTreeMap::new(),
        }
    }

    /// The resource as this host's metadata describes it (rebuilt only after changes).
    pub fn meta(&mut self) -> ResourceMeta {
        let seq = self.store.local_seq();
        if let Some((s, m)) = &self.meta_cache {
            if *s == seq {
                return m.clone();
            }
        }
        let entries = self
            .store
            .list_prefix(&keys::prefix(&res()))
            .expect("in-memory store");
        let mut m = ResourceMeta::from_entries(
            res(),
            entries
                .iter()
                .filter_map(|e| Some((e.key.as_str(), e.value.as_deref()?))),
        );
        // As `daemon/src/state.rs::resource_meta`: the designation is the primary key's stamp.
        let key = keys::primary(&res());
        m.designation = entries.iter().find(|e| e.key == key).map_or(0, |e| e.stamp);
        self.meta_cache = Some((seq, m.clone()));
        m
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.store.set(key, value).expect("own or shared key");
    }

    pub fn alive(&self, now: u64, h: &HostName) -> bool {
        *h == self.name || self.heard.get(h).is_some_and(|t| now - *t <= ALIVE_WINDOW)
    }

    fn alive_fn(&self, now: u64) -> impl Fn(&HostName) -> bool + '_ {
        move |h| self.alive(now, h)
    }

    /// Newest logfile: `(number, records)`.
    fn newest(&self) -> Option<(u64, &LogFile)> {
        self.logs.iter().next_back().map(|(n, f)| (*n, f))
    }

    /// The primary's current logfile number.
    fn current(&self) -> u64 {
        self.newest().map_or(1, |(n, _)| n)
    }

    /// The primary's durable log end.
    pub fn durable_pos(&self) -> LogPos {
        match self.newest() {
            Some((n, f)) => LogPos::new(n, f.durable as u64),
            None => LogPos::new(1, 0),
        }
    }

    fn appended_pos(&self) -> LogPos {
        match self.newest() {
            Some((n, f)) => LogPos::new(n, f.recs.len() as u64),
            None => LogPos::new(1, 0),
        }
    }

    /// The end of the newest local copy (a replica's fetch position).
    pub fn fetched(&self) -> Option<LogPos> {
        self.newest()
            .map(|(n, f)| LogPos::new(n, f.recs.len() as u64))
    }

    pub fn rep(&self) -> Option<&Rep> {
        match &self.local {
            Local::Replica(r) => Some(r),
            _ => None,
        }
    }

    pub fn is_primary(&self) -> bool {
        matches!(self.local, Local::Primary(_))
    }

    pub fn open(&self) -> bool {
        matches!(&self.local, Local::Primary(v) if v.open)
    }

    /// One line about this host's state, for the trace of a failing seed.
    pub fn describe(&self) -> String {
        let logs: Vec<String> = self
            .logs
            .iter()
            .map(|(n, f)| {
                format!(
                    "{n}-{}:{}{}",
                    f.origin,
                    f.recs.len(),
                    if f.complete { "c" } else { "" }
                )
            })
            .collect();
        let role = match &self.local {
            Local::None => "not a member".to_string(),
            Local::Closed { wb } => format!("closed wb {wb}"),
            Local::Primary(v) => format!("primary wb {} open {}", v.wb, v.open),
            Local::Replica(r) => format!(
                "replica applied {} sync {:?} needs_sync {} forked {:?} stuck {:?} waiting \
                 {:?} caught_up {:?} source {:?}",
                r.applied,
                r.sync.as_ref().map(|s| (s.start, s.end)),
                r.needs_sync,
                r.forked,
                r.stuck,
                r.waiting,
                r.caught_up.as_ref().map(|c| (c.0, c.1)),
                r.source
            ),
        };
        format!(
            "{} up {}: {role}; logs [{}]; timeline {:?}",
            self.name,
            self.up,
            logs.join(" "),
            self.tl.as_ref().map(|t| (t.len(), t.last().copied()))
        )
    }

    // ------------------------------------------------------------ crash and restart

    /// Power loss: what was not synced is gone, and so is everything in memory.
    pub fn crash(&mut self, cx: &mut Ctx) {
        self.up = false;
        if let Local::Primary(v) = &self.local {
            let wb = v.wb;
            let mut lost = 0;
            for f in self.logs.values_mut() {
                lost += f.recs.len() - f.durable;
                f.recs.truncate(f.durable);
            }
            if let Some(tl) = &mut self.tl {
                tl.truncate(tl.len() - lost);
            }
            cx.note(format!(
                "{}: crash as primary, {lost} unsynced records lost",
                self.name
            ));
            self.local = Local::Closed { wb };
        } else {
            cx.note(format!("{}: crash", self.name));
        }
        if let Local::Replica(r) = &self.local {
            self.local = Local::Replica(Rep::new(r.applied, r.sync.clone(), r.needs_sync));
        }
        self.cmd = None;
    }

    pub fn restart(&mut self, cx: &mut Ctx) {
        self.up = true;
        self.started_at = cx.now;
        self.heard.clear();
        self.seen.clear();
        self.pull_until.clear();
        self.published = None;
        self.designated_since = None;
        self.transient_pins.clear();
        cx.note(format!("{}: restart", self.name));
    }

    // ------------------------------------------------------------ the primary's volume

    /// Appends a write of `block` (acknowledged at once, durable later).
    pub fn write(&mut self, block: u32, cx: &mut Ctx) -> Option<u64> {
        if !self.is_primary() {
            return None;
        }
        let no = self.current();
        let pos = LogPos::new(no, self.logs.get(&no).map_or(0, |f| f.recs.len() as u64));
        let tl = self.tl.as_mut()?;
        let id = cx.ghost.new_record(block, tl, pos);
        tl.push(id);
        self.logs.get_mut(&no)?.recs.push(id);
        Some(id)
    }

    /// Group commit: everything appended becomes durable.
    pub fn sync_log(&mut self) {
        if self.is_primary() {
            for f in self.logs.values_mut() {
                f.durable = f.recs.len();
            }
        }
    }

    /// FLUSH: durable, and the client's acknowledged writes must survive from now on.
    pub fn flush(&mut self) -> bool {
        if !self.is_primary() {
            return false;
        }
        self.sync_log();
        if let Some(tl) = &self.tl {
            self.mark = Some((tl.len(), tl.last().copied()));
        }
        true
    }

    /// Background writeback of durable records onto the disk.
    pub fn writeback(&mut self, cx: &Ctx) {
        let Local::Primary(v) = &mut self.local else {
            return;
        };
        let mut wb = v.wb;
        for (no, f) in self.logs.range(wb.file..) {
            let from = if *no == wb.file {
                wb.offset as usize
            } else {
                0
            };
            for id in f.recs.iter().take(f.durable).skip(from) {
                self.disk.insert(cx.ghost.info(*id).block, *id);
            }
            wb = LogPos::new(*no, f.durable as u64);
        }
        v.wb = wb;
    }

    /// Rotation (cron, sync start): finish the current logfile and start the next one, unless
    /// the current one is empty. Returns the start of the logfile now current.
    pub fn rotate_if_used(&mut self) -> LogPos {
        let no = self.current();
        if self.logs.get(&no).is_some_and(|f| !f.recs.is_empty()) {
            let f = self.logs.get_mut(&no).expect("checked");
            f.durable = f.recs.len();
            f.complete = true;
            self.logs.insert(
                no + 1,
                LogFile {
                    origin: self.name.clone(),
                    recs: Vec::new(),
                    durable: 0,
                    complete: false,
                },
            );
            LogPos::new(no + 1, 0)
        } else {
            LogPos::new(no, 0)
        }
    }

    /// Opens the volume: recovery applies the log from the writeback position, and the log
    /// continues in a new logfile (`Volume::open`).
    fn open_volume(&mut self, from: LogPos, cx: &Ctx) {
        for (no, f) in self.logs.range(from.file..) {
            let skip = if *no == from.file {
                from.offset as usize
            } else {
                0
            };
            for id in f.recs.iter().take(f.durable).skip(skip) {
                self.disk.insert(cx.ghost.info(*id).block, *id);
            }
        }
        let empty_start = self.logs.is_empty() && from.offset == 0 && from.file > 0;
        let next = if empty_start {
            from.file
        } else {
            self.logs.keys().next_back().map_or(1, |n| n + 1)
        };
        for f in self.logs.values_mut() {
            f.complete = true;
        }
        self.logs.insert(
            next,
            LogFile {
                origin: self.name.clone(),
                recs: Vec::new(),
                durable: 0,
                complete: false,
            },
        );
        self.local = Local::Primary(Vol {
            wb: LogPos::new(next, 0),
            open: true,
        });
    }

    /// Creates the resource here as its first primary.
    pub fn create_primary(&mut self) {
        self.tl = Some(Vec::new());
        self.logs.insert(
            1,
            LogFile {
                origin: self.name.clone(),
                recs: Vec::new(),
                durable: 0,
                complete: false,
            },
        );
        self.local = Local::Primary(Vol {
            wb: LogPos::new(1, 0),
            open: true,
        });
    }

    /// Joins as a replica that needs a full sync (`join-resource`, `invalidate`).
    pub fn start_as_new_replica(&mut self) {
        self.logs.clear();
        self.disk.clear();
        self.tl = None;
        self.mark = None;
        self.local = Local::Replica(Rep::new(
            LogPos::ZERO,
            Some(SyncState {
                start: None,
                end: None,
                copy_tl: None,
                from: None,
            }),
            false,
        ));
    }

    // ------------------------------------------------------------ reconcile round

    /// One round of the daemon's reconcile loop for the resource.
    pub fn reconcile(&mut self, cx: &mut Ctx, all: &[HostName]) {
        let meta = self.meta();
        let me = self.name.clone();
        if !meta.exists() || !meta.is_member(&me) {
            if !matches!(self.local, Local::None) {
                cx.note(format!("{me}: no longer a member: teardown"));
                self.teardown();
            }
            return;
        }
        let todo = meta.members[&me].todo;
        let me_designated = meta.primary.as_ref() == Some(&me);
        if !me_designated {
            self.designated_since = None;
        }
        let now = cx.now;
        match self.local.clone() {
            Local::Primary(v) => {
                if !me_designated {
                    if !v.open {
                        self.step_down(&meta, cx);
                    }
                } else {
                    self.publish_versions(&meta, self.current(), false);
                }
            }
            Local::Replica(_) => {
                if me_designated && todo.attach && self.try_promote(&meta, cx) {
                    self.publish_report(&todo, now);
                    return;
                }
                let source = {
                    let alive = self.alive_fn(now);
                    roles::fetch_source(&meta, &me, self.fetched(), &alive)
                };
                let restart_sync = !cx.cfg.sync_survives_source_change
                    && source.is_some()
                    && self.rep().is_some_and(|r| {
                        r.sync
                            .as_ref()
                            .is_some_and(|s| s.start.is_some() && s.from != source)
                    });
                if restart_sync {
                    // The copy and the start position came from another host, perhaps of
                    // another history: start over from the new source.
                    let gen = self.rep().map_or(0, |r| r.gen) + 1;
                    cx.note(format!(
                        "{me}: sync source changed: the full sync starts over"
                    ));
                    self.start_as_new_replica();
                    self.rep_mut().gen = gen;
                }
                if let Local::Replica(r) = &mut self.local {
                    if r.source != source {
                        r.fetch_until = 0;
                        r.sync_until = 0;
                        // A confirmation speaks for the host that gave it.
                        if !cx.cfg.caught_up_survives_source_change {
                            r.caught_up = None;
                        }
                    }
                    r.source = source;
                    if !me_designated {
                        r.role_wait = None;
                    }
                }
                if let Some((newest, _)) = self.newest() {
                    self.publish_versions(&meta, newest, true);
                }
            }
            Local::Closed { wb } => {
                if me_designated && todo.attach {
                    // A primary role found on disk is taken up only with metadata at least as
                    // fresh as every member's answer since the restart.
                    let fresh = all.iter().filter(|h| **h != me).all(|h| {
                        !meta.is_member(h)
                            || self.heard.get(h).is_some_and(|t| *t >= self.started_at)
                    }) || now - self.started_at > STALE_PRIMARY_WAIT;
                    if fresh {
                        self.open_volume(wb, cx);
                        cx.note(format!("{me}: primary again after restart"));
                    }
                } else if !me_designated {
                    // Restarted as the old primary, another host took over meanwhile.
                    self.write_back_all(wb, cx);
                    let end = self.end_of_log(wb);
                    self.become_replica(end);
                    cx.ghost.forced_out.remove(&me);
                    cx.note(format!("{me}: restarted ex-primary attaches as replica"));
                }
            }
            Local::None => {}
        }
        let meta = self.meta();
        self.reclaim(&meta, now, cx.cfg.link_reclaim_uses_published_pin);
        self.publish_report(&todo, now);
    }

    fn teardown(&mut self) {
        self.local = Local::None;
        self.logs.clear();
        self.disk.clear();
        self.tl = None;
        self.mark = None;
        self.cmd = None;
        self.published = None;
    }

    /// Applies every durable record after `wb` (what recovery or the replica's replay of its
    /// own logfiles would do; the simulation does it at once, see the crate docs).
    fn write_back_all(&mut self, wb: LogPos, cx: &Ctx) {
        for (no, f) in self.logs.range(wb.file..) {
            let skip = if *no == wb.file {
                wb.offset as usize
            } else {
                0
            };
            for id in f.recs.iter().take(f.durable).skip(skip) {
                self.disk.insert(cx.ghost.info(*id).block, *id);
            }
        }
    }

    /// Where the disk is once every durable record after `wb` is written back.
    fn end_of_log(&self, wb: LogPos) -> LogPos {
        match self.newest() {
            Some((n, f)) if LogPos::new(n, f.durable as u64) > wb => {
                LogPos::new(n, f.durable as u64)
            }
            _ => wb,
        }
    }

    /// The volume is closed: the log continues as a replica at its end (`Resource::step_down`
    /// after `close_volume`).
    fn become_replica(&mut self, wb: LogPos) {
        // A logfile we started but never wrote to is no history: drop it, or the next
        // primary's logfile with the same number would look like a fork.
        if let Some((no, f)) = self.newest() {
            if f.origin == self.name && f.recs.is_empty() {
                self.logs.remove(&no);
            }
        }
        // Everything is written back: the replica starts at the end of the last logfile (what
        // this host reports as its log end), or where the disk is if no logfile is left.
        let applied = self
            .newest()
            .map_or(wb, |(n, f)| LogPos::new(n, f.recs.len() as u64));
        self.local = Local::Replica(Rep::new(applied, None, false));
    }

    fn step_down(&mut self, meta: &ResourceMeta, cx: &mut Ctx) {
        let Local::Primary(v) = &self.local else {
            return;
        };
        let wb = v.wb;
        // Closing the volume makes everything durable and writes it back.
        for f in self.logs.values_mut() {
            f.durable = f.recs.len();
        }
        self.write_back_all(wb, cx);
        let end = self.end_of_log(wb);
        self.become_replica(end);
        // A primary pushed out by a forced switch leaves a history the operator gave up.
        let forced_out = cx.ghost.forced_out.remove(&self.name);
        cx.ghost.last_step_down = self.tl.as_ref().filter(|_| !forced_out).map(|tl| StepDown {
            host: self.name.clone(),
            len: tl.len(),
            last: tl.last().copied(),
        });
        cx.note(format!(
            "{}: leaves the primary role ({} designated), log ends at {}",
            self.name,
            meta.primary
                .as_ref()
                .map_or("(none)".to_string(), ToString::to_string),
            self.fetched().unwrap_or(LogPos::ZERO)
        ));
        self.publish_versions(meta, u64::MAX, false);
    }

    fn try_promote(&mut self, meta: &ResourceMeta, cx: &mut Ctx) -> bool {
        let now = cx.now;
        let since = *self.designated_since.get_or_insert(now);
        let Local::Replica(r) = &self.local else {
            return false;
        };
        if !r.consistent() {
            let r = self.rep_mut();
            r.role_wait = Some("designated primary, but the replica is inconsistent".into());
            return false;
        }
        let forced = self.forced_marker;
        let pending = r.stuck.is_none()
            && r.waiting.is_none()
            && meta.members[&self.name].todo.replay
            && self.fetched().is_some_and(|f| f > r.applied);
        if forced && pending {
            self.rep_mut().role_wait = Some("replaying what was fetched before taking over".into());
            return false;
        }
        let applied = r.applied;
        let decision = if cx.cfg.planned_promotion_ignores_others && !forced {
            // Broken engine (demonstration): a planned promotion that does not wait for the
            // old primary to leave or for its last byte.
            Promotion::Go
        } else {
            let alive = self.alive_fn(now);
            roles::promotion(meta, &self.name, applied, forced, &alive)
        };
        match decision {
            Promotion::Wait(why) => {
                self.rep_mut().role_wait = Some(why);
                false
            }
            Promotion::Go if now - since < PROMOTE_SETTLE => false,
            Promotion::Go => {
                self.promote(forced, cx);
                true
            }
        }
    }

    fn rep_mut(&mut self) -> &mut Rep {
        match &mut self.local {
            Local::Replica(r) => r,
            _ => unreachable!("callers hold a replica"),
        }
    }

    /// `Resource::promote`: cut what was fetched beyond the replay position, open the volume.
    fn promote(&mut self, forced: bool, cx: &mut Ctx) {
        let at = self.rep().expect("replica").applied;
        let later: Vec<u64> = self.logs.range(at.file + 1..).map(|(n, _)| *n).collect();
        for no in later {
            self.logs.remove(&no);
        }
        if at.offset == 0 {
            self.logs.remove(&at.file);
        } else if let Some(f) = self.logs.get_mut(&at.file) {
            f.recs.truncate(at.offset as usize);
            f.durable = f.recs.len();
        }
        let me = self.name.clone();
        if !forced {
            if let (Some(sd), Some(tl)) = (&cx.ghost.last_step_down, &self.tl) {
                if !Ghost::extends(tl, sd.len, sd.last) {
                    let v = format!(
                        "{me} became primary by a planned handover without {}'s last writes: \
                         it has {} records, {} had {} up to {:?}",
                        sd.host,
                        tl.len(),
                        sd.host,
                        sd.len,
                        sd.last
                    );
                    cx.ghost.violations.push(v);
                }
            }
            // The new primary owns the old one's flushed writes now.
            if let Some(sd) = &cx.ghost.last_step_down {
                if self.mark.is_none_or(|(l, _)| l < sd.len) {
                    self.mark = Some((sd.len, sd.last));
                }
            }
        } else {
            // Forced: whatever the others had beyond our replay position may be lost, also
            // what a primary still acting now writes until it leaves.
            cx.ghost.last_step_down = None;
            // Every other history is given up: also that of a host down now that comes back
            // acting as primary on stale metadata and then leaves for us (seed 5564).
            cx.ghost.forced_out.extend(cx.others.iter().cloned());
        }
        // A new history of ours begins: an old mark of having been pushed out no longer holds.
        cx.ghost.forced_out.remove(&me);
        if forced {
            cx.ghost.forced_promotions += 1;
        } else {
            cx.ghost.planned_promotions += 1;
        }
        self.open_volume(at, cx);
        self.forced_marker = false;
        self.designated_since = None;
        cx.note(format!(
            "{me}: primary now{} after {at}, continuing in log {}",
            if forced { " (forced)" } else { "" },
            self.current()
        ));
    }

    /// `publish_versions`: this host's link of each logfile below `complete_below` that has
    /// none yet (`own_only`: only those it wrote itself).
    fn publish_versions(&mut self, meta: &ResourceMeta, complete_below: u64, own_only: bool) {
        let mut meta = meta.clone();
        let me = self.name.clone();
        let names: Vec<(u64, HostName, u64)> = self
            .logs
            .iter()
            .filter(|(n, f)| **n < complete_below && (!own_only || f.origin == me))
            .map(|(n, f)| (*n, f.origin.clone(), f.recs.len() as u64))
            .collect();
        for (no, origin, len) in names {
            if meta.version(no, &me).is_some() {
                continue;
            }
            let Some(link) = plan::my_link(&meta, &me, no, &origin, len) else {
                return;
            };
            self.set(&keys::version(&res(), no, &me), &link);
            meta.versions
                .entry(no)
                .or_default()
                .insert(me.clone(), link);
        }
    }

    fn ages(&self, now: u64) -> BTreeMap<HostName, std::time::Duration> {
        self.heard
            .iter()
            .map(|(h, t)| (h.clone(), std::time::Duration::from_millis(now - t)))
            .collect()
    }

    fn pinned_below(&mut self, meta: &ResourceMeta, now: u64) -> Option<u64> {
        let limit = std::time::Duration::from_secs(UNREACHABLE_LIMIT_SECS);
        let below = plan::reclaim_below(meta, &self.name, &self.ages(now), limit);
        // Transient pins end when the replica's report carries a pin, or after a while.
        self.transient_pins.retain(|h, (_, until)| {
            *until > now
                && meta
                    .members
                    .get(h)
                    .and_then(|m| m.report.as_ref())
                    .is_none_or(|r| r.pin.is_none())
        });
        min_opt(below, self.transient_pins.values().map(|(f, _)| *f).min())
    }

    /// Deletes logfiles nobody needs and this host's version links below them.
    fn reclaim(&mut self, meta: &ResourceMeta, now: u64, cx_cfg_published_pin_only: bool) {
        let below = self.pinned_below(meta, now);
        let unlinked = self
            .logs
            .keys()
            .copied()
            .find(|no| meta.version(*no, &self.name).is_none());
        let below = min_opt(below, unlinked);
        let keep_from = match &self.local {
            Local::Primary(v) => {
                let mine = v.wb.file.min(self.current());
                below.map_or(mine, |b| b.min(mine))
            }
            Local::Replica(r) => below.map_or(r.applied.file, |b| b.min(r.applied.file)),
            _ => return,
        };
        let victims: Vec<u64> = self.logs.range(..keep_from).map(|(n, _)| *n).collect();
        for no in victims {
            self.logs.remove(&no);
        }
        let oldest_local = self.logs.keys().next().copied();
        // What this host needs itself, now (its published pin may be a round or more old: a
        // restarted ex-primary publishes none while it waits): the chain check of its replay
        // position needs the link before it.
        let own_need = match &self.local {
            Local::Replica(r) if !cx_cfg_published_pin_only => Some(r.applied.file),
            _ => None,
        };
        let floor = min_opt(
            min_opt(self.pinned_below(meta, now), oldest_local),
            own_need,
        );
        if let Some(floor) = floor {
            let stale: Vec<u64> = meta
                .versions
                .range(..floor.saturating_sub(1))
                .filter(|(_, hosts)| hosts.contains_key(&self.name))
                .map(|(no, _)| *no)
                .collect();
            for no in stale {
                self.store
                    .delete(&keys::version(&res(), no, &self.name))
                    .expect("own key");
            }
        }
    }

    /// What this host reports about itself (`Resource::report`).
    pub fn report(&self, todo: &mars_engine::Todo, now: u64) -> Report {
        let mut rep = Report::default();
        match &self.local {
            Local::Primary(v) => {
                let durable = self.durable_pos();
                rep.role = ReportRole::Primary;
                rep.attached = true;
                rep.consistent = true;
                rep.applied = Some(v.wb);
                rep.log_end = Some(durable);
                rep.pin = Some(v.wb.file.min(self.current()));
                rep.open_count = u64::from(v.open);
                rep.logs = self
                    .logs
                    .iter()
                    .map(|(n, f)| {
                        let len = if *n == durable.file {
                            durable.offset
                        } else {
                            f.recs.len() as u64
                        };
                        (*n, len)
                    })
                    .collect();
            }
            Local::Replica(r) => {
                let fetched = self.fetched();
                rep.role = ReportRole::Secondary;
                rep.attached = todo.attach;
                rep.applied = Some(r.applied);
                rep.log_end = fetched.or(Some(r.applied));
                // Progress is not modelled: the copy is all (1 of 1) or nothing.
                rep.sync = r.sync.as_ref().map(|s| SyncReport {
                    start: s.start,
                    done: u64::from(s.end.is_some()),
                    size: 1,
                    transferred: 0,
                    running: s.end.is_none(),
                    rate: 0,
                });
                rep.consistent = r.consistent();
                rep.pin = if r.needs_sync {
                    None
                } else {
                    match &r.sync {
                        Some(s) => s.start.map(|p| p.file.min(r.applied.file)),
                        None => Some(r.applied.file),
                    }
                };
                rep.needs_sync = r.needs_sync;
                rep.stuck = r
                    .stuck
                    .clone()
                    .or_else(|| r.needs_sync.then(|| "needs a full sync".to_string()))
                    .or_else(|| r.role_wait.clone())
                    .or_else(|| r.waiting.clone());
                rep.caught_up = todo.fetch
                    && r.caught_up.as_ref().is_some_and(|(stamp, p, _)| {
                        Some(*p) == fetched && now.saturating_sub(*stamp) < CAUGHT_UP_VALID
                    });
                rep.forked = r.forked;
            }
            Local::Closed { .. } | Local::None => {}
        }
        rep
    }

    fn publish_report(&mut self, todo: &mars_engine::Todo, now: u64) {
        let mut report = self.report(todo, now);
        report.designation = self.meta().designation;
        let json = report.to_json();
        let state = state_of(&report);
        let due = match &self.published {
            Some((old, old_state, at)) => {
                *old_state != state || (*old != json && now - at >= REPORT_EVERY)
            }
            None => true,
        };
        if due {
            self.set(&keys::actual(&res(), &self.name), &json);
            self.published = Some((json, state, now));
        }
    }
}
