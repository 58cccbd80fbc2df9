//! `marsadm view-NAME RES [ARG]`: asks marsd for the view and prints the macro's value, as
//! MARS's `view_cmd` does (a value ends in exactly one newline; an empty value prints
//! nothing). RES may be `all` or a comma list: each resource under MARS's
//! `--------- resource RES SIZE [N/M]` line, framed by the macro's `-header`, `-global` and
//! `-footer` macros where they exist.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mars_api::{ClusterView, Reply, Request, ResourceView};

use super::{Ctx, Eval, Macro, Source};
use crate::error::{usage, TimedOut};
use crate::{resource, Cli};

/// How often a `wait-*` macro looks again.
const WAIT_INTERVAL: Duration = Duration::from_millis(100);

/// The daemon behind the CLI, for what the view does not carry.
struct Daemon<'a>(&'a Cli);

impl Source for Daemon<'_> {
    fn link(&self, key: &str) -> Result<Option<String>> {
        self.0.get_link(key)
    }
    fn version(&self) -> Result<String> {
        match self.0.call(&Request::Ping)? {
            Reply::Pong { version, .. } => Ok(version),
            r => bail!("unexpected answer from marsd: {r:?}"),
        }
    }
    fn mount_of(&self, device: &str) -> Option<(String, String, String)> {
        mount_of(device, &std::fs::read_to_string("/proc/self/mounts").ok()?)
    }
}

/// The entry of `mounts` (the format of `/proc/self/mounts`) whose source is `device` or the
/// same file (`/dev/mars/RES` may be a link to the loop device the kernel names).
pub fn mount_of(device: &str, mounts: &str) -> Option<(String, String, String)> {
    let want = std::fs::canonicalize(device).ok();
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (src, mp, fs, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let same = src == device
            || want
                .as_ref()
                .is_some_and(|w| std::fs::canonicalize(src).ok().as_ref() == Some(w));
        // /proc/self/mounts escapes blanks in paths as \040.
        same.then(|| (mp.replace("\\040", " "), fs.to_string(), opts.to_string()))
    })
}

