//! The view macros (`marsadm view-NAME RES [ARG]`): one table of every MARS macro name
//! (`tests/data/mars-macros.txt`) and our own few, each with its one-line help, its JSON type
//! and how to compute it from the view. The table feeds the evaluation, `marsadm --help`
//! (MARS lists its macros there too), the shell completions and the typo suggestions.
//!
//! MARS's complex macros are templates in its perl `marsadm`; `complex.rs` writes each out in
//! Rust so that it prints MARS's text. The primitive ones are in `prim.rs`; `format.rs` has
//! MARS's number formatting.

mod complex;
pub mod format;
mod prim;
pub mod run;
#[cfg(test)]
mod tests;

use std::sync::LazyLock;

use anyhow::{bail, Context, Result};
use mars_api::{ClusterView, ResourceView, SwitchKind};

use prim::{bit, num, Job};

/// How `view-NAME --json` types a macro's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacroType {
    /// A byte amount, count, position or time: a JSON number.
    Number,
    /// MARS's 0/1 answers (`is-*`, `todo-*`, `*-reached`): a JSON boolean.
    Bool,
    /// Anything else: a string, `null` when empty.
    Text,
}

/// Replicated key of the global sync limit (MARS: `defaults/sync-limit`).
pub const SYNC_LIMIT_KEY: &str = "defaults/sync-limit";
/// The digest of mars's log records, in MARS's feature name.
pub const LOG_DIGEST: &str = "CHKSUM_CRC32C";

/// What the macros read besides the view: replicated keys, the daemon's version, mounts.
pub trait Source {
    /// A replicated metadata key's value.
    fn link(&self, key: &str) -> Result<Option<String>>;
    /// The version of the daemon (MARS: the kernel module's `tree` version).
    fn version(&self) -> Result<String>;
    /// Where `device` is mounted: mountpoint, filesystem type, options.
    fn mount_of(&self, device: &str) -> Option<(String, String, String)>;
}

/// Everything a macro is evaluated with.
pub struct Ctx<'a> {
    pub view: &'a ClusterView,
    /// The resource (`None` for the global macros of `view-NAME all`).
    pub res: Option<&'a ResourceView>,
    /// This host.
    pub host: &'a str,
    /// The macro's name (MARS's `%{0}`).
    pub name: &'a str,
    /// The optional argument after RES (a host, a delimiter, a limit …).
    pub arg: Option<&'a str>,
    /// `--window`: seconds after which a member counts as not alive.
    pub window: u64,
    /// Seconds since the epoch.
    pub now: f64,
    pub src: &'a dyn Source,
    /// `--stuck-seconds`: a fetch silent this long while there is something to fetch is
    /// warned about (MARS's `fetch-line`).
    pub stuck_seconds: u64,
    /// `--threshold`: the default of the `*-threshold-reached` macros (MARS's too).
    pub threshold: u64,
    /// MARS's `%warn{…}`: lines for stderr (`WARNING: …`), printed by the caller after the
    /// value, so that evaluating stays free of output.
    pub warnings: std::cell::RefCell<Vec<String>>,
}

impl<'a> Ctx<'a> {
    /// The resource; the global macros have none.
    pub fn r(&self) -> Result<&'a ResourceView> {
        self.res
            .with_context(|| format!("view-{} needs a resource", self.name))
    }
}

/// Where a macro comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One of MARS's complex macros (a template there).
    Complex,
    /// One of MARS's primitive macros.
    Primitive,
    /// Ours only.
    Mars,
}

type EvalFn = Box<dyn Fn(&Ctx) -> Result<String> + Send + Sync>;

/// How a macro is answered.
pub enum Eval {
    /// A value of the view.
    Value(EvalFn),
    /// MARS's `wait-{is,todo}-X-{on,off}`: wait until macro `target` reads `1` (on) or `0`
    /// (off), then print nothing.
    Wait { target: String, on: bool },
}

pub struct Macro {
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub ty: MacroType,
    /// The optional argument's name, for the help (`HOST`, `DELIM` …).
    pub arg: Option<&'static str>,
    /// Deprecated in MARS in favour of this macro (a warning on stderr, as MARS's).
    pub instead: Option<String>,
    /// Needs every resource of the host, not only RES.
    pub all_resources: bool,
    pub eval: Eval,
}

/// MARS macro names we do not answer, and why (`view-NAME` says so; the table test accepts
/// them).
pub const EXCLUDED: &[(&str, &str)] = &[
    (
        "disabled-log|net-digests",
        "MARS's macro table writes `|` for `,` here; MARS cannot evaluate it either",
    ),
    (
        "enabled-log|net-compressions",
        "MARS's macro table writes `|` for `,` here; MARS cannot evaluate it either",
    ),
    (
        "syncpos-size",
        "MARS lists it but answers \"call to unknown macro\"",
    ),
    (
        "syncpos-pos",
        "MARS lists it but answers \"call to unknown macro\"",
    ),
    ("device-nrflying", NOT_MEASURED),
    ("device-completion-stamp", NOT_MEASURED),
    ("device-completion-age", NOT_MEASURED),
    ("device-ops-rate", NOT_MEASURED),
    ("device-amount-rate", NOT_MEASURED),
    ("device-rate", NOT_MEASURED),
    ("sync-ops-rate", NOT_MEASURED),
    ("fetch-ops-rate", NOT_MEASURED),
    ("replay-ops-rate", NOT_MEASURED),
    (
        "deletable-size",
        "marsd does not report the sizes of single logfiles yet",
    ),
];

const NOT_MEASURED: &str = "marsd does not measure the device's requests (count, rate, in flight)";

/// Builds the table.
struct Table(Vec<Macro>);

