//! A local block device (`/dev/mars/<name>`) for an [`Export`], without NBD.
//!
//! # Design
//!
//! The kernel offers no generic "block device served by a user-space process" that is always
//! there: `nbd` is a module many kernels (including ours) lack, `ublk` is new and often
//! missing too. FUSE and the loop driver are nearly universal, so a device is built from both:
//!
//! ```text
//!  mkfs / mount / dd                                        this process
//!        │                                            ┌──────────────────────┐
//!   /dev/mars/<name> ──symlink──▶ /dev/loopN          │ fuser threads (N)    │
//!                                   │ loop driver,    │   read  → Export::read
//!                                   │ LO_FLAGS_DIRECT_IO   write → Export::write
//!                                   ▼                 │   fsync → Export::flush
//!     <dev_dir>/.fuse-<name>/<name>  (FUSE file) ────▶│   fallocate → write_zeroes
//!                                                     └──────────────────────┘
//! ```
//!
//! * A private FUSE filesystem (`fuser` crate, pure-Rust mount: as root it calls `mount(2)`,
//!   so no libfuse is needed) is mounted on `<dev_dir>/.fuse-<name>`. It holds one regular
//!   file, `<name>`, of the export's size; its requests go straight to the [`Export`] trait.
//! * That file is bound to a free loop device with `LOOP_CONFIGURE` (fallback for kernels
//!   before 5.8: `LOOP_SET_FD` + `LOOP_SET_STATUS64` + `LOOP_SET_BLOCK_SIZE` +
//!   `LOOP_SET_DIRECT_IO`), see `loopdev.rs` for the ioctl layouts.
//! * `<dev_dir>/<name>` is a **symlink** to `/dev/loopN`, exactly what udev does for
//!   `/dev/disk/by-*`: `mkfs`, `mount`, `fsck`, `blkid` all follow it, and the kernel reports
//!   the real node (`/dev/loopN`) in `/proc/mounts`. A `mknod`'d copy would work as well but
//!   would be a second node to keep in sync with a device number that is only borrowed.
//!
//! # Data path and durability
//!
//! * **Direct I/O in the loop driver** (`LO_FLAGS_DIRECT_IO`): the loop driver submits
//!   asynchronous `O_DIRECT` reads and writes at the block offsets, instead of copying
//!   through the page cache of the backing file. With `FUSE_ASYNC_DIO` the kernel sends
//!   several of them to us concurrently, served by several threads (`clone_fd`, one
//!   `/dev/fuse` descriptor per thread).
//! * **`FOPEN_DIRECT_IO`** on the FUSE file: whoever opens it (the loop driver, or anyone
//!   who looks into the private mount), there is no page cache, so a write has reached
//!   [`Export::write`] when it completes, and a read always sees the export.
//! * **FLUSH**: the block layer turns cache flushes and FUA writes of the filesystem on the
//!   loop device into `REQ_OP_FLUSH` (the loop device announces a volatile write cache but
//!   no FUA), which the loop driver executes as `vfs_fsync` on the backing file, which FUSE
//!   delivers as `FSYNC`: that is mapped to [`Export::flush`]. `FLUSH` (sent on `close`) is
//!   mapped to [`Export::flush`] as well.
//! * **Discard / write-zeroes** arrive as `fallocate(PUNCH_HOLE)` or
//!   `fallocate(ZERO_RANGE)`; the loop driver uses `PUNCH_HOLE` for both a discard and a
//!   write-zeroes, so both become [`Export::write_zeroes`] (the punch with `may_trim`).
//!
//! # Open count
//!
//! A handover must wait until nobody uses the device. The kernel's own count of opens is not
//! exported; [`Device::open_count`] adds up what is visible (see `usage.rs`): descriptors of
//! any process in `/proc/*/fd` that refer to the device, stacked devices in
//! `/sys/block/loopN/holders`, and, when those are zero, an `O_EXCL` probe open which fails
//! with `EBUSY` while a filesystem is mounted on the device (in any namespace), it is used as
//! swap, or someone else opened it exclusively (`mkfs` does). The device's own descriptor
//! (see below) is not counted. [`Device::detach`] then lets the kernel have the last word:
//! `LOOP_CLR_FD` only unbinds if our descriptor is the only open.
//!
//! # Lifetime and cleanup
//!
//! The loop device is bound with `LO_FLAGS_AUTOCLEAR`, and the [`Device`] keeps one
//! read-only open of it. If the process dies, the kernel closes that descriptor; the loop
//! device unbinds itself as soon as no one else has it open, and the FUSE connection dies
//! with the process (its `/dev/fuse` descriptors are closed). What is left is a dead FUSE
//! mount (`ENOTCONN`) and a dangling symlink: [`cleanup_stale`] removes them, and unbinds
//! (or marks for unbinding) loop devices whose backing file lies in such a mount.
//!
//! [`Device::detach`] refuses while the device is in use and otherwise unbinds the loop
//! device, removes the symlink, unmounts FUSE (which ends the server threads) and removes the
//! mount point. Dropping a [`Device`] does the same best-effort; if the device is still in use
//! then, its users are cut off (the FUSE connection is aborted and their I/O fails with
//! `EIO`, like a pulled disk) and the loop device unbinds when they close it.
//!
//! # Caveats
//!
//! * The process serving the FUSE file must not itself do I/O to the block device from a
//!   FUSE thread, and, as with any user-space block device, memory reclaim that writes back
//!   through the device while the server needs memory can deadlock under extreme pressure.
//! * Everything here needs root (`CAP_SYS_ADMIN`): mounting, loop ioctls, `/proc/*/fd`.
//! * Aborting a FUSE connection (teardown of a device still in use, [`cleanup_stale`] of a
//!   leaked one) writes to `/sys/fs/fuse/connections/<n>/abort`; if `fusectl` is not mounted
//!   there (systemd mounts it), it is mounted on first need.
//! * The open count is a snapshot: udev's short probe after a device appears or changes, or
//!   a `blkid` run, counts while it lasts, so [`DetachError`] with
//!   [`BlockdevError::InUse`] is worth retrying.
//! * Our mounts show as type `fuse` with source `mars-blockdev:<name>` (fuser's own
//!   `mount(2)` drops the subtype); [`cleanup_stale`] recognises them by that source and by
//!   their mount point `<dev_dir>/.fuse-<name>`.

