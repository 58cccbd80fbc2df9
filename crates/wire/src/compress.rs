//! Compression of frames on the fetch and sync streams: which methods exist, how a session
//! agrees on one, and the packed frame that carries a compressed message.
//!
//! Negotiation (hello version 5, see the crate's layout): the connecting side (the replica)
//! offers the methods it may use — the cluster-wide `defaults/enabled-net-compressions`
//! (MARS's `set-global-enabled-net-compressions`) that this build implements — as a bit set
//! in its hello; the serving side answers with the one method it will use, the first of
//! [`Method::PREFERENCE`] that both offer and its own setting enables, or none. A peer of
//! version 4 knows no compression: a version-4 server refuses a version-5 hello, and the
//! replica connects again with a version-4 hello (raw); a version-4 replica sends a version-4
//! hello and gets a version-4 answer (raw). So both sides always agree, and only the data of
//! a session that agreed on a method is ever packed.
//!
//! Only the server packs (log data and sync chunks flow to the replica), and only where it
//! pays: a message below [`MIN_PACK`] bytes goes raw; of a larger one, a few samples are
//! compressed with lz4 first (cheap: 16 KiB of a 1 MiB chunk) and the message goes raw unless
//! they shrink to [`SAMPLE_PAYS`]; then the whole message is compressed and goes raw unless it
//! shrank to [`PACK_PAYS`]. Random data costs a sample's compression, not a chunk's.
//!
//! ```text
//! Packed frame (type 40), little-endian, inside the usual frame (length, body, crc32c — the
//! checksum covers the packed bytes as they travel):
//!   off size field
//!     0    1 type           40 (PACKED_TYPE)
//!     1    1 method         1 = lz4 (LZ4 frame format), 2 = zstd (one zstd frame)
//!     2    4 raw length     length of the inner body (type + payload of the message inside),
//!                           1..=the receiver's frame limit; never type 40 again
//!     6    … packed bytes   the inner body, compressed
//! ```
//!
//! Decoding is bounded: the raw length is checked against the reader's frame limit before
//! anything happens, the decompressor's output grows with what it really produces (nothing is
//! reserved from the length field), and one byte more than declared ends it. A zstd frame may
//! not ask for a window larger than [`ZSTD_WINDOW_LOG_MAX`]. A frame whose output differs from
//! the declared length, that does not decompress, or uses a method the session did not agree
//! on is a [`PackError`]: the session ends.

use std::io::Read;

use crate::{WireError, FRAME_OVERHEAD};

/// The type byte of a packed frame.
pub const PACKED_TYPE: u8 = 40;
/// Bytes of a packed body before the packed bytes: type, method, raw length.
pub const PACKED_HEAD: usize = 6;
/// Messages smaller than this go raw (their frame overhead dominates anyway).
pub const MIN_PACK: usize = 4096;
/// Bytes of one sample of the cheap check, and how many samples of a large message.
pub const SAMPLE_LEN: usize = 4096;
pub const SAMPLES: usize = 4;
/// The samples must compress (lz4) to at most this share (numerator over 16) of their size.
pub const SAMPLE_PAYS: usize = 14;
/// The whole message must compress to at most this share (numerator over 16) of its size,
/// else it goes raw: 12.5 % saved at least, or the receiver's decompression is wasted.
pub const PACK_PAYS: usize = 14;
/// zstd's level: its default, about 300 MB/s per core on text, far above the links that
/// need compression.
pub const ZSTD_LEVEL: i32 = 3;
/// The largest zstd window a receiver accepts (8 MiB): zstd at [`ZSTD_LEVEL`] uses 2 MiB at
/// most; a peer asking more would make the receiver allocate it.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// A compression method. The byte is what a packed frame names, `1 << (byte - 1)` its bit in
/// a hello's method set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Method {
    Lz4 = 1,
    Zstd = 2,
}

impl Method {
    /// The order in which a server picks among the methods both sides enable: the fastest
    /// first, as MARS does (it prefers LZO, then LZ4, then ZLIB).
    pub const PREFERENCE: [Method; 2] = [Method::Lz4, Method::Zstd];

    pub fn from_u8(b: u8) -> Option<Method> {
        match b {
            1 => Some(Method::Lz4),
            2 => Some(Method::Zstd),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8 - 1)
    }

