//! `marsadm`: the admin command line. Command names, arguments and the `view` vocabulary follow
//! the original MARS `marsadm`, so that MARS operators feel at home.

mod client;
mod demo;
mod view;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mars_api::{Reply, Request};
use mars_config::{parse_size, ResourceName};

#[derive(Debug, Parser)]
#[command(
    name = "marsadm",
    version,
    about = "Administer mars: geo-redundant block replication"
)]
pub struct Cli {
    /// Root directory of the marsd to talk to.
    #[arg(
        long,
        env = "MARS_ROOT",
        default_value = "/var/lib/mars",
        global = true
    )]
    root: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the daemon.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
    /// Skip safety checks (reserved: no command uses it yet).
    #[arg(long, global = true)]
    force: bool,
    /// Check a command without changing anything (reserved: refused by every command so far).
    #[arg(long, global = true)]
    dry_run: bool,
    /// Seconds after which a silent member counts as not alive in `view`.
    #[arg(long, default_value_t = 60, global = true)]
    window: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a new cluster with this host as its first member (run once).
    CreateCluster {
        /// Address to advertise to peers instead of marsd's --listen address.
        #[arg(long)]
        ip: Option<String>,
    },
    /// Join the cluster that the host at PEER (ADDR[:PORT], default port 7777) belongs to.
    JoinCluster { peer: String },
    /// Leave the cluster (refused while this host holds resources).
    LeaveCluster,
    /// Wait until every member answered (at most --timeout seconds).
    WaitCluster,
    /// Fetch every member's metadata changes now.
    UpdateCluster,
    /// List the members and their addresses.
    LowlevelLsHostIps,
    /// Remove a dead member from the cluster.
    LowlevelDeleteHost { host: String },
    /// Set the cluster-wide limit of concurrent full syncs (0 = unlimited).
    SetGlobalSyncLimitValue { n: u32 },
    /// Show the cluster-wide limit of concurrent full syncs.
    GetGlobalSyncLimitValue,
    /// Experts: set a replicated metadata key.
    #[command(hide = true)]
    SetLink { key: String, value: String },
    /// Experts: print a replicated metadata key.
    #[command(hide = true)]
    GetLink { key: String },
    /// Experts and benchmarks: set many keys, read as `KEY VALUE` lines from standard input.
    #[command(hide = true)]
    LowlevelSetLinks,
    /// Create a resource on DISK (file or block device); this host becomes primary.
    CreateResource {
        res: String,
        disk: PathBuf,
        /// Logical size (K/M/G/T suffixes); default: the disk's size.
        size: Option<String>,
    },
    /// Show the state of one resource, or of all.
    View { res: Option<String> },
    /// Close the current logfile and continue in a new one.
    LogRotate { res: String },
    /// Start a throw-away local mars host, write through NBD and show how to use it.
    Demo(demo::DemoArgs),
    /// view-MACRO RES: one value, e.g. `view-role vm1`, `view-nbd-uri vm1`.
    #[command(external_subcommand)]
    Other(Vec<String>),
}

/// Replicated key of the global sync limit (MARS: `defaults/sync-limit`).
const SYNC_LIMIT_KEY: &str = "defaults/sync-limit";

fn resource(name: &str) -> Result<ResourceName> {
    ResourceName::new(name).map_err(Into::into)
}

/// Paths are resolved here, because the daemon's working directory is not ours.
fn absolute(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Ok(c);
    }
    Ok(std::env::current_dir()?.join(p))
}

impl Cli {
    fn call(&self, req: &Request) -> Result<Reply> {
        // Commands that wait (wait-cluster …) are bounded by the daemon with the same timeout;
        // give its answer time to arrive.
        client::call(&self.root, req, Duration::from_secs(self.timeout + 10))
    }

    fn no_dry_run(&self, what: &str) -> Result<()> {
        if self.dry_run {
            bail!("--dry-run is not supported by {what} yet; nothing was changed");
        }
        Ok(())
    }

