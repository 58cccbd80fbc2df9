//! Several hosts on one machine (127.0.0.1, .2, .3 …), each a real `marsd`, forming a cluster
//! through `marsadm` only: membership, metadata propagation and relay, liveness, refusals.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use mars_testkit::repl::{eventually, tmp};
use mars_testkit::Host;

/// Member names as `lowlevel-ls-host-ips` lists them on `h`.
fn members(h: &Host) -> Vec<String> {
    h.ok(&["lowlevel-ls-host-ips"])
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

fn three(t: &std::path::Path) -> (Host, Host, Host) {
    let a = Host::start_at(t, "a", "127.0.0.1");
    let b = Host::start_at(t, "b", "127.0.0.2");
    let c = Host::start_at(t, "c", "127.0.0.3");
    a.ok(&["create-cluster"]);
    b.join(&a);
    // c joins through b: what c announces reaches a only by relay through b. b issues join
    // tokens once it holds the CA's key (the documented way to have a second issuer).
    b.copy_ca_key_from(&a);
    c.join(&b);
    for h in [&a, &b, &c] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    (a, b, c)
}

#[test]
fn three_hosts_join_and_see_each_other() {
    let t = tmp();
    let (a, b, c) = three(t.path());
    for h in [&a, &b, &c] {
        assert_eq!(members(h), ["a", "b", "c"], "on {}", h.name);
    }
    let ls = a.ok(&["lowlevel-ls-host-ips"]);
    assert!(ls.contains(&format!("c {}", c.peer_addr)), "{ls}");
    let v = c.view_json();
    let ms = v["members"].as_array().unwrap();
    assert_eq!(ms.len(), 3);
    eventually(20, "every member alive and connected on c", || {
        let v = c.view_json();
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["alive"] == true && m["connected"] == true)
    });
    let text = c.ok(&["view", "all"]);
    assert!(text.contains("host a at 127.0.0.1:"), "{text}");
    assert!(text.contains("alive, connected"), "{text}");
    // All three agree on the cluster id.
    let id = |h: &Host| {
        h.view_json()["cluster"]["uuid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(id(&a), id(&b));
    assert_eq!(id(&a), id(&c));
}

#[test]
fn a_change_reaches_every_member_quickly_and_a_partitioned_member_catches_up() {
    let t = tmp();
    let (a, b, mut c) = three(t.path());
    // A new member announced at c reaches a (two hops) quickly.
    let d = Host::start_at(t.path(), "d", "127.0.0.4");
    c.copy_ca_key_from(&a);
    d.join(&c);
    let took = eventually(30, "a learns about d", || {
        members(&a).contains(&"d".to_string())
    });
    eprintln!("membership change reached the far member in {took:?}");
    // c is cut off (stopped); meanwhile e joins through a. When c returns, it catches up.
    c.stop();
    let e = Host::start_at(t.path(), "e", "127.0.0.5");
    e.join(&a);
    eventually(30, "b learns about e", || {
        members(&b).contains(&"e".to_string())
    });
    assert!(!c.root.join("nothing").exists());
    c.start_again();
    eventually(30, "c catches up with e", || {
        members(&c).contains(&"e".to_string())
    });
    c.ok(&["--timeout", "30", "wait-cluster"]);
    assert_eq!(members(&c), ["a", "b", "c", "d", "e"]);
}

#[test]
fn dead_member_shows_not_alive_and_can_be_deleted() {
    let t = tmp();
    let (a, mut b, c) = three(t.path());
    b.kill9();
    eventually(30, "b reported not alive on a", || {
        let v: serde_json::Value =
            serde_json::from_str(&a.ok(&["--json", "--window", "2", "view", "all"])).unwrap();
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["host"] == "b" && m["alive"] == false && m["connected"] == false)
    });
    let text = a.ok(&["--window", "2", "view", "all"]);
    assert!(
        text.contains("host b at") && text.contains("NOT ALIVE"),
        "{text}"
    );
    let err = a.refused(&["--timeout", "2", "wait-cluster"]);
    assert!(err.contains("no answer") && err.contains('b'), "{err}");
    // Dead as `view --window 2` shows it: deleted without --force.
    a.ok(&["--window", "2", "lowlevel-delete-host", "b"]);
    eventually(30, "c forgets b", || {
        !members(&c).contains(&"b".to_string())
    });
    assert_eq!(members(&a), ["a", "c"]);
    a.ok(&["--timeout", "30", "wait-cluster"]);
    assert!(a
        .refused(&["lowlevel-delete-host", "b"])
        .contains("not a member"));
    assert!(a
        .refused(&["lowlevel-delete-host", "a"])
        .contains("leave-cluster"));
    // Deleting b revoked its certificate: when b comes back it is refused, and logged.
    b.start_again();
    eventually(30, "a refuses the deleted b", || {
        a.log_text().contains("refused peer b at ")
            && a.log_text().contains("host b is not a member")
    });
    assert_eq!(members(&a), ["a", "c"]);
}

#[test]
fn leave_cluster_is_refused_with_resources_and_propagates_otherwise() {
    let t = tmp();
    let (a, b, c) = three(t.path());
    a.create_resource("vm1", 8 << 20);
    assert!(a
        .refused(&["leave-cluster"])
        .contains("still holds resources"));
    c.ok(&["leave-cluster"]);
    eventually(30, "a and b forget c", || {
        !members(&a).contains(&"c".to_string()) && !members(&b).contains(&"c".to_string())
    });
    assert!(c.ok(&["view", "all"]).contains("not in a cluster"));
    // c can join again afterwards.
    c.join(&b);
    eventually(30, "a sees c again", || {
        members(&a).contains(&"c".to_string())
    });
}

#[test]
fn wrong_joins_and_foreign_peers_are_refused() {
    let t = tmp();
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    let lonely = Host::start_at(t.path(), "lonely", "127.0.0.2");
    // Without a token: the command says where to get one.
    assert!(lonely
        .refused(&["join-cluster", &a.peer_addr])
        .contains("marsadm join-token"));
    assert!(lonely
        .refused(&["join-cluster", &a.peer_addr, "--token", "nonsense"])
        .contains("not a join token"));
    // Nobody to join yet (a host in no cluster has no certificate: it ends the handshake).
    assert!(a.refused(&["join-token"]).contains("not in a cluster"));
    let other_ca = Host::start_at(t.path(), "issuer", "127.0.0.5");
    other_ca.ok(&["create-cluster"]);
    let foreign_token = other_ca.join_token();
    let err = lonely.refused(&["join-cluster", &a.peer_addr, "--token", &foreign_token]);
    assert!(err.contains("in no cluster"), "{err}");
    assert!(a.refused(&["wait-cluster"]).contains("not in a cluster"));
    a.ok(&["create-cluster"]);
    // A token of another cluster: its pin does not match a's CA; nothing is sent to a.
    let err = lonely.refused(&["join-cluster", &a.peer_addr, "--token", &foreign_token]);
    assert!(err.contains("does not match the token's pin"), "{err}");
    // Unreachable peer: a clear error.
    let token = a.join_token();
    let err = lonely.refused(&["join-cluster", "127.0.0.9:1", "--token", &token]);
    assert!(err.contains("127.0.0.9:1"), "{err}");
    // The token was not spent on the unreachable host; it works once.
    lonely.ok(&["join-cluster", &a.peer_addr, "--token", &token]);
    assert!(lonely
        .refused(&["join-cluster", &a.peer_addr])
        .contains("already belongs"));
    // A second host with a name already in the cluster: no certificate for it.
    let twin = Host::start_at(t.path().join("twin").as_path(), "lonely", "127.0.0.3");
    let fresh = a.join_token();
    assert!(twin
        .refused(&["join-cluster", &a.peer_addr, "--token", &fresh])
        .contains("already a member"));
    // A used token, and a wrong secret, are refused by a and logged there.
    let twin2 = Host::start_at(t.path().join("twin2").as_path(), "twin2", "127.0.0.3");
    let err = twin2.refused(&["join-cluster", &a.peer_addr, "--token", &token]);
    assert!(err.contains("unknown here or was used already"), "{err}");
    let mut forged = fresh.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let err = twin2.refused(&["join-cluster", &a.peer_addr, "--token", &forged]);
    assert!(err.contains("unknown here or was used already"), "{err}");
    eventually(10, "refused joins logged", || {
        a.log_text().contains("refused join of twin2")
    });
    // An expired token.
    let short = a.ok(&["join-token", "--ttl", "1s"]).trim().to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let err = twin2.refused(&["join-cluster", &a.peer_addr, "--token", &short]);
    assert!(err.contains("expired"), "{err}");
    // The fresh token still works after the wrong guess.
    twin2.ok(&["join-cluster", &a.peer_addr, "--token", &fresh]);
    // A host of another cluster (its own CA) connecting to a with its certificate: refused
    // in the TLS handshake, logged with its address. (It cannot make its daemon pull from a
    // by writing a's address: a's membership key is a's alone.)
    let other = Host::start_at(t.path(), "other", "127.0.0.4");
    other.ok(&["create-cluster"]);
    let err = other.refused(&["set-link", "ips/ip-a", &a.peer_addr]);
    assert!(err.contains("owned by host a"), "{err}");
    let tls = mars_tls::PeerTls::new(&other.credentials()).unwrap();
    assert!(
        mars_testkit::impostor::handshake_refused(&a.peer_addr, tls.client.clone()),
        "a accepted a foreign certificate, or sent something of the cluster"
    );
    eventually(20, "a logs the refused handshake", || {
        a.log_text().contains("refused peer at 127.0.0.1") && a.log_text().contains("TLS handshake")
    });
    let foreign_id = other.view_json()["cluster"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    // A plaintext hello (a daemon with --insecure, or anyone without TLS): refused with the
    // reason and nothing about the cluster, and logged.
    let mut s = TcpStream::connect(&a.peer_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = mars_wire::Hello::new(
        mars_wire::StreamKind::Meta,
        mars_wire::ClusterId::parse(&foreign_id).unwrap(),
        mars_config::HostName::new("other").unwrap(),
    );
    s.write_all(&hello.encode()).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let (theirs, n) = mars_wire::Hello::decode(&got).unwrap().unwrap();
    assert_eq!(theirs.cluster, mars_wire::ClusterId::UNKNOWN);
    let (msg, _) = mars_wire::decode_frame(&got[n..]).unwrap().unwrap();
    match msg {
        mars_wire::Message::Refuse { reason, .. } => {
            assert!(reason.contains("TLS only"), "{reason}")
        }
        m => panic!("expected a refusal, got {m:?}"),
    }
    eventually(10, "refusal logged", || {
        a.log_text()
            .contains("refused a plaintext connection from 127.0.0.1")
    });
    // Garbage instead of a hello: the connection is dropped, the daemon lives on.
    let mut s = TcpStream::connect(&a.peer_addr).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut sink);
    a.ok(&["view", "all"]);
}

#[test]
fn a_setting_written_on_one_host_is_read_on_the_others_and_a_restarted_host_catches_up() {
    let t = tmp();
    let (a, b, mut c) = three(t.path());
    assert_eq!(b.ok(&["get-global-sync-limit-value"]).trim(), "0");
    a.ok(&["set-global-sync-limit-value", "3"]);
    let took = eventually(30, "b and c read the setting", || {
        b.ok(&["get-global-sync-limit-value"]).trim() == "3"
            && c.ok(&["get-global-sync-limit-value"]).trim() == "3"
    });
    // The goal is well under 2 s; tests do not fail on absolute times, so it is printed.
    eprintln!("setting reached both other hosts in {took:?}");
    // c is down while the setting changes twice; after its restart it has the newest value.
    c.stop();
    b.ok(&["set-global-sync-limit-value", "5"]);
    a.ok(&["set-global-sync-limit-value", "7"]);
    c.start_again();
    eventually(30, "c catches up", || {
        c.ok(&["get-global-sync-limit-value"]).trim() == "7"
    });
    eventually(30, "b agrees", || {
        b.ok(&["get-global-sync-limit-value"]).trim() == "7"
    });
    assert!(a
        .refused(&["set-link", "bad key", "x"])
        .contains("invalid metadata key"));
    assert!(a
        .refused(&["set-link", "alive-b", "x"])
        .contains("owned by host b"));
}

#[test]
fn a_host_started_with_another_clusters_id_is_refused_and_says_so() {
    let t = tmp();
    let (a, _b, mut c) = three(t.path());
    c.stop();
    // c's identity is changed to another cluster (a misconfigured or restored host).
    let file = c.root.join("cluster.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let uuid = a.view_json()["cluster"]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(
        &file,
        text.replace(&uuid, "00000000-1111-2222-3333-444444444444"),
    )
    .unwrap();
    c.start_again();
    eventually(30, "a logs the refusal", || {
        a.log_text().contains("refused peer c") && a.log_text().contains("belongs to cluster")
    });
    eventually(30, "c says why", || {
        c.member_error_contains("belongs to cluster")
    });
    let err = c.refused(&["--timeout", "2", "wait-cluster"]);
    assert!(err.contains("belongs to cluster"), "{err}");
}
