//! Deterministic simulation of the replication engine and the replicated metadata.
//!
//! One `u64` seed decides everything: four simulated hosts (`a` … `d`) run one resource, a
//! simulated network carries metadata and log data between them, faults and operator commands
//! arrive at random, and after every step the invariants below are checked. A failing seed is
//! reported with its trace and runs again identically (`cargo run -p mars-sim --release --
//! --seed S`; `MARS_SIM_DEBUG_LINKS=1` adds every version link published or deleted to the
//! trace). `cargo test -p mars-sim` runs 200 fixed seeds; the binary is the soak runner
//! (`--seeds N --steps M`, prints seeds per second and coverage figures).
//!
//! # The model: the real engine, a simulated executor
//!
//! Each simulated host runs one real [`mars_engine::resource::ResourceEngine`] for the
//! resource, the state machine the daemon runs, built from the same `Timing::standard()`. The
//! simulation holds **no copy of a daemon decision**: which role to take up, when to promote,
//! fencing and stepping down, where to fetch from, which copy to accept, replay's chain
//! checks, the full sync and its restarts, reclamation of logfiles and links, the report, the
//! guards and phases of the operator's commands — all of it is the engine's. What the
//! simulation adds is what the daemon's executor does: it carries out the engine's `Command`s
//! against simulated state and feeds back the events the engine expects (`host/exec.rs`,
//! `host/session.rs`), and it serves fetch and sync sessions to other hosts asking
//! `mars_engine::serve` for every decision (`host/serve.rs`).
//!
//! * **Time** advances 250 ms per step. Each step: up to two random events, delivery of the
//!   messages that are due, anti-entropy pulls, and on every running host one round: the
//!   metadata and liveness its engine has not seen yet, its sessions' next steps (requests,
//!   timeouts, a batch of replay), writeback, fresh statistics when they changed or when the
//!   engine's `wake_at` is due. Each event is handed to the engine with `Now { ms, wall_ns }`
//!   (a monotonic clock and the host's skewed wall clock); the commands of its output are
//!   carried out in order and their completions queued as further events, until nothing is
//!   left (a cascade of more than 1000 events is reported as a livelock).
//! * **Metadata** is the real thing: each host has a `mars_meta::Store` (redb in memory) whose
//!   clock is the simulated time plus a per-host skew of up to ±2 s. `Command::Publish` writes
//!   to it (the stamps of a tagged publication come back as `Done::Published`); whenever the
//!   store changed, the engine gets `Event::Meta` built with `ResourceMeta::from_stamped`, so
//!   the designation's and the systemd want's stamps are the store's. Hosts pull "changes
//!   after N" from each other over the lossy network, one question in flight per pair; the
//!   answer is taken when the question is sent and may arrive late, reordered or not at all.
//! * **Liveness** is the simulation's: a host counts as reachable if heard from (any message)
//!   within `Timing::alive_window`, as pinning within `defaults/unreachable-limit` (30 s here,
//!   so that long partitions exercise the "needs a full sync" path); `fresh` once every other
//!   host of the cluster was heard from since the restart. `Event::Liveness` is sent when it
//!   changes.
//! * **The log** is a map of logfiles, each a list of records; a record is an id into a table
//!   that knows which block it writes (its data is the id). Offsets count records (the
//!   engine's "bytes"). The disk is a map block → record id. The application (one "device
//!   open" flag, the `open_count` of `Event::Stats`) writes on the host whose volume is open,
//!   unless the engine fenced it, and opens the device only where the engine said
//!   `SetDesignated(true)`; records are acknowledged at once and made durable by group commit
//!   or FLUSH; background writeback moves the volume's writeback position.
//! * **The executor** carries out every command: `Persist` writes the control files of the
//!   resource directory (markers, replay or writeback position, `sync.toml`, the needs-sync
//!   reason, the chain start); `OpenVolume` recovers the log from the writeback position and
//!   continues in a new logfile; `StepDown` (refused while the application has the device
//!   open) closes the volume, drops an empty own last logfile, sets the replay position to the
//!   end of the log and opens the replica; `OpenReplica` reports the local copies, the replay
//!   position and the sync state; `Promote` cuts what was fetched beyond the replay position
//!   and opens the volume; `Rotate`, `ReclaimLogs`, `DropCopiesBelow`, `ResetCopies`,
//!   `RepairCopies` act on the logfiles; `Teardown` deletes the host's keys and directory.
//!   Fetch, replay and sync sessions run over steps: a fetch session asks its source for
//!   pieces of logfiles (the asker's link of the logfile before the first one travels with the
//!   requests until the first answer, as `FetchFrom` at the start of a connection), offers
//!   each logfile the source names to the engine and waits for its `CopyDecision`, appends
//!   pieces that continue the copy exactly (a lost, late or repeated answer is dropped),
//!   reports `Durable`, `End` and the source's `CaughtUp`; replay applies up to 8 records a
//!   round and persists its position; a sync asks for the start, waits for `SyncGo`, then for
//!   the copy. A session without an answer for three request timeouts, or whose server
//!   restarted meanwhile, ends with an error and the engine retries after its backoff.
//! * **The servers** answer with `serve::fetch_start` (role, the asker's history, emergency),
//!   `serve::next_file` at every logfile boundary (serve, skip a deleted logfile the asker has
//!   whole, gone, wait, refuse), `serve::asker_ahead`, `serve::sync_start` and
//!   `serve::own_link` (the link of the logfile before a sync's start); a primary confirms
//!   "caught up" when the asker reached its durable end. A sync start rotates the log and tells
//!   the serving engine (`Event::ServingSync`, its transient pin).
//! * **Crashes** drop the engine (everything in memory) and the sessions, and lose the
//!   primary's unsynced log tail. What survives is what the executor persisted: the control
//!   files, the store, durable log records, the disk. A restarted host builds a new engine and
//!   tells it `Event::Started` with the control facts, then the metadata and liveness.
//! * **Faults and operator commands**: message loss (0–30 %), delays of up to six steps
//!   (reordering), one-way and two-way link cuts and their healing, crashes and restarts;
//!   writes, FLUSH, group commit, application start/stop. The operator's commands go to the
//!   engine as `Event::Op` and the world waits for its `Command::Reply`: `cron`, pause/resume
//!   of fetch and replay (`Op::Switch`), `invalidate`, `secondary`, `leave-resource --force`,
//!   the planned handover (`primary`; once the command runs, the operator stops the
//!   application on the host acting as primary, as systemd there would), and the forced
//!   failover (`pause-fetch`, `resume-replay` if needed, `primary --force`; on a host acting
//!   as primary `primary --force` takes the role back). `join-resource` is the daemon's, not
//!   the engine's: it sets up a directory with a full sync pending and the membership keys,
//!   then starts the engine. Every 100 steps and at the end a *settle* phase heals the
//!   network, restarts every host, closes devices left open on hosts no longer designated and
//!   lets things run.
//!
//! # Invariants (checked after every step, `world.rs`)
//!
//! The simulation keeps ghost state the hosts never read (`ghost.rs`): every record with the
//! record it followed in its writer's history, so all primaries' histories form a tree, and
//! per host its *timeline*, the records its data (disk and log) is built from.
//!
//! 1. **No replica applies a record past a fork**: each applied record must be the next one of
//!    the replica's timeline in the tree (or the same record again, when replay after a full
//!    sync re-applies what the copy had, or a restarted ex-primary replays its own log), so a
//!    replica's history is always a prefix of one primary history.
//! 2. **UpToDate means equal**: a replica that `member_state` calls `UpToDate` (computed from
//!    its engine's current report and metadata) holds exactly the history of the host whose
//!    caught-up confirmation its engine took, and of the host it fetches from now, up to its
//!    replay position, and its disk is that history's content.
//! 3. **Flushed writes survive**: every write acknowledged before a completed FLUSH is still
//!    in the timeline of the host that flushed it, across crashes (only an `invalidate` or
//!    `leave-resource` of that host, the operator's choice, may drop it).
//! 4. **Planned handovers lose nothing**: a host promoted while the operator's last `primary`
//!    command there was not `--force` holds the whole history of the last primary that left
//!    its role cleanly.
//! 5. After each settle phase: **the metadata converged** (every store holds the same entries,
//!    stamps and origins once all messages are delivered and anti-entropy ran to its
//!    fixpoint), **at most one host acts as primary and it is the designated one**, and every
//!    consistent replica's disk is its timeline's content up to its replay position.
//!
//! Besides, the executor reports as a violation any command it cannot carry out on the
//! simulated state (a copy decision about a logfile that is not there, a replay of a copy
//! that is shorter than asked …): the engine and its executor disagree.
//!
//! # Simplified against the daemon, and why
//!
//! * Writes, syncs, writeback and replay batches are atomic: the byte-level crash behaviour of
//!   the log and the volume is what `mars_txlog`'s and `mars_volume`'s crash-image tests cover
//!   (`mars_storage::mem`); here only "durable or not" per record matters. A replica's fetched
//!   records are durable on arrival (the daemon accounts fetched bytes after its fdatasync);
//!   nothing is ever damaged, so `RepairCopies` and `ReplayEnd::Damaged` do not occur.
//! * A full sync is two exchanges (the start, then the whole copy with its end position)
//!   instead of digest-compared chunks; rates, progress and `NoSlot` (`defaults/sync-limit`)
//!   are not modelled. The fetch stream is a request per answer (one in flight) rather than a
//!   connection; the server keeps no state between requests.
//! * Liveness is "heard from" on any message, instead of `alive` stamps in the store; a
//!   restarted host has heard nobody yet (so, unlike the daemon, it lets every other member's
//!   pin lapse until it hears from it).
//! * No resize, no space pressure or emergency mode, no systemd stack, no `down`/`up`, no
//!   `delete-resource`, `log-purge-all` or `fake-sync`: the executor answers `Grow`,
//!   `EnterPassthrough`, `RestartLog` with an error and `RunUnit` with no status, and free
//!   space is never reported.
//! * Two behaviours of the daemon's servers that the simulation found wrong are executor
//!   switches here ([`SimConfig`]): the full sync's copy of unsynced data
//!   (`sync_serves_unsynced_data`) and the length-only `complete_by_link`
//!   (`complete_by_link_lengths_only`). The other switches are the engine's
//!   (`mars_engine::config::Bugs`, built with the `bugs` feature): each brings back one old
//!   engine behaviour. `tests/seeds.rs` shows that the invariants catch eight of the ten (each
//!   at a seed the system as built passes); `complete_by_link_lengths_only` and
//!   `fetch_request_without_history` broke no invariant in 4000 seeds × 400 steps since the
//!   engine drives the simulation (presumably because a replica now also refuses a caught-up
//!   confirmation unless the entry check of the confirmed logfile passes: a second line of
//!   defence against the same confirmation on another history; not verified).
//! * Only safety is checked, not progress: a designated primary that never takes over, or a
//!   replica that never catches up, fails no check (the coverage figures of the soak runner
//!   show that handovers, failovers and `UpToDate` replicas do happen).
//!
//! # What it found
//!
//! Before it drove the engine, in engine decisions (fixed in `mars_engine` with unit tests): a
//! replica left its own logfile without comparing it with the designated primary's
//! (`next_file_check`); nothing checked the step into a logfile of another origin
//! (`entry_check`, new); a planned promotion ignored unreachable members, went ahead during a
//! split brain, and compared log positions of different histories, reviving an abandoned
//! branch (`promotion`); `member_state` called a replica `UpToDate` on a positional
//! confirmation although it had forked, its links differed from the designated primary's, its
//! chain check was waiting, or the confirming host was not the designated primary; and the
//! daemon behaviours that are the switches of [`SimConfig`].
//!
//! Driving the `ResourceEngine` (each fixed in `mars_engine` with a unit test in
//! `resource/tests.rs` named after what it shows):
//!
//! * the completion of `ReclaimLogs` left the deleted logfiles in the engine's volume
//!   statistics, so it asked to reclaim them again at once, forever (a livelock with the
//!   executor, the first seed that rotated);
//! * a full sync restarted by a change of source purged this host's links and adopted the new
//!   source's link of the logfile before the start in one publication that set and deleted
//!   the same key (seed 80);
//! * a caught-up confirmation of a position at the start of a logfile that replay (paused) had
//!   not entered made a replica of another history `UpToDate` (seed 182);
//! * a planned promotion took a member's own version link as the witness that its log end lies
//!   in our history, and could not place the log end of a member of another branch once our
//!   own link of the fork was reclaimed (seed 247);
//! * a handover that timed out gave the role back to the old primary although it had been
//!   invalidated and had left the resource (seed 915);
//! * a full sync was taken without the source's link of the logfile before its start (a
//!   non-designated acting primary publishes none), leaving every later chain check with
//!   nothing to compare (seed 1775);
//! * a designated host that restarted before it took over promoted at once on its metadata
//!   from before the crash, nobody being reachable yet (seed 3164);
//! * a force marker left from an earlier `primary --force` turned a later planned handover into
//!   a forced one (seed 3285);
//! * a planned promotion missed a fork exactly at a logfile start: the links of the logfile
//!   before agreed (seed 3919);
//! * a fork with the source stopped the replay of the host's own logfile too (a restarted
//!   ex-primary replays its own log from its writeback position), and a forced switch then cut
//!   its own flushed writes (seed 2369);
//! * after a fork the fetch started again at once: a new session and the same error every round
//!   trip (seen in the traces).
//!
//! And on the daemon's side (outside the engine): `join-resource` must create the directory
//! with the replica marker, or a host that joins while the metadata still designates it opens
//! its empty disk as the primary's volume (seed 915).
//!
//! # Fixed: seed 4122
//!
//! Seed 4122 (`--steps 400`, found by the soak runner before the engine was a state machine)
//! failed until reports carried their designation: `c` ran `primary` while, in its metadata,
//! nobody acted as primary; in fact `a` had just become primary and written two records. `a`
//! left the role for `c` at once, and `c`, whose view of `a` was still the report from before
//! (a secondary at an older position), promoted without `a`'s records. Every decision was
//! taken on metadata that was right a second earlier. Now each report says under which
//! designation (the primary key's Lamport stamp) it was made, and a planned promotion waits
//! until every reachable member has reported under its own (`mars_engine::roles::promotion`).

