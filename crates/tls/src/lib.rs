//! The cluster's public-key infrastructure and the mutual-TLS configurations of the peer port.
//!
//! Every cluster has its own CA (`create-cluster` makes it). A host's certificate names the
//! host (its common name is the host name) and is signed by the CA; a peer is whoever its
//! certificate names, and the peer layer refuses a hello that claims anyone else. Joining
//! takes a one-time token that pins the CA (the SHA-256 of its public key, as kubeadm's and
//! k3s's tokens do) and carries a secret: the joiner verifies the member against the pin
//! before it sends the secret, and receives a certificate for a key it made itself (the
//! private key never leaves the host).
//!
//! - [`pki`]: the CA, host keys and certificates, names, fingerprints and pins.
//! - [`sign`]: signatures over the metadata a member owns, checked against its certificate.
//! - [`token`]: join tokens and the issuing host's book of outstanding ones.
//! - [`verify`]: the rustls configurations: TLS 1.3 only, both sides present a certificate of
//!   the cluster's CA (a joiner without one may only redeem a token).
//!
//! No file or socket I/O here: the daemon stores the PEM files (`root.rs`) and wraps its TCP
//! streams (`peer.rs`).

pub mod pki;
pub mod sign;
pub mod token;
pub mod verify;

pub use pki::{certified_host, fingerprint, spki_pin, Ca, Credentials, HostKey, Pin};
pub use sign::{
    cert_from_text, cert_text, endorsed, issued_by, text_fingerprint, CertChecker, Endorse,
    EntrySigner, MemberKey,
};
pub use token::{Token, TokenBook, TokenError};
pub use verify::{join_client, server_name, PeerTls};

/// Why a certificate, key or configuration could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what} is not valid PEM/DER: {why}")]
    Parse { what: &'static str, why: String },
    #[error("the certificate names no valid host: {0}")]
    Name(String),
    #[error("{0}")]
    Signature(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}
