//! Loop devices, driven with the ioctls of the kernel uapi header `linux/loop.h` (and
//! `BLKGETSIZE64` from `linux/fs.h`), no `losetup` involved.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::BlockdevError;

// ioctl numbers of `linux/loop.h`: `0x4C` is `'L'`; none of them encodes a size or direction,
// they are plain numbers (historic `_IO`-less definitions).
/// `LOOP_SET_FD(fd)`: bind the loop device to an open file (pre-5.8 way, see LOOP_CONFIGURE).
const LOOP_SET_FD: u64 = 0x4C00;
/// `LOOP_CLR_FD`: unbind. Since Linux 5.x (and exactly so in 6.x) this only sets
/// `LO_FLAGS_AUTOCLEAR` and, if the caller holds the only open of the device, moves it to
/// "rundown" so the unbinding happens when that last open is closed. Older kernels unbind at
/// once when there is a single opener. Either way it never unbinds under another opener.
const LOOP_CLR_FD: u64 = 0x4C01;
/// `LOOP_SET_STATUS64(struct loop_info64 *)`: set flags (only `AUTOCLEAR`, `PARTSCAN`,
/// `DIRECT_IO` are changeable), offset, size limit, file name.
const LOOP_SET_STATUS64: u64 = 0x4C04;
/// `LOOP_GET_STATUS64(struct loop_info64 *)`: fails with `ENXIO` unless the device is bound
/// (state `Lo_bound`; a device in rundown counts as unbound).
const LOOP_GET_STATUS64: u64 = 0x4C05;
/// `LOOP_SET_CAPACITY`: re-read the backing file's size (`i_size`) and resize the disk.
const LOOP_SET_CAPACITY: u64 = 0x4C07;
/// `LOOP_SET_DIRECT_IO(unsigned long on)`: switch the backing file to `O_DIRECT` I/O.
const LOOP_SET_DIRECT_IO: u64 = 0x4C08;
/// `LOOP_SET_BLOCK_SIZE(unsigned long bytes)`: logical block size (512..=PAGE_SIZE, power
/// of two).
const LOOP_SET_BLOCK_SIZE: u64 = 0x4C09;
/// `LOOP_CONFIGURE(struct loop_config *)` (Linux 5.8+): bind and set everything atomically.
const LOOP_CONFIGURE: u64 = 0x4C0A;
/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`: returns the number of a free (unbound) loop
/// device, creating one if needed.
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`: size of a block device in bytes into a `u64`.
/// Direction read (2) << 30 | size 8 << 16 | type 0x12 << 8 | number 114.
const BLKGETSIZE64: u64 = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

/// `lo_flags` bit: read-only device.
pub(crate) const LO_FLAGS_READ_ONLY: u32 = 1;
/// `lo_flags` bit: unbind automatically when the last opener closes the device.
pub(crate) const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `lo_flags` bit: the loop driver opens the backing file with `O_DIRECT` and submits
/// asynchronous direct I/O to it (no page cache of the backing file in between).
pub(crate) const LO_FLAGS_DIRECT_IO: u32 = 16;

/// Length of `lo_file_name` (`LO_NAME_SIZE`).
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` of `linux/loop.h`, 232 bytes, naturally aligned (no padding):
///
/// | offset | field |
/// | --- | --- |
/// | 0 | `u64 lo_device` (dev_t of the backing file's fs, output) |
/// | 8 | `u64 lo_inode` (output) |
/// | 16 | `u64 lo_rdevice` (output) |
/// | 24 | `u64 lo_offset` |
/// | 32 | `u64 lo_sizelimit` (0 = whole file) |
/// | 40 | `u32 lo_number` (output) |
/// | 44 | `u32 lo_encrypt_type` (obsolete, 0) |
/// | 48 | `u32 lo_encrypt_key_size` (obsolete, 0) |
/// | 52 | `u32 lo_flags` (`LO_FLAGS_*`) |
/// | 56 | `u8 lo_file_name[64]` (informational, shown by losetup) |
/// | 120 | `u8 lo_crypt_name[64]` |
/// | 184 | `u8 lo_encrypt_key[32]` |
/// | 216 | `u64 lo_init[2]` |
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `linux/loop.h`, 304 bytes:
///
/// | offset | field |
/// | --- | --- |
/// | 0 | `u32 fd` (backing file) |
/// | 4 | `u32 block_size` (0 = default 512, or the backing device's) |
/// | 8 | `struct loop_info64 info` (232 bytes) |
/// | 240 | `u64 __reserved[8]` (must be zero) |
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn zeroed() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

/// Issues an ioctl whose argument is an integer (or unused).
fn ioctl_int(fd: &impl AsRawFd, request: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the request takes its argument by value; no memory is shared with the kernel.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Issues an ioctl whose argument points to `T`, which the kernel reads or writes.
fn ioctl_ptr<T>(fd: &impl AsRawFd, request: u64, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` points to a live, properly sized `T` that matches the layout the request
    // expects (checked by the size assertions above).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Path of loop device `n`.
