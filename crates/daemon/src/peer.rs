//! The peer port as streams of frames: connecting (TLS, then the hello in both directions),
//! accepting (a listener that authenticates each stream and hands it to the handler of its
//! kind), and reading and writing frames. Protocol code sees only `AsyncRead`/`AsyncWrite`
//! halves.
//!
//! Authentication (mars-tls): both sides present a certificate of the cluster's CA; a peer is
//! the host its certificate names, and a hello claiming another name is refused. The accepting
//! side also asks the layers above whether that certificate is the host's current one (a
//! removed member's is revoked). A client without a certificate may only join: its first frame
//! must be a `JoinRequest`. With `--insecure` the streams are plain TCP and nobody is
//! authenticated; the first byte tells a TLS peer (0x16, a handshake record) from a plaintext
//! one (`M` of the hello's magic), so a mixed pair says what is wrong instead of hanging.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use mars_config::HostName;
use mars_tls::PeerTls;
use mars_wire::{
    decode_frame_unpacking, ClusterId, Hello, Message, Method, Methods, Packer, RefuseKind,
    StreamKind, Unpacker,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::listen::{AcceptErrors, Admission, LogBudget};
use crate::traffic::{self, Counted, PeerError, Traffic};

/// A stream kind as the metrics label it.
pub fn kind_label(kind: StreamKind) -> &'static str {
    match kind {
        StreamKind::Meta => "meta",
        StreamKind::Fetch => "fetch",
        StreamKind::Sync => "sync",
    }
}

/// What peers get refused is logged within this budget (a flood of refused connections must
/// not flood the log).
static REFUSALS: LogBudget = LogBudget::new();

/// Logs a refusal within [`REFUSALS`].
macro_rules! refusal {
    ($($arg:tt)*) => {
        crate::traffic::count(crate::traffic::PeerError::Refused);
        if let Some(left_out) = REFUSALS.take() {
            if left_out > 0 {
                tracing::warn!("{} ({left_out} more refusals not logged)", format_args!($($arg)*));
            } else {
                tracing::warn!($($arg)*);
            }
        }
    };
}

/// Default port peers listen on.
pub const DEFAULT_PORT: u16 = 7777;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most peer connections served at once; more are closed at once (a peer opens a handful per
/// resource it replicates).
pub const MAX_CONNECTIONS: usize = 16_384;
/// Most peer connections from one address: a member replicating 1,000 resources from this
/// host holds about 2,000; one address cannot take every place.
pub const MAX_PER_ADDRESS: usize = 4_096;
/// TCP keepalive on every peer connection: a peer whose host died or whose network went away
/// without a FIN is noticed within about a minute even on a stream that is quiet by design.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_tcp_keepalive(&ka);
    let plan = buffer_plan();
    if let Some(n) = plan.recv {
        let _ = sock.set_recv_buffer_size(n);
    }
    if let Some(n) = plan.send {
        let _ = sock.set_send_buffer_size(n);
    }
}

// ---------------------------------------------------------------- long fat pipes

/// What a replication socket must buffer to keep a long fat pipe full: a TCP sender can have
/// at most one window in flight, and the window is bounded by the receiver's buffer and the
/// sender's, so a stream moves at most buffer / round-trip time. 100 ms × 1 Gbit/s is 12.5 MB;
/// 16 MiB covers it (the kernel doubles the value and keeps part for its bookkeeping).
pub const LFN_BUFFER: usize = 16 << 20;

/// The buffer sizes peer sockets ask for (`None`: leave the kernel's autotuning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferPlan {
    pub recv: Option<usize>,
    pub send: Option<usize>,
}

/// One direction's size: `SO_RCVBUF`/`SO_SNDBUF` are capped by `net.core.rmem_max`/
/// `wmem_max` (`core_max`) and switch the socket's autotuning off, which would otherwise grow
/// it up to the third value of `net.ipv4.tcp_rmem`/`tcp_wmem` (`autotune_max`). So the socket
/// asks for [`LFN_BUFFER`] only where the cap lets it get more than autotuning would; else it
/// keeps autotuning. An operator raises `net.core.rmem_max`/`wmem_max` (or the autotuning
/// maxima) to at least 16 MiB for links beyond 100 ms × 1 Gbit/s (docs/operations.md).
pub fn buffer_size(core_max: Option<usize>, autotune_max: Option<usize>) -> Option<usize> {
    let granted = LFN_BUFFER.min(core_max?);
    (granted > autotune_max.unwrap_or(0)).then_some(granted)
}

fn sysctl(path: &str) -> Option<Vec<usize>> {
    let s = std::fs::read_to_string(path).ok()?;
    s.split_whitespace().map(|v| v.parse().ok()).collect()
}

/// The plan for this machine, read once from `/proc/sys` (logged once when the limits keep
/// the buffers below what a long fat pipe needs).
pub fn buffer_plan() -> BufferPlan {
    static PLAN: std::sync::OnceLock<BufferPlan> = std::sync::OnceLock::new();
    *PLAN.get_or_init(|| {
        let core =
            |n: &str| sysctl(&format!("/proc/sys/net/core/{n}")).and_then(|v| v.first().copied());
        let auto =
            |n: &str| sysctl(&format!("/proc/sys/net/ipv4/{n}")).and_then(|v| v.get(2).copied());
        let (rmem, wmem) = (core("rmem_max"), core("wmem_max"));
        let (tcp_r, tcp_w) = (auto("tcp_rmem"), auto("tcp_wmem"));
        let plan = BufferPlan {
            recv: buffer_size(rmem, tcp_r),
            send: buffer_size(wmem, tcp_w),
        };
        let best = |set: Option<usize>, auto: Option<usize>| set.or(auto).unwrap_or(0);
        if best(plan.recv, tcp_r) < LFN_BUFFER || best(plan.send, tcp_w) < LFN_BUFFER {
            tracing::info!(
                "peer sockets: buffers up to {} KiB receive, {} KiB send (net.core.rmem_max \
                 {rmem:?}, wmem_max {wmem:?}, tcp_rmem max {tcp_r:?}, tcp_wmem max {tcp_w:?}); \
                 a link of 100 ms x 1 Gbit/s needs {} KiB: raise net.core.rmem_max and \
                 wmem_max (see docs/operations.md)",
                best(plan.recv, tcp_r) >> 10,
                best(plan.send, tcp_w) >> 10,
                LFN_BUFFER >> 10
            );
        }
        plan
    })
}

// ---------------------------------------------------------------- compression

/// The compression methods this host may use on fetch and sync streams: the cluster's
/// `defaults/enabled-net-compressions`, set by the host's measurement loop as it changes.
static NET_COMPRESSIONS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

pub fn set_net_compressions(m: Methods) {
    NET_COMPRESSIONS.store(m.bits(), std::sync::atomic::Ordering::Relaxed);
}

