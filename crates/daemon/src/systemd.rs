//! The systemd interface: generating units from templates and starting or stopping each
//! resource's stack where the metadata wants it (mars.md §4.3–4.5, DESIGN §2.5).
//!
//! MARS triggers this through path units watching files the kernel touches; here the reconcile
//! loop calls [`tick`] once per resource and round. It asks `mars_engine::want_op` what this
//! host should do (start the start unit where want == primary == me and the device is present,
//! stop the stop unit everywhere else) and runs the operation on a thread of its own:
//!
//! - **serialised**: at most one operation per resource at a time (the next round sees it busy);
//! - **idempotent**: an operation runs again only when its inputs change — the op, the unit, or
//!   the Lamport stamp of the `systemd-want` entry (so every write of the want, even of the same
//!   value, re-runs it, as a MARS trigger does) — or on `systemd-trigger`;
//! - **retried**: a failed operation is repeated with exponential backoff ([`BACKOFF_MIN`] …
//!   [`BACKOFF_MAX`]) while it is still wanted.
//!
//! Every operation first regenerates the units of all local resources (written only when the
//! content changed; `daemon-reload` only then; generated files nobody produces any more are
//! stopped unless `KEEP_RUNNING`, and removed), then runs `systemctl` as MARS does: `reset-failed`,
//! then `start`/`stop` with `--job-mode=fail` up to [`JOB_MODE_FAIL_TRIES`] times with linear
//! backoff, then once in the normal job mode. A `.script` pseudo-unit is run as `SCRIPT start` or
//! `SCRIPT stop`. The result goes to the replicated key `systemd-status-HOST`
//! ([`mars_engine::UnitStatus`]), which a planned handover on another host waits for
//! (`roles.rs`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mars_api::{ErrorKind, Reply};
use mars_config::ResourceName;
use mars_engine::{keys, ResourceMeta, UnitOp, UnitStatus};
use mars_unitgen::{fs as ufs, Config as GenConfig, Generator, Vars, WantedUnit};

use crate::resource::Resource;
use crate::state::{invalid, not_found, Daemon, Outcome, Refusal};

/// First retry of a failed operation after this long, doubling up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// MARS: `start`/`stop` with `--job-mode=fail` five times before the normal job mode, so that a
/// job already queued for the unit is not replaced by ours.
const JOB_MODE_FAIL_TRIES: u32 = 5;
const JOB_MODE_FAIL_STEP: Duration = Duration::from_millis(200);
/// `systemctl` says "unit not loaded" with this exit status (LSB "program is not installed").
const NOT_LOADED: i32 = 5;

/// Where templates come from and where units go (marsd's `--systemd-*` flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Template search path (MARS `@MARS_PATH`).
    pub search_path: Vec<PathBuf>,
    pub unit_dir: PathBuf,
    pub scripts_dir: PathBuf,
    /// The `systemctl` to run (a wrapper in tests).
    pub systemctl: PathBuf,
    /// Unit names found in these directories are never generated (except in our own output
    /// directories).
    pub system_unit_dirs: Vec<PathBuf>,
    /// One `systemctl` call or script may take this long before it is killed.
    pub timeout: Duration,
}

impl Settings {
    /// MARS's defaults: `$MARS_PATH` or `.`, `~/.marsadm`, `/etc/marsadm`, …; units to
    /// `/run/systemd/system`, scripts to `/etc/marsadm/systemd-generated-scripts`.
    pub fn mars_defaults() -> Settings {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Settings {
            search_path: ufs::search_path(
                std::env::var("MARS_PATH").ok().as_deref(),
                home.as_deref(),
                Path::new("/etc/marsadm"),
            ),
            unit_dir: mars_unitgen::generate::DEFAULT_UNIT_DIR.into(),
            scripts_dir: mars_unitgen::generate::DEFAULT_SCRIPTS_DIR.into(),
            systemctl: "systemctl".into(),
            system_unit_dirs: ufs::SYSTEM_UNIT_DIRS.iter().map(PathBuf::from).collect(),
            timeout: Duration::from_secs(300),
        }
    }
}

