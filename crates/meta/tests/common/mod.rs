#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mars_config::HostName;
use mars_meta::{Entry, Store};

/// A settable time source.
#[derive(Clone)]
pub struct ManualTime(pub Arc<AtomicU64>);

impl ManualTime {
    pub fn new(t: u64) -> Self {
        ManualTime(Arc::new(AtomicU64::new(t)))
    }
    pub fn set(&self, t: u64) {
        self.0.store(t, Ordering::SeqCst);
    }
    pub fn source(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let t = self.0.clone();
        move || t.load(Ordering::SeqCst)
    }
}

pub fn host(name: &str) -> HostName {
    HostName::new(name).unwrap()
}

pub fn mem_store(name: &str, time: &ManualTime) -> Store {
    Store::in_memory(host(name), time.source()).unwrap()
}

pub fn entry(key: &str, value: Option<&str>, stamp: u64, origin: &str) -> Entry {
    Entry {
        key: key.to_owned(),
        value: value.map(str::to_owned),
        stamp,
        origin: host(origin),
        sig: None,
    }
}

/// Everything a store holds, tombstones included.
pub fn dump(s: &Store) -> Vec<Entry> {
    s.list_prefix_with_tombstones("").unwrap()
}
