//! MARS's complex macros: the templates of its perl `marsadm` (`%complex_macros`), written
//! out in Rust over the primitives. Each function quotes what it reproduces; the text is
//! MARS's byte for byte where our view has the data (docs/mars-compatibility.md, "View macros").

use anyhow::Result;
use mars_api::{DiskState, SwitchKind};

use super::format::{f2, human_join, human_numbers, int_of, perl_num, progress_bar, seconds2human};
use super::prim::{self, Job};
use super::Ctx;

/// `diskstate`: the engine's MARS disk state, amounts as MARS prints them
/// (`WriteBack[72.500 MiB]`).
pub fn diskstate(c: &Ctx) -> Result<String> {
    let r = c.r()?;
    Ok(match r.disk_state {
        DiskState::WriteBack => {
            let wb = r
                .writeback_bytes
                .or(r.log.as_ref().map(|l| l.dirty_bytes))
                .unwrap_or(0);
            format!("WriteBack[{}]", human_join(&[wb as f64], " ", " "))
        }
        d => crate::view::disk_text(d, r.writeback_bytes, r.stuck.as_deref()),
    })
}

/// `replstate`: the engine's MARS replication state.
pub fn replstate(c: &Ctx) -> Result<String> {
    Ok(c.r()?.repl_state.to_string())
}

/// `flags`: `DCASFR`, computed by the engine as MARS's template does.
pub fn flags(c: &Ctx) -> Result<String> {
    Ok(c.r()?.flags.clone())
}

/// `role`: `Primary` (`ForcedPrimary` while more than one member acts as primary),
/// `NotYetPrimary`, `RemainsPrimary`, `Secondary`, or `None` without a disk.
pub fn role(c: &Ctx) -> Result<String> {
    if !prim::disk_present(c)? {
        return Ok("None".into());
    }
    let is = prim::is_primary(c, c.host)?;
    Ok(match (prim::todo_primary(c)?, is) {
        (true, true) if prim::nr(c, "primary")? > 1 => "ForcedPrimary",
        (true, true) => "Primary",
        (true, false) => "NotYetPrimary",
        (false, true) => "RemainsPrimary",
        (false, false) => "Secondary",
    }
    .into())
}

/// `todo-role`: what the designation asks of this host.
pub fn todo_role(c: &Ctx) -> Result<String> {
    Ok(match (prim::disk_present(c)?, prim::todo_primary(c)?) {
        (false, _) => "None",
        (true, true) => "Primary",
        (true, false) => "Secondary",
    }
    .into())
}

/// `primarynode`: this host when it is designated, else the designated primary ("" when
/// none).
pub fn primarynode(c: &Ctx) -> Result<String> {
    if prim::todo_primary(c)? {
        return Ok(c.host.to_string());
    }
    prim::get_primary(c)
}

/// `commstate`: how old the designated primary's information is, when older than the window.
pub fn commstate(c: &Ctx) -> Result<String> {
    let ts = prim::alive_timestamp(c, None)?;
    let comm = if ts <= 0.0 {
        -1.0
    } else {
        (c.now - ts).trunc()
    };
    Ok(if comm >= c.window as f64 {
        seconds2human(comm)
    } else {
        String::new()
    })
}

/// `outdated-flags`: `F` while fetch, `R` while replay has not reached its end.
pub fn outdated_flags(c: &Ctx) -> Result<String> {
    let mut s = String::new();
    if !prim::reached(c, Job::Fetch)? {
        s.push('F');
    }
    if !prim::reached(c, Job::Replay)? {
        s.push('R');
    }
    Ok(s)
}

/// `device-stats`: `Opened, MOUNTPOINT, …` or `Closed`. MARS continues with the device's
/// IOPS and requests in flight, which marsd does not measure: left out.
pub fn device_stats(c: &Ctx) -> Result<String> {
    let r = c.r()?;
    if r.open_count == 0 {
        return Ok("Closed".into());
    }
    let mut s = "Opened".to_string();
    if let Some((mp, _, _)) = prim::mount(c)? {
        s += &format!(", {mp}");
    }
    if let Some(e) = &r.device_error {
        s += &format!(", DEVICE_ERROR={e}");
    }
    Ok(s)
}

