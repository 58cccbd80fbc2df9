//! Who must sign an entry, what is signed, and the store's view of the cluster's PKI.
//!
//! An entry a host owns is valid only when that host wrote it: its `origin` must be the owner,
//! and in a cluster with certificates (an [`Authority`] is installed) it must carry the owner's
//! signature, checked against the certificate `certs/cert-OWNER` records. So a member relays
//! other members' keys but cannot forge or alter them, and the check is the same whether an
//! entry comes from its owner or through a third host.
//!
//! | key | who writes a value | who deletes it |
//! |---|---|---|
//! | owned (a segment `…-HOST` of a member, see [`owner_of`](crate::owner_of)) | HOST, signed | HOST, signed |
//! | `ips/ip-HOST` (membership and address) | HOST, signed | any member (`lowlevel-delete-host` of a dead one) |
//! | `certs/cert-HOST` (its certificate) | HOST; the value is a certificate of the cluster's CA naming HOST | any member (revocation) |
//! | everything else (shared) | any member | any member |
//!
//! The signed bytes of an entry ([`Entry::signed_message`]):
//!
//! ```text
//! "mars metadata entry v1" 0x00
//! key_len: u32 LE, key
//! 0x00 (tombstone) | 0x01, value_len: u32 LE, value
//! stamp: u64 LE
//! origin_len: u32 LE, origin
//! ```
//!
//! The stamp is signed, so an old signed entry cannot be replayed as a new one: it loses
//! against what its owner wrote since.

use std::collections::BTreeSet;

use mars_config::HostName;

use crate::key::{cert_of_key, member_of_key, owner_of};
use crate::store::Entry;

const DOMAIN: &[u8] = b"mars metadata entry v1\0";

/// The cluster's PKI as the store needs it (the daemon implements it with the host's key and
/// the CA; stores without one trust the `origin` field, as in `--insecure` clusters).
pub trait Authority: Send + Sync {
    /// Signs `message` with this host's key.
    fn sign(&self, message: &[u8]) -> Vec<u8>;

    /// Checks that `signature` over `message` was made by `signer`, whose certificate is
    /// `cert` (the value of `certs/cert-SIGNER`).
    fn verify(
        &self,
        signer: &HostName,
        cert: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), String>;

    /// Checks that `cert` is a certificate of this cluster naming `host`.
    fn check_certificate(&self, host: &HostName, cert: &str) -> Result<(), String>;

    /// Sees every remote entry the store applied, in order, before it checks the next one of
    /// the batch (the PKI may learn from the metadata, e.g. a CA endorsed for a rotation, and
    /// certificates of that CA may follow in the same batch).
    fn learn(&self, _entry: &Entry) {}
}

/// The host that alone may write this entry (and sign it), `None` if any member may: see the
/// table in the module documentation.
pub fn writer_of(key: &str, tombstone: bool, members: &BTreeSet<HostName>) -> Option<HostName> {
    match member_of_key(key).or_else(|| cert_of_key(key)) {
        Some(host) if !tombstone => Some(host),
        Some(_) => None,
        None => owner_of(key, members),
    }
}

/// The key of the certificate that signs `host`'s entries.
pub fn cert_key(host: &HostName) -> String {
    format!("certs/cert-{host}")
}

impl Entry {
    /// The bytes its writer signs (layout in the module documentation).
    pub fn signed_message(&self) -> Vec<u8> {
        let value_len = self.value.as_ref().map_or(0, |v| v.len() + 4);
        let mut m =
            Vec::with_capacity(DOMAIN.len() + 4 + self.key.len() + 1 + value_len + 8 + 4 + 64);
        let put = |m: &mut Vec<u8>, s: &str| {
            m.extend_from_slice(&(s.len() as u32).to_le_bytes());
            m.extend_from_slice(s.as_bytes());
        };
        m.extend_from_slice(DOMAIN);
        put(&mut m, &self.key);
        match &self.value {
            None => m.push(0),
            Some(v) => {
                m.push(1);
                put(&mut m, v);
            }
        }
        m.extend_from_slice(&self.stamp.to_le_bytes());
        put(&mut m, self.origin.as_str());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> BTreeSet<HostName> {
        names.iter().map(|n| HostName::new(n).unwrap()).collect()
    }

    #[test]
    fn writers() {
        let m = members(&["a", "b"]);
        let w = |k, t| writer_of(k, t, &m).map(|h| h.to_string());
        assert_eq!(w("ips/ip-a", false).as_deref(), Some("a"));
        assert_eq!(w("ips/ip-a", true), None, "any member removes a dead one");
        assert_eq!(w("certs/cert-b", false).as_deref(), Some("b"));
        assert_eq!(w("certs/cert-b", true), None, "revocation");
        assert_eq!(
            w("ips/ip-c", false).as_deref(),
            Some("c"),
            "a joiner announces itself"
        );
        assert_eq!(w("resource-r/replay-b", true).as_deref(), Some("b"));
        assert_eq!(w("alive-a", false).as_deref(), Some("a"));
        assert_eq!(w("resource-r/primary", false), None);
    }

    #[test]
    fn the_signed_message_covers_every_field() {
        let e = Entry {
            key: "alive-a".into(),
            value: Some("1".into()),
            stamp: 7,
            origin: HostName::new("a").unwrap(),
            sig: None,
        };
        let base = e.signed_message();
        let mut other = e.clone();
        other.value = None;
        assert_ne!(other.signed_message(), base);
        other = e.clone();
        other.value = Some("".into());
        assert_ne!(other.signed_message(), base);
        other = e.clone();
        other.stamp = 8;
        assert_ne!(other.signed_message(), base);
        other = e.clone();
        other.origin = HostName::new("b").unwrap();
        assert_ne!(other.signed_message(), base);
        // Moving bytes between fields changes the message (lengths are part of it).
        other = e.clone();
        other.key = "alive-a1".into();
        other.value = Some("".into());
        assert_ne!(other.signed_message(), base);
        // The signature itself is not signed.
        other = e.clone();
        other.sig = Some(vec![1, 2]);
        assert_eq!(other.signed_message(), base);
    }
}
