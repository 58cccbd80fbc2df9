//! The replicated cluster metadata: MARS's "symlink tree" (`/mars`, reference §1.6) as a
//! key/value map with a Lamport stamp per key, persisted in redb.
//!
//! This crate is the store's *logic and persistence only*: it decides which update wins, who may
//! write which key, and which changes a peer still needs. Shipping changes between hosts (peer
//! connections, polling, triggers) lives in the daemon, which calls [`Store::changes_since`] on
//! one side and [`Store::apply_remote`] on the other.
//!
//! # Rules
//!
//! * **Keys** are MARS paths such as `resource-vm1/primary` or `actual-alpha/alive`: non-empty,
//!   at most 255 bytes of printable ASCII without spaces, `/`-separated segments, none empty,
//!   `.` or `..` ([`validate_key`]).
//! * **Last writer wins.** Every [`Entry`] carries a [`Stamp`] and the host that wrote it
//!   (`origin`). A higher stamp wins; on equal stamps the lexicographically greater origin wins
//!   (and, only for malformed input where one host reused a stamp, the greater value, a tombstone
//!   being the smallest — so every replica picks the same entry). An entry identical to the stored
//!   one is a no-op. See [`Entry::supersedes`].
//! * **Ownership.** Members are the hosts named by live `ips/ip-HOST` keys (plus the local host).
//!   A key with a path segment ending in `-HOST` for a member `HOST` is owned by that host
//!   (`resource-vm1/replay-alpha`, `actual-alpha/alive`, `ips/ip-alpha`); the leading
//!   `resource-RES` directory never counts, and the segment nearest the leaf decides
//!   ([`owner_of`]). Only the owner writes an owned key: a local write by another host is
//!   refused with [`MetaError::NotOwner`], a remote update whose origin is not the owner is
//!   refused and reported in [`ApplyReport::refused`]. Every other key is shared
//!   (`resource-vm1/primary`, `resource-vm1/size`, `defaults/…`) and last-writer-wins from anyone.
//!   A host's membership and certificate (`ips/ip-HOST`, `certs/cert-HOST`) are set only by the
//!   host itself and deleted by any member.
//! * **Signatures** ([`auth`]): with an [`Authority`] installed (a cluster with certificates),
//!   a host signs the entries only it may write, and an entry only its writer may write is
//!   applied only with that writer's valid signature, whoever relays it.
//! * **Lamport clock** ([`Clock`]): a physical Lamport clock as in MARS — a local stamp is
//!   `max(real time, last stamp + 1)` in nanoseconds; remote stamps advance it. Stamps more than
//!   30 days (configurable) ahead of local real time are refused
//!   ([`MetaError::StampTooFarInFuture`]). The last stamp is persisted with every change, so the
//!   clock never goes backwards across restarts, even if real time does. A store whose clock
//!   ran that far ahead once (its host's clock was wrong) is brought back by
//!   [`Store::rebase_future`] at start: no host with a correct clock accepted those stamps, so
//!   its own entries are stamped anew, in their order, above every other stamp.
//! * **Anti-entropy.** Each store numbers the changes it applies (local or remote) with a local
//!   sequence number. A peer that has seen everything up to `N` asks for
//!   [`Store::changes_since`]`(N, limit)`: the entries whose last change has a seq above `N`, in
//!   seq order. Applying them assigns new local seqs, so changes learned from a third host are
//!   relayed. A secondary index seq → key (one row per key: the old seq is dropped when the key
//!   changes) keeps the cost proportional to the number of changes, not to the map size.
//! * **Tombstones.** [`Store::delete`] writes an entry with value `None` and a new stamp; it
//!   propagates and wins or loses like any value, so an older write never resurrects a deleted
//!   key while its tombstone exists. [`Store::gc_tombstones`]`(horizon)` removes tombstones
//!   stamped before `horizon` and remembers the horizon: afterwards a remote update older than the
//!   horizon for a key the store does not hold is ignored, so a late old write cannot resurrect a
//!   collected key either. The trade-off (MARS has the same one with its `.deleted` links, which
//!   are purged after a retention time): an update older than the horizon that some member has not
//!   yet received is lost on stores that collected. The caller must pick a horizon that every
//!   member has acknowledged (all members have fetched past the seqs written before it); a member
//!   partitioned for longer than the retention window has to be re-joined.
//! * **Forgetting** ([`Store::forget`]): at the end of a cluster split a host removes the
//!   other side's hosts and resources from its store *without writing deletions* (a deletion
//!   relayed to a host that has not forgotten yet would delete the other side's live keys), and
//!   keeps a guard ([`Forgotten`]: each name with the stamp it was forgotten at) that refuses
//!   entries naming them with a stamp not above that, whoever relays them
//!   ([`MetaError::Forgotten`]). Guard rows older than the tombstone horizon are dropped by
//!   [`Store::gc_tombstones`]: the horizon refuses those old entries from then on.
//! * **Crash consistency.** Every local change, every batch of remote updates and every GC is one
//!   redb write transaction (entries, seq index, seq counter and clock together).

