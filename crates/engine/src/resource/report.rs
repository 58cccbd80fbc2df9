//! What this host says about the resource: the report it publishes (`actual-HOST`, read by
//! every other host's decisions) and the status `view` shows.
//!
//! A report's state part (role, pins, consistency, stuck kind, caught-up …) goes out at once
//! when it changes: others decide on it. Its moving parts (positions, rates) at most every
//! [`crate::config::Timing::report_every`].

use mars_txlog::LogPos;

use super::{Local, ResourceEngine};
use crate::keys;
use crate::model::{Report, Role, SyncReport};

#[derive(Debug, Default, Clone)]
pub(super) struct Publisher {
    /// The last published report, its state part, and when.
    last: Option<(String, String, u64)>,
    /// The report differed from the published one at the last look (positions moving).
    moving: bool,
}

impl Publisher {
    /// Positions or rates changed since the last publication: a later one is due.
    pub fn moving(&self) -> bool {
        self.moving || self.last.is_none()
    }
}

/// The parts of a report that others act on (as opposed to progress and rates).
pub fn state_of(r: &Report) -> String {
    format!(
        "{}|{:?}|{:?}|{}|{}|{}|{:?}|{:?}|{}|{:?}|{}|{:?}|{}",
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
        r.caught_up,
        r.stuck_kind,
        // Secondaries tell their operators at once why replication stopped.
        r.emergency,
    )
}

/// What `view` shows of the resource on this host, from live state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This host's report as it would be published now.
    pub report: Report,
    /// `Primary` while the volume is open.
    pub primary: bool,
    /// Why nothing is open (MARS disk state and text), if that is why.
    pub error: Option<(String, String)>,
    /// The role is being changed: what is under way.
    pub busy: Option<&'static str>,
    pub consistent: bool,
    /// Replica: the fetch session's last error.
    pub fetch_error: Option<String>,
    /// Replica: milliseconds since the source confirmed it has everything (as of the event
    /// the status was made after; [`Status::caught_up_stamp`] gives it for any later moment).
    pub caught_up_ms: Option<u64>,
    /// Replica: the source's wall clock (ns) when it confirmed that this replica has
    /// everything, while that confirmation is about the current end of the copies.
    pub caught_up_stamp: Option<u64>,
    /// Replica: oldest and newest local copy.
    pub logs: (u64, u64),
    pub applied: Option<LogPos>,
    pub fetched: Option<LogPos>,
    /// The local block device, or why it could not be set up.
    pub device: Option<Result<String, String>>,
    pub repairs: u64,
    pub size: u64,
    /// The resource has set itself up after a start: its volume or replica is open, or it
    /// knows why not (an error, a detached or deferred primary role).
    pub settled: bool,
}

impl ResourceEngine {
    /// The report this host would publish now.
    pub fn report_now(&self) -> Report {
        let todo = self.todo();
        let mut rep = Report {
            open_count: self.stats.open_count,
            designation: self.meta.designation,
            ..Default::default()
        };
        match &self.local {
            Local::Primary(p) => {
                if let Some(s) = &self.stats.volume {
                    rep.role = Role::Primary;
                    rep.attached = true;
                    rep.consistent = true;
                    rep.applied = Some(s.written_back);
                    rep.log_end = Some(s.durable);
                    rep.pin = Some(s.written_back.file.min(s.current));
                    rep.dirty_bytes = s.dirty_bytes;
                    rep.disk_size = s.size;
                    rep.stuck = s.error.clone();
                    rep.stuck_kind = s.error.as_ref().map(|_| crate::reason::StuckKind::Disk);
                    rep.emergency = p.passthrough;
                    // The current logfile counts up to its durable end (what replicas can
                    // fetch).
                    let mut logs: Vec<(u64, u64)> = s
                        .logs
                        .iter()
                        .map(|l| {
                            if l.no == s.durable.file {
                                (l.no, s.durable.offset)
                            } else {
                                (l.no, l.len)
                            }
                        })
                        .collect();
                    let skip = logs.len().saturating_sub(64);
                    rep.logs = logs.split_off(skip);
                }
            }
            Local::Replica(r) => {
                let fetched = r.fetched();
                rep.role = Role::Secondary;
                rep.attached = todo.attach;
                rep.applied = Some(r.applied);
                rep.log_end = fetched.or(Some(r.applied));
                rep.sync = r.sync.as_ref().map(|s| SyncReport {
                    start: s.start,
                    done: if r.sync_running {
                        s.done.max(r.sync_shown).min(s.size)
                    } else {
                        s.done
                    },
                    size: s.size,
                    transferred: s.transferred,
                    running: r.sync_running,
                    rate: self.stats.sync_rate,
                });
                rep.consistent = r.consistent();
                rep.pin = r.pin();
                rep.needs_sync = r.needs_sync.is_some();
                rep.stuck = r.stuck_text();
                rep.stuck_kind = r.stuck_kind();
                rep.fetch_rate = self.stats.fetch_rate;
                rep.replay_rate = self.stats.replay_rate;
                rep.caught_up = todo.fetch
                    && r.caught_up_ms(self.now.wall_ns, self.cfg.timing.caught_up_valid)
                        .is_some();
                rep.forked = r.forked;
                rep.disk_size = self.size;
            }
            Local::Idle { error: Some(e) } => {
                rep.stuck = Some(e.text.clone());
                rep.stuck_kind = Some(if e.state == "DefectiveLog" {
                    crate::reason::StuckKind::Damaged
                } else {
                    crate::reason::StuckKind::Disk
                });
            }
            _ => {}
        }
        // The physical disk size: `resize` grows to the smallest member disk.
        if self.stats.disk_size > 0 {
            rep.disk_size = self.stats.disk_size;
        }
        rep
    }

