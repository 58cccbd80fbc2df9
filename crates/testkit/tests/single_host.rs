//! One host, one resource, end to end: the real `marsd`, the real `marsadm`, real NBD clients.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mars_testkit::nbd::Client;
use mars_testkit::{random_file, require, run, Host};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    mars_testkit::tempdir("mars-e2e-")
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let t = tmp();
    let h = Host::start(t.path(), "alpha");
    let disk = t.path().join("d.img");
    fs::File::create(&disk).unwrap().set_len(8 * MIB).unwrap();
    let d = disk.to_str().unwrap();

    // No cluster yet.
    assert!(h
        .refused(&["create-resource", "vm1", d])
        .contains("create-cluster"));
    h.ok(&["create-cluster"]);
    assert!(h.refused(&["create-cluster"]).contains("already"));
    let before = list(&h.root);
    for bad in ["all", "none", "a/b", "", ".hidden", "(none)", "a b"] {
        let err = h.refused(&["create-resource", bad, d]);
        assert!(
            err.contains("resource name") || err.contains("reserved"),
            "{bad:?}: {err}"
        );
    }
    let err = h.refused(&["create-resource", "vm1", &format!("{d}.missing")]);
    assert!(err.contains("No such file"), "{err}");
    let err = h.refused(&["create-resource", "vm1", d, "16M"]);
    assert!(err.contains("less than the requested"), "{err}");
    let err = h.refused(&["create-resource", "vm1", d, "32K"]);
    assert!(err.contains("too small"), "{err}");
    let err = h.refused(&["create-resource", "vm1", d, "1000000"]);
    assert!(err.contains("multiple of 512"), "{err}");
    let err = h.refused(&["create-resource", "vm1", d, "12Q"]);
    assert!(err.contains("SIZE"), "{err}");
    let err = h.refused(&["create-resource", "vm1", t.path().to_str().unwrap()]);
    assert!(
        err.contains("neither a regular file nor a block device"),
        "{err}"
    );
    assert_eq!(list(&h.root), before, "a refused command changed the root");

    h.ok(&["create-resource", "vm1", d]);
    assert!(h
        .refused(&["create-resource", "vm1", d])
        .contains("already exists"));
    let other = t.path().join("e.img");
    fs::File::create(&other).unwrap().set_len(8 * MIB).unwrap();
    assert!(h
        .refused(&["create-resource", "vm2", d])
        .contains("already used"));
    assert!(h.refused(&["view", "nosuch"]).contains("does not exist"));
    assert!(h
        .refused(&["view-role", "nosuch"])
        .contains("does not exist"));
    assert!(h
        .refused(&["view-bogus", "vm1"])
        .contains("unknown macro view-bogus"));
    assert!(h
        .refused(&["log-rotate", "nosuch"])
        .contains("does not exist"));
    assert!(h.refused(&["frobnicate"]).contains("unknown command"));

    // A second daemon on the same root is refused.
    let o = Command::new(mars_testkit::bin("marsd"))
        .arg("--root")
        .arg(&h.root)
        .args(["--host", "alpha"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("another marsd"));
    // A daemon whose host name does not match the root's is refused.
    let mut h = h;
    h.stop();
    let o = Command::new(mars_testkit::bin("marsd"))
        .arg("--root")
        .arg(&h.root)
        .args(["--host", "beta"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("host names never change"));
    let o = Command::new(mars_testkit::bin("marsd"))
        .args(["--root", "/tmp/x", "--host", "Bad.Name"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--host"));
}

#[test]
fn view_shows_state_and_log_rotate_starts_a_new_logfile() {
    let t = tmp();
    let h = Host::start(t.path(), "alpha");
    h.create_resource("vm1", 16 * MIB);
    assert_eq!(h.view("role", "vm1"), "Primary");
    assert_eq!(h.view("primarynode", "vm1"), "alpha");
    assert_eq!(h.view("diskstate", "vm1"), "UpToDate");
    assert_eq!(h.view("replstate", "vm1"), "Replicating");
    assert_eq!(h.view("size", "vm1"), (16 * MIB).to_string());
    assert_eq!(h.view("nbd-uri", "vm1"), h.unix_uri("vm1"));
    assert_eq!(h.view("nbd-tcp-uri", "vm1"), h.tcp_uri("vm1"));
    // MARS's complex macros on a real daemon (their texts: crates/cli/src/macros/tests.rs).
    let default = h.ok(&["view-default", "vm1"]);
    assert!(
        default
            .lines()
            .any(|l| l.starts_with("  vm1 [1/1] UpToDate Replicating ")
                && l.ends_with(" Primary alpha ")),
        "{default:?}"
    );
    assert_eq!(
        h.ok(&["view-1and1", "vm1"]),
        "  vm1 Uptodate Replicating -SFR- Primary alpha\n"
    );
    let all = h.ok(&["view-default", "all"]);
    assert!(
        all.starts_with("used-log-digest=\"CHKSUM_CRC32C\"\n"),
        "{all}"
    );
    assert!(
        all.contains("--------- resource vm1 16.000 MiB [1/1]\n"),
        "{all}"
    );
    assert_eq!(h.view("todo-primary", "vm1"), "1");
    assert_eq!(h.view("sync-percent", "vm1"), "100");
    assert_eq!(h.view("resource-peers", "vm1"), "alpha");
    assert_eq!(h.view("count-my-resources", "vm1"), "1");
    assert_eq!(h.ok(&["view-wait-is-primary-on", "vm1"]), "");
    assert!(h
        .refused(&["view-rol", "vm1"])
        .contains("did you mean view-role?"));
    let text = h.ok(&["view", "all"]);
    assert!(text.contains("vm1 [1/1] UpToDate Replicating"), "{text}");
    assert!(text.contains("--------- cluster"), "{text}");
    let j = h.view_json();
    assert_eq!(j["resources"][0]["log"]["current"], "log-000000001-alpha");
    let out = h.ok(&["log-rotate", "vm1"]);
    assert!(out.contains("log-000000002-alpha"), "{out}");
    let j = h.view_json();
    assert_eq!(j["resources"][0]["log"]["current"], "log-000000002-alpha");
    assert!(h.root.join("resource-vm1/log-000000002-alpha").exists());
    // The finished logfile is written back and, with no other member needing it, reclaimed.
    let old = h.root.join("resource-vm1/log-000000001-alpha");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The file goes first, the log line right after it.
    while old.exists()
        || !h
            .log_text()
            .contains("deleted logfiles log-000000001-alpha")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "logfile 1 never reclaimed (or not logged): {}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn qemu_img_and_nbdinfo_see_the_export() {
    if !require("qemu-img") || !require("nbdinfo") {
        return;
    }
    let t = tmp();
    let h = Host::start(t.path(), "alpha");
    h.create_resource("vm1", 32 * MIB);
    for uri in [h.unix_uri("vm1"), h.tcp_uri("vm1")] {
        let out = run(Command::new("qemu-img").args(["info", "--output=json", &uri]));
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["virtual-size"], 32 * MIB, "{out}");
        let out = run(Command::new("nbdinfo").args(["--json", &uri]));
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        let e = &j["exports"][0];
        assert_eq!(e["export-size"], 32 * MIB);
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_multi_conn",
        ] {
            assert_eq!(e[flag], true, "{flag}: {out}");
        }
        assert_eq!(e["is_read_only"], false);
        assert_eq!(e["block_size_preferred"], 4096);
    }
    let out = run(Command::new("nbdinfo").args(["--list", &h.unix_uri("vm1")]));
    assert!(out.contains("vm1"), "{out}");
}

fn sha(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn nbdcopy_256mib_round_trip_survives_restart() {
    if !require("nbdcopy") {
        return;
    }
    let t = tmp();
    let mut h = Host::start(t.path(), "alpha");
    let size = 256 * MIB;
    let disk = h.create_resource("vm1", size);
    let src = t.path().join("src.bin");
    random_file(&src, size as usize);
    let want = sha(&src);
    run(Command::new("nbdcopy").args(["--flush", src.to_str().unwrap(), &h.unix_uri("vm1")]));
    let out = t.path().join("out.bin");
    run(Command::new("nbdcopy").args([&h.tcp_uri("vm1"), out.to_str().unwrap()]));
    assert_eq!(sha(&out), want, "read back differs");
    // A clean stop writes everything back: the backing disk alone holds the data.
    h.stop();
    assert_eq!(sha(&disk), want, "backing disk differs after clean stop");
    h.start_again();
    fs::remove_file(&out).unwrap();
    run(Command::new("nbdcopy").args([&h.unix_uri("vm1"), out.to_str().unwrap()]));
    assert_eq!(sha(&out), want, "read back after restart differs");
}

/// Runs `qemu-io -f raw -c CMD … URI` and returns its output.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(uri))
}

#[test]
fn qemu_io_fua_write_zeroes_trim_flush() {
    if !require("qemu-io") {
        return;
    }
    let t = tmp();
    let mut h = Host::start(t.path(), "alpha");
    h.create_resource("vm1", 16 * MIB);
    let uri = h.unix_uri("vm1");
    let script = [
        "write -P 0xaa 0 1M",
        "write -f -P 0xbb 1M 64k", // FUA
        "write -z 2M 1M",          // WRITE_ZEROES
        "write -z -u 3M 1M",       // WRITE_ZEROES, may trim
        "write -P 0xcc 4M 1M",
        "discard 4M 64k",          // TRIM: we make it read as zeros
        "write -P 0xdd 5000 3000", // unaligned
        "flush",
    ];
    let out = qemu_io(&uri, &script);
    assert!(!out.contains("error"), "{out}");
    // Crash right after the flush: everything must come back from the log.
    h.kill9();
    h.start_again();
    let checks = [
        "read -P 0xaa 0 4096",
        "read -P 0xdd 5000 3000",
        "read -P 0xaa 8000 1040576",
        "read -P 0xbb 1M 64k",
        "read -P 0 2M 2M",
        "read -P 0 4M 64k",
        "read -P 0xcc 4160k 960k",
    ];
    let out = qemu_io(&uri, &checks);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), checks.len(), "{out}");
}

