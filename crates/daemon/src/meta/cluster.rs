//! Cluster membership and metadata propagation between hosts.
//!
//! Every host keeps the replicated metadata in its own store and *pulls*: for every other
//! member (the `ips/ip-HOST` keys) a task keeps a metadata connection open and asks "your
//! changes after N", applying what comes back. Changes learned from a third host get new local
//! numbers, so they are relayed to whoever pulls from us. A member cut off for an hour simply
//! asks for more when the link returns: the cost is the number of changes, never the size of
//! the map.
//!
//! Pulls are driven by pushes: the serving side sends `Notify` on the open connection whenever
//! its store changes, and the puller asks at once; without one it asks every [`POLL`] anyway.
//! So a change reaches the other members within a round trip, not a polling interval.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use mars_api::MemberView;
use mars_config::HostName;
use mars_wire::{ClusterId, Message, StreamKind};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::CertificateDer;

use super::store::MetaStore;
use crate::identity::Identity;
use crate::peer::{self, send, Incoming};
use crate::root::{self, ClusterFile};

/// How often each member is asked for changes when it did not notify us.
pub const POLL: Duration = Duration::from_millis(1000);
/// A metadata stream on which the peer asked nothing for this long is closed: a puller asks at
/// least every [`POLL`], so only a dead or hostile peer stays quiet (it frees its place).
const META_IDLE: Duration = Duration::from_secs(60);
/// How often this host refreshes its liveness stamp.
pub const ALIVE_EVERY: Duration = Duration::from_secs(2);
/// Entries per answer.
const PAGE: u32 = 1000;
/// At most this many entries are taken from the member a host joins through (a cluster of
/// 1,000 resources on three hosts holds about 40,000).
const JOIN_MAX_ENTRIES: usize = 2_000_000;

/// A page of changes is what was asked for: at most [`PAGE`] entries, and a full page moves
/// the position forward (a peer answering more, or the same full page again and again, would
/// make the puller take memory or loop without end).
fn check_page(host: &HostName, since: u64, n: usize, upto: u64) -> Result<()> {
    if n > PAGE as usize {
        bail!("{host} answered {n} entries to a request for at most {PAGE}");
    }
    // (`upto` below `since` alone is fine: a peer whose store began anew answers with its
    // new, lower position, and nothing newer than `since`.)
    if n as u32 == PAGE && upto <= since {
        bail!("{host} answered changes up to {upto} to a request for changes after {since}");
    }
    Ok(())
}
/// A member that answered within this time counts as connected (`view`).
const CONNECTED_WINDOW: Duration = Duration::from_secs(3);
/// A member whose liveness stamp stopped moving for this long (three refreshes missed) and
/// that does not answer us directly is not alive in `view`, whatever the window: it is
/// known unreachable (a crashed primary must not look alive and acting for the whole window
/// after a failover).
const STALE_AFTER: Duration = Duration::from_secs(6);

/// Is a member alive for `view`: its stamp is younger than the window, and either it answers
/// us directly or its stamp still moves (relayed by others).
pub fn alive_for_view(age: Option<Duration>, connected: bool, window: Duration) -> bool {
    age.is_some_and(|a| a <= window && (connected || a <= STALE_AFTER))
}
/// A member's clock this far from ours (either way) is warned about, in `view` and `check`.
pub const SKEW_WARN: Duration = Duration::from_secs(mars_api::CLOCK_SKEW_WARN_SECS as u64);
/// How many skew samples (one per liveness stamp, every 2 s) the estimate looks back on.
const SKEW_SAMPLES: usize = 8;

/// What this host heard of a member's liveness stamps, by its own clocks. The age of a
/// member's information is the time since its stamp last moved *here* — never the stamp
/// compared with our wall clock: a member whose clock runs ahead pulls every Lamport stamp of
/// the cluster ahead with its own, and compared with the wall clock every member then looked
/// fresh for as long as the skew (a crashed member stayed alive for minutes).
#[derive(Debug, Clone)]
pub struct Heard {
    stamp: u64,
    at: Instant,
    /// The age the stamp had when first seen (from the store at start: its stamp against our
    /// wall clock, the only estimate there is).
    base: Duration,
    /// (their wall clock − ours at receipt), ns, newest last.
    samples: std::collections::VecDeque<i64>,
    warned: bool,
}

/// What a new skew sample changed.
#[derive(Debug, PartialEq, Eq)]
pub enum SkewNews {
    None,
    /// The skew went beyond [`SKEW_WARN`].
    Over(i64),
    /// It came back within half of it.
    Back(i64),
}

impl Heard {
    /// First sight of `stamp` at `now` (wall clock `wall`).
    pub fn first(stamp: u64, wall: u64, now: Instant) -> Self {
        Heard {
            stamp,
            at: now,
            base: Duration::from_nanos(wall.saturating_sub(stamp)),
            samples: Default::default(),
            warned: false,
        }
    }

    /// A stamp seen at `now`: true if it is newer than the last one (the member is heard now).
    pub fn stamp_seen(&mut self, stamp: u64, now: Instant) -> bool {
        if stamp <= self.stamp {
            return false;
        }
        self.stamp = stamp;
        self.at = now;
        self.base = Duration::ZERO;
        true
    }

    /// How old the member's newest stamp is here.
    pub fn age(&self, now: Instant) -> Duration {
        self.base + now.saturating_duration_since(self.at)
    }

    /// A fresh stamp came with the member's wall clock `their` (ns; `None` or implausible
    /// from hosts that write no clock) and arrived at our wall clock `ours`.
    pub fn sample_skew(&mut self, their: Option<u64>, ours: u64) -> SkewNews {
        // Before 2001: not a clock (older hosts write "1").
        let Some(their) = their.filter(|t| *t > 1_000_000_000_000_000_000) else {
            return SkewNews::None;
        };
        let d = (their as i128 - ours as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        if self.samples.len() == SKEW_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(d);
        let skew = self.skew().unwrap_or(0);
        let warn = SKEW_WARN.as_nanos() as u64;
        if !self.warned && skew.unsigned_abs() > warn {
            self.warned = true;
            return SkewNews::Over(skew);
        }
        if self.warned && skew.unsigned_abs() <= warn / 2 {
            self.warned = false;
            return SkewNews::Back(skew);
        }
        SkewNews::None
    }

    /// Their clock minus ours, ns: the largest recent sample (each is the skew minus the
    /// stamp's travel time, so the largest is the one that travelled fastest).
    pub fn skew(&self) -> Option<i64> {
        self.samples.iter().copied().max()
    }
}

/// The clock skews measured by this process's cluster, for the sessions that compare a
/// member's clock with ours (a fetch source's "caught up as of" stamp).
static SKEWS: Mutex<BTreeMap<HostName, i64>> = Mutex::new(BTreeMap::new());

fn set_skew(host: &HostName, skew: Option<i64>) {
    let mut s = lock(&SKEWS);
    match skew {
        Some(v) => s.insert(host.clone(), v),
        None => s.remove(host),
    };
}

/// A stamp of `host`'s wall clock as our wall clock: its measured skew taken off, never later
/// than now (a confirmation cannot come from the future).
///
/// A skew within [`SKEW_WARN`] is not corrected. Each sample is the skew minus the travel time
/// of a metadata entry (seconds over a slow or lossy link), so the measured value lies below
/// the true one by that time, and correcting by it makes a stamp look newer than it is:
/// `wait-resource uptodate` then took a source's "caught up" that was read before the wait
/// began, and returned before the secondary had every earlier write (CI, a lossy lab link
/// with clocks in step). Beyond it the clock is wrong (warned about, `check` says so) and
/// the correction is the smaller error.
pub fn to_local_wall(host: &HostName, stamp: u64) -> u64 {
    let skew = lock(&SKEWS)
        .get(host)
        .copied()
        .filter(|s| s.unsigned_abs() > SKEW_WARN.as_nanos() as u64)
        .unwrap_or(0);
    let local = (stamp as i128 - skew as i128).clamp(0, u64::MAX as i128) as u64;
    local.min(mars_meta::system_time_ns())
}

/// A pull without an answer within this time: the connection is given up.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
pub const MEMBER_PREFIX: &str = "ips/ip-";
/// `certs/cert-HOST` = HOST's current certificate (`x509:` + base64 DER, see `mars_tls::sign`).
/// A peer is served only with the certificate recorded here, and HOST's metadata is taken only
/// with its signature checked against it; deleting it (leave-cluster, lowlevel-delete-host)
/// revokes the certificate cluster-wide.
pub const CERT_PREFIX: &str = "certs/cert-";
/// A CA rotation: `trust/ca-next` = the next CA endorsed by the current one (every host
/// trusts it on sight), `trust/ca-retired` = the old CA endorsed by the new one (every host
/// whose certificate is from the new CA stops trusting the old). Shared keys: their values
/// vouch for themselves (`mars_tls::endorsed`).
pub const TRUST_NEXT: &str = "trust/ca-next";
pub const TRUST_RETIRED: &str = "trust/ca-retired";
/// A merge of two clusters (`merge-cluster`), both shared keys with the value
/// `CLUSTER ISSUER ENDORSEMENT` (`CLUSTER` the id of the cluster the merge ends in, `ISSUER`
/// the host of that cluster that issues the certificates of the merging hosts, `ENDORSEMENT`
/// `x509:<subject CA> <signature>` over [`mars_tls::Endorse::Merge`] with that id):
/// `trust/merge-into` = the surviving CA endorsed by the merging CA (every host of the
/// merging side trusts it, takes the cluster id and gets a certificate from `ISSUER`);
/// `trust/merge-admit` = the merging CA endorsed by the surviving one (every host of the
/// surviving side trusts it until it is retired by `trust/ca-retired`).
pub const TRUST_MERGE_INTO: &str = "trust/merge-into";
pub const TRUST_MERGE_ADMIT: &str = "trust/merge-admit";
/// How long `merge-cluster` waits for the members of its side to fetch the announcement
/// before it switches this host to the other cluster's id (after that they would not talk to
/// it until they switched too).
const MERGE_ANNOUNCE_WAIT: Duration = Duration::from_secs(30);
/// Deletion markers are kept this long (MARS keeps `.deleted` links a week too): a member that
/// is away longer than this must not bring deleted keys back, so it should rejoin.
const TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const GC_EVERY: Duration = Duration::from_secs(3600);
/// How far this host has read every member's changes, so that a restart asks for the news
/// only, not for the whole map again.
pub const SEEN_FILE: &str = "peers-seen.toml";

pub fn alive_key(host: &HostName) -> String {
    format!("alive-{host}")
}

#[derive(Debug, Default, Clone)]
struct PeerState {
    last_ok: Option<Instant>,
    error: Option<String>,
    /// Everything of theirs up to this number is applied here.
    seen: u64,
}

/// The cluster side of the daemon.
pub struct Cluster {
    pub store: MetaStore,
    pub(super) ident: Arc<Identity>,
    peers: Mutex<BTreeMap<HostName, PeerState>>,
    /// Highest change number sent to each member (what it has received of ours).
    served: Mutex<BTreeMap<HostName, u64>>,
    /// Wakes the pullers (update-cluster, wait-cluster).
    pub poke: tokio::sync::Notify,
    tasks: Mutex<BTreeMap<HostName, (String, JoinHandle<()>)>>,
    started: Instant,
    /// Every member's current certificate fingerprint (`certs/cert-HOST`), republished when
    /// it changes: open streams of a host whose certificate went away are closed.
    certs: tokio::sync::watch::Sender<Certs>,
    /// Said once: this host's certificate is from a CA the cluster retired.
    warned_retired: std::sync::atomic::AtomicBool,
    /// Held while this host reads, decides on and rewrites its `tls/` files and installs its
    /// credentials: `rotate-ca start|finish`, `renew-certificate`, and following a rotation
    /// announced in the metadata. Interleaved, one breaks the other: `rotate-ca finish` wrote
    /// the retirement, the supervisor followed it at once and finished the rotation here first,
    /// and the command then failed with "no CA rotation in progress" (seen in CI under load);
    /// a renewal's new certificate could be replaced by the old one a concurrent reload read.
    pub(super) tls_files: tokio::sync::Mutex<()>,
    /// When this host last heard each member's liveness stamp move, and its clock's skew.
    heard: Mutex<BTreeMap<HostName, Heard>>,
    /// A renewal of this host's certificate from the other cluster's issuer runs (a merge).
    merge_renewing: std::sync::atomic::AtomicBool,
    /// `merge-cluster` runs here: it switches this host's cluster id itself, after the
    /// members of its side fetched the announcement (the supervisor must not do it earlier).
    merging: std::sync::atomic::AtomicBool,
    /// What the split of this cluster (`split-cluster`) runs here (see `meta/split.rs`).
    pub(super) split: super::split::SplitState,
}

/// Host → SHA-256 fingerprint of its current certificate.
pub type Certs = Arc<BTreeMap<HostName, String>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn to_wire(e: &mars_meta::Entry) -> mars_wire::Entry {
    mars_wire::Entry {
        key: e.key.clone(),
        value: e.value.clone(),
        stamp: e.stamp,
        origin: e.origin.to_string(),
        sig: e.sig.clone().unwrap_or_default(),
    }
}

fn from_wire(entries: Vec<mars_wire::Entry>) -> Vec<mars_meta::Entry> {
    entries
        .into_iter()
        .filter_map(|e| match HostName::new(&e.origin) {
            Ok(origin) => Some(mars_meta::Entry {
                key: e.key,
                value: e.value,
                stamp: e.stamp,
                origin,
                sig: (!e.sig.is_empty()).then_some(e.sig),
            }),
            Err(err) => {
                tracing::warn!("dropping metadata entry {:?}: origin {err}", e.key);
                None
            }
        })
        .collect()
}

impl Cluster {
    pub fn new(store: MetaStore, ident: Arc<Identity>) -> Cluster {
        Cluster {
            store,
            ident,
            peers: Mutex::default(),
            served: Mutex::default(),
            poke: tokio::sync::Notify::new(),
            tasks: Mutex::default(),
            started: Instant::now(),
            certs: tokio::sync::watch::channel(Certs::default()).0,
            warned_retired: std::sync::atomic::AtomicBool::new(false),
            tls_files: tokio::sync::Mutex::new(()),
            heard: Mutex::new(BTreeMap::new()),
            merge_renewing: std::sync::atomic::AtomicBool::new(false),
            merging: std::sync::atomic::AtomicBool::new(false),
            split: super::split::SplitState::default(),
        }
    }

