//! The peer protocol between `marsd` hosts, as bytes: encode and decode only, no sockets, so the
//! same code runs over TCP today and inside mutual TLS later, and every decoder can be fuzzed.
//!
//! A connection carries one *stream kind* (metadata, log fetch, sync), so bulk transfers never
//! queue in front of metadata. Both sides open with a [`Hello`]; each checks the other's
//! (protocol version, cluster id, host name) and either continues with frames or sends one
//! [`Message::Refuse`] frame with the reason and closes.
//!
//! Which messages each stream kind carries (type bytes in [`Message`]'s table):
//!
//! - [`StreamKind::Meta`]: `Ping`/`Pong`, `ChangesSince`/`Changes` and `Notify` — metadata
//!   gossip, request and answer in both directions.
//! - [`StreamKind::Fetch`]: the replica sends one `FetchFrom`; the server then pushes a
//!   `LogFile`, `LogData`… and `LogEnd` for each complete logfile (older ones first), then
//!   `LogData` for the current one as it grows, without further requests. `LogGone` says a
//!   requested logfile is no longer on the server.
//! - [`StreamKind::Sync`]: the replica sends `SyncStart`, the server answers `SyncInfo` (size and
//!   log position at sync start); then the replica sends a `SyncCheck` per chunk and the server
//!   answers each with `SyncSame` or `SyncData`.
//!
//! `Refuse` may be sent on any stream, after which the sender closes it.
//!
//! ```text
//! Hello (both directions, first bytes of a connection), little-endian:
//!   off size field
//!     0    8 magic          "MARSPEER"
//!     8    2 version        4 or 5 (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION)
//!    10    1 stream kind    1 = metadata, 2 = log fetch, 3 = sync
//!    11    1 host length n  1..=64
//!    12   16 cluster id     all zero while joining (cluster not known yet)
//!    28    n host name
//!  28+n    1 methods        version 5 only: compression methods, a bit set (bit 0 lz4,
//!                           bit 1 zstd); the connecting side's offer, the accepting side's
//!                           choice (at most one bit). See compress.rs.
//!
//! Frame (after the hellos):
//!   off size field
//!     0    4 body length m  type + payload, at most MAX_FRAME
//!     4    1 type           see Message
//!     5  m-1 payload        per type, below
//!   4+m    4 crc32c         of type + payload (catches our own bugs and broken middleboxes)
//!
//! Packed frame (type 40, only on a stream whose hellos agreed on a method): the body is
//! type 40, method, raw length, then the compressed body of the message inside; layout and
//! bounds in compress.rs. Compression happens before TLS encrypts the frame.
//! ```
//!
//! Payload encodings use `u64`/`u32` little-endian integers, strings as `u32 length + UTF-8` and
//! binary payloads (log data, device chunks) as `u32 length + bytes`.

mod compress;
mod message;

pub use compress::{
    Method, Methods, PackError, Packed, Packer, Unpacker, MIN_PACK, PACKED_HEAD, PACKED_TYPE,
    PACK_PAYS, SAMPLES, SAMPLE_LEN, SAMPLE_PAYS, ZSTD_LEVEL, ZSTD_WINDOW_LOG_MAX,
};
pub use message::{Entry, Message, RefuseKind, MAX_SPLIT_NAMES, TAIL_LEN};

use mars_config::HostName;

pub const MAGIC: [u8; 8] = *b"MARSPEER";
/// The newest protocol this code speaks. 2: `FetchFrom` and `SyncInfo` carry a version link.
/// 3: `Refuse` carries a [`RefuseKind`]. 4: metadata entries carry their writer's signature,
/// `FetchFrom` the digest of the replica's bytes before its position (`tail`), and
/// [`RefuseKind::NotMember`] exists. 5: the hello carries compression methods and a stream
/// may carry packed frames (compress.rs); everything else is as in 4.
pub const PROTOCOL_VERSION: u16 = 5;
/// The oldest protocol this code still speaks: version 4 is version 5 without compression, so
/// a cluster can be upgraded host by host. A connecting host sends a version-5 hello only
/// when it offers compression; an accepting host answers in the version it was greeted with.
pub const MIN_PROTOCOL_VERSION: u16 = 4;
/// Size of a hello without the host name.
pub const HELLO_FIXED: usize = 28;
/// Largest binary payload of one message (`LogData`, `SyncData`): 33 MiB, so that one log
/// record of the largest size (32 MiB payload + header) always fits.
pub const MAX_DATA: u32 = 33 << 20;
/// Largest frame body: a [`MAX_DATA`] chunk plus headroom.
pub const MAX_FRAME: u32 = MAX_DATA + 4096;
/// Frame overhead: length prefix and checksum.
pub const FRAME_OVERHEAD: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    Meta = 1,
    Fetch = 2,
    Sync = 3,
}

