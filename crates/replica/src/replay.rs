//! Replay: applying the records of a local copy onto the disk, and persisting how far.
//!
//! The position (`writeback`, [`crate::control::write_position`]) is persisted only after the
//! disk's `fdatasync` covered every record before it, so a crash never leaves a position that
//! claims records whose data is not durable on the disk; replaying again from the persisted
//! position (the records are idempotent, applied in log order) reproduces the result.
//!
//! Records come from the bytes just fetched when the window still holds them (`recent.rs`:
//! their checksums were verified on arrival, their fields and sequence are checked again),
//! otherwise from the copy (verified again, checksums included). Within a batch they go through the
//! same overwrite-coalescing index as the primary's writeback (`mars_volume::Index`): an
//! overwritten range is written once, the pieces sorted by offset, adjacent pieces merged into
//! one aligned buffer and written past the page cache. The disk is synced at the end of every
//! batch before its position is persisted, so the order within a batch does not matter.

use bytes::Bytes;
use mars_storage::{Dir, File, OpenMode, PooledBuf};
use mars_txlog::format::{decode_verified, HEADER_LEN};
use mars_txlog::{DecodeError, Kind, LogError, LogName, LogPos, LogReader};
use mars_volume::{Data, Index};

use crate::recent::Recent;
use crate::{control, Error, Result};

/// Replay syncs the disk and persists its position at least every this many bytes of log.
pub const REPLAY_BATCH: u64 = 64 << 20;
/// `should_stop` is asked, and [`ReplayEvent::Applied`] reported, about every this many bytes.
pub const REPLAY_CHECK: u64 = 1 << 20;
/// The buffer adjacent pieces are merged in before they are written.
const MERGE_BUF: usize = 8 << 20;

/// What [`Replay::apply`] reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayEvent {
    /// This many more bytes of log were applied (not yet durable): for rates.
    Applied(u64),
    /// The disk is synced and the position persisted: everything before it is on the disk.
    Persisted(LogPos),
}

/// Replay of a resource directory's copies onto a disk.
pub struct Replay<'a> {
    pub dir: &'a dyn Dir,
    pub disk: &'a dyn File,
    /// Sync the disk and persist the position at least every this many bytes of log
    /// ([`REPLAY_BATCH`]).
    pub batch: u64,
    /// Ask `should_stop` and report [`ReplayEvent::Applied`] about every this many bytes
    /// ([`REPLAY_CHECK`]).
    pub check: u64,
    /// The device's size: a record that writes beyond it is not applied
    /// ([`Error::BeyondDevice`]). Checksums prove a record intact, not that it belongs here.
    pub size: u64,
    /// The bytes just fetched ([`crate::Copies::recent`]): records found there are not read
    /// from the copy.
    pub recent: Option<&'a Recent>,
}

impl<'a> Replay<'a> {
    /// Replay onto `disk`, a device of `size` bytes.
    pub fn new(dir: &'a dyn Dir, disk: &'a dyn File, size: u64) -> Self {
        Self {
            dir,
            disk,
            batch: REPLAY_BATCH,
            check: REPLAY_CHECK,
            size,
            recent: None,
        }
    }

