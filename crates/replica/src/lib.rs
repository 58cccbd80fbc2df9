//! A secondary's local state on this host, and the control files of a resource directory:
//! verified copies of the primary's logfiles, replay onto the disk, and every file that decides
//! what a restart does.
//!
//! ```text
//!  ROOT/resource-RES/
//!    log-NNNNNNNNN-ORIGIN   verified copies of the origin's logfiles        (copies.rs)
//!    writeback              replay position (the primary's writeback format) (control.rs, replay.rs)
//!    sync.toml              a pending or running full sync                    (control.rs, sync.rs)
//!    needs-sync             why only a full sync helps                        (control.rs)
//!    replica                marker: the directory holds a replica             (control.rs)
//!    force-primary          marker: a forced switch is pending here           (control.rs)
//!    emergency              marker: the primary is in emergency mode          (control.rs)
//!    chain-start            where this host's log continued after a hole      (control.rs)
//! ```
//!
//! Every I/O goes through [`mars_storage::Dir`] and [`mars_storage::File`], so the crash tests
//! (`tests/crash.rs`) run each operation against `mars_storage::mem` and reopen every crash
//! image. Nothing here decides *what* to do (which copy to accept, when to repair, when a sync
//! starts): the caller decides and calls the operations, which check their preconditions and
//! return typed errors. No threads, no clock, no sockets.
//!
//! Durability rules kept by every operation:
//! - a control file is replaced atomically and durably (temporary file, fdatasync, rename,
//!   directory sync) or removed durably (remove, directory sync); every failure is an error;
//! - a copy's durable length only counts bytes after their `fdatasync`;
//! - replay syncs the disk before it persists a position past the records it applied.

pub mod control;
pub mod copies;
pub mod recent;
pub mod replay;
pub mod sync;

use std::io;

use mars_txlog::{LogError, LogName};

pub use control::{ControlState, Marker, SyncFile};
pub use copies::{
    Copies, CopyAppender, CopyInfo, CopySync, Cut, OpenReport, PromotionCut, Received,
};
pub use recent::Recent;
pub use replay::{Replay, ReplayEvent};

/// Everything that can go wrong here. Every variant names the file (or copy) it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// I/O on a named file of the resource directory (or on the directory itself) failed.
    #[error("{file}: {op}: {source}")]
    Io {
        file: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A control file exists but its content cannot be understood.
    #[error("{file} is malformed: {reason}")]
    Malformed { file: &'static str, reason: String },
    /// From the log layer: damage found while reading a copy (`Corrupt` and `Sequence` carry
    /// the offset, see [`Error::damage_offset`]), a malformed logfile name, or log I/O.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The backing disk refused a read, write or sync.
    #[error("disk: {op} at offset {offset}: {source}")]
    Disk {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// A new copy must continue the newest one.
    #[error("log {no} cannot follow the newest local copy (log {newest})")]
    NotNext { no: u64, newest: u64 },
    /// A copy with this number exists, written by another origin.
    #[error("log {no}: the local copy is {have}, not {want}")]
    OtherOrigin {
        no: u64,
        have: LogName,
        want: LogName,
    },
    /// There is no local copy of this logfile.
    #[error("no local copy of log {0}")]
    NoCopy(u64),
    /// Only an empty copy may be replaced.
    #[error("the local copy {0} is not empty")]
    NotEmpty(LogName),
    /// Data must continue exactly at the end of the copy.
    #[error("{name}: data for offset {offset}, but the copy ends at {end}")]
    WrongOffset {
        name: LogName,
        offset: u64,
        end: u64,
    },
    /// Records that fail verification (checksum, format, sequence number) at `offset` of the
    /// copy.
    #[error("{name}: damaged at offset {offset}: {reason}")]
    Damaged {
        name: LogName,
        offset: u64,
        reason: String,
    },
    /// A chunk must hold whole records.
    #[error("{name}: {len} bytes at offset {offset} are not whole records")]
    NotWhole {
        name: LogName,
        offset: u64,
        len: usize,
    },
    /// A received chunk's records are intact but its wire frame's checksum does not match
    /// them: the frame was damaged on its way (or the sender is broken). Nothing was written.
    #[error("{name}: the frame carrying offset {offset} fails its checksum")]
    FrameChecksum { name: LogName, offset: u64 },
    /// A cut or repair position beyond what the copy holds.
    #[error("{name}: cannot cut at {at}: the copy holds {len} durable bytes")]
    CutBeyondEnd { name: LogName, at: u64, len: u64 },
    /// A record writes beyond the end of the device (`end` > `size`): replay stopped before it
    /// (everything before it is applied and persisted). After a resize the replica may hear of
    /// the new size after the records that use it; otherwise the log is not this device's.
    #[error(
        "{name}: the record at offset {at} writes up to byte {end}, beyond the {size}-byte device"
    )]
    BeyondDevice {
        name: LogName,
        at: u64,
        end: u64,
        size: u64,
    },
}

impl Error {
    /// Where the copy being read is damaged, when this error says so: the caller may cut the
    /// copy there and fetch it again.
    pub fn damage_offset(&self) -> Option<u64> {
        match self {
            Error::Log(LogError::Corrupt { offset, .. } | LogError::Sequence { offset, .. })
            | Error::Damaged { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    pub(crate) fn io(file: impl Into<String>, op: &'static str) -> impl FnOnce(io::Error) -> Self {
        let file = file.into();
        move |source| Error::Io { file, op, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
