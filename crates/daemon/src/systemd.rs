//! Running a resource's systemd stack: generating units from MARS-style templates and starting
//! or stopping units, as the engine's `RunUnit` jobs ask (the decision which operation, and when
//! to retry, is `mars_engine`'s: `resource/units.rs`).
//!
//! A job first regenerates the units of every local resource (written only when the content
//! changed; `daemon-reload` only then; generated files nobody produces any more are stopped
//! unless `KEEP_RUNNING`, and removed), then makes one try of the operation as MARS does:
//! `reset-failed`, then `start`/`stop`, with `--job-mode=fail` for the first
//! [`JOB_MODE_FAIL_TRIES`] tries and in the normal job mode for the last. The engine counts the
//! tries, waits between them and gives up after [`mars_engine::systemd::UNIT_TRIES`] (MARS's
//! numbers; a unit systemd does not know, exit 5, at once: MARS checks that with
//! `systemctl cat` first and reports 0; we report the failure). A `.script` pseudo-unit is run
//! once as `SCRIPT start` or `SCRIPT stop`. The result is published by the engine as
//! `systemd-status-HOST`, which a planned handover on another host waits for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mars_engine::resource::UnitJob;
use mars_engine::{SystemdMeta, UnitOp, UnitStatus};
use mars_unitgen::generate::DEFAULT_WATCHER_UNITS;
use mars_unitgen::{fs as ufs, Config as GenConfig, Generator, Vars, WantedUnit};

use crate::identity::Identity;
use crate::mars_tree::{MarsTree, ResourceState, TreeState};

use mars_engine::systemd::JOB_MODE_FAIL_TRIES;
/// Between the tries of a start or stop made inside a regeneration (new `ALWAYS_START` units,
/// removed units), which blocks the resource's job: shorter than MARS's 1 s steps.
const INLINE_STEP: Duration = Duration::from_millis(200);
/// `systemctl` says "Unit … not found" with this exit status (LSB "program is not installed":
/// systemd's `BUS_ERROR_NO_SUCH_UNIT`; a unit file that fails to load is 6).
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
    /// Where the MARS-compatible `/mars` tree goes (`systemd.mars_tree`; `None`: none).
    pub mars_tree: Option<PathBuf>,
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
            mars_tree: None,
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
    /// The name came from metadata another host may have written: it is refused before it
    /// reaches `systemctl` or the scripts directory.
    #[error("refused to run: {0}")]
    BadName(#[from] mars_unitgen::BadUnitName),
}

/// A local resource as the systemd side sees it (from the engine's state).
#[derive(Debug, Clone)]
pub struct LocalStack {
    pub name: String,
    pub systemd: SystemdMeta,
    /// The designated primary.
    pub primary: Option<String>,
    /// This host's primary of it is in emergency mode.
    pub emergency: bool,
    /// Who acts as primary (`%is-primary{}` in templates).
    pub roles: mars_unitgen::Roles,
    /// This host's sync, fetch and replay (the amount macros in templates).
    pub amounts: mars_unitgen::Amounts,
}

/// Lists the local resources and their stacks.
pub type ResourceList = Box<dyn Fn() -> Vec<LocalStack> + Send + Sync>;

/// How often the MARS tree is compared with the engine's state (an in-memory comparison; the
/// disk is written only on a change).
const TREE_PERIOD: Duration = Duration::from_millis(200);

/// The daemon's systemd side: settings, and the local resources' stacks it generates units for.
pub struct Systemd {
    pub settings: Settings,
    ident: Arc<Identity>,
    /// Serialises regeneration (it covers every resource, so two at once would race on files).
    generating: Mutex<()>,
    /// The local resources and their stacks (set by the host registry once it exists).
    resources: OnceLock<ResourceList>,
    /// The MARS-compatible tree, once [`Self::open_tree`] took its directory.
    tree: Mutex<Option<MarsTree>>,
    /// Per resource with a start or stop running: the want (raw value, Lamport stamp) that
    /// operation runs for. The tree's want link shows it until the operation ends (see
    /// [`Self::run_job`]).
    pinned: Mutex<BTreeMap<String, (Option<String>, u64)>>,
}

