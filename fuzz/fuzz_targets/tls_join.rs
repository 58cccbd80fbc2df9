//! What a joiner or a peer hands the PKI: a token's text, a presented `ID.SECRET`, a public key
//! to certify, a certificate to read a host name, pin or fingerprint from, PEM files. None of
//! it may panic; a token that parses prints back to the same text; a key that certifies gives
//! a certificate naming the host it was issued for.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mars_config::HostName;
use mars_tls::{certified_host, fingerprint, spki_pin, Ca, Credentials, Token, TokenBook};
use rustls::pki_types::CertificateDer;

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::create().expect("a CA"))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = text.parse::<Token>() {
        assert_eq!(t.to_string().parse::<Token>().ok(), Some(t));
    }
    let mut book = TokenBook::default();
    let issued = book.issue([0; 32], 100, 60);
    let _ = book.redeem(&text, 120);
    assert_eq!(book.redeem(&issued.presented(), 120), Ok(()));

    let der = CertificateDer::from(data.to_vec());
    let _ = certified_host(&der);
    let _ = spki_pin(&der);
    let _ = fingerprint(&der);
    let host = HostName::new("fuzz").expect("a host name");
    if let Ok(cert) = ca().issue(&host, data) {
        assert_eq!(certified_host(&cert).ok(), Some(host));
    }
    let _ = Credentials::from_pem(&text, &text, &text);
    let _ = Ca::from_pem(&text, &text);
});
