//! Signatures over the metadata a member owns.
//!
//! A member signs every metadata entry it owns (`…-HOST` keys, its `ips/ip-HOST`) with its host
//! key; every other host checks the signature against the certificate `certs/cert-HOST`
//! records, and that certificate against the cluster's CA. So an entry means the same thing
//! whoever relays it: a member can forward another's keys but not forge or alter them
//! (`mars_meta`'s `Authority` is the store's side of this).
//!
//! ```text
//! certs/cert-HOST value   "x509:" + base64 (standard alphabet, padded) of the certificate's DER
//!                         (a P-256 certificate is about 500 bytes: 700 characters)
//! signature               ECDSA P-256 with SHA-256, ASN.1 DER: at most 72 bytes
//! ```
//!
//! A certificate is only valid for signatures while it chains to a trusted CA, is within its
//! validity dates and names the host (its common name).

use base64::Engine as _;
use mars_config::HostName;
use rcgen::{KeyPair, SigningKey};
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::pki::{certified_host, fingerprint, Credentials};
use crate::TlsError;

/// What a `certs/cert-HOST` value starts with.
pub const CERT_TEXT_PREFIX: &str = "x509:";

/// Longest signature a decoder takes (ECDSA P-256 DER is at most 72 bytes).
pub const MAX_SIGNATURE: usize = 128;

fn bad(what: &'static str) -> impl Fn(String) -> TlsError {
    move |why| TlsError::Parse { what, why }
}

/// The metadata text of a certificate (`certs/cert-HOST`).
pub fn cert_text(cert: &CertificateDer<'_>) -> String {
    format!(
        "{CERT_TEXT_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(cert.as_ref())
    )
}

/// The certificate in a `certs/cert-HOST` value.
pub fn cert_from_text(text: &str) -> Result<CertificateDer<'static>, TlsError> {
    let b64 = text.strip_prefix(CERT_TEXT_PREFIX).ok_or_else(|| {
        bad("a member's certificate")(format!("does not start with {CERT_TEXT_PREFIX:?}"))
    })?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map(CertificateDer::from)
        .map_err(|e| bad("a member's certificate")(e.to_string()))
}

/// The SHA-256 fingerprint of the certificate in a `certs/cert-HOST` value.
pub fn text_fingerprint(text: &str) -> Result<String, TlsError> {
    cert_from_text(text).map(|c| fingerprint(&c))
}

/// This host's signing side: its host key.
pub struct EntrySigner(KeyPair);

impl EntrySigner {
    pub fn new(creds: &Credentials) -> Result<EntrySigner, TlsError> {
        KeyPair::try_from(&creds.key)
            .map(EntrySigner)
            .map_err(|e| bad("the host key")(e.to_string()))
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        // Signing with a key that parsed fails only if the system's random source does.
        self.0
            .sign(message)
            .expect("ECDSA signing with a valid key and a working random source")
    }
}

/// A member's public key, taken from a certificate that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberKey {
    pub host: HostName,
    /// The subjectPublicKey bits (an uncompressed P-256 point).
    point: Vec<u8>,
}

impl MemberKey {
    /// Checks `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), TlsError> {
        webpki::ring::ECDSA_P256_SHA256
            .verify_signature(&self.point, message, signature)
            .map_err(|_| TlsError::Signature(format!("not a signature of {}", self.host)))
    }
}

/// Checks members' certificates against the trusted CAs (the cluster's, and during a CA
/// rotation the next one too).
#[derive(Debug, Clone)]
pub struct CertChecker {
    cas: Vec<CertificateDer<'static>>,
}

impl CertChecker {
    pub fn new(cas: Vec<CertificateDer<'static>>) -> CertChecker {
        CertChecker { cas }
    }

    /// The CAs trusted.
    pub fn cas(&self) -> &[CertificateDer<'static>] {
        &self.cas
    }

    /// Trusts `ca` too.
    pub fn trust(&mut self, ca: CertificateDer<'static>) {
        if !self.cas.contains(&ca) {
            self.cas.push(ca);
        }
    }

    /// The key of `host` if `text` (a `certs/cert-HOST` value) is a certificate of a trusted
    /// CA that names `host` and is valid at `now`.
    pub fn member_key(
        &self,
        host: &HostName,
        text: &str,
        now: UnixTime,
    ) -> Result<MemberKey, TlsError> {
        let cert = cert_from_text(text)?;
        let anchors = self
            .cas
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("a trusted CA")(e.to_string()))?;
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| bad("a member's certificate")(e.to_string()))?;
        ee.verify_for_usage(
            // Our CA and host keys are P-256 (rcgen's default): nothing else is ours.
            &[webpki::ring::ECDSA_P256_SHA256],
            &anchors,
            &[],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| TlsError::Signature(format!("the certificate of {host}: {e}")))?;
        let named = certified_host(&cert)?;
        if named != *host {
            return Err(TlsError::Signature(format!(
                "the certificate recorded for {host} names {named}"
            )));
        }
        let (_, x) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| bad("a member's certificate")(e.to_string()))?;
        Ok(MemberKey {
            host: named,
            point: x.public_key().subject_public_key.data.to_vec(),
        })
    }
}