/// Why generating or running a unit failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(transparent)]
    Fs(#[from] ufs::FsError),
    #[error(transparent)]
    Template(#[from] mars_unitgen::TemplateError),
    #[error(transparent)]
    Choice(#[from] mars_unitgen::Error),
    #[error("cannot run {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} timed out after {secs}s and was killed")]
    Timeout { cmd: String, secs: u64 },
    #[error("{cmd} was killed by a signal")]
    Killed { cmd: String },
}

/// The identity of an operation: done once, repeated only when one of these changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OpKey {
    op: UnitOp,
    unit: String,
    want: Option<String>,
    want_stamp: u64,
}

/// What this host remembers about one resource's stack.
#[derive(Debug, Default)]
struct ResState {
    /// An operation (or regeneration) is running.
    busy: bool,
    /// The last operation that succeeded.
    done: Option<OpKey>,
    /// The last failed operation, how often it failed in a row, and when to try again.
    failed: Option<(OpKey, u32, Instant)>,
    /// `systemd-trigger`: run the wanted operation again even if it was done.
    forced: bool,
    /// The (start, stop) units the last regeneration saw; a change regenerates.
    units: Option<(Option<String>, Option<String>)>,
}

/// The daemon's systemd state.
pub struct Systemd {
    pub settings: Settings,
    resources: Mutex<HashMap<ResourceName, ResState>>,
    /// Serialises regeneration (it covers every resource, so two at once would race on files).
    generating: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Systemd {
    pub fn new(settings: Settings) -> Systemd {
        Systemd {
            settings,
            resources: Mutex::default(),
            generating: Mutex::default(),
        }
    }

    /// `systemd-trigger`: run the want operations of `res` (or of every resource) again.
    fn force(&self, res: Option<&ResourceName>, all: &[ResourceName]) {
        let mut map = lock(&self.resources);
        for r in all.iter().filter(|r| res.is_none_or(|x| x == *r)) {
            map.entry(r.clone()).or_default().forced = true;
        }
    }
}

/// One round for one resource (called by the reconcile loop): decides what this host should do
/// about the stack and starts it in the background unless it is done, running, or waiting for
/// its retry. `device_present`: the resource's device is served here (for now: this host acts
/// as primary; `/dev/mars/RES` once the block-device frontend is wired).
pub fn tick(d: &Arc<Daemon>, r: &Resource, meta: &ResourceMeta, device_present: bool) {
    let res = r.cfg.name.clone();
    let units = (
        meta.systemd.start_unit.clone(),
        meta.systemd.stop_unit.clone(),
    );
    let wanted = mars_engine::want_op(
        &meta.systemd,
        &d.host,
        meta.primary.as_ref(),
        device_present,
    )
    .map(|(op, unit)| OpKey {
        op,
        unit,
        want: meta.systemd.want_raw.clone(),
        want_stamp: want_stamp(d, &res),
    });
    let job = {
        let mut map = lock(&d.systemd.resources);
        let st = map.entry(res.clone()).or_default();
        if st.busy {
            return;
        }
        // Units appeared, changed or went away: regenerate (removing what is no longer wanted).
        let regenerate = st.units.as_ref() != Some(&units)
            && (units.0.is_some() || st.units.as_ref().is_some_and(|u| u.0.is_some()));
        let op = wanted.filter(|k| {
            let waiting = st
                .failed
                .as_ref()
                .is_some_and(|(f, _, at)| f == k && Instant::now() < *at);
            st.forced || (st.done.as_ref() != Some(k) && !waiting)
        });
        st.units = Some(units);
        if op.is_none() && !regenerate {
            st.forced = false;
            return;
        }
        st.forced = false;
        st.busy = true;
        op
    };
    let spawned = std::thread::Builder::new()
        .name(format!("systemd-{res}"))
        .spawn({
            let (d, res) = (d.clone(), res.clone());
            move || run_job(&d, &res, job)
        });
    if let Err(e) = spawned {
        tracing::error!("{res}: cannot start a systemd job: {e}");
        if let Some(st) = lock(&d.systemd.resources).get_mut(&res) {
            st.busy = false;
        }
    }
}

/// The Lamport stamp of the resource's `systemd-want` entry (0 when there is none).
fn want_stamp(d: &Daemon, res: &ResourceName) -> u64 {
    d.cluster
        .store()
        .get(&keys::systemd_want(res))
        .ok()
        .flatten()
        .filter(|e| !e.is_tombstone())
        .map_or(0, |e| e.stamp)
}

fn run_job(d: &Arc<Daemon>, res: &ResourceName, op: Option<OpKey>) {
    if let Err(e) = regenerate(d) {
        // The units from the last good generation (or real unit files) may still do.
        tracing::error!("systemd: cannot generate units: {e}");
    }
    let Some(key) = op else {
        if let Some(st) = lock(&d.systemd.resources).get_mut(res) {
            st.busy = false;
        }
        return;
    };
    tracing::info!(
        "{res}: systemd {} {} (want {})",
        key.op.as_str(),
        key.unit,
        key.want.as_deref().unwrap_or("unset")
    );
    let (code, error) = match perform(&d.systemd.settings, key.op, &key.unit) {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e.to_string())),
    };
    // Stopping a unit systemd does not know: nothing of it runs, which is what stop means.
    let (code, error) = match (key.op, code) {
        (UnitOp::Stop, Some(NOT_LOADED)) if !key.unit.ends_with(".script") => (
            Some(0),
            Some("unit not loaded: nothing to stop".to_string()),
        ),
        _ => (code, error),
    };
    let status = UnitStatus {
        op: key.op,
        unit: key.unit.clone(),
        code,
        time_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_millis() as u64),
        want: key.want.clone(),
        want_stamp: key.want_stamp,
        error,
    };
    if status.ok() {
        tracing::info!("{res}: systemd {}", status.summary());
    } else {
        tracing::warn!("{res}: systemd {}", status.summary());
    }
    let status_key = keys::systemd_status(res, &d.host);
    if let Err(e) = d.cluster.store().set(&status_key, &status.to_json()) {
        tracing::warn!("{res}: cannot publish {status_key}: {e}");
    }
    d.cluster.poke.notify_waiters();
    let mut map = lock(&d.systemd.resources);
    let st = map.entry(res.clone()).or_default();
    st.busy = false;
    if status.ok() {
        st.done = Some(key);
        st.failed = None;
    } else {
        st.done = None;
        let n = match &st.failed {
            Some((k, n, _)) if *k == key => n + 1,
            _ => 1,
        };
        let backoff = BACKOFF_MIN
            .saturating_mul(1 << (n - 1).min(10))
            .min(BACKOFF_MAX);
        st.failed = Some((key, n, Instant::now() + backoff));
    }
}