pub(crate) fn loop_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{n}"))
}

/// Sysfs directory of loop device `n`.
pub(crate) fn sys_dir(n: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{n}"))
}

/// The backing file of loop device `n` as the kernel shows it, or `None` when unbound.
pub(crate) fn backing_file(n: u32) -> Option<PathBuf> {
    let s = fs::read_to_string(sys_dir(n).join("loop/backing_file")).ok()?;
    let s = s.trim_end_matches('\n');
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// Numbers of all loop devices the kernel currently has (bound or not).
pub(crate) fn all_loop_numbers() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("loop")?.parse().ok())
        .collect()
}

/// Opens `/dev/loopN` read-only. Read-only on purpose: every ioctl used here is allowed to
/// `CAP_SYS_ADMIN` on a read-only open, and an open for writing would count as a writer, which
/// kernels built without `CONFIG_BLK_DEV_WRITE_MOUNTED` treat as a reason to refuse mounting
/// the device.
pub(crate) fn open_loop(n: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(loop_path(n))
}

/// A bound loop device, kept open for its whole life (see [`LoopDevice::file`]).
#[derive(Debug)]
pub(crate) struct LoopDevice {
    /// Device number N of `/dev/loopN`.
    pub(crate) number: u32,
    /// Our open of `/dev/loopN`. It carries the ioctls, and, because the device is bound
    /// with `LO_FLAGS_AUTOCLEAR`, it is what keeps the binding alive: if this process dies, the
    /// kernel closes it and the device unbinds as soon as no one else has it open.
    pub(crate) file: File,
    /// `st_rdev` of the device node, to recognise other opens of it.
    pub(crate) rdev: u64,
}

/// Settings for [`LoopDevice::bind`].
pub(crate) struct BindOptions {
    pub(crate) read_only: bool,
    pub(crate) block_size: u32,
    pub(crate) direct_io: bool,
    /// Skip `LOOP_CONFIGURE`, use the pre-5.8 sequence.
    pub(crate) legacy: bool,
}

impl LoopDevice {
    /// Binds `backing` to a free loop device. Another process may grab the same free device
    /// between `LOOP_CTL_GET_FREE` and the bind; the bind then fails with `EBUSY` and the next
    /// free one is tried.
    pub(crate) fn bind(
        backing: &File,
        backing_path: &Path,
        opts: &BindOptions,
    ) -> Result<Self, BlockdevError> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
            .map_err(BlockdevError::NoLoopDevice)?;
        let mut last_busy = None;
        for _ in 0..16 {
            let n =
                ioctl_int(&control, LOOP_CTL_GET_FREE, 0).map_err(BlockdevError::NoLoopDevice)?;
            let n = u32::try_from(n).map_err(|_| {
                BlockdevError::NoLoopDevice(io::Error::other("negative loop number"))
            })?;
            let file = open_loop(n).map_err(|e| BlockdevError::io("open", loop_path(n), e))?;
            let rdev = file
                .metadata()
                .map_err(|e| BlockdevError::io("stat", loop_path(n), e))?
                .rdev();
            let dev = LoopDevice {
                number: n,
                file,
                rdev,
            };
            // The bind needs an open for writing, or the kernel makes the device read-only;
            // that open is closed right after, `dev.file` (read-only) stays.
            let rw = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(loop_path(n))
                .map_err(|e| BlockdevError::io("open", loop_path(n), e))?;
            match configure(&rw, backing, backing_path, opts) {
                Ok(()) => return Ok(dev),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Somebody else bound it first: try the next free device.
                    last_busy = Some(e);
                    continue;
                }
                Err(e) => return Err(BlockdevError::ioctl("LOOP_CONFIGURE", dev.path(), e)),
            }
        }
        Err(BlockdevError::NoLoopDevice(last_busy.unwrap_or_else(
            || io::Error::from_raw_os_error(libc::EBUSY),
        )))
    }

    /// `/dev/loopN`.
    pub(crate) fn path(&self) -> PathBuf {
        loop_path(self.number)
    }

    /// Whether the kernel actually uses direct I/O (it silently falls back to buffered I/O
    /// when the backing file cannot do it).
    pub(crate) fn direct_io_active(&self) -> bool {
        fs::read_to_string(sys_dir(self.number).join("loop/dio"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Size of the block device in bytes.
    pub(crate) fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        ioctl_ptr(&self.file, BLKGETSIZE64, &mut size)?;
        Ok(size)
    }

    /// `LOOP_SET_CAPACITY`: re-read the backing file's size.
    pub(crate) fn refresh_capacity(&self) -> io::Result<()> {
        ioctl_int(&self.file, LOOP_SET_CAPACITY, 0).map(drop)
    }

    /// Whether the device is still bound (`LOOP_GET_STATUS64` succeeds).
    pub(crate) fn is_bound(&self) -> bool {
        let mut info = LoopInfo64::zeroed();
        ioctl_ptr(&self.file, LOOP_GET_STATUS64, &mut info).is_ok()
    }

    /// Unbinds the device if `self.file` is its only open; otherwise changes nothing
    /// (`AUTOCLEAR` is set already) and returns `Ok(false)`.
    ///
    /// On success the device is in rundown (or already unbound on old kernels) and the actual
    /// unbinding happens when `self.file` is closed, which the caller does by dropping `self`.
    pub(crate) fn try_unbind(&self) -> io::Result<bool> {
        ioctl_int(&self.file, LOOP_CLR_FD, 0)?;
        Ok(!self.is_bound())
    }
}

/// Asks loop device `n` to unbind, from a fresh open: it happens when no one else (e.g. a
/// still-mounted filesystem) holds the device, otherwise it is left marked `AUTOCLEAR` and
/// unbinds when its last user closes it. Returns whether it is unbound now.
pub(crate) fn unbind_number(n: u32) -> io::Result<bool> {
    let file = open_loop(n)?;
    match ioctl_int(&file, LOOP_CLR_FD, 0) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(true),
        Err(e) => return Err(e),
    }
    drop(file);
    Ok(backing_file(n).is_none())
}

