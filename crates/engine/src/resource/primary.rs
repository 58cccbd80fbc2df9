//! The primary role: fencing and stepping down when another host is designated, detaching,
//! emergency mode, and the version links of complete logfiles.

use mars_config::format_size;

use super::{Busy, Command, Control, IdleError, Level, Local, Marker, ResourceEngine};
use crate::keys;

/// What the engine keeps about an open volume (its positions come with [`super::Stats`]).
#[derive(Debug, Clone)]
pub(super) struct Primary {
    /// The local block device: its path, or why it could not be set up (`None`: none wanted).
    pub device: Option<Result<String, String>>,
    pub passthrough: bool,
    /// Entering or leaving emergency mode is under way.
    pub emergency_busy: bool,
    /// "Stays primary while the device is open" was logged.
    pub remains_logged: bool,
    /// A `ReclaimLogs` is running.
    pub reclaiming: bool,
    /// The floor the last `ReclaimLogs` was given.
    pub reclaimed_to: u64,
    /// An `AttachDevice` is running.
    pub device_busy: bool,
    /// Failed tries to set the device up since the last success (the backoff grows with them).
    pub device_failures: u32,
    /// When the device is tried again.
    pub device_retry_at: u64,
}

impl Primary {
    pub fn new(device: Option<Result<String, String>>, passthrough: bool) -> Primary {
        let failed = matches!(device, Some(Err(_)));
        Primary {
            device,
            passthrough,
            emergency_busy: false,
            remains_logged: false,
            reclaiming: false,
            reclaimed_to: 0,
            device_busy: false,
            device_failures: u32::from(failed),
            device_retry_at: 0,
        }
    }

    /// The device the stack may use is there: the local block device where the daemon serves
    /// one, otherwise the open volume (NBD export).
    pub fn device_present(&self, local_device: bool) -> bool {
        !local_device || matches!(self.device, Some(Ok(_)))
    }

    /// Why the local block device is missing, when setting it up failed.
    pub fn device_error(&self) -> Option<&str> {
        match &self.device {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }
}

impl ResourceEngine {
    /// Why this primary serves no local block device, when setting it up failed.
    pub(super) fn device_error(&self) -> Option<String> {
        match &self.local {
            Local::Primary(p) => p.device_error().map(str::to_owned),
            _ => None,
        }
    }

    pub(super) fn primary(&mut self) -> Option<&mut Primary> {
        match &mut self.local {
            Local::Primary(p) => Some(p),
            _ => None,
        }
    }

    pub(super) fn reconcile_primary(&mut self) {
        if !self.is_designated() {
            // Fenced once another host acts as the designated primary (a forced switch while
            // our device is open): the application must not go on writing a history that is
            // no longer the resource's.
            let other_acting = self.meta.primary.as_ref().is_some_and(|p| {
                self.meta
                    .members
                    .get(p)
                    .and_then(|m| m.report.as_ref())
                    .is_some_and(|r| r.role == crate::Role::Primary)
            });
            self.set_fenced(other_acting);
            if self.stats.open_count == 0 && self.stats_fresh() {
                self.step_down();
            } else {
                // Open counts change without an event when a filesystem closes the device:
                // look again soon.
                self.wake_at(self.now.ms + self.cfg.timing.busy_tick);
                let open = self.stats.open_count;
                let designated = self
                    .meta
                    .primary
                    .as_ref()
                    .map_or("(none)".to_string(), ToString::to_string);
                if open > 0 {
                    if let Some(p) = self.primary() {
                        if !p.remains_logged {
                            p.remains_logged = true;
                            self.log(
                                Level::Warn,
                                format!(
                                    "{designated} is the designated primary now, but the device \
                                     is open here ({open}): staying primary until it is closed"
                                ),
                            );
                        }
                    }
                }
            }
            return;
        }
        if let Some(p) = self.primary() {
            p.remains_logged = false;
        }
        self.set_fenced(false);
        self.emergency();
        let todo = self.todo();
        if todo.attach {
            self.retry_device();
        }
        if !todo.attach && self.stats.open_count == 0 && self.stats_fresh() {
            self.log(Level::Info, "detaching");
            self.local = Local::Busy(Busy::Closing);
            self.emit(Command::CloseVolume);
            return;
        }
        if !todo.attach {
            self.wake_at(self.now.ms + self.cfg.timing.busy_tick);
        }
        if let Some(v) = self.stats.volume.clone() {
            // Logfile N is complete once the log is durable somewhere in N+1 (the appender
            // finishes N before it writes into N+1).
            self.publish_versions(&v.logs, v.durable.file, false);
            // A primary being written to reports its moving positions; dirty data is written
            // back without an event, so its measurements are renewed until it is all on disk.
            if self.report.moving() || v.dirty_bytes > 0 || v.written_back < v.durable {
                self.wake_at(self.now.ms + self.cfg.timing.report_every);
            }
        }
    }

