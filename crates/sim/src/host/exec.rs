//! The simulated executor: carries out each [`Command`] of the engine against the host's
//! simulated state (the store, the control files, the logfiles, the disk, the volume) and
//! queues the completion the command promises. It takes no decision: where a command leaves
//! a choice to the executor (which logfile a new volume continues in), it does what the
//! command's documentation says the daemon does.

use std::collections::VecDeque;

use mars_engine::keys;
use mars_engine::resource::{
    Command, Control, CopyDecision, Done, Event, Level, Marker, Opened, ReplicaFacts,
};
use mars_txlog::LogPos;

use super::session::{FetchSession, ReplaySession, SyncPhase, SyncSession};
use super::{res, Ctx, Host, LogFile, Vol};
use crate::ghost::{Ghost, StepDown};

/// `MARS_SIM_DEBUG_LINKS=1`: the trace shows every version link a host publishes or deletes.
fn debug_links() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MARS_SIM_DEBUG_LINKS").is_some())
}

impl Host {
    pub(super) fn execute(&mut self, c: Command, cx: &mut Ctx, q: &mut VecDeque<Event>) {
        match c {
            Command::Publish { tag, set, delete } => {
                if debug_links() {
                    let links: Vec<String> = set
                        .iter()
                        .filter(|(k, _)| k.contains("/version-"))
                        .map(|(k, v)| format!("+{} {}", &k[k.len() - 11..], &v[..6]))
                        .chain(
                            delete
                                .iter()
                                .filter(|k| k.contains("/version-"))
                                .map(|k| format!("-{}", &k[k.len() - 11..])),
                        )
                        .collect();
                    if !links.is_empty() {
                        cx.note(format!("{}: links {}", self.name, links.join(" ")));
                    }
                }
                let pairs: Vec<(&str, &str)> =
                    set.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let mut stamps = Vec::new();
                let mut r = Ok(());
                if !pairs.is_empty() {
                    match self.store.set_many(&pairs) {
                        Ok(es) => stamps = es.iter().map(|e| e.stamp).collect(),
                        Err(e) => r = Err(e),
                    }
                }
                if r.is_ok() {
                    for k in &delete {
                        if let Err(e) = self.store.delete(k) {
                            r = Err(e);
                            break;
                        }
                    }
                }
                match r {
                    Ok(()) => {
                        if let Some(tag) = tag {
                            q.push_back(Event::Done(Done::Published { tag, stamps }));
                        }
                    }
                    Err(e) => {
                        self.executor_bug(cx, format!("a publication failed: {e}"));
                        q.push_back(Event::Done(Done::Failed {
                            what: "publish".into(),
                            error: e.to_string(),
                        }));
                    }
                }
            }
            Command::Persist(ctl) => self.persist(ctl),
            Command::SetDesignated(on) => self.designated = on,
            Command::SetFenced(on) => {
                self.fenced = on;
                cx.note(format!(
                    "{}: device {}",
                    self.name,
                    if on { "fenced" } else { "unfenced" }
                ));
            }
            Command::OpenVolume {
                restart_after_gap, ..
            } => {
                let o = self.open_volume(restart_after_gap, cx);
                cx.note(format!(
                    "{}: volume opened, log continues in {}",
                    self.name,
                    self.current()
                ));
                q.push_back(Event::Done(Done::VolumeOpened(Ok(o))));
            }
            Command::CloseVolume => {
                self.close_volume(cx);
                q.push_back(Event::Done(Done::VolumeClosed));
            }
            Command::StepDown { .. } => {
                let d = match self.step_down(cx) {
                    Ok(f) => Done::ReplicaOpened(Ok(f)),
                    Err(e) => Done::StepDownFailed(e),
                };
                q.push_back(Event::Done(d));
            }
            Command::OpenReplica { .. } => {
                if let Some(d) = &mut self.dir {
                    if !d.replica_marker {
                        // A directory that was a primary's (or a new one): whatever pushed this
                        // host out earlier, its history as a replica starts here.
                        cx.ghost.forced_out.remove(&self.name);
                    }
                    d.replica_marker = true;
                }
                let f = self.replica_facts();
                q.push_back(Event::Done(Done::ReplicaOpened(Ok(f))));
            }
            Command::Promote { cut_at, .. } => {
                let o = self.promote(cut_at, cx);
                q.push_back(Event::Done(Done::VolumeOpened(Ok(o))));
            }
            Command::Grow { reply, size } => q.push_back(Event::Done(Done::Grown {
                reply,
                size,
                result: Err("resize is not modelled".into()),
            })),
            Command::SetSize(_) => {}
            // The simulation has no local block devices (its volumes open without one).
            Command::AttachDevice => q.push_back(Event::Done(Done::DeviceAttached(None))),
            Command::EnterPassthrough => q.push_back(Event::Done(Done::Passthrough(Err(
                "emergency mode is not modelled".into(),
            )))),
            Command::RestartLog => q.push_back(Event::Done(Done::LogRestarted(Err(
                "emergency mode is not modelled".into(),
            )))),
            Command::ReclaimLogs { below } => {
                let mut removed = Vec::new();
                if self.vol.is_some() {
                    // Only what is written back, and never the current logfile.
                    let keep = self.position().file.min(self.current());
                    let limit = below.map_or(keep, |b| b.min(keep));
                    removed = self.remove_logs_below(limit);
                }
                q.push_back(Event::Done(Done::Reclaimed { removed }));
            }
            Command::Rotate {
                reply,
                only_if_used,
            } => {
                let result = if self.vol.is_some() {
                    let r = self.rotate(only_if_used);
                    if let Some(no) = r {
                        cx.note(format!("{}: log rotation, now in {no}", self.name));
                    }
                    Ok(r)
                } else {
                    Err("no open volume".into())
                };
                q.push_back(Event::Done(Done::Rotated { reply, result }));
            }
            Command::StartFetch {
                id,
                source,
                from,
                prev_link,
            } => {
                self.fetch = Some(FetchSession::new(id, source, from, prev_link));
                self.send_fetch_req(cx);
            }
            Command::StopFetch { id } => {
                if self.fetch.as_ref().is_some_and(|s| s.id == id) {
                    self.fetch = None;
                }
            }
            Command::CopyDecision { id, no, decision } => self.copy_decision(id, no, decision, cx),
            Command::StartReplay {
                id,
                file,
                origin,
                from,
                to,
                // The simulated records carry no device offsets.
                size: _,
            } => {
                let ok = self
                    .logs
                    .get(&file)
                    .is_some_and(|f| f.origin == origin && f.recs.len() as u64 >= to);
                if !ok {
                    self.executor_bug(
                        cx,
                        format!("replay of log {file}-{origin} to {to} asked, but no such copy"),
                    );
                }
                self.replay = Some(ReplaySession {
                    id,
                    file,
                    origin,
                    pos: from,
                    to,
                });
            }
            Command::StopReplay { id } => {
                if self.replay.as_ref().is_some_and(|s| s.id == id) {
                    self.replay = None;
                }
            }
            Command::StartSync { id, source, .. } => {
                self.sync = Some(SyncSession::new(id, source));
                self.send_sync_req(cx);
            }
            Command::SyncGo { id, done, size } => {
                if let Some(s) = self.sync.as_mut().filter(|s| s.id == id) {
                    s.phase = SyncPhase::Copy { done, size };
                    s.sent_at = None;
                    s.misses = 0;
                    self.send_sync_req(cx);
                }
            }
            Command::StopSync { id } => {
                if self.sync.as_ref().is_some_and(|s| s.id == id) {
                    self.sync = None;
                }
            }
            Command::RepairCopies { at } => {
                let later: Vec<u64> = self.logs.range(at.file + 1..).map(|(n, _)| *n).collect();
                for n in later {
                    self.logs.remove(&n);
                }
                if let Some(f) = self.logs.get_mut(&at.file) {
                    f.recs.truncate(at.offset as usize);
                    f.durable = f.durable.min(f.recs.len());
                    f.complete = false;
                }
            }
            Command::ResetCopies => self.logs.clear(),
            Command::DropCopiesBelow { below } => {
                let removed = self.remove_logs_below(below);
                q.push_back(Event::Done(Done::Reclaimed { removed }));
            }
            // No systemd stack is configured in the simulation.
            Command::RunUnit(job) => q.push_back(Event::Done(Done::Unit { job, status: None })),
            Command::Teardown { why, reply } => self.teardown(&why, cx, reply),
            Command::Reply { id, result } => self.replies.push((id, result)),
            Command::Log { level, msg } => {
                if level != Level::Debug {
                    cx.note(format!("{}: {msg}", self.name));
                }
            }
        }
    }