impl Table {
    fn add(
        &mut self,
        name: impl Into<String>,
        kind: Kind,
        ty: MacroType,
        help: impl Into<String>,
        f: impl Fn(&Ctx) -> Result<String> + Send + Sync + 'static,
    ) -> &mut Macro {
        self.0.push(Macro {
            name: name.into(),
            help: help.into(),
            kind,
            ty,
            arg: None,
            instead: None,
            all_resources: false,
            eval: Eval::Value(Box::new(f)),
        });
        self.0.last_mut().expect("just pushed")
    }
}

impl Macro {
    fn arg(&mut self, a: &'static str) -> &mut Macro {
        self.arg = Some(a);
        self
    }
    fn instead(&mut self, m: &str) -> &mut Macro {
        self.instead = Some(m.into());
        self
    }
    fn all(&mut self) -> &mut Macro {
        self.all_resources = true;
        self
    }
}

use Kind::{Complex as C, Mars as M, Primitive as P};
use MacroType::{Bool as B, Number as N, Text as T};

fn complex_macros(t: &mut Table) {
    t.add(
        "default",
        C,
        T,
        "MARS's view of the resource: state line, progress, messages",
        complex::default,
    );
    t.add(
        "default-resource",
        C,
        T,
        "RES, its size and [members/hosts]",
        complex::default_resource,
    );
    t.add(
        "default-global",
        C,
        T,
        "with `all`, after the resources: communication problems",
        complex::comminfo,
    );
    t.add(
        "default-header",
        C,
        T,
        "with `all`, before the resources: digests and the global sync limit",
        complex::default_header,
    );
    t.add(
        "default-footer",
        C,
        T,
        "with `all`, at the end: nothing",
        |_| Ok(String::new()),
    );
    t.add(
        "1and1",
        C,
        T,
        "the 1&1 variant of `default`",
        complex::one_and_one,
    );
    t.add(
        "comminfo",
        C,
        T,
        "the host's communication problems",
        complex::comminfo,
    );
    t.add(
        "commstate",
        C,
        T,
        "the age of the primary's information, when older than --window",
        complex::commstate,
    );
    t.add(
        "device-info",
        C,
        T,
        "`  LocalDevice DEV [device-stats]`, when the device exists",
        complex::device_info,
    );
    t.add(
        "device-stats",
        C,
        T,
        "`Opened, MOUNTPOINT` or `Closed`",
        complex::device_stats,
    );
    t.add(
        "diskstate",
        C,
        T,
        "the local disk's state: UpToDate, OutDated[FR], WriteBack[AMOUNT] …",
        complex::diskstate,
    );
    t.add(
        "diskstate-1and1",
        C,
        T,
        "Uptodate, Outdated[FR], Inconsistent or Detached",
        complex::diskstate_1and1,
    );
    t.add(
        "replstate",
        C,
        T,
        "the replication state: Replicating, Replaying, Syncing, PausedFetch …",
        complex::replstate,
    );
    t.add(
        "replstate-1and1",
        C,
        T,
        "Replicating, Replaying, Syncing, PausedSync, PausedReplay, PrimaryUnreachable",
        complex::replstate_1and1,
    );
    t.add(
        "flags",
        C,
        T,
        "DCASFR: device, consistent, attach, sync, fetch, replay (lowercase: on, not done)",
        complex::flags,
    );
    t.add(
        "flags-1and1",
        C,
        T,
        "-SFR-: the sync, fetch and replay switches that are on",
        complex::flags_1and1,
    );
    t.add(
        "outdated-flags",
        C,
        T,
        "F while fetch, R while replay has not reached its end",
        complex::outdated_flags,
    );
    t.add(
        "outdated-flags-1and1",
        C,
        T,
        "as outdated-flags",
        complex::outdated_flags,
    );
    t.add(
        "role",
        C,
        T,
        "Primary, ForcedPrimary, NotYetPrimary, RemainsPrimary, Secondary or None",
        complex::role,
    );
    t.add(
        "role-1and1",
        C,
        T,
        "Primary or Secondary",
        complex::role_1and1,
    );
    t.add(
        "todo-role",
        C,
        T,
        "what the designation asks of this host: Primary, Secondary or None",
        complex::todo_role,
    );
    t.add(
        "primarynode",
        C,
        T,
        "the designated primary (empty: none)",
        complex::primarynode,
    );
    t.add(
        "primarynode-1and1",
        C,
        T,
        "the acting primary, `-` when none",
        complex::primarynode_1and1,
    );
    t.add(
        "syncinfo",
        C,
        T,
        "the full sync's progress bar and sync-line",
        complex::syncinfo,
    );
    t.add("syncinfo-1and1", C, T, "as syncinfo", complex::syncinfo);
    t.add(
        "sync-line",
        C,
        T,
        "`> sync: DONE/SIZE rate: R/sec  remaining: T hrs`",
        complex::sync_line,
    );
    t.add("sync-line-1and1", C, T, "as sync-line", complex::sync_line);
    t.add(
        "replinfo",
        C,
        T,
        "the replication's progress bar and logfiles, fetch-line, replay-line",
        |c| complex::replinfo(c, false),
    );
    t.add("replinfo-1and1", C, T, "as replinfo, 1&1 style", |c| {
        complex::replinfo(c, true)
    });
    t.add(
        "fetch-line",
        C,
        T,
        "`> fetch: REST rate: R/s remaining: T`",
        |c| complex::fetch_line(c, false),
    );
    t.add(
        "fetch-line-1and1",
        C,
        T,
        "`> fetch: REST rate: R/sec  remaining: T hrs`",
        |c| complex::fetch_line(c, true),
    );
    t.add(
        "replay-line",
        C,
        T,
        "`> replay: REST rate: R/s remaining: T`",
        |c| complex::replay_line(c, false),
    );
    t.add(
        "replay-line-1and1",
        C,
        T,
        "`> replay: REST rate: R/sec  remaining: T hrs`",
        |c| complex::replay_line(c, true),
    );
    t.add(
        "resource-errors",
        C,
        T,
        "the resource's errors and warnings",
        complex::resource_errors,
    );
    t.add(
        "resource-errors-1and1",
        C,
        T,
        "as resource-errors",
        complex::resource_errors,
    );
    for n in ["state", "cstate", "dstate", "status"] {
        t.add(
            n,
            C,
            T,
            "DRBD look-alike MARS leaves to a user macro file: `NYI …`",
            complex::nyi,
        );
    }
}

