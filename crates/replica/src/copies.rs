//! The replica's verified copies of the origin's logfiles, `log-NNNNNNNNN-ORIGIN` (same names
//! and format as the origin's logfiles: `docs/log-format.md`, `mars_txlog`).
//!
//! [`Copies`] keeps, per logfile number, the origin, the *durable* length (bytes verified on
//! arrival and made durable by `fdatasync`; only they count) and whether the copy is complete
//! (its end was received, or a later copy exists). It checks every operation's preconditions,
//! never decides which copy to accept: forks, repairs and space are the caller's decisions.
//!
//! Durability, what a crash leaves:
//! - appended bytes count only after [`CopyAppender::sync`] (or [`CopySync::run`]) returned;
//!   bytes beyond the durable length (unsynced, perhaps torn) are cut when the copy is opened
//!   again ([`Copies::open`], [`Copies::append`]);
//! - a new copy's name is durable (directory sync) before [`Copies::append`] returns;
//! - removals are durable when they return; copies are removed newest first (or, for
//!   reclamation, oldest first with a directory sync each), so whatever a crash leaves of a
//!   removal is still a contiguous run of numbers;
//! - a cut ([`Copies::truncate`], [`Copies::cut_for_promotion`]) removes the later copies
//!   durably *before* it shortens the copy at the cut: a shortened copy is never followed by a
//!   later one, which would mark it complete at its shorter length.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use mars_config::HostName;
use mars_storage::real::DIRECT_ALIGN;
use mars_storage::{Dir, File, OpenMode, PooledBuf};
use mars_txlog::{LogError, LogName, LogPos};

use crate::recent::Recent;
use crate::{control, Error, Result};

/// The appender's staging buffer: received bytes are collected here and written in whole
/// aligned pieces of this size past the page cache (O_DIRECT where the filesystem has it).
/// The copy is never read back while replay follows closely (`recent.rs`), and after a restart
/// only sequentially: keeping it in the page cache would only cost a copy into fresh pages.
pub const STAGE: usize = 4 << 20;

/// Received chunks from this size on are written from their own buffer
/// ([`CopyAppender::append_received`]); smaller ones are copied into the staging buffer and
/// written with what follows (one write per [`STAGE`] instead of one per chunk).
pub const DIRECT_CHUNK: usize = 1 << 20;

/// A chunk of a logfile received straight into an aligned buffer from the pool
/// (`mars_storage::pooled`): its data is `buf[lead()..lead() + len]`, placed so that it lies
/// in memory at the same offset within a block as in the copy, and the room before it takes
/// the copy's partial block (see [`CopyAppender::append_received`]).
#[derive(Debug)]
pub struct Received {
    /// Where the data goes in the copy.
    pub offset: u64,
    pub buf: PooledBuf,
    pub len: usize,
    /// The crc32c the data must have: what its wire frame's checksum implies
    /// (`mars_wire::LogDataHead::data_crc`).
    pub data_crc: u32,
}

impl Received {
    /// Where in `buf` the data starts: `offset` modulo the block size.
    pub fn lead(&self) -> usize {
        (self.offset % DIRECT_ALIGN as u64) as usize
    }

    /// A buffer for `len` bytes of data at `offset` of a copy, and where in it they go.
    pub fn buffer(offset: u64, len: usize) -> (PooledBuf, usize) {
        let lead = (offset % DIRECT_ALIGN as u64) as usize;
        (mars_storage::pooled(lead + len), lead)
    }

    /// The data.
    pub fn data(&self) -> &[u8] {
        &self.buf.as_slice()[self.lead()..self.lead() + self.len]
    }
}

/// What is known about one local copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    /// The host that wrote the logfile.
    pub origin: HostName,
    /// Durable (verified, fdatasync'ed) length.
    pub len: u64,
    /// The copy ends at `len`: its end was received, or a later copy exists.
    pub complete: bool,
}

/// A copy that [`Copies::open`] shortened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub name: LogName,
    /// The new length: the end of the valid records.
    pub at: u64,
    /// Bytes removed.
    pub removed: u64,
    /// `None`: a torn tail (nothing valid follows); otherwise the damage that was found at `at`
    /// with valid records after it.
    pub damage: Option<String>,
}

/// What [`Copies::open`] did to the directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The copies had gaps or duplicate numbers: all of them were removed (why, and which).
    pub discarded: Option<(String, Vec<LogName>)>,
    /// Copies cut at the end of their valid records.
    pub cut: Vec<Cut>,
}

/// What [`Copies::cut_for_promotion`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromotionCut {
    /// Copies removed: every one after the position, and the one at it if the position is at
    /// its start.
    pub dropped: Vec<LogName>,
    /// The copy at the position, cut there: its name and the bytes removed.
    pub cut: Option<(LogName, u64)>,
}

