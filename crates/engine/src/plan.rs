//! Decisions: log reclamation, the version-chain check between logfiles, and MARS's state names.

use std::collections::BTreeMap;
use std::time::Duration;

use mars_config::{format_size, HostName};

use crate::model::{ResourceMeta, Role};
use crate::reason::StuckKind;
use crate::version;

/// The lowest logfile number that some member still needs, so that every host may delete its
/// logfiles below it (`None`: no member pins anything).
///
/// A member pins what its report says (`pin`). Members that never reported pin nothing (a new
/// member starts its sync at the primary's current position). A member other than `me` whose
/// newest liveness stamp is older than `limit` (or unknown, `None` in `ages`) no longer pins: it
/// must not stall the others forever; when it returns, its logfiles are gone and it needs a
/// full sync, which it then reports.
pub fn reclaim_below(
    meta: &ResourceMeta,
    me: &HostName,
    ages: &BTreeMap<HostName, Duration>,
    limit: Duration,
) -> Option<u64> {
    meta.members
        .iter()
        .filter(|(h, _)| *h == me || ages.get(*h).is_some_and(|a| *a <= limit))
        .filter_map(|(_, m)| m.report.as_ref()?.pin)
        .min()
}

/// [`reclaim_below`] with the members that still pin given as a predicate (the engine's
/// liveness: reachable within `defaults/unreachable-limit`).
pub fn reclaim_below_by(
    meta: &ResourceMeta,
    me: &HostName,
    pinning: &dyn Fn(&HostName) -> bool,
) -> Option<u64> {
    meta.members
        .iter()
        .filter(|(h, _)| *h == me || pinning(h))
        .filter_map(|(_, m)| m.report.as_ref()?.pin)
        .min()
}

/// Every [`ChainCheck::Wait`] reason names the version link it waits for with these words, so
/// that [`member_state`] can tell from a report's `stuck` that the chain is not verified yet.
pub const LINK_WAIT: &str = "version link";

/// The outcome of checking logfile N's version link before replay moves on to N+1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    /// Our link equals the origin's: publish it and go on.
    Ok(String),
    /// The origin's link is not known yet (metadata still travelling).
    Wait(String),
    /// The histories differ: stop, with the reason.
    Mismatch(String),
}

/// The link this host computes for logfile `no` (written by `origin`, replayed to `len`).
/// Its previous link is our own for `no - 1`, else the designated primary's, else the
/// origin's (a replica that started after a full sync adopts theirs). `None` while none of
/// them is known (the metadata has not arrived yet): only logfile 1 and a logfile after a
/// deliberate hole (the origin's `chain-start`) start a chain, and a link computed without its
/// predecessor would look like a different history.
pub fn my_link(
    meta: &ResourceMeta,
    me: &HostName,
    no: u64,
    origin: &HostName,
    len: u64,
) -> Option<String> {
    let restart = meta.chain_starts.get(origin) == Some(&no);
    let prev = match no.checked_sub(1).filter(|p| *p > 0 && !restart) {
        None => "",
        Some(p) => meta
            .version(p, me)
            .or_else(|| meta.primary.as_ref().and_then(|h| meta.version(p, h)))
            .or_else(|| meta.version(p, origin))?,
    };
    Some(version::link(prev, no, origin, len))
}

/// Whether a version link says that logfile `no` of `origin` ends at `len`. Links are published
/// only for complete logfiles (by a primary for those it finished, by a replica once it
/// replayed one to its end), so such a link proves the logfile complete even when no source
/// said so to this host: the source of a handover straight back may have dropped its empty
/// newest logfile and hold no logfiles at all, so no `LogEnd` and no later logfile ever comes
/// (the old primary's `primary` waited its whole timeout, catching up with the empty start of
/// the logfile after; see `roles::promotion_from`).
pub fn complete_by_links(meta: &ResourceMeta, no: u64, origin: &HostName, len: u64) -> bool {
    meta.versions.get(&no).is_some_and(|links| {
        links.values().any(|l| {
            version::len_of(l) == Some(len) && version::origin_of(l).as_ref() == Some(origin)
        })
    })
}

