//! MARS's command lines against real `marsd` processes: the commands and argument forms
//! `marsadm` takes from MARS (docs/mars-compatibility.md), with their effect checked.

use mars_testkit::repl::{eventually, first_difference, join, tmp, wait_uptodate, write_random};
use mars_testkit::Host;

const SIZE: u64 = 8 << 20;

fn two(t: &std::path::Path) -> (Host, Host) {
    let a = Host::start_at(t, "a", "127.0.0.1");
    let b = Host::start_at(t, "b", "127.0.0.2");
    a.ok(&["create-cluster"]);
    b.join(&a);
    for h in [&a, &b] {
        // MARS's name of wait-cluster.
        h.ok(&["--timeout=30", "wait-connect"]);
    }
    (a, b)
}

fn address_of(h: &Host, host: &str) -> String {
    h.ok(&["lowlevel-ls-host-ips"])
        .lines()
        .find_map(|l| {
            let (n, a) = l.split_once(' ')?;
            (n == host).then(|| a.trim().to_string())
        })
        .unwrap_or_default()
}

fn exit_code(h: &Host, args: &[&str]) -> i32 {
    h.marsadm(args).status.code().unwrap_or(-1)
}

#[test]
fn lowlevel_set_host_ip_changes_where_peers_connect() {
    let t = tmp();
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    // b listens on every address, so that another one of this machine reaches it too.
    let b = Host::start_at(t.path(), "b", "0.0.0.0");
    let port = b.peer_addr.rsplit_once(':').unwrap().1.to_string();
    let right = format!("127.0.0.2:{port}");
    a.ok(&["create-cluster"]);
    let token = a.join_token();
    b.ok(&[
        "join-cluster",
        &a.peer_addr,
        "--token",
        &token,
        "--ip",
        &right,
    ]);
    for h in [&a, &b] {
        // MARS's name of wait-cluster.
        h.ok(&["--timeout=30", "wait-connect"]);
    }
    assert_eq!(address_of(&a, "b"), right);
    // Only b may change its address.
    assert!(a
        .refused(&["lowlevel-set-host-ip", "b", "127.0.0.9"])
        .contains("run this on b"));
    // An address nothing answers at would cut b off: refused, nothing changed.
    let msg = b.refused(&["lowlevel-set-host-ip", "b", "127.0.0.9:1"]);
    assert!(msg.contains("nothing answers at 127.0.0.9:1"), "{msg}");
    assert_eq!(address_of(&b, "b"), right);
    // Another address of b: published, a reaches b there.
    let other = format!("127.0.0.9:{port}");
    b.ok(&["lowlevel-set-host-ip", "b", &other]);
    eventually(20, "a sees b's new address", || {
        address_of(&a, "b") == other
    });
    assert_eq!(address_of(&b, "b"), other);
    a.ok(&["--timeout=30", "wait-cluster"]);
    // MARS's --ip-HOST=IP form puts the first one back.
    b.ok(&[&format!("--ip-b={right}"), "lowlevel-set-host-ip", "b"]);
    eventually(20, "b's address back everywhere", || {
        address_of(&a, "b") == right && address_of(&b, "b") == right
    });
    a.ok(&["--timeout=30", "wait-cluster"]);
    // Refusals change nothing.
    assert_eq!(
        exit_code(&a, &["lowlevel-set-host-ip", "zz", "127.0.0.5"]),
        3
    );
    assert_eq!(exit_code(&b, &["lowlevel-set-host-ip", "b", "a:b"]), 2);
    assert_eq!(exit_code(&b, &["lowlevel-set-host-ip", "b"]), 2);
    assert_eq!(address_of(&a, "b"), right);
}

#[test]
fn site_failover_as_in_mars_disconnect_all_then_primary_force_all() {
    let t = tmp();
    let (a, b) = two(t.path());
    // Two resources with a primary on a, both replicated to b.
    a.create_resource("r1", SIZE);
    a.create_resource("r2", SIZE);
    for r in ["r1", "r2"] {
        join(&b, r, SIZE);
    }
    for r in ["r1", "r2"] {
        wait_uptodate(&b, r, 60);
    }
    // The primary site goes away.
    let mut a = a;
    a.kill9();
    b.ok(&["disconnect", "all"]);
    for r in ["r1", "r2"] {
        b.ok(&["--timeout=10", "wait-resource", r, "is-fetch-off"]);
    }
    b.ok(&["--timeout=60", "primary", "--force", "all"]);
    for r in ["r1", "r2"] {
        b.ok(&["--timeout=30", "wait-resource", r, "is-primary"]);
        // MARS's `ForcedPrimary` while the dead a still counts as acting (its last report,
        // until it is silent for a few seconds), then `Primary`.
        eventually(30, "b's role Primary once a counts as gone", || {
            b.view("role", r) == "Primary"
        });
    }
}