/// Whether `path` names a block device whose `st_rdev` is `rdev`, without following more than
/// the path itself.
pub(crate) fn is_block_device(path: &Path, rdev: u64) -> bool {
    fs::metadata(path)
        .map(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        .unwrap_or(false)
}

/// `CString` of a path, for libc calls.
pub(crate) fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Binds `dev` (an open for writing of the loop device) with `LOOP_CONFIGURE`, or on kernels
/// before 5.8 (where it is unknown: `EINVAL` or `ENOTTY`) with `LOOP_SET_FD` +
/// `LOOP_SET_STATUS64` + `LOOP_SET_BLOCK_SIZE` + `LOOP_SET_DIRECT_IO`.
fn configure(
    dev: &File,
    backing: &File,
    backing_path: &Path,
    opts: &BindOptions,
) -> io::Result<()> {
    let mut info = LoopInfo64::zeroed();
    info.lo_flags = LO_FLAGS_AUTOCLEAR;
    if opts.read_only {
        info.lo_flags |= LO_FLAGS_READ_ONLY;
    }
    if opts.direct_io {
        info.lo_flags |= LO_FLAGS_DIRECT_IO;
    }
    // The name is informational only (losetup shows it); truncate, keep a trailing NUL.
    let name = backing_path.as_os_str().as_encoded_bytes();
    let n = name.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);

    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?;
    let mut config = LoopConfig {
        fd,
        block_size: opts.block_size,
        info,
        reserved: [0; 8],
    };
    let configured = if opts.legacy {
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    } else {
        ioctl_ptr(dev, LOOP_CONFIGURE, &mut config)
    };
    match configured {
        Ok(_) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => {
            tracing::debug!(error = %e, "LOOP_CONFIGURE refused, falling back to LOOP_SET_FD");
        }
        Err(e) => return Err(e),
    }
    ioctl_int(dev, LOOP_SET_FD, backing.as_raw_fd() as libc::c_ulong)?;
    let rest = (|| {
        // The read-only flag is not settable; LOOP_SET_FD derived it from the backing
        // file's open mode.
        info.lo_flags &= !(LO_FLAGS_READ_ONLY | LO_FLAGS_DIRECT_IO);
        ioctl_ptr(dev, LOOP_SET_STATUS64, &mut info)?;
        if opts.block_size != 0 {
            ioctl_int(dev, LOOP_SET_BLOCK_SIZE, opts.block_size.into())?;
        }
        if opts.direct_io {
            ioctl_int(dev, LOOP_SET_DIRECT_IO, 1)?;
        }
        Ok(())
    })();
    if rest.is_err() {
        let _ = ioctl_int(dev, LOOP_CLR_FD, 0);
    }
    rest
}
