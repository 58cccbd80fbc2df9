//! The values behind MARS's primitive macros, read from the view: switches, amounts, times,
//! membership, space and messages. Each function is named after the MARS macro (family) it
//! answers; where our view measures something differently, the doc comment says how.

use anyhow::{bail, Result};
use mars_api::{DiskState, Progress, ReplicaView, Role, SwitchKind};

use super::format::perl_num;
use super::Ctx;
use crate::view::{flag, flag_index};

/// MARS's `0`/`1`.
pub fn bit(b: bool) -> String {
    u8::from(b).to_string()
}

// ---- roles and switches ----

/// The designated primary, `None` for MARS's `(none)`.
pub fn designated<'a>(c: &Ctx<'a>) -> Result<Option<&'a str>> {
    Ok(c.r()?.primary.as_deref().filter(|p| *p != "(none)"))
}

/// `get-primary`: the designated primary, empty when none is (MARS turns `(none)` into "").
pub fn get_primary(c: &Ctx) -> Result<String> {
    Ok(designated(c)?.unwrap_or_default().to_string())
}

/// `todo-primary`: this host is the designated primary.
pub fn todo_primary(c: &Ctx) -> Result<bool> {
    Ok(designated(c)? == Some(c.host))
}

/// Who acts as primary: this host when its device is open, another member when the view
/// says so (it shows no role of a member that is not alive). The same `mars_unitgen::Roles`
/// answers `%is-primary{}` in templates, filled by marsd from its engine's state.
pub fn roles(c: &Ctx) -> Result<mars_unitgen::Roles> {
    let r = c.r()?;
    let mut roles = mars_unitgen::Roles::default();
    if r.role == Role::Primary {
        roles.acting.insert(c.host.to_string());
    }
    for m in &r.members {
        if m.host != c.host && m.role == Some(Role::Primary) {
            roles.acting.insert(m.host.clone());
        }
        roles.members.push(m.host.clone());
    }
    if roles.members.is_empty() {
        roles.members.push(c.host.to_string());
    }
    Ok(roles)
}

/// `is-primary` [HOST]: the host acts as primary (its device is open).
pub fn is_primary(c: &Ctx, host: &str) -> Result<bool> {
    Ok(roles(c)?.is_primary(host))
}

/// The member `host` of the resource, if it is one.
pub fn member<'a>(c: &Ctx<'a>, host: &str) -> Result<Option<&'a ReplicaView>> {
    Ok(c.r()?.members.iter().find(|m| m.host == host))
}

/// The flags field of `host` (this host: the resource's own).
fn flags_of<'a>(c: &Ctx<'a>, host: &str) -> Result<Option<&'a str>> {
    if host == c.host {
        return Ok(Some(&c.r()?.flags));
    }
    Ok(member(c, host)?.map(|m| m.flags.as_str()))
}

/// `is-SWITCH` [HOST]: the host does it. `is-sync`: a full sync runs (the switch is on and
/// the sync has not reached its end), as MARS's `does{sync}`; attach, fetch, replay: the
/// switch is on and its work is done (the uppercase letter in the flags).
pub fn is_switch(c: &Ctx, k: SwitchKind, host: &str) -> Result<bool> {
    let Some(f) = flags_of(c, host)? else {
        return Ok(false);
    };
    let letter = flag(f, flag_index(k));
    if k == SwitchKind::Sync {
        let running = if host == c.host {
            !reached(c, Job::Sync)?
        } else {
            member(c, host)?.is_some_and(|m| m.sync.as_ref().is_some_and(|p| p.rest() > 0))
        };
        return Ok(letter != '-' && running);
    }
    Ok(letter.is_ascii_uppercase())
}

/// `todo-SWITCH`: the switch is on (any letter but `-`).
pub fn todo_switch(c: &Ctx, k: SwitchKind) -> Result<bool> {
    Ok(crate::view::todo_on(c.r()?, k))
}

