//! Key syntax and ownership.

use std::collections::BTreeSet;

use mars_config::HostName;

use crate::MetaError;

/// Longest key in bytes (NAME_MAX, as MARS keys were file paths).
pub const MAX_KEY_LEN: usize = 255;

/// Longest value in bytes (MARS values were symlink targets; PATH_MAX).
pub const MAX_VALUE_LEN: usize = 4096;

/// Checks a key: non-empty, at most [`MAX_KEY_LEN`] bytes of printable ASCII without spaces,
/// `/`-separated segments, none of them empty, `.` or `..`.
pub fn validate_key(key: &str) -> Result<(), MetaError> {
    let bad = |reason| {
        Err(MetaError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("longer than 255 bytes");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("only printable ASCII without spaces is allowed");
    }
    for segment in key.split('/') {
        match segment {
            "" => return bad("empty path segment"),
            "." | ".." => return bad("`.` and `..` segments are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

/// The host a membership key `ips/ip-HOST` declares, if `key` is one.
pub fn member_of_key(key: &str) -> Option<HostName> {
    let host = key.strip_prefix("ips/ip-")?;
    HostName::new(host).ok()
}

/// The host whose certificate fingerprint a key `certs/cert-HOST` records, if `key` is one.
pub fn cert_of_key(key: &str) -> Option<HostName> {
    let host = key.strip_prefix("certs/cert-")?;
    HostName::new(host).ok()
}

/// The member that owns `key`, or `None` for a shared key.
///
/// Membership keys `ips/ip-HOST` are shared. Otherwise the segment nearest the leaf that ends in `-HOST` for a member `HOST` decides (the longest
/// such member name if several match); a leading `resource-RES` segment is a resource directory
/// and never makes a key owned.
pub fn owner_of(key: &str, members: &BTreeSet<HostName>) -> Option<HostName> {
    // Membership is shared: a host announces itself, but any member must be able to remove a
    // dead one (`lowlevel-delete-host`), as in MARS.
    // A member's certificate fingerprint goes with its membership (removing a dead member
    // revokes its certificate).
    if member_of_key(key).is_some() || cert_of_key(key).is_some() {
        return None;
    }
    let segments: Vec<&str> = key.split('/').collect();
    segments
        .into_iter()
        .enumerate()
        .rev()
        .filter(|&(i, seg)| !(i == 0 && seg.starts_with("resource-")))
        .find_map(|(_, seg)| {
            members
                .iter()
                .filter(|m| {
                    let m = m.as_str();
                    seg.len() > m.len() + 1
                        && seg.ends_with(m)
                        && seg.as_bytes()[seg.len() - m.len() - 1] == b'-'
                })
                .max_by_key(|m| m.as_str().len())
                .cloned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_validation() {
        for good in [
            "uuid",
            "resource-vm1/primary",
            "resource-vm.1/log-000000001-alpha",
            "a/b/c",
            "x".repeat(255).as_str(),
        ] {
            validate_key(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for bad in [
            "",
            "/abs",
            "trailing/",
            "a//b",
            "a/./b",
            "..",
            "a/..",
            "with space",
            "tab\there",
            "new\nline",
            "umlaut-ä",
            "x".repeat(256).as_str(),
        ] {
            assert!(
                matches!(validate_key(bad), Err(MetaError::InvalidKey { .. })),
                "{bad:?} accepted"
            );
        }
    }

    fn members(names: &[&str]) -> BTreeSet<HostName> {
        names.iter().map(|n| HostName::new(n).unwrap()).collect()
    }

    #[test]
    fn ownership() {
        let m = members(&["alpha", "beta", "test-bap1", "bap1", "vm1"]);
        let owner = |k| owner_of(k, &m).map(|h| h.to_string());
        assert_eq!(owner("resource-vm1/replay-alpha").as_deref(), Some("alpha"));
        assert_eq!(owner("actual-alpha/alive").as_deref(), Some("alpha"));
        // Membership is shared, so that a dead member can be removed by any other.
        assert_eq!(owner("ips/ip-beta").as_deref(), None);
        // So is a member's certificate fingerprint, which goes with it.
        assert_eq!(owner("certs/cert-beta").as_deref(), None);
        assert_eq!(
            owner("resource-vm1/todo-beta/attach").as_deref(),
            Some("beta")
        );
        assert_eq!(
            owner("resource-vm1/log-000000001-alpha").as_deref(),
            Some("alpha")
        );
        // Longest member name wins; a bare host name is not a suffix match.
        assert_eq!(
            owner("actual-test-bap1/alive").as_deref(),
            Some("test-bap1")
        );
        assert_eq!(owner("actual-x-bap1/alive").as_deref(), Some("bap1"));
        assert_eq!(owner("alpha"), None);
        assert_eq!(owner("ips/-alpha"), None);
        // Shared keys; `resource-vm1` names a resource even though vm1 is a host.
        assert_eq!(owner("resource-vm1/primary"), None);
        assert_eq!(owner("resource-vm1/size"), None);
        assert_eq!(owner("defaults/sync-limit"), None);
        assert_eq!(owner("actual-gamma/alive"), None, "gamma is no member");
        // A `*-global` switch request is shared whatever the members are called; what a host
        // applied of it is its own (mars_engine::keys).
        let m2 = members(&["alpha", "request", "fetch"]);
        assert_eq!(owner_of("resource-vm1/request/fetch", &m2), None);
        assert_eq!(
            owner_of("resource-vm1/todo-alpha/applied/fetch", &m2)
                .map(|h| h.to_string())
                .as_deref(),
            Some("alpha")
        );
        // Not at the start, `resource-…` is an ordinary segment.
        assert_eq!(owner("x/resource-vm1").as_deref(), Some("vm1"));
    }

    #[test]
    fn membership_keys() {
        assert_eq!(member_of_key("ips/ip-alpha").unwrap().as_str(), "alpha");
        assert!(member_of_key("ips/ip-Alpha").is_none());
        assert!(member_of_key("ips/ip-a/b").is_none());
        assert!(member_of_key("ips/alpha").is_none());
    }
}
