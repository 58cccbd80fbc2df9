//! Role commands: `primary` (planned handover), `primary --force` (failover), `secondary` and
//! `log-purge-all`.
//!
//! As in MARS, the command only checks, writes the designated primary and waits; the reconcile
//! loops do the work (`lifecycle.rs`): the old primary leaves the role once its device is
//! closed, and the new one opens its volume once the rules of `mars_engine::roles` allow it.
//! A planned handover, as this command drives it:
//!
//! ```text
//! phase 0   checks: member, consistent, up, not stuck, no split brain, old primary reachable
//!           with a systemd stack: want := me, wait for the old primary's stop result
//!           ─ failed or timeout: want := old (its stack starts again), refused
//! phase 0b  wait until the old primary's device is closed (open count 0)     ─┐ timeout:
//! phase 1   primary := me                                                     │ refused,
//! phase 2   wait until the old primary has left the role   ─ timeout: primary := old again
//!                                                            (and want := old)
//! phase 3   wait until this host has replayed its last byte and opened its volume
//! phase 5   with a systemd stack: wait for this host's start result (reported, not fatal)
//! ```
//!
//! So in a planned handover exactly one host runs the stack at any moment: the new primary
//! starts it (`systemd.rs`, want == primary == me and the device served) only after the old one
//! reported its stop and left the role. A failover (`--force`) sets the want as well; the old
//! primary stops its stack whenever it learns that it is no longer wanted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mars_api::{ErrorKind, Reply};
use mars_config::{HostName, ResourceName};
use mars_engine::{keys, ResourceMeta, Role};

use crate::state::{invalid, not_found, Daemon, Refusal};

/// How often the command looks at the metadata while it waits.
const POLL: Duration = Duration::from_millis(100);

fn failed(msg: impl Into<String>) -> Refusal {
    Refusal(ErrorKind::Failed, msg.into())
}

fn acting_primaries(meta: &ResourceMeta, me: &HostName) -> Vec<HostName> {
    mars_engine::roles::actual_primaries(meta, me)
        .cloned()
        .collect()
}

fn open_count(meta: &ResourceMeta, h: &HostName) -> u64 {
    meta.members
        .get(h)
        .and_then(|m| m.report.as_ref())
        .map_or(0, |r| r.open_count)
}

/// Writes `systemd-want` (this host's write, so it carries a fresh Lamport stamp) and returns
/// the stamp: the stop result a handover waits for must be for this write, not an older one.
fn set_want(d: &Daemon, res: &ResourceName, host: &str) -> Result<u64, Refusal> {
    let e = d
        .cluster
        .store()
        .set(&keys::systemd_want(res), host)
        .map_err(|e| failed(format!("cannot write the systemd want: {e}")))?;
    d.cluster.poke.notify_waiters();
    d.reconcile_now.notify_one();
    Ok(e.stamp)
}

/// `host`'s result of `op` done for the want written with `stamp` (or later), once it exists.
fn unit_result(
    d: &Daemon,
    res: &ResourceName,
    host: &HostName,
    op: mars_engine::UnitOp,
    stamp: u64,
) -> Option<mars_engine::UnitStatus> {
    d.meta(res)
        .systemd
        .status
        .get(host)
        .filter(|st| st.op == op && st.want_stamp >= stamp)
        .cloned()
}