/// The local copies of a replica's resource directory.
pub struct Copies {
    dir: Arc<dyn Dir>,
    files: BTreeMap<u64, CopyInfo>,
    /// The bytes just appended, for replay (`recent.rs`); emptied by every cut or removal.
    recent: Arc<Recent>,
}

impl std::fmt::Debug for Copies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copies")
            .field("files", &self.files)
            .finish()
    }
}

fn name_of(no: u64, info: &CopyInfo) -> LogName {
    LogName::new(no, info.origin.clone())
}

impl Copies {
    /// Opens and verifies every copy in `dir`:
    /// - gaps or duplicate numbers: every copy is removed (a full sync or fetching from the
    ///   start follows), reported in [`OpenReport::discarded`];
    /// - a torn tail, or damage with valid records after it: the copy is cut at the end of its
    ///   valid records (fetch continues from there), reported in [`OpenReport::cut`]. Later
    ///   copies stay; every copy but the newest counts as complete;
    /// - a malformed `log-*` name or an I/O error is an error, and nothing is changed.
    pub fn open(dir: Arc<dyn Dir>) -> Result<(Self, OpenReport)> {
        let mut report = OpenReport::default();
        let names = match mars_txlog::list_logs(&*dir) {
            Ok(n) => n,
            Err(e @ (LogError::Gap { .. } | LogError::Duplicate { .. })) => {
                let all = mars_txlog::list_logs_unchecked(&*dir)?;
                for n in all.iter().rev() {
                    let s = n.to_string();
                    dir.remove(&s).map_err(Error::io(&s, "remove"))?;
                }
                dir.sync()
                    .map_err(Error::io("resource directory", "sync"))?;
                report.discarded = Some((e.to_string(), all));
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        let mut files = BTreeMap::new();
        let count = names.len();
        for (i, name) in names.into_iter().enumerate() {
            let s = name.to_string();
            let f = dir
                .open(&s, OpenMode::Existing)
                .map_err(Error::io(&s, "open"))?;
            let flen = f.len().map_err(Error::io(&s, "stat"))?;
            let (valid, damage) = match mars_txlog::check_file(f.clone(), &name) {
                Ok(c) => (c.valid_len, None),
                Err(LogError::Corrupt { offset, reason, .. }) => (offset, Some(reason.to_string())),
                Err(LogError::Sequence {
                    offset,
                    expected,
                    found,
                    ..
                }) => (
                    offset,
                    Some(format!(
                        "sequence number {found} where {expected} was expected"
                    )),
                ),
                Err(e) => return Err(e.into()),
            };
            if valid < flen {
                f.set_len(valid).map_err(Error::io(&s, "truncate"))?;
                f.sync_data().map_err(Error::io(&s, "fdatasync"))?;
                report.cut.push(Cut {
                    name: name.clone(),
                    at: valid,
                    removed: flen - valid,
                    damage,
                });
            }
            files.insert(
                name.no,
                CopyInfo {
                    origin: name.host,
                    len: valid,
                    complete: i + 1 < count,
                },
            );
        }
        Ok((
            Self {
                dir,
                files,
                recent: Arc::default(),
            },
            report,
        ))
    }

    /// The directory the copies live in.
    pub fn dir(&self) -> &Arc<dyn Dir> {
        &self.dir
    }

    /// The bytes just appended, kept for replay.
    pub fn recent(&self) -> &Arc<Recent> {
        &self.recent
    }

    /// Every copy by number.
    pub fn files(&self) -> &BTreeMap<u64, CopyInfo> {
        &self.files
    }

    pub fn get(&self, no: u64) -> Option<&CopyInfo> {
        self.files.get(&no)
    }

    /// The file name of copy `no`.
    pub fn name(&self, no: u64) -> Option<LogName> {
        self.files.get(&no).map(|i| name_of(no, i))
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn oldest(&self) -> Option<u64> {
        self.files.keys().next().copied()
    }

    pub fn newest(&self) -> Option<u64> {
        self.files.keys().next_back().copied()
    }

    /// The durable end of the newest copy: where fetching continues.
    pub fn end(&self) -> Option<LogPos> {
        self.files
            .iter()
            .next_back()
            .map(|(no, i)| LogPos::new(*no, i.len))
    }

    /// Opens copy `no` of `origin` for appending, creating it if it is the next number (or the
    /// first copy). An existing copy continues at its durable length: bytes beyond it (never
    /// synced) are cut, and the sequence number its next record must carry comes from
    /// verifying it. Creating copy N+1 marks copy N complete.
    ///
    /// Errors: [`Error::OtherOrigin`] if copy `no` exists from another origin (replacing an
    /// empty one is [`Copies::remove_empty`]), [`Error::NotNext`] if `no` does not follow the
    /// newest copy, damage found in the existing copy ([`Error::damage_offset`]), I/O.
    pub fn append(&mut self, no: u64, origin: &HostName) -> Result<CopyAppender> {
        let want = LogName::new(no, origin.clone());
        let s = want.to_string();
        if let Some(info) = self.files.get(&no) {
            if info.origin != *origin {
                return Err(Error::OtherOrigin {
                    no,
                    have: name_of(no, info),
                    want,
                });
            }
            let file = self
                .dir
                .open_direct(&s, OpenMode::Existing)
                .map_err(Error::io(&s, "open"))?;
            if file.len().map_err(Error::io(&s, "stat"))? > info.len {
                file.set_len(info.len).map_err(Error::io(&s, "truncate"))?;
                file.sync_data().map_err(Error::io(&s, "fdatasync"))?;
            }
            let next_seq = if info.len == 0 {
                1
            } else {
                let c = mars_txlog::check_file(file.clone(), &want)?;
                if c.valid_len != info.len {
                    return Err(Error::Damaged {
                        name: want,
                        offset: c.valid_len,
                        reason: "the copy ends inside a record".into(),
                    });
                }
                c.last_seq + 1
            };
            return CopyAppender::new(want, file, info.len, next_seq, self.recent.clone());
        }
        let newest = self.newest();
        if let Some(newest) = newest.filter(|n| *n + 1 != no) {
            return Err(Error::NotNext { no, newest });
        }
        let file = self
            .dir
            .open_direct(&s, OpenMode::CreateNew)
            .map_err(Error::io(&s, "create"))?;
        self.dir.sync().map_err(Error::io(&s, "sync directory"))?;
        if let Some(prev) = newest.and_then(|n| self.files.get_mut(&n)) {
            prev.complete = true;
        }
        self.files.insert(
            no,
            CopyInfo {
                origin: origin.clone(),
                len: 0,
                complete: false,
            },
        );
        CopyAppender::new(want, file, 0, 1, self.recent.clone())
    }

    /// Accounts bytes an appender made durable: copy `no` is at least `len` long. False if the
    /// copy is gone (removed behind the appender's back: its bytes no longer count).
    pub fn note_durable(&mut self, no: u64, len: u64) -> bool {
        match self.files.get_mut(&no) {
            Some(i) => {
                i.len = i.len.max(len);
                true
            }
            None => false,
        }
    }

    /// Copy `no` ends at its durable length (the end of the origin's logfile was received).
    pub fn mark_complete(&mut self, no: u64) -> Result<()> {
        let i = self.files.get_mut(&no).ok_or(Error::NoCopy(no))?;
        i.complete = true;
        Ok(())
    }

    /// Removes copy `no` if it holds no byte (an empty copy carries no history), durably.
    pub fn remove_empty(&mut self, no: u64) -> Result<LogName> {
        let i = self.files.get(&no).ok_or(Error::NoCopy(no))?;
        if i.len != 0 {
            return Err(Error::NotEmpty(name_of(no, i)));
        }
        self.remove(no)
    }

    /// Removes copy `no`, durably.
    pub fn remove(&mut self, no: u64) -> Result<LogName> {
        let name = self.name(no).ok_or(Error::NoCopy(no))?;
        self.remove_unsynced(no)?;
        self.sync_dir()?;
        Ok(name)
    }

    fn remove_unsynced(&mut self, no: u64) -> Result<LogName> {
        let name = self.name(no).ok_or(Error::NoCopy(no))?;
        self.recent.clear();
        let s = name.to_string();
        match self.dir.remove(&s) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&s, "remove")(e)),
        }
        self.files.remove(&no);
        Ok(name)
    }

