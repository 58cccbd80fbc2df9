//! A secondary's replica of one resource.
//!
//! ```text
//!  primary ──fetch stream──► local copies log-N-ORIGIN (whole records, verified, fdatasync'ed)
//!                                  │
//!                                  ▼  replay thread: in log order, verified again
//!                              local disk ──► `writeback` position (persisted after fdatasync)
//!  primary ──sync stream───► local disk (fast full sync: only chunks whose digests differ)
//! ```
//!
//! Three activities, each switchable (`todo-HOST/{fetch,replay,sync}`):
//! - **fetch** (async task) resumes at the end of the newest local copy after any disconnect;
//! - **replay** (thread) applies records up to what fetch made durable, and moves from logfile N
//!   to N+1 only when its version link for N equals the origin's;
//! - **sync** (async task) copies the device while the primary keeps writing; replay then runs
//!   from the log position recorded at sync start, and the replica is consistent once replay
//!   passes the primary's log position at the end of the copy.
//!
//! Files in the resource directory besides the logs: `writeback` (replay position, shared
//! format with the primary's writeback position, so the same directory can become a primary),
//! `sync.toml` (a pending or running full sync) and `needs-sync` (why only a full sync helps).
//! Every local file operation (the copies, replay, the sync's disk side, the control files) is
//! `mars_replica`'s; this module decides when, and runs the network side.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mars_config::{HostName, ResourceName};
use mars_engine::plan::{entry_check, next_file_check, ChainCheck};
use mars_engine::{ResourceMeta, SyncReport, Todo};
use mars_replica::control;
use mars_replica::sync::{chunk_len, hash_chunk};
use mars_replica::{Copies, CopyAppender, Replay, ReplayEvent};
use mars_storage::real::RealDir;
use mars_storage::{Dir, File};
use mars_txlog::{LogName, LogPos};
use mars_wire::{Message, StreamKind};
use tokio::sync::Notify;

use crate::logserve::describe;
use crate::state::Daemon;

pub use mars_replica::SyncFile;

/// Sync chunks in flight: keeps a long link busy without a round trip per chunk.
const SYNC_WINDOW: usize = 32;
/// Progress of the copy is persisted (after fdatasync) every this many bytes.
const SYNC_PERSIST: u64 = 64 << 20;
/// Fetch makes received data durable at least every this many bytes …
const FETCH_SYNC_BYTES: u64 = 64 << 20;
/// … or when the stream pauses this long.
const FETCH_SYNC_IDLE: Duration = Duration::from_millis(10);
/// The primary confirms "caught up" every second while idle; a confirmation older than this
/// means the link is gone or the replica is behind.
const CAUGHT_UP_VALID: Duration = Duration::from_secs(3);

/// Bytes per second over the last few seconds, in buckets of 100 ms (cheap per record: replay
/// adds every record).
#[derive(Debug, Default, Clone)]
pub struct Rate {
    window: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    fn add(&mut self, n: u64) {
        let now = Instant::now();
        match self.window.back_mut() {
            Some((t, sum)) if now.duration_since(*t) < Duration::from_millis(100) => *sum += n,
            _ => self.window.push_back((now, n)),
        }
        while self
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(5))
        {
            self.window.pop_front();
        }
    }
    pub fn per_sec(&self) -> u64 {
        let Some((first, _)) = self.window.front() else {
            return 0;
        };
        let secs = first.elapsed().as_secs_f64().max(1.0);
        (self.window.iter().map(|(_, n)| n).sum::<u64>() as f64 / secs) as u64
    }
}

struct State {
    todo: Todo,
    attached: bool,
    meta: Arc<ResourceMeta>,
    /// The host to fetch and sync from (designated primary) and its address.
    source: Option<(HostName, String)>,
    size: u64,
    /// The verified local copies (number → origin, durable length, complete).
    copies: Copies,
    applied: LogPos,
    fetch_error: Option<String>,
    /// Replay stopped: damage, version mismatch. Cleared by repair or invalidate.
    stuck: Option<String>,
    /// Replay waits for something that will come (a version link).
    waiting: Option<String>,
    /// `waiting` comes from the check on entering a logfile (cleared when it passes).
    entry_waiting: bool,
    /// The link of logfile N-1 a full sync starting at N adopted, and the host that sent it:
    /// that host's link, known here before its own publication of it arrives (the check on
    /// entering logfile N would otherwise wait for it, and the replica would flap from
    /// `UpToDate` back to waiting right after the sync).
    adopted: Option<(u64, HostName, String)>,
    /// A sync restarted because its source changed: this host's version links speak for the
    /// abandoned copy and are deleted before the new sync adopts its source's (in that order:
    /// deleting later could delete the adopted link).
    purge_links: bool,
    /// Designated primary, but not allowed to take over yet: why.
    role_wait: Option<String>,
    /// The source's history differs from ours from this logfile on (split brain).
    forked: Option<u64>,
    /// Damage found by replay at this position: fetch truncates there and fetches again.
    repair: Option<LogPos>,
    sync: Option<SyncFile>,
    needs_sync: Option<String>,
    /// `needs_sync` is not persisted yet (writing `needs-sync` failed): retried every
    /// reconcile round.
    needs_sync_unsaved: bool,
    /// Failures to persist a control file where the replica went on, by what failed: logged
    /// once, shown as stuck, retried every reconcile round and removed when a retry succeeds.
    persist_errors: BTreeMap<&'static str, String>,
    /// Bumped whenever local logfiles are removed behind fetch's back (invalidate, repair):
    /// a fetch session that sees a new generation stops.
    generation: u64,
    fetch_rate: Rate,
    replay_rate: Rate,
    sync_rate: Rate,
    sync_running: bool,
    repairs: u64,
    /// The primary's last "you have everything" over the fetch stream: its wall clock (ns) when
    /// it sent it, and the position.
    caught_up: Option<(u64, LogPos)>,
}

pub struct Replica {
    pub res: ResourceName,
    me: HostName,
    ldir: Arc<dyn Dir>,
    disk: Arc<dyn File>,
    st: Mutex<State>,
    /// Wakes the replay thread.
    wake: Condvar,
    /// Wakes fetch and sync (switch changes, repair, invalidate).
    kick: Notify,
    stop: AtomicBool,
    started: AtomicBool,
    /// Fetch task, sync task and replay thread still running (a promotion waits for zero).
    active: AtomicUsize,
}

// What failed to be persisted (`State::persist_errors`).
const RESTART: &str = "sync restart";
const RESIZE: &str = "resize";
const NEEDS_SYNC: &str = "needs-sync";
const SYNC_DONE: &str = "sync.toml removal";
const DROP_LOGS: &str = "dropping logfiles";

/// A background fdatasync of a copy; its result is the copy's new durable length.
type SyncTask = tokio::task::JoinHandle<mars_replica::Result<u64>>;

