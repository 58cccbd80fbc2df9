//! The serving side's decisions: what the fetch and sync servers answer. The daemon's server
//! sessions (and the simulation's) ask these functions, with the serving host's metadata and
//! local logfiles, at the start of a session and at every logfile boundary.
//!
//! **Fetch.** A replica asks for logfile `file` from byte `offset`, telling its version link of
//! `file - 1`. The server refuses when that link differs from its own (the asker's copies
//! continue another history, and "you have everything" would confirm a position there), when
//! its primary is in emergency mode, or when it holds nothing of the resource. Then, per
//! logfile: serve it, skip a logfile deleted here that the asker has whole (by the version
//! links), say it is gone, wait for a logfile not begun yet, or refuse a position beyond what
//! exists here.
//!
//! **Sync.** Only an acting primary that is not in emergency mode serves a full sync.
//!
//! **Members only.** Both serve only hosts that are members of the resource (a `data-HOST`
//! key): a device's data goes to the hosts that hold a replica of it, not to any host of the
//! cluster. The asker is the host its certificate names (the peer layer refuses a hello that
//! claims another name; with `--insecure` nobody is authenticated).

use mars_config::HostName;
use mars_txlog::LogName;
use mars_wire::RefuseKind;

use crate::model::ResourceMeta;
use crate::version;

/// What the serving host is for the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRole {
    /// Its volume is open; `passthrough`: in emergency mode.
    Primary { passthrough: bool },
    /// It holds a replica (it serves its verified copies: the catch-up during a handover).
    Replica,
    /// Nothing is set up.
    None,
}

/// A refusal: its kind (what the asker acts on) and the text (what it shows).
pub type Refusal = (RefuseKind, String);

/// May a fetch session start?
pub fn fetch_start(
    role: ServerRole,
    meta: &ResourceMeta,
    me: &HostName,
    asker: &HostName,
    file: u64,
    prev_link: &str,
) -> Result<(), Refusal> {
    let res = &meta.name;
    if role == ServerRole::None {
        return Err((RefuseKind::NotHere, format!("{res} is not set up on {me}")));
    }
    member(meta, asker)?;
    if let Some(why) = history_differs(meta, me, file, prev_link) {
        return Err((RefuseKind::History, why));
    }
    if let ServerRole::Primary { passthrough: true } = role {
        return Err((RefuseKind::Emergency, emergency(me, res.as_str())));
    }
    Ok(())
}

/// May a full sync start?
pub fn sync_start(
    role: ServerRole,
    meta: &ResourceMeta,
    me: &HostName,
    asker: &HostName,
) -> Result<(), Refusal> {
    let res = meta.name.as_str();
    match role {
        ServerRole::Primary { passthrough: false } => member(meta, asker),
        ServerRole::Primary { passthrough: true } => {
            Err((RefuseKind::Emergency, emergency(me, res)))
        }
        _ => Err((
            RefuseKind::NotHere,
            format!("{me} is not primary of {res} (no open volume)"),
        )),
    }
}

/// Fetch and sync serve members of the resource only.
fn member(meta: &ResourceMeta, asker: &HostName) -> Result<(), Refusal> {
    if meta.members.contains_key(asker) {
        Ok(())
    } else {
        Err((
            RefuseKind::NotMember,
            format!("{asker} is not a member of {}", meta.name),
        ))
    }
}

fn emergency(me: &HostName, res: &str) -> String {
    format!(
        "{me} is in emergency mode for {res} (its root is nearly full): replication has stopped; \
         after space is freed there, `marsadm invalidate {res}` on each secondary"
    )
}

/// The asker's link of logfile `file - 1` against ours: a different one means its copies
/// continue another history (found by mars-sim). Either link missing: nothing to compare, the
/// chain checks at the logfile boundaries decide.
pub fn history_differs(
    meta: &ResourceMeta,
    me: &HostName,
    file: u64,
    theirs: &str,
) -> Option<String> {
    let prev = file.checked_sub(1).filter(|p| *p > 0)?;
    if theirs.is_empty() {
        return None;
    }
    let ours = meta.version(prev, me)?;
    (ours != theirs).then(|| {
        format!(
            "the asker's logfile {prev} is not this host's ({theirs} here {ours}): different \
             histories (split brain?)"
        )
    })
}

/// What the fetch server does next for the asker at `file`/`off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Ship this logfile from `off`.
    Serve(LogName),
    /// The asker has all of logfile `file`, deleted here since: go on with `to` from 0.
    Skip {
        to: u64,
    },
    /// Nothing to serve yet (a replica with no copies; the asker is ahead by an empty
    /// logfile that does not exist here yet): look again shortly.
    Wait,
    /// The logfile is gone here; `oldest` is the oldest one left (0: none).
    Gone {
        oldest: u64,
    },
    Refuse(Refusal),
}

