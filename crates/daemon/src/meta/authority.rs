//! The store's [`Authority`](mars_meta::Authority) from this host's credentials: it signs the
//! entries this host owns with its host key and checks other members' signatures against the
//! certificates `certs/cert-HOST` records (see `mars_meta::auth` and `mars_tls::sign`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mars_config::HostName;
use mars_tls::{CertChecker, Credentials, EntrySigner, MemberKey};
use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime};

/// Certificates checked (chain, dates, name) are remembered this long, so that a batch of
/// entries costs one signature check each, not one chain check each.
const CHECKED_FOR: Duration = Duration::from_secs(600);
/// At most this many remembered certificates (one per member and renewal; a flood of
/// distinct garbage only empties the memory).
const MAX_REMEMBERED: usize = 4096;

/// What checking a certificate found, and when.
type Checked = (Instant, Result<MemberKey, String>);

pub struct PkiAuthority {
    signer: EntrySigner,
    /// Grows when the metadata brings a CA endorsed by a trusted one (a rotation began), so
    /// that certificates of the next CA later in the same batch check out.
    checker: std::sync::RwLock<CertChecker>,
    /// Certificate text → its key, or why it is none, and when that was found.
    checked: Mutex<HashMap<String, Checked>>,
}

impl PkiAuthority {
    /// Signs with `creds`' key; trusts its CA and `also` (the CAs in `tls/`: during a
    /// rotation, both).
    pub fn new(
        creds: &Credentials,
        also: &[CertificateDer<'static>],
    ) -> anyhow::Result<Arc<PkiAuthority>> {
        Ok(Arc::new(PkiAuthority {
            signer: EntrySigner::new(creds)?,
            checker: std::sync::RwLock::new(CertChecker::new(creds.trusted(also))),
            checked: Mutex::default(),
        }))
    }

    fn member_key(&self, host: &HostName, cert: &str) -> Result<MemberKey, String> {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, found)) = checked.get(cert) {
            if at.elapsed() < CHECKED_FOR {
                return match found {
                    Ok(k) if k.host == *host => Ok(k.clone()),
                    Ok(k) => Err(format!(
                        "the certificate recorded for {host} names {}",
                        k.host
                    )),
                    Err(e) => Err(e.clone()),
                };
            }
        }
        if checked.len() >= MAX_REMEMBERED {
            checked.clear();
        }
        let found = self
            .checker
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .member_key(host, cert, UnixTime::now())
            .map_err(|e| e.to_string());
        checked.insert(cert.to_owned(), (Instant::now(), found.clone()));
        found
    }
}

impl mars_meta::Authority for PkiAuthority {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.signer.sign(message)
    }

    fn verify(
        &self,
        signer: &HostName,
        cert: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), String> {
        self.member_key(signer, cert)?
            .verify(message, signature)
            .map_err(|e| e.to_string())
    }

    fn check_certificate(&self, host: &HostName, cert: &str) -> Result<(), String> {
        self.member_key(host, cert).map(|_| ())
    }

    fn learn(&self, e: &mars_meta::Entry) {
        use super::cluster::{TRUST_MERGE_ADMIT, TRUST_MERGE_INTO, TRUST_NEXT};
        let Some(value) = e.value.as_deref() else {
            return;
        };
        // A CA endorsed for a rotation, or by either side of a merge (the other side's
        // members' certificates follow in the same batch).
        let (text, what) = match e.key.as_str() {
            TRUST_NEXT => (value, mars_tls::Endorse::Next),
            TRUST_MERGE_INTO | TRUST_MERGE_ADMIT => {
                match super::cluster::parse_merge_value(value) {
                    Some(v) => (
                        v.endorsement,
                        mars_tls::Endorse::Merge {
                            cluster: v.cluster.0,
                        },
                    ),
                    None => return,
                }
            }
            _ => return,
        };
        let mut checker = self.checker.write().unwrap_or_else(|e| e.into_inner());
        if let Ok(next) = mars_tls::endorsed(text, what, checker.cas()) {
            if !checker.cas().contains(&next) {
                checker.trust(next);
                // Certificates of it found untrusted before count now.
                self.checked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
            }
        }
    }
}
