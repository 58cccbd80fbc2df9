//! `marsadm`: the admin command line. Command names, arguments and the `view` vocabulary follow
//! the original MARS `marsadm`, so that MARS operators feel at home.

mod check;
mod client;
mod compat;
mod demo;
mod error;
mod generate;
mod macros;
mod merge;
mod progress;
mod systemd;
mod view;
mod wait;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use error::usage;
use mars_api::{Reply, Request, SwitchKind};
use mars_config::{parse_size, ResourceName};
use serde::Serialize;

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
    /// Seconds to wait for the daemon, or for the condition of wait-cluster and wait-resource
    /// (MARS's -1: no limit).
    #[arg(
        long,
        default_value = "30",
        global = true,
        value_parser = compat::parse_timeout,
        allow_negative_numbers = true
    )]
    timeout: u64,
    /// Skip safety checks: leave-resource, delete-resource, lowlevel-delete-host of a live
    /// member; `primary --force` fails over. Twice (`--force --force`) confirms a failover
    /// that loses the writes of a reachable old primary ahead of this replica.
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    force: u8,
    /// Check a command as it would run and say what it would do, changing nothing (no
    /// metadata, control file, logfile, disk byte or unit); a refusal is the real one.
    #[arg(long, global = true)]
    dry_run: bool,
    /// Seconds after which a silent member counts as not alive in `view`.
    #[arg(long, default_value_t = 60, global = true)]
    window: u64,
    /// With `all` or a comma list of resources: how many run at once (MARS's --parallel;
    /// 0: all at once).
    #[arg(long, default_value_t = 16, global = true)]
    parallel: usize,
    /// More words from some commands (repeatable; MARS's --verbose, -v, --verbose=N).
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// MARS: allow a handover while a sync runs somewhere. A sync on another member never
    /// holds back a handover here; a replica that is still syncing cannot take over anyway.
    #[arg(long, global = true)]
    ignore_sync: bool,
    /// Bytes below which an amount counts as reached in the `*-threshold-reached` view macros
    /// (K/M/G/T suffixes; MARS's default 10 MiB).
    #[arg(long, global = true, default_value = "10M", value_parser = parse_size_arg)]
    threshold: u64,
    /// Seconds a fetch with something left may make no progress before the view macros that
    /// show the fetch line (fetch-line, replinfo, default …) warn that replay appears stuck
    /// (MARS's --stuck-seconds).
    #[arg(long, global = true, default_value_t = 3600)]
    stuck_seconds: u64,
    /// MARS: act as if on HOST. marsd speaks for its own host only: accepted when HOST is this
    /// host, refused otherwise.
    /// (Given as `--host`: `compat::normalize` renames it, as systemd-generate has its own.)
    #[arg(long = "as-host", global = true, hide = true, value_name = "HOST")]
    as_host: Option<String>,
    /// MARS's --ip-HOST=IP (and --ip=IP before the command): the address of HOST, for
    /// join-cluster and lowlevel-set-host-ip.
    #[arg(long = "peer-ip", global = true, hide = true, value_name = "[HOST=]IP")]
    peer_ip: Vec<String>,
    /// MARS: evaluate TEXT as a view macro (not supported yet: refused).
    #[arg(long = "macro", global = true, value_name = "TEXT")]
    macro_text: Option<String>,
    #[command(flatten)]
    mars_only: compat::MarsOnly,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The two steps of `rotate-ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RotatePhase {
    /// Make the next CA and announce it (every member trusts it too).
    Start,
    /// Retire the old CA once every member's certificate is from the next one.
    Finish,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a new cluster with this host as its first member (run once).
    CreateCluster {
        /// Address ADDR[:PORT] to advertise to peers instead of marsd's configured one
        /// (`advertise`, else `listen` in marsd.toml).
        #[arg(long)]
        ip: Option<String>,
    },
    /// Join the cluster that the host at PEER (ADDR[:PORT], default port 7777) belongs to.
    /// With --force on a host the other members deleted while it ran (lowlevel-delete-host):
    /// join that cluster again, keeping this host's resources.
    JoinCluster {
        peer: String,
        /// MARS's form `join-cluster HOST IP`: PEER is the host's name, IP its address.
        peer_address: Option<String>,
        /// The join token `marsadm join-token` printed on that host (one use; verifies the
        /// host before anything is sent to it). Not with --insecure.
        #[arg(long, env = "MARS_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Address ADDR[:PORT] to advertise to peers instead of marsd's configured one
        /// (`advertise`, else `listen` in marsd.toml).
        #[arg(long)]
        ip: Option<String>,
    },
    /// Renew this host's certificate: a new key, certified here if this host holds the CA's
    /// key, else by --via HOST or the first member that does. Members switch over at once.
    RenewCertificate {
        #[arg(long)]
        via: Option<String>,
    },
    /// Rotate the cluster CA without downtime (on a host holding its key): `start` makes the
    /// next CA, which every member trusts too; then `renew-certificate` on every member; then
    /// `finish` retires the old CA.
    RotateCa {
        #[arg(value_enum)]
        phase: RotatePhase,
    },
    /// Print a one-time token for `join-cluster --token` (on a host holding the cluster CA).
    JoinToken {
        /// How long the token stays valid: seconds, or a number with s, m, h or d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
    },
    /// Leave the cluster (refused while this host holds resources).
    LeaveCluster,
    /// Wait until every member answered (at most --timeout seconds). With RES (MARS): RES
    /// must exist here; every member of the cluster is waited for, those of RES included.
    #[command(alias = "wait-connect")]
    WaitCluster { res: Option<String> },
    /// Fetch every member's metadata changes now (with RES: and check that RES is known).
    UpdateCluster { res: Option<String> },
    /// Set the address ADDR[:PORT] of member HOST (MARS: IP, or --ip-HOST=IP); peers connect
    /// to it from now on.
    LowlevelSetHostIp { host: String, ip: Option<String> },
    /// List the members and their addresses.
    LowlevelLsHostIps,
    /// MARS: print this cluster's id, its members with their addresses and every resource
    /// (compare two clusters' resource names by hand).
    MergeClusterList,
    /// Merge this cluster into the cluster of the host at PEER (ADDR[:PORT]; MARS's form
    /// `merge-cluster HOST IP` checks that the host there is HOST). Run on a host holding this
    /// cluster's CA key, with a join token of the other cluster (`marsadm join-token` on a host
    /// holding its CA key). Host and resource names must be disjoint, `defaults/*` equal, every
    /// member of both clusters reachable. Resources keep replicating; this cluster's hosts
    /// take the other's id and certificates of its CA, then this cluster's CA is retired.
    MergeCluster {
        peer: String,
        /// MARS's form `merge-cluster HOST IP`: PEER is the host's name, IP its address.
        peer_address: Option<String>,
        /// A join token of the other cluster (one use; verifies the other cluster before
        /// anything is sent to it). Required.
        #[arg(long, env = "MARS_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Only the checks of merge-cluster, on both sides (the token is not used up).
    MergeClusterCheck {
        peer: String,
        /// MARS's form `merge-cluster-check HOST IP`.
        peer_address: Option<String>,
        /// A join token of the other cluster (checked, not used up). Required.
        #[arg(long, env = "MARS_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// MARS: split this cluster into its groups (hosts connected by shared resources). Run on
    /// a host holding the CA key. The checks first (every member reachable, no CA rotation,
    /// merge or split in progress); with --dry-run then only the groups and which one keeps
    /// the cluster id. One group only: nothing to split (exit 0). Without --dry-run every
    /// other group becomes a cluster of its own (a new id and CA, issued by its first host);
    /// each side forgets the other's hosts and resources.
    SplitCluster,
    /// Remove a dead member from the cluster; a live one (alive in `view` with the same
    /// --window, or connected) only with --force.
    LowlevelDeleteHost { host: String },
    /// Set the cluster-wide limit of concurrent full syncs (0 = unlimited).
    #[command(alias = "set-sync-limit-value")]
    SetGlobalSyncLimitValue { n: u32 },
    /// Show the cluster-wide limit of concurrent full syncs.
    #[command(alias = "get-sync-limit-value")]
    GetGlobalSyncLimitValue,
    /// Store the cluster-wide list of logfile compressions (MARS names, `|`-separated:
    /// COMPRESS_LZ4|COMPRESS_LZO|COMPRESS_ZLIB). Stored only: logfiles are not compressed yet.
    SetGlobalEnabledLogCompressions { features: Option<String> },
    /// Set the cluster-wide list of network compressions the fetch and sync streams may use
    /// (COMPRESS_LZ4, COMPRESS_ZSTD; COMPRESS_LZO and COMPRESS_ZLIB are accepted and ignored;
    /// lz4 is preferred where both sides enable both). Takes effect with each stream's next
    /// session.
    SetGlobalEnabledNetCompressions { features: Option<String> },
    /// Store the cluster-wide list of logfile digests to disable (CHKSUM_CRC32, CHKSUM_CRC32C,
    /// CHKSUM_MD5, CHKSUM_MD5_OLD, CHKSUM_SHA1; stored only: marsd's logfiles use CRC32C).
    SetGlobalDisabledLogDigests { features: Option<String> },
    /// Store the cluster-wide list of network digests to disable (as above; stored only:
    /// marsd's sync compares chunks by its own digest).
    SetGlobalDisabledNetDigests { features: Option<String> },
    /// Set after how many seconds of silence a member no longer holds back log deletion.
    SetGlobalUnreachableLimitValue { seconds: u64 },
    /// Show after how many seconds of silence a member no longer holds back log deletion.
    GetGlobalUnreachableLimitValue,
    /// Experts: set a replicated metadata key.
    #[command(hide = true)]
    SetLink { key: String, value: String },
    /// Experts: print a replicated metadata key.
    #[command(hide = true)]
    GetLink { key: String },
    /// Experts and benchmarks: set many keys, read as `KEY VALUE` lines from standard input.
    #[command(hide = true)]
    LowlevelSetLinks,
    /// Experts and tests: print every key starting with PREFIX as `KEY VALUE` lines.
    #[command(hide = true)]
    LowlevelGetLinks { prefix: Option<String> },
    /// Create a resource on DISK (file or block device); this host becomes primary.
    CreateResource {
        res: String,
        disk: PathBuf,
        /// `[DEVNAME] [SIZE]` as in MARS: the device name (must be RES: the device is
        /// /dev/mars/RES) and the logical size (K/M/G/T suffixes; default: the disk's size).
        /// A single word that is a size is the size.
        #[arg(num_args = 0..=2, value_name = "DEVNAME|SIZE")]
        extra: Vec<String>,
    },
    /// Become a replica of resource RES on DISK; a full sync overwrites DISK. DEVNAME (MARS)
    /// must be RES.
    JoinResource {
        res: String,
        disk: PathBuf,
        devname: Option<String>,
    },
    /// MARS: make RES known here and mark this host a guest. Every host knows every resource
    /// here: checks that RES is known after fetching the members' changes.
    ActivateGuest { res: String },
    /// MARS: end a guest relationship (refused while this host has storage in RES).
    DeactivateGuest { res: String },
    /// Stop being a member of RES (secondary only; --force skips the checks).
    LeaveResource { res: String },
    /// Destroy RES cluster-wide (refused while other members remain, unless --force).
    DeleteResource { res: String },
    /// Grow RES after its disks have grown (on the primary).
    Resize {
        res: String,
        /// New size (K/M/G/T suffixes); default: the smallest member disk.
        size: Option<String>,
    },
    /// Open the local disk of RES.
    Attach { res: String },
    /// Close the local disk of RES.
    Detach { res: String },
    /// Stop fetching logfiles from the primary.
    #[command(
        alias = "disconnect",
        alias = "pause-fetch-local",
        alias = "disconnect-local"
    )]
    PauseFetch { res: String },
    /// Resume fetching logfiles from the primary.
    #[command(
        alias = "connect",
        alias = "resume-fetch-local",
        alias = "connect-local"
    )]
    ResumeFetch { res: String },
    /// Freeze the local replica (logfiles keep arriving).
    #[command(alias = "pause-replay-local")]
    PauseReplay { res: String },
    /// Continue replaying logfiles into the local replica.
    #[command(alias = "resume-replay-local")]
    ResumeReplay { res: String },
    /// Pause the full sync of the local replica.
    #[command(alias = "pause-sync-local")]
    PauseSync { res: String },
    /// Resume the full sync of the local replica where it paused.
    #[command(alias = "resume-sync-local")]
    ResumeSync { res: String },
    /// MARS: pause-fetch on every member of RES (each member applies the request to its own
    /// switch; waits up to --timeout for the reachable ones, unreachable ones apply it when
    /// they are back).
    #[command(alias = "disconnect-global")]
    PauseFetchGlobal { res: String },
    /// MARS: resume-fetch on every member of RES (as pause-fetch-global).
    #[command(alias = "connect-global")]
    ResumeFetchGlobal { res: String },
    /// MARS: pause-replay on every member of RES (as pause-fetch-global).
    PauseReplayGlobal { res: String },
    /// MARS: resume-replay on every member of RES (as pause-fetch-global).
    ResumeReplayGlobal { res: String },
    /// MARS: pause-sync on every member of RES (as pause-fetch-global).
    PauseSyncGlobal { res: String },
    /// MARS: resume-sync on every member of RES (as pause-fetch-global).
    ResumeSyncGlobal { res: String },
    /// attach + resume-sync + resume-fetch + resume-replay.
    Up { res: String },
    /// pause-sync + pause-fetch + pause-replay + detach.
    Down { res: String },
    /// Experts: declare the local replica consistent without copying.
    #[command(hide = true)]
    FakeSync { res: String },
    /// Discard the local replica and fast-full-sync it from the primary.
    Invalidate { res: String },
    /// Make this host the primary of RES: a planned handover (waits up to --timeout for the
    /// old primary's device to close), or with --force a failover with what this replica has
    /// replayed (run pause-fetch first).
    Primary { res: String },
    /// Set the designated primary to (none): the primary leaves its role once its device is
    /// closed (discouraged except before leave-resource or delete-resource).
    Secondary { res: String },
    /// On a secondary: delete local logfiles and this host's version links outside the
    /// primary's history (split-brain leftovers); a fast full sync follows.
    LogPurgeAll { res: String },
    /// Enter emergency mode for RES on this host once its logfiles take more than PCT percent
    /// of the root filesystem (0: no limit).
    #[command(alias = "emergency-limit")]
    SetEmergencyLimit { res: String, pct: u8 },
    /// This host's emergency limit for RES (percent; 0: none).
    GetEmergencyLimit { res: String },
    /// Housekeeping: rotate the primary's logfiles, delete those nobody needs.
    Cron,
    /// MARS's deprecated log-delete commands: `cron` (for every resource).
    #[command(
        hide = true,
        alias = "log-delete-one",
        alias = "log-delete-all",
        alias = "log-delete-all-replayed"
    )]
    LogDelete { res: Option<String> },
    /// MARS: remove stored error messages of RES. marsd stores none: its errors are the current
    /// state and clear with their cause; prints those `view` shows now.
    ErrPurgeAll { res: String },
    /// MARS: remove old `.deleted` links of RES. marsd collects its deletion markers itself
    /// once they are older than the retention; prints that.
    LinkPurgeAll { res: String },
    /// Wait until the device of RES is no longer in use on this host (at most --timeout).
    WaitUmount { res: String },
    /// Print files (MARS: its status files, with readable times): here any text file, e.g.
    /// marsd's logs.
    Cat {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Wait until a condition holds on this host (at most --timeout seconds).
    WaitResource {
        res: String,
        /// attach, fetch, replay, sync, primary, secondary, device or uptodate, optionally with
        /// is-/has- (the actual state) or todo- (the switch) before and -on/-1 (default) or
        /// -off/-0 after.
        cond: String,
    },
    /// Show the state of one resource, or of all.
    View {
        res: Option<String>,
        /// Redraw the view every SECONDS (default 2) until interrupted; piped, print one view
        /// per interval separated by a blank line.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
        /// With --watch: stop after N views.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// Nagios/Icinga plugin: one status line with perfdata; exit 0 OK, 1 WARNING,
    /// 2 CRITICAL, 3 UNKNOWN (daemon unreachable, bad arguments).
    Check(check::CheckArgs),
    /// Close the current logfile and continue in a new one.
    LogRotate { res: String },
    /// Configure the systemd stack of RES: START is the unit at its top (or a marker name such
    /// as DEFAULT: the template marked DEFAULT_START), STOP the unit right above the device
    /// (default: START). "" removes both and the want. The stack is wanted on the primary.
    SetSystemdUnit {
        res: String,
        start: String,
        stop: Option<String>,
    },
    /// Show the start and stop unit of RES.
    GetSystemdUnit { res: String },
    /// Set where the systemd stack of RES runs: a member, or (none) to stop it everywhere.
    SetSystemdWant { res: String, host: String },
    /// Show where the systemd stack of RES should run.
    GetSystemdWant { res: String },
    /// Regenerate the units now and run the start/stop of RES (or of every resource) again.
    #[command(alias = "systemd-trigger-extern")]
    SystemdTrigger { res: Option<String> },
    /// Generate the units of RES from templates into a directory and print what was written;
    /// no systemctl (for checking templates). MARS's view primitives in templates read the
    /// running marsd's state; without a daemon a template using one is left out, saying so.
    SystemdGenerate(systemd::GenerateArgs),
    /// Start a throw-away local mars host, write through NBD and show how to use it.
    Demo(demo::DemoArgs),
    /// Write the man page or the shell completions of marsadm into DIR (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: generate::What,
        dir: PathBuf,
    },
    /// view-MACRO RES: one value, e.g. `view-role vm1`, `view-nbd-uri vm1`.
    #[command(external_subcommand)]
    Other(Vec<String>),
}

/// Replicated key of the global sync limit (MARS: `defaults/sync-limit`).
const SYNC_LIMIT_KEY: &str = "defaults/sync-limit";
/// Replicated key of the seconds after which an unreachable member stops pinning logfiles.
const UNREACHABLE_LIMIT_KEY: &str = "defaults/unreachable-limit";
/// What the daemon uses while the key is unset (one day).
const UNREACHABLE_LIMIT_DEFAULT: &str = "86400";
/// How often `wait-resource` asks the daemon.
const WAIT_INTERVAL: Duration = Duration::from_millis(50);
/// While `wait-resource uptodate` waits, it asks for a fresh confirmation this often.
const ASK_AGAIN: Duration = Duration::from_secs(1);

fn resource(name: &str) -> Result<ResourceName> {
    ResourceName::new(name).map_err(Into::into)
}

/// The RES argument of a command that acts on one resource and may take `all` or a list.
fn res_arg(cmd: &Cmd) -> Option<&str> {
    match cmd {
        Cmd::Attach { res }
        | Cmd::Detach { res }
        | Cmd::PauseFetch { res }
        | Cmd::ResumeFetch { res }
        | Cmd::PauseReplay { res }
        | Cmd::ResumeReplay { res }
        | Cmd::PauseSync { res }
        | Cmd::ResumeSync { res }
        | Cmd::PauseFetchGlobal { res }
        | Cmd::ResumeFetchGlobal { res }
        | Cmd::PauseReplayGlobal { res }
        | Cmd::ResumeReplayGlobal { res }
        | Cmd::PauseSyncGlobal { res }
        | Cmd::ResumeSyncGlobal { res }
        | Cmd::Up { res }
        | Cmd::Down { res }
        | Cmd::Invalidate { res }
        | Cmd::Primary { res }
        | Cmd::Secondary { res }
        | Cmd::LogPurgeAll { res }
        | Cmd::LogRotate { res } => Some(res),
        _ => None,
    }
}

/// The same command for another resource.
fn with_res(cmd: &Cmd, r: &str) -> Cmd {
    let res = r.to_string();
    match cmd {
        Cmd::Attach { .. } => Cmd::Attach { res },
        Cmd::Detach { .. } => Cmd::Detach { res },
        Cmd::PauseFetch { .. } => Cmd::PauseFetch { res },
        Cmd::ResumeFetch { .. } => Cmd::ResumeFetch { res },
        Cmd::PauseReplay { .. } => Cmd::PauseReplay { res },
        Cmd::ResumeReplay { .. } => Cmd::ResumeReplay { res },
        Cmd::PauseSync { .. } => Cmd::PauseSync { res },
        Cmd::ResumeSync { .. } => Cmd::ResumeSync { res },
        Cmd::PauseFetchGlobal { .. } => Cmd::PauseFetchGlobal { res },
        Cmd::ResumeFetchGlobal { .. } => Cmd::ResumeFetchGlobal { res },
        Cmd::PauseReplayGlobal { .. } => Cmd::PauseReplayGlobal { res },
        Cmd::ResumeReplayGlobal { .. } => Cmd::ResumeReplayGlobal { res },
        Cmd::PauseSyncGlobal { .. } => Cmd::PauseSyncGlobal { res },
        Cmd::ResumeSyncGlobal { .. } => Cmd::ResumeSyncGlobal { res },
        Cmd::Up { .. } => Cmd::Up { res },
        Cmd::Down { .. } => Cmd::Down { res },
        Cmd::Invalidate { .. } => Cmd::Invalidate { res },
        Cmd::Primary { .. } => Cmd::Primary { res },
        Cmd::Secondary { .. } => Cmd::Secondary { res },
        Cmd::LogPurgeAll { .. } => Cmd::LogPurgeAll { res },
        Cmd::LogRotate { .. } => Cmd::LogRotate { res },
        other => panic!("{other:?} takes no `all`"),
    }
}

/// Paths are resolved here, because the daemon's working directory is not ours.
fn absolute(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Ok(c);
    }
    Ok(std::env::current_dir()?.join(p))
}

/// The switch commands: (command name, RES, switches, on).
fn switch_of(cmd: &Cmd) -> Option<(&'static str, &str, &'static [SwitchKind], bool)> {
    use SwitchKind::{Attach, Fetch, Replay, Sync};
    Some(match cmd {
        Cmd::Attach { res } => ("attach", res, &[Attach], true),
        Cmd::Detach { res } => ("detach", res, &[Attach], false),
        Cmd::PauseFetch { res } => ("pause-fetch", res, &[Fetch], false),
        Cmd::ResumeFetch { res } => ("resume-fetch", res, &[Fetch], true),
        Cmd::PauseReplay { res } => ("pause-replay", res, &[Replay], false),
        Cmd::ResumeReplay { res } => ("resume-replay", res, &[Replay], true),
        Cmd::PauseSync { res } => ("pause-sync", res, &[Sync], false),
        Cmd::ResumeSync { res } => ("resume-sync", res, &[Sync], true),
        Cmd::Up { res } => ("up", res, &SwitchKind::ALL, true),
        Cmd::Down { res } => ("down", res, &SwitchKind::ALL, false),
        _ => return None,
    })
}

/// The `*-global` commands: (command name, RES, switch, on).
fn global_switch_of(cmd: &Cmd) -> Option<(&'static str, &str, SwitchKind, bool)> {
    use SwitchKind::{Fetch, Replay, Sync};
    Some(match cmd {
        Cmd::PauseFetchGlobal { res } => ("pause-fetch-global", res, Fetch, false),
        Cmd::ResumeFetchGlobal { res } => ("resume-fetch-global", res, Fetch, true),
        Cmd::PauseReplayGlobal { res } => ("pause-replay-global", res, Replay, false),
        Cmd::ResumeReplayGlobal { res } => ("resume-replay-global", res, Replay, true),
        Cmd::PauseSyncGlobal { res } => ("pause-sync-global", res, Sync, false),
        Cmd::ResumeSyncGlobal { res } => ("resume-sync-global", res, Sync, true),
        _ => return None,
    })
}

/// The resource commands that are one request answered by `Done`: (command name, request).
/// `None` for every other command.
fn resource_request(cmd: &Cmd, force: u8, timeout: u64) -> Result<Option<(&'static str, Request)>> {
    let confirmed = force >= 2;
    let force = force > 0;
    if let Cmd::JoinResource {
        res,
        devname: Some(d),
        ..
    } = cmd
    {
        check_devname(res, d)?;
    }
    if let Some((name, res, kinds, on)) = switch_of(cmd) {
        let req = Request::Switch {
            res: resource(res)?,
            switches: kinds.to_vec(),
            on,
        };
        return Ok(Some((name, req)));
    }
    if let Some((name, res, switch, on)) = global_switch_of(cmd) {
        let req = Request::SwitchGlobal {
            res: resource(res)?,
            switch,
            on,
            timeout,
        };
        return Ok(Some((name, req)));
    }
    Ok(Some(match cmd {
        Cmd::JoinResource { res, disk, .. } => (
            "join-resource",
            Request::JoinResource {
                res: resource(res)?,
                disk: absolute(disk)?,
            },
        ),
        Cmd::LeaveResource { res } => (
            "leave-resource",
            Request::LeaveResource {
                res: resource(res)?,
                force,
            },
        ),
        Cmd::DeleteResource { res } => (
            "delete-resource",
            Request::DeleteResource {
                res: resource(res)?,
                force,
            },
        ),
        Cmd::Resize { res, size } => (
            "resize",
            Request::Resize {
                res: resource(res)?,
                size: size
                    .as_deref()
                    .map(parse_size)
                    .transpose()
                    .context("SIZE")?,
            },
        ),
        Cmd::FakeSync { res } => (
            "fake-sync",
            Request::FakeSync {
                res: resource(res)?,
            },
        ),
        Cmd::Invalidate { res } => (
            "invalidate",
            Request::Invalidate {
                res: resource(res)?,
            },
        ),
        Cmd::Cron => ("cron", Request::Cron),
        Cmd::LogRotate { res } => (
            "log-rotate",
            Request::LogRotate {
                res: resource(res)?,
            },
        ),
        Cmd::Primary { res } => (
            "primary",
            Request::Primary {
                res: resource(res)?,
                force,
                timeout,
                confirmed,
            },
        ),
        Cmd::Secondary { res } => (
            "secondary",
            Request::Secondary {
                res: resource(res)?,
            },
        ),
        Cmd::LogPurgeAll { res } => (
            "log-purge-all",
            Request::LogPurgeAll {
                res: resource(res)?,
            },
        ),
        Cmd::SetEmergencyLimit { res, pct } => (
            "set-emergency-limit",
            Request::SetEmergencyLimit {
                res: resource(res)?,
                pct: *pct,
            },
        ),
        Cmd::GetEmergencyLimit { res } => (
            "get-emergency-limit",
            Request::GetEmergencyLimit {
                res: resource(res)?,
            },
        ),
        Cmd::SetSystemdUnit { res, start, stop } => (
            "set-systemd-unit",
            Request::SetSystemdUnit {
                res: resource(res)?,
                start: start.clone(),
                stop: stop.clone(),
            },
        ),
        Cmd::SetSystemdWant { res, host } => (
            "set-systemd-want",
            Request::SetSystemdWant {
                res: resource(res)?,
                want: host.clone(),
            },
        ),
        Cmd::SystemdTrigger { res } => (
            "systemd-trigger",
            Request::SystemdTrigger {
                res: res.as_deref().map(resource).transpose()?,
            },
        ),
        _ => return Ok(None),
    }))
}

impl Cli {
    fn call(&self, req: &Request) -> Result<Reply> {
        // Commands that wait (wait-cluster …) are bounded by the daemon with the same timeout;
        // give its answer time to arrive.
        Ok(client::call(
            &self.root,
            req,
            Duration::from_secs(self.timeout + 10),
        )?)
    }

    /// Sends a request that changes something: with --dry-run as a dry run (the daemon checks
    /// it as it would and answers with what it would do).
    fn change(&self, req: Request) -> Result<Reply> {
        if self.dry_run {
            self.call(&Request::DryRun {
                request: Box::new(req),
            })
        } else {
            self.call(&req)
        }
    }

    /// `primary --force` refused for want of a confirmation (a reachable old primary is
    /// ahead): on a terminal the operator reads what would be lost and types the resource name
    /// to go ahead; otherwise the refusal stands (it says `--force --force`).
    fn confirm_primary(&self, req: Request, refusal: anyhow::Error) -> Result<Reply> {
        use std::io::{IsTerminal, Write};
        let needs = refusal
            .downcast_ref::<client::ClientError>()
            .is_some_and(|r| {
                matches!(
                    r,
                    client::ClientError::Refused {
                        kind: mars_api::ErrorKind::NeedsConfirmation,
                        ..
                    }
                )
            });
        let Request::Primary {
            res,
            force,
            timeout,
            ..
        } = req
        else {
            return Err(refusal);
        };
        let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
        if !needs || self.dry_run || self.json || !interactive {
            return Err(refusal);
        }
        eprintln!("WARNING: {refusal:#}");
        eprint!("Type the resource name ({res}) to force the switch anyway: ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != res.as_str() {
            bail!("not confirmed: nothing was changed");
        }
        self.call(&Request::Primary {
            res,
            force,
            timeout,
            confirmed: true,
        })
    }

    /// Prints `body` as the JSON output of this command: `"schema"` first, then its fields.
    fn emit<T: Serialize>(&self, body: &T) -> Result<()> {
        #[derive(Serialize)]
        struct Envelope<'a, T: Serialize> {
            schema: u32,
            #[serde(flatten)]
            body: &'a T,
        }
        let out = Envelope {
            schema: mars_api::SCHEMA_VERSION,
            body,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        Ok(())
    }

    /// A getter's number: the plain number, or `{"schema":1,"value":N}`.
    fn print_number(&self, v: &str) -> Result<()> {
        if self.json {
            let n: u64 = v
                .trim()
                .parse()
                .with_context(|| format!("the stored value {v:?} is not a number"))?;
            self.emit(&serde_json::json!({ "value": n }))
        } else {
            println!("{v}");
            Ok(())
        }
    }

    /// An action's answer: its message, or `{"schema":1,"ok":true,"message":…}`.
    fn print_done(&self, reply: Reply) -> Result<()> {
        let Reply::Done { message } = reply else {
            bail!("unexpected answer from marsd: {reply:?}");
        };
        if self.json {
            self.emit(&serde_json::json!({ "ok": true, "message": message }))
        } else {
            println!("{message}");
            Ok(())
        }
    }

    /// `get-systemd-unit RES`: the JSON document and MARS's line (`START STOP`, or nothing
    /// when no stack is set).
    fn systemd_unit(&self, res: &ResourceName) -> Result<(serde_json::Value, String)> {
        let start = self.get_link(&systemd::key(res, "systemd-start-unit"))?;
        let stop = self.get_link(&systemd::key(res, "systemd-stop-unit"))?;
        let start = start.filter(|s| !s.is_empty());
        let stop = stop.filter(|s| !s.is_empty()).or(start.clone());
        let text = match (&start, &stop) {
            (Some(start), Some(stop)) => format!("{start} {stop}\n"),
            _ => String::new(),
        };
        let value = serde_json::json!({
            "resource": res,
            "start_unit": start,
            "stop_unit": stop.filter(|_| start.is_some()),
        });
        Ok((value, text))
    }

    /// `get-systemd-want RES`: the JSON document and MARS's line (the host, `(none)`, or
    /// nothing when unset).
    fn systemd_want(&self, res: &ResourceName) -> Result<(serde_json::Value, String)> {
        let want = self.get_link(&systemd::key(res, "systemd-want"))?;
        let text = want.as_ref().map(|w| format!("{w}\n")).unwrap_or_default();
        Ok((serde_json::json!({ "resource": res, "want": want }), text))
    }

    fn run(&self) -> Result<()> {
        self.check_mars_options()?;
        match &self.cmd {
            Cmd::CreateCluster { ip } => {
                let ip = ip.clone().or_else(|| self.peer_ip(None));
                let r = self.change(Request::CreateCluster { ip })?;
                self.print_done(r)
            }
            Cmd::CreateResource { res, disk, extra } => {
                let size = create_extra(res, extra)?;
                let res = resource(res)?;
                let disk = absolute(disk)?;
                let r = self.change(Request::CreateResource { res, disk, size })?;
                self.print_done(r)
            }
            Cmd::JoinCluster {
                peer,
                peer_address,
                token,
                ip,
            } => {
                // MARS: `join-cluster HOST [IP]`, or the IP from --ip-HOST=IP.
                let named = peer_address.clone().or_else(|| self.peer_ip(Some(peer)));
                let address = named.clone().unwrap_or_else(|| peer.clone());
                let ip = ip.clone().or_else(|| self.peer_ip(None));
                let r = self.change(Request::JoinCluster {
                    peer: address,
                    token: token.clone(),
                    ip,
                    rejoin: self.force > 0,
                })?;
                if named.is_some() && !self.dry_run {
                    self.expect_member(peer)?;
                }
                self.print_done(r)
            }
            Cmd::RenewCertificate { via } => {
                let r = self.change(Request::RenewCertificate { via: via.clone() })?;
                self.print_done(r)
            }
            Cmd::RotateCa { phase } => {
                let r = self.change(Request::RotateCa {
                    finish: *phase == RotatePhase::Finish,
                })?;
                self.print_done(r)
            }
            Cmd::JoinToken { ttl } => match self.change(Request::JoinToken { ttl: *ttl })? {
                Reply::Value { value: Some(t) } => {
                    if self.json {
                        self.emit(&serde_json::json!({ "token": t }))
                    } else {
                        println!("{t}");
                        Ok(())
                    }
                }
                done @ Reply::Done { .. } => self.print_done(done),
                other => Err(anyhow::anyhow!("unexpected reply: {other:?}")),
            },
            Cmd::LeaveCluster => {
                let r = self.change(Request::LeaveCluster {
                    timeout: self.timeout,
                })?;
                self.print_done(r)
            }
            Cmd::WaitCluster { res } => {
                if let Some(res) = res {
                    self.resource_members(res)?;
                }
                let fb = progress::Feedback::new(
                    progress::wanted(self.json),
                    "waiting for every member of the cluster to answer".into(),
                );
                let r = self.call(&Request::WaitCluster {
                    timeout: self.timeout,
                });
                fb.done();
                self.print_done(r?)
            }
            Cmd::UpdateCluster { res } => {
                let r = self.call(&Request::UpdateCluster {
                    timeout: self.timeout,
                })?;
                if let Some(res) = res {
                    self.resource_members(res)?;
                }
                self.print_done(r)
            }
            Cmd::LowlevelSetHostIp { host, ip } => self.set_host_ip(host, ip.as_deref()),
            Cmd::SetGlobalEnabledLogCompressions { features } => {
                self.set_features("enabled-log-compressions", features, compat::COMPRESSIONS)
            }
            Cmd::SetGlobalEnabledNetCompressions { features } => {
                self.set_features("enabled-net-compressions", features, compat::COMPRESSIONS)
            }
            Cmd::SetGlobalDisabledLogDigests { features } => {
                self.set_features("disabled-log-digests", features, compat::DIGESTS)
            }
            Cmd::SetGlobalDisabledNetDigests { features } => {
                self.set_features("disabled-net-digests", features, compat::DIGESTS)
            }
            Cmd::ActivateGuest { res } => {
                self.call(&Request::UpdateCluster {
                    timeout: self.timeout,
                })?;
                let members = self.resource_members(res)?;
                self.say(&format!(
                    "{res} is known here (members: {}); every host follows every resource",
                    members.join(", ")
                ))
            }
            Cmd::DeactivateGuest { res } => {
                let members = self.resource_members(res)?;
                let me = self.this_host()?;
                if members.contains(&me) {
                    return Err(refused(format!(
                        "peer '{me}' is a storage member of resource '{res}' (leave-resource first)"
                    )));
                }
                self.say(&format!(
                    "{res}: this host is no member; nothing to deactivate"
                ))
            }
            Cmd::LogDelete { .. } => {
                eprintln!("marsadm: deprecated: please use 'cron' instead");
                let r = self.change(Request::Cron)?;
                self.print_done(r)
            }
            Cmd::ErrPurgeAll { res } => {
                let r = self.known_resource(res)?;
                let now: Vec<&str> = [&r.error, &r.device_error, &r.stuck]
                    .into_iter()
                    .flatten()
                    .map(String::as_str)
                    .collect();
                let msg = if now.is_empty() {
                    format!("{res}: no error messages (marsd stores none; none is current)")
                } else {
                    format!(
                        "{res}: marsd stores no error messages to purge; current, until their \
                         cause goes: {}",
                        now.join("; ")
                    )
                };
                self.say(&msg)
            }
            Cmd::LinkPurgeAll { res } => {
                self.known_resource(res)?;
                self.say(&format!(
                    "{res}: nothing to purge: marsd removes deletion markers itself once they \
                     are 7 days old (as MARS keeps .deleted links a week)"
                ))
            }
            Cmd::WaitUmount { res } => self.wait_umount(res),
            Cmd::Cat { paths } => {
                for p in paths {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))?;
                    print!("{text}");
                }
                Ok(())
            }
            Cmd::MergeClusterList => merge::list(self),
            Cmd::MergeCluster {
                peer,
                peer_address,
                token,
            }
            | Cmd::MergeClusterCheck {
                peer,
                peer_address,
                token,
            } => {
                let check = matches!(&self.cmd, Cmd::MergeClusterCheck { .. });
                let Some(token) = token else {
                    usage!(
                        "merge-cluster needs a join token of the other cluster: run `marsadm \
                         join-token` on a host of it that holds its CA key and pass what it \
                         prints with --token (or MARS_JOIN_TOKEN)"
                    );
                };
                // MARS: `merge-cluster HOST [IP]`, or the IP from --ip-HOST=IP.
                let named = peer_address.clone().or_else(|| self.peer_ip(Some(peer)));
                let r = self.change(Request::MergeCluster {
                    peer: named.clone().unwrap_or_else(|| peer.clone()),
                    name: named.is_some().then(|| peer.clone()),
                    token: token.clone(),
                    check,
                })?;
                self.print_done(r)
            }
            Cmd::SplitCluster => {
                let r = self.change(Request::SplitCluster)?;
                self.print_done(r)
            }
            Cmd::LowlevelLsHostIps => {
                let v = self.host_view()?;
                if self.json {
                    self.emit(&serde_json::json!({ "members": v.members }))?;
                } else {
                    for m in &v.members {
                        println!("{} {}", m.host, m.address);
                    }
                }
                Ok(())
            }
            Cmd::LowlevelDeleteHost { host } => {
                let r = self.change(Request::DeleteHost {
                    host: host.clone(),
                    force: self.force > 0,
                    window: Some(self.window),
                })?;
                self.print_done(r)
            }
            Cmd::SetGlobalSyncLimitValue { n } => {
                self.set_links(vec![(SYNC_LIMIT_KEY.into(), n.to_string())])
            }
            Cmd::GetGlobalSyncLimitValue => {
                let v = self.get_link(SYNC_LIMIT_KEY)?;
                self.print_number(&v.unwrap_or_else(|| "0".into()))
            }
            Cmd::SetGlobalUnreachableLimitValue { seconds } => {
                self.set_links(vec![(UNREACHABLE_LIMIT_KEY.into(), seconds.to_string())])
            }
            Cmd::GetGlobalUnreachableLimitValue => {
                let v = self.get_link(UNREACHABLE_LIMIT_KEY)?;
                self.print_number(&v.unwrap_or_else(|| UNREACHABLE_LIMIT_DEFAULT.into()))
            }
            Cmd::WaitResource { res, cond } => self.wait_resource(res, cond),
            Cmd::SetLink { key, value } => self.set_links(vec![(key.clone(), value.clone())]),
            Cmd::GetLink { key } => match self.get_link(key)? {
                Some(v) if self.json => self.emit(&serde_json::json!({ "key": key, "value": v })),
                Some(v) => {
                    println!("{v}");
                    Ok(())
                }
                None => Err(client::ClientError::Refused {
                    kind: mars_api::ErrorKind::NotFound,
                    message: format!("no metadata key {key:?}"),
                }
                .into()),
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
                        self.call(&Request::SetLinks {
                            pairs: std::mem::take(&mut batch),
                        })?;
                        bytes = 0;
                    }
                }
                // The last batch answers for all: one output, as every command.
                if batch.is_empty() {
                    if self.json {
                        self.emit(&serde_json::json!({ "ok": true, "message": "" }))?;
                    }
                    return Ok(());
                }
                self.set_links(batch)
            }
            Cmd::LowlevelGetLinks { prefix } => match self.call(&Request::ListLinks {
                prefix: prefix.clone().unwrap_or_default(),
            })? {
                Reply::Value { value } => {
                    print!("{}", value.unwrap_or_default());
                    Ok(())
                }
                other => bail!("unexpected answer from marsd: {other:?}"),
            },
            // `main` runs it before: it has exit codes of its own.
            Cmd::Check(_) => Ok(()),
            Cmd::View { res, watch, count } => match watch {
                Some(secs) => self.watch(res.as_deref(), *secs, *count),
                None => self.view(res.as_deref()),
            },
            // MARS's `all` and comma lists: each resource under its `--------- resource` line,
            // as MARS's `do_all_res` prints (MARS's modprobe-mars.sh of systemd-icpu/ greps
            // `get-systemd-unit all`); `--json`: one document, `values` an entry each.
            Cmd::GetSystemdUnit { res } | Cmd::GetSystemdWant { res }
                if res == "all" || res.contains(',') =>
            {
                let unit = matches!(self.cmd, Cmd::GetSystemdUnit { .. });
                let mut json = Vec::new();
                for (name, head) in macros::run::resource_heads(self, res)? {
                    let name = resource(&name)?;
                    let (value, text) = if unit {
                        self.systemd_unit(&name)?
                    } else {
                        self.systemd_want(&name)?
                    };
                    if self.json {
                        json.push(value);
                    } else {
                        println!("--------- resource {head}");
                        print!("{text}");
                    }
                }
                if self.json {
                    return self.emit(&serde_json::json!({ "values": json }));
                }
                Ok(())
            }
            Cmd::GetSystemdUnit { res } => {
                let (value, text) = self.systemd_unit(&resource(res)?)?;
                if self.json {
                    return self.emit(&value);
                }
                print!("{text}");
                Ok(())
            }
            Cmd::GetSystemdWant { res } => {
                let (value, text) = self.systemd_want(&resource(res)?)?;
                if self.json {
                    return self.emit(&value);
                }
                print!("{text}");
                Ok(())
            }
            Cmd::SystemdGenerate(args) => systemd::generate(self, args, self.json),
            Cmd::Demo(args) => demo::run(self, args),
            Cmd::Generate { what, dir } => generate::run(*what, dir),
            Cmd::Other(args) => match args.first() {
                Some(_) => macros::run::view_macro(self, args),
                None => usage!("no command given; see `marsadm --help`"),
            },
            // `all` or RES1,RES2,…: the command for each resource, several at once.
            other if res_arg(other).is_some_and(|r| r == "all" || r.contains(',')) => {
                let arg = res_arg(other).expect("checked");
                self.run_many(other, arg)
            }
            // The resource commands: one request each, answered by `Done`.
            other => match resource_request(other, self.force, self.timeout)? {
                // A getter: its answer is a number.
                Some((_, req @ Request::GetEmergencyLimit { .. })) => match self.call(&req)? {
                    Reply::Done { message } => self.print_number(&message),
                    r => bail!("unexpected answer from marsd: {r:?}"),
                },
                Some((_, req)) => {
                    let r = match &req {
                        // A handover waits for the old primary: say for what while it does.
                        Request::Primary { res, .. } if !self.dry_run => {
                            match self.call_watching(&req, res, progress::handover_message) {
                                Ok(r) => r,
                                Err(e) => self.confirm_primary(req.clone(), e)?,
                            }
                        }
                        Request::Invalidate { res } if !self.dry_run => {
                            let r = self.call(&req)?;
                            self.follow_sync(res);
                            r
                        }
                        _ => match self.change(req.clone()) {
                            Ok(r) => r,
                            Err(e) => self.confirm_primary(req, e)?,
                        },
                    };
                    self.print_done(r)
                }
                None => bail!("internal error: no request for {other:?}"),
            },
        }
    }

    /// A resource command for `all` (every resource of this host) or a comma list: each runs
    /// as its own request, at most `--parallel` at once; one line per resource, in the order
    /// given; the exit status is a failure if any failed.
    fn run_many(&self, cmd: &Cmd, arg: &str) -> Result<()> {
        let names: Vec<ResourceName> = if arg == "all" {
            let v = self.host_view()?;
            v.resources
                .iter()
                .map(|r| resource(&r.name))
                .collect::<Result<_>>()?
        } else {
            arg.split(',')
                .map(|r| resource(r.trim()))
                .collect::<Result<_>>()?
        };
        let mut reqs = Vec::new();
        for n in &names {
            let (_, req) = resource_request(&with_res(cmd, n.as_str()), self.force, self.timeout)?
                .context("not a resource command")?;
            reqs.push((n.clone(), req));
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<std::sync::Mutex<Option<Result<Reply>>>> =
            reqs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|sc| {
            // MARS's bare --parallel (0 here): all at once.
            let n = if self.parallel == 0 {
                reqs.len()
            } else {
                self.parallel
            };
            for _ in 0..n.clamp(1, reqs.len().max(1)) {
                sc.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((_, req)) = reqs.get(i) else {
                        return;
                    };
                    let r = self.change(req.clone());
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                });
            }
        });
        let mut failures = Vec::new();
        let mut json = Vec::new();
        for ((res, _), r) in reqs.iter().zip(results) {
            let r = r
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(anyhow::anyhow!("not run")));
            match r.and_then(|reply| match reply {
                Reply::Done { message } => Ok(message),
                other => bail!("unexpected answer from marsd: {other:?}"),
            }) {
                Ok(message) if self.json => {
                    json.push(
                        serde_json::json!({ "resource": res, "ok": true, "message": message }),
                    );
                }
                Ok(message) => println!("{message}"),
                Err(e) => {
                    let kind = error::Kind::of(&e);
                    failures.push(kind);
                    if self.json {
                        json.push(serde_json::json!({
                            "resource": res,
                            "ok": false,
                            "error": { "kind": kind, "message": format!("{e:#}") },
                        }));
                    } else {
                        eprintln!("marsadm: {res}: {e:#}");
                    }
                }
            }
        }
        if self.json {
            self.emit(&serde_json::json!({ "ok": failures.is_empty(), "results": json }))?;
        }
        if let Some(first) = failures.first() {
            // One kind for all: its status; mixed failures are just failures.
            let kind = if failures.iter().all(|k| k == first) {
                *first
            } else {
                error::Kind::Failed
            };
            return Err(error::Reported {
                kind,
                failed: failures.len(),
                total: reqs.len(),
            }
            .into());
        }
        Ok(())
    }

    fn set_links(&self, pairs: Vec<(String, String)>) -> Result<()> {
        let r = self.change(Request::SetLinks { pairs })?;
        if self.json || self.dry_run {
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

    /// MARS's global options that need a word before the command runs: `--macro` (refused),
    /// `--host` (only this host), the ones without effect here (warned about).
    fn check_mars_options(&self) -> Result<()> {
        if self.macro_text.is_some() {
            usage!("--macro is not supported: use `marsadm view-MACRO RES`");
        }
        for w in self.mars_only.warnings() {
            eprintln!("marsadm: warning: {w}");
        }
        let offline = matches!(
            self.cmd,
            Cmd::SystemdGenerate(_) | Cmd::Demo(_) | Cmd::Generate { .. } | Cmd::Cat { .. }
        );
        if let (Some(h), false) = (&self.as_host, offline) {
            let v = self.host_view()?;
            if *h != v.host {
                return Err(refused(format!(
                    "--host={h}: this marsd acts for its own host {} only; run the command \
                     on {h} (a dead member leaves with `lowlevel-delete-host {h}`)",
                    v.host
                )));
            }
        }
        Ok(())
    }

    /// The address given with --ip-HOST=IP for `host`, or with --ip=IP for this host (`None`).
    fn peer_ip(&self, host: Option<&str>) -> Option<String> {
        self.peer_ip
            .iter()
            .rev()
            .find_map(|p| match (p.split_once('='), host) {
                (Some((h, ip)), Some(want)) if h == want => Some(ip.to_string()),
                (None, None) => Some(p.clone()),
                _ => None,
            })
    }

    /// One line of text, or `{"schema":1,"ok":true,"message":…}`.
    fn say(&self, message: &str) -> Result<()> {
        self.print_done(Reply::Done {
            message: message.to_string(),
        })
    }

    /// The view of `res` (refused as not found when this host does not know it) and this
    /// host's name.
    fn resource_and_host(&self, res: &str) -> Result<(mars_api::ResourceView, String)> {
        let name = resource(res)?;
        let Reply::View(mut v) = self.call(&Request::View {
            res: Some(name),
            window: Some(self.window),
        })?
        else {
            bail!("unexpected answer from marsd");
        };
        if v.resources.is_empty() {
            return Err(client::ClientError::Refused {
                kind: mars_api::ErrorKind::NotFound,
                message: format!("resource '{res}' is not known here"),
            }
            .into());
        }
        Ok((v.resources.swap_remove(0), v.host))
    }

    /// The members of `res` from the replicated metadata (its `data-HOST` keys), which every
    /// host holds, member or not; refused as not found when the metadata has no such resource.
    fn resource_members(&self, res: &str) -> Result<Vec<String>> {
        let name = resource(res)?;
        let prefix = format!("resource-{name}/");
        let Reply::Value { value } = self.call(&Request::ListLinks {
            prefix: prefix.clone(),
        })?
        else {
            bail!("unexpected answer from marsd");
        };
        let text = value.unwrap_or_default();
        if text.trim().is_empty() {
            return Err(client::ClientError::Refused {
                kind: mars_api::ErrorKind::NotFound,
                message: format!("resource '{res}' is not known here"),
            }
            .into());
        }
        Ok(text
            .lines()
            .filter_map(|l| {
                let key = l.split(' ').next()?;
                let leaf = key.strip_prefix(&prefix)?;
                leaf.strip_prefix("data-").map(str::to_string)
            })
            .collect())
    }

    fn this_host(&self) -> Result<String> {
        let v = self.host_view()?;
        Ok(v.host)
    }

    fn known_resource(&self, res: &str) -> Result<mars_api::ResourceView> {
        Ok(self.resource_and_host(res)?.0)
    }

    /// After `join-cluster HOST IP`: the cluster joined must have a member HOST.
    fn expect_member(&self, host: &str) -> Result<()> {
        let v = self.host_view()?;
        if !v.members.iter().any(|m| m.host == host) {
            return Err(refused(format!(
                "joined the cluster at that address, but it has no member '{host}' (members: {})",
                v.members
                    .iter()
                    .map(|m| m.host.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    /// This host's view of the cluster without resources (members, space).
    fn host_view(&self) -> Result<mars_api::ClusterView> {
        match self.call(&Request::View {
            res: None,
            window: Some(self.window),
        })? {
            Reply::View(v) => Ok(v),
            _ => bail!("unexpected answer from marsd"),
        }
    }

    /// `lowlevel-set-host-ip HOST [IP]`: writes the member's address key; only HOST itself may
    /// (MARS lets any host). Without IP: the one from --ip-HOST=IP.
    fn set_host_ip(&self, host: &str, ip: Option<&str>) -> Result<()> {
        let host_name = mars_config::HostName::new(host).map_err(|e| usage_err(e.to_string()))?;
        let ip = ip
            .map(str::to_string)
            .or_else(|| self.peer_ip(Some(host)))
            .ok_or_else(|| {
                usage_err(format!("no address for {host}: give IP or --ip-{host}=IP"))
            })?;
        let addr = with_default_port(&ip).map_err(usage_err)?;
        let v = self.host_view()?;
        if host_name.as_str() != v.host && v.members.iter().any(|m| m.host == host_name.as_str()) {
            // The member's address key is its own here (MARS lets any host rewrite it).
            return Err(refused(format!(
                "the address of {host} is {host}'s own metadata: run this on {host}"
            )));
        }
        if !v.members.iter().any(|m| m.host == host_name.as_str()) {
            return Err(client::ClientError::Refused {
                kind: mars_api::ErrorKind::NotFound,
                message: format!("'{host}' is no member of this cluster"),
            }
            .into());
        }
        // Peers fetch this host's metadata from its address, so an address that does not
        // reach it would also keep the correction from reaching them: refuse one nothing
        // answers at (MARS does not check), unless forced.
        if self.force == 0 {
            reachable(&addr).map_err(|e| {
                refused(format!(
                    "nothing answers at {addr} ({e}): the other members could not reach {host} \
                     there, nor learn of a correction; check the address, or --force"
                ))
            })?;
        }
        let r = self.change(Request::SetLinks {
            pairs: vec![(format!("ips/ip-{host_name}"), addr.clone())],
        })?;
        if self.dry_run {
            return self.print_done(r);
        }
        self.say(&format!("address of {host} set to {addr}"))
    }

    /// `set-global-{enabled,disabled}-…`: the cluster-wide feature list under `defaults/`, as
    /// MARS keeps it (names instead of MARS's numeric flags). Stored only: see the commands.
    fn set_features(&self, key: &str, features: &Option<String>, known: &[&str]) -> Result<()> {
        let value =
            compat::parse_features(features.as_deref().unwrap_or(""), known).map_err(usage_err)?;
        let r = self.change(Request::SetLinks {
            pairs: vec![(format!("defaults/{key}"), value.clone())],
        })?;
        if self.dry_run {
            return self.print_done(r);
        }
        let shown = if value.is_empty() { "(none)" } else { &value };
        self.say(&format!("defaults/{key} set to {shown}"))
    }

    /// `wait-umount RES`: until nobody has the device of RES open on this host.
    fn wait_umount(&self, res: &str) -> Result<()> {
        let start = Instant::now();
        loop {
            let r = self.known_resource(res)?;
            if r.open_count == 0 {
                return self.say(&format!("OK, device for resource '{res}' is not in use."));
            }
            if start.elapsed() >= Duration::from_secs(self.timeout) {
                return Err(error::TimedOut(format!(
                    "the device of {res} is still in use ({} openers) after {}s",
                    r.open_count, self.timeout
                ))
                .into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `check`: prints the plugin line (or the outcome as JSON) and returns the Nagios code.
    fn check(&self, args: &check::CheckArgs) -> ExitCode {
        let outcome = self.check_outcome(args);
        if self.json {
            let v = serde_json::json!({
                "schema": mars_api::SCHEMA_VERSION,
                "status": outcome.status,
                "code": outcome.status as u8,
                "line": outcome.line(),
                "problems": outcome.problems,
                "perfdata": outcome.perfdata,
                "resources": outcome.resources,
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            println!("{}", outcome.line());
        }
        ExitCode::from(outcome.status as u8)
    }

    fn check_outcome(&self, args: &check::CheckArgs) -> check::Outcome {
        let t = match args.thresholds() {
            Ok(t) => t,
            Err(e) => return check::Outcome::unknown(e),
        };
        let res = match args.res.as_deref() {
            None | Some("all") => None,
            Some(r) => match resource(r) {
                Ok(r) => Some(r),
                Err(e) => return check::Outcome::unknown(format!("{e:#}")),
            },
        };
        let window = Some(args.unreachable);
        match self.call(&Request::View { res, window }) {
            Ok(Reply::View(v)) => check::evaluate(&v, &t),
            Ok(_) => check::Outcome::unknown("unexpected answer from marsd".into()),
            Err(e) => check::Outcome::unknown(format!("{e:#}")),
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
            self.emit(&v)?;
        } else {
            print!("{}", view::cluster_text(&v, all));
        }
        Ok(())
    }

    /// `view --watch`: the view every `secs` seconds, `count` times or until interrupted. On a
    /// terminal the screen is redrawn; piped, the views follow each other, a blank line
    /// between two.
    fn watch(&self, res: Option<&str>, secs: f64, count: Option<u64>) -> Result<()> {
        if !(secs.is_finite() && secs > 0.0) {
            usage!("--watch takes a positive number of seconds, not {secs}");
        }
        let redraw = progress::wanted(self.json);
        let mut n = 0u64;
        loop {
            if redraw {
                // Home and clear: the new view replaces the old one.
                print!("\x1b[H\x1b[2J");
            } else if n > 0 {
                println!();
            }
            self.view(res)?;
            use std::io::Write as _;
            std::io::stdout().flush()?;
            n += 1;
            if count.is_some_and(|c| n >= c) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs_f64(secs));
        }
    }

    /// Sends `req`, and while marsd works on it shows on a terminal what it waits for
    /// (`say` on the resource's view, polled); the same as `call` otherwise.
    fn call_watching(
        &self,
        req: &Request,
        res: &ResourceName,
        say: fn(&mars_api::ResourceView, &str) -> String,
    ) -> Result<Reply> {
        if !progress::wanted(self.json) {
            return self.call(req);
        }
        let fb = progress::Feedback::new(true, format!("{res}: asking marsd"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|sc| {
            sc.spawn(move || {
                let _ = tx.send(self.call(req));
            });
            loop {
                match rx.recv_timeout(Duration::from_millis(300)) {
                    Ok(r) => {
                        fb.done();
                        return r;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        let view = Request::View {
                            res: Some(res.clone()),
                            window: Some(self.window),
                        };
                        if let Ok(Reply::View(v)) =
                            client::call(&self.root, &view, Duration::from_secs(2))
                        {
                            if let Some(r) = v.resources.first() {
                                fb.say(say(r, &v.host));
                            }
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        bail!("internal error: the request ended without an answer")
                    }
                }
            }
        })
    }

    /// After `invalidate` on a terminal: the sync's progress until it is done or --timeout
    /// passes (the sync goes on in the background either way). Nothing when piped.
    fn follow_sync(&self, res: &ResourceName) {
        if !progress::wanted(self.json) {
            return;
        }
        let mut fb = progress::Feedback::new(true, format!("{res}: sync starting"));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(self.timeout) {
            let view = Request::View {
                res: Some(res.clone()),
                window: Some(self.window),
            };
            let Ok(Reply::View(v)) = client::call(&self.root, &view, Duration::from_secs(2)) else {
                break;
            };
            let Some(r) = v.resources.first() else { break };
            if r.consistent && r.sync.is_none() {
                break;
            }
            let (doing, pct) = progress::activity(r);
            fb.say(if doing.is_empty() {
                format!("{res}: sync starting")
            } else {
                doing
            });
            fb.percent(pct);
            std::thread::sleep(Duration::from_millis(300));
        }
        fb.done();
    }

    /// Polls the local view of `res` until `cond` holds or --timeout passes.
    fn wait_resource(&self, res: &str, cond: &str) -> Result<()> {
        let cond = wait::Condition::parse(cond)?;
        let name = resource(res)?;
        let timeout = Duration::from_secs(self.timeout);
        let mut asked: Option<Instant> = None;
        let mut fb = progress::Feedback::new(
            progress::wanted(self.json),
            format!("waiting for {res} to reach {cond}"),
        );
        let reached = wait::wait_until(cond, timeout, WAIT_INTERVAL, |left| {
            // Bound each call by the time left, but give a busy daemon a moment to answer.
            let call_timeout = left.max(Duration::from_secs(2));
            // A secondary is up to date only with its source's confirmation from after the
            // wait began: ask for one now (and again now and then while catching up) rather
            // than wait for the periodic one. A daemon that does not know the request is
            // still right, only slower.
            if cond.wants_confirmation() && asked.is_none_or(|t| t.elapsed() >= ASK_AGAIN) {
                asked = Some(Instant::now());
                let ask = Request::AskCaughtUp { res: name.clone() };
                let _ = client::call(&self.root, &ask, call_timeout);
            }
            let req = Request::View {
                res: Some(name.clone()),
                window: Some(self.window),
            };
            match client::call(&self.root, &req, call_timeout)? {
                Reply::View(mut v) if !v.resources.is_empty() => {
                    let r = v.resources.swap_remove(0);
                    let (doing, pct) = progress::activity(&r);
                    let state = wait::state_text(&r);
                    fb.say(if doing.is_empty() {
                        format!("waiting for {res} to reach {cond}: {state}")
                    } else {
                        format!("waiting for {res} to reach {cond}: {doing}")
                    });
                    fb.percent(pct);
                    Ok(r)
                }
                Reply::View(_) => bail!("daemon returned no resource"),
                _ => bail!("unexpected answer from marsd"),
            }
        });
        fb.done();
        reached?;
        if self.json {
            self.emit(&serde_json::json!({
                "ok": true,
                "resource": res,
                "condition": cond.to_string(),
            }))?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = compat::normalize(std::env::args());
    if let Some((cmd, res)) = compat::command_and_arg(&args) {
        if let Some((l, hint)) = compat::legacy(cmd) {
            return match compat::legacy_answer(cmd, res, l, hint) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(msg) => {
                    let kind = error::Kind::Invalid;
                    if args.iter().any(|a| a == "--json") {
                        println!("{}", error::json(kind, &msg));
                    } else {
                        eprintln!("marsadm: {msg}");
                    }
                    ExitCode::from(kind.exit_code())
                }
            };
        }
    }
    // `--help` ends with the view macros, as MARS's help does.
    let parsed = Cli::command()
        .after_long_help(macros::help_text())
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        // A monitoring plugin with bad arguments is UNKNOWN (3), not a usage error.
        Err(e) if subcommand_is_check(std::env::args().skip(1)) && e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(3);
        }
        Err(e) => return usage_error(e),
    };
    if let Cmd::Check(args) = &cli.cmd {
        return cli.check(args);
    }
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let kind = error::Kind::of(&e);
            // The failures of `all` were reported one per resource already.
            let reported = e.downcast_ref::<error::Reported>().is_some();
            if cli.json {
                if !reported {
                    println!("{}", error::json(kind, &format!("{e:#}")));
                }
            } else if reported {
                eprintln!("marsadm: {e}");
            } else {
                eprintln!("marsadm: {e:#}");
            }
            ExitCode::from(kind.exit_code())
        }
    }
}

/// The subcommand is `check` (its argument errors exit UNKNOWN): the first word that is not a
/// global option or an option's value.
fn subcommand_is_check(args: impl Iterator<Item = String>) -> bool {
    let mut args = args;
    while let Some(a) = args.next() {
        if compat::VALUE_OPTIONS.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            return a == "check";
        }
    }
    false
}

/// A command line clap refused: its message on stderr (status 2), or with `--json` anywhere
/// on the line the JSON error on stdout. Help and version are no errors.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind as K;
    if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion)
        || !std::env::args().any(|a| a == "--json")
    {
        e.exit();
    }
    let rendered = e.render().to_string();
    let message = rendered
        .lines()
        .next()
        .unwrap_or("bad command line")
        .trim_start_matches("error: ");
    println!("{}", error::json(error::Kind::Usage, message));
    ExitCode::from(error::Kind::Usage.exit_code())
}

/// A refusal made here (as the daemon's would be): exit 3.
fn refused(message: String) -> anyhow::Error {
    client::ClientError::Refused {
        kind: mars_api::ErrorKind::Invalid,
        message,
    }
    .into()
}

fn usage_err(message: String) -> anyhow::Error {
    error::Usage(message).into()
}

/// `--threshold`: a size with K/M/G/T suffixes.
fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// ADDR[:PORT] with marsd's default peer port when none is given (an IPv6 address in
/// brackets, as MARS writes it).
/// Does something accept TCP connections at `addr` (within 3 s)?
fn reachable(addr: &str) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .collect();
    let mut last = "no address".to_string();
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn with_default_port(ip: &str) -> Result<String, String> {
    let ip = ip.trim();
    if ip.is_empty() || ip.contains(char::is_whitespace) {
        return Err(format!("{ip:?} is not an address"));
    }
    let has_port = if let Some(rest) = ip.strip_prefix('[') {
        rest.contains("]:")
    } else {
        ip.matches(':').count() == 1
    };
    if has_port {
        let port = ip.rsplit(':').next().unwrap_or("");
        port.parse::<u16>()
            .map_err(|_| format!("{port:?} in {ip:?} is not a port"))?;
        Ok(ip.to_string())
    } else if ip.matches(':').count() > 1 {
        Ok(format!("[{ip}]:{DEFAULT_PEER_PORT}"))
    } else {
        Ok(format!("{ip}:{DEFAULT_PEER_PORT}"))
    }
}

/// marsd's peer port when an address names none.
const DEFAULT_PEER_PORT: u16 = 7777;

/// `create-resource RES DISK [DEVNAME] [SIZE]`: the size, after checking DEVNAME (the device
/// is /dev/mars/RES here). A single word that is a size is the size (our older form).
fn create_extra(res: &str, extra: &[String]) -> Result<Option<u64>> {
    let (devname, size) = match extra {
        [] => (None, None),
        [one] if one == res => (Some(one), None),
        [one] => match parse_size(one) {
            Ok(_) => (None, Some(one)),
            Err(e) => {
                return Err(usage_err(format!(
                    "{one:?} is neither a SIZE ({e}) nor the device name {res} (MARS's \
                     DEVNAME: the device is /dev/mars/{res} here)"
                )))
            }
        },
        [dev, size, ..] => (Some(dev), Some(size)),
    };
    if let Some(d) = devname {
        check_devname(res, d)?;
    }
    size.map(|s| parse_size(s)).transpose().context("SIZE")
}

/// MARS lets the device of a resource have another name; marsd names it after the resource.
fn check_devname(res: &str, devname: &str) -> Result<()> {
    if devname != res {
        return Err(usage_err(format!(
            "device name {devname:?}: the device of a resource is /dev/mars/{res} here (give \
             {res} or leave it out)"
        )));
    }
    Ok(())
}

/// `--ttl`: seconds, or a number with s, m, h or d (at most 30 days).
fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 600, 30m, 2h, 1d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?} (s, m, h or d)")),
    };
    let secs = n.saturating_mul(mult);
    if secs == 0 || secs > 30 * 86_400 {
        return Err(format!("{s}: a token lives between 1 s and 30 days"));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn check_is_found_after_global_options() {
        let is = |s: &str| super::subcommand_is_check(s.split(' ').map(String::from));
        assert!(is("check --lag-warn x"));
        assert!(is("--root /r --timeout 5 check"));
        assert!(is("--json --root=/r check all"));
        assert!(!is("--root check view"));
        assert!(!is("view check"));
    }

    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("marsadm").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn request(args: &[&str]) -> (&'static str, Request) {
        let cli = parse(args);
        resource_request(&cli.cmd, cli.force, cli.timeout)
            .unwrap()
            .unwrap_or_else(|| panic!("{args:?} sends no resource request"))
    }

    fn vm1() -> ResourceName {
        resource("vm1").unwrap()
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn switch_commands_and_their_mars_aliases() {
        use SwitchKind::{Attach, Fetch, Replay, Sync};
        let cases: &[(&[&str], &[SwitchKind], bool)] = &[
            (&["attach", "vm1"], &[Attach], true),
            (&["detach", "vm1"], &[Attach], false),
            (&["pause-fetch", "vm1"], &[Fetch], false),
            (&["disconnect", "vm1"], &[Fetch], false),
            (&["pause-fetch-local", "vm1"], &[Fetch], false),
            (&["disconnect-local", "vm1"], &[Fetch], false),
            (&["resume-fetch", "vm1"], &[Fetch], true),
            (&["connect", "vm1"], &[Fetch], true),
            (&["connect-local", "vm1"], &[Fetch], true),
            (&["resume-fetch-local", "vm1"], &[Fetch], true),
            (&["pause-replay", "vm1"], &[Replay], false),
            (&["pause-replay-local", "vm1"], &[Replay], false),
            (&["resume-replay-local", "vm1"], &[Replay], true),
            (&["pause-sync-local", "vm1"], &[Sync], false),
            (&["resume-sync", "vm1"], &[Sync], true),
            (&["up", "vm1"], &SwitchKind::ALL, true),
            (&["down", "vm1"], &SwitchKind::ALL, false),
        ];
        for (args, kinds, on) in cases {
            let want = Request::Switch {
                res: vm1(),
                switches: kinds.to_vec(),
                on: *on,
            };
            assert_eq!(request(args).1, want, "{args:?}");
        }
    }

    #[test]
    fn global_switch_commands_and_their_mars_aliases() {
        use SwitchKind::{Fetch, Replay, Sync};
        let cases: &[(&str, SwitchKind, bool)] = &[
            ("pause-fetch-global", Fetch, false),
            ("disconnect-global", Fetch, false),
            ("resume-fetch-global", Fetch, true),
            ("connect-global", Fetch, true),
            ("pause-replay-global", Replay, false),
            ("resume-replay-global", Replay, true),
            ("pause-sync-global", Sync, false),
            ("resume-sync-global", Sync, true),
        ];
        for (cmd, switch, on) in cases {
            let want = Request::SwitchGlobal {
                res: vm1(),
                switch: *switch,
                on: *on,
                timeout: 7,
            };
            assert_eq!(request(&["--timeout=7", cmd, "vm1"]).1, want, "{cmd}");
            // `all` and lists run one request per resource.
            let cli = parse(&[cmd, "vm1,vm2"]);
            assert_eq!(res_arg(&cli.cmd), Some("vm1,vm2"), "{cmd}");
        }
    }

    #[test]
    fn resource_lifecycle_requests() {
        assert_eq!(
            request(&["join-resource", "vm1", "/dev/vg/vm1"]).1,
            Request::JoinResource {
                res: vm1(),
                disk: "/dev/vg/vm1".into()
            }
        );
        let (name, req) = request(&["leave-resource", "vm1"]);
        assert_eq!(name, "leave-resource");
        assert_eq!(
            req,
            Request::LeaveResource {
                res: vm1(),
                force: false
            }
        );
        assert_eq!(
            request(&["--force", "delete-resource", "vm1"]).1,
            Request::DeleteResource {
                res: vm1(),
                force: true
            }
        );
        assert_eq!(
            request(&["resize", "vm1", "2G"]).1,
            Request::Resize {
                res: vm1(),
                size: Some(2 << 30)
            }
        );
        assert_eq!(
            request(&["resize", "vm1"]).1,
            Request::Resize {
                res: vm1(),
                size: None
            }
        );
        assert_eq!(
            request(&["fake-sync", "vm1"]).1,
            Request::FakeSync { res: vm1() }
        );
        assert_eq!(
            request(&["invalidate", "vm1"]).1,
            Request::Invalidate { res: vm1() }
        );
        assert_eq!(request(&["cron"]), ("cron", Request::Cron));
    }

    #[test]
    fn systemd_requests() {
        assert_eq!(
            request(&["set-systemd-unit", "vm1", "app-vm1.service"]).1,
            Request::SetSystemdUnit {
                res: vm1(),
                start: "app-vm1.service".into(),
                stop: None
            }
        );
        assert_eq!(
            request(&["set-systemd-unit", "vm1", ""]).1,
            Request::SetSystemdUnit {
                res: vm1(),
                start: String::new(),
                stop: None
            }
        );
        assert_eq!(
            request(&["set-systemd-want", "vm1", "(none)"]).1,
            Request::SetSystemdWant {
                res: vm1(),
                want: "(none)".into()
            }
        );
        assert_eq!(
            request(&["systemd-trigger"]).1,
            Request::SystemdTrigger { res: None }
        );
        assert_eq!(
            request(&["systemd-trigger-extern", "vm1"]).1,
            Request::SystemdTrigger { res: Some(vm1()) }
        );
    }

    #[test]
    fn bad_arguments_are_refused_before_sending() {
        for args in [
            &["resize", "vm1", "lots"][..],
            &["attach", "a/b"],
            &["up", "all"],
        ] {
            let cli = parse(args);
            assert!(resource_request(&cli.cmd, 0, 30).is_err(), "{args:?}");
        }
        // Other commands are not resource requests.
        let cli = parse(&["view", "vm1"]);
        assert!(resource_request(&cli.cmd, 0, 30).unwrap().is_none());
        assert!(Cli::try_parse_from(["marsadm", "wait-resource", "vm1"]).is_err());
    }

    #[test]
    fn force_twice_confirms_a_forced_switch() {
        let primary = |force, confirmed| Request::Primary {
            res: vm1(),
            force,
            timeout: 30,
            confirmed,
        };
        assert_eq!(request(&["primary", "vm1"]).1, primary(false, false));
        assert_eq!(
            request(&["primary", "--force", "vm1"]).1,
            primary(true, false)
        );
        assert_eq!(
            request(&["primary", "--force", "--force", "vm1"]).1,
            primary(true, true)
        );
        assert_eq!(
            request(&["--force", "--force", "primary", "vm1"]).1,
            primary(true, true)
        );
        // Other commands take one --force as before.
        assert_eq!(
            request(&["--force", "--force", "leave-resource", "vm1"]).1,
            Request::LeaveResource {
                res: vm1(),
                force: true
            }
        );
        assert!(parse(&["--dry-run", "primary", "vm1"]).dry_run);
    }

    #[test]
    fn token_lifetimes() {
        assert_eq!(parse_ttl("600"), Ok(600));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("2h"), Ok(7200));
        assert_eq!(parse_ttl("1d"), Ok(86_400));
        for bad in ["", "0", "h", "1w", "31d", "99999999999999999999d", "-1s"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        assert!(Cli::try_parse_from(["marsadm", "join-token", "--ttl", "5m"]).is_ok());
    }
}
