//! The byte layout of one log record (format version 1). `docs/log-format.md` describes the same
//! layout for humans; the constants below are the authority.
//!
//! A logfile is a plain concatenation of records, no file header, no padding. Every integer is
//! little-endian, whatever the host (MARS wrote host byte order; we do not).
//!
//! ```text
//! off  size  field
//!   0     4  magic        "MaRs" (0x4d 0x61 0x52 0x73)
//!   4     1  version      1
//!   5     1  kind         1 = write, 2 = zero range, 3 = discard
//!   6     2  flags        0 (reserved; a reader refuses anything else)
//!   8     4  payload_len  bytes of data following the header: = len for writes, 0 otherwise
//!  12     8  seq          per-logfile record number, 1 for the first record of every logfile
//!  20     8  stamp        Lamport stamp in nanoseconds since the Unix epoch
//!  28     8  offset       byte offset on the device
//!  36     8  len          byte length on the device
//!  44     4  crc32c       CRC-32C (Castagnoli) of bytes 0..44 followed by the payload
//!  48     n  payload
//! ```
//!
//! One checksum covers header and payload, so any flipped bit anywhere in a record is caught;
//! CRC-32C detects every burst error up to 32 bits and is hardware-accelerated on x86 and ARM.

use std::fmt;

/// First four bytes of every record.
pub const MAGIC: [u8; 4] = *b"MaRs";
/// The only format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Size of the fixed header in front of the payload.
pub const HEADER_LEN: usize = 48;

pub const OFF_MAGIC: usize = 0;
pub const OFF_VERSION: usize = 4;
pub const OFF_KIND: usize = 5;
pub const OFF_FLAGS: usize = 6;
pub const OFF_PAYLOAD_LEN: usize = 8;
pub const OFF_SEQ: usize = 12;
pub const OFF_STAMP: usize = 20;
pub const OFF_OFFSET: usize = 28;
pub const OFF_LEN: usize = 36;
pub const OFF_CRC: usize = 44;

/// Largest payload a record may carry. NBD clients send at most 32 MiB per request; anything
/// larger in a header is damage, and refusing it keeps a corrupt length from allocating memory.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What a record does to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// New data for `[offset, offset+len)`, carried as payload.
    Write = 1,
    /// `[offset, offset+len)` reads as zeros afterwards; no payload.
    Zero = 2,
    /// The client no longer needs the range. We give it a defined result (zeros), so that every
    /// replica of the device stays byte-identical.
    Discard = 3,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Kind::Write),
            2 => Some(Kind::Zero),
            3 => Some(Kind::Discard),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Write => "write",
            Kind::Zero => "zero",
            Kind::Discard => "discard",
        })
    }
}

/// The decoded fixed part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub seq: u64,
    pub stamp: u64,
    pub offset: u64,
    pub len: u64,
}

impl Header {
    /// Bytes of payload that follow this header on disk.
    pub fn payload_len(&self) -> usize {
        match self.kind {
            Kind::Write => self.len as usize,
            Kind::Zero | Kind::Discard => 0,
        }
    }
    /// Whole record size on disk.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record incomplete: {needed} bytes needed, {have} present")]
    Incomplete { needed: usize, have: usize },
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported format version {0}")]
    BadVersion(u8),
    #[error("unknown record kind {0}")]
    BadKind(u8),
    #[error("reserved flags set: {0:#06x}")]
    BadFlags(u16),
    #[error("payload length {payload_len} does not fit a {kind} of {len} bytes")]
    BadLength {
        kind: Kind,
        payload_len: u32,
        len: u64,
    },
    #[error("device range {offset}+{len} overflows")]
    RangeOverflow { offset: u64, len: u64 },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    /// Sequence numbers start at 1 in every logfile; the largest one has no successor (a
    /// forged record must not make the next expected number wrap to 0).
    #[error("sequence number {0} out of range")]
    BadSeq(u64),
}

/// Errors in what a caller asks to encode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte record limit")]
    TooLarge(usize),
    #[error("a {kind} record of {len} bytes must carry {expected} payload bytes, got {got}")]
    PayloadMismatch {
        kind: Kind,
        len: u64,
        expected: usize,
        got: usize,
    },
    #[error("device range {offset}+{len} overflows")]
    RangeOverflow { offset: u64, len: u64 },
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Checks `h` and `payload` against each other without encoding.
pub fn check(h: &Header, payload: &[u8]) -> Result<(), EncodeError> {
    if payload.len() > MAX_PAYLOAD as usize {
        return Err(EncodeError::TooLarge(payload.len()));
    }
    if h.offset.checked_add(h.len).is_none() {
        return Err(EncodeError::RangeOverflow {
            offset: h.offset,
            len: h.len,
        });
    }
    let expected = match h.kind {
        Kind::Write => h.len as usize,
        _ => 0,
    };
    if payload.len() != expected || (h.kind == Kind::Write && h.len > MAX_PAYLOAD as u64) {
        return Err(EncodeError::PayloadMismatch {
            kind: h.kind,
            len: h.len,
            expected,
            got: payload.len(),
        });
    }
    Ok(())
}

