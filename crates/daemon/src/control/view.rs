//! `marsadm view`: the resources from their actors' snapshots, this host's line from its live
//! state, the others' from the metadata.

use std::time::Duration;

use mars_api::{
    ClusterInfo, ClusterView, LogPin, LogView, Progress, ReplicaView, ResourceSpace, ResourceView,
    SpaceView, SplitBrainView, SplitSide, SystemdView,
};
use mars_config::HostName;
use mars_engine::Role;

use crate::host::Host;
use crate::resource::Handle;

pub async fn view(host: &Host, list: Vec<Handle>, all: bool, window: Duration) -> ClusterView {
    let ages = host.cluster.ages().await;
    let me = host.ident.host.clone();
    let alive = |h: &HostName| *h == me || ages.get(h).is_some_and(|a| *a <= window);
    let mut resources = Vec::new();
    let mut spaces = Vec::new();
    for h in list {
        let (v, s) = resource_view(host, &h, &alive).await;
        resources.push(v);
        spaces.push(s);
    }
    let space = space_view(host, spaces).await;
    let members = if all {
        host.cluster.member_views(window).await
    } else {
        Vec::new()
    };
    ClusterView {
        host: me.to_string(),
        cluster: host.ident.cluster().map(|c| ClusterInfo {
            uuid: c.uuid,
            host: c.host.to_string(),
            address: c.address,
            security: if host.ident.insecure {
                "insecure".into()
            } else {
                match host.ident.fingerprint() {
                    Some(fp) => format!("tls sha256:{fp}"),
                    None => "tls (no certificate!)".into(),
                }
            },
        }),
        members,
        resources,
        space: Some(Box::new(space)),
    }
}

