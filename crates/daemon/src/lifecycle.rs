//! Resource lifecycle commands (join, leave, delete, resize, switches, invalidate, cron) and the
//! reconcile loop that makes each local resource follow the replicated metadata.
//!
//! Commands only check their preconditions, change local files and write metadata ("todo");
//! the reconcile loop, running every [`RECONCILE`], does the rest: starts and stops replica
//! activities, publishes this host's report (`actual-HOST`) and version links, and deletes
//! logfiles nobody needs any more. So a command's effect on other hosts arrives with the
//! metadata, as in MARS.

use std::collections::HashMap;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mars_api::{ErrorKind, Reply, SwitchKind};
use mars_config::{format_size, ResourceName};
use mars_engine::{keys, plan, ResourceMeta};

use crate::replica::Replica;
use crate::resource::Resource;
use crate::root::{self, ResourceFile, RESOURCE_FILE};
use crate::state::{invalid, not_found, Daemon, Outcome, Refusal};

/// How often every resource is reconciled with the metadata.
pub const RECONCILE: Duration = Duration::from_millis(250);
/// A report is republished at most this often while it keeps changing (rates, positions).
const REPORT_EVERY: Duration = Duration::from_secs(1);

fn failed(msg: impl Into<String>) -> Refusal {
    Refusal(ErrorKind::Failed, msg.into())
}

/// Length of a file or block device, without taking it exclusively.
pub fn disk_len(path: &Path) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::End(0))
}

impl Daemon {
    pub(crate) fn set_keys(&self, pairs: &[(String, String)]) -> Result<(), Refusal> {
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.cluster
            .store()
            .set_many(&refs)
            .map_err(|e| failed(format!("cannot write metadata: {e}")))?;
        self.cluster.poke.notify_waiters();
        self.reconcile_now.notify_one();
        Ok(())
    }

    /// Deletes this host's own keys of a resource (data, todo, actual, version links).
    fn delete_own_keys(&self, res: &ResourceName) -> anyhow::Result<()> {
        let me = self.host.as_str();
        let mut store = self.cluster.store();
        let entries = store.list_prefix(&keys::prefix(res))?;
        for e in entries {
            let own = store.owner_of(&e.key).is_some_and(|o| o.as_str() == me);
            if own {
                store.delete(&e.key)?;
            }
        }
        Ok(())
    }