fn switch_macros(t: &mut Table) {
    for k in SwitchKind::ALL {
        let w = k.as_str();
        t.add(
            format!("is-{w}"),
            P,
            B,
            if w == "sync" {
                "1 when a full sync runs here (or on HOST)".to_string()
            } else {
                format!("1 when {w} is on and done here (or on HOST): the uppercase flag")
            },
            move |c| Ok(bit(prim::is_switch(c, k, c.arg.unwrap_or(c.host))?)),
        )
        .arg("HOST");
        t.add(
            format!("todo-{w}"),
            P,
            B,
            format!("1 when the {w} switch is on"),
            move |c| Ok(bit(prim::todo_switch(c, k)?)),
        );
        t.add(
            format!("nr-{w}"),
            P,
            N,
            format!("how many members answer is-{w} with 1"),
            move |c| Ok(prim::nr(c, w)?.to_string()),
        );
    }
    t.add(
        "is-primary",
        P,
        B,
        "1 when this host (or HOST) acts as primary",
        |c| Ok(bit(prim::is_primary(c, c.arg.unwrap_or(c.host))?)),
    )
    .arg("HOST");
    t.add(
        "is-secondary",
        P,
        B,
        "1 when this host (or HOST) does not act as primary",
        |c| Ok(bit(!prim::is_primary(c, c.arg.unwrap_or(c.host))?)),
    )
    .arg("HOST");
    t.add(
        "todo-primary",
        P,
        B,
        "1 when this host is the designated primary",
        |c| Ok(bit(prim::todo_primary(c)?)),
    );
    t.add(
        "todo-secondary",
        P,
        B,
        "1 when no primary is designated",
        |c| Ok(bit(prim::designated(c)?.is_none())),
    );
    t.add(
        "nr-primary",
        P,
        N,
        "how many members act as primary (more than 1: split brain)",
        |c| Ok(prim::nr(c, "primary")?.to_string()),
    );
    t.add(
        "nr-secondary",
        P,
        N,
        "how many members do not act as primary",
        |c| Ok(prim::nr(c, "secondary")?.to_string()),
    );
    for is in ["is", "todo"] {
        for w in ["attach", "sync", "fetch", "replay", "primary", "secondary"] {
            for on in [true, false] {
                let oo = if on { "on" } else { "off" };
                let target = format!("{is}-{w}");
                t.0.push(Macro {
                    name: format!("wait-{target}-{oo}"),
                    help: format!(
                        "wait (at most --timeout) until {target} is {}",
                        u8::from(on)
                    ),
                    kind: P,
                    ty: T,
                    arg: None,
                    instead: None,
                    all_resources: false,
                    eval: Eval::Wait { target, on },
                });
            }
        }
    }
}

fn amount_macros(t: &mut Table) {
    for w in Job::ALL {
        let n = w.as_str();
        t.add(
            format!("{n}-size"),
            P,
            N,
            format!("bytes {n} has to reach"),
            move |c| Ok(prim::amount(c, w)?.0.to_string()),
        );
        t.add(
            format!("{n}-pos"),
            P,
            N,
            format!("bytes {n} has reached"),
            move |c| Ok(prim::amount(c, w)?.1.to_string()),
        );
        t.add(
            format!("{n}-rest"),
            P,
            N,
            format!("bytes {n} still has to do"),
            move |c| Ok(prim::rest(c, w)?.to_string()),
        );
        t.add(
            format!("{n}-reached"),
            P,
            B,
            format!("1 when {n} is complete"),
            move |c| Ok(bit(prim::reached(c, w)?)),
        );
        t.add(
            format!("{n}-almost-reached"),
            P,
            B,
            format!("1 when {n} is nearly complete (MARS's formula, LIMIT 990)"),
            move |c| Ok(bit(prim::almost_reached(c, w, c.arg)?)),
        )
        .arg("LIMIT");
        t.add(
            format!("{n}-threshold-reached"),
            P,
            B,
            format!("1 when {n} is within SIZE (default 10MiB) of its end"),
            move |c| Ok(bit(prim::threshold_reached(c, w, c.arg)?)),
        )
        .arg("SIZE");
        t.add(
            format!("{n}-percent"),
            P,
            N,
            format!("how much of {n} is done, in percent"),
            move |c| Ok(num(prim::fraction(c, w, 100.0)?)),
        );
        t.add(
            format!("{n}-permille"),
            P,
            N,
            format!("how much of {n} is done, in permille"),
            move |c| Ok(num(prim::fraction(c, w, 1000.0)?)),
        );
        t.add(
            format!("{n}-vector"),
            P,
            T,
            format!("{n}'s POS:SIZE (or with DELIM)"),
            move |c| Ok(prim::amounts(c)?.vector(w, c.arg)),
        )
        .arg("DELIM");
        if w != Job::Work {
            t.add(
                format!("{n}-rate"),
                P,
                N,
                format!("{n}'s rate, bytes per second"),
                move |c| Ok(prim::rate(c, w)?.to_string()),
            );
            t.add(
                format!("{n}-amount-rate"),
                P,
                N,
                format!("as {n}-rate"),
                move |c| Ok(prim::rate(c, w)?.to_string()),
            );
            t.add(
                format!("{n}-remain"),
                P,
                N,
                format!("seconds until {n} is done (-1: not moving)"),
                move |c| Ok(num(prim::remain(c, w)?)),
            );
        }
    }
    t.add(
        "summary-vector",
        P,
        T,
        "REPLAY-POS:FETCH-POS:FETCH-SIZE (or with DELIM)",
        |c| Ok(prim::amounts(c)?.summary_vector(c.arg)),
    )
    .arg("DELIM");
    t.add(
        "writeback-rest",
        P,
        N,
        "bytes written on the primary, not yet on its disk",
        |c| {
            let r = c.r()?;
            Ok(r.log.as_ref().map_or(0, |l| l.dirty_bytes).to_string())
        },
    );
    t.add(
        "replay-basenr",
        P,
        N,
        "the oldest logfile number this host keeps",
        |c| Ok(prim::lognrs(c)?.0.to_string()),
    );
    t.add(
        "replay-lognr",
        P,
        N,
        "the logfile number replay is in",
        |c| Ok(prim::lognrs(c)?.1.to_string()),
    );
    t.add(
        "fetch-lognr",
        P,
        N,
        "the newest logfile number fetched",
        |c| Ok(prim::lognrs(c)?.2.to_string()),
    );
    t.add("work-lognr", P, N, "the newest logfile number known", |c| {
        Ok(prim::lognrs(c)?.3.to_string())
    });
    t.add(
        "replay-logcount",
        P,
        N,
        "logfiles from the oldest kept to replay's",
        |c| {
            let (b, r, _, _) = prim::lognrs(c)?;
            Ok((r - b).to_string())
        },
    );
    t.add(
        "fetch-logcount",
        P,
        N,
        "logfiles fetched and not yet replayed",
        |c| {
            let (_, r, f, _) = prim::lognrs(c)?;
            Ok((f - r).to_string())
        },
    );
    t.add("work-logcount", P, N, "logfiles not yet replayed", |c| {
        let (_, r, _, w) = prim::lognrs(c)?;
        Ok((w - r).to_string())
    });
}

