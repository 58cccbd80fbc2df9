//! Operator commands on one resource: their guards (a refused command changes nothing) and
//! what they do. `primary` is the saga in `saga.rs`.
//!
//! A command that arrives while the resource is being set up (right after a start, or while a
//! role change runs) waits for it, at most [`crate::config::Timing::setup_wait`], instead of
//! being refused for a state that is about to change.

use mars_config::format_size;

use super::event::{Op, OpId};
use super::{Busy, Command, Level, Local, ResourceEngine};
use crate::keys;
use crate::reason::OpError;

impl ResourceEngine {
    /// An operator request, for real or (`dry`) as a dry run (`dry_run.rs`).
    pub(super) fn on_op(&mut self, id: OpId, op: Op, dry: bool) {
        if needs_setup(&op) && self.settling() {
            let deadline = self.now.ms + self.cfg.timing.setup_wait;
            self.pending.push((id, op, dry, deadline));
            self.wake_at(deadline);
            return;
        }
        self.run_op_or_dry(id, op, dry);
    }

    fn run_op_or_dry(&mut self, id: OpId, op: Op, dry: bool) {
        if dry {
            self.run_dry(id, op);
        } else {
            self.run_op(id, op);
        }
    }

    /// The resource is being set up or changes its role: commands wait.
    fn settling(&self) -> bool {
        !self.started
            || !self.meta_known
            || matches!(self.local, Local::Busy(_))
            || matches!(self.local, Local::Idle { error: None })
                && self.meta.is_member(&self.me)
                && !self.todo_detached_primary()
    }

    /// A designated primary that is detached (`down`) stays idle on purpose.
    fn todo_detached_primary(&self) -> bool {
        self.is_designated() && !self.todo().attach
    }

    pub(super) fn retry_pending(&mut self) {
        if self.pending.is_empty() || self.settling() {
            self.expire_pending();
            return;
        }
        for (id, op, dry, _) in std::mem::take(&mut self.pending) {
            self.run_op_or_dry(id, op, dry);
        }
        let _ = Self::is_saga_op;
    }

    pub(super) fn expire_pending(&mut self) {
        let now = self.now.ms;
        let res = self.res.clone();
        let mut keep = Vec::new();
        for (id, op, dry, deadline) in std::mem::take(&mut self.pending) {
            if now >= deadline {
                self.reply(
                    id,
                    Err(OpError::invalid(format!(
                        "{res} is not attached here yet (`marsadm view {res}` shows its state)"
                    ))),
                );
            } else {
                self.wake_at(deadline);
                keep.push((id, op, dry, deadline));
            }
        }
        self.pending = keep;
    }