/// The root's space, with the logfiles of the resources shown (every resource's for a view
/// of all, which is what `view` without a name and the metrics ask).
async fn space_view(host: &Host, resources: Vec<ResourceSpace>) -> SpaceView {
    let root = host.ident.root.clone();
    let st = tokio::task::spawn_blocking(move || crate::host::statvfs(&root))
        .await
        .ok()
        .flatten();
    let rate = host.log_growth();
    let free = st.map(|s| s.0);
    SpaceView {
        root: host.ident.root.display().to_string(),
        free_bytes: free,
        // Used as `df` counts it: what is not available to us (reserved blocks included).
        used_bytes: st.map(|(f, t)| t.saturating_sub(f)),
        total_bytes: st.map(|s| s.1),
        log_bytes: resources.iter().map(|r| r.log_bytes).sum(),
        preallocated_bytes: resources.iter().map(|r| r.preallocated_bytes).sum(),
        log_growth_bytes_per_sec: rate,
        full_in_secs: free.filter(|_| rate > 0.0).map(|f| f as f64 / rate),
        min_free_bytes: host.tuning.min_free_space,
        emergency_free_bytes: host.tuning.emergency_free_space,
        resources,
    }
}
async fn resource_view(
    host: &Host,
    h: &Handle,
    alive: &(dyn Fn(&HostName) -> bool + Sync),
) -> (ResourceView, ResourceSpace) {
    let me = host.ident.host.clone();
    let snap = h.snapshot();
    let st = &snap.status;
    let meta = &snap.meta;
    // This host's line is computed from live local state, not from the last published report.
    let mut local = (**meta).clone();
    if let Some(m) = local.members.get_mut(&me) {
        m.report = Some(st.report.clone());
    }
    let here = |x: &HostName| *x == me || alive(x);
    let ms = mars_engine::member_state(&local, &me, &here);
    let (mut disk_state, repl_state, flags) = (ms.disk_state, ms.repl_state, ms.flags);
    if let (false, Some((state, _))) = (st.primary, &st.error) {
        disk_state = state.clone();
    }
    let name = h.name.to_string();
    let log = if st.primary {
        let sh = h.shared.clone();
        let dir = h.dir.clone();
        tokio::task::spawn_blocking(move || {
            let v = sh.volume()?;
            let s = v.status();
            let logs = crate::local::volume::logs_in(&dir);
            Some(LogView {
                current: s.current_log.to_string(),
                appended: s.appended.to_string(),
                durable: s.durable.to_string(),
                written_back: s.written_back.to_string(),
                dirty_bytes: s.dirty_bytes,
                pending_records: s.pending_records,
                writes: s.writes,
                logfiles: logs.len() as u64,
                log_bytes: logs.iter().map(|l| l.len).sum(),
            })
        })
        .await
        .ok()
        .flatten()
    } else {
        None
    };
    let mut sync = None;
    let mut fetch = None;
    let mut replay = None;
    let mut stuck = None;
    if !st.primary {
        let r = &st.report;
        stuck = r.stuck.clone().or(st.fetch_error.clone());
        sync = r.sync.as_ref().map(|y| Progress {
            done: y.done,
            total: y.size,
            rate: y.rate,
            logs: None,
        });
        if let Some(applied) = st.applied {
            let primary_end = meta.bytes_after(applied);
            let fetched_rest = st.fetched.and_then(|f| meta.bytes_after(f)).or(primary_end);
            if let Some(total) = primary_end {
                let fetched = total.saturating_sub(fetched_rest.unwrap_or(total));
                fetch = Some(Progress {
                    done: fetched,
                    total,
                    rate: r.fetch_rate,
                    logs: Some(st.logs),
                });
                replay = Some(Progress {
                    done: 0,
                    total,
                    rate: r.replay_rate,
                    logs: Some(st.logs),
                });
            }
        }
    }
    // Lag in seconds: the stamp of each member's first unapplied record, from this host's
    // logfiles (the primary holds every member's; a replica its own copies).
    let applied: Vec<(HostName, Option<mars_txlog::LogPos>)> = meta
        .members
        .keys()
        .map(|hn| {
            let m = if *hn == me { &local } else { &**meta };
            (
                hn.clone(),
                m.members[hn].report.as_ref().and_then(|r| r.applied),
            )
        })
        .collect();
    let (usage, stamps) = {
        let dir = h.dir.clone();
        let origin = meta.primary.clone();
        tokio::task::spawn_blocking(move || {
            let stamps: std::collections::BTreeMap<HostName, u64> = applied
                .into_iter()
                .filter_map(|(hn, p)| {
                    Some((
                        hn,
                        crate::local::space::stamp_at(&dir, p?, origin.as_ref())?,
                    ))
                })
                .collect();
            (crate::local::space::usage(&dir), stamps)
        })
        .await
        .unwrap_or_default()
    };
    let now_ns = mars_meta::system_time_ns();
    let liveness = host.liveness();
    let pinning = |x: &HostName| liveness.pinning.contains(x);
    let space = ResourceSpace {
        name: h.name.to_string(),
        logfiles: usage.logfiles,
        log_bytes: usage.log_bytes,
        preallocated_bytes: usage.preallocated_bytes,
        reclaim_below: mars_engine::plan::reclaim_below_by(&local, &me, &pinning),
        pins: local
            .members
            .iter()
            .map(|(hn, m)| LogPin {
                host: hn.to_string(),
                logfile: m.report.as_ref().and_then(|r| r.pin),
                holds: *hn == me || pinning(hn),
            })
            .collect(),
    };
    let members = meta
        .members
        .keys()
        .map(|hn| {
            let m = if *hn == me { &local } else { &**meta };
            let s = mars_engine::member_state(m, hn, &here);
            let mem = &m.members[hn];
            let r = mem.report.as_ref();
            ReplicaView {
                host: hn.to_string(),
                disk: mem.disk.clone(),
                role: match r.map(|r| r.role) {
                    Some(Role::Primary) => "Primary",
                    _ => "Secondary",
                }
                .into(),
                disk_state: s.disk_state,
                repl_state: s.repl_state,
                flags: s.flags,
                alive: here(hn),
                consistent: r.is_some_and(|r| r.consistent),
                applied: r.and_then(|r| r.applied).map(|p| p.to_string()),
                behind: s.behind,
                // Clocks differ between hosts (NTP keeps them close): never negative.
                lag_secs: match s.behind {
                    Some(0) => Some(0.0),
                    _ => stamps
                        .get(hn)
                        .map(|t| now_ns.saturating_sub(*t) as f64 / 1e9),
                },
                emergency: r.is_some_and(|r| r.emergency),
                systemd_ok: meta.systemd.status.get(hn).map(|st| st.ok()),
                sync: r.and_then(|r| r.sync.as_ref()).map(|y| Progress {
                    done: y.done,
                    total: y.size,
                    rate: y.rate,
                    logs: None,
                }),
                stuck: r.and_then(|r| r.stuck.clone()),
                systemd: meta.systemd.status.get(hn).map(|st| st.summary()),
            }
        })
        .collect();
    let device_error = match &st.device {
        Some(Err(e)) => Some(e.clone()),
        _ => None,
    };
    let view = ResourceView {
        name: name.clone(),
        size: st.size,
        disk: snap.disk.clone(),
        role: if st.primary { "Primary" } else { "Secondary" }.into(),
        primary: meta.primary.as_ref().map_or(
            mars_engine::keys::NO_PRIMARY.to_string(),
            ToString::to_string,
        ),
        disk_state,
        repl_state,
        flags,
        log,
        device: snap.device.as_ref().map(|p| p.display().to_string()),
        device_error,
        nbd_unix_uri: st.primary.then(|| host.ident.nbd_unix_uri(&name)),
        nbd_tcp_uri: host.ident.nbd_tcp_uri(&name).filter(|_| st.primary),
        open_count: snap.open_count,
        error: st.error.as_ref().map(|(_, m)| m.clone()),
        consistent: st.consistent,
        sync,
        fetch,
        replay,
        stuck,
        // Its age now, not when the snapshot was made: `wait-resource uptodate` compares it
        // with how long it has waited.
        caught_up_ms: st
            .caught_up_stamp
            .map(|stamp| mars_meta::system_time_ns().saturating_sub(stamp) / 1_000_000)
            .filter(|ms| *ms < host.engine_timing().caught_up_valid && st.caught_up_ms.is_some()),
        members,
        split_brain: mars_engine::split_brain(&local, &here).map(|sb| SplitBrainView {
            logfile: sb.logfile,
            sides: sb
                .sides
                .into_iter()
                .map(|s| SplitSide {
                    hosts: s.hosts.iter().map(ToString::to_string).collect(),
                    bytes: s.bytes,
                })
                .collect(),
        }),
        systemd: meta.systemd.start_unit.as_ref().map(|start| SystemdView {
            start_unit: start.clone(),
            stop_unit: meta.systemd.stop().unwrap_or(start).to_string(),
            want: meta.systemd.want_raw.clone(),
        }),
    };
    (view, space)
}
