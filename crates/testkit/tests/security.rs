//! The peer port under TLS, seen from the wire: every byte between two real `marsd` passes a
//! recording relay (a's advertised address is the relay's), so the test sees what an observer
//! on the network sees. A known pattern written through the device must never appear there —
//! and does appear when both hosts run `--insecure`, which shows that the capture would see it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use mars_testkit::repl::{eventually, join, tail, tmp, wait_uptodate};
use mars_testkit::{free_port_on, random_file, run, Host};

const SIZE: u64 = 16 << 20;

/// A TCP relay on `listen` to `to` that appends every byte it forwards (both directions) to
/// the returned buffer.
fn recording_relay(listen: &str, to: String) -> Arc<Mutex<Vec<u8>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let l = TcpListener::bind(listen).expect("bind relay");
    let rec = seen.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let Ok(server) = TcpStream::connect(&to) else {
                continue;
            };
            for (mut from, mut into) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let rec = rec.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    seen
}

/// Opens TLS with `config` to the peer port at `addr`, sends `hello` and `then`, and reads until
/// the server closes; returns the server's hello, the reason of its refusal (the frame after
/// the hello must be one) and the host its certificate names.
fn refused_over_tls(
    addr: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
    hello: mars_wire::Hello,
    then: Option<mars_wire::Message>,
) -> (mars_wire::Hello, String, String) {
    use rustls::pki_types::CertificateDer;

    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    let conn = rustls::ClientConnection::new(config, mars_tls::server_name()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(&hello.encode()).unwrap();
    if let Some(m) = then {
        let mut f = Vec::new();
        mars_wire::encode_frame(&m, &mut f);
        s.write_all(&f).unwrap();
    }
    s.flush().unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let (theirs, n) = mars_wire::Hello::decode(&got).unwrap().unwrap();
    let leaf = CertificateDer::from(s.conn.peer_certificates().unwrap()[0].to_vec());
    let named = mars_tls::certified_host(&leaf).unwrap().to_string();
    match mars_wire::decode_frame(&got[n..]).unwrap().unwrap().0 {
        mars_wire::Message::Refuse { reason, .. } => (theirs, reason, named),
        m => panic!("expected a refusal, got {m:?}"),
    }
}

/// a, b and c in one cluster made by a; with `replicated`, a's resource r of `SIZE` bytes
/// replicated to b (up to date), else every member answered `wait-cluster`.
fn three_members(t: &tempfile::TempDir, replicated: bool) -> (Host, Host, Host) {
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    let c = Host::start_at(t.path(), "c", "127.0.0.3");
    if replicated {
        a.create_resource("r", SIZE);
    } else {
        a.ok(&["create-cluster"]);
    }
    b.join(&a);
    c.join(&a);
    if replicated {
        join(&b, "r", SIZE);
        wait_uptodate(&b, "r", 60);
    } else {
        for h in [&a, &b, &c] {
            h.ok(&["--timeout", "30", "wait-cluster"]);
        }
    }
    (a, b, c)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Replicates a known pattern from a to b through the relay; returns whether the capture holds
/// any 64-byte piece of it.
fn pattern_on_the_wire(insecure: bool) -> bool {
    let t = tmp();
    let env: &[(&str, &str)] = if insecure {
        &[("MARS_INSECURE", "1")]
    } else {
        &[]
    };
    let a = Host::start_with_env(t.path(), "a", "127.0.0.1", env);
    let b = Host::start_with_env(t.path(), "b", "127.0.0.2", env);
    let relay = format!("127.0.0.3:{}", free_port_on("127.0.0.3"));
    let seen = recording_relay(&relay, a.peer_addr.clone());
    a.ok(&["create-cluster", "--ip", &relay]);
    a.create_resource("r", SIZE);
    if insecure {
        b.ok(&["join-cluster", &a.peer_addr]);
    } else {
        b.join(&a);
    }
    b.ok(&["--timeout", "30", "wait-cluster"]);
    join(&b, "r", SIZE);
    wait_uptodate(&b, "r", 60);
    // The pattern: 1 MiB of random bytes written through NBD on a, replicated through the
    // relay (b fetches a's log at a's advertised address).
    let src = t.path().join("pattern");
    random_file(&src, 1 << 20);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!(
            "write -s {} {} {}",
            src.display(),
            4 << 20,
            1 << 20
        ))
        .arg(a.unix_uri("r")));
    wait_uptodate(&b, "r", 60);
    let pattern = std::fs::read(&src).expect("pattern");
    let captured = seen.lock().unwrap().clone();
    assert!(
        captured.len() > 1 << 20,
        "the relay carried the replication ({} bytes)",
        captured.len()
    );
    let found = pattern
        .chunks(64 << 10)
        .any(|piece| contains(&captured, &piece[..64]));
    found
}