/// `nr-WHAT`: how many members do WHAT (`primary`, `secondary` or a switch's `is-`).
pub fn nr(c: &Ctx, what: &str) -> Result<usize> {
    let r = c.r()?;
    let hosts: Vec<&str> = if r.members.is_empty() {
        vec![c.host]
    } else {
        r.members.iter().map(|m| m.host.as_str()).collect()
    };
    match what {
        "primary" => return Ok(roles(c)?.nr_primary()),
        "secondary" => return Ok(roles(c)?.nr_secondary()),
        _ => {}
    }
    let mut n = 0;
    for h in hosts {
        n += usize::from(is_switch(c, switch(what)?, h)?);
    }
    Ok(n)
}

pub fn switch(w: &str) -> Result<SwitchKind> {
    match SwitchKind::ALL.into_iter().find(|k| k.as_str() == w) {
        Some(k) => Ok(k),
        None => bail!("no switch {w:?}"),
    }
}

/// `disk-present`: this host has a disk for the resource (it is a member).
pub fn disk_present(c: &Ctx) -> Result<bool> {
    Ok(!c.r()?.disk.as_os_str().is_empty())
}

/// `is-alive` [HOST]: the host's liveness is younger than the window; without a host the
/// designated primary's, without one this host's.
pub fn is_alive(c: &Ctx, host: Option<&str>) -> Result<bool> {
    let h = match host {
        Some(h) => h,
        None => designated(c)?.unwrap_or(c.host),
    };
    if h == c.host {
        return Ok(true);
    }
    if let Some(m) = c.view.members.iter().find(|m| m.host == h) {
        return Ok(m.alive);
    }
    Ok(member(c, h)?.is_some_and(|m| m.alive))
}

/// `is-emergency` [HOST]: the host's primary is in emergency mode (the log is full, writes
/// go to the disk only).
pub fn is_emergency(c: &Ctx, host: &str) -> Result<bool> {
    let r = c.r()?;
    if host == c.host {
        return Ok(r.disk_state == DiskState::EmergencyMode
            || member(c, host)?.is_some_and(|m| m.emergency));
    }
    Ok(member(c, host)?.is_some_and(|m| m.emergency))
}

// ---- amounts ----

pub use mars_unitgen::amount::{Job, THRESHOLD};

/// The amounts of the resource on this host, for MARS's formulas in `mars_unitgen::amount`
/// (the same computation answers `%fetch-rest{}` … in templates, from marsd's state).
pub fn amounts(c: &Ctx) -> Result<mars_unitgen::Amounts> {
    let r = c.r()?;
    let p = |p: &Progress| mars_unitgen::Progress {
        done: p.done,
        total: p.total,
        rate: p.rate,
    };
    Ok(mars_unitgen::Amounts {
        size: r.size,
        sync: r.sync.as_ref().map(p),
        fetch: r.fetch.as_ref().map(p),
        replay: r.replay.as_ref().map(p),
    })
}

/// `(size, pos)` of MARS's `WHAT-size` and `WHAT-pos` (`mars_unitgen::Amounts::amount`).
pub fn amount(c: &Ctx, w: Job) -> Result<(u64, u64)> {
    Ok(amounts(c)?.amount(w))
}

/// `WHAT-rest`: size minus position, never negative.
pub fn rest(c: &Ctx, w: Job) -> Result<u64> {
    Ok(amounts(c)?.rest(w))
}

/// `WHAT-reached`.
pub fn reached(c: &Ctx, w: Job) -> Result<bool> {
    Ok(amounts(c)?.reached(w))
}

/// `WHAT-almost-reached` [LIMIT]: MARS's formula, `int(pos / limit) >= int(size / 1000)`
/// with the limit 990 by default.
pub fn almost_reached(c: &Ctx, w: Job, limit: Option<&str>) -> Result<bool> {
    Ok(amounts(c)?.almost_reached(w, limit))
}

/// `WHAT-threshold-reached` [SIZE]: within the threshold of the end.
pub fn threshold_reached(c: &Ctx, w: Job, threshold: Option<&str>) -> Result<bool> {
    let t = match threshold {
        Some(t) => mars_config::parse_size(t)?,
        None => c.threshold,
    };
    Ok(amounts(c)?.threshold_reached(w, t))
}

