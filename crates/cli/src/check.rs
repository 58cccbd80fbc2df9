//! `marsadm check [RES|all]`: a Nagios/Icinga plugin. The evaluation is pure (a view and the
//! thresholds in, a status with its problems and perfdata out) so that every rule is tested
//! over constructed views; `main.rs` fetches the view and prints.
//!
//! The rules follow MARS's own Nagios checks: the root's space (critical at ≥ 70 % used or
//! ≤ 4 GiB free, warning at ≥ 30 % used), per resource a split brain and emergency mode
//! (critical), the designated primary unreachable (critical; "unreachable" = silent for the
//! view window, which `check` sets to `--unreachable`, default 300 s), replication switched off
//! here (warning), and a backlog too large (lag thresholds) or not shrinking (`--stalled`).

use std::fmt::Write as _;

use mars_api::{ClusterView, DiskState, ResourceView, Role, SpaceView};
use mars_config::format_size;
use serde::Serialize;

/// Nagios plugin states, in order of severity; the value is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }
}

/// A space threshold: a share of the filesystem used, or bytes left free.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SpaceLimit {
    /// Reached when at least this percent is used.
    UsedPercent(f64),
    /// Reached when at most this many bytes are free.
    FreeBytes(u64),
}

impl SpaceLimit {
    /// `70%` or a size such as `4G` (bytes free).
    pub fn parse(s: &str) -> Result<SpaceLimit, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?}: a percentage such as 70%"))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{s:?}: a percentage between 0% and 100%"));
            }
            Ok(SpaceLimit::UsedPercent(v))
        } else {
            mars_config::parse_size(s)
                .map(SpaceLimit::FreeBytes)
                .map_err(|e| format!("{s:?}: neither a percentage (70%) nor a size (4G): {e}"))
        }
    }

    fn reached(&self, free: u64, total: u64) -> bool {
        match *self {
            SpaceLimit::UsedPercent(p) => total > 0 && used_percent(free, total) >= p,
            SpaceLimit::FreeBytes(b) => free <= b,
        }
    }
}

fn used_percent(free: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        total.saturating_sub(free) as f64 * 100.0 / total as f64
    }
}

/// The thresholds (`marsadm check --help` shows the defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Lag in seconds (age of the oldest unapplied write) of any member.
    pub lag_warn: f64,
    pub lag_crit: f64,
    /// Lag in bytes, when given.
    pub lag_bytes_warn: Option<u64>,
    pub lag_bytes_crit: Option<u64>,
    /// Any of these reached: warning / critical.
    pub space_warn: Vec<SpaceLimit>,
    pub space_crit: Vec<SpaceLimit>,
    /// Replication here with something to do and no progress while the lag is at least this
    /// many seconds: critical.
    pub stalled: f64,
    /// A member's clock this many seconds from this host's (either way): warning / critical.
    pub skew_warn: f64,
    pub skew_crit: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            lag_warn: 60.0,
            lag_crit: 300.0,
            lag_bytes_warn: None,
            lag_bytes_crit: None,
            space_warn: vec![SpaceLimit::UsedPercent(30.0)],
            space_crit: vec![
                SpaceLimit::UsedPercent(70.0),
                SpaceLimit::FreeBytes(4 << 30),
            ],
            stalled: 300.0,
            skew_warn: mars_api::CLOCK_SKEW_WARN_SECS,
            skew_crit: 3600.0,
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub status: Status,
    /// The resource, or `None` for the host (space).
    pub resource: Option<String>,
    pub text: String,
}

/// One perfdata item: `label=value[UOM];warn;crit;min;max`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Perf {
    pub label: String,
    pub value: f64,
    pub uom: &'static str,
    pub warn: Option<f64>,
    pub crit: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Perf {
    fn text(&self) -> String {
        let n = |v: Option<f64>| v.map(num).unwrap_or_default();
        let label = if self.label.contains([' ', '=', '\'']) {
            format!("'{}'", self.label.replace('\'', "''"))
        } else {
            self.label.clone()
        };
        format!(
            "{label}={}{};{};{};{};{}",
            num(self.value),
            self.uom,
            n(self.warn),
            n(self.crit),
            n(self.min),
            n(self.max)
        )
    }
}

/// A number as perfdata writes it: integers without a fraction, others with up to 3 digits.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub status: Status,
    pub problems: Vec<Problem>,
    pub perfdata: Vec<Perf>,
    /// Resources checked.
    pub resources: usize,
}