#[test]
fn replication_is_encrypted_on_the_wire_and_plaintext_only_with_insecure() {
    assert!(
        !pattern_on_the_wire(false),
        "data written through the device travelled in plaintext under TLS"
    );
    assert!(
        pattern_on_the_wire(true),
        "the capture did not see the data even in --insecure mode: it proves nothing"
    );
}

/// A TLS client without a certificate of the cluster (it trusts a's CA through a token's pin,
/// as a joiner does): it gets a's hello with no cluster id, and whatever it asks other than a
/// join is refused — a metadata stream with the cluster's id, a fetch stream, a metadata
/// request instead of a join request. a logs each refusal and keeps serving its members.
#[test]
fn a_client_without_a_certificate_may_only_join() {
    let t = tmp();
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    a.ok(&["create-cluster"]);
    b.join(&a);
    let cluster = a.cluster_id();
    let token: mars_tls::Token = a.join_token().parse().unwrap();
    let config = mars_tls::join_client(token.pin).unwrap();
    // The server is a (its certificate says so) and refuses: its hello and reason.
    let attempt = |hello: mars_wire::Hello, then: Option<mars_wire::Message>| {
        let (theirs, reason, named) = refused_over_tls(&a.peer_addr, config.clone(), hello, then);
        assert_eq!(named, "a");
        (theirs, reason)
    };
    let me = mars_config::HostName::new("mallory").unwrap();
    let hello = |kind, id| mars_wire::Hello::new(kind, id, me.clone());
    let (theirs, why) = attempt(hello(mars_wire::StreamKind::Meta, cluster), None);
    assert_eq!(
        theirs.cluster,
        mars_wire::ClusterId::UNKNOWN,
        "no cluster id before a join"
    );
    assert!(why.contains("may only join"), "{why}");
    let (_, why) = attempt(
        hello(mars_wire::StreamKind::Fetch, mars_wire::ClusterId::UNKNOWN),
        None,
    );
    assert!(why.contains("may only join"), "{why}");
    let (_, why) = attempt(
        hello(mars_wire::StreamKind::Meta, mars_wire::ClusterId::UNKNOWN),
        Some(mars_wire::Message::ChangesSince {
            since: 0,
            limit: 1000,
        }),
    );
    assert!(why.contains("join request first"), "{why}");
    assert!(a.log_text().contains("refused peer mallory"));
    assert!(a.log_text().contains("refused join of mallory"));
    // The token was not spent by any of this, and the cluster still works.
    let c = Host::start_at(t.path(), "c", "127.0.0.3");
    c.ok(&["join-cluster", &a.peer_addr, "--token", &token.to_string()]);
    for h in [&a, &b, &c] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
}

/// Deleting a live member revokes its certificate: the streams it holds open are closed at
/// once, and its reconnections are refused.
#[test]
fn deleting_a_live_member_closes_its_open_streams() {
    let t = tmp();
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    a.ok(&["create-cluster"]);
    b.join(&a);
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    // b is alive: deleting it takes --force.
    let msg = a.refused(&["lowlevel-delete-host", "b"]);
    assert!(msg.contains("is alive") && msg.contains("--force"), "{msg}");
    a.ok(&["--force", "lowlevel-delete-host", "b"]);
    eventually(20, "a closes b's open metadata stream", || {
        a.log_text().contains("closed the Meta stream of b at ")
    });
    eventually(20, "and refuses it afterwards", || {
        a.log_text().contains("refused peer b at ")
    });
}

/// Renewal without downtime: b renews through the CA holder a, every member switches to the
/// new fingerprint, the streams b opened with the old certificate are closed and reopened with
/// the new one, and the old certificate is refused from then on. The CA holder renews its own.
#[test]
fn a_renewed_certificate_replaces_the_old_one_cluster_wide() {
    let t = tmp();
    let (a, b, c) = three_members(&t, false);
    let old = b.credentials();
    let cluster = a.cluster_id();

    let out = b.ok(&["renew-certificate"]);
    assert!(out.contains("issued by a"), "{out}");
    let new_fp = b.credentials().fingerprint();
    assert_ne!(new_fp, old.fingerprint());
    assert!(
        b.view_json()["cluster"]["security"]
            .as_str()
            .unwrap()
            .contains(&new_fp),
        "view shows the new certificate"
    );
    eventually(20, "every member records the new fingerprint", || {
        [&a, &c].iter().all(|h| {
            mars_tls::text_fingerprint(h.ok(&["get-link", "certs/cert-b"]).trim()).ok()
                == Some(new_fp.clone())
        })
    });
    eventually(20, "the old streams are closed", || {
        a.log_text().contains("closed the Meta stream of b")
    });
    for h in [&a, &b, &c] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }

    // The old certificate (still valid by date and CA) is refused now.
    let tls = mars_tls::PeerTls::new(&old).unwrap();
    let hello = mars_wire::Hello::new(
        mars_wire::StreamKind::Meta,
        cluster,
        mars_config::HostName::new("b").unwrap(),
    );
    let (_, reason, _) = refused_over_tls(&a.peer_addr, tls.client.clone(), hello, None);
    assert!(reason.contains("not its current one"), "{reason}");

    // The CA holder renews its own, and the cluster still answers.
    let out = a.ok(&["renew-certificate"]);
    assert!(out.contains("issued by a"), "{out}");
    // A member that holds no CA key cannot issue: asking c fails with the reason.
    let err = b.refused(&["renew-certificate", "--via", "c"]);
    assert!(err.contains("does not hold the cluster CA"), "{err}");
    for h in [&a, &b, &c] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
}