/// `WHAT-percent` / `-permille`: MARS's `100.5 * pos / size`, capped; an empty amount is
/// complete.
pub fn fraction(c: &Ctx, w: Job, full: f64) -> Result<f64> {
    Ok(amounts(c)?.fraction(w, full))
}

/// `WHAT-rate` (bytes per second); `work-rate` is the larger of fetch's and replay's.
pub fn rate(c: &Ctx, w: Job) -> Result<u64> {
    Ok(amounts(c)?.rate(w))
}

/// `WHAT-remain`: seconds until done at the current rate; 0 when done, -1 when not moving;
/// `work-remain` is the sum of fetch's and replay's (as MARS adds them, -1s included).
pub fn remain(c: &Ctx, w: Job) -> Result<f64> {
    Ok(amounts(c)?.remain(w))
}

// ---- logfile numbers ----

/// `(replay-basenr, replay-lognr, fetch-lognr, work-lognr)`: the oldest logfile this host
/// keeps, the one replay is in, the newest fetched, the newest known. A primary: the logfile
/// written back and the one being written.
pub fn lognrs(c: &Ctx) -> Result<(u64, u64, u64, u64)> {
    let r = c.r()?;
    if let Some(l) = &r.log {
        let base = c
            .view
            .space
            .as_ref()
            .and_then(|s| s.resources.iter().find(|x| x.name == r.name))
            .and_then(|x| x.pins.iter().filter_map(|p| p.logfile).min())
            .unwrap_or(l.written_back.logfile);
        return Ok((
            base.min(l.written_back.logfile),
            l.written_back.logfile,
            l.appended.logfile,
            l.appended.logfile,
        ));
    }
    let logs = r.fetch.as_ref().or(r.replay.as_ref()).and_then(|p| p.logs);
    let applied = member(c, c.host)?
        .and_then(|m| m.applied)
        .map(|p| p.logfile);
    let replay = applied.or(logs.map(|l| l.first)).unwrap_or(0);
    let fetch = logs.map_or(replay, |l| l.last).max(replay);
    let base = logs.map_or(replay, |l| l.first).min(replay);
    Ok((base, replay, fetch, fetch))
}

// ---- times ----

/// Seconds since the epoch of the alive stamp of `host` (this host: now), -1 if unknown.
pub fn alive_timestamp(c: &Ctx, host: Option<&str>) -> Result<f64> {
    let h = match host {
        Some(h) => h,
        None => match designated(c)? {
            Some(p) => p,
            None => return Ok(-1.0),
        },
    };
    if h == c.host {
        return Ok(c.now);
    }
    Ok(c.view
        .members
        .iter()
        .find(|m| m.host == h)
        .and_then(|m| m.age_secs)
        .map_or(-1.0, |a| c.now - a))
}

/// Stamp of the newest fetch confirmation: now minus the time since the source last
/// confirmed that this replica has everything (MARS: the newest version link's stamp).
/// A primary: now.
pub fn fetch_timestamp(c: &Ctx) -> Result<f64> {
    let r = c.r()?;
    if r.role == Role::Primary {
        return Ok(c.now);
    }
    Ok(r.caught_up_ms.map_or(-1.0, |ms| c.now - ms as f64 / 1000.0))
}

/// This host's lag in seconds: the age of the oldest write it has not applied (0 when it is
/// not behind), -1 when unknown.
pub fn own_lag(c: &Ctx) -> Result<f64> {
    let r = c.r()?;
    if r.role == Role::Primary {
        return Ok(0.0);
    }
    Ok(member(c, c.host)?
        .and_then(|m| m.lag_secs)
        .map_or(-1.0, f64::trunc))
}

/// Stamp of replay: now minus this host's lag (MARS: the replay link's stamp).
pub fn replay_timestamp(c: &Ctx) -> Result<f64> {
    let lag = own_lag(c)?;
    Ok(if lag < 0.0 { -1.0 } else { c.now - lag })
}

/// `WHAT-timestamp` for alive, fetch, replay and work (the newer of fetch and replay).
pub fn timestamp(c: &Ctx, what: &str) -> Result<f64> {
    Ok(match what {
        "alive" => alive_timestamp(c, c.arg)?,
        "fetch" => fetch_timestamp(c)?,
        "replay" => replay_timestamp(c)?,
        _ => fetch_timestamp(c)?.max(replay_timestamp(c)?),
    })
}

