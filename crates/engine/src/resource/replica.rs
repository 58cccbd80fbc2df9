//! A secondary's replica: where to fetch from and from which position, which logfile copy to
//! accept or to call a fork, replay's entry and end-of-logfile checks, the full sync (its
//! start, restart on a source change, consistency), repairs of damaged copies, and space
//! pressure.
//!
//! ```text
//!  source ──fetch session──► local copies log-N-ORIGIN (whole records, verified, durable)
//!                                  │
//!                                  ▼  replay runs: in log order; logfile N → N+1 only on a
//!                              local disk          matching version link
//!  source ──sync session───► local disk (fast full sync: only chunks whose digests differ)
//! ```
//!
//! Three activities, each switchable (`todo-HOST/{fetch,replay,sync}`), each run by the
//! executor as a session whose id the engine checks on every event of it.

use std::collections::BTreeMap;

use mars_config::HostName;
use mars_txlog::LogPos;
use mars_wire::RefuseKind;

use super::command::{Command, Control, CopyDecision, SessionId, SyncFile};
use super::event::{FetchEvent, LogInfo, ReplayEnd, ReplayEvent, ReplicaFacts, SyncEvent};
use super::{Level, Local, ResourceEngine};
use crate::config::EngineConfig;
use crate::keys;
use crate::plan::{entry_check, next_file_check, ChainCheck};
use crate::reason::{NeedsSync, RoleWait, Stuck, Waiting};

/// One local copy of a logfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Copy {
    pub origin: HostName,
    /// Verified and durable bytes.
    pub len: u64,
    /// Its end arrived (or a later copy began).
    pub complete: bool,
}

/// A running session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Session {
    pub id: SessionId,
    pub source: HostName,
    /// Fetch: where it started. Replay: the end it was given.
    pub at: LogPos,
}

/// The replica's state.
#[derive(Debug, Clone)]
pub struct Replica {
    pub(super) copies: BTreeMap<u64, Copy>,
    /// Everything before this position is on the disk (persisted).
    pub applied: LogPos,
    pub(super) sync: Option<SyncFile>,
    pub(super) needs_sync: Option<NeedsSync>,
    /// Replication stopped: damage, a fork. Cleared by a repair or `invalidate`.
    pub(super) stuck: Option<Stuck>,
    /// Replay waits for something that will come (a version link).
    pub(super) waiting: Option<Waiting>,
    /// `waiting` comes from the check on entering a logfile (cleared when it passes).
    entry_waiting: bool,
    /// The link of logfile N-1 a full sync starting at N adopted, and the host that sent it:
    /// that host's link, known here before its own publication of it arrives (the entry check
    /// of logfile N would otherwise wait for it).
    adopted: Option<(u64, HostName, String)>,
    /// A sync restarted because its source changed: this host's version links speak for the
    /// abandoned copy and are deleted when the new sync starts, before it adopts its source's.
    purge_links: bool,
    /// The designated primary may not take over yet: why.
    pub(super) role_wait: Option<RoleWait>,
    /// Our history differs from the source's from this logfile on.
    pub(super) forked: Option<u64>,
    /// Damage found by replay here: the next fetch session cuts the copy there first.
    repair: Option<LogPos>,
    /// The source's last "you have everything": its wall clock (ns) and the position.
    caught_up: Option<(u64, LogPos)>,
    /// Bug switch: the confirmation counts without its session, too (as before the rule).
    confirmation_outlives_session: bool,
    /// The host fetched and synced from.
    pub(super) source: Option<HostName>,
    pub(super) size: u64,
    pub(super) fetch: Option<Session>,
    fetch_retry_at: u64,
    fetch_backoff: u64,
    pub(super) fetch_error: Option<String>,
    /// The last fetch failure logged as a warning (each distinct one once).
    fetch_warned: Option<String>,
    pub(super) replay: Option<Session>,
    pub(super) sync_session: Option<Session>,
    sync_retry_at: u64,
    sync_backoff: u64,
    /// The source's answer to the sync start arrived: the copy runs.
    pub(super) sync_running: bool,
    /// How far the running copy got (shown; only `sync.done` is durable).
    pub(super) sync_shown: u64,
    pub(super) repairs: u64,
    next_session: SessionId,
}

impl Replica {
    pub(super) fn open(f: ReplicaFacts, size: u64, cfg: &EngineConfig) -> Replica {
        let copies = f
            .copies
            .into_iter()
            .map(|l| {
                (
                    l.no,
                    Copy {
                        origin: l.origin,
                        len: l.len,
                        complete: l.complete,
                    },
                )
            })
            .collect();
        Replica {
            copies,
            applied: f.applied,
            sync: f.sync,
            needs_sync: f.needs_sync.map(NeedsSync::Restored),
            stuck: None,
            waiting: None,
            entry_waiting: false,
            adopted: None,
            purge_links: false,
            role_wait: None,
            forked: None,
            repair: None,
            caught_up: None,
            confirmation_outlives_session: cfg.bugs.caught_up_survives_source_change(),
            source: None,
            size,
            fetch: None,
            fetch_retry_at: 0,
            fetch_backoff: cfg.timing.fetch_backoff_min,
            fetch_error: None,
            fetch_warned: None,
            replay: None,
            sync_session: None,
            sync_retry_at: 0,
            sync_backoff: cfg.timing.sync_backoff_min,
            sync_running: false,
            sync_shown: 0,
            repairs: 0,
            next_session: 1,
        }
    }

