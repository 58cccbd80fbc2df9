//! Safety rails end to end (issue 16, item 7): `--dry-run` of every command that changes
//! something leaves the metadata, the root directories and the disks as they were, says what
//! would happen, and refuses exactly as the real command does; `primary --force` past a
//! reachable old primary that is ahead needs a confirmation (`--force --force`); deleting a
//! live member needs `--force`. Real `marsd` on 127.0.0.1–2, file-backed disks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mars_testkit::repl::{eventually, join, tmp, wait_uptodate, write_random};
use mars_testkit::Host;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Two hosts: a creates `r` and writes 4 MiB, b joins and catches up.
fn two(t: &Path) -> (Host, Host, PathBuf, PathBuf) {
    let a = Host::start_at(t, "a", "127.0.0.1");
    let b = Host::start_at(t, "b", "127.0.0.2");
    let da = a.create_resource("r", SIZE);
    b.join(&a);
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    write_random(&a, "r", t, 0, 4 << 20);
    let db = join(&b, "r", SIZE);
    wait_uptodate(&b, "r", 60);
    (a, b, da, db)
}

/// Keys that change by themselves, without any command: members' liveness stamps and their
/// reports (positions, rates, the primary's confirmation).
fn volatile(key: &str) -> bool {
    key.starts_with("alive-") || key.contains("/actual-")
}

/// Everything a command could change on a host: every replicated key (but the volatile ones),
/// and every file under its root with its size and mtime (but the metadata store itself and
/// the peers' read positions, which the liveness stamps rewrite, and the sockets).
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    keys: BTreeMap<String, String>,
    files: BTreeMap<PathBuf, (u64, std::time::SystemTime)>,
}

fn snapshot(h: &Host) -> Snapshot {
    let keys = h
        .ok(&["lowlevel-get-links"])
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| !volatile(k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut files = BTreeMap::new();
    walk(&h.root, &h.root, &mut files);
    Snapshot { keys, files }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u64, std::time::SystemTime)>) {
    for e in std::fs::read_dir(dir).expect("read root").flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let rel = p.strip_prefix(root).expect("under root").to_path_buf();
        let name = rel.to_string_lossy();
        // peers-seen.toml records how far each peer's changes were read, and every peer's
        // liveness entry is a change every 2 s: volatile like the store.
        if name.starts_with("meta") || name.ends_with(".sock") || name == "peers-seen.toml" {
            continue;
        }
        if m.is_dir() {
            walk(root, &p, out);
        }
        out.insert(rel, (m.len(), m.modified().expect("mtime")));
    }
}

fn digest(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).expect("disk").hash(&mut h);
    h.finish()
}

/// Asserts that the dry run of `args` (on `h`) and the real command give the same refusal:
/// the same line on stderr and the same exit status.
fn same_refusal(h: &Host, args: &[&str]) -> String {
    let mut dry = vec!["--dry-run"];
    dry.extend_from_slice(args);
    let d = h.marsadm(&dry);
    let r = h.marsadm(args);
    let (de, re) = (
        String::from_utf8_lossy(&d.stderr).to_string(),
        String::from_utf8_lossy(&r.stderr).to_string(),
    );
    assert!(!d.status.success(), "dry run of {args:?} was not refused");
    assert_eq!(d.status.code(), r.status.code(), "{args:?}: {de} / {re}");
    assert_eq!(
        de, re,
        "{args:?}: the dry run's refusal differs from the real one"
    );
    de
}

/// Runs `args` with --dry-run on `h`: succeeds and says "would".
fn would(h: &Host, args: &[&str]) -> String {
    let mut dry = vec!["--dry-run"];
    dry.extend_from_slice(args);
    let out = h.ok(&dry);
    assert!(out.contains("would"), "{args:?}: {out}");
    out
}

