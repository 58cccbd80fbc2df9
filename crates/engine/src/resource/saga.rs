//! `primary RES` on this host as a saga: explicit phases, each waiting for the metadata to say
//! something, each with its compensation when the deadline passes.
//!
//! ```text
//! planned (this host holds a consistent replica, fetch and replay on)
//!  checks ── member, consistent, attached, no split brain, not stuck, acting primaries reachable
//!  StopStack   (with a systemd stack) want := me; every host that may run the stack reports
//!              its stop for this want                ─ failed/late: want := old, refused
//!  WaitClosed  the old primary's device is closed    ─ late: want := old, refused
//!              primary := me
//!  WaitLeft    the old primary left the role         ─ late: primary := old (+ want), refused
//!  WaitPromoted this host caught up and opened its volume (see promote.rs)
//!                                                    ─ late: primary := old, refused
//!  WaitStarted (with a stack) this host's start result, reported, not fatal
//!
//! forced (fetch paused, replay on, no damaged copy)
//!  force marker; primary := me (+ want := me)
//!  WaitPromoted ── then fetch := on again; a warning if another host still acts
//! ```
//!
//! So in a planned handover exactly one host runs the stack at any moment: the new primary
//! starts it only after the old one reported its stop and left the role.

use mars_config::HostName;

use super::command::{Control, Marker, Tag};
use super::event::{Op, OpId};
use super::{Command, Level, Local, ResourceEngine};
use crate::keys;
use crate::reason::OpError;
use crate::systemd::UnitOp;
use crate::Role;

#[derive(Debug, Clone)]
pub(super) struct Saga {
    pub id: OpId,
    deadline: u64,
    phase: Phase,
    /// The host acting as primary when the command began.
    old: Option<HostName>,
    /// A systemd stack is configured.
    stack: bool,
    /// The stamp of our write of `systemd-want` (results must be for it or later).
    want_stamp: u64,
    /// The want's value before (where the stack goes back to on failure).
    want_before: Option<String>,
    designated_before: Option<HostName>,
    /// Publications whose stamps the saga waits for: our `systemd-want` write, our
    /// `primary` write.
    want_tag: Option<Tag>,
    primary_tag: Option<Tag>,
    /// The stamp of our `primary` write: once the metadata's designation is at least this
    /// new, a designation other than us means another command won.
    primary_stamp: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for the stamp of our `systemd-want` write.
    WantWritten {
        holders: Vec<HostName>,
    },
    /// Waiting for each holder's stop result.
    StopStack {
        holders: Vec<HostName>,
    },
    WaitClosed,
    WaitLeft,
    WaitPromoted {
        forced: bool,
    },
    WaitStarted,
}