/// May replay move past the end of logfile `no` (written by `origin`, `len` bytes replayed)?
///
/// A logfile this host wrote itself (as primary, before it became a replica again) is
/// compared with the designated primary's link instead: the next logfile comes from the
/// resource's current history, and if that history does not contain our logfile as we have it
/// (a failover from behind, a split brain), replay must stop here, before it applies a single
/// record of a logfile that continues another history. While the designated primary has not
/// published its link for `no` (it is still replaying it, or its logfile of that number is
/// still growing), replay waits. With nobody designated there is nobody to compare with.
pub fn next_file_check(
    meta: &ResourceMeta,
    me: &HostName,
    no: u64,
    origin: &HostName,
    len: u64,
) -> ChainCheck {
    let Some(mine) = my_link(meta, me, no, origin, len) else {
        return ChainCheck::Wait(format!(
            "waiting for the version link of logfile {}",
            no - 1
        ));
    };
    if origin == me {
        let Some(p) = meta.primary.as_ref().filter(|p| *p != me) else {
            return ChainCheck::Ok(mine);
        };
        return match meta.version(no, p) {
            // The designated primary never had this logfile: it acts as primary and its oldest
            // logfile is younger (it joined by a full sync after it; it cannot have deleted it,
            // since we still pin it), so no link of it will ever come. If nobody else has
            // another link for it, there is nothing to diverge from here (the end of the next
            // logfile is checked against its writer's link, which chains on ours).
            None => {
                let never_had = meta
                    .members
                    .get(p)
                    .and_then(|m| m.report.as_ref())
                    .filter(|r| r.role == Role::Primary)
                    .and_then(|r| r.logs.first())
                    .is_some_and(|(oldest, _)| *oldest > no);
                let others: Vec<&String> = meta
                    .versions
                    .get(&no)
                    .map(|l| l.iter().filter(|(h, _)| *h != me).map(|(_, v)| v).collect())
                    .unwrap_or_default();
                if never_had && (others.is_empty() || others.iter().any(|l| **l == mine)) {
                    ChainCheck::Ok(mine)
                } else {
                    ChainCheck::Wait(format!(
                        "waiting for the designated primary {p}'s version link of \
                         log-{no:09}-{origin}"
                    ))
                }
            }
            Some(theirs) if theirs == mine => ChainCheck::Ok(mine),
            Some(theirs) => ChainCheck::Mismatch(format!(
                "version mismatch after our own log-{no:09}-{origin}: ours {mine}, the \
                 designated primary {p}'s {theirs} (different histories: check for split brain)"
            )),
        };
    }
    match meta.version(no, origin) {
        None => ChainCheck::Wait(format!(
            "waiting for the version link of log-{no:09}-{origin}"
        )),
        Some(theirs) if theirs == mine => ChainCheck::Ok(mine),
        Some(theirs) => ChainCheck::Mismatch(format!(
            "version mismatch after log-{no:09}-{origin}: ours {mine}, {origin}'s {theirs} \
             (different histories: check for split brain)"
        )),
    }
}

/// May replay start applying logfile `no`, written by `origin` (another host), on top of our
/// logfile `no - 1`? Only if `origin`'s history has the same logfile `no - 1`: their links for
/// it must be equal. [`next_file_check`] compares at the *end* of a logfile, with the link of
/// that logfile's origin; this check covers the step into a logfile of a different origin,
/// whose predecessor the two hosts may hold differently (a host that left the primary role
/// after its last logfile was reclaimed, then followed a host of another history). Without it
/// the records of the new logfile are applied first and the mismatch found only at its end.
/// Found by the simulation (`mars-sim`).
///
/// Nothing to compare (first logfile, our own, or we have no link for `no - 1`, as after a full
/// sync that started at `no`): go. The origin's link not known yet: wait.
pub fn entry_check(meta: &ResourceMeta, me: &HostName, no: u64, origin: &HostName) -> ChainCheck {
    let Some(prev) = no.checked_sub(1).filter(|p| *p > 0) else {
        return ChainCheck::Ok(String::new());
    };
    let Some(mine) = meta.version(prev, me).filter(|_| origin != me) else {
        return ChainCheck::Ok(String::new());
    };
    match meta.version(prev, origin) {
        None => ChainCheck::Wait(format!(
            "waiting for {origin}'s version link of logfile {prev} before log-{no:09}-{origin}"
        )),
        Some(theirs) if theirs == mine => ChainCheck::Ok(mine.to_string()),
        Some(theirs) => ChainCheck::Mismatch(format!(
            "log-{no:09}-{origin} continues another history: our link of logfile {prev} is \
             {mine}, {origin}'s {theirs} (different histories: check for split brain)"
        )),
    }
}

/// MARS's view fields of one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    pub disk_state: String,
    pub repl_state: String,
    pub flags: String,
    /// Bytes of the primary's log the member has not applied.
    pub behind: Option<u64>,
}

