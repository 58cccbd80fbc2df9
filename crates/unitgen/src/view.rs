//! MARS's view macros inside templates: which names exist, and the [`View`] through which a
//! caller answers the ones that need the cluster's state.
//!
//! In MARS every `%name{…}` that is not a language builtin is one of its view macros (the
//! complex ones such as `%replinfo{}` are written in the macro language, the primitives such as
//! `%is-primary{}` read `/mars`), unless a user macro file `name.tpl` overrides it. The
//! generator here is pure, so it answers a view macro only through a [`View`] the caller hands
//! in; [`StateView`] is the one marsd and `marsadm systemd-generate` use. Everything else
//! that MARS's language offers gets [`crate::MacroError::Unavailable`], naming why, instead of
//! "unknown macro":
//!
//! * the complex macros ([`COMPLEX_MACROS`]): they print status pages, nothing a unit needs;
//! * the primitives that need state a [`View`] does not offer (messages, times, space …;
//!   [`StateView`] answers the roles, amounts and rates through [`crate::amount`], the
//!   computation `marsadm view-…` uses too);
//! * `%setlink{}` (would change state), `%sleep{}`, `%timeout{}`, `%wait-…{}` (would block).
//!
//! MARS spells the separators of most names optionally (`%is-primary`, `%is_primary`,
//! `%isprimary`); [`canonical`] maps every spelling to the name in [`PRIMITIVES`].

use std::collections::BTreeMap;
use std::fmt::Debug;

use crate::amount::{Amounts, Roles, THRESHOLD};
use crate::macros::Vars;
use crate::num::Num;

/// Answers MARS's view primitives for the generator.
pub trait View: Debug + Send + Sync {
    /// The value of primitive `name` (canonical, see [`canonical`]) for the resource in
    /// `vars["res"]` as seen from `vars["host"]`, with the evaluated arguments `args`.
    /// `None`: not offered (the generator reports [`crate::MacroError::Unavailable`]);
    /// `Some(Err(why))`: a bad argument (MARS dies; the template is left out with `why`).
    fn primitive(&self, name: &str, vars: &Vars, args: &[String])
        -> Option<Result<String, String>>;

    /// Why a primitive this view does not offer is missing, for the
    /// [`crate::MacroError::Unavailable`] message (`None`: the generic reason). A caller
    /// without any state (`marsadm systemd-generate` with no daemon running) says so here.
    fn why_not_offered(&self) -> Option<String> {
        None
    }
}

/// MARS's complex view macros (`%complex_macros` of its marsadm, mars0.1astable177).
pub const COMPLEX_MACROS: &[&str] = &[
    "1and1",
    "comminfo",
    "commstate",
    "cstate",
    "default",
    "default-footer",
    "default-global",
    "default-header",
    "default-resource",
    "device-info",
    "device-stats",
    "diskstate",
    "diskstate-1and1",
    "dstate",
    "fetch-line",
    "fetch-line-1and1",
    "flags",
    "flags-1and1",
    "outdated-flags",
    "outdated-flags-1and1",
    "primarynode",
    "primarynode-1and1",
    "replay-line",
    "replay-line-1and1",
    "replinfo",
    "replinfo-1and1",
    "replstate",
    "replstate-1and1",
    "resource-errors",
    "resource-errors-1and1",
    "role",
    "role-1and1",
    "state",
    "status",
    "sync-line",
    "sync-line-1and1",
    "syncinfo",
    "syncinfo-1and1",
    "todo-role",
];