fn time_macros(t: &mut Table) {
    for what in ["alive", "fetch", "replay", "work"] {
        let helps = match what {
            "alive" => "the liveness of HOST (default: the designated primary)",
            "fetch" => "the source's newest confirmation that this replica has everything",
            "replay" => "the oldest write not yet replayed here",
            _ => "the newer of fetch and replay",
        };
        t.add(
            format!("{what}-timestamp"),
            P,
            N,
            format!("seconds since the epoch of {helps}"),
            move |c| Ok(num(prim::timestamp(c, what)?)),
        );
        // Only the liveness is known per host; the other stamps are this host's.
        if what == "alive" {
            t.0.last_mut().expect("just added").arg("HOST");
        }
        t.add(
            format!("{what}-age"),
            P,
            N,
            format!("seconds since {helps} (-1: unknown)"),
            move |c| Ok(num(prim::age(c, what)?)),
        );
        if what == "alive" {
            t.0.last_mut().expect("just added").arg("HOST");
        }
        t.add(
            format!("{what}-lag"),
            P,
            N,
            format!("seconds this host is behind the primary ({what})"),
            move |c| Ok(num(prim::lag(c, what)?)),
        );
    }
    t.add("time", P, N, "now, seconds since the epoch", |c| {
        Ok(num(c.now))
    });
    t.add(
        "real-time",
        P,
        N,
        "now, whole seconds since the epoch",
        |c| Ok(num(c.now.trunc())),
    );
}

/// Hosts, one a line.
fn lines<'a>(it: impl IntoIterator<Item = &'a str>) -> String {
    it.into_iter().map(|h| format!("{h}\n")).collect()
}

fn cluster_hosts<'a>(c: &Ctx<'a>) -> Vec<&'a str> {
    if c.view.members.is_empty() {
        return vec![c.host];
    }
    c.view.members.iter().map(|m| m.host.as_str()).collect()
}

fn resource_hosts<'a>(c: &Ctx<'a>) -> Result<Vec<&'a str>> {
    let r = c.r()?;
    if r.members.is_empty() {
        return Ok(vec![c.host]);
    }
    Ok(r.members.iter().map(|m| m.host.as_str()).collect())
}

/// Resources of which `host` is a member (this host's view knows its own resources).
fn member_resources<'a>(c: &Ctx<'a>, host: &str) -> Vec<&'a str> {
    c.view
        .resources
        .iter()
        .filter(|r| host == c.host || r.members.iter().any(|m| m.host == host))
        .map(|r| r.name.as_str())
        .collect()
}

