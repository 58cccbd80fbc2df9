//! Instantiating templates and the transitive closure over unit references (MARS
//! `make_systemd_unit`, `_instantiate_systemd_unit`, `__systemd_generate`,
//! `set_systemd_unit_phase1`), without touching the file system.
//!
//! # One generation run
//!
//! 1. Every *plain* template (name without `@` or `^`) is instantiated, with
//!    `res = UNDEFINED_RESOURCE`.
//! 2. Every wanted unit (the resources' start/stop units and watcher units) is instantiated for
//!    its resource.
//! 3. Every unit referenced from a generated file (see [`DEPENDENCY_KEYS`] and `# ALSO=`) is
//!    instantiated, transitively, trying every resource of the host in turn.
//!
//! Looking up a unit name (MARS `make_systemd_unit`): systemd's special units are skipped;
//! otherwise the templates are tried in natural order of their paths, and for each template
//! every candidate resource, and the first whose name matches wins (see
//! [`crate::Expander::match_name`]). Only when no template provides the name does an existing
//! unit file count (the caller supplies these names, excluding our own output directories):
//! a template wins over a unit file of the same name elsewhere, as in MARS. Names nobody
//! provides are reported as unresolved.
//!
//! # Bad templates
//!
//! As in MARS, one bad template does not stop the others: an unset variable becomes
//! `UNDEFINED(var)` and an unknown `@`-macro its body, both with a warning
//! ([`Generation::warnings`]). A template that is truly malformed (an unclosed brace, an unknown
//! `%`-macro, `%die{}`, a runaway loop, …) is left out of the run with its error in
//! [`Generation::errors`], also when the run would not need it; the other templates still
//! generate. (MARS stops the whole run at the first `%`-macro error while expanding, and
//! never looks at templates it does not need.)
//!
//! # Output format
//!
//! The generated text is the `@`-expanded template behind this header (byte-exact as MARS):
//!
//! ```text
//! ### GENERATED FROM: <template path>
//! ### GENERATED NAME: <unit name>
//! ### GENERATED   TO: <output path>
//! ### TEMPLATE MTIME: <template mtime, seconds>
//! ###
//! ###   REF: <referenced unit>      (one line per distinct reference, in order)
//! ###
//! ```
//!
//! If the expanded text starts with `#!`, the header goes between the shebang line and the
//! newline that ended it (so a blank line follows the header, as in MARS).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::error::{Error, Location, MacroError, TemplateError};
use crate::escape::escape_path;
use crate::expand::{is_pattern_name, Expander};
use crate::macros::Vars;
use crate::markers::Markers;

/// Where MARS puts generated units (`$SYSTEMD_TARGET_DIR`).
pub const DEFAULT_UNIT_DIR: &str = "/run/systemd/system";
/// Where MARS puts generated `.script`s (`/run` is often mounted `noexec`).
pub const DEFAULT_SCRIPTS_DIR: &str = "/etc/marsadm/systemd-generated-scripts";
/// Recognised template suffixes (`$SYSTEMD_SUFFIXES`).
pub const SUFFIXES: [&str; 12] = [
    "service",
    "socket",
    "device",
    "mount",
    "automount",
    "swap",
    "target",
    "path",
    "timer",
    "slice",
    "scope",
    "script",
];
/// The per-resource watcher units MARS always generates (`$SYSTEMD_WATCHER_UNITS`).
pub const DEFAULT_WATCHER_UNITS: [&str; 1] = ["mars-@escvar{res}-trigger.path"];
/// The resource name plain templates are instantiated with.
pub const UNDEFINED_RESOURCE: &str = "UNDEFINED_RESOURCE";
/// Keys whose values name other units (`$SYSTEMD_DEPENDENCIES`); `# ALSO=` lines count too.
pub const DEPENDENCY_KEYS: [&str; 22] = [
    "Unit",
    "Service",
    "Slice",
    "Sockets",
    "Requires",
    "Requisite",
    "Wants",
    "BindsTo",
    "PartOf",
    "Conflicts",
    "Before",
    "After",
    "OnFailure",
    "PropagatesReloadTo",
    "ReloadPropagatedFrom",
    "JoinsNamespaceOf",
    "RequiresMountsFor",
    "Alias",
    "WantedBy",
    "RequiredBy",
    "Also",
    "DefaultInstance",
];
/// systemd's special units (`man systemd.special`), never generated (`$SYSTEMD_PREDEFINED`;
/// MARS's list lacks a comma between `machines.target` and `multi-user.target`, so neither is
/// special there — here both are).
pub const SPECIAL_UNITS: &[&str] = &[
    "basic.target",
    "bluetooth.target",
    "cryptsetup-pre.target",
    "cryptsetup.target",
    "ctrl-alt-del.target",
    "default.target",
    "emergency.target",
    "exit.target",
    "final.target",
    "getty.target",
    "graphical.target",
    "halt.target",
    "hibernate.target",
    "hybrid-sleep.target",
    "initrd-fs.target",
    "initrd-root-device.target",
    "initrd-root-fs.target",
    "kbrequest.target",
    "kexec.target",
    "local-fs-pre.target",
    "local-fs.target",
    "machines.target",
    "multi-user.target",
    "network-online.target",
    "network-pre.target",
    "network.target",
    "nss-lookup.target",
    "nss-user-lookup.target",
    "paths.target",
    "poweroff.target",
    "printer.target",
    "reboot.target",
    "remote-cryptsetup.target",
    "remote-fs-pre.target",
    "remote-fs.target",
    "rescue.target",
    "rpcbind.target",
    "runlevel2.target",
    "runlevel3.target",
    "runlevel4.target",
    "runlevel5.target",
    "shutdown.target",
    "sigpwr.target",
    "sleep.target",
    "slices.target",
    "smartcard.target",
    "sockets.target",
    "sound.target",
    "suspend.target",
    "swap.target",
    "sysinit.target",
    "syslog.socket",
    "system-update.target",
    "time-sync.target",
    "timers.target",
    "umount.target",
    "system.slice",
    "user.slice",
    "machine.slice",
    "dbus.service",
    "dbus.socket",
    "display-manager.service",
    "system-update-cleanup.service",
];

