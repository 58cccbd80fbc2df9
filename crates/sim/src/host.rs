//! One simulated host: its metadata store, its resource directory (control files, logfiles,
//! disk), the real [`ResourceEngine`] of the resource, and the *simulated executor* that carries
//! out the engine's commands against that state (`exec.rs`), serves fetch and sync sessions to
//! other hosts (`serve.rs`) and runs this host's own fetch, replay and sync sessions
//! (`session.rs`). No replication decision is taken here: every one is the engine's (or, on the
//! serving side, a `mars_engine::serve` function's).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use mars_config::{HostName, ResourceName};
use mars_engine::config::{EngineConfig, Timing};
use mars_engine::keys;
use mars_engine::model::ResourceMeta;
use mars_engine::resource::{
    Event, LocalFacts, LogInfo, Now, Op, OpId, OpReply, ResourceEngine, Stats as EngineStats,
    SyncFile, VolumeStats,
};
use mars_meta::{Changes, Store};
use mars_txlog::LogPos;

use crate::ghost::Ghost;
use crate::SimConfig;

mod exec;
mod serve;
mod session;

pub use serve::{FetchAnswer, SyncAnswer};
use session::{FetchSession, ReplaySession, SyncSession};

/// Most events one event may set off (completions, and their completions …) before the
/// simulation calls it a livelock.
const MAX_CASCADE: usize = 1000;
/// The monotonic clock's reading at simulated time 0 (ms).
pub const BASE_MS: u64 = 1_000_000;
/// Blocks of the simulated disk; also the resource's size (the model counts blocks).
pub const SIZE: u64 = 16;
/// Seconds after which an unreachable member stops pinning logfiles. Short, so that long
/// partitions exercise the "needs a full sync" path.
pub const UNREACHABLE_LIMIT_SECS: u64 = 30;

pub fn res() -> ResourceName {
    ResourceName::new("r").expect("valid")
}

/// The resource directory's control files: what survives a crash besides the logfiles, the
/// disk and the metadata store.
#[derive(Debug, Clone)]
pub struct Dir {
    pub replica_marker: bool,
    pub force_marker: bool,
    pub emergency_marker: bool,
    pub chain_start: Option<u64>,
    /// The replay position (replica) or the volume's writeback position (primary).
    pub position: LogPos,
    pub sync: Option<SyncFile>,
    pub needs_sync: Option<String>,
    pub size: u64,
}

impl Dir {
    /// A new resource directory: the creator's (an empty log from logfile 1) or a joining
    /// member's: a full sync pending, and the replica marker (the directory holds a replica:
    /// without it, a host that joins while the metadata still designates it — a handover's
    /// compensation can do that — would open its empty disk as the primary's volume; the old
    /// daemon's `join-resource` set no marker, found by mars-sim, seed 915).
    fn new(joining: bool) -> Dir {
        Dir {
            replica_marker: joining,
            force_marker: false,
            emergency_marker: false,
            chain_start: None,
            position: if joining {
                LogPos::ZERO
            } else {
                LogPos::new(1, 0)
            },
            sync: joining.then(|| SyncFile::full(SIZE)),
            needs_sync: None,
            size: SIZE,
        }
    }
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
    /// Its writer finished it (rotation, a new logfile after a restart or a step-down), or, for
    /// a copy, its end arrived or a later copy began.
    pub complete: bool,
}

impl LogFile {
    fn new(origin: HostName) -> LogFile {
        LogFile {
            origin,
            recs: Vec::new(),
            durable: 0,
            complete: false,
        }
    }
}

/// The primary's open volume (its writeback position is [`Dir::position`]).
#[derive(Debug, Clone)]
pub struct Vol {
    /// The application has the device open (NBD client, mounted filesystem).
    pub app_open: bool,
}

/// Identifies one session of one engine incarnation on the wire: answers to a session of an
/// engine that has since been rebuilt (a crash) are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sid {
    pub incarnation: u64,
    pub id: u64,
}