    /// The name in the cluster setting (MARS's feature names; `COMPRESS_ZSTD` is ours).
    pub fn mars_name(self) -> &'static str {
        match self {
            Method::Lz4 => "COMPRESS_LZ4",
            Method::Zstd => "COMPRESS_ZSTD",
        }
    }

    /// The name in `view` and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Lz4 => "lz4",
            Method::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of methods, as a hello carries it (one byte, bit `1 << (method - 1)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Methods(u8);

impl Methods {
    pub const NONE: Methods = Methods(0);
    /// Every method this build implements.
    pub const ALL: Methods = Methods(0b11);

    pub fn of(ms: &[Method]) -> Methods {
        Methods(ms.iter().fold(0, |a, m| a | m.bit()))
    }

    /// A hello's byte as sent. Bits of methods this build does not know are kept, so that a
    /// hello re-encodes to the bytes it came from; they never match a method here
    /// ([`Methods::intersect`] with what is enabled drops them).
    pub fn from_bits(b: u8) -> Methods {
        Methods(b)
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, m: Method) -> bool {
        self.0 & m.bit() != 0
    }

    pub fn intersect(self, o: Methods) -> Methods {
        Methods(self.0 & o.0)
    }

    /// The method a server uses among these ([`Method::PREFERENCE`]).
    pub fn preferred(self) -> Option<Method> {
        Method::PREFERENCE.into_iter().find(|m| self.contains(*m))
    }

    /// The methods a value of `defaults/enabled-net-compressions` enables: MARS's
    /// `|`-separated feature names. Names this build does not implement (`COMPRESS_LZO`,
    /// `COMPRESS_ZLIB`) and anything else enable nothing.
    pub fn from_setting(value: &str) -> Methods {
        let mut set = Methods::NONE;
        for name in value.split('|').map(str::trim) {
            for m in Method::PREFERENCE {
                if name.eq_ignore_ascii_case(m.mars_name()) {
                    set.0 |= m.bit();
                }
            }
        }
        set
    }
}

/// Why a packed frame is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("method {0} was not agreed on for this session")]
    NotAgreed(u8),
    #[error("unknown method {0}")]
    UnknownMethod(u8),
    #[error("it declares {declared} bytes, more than the {limit}-byte frame limit")]
    TooLarge { declared: u32, limit: u32 },
    #[error("it declares {declared} bytes but decompresses to {got}{}", if *.more { " or more" } else { "" })]
    SizeMismatch {
        declared: u32,
        got: usize,
        more: bool,
    },
    #[error("it does not decompress: {0}")]
    Corrupt(String),
    #[error("it is shorter than its head")]
    Short,
    #[error("it contains another packed frame")]
    Nested,
}

/// The receiving side of a session: which method the session agreed on, how large a frame
/// may be, and a buffer for the unpacked body reused for the whole connection.
#[derive(Debug)]
pub struct Unpacker {
    agreed: Option<Method>,
    limit: u32,
    body: Vec<u8>,
}

impl Unpacker {
    pub fn new(agreed: Option<Method>, limit: u32) -> Self {
        Unpacker {
            agreed,
            limit,
            body: Vec::new(),
        }
    }

    pub fn agreed(&self) -> Option<Method> {
        self.agreed
    }

    /// The room its buffer holds (for the tests: it follows real output, up to the limit).
    pub fn capacity(&self) -> usize {
        self.body.capacity()
    }

    /// Unpacks the body of a packed frame (`body[0] == PACKED_TYPE`) into the inner body.
    pub fn unpack(&mut self, body: &[u8]) -> Result<&[u8], PackError> {
        if body.len() < PACKED_HEAD {
            return Err(PackError::Short);
        }
        let method = Method::from_u8(body[1]).ok_or(PackError::UnknownMethod(body[1]))?;
        if self.agreed != Some(method) {
            return Err(PackError::NotAgreed(body[1]));
        }
        let declared = u32::from_le_bytes(body[2..6].try_into().expect("4 bytes"));
        if declared == 0 || declared > self.limit {
            return Err(PackError::TooLarge {
                declared,
                limit: self.limit,
            });
        }
        let packed = &body[PACKED_HEAD..];
        self.body.clear();
        // One byte more than declared is read, so that a longer output is seen without
        // producing all of it; the buffer grows with the output (read_to_end), so a lying
        // length field claims nothing.
        let cap = declared as u64 + 1;
        let r = match method {
            Method::Lz4 => lz4_flex::frame::FrameDecoder::new(packed)
                .take(cap)
                .read_to_end(&mut self.body),
            Method::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(packed)
                    .map_err(|e| PackError::Corrupt(e.to_string()))?;
                d.window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(|e| PackError::Corrupt(e.to_string()))?;
                d.take(cap).read_to_end(&mut self.body)
            }
        };
        r.map_err(|e| PackError::Corrupt(e.to_string()))?;
        if self.body.len() != declared as usize {
            return Err(PackError::SizeMismatch {
                declared,
                got: self.body.len(),
                more: self.body.len() > declared as usize,
            });
        }
        if self.body[0] == PACKED_TYPE {
            return Err(PackError::Nested);
        }
        Ok(&self.body)
    }
}

impl From<PackError> for WireError {
    fn from(e: PackError) -> Self {
        WireError::Packed(e)
    }
}

/// What the packer did with one frame: the bytes it would have taken raw and the bytes it
/// takes on the wire (both whole frames, overhead included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Packed {
    pub raw: u64,
    pub wire: u64,
    /// Whether it went packed (else raw, `raw == wire`).
    pub packed: bool,
}

/// The sending side of a session: the agreed method, a compression context and buffers
/// reused for the whole connection.
pub struct Packer {
    method: Option<Method>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// The inner body (type + payload), contiguous.
    input: Vec<u8>,
    /// The packed frame: length, packed head, packed bytes.
    out: Vec<u8>,
    sample: Vec<u8>,
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl Packer {
    pub fn new(method: Option<Method>) -> Self {
        Packer {
            method,
            zstd: None,
            input: Vec::new(),
            out: Vec::new(),
            sample: Vec::new(),
        }
    }

    pub fn method(&self) -> Option<Method> {
        self.method
    }

    /// Whether `data` is worth a full compression: a few samples spread over it must shrink
    /// (lz4, the cheapest check whatever the method).
    fn samples_pay(&mut self, data: &[u8]) -> bool {
        if data.len() < SAMPLES * SAMPLE_LEN * 4 {
            return true;
        }
        let step = data.len() / SAMPLES;
        let (mut raw, mut packed) = (0, 0);
        for i in 0..SAMPLES {
            let s = &data[i * step..i * step + SAMPLE_LEN];
            self.sample.clear();
            self.sample
                .resize(lz4_flex::block::get_maximum_output_size(s.len()), 0);
            let n = lz4_flex::block::compress_into(s, &mut self.sample).unwrap_or(s.len());
            raw += s.len();
            packed += n;
        }
        packed * 16 <= raw * SAMPLE_PAYS
    }

    /// Packs `msg` if the session agreed on a method and it pays: then the whole frame is in
    /// [`Packer::packed_frame`] (until the next call); else send the raw frame.
    pub fn pack(&mut self, msg: &crate::Message) -> Packed {
        let raw = crate::frame_parts(msg);
        let raw_len = (raw.head.len() + raw.payload.len() + raw.crc.len()) as u64;
        let unpacked = Packed {
            raw: raw_len,
            wire: raw_len,
            packed: false,
        };
        self.out.clear();
        let Some(method) = self.method else {
            return unpacked;
        };
        let body_len = raw_len as usize - FRAME_OVERHEAD;
        if body_len < MIN_PACK || !self.samples_pay(raw.payload) {
            return unpacked;
        }
        self.input.clear();
        self.input.extend_from_slice(&raw.head[4..]);
        self.input.extend_from_slice(raw.payload);
        self.out.extend_from_slice(&[0; 4]);
        self.out.push(PACKED_TYPE);
        self.out.push(method as u8);
        self.out.extend_from_slice(&(body_len as u32).to_le_bytes());
        let ok = match method {
            Method::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(&mut self.out);
                std::io::Write::write_all(&mut enc, &self.input).is_ok() && enc.finish().is_ok()
            }
            Method::Zstd => {
                if self.zstd.is_none() {
                    self.zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
                }
                match self.zstd.as_mut().map(|c| c.compress(&self.input)) {
                    Some(Ok(z)) => {
                        self.out.extend_from_slice(&z);
                        true
                    }
                    _ => false,
                }
            }
        };
        let packed_body = self.out.len() - 4;
        if !ok || packed_body * 16 > body_len * PACK_PAYS {
            self.out.clear();
            return unpacked;
        }
        self.out[..4].copy_from_slice(&(packed_body as u32).to_le_bytes());
        let crc = crc32c::crc32c(&self.out[4..]).to_le_bytes();
        self.out.extend_from_slice(&crc);
        Packed {
            raw: raw_len,
            wire: self.out.len() as u64,
            packed: true,
        }
    }

    /// The frame the last [`Packer::pack`] that packed produced.
    pub fn packed_frame(&self) -> &[u8] {
        &self.out
    }

    /// The frame for `msg` in pieces, packed or raw ([`Packer::pack`]): send `head`,
    /// `payload`, `crc` in this order either way.
    pub fn frame<'a>(&'a mut self, msg: &'a crate::Message) -> (crate::FrameParts<'a>, Packed) {
        let st = self.pack(msg);
        if !st.packed {
            return (crate::frame_parts(msg), st);
        }
        let (body, crc) = self.out.split_at(self.out.len() - 4);
        (
            crate::FrameParts {
                head: Vec::new(),
                payload: body,
                crc: crc.try_into().expect("4 bytes"),
            },
            st,
        )
    }
}