/// The command-line state MARS's `make_env` puts into every template's variables, with MARS's
/// defaults ([`RunOptions::default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// `cmd` (also `0` and the start of `callstack`): the command being run. MARS generates
    /// from `systemd-trigger`, `systemd-trigger-extern` (its watcher units), `set-systemd-unit`,
    /// `leave-resource` and `delete-resource`.
    pub cmd: String,
    /// `real_host`: the machine's own name (MARS: `host` may be overridden by `--host=`).
    pub real_host: Option<String>,
    /// `timeout` (`--timeout=`, seconds; MARS's default 600).
    pub timeout: i64,
    /// `threshold` (`--threshold=`, bytes; default 10 MiB).
    pub threshold: u64,
    /// `window` (`--window=`, seconds; default 60).
    pub window: u64,
    /// `stuck-seconds` (`--stuck-seconds=`; default 3600).
    pub stuck_seconds: u64,
    /// `keep-backup-hours` (`--keep-backup-hours=`; default 168); `keep-backup-seconds` is
    /// this times 3600.
    pub keep_backup_hours: u64,
    /// `force` (`--force`: 1, else 0).
    pub force: bool,
    /// `dry-run` (`--dry-run`: 1, else 0).
    pub dry_run: bool,
    /// `verbose` (the number of `--verbose`/`-v`).
    pub verbose: u32,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            cmd: "systemd-trigger".into(),
            real_host: None,
            timeout: 600,
            threshold: 10 * 1024 * 1024,
            window: 60,
            stuck_seconds: 3600,
            keep_backup_hours: 24 * 7,
            force: false,
            dry_run: false,
            verbose: 0,
        }
    }
}

/// The host-wide variables templates see besides `res` and `resdir`, with MARS's defaults for
/// the command-line ones ([`host_vars_with`]).
pub fn host_vars(host: &str, mars: &str, ip: &str) -> Vars {
    host_vars_with(host, mars, ip, &RunOptions::default())
}

/// The host-wide variables as MARS's `make_env` sets them: `host`, `mars` (the directory
/// holding `resource-RES/`), `ip` (the host's address), and from `opts` `cmd`, `0` and
/// `callstack` (all the command), `real_host`, `timeout`, `threshold`, `window`,
/// `stuck-seconds`, `keep-backup-hours`, `keep-backup-seconds`, `force`, `dry-run`, `verbose`.
/// `marsd` and `marsadm systemd-generate` both use this, so they write the same files.
pub fn host_vars_with(host: &str, mars: &str, ip: &str, opts: &RunOptions) -> Vars {
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    Vars::from([
        ("host".to_string(), host.to_string()),
        ("mars".to_string(), mars.to_string()),
        ("ip".to_string(), ip.to_string()),
        ("cmd".to_string(), opts.cmd.clone()),
        // MARS's `set_args` with the command as the macro name.
        ("0".to_string(), opts.cmd.clone()),
        ("callstack".to_string(), opts.cmd.clone()),
        (
            "real_host".to_string(),
            opts.real_host.clone().unwrap_or_else(|| host.to_string()),
        ),
        ("timeout".to_string(), opts.timeout.to_string()),
        ("threshold".to_string(), opts.threshold.to_string()),
        ("window".to_string(), opts.window.to_string()),
        ("stuck-seconds".to_string(), opts.stuck_seconds.to_string()),
        (
            "keep-backup-hours".to_string(),
            opts.keep_backup_hours.to_string(),
        ),
        (
            "keep-backup-seconds".to_string(),
            opts.keep_backup_hours.saturating_mul(3600).to_string(),
        ),
        ("force".to_string(), flag(opts.force)),
        ("dry-run".to_string(), flag(opts.dry_run)),
        ("verbose".to_string(), opts.verbose.to_string()),
    ])
}

/// MARS's `alphanum_cmp`: digit runs compare as numbers (zero-padded to 12 places), the rest
/// byte-wise.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn key(s: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(s.len() + 16);
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_digit() {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                out.extend(std::iter::repeat_n(b'0', 12usize.saturating_sub(i - start)));
                out.extend_from_slice(&b[start..i]);
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }
    key(a).cmp(&key(b))
}

/// One template file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// File name, e.g. `mnt-@escvar{res}.mount`.
    pub name: String,
    /// Where it came from (written into `### GENERATED FROM:`); the name for in-memory ones.
    pub path: String,
    /// Contents.
    pub text: String,
    /// Modification time in seconds (written into `### TEMPLATE MTIME:`).
    pub mtime: i64,
}

impl Template {
    /// An in-memory template (path = name, mtime 0).
    pub fn new(name: &str, text: &str) -> Template {
        Template {
            name: name.into(),
            path: name.into(),
            text: text.into(),
            mtime: 0,
        }
    }
}

/// The templates, in the order MARS tries them (natural order of their paths), and the user
/// macro files they may call.
#[derive(Debug, Clone, Default)]
pub struct TemplateSet {
    list: Vec<Template>,
    macros: std::sync::Arc<BTreeMap<String, String>>,
}

impl TemplateSet {
    /// Sorts the templates; a name given twice is an error (the loader already resolved
    /// "first hit in the search path wins").
    pub fn new(mut list: Vec<Template>) -> Result<TemplateSet, Error> {
        let mut seen = BTreeSet::new();
        for t in &list {
            if !seen.insert(t.name.as_str()) {
                return Err(Error::DuplicateTemplate(t.name.clone()));
            }
        }
        list.sort_by(|a, b| natural_cmp(&a.path, &b.path).then_with(|| a.name.cmp(&b.name)));
        Ok(TemplateSet {
            list,
            macros: Default::default(),
        })
    }

    /// The same templates with user macro files (`NAME` → text, see
    /// [`crate::fs::load_macros`]).
    pub fn with_macros(mut self, macros: BTreeMap<String, String>) -> TemplateSet {
        self.macros = std::sync::Arc::new(macros);
        self
    }