pub fn net_compressions() -> Methods {
    Methods::from_bits(NET_COMPRESSIONS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Peers that answered a version-5 hello in version 4 (they predate compression), by
/// address, and when: they are offered nothing for [`OLD_PEER_MEMORY`], so that an upgrade
/// host by host costs each old peer one refused connection per period, not one per session.
static OLD_PEERS: std::sync::Mutex<std::collections::BTreeMap<String, std::time::Instant>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());
const OLD_PEER_MEMORY: Duration = Duration::from_secs(600);

fn old_peer(addr: &str) -> bool {
    let mut t = OLD_PEERS.lock().unwrap_or_else(|e| e.into_inner());
    t.retain(|_, at| at.elapsed() < OLD_PEER_MEMORY);
    t.contains_key(addr)
}

/// The peer answered our version-5 hello in version 4: it predates compression (and refuses
/// the hello); connect again without offering any.
#[derive(Debug, thiserror::Error)]
#[error("{0} speaks protocol version 4 (no compression)")]
struct OldPeer(String);

/// What a fetch or sync server sends with: the session's [`Packer`] (packing runs on a
/// blocking thread: it is CPU work of milliseconds per chunk) and the counters it adds the
/// savings to.
pub struct Packing {
    packer: Option<Box<Packer>>,
    method: Option<Method>,
    traffic: Arc<Traffic>,
}

impl Packing {
    pub fn new(method: Option<Method>, traffic: Arc<Traffic>) -> Self {
        Packing {
            packer: Some(Box::new(Packer::new(method))),
            method,
            traffic,
        }
    }
}

/// Sends `m`, packed where the session agreed on a method and it pays ([`Packer::pack`]);
/// returns it (its buffer is reused by the caller).
pub async fn send_packed<W: AsyncWrite + Unpin>(
    w: &mut W,
    p: &mut Packing,
    m: Message,
) -> Result<Message> {
    let payload = match &m {
        Message::LogData { data, .. } | Message::SyncData { data, .. } => data.len(),
        _ => 0,
    };
    if p.method.is_none() || payload < mars_wire::MIN_PACK {
        send(w, &m).await?;
        return Ok(m);
    }
    let mut packer = p.packer.take().ok_or_else(|| anyhow!("packer lost"))?;
    let (packer, m, st) = tokio::task::spawn_blocking(move || {
        let st = packer.pack(&m);
        (packer, m, st)
    })
    .await?;
    let r = if st.packed {
        p.traffic
            .sent_saved
            .fetch_add(st.raw - st.wire, std::sync::atomic::Ordering::Relaxed);
        w.write_all(packer.packed_frame()).await.map_err(Into::into)
    } else {
        send(w, &m).await
    };
    p.packer = Some(packer);
    r?;
    Ok(m)
}

/// Once a frame has begun, its next bytes must come within this (a slow link still delivers
/// something every few seconds; a peer that stops in the middle of a frame holds its buffer).
pub const FRAME_STALL: Duration = Duration::from_secs(60);

pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

fn split_stream<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> (BoxRead, BoxWrite) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(WriteStall::new(w, FRAME_STALL)))
}

/// A writer that fails when the peer takes nothing for `limit`: a peer that is alive (so TCP
/// keepalive is answered) but stops reading would otherwise hold a sender, its buffers and
/// its place forever.
pub struct WriteStall<W> {
    w: W,
    limit: Duration,
    /// Armed while a write waits for room.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<W> WriteStall<W> {
    pub fn new(w: W, limit: Duration) -> Self {
        WriteStall {
            w,
            limit,
            deadline: None,
        }
    }

    /// After a `Pending` from the writer: an error once the peer took nothing for `limit`.
    fn stalled(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Error> {
        let limit = self.limit;
        let d = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match d.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.deadline = None;
                std::task::Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer took no byte for {limit:?}"),
                ))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match r {
            std::task::Poll::Ready(r) => {
                self.deadline = None;
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => self.stalled(cx).map(Err),
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WriteStall<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.w).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.w).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.w.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.w).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.w).poll_shutdown(cx)
    }
}

/// The largest frame a metadata stream carries either way: a page of at most 1,000 entries
/// (keys ≤ 255 bytes, values ≤ 4 KiB, signatures) or a certificate grant.
pub const META_FRAME: u32 = 8 << 20;
/// The largest frame a fetch or sync server reads: requests only (`FetchFrom`, `SyncCheck`,
/// `Ping`).
pub const REQUEST_FRAME: u32 = 64 << 10;

/// A peer announced a frame larger than its stream carries: it breaks the protocol (logged as
/// a refusal, unlike a connection that merely ends).
#[derive(Debug, thiserror::Error)]
#[error("a frame of {len} bytes, more than the {limit} this stream carries")]
pub struct FrameTooLarge {
    pub len: u32,
    pub limit: u32,
}

/// The largest frame one side reads on a stream of `kind`: log data and sync chunks flow from
/// the server to the client only.
pub fn frame_limit(kind: StreamKind, serving: bool) -> u32 {
    match (kind, serving) {
        (StreamKind::Meta, _) => META_FRAME,
        (_, true) => REQUEST_FRAME,
        (_, false) => mars_wire::MAX_FRAME,
    }
}

/// Reads frames from a stream.
pub struct FrameReader<R> {
    r: R,
    /// Received bytes; `buf[start..]` is not decoded yet. Reused for the whole connection, so
    /// that megabyte frames do not each take fresh memory.
    buf: Vec<u8>,
    start: usize,
    /// See [`FRAME_STALL`].
    stall: Duration,
    /// The largest frame this stream may carry this way ([`frame_limit`]).
    limit: u32,
    /// Unpacks packed frames of the session's method (none: a packed frame ends the stream).
    unpacker: Unpacker,
    /// Where what compression saved is counted.
    saved: Option<Arc<Traffic>>,
    /// A large `LogData` frame being received straight into its own buffer
    /// ([`FrameReader::next_fetch`]); kept here so that a cancelled read loses nothing.
    chunk: Option<Partial>,
}

/// What a fetch stream delivers ([`FrameReader::next_fetch`]).
#[derive(Debug)]
pub enum Fetched {
    /// Log data of logfile `file`, received straight into an aligned buffer; its frame's
    /// checksum is checked by the appender against the records' own (`Received::data_crc`).
    Chunk {
        file: u64,
        chunk: mars_replica::Received,
    },
    Message(Message),
}

/// A `LogData` frame whose data is being received into its buffer.
struct Partial {
    head: mars_wire::LogDataHead,
    buf: mars_storage::PooledBuf,
    lead: usize,
    /// Data bytes received so far.
    got: usize,
}

/// `LogData` frames with at least this much data are received into an aligned buffer of their
/// own (smaller ones are cheaper through the stream's buffer, whose copy is small) …
const DIRECT_RECV_MIN: usize = 64 << 10;
/// … and at most this much: a length field claims memory before the bytes arrive, so only up
/// to what a source sends per chunk during a catch-up (`serve::CHUNK`, 4 MiB, plus a record's
/// slack); a larger frame (one record above 4 MiB) grows the stream's buffer with what arrives,
/// as every other frame does.
const DIRECT_RECV_MAX: usize = (4 << 20) + (64 << 10);
/// What a fetch stream reads at most while it does not know the next frame's head yet (a
/// TLS record's worth: small frames still come whole).
const DIRECT_PROBE: usize = 16 << 10;

