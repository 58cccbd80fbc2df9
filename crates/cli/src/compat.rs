//! MARS compatibility of the command line: MARS's spellings of global options (always
//! `--name=value`, short `-f`/`-d`/`-v`, `force-CMD`, `--ip-HOST=IP`), the old DRBD-style
//! command words MARS answers without doing anything, MARS's options that mean nothing here,
//! and MARS's digest and compression feature names.
//!
//! `docs/mars-compatibility.md` says, command by command and option by option, what matches
//! and what differs. The table test at the end of this file reads MARS's own command table
//! and global options (`crates/cli/tests/data/`) and fails when one of them is neither
//! accepted, nor answered as MARS answers it, nor a documented difference.

use clap::Args;

/// How MARS's `marsadm` answers the command words it keeps from DRBD's `drbdadm` but that are
/// no MARS commands (its `ignore_cmd`, `senseless_cmd`, `nyi_cmd`, `forbidden_cmd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legacy {
    /// "ignoring command …": nothing to do, success.
    Ignored,
    /// "command … makes no sense with MARS": nothing to do, success.
    Senseless,
    /// "command … is not yet implemented": refused (MARS has view macros of these names).
    NotYetImplemented,
    /// "command … cannot be used with MARS": refused.
    Forbidden,
}

/// MARS's table (userspace/marsadm `%cmd_table`, the entries with a plain handler), with what
/// to use instead where there is something.
pub const LEGACY: &[(&str, Legacy, &str)] = &[
    ("adjust", Legacy::Ignored, ""),
    ("check-resize", Legacy::Ignored, ""),
    ("get-gi", Legacy::Ignored, ""),
    ("show-gi", Legacy::Ignored, ""),
    ("outdate", Legacy::Ignored, ""),
    ("syncer", Legacy::Ignored, ""),
    ("hidden-commands", Legacy::Ignored, ""),
    ("create-md", Legacy::Senseless, ""),
    ("dump-md", Legacy::Senseless, ""),
    ("dump", Legacy::Senseless, ""),
    ("new-current-uuid", Legacy::Senseless, ""),
    ("cstate", Legacy::NotYetImplemented, "view-cstate"),
    ("dstate", Legacy::NotYetImplemented, "view-dstate"),
    ("status", Legacy::NotYetImplemented, "view-status"),
    (
        "invalidate-remote",
        Legacy::Forbidden,
        "`marsadm invalidate RES` on the host whose replica is to be discarded",
    ),
    (
        "verify",
        Legacy::Forbidden,
        "`marsadm invalidate RES` on a replica you doubt: the fast full sync compares every chunk",
    ),
];

/// The legacy entry of a command word.
pub fn legacy(cmd: &str) -> Option<(Legacy, &'static str)> {
    LEGACY
        .iter()
        .find(|(n, _, _)| *n == cmd)
        .map(|&(_, l, hint)| (l, hint))
}

/// MARS's answer to a legacy command word `cmd` on `res`: `Ok(line)` for the words it ignores
/// (print the line, exit 0), `Err(message)` for the words it refuses.
pub fn legacy_answer(cmd: &str, res: &str, l: Legacy, hint: &str) -> Result<String, String> {
    let use_instead = if hint.is_empty() {
        String::new()
    } else {
        format!("; use {hint}")
    };
    match l {
        Legacy::Ignored => Ok(format!("ignoring command '{cmd}' on resource '{res}'")),
        Legacy::Senseless => Ok(format!(
            "command '{cmd}' makes no sense with MARS (ignoring on resource '{res}')"
        )),
        Legacy::NotYetImplemented => Err(format!(
            "command '{cmd}' on resource '{res}' is not yet implemented{use_instead}"
        )),
        Legacy::Forbidden => Err(format!(
            "command '{cmd}' on resource '{res}' cannot be used with MARS (might affect too \
             many hosts, lead to undesired consequences){use_instead}"
        )),
    }
}

