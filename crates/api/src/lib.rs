//! The control protocol between `marsadm` and `marsd`.
//!
//! One request per connection to the Unix socket `ROOT/marsd.sock` (mode 0600: root only):
//! the client writes one JSON [`Request`] followed by a newline, the daemon answers with one
//! JSON [`Response`] followed by a newline and closes. JSON keeps the protocol debuggable with
//! `socat` and lets `marsadm --json` print the daemon's own data.

use std::path::PathBuf;

use mars_config::ResourceName;
use serde::{Deserialize, Serialize};

/// File name of the control socket inside the root directory.
pub const CONTROL_SOCKET: &str = "marsd.sock";
/// File name of the NBD Unix socket inside the root directory (one socket, export name = RES).
pub const NBD_SOCKET: &str = "nbd.sock";
/// Longest request line the daemon reads; anything longer is refused.
pub const MAX_REQUEST: usize = 64 << 10;
/// Longest reply line a client reads (a `view` of a thousand resources is megabytes).
pub const MAX_REPLY: usize = 256 << 20;

/// Version of the JSON that `marsadm --json` prints (the `"schema"` field at the top of every
/// output; `docs/json.md`). Adding a field or an enum value keeps the version; removing or
/// renaming a field, changing its type or meaning bumps it.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Liveness and identity of the daemon.
    Ping,
    /// Creates a new cluster with this host as its only member.
    CreateCluster {
        /// Address to advertise instead of the listen address.
        ip: Option<String>,
    },
    /// Creates a resource on `disk` (absolute path); this host becomes its primary.
    CreateResource {
        res: ResourceName,
        disk: PathBuf,
        /// Bytes; default: the disk's size.
        size: Option<u64>,
    },
    /// Status of one resource, or of all when `res` is `None`. Members not heard from within
    /// `window` seconds (default 60) are shown as not alive.
    View {
        res: Option<ResourceName>,
        #[serde(default)]
        window: Option<u64>,
    },
    /// Joins the cluster that the host at `peer` (ADDR[:PORT]) belongs to, with a join token
    /// from that host (required unless every host runs `--insecure`).
    JoinCluster {
        peer: String,
        #[serde(default)]
        token: Option<String>,
        /// Address to advertise instead of the configured one (`advertise`, else `listen`).
        #[serde(default)]
        ip: Option<String>,
        /// This host is in that cluster already, but the other members deleted it
        /// (`lowlevel-delete-host`) while it ran: join it again, keeping its resources
        /// (`join-cluster --force`).
        #[serde(default)]
        rejoin: bool,
    },
    /// Makes a one-time join token valid for `ttl` seconds (on a host holding the CA's key).
    JoinToken { ttl: u64 },
    /// A new key and certificate for this host, issued here or by member `via` (default: the
    /// first member that can).
    RenewCertificate {
        #[serde(default)]
        via: Option<String>,
    },
    /// Merges this cluster into the one of the member at `peer` (`merge-cluster`; on a host
    /// holding this cluster's CA key, `token` a join token of the other cluster). `name`: the
    /// name that member must have. With `check` only the checks of both sides
    /// (`merge-cluster-check`; `--dry-run` does the same).
    MergeCluster {
        peer: String,
        #[serde(default)]
        name: Option<String>,
        token: String,
        #[serde(default)]
        check: bool,
    },
    /// MARS's `split-cluster`: the groups this cluster would split into and the checks (on a
    /// host holding the CA key); with `--dry-run` the plan only. Without it the split: every
    /// other group becomes a cluster of its own (docs/security.md, "Splitting a cluster").
    SplitCluster,
    /// Starts (`finish: false`) or finishes a rotation of the cluster CA (on a host holding
    /// its key).
    RotateCa { finish: bool },
    /// Leaves the cluster (refused while this host holds resources).
    LeaveCluster { timeout: u64 },
    /// Waits until every member answered recently, at most `timeout` seconds.
    WaitCluster { timeout: u64 },
    /// Fetches every member's changes now.
    UpdateCluster { timeout: u64 },
    /// Removes a dead member from the cluster; a live one (heard from within `window`
    /// seconds, default 60 as in `view`, or connected to this host) is refused unless `force`.
    DeleteHost {
        host: String,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        window: Option<u64>,
    },
    /// Experts: writes replicated metadata keys directly (one transaction).
    SetLinks { pairs: Vec<(String, String)> },
    /// Experts: reads one replicated metadata key.
    GetLink { key: String },
    /// Experts and tests: every replicated key starting with `prefix` (deleted ones left out),
    /// answered as [`Reply::Value`] with one `KEY VALUE` line per key, in key order (the input
    /// format of `lowlevel-set-links`).
    ListLinks {
        #[serde(default)]
        prefix: String,
    },
    /// Starts a new logfile for the resource.
    LogRotate { res: ResourceName },
    /// A secondary asks its source for a fresh "caught up" confirmation now (instead of at the
    /// next periodic one): `wait-resource uptodate` sends it so that it need not wait.
    AskCaughtUp { res: ResourceName },
    /// Becomes a replica of an existing resource on `disk` (absolute path, at least the
    /// resource's size); a full sync from the primary starts.
    JoinResource { res: ResourceName, disk: PathBuf },
    /// Stops being a member (secondary only); frees this host's logfiles.
    LeaveResource {
        res: ResourceName,
        #[serde(default)]
        force: bool,
    },
    /// Destroys the resource cluster-wide: refused while other members remain unless `force`.
    DeleteResource {
        res: ResourceName,
        #[serde(default)]
        force: bool,
    },
    /// Grows the resource (primary only): to `size`, default the smallest member disk.
    Resize {
        res: ResourceName,
        size: Option<u64>,
    },
    /// Turns local switches on or off: attach/detach, resume-/pause- fetch, replay, sync;
    /// `up`/`down` are all four at once.
    Switch {
        res: ResourceName,
        switches: Vec<SwitchKind>,
        on: bool,
    },
    /// The `*-global` commands (MARS's `pause-fetch-global` & co.): asks every member of `res`
    /// to turn `switch` (fetch, replay or sync) on or off on itself, through a replicated
    /// request each member applies to its own switch; waits up to `timeout` seconds until
    /// every reachable member did. Unreachable members apply it when they are back.
    SwitchGlobal {
        res: ResourceName,
        switch: SwitchKind,
        on: bool,
        timeout: u64,
    },
    /// Experts: declares the local replica consistent without copying (the disk must already
    /// equal the primary's, e.g. both freshly zeroed).
    FakeSync { res: ResourceName },
    /// Discards the local replica's state and fast-full-syncs it from the primary.
    Invalidate { res: ResourceName },
    /// Housekeeping for every resource: rotate the primary's log if it has data, delete
    /// logfiles nobody needs.
    Cron,
    /// Makes this host the primary of `res`: a planned handover (waits up to `timeout`
    /// seconds for the old primary's device to close and for it to leave the role), or with
    /// `force` a failover with what this replica has replayed (fetch must be paused first).
    Primary {
        res: ResourceName,
        #[serde(default)]
        force: bool,
        timeout: u64,
        /// The operator confirmed a forced switch that loses the reachable old primary's
        /// newer writes (`--force --force`, or typed at the prompt after a
        /// [`ErrorKind::NeedsConfirmation`] refusal).
        #[serde(default)]
        confirmed: bool,
    },
    /// Sets the designated primary to `(none)`: the primary leaves its role once its device
    /// is closed; secondaries stop fetching.
    Secondary { res: ResourceName },
    /// Deletes this host's logfiles and version links that no longer belong to the resource's
    /// history (leftovers of a split brain) on a secondary; a full sync follows.
    LogPurgeAll { res: ResourceName },
    /// Emergency mode for `res` on this host once its logfiles take more than `pct` percent of
    /// the root filesystem (0: no limit; free space alone decides).
    SetEmergencyLimit { res: ResourceName, pct: u8 },
    /// This host's emergency limit for `res` (percent, 0: none).
    GetEmergencyLimit { res: ResourceName },
    /// Configures the resource's systemd stack: `start` is a unit name or a marker name such as
    /// `DEFAULT` (the template marked `DEFAULT_START`); `stop` defaults to the start unit. An
    /// empty `start` removes both units and the want. Sets the want to the designated primary.
    SetSystemdUnit {
        res: ResourceName,
        start: String,
        #[serde(default)]
        stop: Option<String>,
    },
    /// Sets where the stack should run: a member, or `(none)` (stopped everywhere).
    SetSystemdWant { res: ResourceName, want: String },
    /// Regenerates the units now and, for `res` (or every resource when `None`), runs the want
    /// operations again even if nothing changed.
    SystemdTrigger { res: Option<ResourceName> },
    /// `--dry-run`: the daemon checks `request` exactly as it would for real (the same
    /// guards, the same refusal) and answers with what it would do; it changes nothing (no
    /// metadata key, control file, logfile, disk byte or unit). Not nested.
    DryRun { request: Box<Request> },
}

