//! The systemd interface as data and one decision (MARS `systemd-trigger` "want operations",
//! mars.md §4.3): which unit this host starts or stops for a resource.
//!
//! The replicated keys ([`crate::keys`]): `systemd-start-unit` (the tip of the stack),
//! `systemd-stop-unit` (its bottom, right above the device), `systemd-want` (the host that
//! should run the stack, or `(none)`), and per host `systemd-status-HOST` with the result of
//! HOST's last operation ([`UnitStatus`]), which a handover waits for.
//!
//! [`want_op`] is the rule; the daemon performs it (`crates/daemon/src/systemd.rs`).

use std::collections::BTreeMap;

use mars_config::HostName;
use serde::{Deserialize, Serialize};

use crate::keys::NO_PRIMARY;

/// What the metadata says about a resource's systemd stack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemdMeta {
    /// Start unit; `None` when no stack is configured (key missing or empty).
    pub start_unit: Option<String>,
    /// Stop unit; defaults to the start unit.
    pub stop_unit: Option<String>,
    /// Where the stack should run: `Some(host)`, or `None` for `(none)` / no key.
    pub want: Option<HostName>,
    /// The raw value of `systemd-want` (for display: `(none)` vs. missing).
    pub want_raw: Option<String>,
    /// The Lamport stamp of the `systemd-want` entry (0: none), set from the store like
    /// [`crate::ResourceMeta::designation`]: an operation is done for one write of the want.
    pub want_stamp: u64,
    /// Each host's last operation.
    pub status: BTreeMap<HostName, UnitStatus>,
}

impl SystemdMeta {
    /// Whether a stack is configured (`set-systemd-unit` with a non-empty start unit).
    pub fn configured(&self) -> bool {
        self.start_unit.is_some()
    }

    /// The stop unit, falling back to the start unit as MARS does.
    pub fn stop(&self) -> Option<&str> {
        self.stop_unit.as_deref().or(self.start_unit.as_deref())
    }

    /// Parses `systemd-want`: a host name, or `(none)` (any invalid value counts as none:
    /// better to stop a stack everywhere than to run it on a host nobody named).
    pub fn parse_want(v: &str) -> Option<HostName> {
        if v == NO_PRIMARY {
            return None;
        }
        HostName::new(v).ok()
    }
}

/// How often one start or stop is tried before it is given up, as MARS's `systemctl` helper
/// (marsadm, `sub systemctl`): `start`/`stop` with `--job-mode=fail` ([`JOB_MODE_FAIL_TRIES`]
/// times, so that a job already queued for the unit is not replaced by ours), then once in
/// the normal job mode; after the n-th failure it waits n seconds. Then MARS reports the
/// status (`systemd-status-…`) and tries again only on the next trigger: a new want, or
/// `marsadm systemd-trigger`. A `.script` is run once (MARS runs scripts directly, without
/// retries).
pub const UNIT_TRIES: u32 = 7;
/// Of [`UNIT_TRIES`], the ones with `--job-mode=fail`.
pub const JOB_MODE_FAIL_TRIES: u32 = 6;

/// How many tries an operation on `unit` gets ([`UNIT_TRIES`]; a script one).
pub fn unit_tries(unit: &str) -> u32 {
    if unit.ends_with(".script") {
        1
    } else {
        UNIT_TRIES
    }
}

/// Start or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnitOp {
    Start,
    Stop,
}

impl UnitOp {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitOp::Start => "start",
            UnitOp::Stop => "stop",
        }
    }
}

/// The result of one start or stop on one host (`systemd-status-HOST`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitStatus {
    pub op: UnitOp,
    pub unit: String,
    /// Exit status of `systemctl` or the script; `None` when it could not run or was killed
    /// (then `error` says why).
    pub code: Option<i32>,
    /// When it finished, milliseconds since the Unix epoch (this host's clock).
    pub time_ms: u64,
    /// The `systemd-want` value the operation was done for.
    #[serde(default)]
    pub want: Option<String>,
    /// The Lamport stamp of that `systemd-want` entry: a handover waits for a stop done for
    /// its own write of the want, not for an older one.
    #[serde(default)]
    pub want_stamp: u64,
    #[serde(default)]
    pub error: Option<String>,
    /// systemd does not know the unit (`systemctl` exit 5, "Unit … not found"): retrying
    /// cannot help until a unit file appears, so the engine does not repeat the operation by
    /// itself (MARS checks `systemctl cat UNIT` first and reports success; we report the
    /// failure and wait for the want to change or for `systemd-trigger`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown_unit: bool,
    /// Which try of the operation this was (1-based; 0 from an older marsd). Set by the
    /// engine, which counts the tries.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tries: u32,
    /// The operation failed [`UNIT_TRIES`] times in a row and is not tried again until the
    /// want changes or `marsadm systemd-trigger` asks (MARS gives up likewise). Set by the
    /// engine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gave_up: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl UnitStatus {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("statuses always serialize")
    }

    pub fn from_json(s: &str) -> Option<Self> {
        serde_json::from_str(s).ok()
    }

    /// `stop mnt-r.mount: ok` / `start app.service: exit 1` for `view`.
    pub fn summary(&self) -> String {
        let result = match (self.code, &self.error) {
            (Some(0), _) => "ok".to_string(),
            (Some(_), _) if self.unknown_unit => {
                "systemd does not know this unit (not retried; after installing it, \
                 `marsadm systemd-trigger` runs it again)"
                    .to_string()
            }
            (Some(c), _) => format!("exit {c}"),
            (None, Some(e)) => e.clone(),
            (None, None) => "failed".to_string(),
        };
        let tries = if self.ok() || self.unknown_unit || self.tries == 0 {
            String::new()
        } else if self.gave_up {
            format!(
                " (gave up after {} tries, as MARS; a new want or `marsadm systemd-trigger` \
                 tries again)",
                self.tries
            )
        } else {
            format!(" (try {}, trying again)", self.tries)
        };
        format!("{} {}: {result}{tries}", self.op.as_str(), self.unit)
    }
}