    /// Applies the records `[from, to)` of the copy `name` onto the disk, in order and
    /// verified again while read. Every `batch` bytes, at the end, and when `should_stop`
    /// (asked about every `check` bytes) says so, the disk is synced and then the position
    /// persisted ([`ReplayEvent::Persisted`]). Returns the position reached (persisted).
    ///
    /// Damage in the copy is an error with [`Error::damage_offset`] (`LogError::Corrupt` or
    /// `Sequence`): the caller may cut the copy there and fetch it again. What came before the
    /// damage is written to the disk but not persisted by this call; the position stays at the
    /// last persisted one. A record beyond the device ([`Error::BeyondDevice`]) is not applied; what
    /// came before it is persisted first.
    pub fn apply(
        &self,
        name: &LogName,
        from: u64,
        to: u64,
        should_stop: &mut dyn FnMut() -> bool,
        progress: &mut dyn FnMut(ReplayEvent),
    ) -> Result<LogPos> {
        let mut src = Source {
            dir: self.dir,
            recent: self.recent,
            name,
            pos: from,
            to,
            next_seq: None,
            window: Bytes::new(),
            file: None,
        };
        let mut batch = Batch {
            index: Index::default(),
            bufs: Vec::new(),
            disk: self.disk,
        };
        let mut pos = from;
        let mut pending = 0u64;
        let mut unreported = 0u64;
        let mut persisted = None;
        let persist = |pos: u64,
                       batch: &mut Batch,
                       progress: &mut dyn FnMut(ReplayEvent)|
         -> Result<LogPos> {
            batch.write()?;
            self.disk.sync_data().map_err(|source| Error::Disk {
                op: "fdatasync",
                offset: 0,
                source,
            })?;
            let p = LogPos::new(name.no, pos);
            control::write_position(self.dir, p)?;
            if let Some(r) = self.recent {
                r.release(name.no, pos);
            }
            progress(ReplayEvent::Persisted(p));
            Ok(p)
        };
        loop {
            let (h, payload) = match src.next() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    // Damage: the records before it reach the disk as they would one by one
                    // (not persisted: the position stays where it was).
                    batch.write()?;
                    return Err(e);
                }
            };
            let end = h.offset.checked_add(h.len);
            if end.is_none_or(|e| e > self.size) {
                if pos > from && persisted.is_none_or(|p: LogPos| p.offset < pos) {
                    persist(pos, &mut batch, progress)?;
                }
                return Err(Error::BeyondDevice {
                    name: name.clone(),
                    at: pos,
                    end: end.unwrap_or(u64::MAX),
                    size: self.size,
                });
            }
            let n = h.record_len() as u64;
            if h.len > 0 {
                let data = match h.kind {
                    Kind::Write => Data::Bytes(payload),
                    Kind::Zero => Data::Zero { punch: false },
                    Kind::Discard => Data::Zero { punch: true },
                };
                let rec = LogPos::new(name.no, pos);
                batch.index.insert(
                    h.offset,
                    h.offset + h.len,
                    rec,
                    LogPos::new(name.no, pos + n),
                    data,
                );
            }
            pos += n;
            pending += n;
            unreported += n;
            if unreported >= self.check {
                progress(ReplayEvent::Applied(unreported));
                unreported = 0;
                if should_stop() {
                    return persist(pos, &mut batch, progress);
                }
            }
            if pending >= self.batch {
                persisted = Some(persist(pos, &mut batch, progress)?);
                pending = 0;
            }
        }
        if unreported > 0 {
            progress(ReplayEvent::Applied(unreported));
        }
        match persisted {
            // A batch ended right at the end: nothing new to persist.
            Some(p) if p.offset == pos => Ok(p),
            _ => persist(pos, &mut batch, progress),
        }
    }
}

/// Where replay's records come from: the window of bytes just fetched while it holds them,
/// otherwise the copy.
struct Source<'a> {
    dir: &'a dyn Dir,
    recent: Option<&'a Recent>,
    name: &'a LogName,
    /// The next record's offset.
    pos: u64,
    to: u64,
    next_seq: Option<u64>,
    /// Bytes of the window from `pos` on (empty: look again).
    window: Bytes,
    file: Option<LogReader>,
}

