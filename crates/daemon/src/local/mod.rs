//! Local storage of a resource on this host: the primary's volume, export and device
//! (`volume.rs`), and a replica's directory: copies, disk and control files (`replica.rs`).
//! Everything here blocks on disk I/O; the layers above call it on blocking threads.

pub mod replica;
pub mod space;
pub mod volume;

pub use replica::ReplicaDir;
pub use volume::{DeviceMode, Shared, Tuning};
