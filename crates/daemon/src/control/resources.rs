//! Resource commands. `create-resource` and `join-resource` make the directory, write this
//! host's keys and start the resource's actor; everything else is an engine operation sent to
//! the actor (its guards decide), except the systemd settings, which are shared keys checked
//! against the templates here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mars_api::{ErrorKind, Reply, Request, SwitchKind};
use mars_config::{format_size, ResourceName};
use mars_engine::keys;
use mars_engine::resource::{Op, SyncFile};
use mars_engine::{OpError, OpErrorKind, ResourceMeta};
use mars_unitgen::{fs as ufs, Config as GenConfig, Generator};

use super::{done, failed, invalid, not_found, Outcome};
use crate::host::Host;
use crate::resource::{disk_len, Handle};
use crate::root::{self, ResourceFile, RESOURCE_FILE};

/// MARS refuses resources of 64 KiB and less; so do we.
pub const MIN_RESOURCE_SIZE: u64 = 64 << 10 | 1;
/// How long create and join wait for the new resource to be set up.
const SETUP_WAIT: Duration = Duration::from_secs(120);

fn kind(k: OpErrorKind) -> ErrorKind {
    match k {
        OpErrorKind::Invalid => ErrorKind::Invalid,
        OpErrorKind::NotFound => ErrorKind::NotFound,
        OpErrorKind::Exists => ErrorKind::Exists,
        OpErrorKind::Failed => ErrorKind::Failed,
        OpErrorKind::NeedsConfirmation => ErrorKind::NeedsConfirmation,
        OpErrorKind::Timeout => ErrorKind::Timeout,
    }
}

fn from_op(r: Result<String, OpError>) -> Outcome {
    match r {
        Ok(message) => Ok(Reply::Done { message }),
        Err(e) => Err((kind(e.kind), e.msg)),
    }
}

async fn meta(host: &Host, res: &ResourceName) -> Result<ResourceMeta, (ErrorKind, String)> {
    host.store
        .resource_meta(res)
        .await
        .map_err(|e| failed(format!("cannot read the metadata of {res}: {e}")))
}

fn disk_error(disk: &Path, e: std::io::Error) -> (ErrorKind, String) {
    let kind = if e.kind() == std::io::ErrorKind::NotFound {
        ErrorKind::NotFound
    } else {
        ErrorKind::Invalid
    };
    (kind, format!("cannot use disk {}: {e}", disk.display()))
}

/// Checks shared by create and join.
fn check_new(host: &Host, res: &ResourceName, disk: &Path) -> Result<(), (ErrorKind, String)> {
    if !disk.is_absolute() {
        return Err(invalid(format!(
            "disk path {} must be absolute",
            disk.display()
        )));
    }
    let dir = root::resource_dir(&host.ident.root, res);
    if dir.exists() {
        return Err((
            ErrorKind::Exists,
            format!(
                "{} exists already (leftover of an old resource?)",
                dir.display()
            ),
        ));
    }
    if let Some(other) = host.all().into_iter().find(|r| r.disk == disk) {
        return Err(invalid(format!(
            "disk {} is already used by resource {}",
            disk.display(),
            other.name
        )));
    }
    Ok(())
}

