//! The transaction log of one resource.
//!
//! Every write to a replicated device becomes a record appended to the current logfile
//! `log-<9-digit number>-<host>` in `ROOT/resource-RES/`. The log is the unit of durability (a
//! FLUSH syncs the log, not the disk), of crash recovery (replay from the persisted writeback
//! position) and, later, of replication (secondaries fetch logfiles and replay them).
//!
//! * [`format`]: the record layout, byte by byte, encode and decode;
//! * [`name`]: logfile names and log positions;
//! * [`writer`]: the group-commit [`Appender`] with rotation;
//! * [`reader`]: the verifying [`LogReader`] and the whole-file check;
//! * `recent`: the newest group commits' records in memory, for fetch streams that follow;
//! * [`recover`]: what happens when a resource is opened after a stop or a crash.

pub mod format;
pub mod name;
pub mod reader;
mod recent;
mod segment;
pub mod workers;
pub mod writer;

mod error;

use std::sync::Arc;

use mars_storage::{Dir, OpenMode};

pub use error::LogError;
pub use format::{DecodeError, Header, Kind};
pub use name::{LogName, LogPos, MAX_LOG_NO};
pub use reader::{check_file, FileCheck, LogReader, Record, RecordRef};
pub use recent::{RECENT_CAP, WANTED_FOR};
pub use writer::{system_clock, Appended, Appender, AppenderConfig, Clock};

/// The logfiles in `dir`, sorted, without checking the sequence (for cleaning up around a
/// deliberate hole).
pub fn list_logs_unchecked(dir: &dyn Dir) -> Result<Vec<LogName>, LogError> {
    let mut out = Vec::new();
    for n in dir.list().map_err(LogError::io("log directory", "list"))? {
        if let Some(ln) = LogName::parse(&n).map_err(LogError::BadName)? {
            out.push(ln);
        }
    }
    out.sort();
    Ok(out)
}

/// The logfiles of a directory, sorted by number. Malformed `log-*` names are errors; other
/// files are ignored; gaps and duplicate numbers are errors.
pub fn list_logs(dir: &dyn Dir) -> Result<Vec<LogName>, LogError> {
    let out = list_logs_unchecked(dir)?;
    for w in out.windows(2) {
        if w[0].no == w[1].no {
            return Err(LogError::Duplicate {
                no: w[0].no,
                a: w[0].to_string(),
                b: w[1].to_string(),
            });
        }
        if w[1].no != w[0].no + 1 {
            return Err(LogError::Gap {
                prev: w[0].to_string(),
                next: w[1].to_string(),
            });
        }
    }
    Ok(out)
}

/// The result of [`recover`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Every logfile, verified, oldest first.
    pub files: Vec<FileCheck>,
    /// A torn tail that was cut off the newest logfile: (file, bytes removed).
    pub truncated: Option<(LogName, u64)>,
}

impl Recovered {
    /// The number the next logfile gets (1 for an empty log).
    pub fn next_file_no(&self) -> u64 {
        self.files.last().map_or(1, |f| f.name.no + 1)
    }
    /// Position after the last valid record.
    pub fn end(&self) -> LogPos {
        self.files
            .last()
            .map_or(LogPos::ZERO, |f| LogPos::new(f.name.no, f.valid_len))
    }
    /// Newest Lamport stamp found.
    pub fn last_stamp(&self) -> u64 {
        self.files.iter().map(|f| f.last_stamp).max().unwrap_or(0)
    }
}

/// Verifies every logfile of `dir`. A torn tail of the newest logfile (the crash hit while a group
/// was being written) is cut off silently (well, at `info` level); damage anywhere else, or a
/// missing piece of an older logfile, is an error naming the file and offset, and nothing is
/// changed. After a successful check the space reserved beyond each logfile's end is given back
/// (no byte changes; appending never continues in a recovered logfile).
pub fn recover(dir: &dyn Dir) -> Result<Recovered, LogError> {
    let names = list_logs(dir)?;
    let mut files = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let f = dir
            .open(&name.to_string(), OpenMode::Existing)
            .map_err(LogError::io(name.to_string(), "open"))?;
        let check = check_file(f, name)?;
        if check.torn_bytes > 0 && i + 1 != names.len() {
            return Err(LogError::TruncatedMiddle {
                file: name.to_string(),
                offset: check.valid_len,
            });
        }
        files.push(check);
    }
    let mut truncated = None;
    if let Some(last) = files.last() {
        if last.torn_bytes > 0 {
            let n = last.name.to_string();
            let f = dir
                .open(&n, OpenMode::Existing)
                .map_err(LogError::io(&n, "open"))?;
            f.set_len(last.valid_len)
                .map_err(LogError::io(&n, "truncate"))?;
            f.sync_data().map_err(LogError::io(&n, "fdatasync"))?;
            tracing::info!(
                "{n}: cut off a torn tail of {} bytes at offset {}",
                last.torn_bytes,
                last.valid_len
            );
            truncated = Some((last.name.clone(), last.torn_bytes));
        }
    }
    if let Some(last) = files.last_mut() {
        last.torn_bytes = 0;
    }
    // Appending never continues in a recovered logfile (the appender starts a new one), so the
    // space reserved beyond their ends goes back: after a crash, or from a version that kept it.
    for fc in &files {
        if let Ok(f) = dir.open(&fc.name.to_string(), OpenMode::Existing) {
            f.release_reserve();
        }
    }
    Ok(Recovered { files, truncated })
}

/// Calls `f` for every record at or after `from`, in log order, with the record's position.
/// Records are verified again while read.
pub fn replay<E: From<LogError>>(
    dir: &dyn Dir,
    rec: &Recovered,
    from: LogPos,
    mut f: impl FnMut(LogPos, &Record) -> Result<(), E>,
) -> Result<(), E> {
    for fc in rec.files.iter().filter(|fc| fc.name.no >= from.file) {
        let start = if fc.name.no == from.file {
            from.offset
        } else {
            0
        };
        if start >= fc.valid_len {
            continue;
        }
        let n = fc.name.to_string();
        let file = dir
            .open(&n, OpenMode::Existing)
            .map_err(LogError::io(&n, "open"))?;
        let mut r = LogReader::new(file, &fc.name, start, fc.valid_len, None);
        while let Some(record) = r.next_record()? {
            f(LogPos::new(fc.name.no, record.file_offset), &record)?;
        }
    }
    Ok(())
}

/// Removes a logfile (log reclamation). The directory is synced so the removal is durable.
pub fn remove_log(dir: &dyn Dir, name: &LogName) -> Result<(), LogError> {
    let n = name.to_string();
    dir.remove(&n).map_err(LogError::io(&n, "remove"))?;
    dir.sync().map_err(LogError::io(&n, "sync directory"))
}

/// Keeps `Arc` imports honest for downstream users that hold directories as trait objects.
pub type SharedDir = Arc<dyn Dir>;