    /// Publishes the report when its state changed, or its moving parts after a while.
    pub(super) fn publish_report(&mut self) {
        if matches!(self.local, Local::Busy(_) | Local::Gone) {
            return;
        }
        let report = self.report_now();
        let json = report.to_json();
        let state = state_of(&report);
        let now = self.now.ms;
        let every = self.cfg.timing.report_every;
        let due = match &self.report.last {
            Some((old, old_state, at)) => {
                if *old_state != state {
                    true
                } else if *old != json {
                    if now >= at + every {
                        true
                    } else {
                        let at = at + every;
                        self.report.moving = true;
                        self.wake_at(at);
                        false
                    }
                } else {
                    self.report.moving = false;
                    false
                }
            }
            None => true,
        };
        if due {
            self.report.moving = self
                .report
                .last
                .as_ref()
                .is_some_and(|(old, _, _)| *old != json);
            self.report.last = Some((json.clone(), state, now));
            let key = keys::actual(&self.res, &self.me);
            self.publish(vec![(key, json)], Vec::new());
        }
    }

    /// What `view` shows of the resource on this host now.
    pub fn status(&self) -> Status {
        let mut st = Status {
            report: self.report_now(),
            primary: self.is_primary(),
            error: None,
            busy: self.busy_kind(),
            consistent: self.is_primary(),
            fetch_error: None,
            caught_up_ms: None,
            caught_up_stamp: None,
            logs: (0, 0),
            applied: None,
            fetched: None,
            device: None,
            repairs: 0,
            size: self.size,
            settled: self.settled(),
        };
        match &self.local {
            Local::Idle { error: Some(e) } => {
                st.error = Some((e.state.to_string(), e.text.clone()));
            }
            Local::Primary(p) => st.device = p.device.clone(),
            Local::Replica(r) => {
                st.consistent = r.consistent();
                st.fetch_error = r.fetch_error.clone();
                st.caught_up_ms = r.caught_up_ms(self.now.wall_ns, self.cfg.timing.caught_up_valid);
                st.caught_up_stamp = r.caught_up_stamp();
                st.logs = r.log_range();
                st.applied = Some(r.applied);
                st.fetched = r.fetched();
                st.repairs = r.repairs;
            }
            _ => {}
        }
        st
    }

    fn settled(&self) -> bool {
        if !self.started || !self.meta_known {
            return false;
        }
        match &self.local {
            Local::Busy(_) => false,
            // A primary role found on disk that waits for the other members' metadata (or is
            // detached) is settled; anything else idle is about to open something.
            Local::Idle { error: None } => {
                self.is_designated()
                    && !self.facts.replica_marker
                    && (!self.todo().attach || !self.live.fresh)
                    || !self.meta.is_member(&self.me)
            }
            _ => true,
        }
    }

    /// A transient pin held for `host`, if any (for tests and `view`).
    pub fn transient_pin(&self, host: &mars_config::HostName) -> Option<u64> {
        self.pins.get(host).map(|(no, _)| *no)
    }
}