fn membership_macros(t: &mut Table) {
    t.add(
        "cluster-peers",
        P,
        T,
        "the hosts of the cluster, one a line",
        |c| Ok(lines(cluster_hosts(c))),
    );
    t.add(
        "count-cluster-peers",
        P,
        N,
        "how many hosts the cluster has",
        |c| Ok(cluster_hosts(c).len().to_string()),
    );
    t.add(
        "configured-peers",
        P,
        T,
        "the hosts of the cluster, one a line",
        |c| Ok(lines(cluster_hosts(c))),
    );
    t.add(
        "count-configured-peers",
        P,
        N,
        "how many hosts the cluster has",
        |c| Ok(cluster_hosts(c).len().to_string()),
    );
    t.add(
        "resource-peers",
        P,
        T,
        "the members of the resource, one a line",
        |c| Ok(lines(resource_hosts(c)?)),
    );
    t.add(
        "count-resource-peers",
        P,
        N,
        "how many members the resource has",
        |c| Ok(resource_hosts(c)?.len().to_string()),
    );
    // mars has no guests (MARS's hosts that know a resource without a disk).
    t.add(
        "guest-peers",
        P,
        T,
        "the resource's guests: none in mars",
        |_| Ok(String::new()),
    );
    t.add(
        "count-guest-peers",
        P,
        N,
        "how many guests: 0 in mars",
        |_| Ok("0".into()),
    );
    t.add("cluster-members", P, T, "deprecated: cluster-peers", |c| {
        Ok(lines(cluster_hosts(c)))
    })
    .instead("cluster-peers");
    t.add(
        "resource-members",
        P,
        T,
        "deprecated: resource-peers",
        |c| Ok(lines(resource_hosts(c)?)),
    )
    .instead("resource-peers");
    t.add(
        "count-cluster-members",
        P,
        N,
        "deprecated: count-cluster-peers",
        |c| Ok(cluster_hosts(c).len().to_string()),
    )
    .instead("count-cluster-peers");
    t.add(
        "count-resource-members",
        P,
        N,
        "deprecated: count-resource-peers",
        |c| Ok(resource_hosts(c)?.len().to_string()),
    )
    .instead("count-resource-peers");
    t.add(
        "count-guest-members",
        P,
        N,
        "deprecated: count-guest-peers",
        |_| Ok("0".into()),
    )
    .instead("count-guest-peers");
    for (who, help) in [("my", "this host (or HOST)"), ("all", "any host")] {
        let host = move |c: &Ctx| -> String {
            match who {
                "my" => c.arg.unwrap_or(c.host).to_string(),
                _ => c.host.to_string(),
            }
        };
        t.add(
            format!("{who}-resources"),
            P,
            T,
            format!("the resources {help} knows, one a line"),
            move |c| Ok(lines(member_resources(c, &host(c)))),
        )
        .arg("HOST")
        .all();
        t.add(
            format!("count-{who}-resources"),
            P,
            N,
            format!("how many resources {help} knows"),
            move |c| Ok(member_resources(c, &host(c)).len().to_string()),
        )
        .arg("HOST")
        .all();
        t.add(
            format!("{who}-members"),
            P,
            T,
            format!("the resources {help} is a member of, one a line"),
            move |c| Ok(lines(member_resources(c, &host(c)))),
        )
        .arg("HOST")
        .all();
        t.add(
            format!("count-{who}-members"),
            P,
            N,
            format!("how many resources {help} is a member of"),
            move |c| Ok(member_resources(c, &host(c)).len().to_string()),
        )
        .arg("HOST")
        .all();
        t.add(
            format!("{who}-guests"),
            P,
            T,
            "resources with guests: none in mars",
            |_| Ok(String::new()),
        )
        .arg("HOST");
        t.add(
            format!("count-{who}-guests"),
            P,
            N,
            "resources with guests: 0 in mars",
            |_| Ok("0".into()),
        )
        .arg("HOST");
    }
    t.add(
        "is-member",
        P,
        B,
        "1 when this host (or HOST) is a member of the resource",
        |c| {
            let h = c.arg.unwrap_or(c.host);
            Ok(bit(resource_hosts(c)?.contains(&h)))
        },
    )
    .arg("HOST");
    t.add(
        "is-guest",
        P,
        B,
        "1 when HOST is a guest: never in mars",
        |_| Ok("0".into()),
    )
    .arg("HOST");
    t.add(
        "is-alive",
        P,
        B,
        "1 when HOST (default: the designated primary) was heard from within --window",
        |c| Ok(bit(prim::is_alive(c, c.arg)?)),
    )
    .arg("HOST");
    t.add(
        "get-primary",
        P,
        T,
        "the designated primary (empty: none)",
        prim::get_primary,
    );
    t.add(
        "actual-primary",
        P,
        T,
        "the member acting as primary (deprecated in MARS: use is-primary)",
        complex::actual_primary,
    );
    t.add("uuid", P, T, "the cluster's uuid", |c| {
        Ok(c.view
            .cluster
            .as_ref()
            .map(|x| x.uuid.clone())
            .unwrap_or_default())
    });
}