/// Waits until `done` holds or the deadline passes.
async fn wait_for(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn primary(
    d: Arc<Daemon>,
    res: ResourceName,
    force: bool,
    timeout: Duration,
) -> Result<Reply, Refusal> {
    let deadline = Instant::now() + timeout;
    let me = d.host.clone();
    let r = d.resource(&res).ok_or_else(|| not_found(&res))?;
    let meta = d.meta(&res);
    // Taken under the admin lock: a role change in progress is never seen half done.
    let (volume, replica) = {
        let _g = d.admin.lock().unwrap_or_else(|e| e.into_inner());
        (r.volume().is_some(), r.replica())
    };
    if volume {
        if meta.primary.as_ref() == Some(&me) && force {
            // Designated as far as this host knows, but in a partition the other side may have
            // designated another host since (its own forced switch). The operator's forced
            // choice is written again with a fresh stamp, so it wins over that older one when
            // the metadata meets; without this, the older designation won and this host left
            // the role the operator had just confirmed.
            let mut again = vec![(keys::primary(&res), me.to_string())];
            if meta.systemd.configured() {
                again.push((keys::systemd_want(&res), me.to_string()));
            }
            d.set_keys(&again)?;
            return Ok(Reply::Done {
                message: format!(
                    "{me} is the primary of {res} already; the designation is written again \
                     (it wins over one made elsewhere before, e.g. during a partition)"
                ),
            });
        }
        if meta.primary.as_ref() == Some(&me) {
            // Idempotent, and as in MARS it restarts a stack stopped by `set-systemd-want
            // (none)` or wanted elsewhere.
            if meta.systemd.configured() && meta.systemd.want.as_ref() != Some(&me) {
                set_want(&d, &res, me.as_str())?;
                return Ok(Reply::Done {
                    message: format!(
                        "{me} is the primary of {res} already; its systemd stack is wanted here again"
                    ),
                });
            }
            return Ok(Reply::Done {
                message: format!("{me} is the primary of {res} already"),
            });
        }
        // Still acting as primary (device open) while another host or nobody is designated.
        if !force {
            return Err(invalid(format!(
                "this host still acts as primary of {res} (device open) while {} is designated: \
                 `primary --force {res}` takes the role back, and the other side's writes become \
                 a split brain",
                meta.primary
                    .as_ref()
                    .map_or("(none)".to_string(), ToString::to_string)
            )));
        }
        let mut back = vec![(keys::primary(&res), me.to_string())];
        if meta.systemd.configured() {
            back.push((keys::systemd_want(&res), me.to_string()));
        }
        d.set_keys(&back)?;
        return Ok(Reply::Done {
            message: format!(
                "{res}: took the primary role back by force; if another host wrote meanwhile, \
                 resolve the split brain there (`marsadm invalidate {res}`)"
            ),
        });
    }
    let rep = match replica {
        Some(rep) => rep,
        None => crate::lifecycle::wait_replica(&r, &res)?,
    };
    let st = rep.status();
    if !st.consistent {
        return Err(invalid(format!(
            "the replica of {res} here is inconsistent ({}): it can never become primary, \
             not even with --force",
            st.needs_sync
                .as_deref()
                .unwrap_or("the full sync has not finished")
        )));
    }
    let todo = meta
        .members
        .get(&me)
        .map(|m| m.todo)
        .ok_or_else(|| invalid(format!("this host is not a member of {res}")))?;
    if !todo.attach {
        return Err(invalid(format!(
            "{res} is detached here: run `marsadm up {res}` first"
        )));
    }
    if force {
        forced(d, res, r, rep, todo, deadline).await
    } else {
        planned(d, res, r, rep, meta, todo, deadline).await
    }
}

async fn forced(
    d: Arc<Daemon>,
    res: ResourceName,
    r: Arc<crate::resource::Resource>,
    rep: Arc<crate::replica::Replica>,
    todo: mars_engine::Todo,
    deadline: Instant,
) -> Result<Reply, Refusal> {
    let me = d.host.clone();
    if todo.fetch {
        return Err(invalid(format!(
            "a forced switch takes what this replica has: pause fetching first \
             (`marsadm pause-fetch {res}` or `disconnect`), then `primary --force {res}`"
        )));
    }
    if !todo.replay {
        return Err(invalid(format!(
            "replay is paused here: `marsadm resume-replay {res}` first (what is fetched is \
             replayed before the switch)"
        )));
    }
    if let Some(why) = rep.status().stuck.filter(|s| s.contains("damaged")) {
        return Err(invalid(format!(
            "the local log copy of {res} is damaged after the replay position ({why}): a forced \
             switch would drop what follows; resume fetching to repair it from the primary, or \
             recreate the resource from the best disk"
        )));
    }
    let _ = rep;
    r.set_marker(mars_replica::Marker::ForcePrimary, true)
        .map_err(|e| failed(format!("cannot mark the forced switch: {e}")))?;
    let mut keys_now = vec![(keys::primary(&res), me.to_string())];
    // The stack follows: it starts here once the device is served, and the old primary stops
    // it whenever it learns of this (fencing it meanwhile is the operator's job, as in MARS).
    if d.meta(&res).systemd.configured() {
        keys_now.push((keys::systemd_want(&res), me.to_string()));
    }
    d.set_keys(&keys_now)?;
    tracing::warn!("{res}: forced switch to primary requested");
    let promoted = {
        let r = r.clone();
        wait_for(deadline, move || r.volume().is_some()).await
    };
    if !promoted {
        let why = r
            .replica()
            .and_then(|rep| rep.status().stuck)
            .unwrap_or_default();
        return Err(failed(format!(
            "{me} is the designated primary of {res}, but not acting yet: {why} (it takes \
             over by itself; see `marsadm view {res}`)"
        )));
    }
    // As in MARS (since stable113): fetching resumes by itself, for when this host is a
    // secondary again.
    d.set_keys(&[(keys::todo(&res, &me, "fetch"), "1".into())])?;
    let ages = d.cluster.ages();
    let others: Vec<HostName> = acting_primaries(&d.meta(&res), &me)
        .into_iter()
        .filter(|h| ages.get(h).is_some_and(|a| *a <= Duration::from_secs(10)))
        .collect();
    let warning = if others.is_empty() {
        String::new()
    } else {
        format!(
            "; {} still acts as primary: SPLIT BRAIN until it closes its device and is \
             resolved (`marsadm invalidate {res}` there)",
            others
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Ok(Reply::Done {
        message: format!("{res}: {me} is primary now (forced){warning}"),
    })
}

async fn planned(
    d: Arc<Daemon>,
    res: ResourceName,
    r: Arc<crate::resource::Resource>,
    rep: Arc<crate::replica::Replica>,
    meta: ResourceMeta,
    todo: mars_engine::Todo,
    deadline: Instant,
) -> Result<Reply, Refusal> {
    let me = d.host.clone();
    if !todo.fetch || !todo.replay {
        return Err(invalid(format!(
            "fetch and replay must be on for a handover: `marsadm up {res}` (or `primary --force` \
             for a failover)"
        )));
    }
    let ages = d.cluster.ages();
    let alive =
        |h: &HostName| *h == me || ages.get(h).is_some_and(|a| *a <= Duration::from_secs(10));
    if let Some(sb) = mars_engine::split_brain(&meta, &alive) {
        return Err(invalid(format!(
            "{res} has a split brain (histories differ from logfile {}): resolve it first \
             (`marsadm view {res}`)",
            sb.logfile
        )));
    }
    if let Some(s) = rep
        .status()
        .stuck
        .filter(|s| s.contains("mismatch") || s.contains("differ") || s.contains("damaged"))
    {
        return Err(invalid(format!("replication of {res} is stuck here: {s}")));
    }
    let acting = acting_primaries(&meta, &me);
    let connected: Vec<String> = d
        .cluster
        .member_views(&me, Duration::from_secs(60))
        .into_iter()
        .filter(|m| m.connected)
        .map(|m| m.host)
        .collect();
    for a in &acting {
        if !connected.contains(&a.to_string()) {
            return Err(invalid(format!(
                "{a} acts as primary of {res} but is not reachable: a planned handover needs it; \
                 for a failover run `marsadm pause-fetch {res}` and `marsadm primary --force {res}`"
            )));
        }
    }
    let old = acting.first().cloned();
    // Phase 0 with a systemd stack: it moves first. Every other host that may run it stops it
    // when it sees the want here: the acting primary, the designated one (its report may not
    // have arrived yet), and any host whose last operation was a start. If one fails, the
    // stack is wanted where it was again, and restarts there.
    let stack = meta.systemd.configured();
    let holders: Vec<HostName> = meta
        .members
        .keys()
        .filter(|h| **h != me)
        .filter(|h| {
            acting.contains(h)
                || meta.primary.as_ref() == Some(*h)
                || meta
                    .systemd
                    .status
                    .get(*h)
                    .is_some_and(|st| st.op == mars_engine::UnitOp::Start)
        })
        .cloned()
        .collect();
    let want_stamp = if stack {
        set_want(&d, &res, me.as_str())?
    } else {
        0
    };
    for a in holders.iter().filter(|_| stack) {
        let stop = mars_engine::UnitOp::Stop;
        let result = {
            let (d2, res2, a2) = (d.clone(), res.clone(), a.clone());
            let mut found = None;
            wait_for(deadline, || {
                found = unit_result(&d2, &res2, &a2, stop, want_stamp);
                found.is_some()
            })
            .await;
            found
        };
        let why = match result {
            Some(st) if st.ok() => None,
            Some(st) => Some(format!(
                "the stack of {res} did not stop on {a} ({})",
                st.summary()
            )),
            None => Some(format!(
                "{a} did not report stopping the stack of {res} ({}) in time",
                meta.systemd.stop().unwrap_or_default()
            )),
        };
        if let Some(why) = why {
            // Back to where it ran: the acting primary, else the designated one, else the
            // want as it was.
            let back = old
                .clone()
                .or_else(|| meta.primary.clone().filter(|p| *p != me))
                .map(|h| h.to_string())
                .or_else(|| meta.systemd.want_raw.clone())
                .unwrap_or_else(|| keys::NO_PRIMARY.to_string());
            set_want(&d, &res, &back)?;
            tracing::warn!("{res}: handover to {me} aborted: {why}");
            return Err(failed(format!(
                "{why}: {back} stays primary and starts its stack again"
            )));
        }
    }
    // Phase 0b: the old primary's device must be closed.
    if let Some(a) = &old {
        let d2 = d.clone();
        let (res2, a2) = (res.clone(), a.clone());
        let closed = wait_for(deadline, move || open_count(&d2.meta(&res2), &a2) == 0).await;
        if !closed {
            // Compensation: the stack stopped for nothing; it runs on the old primary again.
            let restarted = if stack {
                set_want(&d, &res, a.as_str())?;
                " and starts its stack again"
            } else {
                ""
            };
            return Err(invalid(format!(
                "the device of {res} is still in use on {a} ({} open): close it (umount, stop \
                 the application) and try again; {a} stays primary{restarted}",
                open_count(&d.meta(&res), a)
            )));
        }
    }
    // Phase 1, unless this replica became inconsistent meanwhile (a resize starts a sync of
    // the new region): the old primary would leave and nobody could take over.
    if !rep.status().consistent {
        return Err(invalid(format!(
            "the replica of {res} here started a sync meanwhile (a resize?): wait until it is up \
             to date (`marsadm wait-resource {res} uptodate`), then try again"
        )));
    }
    d.set_keys(&[(keys::primary(&res), me.to_string())])?;
    tracing::info!(
        "{res}: handover to {me}{}",
        old.as_ref()
            .map(|a| format!(" from {a}"))
            .unwrap_or_default()
    );
    // Phase 2: the old primary leaves the role; otherwise it stays primary (compensation).
    if let Some(a) = &old {
        let d2 = d.clone();
        let (res2, a2) = (res.clone(), a.clone());
        let left = wait_for(deadline, move || {
            let m = d2.meta(&res2);
            m.members
                .get(&a2)
                .and_then(|x| x.report.as_ref())
                .is_none_or(|rep| rep.role != Role::Primary)
                || m.primary.as_ref() != Some(&d2.host)
        })
        .await;
        let now = d.meta(&res);
        if now.primary.as_ref() != Some(&me) {
            return Err(failed(format!(
                "another primary command won: {} is the designated primary of {res}",
                now.primary
                    .as_ref()
                    .map_or("(none)".to_string(), ToString::to_string)
            )));
        }
        if !left {
            let mut back = vec![(keys::primary(&res), a.to_string())];
            if stack {
                back.push((keys::systemd_want(&res), a.to_string()));
            }
            d.set_keys(&back)?;
            let open = open_count(&d.meta(&res), a);
            return Err(failed(if open > 0 {
                format!(
                    "the device of {res} is still in use on {a} ({open} open): close it (umount, \
                     stop the application) and try again; {a} stays primary"
                )
            } else {
                format!("{a} did not leave the primary role in time: {a} stays primary of {res}")
            }));
        }
    }
    // Phase 3: catch up and take over.
    let became = {
        let (r2, d2, res2, me2) = (r.clone(), d.clone(), res.clone(), me.clone());
        wait_for(deadline, move || {
            r2.volume().is_some() || d2.meta(&res2).primary.as_ref() != Some(&me2)
        })
        .await
    };
    let now = d.meta(&res);
    if now.primary.as_ref() != Some(&me) {
        return Err(failed(format!(
            "another primary command won: {} is the designated primary of {res}",
            now.primary
                .as_ref()
                .map_or("(none)".to_string(), ToString::to_string)
        )));
    }
    if !became {
        let why = r
            .replica()
            .and_then(|rep| rep.status().stuck)
            .unwrap_or_default();
        if let Some(a) = &old {
            // Compensation: the old primary has all the data; it takes the role back rather
            // than leave the resource without a primary while this host cannot catch up.
            d.set_keys(&[(keys::primary(&res), a.to_string())])?;
            return Err(failed(format!(
                "{me} could not take over {res} in time ({why}): {a} is the designated primary \
                 again"
            )));
        }
        return Err(failed(format!(
            "{me} is the designated primary of {res} but still catching up: {why} (it takes \
             over by itself; see `marsadm view {res}`)"
        )));
    }
    // Phase 5: the stack starts here now; say how that went (the role switch stands anyway).
    let stack_note = if stack {
        let (d2, res2, me2) = (d.clone(), res.clone(), me.clone());
        let start = mars_engine::UnitOp::Start;
        let mut found = None;
        wait_for(deadline, || {
            found = unit_result(&d2, &res2, &me2, start, want_stamp);
            found.is_some()
        })
        .await;
        match found {
            Some(st) if st.ok() => format!("; stack started ({})", st.unit),
            Some(st) => format!("; starting the stack FAILED ({}), retrying", st.summary()),
            None => "; the stack has not started yet".to_string(),
        }
    } else {
        String::new()
    };
    Ok(Reply::Done {
        message: format!(
            "{res}: {me} is primary now{}{stack_note}",
            old.map(|a| format!(" (handed over from {a}, nothing lost)"))
                .unwrap_or_default()
        ),
    })
}

impl Daemon {
    /// `secondary RES`: nobody is the designated primary any more.
    pub(crate) fn secondary(&self, res: &ResourceName) -> Result<Reply, Refusal> {
        let meta = self.meta(res);
        if !meta.exists() {
            return Err(not_found(res));
        }
        if let Some(r) = self.resource(res) {
            if r.open_count() > 0 {
                return Err(invalid(format!(
                    "the device of {res} is in use here ({} open): close it first",
                    r.open_count()
                )));
            }
        }
        self.set_keys(&[(keys::primary(res), keys::NO_PRIMARY.to_string())])?;
        Ok(Reply::Done {
            message: format!(
                "{res}: no designated primary now; the primary leaves its role once its device \
                 is closed and secondaries stop fetching. Discouraged except before \
                 leave-resource/delete-resource: `marsadm primary {res}` restores service"
            ),
        })
    }

    /// `set-emergency-limit RES PCT` (this host's key).
    pub(crate) fn set_emergency_limit(
        &self,
        res: &ResourceName,
        pct: u8,
    ) -> Result<Reply, Refusal> {
        if pct > 100 {
            return Err(invalid(format!("{pct} is not a percentage (0..=100)")));
        }
        if !self.meta(res).is_member(&self.host) {
            return Err(not_found(res));
        }
        self.set_keys(&[(keys::emergency_limit(res, &self.host), pct.to_string())])?;
        Ok(Reply::Done {
            message: if pct == 0 {
                format!("{res}: no emergency limit here; free space alone decides")
            } else {
                format!(
                    "{res}: emergency mode here once its logfiles take more than {pct}% of the root"
                )
            },
        })
    }

    /// `log-purge-all RES` on a secondary: forget this host's version links that contradict
    /// the designated primary's history and every local logfile, then fast-full-sync.
    pub(crate) fn log_purge_all(&self, res: &ResourceName) -> Result<Reply, Refusal> {
        // Wait for a role change in progress (see `secondary_replica`).
        drop(self.admin.lock().unwrap_or_else(|e| e.into_inner()));
        let r = self.resource(res).ok_or_else(|| not_found(res))?;
        let meta = self.meta(res);
        if r.volume().is_some() || meta.primary.as_ref() == Some(&self.host) {
            return Err(invalid(format!(
                "log-purge-all runs on a secondary; this host is the primary of {res}"
            )));
        }
        let Some(p) = meta.primary.clone() else {
            return Err(invalid(format!(
                "{res} has no designated primary to resync from"
            )));
        };
        let rep = crate::lifecycle::wait_replica(&r, res)?;
        let purged = self.purge_own_links(res, &meta, Some(&p))?;
        rep.invalidate()
            .map_err(|e| failed(format!("log-purge-all {res}: {e:#}")))?;
        Ok(Reply::Done {
            message: format!(
                "{res}: purged the local logfiles and {purged} version link(s) outside {p}'s \
                 history; a fast full sync from {p} starts"
            ),
        })
    }

    /// Deletes this host's version links: all of them (`keep_agreeing_with = None`), or those
    /// that differ from (or are missing at) the given host's. Returns how many.
    pub(crate) fn purge_own_links(
        &self,
        res: &ResourceName,
        meta: &ResourceMeta,
        keep_agreeing_with: Option<&HostName>,
    ) -> Result<usize, Refusal> {
        let mut store = self.cluster.store();
        let mut n = 0;
        for (no, links) in &meta.versions {
            let Some(mine) = links.get(&self.host) else {
                continue;
            };
            let agrees = keep_agreeing_with
                .and_then(|h| links.get(h))
                .is_some_and(|theirs| theirs == mine);
            if !agrees {
                store
                    .delete(&keys::version(res, *no, &self.host))
                    .map_err(|e| failed(format!("cannot delete a version link: {e}")))?;
                n += 1;
            }
        }
        drop(store);
        self.cluster.poke.notify_waiters();
        Ok(n)
    }
}