#[test]
fn dry_run_of_every_command_changes_nothing_and_says_what_it_would_do() {
    let t = tmp();
    let (a, b, da, db) = two(t.path());
    // A third daemon, in no cluster yet: join-cluster's dry run must not use the token up.
    let c = Host::start_at(t.path(), "c", "127.0.0.3");
    // Quiet: the writes are replicated and written back, the reports settled.
    std::thread::sleep(Duration::from_secs(2));
    let before = (
        snapshot(&a),
        snapshot(&b),
        snapshot(&c),
        digest(&da),
        digest(&db),
    );
    let token = a.join_token();
    let before_token = (snapshot(&a), snapshot(&c));
    let sda = da.to_str().unwrap();
    let new_disk = t.path().join("r2.img");
    std::fs::File::create(&new_disk)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let nd = new_disk.to_str().unwrap();

    let mut said = Vec::new();
    // The secondary's resource commands.
    for args in [
        &["attach", "r"][..],
        &["detach", "r"],
        &["pause-fetch", "r"],
        &["disconnect", "r"],
        &["resume-fetch", "r"],
        &["pause-replay", "r"],
        &["resume-replay", "r"],
        &["pause-sync", "r"],
        &["resume-sync", "r"],
        &["up", "r"],
        &["down", "r"],
        &["invalidate", "r"],
        &["log-purge-all", "r"],
        &["primary", "r"],
        &["secondary", "r"],
        &["set-emergency-limit", "r", "50"],
        &["set-systemd-unit", "r", ""],
        &["--force", "leave-resource", "r"],
        &["--force", "delete-resource", "r"],
        &["fake-sync", "r"],
        &["cron"],
        &["systemd-trigger"],
        &["pause-fetch", "all"],
        &["pause-replay", "r,r"],
    ] {
        said.push(would(&b, args));
    }
    // The primary's and the cluster's.
    for args in [
        &["log-rotate", "r"][..],
        &["cron"],
        &["primary", "r"],
        &["--force", "primary", "r"],
        &["create-resource", "r2", nd],
        &["join-token"],
        &["renew-certificate"],
        &["rotate-ca", "start"],
        &["--force", "lowlevel-delete-host", "b"],
        &["set-global-sync-limit-value", "3"],
        &["set-global-unreachable-limit-value", "100"],
        &["set-link", "defaults/x", "1"],
        &["--force", "delete-resource", "r"],
    ] {
        said.push(would(&a, args));
    }
    said.push(would(
        &c,
        &["join-cluster", &a.peer_addr, "--token", &token],
    ));
    said.push(would(&c, &["create-cluster"]));
    let all = said.join("\n");
    eprintln!("{all}");
    // What it says is what the real command does.
    for want in [
        "set resource-r/todo-b/fetch = 0",
        "would make b the primary of r: planned handover from a",
        "delete every local log copy",
        "would set resource-r/primary = (none)",
        "close the current logfile and start a new one",
        "would create resource r2",
        "would issue a one-time join token",
        "would remove host b from the cluster",
        "would set defaults/sync-limit = 3",
        "would contact",
    ] {
        assert!(all.contains(want), "no {want:?} in:\n{all}");
    }
    // Refusals in dry-run mode are the real ones, with the real exit status.
    for (h, args, why) in [
        (&b, &["--force", "primary", "r"][..], "pause fetching first"),
        (&b, &["log-rotate", "r"], "runs on its primary"),
        (&b, &["leave-resource", "r"], "still attached"),
        (&b, &["resize", "r"], "resize runs on the primary"),
        (&b, &["join-resource", "r", sda], "already a member"),
        (&b, &["set-systemd-want", "r", "b"], "no systemd stack"),
        (&a, &["delete-resource", "r"], "other members"),
        (&a, &["resize", "r", "64M"], "has only"),
        (&a, &["lowlevel-delete-host", "b"], "is alive"),
        (&a, &["rotate-ca", "finish"], "no CA rotation was started"),
        (&a, &["leave-cluster"], "still holds resources"),
        (&a, &["create-cluster"], "already belongs"),
        (
            &a,
            &["join-cluster", &b.peer_addr, "--token", &token],
            "already belongs",
        ),
        (
            &c,
            &["set-global-sync-limit-value", "3"],
            "not in a cluster",
        ),
        (&c, &["attach", "r"], "does not exist"),
    ] {
        let e = same_refusal(h, args);
        assert!(e.contains(why), "{args:?}: {e}");
    }
    // Nothing changed: no key, no file (name, size, mtime), no disk byte; the token is unused.
    let after = (
        snapshot(&a),
        snapshot(&b),
        snapshot(&c),
        digest(&da),
        digest(&db),
    );
    assert_eq!(after.0, before_token.0, "a changed");
    assert_eq!(after.1, before.1, "b changed");
    assert_eq!(after.2, before_token.1, "c changed");
    assert_eq!((after.3, after.4), (before.3, before.4), "a disk changed");
    assert!(!t.path().join("c/root/cluster.toml").exists() || after.2 == before.2);
    assert_eq!(
        std::fs::metadata(&new_disk).unwrap().len(),
        SIZE,
        "create-resource's disk untouched"
    );
    assert!(
        !a.root.join("resource-r2").exists(),
        "no directory for the dry-run resource"
    );
    // The real commands do what the dry runs said: the token still works.
    c.ok(&["join-cluster", &a.peer_addr, "--token", &token]);
    b.ok(&["pause-fetch", "r"]);
    assert_eq!(b.ok(&["get-link", "resource-r/todo-b/fetch"]).trim(), "0");
}