/// Messages between hosts. Fetch and sync are modelled as requests and answers that each
/// carry their own position: the daemon's replica checks every chunk against the end of its
/// copy, so a lost, late or repeated answer is simply dropped. `boot` is the server's
/// incarnation: a different one in the middle of a session is a reset connection.
#[derive(Debug, Clone)]
pub enum Body {
    /// Anti-entropy answer to "changes after N" (`None`: nothing new, a heartbeat).
    Meta(Option<Changes>),
    /// Fetch logfile `file` from record `off` on. `prev_link`: the asker's version link of
    /// `file - 1`, sent until the session's first answer (the daemon's `FetchFrom` at the start
    /// of a connection); `None` later.
    FetchReq {
        sid: Sid,
        file: u64,
        off: u64,
        prev_link: Option<String>,
        /// The asker's record before `off` in its copy of `file` (the daemon's `tail`
        /// digest): the server refuses when its own differs (another incarnation of the
        /// logfile).
        tail: Option<u64>,
    },
    FetchAns {
        sid: Sid,
        boot: u64,
        ans: FetchAnswer,
    },
    /// A full sync: its start (`copy: None`), or the copy of `done..size`.
    SyncReq { sid: Sid, copy: Option<(u64, u64)> },
    SyncAns {
        sid: Sid,
        boot: u64,
        ans: SyncAnswer,
    },
    /// The operator (through systemd on that host) stops the application: the handover's
    /// request to the old primary.
    StopApp,
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub from: HostName,
    pub to: HostName,
    pub body: Body,
}

/// What a host's step may touch besides itself.
pub struct Ctx<'a> {
    /// Simulated time (ms since the start).
    pub now: u64,
    pub step: u64,
    /// Every host of the cluster.
    pub cluster: &'a [HostName],
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
    /// This host's clock is off by this much (ms): stamps other hosts make must not care.
    skew: i64,
    /// The resource's engine while the host is a member and up (rebuilt after a crash).
    pub engine: Option<ResourceEngine>,
    // ---- persistent: survives a crash
    /// The resource directory (`None`: not a member here).
    pub dir: Option<Dir>,
    pub logs: BTreeMap<u64, LogFile>,
    pub disk: BTreeMap<u32, u64>,
    // ---- the executor's state in memory
    pub vol: Option<Vol>,
    /// `SetDesignated`: the device accepts new openers.
    pub designated: bool,
    /// `SetFenced`: writes fail.
    pub fenced: bool,
    fetch: Option<FetchSession>,
    replay: Option<ReplaySession>,
    sync: Option<SyncSession>,
    /// Counts engines built on this host (session ids restart with each).
    incarnation: u64,
    pub started_at: u64,
    pub heard: BTreeMap<HostName, u64>,
    pub seen: BTreeMap<HostName, u64>,
    pub pull_until: BTreeMap<HostName, u64>,
    /// The store's seq when the engine last got the metadata.
    meta_seq: Option<u64>,
    live_sent: Option<mars_engine::resource::Liveness>,
    stats_sent: Option<EngineStats>,
    /// The engine's last `wake_at`.
    wake: Option<u64>,
    /// Operator replies the engine gave (the world collects them).
    pub replies: Vec<(OpId, OpReply)>,
    // ---- ghost: what the simulation knows and the host does not
    /// The records this host's data is built from, in order (`None`: inconsistent).
    pub tl: Option<Vec<u64>>,
    /// The timeline prefix a completed FLUSH made durable here (length, last record).
    pub mark: Option<(usize, Option<u64>)>,
    /// The host that sent the last caught-up confirmation this replica's engine took.
    pub confirmed_by: Option<HostName>,
    /// The operator's last `primary` command on this host was `--force` (what a promotion
    /// here may lose is decided by the operator's intent, not by the engine's marker).
    pub ghost_force: bool,
}

impl Host {
    pub fn new(name: HostName, store: Store, skew: i64) -> Self {
        Host {
            name,
            up: true,
            store,
            skew,
            engine: None,
            dir: None,
            logs: BTreeMap::new(),
            disk: BTreeMap::new(),
            vol: None,
            designated: false,
            fenced: false,
            fetch: None,
            replay: None,
            sync: None,
            incarnation: 0,
            started_at: 0,
            heard: BTreeMap::new(),
            seen: BTreeMap::new(),
            pull_until: BTreeMap::new(),
            meta_seq: None,
            live_sent: None,
            stats_sent: None,
            wake: None,
            replies: Vec::new(),
            tl: None,
            mark: None,
            confirmed_by: None,
            ghost_force: false,
        }
    }

    pub fn now(&self, cx: &Ctx) -> Now {
        let ms = BASE_MS + cx.now;
        Now {
            ms,
            wall_ns: (ms as i64 + self.skew) as u64 * 1_000_000,
        }
    }

    /// The resource as this host's store describes it, with the Lamport stamps decisions need.
    pub fn store_meta(&self) -> ResourceMeta {
        let entries = self
            .store
            .list_prefix(&keys::prefix(&res()))
            .expect("in-memory store");
        ResourceMeta::from_stamped(
            res(),
            entries
                .iter()
                .filter_map(|e| Some((e.key.as_str(), e.value.as_deref()?, e.stamp))),
        )
    }

