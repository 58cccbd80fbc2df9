//! The store's rules, one test each: LWW, ownership, clock, tombstones, key validation.

mod common;

use common::*;
use mars_meta::{MetaError, Store, DEFAULT_MAX_FUTURE_NS};

/// alpha and beta know each other as members.
fn pair() -> (ManualTime, Store, Store) {
    let t = ManualTime::new(1_000);
    let mut a = mem_store("alpha", &t);
    let mut b = mem_store("beta", &t);
    a.set("ips/ip-alpha", "10.0.0.1").unwrap();
    b.set("ips/ip-beta", "10.0.0.2").unwrap();
    let ca = a.changes_since(0, usize::MAX).unwrap();
    let cb = b.changes_since(0, usize::MAX).unwrap();
    b.apply_remote(&ca.entries).unwrap();
    a.apply_remote(&cb.entries).unwrap();
    assert_eq!(a.members().len(), 2);
    assert_eq!(b.members().len(), 2);
    (t, a, b)
}

#[test]
fn set_get_list_and_seq() {
    let t = ManualTime::new(500);
    let mut s = mem_store("alpha", &t);
    assert_eq!(s.local_seq(), 0);
    let e = s.set("resource-vm1/size", "1G").unwrap();
    assert_eq!((e.stamp, e.origin.as_str()), (500, "alpha"));
    s.set("resource-vm1/primary", "alpha").unwrap();
    s.set("resource-vm2/size", "2G").unwrap();
    s.delete("resource-vm1/primary").unwrap();
    assert_eq!(s.local_seq(), 4);
    assert_eq!(s.get("resource-vm1/size").unwrap().unwrap(), e);
    assert_eq!(s.value("resource-vm1/primary").unwrap(), None);
    assert!(s
        .get("resource-vm1/primary")
        .unwrap()
        .unwrap()
        .is_tombstone());
    assert_eq!(s.get("nope").unwrap(), None);
    let keys: Vec<_> = s
        .list_prefix("resource-vm1/")
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["resource-vm1/size"]);
    assert_eq!(
        s.list_prefix_with_tombstones("resource-vm1/")
            .unwrap()
            .len(),
        2
    );
    assert_eq!(s.list_prefix("").unwrap().len(), 2);
}

#[test]
fn lww_higher_stamp_wins_ties_broken_by_host_name() {
    let t = ManualTime::new(1_000);
    let mut s = mem_store("gamma", &t);
    let k = "resource-vm1/primary";
    let r = s
        .apply_remote(&[entry(k, Some("a"), 100, "alpha")])
        .unwrap();
    assert_eq!(r.applied, 1);
    // Older loses.
    let r = s.apply_remote(&[entry(k, Some("b"), 99, "beta")]).unwrap();
    assert_eq!((r.applied, r.ignored_older), (0, 1));
    // Same stamp, greater host name wins.
    let r = s.apply_remote(&[entry(k, Some("b"), 100, "beta")]).unwrap();
    assert_eq!(r.applied, 1);
    assert_eq!(s.value(k).unwrap().as_deref(), Some("b"));
    // Same stamp, smaller host name loses, in whatever order it arrives.
    let r = s
        .apply_remote(&[entry(k, Some("a"), 100, "alpha")])
        .unwrap();
    assert_eq!((r.applied, r.ignored_older), (0, 1));
    // Identical: a no-op, no new seq.
    let seq = s.local_seq();
    let r = s.apply_remote(&[entry(k, Some("b"), 100, "beta")]).unwrap();
    assert_eq!((r.applied, r.duplicates), (0, 1));
    assert_eq!(s.local_seq(), seq);
    // Newer wins; the clock has seen every stamp, so a local write wins over all of them.
    s.apply_remote(&[entry(k, Some("c"), 200, "alpha")])
        .unwrap();
    assert_eq!(s.clock().last(), 200);
    t.set(10);
    let e = s.set(k, "gamma").unwrap();
    assert_eq!(e.stamp, 201);
}