impl Outcome {
    /// A check that could not run (daemon unreachable, bad arguments, refused).
    pub fn unknown(why: String) -> Outcome {
        Outcome {
            status: Status::Unknown,
            problems: vec![Problem {
                status: Status::Unknown,
                resource: None,
                text: why,
            }],
            perfdata: Vec::new(),
            resources: 0,
        }
    }

    /// The plugin's output line: `MARS STATUS: text | perfdata`.
    pub fn line(&self) -> String {
        let mut s = format!("MARS {}: ", self.status.word());
        if self.problems.is_empty() {
            let _ = write!(
                s,
                "{} resource{} fine",
                self.resources,
                if self.resources == 1 { "" } else { "s" }
            );
        } else {
            let texts: Vec<String> = self
                .problems
                .iter()
                .map(|p| match &p.resource {
                    Some(r) => format!("{r} {}", p.text),
                    None => p.text.clone(),
                })
                .collect();
            s += &texts.join("; ");
        }
        if !self.perfdata.is_empty() {
            s += " | ";
            s += &self
                .perfdata
                .iter()
                .map(Perf::text)
                .collect::<Vec<_>>()
                .join(" ");
        }
        s
    }
}

/// `marsadm check`'s options.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// A resource, or `all` (default).
    pub res: Option<String>,
    /// Lag in seconds (age of the oldest write a member has not applied) for a warning.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub lag_warn: f64,
    /// Lag in seconds for a critical.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    pub lag_crit: f64,
    /// Lag in bytes for a warning (default: none).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub lag_bytes_warn: Option<u64>,
    /// Lag in bytes for a critical (default: none).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub lag_bytes_crit: Option<u64>,
    /// Root space for a warning: percent used (`30%`) or bytes free (`8G`); comma list.
    #[arg(long, default_value = "30%", value_name = "LIMITS", value_parser = parse_limits)]
    pub space_warn: Limits,
    /// Root space for a critical (MARS: ≥ 70 % used or ≤ 4 GiB free).
    #[arg(long, default_value = "70%,4G", value_name = "LIMITS", value_parser = parse_limits)]
    pub space_crit: Limits,
    /// Critical when replication here has work, makes no progress and its oldest unapplied
    /// write is this old.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub stalled: u64,
    /// Critical when the designated primary was not heard from for this long.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub unreachable: u64,
    /// Warning when a member's clock is this many seconds ahead of or behind this host's
    /// (measured from its liveness stamps; needs `check all`, the default).
    #[arg(long, default_value_t = mars_api::CLOCK_SKEW_WARN_SECS, value_name = "SECONDS")]
    pub skew_warn: f64,
    /// Critical at this skew (certificates are valid from an hour before they were issued: a
    /// clock an hour behind fails TLS with a renewed host).
    #[arg(long, default_value_t = 3600.0, value_name = "SECONDS")]
    pub skew_crit: f64,
}

/// A comma list of [`SpaceLimit`]s (a type of its own so that clap takes it as one value).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits(pub Vec<SpaceLimit>);

fn parse_limits(s: &str) -> Result<Limits, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(SpaceLimit::parse)
        .collect::<Result<Vec<_>, _>>()
        .map(Limits)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    mars_config::parse_size(s).map_err(|e| e.to_string())
}

impl CheckArgs {
    pub fn thresholds(&self) -> Result<Thresholds, String> {
        let t = Thresholds {
            lag_warn: self.lag_warn,
            lag_crit: self.lag_crit,
            lag_bytes_warn: self.lag_bytes_warn,
            lag_bytes_crit: self.lag_bytes_crit,
            space_warn: self.space_warn.0.clone(),
            space_crit: self.space_crit.0.clone(),
            stalled: self.stalled as f64,
            skew_warn: self.skew_warn,
            skew_crit: self.skew_crit,
        };
        if !(t.lag_warn >= 0.0 && t.lag_crit >= 0.0) {
            return Err("--lag-warn and --lag-crit are seconds (≥ 0)".into());
        }
        if !(t.skew_warn >= 0.0 && t.skew_crit >= 0.0) {
            return Err("--skew-warn and --skew-crit are seconds (≥ 0)".into());
        }
        Ok(t)
    }
}

