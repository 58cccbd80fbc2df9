//! `wait-resource RES COND`: waits for a local condition by polling the daemon's view.
//!
//! MARS spells the conditions `[attach/fetch/replay/sync][-on/-off]` (plus our `uptodate`);
//! they are its `is-*` macros, so the condition logic here reads the same view fields.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Result;
use mars_api::{ResourceView, SwitchKind};

use crate::view::{flag, flag_index, is_on, is_uptodate};

/// What `wait-resource` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A switch's work (attach, sync, fetch, replay).
    Switch(SwitchKind),
    /// The local replica is `UpToDate` and not stuck.
    UpToDate,
    /// MARS `todo-*`: the switch alone (its letter is not `-`), done or not.
    Todo(SwitchKind),
    /// MARS `is-primary` (`-off`, or `is-secondary`: this host is not primary).
    Primary,
    /// MARS `is-device`: the local device of the resource is there.
    Device,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Condition {
    pub target: Target,
    pub on: bool,
}

impl Condition {
    /// Parses `attach`, `fetch-on`, `sync-off`, `uptodate` …; the plain word means `-on`.
    /// MARS's forms too: `is-`/`has-` before (the actual state: the same as the plain word
    /// here), `todo-` (the switch alone), `-1`/`-0` after, and its synonyms (`attached`,
    /// `fetching`, `copy`, `connect`, `replaying`, `syncing`, `primary`, `secondary`,
    /// `device`).
    pub fn parse(s: &str) -> Result<Condition> {
        let (word, mut on) = match s.rsplit_once('-') {
            Some((w, "on" | "1")) => (w, true),
            Some((w, "off" | "0")) => (w, false),
            _ => (s, true),
        };
        let (word, todo) = if let Some(w) = word.strip_prefix("todo-") {
            (w, true)
        } else {
            (
                word.strip_prefix("is-")
                    .or_else(|| word.strip_prefix("has-"))
                    .unwrap_or(word),
                false,
            )
        };
        let switch = |k: SwitchKind| {
            if todo {
                Target::Todo(k)
            } else {
                Target::Switch(k)
            }
        };
        let target = match (word, todo) {
            ("uptodate", false) => Target::UpToDate,
            ("attach" | "attached", _) => switch(SwitchKind::Attach),
            ("fetch" | "fetching" | "copy" | "copying" | "connect", _) => switch(SwitchKind::Fetch),
            ("replay" | "replaying", _) => switch(SwitchKind::Replay),
            ("sync" | "syncing", _) => switch(SwitchKind::Sync),
            ("primary", false) => Target::Primary,
            ("secondary", false) => {
                on = !on;
                Target::Primary
            }
            ("device", false) => Target::Device,
            _ => crate::error::usage!(
                "unknown condition {s:?}; use attach, fetch, replay, sync, uptodate, primary, \
                 secondary or device, optionally with is- or (switches) todo- before and -on \
                 or -off after"
            ),
        };
        Ok(Condition { target, on })
    }

    /// Does the condition need the source's "caught up" confirmation (`uptodate`)?
    pub fn wants_confirmation(&self) -> bool {
        self.target == Target::UpToDate && self.on
    }

    /// Does the local view `r` satisfy the condition?
    #[cfg(test)]
    pub fn holds(&self, r: &ResourceView) -> bool {
        self.holds_after(r, None)
    }

