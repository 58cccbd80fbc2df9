//! `marsadm view`: the resources from their actors' snapshots, this host's line from its live
//! state, the others' from the metadata.

use std::time::Duration;

use mars_api::{
    ClusterInfo, ClusterView, DiskState, LogPin, LogPos, LogView, Progress, ReplState, ReplicaView,
    ResourceSpace, ResourceView, SpaceView, SplitBrainView, SplitSide, SystemdView,
};
use mars_config::HostName;
use mars_engine::Role;

use crate::host::Host;
use crate::resource::Handle;

pub async fn view(host: &Host, list: Vec<Handle>, all: bool, window: Duration) -> ClusterView {
    let ages = host.cluster.ages().await;
    let connected = host.cluster.connected_peers();
    let me = host.ident.host.clone();
    // The same rule as the member list: a member that neither answers us nor refreshes its
    // stamp is not alive, so neither its stale role nor a "split brain" with it shows.
    let alive = |h: &HostName| {
        *h == me
            || crate::meta::cluster::alive_for_view(
                ages.get(h).copied(),
                connected.contains(h),
                window,
            )
    };
    let mut resources = Vec::new();
    let mut spaces = Vec::new();
    for h in list {
        let (v, s) = resource_view(host, &h, &alive).await;
        resources.push(v);
        spaces.push(s);
    }
    let space = space_view(host, spaces).await;
    let mut members = if all {
        host.cluster.member_views(window).await
    } else {
        Vec::new()
    };
    add_streams(&mut members, crate::traffic::all());
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
    let (mut disk_state, repl_state, flags) =
        (disk(&ms.disk_state), repl(&ms.repl_state), ms.flags);
    if let (false, Some((state, _))) = (st.primary, &st.error) {
        disk_state = disk(state);
    }
    let name = h.name.to_string();
    // Counted now: the snapshot's count may be up to a second older than the last event
    // (counting walks `/proc`, see the actor's `open`), and `wait-umount` and scripts poll
    // this after closing the device.
    let open_count = {
        let sh = h.shared.clone();
        tokio::task::spawn_blocking(move || sh.open_count())
            .await
            .unwrap_or(snap.open_count)
    };
    let log = if st.primary {
        let sh = h.shared.clone();
        let dir = h.dir.clone();
        tokio::task::spawn_blocking(move || {
            let v = sh.volume()?;
            let s = v.status();
            let logs = crate::local::volume::logs_in(&dir);
            Some(LogView {
                current: s.current_log.to_string(),
                appended: pos(s.appended),
                durable: pos(s.durable),
                written_back: pos(s.written_back),
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
    let stuck = if st.primary {
        None
    } else {
        st.report.stuck.clone().or(st.fetch_error.clone())
    };
    let crate::resource::Jobs {
        sync,
        fetch,
        replay,
    } = crate::resource::jobs(&snap);
    // Every member's state, once (its line below and whether it is behind at all).
    let states: std::collections::BTreeMap<HostName, mars_engine::MemberState> = meta
        .members
        .keys()
        .map(|hn| {
            let m = if *hn == me { &local } else { &**meta };
            (hn.clone(), mars_engine::member_state(m, hn, &here))
        })
        .collect();
    // Lag in seconds: the stamp of each member's first unapplied record, from this host's
    // logfiles (the primary holds every member's; a replica its own copies). Only members
    // with something behind cost a read; one listing of the directory serves them all and
    // the space figures (`view` runs on every `wait-resource` poll and metrics scrape).
    let applied: Vec<(HostName, mars_txlog::LogPos)> = meta
        .members
        .keys()
        .filter(|hn| states[*hn].behind != Some(0))
        .filter_map(|hn| {
            let m = if *hn == me { &local } else { &**meta };
            Some((hn.clone(), m.members[hn].report.as_ref()?.applied?))
        })
        .collect();
    let (usage, stamps) = {
        let dir = h.dir.clone();
        let origin = meta.primary.clone();
        tokio::task::spawn_blocking(move || {
            let logs = crate::local::space::Logfiles::scan(&dir);
            let stamps: std::collections::BTreeMap<HostName, u64> = applied
                .into_iter()
                .filter_map(|(hn, p)| Some((hn, logs.stamp_at(p, origin.as_ref())?)))
                .collect();
            (logs.usage(), stamps)
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
            let s = &states[hn];
            let mem = &m.members[hn];
            let r = mem.report.as_ref();
            ReplicaView {
                host: hn.to_string(),
                disk: mem.disk.clone(),
                // A member that is not alive acts in no role we can know of: its last
                // report is stale (a dead primary must not look like one still acting).
                role: r.filter(|_| here(hn)).map(|r| api_role(r.role)),
                writeback_bytes: writeback(&s.disk_state, r.map_or(0, |r| r.dirty_bytes)),
                disk_state: disk(&s.disk_state),
                repl_state: repl(&s.repl_state),
                flags: s.flags.clone(),
                alive: here(hn),
                consistent: r.is_some_and(|r| r.consistent),
                applied: r.and_then(|r| r.applied).map(pos),
                behind: s.behind,
                // The record's stamp is the primary's wall clock: its measured skew is taken
                // off (`to_local_wall`), and what remains is never negative.
                lag_secs: match s.behind {
                    Some(0) => Some(0.0),
                    _ => stamps.get(hn).map(|t| {
                        let t = match &meta.primary {
                            Some(p) if *p != me => crate::meta::cluster::to_local_wall(p, *t),
                            _ => *t,
                        };
                        now_ns.saturating_sub(t) as f64 / 1e9
                    }),
                },
                emergency: r.is_some_and(|r| r.emergency),
                systemd_ok: meta.systemd.status.get(hn).map(|st| st.ok()),
                disk_size_bytes: r.map(|r| r.disk_size),
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
        role: if st.primary {
            mars_api::Role::Primary
        } else {
            mars_api::Role::Secondary
        },
        primary: meta.primary.as_ref().map(ToString::to_string),
        writeback_bytes: (disk_state == DiskState::WriteBack).then_some(st.report.dirty_bytes),
        disk_state,
        repl_state,
        flags,
        log,
        device: snap.device.as_ref().map(|p| p.display().to_string()),
        device_error,
        nbd_unix_uri: st.primary.then(|| host.ident.nbd_unix_uri(&name)),
        nbd_tcp_uri: host.ident.nbd_tcp_uri(&name).filter(|_| st.primary),
        nbd_tcp: host.ident.nbd_tcp_uri(&name).is_some(),
        open_count,
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

/// The engine's MARS disk-state text as the typed state; a text this version does not know
/// (never, by the test below) reads as `NotPresent` rather than failing the view.
fn disk(text: &str) -> DiskState {
    DiskState::from_mars_text(text).unwrap_or(DiskState::NotPresent)
}

fn repl(text: &str) -> ReplState {
    ReplState::from_mars(text).unwrap_or(ReplState::NotStarted)
}

/// The amount behind `WriteBack[…]`, which JSON carries as a number.
fn writeback(text: &str, dirty: u64) -> Option<u64> {
    (disk(text) == DiskState::WriteBack).then_some(dirty)
}

fn pos(p: mars_txlog::LogPos) -> LogPos {
    LogPos {
        logfile: p.file,
        offset: p.offset,
    }
}

fn api_role(r: Role) -> mars_api::Role {
    match r {
        Role::Primary => mars_api::Role::Primary,
        _ => mars_api::Role::Secondary,
    }
}

/// Each member's fetch and sync traffic with this host (`traffic.rs`), with its compression.
fn add_streams(members: &mut [mars_api::MemberView], rows: Vec<crate::traffic::Row>) {
    for r in rows.into_iter().filter(|r| r.kind != "meta") {
        if let Some(m) = members.iter_mut().find(|m| m.host == r.peer) {
            m.streams.push(mars_api::StreamView {
                stream: r.kind.to_string(),
                compression: r.method.map(str::to_string),
                received_bytes: r.received,
                received_raw_bytes: r.received_raw,
                sent_bytes: r.sent,
                sent_raw_bytes: r.sent_raw,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every state text the engine produces has its typed state.
    #[test]
    fn engine_state_texts_are_typed() {
        for (text, want) in [
            ("WriteBack[72.50 MiB]", DiskState::WriteBack),
            ("DefectiveLog[damaged record]", DiskState::DefectiveLog),
            ("OutDated[FR]", DiskState::OutDatedFR),
            ("OutDated[F]", DiskState::OutDatedF),
            ("OutDated[R]", DiskState::OutDatedR),
            ("Detached", DiskState::Detached),
        ] {
            assert_eq!(DiskState::from_mars_text(text), Some(want), "{text}");
        }
        for d in DiskState::ALL {
            assert_eq!(DiskState::from_mars_text(d.as_str()), Some(*d));
        }
        assert_eq!(writeback("WriteBack[1 B]", 1), Some(1));
        assert_eq!(writeback("UpToDate", 1), None);
    }
}
