//! Replication end to end: three real `marsd` on 127.0.0.1/2/3 with file-backed disks, driven
//! only through `marsadm` and real NBD clients; replicas compared byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mars_testkit::{random_file, run, Host};

fn tmp() -> tempfile::TempDir {
    mars_testkit::tempdir("mars-repl-")
}

/// Waits until `cond` holds, at most `secs`.
fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

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
    b.ok(&["join-cluster", &a.peer_addr]);
    c.ok(&["join-cluster", &a.peer_addr]);
    for h in [&a, &b, &c] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    (Cluster { a, b, c }, disk)
}

/// A fresh all-zero disk file for `h`.
fn new_disk(h: &Host, size: u64) -> PathBuf {
    let p = h.root.parent().unwrap().join("r.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn join(h: &Host, size: u64) -> PathBuf {
    let d = new_disk(h, size);
    // The resource may not have reached h's metadata yet.
    eventually(20, "resource visible", || {
        h.marsadm(&["join-resource", "r", d.to_str().unwrap()])
            .status
            .success()
    });
    d
}

/// Writes `len` random bytes at `offset` through NBD on `h`.
fn write_random(h: &Host, dir: &Path, offset: u64, len: usize) {
    let src = dir.join(format!("src-{offset}"));
    random_file(&src, len);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -s {} {offset} {len}", src.display()))
        .arg(h.unix_uri("r")));
    std::fs::remove_file(src).unwrap();
}

/// Copies a whole random image onto the device through NBD (nbdcopy, parallel requests).
fn fill_random(h: &Host, dir: &Path, len: usize) {
    let src = dir.join("fill.img");
    random_file(&src, len);
    run(Command::new("nbdcopy").arg(&src).arg(h.unix_uri("r")));
    std::fs::remove_file(src).unwrap();
}

/// First `size` bytes of two disks are equal.
fn same(a: &Path, b: &Path, size: u64) -> bool {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).unwrap();
    let mut fb = std::fs::File::open(b).unwrap();
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
        left -= n as u64;
    }
    true
}

fn wait_uptodate(h: &Host, secs: u64) {
    let o = h.marsadm(&[
        "--timeout",
        &secs.to_string(),
        "wait-resource",
        "r",
        "uptodate",
    ]);
    assert!(
        o.status.success(),
        "{} not up to date: {}{}\n{}",
        h.name,
        String::from_utf8_lossy(&o.stderr),
        h.ok(&["view", "r"]),
        h.log_text()
    );
}

fn logfiles(h: &Host) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(h.root.join("resource-r"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("log-"))
        .collect();
    v.sort();
    v
}

#[test]
fn join_sync_fetch_replay_converge() {
    let t = tmp();
    let size = 64 << 20;
    let (cl, da) = cluster(t.path(), size);
    write_random(&cl.a, t.path(), 0, 8 << 20);
    let db = join(&cl.b, size);
    let dc = join(&cl.c, size);
    // Writes while the replicas sync.
    for i in 0..8u64 {
        write_random(&cl.a, t.path(), (i * 7 + 3) << 20, 1 << 20);
    }
    cl.a.ok(&["log-rotate", "r"]);
    write_random(&cl.a, t.path(), 40 << 20, 2 << 20);
    for h in [&cl.b, &cl.c] {
        wait_uptodate(h, 60);
    }
    cl.a.ok(&["--timeout", "10", "wait-resource", "r", "uptodate"]);
    // The primary's disk may lag its log: compare after writeback.
    eventually(20, "written back", || {
        cl.a.view("diskstate", "r") == "UpToDate"
    });
    for (h, d) in [(&cl.b, &db), (&cl.c, &dc)] {
        assert!(same(&da, d, size), "{} differs from a", h.name);
        assert_eq!(h.view("replstate", "r"), "Replaying");
        assert_eq!(h.view("flags", "r"), "dCASFR");
        assert_eq!(h.view("role", "r"), "Secondary");
        assert_eq!(h.view("primarynode", "r"), "a");
    }
    let v = cl.a.ok(&["view", "r"]);
    println!("{v}\n{}", cl.b.ok(&["view", "r"]));
    assert!(
        v.contains("r [3/3] UpToDate Replicating DCASFR Primary a"),
        "{v}"
    );
    let _ = fill_random;
    let _ = logfiles;
}