    /// The user macro files.
    pub fn macros(&self) -> &BTreeMap<String, String> {
        &self.macros
    }

    /// In matching order.
    pub fn iter(&self) -> impl Iterator<Item = &Template> {
        self.list.iter()
    }

    /// By file name.
    pub fn get(&self, name: &str) -> Option<&Template> {
        self.list.iter().find(|t| t.name == name)
    }

    /// Checks every template's name and body for syntax errors (unclosed braces, unknown
    /// `%`-macros) without expanding them, so that a malformed template is reported even
    /// when no generation run needs it: one error per bad template.
    pub fn check(&self) -> Vec<TemplateError> {
        let ctx = crate::macros::Context {
            macros: self.macros.clone(),
            view: None,
        };
        self.list
            .iter()
            .filter_map(|t| check_one(t, &ctx).err())
            .collect()
    }

    /// Number of templates.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// No templates.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

fn check_one(t: &Template, ctx: &crate::macros::Context) -> Result<(), TemplateError> {
    crate::expand::check_syntax(&t.name, ctx).map_err(|e| TemplateError::in_name(&t.path, e))?;
    crate::expand::check_syntax(&t.text, ctx)
        .map_err(|e| TemplateError::in_body(&t.path, &t.text, e))
}

/// Which directory a generated file belongs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetDir {
    /// The unit directory (mode 0444).
    Units,
    /// The scripts directory, for `.script` (mode 0544).
    Scripts,
}

impl TargetDir {
    /// By unit name.
    pub fn of(name: &str) -> TargetDir {
        if name.ends_with(".script") {
            TargetDir::Scripts
        } else {
            TargetDir::Units
        }
    }

    /// File mode MARS uses.
    pub fn mode(self) -> u32 {
        match self {
            TargetDir::Units => 0o444,
            TargetDir::Scripts => 0o544,
        }
    }
}

/// One instantiated template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Unit name (= file name).
    pub name: String,
    /// Template file name.
    pub template: String,
    /// Template path.
    pub template_path: String,
    /// Template mtime (MARS also sets the output's mtime to it).
    pub mtime: i64,
    /// The resource it was instantiated for ([`UNDEFINED_RESOURCE`] for plain templates).
    pub resource: String,
    /// Units or scripts directory.
    pub dir: TargetDir,
    /// Full output path.
    pub path: String,
    /// Header + expanded text.
    pub content: String,
    /// Markers of the expanded text.
    pub markers: Markers,
    /// Referenced units, in order, without duplicates.
    pub refs: Vec<String>,
}

/// Result of one generation run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generation {
    /// Generated files, in natural name order.
    pub files: Vec<GeneratedFile>,
    /// Wanted or referenced names that neither a template nor an existing unit provides
    /// (MARS warns "cannot find any systemd template"), sorted.
    pub unresolved: Vec<String>,
    /// Wanted or referenced names provided by existing unit files, sorted.
    pub existing: Vec<String>,
    /// `%warn{}` output, unset variables (`UNDEFINED(var)`), unknown `@`-macros and similar,
    /// each once.
    pub warnings: Vec<String>,
    /// Templates left out of this run because they are malformed (see the module docs), each
    /// once.
    pub errors: Vec<TemplateError>,
}

impl Generation {
    /// A generated file by unit name.
    pub fn get(&self, name: &str) -> Option<&GeneratedFile> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// A unit wanted for a resource: its start or stop unit, or a watcher unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedUnit {
    /// Resource name.
    pub res: String,
    /// Unit name (already escaped, as stored in `systemd-start-unit`).
    pub unit: String,
}

/// Settings of the generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Output directory of units, for the header and [`GeneratedFile::path`].
    pub unit_dir: String,
    /// Output directory of `.script`s.
    pub scripts_dir: String,
    /// Never generated ([`SPECIAL_UNITS`] by default).
    pub special_units: BTreeSet<String>,
    /// Unit names already provided by unit files in systemd's directories, *excluding* our own
    /// output directories (else every earlier instance would shadow its template).
    pub existing_units: BTreeSet<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            unit_dir: DEFAULT_UNIT_DIR.into(),
            scripts_dir: DEFAULT_SCRIPTS_DIR.into(),
            special_units: SPECIAL_UNITS.iter().map(|s| s.to_string()).collect(),
            existing_units: BTreeSet::new(),
        }
    }
}

/// The start and stop unit chosen by `set-systemd-unit` (both empty = delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitChoice {
    /// Start unit name.
    pub start: String,
    /// Stop unit name.
    pub stop: String,
}

/// What looking up one unit name gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A template matched.
    Generated(Box<GeneratedFile>),
    /// A systemd special unit.
    Special,
    /// Provided by an existing unit file.
    Existing,
    /// Nothing provides it.
    NotFound,
}

/// MARS's reference regex over `$SYSTEMD_DEPENDENCIES` (the keys of [`DEPENDENCY_KEYS`] and
/// `# ALSO`): `m/^\s*(KEYS)\s*=\s*(.*?)$/m`, matched successively over the text.
fn refs_regex(keys: &str) -> regex::Regex {
    let ws = r"[ \t\n\r\x0B\x0C]*";
    let re = format!(r"(?m)^{ws}({keys}){ws}={ws}(.*?)$");
    // Built from constant key names: always valid; the fallback matches nothing.
    regex::Regex::new(&re).unwrap_or_else(|_| regex::Regex::new("[^\\s\\S]").expect("valid"))
}

/// The raw values of every reference of `text` with the byte offset of its line, in order.
fn ref_values(text: &str, keys: &str) -> Vec<(usize, String)> {
    let re = refs_regex(keys);
    let mut out = Vec::new();
    for caps in re.captures_iter(text) {
        let Some(value) = caps.get(2) else { continue };
        for v in value
            .as_str()
            .split(|c: char| c.is_ascii() && crate::markers::is_perl_space(c as u8))
            .filter(|v| !v.is_empty())
        {
            out.push((value.start(), v.to_string()));
        }
    }
    out
}