impl StreamKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Meta),
            2 => Some(Self::Fetch),
            3 => Some(Self::Sync),
            _ => None,
        }
    }
}

/// A cluster's identity: 16 random bytes, printed as a UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClusterId(pub [u8; 16]);

impl ClusterId {
    /// The id a joining host sends before it knows the cluster.
    pub const UNKNOWN: ClusterId = ClusterId([0; 16]);

    pub fn parse(s: &str) -> Result<Self, WireError> {
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WireError::BadClusterId(s.to_owned()));
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| WireError::BadClusterId(s.to_owned()))?;
        }
        Ok(Self(b))
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h: String = self.0.iter().map(|x| format!("{x:02x}")).collect();
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub kind: StreamKind,
    pub cluster: ClusterId,
    pub host: HostName,
    /// Version 5: the compression methods offered (connecting side) or chosen (accepting
    /// side, at most one); empty in version 4.
    pub methods: Methods,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a mars peer (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("unknown stream kind {0}")]
    BadStreamKind(u8),
    #[error("bad host name in hello: {0}")]
    BadHost(String),
    #[error("bad cluster id {0:?}")]
    BadClusterId(String),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(u32),
    #[error("empty frame")]
    EmptyFrame,
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("malformed {what} message: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("bad compressed frame: {0}")]
    Packed(PackError),
}

/// Why a peer's hello is refused; the text goes into the Refuse frame and the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("protocol version {theirs} is not supported (this host speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})")]
    Version { theirs: u16 },
    #[error("host {host} belongs to cluster {theirs}, this host to cluster {ours}")]
    OtherCluster {
        host: HostName,
        theirs: ClusterId,
        ours: ClusterId,
    },
    #[error("the peer chose compression methods {chosen:#04b}, not one of those offered ({offered:#04b})")]
    Methods { offered: u8, chosen: u8 },
}

impl Hello {
    /// A hello without compression, in version 4 (which every peer speaks).
    pub fn new(kind: StreamKind, cluster: ClusterId, host: HostName) -> Self {
        Self {
            version: MIN_PROTOCOL_VERSION,
            kind,
            cluster,
            host,
            methods: Methods::NONE,
        }
    }

    /// The same hello offering `methods` (version 5), or unchanged if there are none.
    pub fn offering(mut self, methods: Methods) -> Self {
        if !methods.is_empty() {
            self.version = PROTOCOL_VERSION;
            self.methods = methods;
        }
        self
    }

    /// The accepting side's answer to `peer`'s hello, `self` being its version-4 hello and
    /// `enabled` the methods it may use: version 5 with the one method it will use (the
    /// preferred of what both enable, maybe none) if the peer spoke 5, else version 4 — a
    /// version-4 peer accepts nothing else.
    pub fn answering(mut self, peer: &Hello, enabled: Methods) -> Self {
        if peer.version >= PROTOCOL_VERSION {
            self.version = PROTOCOL_VERSION;
            self.methods = peer
                .methods
                .intersect(enabled)
                .preferred()
                .map_or(Methods::NONE, |m| Methods::of(&[m]));
        } else {
            self.version = MIN_PROTOCOL_VERSION;
            self.methods = Methods::NONE;
        }
        self
    }

    /// The method a session uses, from the connecting side's view: what the accepting side
    /// chose, which must be one method it was offered (else the peer breaks the protocol).
    pub fn agreed(&self, answer: &Hello) -> Result<Option<Method>, Refusal> {
        let chosen = answer.methods.preferred();
        // Exactly one method we offered, or none at all (an answer with only bits unknown
        // here is neither).
        let ok = answer.version <= self.version
            && match chosen {
                None => answer.methods.is_empty(),
                Some(m) => answer.methods == Methods::of(&[m]) && self.methods.contains(m),
            };
        if ok {
            Ok(chosen)
        } else {
            Err(Refusal::Methods {
                offered: self.methods.bits(),
                chosen: answer.methods.bits(),
            })
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let h = self.host.as_str().as_bytes();
        let mut v = Vec::with_capacity(HELLO_FIXED + h.len());
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&self.version.to_le_bytes());
        v.push(self.kind as u8);
        v.push(h.len() as u8);
        v.extend_from_slice(&self.cluster.0);
        v.extend_from_slice(h);
        if self.version >= PROTOCOL_VERSION {
            v.push(self.methods.bits());
        }
        v
    }