/// MARS's view primitives that read the cluster's state (its `eval_fn`, with every optional
/// separator written as `-`). The language builtins and the pure primitives (`%sprintf`,
/// `%human-seconds`, `%readlink`, `%get-glob`, …) are in [`crate::macros`].
pub const PRIMITIVES: &[&str] = &[
    "actual-primary",
    "alive-age",
    "alive-lag",
    "alive-timestamp",
    "all-guests",
    "all-members",
    "all-resources",
    "cluster-members",
    "cluster-peers",
    "configured-peers",
    "count-all-guests",
    "count-all-members",
    "count-all-resources",
    "count-cluster-members",
    "count-cluster-peers",
    "count-configured-peers",
    "count-guest-members",
    "count-guest-peers",
    "count-my-guests",
    "count-my-members",
    "count-my-resources",
    "count-resource-members",
    "count-resource-peers",
    "deletable-size",
    "device-amount-rate",
    "device-completion-age",
    "device-completion-stamp",
    "device-error",
    "device-nrflying",
    "device-opened",
    "device-ops-rate",
    "device-present",
    "device-rate",
    "device-remain",
    "device-size",
    "disabled-log-digests",
    "disabled-net-digests",
    "disk-error",
    "disk-present",
    "disk-size",
    "does",
    "enabled-log-compressions",
    "enabled-net-compressions",
    "errno-text",
    "features-version",
    "fetch-age",
    "fetch-almost-reached",
    "fetch-amount-rate",
    "fetch-lag",
    "fetch-logcount",
    "fetch-lognr",
    "fetch-ops-rate",
    "fetch-percent",
    "fetch-permille",
    "fetch-pos",
    "fetch-rate",
    "fetch-reached",
    "fetch-remain",
    "fetch-rest",
    "fetch-size",
    "fetch-threshold-reached",
    "fetch-timestamp",
    "fetch-vector",
    "get-device",
    "get-disk",
    "get-log-status",
    "get-msg",
    "get-primary",
    "get-resource-err",
    "get-resource-err-count",
    "get-resource-fat",
    "get-resource-fat-count",
    "get-resource-wrn",
    "get-resource-wrn-count",
    "global-sync-limit-value",
    "guest-members",
    "guest-peers",
    "implemented-compressions",
    "implemented-digests",
    "implemented-features",
    "is-alive",
    "is-almost-consistent",
    "is-attach",
    "is-consistent",
    "is-emergency",
    "is-fetch",
    "is-guest",
    "is-member",
    "is-module-loaded",
    "is-orphan",
    "is-primary",
    "is-replay",
    "is-secondary",
    "is-split-brain",
    "is-sync",
    "known-device-fstype",
    "known-device-mounted",
    "known-device-mountflags",
    "known-device-mountpoint",
    "my-guests",
    "my-members",
    "my-resources",
    "nr-attach",
    "nr-fetch",
    "nr-primary",
    "nr-replay",
    "nr-secondary",
    "nr-sync",
    "occupied-size",
    "potential-features",
    "present-device",
    "present-disk",
    "replay-age",
    "replay-almost-reached",
    "replay-amount-rate",
    "replay-basenr",
    "replay-code",
    "replay-lag",
    "replay-logcount",
    "replay-lognr",
    "replay-ops-rate",
    "replay-percent",
    "replay-permille",
    "replay-pos",
    "replay-rate",
    "replay-reached",
    "replay-remain",
    "replay-rest",
    "replay-size",
    "replay-threshold-reached",
    "replay-timestamp",
    "replay-vector",
    "resource-members",
    "resource-peers",
    "resource-possible-size",
    "resource-size",
    "rest-space",
    "summary-vector",
    "sync-almost-reached",
    "sync-amount-rate",
    "sync-ops-rate",
    "sync-percent",
    "sync-permille",
    "sync-pos",
    "sync-rate",
    "sync-reached",
    "sync-remain",
    "sync-rest",
    "sync-size",
    "sync-threshold-reached",
    "sync-vector",
    "systemd-unit",
    "the-err-msg",
    "the-global-err-msg",
    "the-global-inf-msg",
    "the-global-msg",
    "the-global-wrn-msg",
    "the-inf-msg",
    "the-msg",
    "the-pretty-err-msg",
    "the-pretty-global-err-msg",
    "the-pretty-global-inf-msg",
    "the-pretty-global-msg",
    "the-pretty-global-wrn-msg",
    "the-pretty-inf-msg",
    "the-pretty-msg",
    "the-pretty-wrn-msg",
    "the-wrn-msg",
    "all-err-msg",
    "all-global-err-msg",
    "all-global-inf-msg",
    "all-global-msg",
    "all-global-wrn-msg",
    "all-inf-msg",
    "all-msg",
    "all-pretty-err-msg",
    "all-pretty-global-err-msg",
    "all-pretty-global-inf-msg",
    "all-pretty-global-msg",
    "all-pretty-global-wrn-msg",
    "all-pretty-inf-msg",
    "all-pretty-msg",
    "all-pretty-wrn-msg",
    "all-wrn-msg",
    "todo",
    "todo-attach",
    "todo-fetch",
    "todo-primary",
    "todo-replay",
    "todo-secondary",
    "todo-sync",
    "total-space",
    "tree",
    "tree-version",
    "usable-compressions",
    "usable-digests",
    "usable-features",
    "used-log-compression",
    "used-log-digest",
    "used-net-compression",
    "used-net-digest",
    "uuid",
    "version",
    "work-age",
    "work-almost-reached",
    "work-amount-rate",
    "work-lag",
    "work-logcount",
    "work-lognr",
    "work-ops-rate",
    "work-percent",
    "work-permille",
    "work-pos",
    "work-rate",
    "work-reached",
    "work-remain",
    "work-rest",
    "work-size",
    "work-threshold-reached",
    "work-timestamp",
    "work-vector",
    "writeback-rest",
];

