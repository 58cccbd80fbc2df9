//! Engine tests: events in, the exact commands out (as openraft's engine tests do). The
//! harness plays the store: `Publish` commands are applied to its keys with fresh Lamport
//! stamps, and the resulting metadata is fed back as an event when a test says so (as the
//! daemon's store watch does).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mars_config::{HostName, ResourceName};
use mars_txlog::LogPos;

use super::*;
use crate::keys;
use crate::model::{Report, Role};
use crate::version;
use crate::{UnitOp, UnitStatus};

fn h(s: &str) -> HostName {
    HostName::new(s).unwrap()
}

struct World {
    e: ResourceEngine,
    now: Now,
    res: ResourceName,
    /// key → (value, stamp)
    keys: BTreeMap<String, (String, u64)>,
    stamp: u64,
}

impl World {
    fn new(me: &str) -> World {
        let res = ResourceName::new("r").unwrap();
        let e = ResourceEngine::new(EngineConfig::default(), h(me), res.clone());
        World {
            e,
            now: Now {
                ms: 1_000_000,
                wall_ns: 1_700_000_000_000_000_000,
            },
            res,
            keys: BTreeMap::new(),
            stamp: 100,
        }
    }

    /// A resource of 1 MiB with these members, `primary` designated; every member reachable.
    fn cluster(me: &str, members: &[&str], primary: Option<&str>) -> World {
        let mut w = World::new(me);
        w.set(&keys::size(&w.res.clone()), "1048576");
        for m in members {
            let k = keys::data(&w.res.clone(), &h(m));
            w.set(&k, "/dev/x");
        }
        if let Some(p) = primary {
            let k = keys::primary(&w.res.clone());
            w.set(&k, p);
        }
        w.live(members, members);
        w
    }

    fn set(&mut self, k: &str, v: &str) {
        self.stamp += 1;
        self.keys.insert(k.to_string(), (v.to_string(), self.stamp));
    }

    fn del(&mut self, k: &str) {
        self.keys.remove(k);
    }

    fn report(&mut self, host: &str, r: &Report) {
        let k = keys::actual(&self.res.clone(), &h(host));
        self.set(&k, &r.to_json());
    }

    fn meta(&self) -> Arc<ResourceMeta> {
        Arc::new(ResourceMeta::from_stamped(
            self.res.clone(),
            self.keys
                .iter()
                .map(|(k, (v, s))| (k.as_str(), v.as_str(), *s)),
        ))
    }

    fn live(&mut self, reachable: &[&str], pinning: &[&str]) -> Vec<Command> {
        let l = Liveness {
            reachable: reachable.iter().map(|x| h(x)).collect::<BTreeSet<_>>(),
            pinning: pinning.iter().map(|x| h(x)).collect(),
            fresh: true,
        };
        self.ev(Event::Liveness(l))
    }

    /// Feeds an event; applies published keys to the store (not yet to the engine).
    fn ev(&mut self, e: Event) -> Vec<Command> {
        let out = self.e.on_event(self.now, e);
        let mut tags = Vec::new();
        for c in &out.commands {
            if let Command::Publish { tag, set, delete } = c {
                let mut stamps = Vec::new();
                for (k, v) in set {
                    self.set(k, v);
                    stamps.push(self.stamp);
                }
                for k in delete {
                    self.del(k);
                }
                if let Some(t) = tag {
                    tags.push((*t, stamps));
                }
            }
        }
        let mut cmds = out.commands;
        for (tag, stamps) in tags {
            cmds.extend(
                self.e
                    .on_event(self.now, Event::Done(Done::Published { tag, stamps }))
                    .commands,
            );
        }
        cmds
    }

    /// The store's metadata arrives at the engine.
    fn sync(&mut self) -> Vec<Command> {
        let m = self.meta();
        self.ev(Event::Meta(m))
    }

    fn at(&mut self, ms: u64) {
        self.now.ms += ms;
        self.now.wall_ns += ms * 1_000_000;
    }

    fn start(&mut self, replica_marker: bool) -> Vec<Command> {
        let mut c = self.sync();
        c.extend(self.ev(Event::Started(LocalFacts {
            replica_marker,
            size: 1 << 20,
            ..Default::default()
        })));
        c
    }

    fn stats(&mut self, s: Stats) -> Vec<Command> {
        self.ev(Event::Stats(s))
    }
}

/// The commands without log lines, reports and replies (what a test usually asserts).
fn acts(cmds: &[Command]) -> Vec<Command> {
    cmds.iter()
        .filter(|c| !matches!(c, Command::Log { .. }))
        .filter(|c| {
            !matches!(c, Command::Publish { set, delete, .. }
                if delete.is_empty() && set.iter().all(|(k, _)| k.contains("/actual-")))
        })
        .cloned()
        .collect()
}

fn logs(cmds: &[Command]) -> Vec<String> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Log { msg, .. } => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

fn published(cmds: &[Command]) -> Vec<(String, String)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Publish { set, .. } => Some(set.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn replies(cmds: &[Command]) -> Vec<(OpId, OpReply)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Reply { id, result } => Some((*id, result.clone())),
            _ => None,
        })
        .collect()
}

fn primary_report(end: LogPos) -> Report {
    Report {
        role: Role::Primary,
        attached: true,
        consistent: true,
        applied: Some(end),
        log_end: Some(end),
        logs: vec![(end.file, end.offset)],
        pin: Some(end.file),
        ..Default::default()
    }
}

fn secondary_report(applied: LogPos, designation: u64) -> Report {
    Report {
        role: Role::Secondary,
        attached: true,
        consistent: true,
        applied: Some(applied),
        log_end: Some(applied),
        pin: Some(applied.file),
        designation,
        ..Default::default()
    }
}

fn volume(durable: LogPos, logs: &[(u64, &str, u64)]) -> VolumeStats {
    VolumeStats {
        durable,
        written_back: durable,
        current: durable.file,
        logs: logs
            .iter()
            .map(|(no, o, len)| LogInfo {
                no: *no,
                origin: h(o),
                len: *len,
                complete: true,
            })
            .collect(),
        size: 1 << 20,
        ..Default::default()
    }
}

fn opened(durable: LogPos, logs: &[(u64, &str, u64)]) -> Event {
    Event::Done(Done::VolumeOpened(Ok(Opened {
        stats: volume(durable, logs),
        restarted_at: None,
        device: None,
    })))
}

/// A replica of `w` opened with these copies, all replayed up to `applied`.
fn open_replica(w: &mut World, copies: &[(u64, &str, u64, bool)], applied: LogPos) -> Vec<Command> {
    let facts = ReplicaFacts {
        copies: copies
            .iter()
            .map(|(no, o, len, complete)| LogInfo {
                no: *no,
                origin: h(o),
                len: *len,
                complete: *complete,
            })
            .collect(),
        applied,
        sync: None,
        needs_sync: None,
    };
    w.ev(Event::Done(Done::ReplicaOpened(Ok(facts))))
}

fn start_fetch_of(cmds: &[Command]) -> Option<(SessionId, HostName, LogPos, String)> {
    cmds.iter().find_map(|c| match c {
        Command::StartFetch {
            id,
            source,
            from,
            prev_link,
        } => Some((*id, source.clone(), *from, prev_link.clone())),
        _ => None,
    })
}

// ---------------------------------------------------------------- start

#[test]
fn the_designated_primary_opens_its_volume_and_reports() {
    let mut w = World::cluster("a", &["a"], Some("a"));
    let c = w.start(false);
    assert_eq!(
        acts(&c),
        vec![
            Command::SetDesignated(true),
            Command::OpenVolume {
                size: 1 << 20,
                restart_after_gap: false
            }
        ]
    );
    let c = w.ev(opened(LogPos::new(1, 0), &[(1, "a", 0)]));
    let p = published(&c);
    let rep = p
        .iter()
        .find(|(k, _)| k == "resource-r/actual-a")
        .map(|(_, v)| Report::from_json(v).unwrap())
        .expect("report");
    assert_eq!(rep.role, Role::Primary);
    assert_eq!(rep.log_end, Some(LogPos::new(1, 0)));
}

#[test]
fn a_restarted_primary_waits_for_fresh_metadata() {
    let mut w = World::cluster("a", &["a", "b"], Some("a"));
    w.ev(Event::Liveness(Liveness {
        reachable: BTreeSet::new(),
        pinning: BTreeSet::new(),
        fresh: false,
    }));
    let c = w.start(false);
    assert!(!c.iter().any(|c| matches!(c, Command::OpenVolume { .. })));
    // Every member answered: take the role up.
    let c = w.live(&["a", "b"], &["a", "b"]);
    assert!(c.iter().any(|c| matches!(c, Command::OpenVolume { .. })));
}

#[test]
fn a_restarted_primary_takes_the_role_up_after_a_while_without_answers() {
    let mut w = World::cluster("a", &["a", "b"], Some("a"));
    w.ev(Event::Liveness(Liveness {
        fresh: false,
        ..Default::default()
    }));
    let out = {
        w.sync();
        w.e.on_event(
            w.now,
            Event::Started(LocalFacts {
                size: 1 << 20,
                ..Default::default()
            }),
        )
    };
    assert!(!out
        .commands
        .iter()
        .any(|c| matches!(c, Command::OpenVolume { .. })));
    let wake = out.wake_at.expect("a timer");
    assert_eq!(wake, w.now.ms + 10_000);
    w.at(10_000);
    let c = w.ev(Event::Wake);
    assert!(c.iter().any(|c| matches!(c, Command::OpenVolume { .. })));
}

#[test]
fn a_member_that_is_not_designated_opens_a_replica_and_fetches() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 100)));
    let c = w.start(true);
    assert_eq!(
        acts(&c),
        vec![
            Command::SetDesignated(false),
            Command::OpenReplica { size: 1 << 20 }
        ]
    );
    let l2 = version::link("", 2, &h("a"), 50);
    w.set("resource-r/version-000000002-b", &l2);
    w.sync();
    let c = open_replica(&mut w, &[(3, "a", 40, false)], LogPos::new(3, 40));
    let (_, source, from, prev) = start_fetch_of(&c).expect("fetch starts");
    assert_eq!(source, h("a"));
    assert_eq!(from, LogPos::new(3, 40));
    // The fetch request carries our link of the logfile before (found by mars-sim: without
    // it, the server confirmed a position on another history).
    assert_eq!(prev, l2);
}

// ---------------------------------------------------------------- fetch

