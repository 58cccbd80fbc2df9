//! Replication end to end: three real `marsd` on 127.0.0.1/2/3 with file-backed disks, driven
//! only through `marsadm` and real NBD clients; replicas compared byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mars_testkit::repl::{
    eventually, fill_random, first_difference, join, logfiles, new_disk, tmp, wait_uptodate,
    write_random,
};
use mars_testkit::{random_file, Host};

struct Cluster {
    a: Host,
    b: Host,
    c: Host,
}

/// Three hosts in one cluster; `a` creates resource `r` of `size` bytes.
fn cluster(t: &Path, size: u64) -> (Cluster, PathBuf) {
    let a = Host::start_at(t, "a", "127.0.0.1");
    let b = Host::start_at(t, "b", "127.0.0.2");
    let c = Host::start_at(t, "c", "127.0.0.3");
    let disk = a.create_resource("r", size);
    b.join(&a);
    c.join(&a);
    for h in [&a, &b, &c] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    (Cluster { a, b, c }, disk)
}

#[test]
fn join_sync_fetch_replay_converge() {
    let t = tmp();
    let size = 64 << 20;
    let (cl, da) = cluster(t.path(), size);
    write_random(&cl.a, "r", t.path(), 0, 8 << 20);
    let db = join(&cl.b, "r", size);
    let dc = join(&cl.c, "r", size);
    // Writes while the replicas sync.
    for i in 0..8u64 {
        write_random(&cl.a, "r", t.path(), (i * 7 + 3) << 20, 1 << 20);
    }
    cl.a.ok(&["log-rotate", "r"]);
    // One request of the largest record size (32 MiB payload): it must travel in one frame.
    write_random(&cl.a, "r", t.path(), 16 << 20, 32 << 20);
    write_random(&cl.a, "r", t.path(), 40 << 20, 2 << 20);
    for h in [&cl.b, &cl.c] {
        wait_uptodate(h, "r", 60);
    }
    cl.a.ok(&["--timeout", "10", "wait-resource", "r", "uptodate"]);
    // The primary's disk may lag its log: compare after writeback.
    eventually(20, "written back", || {
        cl.a.view("diskstate", "r") == "UpToDate"
    });
    for (h, d) in [(&cl.b, &db), (&cl.c, &dc)] {
        assert_eq!(
            first_difference(&da, d, size),
            None,
            "{} differs from a",
            h.name
        );
        assert_eq!(h.view("replstate", "r"), "Replaying");
        assert_eq!(h.view("flags", "r"), "dCASFR");
        assert_eq!(h.view("role", "r"), "Secondary");
        assert_eq!(h.view("primarynode", "r"), "a");
    }
    let v = cl.a.ok(&["view", "r"]);
    assert!(
        v.contains("r [3/3] UpToDate Replicating DCASFR Primary a"),
        "{v}"
    );
}