/// `device-info`: `  LocalDevice /dev/mars/RES [device-stats]` when the device exists.
pub fn device_info(c: &Ctx) -> Result<String> {
    Ok(match &c.r()?.device {
        Some(d) => format!("  LocalDevice {d} [{}]\n", device_stats(c)?),
        None => String::new(),
    })
}

/// `%human-numbers{}{ }{ }{A}{B}` split at the spaces: `(a, b, unit)`.
fn amounts(a: u64, b: u64) -> (String, String, &'static str) {
    let (v, u) = human_numbers(&[a as f64, b as f64]);
    (v[0].clone(), v[1].clone(), u)
}

/// `sync-line` (and `-1and1`, the same text):
/// `       > sync: 280.000/1024.000 MiB rate: 95.200 MiB/sec  remaining: 00:00:07 hrs`.
pub fn sync_line(c: &Ctx) -> Result<String> {
    let (size, pos) = prim::amount(c, Job::Sync)?;
    Ok(format!(
        "       > sync: {} rate: {}/sec  remaining: {} hrs\n",
        human_join(&[pos as f64, size as f64], "/", " "),
        human_join(&[prim::rate(c, Job::Sync)? as f64], "/", " "),
        seconds2human(prim::remain(c, Job::Sync)?)
    ))
}

/// `syncinfo` (`-1and1` the same): the progress bar line, then `sync-line`.
pub fn syncinfo(c: &Ctx) -> Result<String> {
    let (size, pos) = prim::amount(c, Job::Sync)?;
    let (a, b, u) = amounts(pos, size);
    let (rv, ru) = human_numbers(&[prim::rate(c, Job::Sync)? as f64]);
    Ok(format!(
        "     syncing: {}  {}%  ({}/{}){u}  rate: {} {ru}/sec  remaining: {} hrs\n{}",
        progress_bar(20.0, pos as f64, 0.0, size as f64),
        f2(&perl_num(prim::fraction(c, Job::Sync, 100.0)?)),
        int_of(&a),
        int_of(&b),
        f2(&rv[0]),
        seconds2human(prim::remain(c, Job::Sync)?),
        sync_line(c)?
    ))
}

/// `fetch-line`: `       > fetch: 2.000 MiB[ age: …][ lag: …] rate: 1.000 MiB/s remaining: …`;
/// `-1and1`: `… rate: R/sec  remaining: T hrs`. As MARS, a fetch with something left whose
/// age is beyond `--window` and `--stuck-seconds` adds the warning `replay of RES appears to be
/// stuck for ~AGE` (MARS's text; stderr).
pub fn fetch_line(c: &Ctx, one_and_one: bool) -> Result<String> {
    let amount = human_join(&[prim::rest(c, Job::Fetch)? as f64], "/", " ");
    let rate = human_join(&[prim::rate(c, Job::Fetch)? as f64], "/", " ");
    let remain_n = prim::remain(c, Job::Fetch)?;
    let remain = seconds2human(remain_n);
    if one_and_one {
        return Ok(format!(
            "       > fetch: {amount} rate: {rate}/sec  remaining: {remain} hrs\n"
        ));
    }
    let w = c.window as f64;
    let my_age = prim::age(c, "fetch")?;
    let has_age = remain_n != 0.0 && my_age >= w;
    // MARS also asks `%is-module-loaded{}`: marsd answered this view, so it runs.
    if has_age && my_age > c.stuck_seconds as f64 {
        c.warnings.borrow_mut().push(format!(
            "replay of {} appears to be stuck for ~{}\n",
            c.r()?.name,
            seconds2human(my_age)
        ));
    }
    let age = if has_age {
        format!(" age: {}", seconds2human(my_age))
    } else {
        String::new()
    };
    let lag_n = prim::lag(c, "fetch")?;
    let lag = if remain_n != 0.0 && lag_n >= w {
        format!(" lag: {}", seconds2human(lag_n))
    } else {
        String::new()
    };
    Ok(format!(
        "       > fetch: {amount}{age}{lag} rate: {rate}/s remaining: {remain}\n"
    ))
}

