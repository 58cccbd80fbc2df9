//! Cluster membership and metadata propagation between hosts.
//!
//! Every host keeps the replicated metadata in its own `meta` store (`ROOT/meta.redb`) and
//! *pulls*: for every other member (the `ips/ip-HOST` keys) a task keeps a metadata connection
//! open and asks "your changes after N" every [`POLL`], applying what comes back. Changes learned
//! from a third host get new local numbers, so they are relayed to whoever pulls from us. A
//! member cut off for an hour simply asks for more when the link returns: the cost is the number
//! of changes, never the size of the map.
//!
//! Connections start with a `wire::Hello` in both directions; a peer of another cluster or
//! protocol version gets a `Refuse` frame with the reason and a log line here. The connection
//! code only sees `AsyncRead + AsyncWrite`, so mutual TLS can wrap the streams later.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mars_api::{ErrorKind, MemberView, Reply};
use mars_config::HostName;
use mars_meta::Store;
use mars_wire::{decode_frame, ClusterId, Hello, Message, StreamKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::state::{Daemon, Refusal};

/// How often each member is asked for changes.
pub const POLL: Duration = Duration::from_millis(300);
/// How often this host refreshes its liveness stamp.
const ALIVE_EVERY: Duration = Duration::from_secs(2);
/// Entries per answer.
const PAGE: u32 = 1000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A member that answered within this time counts as connected.
const CONNECTED_WINDOW: Duration = Duration::from_secs(3);
pub const MEMBER_PREFIX: &str = "ips/ip-";

/// Default port peers listen on.
pub const DEFAULT_PORT: u16 = 7777;

pub fn alive_key(host: &HostName) -> String {
    format!("alive-{host}")
}

#[derive(Debug, Default, Clone)]
struct PeerState {
    address: String,
    last_ok: Option<Instant>,
    error: Option<String>,
    /// Everything of theirs up to this number is applied here.
    seen: u64,
}

/// The cluster side of the daemon.
pub struct Cluster {
    store: Mutex<Store>,
    peers: Mutex<BTreeMap<HostName, PeerState>>,
    /// Highest change number sent to each member (what it has received of ours).
    served: Mutex<BTreeMap<HostName, u64>>,
    /// Wakes the pullers (update-cluster, a local change worth spreading at once).
    pub poke: tokio::sync::Notify,
    tasks: Mutex<BTreeMap<HostName, (String, JoinHandle<()>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    pub fn new(store: Store) -> Self {
        Self {
            store: Mutex::new(store),
            peers: Mutex::default(),
            served: Mutex::default(),
            poke: tokio::sync::Notify::new(),
            tasks: Mutex::default(),
        }
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Replaces the store (leave-cluster starts from an empty one).
    pub fn replace_store(&self, store: Store) {
        *lock(&self.store) = store;
        lock(&self.peers).clear();
        lock(&self.served).clear();
    }

    pub fn clear_peers(&self) {
        lock(&self.peers).clear();
        lock(&self.served).clear();
    }

    /// Members and their addresses, from the replicated `ips/ip-HOST` keys.
    pub fn members(&self) -> BTreeMap<HostName, String> {
        self.store()
            .list_prefix(MEMBER_PREFIX)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                let h = mars_meta::member_of_key(&e.key)?;
                Some((h, e.value.unwrap_or_default()))
            })
            .collect()
    }

    pub fn member_views(&self, me: &HostName, window: Duration) -> Vec<MemberView> {
        let now = mars_meta::system_time_ns();
        let peers = lock(&self.peers).clone();
        let members = self.members();
        let store = self.store();
        members
            .into_iter()
            .map(|(h, address)| {
                let stamp = store.get(&alive_key(&h)).ok().flatten().map(|e| e.stamp);
                let age = stamp.map(|s| now.saturating_sub(s) as f64 / 1e9);
                let p = peers.get(&h);
                let this = h == *me;
                MemberView {
                    host: h.to_string(),
                    address,
                    this_host: this,
                    alive: this || age.is_some_and(|a| a <= window.as_secs_f64()),
                    age_secs: if this { Some(0.0) } else { age },
                    connected: this
                        || p.and_then(|p| p.last_ok)
                            .is_some_and(|t| t.elapsed() < CONNECTED_WINDOW),
                    error: p.and_then(|p| p.error.clone()),
                }
            })
            .collect()
    }

    /// Age of every member's newest liveness stamp.
    pub fn ages(&self) -> BTreeMap<HostName, Duration> {
        let now = mars_meta::system_time_ns();
        let members = self.members();
        let store = self.store();
        members
            .into_keys()
            .filter_map(|h| {
                let stamp = store.get(&alive_key(&h)).ok().flatten()?.stamp;
                Some((h, Duration::from_nanos(now.saturating_sub(stamp))))
            })
            .collect()
    }

    /// Whether every other member answered within `since`.
    /// Members other than `me` that have not answered since `since`.
    pub(crate) fn all_answered_since(&self, me: &HostName, since: Instant) -> Vec<String> {
        let peers = lock(&self.peers);
        self.members()
            .into_keys()
            .filter(|h| h != me)
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

    pub fn stop_tasks(&self) {
        for (_, (_, t)) in std::mem::take(&mut *lock(&self.tasks)) {
            t.abort();
        }
    }
}

/// The two halves of a peer connection. Protocol code sees only these, so a TLS layer can wrap
/// the TCP stream later without any change here.
pub(crate) type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

fn split_stream<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> (BoxRead, BoxWrite) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

/// Reads frames from a stream.
pub(crate) struct FrameReader<R> {
    r: R,
    /// Received bytes; `buf[start..]` is not decoded yet. Reused for the whole connection, so
    /// that megabyte frames do not each take fresh memory.
    buf: Vec<u8>,
    start: usize,
}

/// What one read asks the socket for at least (log data and sync chunks arrive in frames of up
/// to a few MiB; a whole frame's room is made as soon as its length is known).
const READ_AT_LEAST: usize = 256 << 10;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(r: R, leftover: Vec<u8>) -> Self {
        Self {
            r,
            buf: leftover,
            start: 0,
        }
    }

    /// Bytes received but not yet decoded.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next message. Cancel-safe: a read cancelled while pending has read nothing, and
    /// whatever was read is in the buffer before the next await.
    pub(crate) async fn next(&mut self) -> Result<Message> {
        loop {
            let pending = &self.buf[self.start..];
            if let Some((m, n)) = decode_frame(pending)? {
                self.start += n;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(m);
            }
            // Room for the rest of this frame (received straight into the buffer: no second
            // copy), with the incomplete frame moved to the front first.
            let want = mars_wire::frame_len(pending).map_or(0, |l| l - pending.len());
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.reserve(want.max(READ_AT_LEAST));
            if self.r.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed");
            }
        }
    }
}