/// A local replication switch (MARS's `todo-HOST/*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchKind {
    Attach,
    Sync,
    Fetch,
    Replay,
}

impl SwitchKind {
    pub const ALL: [SwitchKind; 4] = [
        SwitchKind::Attach,
        SwitchKind::Sync,
        SwitchKind::Fetch,
        SwitchKind::Replay,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchKind::Attach => "attach",
            SwitchKind::Sync => "sync",
            SwitchKind::Fetch => "fetch",
            SwitchKind::Replay => "replay",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Response {
    Ok { reply: Reply },
    Error { kind: ErrorKind, message: String },
}

/// What kind of refusal, so scripts can tell "you asked wrongly" from "something broke".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request is invalid (bad name, size, state); nothing was changed.
    Invalid,
    /// The object does not exist.
    NotFound,
    /// The object exists already.
    Exists,
    /// An I/O or internal failure.
    Failed,
    /// The command would lose data the operator may not know about (a forced switch while
    /// the old primary is reachable and ahead): the message says what; the same request with
    /// the confirmation (`confirmed`) goes ahead. Nothing was changed.
    NeedsConfirmation,
    /// The daemon gave up waiting (for a condition, a peer, the old primary); nothing more
    /// will happen on behalf of this request.
    Timeout,
}

impl ErrorKind {
    /// The kind as it appears in JSON (`invalid`, `not-found` …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Exists => "exists",
            ErrorKind::Failed => "failed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NeedsConfirmation => "needs-confirmation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Pong {
        host: String,
        pid: u32,
        version: String,
    },
    Done {
        message: String,
    },
    View(ClusterView),
    /// A metadata value; `None` when the key does not exist (or was deleted).
    Value {
        value: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub uuid: String,
    pub host: String,
    /// Address peers reach this host at.
    pub address: String,
    /// How peer streams are secured: `tls` (with this host's certificate fingerprint) or
    /// `insecure`.
    #[serde(default)]
    pub security: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub host: String,
    pub cluster: Option<ClusterInfo>,
    #[serde(default)]
    pub members: Vec<MemberView>,
    pub resources: Vec<ResourceView>,
    /// The root filesystem and the logfiles on it (absent from daemons before it existed).
    /// Boxed: the view travels inside `Reply`, whose other variants are small.
    #[serde(default)]
    pub space: Option<Box<SpaceView>>,
}

/// Space on this host's root filesystem and what the logfiles take of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpaceView {
    /// The root directory (its filesystem holds every logfile).
    pub root: String,
    /// Bytes available to the daemon (`f_bavail`), used and in total (`None`: statvfs failed).
    pub free_bytes: Option<u64>,
    pub used_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    /// Bytes of logfiles on the root (every resource, primaries' logs and replicas' copies).
    pub log_bytes: u64,
    /// Bytes allocated ahead for logfiles and not written yet (the current logfile of every
    /// primary is preallocated to the rotate size): taken from the free space already.
    pub preallocated_bytes: u64,
    /// How fast the logfiles grow, averaged over the last minute or so (bytes per second).
    pub log_growth_bytes_per_sec: f64,
    /// Seconds until `free_bytes` is used up at that rate; `None` while the logs do not grow.
    pub full_in_secs: Option<f64>,
    /// Free space the root keeps: below it secondaries drop their logfiles (`min_free`).
    pub min_free_bytes: u64,
    /// Below this much free space a primary enters emergency mode (`emergency_free`).
    pub emergency_free_bytes: u64,
    /// Per resource on this host.
    pub resources: Vec<ResourceSpace>,
}

/// The logfiles of one resource on this host and who keeps them from being deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSpace {
    pub name: String,
    pub logfiles: u64,
    pub log_bytes: u64,
    pub preallocated_bytes: u64,
    /// Logfiles below this number may be deleted (the minimum pin over this host and the
    /// members within `unreachable-limit`); `None`: nobody pins.
    pub reclaim_below: Option<u64>,
    /// Every member's pin: the oldest logfile it still needs.
    pub pins: Vec<LogPin>,
}