#[test]
fn fio_random_writes_verify() {
    if !require("fio") {
        return;
    }
    let t = tmp();
    let h = Host::start(t.path(), "alpha");
    h.create_resource("vm1", 64 * MIB);
    let out = run(Command::new("fio").current_dir(t.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", h.tcp_uri("vm1")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=64M",
        "--io_size=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=json",
    ]));
    let json = &out[out.find('{').expect("json")..];
    let j: serde_json::Value = serde_json::from_str(json).unwrap();
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 32 * MIB);
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 32 * MIB,
        "verify read"
    );
}

/// Random writes and FLUSHes through NBD while `marsd` is killed with SIGKILL at random
/// moments; after each restart, every write acknowledged before the last completed FLUSH (or
/// written with FUA) reads back intact. Blocks written after it may hold the old or the new
/// data, nothing else.
#[test]
fn kill9_under_write_load_keeps_every_flushed_write() {
    const BLOCK: usize = 4096;
    const BLOCKS: u64 = 2048; // 8 MiB device
    let t = tmp();
    let mut h = Host::start(t.path(), "alpha");
    h.create_resource("vm1", BLOCKS * BLOCK as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x3a35);
    // What each block must hold (durable) and what it may hold (acknowledged or in flight since).
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut maybe: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut stamp = 0u64;
    let block_data = |blk: u64, stamp: u64| -> Vec<u8> {
        let mut v = Vec::with_capacity(BLOCK);
        while v.len() < BLOCK {
            v.extend_from_slice(&blk.to_le_bytes());
            v.extend_from_slice(&stamp.to_le_bytes());
        }
        v
    };
    for round in 0..12 {
        let sock = h.nbd_socket();
        let delay = Duration::from_millis(rng.gen_range(30..400));
        let killer = std::thread::spawn(move || std::thread::sleep(delay));
        let mut c = Client::connect(&sock, "vm1").expect("connect");
        let mut written = 0;
        // Write until the daemon dies under us.
        loop {
            if killer.is_finished() {
                break;
            }
            let blk = rng.gen_range(0..BLOCKS);
            let n = rng.gen_range(1..8u64).min(BLOCKS - blk);
            stamp += 1;
            let mut data = Vec::new();
            for b in blk..blk + n {
                data.extend_from_slice(&block_data(b, stamp));
                maybe.entry(b).or_default().push(stamp);
            }
            let fua = rng.gen_bool(0.05);
            if c.write(blk * BLOCK as u64, &data, fua).is_err() {
                break;
            }
            written += 1;
            if fua {
                for b in blk..blk + n {
                    durable.insert(b, stamp);
                    maybe.get_mut(&b).unwrap().retain(|&s| s > stamp);
                }
            }
            if rng.gen_bool(0.1) {
                if c.flush().is_err() {
                    break;
                }
                for (b, stamps) in maybe.iter_mut() {
                    if let Some(&last) = stamps.last() {
                        durable.insert(*b, last);
                    }
                    stamps.clear();
                }
            }
        }
        killer.join().unwrap();
        h.kill9();
        h.start_again();
        let mut c = Client::connect(&h.nbd_socket(), "vm1").expect("reconnect");
        let mut buf = vec![0u8; BLOCK];
        for blk in 0..BLOCKS {
            c.read(blk * BLOCK as u64, &mut buf).expect("read");
            let got_stamp = if buf.iter().all(|&b| b == 0) {
                0
            } else {
                assert_eq!(
                    &buf[..8],
                    &blk.to_le_bytes(),
                    "round {round} block {blk}: garbage"
                );
                let s = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                assert_eq!(
                    buf,
                    block_data(blk, s),
                    "round {round} block {blk}: torn block"
                );
                s
            };
            let d = durable.get(&blk).copied().unwrap_or(0);
            let allowed = got_stamp == d || maybe.get(&blk).is_some_and(|m| m.contains(&got_stamp));
            assert!(
                allowed,
                "round {round} block {blk}: holds write {got_stamp}, durable was {d}, maybe {:?} ({written} writes this round)",
                maybe.get(&blk)
            );
            // What survived is the new truth.
            durable.insert(blk, got_stamp);
        }
        maybe.clear();
        c.disconnect().ok();
    }
    assert_eq!(h.view("diskstate", "vm1"), "UpToDate");
}