/// Counts a running activity of a replica until dropped.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the daemon shows and reports about a replica.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    pub applied: LogPos,
    pub fetched: Option<LogPos>,
    pub logs: (u64, u64),
    pub sync: Option<SyncReport>,
    pub consistent: bool,
    pub needs_sync: Option<String>,
    pub stuck: Option<String>,
    pub fetch_error: Option<String>,
    pub fetch_rate: u64,
    pub replay_rate: u64,
    /// Milliseconds since the primary confirmed that `fetched` is its durable end.
    pub caught_up_ms: Option<u64>,
    /// Our history differs from the source's from this logfile on.
    pub forked: Option<u64>,
}

impl Replica {
    /// Opens the replica state in `dir` on `disk`: verifies the local log copies (cutting a torn
    /// tail; damage in the middle is cut there and fetched again).
    pub fn open(
        res: ResourceName,
        me: HostName,
        dir: &Path,
        disk_path: &Path,
        size: u64,
        meta: Arc<ResourceMeta>,
    ) -> Result<Arc<Self>> {
        let ldir: Arc<dyn Dir> = Arc::new(RealDir::open(dir)?);
        let disk: Arc<dyn File> = mars_storage::real::open_disk(disk_path)
            .with_context(|| format!("disk {}", disk_path.display()))?;
        let dlen = disk.len()?;
        if dlen < size {
            bail!(
                "disk {} has {dlen} bytes, the resource needs {size}",
                disk_path.display()
            );
        }
        let (copies, report) = Copies::open(ldir.clone())?;
        if let Some((why, names)) = &report.discarded {
            // Gaps or duplicates among local copies: start over from the oldest run.
            tracing::warn!(
                "{res}: local logfiles: {why}; discarded them ({} files)",
                names.len()
            );
        }
        for cut in &report.cut {
            match &cut.damage {
                Some(reason) => tracing::warn!(
                    "{res}: {} damaged at {} ({reason}); fetching it again from there",
                    cut.name,
                    cut.at
                ),
                None => tracing::info!(
                    "{res}: cut a torn tail of {} bytes off {}",
                    cut.removed,
                    cut.name
                ),
            }
        }
        let applied = control::read_position(&*ldir)?
            .unwrap_or_else(|| copies.oldest().map_or(LogPos::ZERO, |n| LogPos::new(n, 0)));
        let sync = control::read_sync(&*ldir)?;
        let needs_sync = control::read_needs_sync(&*ldir)?;
        Ok(Arc::new(Self {
            res,
            me,
            ldir,
            disk,
            st: Mutex::new(State {
                todo: Todo::default(),
                attached: true,
                meta,
                source: None,
                size,
                copies,
                applied,
                fetch_error: None,
                stuck: None,
                waiting: None,
                entry_waiting: false,
                adopted: None,
                purge_links: false,
                role_wait: None,
                forked: None,
                repair: None,
                sync,
                needs_sync,
                needs_sync_unsaved: false,
                persist_errors: BTreeMap::new(),
                generation: 0,
                fetch_rate: Rate::default(),
                replay_rate: Rate::default(),
                sync_rate: Rate::default(),
                sync_running: false,
                repairs: 0,
                caught_up: None,
            }),
            wake: Condvar::new(),
            kick: Notify::new(),
            stop: AtomicBool::new(false),
            started: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        }))
    }

    /// Marks a new replica (join-resource): everything must be copied.
    pub fn init_sync(dir: &Path, size: u64) -> Result<()> {
        let d = RealDir::open(dir).with_context(|| format!("{}", dir.display()))?;
        control::write_sync(&d, &SyncFile::pending(0, size))?;
        Ok(())
    }

