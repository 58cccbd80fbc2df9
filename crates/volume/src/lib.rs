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
//!
//! Emergency mode (MARS: "all IO goes directly to the disk") is entered on the owner's request
//! ([`Volume::enter_passthrough`], free space measured low) or at once when the log's
//! filesystem is full ([`LogError::Full`]): writes never fail for space. Then writeback writes
//! every record the index holds, durable or not, to the disk, syncs it and creates the
//! [`EMERGENCY_FILE`] marker before the first write bypasses the log. A crash in the middle of
//! that switch may leave writes that no FLUSH covered partly applied (replay of the durable
//! records over newer ones), which the block-device contract allows; nothing flushed is lost.

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
/// The overwrite-coalescing index, also used by a replica's replay to batch, merge and sort
/// its writes as writeback does.
pub use index::{Collected, Index, Piece};
pub use position::{format_position, parse_position, read_position, write_position, POSITION_FILE};

/// The marker of emergency mode in the log's directory: present = every record of the log is on
/// the disk and newer writes may have bypassed the log, so an open replays nothing and the log
/// may only continue after a hole ([`Volume::restart_log_after_gap`]). Empty; its presence is
/// what counts (creating it needs no data block, so it works on a full filesystem).
pub const EMERGENCY_FILE: &str = "emergency";

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
    /// The [`EMERGENCY_FILE`] marker was found: nothing was replayed and the volume is in
    /// emergency mode until [`Volume::restart_log_after_gap`].
    pub emergency: bool,
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
    /// The last writeback position could not be persisted for lack of space (logged once).
    position_stuck: AtomicBool,
    /// Called once the volume entered emergency mode by itself (see [`Volume::on_emergency`]).
    on_emergency: Mutex<Option<EmergencyHook>>,
}