    pub(super) fn run_op(&mut self, id: OpId, op: Op) {
        let res = self.res.clone();
        let me = self.me.clone();
        if !self.meta.is_member(&me) && !matches!(op, Op::DeleteResource { .. }) {
            self.reply(
                id,
                Err(OpError::not_found(format!("resource {res} does not exist"))),
            );
            return;
        }
        match op {
            Op::Primary {
                force,
                timeout,
                confirmed,
            } => self.start_primary(id, force, timeout, confirmed),
            Op::Secondary => {
                // MARS (`primary_phase0` for `secondary`): with a systemd stack the want
                // becomes `(none)` first, which stops the stack everywhere; the device it held
                // is then closed by the stack, not by the operator.
                let stack = self.meta.systemd.configured();
                if self.stats.open_count > 0 && self.is_primary() && !stack {
                    let n = self.stats.open_count;
                    return self.reply(
                        id,
                        Err(OpError::invalid(format!(
                            "the device of {res} is in use here ({n} open): close it first"
                        ))),
                    );
                }
                let mut set = Vec::new();
                let stop_stack =
                    stack && self.meta.systemd.want_raw.as_deref() != Some(keys::NO_PRIMARY);
                if stop_stack {
                    set.push((keys::systemd_want(&res), keys::NO_PRIMARY.to_string()));
                }
                set.push((keys::primary(&res), keys::NO_PRIMARY.to_string()));
                self.publish(set, Vec::new());
                self.reply(
                    id,
                    Ok(format!(
                        "{res}: {}no designated primary now; the primary leaves its role once its \
                         device is closed and secondaries stop fetching. Discouraged except \
                         before leave-resource/delete-resource: `marsadm primary {res}` restores \
                         service",
                        if stop_stack {
                            "systemd stack wanted nowhere (stopping everywhere); "
                        } else {
                            ""
                        }
                    )),
                );
            }
            Op::SetEmergencyLimit { pct } => {
                if pct > 100 {
                    return self.reply(
                        id,
                        Err(OpError::invalid(format!(
                            "{pct} is not a percentage (0..=100)"
                        ))),
                    );
                }
                self.publish(
                    vec![(keys::emergency_limit(&res, &me), pct.to_string())],
                    Vec::new(),
                );
                self.reply(
                    id,
                    Ok(if pct == 0 {
                        format!("{res}: no emergency limit here; free space alone decides")
                    } else {
                        format!(
                            "{res}: emergency mode here once its logfiles take more than {pct}% \
                             of the root"
                        )
                    }),
                );
            }
            Op::Invalidate => {
                if let Err(e) = self.secondary_guard("invalidate") {
                    return self.reply(id, Err(e));
                }
                // The local copies go first, then this host's links that contradict the
                // primary's history (they are what shows a split brain, and this replica gives
                // up that history now): a crash in between must not leave copies that would
                // publish those links again.
                self.reset_replica();
                self.purge_own_links(true);
                self.reply(
                    id,
                    Ok(format!(
                        "{res}: replica invalidated; a fast full sync starts"
                    )),
                );
            }
            Op::LogPurgeAll => {
                if let Err(e) = self.secondary_guard("log-purge-all") {
                    return self.reply(id, Err(e));
                }
                let p = self.meta.primary.clone().expect("guarded");
                self.reset_replica();
                let purged = self.purge_own_links(true);
                self.reply(
                    id,
                    Ok(format!(
                        "{res}: purged the local logfiles and {purged} version link(s) outside \
                         {p}'s history; a fast full sync from {p} starts"
                    )),
                );
            }
            Op::FakeSync => {
                if let Err(e) = self.secondary_guard("fake-sync") {
                    return self.reply(id, Err(e));
                }
                let r = self.fake_sync();
                self.reply(id, r);
            }
            Op::Switch { switches, on } => {
                if switches.is_empty() {
                    return self.reply(id, Err(OpError::invalid("no switch given")));
                }
                let open = self.stats.open_count;
                if !on && switches.iter().any(|s| s == "attach") && open > 0 {
                    return self.reply(
                        id,
                        Err(OpError::invalid(format!(
                            "the device of {res} is in use ({open} open): close it before detaching"
                        ))),
                    );
                }
                let set = switches
                    .iter()
                    .map(|s| (keys::todo(&res, &me, s), if on { "1" } else { "0" }.into()))
                    .collect();
                self.publish(set, Vec::new());
                self.reply(
                    id,
                    Ok(format!(
                        "{res}: {} {}",
                        switches.join(", "),
                        if on { "on" } else { "off" }
                    )),
                );
            }
            Op::Resize { size } => self.resize(id, size),
            Op::LeaveResource { force } => {
                if self.is_designated() || self.is_primary() {
                    return self.reply(
                        id,
                        Err(OpError::invalid(format!(
                            "this host is the primary of {res}: hand over first (`marsadm \
                             primary {res}` elsewhere), or delete-resource"
                        ))),
                    );
                }
                if self.todo().attach && !force {
                    return self.reply(
                        id,
                        Err(OpError::invalid(format!(
                            "{res} is still attached here: run `marsadm down {res}` first (or \
                             leave-resource --force)"
                        ))),
                    );
                }
                self.teardown("left".into(), Some(id));
            }
            Op::DeleteResource { force } => {
                let others: Vec<String> = self
                    .meta
                    .members
                    .keys()
                    .filter(|h| **h != me)
                    .map(ToString::to_string)
                    .collect();
                if !others.is_empty() && !force {
                    return self.reply(
                        id,
                        Err(OpError::invalid(format!(
                            "{res} still has other members ({}): they must leave-resource \
                             first, or use delete-resource --force",
                            others.join(", ")
                        ))),
                    );
                }
                let open = self.stats.open_count;
                if open > 0 && !force {
                    return self.reply(
                        id,
                        Err(OpError::invalid(format!(
                            "the device of {res} is in use ({open} open); close it first"
                        ))),
                    );
                }
                // The shared keys go (the `*-global` requests too: nobody is left to apply
                // them); each member's own keys go with its teardown.
                let mut delete = vec![keys::size(&res), keys::primary(&res)];
                delete.extend(self.meta.requests.keys().map(|sw| keys::request(&res, sw)));
                self.emit(Command::Publish {
                    tag: None,
                    set: Vec::new(),
                    delete,
                });
                self.teardown("deleted".into(), Some(id));
            }
            Op::Cron => {
                if self.is_primary() {
                    self.waiting_ops.insert(id, "cron".into());
                    self.emit(Command::Rotate {
                        reply: Some(id),
                        only_if_used: true,
                    });
                } else {
                    self.reply(id, Ok(String::new()));
                }
            }
            Op::LogRotate => {
                if self.is_primary() {
                    self.emit(Command::Rotate {
                        reply: Some(id),
                        only_if_used: false,
                    });
                } else {
                    // Say why: the designated primary whose volume is not open is not
                    // attached; a secondary is attached, but log-rotate runs elsewhere.
                    let msg = match &self.meta.primary {
                        Some(p) if *p == me => format!(
                            "resource {res} is not attached here as primary (its volume is not \
                             open: `marsadm view {res}` says why)"
                        ),
                        Some(p) => format!(
                            "log-rotate {res} runs on its primary {p}; this host is a secondary"
                        ),
                        None => {
                            format!("log-rotate {res} runs on its primary, and none is designated")
                        }
                    };
                    self.reply(id, Err(OpError::invalid(msg)));
                }
            }
            Op::SystemdTrigger => {
                self.units.force();
                self.reply(id, Ok(String::new()));
            }
        }
    }

