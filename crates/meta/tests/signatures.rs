//! Signed entries: what a host alone may write is applied only with its signature, checked
//! against the certificate the store holds for it, whoever relays it.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::*;
use mars_config::HostName;
use mars_meta::{Authority, Entry, MetaError, Store};

/// A stand-in for the PKI: host H's "certificate" is `cert:H:GEN`, and its signature over a
/// message is `H:GEN:` plus a hash of the message (forgeable by a test on purpose, not by the
/// store). Renewing moves GEN on.
struct FakePki {
    host: HostName,
    generation: AtomicU32,
    /// Certificates of a later generation are not trusted (a CA not known yet); the entry
    /// `trust/gen` raises it (`Authority::learn`).
    trusted_up_to: AtomicU32,
}

fn digest(m: &[u8]) -> u64 {
    m.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn fake_sig(host: &str, generation: u32, m: &[u8]) -> Vec<u8> {
    format!("{host}:{generation}:{:x}", digest(m)).into_bytes()
}

impl FakePki {
    fn new(host: &str) -> Arc<FakePki> {
        Arc::new(FakePki {
            host: common::host(host),
            generation: AtomicU32::new(1),
            trusted_up_to: AtomicU32::new(u32::MAX),
        })
    }
    fn cert(&self) -> String {
        format!(
            "cert:{}:{}",
            self.host,
            self.generation.load(Ordering::SeqCst)
        )
    }
    fn renew(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Authority for FakePki {
    fn sign(&self, m: &[u8]) -> Vec<u8> {
        fake_sig(
            self.host.as_str(),
            self.generation.load(Ordering::SeqCst),
            m,
        )
    }
    fn verify(&self, signer: &HostName, cert: &str, m: &[u8], sig: &[u8]) -> Result<(), String> {
        let generation: u32 = cert
            .strip_prefix(&format!("cert:{signer}:"))
            .and_then(|g| g.parse().ok())
            .ok_or("a bad certificate")?;
        if sig == fake_sig(signer.as_str(), generation, m) {
            Ok(())
        } else {
            Err("bad signature".into())
        }
    }
    fn check_certificate(&self, host: &HostName, cert: &str) -> Result<(), String> {
        let generation: Option<u32> = cert
            .strip_prefix(&format!("cert:{host}:"))
            .and_then(|g| g.parse().ok());
        match generation {
            Some(g) if g <= self.trusted_up_to.load(Ordering::SeqCst) => Ok(()),
            Some(_) => Err("a certificate of a CA not trusted (yet)".into()),
            None => Err(format!("{cert:?} is no certificate of {host}")),
        }
    }
    fn learn(&self, e: &Entry) {
        if let ("trust/gen", Some(v)) = (e.key.as_str(), e.value.as_deref()) {
            self.trusted_up_to
                .store(v.parse().unwrap_or(0), Ordering::SeqCst);
        }
    }
}

struct Member {
    store: Store,
    pki: Arc<FakePki>,
}

fn member(name: &str, t: &ManualTime) -> Member {
    let pki = FakePki::new(name);
    let mut store = mem_store(name, t);
    store.set_authority(Some(pki.clone()));
    store
        .set(&format!("certs/cert-{name}"), &pki.cert())
        .unwrap();
    store.set(&format!("ips/ip-{name}"), "10.0.0.1").unwrap();
    Member { store, pki }
}

/// Everything `from` holds, applied to `to`.
fn pull(from: &Store, to: &mut Store) -> mars_meta::ApplyReport {
    let c = from.changes_since(0, usize::MAX).unwrap();
    to.apply_remote(&c.entries).unwrap()
}

/// a, b and c, each knowing the others.
fn three() -> (ManualTime, Member, Member, Member) {
    let t = ManualTime::new(1_000);
    let (mut a, mut b, mut c) = (member("a", &t), member("b", &t), member("c", &t));
    for _ in 0..2 {
        assert!(pull(&b.store, &mut a.store).refused.is_empty());
        assert!(pull(&c.store, &mut a.store).refused.is_empty());
        assert!(pull(&a.store, &mut b.store).refused.is_empty());
        assert!(pull(&a.store, &mut c.store).refused.is_empty());
    }
    assert_eq!(c.store.members().len(), 3);
    (t, a, b, c)
}

fn refused_as_unauthenticated(r: &mars_meta::ApplyReport) -> bool {
    r.refused.len() == 1 && matches!(r.refused[0].1, MetaError::Unauthenticated { .. })
}

#[test]
fn owned_entries_travel_signed_and_are_applied_when_relayed() {
    let (_t, mut a, mut b, mut c) = three();
    let e = b.store.set("alive-b", "1").unwrap();
    assert!(e.sig.is_some(), "b signs what it owns");
    let shared = b.store.set("resource-r/primary", "b").unwrap();
    assert!(shared.sig.is_none(), "shared keys need no signature");
    // b → a → c: c takes b's entry from a.
    assert!(pull(&b.store, &mut a.store).refused.is_empty());
    let r = pull(&a.store, &mut c.store);
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(c.store.get("alive-b").unwrap().unwrap(), e);
}

#[test]
fn a_member_cannot_forge_or_alter_another_members_entries() {
    let (t, a, mut b, mut c) = three();
    t.set(5_000);
    let genuine = b.store.set("resource-r/replay-b", "log-1,100").unwrap();
    let forged = |value: &str, sig: Option<Vec<u8>>| Entry {
        key: "resource-r/replay-b".into(),
        value: Some(value.into()),
        stamp: genuine.stamp + 10,
        origin: host("b"),
        sig,
    };
    // Relayed by a: unsigned, signed by a, b's signature over another value.
    let unsigned = forged("log-9,0", None);
    let by_a = {
        let mut e = forged("log-9,0", None);
        e.sig = Some(a.pki.sign(&e.signed_message()));
        e
    };
    let altered = forged("log-9,0", genuine.sig.clone());
    for e in [unsigned, by_a, altered] {
        let r = c.store.apply_remote(std::slice::from_ref(&e)).unwrap();
        assert!(refused_as_unauthenticated(&r), "{:?}", r.refused);
    }
    // A genuine entry replayed with a new stamp: the stamp is signed.
    let mut replayed = genuine.clone();
    replayed.stamp += 100;
    assert!(refused_as_unauthenticated(
        &c.store.apply_remote(&[replayed]).unwrap()
    ));
    // Claiming a's name as origin does not help either: the key is b's.
    let mut as_a = forged("log-9,0", None);
    as_a.origin = host("a");
    let r = c.store.apply_remote(&[as_a]).unwrap();
    assert!(matches!(r.refused[0].1, MetaError::NotOwner { .. }));
    assert_eq!(c.store.value("resource-r/replay-b").unwrap(), None);
    // A tombstone of b's key is b's too.
    let mut deleted = forged("x", None);
    deleted.value = None;
    assert!(refused_as_unauthenticated(
        &c.store.apply_remote(&[deleted]).unwrap()
    ));
    // The genuine one is applied.
    assert!(pull(&b.store, &mut c.store).refused.is_empty());
    assert_eq!(
        c.store.value("resource-r/replay-b").unwrap().as_deref(),
        Some("log-1,100")
    );
}

#[test]
fn membership_and_certificates_are_set_by_their_host_and_removed_by_anyone() {
    let (t, mut a, b, mut c) = three();
    t.set(9_000);
    let entry = |key: &str, value: Option<&str>, origin: &str| Entry {
        key: key.into(),
        value: value.map(Into::into),
        stamp: 9_000,
        origin: host(origin),
        sig: None,
    };
    // a cannot move b's address to itself, nor put its own certificate in b's place.
    let r = c
        .store
        .apply_remote(&[entry("ips/ip-b", Some("10.6.6.6"), "a")])
        .unwrap();
    assert!(matches!(r.refused[0].1, MetaError::NotOwner { .. }));
    let mut moved = entry("ips/ip-b", Some("10.6.6.6"), "b");
    moved.sig = Some(a.pki.sign(&moved.signed_message()));
    assert!(refused_as_unauthenticated(
        &c.store.apply_remote(&[moved]).unwrap()
    ));
    assert!(refused_as_unauthenticated(
        &c.store
            .apply_remote(&[entry("certs/cert-b", Some(&a.pki.cert()), "b")])
            .unwrap()
    ));
    assert!(matches!(
        a.store.set("ips/ip-b", "10.6.6.6"),
        Err(MetaError::NotOwner { .. })
    ));
    assert_eq!(
        c.store.value("ips/ip-b").unwrap().as_deref(),
        Some("10.0.0.1")
    );
    // Any member removes a (dead) member and its certificate.
    a.store.delete("certs/cert-b").unwrap();
    a.store.delete("ips/ip-b").unwrap();
    let r = pull(&a.store, &mut c.store);
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert!(!c.store.members().contains(&host("b")));
    drop(b);
}

#[test]
fn a_renewed_key_signs_anew_and_old_signatures_stop_counting() {
    let (t, mut a, mut b, mut c) = three();
    t.set(20_000);
    let old = b.store.set("alive-b", "1").unwrap();
    // b renews: the new certificate, then everything it owns again.
    b.pki.renew();
    b.store.set("certs/cert-b", &b.pki.cert()).unwrap();
    let cert_b = b.store.list_prefix("certs/cert-b").unwrap();
    c.store.apply_remote(&cert_b).unwrap();
    // c knows only the new certificate now: what the old key signed is refused…
    assert!(refused_as_unauthenticated(
        &c.store.apply_remote(std::slice::from_ref(&old)).unwrap()
    ));
    // …and all of b's keys are taken once b signed them again.
    let n = b.store.resign_own().unwrap();
    assert!(n >= 2, "alive-b and ips/ip-b at least, got {n}");
    assert_eq!(
        b.store.resign_own().unwrap(),
        0,
        "all signed with the current key"
    );
    let r = pull(&b.store, &mut c.store);
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(c.store.value("alive-b").unwrap().as_deref(), Some("1"));
    // A store that gets an authority later signs what it wrote before with resign_own.
    let mut plain = mem_store("b", &t);
    plain.set("resource-r/replay-b", "x").unwrap();
    plain.set_authority(Some(b.pki.clone()));
    plain.set("certs/cert-b", &b.pki.cert()).unwrap();
    assert_eq!(plain.resign_own().unwrap(), 1);
    let entries = plain.changes_since(0, usize::MAX).unwrap().entries;
    let r = a.store.apply_remote(&entries).unwrap();
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(
        a.store.value("resource-r/replay-b").unwrap().as_deref(),
        Some("x")
    );
}

#[test]
fn entries_sent_before_their_owners_membership_are_checked_when_it_arrives() {
    let (t, _a, mut b, _c) = three();
    t.set(30_000);
    b.store.set("alive-b", "1").unwrap();
    // d does not know b yet. A relay sends a forgery of b's keys first (a shared key for d
    // then), with a stamp far ahead so that b's own would lose…
    let t2 = ManualTime::new(30_000);
    let mut d = member("d", &t2);
    let forged = Entry {
        key: "resource-r/replay-b".into(),
        value: Some("log-9,0".into()),
        stamp: 40_000,
        origin: host("b"),
        sig: None,
    };
    let r = d.store.apply_remote(std::slice::from_ref(&forged)).unwrap();
    assert_eq!(r.applied, 1, "b is no member of d's yet: a shared key");
    // …then b's membership (and b's genuine entries) arrive: the forgery goes.
    let r = pull(&b.store, &mut d.store);
    assert_eq!(r.refused.len(), 1, "{:?}", r.refused);
    assert_eq!(r.refused[0].0, "resource-r/replay-b");
    assert_eq!(d.store.value("resource-r/replay-b").unwrap(), None);
    assert_eq!(d.store.value("alive-b").unwrap().as_deref(), Some("1"));
    assert!(d.store.members().contains(&host("b")));
    // What d holds still pulls cleanly.
    let c = d.store.changes_since(0, usize::MAX).unwrap();
    assert!(c.entries.iter().all(|e| e.key != "resource-r/replay-b"));
}

#[test]
fn without_an_authority_the_origin_is_trusted_as_before() {
    let t = ManualTime::new(1_000);
    let mut s = mem_store("a", &t);
    s.set("ips/ip-a", "10.0.0.1").unwrap();
    let r = s
        .apply_remote(&[
            Entry {
                key: "ips/ip-b".into(),
                value: Some("10.0.0.2".into()),
                stamp: 1_100,
                origin: host("b"),
                sig: None,
            },
            Entry {
                key: "alive-b".into(),
                value: Some("1".into()),
                stamp: 1_200,
                origin: host("b"),
                sig: None,
            },
        ])
        .unwrap();
    assert_eq!((r.applied, r.refused.len()), (2, 0));
    assert!(!s.is_authenticated());
}

/// What the PKI learns from an entry (a CA endorsed for a rotation) counts for the entries
/// after it in the same batch: a certificate of the next CA that follows its endorsement is
/// taken, not refused and lost.
#[test]
fn the_authority_learns_from_entries_in_batch_order() {
    let (t, _a, mut b, mut c) = three();
    t.set(50_000);
    c.pki.trusted_up_to.store(1, Ordering::SeqCst);
    b.pki.renew();
    b.store.set("trust/gen", "2").unwrap();
    b.store.set("certs/cert-b", &b.pki.cert()).unwrap();
    b.store.resign_own().unwrap();
    let r = pull(&b.store, &mut c.store);
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(c.store.value("certs/cert-b").unwrap(), Some(b.pki.cert()));
    // Without the endorsement first, the same certificate is refused.
    let (t, _a, mut b, mut c) = three();
    t.set(50_000);
    c.pki.trusted_up_to.store(1, Ordering::SeqCst);
    b.pki.renew();
    b.store.set("certs/cert-b", &b.pki.cert()).unwrap();
    let r = pull(&b.store, &mut c.store);
    assert!(
        r.refused.iter().any(|(k, _)| k == "certs/cert-b"),
        "{:?}",
        r.refused
    );
}