    /// Something the engine asked for cannot be carried out on the simulated state: the engine
    /// and the executor disagree about the local state. Reported as a violation.
    pub(super) fn executor_bug(&self, cx: &mut Ctx, what: String) {
        cx.ghost
            .violations
            .push(format!("{}: executor: {what}", self.name));
    }

    fn persist(&mut self, ctl: Control) {
        let Some(d) = self.dir.as_mut() else { return };
        match ctl {
            Control::Position(p) => d.position = p,
            Control::Sync(s) => {
                if s.as_ref().is_some_and(|s| s.start.is_none() && s.done == 0) {
                    // A full sync from scratch: the disk is no consistent state any more.
                    self.tl = None;
                }
                d.sync = s;
            }
            Control::NeedsSync(s) => d.needs_sync = s,
            Control::Marker(Marker::Replica, on) => d.replica_marker = on,
            Control::Marker(Marker::Force, on) => d.force_marker = on,
            Control::Marker(Marker::Emergency, on) => d.emergency_marker = on,
            Control::ChainStart(no) => d.chain_start = Some(no),
        }
    }

    fn remove_logs_below(&mut self, below: u64) -> Vec<String> {
        let victims: Vec<u64> = self.logs.range(..below).map(|(n, _)| *n).collect();
        victims
            .into_iter()
            .filter_map(|no| {
                let f = self.logs.remove(&no)?;
                Some(mars_txlog::LogName::new(no, f.origin).to_string())
            })
            .collect()
    }