    /// The end of the newest local copy.
    pub fn fetched(&self) -> Option<LogPos> {
        self.copies
            .iter()
            .next_back()
            .map(|(no, c)| LogPos::new(*no, c.len))
    }

    /// The local copies as logfile descriptions, oldest first.
    pub fn logs(&self) -> Vec<LogInfo> {
        self.copies
            .iter()
            .map(|(no, c)| LogInfo {
                no: *no,
                origin: c.origin.clone(),
                len: c.len,
                complete: c.complete,
            })
            .collect()
    }

    /// Oldest and newest local copy numbers.
    pub fn log_range(&self) -> (u64, u64) {
        (
            self.copies.keys().next().copied().unwrap_or(0),
            self.copies.keys().next_back().copied().unwrap_or(0),
        )
    }

    /// No full sync pending or running, none needed.
    pub fn consistent(&self) -> bool {
        self.sync.is_none() && self.needs_sync.is_none()
    }

    /// The oldest logfile this replica still needs (`None`: none, e.g. before its sync started
    /// or when only a full sync helps).
    pub fn pin(&self) -> Option<u64> {
        if self.needs_sync.is_some() {
            return None;
        }
        match &self.sync {
            Some(s) => s.start.map(|p| p.file.min(self.applied.file)),
            None => Some(self.applied.file),
        }
    }

    /// Durable length of the local copy of logfile `no` and whether it is complete (a replica
    /// serves its copies to another replica: the catch-up during a handover).
    pub fn copy_state(&self, no: u64) -> Option<(u64, bool)> {
        let newest = *self.copies.keys().next_back()?;
        let c = self.copies.get(&no)?;
        Some((c.len, c.complete || no < newest))
    }

    /// The host this replica fetches and syncs from now, if any.
    pub fn source(&self) -> Option<&HostName> {
        self.source.as_ref()
    }

    /// The stamp (the source's wall clock, ns) of the confirmation that this replica holds
    /// everything durable there, while it is about the current end of the copies.
    pub fn caught_up_stamp(&self) -> Option<u64> {
        let fetched = self.fetched();
        self.caught_up
            .filter(|(_, p)| Some(*p) == fetched)
            .map(|(stamp, _)| stamp)
    }

    /// The source confirmed, within `valid_ms` of `wall_ns`, that this replica holds everything
    /// durable there: milliseconds since.
    pub fn caught_up_ms(&self, wall_ns: u64, valid_ms: u64) -> Option<u64> {
        // The source's word holds while its session runs: a paused or broken fetch knows
        // nothing about what the source has now.
        if self.fetch.is_none() && !self.confirmation_outlives_session {
            return None;
        }
        let fetched = self.fetched();
        self.caught_up
            .filter(|(_, p)| Some(*p) == fetched)
            .map(|(stamp, _)| wall_ns.saturating_sub(stamp) / 1_000_000)
            .filter(|ms| *ms < valid_ms)
    }