mod error;
mod fs;
mod loopdev;
mod mounts;
mod stale;
mod usage;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use mars_nbd::Export;

pub use error::{BlockdevError, DetachError};

use fs::{BlockFs, FsTuning, Shared};
use loopdev::{BindOptions, LoopDevice};

/// How long teardown waits for the kernel (loop unbinding, the FUSE mount becoming
/// unmountable, server threads ending) before falling back to harsher means.
const TEARDOWN_PATIENCE: Duration = Duration::from_secs(5);

/// Options of [`Device::attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Threads serving FUSE requests (each with its own `/dev/fuse` descriptor). At least 1.
    pub threads: usize,
    /// Logical block size of the loop device: 512 (default, what most disks and the kernel
    /// NBD client use, so a filesystem can move between them), 1024, 2048 or 4096.
    pub block_size: u32,
    /// Ask the loop driver for direct I/O (default). Without it the loop driver uses
    /// buffered I/O on the FUSE file, which is still correct (the file has no page cache)
    /// but serialises requests.
    pub direct_io: bool,
    /// How many asynchronous requests the kernel may have outstanding towards the FUSE
    /// server (`max_background`); bounds the effective queue depth. At least 1.
    pub max_background: u16,
    /// Set the loop device up the pre-5.8 way (`LOOP_SET_FD`, `LOOP_SET_STATUS64`,
    /// `LOOP_SET_BLOCK_SIZE`, `LOOP_SET_DIRECT_IO`) even where `LOOP_CONFIGURE` exists.
    /// That path is taken automatically on old kernels; this exists to test it.
    pub legacy_loop_setup: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            threads: 4,
            block_size: 512,
            direct_io: true,
            max_background: 128,
            legacy_loop_setup: false,
        }
    }
}

/// An exported volume as a local block device: see the [crate documentation](crate).
#[derive(Debug)]
pub struct Device {
    name: String,
    /// `<dev_dir>/<name>`, the symlink to the loop device.
    node: PathBuf,
    /// `<dev_dir>/.fuse-<name>`, the private FUSE mount point.
    mount_point: PathBuf,
    /// `<mount_point>/<name>`, the FUSE file the loop device reads and writes.
    backing_path: PathBuf,
    /// `None` only during teardown.
    loop_dev: Option<LoopDevice>,
    /// The FUSE server threads; `None` only during teardown.
    session: Option<Server>,
    /// `st_dev` of the FUSE mount, names its connection in fusectl.
    fuse_dev: Option<(u32, u32)>,
    shared: Arc<Shared>,
    read_only: bool,
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Stale FUSE mounts that were unmounted (lazily if still referenced).
    pub mounts: Vec<PathBuf>,
    /// Loop devices (numbers) that were unbound.
    pub loops_unbound: Vec<u32>,
    /// Loop devices still held open by someone (e.g. a filesystem still mounted on them):
    /// they are marked to unbind on their last close, their I/O fails meanwhile.
    pub loops_busy: Vec<u32>,
    /// Device symlinks removed.
    pub nodes: Vec<PathBuf>,
}