/// What one read asks the socket for at least (log data and sync chunks arrive in frames of up
/// to a few MiB; a whole frame's room is made as soon as its length is known).
const READ_AT_LEAST: usize = 256 << 10;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R, leftover: Vec<u8>) -> Self {
        Self {
            r,
            buf: leftover,
            start: 0,
            stall: FRAME_STALL,
            limit: mars_wire::MAX_FRAME,
            unpacker: Unpacker::new(None, mars_wire::MAX_FRAME),
            saved: None,
            chunk: None,
        }
    }

    /// The same reader refusing frames longer than `limit` (see [`frame_limit`]), packed
    /// frames' contents included.
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self.unpacker = Unpacker::new(self.unpacker.agreed(), limit);
        self
    }

    /// The same reader unpacking frames of `method` (the session's agreed one), counting what
    /// it saved in `traffic`.
    pub fn with_method(mut self, method: Option<Method>, traffic: Arc<Traffic>) -> Self {
        self.unpacker = Unpacker::new(method, self.limit);
        self.saved = Some(traffic);
        self
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next message. Cancel-safe: a read cancelled while pending has read nothing, and
    /// whatever was read is in the buffer before the next await.
    pub async fn next(&mut self) -> Result<Message> {
        match self.next_inner(false).await? {
            Fetched::Message(m) => Ok(m),
            Fetched::Chunk { .. } => unreachable!("chunks only when asked for"),
        }
    }

    /// The next message of a fetch stream, where large log data frames are received straight
    /// into an aligned buffer from the pool ([`Fetched::Chunk`]) that becomes the copy's
    /// O_DIRECT write and replay's window: no copy out of the stream's buffer, no fresh pages
    /// per frame, no checksum pass of its own (the appender derives the frame's checksum from
    /// the records'). Cancel-safe like [`FrameReader::next`]: a chunk half received stays here.
    pub async fn next_fetch(&mut self) -> Result<Fetched> {
        self.next_inner(true).await
    }

    /// The next message within `limit`, as [`FrameReader::next_fetch`].
    pub async fn next_fetch_within(&mut self, limit: Duration) -> Result<Fetched> {
        tokio::time::timeout(limit, self.next_fetch())
            .await
            .map_err(|_| anyhow!("no message within {limit:?}"))?
    }

    async fn next_inner(&mut self, direct: bool) -> Result<Fetched> {
        loop {
            if self.chunk.is_some() {
                return self.receive_chunk().await;
            }
            let pending = &self.buf[self.start..];
            if let Some(len) = pending.get(..4) {
                let len = u32::from_le_bytes(len.try_into().expect("4 bytes"));
                if len > self.limit {
                    return Err(FrameTooLarge {
                        len,
                        limit: self.limit,
                    }
                    .into());
                }
            }
            if direct {
                if let Some(head) = mars_wire::log_data_head(pending)?
                    .filter(|h| (DIRECT_RECV_MIN..=DIRECT_RECV_MAX).contains(&h.len))
                {
                    // The data that came with the head is copied over (at most one read's
                    // worth); the rest is read into the chunk's buffer.
                    let (mut buf, lead) = mars_replica::Received::buffer(head.offset, head.len);
                    let here = (pending.len() - mars_wire::LOG_DATA_HEAD).min(head.len);
                    let from = mars_wire::LOG_DATA_HEAD;
                    buf.as_mut_slice()[lead..lead + here]
                        .copy_from_slice(&pending[from..from + here]);
                    self.start += from + here;
                    self.chunk = Some(Partial {
                        head,
                        buf,
                        lead,
                        got: here,
                    });
                    continue;
                }
            }
            if let Some((m, n, raw)) = decode_frame_unpacking(pending, &mut self.unpacker)? {
                if let Some(t) = self.saved.as_ref().filter(|_| raw > n) {
                    t.received_saved
                        .fetch_add((raw - n) as u64, std::sync::atomic::Ordering::Relaxed);
                }
                self.start += n;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Fetched::Message(m));
            }
            // Room for more of this frame (received straight into the buffer: no second
            // copy), with the incomplete frame moved to the front first. The room grows with
            // what arrived, at most doubling the buffer per read: a length field alone claims
            // nothing (a peer announcing a 33 MiB frame and sending 4 bytes got 33 MiB
            // reserved), so memory stays within twice what a peer really sent. The buffer
            // keeps its capacity, so a stream of large frames pays the growth once.
            let want = mars_wire::frame_len(pending).map_or(0, |l| l - pending.len());
            // Before a fetch stream's frame head is known, read only a little: a large chunk's
            // data then goes straight to its own buffer instead of through this one.
            let cap = if direct && pending.len() < mars_wire::LOG_DATA_HEAD {
                DIRECT_PROBE
            } else {
                usize::MAX
            };
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let room = want.clamp(READ_AT_LEAST, self.buf.len().max(READ_AT_LEAST));
            self.buf.reserve(room);
            let mut into = bytes::BufMut::limit(&mut self.buf, cap);
            // Between frames a stream may be quiet for as long as its protocol allows (the
            // caller's timeouts); inside a frame the bytes must keep coming.
            let read = if into.get_ref().is_empty() {
                self.r.read_buf(&mut into).await?
            } else {
                tokio::time::timeout(self.stall, self.r.read_buf(&mut into))
                    .await
                    .map_err(|_| {
                        anyhow!(
                            "no byte within {:?} in the middle of a frame ({} bytes of it came)",
                            self.stall,
                            into.get_ref().len()
                        )
                    })??
            };
            if read == 0 {
                bail!("connection closed");
            }
        }
    }

    /// Receives the rest of the chunk under way ([`FrameReader::chunk`]): its data into its
    /// buffer, then the frame's checksum through the stream's buffer.
    async fn receive_chunk(&mut self) -> Result<Fetched> {
        let stall = self.stall;
        let c = self.chunk.as_mut().expect("a chunk under way");
        while c.got < c.head.len {
            let room = &mut c.buf.as_mut_slice()[c.lead + c.got..c.lead + c.head.len];
            let n = tokio::time::timeout(stall, self.r.read(room))
                .await
                .map_err(|_| {
                    anyhow!(
                        "no byte within {stall:?} in the middle of a frame ({} bytes of it came)",
                        mars_wire::LOG_DATA_HEAD + c.got
                    )
                })??;
            if n == 0 {
                bail!("connection closed");
            }
            c.got += n;
        }
        // The checksum: through the stream's buffer, which may receive the next frame's first
        // bytes with it.
        while self.buf.len() - self.start < 4 {
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.reserve(READ_AT_LEAST);
            let n = tokio::time::timeout(stall, self.r.read_buf(&mut self.buf))
                .await
                .map_err(|_| anyhow!("no byte within {stall:?} before a frame's checksum"))??;
            if n == 0 {
                bail!("connection closed");
            }
        }
        let crc: [u8; 4] = self.buf[self.start..self.start + 4]
            .try_into()
            .expect("4 bytes");
        self.start += 4;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let c = self.chunk.take().expect("a chunk under way");
        Ok(Fetched::Chunk {
            file: c.head.file,
            chunk: mars_replica::Received {
                offset: c.head.offset,
                buf: c.buf,
                len: c.head.len,
                data_crc: c.head.data_crc(crc),
            },
        })
    }

    /// The next message within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Result<Message> {
        tokio::time::timeout(limit, self.next())
            .await
            .map_err(|_| anyhow!("no message within {limit:?}"))?
    }
}