    pub(crate) fn join_resource(&self, res: ResourceName, disk: &Path) -> Outcome {
        let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if self.cluster_id().is_none() {
            return Err(invalid(
                "this host is not in a cluster: run join-cluster first",
            ));
        }
        if self.resource(&res).is_some() {
            return Err(Refusal(
                ErrorKind::Exists,
                format!("this host is already a member of {res}"),
            ));
        }
        let meta = self.meta(&res);
        let Some(size) = meta.size else {
            return Err(Refusal(
                ErrorKind::NotFound,
                format!("resource {res} does not exist in the cluster (try update-cluster first)"),
            ));
        };
        let Some(primary) = meta.primary.clone() else {
            return Err(invalid(format!(
                "resource {res} has no designated primary; run `marsadm primary {res}` on one member first"
            )));
        };
        if meta.is_member(&self.host) {
            return Err(Refusal(
                ErrorKind::Exists,
                format!("the metadata lists this host as a member of {res} already (a leftover? `marsadm leave-resource --force {res}` forgets it)"),
            ));
        }
        if !disk.is_absolute() {
            return Err(invalid(format!(
                "disk path {} must be absolute",
                disk.display()
            )));
        }
        if let Some(other) = self.all().into_iter().find(|r| r.cfg.disk == disk) {
            return Err(invalid(format!(
                "disk {} is already used by resource {}",
                disk.display(),
                other.cfg.name
            )));
        }
        let len = disk_len(disk).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::Invalid
            };
            Refusal(kind, format!("cannot use disk {}: {e}", disk.display()))
        })?;
        if len < size {
            return Err(invalid(format!(
                "disk {} has {} ({len} bytes), less than the size of {res}: {} ({size} bytes)",
                disk.display(),
                format_size(len),
                format_size(size)
            )));
        }
        let dir = root::resource_dir(&self.root, &res);
        if dir.exists() {
            return Err(Refusal(
                ErrorKind::Exists,
                format!(
                    "{} exists already (leftover of an old resource?)",
                    dir.display()
                ),
            ));
        }
        let cfg = ResourceFile {
            name: res.clone(),
            disk: disk.to_path_buf(),
            size,
        };
        let created = (|| -> anyhow::Result<Arc<Resource>> {
            std::fs::create_dir(&dir)?;
            root::write_toml(&dir, RESOURCE_FILE, &cfg)?;
            Replica::init_sync(&dir, size)?;
            let r = Resource::open(
                cfg,
                dir.clone(),
                &self.host,
                self.tuning.clone(),
                Arc::new(meta),
                false,
            );
            if let Some(e) = r.error() {
                anyhow::bail!("{e}");
            }
            Ok(r)
        })();
        let r = match created {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(failed(format!("cannot join {res}: {e:#}")));
            }
        };
        let mut pairs = vec![(keys::data(&res, &self.host), disk.display().to_string())];
        for sw in SwitchKind::ALL {
            pairs.push((keys::todo(&res, &self.host, sw.as_str()), "1".into()));
        }
        if let Err(e) = self.set_keys(&pairs) {
            r.close();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.insert_resource(r);
        self.reconcile_now.notify_one();
        tracing::info!(
            "joined resource {res} on {}; full sync from {primary}",
            disk.display()
        );
        Ok(Reply::Done {
            message: format!(
                "joined {res} on {} ({}); a full sync from {primary} starts (see `marsadm view {res}`)",
                disk.display(),
                format_size(size)
            ),
        })
    }

    pub(crate) fn leave_resource(&self, res: &ResourceName, force: bool) -> Outcome {
        let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let meta = self.meta(res);
        let Some(r) = self.resource(res) else {
            // No local state, but the metadata may still list us: forget that with --force.
            if force && meta.is_member(&self.host) && meta.primary.as_ref() != Some(&self.host) {
                self.delete_own_keys(res)
                    .map_err(|e| failed(format!("cannot delete this host's keys: {e}")))?;
                self.cluster.poke.notify_waiters();
                return Ok(Reply::Done {
                    message: format!("forgot this host's leftover membership of {res}"),
                });
            }
            return Err(not_found(res));
        };
        if meta.primary.as_ref() == Some(&self.host) || r.volume().is_some() {
            return Err(invalid(format!(
                "this host is the primary of {res}: hand over first (`marsadm primary {res}` elsewhere), or delete-resource"
            )));
        }
        let attached = meta.members.get(&self.host).is_some_and(|m| m.todo.attach);
        if attached && !force {
            return Err(invalid(format!(
                "{res} is still attached here: run `marsadm down {res}` first (or leave-resource --force)"
            )));
        }
        self.teardown(&r, "left")?;
        Ok(Reply::Done {
            message: format!(
                "left {res}; its logfiles here are deleted, the disk {} is untouched",
                r.cfg.disk.display()
            ),
        })
    }

    /// Stops a local resource, deletes its directory and this host's keys.
    fn teardown(&self, r: &Arc<Resource>, why: &str) -> Result<(), Refusal> {
        let res = r.cfg.name.clone();
        r.close();
        self.remove_resource(&res);
        if let Err(e) = self.delete_own_keys(&res) {
            tracing::error!("{res}: cannot delete this host's keys: {e}");
        }
        std::fs::remove_dir_all(&r.dir)
            .map_err(|e| failed(format!("cannot remove {}: {e}", r.dir.display())))?;
        self.cluster.poke.notify_waiters();
        tracing::info!("{res}: {why}; removed {}", r.dir.display());
        Ok(())
    }

    pub(crate) fn delete_resource(&self, res: &ResourceName, force: bool) -> Outcome {
        let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let meta = self.meta(res);
        let local = self.resource(res);
        if !meta.exists() && local.is_none() {
            return Err(not_found(res));
        }
        let others: Vec<String> = meta
            .members
            .keys()
            .filter(|h| **h != self.host)
            .map(ToString::to_string)
            .collect();
        if !others.is_empty() && !force {
            return Err(invalid(format!(
                "{res} still has other members ({}): they must leave-resource first, or use delete-resource --force",
                others.join(", ")
            )));
        }
        if let Some(r) = &local {
            if r.open_count() > 0 && !force {
                return Err(invalid(format!(
                    "the device of {res} is in use ({} open); close it first",
                    r.open_count()
                )));
            }
        }
        {
            let mut store = self.cluster.store();
            for k in [keys::size(res), keys::primary(res)] {
                store
                    .delete(&k)
                    .map_err(|e| failed(format!("cannot delete {k}: {e}")))?;
            }
        }
        if let Some(r) = local {
            self.teardown(&r, "deleted")?;
        } else if let Err(e) = self.delete_own_keys(res) {
            tracing::error!("{res}: {e}");
        }
        self.cluster.poke.notify_waiters();
        Ok(Reply::Done {
            message: if others.is_empty() {
                format!("deleted {res}")
            } else {
                format!(
                    "deleted {res}; members {} tear down when they learn it",
                    others.join(", ")
                )
            },
        })
    }

    pub(crate) fn resize(&self, res: &ResourceName, size: Option<u64>) -> Outcome {
        let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.resource(res).ok_or_else(|| not_found(res))?;
        let meta = self.meta(res);
        let Some(vol) = r
            .volume()
            .filter(|_| meta.primary.as_ref() == Some(&self.host))
        else {
            return Err(invalid(format!("resize runs on the primary of {res}")));
        };
        let cur = vol.size();
        if let Some(s) = size.filter(|s| *s <= cur) {
            return Err(invalid(format!(
                "{res} has {} already; resize only grows (asked for {})",
                format_size(cur),
                format_size(s)
            )));
        }
        // Every member's disk must hold the new size.
        let mut smallest =
            disk_len(&r.cfg.disk).map_err(|e| failed(format!("{}: {e}", r.cfg.disk.display())))?;
        let mut smallest_host = self.host.to_string();
        for (h, m) in &meta.members {
            if *h == self.host {
                continue;
            }
            match m.report.as_ref().map(|r| r.disk_size) {
                Some(n) if n > 0 => {
                    if n < smallest {
                        smallest = n;
                        smallest_host = h.to_string();
                    }
                }
                _ => {
                    return Err(invalid(format!(
                    "member {h} has not reported its disk size yet; try again when it is connected"
                )))
                }
            }
        }
        let new = size.unwrap_or(smallest) / 512 * 512;
        if new <= cur {
            return Err(invalid(format!(
                "{res} has {} already; resize only grows (largest possible: {} on {smallest_host})",
                format_size(cur),
                format_size(smallest)
            )));
        }
        if new > smallest {
            return Err(invalid(format!(
                "the disk of {smallest_host} has only {} ({smallest} bytes), less than {} ({new} bytes)",
                format_size(smallest),
                format_size(new)
            )));
        }
        vol.grow(new)
            .map_err(|e| failed(format!("resize {res}: {e}")))?;
        r.set_size(new);
        self.set_keys(&[(keys::size(res), new.to_string())])?;
        Ok(Reply::Done {
            message: format!(
                "{res} grows from {} to {}; secondaries sync the new region",
                format_size(cur),
                format_size(new)
            ),
        })
    }

    pub(crate) fn switch(&self, res: &ResourceName, switches: &[SwitchKind], on: bool) -> Outcome {
        let r = self.resource(res).ok_or_else(|| not_found(res))?;
        if switches.is_empty() {
            return Err(invalid("no switch given"));
        }
        if !on && switches.contains(&SwitchKind::Attach) && r.open_count() > 0 {
            return Err(invalid(format!(
                "the device of {res} is in use ({} open): close it before detaching",
                r.open_count()
            )));
        }
        let pairs: Vec<(String, String)> = switches
            .iter()
            .map(|s| {
                (
                    keys::todo(res, &self.host, s.as_str()),
                    if on { "1" } else { "0" }.to_string(),
                )
            })
            .collect();
        self.set_keys(&pairs)?;
        if let Some(rep) = r.replica() {
            if let Some(m) = self.meta(res).members.get(&self.host) {
                rep.set_todo(m.todo);
            }
        }
        let names: Vec<&str> = switches.iter().map(|s| s.as_str()).collect();
        Ok(Reply::Done {
            message: format!(
                "{res}: {} {}",
                names.join(", "),
                if on { "on" } else { "off" }
            ),
        })
    }

    fn secondary_replica(&self, res: &ResourceName, what: &str) -> Result<Arc<Replica>, Refusal> {
        // A role change in progress (leaving the primary role) holds this lock until the
        // replica exists: wait for it rather than see neither volume nor replica.
        drop(self.admin.lock().unwrap_or_else(|e| e.into_inner()));
        let r = self.resource(res).ok_or_else(|| not_found(res))?;
        let meta = self.meta(res);
        if meta.primary.as_ref() == Some(&self.host) || r.volume().is_some() {
            return Err(invalid(format!(
                "{what} runs on a secondary; this host is the primary of {res}"
            )));
        }
        if meta.primary.is_none() {
            return Err(invalid(format!(
                "{res} has no designated primary to {what} from"
            )));
        }
        wait_replica(&r, res)
    }

    pub(crate) fn fake_sync(&self, res: &ResourceName) -> Outcome {
        let rep = self.secondary_replica(res, "fake-sync")?;
        rep.fake_sync()
            .map_err(|e| invalid(format!("fake-sync {res}: {e:#}")))?;
        Ok(Reply::Done {
            message: format!("{res}: declared in sync without copying (expert mode: the disks must already be equal)"),
        })
    }

    pub(crate) fn invalidate(&self, res: &ResourceName) -> Outcome {
        let rep = self.secondary_replica(res, "invalidate")?;
        // This host's links that contradict the primary's history go: they are what shows a
        // split brain, and this replica gives up that history now. Under the admin lock and
        // after the local copies are gone: the reconcile loop publishes links of this host's
        // own logfiles it finds without one (under the same lock), and one that listed them
        // before the reset would publish a purged link again, a split brain that stays.
        let _g = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        rep.invalidate()
            .map_err(|e| failed(format!("invalidate {res}: {e:#}")))?;
        let meta = self.meta(res);
        if let Some(p) = meta.primary.clone() {
            self.purge_own_links(res, &meta, Some(&p))?;
        }
        Ok(Reply::Done {
            message: format!("{res}: replica invalidated; a fast full sync starts"),
        })
    }

    /// `cron`: rotate where this host is primary and the log has data, then delete what nobody
    /// needs (the reconcile loop would do the latter within a second anyway).
    pub(crate) fn cron(&self) -> Outcome {
        let mut lines = Vec::new();
        for r in self.all() {
            if let Some(v) = r.volume() {
                let before = v.status().current_log;
                match v.rotate_if_used() {
                    Ok(p) if p.file != before.no => {
                        lines.push(format!("{}: rotated to log {}", r.cfg.name, p.file))
                    }
                    Ok(_) => {}
                    Err(e) => lines.push(format!("{}: rotate failed: {e}", r.cfg.name)),
                }
            }
            let removed = self.reclaim(&r, &self.meta(&r.cfg.name));
            if !removed.is_empty() {
                lines.push(format!("{}: deleted {}", r.cfg.name, removed.join(", ")));
            }
        }
        Ok(Reply::Done {
            message: if lines.is_empty() {
                "nothing to do".into()
            } else {
                lines.join("\n")
            },
        })
    }

    /// Deletes local logfiles that every member that still pins logs has applied, and this
    /// host's version links older than the logfile before the oldest one anybody keeps (the
    /// chain check of logfile N needs the link of N-1, as in MARS).
    fn reclaim(&self, r: &Resource, meta: &ResourceMeta) -> Vec<String> {
        let removed = self.reclaim_logs(r, meta);
        let oldest_local = crate::resource::log_lengths(&r.dir).first().map(|x| x.0);
        // What this host needs itself, now: the chain check at its replay position needs the
        // link before it. Its published pin may be a round or more old (a restarted
        // ex-primary publishes none while it waits as designated primary), and deleting that
        // link would hide that the next logfile continues another history (found by mars-sim).
        let own_need = r.replica().map(|rep| rep.status().applied.file);
        let floor = [self.pinned_below(r, meta), oldest_local, own_need]
            .into_iter()
            .flatten()
            .min();
        if let Some(floor) = floor {
            let stale: Vec<u64> = meta
                .versions
                .range(..floor.saturating_sub(1))
                .filter(|(_, hosts)| hosts.contains_key(&self.host))
                .map(|(no, _)| *no)
                .collect();
            if !stale.is_empty() {
                let mut store = self.cluster.store();
                for no in stale {
                    if let Err(e) = store.delete(&keys::version(&r.cfg.name, no, &self.host)) {
                        tracing::warn!("{}: cannot delete version link {no}: {e}", r.cfg.name);
                        break;
                    }
                }
            }
        }
        removed
    }

    /// The oldest logfile some member still needs (reports and transient pins).
    fn pinned_below(&self, r: &Resource, meta: &ResourceMeta) -> Option<u64> {
        let limit = Duration::from_secs(
            self.cluster
                .store()
                .value(keys::UNREACHABLE_LIMIT)
                .ok()
                .flatten()
                .and_then(|v| v.parse().ok())
                .unwrap_or(keys::DEFAULT_UNREACHABLE_SECS),
        );
        let below = plan::reclaim_below(meta, &self.host, &self.cluster.ages(), limit);
        match (below, self.transient_pin(&r.cfg.name, meta, limit)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn reclaim_logs(&self, r: &Resource, meta: &ResourceMeta) -> Vec<String> {
        let below = self.pinned_below(r, meta);
        if let Some(v) = r.volume() {
            // Never delete a logfile whose version link is not published yet: the chain
            // continues from it.
            let unlinked = crate::resource::log_lengths(&r.dir)
                .into_iter()
                .map(|(no, _)| no)
                .find(|no| meta.version(*no, &self.host).is_none());
            let below = match (below, unlinked) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match v.reclaim_logs(below) {
                Ok(names) => names.iter().map(ToString::to_string).collect(),
                Err(e) => {
                    tracing::warn!("{}: log reclamation: {e}", r.cfg.name);
                    Vec::new()
                }
            }
        } else if let Some(rep) = r.replica() {
            // Nor a copy whose link this host has not published (the chain check of the next
            // logfile needs it, and nobody else may have it).
            let unlinked = crate::resource::log_lengths(&r.dir)
                .into_iter()
                .map(|(no, _)| no)
                .find(|no| meta.version(*no, &self.host).is_none());
            let below = match (below, unlinked) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            rep.reclaim(below)
        } else {
            Vec::new()
        }
    }
}

/// A member counts as reachable for role decisions if its liveness stamp is this young
/// (stamps are renewed every 2 s).
const ALIVE_WINDOW: Duration = Duration::from_secs(10);
/// After a restart, a host that was primary waits at most this long for the other members'
/// metadata before it takes up the role again.
const STALE_PRIMARY_WAIT: Duration = Duration::from_secs(10);
/// The designated primary must have been this host for this long before it opens its volume:
/// concurrent `primary` commands for different hosts settle (last writer wins) meanwhile.
const PROMOTE_SETTLE: Duration = Duration::from_millis(500);

fn plan_source(
    meta: &ResourceMeta,
    me: &mars_config::HostName,
    fetched: Option<mars_txlog::LogPos>,
    alive: &dyn Fn(&mars_config::HostName) -> bool,
) -> Option<mars_config::HostName> {
    mars_engine::fetch_source(meta, me, fetched, alive)
}

/// What the loop remembers between rounds.
#[derive(Default)]
pub struct Reconciler {
    /// Per resource: the last published report, its state part, and when.
    published: HashMap<ResourceName, (String, String, Instant)>,
    /// Since when this host has been the designated primary of a resource it replicates.
    designated_since: HashMap<ResourceName, Instant>,
    /// Resources whose primary role stays here only because the device is open (logged once).
    remains: std::collections::HashSet<ResourceName>,
}

/// The parts of a report that others act on (as opposed to progress and rates).
fn state_of(r: &mars_engine::Report) -> String {
    format!(
        "{}|{:?}|{:?}|{}|{}|{}|{:?}|{:?}|{}|{:?}|{}",
        r.designation,
        r.forked,
        r.role,
        r.open_count,
        r.attached,
        r.consistent,
        r.sync.as_ref().map(|s| (s.start, s.end_known())),
        r.pin,
        r.needs_sync,
        r.stuck,
        r.caught_up
    )
}

impl Reconciler {
    /// The designated primary elsewhere and our device closed: leave the role and publish the
    /// version links of every logfile (all complete now), so the next primary's replicas can
    /// move past our last one.
    fn step_down(&mut self, d: &Arc<Daemon>, r: &Arc<Resource>, meta: &ResourceMeta) {
        let name = &r.cfg.name;
        self.remains.remove(name);
        // Commands see the resource either as primary or as replica, never in between.
        let _g = d.admin.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!(
            "{name}: leaving the primary role ({} is the designated primary)",
            meta.primary
                .as_ref()
                .map_or("(none)".to_string(), ToString::to_string)
        );
        match r.step_down(Arc::new(meta.clone())) {
            Ok(()) => {
                publish_versions(d, name, r, u64::MAX, meta, false);
                if let Some(rep) = r.replica() {
                    rep.ensure_started(d);
                }
            }
            Err(e) => tracing::error!("{name}: cannot leave the primary role: {e:#}"),
        }
    }

    /// This host is the designated primary but holds a replica: open the volume once the
    /// role rules allow it (see `mars_engine::roles`). Returns whether it became primary.
    fn try_promote(
        &mut self,
        d: &Arc<Daemon>,
        r: &Arc<Resource>,
        rep: &Arc<Replica>,
        meta: &ResourceMeta,
        alive: &dyn Fn(&mars_config::HostName) -> bool,
    ) -> bool {
        let name = &r.cfg.name;
        let since = *self
            .designated_since
            .entry(name.clone())
            .or_insert_with(Instant::now);
        let st = rep.status();
        if !st.consistent {
            rep.set_role_wait(Some(format!(
                "designated primary, but the replica is inconsistent ({}): cannot take over",
                st.needs_sync.as_deref().unwrap_or("full sync not finished")
            )));
            return false;
        }
        let forced = match r.marker(mars_replica::Marker::ForcePrimary) {
            Ok(on) => on,
            Err(e) => {
                // Not knowing whether the switch is forced, it does not happen.
                rep.set_role_wait(Some(format!("designated primary, but: {e}")));
                return false;
            }
        };
        if forced && rep.replay_pending() {
            rep.set_role_wait(Some("replaying what was fetched before taking over".into()));
            return false;
        }
        match mars_engine::promotion(meta, &d.host, st.applied, forced, alive) {
            mars_engine::Promotion::Wait(why) => {
                rep.set_role_wait(Some(why));
                false
            }
            mars_engine::Promotion::Go if since.elapsed() < PROMOTE_SETTLE => false,
            mars_engine::Promotion::Go => {
                let _g = d.admin.lock().unwrap_or_else(|e| e.into_inner());
                match r.promote() {
                    Ok(at) => {
                        tracing::info!(
                            "{name}: primary now{}, continuing after {at}",
                            if forced { " (forced)" } else { "" }
                        );
                        self.designated_since.remove(name);
                        true
                    }
                    Err(e) => {
                        tracing::error!("{name}: cannot become primary: {e:#}");
                        false
                    }
                }
            }
        }
    }

    /// Space pressure on a primary (MARS's emergency mode): below `emergency_free_space` free
    /// in the root, or with the resource's logfiles above its `set-emergency-limit` share of
    /// the root, writes go straight to the disk and the log stops growing; replicas stop where
    /// they are. Once `min_free_space` is free again, the log continues after a hole of one
    /// logfile number (replicas cannot cross it: `invalidate` brings them back) and the old
    /// logfiles are deleted.
    fn emergency(
        &mut self,
        d: &Arc<Daemon>,
        r: &Arc<Resource>,
        v: &Arc<mars_volume::Volume>,
        meta: &ResourceMeta,
        free: Option<u64>,
    ) {
        let name = &r.cfg.name;
        let limit_hit = meta
            .members
            .get(&d.host)
            .and_then(|m| m.emergency_limit)
            .and_then(|pct| {
                let total = total_space(&d.root)?;
                let (_, used) = crate::resource::log_usage(&r.dir);
                Some(used.saturating_mul(100) > total.saturating_mul(u64::from(pct)))
            })
            .unwrap_or(false);
        let low = free.is_some_and(|f| f < d.tuning.emergency_free_space) || limit_hit;
        if low && !v.passthrough() {
            // The marker first: a restart in emergency mode must find it, or the log would go
            // on as if no write had bypassed it.
            let entered = r
                .set_marker(mars_replica::Marker::Emergency, true)
                .map_err(|e| format!("cannot set the emergency marker: {e}"))
                .and_then(|()| {
                    v.enter_passthrough(Duration::from_secs(5)).map_err(|e| {
                        // Not in emergency mode after all: the marker goes again.
                        r.clear_emergency_marker();
                        e.to_string()
                    })
                });
            match entered {
                Ok(()) => {
                    tracing::error!(
                        "{name}: EMERGENCY MODE: {} free in the root{}: writes go straight to the \
                         disk, replication has stopped; free space, then `marsadm invalidate {name}` \
                         on the secondaries",
                        free.map_or("?".into(), format_size),
                        if limit_hit {
                            " (the resource's logfiles exceed its emergency limit)"
                        } else {
                            ""
                        }
                    );
                }
                Err(e) => tracing::error!("{name}: cannot enter emergency mode: {e}"),
            }
        } else if v.passthrough() && free.is_none_or(|f| f >= d.tuning.min_free_space) {
            match v.restart_log_after_gap() {
                Ok(no) => {
                    tracing::warn!(
                        "{name}: space is back: emergency mode ends, the log continues at {no} after \
                         a hole; secondaries need `marsadm invalidate {name}`"
                    );
                    if let Err(e) = r.record_chain_start(no) {
                        tracing::error!(
                            "{name}: cannot record the chain start {no}: {e} (retried; the \
                             emergency marker stays until it is recorded)"
                        );
                    }
                }
                Err(e) => tracing::error!("{name}: cannot leave emergency mode: {e}"),
            }
        }
        // The chain restarts at the logfile after the hole: tell the others.
        if let Some(no) = r.chain_start() {
            if meta.chain_starts.get(&d.host) != Some(&no) {
                let key = keys::chain_start(name, &d.host);
                if let Err(e) = d.cluster.store().set(&key, &no.to_string()) {
                    tracing::warn!("{name}: cannot publish {key}: {e}");
                }
            }
        }
    }

    /// One round over every local resource. Blocking: run on a blocking thread.
    pub fn round(&mut self, d: &Arc<Daemon>) {
        let addrs = d.cluster.members();
        // Before the metadata is read: a primary role found on disk is taken up only with
        // metadata at least as fresh as every member's answer since the restart.
        let fresh = d.cluster.all_answered_since(&d.host, d.started).is_empty()
            || d.started.elapsed() > STALE_PRIMARY_WAIT;
        let free = free_space(&d.root);
        let space_low = free.is_some_and(|f| f < d.tuning.min_free_space);
        for r in d.all() {
            let name = r.cfg.name.clone();
            let meta = d.meta(&name);
            if !meta.exists() || !meta.is_member(&d.host) {
                // Deleted cluster-wide, or our membership was removed by force.
                let _g = d.admin.lock().unwrap_or_else(|e| e.into_inner());
                if d.resource(&name).is_some() {
                    let why = if meta.exists() {
                        "no longer a member"
                    } else {
                        "deleted in the cluster"
                    };
                    if let Err(e) = d.teardown(&r, why) {
                        tracing::error!("{name}: {}", e.1);
                    }
                }
                self.published.remove(&name);
                continue;
            }
            let todo = meta.members[&d.host].todo;
            // Control files that failed to be written where the operation went on anyway.
            r.retry_control_files();
            if let Some(size) = meta.size {
                if size > r.size() {
                    if let Some(v) = r.volume() {
                        if let Err(e) = v.grow(size) {
                            tracing::error!("{name}: cannot grow to {size}: {e}");
                        }
                    }
                    r.set_size(size);
                }
            }
            let me_designated = meta.primary.as_ref() == Some(&d.host);
            r.set_designated(me_designated);
            if !me_designated {
                self.designated_since.remove(&name);
            }
            if let Some(v) = r.volume() {
                if !me_designated {
                    // Fenced once another host acts as the designated primary (a forced
                    // switch while our device is open): the application must not go on
                    // writing a history that is no longer the resource's.
                    let other_acting = meta.primary.as_ref().is_some_and(|p| {
                        meta.members
                            .get(p)
                            .and_then(|m| m.report.as_ref())
                            .is_some_and(|rep| rep.role == mars_engine::Role::Primary)
                    });
                    r.set_fenced(other_acting);
                    if r.open_count() == 0 {
                        drop(v);
                        self.step_down(d, &r, &meta);
                    } else if self.remains.insert(name.clone()) {
                        tracing::warn!(
                            "{name}: {} is the designated primary now, but the device is open here ({}): \
                             staying primary until it is closed",
                            meta.primary.as_ref().map_or("(none)".to_string(), ToString::to_string),
                            r.open_count()
                        );
                    }
                } else {
                    self.remains.remove(&name);
                    r.set_fenced(false);
                    self.emergency(d, &r, &v, &meta, free);
                    if !todo.attach && r.open_count() == 0 {
                        tracing::info!("{name}: detaching");
                        r.close();
                    } else {
                        publish_versions(d, &name, &r, v.status().durable.file, &meta, false);
                    }
                }
            } else if let Some(rep) = r.replica() {
                let ages = d.cluster.ages();
                let alive =
                    |h: &mars_config::HostName| ages.get(h).is_some_and(|a| *a <= ALIVE_WINDOW);
                let st = rep.status();
                if me_designated && todo.attach && self.try_promote(d, &r, &rep, &meta, &alive) {
                    continue;
                }
                let source = plan_source(&meta, &d.host, st.fetched, &alive)
                    .and_then(|p| addrs.get(&p).map(|a| (p.clone(), a.clone())));
                rep.update(todo, Arc::new(meta.clone()), source, meta.size.unwrap_or(0));
                rep.ensure_started(d);
                {
                    // Not while `invalidate` resets the copies and purges their links.
                    let _g = d.admin.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(&(newest, _)) = crate::resource::log_lengths(&r.dir).last() {
                        publish_versions(d, &name, &r, newest, &meta, true);
                    }
                }
                if space_low {
                    rep.drop_logs_for_space(free.unwrap_or(0), d.tuning.min_free_space);
                }
            } else if todo.attach && me_designated {
                // Taken up (after a restart) once every other member answered, or after a
                // while if some stay silent (they may be down for good).
                if fresh {
                    r.attach_primary();
                }
            } else if !me_designated && r.error().is_none() {
                // Restarted as the old primary, but another host took over meanwhile.
                r.attach_secondary(Arc::new(meta.clone()));
                if let Some(rep) = r.replica() {
                    rep.ensure_started(d);
                }
            }
            // The stack follows the role; the device is "present" while this host serves it.
            // The stack may start once the device it uses exists: the local block device where
            // the daemon serves one, otherwise the open volume (NBD export).
            let device_present = match d.tuning.device {
                crate::resource::DeviceMode::None => r.volume().is_some(),
                crate::resource::DeviceMode::FuseLoop => r.device_path().is_some(),
            };
            crate::systemd::tick(d, &r, &meta, device_present);
            let removed = d.reclaim(&r, &meta);
            if !removed.is_empty() {
                tracing::info!("{name}: deleted logfiles {}", removed.join(", "));
            }
            let mut report = r.report(&todo);
            report.designation = meta.designation;
            // The physical disk size: `resize` grows to the smallest member disk.
            report.disk_size = disk_len(&r.cfg.disk).unwrap_or(report.disk_size);
            let json = report.to_json();
            let state = state_of(&report);
            // State changes go out at once (others decide on them: pins, consistency);
            // moving positions and rates at most every REPORT_EVERY.
            let due = match self.published.get(&name) {
                Some((old, old_state, at)) => {
                    *old_state != state || (*old != json && at.elapsed() >= REPORT_EVERY)
                }
                None => true,
            };
            if due {
                let key = keys::actual(&name, &d.host);
                match d.cluster.store().set(&key, &json) {
                    Ok(_) => {
                        self.published.insert(name, (json, state, Instant::now()));
                    }
                    Err(e) => tracing::warn!("cannot publish {key}: {e}"),
                }
            }
        }
    }
}

/// `statvfs(2)` of the filesystem holding `path`.
fn statvfs(path: &Path) -> Option<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st)
}

