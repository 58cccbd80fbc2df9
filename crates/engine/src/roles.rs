//! Roles: whom a replica follows, when a host may take over the primary role, and whether the
//! members' histories have forked (split brain).
//!
//! The *designated* primary is the single value of `resource-RES/primary`; the *actual* primary
//! is a member reporting `role: primary` (it has its volume open). They differ during a
//! handover (the old one has not left yet, the new one is still catching up), after a forced
//! failover while the old primary still has its device open, and after `secondary`.
//!
//! A planned handover to B, as every host sees it in the metadata:
//!
//! ```text
//!  B: primary=B ──► A: designated elsewhere, device closed ─► leaves the role (log complete,
//!                     version links published, becomes a replica)
//!  B: nobody else acts as primary, replayed up to the newest end any member reports
//!     ─► opens its volume in a new logfile ─► A and the others follow B
//! ```
//!
//! A forced switch skips the waiting: B takes what it has replayed. If the old primary wrote
//! more, the histories fork; the version links (one per logfile and host) then differ, which is
//! how [`split_brain`] finds it.

use std::collections::BTreeMap;

use mars_config::HostName;
use mars_txlog::LogPos;

use crate::model::{ResourceMeta, Role};
use crate::plan::complete_by_links;
use crate::reason::PromotionWait;
use crate::version;

/// Members other than `me` that report acting as primary.
pub fn actual_primaries<'a>(
    meta: &'a ResourceMeta,
    me: &'a HostName,
) -> impl Iterator<Item = &'a HostName> + 'a {
    meta.members.iter().filter_map(move |(h, m)| {
        (h != me && m.report.as_ref().is_some_and(|r| r.role == Role::Primary)).then_some(h)
    })
}

/// The member a replica on `me` fetches from, given the end of its newest local copy.
///
/// 1. The designated primary once it acts as primary;
/// 2. otherwise a member that still acts as primary (an old primary whose device is still
///    open, or one that has not yet left during a handover: the new one catches up from it);
/// 3. otherwise, while nobody acts as primary (handover in progress, or after `secondary`),
///    the reachable member that reports the newest log end beyond ours: the last primary's
///    final logfile is complete there and the next primary must have all of it.
pub fn fetch_source(
    meta: &ResourceMeta,
    me: &HostName,
    fetched: Option<LogPos>,
    alive: &dyn Fn(&HostName) -> bool,
) -> Option<HostName> {
    let acting: Vec<&HostName> = actual_primaries(meta, me).collect();
    if let Some(p) = meta.primary.as_ref().filter(|p| acting.contains(p)) {
        return Some(p.clone());
    }
    if let Some(p) = acting.iter().find(|h| alive(h)).or(acting.first()) {
        return Some((*p).clone());
    }
    meta.members
        .iter()
        .filter(|(h, _)| *h != me && alive(h))
        .filter_map(|(h, m)| Some((m.report.as_ref()?.log_end?, h)))
        .filter(|(end, _)| fetched.is_none_or(|f| *end > f))
        .max()
        .map(|(_, h)| h.clone())
}

/// May the designated primary `me`, a replica that has applied everything before `applied`,
/// open its volume now?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    Go,
    /// Not yet: the reason is shown as the replication state's detail.
    Wait(PromotionWait),
}

/// Planned: every other member has left the primary role, and this replica has applied
/// everything any member reports (the old primary's final log end). Forced: at once, with what
/// is applied (the caller cuts anything fetched beyond).
///
/// A member that is unreachable right now still counts: its last report may be the old
/// primary's final log end, and going without it would drop acknowledged writes in what the
/// operator asked to be a handover without loss (found by the simulation, `mars-sim`: the old
/// primary left its role and was cut off, or the new primary had just restarted and heard
/// nobody yet, and the promotion went ahead from an older position). `alive` only words the
/// reason; accepting the loss is what `primary --force` is for.
pub fn promotion(
    meta: &ResourceMeta,
    me: &HostName,
    applied: LogPos,
    forced: bool,
    alive: &dyn Fn(&HostName) -> bool,
) -> Promotion {
    promotion_from(meta, me, applied, None, forced, alive)
}