/// MARS's advice before a forced switch: the old primary still runs and holds writes this
/// replica has not replayed. Refused with what would be lost and nothing changed; the dry run
/// says the same; `--force --force` goes ahead (and the split brain follows).
#[test]
fn forced_switch_past_a_reachable_ahead_primary_needs_force_twice() {
    let t = tmp();
    let (a, b, _da, _db) = two(t.path());
    b.ok(&["pause-fetch", "r"]);
    // a writes 2 MiB that b does not fetch.
    write_random(&a, "r", t.path(), 8 * MIB, 2 << 20);
    // Until a's report with its new log end reaches b, b does not know: ask with a dry run
    // (the real command would go ahead then).
    eventually(20, "b knows a is ahead", || {
        let o = b.marsadm(&["--dry-run", "--force", "primary", "r"]);
        String::from_utf8_lossy(&o.stderr).contains("SPLIT BRAIN")
    });
    let before = snapshot(&b);
    let msg = b.refused(&["--force", "primary", "r"]);
    assert!(msg.contains("a is reachable"), "{msg}");
    assert!(msg.contains("MiB") && msg.contains("bytes"), "{msg}");
    assert!(msg.contains("--force --force"), "{msg}");
    let o = b.marsadm(&["--force", "primary", "r"]);
    assert_ne!(o.status.code(), Some(0));
    let same = same_refusal(&b, &["--force", "primary", "r"]);
    assert!(same.contains("SPLIT BRAIN"));
    // With --json the refusal's kind says what is missing.
    let j = b.marsadm(&["--json", "--force", "primary", "r"]);
    assert!(
        String::from_utf8_lossy(&j.stdout).contains("needs-confirmation"),
        "{}",
        String::from_utf8_lossy(&j.stdout)
    );
    // On a terminal marsadm asks; a wrong answer changes nothing either.
    let cmd = format!(
        "{} --root {} --force primary r",
        mars_testkit::bin("marsadm").display(),
        b.root.display()
    );
    let o = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(b"no\n")?;
            c.wait_with_output()
        })
        .expect("script");
    let shown = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!o.status.success(), "{shown}");
    assert!(
        shown.contains("WARNING") && shown.contains("Type the resource name (r)"),
        "{shown}"
    );
    assert!(shown.contains("not confirmed"), "{shown}");
    // Nothing changed.
    assert_eq!(snapshot(&b), before);
    assert_eq!(b.view("primarynode", "r"), "a");
    assert!(!b.root.join("resource-r/force-primary").exists());
    // A confirmed dry run says what would be lost, and changes nothing either.
    let out = would(&b, &["primary", "--force", "--force", "r"]);
    assert!(
        out.contains("by force") && out.contains("SPLIT BRAIN"),
        "{out}"
    );
    assert_eq!(snapshot(&b), before);
    // Confirmed, it goes ahead.
    let out = b.ok(&["--timeout", "30", "primary", "--force", "--force", "r"]);
    assert!(out.contains("primary now (forced)"), "{out}");
    assert_eq!(b.view("primarynode", "r"), "b");
}

/// `lowlevel-delete-host` of a live member is refused with how long ago it was heard from;
/// with `--force` it is cut off; `join-cluster --force` with a token brings it back with its
/// resources, and replication goes on.
#[test]
fn a_deleted_live_member_is_refused_then_joins_again_with_its_resources() {
    let t = tmp();
    let (a, b, _da, _db) = two(t.path());
    let msg = a.refused(&["lowlevel-delete-host", "b"]);
    assert!(
        msg.contains("is alive") && msg.contains("heard from") && msg.contains("--force"),
        "{msg}"
    );
    assert!(a.ok(&["lowlevel-ls-host-ips"]).contains("b "));
    a.ok(&["--force", "lowlevel-delete-host", "b"]);
    eventually(30, "a refuses the deleted b", || {
        a.log_text().contains("refused peer b at ")
    });
    // b cannot join as a new host (it is in the cluster), but joins again with --force.
    let token = a.join_token();
    let msg = b.refused(&["join-cluster", &a.peer_addr, "--token", &token]);
    assert!(msg.contains("join-cluster --force"), "{msg}");
    let out = b.ok(&["--force", "join-cluster", &a.peer_addr, "--token", &token]);
    assert!(out.contains("join"), "{out}");
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    assert!(a.ok(&["lowlevel-ls-host-ips"]).contains("b "));
    // Its resource replicates again.
    write_random(&a, "r", t.path(), 8 * MIB, 1 << 20);
    wait_uptodate(&b, "r", 60);
    // A member that was not deleted has nothing to join again: the member refuses it.
    let token = a.join_token();
    let msg = b.refused(&["--force", "join-cluster", &a.peer_addr, "--token", &token]);
    assert!(msg.contains("already a member"), "{msg}");
    b.ok(&["--timeout", "30", "wait-cluster"]);
}