/// One member's hold on a resource's logfiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPin {
    pub host: String,
    /// The oldest logfile it still needs (`None`: it pins nothing).
    pub logfile: Option<u64>,
    /// Its pin holds back deletion here: it is this host or was heard from within
    /// `unreachable-limit` (a member silent for longer is not waited for).
    pub holds: bool,
}

/// A member's clock further than this from ours (seconds, either way) is warned about: in
/// marsd's log, in `view all` and by `check` (its default `--skew-warn`). NTP keeps clocks
/// within milliseconds; the measurement's own error is the travel time of a liveness stamp.
pub const CLOCK_SKEW_WARN_SECS: f64 = 5.0;

/// One cluster member as this host sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub host: String,
    pub address: String,
    pub this_host: bool,
    /// Its liveness stamp is younger than the window.
    pub alive: bool,
    /// Seconds since this host last heard the member's liveness stamp move (its information's
    /// age, by this host's clock: the member's own clock does not enter).
    pub age_secs: Option<f64>,
    /// This host exchanged metadata with it directly within the last few seconds.
    pub connected: bool,
    /// Why the last exchange failed, if it did.
    pub error: Option<String>,
    /// This host's fetch and sync streams with the member since marsd started: bytes and
    /// compression (absent from daemons before it existed).
    #[serde(default)]
    pub streams: Vec<StreamView>,
    /// Its wall clock minus this host's, in seconds (positive: ahead), as measured from its
    /// liveness stamps; `None` before a fresh one arrived (or from hosts that send no clock).
    #[serde(default)]
    pub clock_skew_secs: Option<f64>,
}