/// `replay-line`: `       > replay: 5.000 MiB[ age: …] rate: … remaining: …`.
pub fn replay_line(c: &Ctx, one_and_one: bool) -> Result<String> {
    let amount = human_join(&[prim::rest(c, Job::Replay)? as f64], "/", " ");
    let rate = human_join(&[prim::rate(c, Job::Replay)? as f64], "/", " ");
    let remain_n = prim::remain(c, Job::Replay)?;
    let remain = seconds2human(remain_n);
    if one_and_one {
        return Ok(format!(
            "       > replay: {amount} rate: {rate}/sec  remaining: {remain} hrs\n"
        ));
    }
    let a = prim::age(c, "replay")?;
    let age = if remain_n != 0.0 && a >= c.window as f64 {
        format!(" age: {}", seconds2human(a))
    } else {
        String::new()
    };
    Ok(format!(
        "       > replay: {amount}{age} rate: {rate}/s remaining: {remain}\n"
    ))
}

/// `replinfo`: `     replaying: [bar]  P%  (a/b)UNIT  logs: [r::f..w]`, then the fetch and
/// replay lines; `-1and1`: `logs: [r..f]` and the `-1and1` lines.
pub fn replinfo(c: &Ctx, one_and_one: bool) -> Result<String> {
    let (fetch_size, fetch_pos) = prim::amount(c, Job::Fetch)?;
    let (_, replay_pos) = prim::amount(c, Job::Replay)?;
    let (a, b, u) = amounts(replay_pos, fetch_size);
    let (_, rnr, fnr, wnr) = prim::lognrs(c)?;
    let logs = if one_and_one {
        format!("{rnr}..{fnr}")
    } else {
        let mut l = rnr.to_string();
        if fnr > rnr {
            l += &format!("::{fnr}");
        }
        if wnr > fnr {
            l += &format!("..{wnr}");
        }
        l
    };
    Ok(format!(
        "     replaying: {}  {}%  ({}/{}){u}  logs: [{logs}]\n{}{}",
        progress_bar(20.0, replay_pos as f64, fetch_pos as f64, fetch_size as f64),
        f2(&perl_num(prim::fraction(c, Job::Work, 100.0)?)),
        int_of(&a),
        int_of(&b),
        fetch_line(c, one_and_one)?,
        replay_line(c, one_and_one)?
    ))
}

/// `resource-errors` (`-1and1` the same for us): the resource's error and warning messages.
/// MARS's FILE sections (the kernel's status files) have no counterpart: every message of
/// ours is a "link" message; INFOS need `--verbose`.
pub fn resource_errors(c: &Ctx) -> Result<String> {
    let mut s = String::new();
    let errs = prim::msg_count(c, false, "err")?;
    if errs > 0 {
        s += &format!("ERRORS   LNK  ({errs}):\n");
        s += &prim::msg_lines(c, false, Some("err"), true)?;
    }
    let wrns = prim::msg_count(c, false, "wrn")?;
    if wrns > 0 {
        s += &format!("WARNINGS LNK  ({wrns}):\n");
        s += &prim::msg_lines(c, false, Some("wrn"), true)?;
    }
    Ok(s)
}

/// `[N/M]`: the members of the resource and the hosts of the cluster.
fn peers(c: &Ctx) -> Result<String> {
    let r = c.r()?;
    Ok(format!(
        "[{}/{}]",
        r.members.len().max(1),
        c.view.members.len().max(1)
    ))
}

