//! What may already stand at a device's two paths before an attach — the node
//! `<dev_dir>/<name>` and the private mount point `<dev_dir>/.fuse-<name>` — and whether it is a
//! leftover of ours (replaced) or not (refused).
//!
//! A process serving devices can die at any moment (`kill -9`, a crash). What it leaves:
//!
//! * a dead FUSE mount of ours (source `mars-blockdev:<name>`; `stat` answers `ENOTCONN`);
//! * the node, a symlink to `/dev/loopN`. The loop device was bound with autoclear, so it
//!   unbinds once its last user (a filesystem still mounted on it) goes, and **the next loop
//!   device set up on the machine reuses its number**: the link then points to somebody else's
//!   device. It is still our link (nothing else puts symlinks to loop devices into a device
//!   directory); the loop device is not ours and is left alone.
//!
//! Refused, because they are not ours or not dead: a live FUSE mount of ours (another process
//! serving the same name from the same directory), any other filesystem mounted at the mount
//! point, a non-empty unmounted mount point, and at the node anything but a symlink to a loop
//! device (a file, a directory, a device node, a link elsewhere).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::BlockdevError;
use crate::{loop_number_of, loopdev, mounts};

/// What the node path holds, as far as deciding about it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Missing,
    /// A symlink and its target (not followed).
    Link(PathBuf),
    /// Anything else: its kind in words ("a regular file", ...).
    Other(&'static str),
}

/// The decision about the node path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Absent,
    /// Our link, nothing live behind it: remove it. The reason, for the log.
    Stale(String),
    /// Not ours: what it is, for the refusal.
    Foreign(String),
}

/// Decides about the node from what it is, the backing file of the loop device it points to
/// (`None`: unbound or no such device) and the FUSE file a device of this name reads. Called
/// only when no mount of ours of this name is live (see [`clear_mount`]), so a loop device
/// still reading our FUSE file is a leftover too. Pure, so that every case is unit-tested.
pub(crate) fn judge(entry: &Entry, backing: Option<&Path>, own_backing: &Path) -> Verdict {
    let target = match entry {
        Entry::Missing => return Verdict::Absent,
        Entry::Other(kind) => return Verdict::Foreign((*kind).to_string()),
        Entry::Link(t) => t,
    };
    let Some(n) = loop_number_of(target) else {
        return Verdict::Foreign(format!("a symbolic link to {}", target.display()));
    };
    match backing {
        None => Verdict::Stale(format!("/dev/loop{n} is unbound")),
        Some(f) if f == own_backing => {
            Verdict::Stale(format!("/dev/loop{n} still reads a dead FUSE file of ours"))
        }
        Some(f) => Verdict::Stale(format!(
            "/dev/loop{n} was reused by somebody else ({})",
            f.display()
        )),
    }
}

/// Looks at the node path without following it.
pub(crate) fn entry(node: &Path) -> Result<Entry, BlockdevError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match node.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Entry::Missing),
        Err(e) => return Err(BlockdevError::io("inspect", node, e)),
    };
    let t = meta.file_type();
    Ok(if t.is_symlink() {
        Entry::Link(std::fs::read_link(node).map_err(|e| BlockdevError::io("read link", node, e))?)
    } else if t.is_file() {
        Entry::Other("a regular file")
    } else if t.is_dir() {
        Entry::Other("a directory")
    } else if t.is_block_device() {
        Entry::Other("a block device node")
    } else if t.is_char_device() {
        Entry::Other("a character device node")
    } else {
        Entry::Other("a special file")
    })
}

/// Whether a FUSE mount answers: the mount point of a dead server fails `stat` with
/// `ENOTCONN` (any failure counts as dead).
fn answers(mount_point: &Path) -> bool {
    std::fs::metadata(mount_point).is_ok()
}

