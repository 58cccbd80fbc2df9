//! Property test: three replicas with random writes, clocks and partial syncs converge to the
//! same map (tombstones included) whatever the delivery order and duplication, the result is
//! the last-writer-wins maximum of every write, applying a batch twice changes nothing, and
//! `changes_since(N)` returns exactly the keys changed after N.

mod common;

use std::collections::BTreeMap;

use common::*;
use mars_meta::{Entry, MetaError, Store};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const HOSTS: [&str; 3] = ["alpha", "beta", "gamma"];

/// Shared keys, then per host an owned `actual-H/alive` and `resource-vm1/replay-H`.
fn keys() -> Vec<(String, Option<usize>)> {
    let mut k: Vec<(String, Option<usize>)> = [
        "resource-vm1/primary",
        "resource-vm1/size",
        "defaults/sync-limit",
    ]
    .iter()
    .map(|k| (k.to_string(), None))
    .collect();
    for (i, h) in HOSTS.iter().enumerate() {
        k.push((format!("actual-{h}/alive"), Some(i)));
        k.push((format!("resource-vm1/replay-{h}"), Some(i)));
    }
    k
}

#[derive(Debug, Clone)]
enum Op {
    /// Host writes key (value None = delete).
    Write {
        host: usize,
        key: usize,
        value: Option<u8>,
    },
    /// Host's real time jumps (forwards or backwards).
    Time { host: usize, t: u64 },
    /// `to` pulls from `from`, starting at a random recorded seq, at most `limit` entries.
    Sync {
        from: usize,
        to: usize,
        start: usize,
        limit: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..9usize, proptest::option::weighted(0.75, 0..4u8))
            .prop_map(|(host, key, value)| Op::Write { host, key, value }),
        1 => (0..3usize, 0..200u64).prop_map(|(host, t)| Op::Time { host, t }),
        2 => (0..3usize, 0..3usize, any::<usize>(), 1..6usize)
            .prop_map(|(from, to, start, limit)| Op::Sync { from, to, start, limit }),
    ]
}

type Map = BTreeMap<String, Entry>;

fn map(s: &Store) -> Map {
    dump(s).into_iter().map(|e| (e.key.clone(), e)).collect()
}

struct Replica {
    store: Store,
    time: ManualTime,
    /// (local seq, map at that seq) after every change.
    history: Vec<(u64, Map)>,
}

impl Replica {
    fn record(&mut self) {
        if self.history.last().map(|h| h.0) != Some(self.store.local_seq()) {
            self.history
                .push((self.store.local_seq(), map(&self.store)));
        }
    }
}

/// Pulls `from` → `to`, checks idempotence and the `changes_since` contract.
fn sync(reps: &mut [Replica], from: usize, to: usize, since: u64, limit: usize) -> u64 {
    let changes = reps[from].store.changes_since(since, limit).unwrap();
    // changes_since(N) without limit = exactly the keys whose entry differs from the map at N.
    let all = reps[from].store.changes_since(since, usize::MAX).unwrap();
    if let Some((_, at_n)) = reps[from].history.iter().find(|h| h.0 == since) {
        let now = map(&reps[from].store);
        let mut expected: Vec<&String> = now
            .iter()
            .filter(|(k, e)| at_n.get(*k) != Some(e))
            .map(|(k, _)| k)
            .collect();
        let mut got: Vec<&String> = all.entries.iter().map(|e| &e.key).collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "changes_since({since})");
        assert!(all.is_complete());
    }
    assert_eq!(changes.entries[..], all.entries[..changes.entries.len()]);
    let r = reps[to].store.apply_remote(&changes.entries).unwrap();
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    reps[to].record();
    // Idempotence: the same batch again changes nothing.
    let (seq, before) = (reps[to].store.local_seq(), map(&reps[to].store));
    let again = reps[to].store.apply_remote(&changes.entries).unwrap();
    assert_eq!(again.applied, 0);
    assert_eq!(reps[to].store.local_seq(), seq);
    assert_eq!(map(&reps[to].store), before);
    changes.up_to
}

