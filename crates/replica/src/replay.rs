//! Replay: applying the records of a local copy onto the disk, and persisting how far.
//!
//! The position (`writeback`, [`crate::control::write_position`]) is persisted only after the
//! disk's `fdatasync` covered every record before it, so a crash never leaves a position that
//! claims records whose data is not durable on the disk; replaying again from the persisted
//! position (the records are idempotent, applied in log order) reproduces the result.

use mars_storage::{Dir, File, OpenMode};
use mars_txlog::{LogName, LogPos, LogReader};

use crate::{control, Error, Result};

/// Replay syncs the disk and persists its position at least every this many bytes of log.
pub const REPLAY_BATCH: u64 = 64 << 20;
/// `should_stop` is asked, and [`ReplayEvent::Applied`] reported, about every this many bytes.
pub const REPLAY_CHECK: u64 = 1 << 20;

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
        }
    }

    /// Applies the records `[from, to)` of the copy `name` onto the disk, in order and
    /// verified again while read. Every `batch` bytes, at the end, and when `should_stop`
    /// (asked about every `check` bytes) says so, the disk is synced and then the position
    /// persisted ([`ReplayEvent::Persisted`]). Returns the position reached (persisted).
    ///
    /// Damage in the copy is an error with [`Error::damage_offset`] (`LogError::Corrupt` or
    /// `Sequence`): the caller may cut the copy there and fetch it again. What was applied
    /// before the damage is not persisted by this call; the position stays at the last
    /// persisted one. A record beyond the device ([`Error::BeyondDevice`]) is not applied; what
    /// came before it is persisted first.
    pub fn apply(
        &self,
        name: &LogName,
        from: u64,
        to: u64,
        should_stop: &mut dyn FnMut() -> bool,
        progress: &mut dyn FnMut(ReplayEvent),
    ) -> Result<LogPos> {
        let s = name.to_string();
        let f = self
            .dir
            .open(&s, OpenMode::Existing)
            .map_err(Error::io(&s, "open"))?;
        let mut r = LogReader::new(f, name, from, to, None);
        let mut pos = from;
        let mut batch = 0u64;
        let mut unreported = 0u64;
        let mut persisted = None;
        let persist = |pos: u64, progress: &mut dyn FnMut(ReplayEvent)| -> Result<LogPos> {
            self.disk.sync_data().map_err(|source| Error::Disk {
                op: "fdatasync",
                offset: 0,
                source,
            })?;
            let p = LogPos::new(name.no, pos);
            control::write_position(self.dir, p)?;
            progress(ReplayEvent::Persisted(p));
            Ok(p)
        };
        while let Some(rec) = r.next_ref()? {
            let end = rec.header.offset.checked_add(rec.header.len);
            if end.is_none_or(|e| e > self.size) {
                if pos > from && persisted.is_none_or(|p: LogPos| p.offset < pos) {
                    persist(pos, progress)?;
                }
                return Err(Error::BeyondDevice {
                    name: name.clone(),
                    at: pos,
                    end: end.unwrap_or(u64::MAX),
                    size: self.size,
                });
            }
            mars_volume::apply(
                self.disk,
                rec.header.kind,
                rec.header.offset,
                rec.header.len,
                rec.payload,
            )
            .map_err(|e| match e {
                mars_volume::VolumeError::Disk { op, offset, source } => {
                    Error::Disk { op, offset, source }
                }
                other => Error::Disk {
                    op: "write",
                    offset: rec.header.offset,
                    source: std::io::Error::other(other.to_string()),
                },
            })?;
            let n = rec.header.record_len() as u64;
            pos += n;
            batch += n;
            unreported += n;
            if unreported >= self.check {
                progress(ReplayEvent::Applied(unreported));
                unreported = 0;
                if should_stop() {
                    return persist(pos, progress);
                }
            }
            if batch >= self.batch {
                persisted = Some(persist(pos, progress)?);
                batch = 0;
            }
        }
        if unreported > 0 {
            progress(ReplayEvent::Applied(unreported));
        }
        match persisted {
            // A batch ended right at the end: nothing new to persist.
            Some(p) if p.offset == pos => Ok(p),
            _ => persist(pos, progress),
        }
    }
}
