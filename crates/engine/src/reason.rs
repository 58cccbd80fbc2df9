//! Typed reasons. Every "why" the engine states is an enum whose `Display` is the text the
//! operator reads; code that acts on a reason matches the variant, never the text.
//!
//! Reports carry the text (for `view` and older peers) and a [`StuckKind`] (for decisions on
//! other hosts, e.g. MARS's `DefectiveLog` disk state).

use std::fmt;

use mars_config::{format_size, HostName};
use mars_txlog::LogPos;
use serde::{Deserialize, Serialize};

/// Why a replica's replication stopped until the operator or a repair acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stuck {
    /// Replay found the local copy of a logfile damaged at `offset`: the copy is cut there and
    /// fetched again (a repair), or, without an offset, it stays stuck until `invalidate`.
    Damaged {
        file: u64,
        origin: HostName,
        offset: Option<u64>,
        detail: String,
    },
    /// The version chain shows another history (from `ChainCheck::Mismatch`).
    Mismatch { file: u64, detail: String },
    /// The source's logfile of this number is another origin's than ours.
    Fork {
        file: u64,
        theirs: HostName,
        ours: HostName,
    },
    /// The source holds less of a logfile than this replica (or refused our history).
    Diverged { file: u64, detail: String },
    /// The replica's disk failed (not the log): only an operator can help.
    Disk { detail: String },
}

impl Stuck {
    pub fn kind(&self) -> StuckKind {
        match self {
            Stuck::Damaged { .. } => StuckKind::Damaged,
            Stuck::Mismatch { .. } | Stuck::Fork { .. } | Stuck::Diverged { .. } => {
                StuckKind::History
            }
            Stuck::Disk { .. } => StuckKind::Disk,
        }
    }

    /// The stuck state means the histories differ (a split brain on this side).
    pub fn is_history(&self) -> bool {
        self.kind() == StuckKind::History
    }
}

impl fmt::Display for Stuck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stuck::Damaged {
                file,
                origin,
                detail,
                ..
            } => write!(
                f,
                "replay stopped: log-{file:09}-{origin} damaged: {detail}"
            ),
            Stuck::Mismatch { detail, .. } => write!(f, "replay stopped: {detail}"),
            Stuck::Fork { file, theirs, ours } => write!(
                f,
                "the primary's log {file} is log-{file:09}-{theirs}, ours is \
                 log-{file:09}-{ours}: the histories differ (split brain?)"
            ),
            Stuck::Diverged { detail, .. } => write!(f, "{detail}"),
            Stuck::Disk { detail } => write!(f, "replay stopped: disk error: {detail}"),
        }
    }
}

/// What a report's `stuck` text is about, for decisions on other hosts (and `view`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StuckKind {
    /// A local log copy is damaged (MARS: `DefectiveLog`).
    Damaged,
    /// The histories differ.
    History,
    /// The disk failed (primary: writeback or log I/O; replica: replay writes).
    Disk,
    /// Only a full sync helps (logfiles gone, or dropped for space).
    NeedsSync,
    /// Replay waits for a version link: whether the history is the source's is not known yet.
    LinkWait,
    /// The designated primary waits before taking over.
    RoleWait,
}

/// Why replay waits for something that will come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// A version link needed by the chain check has not arrived (from `ChainCheck::Wait`).
    Link(String),
    /// The next record writes up to byte `end`, beyond the `size`-byte device as this host
    /// knows it (from `ReplayEnd::BeyondDevice`): replay goes on once the size reaches `end`.
    Size {
        file: u64,
        at: u64,
        end: u64,
        size: u64,
    },
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::Link(s) => f.write_str(s),
            Waiting::Size {
                file,
                at,
                end,
                size,
            } => write!(
                f,
                "the record at {file}:{at} writes up to byte {end}, beyond the {size}-byte \
                 device: waiting for the resize to arrive (or `invalidate` if this log is not \
                 this device's)"
            ),
        }
    }
}

/// Why only a full sync can bring a replica back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeedsSync {
    /// The source no longer has a logfile this replica needs.
    Gone {
        file: u64,
        oldest: u64,
        host: HostName,
        res: String,
    },
    /// The root ran out of space: the local logfiles were dropped.
    Space { free: u64, min: u64, res: String },
    /// Read back from the control file after a restart (its text).
    Restored(String),
}

impl fmt::Display for NeedsSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NeedsSync::Gone {
                file,
                oldest,
                host,
                res,
            } => write!(
                f,
                "log {file} is gone on {host} (its oldest is {oldest}): this replica was away \
                 too long; a full sync is needed (marsadm invalidate {res})"
            ),
            NeedsSync::Space { free, min, res } => write!(
                f,
                "the root has only {} free (minimum {}): dropped the local logfiles; a full \
                 sync is needed once there is space (marsadm invalidate {res})",
                format_size(*free),
                format_size(*min)
            ),
            NeedsSync::Restored(s) => f.write_str(s.trim()),
        }
    }
}