/// A member may relay other members' metadata but not forge it: b (its real key, its
/// address, c down) answers a's pull with an entry of c's it made up, c's address moved to
/// itself signed with its own key, and one entry of its own. a takes b's own entry and refuses
/// the other two, and says so in its log.
#[test]
fn a_member_cannot_write_another_members_keys() {
    let t = tmp();
    let (a, mut b, mut c) = three_members(&t, false);
    let c_addr = a.ok(&["get-link", "ips/ip-c"]).trim().to_string();
    let creds = b.credentials();
    let cluster = a.cluster_id();
    c.stop();
    b.stop();
    // A minute ahead, so that it would win over what c wrote.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        + 60_000_000_000;
    mars_testkit::impostor::answer_one_pull(&b.peer_addr, &creds, cluster, "b", |since, _| {
        let mut forged =
            mars_testkit::impostor::signed_entry(&creds, "note-c", Some("forged"), stamp, "c");
        forged.sig.clear();
        mars_wire::Message::Changes {
            upto: since + 3,
            entries: vec![
                forged,
                mars_testkit::impostor::signed_entry(
                    &creds,
                    "ips/ip-c",
                    Some(&b.peer_addr),
                    stamp,
                    "c",
                ),
                mars_testkit::impostor::signed_entry(&creds, "note-b", Some("b's own"), stamp, "b"),
            ],
        }
    });
    eventually(20, "a takes b's own entry", || {
        a.marsadm(&["get-link", "note-b"]).status.success()
    });
    assert_eq!(a.ok(&["get-link", "note-b"]).trim(), "b's own");
    assert!(!a.marsadm(&["get-link", "note-c"]).status.success());
    assert_eq!(a.ok(&["get-link", "ips/ip-c"]).trim(), c_addr);
    let log = a.log_text();
    assert!(
        log.contains("refused metadata \"note-c\" from b") && log.contains("not signed"),
        "{log}"
    );
    assert!(
        log.contains("refused metadata \"ips/ip-c\" from b")
            && log.contains("not a signature of c"),
        "{log}"
    );
}

/// A device's data goes to the hosts that replicate it: c, a member of the cluster but not of
/// resource r, is refused r's log and a full sync of it (with the reason), while b, which
/// replicates r, is served.
#[test]
fn fetch_and_sync_serve_members_of_the_resource_only() {
    let t = tmp();
    let (a, b, c) = three_members(&t, true);
    let cluster = a.cluster_id();
    let tls = mars_tls::PeerTls::new(&c.credentials()).unwrap();
    let hello =
        |kind| mars_wire::Hello::new(kind, cluster, mars_config::HostName::new("c").unwrap());
    let (_, reason, _) = refused_over_tls(
        &a.peer_addr,
        tls.client.clone(),
        hello(mars_wire::StreamKind::Fetch),
        Some(mars_wire::Message::FetchFrom {
            res: "r".into(),
            file: 1,
            offset: 0,
            prev_link: String::new(),
            tail: [0; 16],
        }),
    );
    assert!(reason.contains("c is not a member of r"), "{reason}");
    let (_, reason, _) = refused_over_tls(
        &a.peer_addr,
        tls.client.clone(),
        hello(mars_wire::StreamKind::Sync),
        Some(mars_wire::Message::SyncStart { res: "r".into() }),
    );
    assert!(reason.contains("c is not a member of r"), "{reason}");
    // b is served: it still replicates.
    b.ok(&["--timeout", "30", "wait-resource", "r", "uptodate"]);
}

