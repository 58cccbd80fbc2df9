//! The store: last-writer-wins merge, ownership checks, seq bookkeeping, redb persistence.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use mars_config::{HostName, ResourceName};
use redb::{Database, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::auth::{cert_key, writer_of, Authority};
use crate::clock::{Clock, Stamp};
use crate::key::{cert_of_key, member_of_key, owner_of, validate_key, MAX_VALUE_LEN};
use crate::{MetaError, Result};

/// key → JSON [`Record`].
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// seq of a key's last change → key (exactly one row per stored key).
const SEQS: TableDefinition<u64, &str> = TableDefinition::new("seq_index");
/// Small counters, see the `META_*` keys.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The guard of [`Store::forget`] (`split-forgotten`): `host/NAME` or `resource/NAME` → the
/// stamp it was forgotten at. An entry naming it with a stamp not above that is refused.
const FORGOTTEN: TableDefinition<&str, u64> = TableDefinition::new("forgotten");
/// Guard rows are `host/` + host name or `resource/` + resource name.
const GUARD_HOST: &str = "host/";
const GUARD_RESOURCE: &str = "resource/";

/// The last local seq handed out.
const META_SEQ: &str = "seq";
/// The clock's last stamp.
const META_CLOCK: &str = "clock";
/// The largest horizon passed to `gc_tombstones`.
const META_GC_HORIZON: &str = "gc_horizon";

/// One key's current state as replicated between hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    /// `None` is a tombstone: the key was deleted.
    pub value: Option<String>,
    pub stamp: Stamp,
    /// The host that wrote this entry.
    pub origin: HostName,
    /// The writer's signature over [`Entry::signed_message`], for entries only their writer
    /// may write (see [`crate::auth`]); `None` for shared keys and in clusters without
    /// certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<Vec<u8>>,
}

impl Entry {
    /// Whether this is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Whether this entry wins over `other` for the same key: higher stamp; on equal stamps the
    /// greater origin host name; on equal stamp and origin (a malformed duplicate) the greater
    /// value, a tombstone being the smallest. Identical entries do not supersede each other.
    pub fn supersedes(&self, other: &Entry) -> bool {
        self.rank() > other.rank()
    }

    fn rank(&self) -> (Stamp, &str, Option<&str>) {
        // (The signature is not part of the rank: it only says who wrote the entry.)
        (self.stamp, self.origin.as_str(), self.value.as_deref())
    }
}

/// What the store keeps per key: the entry's fields plus the local seq of its last change.
#[derive(Clone, Serialize, Deserialize)]
struct Record {
    value: Option<String>,
    stamp: Stamp,
    origin: HostName,
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sig: Option<Vec<u8>>,
}

/// The answer to [`Store::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// Current entries (tombstones included) whose last change is after the requested seq, in
    /// seq order.
    pub entries: Vec<Entry>,
    /// The asker has now seen everything up to this seq: the seq of the last entry returned if
    /// `limit` cut the list short, else `local_seq`. Ask again from here.
    pub up_to: u64,
    /// The answering store's current seq. If it is below the seq asked for, that store was
    /// replaced and the asker should start again from 0.
    pub local_seq: u64,
}

impl Changes {
    /// Whether nothing after `up_to` is left.
    pub fn is_complete(&self) -> bool {
        self.up_to == self.local_seq
    }
}

/// What [`Store::rebase_future`] did to a store whose clock was too far ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebased {
    /// The clock's last stamp before.
    pub from: Stamp,
    /// The clock's last stamp after (above every stamp kept).
    pub to: Stamp,
    /// This host's entries stamped anew, in their order.
    pub restamped: usize,
    /// Other hosts' entries with such stamps, dropped (no correct host accepts them; their
    /// writers publish them again).
    pub dropped: usize,
}

/// What [`Store::apply_remote`] did with a batch.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Entries that won and were stored (each got a new local seq).
    pub applied: usize,
    /// Entries that lost against the stored entry (or are older than the GC horizon for a key
    /// the store no longer holds).
    pub ignored_older: usize,
    /// Entries identical to the stored one.
    pub duplicates: usize,
    /// Entries refused: invalid key or value, origin not the key's owner, stamp too far in the
    /// future. Nothing else in the batch is affected.
    pub refused: Vec<(String, MetaError)>,
}

