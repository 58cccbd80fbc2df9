//! `Store::forget`: the local forgetting at the end of a cluster split — entries removed
//! without deletions, the guard that refuses relays of what was forgotten, and its lifetime.

mod common;

use std::collections::BTreeSet;

use common::*;
use mars_config::{HostName, ResourceName};
use mars_meta::{MetaError, Store};

fn hosts(names: &[&str]) -> BTreeSet<HostName> {
    names.iter().map(|n| host(n)).collect()
}

fn resources(names: &[&str]) -> BTreeSet<ResourceName> {
    names
        .iter()
        .map(|n| ResourceName::new(n).unwrap())
        .collect()
}

fn pull(from: &Store, to: &mut Store) -> mars_meta::ApplyReport {
    let c = from.changes_since(0, usize::MAX).unwrap();
    to.apply_remote(&c.entries).unwrap()
}

/// One cluster of four about to split: a1, a2 share `ra`; b1, b2 share `rb` (and `b1` is a
/// host whose name is a suffix of a kept host's, `x-b1`, to check ownership by the longest
/// name). Every store holds everything.
fn cluster(t: &ManualTime) -> Vec<Store> {
    let names = ["a1", "a2", "b1", "b2", "x-b1"];
    let mut stores: Vec<Store> = names.iter().map(|n| mem_store(n, t)).collect();
    for (i, s) in stores.iter_mut().enumerate() {
        let n = names[i];
        s.set(&format!("ips/ip-{n}"), "10.0.0.1").unwrap();
        s.set(&format!("certs/cert-{n}"), "fp").unwrap();
        s.set(&format!("actual-{n}/alive"), "1").unwrap();
    }
    stores[0].set("resource-ra/size", "1G").unwrap();
    stores[0].set("resource-ra/data-a1", "/dev/x").unwrap();
    stores[1].set("resource-ra/data-a2", "/dev/x").unwrap();
    stores[2].set("resource-rb/size", "1G").unwrap();
    stores[2].set("resource-rb/data-b1", "/dev/y").unwrap();
    stores[3].set("resource-rb/data-b2", "/dev/y").unwrap();
    stores[3].set("resource-rb/primary", "b2").unwrap();
    // A shared key of a kept resource last written by a host that goes.
    stores[2].set("resource-ra/primary", "a1").unwrap();
    // A tombstone of the other side.
    stores[3].set("resource-rb/todo-b2/attach", "1").unwrap();
    stores[3].delete("resource-rb/todo-b2/attach").unwrap();
    stores[4].set("resource-ra/data-x-b1", "/dev/z").unwrap();
    // Everyone pulls from everyone twice (relays included).
    for _ in 0..2 {
        for i in 0..stores.len() {
            for j in 0..stores.len() {
                if i != j {
                    let c = stores[j].changes_since(0, usize::MAX).unwrap();
                    stores[i].apply_remote(&c.entries).unwrap();
                }
            }
        }
    }
    assert_eq!(stores[0].members().len(), 5);
    stores
}

fn keys(s: &Store) -> Vec<String> {
    dump(s).into_iter().map(|e| e.key).collect()
}

#[test]
fn forgetting_removes_the_other_side_without_writing_deletions() {
    let t = ManualTime::new(1_000);
    let mut st = cluster(&t);
    t.set(2_000);
    let a1 = &mut st[0];
    let seq = a1.local_seq();
    let r = a1
        .forget(&hosts(&["b1", "b2"]), &resources(&["rb"]), 1_500)
        .unwrap();
    let left = keys(a1);
    for k in &left {
        assert!(!k.contains("rb"), "{k} was kept");
        assert!(!k.ends_with("-b1") || k.ends_with("x-b1"), "{k} was kept");
        assert!(!k.contains("-b2"), "{k} was kept");
    }
    // The kept side is intact: its members, the longer name x-b1 and its data key, and the
    // shared key of `ra` that b1 wrote last.
    for k in [
        "ips/ip-a1",
        "ips/ip-a2",
        "ips/ip-x-b1",
        "certs/cert-x-b1",
        "actual-x-b1/alive",
        "resource-ra/data-x-b1",
        "resource-ra/primary",
        "resource-ra/size",
    ] {
        assert!(left.iter().any(|l| l == k), "{k} is gone: {left:?}");
    }
    // 3 per host for b1 and b2, rb's size, two data keys, primary, and the tombstone.
    assert_eq!(r.removed, 6 + 5);
    assert_eq!(a1.members(), &hosts(&["a1", "a2", "x-b1"]));
    // No deletion was written: nothing new for a peer to pull.
    assert_eq!(a1.local_seq(), seq);
    assert!(a1
        .changes_since(seq, usize::MAX)
        .unwrap()
        .entries
        .is_empty());
    assert!(dump(a1).iter().all(|e| !e.is_tombstone()));
}