/// The source's "you have everything" counts for the copy's current end, and only from the
/// source of the session.
#[test]
fn a_caught_up_confirmation_makes_the_replica_up_to_date_for_a_while() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(1, 0)));
    w.start(true);
    let c = open_replica(&mut w, &[], LogPos::new(1, 0));
    let (id, ..) = start_fetch_of(&c).expect("fetch");
    let c = w.ev(Event::Fetch(
        id,
        FetchEvent::Offer {
            no: 1,
            origin: h("a"),
        },
    ));
    assert!(c.contains(&Command::CopyDecision {
        id,
        no: 1,
        decision: CopyDecision::Create
    }));
    w.ev(Event::Fetch(
        id,
        FetchEvent::CaughtUp {
            pos: LogPos::new(1, 0),
            stamp: w.now.wall_ns,
        },
    ));
    let st = w.e.status();
    assert_eq!(st.caught_up_stamp, Some(w.now.wall_ns));
    assert_eq!(st.caught_up_ms, Some(0));
    assert!(st.report.caught_up);
    w.at(VALID + 1);
    w.ev(Event::Wake);
    assert!(!w.e.status().report.caught_up, "expired");
}

/// The confirmation was the running session's word: when the session ends (fetch paused, the
/// link broke), the replica no longer counts as up to date, however young the confirmation.
#[test]
fn a_caught_up_confirmation_ends_with_its_session() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(1, 0)));
    w.start(true);
    let c = open_replica(&mut w, &[], LogPos::new(1, 0));
    let (id, ..) = start_fetch_of(&c).expect("fetch");
    w.ev(Event::Fetch(
        id,
        FetchEvent::Offer {
            no: 1,
            origin: h("a"),
        },
    ));
    w.ev(Event::Fetch(
        id,
        FetchEvent::CaughtUp {
            pos: LogPos::new(1, 0),
            stamp: w.now.wall_ns,
        },
    ));
    assert!(w.e.status().report.caught_up);
    w.at(10);
    w.ev(Event::Fetch(
        id,
        FetchEvent::Ended {
            error: Some("connection closed".into()),
        },
    ));
    let st = w.e.status();
    assert!(!st.report.caught_up);
    assert_eq!(st.caught_up_ms, None);
}

/// How long a caught-up confirmation counts.
const VALID: u64 = crate::config::Timing::standard().caught_up_valid;

/// A repeated confirmation of the same position refreshes its time without a decision (no
/// commands; only the expiry moves); the refreshed stamp keeps the replica up to date past the
/// first one's expiry.
#[test]
fn a_repeated_caught_up_only_refreshes_the_stamp() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(1, 0)));
    w.start(true);
    let c = open_replica(&mut w, &[], LogPos::new(1, 0));
    let (id, ..) = start_fetch_of(&c).expect("fetch");
    w.ev(Event::Fetch(
        id,
        FetchEvent::Offer {
            no: 1,
            origin: h("a"),
        },
    ));
    let first = w.now.wall_ns;
    w.ev(Event::Fetch(
        id,
        FetchEvent::CaughtUp {
            pos: LogPos::new(1, 0),
            stamp: first,
        },
    ));
    let wake = w.e.on_event(w.now, Event::Wake).wake_at;
    assert!(wake.is_some(), "the confirmation's expiry is a wake");
    w.at(VALID - 1_000);
    let again = w.now.wall_ns;
    let out = w.e.on_event(
        w.now,
        Event::Fetch(
            id,
            FetchEvent::CaughtUp {
                pos: LogPos::new(1, 0),
                stamp: again,
            },
        ),
    );
    assert!(out.commands.is_empty());
    // The expiry moved to the fresh stamp's (another wake may come earlier).
    assert!(out.wake_at.is_some_and(|at| at <= w.now.ms + VALID + 1));
    assert!(wake.is_some());
    assert_eq!(w.e.status().caught_up_stamp, Some(again));
    w.at(1_001);
    w.ev(Event::Wake);
    assert!(w.e.status().report.caught_up, "refreshed, not expired");
    w.at(VALID);
    w.ev(Event::Wake);
    assert!(!w.e.status().report.caught_up, "the refreshed one expired");
}

/// A replica fetching from `a`, with copies `copies` replayed up to `applied`: the session id.
fn fetching(w: &mut World, copies: &[(u64, &str, u64, bool)], applied: LogPos) -> SessionId {
    w.start(true);
    let c = open_replica(w, copies, applied);
    start_fetch_of(&c).expect("a fetch session").0
}

/// Found by mars-sim: an empty local copy of logfile N from another origin was replaced even
/// after replay had moved past it; the new N's records were never applied while the replica
/// reported the new history's position. Such a copy is a fork now.
#[test]
fn a_replayed_empty_copy_of_another_origin_is_a_fork_not_replaced() {
    let mut w = World::cluster("b", &["a", "b", "c"], Some("a"));
    w.report("a", &primary_report(LogPos::new(4, 0)));
    // Not passed yet: the empty copy is replaced.
    let id = fetching(&mut w, &[(3, "c", 0, false)], LogPos::new(3, 0));
    let c = w.ev(Event::Fetch(
        id,
        FetchEvent::Offer {
            no: 3,
            origin: h("a"),
        },
    ));
    assert!(c.contains(&Command::CopyDecision {
        id,
        no: 3,
        decision: CopyDecision::ReplaceEmpty { old_origin: h("c") }
    }));
    // Passed: a fork.
    let mut w = World::cluster("b", &["a", "b", "c"], Some("a"));
    w.report("a", &primary_report(LogPos::new(4, 0)));
    let id = fetching(
        &mut w,
        &[(3, "c", 0, true), (4, "c", 0, false)],
        LogPos::new(4, 0),
    );
    let c = w.ev(Event::Fetch(
        id,
        FetchEvent::Offer {
            no: 4,
            origin: h("a"),
        },
    ));
    assert!(c.contains(&Command::CopyDecision {
        id,
        no: 4,
        decision: CopyDecision::ReplaceEmpty { old_origin: h("c") }
    }));
    let mut w = World::cluster("b", &["a", "b", "c"], Some("a"));
    w.report("a", &primary_report(LogPos::new(4, 0)));
    let id = fetching(
        &mut w,
        &[(3, "c", 0, true), (4, "a", 10, false)],
        LogPos::new(4, 0),
    );
    let c = w.ev(Event::Fetch(
        id,
        FetchEvent::Offer {
            no: 3,
            origin: h("a"),
        },
    ));
    assert!(c.contains(&Command::CopyDecision {
        id,
        no: 3,
        decision: CopyDecision::Reject
    }));
    let r = w.e.replica().unwrap();
    assert_eq!(r.forked, Some(3));
    assert!(r.stuck.as_ref().is_some_and(|s| s.is_history()));
}

/// Found by mars-sim (seed 2001): a replica synced from `a` (the start in `a`'s empty
/// logfile 3) was offered its own logfile 3 back by another replica that still held it from a
/// history this host had left; it replaced the empty copy and replayed it, and its own chain
/// check passes its own logfiles unchecked. Its own logfile offered back is a fork.
#[test]
fn our_own_logfile_offered_back_does_not_replace_an_empty_copy() {
    let mut w = World::cluster("b", &["a", "b", "c"], Some("c"));
    w.report("c", &primary_report(LogPos::new(3, 0)));
    let id = fetching(&mut w, &[(3, "a", 0, false)], LogPos::new(3, 0));
    let c = w.ev(Event::Fetch(
        id,
        FetchEvent::Offer {
            no: 3,
            origin: h("b"),
        },
    ));
    assert!(
        c.contains(&Command::CopyDecision {
            id,
            no: 3,
            decision: CopyDecision::Reject
        }),
        "{c:?}"
    );
    let r = w.e.replica().unwrap();
    assert_eq!(r.forked, Some(3));
    assert!(r.stuck.as_ref().is_some_and(|s| s.is_history()));
}

/// Found by mars-sim: a confirmation by the old source counted for the new one for seconds.
#[test]
fn a_caught_up_confirmation_is_dropped_when_the_source_changes() {
    let mut w = World::cluster("b", &["a", "b", "c"], Some("a"));
    w.report("a", &primary_report(LogPos::new(1, 0)));
    let id = fetching(&mut w, &[(1, "a", 0, false)], LogPos::new(1, 0));
    w.ev(Event::Fetch(
        id,
        FetchEvent::CaughtUp {
            pos: LogPos::new(1, 0),
            stamp: w.now.wall_ns,
        },
    ));
    assert!(w.e.status().report.caught_up);
    // c takes over: the session to a stops, the confirmation goes.
    w.report("a", &secondary_report(LogPos::new(1, 0), 0));
    w.report("c", &primary_report(LogPos::new(2, 0)));
    let k = keys::primary(&w.res.clone());
    w.set(&k, "c");
    let c = w.sync();
    assert!(c.contains(&Command::StopFetch { id }));
    assert!(!w.e.status().report.caught_up);
    assert_eq!(w.e.status().caught_up_stamp, None);
}