/// [`promotion`], knowing also the writer of the logfile `applied` lies in (our copy of it, if
/// we have one): a member's log end inside a logfile of that number written by another host is
/// another history, which the links of the logfile before cannot show (a fork exactly at a
/// logfile start, found by mars-sim, seed 3919).
pub fn promotion_from(
    meta: &ResourceMeta,
    me: &HostName,
    applied: LogPos,
    current: Option<&HostName>,
    forced: bool,
    alive: &dyn Fn(&HostName) -> bool,
) -> Promotion {
    if forced {
        return Promotion::Go;
    }
    if let Some(p) = actual_primaries(meta, me).next() {
        return Promotion::Wait(PromotionWait::OldPrimaryActs(p.clone()));
    }
    // A report made before the member learnt of this designation may predate a primary
    // period of its own (it became primary, wrote, and is leaving again for us): its log end
    // would be too old to wait for (found by mars-sim, seed 4122). Unreachable members cannot
    // report; the rules below treat their last word.
    if let Some((h, _)) = meta.members.iter().find(|(h, m)| {
        *h != me
            && alive(h)
            && m.report
                .as_ref()
                .is_some_and(|r| r.designation < meta.designation)
    }) {
        return Promotion::Wait(PromotionWait::NoReport(h.clone()));
    }
    // A report made under a *newer* designation than ours: another `primary` command was
    // written after ours and wins (last writer wins) once its entry reaches us. This is what
    // lets a planned promotion go without a settle time: every reachable member has reported
    // exactly this designation.
    if let Some((h, _)) = meta.members.iter().find(|(h, m)| {
        *h != me
            && alive(h)
            && m.report
                .as_ref()
                .is_some_and(|r| r.designation > meta.designation)
    }) {
        return Promotion::Wait(PromotionWait::NewerDesignation(h.clone()));
    }
    // Log ends of different histories cannot be compared: ours may look ahead of a side whose
    // writes would then be dropped without anybody choosing so (found by the simulation,
    // `mars-sim`: a handover started before the split brain showed completed after it).
    if let Some(sb) = split_brain(meta, alive) {
        return Promotion::Wait(PromotionWait::SplitBrain(sb.logfile));
    }
    let newest = meta
        .members
        .iter()
        .filter(|(h, _)| *h != me)
        .filter_map(|(h, m)| Some((m.report.as_ref()?.log_end?, h)))
        .max();
    // The start of the logfile after ours is where ours ends when a version link records our
    // copy's length for it: a handover straight back, whose source dropped its empty newest
    // logfile and may hold no logfile at all, so that nobody ever tells our replay that our
    // copy is complete (seen in CI: the old primary waited its whole timeout "catching up"
    // with the empty start of the logfile after).
    let ends_here = |end: LogPos| {
        end == LogPos::new(applied.file + 1, 0)
            && current.is_some_and(|o| complete_by_links(meta, applied.file, o, applied.offset))
    };
    match newest {
        Some((end, _)) if end > applied && ends_here(end) => {
            behind_in_our_history(meta, me, applied, current, alive)
        }
        Some((end, h)) if end > applied && alive(h) => Promotion::Wait(PromotionWait::CatchingUp {
            host: h.clone(),
            applied,
            end,
        }),
        Some((end, h)) if end > applied => Promotion::Wait(PromotionWait::UnreachableAhead {
            host: h.clone(),
            applied,
            end,
        }),
        _ => behind_in_our_history(meta, me, applied, current, alive),
    }
}

/// Positions of different histories compare as if they were one: a member whose log end is
/// "behind" ours may hold writes of another branch (the last primary after a forced failover,
/// while we are the branch it replaced). Its log end must lie in our history as far as the
/// version links tell; found by the simulation (`mars-sim`, seed 2444), where a planned
/// promotion revived an abandoned branch once the links of the fork had been reclaimed.
/// A member whose full sync runs (after `invalidate` or `join-resource`) gave up its history
/// and does not count. One that needs a sync but has not started it does: "its logfiles are
/// gone at the source" is also what a member of another branch hears (seed 3700). A member
/// that is unreachable counts only if the links show another history (nothing can be verified
/// about it, and a dead member must not block handovers forever).
fn behind_in_our_history(
    meta: &ResourceMeta,
    me: &HostName,
    applied: LogPos,
    current: Option<&HostName>,
    alive: &dyn Fn(&HostName) -> bool,
) -> Promotion {
    for (h, m) in meta.members.iter().filter(|(h, _)| *h != me) {
        let Some(r) = m.report.as_ref() else {
            continue;
        };
        let Some(end) = r
            .log_end
            .filter(|_| r.consistent || r.needs_sync && r.sync.is_none())
        else {
            continue;
        };
        match in_our_history(meta, me, applied, current, h, end) {
            Some(true) => {}
            Some(false) => {
                return Promotion::Wait(PromotionWait::OtherHistory {
                    host: h.clone(),
                    end,
                })
            }
            None if alive(h) => {
                return Promotion::Wait(PromotionWait::CannotTell {
                    host: h.clone(),
                    end,
                })
            }
            None => {}
        }
    }
    Promotion::Go
}