/// Sends one frame; a large payload goes to the socket from where it lies (vectored write).
pub(crate) async fn send<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> Result<()> {
    let f = mars_wire::frame_parts(m);
    let mut frame = bytes::Buf::chain(bytes::Buf::chain(f.head.as_slice(), f.payload), &f.crc[..]);
    w.write_all_buf(&mut frame).await?;
    Ok(())
}

/// Reads the peer's hello; returns it and any bytes read beyond it.
async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Hello, Vec<u8>)> {
    let mut buf = Vec::new();
    let fut = async {
        loop {
            if let Some((h, n)) = Hello::decode(&buf)? {
                return Ok::<_, anyhow::Error>((h, buf[n..].to_vec()));
            }
            let mut chunk = [0u8; 256];
            let n = r.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed during hello");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(HELLO_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("no hello within {HELLO_TIMEOUT:?}"))?
}

fn to_wire(e: &mars_meta::Entry) -> mars_wire::Entry {
    mars_wire::Entry {
        key: e.key.clone(),
        value: e.value.clone(),
        stamp: e.stamp,
        origin: e.origin.to_string(),
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
            }),
            Err(err) => {
                tracing::warn!("dropping metadata entry {:?}: origin {err}", e.key);
                None
            }
        })
        .collect()
}

fn apply(d: &Daemon, from: &HostName, entries: Vec<mars_wire::Entry>) -> Result<usize> {
    let entries = from_wire(entries);
    let report = d.cluster.store().apply_remote(&entries)?;
    for (key, why) in &report.refused {
        tracing::warn!("refused metadata {key:?} from {from}: {why}");
    }
    Ok(report.applied)
}

/// Our hello for a stream kind.
fn our_hello(d: &Daemon, kind: StreamKind) -> Hello {
    Hello::new(
        kind,
        d.cluster_id().unwrap_or(ClusterId::UNKNOWN),
        d.host.clone(),
    )
}