/// The replicated metadata store of one host. Writers take `&mut self`; the daemon wraps the
/// store in a mutex.
pub struct Store {
    db: Database,
    host: HostName,
    clock: Clock,
    seq: u64,
    gc_horizon: Stamp,
    /// Hosts with a live `ips/ip-HOST` key, plus this host.
    members: BTreeSet<HostName>,
    /// Signs what this host owns and checks what others own (`None`: origins are trusted).
    authority: Option<Arc<dyn Authority>>,
    /// The guard of [`Store::forget`]: what was forgotten and the stamp it was forgotten at.
    forgotten: Forgotten,
}

/// The guard of [`Store::forget`]: hosts and resources this store forgot (when its cluster
/// split), each with the stamp it was forgotten at. An entry that names one of them with a
/// stamp not above that stamp is refused, whoever relays it, so a host of the same side that
/// forgot later cannot bring it back; a host or resource of that name made later (with a
/// newer stamp) is accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub hosts: std::collections::BTreeMap<HostName, Stamp>,
    pub resources: std::collections::BTreeMap<ResourceName, Stamp>,
}

impl Forgotten {
    /// The stamp `key` was forgotten at, if it names a forgotten host — its membership
    /// (`ips/ip-HOST`), its certificate (`certs/cert-HOST`) or a key it owns among `members`
    /// and the forgotten hosts (so a kept member `a-b` keeps `data-a-b` when `b` is forgotten)
    /// — or a forgotten resource (a key under `resource-NAME/`). Who wrote an entry does not
    /// count: a shared key of a kept resource stays whoever wrote it last.
    pub fn names(&self, key: &str, members: &BTreeSet<HostName>) -> Option<Stamp> {
        let mut guard: Option<Stamp> = None;
        let mut note = |stamp: Stamp| guard = Some(guard.map_or(stamp, |g| g.max(stamp)));
        if self.is_empty() {
            return None;
        }
        let named = member_of_key(key).or_else(|| cert_of_key(key));
        if let Some(&s) = named.as_ref().and_then(|h| self.hosts.get(h)) {
            note(s);
        }
        if !self.hosts.is_empty() {
            let mut all = members.clone();
            all.extend(self.hosts.keys().cloned());
            if let Some(&s) = owner_of(key, &all).and_then(|h| self.hosts.get(&h)) {
                note(s);
            }
        }
        let res = key
            .strip_prefix("resource-")
            .and_then(|k| k.split('/').next());
        if let Some(&s) = res
            .and_then(|r| ResourceName::new(r).ok())
            .and_then(|r| self.resources.get(&r))
        {
            note(s);
        }
        guard
    }

    /// The guard stamp that refuses `e`: it names something forgotten ([`Forgotten::names`])
    /// and is not newer than the moment that was forgotten.
    pub fn refuses(&self, e: &Entry, members: &BTreeSet<HostName>) -> Option<Stamp> {
        self.names(&e.key, members).filter(|&g| e.stamp <= g)
    }

    /// Whether nothing is forgotten.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.resources.is_empty()
    }
}

/// What [`Store::forget`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetReport {
    /// Entries removed (tombstones included), without writing deletions.
    pub removed: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("host", &self.host)
            .field("seq", &self.seq)
            .field("members", &self.members)
            .field("authenticated", &self.authority.is_some())
            .finish_non_exhaustive()
    }
}

