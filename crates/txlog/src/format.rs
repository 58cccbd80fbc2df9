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

/// [`decode`] without the checksum: every field is checked, the CRC is not computed. Only for
/// bytes whose checksums were verified before and that cannot have changed since (a replica's
/// window of chunks verified on arrival, immutable in memory: `mars_replica::recent`).
pub fn decode_verified(buf: &[u8]) -> Result<Header, DecodeError> {
    let h = decode_fields(buf)?;
    if buf.len() < h.record_len() {
        return Err(DecodeError::Incomplete {
            needed: h.record_len(),
            have: buf.len(),
        });
    }
    Ok(h)
}

/// The header fields of the record at the start of `buf` (at least [`HEADER_LEN`] bytes),
/// checked as in [`decode`], without the payload and its checksum.
fn decode_fields(buf: &[u8]) -> Result<Header, DecodeError> {
    let head = buf.get(..HEADER_LEN).unwrap_or(buf);
    match decode(head) {
        Ok(h) => Ok(h),
        // The header alone: a payload that is not there yet makes it "incomplete" or fail its
        // checksum; every other field was checked before those two.
        Err(DecodeError::Incomplete { .. } | DecodeError::BadChecksum { .. })
            if head.len() == HEADER_LEN =>
        {
            let kind = Kind::from_u8(head[OFF_KIND]).expect("checked by decode");
            Ok(Header {
                kind,
                seq: u64_at(head, OFF_SEQ),
                stamp: u64_at(head, OFF_STAMP),
                offset: u64_at(head, OFF_OFFSET),
                len: u64_at(head, OFF_LEN),
            })
        }
        Err(e) => Err(e),
    }
}

/// CRC-32C arithmetic for checking a chunk of records in one pass: the checksum of `A ‖ B` is
/// `shift(crc(A), len(B)) ^ crc(B)` (the CRC is linear; its initial value and final xor are
/// both all ones, so they cancel out as in zlib's `crc32_combine`). A record's checksum
/// (header bytes 0..44, then the payload) and the checksum of the whole chunk (what a wire
/// frame carries) are both made from one pass over each payload.
pub mod crc {
    /// CRC-32C (Castagnoli), reflected.
    const POLY: u32 = 0x82F6_3B78;

    /// `a · b mod P` over GF(2), reflected bit order (x⁰ is the top bit).
    const fn mul(a: u32, mut b: u32) -> u32 {
        let mut m = 1u32 << 31;
        let mut p = 0u32;
        while m != 0 {
            if a & m != 0 {
                p ^= b;
            }
            m >>= 1;
            b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        }
        p
    }

    /// `x^(2^k) mod P` for k = 0..64.
    const fn powers() -> [u32; 64] {
        let mut t = [0u32; 64];
        // x¹ in reflected order.
        t[0] = 1 << 30;
        let mut k = 1;
        while k < 64 {
            t[k] = mul(t[k - 1], t[k - 1]);
            k += 1;
        }
        t
    }
    const POWERS: [u32; 64] = powers();

    /// The operator that appends `len` bytes' worth of shift to a checksum (`x^(8·len) mod P`);
    /// computed once per length and applied with [`Shift::apply`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Shift {
        len: usize,
        op: u32,
    }

    impl Shift {
        pub fn new(len: usize) -> Self {
            let mut op = 1u32 << 31; // x⁰
            let mut n = len as u64;
            let mut k = 3; // 8 bits per byte: x^(8·len) = x^(len·2³)
            while n != 0 {
                if n & 1 != 0 {
                    op = mul(POWERS[k & 63], op);
                }
                n >>= 1;
                k += 1;
            }
            Self { len, op }
        }

        pub fn len(&self) -> usize {
            self.len
        }

        pub fn is_empty(&self) -> bool {
            self.len == 0
        }

        /// The checksum of `A ‖ B` from `crc(A)` and `crc(B)`, `B` being `len` bytes long.
        pub fn combine(&self, crc_a: u32, crc_b: u32) -> u32 {
            mul(self.op, crc_a) ^ crc_b
        }
    }

    /// The checksum of `A ‖ B` from the two checksums and the length of `B`.
    pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
        Shift::new(len_b).combine(crc_a, crc_b)
    }

    /// `crc(B)` from `crc(A ‖ B)`, `crc(A)` and the length of `B`: what a frame's checksum says
    /// its payload's checksum must be.
    pub fn split_off(crc_ab: u32, crc_a: u32, len_b: usize) -> u32 {
        Shift::new(len_b).combine(crc_a, 0) ^ crc_ab
    }
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