/// The unit names of the `# ALSO=` lines of `text`, in order (see [`crate::markers`]).
pub fn also_refs(text: &str) -> Vec<String> {
    ref_values(text, "# ALSO")
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// The references of an expanded text, in order, without duplicates; path arguments
/// (containing `/`) are `systemd-escape --path`ed like MARS does (so
/// `RequiresMountsFor=/mars/uuid` refers to `mars-uuid`).
///
/// Matched exactly as MARS does (`m/^\s*(KEYS|# ALSO)\s*=\s*(.*?)$/m`): a key of
/// [`DEPENDENCY_KEYS`] or `# ALSO` at the start of a line after optional whitespace, `=` with
/// optional whitespace around it, and the whitespace-separated values up to the end of the
/// line. As in MARS, the whitespace may cross line ends: `After=` with nothing behind it takes
/// the next line's first words. A path that cannot be escaped is an error with its
/// 1-based line.
pub fn scan_refs(text: &str) -> Result<Vec<String>, (usize, MacroError)> {
    let keys = DEPENDENCY_KEYS.join("|") + "|# ALSO";
    let mut refs: Vec<String> = Vec::new();
    for (at, v) in ref_values(text, &keys) {
        let unit = if v.contains('/') {
            escape_path(&v).map_err(|e| (crate::error::line_of(text, at), MacroError::Escape(e)))?
        } else {
            v
        };
        if !refs.contains(&unit) {
            refs.push(unit);
        }
    }
    Ok(refs)
}

/// Header + body, byte-exact as MARS writes it.
pub fn render(
    template_path: &str,
    name: &str,
    path: &str,
    mtime: i64,
    refs: &[String],
    body: &str,
) -> String {
    let mut header = format!(
        "### GENERATED FROM: {template_path}\n### GENERATED NAME: {name}\n\
         ### GENERATED   TO: {path}\n### TEMPLATE MTIME: {mtime}\n###\n"
    );
    for r in refs {
        header.push_str(&format!("###   REF: {r}\n"));
    }
    header.push_str("###\n");
    if body.starts_with("#!") {
        let end = body.find('\n').unwrap_or(body.len());
        format!("{}\n{header}{}", &body[..end], &body[end..])
    } else {
        header + body
    }
}

/// The generator: templates, settings, the host's variables and resources.
#[derive(Debug, Clone)]
pub struct Generator<'a> {
    templates: &'a TemplateSet,
    config: &'a Config,
    vars: Vars,
    resources: Vec<String>,
    ctx: crate::macros::Context,
}

impl<'a> Generator<'a> {
    /// `vars` are the host-wide variables (`host`, `mars`, `ip`, `cmd`, …); `resources` are the
    /// host's resources, tried in order when resolving references.
    pub fn new(
        templates: &'a TemplateSet,
        config: &'a Config,
        vars: Vars,
        resources: Vec<String>,
    ) -> Self {
        let ctx = crate::macros::Context {
            macros: templates.macros.clone(),
            view: None,
        };
        Generator {
            templates,
            config,
            vars,
            resources,
            ctx,
        }
    }

    /// Answers MARS's view primitives (`%get-primary{}`, …) in templates from `view`.
    pub fn with_view(mut self, view: std::sync::Arc<dyn crate::view::View>) -> Self {
        self.ctx.view = Some(view);
        self
    }

    fn expander(&self, res: &str) -> Expander {
        Expander::with_context(self.resource_vars(res), self.ctx.clone())
    }

    /// The variables for resource `res`: the host's, plus `res` and `resdir`
    /// (`<mars>/resource-<res>`, `mars` defaulting to `/mars`).
    pub fn resource_vars(&self, res: &str) -> Vars {
        let mut vars = self.vars.clone();
        let mars = vars.get("mars").cloned().unwrap_or_else(|| "/mars".into());
        vars.insert("res".into(), res.into());
        vars.insert("resdir".into(), format!("{mars}/resource-{res}"));
        vars
    }

    /// The watcher unit names of `res` ([`DEFAULT_WATCHER_UNITS`] or other patterns).
    pub fn watcher_units(
        &self,
        res: &str,
        patterns: &[&str],
    ) -> Result<Vec<String>, TemplateError> {
        patterns
            .iter()
            .map(|p| {
                self.expander(res)
                    .expand(p)
                    .map_err(|e| TemplateError::in_name(p, e))
            })
            .collect()
    }