/// Appends the encoded record to `out`.
pub fn encode(h: &Header, payload: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.extend_from_slice(&encode_header(h, payload)?);
    out.extend_from_slice(payload);
    Ok(())
}

/// The header of the record carrying `payload` (its checksum covers the payload): the record
/// is this header followed by `payload`. Lets a writer put the payload where it wants it
/// without another copy.
pub fn encode_header(h: &Header, payload: &[u8]) -> Result<[u8; HEADER_LEN], EncodeError> {
    check(h, payload)?;
    let mut out = [0u8; HEADER_LEN];
    out[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC);
    out[OFF_VERSION] = VERSION;
    out[OFF_KIND] = h.kind as u8;
    out[OFF_FLAGS..OFF_FLAGS + 2].copy_from_slice(&0u16.to_le_bytes());
    out[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 4]
        .copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&h.seq.to_le_bytes());
    out[OFF_STAMP..OFF_STAMP + 8].copy_from_slice(&h.stamp.to_le_bytes());
    out[OFF_OFFSET..OFF_OFFSET + 8].copy_from_slice(&h.offset.to_le_bytes());
    out[OFF_LEN..OFF_LEN + 8].copy_from_slice(&h.len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..OFF_CRC]), payload);
    out[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes the record at the start of `buf`. On success returns the header; the payload is
/// `buf[HEADER_LEN..header.record_len()]`.
pub fn decode(buf: &[u8]) -> Result<Header, DecodeError> {
    if buf.len() < HEADER_LEN {
        // Judge the magic of a partial header too, so garbage is not mistaken for a torn record.
        let m = buf.len().min(4);
        if buf[..m] != MAGIC[..m] {
            let mut got = [0u8; 4];
            got[..m].copy_from_slice(&buf[..m]);
            return Err(DecodeError::BadMagic(got));
        }
        return Err(DecodeError::Incomplete {
            needed: HEADER_LEN,
            have: buf.len(),
        });
    }
    let magic: [u8; 4] = buf[OFF_MAGIC..OFF_MAGIC + 4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if buf[OFF_VERSION] != VERSION {
        return Err(DecodeError::BadVersion(buf[OFF_VERSION]));
    }
    let kind = Kind::from_u8(buf[OFF_KIND]).ok_or(DecodeError::BadKind(buf[OFF_KIND]))?;
    let flags = u16::from_le_bytes([buf[OFF_FLAGS], buf[OFF_FLAGS + 1]]);
    if flags != 0 {
        return Err(DecodeError::BadFlags(flags));
    }
    let payload_len = u32_at(buf, OFF_PAYLOAD_LEN);
    let h = Header {
        kind,
        seq: u64_at(buf, OFF_SEQ),
        stamp: u64_at(buf, OFF_STAMP),
        offset: u64_at(buf, OFF_OFFSET),
        len: u64_at(buf, OFF_LEN),
    };
    if h.seq == 0 || h.seq == u64::MAX {
        return Err(DecodeError::BadSeq(h.seq));
    }
    let expected = match kind {
        Kind::Write => h.len,
        _ => 0,
    };
    if payload_len > MAX_PAYLOAD || u64::from(payload_len) != expected {
        return Err(DecodeError::BadLength {
            kind,
            payload_len,
            len: h.len,
        });
    }
    if h.offset.checked_add(h.len).is_none() {
        return Err(DecodeError::RangeOverflow {
            offset: h.offset,
            len: h.len,
        });
    }
    let total = HEADER_LEN + payload_len as usize;
    if buf.len() < total {
        return Err(DecodeError::Incomplete {
            needed: total,
            have: buf.len(),
        });
    }
    let stored = u32_at(buf, OFF_CRC);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&buf[..OFF_CRC]), &buf[HEADER_LEN..total]);
    if stored != computed {
        return Err(DecodeError::BadChecksum { stored, computed });
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A sequence number from disk or the wire is checked, not wrapped: the next expected
    /// number after `u64::MAX` would be 0.
    #[test]
    fn sequence_numbers_without_a_successor_are_refused() {
        for seq in [0, u64::MAX] {
            let h = Header {
                kind: Kind::Zero,
                seq: 5,
                stamp: 1,
                offset: 0,
                len: 512,
            };
            let mut buf = Vec::new();
            encode(&h, &[], &mut buf).unwrap();
            buf[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
            assert_eq!(decode(&buf), Err(DecodeError::BadSeq(seq)));
        }
    }

    fn arb_record() -> impl Strategy<Value = (Header, Vec<u8>)> {
        (
            prop_oneof![Just(Kind::Write), Just(Kind::Zero), Just(Kind::Discard)],
            1u64..u64::MAX,
            any::<u64>(),
            0u64..(1 << 50),
            proptest::collection::vec(any::<u8>(), 0..600),
            0u64..(1 << 40),
        )
            .prop_map(|(kind, seq, stamp, offset, data, zlen)| {
                let (len, payload) = match kind {
                    Kind::Write => (data.len() as u64, data),
                    _ => (zlen, Vec::new()),
                };
                (
                    Header {
                        kind,
                        seq,
                        stamp,
                        offset,
                        len,
                    },
                    payload,
                )
            })
    }

    proptest! {
        #[test]
        fn roundtrip((h, p) in arb_record()) {
            let mut buf = Vec::new();
            encode(&h, &p, &mut buf).unwrap();
            prop_assert_eq!(buf.len(), h.record_len());
            let d = decode(&buf).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(&buf[HEADER_LEN..], &p[..]);
            // Every proper prefix is incomplete, never a different valid record.
            for cut in [0, 1, 3, HEADER_LEN - 1, HEADER_LEN, buf.len().saturating_sub(1)] {
                if cut < buf.len() {
                    let is_incomplete = matches!(decode(&buf[..cut]), Err(DecodeError::Incomplete { .. }));
                    prop_assert!(is_incomplete);
                }
            }
        }

        /// Any change of any bytes of a record is detected: the record never decodes to
        /// something else.
        #[test]
        fn corruption_is_detected((h, p) in arb_record(), idx in any::<prop::sample::Index>(), xor in 1u8..=255, more in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4)) {
            let mut buf = Vec::new();
            encode(&h, &p, &mut buf).unwrap();
            let orig = buf.clone();
            buf[idx.index(orig.len())] ^= xor;
            for (i, x) in more {
                buf[i.index(orig.len())] ^= x;
            }
            if buf != orig {
                prop_assert!(decode(&buf).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&buf);
        }
    }

    #[test]
    fn rejects_inconsistent_input() {
        let h = Header {
            kind: Kind::Zero,
            seq: 1,
            stamp: 1,
            offset: 0,
            len: 10,
        };
        assert!(matches!(
            encode(&h, b"x", &mut Vec::new()),
            Err(EncodeError::PayloadMismatch { .. })
        ));
        let h = Header {
            kind: Kind::Write,
            offset: u64::MAX,
            len: 1,
            ..h
        };
        assert!(matches!(
            encode(&h, b"x", &mut Vec::new()),
            Err(EncodeError::RangeOverflow { .. })
        ));
        assert!(matches!(decode(b"XXXX"), Err(DecodeError::BadMagic(_))));
    }
}

/// What [`scan`] found in a buffer of records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// Bytes taken by complete records at the start of the buffer.
    pub len: usize,
    pub records: u64,
    /// Sequence number of the last complete record.
    pub last_seq: Option<u64>,
}

/// Walks the complete records at the start of `buf`. With `verify`, every record must decode
/// and pass its checksum and the sequence numbers must continue from `next_seq` (when given);
/// the first bad record is an error with its offset in `buf`. Without `verify`, only the length
/// fields are used, to cut a buffer at a record boundary (log shipping sends whole records).
pub fn scan(buf: &[u8], next_seq: Option<u64>, verify: bool) -> Result<Scanned, (usize, String)> {
    let mut at = 0usize;
    let mut records = 0;
    let mut last_seq = None;
    let mut expect = next_seq;
    while buf.len() - at >= HEADER_LEN {
        let rest = &buf[at..];
        let len = if verify {
            match decode(rest) {
                Ok(h) => {
                    if let Some(e) = expect {
                        if h.seq != e {
                            return Err((at, format!("sequence {} where {e} was expected", h.seq)));
                        }
                    }
                    expect = Some(h.seq + 1);
                    last_seq = Some(h.seq);
                    h.record_len()
                }
                Err(DecodeError::Incomplete { .. }) => break,
                Err(e) => return Err((at, e.to_string())),
            }
        } else {
            let payload = u32_at(rest, OFF_PAYLOAD_LEN) as usize;
            let n = HEADER_LEN + payload;
            if rest.len() < n {
                break;
            }
            last_seq = Some(u64_at(rest, OFF_SEQ));
            n
        };
        at += len;
        records += 1;
    }
    Ok(Scanned {
        len: at,
        records,
        last_seq,
    })
}