/// [`scan`] with `verify`, computing each record's checksum and the checksum of the records
/// together (`crc32c(buf[..len])`) in one pass over every payload; the second is what a wire
/// frame carrying the chunk checks, so the chunk is not read a second time for it. Same errors
/// as [`scan`].
pub fn scan_crc(buf: &[u8], next_seq: Option<u64>) -> Result<(Scanned, u32), (usize, String)> {
    let mut at = 0usize;
    let mut records = 0;
    let mut last_seq = None;
    let mut expect = next_seq;
    let mut total = 0u32;
    // Records of a chunk mostly have one size: the shift is computed once per size.
    let mut shift = crc::Shift::new(0);
    while buf.len() - at >= HEADER_LEN {
        let rest = &buf[at..];
        let h = match decode_fields(rest) {
            Ok(h) => h,
            Err(DecodeError::Incomplete { .. }) => break,
            Err(e) => return Err((at, e.to_string())),
        };
        let n = h.record_len();
        if rest.len() < n {
            break;
        }
        let payload = &rest[HEADER_LEN..n];
        if shift.len() != payload.len() {
            shift = crc::Shift::new(payload.len());
        }
        let p = crc32c::crc32c(payload);
        let stored = u32_at(rest, OFF_CRC);
        let computed = shift.combine(crc32c::crc32c(&rest[..OFF_CRC]), p);
        if stored != computed {
            return Err((
                at,
                DecodeError::BadChecksum { stored, computed }.to_string(),
            ));
        }
        if let Some(e) = expect {
            if h.seq != e {
                return Err((at, format!("sequence {} where {e} was expected", h.seq)));
            }
        }
        expect = Some(h.seq + 1);
        last_seq = Some(h.seq);
        total = shift.combine(crc32c::crc32c_append(total, &rest[..HEADER_LEN]), p);
        at += n;
        records += 1;
    }
    Ok((
        Scanned {
            len: at,
            records,
            last_seq,
        },
        total,
    ))
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

#[cfg(test)]
mod scan_tests {
    use super::*;
    use proptest::prelude::*;

    fn record(seq: u64, payload: &[u8]) -> Vec<u8> {
        let h = Header {
            kind: if payload.is_empty() {
                Kind::Zero
            } else {
                Kind::Write
            },
            seq,
            stamp: seq,
            offset: seq * 4096,
            len: if payload.is_empty() {
                512
            } else {
                payload.len() as u64
            },
        };
        let mut out = Vec::new();
        encode(&h, payload, &mut out).unwrap();
        out
    }

    proptest! {
        /// The shift arithmetic agrees with the CRC computed over the bytes.
        #[test]
        fn combine_and_split_match_the_crc(a in proptest::collection::vec(any::<u8>(), 0..3000), b in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let ab: Vec<u8> = a.iter().chain(&b).copied().collect();
            let (ca, cb, cab) = (crc32c::crc32c(&a), crc32c::crc32c(&b), crc32c::crc32c(&ab));
            prop_assert_eq!(crc::combine(ca, cb, b.len()), cab);
            prop_assert_eq!(crc32c::crc32c_combine(ca, cb, b.len()), cab);
            prop_assert_eq!(crc::split_off(cab, ca, b.len()), cb);
        }

        /// `scan_crc` accepts what `scan` accepts, finds the same, and its checksum is that of
        /// the records' bytes; any flipped byte is refused at the record that holds it.
        #[test]
        fn scan_crc_agrees_with_scan(sizes in proptest::collection::vec(0usize..700, 1..6), cut in 0usize..50, flip in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                buf.extend(record(i as u64 + 7, &vec![i as u8 ^ 0x5a; *n]));
            }
            let whole = buf.len();
            buf.truncate(whole - cut.min(whole));
            let s = scan(&buf, Some(7), true).unwrap();
            let (s2, c) = scan_crc(&buf, Some(7)).unwrap();
            prop_assert_eq!(&s2, &s);
            prop_assert_eq!(c, crc32c::crc32c(&buf[..s.len]));
            if s.len > 0 {
                let mut bad = buf.clone();
                let i = flip.index(s.len);
                bad[i] ^= 0x10;
                let e = scan_crc(&bad, Some(7)).unwrap_err();
                let e1 = scan(&bad, Some(7), true).unwrap_err();
                prop_assert_eq!(e.0, e1.0);
            }
        }
    }

    #[test]
    fn scan_crc_checks_sequence_numbers() {
        let mut buf = record(1, b"abc");
        buf.extend(record(3, b"def"));
        let (at, why) = scan_crc(&buf, Some(1)).unwrap_err();
        assert_eq!(at, record(1, b"abc").len());
        assert!(why.contains("sequence 3"), "{why}");
        assert!(scan_crc(&buf, Some(2)).is_err());
    }

    #[test]
    fn decode_verified_checks_fields_not_the_checksum() {
        let mut r = record(5, b"payload");
        assert_eq!(decode_verified(&r).unwrap().seq, 5);
        let n = r.len();
        r[n - 1] ^= 1;
        assert!(decode(&r).is_err());
        assert_eq!(decode_verified(&r).unwrap().seq, 5);
        r[OFF_VERSION] = 9;
        assert_eq!(decode_verified(&r), Err(DecodeError::BadVersion(9)));
        let r = record(5, b"payload");
        assert!(matches!(
            decode_verified(&r[..n - 1]),
            Err(DecodeError::Incomplete { .. })
        ));
        assert!(matches!(
            decode_verified(&r[..10]),
            Err(DecodeError::Incomplete { .. })
        ));
    }
}