/// Makes way at the mount point `<dev_dir>/.fuse-<name>` for a new device: a dead mount of
/// ours is removed (its connection aborted, loop devices still reading it unbound or marked to
/// unbind, unmounted lazily if need be). Returns whether our mount there is live (then nothing
/// was touched). Refuses anything else mounted there.
pub(crate) fn clear_mount(mount_point: &Path) -> Result<bool, BlockdevError> {
    let Some(m) = mounts::mount_at(mount_point) else {
        return Ok(false);
    };
    if !m.is_ours() {
        return Err(BlockdevError::Foreign {
            path: mount_point.to_path_buf(),
            what: format!("{} ({}) is mounted there", m.source, m.fstype),
        });
    }
    if answers(mount_point) {
        return Ok(true);
    }
    remove_dead_mount(&m)?;
    tracing::warn!(mount_point = %mount_point.display(),
        "removed the dead FUSE mount of a crashed daemon");
    Ok(false)
}

/// Removes a stale mount of ours: aborts its connection, unbinds loop devices reading a file
/// in it (or marks them to unbind on their last close: returned in the second list), and
/// unmounts it (lazily if still referenced). Returns (unbound, busy) loop numbers.
pub(crate) fn remove_dead_mount(
    m: &mounts::MountEntry,
) -> Result<(Vec<u32>, Vec<u32>), BlockdevError> {
    if let Err(e) = mounts::abort_connection(m.dev) {
        tracing::warn!(mount_point = %m.mount_point.display(), error = %e,
            "could not abort FUSE connection");
    }
    let (mut unbound, mut busy) = (Vec::new(), Vec::new());
    for n in loopdev::all_loop_numbers() {
        if !loopdev::backing_file(n).is_some_and(|f| f.starts_with(&m.mount_point)) {
            continue;
        }
        match loopdev::unbind_number(n) {
            Ok(true) => unbound.push(n),
            Ok(false) => busy.push(n),
            Err(e) => {
                tracing::warn!(device = n, error = %e, "could not unbind loop device");
                busy.push(n);
            }
        }
    }
    mounts::unmount(&m.mount_point, Duration::from_millis(500), true).map_err(|source| {
        BlockdevError::Unmount {
            path: m.mount_point.clone(),
            source,
        }
    })?;
    Ok((unbound, busy))
}

/// Makes way at the node `<dev_dir>/<name>`: removes a stale link of ours (logged with the
/// reason), refuses anything that is not ours. Only after [`clear_mount`] found no live mount
/// of ours of this name.
pub(crate) fn clear_node(node: &Path, own_backing: &Path) -> Result<(), BlockdevError> {
    let e = entry(node)?;
    let backing = match &e {
        Entry::Link(t) => loop_number_of(t).and_then(loopdev::backing_file),
        _ => None,
    };
    match judge(&e, backing.as_deref(), own_backing) {
        Verdict::Absent => Ok(()),
        Verdict::Stale(why) => {
            std::fs::remove_file(node).map_err(|e| BlockdevError::io("remove", node, e))?;
            tracing::warn!(node = %node.display(), "replaced the stale device link of a crashed daemon: {why}");
            Ok(())
        }
        Verdict::Foreign(what) => Err(BlockdevError::Foreign {
            path: node.to_path_buf(),
            what,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(n: u32) -> Entry {
        Entry::Link(PathBuf::from(format!("/dev/loop{n}")))
    }

    #[test]
    fn verdicts() {
        let own = Path::new("/dev/mars/.fuse-r/r");
        let other = Path::new("/srv/other.img");
        assert_eq!(judge(&Entry::Missing, None, own), Verdict::Absent);
        // Dangling, reused, still on our dead file: ours and stale.
        assert!(matches!(judge(&link(3), None, own), Verdict::Stale(_)));
        match judge(&link(3), Some(other), own) {
            Verdict::Stale(why) => assert!(why.contains("reused"), "{why}"),
            v => panic!("{v:?}"),
        }
        assert!(matches!(judge(&link(3), Some(own), own), Verdict::Stale(_)));
        // Not ours.
        for e in [
            Entry::Other("a regular file"),
            Entry::Link(PathBuf::from("/dev/sda")),
            Entry::Link(PathBuf::from("loop3")),
        ] {
            assert!(matches!(judge(&e, None, own), Verdict::Foreign(_)), "{e:?}");
        }
    }
}