fn state_macros(t: &mut Table) {
    t.add(
        "is-split-brain",
        P,
        B,
        "1 when the members' histories have forked",
        |c| Ok(bit(c.r()?.split_brain.is_some())),
    );
    t.add(
        "is-consistent",
        P,
        B,
        "1 when the local disk is consistent (no full sync pending or running)",
        |c| Ok(bit(c.r()?.consistent)),
    );
    t.add(
        "is-emergency",
        P,
        B,
        "1 when this host's (or HOST's) primary is in emergency mode",
        |c| Ok(bit(prim::is_emergency(c, c.arg.unwrap_or(c.host))?)),
    )
    .arg("HOST");
    t.add(
        "is-orphan",
        P,
        B,
        "1 when the logfiles this replica needs are gone (only a full sync helps)",
        |c| Ok(bit(c.r()?.disk_state == mars_api::DiskState::Orphan)),
    );
    t.add("get-disk", P, T, "the local backing disk", |c| {
        Ok(c.r()?.disk.display().to_string())
    });
    t.add(
        "get-device",
        P,
        T,
        "the local device (empty when it does not exist)",
        |c| Ok(c.r()?.device.clone().unwrap_or_default()),
    );
    t.add(
        "disk-present",
        P,
        B,
        "1 when this host has a disk for the resource",
        |c| Ok(bit(prim::disk_present(c)?)),
    );
    t.add(
        "device-present",
        P,
        B,
        "1 when the local device exists",
        |c| Ok(bit(c.r()?.device.is_some())),
    );
    t.add("present-disk", P, B, "deprecated: disk-present", |c| {
        Ok(bit(prim::disk_present(c)?))
    })
    .instead("disk-present");
    t.add("present-device", P, B, "deprecated: device-present", |c| {
        Ok(bit(c.r()?.device.is_some()))
    })
    .instead("device-present");
    t.add(
        "disk-error",
        P,
        T,
        "why the local disk failed (empty: it did not)",
        |c| {
            let r = c.r()?;
            Ok(match r.disk_state {
                mars_api::DiskState::DefectiveDisk => {
                    r.stuck.clone().unwrap_or_else(|| "DefectiveDisk".into())
                }
                _ => String::new(),
            })
        },
    );
    t.add(
        "device-opened",
        P,
        N,
        "how many openers the device has",
        |c| Ok(c.r()?.open_count.to_string()),
    );
    t.add(
        "device-error",
        P,
        T,
        "why the device could not be set up (0: it could)",
        |c| Ok(c.r()?.device_error.clone().unwrap_or_else(|| "0".into())),
    );
    for (what, i) in [
        ("mounted", 0),
        ("mountpoint", 1),
        ("fstype", 2),
        ("mountflags", 3),
    ] {
        t.add(
            format!("known-device-{what}"),
            P,
            T,
            format!("the local device's {what} (empty: not mounted)"),
            move |c| {
                Ok(match prim::mount(c)? {
                    None => String::new(),
                    Some(m) => match i {
                        0 => "1".into(),
                        1 => m.0,
                        2 => m.1,
                        _ => m.2,
                    },
                })
            },
        );
    }
    t.add(
        "replay-code",
        P,
        N,
        "0, or negative when replay stopped at a damaged logfile (-5, EIO)",
        |c| {
            Ok(if c.r()?.disk_state == mars_api::DiskState::DefectiveLog {
                "-5"
            } else {
                "0"
            }
            .into())
        },
    );
    t.add(
        "errno-text",
        P,
        T,
        "the text of errno N (positive or negative)",
        |c| {
            let n: i32 = c
                .arg
                .context("usage: view-errno-text RES N")?
                .trim()
                .parse()
                .context("errno N is a number")?;
            Ok(std::io::Error::from_raw_os_error(n.abs())
                .to_string()
                .split(" (os error")
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join("_"))
        },
    )
    .arg("N");
    t.add(
        "get-log-status",
        P,
        T,
        "why replication is stuck here (empty: it is not)",
        |c| Ok(c.r()?.stuck.clone().unwrap_or_default()),
    );
    for (what, help) in [("fat", "fatal"), ("err", "error"), ("wrn", "warning")] {
        // MARS's status files of the kernel module: every message of mars is in the view's
        // fields, which the msg macros show.
        t.add(
            format!("get-resource-{what}"),
            P,
            T,
            format!("MARS's {help} status file: none in mars (see the-{what}-msg)"),
            |_| Ok(String::new()),
        );
        t.add(
            format!("get-resource-{what}-count"),
            P,
            N,
            format!("lines of MARS's {help} status file: 0 in mars"),
            |_| Ok("0".into()),
        );
    }
    t.add(
        "systemd-unit",
        P,
        T,
        "the start and stop unit of the resource's stack",
        |c| {
            Ok(c.r()?
                .systemd
                .as_ref()
                .map(|sd| format!("{} {}", sd.start_unit, sd.stop_unit))
                .unwrap_or_default())
        },
    );
}

fn msg_macros(t: &mut Table) {
    for all in ["all", "the"] {
        for pretty in ["", "pretty-"] {
            for global in ["", "global-"] {
                for kind in [None, Some("err"), Some("wrn"), Some("inf")] {
                    let name = format!(
                        "{all}-{pretty}{global}{}msg",
                        kind.map(|k| format!("{k}-")).unwrap_or_default()
                    );
                    let g = !global.is_empty();
                    let the = all == "the";
                    let help = format!(
                        "the {}{} messages, `KEY: TEXT` a line{}",
                        if g { "host's " } else { "resource's " },
                        kind.unwrap_or("err, wrn and inf"),
                        if the {
                            ", leaving out the uninteresting"
                        } else {
                            ""
                        }
                    );
                    t.add(name, P, T, help, move |c| prim::msg_lines(c, g, kind, the));
                }
            }
        }
    }
}

fn size_macros(t: &mut Table) {
    t.add("resource-size", P, N, "the resource's size in bytes", |c| {
        Ok(c.r()?.size.to_string())
    });
    t.add(
        "device-size",
        P,
        N,
        "the device's size in bytes (empty: no device)",
        |c| {
            let r = c.r()?;
            Ok(if r.device.is_some() {
                r.size.to_string()
            } else {
                String::new()
            })
        },
    );
    t.add(
        "disk-size",
        P,
        N,
        "the size of this host's (or HOST's) disk in bytes",
        |c| {
            let h = c.arg.unwrap_or(c.host);
            Ok(prim::member(c, h)?
                .and_then(|m| m.disk_size_bytes)
                .map(|s| s.to_string())
                .unwrap_or_default())
        },
    )
    .arg("HOST");
    t.add(
        "resource-possible-size",
        P,
        N,
        "the size resize could grow to: the smallest member disk",
        |c| {
            Ok(complex::possible_size(c)?
                .map(|s| s.to_string())
                .unwrap_or_default())
        },
    );
    t.add(
        "occupied-size",
        P,
        N,
        "bytes of the resource's logfiles on this host",
        |c| {
            let r = c.r()?;
            Ok(c.view
                .space
                .as_ref()
                .and_then(|s| s.resources.iter().find(|x| x.name == r.name))
                .map(|x| x.log_bytes)
                .or(r.log.as_ref().map(|l| l.log_bytes))
                .unwrap_or(0)
                .to_string())
        },
    );
    // MARS: GiB above the limit below which it stops (its kernel module's `rest-space`).
    t.add(
        "rest-space",
        P,
        N,
        "GiB free on the root above the free space it keeps",
        |c| {
            Ok(c.view
                .space
                .as_ref()
                .and_then(|s| Some(s.free_bytes?.saturating_sub(s.min_free_bytes) >> 30))
                .map(|g| g.to_string())
                .unwrap_or_default())
        },
    );
    t.add(
        "total-space",
        P,
        N,
        "GiB of the root's filesystem less the free space it keeps",
        |c| {
            Ok(c.view
                .space
                .as_ref()
                .and_then(|s| Some(s.total_bytes?.saturating_sub(s.min_free_bytes) >> 30))
                .map(|g| g.to_string())
                .unwrap_or_default())
        },
    );
    t.add(
        "global-sync-limit-value",
        P,
        N,
        "how many full syncs may run at once (empty: unlimited)",
        |c| Ok(c.src.link(SYNC_LIMIT_KEY)?.unwrap_or_default()),
    );
}

