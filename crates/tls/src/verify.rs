//! The rustls configurations of the peer port.
//!
//! TLS 1.3 only. Both sides verify the other's chain against the cluster's CA alone (no
//! system roots, no names from DNS: a peer is who its certificate's common name says, and the
//! peer layer compares that with the hello and with whom it meant to reach). The server asks
//! every client for a certificate but lets one without connect: such a client may only send a
//! join request (`peer.rs` enforces that). A joiner has no CA yet: it trusts the server's chain
//! if the CA in it hashes to the token's pin.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};

use crate::pki::{certified_host, fingerprint, spki_pin, Credentials, Pin};
use crate::TlsError;

/// The name a client asks for (rustls needs one; our verifier checks the chain and the peer
/// layer the certified host).
const SERVER_NAME: &str = "peer.mars.invalid";

pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// ring, not aws-lc-rs: aws-lc builds C with a toolchain a fresh machine may lack. rustls
/// deprecated ring's provider for lacking post-quantum key exchange; for peers that hold the
/// cluster's own CA that is the trade we take until the aws-lc build is part of CI.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whom a verifier trusts.
#[derive(Debug, Clone)]
enum Trust {
    /// The cluster's CAs: its CA, and during a rotation the next one too.
    Cas(Vec<CertificateDer<'static>>),
    /// A CA (sent in the server's chain) whose public key hashes to this.
    Pin(Pin),
}

#[derive(Debug)]
struct ClusterVerifier {
    trust: Trust,
    algs: WebPkiSupportedAlgorithms,
    /// A client must present a certificate (NBD); peers let a joiner connect without one.
    mandatory: bool,
    /// The certificate's common name must be a host name (peers; not NBD clients of a CA of
    /// the operator's).
    names_host: bool,
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    rustls::Error::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

impl ClusterVerifier {
    fn new(trust: Trust) -> Self {
        ClusterVerifier {
            trust,
            algs: provider().signature_verification_algorithms,
            mandatory: false,
            names_host: true,
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let cas = match &self.trust {
            Trust::Cas(cas) => cas.clone(),
            Trust::Pin(pin) => vec![intermediates
                .iter()
                .find(|c| spki_pin(c).is_ok_and(|p| p == *pin))
                .map(|c| c.clone().into_owned())
                .ok_or(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer,
                ))?],
        };
        let anchors = cas
            .iter()
            .map(|ca| webpki::anchor_from_trusted_cert(ca).map_err(webpki_error))
            .collect::<Result<Vec<_>, _>>()?;
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        ee.verify_for_usage(self.algs.all, &anchors, &[], now, usage, None, None)
            .map_err(webpki_error)?;
        if self.names_host {
            certified_host(end_entity).map_err(invalid)?;
        }
        Ok(())
    }
}

impl ServerCertVerifier for ClusterVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for ClusterVerifier {
    fn client_auth_mandatory(&self) -> bool {
        // A joiner has no certificate yet; peer.rs lets it do nothing but join.
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A member's TLS: what it presents and whom it trusts, as client and as server.
pub struct PeerTls {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    /// The SHA-256 fingerprint of our own certificate.
    pub fingerprint: String,
}

impl PeerTls {
    /// Presents `creds` and trusts its CA.
    pub fn new(creds: &Credentials) -> Result<PeerTls, TlsError> {
        Self::trusting(creds, &[])
    }

    /// Presents `creds` and trusts its CA and `also` (during a CA rotation: the other CA).
    pub fn trusting(
        creds: &Credentials,
        also: &[CertificateDer<'static>],
    ) -> Result<PeerTls, TlsError> {
        // The chain we send carries the CA too, so that a joiner can check it against its pin.
        let chain = vec![creds.cert.clone(), creds.ca.clone()];
        let verifier = Arc::new(ClusterVerifier::new(Trust::Cas(creds.trusted(also))));
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_auth_cert(chain.clone(), creds.key.clone_key())?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, creds.key.clone_key())?;
        Ok(PeerTls {
            client: Arc::new(client),
            server: Arc::new(server),
            fingerprint: fingerprint(&creds.cert),
        })
    }
}

/// The NBD server's TLS (`NBD_OPT_STARTTLS`): this host's certificate, and every client must
/// present one of the cluster's CAs (a member's, or one issued for a client). TLS 1.2 and 1.3:
/// NBD clients (qemu, libnbd with GnuTLS) speak both.
pub fn nbd_server(
    creds: &Credentials,
    also: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut v = ClusterVerifier::new(Trust::Cas(creds.trusted(also)));
    v.mandatory = true;
    let chain = vec![creds.cert.clone(), creds.ca.clone()];
    Ok(Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(v))
            .with_single_cert(chain, creds.key.clone_key())?,
    ))
}

/// The NBD server's TLS from files of the operator's (the layout of qemu's `tls-creds-x509`
/// with `endpoint=server`): `server-cert.pem` (the chain), `server-key.pem` (PKCS#8, PKCS#1 or
/// SEC1) and `ca-cert.pem`, the CA(s) whose certificates clients must present.
pub fn nbd_server_from_pem(
    chain_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let pem_err = |what| {
        move |e: rustls::pki_types::pem::Error| TlsError::Parse {
            what,
            why: e.to_string(),
        }
    };
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("server-cert.pem"))?;
    let cas = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("ca-cert.pem"))?;
    if chain.is_empty() || cas.is_empty() {
        return Err(TlsError::Parse {
            what: "server-cert.pem and ca-cert.pem",
            why: "no certificate in them".into(),
        });
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("server-key.pem"))?;
    let mut v = ClusterVerifier::new(Trust::Cas(cas));
    v.mandatory = true;
    v.names_host = false;
    Ok(Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(v))
            .with_single_cert(chain, key)?,
    ))
}

