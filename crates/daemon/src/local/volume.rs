//! The primary's side of a resource directory: opening the volume (crash recovery, the log
//! continuing after a hole), the NBD export in front of it, the local block device
//! (`DEVICE_DIR/RES`), closing it, and what its state looks like to the engine.
//!
//! Everything here blocks (disk I/O): the resource actor calls it on a blocking thread.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mars_config::{HostName, ResourceName};
use mars_engine::resource::{LogInfo, VolumeStats};
use mars_nbd::Export;
use mars_storage::real::{open_disk, RealDir};
use mars_storage::{Dir, File};
use mars_volume::{OpenReport, Volume, VolumeConfig, VolumeError};

/// How a primary's resource appears as a local block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMode {
    /// No local device: NBD sockets only.
    None,
    /// A FUSE file behind a direct-I/O loop device (`mars_blockdev`).
    FuseLoop,
}

/// Volume tuning taken from the daemon's flags.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub max_dirty: usize,
    pub max_log_file: u64,
    pub min_free_space: u64,
    pub emergency_free_space: u64,
    pub device: DeviceMode,
    pub device_dir: Arc<Path>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("disk {path}: {source}")]
    Disk { path: String, source: io::Error },
    #[error("resource directory {path}: {source}")]
    Dir { path: String, source: io::Error },
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// What the NBD path and the device need of a resource without asking its actor: the
/// volume while it is open, whether new opens are accepted, fencing, and the open count.
pub struct Shared {
    pub name: ResourceName,
    pub volume: RwLock<Option<Arc<Volume>>>,
    /// This host is the designated primary: only then are new opens of the device accepted.
    pub designated: AtomicBool,
    /// Another host acts as designated primary while this one still has its device open:
    /// writes fail with EIO.
    pub fenced: Arc<AtomicBool>,
    /// NBD connections (the device's own openers are counted by the device).
    pub nbd_opens: Arc<AtomicU64>,
    pub device: Mutex<Option<mars_blockdev::Device>>,
    /// The log became durable further: the actor measures soon (at most every few hundred
    /// milliseconds).
    pub poke: Arc<tokio::sync::Notify>,
    /// An opener came or went: the actor measures at once (a handover decides on it).
    pub opened: Arc<tokio::sync::Notify>,
    /// The primary role is being left: fetch and sync sessions serving from the volume let go
    /// of it so that it can close.
    pub leaving: AtomicBool,
    /// The backing disk's size as last seen (the host looks now and then: a grown disk is
    /// what `resize` waits for).
    pub disk_size: AtomicU64,
    /// The durable end of the open volume's log (fetch servers follow it).
    pub durable: tokio::sync::watch::Sender<mars_txlog::LogPos>,
    /// Someone waits for a fresh "caught up" confirmation: the fetch session asks its source
    /// (a permit is kept when no session runs, for the next one).
    pub ask_caught_up: Arc<tokio::sync::Notify>,
}

