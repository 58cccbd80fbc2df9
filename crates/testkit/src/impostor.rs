//! A member gone rogue: something that holds a member's real credentials (a stolen key, a
//! compromised host) and answers in its place, to show what the others accept from it.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use mars_config::HostName;
use mars_wire::{ClusterId, Message};

/// Stands in for member `name` (with its `creds`) at its address `addr` (the real one must be
/// stopped): accepts the next metadata pull, answers its first `ChangesSince` with what
/// `answer` makes of the request's `since` and `limit`, and returns when the puller asks again
/// (it has dealt with the answer) or hangs up.
pub fn answer_one_pull(
    addr: &str,
    creds: &mars_tls::Credentials,
    cluster: ClusterId,
    name: &str,
    answer: impl FnOnce(u64, u32) -> Message,
) {
    let tls = mars_tls::PeerTls::new(creds).expect("the member's credentials");
    let l = TcpListener::bind(addr).expect("the member's address");
    let (tcp, _) = l.accept().expect("a pull");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn = rustls::ServerConnection::new(tls.server.clone()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let ours = mars_wire::Hello::new(
        mars_wire::StreamKind::Meta,
        cluster,
        HostName::new(name).expect("a host name"),
    );
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut read_more = |s: &mut rustls::StreamOwned<_, _>, got: &mut Vec<u8>| {
        let n = s.read(&mut chunk).expect("the puller's bytes");
        assert!(n > 0, "the puller closed");
        got.extend_from_slice(&chunk[..n]);
    };
    // Its hello, then ours (it waits for ours before it asks).
    let h = loop {
        if let Ok(Some((_, h))) = mars_wire::Hello::decode(&got) {
            break h;
        }
        read_more(&mut s, &mut got);
    };
    s.write_all(&ours.encode()).unwrap();
    s.flush().unwrap();
    let mut got = got.split_off(h);
    let (since, limit) = loop {
        if let Ok(Some((m, _))) = mars_wire::decode_frame(&got) {
            match m {
                Message::ChangesSince { since, limit } => break (since, limit),
                other => panic!("the puller asked {other:?}"),
            }
        }
        read_more(&mut s, &mut got);
    };
    let mut frame = Vec::new();
    mars_wire::encode_frame(&answer(since, limit), &mut frame);
    s.write_all(&frame).unwrap();
    s.flush().unwrap();
    // The puller's next request (it took the answer) or its hang-up (it did not).
    let _ = s.read(&mut [0u8; 4096]);
}

/// An entry as member `creds` would write it: signed with its key.
pub fn signed_entry(
    creds: &mars_tls::Credentials,
    key: &str,
    value: Option<&str>,
    stamp: u64,
    origin: &str,
) -> mars_wire::Entry {
    let e = mars_meta::Entry {
        key: key.into(),
        value: value.map(Into::into),
        stamp,
        origin: HostName::new(origin).expect("a host name"),
        sig: None,
    };
    let sig = mars_tls::EntrySigner::new(creds)
        .expect("the member's key")
        .sign(&e.signed_message());
    mars_wire::Entry {
        key: e.key,
        value: e.value,
        stamp,
        origin: origin.into(),
        sig,
    }
}

/// Opens TLS with `config` to the peer port at `addr` and tries to send a byte: whether the
/// handshake failed with nothing at all received from the server's protocol.
pub fn handshake_refused(addr: &str, config: std::sync::Arc<rustls::ClientConfig>) -> bool {
    let tcp = std::net::TcpStream::connect(addr).expect("the peer port");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(config, mars_tls::server_name()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut got = Vec::new();
    let r = s
        .write_all(b"x")
        .and_then(|()| s.flush())
        .and_then(|()| s.read_to_end(&mut got));
    r.is_err() && got.is_empty()
}