/// Runs one start or stop (see the module docs); `Ok(exit status)`.
fn perform(s: &Settings, op: UnitOp, unit: &str) -> Result<i32, SystemdError> {
    if unit.ends_with(".script") {
        let path = s.scripts_dir.join(unit);
        return run(Command::new(&path).arg(op.as_str()), s.timeout);
    }
    // A unit left failed by an earlier attempt refuses to start until reset.
    let _ = run(
        Command::new(&s.systemctl).args(["reset-failed", unit]),
        s.timeout,
    );
    for attempt in 1..=JOB_MODE_FAIL_TRIES {
        let code = run(
            Command::new(&s.systemctl).args(["--job-mode=fail", op.as_str(), unit]),
            s.timeout,
        )?;
        if code == 0 {
            return Ok(0);
        }
        std::thread::sleep(JOB_MODE_FAIL_STEP * attempt);
    }
    run(
        Command::new(&s.systemctl).args([op.as_str(), unit]),
        s.timeout,
    )
}

/// Runs `cmd` in a process group of its own, killing the group after `timeout`. Output goes to
/// marsd's log (stderr), so it lands in the journal next to ours.
fn run(cmd: &mut Command, timeout: Duration) -> Result<i32, SystemdError> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let name = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|source| SystemdError::Spawn {
            cmd: name.clone(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                return match st.code() {
                    Some(c) => Ok(c),
                    None => Err(SystemdError::Killed {
                        cmd: format!("{name} (signal {})", st.signal().unwrap_or(0)),
                    }),
                }
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let pg = child.id() as i32;
                // SAFETY: kill(2) on the process group we created for this child.
                unsafe { libc::kill(-pg, libc::SIGTERM) };
                let grace = Instant::now() + Duration::from_secs(5);
                while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // SAFETY: as above.
                unsafe { libc::kill(-pg, libc::SIGKILL) };
                let _ = child.wait();
                return Err(SystemdError::Timeout {
                    cmd: name,
                    secs: timeout.as_secs(),
                });
            }
        }
    }
}