    /// Decodes a hello from the start of `buf`: `Ok(None)` if more bytes are needed, else the
    /// hello and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Hello, usize)>, WireError> {
        let m = buf.len().min(8);
        if buf[..m] != MAGIC[..m] {
            let mut got = [0u8; 8];
            got[..m].copy_from_slice(&buf[..m]);
            return Err(WireError::BadMagic(got));
        }
        if buf.len() < HELLO_FIXED {
            return Ok(None);
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        let kind = StreamKind::from_u8(buf[10]).ok_or(WireError::BadStreamKind(buf[10]))?;
        let n = buf[11] as usize;
        // Version 5 and later carry the method byte after the name (later versions are
        // refused by `check_peer`, whatever they append).
        let extra = usize::from(version >= PROTOCOL_VERSION);
        if buf.len() < HELLO_FIXED + n + extra {
            return Ok(None);
        }
        let mut cluster = [0u8; 16];
        cluster.copy_from_slice(&buf[12..28]);
        let name = std::str::from_utf8(&buf[28..28 + n])
            .map_err(|_| WireError::BadHost("not UTF-8".into()))?;
        let host = HostName::new(name).map_err(|e| WireError::BadHost(e.to_string()))?;
        let methods = if extra == 1 {
            Methods::from_bits(buf[HELLO_FIXED + n])
        } else {
            Methods::NONE
        };
        Ok(Some((
            Hello {
                version,
                kind,
                cluster: ClusterId(cluster),
                host,
                methods,
            },
            HELLO_FIXED + n + extra,
        )))
    }

    /// Checks a peer's hello against ours. A joining peer (unknown cluster) is accepted here;
    /// whether it may join is the daemon's decision.
    pub fn check_peer(&self, peer: &Hello) -> Result<(), Refusal> {
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&peer.version) {
            return Err(Refusal::Version {
                theirs: peer.version,
            });
        }
        if peer.cluster != self.cluster
            && peer.cluster != ClusterId::UNKNOWN
            && self.cluster != ClusterId::UNKNOWN
        {
            return Err(Refusal::OtherCluster {
                host: peer.host.clone(),
                theirs: peer.cluster,
                ours: self.cluster,
            });
        }
        Ok(())
    }
}

/// Appends one frame carrying `msg` to `out`.
pub fn encode_frame(msg: &Message, out: &mut Vec<u8>) {
    let f = frame_parts(msg);
    out.reserve(f.head.len() + f.payload.len() + f.crc.len());
    out.extend_from_slice(&f.head);
    out.extend_from_slice(f.payload);
    out.extend_from_slice(&f.crc);
}

/// One frame in three pieces, to be sent in this order: a large binary payload (log data, a
/// device chunk) is written from where it lies instead of being copied into the frame first.
#[derive(Debug)]
pub struct FrameParts<'a> {
    /// Body length, type and every field up to the payload (its length included).
    pub head: Vec<u8>,
    /// The binary payload of `LogData`/`SyncData`; empty for other messages.
    pub payload: &'a [u8],
    /// crc32c of type + payload fields, as in [`encode_frame`].
    pub crc: [u8; 4],
}

/// The frame carrying `msg`, in pieces (see [`FrameParts`]).
pub fn frame_parts(msg: &Message) -> FrameParts<'_> {
    let mut head = Vec::with_capacity(64);
    head.extend_from_slice(&[0; 4]);
    let payload = msg.encode_split(&mut head);
    let body_len = (head.len() - 4 + payload.len()) as u32;
    head[..4].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[4..]), payload);
    FrameParts {
        head,
        payload,
        crc: crc.to_le_bytes(),
    }
}

/// The length of the frame that starts `buf`, once its length field has arrived (so that a
/// reader can make room for all of it at once).
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().expect("4 bytes"));
    Some(FRAME_OVERHEAD + len.min(MAX_FRAME) as usize)
}

/// Decodes one frame from the start of `buf`: `Ok(None)` if it is not complete yet, else the
/// message and the number of bytes consumed. Never allocates more than the frame limit.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    Ok(decode_frame_unpacking(buf, &mut Unpacker::new(None, MAX_FRAME))?.map(|(m, n, _)| (m, n)))
}

/// [`decode_frame`] on a stream that may carry packed frames of `unpacker`'s agreed method:
/// also says how many bytes the frame would have taken raw (`== consumed` for a raw frame).
pub fn decode_frame_unpacking(
    buf: &[u8],
    unpacker: &mut Unpacker,
) -> Result<Option<(Message, usize, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge(len));
    }
    let total = FRAME_OVERHEAD + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[4..4 + len as usize];
    let crc = u32::from_le_bytes(buf[4 + len as usize..total].try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc {
        return Err(WireError::BadChecksum);
    }
    if body[0] == PACKED_TYPE {
        let inner = unpacker.unpack(body)?;
        return Ok(Some((
            Message::decode(inner)?,
            total,
            FRAME_OVERHEAD + inner.len(),
        )));
    }
    Ok(Some((Message::decode(body)?, total, total)))
}

