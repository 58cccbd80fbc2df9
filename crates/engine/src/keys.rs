//! The replicated metadata schema of a resource (MARS's `/mars/resource-RES/` tree as keys).
//!
//! | key | owner | value |
//! |---|---|---|
//! | `resource-RES/size` | shared | logical size in bytes |
//! | `resource-RES/primary` | shared | designated primary host, or `(none)` |
//! | `resource-RES/data-HOST` | HOST | backing disk path; this key *is* the membership |
//! | `resource-RES/todo-HOST/{attach,sync,fetch,replay}` | HOST | desired switch, `1` or `0` |
//! | `resource-RES/request/{sync,fetch,replay}` | shared | a `*-global` command's [`crate::SwitchRequest`], JSON `{"on":BOOL,"by":HOST}`; its Lamport stamp orders the requests |
//! | `resource-RES/todo-HOST/applied/{sync,fetch,replay}` | HOST | the request HOST applied last to its own switch, JSON [`crate::RequestId`] `{"stamp":N,"by":HOST}` |
//! | `resource-RES/actual-HOST` | HOST | JSON [`crate::Report`]: what HOST reports about itself |
//! | `resource-RES/version-NNNNNNNNN-HOST` | HOST | version link of logfile N as HOST saw it |
//! | `resource-RES/chain-start-HOST` | HOST | logfile number where HOST's log continued after a deliberate hole (emergency mode): its version chain starts anew there |
//! | `resource-RES/emergency-limit-HOST` | HOST | `set-emergency-limit`: emergency mode once the resource's logfiles take more than this percentage of HOST's root filesystem (0: off) |
//! | `resource-RES/systemd-start-unit` | shared | unit started where the stack should run (`set-systemd-unit`) |
//! | `resource-RES/systemd-stop-unit` | shared | unit stopped everywhere else |
//! | `resource-RES/systemd-want` | shared | host that should run the stack, or `(none)` |
//! | `resource-RES/systemd-status-HOST` | HOST | JSON [`crate::systemd::UnitStatus`]: HOST's last start/stop |
//! | `defaults/sync-limit` | shared | concurrent full syncs per host (0: unlimited) |
//! | `defaults/unreachable-limit` | shared | seconds after which an unreachable member stops pinning logfiles |
//! | `defaults/enabled-net-compressions` | shared | MARS's `set-global-enabled-net-compressions`: `\|`-separated `COMPRESS_LZ4`, `COMPRESS_ZSTD` the fetch and sync streams may use (absent: none) |
//!
//! Ownership follows the `-HOST` suffix of the segment nearest the leaf (see `mars_meta`), so a
//! host only ever writes its own `data-`, `todo-`, `actual-`, `version-` and `systemd-status-`
//! keys. The shared `systemd-*` keys end in `-unit` and `-want`: a member named `unit` or `want`
//! would own them (and `set-systemd-unit` is refused on other hosts then); MARS host names are
//! rarely that short, so we accept the quirk rather than rename MARS's keys.

use mars_config::{HostName, ResourceName};

/// The value of `primary` when no host is designated.
pub const NO_PRIMARY: &str = "(none)";

pub const SYNC_LIMIT: &str = "defaults/sync-limit";
pub const UNREACHABLE_LIMIT: &str = "defaults/unreachable-limit";
pub const NET_COMPRESSIONS: &str = "defaults/enabled-net-compressions";
/// Default for [`UNREACHABLE_LIMIT`]: a day. A member gone longer stops holding logfiles.
pub const DEFAULT_UNREACHABLE_SECS: u64 = 24 * 3600;

pub fn prefix(res: &ResourceName) -> String {
    format!("resource-{res}/")
}
pub fn size(res: &ResourceName) -> String {
    format!("resource-{res}/size")
}
pub fn primary(res: &ResourceName) -> String {
    format!("resource-{res}/primary")
}
pub fn data(res: &ResourceName, host: &HostName) -> String {
    format!("resource-{res}/data-{host}")
}
pub fn todo(res: &ResourceName, host: &HostName, switch: &str) -> String {
    format!("resource-{res}/todo-{host}/{switch}")
}
/// A `*-global` command's request to every member (a shared key: any member may write it;
/// no segment ends in `-…`, so no member name can make it owned).
pub fn request(res: &ResourceName, switch: &str) -> String {
    format!("resource-{res}/request/{switch}")
}
/// The request `host` applied last to its own switch (owned by `host` through `todo-HOST`).
pub fn applied(res: &ResourceName, host: &HostName, switch: &str) -> String {
    format!("resource-{res}/todo-{host}/applied/{switch}")
}
pub fn actual(res: &ResourceName, host: &HostName) -> String {
    format!("resource-{res}/actual-{host}")
}
pub fn chain_start(res: &ResourceName, host: &HostName) -> String {
    format!("resource-{res}/chain-start-{host}")
}

pub fn emergency_limit(res: &ResourceName, host: &HostName) -> String {
    format!("resource-{res}/emergency-limit-{host}")
}

pub fn version(res: &ResourceName, no: u64, host: &HostName) -> String {
    format!("resource-{res}/version-{no:09}-{host}")
}
pub fn systemd_start_unit(res: &ResourceName) -> String {
    format!("resource-{res}/systemd-start-unit")
}
pub fn systemd_stop_unit(res: &ResourceName) -> String {
    format!("resource-{res}/systemd-stop-unit")
}
pub fn systemd_want(res: &ResourceName) -> String {
    format!("resource-{res}/systemd-want")
}
pub fn systemd_status(res: &ResourceName, host: &HostName) -> String {
    format!("resource-{res}/systemd-status-{host}")
}