/// Global options of MARS's `marsadm` that tune its own implementation (ssh probes, symlink
/// tree deletions, backups, syslog, phase stepping): accepted so that MARS command lines and
/// scripts run unchanged, without effect here. `docs/mars-compatibility.md` says why for each.
#[derive(Debug, Clone, Default, Args)]
pub struct MarsOnly {
    /// MARS: ignore deleted peers in reports (no deleted peers linger here).
    #[arg(long, global = true, hide = true, allow_negative_numbers = true)]
    ignore_deleted_peers: Option<i64>,
    /// MARS: limit of pending deletion links (obsolete in MARS too).
    #[arg(long, global = true, hide = true, allow_negative_numbers = true)]
    max_deletions: Option<i64>,
    /// MARS: create a new logfile only when fewer than this exist (`cron`'s log rotation).
    #[arg(long, global = true, hide = true)]
    thresh_logfiles: Option<u64>,
    /// MARS: with --thresh-logfiles, the size in GB the last logfile must reach.
    #[arg(long, global = true, hide = true)]
    thresh_logsize: Option<u64>,
    /// MARS: step interactively through the phases of a command.
    #[arg(long, global = true, hide = true)]
    singlestep: bool,
    /// MARS: fail on purpose in phase N (MARS's own tests).
    #[arg(long, global = true, hide = true)]
    error_injection_phase: Option<u64>,
    /// MARS: historic deletion method (obsolete in MARS too).
    #[arg(long, global = true, hide = true)]
    delete_method: Option<u64>,
    /// MARS: the syslog messenger marsadm logs its commands with.
    #[arg(long, global = true, hide = true)]
    logger: Option<String>,
    /// MARS: `cron` deletes backups older than this many days.
    #[arg(long, global = true, hide = true)]
    autoclean: Option<u64>,
    /// MARS: `cron` and `link-purge-all` delete backups and old links after this many hours.
    #[arg(long, global = true, hide = true, alias = "keep-backups")]
    keep_backup_hours: Option<u64>,
    /// MARS: 0 turns off the systemd actions of this marsadm run.
    #[arg(long, global = true, hide = true)]
    systemd_enable: Option<u8>,
    /// MARS: where merge-cluster and split-cluster keep backups.
    #[arg(long, global = true, hide = true)]
    backup_dir: Option<String>,
    /// MARS: no ssh probes.
    #[arg(long, global = true, hide = true)]
    no_ssh: bool,
    /// MARS: the ssh port of its probes and rsync.
    #[arg(long, global = true, hide = true)]
    ssh_port: Option<u16>,
    /// MARS: the ssh options of its probes and rsync.
    #[arg(long, global = true, hide = true, allow_hyphen_values = true)]
    ssh_opts: Option<String>,
}

impl MarsOnly {
    /// Warnings for the options whose absence of effect an operator would not expect.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.systemd_enable == Some(0) {
            w.push(
                "--systemd-enable=0 has no effect: marsd, not marsadm, runs the systemd stack \
                 (set-systemd-want RES '(none)' stops it)"
                    .to_string(),
            );
        }
        if self.singlestep {
            w.push("--singlestep has no effect: commands are not split into phases here".into());
        }
        if self.error_injection_phase.is_some_and(|p| p > 0) {
            w.push("--error-injection-phase has no effect here".into());
        }
        w
    }
}

/// Rewrites MARS's spellings of global options into ours (clap's): `-f`, `-d`, `-v`;
/// `--verbose=N` as N times `--verbose`; a bare `--parallel` (MARS: unlimited) as
/// `--parallel=0`, a negative one (MARS: one after the other) as `--parallel=1`;
/// `--ip-HOST=IP` and a global `--ip=IP` before the command as `--peer-ip=HOST=IP` and
/// `--peer-ip=IP`; `--ssh_port`/`--ssh_opts`; and `force-CMD` as `--force CMD`.
pub fn normalize(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut args = args.into_iter();
    let mut out: Vec<String> = args.next().into_iter().collect();
    let rest: Vec<String> = args.collect();
    let mut command_seen = false;
    // create-cluster and join-cluster take `--ip` themselves (this host's address).
    let mut own_ip = false;
    let mut i = 0;
    while i < rest.len() {
        let a = &rest[i];
        i += 1;
        if a == "--" {
            out.extend(rest[i - 1..].iter().cloned());
            break;
        }
        match a.as_str() {
            "-f" => out.push("--force".into()),
            "-d" => out.push("--dry-run".into()),
            // MARS checks -v for --verbose before --version.
            "-v" => out.push("--verbose".into()),
            "--parallel" => {
                // Ours also takes `--parallel N`; a bare one is MARS's "no limit".
                if rest.get(i).is_some_and(|n| n.parse::<i64>().is_ok()) {
                    out.push(a.clone());
                } else {
                    out.push("--parallel=0".into());
                }
            }
            _ => {
                if let Some(n) = a.strip_prefix("--verbose=") {
                    let n = n.trim().parse::<i64>().unwrap_or(0).clamp(0, 10);
                    out.extend((0..n).map(|_| "--verbose".to_string()));
                } else if let Some(n) = a.strip_prefix("--parallel=") {
                    match n.trim().parse::<i64>() {
                        Ok(n) if n < 0 => out.push("--parallel=1".into()),
                        _ => out.push(a.clone()),
                    }
                } else if a == "--host" || a.starts_with("--host=") {
                    // Our global option is --as-host: systemd-generate has a --host of its
                    // own (the same meaning), which gets it back below.
                    out.push(a.replacen("--host", "--as-host", 1));
                } else if let Some(rest_) = a.strip_prefix("--ip-") {
                    out.push(format!("--peer-ip={rest_}"));
                } else if let (false, Some(ip)) = (own_ip, a.strip_prefix("--ip=")) {
                    out.push(format!("--peer-ip={ip}"));
                } else if let Some(v) = a.strip_prefix("--ssh_port") {
                    out.push(format!("--ssh-port{v}"));
                } else if let Some(v) = a.strip_prefix("--ssh_opts") {
                    out.push(format!("--ssh-opts{v}"));
                } else if !command_seen && !a.starts_with('-') && !takes_value(&out) {
                    command_seen = true;
                    let cmd = match a.strip_prefix("force-") {
                        Some(cmd) if !cmd.is_empty() => {
                            out.push("--force".into());
                            cmd
                        }
                        _ => a.as_str(),
                    };
                    own_ip = matches!(cmd, "create-cluster" | "join-cluster");
                    out.push(cmd.into());
                } else {
                    out.push(a.clone());
                }
            }
        }
    }
    if let Some(at) = out.iter().position(|a| a == "systemd-generate") {
        let mut own = Vec::new();
        let mut i = 1;
        while i < out.len() {
            if out[i] == "--as-host" && i + 1 < out.len() {
                own.push("--host".to_string());
                own.push(out.remove(i + 1));
                out.remove(i);
            } else if let Some(v) = out[i].strip_prefix("--as-host=") {
                own.push(format!("--host={v}"));
                out.remove(i);
            } else {
                i += 1;
            }
        }
        let at = out
            .iter()
            .position(|a| a == "systemd-generate")
            .unwrap_or(at);
        for (k, o) in own.into_iter().enumerate() {
            out.insert(at + 1 + k, o);
        }
    }
    out
}