/// Whether `host`'s log end lies in `me`'s history, by the version links of its logfile or
/// the one before: equal to ours, or equal to those of a witness whose links equal ours at
/// that logfile or later (links chain, so equality later implies equality before). `None`:
/// the links cannot tell (`host` has published none there, or nobody ties them to ours).
/// Agreement on the logfile before the end's is taken as enough (the catch-up rule already
/// holds us at or beyond the end), except that an end inside the logfile we are in
/// (`current`: its writer here) must be in that writer's logfile: two hosts writing the same
/// logfile number after one history (a fork exactly at a logfile start) agree on the logfile
/// before (found by mars-sim, seed 3919). A member's logfile whose link is not published yet
/// (a replica in the middle of it) still slips through.
fn in_our_history(
    meta: &ResourceMeta,
    me: &HostName,
    applied: LogPos,
    current: Option<&HostName>,
    host: &HostName,
    end: LogPos,
) -> Option<bool> {
    if let Some(ours) = current.filter(|_| applied.file == end.file && end.offset > 0) {
        let theirs = meta.version(end.file, host).and_then(version::origin_of);
        if theirs.is_some_and(|t| t != *ours) {
            return Some(false);
        }
    }
    if meta
        .versions
        .values()
        .all(|links| !links.contains_key(host))
    {
        // Nothing published (a new member before its first logfile): nothing to lose.
        return Some(true);
    }
    for no in [end.file, end.file.saturating_sub(1)] {
        let Some(theirs) = meta.version(no, host) else {
            continue;
        };
        if let Some(ours) = meta.version(no, me) {
            return Some(ours == theirs);
        }
        // Our link of the next logfile chains on the link of `no` our history had (ours, since
        // reclaimed, or the one a full sync continued from): recomputed on theirs, it tells
        // (found by mars-sim, seed 247: a member of another branch, unreachable, whose end we
        // could not place otherwise, lost its writes in a planned handover).
        if let Some(next) = meta.version(no + 1, me) {
            if let (Some(origin), Some(len)) = (version::origin_of(next), version::len_of(next)) {
                if meta.chain_starts.get(&origin) != Some(&(no + 1)) {
                    return Some(version::link(theirs, no + 1, &origin, len) == next);
                }
            }
        }
        // We never had that logfile: we started replaying after it (a full sync), and our chain
        // continues from the link of it that we adopted (`plan::my_link`: the designated
        // primary's, else its writer's). If that is theirs, their end lies in our history.
        let ours_start = meta
            .versions
            .iter()
            .find(|(_, links)| links.contains_key(me))
            .map(|(n, _)| *n);
        if ours_start.is_none_or(|first| first == no + 1) && applied.file > no {
            // Never `host`'s own link: it is `theirs`, no witness of anything (found by
            // mars-sim, seed 247: a member that wrote logfile `no` itself, on another history,
            // was taken to lie in ours once our own link of `no` was reclaimed).
            let adopted = meta
                .primary
                .as_ref()
                .filter(|p| *p != host)
                .and_then(|p| meta.version(no, p))
                .or_else(|| {
                    version::origin_of(theirs)
                        .filter(|o| o != host)
                        .and_then(|o| meta.version(no, &o))
                });
            if let Some(adopted) = adopted {
                return Some(adopted == theirs);
            }
        }
        // Not published by us yet, but we replayed exactly to that logfile's end (a handover:
        // the old primary's last logfile, which it completed when it left): the link we would
        // publish decides (the chain makes equal links mean one history).
        if let (Some(len), Some(origin)) = (version::len_of(theirs), version::origin_of(theirs)) {
            if applied == LogPos::new(no, len) {
                if let Some(ours) = crate::plan::my_link(meta, me, no, &origin, len) {
                    return Some(ours == theirs);
                }
            }
        }
        let witnessed = meta.versions[&no]
            .iter()
            .filter(|(_, l)| l.as_str() == theirs)
            .any(|(w, _)| {
                meta.versions.range(no..).any(|(_, links)| {
                    matches!((links.get(w), links.get(me)), (Some(a), Some(b)) if a == b)
                })
            });
        if witnessed {
            return Some(true);
        }
        // Our link of that logfile is not there yet (we have replayed up to its end but not
        // past it, as at a handover): the logfile before decides.
    }
    None
}

/// Two or more histories after a common point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrain {
    /// The first logfile whose links differ (or 0 when only the roles tell: two hosts act as
    /// primary).
    pub logfile: u64,
    /// One entry per history: its hosts and the log bytes it has from the fork on (what would
    /// be lost by discarding it).
    pub sides: Vec<Side>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub hosts: Vec<HostName>,
    pub bytes: u64,
}