/// What one regeneration did.
#[derive(Debug, Default)]
pub struct Regenerated {
    pub changed: Vec<String>,
    pub unchanged: usize,
    pub removed: Vec<String>,
    pub warnings: Vec<String>,
}

/// The variables templates see besides `res` and `resdir` (`mars_unitgen::host_vars`): `mars`
/// is the root directory, which holds `resource-RES/` as `/mars` does in MARS; `ip` is the
/// address peers reach this host at, without the port.
pub fn host_vars(host: &str, root: &Path, advertised: &str) -> Vars {
    let ip = advertised
        .rsplit_once(':')
        .map_or(advertised, |(ip, _)| ip)
        .trim_start_matches('[')
        .trim_end_matches(']');
    mars_unitgen::host_vars(host, &root.display().to_string(), ip)
}

/// Regenerates the units of every local resource with a configured stack (plus the plain
/// templates and everything they reference), removes generated files no longer produced, and
/// reloads systemd if anything changed.
pub fn regenerate(d: &Daemon) -> Result<Regenerated, SystemdError> {
    let _g = lock(&d.systemd.generating);
    let s = &d.systemd.settings;
    let templates = ufs::load_templates(&s.search_path)?;
    let own_dirs = [s.unit_dir.clone(), s.scripts_dir.clone()];
    let config = GenConfig {
        unit_dir: s.unit_dir.display().to_string(),
        scripts_dir: s.scripts_dir.display().to_string(),
        existing_units: ufs::existing_unit_names(&s.system_unit_dirs, &own_dirs)?,
        ..GenConfig::default()
    };
    let mut resources = Vec::new();
    let mut wanted = Vec::new();
    for r in d.all() {
        let meta = d.meta(&r.cfg.name);
        let name = r.cfg.name.to_string();
        if let Some(start) = &meta.systemd.start_unit {
            for unit in [Some(start.as_str()), meta.systemd.stop()]
                .into_iter()
                .flatten()
            {
                wanted.push(WantedUnit {
                    res: name.clone(),
                    unit: unit.to_string(),
                });
            }
        }
        resources.push(name);
    }
    {
        // Forget resources this host no longer has.
        let known: BTreeSet<&str> = resources.iter().map(String::as_str).collect();
        lock(&d.systemd.resources).retain(|r, _| known.contains(r.as_str()));
    }
    let vars = host_vars(d.host.as_str(), &d.root, &d.advertised());
    let generator = Generator::new(&templates, &config, vars, resources);
    let generation = generator.generate(&wanted)?;
    let report = ufs::write_generated(&generation.files)?;
    let keep: BTreeSet<String> = generation.files.iter().map(|f| f.name.clone()).collect();
    let mut removed = Vec::new();
    for dir in &own_dirs {
        for stale in ufs::stale_instances(dir, &keep)? {
            if !stale.markers.keep_running {
                let r = perform(s, UnitOp::Stop, &stale.name);
                if !matches!(r, Ok(0) | Ok(NOT_LOADED)) {
                    tracing::warn!("systemd: stopping the removed unit {}: {r:?}", stale.name);
                }
            }
            if let Err(e) = std::fs::remove_file(&stale.path) {
                tracing::warn!("systemd: cannot remove {}: {e}", stale.path.display());
            } else {
                removed.push(stale.name);
            }
        }
    }
    if report.any_changed() || !removed.is_empty() {
        tracing::info!(
            "systemd: changed [{}], removed [{}]: daemon-reload",
            report.changed.join(" "),
            removed.join(" ")
        );
        let code = run(Command::new(&s.systemctl).arg("daemon-reload"), s.timeout)?;
        if code != 0 {
            tracing::warn!("systemd: daemon-reload exited with {code}");
        }
        // MARS starts ALWAYS_START units on every commit (path watchers and the like).
        for f in generation.files.iter().filter(|f| f.markers.always_start) {
            let r = perform(s, UnitOp::Start, &f.name);
            if !matches!(r, Ok(0)) {
                tracing::warn!("systemd: starting ALWAYS_START unit {}: {r:?}", f.name);
            }
        }
    }
    for w in &generation.warnings {
        tracing::warn!("systemd templates: {w}");
    }
    for u in &generation.unresolved {
        tracing::debug!("systemd templates: no template or unit provides {u}");
    }
    Ok(Regenerated {
        changed: report.changed,
        unchanged: report.unchanged.len(),
        removed,
        warnings: generation.warnings,
    })
}