/// Derives disk state, replication state and flags of `host` from the metadata.
/// `alive(h)`: h's liveness stamp is within the view window.
pub fn member_state(
    meta: &ResourceMeta,
    host: &HostName,
    alive: &dyn Fn(&HostName) -> bool,
) -> MemberState {
    let Some(m) = meta.members.get(host) else {
        return MemberState {
            disk_state: "NotJoined".into(),
            repl_state: "NotJoined".into(),
            flags: "------".into(),
            behind: None,
        };
    };
    let Some(r) = &m.report else {
        return MemberState {
            disk_state: "NotPresent".into(),
            repl_state: if alive(host) {
                "NotStarted"
            } else {
                "UnResponsive"
            }
            .into(),
            flags: "------".into(),
            behind: None,
        };
    };
    let t = m.todo;
    let primary = r.role == Role::Primary;
    let syncing = r.sync.is_some();
    let behind = r.applied.and_then(|p| meta.bytes_after(p));
    // Only the primary can say that a replica has everything: without its recent
    // confirmation a secondary counts as behind (paused fetch, lost link …). The confirmation
    // is about positions only: a replica that found its history different from its source's
    // (`forked`) is behind whatever the positions say (found by the simulation, `mars-sim`: a
    // replica forked at logfile N was confirmed at the start of N+1 and showed `UpToDate`).
    // Likewise a replica whose replay waits for a version link: whether its history is the
    // source's is not known yet.
    let kind = r.stuck_kind;
    let unverified = match kind {
        Some(k) => k == StuckKind::LinkWait,
        // A report of an older version: its text tells.
        None => r.stuck.as_deref().is_some_and(|s| s.contains(LINK_WAIT)),
    };
    let damaged = match kind {
        Some(k) => k == StuckKind::Damaged,
        None => r.stuck.as_deref().is_some_and(|s| s.contains("damaged")),
    };
    // And one whose published links differ from the designated primary's: another history,
    // even while its replay (paused, say) has not noticed yet.
    let diverged = meta.primary.as_ref().is_some_and(|p| {
        meta.versions
            .values()
            .any(|links| matches!((links.get(host), links.get(p)), (Some(a), Some(b)) if a != b))
    });
    // The confirmation must come from the resource's primary: the designated one, acting. A
    // host that still acts without being designated (its device open after a forced switch)
    // confirms its own history, which may not be the resource's (found by the simulation,
    // `mars-sim`: a designated replica confirmed by such a host looked UpToDate).
    let designated_acts = meta.primary.as_ref().is_some_and(|p| {
        p != host
            && meta
                .members
                .get(p)
                .and_then(|m| m.report.as_ref())
                .is_some_and(|pr| pr.role == Role::Primary)
    });
    let fetch_behind = !primary
        && (!r.caught_up || r.forked.is_some() || unverified || diverged || !designated_acts);
    let replay_behind = match (r.applied, r.log_end) {
        (Some(a), Some(e)) => !primary && a < e,
        _ => false,
    };
    let disk_state = if !r.attached {
        "Detached".to_string()
    } else if primary && r.emergency {
        "EmergencyMode".to_string()
    } else if let Some(s) = r.stuck.as_deref().filter(|_| damaged) {
        format!("DefectiveLog[{}]", s.split(':').next().unwrap_or(s))
    } else if primary && r.stuck.is_some() {
        // The primary reports an I/O error of its volume (writeback or log).
        "DefectiveDisk".into()
    } else if r.needs_sync {
        "Orphan".into()
    } else if syncing || !r.consistent {
        "InConsistent".into()
    } else if primary && r.dirty_bytes > 0 {
        format!("WriteBack[{}]", format_size(r.dirty_bytes))
    } else if primary {
        "UpToDate".into()
    } else {
        match (fetch_behind, replay_behind) {
            (true, true) => "OutDated[FR]".into(),
            (true, false) => "OutDated[F]".into(),
            (false, true) => "OutDated[R]".into(),
            (false, false) => "UpToDate".into(),
        }
    };
    let primary_alive = meta.primary.as_ref().is_some_and(alive);
    let repl_state = if !alive(host) {
        "UnResponsive"
    } else if !r.attached {
        "NotStarted"
    } else if primary && r.emergency {
        "EmergencyMode"
    } else if primary && meta.primary.as_ref() != Some(host) {
        // Another host (or nobody) is designated, but the device is still open here.
        "RemainsPrimary"
    } else if primary {
        "Replicating"
    } else if meta.primary.as_ref() == Some(host) {
        // Designated, still catching up (or waiting for the old primary to leave).
        "NotYetPrimary"
    } else if syncing && !t.sync {
        "PausedSync"
    } else if syncing && r.sync.as_ref().is_some_and(|s| s.running) {
        "Syncing"
    } else if !t.fetch {
        "PausedFetch"
    } else if !t.replay {
        "PausedReplay"
    } else if meta.primary.is_none() {
        "NoPrimaryDesignated"
    } else if !primary_alive {
        "PrimaryUnreachable"
    } else if r.needs_sync {
        "Orphan"
    } else if syncing {
        "Syncing"
    } else {
        "Replaying"
    }
    .to_string();
    // D C A S F R: uppercase = on and done, lowercase = on and in progress, '-' = off.
    let flag = |on: bool, busy: bool, c: char| {
        if !on {
            '-'
        } else if busy {
            c.to_ascii_lowercase()
        } else {
            c
        }
    };
    let flags: String = [
        if !r.attached {
            '-'
        } else if primary {
            'D'
        } else {
            'd'
        },
        if r.consistent && !syncing {
            'C'
        } else if syncing {
            'c'
        } else {
            '-'
        },
        flag(t.attach, t.attach && !r.attached, 'A'),
        flag(t.sync, syncing, 'S'),
        flag(t.fetch, fetch_behind, 'F'),
        flag(t.replay, replay_behind, 'R'),
    ]
    .into_iter()
    .collect();
    MemberState {
        disk_state,
        repl_state,
        flags,
        behind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Member, Report, SyncReport, Todo};
    use mars_config::ResourceName;
    use mars_txlog::LogPos;

    fn h(s: &str) -> HostName {
        HostName::new(s).unwrap()
    }

    fn meta() -> ResourceMeta {
        let mut m = ResourceMeta::empty(ResourceName::new("r").unwrap());
        m.size = Some(1 << 20);
        m.primary = Some(h("a"));
        let prim = Report {
            role: Role::Primary,
            attached: true,
            consistent: true,
            applied: Some(LogPos::new(4, 50)),
            log_end: Some(LogPos::new(4, 50)),
            logs: vec![(3, 100), (4, 50)],
            pin: Some(4),
            ..Default::default()
        };
        m.members.insert(
            h("a"),
            Member {
                disk: "/a".into(),
                todo: Todo::default(),
                report: Some(prim),
                emergency_limit: None,
                ..Default::default()
            },
        );
        let sec = Report {
            attached: true,
            caught_up: false,
            consistent: true,
            applied: Some(LogPos::new(3, 40)),
            log_end: Some(LogPos::new(4, 10)),
            pin: Some(3),
            ..Default::default()
        };
        m.members.insert(
            h("b"),
            Member {
                disk: "/b".into(),
                todo: Todo::default(),
                report: Some(sec),
                emergency_limit: None,
                ..Default::default()
            },
        );
        m
    }

    #[test]
    fn reclamation_waits_for_the_slowest_reachable_member() {
        let m = meta();
        let mut ages = BTreeMap::new();
        ages.insert(h("b"), Duration::from_secs(5));
        let limit = Duration::from_secs(60);
        assert_eq!(reclaim_below(&m, &h("a"), &ages, limit), Some(3));
        // b unreachable beyond the limit: it no longer pins.
        ages.insert(h("b"), Duration::from_secs(61));
        assert_eq!(reclaim_below(&m, &h("a"), &ages, limit), Some(4));
        // Unknown age counts as unreachable, but a host always pins for itself.
        assert_eq!(reclaim_below(&m, &h("b"), &BTreeMap::new(), limit), Some(3));
    }

    #[test]
    fn states_and_flags() {
        let mut m = meta();
        let all = |_: &HostName| true;
        let a = member_state(&m, &h("a"), &all);
        assert_eq!(
            (
                a.disk_state.as_str(),
                a.repl_state.as_str(),
                a.flags.as_str()
            ),
            ("UpToDate", "Replicating", "DCASFR")
        );
        let b = member_state(&m, &h("b"), &all);
        assert_eq!(
            (
                b.disk_state.as_str(),
                b.repl_state.as_str(),
                b.flags.as_str()
            ),
            ("OutDated[FR]", "Replaying", "dCASfr")
        );
        assert_eq!(b.behind, Some(60 + 50));
        m.members.get_mut(&h("b")).unwrap().todo.replay = false;
        let b = member_state(&m, &h("b"), &all);
        assert_eq!(
            (b.repl_state.as_str(), b.flags.as_str()),
            ("PausedReplay", "dCASf-")
        );
        let r = m.members.get_mut(&h("b")).unwrap().report.as_mut().unwrap();
        r.sync = Some(SyncReport {
            start: None,
            done: 0,
            size: 1 << 20,
            transferred: 0,
            running: true,
            rate: 0,
        });
        r.consistent = false;
        let b = member_state(&m, &h("b"), &all);
        assert_eq!(
            (b.disk_state.as_str(), b.repl_state.as_str()),
            ("InConsistent", "Syncing")
        );
        let none = |x: &HostName| x.as_str() == "b";
        m.members
            .get_mut(&h("b"))
            .unwrap()
            .report
            .as_mut()
            .unwrap()
            .sync = None;
        m.members.get_mut(&h("b")).unwrap().todo.replay = true;
        let b = member_state(&m, &h("b"), &none);
        assert_eq!(b.repl_state, "PrimaryUnreachable");
    }

    /// A host that wrote logfile N itself and is a replica now (a restarted ex-primary, or one
    /// that left the role) may go on to N+1 only if the designated primary's history has the
    /// same N: found by the simulation (`mars-sim`), where an old primary restarted after a
    /// forced failover replayed its own last logfile, moved on without any comparison and
    /// applied the new primary's next logfile on top of its own divergent one.
    #[test]
    fn own_logfile_is_checked_against_the_designated_primary() {
        let mut m = meta();
        let (a, b) = (h("a"), h("b"));
        let l4 = version::link("", 4, &a, 50);
        m.versions
            .entry(4)
            .or_default()
            .insert(a.clone(), l4.clone());
        // b wrote logfile 5 (19 records) as primary; a took over by force with only the
        // first 6 of them and is the designated primary now; b replays as a replica.
        m.primary = Some(a.clone());
        let b5_long = version::link(&l4, 5, &b, 19);
        let a5_short = version::link(&l4, 5, &b, 6);
        m.versions
            .entry(4)
            .or_default()
            .insert(b.clone(), l4.clone());
        m.versions
            .entry(5)
            .or_default()
            .insert(b.clone(), b5_long.clone());
        // No link of the designated primary for 5 yet: wait, do not move on.
        assert!(matches!(
            next_file_check(&m, &b, 5, &b, 19),
            ChainCheck::Wait(w) if w.contains("designated primary a")
        ));
        m.versions.entry(5).or_default().insert(a.clone(), a5_short);
        assert!(matches!(
            next_file_check(&m, &b, 5, &b, 19),
            ChainCheck::Mismatch(_)
        ));
        // Same history: go on.
        m.versions
            .entry(5)
            .or_default()
            .insert(a.clone(), b5_long.clone());
        assert_eq!(
            next_file_check(&m, &b, 5, &b, 19),
            ChainCheck::Ok(b5_long.clone())
        );
        // A designated primary that never had logfile 5 (its oldest is 6: it joined later)
        // publishes no link for it: nothing to wait for.
        m.versions.get_mut(&5).unwrap().remove(&a);
        m.members.get_mut(&a).unwrap().report.as_mut().unwrap().logs = vec![(6, 10)];
        assert!(matches!(
            next_file_check(&m, &b, 5, &b, 19),
            ChainCheck::Ok(_)
        ));
        m.versions
            .entry(5)
            .or_default()
            .insert(a.clone(), b5_long.clone());
        // The designated primary itself (and a resource without one) checks nothing more.
        assert!(matches!(
            next_file_check(&m, &a, 6, &a, 3),
            ChainCheck::Ok(_)
        ));
        m.primary = None;
        assert!(matches!(
            next_file_check(&m, &b, 5, &b, 7),
            ChainCheck::Ok(_)
        ));
    }

    /// Stepping into a logfile of another origin needs that origin's link of the previous
    /// logfile to equal ours (see [`entry_check`]).
    #[test]
    fn entering_a_logfile_of_another_history_is_refused_before_any_record() {
        let mut m = meta();
        let (a, b) = (h("a"), h("b"));
        let ours = version::link("", 3, &a, 7);
        let theirs = version::link("", 3, &b, 4);
        m.versions
            .entry(3)
            .or_default()
            .insert(a.clone(), ours.clone());
        // Nothing known of b's logfile 3 yet: wait.
        assert!(matches!(entry_check(&m, &a, 4, &b), ChainCheck::Wait(_)));
        m.versions.entry(3).or_default().insert(b.clone(), theirs);
        assert!(matches!(
            entry_check(&m, &a, 4, &b),
            ChainCheck::Mismatch(w) if w.contains("another history")
        ));
        m.versions
            .entry(3)
            .or_default()
            .insert(b.clone(), ours.clone());
        assert_eq!(entry_check(&m, &a, 4, &b), ChainCheck::Ok(ours));
        // Our own logfile, the first one, or no link of ours to compare: go.
        assert!(matches!(entry_check(&m, &a, 4, &a), ChainCheck::Ok(_)));
        assert!(matches!(entry_check(&m, &a, 1, &b), ChainCheck::Ok(_)));
        assert!(matches!(entry_check(&m, &h("c"), 4, &b), ChainCheck::Ok(_)));
    }

    /// A replica whose history differs from its source's is never `UpToDate`, even when the
    /// primary confirmed its position.
    #[test]
    fn a_forked_replica_is_not_up_to_date() {
        let mut m = meta();
        let all = |_: &HostName| true;
        let r = m.members.get_mut(&h("b")).unwrap().report.as_mut().unwrap();
        r.caught_up = true;
        r.applied = Some(LogPos::new(4, 10));
        r.log_end = Some(LogPos::new(4, 10));
        assert_eq!(member_state(&m, &h("b"), &all).disk_state, "UpToDate");
        let r = m.members.get_mut(&h("b")).unwrap().report.as_mut().unwrap();
        r.forked = Some(3);
        assert_eq!(member_state(&m, &h("b"), &all).disk_state, "OutDated[F]");
        // Its published link of some logfile differs from the designated primary's.
        m.versions
            .entry(3)
            .or_default()
            .insert(h("a"), version::link("", 3, &h("a"), 100));
        m.versions
            .entry(3)
            .or_default()
            .insert(h("b"), version::link("", 3, &h("b"), 100));
        let r = m.members.get_mut(&h("b")).unwrap().report.as_mut().unwrap();
        r.forked = None;
        assert_eq!(member_state(&m, &h("b"), &all).disk_state, "OutDated[F]");
        m.versions.remove(&3);
        assert_eq!(member_state(&m, &h("b"), &all).disk_state, "UpToDate");
        // Confirmed, but the designated primary does not act (or is b itself): not up to date.
        m.primary = Some(h("b"));
        assert_eq!(member_state(&m, &h("b"), &all).disk_state, "OutDated[F]");
        m.primary = Some(h("a"));
        m.members
            .get_mut(&h("a"))
            .unwrap()
            .report
            .as_mut()
            .unwrap()
            .role = Role::Secondary;
        assert_eq!(member_state(&m, &h("b"), &all).disk_state, "OutDated[F]");
        m.members
            .get_mut(&h("a"))
            .unwrap()
            .report
            .as_mut()
            .unwrap()
            .role = Role::Primary;
        // Waiting for a link: not verified yet, so not up to date either.
        m.members
            .get_mut(&h("b"))
            .unwrap()
            .report
            .as_mut()
            .unwrap()
            .forked = None;
        let ChainCheck::Wait(why) = next_file_check(&m, &h("b"), 3, &h("a"), 100) else {
            panic!("nobody has published a link yet: wait");
        };
        assert!(why.contains(LINK_WAIT));
        let r = m.members.get_mut(&h("b")).unwrap().report.as_mut().unwrap();
        r.stuck = Some(why);
        assert_eq!(member_state(&m, &h("b"), &all).disk_state, "OutDated[F]");
    }

    #[test]
    fn chain_check() {
        let mut m = meta();
        let (a, b) = (h("a"), h("b"));
        assert!(matches!(
            next_file_check(&m, &b, 3, &a, 100),
            ChainCheck::Wait(_)
        ));
        // Without the link of logfile 2, nobody can compute the one of 3.
        assert_eq!(my_link(&m, &a, 3, &a, 100), None);
        m.versions
            .entry(2)
            .or_default()
            .insert(a.clone(), version::link("", 2, &a, 50));
        let theirs = my_link(&m, &a, 3, &a, 100).expect("link");
        m.versions
            .entry(3)
            .or_default()
            .insert(a.clone(), theirs.clone());
        assert_eq!(next_file_check(&m, &b, 3, &a, 100), ChainCheck::Ok(theirs));
        // A different length (the origin wrote more than we have): mismatch.
        assert!(matches!(
            next_file_check(&m, &b, 3, &a, 90),
            ChainCheck::Mismatch(_)
        ));
    }
}