fn run(ops: Vec<Op>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let keys = keys();
    let mut reps: Vec<Replica> = HOSTS
        .iter()
        .map(|h| {
            let time = ManualTime::new(0);
            Replica {
                store: mem_store(h, &time),
                time,
                history: vec![(0, Map::new())],
            }
        })
        .collect();
    // Every write that succeeded: the converged map must be their LWW maximum.
    let mut written: Vec<Entry> = Vec::new();
    // Membership first, everywhere.
    for (i, h) in HOSTS.iter().enumerate() {
        written.push(
            reps[i]
                .store
                .set(&format!("ips/ip-{h}"), "10.0.0.1")
                .unwrap(),
        );
        reps[i].record();
    }
    for from in 0..3 {
        for to in 0..3 {
            if from != to {
                sync(&mut reps, from, to, 0, usize::MAX);
            }
        }
    }

    for op in ops {
        match op {
            Op::Write { host, key, value } => {
                let (k, owner) = &keys[key];
                let s = &mut reps[host].store;
                let res = match value {
                    Some(v) => s.set(k, &v.to_string()),
                    None => s.delete(k),
                };
                match (owner, res) {
                    (Some(o), Err(MetaError::NotOwner { .. })) if *o != host => {}
                    (Some(o), r) if *o != host => panic!("{k} written by {host}: {r:?}"),
                    (_, r) => written.push(r.unwrap()),
                }
                reps[host].record();
            }
            Op::Time { host, t } => reps[host].time.set(t),
            Op::Sync {
                from,
                to,
                start,
                limit,
            } => {
                if from != to {
                    let h = &reps[from].history;
                    let since = h[start % h.len()].0;
                    sync(&mut reps, from, to, since, limit);
                }
            }
        }
    }

    // Anti-entropy with cursors and random page sizes until a whole round changes nothing.
    let mut cursor = [[0u64; 3]; 3];
    let mut pairs: Vec<(usize, usize)> = (0..3)
        .flat_map(|a| (0..3).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    for round in 0.. {
        assert!(round < 10, "no convergence");
        pairs.shuffle(&mut rng);
        let seqs: Vec<u64> = reps.iter().map(|r| r.store.local_seq()).collect();
        for &(from, to) in &pairs {
            loop {
                let limit = rng.gen_range(1..8);
                let up_to = sync(&mut reps, from, to, cursor[to][from], limit);
                cursor[to][from] = up_to;
                if up_to == reps[from].store.local_seq() {
                    break;
                }
            }
        }
        if reps.iter().map(|r| r.store.local_seq()).eq(seqs) {
            break;
        }
    }
    let final_map = map(&reps[0].store);
    for r in &reps[1..] {
        assert_eq!(map(&r.store), final_map, "replicas differ");
    }

    // The converged entry of every key is the LWW maximum of all writes to it.
    let mut expected = Map::new();
    for e in &written {
        match expected.get(&e.key) {
            Some(old) if !e.supersedes(old) => {}
            _ => {
                expected.insert(e.key.clone(), e.clone());
            }
        }
    }
    assert_eq!(final_map, expected, "not the LWW maximum");

    // Random order with duplication: a fresh observer fed every write, shuffled, in random
    // chunks, some twice, ends with the same map.
    let mut feed = written.clone();
    for _ in 0..feed.len() / 3 {
        let e = feed[rng.gen_range(0..feed.len())].clone();
        feed.push(e);
    }
    feed.shuffle(&mut rng);
    let t = ManualTime::new(0);
    let mut observer = mem_store("omega", &t);
    let mut rest = &feed[..];
    while !rest.is_empty() {
        let n = rng.gen_range(1..=rest.len().min(5));
        let r = observer.apply_remote(&rest[..n]).unwrap();
        assert!(r.refused.is_empty(), "{:?}", r.refused);
        rest = &rest[n..];
    }
    assert_eq!(map(&observer), final_map, "order-dependent result");

    // Redelivering everything to the converged replicas changes nothing.
    for r in &mut reps {
        let seq = r.store.local_seq();
        let report = r.store.apply_remote(&feed).unwrap();
        assert_eq!(report.applied, 0);
        assert_eq!(r.store.local_seq(), seq);
        assert_eq!(map(&r.store), final_map);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge(ops in proptest::collection::vec(op(), 0..60), seed in any::<u64>()) {
        run(ops, seed);
    }
}
