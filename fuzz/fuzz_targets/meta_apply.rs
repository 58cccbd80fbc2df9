//! A batch of metadata entries as a peer may send it, applied to a store that checks
//! signatures: entries made from the input (signed by their owner, unsigned, signed by a
//! certificate of another cluster, or altered after signing) and, if the input is a `Changes`
//! frame, its entries too. Nothing may panic, and afterwards every entry the store holds that
//! only member b may write is b's, with b's valid signature (while b's certificate is there:
//! the batch may revoke it).
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use mars_config::HostName;
use mars_meta::{Authority, Entry, Store};
use mars_tls::{cert_text, Ca, CertChecker, Credentials, EntrySigner, HostKey, MemberKey};
use rustls::pki_types::UnixTime;

/// As the daemon's: chain checks are remembered per certificate (they cost milliseconds).
struct Pki {
    signer: EntrySigner,
    checker: CertChecker,
    checked: Mutex<HashMap<(HostName, String), Result<MemberKey, String>>>,
}

impl Pki {
    fn key(&self, who: &HostName, cert: &str) -> Result<MemberKey, String> {
        let mut checked = self.checked.lock().expect("not poisoned");
        if checked.len() > 1000 {
            checked.clear();
        }
        checked
            .entry((who.clone(), cert.to_owned()))
            .or_insert_with(|| {
                self.checker
                    .member_key(who, cert, UnixTime::now())
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
}

impl Authority for Pki {
    fn sign(&self, m: &[u8]) -> Vec<u8> {
        self.signer.sign(m)
    }
    fn verify(&self, who: &HostName, cert: &str, m: &[u8], sig: &[u8]) -> Result<(), String> {
        self.key(who, cert)?
            .verify(m, sig)
            .map_err(|e| e.to_string())
    }
    fn check_certificate(&self, who: &HostName, cert: &str) -> Result<(), String> {
        self.key(who, cert).map(|_| ())
    }
}

struct World {
    ca: Ca,
    a: Credentials,
    b: Credentials,
    /// A certificate named b, from another cluster's CA.
    foreign_b: Credentials,
}

fn host(n: &str) -> HostName {
    HostName::new(n).expect("a host name")
}

fn creds(ca: &Ca, name: &str) -> Credentials {
    let key = HostKey::generate().expect("a key");
    let cert = ca
        .issue(&host(name), &key.public_der())
        .expect("a certificate");
    Credentials::new(ca.cert().clone(), cert, &key)
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let ca = Ca::create().expect("a CA");
        let other = Ca::create().expect("another CA");
        World {
            a: creds(&ca, "a"),
            b: creds(&ca, "b"),
            foreign_b: creds(&other, "b"),
            ca,
        }
    })
}

fn entry(key: &str, value: Option<&str>, stamp: u64, origin: &str) -> Entry {
    Entry {
        key: key.into(),
        value: value.map(Into::into),
        stamp,
        origin: host(origin),
        sig: None,
    }
}

fn pki() -> Arc<Pki> {
    static P: OnceLock<Arc<Pki>> = OnceLock::new();
    P.get_or_init(|| {
        let w = world();
        Arc::new(Pki {
            signer: EntrySigner::new(&w.a).expect("a's key"),
            checker: CertChecker::new(vec![w.ca.cert().clone()]),
            checked: Mutex::default(),
        })
    })
    .clone()
}

/// Signatures made once per (signer, message): ECDSA signing is slow under the sanitizer, and
/// a signature is as good the second time.
fn signed(by: &Credentials, mut e: Entry) -> Entry {
    static SIGS: OnceLock<Mutex<HashMap<(String, Vec<u8>), Vec<u8>>>> = OnceLock::new();
    let mut sigs = SIGS
        .get_or_init(Mutex::default)
        .lock()
        .expect("not poisoned");
    if sigs.len() > 10_000 {
        sigs.clear();
    }
    let m = e.signed_message();
    let sig = sigs
        .entry((by.fingerprint(), m.clone()))
        .or_insert_with(|| EntrySigner::new(by).expect("a key").sign(&m))
        .clone();
    e.sig = Some(sig);
    e
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let pki = pki();
    let mut store = Store::in_memory(host("a"), || 1_000_000_000).expect("a store");
    store.set_authority(Some(pki.clone()));
    // b is a member, with its certificate.
    let base = [
        signed(
            &w.b,
            entry("certs/cert-b", Some(&cert_text(&w.b.cert)), 10, "b"),
        ),
        signed(&w.b, entry("ips/ip-b", Some("10.0.0.2"), 11, "b")),
    ];
    let r = store.apply_remote(&base).expect("in memory");
    assert!(r.refused.is_empty(), "{:?}", r.refused);

    let mut batch = Vec::new();
    for chunk in data.split(|&x| x == 0xff).take(32) {
        let Some((&op, rest)) = chunk.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(rest);
        let (key, value) = match text.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (&*text, None),
        };
        let origin = ["b", "a", "c", "x"][(op & 3) as usize];
        let mut e = entry(key, value, 100 + u64::from(op >> 4), origin);
        e = match (op >> 2) & 3 {
            0 => signed(&w.b, e),
            1 => e,
            2 => signed(&w.foreign_b, e),
            _ => {
                let mut e = signed(&w.b, e);
                e.stamp += 1;
                e
            }
        };
        batch.push(e);
    }
    if let Ok(Some((mars_wire::Message::Changes { entries, .. }, _))) =
        mars_wire::decode_frame(data)
    {
        batch.extend(entries.into_iter().filter_map(|e| {
            Some(Entry {
                key: e.key,
                value: e.value,
                stamp: e.stamp,
                origin: HostName::new(&e.origin).ok()?,
                sig: (!e.sig.is_empty()).then_some(e.sig),
            })
        }));
    }
    let r = store.apply_remote(&batch).expect("in memory");
    assert!(r.applied + r.ignored_older + r.duplicates <= batch.len());

    let cert_b = store.value("certs/cert-b").expect("in memory");
    for e in store.list_prefix_with_tombstones("").expect("in memory") {
        if mars_meta::cert_of_key(&e.key).is_some() {
            continue;
        }
        if mars_meta::writer_of(&e.key, e.is_tombstone(), store.members()) == Some(host("b")) {
            assert_eq!(e.origin, host("b"), "{e:?}");
            // A batch may revoke b's certificate (any member may): what was taken before was
            // checked then, and nothing of b's is taken after.
            let Some(cert) = cert_b.as_deref() else {
                continue;
            };
            let sig = e.sig.as_deref().expect("b's entries are signed");
            pki.verify(&host("b"), cert, &e.signed_message(), sig)
                .unwrap_or_else(|why| panic!("{e:?}: {why}"));
        }
    }
});
