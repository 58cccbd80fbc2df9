//! A log-structured volume: the primary's write path for one resource.
//!
//! ```text
//!  write ─► append to the transaction log (memory, ordered) ─► insert into the index ─► ack
//!  FLUSH ─► fdatasync of the log (grouped)                     FUA ─► same, for that write
//!  read  ─► index (newest data) ─► gaps from the backing disk
//!  writeback job:    durable records ─► sorted, coalesced pieces ─► disk ─► fdatasync ─►
//!                    persist the writeback position ─► drop the pieces from memory
//!  open after a crash: verify the log, replay from the writeback position, continue in a new
//!                      logfile
//! ```
//!
//! Memory for not-yet-written-back data is bounded by [`VolumeConfig::max_dirty`]: a writer that
//! would exceed it waits for writeback; writes are never dropped.

mod index;
mod position;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mars_config::HostName;
use mars_storage::{Dir, File};
use mars_txlog::workers::{Job, JobHandle, Workers};
use mars_txlog::{Appender, AppenderConfig, Kind, LogError, LogName, LogPos};

pub use index::Data;
use index::{Collected, Index};
pub use position::{format_position, parse_position, read_position, write_position, POSITION_FILE};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("backing disk: {op} at offset {offset}: {source}")]
    Disk {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("request {offset}+{len} is beyond the end of the {size}-byte device")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("backing disk has {disk} bytes, the volume needs {size}")]
    DiskTooSmall { disk: u64, size: u64 },
    #[error(
        "writeback position {position} is beyond the end of the log ({end}): logfiles are missing"
    )]
    PositionBeyondLog { position: LogPos, end: LogPos },
    #[error("writeback position file: {0}")]
    BadPosition(String),
    #[error("writeback failed earlier: {0}")]
    WritebackFailed(String),
    #[error("the volume is closed")]
    Closed,
    #[error("the volume is busy: {0}")]
    Busy(String),
}

impl VolumeError {
    /// The errno an NBD client should see.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::OutOfRange { .. } => 22, // EINVAL
            VolumeError::Closed => 108,           // ESHUTDOWN
            _ => 5,                               // EIO
        }
    }
}

#[derive(Clone)]
pub struct VolumeConfig {
    pub host: HostName,
    /// Device size in bytes.
    pub size: u64,
    /// Bound on memory held by writes that are not yet written back. Default 256 MiB.
    pub max_dirty: usize,
    /// Longest pause between writeback rounds while there is no memory pressure. Longer pauses
    /// coalesce more overwrites; shorter ones keep the log-to-disk lag small. Default 20 ms.
    pub writeback_interval: Duration,
    pub log: AppenderConfig,
}

impl VolumeConfig {
    pub fn new(host: HostName, size: u64) -> Self {
        Self {
            host,
            size,
            max_dirty: 256 << 20,
            writeback_interval: Duration::from_millis(20),
            log: AppenderConfig::default(),
        }
    }
}

/// What happened while opening.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Records replayed onto the disk.
    pub replayed: u64,
    /// Position recovery started from.
    pub from: LogPos,
    /// A torn tail cut off the newest logfile: (file, bytes).
    pub truncated: Option<(LogName, u64)>,
    /// The logfile appends go to now.
    pub current: Option<LogName>,
}

/// A snapshot of the volume's state, for `marsadm view` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    pub size: u64,
    pub current_log: LogName,
    pub appended: LogPos,
    pub durable: LogPos,
    pub written_back: LogPos,
    pub dirty_bytes: u64,
    pub pending_records: u64,
    pub writes: u64,
    pub error: Option<String>,
}

struct Shared {
    cfg: VolumeConfig,
    log: Appender,
    disk: Arc<dyn File>,
    dir: Arc<dyn Dir>,
    index: Mutex<Index>,
    /// Writers waiting for memory; [`Volume::stop`] waiting for writeback to finish.
    space: Condvar,
    /// Writeback's own state (only its job changes it, except `hurry`).
    wb: Mutex<Wb>,
    /// Writeback, a job on the process's shared threads (`mars_txlog::workers`).
    job: OnceLock<JobHandle>,
    written_back: Mutex<LogPos>,
    failed: Mutex<Option<String>>,
    closing: AtomicBool,
    writes: AtomicU64,
    /// Device size; grows with [`Volume::grow`].
    size: AtomicU64,
    /// Emergency mode: writes go straight to the disk, not to the log (which is not growing
    /// any more, so replicas fall behind for good). Switched under the index lock.
    passthrough: AtomicBool,
    /// Called after writeback was woken by a group commit (see [`Volume::on_durable`]).
    on_durable: Mutex<Option<mars_txlog::writer::DurableHook>>,
}