#[test]
fn a_relay_of_forgotten_entries_is_refused_but_newer_ones_are_taken() {
    let t = ManualTime::new(1_000);
    let mut st = cluster(&t);
    t.set(2_000);
    let a2 = st.remove(1);
    let mut a1 = st.remove(0);
    a1.forget(&hosts(&["b1", "b2"]), &resources(&["rb"]), 1_500)
        .unwrap();
    // a2 has not forgotten yet and relays everything it holds.
    let r = pull(&a2, &mut a1);
    assert_eq!(r.applied, 0, "{r:?}");
    assert_eq!(r.refused.len(), 11, "{:?}", r.refused);
    assert!(r
        .refused
        .iter()
        .all(|(_, e)| matches!(e, MetaError::Forgotten { guard: 1_500, .. })));
    assert!(!keys(&a1).iter().any(|k| k.contains("rb")));
    // A resource and a host of those names made later are accepted.
    let mut b1 = mem_store("b1", &t);
    b1.set("ips/ip-b1", "10.0.0.9").unwrap();
    b1.set("resource-rb/size", "2G").unwrap();
    let r = pull(&b1, &mut a1);
    assert_eq!((r.applied, r.refused.len()), (2, 0), "{r:?}");
    assert!(a1.members().contains(&host("b1")));
}

#[test]
fn the_guard_survives_a_restart_and_goes_with_the_tombstone_horizon() {
    let t = ManualTime::new(1_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let mut st = cluster(&t);
    let b2 = st.remove(3);
    t.set(2_000);
    {
        let mut a1 = Store::open(&path, host("a1"), t.source()).unwrap();
        pull(&st[0], &mut a1);
        a1.forget(&hosts(&["b1", "b2"]), &resources(&["rb"]), 1_500)
            .unwrap();
        // Forgetting again later raises the guard; another resource is added.
        a1.forget(&hosts(&["b2"]), &resources(&["old"]), 1_600)
            .unwrap();
    }
    let mut a1 = Store::open(&path, host("a1"), t.source()).unwrap();
    let f = a1.forgotten().clone();
    assert_eq!(f.hosts.get(&host("b1")), Some(&1_500));
    assert_eq!(f.hosts.get(&host("b2")), Some(&1_600));
    assert_eq!(f.resources.len(), 2);
    let r = pull(&b2, &mut a1);
    assert_eq!(r.applied, 0, "{r:?}");
    assert!(!r.refused.is_empty());
    // The tombstone horizon takes over from the guard: rows older than it go, and the
    // horizon itself still ignores the old entries for keys the store does not hold.
    a1.gc_tombstones(1_550).unwrap();
    let f = a1.forgotten().clone();
    assert_eq!(
        f.hosts.keys().cloned().collect::<Vec<_>>(),
        vec![host("b2")]
    );
    assert_eq!(
        f.resources.keys().map(|r| r.as_str()).collect::<Vec<_>>(),
        vec!["old"]
    );
    let r = pull(&b2, &mut a1);
    assert_eq!(r.applied, 0, "{r:?}");
    drop(a1);
    let a1 = Store::open(&path, host("a1"), t.source()).unwrap();
    assert_eq!(a1.forgotten().hosts.len(), 1);
}

#[test]
fn a_host_cannot_forget_itself_and_a_refusal_changes_nothing() {
    let t = ManualTime::new(1_000);
    let mut st = cluster(&t);
    let a1 = &mut st[0];
    let before = dump(a1);
    let err = a1
        .forget(&hosts(&["a1", "b1"]), &resources(&["rb"]), 1_500)
        .unwrap_err();
    assert!(matches!(err, MetaError::ForgetSelf { .. }), "{err}");
    // A guard stamp far in the future is refused as any such stamp.
    let err = a1
        .forget(&hosts(&["b1"]), &resources(&[]), u64::MAX / 2)
        .unwrap_err();
    assert!(
        matches!(err, MetaError::StampTooFarInFuture { .. }),
        "{err}"
    );
    assert_eq!(dump(a1), before);
    assert!(a1.forgotten().is_empty());
}