/// Bytes of one stream kind between this host and a member, on the wire and uncompressed
/// (`*_raw_bytes / *_bytes` is the compression ratio), since marsd started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamView {
    /// `fetch` or `sync`.
    pub stream: String,
    /// The compression the newest session agreed on (`lz4`, `zstd`); `None`: raw.
    pub compression: Option<String>,
    pub received_bytes: u64,
    pub received_raw_bytes: u64,
    pub sent_bytes: u64,
    pub sent_raw_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceView {
    pub name: String,
    /// Logical size in bytes.
    #[serde(rename = "size_bytes")]
    pub size: u64,
    pub disk: PathBuf,
    /// This host's role: `Primary` while its volume is open.
    pub role: Role,
    /// Designated primary host (`None`: nobody is designated, MARS's `(none)`).
    pub primary: Option<String>,
    /// MARS disk state of the local replica.
    pub disk_state: DiskState,
    /// With `disk_state` `WriteBack`: bytes not yet written back to the disk (MARS shows
    /// them as `WriteBack[72.50 MiB]`); `None` otherwise.
    #[serde(default)]
    pub writeback_bytes: Option<u64>,
    /// MARS replication state of the local replica.
    pub repl_state: ReplState,
    /// MARS flags field: one letter per switch (attach, sync, fetch, replay).
    pub flags: String,
    pub log: Option<LogView>,
    /// The local block device (`/dev/mars/RES`), on the primary when the daemon serves one.
    #[serde(default)]
    pub device: Option<String>,
    /// Why the local block device could not be set up.
    #[serde(default)]
    pub device_error: Option<String>,
    pub nbd_unix_uri: Option<String>,
    pub nbd_tcp_uri: Option<String>,
    /// The daemon serves NBD over TCP (`--nbd-listen`), on the primary only.
    #[serde(default)]
    pub nbd_tcp: bool,
    /// NBD connections currently using the device.
    pub open_count: u64,
    pub error: Option<String>,
    /// The local replica is consistent (a full sync is not pending or running).
    #[serde(default)]
    pub consistent: bool,
    /// Progress of the local full sync, log fetch and replay (absent when idle/not applicable).
    #[serde(default)]
    pub sync: Option<Progress>,
    #[serde(default)]
    pub fetch: Option<Progress>,
    #[serde(default)]
    pub replay: Option<Progress>,
    /// Why replication on this host is stuck (replay stopped at damage, version mismatch,
    /// logfiles gone so a full sync is needed …); `None` when it is not.
    #[serde(default)]
    pub stuck: Option<String>,
    /// Secondary: milliseconds since the primary last confirmed over the fetch stream that this
    /// replica has everything durable there (`None`: no confirmation while connected).
    #[serde(default)]
    pub caught_up_ms: Option<u64>,
    /// Every member of the resource as this host's metadata shows it (this host included).
    #[serde(default)]
    pub members: Vec<ReplicaView>,
    /// The members' histories have forked.
    #[serde(default)]
    pub split_brain: Option<SplitBrainView>,
    /// The systemd stack, when one is configured.
    #[serde(default)]
    pub systemd: Option<SystemdView>,
}

