//! What goes into a resource's engine: facts the executor observed, operator requests, and
//! the completions of commands the engine gave.

use std::collections::BTreeSet;
use std::sync::Arc;

use mars_config::HostName;
use mars_txlog::LogPos;
use mars_wire::RefuseKind;

use crate::model::ResourceMeta;
use crate::reason::OpError;
use crate::systemd::UnitStatus;

use super::command::{SessionId, SyncFile, Tag, UnitJob};

/// The caller's clocks at the moment of an event: a monotonic one for every timer and a wall
/// clock for stamps other hosts made (the fetch source's caught-up confirmations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    /// Milliseconds of a monotonic clock.
    pub ms: u64,
    /// Nanoseconds since the Unix epoch.
    pub wall_ns: u64,
}

/// An operator request's id: the reply names it.
pub type OpId = u64;

/// Which members count as reachable, and which still pin logfiles. Sent when it changes (the
/// host computes both from the members' liveness stamps: reachable within
/// `Timing::alive_window`, pinning within `defaults/unreachable-limit`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Liveness {
    pub reachable: BTreeSet<HostName>,
    pub pinning: BTreeSet<HostName>,
    /// Every other member of the cluster has answered since this daemon started (or there is
    /// none): metadata is as fresh as theirs, so a primary role found on disk may be taken up.
    pub fresh: bool,
}

/// What the resource directory says at start (control files).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalFacts {
    /// The directory holds a replica (the `replica` marker).
    pub replica_marker: bool,
    /// A forced switch (`primary --force`) was pending here.
    pub force_marker: bool,
    /// The primary was in emergency mode: the log continues after a hole when it reopens.
    pub emergency_marker: bool,
    /// Where this host's log last continued after a hole.
    pub chain_start: Option<u64>,
    /// The size the resource had when this host created or joined it.
    pub size: u64,
}

/// One local logfile (the primary's own or a replica's verified copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogInfo {
    pub no: u64,
    pub origin: HostName,
    /// Primary: bytes in the file. Replica: verified, durable bytes.
    pub len: u64,
    /// Replica: the copy is known to be complete (its end arrived, or a later one began).
    pub complete: bool,
}

/// The primary volume's state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeStats {
    pub durable: LogPos,
    pub written_back: LogPos,
    /// Number of the logfile being appended to.
    pub current: u64,
    pub dirty_bytes: u64,
    /// Writes bypass the log (emergency mode).
    pub passthrough: bool,
    /// The volume's I/O error (writeback or log), if it failed.
    pub error: Option<String>,
    /// Local logfiles, oldest first.
    pub logs: Vec<LogInfo>,
    pub size: u64,
}

/// Local measurements, sent when the engine asks for them ([`super::Output::wants_stats`]) or
/// when something changed (open count).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    /// NBD connections plus openers of the local block device.
    pub open_count: u64,
    /// Free and total bytes of the root's filesystem.
    pub free_space: Option<u64>,
    pub total_space: Option<u64>,
    /// Bytes of this resource's logfiles (for `set-emergency-limit`).
    pub log_bytes: u64,
    /// The backing disk's physical size.
    pub disk_size: u64,
    /// The primary's volume, while open.
    pub volume: Option<VolumeStats>,
    pub fetch_rate: u64,
    pub replay_rate: u64,
    pub sync_rate: u64,
}

/// What a replica directory holds after it was opened (copies verified, torn tails cut).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaFacts {
    pub copies: Vec<LogInfo>,
    /// The persisted replay position.
    pub applied: LogPos,
    pub sync: Option<SyncFile>,
    /// The persisted reason why only a full sync helps.
    pub needs_sync: Option<String>,
}

/// The outcome of opening the primary's volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub stats: VolumeStats,
    /// The log continued after a hole (a restart in emergency mode): the new chain start.
    pub restarted_at: Option<u64>,
    /// The local block device, if one was set up (or why not).
    pub device: Option<Result<String, String>>,
}

/// Why opening the volume failed, as MARS's disk states name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenFailure {
    /// Recovery refused the log (corruption in the middle of a logfile).
    DefectiveLog(String),
    /// Anything else (disk missing, I/O error).
    Detached(String),
}

impl OpenFailure {
    pub fn text(&self) -> &str {
        match self {
            OpenFailure::DefectiveLog(s) | OpenFailure::Detached(s) => s,
        }
    }
}

/// Progress of a fetch session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchEvent {
    /// The source answered (the connection and hello succeeded).
    Connected,
    /// The source names the next logfile: may it be appended to or created here? The executor
    /// waits for [`super::Command::CopyDecision`].
    Offer { no: u64, origin: HostName },
    /// Bytes of logfile `no` are verified and durable up to `len`.
    Durable { no: u64, len: u64 },
    /// The source says logfile `no` is complete with `len` bytes (everything before is durable
    /// here).
    End { no: u64, len: u64 },
    /// "You have everything durable here, as of `stamp`" (the source's wall clock, ns).
    CaughtUp { pos: LogPos, stamp: u64 },
    /// The source no longer has logfile `file`.
    Gone { file: u64, oldest: u64 },
    /// The source refused.
    Refused { kind: RefuseKind, reason: String },
    /// The session ended (`None`: cleanly, e.g. stopped).
    Ended { error: Option<String> },
}