    /// Measurements recent enough to decide on the open count: taken after the metadata last
    /// changed (the executor measures at once when asked). Otherwise they are asked for now.
    pub(super) fn stats_fresh(&mut self) -> bool {
        if self.stats_seq > self.meta_seq {
            return true;
        }
        self.wake_at(self.now.ms);
        false
    }

    fn set_fenced(&mut self, on: bool) {
        if self.fenced != on {
            self.fenced = on;
            if on {
                self.log(
                    Level::Error,
                    "another host is the primary now, but the device is still open here: writes \
                     fail until it is closed (split brain)",
                );
            }
            self.emit(Command::SetFenced(on));
        }
    }

    /// The designation moved and the device is closed: leave the role. The executor closes
    /// the volume (everything written back) and opens the replica; its completion publishes
    /// the version links of every logfile (all complete now).
    fn step_down(&mut self) {
        let designated = self
            .meta
            .primary
            .as_ref()
            .map_or("(none)".to_string(), ToString::to_string);
        self.log(
            Level::Info,
            format!("leaving the primary role ({designated} is the designated primary)"),
        );
        self.set_fenced(false);
        let Local::Primary(p) = std::mem::replace(&mut self.local, Local::Busy(Busy::Opening))
        else {
            return;
        };
        self.local = Local::Busy(Busy::SteppingDown(p));
        let size = self.size;
        self.emit(Command::StepDown { size });
    }

    /// The designated primary serves no block device because setting it up failed (e.g.
    /// something that is not ours stands at its path): try again, with a growing backoff, so
    /// that the device comes back by itself once the cause is gone. The command that made
    /// this host primary has already failed with the reason; `view` shows it meanwhile.
    fn retry_device(&mut self) {
        let now = self.now.ms;
        let Some(p) = self.primary() else { return };
        if p.device_busy || p.device_error().is_none() {
            return;
        }
        if now < p.device_retry_at {
            let at = p.device_retry_at;
            self.wake_at(at);
            return;
        }
        p.device_busy = true;
        self.emit(Command::AttachDevice);
    }

    pub(super) fn on_device_attached(&mut self, r: Option<Result<String, String>>) {
        let now = self.now.ms;
        let (first, max) = (
            self.cfg.timing.attach_retry,
            self.cfg.timing.device_retry_max,
        );
        let Some(p) = self.primary() else { return };
        p.device_busy = false;
        let Some(r) = r else { return };
        let msg = match &r {
            Ok(path) => {
                let tries = std::mem::take(&mut p.device_failures);
                Some((
                    Level::Info,
                    format!("block device {path} set up (after {tries} failed tries)"),
                ))
            }
            Err(e) => {
                // Logged when the reason changes, not at every try.
                let changed = p.device_error() != Some(e.as_str());
                p.device_failures = p.device_failures.saturating_add(1);
                let shift = (p.device_failures - 1).min(16);
                p.device_retry_at = now + first.saturating_mul(1 << shift).min(max);
                changed.then(|| (Level::Error, format!("cannot set up the block device: {e}")))
            }
        };
        p.device = Some(r);
        if let Some((level, text)) = msg {
            self.log(level, text);
        }
    }