/// Evaluates `view` (this host's view of the resources checked).
pub fn evaluate(view: &ClusterView, t: &Thresholds) -> Outcome {
    let mut problems = Vec::new();
    let mut perfdata = Vec::new();
    if let Some(sp) = &view.space {
        space(sp, t, &mut problems, &mut perfdata);
    }
    for r in &view.resources {
        resource(&view.host, r, t, &mut problems, &mut perfdata);
    }
    clocks(view, t, &mut problems, &mut perfdata);
    // Worst first; within one severity in the order found.
    problems.sort_by_key(|p| std::cmp::Reverse(p.status));
    Outcome {
        status: problems
            .iter()
            .map(|p| p.status)
            .max()
            .unwrap_or(Status::Ok),
        problems,
        perfdata,
        resources: view.resources.len(),
    }
}

/// The members' clocks against this host's (only when the view lists the members: `check all`).
fn clocks(view: &ClusterView, t: &Thresholds, problems: &mut Vec<Problem>, perf: &mut Vec<Perf>) {
    let others: Vec<_> = view.members.iter().filter(|m| !m.this_host).collect();
    if others.is_empty() {
        return;
    }
    let mut worst = 0.0f64;
    for m in others {
        let Some(d) = m.clock_skew_secs else { continue };
        worst = worst.max(d.abs());
        let status = if d.abs() >= t.skew_crit {
            Status::Critical
        } else if d.abs() >= t.skew_warn {
            Status::Warning
        } else {
            continue;
        };
        problems.push(Problem {
            status,
            resource: None,
            text: format!(
                "clock of {} {:.0} s {}",
                m.host,
                d.abs(),
                if d > 0.0 { "ahead" } else { "behind" }
            ),
        });
    }
    perf.push(Perf {
        label: "clock_skew".into(),
        value: (worst * 1000.0).round() / 1000.0,
        uom: "s",
        warn: Some(t.skew_warn),
        crit: Some(t.skew_crit),
        min: Some(0.0),
        max: None,
    });
}

fn space(sp: &SpaceView, t: &Thresholds, problems: &mut Vec<Problem>, perf: &mut Vec<Perf>) {
    let (Some(free), Some(total)) = (sp.free_bytes, sp.total_bytes) else {
        problems.push(Problem {
            status: Status::Unknown,
            resource: None,
            text: format!("free space of {} unknown", sp.root),
        });
        return;
    };
    let used = used_percent(free, total);
    let status = if t.space_crit.iter().any(|l| l.reached(free, total)) {
        Status::Critical
    } else if t.space_warn.iter().any(|l| l.reached(free, total)) {
        Status::Warning
    } else {
        Status::Ok
    };
    if status != Status::Ok {
        let mut text = format!(
            "root {} {used:.0}% used, {} free",
            sp.root,
            format_size(free)
        );
        if let Some(s) = sp.full_in_secs {
            let _ = write!(
                text,
                ", full in {:.0} min at the current log rate",
                s / 60.0
            );
        }
        problems.push(Problem {
            status,
            resource: None,
            text,
        });
    }
    let pct = |ls: &[SpaceLimit]| {
        ls.iter().find_map(|l| match l {
            SpaceLimit::UsedPercent(p) => Some(*p),
            SpaceLimit::FreeBytes(_) => None,
        })
    };
    let bytes = |ls: &[SpaceLimit]| {
        ls.iter().find_map(|l| match l {
            SpaceLimit::FreeBytes(b) => Some(*b as f64),
            SpaceLimit::UsedPercent(_) => None,
        })
    };
    perf.push(Perf {
        label: "root_used".into(),
        value: (used * 10.0).round() / 10.0,
        uom: "%",
        warn: pct(&t.space_warn),
        crit: pct(&t.space_crit),
        min: Some(0.0),
        max: Some(100.0),
    });
    // Free bytes: the thresholds are lower bounds, written as Nagios ranges would need `@`;
    // they are given as plain numbers for graphing.
    perf.push(Perf {
        label: "root_free".into(),
        value: free as f64,
        uom: "B",
        warn: bytes(&t.space_warn),
        crit: bytes(&t.space_crit),
        min: Some(0.0),
        max: Some(total as f64),
    });
}