    /// The members' current certificates, as a watch that changes only when they do.
    pub fn certificates(&self) -> tokio::sync::watch::Receiver<Certs> {
        self.certs.subscribe()
    }

    /// Reads `certs/` and publishes it if it changed.
    async fn refresh_certificates(&self) {
        let Ok(now) = self
            .store
            .call(|s| -> BTreeMap<HostName, String> {
                s.list_prefix(CERT_PREFIX)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|e| {
                        let host = mars_meta::cert_of_key(&e.key)?;
                        Some((host, mars_tls::text_fingerprint(&e.value?).ok()?))
                    })
                    .collect()
            })
            .await
        else {
            return;
        };
        self.certs.send_if_modified(|c| {
            if **c == now {
                return false;
            }
            *c = Arc::new(now);
            true
        });
    }

    /// Members and their addresses, from the replicated `ips/ip-HOST` keys.
    pub async fn members(&self) -> BTreeMap<HostName, String> {
        self.store
            .call(|s| {
                s.list_prefix(MEMBER_PREFIX)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|e| {
                        let h = mars_meta::member_of_key(&e.key)?;
                        Some((h, e.value.unwrap_or_default()))
                    })
                    .collect()
            })
            .await
            .unwrap_or_default()
    }

    /// Every member's newest liveness entry: its stamp (its Lamport clock) and value.
    async fn alive_entries(&self) -> BTreeMap<HostName, (u64, Option<String>)> {
        self.store
            .call(|s| {
                let members: Vec<HostName> = s
                    .list_prefix(MEMBER_PREFIX)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|e| mars_meta::member_of_key(&e.key))
                    .collect();
                members
                    .into_iter()
                    .filter_map(|h| {
                        let e = s.get(&alive_key(&h)).ok().flatten()?;
                        Some((h, (e.stamp, e.value)))
                    })
                    .collect()
            })
            .await
            .unwrap_or_default()
    }

    /// How long ago this host last heard a new liveness stamp of every member, by its own
    /// monotonic clock (see [`Heard`]): a member whose clock is ahead or behind ages like any
    /// other.
    pub async fn ages(&self) -> BTreeMap<HostName, Duration> {
        let entries = self.alive_entries().await;
        let (now, wall) = (Instant::now(), mars_meta::system_time_ns());
        let mut heard = lock(&self.heard);
        heard.retain(|h, _| entries.contains_key(h));
        entries
            .into_iter()
            .map(|(h, (stamp, _))| {
                let e = heard
                    .entry(h.clone())
                    .or_insert_with(|| Heard::first(stamp, wall, now));
                // A stamp that moved without passing through `apply` (a restart's store):
                // heard now.
                e.stamp_seen(stamp, now);
                (h, e.age(now))
            })
            .collect()
    }

    /// Members whose clock differs from this host's, as measured from their liveness stamps:
    /// theirs minus ours in seconds (positive: ahead).
    pub fn clock_skews(&self) -> BTreeMap<HostName, f64> {
        lock(&self.heard)
            .iter()
            .filter_map(|(h, e)| Some((h.clone(), e.skew()? as f64 / 1e9)))
            .collect()
    }

    /// A new liveness entry of `host` arrived (from `from`): noted at once, with its value, so
    /// that the age and the clock skew are measured from the moment of receipt.
    fn heard_alive(&self, host: &HostName, stamp: u64, value: Option<&str>, from: &HostName) {
        let (now, wall) = (Instant::now(), mars_meta::system_time_ns());
        let mut heard = lock(&self.heard);
        let e = heard
            .entry(host.clone())
            .or_insert_with(|| Heard::first(stamp, wall, now));
        if !e.stamp_seen(stamp, now) {
            return;
        }
        let their = value.and_then(|v| v.parse::<u64>().ok());
        match e.sample_skew(their, wall) {
            SkewNews::None => {}
            SkewNews::Over(ns) => tracing::warn!(
                peer = %host,
                "the clock of {host} is {:.1} s {} this host's (measured from its liveness \
                 stamp, via {from}): run NTP on every host (see Time and NTP in \
                 docs/operations.md)",
                (ns.unsigned_abs() as f64) / 1e9,
                if ns > 0 { "ahead of" } else { "behind" },
            ),
            SkewNews::Back(ns) => tracing::info!(
                peer = %host,
                "the clock of {host} is within {:.1} s of this host's again",
                (ns.unsigned_abs() as f64) / 1e9,
            ),
        }
        set_skew(host, e.skew());
    }

    /// The members (other than this host) that answered us directly within the last few
    /// seconds.
    pub fn connected_peers(&self) -> std::collections::BTreeSet<HostName> {
        lock(&self.peers)
            .iter()
            .filter(|(_, p)| p.last_ok.is_some_and(|t| t.elapsed() < CONNECTED_WINDOW))
            .map(|(h, _)| h.clone())
            .collect()
    }

    pub async fn member_views(&self, window: Duration) -> Vec<MemberView> {
        let me = self.ident.host.clone();
        let ages = self.ages().await;
        let skews = self.clock_skews();
        let peers = lock(&self.peers).clone();
        self.members()
            .await
            .into_iter()
            .map(|(h, address)| {
                let age = ages.get(&h).copied();
                let p = peers.get(&h);
                let this = h == me;
                let connected = this
                    || p.and_then(|p| p.last_ok)
                        .is_some_and(|t| t.elapsed() < CONNECTED_WINDOW);
                MemberView {
                    host: h.to_string(),
                    address,
                    this_host: this,
                    alive: this || alive_for_view(age, connected, window),
                    age_secs: if this {
                        Some(0.0)
                    } else {
                        age.map(|a| a.as_secs_f64())
                    },
                    connected,
                    error: p.and_then(|p| p.error.clone()),
                    streams: Vec::new(),
                    clock_skew_secs: skews.get(&h).map(|s| (s * 1000.0).round() / 1000.0),
                }
            })
            .collect()
    }

    /// Members other than this host that have not answered since `since`.
    pub async fn not_answered_since(&self, since: Instant) -> Vec<String> {
        let me = self.ident.host.clone();
        let members = self.members().await;
        let peers = lock(&self.peers);
        members
            .into_keys()
            .filter(|h| *h != me)
            .filter(|h| {
                peers
                    .get(h)
                    .and_then(|p| p.last_ok)
                    .is_none_or(|t| t < since)
            })
            .map(|h| match peers.get(&h).and_then(|p| p.error.clone()) {
                Some(e) => format!("{h} ({e})"),
                None => h.to_string(),
            })
            .collect()
    }

    /// Every other member answered since this daemon started (or there is none).
    pub async fn fresh(&self) -> bool {
        self.not_answered_since(self.started).await.is_empty()
    }

    pub fn stop_tasks(&self) {
        for (_, (_, t)) in std::mem::take(&mut *lock(&self.tasks)) {
            t.abort();
        }
    }

    fn clear_peers(&self) {
        lock(&self.peers).clear();
        lock(&self.served).clear();
    }

    async fn apply(&self, from: &HostName, entries: Vec<mars_wire::Entry>) -> Result<usize> {
        let entries = from_wire(entries);
        let alive: Vec<(HostName, u64, Option<String>)> = entries
            .iter()
            .filter_map(|e| {
                let h = HostName::new(e.key.strip_prefix("alive-")?).ok()?;
                Some((h, e.stamp, e.value.clone()))
            })
            .collect();
        let report = self.store.call(move |s| s.apply_remote(&entries)).await??;
        for (key, why) in &report.refused {
            tracing::warn!("refused metadata {key:?} from {from}: {why}");
        }
        for (h, stamp, value) in alive {
            let refused = report.refused.iter().any(|(k, _)| *k == alive_key(&h));
            if h != self.ident.host && !refused {
                self.heard_alive(&h, stamp, value.as_deref(), from);
            }
        }
        Ok(report.applied)
    }

    // ------------------------------------------------------------ serving

    /// A metadata stream from `conn.peer`: answers its pulls, and tells it whenever our store
    /// changed so that it pulls again at once.
    pub async fn serve(self: Arc<Self>, conn: Incoming) -> Result<()> {
        let Incoming {
            peer,
            from,
            mut w,
            mut frames,
            ..
        } = conn;
        let joining = peer.cluster == ClusterId::UNKNOWN;
        let mut seq = self.store.watch_seq();
        // What the peer has asked up to: a Notify only when there is more.
        let mut answered: Option<u64> = None;
        let mut idle_until = tokio::time::Instant::now() + META_IDLE;
        loop {
            let msg = tokio::select! {
                m = tokio::time::timeout_at(idle_until, frames.next()) => {
                    let m = m.map_err(|_| {
                        anyhow!("{} asked nothing for {META_IDLE:?}", peer.host)
                    })??;
                    idle_until = tokio::time::Instant::now() + META_IDLE;
                    m
                }
                changed = seq.changed() => {
                    changed?;
                    let now = *seq.borrow_and_update();
                    if answered.is_some_and(|a| now > a) {
                        send(&mut w, &Message::Notify { seq: now }).await?;
                        w.flush().await?;
                    }
                    continue;
                }
            };
            match msg {
                Message::ChangesSince { since, limit } => {
                    let (reply, upto) = self
                        .store
                        .call(move |s| {
                            // A peer ahead of us saw an earlier incarnation of this store:
                            // resend all.
                            let from_seq = if since > s.local_seq() { 0 } else { since };
                            let c = s.changes_since(from_seq, limit.clamp(1, PAGE) as usize)?;
                            Ok::<_, mars_meta::MetaError>((
                                Message::Changes {
                                    upto: c.up_to,
                                    entries: c.entries.iter().map(to_wire).collect(),
                                },
                                c.up_to,
                            ))
                        })
                        .await??;
                    send(&mut w, &reply).await?;
                    w.flush().await?;
                    answered = Some(upto);
                    // Delivered to the peer's socket: what leave-cluster waits for (a peer
                    // that learns of the departure stops asking, so it never asks past it).
                    let mut served = lock(&self.served);
                    let v = served.entry(peer.host.clone()).or_default();
                    *v = (*v).max(upto);
                }
                Message::Changes { entries, .. } if joining => {
                    // A joining host announces itself (its address and, with TLS, its
                    // certificate's fingerprint); nothing else is taken from it.
                    let own = format!("{MEMBER_PREFIX}{}", peer.host);
                    let own_cert = format!("{CERT_PREFIX}{}", peer.host);
                    let (mine, other): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| {
                        (e.key == own || e.key == own_cert) && e.origin == peer.host.as_str()
                    });
                    if !other.is_empty() {
                        tracing::warn!(
                            "ignored {} entries pushed by joining host {}",
                            other.len(),
                            peer.host
                        );
                    }
                    // The address it announced, not the connection's (an ephemeral port,
                    // maybe another interface).
                    let announced = mine
                        .iter()
                        .find(|e| e.key == own)
                        .and_then(|e| e.value.clone())
                        .unwrap_or_else(|| format!("{from} (announced no address)"));
                    self.apply(&peer.host, mine).await?;
                    tracing::info!("host {} at {announced} joined the cluster", peer.host);
                    self.poke.notify_waiters();
                }
                Message::Renew { host_key } if !joining && !self.ident.insecure => {
                    // The stream is authenticated: the peer is the host its certificate names.
                    let ident = self.ident.clone();
                    let host = peer.host.clone();
                    let issued = tokio::task::spawn_blocking(move || {
                        ident.issue_certificate(&host, &host_key)
                    })
                    .await?;
                    let reply = match (issued, self.ident.cluster_id()) {
                        (Ok((cert, ca)), Some(id)) => {
                            tracing::info!(
                                "issued a renewed certificate for {} at {from}",
                                peer.host
                            );
                            Message::JoinGrant {
                                cluster: id.0,
                                cert,
                                ca,
                            }
                        }
                        (Err(e), _) => Message::Refuse {
                            kind: mars_wire::RefuseKind::Other,
                            reason: format!("{e:#}"),
                        },
                        (_, None) => bail!("this host left the cluster"),
                    };
                    send(&mut w, &reply).await?;
                    w.flush().await?;
                }
                Message::SplitRequest { hosts, resources } if !joining && !self.ident.insecure => {
                    // The stream is authenticated: the asker is a member.
                    let reply =
                        super::split::serve_request(&self, &peer.host, hosts, resources).await;
                    send(&mut w, &reply).await?;
                    w.flush().await?;
                }
                Message::Ping { stamp } => {
                    let now = self.store.call(move |s| s.clock().now().max(stamp)).await?;
                    send(&mut w, &Message::Pong { stamp: now }).await?;
                    w.flush().await?;
                }
                Message::Refuse { reason, .. } => bail!("peer {} refused: {reason}", peer.host),
                other => bail!("unexpected message from {}: {other:?}", peer.host),
            }
        }
    }

    // ------------------------------------------------------------ pulling

    /// Keeps pulling from one member, reconnecting with backoff.
    async fn pull_loop(self: Arc<Self>, host: HostName, addr: String) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let err = match self.pull_session(&host, &addr).await {
                Ok(()) => unreachable!("a pull session ends with an error"),
                Err(e) => e,
            };
            crate::traffic::count(crate::traffic::PeerError::SessionFailed);
            let msg = format!("{err:#}");
            let first = {
                let mut peers = lock(&self.peers);
                let p = peers.entry(host.clone()).or_default();
                let first = p.error.as_deref() != Some(&msg);
                p.error = Some(msg.clone());
                first
            };
            if first {
                tracing::warn!("metadata from {host} at {addr}: {msg}");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(3));
        }
    }

    /// A metadata stream to member `host` at `addr`, which must answer as that host.
    pub(super) async fn connect_member(
        &self,
        host: &HostName,
        addr: &str,
        cluster: ClusterId,
    ) -> Result<peer::Session> {
        let tls = self.ident.peer_tls()?;
        let s = peer::connect(
            addr,
            &self.ident.host,
            cluster,
            StreamKind::Meta,
            tls.as_deref(),
        )
        .await?;
        if s.peer.host != *host {
            bail!("{addr} answers as host {}, expected {host}", s.peer.host);
        }
        Ok(s)
    }

    async fn pull_session(&self, host: &HostName, addr: &str) -> Result<()> {
        let cluster = self
            .ident
            .cluster_id()
            .ok_or_else(|| anyhow!("not in a cluster"))?;
        let mut s = self.connect_member(host, addr, cluster).await?;
        loop {
            let since = lock(&self.peers).get(host).map_or(0, |p| p.seen);
            send(&mut s.w, &Message::ChangesSince { since, limit: PAGE }).await?;
            s.w.flush().await?;
            let (entries, upto) = loop {
                match s.frames.next_within(ANSWER_TIMEOUT).await? {
                    Message::Changes { upto, entries } => break (entries, upto),
                    // A notification sent while we asked: the answer covers it.
                    Message::Notify { .. } => continue,
                    Message::Refuse { reason, .. } => bail!("{host} refused: {reason}"),
                    other => bail!("unexpected answer from {host}: {other:?}"),
                }
            };
            check_page(host, since, entries.len(), upto)?;
            if self.ident.cluster_id() != Some(cluster) {
                bail!("this host left the cluster, or merged into another (reconnecting)");
            }
            let full = entries.len() as u32 >= PAGE;
            if !entries.is_empty() {
                self.apply(host, entries).await?;
            }
            {
                let mut peers = lock(&self.peers);
                let p = peers.entry(host.clone()).or_default();
                p.seen = upto;
                p.last_ok = Some(Instant::now());
                p.error = None;
            }
            if !full {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {},
                    _ = self.poke.notified() => {},
                    m = s.frames.next() => match m? {
                        Message::Notify { .. } => {}
                        Message::Refuse { reason, .. } => bail!("{host} refused: {reason}"),
                        other => bail!("unexpected message from {host}: {other:?}"),
                    },
                }
            }
        }
    }

    /// At start: a configured `advertise` (marsd.toml or `--advertise`) that differs from the
    /// address this host published when it created or joined the cluster is published now,
    /// so that changing it and restarting moves the peers to the new address. Without
    /// `advertise` the published address (e.g. `join-cluster --ip`) stays. A host that is no
    /// member any more (deleted while it was down) does not announce itself again.
    /// Returns the change made (old, new).
    pub async fn republish_address(&self) -> Result<Option<(String, String)>, String> {
        let Some(want) = self.ident.advertise.clone() else {
            return Ok(None);
        };
        let Some(mut c) = self.ident.cluster() else {
            return Ok(None);
        };
        // Compared with what the cluster knows (`lowlevel-set-host-ip` may have changed it
        // since the join), not with what this host published then.
        let Some(published) = self.members().await.remove(&self.ident.host) else {
            return Ok(None);
        };
        if published == want {
            return Ok(None);
        }
        crate::identity::advertisable(&want)?;
        let key = format!("{MEMBER_PREFIX}{}", self.ident.host);
        self.store
            .write(vec![(key, want.clone())], Vec::new())
            .await?;
        c.address = want.clone();
        self.ident.set_cluster(c).map_err(|e| format!("{e:#}"))?;
        Ok(Some((published, want)))
    }

    /// Starts and stops pullers as membership changes, refreshes our liveness stamp, collects
    /// old tombstones and saves how far every member was read.
    pub async fn supervise(self: Arc<Self>) {
        let mut last_alive: Option<Instant> = None;
        let mut last_gc: Option<Instant> = None;
        let mut last_saved = BTreeMap::new();
        self.load_seen().await;
        match self.republish_address().await {
            Ok(None) => {}
            Ok(Some((old, new))) => tracing::info!(
                "the advertised address changed from {old} to {new} (`advertise`): published"
            ),
            Err(e) => tracing::warn!("cannot publish the advertised address: {e}"),
        }
        let mut global = self.store.watch_global();
        loop {
            self.refresh_certificates().await;
            match self.follow_trust().await {
                Ok(Some((issuer, ca))) => {
                    use std::sync::atomic::Ordering;
                    if !self.merge_renewing.swap(true, Ordering::SeqCst) {
                        tokio::spawn(self.clone().renew_for_merge(issuer, ca));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("following the cluster's CA rotation or merge: {e:#}"),
            }
            if let Err(e) = super::split::follow(&self).await {
                tracing::warn!("following the split of the cluster: {e:#}");
            }
            if self.ident.cluster_id().is_some() {
                if last_gc.is_none_or(|t| t.elapsed() >= GC_EVERY) {
                    let horizon = mars_meta::system_time_ns()
                        .saturating_sub(TOMBSTONE_RETENTION.as_nanos() as u64);
                    match self.store.call(move |s| s.gc_tombstones(horizon)).await {
                        Ok(Ok(0)) => {}
                        Ok(Ok(n)) => tracing::info!(
                            "collected {n} metadata tombstones older than {TOMBSTONE_RETENTION:?}"
                        ),
                        Ok(Err(e)) => tracing::warn!("tombstone collection: {e}"),
                        Err(_) => return,
                    }
                    last_gc = Some(Instant::now());
                }
                let seen: BTreeMap<HostName, u64> = lock(&self.peers)
                    .iter()
                    .map(|(h, p)| (h.clone(), p.seen))
                    .collect();
                if seen != last_saved {
                    if let Err(e) = self.save_seen(&seen) {
                        tracing::warn!("cannot save peer positions: {e:#}");
                    }
                    last_saved = seen;
                }
                if last_alive.is_none_or(|t| t.elapsed() >= ALIVE_EVERY) {
                    let key = alive_key(&self.ident.host);
                    // The value is this host's wall clock (ns): receivers measure the skew
                    // between its clock and theirs from it (hosts before it wrote "1").
                    let wall = mars_meta::system_time_ns().to_string();
                    if let Ok(Err(e)) = self
                        .store
                        .call(move |s| s.set(&key, &wall).map(|_| ()))
                        .await
                    {
                        tracing::warn!("liveness stamp: {e}");
                    }
                    last_alive = Some(Instant::now());
                }
                let members = self.members().await;
                let mut tasks = lock(&self.tasks);
                tasks.retain(|h, (addr, t)| {
                    let keep = members.get(h) == Some(addr) && !t.is_finished();
                    if !keep {
                        t.abort();
                    }
                    keep
                });
                for (h, addr) in members {
                    if h != self.ident.host && !tasks.contains_key(&h) {
                        let t = tokio::spawn(tracing::Instrument::instrument(
                            self.clone().pull_loop(h.clone(), addr.clone()),
                            tracing::info_span!("peer", peer = %h),
                        ));
                        tasks.insert(h, (addr, t));
                    }
                }
            } else {
                self.stop_tasks();
            }
            // Membership changes are metadata changes: look again then, or for the next stamp.
            tokio::select! {
                _ = tokio::time::sleep(ALIVE_EVERY / 2) => {},
                _ = global.changed() => {},
            }
        }
    }

    fn save_seen(&self, seen: &BTreeMap<HostName, u64>) -> Result<()> {
        let table: BTreeMap<String, u64> = seen.iter().map(|(h, s)| (h.to_string(), *s)).collect();
        crate::root::write_toml(&self.ident.root, SEEN_FILE, &table)
    }

    async fn load_seen(&self) {
        // Positions only mean something together with the store they were applied to.
        if self.store.call(|s| s.local_seq()).await.unwrap_or(0) == 0 {
            return;
        }
        let table: BTreeMap<String, u64> =
            match crate::root::read_toml(&self.ident.root.join(SEEN_FILE)) {
                Ok(Some(t)) => t,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("ignoring saved peer positions: {e:#}");
                    return;
                }
            };
        let mut peers = lock(&self.peers);
        for (h, s) in table {
            if let Ok(h) = HostName::new(&h) {
                peers.entry(h).or_default().seen = s;
            }
        }
    }

    // ------------------------------------------------------------ CA rotation

    /// Uses the credentials and trusted CAs in `tls/` for new streams and for the metadata's
    /// signatures (after the trusted CAs changed).
    pub(super) async fn reload_credentials(&self) -> Result<()> {
        let root = self.ident.root.clone();
        let Some(creds) = root::load_credentials(&root)? else {
            return Ok(());
        };
        self.ident.install_credentials(&creds)?;
        let trust = root::load_trust(&root)?;
        let authority = super::authority::PkiAuthority::new(&creds, &trust)?;
        self.store
            .call(move |s| s.set_authority(Some(authority)))
            .await?;
        Ok(())
    }

    /// Follows a CA rotation announced in the metadata (see [`TRUST_NEXT`]): trusts the next
    /// CA once the current one endorsed it; drops the old one once the new one retired it and
    /// this host's certificate is from the new one.
    ///
    /// Follows a merge of two clusters too (see [`TRUST_MERGE_INTO`]): returns the issuer to
    /// renew this host's certificate from and its CA when this host is on the merging side
    /// and its certificate is not from that CA yet.
    async fn follow_trust(&self) -> Result<Option<(HostName, CertificateDer<'static>)>> {
        if self.ident.insecure || self.ident.peer_tls().is_err() {
            return Ok(None);
        }
        let _files = self.tls_files.lock().await;
        let (next, retired, into, admit) = self
            .store
            .call(|s| {
                (
                    s.value(TRUST_NEXT),
                    s.value(TRUST_RETIRED),
                    s.value(TRUST_MERGE_INTO),
                    s.value(TRUST_MERGE_ADMIT),
                )
            })
            .await?;
        let (retired, into, admit) = (retired?, into?, admit?);
        let root = self.ident.root.clone();
        let renew = self
            .follow_merge(into.as_deref(), admit.as_deref(), retired.as_deref())
            .await?;
        if renew.is_none() {
            self.merge_retire(admit.as_deref()).await?;
        }
        let trust = root::load_trust(&root)?;
        if let Some(text) = next? {
            if let Ok(ca) = mars_tls::endorsed(&text, mars_tls::Endorse::Next, &trust) {
                if !trust.contains(&ca) {
                    root::save_next_ca(&root, &ca, None)?;
                    self.reload_credentials().await?;
                    tracing::info!(
                        "trusting the cluster's next CA too (a CA rotation began): sha256:{}",
                        mars_tls::fingerprint(&ca)
                    );
                }
            }
        }
        let trust = root::load_trust(&root)?;
        if let (Some(text), Some(merged)) = (&retired, root::load_merge_ca(&root)?) {
            // The surviving side of a merge: the merged cluster's CA is retired once its hosts
            // all have certificates of ours.
            if mars_tls::endorsed(text, mars_tls::Endorse::Retired, &trust).ok() == Some(merged) {
                root::remove_merge_ca(&root)?;
                self.reload_credentials().await?;
                tracing::info!(
                    "the merge is complete here: the merged cluster's CA is no longer trusted"
                );
            }
        }
        let trust = root::load_trust(&root)?;
        if let (Some(text), [current, next]) = (retired, trust.as_slice()) {
            if let Ok(old) = mars_tls::endorsed(&text, mars_tls::Endorse::Retired, &trust) {
                let creds = root::load_credentials(&root)?
                    .ok_or_else(|| anyhow!("this host has no certificate"))?;
                if old == *current && mars_tls::issued_by(&creds.cert, next) {
                    let dropped_key = root::finish_rotation(&root)?;
                    self.reload_credentials().await?;
                    tracing::info!(
                        "the CA rotation is complete here: the old CA is no longer trusted"
                    );
                    if dropped_key {
                        tracing::warn!(
                            "removed this host's copy of the old CA key (it can issue nothing \
                             trusted any more); copy the new tls/ca.key from the host that \
                             rotated the CA to issue join tokens here again"
                        );
                    }
                } else if old == *current {
                    let msg = "the cluster retired the CA that issued this host's certificate: \
                               run `marsadm renew-certificate` here now (the other members \
                               refuse it once they drop the old CA)";
                    if !self
                        .warned_retired
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::error!("{msg}");
                    }
                }
            }
        }
        Ok(renew)
    }

    /// `rotate-ca start`: on a host holding the CA key, makes the next CA, trusts it here and
    /// announces it endorsed by the current CA; renewals issued here come from it from now on.
    /// With `dry` (`--dry-run`): the checks only, and what it would do.
    pub async fn rotate_start(&self, dry: bool) -> Result<String, String> {
        let e = |e: anyhow::Error| format!("{e:#}");
        let _files = self.tls_files.lock().await;
        let root = self.ident.root.clone();
        let ca = root::load_ca(&root)
            .map_err(e)?
            .ok_or("rotate-ca runs on a host that holds the cluster CA's key (tls/ca.key)")?;
        if root::load_trust(&root).map_err(e)?.len() > 1 {
            return Err("a CA rotation is in progress already: `rotate-ca finish` ends it".into());
        }
        if dry {
            return Ok(
                "would make the next cluster CA, trust it here and announce it: every \
                       member trusts it too; then `renew-certificate` on every member and \
                       `rotate-ca finish` here"
                    .into(),
            );
        }
        let next = mars_tls::Ca::create().map_err(|x| x.to_string())?;
        root::save_next_ca(&root, next.cert(), Some(&next.key_pem())).map_err(e)?;
        self.reload_credentials().await.map_err(e)?;
        let text = ca.endorse(mars_tls::Endorse::Next, next.cert());
        self.store
            .write(vec![(TRUST_NEXT.to_string(), text)], Vec::new())
            .await?;
        let fp = mars_tls::fingerprint(next.cert());
        tracing::info!("CA rotation started: next CA sha256:{fp}");
        Ok(format!(
            "CA rotation started: every member trusts the next CA (sha256:{fp}) as soon as it \
             learns of it; run `marsadm renew-certificate` on every member (this one too), \
             then `marsadm rotate-ca finish` here"
        ))
    }

    /// `rotate-ca finish`: once every member's certificate is from the next CA, makes it the
    /// cluster CA here and announces the old one retired.
    /// With `dry` (`--dry-run`): the checks only, and what it would do.
    pub async fn rotate_finish(&self, dry: bool) -> Result<String, String> {
        let e = |e: anyhow::Error| format!("{e:#}");
        let _files = self.tls_files.lock().await;
        let root = self.ident.root.clone();
        let next = root::load_next_ca(&root)
            .map_err(e)?
            .ok_or("no CA rotation was started on this host (`rotate-ca start`)")?;
        let old = root::load_ca(&root)
            .map_err(e)?
            .ok_or("this host holds no cluster CA key")?;
        let certs: Vec<(HostName, Option<String>)> = self
            .store
            .call(|s| {
                s.list_prefix(CERT_PREFIX)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|e| Some((mars_meta::cert_of_key(&e.key)?, e.value)))
                    .collect()
            })
            .await
            .map_err(|x| x.to_string())?;
        let members = self.members().await;
        let behind: Vec<String> = members
            .keys()
            .filter(|h| {
                let cert = certs
                    .iter()
                    .find(|(c, _)| c == *h)
                    .and_then(|(_, v)| v.as_deref())
                    .and_then(|v| mars_tls::cert_from_text(v).ok());
                !cert.is_some_and(|c| mars_tls::issued_by(&c, next.cert()))
            })
            .map(ToString::to_string)
            .collect();
        if !behind.is_empty() {
            return Err(format!(
                "not every member has a certificate of the next CA yet: run `marsadm \
                 renew-certificate` on {} (and wait until this host learned it)",
                behind.join(", ")
            ));
        }
        if dry {
            return Ok(format!(
                "would make the next CA (sha256:{}) the cluster CA here and announce the old \
                 one retired",
                mars_tls::fingerprint(next.cert())
            ));
        }
        let text = next.endorse(mars_tls::Endorse::Retired, old.cert());
        self.store
            .write(vec![(TRUST_RETIRED.to_string(), text)], Vec::new())
            .await?;
        root::finish_rotation(&root).map_err(e)?;
        self.reload_credentials().await.map_err(e)?;
        let fp = mars_tls::fingerprint(next.cert());
        tracing::info!("CA rotation finished: the cluster CA is sha256:{fp}");
        Ok(format!(
            "CA rotation finished: the cluster CA is sha256:{fp}; members stop trusting the old \
             one as they learn of it. Copy the new tls/ca.key to the other hosts that issue \
             join tokens"
        ))
    }

    // ------------------------------------------------------------ merging clusters

    /// Follows the merge keys (see [`TRUST_MERGE_INTO`]) under the `tls/` lock: trusts what a
    /// trusted CA endorsed, takes the surviving cluster's id on the merging side, and says
    /// whether this host's certificate must be renewed (from which issuer, of which CA).
    async fn follow_merge(
        &self,
        into: Option<&str>,
        admit: Option<&str>,
        retired: Option<&str>,
    ) -> Result<Option<(HostName, CertificateDer<'static>)>> {
        let root = self.ident.root.clone();
        let mut renew = None;
        if let Some((cluster, issuer, _, ca)) = into
            .filter(|_| !self.merging.load(std::sync::atomic::Ordering::SeqCst))
            .and_then(|v| self.merge_endorsed(v))
        {
            let trust = root::load_trust(&root)?;
            if !trust.contains(&ca) {
                root::save_next_ca(&root, &ca, None)?;
                tracing::info!(
                    "trusting the CA of cluster {cluster} too (this cluster merges into it): \
                     sha256:{}",
                    mars_tls::fingerprint(&ca)
                );
                self.reload_credentials().await?;
            }
            if let Some(mut c) = self
                .ident
                .cluster()
                .filter(|c| c.uuid != cluster.to_string())
            {
                let old = c.uuid.clone();
                c.uuid = cluster.to_string();
                self.ident.set_cluster(c)?;
                tracing::info!("this host is in cluster {cluster} now (merged from {old})");
                self.poke.notify_waiters();
            }
            let creds = root::load_credentials(&root)?
                .ok_or_else(|| anyhow!("this host has no certificate"))?;
            if !mars_tls::issued_by(&creds.cert, &ca) {
                renew = Some((issuer, ca));
            }
        }
        let retired_ca = retired.and_then(|t| {
            mars_tls::endorsed(
                t,
                mars_tls::Endorse::Retired,
                &root::load_trust(&root).ok()?,
            )
            .ok()
        });
        if let Some((cluster, _, _, ca)) = admit.and_then(|v| self.merge_endorsed(v)) {
            let trust = root::load_trust(&root)?;
            let ours = self.ident.cluster_id() == Some(cluster);
            if ours && !trust.contains(&ca) && retired_ca.as_ref() != Some(&ca) {
                root::save_merge_ca(&root, &ca)?;
                tracing::info!(
                    "trusting the CA of the cluster that merges into this one: sha256:{}",
                    mars_tls::fingerprint(&ca)
                );
                self.reload_credentials().await?;
            }
        }
        Ok(renew)
    }

    /// A merge key's value, if a CA this host trusts endorsed it: the cluster id, the issuer
    /// and the endorsed CA.
    fn merge_endorsed(
        &self,
        value: &str,
    ) -> Option<(ClusterId, HostName, Vec<HostName>, CertificateDer<'static>)> {
        let v = parse_merge_value(value)?;
        let trust = root::load_trust(&self.ident.root).ok()?;
        let ca = mars_tls::endorsed(
            v.endorsement,
            mars_tls::Endorse::Merge {
                cluster: v.cluster.0,
            },
            &trust,
        )
        .ok()?;
        Some((v.cluster, v.issuer, v.hosts, ca))
    }

    /// On a host of the surviving side holding its CA key: once every member's certificate
    /// is from this CA, retires the merged cluster's CA (`trust/ca-retired`, as `rotate-ca
    /// finish` does) and removes the merge keys.
    async fn merge_retire(&self, admit: Option<&str>) -> Result<()> {
        let root = self.ident.root.clone();
        let (Some(admit), Some(merged), Some(ca)) =
            (admit, root::load_merge_ca(&root)?, root::load_ca(&root)?)
        else {
            return Ok(());
        };
        let hosts = match self.merge_endorsed(admit) {
            Some((cluster, _, hosts, c))
                if c == merged && self.ident.cluster_id() == Some(cluster) =>
            {
                hosts
            }
            _ => return Ok(()),
        };
        let certs: BTreeMap<HostName, Option<String>> = self
            .store
            .call(|s| {
                s.list_prefix(CERT_PREFIX)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|e| Some((mars_meta::cert_of_key(&e.key)?, e.value)))
                    .collect()
            })
            .await?;
        let members = self.members().await;
        // Every host of the merged side must be a member here first (right after the merge
        // only the issuer knows them) — or deleted (`lowlevel-delete-host` of one that was
        // down: it cannot follow the merge).
        let deleted: std::collections::BTreeSet<HostName> = self
            .store
            .call(|s| {
                s.list_prefix_with_tombstones(MEMBER_PREFIX)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| e.value.is_none())
                    .filter_map(|e| mars_meta::member_of_key(&e.key))
                    .collect()
            })
            .await?;
        if !hosts
            .iter()
            .all(|h| members.contains_key(h) || deleted.contains(h))
        {
            return Ok(());
        }
        let all_ours = members.keys().all(|h| {
            certs
                .get(h)
                .and_then(|v| v.as_deref())
                .and_then(|v| mars_tls::cert_from_text(v).ok())
                .is_some_and(|c| mars_tls::issued_by(&c, ca.cert()))
        });
        if !all_ours {
            return Ok(());
        }
        let text = ca.endorse(mars_tls::Endorse::Retired, &merged);
        self.store
            .write(
                vec![(TRUST_RETIRED.to_string(), text)],
                vec![TRUST_MERGE_INTO.to_string(), TRUST_MERGE_ADMIT.to_string()],
            )
            .await
            .map_err(|e| anyhow!(e))?;
        tracing::info!(
            "every member has a certificate of this cluster's CA: the merged cluster's CA \
             (sha256:{}) is retired",
            mars_tls::fingerprint(&merged)
        );
        Ok(())
    }

    /// The merging side: gets this host's certificate from the surviving cluster's issuer,
    /// retrying until it has one of `ca` (the issuer may not know this host yet).
    async fn renew_for_merge(self: Arc<Self>, issuer: HostName, ca: CertificateDer<'static>) {
        let mut backoff = Duration::from_millis(500);
        let mut tries = 0u32;
        loop {
            let done = root::load_credentials(&self.ident.root)
                .ok()
                .flatten()
                .is_some_and(|c| mars_tls::issued_by(&c.cert, &ca));
            if done {
                break;
            }
            match self.renew(Some(issuer.clone()), false).await {
                Ok(msg) => {
                    tracing::info!("merge: {msg}");
                    break;
                }
                Err(e) => {
                    if tries.is_multiple_of(10) {
                        tracing::info!(
                            "merge: this host's certificate from {issuer}: {e} (trying again)"
                        );
                    }
                }
            }
            tries += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.merge_renewing
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// This side's members, resources and `defaults/*` settings, as a merge compares them.
    async fn merge_names(&self) -> Result<MergeNames, String> {
        self.store
            .call(|s| -> Result<MergeNames, mars_meta::MetaError> {
                let mut n = MergeNames::default();
                for e in s.list_prefix(MEMBER_PREFIX)? {
                    if let Some(h) = mars_meta::member_of_key(&e.key) {
                        n.hosts.insert(h.to_string());
                    }
                }
                for e in s.list_prefix("resource-")? {
                    let Some(r) = e
                        .key
                        .strip_prefix("resource-")
                        .and_then(|k| k.strip_suffix("/size"))
                    else {
                        continue;
                    };
                    if !r.contains('/') {
                        n.resources.insert(r.to_string());
                    }
                }
                for e in s.list_prefix("defaults/")? {
                    if let Some(v) = e.value {
                        n.defaults.insert(e.key, v);
                    }
                }
                Ok(n)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// The highest change number this host delivered to `host`'s socket (what it has
    /// received of ours).
    pub(super) fn served_to(&self, host: &HostName) -> u64 {
        lock(&self.served).get(host).copied().unwrap_or(0)
    }

    /// Members of this cluster (other than this host) that did not answer within the last
    /// few seconds, with their error.
    pub fn unreachable_members(&self, members: &BTreeMap<HostName, String>) -> Vec<String> {
        let connected = self.connected_peers();
        let peers = lock(&self.peers);
        members
            .keys()
            .filter(|h| **h != self.ident.host && !connected.contains(*h))
            .map(|h| match peers.get(h).and_then(|p| p.error.clone()) {
                Some(e) => format!("{h} ({e})"),
                None => h.to_string(),
            })
            .collect()
    }

    /// The member side of `merge-cluster` (a [`Message::MergeRequest`] from `joiner`, a host
    /// of another cluster that proved nothing but the token yet): the checks, and with a
    /// proof the trust in the merging CA. Returns the `MergeGrant`.
    pub async fn merge_serve(&self, joiner: HostName, request: Message) -> Result<Message, String> {
        let Message::MergeRequest {
            token,
            cluster,
            ca,
            names,
            proof,
        } = request
        else {
            return Err("not a merge request".into());
        };
        let e = |e: anyhow::Error| format!("{e:#}");
        let id = self
            .ident
            .cluster_id()
            .ok_or("this host is not in a cluster")?;
        // The token first: without a good one nothing about this cluster is said.
        let ident = self.ident.clone();
        let t = token.clone();
        let ours_ca = tokio::task::spawn_blocking(move || ident.check_token(&t, false))
            .await
            .map_err(|x| x.to_string())?
            .map_err(e)?;
        let _files = self.tls_files.lock().await;
        if ClusterId(cluster) == id {
            return Err(format!("{joiner} is in cluster {id} already"));
        }
        let theirs = MergeNames::decode(&names)?;
        if !theirs.hosts.contains(joiner.as_str()) {
            return Err(format!("{joiner} is not a member of the cluster it merges"));
        }
        if root::load_trust(&self.ident.root).map_err(e)?.len() > 1 {
            return Err(format!(
                "a CA rotation or a merge is in progress in cluster {id}: let it finish first"
            ));
        }
        let ours = self.merge_names().await?;
        let conflicts = ours.conflicts(&theirs);
        if !conflicts.is_empty() {
            return Err(format!(
                "the clusters cannot be merged: {}",
                conflicts.join("; ")
            ));
        }
        let members = self.members().await;
        let down = self.unreachable_members(&members);
        if !down.is_empty() {
            return Err(format!(
                "not every member of cluster {id} is reachable from {}: {}",
                self.ident.host,
                down.join(", ")
            ));
        }
        let grant = Message::MergeGrant {
            cluster: id.0,
            ca: ours_ca.cert().to_vec(),
            names: ours.encode(),
        };
        if proof.is_empty() {
            return Ok(grant);
        }
        // The merging host holds its CA's key: it endorsed our CA into our cluster.
        let their_ca = CertificateDer::from(ca);
        let endorsed = mars_tls::endorsed(
            &proof,
            mars_tls::Endorse::Merge { cluster: id.0 },
            std::slice::from_ref(&their_ca),
        )
        .map_err(|x| format!("the merge request's proof: {x}"))?;
        if endorsed != *ours_ca.cert() {
            return Err("the merge request's proof endorses another CA than this cluster's".into());
        }
        let ident = self.ident.clone();
        tokio::task::spawn_blocking(move || ident.check_token(&token, true))
            .await
            .map_err(|x| x.to_string())?
            .map_err(e)?;
        root::save_merge_ca(&self.ident.root, &their_ca).map_err(e)?;
        self.reload_credentials().await.map_err(e)?;
        let me = self.ident.host.clone();
        let admit = ours_ca.endorse(mars_tls::Endorse::Merge { cluster: id.0 }, &their_ca);
        self.store
            .write(
                vec![
                    (
                        TRUST_MERGE_ADMIT.to_string(),
                        merge_value(id, &me, &theirs.hosts, &admit),
                    ),
                    (
                        TRUST_MERGE_INTO.to_string(),
                        merge_value(id, &me, &theirs.hosts, &proof),
                    ),
                ],
                Vec::new(),
            )
            .await?;
        tracing::info!(
            "cluster {} (hosts {}) merges into this cluster via {joiner}: its CA sha256:{} is \
             trusted until its hosts have certificates of ours",
            ClusterId(cluster),
            theirs.hosts.iter().cloned().collect::<Vec<_>>().join(", "),
            mars_tls::fingerprint(&their_ca)
        );
        Ok(grant)
    }

    /// One `MergeRequest` to the member at `addr` (authenticated by the token's pin): its
    /// answer and the stream.
    async fn merge_ask(
        &self,
        addr: &str,
        token: &mars_tls::Token,
        names: &MergeNames,
        ca: &mars_tls::Ca,
        proof: String,
    ) -> Result<(
        peer::Session,
        ClusterId,
        CertificateDer<'static>,
        MergeNames,
    )> {
        let id = self
            .ident
            .cluster_id()
            .ok_or_else(|| anyhow!("this host is not in a cluster"))?;
        let mut s = peer::connect_join(addr, &self.ident.host, token.pin).await?;
        send(
            &mut s.w,
            &Message::MergeRequest {
                token: token.presented(),
                cluster: id.0,
                ca: ca.cert().to_vec(),
                names: names.encode(),
                proof,
            },
        )
        .await?;
        s.w.flush().await?;
        match s.frames.next_within(ANSWER_TIMEOUT).await? {
            Message::MergeGrant { cluster, ca, names } => {
                let ca = CertificateDer::from(ca);
                if mars_tls::spki_pin(&ca).ok() != Some(token.pin) {
                    bail!("the CA {} sent is not the one the token pins", s.peer.host);
                }
                let names = MergeNames::decode(&names).map_err(|e| anyhow!("{e}"))?;
                Ok((s, ClusterId(cluster), ca, names))
            }
            Message::Refuse { reason, .. } => bail!("{} refused: {reason}", s.peer.host),
            other => bail!("unexpected answer: {}", peer::describe(&other)),
        }
    }

    /// `merge-cluster [HOST] ADDR --token T` on a host holding this cluster's CA key: merges
    /// this cluster into the one of the member at `addr` (see docs/security.md, "Merging
    /// clusters"). With `dry` (`merge-cluster-check`, `--dry-run`): the checks of both sides
    /// only (the token is not used up).
    pub async fn merge(
        &self,
        name: Option<HostName>,
        addr: &str,
        token: &str,
        dry: bool,
    ) -> Result<String, (mars_api::ErrorKind, String)> {
        use mars_api::ErrorKind;
        let invalid = |m: String| (ErrorKind::Invalid, m);
        let failed = |e: anyhow::Error| (ErrorKind::Failed, format!("merge-cluster {addr}: {e:#}"));
        if self.ident.insecure {
            return Err(invalid(
                "merge-cluster needs TLS: this host runs --insecure".into(),
            ));
        }
        let id = self
            .ident
            .cluster_id()
            .ok_or_else(|| invalid("this host is not in a cluster".into()))?;
        let token: mars_tls::Token = token.parse().map_err(|e| invalid(format!("{e}")))?;
        let root = self.ident.root.clone();
        let ca = root::load_ca(&root).map_err(failed)?.ok_or_else(|| {
            invalid(
                "merge-cluster runs on a host that holds this cluster's CA key \
                     (tls/ca.key)"
                    .into(),
            )
        })?;
        if root::load_trust(&root).map_err(failed)?.len() > 1 {
            return Err(invalid(format!(
                "a CA rotation or a merge is in progress in cluster {id}: let it finish first"
            )));
        }
        let members = self.members().await;
        let down = self.unreachable_members(&members);
        if !down.is_empty() {
            return Err(invalid(format!(
                "not every member of cluster {id} is reachable from {}: {}",
                self.ident.host,
                down.join(", ")
            )));
        }
        let ours = self.merge_names().await.map_err(invalid)?;
        let (s, other, other_ca, theirs) = self
            .merge_ask(addr, &token, &ours, &ca, String::new())
            .await
            .map_err(failed)?;
        let answered = s.peer.host.clone();
        drop(s);
        if let Some(n) = name.filter(|n| *n != answered) {
            return Err(invalid(format!(
                "the host at {addr} is {answered}, not {n}"
            )));
        }
        if other == id {
            return Err(invalid(format!(
                "the host at {addr} is in this cluster ({id})"
            )));
        }
        let conflicts = ours.conflicts(&theirs);
        if !conflicts.is_empty() {
            return Err(invalid(format!(
                "the clusters cannot be merged: {}",
                conflicts.join("; ")
            )));
        }
        let list = |n: &MergeNames| {
            format!(
                "members {}; resources {}",
                n.hosts.iter().cloned().collect::<Vec<_>>().join(", "),
                if n.resources.is_empty() {
                    "none".to_string()
                } else {
                    n.resources.iter().cloned().collect::<Vec<_>>().join(", ")
                }
            )
        };
        if dry {
            return Ok(format!(
                "cluster {id} ({}) can merge into cluster {other} ({}): names disjoint, \
                 settings equal, every member reachable",
                list(&ours),
                list(&theirs)
            ));
        }
        let proof = ca.endorse(mars_tls::Endorse::Merge { cluster: other.0 }, &other_ca);
        let (s, again, again_ca, _) = self
            .merge_ask(addr, &token, &ours, &ca, proof.clone())
            .await
            .map_err(failed)?;
        if again != other || again_ca != other_ca {
            return Err(failed(anyhow!(
                "{addr} answered for another cluster the second time"
            )));
        }
        let issuer = s.peer.host.clone();
        self.merging
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let r = self
            .merge_here(s, id, other, &other_ca, issuer, &members, &proof, &ours)
            .await;
        self.merging
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let issuer = r?;
        Ok(format!(
            "cluster {id} ({}) merges into cluster {other} ({}) via {issuer}: every member of \
             both sides trusts both CAs now or within seconds; the members of this side take \
             the id {other} and certificates issued by {issuer}, then the CA of {id} is \
             retired (watch `marsadm view all`)",
            list(&ours),
            list(&theirs)
        ))
    }

    /// The part of `merge` after the other side granted it: this side trusts the other CA and
    /// announces the merge, takes the other side's metadata and id, and announces this host
    /// to the issuer. Returns the issuer.
    #[allow(clippy::too_many_arguments)]
    async fn merge_here(
        &self,
        mut s: peer::Session,
        id: ClusterId,
        other: ClusterId,
        other_ca: &CertificateDer<'static>,
        issuer: HostName,
        members: &BTreeMap<HostName, String>,
        proof: &str,
        ours: &MergeNames,
    ) -> Result<HostName, (mars_api::ErrorKind, String)> {
        use mars_api::ErrorKind;
        let invalid = |m: String| (ErrorKind::Invalid, m);
        let failed = |e: anyhow::Error| (ErrorKind::Failed, format!("merge-cluster: {e:#}"));
        let root = self.ident.root.clone();
        // This side: trust the other CA, then announce the merge and give the members of
        // this side time to fetch it (they take the new cluster id from it).
        {
            let _files = self.tls_files.lock().await;
            root::save_next_ca(&root, other_ca, None).map_err(failed)?;
            self.reload_credentials().await.map_err(failed)?;
        }
        self.store
            .write(
                vec![(
                    TRUST_MERGE_INTO.to_string(),
                    merge_value(other, &issuer, &ours.hosts, proof),
                )],
                Vec::new(),
            )
            .await
            .map_err(|e| failed(anyhow!(e)))?;
        let seq = self
            .store
            .call(|s| s.local_seq())
            .await
            .map_err(|e| failed(e.into()))?;
        let others: Vec<HostName> = members
            .keys()
            .filter(|h| **h != self.ident.host)
            .cloned()
            .collect();
        let start = Instant::now();
        loop {
            let served = lock(&self.served).clone();
            let pending: Vec<String> = others
                .iter()
                .filter(|h| served.get(*h).is_none_or(|&v| v < seq))
                .map(ToString::to_string)
                .collect();
            if pending.is_empty() {
                break;
            }
            if start.elapsed() >= MERGE_ANNOUNCE_WAIT {
                tracing::warn!(
                    "merge: {} did not fetch the announcement within {MERGE_ANNOUNCE_WAIT:?}; \
                     they take it from any member that has it",
                    pending.join(", ")
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The other cluster's metadata, checked against its members' signatures (its CA is
        // trusted here now).
        let mut since = 0;
        loop {
            send(&mut s.w, &Message::ChangesSince { since, limit: PAGE })
                .await
                .map_err(failed)?;
            s.w.flush().await.map_err(|e| failed(e.into()))?;
            let (entries, upto) = loop {
                match s.frames.next_within(ANSWER_TIMEOUT).await.map_err(failed)? {
                    Message::Changes { upto, entries } => break (entries, upto),
                    Message::Notify { .. } => continue,
                    Message::Refuse { reason, .. } => {
                        return Err(failed(anyhow!("{issuer} refused: {reason}")))
                    }
                    other => return Err(failed(anyhow!("unexpected answer: {other:?}"))),
                }
            };
            check_page(&issuer, since, entries.len(), upto).map_err(failed)?;
            let done = (entries.len() as u32) < PAGE;
            if !entries.is_empty() {
                self.apply(&issuer, entries).await.map_err(failed)?;
            }
            since = upto;
            if done {
                break;
            }
        }
        lock(&self.peers).insert(
            issuer.clone(),
            PeerState {
                seen: since,
                last_ok: Some(Instant::now()),
                ..PeerState::default()
            },
        );
        // This host now belongs to the other cluster (the supervisor renews its certificate
        // from the issuer, as every member of this side does).
        let mut c = self
            .ident
            .cluster()
            .ok_or_else(|| invalid("this host left the cluster".into()))?;
        c.uuid = other.to_string();
        self.ident.set_cluster(c).map_err(failed)?;
        // Announce this host to the issuer: its address and certificate, as a joiner does;
        // the issuer then fetches the rest of this side from here.
        let me = self.ident.host.clone();
        let own: Vec<mars_meta::Entry> = self
            .store
            .call(move |st| {
                [format!("{CERT_PREFIX}{me}"), format!("{MEMBER_PREFIX}{me}")]
                    .iter()
                    .filter_map(|k| st.get(k).ok().flatten())
                    .collect()
            })
            .await
            .map_err(|e| failed(e.into()))?;
        send(
            &mut s.w,
            &Message::Changes {
                upto: 0,
                entries: own.iter().map(to_wire).collect(),
            },
        )
        .await
        .map_err(failed)?;
        let _ = s.w.shutdown().await;
        self.poke.notify_waiters();
        tracing::info!("merged cluster {id} into cluster {other} via {issuer}");
        Ok(issuer)
    }

    // ------------------------------------------------------------ membership commands

    /// What `join-cluster` checks before it contacts anybody (also its `--dry-run`, which
    /// must not use the one-time token up): not in a cluster yet, a token exactly when TLS is
    /// on, and a well-formed one. Returns the parsed token.
    pub fn join_check(
        &self,
        peer_addr: &str,
        token: Option<&str>,
        rejoin: bool,
    ) -> Result<Option<mars_tls::Token>, (mars_api::ErrorKind, String)> {
        use mars_api::ErrorKind;
        let invalid = |m: String| (ErrorKind::Invalid, m);
        match self.ident.cluster_id() {
            Some(id) if !rejoin => {
                return Err((
                    ErrorKind::Exists,
                    format!(
                        "this host already belongs to cluster {id}; leave-cluster first (if \
                         the other members deleted this host while it ran, `join-cluster \
                         --force PEER --token T` joins it again)"
                    ),
                ))
            }
            _ => {}
        }
        match (self.ident.insecure, token) {
            (true, Some(_)) => Err(invalid(
                "--token given, but this host runs --insecure (plaintext, no certificates)".into(),
            )),
            (true, None) => Ok(None),
            (false, None) => Err(invalid(format!(
                "join-cluster needs a join token: run `marsadm join-token` on the member at \
                 {peer_addr} and pass what it prints with --token (or run every host with \
                 --insecure)"
            ))),
            (false, Some(text)) => text.parse().map(Some).map_err(|e| invalid(format!("{e}"))),
        }
    }

    /// `join-cluster PEER [--token T]`: authenticates the member against the token's pin and
    /// gets this host's certificate (TLS mode), learns the cluster from the member, copies its
    /// metadata, announces itself. Returns the message for the operator.
    ///
    /// With `rejoin` on a host that is in the cluster already (the other members deleted it
    /// while it ran, `lowlevel-delete-host`): the same, but the cluster must be this host's
    /// and the member must show it deleted; it keeps its resources and announces itself
    /// again with a new certificate.
    pub async fn join(
        &self,
        peer_addr: &str,
        token: Option<&str>,
        address: String,
        rejoin: bool,
    ) -> Result<String, (mars_api::ErrorKind, String)> {
        use mars_api::ErrorKind;
        let parsed = self.join_check(peer_addr, token, rejoin)?;
        let rejoining = self.ident.cluster_id();
        let failed = |e: anyhow::Error| {
            (
                ErrorKind::Failed,
                format!("join-cluster {peer_addr}: {e:#}"),
            )
        };
        let mut own_cert = None;
        let mut new_creds = None;
        let (mut s, cluster) = match parsed {
            None => {
                let s = peer::connect(
                    peer_addr,
                    &self.ident.host,
                    ClusterId::UNKNOWN,
                    StreamKind::Meta,
                    None,
                )
                .await
                .map_err(failed)?;
                let cluster = s.peer.cluster;
                (s, cluster)
            }
            Some(t) => {
                let key = mars_tls::HostKey::generate().map_err(|e| failed(e.into()))?;
                let mut s = peer::connect_join(peer_addr, &self.ident.host, t.pin)
                    .await
                    .map_err(failed)?;
                send(
                    &mut s.w,
                    &Message::JoinRequest {
                        token: t.presented(),
                        host_key: key.public_der(),
                    },
                )
                .await
                .map_err(failed)?;
                let (cluster, cert, ca) =
                    match s.frames.next_within(ANSWER_TIMEOUT).await.map_err(failed)? {
                        Message::JoinGrant { cluster, cert, ca } => (ClusterId(cluster), cert, ca),
                        Message::Refuse { reason, .. } => {
                            return Err(failed(anyhow!("{} refused: {reason}", s.peer.host)))
                        }
                        other => {
                            return Err(failed(anyhow!(
                                "unexpected answer: {}",
                                peer::describe(&other)
                            )))
                        }
                    };
                // The CA must be the pinned one and the certificate ours, for our key.
                let ca = tokio_rustls::rustls::pki_types::CertificateDer::from(ca);
                let cert = tokio_rustls::rustls::pki_types::CertificateDer::from(cert);
                if mars_tls::spki_pin(&ca).ok() != Some(t.pin) {
                    return Err(failed(anyhow!(
                        "the CA it sent is not the one the token pins"
                    )));
                }
                let creds = mars_tls::Credentials::new(ca, cert, &key);
                own_cert = Some(mars_tls::cert_text(&creds.cert));
                new_creds = Some((creds, key));
                (s, cluster)
            }
        };
        // Joining again: only into this host's own cluster (checked before anything here
        // changes).
        if let Some(id) = rejoining.filter(|id| *id != cluster) {
            return Err((
                ErrorKind::Invalid,
                format!(
                    "the member at {peer_addr} is in cluster {cluster}, this host in {id}: \
                     leave-cluster first"
                ),
            ));
        }
        let mut since = 0;
        let mut all = Vec::new();
        loop {
            send(&mut s.w, &Message::ChangesSince { since, limit: PAGE })
                .await
                .map_err(failed)?;
            let (entries, upto) = loop {
                match s.frames.next_within(ANSWER_TIMEOUT).await.map_err(failed)? {
                    Message::Changes { upto, entries } => break (entries, upto),
                    Message::Notify { .. } => continue,
                    Message::Refuse { reason, .. } => {
                        return Err(failed(anyhow!("{} refused: {reason}", s.peer.host)))
                    }
                    other => return Err(failed(anyhow!("unexpected answer: {other:?}"))),
                }
            };
            check_page(&s.peer.host, since, entries.len(), upto).map_err(failed)?;
            if all.len() + entries.len() > JOIN_MAX_ENTRIES {
                return Err(failed(anyhow!(
                    "{} sent more than {JOIN_MAX_ENTRIES} metadata entries",
                    s.peer.host
                )));
            }
            let done = (entries.len() as u32) < PAGE;
            all.extend(entries);
            since = upto;
            if done {
                break;
            }
        }
        let own = format!("{MEMBER_PREFIX}{}", self.ident.host);
        if all.iter().any(|e| e.key == own && e.value.is_some()) {
            return Err((
                ErrorKind::Exists,
                if rejoining.is_some() {
                    format!(
                        "{} is still a member of cluster {cluster} as {}'s metadata shows: \
                         nothing to join again",
                        self.ident.host, s.peer.host
                    )
                } else {
                    format!(
                        "a host named {} is already a member of cluster {cluster}",
                        self.ident.host
                    )
                },
            ));
        }
        if let Some((creds, key)) = new_creds {
            self.ident
                .install_credentials(&creds)
                .map_err(|e| failed(e.context("the certificate it sent")))?;
            root::save_credentials(
                &self.ident.root,
                &mars_tls::pki::cert_pem(&creds.ca),
                &mars_tls::pki::cert_pem(&creds.cert),
                &key.pem(),
            )
            .map_err(failed)?;
            // Everything taken from the member from here on is checked against its
            // writer's signature.
            let authority = super::authority::PkiAuthority::new(&creds, &[]).map_err(failed)?;
            self.store
                .call(move |st| st.set_authority(Some(authority)))
                .await
                .map_err(|e| failed(e.into()))?;
        }
        let from = s.peer.host.clone();
        self.apply(&from, all).await.map_err(failed)?;
        if rejoining.is_none() {
            self.ident
                .set_cluster(ClusterFile {
                    uuid: cluster.to_string(),
                    host: self.ident.host.clone(),
                    address: address.clone(),
                })
                .map_err(failed)?;
        }
        let (k, v) = (own.clone(), address.clone());
        let cert_key = format!("{CERT_PREFIX}{}", self.ident.host);
        let entries = self
            .store
            .call(
                move |st| -> Result<Vec<mars_meta::Entry>, mars_meta::MetaError> {
                    let mut out = Vec::new();
                    // The certificate first: a member that learns of us can admit us at once,
                    // and check what we sign.
                    if let Some(cert) = &own_cert {
                        out.push(st.set(&cert_key, cert)?);
                    }
                    out.push(st.set(&k, &v)?);
                    st.resign_own()?;
                    Ok(out)
                },
            )
            .await
            .map_err(|e| failed(e.into()))?
            .map_err(|e| failed(e.into()))?;
        lock(&self.peers).insert(
            s.peer.host.clone(),
            PeerState {
                seen: since,
                last_ok: Some(Instant::now()),
                ..PeerState::default()
            },
        );
        send(
            &mut s.w,
            &Message::Changes {
                upto: 0,
                entries: entries.iter().map(to_wire).collect(),
            },
        )
        .await
        .map_err(failed)?;
        // Give the peer a moment to take the announcement before the connection closes.
        let _ = s.w.shutdown().await;
        let members: Vec<String> = self
            .members()
            .await
            .into_keys()
            .map(|h| h.to_string())
            .collect();
        Ok(format!(
            "joined cluster {cluster} via {} as {} at {address}; members: {}",
            s.peer.host,
            self.ident.host,
            members.join(", ")
        ))
    }

    /// `renew-certificate [--via HOST]`: a new key and certificate for this host, issued here
    /// if this host holds the CA's key (and no `via` is given), else by `via` or the first
    /// member that can; the new fingerprint goes to `certs/cert-HOST`, and the members close
    /// the streams this host opened with the old one (it reconnects with the new).
    /// With `dry` (`--dry-run`): the checks that need no issuer, and what it would do.
    pub async fn renew(&self, via: Option<HostName>, dry: bool) -> Result<String, String> {
        if self.ident.insecure {
            return Err("this host runs --insecure: it uses no certificate".into());
        }
        let cluster = self
            .ident
            .cluster_id()
            .ok_or("this host is not in a cluster")?;
        let me = self.ident.host.clone();
        if dry {
            root::load_credentials(&self.ident.root)
                .map_err(|e| format!("{e:#}"))?
                .ok_or("this host has no certificate to renew (join the cluster with a token)")?;
            if let Some(v) = &via {
                if !self.members().await.contains_key(v) {
                    return Err(format!("{v} is not a member of this cluster"));
                }
            }
            return Ok(format!(
                "would make a new key for {me}, have it certified {}, announce the new \
                 certificate and switch over to it",
                via.map_or(
                    "here (if this host holds the CA's key) or by the first member that \
                            does"
                        .to_string(),
                    |v| format!("by {v}")
                )
            ));
        }
        let key = mars_tls::HostKey::generate().map_err(|e| e.to_string())?;
        let holds_ca = root::load_ca(&self.ident.root)
            .map_err(|e| format!("{e:#}"))?
            .is_some();
        // The files and the installed credentials change under the lock; a certificate issued
        // here is issued under it too (the CA files may change), one asked from another member
        // is not (the supervisor follows rotations under this lock and must not wait for the
        // network).
        // `--via` this host itself: issued here (the issuer of a split-off group renews its
        // own certificate from the group's new CA).
        let local = (via.is_none() && holds_ca) || via.as_ref() == Some(&me);
        let early = if local {
            Some(self.tls_files.lock().await)
        } else {
            None
        };
        let (cert, ca, issuer) = if local {
            let (cert, ca) = self
                .ident
                .issue_certificate(&me, &key.public_der())
                .map_err(|e| format!("{e:#}"))?;
            (cert, ca, me.clone())
        } else {
            let members = self.members().await;
            let candidates: Vec<(HostName, String)> = match via {
                Some(v) => {
                    let addr = members
                        .get(&v)
                        .ok_or_else(|| format!("{v} is not a member of this cluster"))?;
                    vec![(v, addr.clone())]
                }
                None => members.into_iter().filter(|(h, _)| *h != me).collect(),
            };
            let mut errors = Vec::new();
            let mut got = None;
            for (h, addr) in candidates {
                match self.renew_from(&h, &addr, cluster, &key).await {
                    Ok((cert, ca)) => {
                        got = Some((cert, ca, h));
                        break;
                    }
                    Err(e) => errors.push(format!("{h}: {e:#}")),
                }
            }
            got.ok_or_else(|| format!("no member issued a certificate ({})", errors.join("; ")))?
        };
        let _files = match early {
            Some(g) => g,
            None => self.tls_files.lock().await,
        };
        let current = root::load_credentials(&self.ident.root)
            .map_err(|e| format!("{e:#}"))?
            .ok_or("this host has no certificate to renew (join the cluster with a token)")?;
        let ca = tokio_rustls::rustls::pki_types::CertificateDer::from(ca);
        let trust = root::load_trust(&self.ident.root).map_err(|e| format!("{e:#}"))?;
        if ca != current.ca && !trust.contains(&ca) {
            return Err(format!(
                "{issuer} answered with a CA this host does not trust (during a CA rotation: \
                 wait until this host trusts the next CA, `rotate-ca` in docs/security.md)"
            ));
        }
        let creds = mars_tls::Credentials::new(
            ca,
            tokio_rustls::rustls::pki_types::CertificateDer::from(cert),
            &key,
        );
        if creds.host().ok().as_ref() != Some(&me) {
            return Err(format!("{issuer} sent a certificate for another host"));
        }
        // The certificate and the CA that issued it (during a rotation not `ca.crt`).
        root::save_host_credentials(
            &self.ident.root,
            &format!(
                "{}{}",
                mars_tls::pki::cert_pem(&creds.cert),
                mars_tls::pki::cert_pem(&creds.ca)
            ),
            &key.pem(),
        )
        .map_err(|e| format!("{e:#}"))?;
        self.ident
            .install_credentials(&creds)
            .map_err(|e| format!("{e:#}"))?;
        let authority =
            super::authority::PkiAuthority::new(&creds, &trust).map_err(|e| format!("{e:#}"))?;
        let fp = creds.fingerprint();
        // The new certificate, then everything this host owns signed with the new key (the
        // other members check signatures against the certificate they know).
        let resigned = self
            .store
            .announce(
                Some(authority),
                vec![(
                    format!("{CERT_PREFIX}{me}"),
                    mars_tls::cert_text(&creds.cert),
                )],
            )
            .await?;
        tracing::info!("signed {resigned} metadata entries of this host with the new key");
        tracing::info!("renewed this host's certificate (issued by {issuer}): sha256:{fp}");
        Ok(format!(
            "renewed the certificate of {me} (issued by {issuer}): sha256:{fp}"
        ))
    }

    async fn renew_from(
        &self,
        host: &HostName,
        addr: &str,
        cluster: ClusterId,
        key: &mars_tls::HostKey,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut s = self.connect_member(host, addr, cluster).await?;
        send(
            &mut s.w,
            &Message::Renew {
                host_key: key.public_der(),
            },
        )
        .await?;
        s.w.flush().await?;
        loop {
            match s.frames.next_within(ANSWER_TIMEOUT).await? {
                Message::JoinGrant { cert, ca, .. } => return Ok((cert, ca)),
                Message::Notify { .. } => continue,
                Message::Refuse { reason, .. } => bail!("{reason}"),
                other => bail!("unexpected answer: {}", peer::describe(&other)),
            }
        }
    }

    /// `wait-cluster`: until every member answered after the call started.
    pub async fn wait(&self, timeout: Duration) -> Result<String, String> {
        let start = Instant::now();
        self.poke.notify_waiters();
        loop {
            let missing = self.not_answered_since(start).await;
            if missing.is_empty() {
                return Ok(format!(
                    "all {} members answered",
                    self.members().await.len()
                ));
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "no answer within {}s from: {}",
                    timeout.as_secs(),
                    missing.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.poke.notify_waiters();
        }
    }

    /// `leave-cluster` after the caller checked that no resource is held: announces the
    /// departure, waits until the other members have fetched it, then forgets the cluster.
    pub async fn leave(&self, timeout: Duration) -> Result<String, String> {
        let Some(id) = self.ident.cluster_id() else {
            return Err("this host is not in a cluster".into());
        };
        let me = self.ident.host.clone();
        let others: Vec<HostName> = self
            .members()
            .await
            .into_keys()
            .filter(|h| *h != me)
            .collect();
        let key = format!("{MEMBER_PREFIX}{me}");
        let cert_key = format!("{CERT_PREFIX}{me}");
        let seq = self
            .store
            .call(move |s| {
                if s.value(&cert_key)?.is_some() {
                    s.delete(&cert_key)?;
                }
                s.delete(&key).map(|_| s.local_seq())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        loop {
            let served = lock(&self.served).clone();
            let pending: Vec<String> = others
                .iter()
                .filter(|h| served.get(*h).is_none_or(|&s| s < seq))
                .map(ToString::to_string)
                .collect();
            if pending.is_empty() || start.elapsed() >= timeout {
                if !pending.is_empty() {
                    tracing::warn!("left without confirmation from {}", pending.join(", "));
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // No puller may record positions of the old membership after this point.
        self.stop_tasks();
        let held_ca = root::load_ca(&self.ident.root).ok().flatten().is_some();
        self.ident.forget_cluster().map_err(|e| format!("{e:#}"))?;
        if held_ca {
            tracing::warn!(
                "this host held the cluster CA's key; it is removed with the membership: if no \
                 other member holds a copy, no host can join cluster {id} any more"
            );
        }
        let _ = std::fs::remove_file(self.ident.root.join(SEEN_FILE));
        let fresh = mars_meta::Store::in_memory(me.clone(), mars_meta::system_time_ns)
            .map_err(|e| e.to_string())?;
        self.store.replace(fresh).await.map_err(|e| e.to_string())?;
        let path = self.ident.root.join(super::META_FILE);
        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let store = mars_meta::Store::open(&path, me.clone(), mars_meta::system_time_ns)
            .map_err(|e| e.to_string())?;
        self.store.replace(store).await.map_err(|e| e.to_string())?;
        // A puller started in between is gone now too, and positions start from scratch.
        self.stop_tasks();
        self.clear_peers();
        Ok(if held_ca {
            format!(
                "{me} left cluster {id}; its copy of the cluster CA's key is removed (other \
                 members that hold one still issue join tokens)"
            )
        } else {
            format!("{me} left cluster {id}")
        })
    }
}

/// What one side of a merge is made of, as the two sides compare it: members, resources and
/// the cluster-wide settings `defaults/*`. On the wire ([`Message::MergeRequest`]'s `names`):
/// one line each, `host NAME`, `resource NAME`, `default KEY VALUE`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeNames {
    pub hosts: std::collections::BTreeSet<String>,
    pub resources: std::collections::BTreeSet<String>,
    pub defaults: BTreeMap<String, String>,
}

impl MergeNames {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            out.push_str(&format!("host {h}\n"));
        }
        for r in &self.resources {
            out.push_str(&format!("resource {r}\n"));
        }
        for (k, v) in &self.defaults {
            // A value with a line break cannot be said on one line: it differs from any.
            out.push_str(&format!("default {k} {}\n", v.replace('\n', " ")));
        }
        out
    }

    /// Parses what the other side sent (bounded by the wire's string limit): names are
    /// checked as names, anything else is refused.
    pub fn decode(text: &str) -> Result<MergeNames, String> {
        let mut n = MergeNames::default();
        for line in text.lines() {
            let bad = || format!("a malformed line in the other side's names: {line:?}");
            let (kind, rest) = line.split_once(' ').ok_or_else(bad)?;
            match kind {
                "host" => {
                    HostName::new(rest).map_err(|e| format!("{}: {e}", bad()))?;
                    n.hosts.insert(rest.to_string());
                }
                "resource" => {
                    mars_config::ResourceName::new(rest).map_err(|e| format!("{}: {e}", bad()))?;
                    n.resources.insert(rest.to_string());
                }
                "default" => {
                    let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
                    if !k.starts_with("defaults/") {
                        return Err(bad());
                    }
                    n.defaults.insert(k.to_string(), v.to_string());
                }
                _ => return Err(bad()),
            }
        }
        Ok(n)
    }

    /// Why the two sides cannot become one: a host name or a resource name on both sides
    /// (MARS's check, for resources), or a cluster-wide setting that differs (refused rather
    /// than resolved: last-writer-wins would change one side's behaviour silently).
    pub fn conflicts(&self, other: &MergeNames) -> Vec<String> {
        let mut out = Vec::new();
        let both = |a: &std::collections::BTreeSet<String>,
                    b: &std::collections::BTreeSet<String>| {
            a.intersection(b).cloned().collect::<Vec<_>>()
        };
        let hosts = both(&self.hosts, &other.hosts);
        if !hosts.is_empty() {
            out.push(format!("host names in both clusters: {}", hosts.join(", ")));
        }
        let res = both(&self.resources, &other.resources);
        if !res.is_empty() {
            out.push(format!(
                "resource names in both clusters: {}",
                res.join(", ")
            ));
        }
        let keys: std::collections::BTreeSet<&String> =
            self.defaults.keys().chain(other.defaults.keys()).collect();
        let differ: Vec<String> = keys
            .into_iter()
            .filter(|k| self.defaults.get(*k) != other.defaults.get(*k))
            .map(|k| {
                let say = |v: Option<&String>| v.map_or("unset".to_string(), |v| format!("{v:?}"));
                format!(
                    "{k} ({} here, {} there)",
                    say(self.defaults.get(k)),
                    say(other.defaults.get(k))
                )
            })
            .collect();
        if !differ.is_empty() {
            out.push(format!(
                "cluster-wide settings differ (make them equal on both sides first): {}",
                differ.join(", ")
            ));
        }
        out
    }
}

/// The value of a merge key: `CLUSTER ISSUER HOSTS ENDORSEMENT` (`HOSTS` the members of the
/// merging side, comma-separated: the surviving side retires the merged CA only once all of
/// them are members with certificates of its CA).
fn merge_value(
    cluster: ClusterId,
    issuer: &HostName,
    hosts: &std::collections::BTreeSet<String>,
    endorsement: &str,
) -> String {
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    format!("{cluster} {issuer} {} {endorsement}", hosts.join(","))
}

/// A merge key's value, parsed (not yet checked: see `Cluster::merge_endorsed`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MergeValue<'a> {
    pub cluster: ClusterId,
    pub issuer: HostName,
    pub hosts: Vec<HostName>,
    pub endorsement: &'a str,
}

pub(crate) fn parse_merge_value(value: &str) -> Option<MergeValue<'_>> {
    let mut it = value.splitn(4, ' ');
    let cluster = ClusterId::parse(it.next()?).ok()?;
    let issuer = HostName::new(it.next()?).ok()?;
    let hosts = it
        .next()?
        .split(',')
        .map(HostName::new)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(MergeValue {
        cluster,
        issuer,
        hosts,
        endorsement: it.next()?,
    })
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn names(hosts: &[&str], res: &[&str], defaults: &[(&str, &str)]) -> MergeNames {
        MergeNames {
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            resources: res.iter().map(|s| s.to_string()).collect(),
            defaults: defaults
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn names_travel_and_conflicts_are_named() {
        let a = names(&["a1", "a2"], &["ra"], &[("defaults/sync-limit", "2")]);
        assert_eq!(MergeNames::decode(&a.encode()).unwrap(), a);
        let b = names(&["b1", "b2"], &["rb"], &[("defaults/sync-limit", "2")]);
        assert!(a.conflicts(&b).is_empty());
        let c = names(
            &["b1", "a2"],
            &["ra", "rc"],
            &[("defaults/unreachable-limit", "5")],
        );
        let got = a.conflicts(&c).join("; ");
        assert!(got.contains("host names in both clusters: a2"), "{got}");
        assert!(got.contains("resource names in both clusters: ra"), "{got}");
        assert!(
            got.contains("defaults/sync-limit (\"2\" here, unset there)"),
            "{got}"
        );
        assert!(
            got.contains("defaults/unreachable-limit (unset here, \"5\" there)"),
            "{got}"
        );
        for junk in [
            "x",
            "host",
            "host a/b",
            "resource ../x",
            "default other 1",
            "user a",
        ] {
            assert!(MergeNames::decode(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn a_merge_value_parses_back() {
        let id = ClusterId([3; 16]);
        let h = HostName::new("b1").unwrap();
        let hosts = ["a1".to_string(), "a2".to_string()].into_iter().collect();
        let v = merge_value(id, &h, &hosts, "x509:AAAA c2ln");
        assert_eq!(
            parse_merge_value(&v),
            Some(MergeValue {
                cluster: id,
                issuer: h,
                hosts: vec![HostName::new("a1").unwrap(), HostName::new("a2").unwrap()],
                endorsement: "x509:AAAA c2ln"
            })
        );
        assert_eq!(parse_merge_value("x y z"), None);
        assert_eq!(parse_merge_value("nonsense"), None);
        assert_eq!(parse_merge_value(""), None);
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;

    #[test]
    fn a_page_is_what_was_asked_for() {
        let h = HostName::new("b").unwrap();
        let full = PAGE as usize;
        assert!(check_page(&h, 10, 0, 10).is_ok(), "nothing new");
        assert!(check_page(&h, 10, 5, 15).is_ok());
        assert!(check_page(&h, 10, full, 2000).is_ok());
        assert!(check_page(&h, 500, 0, 3).is_ok(), "a store that began anew");
        let e = check_page(&h, 10, full + 1, 2000).unwrap_err().to_string();
        assert!(e.contains("1001 entries"), "{e}");
        let e = check_page(&h, 10, full, 10).unwrap_err().to_string();
        assert!(e.contains("changes up to 10"), "{e}");
        assert!(check_page(&h, 10, full, 9).is_err());
    }
}

#[cfg(test)]
mod heard_tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    /// 2026-12-07, ns.
    const WALL: u64 = 1_796_600_000 * S;

    #[test]
    fn age_runs_on_this_hosts_clock_whatever_the_stamps_say() {
        let t0 = Instant::now();
        // Its stamps run 300 s ahead of our wall clock (the cluster's Lamport clock was
        // dragged ahead): first sight says age 0, not "300 s in the future".
        let mut h = Heard::first(WALL + 300 * S, WALL, t0);
        assert_eq!(h.age(t0), Duration::ZERO);
        // Stamps that move are heard when they arrive: fresh, each time.
        assert!(h.stamp_seen(WALL + 302 * S, t0 + Duration::from_secs(2)));
        assert_eq!(h.age(t0 + Duration::from_secs(3)), Duration::from_secs(1));
        // A stamp that stops moving (it crashed) ages from its last move, by our clock: past
        // the 60 s window after 60 s, not after 60 + 300 s.
        assert!(!h.stamp_seen(WALL + 302 * S, t0 + Duration::from_secs(30)));
        let later = t0 + Duration::from_secs(63);
        assert_eq!(h.age(later), Duration::from_secs(61));
        assert!(!alive_for_view(
            Some(h.age(later)),
            false,
            Duration::from_secs(60)
        ));
        // An older stamp (relayed late) does not make it younger.
        assert!(!h.stamp_seen(WALL + 301 * S, later));
        assert_eq!(h.age(later), Duration::from_secs(61));
        // A stamp from the store at start, 90 s old by our wall clock: that is its age.
        let h = Heard::first(WALL - 90 * S, WALL, t0);
        assert_eq!(h.age(t0 + Duration::from_secs(1)), Duration::from_secs(91));
    }

    #[test]
    fn skew_is_the_fastest_sample_and_warned_once_each_way() {
        let t0 = Instant::now();
        let mut h = Heard::first(WALL, WALL, t0);
        assert_eq!(h.skew(), None);
        // Hosts before the clock in the value wrote "1": no measurement.
        assert_eq!(h.sample_skew(Some(1), WALL), SkewNews::None);
        assert_eq!(h.skew(), None);
        // 300 s ahead; each sample arrives late by its travel time.
        assert_eq!(
            h.sample_skew(Some(WALL + 300 * S), WALL + S / 2),
            SkewNews::Over((300 * S - S / 2) as i64)
        );
        assert_eq!(
            h.sample_skew(Some(WALL + 302 * S), WALL + 2 * S + S / 100),
            SkewNews::None
        );
        assert_eq!(h.skew(), Some((300 * S - S / 100) as i64));
        // Fixed: once the old samples are gone it is said once.
        let mut news = Vec::new();
        for i in 0..SKEW_SAMPLES as u64 {
            let w = WALL + (10 + 2 * i) * S;
            news.push(h.sample_skew(Some(w), w + S / 1000));
        }
        assert_eq!(news.iter().filter(|n| **n != SkewNews::None).count(), 1);
        assert_eq!(news.last(), Some(&SkewNews::Back(-((S / 1000) as i64))));
        // Behind works the same way.
        let mut h = Heard::first(WALL, WALL, t0);
        assert_eq!(
            h.sample_skew(Some(WALL - 60 * S), WALL),
            SkewNews::Over(-60 * S as i64)
        );
    }

    #[test]
    fn a_stamp_from_a_clock_ahead_is_made_local() {
        let h = HostName::new("skewtest").unwrap();
        let now = mars_meta::system_time_ns();
        // Unknown skew: never later than now.
        assert!(to_local_wall(&h, now + 300 * S) <= mars_meta::system_time_ns());
        set_skew(&h, Some(-300 * S as i64));
        // Its clock is 300 s behind: its stamp of "now" is ours.
        let l = to_local_wall(&h, now - 300 * S);
        assert!(l >= now && l <= mars_meta::system_time_ns(), "{l} {now}");
        // A small "skew" is mostly travel time: not corrected (the stamp would look newer).
        set_skew(&h, Some(-2 * S as i64));
        let l = to_local_wall(&h, now - 10 * S);
        assert_eq!(l, now - 10 * S);
        set_skew(&h, None);
    }
}