fn failed(msg: impl Into<String>) -> Refusal {
    Refusal(ErrorKind::Failed, msg.into())
}

impl Daemon {
    /// `set-systemd-unit RES START [STOP]` (see `mars_api::Request::SetSystemdUnit`).
    pub(crate) fn set_systemd_unit(
        &self,
        res: &ResourceName,
        start: &str,
        stop: Option<&str>,
    ) -> Outcome {
        let meta = self.meta(res);
        if !meta.exists() {
            return Err(not_found(res));
        }
        let (k_start, k_stop, k_want) = (
            keys::systemd_start_unit(res),
            keys::systemd_stop_unit(res),
            keys::systemd_want(res),
        );
        if start.is_empty() {
            let mut store = self.cluster.store();
            for k in [&k_start, &k_stop, &k_want] {
                if store.value(k).ok().flatten().is_some() {
                    store
                        .delete(k)
                        .map_err(|e| failed(format!("cannot delete {k}: {e}")))?;
                }
            }
            drop(store);
            self.cluster.poke.notify_waiters();
            self.reconcile_now.notify_one();
            return Ok(Reply::Done {
                message: format!(
                    "{res}: no systemd stack any more (its generated units are stopped and removed)"
                ),
            });
        }
        for u in [Some(start), stop].into_iter().flatten() {
            if u.chars().any(|c| c.is_whitespace() || c == '/') {
                return Err(invalid(format!("{u:?} is not a unit name")));
            }
        }
        let s = &self.systemd.settings;
        let templates = ufs::load_templates(&s.search_path)
            .map_err(|e| failed(format!("cannot load the systemd templates: {e}")))?;
        let config = GenConfig::default();
        let vars = host_vars(self.host.as_str(), &self.root, &self.advertised());
        let generator = Generator::new(&templates, &config, vars, vec![res.to_string()]);
        let choice = generator
            .choose_units(res.as_str(), start, stop)
            .map_err(|e| invalid(format!("set-systemd-unit {res}: {e}")))?;
        let want = meta
            .primary
            .as_ref()
            .map_or(keys::NO_PRIMARY.to_string(), ToString::to_string);
        self.set_keys(&[
            (k_start, choice.start.clone()),
            (k_stop, choice.stop.clone()),
            (k_want, want.clone()),
        ])?;
        Ok(Reply::Done {
            message: format!(
                "{res}: start unit {}, stop unit {}, wanted on {want}",
                choice.start, choice.stop
            ),
        })
    }

    /// `set-systemd-want RES HOST|(none)`.
    pub(crate) fn set_systemd_want(&self, res: &ResourceName, want: &str) -> Outcome {
        let meta = self.meta(res);
        if !meta.exists() {
            return Err(not_found(res));
        }
        if !meta.systemd.configured() {
            return Err(invalid(format!(
                "{res} has no systemd stack: run `marsadm set-systemd-unit {res} START [STOP]` first"
            )));
        }
        if want != keys::NO_PRIMARY {
            let ok = mars_config::HostName::new(want)
                .ok()
                .is_some_and(|h| meta.is_member(&h));
            if !ok {
                return Err(invalid(format!(
                    "{want:?} is not a member of {res}; give a member or (none)"
                )));
            }
        }
        self.set_keys(&[(keys::systemd_want(res), want.to_string())])?;
        Ok(Reply::Done {
            message: format!("{res}: the systemd stack is wanted on {want}"),
        })
    }

    /// `systemd-trigger [RES]`: regenerate now and run the want operations again.
    pub(crate) fn systemd_trigger(&self, res: Option<&ResourceName>) -> Outcome {
        if let Some(r) = res {
            if self.resource(r).is_none() {
                return Err(not_found(r));
            }
        }
        let g = regenerate(self).map_err(|e| failed(format!("systemd-trigger: {e}")))?;
        let names: Vec<ResourceName> = self.all().iter().map(|r| r.cfg.name.clone()).collect();
        self.systemd.force(res, &names);
        self.reconcile_now.notify_one();
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
        Ok(Reply::Done { message })
    }
}