/// Found by mars-sim: a full sync kept its start position and copied data when its source
/// changed; after a failover to another history it replayed the new primary's logfiles over
/// the old primary's copy. It starts over, and its links go.
#[test]
fn a_full_sync_whose_source_changes_starts_over() {
    let mut w = World::cluster("b", &["a", "b", "c"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 0)));
    w.start(true);
    let facts = ReplicaFacts {
        copies: Vec::new(),
        applied: LogPos::new(3, 0),
        sync: Some(SyncFile {
            start: Some(LogPos::new(3, 0)),
            done: 1 << 19,
            size: 1 << 20,
            end: None,
            transferred: 0,
            from: Some(h("a")),
        }),
        needs_sync: None,
    };
    w.ev(Event::Done(Done::ReplicaOpened(Ok(facts))));
    let k = keys::version(&w.res.clone(), 2, &h("b"));
    w.set(&k, &version::link("", 2, &h("a"), 7));
    w.sync();
    // c is forced primary now.
    w.report("a", &secondary_report(LogPos::new(3, 0), 0));
    w.report("c", &primary_report(LogPos::new(4, 0)));
    let k = keys::primary(&w.res.clone());
    w.set(&k, "c");
    let c = w.sync();
    assert!(c.contains(&Command::ResetCopies), "{c:?}");
    assert!(
        c.contains(&Command::Persist(Control::Sync(Some(SyncFile::full(
            1 << 20
        )))))
    );
    assert!(logs(&c)
        .iter()
        .any(|l| l.contains("the sync source changed from a to c")));
    // The new sync's start deletes this host's links (they speak for the abandoned copy)
    // before it adopts c's.
    let (id, source) = c
        .iter()
        .find_map(|c| match c {
            Command::StartSync { id, source, .. } => Some((*id, source.clone())),
            _ => None,
        })
        .expect("a new sync");
    assert_eq!(source, h("c"));
    let c3 = version::link("", 3, &h("c"), 9);
    let c = w.ev(Event::Sync(
        id,
        SyncEvent::Info {
            size: 1 << 20,
            start: LogPos::new(4, 0),
            prev_link: c3.clone(),
        },
    ));
    let deletes: Vec<String> = c
        .iter()
        .filter_map(|c| match c {
            Command::Publish { delete, .. } => Some(delete.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(deletes, vec![keys::version(&w.res.clone(), 2, &h("b"))]);
    assert!(published(&c).contains(&(keys::version(&w.res.clone(), 3, &h("b")), c3)));
}

/// Found by mars-sim: a replica after a full sync starting at logfile N had no link of N-1 and
/// took the current designated primary's when it needed one; after a failover to another
/// history it could not see that its copy continued a different logfile. It adopts its
/// source's link of N-1 when the sync starts, before the start is persisted.
#[test]
fn a_full_sync_adopts_its_sources_link_of_the_logfile_before_its_start() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(5, 0)));
    w.start(true);
    let facts = ReplicaFacts {
        sync: Some(SyncFile::full(1 << 20)),
        ..Default::default()
    };
    let c = w.ev(Event::Done(Done::ReplicaOpened(Ok(facts))));
    let id = c
        .iter()
        .find_map(|c| match c {
            Command::StartSync { id, .. } => Some(*id),
            _ => None,
        })
        .expect("sync");
    let a4 = version::link("", 4, &h("a"), 100);
    let c = w.ev(Event::Sync(
        id,
        SyncEvent::Info {
            size: 1 << 20,
            start: LogPos::new(5, 0),
            prev_link: a4.clone(),
        },
    ));
    let start = SyncFile {
        start: Some(LogPos::new(5, 0)),
        from: Some(h("a")),
        ..SyncFile::full(1 << 20)
    };
    assert_eq!(
        acts(&c),
        vec![
            Command::Publish {
                tag: None,
                set: vec![(keys::version(&w.res.clone(), 4, &h("b")), a4.clone())],
                delete: vec![]
            },
            Command::Persist(Control::Position(LogPos::new(5, 0))),
            Command::Persist(Control::Sync(Some(start))),
            Command::SyncGo {
                id,
                done: 0,
                size: 1 << 20
            },
            // Fetching begins at the sync's start, telling the source the adopted link.
            Command::StartFetch {
                id: id + 1,
                source: h("a"),
                from: LogPos::new(5, 0),
                prev_link: a4,
            },
        ]
    );
}

/// Found by mars-sim: a host deleted its own version links below the oldest logfile anybody
/// pinned, counting its own *published* pin; a restarted ex-primary that published none
/// deleted the link its replay position needs. Its replay position counts too.
#[test]
fn link_reclamation_keeps_the_link_the_replay_position_needs() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    let mut p = primary_report(LogPos::new(9, 0));
    p.pin = Some(9);
    w.report("a", &p);
    for no in 1..=6u64 {
        let k = keys::version(&w.res.clone(), no, &h("b"));
        w.set(&k, &version::link("", no, &h("a"), 1));
    }
    w.start(true);
    let c = open_replica(
        &mut w,
        &[(6, "a", 10, true), (7, "a", 10, false)],
        LogPos::new(6, 5),
    );
    let deleted: Vec<String> = c
        .iter()
        .filter_map(|c| match c {
            Command::Publish { delete, .. } => Some(delete.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    // The chain check at logfile 6 needs the link of 5: 1..=4 may go, 5 stays.
    let want: Vec<String> = (1..=4)
        .map(|no| keys::version(&w.res.clone(), no, &h("b")))
        .collect();
    assert_eq!(deleted, want);
}

/// Seed 4122 of mars-sim, at the resource: the designated primary waits until every reachable
/// member has reported under its designation (and promotes at once then, without a settle
/// time: a planned handover is as fast as the metadata).
#[test]
fn a_planned_promotion_waits_for_the_members_reports_under_its_designation() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 5)));
    let id = fetching(&mut w, &[(3, "a", 5, false)], LogPos::new(3, 5));
    let _ = id;
    // b is designated now; a left, but its report is from before the designation.
    let k = keys::primary(&w.res.clone());
    w.set(&k, "b");
    let designation = w.stamp;
    w.report("a", &secondary_report(LogPos::new(3, 5), designation - 1));
    let c = w.sync();
    assert!(!c.iter().any(|c| matches!(c, Command::Promote { .. })));
    let why = w.e.status().report.stuck.unwrap_or_default();
    assert!(why.contains("a to report under this designation"), "{why}");
    w.report("a", &secondary_report(LogPos::new(3, 5), designation));
    let c = w.sync();
    assert!(
        c.iter()
            .any(|c| matches!(c, Command::Promote { cut_at, .. } if *cut_at == LogPos::new(3, 5))),
        "{c:?}"
    );
}

/// A primary that learns of another designation decides on a measurement of its open count
/// taken after that (a device opened a moment ago must keep it primary): it asks for one.
#[test]
fn stepping_down_waits_for_a_measurement_after_the_designation_moved() {
    let mut w = World::cluster("a", &["a", "b"], Some("a"));
    w.start(false);
    w.ev(opened(LogPos::new(1, 0), &[(1, "a", 0)]));
    w.stats(Stats {
        volume: Some(volume(LogPos::new(1, 0), &[(1, "a", 0)])),
        ..Default::default()
    });
    let k = keys::primary(&w.res.clone());
    w.set(&k, "b");
    let out = {
        let m = w.meta();
        w.e.on_event(w.now, Event::Meta(m))
    };
    assert!(!out
        .commands
        .iter()
        .any(|c| matches!(c, Command::StepDown { .. })));
    assert_eq!(out.wake_at, Some(w.now.ms), "measure now");
    // The measurement says the device is open: stay.
    let c = w.stats(Stats {
        open_count: 1,
        volume: Some(volume(LogPos::new(1, 0), &[(1, "a", 0)])),
        ..Default::default()
    });
    assert!(!c.iter().any(|c| matches!(c, Command::StepDown { .. })));
    // Closed: leave.
    let c = w.stats(Stats {
        volume: Some(volume(LogPos::new(1, 0), &[(1, "a", 0)])),
        ..Default::default()
    });
    assert!(c.iter().any(|c| matches!(c, Command::StepDown { .. })));
}

/// The primary's reclamation is asked once per floor (it looped when its measurements were
/// older than the deletion).
#[test]
fn the_primary_asks_for_reclamation_once_per_floor() {
    let mut w = World::cluster("a", &["a"], Some("a"));
    w.start(false);
    let c = w.ev(opened(LogPos::new(2, 0), &[(1, "a", 10), (2, "a", 0)]));
    assert_eq!(
        c.iter()
            .filter(|c| matches!(c, Command::ReclaimLogs { .. }))
            .count(),
        1
    );
    let c = w.ev(Event::Done(Done::Reclaimed {
        removed: vec!["log-000000001-a".into()],
    }));
    assert!(
        !c.iter().any(|c| matches!(c, Command::ReclaimLogs { .. })),
        "{c:?}"
    );
}

/// `cron` rotates; the logfile it closed can go only once the engine measures again, and
/// nothing else measures an idle primary: the rotation's completion asks for a measurement at
/// once, and the one after it reclaims the closed logfile (a cron loop kept it for 30 s).
#[test]
fn a_rotation_asks_for_a_measurement_so_the_closed_logfile_can_go() {
    let mut w = World::cluster("a", &["a"], Some("a"));
    w.start(false);
    w.ev(opened(LogPos::new(1, 10), &[(1, "a", 10)]));
    w.at(5_000);
    let c = w.ev(Event::Op {
        id: 7,
        op: Op::Cron,
    });
    assert!(
        c.iter().any(|c| matches!(
            c,
            Command::Rotate {
                reply: Some(7),
                only_if_used: true
            }
        )),
        "{c:?}"
    );
    let out = w.e.on_event(
        w.now,
        Event::Done(Done::Rotated {
            reply: Some(7),
            result: Ok(Some(2)),
        }),
    );
    assert_eq!(out.wake_at, Some(w.now.ms), "measure at once");
    // The measurement shows logfile 1 closed and written back: its version link goes out,
    // and once that is in the metadata, the logfile goes.
    let c = w.stats(Stats {
        volume: Some(volume(LogPos::new(2, 0), &[(1, "a", 10), (2, "a", 0)])),
        ..Default::default()
    });
    assert!(
        published(&c)
            .iter()
            .any(|(k, _)| k == "resource-r/version-000000001-a"),
        "{c:?}"
    );
    let c = w.sync();
    assert!(
        c.iter().any(|c| matches!(c, Command::ReclaimLogs { .. })),
        "{c:?}"
    );
}

/// The forced switch: refused while fetching; then the force marker before the designation,
/// the promotion after the replayed data, and fetching resumes for later.
#[test]
fn a_forced_switch_marks_designates_promotes_and_resumes_fetching() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 5)));
    fetching(&mut w, &[(3, "a", 5, false)], LogPos::new(3, 5));
    let c = w.ev(Event::Op {
        id: 7,
        op: Op::Primary {
            force: true,
            timeout: 10_000,
            confirmed: true,
        },
    });
    let r = replies(&c);
    assert!(matches!(&r[..], [(7, Err(e))] if e.msg.contains("pause fetching first")));
    let k = keys::todo(&w.res.clone(), &h("b"), "fetch");
    w.set(&k, "0");
    w.sync();
    let c = w.ev(Event::Op {
        id: 8,
        op: Op::Primary {
            force: true,
            timeout: 10_000,
            confirmed: true,
        },
    });
    let acts = acts(&c);
    let mark = acts
        .iter()
        .position(|c| *c == Command::Persist(Control::Marker(Marker::Force, true)))
        .expect("force marker");
    let designate = acts
        .iter()
        .position(|c| matches!(c, Command::Publish { set, .. } if set.iter().any(|(k, v)| k.ends_with("/primary") && v == "b")))
        .expect("designation");
    assert!(mark < designate, "the marker first: {acts:?}");
    // The designation arrives; after the settle time b promotes with what it replayed.
    w.sync();
    w.at(600);
    let c = w.ev(Event::Wake);
    assert!(
        c.iter()
            .any(|c| matches!(c, Command::Promote { cut_at, .. } if *cut_at == LogPos::new(3, 5))),
        "{c:?}"
    );
    let c = w.ev(opened(LogPos::new(4, 0), &[(3, "a", 5), (4, "b", 0)]));
    assert!(published(&c).contains(&(keys::todo(&w.res.clone(), &h("b"), "fetch"), "1".into())));
    assert!(matches!(&replies(&c)[..], [(8, Ok(m))] if m.contains("primary now (forced)")));
}

// ---------------------------------------------------------------- found by mars-sim