/// Writes 64 KiB blocks 0..64 of vm1 (block i filled with `base + i`), flushes, and kills marsd.
fn write_64_blocks_flush_and_crash(h: &mut Host, base: u8) {
    let mut c = Client::connect(&h.nbd_socket(), "vm1").unwrap();
    for i in 0..64u8 {
        c.write(u64::from(i) * 65536, &vec![base + i; 65536], false)
            .unwrap();
    }
    c.flush().unwrap();
    drop(c);
    h.kill9();
}

#[test]
fn corrupt_log_byte_is_refused_with_file_and_offset_and_torn_tail_is_cut() {
    let t = tmp();
    let mut h = Host::start(t.path(), "alpha");
    h.create_resource("vm1", 16 * MIB);
    write_64_blocks_flush_and_crash(&mut h, 1);
    let log = h.root.join("resource-vm1/log-000000001-alpha");
    let len = fs::metadata(&log).unwrap().len();
    assert!(len > 64 * 65536, "log holds the writes: {len}");

    // Torn tail: a partial record at the end is cut silently.
    let torn: Vec<u8> = fs::read(&log).unwrap()[..100].to_vec(); // a header and a bit, as if the crash hit mid-write
    let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, &torn).unwrap();
    drop(f);
    h.start_again();
    assert_eq!(h.view("diskstate", "vm1"), "UpToDate", "{}", h.log_text());
    // (The file itself may already be reclaimed: it is complete and written back.)
    let cut = format!("log-000000001-alpha: cut off a torn tail of 100 bytes at offset {len}");
    assert!(h.log_text().contains(&cut), "{}", h.log_text());
    let mut c = Client::connect(&h.nbd_socket(), "vm1").unwrap();
    let mut buf = vec![0u8; 65536];
    c.read(63 * 65536, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 64));
    drop(c);
    h.kill9();

    // One flipped byte in the middle of the logfile that was being written at the crash:
    // recovery refuses, names file and offset, changes nothing.
    h.start_again();
    write_64_blocks_flush_and_crash(&mut h, 100);
    let dir = h.root.join("resource-vm1");
    let newest = list(&dir)
        .into_iter()
        .filter(|n| n.starts_with("log-") && fs::metadata(dir.join(n)).unwrap().len() > 0)
        .max()
        .expect("a logfile with data");
    let log = dir.join(&newest);
    let mut bytes = fs::read(&log).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&log, &bytes).unwrap();
    h.start_again();
    let state = h.view("diskstate", "vm1");
    // The plain macro names the damaged logfile as MARS's view does (JSON has it apart).
    assert_eq!(state, format!("DefectiveLog[{newest}]"));
    let err = h.view("error", "vm1");
    assert!(err.contains(&newest), "{err}");
    let offset: u64 = err
        .split("offset ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {err:?}"));
    assert!(
        offset <= mid as u64 && mid as u64 - offset < 65536 + 48,
        "{err}"
    );
    assert_eq!(
        fs::read(&log).unwrap(),
        bytes,
        "refused recovery changed the log"
    );
    assert!(
        h.view_json()["resources"][0]["nbd_unix_uri"].is_null(),
        "not served"
    );
    assert!(
        Client::connect(&h.nbd_socket(), "vm1").is_err(),
        "export must be absent"
    );
}