    /// Looks up and instantiates one unit name, for `res` or (with `None`) for every resource
    /// of the host in turn. `%warn` output is appended to `warnings`. A template that fails
    /// (in its name or body) is an error here; [`Self::generate`] skips it and goes on.
    pub fn lookup(
        &self,
        res: Option<&str>,
        unit: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Lookup, TemplateError> {
        self.lookup_in(res, unit, warnings, &BTreeSet::new())
    }

    fn lookup_in(
        &self,
        res: Option<&str>,
        unit: &str,
        warnings: &mut Vec<String>,
        bad: &BTreeSet<String>,
    ) -> Result<Lookup, TemplateError> {
        if self.config.special_units.contains(unit) {
            return Ok(Lookup::Special);
        }
        // The name becomes a file name: one that could leave the unit directory is never
        // generated (see `names`).
        if let Err(e) = crate::names::check_file_name(unit) {
            warnings.push(format!("not generated: {e}"));
            return Ok(Lookup::NotFound);
        }
        let candidates: Vec<String> = match res {
            Some(r) => vec![r.to_string()],
            // No resources known: plain pattern templates (`^{x}.service`) still resolve.
            None if self.resources.is_empty() => vec![UNDEFINED_RESOURCE.to_string()],
            None => self.resources.clone(),
        };
        for t in self.templates.iter().filter(|t| !bad.contains(&t.path)) {
            for r in &candidates {
                let mut ex = self.expander(r);
                if ex
                    .match_name(&t.name, unit)
                    .map_err(|e| TemplateError::in_name(&t.path, e))?
                {
                    warnings.append(&mut ex.warnings);
                    let file = self.instantiate(t, r, unit, ex)?;
                    warnings.extend(file.1);
                    return Ok(Lookup::Generated(Box::new(file.0)));
                }
            }
        }
        // MARS looks for an installed unit only after no template matched.
        if self.config.existing_units.contains(unit) {
            return Ok(Lookup::Existing);
        }
        Ok(Lookup::NotFound)
    }

    fn instantiate(
        &self,
        t: &Template,
        res: &str,
        name: &str,
        mut ex: Expander,
    ) -> Result<(GeneratedFile, Vec<String>), TemplateError> {
        let body = ex
            .expand(&t.text)
            .map_err(|e| TemplateError::in_body(&t.path, &t.text, e))?;
        let refs = scan_refs(&body).map_err(|(line, kind)| TemplateError {
            template: t.path.clone(),
            // The line in the *expanded* text; templates rarely expand to more lines.
            location: Location::Line(line),
            kind,
        })?;
        let dir = TargetDir::of(name);
        let base = match dir {
            TargetDir::Units => &self.config.unit_dir,
            TargetDir::Scripts => &self.config.scripts_dir,
        };
        let path = format!("{}/{name}", base.trim_end_matches('/'));
        let content = render(&t.path, name, &path, t.mtime, &refs, &body);
        let file = GeneratedFile {
            name: name.into(),
            template: t.name.clone(),
            template_path: t.path.clone(),
            mtime: t.mtime,
            resource: res.into(),
            dir,
            path,
            markers: Markers::parse(&body),
            content,
            refs,
        };
        Ok((file, ex.warnings))
    }

    /// One generation run (see the module docs): plain templates, `wanted`, and the closure.
    pub fn generate(&self, wanted: &[WantedUnit]) -> Result<Generation, TemplateError> {
        let mut files: BTreeMap<String, GeneratedFile> = BTreeMap::new();
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut unresolved = BTreeSet::new();
        let mut existing = BTreeSet::new();
        let mut warnings = Vec::new();
        // Malformed templates are left out (each reported once), also unused ones.
        let mut errors = self.templates.check();
        let mut bad: BTreeSet<String> = errors.iter().map(|e| e.template.clone()).collect();
        // A lookup whose template fails: that template is left out, and the name is looked
        // up again without it (as if the template were not there).
        let mut lookup = |res: Option<&str>, unit: &str, warnings: &mut Vec<String>| loop {
            match self.lookup_in(res, unit, warnings, &bad) {
                Ok(l) => return l,
                Err(e) => {
                    let new = bad.insert(e.template.clone());
                    errors.push(e);
                    if !new {
                        // Not a template of the set (cannot happen): give up on the name.
                        return Lookup::NotFound;
                    }
                }
            }
        };
        let mut queue: VecDeque<String> = VecDeque::new();
        let mut record = |lookup: Lookup,
                          unit: &str,
                          files: &mut BTreeMap<String, GeneratedFile>,
                          queue: &mut VecDeque<String>| match lookup {
            Lookup::Generated(f) => {
                queue.extend(f.refs.iter().cloned());
                // A later instantiation of the same name replaces an earlier one, as MARS
                // overwrites the file.
                files.insert(f.name.clone(), *f);
            }
            Lookup::Existing => {
                existing.insert(unit.to_string());
            }
            Lookup::NotFound => {
                unresolved.insert(unit.to_string());
            }
            Lookup::Special => {}
        };
        for t in self.templates.iter().filter(|t| !is_pattern_name(&t.name)) {
            let l = lookup(Some(UNDEFINED_RESOURCE), &t.name, &mut warnings);
            record(l, &t.name, &mut files, &mut queue);
            done.insert(t.name.clone());
        }
        // An empty name is `set-systemd-unit RES ""` (no units): nothing to generate.
        for w in wanted.iter().filter(|w| !w.unit.is_empty()) {
            let l = lookup(Some(&w.res), &w.unit, &mut warnings);
            record(l, &w.unit, &mut files, &mut queue);
            done.insert(w.unit.clone());
        }
        while let Some(unit) = queue.pop_front() {
            if !done.insert(unit.clone()) {
                continue;
            }
            let l = lookup(None, &unit, &mut warnings);
            record(l, &unit, &mut files, &mut queue);
        }
        let mut files: Vec<GeneratedFile> = files.into_values().collect();
        files.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        let mut seen = BTreeSet::new();
        warnings.retain(|w| seen.insert(w.clone()));
        Ok(Generation {
            files,
            unresolved: unresolved.into_iter().collect(),
            existing: existing.into_iter().collect(),
            warnings,
            errors,
        })
    }

    /// The first template (in matching order) carrying `marker` (e.g. `DEFAULT_START`), its name
    /// expanded for `res` (MARS `_get_default_unit`; markers are read from the raw template).
    pub fn marker_unit(&self, res: &str, marker: &str) -> Result<Option<String>, TemplateError> {
        for t in self.templates.iter() {
            if Markers::parse(&t.text).has(marker) {
                let name = self
                    .expander(res)
                    .expand(&t.name)
                    .map_err(|e| TemplateError::in_name(&t.path, e))?;
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// `set-systemd-unit RES START [STOP]` (MARS `set_systemd_unit_phase1`): an all-caps
    /// `START` such as `DEFAULT` picks the template marked `DEFAULT_START` (and, without
    /// `STOP`, the one marked `DEFAULT_STOP`); an all-caps `STOP` picks `STOP_STOP`; a missing
    /// stop unit is the start unit; a bare resource name inside a unit name is escaped
    /// (`mnt-my-res.mount` → `mnt-my\x2dres.mount`, first occurrence). An empty `START` gives
    /// empty names (= delete). Unlike MARS (which then silently deletes the setting), a marker
    /// no template carries is an error.
    pub fn choose_units(
        &self,
        res: &str,
        start: &str,
        stop: Option<&str>,
    ) -> Result<UnitChoice, Error> {
        fn is_marker_name(s: &str) -> bool {
            let b = s.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_uppercase()
                && b.iter()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
        }
        if start.is_empty() {
            return Ok(UnitChoice {
                start: String::new(),
                stop: String::new(),
            });
        }
        let by_marker = |marker: String| -> Result<String, Error> {
            self.marker_unit(res, &marker)?
                .ok_or(Error::NoTemplateWithMarker(marker))
        };
        let stop = stop.filter(|s| !s.is_empty());
        let mut start_name = start.to_string();
        let mut stop_name = String::new();
        if is_marker_name(start) {
            start_name = by_marker(format!("{start}_START"))?;
            if stop.is_none() {
                stop_name = self
                    .marker_unit(res, &format!("{start}_STOP"))?
                    .unwrap_or_default();
            }
        }
        if let Some(stop) = stop {
            stop_name = if is_marker_name(stop) {
                by_marker(format!("{stop}_STOP"))?
            } else {
                stop.to_string()
            };
        }
        if stop_name.is_empty() {
            stop_name = start_name.clone();
        }
        let fix = |name: String| -> Result<String, Error> {
            match name.find(res).filter(|_| !res.is_empty()) {
                Some(at) => {
                    let escaped = escape_path(res).map_err(|e| TemplateError {
                        template: name.clone(),
                        location: Location::Name,
                        kind: e.into(),
                    })?;
                    Ok(format!(
                        "{}{escaped}{}",
                        &name[..at],
                        &name[at + res.len()..]
                    ))
                }
                None => Ok(name),
            }
        };
        Ok(UnitChoice {
            start: fix(start_name)?,
            stop: fix(stop_name)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(list: &[(&str, &str)]) -> TemplateSet {
        TemplateSet::new(list.iter().map(|(n, t)| Template::new(n, t)).collect()).unwrap()
    }

    fn host() -> Vars {
        Vars::from([
            ("host".to_string(), "node1".to_string()),
            ("mars".to_string(), "/mars".to_string()),
        ])
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["a10", "a9", "b", "a09x"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a9", "a09x", "a10", "b"]);
    }

    #[test]
    fn header_and_shebang() {
        let refs = vec!["x.service".to_string()];
        assert_eq!(
            render(
                "/t/a.service",
                "a.service",
                "/run/a.service",
                7,
                &refs,
                "[Unit]\n"
            ),
            "### GENERATED FROM: /t/a.service\n### GENERATED NAME: a.service\n\
             ### GENERATED   TO: /run/a.service\n### TEMPLATE MTIME: 7\n###\n\
             ###   REF: x.service\n###\n[Unit]\n"
        );
        assert_eq!(
            render("t", "s.script", "/s/s.script", 0, &[], "#!/bin/sh\necho\n"),
            "#!/bin/sh\n### GENERATED FROM: t\n### GENERATED NAME: s.script\n\
             ### GENERATED   TO: /s/s.script\n### TEMPLATE MTIME: 0\n###\n###\n\necho\n"
        );
    }

    #[test]
    fn refs() {
        let text = "After=a.service  b.service\n  Wants = c.target\n#After=no.service\n\
                    RequiresMountsFor=/mars/uuid\n# ALSO=d.path\n## ALSO=no.path\nAfterX=no\n\
                    After=a.service\nExecStart=/bin/true\nWantedBy=mars.service\n";
        assert_eq!(
            scan_refs(text).unwrap(),
            [
                "a.service",
                "b.service",
                "c.target",
                "mars-uuid",
                "d.path",
                "mars.service"
            ]
        );
        let (line, kind) = scan_refs("\nRequiresMountsFor=/a/../b\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(matches!(kind, MacroError::Escape(_)));
    }

    /// A pattern template matches any name, also one from metadata that climbs out of the unit
    /// directory: nothing is generated for it, and the run says why.
    #[test]
    fn a_name_that_leaves_the_unit_directory_is_not_generated() {
        let t = set(&[("^{what}.service", "[Unit]\nDescription=@{what}\n")]);
        let config = Config::default();
        let g = Generator::new(&t, &config, host(), vec!["r".into()]);
        let out = g
            .generate(&[WantedUnit {
                res: "r".into(),
                unit: "../../etc/systemd/system/evil.service".into(),
            }])
            .unwrap();
        assert!(out.files.is_empty(), "{:?}", out.files);
        assert!(
            out.warnings
                .iter()
                .any(|w| w.contains("not generated") && w.contains("contains '/'")),
            "{:?}",
            out.warnings
        );
        // The same template still serves a proper name. (A reference with `..` inside a
        // template is a template error already: `scan_refs`.)
        let out = g
            .generate(&[WantedUnit {
                res: "r".into(),
                unit: "app.service".into(),
            }])
            .unwrap();
        let paths: Vec<&str> = out.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths.len(), 1, "{paths:?}");
        assert!(!paths[0].contains(".."), "{paths:?}");
    }

    #[test]
    fn closure_special_existing_unresolved() {
        let t = set(&[
            ("top-@escvar{res}.service", "[Unit]\nRequires=mid-@escvar{res}.service network-online.target\nAfter=ext.mount\nWants=gone.service\n"),
            ("mid-@escvar{res}.service", "[Unit]\nBindsTo=^{x}\n# ALSO=^{x}-leaf.service\n"),
            ("^{what}-leaf.service", "[Unit]\nDescription=@{what} for @{res}\n"),
            ("plain.service", "[Unit]\nDescription=@{res}\n"),
        ]);
        let config = Config {
            existing_units: ["ext.mount".to_string()].into(),
            ..Config::default()
        };
        let g = Generator::new(&t, &config, host(), vec!["other".into(), "a-b".into()]);
        let out = g
            .generate(&[WantedUnit {
                res: "a-b".into(),
                unit: "top-a\\x2db.service".into(),
            }])
            .unwrap();
        let names: Vec<&str> = out.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "^{x}-leaf.service",
                "mid-a\\x2db.service",
                "plain.service",
                "top-a\\x2db.service"
            ]
        );
        assert_eq!(out.existing, ["ext.mount"]);
        assert_eq!(out.unresolved, ["^{x}", "gone.service"]);
        let top = out.get("top-a\\x2db.service").unwrap();
        assert_eq!(
            top.refs,
            [
                "mid-a\\x2db.service",
                "network-online.target",
                "ext.mount",
                "gone.service"
            ]
        );
        assert_eq!(top.resource, "a-b");
        assert_eq!(top.path, "/run/systemd/system/top-a\\x2db.service");
        // The closure tried "other" first, which does not match; "a-b" does.
        assert_eq!(out.get("mid-a\\x2db.service").unwrap().resource, "a-b");
        assert!(out
            .get("plain.service")
            .unwrap()
            .content
            .ends_with("Description=UNDEFINED_RESOURCE\n"));
        let leaf = out.get("^{x}-leaf.service").unwrap();
        assert!(leaf.content.ends_with("Description=^{x} for other\n"));
    }

    /// MARS's lenient expansion: the unit is written with `UNDEFINED(var)` and a warning
    /// (changed from an error that stopped the run).
    #[test]
    fn undefined_variables_warn() {
        let t = set(&[("bad.service", "[Unit]\nDescription=@{nope} @{nope}\n")]);
        let config = Config::default();
        let out = Generator::new(&t, &config, host(), vec![])
            .generate(&[])
            .unwrap();
        assert!(out.files[0]
            .content
            .ends_with("Description=UNDEFINED(nope) UNDEFINED(nope)\n"));
        assert_eq!(out.warnings, ["variable 'nope' is undefined"]);
        assert!(out.errors.is_empty());
    }

    /// One malformed template (used or not) is left out with its file and line; the others
    /// still generate (changed from stopping the whole run).
    #[test]
    fn bad_templates_are_skipped() {
        let t = set(&[
            ("good.service", "[Unit]\nDescription=ok\n"),
            ("y.service", "ok\n\n@eval{%if{1}{%nosuch{}}}\n"),
            ("u-^{x}.service", "a\n@eval{%if{1}{x}\n"),
            ("^{x}-die.service", "a\nb\n@eval{%let{x}{\n%die{boom}}}\n"),
            ("^{y}.service", "[Unit]\nDescription=generic @{y}\n"),
        ]);
        let config = Config::default();
        let g = Generator::new(&t, &config, host(), vec!["r".into()]);
        let out = g
            .generate(&[WantedUnit {
                res: "r".into(),
                unit: "q-die.service".into(),
            }])
            .unwrap();
        let names: Vec<&str> = out.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["good.service", "q-die.service", "y.service"]);
        // The failing templates were skipped; the next one that matches made the unit (also
        // `y.service`, as if the bad plain template were not there).
        assert_eq!(out.files[1].template, "^{y}.service");
        assert_eq!(out.files[2].template, "^{y}.service");
        let errors: Vec<(String, Location, MacroError)> = out
            .errors
            .iter()
            .map(|e| (e.template.clone(), e.location, e.kind.clone()))
            .collect();
        assert_eq!(
            errors,
            [
                (
                    "u-^{x}.service".to_string(),
                    Location::Line(2),
                    MacroError::UnclosedBrace
                ),
                (
                    "y.service".to_string(),
                    Location::Line(3),
                    MacroError::UnknownMacro("nosuch".into())
                ),
                (
                    "^{x}-die.service".to_string(),
                    Location::Line(4),
                    MacroError::Die("boom".into())
                ),
            ]
        );
        assert_eq!(
            out.errors[1].to_string(),
            "template y.service (line 3): unknown %-macro '%nosuch{…}' (no builtin, MARS view \
             macro or macro file nosuch.tpl)"
        );
        // The syntax check alone finds the first two.
        assert_eq!(t.check().len(), 2);
        // An unknown @-macro only warns and keeps its body, as in MARS.
        let t = set(&[("x.service", "@foo{res}\n")]);
        let out = Generator::new(&t, &config, host(), vec![])
            .generate(&[])
            .unwrap();
        assert!(out.files[0].content.ends_with("###\nres\n"));
        assert_eq!(out.warnings, ["systemd function 'foo' is undefined"]);
    }

    /// MARS's `make_systemd_unit` tries the templates first; an installed unit file of the
    /// same name only counts when no template provides the name (changed: the unit file used
    /// to shadow the template).
    #[test]
    fn templates_win_over_existing_units() {
        let t = set(&[
            ("app.service", "[Unit]\nAfter=ext.mount other.mount\n"),
            ("ext.mount", "[Mount]\n"),
        ]);
        let config = Config {
            existing_units: ["ext.mount".to_string(), "other.mount".to_string()].into(),
            ..Config::default()
        };
        let out = Generator::new(&t, &config, host(), vec![])
            .generate(&[])
            .unwrap();
        let names: Vec<&str> = out.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["app.service", "ext.mount"]);
        assert_eq!(out.existing, ["other.mount"]);
    }

    /// The variables MARS's `make_env` sets, with its defaults.
    #[test]
    fn mars_variables() {
        let v = host_vars("h", "/mars", "10.0.0.1");
        let get = |k: &str| v.get(k).map(String::as_str);
        assert_eq!(get("cmd"), Some("systemd-trigger"));
        assert_eq!(get("0"), Some("systemd-trigger"));
        assert_eq!(get("callstack"), Some("systemd-trigger"));
        assert_eq!(get("real_host"), Some("h"));
        assert_eq!(get("timeout"), Some("600"));
        assert_eq!(get("threshold"), Some("10485760"));
        assert_eq!(get("window"), Some("60"));
        assert_eq!(get("stuck-seconds"), Some("3600"));
        assert_eq!(get("keep-backup-hours"), Some("168"));
        assert_eq!(get("keep-backup-seconds"), Some("604800"));
        assert_eq!(get("force"), Some("0"));
        assert_eq!(get("dry-run"), Some("0"));
        assert_eq!(get("verbose"), Some("0"));
        let v = host_vars_with(
            "h",
            "/mars",
            "",
            &RunOptions {
                cmd: "systemd-trigger-extern".into(),
                dry_run: true,
                verbose: 2,
                ..RunOptions::default()
            },
        );
        assert_eq!(v["cmd"], "systemd-trigger-extern");
        assert_eq!(v["callstack"], "systemd-trigger-extern");
        assert_eq!((v["dry-run"].as_str(), v["verbose"].as_str()), ("1", "2"));
    }

    #[test]
    fn choose_units_by_marker() {
        let t = set(&[
            (
                "mnt-@escvar{res}.mount",
                "# TESTING_STOP\n# MOUNTED_START\n# MOUNTED_STOP\n",
            ),
            ("mnt-@escvar{res}-load.service", "# TESTING_START\n"),
            (
                "app-@escvar{res}.script",
                "#!/bin/sh\n# DEFAULT_START\n# DEFAULT_STOP\n",
            ),
        ]);
        let config = Config::default();
        let g = Generator::new(&t, &config, host(), vec![]);
        let c = g.choose_units("my-res", "DEFAULT", None).unwrap();
        assert_eq!(
            (c.start.as_str(), c.stop.as_str()),
            ("app-my\\x2dres.script", "app-my\\x2dres.script")
        );
        let c = g.choose_units("my-res", "TESTING", None).unwrap();
        assert_eq!(
            (c.start.as_str(), c.stop.as_str()),
            ("mnt-my\\x2dres-load.service", "mnt-my\\x2dres.mount")
        );
        let c = g
            .choose_units("my-res", "MOUNTED", Some("TESTING"))
            .unwrap();
        assert_eq!(
            (c.start.as_str(), c.stop.as_str()),
            ("mnt-my\\x2dres.mount", "mnt-my\\x2dres.mount")
        );
        let c = g
            .choose_units("my-res", "nfs-my-res.service", None)
            .unwrap();
        assert_eq!(
            (c.start.as_str(), c.stop.as_str()),
            ("nfs-my\\x2dres.service", "nfs-my\\x2dres.service")
        );
        let c = g.choose_units("my-res", "", None).unwrap();
        assert_eq!((c.start.as_str(), c.stop.as_str()), ("", ""));
        assert_eq!(
            g.choose_units("r", "NOPE", None).unwrap_err(),
            Error::NoTemplateWithMarker("NOPE_START".into())
        );
        assert_eq!(
            g.marker_unit("r", "MOUNTED_START").unwrap().as_deref(),
            Some("mnt-r.mount")
        );
    }

    #[test]
    fn watcher_units_and_vars() {
        let t = TemplateSet::default();
        let config = Config::default();
        let g = Generator::new(&t, &config, host(), vec![]);
        assert_eq!(
            g.watcher_units("my-res", &DEFAULT_WATCHER_UNITS).unwrap(),
            ["mars-my\\x2dres-trigger.path"]
        );
        let v = g.resource_vars("r1");
        assert_eq!(
            (v["res"].as_str(), v["resdir"].as_str(), v["host"].as_str()),
            ("r1", "/mars/resource-r1", "node1")
        );
    }

    /// A template asks MARS's role and amount primitives (as a MARS template may, to start
    /// an application only on the acting primary, or to hold it while replay is behind): the
    /// generator answers them from the caller's view, with the values `marsadm view-…` gives.
    #[test]
    fn role_and_amount_primitives_in_a_template() {
        use crate::amount::{Amounts, Progress, Roles};
        use crate::view::{ResourceView, StateView};
        let t = set(&[(
            "app-@escvar{res}.service",
            "[Service]\n\
             Environment=ROLE=@eval{%if{%is-primary{}}{primary}{secondary}}\n\
             Environment=PRIMARIES=@eval{%nr-primary{}}\n\
             Environment=BEHIND=@eval{%work-rest{}}:@eval{%replay-vector{/}}\n\
             Environment=READY=@eval{%work-threshold-reached{}}:@eval{%fetch-percent{}}\n\
             Environment=RATE=@eval{%fetch-rate{}}:@eval{%fetch-remain{}}:@eval{%sync-reached{}}\n",
        )]);
        let config = Config::default();
        let amounts = Amounts {
            size: 1 << 30,
            sync: None,
            fetch: Some(Progress {
                done: 20 << 20,
                total: 40 << 20,
                rate: 4 << 20,
            }),
            replay: Some(Progress {
                done: 10 << 20,
                total: 40 << 20,
                rate: 0,
            }),
        };
        let view = |acting: &str| StateView {
            host: "node1".into(),
            uuid: None,
            resources: [(
                "r1".to_string(),
                ResourceView {
                    primary: Some(acting.into()),
                    roles: Some(Roles {
                        acting: [acting.to_string()].into(),
                        members: vec!["node1".into(), "node2".into()],
                    }),
                    amounts: Some(amounts),
                    ..Default::default()
                },
            )]
            .into(),
        };
        let mut vars = host();
        vars.insert("threshold".into(), "10485760".into());
        let wanted = [WantedUnit {
            res: "r1".into(),
            unit: "app-r1.service".into(),
        }];
        let secondary = Generator::new(&t, &config, vars.clone(), vec!["r1".into()])
            .with_view(std::sync::Arc::new(view("node2")))
            .generate(&wanted)
            .unwrap();
        assert!(secondary.errors.is_empty(), "{:?}", secondary.errors);
        assert!(
            secondary.files[0].content.ends_with(
                "Environment=ROLE=secondary\nEnvironment=PRIMARIES=1\n\
                 Environment=BEHIND=31457280:10485760/20971520\n\
                 Environment=READY=0:50.25\nEnvironment=RATE=4194304:5:1\n"
            ),
            "{}",
            secondary.files[0].content
        );
        let primary = Generator::new(&t, &config, vars, vec!["r1".into()])
            .with_view(std::sync::Arc::new(view("node1")))
            .generate(&wanted)
            .unwrap();
        assert!(primary.files[0]
            .content
            .contains("Environment=ROLE=primary\n"));
    }

    #[test]
    fn duplicate_template_names() {
        let e = TemplateSet::new(vec![
            Template::new("a.service", ""),
            Template::new("a.service", ""),
        ])
        .unwrap_err();
        assert_eq!(e, Error::DuplicateTemplate("a.service".into()));
    }
}