    /// The metadata as this host's engine sees it (the store's if it runs none).
    pub fn meta(&self) -> ResourceMeta {
        match &self.engine {
            Some(e) => (**e.meta()).clone(),
            None => self.store_meta(),
        }
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.store.set(key, value).expect("own or shared key");
    }

    pub fn alive(&self, now: u64, h: &HostName) -> bool {
        *h == self.name
            || self
                .heard
                .get(h)
                .is_some_and(|t| now - *t <= Timing::standard().alive_window)
    }

    /// Newest logfile: `(number, file)`.
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

    fn position(&self) -> LogPos {
        self.dir.as_ref().map_or(LogPos::ZERO, |d| d.position)
    }

    pub fn is_primary(&self) -> bool {
        self.vol.is_some()
    }

    pub fn open(&self) -> bool {
        self.vol.as_ref().is_some_and(|v| v.app_open)
    }

    /// The local logfiles as the engine describes them.
    fn log_infos(&self) -> Vec<LogInfo> {
        self.logs
            .iter()
            .map(|(no, f)| LogInfo {
                no: *no,
                origin: f.origin.clone(),
                len: f.recs.len() as u64,
                complete: f.complete,
            })
            .collect()
    }

    /// One line about this host's state, for the trace of a failing seed.
    pub fn describe(&self) -> String {
        let logs: Vec<String> = self
            .logs
            .iter()
            .map(|(n, f)| {
                format!(
                    "{n}-{}:{}{}{}",
                    f.origin,
                    f.recs.len(),
                    if f.durable < f.recs.len() {
                        format!("({} durable)", f.durable)
                    } else {
                        String::new()
                    },
                    if f.complete { "c" } else { "" }
                )
            })
            .collect();
        let role = match (&self.engine, &self.vol) {
            (None, _) if self.dir.is_none() => "not a member".to_string(),
            (None, _) => "no engine".to_string(),
            (Some(_), Some(v)) => format!(
                "primary wb {} app {} designated {} fenced {}",
                self.position(),
                v.app_open,
                self.designated,
                self.fenced
            ),
            (Some(e), None) => {
                let st = e.status();
                format!(
                    "{} applied {:?} fetched {:?} consistent {} busy {:?} error {:?} stuck {:?} \
                     fetch_error {:?} caught_up {:?} (by {:?})",
                    if e.replica().is_some() {
                        "replica"
                    } else {
                        "idle"
                    },
                    st.applied,
                    st.fetched,
                    st.consistent,
                    st.busy,
                    st.error,
                    st.report.stuck,
                    st.fetch_error,
                    st.caught_up_ms,
                    self.confirmed_by,
                )
            }
        };
        format!(
            "{} up {}: {role}; dir {:?}; logs [{}]; timeline {:?}",
            self.name,
            self.up,
            self.dir.as_ref().map(|d| (
                d.position,
                d.replica_marker,
                d.force_marker,
                d.sync.as_ref().map(|s| (s.start, s.end, s.from.clone())),
                d.needs_sync.is_some()
            )),
            logs.join(" "),
            self.tl.as_ref().map(|t| (t.len(), t.last().copied()))
        )
    }

    // ------------------------------------------------------------ the engine

    /// The engine's configuration: the standard timing, and the bug switches of the run.
    fn engine_config(cfg: &SimConfig) -> EngineConfig {
        EngineConfig {
            bugs: cfg.engine_bugs(),
            ..EngineConfig::default()
        }
    }

    /// Builds the engine for the resource directory here and tells it what the directory
    /// says (after creation, a join or a restart).
    fn start_engine(&mut self, cx: &mut Ctx) {
        let Some(d) = &self.dir else { return };
        let facts = LocalFacts {
            replica_marker: d.replica_marker,
            force_marker: d.force_marker,
            emergency_marker: d.emergency_marker,
            chain_start: d.chain_start,
            size: d.size,
        };
        self.incarnation += 1;
        self.engine = Some(ResourceEngine::new(
            Self::engine_config(cx.cfg),
            self.name.clone(),
            res(),
        ));
        self.meta_seq = None;
        self.live_sent = None;
        self.stats_sent = None;
        self.wake = None;
        self.feed_meta(cx);
        self.feed_liveness(cx);
        self.feed(Event::Started(facts), cx);
        self.feed_stats(cx, true);
    }