/// Found by mars-sim (the first seed that wrote and rotated): the completion of `ReclaimLogs`
/// came back before fresh statistics, the pass after it still saw the deleted logfiles in the
/// volume's stats and asked to reclaim them again, and again: the engine and its executor
/// spun. The engine forgets what was deleted until the next statistics say more.
#[test]
fn reclaimed_logfiles_are_not_reclaimed_again_before_fresh_stats() {
    let mut w = World::cluster("a", &["a"], Some("a"));
    w.start(false);
    let c = w.ev(opened(LogPos::new(2, 0), &[(1, "a", 10), (2, "a", 0)]));
    assert!(
        c.contains(&Command::ReclaimLogs { below: Some(2) }),
        "log 1 is written back and linked: {c:?}"
    );
    let c = w.ev(Event::Done(Done::Reclaimed {
        removed: vec!["log-000000001-a".into()],
    }));
    assert_eq!(logs(&c), vec!["r: deleted logfiles log-000000001-a"]);
    assert!(
        !c.iter().any(|c| matches!(c, Command::ReclaimLogs { .. })),
        "asked again: {c:?}"
    );
    // Fresh statistics without logfile 1: nothing to do either.
    let c = w.stats(Stats {
        volume: Some(volume(LogPos::new(2, 0), &[(2, "a", 0)])),
        ..Default::default()
    });
    assert!(!c.iter().any(|c| matches!(c, Command::ReclaimLogs { .. })));
}

/// Found by mars-sim (seed 80): a full sync that started over because its source changed
/// purged this host's version links and adopted the new source's link of the logfile before
/// the start in one publication, which set and deleted that very key: the adopted link was
/// gone at once. The replica, promoted later, could publish no version link at all (the chain
/// had no start), and a replica of another history looked up to date.
#[test]
fn a_restarted_sync_keeps_the_link_it_adopts() {
    let mut w = World::cluster("b", &["a", "b", "c"], Some("c"));
    // `a` was the primary b synced from; `c` took over (another history).
    w.report("a", &secondary_report(LogPos::new(2, 7), 0));
    w.report("c", &primary_report(LogPos::new(5, 3)));
    let old = version::link("", 2, &h("a"), 7);
    w.set("resource-r/version-000000002-b", &old);
    w.start(true);
    let facts = ReplicaFacts {
        copies: Vec::new(),
        applied: LogPos::new(3, 0),
        sync: Some(SyncFile {
            start: Some(LogPos::new(3, 0)),
            done: 0,
            size: 1 << 20,
            end: None,
            transferred: 0,
            from: Some(h("a")),
        }),
        needs_sync: None,
    };
    let c = w.ev(Event::Done(Done::ReplicaOpened(Ok(facts))));
    let id = c
        .iter()
        .find_map(|c| match c {
            Command::StartSync { id, source, .. } if *source == h("c") => Some(*id),
            _ => None,
        })
        .expect("the sync starts over from c");
    // c's history has another logfile 2 (it took over from a shorter copy of it).
    let theirs = version::link("", 2, &h("a"), 3);
    let c = w.ev(Event::Sync(
        id,
        SyncEvent::Info {
            size: 1 << 20,
            start: LogPos::new(3, 0),
            prev_link: theirs.clone(),
        },
    ));
    let key = "resource-r/version-000000002-b".to_string();
    assert!(published(&c).contains(&(key.clone(), theirs.clone())));
    for cmd in &c {
        if let Command::Publish { delete, .. } = cmd {
            assert!(!delete.contains(&key), "the adopted link is deleted: {c:?}");
        }
    }
    // The store and the engine hold the adopted link, not the old one.
    assert_eq!(
        w.keys.get(&key).map(|(v, _)| v.clone()),
        Some(theirs.clone())
    );
    assert_eq!(w.e.meta().version(2, &h("b")), Some(theirs.as_str()));
}

/// Found by mars-sim (seed 182): a replica whose replay is paused sits at the start of a
/// logfile it fetched from the primary, but its own logfile before is another history's (the
/// primary took over by force from an older position). The fetch session had started before
/// the primary published its link of that logfile, so the server's history check had nothing
/// to compare; its caught-up confirmation then made the replica `UpToDate` on another
/// history. A confirmation of a position in a logfile replay has not entered counts only once
/// the entry check of that logfile passes.
#[test]
fn a_confirmation_at_an_unentered_logfile_needs_its_entry_check() {
    let mut w = World::cluster("c", &["a", "b", "c"], Some("b"));
    w.report("b", &primary_report(LogPos::new(4, 0)));
    let ours = version::link("", 3, &h("a"), 0);
    w.set("resource-r/version-000000003-c", &ours);
    w.set("resource-r/todo-c/replay", "0");
    w.start(true);
    let c = open_replica(&mut w, &[(4, "b", 0, false)], LogPos::new(4, 0));
    let (id, source, from, _) = start_fetch_of(&c).expect("fetch starts");
    assert_eq!((source, from), (h("b"), LogPos::new(4, 0)));
    let confirm = |w: &mut World| {
        let stamp = w.now.wall_ns;
        w.ev(Event::Fetch(id, FetchEvent::Connected));
        w.ev(Event::Fetch(
            id,
            FetchEvent::CaughtUp {
                pos: LogPos::new(4, 0),
                stamp,
            },
        ));
        w.e.report_now().caught_up
    };
    // b's link of logfile 3 is not known here yet: nothing verified, no confirmation.
    assert!(!confirm(&mut w));
    // b's logfile 3 is b's own: another history.
    let theirs = version::link("", 3, &h("b"), 10);
    w.set("resource-r/version-000000003-b", &theirs);
    w.sync();
    assert!(!confirm(&mut w));
    // The same logfile 3 as ours: the confirmation counts.
    w.set("resource-r/version-000000003-b", &ours);
    w.sync();
    assert!(confirm(&mut w));
}

/// Found by mars-sim (seed 247): `b` had taken over by force and written its own logfile 1,
/// then left the primary role (nobody designated) and needed a full sync; `a`, of the older
/// history (its own link of logfile 1 reclaimed), was designated by a planned handover and
/// promoted: whether `b`'s log end lies in `a`'s history was judged by the link of logfile 1
/// of its writer, `b` itself, a tautology. Nothing can tell here: the planned promotion waits.
#[test]
fn a_planned_promotion_does_not_take_a_members_own_link_as_witness() {
    let mut w = World::cluster("a", &["a", "b"], Some("a"));
    let designation = w.keys["resource-r/primary"].1;
    let theirs = version::link("", 1, &h("b"), 59);
    w.set("resource-r/version-000000001-b", &theirs);
    let ours1 = version::link("", 1, &h("a"), 10);
    w.set(
        "resource-r/version-000000002-a",
        &version::link(&ours1, 2, &h("a"), 5),
    );
    // b: its logfile 1 replayed, the next one gone at its source: it needs a full sync.
    let b = Report {
        needs_sync: true,
        consistent: false,
        pin: None,
        ..secondary_report(LogPos::new(2, 0), designation)
    };
    w.report("b", &b);
    w.start(true);
    let c = open_replica(&mut w, &[], LogPos::new(3, 0));
    assert!(
        !c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "promoted over another history: {c:?}"
    );
    let st = w.e.status();
    assert_eq!(
        st.report.stuck_kind,
        Some(crate::reason::StuckKind::RoleWait)
    );
}

/// Found by mars-sim (seed 247, later): as above with `b` unreachable. An unreachable member
/// whose log end cannot be placed is ignored (it must not block handovers forever), but here
/// the links do tell: our link of logfile 2 chains on the link of logfile 1 our history had,
/// and `b`'s link of logfile 1 does not give it. The planned promotion waits.
#[test]
fn a_planned_promotion_places_a_log_end_by_our_next_link() {
    let mut w = World::cluster("a", &["a", "b"], Some("a"));
    let designation = w.keys["resource-r/primary"].1;
    let theirs = version::link("", 1, &h("b"), 59);
    w.set("resource-r/version-000000001-b", &theirs);
    let ours1 = version::link("", 1, &h("a"), 10);
    w.set(
        "resource-r/version-000000002-a",
        &version::link(&ours1, 2, &h("a"), 5),
    );
    let b = Report {
        needs_sync: true,
        consistent: false,
        pin: None,
        ..secondary_report(LogPos::new(2, 0), designation)
    };
    w.report("b", &b);
    w.live(&["a"], &["a"]);
    w.start(true);
    let c = open_replica(&mut w, &[], LogPos::new(3, 0));
    assert!(
        !c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "promoted over another history: {c:?}"
    );
    // Had b's logfile 1 been ours, its end would lie in our history: go.
    let mut w2 = World::cluster("a", &["a", "b"], Some("a"));
    let designation = w2.keys["resource-r/primary"].1;
    w2.set("resource-r/version-000000001-b", &ours1);
    w2.set(
        "resource-r/version-000000002-a",
        &version::link(&ours1, 2, &h("a"), 5),
    );
    let b = Report {
        needs_sync: true,
        consistent: false,
        pin: None,
        ..secondary_report(LogPos::new(2, 0), designation)
    };
    w2.report("b", &b);
    w2.live(&["a"], &["a"]);
    w2.start(true);
    let c = open_replica(&mut w2, &[], LogPos::new(3, 0));
    assert!(
        c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "{c:?}"
    );
}

/// A handover straight back (seen in CI): `b` took over from `a` and handed back at once. Its
/// logfile 6 was still empty when it left, so it dropped it, and with its copy of 5 reclaimed
/// it holds no logfile at all: nobody will ever tell `a` that its copy of 5 is complete (no
/// `LogEnd`, no logfile 6), while `b` reports 6:0 as its log end. The version links of 5 say
/// that 5 ends where `a`'s copy ends, which is where 6 starts: the promotion goes.
#[test]
fn a_promotion_takes_the_next_logfiles_start_as_the_end_the_links_show() {
    let len = 1_048_624;
    let link4 = version::link("", 4, &h("a"), 100);
    let link5 = version::link(&link4, 5, &h("b"), len);
    let world = |links_of_5: bool| {
        let mut w = World::cluster("a", &["a", "b"], Some("a"));
        let designation = w.keys["resource-r/primary"].1;
        for host in ["a", "b"] {
            w.set(&format!("resource-r/version-000000004-{host}"), &link4);
            if links_of_5 {
                w.set(&format!("resource-r/version-000000005-{host}"), &link5);
            }
        }
        w.report("b", &secondary_report(LogPos::new(6, 0), designation));
        w.start(true);
        let mut c = open_replica(&mut w, &[(5, "b", len, false)], LogPos::new(5, len));
        c.extend(w.sync());
        (w, c)
    };
    let (_, c) = world(true);
    assert!(
        c.iter().any(|c| matches!(c, Command::Promote { cut_at, .. }
            if *cut_at == LogPos::new(5, len))),
        "{c:?}"
    );
    // Without a link of 5 nothing says the copy is complete: a waits for b.
    let (w, c) = world(false);
    assert!(
        !c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "{c:?}"
    );
    assert_eq!(w.e.replica().unwrap().applied, LogPos::new(5, len));
}