    fn replica_facts(&self) -> ReplicaFacts {
        let d = self.dir.as_ref();
        ReplicaFacts {
            copies: self.log_infos(),
            applied: self.position(),
            sync: d.and_then(|d| d.sync.clone()),
            needs_sync: d.and_then(|d| d.needs_sync.clone()),
        }
    }

    /// Opens the volume: recovery writes the durable log from the writeback position back,
    /// and the log continues in a new logfile (after a hole of one number with
    /// `restart_after_gap`). The application starts on it.
    fn open_volume(&mut self, restart_after_gap: bool, cx: &Ctx) -> Opened {
        let from = self.position();
        self.apply_log_from(from, cx);
        let mut next = if self.logs.is_empty() && from.file > 0 && from.offset == 0 {
            from.file
        } else {
            self.logs.keys().next_back().map_or(1, |n| n + 1)
        };
        let restarted_at = restart_after_gap.then(|| {
            next += 1;
            next
        });
        for f in self.logs.values_mut() {
            f.recs.truncate(f.durable);
            f.complete = true;
        }
        self.logs.insert(next, LogFile::new(self.name.clone()));
        if let Some(d) = &mut self.dir {
            d.position = LogPos::new(next, 0);
        }
        self.vol = Some(Vol { app_open: true });
        Opened {
            stats: self.volume_stats(),
            restarted_at,
            device: None,
        }
    }

    /// Closes the volume: everything durable and written back.
    fn close_volume(&mut self, cx: &Ctx) {
        if self.vol.take().is_none() {
            return;
        }
        for f in self.logs.values_mut() {
            f.durable = f.recs.len();
        }
        let wb = self.position();
        let end = self.apply_log_from(wb, cx);
        if let Some(d) = &mut self.dir {
            d.position = end.max(wb);
        }
    }

    /// Leaves the primary role (`Command::StepDown`): refused while the application has the
    /// device open; the volume closed, an empty own last logfile dropped, the replay position
    /// at the end of the log, the replica marker set, the replica opened.
    fn step_down(&mut self, cx: &mut Ctx) -> Result<ReplicaFacts, String> {
        match &self.vol {
            None => return Err("no open volume".into()),
            Some(v) if v.app_open => return Err("the device is in use (1 open)".into()),
            Some(_) => {}
        }
        self.close_volume(cx);
        // A logfile we started but never wrote to is no history: the next primary's logfile
        // of that number must not look like a fork.
        if let Some((no, f)) = self.newest() {
            if f.origin == self.name && f.recs.is_empty() {
                self.logs.remove(&no);
            }
        }
        for f in self.logs.values_mut() {
            f.complete = true;
        }
        let applied = self.newest().map_or(self.position(), |(n, f)| {
            LogPos::new(n, f.recs.len() as u64)
        });
        if let Some(d) = &mut self.dir {
            d.position = applied;
            d.replica_marker = true;
        }
        // A primary pushed out by a forced switch leaves a history the operator gave up.
        let forced_out = cx.ghost.forced_out.remove(&self.name);
        cx.ghost.last_step_down = self.tl.as_ref().filter(|_| !forced_out).map(|tl| StepDown {
            host: self.name.clone(),
            len: tl.len(),
            last: tl.last().copied(),
        });
        cx.note(format!(
            "{}: left the primary role, log ends at {applied}",
            self.name
        ));
        Ok(self.replica_facts())
    }