pub mod auth;
mod clock;
mod key;
mod store;

pub use auth::{writer_of, Authority};
pub use clock::{system_time_ns, Clock, Stamp, TimeSource, DEFAULT_MAX_FUTURE_NS};
pub use key::{cert_of_key, member_of_key, owner_of, validate_key, MAX_KEY_LEN, MAX_VALUE_LEN};
pub use store::{ApplyReport, Changes, Entry, ForgetReport, Forgotten, Rebased, Store};

use mars_config::HostName;

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The key breaks the syntax rules (see [`validate_key`]).
    #[error("invalid metadata key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// The value is longer than [`MAX_VALUE_LEN`].
    #[error("value of metadata key {key:?} is {len} bytes, more than {MAX_VALUE_LEN}")]
    ValueTooLong { key: String, len: usize },
    /// The key belongs to another host.
    #[error("metadata key {key:?} is owned by host {owner}; {writer} may not write it")]
    NotOwner {
        key: String,
        owner: HostName,
        writer: HostName,
    },
    /// An entry only its writer may write came without that writer's valid signature.
    #[error(
        "metadata key {key:?} may only be written by {writer}, and this entry is not its: {reason}"
    )]
    Unauthenticated {
        key: String,
        writer: HostName,
        reason: String,
    },
    /// The stamp is further ahead of local real time than the clock accepts.
    #[error(
        "stamp {stamp} is {:.0} s ahead of local time {now}, more than the limit of {} s \
         (a host's clock is wrong: see Time and NTP in docs/operations.md)",
        stamp.saturating_sub(*now) as f64 / 1e9,
        max_future_ns / 1_000_000_000
    )]
    StampTooFarInFuture {
        stamp: Stamp,
        now: u64,
        max_future_ns: u64,
    },
    /// The entry names a host or resource this store forgot when its cluster split
    /// ([`Store::forget`]) and is not newer than that.
    #[error(
        "metadata key {key:?} names a host or resource forgotten at stamp {guard} (when the \
         cluster split); this entry (stamp {stamp}) is not newer"
    )]
    Forgotten {
        key: String,
        stamp: Stamp,
        guard: Stamp,
    },
    /// A host cannot forget itself.
    #[error("host {host} cannot forget itself")]
    ForgetSelf { host: HostName },
    /// A stored record could not be decoded.
    #[error("corrupt metadata record for key {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The database failed (I/O, corruption detected by redb, …). Boxed: redb's error is large.
    #[error("metadata database: {0}")]
    Db(Box<redb::Error>),
}

macro_rules! db_error {
    ($($ty:ty),*) => {$(
        impl From<$ty> for MetaError {
            fn from(e: $ty) -> Self {
                MetaError::Db(Box::new(e.into()))
            }
        }
    )*};
}
db_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = MetaError> = std::result::Result<T, E>;