/// Found by mars-sim (seed 915): a planned handover from `a` to `c` timed out while `c` could
/// not catch up, and the compensation designated `a` again, although `a` had meanwhile been
/// invalidated and had left the resource: the resource had a designated primary holding
/// nothing (it later re-joined and, designated, opened an empty volume). The old primary gets
/// the role back only while it is a member holding a consistent copy.
#[test]
fn a_late_handover_does_not_give_the_role_back_to_a_member_that_left() {
    let mut w = World::cluster("c", &["a", "b", "c"], Some("a"));
    w.report("a", &primary_report(LogPos::new(2, 15)));
    w.start(true);
    open_replica(&mut w, &[(2, "a", 6, false)], LogPos::new(2, 6));
    w.sync();
    let c = w.ev(Event::Op {
        id: 7,
        op: Op::Primary {
            force: false,
            timeout: 5_000,
            confirmed: false,
        },
    });
    assert!(replies(&c).is_empty(), "the handover runs: {c:?}");
    assert_eq!(w.keys["resource-r/primary"].0, "c");
    w.sync();
    // `a` leaves the primary role at 2:15; `b` has all of it too.
    let designation = w.keys["resource-r/primary"].1;
    w.report("a", &secondary_report(LogPos::new(2, 15), designation));
    w.report("b", &secondary_report(LogPos::new(2, 15), designation));
    w.sync();
    // `a` is invalidated and leaves the resource; `c` never catches up.
    w.del("resource-r/data-a");
    w.del("resource-r/actual-a");
    w.sync();
    w.at(6_000);
    let c = w.ev(Event::Wake);
    assert!(
        !published(&c).contains(&("resource-r/primary".to_string(), "a".to_string())),
        "the role goes back to a host that left: {c:?}"
    );
    let r = replies(&c);
    assert_eq!(r.len(), 1, "{c:?}");
    assert!(r[0].1.is_err());
}

/// Found by mars-sim (seed 1775): a full sync started at logfile 4 from a host acting as
/// primary without being designated (it publishes no version links), which could not say
/// which history the copy continues (no link of logfile 3). The replica took the copy without
/// one; every later chain check then had nothing to compare, and once another history's
/// primary confirmed it, it looked up to date. A copy that starts after logfile 1 needs the
/// link of the logfile before (unless the source's chain starts there): without it the sync
/// is tried again later.
#[test]
fn a_sync_without_the_link_before_its_start_is_not_taken() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(4, 0)));
    w.start(true);
    let facts = ReplicaFacts {
        sync: Some(SyncFile::full(1 << 20)),
        ..Default::default()
    };
    let c = w.ev(Event::Done(Done::ReplicaOpened(Ok(facts))));
    let id = c
        .iter()
        .find_map(|c| match c {
            Command::StartSync { id, .. } => Some(*id),
            _ => None,
        })
        .expect("the sync starts");
    let info = |prev_link: &str| SyncEvent::Info {
        size: 1 << 20,
        start: LogPos::new(4, 0),
        prev_link: prev_link.to_string(),
    };
    let c = w.ev(Event::Sync(id, info("")));
    assert!(c.contains(&Command::StopSync { id }), "{c:?}");
    assert!(!c.iter().any(|c| matches!(c, Command::SyncGo { .. })));
    // Tried again after the backoff, and taken with the link.
    w.at(1_000);
    let c = w.ev(Event::Wake);
    let id = c
        .iter()
        .find_map(|c| match c {
            Command::StartSync { id, .. } => Some(*id),
            _ => None,
        })
        .expect("the sync starts again");
    let l3 = version::link("", 3, &h("a"), 5);
    let c = w.ev(Event::Sync(id, info(&l3)));
    assert!(
        c.iter().any(|c| matches!(c, Command::SyncGo { .. })),
        "{c:?}"
    );
    assert!(published(&c).contains(&("resource-r/version-000000003-b".into(), l3)));
}

/// Found by mars-sim (seed 3164): `d` ran `primary`, crashed before it took over, and when it
/// started again its engine promoted at once on the metadata from before the crash: nobody was
/// reachable yet, so "every reachable member reported under this designation" held trivially,
/// and `c`'s forced primary period since was unknown here; `c`'s last writes were lost in a
/// planned handover. As a primary role found on disk, a planned promotion waits for every
/// member's metadata since the start (`Liveness::fresh`), at most `stale_primary_wait`.
#[test]
fn a_planned_promotion_after_a_restart_waits_for_fresh_metadata() {
    let mut w = World::cluster("d", &["b", "c", "d"], Some("d"));
    let designation = w.keys["resource-r/primary"].1;
    for m in ["b", "c"] {
        w.report(m, &secondary_report(LogPos::new(7, 0), designation));
    }
    w.ev(Event::Liveness(Liveness {
        fresh: false,
        ..Default::default()
    }));
    w.start(true);
    let c = open_replica(&mut w, &[], LogPos::new(7, 0));
    assert!(
        !c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "promoted on metadata from before the start: {c:?}"
    );
    assert_eq!(
        w.e.status().report.stuck_kind,
        Some(crate::reason::StuckKind::RoleWait)
    );
    // Every member answered: the rules decide on fresh metadata.
    let c = w.live(&["b", "c", "d"], &["b", "c", "d"]);
    assert!(
        c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "{c:?}"
    );
}

/// Found by mars-sim (seed 3285): `primary --force` on `a` set the force marker, `a` crashed
/// before it took over and the designation went elsewhere; the marker stayed. Much later a
/// planned `primary` on `a` designated it again, and the promotion, seeing the marker, went by
/// force: it did not wait for the old primary's last writes. A planned command that starts
/// clears a force marker left from before.
#[test]
fn a_planned_handover_clears_a_leftover_force_marker() {
    let mut w = World::cluster("a", &["a", "b"], Some("b"));
    w.report("b", &primary_report(LogPos::new(4, 2)));
    w.sync();
    w.ev(Event::Started(LocalFacts {
        replica_marker: true,
        force_marker: true,
        size: 1 << 20,
        ..Default::default()
    }));
    open_replica(&mut w, &[(3, "b", 12, false)], LogPos::new(3, 12));
    let c = w.ev(Event::Op {
        id: 3,
        op: Op::Primary {
            force: false,
            timeout: 30_000,
            confirmed: false,
        },
    });
    assert!(
        c.contains(&Command::Persist(Control::Marker(Marker::Force, false))),
        "{c:?}"
    );
    w.sync();
    // `b` left the primary role at 4:2; `a` has applied 3:12 only.
    let designation = w.keys["resource-r/primary"].1;
    w.report("b", &secondary_report(LogPos::new(4, 2), designation));
    w.sync();
    w.at(1_000);
    let c = w.ev(Event::Wake);
    assert!(
        !c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "a planned handover went by force: {c:?}"
    );
}

/// Found by mars-sim (seed 3919): `a` had replayed 5 records of `b`'s logfile 7; `d`, the old
/// primary, had written its own logfile 7 (3 records) after the same logfile 6, and left the
/// role. A planned promotion of `a` compared positions (7:5 is beyond 7:3) and the links of
/// logfile 6 (equal) and went: a fork exactly at a logfile start, which the links of the
/// logfile before cannot show. A member's log end inside the logfile we are in must be in a
/// logfile of the same writer.
#[test]
fn a_planned_promotion_sees_a_fork_at_a_logfile_start() {
    let mut w = World::cluster("a", &["a", "d"], Some("a"));
    let designation = w.keys["resource-r/primary"].1;
    let l6 = version::link("", 6, &h("b"), 9);
    w.set("resource-r/version-000000006-a", &l6);
    w.set("resource-r/version-000000006-d", &l6);
    w.set(
        "resource-r/version-000000007-d",
        &version::link(&l6, 7, &h("d"), 3),
    );
    w.report("d", &secondary_report(LogPos::new(7, 3), designation));
    w.start(true);
    let c = open_replica(&mut w, &[(7, "b", 5, false)], LogPos::new(7, 5));
    assert!(
        !c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "promoted over d's logfile 7: {c:?}"
    );
    assert_eq!(
        w.e.status().report.stuck_kind,
        Some(crate::reason::StuckKind::RoleWait)
    );
}

/// Found by mars-sim (seed 2369): `a` restarted after a crash as primary and opened a replica
/// on its own log, replay to continue from the writeback position. The primary's logfile 2 was
/// another host's: a fork, and replay stopped altogether, also for `a`'s own records. A forced
/// switch then took what was replayed and cut `a`'s own, flushed writes. A fork with the
/// source stops nothing of our own logfile: its replay goes on, and a forced switch waits
/// for it.
#[test]
fn a_fork_does_not_stop_the_replay_of_our_own_logfile() {
    let mut w = World::cluster("a", &["a", "b"], Some("b"));
    w.report("b", &primary_report(LogPos::new(2, 5)));
    w.start(true);
    let c = open_replica(&mut w, &[(2, "a", 20, false)], LogPos::new(2, 8));
    let replay = c
        .iter()
        .find_map(|c| match c {
            Command::StartReplay {
                id,
                file: 2,
                from: 8,
                to: 20,
                ..
            } => Some(*id),
            _ => None,
        })
        .expect("our own log is replayed");
    let (fetch, ..) = start_fetch_of(&c).expect("fetch starts");
    let c = w.ev(Event::Fetch(
        fetch,
        FetchEvent::Offer {
            no: 2,
            origin: h("b"),
        },
    ));
    assert!(c.contains(&Command::CopyDecision {
        id: fetch,
        no: 2,
        decision: CopyDecision::Reject
    }));
    assert!(
        !c.contains(&Command::StopReplay { id: replay }),
        "the fork stops the replay of our own records: {c:?}"
    );
    // A forced switch replays our own records first.
    w.ev(Event::Op {
        id: 1,
        op: Op::Switch {
            switches: vec!["fetch".into()],
            on: false,
        },
    });
    let c = w.ev(Event::Op {
        id: 2,
        op: Op::Primary {
            force: true,
            timeout: 30_000,
            confirmed: true,
        },
    });
    assert!(replies(&c).is_empty(), "{c:?}");
    w.sync();
    w.at(1_000);
    let c = w.ev(Event::Wake);
    assert!(
        !c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "{c:?}"
    );
    let c = w.ev(Event::Replay(
        replay,
        ReplayEvent::Stopped {
            pos: LogPos::new(2, 20),
            end: ReplayEnd::Done,
        },
    ));
    assert!(
        c.contains(&Command::Promote {
            cut_at: LogPos::new(2, 20),
            size: 1 << 20
        }),
        "{c:?}"
    );
}