/// Primitives that would change state or block; the generator never runs them.
pub const REFUSED: &[(&str, &str)] = &[
    (
        "setlink",
        "it would change the /mars tree; the generator only reads",
    ),
    ("sleep", "it would block the generator"),
    ("timeout", "it would block the generator"),
    ("wait", "it would block the generator"),
    ("wait-resource", "it would block the generator"),
    ("wait-cluster", "it would block the generator"),
];

fn squash(s: &str) -> String {
    s.chars().filter(|c| *c != '-' && *c != '_').collect()
}

/// The canonical spelling of a MARS view macro name (`is_primary`, `isprimary` →
/// `is-primary`; the `wait-{todo,is}-…-{on,off}` family → `wait`), or `None` if `name` is not
/// one of MARS's view macros.
pub fn canonical(name: &str) -> Option<&'static str> {
    let s = squash(name);
    if s.starts_with("waittodo") || s.starts_with("waitis") {
        return Some("wait");
    }
    COMPLEX_MACROS
        .iter()
        .chain(PRIMITIVES)
        .chain(REFUSED.iter().map(|(n, _)| n))
        .find(|c| squash(c) == s)
        .copied()
}

/// One local resource as [`StateView`] answers for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceView {
    /// The designated primary (`None`: `(none)`).
    pub primary: Option<String>,
    /// This host's primary of it is in emergency mode.
    pub emergency: bool,
    /// The stack's start and stop unit (`set-systemd-unit`).
    pub units: Option<(String, String)>,
    /// Who acts as primary (`None`: not known to the caller, the role macros are not
    /// offered).
    pub roles: Option<Roles>,
    /// This host's sync, fetch and replay (`None`: not known, the amount macros are not
    /// offered).
    pub amounts: Option<Amounts>,
}

/// The state the generator's caller knows: this host, the cluster's id and the local
/// resources. Answers `%get-primary`, `%todo-primary`, `%todo-secondary`, `%is-emergency`,
/// `%is-member`, `%systemd-unit`, `%uuid`, `%my-resources`, `%count-my-resources` (MARS's
/// `%my-members`, `%my-guests` and their counts likewise) as MARS's marsadm computes them from
/// `/mars`; with [`ResourceView::roles`] also `%is-primary`, `%is-secondary`, `%nr-primary`,
/// `%nr-secondary`, with [`ResourceView::amounts`] the amounts, rates and remaining times of
/// sync, fetch, replay and work (this host's only, as MARS's `%{host}`); everything else is
/// not offered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateView {
    /// This host.
    pub host: String,
    /// The cluster's id (`None`: not in a cluster).
    pub uuid: Option<String>,
    /// The local resources.
    pub resources: BTreeMap<String, ResourceView>,
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

