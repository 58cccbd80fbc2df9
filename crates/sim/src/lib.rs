//! Deterministic simulation of the replication engine and the replicated metadata.
//!
//! One `u64` seed decides everything: four simulated hosts (`a` … `d`) run one resource, a
//! simulated network carries metadata and log data between them, faults and operator commands
//! arrive at random, and after every step the invariants below are checked. A failing seed is
//! reported with its trace and runs again identically (`cargo run -p mars-sim --release --
//! --seed S`). `cargo test -p mars-sim` runs 200 fixed seeds; the binary is the soak runner
//! (`--seeds N --steps M`, prints seeds per second).
//!
//! # The model
//!
//! * **Time** advances 250 ms per step (one reconcile round of the daemon). Each step: up to
//!   two random events, delivery of the messages that are due, anti-entropy pulls, and on
//!   every running host: the role command in progress, the reconcile round, replay, fetch and
//!   sync requests, writeback.
//! * **Metadata** is the real thing: each host has a `mars_meta::Store` (redb in memory) whose
//!   clock is the simulated time plus a per-host skew of up to ±2 s. Hosts pull "changes after
//!   N" from each other over the lossy network, one question in flight per pair; the answer is
//!   taken when the question is sent and may arrive late, reordered or not at all.
//! * **Every replication decision is `mars_engine`'s**: `fetch_source`, `promotion`,
//!   `next_file_check` and `entry_check`, `my_link`, `reclaim_below`, `split_brain` and
//!   `member_state`, called where the daemon calls them (`host.rs` names the daemon function
//!   each piece mirrors). The simulation does not depend on `crates/daemon`.
//! * **The log** is a map of logfiles, each a list of records; a record is an id into a table
//!   that knows which block it writes (its data is the id). Offsets count records. A primary
//!   appends (acknowledged at once), makes records durable by group commit or FLUSH, writes
//!   durable records back to its disk, rotates on `cron` and at sync start, and publishes the
//!   version link of each complete logfile. A replica fetches only durable records, verified
//!   by position (the daemon checks each chunk against the end of its copy, so a lost, late or
//!   repeated answer is dropped), replays them onto its disk and crosses logfile boundaries
//!   only on the engine's say. The disk is a map block → record id.
//! * **Crashes** lose what was not durable: the primary's unsynced log tail and everything in
//!   memory (fetch state, caught-up confirmations, the view of who is alive, pending
//!   commands). Metadata (redb commits), logfiles up to their durable length, the disk, the
//!   writeback and replay positions and the sync state survive.
//! * **Faults and commands**: message loss (0–30 %), delays of up to six steps (reordering),
//!   one-way and two-way link cuts and their healing, crashes and restarts; writes, FLUSH,
//!   group commit, log rotation, pause/resume of fetch and replay, `join-resource`,
//!   `leave-resource`, `invalidate`, `secondary`, application start/stop on the primary, the
//!   planned handover (`primary`, with the daemon's phases: the old primary's device closes,
//!   `primary := me`, the old primary leaves its role or gets it back after the timeout, the
//!   new one catches up and opens its volume), and the forced failover (`pause-fetch`,
//!   `primary --force`: takes what it replayed; a still-open old primary keeps writing, a split
//!   brain). Every 100 steps and at the end a *settle* phase heals the network, restarts every
//!   host, closes devices left open on hosts no longer designated and lets things run.
//!
//! # Invariants (checked after every step, `world.rs`)
//!
//! The simulation keeps ghost state the hosts never read (`ghost.rs`): every record with the
//! record it followed in its writer's history, so all primaries' histories form a tree, and
//! per host its *timeline*, the records its data is built from.
//!
//! 1. **No replica applies a record past a fork**: each applied record must be the next one of
//!    the replica's timeline in the tree (or the same record again, when replay after a full
//!    sync re-applies what the copy had), so a replica's history is always a prefix of one
//!    primary history.
//! 2. **UpToDate means equal**: a replica that `member_state` calls `UpToDate` (computed from
//!    its current report) holds exactly the history of the primary that confirmed it, up to
//!    its replay position, and its disk is that history's content.
//! 3. **Flushed writes survive**: every write acknowledged before a completed FLUSH is still
//!    in the timeline of the host that flushed it, across crashes (only an `invalidate` or
//!    `leave-resource` of that host, the operator's choice, may drop it).
//! 4. **Planned handovers lose nothing**: a host promoted without `--force` holds the whole
//!    history of the last primary that left its role cleanly.
//! 5. After each settle phase: **the metadata converged** (every store holds the same entries,
//!    stamps and origins once all messages are delivered and anti-entropy ran to its
//!    fixpoint), **at most one host acts as primary and it is the designated one**, and every
//!    consistent replica's disk is its timeline's content.
//!
//! # Simplified against the daemon, and why
//!
//! * Writes, syncs, writeback and replay steps are atomic: the byte-level crash behaviour of
//!   the log and the volume is what `mars_txlog`'s and `mars_volume`'s crash-image tests cover
//!   (`mars_storage::mem`); here only "durable or not" per record matters. A replica's fetched
//!   records are durable on arrival (the daemon accounts fetched bytes after its fdatasync).
//! * A full sync is two messages (start position, then the whole copy with its end position)
//!   instead of digest-compared chunks; resumption and rate limits are not modelled. A
//!   restarted ex-primary that becomes a replica writes its log back at once instead of
//!   replaying it (same outcome).
//! * Liveness is "heard from within 10 s" on any message, instead of `alive` stamps.
//! * No resize, no space pressure or emergency mode, no systemd; the application is one
//!   "device open" flag on the primary; `--force` on an acting primary takes the role back.
//! * Eight behaviours the daemon had are bugs the simulation found: the full sync's copy of
//!   unsynced data, a replaced empty copy that replay had passed, a sync kept across a change
//!   of source, a synced replica's missing link of the logfile before its start, a caught-up
//!   confirmation kept across a change of source, the fetch server's length-only
//!   `complete_by_link`, a fetch request that says nothing about the asker's history, link
//!   reclamation by a stale own pin (see [`SimConfig`]). All are fixed in the daemon now; by
//!   default the simulation runs the fixed behaviour, the switches bring the old one back, and
//!   tests show that the invariants catch them. The engine bugs it found are fixed in
//!   `mars_engine` itself (`entry_check`, the own-logfile case of `next_file_check`,
//!   `promotion`, `member_state`), each with a unit test there.
//! * Only safety is checked, not progress: a designated primary that never takes over, or a
//!   replica that never catches up, fails no check (the coverage figures of the soak runner
//!   show that handovers, failovers and `UpToDate` replicas do happen).
//!
//! # What it found
//!
//! Engine decisions, fixed in `mars_engine` with unit tests: a replica left its own logfile
//! without comparing it with the designated primary's (`next_file_check`); nothing checked
//! the step into a logfile of another origin (`entry_check`, new); a planned promotion
//! ignored unreachable members, went ahead during a split brain, and compared log positions
//! of different histories, reviving an abandoned branch (`promotion`); `member_state` called a
//! replica `UpToDate` on a positional confirmation although it had forked, its links differed
//! from the designated primary's, its chain check was waiting, or the confirming host was not
//! the designated primary. Daemon behaviours: the switches of [`SimConfig`].
//!
//! # Fixed: seed 4122
//!
//! Seed 4122 (`--steps 400`, found by the soak runner) failed until reports carried their
//! designation: `c` ran `primary` while, in its metadata, nobody acted as primary; in fact `a`
//! had just become primary and written two records. `a` left the role for `c` at once, and
//! `c`, whose view of `a` was still the report from before (a secondary at an older position),
//! promoted without `a`'s records. Every decision was taken on metadata that was right a
//! second earlier. Now each report says under which designation (the primary key's Lamport
//! stamp) it was made, and a planned promotion waits until every reachable member has
//! reported under its own (`mars_engine::roles::promotion`).