#[test]
fn local_write_of_foreign_owned_key_is_refused() {
    let (_t, mut a, _b) = pair();
    for key in ["actual-beta/alive", "resource-vm1/replay-beta"] {
        let seq = a.local_seq();
        match a.set(key, "1") {
            Err(MetaError::NotOwner { owner, writer, .. }) => {
                assert_eq!((owner.as_str(), writer.as_str()), ("beta", "alpha"))
            }
            other => panic!("{key}: {other:?}"),
        }
        assert!(matches!(a.delete(key), Err(MetaError::NotOwner { .. })));
        assert_eq!(a.local_seq(), seq, "a refused write changes nothing");
    }
    // Own and shared keys are fine; a non-member's suffix is shared.
    a.set("actual-alpha/alive", "1").unwrap();
    a.set("resource-vm1/primary", "alpha").unwrap();
    a.set("actual-gamma/alive", "1").unwrap();
}

#[test]
fn remote_update_of_owned_key_needs_owner_as_origin() {
    let (_t, mut a, mut b) = pair();
    let forged = entry("actual-beta/alive", Some("x"), 2_000, "alpha");
    let genuine = entry("actual-beta/alive", Some("y"), 1_500, "beta");
    let shared = entry("resource-vm1/primary", Some("beta"), 1_500, "beta");
    // Also a remote update claiming alpha's own key from beta.
    let forged_mine = entry("actual-alpha/alive", Some("z"), 2_000, "beta");
    let r = a
        .apply_remote(&[forged.clone(), genuine.clone(), shared, forged_mine])
        .unwrap();
    assert_eq!(r.applied, 2);
    let refused: Vec<_> = r.refused.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(refused, ["actual-beta/alive", "actual-alpha/alive"]);
    assert!(r
        .refused
        .iter()
        .all(|(_, e)| matches!(e, MetaError::NotOwner { .. })));
    assert_eq!(a.get("actual-beta/alive").unwrap().unwrap(), genuine);
    assert_eq!(a.get("actual-alpha/alive").unwrap(), None);
    let r = b.apply_remote(&[forged]).unwrap();
    assert_eq!(r.refused.len(), 1);
}

#[test]
fn membership_follows_ip_keys() {
    let (_t, mut a, _b) = pair();
    // gamma is not a member yet: its keys are shared.
    assert_eq!(a.owner_of("actual-gamma/alive"), None);
    a.apply_remote(&[entry("ips/ip-gamma", Some("10.0.0.3"), 1_100, "gamma")])
        .unwrap();
    assert_eq!(a.owner_of("actual-gamma/alive").unwrap().as_str(), "gamma");
    assert!(matches!(
        a.set("actual-gamma/alive", "1"),
        Err(MetaError::NotOwner { .. })
    ));
    // gamma leaves.
    a.apply_remote(&[entry("ips/ip-gamma", None, 1_200, "gamma")])
        .unwrap();
    assert_eq!(a.owner_of("actual-gamma/alive"), None);
    // The local host stays a member even without its ip key.
    a.delete("ips/ip-alpha").unwrap();
    assert_eq!(a.owner_of("actual-alpha/x").unwrap().as_str(), "alpha");
}

#[test]
fn future_stamps_are_refused() {
    let t = ManualTime::new(1_000_000);
    let mut s = mem_store("alpha", &t);
    let too_far = 1_000_000 + DEFAULT_MAX_FUTURE_NS + 1;
    let ok = 1_000_000 + DEFAULT_MAX_FUTURE_NS;
    let r = s
        .apply_remote(&[
            entry("defaults/sync-limit", Some("9"), too_far, "beta"),
            entry("defaults/x", Some("1"), 5, "beta"),
        ])
        .unwrap();
    assert_eq!(r.applied, 1);
    assert!(matches!(
        r.refused[..],
        [(_, MetaError::StampTooFarInFuture { stamp, .. })] if stamp == too_far
    ));
    assert_eq!(s.clock().last(), 5, "clock unchanged by a refused stamp");
    assert_eq!(s.get("defaults/sync-limit").unwrap(), None);
    // Exactly at the limit is fine and advances the clock.
    s.apply_remote(&[entry("defaults/sync-limit", Some("9"), ok, "beta")])
        .unwrap();
    assert_eq!(s.clock().last(), ok);
    assert_eq!(s.set("defaults/sync-limit", "1").unwrap().stamp, ok + 1);
    // A configurable limit.
    let mut s = mem_store("alpha", &t).with_max_future(10);
    let r = s
        .apply_remote(&[entry("k", Some("1"), 1_000_011, "beta")])
        .unwrap();
    assert_eq!(r.refused.len(), 1);
    assert!(s.gc_tombstones(1_000_011).is_err());
}