/// Size of the filesystem holding `path`.
fn total_space(path: &Path) -> Option<u64> {
    statvfs(path).map(|st| st.f_blocks * st.f_frsize)
}

/// Bytes available to us in the filesystem holding `path`.
fn free_space(path: &Path) -> Option<u64> {
    statvfs(path).map(|st| st.f_bavail * st.f_frsize)
}

/// Publishes this host's version link of each of its logfiles below `complete_below` that has
/// none yet. A primary passes its durable logfile number: logfile N is complete on disk once
/// the log is durable somewhere in N+1 (the appender finishes N before it writes into N+1).
/// A primary that just left its role passes `u64::MAX`: all its logfiles are complete.
///
/// `own_only`: a replica publishes only for logfiles it wrote itself as primary before (a
/// restarted ex-primary whose replay starts beyond them); replay publishes the others.
fn publish_versions(
    d: &Daemon,
    res: &ResourceName,
    r: &Resource,
    complete_below: u64,
    meta: &ResourceMeta,
    own_only: bool,
) {
    let mut meta = meta.clone();
    let dir = r.dir.clone();
    let names = match mars_storage::real::RealDir::open(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|dd| Ok(mars_txlog::list_logs(&dd)?))
    {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("{res}: cannot list logfiles: {e}");
            return;
        }
    };
    for name in names
        .into_iter()
        .filter(|n| n.no < complete_below && (!own_only || n.host == d.host))
    {
        if meta.version(name.no, &d.host).is_some() {
            continue;
        }
        let len = match std::fs::metadata(dir.join(name.to_string())) {
            Ok(m) => m.len(),
            Err(_) => continue,
        };
        let Some(link) = plan::my_link(&meta, &d.host, name.no, &name.host, len) else {
            // The previous link has not arrived yet: later.
            return;
        };
        let key = keys::version(res, name.no, &d.host);
        if let Err(e) = d.cluster.store().set(&key, &link) {
            tracing::warn!("{res}: cannot publish {key}: {e}");
            return;
        }
        meta.versions
            .entry(name.no)
            .or_default()
            .insert(d.host.clone(), link);
    }
}

/// The local replica of `r`. Right after a start (or a role change) the reconcile loop sets it
/// up within a round or two: wait for it (a few seconds) instead of refusing a command typed a
/// moment early.
pub(crate) fn wait_replica(r: &Resource, res: &ResourceName) -> Result<Arc<Replica>, Refusal> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(rep) = r.replica() {
            return Ok(rep);
        }
        if let Some(e) = r.error() {
            return Err(invalid(format!("{res} is not set up here: {e}")));
        }
        if Instant::now() >= until {
            return Err(invalid(format!(
                "{res} is not attached here yet (`marsadm view {res}` shows its state)"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn reconcile_loop(d: Arc<Daemon>) {
    let rec = Arc::new(std::sync::Mutex::new(Reconciler::default()));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE) => {},
            _ = d.reconcile_now.notified() => {},
        }
        let (d2, rec2) = (d.clone(), rec.clone());
        let _ = tokio::task::spawn_blocking(move || {
            rec2.lock().unwrap_or_else(|e| e.into_inner()).round(&d2);
            *d2.last_round.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        })
        .await;
    }
}
