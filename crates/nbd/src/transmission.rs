//! Transmission phase: requests in, simple replies out.
//!
//! One reader loop parses requests. Each request takes a permit of a per-connection semaphore
//! (bounding the requests in flight, and so the memory they hold) before its header is read, and
//! gives it back once its reply has been handed to the writer. Requests run concurrently: every
//! export call that may block on disk runs in [`tokio::task::spawn_blocking`]; a WRITE without
//! FUA is applied inline by the reader. Completed requests send their reply over a channel to a
//! single writer task that owns the write half and flushes whenever the channel is drained, so
//! replies go out in completion order.
//!
//! A reply is only queued after the export call returned, so a FLUSH covers every write whose
//! reply was sent, as the protocol requires. When the reader stops (DISC, EOF or a protocol
//! violation) the connection waits until every request in flight has been answered (or its
//! export call finished, if the client is gone) before the stream is closed.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, trace, warn};

use crate::error::{nbd_errno, NbdError};
use crate::export::{Export, ServerConfig};
use crate::proto;
use crate::wire::{read_exact_or_eof, skip};

/// One parsed request header.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

impl Request {
    /// Parses a header; `Err(magic)` if the magic is wrong.
    fn parse(h: &[u8; proto::REQUEST_HEADER_LEN]) -> Result<Self, u32> {
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if magic != proto::REQUEST_MAGIC {
            return Err(magic);
        }
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&h[8..16]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&h[16..24]);
        Ok(Self {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes(cookie),
            offset: u64::from_be_bytes(offset),
            len: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
        })
    }
}

/// What a request holds from its header until its reply is written: its place among the
/// connection's requests and, for READ and WRITE, its payload bytes of the connection's and of
/// the server's budget.
struct Permit {
    _request: OwnedSemaphorePermit,
    _bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// A reply on its way to the writer task. Holds the request's in-flight permit.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Vec<u8>>,
    _permit: Permit,
}

/// State shared by the reader loop and the requests it spawns.
struct Conn {
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    max_payload: u32,
    in_flight: Arc<Semaphore>,
    /// This connection's payload bytes in progress, and the server's.
    bytes: Arc<Semaphore>,
    total: Arc<Semaphore>,
    replies: mpsc::UnboundedSender<Reply>,
}

/// Serves requests until DISC, EOF, a protocol violation or a failure to send replies.
pub(crate) async fn transmit<R, W>(
    mut reader: R,
    writer: BufWriter<W>,
    export: Arc<dyn Export>,
    cfg: &ServerConfig,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let permits = cfg.in_flight();
    let in_flight = Arc::new(Semaphore::new(permits));
    let (tx, rx) = mpsc::unbounded_channel();
    let mut writer_task = tokio::spawn(write_replies(writer, rx, cfg.reply_timeout));
    let conn = Conn {
        size: export.size(),
        read_only: export.read_only(),
        export,
        max_payload: cfg.block_sizes().2,
        in_flight: in_flight.clone(),
        bytes: Arc::new(Semaphore::new(cfg.in_flight_bytes())),
        total: cfg.total_in_flight.0.clone(),
        replies: tx,
    };

    let mut writer_result = None;
    let read_result = tokio::select! {
        r = conn.read_requests(&mut reader) => r,
        w = &mut writer_task => {
            // The writer only ends early when sending failed; stop reading.
            writer_result = Some(w);
            Ok(())
        }
    };
    drop(conn);
    // Wait for every request in flight: its permit is released once its reply was written, or
    // dropped because the writer is gone (which happens only after the export call returned).
    // The semaphore is never closed, so this only fails if `permits` does not fit; ignore that.
    let _ = in_flight
        .acquire_many(u32::try_from(permits).unwrap_or(u32::MAX))
        .await;
    let writer_result = match writer_result {
        Some(w) => w,
        None => writer_task.await,
    };
    read_result?;
    match writer_result {
        Ok(r) => r.map_err(NbdError::Io),
        Err(join) => Err(NbdError::Io(io::Error::other(format!(
            "NBD reply writer failed: {join}"
        )))),
    }
}