/// The listener: answers metadata requests of other members.
pub async fn listen(d: Arc<Daemon>, l: TcpListener) {
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                let _ = s.set_nodelay(true);
                let d = d.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_peer(d, s, from).await {
                        tracing::debug!("peer connection from {from}: {e:#}");
                    }
                });
            }
            Err(e) => tracing::error!("peer accept: {e}"),
        }
    }
}

async fn serve_peer(d: Arc<Daemon>, s: TcpStream, from: SocketAddr) -> Result<()> {
    let (mut r, mut w) = split_stream(s);
    let (peer, rest) = read_hello(&mut r).await?;
    let ours = our_hello(&d, StreamKind::Meta);
    let refusal = if ours.cluster == ClusterId::UNKNOWN {
        Some("this host is not in a cluster".to_string())
    } else if let Err(r) = ours.check_peer(&peer) {
        Some(r.to_string())
    } else if peer.kind != StreamKind::Meta && peer.cluster == ClusterId::UNKNOWN {
        Some("log and sync streams are for members only".to_string())
    } else {
        None
    };
    w.write_all(&ours.encode()).await?;
    if let Some(reason) = refusal {
        tracing::warn!("refused peer {} at {from}: {reason}", peer.host);
        send(&mut w, &Message::Refuse { reason }).await?;
        return Ok(());
    }
    let joining = peer.cluster == ClusterId::UNKNOWN;
    let mut frames = FrameReader::new(r, rest);
    match peer.kind {
        StreamKind::Meta => {}
        StreamKind::Fetch => return crate::logserve::serve_fetch(d, frames, w, peer.host).await,
        StreamKind::Sync => return crate::logserve::serve_sync(d, frames, w, peer.host).await,
    }
    loop {
        match frames.next().await? {
            Message::ChangesSince { since, limit } => {
                let (reply, upto) = {
                    let store = d.cluster.store();
                    // A peer ahead of us saw an earlier incarnation of this store: resend all.
                    let from_seq = if since > store.local_seq() { 0 } else { since };
                    let c = store.changes_since(from_seq, limit.clamp(1, PAGE) as usize)?;
                    let reply = Message::Changes {
                        upto: c.up_to,
                        entries: c.entries.iter().map(to_wire).collect(),
                    };
                    (reply, c.up_to)
                };
                send(&mut w, &reply).await?;
                w.flush().await?;
                // Delivered to the peer's socket: what leave-cluster waits for (a peer that
                // learns of the departure stops asking, so it never asks past it).
                let mut served = lock(&d.cluster.served);
                let v = served.entry(peer.host.clone()).or_default();
                *v = (*v).max(upto);
            }
            Message::Changes { entries, .. } if joining => {
                // A joining host announces itself; nothing else is taken from it.
                let own = format!("{MEMBER_PREFIX}{}", peer.host);
                let (mine, other): (Vec<_>, Vec<_>) = entries
                    .into_iter()
                    .partition(|e| e.key == own && e.origin == peer.host.as_str());
                if !other.is_empty() {
                    tracing::warn!(
                        "ignored {} entries pushed by joining host {}",
                        other.len(),
                        peer.host
                    );
                }
                let d2 = d.clone();
                let host = peer.host.clone();
                tokio::task::spawn_blocking(move || apply(&d2, &host, mine)).await??;
                tracing::info!("host {} at {from} joined the cluster", peer.host);
                d.cluster.poke.notify_waiters();
            }
            Message::Ping { stamp } => {
                let now = d.cluster.store().clock().now().max(stamp);
                send(&mut w, &Message::Pong { stamp: now }).await?;
            }
            Message::Refuse { reason } => bail!("peer {} refused: {reason}", peer.host),
            other => bail!("unexpected message from {}: {other:?}", peer.host),
        }
    }
}

/// `ADDR[:PORT]` with the port made explicit (default 7777).
pub fn with_default_port(addr: &str) -> String {
    let has_port = addr.parse::<SocketAddr>().is_ok()
        || (addr.parse::<std::net::Ipv6Addr>().is_err()
            && addr
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()));
    if has_port {
        addr.to_string()
    } else if addr.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{addr}]:{DEFAULT_PORT}")
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    }
}

