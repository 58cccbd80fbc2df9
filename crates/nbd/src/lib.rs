//! Server side of the NBD (Network Block Device) protocol, as a library.
//!
//! [`serve`] speaks the protocol of NetworkBlockDevice/nbd `doc/proto.md` on one
//! already-accepted connection (TCP, Unix socket, or any other async byte stream):
//!
//! * **Handshake**: fixed newstyle only (`NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`).
//!   Options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO` and `GO` are supported; `STARTTLS` is
//!   refused by policy, every other option (structured replies, metadata contexts, ...) is
//!   answered `NBD_REP_ERR_UNSUP`.
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

mod aligned;
mod error;
mod export;
mod handshake;
pub mod proto;
mod transmission;
mod wire;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tracing::debug;

pub use error::{nbd_errno, NbdError};
pub use export::{Export, Exports, ServerConfig, StaticExports};

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
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(STREAM_BUFFER, read_half);
    let mut writer = BufWriter::with_capacity(STREAM_BUFFER, write_half);

    let handshake = handshake::negotiate(&mut reader, &mut writer, &*exports, &cfg);
    let negotiated = match cfg.handshake_timeout {
        Some(limit) => tokio::time::timeout(limit, handshake)
            .await
            .map_err(|_| NbdError::HandshakeTimeout)??,
        None => handshake.await?,
    };
    let Some(negotiated) = negotiated else {
        return Ok(());
    };
    debug!(export = %negotiated.name, "NBD client entered transmission");
    transmission::transmit(reader, writer, negotiated.export, &cfg).await
}