/// Compares the version links of all members: the first logfile number for which two members
/// published different links is the fork. Also a fork: two members acting as primary at once
/// (a forced switch while the old primary still has its device open), before any link shows it;
/// only reachable ones count there (`alive`): a primary that died keeps its last report, which
/// says nothing about a fork until it returns.
pub fn split_brain(meta: &ResourceMeta, alive: &dyn Fn(&HostName) -> bool) -> Option<SplitBrain> {
    for (no, links) in &meta.versions {
        // Only members count: a leftover link of a host that left is no history anybody has.
        let mut groups: BTreeMap<&str, Vec<HostName>> = BTreeMap::new();
        for (h, l) in links {
            if meta.is_member(h) {
                groups
                    .entry(version::hash_of(l).unwrap_or(l))
                    .or_default()
                    .push(h.clone());
            }
        }
        if groups.len() < 2 {
            continue;
        }
        let sides = groups
            .into_values()
            .map(|hosts| {
                let bytes = amount_from(meta, &hosts[0], *no);
                Side { hosts, bytes }
            })
            .collect();
        return Some(SplitBrain {
            logfile: *no,
            sides,
        });
    }
    if let Some(sb) = beyond_the_primary(meta) {
        return Some(sb);
    }
    // Replicas that found their source's history different before any link shows it (their
    // logfile of the fork is not complete yet): they form one side, the rest the other.
    let forked: Vec<(&HostName, u64)> = meta
        .members
        .iter()
        .filter_map(|(h, m)| Some((h, m.report.as_ref()?.forked?)))
        .collect();
    if let Some(at) = forked.iter().map(|(_, n)| *n).min() {
        let lost: Vec<&HostName> = forked.iter().map(|(h, _)| *h).collect();
        // The other side: the designated primary and whoever its source confirmed as caught
        // up; a member that has not compared yet (just back, not connected) is on neither.
        let kept: Vec<&HostName> = meta
            .members
            .iter()
            .filter(|(h, m)| {
                !lost.contains(h)
                    && (meta.primary.as_ref() == Some(*h)
                        || m.report
                            .as_ref()
                            .is_some_and(|r| r.caught_up || r.role == Role::Primary))
            })
            .map(|(h, _)| h)
            .collect();
        let side = |hosts: Vec<&HostName>| Side {
            bytes: hosts.first().map_or(0, |h| {
                amount_from(meta, h, at).max(log_bytes_from(meta, h, at))
            }),
            hosts: hosts.into_iter().cloned().collect(),
        };
        return Some(SplitBrain {
            logfile: at,
            sides: vec![side(kept), side(lost)],
        });
    }
    let acting: Vec<HostName> = meta
        .members
        .iter()
        .filter(|(h, m)| alive(h) && m.report.as_ref().is_some_and(|r| r.role == Role::Primary))
        .map(|(h, _)| h.clone())
        .collect();
    if acting.len() > 1 {
        return Some(SplitBrain {
            logfile: 0,
            sides: acting
                .into_iter()
                .map(|h| Side {
                    hosts: vec![h],
                    bytes: 0,
                })
                .collect(),
        });
    }
    None
}

/// Bytes a member reports having from logfile `from` on (its log end), when its links do not
/// tell yet.
/// A member's version link at or beyond the designated primary's current logfile, written by
/// another origin: that member holds a logfile the primary's history does not have there.
///
/// The designated primary, acting and reporting under the current designation (so in its
/// current primary period), writes its current logfile `M` (its report's `log_end.file`)
/// itself, and every logfile of the resource's history from its promotion on is its own. A
/// member whose link for some `N >= M` names another origin holds more than the primary, or a
/// logfile of another origin at the same number: another history. Its links are published,
/// so this shows as soon as they and the primary's report arrive — before that member ever
/// fetches (its fetch is refused for the same reason), and without a gap between "two
/// acting primaries" and the member's `forked` report (found by `forced_switch.rs`, crashed
/// idle old primary that takes the role back with an empty new logfile while the other side
/// rotated and wrote during the split: the split brain vanished from the winner's view for
/// the moment between the loser's step-down and its `forked` report). A stale report only
/// makes `M` smaller, but the primary's logfiles from its promotion on are all its own.
fn beyond_the_primary(meta: &ResourceMeta) -> Option<SplitBrain> {
    let p = meta.primary.as_ref()?;
    let rep = meta.members.get(p)?.report.as_ref()?;
    if rep.role != Role::Primary || rep.designation != meta.designation {
        return None;
    }
    let current = rep.log_end?.file;
    let mut fork: Option<(u64, Vec<HostName>)> = None;
    for (no, links) in meta.versions.range(current..) {
        let others: Vec<HostName> = links
            .iter()
            .filter(|(h, l)| {
                *h != p && meta.is_member(h) && version::origin_of(l).is_some_and(|o| o != *p)
            })
            .map(|(h, _)| h.clone())
            .collect();
        if !others.is_empty() {
            fork = Some((*no, others));
            break;
        }
    }
    let (at, lost) = fork?;
    let bytes = |h: &HostName| amount_from(meta, h, at).max(log_bytes_from(meta, h, at));
    Some(SplitBrain {
        logfile: at,
        sides: vec![
            Side {
                bytes: bytes(p),
                hosts: vec![p.clone()],
            },
            Side {
                bytes: lost.first().map_or(0, bytes),
                hosts: lost,
            },
        ],
    })
}

