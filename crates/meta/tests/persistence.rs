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

/// A host started once with its clock 40 days ahead keeps that time in its store; after its
/// clock is fixed, `rebase_future` stamps its own entries anew (in their order, above every
/// other stamp), drops what others wrote with such stamps, and its writes are accepted by a
/// host with a correct clock again.
#[test]
fn rebase_future_after_a_clock_far_ahead() {
    const DAY: u64 = 24 * 3600 * 1_000_000_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let real = 100 * DAY;
    let t = ManualTime::new(real);
    {
        let mut s = Store::open(&path, host("alpha"), t.source()).unwrap();
        s.set("ips/ip-alpha", "10.0.0.1").unwrap();
        s.apply_remote(&[entry("defaults/old", Some("b"), real - 5, "beta")])
            .unwrap();
        assert_eq!(
            s.rebase_future().unwrap(),
            None,
            "a correct clock: nothing to do"
        );
        t.set(real + 40 * DAY);
        s.set("resource-vm1/size", "1G").unwrap();
        s.set("defaults/x", "1").unwrap();
        s.delete("defaults/gone").unwrap();
        // Another host at the same wrong time (accepted here, within 30 days of this clock).
        s.apply_remote(&[entry(
            "defaults/theirs",
            Some("y"),
            real + 40 * DAY + 10,
            "beta",
        )])
        .unwrap();
        s.gc_tombstones(real + 33 * DAY).unwrap();
    }
    // The clock is fixed; the store still says 40 days ahead.
    t.set(real + 1_000);
    let mut s = Store::open(&path, host("alpha"), t.source()).unwrap();
    assert!(s.clock().last() > real + 40 * DAY);
    // A correct host refuses what alpha writes now.
    let mut b = Store::in_memory(host("beta"), t.source()).unwrap();
    let w = s.set("defaults/y", "2").unwrap();
    assert!(b.apply_remote(&[w]).unwrap().refused.len() == 1);
    let before = dump(&s);

    let r = s.rebase_future().unwrap().expect("rebased");
    assert_eq!((r.restamped, r.dropped), (4, 1), "{r:?}");
    assert!(r.from > real + 40 * DAY);
    assert!(r.to < real + DAY, "{r:?}");
    assert_eq!(s.clock().last(), r.to);
    assert_eq!(s.gc_horizon(), 0);
    // The order of what is kept is the old one; the other host's far entry is gone.
    let after = dump(&s);
    let order = |v: &[mars_meta::Entry]| {
        let mut v: Vec<_> = v
            .iter()
            .filter(|e| e.key != "defaults/theirs")
            .cloned()
            .collect();
        v.sort_by_key(|e| e.stamp);
        v.into_iter().map(|e| (e.key, e.value)).collect::<Vec<_>>()
    };
    assert_eq!(order(&before), order(&after));
    assert!(s.get("defaults/theirs").unwrap().is_none());
    assert!(after.iter().all(|e| e.stamp <= r.to));
    assert!(s.get("defaults/gone").unwrap().unwrap().is_tombstone());
    // Everything alpha holds now is accepted by a correct host, and its new writes too.
    let all = s.changes_since(0, usize::MAX).unwrap();
    let rep = b.apply_remote(&all.entries).unwrap();
    assert!(rep.refused.is_empty(), "{:?}", rep.refused);
    let w = s.set("defaults/z", "3").unwrap();
    assert!(w.stamp > r.to);
    assert_eq!(b.apply_remote(&[w]).unwrap().applied, 1);
    // Persisted: a restart does not bring the far clock back, and there is nothing more to do.
    drop(s);
    let mut s = Store::open(&path, host("alpha"), t.source()).unwrap();
    assert!(s.clock().last() < real + DAY);
    assert_eq!(s.rebase_future().unwrap(), None);
}
