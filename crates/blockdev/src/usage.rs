//! Who uses a block device: the basis of [`crate::Device::open_count`].
//!
//! The kernel keeps an exact count of opens of a disk (`bd_openers`) but does not export it.
//! What can be seen from user space:
//!
//! 1. **Open file descriptors** of processes: `/proc/<pid>/fd/*` links. Each one found that
//!    refers to the device counts once (several descriptors sharing one open file description,
//!    e.g. after `dup` or `fork`, count several times). This covers `dd`, `mkfs`, `fio`,
//!    a VM using the disk, ...
//! 2. **Stacked block devices** (device-mapper, md, bcache): `/sys/block/loopN/holders/*`.
//! 3. **Kernel users without a descriptor**, above all a **mounted filesystem** (in any mount
//!    namespace), also swap, and anything else that claims the device exclusively. These are
//!    detected by opening the device with `O_EXCL`: the kernel refuses that with `EBUSY` while
//!    someone holds an exclusive claim. They count as one.
//!
//! The `O_EXCL` probe is only made when 1 and 2 found nothing: then the answer would be 0
//! and is about to let a handover proceed, so a brief exclusive claim by us is harmless
//! (a `mount` racing with exactly that moment fails with `EBUSY` and can be retried).
//! Memory mappings of the device without an open descriptor are not seen (no known user
//! does that with a disk); they are caught by the authoritative check in
//! [`crate::Device::detach`], which lets the kernel decide.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::loopdev;

/// Counts users of loop device `number` (rdev `rdev`), not counting the descriptor `own_fd`
/// of this process (the [`crate::Device`]'s own open).
pub(crate) fn count_users(number: u32, rdev: u64, own_fd: i32) -> usize {
    let fds = count_fds(number, rdev, own_fd);
    let holders = fs::read_dir(loopdev::sys_dir(number).join("holders"))
        .map(|d| d.count())
        .unwrap_or(0);
    let found = fds + holders;
    if found > 0 {
        return found;
    }
    usize::from(exclusively_claimed(&loopdev::loop_path(number)))
}

/// Whether someone holds an exclusive claim on the block device at `path`.
fn exclusively_claimed(path: &Path) -> bool {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(_probe) => false,
        Err(e) => {
            if e.raw_os_error() != Some(libc::EBUSY) {
                // Cannot tell; err on the side of "in use" only for EBUSY, which is the
                // documented answer for a claimed device.
                tracing::debug!(path = %path.display(), error = %e, "O_EXCL probe failed");
            }
            e.raw_os_error() == Some(libc::EBUSY)
        }
    }
}

/// Counts descriptors in `/proc/*/fd` that refer to the device.
///
/// A link is compared by its target text first (`/dev/loopN`, which is what any open through
/// devtmpfs or through our symlink shows); only other targets under `/dev/` are `stat`ed to
/// compare device numbers (a node made elsewhere by `mknod`). Nothing outside `/dev` is
/// `stat`ed, so a hung network filesystem cannot block this scan.
fn count_fds(number: u32, rdev: u64, own_fd: i32) -> usize {
    let own_pid = std::process::id();
    let wanted = loopdev::loop_path(number);
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut count = 0;
    for proc_entry in procs.filter_map(|e| e.ok()) {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go: an unreadable directory is skipped.
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd_entry in fds.filter_map(|e| e.ok()) {
            if pid == own_pid
                && fd_entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok())
                    == Some(own_fd)
            {
                continue;
            }
            let Ok(target) = fs::read_link(fd_entry.path()) else {
                continue;
            };
            if target == wanted
                || (target.starts_with("/dev/") && loopdev::is_block_device(&fd_entry.path(), rdev))
            {
                count += 1;
            }
        }
    }
    count
}
