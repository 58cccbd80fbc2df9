//! What the server serves ([`Export`], [`Exports`]) and how ([`ServerConfig`]).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::proto;

/// A block export as the server sees it. Implemented by the daemon on top of its
/// log-structured volume.
///
/// All methods are blocking (they may wait on disk or fdatasync); the server calls them from
/// [`tokio::task::spawn_blocking`], except [`write`](Export::write) without FUA, which the
/// server calls inline on the async worker because it only appends to memory — unless
/// [`write_may_block`](Export::write_may_block) says it would wait now (memory back-pressure),
/// so that a full dirty budget slows the writer without stalling the runtime.
///
/// Offsets and lengths passed to the methods are always within `0..size()` (the server checks
/// them first) and lengths are never zero.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// When true, announce `NBD_FLAG_READ_ONLY` and refuse WRITE/TRIM/WRITE_ZEROES with
    /// `EPERM`.
    fn read_only(&self) -> bool;
    /// Human-readable description for `NBD_INFO_DESCRIPTION` / `NBD_OPT_LIST`.
    fn description(&self) -> String {
        String::new()
    }
    /// Fill `buf` with the data at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `offset`. `fua`: the write must be durable before returning.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()>;
    /// A write of `len` bytes without FUA would block now (it normally only appends to
    /// memory): the server runs it on a blocking thread then.
    fn write_may_block(&self, len: usize) -> bool {
        let _ = len;
        false
    }
    /// Zero the range. `may_trim` = the client did NOT set `NO_HOLE`. `fua` as above.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;
    /// Discard hint.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Every write whose reply was already sent must be durable when this returns.
    fn flush(&self) -> io::Result<()>;
}

/// Looks exports up by name for `NBD_OPT_GO`/`NBD_OPT_INFO`/`NBD_OPT_EXPORT_NAME` and lists
/// them for `NBD_OPT_LIST`.
pub trait Exports: Send + Sync + 'static {
    /// The export called `name` (the empty name is the client's "default export").
    fn get(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Names of all exports, in the order `NBD_OPT_LIST` reports them.
    fn list(&self) -> Vec<String>;
}

/// A fixed set of exports, keyed by name. Handy for tests and simple servers.
#[derive(Default, Clone)]
pub struct StaticExports {
    exports: BTreeMap<String, Arc<dyn Export>>,
}

impl StaticExports {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the export called `name`.
    pub fn with(mut self, name: impl Into<String>, export: Arc<dyn Export>) -> Self {
        self.exports.insert(name.into(), export);
        self
    }
}

impl std::fmt::Debug for StaticExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.exports.keys()).finish()
    }
}

impl Exports for StaticExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.get(name).cloned()
    }

    fn list(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }
}

/// Tunables of the server, shared by all connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Minimum block size advertised in `NBD_INFO_BLOCK_SIZE` (a power of two, at most 64 KiB).
    /// Requests are not checked against it.
    pub min_block: u32,
    /// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE` (a power of two, at least 512
    /// and at least `min_block`).
    pub preferred_block: u32,
    /// Largest READ/WRITE length accepted and advertised as the maximum payload size
    /// (at least `preferred_block`). Larger READs get `EINVAL`; a larger WRITE closes the
    /// connection without reading its payload.
    pub max_payload: u32,
    /// Requests of one connection that may be in progress at the same time, counted from
    /// reading the request header until the reply is written (at least 1; the header being read
    /// counts too). Each holds at most `max_payload` bytes of buffer, which bounds a
    /// connection's memory to about `max_in_flight * max_payload`.
    pub max_in_flight: usize,
    /// Announce `NBD_FLAG_CAN_MULTI_CONN`: flush/FUA on one connection covers writes completed
    /// on every connection to the same export.
    pub multi_conn: bool,
    /// Close connections that have not finished option haggling within this time. Requires the
    /// tokio runtime's time driver to be enabled when `Some`.
    pub handshake_timeout: Option<Duration>,
    /// Payload bytes of one connection's READs and WRITEs in progress, from reading the
    /// request header until the reply is written (at least `max_payload`): a client that
    /// sends requests but never reads the replies holds at most this much.
    pub max_in_flight_bytes: usize,
    /// The same for all connections served with this configuration (and its clones) together.
    pub total_in_flight: ByteBudget,
    /// A reply that cannot be written within this time (the client stopped reading) ends the
    /// connection, so that it gives its budget back.
    pub reply_timeout: Duration,
    /// TLS, required (NBD's "forced TLS"): before `NBD_OPT_STARTTLS` every option but `ABORT`
    /// is answered `NBD_REP_ERR_TLS_REQD` (`EXPORT_NAME` ends the connection), and after it the
    /// haggling and the transmission run inside TLS. `None`: plaintext, STARTTLS refused.
    pub tls: Option<NbdTls>,
}