fn resource(
    me: &str,
    r: &ResourceView,
    t: &Thresholds,
    problems: &mut Vec<Problem>,
    perf: &mut Vec<Perf>,
) {
    let mut add = |status, text: String| {
        problems.push(Problem {
            status,
            resource: Some(r.name.clone()),
            text,
        })
    };
    if let Some(sb) = &r.split_brain {
        let sides: Vec<String> = sb.sides.iter().map(|s| s.hosts.join("+")).collect();
        add(
            Status::Critical,
            if sides.is_empty() {
                "split brain".into()
            } else {
                format!("split brain ({})", sides.join(" vs "))
            },
        );
    }
    for m in &r.members {
        if m.emergency || m.disk_state == DiskState::EmergencyMode {
            add(Status::Critical, format!("emergency mode on {}", m.host));
        }
    }
    let designated = r
        .members
        .iter()
        .find(|m| Some(m.host.as_str()) == r.primary.as_deref());
    if r.primary.is_none() {
        add(Status::Warning, "no primary designated".into());
    } else if r.primary.as_deref() != Some(me) {
        if let Some(p) = designated.filter(|p| !p.alive) {
            add(Status::Critical, format!("primary {} unreachable", p.host));
        }
    }
    // This host's own replication switches (MARS's `todo` flags: `-` is off).
    if r.role != Role::Primary {
        let flags: Vec<char> = r.flags.chars().collect();
        let off = |i: usize| flags.get(i).is_some_and(|c| *c == '-');
        let mut offs = Vec::new();
        for (i, what) in [(2, "attach"), (3, "sync"), (4, "fetch"), (5, "replay")] {
            if off(i) {
                offs.push(what);
            }
        }
        if !offs.is_empty() {
            add(
                Status::Warning,
                format!("{} switched off here", offs.join(", ")),
            );
        }
    }
    if let Some(st) = &r.stuck {
        add(Status::Warning, format!("stuck here: {st}"));
    }
    if let Some(e) = &r.error {
        add(Status::Warning, format!("not served here: {e}"));
    }
    // Lag of every member that is not the acting primary.
    let mut worst_secs: Option<f64> = None;
    let mut worst_bytes: Option<u64> = None;
    for m in r.members.iter().filter(|m| m.role != Some(Role::Primary)) {
        if let Some(s) = m.lag_secs {
            worst_secs = Some(worst_secs.map_or(s, |w: f64| w.max(s)));
            let st = if s >= t.lag_crit {
                Status::Critical
            } else if s >= t.lag_warn {
                Status::Warning
            } else {
                Status::Ok
            };
            if st != Status::Ok {
                add(st, format!("{} lags {s:.0} s", m.host));
            }
        }
        if let Some(b) = m.behind {
            worst_bytes = Some(worst_bytes.map_or(b, |w| w.max(b)));
            let st = if t.lag_bytes_crit.is_some_and(|c| b >= c) {
                Status::Critical
            } else if t.lag_bytes_warn.is_some_and(|w| b >= w) {
                Status::Warning
            } else {
                Status::Ok
            };
            if st != Status::Ok {
                add(st, format!("{} is {} behind", m.host, format_size(b)));
            }
        }
        if let Some(y) = &m.sync {
            if y.rest() > 0 && y.rate == 0 {
                add(
                    Status::Warning,
                    format!("sync of {} not progressing", m.host),
                );
            }
        }
    }
    // Not shrinking: this host has log to fetch or replay, nothing moves, and its oldest
    // unapplied write is older than --stalled.
    let my_lag = r
        .members
        .iter()
        .find(|m| m.host == me)
        .and_then(|m| m.lag_secs);
    let todo = [&r.fetch, &r.replay]
        .iter()
        .filter_map(|p| p.as_ref())
        .any(|p| p.rest() > 0);
    let moving = [&r.fetch, &r.replay]
        .iter()
        .filter_map(|p| p.as_ref())
        .any(|p| p.rate > 0);
    if r.role != Role::Primary && todo && !moving && my_lag.is_some_and(|l| l >= t.stalled) {
        add(
            Status::Critical,
            format!(
                "replication here not progressing for {:.0} s",
                my_lag.unwrap_or(0.0)
            ),
        );
    }
    let label = |what: &str| format!("{}_{what}", r.name);
    perf.push(Perf {
        label: label("lag"),
        value: worst_secs.unwrap_or(0.0),
        uom: "s",
        warn: Some(t.lag_warn),
        crit: Some(t.lag_crit),
        min: Some(0.0),
        max: None,
    });
    perf.push(Perf {
        label: label("lag_bytes"),
        value: worst_bytes.unwrap_or(0) as f64,
        uom: "B",
        warn: t.lag_bytes_warn.map(|v| v as f64),
        crit: t.lag_bytes_crit.map(|v| v as f64),
        min: Some(0.0),
        max: None,
    });
}

