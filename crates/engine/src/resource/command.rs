//! What comes out of a resource's engine: the side effects the executor carries out, in order.
//!
//! The executor runs the commands of one output in the order given; a command that must
//! finish before the next one starts (stopping a session before its files are removed) is
//! finished before the next one starts. Completions come back as [`super::Event::Done`] or as
//! session events; those of a session the engine has stopped are ignored by it.

use mars_config::HostName;
use mars_txlog::LogPos;
use serde::{Deserialize, Serialize};

use crate::systemd::UnitOp;

use super::event::{OpId, OpReply};

/// Identifies one fetch, replay or sync session: events of a session the engine no longer
/// runs are dropped.
pub type SessionId = u64;

/// Identifies a publication whose stamps the engine wants back.
pub type Tag = u64;

/// A full sync in progress, as persisted in `sync.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFile {
    /// Log position at sync start (from the source); replay starts here.
    pub start: Option<LogPos>,
    /// The device below this offset is copied.
    pub done: u64,
    /// Bytes to copy.
    pub size: u64,
    /// The source's log position when the copy ended; consistent once replay passes it.
    pub end: Option<LogPos>,
    #[serde(default)]
    pub transferred: u64,
    /// The host that gave `start` (and the data copied so far). When the source changes, the
    /// sync starts over: a copy from one host and a log from another may belong to different
    /// histories (found by mars-sim). `None` in files written before this field existed.
    #[serde(default)]
    pub from: Option<HostName>,
}

impl SyncFile {
    /// A sync of the whole device from scratch.
    pub fn full(size: u64) -> SyncFile {
        SyncFile {
            start: None,
            done: 0,
            size,
            end: None,
            transferred: 0,
            from: None,
        }
    }

    /// The copy is still running (replay waits for it).
    pub fn copying(&self) -> bool {
        self.end.is_none()
    }
}

/// Marker files of the resource directory (presence = on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// The directory holds a replica: a restarted daemon that is designated primary with it
    /// still has to catch up before it opens its volume.
    Replica,
    /// A forced switch is pending here.
    Force,
    /// The primary is in emergency mode.
    Emergency,
}

/// A control file: something that decides what a restart does. The executor writes it
/// atomically and durably, and reports a failure as [`super::Done::Failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The replay (or writeback) position.
    Position(LogPos),
    /// The full sync's state; `None` removes it (consistent).
    Sync(Option<SyncFile>),
    /// Why only a full sync helps; `None` removes it.
    NeedsSync(Option<String>),
    Marker(Marker, bool),
    /// Where this host's log continued after a hole.
    ChainStart(u64),
}

/// One systemd operation: its identity decides whether it is done already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpKey {
    pub op: UnitOp,
    pub unit: String,
    /// The `systemd-want` value and its entry's Lamport stamp it is done for: every write of
    /// the want, even of the same value, runs the operation again (as a MARS trigger does).
    pub want: Option<String>,
    pub want_stamp: u64,
}

/// A systemd job: regenerate the units of every resource (if asked), then run the operation
/// once: try `attempt` of [`crate::systemd::UNIT_TRIES`] (up to
/// [`crate::systemd::JOB_MODE_FAIL_TRIES`] with `systemctl --job-mode=fail`, then in the
/// normal job mode). The engine schedules the next try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitJob {
    pub op: Option<OpKey>,
    pub regenerate: bool,
    /// 1-based try of `op` (1 without an op).
    pub attempt: u32,
}