/// Runs `cron` on every host until each keeps at most one logfile (the one in use).
fn logs_reclaimed_everywhere(hosts: &[&Host]) {
    let start = Instant::now();
    loop {
        let left: Vec<(String, Vec<String>)> = hosts
            .iter()
            .map(|h| {
                h.ok(&["cron"]);
                (h.name.clone(), logfiles(h, "r"))
            })
            .collect();
        if left.iter().all(|(_, l)| l.len() <= 1) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "old logfiles not deleted everywhere: {left:?}\n{}",
            hosts[0].ok(&["view", "r"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn one_gib_written_while_two_replicas_sync_with_rotation_and_cron() {
    let t = tmp();
    let size: u64 = 1 << 30;
    let (cl, da) = cluster(t.path(), size);
    let db = join(&cl.b, "r", size);
    let dc = join(&cl.c, "r", size);
    // Rotation and housekeeping while the writes and the syncs run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rot = {
        let (stop, root) = (stop.clone(), cl.a.root.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let adm = |args: &[&str]| {
                    Command::new(mars_testkit::bin("marsadm"))
                        .arg("--root")
                        .arg(&root)
                        .args(args)
                        .output()
                        .unwrap()
                };
                assert!(adm(&["log-rotate", "r"]).status.success());
                assert!(adm(&["cron"]).status.success());
                n += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            n
        })
    };
    fill_random(&cl.a, "r", t.path(), size as usize);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rotations = rot.join().unwrap();
    assert!(rotations > 0);
    for h in [&cl.b, &cl.c] {
        wait_uptodate(h, "r", 180);
    }
    eventually(60, "written back", || {
        cl.a.view("diskstate", "r") == "UpToDate"
    });
    for (h, d) in [(&cl.b, &db), (&cl.c, &dc)] {
        assert_eq!(
            first_difference(&da, d, size),
            None,
            "{} differs from a",
            h.name
        );
    }
    logs_reclaimed_everywhere(&[&cl.a, &cl.b, &cl.c]);
    println!("{rotations} rotations during the writes");
}

#[test]
fn lifecycle_refusals_change_nothing() {
    let t = tmp();
    let size = 16 << 20;
    let (cl, _da) = cluster(t.path(), size);
    // Too small a disk.
    let small = new_disk(&cl.b, "small", size / 2);
    eventually(20, "resource known on b", || {
        let o =
            cl.b.marsadm(&["join-resource", "r", small.to_str().unwrap()]);
        String::from_utf8_lossy(&o.stderr).contains("less than the size")
    });
    assert!(!cl.b.root.join("resource-r").exists());
    // Unknown resource, missing disk.
    let e =
        cl.b.refused(&["join-resource", "nosuch", small.to_str().unwrap()]);
    assert!(e.contains("does not exist"), "{e}");
    let e = cl.b.refused(&["join-resource", "r", "/nonexistent/disk"]);
    assert!(e.contains("/nonexistent/disk"), "{e}");
    // The name exists in the cluster: create-resource elsewhere is refused (once c knows it).
    eventually(20, "c knows r", || {
        cl.c.marsadm(&["get-link", "resource-r/size"])
            .status
            .success()
    });
    let other = new_disk(&cl.c, "r", size);
    let e =
        cl.c.refused(&["create-resource", "r", other.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
    let db = join(&cl.b, "r", size);
    let e = cl.b.refused(&["join-resource", "r", db.to_str().unwrap()]);
    assert!(e.contains("already a member"), "{e}");
    // The primary cannot leave; a secondary must be down first.
    let e = cl.a.refused(&["leave-resource", "r"]);
    assert!(e.contains("primary"), "{e}");
    let e = cl.b.refused(&["leave-resource", "r"]);
    assert!(e.contains("down"), "{e}");
    // Delete is refused while other members remain (once a has heard of b).
    eventually(20, "a knows b", || {
        cl.a.view_json()["resources"][0]["members"]
            .as_array()
            .unwrap()
            .len()
            == 2
    });
    let e = cl.a.refused(&["delete-resource", "r"]);
    assert!(e.contains("other members"), "{e}");
    // Resize only grows, and not beyond the smallest member disk.
    wait_uptodate(&cl.b, "r", 30);
    let e = cl.a.refused(&["resize", "r", "8M"]);
    assert!(e.contains("only grows"), "{e}");
    // (once a has b's report with its disk size: until then it says it must wait for it)
    eventually(20, "resize beyond b's disk refused for its size", || {
        cl.a.refused(&["resize", "r", "1G"]).contains("less than")
    });
    let e = cl.b.refused(&["resize", "r"]);
    assert!(e.contains("primary"), "{e}");
    // Invalidate and fake-sync are for secondaries.
    assert!(cl.a.refused(&["invalidate", "r"]).contains("secondary"));
    assert_eq!(cl.a.view("diskstate", "r"), "UpToDate");
    // Leaving properly: down, then leave; the others stop listing b.
    cl.b.ok(&["down", "r"]);
    cl.b.ok(&["leave-resource", "r"]);
    assert!(!cl.b.root.join("resource-r").exists());
    eventually(20, "a forgets b", || {
        cl.a.view_json()["resources"][0]["members"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    // Now a may delete it.
    cl.a.ok(&["delete-resource", "r"]);
    assert!(!cl.a.root.join("resource-r").exists());
}

#[test]
fn fast_full_sync_transfers_only_differing_chunks() {
    let t = tmp();
    let size: u64 = 256 << 20;
    let (cl, da) = cluster(t.path(), size);
    fill_random(&cl.a, "r", t.path(), size as usize);
    eventually(30, "written back", || {
        cl.a.view("diskstate", "r") == "UpToDate"
    });
    // b's disk: a's contents with 3 of its 256 chunks of 1 MiB different (~1%).
    let db = new_disk(&cl.b, "r", size);
    std::fs::copy(&da, &db).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        for i in 0..3u64 {
            f.write_all_at(&[0x5a; 4096], (i * 97 + 11) << 20).unwrap();
        }
    }
    cl.b.ok(&["join-resource", "r", db.to_str().unwrap()]);
    wait_uptodate(&cl.b, "r", 60);
    assert_eq!(first_difference(&da, &db, size), None);
    let log = cl.b.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("sync copy complete"))
        .expect("sync line");
    assert!(line.contains("(3.00 MiB transferred)"), "{line}");
    // And a fresh all-zero disk syncs correctly too.
    let dc = join(&cl.c, "r", size);
    wait_uptodate(&cl.c, "r", 60);
    assert_eq!(first_difference(&da, &dc, size), None);
}

#[test]
fn unreachable_member_stops_pinning_logs_and_needs_invalidate() {
    let t = tmp();
    let size: u64 = 32 << 20;
    let (mut cl, da) = cluster(t.path(), size);
    let db = join(&cl.b, "r", size);
    let dc = join(&cl.c, "r", size);
    wait_uptodate(&cl.b, "r", 30);
    wait_uptodate(&cl.c, "r", 30);
    cl.a.ok(&["set-global-unreachable-limit-value", "3"]);
    cl.c.stop();
    for i in 0..4u64 {
        write_random(&cl.a, "r", t.path(), i << 20, 1 << 20);
        cl.a.ok(&["log-rotate", "r"]);
    }
    wait_uptodate(&cl.b, "r", 30);
    // c is gone for longer than the limit: a and b delete what only c still needed.
    std::thread::sleep(Duration::from_secs(4));
    logs_reclaimed_everywhere(&[&cl.a, &cl.b]);
    cl.c.start_again();
    eventually(30, "c reports that it needs a full sync", || {
        cl.c.view("diskstate", "r") == "Orphan"
    });
    let v = cl.c.ok(&["view", "r"]);
    assert!(v.contains("invalidate"), "{v}");
    cl.c.ok(&["invalidate", "r"]);
    wait_uptodate(&cl.c, "r", 60);
    assert_eq!(first_difference(&da, &dc, size), None);
    assert_eq!(first_difference(&da, &db, size), None);
}

#[test]
fn resize_grows_and_secondaries_sync_the_new_region() {
    let t = tmp();
    let (cl, da) = cluster(t.path(), 16 << 20);
    let db = join(&cl.b, "r", 16 << 20);
    wait_uptodate(&cl.b, "r", 30);
    for d in [&da, &db] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(d)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
    }
    // b must report its grown disk before the primary accepts.
    eventually(20, "resize accepted", || {
        cl.a.marsadm(&["resize", "r"]).status.success()
    });
    eventually(20, "size propagated", || {
        cl.b.view("size", "r") == (32u64 << 20).to_string()
    });
    write_random(&cl.a, "r", t.path(), 24 << 20, 4 << 20);
    wait_uptodate(&cl.b, "r", 30);
    eventually(20, "written back", || {
        cl.a.view("diskstate", "r") == "UpToDate"
    });
    assert_eq!(first_difference(&da, &db, 32 << 20), None);
}

#[test]
fn delete_resource_force_tears_down_every_member() {
    let t = tmp();
    let (cl, _da) = cluster(t.path(), 16 << 20);
    join(&cl.b, "r", 16 << 20);
    wait_uptodate(&cl.b, "r", 30);
    cl.a.ok(&["--force", "delete-resource", "r"]);
    eventually(20, "b tears down", || {
        !cl.b.root.join("resource-r").exists()
    });
    assert!(cl.b.refused(&["view", "r"]).contains("does not exist"));
}

#[test]
fn secondary_low_on_space_drops_its_logs_and_does_not_hold_back_the_others() {
    let t = tmp();
    let size: u64 = 32 << 20;
    let (mut cl, da) = cluster(t.path(), size);
    let db = join(&cl.b, "r", size);
    let dc = join(&cl.c, "r", size);
    wait_uptodate(&cl.b, "r", 30);
    wait_uptodate(&cl.c, "r", 30);
    // c's root "fills up": a minimum free space it cannot have.
    cl.c.stop();
    cl.c.env = vec![("MARS_MIN_FREE_SPACE".into(), "1000T".into())];
    cl.c.start_again();
    eventually(30, "c gives up its logs", || {
        cl.c.view("diskstate", "r") == "Orphan"
    });
    assert!(logfiles(&cl.c, "r").is_empty());
    assert!(cl.c.ok(&["view", "r"]).contains("free"));
    for i in 0..3u64 {
        write_random(&cl.a, "r", t.path(), i << 20, 1 << 20);
        cl.a.ok(&["log-rotate", "r"]);
    }
    wait_uptodate(&cl.b, "r", 30);
    // a and b are not held back by c.
    logs_reclaimed_everywhere(&[&cl.a, &cl.b]);
    // Space is back: invalidate brings c home.
    cl.c.stop();
    cl.c.env.clear();
    cl.c.start_again();
    cl.c.ok(&["invalidate", "r"]);
    wait_uptodate(&cl.c, "r", 60);
    assert_eq!(first_difference(&da, &dc, size), None);
    assert_eq!(first_difference(&da, &db, size), None);
}

#[test]
fn primary_killed_under_writes_recovers_and_secondaries_catch_up() {
    let t = tmp();
    let size: u64 = 128 << 20;
    let (mut cl, da) = cluster(t.path(), size);
    let db = join(&cl.b, "r", size);
    wait_uptodate(&cl.b, "r", 30);
    // A writer that keeps going until the primary dies under it.
    let src = t.path().join("burst.img");
    random_file(&src, size as usize);
    let mut writer = Command::new("nbdcopy")
        .arg(&src)
        .arg(cl.a.unix_uri("r"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    cl.a.kill9();
    let _ = writer.wait();
    cl.a.start_again();
    // With other members, a restarted primary takes up its role once their metadata arrived
    // (another host may have taken over meanwhile).
    eventually(20, "a primary again", || {
        cl.a.view("role", "r") == "Primary"
    });
    // What the primary recovered is the truth; the secondary must end equal to it.
    write_random(&cl.a, "r", t.path(), 0, 1 << 20);
    wait_uptodate(&cl.b, "r", 60);
    eventually(20, "written back", || {
        cl.a.view("diskstate", "r") == "UpToDate"
    });
    assert_eq!(first_difference(&da, &db, size), None);
    assert_eq!(cl.b.view("flags", "r"), "dCASFR");
}

#[test]
fn sync_limit_runs_one_full_sync_at_a_time() {
    let t = tmp();
    let size: u64 = 256 << 20;
    let (cl, _da) = cluster(t.path(), size);
    let d2 = cl.a.create_resource("s", size);
    // Random data so that the copies take a while and differ from b's zero disks.
    fill_random(&cl.a, "r", t.path(), size as usize);
    fill_random(&cl.a, "s", t.path(), size as usize);
    cl.a.ok(&["set-global-sync-limit-value", "1"]);
    eventually(20, "limit known on b", || {
        cl.b.ok(&["get-global-sync-limit-value"]).trim() == "1"
    });
    let _db = join(&cl.b, "r", size);
    let db2 = new_disk(&cl.b, "s", size);
    cl.b.ok(&["join-resource", "s", db2.to_str().unwrap()]);
    // Never both copying at once: one of them stands at 0 until the other is done.
    let pos = |res: &str| -> u64 { cl.b.view("sync-pos", res).parse().unwrap_or(0) };
    let start = Instant::now();
    let mut overlap = false;
    while start.elapsed() < Duration::from_secs(120) {
        let (p1, p2) = (pos("r"), pos("s"));
        if p1 > 0 && p1 < size && p2 > 0 && p2 < size {
            overlap = true;
        }
        if p1 == size && p2 == size {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!overlap, "two syncs ran at once with a limit of 1");
    wait_uptodate(&cl.b, "r", 60);
    assert_eq!(first_difference(&d2, &db2, size), None);
}

#[test]
fn fake_sync_declares_equal_disks_consistent() {
    let t = tmp();
    let size: u64 = 64 << 20;
    let (cl, da) = cluster(t.path(), size);
    // Both disks are all zeros: an expert may skip the copy.
    let db = join(&cl.b, "r", size);
    cl.b.ok(&["pause-sync", "r"]);
    cl.b.ok(&["fake-sync", "r"]);
    cl.b.ok(&["resume-sync", "r"]);
    write_random(&cl.a, "r", t.path(), 5 << 20, 3 << 20);
    wait_uptodate(&cl.b, "r", 30);
    eventually(20, "written back", || {
        cl.a.view("diskstate", "r") == "UpToDate"
    });
    assert_eq!(first_difference(&da, &db, size), None);
    assert_eq!(cl.b.view("is-consistent", "r"), "1");
}