/// The cluster CA is rotated without downtime: `rotate-ca start` on the CA holder makes the
/// next CA and every member trusts it too; each member renews its certificate (from the next
/// CA); `rotate-ca finish` (refused while a member still has an old certificate) retires the
/// old CA everywhere. Replication and the metadata keep going throughout; afterwards a
/// certificate of the old CA is refused and a new host joins with a token of the new CA.
#[test]
fn the_cluster_ca_is_rotated_without_downtime() {
    let t = tmp();
    let (a, b, c) = three_members(&t, true);
    let old_b = b.credentials();
    let old_ca = a.credentials().ca;
    let trusts_next = |h: &Host| h.root.join("tls/ca-next.crt").exists();

    let out = a.ok(&["rotate-ca", "start"]);
    assert!(out.contains("CA rotation started"), "{out}");
    assert!(a
        .refused(&["rotate-ca", "start"])
        .contains("in progress already"));
    eventually(20, "every member trusts the next CA", || {
        [&b, &c].iter().all(|h| trusts_next(h))
    });
    let err = a.refused(&["rotate-ca", "finish"]);
    assert!(err.contains("renew-certificate"), "{err}");
    for h in [&a, &b, &c] {
        let out = h.ok(&["renew-certificate"]);
        assert!(out.contains("issued by a"), "{out}");
    }
    for h in [&a, &b, &c] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    let new_ca = b.credentials().ca;
    assert_ne!(new_ca, old_ca, "b's certificate is from the next CA");
    let start = std::time::Instant::now();
    let mut last: String;
    while !{
        let o = a.marsadm(&["rotate-ca", "finish"]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o.status.success()
    } {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: a learned every renewed certificate: {last}\n--- a:\n{}\n--- b:\n{}\n--- c:\n{}",
            tail(&a.log_text(), 60),
            tail(&b.log_text(), 60),
            tail(&c.log_text(), 60)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "a learned every renewed certificate after {:?}",
        start.elapsed()
    );
    eventually(30, "every member dropped the old CA", || {
        [&a, &b, &c].iter().all(|h| !trusts_next(h))
    });
    assert_eq!(a.credentials().ca, new_ca);
    for h in [&a, &b, &c] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    // Replication went on: new data reaches b.
    let src = t.path().join("data");
    random_file(&src, 1 << 20);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -s {} 0 {}", src.display(), 1 << 20))
        .arg(a.unix_uri("r")));
    wait_uptodate(&b, "r", 60);
    // b's old certificate (valid by date, from the old CA) is refused now, even by a client
    // that trusts the new CA.
    let tls = mars_tls::PeerTls::trusting(&old_b, &[new_ca]).unwrap();
    assert!(
        mars_testkit::impostor::handshake_refused(&a.peer_addr, tls.client.clone()),
        "the old certificate was accepted"
    );
    // A new host joins with a token of the new CA.
    let d = Host::start_at(t.path(), "d", "127.0.0.4");
    d.join(&a);
    d.ok(&["--timeout", "30", "wait-cluster"]);
}

/// NBD over TCP with `--nbd-tls`: a plaintext client is refused (TLS required), qemu with the
/// cluster CA and a member's certificate reads and writes over STARTTLS (verifying a's
/// certificate and name), and qemu without a client certificate is refused.
#[test]
fn nbd_over_tcp_with_tls_needs_a_certificate_of_the_cluster() {
    let t = tmp();
    let a = Host::start_with_env(t.path(), "a", "127.0.0.1", &[("MARS_NBD_TLS", "1")]);
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    a.create_resource("r", SIZE);
    b.join(&a);
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{}/r", a.nbd_port))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plaintext client was served");
    let creds_dir = |name: &str, with_client: bool| {
        let d = t.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(a.root.join("tls/ca.crt"), d.join("ca-cert.pem")).unwrap();
        if with_client {
            std::fs::copy(b.root.join("tls/host.crt"), d.join("client-cert.pem")).unwrap();
            std::fs::copy(b.root.join("tls/host.key"), d.join("client-key.pem")).unwrap();
        }
        d
    };
    let qemu_io = |dir: &std::path::Path, cmd: &str, port: u16, name: &str| {
        Command::new("qemu-io")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                dir.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=r,\
                 tls-creds=tls0,tls-hostname={name}"
            ))
            .args(["-c", cmd])
            .output()
            .unwrap()
    };
    let with_b = creds_dir("tls-with-b", true);
    let w = qemu_io(&with_b, "write -P 0x5a 0 64k", a.nbd_port, "a");
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let r = qemu_io(&with_b, "read -P 0x5a 0 64k", a.nbd_port, "a");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // The same bytes through the Unix socket.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 0 64k", &a.unix_uri("r")]));
    let anonymous = creds_dir("tls-ca-only", false);
    let n = qemu_io(&anonymous, "read 0 4k", a.nbd_port, "a");
    assert!(
        !n.status.success(),
        "a client without a certificate was served"
    );

    // The operator's own CA and server certificate instead (`--nbd-tls-dir`, qemu's layout):
    // a client certificate of that CA is served, one of the cluster's is not.
    let own = mars_tls::Ca::create().unwrap();
    let issue = |name: &str| {
        let key = mars_tls::HostKey::generate().unwrap();
        let cert = own
            .issue(
                &mars_config::HostName::new(name).unwrap(),
                &key.public_der(),
            )
            .unwrap();
        (mars_tls::pki::cert_pem(&cert), key.pem())
    };
    let server_dir = t.path().join("nbd-server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let (cert, key) = issue("nbd-example");
    std::fs::write(server_dir.join("server-cert.pem"), cert).unwrap();
    std::fs::write(server_dir.join("server-key.pem"), key).unwrap();
    std::fs::write(server_dir.join("ca-cert.pem"), own.cert_pem()).unwrap();
    let e = Host::start_with_env(
        t.path(),
        "e",
        "127.0.0.5",
        &[("MARS_NBD_TLS_DIR", server_dir.to_str().unwrap())],
    );
    e.create_resource("r", SIZE);
    let client_dir = t.path().join("nbd-client");
    std::fs::create_dir_all(&client_dir).unwrap();
    let (cert, key) = issue("vmhost1");
    std::fs::write(client_dir.join("client-cert.pem"), cert).unwrap();
    std::fs::write(client_dir.join("client-key.pem"), key).unwrap();
    std::fs::write(client_dir.join("ca-cert.pem"), own.cert_pem()).unwrap();
    let w = qemu_io(
        &client_dir,
        "write -P 0x6b 0 64k",
        e.nbd_port,
        "nbd-example",
    );
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let cluster_client = creds_dir("tls-cluster-for-e", true);
    std::fs::copy(
        server_dir.join("ca-cert.pem"),
        cluster_client.join("ca-cert.pem"),
    )
    .unwrap();
    let x = qemu_io(&cluster_client, "read 0 4k", e.nbd_port, "nbd-example");
    assert!(
        !x.status.success(),
        "a certificate of another CA was served"
    );
}