fn validate_name(name: &str) -> Result<(), BlockdevError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
    if ok {
        Ok(())
    } else {
        Err(BlockdevError::InvalidName(name.to_owned()))
    }
}

fn validate_size(size: u64) -> Result<(), BlockdevError> {
    let reason = if size == 0 {
        "must not be zero"
    } else if !size.is_multiple_of(512) {
        "must be a multiple of 512"
    } else if size > i64::MAX as u64 {
        "larger than the kernel's file size limit"
    } else {
        return Ok(());
    };
    Err(BlockdevError::InvalidSize { size, reason })
}

fn validate_options(opts: &DeviceOptions) -> Result<(), BlockdevError> {
    if opts.threads == 0 || opts.threads > 256 {
        return Err(BlockdevError::InvalidOption("threads must be 1..=256"));
    }
    if !matches!(opts.block_size, 512 | 1024 | 2048 | 4096) {
        return Err(BlockdevError::InvalidOption(
            "block_size must be 512, 1024, 2048 or 4096",
        ));
    }
    if opts.max_background == 0 {
        return Err(BlockdevError::InvalidOption(
            "max_background must be at least 1",
        ));
    }
    Ok(())
}

/// Number N of a `/dev/loopN` path.
fn loop_number_of(target: &Path) -> Option<u32> {
    target.to_str()?.strip_prefix("/dev/loop")?.parse().ok()
}

impl Device {
    /// Makes `export` available as the block device `<dev_dir>/<name>` (a symlink to
    /// `/dev/loopN`). `dev_dir` is created if missing; the FUSE mount point is
    /// `<dev_dir>/.fuse-<name>`.
    ///
    /// What a crashed run of ours left at `<dev_dir>/<name>` and `<dev_dir>/.fuse-<name>` (a
    /// dead FUSE mount, a link to a loop device that is unbound or was reused by somebody
    /// else) is replaced. Fails with [`BlockdevError::AlreadyExists`] if a live device of this
    /// name is mounted there (another process), with [`BlockdevError::Foreign`] if something
    /// that is not ours stands there. On failure everything created so far is removed again.
    pub fn attach(
        export: Arc<dyn Export>,
        dev_dir: &Path,
        name: &str,
        opts: &DeviceOptions,
    ) -> Result<Device, BlockdevError> {
        validate_name(name)?;
        validate_options(opts)?;
        let size = export.size();
        validate_size(size)?;
        let read_only = export.read_only();

        std::fs::create_dir_all(dev_dir)
            .map_err(|e| BlockdevError::io("create directory", dev_dir, e))?;
        // Canonical, so paths compare equal to what the kernel shows in mountinfo and in
        // the loop device's backing_file.
        let dev_dir =
            std::fs::canonicalize(dev_dir).map_err(|e| BlockdevError::io("resolve", dev_dir, e))?;
        let node = dev_dir.join(name);
        let mount_point = dev_dir.join(format!("{}{name}", mounts::MOUNT_PREFIX));
        // Leftovers of a crashed run of ours are replaced, a live device of this name and
        // anything not ours refused (see `stale.rs`).
        if stale::clear_mount(&mount_point)? {
            return Err(BlockdevError::AlreadyExists(mount_point));
        }
        stale::clear_node(&node, &mount_point.join(name))?;
        match std::fs::DirBuilder::new().mode(0o700).create(&mount_point) {
            Ok(()) => {}
            // An empty directory left behind is fine to reuse; a non-empty one makes the
            // mount fail below (mount(2) over a non-empty dir is allowed, but it is not ours).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let empty = std::fs::read_dir(&mount_point)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
                if !empty {
                    return Err(BlockdevError::Foreign {
                        path: mount_point,
                        what: "a directory that is not empty".into(),
                    });
                }
            }
            Err(e) => return Err(BlockdevError::io("create directory", &mount_point, e)),
        }