impl Source<'_> {
    /// The next record below `to`: its header and payload (for writes).
    fn next(&mut self) -> Result<Option<(mars_txlog::format::Header, Bytes)>> {
        if self.pos >= self.to {
            return Ok(None);
        }
        if self.window.is_empty() {
            if let Some(r) = self.recent {
                self.window = r.get(self.name.no, self.pos).unwrap_or_default();
            }
        }
        if !self.window.is_empty() {
            return self.next_in_window().map(Some);
        }
        let reader = match &mut self.file {
            Some(r) if r.position() == self.pos => r,
            _ => {
                let s = self.name.to_string();
                let f = self
                    .dir
                    .open(&s, OpenMode::Existing)
                    .map_err(Error::io(&s, "open"))?;
                self.file.insert(LogReader::new(
                    f,
                    self.name,
                    self.pos,
                    self.to,
                    self.next_seq,
                ))
            }
        };
        let Some(rec) = reader.next_ref()? else {
            return Ok(None);
        };
        let h = rec.header;
        let payload = Bytes::copy_from_slice(rec.payload);
        self.pos = reader.position();
        self.next_seq = reader.next_seq();
        Ok(Some((h, payload)))
    }

    /// The record at the start of the window, its fields and sequence checked as the reader
    /// does; not its checksum: the window holds only chunks whose checksums were verified on
    /// arrival ([`crate::CopyAppender::append_received`]), immutable since, so computing them
    /// again would find what was found then (it cost a sixth of replay's CPU).
    fn next_in_window(&mut self) -> Result<(mars_txlog::format::Header, Bytes)> {
        let corrupt = |reason: DecodeError| {
            Error::Log(LogError::Corrupt {
                file: self.name.to_string(),
                offset: self.pos,
                reason,
            })
        };
        let h = decode_verified(&self.window).map_err(corrupt)?;
        let n = h.record_len();
        if self.pos + n as u64 > self.to {
            // The window holds whole records and `to` is the end of one: not expected.
            return Err(corrupt(DecodeError::Incomplete {
                needed: n,
                have: (self.to - self.pos) as usize,
            }));
        }
        if let Some(expected) = self.next_seq {
            if h.seq != expected {
                return Err(Error::Log(LogError::Sequence {
                    file: self.name.to_string(),
                    offset: self.pos,
                    expected,
                    found: h.seq,
                }));
            }
        }
        let payload = self.window.slice(HEADER_LEN..n);
        self.window = self.window.slice(n..);
        self.pos += n as u64;
        self.next_seq = Some(h.seq + 1);
        Ok((h, payload))
    }
}

/// One batch of records, coalesced by device offset.
struct Batch<'a> {
    index: Index,
    /// The merge buffers, kept for the run's next batches (from the pool).
    bufs: Vec<PooledBuf>,
    disk: &'a dyn File,
}

/// A merged run of adjacent pieces: `buf[from..at]` goes to the disk at `base + from`
/// (`base` aligned, so that the whole blocks in it are written past the page cache).
struct Merged {
    buf: PooledBuf,
    base: u64,
    from: usize,
    at: usize,
}

impl Merged {
    fn write(&self, disk: &dyn File) -> Result<()> {
        mars_storage::write_split(disk, self.buf.as_slice(), self.base, self.from, self.at).map_err(
            |source| Error::Disk {
                op: "write",
                offset: self.base + self.from as u64,
                source,
            },
        )
    }
}