/// The network compressions marsd implements (MARS's names; zstd is ours).
const NET_COMPRESSIONS: &str = "COMPRESS_LZ4|COMPRESS_ZSTD";

fn feature_macros(t: &mut Table) {
    // mars checksums log records with CRC32C and compresses no logfile; the peer streams are
    // protected by TLS, not by a MARS network digest.
    for (n, v, help) in [
        (
            "potential-features",
            LOG_DIGEST,
            "the features mars can use",
        ),
        (
            "implemented-features",
            LOG_DIGEST,
            "the features mars implements",
        ),
        (
            "usable-features",
            LOG_DIGEST,
            "the features every member can use",
        ),
        (
            "implemented-digests",
            LOG_DIGEST,
            "the digests mars implements",
        ),
        (
            "usable-digests",
            LOG_DIGEST,
            "the digests every member can use",
        ),
        ("used-log-digest", LOG_DIGEST, "the digest of log records"),
        (
            "used-net-digest",
            "",
            "the digest of network data: none (TLS protects the streams)",
        ),
        (
            "used-log-compression",
            "",
            "the compression of log records: none",
        ),
    ] {
        t.add(n, P, T, help, move |_| Ok(v.to_string()));
    }
    // The fetch and sync streams compress with lz4 or zstd (marsd 0.1 on every member).
    for (n, help) in [
        (
            "implemented-compressions",
            "the compressions mars implements on the network",
        ),
        (
            "usable-compressions",
            "the compressions every member can use on the network",
        ),
    ] {
        t.add(n, P, T, help, |_| Ok(NET_COMPRESSIONS.to_string()));
    }
    t.add(
        "used-net-compression",
        P,
        T,
        "the compression fetch and sync streams use: the first of COMPRESS_LZ4, COMPRESS_ZSTD \
         that enabled-net-compressions names (none: empty)",
        |c| {
            let enabled = c
                .src
                .link("defaults/enabled-net-compressions")?
                .unwrap_or_default();
            let names: Vec<&str> = enabled.split('|').map(str::trim).collect();
            Ok(NET_COMPRESSIONS
                .split('|')
                .find(|m| names.contains(m))
                .unwrap_or("")
                .to_string())
        },
    );
    for n in ["tree", "tree-version", "features-version"] {
        t.add(n, P, T, "the version of marsd", |c| c.src.version());
    }
}

/// Ours (not MARS's): kept for the scripts that use them.
fn our_macros(t: &mut Table) {
    t.add(
        "nbd-uri",
        M,
        T,
        "the NBD URI of the device over the Unix socket (primary only)",
        |c| {
            let r = c.r()?;
            match &r.nbd_unix_uri {
                Some(u) => Ok(u.clone()),
                None => bail!("{}", crate::view::not_served(r, c.host)),
            }
        },
    );
    t.add(
        "nbd-tcp-uri",
        M,
        T,
        "the NBD URI over TCP (primary only, with --nbd-listen)",
        |c| {
            let r = c.r()?;
            match &r.nbd_tcp_uri {
                Some(u) => Ok(u.clone()),
                None if r.nbd_tcp => bail!("{}", crate::view::not_served(r, c.host)),
                None => bail!("marsd serves no NBD over TCP (start it with --nbd-listen)"),
            }
        },
    );
    t.add(
        "device",
        M,
        T,
        "the local device; an error when there is none",
        |c| {
            let r = c.r()?;
            match &r.device {
                Some(d) => Ok(d.clone()),
                None => bail!("resource {} has no local device on this host", r.name),
            }
        },
    );
    t.add("disk", M, T, "as get-disk", |c| {
        Ok(c.r()?.disk.display().to_string())
    });
    t.add("size", M, N, "as resource-size", |c| {
        Ok(c.r()?.size.to_string())
    });
    t.add("error", M, T, "the resource's error (empty: none)", |c| {
        Ok(c.r()?.error.clone().unwrap_or_default())
    });
    t.add(
        "stuck",
        M,
        T,
        "why replication is stuck here (empty: it is not)",
        |c| Ok(c.r()?.stuck.clone().unwrap_or_default()),
    );
    t.add(
        "sync-pos",
        P,
        N,
        "bytes the full sync has reached (the size when none runs)",
        |c| Ok(prim::amount(c, Job::Sync)?.1.to_string()),
    );
    t.add("syncstatus", M, N, "as sync-pos", |c| {
        Ok(prim::amount(c, Job::Sync)?.1.to_string())
    });
    t.add(
        "is-uptodate",
        M,
        B,
        "1 when the local disk is UpToDate and replication is not stuck",
        |c| Ok(bit(crate::view::is_uptodate(c.r()?))),
    );
    t.add("members", M, N, "how many members the resource has", |c| {
        Ok(resource_hosts(c)?.len().to_string())
    });
    t.add(
        "split-brain",
        M,
        T,
        "what the split brain is and how to resolve it (empty: none)",
        |c| {
            let r = c.r()?;
            Ok(r.split_brain
                .as_ref()
                .map(|sb| crate::view::split_brain_text(&r.name, sb))
                .unwrap_or_default())
        },
    );
    t.add("systemd-want", M, T, "where the stack should run", |c| {
        Ok(c.r()?
            .systemd
            .as_ref()
            .and_then(|sd| sd.want.clone())
            .unwrap_or_default())
    });
}