impl Shared {
    pub fn new(name: ResourceName) -> Shared {
        Shared {
            name,
            volume: RwLock::new(None),
            designated: AtomicBool::new(false),
            fenced: Arc::new(AtomicBool::new(false)),
            nbd_opens: Arc::new(AtomicU64::new(0)),
            device: Mutex::new(None),
            poke: Arc::new(tokio::sync::Notify::new()),
            opened: Arc::new(tokio::sync::Notify::new()),
            leaving: AtomicBool::new(false),
            disk_size: AtomicU64::new(0),
            durable: tokio::sync::watch::channel(mars_txlog::LogPos::ZERO).0,
            ask_caught_up: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn volume(&self) -> Option<Arc<Volume>> {
        self.volume
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Users of the resource now: NBD connections plus openers of the local block device (a
    /// mounted filesystem counts as one).
    pub fn open_count(&self) -> u64 {
        let dev = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |d| d.open_count() as u64);
        self.nbd_opens.load(Ordering::Relaxed) + dev
    }

    pub fn device_path(&self) -> Option<PathBuf> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|d| d.node_path().to_path_buf())
    }

    /// An export for one NBD connection; dropping it lowers the open count. Only the
    /// designated primary accepts new opens.
    pub fn export(&self) -> Option<Arc<dyn Export>> {
        if !self.designated.load(Ordering::Relaxed) {
            return None;
        }
        let vol = self.volume()?;
        self.nbd_opens.fetch_add(1, Ordering::Relaxed);
        self.opened.notify_one();
        Some(Arc::new(VolumeExport {
            vol,
            fenced: self.fenced.clone(),
            name: self.name.to_string(),
            _opener: Some(Opener {
                count: self.nbd_opens.clone(),
                poke: self.opened.clone(),
            }),
        }))
    }

    /// Sets up `DEVICE_DIR/RES` for the open volume. `None`: no device wanted.
    pub fn attach_device(&self, tuning: &Tuning) -> Option<Result<String, String>> {
        if tuning.device == DeviceMode::None {
            return None;
        }
        let vol = self.volume()?;
        let mut slot = self.device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = slot.as_ref() {
            return Some(Ok(d.node_path().display().to_string()));
        }
        let export = Arc::new(VolumeExport {
            vol,
            fenced: self.fenced.clone(),
            name: self.name.to_string(),
            _opener: None,
        });
        let res = std::fs::create_dir_all(&tuning.device_dir)
            .map_err(|e| format!("{}: {e}", tuning.device_dir.display()))
            .and_then(|()| {
                mars_blockdev::Device::attach(
                    export,
                    &tuning.device_dir,
                    self.name.as_str(),
                    &mars_blockdev::DeviceOptions::default(),
                )
                .map_err(|e| e.to_string())
            });
        Some(match res {
            Ok(d) => {
                tracing::info!(
                    "{}: device {} ({})",
                    self.name,
                    d.node_path().display(),
                    d.loop_path().display()
                );
                let p = d.node_path().display().to_string();
                *slot = Some(d);
                Ok(p)
            }
            Err(e) => Err(e),
        })
    }

    /// Removes the local block device; refused (it stays) while it is in use.
    pub fn detach_device(&self) -> Result<(), String> {
        let mut slot = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let Some(d) = slot.take() else {
            return Ok(());
        };
        match d.detach() {
            Ok(()) => Ok(()),
            Err(e) => {
                *slot = e.device.map(|b| *b);
                Err(e.error.to_string())
            }
        }
    }

    pub fn grow_device(&self, size: u64) {
        if let Some(d) = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            if let Err(e) = d.grow(size) {
                tracing::error!("{}: cannot grow the device: {e}", self.name);
            }
        }
    }

    /// Takes the volume and closes it (everything written back); gives it back if somebody
    /// still holds it after a few seconds (fetch and sync sessions hold it only for a moment
    /// at a time).
    pub fn close_volume(&self) -> Result<(), String> {
        let taken = self
            .volume
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut v) = taken else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match Arc::try_unwrap(v) {
                Ok(vol) => {
                    return vol.close().map(|_| ()).map_err(|e| format!("close: {e}"));
                }
                Err(still) if Instant::now() < deadline => {
                    v = still;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(still) => {
                    *self.volume.write().unwrap_or_else(|e| e.into_inner()) = Some(still);
                    return Err("the volume is still in use".into());
                }
            }
        }
    }

    /// Closes device and volume whatever holds them (shutdown, teardown): a device still in
    /// use is dropped anyway (its users see I/O errors), a volume still held is at least synced.
    pub fn close_all(&self) {
        if let Err(e) = self.detach_device() {
            tracing::error!("{}: device: {e}", self.name);
            drop(self.device.lock().unwrap_or_else(|e| e.into_inner()).take());
        }
        if let Err(e) = self.close_volume() {
            if let Some(v) = self.volume() {
                tracing::warn!("{}: {e}; syncing the log at least", self.name);
                if let Err(e) = v.flush() {
                    tracing::error!("{}: flush at close: {e}", self.name);
                }
            }
        }
    }
}

/// One counted opener of a resource; dropping it lowers the open count.
struct Opener {
    count: Arc<AtomicU64>,
    poke: Arc<tokio::sync::Notify>,
}

impl Drop for Opener {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.poke.notify_one();
    }
}

