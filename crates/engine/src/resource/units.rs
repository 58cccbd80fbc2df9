//! The resource's systemd stack on this host (MARS's want operations): which operation to
//! run ([`crate::want_op`]), when to run it again, and the retry of a failed one.
//!
//! - **serialised**: at most one job per resource at a time;
//! - **idempotent**: an operation runs again only when its inputs change — the op, the unit,
//!   or the Lamport stamp of the `systemd-want` entry (so every write of the want, even of the
//!   same value, re-runs it, as a MARS trigger does) — or on `systemd-trigger`;
//! - **tried as MARS tries**: a failed operation is tried again while it is still wanted,
//!   after n seconds following its n-th failure, [`crate::systemd::UNIT_TRIES`] times in all
//!   (a `.script` once); then it is given up ([`UnitStatus::gave_up`], published with the
//!   status) until its inputs change or `systemd-trigger` asks, as MARS's `systemctl` helper
//!   tries and its next trigger repeats. A start of a unit systemd does not know
//!   ([`UnitStatus::unknown_unit`]) is given up at once (MARS reports such a start as done;
//!   trying again cannot make the unit known).

use super::command::{OpKey, UnitJob};
use super::{Command, Local, ResourceEngine};
use crate::keys;
use crate::systemd::{unit_tries, UnitStatus};

#[derive(Debug, Default, Clone)]
pub(super) struct Units {
    /// A job runs.
    busy: bool,
    /// The last operation that succeeded.
    done: Option<OpKey>,
    /// The last failed operation, how often it failed in a row, and when to try again.
    failed: Option<(OpKey, u32, u64)>,
    /// The try the running job makes.
    attempt: u32,
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
        // The next try of a series that failed; a new operation (or one given up and asked
        // for again) starts at 1.
        let attempt = match (&op, &u.failed) {
            (Some(k), Some((f, n, _))) if f == k => n + 1,
            _ => 1,
        };
        u.attempt = attempt;
        self.emit(Command::RunUnit(UnitJob {
            op,
            regenerate,
            attempt,
        }));
    }

    pub(super) fn on_unit(&mut self, job: UnitJob, status: Option<UnitStatus>) {
        self.units.busy = false;
        let (Some(key), Some(mut status)) = (job.op, status) else {
            return;
        };
        let n = job.attempt.max(1);
        let gave_up = !status.ok() && (status.unknown_unit || n >= unit_tries(&key.unit));
        status.tries = n;
        status.gave_up = gave_up && !status.unknown_unit;
        let res = self.res.clone();
        let me = self.me.clone();
        self.publish(
            vec![(keys::systemd_status(&res, &me), status.to_json())],
            Vec::new(),
        );
        let step = self.cfg.timing.unit_retry_step;
        let now = self.now.ms;
        let u = &mut self.units;
        if status.ok() || gave_up {
            // Settled as far as trying goes: a failure's published status says why.
            u.done = Some(key);
            u.failed = None;
        } else {
            // MARS's linear backoff: n seconds after the n-th failure.
            let at = now + step.saturating_mul(u64::from(n));
            u.done = None;
            u.failed = Some((key, n, at));
            self.wake_at(at);
        }
    }
}
