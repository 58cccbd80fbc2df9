//! The cluster CA, host keys and certificates.
//!
//! ```text
//! CA certificate     CN "mars cluster CA", CA:true pathlen 0, keyCertSign, 20 years;
//!                    nothing about the cluster in it (a server's chain is shown to any client
//!                    before the client authenticates)
//! host certificate   CN = host name, SAN dNSName = host name where it is a valid DNS name,
//!                    digitalSignature + keyEncipherment (qemu's NBD client wants both),
//!                    serverAuth + clientAuth, 5 years, random serial
//! keys               ECDSA P-256 (rcgen's default), PKCS#8
//! pin                SHA-256 of the CA's SubjectPublicKeyInfo (DER)
//! fingerprint        SHA-256 of a certificate's DER, lowercase hex
//! ```

use mars_config::HostName;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::TlsError;

/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(20 * 365);
/// How long a host certificate is valid (renewal: docs/security.md).
pub const HOST_VALIDITY: Duration = Duration::days(5 * 365);
/// Clocks of hosts differ a little: certificates are valid from an hour before they were made.
const BACKDATE: Duration = Duration::hours(1);
const CA_NAME: &str = "mars cluster CA";

/// SHA-256 of a CA's public key: what a join token pins.
pub type Pin = [u8; 32];

fn parse_err(what: &'static str) -> impl Fn(String) -> TlsError {
    move |why| TlsError::Parse { what, why }
}

fn serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&b)
}

/// The cluster's certificate authority (only hosts that issue join tokens hold its key).
pub struct Ca {
    cert: CertificateDer<'static>,
    key: KeyPair,
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn create() -> Result<Ca, TlsError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, CA_NAME);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - BACKDATE;
        p.not_after = now + CA_VALIDITY;
        p.serial_number = Some(serial());
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert: cert.der().clone(),
            key,
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| parse_err("the CA certificate")(e.to_string()))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| parse_err("the CA key")(e.to_string()))?;
        Ok(Ca { cert, key })
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn cert_pem(&self) -> String {
        cert_pem(&self.cert)
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub(crate) fn key(&self) -> &KeyPair {
        &self.key
    }

    pub fn pin(&self) -> Pin {
        spki_pin(&self.cert).expect("our own CA certificate parses")
    }

    /// A certificate for `host` and the public key `spki` (DER SubjectPublicKeyInfo, as the
    /// joiner sent it).
    pub fn issue(&self, host: &HostName, spki: &[u8]) -> Result<CertificateDer<'static>, TlsError> {
        let public = SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| parse_err("the host's public key")(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        let sans: Vec<String> = if rustls::pki_types::DnsName::try_from(host.as_str()).is_ok()
            && host.as_str().len() <= 63
            && !host.as_str().bytes().all(|b| b.is_ascii_digit())
        {
            vec![host.to_string()]
        } else {
            Vec::new()
        };
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, host.as_str());
        p.is_ca = IsCa::ExplicitNoCa;
        // keyEncipherment too: qemu's TLS refuses a certificate whose (critical) key usage
        // lacks it, for NBD over TLS, even with an ECDSA key.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - BACKDATE;
        p.not_after = now + HOST_VALIDITY;
        p.serial_number = Some(serial());
        p.use_authority_key_identifier_extension = true;
        Ok(p.signed_by(&public, &issuer)?.der().clone())
    }
}

/// A host's own key pair (made on the host; only its public half travels).
pub struct HostKey(KeyPair);

impl HostKey {
    pub fn generate() -> Result<HostKey, TlsError> {
        Ok(HostKey(KeyPair::generate()?))
    }

    pub fn from_pem(pem: &str) -> Result<HostKey, TlsError> {
        KeyPair::from_pem(pem)
            .map(HostKey)
            .map_err(|e| parse_err("the host key")(e.to_string()))
    }

    pub fn pem(&self) -> String {
        self.0.serialize_pem()
    }