    fn sync_dir(&self) -> Result<()> {
        self.dir
            .sync()
            .map_err(Error::io("resource directory", "sync"))
    }

    /// Removes every copy numbered `from` or higher, newest first, then syncs the directory.
    /// On an error the directory is synced anyway and what remains is a contiguous run.
    fn remove_from(&mut self, from: u64) -> Result<Vec<LogName>> {
        let victims: Vec<u64> = self.files.range(from..).rev().map(|(n, _)| *n).collect();
        let mut removed = Vec::new();
        for no in victims {
            match self.remove_unsynced(no) {
                Ok(n) => removed.push(n),
                Err(e) => {
                    let _ = self.dir.sync(); // best effort: the removal error is the news
                    return Err(e);
                }
            }
        }
        if !removed.is_empty() {
            self.sync_dir()?;
        }
        removed.reverse();
        Ok(removed)
    }

    /// Removes every copy (invalidate, a full sync from scratch, no space), durably. Returns
    /// the names removed, oldest first.
    pub fn remove_all(&mut self) -> Result<Vec<LogName>> {
        self.remove_from(0)
    }

    /// Removes the copies numbered below `below` (reclamation), oldest first, each durably, so
    /// that a crash or an error leaves a contiguous run. Returns the names removed.
    pub fn remove_below(&mut self, below: u64) -> Result<Vec<LogName>> {
        let victims: Vec<u64> = self.files.range(..below).map(|(n, _)| *n).collect();
        let mut removed = Vec::new();
        for no in victims {
            removed.push(self.remove(no)?);
        }
        Ok(removed)
    }