/// Seen in mars-sim's traces: after a fork (the source names a logfile of another origin), the
/// fetch started again at once, the source named the same logfile, and so on: a new session
/// and an error line every round trip. A rejected copy backs off like a failed session.
#[test]
fn a_fork_backs_off_before_fetching_again() {
    let mut w = World::cluster("a", &["a", "b"], Some("b"));
    w.report("b", &primary_report(LogPos::new(2, 5)));
    w.start(true);
    let c = open_replica(&mut w, &[(2, "c", 20, true)], LogPos::new(3, 0));
    let (fetch, ..) = start_fetch_of(&c).expect("fetch starts");
    let offer = FetchEvent::Offer {
        no: 2,
        origin: h("b"),
    };
    let out = w.e.on_event(w.now, Event::Fetch(fetch, offer));
    assert!(
        start_fetch_of(&out.commands).is_none(),
        "{:?}",
        out.commands
    );
    let wake = out.wake_at.expect("a retry is due later");
    assert!(wake > w.now.ms, "{out:?}");
    w.at(wake - w.now.ms);
    let c = w.ev(Event::Wake);
    assert!(start_fetch_of(&c).is_some(), "{c:?}");
}

/// The log filled up faster than free space is measured: the volume entered emergency mode by
/// itself (writes never fail for space). The measurement after it shows that; the engine
/// records it once like a switch it asked for (the marker, an error line, the report), asks
/// for no second switch, and restarts the log after a hole once space is back.
#[test]
fn a_volume_in_emergency_mode_by_itself_is_recorded_once_and_left_when_space_is_back() {
    let mut w = World::cluster("a", &["a"], Some("a"));
    w.start(false);
    w.ev(opened(LogPos::new(1, 10), &[(1, "a", 10)]));
    let full = Stats {
        free_space: Some(1 << 20),
        total_space: Some(8 << 30),
        volume: Some(VolumeStats {
            passthrough: true,
            ..volume(LogPos::new(1, 10), &[(1, "a", 10)])
        }),
        ..Default::default()
    };
    let c = w.stats(full.clone());
    assert!(
        acts(&c).contains(&Command::Persist(Control::Marker(Marker::Emergency, true))),
        "{c:?}"
    );
    assert!(
        logs(&c).iter().any(|l| l.contains("EMERGENCY MODE")),
        "{c:?}"
    );
    assert!(
        !c.iter()
            .any(|c| matches!(c, Command::EnterPassthrough | Command::RestartLog)),
        "{c:?}"
    );
    let rep = published(&c)
        .iter()
        .find(|(k, _)| k == "resource-r/actual-a")
        .map(|(_, v)| Report::from_json(v).unwrap())
        .expect("report");
    assert!(rep.emergency);
    // Measured again, still full: nothing new.
    w.at(1_000);
    let c = w.stats(full.clone());
    assert!(acts(&c).is_empty(), "{c:?}");
    assert!(logs(&c).is_empty(), "{c:?}");
    // Space is back.
    w.at(1_000);
    let c = w.stats(Stats {
        free_space: Some(4 << 30),
        ..full
    });
    assert!(acts(&c).contains(&Command::RestartLog), "{c:?}");
}

/// A record beyond the device as this host knows it (a resize whose new size has not arrived
/// here yet, or a log that is not this device's): replay stops before it and waits, saying
/// why; once the metadata brings a size that holds it, the wait ends.
#[test]
fn a_record_beyond_the_device_waits_for_the_resize() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(1, 100)));
    w.start(true);
    let c = open_replica(&mut w, &[(1, "a", 100, false)], LogPos::new(1, 10));
    let id = c
        .iter()
        .find_map(|c| match c {
            Command::StartReplay {
                id,
                file: 1,
                from: 10,
                to: 100,
                size: 1048576,
                ..
            } => Some(*id),
            _ => None,
        })
        .expect("replay starts");
    let c = w.ev(Event::Replay(
        id,
        ReplayEvent::Stopped {
            pos: LogPos::new(1, 40),
            end: ReplayEnd::BeyondDevice {
                at: 40,
                end: 2 << 20,
            },
        },
    ));
    assert!(
        !c.iter().any(|c| matches!(c, Command::StartReplay { .. })),
        "{c:?}"
    );
    assert!(
        logs(&c)
            .iter()
            .any(|l| l.contains("beyond the 1048576-byte device")),
        "{c:?}"
    );
    w.at(5_000);
    let c = w.stats(Stats::default());
    assert!(
        !c.iter().any(|c| matches!(c, Command::StartReplay { .. })),
        "{c:?}"
    );
    let stuck = w.e.status().report.stuck.unwrap_or_default();
    assert!(stuck.contains("waiting for the resize"), "{stuck}");
    // The resize arrives: the wait ends; the new region comes by a sync first (as for every
    // resize), replay goes on from 1:40 after it.
    let k = keys::size(&w.res.clone());
    w.set(&k, "4194304");
    let c = w.sync();
    assert!(
        c.iter().any(|c| matches!(
            c,
            Command::StartSync {
                done: 1048576,
                size: 4194304,
                ..
            }
        )),
        "{c:?}"
    );
    let stuck = w.e.status().report.stuck.unwrap_or_default();
    assert!(!stuck.contains("resize"), "{stuck}");
}

// ---------------------------------------------------------------- safety rails

fn primary_op(id: OpId, force: bool, confirmed: bool) -> Event {
    Event::Op {
        id,
        op: Op::Primary {
            force,
            timeout: 10_000,
            confirmed,
        },
    }
}

/// `--dry-run`: the same guards decide, nothing but the reply comes out, and the engine's
/// state is as before (the real command afterwards does what the dry run said).
#[test]
fn a_dry_run_emits_only_its_reply_and_changes_no_state() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 5)));
    fetching(&mut w, &[(3, "a", 5, false)], LogPos::new(3, 5));
    // Everything but the event counter.
    let state = |e: &ResourceEngine| {
        let s = format!("{e:?}");
        let i = s.find(" seq: ").expect("seq");
        let j = i + s[i..].find(',').expect("field end");
        format!("{}{}", &s[..i], &s[j..])
    };
    w.ev(Event::Wake);
    let before = state(&w.e);
    let ops = [
        Op::Switch {
            switches: vec!["fetch".into()],
            on: false,
        },
        Op::Invalidate,
        Op::LogPurgeAll,
        Op::Secondary,
        Op::SetEmergencyLimit { pct: 20 },
        Op::LeaveResource { force: true },
        Op::DeleteResource { force: true },
        Op::Primary {
            force: false,
            timeout: 10_000,
            confirmed: false,
        },
        Op::Cron,
    ];
    for (i, op) in ops.into_iter().enumerate() {
        let id = 100 + i as u64;
        let c = w.ev(Event::DryRun { id, op: op.clone() });
        let r = replies(&c);
        assert!(
            matches!(&r[..], [(rid, Ok(m))] if *rid == id && (m.contains("would"))),
            "{op:?}: {c:?}"
        );
        assert!(
            c.iter().all(|c| matches!(c, Command::Reply { .. })),
            "{op:?} emitted more than its reply: {c:?}"
        );
        assert_eq!(state(&w.e), before, "{op:?} changed the engine's state");
    }
    // What it says: a switch names its key, a handover its steps.
    let c = w.ev(Event::DryRun {
        id: 1,
        op: Op::Switch {
            switches: vec!["fetch".into()],
            on: false,
        },
    });
    assert!(
        matches!(&replies(&c)[..], [(1, Ok(m))] if m.contains("set resource-r/todo-b/fetch = 0")),
        "{c:?}"
    );
    let c = w.ev(Event::DryRun {
        id: 2,
        op: Op::Primary {
            force: false,
            timeout: 10_000,
            confirmed: false,
        },
    });
    assert!(
        matches!(&replies(&c)[..], [(2, Ok(m))] if m.contains("would make b the primary of r: planned handover from a")),
        "{c:?}"
    );
    // A refusal is the real one: a forced switch while fetching.
    let c = w.ev(Event::DryRun {
        id: 3,
        op: Op::Primary {
            force: true,
            timeout: 10_000,
            confirmed: true,
        },
    });
    let real =
        w.e.clone()
            .on_event(w.now, primary_op(3, true, true))
            .commands;
    assert_eq!(
        replies(&c),
        replies(&real),
        "the dry run's refusal is the real one"
    );
    assert!(matches!(&replies(&c)[..], [(3, Err(e))] if e.msg.contains("pause fetching first")));
    // The real command does what the dry run described.
    let c = w.ev(Event::Op {
        id: 4,
        op: Op::Switch {
            switches: vec!["fetch".into()],
            on: false,
        },
    });
    assert!(published(&c).contains(&(keys::todo(&w.res.clone(), &h("b"), "fetch"), "0".into())));
}

/// `primary --force` while the old primary is reachable and ahead: refused with what would be
/// lost and the distinct kind, unless confirmed; a dry run says the same. Unreachable, or not
/// ahead, no confirmation is needed.
#[test]
fn a_forced_switch_past_a_reachable_ahead_primary_needs_confirmation() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    // a has written 3:5000; b fetched and replayed up to 3:1000 and pauses fetching.
    w.report("a", &primary_report(LogPos::new(3, 5000)));
    fetching(&mut w, &[(3, "a", 1000, false)], LogPos::new(3, 1000));
    w.set(&keys::todo(&w.res.clone(), &h("b"), "fetch"), "0");
    w.sync();
    let c = w.ev(primary_op(7, true, false));
    let r = replies(&c);
    let [(7, Err(e))] = &r[..] else {
        panic!("not refused: {c:?}")
    };
    assert_eq!(e.kind, crate::reason::OpErrorKind::NeedsConfirmation);
    assert!(e.msg.contains("a is reachable"), "{e}");
    assert!(e.msg.contains("4000 bytes"), "{e}");
    assert!(e.msg.contains("SPLIT BRAIN"), "{e}");
    assert!(e.msg.contains("--force --force"), "{e}");
    assert!(
        c.iter().all(|c| matches!(c, Command::Reply { .. })),
        "a refusal changes nothing: {c:?}"
    );
    // The dry run gives the same refusal.
    let d = w.ev(Event::DryRun {
        id: 7,
        op: Op::Primary {
            force: true,
            timeout: 10_000,
            confirmed: false,
        },
    });
    assert_eq!(replies(&d), r);
    // A confirmed dry run says what is lost.
    let d = w.ev(Event::DryRun {
        id: 8,
        op: Op::Primary {
            force: true,
            timeout: 10_000,
            confirmed: true,
        },
    });
    assert!(
        matches!(&replies(&d)[..], [(8, Ok(m))] if m.contains("by force") && m.contains("4000 bytes") && m.contains("SPLIT BRAIN")),
        "{d:?}"
    );
    // Confirmed, it goes ahead: the force marker and the designation.
    let c = w.ev(primary_op(9, true, true));
    assert!(replies(&c).is_empty(), "{c:?}");
    assert!(acts(&c).contains(&Command::Persist(Control::Marker(Marker::Force, true))));
    // Unreachable, the old primary's writes are what a failover is for: no confirmation.
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 5000)));
    fetching(&mut w, &[(3, "a", 1000, false)], LogPos::new(3, 1000));
    w.set(&keys::todo(&w.res.clone(), &h("b"), "fetch"), "0");
    w.sync();
    w.live(&["b"], &[]);
    let c = w.ev(primary_op(10, true, false));
    assert!(replies(&c).is_empty(), "{c:?}");
    assert!(acts(&c).contains(&Command::Persist(Control::Marker(Marker::Force, true))));
    // Reachable but not ahead: nothing to lose, no confirmation.
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 1000)));
    fetching(&mut w, &[(3, "a", 1000, false)], LogPos::new(3, 1000));
    w.set(&keys::todo(&w.res.clone(), &h("b"), "fetch"), "0");
    w.sync();
    let c = w.ev(primary_op(11, true, false));
    assert!(replies(&c).is_empty(), "{c:?}");
}