mod ghost;
mod host;
mod rng;
mod world;

use std::collections::BTreeMap;

pub use world::{run, STEP_MS};

/// How long a role command waits (ms), as `marsadm --timeout`.
pub const COMMAND_TIMEOUT: u64 = 30_000;

/// Variants of the simulated system. The default is the system as built with the daemon bugs
/// the simulation found fixed; the first two switches break the engine on purpose, the others
/// bring back the daemon's behaviour before each fix, to show that the invariants catch them.
#[derive(Debug, Clone, Default)]
pub struct SimConfig {
    /// Replay moves past a logfile whose version link differs from the origin's (the chain
    /// check of `mars_engine::plan::next_file_check` disabled).
    pub skip_chain_check: bool,
    /// A planned promotion goes at once, without waiting for the old primary to leave and
    /// for its last byte (`mars_engine::roles::promotion` ignored).
    pub planned_promotion_ignores_others: bool,
    /// The full sync as `daemon/src/logserve.rs` served it before the fix: chunks are read through the
    /// volume (newest data, durable or not) and the copy ends at the *appended* position. A
    /// primary crash after the copy loses records the replica's disk already holds, and the
    /// replica still becomes consistent once replay passes the (shorter) logfile: the
    /// simulation found this (see the crate docs). Off: the copy carries only durable data and
    /// ends at the durable position, the behaviour the fix must give.
    pub sync_serves_unsynced_data: bool,
    /// The replica's `open_copy` as `daemon/src/replica.rs` had it before the fix: an empty local copy
    /// of logfile N from another origin is replaced even when replay has already moved past
    /// it, so the records of the new N are never applied while the replica reports the new
    /// history's position. Off: such a copy is a fork (the fix).
    pub replace_replayed_empty_copy: bool,
    /// A full sync in progress keeps its start position and copied data when its source
    /// changes (`sync_session` in `daemon/src/replica.rs` resumes against whoever is the
    /// source now): after a failover to another history, the replica replays the new
    /// primary's logfiles over the old primary's copy. Off: the sync starts over (the fix).
    pub sync_survives_source_change: bool,
    /// A replica after a full sync starting at logfile N has no link of N-1 of its own and,
    /// as the daemon did before the fix (`plan::my_link`'s fallback), takes the *current* designated
    /// primary's when it needs one: after a failover to another history it cannot see that
    /// its copy continues a different logfile N-1. Off: the sync source sends its link of N-1
    /// with the start position and the replica publishes it as its own (the fix).
    pub sync_adopts_primary_link_later: bool,
    /// The replica keeps the last caught-up confirmation when its fetch source changes (the
    /// daemon keeps `caught_up` until it is 3 s old, whoever sent it): for those seconds a
    /// confirmation by the old source counts for the new one. Off: it is dropped (the fix).
    pub caught_up_survives_source_change: bool,
    /// The fetch server lets a replica skip past a logfile it has deleted when every version
    /// link of that logfile records the replica's length (`complete_by_link` in
    /// `daemon/src/logserve.rs`): lengths only, so a replica holding another history's
    /// logfile of the same length goes on with this host's next one. Off: all links must be
    /// equal to this host's own (the fix).
    pub complete_by_link_lengths_only: bool,
    /// The replica's fetch request carries only a position (`FetchFrom` before the fix): the server
    /// never learns that the asker's logfile before the requested one differs from its own,
    /// and its "you have everything" confirms a position on another history. Off: the request
    /// carries the asker's link of that logfile and the server refuses on a mismatch (the
    /// fix).
    pub fetch_request_without_history: bool,
    /// A host deletes its own version links below the oldest logfile anybody pins, counting
    /// its own *published* pin (`Daemon::reclaim`): a restarted ex-primary that waited as
    /// designated primary published no pin, deletes the link its replay position needs once
    /// it becomes a replica, and then cannot see that the next logfile continues another
    /// history. Off: its current replay position counts too (the fix).
    pub link_reclaim_uses_published_pin: bool,
}

