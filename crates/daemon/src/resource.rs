//! One resource on this host: its configuration, its volume (when attached) and the NBD export
//! in front of it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use mars_api::{LogView, ResourceView};
use mars_config::HostName;
use mars_nbd::Export;
use mars_storage::real::{open_disk, RealDir};
use mars_storage::{Dir, File};
use mars_volume::{OpenReport, Volume, VolumeConfig, VolumeError};

use crate::root::ResourceFile;

/// Volume tuning taken from the daemon's flags.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub max_dirty: usize,
    pub max_log_file: u64,
}

pub struct Resource {
    pub cfg: ResourceFile,
    pub dir: PathBuf,
    volume: RwLock<Option<Arc<Volume>>>,
    /// Why the volume is not open (recovery refused, disk missing …).
    error: RwLock<Option<(String, String)>>,
    open_count: AtomicU64,
}

impl Resource {
    /// Opens the resource's volume, running crash recovery. A failure leaves the resource
    /// present but detached, with the reason shown by `view`.
    pub fn open(cfg: ResourceFile, dir: PathBuf, host: &HostName, tuning: Tuning) -> Arc<Self> {
        let r = Arc::new(Self {
            cfg,
            dir,
            volume: RwLock::new(None),
            error: RwLock::new(None),
            open_count: AtomicU64::new(0),
        });
        match open_volume(&r.cfg, &r.dir, host, tuning) {
            Ok((v, report)) => {
                if report.replayed > 0 || report.truncated.is_some() {
                    tracing::info!(
                        "{}: recovery replayed {} records from {}{}",
                        r.cfg.name,
                        report.replayed,
                        report.from,
                        report
                            .truncated
                            .as_ref()
                            .map(|(f, n)| format!(", cut a torn tail of {n} bytes off {f}"))
                            .unwrap_or_default()
                    );
                }
                *r.volume.write().expect("fresh lock") = Some(Arc::new(v));
            }
            Err(e) => {
                let state = match &e {
                    OpenError::Volume(VolumeError::Log(_)) => "DefectiveLog",
                    _ => "Detached",
                };
                tracing::error!("{}: cannot attach: {e}", r.cfg.name);
                *r.error.write().expect("fresh lock") = Some((state.into(), e.to_string()));
            }
        }
        r
    }

    pub fn volume(&self) -> Option<Arc<Volume>> {
        self.volume
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn error(&self) -> Option<String> {
        self.error
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, m)| m.clone())
    }

    /// Closes the volume cleanly (log synced, everything written back).
    pub fn close(&self) {
        let v = self
            .volume
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(v) = v {
            match Arc::try_unwrap(v) {
                Ok(v) => {
                    if let Err(e) = v.close() {
                        tracing::error!("{}: close: {e}", self.cfg.name);
                    }
                }
                Err(v) => {
                    // Connections still hold it: sync the log at least; writeback finishes
                    // when the last holder drops it, and recovery covers the rest.
                    if let Err(e) = v.flush() {
                        tracing::error!("{}: flush at close: {e}", self.cfg.name);
                    }
                }
            }
        }
    }

    pub fn view(&self, host: &HostName, unix_uri: String, tcp_uri: Option<String>) -> ResourceView {
        let vol = self.volume();
        let err = self.error.read().unwrap_or_else(|e| e.into_inner()).clone();
        let primary = self.cfg.primary == *host;
        let (disk_state, repl_state, flags, log) = match (&vol, &err) {
            (Some(v), _) => {
                let s = v.status();
                let (files, bytes) = log_usage(&self.dir);
                let disk_state = if s.error.is_some() {
                    "DefectiveDisk".to_string()
                } else if s.written_back < s.appended && s.pending_records > 0 {
                    format!("WriteBack[{}]", mars_config::format_size(s.dirty_bytes))
                } else {
                    "UpToDate".to_string()
                };
                let log = LogView {
                    current: s.current_log.to_string(),
                    appended: s.appended.to_string(),
                    durable: s.durable.to_string(),
                    written_back: s.written_back.to_string(),
                    dirty_bytes: s.dirty_bytes,
                    pending_records: s.pending_records,
                    writes: s.writes,
                    logfiles: files,
                    log_bytes: bytes,
                };
                (
                    disk_state,
                    "Replicating".to_string(),
                    "DCAS--".to_string(),
                    Some(log),
                )
            }
            (None, Some((state, _))) => (state.clone(), "NotStarted".into(), "------".into(), None),
            (None, None) => (
                "Detached".into(),
                "NotStarted".into(),
                "------".into(),
                None,
            ),
        };
        ResourceView {
            name: self.cfg.name.to_string(),
            size: self.cfg.size,
            disk: self.cfg.disk.clone(),
            role: if primary { "Primary" } else { "Secondary" }.into(),
            primary: self.cfg.primary.to_string(),
            disk_state,
            repl_state,
            flags,
            log,
            nbd_unix_uri: vol.as_ref().map(|_| unix_uri),
            nbd_tcp_uri: vol.as_ref().and(tcp_uri),
            open_count: self.open_count.load(Ordering::Relaxed),
            error: err.map(|(_, m)| m),
        }
    }

    /// An export handle for one NBD connection; dropping it lowers the open count.
    pub fn export(self: &Arc<Self>) -> Option<Arc<dyn Export>> {
        let vol = self.volume()?;
        self.open_count.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(Connection {
            res: self.clone(),
            vol,
        }))
    }
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

pub fn open_volume(
    cfg: &ResourceFile,
    dir: &Path,
    host: &HostName,
    tuning: Tuning,
) -> Result<(Volume, OpenReport), OpenError> {
    let disk: Arc<dyn File> = open_disk(&cfg.disk).map_err(|source| OpenError::Disk {
        path: cfg.disk.display().to_string(),
        source,
    })?;
    let d: Arc<dyn Dir> = Arc::new(RealDir::open(dir).map_err(|source| OpenError::Dir {
        path: dir.display().to_string(),
        source,
    })?);
    let mut vc = VolumeConfig::new(host.clone(), cfg.size);
    vc.max_dirty = tuning.max_dirty;
    vc.log.max_file_size = tuning.max_log_file;
    Ok(Volume::open(vc, d, disk)?)
}

fn log_usage(dir: &Path) -> (u64, u64) {
    let mut n = 0;
    let mut bytes = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("log-") {
                n += 1;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (n, bytes)
}

/// One NBD connection's view of the resource.
struct Connection {
    res: Arc<Resource>,
    vol: Arc<Volume>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.res.open_count.fetch_sub(1, Ordering::Relaxed);
    }
}

fn io_err(e: VolumeError) -> io::Error {
    tracing::debug!("I/O error for the NBD client: {e}");
    io::Error::from_raw_os_error(e.errno())
}

impl Export for Connection {
    fn size(&self) -> u64 {
        self.vol.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn description(&self) -> String {
        format!("mars resource {}", self.res.cfg.name)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.vol.read(offset, buf).map_err(io_err)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.vol
            .write(offset, data, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.vol
            .write_zeroes(offset, len, may_trim, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.vol
            .discard(offset, len, fua)
            .map(|_| ())
            .map_err(io_err)
    }
    fn flush(&self) -> io::Result<()> {
        self.vol.flush().map(|_| ()).map_err(io_err)
    }
}
