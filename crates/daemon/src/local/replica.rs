//! A replica's resource directory as the executor uses it: the verified copies (shared by the
//! fetch session that appends to them, the replay runs that read them and the fetch server that
//! serves them to another replica), the disk, and the control files. All of it is
//! `mars-replica` underneath, through the `mars_storage` traits.
//!
//! Everything here blocks (disk I/O): callers run it on a blocking thread.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use mars_engine::resource::{Control, LogInfo, Marker, ReplicaFacts, SyncFile};
use mars_replica::Copies;
use mars_storage::real::RealDir;
use mars_storage::{Dir, File};
use mars_txlog::LogPos;

/// The engine's sync state as the control file holds it.
pub fn to_file(s: &SyncFile) -> mars_replica::SyncFile {
    mars_replica::SyncFile {
        start: s.start,
        done: s.done,
        size: s.size,
        end: s.end,
        transferred: s.transferred,
        from: s.from.clone(),
    }
}

pub fn from_file(s: mars_replica::SyncFile) -> SyncFile {
    SyncFile {
        start: s.start,
        done: s.done,
        size: s.size,
        end: s.end,
        transferred: s.transferred,
        from: s.from,
    }
}

fn marker(m: Marker) -> mars_replica::Marker {
    match m {
        Marker::Replica => mars_replica::Marker::Replica,
        Marker::Force => mars_replica::Marker::ForcePrimary,
        Marker::Emergency => mars_replica::Marker::Emergency,
    }
}

/// Writes a control file of the resource directory `dir`, atomically and durably.
pub fn persist(dir: &dyn Dir, c: &Control) -> Result<()> {
    use mars_replica::control as cf;
    match c {
        Control::Position(p) => cf::write_position(dir, *p)?,
        Control::Sync(Some(s)) => cf::write_sync(dir, &to_file(s))?,
        Control::Sync(None) => cf::remove_sync(dir)?,
        Control::NeedsSync(Some(why)) => cf::write_needs_sync(dir, why)?,
        Control::NeedsSync(None) => cf::remove_needs_sync(dir)?,
        Control::Marker(m, on) => cf::set_marker(dir, marker(*m), *on)?,
        Control::ChainStart(no) => cf::write_chain_start(dir, *no)?,
    }
    Ok(())
}

/// An open replica directory.
pub struct ReplicaDir {
    pub dir: Arc<dyn Dir>,
    pub disk: Arc<dyn File>,
    copies: Mutex<Copies>,
}

impl ReplicaDir {
    /// Opens the replica in `path` on `disk_path` (the replica marker is set first): verifies
    /// the copies (cutting a torn tail or damage, which is fetched again) and reads the control
    /// files.
    pub fn open(path: &Path, disk_path: &Path, size: u64) -> Result<(ReplicaDir, ReplicaFacts)> {
        let dir: Arc<dyn Dir> =
            Arc::new(RealDir::open(path).with_context(|| format!("{}", path.display()))?);
        mars_replica::control::set_marker(&*dir, mars_replica::Marker::Replica, true)?;
        // A replica replays another primary's log: an emergency mode of this directory's own
        // primary past is over (left in place, a later promotion would replay nothing).
        mars_replica::control::set_marker(&*dir, mars_replica::Marker::Emergency, false)?;
        let disk: Arc<dyn File> = mars_storage::real::open_disk(disk_path)
            .with_context(|| format!("disk {}", disk_path.display()))?;
        let dlen = disk.len()?;
        if dlen < size {
            bail!(
                "disk {} has {dlen} bytes, the resource needs {size}",
                disk_path.display()
            );
        }
        let (copies, report) = Copies::open(dir.clone())?;
        if let Some((why, names)) = &report.discarded {
            tracing::warn!(
                "{}: local logfiles: {why}; discarded {} of them",
                path.display(),
                names.len()
            );
        }
        for c in &report.cut {
            match &c.damage {
                Some(d) => tracing::warn!(
                    "{}: {} damaged at {} ({d}); fetching it again from there",
                    path.display(),
                    c.name,
                    c.at
                ),
                None => tracing::info!(
                    "{}: cut a torn tail of {} bytes off {}",
                    path.display(),
                    c.removed,
                    c.name
                ),
            }
        }
        let ctl = mars_replica::control::read_all(&*dir)?;
        let logs: Vec<LogInfo> = copies
            .files()
            .iter()
            .map(|(no, c)| LogInfo {
                no: *no,
                origin: c.origin.clone(),
                len: c.len,
                complete: c.complete,
            })
            .collect();
        let applied = ctl
            .position
            .unwrap_or_else(|| logs.first().map_or(LogPos::ZERO, |l| LogPos::new(l.no, 0)));
        let facts = ReplicaFacts {
            copies: logs,
            applied,
            sync: ctl.sync.map(from_file),
            needs_sync: ctl.needs_sync,
        };
        Ok((
            ReplicaDir {
                dir,
                disk,
                copies: Mutex::new(copies),
            },
            facts,
        ))
    }

    pub fn copies(&self) -> MutexGuard<'_, Copies> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }
}