impl SimConfig {
    /// The engine's switches of this run (`mars_engine::config::Bugs`). The executor-side
    /// switches (`sync_serves_unsynced_data`, `complete_by_link_lengths_only`) are the
    /// simulated servers' and stay off in the engine.
    pub fn engine_bugs(&self) -> mars_engine::config::Bugs {
        mars_engine::config::Bugs {
            skip_chain_check: self.skip_chain_check,
            planned_promotion_ignores_others: self.planned_promotion_ignores_others,
            replace_replayed_empty_copy: self.replace_replayed_empty_copy,
            sync_survives_source_change: self.sync_survives_source_change,
            sync_adopts_primary_link_later: self.sync_adopts_primary_link_later,
            caught_up_survives_source_change: self.caught_up_survives_source_change,
            complete_by_link_lengths_only: false,
            fetch_request_without_history: self.fetch_request_without_history,
            link_reclaim_uses_published_pin: self.link_reclaim_uses_published_pin,
            sync_serves_unsynced_data: false,
        }
    }
}

/// What happened in a run, for coverage reports.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub writes: u64,
    pub flushes: u64,
    pub crashes: u64,
    /// Role commands issued (planned, forced) and promotions completed (without, with force).
    pub handovers: u64,
    pub failovers: u64,
    pub planned_promotions: u64,
    pub forced_promotions: u64,
    pub invalidates: u64,
    pub joins: u64,
    pub leaves: u64,
    pub settles: u64,
    pub settled_with_primary: u64,
    pub up_to_date_checks: u64,
    pub end_states: BTreeMap<String, u64>,
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub steps: u64,
    /// The first invariant violated, if any.
    pub error: Option<String>,
    /// Every event, one line each: the same seed gives the same trace.
    pub trace: Vec<String>,
    pub stats: Stats,
}

impl Outcome {
    /// The failure report: seed, violation and the end of the trace.
    pub fn report(&self, lines: usize) -> String {
        let skip = self.trace.len().saturating_sub(lines);
        format!(
            "seed {} failed: {}\n--- last {} of {} trace lines ---\n{}\n--- replay with: \
             cargo run -p mars-sim --release -- --seed {} --steps {} ---",
            self.seed,
            self.error.as_deref().unwrap_or("(no violation)"),
            self.trace.len() - skip,
            self.trace.len(),
            self.trace[skip..].join("\n"),
            self.seed,
            self.steps
        )
    }
}
