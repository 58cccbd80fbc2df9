//! Mount table parsing, FUSE connection control and unmounting.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::loopdev::c_path;

/// Prefix of the `source` (`fsname`) our FUSE mounts show in the mount table, followed by
/// the device name. The filesystem type is `fuse` (fuser's own `mount(2)` does not pass the
/// subtype to the kernel; `fusermount3` would, giving `fuse.mars-blockdev`).
pub(crate) const SOURCE_PREFIX: &str = "mars-blockdev:";
/// The subtype mount option.
pub(crate) const SUBTYPE: &str = "mars-blockdev";
/// Prefix of the private mount point directories inside the device directory.
pub(crate) const MOUNT_PREFIX: &str = ".fuse-";

/// Where the kernel's `fusectl` filesystem lives; each FUSE connection has a directory there
/// named after its device number, with an `abort` file.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// One line of `/proc/self/mountinfo` (only the fields we use).
#[derive(Debug, Clone)]
pub(crate) struct MountEntry {
    /// `st_dev` of the mounted filesystem as `(major, minor)`.
    pub(crate) dev: (u32, u32),
    pub(crate) mount_point: PathBuf,
    pub(crate) fstype: String,
    pub(crate) source: String,
}

impl MountEntry {
    /// Whether this is one of our FUSE mounts.
    pub(crate) fn is_ours(&self) -> bool {
        (self.fstype == "fuse" || self.fstype == format!("fuse.{SUBTYPE}"))
            && self.source.starts_with(SOURCE_PREFIX)
    }
}

/// Undoes the octal escapes (`\040` for space, `\011`, `\012`, `\134`) of mountinfo fields.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Parses mountinfo text (see `proc(5)`): `id parent major:minor root mount_point options
/// [optional fields...] - fstype source super_options`. Malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _id = fields.next()?;
            let _parent = fields.next()?;
            let (major, minor) = fields.next()?.split_once(':')?;
            let dev = (major.parse().ok()?, minor.parse().ok()?);
            let _root = fields.next()?;
            let mount_point = PathBuf::from(OsString::from_vec(unescape(fields.next()?)));
            // Skip options and the optional fields up to the separator.
            let mut fields = fields.skip_while(|f| *f != "-");
            fields.next()?;
            let fstype = String::from_utf8_lossy(&unescape(fields.next()?)).into_owned();
            let source = String::from_utf8_lossy(&unescape(fields.next()?)).into_owned();
            Some(MountEntry {
                dev,
                mount_point,
                fstype,
                source,
            })
        })
        .collect()
}

/// The current mount table of this process's mount namespace.
pub(crate) fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The mount entry whose mount point is exactly `path`, if any (the last one, i.e. the top
/// of a stack of mounts).
pub(crate) fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts()
        .ok()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Aborts the FUSE connection of the filesystem mounted with device number `dev`: all pending
/// and future requests fail with `ENOTCONN`/`EIO` and the server's threads see `ENODEV` and
/// stop. Used when a mount cannot be unmounted cleanly (still in use) or its server is
/// leaked. Mounts `fusectl` first if nobody has (systemd normally does).
pub(crate) fn abort_connection(dev: (u32, u32)) -> io::Result<()> {
    // fusectl names a connection by the kernel's internal dev_t (major << 20 | minor); FUSE
    // uses anonymous devices, whose major is 0, so the name is the minor.
    let id = (u64::from(dev.0) << 20) | u64::from(dev.1);
    let abort = Path::new(FUSECTL).join(id.to_string()).join("abort");
    if !abort.exists() && !fusectl_mounted() {
        mount_fusectl()?;
    }
    fs::write(&abort, b"1")
}

fn fusectl_mounted() -> bool {
    mounts()
        .map(|m| m.iter().any(|m| m.fstype == "fusectl"))
        .unwrap_or(false)
}

fn mount_fusectl() -> io::Result<()> {
    let target = c_path(Path::new(FUSECTL))?;
    // SAFETY: all pointers are valid NUL-terminated strings (or NULL for no data).
    let r = unsafe {
        libc::mount(
            c"fusectl".as_ptr(),
            target.as_ptr(),
            c"fusectl".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `umount2(path, flags)`.
pub(crate) fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmounts `path`, retrying `EBUSY` for up to `patience` (the loop driver releases its
/// backing file a moment after the unbind), or lazily (`MNT_DETACH`) when `lazy_fallback`.
/// Returns whether the unmount was lazy.
pub(crate) fn unmount(path: &Path, patience: Duration, lazy_fallback: bool) -> io::Result<bool> {
    let start = Instant::now();
    loop {
        match umount2(path, 0) {
            Ok(()) => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Not a mount point (any more).
                return Ok(false);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < patience => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) if lazy_fallback => {
                tracing::warn!(path = %path.display(), error = %e, "unmount failed, detaching lazily");
                umount2(path, libc::MNT_DETACH)?;
                return Ok(true);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    50 36 0:53 / /dev/my\\040dir/.fuse-r0 rw,nosuid,nodev - fuse.mars-blockdev mars-blockdev:r0 rw,user_id=0\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].mount_point, Path::new("/dev/my dir/.fuse-r0"));
        assert_eq!(m[1].fstype, "fuse.mars-blockdev");
        assert_eq!(m[1].source, "mars-blockdev:r0");
        assert!(m[1].is_ours());
        assert!(!m[0].is_ours());
        assert_eq!(m[1].dev, (0, 53));
    }

    #[test]
    fn unescape_handles_edges() {
        assert_eq!(unescape("a\\040b"), b"a b");
        assert_eq!(unescape("a\\04"), b"a\\04");
        assert_eq!(unescape("\\"), b"\\");
        assert_eq!(unescape("\\134x"), b"\\x");
        assert_eq!(unescape("\\777"), b"\\777");
    }
}