    pub(super) fn stuck_text(&self) -> Option<String> {
        self.stuck
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| self.needs_sync.as_ref().map(ToString::to_string))
            .or_else(|| self.role_wait.as_ref().map(ToString::to_string))
            .or_else(|| self.waiting.as_ref().map(ToString::to_string))
    }

    pub(super) fn stuck_kind(&self) -> Option<crate::reason::StuckKind> {
        use crate::reason::StuckKind;
        if let Some(s) = &self.stuck {
            Some(s.kind())
        } else if self.needs_sync.is_some() {
            Some(StuckKind::NeedsSync)
        } else if self.role_wait.is_some() {
            Some(StuckKind::RoleWait)
        } else if self.waiting.is_some() {
            Some(StuckKind::LinkWait)
        } else {
            None
        }
    }

    fn new_session(&mut self) -> SessionId {
        let id = self.next_session;
        self.next_session += 1;
        id
    }

    /// Stops every session (shutdown, teardown, promotion, a reset).
    pub(super) fn stop_all(&mut self) -> Vec<Command> {
        let mut v = Vec::new();
        if let Some(s) = self.fetch.take() {
            v.push(Command::StopFetch { id: s.id });
        }
        if let Some(s) = self.sync_session.take() {
            v.push(Command::StopSync { id: s.id });
        }
        self.sync_running = false;
        if let Some(s) = self.replay.take() {
            v.push(Command::StopReplay { id: s.id });
        }
        v
    }

    /// Removes copies below `limit` (replay has finished with them); the command, if any.
    pub(super) fn drop_below(&mut self, limit: u64) -> Option<Command> {
        self.copies.range(..limit).next()?;
        self.copies = self.copies.split_off(&limit);
        Some(Command::DropCopiesBelow { below: limit })
    }

    /// Fetched bytes remain that replay can apply now (a forced switch replays them first).
    /// Not while replay waits for a version link at a logfile's end: the origin of that link
    /// may be unreachable for good (the very reason for the forced switch), and the switch
    /// takes what was replayed.
    pub(super) fn replay_pending(&self, todo: crate::Todo, me: &HostName) -> bool {
        if !todo.replay || self.replay_stuck(me) || self.waiting.is_some() {
            return false;
        }
        self.fetched().is_some_and(|f| f > self.applied)
    }

    /// Replay is held by `stuck`. Not a history one (a fork with the source, a version
    /// mismatch) while replay is inside a logfile this host wrote itself (as primary, before a
    /// crash): those records are our own history whatever the source's, and a forced switch
    /// would otherwise cut our own acknowledged writes (found by mars-sim, seed 2369).
    fn replay_stuck(&self, me: &HostName) -> bool {
        let own_pending = self
            .copies
            .get(&self.applied.file)
            .is_some_and(|c| c.origin == *me && self.applied.offset < c.len);
        self.stuck
            .as_ref()
            .is_some_and(|s| !(s.is_history() && own_pending))
    }

    /// Replay found another history at logfile `no`: it stops there, and the fork is
    /// reported. Returns the operator text.
    fn fork_at(&mut self, no: u64, why: String) -> String {
        let stuck = Stuck::Mismatch {
            file: no,
            detail: why,
        };
        let text = stuck.to_string();
        self.stuck = Some(stuck);
        self.forked = Some(no);
        text
    }

    /// Forgets local copies and sync progress: a full sync from scratch follows. Sessions stop
    /// first (their commands come before the removal).
    pub(super) fn reset(&mut self) -> Vec<Command> {
        let mut v = self.stop_all();
        self.copies.clear();
        let s = SyncFile::full(self.size);
        v.push(Command::ResetCopies);
        v.push(Command::Persist(Control::Sync(Some(s.clone()))));
        v.push(Command::Persist(Control::NeedsSync(None)));
        self.sync = Some(s);
        self.needs_sync = None;
        self.stuck = None;
        self.forked = None;
        self.waiting = None;
        self.entry_waiting = false;
        self.repair = None;
        self.fetch_error = None;
        self.caught_up = None;
        self.adopted = None;
        v
    }

    /// May replay enter logfile `no` (written by `origin`)? [`entry_check`], where a link of
    /// `no - 1` adopted by a full sync counts before its writer's own publication of it arrives.
    fn entry_check(
        &self,
        meta: &crate::ResourceMeta,
        me: &HostName,
        no: u64,
        origin: &HostName,
    ) -> ChainCheck {
        match &self.adopted {
            Some((prev, from, link))
                if *prev + 1 == no
                    && from == origin
                    && meta.version(*prev, me) == Some(link.as_str())
                    && meta.version(*prev, from).is_none() =>
            {
                ChainCheck::Ok(link.clone())
            }
            _ => entry_check(meta, me, no, origin),
        }
    }

    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    pub(super) fn validate(&self) -> Result<(), String> {
        if let Some(f) = self.fetched() {
            if self.applied.file <= f.file
                && self.applied > f
                && self.copies.contains_key(&self.applied.file)
            {
                return Err(format!(
                    "replayed {} beyond the fetched end {f}",
                    self.applied
                ));
            }
        }
        if let Some(c) = self.copies.get(&self.applied.file) {
            if self.applied.offset > c.len {
                return Err(format!(
                    "replay position {} beyond its copy's {} bytes",
                    self.applied, c.len
                ));
            }
        }
        if let Some(s) = &self.sync {
            if s.done > s.size {
                return Err(format!("sync done {} beyond its size {}", s.done, s.size));
            }
        }
        if self.replay.is_some() && self.stuck.as_ref().is_some_and(|s| !s.is_history()) {
            return Err("replaying while stuck".into());
        }
        Ok(())
    }
}

impl ResourceEngine {
    fn rep(&mut self) -> Option<&mut Replica> {
        match &mut self.local {
            Local::Replica(r) => Some(r),
            _ => None,
        }
    }

    /// When the caught-up confirmation expires (the report changes then), if it is valid now.
    pub(super) fn caught_up_expiry(&self) -> Option<u64> {
        let valid = self.cfg.timing.caught_up_valid;
        let ms = self.replica()?.caught_up_ms(self.now.wall_ns, valid)?;
        Some(self.now.ms + (valid - ms) + 1)
    }

    /// A confirmation of the position already confirmed by the running fetch session: takes
    /// its newer stamp and says so (`false`: anything else, for the full handling).
    pub(super) fn refresh_caught_up(&mut self, id: SessionId, pos: LogPos, stamp: u64) -> bool {
        let (meta, me) = (&self.meta, &self.me);
        let Local::Replica(r) = &mut self.local else {
            return false;
        };
        let copy = r.copies.get(&pos.file);
        // The same conditions as a first confirmation (`on_fetch`), the entry check included:
        // the metadata may have changed since.
        let same = r.fetch.as_ref().is_some_and(|s| s.id == id)
            && r.caught_up.is_some_and(|(at, p)| p == pos && at <= stamp)
            && copy.map(|c| c.len) == Some(pos.offset)
            && (r.applied > LogPos::new(pos.file, 0)
                || copy.is_some_and(|c| {
                    matches!(
                        r.entry_check(meta, me, pos.file, &c.origin),
                        ChainCheck::Ok(_)
                    )
                }));
        if same {
            r.caught_up = Some((stamp, pos));
        }
        same
    }

    pub(super) fn reconcile_replica(&mut self) {
        let todo = self.todo();
        if self.is_designated() && todo.attach && self.try_promote() {
            return;
        }
        if !self.is_designated() {
            // Why it did not take over is moot once another host is designated.
            if let Some(r) = self.rep() {
                r.role_wait = None;
            }
        }
        let fetched = self.replica().and_then(Replica::fetched);
        let source = crate::roles::fetch_source(&self.meta, &self.me, fetched, &|h| self.alive(h));
        self.set_source(source);
        self.grow_replica();
        self.drive_fetch();
        self.drive_sync();
        self.drive_replay();
        // A replica publishes links only for logfiles it wrote itself as primary before (a
        // restarted ex-primary whose replay starts beyond them); replay publishes the others.
        if let Some(r) = self.replica() {
            let logs = r.logs();
            if let Some(newest) = logs.last().map(|l| l.no) {
                self.publish_versions(&logs, newest, true);
            }
        }
        self.space_pressure();
        // Moving parts: fresh statistics for the report's rates and positions.
        if self
            .replica()
            .is_some_and(|r| r.fetch.is_some() || r.replay.is_some() || r.sync_session.is_some())
            && self.report.moving()
        {
            self.wake_at(self.now.ms + self.cfg.timing.report_every);
        }
    }