/// Why the designated primary does not take over yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleWait {
    /// The replica is not consistent (sync running or needed): it can never take over.
    Inconsistent(String),
    /// A forced switch first replays what was fetched.
    ReplayingFirst,
    /// The promotion rules say wait.
    Promotion(PromotionWait),
    /// Opening the volume failed; it is retried.
    OpenFailed(String),
    /// A planned promotion after the start waits until every member answered (or
    /// `Timing::stale_primary_wait` passed): the metadata from before may miss a primary
    /// period of another member.
    StaleMetadata,
}

impl fmt::Display for RoleWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleWait::Inconsistent(why) => write!(
                f,
                "designated primary, but the replica is inconsistent ({why}): cannot take over"
            ),
            RoleWait::ReplayingFirst => {
                f.write_str("replaying what was fetched before taking over")
            }
            RoleWait::Promotion(w) => w.fmt(f),
            RoleWait::OpenFailed(e) => write!(f, "cannot open the volume: {e}"),
            RoleWait::StaleMetadata => f.write_str(
                "waiting for every member's metadata since the start before taking over",
            ),
        }
    }
}

/// Why a planned promotion must wait (`roles::promotion`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromotionWait {
    /// Another member still acts as primary.
    OldPrimaryActs(HostName),
    /// A reachable member has not reported under this designation yet.
    NoReport(HostName),
    /// A reachable member reports under a newer designation: another `primary` command won.
    NewerDesignation(HostName),
    /// The histories differ from this logfile on.
    SplitBrain(u64),
    /// A reachable member reports a newer log end.
    CatchingUp {
        host: HostName,
        applied: LogPos,
        end: LogPos,
    },
    /// An unreachable member reported a newer log end.
    UnreachableAhead {
        host: HostName,
        applied: LogPos,
        end: LogPos,
    },
    /// A member's log end is on another history than ours.
    OtherHistory { host: HostName, end: LogPos },
    /// The version links cannot tell yet whether a member's log end is in our history.
    CannotTell { host: HostName, end: LogPos },
}

impl fmt::Display for PromotionWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromotionWait::OldPrimaryActs(p) => {
                write!(f, "waiting for {p} to leave the primary role")
            }
            PromotionWait::NoReport(h) => {
                write!(f, "waiting for {h} to report under this designation")
            }
            PromotionWait::NewerDesignation(h) => write!(
                f,
                "{h} reports a newer designation: another primary command was given after this one"
            ),
            PromotionWait::SplitBrain(no) => write!(
                f,
                "split brain from logfile {no}: resolve it first (`invalidate` the other side) \
                 or take over with `primary --force`"
            ),
            PromotionWait::CatchingUp { host, applied, end } => {
                write!(
                    f,
                    "catching up with {host}: applied {applied}, {host} has {end}"
                )
            }
            PromotionWait::UnreachableAhead { host, applied, end } => write!(
                f,
                "{host} reported log end {end}, beyond ours ({applied}), and is unreachable: a \
                 handover without loss needs it (`primary --force` takes over without it)"
            ),
            PromotionWait::OtherHistory { host, end } => write!(
                f,
                "{host}'s log end {end} is on another history than ours: resolve the split \
                 brain first (`invalidate` there) or take over with `primary --force`"
            ),
            PromotionWait::CannotTell { host, end } => write!(
                f,
                "cannot tell from the version links whether {host}'s log end {end} is in our \
                 history (waiting for links; `primary --force` takes over regardless)"
            ),
        }
    }
}

/// The kind of an operator refusal (mapped onto `marsadm`'s exit codes and error kinds by the
/// daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpErrorKind {
    /// The command does not apply in this state (wrong role, switch, size …).
    Invalid,
    /// The resource (or host) does not exist.
    NotFound,
    /// Already exists or already a member.
    Exists,
    /// The command was valid but could not be carried out (I/O, another command won).
    Failed,
    /// The command would lose data the operator may not know about (`primary --force` while
    /// the old primary is reachable and ahead): it goes ahead only when confirmed.
    NeedsConfirmation,
    /// The command waited for another host (the old primary to leave, its stack to stop) and
    /// gave up after its timeout; it was rolled back.
    Timeout,
}

/// A refused or failed operator command: what kind, and the one line the operator reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub kind: OpErrorKind,
    pub msg: String,
}

impl OpError {
    pub fn invalid(msg: impl Into<String>) -> OpError {
        OpError {
            kind: OpErrorKind::Invalid,
            msg: msg.into(),
        }
    }
    pub fn failed(msg: impl Into<String>) -> OpError {
        OpError {
            kind: OpErrorKind::Failed,
            msg: msg.into(),
        }
    }
    pub fn timeout(msg: impl Into<String>) -> OpError {
        OpError {
            kind: OpErrorKind::Timeout,
            msg: msg.into(),
        }
    }
    pub fn not_found(msg: impl Into<String>) -> OpError {
        OpError {
            kind: OpErrorKind::NotFound,
            msg: msg.into(),
        }
    }
    pub fn needs_confirmation(msg: impl Into<String>) -> OpError {
        OpError {
            kind: OpErrorKind::NeedsConfirmation,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}