/// Sends one frame; a large payload goes to the socket from where it lies (vectored write).
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> Result<()> {
    let f = mars_wire::frame_parts(m);
    let mut frame = bytes::Buf::chain(bytes::Buf::chain(f.head.as_slice(), f.payload), &f.crc[..]);
    w.write_all_buf(&mut frame).await?;
    Ok(())
}

/// Sends a refusal and flushes; the caller closes.
pub async fn refuse<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: RefuseKind,
    reason: String,
) -> Result<()> {
    send(w, &Message::Refuse { kind, reason }).await?;
    w.flush().await?;
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
pub struct Session {
    pub peer: Hello,
    pub w: BoxWrite,
    pub frames: FrameReader<BoxRead>,
    /// The compression method the hellos agreed on (the server packs; `frames` unpacks).
    pub method: Option<Method>,
}

async fn tcp_connect(addr: &str) -> Result<TcpStream> {
    let sa = resolve(addr).await?;
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(sa))
        .await
        .map_err(|_| anyhow!("connect to {sa}: timed out"))?
        .with_context(|| format!("connect to {sa}"))?;
    tune(&s);
    Ok(s)
}

/// The TLS handshake as a client; returns the stream and the host the server's certificate
/// names.
async fn tls_connect(
    addr: &str,
    s: TcpStream,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Option<HostName>)> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = tokio::time::timeout(HELLO_TIMEOUT, connector.connect(mars_tls::server_name(), s))
        .await
        .map_err(|_| anyhow!("{addr}: no TLS handshake within {HELLO_TIMEOUT:?}"))?
        .map_err(|e| handshake_error(addr, e))?;
    let named = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(mars_tls::certified_host)
        .transpose()?;
    Ok((tls, named))
}

/// Says what a failed client handshake means.
fn handshake_error(addr: &str, e: std::io::Error) -> anyhow::Error {
    use tokio_rustls::rustls::Error as TlsErr;
    match e.get_ref().and_then(|i| i.downcast_ref::<TlsErr>()) {
        Some(TlsErr::InvalidCertificate(why)) => {
            anyhow!("{addr}: its certificate is not one of this cluster's ({why:?})")
        }
        Some(other) => anyhow!("{addr}: TLS handshake failed: {other}"),
        None => match e.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof => anyhow!(
                "{addr} ended the TLS handshake: it is in no cluster yet, runs --insecure, or \
                 did not accept this host's certificate"
            ),
            _ => anyhow!("{addr}: TLS handshake failed: {e}"),
        },
    }
}