    /// Takes over (`Command::Promote`): what was fetched beyond `cut_at` is cut, the replica
    /// marker removed, the volume opened in a new logfile, the force marker removed.
    fn promote(&mut self, cut_at: LogPos, cx: &mut Ctx) -> Opened {
        let later: Vec<u64> = self
            .logs
            .range(cut_at.file + 1..)
            .map(|(n, _)| *n)
            .collect();
        for no in later {
            self.logs.remove(&no);
        }
        if cut_at.offset == 0 {
            self.logs.remove(&cut_at.file);
        } else if let Some(f) = self.logs.get_mut(&cut_at.file) {
            f.recs.truncate(cut_at.offset as usize);
            f.durable = f.recs.len();
        }
        // Ghost: a restarted ex-primary's own records that replay had not applied are gone
        // now (if they were flushed, the check of flushed writes says so).
        if let Some(tl) = &mut self.tl {
            let n = cx.ghost.count_before(tl, cut_at);
            tl.truncate(n);
        }
        if self.position() != cut_at {
            self.executor_bug(
                cx,
                format!(
                    "promotion at {cut_at}, but the replay position is {}",
                    self.position()
                ),
            );
        }
        self.ghost_promotion(cx);
        if let Some(d) = &mut self.dir {
            d.replica_marker = false;
            d.position = cut_at;
        }
        let o = self.open_volume(false, cx);
        if let Some(d) = &mut self.dir {
            d.force_marker = false;
        }
        cx.note(format!(
            "{}: primary now{} after {cut_at}, continuing in log {}",
            self.name,
            if self.ghost_force { " (forced)" } else { "" },
            self.current()
        ));
        self.ghost_force = false;
        o
    }

    /// Ghost bookkeeping of a promotion: a planned one must hold the whole history of the last
    /// primary that left cleanly (invariant 4); a forced one gives up every other history.
    fn ghost_promotion(&mut self, cx: &mut Ctx) {
        let me = self.name.clone();
        if !self.ghost_force {
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
            cx.ghost.planned_promotions += 1;
        } else {
            // Whatever the others had beyond our replay position may be lost, also what a
            // primary still acting now writes until it leaves; every other history is given
            // up, also that of a host down now that comes back acting as primary on stale
            // metadata and then leaves for us (seed 5564).
            cx.ghost.last_step_down = None;
            let others = cx.cluster.iter().filter(|h| **h != me).cloned();
            cx.ghost.forced_out.extend(others);
            cx.ghost.forced_promotions += 1;
        }
        // A new history of ours begins: an old mark of having been pushed out no longer holds.
        cx.ghost.forced_out.remove(&me);
    }

    fn copy_decision(&mut self, id: u64, no: u64, decision: CopyDecision, cx: &mut Ctx) {
        let Some(s) = self.fetch.as_mut().filter(|s| s.id == id) else {
            return;
        };
        let origin = match s.offered.take() {
            Some((n, o)) if n == no => o,
            _ => {
                self.executor_bug(cx, format!("a copy decision for log {no} nobody offered"));
                return;
            }
        };
        s.decided.insert(no);
        let problem = match decision {
            CopyDecision::Append => match self.logs.get(&no) {
                Some(f) if f.origin == origin => None,
                _ => Some(format!("append to log {no}-{origin}, which is not here")),
            },
            CopyDecision::Create => {
                if self.logs.contains_key(&no) {
                    Some(format!("create log {no}, which exists here"))
                } else {
                    if let Some(f) = self.logs.values_mut().next_back() {
                        f.complete = true;
                    }
                    self.logs.insert(no, LogFile::new(origin));
                    None
                }
            }
            CopyDecision::ReplaceEmpty { old_origin } => match self.logs.get(&no) {
                Some(f) if f.origin == old_origin && f.recs.is_empty() => {
                    self.logs.insert(no, LogFile::new(origin));
                    None
                }
                _ => Some(format!(
                    "replace the empty log {no}-{old_origin}, which is not here"
                )),
            },
            CopyDecision::Reject => {
                self.fetch = None;
                None
            }
        };
        if let Some(p) = problem {
            self.executor_bug(cx, p);
            self.fetch = None;
        }
    }

    /// Closes everything, deletes this host's keys of the resource and its directory.
    fn teardown(&mut self, why: &str, cx: &mut Ctx, reply: Option<u64>) {
        let own: Vec<String> = self
            .store
            .list_prefix(&keys::prefix(&res()))
            .expect("in-memory store")
            .into_iter()
            .map(|e| e.key)
            .filter(|k| self.store.owner_of(k).as_ref() == Some(&self.name))
            .collect();
        for k in own {
            self.store.delete(&k).expect("own key");
        }
        self.engine = None;
        self.dir = None;
        self.vol = None;
        self.fetch = None;
        self.replay = None;
        self.sync = None;
        self.designated = false;
        self.fenced = false;
        self.logs.clear();
        self.disk.clear();
        // The operator discards this host's history: its writes need not survive elsewhere.
        self.tl = None;
        self.mark = None;
        self.confirmed_by = None;
        if cx
            .ghost
            .last_step_down
            .as_ref()
            .is_some_and(|s| s.host == self.name)
        {
            cx.ghost.last_step_down = None;
        }
        cx.note(format!("{}: resource torn down ({why})", self.name));
        if let Some(id) = reply {
            self.replies.push((id, Ok(format!("{}: {why}", res()))));
        }
    }
}