/// What a CA vouches for about another CA: in a rotation, that it is the next one, or that it
/// (the old one) is retired; in a merge of two clusters (`merge-cluster`), that it is a CA of
/// the cluster with this id (the two CAs endorse each other, each into its own side's
/// metadata); in a split (`split-cluster`), that it is the CA of the new cluster with this id
/// made of exactly this group of hosts and resources, and at the end of the split that the
/// group has left (signed off: each side forgets the other).
///
/// ```text
/// signed message  "mars CA endorsement v1\0next\0"    + subject CA's DER
///                 "mars CA endorsement v1\0retired\0" + subject CA's DER
///                 "mars CA endorsement v1\0merge\0" + cluster id (16 bytes) + subject CA's DER
///                 "mars CA endorsement v1\0split\0" + cluster id (16 bytes)
///                     + group digest (32 bytes) + subject CA's DER
///                 "mars CA endorsement v1\0split-done\0" + cluster id (16 bytes)
///                     + group digest (32 bytes) + subject CA's DER
/// ```
///
/// The group digest is SHA-256 over the group's sorted host and resource names (its layout
/// is the daemon's, `meta/split.rs`): an endorsement for one group cannot be replayed for
/// another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endorse {
    Next,
    Retired,
    /// The subject is a CA of cluster `cluster` (the cluster the merge ends in).
    Merge {
        cluster: [u8; 16],
    },
    /// The subject is the CA of the new cluster `cluster` that the group with digest `group`
    /// splits off into.
    Split {
        cluster: [u8; 16],
        group: [u8; 32],
    },
    /// The split of that group into cluster `cluster` with the subject as its CA is over.
    SplitDone {
        cluster: [u8; 16],
        group: [u8; 32],
    },
}

impl Endorse {
    fn message(self, subject: &CertificateDer<'_>) -> Vec<u8> {
        let (what, id, group): (&[u8], &[u8], &[u8]) = match &self {
            Endorse::Next => (b"mars CA endorsement v1\0next\0", &[], &[]),
            Endorse::Retired => (b"mars CA endorsement v1\0retired\0", &[], &[]),
            Endorse::Merge { cluster } => (b"mars CA endorsement v1\0merge\0", cluster, &[]),
            Endorse::Split { cluster, group } => {
                (b"mars CA endorsement v1\0split\0", cluster, group)
            }
            Endorse::SplitDone { cluster, group } => {
                (b"mars CA endorsement v1\0split-done\0", cluster, group)
            }
        };
        [what, id, group, subject.as_ref()].concat()
    }
}

impl crate::pki::Ca {
    /// The metadata text `x509:<subject> <signature>` by which this CA vouches for `subject`.
    pub fn endorse(&self, what: Endorse, subject: &CertificateDer<'_>) -> String {
        let sig = self
            .key()
            .sign(&what.message(subject))
            .expect("ECDSA signing with a valid key and a working random source");
        format!(
            "{} {}",
            cert_text(subject),
            base64::engine::general_purpose::STANDARD.encode(sig)
        )
    }
}

/// The CA an endorsement text names, if one of `by` signed it for `what`.
pub fn endorsed(
    text: &str,
    what: Endorse,
    by: &[CertificateDer<'static>],
) -> Result<CertificateDer<'static>, TlsError> {
    let (cert, sig) = text
        .split_once(' ')
        .ok_or_else(|| bad("a CA endorsement")("no signature".into()))?;
    let subject = cert_from_text(cert)?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .map_err(|e| bad("a CA endorsement")(e.to_string()))?;
    let message = what.message(&subject);
    for ca in by.iter().filter(|ca| **ca != subject) {
        let (_, x) = x509_parser::parse_x509_certificate(ca)
            .map_err(|e| bad("a trusted CA")(e.to_string()))?;
        let point = &x.public_key().subject_public_key.data;
        if webpki::ring::ECDSA_P256_SHA256
            .verify_signature(point, &message, &sig)
            .is_ok()
        {
            return Ok(subject);
        }
    }
    Err(TlsError::Signature(
        "no CA this host trusts signed this endorsement".into(),
    ))
}