    /// Repair after damage found at `at`: the copies after `at.file` are removed, then copy
    /// `at.file` (if present) is cut at `at.offset` and counts as incomplete, so that fetching
    /// continues there. Returns the names removed. A cut beyond the copy's durable length is
    /// an error ([`Error::CutBeyondEnd`]).
    pub fn truncate(&mut self, at: LogPos) -> Result<Vec<LogName>> {
        if let Some(i) = self.files.get(&at.file) {
            if at.offset > i.len {
                return Err(Error::CutBeyondEnd {
                    name: name_of(at.file, i),
                    at: at.offset,
                    len: i.len,
                });
            }
        }
        let removed = self.remove_from(at.file.saturating_add(1))?;
        self.recent.clear();
        if let Some(name) = self.name(at.file) {
            let s = name.to_string();
            let file = self
                .dir
                .open(&s, OpenMode::Existing)
                .map_err(Error::io(&s, "open"))?;
            file.set_len(at.offset).map_err(Error::io(&s, "truncate"))?;
            file.sync_data().map_err(Error::io(&s, "fdatasync"))?;
            if let Some(i) = self.files.get_mut(&at.file) {
                i.len = at.offset;
                i.complete = false;
            }
        }
        Ok(removed)
    }

    /// Before this directory becomes a primary's: everything after the replay position `at` is
    /// cut off, so the volume continues exactly from what the disk holds, and `at` is persisted
    /// as the position. In this order, each step durable before the next:
    ///
    /// 1. the copies after `at.file` are removed (newest first, one directory sync);
    /// 2. copy `at.file` is removed if `at.offset` is 0 (directory sync), else cut at
    ///    `at.offset` if longer (fdatasync);
    /// 3. `at` is written as the replay position.
    ///
    /// **Crash rule.** A crash at any point leaves a directory that, reopened, is one of:
    /// the old copies; the old copies without those after `at.file`; the cut copies (with the
    /// old or the new position file). In none of them is a shortened copy followed by a later
    /// one, and calling `cut_for_promotion(at)` again on it gives exactly the cut result: an
    /// interrupted cut is finished by repeating it (the daemon does: the `replica` marker is
    /// removed only after the cut returned).
    pub fn cut_for_promotion(&mut self, at: LogPos) -> Result<PromotionCut> {
        let mut out = PromotionCut {
            dropped: self.remove_from(at.file.saturating_add(1))?,
            cut: None,
        };
        self.recent.clear();
        if let Some(name) = self.name(at.file) {
            let s = name.to_string();
            if at.offset == 0 {
                out.dropped.push(self.remove(at.file)?);
            } else {
                let file = self
                    .dir
                    .open(&s, OpenMode::Existing)
                    .map_err(Error::io(&s, "open"))?;
                let len = file.len().map_err(Error::io(&s, "stat"))?;
                if len > at.offset {
                    file.set_len(at.offset).map_err(Error::io(&s, "truncate"))?;
                    file.sync_data().map_err(Error::io(&s, "fdatasync"))?;
                    out.cut = Some((name, len - at.offset));
                }
                if let Some(i) = self.files.get_mut(&at.file) {
                    i.len = i.len.min(at.offset);
                }
            }
        }
        control::write_position(&*self.dir, at)?;
        Ok(out)
    }
}

/// When a primary leaves its role: removes the newest logfile of `dir` if `origin` wrote it and
/// it is empty (a logfile started but never written to is no history; kept, the next primary's
/// logfile with the same number would look like a fork), durably. Returns its name if removed.
pub fn drop_empty_tail(dir: &dyn Dir, origin: &HostName) -> Result<Option<LogName>> {
    let Some(last) = mars_txlog::list_logs_unchecked(dir)?.pop() else {
        return Ok(None);
    };
    if last.host != *origin {
        return Ok(None);
    }
    let s = last.to_string();
    let f = dir
        .open(&s, OpenMode::Existing)
        .map_err(Error::io(&s, "open"))?;
    if f.len().map_err(Error::io(&s, "stat"))? != 0 {
        return Ok(None);
    }
    drop(f);
    dir.remove(&s).map_err(Error::io(&s, "remove"))?;
    dir.sync().map_err(Error::io(&s, "sync directory"))?;
    Ok(Some(last))
}