/// The three tables, opened in one write transaction.
struct Tables<'t> {
    entries: Table<'t, &'static str, &'static [u8]>,
    seqs: Table<'t, u64, &'static str>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(Tables {
            entries: txn.open_table(ENTRIES)?,
            seqs: txn.open_table(SEQS)?,
            meta: txn.open_table(META)?,
        })
    }

    fn load(&self, key: &str) -> Result<Option<Record>> {
        self.entries
            .get(key)?
            .map(|v| decode(key, v.value()))
            .transpose()
    }

    /// Stores `entry` as changed at `seq`, dropping the key's previous seq from the index.
    fn store(&mut self, entry: &Entry, old_seq: Option<u64>, seq: u64) -> Result<()> {
        if let Some(old) = old_seq {
            self.seqs.remove(old)?;
        }
        let record = Record {
            value: entry.value.clone(),
            stamp: entry.stamp,
            origin: entry.origin.clone(),
            seq,
            sig: entry.sig.clone(),
        };
        let bytes = serde_json::to_vec(&record).expect("a record always serializes");
        self.entries.insert(entry.key.as_str(), bytes.as_slice())?;
        self.seqs.insert(seq, entry.key.as_str())?;
        Ok(())
    }

    fn meta(&self, name: &str) -> Result<u64> {
        Ok(self.meta.get(name)?.map(|v| v.value()).unwrap_or(0))
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| MetaError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn entry_of(key: &str, r: Record) -> Entry {
    Entry {
        key: key.to_owned(),
        value: r.value,
        stamp: r.stamp,
        origin: r.origin,
        sig: r.sig,
    }
}

fn check_value(key: &str, value: Option<&str>) -> Result<()> {
    match value {
        Some(v) if v.len() > MAX_VALUE_LEN => Err(MetaError::ValueTooLong {
            key: key.to_owned(),
            len: v.len(),
        }),
        _ => Ok(()),
    }
}

impl Store {
    /// Opens (or creates) the store in the redb file at `path` for host `host`. The seq counter
    /// and the clock continue where they were; the clock never goes backwards, whatever `now`
    /// says.
    pub fn open(
        path: impl AsRef<Path>,
        host: HostName,
        now: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<Self> {
        Self::init(Database::create(path)?, host, now)
    }

    /// A store kept in memory (tests, simulation).
    pub fn in_memory(
        host: HostName,
        now: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<Self> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::init(db, host, now)
    }

    fn init(
        db: Database,
        host: HostName,
        now: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<Self> {
        let mut clock = Clock::new(Arc::new(now));
        let txn = db.begin_write()?;
        let (seq, gc_horizon) = {
            let t = Tables::open(&txn)?;
            clock.restore(t.meta(META_CLOCK)?);
            (t.meta(META_SEQ)?, t.meta(META_GC_HORIZON)?)
        };
        let forgotten = load_forgotten(&txn)?;
        txn.commit()?;
        let mut store = Store {
            db,
            host,
            clock,
            seq,
            gc_horizon,
            members: BTreeSet::new(),
            authority: None,
            forgotten,
        };
        store.members = store
            .list_prefix("ips/ip-")?
            .iter()
            .filter_map(|e| member_of_key(&e.key))
            .collect();
        store.members.insert(store.host.clone());
        Ok(store)
    }

    /// The same store with another limit for stamps ahead of local real time (default 30 days).
    pub fn with_max_future(mut self, max_future_ns: u64) -> Self {
        self.clock = self.clock.with_max_future(max_future_ns);
        self
    }

    /// From now on, signs the entries this host owns and accepts entries other hosts own only
    /// with their valid signatures (`None`: trusts the `origin` field, as an `--insecure`
    /// cluster must). Entries already stored are not checked again; see
    /// [`Store::resign_own`].
    pub fn set_authority(&mut self, authority: Option<Arc<dyn Authority>>) {
        self.authority = authority;
    }

    /// Whether an [`Authority`] is installed.
    pub fn is_authenticated(&self) -> bool {
        self.authority.is_some()
    }

    /// Writes every entry this host owns whose signature does not check out against this
    /// host's certificate in the store again, with a new stamp and a signature by the current
    /// authority: after it joined, created a cluster or renewed its certificate (then write the
    /// new certificate first), entries signed with an old key or unsigned ones would be refused
    /// by hosts that know only the new certificate. Returns how many were written (0 when all
    /// are signed with the current key, as after a plain restart).
    pub fn resign_own(&mut self) -> Result<usize> {
        let Some(auth) = self.authority.clone() else {
            return Ok(0);
        };
        let cert = self.value(&cert_key(&self.host))?;
        let own: Vec<(String, Option<String>)> = self
            .list_prefix_with_tombstones("")?
            .into_iter()
            .filter(|e| {
                writer_of(&e.key, e.is_tombstone(), &self.members).as_ref() == Some(&self.host)
            })
            // The certificate is the signatures' anchor and vouches for itself.
            .filter(|e| cert_of_key(&e.key).is_none())
            .filter(|e| match (&e.sig, &cert) {
                (Some(sig), Some(cert)) => auth
                    .verify(&self.host, cert, &e.signed_message(), sig)
                    .is_err(),
                _ => true,
            })
            .map(|e| (e.key, e.value))
            .collect();
        let pairs: Vec<(&str, Option<String>)> =
            own.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        Ok(self.write_local_many(&pairs)?.len())
    }

    /// Brings back a store whose clock is further ahead of local real time than the clock's
    /// future limit (30 days): its host ran with a clock that far ahead once. Every other host
    /// refuses such stamps, so without this everything the host writes is refused even after
    /// its clock is fixed. Entries stamped beyond the limit were accepted by no host with a
    /// correct clock: this host's own ones are stamped anew, in their old order, above every
    /// stamp kept (so the order of everything this store holds stays the same, and the clock
    /// still never issues a stamp below one it issued and any other host saw), and signed
    /// again if an authority is installed (else [`Store::resign_own`] does it); other hosts'
    /// ones are dropped. A tombstone horizon beyond the limit is reset to 0 (it came from the
    /// wrong clock and would make every remote entry look collected). `None`: nothing to do.
    pub fn rebase_future(&mut self) -> Result<Option<Rebased>> {
        let limit = self.clock.now().saturating_add(self.clock.max_future_ns());
        if self.clock.last() <= limit && self.gc_horizon <= limit {
            return Ok(None);
        }
        let from = self.clock.last();
        let (mut future, kept): (Vec<Entry>, Vec<Entry>) = self
            .list_prefix_with_tombstones("")?
            .into_iter()
            .partition(|e| e.stamp > limit);
        future.sort_by(|a, b| a.stamp.cmp(&b.stamp).then_with(|| a.key.cmp(&b.key)));
        let base = kept.iter().map(|e| e.stamp).max().unwrap_or(0);
        let horizon = if self.gc_horizon > limit {
            0
        } else {
            self.gc_horizon
        };
        let (seq, restamped, dropped) = self.local_transaction(|st, txn| {
            st.clock.rebase(base);
            let mut seq = st.seq;
            let (mut restamped, mut dropped) = (0, 0);
            let mut t = Tables::open(txn)?;
            for old in &future {
                let old_seq = t.load(&old.key)?.map(|r| r.seq);
                if old.origin != st.host {
                    t.entries.remove(old.key.as_str())?;
                    if let Some(s) = old_seq {
                        t.seqs.remove(s)?;
                    }
                    dropped += 1;
                    continue;
                }
                let entry = st.stamped(old.clone());
                // A new seq: peers that skipped the refused entry pull it again.
                seq += 1;
                t.store(&entry, old_seq, seq)?;
                restamped += 1;
            }
            t.meta.insert(META_SEQ, seq)?;
            t.meta.insert(META_CLOCK, st.clock.last())?;
            t.meta.insert(META_GC_HORIZON, horizon)?;
            Ok((seq, restamped, dropped))
        })?;
        self.seq = seq;
        self.gc_horizon = horizon;
        Ok(Some(Rebased {
            from,
            to: self.clock.last(),
            restamped,
            dropped,
        }))
    }

    /// Runs `f` in one write transaction for changes this host makes (its own entries, its
    /// clock): committed when `f` succeeds; when it fails nothing is stored and the clock is
    /// put back, so a failed write leaves no stamp issued that no entry carries.
    fn local_transaction<R>(
        &mut self,
        f: impl FnOnce(&mut Self, &WriteTransaction) -> Result<R>,
    ) -> Result<R> {
        let clock_before = self.clock.clone();
        let txn = self.db.begin_write()?;
        match f(self, &txn) {
            Ok(r) => {
                txn.commit()?;
                Ok(r)
            }
            Err(e) => {
                self.clock = clock_before;
                Err(e)
            }
        }
    }

    /// `entry` with a fresh stamp from this host's clock, signed when it is an owned key and
    /// this store signs (any old signature is dropped: it covered the old stamp).
    fn stamped(&mut self, mut entry: Entry) -> Entry {
        entry.stamp = self.clock.tick();
        entry.sig = None;
        if let Some(auth) = &self.authority {
            if writer_of(&entry.key, entry.is_tombstone(), &self.members).is_some() {
                entry.sig = Some(auth.sign(&entry.signed_message()));
            }
        }
        entry
    }

    /// This host.
    pub fn host(&self) -> &HostName {
        &self.host
    }

    /// The Lamport clock (its `last()` is the newest stamp issued or seen).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The local change counter: the seq of the last change applied to this store.
    pub fn local_seq(&self) -> u64 {
        self.seq
    }

    /// The largest horizon tombstones were collected at (0: never).
    pub fn gc_horizon(&self) -> Stamp {
        self.gc_horizon
    }

    /// The members: hosts with a live `ips/ip-HOST` key, plus this host.
    pub fn members(&self) -> &BTreeSet<HostName> {
        &self.members
    }

    /// The owner of `key` under the current membership, `None` for a shared key.
    pub fn owner_of(&self, key: &str) -> Option<HostName> {
        owner_of(key, &self.members)
    }

    /// The stored entry for `key`; a deleted key shows as a tombstone (value `None`).
    pub fn get(&self, key: &str) -> Result<Option<Entry>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let found = table.get(key)?;
        found
            .map(|v| decode(key, v.value()).map(|r| entry_of(key, r)))
            .transpose()
    }

    /// The live value of `key` (`None` if absent or deleted).
    pub fn value(&self, key: &str) -> Result<Option<String>> {
        Ok(self.get(key)?.and_then(|e| e.value))
    }

    /// Live entries whose key starts with `prefix`, in key order.
    pub fn list_prefix(&self, prefix: &str) -> Result<Vec<Entry>> {
        let mut all = self.list_prefix_with_tombstones(prefix)?;
        all.retain(|e| !e.is_tombstone());
        Ok(all)
    }

    /// Entries, tombstones included, whose key starts with `prefix`, in key order.
    pub fn list_prefix_with_tombstones(&self, prefix: &str) -> Result<Vec<Entry>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let mut out = Vec::new();
        for item in table.range(prefix..)? {
            let (k, v) = item?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(entry_of(key, decode(key, v.value())?));
        }
        Ok(out)
    }

    /// Sets `key` to `value` with a new stamp. Refused for invalid keys or values and for keys
    /// owned by another host.
    pub fn set(&mut self, key: &str, value: &str) -> Result<Entry> {
        self.write_local(key, Some(value.to_owned()))
    }

    /// Deletes `key` by writing a tombstone with a new stamp (also if the key is unknown here: a
    /// peer may hold it). Same refusals as [`Store::set`].
    pub fn delete(&mut self, key: &str) -> Result<Entry> {
        self.write_local(key, None)
    }

    fn write_local(&mut self, key: &str, value: Option<String>) -> Result<Entry> {
        let mut e = self.write_local_many(&[(key, value)])?;
        Ok(e.pop().expect("one entry written"))
    }

    /// Sets many keys in one transaction (all or nothing: any refusal changes nothing).
    pub fn set_many(&mut self, pairs: &[(&str, &str)]) -> Result<Vec<Entry>> {
        let pairs: Vec<(&str, Option<String>)> = pairs
            .iter()
            .map(|(k, v)| (*k, Some((*v).to_owned())))
            .collect();
        self.write_local_many(&pairs)
    }

    fn write_local_many(&mut self, pairs: &[(&str, Option<String>)]) -> Result<Vec<Entry>> {
        for (key, value) in pairs {
            validate_key(key)?;
            check_value(key, value.as_deref())?;
            if let Some(owner) = writer_of(key, value.is_none(), &self.members) {
                if owner != self.host {
                    return Err(MetaError::NotOwner {
                        key: (*key).to_owned(),
                        owner,
                        writer: self.host.clone(),
                    });
                }
            }
        }
        let (seq, entries) = self.local_transaction(|st, txn| {
            let mut entries = Vec::with_capacity(pairs.len());
            let mut seq = st.seq;
            let mut t = Tables::open(txn)?;
            for (key, value) in pairs {
                let entry = st.stamped(Entry {
                    key: (*key).to_owned(),
                    value: value.clone(),
                    stamp: 0,
                    origin: st.host.clone(),
                    sig: None,
                });
                seq += 1;
                let old = t.load(key)?;
                // Every stored stamp has been seen by the clock, so a fresh tick always wins.
                debug_assert!(old
                    .as_ref()
                    .is_none_or(|o| entry.supersedes(&entry_of(key, o.clone()))));
                t.store(&entry, old.map(|o| o.seq), seq)?;
                entries.push(entry);
            }
            t.meta.insert(META_SEQ, seq)?;
            t.meta.insert(META_CLOCK, st.clock.last())?;
            Ok((seq, entries))
        })?;
        self.seq = seq;
        for e in &entries {
            note_membership(&mut self.members, &self.host, e);
        }
        Ok(entries)
    }

    /// Merges entries received from a peer, in one transaction. Each entry is checked (key,
    /// value, owner = origin for owned keys, stamp not too far in the future) and refused alone
    /// if it fails; the others are merged by last-writer-wins and each winner gets a new local
    /// seq. Applying the same batch twice changes nothing the second time.
    pub fn apply_remote(&mut self, entries: &[Entry]) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        if entries.is_empty() {
            return Ok(report);
        }
        let mut seq = self.seq;
        let mut members = self.members.clone();
        let mut joined = Vec::new();
        let clock_before = self.clock.last();
        let txn = self.db.begin_write()?;
        {
            let mut t = Tables::open(&txn)?;
            for e in entries {
                if let Err(reason) = self.admit(e, &members, &t) {
                    report.refused.push((e.key.clone(), reason));
                    continue;
                }
                self.clock.observe(e.stamp)?;
                let old = t.load(&e.key)?;
                match &old {
                    Some(o) => {
                        let stored = entry_of(&e.key, o.clone());
                        if stored == *e {
                            report.duplicates += 1;
                            continue;
                        }
                        if !e.supersedes(&stored) {
                            report.ignored_older += 1;
                            continue;
                        }
                    }
                    None if e.stamp < self.gc_horizon => {
                        report.ignored_older += 1;
                        continue;
                    }
                    None => {}
                }
                seq += 1;
                t.store(e, old.map(|o| o.seq), seq)?;
                if let Some(new) = note_membership(&mut members, &self.host, e) {
                    joined.push(new);
                }
                if let Some(auth) = &self.authority {
                    auth.learn(e);
                }
                report.applied += 1;
            }
            if !joined.is_empty() && self.authority.is_some() {
                self.recheck_joined(&mut t, &members, &joined, &mut report)?;
            }
            if seq != self.seq {
                t.meta.insert(META_SEQ, seq)?;
            }
            if self.clock.last() != clock_before {
                t.meta.insert(META_CLOCK, self.clock.last())?;
            }
        }
        txn.commit()?;
        self.seq = seq;
        self.members = members;
        Ok(report)
    }

    /// Whether a remote entry may be applied: a valid key and value, a stamp not too far
    /// ahead, and for an entry only one host may write (see [`crate::auth`]): that host as its
    /// origin and, with an authority, its signature checked against the certificate stored
    /// for it (earlier entries of the same batch included, so a certificate and what it signs
    /// may travel together).
    fn admit(&self, e: &Entry, members: &BTreeSet<HostName>, t: &Tables<'_>) -> Result<()> {
        validate_key(&e.key)?;
        check_value(&e.key, e.value.as_deref())?;
        self.clock.check(e.stamp)?;
        if let Some(guard) = self.forgotten.refuses(e, members) {
            return Err(MetaError::Forgotten {
                key: e.key.clone(),
                stamp: e.stamp,
                guard,
            });
        }
        match writer_of(&e.key, e.is_tombstone(), members) {
            Some(writer) => self.authenticate(e, writer, t),
            None => Ok(()),
        }
    }

    /// Checks that `e` is `writer`'s: see [`Store::admit`].
    fn authenticate(&self, e: &Entry, writer: HostName, t: &Tables<'_>) -> Result<()> {
        if writer != e.origin {
            return Err(MetaError::NotOwner {
                key: e.key.clone(),
                owner: writer,
                writer: e.origin.clone(),
            });
        }
        let Some(auth) = &self.authority else {
            return Ok(());
        };
        let refuse = |reason: String| {
            Err(MetaError::Unauthenticated {
                key: e.key.clone(),
                writer: writer.clone(),
                reason,
            })
        };
        if cert_of_key(&e.key).is_some() {
            // A certificate vouches for itself: the CA signed it for this host.
            let cert = e.value.as_deref().unwrap_or_default();
            return auth.check_certificate(&writer, cert).or_else(refuse);
        }
        let Some(sig) = &e.sig else {
            return refuse("it is not signed".into());
        };
        let cert = match t.load(&cert_key(&writer))?.and_then(|r| r.value) {
            Some(c) => c,
            None => return refuse(format!("no certificate of {writer} is known here")),
        };
        auth.verify(&writer, &cert, &e.signed_message(), sig)
            .or_else(refuse)
    }

    /// Entries of hosts that just became members were taken as shared keys while they were
    /// not (a relay may send them before the membership): those that are not their owner's
    /// are removed here again (locally, as if never received; the owner's own entries win
    /// anyway), so that the order in which a relay sends entries does not matter.
    fn recheck_joined(
        &self,
        t: &mut Tables<'_>,
        members: &BTreeSet<HostName>,
        joined: &[HostName],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let mut doomed = Vec::new();
        for item in t.entries.iter()? {
            let (k, v) = item?;
            let key = k.value();
            if member_of_key(key).is_some() || cert_of_key(key).is_some() {
                continue;
            }
            let r = decode(key, v.value())?;
            let Some(writer) = writer_of(key, r.value.is_none(), members) else {
                continue;
            };
            if !joined.contains(&writer) {
                continue;
            }
            let seq = r.seq;
            if let Err(why) = self.authenticate(&entry_of(key, r), writer, t) {
                doomed.push((key.to_owned(), seq, why));
            }
        }
        for (key, seq, why) in doomed {
            t.entries.remove(key.as_str())?;
            t.seqs.remove(seq)?;
            report.refused.push((key, why));
        }
        Ok(())
    }

    /// The entries changed after local seq `since`, at most `limit` of them, in seq order (see
    /// [`Changes`]). Cost is proportional to the entries returned.
    pub fn changes_since(&self, since: u64, limit: usize) -> Result<Changes> {
        let txn = self.db.begin_read()?;
        let seqs = txn.open_table(SEQS)?;
        let entries = txn.open_table(ENTRIES)?;
        let mut out = Vec::new();
        let mut up_to = self.seq;
        let mut last = since;
        for item in seqs.range(since.saturating_add(1)..)? {
            if out.len() == limit {
                up_to = last;
                break;
            }
            let (s, k) = item?;
            let key = k.value();
            let record = entries.get(key)?.ok_or_else(|| MetaError::Corrupt {
                key: key.to_owned(),
                reason: format!("seq index entry {} names a missing key", s.value()),
            })?;
            out.push(entry_of(key, decode(key, record.value())?));
            last = s.value();
        }
        Ok(Changes {
            entries: out,
            up_to,
            local_seq: self.seq,
        })
    }

    /// What this store forgot ([`Store::forget`]), with the stamps.
    pub fn forgotten(&self) -> &Forgotten {
        &self.forgotten
    }

    /// Forgets `hosts` and `resources` locally, as a host does at the end of a cluster split
    /// for the other side: removes every entry that names them ([`Forgotten::names`]),
    /// tombstones included, **without writing deletions** (a deletion replicated to a host
    /// that has not forgotten yet would delete the other side's live keys there), and keeps
    /// the guard (`stamp`: the stamp of the record that ended the split) so that a relay of
    /// those entries, not newer than `stamp`, is refused from now on. Forgetting again with a
    /// newer stamp raises the guard. One transaction: all or nothing.
    ///
    /// Refused: this host among `hosts` ([`MetaError::ForgetSelf`]); a stamp too far ahead.
    pub fn forget(
        &mut self,
        hosts: &BTreeSet<HostName>,
        resources: &BTreeSet<ResourceName>,
        stamp: Stamp,
    ) -> Result<ForgetReport> {
        if hosts.contains(&self.host) {
            return Err(MetaError::ForgetSelf {
                host: self.host.clone(),
            });
        }
        self.clock.check(stamp)?;
        let mut guard = self.forgotten.clone();
        for h in hosts {
            let s = guard.hosts.entry(h.clone()).or_insert(stamp);
            *s = (*s).max(stamp);
        }
        for r in resources {
            let s = guard.resources.entry(r.clone()).or_insert(stamp);
            *s = (*s).max(stamp);
        }
        // Only what this call names goes (what an earlier call forgot is gone already).
        let now = Forgotten {
            hosts: hosts.iter().map(|h| (h.clone(), stamp)).collect(),
            resources: resources.iter().map(|r| (r.clone(), stamp)).collect(),
        };
        let members = self.members.clone();
        self.clock.observe(stamp)?;
        let txn = self.db.begin_write()?;
        let removed = {
            let mut t = Tables::open(&txn)?;
            let mut doomed = Vec::new();
            for item in t.entries.iter()? {
                let (k, v) = item?;
                if now.names(k.value(), &members).is_some() {
                    let r = decode(k.value(), v.value())?;
                    doomed.push((k.value().to_owned(), r.seq));
                }
            }
            for (key, seq) in &doomed {
                t.entries.remove(key.as_str())?;
                t.seqs.remove(*seq)?;
            }
            let mut rows = txn.open_table(FORGOTTEN)?;
            for (h, s) in &guard.hosts {
                rows.insert(format!("{GUARD_HOST}{h}").as_str(), *s)?;
            }
            for (r, s) in &guard.resources {
                rows.insert(format!("{GUARD_RESOURCE}{r}").as_str(), *s)?;
            }
            t.meta.insert(META_CLOCK, self.clock.last())?;
            doomed.len()
        };
        txn.commit()?;
        for h in hosts {
            self.members.remove(h);
        }
        self.forgotten = guard;
        Ok(ForgetReport { removed })
    }

    /// Removes tombstones stamped before `horizon` and remembers the horizon, so that remote
    /// updates older than it for keys the store does not hold are ignored from now on (no
    /// resurrection; see the crate documentation for the trade-off). The clock observes the
    /// horizon, so later local stamps are above it; a horizon too far in the future is refused.
    /// Returns the number of tombstones removed. Costs a scan of the whole map.
    pub fn gc_tombstones(&mut self, horizon: Stamp) -> Result<usize> {
        self.clock.observe(horizon)?;
        let txn = self.db.begin_write()?;
        let removed = {
            let mut t = Tables::open(&txn)?;
            let mut doomed = Vec::new();
            for item in t.entries.iter()? {
                let (k, v) = item?;
                let r = decode(k.value(), v.value())?;
                if r.value.is_none() && r.stamp < horizon {
                    doomed.push((k.value().to_owned(), r.seq));
                }
            }
            for (key, seq) in &doomed {
                t.entries.remove(key.as_str())?;
                t.seqs.remove(*seq)?;
            }
            t.meta
                .insert(META_GC_HORIZON, self.gc_horizon.max(horizon))?;
            t.meta.insert(META_CLOCK, self.clock.last())?;
            // A guard row older than the horizon is not needed any more: the horizon itself
            // now refuses those old entries for keys this store does not hold.
            let mut rows = txn.open_table(FORGOTTEN)?;
            let old: Vec<String> = rows
                .iter()?
                .filter_map(|item| item.ok())
                .filter(|(_, s)| s.value() < horizon)
                .map(|(k, _)| k.value().to_owned())
                .collect();
            for k in &old {
                rows.remove(k.as_str())?;
            }
            doomed.len()
        };
        txn.commit()?;
        self.gc_horizon = self.gc_horizon.max(horizon);
        self.forgotten.hosts.retain(|_, s| *s >= horizon);
        self.forgotten.resources.retain(|_, s| *s >= horizon);
        Ok(removed)
    }
}

/// The guard rows of [`Store::forget`]; a row whose name no longer parses is skipped (names
/// were checked when written).
fn load_forgotten(txn: &WriteTransaction) -> Result<Forgotten> {
    let rows = txn.open_table(FORGOTTEN)?;
    let mut f = Forgotten::default();
    for item in rows.iter()? {
        let (k, v) = item?;
        let (k, stamp) = (k.value(), v.value());
        if let Some(h) = k
            .strip_prefix(GUARD_HOST)
            .and_then(|h| HostName::new(h).ok())
        {
            f.hosts.insert(h, stamp);
        } else if let Some(r) = k
            .strip_prefix(GUARD_RESOURCE)
            .and_then(|r| ResourceName::new(r).ok())
        {
            f.resources.insert(r, stamp);
        }
    }
    Ok(f)
}

/// Follows membership keys; returns a host that became a member.
fn note_membership(
    members: &mut BTreeSet<HostName>,
    me: &HostName,
    entry: &Entry,
) -> Option<HostName> {
    let host = member_of_key(&entry.key)?;
    if entry.is_tombstone() {
        if host != *me {
            members.remove(&host);
        }
        None
    } else {
        members.insert(host.clone()).then_some(host)
    }
}