/// `default`, MARS's `view`: device info, the one-line state
/// `  RES [N/M] diskstate replstate flags role primarynode commstate`, hints on disk sizes,
/// the sync and replication progress of a secondary, the messages.
pub fn default(c: &Ctx) -> Result<String> {
    let mut s = device_info(c)?;
    if !prim::disk_present(c)? {
        return Ok(s);
    }
    let r = c.r()?;
    s += &format!(
        "  {} {} {} {} {} {} {} {}\n",
        r.name,
        peers(c)?,
        diskstate(c)?,
        replstate(c)?,
        flags(c)?,
        role(c)?,
        primarynode(c)?,
        commstate(c)?
    );
    if let Some(d) = prim::member(c, c.host)?.and_then(|m| m.disk_size_bytes) {
        if d.saturating_sub(r.size) > prim::THRESHOLD {
            s += &format!(
                "     Hint: you are wasting {} on disk {}\n",
                human_join(&[(d - r.size) as f64], " ", " "),
                r.disk.display()
            );
        }
    }
    if let Some(p) = possible_size(c)? {
        if p > r.size {
            s += &format!(
                "     Hint: marsadm resize would increase resource {} by {}\n",
                r.name,
                human_join(&[(p - r.size) as f64], " ", " ")
            );
        }
    }
    if !prim::is_primary(c, c.host)? && prim::is_switch(c, SwitchKind::Attach, c.host)? {
        if !prim::reached(c, Job::Sync)? {
            s += &syncinfo(c)?;
        }
        if !prim::reached(c, Job::Work)? {
            s += &replinfo(c, false)?;
        }
    }
    s += &resource_errors(c)?;
    Ok(s)
}

/// `resource-possible-size`: the smallest disk among the members (what `resize` could grow
/// to); `None` while a member's disk size is unknown.
pub fn possible_size(c: &Ctx) -> Result<Option<u64>> {
    let r = c.r()?;
    if r.members.is_empty() {
        return Ok(None);
    }
    Ok(r.members
        .iter()
        .map(|m| m.disk_size_bytes)
        .collect::<Option<Vec<u64>>>()
        .and_then(|v| v.into_iter().min()))
}

/// `default-resource`: `RES 1024.000 MiB [N/M]`.
pub fn default_resource(c: &Ctx) -> Result<String> {
    let r = c.r()?;
    Ok(format!(
        "{} {} {}",
        r.name,
        human_join(&[r.size as f64], " ", " "),
        peers(c)?
    ))
}

/// `diskstate-1and1`: `Uptodate`, `Outdated[FR]`, `Inconsistent` or `Detached`.
pub fn diskstate_1and1(c: &Ctx) -> Result<String> {
    if !prim::disk_present(c)? || !prim::is_switch(c, SwitchKind::Attach, c.host)? {
        return Ok("Detached".into());
    }
    let almost_consistent = c.r()?.consistent && prim::rest(c, Job::Sync)? == 0;
    Ok(if !almost_consistent {
        "Inconsistent".into()
    } else if prim::reached(c, Job::Work)? {
        "Uptodate".into()
    } else {
        format!("Outdated[{}]", outdated_flags(c)?)
    })
}

/// `replstate-1and1`.
pub fn replstate_1and1(c: &Ctx) -> Result<String> {
    if !prim::disk_present(c)? {
        return Ok("NotJoined".into());
    }
    if prim::is_primary(c, c.host)? {
        return Ok("Replicating".into());
    }
    if !prim::is_alive(c, None)? {
        return Ok("PrimaryUnreachable".into());
    }
    Ok(
        if !prim::reached(c, Job::Sync)? && !prim::todo_switch(c, SwitchKind::Sync)? {
            "PausedSync"
        } else if prim::is_switch(c, SwitchKind::Sync, c.host)? {
            "Syncing"
        } else if !(prim::todo_switch(c, SwitchKind::Fetch)?
            && prim::todo_switch(c, SwitchKind::Replay)?)
        {
            "PausedReplay"
        } else {
            "Replaying"
        }
        .into(),
    )
}

