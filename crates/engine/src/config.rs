//! The one set of timing constants and host settings the engine decides with. The daemon and
//! the simulation build their engines from the same [`Timing::standard`], so a rule tested in
//! the simulation is the rule that runs.
//!
//! All times are milliseconds of a monotonic clock the caller passes in ([`crate::Now`]); the
//! engine never reads a clock itself.

/// Timing of the replication rules (milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// A member counts as reachable for role decisions while its liveness stamp is at most this
    /// old (stamps are renewed every [`Timing::alive_every`]). The one definition of
    /// "reachable" the engine uses.
    pub alive_window: u64,
    /// How often a host renews its own liveness stamp.
    pub alive_every: u64,
    /// After a restart, a host that was primary waits at most this long for every other
    /// member's metadata before it takes up the role found on disk.
    pub stale_primary_wait: u64,
    /// A forced promotion waits this long after the designation (concurrent forced commands
    /// for different hosts settle, last writer wins, meanwhile). A planned promotion waits
    /// instead until every reachable member reports under its designation.
    pub promote_settle: u64,
    /// A caught-up confirmation from the fetch source counts for this long, and only while the
    /// session that brought it runs. The source repeats it every 3 s while idle
    /// (`marsd`'s `serve::CONFIRM_EVERY`): this spans two of them and some delay.
    pub caught_up_valid: u64,
    /// A report whose state part is unchanged is republished at most this often while its
    /// moving parts (positions, rates) change.
    pub report_every: u64,
    /// The primary keeps a sync's start logfile for the replica at most this long before the
    /// replica's report pins it.
    pub transient_pin: u64,
    /// Backoff of a failed fetch session: first retry after `fetch_backoff_min`, doubling up to
    /// `fetch_backoff_max`.
    pub fetch_backoff_min: u64,
    pub fetch_backoff_max: u64,
    /// Backoff of a failed sync session.
    pub sync_backoff_min: u64,
    pub sync_backoff_max: u64,
    /// A failed systemd operation is tried again after `n * unit_retry_step` following its
    /// n-th failure (MARS: linear, 1 s steps), up to `systemd::UNIT_TRIES` tries.
    pub unit_retry_step: u64,
    /// How often an engine with moving parts (a primary being written to, a replica fetching,
    /// replaying or syncing) wants fresh local statistics. Idle engines want none.
    pub busy_tick: u64,
    /// How long an operator command that arrives while the resource is being set up (right
    /// after a start or a role change) waits for it before it is refused.
    pub setup_wait: u64,
    /// Opening the volume of a designated primary is retried this often after a failure.
    pub attach_retry: u64,
    /// A primary whose local block device could not be set up tries again, first after
    /// `attach_retry`, doubling up to this.
    pub device_retry_max: u64,
}

impl Timing {
    /// The values the daemon runs with.
    pub const fn standard() -> Timing {
        Timing {
            alive_window: 10_000,
            alive_every: 2_000,
            stale_primary_wait: 10_000,
            promote_settle: 500,
            caught_up_valid: 8_000,
            report_every: 1_000,
            transient_pin: 60_000,
            fetch_backoff_min: 100,
            fetch_backoff_max: 3_000,
            sync_backoff_min: 200,
            sync_backoff_max: 3_000,
            unit_retry_step: 1_000,
            busy_tick: 250,
            setup_wait: 5_000,
            attach_retry: 1_000,
            device_retry_max: 30_000,
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing::standard()
    }
}

/// This host's settings that decisions depend on (marsd's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSettings {
    /// Free space the root keeps; below it secondaries drop their logfiles, and a primary in
    /// emergency mode leaves it only once this much is free again.
    pub min_free_space: u64,
    /// Below this much free space, primaries enter emergency mode.
    pub emergency_free_space: u64,
    /// The primary's device appears as a local block device (`/dev/mars/RES`); without one the
    /// open volume (NBD export) is the device.
    pub local_device: bool,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            min_free_space: 1 << 30,
            emergency_free_space: 512 << 20,
            local_device: false,
        }
    }
}

/// Behaviours the simulation found wrong, brought back on purpose: each switch re-introduces
/// one old bug so that a test can show the simulation's invariants catch it. The switches exist
/// only with the `bugs` feature (the simulation's tests turn it on); without it every switch
/// reads `false` and the struct has no fields, so no build of the daemon can turn one on.
macro_rules! bugs {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        #[cfg(feature = "bugs")]
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct Bugs {
            $($(#[$doc])* pub $name: bool,)*
        }
        #[cfg(feature = "bugs")]
        impl Bugs {
            $(#[inline] pub fn $name(&self) -> bool { self.$name })*
        }
        #[cfg(not(feature = "bugs"))]
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct Bugs;
        #[cfg(not(feature = "bugs"))]
        impl Bugs {
            $(#[inline] pub fn $name(&self) -> bool { false })*
        }
    };
}

bugs! {
    /// Replay moves past a logfile whose version link differs from the origin's.
    skip_chain_check,
    /// A planned promotion goes at once, without waiting for the old primary to leave and for
    /// its last byte.
    planned_promotion_ignores_others,
    /// An empty local copy of logfile N from another origin is replaced even when replay has
    /// moved past it.
    replace_replayed_empty_copy,
    /// A full sync keeps its start position and copied data when its source changes.
    sync_survives_source_change,
    /// A synced replica does not adopt its source's link of the logfile before its start.
    sync_adopts_primary_link_later,
    /// The caught-up confirmation is kept when the fetch source changes (and counts while no
    /// fetch session runs).
    caught_up_survives_source_change,
    /// The fetch server lets a replica skip a deleted logfile when the links' lengths match
    /// (not the links themselves).
    complete_by_link_lengths_only,
    /// The fetch request carries no version link of the logfile before it.
    fetch_request_without_history,
    /// Version links are reclaimed by the published pin only, not by the replay position.
    link_reclaim_uses_published_pin,
    /// The full sync's copy carries unsynced data and ends at the appended position.
    sync_serves_unsynced_data,
}

/// Everything an engine is built with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineConfig {
    pub timing: Timing,
    pub host: HostSettings,
    pub bugs: Bugs,
}