    fn print_done(&self, reply: Reply) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(&reply)?);
        } else if let Reply::Done { message } = reply {
            println!("{message}");
        }
        Ok(())
    }

    fn run(&self) -> Result<()> {
        match &self.cmd {
            Cmd::CreateCluster { ip } => {
                self.no_dry_run("create-cluster")?;
                let r = self.call(&Request::CreateCluster { ip: ip.clone() })?;
                self.print_done(r)
            }
            Cmd::CreateResource { res, disk, size } => {
                self.no_dry_run("create-resource")?;
                let res = resource(res)?;
                let size = size
                    .as_deref()
                    .map(parse_size)
                    .transpose()
                    .context("SIZE")?;
                let disk = absolute(disk)?;
                let r = self.call(&Request::CreateResource { res, disk, size })?;
                self.print_done(r)
            }
            Cmd::JoinCluster { peer } => {
                self.no_dry_run("join-cluster")?;
                let r = self.call(&Request::JoinCluster { peer: peer.clone() })?;
                self.print_done(r)
            }
            Cmd::LeaveCluster => {
                self.no_dry_run("leave-cluster")?;
                let r = self.call(&Request::LeaveCluster {
                    timeout: self.timeout,
                })?;
                self.print_done(r)
            }
            Cmd::WaitCluster => {
                let r = self.call(&Request::WaitCluster {
                    timeout: self.timeout,
                })?;
                self.print_done(r)
            }
            Cmd::UpdateCluster => {
                let r = self.call(&Request::UpdateCluster {
                    timeout: self.timeout,
                })?;
                self.print_done(r)
            }
            Cmd::LowlevelLsHostIps => {
                let Reply::View(v) = self.call(&Request::View {
                    res: None,
                    window: Some(self.window),
                })?
                else {
                    bail!("unexpected answer from marsd");
                };
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&v.members)?);
                } else {
                    for m in &v.members {
                        println!("{} {}", m.host, m.address);
                    }
                }
                Ok(())
            }
            Cmd::LowlevelDeleteHost { host } => {
                self.no_dry_run("lowlevel-delete-host")?;
                let r = self.call(&Request::DeleteHost { host: host.clone() })?;
                self.print_done(r)
            }
            Cmd::SetGlobalSyncLimitValue { n } => {
                self.no_dry_run("set-global-sync-limit-value")?;
                self.set_links(vec![(SYNC_LIMIT_KEY.into(), n.to_string())])
            }
            Cmd::GetGlobalSyncLimitValue => {
                let v = self.get_link(SYNC_LIMIT_KEY)?;
                println!("{}", v.unwrap_or_else(|| "0".into()));
                Ok(())
            }
            Cmd::SetLink { key, value } => {
                self.no_dry_run("set-link")?;
                self.set_links(vec![(key.clone(), value.clone())])
            }
            Cmd::GetLink { key } => match self.get_link(key)? {
                Some(v) => {
                    println!("{v}");
                    Ok(())
                }
                None => bail!("no metadata key {key:?}"),
            },
            Cmd::LowlevelSetLinks => {
                let mut pairs = Vec::new();
                for line in std::io::stdin().lines() {
                    let line = line?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let (k, v) = line
                        .split_once(' ')
                        .with_context(|| format!("line {line:?} is not `KEY VALUE`"))?;
                    pairs.push((k.to_string(), v.to_string()));
                }
                // Requests are limited to 64 KiB: send batches below that.
                let mut batch = Vec::new();
                let mut bytes = 0;
                for (k, v) in pairs {
                    bytes += k.len() + v.len() + 8;
                    batch.push((k, v));
                    if bytes > 48 << 10 {
                        self.set_links(std::mem::take(&mut batch))?;
                        bytes = 0;
                    }
                }
                if !batch.is_empty() {
                    self.set_links(batch)?;
                }
                Ok(())
            }
            Cmd::View { res } => self.view(res.as_deref()),
            Cmd::LogRotate { res } => {
                self.no_dry_run("log-rotate")?;
                let r = self.call(&Request::LogRotate {
                    res: resource(res)?,
                })?;
                self.print_done(r)
            }
            Cmd::Demo(args) => demo::run(self, args),
            Cmd::Other(args) => {
                let cmd = &args[0];
                let Some(mac) = cmd.strip_prefix("view-") else {
                    bail!("unknown command {cmd:?}; see `marsadm --help`");
                };
                let [_, res] = &args[..] else {
                    bail!("usage: marsadm {cmd} RES");
                };
                self.view_macro(mac, res)
            }
        }
    }

    fn set_links(&self, pairs: Vec<(String, String)>) -> Result<()> {
        let r = self.call(&Request::SetLinks { pairs })?;
        if self.json {
            self.print_done(r)
        } else {
            Ok(())
        }
    }

    fn get_link(&self, key: &str) -> Result<Option<String>> {
        match self.call(&Request::GetLink { key: key.into() })? {
            Reply::Value { value } => Ok(value),
            _ => bail!("unexpected answer from marsd"),
        }
    }

    fn view(&self, res: Option<&str>) -> Result<()> {
        let all = matches!(res, None | Some("all"));
        let res = if all {
            None
        } else {
            res.map(resource).transpose()?
        };
        let Reply::View(v) = self.call(&Request::View {
            res,
            window: Some(self.window),
        })?
        else {
            bail!("unexpected answer from marsd");
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", view::cluster_text(&v, all));
        }
        Ok(())
    }

    fn view_macro(&self, mac: &str, res: &str) -> Result<()> {
        if !view::MACROS.contains(&mac) {
            bail!(
                "unknown view macro {mac:?}; known: {}",
                view::MACROS.join(", ")
            );
        }
        let name = resource(res)?;
        let Reply::View(v) = self.call(&Request::View {
            res: Some(name),
            window: None,
        })?
        else {
            bail!("unexpected answer from marsd");
        };
        let r = v.resources.first().context("daemon returned no resource")?;
        let value = view::macro_value(r, mac)?;
        if self.json {
            println!("{}", serde_json::json!({ "resource": r.name, mac: value }));
        } else {
            println!("{value}");
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("marsadm: {e:#}");
            if cli.json {
                let kind = e
                    .downcast_ref::<client::Refused>()
                    .map_or(mars_api::ErrorKind::Failed, |r| r.kind);
                println!(
                    "{}",
                    serde_json::json!({ "error": kind, "message": format!("{e:#}") })
                );
            }
            ExitCode::FAILURE
        }
    }
}