#[test]
fn mars_commands_on_one_resource() {
    let t = tmp();
    let (a, b) = two(t.path());
    let disk = a.root.parent().unwrap().join("r.img");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
    // MARS's create-resource RES DEV DEVNAME; another device name is refused first.
    assert_eq!(
        exit_code(
            &a,
            &["create-resource", "r", disk.to_str().unwrap(), "other"]
        ),
        2
    );
    a.ok(&["create-resource", "r", disk.to_str().unwrap(), "r"]);
    // b learns of r and checks it (MARS: activate-guest between create- and join-resource).
    eventually(20, "r known on b", || {
        b.marsadm(&["activate-guest", "r"]).status.success()
    });
    b.ok(&["deactivate-guest", "r"]);
    assert_eq!(exit_code(&a, &["deactivate-guest", "r"]), 3);
    b.ok(&["update-cluster", "r"]);
    b.ok(&["--timeout=30", "wait-cluster", "r"]);
    assert_eq!(exit_code(&b, &["wait-cluster", "nosuch"]), 3);
    // wait-resource in MARS's forms.
    a.ok(&["--timeout=10", "wait-resource", "r", "is-primary"]);
    a.ok(&["--timeout=10", "wait-resource", "r", "todo-attach-1"]);
    assert_eq!(
        exit_code(&a, &["--timeout=1", "wait-resource", "r", "is-secondary"]),
        4
    );
    // Nobody uses the device: wait-umount returns at once.
    assert!(a.ok(&["wait-umount", "r"]).contains("not in use"));
    assert!(a.ok(&["err-purge-all", "r"]).starts_with("r: "));
    assert!(a.ok(&["link-purge-all", "r"]).contains("nothing to purge"));
    // The cluster-wide feature settings are stored where MARS keeps them.
    a.ok(&[
        "set-global-enabled-log-compressions",
        "COMPRESS_LZ4|COMPRESS_ZLIB",
    ]);
    a.ok(&["set-global-disabled-net-digests", "CHKSUM_MD5"]);
    assert_eq!(
        exit_code(&a, &["set-global-enabled-net-compressions", "lz4"]),
        2
    );
    eventually(20, "the settings reach b", || {
        b.marsadm(&["get-link", "defaults/enabled-log-compressions"])
            .stdout
            .starts_with(b"COMPRESS_LZ4|COMPRESS_ZLIB")
            && b.marsadm(&["get-link", "defaults/disabled-net-digests"])
                .stdout
                .starts_with(b"CHKSUM_MD5")
    });
    // DRBD words as MARS answers them; --host of another host refused.
    assert!(a.ok(&["adjust", "r"]).contains("ignoring command 'adjust'"));
    assert!(a
        .refused(&["verify", "r"])
        .contains("cannot be used with MARS"));
    assert_eq!(exit_code(&a, &["invalidate-remote", "r"]), 3);
    a.ok(&["--host=a", "view-role", "r"]);
    assert!(a
        .refused(&["--host=b", "pause-fetch", "r"])
        .contains("own host a only"));
    // MARS's spellings of options.
    a.ok(&[
        "-v",
        "--verbose=2",
        "--window=60",
        "--no-ssh",
        "--timeout=-1",
        "view",
        "all",
    ]);
    a.ok(&["-d", "pause-replay", "r"]);
}