    /// Commands that run on a secondary with a designated primary.
    fn secondary_guard(&self, what: &str) -> Result<(), OpError> {
        let res = &self.res;
        if self.is_designated() || self.is_primary() {
            return Err(OpError::invalid(format!(
                "{what} runs on a secondary; this host is the primary of {res}"
            )));
        }
        if self.meta.primary.is_none() {
            return Err(OpError::invalid(format!(
                "{res} has no designated primary to {what} from"
            )));
        }
        if self.replica().is_none() {
            return Err(OpError::invalid(format!(
                "{res} is not set up here (`marsadm view {res}` shows why)"
            )));
        }
        Ok(())
    }

    /// Deletes this host's version links: those that differ from (or are missing at) the
    /// designated primary's (`disagreeing`), or all. Returns how many.
    pub(super) fn purge_own_links(&mut self, disagreeing: bool) -> usize {
        let me = self.me.clone();
        let p = self.meta.primary.clone();
        let delete: Vec<String> = self
            .meta
            .versions
            .iter()
            .filter_map(|(no, links)| {
                let mine = links.get(&me)?;
                let agrees = disagreeing
                    && p.as_ref()
                        .and_then(|p| links.get(p))
                        .is_some_and(|theirs| theirs == mine);
                (!agrees).then(|| keys::version(&self.res, *no, &me))
            })
            .collect();
        let n = delete.len();
        self.publish(Vec::new(), delete);
        n
    }

    /// `invalidate` / `log-purge-all`: forget the local state, full-sync from scratch.
    fn reset_replica(&mut self) {
        if let Local::Replica(r) = &mut self.local {
            let cmds = r.reset();
            self.out.extend(cmds);
        }
    }

    /// `fake-sync`: declare the replica consistent without copying.
    fn fake_sync(&mut self) -> Result<String, OpError> {
        let res = self.res.clone();
        let now = self.meta.primary_report().and_then(|p| p.log_end);
        let Local::Replica(r) = &mut self.local else {
            return Err(OpError::invalid(format!("{res} is not a replica here")));
        };
        let Some(s) = r.sync.clone() else {
            return Ok(format!(
                "{res}: already consistent here (no sync pending): nothing to declare"
            ));
        };
        // The disks are declared equal as of the primary's current log position (unless a
        // sync already got one): replay goes on from there.
        let start = s.start.or(now).ok_or_else(|| {
            OpError::invalid(format!(
                "fake-sync {res}: the primary's log position is not known here yet (is it \
                 reachable?)"
            ))
        })?;
        let end = now.unwrap_or(start).max(start);
        let mut cmds = Vec::new();
        if let Some(sess) = r.sync_session.take() {
            cmds.push(Command::StopSync { id: sess.id });
        }
        r.sync_running = false;
        if s.start.is_none() || s.done == 0 {
            cmds.push(Command::Persist(super::Control::Position(start)));
            r.applied = start;
        }
        let s = super::SyncFile {
            start: Some(start),
            done: s.size,
            end: Some(end),
            ..s
        };
        cmds.push(Command::Persist(super::Control::Sync(Some(s.clone()))));
        r.sync = Some(s);
        self.out.extend(cmds);
        Ok(format!(
            "{res}: declared in sync without copying (expert mode: the disks must already be equal)"
        ))
    }