static TABLE: LazyLock<Vec<Macro>> = LazyLock::new(|| {
    let mut t = Table(Vec::new());
    complex_macros(&mut t);
    switch_macros(&mut t);
    amount_macros(&mut t);
    time_macros(&mut t);
    membership_macros(&mut t);
    state_macros(&mut t);
    msg_macros(&mut t);
    size_macros(&mut t);
    feature_macros(&mut t);
    our_macros(&mut t);
    // `sync-pos` is MARS's too; the Job loop made one already.
    let mut seen = std::collections::HashSet::new();
    t.0.retain(|m| seen.insert(m.name.clone()));
    t.0.sort_by(|a, b| a.name.cmp(&b.name));
    t.0
});

/// Every macro, sorted by name.
pub fn table() -> &'static [Macro] {
    &TABLE
}

/// The macro called `name`.
pub fn find(name: &str) -> Option<&'static Macro> {
    let t = table();
    t.binary_search_by(|m| m.name.as_str().cmp(name))
        .ok()
        .map(|i| &t[i])
}

/// Why MARS's macro `name` is not answered, if it is one we leave out.
pub fn excluded(name: &str) -> Option<&'static str> {
    EXCLUDED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}

/// The known macro closest to a mistyped `name`, if one is close enough.
pub fn suggest(name: &str) -> Option<&'static str> {
    table()
        .iter()
        .map(|m| (strsim::jaro_winkler(name, &m.name), m.name.as_str()))
        .filter(|(score, _)| *score > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n)
}

/// The error for an unknown macro name: a suggestion when one is close.
pub fn unknown(name: &str) -> String {
    match suggest(name) {
        Some(s) => format!("unknown macro view-{name}; did you mean view-{s}?"),
        None => format!(
            "unknown macro view-{name}; `marsadm --help` lists the {} macros",
            table().len()
        ),
    }
}

/// A macro's usage line: `view-NAME RES [ARG]`.
pub fn usage(m: &Macro) -> String {
    match m.arg {
        Some(a) => format!("view-{} RES [{a}]", m.name),
        None => format!("view-{} RES", m.name),
    }
}

/// The macro list for `marsadm --help`, as MARS ends its help: complex ones, then the
/// primitive ones, then ours.
pub fn help_text() -> String {
    let mut s = String::from(
        "View macros: `marsadm view-NAME RES [ARG]` prints one value (RES: a resource or \
         `all`; --json: {\"schema\",\"resource\",\"macro\",\"value\"}).\n",
    );
    for (kind, title) in [
        (Kind::Complex, "MARS's complex macros"),
        (Kind::Primitive, "MARS's primitive macros"),
        (Kind::Mars, "mars's own"),
    ] {
        s += &format!("\n{title}:\n");
        for m in table().iter().filter(|m| m.kind == kind) {
            let u = usage(m);
            let u = u.trim_start_matches("view-");
            s += &format!("  {u:<36} {}\n", m.help);
        }
    }
    s
}

/// Evaluates macro `m` in `c`.
pub fn eval(m: &Macro, c: &Ctx) -> Result<String> {
    match &m.eval {
        Eval::Value(f) => f(c),
        Eval::Wait { target, .. } => bail!("view-{} waits; evaluate view-{target}", m.name),
    }
}

/// The value of macro `name` (the tests' short way).
#[cfg(test)]
pub fn value(name: &str, c: &Ctx) -> Result<String> {
    match find(name) {
        Some(m) => eval(m, c),
        None => bail!("{}", unknown(name)),
    }
}

/// The macro's value as JSON: numbers as numbers, 0/1 answers as booleans, text as a
/// string (`null` when empty).
pub fn json(m: &Macro, value: &str) -> serde_json::Value {
    use serde_json::Value;
    match m.ty {
        MacroType::Number => value
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| value.trim().parse::<f64>().map(Value::from))
            .unwrap_or(Value::Null),
        MacroType::Bool => Value::Bool(value == "1"),
        MacroType::Text if value.is_empty() => Value::Null,
        MacroType::Text => Value::String(value.to_string()),
    }
}

/// Adds every macro as a `view-NAME RES [ARG]` subcommand with its help, for the shell
/// completions (clap does not see them otherwise: they bypass its parser).
pub fn add_subcommands(mut cmd: clap::Command) -> clap::Command {
    for m in table() {
        // clap takes static names; the generator runs once per process.
        let name: &'static str = Box::leak(format!("view-{}", m.name).into_boxed_str());
        let mut sub = clap::Command::new(name)
            .about(m.help.clone())
            .arg(clap::Arg::new("res").value_name("RES").required(true));
        if let Some(a) = m.arg {
            sub = sub.arg(clap::Arg::new("arg").value_name(a));
        }
        cmd = cmd.subcommand(sub);
    }
    cmd
}

/// The value of macro `name` for `r` alone, on an unnamed host (the view tests' fixtures).
#[cfg(test)]
pub fn test_value(r: &ResourceView, name: &str) -> Result<String> {
    struct NoSource;
    impl Source for NoSource {
        fn link(&self, _: &str) -> Result<Option<String>> {
            Ok(None)
        }
        fn version(&self) -> Result<String> {
            Ok(String::new())
        }
        fn mount_of(&self, _: &str) -> Option<(String, String, String)> {
            None
        }
    }
    let v = ClusterView {
        host: String::new(),
        cluster: None,
        members: Vec::new(),
        resources: vec![r.clone()],
        space: None,
    };
    let c = Ctx {
        view: &v,
        res: v.resources.first(),
        host: "",
        name,
        arg: None,
        window: 60,
        now: 0.0,
        src: &NoSource,
        stuck_seconds: 3600,
        threshold: prim::THRESHOLD,
        warnings: Default::default(),
    };
    value(name, &c)
}
