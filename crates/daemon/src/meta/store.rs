//! The metadata store's owner thread.
//!
//! `mars_meta::Store` is redb underneath: every write commits (and syncs) a transaction. One
//! thread owns the store and runs jobs sent to it in order, so that no store work ever runs on
//! the async workers that carry NBD requests and peers, and writers never contend for a lock.
//!
//! After every job that changed the store, the thread tells the watchers which parts changed:
//! each resource's watcher (keys below `resource-RES/`) and the global one (membership,
//! liveness stamps, defaults). A watcher is a `tokio::sync::watch` of a change counter, so a
//! burst of changes wakes it once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mars_config::ResourceName;
use mars_engine::ResourceMeta;
use mars_meta::{Entry, Store};
use tokio::sync::{oneshot, watch};

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// Watchers of store changes.
struct Watches {
    resources: Mutex<HashMap<ResourceName, watch::Sender<u64>>>,
    global: Mutex<Option<watch::Sender<u64>>>,
    /// The store's local change counter after every change (what peers pull up to).
    seq: watch::Sender<u64>,
}

/// A handle to the store thread; clones share it.
#[derive(Clone)]
pub struct MetaStore {
    tx: std::sync::mpsc::Sender<Job>,
    watches: Arc<Watches>,
}

/// The store thread has ended (the daemon is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the metadata store is closed")]
pub struct Closed;

impl MetaStore {
    /// Starts the owner thread for `store`.
    pub fn start(store: Store) -> std::io::Result<MetaStore> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let watches = Arc::new(Watches {
            resources: Mutex::default(),
            global: Mutex::default(),
            seq: watch::channel(store.local_seq()).0,
        });
        let w = watches.clone();
        std::thread::Builder::new()
            .name("meta-store".into())
            .spawn(move || {
                let mut store = store;
                while let Ok(job) = rx.recv() {
                    let before = store.local_seq();
                    job(&mut store);
                    if store.local_seq() != before {
                        notify(&store, before, &w);
                    }
                }
            })?;
        Ok(MetaStore { tx, watches })
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> R + Send + 'static,
    ) -> Result<R, Closed> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |s| {
                let _ = tx.send(f(s));
            }))
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Replaces the store (leave-cluster starts from an empty one); returns the old one's
    /// drop result.
    pub async fn replace(&self, new: Store) -> Result<(), Closed> {
        self.call(move |s| {
            *s = new;
        })
        .await?;
        // Everything may have changed.
        for w in self
            .watches
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            w.send_modify(|n| *n += 1);
        }
        if let Some(g) = &*self
            .watches
            .global
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            g.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// A watch that changes whenever a key of `res` changes.
    pub fn watch_resource(&self, res: &ResourceName) -> watch::Receiver<u64> {
        let mut map = self
            .watches
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.entry(res.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Stops watching `res` (its actor ended).
    pub fn unwatch_resource(&self, res: &ResourceName) {
        self.watches
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(res);
    }

    /// A watch that changes whenever a key outside `resource-*/` changes (members, liveness
    /// stamps, defaults).
    pub fn watch_global(&self) -> watch::Receiver<u64> {
        let mut g = self
            .watches
            .global
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// A watch of the store's local change counter (every local write and every applied
    /// remote change moves it).
    pub fn watch_seq(&self) -> watch::Receiver<u64> {
        self.watches.seq.subscribe()
    }

    /// What the metadata says about `res` now.
    pub async fn resource_meta(&self, res: &ResourceName) -> Result<ResourceMeta, String> {
        let r = res.clone();
        self.call(move |s| resource_meta(s, &r))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Writes keys and deletes keys in one call; returns the new entries (their stamps).
    pub async fn write(
        &self,
        set: Vec<(String, String)>,
        delete: Vec<String>,
    ) -> Result<Vec<Entry>, String> {
        self.call(move |s| write(s, &set, &delete))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Installs this host's authority (`None` with `--insecure`), writes `set` (its
    /// certificate first, then what it signs) and signs anew what this host owns (see
    /// `Store::resign_own`); returns how many entries were signed anew.
    pub async fn announce(
        &self,
        authority: Option<Arc<dyn mars_meta::Authority>>,
        set: Vec<(String, String)>,
    ) -> Result<usize, String> {
        self.call(move |s| {
            if authority.is_some() {
                s.set_authority(authority);
            }
            write(s, &set, &[])?;
            s.resign_own().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    pub async fn value(&self, key: &str) -> Result<Option<String>, String> {
        let k = key.to_string();
        self.call(move |s| s.value(&k).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }
}

/// Writes `set` in one transaction, then the deletions.
pub fn write(
    s: &mut Store,
    set: &[(String, String)],
    delete: &[String],
) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    if !set.is_empty() {
        let refs: Vec<(&str, &str)> = set.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        out = s.set_many(&refs).map_err(|e| e.to_string())?;
    }
    for k in delete {
        // Deleting what is not there is no change.
        if s.value(k).map_err(|e| e.to_string())?.is_some() {
            out.push(s.delete(k).map_err(|e| e.to_string())?);
        }
    }
    Ok(out)
}

/// Reads a resource's metadata from the store (with the stamps decisions need).
pub fn resource_meta(store: &Store, res: &ResourceName) -> Result<ResourceMeta, String> {
    let entries = store
        .list_prefix(&mars_engine::keys::prefix(res))
        .map_err(|e| e.to_string())?;
    Ok(ResourceMeta::from_stamped(
        res.clone(),
        entries
            .iter()
            .filter_map(|e| e.value.as_deref().map(|v| (e.key.as_str(), v, e.stamp))),
    ))
}

/// Tells the watchers what changed after `before`.
fn notify(store: &Store, before: u64, w: &Watches) {
    w.seq.send_replace(store.local_seq());
    let changes = match store.changes_since(before, usize::MAX) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("metadata change listing: {e}");
            return;
        }
    };
    let mut global = false;
    let mut touched: Vec<ResourceName> = Vec::new();
    for e in &changes.entries {
        match mars_engine::keys::parse(&e.key) {
            Some((res, _)) => {
                if !touched.contains(&res) {
                    touched.push(res);
                }
            }
            None => global = true,
        }
    }
    if !touched.is_empty() {
        let map = w.resources.lock().unwrap_or_else(|e| e.into_inner());
        for r in touched {
            if let Some(tx) = map.get(&r) {
                tx.send_modify(|n| *n += 1);
            }
        }
    }
    if global {
        if let Some(g) = &*w.global.lock().unwrap_or_else(|e| e.into_inner()) {
            g.send_modify(|n| *n += 1);
        }
    }
}