    /// New source: a confirmation was the old source's word, and a sync copied from another
    /// host starts over.
    fn set_source(&mut self, source: Option<HostName>) {
        let bugs = self.cfg.bugs.clone();
        let Some(r) = self.rep() else { return };
        if r.source == source {
            return;
        }
        if !bugs.caught_up_survives_source_change() {
            // "You have everything" was the previous source's word (found by mars-sim): the
            // new one must say it again before this replica counts as up to date.
            r.caught_up = None;
        }
        let restart = !bugs.sync_survives_source_change()
            && source.is_some()
            && r.sync
                .as_ref()
                .is_some_and(|s| s.start.is_some() && s.from.is_some() && s.from != source);
        let old = r.sync.as_ref().and_then(|s| s.from.clone());
        r.source = source.clone();
        if restart {
            // The copy so far and the log position it starts from came from another host,
            // perhaps of another history (a failover in between): replaying the new source's
            // log over that copy would mix two histories (found by mars-sim). Start over; the
            // digest comparison keeps the cost to reading the disk where the data agrees.
            let cmds = r.reset();
            r.purge_links = true;
            self.out.extend(cmds);
            self.log(
                Level::Warn,
                format!(
                    "the sync source changed from {} to {}: the full sync starts over",
                    old.map_or_else(|| "?".into(), |h| h.to_string()),
                    source.map_or_else(|| "?".into(), |h| h.to_string()),
                ),
            );
        }
    }

    /// The resource grew (resize): copy just the new region.
    fn grow_replica(&mut self) {
        let size = self.size;
        let Some(r) = self.rep() else { return };
        if size <= r.size {
            return;
        }
        let old = r.size;
        r.size = size;
        let s = r.sync.get_or_insert(SyncFile {
            start: None,
            done: old,
            size,
            end: None,
            transferred: 0,
            from: None,
        });
        s.size = size;
        s.end = None;
        let s = s.clone();
        self.emit(Command::Persist(Control::Sync(Some(s))));
    }

    // ---------------------------------------------------------------- fetch

    fn drive_fetch(&mut self) {
        let todo = self.todo();
        let now = self.now.ms;
        let me = self.me.clone();
        let without_history = self.cfg.bugs.fetch_request_without_history();
        let meta = self.meta.clone();
        let Some(r) = self.rep() else { return };
        let source = r.source.clone().filter(|s| *s != me);
        let ready = todo.fetch
            && todo.attach
            && r.needs_sync.is_none()
            && r.sync.as_ref().is_none_or(|s| s.start.is_some())
            && source.is_some();
        if let Some(s) = &r.fetch {
            if !ready || Some(&s.source) != source.as_ref() || r.repair.is_some() {
                let id = s.id;
                r.fetch = None;
                self.emit(Command::StopFetch { id });
            }
            return;
        }
        let Some(source) = source.filter(|_| ready) else {
            return;
        };
        if now < r.fetch_retry_at {
            let at = r.fetch_retry_at;
            self.wake_at(at);
            return;
        }
        let mut cmds = Vec::new();
        if let Some(at) = r.repair.take() {
            // Cut the damaged copy at the damage and drop later copies; fetch it again.
            let later: Vec<u64> = r.copies.range(at.file + 1..).map(|(n, _)| *n).collect();
            for n in later {
                r.copies.remove(&n);
            }
            if let Some(c) = r.copies.get_mut(&at.file) {
                c.len = c.len.min(at.offset);
                c.complete = false;
            }
            r.stuck = None;
            r.repairs += 1;
            cmds.push(Command::RepairCopies { at });
            cmds.push(Command::Log {
                level: Level::Info,
                msg: format!("cut the damaged local log at {at}; fetching it again"),
            });
        }
        let from = match r.fetched() {
            Some(p) => p,
            None => {
                let base = r
                    .sync
                    .as_ref()
                    .and_then(|s| s.start)
                    .map_or(r.applied, |s| s.min(r.applied));
                LogPos::new(base.file.max(1), 0)
            }
        };
        // Our link of the logfile before: the server refuses if its own differs (our copies
        // continue another history) instead of confirming a position on it.
        let prev_link = from
            .file
            .checked_sub(1)
            .and_then(|p| meta.version(p, &me))
            .filter(|_| !without_history)
            .unwrap_or_default()
            .to_string();
        let id = r.new_session();
        r.fetch = Some(Session {
            id,
            source: source.clone(),
            at: from,
        });
        cmds.push(Command::StartFetch {
            id,
            source,
            from,
            prev_link,
        });
        for c in cmds {
            if let Command::Log { level, msg } = c {
                self.log(level, msg);
            } else {
                self.emit(c);
            }
        }
    }