/// `logs`: this host's logfiles, oldest first. `lengths_only`: the old, broken comparison of
/// [`complete_by_link`] (simulation only).
pub fn next_file(
    logs: &[LogName],
    file: u64,
    off: u64,
    role: ServerRole,
    meta: &ResourceMeta,
    me: &HostName,
    lengths_only: bool,
) -> Next {
    if let Some(name) = logs.iter().find(|n| n.no == file) {
        return Next::Serve(name.clone());
    }
    let oldest = logs.first().map_or(0, |n| n.no);
    let newest = logs.last().map_or(0, |n| n.no);
    if logs.is_empty() && role == ServerRole::Replica {
        // A replica that has nothing yet (it just left the primary role, or reclaimed
        // everything): nothing to serve, but nothing is lost either.
        return Next::Wait;
    }
    if file + 1 == oldest && complete_by_link(meta, me, file, off, lengths_only) {
        // The replica has all of a logfile deleted here since: its length and history match
        // the version links, so it goes on with the next one.
        return Next::Skip { to: oldest };
    }
    if file < oldest || logs.is_empty() {
        return Next::Gone { oldest };
    }
    if file == newest + 1 && off == 0 {
        // The replica is ahead by an empty logfile that does not exist here yet.
        return Next::Wait;
    }
    Next::Refuse((
        RefuseKind::History,
        format!("log {file} is beyond this host's newest log {newest}: different histories?"),
    ))
}

/// Whether `len` bytes are all of logfile `no`, by the version links published for it: all
/// links equal to this host's own (one history, found by mars-sim), of exactly that length.
pub fn complete_by_link(
    meta: &ResourceMeta,
    me: &HostName,
    no: u64,
    len: u64,
    lengths_only: bool,
) -> bool {
    let Some(links) = meta.versions.get(&no) else {
        return false;
    };
    if lengths_only {
        return !links.is_empty() && links.values().all(|l| version::len_of(l) == Some(len));
    }
    let mut all = links.values();
    let first = links.get(me).or_else(|| all.next());
    first.is_some_and(|first| {
        version::len_of(first) == Some(len) && links.values().all(|l| l == first)
    })
}

/// While shipping: the asker's copy of a logfile holds more than this host's (`limit` bytes
/// may be shipped now, `complete`: that is all of it). Its copy then continues another
/// history.
pub fn asker_ahead(name: &LogName, off: u64, limit: u64, complete: bool) -> Option<String> {
    (off > limit && (complete || limit > 0)).then(|| {
        format!(
            "the replica's copy of {name} has {off} bytes, this host only {limit}: different \
             histories (split brain?)"
        )
    })
}

/// The asker's copy of `name` before byte `off` is not this host's bytes (the `tail` digest of
/// its fetch request differs): it is another incarnation of that logfile — the same number and
/// writer, written again after the writer was fully synced from a host where that logfile had
/// not begun (found by mars-sim, seed 2379 with members-only serving: the replica appended the
/// new incarnation's records to the old one's and replayed a record past a fork). Everything
/// from there on is another history.
pub fn tail_differs(name: &LogName, off: u64) -> Refusal {
    (
        RefuseKind::History,
        format!(
            "the replica's copy of {name} up to byte {off} is not this host's: another \
             incarnation of that logfile, different histories (split brain?)"
        ),
    )
}