/// Unpins a resource's want link when its operation ends, however it ends.
struct Pin<'a> {
    sd: &'a Systemd,
    res: &'a str,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        lock(&self.sd.pinned).remove(self.res);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Systemd {
    pub fn new(settings: Settings, ident: Arc<Identity>) -> Systemd {
        Systemd {
            settings,
            ident,
            generating: Mutex::new(()),
            resources: OnceLock::new(),
            tree: Mutex::new(None),
            pinned: Mutex::new(BTreeMap::new()),
        }
    }

    /// Takes the configured tree's directory (refusing one that holds something not ours).
    /// Called at start-up, before the resources run: a refusal stops marsd.
    pub fn open_tree(&self) -> Result<(), crate::mars_tree::TreeError> {
        if let Some(p) = &self.settings.mars_tree {
            *lock(&self.tree) = Some(MarsTree::open(p)?);
        }
        Ok(())
    }

    /// Brings the MARS tree to the engine's current state (nothing without a tree).
    pub fn sync_tree(&self) {
        let mut guard = lock(&self.tree);
        let Some(tree) = guard.as_mut() else {
            return;
        };
        let mut state = TreeState {
            uuid: self.ident.cluster().map(|c| c.uuid),
            ..TreeState::default()
        };
        let pinned = lock(&self.pinned).clone();
        for r in self.resources.get().map(|f| f()).unwrap_or_default() {
            let (want, want_stamp) = pinned
                .get(&r.name)
                .cloned()
                .unwrap_or((r.systemd.want_raw.clone(), r.systemd.want_stamp));
            state.resources.insert(
                r.name,
                ResourceState {
                    want,
                    want_stamp,
                    primary: r.primary,
                    units: (r.systemd.start_unit.clone(), r.systemd.stop_unit.clone()),
                    emergency: r.emergency,
                },
            );
        }
        match tree.apply(&state) {
            Ok(done) if !done.is_empty() => tracing::info!(
                "mars tree {}: links {:?}, triggers {:?}, removed {:?}",
                tree.path().display(),
                done.links,
                done.triggers,
                done.removed
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("mars tree: {e}"),
        }
    }

    /// Keeps the MARS tree in step with the engine's state on a thread of its own, for as long
    /// as the process runs (nothing without a tree).
    pub fn spawn_tree(self: &Arc<Self>) {
        if lock(&self.tree).is_none() {
            return;
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("mars-tree".into())
            .spawn(move || {
                // MARS's global trigger at start: the plain templates and every resource's
                // watcher units exist (and the new ones run) before any stack is configured.
                if let Some(sd) = me.upgrade() {
                    // The tree first: the watchers started below find their paths.
                    sd.sync_tree();
                    if let Err(e) = sd.regenerate() {
                        tracing::warn!("systemd: cannot generate units: {e}");
                    }
                }
                while let Some(sd) = me.upgrade() {
                    sd.sync_tree();
                    drop(sd);
                    std::thread::sleep(TREE_PERIOD);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("mars tree: cannot start its thread: {e}");
        }
    }

    /// `systemd-trigger[-extern] [RES]` takes the trigger: its file in the MARS tree goes
    /// ([`MarsTree::consume`]; nothing without a tree). Called before the regeneration and the
    /// want operations, so a change after this point writes the file again.
    pub fn consume_trigger(&self, res: Option<&str>) {
        if let Some(tree) = lock(&self.tree).as_mut() {
            match tree.consume(res) {
                Ok(_) => {}
                Err(e) => tracing::warn!("mars tree: {e}"),
            }
        }
    }

    /// Where the list of local resources comes from.
    pub fn set_resources(&self, f: ResourceList) {
        let _ = self.resources.set(f);
    }

    /// Runs one job of `res` (blocking): regenerate if asked, then the operation. Returns the
    /// operation's result.
    ///
    /// With a MARS tree, the resource's want link shows the want the operation runs for from
    /// before it starts until it ends: MARS's icpu `nodeagent-RES.script` compares the link's
    /// mtime with the copy it made after its last success and copies the link again after this
    /// one, so the link must not be behind the operation (the script would take it for done:
    /// "Unmodified timestamp") nor move during it (the copy would record a want this run did
    /// not act on, and the operation for that want would be skipped). A want that changes
    /// meanwhile reaches the link, with its trigger, when the operation is over; the engine's
    /// next operation runs for it.
    pub fn run_job(&self, res: &str, job: &UnitJob) -> Option<UnitStatus> {
        let _pin = job.op.as_ref().map(|key| {
            lock(&self.pinned).insert(res.to_string(), (key.want.clone(), key.want_stamp));
            self.sync_tree();
            Pin { sd: self, res }
        });
        // A retry does not regenerate again (the first try of the operation did).
        if job.regenerate || (job.op.is_some() && job.attempt <= 1) {
            if let Err(e) = self.regenerate() {
                // The units from the last good generation (or real unit files) may still do.
                tracing::error!("systemd: cannot generate units: {e}");
            }
        }
        let key = job.op.as_ref()?;
        tracing::info!(
            "{res}: systemd {} {} (want {}, try {})",
            key.op.as_str(),
            key.unit,
            key.want.as_deref().unwrap_or("unset"),
            job.attempt
        );
        let fail_mode = job.attempt <= JOB_MODE_FAIL_TRIES;
        let (code, error) = match perform_once(&self.settings, key.op, &key.unit, fail_mode) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let script = key.unit.ends_with(".script");
        // Stopping a unit systemd does not know: nothing of it runs, which is what stop means.
        let (code, error) = match (key.op, code) {
            (UnitOp::Stop, Some(NOT_LOADED)) if !script => (
                Some(0),
                Some("unit not loaded: nothing to stop".to_string()),
            ),
            _ => (code, error),
        };
        // Starting one: reported, and not retried by the engine (see `UnitStatus::unknown_unit`).
        let unknown_unit = key.op == UnitOp::Start && code == Some(NOT_LOADED) && !script;
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
            unknown_unit,
            // The engine fills in which try it was and whether it gives up.
            tries: 0,
            gave_up: false,
        };
        if status.ok() {
            tracing::info!("{res}: systemd {}", status.summary());
        } else {
            tracing::warn!("{res}: systemd {}", status.summary());
        }
        Some(status)
    }

    /// The variables templates see on this host when `opts.cmd` generates (MARS's `make_env`).
    pub fn vars_for(&self, opts: &mars_unitgen::RunOptions) -> Vars {
        host_vars(
            self.ident.host.as_str(),
            self.settings
                .mars_tree
                .as_deref()
                .unwrap_or(&self.ident.root),
            &self.ident.advertised(),
            opts,
        )
    }

    /// What MARS's view primitives in templates (`%get-primary{}`, `%todo-primary{}`,
    /// `%is-member{}`, `%uuid{}`, `%is-primary{}`, the amounts and rates …) see: this host's
    /// resources as the engine holds them, at generation time.
    pub fn state_view(&self) -> mars_unitgen::StateView {
        let mut view = mars_unitgen::StateView {
            host: self.ident.host.as_str().to_string(),
            uuid: self.ident.cluster().map(|c| c.uuid),
            ..Default::default()
        };
        for r in self.resources.get().map(|f| f()).unwrap_or_default() {
            let units = r.systemd.start_unit.clone().map(|start| {
                (
                    start.clone(),
                    r.systemd.stop().unwrap_or(&start).to_string(),
                )
            });
            view.resources.insert(
                r.name,
                mars_unitgen::ResourceView {
                    primary: r.primary,
                    emergency: r.emergency,
                    units,
                    roles: Some(r.roles),
                    amounts: Some(r.amounts),
                },
            );
        }
        view
    }

    /// Regenerates the units of every local resource with a configured stack (plus the plain
    /// templates and everything they reference), removes generated files no longer produced,
    /// and reloads systemd if anything changed.
    pub fn regenerate(&self) -> Result<Regenerated, SystemdError> {
        // MARS regenerates when its watcher units run `marsadm systemd-trigger-extern`.
        self.regenerate_as("systemd-trigger-extern")
    }

    /// [`Self::regenerate`] for the command `cmd` (the templates' `@{cmd}`).
    pub fn regenerate_as(&self, cmd: &str) -> Result<Regenerated, SystemdError> {
        let _g = lock(&self.generating);
        let (resources, wanted) = self.wanted();
        let opts = mars_unitgen::RunOptions {
            cmd: cmd.to_string(),
            ..Default::default()
        };
        self.generate(resources, wanted, &opts)
    }

    /// The local resources and the units their stacks want, and every resource's watcher
    /// units (MARS's `$SYSTEMD_WATCHER_UNITS`, `mars-@escvar{res}-trigger.path`: generated for
    /// every resource of the host when a template provides them, as MARS's global trigger
    /// does; without such a template they are unresolved names, which is no error).
    fn wanted(&self) -> (Vec<String>, Vec<WantedUnit>) {
        let list = self.resources.get().map(|f| f()).unwrap_or_default();
        let mut resources = Vec::new();
        let mut wanted = Vec::new();
        for LocalStack {
            name, systemd: sd, ..
        } in list
        {
            if let Some(start) = &sd.start_unit {
                for unit in [Some(start.as_str()), sd.stop()].into_iter().flatten() {
                    wanted.push(WantedUnit {
                        res: name.clone(),
                        unit: unit.to_string(),
                    });
                }
            }
            resources.push(name);
        }
        (resources, wanted)
    }
    /// What [`Self::regenerate`] would generate, without writing, removing or running
    /// anything (`systemd-trigger --dry-run`): the unit names.
    pub fn preview(&self) -> Result<Vec<String>, SystemdError> {
        let (resources, wanted) = self.wanted();
        let opts = mars_unitgen::RunOptions {
            dry_run: true,
            ..Default::default()
        };
        let generation = self.generation(resources, wanted, &opts)?;
        Ok(generation.files.iter().map(|f| f.name.clone()).collect())
    }

    fn generation(
        &self,
        resources: Vec<String>,
        wanted: Vec<WantedUnit>,
        opts: &mars_unitgen::RunOptions,
    ) -> Result<mars_unitgen::Generation, SystemdError> {
        let s = &self.settings;
        let templates = ufs::load_templates(&s.search_path)?;
        let own_dirs = [s.unit_dir.clone(), s.scripts_dir.clone()];
        let config = GenConfig {
            unit_dir: s.unit_dir.display().to_string(),
            scripts_dir: s.scripts_dir.display().to_string(),
            existing_units: ufs::existing_unit_names(&s.system_unit_dirs, &own_dirs)?,
            ..GenConfig::default()
        };
        let vars = self.vars_for(opts);
        let generator = Generator::new(&templates, &config, vars, resources.clone())
            .with_view(Arc::new(self.state_view()));
        let mut wanted = wanted;
        for res in &resources {
            for unit in generator.watcher_units(res, &DEFAULT_WATCHER_UNITS)? {
                wanted.push(WantedUnit {
                    res: res.clone(),
                    unit,
                });
            }
        }
        Ok(generator.generate(&wanted)?)
    }

    fn generate(
        &self,
        resources: Vec<String>,
        wanted: Vec<WantedUnit>,
        opts: &mars_unitgen::RunOptions,
    ) -> Result<Regenerated, SystemdError> {
        let s = &self.settings;
        let own_dirs = [s.unit_dir.clone(), s.scripts_dir.clone()];
        let generation = self.generation(resources, wanted, opts)?;
        for e in &generation.errors {
            tracing::error!("systemd templates: left out: {e}");
        }
        // New files (MARS `__systemd_commit`: "new, to enable" and, ALWAYS_START, "new,
        // needs enable + start"); a file only modified is reloaded, nothing more.
        let new: BTreeSet<String> = generation
            .files
            .iter()
            .filter(|f| std::fs::symlink_metadata(&f.path).is_err())
            .map(|f| f.name.clone())
            .collect();
        let report = ufs::write_generated(&generation.files)?;
        let keep: BTreeSet<String> = generation.files.iter().map(|f| f.name.clone()).collect();
        let mut removed = Vec::new();
        // With a template left out, its units are missing from this run but still wanted:
        // nothing is removed then (MARS does not commit a run that failed either).
        let own_dirs: &[PathBuf] = if generation.errors.is_empty() {
            &own_dirs
        } else {
            &[]
        };
        for dir in own_dirs {
            for stale in ufs::stale_instances(dir, &keep)? {
                // MARS: a deleted unit is stopped (unless KEEP_RUNNING) and disabled, then
                // its file goes.
                if !stale.markers.keep_running {
                    let r = perform(s, UnitOp::Stop, &stale.name);
                    if !matches!(r, Ok(0) | Ok(NOT_LOADED)) {
                        tracing::warn!("systemd: stopping the removed unit {}: {r:?}", stale.name);
                    }
                }
                install_op(s, "disable", &stale.name);
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
            let changed: BTreeSet<&String> = report.changed.iter().collect();
            // As MARS: ALWAYS_DISABLED units are disabled whenever they change; new units are
            // enabled; new ALWAYS_START units (path watchers and the like) are also started.
            for f in generation
                .files
                .iter()
                .filter(|f| changed.contains(&f.name))
            {
                if f.markers.always_disabled {
                    install_op(s, "disable", &f.name);
                } else if new.contains(&f.name) {
                    install_op(s, "enable", &f.name);
                }
            }
            for f in generation.files.iter().filter(|f| {
                f.markers.always_start && !f.markers.always_disabled && new.contains(&f.name)
            }) {
                let r = perform(s, UnitOp::Start, &f.name);
                if !matches!(r, Ok(0)) {
                    tracing::warn!("systemd: starting ALWAYS_START unit {}: {r:?}", f.name);
                }
            }
            // A trigger file written while systemd reloaded may have gone unseen.
            if let Some(tree) = lock(&self.tree).as_mut() {
                if let Err(e) = tree.retrigger() {
                    tracing::warn!("mars tree: {e}");
                }
            }
        }
        for w in &generation.warnings {
            tracing::warn!("systemd templates: {w}");
        }
        for u in &generation.unresolved {
            tracing::debug!("systemd templates: no template or unit provides {u}");
        }
        let mut warnings = generation.warnings;
        warnings.extend(
            generation
                .errors
                .iter()
                .map(|e| format!("left out (no unit removed in this run): {e}")),
        );
        Ok(Regenerated {
            changed: report.changed,
            unchanged: report.unchanged.len(),
            removed,
            warnings,
        })
    }
}

/// `systemctl enable|disable UNIT` (a `.script` is run as `SCRIPT enable|disable`, as MARS
/// does: its `case` ignores what it does not know). A failure is logged: MARS goes on too.
fn install_op(s: &Settings, op: &str, unit: &str) {
    if let Err(e) = mars_unitgen::check_unit_name(unit) {
        tracing::warn!("systemd: {op}: {e}");
        return;
    }
    let r = if unit.ends_with(".script") {
        run(Command::new(s.scripts_dir.join(unit)).arg(op), s.timeout)
    } else {
        run(Command::new(&s.systemctl).args([op, unit]), s.timeout)
    };
    match r {
        Ok(0) => tracing::debug!("systemd: {op} {unit}: ok"),
        r => tracing::warn!("systemd: {op} {unit}: {r:?}"),
    }
}

/// One try of a start or stop (see the module docs): `--job-mode=fail` when `fail_mode`;
/// `Ok(exit status)`.
fn perform_once(
    s: &Settings,
    op: UnitOp,
    unit: &str,
    fail_mode: bool,
) -> Result<i32, SystemdError> {
    // No `/`, no leading `.` or `-`: a script is one of the scripts directory, and a unit
    // name cannot be read as an option of systemctl.
    mars_unitgen::check_unit_name(unit)?;
    if unit.ends_with(".script") {
        let path = s.scripts_dir.join(unit);
        return run(Command::new(&path).arg(op.as_str()), s.timeout);
    }
    // A unit left failed by an earlier try refuses to start until reset (this also resets
    // systemd's start rate limit, which seven tries in 28 s could otherwise hit).
    let _ = run(
        Command::new(&s.systemctl).args(["reset-failed", unit]),
        s.timeout,
    );
    let mut cmd = Command::new(&s.systemctl);
    if fail_mode {
        cmd.arg("--job-mode=fail");
    }
    run(cmd.args([op.as_str(), unit]), s.timeout)
}

/// All tries of a start or stop at once, for the ones a regeneration makes itself (new
/// `ALWAYS_START` units, removed units): MARS's tries with shorter waits.
fn perform(s: &Settings, op: UnitOp, unit: &str) -> Result<i32, SystemdError> {
    let tries = mars_engine::systemd::unit_tries(unit);
    let mut code = 0;
    for attempt in 1..=tries {
        code = perform_once(s, op, unit, attempt <= JOB_MODE_FAIL_TRIES)?;
        // Done, or systemd does not know the unit: trying again cannot change that (a unit
        // file appears only with a daemon-reload).
        if code == 0 || code == NOT_LOADED {
            break;
        }
        if attempt < tries {
            std::thread::sleep(INLINE_STEP * attempt);
        }
    }
    Ok(code)
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

/// The variables templates see besides `res` and `resdir` (`mars_unitgen::host_vars_with`):
/// `mars` is the root directory, which holds `resource-RES/` as `/mars` does in MARS; `ip` is
/// the address peers reach this host at, without the port; the command-line ones from `opts`.
pub fn host_vars(
    host: &str,
    root: &Path,
    advertised: &str,
    opts: &mars_unitgen::RunOptions,
) -> Vars {
    let ip = advertised
        .rsplit_once(':')
        .map_or(advertised, |(ip, _)| ip)
        .trim_start_matches('[')
        .trim_end_matches(']');
    mars_unitgen::host_vars_with(host, &root.display().to_string(), ip, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Names from metadata (another host may have written them) never run a program outside
    /// the scripts directory and never reach `systemctl` as an option.
    #[test]
    fn names_from_metadata_run_nothing_outside_the_scripts_directory() {
        let dir = std::env::temp_dir().join(format!("mars-sd-names-{}", std::process::id()));
        let scripts = dir.join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        let ran = dir.join("ran");
        let program = |path: &Path, what: &str| {
            std::fs::write(
                path,
                format!("#!/bin/sh\necho {what} \"$@\" >> {}\n", ran.display()),
            )
            .unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let outside = dir.join("evil.script");
        program(&outside, "outside");
        program(&scripts.join("ok.script"), "script");
        let systemctl = dir.join("systemctl");
        program(&systemctl, "systemctl");
        let s = Settings {
            search_path: Vec::new(),
            unit_dir: dir.join("units"),
            scripts_dir: scripts,
            systemctl,
            system_unit_dirs: Vec::new(),
            timeout: Duration::from_secs(10),
            mars_tree: None,
        };
        for bad in [
            outside.display().to_string(),
            "../evil.script".to_string(),
            "--now.service".to_string(),
            "ssh.service ssh.socket".to_string(),
            "app".to_string(),
        ] {
            let e = perform(&s, UnitOp::Start, &bad).expect_err(&bad);
            assert!(matches!(e, SystemdError::BadName(_)), "{bad}: {e}");
            assert!(
                e.to_string().starts_with("refused to run: unit name"),
                "{e}"
            );
        }
        assert!(
            !ran.exists(),
            "something ran: {:?}",
            std::fs::read_to_string(&ran)
        );
        // Proper names still run: a script of the scripts directory, a unit via systemctl.
        assert_eq!(perform(&s, UnitOp::Start, "ok.script").unwrap(), 0);
        assert_eq!(perform(&s, UnitOp::Stop, "app.service").unwrap(), 0);
        let log = std::fs::read_to_string(&ran).unwrap();
        assert!(log.contains("script start"), "{log}");
        assert!(
            log.contains("systemctl --job-mode=fail stop app.service"),
            "{log}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A unit systemd does not know (exit 5) is tried once, not five times with backoff and
    /// once more: a retry cannot make it known.
    #[test]
    fn an_unknown_unit_is_tried_once() {
        let dir = std::env::temp_dir().join(format!("mars-sd-unknown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let calls = dir.join("calls");
        let systemctl = dir.join("systemctl");
        std::fs::write(
            &systemctl,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\n\
                 case \"$*\" in *start*) echo 'Unit nosuch.service not found.' >&2; exit 5 ;; esac\n",
                calls.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Settings {
            search_path: Vec::new(),
            unit_dir: dir.join("units"),
            scripts_dir: dir.join("scripts"),
            systemctl,
            system_unit_dirs: Vec::new(),
            timeout: Duration::from_secs(10),
            mars_tree: None,
        };
        let t = Instant::now();
        assert_eq!(
            perform(&s, UnitOp::Start, "nosuch.service").unwrap(),
            NOT_LOADED
        );
        // The five tries with backoff alone took 3 s of sleeping.
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let log = std::fs::read_to_string(&calls).unwrap();
        assert_eq!(
            log.lines().collect::<Vec<_>>(),
            [
                "reset-failed nosuch.service",
                "--job-mode=fail start nosuch.service"
            ],
            "{log}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// While a start or stop runs, the tree's want link shows the want it runs for (MARS's
    /// icpu script reads the link's mtime then and copies the link after its success); once it
    /// is over, the link follows the engine's want again.
    #[test]
    fn the_want_link_shows_the_want_an_operation_runs_for() {
        let dir = std::env::temp_dir().join(format!("mars-sd-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tree = dir.join("mars");
        let scripts = dir.join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        let seen = dir.join("seen");
        let probe = scripts.join("probe.script");
        std::fs::write(
            &probe,
            format!(
                "#!/bin/sh\nreadlink {}/resource-r/systemd-want >> {}\n",
                tree.display(),
                seen.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Settings {
            search_path: Vec::new(),
            unit_dir: dir.join("units"),
            scripts_dir: scripts,
            systemctl: "/bin/false".into(),
            system_unit_dirs: Vec::new(),
            timeout: Duration::from_secs(10),
            mars_tree: Some(tree.clone()),
        };
        let ident = Arc::new(Identity::new(
            dir.join("root"),
            mars_config::HostName::new("a").unwrap(),
            "127.0.0.1:1".into(),
            None,
            None,
            None,
            true,
        ));
        let sd = Systemd::new(s, ident);
        sd.open_tree().unwrap();
        // The engine's state: the want is b (its third write).
        sd.set_resources(Box::new(|| {
            vec![LocalStack {
                name: "r".into(),
                systemd: SystemdMeta {
                    start_unit: Some("probe.script".into()),
                    want: Some(mars_config::HostName::new("b").unwrap()),
                    want_raw: Some("b".into()),
                    want_stamp: 3,
                    ..Default::default()
                },
                primary: Some("b".into()),
                emergency: false,
                roles: Default::default(),
                amounts: Default::default(),
            }]
        }));
        let link = tree.join("resource-r/systemd-want");
        sd.sync_tree();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("b"));
        // A job for an older write of the want (queued before b arrived): the script sees
        // the want it runs for.
        let job = UnitJob {
            op: Some(mars_engine::resource::OpKey {
                op: UnitOp::Stop,
                unit: "probe.script".into(),
                want: Some("a".into()),
                want_stamp: 2,
            }),
            regenerate: false,
            attempt: 2,
        };
        let status = sd.run_job("r", &job).unwrap();
        assert!(status.ok(), "{status:?}");
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), "a\n");
        // Over: the link is the engine's want again (a new write: a later mtime).
        sd.sync_tree();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