/// `flags-1and1`: `-SFR-`, the letters of the switches that are on.
pub fn flags_1and1(c: &Ctx) -> Result<String> {
    let l = |k: SwitchKind, ch: char| -> Result<char> {
        Ok(if prim::todo_switch(c, k)? { ch } else { '-' })
    };
    Ok(format!(
        "-{}{}{}-",
        l(SwitchKind::Sync, 'S')?,
        l(SwitchKind::Fetch, 'F')?,
        l(SwitchKind::Replay, 'R')?
    ))
}

/// `role-1and1`: `Primary` or `Secondary`.
pub fn role_1and1(c: &Ctx) -> Result<String> {
    Ok(if prim::disk_present(c)? && prim::is_primary(c, c.host)? {
        "Primary"
    } else {
        "Secondary"
    }
    .into())
}

/// `actual-primary`: the member acting as primary ("" when none).
pub fn actual_primary(c: &Ctx) -> Result<String> {
    if prim::is_primary(c, c.host)? {
        return Ok(c.host.to_string());
    }
    Ok(c.r()?
        .members
        .iter()
        .find(|m| m.role == Some(mars_api::Role::Primary))
        .map(|m| m.host.clone())
        .unwrap_or_default())
}

/// `primarynode-1and1`: this host if it acts as primary, else the acting primary, else `-`.
pub fn primarynode_1and1(c: &Ctx) -> Result<String> {
    if !prim::disk_present(c)? {
        return Ok("-".into());
    }
    let a = actual_primary(c)?;
    Ok(if a.is_empty() { "-".into() } else { a })
}

/// `1and1`: the 1&1 variant of `default`.
pub fn one_and_one(c: &Ctx) -> Result<String> {
    let r = c.r()?;
    let mut s = format!(
        "  {} {} {} {} {} {}\n",
        r.name,
        diskstate_1and1(c)?,
        replstate_1and1(c)?,
        flags_1and1(c)?,
        role_1and1(c)?,
        primarynode_1and1(c)?
    );
    let attached = prim::is_switch(c, SwitchKind::Attach, c.host)?;
    if attached && !prim::reached(c, Job::Sync)? {
        s += &syncinfo(c)?;
    }
    if attached && !prim::threshold_reached(c, Job::Work, None)? {
        s += &replinfo(c, true)?;
    }
    s += &resource_errors(c)?;
    Ok(s)
}

/// `comminfo` (`default-global`): the host's communication problems.
pub fn comminfo(c: &Ctx) -> Result<String> {
    let txt: String = prim::msg_lines(c, true, None, true)?
        .lines()
        .filter(|l| !l.contains("CONNECTED"))
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(if txt.is_empty() {
        txt
    } else {
        format!("++++++++++++ Global / Communication Status ++++++++++++\n{txt}")
    })
}

/// `default-header`: the digests in use (mars compresses nothing, so no compression lines),
/// and the global sync limit when one is set.
pub fn default_header(c: &Ctx) -> Result<String> {
    let d = super::LOG_DIGEST;
    let mut s = format!("used-log-digest=\"{d}\"\n");
    // MARS prints the log digest on this line too.
    s += &format!("used-net-digest=\"{d}\"\n");
    if let Some(l) = c.src.link(super::SYNC_LIMIT_KEY)?.filter(|l| !l.is_empty()) {
        s += &format!("   HINT: the global-sync-limit-value is set to \"{l}\"\n");
    }
    Ok(s)
}

/// `state`, `cstate`, `dstate`, `status`: MARS leaves these DRBD look-alikes to the user.
pub fn nyi(c: &Ctx) -> Result<String> {
    Ok(format!("NYI Please override macro %{}{{}}", c.name))
}