        let shared = Arc::new(Shared {
            size: std::sync::atomic::AtomicU64::new(size),
        });
        // SAFETY: getuid/getgid cannot fail and have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let filesystem = BlockFs {
            export,
            shared: shared.clone(),
            name: OsString::from(name),
            read_only,
            tuning: FsTuning {
                max_background: opts.max_background,
            },
            uid,
            gid,
            created: SystemTime::now(),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("{}{name}", mounts::SOURCE_PREFIX)),
            MountOption::Subtype(mounts::SUBTYPE.to_owned()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
            if read_only {
                MountOption::RO
            } else {
                MountOption::RW
            },
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(opts.threads);
        config.clone_fd = true;

        let session = Session::new(filesystem, &mount_point, &config)
            .and_then(Server::spawn)
            .map_err(|source| {
                let _ = std::fs::remove_dir(&mount_point);
                BlockdevError::Mount {
                    path: mount_point.clone(),
                    source,
                }
            })?;

        // From here on, `device` owns what exists; returning an error drops it, which tears
        // everything down again.
        let mut device = Device {
            name: name.to_owned(),
            node,
            backing_path: mount_point.join(name),
            fuse_dev: mounts::mount_at(&mount_point).map(|m| m.dev),
            mount_point,
            loop_dev: None,
            session: Some(session),
            shared,
            read_only,
        };

        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
            .open(&device.backing_path)
            .map_err(|e| BlockdevError::io("open", &device.backing_path, e))?;
        let loop_dev = LoopDevice::bind(
            &backing,
            &device.backing_path,
            &BindOptions {
                read_only,
                block_size: opts.block_size,
                direct_io: opts.direct_io,
                legacy: opts.legacy_loop_setup,
            },
        )?;
        // The loop driver holds its own reference to the file now.
        drop(backing);
        if opts.direct_io && !loop_dev.direct_io_active() {
            tracing::warn!(device = %loop_dev.path().display(),
                "loop driver did not enable direct I/O; using buffered I/O (slower)");
        }
        let loop_path = loop_dev.path();
        device.loop_dev = Some(loop_dev);
        std::os::unix::fs::symlink(&loop_path, &device.node)
            .map_err(|e| BlockdevError::io("create symlink", &device.node, e))?;
        tracing::info!(name, device = %loop_path.display(), node = %device.node.display(), size,
            "block device attached");
        Ok(device)
    }

    /// The name given to [`attach`](Self::attach).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<dev_dir>/<name>`: the symlink to use for `mkfs`, `mount`, ...
    pub fn node_path(&self) -> &Path {
        &self.node
    }

    /// The loop device, `/dev/loopN`.
    pub fn loop_path(&self) -> PathBuf {
        self.loop_dev
            .as_ref()
            .map(LoopDevice::path)
            .unwrap_or_default()
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    /// Whether the export (and so the device) is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the loop driver uses direct I/O on the FUSE file.
    pub fn direct_io(&self) -> bool {
        self.loop_dev
            .as_ref()
            .is_some_and(LoopDevice::direct_io_active)
    }

    /// How many users the block device has now: open descriptors in any process, stacked
    /// devices, and 1 for a mounted filesystem (or another exclusive kernel user) when
    /// nothing else was found. The device's own descriptor is not counted. 0 means unused;
    /// see the [crate documentation](crate#open-count) for how it is found and its limits.
    pub fn open_count(&self) -> usize {
        match &self.loop_dev {
            Some(l) => usage::count_users(l.number, l.rdev, l.file.as_raw_fd()),
            None => 0,
        }
    }

    /// Whether [`open_count`](Self::open_count) is non-zero.
    pub fn in_use(&self) -> bool {
        self.open_count() > 0
    }

    /// Grows the device to `new_size` bytes (the export must already have that size): the
    /// FUSE file grows, then the loop device re-reads it (`LOOP_SET_CAPACITY`), which
    /// announces the new capacity to the block layer (and a uevent). Shrinking is refused.
    pub fn grow(&mut self, new_size: u64) -> Result<(), BlockdevError> {
        validate_size(new_size)?;
        let old = self.size();
        if new_size < old {
            return Err(BlockdevError::InvalidSize {
                size: new_size,
                reason: "shrinking is not supported",
            });
        }
        let Some(loop_dev) = &self.loop_dev else {
            return Err(BlockdevError::InvalidOption("device is being torn down"));
        };
        self.shared.size.store(new_size, Ordering::Release);
        // LOOP_SET_CAPACITY reads the FUSE inode's cached i_size, not our getattr. Attributes
        // have no cache lifetime, so a stat fetches them and updates i_size (the kernel may
        // discard an attribute reply that raced with a write, hence the retries).
        let start = Instant::now();
        loop {
            match std::fs::metadata(&self.backing_path) {
                Ok(m) if m.len() == new_size => break,
                Ok(_) if start.elapsed() < TEARDOWN_PATIENCE => {
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(m) => {
                    return Err(BlockdevError::ResizeNotVisible {
                        device: self.backing_path.clone(),
                        got: m.len(),
                        expected: new_size,
                    })
                }
                Err(e) => return Err(BlockdevError::io("stat", &self.backing_path, e)),
            }
        }
        loop_dev
            .refresh_capacity()
            .map_err(|e| BlockdevError::ioctl("LOOP_SET_CAPACITY", loop_dev.path(), e))?;
        let got = loop_dev
            .size()
            .map_err(|e| BlockdevError::ioctl("BLKGETSIZE64", loop_dev.path(), e))?;
        if got != new_size {
            return Err(BlockdevError::ResizeNotVisible {
                device: loop_dev.path(),
                got,
                expected: new_size,
            });
        }
        tracing::info!(name = %self.name, old, new = new_size, "block device grown");
        Ok(())
    }

    /// Removes the block device: unbinds the loop device, removes the symlink, unmounts the
    /// FUSE filesystem and stops its threads.
    ///
    /// Refused with [`BlockdevError::InUse`] while anyone uses the device (mounted, open):
    /// then nothing is changed and the device is handed back in [`DetachError::device`].
    pub fn detach(mut self) -> Result<(), DetachError> {
        let refuse = |device: Device, error: BlockdevError| DetachError {
            device: Some(Box::new(device)),
            error,
        };
        let Some(loop_dev) = &self.loop_dev else {
            return Ok(());
        };
        let users = self.open_count();
        if users > 0 {
            let device = loop_dev.path();
            return Err(refuse(self, BlockdevError::InUse { device, users }));
        }
        // The authoritative check: the kernel unbinds only if our descriptor is the only
        // open. If someone opened the device since the count, it just (re)sets AUTOCLEAR,
        // which was set already: nothing changed.
        match loop_dev.try_unbind() {
            Ok(true) => {}
            Ok(false) => {
                let device = loop_dev.path();
                let users = self.open_count().max(1);
                return Err(refuse(self, BlockdevError::InUse { device, users }));
            }
            Err(e) => {
                let error = BlockdevError::ioctl("LOOP_CLR_FD", loop_dev.path(), e);
                return Err(refuse(self, error));
            }
        }
        self.teardown(true).map_err(|error| DetachError {
            device: None,
            error,
        })
    }

    /// Closes the loop device (which unbinds it if it is in rundown, or leaves it to unbind
    /// on its users' last close), removes the symlink, unmounts FUSE and stops the server.
    /// `unbinding`: `LOOP_CLR_FD` succeeded as sole opener, so the device unbinds on our
    /// close; otherwise its users are cut off. Keeps going after errors, returns the first.
    fn teardown(&mut self, unbinding: bool) -> Result<(), BlockdevError> {
        let mut first_error = None;
        let mut cut_off = !unbinding;
        if let Some(loop_dev) = self.loop_dev.take() {
            let number = loop_dev.number;
            let path = loop_dev.path();
            drop(loop_dev);
            // The kernel unbinds during the close; wait until it shows, so the FUSE file is
            // released before we unmount.
            let start = Instant::now();
            while unbinding && loopdev::backing_file(number).is_some_and(|f| f == self.backing_path)
            {
                if start.elapsed() > TEARDOWN_PATIENCE {
                    tracing::warn!(device = %path.display(),
                        "loop device still bound (in use): its users will get I/O errors");
                    cut_off = true;
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            // Our symlink only: never remove something else that took the name.
            if std::fs::read_link(&self.node).is_ok_and(|t| t == path) {
                if let Err(e) = std::fs::remove_file(&self.node) {
                    first_error.get_or_insert(BlockdevError::io("remove", &self.node, e));
                }
            }
        }
        if let Some(mut session) = self.session.take() {
            let patience = if cut_off {
                Duration::ZERO
            } else {
                TEARDOWN_PATIENCE
            };
            // fuser's own unmount first: it takes the mount from the session, so the
            // session's end does not unmount it a second time (fuser 0.18 does not see that a
            // mount is gone, cberner/fuser#703: `umount` of an unmounted path logged
            // "Unmount failed: Invalid argument" at every stop, and could unmount whatever
            // was mounted there meanwhile). When it is busy, ours retries and detaches lazily.
            let first = session.unmounter.unmount();
            if let Err(e) = &first {
                tracing::debug!(error = %e, "FUSE unmount: first attempt failed, retrying");
            }
            let unmounted = match first {
                Ok(()) => Ok(false),
                Err(_) => mounts::unmount(&self.mount_point, patience, true),
            };
            match unmounted {
                Ok(false) => {}
                Ok(true) => cut_off = true,
                Err(source) => {
                    cut_off = true;
                    first_error.get_or_insert(BlockdevError::Unmount {
                        path: self.mount_point.clone(),
                        source,
                    });
                }
            }
            if cut_off {
                // The filesystem lives on (lazily detached, referenced by the loop device):
                // end its connection so our threads stop and its users fail fast.
                if let Some(dev) = self.fuse_dev {
                    if let Err(e) = mounts::abort_connection(dev) {
                        tracing::warn!(error = %e, "aborting the FUSE connection failed");
                    }
                }
            }
            let start = Instant::now();
            while !session.guard.is_finished() && start.elapsed() < TEARDOWN_PATIENCE {
                thread::sleep(Duration::from_millis(10));
            }
            if session.guard.is_finished() {
                match session.guard.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "FUSE session ended with an error"),
                    Err(_) => tracing::warn!("FUSE session thread panicked"),
                }
            } else {
                // Joining would hang; leaving the session (and its mount handle) alone is
                // the lesser evil: dropping it could unmount whatever is on the path later.
                tracing::warn!(mount_point = %self.mount_point.display(),
                    "FUSE server threads did not stop; leaking them");
                std::mem::forget(session);
            }
            if let Err(e) = std::fs::remove_dir(&self.mount_point) {
                tracing::debug!(path = %self.mount_point.display(), error = %e,
                    "mount point not removed");
            }
        }
        if first_error.is_none() {
            tracing::info!(name = %self.name, "block device detached");
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The FUSE server: its thread and the handle that unmounts the filesystem exactly once
/// (`Session::spawn` would keep the mount where only its drop can unmount it).
#[derive(Debug)]
struct Server {
    guard: thread::JoinHandle<std::io::Result<()>>,
    unmounter: SessionUnmounter,
}

impl Server {
    fn spawn<FS: fuser::Filesystem + Send + Sync + 'static>(
        mut session: Session<FS>,
    ) -> std::io::Result<Server> {
        let unmounter = session.unmount_callable();
        let guard = thread::Builder::new()
            .name("mars-fuse".into())
            .spawn(move || session.run())?;
        Ok(Server { guard, unmounter })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.loop_dev.is_none() && self.session.is_none() {
            return;
        }
        let mut unbinding = false;
        if let Some(loop_dev) = &self.loop_dev {
            if self.open_count() > 0 {
                tracing::warn!(device = %loop_dev.path().display(),
                    "dropping a block device that is in use: its users are cut off");
            } else {
                match loop_dev.try_unbind() {
                    Ok(true) => unbinding = true,
                    Ok(false) => tracing::warn!(device = %loop_dev.path().display(),
                        "dropping a block device that was opened meanwhile: its users are cut off"),
                    Err(e) => tracing::warn!(device = %loop_dev.path().display(), error = %e,
                        "LOOP_CLR_FD failed"),
                }
            }
        } else {
            // attach failed before binding: only the FUSE mount exists.
            unbinding = true;
        }
        if let Err(e) = self.teardown(unbinding) {
            tracing::warn!(name = %self.name, error = %e, "block device cleanup incomplete");
        }
    }
}

/// Removes leftovers of an earlier run that did not detach its devices (crash, kill, leaked
/// [`Device`]) in `dev_dir`: our FUSE mounts `<dev_dir>/.fuse-*` (their connections are
/// aborted first, so nothing waits on a dead or leaked server), loop devices whose backing
/// file is in such a mount, their symlinks, and empty mount point directories.
///
/// Call it before attaching devices, when no [`Device`] of this `dev_dir` is alive: it
/// cannot tell a live device of another process from a stale one. A loop device still in
/// use (e.g. a filesystem still mounted on it) cannot be unbound by force; it is marked to
/// unbind on its last close and listed in [`CleanupReport::loops_busy`].
pub fn cleanup_stale(dev_dir: &Path) -> Result<CleanupReport, BlockdevError> {
    let mut report = CleanupReport::default();
    let dev_dir = match std::fs::canonicalize(dev_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(BlockdevError::io("resolve", dev_dir, e)),
    };
    let in_dev_dir = |p: &Path| {
        p.parent() == Some(dev_dir.as_path())
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(mounts::MOUNT_PREFIX))
    };
    let all = mounts::mounts().map_err(|e| BlockdevError::io("read", "/proc/self/mountinfo", e))?;
    // A mount point may carry several stacked mounts; handle each (the last is on top).
    let dead: Vec<_> = all
        .into_iter()
        .rev()
        .filter(|m| m.is_ours() && in_dev_dir(&m.mount_point))
        .collect();
    for m in &dead {
        let (unbound, busy) = stale::remove_dead_mount(m)?;
        report.loops_unbound.extend(unbound);
        report.loops_busy.extend(busy);
        report.mounts.push(m.mount_point.clone());
    }

    let entries = std::fs::read_dir(&dev_dir)
        .map_err(|e| BlockdevError::io("read directory", &dev_dir, e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if let Some(device_name) = name.strip_prefix(mounts::MOUNT_PREFIX) {
            // Empty leftover mount point (not mounted any more, remove_dir refuses non-empty).
            if mounts::mount_at(&path).is_none() && std::fs::remove_dir(&path).is_ok() {
                tracing::debug!(device = device_name, "removed stale mount point");
            }
            continue;
        }
        // Every link of ours is a leftover here: no device of this directory is alive.
        let Ok(entry) = stale::entry(&path) else {
            continue;
        };
        let backing = match &entry {
            stale::Entry::Link(t) => loop_number_of(t).and_then(loopdev::backing_file),
            _ => None,
        };
        let own_backing = dev_dir
            .join(format!("{}{name}", mounts::MOUNT_PREFIX))
            .join(&name);
        match stale::judge(&entry, backing.as_deref(), &own_backing) {
            stale::Verdict::Absent => {}
            stale::Verdict::Stale(why) => {
                std::fs::remove_file(&path).map_err(|e| BlockdevError::io("remove", &path, e))?;
                tracing::debug!(node = %path.display(), "stale device link: {why}");
                report.nodes.push(path);
            }
            // Not ours: left alone (an attach of this name refuses it with the reason).
            stale::Verdict::Foreign(what) => {
                tracing::debug!(path = %path.display(), "not a device link of ours: {what}");
            }
        }
    }
    if report != CleanupReport::default() {
        tracing::info!(?report, "cleaned up stale block devices");
    }
    Ok(report)
}

/// Whether this machine can attach devices at all: root, `/dev/fuse` and
/// `/dev/loop-control` present. Returns the reason when not.
pub fn check_support() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if let Err(e) = File::open(dev) {
            return Err(format!("{dev}: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["r0", "res-1", "a.b_c+d", &"x".repeat(64)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "a b",
            "ü",
            &"x".repeat(65),
            "a\0b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_are_validated() {
        validate_size(512).unwrap();
        validate_size(1 << 40).unwrap();
        for bad in [0, 511, 513, u64::MAX - 511] {
            assert!(validate_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_are_validated() {
        validate_options(&DeviceOptions::default()).unwrap();
        let bad = [
            DeviceOptions {
                threads: 0,
                ..DeviceOptions::default()
            },
            DeviceOptions {
                block_size: 8192,
                ..DeviceOptions::default()
            },
            DeviceOptions {
                max_background: 0,
                ..DeviceOptions::default()
            },
        ];
        for opts in bad {
            assert!(validate_options(&opts).is_err(), "{opts:?}");
        }
    }

    #[test]
    fn loop_numbers_parse() {
        assert_eq!(loop_number_of(Path::new("/dev/loop12")), Some(12));
        assert_eq!(loop_number_of(Path::new("/dev/loop")), None);
        assert_eq!(loop_number_of(Path::new("/dev/sda")), None);
        assert_eq!(loop_number_of(Path::new("/dev/loop1x")), None);
    }
}