/// Resolves ADDR[:PORT] (default port 7777).
pub async fn resolve(addr: &str) -> Result<SocketAddr> {
    let with_port = with_default_port(addr);
    let mut addrs = tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?;
    addrs
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to nothing"))
}

/// A connection to a peer, after the hellos.
pub(crate) struct Session {
    pub peer: Hello,
    pub w: BoxWrite,
    pub frames: FrameReader<BoxRead>,
}

async fn connect(d: &Daemon, addr: &str, cluster: ClusterId) -> Result<Session> {
    connect_kind(d, addr, cluster, StreamKind::Meta).await
}

/// Connects to the member at `addr` for a stream of `kind`.
pub(crate) async fn connect_kind(
    d: &Daemon,
    addr: &str,
    cluster: ClusterId,
    kind: StreamKind,
) -> Result<Session> {
    let sa = resolve(addr).await?;
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(sa))
        .await
        .map_err(|_| anyhow!("connect to {sa}: timed out"))?
        .with_context(|| format!("connect to {sa}"))?;
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = split_stream(s);
    w.write_all(&Hello::new(kind, cluster, d.host.clone()).encode())
        .await?;
    let (peer, rest) = read_hello(&mut r).await?;
    let mut frames = FrameReader::new(r, rest);
    let ours = Hello::new(kind, cluster, d.host.clone());
    if let Err(e) = ours.check_peer(&peer) {
        bail!("{addr}: {e}");
    }
    // A refusing peer sends its reason right after its hello.
    if peer.cluster == ClusterId::UNKNOWN {
        if let Ok(Ok(Message::Refuse { reason })) =
            tokio::time::timeout(Duration::from_secs(2), frames.next()).await
        {
            bail!("{} at {addr} refused: {reason}", peer.host);
        }
        bail!("{} at {addr} is not in a cluster", peer.host);
    }
    Ok(Session { peer, w, frames })
}

impl Session {
    /// One "changes since" round; returns the entries and the new position.
    async fn pull(&mut self, since: u64) -> Result<(Vec<mars_wire::Entry>, u64)> {
        send(&mut self.w, &Message::ChangesSince { since, limit: PAGE }).await?;
        match self.frames.next().await? {
            Message::Changes { upto, entries } => Ok((entries, upto)),
            Message::Refuse { reason } => bail!("{} refused: {reason}", self.peer.host),
            other => bail!("unexpected answer from {}: {other:?}", self.peer.host),
        }
    }
}