/// What the fetch executor does with a logfile the source names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyDecision {
    /// Append to the existing copy from its durable length.
    Append,
    /// Create a new copy (the previous newest is complete now).
    Create,
    /// Remove the empty copy of that number from `old_origin`, then create ours.
    ReplaceEmpty { old_origin: HostName },
    /// Refuse: the session ends (the reason is the engine's to show).
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Writes keys (this host's own, or shared ones a command sets) and deletes keys, in one
    /// transaction. With a tag, the entries' stamps come back as `Done::Published`.
    Publish {
        tag: Option<Tag>,
        set: Vec<(String, String)>,
        delete: Vec<String>,
    },
    /// Writes a control file durably.
    Persist(Control),
    /// Only the designated primary accepts new openers of the device.
    SetDesignated(bool),
    /// Writes fail with EIO: another host is the designated primary and acts.
    SetFenced(bool),
    /// Opens the primary's volume (crash recovery; with `restart_after_gap` the log continues
    /// after a hole first) and the local block device. → `Done::VolumeOpened`.
    OpenVolume {
        size: u64,
        restart_after_gap: bool,
    },
    /// Closes the volume (everything written back) and the device: detach, shutdown.
    /// → `Done::VolumeClosed`.
    CloseVolume,
    /// Leaves the primary role: device detached (refused while in use), volume closed, an
    /// empty own last logfile dropped, the replay position set to the end of the log, the
    /// replica marker set, the replica opened. → `Done::ReplicaOpened` or
    /// `Done::StepDownFailed`.
    StepDown {
        size: u64,
    },
    /// Opens the replica (sets the replica marker first). → `Done::ReplicaOpened`.
    OpenReplica {
        size: u64,
    },
    /// Takes over the primary role: everything fetched beyond `cut_at` is cut off, the replica
    /// marker removed, the volume opened in a new logfile, the force marker removed. Sessions
    /// are stopped before (by their own commands). → `Done::VolumeOpened`.
    Promote {
        cut_at: LogPos,
        size: u64,
    },
    /// Grows the volume and the device to `size` (resize on the primary). → `Done::Grown`.
    Grow {
        reply: OpId,
        size: u64,
    },
    /// The resource grew: the device (if any) follows.
    SetSize(u64),
    /// Sets up the local block device of the open volume again (the last try failed).
    /// → `Done::DeviceAttached`.
    AttachDevice,
    /// Emergency mode: writes bypass the log. → `Done::Passthrough`.
    EnterPassthrough,
    /// Leaves emergency mode: the log continues after a hole. → `Done::LogRestarted`.
    RestartLog,
    /// Deletes the primary's logfiles below `below` that are written back. → `Done::Reclaimed`.
    ReclaimLogs {
        below: Option<u64>,
    },
    /// Starts a new logfile (only if the current one has data, with `only_if_used`).
    /// → `Done::Rotated`.
    Rotate {
        reply: Option<OpId>,
        only_if_used: bool,
    },
    /// Fetches from `source` (the executor looks up its address) from `from` on, telling it our
    /// link of logfile `from.file - 1` (empty: none).
    StartFetch {
        id: SessionId,
        source: HostName,
        from: LogPos,
        prev_link: String,
    },
    /// Stops the session and waits until it touches no file any more.
    StopFetch {
        id: SessionId,
    },
    CopyDecision {
        id: SessionId,
        no: u64,
        decision: CopyDecision,
    },
    /// Applies the records of the local copy of logfile `file` (by `origin`) from byte `from`
    /// to byte `to`, persisting the position in batches.
    StartReplay {
        id: SessionId,
        file: u64,
        origin: HostName,
        from: u64,
        to: u64,
        /// The device's size: a record beyond it is not applied ([`super::ReplayEnd::BeyondDevice`]).
        size: u64,
    },
    /// Stops replay at the next batch boundary and waits for it.
    StopReplay {
        id: SessionId,
    },
    /// Starts or resumes a full sync from `source` (the copy is done below `done`).
    StartSync {
        id: SessionId,
        source: HostName,
        done: u64,
        size: u64,
    },
    /// The sync may copy now, from `done` up to `size`.
    SyncGo {
        id: SessionId,
        done: u64,
        size: u64,
    },
    StopSync {
        id: SessionId,
    },
    /// Cuts the damaged copy of `at.file` at `at.offset` and removes later copies.
    RepairCopies {
        at: LogPos,
    },
    /// Removes every local copy.
    ResetCopies,
    /// Removes copies below `below`. → `Done::Reclaimed`.
    DropCopiesBelow {
        below: u64,
    },
    /// A systemd job. → `Done::Unit`.
    RunUnit(UnitJob),
    /// Closes everything, deletes this host's keys of the resource and its directory; the
    /// actor ends (the reply, if any, is sent after).
    Teardown {
        why: String,
        reply: Option<OpId>,
    },
    /// The answer to an operator request.
    Reply {
        id: OpId,
        result: OpReply,
    },
    Log {
        level: Level,
        msg: String,
    },
}