/// Called (on a worker thread; it must not block) when the volume entered emergency mode by
/// itself because its log ran out of space.
pub type EmergencyHook = Arc<dyn Fn() + Send + Sync>;

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
        // In emergency mode every record of the log is on the disk already, and writes newer
        // than the log's may be there too: replaying would bring back older data.
        let emergency = emergency_marked(&*dir)?;
        // No logfiles at all and the position at the start of one: everything is on the disk
        // (a replica that reclaimed every replayed logfile and now becomes primary); the log
        // continues at that number.
        let empty_start = rec.files.is_empty() && from.offset == 0 && from.file > 0;
        let next_file_start = from.offset == 0 && from.file == rec.next_file_no();
        if from > end && !(next_file_start || empty_start || emergency) {
            return Err(VolumeError::PositionBeyondLog {
                position: from,
                end,
            });
        }
        let mut replayed = 0u64;
        let from = if emergency { end.max(from) } else { from };
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
        // Everything before the new logfile is on the disk now. On a full filesystem the old
        // position stays: a later open replays a little more, in order, which is harmless.
        let position_stuck = !persist_position(&*dir, start)?;
        if position_stuck {
            tracing::warn!("the filesystem is full: the writeback position stays before {start}");
        }
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
            emergency,
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
            passthrough: AtomicBool::new(emergency),
            on_durable: Mutex::new(None),
            on_emergency: Mutex::new(None),
            position_stuck: AtomicBool::new(position_stuck),
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
            self.make_durable(Some(end))?;
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
            self.make_durable(Some(end))?;
        }
        Ok(end)
    }

    fn maybe_fua(&self, fua: bool) -> Result<LogPos, VolumeError> {
        self.check_failed()?;
        if fua {
            self.make_durable(None)
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
        let payload: &[u8] = match &data {
            Data::Bytes(b) => b,
            Data::Zero { .. } => &[],
        };
        let mem = payload.len();
        let max = self.shared.cfg.max_dirty;
        loop {
            self.check_failed()?;
            let mut ix = lock(&self.shared.index);
            if self.shared.passthrough.load(Ordering::Acquire) {
                // Emergency mode: straight to the disk (the index is empty, reads see the disk).
                apply(&*self.shared.disk, kind, offset, len, payload)?;
                self.shared.writes.fetch_add(1, Ordering::Relaxed);
                drop(ix);
                return Ok(self.shared.log.appended());
            }
            if mem > 0 && ix.mem > 0 && ix.mem + mem > max {
                drop(ix);
                self.shared.hurry();
                let ix = lock(&self.shared.index);
                if ix.mem > 0 && ix.mem + mem > max {
                    // Woken by writeback releasing memory (or by emergency mode, closing or a
                    // failure): decide again from the top.
                    drop(
                        self.shared
                            .space
                            .wait(ix)
                            .unwrap_or_else(|e| e.into_inner()),
                    );
                }
                continue;
            }
            // Append and index under one lock: the index must reflect log order for overlapping
            // writes.
            match self.shared.log.append(kind, offset, len, payload) {
                Ok(a) => {
                    ix.insert(offset, offset + len, a.pos, a.end, data);
                    self.shared.writes.fetch_add(1, Ordering::Relaxed);
                    return Ok(a.end);
                }
                Err(LogError::Full(_)) => {
                    drop(ix);
                    self.await_passthrough()?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// FLUSH: every write acknowledged so far is durable when this returns.
    pub fn flush(&self) -> Result<LogPos, VolumeError> {
        self.check_failed()?;
        self.make_durable(None)
    }

    /// Makes the writes acknowledged so far durable up to `upto` (all of them: `None`): a sync
    /// of the log, or in emergency mode of the disk. A log that turns out to be full switches
    /// to emergency mode first (which writes everything the log lost to the disk).
    fn make_durable(&self, upto: Option<LogPos>) -> Result<LogPos, VolumeError> {
        // A write that bypassed the log happened after the flag was set, so seeing it unset
        // here means every write acknowledged before is in the log.
        if self.shared.passthrough.load(Ordering::Acquire) {
            self.sync_disk()?;
            return Ok(self.shared.log.appended());
        }
        let r = match upto {
            Some(p) => self.shared.log.sync_to(p).map(|()| p),
            None => self.shared.log.sync_all(),
        };
        match r {
            Ok(p) => Ok(p),
            Err(LogError::Full(_)) => {
                self.await_passthrough()?;
                self.sync_disk()?;
                Ok(self.shared.log.appended())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn sync_disk(&self) -> Result<(), VolumeError> {
        self.shared
            .disk
            .sync_data()
            .map_err(|source| VolumeError::Disk {
                op: "fdatasync",
                offset: 0,
                source,
            })
    }

    /// The log ran out of space: has writeback switch to emergency mode and waits until it
    /// did (then every acknowledged write is on the disk, synced, and the marker exists).
    fn await_passthrough(&self) -> Result<(), VolumeError> {
        self.shared.hurry();
        let mut ix = lock(&self.shared.index);
        loop {
            if self.shared.passthrough.load(Ordering::Acquire) {
                return Ok(());
            }
            if let Some(e) = &*lock(&self.shared.failed) {
                return Err(VolumeError::WritebackFailed(e.clone()));
            }
            // Writeback notifies when it is done; the timeout only guards against a missed one.
            ix = self
                .shared
                .space
                .wait_timeout(ix, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Calls `hook` once the volume entered emergency mode by itself (its log ran out of
    /// space), so that its owner hears of it before the next measurement of free space.
    pub fn on_emergency(&self, hook: EmergencyHook) {
        *lock(&self.shared.on_emergency) = Some(hook);
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
            if self.shared.passthrough.load(Ordering::Acquire) {
                return Ok(());
            }
            match self.shared.log.sync_all() {
                Ok(_) => {}
                // The log filled up first: the switch happens anyway, all at once.
                Err(LogError::Full(_)) => return self.await_passthrough(),
                Err(e) => return Err(e.into()),
            }
            {
                let mut ix = lock(&self.shared.index);
                if ix.pending_records() == 0 {
                    ix.forget_written_back();
                    // The marker before the first write that bypasses the log: a restart must
                    // not continue the log as if nothing had happened.
                    mark_emergency(&*self.shared.dir)?;
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
    ///
    /// Crash safety: the marker goes last, after the new position and the deletions, and
    /// before the first write goes to the log again (all under the index lock, which writes
    /// take): a restart in between finds the marker and replays nothing, which is right as
    /// long as nothing was appended.
    pub fn restart_log_after_gap(&self) -> Result<u64, VolumeError> {
        self.check_failed()?;
        self.make_durable(None)?;
        let ix = lock(&self.shared.index);
        if ix.pending_records() > 0 {
            return Err(VolumeError::Busy(
                "records are still waiting for writeback".into(),
            ));
        }
        self.sync_disk()?;
        let next = self.shared.log.rotate_skipping(1)?;
        let start = LogPos::new(next, 0);
        write_position(&*self.shared.dir, start)?;
        *lock(&self.shared.written_back) = start;
        for name in mars_txlog::list_logs_unchecked(&*self.shared.dir)? {
            if name.no < next {
                mars_txlog::remove_log(&*self.shared.dir, &name)?;
            }
        }
        unmark_emergency(&*self.shared.dir)?;
        self.shared.passthrough.store(false, Ordering::Release);
        drop(ix);
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

    /// Copies durable records of logfile `file` from `off` out of the log's window of its
    /// newest group commits (see [`mars_txlog::Appender::read_recent`]); `false` when the
    /// window does not hold them. The log shipping server tries this before reading the file.
    pub fn read_recent_log(
        &self,
        file: u64,
        off: u64,
        limit: u64,
        max: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        self.shared.log.read_recent(file, off, limit, max, out)
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
        let end = self.make_durable(None)?;
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

/// Persists the writeback position; `false` if the filesystem is full (not an error: the
/// persisted position only bounds how much recovery replays).
fn persist_position(dir: &dyn Dir, pos: LogPos) -> Result<bool, VolumeError> {
    match dir.write_atomic(POSITION_FILE, format_position(pos).as_bytes()) {
        Ok(()) => Ok(true),
        Err(e) if mars_storage::out_of_space(&e) => Ok(false),
        Err(e) => Err(VolumeError::BadPosition(format!("write: {e}"))),
    }
}

/// Whether the [`EMERGENCY_FILE`] marker exists.
fn emergency_marked(dir: &dyn Dir) -> Result<bool, VolumeError> {
    match dir.open(EMERGENCY_FILE, mars_storage::OpenMode::Existing) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(dir_error("open the emergency marker", source)),
    }
}

/// Creates the [`EMERGENCY_FILE`] marker durably (an empty file: no data block needed).
fn mark_emergency(dir: &dyn Dir) -> Result<(), VolumeError> {
    dir.open(EMERGENCY_FILE, mars_storage::OpenMode::Create)
        .map_err(|e| dir_error("create the emergency marker", e))?;
    dir.sync().map_err(|e| dir_error("directory sync", e))
}

/// Removes the [`EMERGENCY_FILE`] marker durably (if it is there).
fn unmark_emergency(dir: &dyn Dir) -> Result<(), VolumeError> {
    match dir.remove(EMERGENCY_FILE) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(dir_error("remove the emergency marker", e)),
    }
    dir.sync().map_err(|e| dir_error("directory sync", e))
}

fn dir_error(op: &'static str, source: std::io::Error) -> VolumeError {
    VolumeError::Disk {
        op,
        offset: 0,
        source,
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
        // The log may have filled up without anybody waiting for it yet (a close, a drop).
        if let Some(why) = self
            .log
            .full()
            .filter(|_| !self.passthrough.load(Ordering::Acquire))
        {
            if lock(&self.wb).finished {
                return None;
            }
            if let Err(e) = self.switch_to_passthrough(&why) {
                tracing::error!("cannot enter emergency mode after the log filled up: {e}");
                self.fail(e);
                return None;
            }
            return Some(Instant::now());
        }
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
            self.fail(e);
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

impl Shared {
    /// Writeback failed: writes are refused from now on (the log still holds what it has).
    fn fail(&self, e: VolumeError) {
        *lock(&self.failed) = Some(e.to_string());
        lock(&self.wb).finished = true;
        let _ix = lock(&self.index);
        self.space.notify_all();
    }

    /// The log is full: every record the index holds, durable or not, goes to the disk, then
    /// the marker, then writes bypass the log (see the module docs). Runs as the writeback job,
    /// so no other writeback round is under way; appends are refused by the full log, so the
    /// index only shrinks meanwhile.
    fn switch_to_passthrough(&self, why: &str) -> Result<(), VolumeError> {
        let batch = lock(&self.index).collect(self.log.appended(), usize::MAX);
        write_pieces(self, &batch)?;
        mark_emergency(&*self.dir)?;
        {
            let mut ix = lock(&self.index);
            ix.release(&batch);
            ix.forget_written_back();
            self.passthrough.store(true, Ordering::Release);
        }
        self.space.notify_all();
        tracing::error!(
            "emergency mode: the log is out of space ({why}); {} records went to the disk, \
             writes bypass the log",
            batch.records
        );
        let hook = lock(&self.on_emergency).clone();
        if let Some(h) = hook {
            h();
        }
        Ok(())
    }
}

/// Shortest pause before writeback looks again for records that are not durable yet.
const MIN_RETRY: Duration = Duration::from_millis(1);

fn write_batch(s: &Shared, batch: &Collected) -> Result<(), VolumeError> {
    write_pieces(s, batch)?;
    let pos = batch.position.expect("checked by caller");
    let mut wb = lock(&s.written_back);
    if pos > *wb {
        // A full filesystem: the position stays behind (recovery replays a little more,
        // logfiles are kept a little longer); the data is on the disk and in the log.
        if persist_position(&*s.dir, pos)? {
            *wb = pos;
            s.position_stuck.store(false, Ordering::Relaxed);
        } else if !s.position_stuck.swap(true, Ordering::Relaxed) {
            tracing::warn!("the filesystem is full: the writeback position stays before {pos}");
        }
    }
    Ok(())
}

/// Most bytes of adjacent pieces written back with one `pwritev`.
const MAX_RUN_BYTES: usize = 8 << 20;
/// Most pieces in one `pwritev` (the kernel's `IOV_MAX` is 1024).
const MAX_RUN_PIECES: usize = 256;

/// Writes a batch's pieces to the disk and syncs it. Pieces are sorted by offset; a run of
/// adjacent data pieces (a sequential writer's requests) goes to the disk as one vectored write.
fn write_pieces(s: &Shared, batch: &Collected) -> Result<(), VolumeError> {
    let disk_err = |offset: u64| {
        move |source| VolumeError::Disk {
            op: "write",
            offset,
            source,
        }
    };
    let mut run: Vec<&[u8]> = Vec::new();
    let mut run_start = 0u64;
    let mut run_end = 0u64;
    let mut run_bytes = 0usize;
    for p in &batch.pieces {
        match &p.data {
            Data::Bytes(b) => {
                let joins = !run.is_empty()
                    && p.start == run_end
                    && run.len() < MAX_RUN_PIECES
                    && run_bytes + b.len() <= MAX_RUN_BYTES;
                if !joins && !run.is_empty() {
                    s.disk
                        .write_vectored_at_direct(&run, run_start)
                        .map_err(disk_err(run_start))?;
                    run.clear();
                    run_bytes = 0;
                }
                if run.is_empty() {
                    run_start = p.start;
                }
                run.push(b);
                run_bytes += b.len();
                run_end = p.end;
            }
            Data::Zero { punch } => {
                if !run.is_empty() {
                    s.disk
                        .write_vectored_at_direct(&run, run_start)
                        .map_err(disk_err(run_start))?;
                    run.clear();
                    run_bytes = 0;
                }
                s.disk
                    .write_zeroes(p.start, p.end - p.start, *punch)
                    .map_err(disk_err(p.start))?;
            }
        }
    }
    if !run.is_empty() {
        s.disk
            .write_vectored_at_direct(&run, run_start)
            .map_err(disk_err(run_start))?;
    }
    s.disk.sync_data().map_err(|source| VolumeError::Disk {
        op: "fdatasync",
        offset: 0,
        source,
    })
}