/// MARS's `*-global` commands: one host switches every member of the resource (each member
/// applies the request to its own switch); a later `-local` change wins until the next
/// request; a member that is down applies the request when it is back.
#[test]
fn global_switch_commands_switch_every_member() {
    let t = tmp();
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    let mut c = Host::start_at(t.path(), "c", "127.0.0.3");
    a.ok(&["create-cluster"]);
    b.join(&a);
    c.join(&a);
    for h in [&a, &b, &c] {
        h.ok(&["--timeout=30", "wait-cluster"]);
    }
    a.create_resource("r1", SIZE);
    a.create_resource("r2", SIZE);
    for r in ["r1", "r2"] {
        join(&b, r, SIZE);
        join(&c, r, SIZE);
    }
    for r in ["r1", "r2"] {
        for h in [&b, &c] {
            h.ok(&["--timeout=30", "update-cluster"]);
            eventually(30, "members known", || h.view("todo-fetch", r) == "1");
        }
    }
    let todo = |h: &Host, sw: &str, r: &str| h.view(&format!("todo-{sw}"), r);

    // A dry run says what it would do and changes nothing.
    let out = a.ok(&["--dry-run", "pause-replay-global", "r1"]);
    assert!(
        out.contains("would set resource-r1/request/replay"),
        "{out}"
    );
    assert_eq!(todo(&b, "replay", "r1"), "1");

    // pause-fetch-global on a pauses b and c (and a): answered once all applied it.
    let out = a.ok(&["--timeout=30", "pause-fetch-global", "r1"]);
    assert!(out.contains("fetch off on a, b, c"), "{out}");
    for h in [&a, &b, &c] {
        assert_eq!(todo(h, "fetch", "r1"), "0");
        assert_eq!(todo(h, "fetch", "r2"), "1", "only r1");
    }
    for h in [&b, &c] {
        h.ok(&["--timeout=10", "wait-resource", "r1", "is-fetch-off"]);
    }
    // A later local change on b wins (nothing applies the old request again) ...
    b.ok(&["resume-fetch-local", "r1"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(todo(&b, "fetch", "r1"), "1");
    assert_eq!(todo(&c, "fetch", "r1"), "0");
    // ... until the next request, here from c.
    let out = c.ok(&["--timeout=30", "resume-fetch-global", "r1"]);
    assert!(out.contains("fetch on on a, b, c"), "{out}");
    for h in [&a, &b, &c] {
        assert_eq!(todo(h, "fetch", "r1"), "1");
    }
    b.ok(&["--timeout=10", "wait-resource", "r1", "is-fetch-on"]);

    // MARS's site-wide spelling: every resource of this host.
    let out = b.ok(&["--timeout=30", "disconnect-global", "all"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    for r in ["r1", "r2"] {
        for h in [&a, &b, &c] {
            assert_eq!(todo(h, "fetch", r), "0", "{r}");
        }
    }
    let out = b.ok(&["--timeout=30", "connect-global", "r1,r2"]);
    assert_eq!(out.lines().count(), 2, "{out}");

    // A member down while requested: the reachable ones apply it at once, the answer names
    // the one that switches when it is back, and it does after its restart.
    c.kill9();
    let out = a.ok(&["--timeout=60", "pause-sync-global", "r2"]);
    assert!(out.contains("sync off on a, b"), "{out}");
    assert!(
        out.contains("not reachable now, switching when back: c"),
        "{out}"
    );
    assert_eq!(todo(&b, "sync", "r2"), "0");
    c.start_again();
    eventually(60, "c applies the request after its restart", || {
        c.marsadm(&["view-todo-sync", "r2"])
            .stdout
            .starts_with(b"0")
    });
    // And it stays applied once: a local change after it survives another restart.
    c.ok(&["resume-sync-local", "r2"]);
    c.restart();
    c.ok(&["--timeout=30", "wait-cluster"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(todo(&c, "sync", "r2"), "1");
    // The switches nobody may request globally are refused (there is no attach-global).
    assert!(!a.marsadm(&["attach-global", "r1"]).status.success());
}

/// `merge-cluster-list` prints MARS's listing; a merge without a token is refused (a usage
/// error), and a split of a one-host cluster has nothing to do; nothing changes.
#[test]
fn merge_cluster_list_the_refused_merge_and_nothing_to_split() {
    let t = tmp();
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    a.create_resource("r1", SIZE);
    a.create_resource("r2", SIZE);
    let uuid = a.view_json()["cluster"]["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    let out = a.ok(&["merge-cluster-list"]);
    let want = format!(
        "UUID: {uuid}\nIPs:\nips/ip-a {}\nRESOURCEs:\nresource-r1\nresource-r2\n",
        address_of(&a, "a")
    );
    assert_eq!(out, want);
    let j: serde_json::Value =
        serde_json::from_str(&a.ok(&["--json", "merge-cluster-list"])).expect("json");
    assert_eq!(j["resources"], serde_json::json!(["r1", "r2"]));
    // merge-cluster and merge-cluster-check are commands now (MARS's `HOST [IP]`), but only
    // with a join token of the other cluster: without one they are usage errors (exit 2).
    for args in [
        &["merge-cluster", "other", "127.0.0.9"][..],
        &["merge-cluster-check", "other"][..],
    ] {
        let msg = a.refused(args);
        assert!(msg.contains("needs a join token"), "{args:?}: {msg}");
        assert_eq!(exit_code(&a, args), 2, "{args:?}");
    }
    // split-cluster: one host, one group — nothing to split (exit 0, as MARS's "Nothing to
    // do"), with and without --dry-run. (Was a refusal before split-cluster computed groups;
    // the assertion changed because the behaviour did.)
    for args in [&["split-cluster"][..], &["--dry-run", "split-cluster"][..]] {
        let out = a.ok(args);
        assert!(out.contains("nothing to split"), "{args:?}: {out}");
        assert!(out.contains("#1: a resources r1,r2"), "{args:?}: {out}");
    }
    assert_eq!(a.ok(&["merge-cluster-list"]), want);
}

/// The names `merge-cluster-list` on `h` shows: members and resources.
fn listed(h: &Host) -> (Vec<String>, Vec<String>) {
    let out = h.ok(&["merge-cluster-list"]);
    let hosts = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix("ips/ip-")?
                .split(' ')
                .next()
                .map(String::from)
        })
        .collect();
    let res = out
        .lines()
        .filter_map(|l| l.strip_prefix("resource-").map(String::from))
        .collect();
    (hosts, res)
}

/// `split-cluster --dry-run` shows the two groups; a host without the CA key is refused. The
/// way by hand (docs/operations.md, "Merging and splitting clusters", for a group whose
/// data must move without `split-cluster`) moves a group of hosts — a and b, sharing r1 —
/// to a cluster of its own while c keeps r2 in the old one: r1's data is kept on its
/// primary's disk and synced to b again.
#[test]
fn a_group_moves_to_a_cluster_of_its_own_by_hand() {
    let t = tmp();
    let a = Host::start_at(t.path(), "a", "127.0.0.1");
    let b = Host::start_at(t.path(), "b", "127.0.0.2");
    let c = Host::start_at(t.path(), "c", "127.0.0.3");
    let disk_a = a.create_resource("r1", SIZE);
    b.join(&a);
    c.join(&a);
    let disk_b = join(&b, "r1", SIZE);
    c.create_resource("r2", SIZE);
    write_random(&a, "r1", t.path(), 0, 1 << 20);
    wait_uptodate(&b, "r1", 60);
    let old_id = c.cluster_id();
    // The groups, once a heard from every member (a holds the CA key: it made the cluster).
    eventually(20, "every member reachable from a", || {
        a.marsadm(&["--dry-run", "split-cluster"]).status.success()
    });
    let plan = a.ok(&["--dry-run", "split-cluster"]);
    assert!(
        plan.contains(&format!("#1: a,b resources r1 (keeps cluster {old_id}")),
        "{plan}"
    );
    assert!(
        plan.contains("#2: c resources r2 (a new cluster, certificates issued by c)"),
        "{plan}"
    );
    // b holds no CA key: refused, with the groups.
    let refused = b.refused(&["split-cluster"]);
    assert!(refused.contains("holds this cluster's CA key"), "{refused}");
    assert!(refused.contains("#2: c resources r2"), "{refused}");
    assert_eq!(exit_code(&b, &["split-cluster"]), 3);

    // The recipe: the secondary leaves, the primary deletes (disks untouched), both leave
    // the cluster; a makes a new one on the same disk, b joins it and r1 again.
    b.ok(&["down", "r1"]);
    b.ok(&["leave-resource", "r1"]);
    let kept = std::fs::read(&disk_a).expect("a's disk");
    a.ok(&["down", "r1"]);
    // Refused until b's departure reached a (a second or two).
    eventually(20, "r1 deleted on a", || {
        a.marsadm(&["delete-resource", "r1"]).status.success()
    });
    for h in [&b, &a] {
        h.ok(&["leave-cluster"]);
    }
    a.ok(&["create-cluster"]);
    a.ok(&["create-resource", "r1", disk_a.to_str().expect("utf8")]);
    assert_eq!(
        std::fs::read(&disk_a).expect("a's disk"),
        kept,
        "r1's data kept"
    );
    b.join(&a);
    eventually(20, "r1 visible on b", || {
        b.marsadm(&["join-resource", "r1", disk_b.to_str().expect("utf8")])
            .status
            .success()
    });
    write_random(&a, "r1", t.path(), 2 << 20, 1 << 20);
    wait_uptodate(&b, "r1", 60);
    assert_eq!(first_difference(&disk_a, &disk_b, SIZE), None);

    // Two clusters: each lists its own members and resources only.
    assert_ne!(a.cluster_id(), old_id);
    assert_eq!(b.cluster_id(), a.cluster_id());
    assert_eq!(c.cluster_id(), old_id);
    let ab = (
        vec!["a".to_string(), "b".to_string()],
        vec!["r1".to_string()],
    );
    eventually(20, "a and b list their cluster only", || {
        listed(&a) == ab && listed(&b) == ab
    });
    let want_c = (vec!["c".to_string()], vec!["r2".to_string()]);
    eventually(20, "c lists its cluster only", || listed(&c) == want_c);
}