/// Exchanges hellos over `r`/`w`; a certified peer must claim the name its certificate gives.
async fn client_hellos(
    addr: &str,
    (mut r, mut w): (BoxRead, BoxWrite),
    ours: Hello,
    certified: Option<HostName>,
) -> Result<Session> {
    w.write_all(&ours.encode()).await?;
    let (peer, rest) = read_hello(&mut r).await?;
    if ours.version > peer.version && peer.version == mars_wire::MIN_PROTOCOL_VERSION {
        // An old peer: it refuses our hello (after its own); the caller tries again.
        return Err(OldPeer(peer.host.to_string()).into());
    }
    // Counted from after the hellos, under the name the peer gives (checked below).
    let counter = traffic::of(peer.host.as_str(), kind_label(ours.kind));
    let r: BoxRead = Box::new(Counted::new(r, counter.clone()));
    let w: BoxWrite = Box::new(Counted::new(w, counter.clone()));
    if let Err(e) = ours.check_peer(&peer) {
        bail!("{addr}: {e}");
    }
    let method = ours.agreed(&peer).map_err(|e| anyhow!("{addr}: {e}"))?;
    if ours.kind != StreamKind::Meta {
        counter.method.store(
            method.map_or(0, |m| m as u8),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let mut frames = FrameReader::new(r, rest)
        .with_limit(frame_limit(ours.kind, false))
        .with_method(method, counter);
    // A refusing peer sends its reason right after its hello.
    if peer.cluster == ClusterId::UNKNOWN && ours.cluster != ClusterId::UNKNOWN {
        if let Ok(Ok(Message::Refuse { reason, .. })) =
            tokio::time::timeout(Duration::from_secs(2), frames.next()).await
        {
            bail!("{} at {addr} refused: {reason}", peer.host);
        }
        bail!("{} at {addr} is not in a cluster", peer.host);
    }
    if let Some(named) = certified {
        if named != peer.host {
            bail!(
                "{addr}: its certificate names host {named}, but it says it is {}",
                peer.host
            );
        }
    }
    Ok(Session {
        peer,
        w,
        frames,
        method,
    })
}

/// Connects as `me` to the member at `addr` for a stream of `kind`: over TLS with `tls`, in
/// plaintext with `None` (`--insecure`).
pub async fn connect(
    addr: &str,
    me: &HostName,
    cluster: ClusterId,
    kind: StreamKind,
    tls: Option<&PeerTls>,
) -> Result<Session> {
    let attempt = |offer: Methods| async move {
        let s = tcp_connect(addr).await?;
        let ours = Hello::new(kind, cluster, me.clone()).offering(offer);
        match tls {
            None => client_hellos(addr, split_stream(s), ours, None).await,
            Some(t) => {
                let (s, named) = tls_connect(addr, s, t.client.clone()).await?;
                let named = named.ok_or_else(|| anyhow!("{addr} presented no certificate"))?;
                client_hellos(addr, split_stream(s), ours, Some(named)).await
            }
        }
    };
    // Compression is offered on the bulk streams, to peers not known to predate it.
    let offer = match kind {
        StreamKind::Meta => Methods::NONE,
        _ if old_peer(addr) => Methods::NONE,
        _ => net_compressions(),
    };
    let r = match attempt(offer).await {
        Err(e) if e.is::<OldPeer>() => {
            tracing::info!("{e}: connecting to {addr} again without compression");
            OLD_PEERS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(addr.to_string(), std::time::Instant::now());
            attempt(Methods::NONE).await
        }
        r => r,
    };
    if let Ok(Session {
        method: Some(m), ..
    }) = &r
    {
        tracing::debug!(
            "{addr}: the {} stream is compressed with {m}",
            kind_label(kind)
        );
    }
    if r.is_err() {
        traffic::count(PeerError::ConnectFailed);
    }
    r
}

/// Connects as a joiner without a certificate: the member must present a chain whose CA
/// hashes to `pin` (from the join token). The caller sends the `JoinRequest` next.
pub async fn connect_join(addr: &str, me: &HostName, pin: mars_tls::Pin) -> Result<Session> {
    let s = tcp_connect(addr).await?;
    let config = mars_tls::join_client(pin)?;
    let (s, named) = tls_connect(addr, s, config).await.map_err(|e| {
        if e.to_string().contains("certificate is not one of") {
            anyhow!("{addr} is not a member of the cluster the token is for (its CA does not match the token's pin)")
        } else {
            e
        }
    })?;
    let ours = Hello::new(StreamKind::Meta, ClusterId::UNKNOWN, me.clone());
    client_hellos(addr, split_stream(s), ours, named).await
}

/// An accepted stream after the hellos: the peer's hello and the halves.
pub struct Incoming {
    pub peer: Hello,
    pub from: SocketAddr,
    pub w: BoxWrite,
    pub frames: FrameReader<BoxRead>,
    /// The compression method this side chose in its hello (fetch and sync streams only):
    /// send the data with [`Packing`].
    pub method: Option<Method>,
    /// The stream's counters (for [`Packing`]).
    pub traffic: Arc<Traffic>,
}

pub type ServeFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
pub type JoinFuture = Pin<Box<dyn Future<Output = Result<Message, String>> + Send>>;

/// How this host accepts peer streams now.
pub enum Accepting {
    /// `--insecure`: plaintext, nobody authenticated.
    Plain,
    /// Mutual TLS with these credentials.
    Tls(Arc<PeerTls>),
    /// TLS mode, but no certificate yet (not in a cluster): nothing to serve.
    Closed,
}

/// What the listener needs from the layers above: our hello, the state of our credentials,
/// the admission of certified peers and joiners, and a handler per stream kind.
pub trait Handlers: Send + Sync + 'static {
    /// This host's name and cluster (`UNKNOWN` before it belongs to one).
    fn me(&self) -> (HostName, ClusterId);
    fn accepting(&self) -> Accepting;
    /// Whether `host`, authenticated by a certificate with `fingerprint`, may talk to us (it
    /// must be a member whose current certificate that is); the error says why not.
    fn admit(&self, host: HostName, fingerprint: String) -> CheckFuture;
    /// A joiner without a certificate presented `token` for `host` with `host_key`: the
    /// `JoinGrant` to send, or why not.
    fn join(
        &self,
        host: HostName,
        token: String,
        host_key: Vec<u8>,
        from: SocketAddr,
    ) -> JoinFuture;
    /// A host of another cluster without a certificate of ours asks to merge its cluster into
    /// this one (`Message::MergeRequest`): the `MergeGrant` to send, or why not. With an empty
    /// `proof` only the checks run (the token is not used up).
    fn merge(&self, host: HostName, request: Message, from: SocketAddr) -> JoinFuture;
    fn serve(&self, kind: StreamKind, conn: Incoming) -> ServeFuture;
    /// Resolves once `host`'s certificate `fingerprint` is no longer its current one (it left,
    /// was deleted, or renewed): its open streams are closed then.
    fn revoked(
        &self,
        host: HostName,
        fingerprint: String,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Accepts peer connections until the task is dropped.
pub async fn listen(l: TcpListener, h: Arc<dyn Handlers>) {
    let admission = Admission::new("peer listener", MAX_CONNECTIONS, MAX_PER_ADDRESS);
    listen_with(l, h, admission).await;
}

/// [`listen`] with the given limits.
async fn listen_with(l: TcpListener, h: Arc<dyn Handlers>, admission: Arc<Admission>) {
    let mut errors = AcceptErrors::new("peer listener");
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                errors.accepted();
                // Refused before a byte is read or sent: dropping the stream closes it.
                let Some(slot) = admission.admit(from) else {
                    continue;
                };
                tune(&s);
                let h = h.clone();
                // Every line about this stream carries the peer's address (`peer`).
                let span = tracing::info_span!("peer", peer = %from);
                tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        let _slot = slot;
                        if let Err(e) = accept(h, s, from).await {
                            traffic::count(PeerError::StreamFailed);
                            if e.chain().any(|c| c.is::<FrameTooLarge>()) {
                                refusal!("closed the peer connection from {from}: {e:#}");
                            } else {
                                tracing::debug!("peer connection from {from}: {e:#}");
                            }
                        }
                    },
                    span,
                ));
            }
            Err(e) => errors.failed(e).await,
        }
    }
}

/// The first byte a client sent, without taking it from the stream.
async fn first_byte(s: &TcpStream) -> Result<u8> {
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(HELLO_TIMEOUT, s.peek(&mut b))
        .await
        .map_err(|_| anyhow!("nothing sent within {HELLO_TIMEOUT:?}"))??;
    if n == 0 {
        bail!("connection closed before a byte");
    }
    Ok(b[0])
}

/// TLS records of type handshake start with this byte.
const TLS_HANDSHAKE: u8 = 0x16;

async fn accept(h: Arc<dyn Handlers>, s: TcpStream, from: SocketAddr) -> Result<()> {
    let first = first_byte(&s).await?;
    let (me, _) = h.me();
    match h.accepting() {
        Accepting::Plain if first == TLS_HANDSHAKE => {
            refusal!(
                "refused a TLS connection from {from}: this host runs --insecure (every host \
                 of a cluster must run with the same setting)"
            );
            Ok(())
        }
        Accepting::Plain => accept_hello(h, split_stream(s), from, None).await,
        Accepting::Tls(_) | Accepting::Closed if first != TLS_HANDSHAKE => {
            // A plaintext peer (`--insecure`) or garbage: a plaintext refusal, so that an
            // insecure marsd says what is wrong; nothing about the cluster in it.
            refusal!("refused a plaintext connection from {from}: peers must use TLS");
            let (mut r, mut w) = split_stream(s);
            // Its hello is read first: closing with unread bytes would reset the connection
            // and the refusal might never arrive.
            let _ = read_hello(&mut r).await;
            let ours = Hello::new(StreamKind::Meta, ClusterId::UNKNOWN, me);
            w.write_all(&ours.encode()).await?;
            let reason = "this host accepts TLS only (does the peer run --insecure?)";
            refuse(&mut w, RefuseKind::Hello, reason.into()).await?;
            w.shutdown().await?;
            Ok(())
        }
        Accepting::Closed => {
            tracing::debug!("closed a connection from {from}: not in a cluster yet");
            Ok(())
        }
        Accepting::Tls(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
            let s = match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(s)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    refusal!("refused peer at {from}: TLS handshake: {e}");
                    return Ok(());
                }
                Err(_) => {
                    refusal!("refused peer at {from}: no TLS handshake within {HELLO_TIMEOUT:?}");
                    return Ok(());
                }
            };
            let certified = match s.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                None => None,
                Some(c) => Some((mars_tls::certified_host(c)?, mars_tls::fingerprint(c))),
            };
            accept_hello(h, split_stream(s), from, Some(certified)).await
        }
    }
}