    /// Like [`Condition::holds`]; for `uptodate` on a secondary after waiting `waited`, the
    /// primary's confirmation that the replica has all its data must also be younger than the
    /// wait, so that writes finished before the wait began are included.
    pub fn holds_after(&self, r: &ResourceView, waited: Option<Duration>) -> bool {
        match (self.target, self.on) {
            (Target::UpToDate, true) if r.role == mars_api::Role::Secondary => {
                let fresh = match (waited, r.caught_up_ms) {
                    (Some(w), Some(ms)) => u128::from(ms) < w.as_millis(),
                    (None, _) => true,
                    (Some(_), None) => false,
                };
                is_uptodate(r) && fresh
            }
            (Target::UpToDate, on) => is_uptodate(r) == on,
            (Target::Switch(k), true) => switched_on_and_done(r, k),
            // A detach is finished only when the disk is closed too (`D`/`d` gone), not as
            // soon as the switch is off; the other switches have no such second letter.
            (Target::Switch(SwitchKind::Attach), false) => {
                flag(&r.flags, flag_index(SwitchKind::Attach)) == '-' && flag(&r.flags, 0) == '-'
            }
            (Target::Switch(k), false) => flag(&r.flags, flag_index(k)) == '-',
            (Target::Todo(k), on) => crate::view::todo_on(r, k) == on,
            (Target::Primary, on) => (r.role == mars_api::Role::Primary) == on,
            (Target::Device, on) => r.device.is_some() == on,
        }
    }
}

