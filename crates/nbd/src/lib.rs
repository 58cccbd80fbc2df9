//! Server side of the NBD (Network Block Device) protocol, as a library.
//!
//! [`serve`] speaks the protocol of NetworkBlockDevice/nbd `doc/proto.md` on one
//! already-accepted connection (TCP, Unix socket, or any other async byte stream):
//!
//! * **Handshake**: fixed newstyle only (`NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`).
//!   Options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO` and `GO` are supported; `STARTTLS` with
//!   [`ServerConfig::tls`] (then required: nothing else is answered before it; after it the
//!   haggling and transmission run inside TLS, with tokio-rustls), else refused by policy;
//!   every other option (structured replies, metadata contexts, ...) is answered
//!   `NBD_REP_ERR_UNSUP`.
//! * **Transmission**: simple replies only. `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`
//!   (with `NO_HOLE` and `FAST_ZERO`), `CACHE` (a no-op) and `DISC`, with `FUA` on every
//!   command. Requests are processed concurrently, up to [`ServerConfig::max_in_flight`] per
//!   connection, and answered in completion order.
//!
//! The block device itself is an [`Export`], found by name through [`Exports`]. Its methods
//! block; the server calls them on tokio's blocking pool, except for a WRITE without FUA, which
//! is applied inline.
//!
//! No input from the client can make the server panic or allocate more than
//! [`ServerConfig::max_payload`] bytes per request in flight (option data is capped at
//! [`proto::MAX_OPTION_DATA`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use mars_nbd::{serve, Export, Exports, ServerConfig, StaticExports};
//!
//! async fn run(listener: tokio::net::TcpListener, disk: Arc<dyn Export>) -> std::io::Result<()> {
//!     let exports: Arc<dyn Exports> = Arc::new(StaticExports::new().with("disk", disk));
//!     let cfg = Arc::new(ServerConfig::default());
//!     loop {
//!         let (stream, _) = listener.accept().await?;
//!         let (exports, cfg) = (exports.clone(), cfg.clone());
//!         tokio::spawn(async move {
//!             if let Err(e) = serve(stream, exports, cfg).await {
//!                 tracing::warn!(error = %e, "NBD connection failed");
//!             }
//!         });
//!     }
//! }
//! ```

pub mod aligned;
mod error;
mod export;
mod handshake;
pub mod proto;
mod transmission;
mod wire;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tracing::debug;

use crate::handshake::Haggled;

pub use error::{nbd_errno, NbdError};
pub use export::{Export, Exports, NbdTls, ServerConfig, StaticExports};

/// Buffer size of the connection's reader and writer.
const STREAM_BUFFER: usize = 64 * 1024;

/// Serves one already-accepted client connection (TCP or Unix) until the client disconnects
/// (`NBD_CMD_DISC`, `NBD_OPT_ABORT` or EOF) or violates the protocol. Returns `Ok` on a clean
/// end.
///
/// When this returns, every request of the connection has been answered (or, if the client is
/// gone, its export call has returned), so no export call made for this connection is still
/// running, with one exception: if the future is dropped before completion, blocking calls
/// already started finish on their own.
///
/// Must run inside a tokio runtime; with [`ServerConfig::handshake_timeout`] set, the runtime
/// needs its time driver enabled.
pub async fn serve<S>(
    stream: S,
    exports: Arc<dyn Exports>,
    cfg: Arc<ServerConfig>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The whole handshake (greeting, options, a TLS handshake, options again) within the limit.
    let deadline = cfg
        .handshake_timeout
        .map(|limit| tokio::time::Instant::now() + limit);
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(STREAM_BUFFER, read_half);
    let mut writer = BufWriter::with_capacity(STREAM_BUFFER, write_half);
    let Some(no_zeroes) = within(deadline, handshake::greet(&mut reader, &mut writer)).await?
    else {
        return Ok(());
    };
    let haggled = within(
        deadline,
        handshake::haggle(&mut reader, &mut writer, &*exports, &cfg, no_zeroes, false),
    )
    .await?;
    match haggled {
        Haggled::Abort => Ok(()),
        Haggled::Transmit(n) => {
            debug!(export = %n.name, "NBD client entered transmission");
            transmission::transmit(reader, writer, n.export, &cfg).await
        }
        Haggled::StartTls => {
            // The client waits for our ACK before its TLS handshake: nothing may be buffered.
            if !reader.buffer().is_empty() {
                return Err(NbdError::TlsRequired("bytes sent before the TLS handshake"));
            }
            let Some(tls) = cfg.tls.clone() else {
                return Err(NbdError::TlsRequired("STARTTLS without TLS configured"));
            };
            let stream = reader.into_inner().unsplit(writer.into_inner());
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.0);
            let stream = within(deadline, async {
                acceptor.accept(stream).await.map_err(NbdError::Tls)
            })
            .await?;
            debug!("NBD client started TLS");
            let (read_half, write_half) = tokio::io::split(stream);
            let mut reader = BufReader::with_capacity(STREAM_BUFFER, read_half);
            let mut writer = BufWriter::with_capacity(STREAM_BUFFER, write_half);
            let haggled = within(
                deadline,
                handshake::haggle(&mut reader, &mut writer, &*exports, &cfg, no_zeroes, true),
            )
            .await?;
            let Haggled::Transmit(n) = haggled else {
                return Ok(());
            };
            debug!(export = %n.name, "NBD client entered transmission over TLS");
            transmission::transmit(reader, writer, n.export, &cfg).await
        }
    }
}

/// Runs a step of the handshake within its deadline (none: no limit).
async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    f: impl std::future::Future<Output = Result<T, NbdError>>,
) -> Result<T, NbdError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f)
            .await
            .map_err(|_| NbdError::HandshakeTimeout)?,
        None => f.await,
    }
}