    /// Hands one event to the engine and carries out what it asks for, and the completions
    /// that follow, until nothing is left. Commands never feed the engine themselves (their
    /// completions are queued), so the commands of one output run in their order.
    pub fn feed(&mut self, ev: Event, cx: &mut Ctx) {
        let mut queue = VecDeque::from([ev]);
        let mut n = 0;
        while let Some(ev) = queue.pop_front() {
            n += 1;
            if n > MAX_CASCADE {
                // The engine and the executor keep answering each other without time passing:
                // a livelock (the first engine bug mars-sim found on the engine was one).
                self.executor_bug(
                    cx,
                    format!("no rest after {MAX_CASCADE} events, the last one {ev:?}"),
                );
                return;
            }
            let now = self.now(cx);
            let Some(engine) = self.engine.as_mut() else {
                return;
            };
            let out = engine.on_event(now, ev);
            self.wake = out.wake_at;
            for c in out.commands {
                self.execute(c, cx, &mut queue);
            }
        }
    }

    /// An operator request to the engine (the reply arrives as [`Host::replies`]).
    pub fn op(&mut self, id: OpId, op: Op, cx: &mut Ctx) {
        self.feed(Event::Op { id, op }, cx);
    }

    /// The metadata, when the store changed since the engine last saw it.
    fn feed_meta(&mut self, cx: &mut Ctx) {
        let seq = self.store.local_seq();
        if self.engine.is_none() || self.meta_seq == Some(seq) {
            return;
        }
        self.meta_seq = Some(seq);
        let m = Arc::new(self.store_meta());
        self.feed(Event::Meta(m), cx);
    }

    /// Who counts as reachable (heard from within `Timing::alive_window`), who still pins
    /// logfiles (heard from within `defaults/unreachable-limit`), and whether every other host
    /// of the cluster answered since this host started.
    fn liveness(&self, cx: &Ctx) -> mars_engine::resource::Liveness {
        let limit_ms = self
            .store
            .value(keys::UNREACHABLE_LIMIT)
            .ok()
            .flatten()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(keys::DEFAULT_UNREACHABLE_SECS)
            * 1000;
        let within = |h: &HostName, ms: u64| self.heard.get(h).is_some_and(|t| cx.now - *t <= ms);
        let others = || cx.cluster.iter().filter(|h| **h != self.name);
        mars_engine::resource::Liveness {
            reachable: others()
                .filter(|h| within(h, Timing::standard().alive_window))
                .cloned()
                .collect::<BTreeSet<_>>(),
            pinning: others().filter(|h| within(h, limit_ms)).cloned().collect(),
            fresh: others().all(|h| self.heard.get(h).is_some_and(|t| *t >= self.started_at)),
        }
    }

    fn feed_liveness(&mut self, cx: &mut Ctx) {
        if self.engine.is_none() {
            return;
        }
        let l = self.liveness(cx);
        if self.live_sent.as_ref() != Some(&l) {
            self.live_sent = Some(l.clone());
            self.feed(Event::Liveness(l), cx);
        }
    }

    fn volume_stats(&self) -> VolumeStats {
        let wb = self.position();
        let durable = self.durable_pos();
        let dirty: usize = self
            .logs
            .range(wb.file..)
            .map(|(no, f)| {
                let from = if *no == wb.file {
                    wb.offset as usize
                } else {
                    0
                };
                f.durable.saturating_sub(from)
            })
            .sum();
        VolumeStats {
            durable,
            written_back: wb,
            current: self.current(),
            dirty_bytes: dirty as u64,
            passthrough: false,
            error: None,
            logs: self.log_infos(),
            size: SIZE,
        }
    }

    /// The local measurements (rates are not modelled; space is plenty).
    fn measure(&self) -> EngineStats {
        EngineStats {
            open_count: u64::from(self.open()),
            free_space: None,
            total_space: None,
            log_bytes: self.logs.values().map(|f| f.recs.len() as u64).sum(),
            disk_size: SIZE,
            volume: self.vol.as_ref().map(|_| self.volume_stats()),
            fetch_rate: 0,
            replay_rate: 0,
            sync_rate: 0,
        }
    }

    /// Fresh statistics when they changed, when the engine's timer is due, or when `force`d.
    fn feed_stats(&mut self, cx: &mut Ctx, force: bool) {
        if self.engine.is_none() {
            return;
        }
        let s = self.measure();
        let due = self.wake.is_some_and(|w| w <= self.now(cx).ms);
        if force || due || self.stats_sent.as_ref() != Some(&s) {
            self.stats_sent = Some(s.clone());
            self.feed(Event::Stats(s), cx);
        }
    }