impl ResourceEngine {
    /// `primary [--force]` arrives (the resource is set up: a replica or a primary).
    pub(super) fn start_primary(&mut self, id: OpId, force: bool, timeout: u64, confirmed: bool) {
        if self.saga.is_some() {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "a primary command for {} is already running here",
                    self.res
                ))),
            );
            return;
        }
        let me = self.me.clone();
        let res = self.res.clone();
        let stack = self.meta.systemd.configured();
        let designated = self.is_designated();
        if self.is_primary() {
            let mut set = Vec::new();
            let msg = if designated && force {
                // Designated as far as this host knows, but in a partition the other side may
                // have designated another host since (its own forced switch). The operator's
                // forced choice is written again with a fresh stamp, so it wins over that
                // older one when the metadata meets.
                set.push((keys::primary(&res), me.to_string()));
                if stack {
                    set.push((keys::systemd_want(&res), me.to_string()));
                }
                format!(
                    "{me} is the primary of {res} already; the designation is written again (it \
                     wins over one made elsewhere before, e.g. during a partition)"
                )
            } else if designated {
                if stack && self.meta.systemd.want.as_ref() != Some(&me) {
                    // As in MARS it restarts a stack stopped by `set-systemd-want (none)` or
                    // wanted elsewhere.
                    set.push((keys::systemd_want(&res), me.to_string()));
                    format!("{me} is the primary of {res} already; its systemd stack is wanted here again")
                } else {
                    format!("{me} is the primary of {res} already")
                }
            } else if !force {
                let d = self
                    .meta
                    .primary
                    .as_ref()
                    .map_or("(none)".to_string(), ToString::to_string);
                self.reply(
                    id,
                    Err(OpError::invalid(format!(
                        "this host still acts as primary of {res} (device open) while {d} is \
                         designated: `primary --force {res}` takes the role back, and the other \
                         side's writes become a split brain"
                    ))),
                );
                return;
            } else {
                set.push((keys::primary(&res), me.to_string()));
                if stack {
                    set.push((keys::systemd_want(&res), me.to_string()));
                }
                format!(
                    "{res}: took the primary role back by force; if another host wrote \
                     meanwhile, resolve the split brain there (`marsadm invalidate {res}`)"
                )
            };
            self.publish(set, Vec::new());
            let result = match self.device_error() {
                Some(e) => Err(OpError::failed(format!(
                    "{msg}, but its block device is missing: {e} (marsd tries again; see \
                     `marsadm view {res}`)"
                ))),
                None => Ok(msg),
            };
            self.reply(id, result);
            return;
        }
        let todo = self.todo();
        let Local::Replica(r) = &self.local else {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "{res} is not set up here (`marsadm view {res}` shows why)"
                ))),
            );
            return;
        };
        if !r.consistent() {
            let why = r.needs_sync.as_ref().map_or(
                "the full sync has not finished".to_string(),
                ToString::to_string,
            );
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "the replica of {res} here is inconsistent ({why}): it can never become \
                     primary, not even with --force"
                ))),
            );
            return;
        }
        if !todo.attach {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "{res} is detached here: run `marsadm up {res}` first"
                ))),
            );
            return;
        }
        let deadline = self.now.ms + timeout;
        if force {
            self.start_forced(id, deadline, confirmed);
        } else {
            self.start_planned(id, deadline);
        }
    }

    fn start_forced(&mut self, id: OpId, deadline: u64, confirmed: bool) {
        let me = self.me.clone();
        let res = self.res.clone();
        let todo = self.todo();
        if todo.fetch {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "a forced switch takes what this replica has: pause fetching first \
                     (`marsadm pause-fetch {res}` or `disconnect`), then `primary --force {res}`"
                ))),
            );
            return;
        }
        if !todo.replay {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "replay is paused here: `marsadm resume-replay {res}` first (what is fetched \
                     is replayed before the switch)"
                ))),
            );
            return;
        }
        let damaged = self.replica().and_then(|r| {
            r.stuck
                .as_ref()
                .filter(|s| s.kind() == crate::reason::StuckKind::Damaged)
                .map(ToString::to_string)
        });
        if let Some(why) = damaged {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "the local log copy of {res} is damaged after the replay position ({why}): a \
                     forced switch would drop what follows; resume fetching to repair it from \
                     the primary, or recreate the resource from the best disk"
                ))),
            );
            return;
        }
        // MARS's documentation asks the operator to make sure before forcing while the old
        // primary still runs: what it wrote beyond this replica is lost here, and its writes
        // from now on fork. Unconfirmed, the command is refused with what would be lost.
        if let Some((a, lost)) = self.ahead_primary().filter(|_| !confirmed) {
            let lost = lost.map_or("writes".to_string(), |n| {
                format!("{} ({n} bytes)", mars_config::format_size(n))
            });
            self.reply(
                id,
                Err(OpError::needs_confirmation(format!(
                    "{a} is reachable and still has {lost} of {res} that this replica has not \
                     replayed: a forced switch loses them here and makes a SPLIT BRAIN with \
                     {a}. For a handover without loss run `marsadm resume-fetch {res}` and \
                     `marsadm primary {res}`. To force anyway, confirm at the prompt on a \
                     terminal or give --force twice (`marsadm primary --force --force {res}`)"
                ))),
            );
            return;
        }
        self.facts.force_marker = true;
        self.emit(Command::Persist(Control::Marker(Marker::Force, true)));
        // The stack follows: it starts here once the device is served, and the old primary
        // stops it whenever it learns of this (fencing it meanwhile is the operator's job, as
        // in MARS).
        let mut set = vec![(keys::primary(&res), me.to_string())];
        if self.meta.systemd.configured() {
            set.push((keys::systemd_want(&res), me.to_string()));
        }
        self.publish(set, Vec::new());
        self.log(Level::Warn, "forced switch to primary requested");
        self.saga = Some(Saga {
            id,
            deadline,
            phase: Phase::WaitPromoted { forced: true },
            old: None,
            stack: false,
            want_stamp: 0,
            want_before: None,
            designated_before: None,
            want_tag: None,
            primary_tag: None,
            primary_stamp: None,
        });
    }

    fn start_planned(&mut self, id: OpId, deadline: u64) {
        let me = self.me.clone();
        let res = self.res.clone();
        let todo = self.todo();
        if !todo.fetch || !todo.replay {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "fetch and replay must be on for a handover: `marsadm up {res}` (or `primary \
                     --force` for a failover)"
                ))),
            );
            return;
        }
        let alive = |h: &HostName| self.alive(h);
        if let Some(sb) = crate::split_brain(&self.meta, &alive) {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "{res} has a split brain (histories differ from logfile {}): resolve it \
                     first (`marsadm view {res}`)",
                    sb.logfile
                ))),
            );
            return;
        }
        let stuck = self
            .replica()
            .and_then(|r| r.stuck.clone())
            .filter(|s| s.is_history() || s.kind() == crate::reason::StuckKind::Damaged);
        if let Some(s) = stuck {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "replication of {res} is stuck here: {s}"
                ))),
            );
            return;
        }
        let acting: Vec<HostName> = crate::roles::actual_primaries(&self.meta, &me)
            .cloned()
            .collect();
        if let Some(a) = acting.iter().find(|a| !self.alive(a)) {
            self.reply(
                id,
                Err(OpError::invalid(format!(
                    "{a} acts as primary of {res} but is not reachable: a planned handover \
                     needs it; for a failover run `marsadm pause-fetch {res}` and `marsadm \
                     primary --force {res}`"
                ))),
            );
            return;
        }
        let old = acting.first().cloned();
        let stack = self.meta.systemd.configured();
        let mut saga = Saga {
            id,
            deadline,
            phase: Phase::WaitClosed,
            old: old.clone(),
            stack,
            want_stamp: 0,
            want_before: self.meta.systemd.want_raw.clone(),
            designated_before: self.meta.primary.clone(),
            want_tag: None,
            primary_tag: None,
            primary_stamp: None,
        };
        if stack {
            // The stack moves first. Every other host that may run it stops it when it sees
            // the want here: the acting primary, the designated one (its report may not have
            // arrived yet), and any host whose last operation was a start.
            let holders: Vec<HostName> = self
                .meta
                .members
                .keys()
                .filter(|h| **h != me)
                .filter(|h| {
                    acting.contains(h)
                        || self.meta.primary.as_ref() == Some(*h)
                        || self
                            .meta
                            .systemd
                            .status
                            .get(*h)
                            .is_some_and(|st| st.op == UnitOp::Start)
                })
                .cloned()
                .collect();
            let tag = self.new_id();
            saga.phase = Phase::WantWritten { holders };
            saga.want_tag = Some(tag);
            self.publish_tagged(
                Some(tag),
                vec![(keys::systemd_want(&res), me.to_string())],
                Vec::new(),
            );
        }
        if self.facts.force_marker {
            // A forced switch requested here before (the host crashed before it took over,
            // or the designation went elsewhere) must not turn this planned handover into a
            // forced one that does not wait for the old primary's last writes (found by
            // mars-sim, seed 3285): the operator's latest command decides.
            self.facts.force_marker = false;
            self.emit(Command::Persist(Control::Marker(Marker::Force, false)));
        }
        self.saga = Some(saga);
    }

    /// A reachable member that acts as (or is designated) primary and whose log goes beyond
    /// what this replica will have after a forced switch (applied, or fetched: what is fetched
    /// is replayed first): the member and the bytes (`None`: its report lists no logfiles).
    pub(super) fn ahead_primary(&self) -> Option<(HostName, Option<u64>)> {
        let me = &self.me;
        let r = self.replica()?;
        let have = r.fetched().map_or(r.applied, |f| f.max(r.applied));
        let mut candidates: Vec<&HostName> =
            crate::roles::actual_primaries(&self.meta, me).collect();
        if let Some(d) = self.meta.primary.as_ref().filter(|d| *d != me) {
            if !candidates.contains(&d) {
                candidates.push(d);
            }
        }
        candidates
            .into_iter()
            .filter(|h| self.alive(h))
            .find_map(|h| {
                let rep = self.meta.members.get(h)?.report.as_ref()?;
                let end = rep.log_end?;
                if end <= have {
                    return None;
                }
                let bytes = rep.bytes_after(have).filter(|n| *n > 0);
                Some((h.clone(), bytes))
            })
    }

    /// What the `primary` command just started would do, for `--dry-run`.
    pub(super) fn describe_saga(&self) -> Option<String> {
        let s = self.saga.as_ref()?;
        let me = &self.me;
        let res = &self.res;
        Some(match &s.phase {
            Phase::WaitPromoted { forced: true } => {
                let r = self.replica();
                let at = r.map(|r| r.fetched().map_or(r.applied, |f| f.max(r.applied)));
                let lost = match self.ahead_primary() {
                    Some((a, Some(n))) => format!(
                        "; {a} is reachable and ahead: its last {} ({n} bytes) are lost here \
                         and a SPLIT BRAIN follows",
                        mars_config::format_size(n)
                    ),
                    Some((a, None)) => format!(
                        "; {a} is reachable and ahead: its newer writes are lost here and a \
                         SPLIT BRAIN follows"
                    ),
                    None => String::new(),
                };
                format!(
                    "would make {me} the primary of {res} by force (failover): it takes over \
                     with what it has{}, the force marker is set, primary := {me}{}{lost}",
                    at.map(|p| format!(" (log up to {p})")).unwrap_or_default(),
                    if self.meta.systemd.configured() {
                        format!(", systemd-want := {me}")
                    } else {
                        String::new()
                    }
                )
            }
            _ => {
                let mut steps = Vec::new();
                if let Phase::WantWritten { holders } = &s.phase {
                    let hs: Vec<String> = holders.iter().map(ToString::to_string).collect();
                    steps.push(format!(
                        "systemd-want := {me}, wait for the stack to stop on {}",
                        if hs.is_empty() {
                            "(nobody)".to_string()
                        } else {
                            hs.join(", ")
                        }
                    ));
                }
                if let Some(a) = &s.old {
                    steps.push(format!("wait until the device of {res} on {a} is closed"));
                }
                steps.push(format!("primary := {me}"));
                if let Some(a) = &s.old {
                    steps.push(format!("wait until {a} leaves the primary role"));
                }
                steps.push(format!(
                    "{me} takes over once it has applied the newest log end"
                ));
                if s.stack {
                    steps.push("start the systemd stack here".to_string());
                }
                format!(
                    "would make {me} the primary of {res}: planned handover{}: {}",
                    s.old
                        .as_ref()
                        .map(|a| format!(" from {a}"))
                        .unwrap_or_default(),
                    steps.join(", ")
                )
            }
        })
    }

    pub(super) fn on_published(&mut self, tag: Tag, stamps: Vec<u64>) {
        let Some(s) = self.saga.as_mut() else { return };
        let stamp = stamps.first().copied().unwrap_or(0);
        if s.primary_tag == Some(tag) {
            s.primary_stamp = Some(stamp);
        }
        if s.want_tag == Some(tag) {
            s.want_stamp = stamp;
            if let Phase::WantWritten { holders } = &s.phase {
                s.phase = Phase::StopStack {
                    holders: holders.clone(),
                };
            }
        }
    }

    /// Moves the saga on as far as the state allows; called at the end of every pass.
    pub(super) fn advance_saga(&mut self) {
        loop {
            let Some(s) = self.saga.clone() else { return };
            let now = self.now.ms;
            let late = now >= s.deadline;
            match self.step_saga(s, late) {
                Step::Wait(s) => {
                    let deadline = s.deadline;
                    self.saga = Some(s);
                    self.wake_at(deadline);
                    return;
                }
                Step::Next(s) => self.saga = Some(s),
                Step::Done(id, result) => {
                    self.saga = None;
                    self.reply(id, result);
                    return;
                }
            }
        }
    }

    fn step_saga(&mut self, mut s: Saga, late: bool) -> Step {
        let me = self.me.clone();
        let res = self.res.clone();
        match s.phase.clone() {
            Phase::WantWritten { .. } => {
                if late {
                    return Step::Done(
                        s.id,
                        Err(OpError::failed(format!(
                            "{res}: the systemd want could not be written in time"
                        ))),
                    );
                }
                Step::Wait(s)
            }
            Phase::StopStack { mut holders } => {
                // Each holder's stop result for our want (or a later one).
                while let Some(a) = holders.first().cloned() {
                    let result = self
                        .meta
                        .systemd
                        .status
                        .get(&a)
                        .filter(|st| st.op == UnitOp::Stop && st.want_stamp >= s.want_stamp)
                        .cloned();
                    let why = match result {
                        Some(st) if st.ok() => {
                            holders.remove(0);
                            continue;
                        }
                        Some(st) => {
                            format!("the stack of {res} did not stop on {a} ({})", st.summary())
                        }
                        None if late => format!(
                            "{a} did not report stopping the stack of {res} ({}) in time",
                            self.meta.systemd.stop().unwrap_or_default()
                        ),
                        None => {
                            s.phase = Phase::StopStack { holders };
                            return Step::Wait(s);
                        }
                    };
                    // Back to where it ran: the acting primary, else the designated one, else
                    // the want as it was.
                    let back = s
                        .old
                        .clone()
                        .or_else(|| s.designated_before.clone().filter(|p| *p != me))
                        .map(|h| h.to_string())
                        .or_else(|| s.want_before.clone())
                        .unwrap_or_else(|| keys::NO_PRIMARY.to_string());
                    self.publish(vec![(keys::systemd_want(&res), back.clone())], Vec::new());
                    self.log(Level::Warn, format!("handover to {me} aborted: {why}"));
                    return Step::Done(
                        s.id,
                        Err(OpError::failed(format!(
                            "{why}: {back} stays primary and starts its stack again"
                        ))),
                    );
                }
                s.phase = Phase::WaitClosed;
                Step::Next(s)
            }
            Phase::WaitClosed => {
                if let Some(a) = s.old.clone() {
                    let open = open_count(&self.meta, &a);
                    if open > 0 {
                        if !late {
                            return Step::Wait(s);
                        }
                        // Compensation: the stack stopped for nothing; it runs on the old
                        // primary again.
                        let restarted = if s.stack {
                            self.publish(
                                vec![(keys::systemd_want(&res), a.to_string())],
                                Vec::new(),
                            );
                            " and starts its stack again"
                        } else {
                            ""
                        };
                        return Step::Done(
                            s.id,
                            Err(OpError::invalid(format!(
                                "the device of {res} is still in use on {a} ({open} open): close \
                                 it (umount, stop the application) and try again; {a} stays \
                                 primary{restarted}"
                            ))),
                        );
                    }
                }
                // Unless this replica became inconsistent meanwhile (a resize starts a sync of
                // the new region): the old primary would leave and nobody could take over.
                if !self.replica().is_some_and(super::Replica::consistent) {
                    return Step::Done(
                        s.id,
                        Err(OpError::invalid(format!(
                            "the replica of {res} here started a sync meanwhile (a resize?): wait \
                             until it is up to date (`marsadm wait-resource {res} uptodate`), \
                             then try again"
                        ))),
                    );
                }
                let tag = self.new_id();
                s.primary_tag = Some(tag);
                self.publish_tagged(
                    Some(tag),
                    vec![(keys::primary(&res), me.to_string())],
                    Vec::new(),
                );
                self.log(
                    Level::Info,
                    format!(
                        "handover to {me}{}",
                        s.old
                            .as_ref()
                            .map(|a| format!(" from {a}"))
                            .unwrap_or_default()
                    ),
                );
                s.phase = if s.old.is_some() {
                    Phase::WaitLeft
                } else {
                    Phase::WaitPromoted { forced: false }
                };
                Step::Next(s)
            }
            Phase::WaitLeft => {
                let a = s.old.clone().expect("WaitLeft has an old primary");
                if self.designation_settled(&s) && self.meta.primary.as_ref() != Some(&me) {
                    return self.another_won(s.id);
                }
                let left = self
                    .meta
                    .members
                    .get(&a)
                    .and_then(|m| m.report.as_ref())
                    .is_none_or(|r| r.role != Role::Primary);
                if left {
                    s.phase = Phase::WaitPromoted { forced: false };
                    return Step::Next(s);
                }
                if !late {
                    return Step::Wait(s);
                }
                let mut set = vec![(keys::primary(&res), a.to_string())];
                if s.stack {
                    set.push((keys::systemd_want(&res), a.to_string()));
                }
                self.publish(set, Vec::new());
                let open = open_count(&self.meta, &a);
                Step::Done(
                    s.id,
                    Err(OpError::timeout(if open > 0 {
                        format!(
                            "the device of {res} is still in use on {a} ({open} open): close it \
                             (umount, stop the application) and try again; {a} stays primary"
                        )
                    } else {
                        format!("{a} did not leave the primary role in time: {a} stays primary of {res}")
                    })),
                )
            }
            Phase::WaitPromoted { forced } => {
                if self.is_primary() {
                    if forced {
                        self.publish(
                            vec![(keys::todo(&res, &me, "fetch"), "1".into())],
                            Vec::new(),
                        );
                    }
                    // As MARS's `primary` waits for the device and aborts on the error the
                    // kernel reports: the role is taken (the data is here, the designation
                    // stays), but the command did not deliver what it promises.
                    if let Some(e) = self.device_error() {
                        self.log(
                            Level::Error,
                            format!("primary now, but without the block device: {e}"),
                        );
                        return Step::Done(
                            s.id,
                            Err(OpError::failed(format!(
                                "{me} is the primary of {res} now, but its block device could \
                                 not be set up: {e} (marsd tries again; see `marsadm view {res}`)"
                            ))),
                        );
                    }
                    if forced {
                        // As in MARS (since stable113): fetching resumes by itself, for when
                        // this host is a secondary again (published above).
                        let others: Vec<String> = crate::roles::actual_primaries(&self.meta, &me)
                            .filter(|h| self.alive(h))
                            .map(ToString::to_string)
                            .collect();
                        let warning = if others.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; {} acted as primary when last heard from: unless it is down, \
                                 this is a SPLIT BRAIN until it closes its device and is \
                                 resolved (`marsadm invalidate {res}` there)",
                                others.join(", ")
                            )
                        };
                        return Step::Done(
                            s.id,
                            Ok(format!("{res}: {me} is primary now (forced){warning}")),
                        );
                    }
                    if s.stack {
                        s.phase = Phase::WaitStarted;
                        return Step::Next(s);
                    }
                    return Step::Done(s.id, Ok(done_text(&res, &me, &s, "")));
                }
                if !forced
                    && self.designation_settled(&s)
                    && self.meta.primary.as_ref() != Some(&me)
                {
                    return self.another_won(s.id);
                }
                if !late {
                    return Step::Wait(s);
                }
                let why = self.waiting_why();
                if forced {
                    return Step::Done(
                        s.id,
                        Err(OpError::failed(format!(
                            "{me} is the designated primary of {res}, but not acting yet: {why} \
                             (it takes over by itself; see `marsadm view {res}`)"
                        ))),
                    );
                }
                // Only while the old primary is still a member holding a consistent copy:
                // invalidated, or gone from the resource, it has nothing to take the role back
                // with (found by mars-sim, seed 915).
                let has_data = |a: &HostName| {
                    self.meta
                        .members
                        .get(a)
                        .and_then(|m| m.report.as_ref())
                        .is_some_and(|r| r.consistent && !r.needs_sync)
                };
                if let Some(a) = s.old.clone().filter(|a| has_data(a)) {
                    // Compensation: the old primary has all the data; it takes the role back
                    // rather than leave the resource without a primary while this host cannot
                    // catch up.
                    self.publish(vec![(keys::primary(&res), a.to_string())], Vec::new());
                    return Step::Done(
                        s.id,
                        Err(OpError::failed(format!(
                            "{me} could not take over {res} in time ({why}): {a} is the \
                             designated primary again"
                        ))),
                    );
                }
                Step::Done(
                    s.id,
                    Err(OpError::failed(format!(
                        "{me} is the designated primary of {res} but still catching up: {why} \
                         (it takes over by itself; see `marsadm view {res}`)"
                    ))),
                )
            }
            Phase::WaitStarted => {
                let found = self
                    .meta
                    .systemd
                    .status
                    .get(&me)
                    .filter(|st| st.op == UnitOp::Start && st.want_stamp >= s.want_stamp)
                    .cloned();
                let note = match found {
                    Some(st) if st.ok() => format!("; stack started ({})", st.unit),
                    // The summary says whether it is tried again.
                    Some(st) => format!("; starting the stack FAILED ({})", st.summary()),
                    None if !late => return Step::Wait(s),
                    None => "; the stack has not started yet".to_string(),
                };
                Step::Done(s.id, Ok(done_text(&res, &me, &s, &note)))
            }
        }
    }

    /// The metadata holds our designation or a newer one (so another value means another
    /// command won). Until our own write comes back from the store, it shows the old value.
    fn designation_settled(&self, s: &Saga) -> bool {
        s.primary_stamp
            .is_some_and(|stamp| self.meta.designation >= stamp)
    }

    fn another_won(&mut self, id: OpId) -> Step {
        let res = self.res.clone();
        let p = self
            .meta
            .primary
            .as_ref()
            .map_or("(none)".to_string(), ToString::to_string);
        Step::Done(
            id,
            Err(OpError::failed(format!(
                "another primary command won: {p} is the designated primary of {res}"
            ))),
        )
    }

    /// Why this host does not act as primary yet (for a refusal).
    fn waiting_why(&self) -> String {
        self.replica()
            .and_then(super::Replica::stuck_text)
            .unwrap_or_default()
    }

    /// Operator ops that go through the saga machinery.
    pub(super) fn is_saga_op(op: &Op) -> bool {
        matches!(op, Op::Primary { .. })
    }
}

enum Step {
    Wait(Saga),
    Next(Saga),
    Done(OpId, Result<String, OpError>),
}

fn open_count(meta: &crate::ResourceMeta, h: &HostName) -> u64 {
    meta.members
        .get(h)
        .and_then(|m| m.report.as_ref())
        .map_or(0, |r| r.open_count)
}

fn done_text(res: &mars_config::ResourceName, me: &HostName, s: &Saga, note: &str) -> String {
    format!(
        "{res}: {me} is primary now{}{note}",
        s.old
            .as_ref()
            .map(|a| format!(" (handed over from {a}, nothing lost)"))
            .unwrap_or_default()
    )
}