    fn resize(&mut self, id: OpId, size: Option<u64>) {
        let res = self.res.clone();
        let me = self.me.clone();
        let Some(v) = self
            .stats
            .volume
            .clone()
            .filter(|_| self.is_primary() && self.is_designated())
        else {
            return self.reply(
                id,
                Err(OpError::invalid(format!(
                    "resize runs on the primary of {res}"
                ))),
            );
        };
        let cur = v.size.max(self.size);
        if let Some(s) = size.filter(|s| *s <= cur) {
            return self.reply(
                id,
                Err(OpError::invalid(format!(
                    "{res} has {} already; resize only grows (asked for {})",
                    format_size(cur),
                    format_size(s)
                ))),
            );
        }
        // Every member's disk must hold the new size.
        let mut smallest = self.stats.disk_size;
        let mut smallest_host = me.to_string();
        for (h, m) in &self.meta.members {
            if *h == me {
                continue;
            }
            match m.report.as_ref().map(|r| r.disk_size) {
                Some(n) if n > 0 => {
                    if n < smallest {
                        smallest = n;
                        smallest_host = h.to_string();
                    }
                }
                _ => {
                    return self.reply(
                        id,
                        Err(OpError::invalid(format!(
                            "member {h} has not reported its disk size yet; try again when it is \
                             connected"
                        ))),
                    )
                }
            }
        }
        let new = size.unwrap_or(smallest) / 512 * 512;
        if new <= cur {
            return self.reply(
                id,
                Err(OpError::invalid(format!(
                    "{res} has {} already; resize only grows (largest possible: {} on \
                     {smallest_host})",
                    format_size(cur),
                    format_size(smallest)
                ))),
            );
        }
        if new > smallest {
            return self.reply(
                id,
                Err(OpError::invalid(format!(
                    "the disk of {smallest_host} has only {} ({smallest} bytes), less than {} \
                     ({new} bytes)",
                    format_size(smallest),
                    format_size(new)
                ))),
            );
        }
        self.waiting_ops.insert(
            id,
            format!(
                "{res} grows from {} to {}; secondaries sync the new region",
                format_size(cur),
                format_size(new)
            ),
        );
        self.emit(Command::Grow {
            reply: id,
            size: new,
        });
    }

    pub(super) fn on_grown(&mut self, reply: OpId, size: u64, result: Result<(), String>) {
        let msg = self.waiting_ops.remove(&reply).unwrap_or_default();
        match result {
            Ok(()) => {
                self.size = self.size.max(size);
                let res = self.res.clone();
                self.emit(Command::Publish {
                    tag: None,
                    set: vec![(keys::size(&res), size.to_string())],
                    delete: Vec::new(),
                });
                self.reply(reply, Ok(msg));
            }
            Err(e) => {
                let res = self.res.clone();
                self.reply(reply, Err(OpError::failed(format!("resize {res}: {e}"))));
            }
        }
    }

    pub(super) fn on_rotated(&mut self, reply: Option<OpId>, result: Result<Option<u64>, String>) {
        // The logfile just closed can be reclaimed once the measurements show it, and an idle
        // primary is not measured again by itself: measure now (`cron` rotated and nothing
        // else came, so the closed logfile stayed: the replication test's cron loop, 30 s).
        self.wake_at(self.now.ms);
        let res = self.res.clone();
        let me = self.me.clone();
        let Some(id) = reply else {
            if let Err(e) = result {
                self.log(Level::Warn, format!("log rotation failed: {e}"));
            }
            return;
        };
        // Cron replies with its lines; log-rotate with the logfile now written to.
        let cron = self.waiting_ops.remove(&id).is_some_and(|w| w == "cron");
        match result {
            Ok(Some(no)) if cron => self.reply(id, Ok(format!("{res}: rotated to log {no}"))),
            Err(e) if cron => self.reply(id, Ok(format!("{res}: rotate failed: {e}"))),
            Ok(Some(no)) => {
                let name = mars_txlog::LogName::new(no, me).to_string();
                self.reply(id, Ok(format!("{res}: now logging to {name}")));
            }
            Ok(None) => self.reply(id, Ok(String::new())),
            Err(e) => self.reply(id, Err(OpError::failed(format!("log-rotate {res}: {e}")))),
        }
    }

    /// Whether the role is being changed (for the status).
    pub(super) fn busy_kind(&self) -> Option<&'static str> {
        match &self.local {
            Local::Busy(Busy::Opening) => Some("opening"),
            Local::Busy(Busy::Promoting { .. }) => Some("promoting"),
            Local::Busy(Busy::SteppingDown(_)) => Some("stepping down"),
            Local::Busy(Busy::OpeningReplica) => Some("opening the replica"),
            Local::Busy(Busy::Closing) => Some("closing"),
            _ => None,
        }
    }
}

/// Commands that look at the local role and wait while it is being set up.
pub(super) fn needs_setup(op: &Op) -> bool {
    matches!(
        op,
        Op::Primary { .. }
            | Op::Invalidate
            | Op::LogPurgeAll
            | Op::FakeSync
            | Op::LeaveResource { .. }
            | Op::Resize { .. }
            | Op::LogRotate
            | Op::Cron
    )
}
