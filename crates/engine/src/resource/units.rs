//! The resource's systemd stack on this host (MARS's want operations): which operation to
//! run ([`crate::want_op`]), when to run it again, and the retry of a failed one.
//!
//! - **serialised**: at most one job per resource at a time;
//! - **idempotent**: an operation runs again only when its inputs change — the op, the unit,
//!   or the Lamport stamp of the `systemd-want` entry (so every write of the want, even of the
//!   same value, re-runs it, as a MARS trigger does) — or on `systemd-trigger`;
//! - **retried**: a failed operation is repeated with exponential backoff while it is still
//!   wanted — except a start of a unit systemd does not know ([`UnitStatus::unknown_unit`]):
//!   that is reported once and repeated only when its inputs change or on `systemd-trigger`
//!   (MARS reports such a start as done; looping on it would only fill the log).

use super::command::{OpKey, UnitJob};
use super::{Command, Local, ResourceEngine};
use crate::keys;
use crate::systemd::UnitStatus;

#[derive(Debug, Default, Clone)]
pub(super) struct Units {
    /// A job runs.
    busy: bool,
    /// The last operation that succeeded.
    done: Option<OpKey>,
    /// The last failed operation, how often it failed in a row, and when to try again.
    failed: Option<(OpKey, u32, u64)>,
    /// `systemd-trigger`: run the wanted operation again even if it was done.
    forced: bool,
    /// The (start, stop) units the last regeneration saw; a change regenerates.
    seen: Option<(Option<String>, Option<String>)>,
}

impl Units {
    pub fn force(&mut self) {
        self.forced = true;
    }
}

impl ResourceEngine {
    pub(super) fn reconcile_units(&mut self) {
        if self.units.busy {
            return;
        }
        let device_present = match &self.local {
            Local::Primary(p) => p.device_present(self.cfg.host.local_device),
            _ => false,
        };
        let sd = &self.meta.systemd;
        let current = (sd.start_unit.clone(), sd.stop_unit.clone());
        let wanted = crate::want_op(sd, &self.me, self.meta.primary.as_ref(), device_present).map(
            |(op, unit)| OpKey {
                op,
                unit,
                want: sd.want_raw.clone(),
                want_stamp: sd.want_stamp,
            },
        );
        let now = self.now.ms;
        let u = &mut self.units;
        // Units appeared, changed or went away: regenerate (removing what is no longer wanted).
        let regenerate = u.seen.as_ref() != Some(&current)
            && (current.0.is_some() || u.seen.as_ref().is_some_and(|s| s.0.is_some()));
        let mut retry_at = None;
        let op = wanted.filter(|k| {
            let waiting = u
                .failed
                .as_ref()
                .is_some_and(|(f, _, at)| f == k && now < *at);
            if waiting {
                retry_at = u.failed.as_ref().map(|(_, _, at)| *at);
            }
            u.forced || (u.done.as_ref() != Some(k) && !waiting)
        });
        u.seen = Some(current);
        if op.is_none() && !regenerate {
            u.forced = false;
            if let Some(at) = retry_at {
                self.wake_at(at);
            }
            return;
        }
        u.forced = false;
        u.busy = true;
        self.emit(Command::RunUnit(UnitJob { op, regenerate }));
    }

    pub(super) fn on_unit(&mut self, job: UnitJob, status: Option<UnitStatus>) {
        self.units.busy = false;
        let (Some(key), Some(status)) = (job.op, status) else {
            return;
        };
        let res = self.res.clone();
        let me = self.me.clone();
        self.publish(
            vec![(keys::systemd_status(&res, &me), status.to_json())],
            Vec::new(),
        );
        let (min, max) = (
            self.cfg.timing.unit_backoff_min,
            self.cfg.timing.unit_backoff_max,
        );
        let now = self.now.ms;
        let u = &mut self.units;
        if status.ok() {
            u.done = Some(key);
            u.failed = None;
        } else if status.unknown_unit {
            // Settled as far as retrying goes: the published status says it failed and why.
            u.done = Some(key);
            u.failed = None;
        } else {
            u.done = None;
            let n = match &u.failed {
                Some((k, n, _)) if *k == key => n + 1,
                _ => 1,
            };
            let backoff = min.saturating_mul(1 << (n - 1).min(10)).min(max);
            u.failed = Some((key, n, now + backoff));
            self.wake_at(now + backoff);
        }
    }
}