/// Waits until the new resource's actor has opened its volume (or replica), or failed.
async fn settled(h: &Handle, primary: bool) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + SETUP_WAIT;
    loop {
        let s = h.snapshot();
        let st = &s.status;
        if let Some((_, e)) = &st.error {
            return Err(e.clone());
        }
        let ready = if primary {
            st.primary
        } else {
            st.applied.is_some()
        };
        if ready {
            return Ok(());
        }
        if h.is_closed() {
            return Err("the resource was torn down".into());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err("it was not set up in time".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn create(
    host: &Arc<Host>,
    res: ResourceName,
    disk: &Path,
    size: Option<u64>,
    dry: bool,
) -> Outcome {
    let _g = host.admin.lock().await;
    if host.ident.cluster().is_none() {
        return Err(invalid(
            "this host is not in a cluster yet: run `marsadm create-cluster` first",
        ));
    }
    if host.get(&res).is_some() {
        return Err((ErrorKind::Exists, format!("resource {res} already exists")));
    }
    let known = meta(host, &res).await?;
    if known.exists() {
        let members: Vec<String> = known.members.keys().map(ToString::to_string).collect();
        return Err((
            ErrorKind::Exists,
            format!(
                "resource {res} already exists in the cluster (members: {}); use join-resource",
                members.join(", ")
            ),
        ));
    }
    check_new(host, &res, disk)?;
    let disk_len = {
        let d = disk.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let f = mars_storage::real::open_disk(&d)?;
            mars_storage::File::len(&*f)
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| disk_error(disk, e))?
    };
    let size = size.unwrap_or(disk_len);
    if size < MIN_RESOURCE_SIZE {
        return Err(invalid(format!(
            "size {} is too small: a resource must be larger than 64 KiB",
            format_size(size)
        )));
    }
    if !size.is_multiple_of(512) {
        return Err(invalid(format!(
            "size {size} is not a multiple of 512 bytes"
        )));
    }
    if size > disk_len {
        return Err(invalid(format!(
            "disk {} has {} ({disk_len} bytes), less than the requested {} ({size} bytes)",
            disk.display(),
            format_size(disk_len),
            format_size(size)
        )));
    }
    let me = host.ident.host.clone();
    if dry {
        return done(format!(
            "would create resource {res} on {} ({}, {size} bytes) with {me} as its primary: \
             directory {}, the keys of {res} and {me}'s switches, a logfile; NBD: {}",
            disk.display(),
            format_size(size),
            root::resource_dir(&host.ident.root, &res).display(),
            host.ident.nbd_unix_uri(res.as_str())
        ));
    }
    let cfg = ResourceFile {
        name: res.clone(),
        disk: disk.to_path_buf(),
        size,
    };
    let dir = root::resource_dir(&host.ident.root, &res);
    let mut set = vec![
        (keys::size(&res), size.to_string()),
        (keys::primary(&res), me.to_string()),
        (keys::data(&res, &me), disk.display().to_string()),
    ];
    for sw in SwitchKind::ALL {
        set.push((keys::todo(&res, &me, sw.as_str()), "1".into()));
    }
    let keys_written: Vec<String> = set.iter().map(|(k, _)| k.clone()).collect();
    let created = async {
        let (d, c) = (dir.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            std::fs::create_dir(&d)?;
            root::write_toml(&d, RESOURCE_FILE, &c)?;
            Ok(())
        })
        .await??;
        host.store
            .write(set, Vec::new())
            .await
            .map_err(|e| anyhow::anyhow!("cannot record the resource in the metadata: {e}"))?;
        let h = host.start_resource(cfg.clone(), &dir)?;
        if let Err(e) = settled(&h, true).await {
            h.shutdown().await;
            anyhow::bail!("{e}");
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = created {
        // Leave nothing behind: a refused create changes nothing.
        let _ = host.store.write(Vec::new(), keys_written).await;
        let _ = std::fs::remove_dir_all(&dir);
        return Err(failed(format!("cannot create resource {res}: {e:#}")));
    }
    tracing::info!(
        "created resource {res} on {} ({size} bytes)",
        disk.display()
    );
    done(format!(
        "created resource {res} on {} ({}); {me} is primary; NBD: {}",
        disk.display(),
        format_size(size),
        host.ident.nbd_unix_uri(res.as_str())
    ))
}

pub async fn join(host: &Arc<Host>, res: ResourceName, disk: &Path, dry: bool) -> Outcome {
    let _g = host.admin.lock().await;
    if host.ident.cluster_id().is_none() {
        return Err(invalid(
            "this host is not in a cluster: run join-cluster first",
        ));
    }
    if host.get(&res).is_some() {
        return Err((
            ErrorKind::Exists,
            format!("this host is already a member of {res}"),
        ));
    }
    let m = meta(host, &res).await?;
    let Some(size) = m.size else {
        return Err((
            ErrorKind::NotFound,
            format!("resource {res} does not exist in the cluster (try update-cluster first)"),
        ));
    };
    let Some(primary) = m.primary.clone() else {
        return Err(invalid(format!(
            "resource {res} has no designated primary; run `marsadm primary {res}` on one member first"
        )));
    };
    let me = host.ident.host.clone();
    if m.is_member(&me) {
        return Err((
            ErrorKind::Exists,
            format!("the metadata lists this host as a member of {res} already (a leftover? `marsadm leave-resource --force {res}` forgets it)"),
        ));
    }
    check_new(host, &res, disk)?;
    let len = disk_len(disk).map_err(|e| disk_error(disk, e))?;
    if len < size {
        return Err(invalid(format!(
            "disk {} has {} ({len} bytes), less than the size of {res}: {} ({size} bytes)",
            disk.display(),
            format_size(len),
            format_size(size)
        )));
    }
    if dry {
        return done(format!(
            "would make {me} a replica of {res} on {} ({}): directory {}, {me}'s keys of {res}; \
             a full sync from {primary} would OVERWRITE {} ({})",
            disk.display(),
            format_size(len),
            root::resource_dir(&host.ident.root, &res).display(),
            disk.display(),
            format_size(size)
        ));
    }
    let dir = root::resource_dir(&host.ident.root, &res);
    let cfg = ResourceFile {
        name: res.clone(),
        disk: disk.to_path_buf(),
        size,
    };
    let mut set = vec![(keys::data(&res, &me), disk.display().to_string())];
    for sw in SwitchKind::ALL {
        set.push((keys::todo(&res, &me, sw.as_str()), "1".into()));
    }
    let keys_written: Vec<String> = set.iter().map(|(k, _)| k.clone()).collect();
    let joined = async {
        let (d, c) = (dir.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            std::fs::create_dir(&d)?;
            root::write_toml(&d, RESOURCE_FILE, &c)?;
            let rd = mars_storage::real::RealDir::open(&d)?;
            // A new replica: everything must be copied.
            crate::local::replica::persist(
                &rd,
                &mars_engine::resource::Control::Sync(Some(SyncFile::full(size))),
            )?;
            mars_replica::control::set_marker(&rd, mars_replica::Marker::Replica, true)?;
            Ok(())
        })
        .await??;
        host.store
            .write(set, Vec::new())
            .await
            .map_err(|e| anyhow::anyhow!("cannot record the membership: {e}"))?;
        let h = host.start_resource(cfg.clone(), &dir)?;
        if let Err(e) = settled(&h, false).await {
            h.shutdown().await;
            anyhow::bail!("{e}");
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = joined {
        let _ = host.store.write(Vec::new(), keys_written).await;
        let _ = std::fs::remove_dir_all(&dir);
        return Err(failed(format!("cannot join {res}: {e:#}")));
    }
    tracing::info!(
        "joined resource {res} on {}; full sync from {primary}",
        disk.display()
    );
    done(format!(
        "joined {res} on {} ({}); a full sync from {primary} starts (see `marsadm view {res}`)",
        disk.display(),
        format_size(size)
    ))
}

/// Every other resource command (`dry`: `--dry-run`, the engine's guards decide and nothing
/// happens).
pub async fn op(host: &Arc<Host>, req: Request, dry: bool) -> Outcome {
    let (res, op) = match req {
        Request::Primary {
            res,
            force,
            timeout,
            confirmed,
        } => (
            res,
            Op::Primary {
                force,
                timeout: timeout.saturating_mul(1000),
                confirmed,
            },
        ),
        Request::Secondary { res } => (res, Op::Secondary),
        Request::Invalidate { res } => (res, Op::Invalidate),
        Request::LogPurgeAll { res } => (res, Op::LogPurgeAll),
        Request::FakeSync { res } => (res, Op::FakeSync),
        Request::Switch { res, switches, on } => (
            res,
            Op::Switch {
                switches: switches.iter().map(|s| s.as_str().to_string()).collect(),
                on,
            },
        ),
        Request::Resize { res, size } => (res, Op::Resize { size }),
        Request::LeaveResource { res, force } => {
            let _g = host.admin.lock().await;
            return leave(host, res, force, dry).await;
        }
        Request::DeleteResource { res, force } => {
            let _g = host.admin.lock().await;
            return delete(host, res, force, dry).await;
        }
        Request::LogRotate { res } => (res, Op::LogRotate),
        Request::SetEmergencyLimit { res, pct } => (res, Op::SetEmergencyLimit { pct }),
        Request::GetEmergencyLimit { res } => {
            let h = host.get(&res).ok_or_else(|| not_found(&res))?;
            let pct = h
                .snapshot()
                .meta
                .members
                .get(&host.ident.host)
                .and_then(|m| m.emergency_limit)
                .unwrap_or(0);
            return done(pct.to_string());
        }
        Request::Cron => return cron(host, dry).await,
        Request::AskCaughtUp { res } => {
            let h = host.get(&res).ok_or_else(|| not_found(&res))?;
            h.shared.ask_caught_up.notify_one();
            return done(String::new());
        }
        Request::SetSystemdUnit { res, start, stop } => {
            return set_systemd_unit(host, &res, &start, stop.as_deref(), dry).await
        }
        Request::SetSystemdWant { res, want } => {
            return set_systemd_want(host, &res, &want, dry).await
        }
        Request::SystemdTrigger { res } => return systemd_trigger(host, res.as_ref(), dry).await,
        other => return Err(invalid(format!("{other:?} is not a resource command"))),
    };
    let Some(h) = host.get(&res) else {
        if matches!(op, Op::Secondary) {
            // Not set up here, but it exists: nobody is the designated primary any more.
            let m = meta(host, &res).await?;
            if !m.exists() {
                return Err(not_found(&res));
            }
            // As MARS: with a systemd stack the want becomes `(none)` first.
            let mut set = Vec::new();
            if m.systemd.configured() && m.systemd.want_raw.as_deref() != Some(keys::NO_PRIMARY) {
                set.push((keys::systemd_want(&res), keys::NO_PRIMARY.to_string()));
            }
            set.push((keys::primary(&res), keys::NO_PRIMARY.to_string()));
            if dry {
                let what: Vec<String> = set.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                return done(format!("{res}: secondary would set {}", what.join(", ")));
            }
            host.store.write(set, Vec::new()).await.map_err(failed)?;
            return done(format!("{res}: no designated primary now"));
        }
        return Err(super::not_here(host, &res).await);
    };
    let r = h
        .op_or_dry(op, dry)
        .await
        .map_err(|e| failed(e.to_string()))?;
    from_op(r)
}

async fn leave(host: &Arc<Host>, res: ResourceName, force: bool, dry: bool) -> Outcome {
    let me = host.ident.host.clone();
    match host.get(&res) {
        Some(h) => {
            let r = h
                .op_or_dry(Op::LeaveResource { force }, dry)
                .await
                .map_err(|e| failed(e.to_string()))?;
            from_op(r)
        }
        None => {
            // No local state, but the metadata may still list us: forget that with --force.
            let m = meta(host, &res).await?;
            if force && m.is_member(&me) && m.primary.as_ref() != Some(&me) {
                if dry {
                    return done(format!(
                        "would forget this host's leftover membership of {res} (delete its keys)"
                    ));
                }
                delete_own_keys(host, &res).await?;
                return done(format!("forgot this host's leftover membership of {res}"));
            }
            Err(not_found(&res))
        }
    }
}

async fn delete(host: &Arc<Host>, res: ResourceName, force: bool, dry: bool) -> Outcome {
    match host.get(&res) {
        Some(h) => {
            let r = h
                .op_or_dry(Op::DeleteResource { force }, dry)
                .await
                .map_err(|e| failed(e.to_string()))?;
            from_op(r)
        }
        None => {
            let m = meta(host, &res).await?;
            if !m.exists() {
                return Err(not_found(&res));
            }
            let others: Vec<String> = m
                .members
                .keys()
                .filter(|h| **h != host.ident.host)
                .map(ToString::to_string)
                .collect();
            if !others.is_empty() && !force {
                return Err(invalid(format!(
                    "{res} still has other members ({}): they must leave-resource first, or use delete-resource --force",
                    others.join(", ")
                )));
            }
            if dry {
                return done(format!(
                    "would delete {res} cluster-wide: {}, {} and this host's keys of {res}",
                    keys::size(&res),
                    keys::primary(&res)
                ));
            }
            host.store
                .write(
                    Vec::new(),
                    [keys::size(&res), keys::primary(&res)]
                        .into_iter()
                        .chain(m.requests.keys().map(|sw| keys::request(&res, sw)))
                        .collect(),
                )
                .await
                .map_err(failed)?;
            delete_own_keys(host, &res).await?;
            done(format!("deleted {res}"))
        }
    }
}

async fn delete_own_keys(host: &Arc<Host>, res: &ResourceName) -> Result<(), (ErrorKind, String)> {
    let me = host.ident.host.clone();
    let prefix = keys::prefix(res);
    host.store
        .call(move |s| -> Result<(), String> {
            for e in s.list_prefix(&prefix).map_err(|e| e.to_string())? {
                if s.owner_of(&e.key).is_some_and(|o| o == me) {
                    s.delete(&e.key).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(format!("cannot delete this host's keys: {e}")))
}

/// `cron`: every resource rotates where this host is primary and the log has data.
async fn cron(host: &Arc<Host>, dry: bool) -> Outcome {
    let mut lines = Vec::new();
    for h in host.all() {
        if let Ok(Ok(line)) = h.op_or_dry(Op::Cron, dry).await {
            if !line.is_empty() {
                lines.push(line);
            }
        }
    }
    done(if lines.is_empty() {
        "nothing to do".to_string()
    } else {
        lines.join("\n")
    })
}

/// `set-systemd-unit RES START [STOP]` (see `mars_api::Request::SetSystemdUnit`).
async fn set_systemd_unit(
    host: &Arc<Host>,
    res: &ResourceName,
    start: &str,
    stop: Option<&str>,
    dry: bool,
) -> Outcome {
    let m = meta(host, res).await?;
    if !m.exists() {
        return Err(not_found(res));
    }
    let (k_start, k_stop, k_want) = (
        keys::systemd_start_unit(res),
        keys::systemd_stop_unit(res),
        keys::systemd_want(res),
    );
    if start.is_empty() {
        if dry {
            return done(format!(
                "{res}: would delete {k_start}, {k_stop} and {k_want} (its generated units \
                 would be stopped and removed)"
            ));
        }
        host.store
            .write(Vec::new(), vec![k_start, k_stop, k_want])
            .await
            .map_err(|e| failed(format!("cannot delete the systemd keys: {e}")))?;
        return done(format!(
            "{res}: no systemd stack any more (its generated units are stopped and removed)"
        ));
    }
    for u in [Some(start), stop].into_iter().flatten() {
        if u.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(invalid(format!("{u:?} is not a unit name")));
        }
    }
    let sd = host.systemd.clone();
    let (r, s, st) = (res.to_string(), start.to_string(), stop.map(str::to_string));
    let choice = tokio::task::spawn_blocking(move || {
        let templates = ufs::load_templates(&sd.settings.search_path)
            .map_err(|e| failed(format!("cannot load the systemd templates: {e}")))?;
        let config = GenConfig::default();
        let vars = sd.vars_for(&mars_unitgen::RunOptions {
            cmd: "set-systemd-unit".into(),
            ..Default::default()
        });
        let generator = Generator::new(&templates, &config, vars, vec![r.clone()])
            .with_view(std::sync::Arc::new(sd.state_view()));
        generator
            .choose_units(&r, &s, st.as_deref())
            .map_err(|e| invalid(format!("set-systemd-unit {r}: {e}")))
    })
    .await
    .map_err(|e| failed(e.to_string()))??;
    // What the markers chose is checked as `marsd` checks it before running it.
    for u in [&choice.start, &choice.stop] {
        mars_unitgen::check_unit_name(u)
            .map_err(|e| invalid(format!("set-systemd-unit {res}: {e}")))?;
    }
    let want = m
        .primary
        .as_ref()
        .map_or(keys::NO_PRIMARY.to_string(), ToString::to_string);
    if dry {
        return done(format!(
            "{res}: would set start unit {}, stop unit {}, wanted on {want}",
            choice.start, choice.stop
        ));
    }
    host.store
        .write(
            vec![
                (k_start, choice.start.clone()),
                (k_stop, choice.stop.clone()),
                (k_want, want.clone()),
            ],
            Vec::new(),
        )
        .await
        .map_err(|e| failed(format!("cannot write metadata: {e}")))?;
    done(format!(
        "{res}: start unit {}, stop unit {}, wanted on {want}",
        choice.start, choice.stop
    ))
}

/// `set-systemd-want RES HOST|(none)`.
async fn set_systemd_want(host: &Arc<Host>, res: &ResourceName, want: &str, dry: bool) -> Outcome {
    let m = meta(host, res).await?;
    if !m.exists() {
        return Err(not_found(res));
    }
    if !m.systemd.configured() {
        return Err(invalid(format!(
            "{res} has no systemd stack: run `marsadm set-systemd-unit {res} START [STOP]` first"
        )));
    }
    if want != keys::NO_PRIMARY {
        let ok = mars_config::HostName::new(want)
            .ok()
            .is_some_and(|h| m.is_member(&h));
        if !ok {
            return Err(invalid(format!(
                "{want:?} is not a member of {res}; give a member or (none)"
            )));
        }
    }
    if dry {
        return done(format!(
            "{res}: would set {} = {want} (the stack would run there)",
            keys::systemd_want(res)
        ));
    }
    host.store
        .write(
            vec![(keys::systemd_want(res), want.to_string())],
            Vec::new(),
        )
        .await
        .map_err(|e| failed(format!("cannot write metadata: {e}")))?;
    done(format!("{res}: the systemd stack is wanted on {want}"))
}

/// `systemd-trigger [RES]`: regenerate now and run the want operations again.
async fn systemd_trigger(host: &Arc<Host>, res: Option<&ResourceName>, dry: bool) -> Outcome {
    let targets: Vec<Handle> = match res {
        Some(r) => vec![host.get(r).ok_or_else(|| not_found(r))?],
        None => host.all(),
    };
    let sd = host.systemd.clone();
    if dry {
        // The same generation, in memory: the templates are checked, nothing is written.
        let units = tokio::task::spawn_blocking(move || sd.preview())
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(format!("systemd-trigger: {e}")))?;
        let names: Vec<String> = targets.iter().map(|h| h.name.to_string()).collect();
        return done(format!(
            "would generate {} unit(s){}, reload systemd if any changed, and run the want \
             operations of {} again",
            units.len(),
            if units.is_empty() {
                String::new()
            } else {
                format!(" ({})", units.join(" "))
            },
            if names.is_empty() {
                "(no resource)".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    // The watcher that ran us has its trigger: the file goes first, so that MARS's
    // `PathExists=` watchers do not start us again at once (see `MarsTree::consume`).
    sd.consume_trigger(res.map(ResourceName::as_str));
    let g = tokio::task::spawn_blocking(move || sd.regenerate_as("systemd-trigger"))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(format!("systemd-trigger: {e}")))?;
    for h in targets {
        let _ = h.op(Op::SystemdTrigger).await;
    }
    let mut message = format!(
        "generated {} unit(s), {} changed{}",
        g.changed.len() + g.unchanged,
        g.changed.len(),
        if g.removed.is_empty() {
            String::new()
        } else {
            format!(", removed {}", g.removed.join(" "))
        }
    );
    if !g.warnings.is_empty() {
        message += &format!("; template warnings: {}", g.warnings.join("; "));
    }
    if let Some(r) = res {
        message += &format!("; want operations of {r} run again");
    } else {
        message += "; want operations of every resource run again";
    }
    done(message)
}
