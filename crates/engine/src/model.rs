//! A resource as the replicated metadata describes it, and what each member reports.

use std::collections::BTreeMap;

use mars_config::{HostName, ResourceName};
use mars_txlog::LogPos;
use serde::{Deserialize, Serialize};

use crate::keys::{self, ResourceKey};

/// The "todo" side: what the operator wants this member to do. A missing key means on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Todo {
    pub attach: bool,
    pub sync: bool,
    pub fetch: bool,
    pub replay: bool,
}

impl Default for Todo {
    fn default() -> Self {
        Self {
            attach: true,
            sync: true,
            fetch: true,
            replay: true,
        }
    }
}

impl Todo {
    pub fn get(&self, switch: &str) -> Option<bool> {
        Some(match switch {
            "attach" => self.attach,
            "sync" => self.sync,
            "fetch" => self.fetch,
            "replay" => self.replay,
            _ => return None,
        })
    }
    pub(crate) fn set(&mut self, switch: &str, on: bool) {
        match switch {
            "attach" => self.attach = on,
            "sync" => self.sync = on,
            "fetch" => self.fetch = on,
            "replay" => self.replay = on,
            _ => {}
        }
    }
}

/// The role a member reports for itself (MARS's `actual-HOST/is-primary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    #[default]
    Secondary,
}

/// A running or pending full sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    /// Log position at sync start (`None` until the primary told us): after the copy, replay
    /// from here makes the replica consistent.
    pub start: Option<LogPos>,
    /// Bytes of the device copied (from offset 0; the region below is done).
    pub done: u64,
    /// Bytes to copy.
    pub size: u64,
    /// Bytes that differed and were transferred.
    #[serde(default)]
    pub transferred: u64,
    pub running: bool,
    #[serde(default)]
    pub rate: u64,
}

impl SyncReport {
    /// Whether the copy is complete (only replay is left before consistency).
    pub fn end_known(&self) -> bool {
        self.done >= self.size && !self.running
    }
}

/// The "actual" side: what a member reports about itself (`resource-RES/actual-HOST`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Report {
    pub role: Role,
    pub attached: bool,
    /// Everything before this log position is on the member's disk (primary: written back;
    /// secondary: replayed).
    pub applied: Option<LogPos>,
    /// Primary: durable end of its log. Secondary: end of what it has fetched.
    pub log_end: Option<LogPos>,
    /// Primary: its logfiles as `(number, length)`, oldest first (the newest one still
    /// growing). Lets every member compute how far behind it is.
    pub logs: Vec<(u64, u64)>,
    pub sync: Option<SyncReport>,
    /// The replica holds a consistent state (no full sync pending or running).
    pub consistent: bool,
    /// The oldest logfile this member still needs; `None`: it pins nothing.
    pub pin: Option<u64>,
    /// Why replication is stuck here, if it is.
    pub stuck: Option<String>,
    /// Logfiles this member needs are gone: only a full sync (`invalidate`) helps.
    pub needs_sync: bool,
    pub disk_size: u64,
    pub open_count: u64,
    pub dirty_bytes: u64,
    pub fetch_rate: u64,
    pub replay_rate: u64,
    /// Secondary: the primary recently confirmed over the fetch stream that this replica has
    /// fetched everything durable there.
    pub caught_up: bool,
    /// Secondary: its history differs from its source's from this logfile on (the source has
    /// another logfile of that number, or less of it than we have).
    pub forked: Option<u64>,
    /// Primary: in emergency mode (root nearly full): writes bypass the log, replication has
    /// stopped at a hole in the logfile numbers.
    pub emergency: bool,
    /// The designation ([`ResourceMeta::designation`]) the member knew when it made this
    /// report. A planned promotion waits until every reachable member reports under its own
    /// designation: an older report may predate a short primary period of that member whose
    /// writes the new primary never saw (found by mars-sim, seed 4122).
    pub designation: u64,
    /// What `stuck` is about (absent in reports of older versions: then the text decides).
    pub stuck_kind: Option<crate::reason::StuckKind>,
}

impl Report {
    /// Bytes of this (primary's) log after `pos`, if it reported its logfiles.
    pub fn bytes_after(&self, pos: LogPos) -> Option<u64> {
        if self.logs.is_empty() {
            return None;
        }
        let mut n = 0u64;
        for &(no, len) in &self.logs {
            if no > pos.file {
                n += len;
            } else if no == pos.file {
                n += len.saturating_sub(pos.offset);
            }
        }
        Some(n)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("reports always serialize")
    }
    pub fn from_json(s: &str) -> Option<Self> {
        serde_json::from_str(s).ok()
    }
}

