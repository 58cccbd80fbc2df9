//! The `*-global` commands' switch requests (MARS's `pause-fetch-global` & co.).
//!
//! MARS's global commands write the switch link of every member (`todo-*/connect`); here a
//! member's switches are its own keys and a host writes only what it owns. So a global
//! command writes one shared *request* per switch, `resource-RES/request/SWITCH` =
//! `{"on":BOOL,"by":HOST}`, and every member's engine applies a request newer than the one it
//! applied last to its own `todo-HOST/SWITCH`, recording what it applied in
//! `todo-HOST/applied/SWITCH` = `{"stamp":N,"by":HOST}` in the same write. Requests are
//! ordered by their key's Lamport stamp (the same on every host), ties by the writer's name
//! as the store breaks them. A later `-local` command changes only `todo-HOST/SWITCH`: the
//! record stays, so the old request is not applied again (not after a restart either: the
//! record is in the store); a newer request is. A request older than the member's membership
//! (its `data-HOST` key) is not applied: it was not meant for this member. (A member that
//! re-signs its entries — `renew-certificate`, `rotate-ca` — gets a newer `data-HOST` stamp;
//! a request it had not applied by then is not applied any more. A running member applies a
//! request within one metadata round trip, so only a member that renews its certificate
//! before it ever saw the request misses it, and the waiting command takes it for a member
//! that joined later.)
//!
//! Peers' metadata is not trusted: a value longer than [`MAX_VALUE`], not the JSON above, with
//! an unknown switch or a bad host name is ignored (as if absent).

use mars_config::HostName;
use serde::{Deserialize, Serialize};

/// The switches a global command may request (MARS has no `attach-global`).
pub const GLOBAL_SWITCHES: [&str; 3] = ["fetch", "replay", "sync"];

/// Longest request or record value accepted (a host name is at most 63 bytes).
pub const MAX_VALUE: usize = 256;

/// Which request: its key's Lamport stamp, then its writer. Ordered as the store orders the
/// writes of one key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestId {
    pub stamp: u64,
    pub by: HostName,
}

impl RequestId {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("request ids always serialize")
    }

    /// A record as written by a member; `None` for anything malformed.
    pub fn from_json(s: &str) -> Option<RequestId> {
        if s.len() > MAX_VALUE {
            return None;
        }
        serde_json::from_str(s)
            .ok()
            .filter(|r: &RequestId| r.stamp > 0)
    }
}

/// What a request's value holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestValue {
    pub on: bool,
    pub by: HostName,
}

impl RequestValue {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("requests always serialize")
    }

    pub fn from_json(s: &str) -> Option<RequestValue> {
        if s.len() > MAX_VALUE {
            return None;
        }
        serde_json::from_str(s).ok()
    }
}

/// A request as the metadata holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchRequest {
    pub on: bool,
    /// Stamp 0 until the store's stamp is known ([`crate::ResourceMeta::from_stamped`]): such
    /// a request is never applied.
    pub id: RequestId,
}

/// Whether `switch` is one a global command may request.
pub fn is_global_switch(switch: &str) -> bool {
    GLOBAL_SWITCHES.contains(&switch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_are_ignored() {
        let ok = RequestValue {
            on: false,
            by: HostName::new("a").unwrap(),
        };
        assert_eq!(RequestValue::from_json(&ok.to_json()), Some(ok));
        for bad in [
            "",
            "0",
            "{}",
            r#"{"on":1,"by":"a"}"#,
            r#"{"on":true,"by":"A B"}"#,
            r#"{"on":true,"by":"a","x":1}"#,
            &format!(r#"{{"on":true,"by":"{}"}}"#, "a".repeat(300)),
        ] {
            assert_eq!(RequestValue::from_json(bad), None, "{bad:?}");
        }
        let id = RequestId {
            stamp: 7,
            by: HostName::new("b").unwrap(),
        };
        assert_eq!(RequestId::from_json(&id.to_json()), Some(id));
        for bad in [r#"{"stamp":0,"by":"b"}"#, r#"{"stamp":-1,"by":"b"}"#, "x"] {
            assert_eq!(RequestId::from_json(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn order_is_stamp_then_writer() {
        let id = |s, b| RequestId {
            stamp: s,
            by: HostName::new(b).unwrap(),
        };
        assert!(id(2, "a") > id(1, "z"));
        assert!(id(2, "b") > id(2, "a"));
    }
}