    /// Starts the fetch and sync tasks and the replay thread (once).
    pub fn ensure_started(self: &Arc<Self>, d: &Arc<Daemon>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(d);
        // Counted before they start, so that a stop right after sees them.
        self.active.fetch_add(3, Ordering::AcqRel);
        let rt = tokio::runtime::Handle::current();
        rt.spawn(self.clone().fetch_loop(weak.clone()));
        rt.spawn(self.clone().sync_loop(weak.clone()));
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name(format!("replay-{}", self.res))
            .spawn(move || me.replay_loop(weak));
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.kick.notify_waiters();
        let _g = lock(&self.st);
        self.wake.notify_all();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Stops fetch, sync and replay and waits until none of them touches the directory or the
    /// disk any more; false on timeout.
    pub fn stop_and_wait(&self, timeout: Duration) -> bool {
        self.shutdown();
        let deadline = Instant::now() + timeout;
        while self.active.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            self.kick.notify_waiters();
            self.wake.notify_all();
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Before this directory becomes a primary's (replica stopped): everything fetched beyond
    /// the replay position is cut off, so the volume continues exactly from what the disk
    /// holds. Returns that position.
    pub fn cut_for_promotion(&self) -> Result<LogPos> {
        let mut st = lock(&self.st);
        let at = st.applied;
        let cut = st.copies.cut_for_promotion(at)?;
        for name in cut.dropped.iter().filter(|n| n.no > at.file) {
            tracing::warn!("{}: promotion drops the unreplayed copy {name}", self.res);
        }
        if let Some((name, _)) = &cut.cut {
            tracing::warn!(
                "{}: promotion cuts {name} at the replay position {}",
                self.res,
                at.offset
            );
        }
        Ok(at)
    }

    /// Why this designated primary may not take over yet (`None`: it may, or is not designated).
    pub fn set_role_wait(&self, why: Option<String>) {
        lock(&self.st).role_wait = why;
    }

    /// Fetched but not yet replayed bytes remain that replay can apply (a forced switch waits
    /// for replay first). Not while replay waits for a version link at a logfile's end: the
    /// origin of that link may be unreachable for good (the very reason for the forced
    /// switch), and the switch takes what was replayed.
    pub fn replay_pending(&self) -> bool {
        let st = lock(&self.st);
        if !st.todo.replay || st.stuck.is_some() || st.waiting.is_some() {
            return false;
        }
        st.copies.end().is_some_and(|end| end > st.applied)
    }

    /// A switch changed here: take it at once instead of at the next reconcile round.
    pub fn set_todo(&self, todo: Todo) {
        let mut st = lock(&self.st);
        st.todo = todo;
        st.attached = todo.attach;
        drop(st);
        self.wake.notify_all();
        self.kick.notify_waiters();
    }

    /// New facts from the metadata (called by the reconcile loop).
    pub fn update(
        &self,
        todo: Todo,
        meta: Arc<ResourceMeta>,
        source: Option<(HostName, String)>,
        size: u64,
    ) {
        let mut st = lock(&self.st);
        let changed = st.todo != todo || st.source != source;
        if meta.primary.as_ref() != Some(&self.me) {
            st.role_wait = None;
        }
        if st.source.as_ref().map(|s| &s.0) != source.as_ref().map(|s| &s.0) {
            // "You have everything" was the previous source's word (found by mars-sim): the new
            // one must say it again before this replica counts as up to date.
            st.caught_up = None;
        }
        let new_host = source.as_ref().map(|s| &s.0);
        let restart = st.sync.as_ref().is_some_and(|sf| {
            sf.start.is_some()
                && sf.from.is_some()
                && new_host.is_some()
                && sf.from.as_ref() != new_host
        });
        // Control files that could not be persisted are retried here, every round.
        if restart {
            // The copy so far and the log position it starts from came from another host,
            // perhaps of another history (a failover in between): replaying the new source's
            // log over that copy would mix two histories (found by mars-sim). Start over; the
            // digest comparison keeps the cost to reading the disk where the data agrees.
            let old = st.sync.as_ref().and_then(|sf| sf.from.clone());
            tracing::warn!(
                "{}: the sync source changed from {} to {}: the full sync starts over",
                self.res,
                old.map_or_else(|| "?".into(), |h| h.to_string()),
                new_host.map_or_else(|| "?".into(), |h| h.to_string()),
            );
            match self.reset_locked(&mut st) {
                Ok(()) => st.purge_links = true,
                Err(e) => {
                    self.persist_failed(&mut st, RESTART, format!("cannot restart the sync: {e:#}"))
                }
            }
        }
        st.todo = todo;
        st.attached = todo.attach;
        st.meta = meta;
        st.source = source;
        if size > st.size {
            // Grown (resize): copy just the new region. Taken only once persisted.
            let mut s = st
                .sync
                .clone()
                .unwrap_or_else(|| SyncFile::pending(st.size, size));
            s.size = size;
            s.end = None;
            match control::write_sync(&*self.ldir, &s) {
                Ok(()) => {
                    st.size = size;
                    st.sync = Some(s);
                    self.persist_ok(&mut st, RESIZE);
                }
                Err(e) => self.persist_failed(
                    &mut st,
                    RESIZE,
                    format!("cannot persist the sync state for the new size: {e}"),
                ),
            }
        }
        if st.needs_sync_unsaved {
            self.persist_needs_sync(&mut st);
        }
        self.check_consistent(&mut st);
        drop(st);
        self.wake.notify_all();
        if changed || restart {
            self.kick.notify_waiters();
        }
    }

    pub fn status(&self) -> ReplicaStatus {
        let st = lock(&self.st);
        let fetched = st.copies.end();
        let consistent = st.sync.is_none() && st.needs_sync.is_none();
        ReplicaStatus {
            applied: st.applied,
            fetched,
            logs: (
                st.copies.oldest().unwrap_or(0),
                st.copies.newest().unwrap_or(0),
            ),
            sync: st.sync.as_ref().map(|s| SyncReport {
                start: s.start,
                done: s.done,
                size: s.size,
                transferred: s.transferred,
                running: st.sync_running,
                rate: st.sync_rate.per_sec(),
            }),
            consistent,
            needs_sync: st.needs_sync.clone(),
            stuck: st
                .stuck
                .clone()
                .or_else(|| st.persist_errors.values().next().cloned())
                .or_else(|| st.needs_sync.clone())
                .or_else(|| st.role_wait.clone())
                .or_else(|| st.waiting.clone()),
            fetch_error: st.fetch_error.clone(),
            fetch_rate: st.fetch_rate.per_sec(),
            replay_rate: st.replay_rate.per_sec(),
            // Age by the primary's clock stamp, not by arrival: a confirmation delayed in the
            // stream must not cover writes that finished after it was sent.
            caught_up_ms: st
                .caught_up
                .filter(|(_, p)| Some(*p) == fetched)
                .map(|(stamp, _)| mars_meta::system_time_ns().saturating_sub(stamp) / 1_000_000)
                .filter(|ms| *ms < CAUGHT_UP_VALID.as_millis() as u64),
            forked: st.forked,
        }
    }

    /// Durable length of the local copy of logfile `no` and whether it is complete (for
    /// serving it to another replica).
    pub fn copy_state(&self, no: u64) -> Option<(u64, bool)> {
        let st = lock(&self.st);
        let newest = st.copies.newest()?;
        let l = st.copies.get(no)?;
        Some((l.len, l.complete || no < newest))
    }

    /// The oldest logfile this replica still needs (`None`: it needs none, e.g. before its sync
    /// started or when only a full sync helps).
    pub fn pin(&self) -> Option<u64> {
        let st = lock(&self.st);
        if st.needs_sync.is_some() {
            return None;
        }
        match &st.sync {
            Some(s) => s.start.map(|p| p.file.min(st.applied.file)),
            None => Some(st.applied.file),
        }
    }

    /// Deletes local logfiles below `below` that replay has finished with.
    pub fn reclaim(&self, below: Option<u64>) -> Vec<String> {
        let mut st = lock(&self.st);
        let mine = st.applied.file;
        let limit = below.map_or(mine, |b| b.min(mine));
        let victims: Vec<u64> = st.copies.files().range(..limit).map(|(n, _)| *n).collect();
        let mut removed = Vec::new();
        // Oldest first, each removal durable, and none after a failure: what is left stays a
        // contiguous run.
        for no in victims {
            match st.copies.remove(no) {
                Ok(name) => removed.push(name.to_string()),
                Err(e) => {
                    tracing::warn!("{}: cannot delete a local logfile: {e}", self.res);
                    break;
                }
            }
        }
        removed
    }

    /// `invalidate` (and `join-resource`): forget the local state, full-sync from scratch.
    pub fn invalidate(&self) -> Result<()> {
        let mut st = lock(&self.st);
        self.reset_locked(&mut st)?;
        drop(st);
        self.kick.notify_waiters();
        self.wake.notify_all();
        Ok(())
    }

    /// Forgets local copies and sync progress: a full sync from scratch follows. Fetch and
    /// sync sessions see the new generation and end.
    fn reset_locked(&self, st: &mut State) -> Result<()> {
        st.generation += 1;
        // The copies go (durably) before the new sync state is written: a fresh sync must never
        // find old copies to fetch on from.
        st.copies.remove_all()?;
        let s = SyncFile::pending(0, st.size);
        control::write_sync(&*self.ldir, &s)?;
        st.sync = Some(s);
        control::remove_needs_sync(&*self.ldir)?;
        st.needs_sync = None;
        st.needs_sync_unsaved = false;
        // What failed before concerned the state just replaced (a resize is retried still).
        st.persist_errors.retain(|k, _| *k == RESIZE);
        st.stuck = None;
        st.forked = None;
        st.waiting = None;
        st.entry_waiting = false;
        st.repair = None;
        st.fetch_error = None;
        st.caught_up = None;
        Ok(())
    }

    /// `fake-sync`: declare the replica consistent without copying.
    pub fn fake_sync(&self) -> Result<()> {
        let mut st = lock(&self.st);
        let Some(s) = st.sync.clone() else {
            return Ok(());
        };
        // The disks are declared equal as of the primary's current log position (unless a
        // sync already got one): replay goes on from there.
        let now = st.meta.primary_report().and_then(|p| p.log_end);
        let start = s.start.or(now).ok_or_else(|| {
            anyhow!("the primary's log position is not known here yet (is it reachable?)")
        })?;
        let end = now.unwrap_or(start).max(start);
        if s.start.is_none() || s.done == 0 {
            control::write_position(&*self.ldir, start)?;
            st.applied = start;
        }
        let s = SyncFile {
            start: Some(start),
            done: s.size,
            end: Some(end),
            ..s
        };
        control::write_sync(&*self.ldir, &s)?;
        st.sync = Some(s);
        drop(st);
        self.wake.notify_all();
        Ok(())
    }

    /// The root runs out of space: stop fetching and drop every local logfile, so that this
    /// replica holds nothing back here and pins nothing on the others. Only a full sync
    /// (`invalidate`) brings it back.
    pub fn drop_logs_for_space(&self, free: u64, min: u64) {
        let (why, first) = {
            let mut st = lock(&self.st);
            if st.needs_sync.is_some() && st.copies.is_empty() {
                return;
            }
            // Under one lock: mark first, so that a running fetch cannot create a new copy
            // (open_copy checks both) after the old ones are gone.
            st.generation += 1;
            let why = st.needs_sync.clone().unwrap_or_else(|| {
                format!(
                    "the root has only {} free (minimum {}): dropped the local logfiles; \
                     a full sync is needed once there is space (marsadm invalidate {})",
                    mars_config::format_size(free),
                    mars_config::format_size(min),
                    self.res
                )
            });
            let first = st.needs_sync.is_none();
            st.needs_sync = Some(why.clone());
            match st.copies.remove_all() {
                Ok(_) => self.persist_ok(&mut st, DROP_LOGS),
                // Retried next round (the copies are not all gone).
                Err(e) => self.persist_failed(
                    &mut st,
                    DROP_LOGS,
                    format!("cannot drop the local logfiles: {e}"),
                ),
            }
            (why, first)
        };
        self.kick.notify_waiters();
        if first {
            self.set_needs_sync(why);
        }
    }

    /// Only a full sync helps: stop, and persist why (retried every reconcile round until it
    /// is persisted).
    fn set_needs_sync(&self, why: String) {
        tracing::error!("{}: {why}", self.res);
        let mut st = lock(&self.st);
        st.needs_sync = Some(why);
        self.persist_needs_sync(&mut st);
    }

    /// Writes `needs-sync` (the replica stops either way); on failure it stays unsaved and
    /// `update` tries again.
    fn persist_needs_sync(&self, st: &mut State) {
        let saved = match &st.needs_sync {
            Some(why) => control::write_needs_sync(&*self.ldir, why),
            None => Ok(()),
        };
        match saved {
            Ok(()) => {
                st.needs_sync_unsaved = false;
                self.persist_ok(st, NEEDS_SYNC);
            }
            Err(e) => {
                st.needs_sync_unsaved = true;
                self.persist_failed(st, NEEDS_SYNC, format!("cannot persist needs-sync: {e}"));
            }
        }
    }

    /// A control file could not be persisted (`what` failed): logged (once per distinct
    /// failure) and shown as stuck until a retry succeeds.
    fn persist_failed(&self, st: &mut State, what: &'static str, msg: String) {
        if st.persist_errors.get(what) != Some(&msg) {
            tracing::error!("{}: {msg} (retried)", self.res);
        }
        st.persist_errors.insert(what, msg);
    }

    /// What failed to be persisted before (`what`) is persisted now.
    fn persist_ok(&self, st: &mut State, what: &'static str) {
        if st.persist_errors.remove(what).is_some() {
            tracing::info!("{}: persisted now ({what})", self.res);
        }
    }

    async fn wait_kick(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {},
            _ = self.kick.notified() => {},
        }
    }

    // ---------------------------------------------------------------- fetch

    async fn fetch_loop(self: Arc<Self>, d: Weak<Daemon>) {
        let _running = Running(&self.active);
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stopped() {
                return;
            }
            let Some(daemon) = d.upgrade() else { return };
            let source = {
                let st = lock(&self.st);
                let ready = st.todo.fetch
                    && st.attached
                    && st.needs_sync.is_none()
                    && st.sync.as_ref().is_none_or(|s| s.start.is_some());
                if ready {
                    st.source.clone()
                } else {
                    None
                }
            };
            let Some((host, addr)) = source else {
                drop(daemon);
                self.wait_kick(Duration::from_millis(200)).await;
                continue;
            };
            if host == self.me {
                drop(daemon);
                self.wait_kick(Duration::from_millis(200)).await;
                continue;
            }
            match self.fetch_session(&daemon, &host, &addr).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    lock(&self.st).fetch_error = None;
                }
                Err(e) => {
                    let msg = format!("fetch from {host}: {e:#}");
                    let first = {
                        let mut st = lock(&self.st);
                        let first = st.fetch_error.as_deref() != Some(&msg);
                        st.fetch_error = Some(msg.clone());
                        first
                    };
                    if first {
                        tracing::warn!("{}: {msg}", self.res);
                    }
                    drop(daemon);
                    self.wait_kick(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                }
            }
        }
    }

    /// Applies a repair request: cut the damaged copy at the damage and drop later copies.
    /// On a failure the request stays, for the next session.
    fn do_repair(&self) -> Result<()> {
        let mut st = lock(&self.st);
        let Some(at) = st.repair else {
            return Ok(());
        };
        st.copies.truncate(at)?;
        st.repair = None;
        st.stuck = None;
        st.repairs += 1;
        tracing::info!(
            "{}: cut the damaged local log at {at}; fetching it again",
            self.res
        );
        Ok(())
    }

    async fn fetch_session(&self, d: &Arc<Daemon>, host: &HostName, addr: &str) -> Result<()> {
        tokio::task::block_in_place(|| self.do_repair())?;
        let (gen, from) = {
            let st = lock(&self.st);
            let from = match st.copies.end() {
                Some(end) => end,
                None => {
                    let base = st
                        .sync
                        .as_ref()
                        .and_then(|s| s.start)
                        .map_or(st.applied, |s| s.min(st.applied));
                    LogPos::new(base.file.max(1), 0)
                }
            };
            (st.generation, from)
        };
        // Our link of the logfile before: the server refuses if its own differs (our copies
        // continue another history), instead of confirming a position on it. Read from the
        // store, not from the replica's copy of the metadata: a sync may have adopted a link,
        // or invalidate purged ours, since the last reconcile round.
        let prev_link = from
            .file
            .checked_sub(1)
            .and_then(|p| d.meta(&self.res).version(p, &self.me).map(str::to_string))
            .unwrap_or_default();
        let cluster = d.cluster_id().ok_or_else(|| anyhow!("not in a cluster"))?;
        let mut s = crate::cluster::connect_kind(d, addr, cluster, StreamKind::Fetch).await?;
        if s.peer.host != *host {
            bail!("{addr} answers as {}, expected {host}", s.peer.host);
        }
        crate::cluster::send(
            &mut s.w,
            &Message::FetchFrom {
                res: self.res.to_string(),
                file: from.file,
                offset: from.offset,
                prev_link,
            },
        )
        .await?;
        let mut cur: Option<CopyAppender> = None;
        // Bytes appended to `cur` since the last sync started.
        let mut unsynced: u64 = 0;
        // A background fdatasync of the current copy (its result: the durable length).
        let mut inflight: Option<SyncTask> = None;
        let mut connected = false;
        loop {
            let msg = tokio::select! {
                m = s.frames.next() => m?,
                _ = tokio::time::sleep(FETCH_SYNC_IDLE), if unsynced > 0 || inflight.is_some() => {
                    self.make_durable(&mut cur, &mut unsynced, &mut inflight).await?;
                    continue;
                }
                _ = self.kick.notified() => {
                    self.make_durable(&mut cur, &mut unsynced, &mut inflight).await?;
                    if self.fetch_must_stop(gen, host) {
                        return Ok(());
                    }
                    continue;
                }
            };
            // A kick may have come while the previous message was handled (nothing waited for
            // it then): look at the switches after every message, not only when woken.
            if self.fetch_must_stop(gen, host) {
                self.make_durable(&mut cur, &mut unsynced, &mut inflight)
                    .await?;
                return Ok(());
            }
            if !connected {
                // The primary answers: an earlier connection error is history now.
                connected = true;
                lock(&self.st).fetch_error = None;
            }
            match msg {
                Message::LogFile { file, origin } => {
                    self.make_durable(&mut cur, &mut unsynced, &mut inflight)
                        .await?;
                    let origin = HostName::new(&origin).map_err(|e| anyhow!("bad origin: {e}"))?;
                    cur = Some(tokio::task::block_in_place(|| {
                        self.open_copy(gen, file, &origin)
                    })?);
                }
                Message::LogCaughtUp {
                    file,
                    offset,
                    stamp,
                } => {
                    // "You have everything durable here, as of `stamp`."
                    self.make_durable(&mut cur, &mut unsynced, &mut inflight)
                        .await?;
                    let mut st = lock(&self.st);
                    let have = st.copies.get(file).map(|l| LogPos::new(file, l.len));
                    if have == Some(LogPos::new(file, offset)) {
                        st.caught_up = Some((stamp, LogPos::new(file, offset)));
                    }
                }
                Message::LogData { file, offset, data } => {
                    let Some(app) = cur.as_mut() else {
                        bail!("log data before a log name");
                    };
                    if app.name().no != file {
                        bail!("log data for {file} while receiving {}", app.name().no);
                    }
                    // Verified on arrival: whole records, checksums, contiguous sequence
                    // numbers, at the end of what arrived so far.
                    tokio::task::block_in_place(|| app.append(offset, &data))
                        .with_context(|| format!("log data from {host}"))?;
                    unsynced += data.len() as u64;
                    if unsynced >= FETCH_SYNC_BYTES {
                        self.sync_in_background(&cur, &mut unsynced, &mut inflight)
                            .await?;
                    }
                }
                Message::LogEnd { file, len } => {
                    self.make_durable(&mut cur, &mut unsynced, &mut inflight)
                        .await?;
                    let mut st = lock(&self.st);
                    if st.generation != gen {
                        return Ok(());
                    }
                    let l = st
                        .copies
                        .get(file)
                        .ok_or_else(|| anyhow!("end of log {file}, which is not here"))?;
                    if l.len != len {
                        bail!(
                            "log {file} ends at {len} on {host}, but {} bytes arrived",
                            l.len
                        );
                    }
                    st.copies.mark_complete(file)?;
                    drop(st);
                    self.wake.notify_all();
                    cur = None;
                }
                Message::LogGone { file, oldest } => {
                    self.set_needs_sync(format!(
                        "log {file} is gone on {host} (its oldest is {oldest}): this replica was away too long; \
                         a full sync is needed (marsadm invalidate {})",
                        self.res
                    ));
                    return Ok(());
                }
                Message::Refuse { reason } => {
                    if reason.contains("different histories") {
                        lock(&self.st).forked = Some(from.file);
                    }
                    bail!("{reason}")
                }
                other => bail!("unexpected {}", describe(&other)),
            }
        }
    }

    /// The fetch session must end: paused, detached, another source, or local copies reset.
    fn fetch_must_stop(&self, gen: u64, host: &HostName) -> bool {
        let st = lock(&self.st);
        self.stopped()
            || st.generation != gen
            || !st.todo.fetch
            || !st.attached
            || st.needs_sync.is_some()
            || st.source.as_ref().map(|s| &s.0) != Some(host)
            || st.repair.is_some()
    }

    /// Opens (or creates) the local copy of logfile `no` for appending what arrives.
    fn open_copy(&self, gen: u64, no: u64, origin: &HostName) -> Result<CopyAppender> {
        let mut st = lock(&self.st);
        if st.generation != gen || st.needs_sync.is_some() {
            bail!("local logs were reset");
        }
        // Replay has moved past our copy of `no`: it took that (empty) logfile's history, and
        // another logfile of that number is a fork (found by mars-sim: replacing it left the
        // new records unapplied while the replica reported the new history's position).
        let passed = st.applied.file > no;
        if st
            .copies
            .get(no)
            .is_some_and(|l| l.origin != *origin && l.len == 0 && !passed)
        {
            // An empty copy carries no history (a logfile its writer never wrote to, e.g. the
            // old primary's last one at a handover): replace it.
            st.copies.remove_empty(no)?;
        }
        match st.copies.append(no, origin) {
            Ok(app) => Ok(app),
            Err(mars_replica::Error::OtherOrigin { no, have, want }) => {
                let msg = format!(
                    "the primary's log {no} is {want}, ours is {have}: the histories differ (split brain?)"
                );
                st.stuck = Some(msg.clone());
                st.forked = Some(no);
                bail!(msg)
            }
            Err(mars_replica::Error::NotNext { no, newest }) => {
                bail!("the primary sends log {no} after our log {newest}")
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes everything received for the current copy durable and accounts it (waits for a
    /// background sync first).
    async fn make_durable(
        &self,
        cur: &mut Option<CopyAppender>,
        unsynced: &mut u64,
        inflight: &mut Option<SyncTask>,
    ) -> Result<()> {
        let Some(app) = cur.as_ref() else {
            return Ok(());
        };
        let no = app.name().no;
        if let Some(task) = inflight.take() {
            let len = task.await??;
            self.account(no, len);
        }
        if *unsynced > 0 {
            let len = tokio::task::block_in_place(|| app.sync())?;
            self.account(no, len);
            *unsynced = 0;
        }
        Ok(())
    }

    /// Starts an fdatasync of what was received so far on a blocking thread, so that receiving
    /// goes on meanwhile (the link and the disk work at the same time). One at a time: if the
    /// previous one is still running, it is waited for only once twice the batch piled up.
    async fn sync_in_background(
        &self,
        cur: &Option<CopyAppender>,
        unsynced: &mut u64,
        inflight: &mut Option<SyncTask>,
    ) -> Result<()> {
        let Some(app) = cur.as_ref() else {
            return Ok(());
        };
        if let Some(task) = inflight.take() {
            if task.is_finished() || *unsynced >= 2 * FETCH_SYNC_BYTES {
                let len = task.await??;
                self.account(app.name().no, len);
            } else {
                *inflight = Some(task);
                return Ok(());
            }
        }
        let sync = app.pending_sync();
        *inflight = Some(tokio::task::spawn_blocking(move || sync.run()));
        *unsynced = 0;
        Ok(())
    }

    /// Logfile `no` is durable here up to `len`.
    fn account(&self, no: u64, len: u64) {
        let mut st = lock(&self.st);
        let before = st.copies.get(no).map_or(len, |l| l.len);
        if st.copies.note_durable(no, len) {
            st.fetch_rate.add(len.saturating_sub(before));
        }
        drop(st);
        self.wake.notify_all();
    }

    // ---------------------------------------------------------------- replay

    fn replay_loop(self: Arc<Self>, d: Weak<Daemon>) {
        let _running = Running(&self.active);
        enum Step {
            Wait,
            Apply(LogName, u64, u64),
            /// Logfile, origin, length, generation of the local copies.
            Finish(u64, HostName, u64, u64),
        }
        loop {
            if self.stopped() {
                return;
            }
            // At the start of a logfile the entry check compares version links. This host's
            // own links are read from the store, where this host alone writes them: the
            // replica's copy of the metadata lags it by up to a reconcile round, and a full sync
            // that purged and adopted links at its start may finish within that round (then
            // replay judged the next logfile by our link from before the purge: a false fork).
            let at_entry = {
                let st = lock(&self.st);
                st.applied.offset == 0 && st.copies.get(st.applied.file).is_some()
            };
            let fresh = at_entry.then(|| self.fresh_meta(&d)).flatten();
            let step = {
                let mut st = lock(&self.st);
                let meta = fresh.unwrap_or_else(|| st.meta.clone());
                let copying = st.sync.as_ref().is_some_and(|s| s.end.is_none());
                if !st.todo.replay
                    || !st.attached
                    || st.needs_sync.is_some()
                    || st.stuck.is_some()
                    || copying
                {
                    Step::Wait
                } else {
                    let entry = match st.copies.get(st.applied.file) {
                        // Entering a logfile of another origin: its predecessor must be
                        // ours too (`entry_check`, found by mars-sim).
                        Some(f) if st.applied.offset == 0 => {
                            let no = st.applied.file;
                            match &st.adopted {
                                Some((prev, from, link))
                                    if *prev + 1 == no
                                        && *from == f.origin
                                        && meta.version(*prev, &self.me) == Some(link)
                                        && meta.version(*prev, from).is_none() =>
                                {
                                    ChainCheck::Ok(link.clone())
                                }
                                _ => entry_check(&meta, &self.me, no, &f.origin),
                            }
                        }
                        _ => ChainCheck::Ok(String::new()),
                    };
                    let go = match entry {
                        ChainCheck::Ok(_) => {
                            if st.entry_waiting {
                                st.entry_waiting = false;
                                st.waiting = None;
                            }
                            true
                        }
                        ChainCheck::Wait(why) => {
                            st.waiting = Some(why);
                            st.entry_waiting = true;
                            false
                        }
                        ChainCheck::Mismatch(why) => {
                            tracing::error!("{}: replay stopped: {why}", self.res);
                            st.stuck = Some(format!("replay stopped: {why}"));
                            st.forked = Some(st.applied.file);
                            false
                        }
                    };
                    match st.copies.get(st.applied.file) {
                        _ if !go => Step::Wait,
                        None => Step::Wait,
                        Some(f) if st.applied.offset < f.len => Step::Apply(
                            LogName::new(st.applied.file, f.origin.clone()),
                            st.applied.offset,
                            f.len,
                        ),
                        Some(f) if f.complete => {
                            Step::Finish(st.applied.file, f.origin.clone(), f.len, st.generation)
                        }
                        Some(_) => Step::Wait,
                    }
                }
            };
            match step {
                Step::Wait => {
                    let st = lock(&self.st);
                    let _ = self.wake.wait_timeout(st, Duration::from_millis(200));
                }
                Step::Apply(name, from, to) => {
                    if let Err(e) = self.apply(&name, from, to) {
                        let msg = format!("replay stopped: {name} damaged: {e:#}");
                        tracing::error!("{}: {msg}", self.res);
                        let mut st = lock(&self.st);
                        st.stuck = Some(msg);
                        if let Some(at) = e.damage_offset() {
                            st.repair = Some(LogPos::new(name.no, at));
                            st.generation += 1;
                        }
                        drop(st);
                        self.kick.notify_waiters();
                    }
                }
                Step::Finish(no, origin, len, gen) => {
                    // Our link of the logfile before, which ours of this one chains on: from
                    // the store (see the entry check above).
                    let meta = self
                        .fresh_meta(&d)
                        .unwrap_or_else(|| lock(&self.st).meta.clone());
                    match next_file_check(&meta, &self.me, no, &origin, len) {
                        ChainCheck::Ok(link) => {
                            if lock(&self.st).generation != gen {
                                // The copies were reset (invalidate, a sync restart): this
                                // link would speak for a history we no longer hold.
                                continue;
                            }
                            if let Some(d) = d.upgrade() {
                                let key = mars_engine::keys::version(&self.res, no, &self.me);
                                if let Err(e) = d.cluster.store().set(&key, &link) {
                                    tracing::error!("{}: cannot publish {key}: {e}", self.res);
                                    std::thread::sleep(Duration::from_millis(200));
                                    continue;
                                }
                            }
                            let next = LogPos::new(no + 1, 0);
                            if let Err(e) = control::write_position(&*self.ldir, next) {
                                tracing::error!(
                                    "{}: cannot persist the replay position: {e}",
                                    self.res
                                );
                                std::thread::sleep(Duration::from_millis(500));
                                continue;
                            }
                            let mut st = lock(&self.st);
                            st.applied = next;
                            st.waiting = None;
                            self.check_consistent(&mut st);
                        }
                        ChainCheck::Wait(why) => {
                            let mut st = lock(&self.st);
                            st.waiting = Some(why);
                            let _ = self.wake.wait_timeout(st, Duration::from_millis(200));
                        }
                        ChainCheck::Mismatch(why) => {
                            tracing::error!("{}: replay stopped: {why}", self.res);
                            let mut st = lock(&self.st);
                            st.stuck = Some(format!("replay stopped: {why}"));
                            st.forked = Some(no);
                        }
                    }
                }
            }
        }
    }

    /// The resource's metadata as the store holds it now (`None` once the daemon is gone, or
    /// if the store cannot be read: then the replica's copy has to do).
    fn fresh_meta(&self, d: &Weak<Daemon>) -> Option<Arc<ResourceMeta>> {
        let d = d.upgrade()?;
        let meta = crate::state::resource_meta(&d.cluster.store(), &self.res);
        meta.ok().map(Arc::new)
    }

    /// Applies records `[from, to)` of `name` to the disk, persisting the position in batches
    /// (the disk synced first); stops early, persisted, when replay is paused or detached.
    fn apply(&self, name: &LogName, from: u64, to: u64) -> mars_replica::Result<LogPos> {
        let replay = Replay::new(&*self.ldir, &*self.disk);
        let mut should_stop = || {
            let st = lock(&self.st);
            !st.todo.replay || !st.attached || self.stopped()
        };
        let mut progress = |ev| match ev {
            ReplayEvent::Applied(n) => lock(&self.st).replay_rate.add(n),
            ReplayEvent::Persisted(p) => {
                let mut st = lock(&self.st);
                st.applied = p;
                // Whatever replay waited for (an entry check) is past.
                st.waiting = None;
                self.check_consistent(&mut st);
            }
        };
        replay.apply(name, from, to, &mut should_stop, &mut progress)
    }

    /// Until `sync.toml` is removed (durably) the replica stays inconsistent; a failed
    /// removal is retried every reconcile round (`update`).
    fn check_consistent(&self, st: &mut State) {
        if !sync_done(st) {
            return;
        }
        match control::remove_sync(&*self.ldir) {
            Ok(()) => {
                st.sync = None;
                self.persist_ok(st, SYNC_DONE);
                tracing::info!(
                    "{}: full sync complete, the replica is consistent",
                    self.res
                );
            }
            Err(e) => self.persist_failed(
                st,
                SYNC_DONE,
                format!("the full sync is complete, but it cannot be recorded: {e}"),
            ),
        }
    }

    // ---------------------------------------------------------------- sync

    async fn sync_loop(self: Arc<Self>, d: Weak<Daemon>) {
        let _running = Running(&self.active);
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.stopped() {
                return;
            }
            let Some(daemon) = d.upgrade() else { return };
            let source = {
                let st = lock(&self.st);
                let ready = st.todo.sync
                    && st.attached
                    && st.needs_sync.is_none()
                    && st.sync.as_ref().is_some_and(|s| s.end.is_none());
                if ready {
                    st.source.clone().filter(|(h, _)| *h != self.me)
                } else {
                    None
                }
            };
            let Some((host, addr)) = source else {
                drop(daemon);
                self.wait_kick(Duration::from_millis(300)).await;
                continue;
            };
            let Some(_slot) = daemon.sync_slot() else {
                drop(daemon);
                self.wait_kick(Duration::from_millis(500)).await;
                continue;
            };
            lock(&self.st).sync_running = true;
            let r = self.sync_session(&daemon, &host, &addr).await;
            lock(&self.st).sync_running = false;
            match r {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!("{}: sync from {host}: {e:#}", self.res);
                    drop(daemon);
                    self.wait_kick(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                }
            }
        }
    }

    async fn sync_session(&self, d: &Arc<Daemon>, host: &HostName, addr: &str) -> Result<()> {
        let cluster = d.cluster_id().ok_or_else(|| anyhow!("not in a cluster"))?;
        let mut s = crate::cluster::connect_kind(d, addr, cluster, StreamKind::Sync).await?;
        if s.peer.host != *host {
            bail!("{addr} answers as {}, expected {host}", s.peer.host);
        }
        let start_msg = Message::SyncStart {
            res: self.res.to_string(),
        };
        crate::cluster::send(&mut s.w, &start_msg).await?;
        let (psize, pfile, poff, prev_link) = match s.frames.next().await? {
            Message::SyncInfo {
                size,
                file,
                offset,
                prev_link,
            } => (size, file, offset, prev_link),
            Message::Refuse { reason } => bail!("{reason}"),
            other => bail!("unexpected {}", describe(&other)),
        };
        if std::mem::take(&mut lock(&self.st).purge_links) {
            let meta = d.meta(&self.res);
            if let Err(e) =
                tokio::task::block_in_place(|| d.purge_own_links(&self.res, &meta, None))
            {
                lock(&self.st).purge_links = true;
                bail!("cannot delete this host's version links: {}", e.1);
            }
        }
        let gen = {
            let st = lock(&self.st);
            let Some(sf) = st.sync.as_ref() else {
                return Ok(());
            };
            if sf.start.is_some() && sf.from.as_ref().is_some_and(|f| f != host) {
                // The reconcile loop restarts the sync when it sees the new source.
                bail!("the sync began from another host; it starts over");
            }
            if sf.start.is_none() && pfile > 1 && !prev_link.is_empty() {
                // The copy continues the source's history after logfile pfile-1: its link is
                // ours from now on, so that the chain checks (entering logfile pfile, fetch
                // requests, split-brain detection) compare against the history the data
                // belongs to, not against whoever is primary later (found by mars-sim).
                // Published before the start is persisted: a crash in between only repeats it.
                let key = mars_engine::keys::version(&self.res, pfile - 1, &self.me);
                drop(st);
                d.cluster
                    .store()
                    .set(&key, &prev_link)
                    .map_err(|e| anyhow!("cannot publish {key}: {e}"))?;
                let mut st = lock(&self.st);
                st.adopted = Some((pfile - 1, host.clone(), prev_link.clone()));
                st.generation
            } else {
                st.generation
            }
        };
        let (mut done, size) = {
            let mut st = lock(&self.st);
            if st.generation != gen {
                return Ok(());
            }
            let Some(sf) = st.sync.as_mut() else {
                return Ok(());
            };
            if sf.from.is_none() {
                sf.from = Some(host.clone());
            }
            if sf.start.is_none() {
                // Taken only once persisted: position first, then the sync state.
                let start = LogPos::new(pfile, poff);
                let mut new = sf.clone();
                new.start = Some(start);
                if new.done == 0 {
                    // A full copy: replay begins at the sync start once the copy is complete.
                    // (A partial copy after a resize keeps replaying from where it is.)
                    control::write_position(&*self.ldir, start)?;
                    st.applied = start;
                }
                control::write_sync(&*self.ldir, &new)?;
                st.sync = Some(new);
                tracing::info!(
                    "{}: full sync from {host} starts; log position {start}",
                    self.res
                );
            }
            let sf = st.sync.as_ref().expect("checked");
            (sf.done, sf.size.min(psize))
        };
        self.kick.notify_waiters();
        let mut next = done;
        let mut inflight: std::collections::VecDeque<(u64, u64)> = Default::default();
        let mut since_persist = 0u64;
        let mut transferred = 0u64;
        // The local disk is read and hashed on a thread of its own, at most a window ahead of
        // what was sent, so that this work overlaps with the stream and the server's hashing
        // (it ends when this session drops the receiver).
        let mut digests = {
            let (tx, rx) = tokio::sync::mpsc::channel(SYNC_WINDOW);
            let disk = self.disk.clone();
            tokio::task::spawn_blocking(move || hash_chunks(&*disk, done, size, &tx));
            rx
        };
        loop {
            if inflight.is_empty() && next >= size {
                break;
            }
            let msg = tokio::select! {
                d = digests.recv(), if inflight.len() < SYNC_WINDOW && next < size => {
                    let (at, len, digest) =
                        d.ok_or_else(|| anyhow!("the sync's hashing thread ended"))??;
                    debug_assert_eq!(at, next);
                    crate::cluster::send(
                        &mut s.w,
                        &Message::SyncCheck {
                            offset: at,
                            len: len as u32,
                            digest,
                        },
                    )
                    .await?;
                    inflight.push_back((at, len));
                    next = at + len;
                    continue;
                }
                m = s.frames.next(), if !inflight.is_empty() => m?,
                _ = self.kick.notified() => {
                    if self.sync_must_stop(gen, host) {
                        tokio::task::block_in_place(|| self.persist_sync(gen, done, transferred))?;
                        return Ok(());
                    }
                    continue;
                }
            };
            let Some(&(off, len)) = inflight.front() else {
                bail!("sync reply without a request: {}", describe(&msg));
            };
            // As for fetch: a pause may have arrived while we were busy.
            if self.sync_must_stop(gen, host) {
                tokio::task::block_in_place(|| self.persist_sync(gen, done, transferred))?;
                return Ok(());
            }
            match msg {
                Message::SyncSame { offset } if offset == off => {}
                Message::SyncData { offset, data } if offset == off => {
                    if data.len() as u64 != len {
                        bail!("sync chunk at {off}: {} bytes for {len}", data.len());
                    }
                    tokio::task::block_in_place(|| {
                        mars_replica::sync::write_chunk(&*self.disk, off, &data)
                    })?;
                    transferred += len;
                }
                Message::Refuse { reason } => bail!("{reason}"),
                other => bail!("unexpected {} (expected chunk {off})", describe(&other)),
            }
            inflight.pop_front();
            done = off + len;
            since_persist += len;
            lock(&self.st).sync_rate.add(len);
            {
                let mut st = lock(&self.st);
                if st.generation != gen {
                    return Ok(());
                }
                if let Some(sf) = st.sync.as_mut() {
                    sf.done = done;
                }
            }
            if since_persist >= SYNC_PERSIST {
                tokio::task::block_in_place(|| self.persist_sync(gen, done, transferred))?;
                transferred = 0;
                since_persist = 0;
            }
        }
        // The copy is complete: ask where the primary's log is now.
        crate::cluster::send(&mut s.w, &start_msg).await?;
        let end = match s.frames.next().await? {
            Message::SyncInfo { file, offset, .. } => LogPos::new(file, offset),
            Message::Refuse { reason } => bail!("{reason}"),
            other => bail!("unexpected {}", describe(&other)),
        };
        tokio::task::block_in_place(|| -> Result<()> {
            mars_replica::sync::sync_disk(&*self.disk)?;
            let mut st = lock(&self.st);
            if st.generation != gen {
                return Ok(());
            }
            if let Some(mut sf) = st.sync.clone() {
                sf.done = size;
                sf.transferred += transferred;
                sf.end = Some(end);
                // Taken only once persisted (the copy is durable on the disk already).
                control::write_sync(&*self.ldir, &sf)?;
                st.sync = Some(sf.clone());
                tracing::info!(
                    "{}: sync copy complete ({} transferred); consistent after replaying to {end}",
                    self.res,
                    mars_config::format_size(sf.transferred)
                );
            }
            self.check_consistent(&mut st);
            Ok(())
        })?;
        self.wake.notify_all();
        Ok(())
    }

    fn sync_must_stop(&self, gen: u64, host: &HostName) -> bool {
        let st = lock(&self.st);
        self.stopped()
            || st.generation != gen
            || st.source.as_ref().map(|s| &s.0) != Some(host)
            || !st.todo.sync
            || !st.attached
            || st.sync.is_none()
            || st.needs_sync.is_some()
    }

    /// Persists the copy's progress, unless the sync was reset meanwhile (`gen`).
    /// The disk is synced first: `done` never claims chunks that are not durable.
    fn persist_sync(&self, gen: u64, done: u64, transferred: u64) -> Result<()> {
        mars_replica::sync::sync_disk(&*self.disk)?;
        let mut st = lock(&self.st);
        if st.generation != gen {
            return Ok(());
        }
        if let Some(mut sf) = st.sync.clone() {
            sf.done = done;
            sf.transferred += transferred;
            control::write_sync(&*self.ldir, &sf)?;
            st.sync = Some(sf);
        }
        Ok(())
    }
}

/// A full sync's copy is complete and replay passed its end: `sync.toml` can go.
fn sync_done(st: &State) -> bool {
    matches!(&st.sync, Some(SyncFile { end: Some(end), .. }) if st.applied >= *end)
}

/// Reads and hashes (xxh3-128) `f` in [`mars_replica::sync::SYNC_CHUNK`]s from `from` to
/// `size`, sending `(offset, len, digest)` in order; stops at the first error (sent too) or
/// when the receiver is gone. One buffer for every chunk: new memory costs more than the hashing where first
/// touches are slow (a VM).
fn hash_chunks(
    f: &dyn File,
    from: u64,
    size: u64,
    tx: &tokio::sync::mpsc::Sender<Result<(u64, u64, [u8; 16])>>,
) {
    let mut buf = vec![0u8; chunk_len(from, size) as usize];
    let mut at = from;
    while at < size {
        let len = chunk_len(at, size);
        let b = &mut buf[..len as usize];
        let r = hash_chunk(f, at, b)
            .map(|digest| (at, len, digest))
            .map_err(anyhow::Error::from);
        let failed = r.is_err();
        if tx.blocking_send(r).is_err() || failed {
            return;
        }
        at += len;
    }
}