    /// The public key as DER SubjectPublicKeyInfo (what a join request carries).
    pub fn public_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.0)
    }

    fn private_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.serialize_der()))
    }
}

/// What a host presents on the peer port: the CA it trusts, its certificate and its key.
pub struct Credentials {
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Credentials {
    pub fn new(ca: CertificateDer<'static>, cert: CertificateDer<'static>, key: &HostKey) -> Self {
        Credentials {
            ca,
            cert,
            key: key.private_der(),
        }
    }

    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Credentials, TlsError> {
        let ca = CertificateDer::from_pem_slice(ca.as_bytes())
            .map_err(|e| parse_err("the CA certificate")(e.to_string()))?;
        let cert = CertificateDer::from_pem_slice(cert.as_bytes())
            .map_err(|e| parse_err("the host certificate")(e.to_string()))?;
        Ok(Credentials::new(ca, cert, &HostKey::from_pem(key)?))
    }

    /// The host this certificate names.
    pub fn host(&self) -> Result<HostName, TlsError> {
        certified_host(&self.cert)
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// The CAs a host with these credentials trusts: the one that issued its certificate and
    /// `also` (during a CA rotation, the other one), each once.
    pub fn trusted(&self, also: &[CertificateDer<'static>]) -> Vec<CertificateDer<'static>> {
        let mut cas = vec![self.ca.clone()];
        cas.extend(also.iter().filter(|c| **c != self.ca).cloned());
        cas
    }
}

/// PEM text of a certificate.
pub fn cert_pem(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

/// The host a certificate names (its common name), if it is a valid host name.
pub fn certified_host(cert: &CertificateDer<'_>) -> Result<HostName, TlsError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| parse_err("a certificate")(e.to_string()))?;
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| TlsError::Name("no common name".into()))?;
    HostName::new(cn).map_err(|e| TlsError::Name(e.to_string()))
}

/// SHA-256 of a certificate, lowercase hex: what `certs/cert-HOST` records.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex(&Sha256::digest(cert.as_ref()))
}

/// SHA-256 of a certificate's public key (DER SubjectPublicKeyInfo).
pub fn spki_pin(cert: &CertificateDer<'_>) -> Result<Pin, TlsError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| parse_err("a certificate")(e.to_string()))?;
    Ok(Sha256::digest(x.public_key().raw).into())
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_certificate_names_its_host_and_chains_to_the_ca() {
        let ca = Ca::create().unwrap();
        let key = HostKey::generate().unwrap();
        let host = HostName::new("site-a_1").unwrap();
        let cert = ca.issue(&host, &key.public_der()).unwrap();
        assert_eq!(certified_host(&cert).unwrap(), host);
        let creds = Credentials::new(ca.cert().clone(), cert, &key);
        assert_eq!(creds.host().unwrap(), host);
        assert_eq!(creds.fingerprint().len(), 64);
        // The PEM forms read back to the same things.
        let again = Ca::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.pin(), ca.pin());
        let c2 = Credentials::from_pem(&ca.cert_pem(), &cert_pem(&creds.cert), &key.pem()).unwrap();
        assert_eq!(c2.fingerprint(), creds.fingerprint());
    }

    #[test]
    fn a_64_character_or_numeric_host_name_still_gets_a_certificate() {
        let ca = Ca::create().unwrap();
        let key = HostKey::generate().unwrap();
        for name in ["a".repeat(64), "1234".to_string()] {
            let host = HostName::new(&name).unwrap();
            let cert = ca.issue(&host, &key.public_der()).unwrap();
            assert_eq!(certified_host(&cert).unwrap(), host);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Ca::from_pem("junk", "junk").is_err());
        assert!(Credentials::from_pem("", "", "").is_err());
        let ca = Ca::create().unwrap();
        assert!(ca
            .issue(&HostName::new("a").unwrap(), b"\x30\x03junk")
            .is_err());
        assert!(certified_host(&CertificateDer::from(vec![0x30, 0x00])).is_err());
        assert!(spki_pin(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