/// A host's role for a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "Primary",
            Role::Secondary => "Secondary",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Declares a state enum whose JSON strings are MARS's names, with `as_str`, `Display`,
/// `ALL` and `from_mars` (the engine's text, `None` for an unknown one).
macro_rules! mars_states {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v,)*
        }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            /// MARS's name of the state.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)* }
            }
            /// The state named `s` (MARS's name).
            pub fn from_mars(s: &str) -> Option<$name> {
                match s { $($s => Some($name::$v),)* _ => None }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

mars_states! {
    /// MARS disk state: the condition of a member's replica (its local disk).
    DiskState {
        /// Not a member of the resource.
        NotJoined = "NotJoined",
        /// A member that has not reported anything yet.
        NotPresent = "NotPresent",
        /// The disk is not open (switched off, or not set up after an error).
        Detached = "Detached",
        /// Primary in emergency mode: the log is full, writes go to the disk only.
        EmergencyMode = "EmergencyMode",
        /// Replay stopped at a damaged logfile (the reason is in `stuck`).
        DefectiveLog = "DefectiveLog",
        /// The primary's volume reported an I/O error (in `stuck`).
        DefectiveDisk = "DefectiveDisk",
        /// The logfiles this replica needs are gone: it needs a full sync.
        Orphan = "Orphan",
        /// A full sync is pending or running: the data is not usable.
        InConsistent = "InConsistent",
        /// Primary with written data still to write back (amount in `writeback_bytes`).
        WriteBack = "WriteBack",
        UpToDate = "UpToDate",
        /// Secondary behind the primary: still fetching.
        OutDatedF = "OutDated[F]",
        /// Secondary behind the primary: still replaying.
        OutDatedR = "OutDated[R]",
        /// Secondary behind the primary: still fetching and replaying.
        OutDatedFR = "OutDated[FR]",
    }
}

impl DiskState {
    /// Parses the engine's MARS text (`WriteBack[72.50 MiB]`, `DefectiveLog[damaged]` carry
    /// amounts and reasons in brackets, which JSON keeps elsewhere).
    pub fn from_mars_text(s: &str) -> Option<DiskState> {
        DiskState::from_mars(s).or_else(|| DiskState::from_mars(s.split('[').next()?))
    }
}

mars_states! {
    /// MARS replication state: what a member's replication is doing.
    ReplState {
        NotJoined = "NotJoined",
        /// Its disk is not attached (or it has not reported yet).
        NotStarted = "NotStarted",
        /// Its liveness stamp is older than the view window (or it is known unreachable).
        UnResponsive = "UnResponsive",
        EmergencyMode = "EmergencyMode",
        /// Its device is still open although another host (or nobody) is designated.
        RemainsPrimary = "RemainsPrimary",
        /// Primary serving its log.
        Replicating = "Replicating",
        /// Designated primary still catching up or waiting for the old one to leave.
        NotYetPrimary = "NotYetPrimary",
        PausedSync = "PausedSync",
        Syncing = "Syncing",
        PausedFetch = "PausedFetch",
        PausedReplay = "PausedReplay",
        NoPrimaryDesignated = "NoPrimaryDesignated",
        PrimaryUnreachable = "PrimaryUnreachable",
        Orphan = "Orphan",
        Replaying = "Replaying",
    }
}

/// A position in a resource's log: logfile number and byte offset inside it. Text form
/// `000000003:4096` (MARS's `file:offset`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct LogPos {
    pub logfile: u64,
    pub offset: u64,
}

impl std::fmt::Display for LogPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:09}:{}", self.logfile, self.offset)
    }
}

/// A range of logfile numbers, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRange {
    pub first: u64,
    pub last: u64,
}

/// A resource's systemd stack as the metadata shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemdView {
    pub start_unit: String,
    pub stop_unit: String,
    /// Where the stack should run: a host, `(none)`, or `None` when unset.
    pub want: Option<String>,
}

/// A split brain as the version links show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitBrainView {
    /// The first logfile number where the histories differ (0: two hosts act as primary and
    /// the logfiles do not show it yet).
    pub logfile: u64,
    pub sides: Vec<SplitSide>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSide {
    pub hosts: Vec<String>,
    /// Log bytes of this history from the fork on: lost if it is discarded.
    pub bytes: u64,
}