// ---------------------------------------------------------------- the local block device

/// Issue 17: a promotion whose block device cannot be set up is not a success. The role is
/// taken (the data is here, the designation stays, as in MARS), the command fails with the
/// reason, and the engine tries the device again with a growing backoff until it is there.
#[test]
fn a_promotion_without_its_device_fails_and_the_device_is_retried() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 5)));
    fetching(&mut w, &[(3, "a", 5, false)], LogPos::new(3, 5));
    let k = keys::todo(&w.res.clone(), &h("b"), "fetch");
    w.set(&k, "0");
    w.sync();
    w.ev(primary_op(8, true, true));
    w.sync();
    w.at(600);
    let c = w.ev(Event::Wake);
    assert!(
        c.iter().any(|c| matches!(c, Command::Promote { .. })),
        "{c:?}"
    );
    let why = "/dev/mars/r exists and is not a device of marsd (a regular file)";
    let c = w.ev(Event::Done(Done::VolumeOpened(Ok(Opened {
        stats: volume(LogPos::new(4, 0), &[(3, "a", 5), (4, "b", 0)]),
        restarted_at: None,
        device: Some(Err(why.into())),
    }))));
    // Fetching resumes as after any forced switch; the reply is a failure with the reason.
    assert!(published(&c).contains(&(keys::todo(&w.res.clone(), &h("b"), "fetch"), "1".into())));
    match &replies(&c)[..] {
        [(8, Err(e))] => {
            assert!(
                e.msg.contains("block device could not be set up"),
                "{}",
                e.msg
            );
            assert!(e.msg.contains(why), "{}", e.msg);
            assert_eq!(e.kind, crate::reason::OpErrorKind::Failed, "{e:?}");
        }
        r => panic!("{r:?}"),
    }
    assert!(w.e.is_primary(), "the role is taken: the data is here");
    // The device is tried again after 1 s, then 2 s, 4 s … (a changed reason is logged).
    let tries = |c: &[Command]| c.iter().filter(|c| **c == Command::AttachDevice).count();
    assert_eq!(tries(&c), 0, "{c:?}");
    w.at(900);
    assert_eq!(tries(&w.ev(Event::Wake)), 0, "backoff");
    w.at(100);
    let c = w.ev(Event::Wake);
    assert_eq!(tries(&c), 1, "{c:?}");
    let c = w.ev(Event::Done(Done::DeviceAttached(Some(Err(why.into())))));
    assert_eq!(tries(&c), 0);
    assert!(
        logs(&c).is_empty(),
        "the same reason is not logged again: {c:?}"
    );
    w.at(1_900);
    assert_eq!(tries(&w.ev(Event::Wake)), 0, "backoff");
    w.at(200);
    assert_eq!(tries(&w.ev(Event::Wake)), 1);
    let c = w.ev(Event::Done(Done::DeviceAttached(Some(Ok(
        "/dev/mars/r".into()
    )))));
    assert!(
        logs(&c)
            .iter()
            .any(|l| l.contains("block device /dev/mars/r set up")),
        "{c:?}"
    );
    w.at(60_000);
    assert_eq!(tries(&w.ev(Event::Wake)), 0, "there now: no more tries");
    // `primary` again on the primary with its device: a plain success.
    let c = w.ev(primary_op(9, false, false));
    assert!(matches!(&replies(&c)[..], [(9, Ok(_))]), "{c:?}");
}

/// `primary` on a primary that serves no device says so instead of succeeding.
#[test]
fn primary_again_on_a_primary_without_its_device_fails_with_the_reason() {
    let mut w = World::cluster("a", &["a"], Some("a"));
    w.start(false);
    w.ev(Event::Done(Done::VolumeOpened(Ok(Opened {
        stats: volume(LogPos::new(1, 0), &[(1, "a", 0)]),
        restarted_at: None,
        device: Some(Err("no free loop device".into())),
    }))));
    let c = w.ev(primary_op(3, false, false));
    match &replies(&c)[..] {
        [(3, Err(e))] => assert!(
            e.msg
                .contains("block device is missing: no free loop device"),
            "{}",
            e.msg
        ),
        r => panic!("{r:?}"),
    }
}

// ---------------------------------------------------------------- *-global requests

/// A `*-global` request by `by` (as `marsadm pause-fetch-global` writes it).
fn request(w: &mut World, switch: &str, on: bool, by: &str) {
    let k = keys::request(&w.res.clone(), switch);
    let v = crate::request::RequestValue { on, by: h(by) }.to_json();
    w.set(&k, &v);
}

/// The switch and record writes a command list holds for `switch` of `me`.
fn switch_writes(cmds: &[Command], me: &str, switch: &str) -> Vec<(String, String)> {
    let todo = format!("resource-r/todo-{me}/{switch}");
    let rec = format!("resource-r/todo-{me}/applied/{switch}");
    published(cmds)
        .into_iter()
        .filter(|(k, _)| *k == todo || *k == rec)
        .collect()
}

#[test]
fn a_global_request_is_applied_once_and_stops_the_fetch() {
    let mut w = World::cluster("b", &["a", "b", "c"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 100)));
    let id = fetching(&mut w, &[(3, "a", 40, false)], LogPos::new(3, 40));
    request(&mut w, "fetch", false, "c");
    let stamp = w.stamp;
    let c = w.sync();
    // The switch and the record of what was applied, in one write; the fetch stops at once.
    let want_rec = crate::RequestId { stamp, by: h("c") }.to_json();
    assert_eq!(
        switch_writes(&c, "b", "fetch"),
        vec![
            ("resource-r/todo-b/fetch".to_string(), "0".to_string()),
            ("resource-r/todo-b/applied/fetch".to_string(), want_rec),
        ]
    );
    assert!(c.contains(&Command::StopFetch { id }), "{c:?}");
    assert!(
        logs(&c)
            .iter()
            .any(|l| l.contains("fetch off (requested by c)")),
        "{c:?}"
    );
    assert!(!w.e.meta().members[&h("b")].todo.fetch);
    // The same request seen again (the store's round trip, any later change): nothing.
    let c = w.sync();
    assert!(switch_writes(&c, "b", "fetch").is_empty(), "{c:?}");
    w.at(1000);
    let c = w.ev(Event::Wake);
    assert!(switch_writes(&c, "b", "fetch").is_empty(), "{c:?}");
}

#[test]
fn a_local_change_wins_over_an_applied_request_until_a_newer_one() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 100)));
    fetching(&mut w, &[(3, "a", 40, false)], LogPos::new(3, 40));
    request(&mut w, "fetch", false, "a");
    w.sync();
    w.sync();
    // resume-fetch-local after the global pause.
    let c = w.ev(Event::Op {
        id: 7,
        op: Op::Switch {
            switches: vec!["fetch".into()],
            on: true,
        },
    });
    assert!(matches!(&replies(&c)[..], [(7, Ok(_))]), "{c:?}");
    let c = w.sync();
    assert!(switch_writes(&c, "b", "fetch").is_empty(), "{c:?}");
    assert!(w.e.meta().members[&h("b")].todo.fetch);
    // A restart: a new engine that reads the same store applies nothing again (the record
    // of what it applied is in the store).
    let mut fresh = World::new("b");
    fresh.keys = w.keys.clone();
    fresh.stamp = w.stamp;
    fresh.live(&["a", "b"], &["a", "b"]);
    let c = fresh.start(true);
    assert!(switch_writes(&c, "b", "fetch").is_empty(), "{c:?}");
    // A newer request is applied over the local change.
    request(&mut w, "fetch", false, "a");
    let c = w.sync();
    assert_eq!(
        switch_writes(&c, "b", "fetch")[0],
        ("resource-r/todo-b/fetch".to_string(), "0".to_string())
    );
}

#[test]
fn an_older_request_is_ignored() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 100)));
    fetching(&mut w, &[(3, "a", 40, false)], LogPos::new(3, 40));
    request(&mut w, "replay", false, "a");
    w.sync();
    // This host applied a request with a higher stamp than the one the store now holds (the
    // record says so): the store's is older, and is not applied.
    let rec = crate::RequestId {
        stamp: w.stamp + 50,
        by: h("a"),
    };
    let k = keys::applied(&w.res.clone(), &h("b"), "replay");
    w.set(&k, &rec.to_json());
    let k = keys::todo(&w.res.clone(), &h("b"), "replay");
    w.set(&k, "1");
    let c = w.sync();
    assert!(switch_writes(&c, "b", "replay").is_empty(), "{c:?}");
    assert!(w.e.meta().members[&h("b")].todo.replay);
}

#[test]
fn a_request_older_than_the_membership_is_not_applied() {
    let mut w = World::new("c");
    let res = w.res.clone();
    w.set(&keys::size(&res), "1048576");
    for m in ["a", "b"] {
        w.set(&keys::data(&res, &h(m)), "/dev/x");
    }
    w.set(&keys::primary(&res), "a");
    // A year-old pause of every member, then c joins.
    request(&mut w, "sync", false, "a");
    w.set(&keys::data(&res, &h("c")), "/dev/x");
    w.live(&["a", "b", "c"], &["a", "b", "c"]);
    w.report("a", &primary_report(LogPos::new(3, 100)));
    let c = w.start(true);
    assert!(switch_writes(&c, "c", "sync").is_empty(), "{c:?}");
    assert!(w.e.meta().members[&h("c")].todo.sync);
}