impl Conn {
    async fn read_requests<R>(&self, r: &mut R) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin,
    {
        loop {
            let Ok(request) = self.in_flight.clone().acquire_owned().await else {
                return Ok(());
            };
            let mut header = [0u8; proto::REQUEST_HEADER_LEN];
            if !read_exact_or_eof(r, &mut header).await? {
                debug!("NBD client closed the connection");
                return Ok(());
            }
            let req = match Request::parse(&header) {
                Ok(req) => req,
                Err(magic) => {
                    warn!(magic, "bad NBD request magic; disconnecting");
                    return Err(NbdError::BadMagic {
                        what: "request",
                        got: u64::from(magic),
                    });
                }
            };
            trace!(?req, "NBD request");
            // Payload bytes are taken before the payload is read or the read is started:
            // while the budget is used up, no further request is read (back-pressure on the
            // client instead of memory on the server).
            let bytes = match req.kind {
                proto::CMD_READ | proto::CMD_WRITE
                    if req.len > 0 && req.len <= self.max_payload =>
                {
                    let (Ok(mine), Ok(all)) = (
                        self.bytes.clone().acquire_many_owned(req.len).await,
                        self.total.clone().acquire_many_owned(req.len).await,
                    ) else {
                        return Ok(());
                    };
                    Some((mine, all))
                }
                _ => None,
            };
            let permit = Permit {
                _request: request,
                _bytes: bytes,
            };
            match req.kind {
                proto::CMD_DISC => {
                    debug!("NBD client sent DISC");
                    return Ok(());
                }
                proto::CMD_WRITE => self.write(r, req, permit).await?,
                _ => self.dispatch(req, permit),
            }
        }
    }

    fn reply(&self, cookie: u64, error: u32, data: Option<Vec<u8>>, permit: Permit) {
        // A send error means the writer is gone; the connection is ending anyway.
        let _ = self.replies.send(Reply {
            cookie,
            error,
            data,
            _permit: permit,
        });
    }

    /// Whether `offset..offset+len` lies within the export.
    fn in_range(&self, offset: u64, len: u32) -> bool {
        offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= self.size)
    }

    /// Runs a blocking export call on the blocking pool and queues its reply.
    fn spawn<F>(&self, cookie: u64, permit: Permit, op: F)
    where
        F: FnOnce(&dyn Export) -> io::Result<Option<Vec<u8>>> + Send + 'static,
    {
        let export = self.export.clone();
        let replies = self.replies.clone();
        tokio::task::spawn_blocking(move || {
            let (error, data) = match call(|| op(&*export)) {
                Ok(data) => (0, data),
                Err(errno) => (errno, None),
            };
            let _ = replies.send(Reply {
                cookie,
                error,
                data,
                _permit: permit,
            });
        });
    }

    /// `NBD_CMD_WRITE`: the payload is always consumed unless it is too large to be trusted.
    async fn write<R>(&self, r: &mut R, req: Request, permit: Permit) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin,
    {
        if req.len > self.max_payload {
            warn!(
                len = req.len,
                max = self.max_payload,
                "NBD write payload too large; disconnecting"
            );
            return Err(NbdError::PayloadTooLarge {
                len: req.len,
                max: self.max_payload,
            });
        }
        let refusal = if req.flags & !proto::CMD_FLAG_FUA != 0 {
            Some(proto::EINVAL)
        } else if self.read_only {
            Some(proto::EPERM)
        } else if !self.in_range(req.offset, req.len) {
            Some(proto::ENOSPC)
        } else {
            None
        };
        if let Some(errno) = refusal {
            skip(r, u64::from(req.len)).await?;
            self.reply(req.cookie, errno, None, permit);
            return Ok(());
        }
        if req.len == 0 {
            self.reply(req.cookie, 0, None, permit);
            return Ok(());
        }
        let data = read_payload(r, req.len).await?;
        let offset = req.offset;
        if req.flags & proto::CMD_FLAG_FUA != 0 || self.export.write_may_block(data.len()) {
            let fua = req.flags & proto::CMD_FLAG_FUA != 0;
            self.spawn(req.cookie, permit, move |e| {
                e.write(offset, data, fua).map(|()| None)
            });
        } else {
            // Non-FUA writes only append to memory: apply inline, in arrival order.
            let errno = call(|| self.export.write(offset, data, false))
                .err()
                .unwrap_or(0);
            self.reply(req.cookie, errno, None, permit);
        }
        Ok(())
    }

    /// Every command except WRITE and DISC.
    fn dispatch(&self, req: Request, permit: Permit) {
        let Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        } = req;
        let allowed = match kind {
            proto::CMD_READ | proto::CMD_FLUSH | proto::CMD_TRIM | proto::CMD_CACHE => {
                proto::CMD_FLAG_FUA
            }
            proto::CMD_WRITE_ZEROES => {
                proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO
            }
            _ => {
                debug!(kind, "unknown NBD command");
                return self.reply(cookie, proto::EINVAL, None, permit);
            }
        };
        if flags & !allowed != 0 {
            debug!(kind, flags, "NBD command with unsupported flags");
            return self.reply(cookie, proto::EINVAL, None, permit);
        }
        let fua = flags & proto::CMD_FLAG_FUA != 0;
        let len64 = u64::from(len);
        match kind {
            proto::CMD_READ => {
                if len > self.max_payload || !self.in_range(offset, len) {
                    return self.reply(cookie, proto::EINVAL, None, permit);
                }
                if len == 0 {
                    return self.reply(cookie, 0, None, permit);
                }
                self.spawn(cookie, permit, move |e| {
                    let mut buf = vec![0u8; len as usize];
                    e.read(offset, &mut buf)?;
                    Ok(Some(buf))
                });
            }
            proto::CMD_FLUSH => self.spawn(cookie, permit, |e| e.flush().map(|()| None)),
            proto::CMD_TRIM => {
                if self.read_only {
                    return self.reply(cookie, proto::EPERM, None, permit);
                }
                if !self.in_range(offset, len) {
                    return self.reply(cookie, proto::EINVAL, None, permit);
                }
                if len == 0 {
                    return self.reply(cookie, 0, None, permit);
                }
                self.spawn(cookie, permit, move |e| {
                    e.trim(offset, len64, fua).map(|()| None)
                });
            }
            proto::CMD_WRITE_ZEROES => {
                if self.read_only {
                    return self.reply(cookie, proto::EPERM, None, permit);
                }
                if !self.in_range(offset, len) {
                    return self.reply(cookie, proto::ENOSPC, None, permit);
                }
                if len == 0 {
                    return self.reply(cookie, 0, None, permit);
                }
                let may_trim = flags & proto::CMD_FLAG_NO_HOLE == 0;
                self.spawn(cookie, permit, move |e| {
                    e.write_zeroes(offset, len64, may_trim, fua).map(|()| None)
                });
            }
            // CMD_CACHE: a hint we do not act on; validate the range and succeed.
            _ => {
                let errno = if self.in_range(offset, len) {
                    0
                } else {
                    proto::EINVAL
                };
                self.reply(cookie, errno, None, permit);
            }
        }
    }
}