/// What one host should do about a resource's stack right now (MARS want operations):
///
/// | want | device here | designated primary | op |
/// |---|---|---|---|
/// | me | yes | me | start the start unit |
/// | me | yes | someone else / nobody | nothing (a handover is under way) |
/// | me | no | me | nothing (the device appears soon: taking over, or marsd restarting) |
/// | anything else | — | — | stop the stop unit |
///
/// The third row differs from MARS, which stops the stack whenever the device is absent: a
/// restarted `marsd` serves the device again a moment later, and tearing down the stack of
/// the designated primary for that would turn every daemon restart into an outage.
///
/// `None` when no stack is configured. Idempotent: the daemon runs the op again only when
/// its inputs (op, unit, want entry) change, after a failure (up to [`UNIT_TRIES`] tries), or
/// on `systemd-trigger`.
pub fn want_op(
    sd: &SystemdMeta,
    me: &HostName,
    primary: Option<&HostName>,
    device_present: bool,
) -> Option<(UnitOp, String)> {
    let start = sd.start_unit.as_ref()?;
    let stop = sd.stop().unwrap_or(start);
    let wanted_here = sd.want.as_ref() == Some(me);
    let designated = primary == Some(me);
    match (wanted_here, device_present, designated) {
        (true, true, true) => Some((UnitOp::Start, start.clone())),
        (true, true, false) | (true, false, true) => None,
        _ => Some((UnitOp::Stop, stop.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HostName {
        HostName::new(s).unwrap()
    }

    fn sd(want: Option<&str>) -> SystemdMeta {
        SystemdMeta {
            start_unit: Some("app.service".into()),
            stop_unit: Some("mnt.mount".into()),
            want: want.map(h),
            ..Default::default()
        }
    }

    #[test]
    fn the_decision_table() {
        let (a, b) = (h("a"), h("b"));
        let start = Some((UnitOp::Start, "app.service".to_string()));
        let stop = Some((UnitOp::Stop, "mnt.mount".to_string()));
        // want == me, device, designated: start.
        assert_eq!(want_op(&sd(Some("a")), &a, Some(&a), true), start);
        // want == me, device, not (yet) designated: nothing.
        assert_eq!(want_op(&sd(Some("a")), &a, Some(&b), true), None);
        assert_eq!(want_op(&sd(Some("a")), &a, None, true), None);
        // want == me without the device: stop (the new primary before the handover) …
        assert_eq!(want_op(&sd(Some("a")), &a, Some(&b), false), stop);
        assert_eq!(want_op(&sd(Some("a")), &a, None, false), stop);
        // … but the designated primary waits for its device (taking over, or restarting).
        assert_eq!(want_op(&sd(Some("a")), &a, Some(&a), false), None);
        // Someone else wanted: stop, whatever the role.
        assert_eq!(want_op(&sd(Some("b")), &a, Some(&a), true), stop);
        assert_eq!(want_op(&sd(Some("b")), &a, Some(&b), false), stop);
        // (none): stop everywhere.
        assert_eq!(want_op(&sd(None), &a, Some(&a), true), stop);
        // Nothing configured: never touch systemd.
        assert_eq!(want_op(&SystemdMeta::default(), &a, Some(&a), true), None);
    }

    #[test]
    fn stop_unit_defaults_to_start_unit() {
        let s = SystemdMeta {
            start_unit: Some("app.service".into()),
            want: Some(h("b")),
            ..Default::default()
        };
        assert_eq!(
            want_op(&s, &h("a"), Some(&h("a")), true),
            Some((UnitOp::Stop, "app.service".to_string()))
        );
    }

    #[test]
    fn want_values_and_status_json() {
        assert_eq!(SystemdMeta::parse_want("(none)"), None);
        assert_eq!(SystemdMeta::parse_want("b"), Some(h("b")));
        assert_eq!(SystemdMeta::parse_want("not a host"), None);
        let st = UnitStatus {
            op: UnitOp::Stop,
            unit: "mnt.mount".into(),
            code: Some(1),
            time_ms: 5,
            want: Some("b".into()),
            want_stamp: 7,
            error: None,
            unknown_unit: false,
            tries: 0,
            gave_up: false,
        };
        assert_eq!(UnitStatus::from_json(&st.to_json()), Some(st.clone()));
        assert_eq!(st.summary(), "stop mnt.mount: exit 1");
        assert!(UnitStatus::from_json("{").is_none());
        let killed = UnitStatus {
            code: None,
            error: Some("timed out after 5s".into()),
            ..st
        };
        assert_eq!(killed.summary(), "stop mnt.mount: timed out after 5s");
        // An older marsd's status (no `unknown_unit`) still parses; the flag travels.
        let old = r#"{"op":"start","unit":"a.service","code":5,"time_ms":1}"#;
        assert!(!UnitStatus::from_json(old).unwrap().unknown_unit);
        let unknown = UnitStatus {
            op: UnitOp::Start,
            code: Some(5),
            unknown_unit: true,
            ..killed
        };
        assert_eq!(
            UnitStatus::from_json(&unknown.to_json()),
            Some(unknown.clone())
        );
        assert!(!unknown.ok());
        assert!(
            unknown
                .summary()
                .starts_with("start mnt.mount: systemd does not know this unit"),
            "{}",
            unknown.summary()
        );
    }
}