/// Appends verified records to one copy. Obtained from [`Copies::append`]; it does not borrow
/// the [`Copies`], so receiving can go on while others look at them. The durable length it
/// reaches is reported back with [`Copies::note_durable`].
///
/// Writing: the bytes go into an aligned staging buffer ([`STAGE`]) that is written in whole
/// blocks past the page cache as it fills; [`CopyAppender::pending_sync`] first writes what the
/// buffer holds (the partial last block through the page cache; it stays in the buffer and is
/// written again, whole, once it fills up). So a sync covers every byte appended before it,
/// as with plain writes.
pub struct CopyAppender {
    name: LogName,
    file: Arc<dyn File>,
    /// End of what was appended (durable or not).
    end: u64,
    /// Sequence number the next record must carry.
    next_seq: u64,
    /// Staged bytes: `stage[..staged]` are the copy's bytes `[stage_at, end)`; `stage_at` is
    /// aligned. Those before `written` are in the file already.
    stage: PooledBuf,
    stage_at: u64,
    staged: usize,
    written: u64,
    recent: Arc<Recent>,
}

impl std::fmt::Debug for CopyAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyAppender")
            .field("name", &self.name)
            .field("end", &self.end)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl CopyAppender {
    fn new(
        name: LogName,
        file: Arc<dyn File>,
        end: u64,
        next_seq: u64,
        recent: Arc<Recent>,
    ) -> Result<Self> {
        // From the pool: a copy is appended to by every fetch session and every logfile.
        let mut stage = mars_storage::pooled(STAGE);
        // Continuing a copy: its partial last block goes into the buffer, so that the whole
        // block can be written again.
        let stage_at = mars_storage::align_down(end);
        let staged = (end - stage_at) as usize;
        file.read_exact_at(&mut stage.as_mut_slice()[..staged], stage_at)
            .map_err(Error::io(name.to_string(), "read"))?;
        Ok(Self {
            name,
            file,
            end,
            next_seq,
            stage,
            stage_at,
            staged,
            written: end,
            recent,
        })
    }

    pub fn name(&self) -> &LogName {
        &self.name
    }

    /// The end of what was appended so far (durable or not): where the next chunk goes.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The sequence number the next record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Verifies a chunk on arrival and writes it: it must start at [`Self::end`]
    /// ([`Error::WrongOffset`]), hold whole records ([`Error::NotWhole`]) with valid checksums
    /// and sequence numbers continuing the copy's ([`Error::Damaged`], at the offset in the
    /// copy). Nothing is written unless the whole chunk passes. Not durable until synced.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.append_verified(offset, data)
    }

    /// [`CopyAppender::append`] of a received chunk that replay may take from memory
    /// afterwards (`recent.rs`) instead of reading it back.
    pub fn append_shared(&mut self, offset: u64, data: Bytes) -> Result<()> {
        self.append_verified(offset, &data)?;
        self.recent.push(self.name.no, offset, data);
        Ok(())
    }

    /// [`CopyAppender::append_shared`] of a chunk received straight into an aligned buffer
    /// ([`Received`]): verified as there, and also against the checksum its wire frame
    /// implies ([`Error::FrameChecksum`]), from the same single pass over the data. A large
    /// chunk is then written from its own buffer: only the partial block before it is copied
    /// in front of it (the room `Received::lead` leaves), the whole blocks go to the file
    /// O_DIRECT, and the new partial block at its end is staged for the next write. The buffer
    /// itself becomes the window's bytes (`recent.rs`) and goes back to its pool when replay is
    /// done with it. Nothing is written unless the whole chunk passes.
    pub fn append_received(&mut self, mut chunk: Received) -> Result<()> {
        let (offset, lead, len) = (chunk.offset, chunk.lead(), chunk.len);
        if lead + len > chunk.buf.len() {
            return Err(Error::NotWhole {
                name: self.name.clone(),
                offset,
                len,
            });
        }
        let data = &chunk.buf.as_slice()[lead..lead + len];
        let (scan, crc) = self.verify(offset, data)?;
        if crc != chunk.data_crc {
            return Err(Error::FrameChecksum {
                name: self.name.clone(),
                offset,
            });
        }
        if len < DIRECT_CHUNK {
            self.stage_copy(data)?;
        } else {
            // Only the partial block before the chunk stays staged (`stage_at` aligned, its
            // bytes in the file already): it goes in front of the chunk, so that the whole
            // blocks are written from where they were received.
            if self.written < self.end {
                self.write_staged()?;
            }
            debug_assert_eq!(self.stage_at + self.staged as u64, self.end);
            debug_assert_eq!(self.staged, lead);
            let buf = chunk.buf.as_mut_slice();
            buf[..lead].copy_from_slice(&self.stage.as_slice()[..lead]);
            let to = lead + len;
            mars_storage::write_split(&*self.file, buf, self.stage_at, 0, to)
                .map_err(Error::io(self.name.to_string(), "write"))?;
            let whole = mars_storage::align_down(to as u64) as usize;
            self.stage.as_mut_slice()[..to - whole].copy_from_slice(&buf[whole..to]);
            self.stage_at += whole as u64;
            self.staged = to - whole;
            self.written = self.end + len as u64;
        }
        self.end += len as u64;
        if let Some(last) = scan.last_seq {
            self.next_seq = last + 1;
        }
        let bytes = Bytes::from_owner(chunk.buf).slice(lead..lead + len);
        self.recent.push(self.name.no, offset, bytes);
        Ok(())
    }

    /// Checks that `data` continues the copy at `offset` with whole, valid records; returns
    /// what the scan found and the crc32c of `data`.
    fn verify(&self, offset: u64, data: &[u8]) -> Result<(mars_txlog::format::Scanned, u32)> {
        if offset != self.end {
            return Err(Error::WrongOffset {
                name: self.name.clone(),
                offset,
                end: self.end,
            });
        }
        let (scan, crc) =
            mars_txlog::format::scan_crc(data, Some(self.next_seq)).map_err(|(at, reason)| {
                Error::Damaged {
                    name: self.name.clone(),
                    offset: offset + at as u64,
                    reason,
                }
            })?;
        if scan.len != data.len() {
            return Err(Error::NotWhole {
                name: self.name.clone(),
                offset,
                len: data.len(),
            });
        }
        Ok((scan, crc))
    }

    fn append_verified(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let (scan, _) = self.verify(offset, data)?;
        self.stage_copy(data)?;
        self.end += data.len() as u64;
        if let Some(last) = scan.last_seq {
            self.next_seq = last + 1;
        }
        Ok(())
    }

    /// Copies verified bytes that continue the copy into the staging buffer, writing it
    /// whenever it fills (`end` is the caller's to advance).
    fn stage_copy(&mut self, data: &[u8]) -> Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            let room = self.stage.len() - self.staged;
            let n = room.min(rest.len());
            self.stage.as_mut_slice()[self.staged..self.staged + n].copy_from_slice(&rest[..n]);
            self.staged += n;
            rest = &rest[n..];
            if self.staged == self.stage.len() {
                self.write_staged()?;
            }
        }
        Ok(())
    }

    /// Writes the staged bytes not in the file yet (whole blocks direct, a partial last block
    /// buffered) and keeps only that partial block staged.
    fn write_staged(&mut self) -> Result<()> {
        let from = (self.written - self.stage_at) as usize;
        // A block written partially before is written again whole: start at its beginning.
        let from = mars_storage::align_down(from as u64) as usize;
        mars_storage::write_split(
            &*self.file,
            self.stage.as_slice(),
            self.stage_at,
            from,
            self.staged,
        )
        .map_err(Error::io(self.name.to_string(), "write"))?;
        self.written = self.stage_at + self.staged as u64;
        let whole = mars_storage::align_down(self.staged as u64) as usize;
        if whole > 0 {
            self.stage.as_mut_slice().copy_within(whole..self.staged, 0);
            self.stage_at += whole as u64;
            self.staged -= whole;
        }
        Ok(())
    }

    /// Makes everything appended so far durable; returns the new durable length.
    pub fn sync(&mut self) -> Result<u64> {
        self.pending_sync()?.run()
    }

    /// The same sync, detached from the appender so that it can run on another thread while
    /// appending goes on; it covers what was appended up to now (written to the file here).
    pub fn pending_sync(&mut self) -> Result<CopySync> {
        if self.written < self.end {
            self.write_staged()?;
        }
        Ok(CopySync {
            name: self.name.clone(),
            file: self.file.clone(),
            upto: self.end,
        })
    }
}