/// Whether `cert` was issued by `ca` (and is valid now).
pub fn issued_by(cert: &CertificateDer<'_>, ca: &CertificateDer<'static>) -> bool {
    let Ok(anchor) = webpki::anchor_from_trusted_cert(ca) else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, HostKey};

    fn creds(ca: &Ca, name: &str) -> Credentials {
        let key = HostKey::generate().unwrap();
        let cert = ca
            .issue(&HostName::new(name).unwrap(), &key.public_der())
            .unwrap();
        Credentials::new(ca.cert().clone(), cert, &key)
    }

    #[test]
    fn a_signature_verifies_with_the_signers_certificate_only() {
        let (ca, other) = (Ca::create().unwrap(), Ca::create().unwrap());
        let (a, b) = (creds(&ca, "a"), creds(&ca, "b"));
        let checker = CertChecker::new(vec![ca.cert().clone()]);
        let now = UnixTime::now();
        let host = |n| HostName::new(n).unwrap();
        let text = cert_text(&a.cert);
        assert!(text.len() < 1000, "{} characters", text.len());
        assert_eq!(text_fingerprint(&text).unwrap(), a.fingerprint());
        let key_a = checker.member_key(&host("a"), &text, now).unwrap();
        let sig = EntrySigner::new(&a).unwrap().sign(b"entry");
        assert!(sig.len() <= MAX_SIGNATURE);
        key_a.verify(b"entry", &sig).unwrap();
        assert!(key_a.verify(b"entrY", &sig).is_err(), "another message");
        let by_b = EntrySigner::new(&b).unwrap().sign(b"entry");
        assert!(key_a.verify(b"entry", &by_b).is_err(), "another signer");
        assert!(key_a.verify(b"entry", &[]).is_err());
        // a's certificate is not b's; another cluster's certificate is nobody's here.
        assert!(checker.member_key(&host("b"), &text, now).is_err());
        let foreign = cert_text(&creds(&other, "a").cert);
        assert!(checker.member_key(&host("a"), &foreign, now).is_err());
        // Both CAs trusted (a rotation): both certificates check out.
        let both = CertChecker::new(vec![ca.cert().clone(), other.cert().clone()]);
        both.member_key(&host("a"), &foreign, now).unwrap();
        // Garbage is an error, not a panic.
        for junk in [
            "",
            "x509:",
            "x509:!!!",
            "x509:AAAA",
            "sha256:00",
            &text[..100],
        ] {
            assert!(
                checker.member_key(&host("a"), junk, now).is_err(),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn a_ca_endorses_its_successor_and_nobody_else_can() {
        let (old, new, rogue) = (
            Ca::create().unwrap(),
            Ca::create().unwrap(),
            Ca::create().unwrap(),
        );
        let text = old.endorse(Endorse::Next, new.cert());
        let trusted = vec![old.cert().clone()];
        assert_eq!(
            &endorsed(&text, Endorse::Next, &trusted).unwrap(),
            new.cert()
        );
        assert!(
            endorsed(&text, Endorse::Retired, &trusted).is_err(),
            "another statement"
        );
        assert!(endorsed(&text, Endorse::Next, &[rogue.cert().clone()]).is_err());
        let forged = rogue.endorse(Endorse::Next, rogue.cert());
        assert!(endorsed(&forged, Endorse::Next, &trusted).is_err());
        // A CA cannot endorse itself into trust.
        let own = new.endorse(Endorse::Next, new.cert());
        assert!(endorsed(&own, Endorse::Next, &[new.cert().clone()]).is_err());
        let retired = new.endorse(Endorse::Retired, old.cert());
        let both = vec![old.cert().clone(), new.cert().clone()];
        assert_eq!(
            &endorsed(&retired, Endorse::Retired, &both).unwrap(),
            old.cert()
        );
        for junk in ["", "x509:AAAA", "x509:AAAA AAAA", &text[..50]] {
            assert!(endorsed(junk, Endorse::Next, &trusted).is_err());
        }
        // A merge endorsement names the cluster: another id, or another statement, fails.
        let merge = Endorse::Merge { cluster: [7; 16] };
        let text = old.endorse(merge, new.cert());
        assert_eq!(&endorsed(&text, merge, &trusted).unwrap(), new.cert());
        assert!(endorsed(&text, Endorse::Merge { cluster: [8; 16] }, &trusted).is_err());
        assert!(endorsed(&text, Endorse::Next, &trusted).is_err());
        // A split endorsement names the new cluster and the group: another id, another group,
        // or the end of the split instead of its start, fails.
        let split = Endorse::Split {
            cluster: [7; 16],
            group: [1; 32],
        };
        let text = old.endorse(split, new.cert());
        assert_eq!(&endorsed(&text, split, &trusted).unwrap(), new.cert());
        for other in [
            Endorse::Split {
                cluster: [8; 16],
                group: [1; 32],
            },
            Endorse::Split {
                cluster: [7; 16],
                group: [2; 32],
            },
            Endorse::SplitDone {
                cluster: [7; 16],
                group: [1; 32],
            },
            Endorse::Merge { cluster: [7; 16] },
        ] {
            assert!(endorsed(&text, other, &trusted).is_err(), "{other:?}");
        }
        let done = Endorse::SplitDone {
            cluster: [7; 16],
            group: [1; 32],
        };
        let text = old.endorse(done, new.cert());
        assert_eq!(&endorsed(&text, done, &trusted).unwrap(), new.cert());
        assert!(endorsed(&text, split, &trusted).is_err());
        assert!(endorsed(&text, done, &[rogue.cert().clone()]).is_err());
        let a = creds(&new, "a");
        assert!(issued_by(&a.cert, new.cert()));
        assert!(!issued_by(&a.cert, old.cert()));
    }
}