/// `WHAT-age`: whole seconds since the stamp, -1 when unknown.
pub fn age(c: &Ctx, what: &str) -> Result<f64> {
    let t = timestamp(c, what)?;
    Ok(if t <= 0.0 {
        -1.0
    } else {
        (c.now - t).max(0.0).trunc()
    })
}

/// `WHAT-lag`: how far this host is behind the primary in seconds, -1 when unknown. For
/// replay and work the age of the oldest write not applied here; fetch: the same while there
/// is something to fetch; alive: how much older the primary's liveness is than ours.
pub fn lag(c: &Ctx, what: &str) -> Result<f64> {
    if designated(c)?.is_none() {
        return Ok(-1.0);
    }
    Ok(match what {
        "alive" => {
            let mine = alive_timestamp(c, Some(c.host))?;
            let prim = alive_timestamp(c, None)?;
            if prim <= 0.0 {
                -1.0
            } else {
                (mine - prim).max(0.0).trunc()
            }
        }
        "fetch" if rest(c, Job::Fetch)? == 0 => 0.0,
        _ => own_lag(c)?,
    })
}

// ---- messages ----

/// MARS's messages (`msg-*` links) of the resource, or of the host (`global`): key and text,
/// the key starting with `err-`, `wrn-` or `inf-`. Ours come from the view's error fields.
pub fn messages(c: &Ctx, global: bool) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if global {
        for m in c.view.members.iter().filter(|m| !m.this_host) {
            if let Some(e) = &m.error {
                out.push((format!("err-peer-{}", m.host), e.clone()));
            }
            if !m.alive {
                let age = m
                    .age_secs
                    .map_or("never heard from".into(), |a| format!("info {a:.1}s old"));
                out.push((format!("wrn-alive-{}", m.host), format!("NOT ALIVE, {age}")));
            } else if m.connected {
                out.push((format!("inf-peer-{}", m.host), "CONNECTED".into()));
            }
        }
        return Ok(out);
    }
    let r = c.r()?;
    if let Some(e) = &r.error {
        out.push(("err-resource".into(), e.clone()));
    }
    if let Some(e) = &r.device_error {
        out.push(("err-device".into(), e.clone()));
    }
    if let Some(s) = &r.stuck {
        out.push(("wrn-replication".into(), s.clone()));
    }
    if let Some(sb) = &r.split_brain {
        out.push((
            "wrn-split-brain".into(),
            crate::view::split_brain_text(&r.name, sb),
        ));
    }
    Ok(out)
}

/// `{all,the}-{pretty-,}{global-,}{KIND-,}msg`: `key: text` lines. `the-` leaves out what
/// MARS calls uninteresting (`OK…`); `pretty-` would rewrite timestamps, which ours do not
/// carry.
pub fn msg_lines(c: &Ctx, global: bool, kind: Option<&str>, the: bool) -> Result<String> {
    Ok(messages(c, global)?
        .into_iter()
        .filter(|(k, _)| kind.is_none_or(|p| k.starts_with(&format!("{p}-"))))
        .filter(|(_, v)| !(the && v.starts_with("OK")))
        .map(|(k, v)| format!("{k}: {v}\n"))
        .collect())
}

/// Count of `the-KIND-msg` lines.
pub fn msg_count(c: &Ctx, global: bool, kind: &str) -> Result<usize> {
    Ok(msg_lines(c, global, Some(kind), true)?.lines().count())
}

// ---- device ----

/// Where the local device is mounted: (mountpoint, fstype, options), from
/// `/proc/self/mounts` (MARS: `known-device-*`, this host only).
pub fn mount(c: &Ctx) -> Result<Option<(String, String, String)>> {
    let Some(dev) = &c.r()?.device else {
        return Ok(None);
    };
    Ok(c.src.mount_of(dev))
}

/// A number macro's text.
pub fn num(f: f64) -> String {
    perl_num(f)
}
