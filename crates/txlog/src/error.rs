use std::io;

use crate::format::{DecodeError, EncodeError};

/// Errors of the transaction log. Every variant names the logfile (and offset) it is about, so
/// that the operator's message says where to look.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{file}: {op}: {source}")]
    Io {
        file: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{file}: corrupt record at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: DecodeError,
    },
    #[error("{file}: record at offset {offset} has sequence number {found}, expected {expected}")]
    Sequence {
        file: String,
        offset: u64,
        expected: u64,
        found: u64,
    },
    #[error(
        "{file}: logfile ends inside a record at offset {offset} although a later logfile exists"
    )]
    TruncatedMiddle { file: String, offset: u64 },
    #[error("logfile numbers are not contiguous: {prev} is followed by {next}")]
    Gap { prev: String, next: String },
    #[error("two logfiles carry number {no}: {a} and {b}")]
    Duplicate { no: u64, a: String, b: String },
    #[error("{0}")]
    BadName(String),
    #[error("invalid record: {0}")]
    Encode(#[from] EncodeError),
    #[error("logfile number {0} exceeds the 9-digit limit")]
    Exhausted(u64),
    #[error("the log writer stopped after an error: {0}")]
    Failed(String),
    /// The filesystem holding the log is full (ENOSPC, EDQUOT): nothing more can be appended
    /// until the log restarts after a hole ([`crate::Appender::rotate_skipping`]). Records
    /// appended but not yet durable are lost to the log; their owner still holds them (the
    /// volume writes them to its disk: emergency mode).
    #[error("the log is out of space: {0}")]
    Full(String),
    #[error("the log is closed")]
    Closed,
}

impl LogError {
    /// An I/O error that says the filesystem is full (ENOSPC, or the quota's EDQUOT): MARS
    /// answers it with emergency mode, not with failed writes.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, LogError::Io { source, .. } if mars_storage::out_of_space(source))
    }

    pub(crate) fn io(file: impl Into<String>, op: &'static str) -> impl FnOnce(io::Error) -> Self {
        let file = file.into();
        move |source| LogError::Io { file, op, source }
    }
}