#[test]
fn a_malformed_request_is_ignored() {
    let mut w = World::cluster("b", &["a", "b"], Some("a"));
    w.report("a", &primary_report(LogPos::new(3, 100)));
    fetching(&mut w, &[(3, "a", 40, false)], LogPos::new(3, 40));
    let res = w.res.clone();
    for (sw, v) in [
        ("fetch", "0"),
        ("fetch", r#"{"on":false,"by":"a","more":"x"}"#),
        ("attach", r#"{"on":false,"by":"a"}"#),
        ("replay", r#"{"on":false,"by":"NOT A HOST"}"#),
    ] {
        w.set(&keys::request(&res, sw), v);
        let c = w.sync();
        assert!(
            published(&c).iter().all(|(k, _)| !k.contains("/todo-b/")),
            "{sw} {v}: {c:?}"
        );
    }
    let t = w.e.meta().members[&h("b")].todo;
    assert!(t.fetch && t.attach && t.replay);
}

#[test]
fn delete_resource_deletes_the_global_requests_too() {
    let mut w = World::cluster("a", &["a"], Some("a"));
    w.start(false);
    w.ev(opened(LogPos::new(1, 0), &[(1, "a", 0)]));
    request(&mut w, "fetch", false, "a");
    w.sync();
    let c = w.ev(Event::Op {
        id: 9,
        op: Op::DeleteResource { force: false },
    });
    let deleted: Vec<String> = c
        .iter()
        .filter_map(|c| match c {
            Command::Publish { delete, .. } => Some(delete.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        deleted.contains(&"resource-r/request/fetch".to_string()),
        "{c:?}"
    );
    assert!(deleted.contains(&"resource-r/size".to_string()), "{c:?}");
}

/// `secondary` with a systemd stack: as MARS, the want becomes `(none)` with the designation
/// (the stack stops everywhere); the device the stack holds open is no refusal. Without a
/// stack the want is not touched and an open device refuses.
#[test]
fn secondary_with_a_stack_wants_it_nowhere_first() {
    let mut w = World::cluster("a", &["a", "b"], Some("a"));
    let res = w.res.clone();
    w.set(&keys::systemd_start_unit(&res), "app.service");
    w.set(&keys::systemd_want(&res), "a");
    w.sync();
    let c = w.ev(Event::Op {
        id: 7,
        op: Op::Secondary,
    });
    let p = published(&c);
    assert!(
        p.contains(&(keys::systemd_want(&res), "(none)".to_string())),
        "{c:?}"
    );
    assert!(
        p.contains(&(keys::primary(&res), "(none)".to_string())),
        "{c:?}"
    );
    assert!(
        matches!(&replies(&c)[..], [(7, Ok(m))] if m.contains("systemd stack wanted nowhere")),
        "{c:?}"
    );

    let mut w = World::cluster("a", &["a", "b"], Some("a"));
    w.sync();
    let c = w.ev(Event::Op {
        id: 8,
        op: Op::Secondary,
    });
    let p = published(&c);
    assert!(
        p.iter().all(|(k, _)| *k != keys::systemd_want(&res)),
        "{c:?}"
    );
    assert!(p.contains(&(keys::primary(&res), "(none)".to_string())));
}

// ---------------------------------------------------------------- systemd stack

fn unit_jobs(cmds: &[Command]) -> Vec<UnitJob> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::RunUnit(j) => Some(j.clone()),
            _ => None,
        })
        .collect()
}

fn unit_status(job: &UnitJob, code: i32, unknown_unit: bool) -> Event {
    let key = job.op.clone().expect("an operation");
    Event::Done(Done::Unit {
        job: job.clone(),
        status: Some(UnitStatus {
            op: key.op,
            unit: key.unit,
            code: Some(code),
            time_ms: 1,
            want: key.want,
            want_stamp: key.want_stamp,
            error: None,
            unknown_unit,
            tries: 0,
            gave_up: false,
        }),
    })
}

/// Runs jobs without an operation (regenerations) until the start of the stack comes.
fn first_start(w: &mut World, mut c: Vec<Command>) -> UnitJob {
    for _ in 0..4 {
        let jobs = unit_jobs(&c);
        if let Some(j) = jobs
            .iter()
            .find(|j| j.op.as_ref().is_some_and(|k| k.op == UnitOp::Start))
        {
            return j.clone();
        }
        c = Vec::new();
        for job in jobs {
            c.extend(w.ev(Event::Done(Done::Unit { job, status: None })));
        }
        c.extend(w.sync());
    }
    panic!("no start: {c:?}");
}

/// A one-host cluster whose primary `a` wants its stack, with `unit` as the start unit, up to
/// the first start job of the stack.
fn stack_starting(unit: &str) -> (World, ResourceName, UnitJob) {
    let mut w = World::cluster("a", &["a"], Some("a"));
    let res = w.res.clone();
    w.set(&keys::systemd_start_unit(&res), unit);
    w.set(&keys::systemd_want(&res), "a");
    let mut c = w.start(false);
    c.extend(w.ev(opened(LogPos::new(1, 0), &[(1, "a", 0)])));
    let job = first_start(&mut w, c);
    (w, res, job)
}

fn published_status(c: &[Command], res: &ResourceName) -> UnitStatus {
    published(c)
        .into_iter()
        .find(|(k, _)| *k == keys::systemd_status(res, &h("a")))
        .map(|(_, v)| UnitStatus::from_json(&v).unwrap())
        .expect("the status published")
}

/// A start that keeps failing is tried as MARS's `systemctl` helper tries it: seven tries,
/// the first six in `--job-mode=fail`, n seconds after the n-th failure; then it is given up
/// (the published status says so) until the want is written again or `systemd-trigger` asks,
/// each of which starts a new series of seven.
#[test]
fn a_failing_start_is_given_up_after_mars_tries() {
    use crate::systemd::{JOB_MODE_FAIL_TRIES, UNIT_TRIES};
    assert_eq!((UNIT_TRIES, JOB_MODE_FAIL_TRIES), (7, 6));
    let (mut w, res, mut job) = stack_starting("app.service");
    assert_eq!(job.attempt, 1);
    for n in 1..UNIT_TRIES {
        let c = w.ev(unit_status(&job, 1, false));
        let st = published_status(&c, &res);
        assert_eq!((st.tries, st.gave_up), (n, false), "{st:?}");
        assert!(
            st.summary()
                .ends_with(&format!("exit 1 (try {n}, trying again)")),
            "{}",
            st.summary()
        );
        // Not before n seconds.
        w.at(u64::from(n) * 1_000 - 1);
        assert!(unit_jobs(&w.ev(Event::Wake)).is_empty(), "early, try {n}");
        w.at(1);
        let jobs = unit_jobs(&w.ev(Event::Wake));
        assert_eq!(jobs.len(), 1, "try {} after {n} s", n + 1);
        assert_eq!(
            (jobs[0].op.as_ref(), jobs[0].attempt),
            (job.op.as_ref(), n + 1)
        );
        // A retry does not ask for a regeneration.
        assert!(!jobs[0].regenerate);
        job = jobs[0].clone();
    }
    // The seventh failure: given up.
    let c = w.ev(unit_status(&job, 1, false));
    let st = published_status(&c, &res);
    assert!(st.gave_up && st.tries == UNIT_TRIES && !st.ok(), "{st:?}");
    assert!(
        st.summary().contains("gave up after 7 tries"),
        "{}",
        st.summary()
    );
    for _ in 0..5 {
        w.at(60_000);
        let c = w.ev(Event::Wake);
        assert!(unit_jobs(&c).is_empty(), "tried again: {c:?}");
    }
    assert!(unit_jobs(&w.sync()).is_empty());
    // `systemd-trigger`: a new series from try 1.
    let c = w.ev(Event::Op {
        id: 4,
        op: Op::SystemdTrigger,
    });
    let jobs = unit_jobs(&c);
    assert_eq!(jobs.len(), 1, "{c:?}");
    assert_eq!((jobs[0].op.as_ref(), jobs[0].attempt), (job.op.as_ref(), 1));
    // It succeeds: the status says ok, with no tries in the text.
    let c = w.ev(unit_status(&jobs[0], 0, false));
    let st = published_status(&c, &res);
    assert_eq!(st.summary(), "start app.service: ok");
    // Given up again, then the want written again (the same value, a new entry): a new
    // series too.
    let c = w.ev(Event::Op {
        id: 5,
        op: Op::SystemdTrigger,
    });
    let mut job = unit_jobs(&c).remove(0);
    for n in 1..=UNIT_TRIES {
        assert_eq!(job.attempt, n);
        w.ev(unit_status(&job, 1, false));
        w.at(u64::from(n) * 1_000);
        match unit_jobs(&w.ev(Event::Wake)).pop() {
            Some(j) => job = j,
            None => assert_eq!(n, UNIT_TRIES),
        }
    }
    w.set(&keys::systemd_want(&res), "a");
    let jobs = unit_jobs(&w.sync());
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].attempt, 1);
    assert_ne!(jobs[0].op, job.op, "a new want entry: another operation");
}

/// A `.script` is run once: MARS runs scripts directly, without tries.
#[test]
fn a_failing_script_is_given_up_at_once() {
    let (mut w, res, job) = stack_starting("app.script");
    let c = w.ev(unit_status(&job, 2, false));
    let st = published_status(&c, &res);
    assert!(st.gave_up && st.tries == 1, "{st:?}");
    w.at(60_000);
    assert!(unit_jobs(&w.ev(Event::Wake)).is_empty());
}

/// A failed start is retried with backoff; a start of a unit systemd does not know is
/// reported once and not retried, until `systemd-trigger` (or a new want) asks again.
#[test]
fn a_start_of_an_unknown_unit_is_reported_not_retried() {
    // A regeneration first (the units appeared), then the start once the device is there.
    let (mut w, res, job) = stack_starting("app.service");
    // An ordinary failure: tried again after 1 s.
    w.ev(unit_status(&job, 1, false));
    w.at(1_000);
    let again = unit_jobs(&w.ev(Event::Wake));
    assert_eq!(again.len(), 1, "retried after 1 s");
    assert_eq!((&again[0].op, again[0].attempt), (&job.op, 2));
    // systemd does not know the unit: the status says so, and nothing runs any more.
    let c = w.ev(unit_status(&again[0], 5, true));
    let status = published_status(&c, &res);
    assert!(status.unknown_unit && !status.ok(), "{status:?}");
    for _ in 0..5 {
        w.at(60_000);
        let c = w.ev(Event::Wake);
        assert!(unit_jobs(&c).is_empty(), "retried: {c:?}");
    }
    let c = w.sync();
    assert!(unit_jobs(&c).is_empty(), "retried: {c:?}");
    // `systemd-trigger`: once more.
    let c = w.ev(Event::Op {
        id: 4,
        op: Op::SystemdTrigger,
    });
    let jobs = unit_jobs(&c);
    assert_eq!(jobs.len(), 1, "{c:?}");
    assert_eq!(jobs[0].op, job.op);
}