/// One member of a resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Member {
    pub disk: String,
    pub todo: Todo,
    pub report: Option<Report>,
    /// `set-emergency-limit`: percent of the root filesystem the resource's logfiles may take
    /// on this member before it enters emergency mode (`None` or 0: no limit).
    pub emergency_limit: Option<u8>,
    /// Per switch: the `*-global` request this member applied last (`todo-HOST/applied/SW`).
    pub applied: BTreeMap<String, crate::RequestId>,
    /// The Lamport stamp of its `data-HOST` key: since when it is a member (0: unknown).
    pub since: u64,
}

/// Everything the metadata says about one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceMeta {
    pub name: ResourceName,
    pub size: Option<u64>,
    /// The designated primary; `None` for `(none)` or no key.
    pub primary: Option<HostName>,
    /// The Lamport stamp of the designated-primary key: every `primary`, `primary --force` and
    /// `secondary` makes a new one, the same on every host. 0: no key. Set by the caller of
    /// [`ResourceMeta::from_entries`] from the store (the entries carry no stamps).
    pub designation: u64,
    pub members: BTreeMap<HostName, Member>,
    /// Version links: logfile number → host → link.
    pub versions: BTreeMap<u64, BTreeMap<HostName, String>>,
    /// Per host: the logfile where its log continued after a deliberate hole; the version
    /// chain starts anew there.
    pub chain_starts: BTreeMap<HostName, u64>,
    /// The systemd stack: units, want, each host's last operation.
    pub systemd: crate::systemd::SystemdMeta,
    /// The `*-global` commands' requests, per switch (`request/SWITCH`; see `crate::request`).
    pub requests: BTreeMap<String, crate::SwitchRequest>,
}

impl ResourceMeta {
    pub fn empty(name: ResourceName) -> Self {
        Self {
            name,
            size: None,
            primary: None,
            designation: 0,
            members: BTreeMap::new(),
            versions: BTreeMap::new(),
            chain_starts: BTreeMap::new(),
            systemd: Default::default(),
            requests: BTreeMap::new(),
        }
    }