/// Progress of a sync, fetch or replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes done and bytes in total (for fetch and replay: of the logfiles still to process).
    #[serde(rename = "done_bytes")]
    pub done: u64,
    #[serde(rename = "total_bytes")]
    pub total: u64,
    /// Recent rate in bytes per second.
    #[serde(rename = "rate_bytes_per_sec")]
    pub rate: u64,
    /// Oldest and newest logfile number involved, if any.
    pub logs: Option<LogRange>,
}

impl Progress {
    /// Bytes still to do.
    pub fn rest(&self) -> u64 {
        self.total.saturating_sub(self.done)
    }
    /// Seconds until done at the current rate (`None`: not moving).
    pub fn remaining_secs(&self) -> Option<u64> {
        if self.rest() == 0 {
            Some(0)
        } else if self.rate == 0 {
            None
        } else {
            Some(self.rest().div_ceil(self.rate))
        }
    }
}

/// One member of a resource, from the replicated metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub host: String,
    pub disk: String,
    /// The role the member itself last reported; `None` when it is not alive (its last
    /// report is stale: a dead primary is not acting as one).
    pub role: Option<Role>,
    pub disk_state: DiskState,
    /// As [`ResourceView::writeback_bytes`].
    #[serde(default)]
    pub writeback_bytes: Option<u64>,
    pub repl_state: ReplState,
    pub flags: String,
    /// Its liveness stamp is younger than the view window.
    pub alive: bool,
    pub consistent: bool,
    /// Replay (secondary) or writeback (primary) position.
    pub applied: Option<LogPos>,
    /// Bytes of the primary's log this member has not applied yet (when known).
    #[serde(rename = "behind_bytes")]
    pub behind: Option<u64>,
    /// Age in seconds of the oldest write this member has not applied to its disk: 0 when it
    /// is not behind, else now minus the stamp of the log record at its applied position, read
    /// from this host's copy of that logfile (`None`: this host does not hold that record).
    #[serde(default)]
    pub lag_secs: Option<f64>,
    /// Primary in emergency mode (writes bypass the log).
    #[serde(default)]
    pub emergency: bool,
    /// Its last systemd operation succeeded (`None`: it ran none).
    #[serde(default)]
    pub systemd_ok: Option<bool>,
    /// Bytes of its backing disk as it last reported (`None`: it has not reported).
    #[serde(default)]
    pub disk_size_bytes: Option<u64>,
    pub sync: Option<Progress>,
    pub stuck: Option<String>,
    /// Its last systemd start/stop, e.g. `start app.service: ok` (when it ran one).
    #[serde(default)]
    pub systemd: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogView {
    /// Current logfile name.
    pub current: String,
    pub appended: LogPos,
    pub durable: LogPos,
    pub written_back: LogPos,
    /// Bytes of written data held in memory until writeback.
    pub dirty_bytes: u64,
    pub pending_records: u64,
    pub writes: u64,
    /// Logfiles present for this resource.
    pub logfiles: u64,
    /// Bytes occupied by those logfiles.
    pub log_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("message longer than {0} bytes")]
    TooLong(usize),
}

/// Encodes a message as one line.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).expect("API types always serialize");
    v.push(b'\n');
    v
}

/// Decodes one request line.
pub fn decode<'a, T: Deserialize<'a>>(line: &'a [u8]) -> Result<T, ApiError> {
    if line.len() > MAX_REQUEST {
        return Err(ApiError::TooLong(MAX_REQUEST));
    }
    Ok(serde_json::from_slice(line)?)
}

/// Decodes one reply line.
pub fn decode_reply<'a, T: Deserialize<'a>>(line: &'a [u8]) -> Result<T, ApiError> {
    if line.len() > MAX_REPLY {
        return Err(ApiError::TooLong(MAX_REPLY));
    }
    Ok(serde_json::from_slice(line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let r = Request::CreateResource {
            res: ResourceName::new("vm1").unwrap(),
            disk: "/dev/vg/vm1".into(),
            size: Some(1 << 30),
        };
        let line = encode(&r);
        assert_eq!(decode::<Request>(line.trim_ascii_end()).unwrap(), r);
        // Invalid names are refused at decode time, before the daemon acts on them.
        assert!(decode::<Request>(br#"{"cmd":"view","res":"a/b"}"#).is_err());
        assert!(decode::<Request>(br#"{"cmd":"nonsense"}"#).is_err());
        assert!(decode::<Request>(b"\xff\xfe").is_err());
    }
}
