//! Reading logfiles: a verifying sequential reader, and the whole-file check used by recovery.

use std::sync::Arc;

use mars_storage::File;

use crate::format::{decode, DecodeError, Header, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use crate::{LogError, LogName};

/// A read-ahead window over the file.
#[derive(Default)]
struct Buf {
    data: Vec<u8>,
    /// File offset of `data[0]`.
    start: u64,
}

/// One record as read from a logfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub header: Header,
    /// Byte offset of the record inside its logfile.
    pub file_offset: u64,
    pub payload: Vec<u8>,
}

/// One record as read from a logfile, its payload borrowed from the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub header: Header,
    /// Byte offset of the record inside its logfile.
    pub file_offset: u64,
    pub payload: &'a [u8],
}

impl RecordRef<'_> {
    /// The record with its payload copied out of the reader.
    pub fn to_record(&self) -> Record {
        Record {
            header: self.header,
            file_offset: self.file_offset,
            payload: self.payload.to_vec(),
        }
    }
}

/// How a read attempt at some offset ended without a record.
#[derive(Debug)]
pub enum Stop {
    /// Clean end: the offset is exactly the end of the file.
    End,
    /// The bytes at the offset are not a valid record.
    Bad(DecodeError),
}

/// Reads records in order from a byte offset, verifying each checksum and the contiguity of the
/// sequence numbers. Reads ahead in large chunks.
pub struct LogReader {
    file: Arc<dyn File>,
    name: String,
    pos: u64,
    end: u64,
    next_seq: Option<u64>,
    buf: Buf,
}

const READ_AHEAD: usize = 1 << 20;

impl LogReader {
    /// Reads `file` (named `name` in messages) from `pos` up to `end`. If `expected_seq` is
    /// given, the first record must carry it; otherwise the first record sets the expectation.
    pub fn new(
        file: Arc<dyn File>,
        name: impl std::fmt::Display,
        pos: u64,
        end: u64,
        expected_seq: Option<u64>,
    ) -> Self {
        Self {
            file,
            name: name.to_string(),
            pos,
            end,
            next_seq: expected_seq,
            buf: Buf::default(),
        }
    }

    /// Offset of the next record to read.
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// Sequence number the next record must carry, once known.
    pub fn next_seq(&self) -> Option<u64> {
        self.next_seq
    }

    /// Makes `buf` hold at least `n` bytes from `pos` (fewer only at `end`).
    fn fill(&mut self, n: usize) -> Result<&[u8], LogError> {
        let have_from = self.pos.checked_sub(self.buf.start);
        let ok = matches!(have_from, Some(o) if (o as usize) + n <= self.buf.data.len());
        if !ok {
            let want = n.max(READ_AHEAD) as u64;
            let len = want.min(self.end.saturating_sub(self.pos)) as usize;
            self.buf.data.resize(len, 0);
            self.buf.start = self.pos;
            let mut done = 0;
            while done < len {
                let r = self
                    .file
                    .read_at(&mut self.buf.data[done..], self.pos + done as u64)
                    .map_err(LogError::io(&self.name, "read"))?;
                if r == 0 {
                    break;
                }
                done += r;
            }
            self.buf.data.truncate(done);
        }
        let o = (self.pos - self.buf.start) as usize;
        let stop = (o + n).min(self.buf.data.len());
        Ok(&self.buf.data[o..stop])
    }

    /// The next record, or why there is none.
    pub fn try_next(&mut self) -> Result<Result<Record, Stop>, LogError> {
        Ok(self
            .advance()?
            .map(|(h, at)| self.record_ref(h, at).to_record()))
    }