mod ghost;
mod host;
mod rng;
mod world;

use std::collections::BTreeMap;

pub use world::{run, STEP_MS};

/// How long a role command waits (ms), as `marsadm --timeout`.
pub const COMMAND_TIMEOUT: u64 = 30_000;

/// Variants of the simulated system. The default is the system as built, with every bug the
/// simulation found fixed; each switch brings one old behaviour back, to show that the
/// invariants catch it. Most are the engine's switches ([`SimConfig::engine_bugs`] hands them
/// to `mars_engine::config::Bugs`); `sync_serves_unsynced_data`,
/// `complete_by_link_lengths_only` and `fetch_without_tail` are the simulated servers' (the
/// executor's side), modelled as the daemon's servers must NOT behave.
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
    /// The fetch server does not compare the asker's copy before its position with its own
    /// (`FetchFrom` before `tail`): a replica holding an earlier incarnation of a logfile — the
    /// same number and writer, written again after the writer was fully synced from a host
    /// where it had not begun — appends the new incarnation's records to the old ones and
    /// replays them past a fork. Off: the request carries the digest of the asker's bytes
    /// before its position and the server refuses on a mismatch (the fix).
    pub fetch_without_tail: bool,
    /// The fetch and sync servers serve any host of the cluster, not only members of the
    /// resource (the rule before members-only serving). Not a bug of its own: it brings back
    /// the runs in which rare bugs were first found (seed 1953 of
    /// `replace_replayed_empty_copy`), which members-only serving changed.
    pub serve_non_members: bool,
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