    pub(super) fn on_fetch(&mut self, id: SessionId, e: FetchEvent) {
        let me = self.me.clone();
        let meta = self.meta.clone();
        let bugs = self.cfg.bugs.clone();
        let res = self.res.to_string();
        let timing = self.cfg.timing.clone();
        let now = self.now.ms;
        let Some(r) = self.rep() else {
            return;
        };
        let Some(sess) = r.fetch.clone().filter(|s| s.id == id) else {
            // A decision is still owed to a session the engine has stopped: refuse it.
            if let FetchEvent::Offer { no, .. } = e {
                self.emit(Command::CopyDecision {
                    id,
                    no,
                    decision: CopyDecision::Reject,
                });
            }
            return;
        };
        match e {
            FetchEvent::Connected => r.fetch_error = None,
            FetchEvent::Offer { no, origin } => {
                let decision = offer(r, no, &origin, &me, bugs.replace_replayed_empty_copy());
                let msg = match &decision {
                    Offered::Fork(s) => {
                        let msg = s.to_string();
                        r.stuck = Some(s.clone());
                        r.forked = Some(no);
                        Some((Level::Error, msg))
                    }
                    Offered::NotNext(last) => Some((
                        Level::Warn,
                        format!("the source sends log {no} after our log {last}"),
                    )),
                    _ => None,
                };
                let decision = match decision {
                    Offered::Append => CopyDecision::Append,
                    Offered::Create => CopyDecision::Create,
                    Offered::ReplaceEmpty(old) => CopyDecision::ReplaceEmpty { old_origin: old },
                    Offered::Fork(_) | Offered::NotNext(_) => CopyDecision::Reject,
                };
                if decision == CopyDecision::Reject {
                    r.fetch = None;
                    // Not again at once: the source would name the same logfile, a new session
                    // every round trip (seen in mars-sim's traces). Backs off like a failure.
                    r.fetch_retry_at = now + r.fetch_backoff;
                    r.fetch_backoff = (r.fetch_backoff * 2).min(timing.fetch_backoff_max);
                }
                self.emit(Command::CopyDecision { id, no, decision });
                if let Some((level, msg)) = msg {
                    self.log(level, msg);
                }
            }
            FetchEvent::Durable { no, len } => {
                if let Some(c) = r.copies.get_mut(&no) {
                    c.len = c.len.max(len);
                }
            }
            FetchEvent::End { no, len } => match r.copies.get_mut(&no) {
                Some(c) if c.len == len => c.complete = true,
                Some(c) => {
                    let have = c.len;
                    r.fetch = None;
                    r.fetch_error = Some(format!(
                        "fetch from {}: log {no} ends at {len} there, but {have} bytes arrived",
                        sess.source
                    ));
                    self.emit(Command::StopFetch { id });
                }
                None => {}
            },
            FetchEvent::CaughtUp { pos, stamp } => {
                let copy = r.copies.get(&pos.file);
                let at_end = copy.map(|c| LogPos::new(pos.file, c.len)) == Some(pos);
                // A position in a logfile replay has not entered yet is the source's position
                // only if that logfile continues our history: its entry check must pass (found
                // by mars-sim, seed 182: with replay paused at the start of the primary's
                // logfile, a replica whose logfile before was another history's was confirmed
                // and looked up to date; the server's history check at the session start had
                // nothing to compare yet).
                let entered = r.applied > LogPos::new(pos.file, 0);
                let verified = entered
                    || copy.is_some_and(|c| {
                        matches!(
                            r.entry_check(&meta, &me, pos.file, &c.origin),
                            ChainCheck::Ok(_)
                        )
                    });
                if at_end && verified {
                    r.caught_up = Some((stamp, pos));
                }
            }
            FetchEvent::Gone { file, oldest } => {
                let why = NeedsSync::Gone {
                    file,
                    oldest,
                    host: sess.source.clone(),
                    res,
                };
                let text = why.to_string();
                r.needs_sync = Some(why);
                r.fetch = None;
                self.emit(Command::StopFetch { id });
                self.emit(Command::Persist(Control::NeedsSync(Some(text.clone()))));
                self.log(Level::Error, text);
            }
            FetchEvent::Refused { kind, reason } => {
                if kind == RefuseKind::History {
                    // Our copies continue another history than the source's (a split brain on
                    // this side); what is here is still ours to replay.
                    r.forked = Some(sess.at.file);
                }
                r.fetch_error = Some(format!("fetch from {}: {reason}", sess.source));
            }
            FetchEvent::Ended { error } => {
                r.fetch = None;
                match error {
                    None => {
                        r.fetch_backoff = timing.fetch_backoff_min;
                        r.fetch_warned = None;
                        r.fetch_retry_at = now;
                    }
                    Some(e) => {
                        let msg = format!("fetch from {}: {e}", sess.source);
                        // A single failure after a success is routine (the source just changed
                        // roles, or restarted): worth a warning only once it repeats.
                        let again = r.fetch_backoff > timing.fetch_backoff_min;
                        let warn = again && r.fetch_warned.as_deref() != Some(&msg);
                        if warn {
                            r.fetch_warned = Some(msg.clone());
                        }
                        r.fetch_error = Some(msg.clone());
                        r.fetch_retry_at = now + r.fetch_backoff;
                        r.fetch_backoff = (r.fetch_backoff * 2).min(timing.fetch_backoff_max);
                        let level = if warn {
                            Level::Warn
                        } else if again {
                            Level::Debug
                        } else {
                            Level::Info
                        };
                        self.log(level, msg);
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- replay

    /// Replay as far as allowed now: the next run within a copy, or the step to the next
    /// logfile when the version chain agrees.
    fn drive_replay(&mut self) {
        let todo = self.todo();
        loop {
            let meta = self.meta.clone();
            let me = self.me.clone();
            let skip_chain = self.cfg.bugs.skip_chain_check();
            let size = self.size;
            let Some(r) = self.rep() else { return };
            // A record beyond the device waits for the resize to arrive.
            if let Some(Waiting::Size { end, .. }) = &r.waiting {
                if size < *end {
                    return;
                }
                r.waiting = None;
            }
            let copying = r.sync.as_ref().is_some_and(SyncFile::copying);
            let allowed = todo.replay
                && todo.attach
                && r.needs_sync.is_none()
                && !r.replay_stuck(&me)
                && !copying;
            if let Some(s) = &r.replay {
                if !allowed {
                    let id = s.id;
                    r.replay = None;
                    self.emit(Command::StopReplay { id });
                }
                return;
            }
            if !allowed {
                return;
            }
            let Some(c) = r.copies.get(&r.applied.file).cloned() else {
                return;
            };
            let no = r.applied.file;
            if r.applied.offset == 0 && !skip_chain {
                // Entering a logfile of another origin: its predecessor must be ours too
                // (`entry_check`, found by mars-sim). A link adopted by a full sync counts
                // before its writer's own publication of it arrives.
                match r.entry_check(&meta, &me, no, &c.origin) {
                    ChainCheck::Ok(_) => {
                        if r.entry_waiting {
                            r.entry_waiting = false;
                            r.waiting = None;
                        }
                    }
                    ChainCheck::Wait(why) => {
                        r.waiting = Some(Waiting::Link(why));
                        r.entry_waiting = true;
                        return;
                    }
                    ChainCheck::Mismatch(why) => {
                        let msg = r.fork_at(no, why);
                        self.log(Level::Error, msg);
                        return;
                    }
                }
            }
            if r.applied.offset < c.len {
                let id = r.new_session();
                let from = r.applied.offset;
                r.replay = Some(Session {
                    id,
                    source: c.origin.clone(),
                    at: LogPos::new(no, c.len),
                });
                self.emit(Command::StartReplay {
                    id,
                    file: no,
                    origin: c.origin,
                    from,
                    to: c.len,
                    size,
                });
                return;
            }
            if !(c.complete || r.copies.range(no + 1..).next().is_some()) {
                return;
            }
            // At the end of logfile `no`: move on only on a matching version link.
            let mut check = next_file_check(&meta, &me, no, &c.origin, c.len);
            if skip_chain {
                if let ChainCheck::Mismatch(_) = check {
                    match crate::plan::my_link(&meta, &me, no, &c.origin, c.len) {
                        Some(l) => check = ChainCheck::Ok(l),
                        None => return,
                    }
                }
            }
            match check {
                ChainCheck::Ok(link) => {
                    let next = LogPos::new(no + 1, 0);
                    r.applied = next;
                    r.waiting = None;
                    r.entry_waiting = false;
                    let key = keys::version(&self.res, no, &self.me);
                    // The link first: a crash before the position only repeats the check.
                    self.publish(vec![(key, link)], Vec::new());
                    self.emit(Command::Persist(Control::Position(next)));
                    self.check_consistent();
                }
                ChainCheck::Wait(why) => {
                    r.waiting = Some(Waiting::Link(why));
                    return;
                }
                ChainCheck::Mismatch(why) => {
                    let msg = r.fork_at(no, why);
                    self.log(Level::Error, msg);
                    return;
                }
            }
        }
    }

    pub(super) fn on_replay(&mut self, id: SessionId, e: ReplayEvent) {
        let size = self.size;
        let Some(r) = self.rep() else { return };
        let Some(sess) = r.replay.clone().filter(|s| s.id == id) else {
            return;
        };
        match e {
            ReplayEvent::Progress { pos } => {
                r.applied = r.applied.max(pos);
                // Whatever replay waited for (an entry check) is past.
                r.waiting = None;
                r.entry_waiting = false;
                self.check_consistent();
            }
            ReplayEvent::Stopped { pos, end } => {
                r.replay = None;
                r.applied = r.applied.max(pos);
                match end {
                    ReplayEnd::Done => {}
                    ReplayEnd::Damaged { offset, detail } => {
                        let file = sess.at.file;
                        let origin = sess.source.clone();
                        r.stuck = Some(Stuck::Damaged {
                            file,
                            origin,
                            offset: Some(offset),
                            detail,
                        });
                        r.repair = Some(LogPos::new(file, offset));
                        let msg = r
                            .stuck
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default();
                        self.log(Level::Error, msg);
                    }
                    ReplayEnd::BeyondDevice { at, end } => {
                        let w = Waiting::Size {
                            file: sess.at.file,
                            at,
                            end,
                            size,
                        };
                        let msg = w.to_string();
                        r.waiting = Some(w);
                        self.log(Level::Warn, msg);
                    }
                    ReplayEnd::Failed { detail } => {
                        let file = sess.at.file;
                        let origin = sess.source.clone();
                        r.stuck = Some(Stuck::Damaged {
                            file,
                            origin,
                            offset: None,
                            detail,
                        });
                        let msg = r
                            .stuck
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default();
                        self.log(Level::Error, msg);
                    }
                }
                self.check_consistent();
            }
        }
    }

    /// After a sync copy, the replica becomes consistent once replay passed the copy's end.
    fn check_consistent(&mut self) {
        let Some(r) = self.rep() else { return };
        let done = matches!(&r.sync, Some(SyncFile { end: Some(end), .. }) if r.applied >= *end);
        if done {
            r.sync = None;
            self.emit(Command::Persist(Control::Sync(None)));
            self.log(Level::Info, "full sync complete, the replica is consistent");
        }
    }

    // ---------------------------------------------------------------- sync

    fn drive_sync(&mut self) {
        let todo = self.todo();
        let now = self.now.ms;
        let me = self.me.clone();
        let Some(r) = self.rep() else { return };
        let source = r.source.clone().filter(|s| *s != me);
        let ready = todo.sync
            && todo.attach
            && r.needs_sync.is_none()
            && r.sync.as_ref().is_some_and(SyncFile::copying)
            && source.is_some();
        if let Some(s) = &r.sync_session {
            if !ready || Some(&s.source) != source.as_ref() {
                let id = s.id;
                r.sync_session = None;
                r.sync_running = false;
                self.emit(Command::StopSync { id });
            }
            return;
        }
        let (Some(source), true) = (source, ready) else {
            return;
        };
        if now < r.sync_retry_at {
            let at = r.sync_retry_at;
            self.wake_at(at);
            return;
        }
        let Some(sf) = r.sync.clone() else { return };
        let id = r.new_session();
        r.sync_session = Some(Session {
            id,
            source: source.clone(),
            at: LogPos::ZERO,
        });
        self.emit(Command::StartSync {
            id,
            source,
            done: sf.done,
            size: sf.size,
        });
    }

    pub(super) fn on_sync(&mut self, id: SessionId, e: SyncEvent) {
        let timing = self.cfg.timing.clone();
        let now = self.now.ms;
        let me = self.me.clone();
        let res = self.res.clone();
        let adopt_later = self.cfg.bugs.sync_adopts_primary_link_later();
        let meta = self.meta.clone();
        let Some(r) = self.rep() else { return };
        let Some(sess) = r.sync_session.clone().filter(|s| s.id == id) else {
            if matches!(e, SyncEvent::Info { .. }) {
                self.emit(Command::StopSync { id });
            }
            return;
        };
        match e {
            SyncEvent::Info {
                size,
                start,
                prev_link,
            } => {
                let fresh = r.sync.as_ref().is_some_and(|s| s.start.is_none());
                if fresh
                    && start.file > 1
                    && prev_link.is_empty()
                    && meta.chain_starts.get(&sess.source) != Some(&start.file)
                {
                    // The source cannot say which history the copy continues (its link of the
                    // logfile before the start is not known: a host acting as primary without
                    // being designated publishes none). Taken anyway, every later chain check
                    // here would have nothing to compare, and a primary of another history
                    // could confirm this replica up to date (found by mars-sim, seed 1775).
                    // Not now: tried again after the backoff.
                    r.sync_session = None;
                    r.sync_running = false;
                    r.sync_retry_at = now + r.sync_backoff;
                    r.sync_backoff = (r.sync_backoff * 2).min(timing.sync_backoff_max);
                    self.emit(Command::StopSync { id });
                    let msg = format!(
                        "sync from {}: it does not know its link of logfile {} yet; trying again \
                         later",
                        sess.source,
                        start.file - 1
                    );
                    self.log(Level::Warn, msg);
                    return;
                }
                let mut set = Vec::new();
                let mut delete = Vec::new();
                if std::mem::take(&mut r.purge_links) {
                    // This host's links speak for the abandoned copy.
                    for (no, links) in &meta.versions {
                        if links.contains_key(&me) {
                            delete.push(keys::version(&res, *no, &me));
                        }
                    }
                }
                let Some(sf) = r.sync.clone() else {
                    r.sync_session = None;
                    self.emit(Command::StopSync { id });
                    return;
                };
                if sf.start.is_some() && sf.from.as_ref().is_some_and(|f| *f != sess.source) {
                    // The reconcile pass restarts the sync when it sees the new source.
                    r.sync_session = None;
                    self.emit(Command::StopSync { id });
                    self.publish(set, delete);
                    return;
                }
                let mut adopted = None;
                if sf.start.is_none() && start.file > 1 && !prev_link.is_empty() && !adopt_later {
                    // The copy continues the source's history after logfile start-1: its link
                    // is ours from now on, so that the chain checks compare against the history
                    // the data belongs to (found by mars-sim). Published before the start is
                    // persisted: a crash in between only repeats it.
                    set.push((keys::version(&res, start.file - 1, &me), prev_link.clone()));
                    adopted = Some((start.file - 1, sess.source.clone(), prev_link));
                }
                let mut sf = sf;
                if sf.from.is_none() {
                    sf.from = Some(sess.source.clone());
                }
                let mut cmds = Vec::new();
                let mut started = None;
                if sf.start.is_none() {
                    sf.start = Some(start);
                    if sf.done == 0 {
                        // A full copy: replay begins at the sync start once the copy is
                        // complete. (A partial copy after a resize keeps replaying from where
                        // it is.)
                        cmds.push(Command::Persist(Control::Position(start)));
                        r.applied = start;
                    }
                    started = Some(start);
                }
                cmds.push(Command::Persist(Control::Sync(Some(sf.clone()))));
                let go_size = sf.size.min(size);
                cmds.push(Command::SyncGo {
                    id,
                    done: sf.done,
                    size: go_size,
                });
                if adopted.is_some() {
                    r.adopted = adopted;
                }
                r.sync = Some(sf);
                r.sync_running = true;
                // The purge must not delete the link just adopted (the same logfile before the
                // start as the abandoned sync's): one publication that sets and deletes a key
                // deleted it (found by mars-sim, seed 80).
                delete.retain(|k| !set.iter().any(|(s, _)| s == k));
                self.publish(set, delete);
                self.out.extend(cmds);
                if let Some(start) = started {
                    self.log(
                        Level::Info,
                        format!(
                            "full sync from {} starts; log position {start}",
                            sess.source
                        ),
                    );
                }
            }
            SyncEvent::Progress {
                done,
                transferred,
                durable: false,
            } => {
                let _ = transferred;
                r.sync_shown = r.sync_shown.max(done);
            }
            SyncEvent::Progress {
                done,
                transferred,
                durable: true,
            } => {
                r.sync_shown = r.sync_shown.max(done);
                if let Some(sf) = r.sync.as_mut() {
                    sf.done = done.min(sf.size);
                    sf.transferred += transferred;
                    let sf = sf.clone();
                    self.emit(Command::Persist(Control::Sync(Some(sf))));
                }
            }
            SyncEvent::Copied { end, transferred } => {
                r.sync_running = false;
                if let Some(sf) = r.sync.as_mut() {
                    sf.done = sf.size;
                    sf.transferred += transferred;
                    sf.end = Some(end);
                    let sf = sf.clone();
                    let total = sf.transferred;
                    self.emit(Command::Persist(Control::Sync(Some(sf))));
                    self.log(
                        Level::Info,
                        format!(
                            "sync copy complete ({} transferred); consistent after replaying \
                             to {end}",
                            mars_config::format_size(total)
                        ),
                    );
                }
                self.check_consistent();
            }
            SyncEvent::NoSlot => {
                r.sync_session = None;
                r.sync_running = false;
                r.sync_retry_at = now + 500;
            }
            SyncEvent::Ended { error } => {
                r.sync_session = None;
                r.sync_running = false;
                match error {
                    None => r.sync_backoff = timing.sync_backoff_min,
                    Some(e) => {
                        r.sync_retry_at = now + r.sync_backoff;
                        r.sync_backoff = (r.sync_backoff * 2).min(timing.sync_backoff_max);
                        let msg = format!("sync from {}: {e}", sess.source);
                        self.log(Level::Warn, msg);
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- space

    /// The root runs out of space: stop fetching and drop every local logfile, so that this
    /// replica holds nothing back here and pins nothing on the others. Only a full sync
    /// (`invalidate`) brings it back.
    fn space_pressure(&mut self) {
        let min = self.cfg.host.min_free_space;
        let Some(free) = self.stats.free_space.filter(|f| *f < min) else {
            return;
        };
        let res = self.res.to_string();
        let Some(r) = self.rep() else { return };
        if r.needs_sync.is_some() && r.copies.is_empty() {
            return;
        }
        let mut cmds = Vec::new();
        if let Some(s) = r.fetch.take() {
            cmds.push(Command::StopFetch { id: s.id });
        }
        if let Some(s) = r.replay.take() {
            cmds.push(Command::StopReplay { id: s.id });
        }
        r.copies.clear();
        cmds.push(Command::ResetCopies);
        let why = r
            .needs_sync
            .clone()
            .unwrap_or(NeedsSync::Space { free, min, res });
        let text = why.to_string();
        r.needs_sync = Some(why);
        cmds.push(Command::Persist(Control::NeedsSync(Some(text.clone()))));
        self.out.extend(cmds);
        self.log(Level::Error, text);
    }
}

/// What to do with a logfile the source names (the copy rules of a fetch session).
enum Offered {
    Append,
    Create,
    ReplaceEmpty(HostName),
    Fork(Stuck),
    NotNext(u64),
}

fn offer(r: &mut Replica, no: u64, origin: &HostName, me: &HostName, bug_replace: bool) -> Offered {
    // Replay has moved past our copy of `no`: it took that (empty) logfile's history, and
    // another logfile of that number is a fork (found by mars-sim: replacing it left the new
    // records unapplied while the replica reported the new history's position).
    let passed = r.applied.file > no;
    if let Some(c) = r.copies.get(&no) {
        if c.origin != *origin {
            // Not by this host's own logfile, offered back by another host: the empty copy is
            // the logfile of the history this replica follows now (after an invalidate or a
            // full sync), ours is from a history it has left, and our own chain check would
            // pass it unchecked (found by mars-sim, seed 2001).
            let own_offered_back = origin == me;
            if c.len == 0 && (!passed || bug_replace) && !own_offered_back {
                // An empty copy carries no history (a logfile its writer never wrote to, e.g.
                // the old primary's last one at a handover): replace it.
                let old = c.origin.clone();
                r.copies.insert(
                    no,
                    Copy {
                        origin: origin.clone(),
                        len: 0,
                        complete: false,
                    },
                );
                return Offered::ReplaceEmpty(old);
            }
            return Offered::Fork(Stuck::Fork {
                file: no,
                theirs: origin.clone(),
                ours: c.origin.clone(),
            });
        }
        return Offered::Append;
    }
    if let Some((&last, _)) = r.copies.iter().next_back() {
        if no != last + 1 {
            return Offered::NotNext(last);
        }
        if let Some(c) = r.copies.get_mut(&last) {
            c.complete = true;
        }
    }
    r.copies.insert(
        no,
        Copy {
            origin: origin.clone(),
            len: 0,
            complete: false,
        },
    );
    Offered::Create
}
