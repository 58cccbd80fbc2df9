//! `marsadm systemd-generate`: the template generator alone, without systemctl. It writes
//! what `marsd` would write for the given units (same variables, same choice of units, same
//! headers), so templates can be checked before a resource uses them. MARS's view primitives
//! in templates (`%get-primary{}`, `%is-primary{}`, the amounts …) are answered from the
//! running marsd's view at `--root` when one answers; without one, each says so (a template
//! using one is left out with that reason, the others are generated).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mars_config::ResourceName;
use mars_unitgen::{fs as ufs, Config, Generator, WantedUnit};

/// The replicated key `resource-RES/LEAF` (the schema is `mars_engine::keys`; the CLI only
/// reads these through `get-link`).
pub fn key(res: &ResourceName, leaf: &str) -> String {
    format!("resource-{res}/{leaf}")
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Resource the units are generated for.
    res: String,
    /// Unit names (a bare resource name in them is escaped) or marker names such as DEFAULT.
    #[arg(required = true)]
    units: Vec<String>,
    /// Template search path, colon-separated (each entry's systemd-templates/ subdirectory is
    /// used if it exists).
    #[arg(long)]
    templates: String,
    /// Directory for the generated units.
    #[arg(long)]
    output: PathBuf,
    /// Directory for generated .script pseudo-units (default: --output).
    #[arg(long)]
    scripts_output: Option<PathBuf>,
    /// The host name templates see as @{host} (default: this machine's short name).
    #[arg(long)]
    host: Option<String>,
    /// The address templates see as @{ip}.
    #[arg(long, default_value = "")]
    ip: String,
}

fn short_hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    raw.trim().split('.').next().unwrap_or_default().to_string()
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// The view primitives' answer when no marsd answers: not offered, with the reason.
#[derive(Debug)]
struct NoDaemon {
    why: String,
}

impl mars_unitgen::View for NoDaemon {
    fn primitive(
        &self,
        _name: &str,
        _vars: &mars_unitgen::Vars,
        _args: &[String],
    ) -> Option<std::result::Result<String, String>> {
        None
    }

    fn why_not_offered(&self) -> Option<String> {
        Some(self.why.clone())
    }
}

pub fn generate(cli: &crate::Cli, args: &GenerateArgs, json: bool) -> Result<()> {
    let root = cli.root.as_path();
    let res = ResourceName::new(&args.res)?;
    let host = args.host.clone().unwrap_or_else(short_hostname);
    let output = absolute(&args.output)?;
    let scripts = absolute(args.scripts_output.as_ref().unwrap_or(&args.output))?;
    // Absolute, so the `### GENERATED FROM:` header names the template wherever it is read.
    let search = ufs::search_path(Some(&args.templates), None, Path::new("/etc/marsadm"))
        .iter()
        .map(|p| absolute(p))
        .collect::<Result<Vec<_>>>()?;
    let templates = ufs::load_templates(&search).context("loading templates")?;
    // Malformed templates are reported with the generation's errors and left out (MARS: one
    // bad template does not stop the others).
    let own = [output.clone(), scripts.clone()];
    let system_dirs: Vec<PathBuf> = ufs::SYSTEM_UNIT_DIRS.iter().map(PathBuf::from).collect();
    let config = Config {
        unit_dir: output.display().to_string(),
        scripts_dir: scripts.display().to_string(),
        existing_units: ufs::existing_unit_names(&system_dirs, &own)?,
        ..Config::default()
    };
    // MARS's variables: `cmd` is the command being run.
    let opts = mars_unitgen::RunOptions {
        cmd: "systemd-generate".into(),
        ..Default::default()
    };
    let vars = mars_unitgen::host_vars_with(&host, &root.display().to_string(), &args.ip, &opts);
    // The resource state the view primitives read: the running marsd's, else none (each
    // primitive a template uses then says why).
    let state: std::sync::Arc<dyn mars_unitgen::View> = match crate::macros::run::state_view(cli) {
        Ok(state) => std::sync::Arc::new(state),
        Err(e) => std::sync::Arc::new(NoDaemon {
            why: format!(
                "it reads the resource's state from marsd, and none answers at {} ({e}); \
                     start marsd, or generate with `marsadm systemd-trigger`",
                root.display()
            ),
        }),
    };
    let generator =
        Generator::new(&templates, &config, vars, vec![res.to_string()]).with_view(state);
    let mut wanted = Vec::new();
    for u in &args.units {
        let choice = generator.choose_units(res.as_str(), u, None)?;
        for unit in [choice.start, choice.stop] {
            if !wanted.iter().any(|w: &WantedUnit| w.unit == unit) {
                wanted.push(WantedUnit {
                    res: res.to_string(),
                    unit,
                });
            }
        }
    }
    let generation = generator.generate(&wanted)?;
    let report = ufs::write_generated(&generation.files)?;
    for w in &generation.warnings {
        eprintln!("marsadm: template warning: {w}");
    }
    for e in &generation.errors {
        eprintln!("marsadm: template left out: {e}");
    }
    for u in &generation.unresolved {
        eprintln!("marsadm: no template or unit provides {u}");
    }
    if json {
        let files: Vec<_> = generation
            .files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "unit": f.name,
                    "path": f.path,
                    "template": f.template_path,
                    "changed": report.changed.contains(&f.name),
                })
            })
            .collect();
        let out = serde_json::json!({
            "schema": mars_api::SCHEMA_VERSION,
            "files": files,
            "unresolved": generation.unresolved,
            "existing": generation.existing,
            "errors": generation.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for f in &generation.files {
            let what = if report.changed.contains(&f.name) {
                "written"
            } else {
                "unchanged"
            };
            println!("{what} {} (from {})", f.path, f.template_path);
        }
    }
    Ok(())
}
