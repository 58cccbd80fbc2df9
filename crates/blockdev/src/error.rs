//! Errors of this crate.

use std::io;
use std::path::PathBuf;

use crate::Device;

/// Why an operation on a [`Device`] (or [`cleanup_stale`](crate::cleanup_stale)) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockdevError {
    /// The device name cannot be used as a file name in the device directory.
    #[error(
        "invalid device name {0:?}: must be 1..=64 bytes of [A-Za-z0-9._+-], not starting with '.'"
    )]
    InvalidName(String),
    /// The export's size (or the requested new size) cannot be used: it must be a non-zero
    /// multiple of 512 (the loop device counts 512-byte sectors), fit the kernel's `loff_t`,
    /// and a resize may only grow.
    #[error("invalid size {size}: {reason}")]
    InvalidSize {
        /// The offending size in bytes.
        size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(&'static str),
    /// A live device of this name is served from this device directory already (its FUSE
    /// mount answers): another process (or a leaked [`Device`]) has it. Leftovers of a crashed
    /// run are not this error: [`Device::attach`] replaces them.
    #[error("{0} is a live block device already (served by another process with the same device directory?)")]
    AlreadyExists(PathBuf),
    /// Something that is not a device of ours stands at the device's path (a file, a
    /// directory, a device node, a link elsewhere, another filesystem mounted at the private
    /// mount point): it is left alone.
    #[error("{path} exists and is not a device of marsd ({what}): remove it or use another device directory")]
    Foreign {
        /// The path in the device directory.
        path: PathBuf,
        /// What stands there.
        what: String,
    },
    /// The block device is open (a mounted filesystem, a process holding it open, a
    /// device-mapper table, ...): it was left alone.
    #[error("block device {device} is in use ({users} user(s))")]
    InUse {
        /// The loop device, e.g. `/dev/loop3`.
        device: PathBuf,
        /// Number of users found (see [`Device::open_count`]).
        users: usize,
    },
    /// No free loop device could be obtained (all taken, or others grabbed the free ones
    /// faster several times in a row).
    #[error("no free loop device: {0}")]
    NoLoopDevice(#[source] io::Error),
    /// Mounting the private FUSE filesystem failed.
    #[error("mounting FUSE filesystem at {path} failed: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Unmounting the private FUSE filesystem failed.
    #[error("unmounting FUSE filesystem at {path} failed: {source}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A loop device ioctl failed.
    #[error("loop ioctl {op} on {device} failed: {source}")]
    LoopIoctl {
        /// Name of the ioctl, e.g. `LOOP_CONFIGURE`.
        op: &'static str,
        /// The device it was issued on.
        device: PathBuf,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },
    /// The loop device did not pick up the new size after `LOOP_SET_CAPACITY`.
    #[error("loop device {device} reports {got} bytes after resize, expected {expected}")]
    ResizeNotVisible {
        /// The loop device.
        device: PathBuf,
        /// Size the kernel reports.
        got: u64,
        /// Size we asked for.
        expected: u64,
    },
    /// Some other file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl BlockdevError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn ioctl(op: &'static str, device: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::LoopIoctl {
            op,
            device: device.into(),
            source,
        }
    }
}

/// Why [`Device::detach`] failed.
///
/// When nothing was changed (the device is in use), the still attached and fully working
/// [`Device`] is handed back in `device` so the caller can retry later. When the teardown had
/// already started, `device` is `None` and the rest was cleaned up best-effort.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct DetachError {
    /// The device, unchanged, if the detach was refused before anything was touched.
    pub device: Option<Box<Device>>,
    /// What went wrong.
    #[source]
    pub error: BlockdevError,
}
