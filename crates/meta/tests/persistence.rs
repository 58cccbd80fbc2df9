//! A real redb file: contents, seq counter and clock survive a reopen.

mod common;

use common::*;
use mars_meta::Store;

#[test]
fn reopen_keeps_content_seq_and_clock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let t = ManualTime::new(1_000_000);
    let before = {
        let mut s = Store::open(&path, host("alpha"), t.source()).unwrap();
        s.set("ips/ip-alpha", "10.0.0.1").unwrap();
        s.set("resource-vm1/size", "1G").unwrap();
        s.set("resource-vm1/primary", "alpha").unwrap();
        s.delete("resource-vm1/primary").unwrap();
        s.apply_remote(&[
            entry("ips/ip-beta", Some("10.0.0.2"), 5_000_000, "beta"),
            entry("actual-beta/alive", Some("1"), 5_000_001, "beta"),
        ])
        .unwrap();
        assert_eq!(s.local_seq(), 6);
        assert_eq!(s.clock().last(), 5_000_001);
        dump(&s)
    };
    // Real time went backwards meanwhile: the clock must not.
    t.set(10);
    let mut s = Store::open(&path, host("alpha"), t.source()).unwrap();
    assert_eq!(dump(&s), before);
    assert_eq!(s.local_seq(), 6);
    assert_eq!(s.clock().last(), 5_000_001);
    assert_eq!(s.owner_of("actual-beta/alive").unwrap().as_str(), "beta");
    let e = s.set("resource-vm1/size", "2G").unwrap();
    assert_eq!(e.stamp, 5_000_002);
    assert_eq!(s.local_seq(), 7);
    let c = s.changes_since(6, 10).unwrap();
    assert_eq!(c.entries, [e]);
    drop(s);

    // GC horizon and the clock's advance by it persist too.
    let mut s = Store::open(&path, host("alpha"), t.source()).unwrap();
    assert_eq!(s.gc_tombstones(6_000_000).unwrap(), 1);
    drop(s);
    let mut s = Store::open(&path, host("alpha"), t.source()).unwrap();
    assert_eq!(s.gc_horizon(), 6_000_000);
    assert!(s.set("x", "1").unwrap().stamp > 6_000_000);
    let r = s
        .apply_remote(&[entry(
            "resource-vm1/primary",
            Some("beta"),
            5_500_000,
            "beta",
        )])
        .unwrap();
    assert_eq!(r.ignored_older, 1);
}
