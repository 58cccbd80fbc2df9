//! The replicated metadata on this host: the store and its owner thread (`store.rs`), and the
//! cluster around it: membership, liveness stamps, pulling and serving changes, join and leave
//! (`cluster.rs`), the signatures over what this host owns (`authority.rs`), and the groups
//! and checks of `split-cluster` (`split.rs`).

pub mod authority;
pub mod cluster;
pub mod split;
pub mod store;

pub use cluster::Cluster;
pub use store::MetaStore;

/// The metadata store inside the root.
pub const META_FILE: &str = "meta.redb";