/// An `fdatasync` of a copy up to a length (see [`CopyAppender::pending_sync`]).
pub struct CopySync {
    name: LogName,
    file: Arc<dyn File>,
    upto: u64,
}

impl CopySync {
    pub fn name(&self) -> &LogName {
        &self.name
    }

    /// The durable length once [`Self::run`] returns.
    pub fn upto(&self) -> u64 {
        self.upto
    }

    /// Syncs; returns the durable length.
    pub fn run(self) -> Result<u64> {
        self.file
            .sync_data()
            .map_err(Error::io(self.name.to_string(), "fdatasync"))?;
        Ok(self.upto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mars_storage::mem::MemDir;
    use mars_txlog::format::{encode, Header};
    use mars_txlog::Kind;

    fn host(s: &str) -> HostName {
        HostName::new(s).unwrap()
    }

    /// Records `first..first+n` (sequence numbers), 16-byte writes.
    fn records(first: u64, n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in first..first + n {
            let h = Header {
                kind: Kind::Write,
                seq,
                stamp: seq,
                offset: seq * 16,
                len: 16,
            };
            encode(&h, &[seq as u8; 16], &mut out).unwrap();
        }
        out
    }

    fn open(d: &MemDir) -> (Copies, OpenReport) {
        Copies::open(Arc::new(d.clone())).unwrap()
    }

    #[test]
    fn append_sync_reopen() {
        let d = MemDir::new();
        let (mut c, rep) = open(&d);
        assert_eq!(rep, OpenReport::default());
        let a = host("alpha");
        let mut w = c.append(3, &a).unwrap();
        let r = records(1, 4);
        w.append(0, &r[..128]).unwrap();
        w.append(128, &r[128..]).unwrap();
        assert_eq!(w.next_seq(), 5);
        let len = w.sync().unwrap();
        assert_eq!(len, r.len() as u64);
        assert!(c.note_durable(3, len));
        assert_eq!(c.end(), Some(LogPos::new(3, len)));
        // The next number marks the previous complete; anything else is refused.
        assert!(matches!(
            c.append(5, &a),
            Err(Error::NotNext { no: 5, newest: 3 })
        ));
        assert!(matches!(
            c.append(3, &host("beta")),
            Err(Error::OtherOrigin { no: 3, .. })
        ));
        let _w4 = c.append(4, &a).unwrap();
        assert!(c.get(3).unwrap().complete);
        assert!(!c.get(4).unwrap().complete);
        // Reopened: the same, and appending to 3 continues its sequence.
        let (mut c2, rep) = open(&d);
        assert_eq!(rep, OpenReport::default());
        assert_eq!(c2.files(), c.files());
        let mut w = c2.append(3, &a).unwrap();
        assert_eq!((w.end(), w.next_seq()), (len, 5));
        w.append(len, &records(5, 1)).unwrap();
    }

    #[test]
    fn chunks_are_verified_on_arrival() {
        let d = MemDir::new();
        let (mut c, _) = open(&d);
        let mut w = c.append(1, &host("alpha")).unwrap();
        let r = records(1, 3);
        // Wrong offset.
        assert!(matches!(
            w.append(10, &r),
            Err(Error::WrongOffset {
                offset: 10,
                end: 0,
                ..
            })
        ));
        // Not whole records.
        assert!(matches!(
            w.append(0, &r[..r.len() - 1]),
            Err(Error::NotWhole { .. })
        ));
        // A bad checksum in the second record.
        let mut bad = r.clone();
        bad[64 + 60] ^= 1;
        let e = w.append(0, &bad).unwrap_err();
        assert_eq!(e.damage_offset(), Some(64), "{e}");
        // Wrong sequence number.
        assert!(matches!(
            w.append(0, &records(2, 1)),
            Err(Error::Damaged { offset: 0, .. })
        ));
        // Nothing of the refused chunks was written.
        assert_eq!(d.contents("log-000000001-alpha").unwrap(), b"");
        w.append(0, &r).unwrap();
        assert!(matches!(
            w.append(r.len() as u64, &records(1, 1)),
            Err(Error::Damaged { .. })
        ));
    }

    #[test]
    fn open_cuts_torn_tails_and_damage_and_discards_gaps() {
        let d = MemDir::new();
        let r = records(1, 4);
        d.write_atomic("log-000000001-alpha", &r).unwrap();
        // Damage in the middle of copy 2: valid records follow.
        let mut bad = r.clone();
        bad[64 + 60] ^= 1;
        d.write_atomic("log-000000002-alpha", &bad).unwrap();
        // A torn tail on copy 3.
        d.write_atomic("log-000000003-alpha", &r[..r.len() - 5])
            .unwrap();
        let (c, rep) = open(&d);
        assert_eq!(rep.discarded, None);
        assert_eq!(rep.cut.len(), 2);
        assert_eq!((rep.cut[0].name.no, rep.cut[0].at), (2, 64));
        assert!(rep.cut[0].damage.is_some());
        assert_eq!((rep.cut[1].name.no, rep.cut[1].at), (3, 192));
        assert_eq!(rep.cut[1].damage, None);
        assert_eq!(c.get(2).unwrap().len, 64);
        assert!(c.get(2).unwrap().complete);
        assert!(!c.get(3).unwrap().complete);
        assert_eq!(d.contents("log-000000003-alpha").unwrap().len(), 192);
        // A gap: everything goes.
        d.write_atomic("log-000000005-alpha", &r).unwrap();
        let (c, rep) = open(&d);
        assert!(c.is_empty());
        assert_eq!(rep.discarded.unwrap().1.len(), 4);
        assert!(d.list().unwrap().iter().all(|n| !n.starts_with("log-")));
        // A malformed name is an error, and nothing is removed.
        d.write_atomic("log-000000001-alpha", &r).unwrap();
        d.write_atomic("log-1-alpha", b"").unwrap();
        assert!(matches!(
            Copies::open(Arc::new(d.clone())),
            Err(Error::Log(LogError::BadName(_)))
        ));
        assert!(d.contents("log-000000001-alpha").is_some());
    }

    #[test]
    fn removal_and_cuts() {
        let d = MemDir::new();
        let (mut c, _) = open(&d);
        let a = host("alpha");
        for no in 1..=5 {
            let mut w = c.append(no, &a).unwrap();
            w.append(0, &records(1, 3)).unwrap();
            let len = w.sync().unwrap();
            c.note_durable(no, len);
        }
        // Empty copies only.
        assert!(matches!(c.remove_empty(5), Err(Error::NotEmpty(_))));
        // Repair: cut 3 at 64, drop 4 and 5.
        assert!(matches!(
            c.truncate(LogPos::new(3, 1000)),
            Err(Error::CutBeyondEnd { .. })
        ));
        let removed = c.truncate(LogPos::new(3, 64)).unwrap();
        assert_eq!(removed.iter().map(|n| n.no).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(c.get(3).unwrap().len, 64);
        assert!(!c.get(3).unwrap().complete);
        let mut w = c.append(3, &a).unwrap();
        assert_eq!(w.next_seq(), 2);
        w.append(64, &records(2, 1)).unwrap();
        assert_eq!(
            c.remove_below(3)
                .unwrap()
                .iter()
                .map(|n| n.no)
                .collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(c.oldest(), Some(3));
        // After a crash now: the unsynced append is gone.
        let (c2, _) = open(&MemDir::from_image(&d.crash_image()));
        assert_eq!(c2.files().keys().copied().collect::<Vec<_>>(), [3]);
        assert_eq!(c2.get(3).unwrap().len, 64);
        assert_eq!(c.remove_all().unwrap().len(), 1);
        assert!(c.is_empty());
        let (c3, _) = open(&d);
        assert!(c3.is_empty());
        assert!(matches!(c.remove(3), Err(Error::NoCopy(3))));
        assert!(matches!(c.mark_complete(3), Err(Error::NoCopy(3))));
    }

    #[test]
    fn empty_own_tail() {
        let d = MemDir::new();
        let (mut c, _) = open(&d);
        let a = host("alpha");
        let mut w = c.append(1, &a).unwrap();
        w.append(0, &records(1, 1)).unwrap();
        w.sync().unwrap();
        assert_eq!(drop_empty_tail(&d, &a).unwrap(), None, "not empty");
        c.append(2, &a).unwrap();
        assert_eq!(
            drop_empty_tail(&d, &host("beta")).unwrap(),
            None,
            "not ours"
        );
        assert_eq!(drop_empty_tail(&d, &a).unwrap().map(|n| n.no), Some(2));
        let (c, _) = open(&MemDir::from_image(&d.crash_image()));
        assert_eq!(c.newest(), Some(1));
    }

    #[test]
    fn promotion_cut() {
        let d = MemDir::new();
        let (mut c, _) = open(&d);
        let a = host("alpha");
        for no in 1..=3 {
            let mut w = c.append(no, &a).unwrap();
            w.append(0, &records(1, 3)).unwrap();
            let len = w.sync().unwrap();
            c.note_durable(no, len);
        }
        let cut = c.cut_for_promotion(LogPos::new(2, 64)).unwrap();
        assert_eq!(cut.dropped.iter().map(|n| n.no).collect::<Vec<_>>(), [3]);
        assert_eq!(cut.cut.as_ref().map(|(n, b)| (n.no, *b)), Some((2, 128)));
        assert_eq!(
            control::read_position(&d).unwrap(),
            Some(LogPos::new(2, 64))
        );
        // At the start of a copy, the copy goes too.
        let cut = c.cut_for_promotion(LogPos::new(2, 0)).unwrap();
        assert_eq!(cut.dropped.iter().map(|n| n.no).collect::<Vec<_>>(), [2]);
        assert_eq!(c.newest(), Some(1));
    }
}