/// A key below `resource-RES/`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceKey {
    Size,
    Primary,
    Data(HostName),
    Todo(HostName, String),
    /// `request/SWITCH`.
    Request(String),
    /// `todo-HOST/applied/SWITCH`.
    Applied(HostName, String),
    Actual(HostName),
    Version(u64, HostName),
    ChainStart(HostName),
    EmergencyLimit(HostName),
    SystemdStartUnit,
    SystemdStopUnit,
    SystemdWant,
    SystemdStatus(HostName),
    Other,
}

/// Parses `key` if it belongs to some resource: `(resource, what)`.
pub fn parse(key: &str) -> Option<(ResourceName, ResourceKey)> {
    let rest = key.strip_prefix("resource-")?;
    let (res, leaf) = rest.split_once('/')?;
    let res = ResourceName::new(res).ok()?;
    let host = |s: &str| HostName::new(s).ok();
    let k = match leaf {
        "size" => ResourceKey::Size,
        "primary" => ResourceKey::Primary,
        "systemd-start-unit" => ResourceKey::SystemdStartUnit,
        "systemd-stop-unit" => ResourceKey::SystemdStopUnit,
        "systemd-want" => ResourceKey::SystemdWant,
        _ => {
            if let Some(h) = leaf.strip_prefix("data-").and_then(host) {
                ResourceKey::Data(h)
            } else if let Some(h) = leaf.strip_prefix("actual-").and_then(host) {
                ResourceKey::Actual(h)
            } else if let Some(h) = leaf.strip_prefix("chain-start-").and_then(host) {
                ResourceKey::ChainStart(h)
            } else if let Some(h) = leaf.strip_prefix("emergency-limit-").and_then(host) {
                ResourceKey::EmergencyLimit(h)
            } else if let Some(h) = leaf.strip_prefix("systemd-status-").and_then(host) {
                ResourceKey::SystemdStatus(h)
            } else if let Some(sw) = leaf.strip_prefix("request/") {
                ResourceKey::Request(sw.to_string())
            } else if let Some((t, sw)) = leaf.strip_prefix("todo-").and_then(|t| t.split_once('/'))
            {
                match (host(t), sw.strip_prefix("applied/")) {
                    (Some(h), Some(sw)) => ResourceKey::Applied(h, sw.to_string()),
                    (Some(h), None) => ResourceKey::Todo(h, sw.to_string()),
                    (None, _) => ResourceKey::Other,
                }
            } else if let Some(v) = leaf.strip_prefix("version-") {
                match v.split_once('-') {
                    Some((no, h)) if no.len() == 9 => match (no.parse::<u64>(), host(h)) {
                        (Ok(no), Some(h)) => ResourceKey::Version(no, h),
                        _ => ResourceKey::Other,
                    },
                    _ => ResourceKey::Other,
                }
            } else {
                ResourceKey::Other
            }
        }
    };
    Some((res, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let r = ResourceName::new("vm1").unwrap();
        let h = HostName::new("node-b").unwrap();
        assert_eq!(parse(&size(&r)), Some((r.clone(), ResourceKey::Size)));
        assert_eq!(
            parse(&chain_start(&r, &h)),
            Some((r.clone(), ResourceKey::ChainStart(h.clone())))
        );
        assert_eq!(
            parse(&emergency_limit(&r, &h)),
            Some((r.clone(), ResourceKey::EmergencyLimit(h.clone())))
        );
        assert_eq!(parse(&primary(&r)), Some((r.clone(), ResourceKey::Primary)));
        assert_eq!(
            parse(&data(&r, &h)),
            Some((r.clone(), ResourceKey::Data(h.clone())))
        );
        assert_eq!(
            parse(&todo(&r, &h, "fetch")),
            Some((r.clone(), ResourceKey::Todo(h.clone(), "fetch".into())))
        );
        assert_eq!(
            parse(&actual(&r, &h)),
            Some((r.clone(), ResourceKey::Actual(h.clone())))
        );
        assert_eq!(
            parse(&version(&r, 42, &h)),
            Some((r.clone(), ResourceKey::Version(42, h.clone())))
        );
        assert_eq!(version(&r, 42, &h), "resource-vm1/version-000000042-node-b");
        assert_eq!(
            parse(&systemd_status(&r, &h)),
            Some((r.clone(), ResourceKey::SystemdStatus(h.clone())))
        );
        assert_eq!(
            parse(&systemd_start_unit(&r)),
            Some((r.clone(), ResourceKey::SystemdStartUnit))
        );
        assert_eq!(
            parse(&systemd_stop_unit(&r)),
            Some((r.clone(), ResourceKey::SystemdStopUnit))
        );
        assert_eq!(
            parse(&systemd_want(&r)),
            Some((r.clone(), ResourceKey::SystemdWant))
        );
        assert_eq!(
            parse(&request(&r, "fetch")),
            Some((r.clone(), ResourceKey::Request("fetch".into())))
        );
        assert_eq!(
            parse(&applied(&r, &h, "fetch")),
            Some((r.clone(), ResourceKey::Applied(h.clone(), "fetch".into())))
        );
        assert_eq!(parse("ips/ip-a"), None);
        assert_eq!(
            parse("resource-vm1/version-42-a"),
            Some((r.clone(), ResourceKey::Other))
        );
        assert_eq!(
            parse("resource-a/b/c"),
            Some((ResourceName::new("a").unwrap(), ResourceKey::Other))
        );
    }
}