/// Progress of a replay run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayEvent {
    /// Applied and persisted up to `pos` (disk synced before the position).
    Progress { pos: LogPos },
    /// The run stopped at `pos` (persisted): it reached its end, was told to stop, or failed.
    Stopped { pos: LogPos, end: ReplayEnd },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayEnd {
    /// Reached the end it was given, or was stopped.
    Done,
    /// The copy is damaged at `offset` (bad checksum, sequence gap).
    Damaged { offset: u64, detail: String },
    /// Some other failure (the disk, an unreadable file).
    Failed { detail: String },
    /// The record at `at` writes up to byte `end`, beyond the device: not applied (replay
    /// stopped right before it). A resize the replica has not heard of yet, or a log that is
    /// not this device's: replay waits until the size reaches `end`.
    BeyondDevice { at: u64, end: u64 },
}

/// Progress of a full sync session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncEvent {
    /// The source's answer to the start: its device size, the log position the copy starts
    /// at, its version link of the logfile before (empty: none). The executor waits for
    /// [`super::Command::SyncGo`] (or a stop).
    Info {
        size: u64,
        start: LogPos,
        prev_link: String,
    },
    /// The copy reached `done`; `transferred` bytes travelled since the last durable report.
    /// `durable`: the disk is synced up to there (the progress may be persisted); otherwise it
    /// is only shown.
    Progress {
        done: u64,
        transferred: u64,
        durable: bool,
    },
    /// The copy is complete (disk synced); the source's log position at its end.
    Copied { end: LogPos, transferred: u64 },
    /// No place for another sync on this host (`defaults/sync-limit`).
    NoSlot,
    /// The session ended (`None`: cleanly).
    Ended { error: Option<String> },
}

/// A command's completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// [`super::Command::OpenVolume`] or [`super::Command::Promote`].
    VolumeOpened(Result<Opened, OpenFailure>),
    /// [`super::Command::OpenReplica`] or [`super::Command::StepDown`] (the replica after it).
    ReplicaOpened(Result<ReplicaFacts, String>),
    /// [`super::Command::StepDown`] could not close the volume (still in use, or an error):
    /// the host stays primary.
    StepDownFailed(String),
    /// [`super::Command::CloseVolume`].
    VolumeClosed,
    /// [`super::Command::EnterPassthrough`].
    Passthrough(Result<(), String>),
    /// [`super::Command::RestartLog`]: the log continues at this logfile after a hole.
    LogRestarted(Result<u64, String>),
    /// [`super::Command::Publish`] with a tag: the Lamport stamps of the written entries.
    Published { tag: Tag, stamps: Vec<u64> },
    /// A command failed (a control file or key could not be written, a copy could not be
    /// removed …): the engine treats it as its kind says.
    Failed { what: String, error: String },
    /// [`super::Command::RunUnit`].
    Unit {
        job: UnitJob,
        status: Option<UnitStatus>,
    },
    /// [`super::Command::Rotate`].
    Rotated {
        reply: Option<OpId>,
        result: Result<Option<u64>, String>,
    },
    /// [`super::Command::Grow`].
    Grown {
        reply: OpId,
        size: u64,
        result: Result<(), String>,
    },
    /// [`super::Command::ReclaimLogs`] / [`super::Command::DropCopiesBelow`]: what was deleted.
    Reclaimed { removed: Vec<String> },
    /// [`super::Command::AttachDevice`]: the device's path, or why it could not be set up
    /// (`None`: no volume open any more, or no device wanted).
    DeviceAttached(Option<Result<String, String>>),
}

/// An operator request for this resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Primary {
        force: bool,
        /// Milliseconds the command may wait.
        timeout: u64,
        /// A forced switch goes ahead although a reachable old primary holds writes this
        /// replica has not replayed (they become a split brain): the operator confirmed.
        confirmed: bool,
    },
    Secondary,
    Invalidate,
    LogPurgeAll,
    FakeSync,
    /// Switches on or off (names as in `todo-HOST/NAME`: attach, sync, fetch, replay).
    Switch {
        switches: Vec<String>,
        on: bool,
    },
    Resize {
        size: Option<u64>,
    },
    LeaveResource {
        force: bool,
    },
    DeleteResource {
        force: bool,
    },
    Cron,
    LogRotate,
    SetEmergencyLimit {
        pct: u8,
    },
    /// `systemd-trigger`: run the want operation again.
    SystemdTrigger,
}

/// The reply to an operator request.
pub type OpReply = Result<String, OpError>;

/// Everything that can happen to a resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The actor starts: what the resource directory says.
    Started(LocalFacts),
    /// The resource's metadata changed (or is first known).
    Meta(Arc<ResourceMeta>),
    /// Reachability of members changed.
    Liveness(Liveness),
    /// Fresh local measurements.
    Stats(Stats),
    /// A timer the engine asked for expired (any earlier event counts as well: the engine
    /// looks at the time of every event).
    Wake,
    /// An operator request.
    Op {
        id: OpId,
        op: Op,
    },
    /// An operator request with `--dry-run`: checked by the same guards as [`Event::Op`]
    /// (waiting for the set-up as it would), answered with what it would do or the refusal it
    /// would get, and nothing else: the engine's state stays as it was and no command but the
    /// [`super::Command::Reply`] comes out.
    DryRun {
        id: OpId,
        op: Op,
    },
    /// A command's completion.
    Done(Done),
    Fetch(SessionId, FetchEvent),
    Replay(SessionId, ReplayEvent),
    Sync(SessionId, SyncEvent),
    /// This host started serving a full sync to `peer` from logfile `start_file` on: keep it
    /// until the replica's report pins it.
    ServingSync {
        peer: HostName,
        start_file: u64,
    },
    /// The daemon stops: close everything cleanly.
    Shutdown,
}
