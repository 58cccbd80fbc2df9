//! Replication decisions without I/O.
//!
//! The daemon collects facts (the resource's replicated metadata, its own local positions, the
//! liveness of members, the clock) and asks this crate what they mean: which logfiles may be
//! deleted, whether replay may move from logfile N to N+1, what MARS calls the state of each
//! member (`UpToDate`, `OutDated[FR]`, `Replaying`, flags `DCASFR`). Everything here is
//! deterministic and tested by the answers it gives; the daemon owns the side effects.

pub mod keys;
pub mod model;
pub mod plan;
pub mod roles;
pub mod systemd;
pub mod version;

pub use model::{Member, Report, ResourceMeta, Role, SyncReport, Todo};
pub use plan::{
    entry_check, member_state, next_file_check, reclaim_below, ChainCheck, MemberState,
};
pub use roles::{fetch_source, promotion, split_brain, Promotion, SplitBrain};
pub use systemd::{want_op, SystemdMeta, UnitOp, UnitStatus};