/// A cluster of `first` (with resource `res`, primary there) and `second` (replicating it, up
/// to date).
fn two_member_cluster(t: &tempfile::TempDir, hosts: [(&str, &str); 2], res: &str) -> (Host, Host) {
    let a = Host::start_at(t.path(), hosts[0].0, hosts[0].1);
    let b = Host::start_at(t.path(), hosts[1].0, hosts[1].1);
    a.create_resource(res, SIZE);
    b.join(&a);
    join(&b, res, SIZE);
    wait_uptodate(&b, res, 60);
    (a, b)
}

/// Cluster A (a1, a2 sharing resource ra, primary a1) and cluster B (b1, b2 sharing rb,
/// primary b1), each secondary up to date.
fn two_clusters(t: &tempfile::TempDir) -> (Host, Host, Host, Host) {
    let (a1, a2) = two_member_cluster(t, [("a1", "127.0.0.1"), ("a2", "127.0.0.2")], "ra");
    let (b1, b2) = two_member_cluster(t, [("b1", "127.0.0.3"), ("b2", "127.0.0.4")], "rb");
    (a1, a2, b1, b2)
}

/// `merge-cluster`: cluster A (a1, a2, resource ra) merges into cluster B (b1, b2, resource
/// rb) while both resources are written. Refused first: a token of the wrong cluster, a host
/// without the CA key, a member down, a resource name on both sides; then the merge: four
/// members everywhere, one cluster id and one CA, both resources still replicating, a
/// handover of ra, A's old certificates refused, the used token refused.
#[test]
fn two_clusters_merge_into_one() {
    let t = tmp();
    let (a1, a2, b1, mut b2) = two_clusters(&t);
    let (a_id, b_id) = (a1.cluster_id(), b1.cluster_id());
    let old_a2 = a2.credentials();
    let b_ca = b1.credentials().ca;
    assert_ne!(a_id, b_id);

    // Refusals, nothing changed by any.
    let own = a1.join_token();
    let err = a1.refused(&["merge-cluster", &b1.peer_addr, "--token", &own]);
    assert!(
        err.contains("not a member of the cluster the token is for"),
        "{err}"
    );
    let tok = b1.join_token();
    let err = a2.refused(&["merge-cluster", &b1.peer_addr, "--token", &tok]);
    assert!(err.contains("holds this cluster's CA key"), "{err}");
    let err = a1.refused(&["merge-cluster", "b2", &b1.peer_addr, "--token", &tok]);
    assert!(err.contains("is b1, not b2"), "{err}");
    b2.stop();
    eventually(20, "b1 sees b2 gone", || {
        let o = a1.marsadm(&["merge-cluster-check", &b1.peer_addr, "--token", &tok]);
        String::from_utf8_lossy(&o.stderr).contains("not every member of cluster")
    });
    let err = a1.refused(&["merge-cluster-check", &b1.peer_addr, "--token", &tok]);
    assert!(err.contains(": b2"), "{err}");
    b2.start_again();
    let c1 = Host::start_at(t.path(), "c1", "127.0.0.5");
    c1.create_resource("rb", SIZE);
    let err = c1.refused(&["merge-cluster-check", &b1.peer_addr, "--token", &tok]);
    assert!(err.contains("resource names in both clusters: rb"), "{err}");
    // A check uses no token up.
    eventually(30, "the check passes with every member back", || {
        a1.marsadm(&["merge-cluster-check", "b1", &b1.peer_addr, "--token", &tok])
            .status
            .success()
    });
    let out = a1.ok(&["merge-cluster-check", &b1.peer_addr, "--token", &tok]);
    assert!(out.contains("can merge into cluster"), "{out}");
    assert_eq!(a1.cluster_id(), a_id);
    assert!(!b1.root.join("tls/ca-merge.crt").exists());

    // The merge, under writes on both primaries.
    let (da, db) = (t.path().join("wa"), t.path().join("wb"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let wa = mars_testkit::repl::Writer::start_with(
        &a1,
        "ra",
        &da,
        SIZE,
        64 << 10,
        Duration::from_millis(20),
    );
    let wb = mars_testkit::repl::Writer::start_with(
        &b1,
        "rb",
        &db,
        SIZE,
        64 << 10,
        Duration::from_millis(20),
    );
    wa.wait_more(3);
    let hosts = [&a1, &a2, &b1, &b2];
    let took = merge_and_wait(&a1, &b1, &tok, &hosts);
    eprintln!("the merge completed everywhere after {took:?}");
    assert!(
        !a1.root.join("tls/ca.key").exists(),
        "the retired CA's key is gone"
    );
    for h in hosts {
        let list = h.ok(&["merge-cluster-list"]);
        for want in ["resource-ra", "resource-rb", "ips/ip-a1", "ips/ip-b2"] {
            assert!(list.contains(want), "{}: {list}", h.name);
        }
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    wa.wait_more(3);
    wb.wait_more(3);
    assert!(wa.finish() > 0 && wb.finish() > 0);
    wait_uptodate(&a2, "ra", 60);
    wait_uptodate(&b2, "rb", 60);
    // A handover of ra, and new data reaching a1 from a2.
    a2.ok(&["--timeout", "60", "primary", "ra"]);
    mars_testkit::repl::write_random(&a2, "ra", &da, 0, 1 << 20);
    wait_uptodate(&a1, "ra", 60);
    // A's old certificates are refused everywhere (even by a client that trusts B's CA).
    let tls = mars_tls::PeerTls::trusting(&old_a2, &[b_ca]).unwrap();
    for h in hosts {
        assert!(
            mars_testkit::impostor::handshake_refused(&h.peer_addr, tls.client.clone()),
            "{} accepted a certificate of the retired CA",
            h.name
        );
    }
    // The token was used up.
    let err = c1.refused(&["merge-cluster-check", &b1.peer_addr, "--token", &tok]);
    assert!(err.contains("unknown"), "{err}");
}

/// `merge-cluster` of `a1`'s cluster into `b1`'s with the join token `tok` (of b1's
/// cluster), then waits until every one of `hosts` is in b1's cluster with b1's CA only.
/// Returns how long that took after the command.
fn merge_and_wait(a1: &Host, b1: &Host, tok: &str, hosts: &[&Host]) -> Duration {
    let (b_id, b_ca) = (b1.cluster_id(), b1.credentials().ca);
    let out = a1.ok(&["merge-cluster", "b1", &b1.peer_addr, "--token", tok]);
    assert!(out.contains("merges into cluster"), "{out}");
    let merged = |h: &Host| {
        let v = h.view_json();
        let members = v["members"].as_array().map_or(0, |m| m.len());
        members == 4
            && h.cluster_id() == b_id
            && !h.root.join("tls/ca-next.crt").exists()
            && !h.root.join("tls/ca-merge.crt").exists()
            && h.credentials().ca == b_ca
    };
    let start = std::time::Instant::now();
    while !hosts.iter().all(|h| merged(h)) {
        if start.elapsed() > Duration::from_secs(90) {
            for h in hosts.iter() {
                let tls: Vec<_> = std::fs::read_dir(h.root.join("tls"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                eprintln!(
                    "--- {}: {tls:?}\n{}\n{}",
                    h.name,
                    h.ok(&["view", "all"]),
                    tail(&h.log_text(), 40)
                );
            }
            panic!("timed out: every host in one cluster with one CA");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// `split-cluster` on the merged cluster of `two_clusters_merge_into_one`: `--dry-run` shows
/// the two groups (b1's keeps the id; a1 would issue the other's certificates); refused
/// without changing anything: a host without the CA key (with and without `--dry-run`), a
/// member down; a cluster of one group has nothing to split (exit 0). Afterwards the merged
/// cluster is intact: four members and both resources everywhere, both replicating.
#[test]
fn a_merged_cluster_shows_the_groups_it_would_split_into() {
    let t = tmp();
    let (a1, a2, b1, mut b2) = two_clusters(&t);
    let tok = b1.join_token();
    merge_and_wait(&a1, &b1, &tok, &[&a1, &a2, &b1, &b2]);
    let id = b1.cluster_id();

    eventually(30, "every member reachable from b1", || {
        b1.marsadm(&["--dry-run", "split-cluster"]).status.success()
    });
    let plan = b1.ok(&["--dry-run", "split-cluster"]);
    assert!(
        plan.contains(&format!(
            "#1: b1,b2 resources rb (keeps cluster {id} and its CA)"
        )),
        "{plan}"
    );
    assert!(
        plan.contains("#2: a1,a2 resources ra (a new cluster, certificates issued by a1)"),
        "{plan}"
    );
    // Seen from a host of the other group, its own group comes first (the same groups).
    let err = a1.refused(&["--dry-run", "split-cluster"]);
    assert!(err.contains("holds this cluster's CA key"), "{err}");
    assert!(err.contains("#1: a1,a2 resources ra"), "{err}");
    assert!(err.contains("#2: b1,b2 resources rb"), "{err}");
    let err = a1.refused(&["split-cluster"]);
    assert!(err.contains("holds this cluster's CA key"), "{err}");
    b2.stop();
    eventually(20, "b1 sees b2 gone", || {
        let o = b1.marsadm(&["--dry-run", "split-cluster"]);
        String::from_utf8_lossy(&o.stderr).contains("not every member")
    });
    let err = b1.refused(&["--dry-run", "split-cluster"]);
    assert!(err.contains(": b2"), "{err}");
    b2.start_again();
    // One group: nothing to split.
    let c1 = Host::start_at(t.path(), "c1", "127.0.0.5");
    c1.create_resource("rc", SIZE);
    let out = c1.ok(&["split-cluster"]);
    assert!(out.contains("nothing to split"), "{out}");

    // Nothing changed: one cluster, four members, both resources, both replicating.
    for h in [&a1, &a2, &b1, &b2] {
        assert_eq!(h.cluster_id(), id, "{}", h.name);
        let list = h.ok(&["merge-cluster-list"]);
        for want in [
            "resource-ra",
            "resource-rb",
            "ips/ip-a1",
            "ips/ip-a2",
            "ips/ip-b1",
            "ips/ip-b2",
        ] {
            assert!(list.contains(want), "{}: {list}", h.name);
        }
    }
    let d = t.path().join("w");
    std::fs::create_dir_all(&d).unwrap();
    mars_testkit::repl::write_random(&a1, "ra", &d, 0, 1 << 20);
    mars_testkit::repl::write_random(&b1, "rb", &d, 0, 1 << 20);
    wait_uptodate(&a2, "ra", 60);
    wait_uptodate(&b2, "rb", 60);
}

/// Waits up to `secs` for `cond`; on a timeout shows each host's `tls/` files, `view all`
/// and the end of its log, then fails.
fn wait_or_dump(secs: u64, what: &str, hosts: &[&Host], mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        if start.elapsed() > Duration::from_secs(secs) {
            for h in hosts {
                let tls: Vec<_> = std::fs::read_dir(h.root.join("tls"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                eprintln!(
                    "--- {}: {tls:?}\n{}\n{}",
                    h.name,
                    h.ok(&["view", "all"]),
                    tail(&h.log_text(), 60)
                );
            }
            panic!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The hosts this host knows as members (`lowlevel-ls-host-ips`).
fn member_names(h: &Host) -> Vec<String> {
    h.ok(&["lowlevel-ls-host-ips"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// `split-cluster` splits the merged cluster of `two_clusters_merge_into_one` back into two:
/// b1's group (b1, b2, rb) keeps the id and CA, a1's (a1, a2, ra) becomes a cluster of its own
/// with a new id and a CA whose key only a1 holds. Afterwards each side shows only its own
/// members and resources (`lowlevel-ls-host-ips`, `merge-cluster-list`, `view`), refuses the
/// other side's certificates in the handshake, and replicates: writes reach the secondaries
/// and a handover works on both sides. A second split has nothing to split.
#[test]
fn a_merged_cluster_splits_back_into_two() {
    let t = tmp();
    let (a1, a2, b1, b2) = two_clusters(&t);
    let tok = b1.join_token();
    merge_and_wait(&a1, &b1, &tok, &[&a1, &a2, &b1, &b2]);
    let id = b1.cluster_id();
    let b_ca = b1.credentials().ca;
    eventually(30, "every member reachable from b1", || {
        b1.marsadm(&["--dry-run", "split-cluster"]).status.success()
    });
    let start = std::time::Instant::now();
    let out = b1.ok(&["split-cluster"]);
    let took = start.elapsed();
    assert!(
        out.contains(&format!(
            "cluster {id} split: b1,b2 resources rb (keeps cluster {id} and its CA)"
        )),
        "{out}"
    );
    assert!(out.contains("a1,a2 resources ra is cluster "), "{out}");
    eprintln!("split-cluster took {took:?}");

    let no_split_files = |h: &Host| {
        std::fs::read_dir(h.root.join("tls"))
            .unwrap()
            .filter_map(|e| e.ok())
            .all(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                !n.starts_with("ca-split") && n != "split.toml"
            })
    };
    wait_or_dump(
        60,
        "a1 and a2 in a cluster of their own",
        &[&a1, &a2, &b1, &b2],
        || {
            let a = a1.cluster_id();
            a != id
                && a2.cluster_id() == a
                && a1.credentials().ca != b_ca
                && a2.credentials().ca == a1.credentials().ca
                && no_split_files(&a1)
                && no_split_files(&a2)
        },
    );
    let a_id = a1.cluster_id();
    let a_ca = a1.credentials().ca;
    // The new CA's key is on its issuer only; the old CA's key on b1 only.
    assert!(a1.root.join("tls/ca.key").exists());
    assert!(!a2.root.join("tls/ca.key").exists());
    assert!(b1.root.join("tls/ca.key").exists());
    eventually(30, "b1 and b2 forgot a1 and a2", || {
        [&b1, &b2]
            .iter()
            .all(|h| member_names(h) == ["b1", "b2"] && no_split_files(h))
    });
    eventually(30, "a1 and a2 forgot b1 and b2", || {
        [&a1, &a2].iter().all(|h| member_names(h) == ["a1", "a2"])
    });
    for (h, own, other, cid, ca) in [
        (&a1, "ra", "rb", a_id, &a_ca),
        (&a2, "ra", "rb", a_id, &a_ca),
        (&b1, "rb", "ra", id, &b_ca),
        (&b2, "rb", "ra", id, &b_ca),
    ] {
        assert_eq!(h.cluster_id(), cid, "{}", h.name);
        assert_eq!(&h.credentials().ca, ca, "{}", h.name);
        let list = h.ok(&["merge-cluster-list"]);
        assert!(
            list.contains(&format!("resource-{own}")),
            "{}: {list}",
            h.name
        );
        assert!(
            !list.contains(&format!("resource-{other}")),
            "{}: {list}",
            h.name
        );
        let v = h.view_json();
        let names: Vec<&str> = v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(!names.contains(&other), "{}: {names:?}", h.name);
        let text = h.ok(&["view", "all"]);
        assert!(
            !text.contains(&format!("resource {other}")),
            "{}: {text}",
            h.name
        );
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    // Each side refuses the other's certificates, even from a client that trusts both CAs.
    for (from, to) in [(&a1, [&b1, &b2]), (&b1, [&a1, &a2])] {
        let tls = mars_tls::PeerTls::trusting(&from.credentials(), &[a_ca.clone(), b_ca.clone()])
            .unwrap();
        for h in to {
            assert!(
                mars_testkit::impostor::handshake_refused(&h.peer_addr, tls.client.clone()),
                "{} accepted the certificate of {}",
                h.name,
                from.name
            );
        }
    }
    // Both sides replicate, and a handover works on both.
    let d = t.path().join("w");
    std::fs::create_dir_all(&d).unwrap();
    mars_testkit::repl::write_random(&a1, "ra", &d, 0, 1 << 20);
    mars_testkit::repl::write_random(&b1, "rb", &d, 0, 1 << 20);
    wait_uptodate(&a2, "ra", 60);
    wait_uptodate(&b2, "rb", 60);
    a2.ok(&["--timeout", "60", "primary", "ra"]);
    b2.ok(&["--timeout", "60", "primary", "rb"]);
    mars_testkit::repl::write_random(&a2, "ra", &d, 1 << 20, 1 << 20);
    mars_testkit::repl::write_random(&b2, "rb", &d, 1 << 20, 1 << 20);
    wait_uptodate(&a1, "ra", 60);
    wait_uptodate(&b1, "rb", 60);
    // Each side is one group now.
    for h in [&a1, &b1] {
        let out = h.ok(&["split-cluster"]);
        assert!(out.contains("nothing to split"), "{}: {out}", h.name);
    }
}