/// The `-on` condition of a switch: its letter is uppercase and its work is finished.
fn switched_on_and_done(r: &ResourceView, k: SwitchKind) -> bool {
    let idle = |p: &Option<mars_api::Progress>| p.as_ref().is_none_or(|p| p.rest() == 0);
    match k {
        SwitchKind::Attach => is_on(r, k),
        SwitchKind::Fetch => is_on(r, k) && idle(&r.fetch),
        SwitchKind::Replay => is_on(r, k) && idle(&r.replay),
        // The sync letter says nothing about completion: ask the replica itself.
        SwitchKind::Sync => r.consistent && r.sync.is_none(),
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.target {
            Target::Switch(k) => k.as_str(),
            Target::UpToDate => "uptodate",
            Target::Todo(k) => return write!(f, "todo-{}-{}", k.as_str(), on_off(self.on)),
            Target::Primary => "primary",
            Target::Device => "device",
        };
        write!(f, "{word}-{}", on_off(self.on))
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// The state shown when a wait gives up.
pub fn state_text(r: &ResourceView) -> String {
    let mut s = format!(
        "disk state {}, replication state {}, flags {}",
        crate::view::disk_text(r.disk_state, r.writeback_bytes, r.stuck.as_deref()),
        r.repl_state,
        r.flags
    );
    if let Some(st) = &r.stuck {
        s += &format!(", stuck: {st}");
    }
    s
}

/// Calls `view` (given the time left) every `interval` until `cond` holds, at least once;
/// fails with the last state seen after `timeout`.
pub fn wait_until(
    cond: Condition,
    timeout: Duration,
    interval: Duration,
    mut view: impl FnMut(Duration) -> Result<ResourceView>,
) -> Result<ResourceView> {
    let start = Instant::now();
    loop {
        let waited = start.elapsed();
        let r = view(timeout.saturating_sub(waited))?;
        if cond.holds_after(&r, Some(waited)) {
            return Ok(r);
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(crate::error::TimedOut(format!(
                "{} did not reach {cond} within {}s: {}",
                r.name,
                timeout.as_secs(),
                state_text(&r)
            ))
            .into());
        }
        std::thread::sleep(interval.min(timeout - elapsed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::fixtures::*;

    fn c(s: &str) -> Condition {
        Condition::parse(s).unwrap()
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(
            c("fetch"),
            Condition {
                target: Target::Switch(SwitchKind::Fetch),
                on: true
            }
        );
        assert_eq!(c("attach-off").to_string(), "attach-off");
        assert_eq!(c("sync-on").to_string(), "sync-on");
        assert_eq!(c("uptodate").to_string(), "uptodate-on");
        for bad in [
            "",
            "-on",
            "fetch-",
            "fetch-maybe",
            "todo-primary",
            "is-uptodatex",
            "on",
            "attach-on-off",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mars_forms_of_conditions() {
        let sw = |k, on| Condition {
            target: Target::Switch(k),
            on,
        };
        assert_eq!(c("is-attached"), sw(SwitchKind::Attach, true));
        assert_eq!(c("has-fetch-1"), sw(SwitchKind::Fetch, true));
        assert_eq!(c("is-copying-0"), sw(SwitchKind::Fetch, false));
        assert_eq!(c("connect-off"), sw(SwitchKind::Fetch, false));
        assert_eq!(c("replaying"), sw(SwitchKind::Replay, true));
        assert_eq!(
            c("todo-sync-off"),
            Condition {
                target: Target::Todo(SwitchKind::Sync),
                on: false
            }
        );
        assert_eq!(c("todo-sync-off").to_string(), "todo-sync-off");
        assert_eq!(
            c("is-secondary"),
            Condition {
                target: Target::Primary,
                on: false
            }
        );
        let r = secondary();
        assert!(c("is-secondary").holds(&r));
        assert!(!c("is-primary").holds(&r));
        assert!(c("todo-fetch").holds(&r));
        assert!(c("is-device-off").holds(&r));
    }

    #[test]
    fn on_conditions() {
        let mut r = secondary();
        for s in ["attach", "fetch", "replay", "sync", "uptodate"] {
            assert!(c(s).holds(&r), "{s}");
            assert!(!c(&format!("{s}-off")).holds(&r), "{s}-off");
        }
        // Work in progress: lowercase letters, or progress still to go.
        r.flags = "dCaSfr".into();
        assert!(!c("attach").holds(&r));
        assert!(!c("fetch").holds(&r));
        assert!(!c("replay").holds(&r));
        r.flags = "dCASFR".into();
        r.fetch = Some(progress(1, 2, 0));
        r.replay = Some(progress(2, 2, 0));
        assert!(!c("fetch").holds(&r));
        assert!(c("replay").holds(&r));
        // Sync: consistent and no sync running.
        r.sync = Some(progress(0, 10, 0));
        assert!(!c("sync").holds(&r));
        r.sync = None;
        r.consistent = false;
        assert!(!c("sync").holds(&r));
        // Up to date but stuck is not up to date.
        r.stuck = Some("replay stopped".into());
        assert!(!c("uptodate").holds(&r));
        assert!(c("uptodate-off").holds(&r));
    }

    #[test]
    fn off_conditions() {
        let mut r = secondary();
        r.flags = "dCA---".into();
        assert!(c("sync-off").holds(&r));
        assert!(c("fetch-off").holds(&r));
        assert!(c("replay-off").holds(&r));
        // Attach switched off while the disk is still open: not detached yet.
        r.flags = "dC----".into();
        assert!(!c("attach-off").holds(&r));
        r.flags = "------".into();
        assert!(c("attach-off").holds(&r));
        // A malformed flags field counts as all off rather than panicking.
        r.flags = String::new();
        assert!(c("attach-off").holds(&r));
        assert!(!c("fetch").holds(&r));
    }

    #[test]
    fn wait_polls_until_the_condition_holds() {
        let mut n = 0;
        let r = wait_until(
            c("fetch"),
            Duration::from_secs(10),
            Duration::from_millis(1),
            |_| {
                n += 1;
                let mut r = secondary();
                r.fetch = Some(progress(n, 3, 0));
                Ok(r)
            },
        )
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(r.fetch.unwrap().rest(), 0);
    }

    #[test]
    fn wait_times_out_with_the_state() {
        let mut r = secondary();
        r.disk_state = mars_api::DiskState::OutDatedF;
        r.flags = "dCASf-".into();
        r.stuck = Some("primary unreachable".into());
        let mut calls = 0;
        let e = wait_until(c("fetch"), Duration::ZERO, Duration::from_secs(1), |_| {
            calls += 1;
            Ok(r.clone())
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert_eq!(
            e.to_string(),
            "vm1 did not reach fetch-on within 0s: disk state OutDated[F], replication state \
             Replaying, flags dCASf-, stuck: primary unreachable"
        );
        // Errors from the daemon end the wait at once.
        let e = wait_until(c("sync"), Duration::from_secs(5), Duration::ZERO, |_| {
            anyhow::bail!("resource vm1 does not exist")
        })
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"));
    }
}
