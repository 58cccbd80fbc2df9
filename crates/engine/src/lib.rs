//! The replication engine: every decision about a resource, without I/O, clock or threads.
//!
//! [`resource::ResourceEngine`] is one resource on one host as a state machine: events go in
//! (the resource's metadata, members' reachability, local measurements, operator requests,
//! completions of what it asked for) and commands come out (publish keys, persist a control
//! file, open or close the volume, start or stop fetch, replay and sync sessions, accept a
//! copy, run a systemd job, reply to the operator …). The daemon runs one actor per resource
//! that executes the commands; the simulation (`mars-sim`) executes them against simulated
//! disks and networks. Tests feed events and assert the commands.
//!
//! Around it, pure functions the state machine and the servers use: the metadata schema
//! (`keys`), members and their reports (`model`), the version chain (`version`), log
//! reclamation, the chain checks and MARS's state names (`plan`), roles (`roles`), the systemd
//! decision (`systemd`), the fetch and sync servers' decisions (`serve`), typed reasons
//! (`reason`) and the one set of timing constants (`config`).

pub mod config;
pub mod keys;
pub mod model;
pub mod plan;
pub mod reason;
pub mod request;
pub mod resource;
pub mod roles;
pub mod serve;
pub mod systemd;
pub mod version;

pub use config::{EngineConfig, HostSettings, Timing};
pub use model::{Member, Report, ResourceMeta, Role, SyncReport, Todo};
pub use plan::{
    entry_check, member_state, next_file_check, reclaim_below, ChainCheck, MemberState,
};
pub use reason::{OpError, OpErrorKind, StuckKind};
pub use request::{RequestId, SwitchRequest};
pub use resource::ResourceEngine;
pub use roles::{fetch_source, promotion, split_brain, Promotion, SplitBrain};
pub use systemd::{want_op, SystemdMeta, UnitOp, UnitStatus};
