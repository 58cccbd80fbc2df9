//! Encoded records on their way into one logfile, in aligned chunks that the group commit
//! writes past the page cache.
//!
//! A segment starts at a block boundary of its logfile ([`mars_storage::real::DIRECT_ALIGN`]):
//! when the records start inside a block, the segment begins with that block's bytes already
//! in the file (the logfile's "tail", at most one block less a byte), so that the block can be
//! written again whole. Its bytes live in fixed-size aligned [`CHUNK`]s taken from a pool that
//! every log of the process shares; so the group commit writes whole blocks with O_DIRECT
//! straight from them ([`mars_storage::write_split`]: the partial last block goes through the
//! page cache and is written again whole by the next group). This saves the kernel's copy of
//! every logged byte into freshly allocated page-cache pages, which was the largest single cost
//! of a sequential writer (`docs/performance.md`, "NBD sequential write").
//!
//! Rewriting the partial block is safe for the records already durable in it: its first bytes
//! are written again with the same contents, so a torn write of the block leaves them as they
//! were.

use std::sync::Mutex;

use mars_storage::{align_down, AlignedBuf, File};

/// Bytes per chunk. Large enough that a sequential writer's group goes to the disk in few
/// large direct writes, small enough that a small group (random 4 KiB writes) holds little.
pub const CHUNK: usize = 1 << 20;

/// Chunks kept for reuse by all logs of the process together (so a host with many idle
/// resources does not keep a pool per log). Fresh chunks cost page faults and the kernel's
/// zeroing of every page.
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());

fn take_chunk() -> AlignedBuf {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_else(|| AlignedBuf::new(CHUNK))
}

fn give_chunks(chunks: &mut Vec<AlignedBuf>) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    while let Some(c) = chunks.pop() {
        if pool.len() >= POOL_MAX {
            break;
        }
        pool.push(c);
    }
}

/// Encoded records for one logfile: `len` bytes from the aligned `offset` on.
pub(crate) struct Segment {
    pub file: u64,
    /// Where the segment's first byte goes in the logfile (a block boundary).
    pub offset: u64,
    /// Where the segment's first record starts (after the tail it began with).
    pub start: u64,
    len: usize,
    chunks: Vec<AlignedBuf>,
}

impl Segment {
    /// A segment of logfile `file` whose records start at `at`; `tail` must be the logfile's
    /// bytes from the block boundary below `at` up to `at`.
    pub fn new(file: u64, at: u64, tail: &[u8]) -> Segment {
        let offset = align_down(at);
        debug_assert_eq!((at - offset) as usize, tail.len());
        let mut s = Segment {
            file,
            offset,
            start: at,
            len: 0,
            chunks: Vec::new(),
        };
        s.push(tail);
        s
    }

    /// Appends bytes.
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let at = self.len % CHUNK;
            if at == 0 && self.chunks.len() * CHUNK == self.len {
                self.chunks.push(take_chunk());
            }
            let last = self.chunks.last_mut().expect("a chunk with room");
            let n = (CHUNK - at).min(data.len());
            last.as_mut_slice()[at..at + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
    }

    /// Position after the segment's last byte in its logfile.
    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }

    /// Whether the segment holds no bytes (it only marks the creation of its logfile).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes of the segment's partial last block (empty when it ends on a boundary): the
    /// tail the next segment of the same logfile starts with.
    pub fn tail(&self) -> &[u8] {
        let from = align_down(self.len as u64) as usize;
        let Some(last) = self.chunks.last() else {
            return &[];
        };
        let base = (self.chunks.len() - 1) * CHUNK;
        &last.as_slice()[from - base..self.len - base]
    }

    /// Appends the segment's records (its bytes from [`Segment::start`] on, without the tail
    /// it began with) to `out`.
    pub fn records_into(&self, out: &mut Vec<u8>) {
        let mut from = (self.start - self.offset) as usize;
        out.reserve(self.len.saturating_sub(from));
        for (i, c) in self.chunks.iter().enumerate() {
            let base = i * CHUNK;
            let n = (self.len - base).min(CHUNK);
            if from < base + n {
                out.extend_from_slice(&c.as_slice()[from.max(base) - base..n]);
                from = base + n;
            }
        }
    }

    /// Writes the segment to `file`: whole blocks direct, a partial last block buffered.
    pub fn write(&self, file: &dyn File) -> std::io::Result<()> {
        for (i, c) in self.chunks.iter().enumerate() {
            let base = i * CHUNK;
            let n = (self.len - base).min(CHUNK);
            mars_storage::write_split(file, c.as_slice(), self.offset + base as u64, 0, n)?;
        }
        Ok(())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        give_chunks(&mut self.chunks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mars_storage::mem::MemDir;
    use mars_storage::{Dir, OpenMode};

    #[test]
    fn segments_continue_a_partial_block_and_span_chunks() {
        let d = MemDir::new();
        let f = d.open("log", OpenMode::Create).unwrap();
        let first: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut s = Segment::new(1, 0, &[]);
        s.push(&first);
        assert_eq!(s.end(), 5000);
        assert_eq!(s.tail(), &first[4096..]);
        s.write(&*f).unwrap();
        // The next group starts inside the second block and spans three chunks.
        let second: Vec<u8> = (0..(2 * CHUNK + 777)).map(|i| (i * 7) as u8).collect();
        let tail = s.tail().to_vec();
        drop(s);
        let mut s = Segment::new(1, 5000, &tail);
        assert_eq!(s.offset, 4096);
        s.push(&second[..10]);
        s.push(&second[10..]);
        assert_eq!(s.end(), 5000 + second.len() as u64);
        let mut recs = Vec::new();
        s.records_into(&mut recs);
        assert_eq!(recs, second);
        s.write(&*f).unwrap();
        let mut back = vec![0u8; 5000 + second.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..5000], &first[..]);
        assert_eq!(&back[5000..], &second[..]);
        let end = s.end() as usize;
        assert_eq!(s.tail(), &back[align_down(end as u64) as usize..end]);
        // A segment ending on a block boundary leaves no tail.
        let s = Segment::new(2, 0, &[]);
        assert!(s.tail().is_empty() && s.is_empty());
    }
}