fn log_bytes_from(meta: &ResourceMeta, host: &HostName, from: u64) -> u64 {
    match meta
        .members
        .get(host)
        .and_then(|m| m.report.as_ref()?.log_end)
    {
        Some(end) if end.file == from => end.offset,
        _ => 0,
    }
}

/// Bytes of `host`'s history from logfile `from` on: its published links, plus what its
/// report says beyond the last link (the growing logfile of a primary).
fn amount_from(meta: &ResourceMeta, host: &HostName, from: u64) -> u64 {
    let mut n = 0;
    let mut last = from;
    for (no, links) in meta.versions.range(from..) {
        if let Some(len) = links.get(host).and_then(|l| version::len_of(l)) {
            n += len;
            last = *no;
        }
    }
    if let Some(r) = meta.members.get(host).and_then(|m| m.report.as_ref()) {
        for &(no, len) in &r.logs {
            if no > last {
                n += len;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Member, Report};
    use mars_config::ResourceName;

    fn h(s: &str) -> HostName {
        HostName::new(s).unwrap()
    }

    fn member(role: Role, end: Option<LogPos>) -> Member {
        Member {
            report: Some(Report {
                role,
                attached: true,
                consistent: true,
                log_end: end,
                applied: end,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn meta(primary: &str) -> ResourceMeta {
        let mut m = ResourceMeta::empty(ResourceName::new("r").unwrap());
        m.size = Some(1 << 20);
        m.primary = HostName::new(primary).ok();
        m
    }

    const ALL: &dyn Fn(&HostName) -> bool = &|_| true;

    #[test]
    fn a_replica_follows_the_acting_designated_primary() {
        let mut m = meta("a");
        m.members
            .insert(h("a"), member(Role::Primary, Some(LogPos::new(3, 10))));
        m.members
            .insert(h("b"), member(Role::Secondary, Some(LogPos::new(3, 5))));
        m.members
            .insert(h("c"), member(Role::Secondary, Some(LogPos::new(3, 5))));
        assert_eq!(fetch_source(&m, &h("b"), None, ALL), Some(h("a")));
        // Handover to b: a still acts as primary, so b and c keep fetching from a.
        m.primary = Some(h("b"));
        assert_eq!(fetch_source(&m, &h("b"), None, ALL), Some(h("a")));
        assert_eq!(fetch_source(&m, &h("c"), None, ALL), Some(h("a")));
        // a left: b catches up from whoever has the newest end; a itself has nobody ahead.
        m.members
            .insert(h("a"), member(Role::Secondary, Some(LogPos::new(3, 10))));
        let b_has = Some(LogPos::new(3, 5));
        assert_eq!(fetch_source(&m, &h("b"), b_has, ALL), Some(h("a")));
        assert_eq!(
            fetch_source(&m, &h("a"), Some(LogPos::new(3, 10)), ALL),
            None
        );
        // An unreachable member is not a source.
        assert_eq!(fetch_source(&m, &h("b"), b_has, &|x| *x != h("a")), None);
        // b acts as primary: everybody follows it.
        m.members
            .insert(h("b"), member(Role::Primary, Some(LogPos::new(4, 0))));
        assert_eq!(fetch_source(&m, &h("a"), None, ALL), Some(h("b")));
        assert_eq!(fetch_source(&m, &h("c"), None, ALL), Some(h("b")));
    }

    /// Seed 4122 of mars-sim: `a` was primary for a moment (became primary, wrote, and leaves
    /// for `b` at once); `b`'s view of `a` is a report from before that period. Until `a`
    /// reports under the designation that names `b`, `b` cannot know what `a` wrote.
    #[test]
    fn planned_promotion_waits_for_reports_under_its_designation() {
        let mut m = meta("b");
        m.designation = 200;
        let mut a = member(Role::Secondary, Some(LogPos::new(3, 5)));
        a.report.as_mut().unwrap().designation = 100;
        m.members.insert(h("a"), a);
        let mut b = member(Role::Secondary, Some(LogPos::new(3, 5)));
        b.report.as_mut().unwrap().designation = 100;
        m.members.insert(h("b"), b);
        let applied = LogPos::new(3, 5);
        match promotion(&m, &h("b"), applied, false, ALL) {
            Promotion::Wait(why) => assert!(why.to_string().contains("a to report"), "{why}"),
            Promotion::Go => panic!("went on a report from before the designation"),
        }
        // Forced: at once, whatever the reports.
        assert_eq!(promotion(&m, &h("b"), applied, true, ALL), Promotion::Go);
        // An unreachable member cannot report: the other rules decide on its last word.
        assert_eq!(
            promotion(&m, &h("b"), applied, false, &|x| *x != h("a")),
            Promotion::Go
        );
        // a reports under the new designation, with the writes of its short primary period.
        let mut a = member(Role::Secondary, Some(LogPos::new(3, 9)));
        a.report.as_mut().unwrap().designation = 200;
        m.members.insert(h("a"), a);
        assert!(matches!(
            promotion(&m, &h("b"), applied, false, ALL),
            Promotion::Wait(why) if why.to_string().contains("catching up with a")
        ));
        assert_eq!(
            promotion(&m, &h("b"), LogPos::new(3, 9), false, ALL),
            Promotion::Go
        );
    }

    #[test]
    fn planned_promotion_waits_for_the_old_primary_and_its_last_byte() {
        let mut m = meta("b");
        m.members
            .insert(h("a"), member(Role::Primary, Some(LogPos::new(3, 10))));
        m.members
            .insert(h("b"), member(Role::Secondary, Some(LogPos::new(3, 10))));
        let at = LogPos::new(3, 10);
        assert!(matches!(
            promotion(&m, &h("b"), at, false, ALL),
            Promotion::Wait(w) if w.to_string().contains("leave the primary role")
        ));
        // Forced: at once.
        assert_eq!(promotion(&m, &h("b"), at, true, ALL), Promotion::Go);
        m.members
            .insert(h("a"), member(Role::Secondary, Some(LogPos::new(3, 20))));
        assert!(matches!(
            promotion(&m, &h("b"), at, false, ALL),
            Promotion::Wait(w) if w.to_string().contains("catching up with a")
        ));
        assert_eq!(
            promotion(&m, &h("b"), LogPos::new(3, 20), false, ALL),
            Promotion::Go
        );
    }

    /// Members on different histories (their links differ, or a replica found its source's
    /// history different): a planned promotion waits for the operator to resolve it.
    #[test]
    fn planned_promotion_waits_while_histories_differ() {
        let mut m = meta("b");
        m.members
            .insert(h("a"), member(Role::Secondary, Some(LogPos::new(5, 3))));
        m.members
            .insert(h("b"), member(Role::Secondary, Some(LogPos::new(6, 13))));
        let at = LogPos::new(6, 13);
        assert_eq!(promotion(&m, &h("b"), at, false, ALL), Promotion::Go);
        m.members
            .get_mut(&h("a"))
            .unwrap()
            .report
            .as_mut()
            .unwrap()
            .forked = Some(5);
        assert!(matches!(
            promotion(&m, &h("b"), at, false, ALL),
            Promotion::Wait(w) if w.to_string().contains("split brain from logfile 5")
        ));
        assert_eq!(promotion(&m, &h("b"), at, true, ALL), Promotion::Go);
    }

    /// A member "behind" us by position but on a branch we do not have (the last primary
    /// after a forced failover, while we are the old branch): a planned promotion must not
    /// go. Found by the simulation (`mars-sim`, seed 2444).
    #[test]
    fn planned_promotion_does_not_revive_an_abandoned_branch() {
        let (a, b, c) = (h("a"), h("b"), h("c"));
        let mut m = meta("a");
        m.members
            .insert(a.clone(), member(Role::Secondary, Some(LogPos::new(7, 0))));
        m.members
            .insert(b.clone(), member(Role::Secondary, Some(LogPos::new(4, 24))));
        let l3 = version::link("", 3, &b, 36);
        let b4 = version::link(&l3, 4, &b, 24);
        let a6 = version::link("", 6, &a, 5);
        m.versions
            .entry(3)
            .or_default()
            .insert(b.clone(), l3.clone());
        m.versions
            .entry(4)
            .or_default()
            .insert(b.clone(), b4.clone());
        m.versions.entry(6).or_default().insert(a.clone(), a6);
        let at = LogPos::new(7, 0);
        // Nothing ties b's logfile 4 to a's history: wait while b is reachable.
        assert!(matches!(
            promotion(&m, &a, at, false, ALL),
            Promotion::Wait(w) if w.to_string().contains("cannot tell")
        ));
        // b gone for good: it cannot block the handover.
        assert_eq!(promotion(&m, &a, at, false, &|x| *x != b), Promotion::Go);
        // a's own link of logfile 4 differs: another history (a split brain, by the links).
        let a4 = version::link(&l3, 4, &a, 30);
        m.versions
            .entry(4)
            .or_default()
            .insert(a.clone(), a4.clone());
        assert!(matches!(
            promotion(&m, &a, at, false, &|x| *x != b),
            Promotion::Wait(w) if w.to_string().contains("split brain")
        ));
        // Same history, shown directly…
        m.versions
            .entry(4)
            .or_default()
            .insert(a.clone(), b4.clone());
        assert_eq!(promotion(&m, &a, at, false, ALL), Promotion::Go);
        // …or through a witness: c has b's logfile 4 and shares a later link with a.
        m.versions.get_mut(&4).unwrap().remove(&a);
        m.members
            .insert(c.clone(), member(Role::Secondary, Some(LogPos::new(6, 0))));
        let c5 = version::link(&b4, 5, &c, 9);
        m.versions.entry(4).or_default().insert(c.clone(), b4);
        m.versions
            .entry(5)
            .or_default()
            .insert(c.clone(), c5.clone());
        m.versions.entry(5).or_default().insert(a.clone(), c5);
        assert_eq!(promotion(&m, &a, at, false, ALL), Promotion::Go);
        // A forced promotion does not ask.
        m.versions.get_mut(&5).unwrap().remove(&a);
        assert_eq!(promotion(&m, &a, at, true, ALL), Promotion::Go);
    }

    /// The old primary left its role and is unreachable now (cut off, or this host has just
    /// restarted and heard nobody yet): a planned promotion must still wait for its final log
    /// end. Found by the simulation (`mars-sim`), where the new primary went ahead from an
    /// older position and flushed writes of the old primary were lost in a handover.
    #[test]
    fn planned_promotion_waits_for_an_unreachable_old_primary() {
        let mut m = meta("b");
        m.members
            .insert(h("a"), member(Role::Secondary, Some(LogPos::new(4, 10))));
        m.members
            .insert(h("b"), member(Role::Secondary, Some(LogPos::new(4, 8))));
        let nobody: &dyn Fn(&HostName) -> bool = &|_| false;
        assert!(matches!(
            promotion(&m, &h("b"), LogPos::new(4, 8), false, nobody),
            Promotion::Wait(w) if w.to_string().contains("unreachable") && w.to_string().contains("--force")
        ));
        assert_eq!(
            promotion(&m, &h("b"), LogPos::new(4, 8), true, nobody),
            Promotion::Go
        );
        assert_eq!(
            promotion(&m, &h("b"), LogPos::new(4, 10), false, nobody),
            Promotion::Go
        );
    }

    #[test]
    fn differing_links_are_a_split_brain_with_amounts() {
        let mut m = meta("b");
        for x in ["a", "b", "c"] {
            m.members.insert(h(x), member(Role::Secondary, None));
        }
        let l3 = version::link("", 3, &h("a"), 100);
        let a4 = version::link(&l3, 4, &h("a"), 500);
        let b4 = version::link(&l3, 4, &h("a"), 200);
        let b5 = version::link(&b4, 5, &h("b"), 50);
        for x in ["a", "b", "c"] {
            m.versions.entry(3).or_default().insert(h(x), l3.clone());
        }
        assert_eq!(split_brain(&m, ALL), None);
        m.versions.entry(4).or_default().insert(h("a"), a4.clone());
        m.versions.entry(4).or_default().insert(h("c"), a4);
        assert_eq!(
            split_brain(&m, ALL),
            None,
            "one history, some members behind"
        );
        m.versions.entry(4).or_default().insert(h("b"), b4);
        m.versions.entry(5).or_default().insert(h("b"), b5);
        let sb = split_brain(&m, ALL).expect("split brain");
        assert_eq!(sb.logfile, 4);
        assert_eq!(sb.sides.len(), 2);
        let side_a = sb.sides.iter().find(|s| s.hosts.contains(&h("a"))).unwrap();
        assert_eq!(side_a.hosts, vec![h("a"), h("c")]);
        assert_eq!(side_a.bytes, 500);
        let side_b = sb.sides.iter().find(|s| s.hosts.contains(&h("b"))).unwrap();
        assert_eq!(side_b.bytes, 250);
        // A host that left does not count.
        m.members.remove(&h("b"));
        assert_eq!(split_brain(&m, ALL), None);
    }

    #[test]
    fn replicas_that_found_a_different_history_are_one_side() {
        let mut m = meta("b");
        m.members
            .insert(h("a"), member(Role::Secondary, Some(LogPos::new(2, 700))));
        m.members
            .insert(h("b"), member(Role::Primary, Some(LogPos::new(2, 100))));
        m.members
            .insert(h("c"), member(Role::Secondary, Some(LogPos::new(2, 700))));
        assert_eq!(split_brain(&m, ALL), None);
        for x in ["a", "c"] {
            m.members
                .get_mut(&h(x))
                .unwrap()
                .report
                .as_mut()
                .unwrap()
                .forked = Some(2);
        }
        let sb = split_brain(&m, ALL).expect("split brain");
        assert_eq!(sb.logfile, 2);
        assert_eq!(sb.sides[0].hosts, vec![h("b")]);
        assert_eq!(sb.sides[1].hosts, vec![h("a"), h("c")]);
        assert_eq!(sb.sides[1].bytes, 700);
    }

    #[test]
    fn handover_of_the_first_logfile_goes_by_the_link_we_would_publish() {
        // a created the resource and leaves after logfile 1; b replayed all of it but has not
        // published its link (it does so only when it moves on).
        let mut m = meta("b");
        m.members
            .insert(h("a"), member(Role::Secondary, Some(LogPos::new(1, 300))));
        m.members
            .insert(h("b"), member(Role::Secondary, Some(LogPos::new(1, 300))));
        let l1 = version::link("", 1, &h("a"), 300);
        m.versions.entry(1).or_default().insert(h("a"), l1);
        assert_eq!(
            promotion(&m, &h("b"), LogPos::new(1, 300), false, ALL),
            Promotion::Go
        );
        // A different length is another history: wait (the catch-up rule aside).
        let other = version::link("", 1, &h("a"), 200);
        m.versions.entry(1).or_default().insert(h("a"), other);
        m.members
            .insert(h("a"), member(Role::Secondary, Some(LogPos::new(1, 200))));
        assert!(matches!(
            promotion(&m, &h("b"), LogPos::new(1, 200), false, ALL),
            Promotion::Go | Promotion::Wait(_)
        ));
    }

    /// `forced_switch.rs`, crashed idle old primary `a` that takes the role back: `a`
    /// restarted alone in a new, empty logfile 3 while `b` (forced primary during the split)
    /// wrote logfiles 3 and 4 and, stepping down, published their links. No logfile number
    /// has links of both, nobody acts twice any more, `b` has not fetched yet: the links of
    /// another origin at and beyond `a`'s current logfile are the fork.
    #[test]
    fn links_of_another_origin_beyond_the_primarys_current_logfile_are_a_split_brain() {
        let mut m = meta("a");
        m.designation = 7;
        m.members
            .insert(h("a"), member(Role::Primary, Some(LogPos::new(3, 0))));
        m.members
            .insert(h("b"), member(Role::Secondary, Some(LogPos::new(4, 250))));
        for x in ["a", "b"] {
            m.members
                .get_mut(&h(x))
                .unwrap()
                .report
                .as_mut()
                .unwrap()
                .designation = 7;
        }
        let l2 = version::link("", 2, &h("a"), 100);
        let b3 = version::link(&l2, 3, &h("b"), 300);
        let b4 = version::link(&b3, 4, &h("b"), 250);
        for x in ["a", "b"] {
            m.versions.entry(2).or_default().insert(h(x), l2.clone());
        }
        assert_eq!(split_brain(&m, ALL), None, "one history so far");
        m.versions.entry(3).or_default().insert(h("b"), b3);
        m.versions.entry(4).or_default().insert(h("b"), b4);
        let sb = split_brain(&m, ALL).expect("split brain");
        assert_eq!(sb.logfile, 3);
        assert_eq!(sb.sides[0].hosts, vec![h("a")]);
        assert_eq!(sb.sides[1].hosts, vec![h("b")]);
        assert_eq!(sb.sides[1].bytes, 550);
        // The primary's own logfiles, replayed by b, are its history (a report that lags
        // behind a rotation included).
        let mut one = m.clone();
        let a3 = version::link(&l2, 3, &h("a"), 300);
        let a4 = version::link(&a3, 4, &h("a"), 250);
        one.versions.insert(3, [(h("b"), a3)].into());
        one.versions.insert(4, [(h("b"), a4)].into());
        assert_eq!(split_brain(&one, ALL), None);
        // Links below the primary's current logfile are compared by the rule for links.
        let mut below = m.clone();
        below
            .members
            .get_mut(&h("a"))
            .unwrap()
            .report
            .as_mut()
            .unwrap()
            .log_end = Some(LogPos::new(5, 0));
        assert_eq!(split_brain(&below, ALL), None);
        // A report from before the current designation says nothing about the primary's
        // current period, nor does a designated primary that does not act.
        let mut stale = m.clone();
        stale.designation = 8;
        assert_eq!(split_brain(&stale, ALL), None);
        let mut idle = m.clone();
        idle.members
            .get_mut(&h("a"))
            .unwrap()
            .report
            .as_mut()
            .unwrap()
            .role = Role::Secondary;
        assert_eq!(split_brain(&idle, ALL), None);
        // A host that left does not count.
        m.members.remove(&h("b"));
        assert_eq!(split_brain(&m, ALL), None);
    }

    #[test]
    fn two_acting_primaries_are_a_split_brain() {
        let mut m = meta("b");
        m.members.insert(h("a"), member(Role::Primary, None));
        m.members.insert(h("b"), member(Role::Primary, None));
        let sb = split_brain(&m, ALL).expect("split brain");
        assert_eq!(sb.logfile, 0);
        assert_eq!(sb.sides.len(), 2);
        // A dead primary's last report is no evidence.
        assert_eq!(split_brain(&m, &|x| *x != h("a")), None);
    }
}
