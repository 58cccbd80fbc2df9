//! Deterministic simulation of the replication engine and the replicated metadata.
//! (Full model description below, to be completed.)

mod ghost;
mod host;
mod rng;
mod world;

use std::collections::BTreeMap;

pub use world::{run, STEP_MS};

/// How long a role command waits (ms), as `marsadm --timeout`.
pub const COMMAND_TIMEOUT: u64 = 30_000;

/// Variants of the simulated system. The default is the system as built, except for the full
/// sync's end (see `sync_serves_unsynced_data`); the switches break it on purpose, to show that
/// the invariants catch what they are meant to catch.
#[derive(Debug, Clone, Default)]
pub struct SimConfig {
    /// Replay moves past a logfile whose version link differs from the origin's (the chain
    /// check of `mars_engine::plan::next_file_check` disabled).
    pub skip_chain_check: bool,
    /// A planned promotion goes at once, without waiting for the old primary to leave and
    /// for its last byte (`mars_engine::roles::promotion` ignored).
    pub planned_promotion_ignores_others: bool,
    /// The full sync as `daemon/src/logserve.rs` serves it today: chunks are read through the
    /// volume (newest data, durable or not) and the copy ends at the *appended* position. A
    /// primary crash after the copy loses records the replica's disk already holds, and the
    /// replica still becomes consistent once replay passes the (shorter) logfile: the
    /// simulation found this (see the crate docs). Off: the copy carries only durable data and
    /// ends at the durable position, the behaviour the fix must give.
    pub sync_serves_unsynced_data: bool,
    /// The replica's `open_copy` as `daemon/src/replica.rs` has it today: an empty local copy
    /// of logfile N from another origin is replaced even when replay has already moved past
    /// it, so the records of the new N are never applied while the replica reports the new
    /// history's position. Off: such a copy is a fork (the fix).
    pub replace_replayed_empty_copy: bool,
    /// A full sync in progress keeps its start position and copied data when its source
    /// changes (`sync_session` in `daemon/src/replica.rs` resumes against whoever is the
    /// source now): after a failover to another history, the replica replays the new
    /// primary's logfiles over the old primary's copy. Off: the sync starts over (the fix).
    pub sync_survives_source_change: bool,
}

/// What happened in a run, for coverage reports.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub writes: u64,
    pub flushes: u64,
    pub crashes: u64,
    pub handovers: u64,
    pub failovers: u64,
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
             cargo run -p mars-sim --release -- --seed {} ---",
            self.seed,
            self.error.as_deref().unwrap_or("(no violation)"),
            self.trace.len() - skip,
            self.trace.len(),
            self.trace[skip..].join("\n"),
            self.seed
        )
    }
}