/// This host's version link of logfile `no` as published, or as it will be published (a
/// logfile just completed by rotation): what a full sync starting at `no + 1` continues.
/// `local`: the logfile's writer and length here, if it exists.
pub fn own_link(
    meta: &ResourceMeta,
    me: &HostName,
    no: u64,
    local: Option<(&HostName, u64)>,
) -> Option<String> {
    if let Some(l) = meta.version(no, me) {
        return Some(l.to_string());
    }
    let (origin, len) = local?;
    crate::plan::my_link(meta, me, no, origin, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mars_config::ResourceName;

    fn h(s: &str) -> HostName {
        HostName::new(s).unwrap()
    }

    fn meta() -> ResourceMeta {
        let mut m = ResourceMeta::empty(ResourceName::new("r").unwrap());
        m.size = Some(1 << 20);
        m
    }

    fn names(v: &[(u64, &str)]) -> Vec<LogName> {
        v.iter().map(|(n, o)| LogName::new(*n, h(o))).collect()
    }

    #[test]
    fn a_request_on_another_history_is_refused() {
        let (a, b) = (h("a"), h("b"));
        let mut m = meta();
        m.members.insert(b.clone(), Default::default());
        let l3 = version::link("", 3, &a, 10);
        m.versions
            .entry(3)
            .or_default()
            .insert(a.clone(), l3.clone());
        let primary = ServerRole::Primary { passthrough: false };
        assert_eq!(fetch_start(primary, &m, &a, &b, 4, &l3), Ok(()));
        // No link on either side: nothing to compare.
        assert_eq!(fetch_start(primary, &m, &a, &b, 4, ""), Ok(()));
        let other = version::link("", 3, &b, 10);
        let e = fetch_start(primary, &m, &a, &b, 4, &other).unwrap_err();
        assert_eq!(e.0, RefuseKind::History);
        let e = fetch_start(
            ServerRole::Primary { passthrough: true },
            &m,
            &a,
            &b,
            4,
            &l3,
        );
        assert_eq!(e.unwrap_err().0, RefuseKind::Emergency);
        assert_eq!(
            fetch_start(ServerRole::None, &m, &a, &b, 4, &l3)
                .unwrap_err()
                .0,
            RefuseKind::NotHere
        );
    }

    /// A device's data goes to the members of its resource only: a host of the cluster that
    /// holds no replica of it gets neither its log nor a full sync.
    #[test]
    fn fetch_and_sync_serve_members_only() {
        let (a, b, x) = (h("a"), h("b"), h("x"));
        let mut m = meta();
        m.members.insert(a.clone(), Default::default());
        m.members.insert(b.clone(), Default::default());
        let primary = ServerRole::Primary { passthrough: false };
        assert_eq!(fetch_start(primary, &m, &a, &b, 1, ""), Ok(()));
        assert_eq!(sync_start(primary, &m, &a, &b), Ok(()));
        for role in [primary, ServerRole::Replica] {
            let e = fetch_start(role, &m, &a, &x, 1, "").unwrap_err();
            assert_eq!(e.0, RefuseKind::NotMember, "{}", e.1);
            assert!(e.1.contains("x is not a member of r"), "{}", e.1);
        }
        let e = sync_start(primary, &m, &a, &x).unwrap_err();
        assert_eq!(e.0, RefuseKind::NotMember);
    }

    #[test]
    fn the_next_logfile() {
        let a = h("a");
        let m = meta();
        let logs = names(&[(3, "a"), (4, "a")]);
        let p = ServerRole::Primary { passthrough: false };
        assert_eq!(
            next_file(&logs, 4, 0, p, &m, &a, false),
            Next::Serve(logs[1].clone())
        );
        assert_eq!(
            next_file(&logs, 1, 0, p, &m, &a, false),
            Next::Gone { oldest: 3 }
        );
        assert_eq!(next_file(&logs, 5, 0, p, &m, &a, false), Next::Wait);
        assert!(matches!(
            next_file(&logs, 6, 0, p, &m, &a, false),
            Next::Refuse((RefuseKind::History, _))
        ));
        assert_eq!(
            next_file(&[], 3, 0, ServerRole::Replica, &m, &a, false),
            Next::Wait
        );
        assert_eq!(
            next_file(&[], 3, 0, p, &m, &a, false),
            Next::Gone { oldest: 0 }
        );
    }

    /// Found by mars-sim: the fetch server let a replica skip a logfile deleted here when the
    /// links' *lengths* matched, although the replica's logfile of that number belonged to
    /// another history.
    #[test]
    fn skipping_a_deleted_logfile_needs_the_same_history() {
        let (a, b) = (h("a"), h("b"));
        let mut m = meta();
        let ours = version::link("", 2, &a, 10);
        let theirs = version::link("", 2, &b, 10);
        m.versions
            .entry(2)
            .or_default()
            .insert(a.clone(), ours.clone());
        let logs = names(&[(3, "a")]);
        let p = ServerRole::Primary { passthrough: false };
        assert_eq!(
            next_file(&logs, 2, 10, p, &m, &a, false),
            Next::Skip { to: 3 }
        );
        // Another length: gone.
        assert_eq!(
            next_file(&logs, 2, 9, p, &m, &a, false),
            Next::Gone { oldest: 3 }
        );
        // Same length, another history among the links: not complete.
        m.versions.entry(2).or_default().insert(b.clone(), theirs);
        assert_eq!(
            next_file(&logs, 2, 10, p, &m, &a, false),
            Next::Gone { oldest: 3 }
        );
        // The old comparison took it.
        assert_eq!(
            next_file(&logs, 2, 10, p, &m, &a, true),
            Next::Skip { to: 3 }
        );
    }

    #[test]
    fn an_asker_ahead_is_another_history() {
        let n = LogName::new(3, h("a"));
        assert!(asker_ahead(&n, 10, 5, true).is_some());
        assert!(asker_ahead(&n, 10, 5, false).is_some());
        // Nothing durable yet in a new logfile: not ahead, just early.
        assert!(asker_ahead(&n, 10, 0, false).is_none());
        assert!(asker_ahead(&n, 5, 5, true).is_none());
    }
}