/// Bytes of a raw `LogData` frame before its data: body length (4), type (1), file (8),
/// offset (8), data length (4). The data follows, then the frame's crc32c (4).
pub const LOG_DATA_HEAD: usize = 4 + 1 + 8 + 8 + 4;

/// The head of a raw `LogData` frame, read before its data (see [`log_data_head`]): lets a
/// reader receive a large chunk straight into a buffer of its choice instead of decoding it
/// out of the stream's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogDataHead {
    pub file: u64,
    pub offset: u64,
    /// Bytes of data that follow the head.
    pub len: usize,
    /// crc32c of the body before the data (type, file, offset, data length).
    head_crc: u32,
}

impl LogDataHead {
    /// The whole frame's length.
    pub fn frame_len(&self) -> usize {
        LOG_DATA_HEAD + self.len + 4
    }

    /// The crc32c the data must have for the frame's checksum `frame_crc` (its last four
    /// bytes) to hold: the frame is checked without a pass over the data of its own, by
    /// comparing this with the checksum of the data computed where the data is read anyway
    /// (the records' own checks: `mars_txlog::format::scan_crc`). A mismatch is the frame's
    /// [`WireError::BadChecksum`].
    pub fn data_crc(&self, frame_crc: [u8; 4]) -> u32 {
        // crc(head ‖ data) = crc(head) · x^(8·len) ^ crc(data) mod the CRC-32C polynomial: the
        // CRC is linear and its all-ones start and final xor cancel, as in zlib's
        // `crc32_combine` (whose zero-data case is exactly the shift of `crc(head)`).
        shift(self.head_crc, self.len) ^ u32::from_le_bytes(frame_crc)
    }
}

/// `crc · x^(8·len) mod P` (CRC-32C, reflected bit order): `crc32c::crc32c_combine(crc, 0, len)`
/// by square-and-multiply over a table of `x^(2^k)`, a few hundred operations instead of the
/// crate's matrix method (1 % of a catching-up secondary's CPU at one call per frame). The same
/// arithmetic as `mars_txlog::format::crc`, which this crate does not depend on.
fn shift(crc: u32, len: usize) -> u32 {
    const POLY: u32 = 0x82F6_3B78;
    /// `a · b mod P`.
    const fn mul(a: u32, mut b: u32) -> u32 {
        let (mut m, mut p) = (1u32 << 31, 0u32);
        while m != 0 {
            if a & m != 0 {
                p ^= b;
            }
            m >>= 1;
            b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        }
        p
    }
    /// `x^(2^k) mod P`.
    const POWERS: [u32; 64] = {
        let mut t = [0u32; 64];
        t[0] = 1 << 30; // x¹
        let mut k = 1;
        while k < 64 {
            t[k] = mul(t[k - 1], t[k - 1]);
            k += 1;
        }
        t
    };
    let (mut op, mut n, mut k) = (1u32 << 31, len as u64, 3); // x⁰; 8 bits per byte
    while n != 0 {
        if n & 1 != 0 {
            op = mul(POWERS[k & 63], op);
        }
        n >>= 1;
        k += 1;
    }
    mul(op, crc)
}

/// If `buf` starts with the head of a raw `LogData` frame (type 12, not packed), its fields;
/// `Ok(None)` for any other frame or if fewer than [`LOG_DATA_HEAD`] bytes are there. The frame
/// is not checked beyond its head: the caller must check the data against
/// [`LogDataHead::data_crc`]. Errors: a body length over [`MAX_FRAME`], or a data length that
/// is not the rest of the body (what [`decode_frame`] refuses as malformed too).
pub fn log_data_head(buf: &[u8]) -> Result<Option<LogDataHead>, WireError> {
    if buf.len() < LOG_DATA_HEAD || buf[4] != 12 {
        return Ok(None);
    }
    let body = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
    if body > MAX_FRAME {
        return Err(WireError::FrameTooLarge(body));
    }
    let len = u32::from_le_bytes(buf[21..25].try_into().expect("4 bytes"));
    if len > MAX_DATA || body as usize != LOG_DATA_HEAD - 4 + len as usize {
        return Err(WireError::Malformed {
            what: "LogData",
            why: format!("data of {len} bytes in a body of {body}"),
        });
    }
    Ok(Some(LogDataHead {
        file: u64::from_le_bytes(buf[5..13].try_into().expect("8 bytes")),
        offset: u64::from_le_bytes(buf[13..21].try_into().expect("8 bytes")),
        len: len as usize,
        head_crc: crc32c::crc32c(&buf[4..LOG_DATA_HEAD]),
    }))
}

#[cfg(test)]
mod tests;