/// Writeback between its rounds.
#[derive(Default)]
struct Wb {
    /// A round is due at this time (overwrites accumulate until then).
    armed: Option<Instant>,
    /// Someone waits for writeback (a writer for memory, emergency mode): no accumulating.
    hurry: bool,
    /// Closed and everything written back, or failed: writeback does nothing more.
    finished: bool,
}

impl Shared {
    /// There is work for writeback (the log is durable further, memory is short, closing).
    fn kick(&self) {
        if let Some(j) = self.job.get() {
            j.now();
        }
    }

    /// Writeback is wanted without waiting for overwrites to accumulate.
    fn hurry(&self) {
        lock(&self.wb).hurry = true;
        self.kick();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Volume {
    shared: Arc<Shared>,
}

impl Volume {
    /// Opens the volume whose log lives in `dir` on top of `disk`: verifies the log, replays it
    /// from the persisted writeback position onto the disk, and starts a new logfile.
    pub fn open(
        cfg: VolumeConfig,
        dir: Arc<dyn Dir>,
        disk: Arc<dyn File>,
    ) -> Result<(Self, OpenReport), VolumeError> {
        let disk_len = disk.len().map_err(|source| VolumeError::Disk {
            op: "size",
            offset: 0,
            source,
        })?;
        if disk_len < cfg.size {
            return Err(VolumeError::DiskTooSmall {
                disk: disk_len,
                size: cfg.size,
            });
        }
        let rec = mars_txlog::recover(&*dir)?;
        let first = rec
            .files
            .first()
            .map_or(LogPos::ZERO, |f| LogPos::new(f.name.no, 0));
        let saved = read_position(&*dir)?;
        let from = saved.map_or(first, |p| p.max(first));
        let end = rec.end();
        // No logfiles at all and the position at the start of one: everything is on the disk
        // (a replica that reclaimed every replayed logfile and now becomes primary); the log
        // continues at that number.
        let empty_start = rec.files.is_empty() && from.offset == 0 && from.file > 0;
        if from > end && !(from.offset == 0 && from.file == rec.next_file_no()) && !empty_start {
            return Err(VolumeError::PositionBeyondLog {
                position: from,
                end,
            });
        }
        let mut replayed = 0u64;
        mars_txlog::replay::<VolumeError>(&*dir, &rec, from, |_, r| {
            apply(
                &*disk,
                r.header.kind,
                r.header.offset,
                r.header.len,
                &r.payload,
            )?;
            replayed += 1;
            Ok(())
        })?;
        if replayed > 0 {
            disk.sync_data().map_err(|source| VolumeError::Disk {
                op: "fdatasync",
                offset: 0,
                source,
            })?;
        }
        let next = if empty_start {
            from.file
        } else {
            rec.next_file_no()
        };
        let start = LogPos::new(next, 0);
        let cfg_size = cfg.size;
        let log = Appender::start(
            dir.clone(),
            cfg.host.clone(),
            next,
            rec.last_stamp(),
            cfg.log.clone(),
        )?;
        // Everything before the new logfile is on the disk now.
        write_position(&*dir, start)?;
        if replayed > 0 || rec.truncated.is_some() {
            tracing::info!(
                "recovered: replayed {replayed} records from {from}, continuing in {}",
                log.current_file()
            );
        }
        let report = OpenReport {
            replayed,
            from,
            truncated: rec.truncated.clone(),
            current: Some(log.current_file()),
        };
        let shared = Arc::new(Shared {
            cfg,
            log,
            disk,
            dir,
            index: Mutex::new(Index::default()),
            space: Condvar::new(),
            wb: Mutex::new(Wb::default()),
            job: OnceLock::new(),
            written_back: Mutex::new(start),
            failed: Mutex::new(None),
            closing: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            size: AtomicU64::new(cfg_size),
            passthrough: AtomicBool::new(false),
            on_durable: Mutex::new(None),
        });
        // The log's group commits wake writeback (and then whoever follows the volume).
        let weak = Arc::downgrade(&shared);
        shared.log.on_durable(Arc::new(move |pos| {
            if let Some(s) = weak.upgrade() {
                s.kick();
                let hook = lock(&s.on_durable).clone();
                if let Some(h) = hook {
                    h(pos);
                }
            }
        }));
        let weak = Arc::downgrade(&shared) as Weak<dyn Job>;
        let _ = shared.job.set(Workers::global().register(weak));
        Ok((Self { shared }, report))
    }

    pub fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    /// Grows the device to `size` (never shrinks); the backing disk must be large enough.
    pub fn grow(&self, size: u64) -> Result<(), VolumeError> {
        let disk = self.shared.disk.len().map_err(|source| VolumeError::Disk {
            op: "size",
            offset: 0,
            source,
        })?;
        if disk < size {
            return Err(VolumeError::DiskTooSmall { disk, size });
        }
        self.shared.size.fetch_max(size, Ordering::AcqRel);
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(e) if e <= size => Ok(()),
            _ => Err(VolumeError::OutOfRange { offset, len, size }),
        }
    }

    fn check_failed(&self) -> Result<(), VolumeError> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(VolumeError::Closed);
        }
        if let Some(e) = &*lock(&self.shared.failed) {
            return Err(VolumeError::WritebackFailed(e.clone()));
        }
        Ok(())
    }

    /// Reads the newest data.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_range(offset, buf.len() as u64)?;
        let gaps = lock(&self.shared.index).read(offset, buf);
        for (a, b) in gaps {
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            read_disk(&*self.shared.disk, a, dst)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. Returns once the write is ordered in the log and visible to
    /// reads; with `fua`, once it is durable.
    pub fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<LogPos, VolumeError> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return self.maybe_fua(fua);
        }
        let len = data.len() as u64;
        // Split what a single record cannot carry.
        let max = mars_txlog::format::MAX_PAYLOAD as usize;
        let mut end = LogPos::ZERO;
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(max);
            let chunk = data.slice(done..done + n);
            end = self.append(
                Kind::Write,
                offset + done as u64,
                n as u64,
                Data::Bytes(chunk),
            )?;
            done += n;
        }
        debug_assert_eq!(done as u64, len);
        if fua {
            self.shared.log.sync_to(end)?;
            self.sync_disk_in_passthrough()?;
        }
        Ok(end)
    }

    /// Makes `[offset, offset+len)` read as zeros (a compact log record, no data).
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<LogPos, VolumeError> {
        self.zero_range(Kind::Zero, offset, len, may_trim, fua)
    }

    /// Discards a range. The result is defined (zeros) so that every replica stays identical.
    pub fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<LogPos, VolumeError> {
        self.zero_range(Kind::Discard, offset, len, true, fua)
    }

    /// A compact zero-range record (no data); `punch` lets writeback deallocate the range.
    fn zero_range(
        &self,
        kind: Kind,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    ) -> Result<LogPos, VolumeError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return self.maybe_fua(fua);
        }
        let end = self.append(kind, offset, len, Data::Zero { punch })?;
        if fua {
            self.shared.log.sync_to(end)?;
            self.sync_disk_in_passthrough()?;
        }
        Ok(end)
    }

    fn maybe_fua(&self, fua: bool) -> Result<LogPos, VolumeError> {
        self.check_failed()?;
        if fua {
            self.sync_disk_in_passthrough()?;
            Ok(self.shared.log.sync_all()?)
        } else {
            Ok(self.shared.log.appended())
        }
    }

    /// A write of `len` bytes would wait for memory now (dirty data at its limit), or go to
    /// the disk (emergency mode): a caller on an async worker should run it elsewhere.
    pub fn write_may_block(&self, len: usize) -> bool {
        if self.shared.passthrough.load(Ordering::Acquire) {
            return true;
        }
        let ix = lock(&self.shared.index);
        ix.mem > 0 && ix.mem + len > self.shared.cfg.max_dirty
    }

    fn append(&self, kind: Kind, offset: u64, len: u64, data: Data) -> Result<LogPos, VolumeError> {
        self.check_failed()?;
        let mem = match &data {
            Data::Bytes(b) => b.len(),
            Data::Zero { .. } => 0,
        };
        let max = self.shared.cfg.max_dirty;
        let mut ix = lock(&self.shared.index);
        if self.shared.passthrough.load(Ordering::Acquire) {
            // Emergency mode: straight to the disk (the index is empty, reads see the disk).
            let payload: &[u8] = match &data {
                Data::Bytes(b) => b,
                Data::Zero { .. } => &[],
            };
            apply(&*self.shared.disk, kind, offset, len, payload)?;
            self.shared.writes.fetch_add(1, Ordering::Relaxed);
            drop(ix);
            return Ok(self.shared.log.appended());
        }
        while mem > 0 && ix.mem > 0 && ix.mem + mem > max {
            drop(ix);
            self.shared.hurry();
            ix = lock(&self.shared.index);
            if !(ix.mem > 0 && ix.mem + mem > max) {
                break;
            }
            ix = self
                .shared
                .space
                .wait(ix)
                .unwrap_or_else(|e| e.into_inner());
            self.check_failed()?;
        }
        // Append and index under one lock: the index must reflect log order for overlapping
        // writes.
        let payload: &[u8] = match &data {
            Data::Bytes(b) => b,
            Data::Zero { .. } => &[],
        };
        let a = self.shared.log.append(kind, offset, len, payload)?;
        ix.insert(offset, offset + len, a.pos, a.end, data);
        self.shared.writes.fetch_add(1, Ordering::Relaxed);
        Ok(a.end)
    }

    /// FLUSH: every write acknowledged so far is durable when this returns.
    pub fn flush(&self) -> Result<LogPos, VolumeError> {
        self.check_failed()?;
        self.sync_disk_in_passthrough()?;
        Ok(self.shared.log.sync_all()?)
    }

    /// In emergency mode writes are durable once the disk is synced.
    fn sync_disk_in_passthrough(&self) -> Result<(), VolumeError> {
        if self.shared.passthrough.load(Ordering::Acquire) {
            self.shared
                .disk
                .sync_data()
                .map_err(|source| VolumeError::Disk {
                    op: "fdatasync",
                    offset: 0,
                    source,
                })?;
        }
        Ok(())
    }

    /// Emergency mode is on: writes bypass the log.
    pub fn passthrough(&self) -> bool {
        self.shared.passthrough.load(Ordering::Acquire)
    }

    /// Enters emergency mode: makes the log durable, writes everything back, and from then on
    /// sends writes straight to the disk (MARS: "all IO goes directly to the disk"). The log
    /// stops growing, so it uses no more space. Fails (nothing changed) if writeback does not
    /// empty the memory within `timeout`.
    pub fn enter_passthrough(&self, timeout: Duration) -> Result<(), VolumeError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.check_failed()?;
            self.shared.log.sync_all()?;
            {
                let ix = lock(&self.shared.index);
                if ix.pending_records() == 0 {
                    self.shared.passthrough.store(true, Ordering::Release);
                    return Ok(());
                }
            }
            self.shared.hurry();
            if std::time::Instant::now() >= deadline {
                return Err(VolumeError::Busy("writeback did not finish in time".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Leaves emergency mode (or completes one interrupted by a restart): the log continues
    /// after a deliberate hole of one logfile number, and every older logfile is deleted (all
    /// of it is on the disk). Replicas cannot fetch across the hole: they stay consistent where
    /// they are until a full sync. Returns the number of the new logfile.
    pub fn restart_log_after_gap(&self) -> Result<u64, VolumeError> {
        self.shared.log.sync_all()?;
        let ix = lock(&self.shared.index);
        if ix.pending_records() > 0 {
            return Err(VolumeError::Busy(
                "records are still waiting for writeback".into(),
            ));
        }
        self.shared
            .disk
            .sync_data()
            .map_err(|source| VolumeError::Disk {
                op: "fdatasync",
                offset: 0,
                source,
            })?;
        let next = self.shared.log.rotate_skipping(1)?;
        self.shared.passthrough.store(false, Ordering::Release);
        let start = LogPos::new(next, 0);
        write_position(&*self.shared.dir, start)?;
        *lock(&self.shared.written_back) = start;
        drop(ix);
        for name in mars_txlog::list_logs_unchecked(&*self.shared.dir)? {
            if name.no < next {
                mars_txlog::remove_log(&*self.shared.dir, &name)?;
            }
        }
        self.shared.dir.sync().map_err(|source| VolumeError::Disk {
            op: "directory sync",
            offset: 0,
            source,
        })?;
        Ok(next)
    }

    /// Blocks until the log is durable up to `pos`.
    pub fn sync_to(&self, pos: LogPos) -> Result<(), VolumeError> {
        Ok(self.shared.log.sync_to(pos)?)
    }

    /// Closes the current logfile and continues in the next one; returns the new name.
    pub fn rotate(&self) -> Result<LogName, VolumeError> {
        self.check_failed()?;
        self.shared.log.rotate()?;
        Ok(self.shared.log.current_file())
    }

    /// Waits (at most `timeout`) until the durable end of the log moves beyond `seen`; returns
    /// the durable end. The log shipping server follows the log with this.
    pub fn wait_durable_beyond(
        &self,
        seen: LogPos,
        timeout: Duration,
    ) -> Result<LogPos, VolumeError> {
        Ok(self.shared.log.wait_durable_beyond(seen, timeout)?)
    }

    /// Calls `hook` with the new durable end after every group commit of the log (on the log's
    /// thread; it must not block).
    pub fn on_durable(&self, hook: mars_txlog::writer::DurableHook) {
        *lock(&self.shared.on_durable) = Some(hook);
    }

    /// Rotates unless the current logfile is still empty; returns the position where the next
    /// write will go (the start of the then current logfile). A full sync starts here.
    pub fn rotate_if_used(&self) -> Result<LogPos, VolumeError> {
        self.check_failed()?;
        if self.shared.log.appended().offset > 0 {
            self.shared.log.rotate()?;
        }
        Ok(LogPos::new(self.shared.log.current_file().no, 0))
    }

    /// Deletes the logfiles whose every record is on the backing disk (all before the logfile
    /// holding the writeback position, never the current one). Returns what was deleted.
    ///
    /// `others_need`: the oldest logfile some replica still needs (nothing older is deleted).
    pub fn reclaim_logs(&self, others_need: Option<u64>) -> Result<Vec<LogName>, VolumeError> {
        let keep_from = {
            let wb = *lock(&self.shared.written_back);
            let mine = wb.file.min(self.shared.log.current_file().no);
            others_need.map_or(mine, |o| o.min(mine))
        };
        let mut removed = Vec::new();
        for name in mars_txlog::list_logs(&*self.shared.dir)? {
            if name.no >= keep_from {
                break;
            }
            mars_txlog::remove_log(&*self.shared.dir, &name)?;
            removed.push(name);
        }
        Ok(removed)
    }

    pub fn status(&self) -> VolumeStatus {
        let (dirty, pending) = {
            let ix = lock(&self.shared.index);
            (ix.mem as u64, ix.pending_records() as u64)
        };
        VolumeStatus {
            size: self.size(),
            current_log: self.shared.log.current_file(),
            appended: self.shared.log.appended(),
            durable: self.shared.log.durable(),
            written_back: *lock(&self.shared.written_back),
            dirty_bytes: dirty,
            pending_records: pending,
            writes: self.shared.writes.load(Ordering::Relaxed),
            error: lock(&self.shared.failed).clone(),
        }
    }

    /// Syncs the log, writes everything back, persists the final position and stops. After a
    /// clean close, the next open replays nothing.
    pub fn close(mut self) -> Result<LogPos, VolumeError> {
        let end = self.shared.log.sync_all()?;
        self.stop();
        if let Some(e) = &*lock(&self.shared.failed) {
            return Err(VolumeError::WritebackFailed(e.clone()));
        }
        Ok(end)
    }

    /// Closing: writeback writes back what is durable and finishes; waits for that.
    fn stop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        {
            let _ix = lock(&self.shared.index);
            self.shared.space.notify_all();
        }
        self.shared.hurry();
        let mut wb = lock(&self.shared.wb);
        while !wb.finished {
            wb = self
                .shared
                .space
                .wait(wb)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_disk(disk: &dyn File, off: u64, dst: &mut [u8]) -> Result<(), VolumeError> {
    let mut done = 0;
    while done < dst.len() {
        let n = disk
            .read_at(&mut dst[done..], off + done as u64)
            .map_err(|source| VolumeError::Disk {
                op: "read",
                offset: off + done as u64,
                source,
            })?;
        if n == 0 {
            // Past the end of a sparse or short backing file: reads as zeros.
            dst[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Applies one record to the disk (recovery, writeback and a secondary's replay share this).
pub fn apply(
    disk: &dyn File,
    kind: Kind,
    offset: u64,
    len: u64,
    payload: &[u8],
) -> Result<(), VolumeError> {
    let r = match kind {
        Kind::Write => disk.write_at(payload, offset),
        Kind::Zero => disk.write_zeroes(offset, len, false),
        Kind::Discard => disk.write_zeroes(offset, len, true),
    };
    r.map_err(|source| VolumeError::Disk {
        op: "write",
        offset,
        source,
    })
}

/// Largest batch one writeback round takes, so that memory is released in steps.
const WRITEBACK_BATCH: usize = 64 << 20;

impl Job for Shared {
    /// One writeback round, once it is due: collect durable records (up to a batch), write
    /// them to the disk, sync, persist the position, release the memory. Without pressure a
    /// round waits `writeback_interval` after the first wake so that overwrites accumulate; an
    /// idle volume is not scheduled at all (the log's group commits schedule it).
    fn run(&self) -> Option<Instant> {
        let closing = self.closing.load(Ordering::Acquire);
        let now = Instant::now();
        let batch = {
            let mut wb = lock(&self.wb);
            if wb.finished {
                return None;
            }
            let mut ix = lock(&self.index);
            let pressed = closing || wb.hurry || ix.mem * 2 >= self.cfg.max_dirty;
            if !pressed && self.cfg.writeback_interval > Duration::ZERO {
                let at = *wb.armed.get_or_insert(now + self.cfg.writeback_interval);
                if at > now {
                    return Some(at);
                }
            }
            wb.armed = None;
            let batch = ix.collect(self.log.durable(), WRITEBACK_BATCH);
            if batch.position.is_none() {
                if closing && ix.is_empty() {
                    wb.finished = true;
                    drop(ix);
                    drop(wb);
                    self.space.notify_all();
                    return None;
                }
                // Nothing durable to write back: the log's next group commit schedules this
                // job again. Closing waits for records that are not durable yet (the owner
                // syncs the log before closing); look again soon in case nobody does.
                return closing.then(|| now + self.cfg.writeback_interval.max(MIN_RETRY));
            }
            // A waiter's hurry is served by this round (it asks again if it still waits).
            wb.hurry = false;
            batch
        };
        if let Err(e) = write_batch(self, &batch) {
            tracing::error!("writeback failed: {e}");
            *lock(&self.failed) = Some(e.to_string());
            lock(&self.wb).finished = true;
            let _ix = lock(&self.index);
            self.space.notify_all();
            return None;
        }
        let mut ix = lock(&self.index);
        ix.release(&batch);
        let pressed = ix.mem * 2 >= self.cfg.max_dirty;
        drop(ix);
        self.space.notify_all();
        // More may be durable already (a batch is bounded): the next round comes at once under
        // pressure, otherwise after a short pause for overwrites; if it finds nothing it idles.
        if closing || pressed || self.cfg.writeback_interval == Duration::ZERO {
            return Some(Instant::now());
        }
        let at = Instant::now() + self.cfg.writeback_interval / 4;
        lock(&self.wb).armed = Some(at);
        Some(at)
    }
}

/// Shortest pause before writeback looks again for records that are not durable yet.
const MIN_RETRY: Duration = Duration::from_millis(1);

fn write_batch(s: &Shared, batch: &Collected) -> Result<(), VolumeError> {
    for p in &batch.pieces {
        let r = match &p.data {
            Data::Bytes(b) => s.disk.write_at_direct(b, p.start),
            Data::Zero { punch } => s.disk.write_zeroes(p.start, p.end - p.start, *punch),
        };
        r.map_err(|source| VolumeError::Disk {
            op: "write",
            offset: p.start,
            source,
        })?;
    }
    s.disk.sync_data().map_err(|source| VolumeError::Disk {
        op: "fdatasync",
        offset: 0,
        source,
    })?;
    let pos = batch.position.expect("checked by caller");
    let mut wb = lock(&s.written_back);
    if pos > *wb {
        write_position(&*s.dir, pos)?;
        *wb = pos;
    }
    Ok(())
}