/// Opens the primary's volume (crash recovery included).
pub fn open_volume(
    disk_path: &Path,
    size: u64,
    dir: &Path,
    host: &HostName,
    tuning: &Tuning,
) -> Result<(Volume, OpenReport), OpenError> {
    let disk: Arc<dyn File> = open_disk(disk_path).map_err(|source| OpenError::Disk {
        path: disk_path.display().to_string(),
        source,
    })?;
    let d: Arc<dyn Dir> = Arc::new(RealDir::open(dir).map_err(|source| OpenError::Dir {
        path: dir.display().to_string(),
        source,
    })?);
    let mut vc = VolumeConfig::new(host.clone(), size);
    vc.max_dirty = tuning.max_dirty;
    vc.log.max_file_size = tuning.max_log_file;
    Ok(Volume::open(vc, d, disk)?)
}

/// The volume's state for the engine, with the logfiles in `dir`.
pub fn stats(vol: &Volume, dir: &Path, passthrough: bool) -> VolumeStats {
    let s = vol.status();
    VolumeStats {
        durable: s.durable,
        written_back: s.written_back,
        current: s.current_log.no,
        dirty_bytes: s.dirty_bytes,
        passthrough,
        error: s.error,
        logs: logs_in(dir),
        size: s.size,
    }
}

/// The logfiles in `dir`, oldest first, with their lengths.
pub fn logs_in(dir: &Path) -> Vec<LogInfo> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(Some(n)) = mars_txlog::LogName::parse(&e.file_name().to_string_lossy()) {
                v.push(LogInfo {
                    no: n.no,
                    origin: n.host,
                    len: e.metadata().map(|m| m.len()).unwrap_or(0),
                    complete: true,
                });
            }
        }
    }
    v.sort_by_key(|l| l.no);
    v
}

/// Bytes of all logfiles in `dir`.
pub fn log_bytes(dir: &Path) -> u64 {
    logs_in(dir).iter().map(|l| l.len).sum()
}

/// Everything is written back after a clean close: the replica starts at the end of the last
/// logfile, which is what this host reports as its log end (the next primary must have all of
/// it). A logfile this host started but never wrote to is no history: it is dropped, or the
/// next primary's logfile with the same number would look like a fork.
pub fn prepare_replica_after_close(dir: &Path, host: &HostName) -> anyhow::Result<()> {
    let d = RealDir::open(dir)?;
    mars_replica::copies::drop_empty_tail(&d, host)?;
    if let (Some(last), Some(pos)) = (
        logs_in(dir).last(),
        mars_replica::control::read_position(&d)?,
    ) {
        if pos.file > last.no {
            mars_replica::control::write_position(&d, mars_txlog::LogPos::new(last.no, last.len))?;
        }
    }
    Ok(())
}

/// A view of the volume for one user of the resource: an NBD connection, or the local block
/// device (whose requests from the FUSE file go straight to the volume, no NBD hop). Writes
/// fail once the resource is fenced.
struct VolumeExport {
    vol: Arc<Volume>,
    fenced: Arc<AtomicBool>,
    name: String,
    /// NBD connections count as openers until dropped; the block device does not (its own
    /// users do).
    _opener: Option<Opener>,
}

fn io_err(e: VolumeError) -> io::Error {
    tracing::debug!("I/O error for the NBD client: {e}");
    io::Error::from_raw_os_error(e.errno())
}

impl VolumeExport {
    fn check_fenced(&self) -> io::Result<()> {
        if self.fenced.load(Ordering::Relaxed) {
            // EIO: the filesystem above sees a failed write, as on a disk that went away.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.vol.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn description(&self) -> String {
        format!("mars resource {}", self.name)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.vol.read(offset, buf).map_err(io_err)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check_fenced()?;
        self.vol
            .write(offset, data, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn write_may_block(&self, len: usize) -> bool {
        self.vol.write_may_block(len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check_fenced()?;
        self.vol
            .write_zeroes(offset, len, may_trim, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_fenced()?;
        self.vol
            .discard(offset, len, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn flush(&self) -> io::Result<()> {
        self.vol.flush().map(|_| ()).map_err(io_err)
    }
}