    /// [`LogReader::next_record`] without copying the payload: it stays in the reader's
    /// read-ahead buffer (valid until the next call), and replay copies it once, straight to
    /// where it goes.
    pub fn next_ref(&mut self) -> Result<Option<RecordRef<'_>>, LogError> {
        let pos = self.pos;
        match self.advance()? {
            Ok((h, at)) => Ok(Some(self.record_ref(h, at))),
            Err(Stop::End) => Ok(None),
            Err(Stop::Bad(reason)) => Err(LogError::Corrupt {
                file: self.name.clone(),
                offset: pos,
                reason,
            }),
        }
    }

    /// Reads and verifies the record at the current position and moves past it; returns its
    /// header and file offset (its bytes are in `buf`).
    fn advance(&mut self) -> Result<Result<(Header, u64), Stop>, LogError> {
        if self.pos >= self.end {
            return Ok(Err(Stop::End));
        }
        let head = self.fill(HEADER_LEN)?;
        let needed = match decode(head) {
            Ok(h) => h.record_len(),
            Err(DecodeError::Incomplete { needed, .. }) => needed,
            Err(e) => return Ok(Err(Stop::Bad(e))),
        };
        let whole = self.fill(needed.min(HEADER_LEN + MAX_PAYLOAD as usize))?;
        let h = match decode(whole) {
            Ok(h) => h,
            Err(e) => return Ok(Err(Stop::Bad(e))),
        };
        if let Some(expected) = self.next_seq {
            if h.seq != expected {
                return Err(LogError::Sequence {
                    file: self.name.clone(),
                    offset: self.pos,
                    expected,
                    found: h.seq,
                });
            }
        }
        let at = self.pos;
        self.pos += h.record_len() as u64;
        self.next_seq = Some(h.seq + 1);
        Ok(Ok((h, at)))
    }

    /// The record `advance` just passed; its bytes are still in `buf` (`fill` made them so).
    fn record_ref(&self, header: Header, file_offset: u64) -> RecordRef<'_> {
        let o = (file_offset - self.buf.start) as usize;
        RecordRef {
            header,
            file_offset,
            payload: &self.buf.data[o + HEADER_LEN..o + header.record_len()],
        }
    }

    /// The next record; `None` at the clean end; any damage is an error naming file and offset.
    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        Ok(self.next_ref()?.map(|r| r.to_record()))
    }

    /// Is there a valid record anywhere after `from` (with a sequence number above `min_seq`)?
    /// Used to tell a torn tail (nothing valid follows) from damage in the middle.
    fn valid_record_after(&mut self, from: u64, min_seq: u64) -> Result<Option<u64>, LogError> {
        let mut probe = from + 1;
        let mut chunk = vec![0u8; (self.end.saturating_sub(probe) as usize).min(READ_AHEAD)];
        while probe < self.end {
            let n = (self.end - probe).min(READ_AHEAD as u64) as usize;
            self.file
                .read_exact_at(&mut chunk[..n], probe)
                .map_err(LogError::io(&self.name, "read"))?;
            let mut i = 0;
            while let Some(hit) = find(&chunk[i..n], &MAGIC) {
                let at = probe + (i + hit) as u64;
                let mut r = LogReader::new(self.file.clone(), &self.name, at, self.end, None);
                if let Ok(Ok(rec)) = r.try_next() {
                    if rec.header.seq > min_seq {
                        return Ok(Some(at));
                    }
                }
                i += hit + 1;
            }
            // Overlap so that a magic split across chunks is found.
            probe += (n as u64).saturating_sub(MAGIC.len() as u64 - 1).max(1);
        }
        Ok(None)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What a full check of one logfile found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    pub name: LogName,
    /// Length of the valid prefix: where the next record would go.
    pub valid_len: u64,
    /// Bytes after the valid prefix that belong to a torn (incompletely written) record.
    pub torn_bytes: u64,
    pub records: u64,
    pub last_seq: u64,
    pub last_stamp: u64,
}

/// Reads and verifies a whole logfile. Damage followed by a valid later record is corruption in
/// the middle: an error naming the file and the offset. Damage with nothing valid after it is a
/// torn tail: it is reported in `torn_bytes` and left for the caller to cut off.
pub fn check_file(file: Arc<dyn File>, name: &LogName) -> Result<FileCheck, LogError> {
    let end = file.len().map_err(LogError::io(name.to_string(), "stat"))?;
    let mut r = LogReader::new(file, name, 0, end, Some(1));
    let mut records = 0;
    let mut last_seq = 0;
    let mut last_stamp = 0;
    loop {
        match r.try_next()? {
            Ok(rec) => {
                records += 1;
                last_seq = rec.header.seq;
                last_stamp = rec.header.stamp;
            }
            Err(Stop::End) => {
                return Ok(FileCheck {
                    name: name.clone(),
                    valid_len: end,
                    torn_bytes: 0,
                    records,
                    last_seq,
                    last_stamp,
                })
            }
            Err(Stop::Bad(reason)) => {
                let at = r.position();
                if r.valid_record_after(at, last_seq)?.is_some() {
                    return Err(LogError::Corrupt {
                        file: name.to_string(),
                        offset: at,
                        reason,
                    });
                }
                return Ok(FileCheck {
                    name: name.clone(),
                    valid_len: at,
                    torn_bytes: end - at,
                    records,
                    last_seq,
                    last_stamp,
                });
            }
        }
    }
}