#[test]
fn demo_runs_and_cleans_up() {
    let t = tmp();
    let dir = t.path().join("demo");
    let out = run(Command::new(mars_testkit::bin("marsadm")).args([
        "demo",
        "--exit",
        "--size",
        "64M",
        "--dir",
        dir.to_str().unwrap(),
    ]));
    assert!(out.contains("created resource demo"), "{out}");
    assert!(out.contains("demo [1/1]"), "{out}");
    // The roles half: handover, failover, split brain and its resolution, all verified.
    assert!(out.contains("beta is primary now"), "{out}");
    assert!(out.contains("SPLIT BRAIN of resource 'demo'"), "{out}");
    assert_eq!(out.matches(": all identical").count(), 2, "{out}");
    assert!(!out.contains("MISMATCH"), "{out}");
    // Nothing stays mounted below the demo's directory (devices, FUSE mounts).
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(dir.to_str().unwrap()),
        "left mounted: {mounts}"
    );
}

#[test]
fn shipped_systemd_unit_verifies() {
    if !require("systemd-analyze") {
        return;
    }
    let t = tmp();
    let unit = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../dist/marsd.service"
    ))
    .unwrap()
    .replace(
        "/usr/sbin/marsd",
        mars_testkit::bin("marsd").to_str().unwrap(),
    );
    let path = t.path().join("marsd.service");
    fs::write(&path, unit).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // Unknown keys only warn, so any output at all is a failure.
    assert!(o.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn missing_disk_leaves_the_resource_detached_and_the_daemon_serving_others() {
    let t = tmp();
    let mut h = Host::start(t.path(), "alpha");
    let gone = h.create_resource("vm1", 8 * MIB);
    h.create_resource("vm2", 8 * MIB);
    h.stop();
    fs::remove_file(&gone).unwrap();
    h.start_again();
    assert_eq!(h.view("diskstate", "vm1"), "Detached");
    let err = h.view("error", "vm1");
    assert!(
        err.contains(gone.to_str().unwrap()) && err.contains("No such file"),
        "{err}"
    );
    assert!(h.refused(&["view-nbd-uri", "vm1"]).contains("not served"));
    assert!(h.refused(&["log-rotate", "vm1"]).contains("not attached"));
    assert_eq!(h.view("diskstate", "vm2"), "UpToDate");
    let mut c = Client::connect(&h.nbd_socket(), "vm2").unwrap();
    c.write(0, b"still serving", true).unwrap();
}