    /// One round of the host: the metadata and liveness the engine has not seen yet, its
    /// sessions' next steps, writeback, and fresh statistics.
    pub fn round(&mut self, cx: &mut Ctx, writeback: bool) {
        if self.engine.is_none() {
            return;
        }
        self.feed_meta(cx);
        self.feed_liveness(cx);
        self.fetch_tick(cx);
        self.sync_tick(cx);
        self.replay_tick(cx);
        if writeback {
            self.writeback(cx);
        }
        self.feed_stats(cx, false);
    }

    // ------------------------------------------------------------ crash and restart

    /// Power loss: what was not synced is gone, and so is everything in memory (the engine,
    /// sessions, the view of who is alive).
    pub fn crash(&mut self, cx: &mut Ctx) {
        self.up = false;
        self.engine = None;
        self.fetch = None;
        self.replay = None;
        self.sync = None;
        self.designated = false;
        self.fenced = false;
        self.confirmed_by = None;
        self.wake = None;
        self.replies.clear();
        if self.vol.take().is_some() {
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
        } else {
            cx.note(format!("{}: crash", self.name));
        }
    }

    pub fn restart(&mut self, cx: &mut Ctx) {
        self.up = true;
        self.started_at = cx.now;
        self.heard.clear();
        self.seen.clear();
        self.pull_until.clear();
        cx.note(format!("{}: restart", self.name));
        self.start_engine(cx);
    }

    // ------------------------------------------------------------ the primary's volume

    /// The application writes `block` (acknowledged at once, durable later). Fails while
    /// fenced.
    pub fn write(&mut self, block: u32, cx: &mut Ctx) -> Option<u64> {
        if !self.open() || self.fenced {
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

    /// Writes the durable records from `from` on onto the disk; returns where that ends.
    fn apply_log_from(&mut self, from: LogPos, cx: &Ctx) -> LogPos {
        let mut end = from;
        for (no, f) in self.logs.range(from.file..) {
            let skip = if *no == from.file {
                from.offset as usize
            } else {
                0
            };
            for id in f.recs.iter().take(f.durable).skip(skip) {
                self.disk.insert(cx.ghost.info(*id).block, *id);
            }
            end = LogPos::new(*no, f.durable.max(skip) as u64);
        }
        end
    }

    /// Background writeback of durable records onto the disk.
    pub fn writeback(&mut self, cx: &Ctx) {
        if self.vol.is_none() {
            return;
        }
        let wb = self.position();
        let end = self.apply_log_from(wb, cx);
        if let Some(d) = &mut self.dir {
            d.position = end.max(wb);
        }
    }

    /// Finishes the current logfile and starts the next one (with `only_if_used`, only if the
    /// current one has records). Returns the new logfile's number, if one began.
    fn rotate(&mut self, only_if_used: bool) -> Option<u64> {
        let no = self.current();
        let f = self.logs.get_mut(&no)?;
        if only_if_used && f.recs.is_empty() {
            return None;
        }
        f.durable = f.recs.len();
        f.complete = true;
        self.logs.insert(no + 1, LogFile::new(self.name.clone()));
        Some(no + 1)
    }

    // ------------------------------------------------------------ membership

    /// `create-resource` here: the directory of its first primary, the keys, the engine.
    pub fn create_resource(&mut self, cx: &mut Ctx) {
        self.set(&keys::size(&res()), &SIZE.to_string());
        self.set(keys::UNREACHABLE_LIMIT, &UNREACHABLE_LIMIT_SECS.to_string());
        self.set(&keys::data(&res(), &self.name), "/dev/sim");
        let me = self.name.clone();
        self.set(&keys::primary(&res()), me.as_str());
        self.dir = Some(Dir::new(false));
        self.tl = Some(Vec::new());
        self.start_engine(cx);
    }

    /// `join-resource` (the daemon's, outside the engine): refused unless the resource exists
    /// with a designated primary and this host is no member; sets up a directory with a full
    /// sync pending and the membership keys, then starts the engine.
    pub fn join(&mut self, cx: &mut Ctx) -> Result<(), String> {
        let meta = self.store_meta();
        if self.dir.is_some() || !meta.exists() || meta.is_member(&self.name) {
            return Err("cannot join".into());
        }
        if meta.primary.is_none() {
            return Err("no designated primary".into());
        }
        self.logs.clear();
        self.disk.clear();
        self.tl = None;
        self.mark = None;
        self.dir = Some(Dir::new(true));
        let me = self.name.clone();
        let mut pairs = vec![(keys::data(&res(), &me), "/dev/sim".to_string())];
        for sw in ["attach", "sync", "fetch", "replay"] {
            pairs.push((keys::todo(&res(), &me, sw), "1".into()));
        }
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.store.set_many(&pairs).expect("own keys");
        self.start_engine(cx);
        Ok(())
    }
}