#[test]
fn tombstones_beat_older_writes_and_lose_to_newer() {
    let t = ManualTime::new(100);
    let mut s = mem_store("alpha", &t);
    let k = "resource-vm1/size";
    s.apply_remote(&[entry(k, Some("1G"), 10, "beta")]).unwrap();
    t.set(20);
    let del = s.delete(k).unwrap();
    assert!(del.stamp > 10);
    // A late, older write (relayed by a slow peer) must not resurrect; nor does one with the
    // same stamp from a host whose name sorts before the deleter's.
    let r = s
        .apply_remote(&[
            entry(k, Some("2G"), 15, "gamma"),
            entry(k, Some("3G"), del.stamp, "aaa"),
        ])
        .unwrap();
    assert_eq!((r.applied, r.ignored_older), (0, 2));
    assert_eq!(s.get(k).unwrap().unwrap(), del);
    // A newer write wins over the tombstone.
    let r = s
        .apply_remote(&[entry(k, Some("4G"), del.stamp + 1, "beta")])
        .unwrap();
    assert_eq!(r.applied, 1);
    assert_eq!(s.value(k).unwrap().as_deref(), Some("4G"));
    // And a remote tombstone beats an older value.
    s.apply_remote(&[entry(k, None, del.stamp + 2, "beta")])
        .unwrap();
    assert!(s.get(k).unwrap().unwrap().is_tombstone());
}

#[test]
fn gc_removes_old_tombstones_without_resurrection() {
    let t = ManualTime::new(100);
    let mut s = mem_store("alpha", &t);
    s.set("a", "1").unwrap(); // 100
    s.delete("a").unwrap(); // 101
    s.set("b", "1").unwrap(); // 102
    t.set(1_000);
    s.delete("b").unwrap(); // 1000
    s.set("c", "1").unwrap(); // 1001
    let seq = s.local_seq();
    assert_eq!(s.gc_tombstones(500).unwrap(), 1);
    assert_eq!(s.local_seq(), seq, "GC is no change to propagate");
    assert_eq!(s.get("a").unwrap(), None);
    assert!(s.get("b").unwrap().unwrap().is_tombstone());
    let keys: Vec<_> = s
        .changes_since(0, usize::MAX)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["b", "c"]);
    // A late write older than the horizon for the collected key is ignored…
    let r = s
        .apply_remote(&[entry("a", Some("old"), 50, "beta")])
        .unwrap();
    assert_eq!((r.applied, r.ignored_older), (0, 1));
    assert_eq!(s.get("a").unwrap(), None);
    // …a newer one is accepted, as are local writes.
    let r = s
        .apply_remote(&[entry("a", Some("new"), 600, "beta")])
        .unwrap();
    assert_eq!(r.applied, 1);
    assert_eq!(s.gc_horizon(), 500);
    assert!(s.set("d", "1").unwrap().stamp > 500);
}