/// The configuration of a joiner: no certificate of its own, trusting the CA the pin names.
pub fn join_client(pin: Pin) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(ClusterVerifier::new(Trust::Pin(pin)));
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, HostKey};
    use mars_config::HostName;
    use rustls::{ClientConnection, ServerConnection};

    fn member(ca: &Ca, name: &str) -> PeerTls {
        let key = HostKey::generate().unwrap();
        let cert = ca
            .issue(&HostName::new(name).unwrap(), &key.public_der())
            .unwrap();
        PeerTls::new(&Credentials::new(ca.cert().clone(), cert, &key)).unwrap()
    }

    /// Runs a handshake in memory; returns the host the server saw (None: no client
    /// certificate) or the first error.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<Option<HostName>, rustls::Error> {
        let mut c = ClientConnection::new(client, server_name())?;
        let mut s = ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(s
                    .peer_certificates()
                    .map(|certs| certified_host(&certs[0]).unwrap()));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn members_of_one_cluster_authenticate_each_other() {
        let ca = Ca::create().unwrap();
        let (a, b) = (member(&ca, "a"), member(&ca, "b"));
        let seen = handshake(a.client.clone(), b.server.clone()).unwrap();
        assert_eq!(seen, Some(HostName::new("a").unwrap()));
    }

    #[test]
    fn a_member_of_another_cluster_is_refused_both_ways() {
        let (ca, other) = (Ca::create().unwrap(), Ca::create().unwrap());
        let (a, x) = (member(&ca, "a"), member(&other, "x"));
        assert!(handshake(x.client.clone(), a.server.clone()).is_err());
        assert!(handshake(a.client.clone(), x.server.clone()).is_err());
    }

    #[test]
    fn a_joiner_trusts_only_the_pinned_ca_and_presents_nothing() {
        let (ca, other) = (Ca::create().unwrap(), Ca::create().unwrap());
        let a = member(&ca, "a");
        let seen = handshake(join_client(ca.pin()).unwrap(), a.server.clone()).unwrap();
        assert_eq!(seen, None);
        assert!(handshake(join_client(other.pin()).unwrap(), a.server.clone()).is_err());
    }
}