impl View for StateView {
    fn primitive(
        &self,
        name: &str,
        vars: &Vars,
        args: &[String],
    ) -> Option<Result<String, String>> {
        let res = vars.get("res").map(String::as_str).unwrap_or("");
        let host = vars.get("host").map(String::as_str).unwrap_or(&self.host);
        let arg = |i: usize| args.get(i).filter(|a| !a.is_empty());
        let r = self.resources.get(res);
        let primary = r.and_then(|r| r.primary.clone()).unwrap_or_default();
        let list = || -> String { self.resources.keys().map(|k| format!("{k}\n")).collect() };
        if let Some(roles) = r.and_then(|r| r.roles.as_ref()) {
            if let Some(v) = roles.macro_value(name, arg(0).map(String::as_str), host) {
                return Some(Ok(v));
            }
        }
        if let Some(amounts) = r.and_then(|r| r.amounts.as_ref()) {
            // MARS's `--threshold` reaches templates as the variable.
            let threshold = vars
                .get("threshold")
                .map_or(THRESHOLD, |t| Num::parse(t).as_u64());
            let a = args.first().map(String::as_str);
            match amounts.macro_value(name, a, threshold) {
                // Another host's amounts are not known here.
                Some(_) if host != self.host => return None,
                Some(v) => return Some(v),
                None => {}
            }
        }
        Some(Ok(match name {
            // MARS: "" for (none).
            "get-primary" => primary,
            // MARS compares with `host`: "1" or "" (Perl's false).
            "todo-primary" => {
                if !primary.is_empty() && primary == host {
                    "1".into()
                } else {
                    String::new()
                }
            }
            // MARS compares `%get-primary` with "(none)", which never holds (get-primary gives
            // "" for (none)), so it always says 0; corrected: 1 when no host is designated.
            "todo-secondary" => flag(primary.is_empty()),
            "is-emergency" => {
                let who = arg(0).map(String::as_str).unwrap_or(host);
                if who != self.host {
                    return None;
                }
                flag(r.is_some_and(|r| r.emergency))
            }
            "is-member" => {
                let rname = arg(0).map(String::as_str).unwrap_or(res);
                let who = arg(1).map(String::as_str).unwrap_or(host);
                if who != self.host {
                    return None;
                }
                flag(self.resources.contains_key(rname))
            }
            "systemd-unit" => match r.and_then(|r| r.units.as_ref()) {
                Some((start, stop)) => format!("{start} {stop}"),
                None => String::new(),
            },
            "uuid" => self.uuid.clone().unwrap_or_default(),
            "my-resources" | "my-members" => {
                if arg(0).is_some_and(|h| *h != self.host) {
                    return None;
                }
                list()
            }
            "count-my-resources" | "count-my-members" => {
                if arg(0).is_some_and(|h| *h != self.host) {
                    return None;
                }
                self.resources.len().to_string()
            }
            // This implementation has no guests (MARS: members without a disk).
            "my-guests" => String::new(),
            "count-my-guests" => "0".into(),
            _ => return None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(canonical("is_primary"), Some("is-primary"));
        assert_eq!(canonical("isprimary"), Some("is-primary"));
        assert_eq!(canonical("replinfo"), Some("replinfo"));
        assert_eq!(canonical("wait-is-primary-on"), Some("wait"));
        assert_eq!(canonical("setlink"), Some("setlink"));
        assert_eq!(canonical("nosuch"), None);
    }

    #[test]
    fn state_view() {
        let v = StateView {
            host: "a".into(),
            uuid: Some("u-1".into()),
            resources: BTreeMap::from([
                (
                    "r1".to_string(),
                    ResourceView {
                        primary: Some("a".into()),
                        emergency: true,
                        units: Some(("x.service".into(), "y.service".into())),
                        ..Default::default()
                    },
                ),
                ("r2".to_string(), ResourceView::default()),
            ]),
        };
        let vars = Vars::from([
            ("res".to_string(), "r1".to_string()),
            ("host".to_string(), "a".to_string()),
        ]);
        let p = |n: &str, args: &[&str]| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            v.primitive(n, &vars, &args).map(Result::unwrap)
        };
        assert_eq!(p("get-primary", &[]).as_deref(), Some("a"));
        assert_eq!(p("todo-primary", &[]).as_deref(), Some("1"));
        assert_eq!(p("is-emergency", &[]).as_deref(), Some("1"));
        assert_eq!(p("is-emergency", &["b"]), None);
        assert_eq!(p("is-member", &["r2"]).as_deref(), Some("1"));
        assert_eq!(p("is-member", &["r3"]).as_deref(), Some("0"));
        assert_eq!(
            p("systemd-unit", &[]).as_deref(),
            Some("x.service y.service")
        );
        assert_eq!(p("uuid", &[]).as_deref(), Some("u-1"));
        assert_eq!(p("my-resources", &[]).as_deref(), Some("r1\nr2\n"));
        assert_eq!(p("count-my-resources", &[]).as_deref(), Some("2"));
        assert_eq!(p("is-primary", &[]), None);
        assert_eq!(p("fetch-rest", &[]), None);
    }

    /// With roles and amounts the generator answers MARS's role and amount primitives from
    /// them, by the computation `marsadm view-…` uses (`crate::amount`).
    #[test]
    fn roles_and_amounts() {
        use crate::amount::Progress;
        let v = StateView {
            host: "b".into(),
            uuid: None,
            resources: BTreeMap::from([(
                "r1".to_string(),
                ResourceView {
                    primary: Some("a".into()),
                    roles: Some(Roles {
                        acting: ["a".to_string()].into(),
                        members: vec!["a".into(), "b".into()],
                    }),
                    amounts: Some(Amounts {
                        size: 1 << 30,
                        sync: None,
                        fetch: Some(Progress {
                            done: 4 << 20,
                            total: 40 << 20,
                            rate: 2 << 20,
                        }),
                        replay: Some(Progress {
                            done: 2 << 20,
                            total: 40 << 20,
                            rate: 1 << 20,
                        }),
                    }),
                    ..Default::default()
                },
            )]),
        };
        let mut vars = Vars::from([
            ("res".to_string(), "r1".to_string()),
            ("host".to_string(), "b".to_string()),
            ("threshold".to_string(), "10485760".to_string()),
        ]);
        let p = |vars: &Vars, n: &str, args: &[&str]| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            v.primitive(n, vars, &args)
        };
        let ok = |x: Option<Result<String, String>>| x.map(Result::unwrap);
        assert_eq!(ok(p(&vars, "is-primary", &[])).as_deref(), Some("0"));
        assert_eq!(ok(p(&vars, "is-primary", &["a"])).as_deref(), Some("1"));
        assert_eq!(ok(p(&vars, "is-secondary", &[])).as_deref(), Some("1"));
        assert_eq!(ok(p(&vars, "nr-primary", &[])).as_deref(), Some("1"));
        assert_eq!(ok(p(&vars, "fetch-rest", &[])).as_deref(), Some("37748736"));
        assert_eq!(ok(p(&vars, "work-percent", &[])).as_deref(), Some("5.025"));
        assert_eq!(
            ok(p(&vars, "replay-vector", &["/"])).as_deref(),
            Some("2097152/4194304")
        );
        assert_eq!(ok(p(&vars, "fetch-remain", &[])).as_deref(), Some("18"));
        assert_eq!(ok(p(&vars, "sync-reached", &[])).as_deref(), Some("1"));
        // 36 MiB left: not within the variable's 10 MiB, within 40M given.
        assert_eq!(
            ok(p(&vars, "fetch-threshold-reached", &[])).as_deref(),
            Some("0")
        );
        assert_eq!(
            ok(p(&vars, "fetch-threshold-reached", &["40M"])).as_deref(),
            Some("1")
        );
        assert!(matches!(
            p(&vars, "fetch-threshold-reached", &["x"]),
            Some(Err(_))
        ));
        vars.insert("threshold".into(), "104857600".into());
        assert_eq!(
            ok(p(&vars, "fetch-threshold-reached", &[])).as_deref(),
            Some("1")
        );
        // Another host's amounts are not known here.
        vars.insert("host".into(), "a".into());
        assert_eq!(p(&vars, "fetch-rest", &[]), None);
        assert_eq!(ok(p(&vars, "is-primary", &[])).as_deref(), Some("1"));
    }
}