    /// Builds the resource from store entries `(key, value, stamp)`: like
    /// [`ResourceMeta::from_entries`], plus the Lamport stamps decisions need (the
    /// designation's and the systemd want's).
    pub fn from_stamped<'a>(
        name: ResourceName,
        entries: impl IntoIterator<Item = (&'a str, &'a str, u64)>,
    ) -> Self {
        let entries: Vec<(&str, &str, u64)> = entries.into_iter().collect();
        let mut m = Self::from_entries(name, entries.iter().map(|(k, v, _)| (*k, *v)));
        let primary = keys::primary(&m.name);
        let want = keys::systemd_want(&m.name);
        for (k, _, stamp) in &entries {
            if *k == primary {
                m.designation = *stamp;
            } else if *k == want {
                m.systemd.want_stamp = *stamp;
            } else {
                match keys::parse(k) {
                    Some((res, ResourceKey::Request(sw))) if res == m.name => {
                        if let Some(r) = m.requests.get_mut(&sw) {
                            r.id.stamp = *stamp;
                        }
                    }
                    Some((res, ResourceKey::Data(h))) if res == m.name => {
                        if let Some(mem) = m.members.get_mut(&h) {
                            mem.since = *stamp;
                        }
                    }
                    _ => {}
                }
            }
        }
        m
    }

    /// Builds the resource from its keys (anything not below `resource-RES/` is ignored).
    /// Members are hosts with a `data-HOST` key; todo and reports of non-members are ignored.
    pub fn from_entries<'a>(
        name: ResourceName,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut m = Self::empty(name);
        let mut todos: Vec<(HostName, String, bool)> = Vec::new();
        let mut reports: Vec<(HostName, Report)> = Vec::new();
        let mut limits: Vec<(HostName, Option<u8>)> = Vec::new();
        let mut applied: Vec<(HostName, String, crate::RequestId)> = Vec::new();
        for (k, v) in entries {
            let Some((res, key)) = keys::parse(k) else {
                continue;
            };
            if res != m.name {
                continue;
            }
            match key {
                ResourceKey::Size => m.size = v.parse().ok(),
                ResourceKey::Primary => m.primary = HostName::new(v).ok(),
                ResourceKey::Data(h) => {
                    m.members.entry(h).or_default().disk = v.to_string();
                }
                ResourceKey::Todo(h, sw) => todos.push((h, sw, v != "0")),
                // Peers' values are checked: anything malformed is as if absent.
                ResourceKey::Request(sw) if crate::request::is_global_switch(&sw) => {
                    if let Some(r) = crate::request::RequestValue::from_json(v) {
                        let id = crate::RequestId { stamp: 0, by: r.by };
                        m.requests.insert(sw, crate::SwitchRequest { on: r.on, id });
                    }
                }
                ResourceKey::Request(_) => {}
                ResourceKey::Applied(h, sw) if crate::request::is_global_switch(&sw) => {
                    if let Some(id) = crate::RequestId::from_json(v) {
                        applied.push((h, sw, id));
                    }
                }
                ResourceKey::Applied(..) => {}
                ResourceKey::Actual(h) => {
                    if let Some(r) = Report::from_json(v) {
                        reports.push((h, r));
                    }
                }
                ResourceKey::Version(no, h) => {
                    m.versions.entry(no).or_default().insert(h, v.to_string());
                }
                ResourceKey::ChainStart(h) => {
                    if let Ok(no) = v.parse() {
                        m.chain_starts.insert(h, no);
                    }
                }
                ResourceKey::EmergencyLimit(h) => limits.push((h, v.parse().ok())),
                // An empty unit is `set-systemd-unit RES ""` written by an older peer: none.
                ResourceKey::SystemdStartUnit => {
                    m.systemd.start_unit = Some(v.to_string()).filter(|u| !u.is_empty())
                }
                ResourceKey::SystemdStopUnit => {
                    m.systemd.stop_unit = Some(v.to_string()).filter(|u| !u.is_empty())
                }
                ResourceKey::SystemdWant => {
                    m.systemd.want = crate::systemd::SystemdMeta::parse_want(v);
                    m.systemd.want_raw = Some(v.to_string());
                }
                ResourceKey::SystemdStatus(h) => {
                    if let Some(st) = crate::systemd::UnitStatus::from_json(v) {
                        m.systemd.status.insert(h, st);
                    }
                }
                ResourceKey::Other => {}
            }
        }
        for (h, sw, on) in todos {
            if let Some(mem) = m.members.get_mut(&h) {
                mem.todo.set(&sw, on);
            }
        }
        for (h, r) in reports {
            if let Some(mem) = m.members.get_mut(&h) {
                mem.report = Some(r);
            }
        }
        for (h, pct) in limits {
            if let Some(mem) = m.members.get_mut(&h) {
                mem.emergency_limit = pct.filter(|p| *p > 0);
            }
        }
        for (h, sw, id) in applied {
            if let Some(mem) = m.members.get_mut(&h) {
                mem.applied.insert(sw, id);
            }
        }
        m
    }

    /// The resource exists (has a size).
    pub fn exists(&self) -> bool {
        self.size.is_some()
    }

    pub fn is_member(&self, h: &HostName) -> bool {
        self.members.contains_key(h)
    }

    pub fn version(&self, no: u64, host: &HostName) -> Option<&str> {
        self.versions.get(&no)?.get(host).map(String::as_str)
    }

    /// The designated primary's report.
    pub fn primary_report(&self) -> Option<&Report> {
        self.members.get(self.primary.as_ref()?)?.report.as_ref()
    }

    /// Bytes of the primary's log after `pos` (what a member at `pos` still has to apply),
    /// if the primary reported its logfiles.
    pub fn bytes_after(&self, pos: LogPos) -> Option<u64> {
        self.primary_report()?.bytes_after(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_entries() {
        let r = ResourceName::new("r").unwrap();
        let a = HostName::new("a").unwrap();
        let b = HostName::new("b").unwrap();
        let rep = Report {
            role: Role::Primary,
            logs: vec![(3, 100), (4, 50)],
            ..Default::default()
        }
        .to_json();
        let e = vec![
            ("resource-r/size".to_string(), "1048576".to_string()),
            ("resource-r/primary".into(), "a".into()),
            ("resource-r/data-a".into(), "/dev/x".into()),
            ("resource-r/data-b".into(), "/dev/y".into()),
            ("resource-r/todo-b/fetch".into(), "0".into()),
            ("resource-r/todo-c/fetch".into(), "0".into()),
            ("resource-r/actual-a".into(), rep),
            ("resource-r/version-000000003-a".into(), "x".into()),
            ("resource-r/systemd-start-unit".into(), "app.service".into()),
            ("resource-r/systemd-want".into(), "b".into()),
            ("resource-r/systemd-status-b".into(), "garbage".into()),
            ("resource-other/size".into(), "5".into()),
        ];
        let m = ResourceMeta::from_entries(r, e.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(m.size, Some(1 << 20));
        assert_eq!(m.primary, Some(a.clone()));
        assert_eq!(m.members.len(), 2);
        assert!(!m.members[&b].todo.fetch);
        assert!(m.members[&b].todo.replay);
        assert_eq!(m.version(3, &a), Some("x"));
        assert_eq!(m.systemd.start_unit.as_deref(), Some("app.service"));
        assert_eq!(m.systemd.stop(), Some("app.service"));
        assert_eq!(m.systemd.want, Some(b.clone()));
        // A malformed status is ignored, not an error.
        assert!(m.systemd.status.is_empty());
        assert_eq!(m.bytes_after(LogPos::new(3, 40)), Some(110));
        assert_eq!(m.bytes_after(LogPos::new(5, 0)), Some(0));
    }
}