impl Batch<'_> {
    /// Writes the batch's pieces sorted by offset, adjacent ones merged (not synced). A batch
    /// of more than one merge buffer is written by a second thread while the next buffer is
    /// merged: the copy into the buffer (CPU) and the disk's write of the one before overlap,
    /// instead of taking turns. The pieces do not overlap and the disk is synced only after
    /// all of them are written, so the order in which they reach the disk does not matter.
    fn write(&mut self) -> Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        let c = self
            .index
            .collect(LogPos::new(u64::MAX, u64::MAX), usize::MAX);
        let data: u64 = c
            .pieces
            .iter()
            .filter(|p| matches!(p.data, Data::Bytes(_)))
            .map(|p| p.end - p.start)
            .sum();
        // From the pool: replay runs are short while following a fetch (one per sync of the
        // fetch), and a fresh 8 MiB each time cost page faults and zeroing per run.
        let wanted = if data > MERGE_BUF as u64 { 2 } else { 1 };
        while self.bufs.len() < wanted {
            self.bufs.push(mars_storage::pooled(MERGE_BUF));
        }
        let disk = self.disk;
        if wanted == 1 {
            let buf = self.bufs.pop().expect("one buffer");
            let buf = merge(&c.pieces, disk, buf, &mut |m| {
                m.write(disk)?;
                Ok(m.buf)
            })?;
            self.bufs.push(buf);
        } else {
            let mut spare = self.bufs.split_off(1);
            let first = self.bufs.pop().expect("two buffers");
            let r = std::thread::scope(|s| -> Result<()> {
                // At most one merged buffer waits while another is written: two in flight.
                let (todo, work) = std::sync::mpsc::sync_channel::<Merged>(1);
                let (back, done) = std::sync::mpsc::channel::<PooledBuf>();
                let writer = s.spawn(move || -> Result<()> {
                    for m in work {
                        m.write(disk)?;
                        // The merging side may have stopped on an error: nobody waits.
                        let _ = back.send(m.buf);
                    }
                    Ok(())
                });
                let merged = merge(&c.pieces, disk, first, &mut |m| {
                    if todo.send(m).is_err() {
                        // The writer stopped on an error; its result says which.
                        return Err(Error::Disk {
                            op: "write",
                            offset: 0,
                            source: std::io::Error::other("replay's writer stopped"),
                        });
                    }
                    match spare.pop() {
                        Some(b) => Ok(b),
                        None => done.recv().map_err(|_| Error::Disk {
                            op: "write",
                            offset: 0,
                            source: std::io::Error::other("replay's writer stopped"),
                        }),
                    }
                });
                drop(todo);
                let written = writer
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                // The writer's error is the cause of a merging error about it.
                written?;
                let last = merged?;
                spare.push(last);
                spare.extend(done.try_iter());
                Ok(())
            });
            self.bufs.append(&mut spare);
            r?;
        }
        self.index.release(&c);
        Ok(())
    }
}

/// Merges runs of adjacent pieces into `buf` and hands each full buffer or finished run to
/// `emit`, which writes it (or has it written) and gives back a buffer to merge into next;
/// zeroed and discarded ranges are written directly. Returns the buffer in hand at the end.
fn merge(
    pieces: &[mars_volume::Piece],
    disk: &dyn File,
    mut buf: PooledBuf,
    emit: &mut dyn FnMut(Merged) -> Result<PooledBuf>,
) -> Result<PooledBuf> {
    let mut i = 0;
    while i < pieces.len() {
        let p = &pieces[i];
        let Data::Bytes(_) = &p.data else {
            if let Data::Zero { punch } = p.data {
                disk.write_zeroes(p.start, p.end - p.start, punch)
                    .map_err(|source| Error::Disk {
                        op: "write",
                        offset: p.start,
                        source,
                    })?;
            }
            i += 1;
            continue;
        };
        // A run of adjacent pieces with data, merged in `buf`: `buf[0]` is the aligned
        // offset `base`, the run starts at `buf[from]`.
        let mut base = mars_storage::align_down(p.start);
        let mut from = (p.start - base) as usize;
        let mut at = from;
        let mut end = p.start;
        while let Some(q) = pieces.get(i) {
            let Data::Bytes(b) = &q.data else { break };
            if q.start != end {
                break;
            }
            let mut rest = &b[..];
            while !rest.is_empty() {
                let room = buf.len() - at;
                let n = room.min(rest.len());
                buf.as_mut_slice()[at..at + n].copy_from_slice(&rest[..n]);
                at += n;
                rest = &rest[n..];
                if at == buf.len() {
                    buf = emit(Merged {
                        buf,
                        base,
                        from,
                        at,
                    })?;
                    base += at as u64;
                    from = 0;
                    at = 0;
                }
            }
            end = q.end;
            i += 1;
        }
        if from < at {
            buf = emit(Merged {
                buf,
                base,
                from,
                at,
            })?;
        }
    }
    Ok(buf)
}