    pub(super) fn on_step_down_failed(&mut self, e: String) {
        self.log(Level::Error, format!("cannot leave the primary role: {e}"));
        let Local::Busy(Busy::SteppingDown(mut p)) =
            std::mem::replace(&mut self.local, Local::Busy(Busy::Opening))
        else {
            return;
        };
        if self.stats.volume.is_some() {
            p.remains_logged = true;
            self.local = Local::Primary(p);
            // Try again later (the device is probably still in use).
            self.stats_at = 0;
            self.wake_at(self.now.ms + self.cfg.timing.attach_retry);
        } else {
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

    /// Space pressure (MARS's emergency mode): below `emergency_free_space` free in the root,
    /// or with the resource's logfiles above its `set-emergency-limit` share of the root,
    /// writes go straight to the disk and the log stops growing; replicas stop where they are.
    /// Once `min_free_space` is free again, the log continues after a hole of one logfile
    /// number (replicas cannot cross it: `invalidate` brings them back).
    fn emergency(&mut self) {
        let host = self.cfg.host.clone();
        let free = self.stats.free_space;
        let limit_hit = self
            .meta
            .members
            .get(&self.me)
            .and_then(|m| m.emergency_limit)
            .and_then(|pct| {
                let total = self.stats.total_space?;
                Some(
                    self.stats.log_bytes.saturating_mul(100) > total.saturating_mul(u64::from(pct)),
                )
            })
            .unwrap_or(false);
        let low = free.is_some_and(|f| f < host.emergency_free_space) || limit_hit;
        let Some(p) = self.primary() else { return };
        if p.emergency_busy {
            return;
        }
        if low && !p.passthrough {
            p.emergency_busy = true;
            self.emit(Command::EnterPassthrough);
            let free_s = free.map_or("?".into(), format_size);
            let why = if limit_hit {
                " (the resource's logfiles exceed its emergency limit)"
            } else {
                ""
            };
            let res = self.res.clone();
            self.log(
                Level::Error,
                format!(
                    "EMERGENCY MODE: {free_s} free in the root{why}: writes go straight to the \
                     disk, replication has stopped; free space, then `marsadm invalidate {res}` \
                     on the secondaries"
                ),
            );
        } else if p.passthrough && free.is_none_or(|f| f >= host.min_free_space) {
            p.emergency_busy = true;
            self.emit(Command::RestartLog);
        }
        // The chain restarts at the logfile after the hole: tell the others.
        if let Some(no) = self.facts.chain_start {
            if self.meta.chain_starts.get(&self.me) != Some(&no) {
                let key = keys::chain_start(&self.res, &self.me);
                self.publish(vec![(key, no.to_string())], Vec::new());
            }
        }
    }

    /// The volume's mode as measured. It enters emergency mode by itself when its log runs out
    /// of space before a measurement of free space saw it coming (writes never fail for
    /// space): that is recorded like a requested switch.
    pub(super) fn adopt_volume_passthrough(&mut self) {
        let Some(on) = self.stats.volume.as_ref().map(|v| v.passthrough) else {
            return;
        };
        let Some(p) = self.primary() else { return };
        let was = std::mem::replace(&mut p.passthrough, on);
        // A requested switch under way is recorded by its completion.
        let requested = p.emergency_busy;
        if on && !was && !requested && !self.facts.emergency_marker {
            self.facts.emergency_marker = true;
            self.emit(Command::Persist(Control::Marker(Marker::Emergency, true)));
            let res = self.res.clone();
            self.log(
                Level::Error,
                format!(
                    "EMERGENCY MODE: the transaction log ran out of space: writes go straight to \
                     the disk, replication has stopped; free space, then `marsadm invalidate \
                     {res}` on the secondaries"
                ),
            );
        }
    }

    pub(super) fn on_passthrough(&mut self, r: Result<(), String>) {
        let Some(p) = self.primary() else { return };
        p.emergency_busy = false;
        match r {
            Ok(()) => {
                p.passthrough = true;
                self.facts.emergency_marker = true;
                self.emit(Command::Persist(Control::Marker(Marker::Emergency, true)));
            }
            Err(e) => self.log(Level::Error, format!("cannot enter emergency mode: {e}")),
        }
    }

    pub(super) fn on_log_restarted(&mut self, r: Result<u64, String>) {
        let Some(p) = self.primary() else { return };
        p.emergency_busy = false;
        match r {
            Ok(no) => {
                p.passthrough = false;
                self.facts.chain_start = Some(no);
                self.facts.emergency_marker = false;
                self.emit(Command::Persist(Control::ChainStart(no)));
                self.emit(Command::Persist(Control::Marker(Marker::Emergency, false)));
                let res = self.res.clone();
                self.log(
                    Level::Warn,
                    format!(
                        "space is back: emergency mode ends, the log continues at {no} after a \
                         hole; secondaries need `marsadm invalidate {res}`"
                    ),
                );
            }
            Err(e) => self.log(Level::Error, format!("cannot leave emergency mode: {e}")),
        }
    }
}