/// The context of macro `name` (with its argument) on resource `res` of the view `v`, with the
/// command line's `--window`, `--stuck-seconds` and `--threshold`.
fn context<'a>(
    cli: &Cli,
    v: &'a ClusterView,
    res: Option<&'a ResourceView>,
    name: &'a str,
    arg: Option<&'a str>,
    src: &'a Daemon<'a>,
) -> Ctx<'a> {
    Ctx {
        view: v,
        res,
        host: &v.host,
        name,
        arg,
        window: cli.window,
        now: now(),
        src,
        stuck_seconds: cli.stuck_seconds,
        threshold: cli.threshold,
        warnings: Default::default(),
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `args`: `view-NAME`, then the operands (clap's external subcommand).
pub fn view_macro(cli: &Cli, args: &[String]) -> Result<()> {
    let cmd = &args[0];
    let Some(name) = cmd.strip_prefix("view-") else {
        usage!("unknown command {cmd:?}; see `marsadm --help`");
    };
    let m = match super::find(name) {
        Some(m) => m,
        None => match super::excluded(name) {
            Some(why) => {
                bail!("view-{name} is one of MARS's macros that mars does not answer: {why}")
            }
            None => usage!("{}", super::unknown(name)),
        },
    };
    if args[1..].iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: marsadm {}\n{}", super::usage(m), m.help);
        return Ok(());
    }
    let (res, arg) = match &args[1..] {
        [res] => (res.as_str(), None),
        [res, a] if m.arg.is_some() => (res.as_str(), Some(a.as_str())),
        _ => usage!("usage: marsadm {}", super::usage(m)),
    };
    if let Some(i) = &m.instead {
        eprintln!("marsadm: deprecated: please use macro '{i}' instead of '{name}'");
    }
    let many = res == "all" || res.contains(',');
    let names: Vec<String> = if res == "all" {
        Vec::new()
    } else {
        res.split(',')
            .map(|r| Ok(resource(r)?.to_string()))
            .collect::<Result<_>>()?
    };
    if let Eval::Wait { target, on } = &m.eval {
        for r in &names {
            wait(cli, r, target, *on)?;
        }
        return Ok(());
    }
    let one = (!many && !m.all_resources).then(|| names[0].clone());
    let v = view(cli, one.as_deref())?;
    let src = Daemon(cli);
    let ctx = |r, name| context(cli, &v, r, name, arg, &src);
    if !many {
        let r = v
            .resources
            .iter()
            .find(|r| r.name == names[0])
            .with_context(|| format!("resource {} not found", names[0]))?;
        let value = eval(m, &ctx(Some(r), name))?;
        return print(cli, m, &r.name, &value);
    }
    let frame = |suffix: &str| -> Result<()> {
        if let Some(g) = super::find(&format!("{name}-{suffix}")) {
            let value = eval(g, &ctx(None, &g.name))?;
            print(cli, g, "", &value)?;
        }
        Ok(())
    };
    if let Some(missing) = names
        .iter()
        .find(|n| !v.resources.iter().any(|r| &r.name == *n))
    {
        bail!("resource {missing} not found");
    }
    let chosen = v
        .resources
        .iter()
        .filter(|r| names.is_empty() || names.contains(&r.name));
    if cli.json {
        // One document for all of them, so that a script parses one JSON value whatever
        // `all` expands to.
        let values = chosen
            .map(|r| {
                let value = eval(m, &ctx(Some(r), name))?;
                Ok(serde_json::json!({ "resource": r.name, "value": super::json(m, &value) }))
            })
            .collect::<Result<Vec<_>>>()?;
        return cli.emit(&serde_json::json!({ "macro": m.name, "values": values }));
    }
    frame("header")?;
    for r in chosen {
        let c = ctx(Some(r), name);
        let head = eval(super::find("default-resource").expect("in the table"), &c)?;
        println!("--------- resource {head}");
        print(cli, m, &r.name, &eval(m, &c)?)?;
    }
    frame("global")?;
    frame("footer")?;
    Ok(())
}

/// What the templates' view primitives see when `marsadm systemd-generate` runs beside a
/// running marsd: every local resource from marsd's view, with the roles, amounts and
/// emergency state computed as `view-…` computes them (the same values marsd's own
/// generation would use, up to what changed in between).
pub fn state_view(cli: &Cli) -> Result<mars_unitgen::StateView> {
    let v = view(cli, None)?;
    let src = Daemon(cli);
    let mut state = mars_unitgen::StateView {
        host: v.host.clone(),
        uuid: v.cluster.as_ref().map(|c| c.uuid.clone()),
        ..Default::default()
    };
    for r in &v.resources {
        let c = context(cli, &v, Some(r), "", None, &src);
        state.resources.insert(
            r.name.clone(),
            mars_unitgen::ResourceView {
                primary: super::prim::designated(&c)?.map(str::to_string),
                emergency: super::prim::is_emergency(&c, &v.host)?,
                units: r
                    .systemd
                    .as_ref()
                    .map(|sd| (sd.start_unit.clone(), sd.stop_unit.clone())),
                roles: Some(super::prim::roles(&c)?),
                amounts: Some(super::prim::amounts(&c)?),
            },
        );
    }
    Ok(state)
}

/// For a command that takes `all` or a comma list in MARS and prints per resource (as MARS's
/// `do_all_res`): each chosen resource's name and its `--------- resource …` line's text (the
/// `default-resource` macro, `RES SIZE [N/M]`), in the view's order.
pub fn resource_heads(cli: &Cli, res: &str) -> Result<Vec<(String, String)>> {
    let v = view(cli, None)?;
    let names: Vec<String> = if res == "all" {
        Vec::new()
    } else {
        res.split(',')
            .map(|r| Ok(resource(r.trim())?.to_string()))
            .collect::<Result<_>>()?
    };
    if let Some(missing) = names
        .iter()
        .find(|n| !v.resources.iter().any(|r| &r.name == *n))
    {
        bail!("resource {missing} not found");
    }
    let src = Daemon(cli);
    let head = super::find("default-resource").expect("in the table");
    v.resources
        .iter()
        .filter(|r| names.is_empty() || names.contains(&r.name))
        .map(|r| {
            let c = context(cli, &v, Some(r), &head.name, None, &src);
            Ok((r.name.clone(), eval(head, &c)?))
        })
        .collect()
}

/// Evaluates `m`, then prints its warnings (MARS's `%warn{…}`) on stderr as MARS does.
fn eval(m: &Macro, c: &Ctx) -> Result<String> {
    let value = super::eval(m, c)?;
    for w in c.warnings.borrow_mut().drain(..) {
        eprint!("WARNING: {w}");
    }
    Ok(value)
}

fn view(cli: &Cli, res: Option<&str>) -> Result<ClusterView> {
    let res = res.map(resource).transpose()?;
    match cli.call(&Request::View {
        res,
        window: Some(cli.window),
    })? {
        Reply::View(v) => Ok(v),
        r => bail!("unexpected answer from marsd: {r:?}"),
    }
}

/// MARS's output: the value and one newline (none for an empty value); `--json`: the typed
/// value.
fn print(cli: &Cli, m: &Macro, res: &str, value: &str) -> Result<()> {
    if cli.json {
        return cli.emit(&serde_json::json!({
            "resource": res,
            "macro": m.name,
            "value": super::json(m, value),
        }));
    }
    if !value.is_empty() {
        println!("{}", value.strip_suffix('\n').unwrap_or(value));
    }
    Ok(())
}

/// `wait-{is,todo}-X-{on,off}`: polls until macro `target` of `res` reads 1 (on) or 0.
fn wait(cli: &Cli, res: &str, target: &str, on: bool) -> Result<()> {
    let t = super::find(target).context("wait target not in the table")?;
    let want = if on { "1" } else { "0" };
    let deadline = Instant::now() + Duration::from_secs(cli.timeout);
    let src = Daemon(cli);
    loop {
        let v = view(cli, Some(res))?;
        let r = v.resources.first().context("daemon returned no resource")?;
        let c = context(cli, &v, Some(r), target, None, &src);
        if super::eval(t, &c)? == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(TimedOut(format!(
                "{target} of {res} is not {want} after {}s",
                cli.timeout
            ))
            .into());
        }
        std::thread::sleep(WAIT_INTERVAL);
    }
}
