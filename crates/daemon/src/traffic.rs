//! Counters of the peer port for the metrics: bytes in and out per peer and stream kind, and
//! errors (refused peers, failed connects, served and opened streams that ended in an error). Process-wide
//! (one daemon per process), counted where the bytes pass and read by `metrics.rs`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes received from and sent to one peer on streams of one kind: on the wire (`received`,
/// `sent`: frames as they travel inside TLS) and what compression saved (`*_saved`: the raw
/// frames' size minus the packed frames' size), and the compression method the newest session
/// agreed on (`method`: the byte of `mars_wire::Method`, 0 none).
#[derive(Debug, Default)]
pub struct Traffic {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub received_saved: AtomicU64,
    pub sent_saved: AtomicU64,
    pub method: std::sync::atomic::AtomicU8,
}

/// One (peer, stream kind) pair's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    pub peer: String,
    pub kind: &'static str,
    /// Bytes on the wire.
    pub received: u64,
    pub sent: u64,
    /// Bytes the same frames take uncompressed (≥ the wire bytes).
    pub received_raw: u64,
    pub sent_raw: u64,
    /// The newest session's compression method (`lz4`, `zstd`), if any.
    pub method: Option<&'static str>,
}

/// Most (peer, kind) pairs counted separately; more (only an insecure cluster lets a stranger
/// claim names) are counted under [`OTHER`], so the metrics stay bounded.
const MAX_PAIRS: usize = 4096;
pub const OTHER: &str = "(other)";

type Table = BTreeMap<(String, &'static str), Arc<Traffic>>;
static TABLE: Mutex<Table> = Mutex::new(BTreeMap::new());

/// The counters of `peer`'s streams of `kind` (`meta`, `fetch`, `sync`).
pub fn of(peer: &str, kind: &'static str) -> Arc<Traffic> {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let key = if t.len() >= MAX_PAIRS && !t.contains_key(&(peer.to_string(), kind)) {
        (OTHER.to_string(), kind)
    } else {
        (peer.to_string(), kind)
    };
    t.entry(key).or_default().clone()
}

/// Every pair counted so far.
pub fn all() -> Vec<Row> {
    let t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    t.iter()
        .map(|((p, k), c)| {
            let (received, sent) = (
                c.received.load(Ordering::Relaxed),
                c.sent.load(Ordering::Relaxed),
            );
            Row {
                peer: p.clone(),
                kind: k,
                received,
                sent,
                received_raw: received + c.received_saved.load(Ordering::Relaxed),
                sent_raw: sent + c.sent_saved.load(Ordering::Relaxed),
                method: mars_wire::Method::from_u8(c.method.load(Ordering::Relaxed))
                    .map(mars_wire::Method::as_str),
            }
        })
        .collect()
}

/// What went wrong on the peer port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerError {
    /// This host refused a peer (TLS, hello, admission, join, an oversized frame).
    Refused,
    /// Connecting to a peer failed (TCP, TLS, hellos, or the peer refused).
    ConnectFailed,
    /// A stream this host served ended with an error.
    StreamFailed,
    /// A stream this host opened (metadata pull, fetch, sync) ended with an error; those whose
    /// connect failed count here and under `ConnectFailed`.
    SessionFailed,
}

impl PeerError {
    pub const ALL: [PeerError; 4] = [
        PeerError::Refused,
        PeerError::ConnectFailed,
        PeerError::StreamFailed,
        PeerError::SessionFailed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            PeerError::Refused => "refused",
            PeerError::ConnectFailed => "connect_failed",
            PeerError::StreamFailed => "stream_failed",
            PeerError::SessionFailed => "session_failed",
        }
    }
}

static ERRORS: [AtomicU64; PeerError::ALL.len()] =
    [const { AtomicU64::new(0) }; PeerError::ALL.len()];

pub fn count(e: PeerError) {
    ERRORS[e as usize].fetch_add(1, Ordering::Relaxed);
}

pub fn errors(e: PeerError) -> u64 {
    ERRORS[e as usize].load(Ordering::Relaxed)
}

/// A stream half that adds what passes to a counter.
pub struct Counted<T> {
    inner: T,
    traffic: Arc<Traffic>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, traffic: Arc<Traffic>) -> Self {
        Counted { inner, traffic }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        self.traffic.received.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.traffic.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.traffic.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_ways_and_bounds_the_table() {
        let (a, b) = tokio::io::duplex(64);
        let t = of("counted-peer", "fetch");
        let mut w = Counted::new(a, t.clone());
        w.write_all(b"hello").await.unwrap();
        let mut r = Counted::new(b, t.clone());
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(t.sent.load(Ordering::Relaxed), 5);
        assert_eq!(t.received.load(Ordering::Relaxed), 5);
        t.sent_saved.fetch_add(10, Ordering::Relaxed);
        assert!(all().iter().any(|r| r.peer == "counted-peer"
            && r.kind == "fetch"
            && (r.received, r.sent, r.received_raw, r.sent_raw) == (5, 5, 5, 15)));
        for i in 0..MAX_PAIRS + 10 {
            of(&format!("p{i}"), "meta");
        }
        assert!(TABLE.lock().unwrap().len() <= MAX_PAIRS + 3);
    }
}