/// Keeps pulling from one member, reconnecting with backoff.
async fn pull_loop(d: Arc<Daemon>, host: HostName, addr: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let err = pull_session(&d, &host, &addr).await.unwrap_err();
        let msg = format!("{err:#}");
        let first = {
            let mut peers = lock(&d.cluster.peers);
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

async fn pull_session(d: &Arc<Daemon>, host: &HostName, addr: &str) -> Result<()> {
    let cluster = d.cluster_id().ok_or_else(|| anyhow!("not in a cluster"))?;
    let mut s = connect(d, addr, cluster).await?;
    if s.peer.host != *host {
        bail!("{addr} answers as host {}, expected {host}", s.peer.host);
    }
    loop {
        let since = lock(&d.cluster.peers).get(host).map_or(0, |p| p.seen);
        let (entries, upto) = s.pull(since).await?;
        if d.cluster_id() != Some(cluster) {
            bail!("this host left the cluster");
        }
        let full = entries.len() as u32 >= PAGE;
        if !entries.is_empty() {
            let d2 = d.clone();
            let h2 = host.clone();
            tokio::task::spawn_blocking(move || apply(&d2, &h2, entries)).await??;
        }
        {
            let mut peers = lock(&d.cluster.peers);
            let p = peers.entry(host.clone()).or_default();
            p.seen = upto;
            p.last_ok = Some(Instant::now());
            p.error = None;
            p.address = addr.to_string();
        }
        if !full {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {},
                _ = d.cluster.poke.notified() => {},
            }
        }
    }
}

/// Starts and stops pullers as membership changes, and refreshes our liveness stamp.
pub async fn supervise(d: Arc<Daemon>) {
    let mut last_alive: Option<Instant> = None;
    let mut last_gc: Option<Instant> = None;
    let mut last_saved = BTreeMap::new();
    load_seen(&d);
    loop {
        if d.cluster_id().is_some() {
            if last_gc.is_none_or(|t| t.elapsed() >= GC_EVERY) {
                let d2 = d.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let horizon = mars_meta::system_time_ns()
                        .saturating_sub(TOMBSTONE_RETENTION.as_nanos() as u64);
                    match d2.cluster.store().gc_tombstones(horizon) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            "collected {n} metadata tombstones older than {TOMBSTONE_RETENTION:?}"
                        ),
                        Err(e) => tracing::warn!("tombstone collection: {e}"),
                    }
                })
                .await;
                last_gc = Some(Instant::now());
            }
            let seen: BTreeMap<HostName, u64> = lock(&d.cluster.peers)
                .iter()
                .map(|(h, p)| (h.clone(), p.seen))
                .collect();
            if seen != last_saved {
                if let Err(e) = save_seen(&d, &seen) {
                    tracing::warn!("cannot save peer positions: {e:#}");
                }
                last_saved = seen;
            }
            if last_alive.is_none_or(|t| t.elapsed() >= ALIVE_EVERY) {
                let d2 = d.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let key = alive_key(&d2.host);
                    if let Err(e) = d2.cluster.store().set(&key, "1") {
                        tracing::warn!("liveness stamp: {e}");
                    }
                })
                .await;
                last_alive = Some(Instant::now());
            }
            let members = d.cluster.members();
            let mut tasks = lock(&d.cluster.tasks);
            tasks.retain(|h, (addr, t)| {
                let keep = members.get(h) == Some(addr) && !t.is_finished();
                if !keep {
                    t.abort();
                }
                keep
            });
            for (h, addr) in members {
                if h != d.host && !tasks.contains_key(&h) {
                    let t = tokio::spawn(pull_loop(d.clone(), h.clone(), addr.clone()));
                    tasks.insert(h, (addr, t));
                }
            }
        } else {
            d.cluster.stop_tasks();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletion markers are kept this long (MARS keeps `.deleted` links a week too): a member that
/// is away longer than this must not bring deleted keys back, so it should rejoin.
const TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const GC_EVERY: Duration = Duration::from_secs(3600);
/// How far this host has read every member's changes, so that a restart asks for the news
/// only, not for the whole map again.
pub const SEEN_FILE: &str = "peers-seen.toml";

fn save_seen(d: &Daemon, seen: &BTreeMap<HostName, u64>) -> Result<()> {
    let table: BTreeMap<String, u64> = seen.iter().map(|(h, s)| (h.to_string(), *s)).collect();
    crate::root::write_toml(&d.root, SEEN_FILE, &table)
}

fn load_seen(d: &Daemon) {
    // Positions only mean something together with the store they were applied to.
    if d.cluster.store().local_seq() == 0 {
        return;
    }
    let table: BTreeMap<String, u64> = match crate::root::read_toml(&d.root.join(SEEN_FILE)) {
        Ok(Some(t)) => t,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("ignoring saved peer positions: {e:#}");
            return;
        }
    };
    let mut peers = lock(&d.cluster.peers);
    for (h, s) in table {
        if let Ok(h) = HostName::new(&h) {
            peers.entry(h).or_default().seen = s;
        }
    }
}

fn refusal(kind: ErrorKind, msg: impl Into<String>) -> Refusal {
    Refusal(kind, msg.into())
}