/// What the view shows as the designated primary when there is none.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::fixtures::{member, progress, secondary, MIB};
    use mars_api::{SplitBrainView, SplitSide};

    fn space(free: u64, total: u64) -> SpaceView {
        SpaceView {
            root: "/var/lib/mars".into(),
            free_bytes: Some(free),
            used_bytes: Some(total - free),
            total_bytes: Some(total),
            log_bytes: 0,
            preallocated_bytes: 0,
            log_growth_bytes_per_sec: 0.0,
            full_in_secs: None,
            min_free_bytes: 1 << 30,
            emergency_free_bytes: 512 << 20,
            resources: vec![],
        }
    }

    /// Host beta, secondary of vm1 (primary alpha), everything fine, 10 % of 100 GiB used.
    fn healthy() -> ClusterView {
        let mut r = secondary();
        let mut a = member("alpha", true);
        a.role = Some(Role::Primary);
        let mut b = member("beta", true);
        b.lag_secs = Some(0.0);
        b.behind = Some(0);
        r.members = vec![a, b];
        ClusterView {
            host: "beta".into(),
            cluster: None,
            members: vec![],
            resources: vec![r],
            space: Some(Box::new(space(90 << 30, 100 << 30))),
        }
    }

    #[test]
    fn a_member_clock_far_off_warns_then_is_critical() {
        let m = |h: &str, this: bool, skew: Option<f64>| mars_api::MemberView {
            host: h.into(),
            address: "10.0.0.1:7777".into(),
            this_host: this,
            alive: true,
            age_secs: Some(0.5),
            connected: true,
            error: None,
            streams: vec![],
            clock_skew_secs: skew,
        };
        let mut v = healthy();
        v.members = vec![m("alpha", false, Some(0.2)), m("beta", true, None)];
        let t = Thresholds::default();
        let o = evaluate(&v, &t);
        assert_eq!(o.status, Status::Ok, "{}", o.line());
        assert!(
            o.line().ends_with(" clock_skew=0.200s;5;3600;0;"),
            "{}",
            o.line()
        );
        v.members[0].clock_skew_secs = Some(300.4);
        let o = evaluate(&v, &t);
        assert_eq!(o.status, Status::Warning);
        assert!(
            o.line()
                .starts_with("MARS WARNING: clock of alpha 300 s ahead | "),
            "{}",
            o.line()
        );
        v.members[0].clock_skew_secs = Some(-7200.0);
        let o = evaluate(&v, &t);
        assert_eq!(o.status, Status::Critical);
        assert!(o
            .line()
            .starts_with("MARS CRITICAL: clock of alpha 7200 s behind | "));
        // Without the member list (`check RES`) nothing is said about clocks.
        v.members.clear();
        assert!(!evaluate(&v, &t).line().contains("clock"));
    }

    #[test]
    fn healthy_is_ok_with_perfdata() {
        let o = evaluate(&healthy(), &Thresholds::default());
        assert_eq!(o.status, Status::Ok);
        assert_eq!(
            o.line(),
            "MARS OK: 1 resource fine | root_used=10%;30;70;0;100 \
             root_free=96636764160B;;4294967296;0;107374182400 vm1_lag=0s;60;300;0; \
             vm1_lag_bytes=0B;;;0;"
        );
    }

    #[test]
    fn lag_warns_then_is_critical_and_bytes_count_when_asked() {
        let mut v = healthy();
        v.resources[0].members[1].lag_secs = Some(90.0);
        v.resources[0].members[1].behind = Some(5 * MIB);
        let t = Thresholds::default();
        let o = evaluate(&v, &t);
        assert_eq!(o.status, Status::Warning);
        assert!(
            o.line().starts_with("MARS WARNING: vm1 beta lags 90 s | "),
            "{}",
            o.line()
        );
        assert!(o.line().contains("vm1_lag=90s;60;300;0;"));
        assert!(o.line().contains("vm1_lag_bytes=5242880B;;;0;"));
        v.resources[0].members[1].lag_secs = Some(301.0);
        assert_eq!(evaluate(&v, &t).status, Status::Critical);
        let t = Thresholds {
            lag_bytes_crit: Some(MIB),
            ..Thresholds::default()
        };
        v.resources[0].members[1].lag_secs = Some(1.0);
        let o = evaluate(&v, &t);
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.line().contains("vm1 beta is 5.00 MiB behind"),
            "{}",
            o.line()
        );
    }

    #[test]
    fn split_brain_and_emergency_are_critical_worst_first() {
        let mut v = healthy();
        v.resources[0].members[1].lag_secs = Some(70.0);
        v.resources[0].split_brain = Some(SplitBrainView {
            logfile: 3,
            sides: vec![
                SplitSide {
                    hosts: vec!["alpha".into()],
                    bytes: 1,
                },
                SplitSide {
                    hosts: vec!["beta".into()],
                    bytes: 2,
                },
            ],
        });
        let o = evaluate(&v, &Thresholds::default());
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.line().starts_with(
                "MARS CRITICAL: vm1 split brain (alpha vs beta); vm1 beta lags 70 s | "
            ),
            "{}",
            o.line()
        );
        let mut v = healthy();
        v.resources[0].members[0].emergency = true;
        let o = evaluate(&v, &Thresholds::default());
        assert_eq!(o.status, Status::Critical);
        assert!(o.line().contains("vm1 emergency mode on alpha"));
    }

    #[test]
    fn primary_unreachable_switches_off_and_stalls() {
        let mut v = healthy();
        v.resources[0].members[0].alive = false;
        let o = evaluate(&v, &Thresholds::default());
        assert_eq!(o.status, Status::Critical);
        assert!(o.line().contains("vm1 primary alpha unreachable"));

        let mut v = healthy();
        v.resources[0].flags = "dCAS-R".into();
        let o = evaluate(&v, &Thresholds::default());
        assert_eq!(o.status, Status::Warning);
        assert!(
            o.line().contains("vm1 fetch switched off here"),
            "{}",
            o.line()
        );

        // Something to replay, no rate, oldest unapplied write 400 s old: not shrinking.
        let mut v = healthy();
        v.resources[0].replay = Some(progress(0, 10 * MIB, 0));
        v.resources[0].members[1].lag_secs = Some(400.0);
        let o = evaluate(&v, &Thresholds::default());
        assert!(o
            .line()
            .contains("replication here not progressing for 400 s"));
        // Moving: only the lag rule.
        v.resources[0].replay = Some(progress(0, 10 * MIB, MIB));
        let o = evaluate(&v, &Thresholds::default());
        assert!(!o.line().contains("not progressing"));
        assert_eq!(o.status, Status::Critical);

        let mut v = healthy();
        v.resources[0].primary = None;
        assert_eq!(evaluate(&v, &Thresholds::default()).status, Status::Warning);
    }

    #[test]
    fn space_thresholds_by_percent_and_bytes() {
        let t = Thresholds::default();
        let mut v = healthy();
        v.space = Some(Box::new(space(60 << 30, 100 << 30)));
        let o = evaluate(&v, &t);
        assert_eq!(o.status, Status::Warning);
        assert!(o
            .line()
            .contains("root /var/lib/mars 40% used, 60.00 GiB free"));
        v.space = Some(Box::new(space(25 << 30, 100 << 30)));
        assert_eq!(evaluate(&v, &t).status, Status::Critical);
        // 4 GiB left of a large filesystem: critical though only 0.4 % is used... of 1 TiB
        // with 4 GiB free it is 99.6 % used; a small one with 3 GiB free of 5 GiB: 40 %.
        v.space = Some(Box::new(space(3 << 30, 5 << 30)));
        assert_eq!(evaluate(&v, &t).status, Status::Critical);
        let lax = Thresholds {
            space_warn: vec![SpaceLimit::parse("95%").unwrap()],
            space_crit: vec![SpaceLimit::parse("1G").unwrap()],
            ..Thresholds::default()
        };
        assert_eq!(evaluate(&v, &lax).status, Status::Ok);
        let mut s = space(0, 0);
        s.free_bytes = None;
        v.space = Some(Box::new(s));
        assert_eq!(evaluate(&v, &t).status, Status::Unknown);
    }

    #[test]
    fn space_limits_parse() {
        assert_eq!(SpaceLimit::parse("70%"), Ok(SpaceLimit::UsedPercent(70.0)));
        assert_eq!(SpaceLimit::parse("4G"), Ok(SpaceLimit::FreeBytes(4 << 30)));
        assert!(SpaceLimit::parse("170%").is_err());
        assert!(SpaceLimit::parse("x%").is_err());
        assert!(SpaceLimit::parse("lots").is_err());
    }

    #[test]
    fn unknown_and_perf_labels() {
        let o = Outcome::unknown("cannot reach marsd".into());
        assert_eq!(o.line(), "MARS UNKNOWN: cannot reach marsd");
        let p = Perf {
            label: "a b".into(),
            value: 1.5,
            uom: "s",
            warn: None,
            crit: None,
            min: None,
            max: None,
        };
        assert_eq!(p.text(), "'a b'=1.500s;;;;");
    }
}