#[test]
fn invalid_keys_and_values_are_refused() {
    let t = ManualTime::new(1);
    let mut s = mem_store("alpha", &t);
    for bad in ["", "a b", "/a", "a/", "a//b", "a/../b", "./a", "ä"] {
        assert!(
            matches!(s.set(bad, "v"), Err(MetaError::InvalidKey { .. })),
            "{bad:?}"
        );
        assert!(matches!(s.delete(bad), Err(MetaError::InvalidKey { .. })));
    }
    let long = "v".repeat(mars_meta::MAX_VALUE_LEN + 1);
    assert!(matches!(
        s.set("k", &long),
        Err(MetaError::ValueTooLong { .. })
    ));
    let r = s
        .apply_remote(&[
            entry("a//b", Some("v"), 1, "beta"),
            entry("k", Some(&long), 1, "beta"),
        ])
        .unwrap();
    assert_eq!(r.refused.len(), 2);
    assert_eq!(s.local_seq(), 0);
}

#[test]
fn changes_since_pages_in_seq_order() {
    let t = ManualTime::new(1);
    let mut s = mem_store("alpha", &t);
    for i in 0..10 {
        s.set(&format!("k{i}"), "v").unwrap();
    }
    s.set("k3", "again").unwrap(); // k3 moves to seq 11
    let c = s.changes_since(0, 4).unwrap();
    let keys: Vec<_> = c.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["k0", "k1", "k2", "k4"]);
    assert_eq!((c.up_to, c.local_seq, c.is_complete()), (5, 11, false));
    let c = s.changes_since(c.up_to, 100).unwrap();
    let keys: Vec<_> = c.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["k5", "k6", "k7", "k8", "k9", "k3"]);
    assert!(c.is_complete());
    let c = s.changes_since(11, 100).unwrap();
    assert!(c.entries.is_empty() && c.is_complete());
    let c = s.changes_since(3, 0).unwrap();
    assert_eq!((c.entries.len(), c.up_to), (0, 3));
    // A cursor beyond the store's seq: the store was replaced.
    let c = s.changes_since(50, 10).unwrap();
    assert!(c.entries.is_empty() && c.local_seq < 50);
}

#[test]
fn seq_index_stays_proportional_to_keys() {
    let t = ManualTime::new(1);
    let mut s = mem_store("alpha", &t);
    for i in 0..1000 {
        s.set("resource-vm1/primary", &i.to_string()).unwrap();
    }
    assert_eq!(s.local_seq(), 1000);
    let c = s.changes_since(0, usize::MAX).unwrap();
    assert_eq!(c.entries.len(), 1);
    assert_eq!(c.entries[0].value.as_deref(), Some("999"));
    assert_eq!(s.changes_since(999, 10).unwrap().entries.len(), 1);
    assert_eq!(s.changes_since(1000, 10).unwrap().entries.len(), 0);
}

#[test]
fn relay_through_third_host() {
    let t = ManualTime::new(1);
    let mut a = mem_store("alpha", &t);
    let mut b = mem_store("beta", &t);
    let mut c = mem_store("gamma", &t);
    let e = a.set("resource-vm1/primary", "alpha").unwrap();
    b.apply_remote(&a.changes_since(0, 10).unwrap().entries)
        .unwrap();
    c.apply_remote(&b.changes_since(0, 10).unwrap().entries)
        .unwrap();
    assert_eq!(c.get("resource-vm1/primary").unwrap().unwrap(), e);
    assert_eq!(c.local_seq(), 1);
}

#[test]
fn set_many_is_one_all_or_nothing_change_set() {
    let (_t, mut a, _b) = pair();
    let seq = a.local_seq();
    let written = a.set_many(&[("x/one", "1"), ("x/two", "2")]).unwrap();
    assert_eq!(written.len(), 2);
    assert!(written[1].stamp > written[0].stamp);
    assert_eq!(a.local_seq(), seq + 2);
    assert_eq!(a.value("x/two").unwrap().as_deref(), Some("2"));
    // One refused key refuses the whole batch.
    let seq = a.local_seq();
    assert!(a.set_many(&[("x/three", "3"), ("bad key", "4")]).is_err());
    assert_eq!(a.local_seq(), seq);
    assert_eq!(a.value("x/three").unwrap(), None);
}