/// After the transport: hellos, then the handler. `certified` is `None` in plaintext mode,
/// `Some(None)` for a TLS client without a certificate (a joiner), else its host and
/// certificate fingerprint.
async fn accept_hello(
    h: Arc<dyn Handlers>,
    (mut r, mut w): (BoxRead, BoxWrite),
    from: SocketAddr,
    certified: Option<Option<(HostName, String)>>,
) -> Result<()> {
    let (peer, rest) = read_hello(&mut r).await?;
    let (me, cluster) = h.me();
    let joiner = matches!(certified, Some(None));
    // A joiner learns the cluster from the grant, once its token was good. The answer is in
    // the peer's version (a version-4 peer reads nothing else), with the compression method
    // of a fetch or sync stream.
    let enabled = match peer.kind {
        StreamKind::Meta => Methods::NONE,
        _ => net_compressions(),
    };
    let ours = Hello::new(
        StreamKind::Meta,
        if joiner { ClusterId::UNKNOWN } else { cluster },
        me,
    )
    .answering(&peer, enabled);
    let refusal = if cluster == ClusterId::UNKNOWN {
        Some("this host is not in a cluster".to_string())
    } else if let Err(r) = ours.check_peer(&peer) {
        Some(r.to_string())
    } else if joiner && (peer.kind != StreamKind::Meta || peer.cluster != ClusterId::UNKNOWN) {
        Some("a host without a certificate of this cluster may only join".to_string())
    } else if peer.kind != StreamKind::Meta && peer.cluster == ClusterId::UNKNOWN {
        Some("log and sync streams are for members only".to_string())
    } else if let Some(Some((named, fingerprint))) = &certified {
        if *named != peer.host {
            Some(format!(
                "its certificate names host {named}, but it says it is {}",
                peer.host
            ))
        } else {
            h.admit(named.clone(), fingerprint.clone()).await.err()
        }
    } else {
        None
    };
    w.write_all(&ours.encode()).await?;
    if let Some(reason) = refusal {
        refusal!("refused peer {} at {from}: {reason}", peer.host);
        refuse(&mut w, RefuseKind::Hello, reason).await?;
        return Ok(());
    }
    // Counted from here: the peer is admitted (or a joiner, counted under its claimed name).
    let counter = traffic::of(peer.host.as_str(), kind_label(peer.kind));
    let r: BoxRead = Box::new(Counted::new(r, counter.clone()));
    let mut w: BoxWrite = Box::new(Counted::new(w, counter.clone()));
    let mut frames = FrameReader::new(r, rest).with_limit(frame_limit(peer.kind, true));
    let method = ours.methods.preferred();
    if peer.kind != StreamKind::Meta {
        counter.method.store(
            method.map_or(0, |m| m as u8),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    if joiner {
        let mut check_only = false;
        let grant = match frames.next_within(HELLO_TIMEOUT).await? {
            Message::JoinRequest { token, host_key } => {
                h.join(peer.host.clone(), token, host_key, from).await
            }
            m @ Message::MergeRequest { .. } => {
                check_only = matches!(&m, Message::MergeRequest { proof, .. } if proof.is_empty());
                h.merge(peer.host.clone(), m, from).await
            }
            other => Err(format!(
                "a host without a certificate must send a join request first, not {}",
                describe(&other)
            )),
        };
        match grant {
            Ok(m) => {
                send(&mut w, &m).await?;
                if check_only {
                    w.flush().await?;
                    let _ = w.shutdown().await;
                    return Ok(());
                }
            }
            Err(reason) => {
                refusal!("refused join of {} from {from}: {reason}", peer.host);
                refuse(&mut w, RefuseKind::Hello, reason).await?;
                return Ok(());
            }
        }
    }
    let kind = peer.kind;
    let host = peer.host.clone();
    let conn = Incoming {
        peer,
        from,
        w,
        frames,
        method,
        traffic: counter,
    };
    match certified {
        Some(Some((_, fingerprint))) => {
            tokio::select! {
                r = h.serve(kind, conn) => r,
                () = h.revoked(host.clone(), fingerprint) => {
                    tracing::warn!(
                        "closed the {kind:?} stream of {host} at {from}: its certificate was revoked"
                    );
                    Ok(())
                }
            }
        }
        _ => h.serve(kind, conn).await,
    }
}

/// One line about a message, without its payload (log data can be megabytes).
pub fn describe(m: &Message) -> String {
    match m {
        Message::LogData { file, offset, data } => {
            format!(
                "LogData{{file {file}, offset {offset}, {} bytes}}",
                data.len()
            )
        }
        Message::SyncData { offset, data } => {
            format!("SyncData{{offset {offset}, {} bytes}}", data.len())
        }
        Message::Changes { upto, entries } => {
            format!("Changes{{upto {upto}, {} entries}}", entries.len())
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame header announcing the largest frame, followed by a trickle: the reader's memory
    /// follows the bytes that came, not the length field; a real large frame still decodes
    /// (in pieces as they arrive), and the next one needs no new room.
    #[tokio::test]
    async fn a_large_frame_header_reserves_nothing_before_its_bytes() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(rx, Vec::new());
        tx.write_all(&mars_wire::MAX_FRAME.to_le_bytes())
            .await
            .unwrap();
        tx.write_all(&[0u8; 4096]).await.unwrap();
        assert!(reader.next_within(Duration::from_millis(50)).await.is_err());
        assert!(
            reader.buf.capacity() <= 2 * READ_AT_LEAST,
            "{} bytes reserved for 4 KiB received",
            reader.buf.capacity()
        );

        let (mut tx, rx) = tokio::io::duplex(64 << 10);
        let mut reader = FrameReader::new(rx, Vec::new());
        let data: Vec<u8> = (0..mars_wire::MAX_DATA).map(|i| i as u8).collect();
        let m = Message::LogData {
            file: 3,
            offset: 4096,
            data,
        };
        let sent = m.clone();
        let writer = tokio::spawn(async move {
            for _ in 0..2 {
                send(&mut tx, &sent).await.unwrap();
            }
        });
        assert_eq!(reader.next().await.unwrap(), m);
        let cap = reader.buf.capacity();
        assert!(
            cap <= 2 * mars_wire::MAX_FRAME as usize + READ_AT_LEAST,
            "{cap}"
        );
        assert_eq!(reader.next().await.unwrap(), m);
        assert_eq!(
            reader.buf.capacity(),
            cap,
            "the second frame reused the room"
        );
        writer.await.unwrap();
    }

    /// A fetch stream's large log data arrives in aligned buffers at its offset's place in a
    /// block, small frames and other messages as messages, in order, also when reads are
    /// cancelled over and over in the middle of a chunk (as the fetch session's `select!`
    /// does); the data checksum a chunk carries is its data's exactly when the frame is intact.
    #[tokio::test]
    async fn fetch_frames_land_in_aligned_buffers_and_survive_cancellation() {
        let (mut tx, rx) = tokio::io::duplex(8 << 10);
        let mut reader = FrameReader::new(rx, Vec::new());
        let msgs: Vec<Message> = [
            (100, 5000),
            (4095, 300_000),
            (8192, 64 << 10),
            (77, 1 << 20),
        ]
        .iter()
        .enumerate()
        .flat_map(|(i, &(offset, len))| {
            [
                Message::LogData {
                    file: 9,
                    offset,
                    data: (0..len).map(|k| (k * 7 + i) as u8).collect(),
                },
                Message::LogEnd { file: 9, len: 1 },
            ]
        })
        .collect();
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                send(&mut tx, m).await.unwrap();
            }
            // A damaged checksum on a large frame.
            let mut f = Vec::new();
            mars_wire::encode_frame(
                &Message::LogData {
                    file: 9,
                    offset: 0,
                    data: vec![5; 100_000],
                },
                &mut f,
            );
            let n = f.len();
            f[n - 1] ^= 1;
            tx.write_all(&f).await.unwrap();
        });
        let mut cancelled = 0;
        for m in msgs.iter().chain(std::iter::once(&Message::LogData {
            file: 9,
            offset: 0,
            data: vec![5; 100_000],
        })) {
            let got = loop {
                // Cancelled after a moment, again and again, until a whole message came.
                match tokio::time::timeout(Duration::from_micros(50), reader.next_fetch()).await {
                    Ok(r) => break r.unwrap(),
                    Err(_) => cancelled += 1,
                }
            };
            let Message::LogData { file, offset, data } = m else {
                assert!(matches!(got, Fetched::Message(ref g) if g == m), "{got:?}");
                continue;
            };
            match got {
                Fetched::Chunk { file: f, chunk } => {
                    assert!(data.len() >= DIRECT_RECV_MIN);
                    assert_eq!((f, chunk.offset, chunk.len), (*file, *offset, data.len()));
                    assert_eq!(chunk.lead(), (*offset % 4096) as usize);
                    assert_eq!(chunk.buf.as_slice().as_ptr() as usize % 4096, 0);
                    assert!(chunk.data() == &data[..]);
                    let intact = data.len() != 100_000;
                    assert_eq!(chunk.data_crc == crc32c::crc32c(data), intact);
                }
                Fetched::Message(g) => {
                    assert!(data.len() < DIRECT_RECV_MIN);
                    assert_eq!(&g, m);
                }
            }
        }
        assert!(cancelled > 0);
        writer.await.unwrap();
    }

    /// Inside a frame the bytes must keep coming; between frames a stream may be quiet (its
    /// protocol's timeouts apply, not this one).
    #[tokio::test]
    async fn a_peer_that_stops_inside_a_frame_is_dropped() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(rx, Vec::new());
        reader.stall = Duration::from_millis(100);
        // Quiet between frames: only the caller's limit ends the wait.
        let e = reader
            .next_within(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no message within"), "{e:#}");
        tx.write_all(&1000u32.to_le_bytes()).await.unwrap();
        tx.write_all(&[7u8; 10]).await.unwrap();
        let t = std::time::Instant::now();
        let e = reader.next().await.unwrap_err();
        assert!(e.to_string().contains("middle of a frame"), "{e:#}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// Each side of each stream kind reads frames up to what that way carries: a fetch or
    /// sync server takes requests only, a metadata stream pages; a header announcing more is
    /// refused before anything of the frame is kept.
    #[tokio::test]
    async fn frames_are_capped_by_stream_kind_and_direction() {
        assert_eq!(frame_limit(StreamKind::Fetch, true), REQUEST_FRAME);
        assert_eq!(frame_limit(StreamKind::Sync, true), REQUEST_FRAME);
        assert_eq!(frame_limit(StreamKind::Fetch, false), mars_wire::MAX_FRAME);
        assert_eq!(frame_limit(StreamKind::Meta, true), META_FRAME);
        assert_eq!(frame_limit(StreamKind::Meta, false), META_FRAME);
        // A full page of the largest entries fits a metadata frame.
        let big = mars_wire::Entry {
            key: "k".repeat(255),
            value: Some("v".repeat(4096)),
            stamp: 1,
            origin: "h".repeat(64),
            sig: vec![0; 72],
        };
        let mut f = Vec::new();
        mars_wire::encode_frame(
            &Message::Changes {
                upto: 1,
                entries: vec![big; 1000],
            },
            &mut f,
        );
        assert!(f.len() < META_FRAME as usize, "{} bytes", f.len());

        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(rx, Vec::new()).with_limit(REQUEST_FRAME);
        tx.write_all(&(REQUEST_FRAME + 1).to_le_bytes())
            .await
            .unwrap();
        let e = reader.next().await.unwrap_err();
        assert!(e.to_string().contains("more than the 65536"), "{e:#}");
        // A request of the largest kind still passes.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(rx, Vec::new()).with_limit(REQUEST_FRAME);
        let req = Message::FetchFrom {
            res: "r".repeat(255),
            file: 1,
            offset: 0,
            prev_link: "l".repeat(4096),
            tail: [1; 16],
        };
        send(&mut tx, &req).await.unwrap();
        assert_eq!(reader.next().await.unwrap(), req);
    }

    /// A peer that reads nothing: the sender fails after the stall limit instead of waiting
    /// forever; one that reads slowly but keeps reading is fine.
    #[tokio::test]
    async fn a_peer_that_stops_reading_fails_the_sender() {
        let (tx, mut rx) = tokio::io::duplex(4096);
        let mut w = WriteStall::new(tx, Duration::from_millis(200));
        let t = std::time::Instant::now();
        let e = w.write_all(&[1u8; 1 << 20]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let (tx, mut slow) = tokio::io::duplex(4096);
        let mut w = WriteStall::new(tx, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 4096];
            while got < 64 << 10 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                got += slow.read(&mut buf).await.unwrap();
            }
        });
        w.write_all(&[2u8; 64 << 10]).await.unwrap();
        reader.await.unwrap();
        let _ = rx.read(&mut [0u8; 1]).await;
    }

    /// The listener's upper layers for tests: plain TCP, every certified peer admitted, no
    /// joins, never revoked. `serve` sends `data` and then 100 bytes as sync data when given,
    /// else ends the stream at once.
    struct Fake {
        me: &'static str,
        cluster: ClusterId,
        data: Option<Vec<u8>>,
    }

    impl Handlers for Fake {
        fn me(&self) -> (HostName, ClusterId) {
            (HostName::new(self.me).unwrap(), self.cluster)
        }
        fn accepting(&self) -> Accepting {
            Accepting::Plain
        }
        fn admit(&self, _: HostName, _: String) -> CheckFuture {
            Box::pin(async { Ok(()) })
        }
        fn join(&self, _: HostName, _: String, _: Vec<u8>, _: SocketAddr) -> JoinFuture {
            Box::pin(async { Err("no".into()) })
        }
        fn merge(&self, _: HostName, _: Message, _: SocketAddr) -> JoinFuture {
            Box::pin(async { Err("no".into()) })
        }
        fn revoked(&self, _: HostName, _: String) -> Pin<Box<dyn Future<Output = ()> + Send>> {
            Box::pin(std::future::pending())
        }
        fn serve(&self, _: StreamKind, conn: Incoming) -> ServeFuture {
            let Some(data) = self.data.clone() else {
                return Box::pin(async { Ok(()) });
            };
            Box::pin(async move {
                let Incoming {
                    mut w,
                    method,
                    traffic,
                    ..
                } = conn;
                let mut p = Packing::new(method, traffic);
                for data in [data, vec![7u8; 100]] {
                    let m = Message::SyncData { offset: 0, data };
                    send_packed(&mut w, &mut p, m).await?;
                }
                w.flush().await?;
                Ok(())
            })
        }
    }

    async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s.connect(to).await.unwrap()
    }

    /// Connections beyond the per-address limit are closed before a byte is read; another
    /// address still gets a place, and a closed connection frees its place.
    #[tokio::test]
    async fn one_address_cannot_take_every_peer_slot() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let admission = Admission::new("test", 10, 2);
        let server = tokio::spawn(listen_with(
            l,
            Arc::new(Fake {
                me: "a",
                cluster: ClusterId::UNKNOWN,
                data: None,
            }),
            admission.clone(),
        ));
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(connect_from("127.0.0.1", at).await);
        }
        let mut third = connect_from("127.0.0.1", at).await;
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut b))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "nothing is sent to a refused connection");
        let mut other = connect_from("127.0.0.2", at).await;
        assert!(awaits_hello(&mut other).await, "another address is served");
        wait_open(&admission, 3).await;
        drop(held.pop());
        wait_open(&admission, 2).await;
        let mut again = connect_from("127.0.0.1", at).await;
        assert!(awaits_hello(&mut again).await, "the freed place is taken");
        server.abort();
    }

    /// The server holds the connection and waits for its hello (it neither closes nor sends).
    async fn awaits_hello(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 16];
        tokio::time::timeout(Duration::from_millis(300), s.read(&mut b))
            .await
            .is_err()
    }

    /// Waits (at most 2 s) until `n` connections are admitted.
    async fn wait_open(a: &Admission, n: usize) {
        for _ in 0..100 {
            if a.open() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(a.open(), n);
    }

    /// Long fat pipes: the buffers are asked for only where the sysctl cap grants more than
    /// the kernel's autotuning would reach, and never more than a 100 ms x 1 Gbit/s link needs.
    #[test]
    fn socket_buffers_follow_the_sysctl_limits() {
        assert!(LFN_BUFFER as u64 >= 125_000_000 / 10);
        // The defaults of many distributions: 208 KiB cap, autotuning to 6 MiB: keep it.
        assert_eq!(buffer_size(Some(212_992), Some(6 << 20)), None);
        // An operator raised the cap: the full buffer.
        assert_eq!(buffer_size(Some(64 << 20), Some(6 << 20)), Some(LFN_BUFFER));
        // A cap above autotuning but below the target: as much as it grants.
        assert_eq!(buffer_size(Some(8 << 20), Some(4 << 20)), Some(8 << 20));
        // Nothing known: nothing set.
        assert_eq!(buffer_size(None, Some(4 << 20)), None);
        let plan = buffer_plan();
        assert!(plan.recv.is_none_or(|n| n <= LFN_BUFFER));
    }

    fn cluster_id() -> ClusterId {
        ClusterId([5; 16])
    }

    /// A server of the previous version (protocol 4, no compression), as that code behaved:
    /// a hello of another version gets its hello and a refusal; a version-4 hello gets its
    /// hello and then `data` in one raw frame. Returns how many hellos of each version came.
    async fn old_server(l: TcpListener, data: Vec<u8>, conns: usize) -> (usize, usize) {
        let (mut v4, mut v5) = (0, 0);
        for _ in 0..conns {
            let (s, _) = l.accept().await.unwrap();
            let (mut r, mut w) = split_stream(s);
            let (peer, _) = read_hello(&mut r).await.unwrap();
            let ours = Hello::new(
                StreamKind::Meta,
                cluster_id(),
                HostName::new("old").unwrap(),
            );
            assert_eq!(ours.version, 4);
            w.write_all(&ours.encode()).await.unwrap();
            if peer.version != 4 {
                v5 += 1;
                let why = format!("protocol version {} is not supported", peer.version);
                refuse(&mut w, RefuseKind::Hello, why).await.unwrap();
                continue;
            }
            v4 += 1;
            let m = Message::LogData {
                file: 1,
                offset: 0,
                data: data.clone(),
            };
            send(&mut w, &m).await.unwrap();
            w.flush().await.unwrap();
        }
        (v4, v5)
    }

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    /// A replica offering compression to a source of the previous version: the source refuses
    /// the version-5 hello, the replica connects again in version 4 and the stream is raw;
    /// the next connect offers nothing at once.
    #[tokio::test]
    async fn an_old_source_gets_raw_streams() {
        set_net_compressions(Methods::ALL);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let data = text(100_000);
        let server = tokio::spawn(old_server(l, data.clone(), 3));
        let me = HostName::new("new").unwrap();
        for _ in 0..2 {
            let mut s = connect(&addr, &me, cluster_id(), StreamKind::Fetch, None)
                .await
                .unwrap();
            assert_eq!((s.peer.version, s.method), (4, None));
            match s.frames.next().await.unwrap() {
                Message::LogData { data: got, .. } => assert_eq!(got, data),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            server.await.unwrap(),
            (2, 1),
            "one refused hello, then version 4"
        );
    }

    /// Two hosts of this version with compression enabled: the hellos agree on lz4, the
    /// server packs what pays, the replica unpacks, both count what it saved.
    #[tokio::test]
    async fn new_peers_agree_and_pack() {
        set_net_compressions(Methods::ALL);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let data = text(1 << 20);
        let server = tokio::spawn(listen(
            l,
            Arc::new(Fake {
                me: "src",
                cluster: cluster_id(),
                data: Some(data.clone()),
            }),
        ));
        let me = HostName::new("packed-replica").unwrap();
        let mut s = connect(&addr, &me, cluster_id(), StreamKind::Sync, None)
            .await
            .unwrap();
        assert_eq!((s.peer.version, s.method), (5, Some(Method::Lz4)));
        for want in [data, vec![7u8; 100]] {
            match s.frames.next().await.unwrap() {
                Message::SyncData { data: got, .. } => assert_eq!(got, want),
                other => panic!("{}", describe(&other)),
            }
        }
        let row = traffic::all()
            .into_iter()
            .find(|r| r.peer == "src" && r.kind == "sync")
            .unwrap();
        assert_eq!(row.method, Some("lz4"));
        assert!(
            row.received_raw > 10 * row.received,
            "{} raw over {} on the wire",
            row.received_raw,
            row.received
        );
        let served = traffic::all()
            .into_iter()
            .find(|r| r.peer == "packed-replica" && r.kind == "sync")
            .unwrap();
        assert!(served.sent_raw > 10 * served.sent, "{served:?}");
        // A metadata stream offers nothing and stays at version 4.
        let m = connect(&addr, &me, cluster_id(), StreamKind::Meta, None)
            .await
            .unwrap();
        assert_eq!((m.peer.version, m.method), (4, None));
        server.abort();
    }

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