/// A byte budget shared by connections (a semaphore of bytes); clones share it.
#[derive(Debug, Clone)]
pub struct ByteBudget(pub(crate) std::sync::Arc<tokio::sync::Semaphore>, usize);

impl ByteBudget {
    pub fn new(bytes: usize) -> ByteBudget {
        ByteBudget(
            std::sync::Arc::new(tokio::sync::Semaphore::new(bytes)),
            bytes,
        )
    }

    /// Its size in bytes.
    pub fn size(&self) -> usize {
        self.1
    }

    /// Bytes not taken now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }
}

/// Two budgets are the same budget, not two of the same size.
impl PartialEq for ByteBudget {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for ByteBudget {}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 << 20,
            max_in_flight: 64,
            multi_conn: true,
            handshake_timeout: Some(Duration::from_secs(30)),
            max_in_flight_bytes: 64 << 20,
            total_in_flight: ByteBudget::new(1 << 30),
            reply_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// The TLS configuration of an NBD server (compared by identity).
#[derive(Debug, Clone)]
pub struct NbdTls(pub Arc<tokio_rustls::rustls::ServerConfig>);

impl PartialEq for NbdTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for NbdTls {}

/// Upper bound applied to [`ServerConfig::max_in_flight`].
const MAX_IN_FLIGHT_LIMIT: usize = 1 << 16;

impl ServerConfig {
    /// Block size constraints `(minimum, preferred, maximum payload)` as advertised: the
    /// configured values adjusted to satisfy the protocol's rules (powers of two,
    /// `min <= 64 KiB`, `preferred >= max(512, min)`, `max >= preferred`).
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let min = self.min_block.clamp(1, 1 << 16).next_power_of_two();
        let preferred = self
            .preferred_block
            .max(min)
            .clamp(512, 1 << 31)
            .next_power_of_two();
        let max = self.max_payload.max(preferred);
        (min, preferred, max)
    }

    /// The effective per-connection byte budget (room for the largest request at least).
    pub(crate) fn in_flight_bytes(&self) -> usize {
        self.max_in_flight_bytes.max(self.block_sizes().2 as usize)
    }

    /// The effective number of concurrently processed requests per connection.
    pub(crate) fn in_flight(&self) -> usize {
        self.max_in_flight.clamp(1, MAX_IN_FLIGHT_LIMIT)
    }

    /// Transmission flags announced for `export`.
    pub fn transmission_flags(&self, export: &dyn Export) -> u16 {
        let mut flags = proto::TFLAG_HAS_FLAGS
            | proto::TFLAG_SEND_FLUSH
            | proto::TFLAG_SEND_FUA
            | proto::TFLAG_SEND_TRIM
            | proto::TFLAG_SEND_WRITE_ZEROES
            | proto::TFLAG_SEND_FAST_ZERO;
        if self.multi_conn {
            flags |= proto::TFLAG_CAN_MULTI_CONN;
        }
        if export.read_only() {
            flags |= proto::TFLAG_READ_ONLY;
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_block_sizes() {
        assert_eq!(ServerConfig::default().block_sizes(), (1, 4096, 32 << 20));
    }

    #[test]
    fn block_sizes_are_normalised() {
        let cfg = ServerConfig {
            min_block: 3000,
            preferred_block: 100,
            max_payload: 10,
            ..ServerConfig::default()
        };
        assert_eq!(cfg.block_sizes(), (4096, 4096, 4096));
        let cfg = ServerConfig {
            min_block: 0,
            preferred_block: u32::MAX,
            max_payload: 0,
            ..ServerConfig::default()
        };
        assert_eq!(cfg.block_sizes(), (1, 1 << 31, 1 << 31));
        let cfg = ServerConfig {
            min_block: 1 << 20,
            ..ServerConfig::default()
        };
        assert_eq!(cfg.block_sizes(), (1 << 16, 1 << 16, 32 << 20));
    }

    #[test]
    fn in_flight_is_at_least_one() {
        let cfg = ServerConfig {
            max_in_flight: 0,
            ..ServerConfig::default()
        };
        assert_eq!(cfg.in_flight(), 1);
    }
}