/// The global options of ours that take their value as the next word (`--root /x`).
pub const VALUE_OPTIONS: &[&str] = &[
    "--root",
    "--timeout",
    "--window",
    "--parallel",
    "--threshold",
    "--stuck-seconds",
    "--host",
    "--as-host",
    "--peer-ip",
    "--macro",
];

/// Is the last word an option waiting for its value?
fn takes_value(out: &[String]) -> bool {
    out.last()
        .is_some_and(|l| out.len() > 1 && VALUE_OPTIONS.contains(&l.as_str()))
}

/// The command word and the word after it (MARS's resource argument) of a normalized line.
pub fn command_and_arg(args: &[String]) -> Option<(&str, &str)> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if VALUE_OPTIONS.contains(&a) {
            i += 2;
            continue;
        }
        if a.starts_with('-') {
            i += 1;
            continue;
        }
        let next = args.get(i + 1).map(String::as_str).unwrap_or("");
        return Some((a, next));
    }
    None
}

/// `--timeout`: seconds, or MARS's `-1` for "no limit".
pub fn parse_timeout(s: &str) -> Result<u64, String> {
    match s.trim() {
        "-1" => Ok(FOREVER_SECS),
        t => t
            .parse::<u64>()
            .map_err(|_| format!("{s:?} is not a number of seconds (or -1: no limit)")),
    }
}

/// What `--timeout=-1` stands for: a hundred years, far beyond any wait, small enough that
/// deadlines computed from it do not overflow.
pub const FOREVER_SECS: u64 = 100 * 365 * 86_400;

/// MARS's digest and compression feature names (its `%FEATURES_FLAGS`, listed under
/// `<features>` in `marsadm --help`).
pub const DIGESTS: &[&str] = &[
    "CHKSUM_CRC32",
    "CHKSUM_CRC32C",
    "CHKSUM_MD5",
    "CHKSUM_MD5_OLD",
    "CHKSUM_SHA1",
];
/// `COMPRESS_ZSTD` is ours (MARS has none); marsd implements `COMPRESS_LZ4` and
/// `COMPRESS_ZSTD` and ignores the other two.
pub const COMPRESSIONS: &[&str] = &[
    "COMPRESS_LZ4",
    "COMPRESS_LZO",
    "COMPRESS_ZLIB",
    "COMPRESS_ZSTD",
];

/// Checks a `|`-separated feature list against `known` and returns it normalized (the names
/// in the order given, without blanks or repeats); empty means none.
pub fn parse_features(s: &str, known: &[&str]) -> Result<String, String> {
    let mut names: Vec<&str> = Vec::new();
    for n in s.split('|').map(str::trim).filter(|n| !n.is_empty()) {
        if !known.contains(&n) {
            return Err(format!(
                "unknown feature {n:?}; known: {} (separated by |)",
                known.join(", ")
            ));
        }
        if !names.contains(&n) {
            names.push(n);
        }
    }
    Ok(names.join("|"))
}

#[cfg(test)]
mod tests;
