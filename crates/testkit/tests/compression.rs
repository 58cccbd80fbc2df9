//! Compression of the fetch and sync streams end to end: two real `marsd`, the cluster-wide
//! setting made with `marsadm set-global-enabled-net-compressions`, compressible data (text
//! and zeros) written through NBD, the replica compared byte for byte and the ratio read from
//! `view --json` (the same counters as the metrics).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use mars_testkit::repl::{eventually, first_difference, join, tmp, wait_uptodate};
use mars_testkit::Host;

/// `len` bytes of text lines and runs of zeros, as a filesystem's log might carry.
fn compressible_file(p: &Path, len: usize, seed: u64) {
    let words = [
        "replication",
        "primary",
        "secondary",
        "logfile",
        "device",
        "cluster",
        "network",
        "compression",
        "resource",
        "handover",
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(5) {
            out.resize(out.len() + 8192, 0);
        } else {
            let line: Vec<&str> = (0..12)
                .map(|i| words[((x >> (i * 4)) % 16) as usize])
                .collect();
            writeln!(out, "{} {}", x % 100_000, line.join(" ")).unwrap();
        }
    }
    out.truncate(len);
    std::fs::write(p, out).unwrap();
}

fn write_file(h: &Host, res: &str, src: &Path, offset: u64, len: usize) {
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -s {} {offset} {len}", src.display()))
        .arg(h.unix_uri(res))
        .output()
        .expect("qemu-io");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `(compression, received on the wire, received raw)` of `h`'s `stream` from member `from`.
fn received(h: &Host, from: &str, stream: &str) -> Option<(Option<String>, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&h.ok(&["--json", "view", "all"])).unwrap();
    let m = v["members"]
        .as_array()?
        .iter()
        .find(|m| m["host"] == from)?;
    let s = m["streams"]
        .as_array()?
        .iter()
        .find(|s| s["stream"] == stream)?;
    Some((
        s["compression"].as_str().map(str::to_string),
        s["received_bytes"].as_u64()?,
        s["received_raw_bytes"].as_u64()?,
    ))
}

/// Two hosts; `setting` (if any) set before the secondary joins; compressible data written
/// before (full sync) and after (fetch) the join; the disks equal at the end.
fn replicate(setting: Option<&str>) -> (tempfile::TempDir, Host, Host) {
    let t = tmp();
    let dir = t.path().to_path_buf();
    let a = Host::start_at(&dir, "a", "127.0.0.1");
    let b = Host::start_at(&dir, "b", "127.0.0.2");
    let size: u64 = 64 << 20;
    let da = a.create_resource("r", size);
    b.join(&a);
    for h in [&a, &b] {
        h.ok(&["--timeout", "30", "wait-cluster"]);
    }
    if let Some(s) = setting {
        a.ok(&["set-global-enabled-net-compressions", s]);
        eventually(20, "the setting reached b", || {
            // Not there yet is an error ("no metadata key"): try again.
            let o = b.marsadm(&["get-link", "defaults/enabled-net-compressions"]);
            o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with(s)
        });
        // Each host reads the setting with its measurement, once a second.
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    let src = dir.join("text.img");
    compressible_file(&src, 8 << 20, 1);
    write_file(&a, "r", &src, 0, 8 << 20);
    let db = join(&b, "r", size);
    compressible_file(&src, 16 << 20, 2);
    write_file(&a, "r", &src, 24 << 20, 16 << 20);
    wait_uptodate(&b, "r", 120);
    eventually(20, "written back", || {
        a.view("diskstate", "r") == "UpToDate"
    });
    assert_eq!(first_difference(&da, &db, size), None, "b differs from a");
    (t, a, b)
}

#[test]
fn compressible_data_travels_compressed_and_arrives_equal() {
    let (_t, _a, b) = replicate(Some("COMPRESS_ZSTD"));
    let (method, wire, raw) = received(&b, "a", "fetch").expect("fetch stream in view");
    assert_eq!(method.as_deref(), Some("zstd"));
    assert!(raw >= 16 << 20, "{raw} raw bytes fetched");
    assert!(
        raw > 2 * wire,
        "fetch: {raw} raw bytes took {wire} on the wire"
    );
    let (method, wire, raw) = received(&b, "a", "sync").expect("sync stream in view");
    assert_eq!(method.as_deref(), Some("zstd"));
    assert!(
        raw > 2 * wire,
        "sync: {raw} raw bytes took {wire} on the wire"
    );
    // The text view says it too.
    let v = b.ok(&["view", "all"]);
    assert!(v.contains("fetch (zstd): received"), "{v}");
}

#[test]
fn without_the_setting_streams_stay_raw() {
    let (_t, _a, b) = replicate(None);
    let (method, wire, raw) = received(&b, "a", "fetch").expect("fetch stream in view");
    assert_eq!((method, raw), (None, wire));
    assert!(wire >= 16 << 20);
}