/// `join-cluster PEER`: learns the cluster from a member, copies its metadata, announces itself.
pub async fn join(d: Arc<Daemon>, peer: &str) -> Result<Reply, Refusal> {
    if let Some(id) = d.cluster_id() {
        return Err(refusal(
            ErrorKind::Exists,
            format!("this host already belongs to cluster {id}; leave-cluster first"),
        ));
    }
    let failed =
        |e: anyhow::Error| refusal(ErrorKind::Failed, format!("join-cluster {peer}: {e:#}"));
    let mut s = connect(&d, peer, ClusterId::UNKNOWN)
        .await
        .map_err(failed)?;
    let cluster = s.peer.cluster;
    let mut since = 0;
    let mut all = Vec::new();
    loop {
        let (entries, upto) = s.pull(since).await.map_err(failed)?;
        let done = (entries.len() as u32) < PAGE;
        all.extend(entries);
        since = upto;
        if done {
            break;
        }
    }
    let own = format!("{MEMBER_PREFIX}{}", d.host);
    if all.iter().any(|e| e.key == own && e.value.is_some()) {
        return Err(refusal(
            ErrorKind::Exists,
            format!(
                "a host named {} is already a member of cluster {cluster}",
                d.host
            ),
        ));
    }
    let d2 = d.clone();
    let from = s.peer.host.clone();
    let address = d.advertised();
    let entry = tokio::task::spawn_blocking(move || -> Result<mars_meta::Entry> {
        apply(&d2, &from, all)?;
        d2.set_cluster(cluster, d2.advertised())?;
        Ok(d2.cluster.store().set(&own, &d2.advertised())?)
    })
    .await
    .map_err(|e| failed(e.into()))?
    .map_err(failed)?;
    lock(&d.cluster.peers).insert(
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
            entries: vec![to_wire(&entry)],
        },
    )
    .await
    .map_err(failed)?;
    // Give the peer a moment to take the announcement before the connection closes.
    let _ = s.w.shutdown().await;
    let members: Vec<String> = d
        .cluster
        .members()
        .into_keys()
        .map(|h| h.to_string())
        .collect();
    Ok(Reply::Done {
        message: format!(
            "joined cluster {cluster} via {} as {} at {address}; members: {}",
            s.peer.host,
            d.host,
            members.join(", ")
        ),
    })
}

/// `wait-cluster`: until every member answered after the call started.
pub async fn wait(d: Arc<Daemon>, timeout: Duration) -> Result<Reply, Refusal> {
    if d.cluster_id().is_none() {
        return Err(refusal(ErrorKind::Invalid, "this host is not in a cluster"));
    }
    let start = Instant::now();
    d.cluster.poke.notify_waiters();
    loop {
        let missing = d.cluster.all_answered_since(&d.host, start);
        if missing.is_empty() {
            return Ok(Reply::Done {
                message: format!("all {} members answered", d.cluster.members().len()),
            });
        }
        if start.elapsed() >= timeout {
            return Err(refusal(
                ErrorKind::Failed,
                format!(
                    "no answer within {}s from: {}",
                    timeout.as_secs(),
                    missing.join(", ")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        d.cluster.poke.notify_waiters();
    }
}

/// `leave-cluster`: refused while resources remain; announces the departure and waits until
/// the other members have fetched it, then forgets the cluster.
pub async fn leave(d: Arc<Daemon>, timeout: Duration) -> Result<Reply, Refusal> {
    let Some(id) = d.cluster_id() else {
        return Err(refusal(ErrorKind::Invalid, "this host is not in a cluster"));
    };
    let held = d.resource_names();
    if !held.is_empty() {
        return Err(refusal(
            ErrorKind::Invalid,
            format!(
                "this host still holds resources ({}); leave or delete them first",
                held.join(", ")
            ),
        ));
    }
    let others: Vec<HostName> = d
        .cluster
        .members()
        .into_keys()
        .filter(|h| *h != d.host)
        .collect();
    let seq = {
        let mut store = d.cluster.store();
        store
            .delete(&format!("{MEMBER_PREFIX}{}", d.host))
            .map_err(|e| refusal(ErrorKind::Failed, e.to_string()))?;
        store.local_seq()
    };
    let start = Instant::now();
    loop {
        let served = lock(&d.cluster.served).clone();
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
    d.cluster.stop_tasks();
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || d2.forget_cluster())
        .await
        .map_err(|e| refusal(ErrorKind::Failed, e.to_string()))?
        .map_err(|e| refusal(ErrorKind::Failed, format!("{e:#}")))?;
    // A puller started in between is gone now too, and positions start from scratch.
    d.cluster.stop_tasks();
    d.cluster.clear_peers();
    Ok(Reply::Done {
        message: format!("{} left cluster {id}", d.host),
    })
}

/// `update-cluster`: one fresh round with every member.
pub async fn update(d: Arc<Daemon>, timeout: Duration) -> Result<Reply, Refusal> {
    wait(d, timeout).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_port() {
        let f = super::with_default_port;
        assert_eq!(f("10.0.0.1"), "10.0.0.1:7777");
        assert_eq!(f("10.0.0.1:9"), "10.0.0.1:9");
        assert_eq!(f("::1"), "[::1]:7777");
        assert_eq!(f("[::1]:9"), "[::1]:9");
        assert_eq!(f("alpha.example"), "alpha.example:7777");
        assert_eq!(f("alpha.example:9"), "alpha.example:9");
    }
}