/// Calls into the export, turning errors into NBD error values and panics into `EIO`.
fn call<T>(f: impl FnOnce() -> io::Result<T>) -> Result<T, u32> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            debug!(error = %e, "NBD export call failed");
            Err(nbd_errno(&e))
        }
        Err(_) => {
            error!("NBD export call panicked; replying EIO");
            Err(proto::EIO)
        }
    }
}

/// Reads exactly `len` payload bytes (`len` is already bounded by the maximum payload size).
async fn read_payload<R>(r: &mut R, len: u32) -> io::Result<Bytes>
where
    R: AsyncRead + Unpin,
{
    let len = len as usize;
    if len < crate::aligned::MIN_ALIGNED_PAYLOAD {
        let mut buf = BytesMut::with_capacity(len);
        while buf.len() < len {
            let remaining = (len - buf.len()) as u64;
            if AsyncReadExt::take(&mut *r, remaining)
                .read_buf(&mut buf)
                .await?
                == 0
            {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        return Ok(buf.freeze());
    }
    // Page-aligned payloads let the export write them to disk with O_DIRECT, without a copy
    // through the page cache.
    let mut buf = crate::aligned::pooled(len);
    r.read_exact(buf.as_mut()).await?;
    Ok(Bytes::from_owner(buf))
}

/// The writer task: writes replies in the order they arrive and flushes whenever no further
/// reply is immediately available. Ends when every sender is gone or writing fails.
async fn write_replies<W>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    stall: std::time::Duration,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    while let Some(reply) = rx.recv().await {
        let batch = async {
            put_reply(&mut w, reply).await?;
            while let Ok(reply) = rx.try_recv() {
                put_reply(&mut w, reply).await?;
            }
            w.flush().await
        };
        tokio::time::timeout(stall, batch).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read no reply within {stall:?}"),
            )
        })??;
    }
    if let Err(e) = w.shutdown().await {
        debug!(error = %e, "shutting down the NBD stream failed");
    }
    Ok(())
}

async fn put_reply<W>(w: &mut BufWriter<W>, reply: Reply) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut header = [0u8; proto::SIMPLE_REPLY_HEADER_LEN];
    header[..4].copy_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    header[4..8].copy_from_slice(&reply.error.to_be_bytes());
    header[8..].copy_from_slice(&reply.cookie.to_be_bytes());
    w.write_all(&header).await?;
    if let (0, Some(data)) = (reply.error, &reply.data) {
        w.write_all(data).await?;
    }
    Ok(())
}
