//! The appender: many writers, one background thread, one `fdatasync` per group.
//!
//! `append` encodes the record into an in-memory segment under a mutex and returns at once with
//! the record's [`LogPos`]; that is what a plain (non-FUA) write needs before it is acknowledged.
//! A background thread takes every pending segment, writes it with one `pwrite` per logfile and
//! makes it durable with one `fdatasync`, then advances the *durable* position and wakes everybody
//! waiting in [`Appender::sync_to`]. So N concurrent FLUSH/FUA requests cost one sync, not N (group
//! commit, the leader being the thread).
//!
//! Rotation is decided at append time, so positions handed out are final: when a record would
//! push the current logfile past `max_file_size` (or after [`Appender::rotate`]), the record goes
//! to offset 0 of logfile N+1 and its sequence numbers restart at 1. The thread syncs logfile N,
//! creates N+1 and syncs the directory before writing into N+1, so a durable record in N+1
//! implies that N is complete on disk.
//!
//! The pending records are encoded into aligned chunks (`segment.rs`) that the group commit
//! writes with O_DIRECT where the filesystem has it: the log does not go through the page cache,
//! which it never reads back soon (recovery and fetching secondaries read it, if at all).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::workers::{Job, JobHandle, Workers};

use mars_config::HostName;
use mars_storage::{Dir, File, OpenMode};

use crate::format::{encode_header, Header, Kind};
use crate::name::MAX_LOG_NO;
use crate::recent::Recent;
use crate::segment::Segment;
use crate::{LogError, LogName, LogPos};

/// Nanoseconds since the epoch; injected so that tests control the Lamport stamps.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock as a [`Clock`].
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

#[derive(Clone)]
pub struct AppenderConfig {
    /// Rotate to a new logfile when the current one would grow beyond this. Default 1 GiB.
    pub max_file_size: u64,
    /// Start writing a group once this much is pending, even if nobody asked for a sync.
    /// Default 1 MiB.
    pub group_bytes: usize,
    /// Longest time a record waits in memory before the thread writes and syncs it anyway, so
    /// that writeback (which only applies durable records) keeps moving. Default 2 ms.
    pub group_delay: Duration,
    pub clock: Clock,
}

impl Default for AppenderConfig {
    fn default() -> Self {
        Self {
            max_file_size: 1 << 30,
            group_bytes: 1 << 20,
            group_delay: Duration::from_millis(2),
            clock: system_clock(),
        }
    }
}

/// Where an appended record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Position of the record's first byte.
    pub pos: LogPos,
    /// Position just after the record: durable once `durable() >= end`.
    pub end: LogPos,
    pub seq: u64,
    pub stamp: u64,
}

struct State {
    host: HostName,
    pending: Vec<Segment>,
    pending_bytes: usize,
    oldest_pending: Option<Instant>,
    /// Position after the last appended record.
    appended: LogPos,
    /// Next sequence number in the current logfile.
    next_seq: u64,
    last_stamp: u64,
    /// Everything before this is on stable storage.
    durable: LogPos,
    /// Somebody waits for durability up to here.
    sync_wanted: LogPos,
    failed: Option<String>,
    /// The filesystem ran out of space (see [`LogError::Full`]): appends are refused and the
    /// not yet durable records are gone from the log until [`Appender::rotate_skipping`].
    full: Option<String>,
    closing: bool,
    /// The current logfile's bytes from the block boundary below `appended` up to it, once
    /// the segments holding them were taken by a group commit: a new segment starts with them
    /// (see `segment.rs`).
    tail: Vec<u8>,
}

/// Called with the new durable end after every group commit, and with the unchanged one when
/// the log runs out of space (see [`Appender::on_durable`]).
pub type DurableHook = Arc<dyn Fn(LogPos) + Send + Sync>;

struct Shared {
    state: Mutex<State>,
    /// Wakes sync waiters.
    done: Condvar,
    cfg: AppenderConfig,
    on_durable: Mutex<Option<DurableHook>>,
    /// The files the group commits write (only the committing job touches them).
    io: Mutex<Io>,
    /// This log's job on the shared threads ([`crate::workers`]).
    job: OnceLock<JobHandle>,
    /// The newest groups' records, for fetch streams that follow the log (`recent.rs`).
    recent: Mutex<Recent>,
}

struct Io {
    dir: Arc<dyn Dir>,
    file: Arc<dyn File>,
    file_no: u64,
}

impl Shared {
    /// There is work for the committing job.
    fn kick(&self) {
        if let Some(j) = self.job.get() {
            j.now();
        }
    }
}

impl State {
    /// Refuses work once the log failed or ran out of space.
    fn check(&self) -> Result<(), LogError> {
        if let Some(f) = &self.failed {
            return Err(LogError::Failed(f.clone()));
        }
        if let Some(f) = &self.full {
            return Err(LogError::Full(f.clone()));
        }
        Ok(())
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The appending side of one resource's log. Its group commits run on the process's shared
/// threads ([`crate::workers::Workers::global`]).
pub struct Appender {
    shared: Arc<Shared>,
}

impl Appender {
    /// Starts appending into a new logfile `first_file` (which must not exist yet), written by
    /// `host`. Stamps will be above `min_stamp` (the newest stamp recovered from the log).
    pub fn start(
        dir: Arc<dyn Dir>,
        host: HostName,
        first_file: u64,
        min_stamp: u64,
        cfg: AppenderConfig,
    ) -> Result<Self, LogError> {
        if first_file == 0 || first_file > MAX_LOG_NO {
            return Err(LogError::Exhausted(first_file));
        }
        let name = LogName::new(first_file, host.clone());
        let file = dir
            .open_direct(&name.to_string(), OpenMode::CreateNew)
            .map_err(LogError::io(name.to_string(), "create"))?;
        file.preallocate(cfg.max_file_size);
        dir.sync()
            .map_err(LogError::io(name.to_string(), "sync directory"))?;
        let start = LogPos::new(first_file, 0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                host,
                pending: Vec::new(),
                pending_bytes: 0,
                oldest_pending: None,
                appended: start,
                next_seq: 1,
                last_stamp: min_stamp,
                durable: start,
                sync_wanted: start,
                failed: None,
                full: None,
                closing: false,
                tail: Vec::new(),
            }),
            done: Condvar::new(),
            cfg,
            on_durable: Mutex::new(None),
            io: Mutex::new(Io {
                dir,
                file,
                file_no: start.file,
            }),
            job: OnceLock::new(),
            recent: Mutex::new(Recent::default()),
        });
        let weak = Arc::downgrade(&shared) as Weak<dyn Job>;
        let _ = shared.job.set(Workers::global().register(weak));
        Ok(Self { shared })
    }

    /// Appends one record. Returns as soon as it is ordered in the log (not yet durable).
    pub fn append(
        &self,
        kind: Kind,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<Appended, LogError> {
        let mut st = lock(&self.shared.state);
        st.check()?;
        if st.closing {
            return Err(LogError::Closed);
        }
        // `last_stamp` may come from a logfile read back: saturate, never wrap.
        let stamp = (self.shared.cfg.clock)().max(st.last_stamp.saturating_add(1));
        let mut header = Header {
            kind,
            seq: st.next_seq,
            stamp,
            offset,
            len,
        };
        crate::format::check(&header, payload)?;
        let rec_len = header.record_len() as u64;
        // The job is idle while nothing is pending: schedule it on the first pending byte
        // (before `begin_file` below marks the pending set as started).
        let was_idle = st.oldest_pending.is_none();
        let full =
            st.appended.offset > 0 && st.appended.offset + rec_len > self.shared.cfg.max_file_size;
        if full {
            Self::begin_file(&mut st)?;
            header.seq = 1;
        }
        let pos = st.appended;
        let head = encode_header(&header, payload)?;
        let need_new = st.pending.last().is_none_or(|s| s.file != pos.file);
        if need_new {
            let seg = Segment::new(pos.file, pos.offset, &st.tail);
            st.pending.push(seg);
        }
        let seg = st.pending.last_mut().expect("just ensured");
        debug_assert_eq!(seg.end(), pos.offset);
        seg.push(&head);
        seg.push(payload);
        st.appended.offset += rec_len;
        st.pending_bytes += rec_len as usize;
        st.next_seq = header.seq + 1;
        st.last_stamp = stamp;
        if st.oldest_pending.is_none() {
            st.oldest_pending = Some(Instant::now());
        }
        let out = Appended {
            pos,
            end: st.appended,
            seq: header.seq,
            stamp,
        };
        let kick = was_idle || st.pending_bytes >= self.shared.cfg.group_bytes;
        drop(st);
        if kick {
            self.shared.kick();
        }
        Ok(out)
    }

    /// Moves appending to the next logfile number (an empty segment tells the thread to create it).
    fn begin_file(st: &mut State) -> Result<(), LogError> {
        let next = st.appended.file + 1;
        if next > MAX_LOG_NO {
            return Err(LogError::Exhausted(next));
        }
        st.appended = LogPos::new(next, 0);
        st.next_seq = 1;
        st.tail.clear();
        st.pending.push(Segment::new(next, 0, &[]));
        if st.oldest_pending.is_none() {
            st.oldest_pending = Some(Instant::now());
        }
        Ok(())
    }

    /// Like [`Appender::rotate`], but leaves `skip` logfile numbers out: a deliberate hole in
    /// the sequence (emergency mode), which no replica can fetch across, so that replicas stop
    /// consistent at the hole while the primary's writes bypass the log.
    ///
    /// This is also how a log that ran out of space ([`LogError::Full`]) starts again: what it
    /// lost beyond the durable end stays behind the hole.
    pub fn rotate_skipping(&self, skip: u64) -> Result<u64, LogError> {
        let target = {
            let mut st = lock(&self.shared.state);
            if let Some(f) = &st.failed {
                return Err(LogError::Failed(f.clone()));
            }
            if st.full.take().is_some() {
                // The segments lost to the full filesystem were dropped by the commit job;
                // positions go on from the last one handed out, past the hole.
                st.pending.clear();
                st.pending_bytes = 0;
                st.oldest_pending = None;
            }
            st.appended.file = st.appended.file.saturating_add(skip);
            Self::begin_file(&mut st)?;
            st.appended
        };
        self.sync_to(target)?;
        Ok(target.file)
    }

    /// Finishes the current logfile and starts the next one now (even if no record follows), so
    /// that the finished file has its final length. Returns the new logfile's number.
    pub fn rotate(&self) -> Result<u64, LogError> {
        let target = {
            let mut st = lock(&self.shared.state);
            st.check()?;
            Self::begin_file(&mut st)?;
            st.appended
        };
        self.sync_to(target)?;
        Ok(target.file)
    }

    /// Calls `hook` with the new durable end after every group commit (and once with the
    /// unchanged end when the log runs out of space), on the log's own thread (it must not
    /// block): lets an async server follow the log without a thread per follower.
    pub fn on_durable(&self, hook: DurableHook) {
        *self
            .shared
            .on_durable
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Blocks until everything before `upto` is durable.
    pub fn sync_to(&self, upto: LogPos) -> Result<(), LogError> {
        let mut st = lock(&self.shared.state);
        if st.durable >= upto {
            return Ok(());
        }
        if st.sync_wanted < upto {
            st.sync_wanted = upto;
        }
        drop(st);
        self.shared.kick();
        let mut st = lock(&self.shared.state);
        loop {
            if st.durable >= upto {
                return Ok(());
            }
            st.check()?;
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Makes every record appended so far durable (the FLUSH of the block-device contract).
    pub fn sync_all(&self) -> Result<LogPos, LogError> {
        let upto = lock(&self.shared.state).appended;
        self.sync_to(upto)?;
        Ok(upto)
    }

    /// Why the log ran out of space ([`LogError::Full`]), until it restarts after a hole.
    pub fn full(&self) -> Option<String> {
        lock(&self.shared.state).full.clone()
    }

    /// Position after the last appended record.
    pub fn appended(&self) -> LogPos {
        lock(&self.shared.state).appended
    }

    /// Everything before this position is on stable storage.
    pub fn durable(&self) -> LogPos {
        lock(&self.shared.state).durable
    }

    /// Copies durable records of logfile `file` from `off` (a record boundary) out of the
    /// window of the newest group commits into `out` (whole groups, at most `max` bytes, not
    /// beyond `limit`); `false` when the window does not hold them, and then the caller reads
    /// the logfile. Asking keeps the window filled for a while (`recent.rs`): only a log that
    /// is being followed keeps one.
    pub fn read_recent(
        &self,
        file: u64,
        off: u64,
        limit: u64,
        max: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        self.shared
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(Instant::now(), file, off, limit, max, out)
    }

    /// Waits until the durable position passes `seen` or `timeout` elapses; returns it.
    pub fn wait_durable_beyond(&self, seen: LogPos, timeout: Duration) -> Result<LogPos, LogError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(f) = &st.failed {
                return Err(LogError::Failed(f.clone()));
            }
            if st.durable > seen || st.closing {
                return Ok(st.durable);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(st.durable);
            }
            st = self
                .shared
                .done
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The current logfile's name.
    pub fn current_file(&self) -> LogName {
        let st = lock(&self.shared.state);
        LogName::new(st.appended.file, st.host.clone())
    }

    /// Newest stamp handed out.
    pub fn last_stamp(&self) -> u64 {
        lock(&self.shared.state).last_stamp
    }

    /// Syncs everything and stops. Returns the final position.
    pub fn close(mut self) -> Result<LogPos, LogError> {
        let r = self.sync_all();
        self.stop();
        r
    }

    /// No more appends; waits until everything pending is written (or the log failed).
    fn stop(&mut self) {
        let mut st = lock(&self.shared.state);
        st.closing = true;
        self.shared.done.notify_all();
        if st.pending.is_empty() || st.failed.is_some() {
            return;
        }
        drop(st);
        self.shared.kick();
        let mut st = lock(&self.shared.state);
        while !st.pending.is_empty() && st.failed.is_none() {
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Job for Shared {
    /// One group commit: take the pending segments (once the group is due), write them, sync,
    /// publish the durable end.
    fn run(&self) -> Option<Instant> {
        let cfg = &self.cfg;
        let (segments, target, host) = {
            let mut st = lock(&self.state);
            if st.failed.is_some() || st.full.is_some() || st.pending.is_empty() {
                return None;
            }
            let urgent =
                st.sync_wanted > st.durable || st.pending_bytes >= cfg.group_bytes || st.closing;
            let age = st.oldest_pending.map(|t| t.elapsed()).unwrap_or_default();
            if !urgent && age < cfg.group_delay {
                return Some(Instant::now() + (cfg.group_delay - age));
            }
            st.pending_bytes = 0;
            st.oldest_pending = None;
            // The next segment of this logfile continues the last one's partial block.
            if let Some(last) = st.pending.last() {
                let tail = last.tail().to_vec();
                st.tail = tail;
            }
            (
                std::mem::take(&mut st.pending),
                st.appended,
                st.host.clone(),
            )
        };
        let result = {
            let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
            let io = &mut *io;
            write_group(
                &*io.dir,
                &mut io.file,
                &mut io.file_no,
                &host,
                &segments,
                cfg.max_file_size,
            )
        };
        if result.is_ok() {
            self.keep_recent(&segments);
        }
        let mut st = lock(&self.state);
        let ok = result.is_ok();
        match result {
            Ok(()) => {
                st.durable = target;
            }
            Err(e) if e.is_out_of_space() => {
                // Not a failure of the log: MARS's emergency mode. The records of this group
                // (and any appended since) never become durable here; whoever waits for them
                // hears `Full`, and the volume, which still holds them, writes them to its disk.
                tracing::warn!("transaction log out of space: {e}");
                st.full = Some(e.to_string());
                st.pending.clear();
                st.pending_bytes = 0;
                st.oldest_pending = None;
            }
            Err(e) => {
                tracing::error!("transaction log failed: {e}");
                st.failed = Some(e.to_string());
            }
        }
        let more = ok && !st.pending.is_empty();
        let durable = st.durable;
        let full = st.full.is_some();
        drop(st);
        self.done.notify_all();
        // Running out of space is news too: the owner switches to emergency mode.
        if ok || full {
            let hook = self
                .on_durable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(h) = hook {
                h(durable);
            }
        }
        // More arrived meanwhile: look again at once (the next call decides when it is due).
        more.then(Instant::now)
    }
}

impl Shared {
    /// Copies a committed group's records into the window of recent bytes, if a reader wants
    /// them (before the durable end is published, so a reader that sees it finds them).
    fn keep_recent(&self, segments: &[Segment]) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if !r.wanted(Instant::now()) {
            return;
        }
        for seg in segments.iter().filter(|s| !s.is_empty()) {
            let mut data = Vec::new();
            seg.records_into(&mut data);
            r.push(seg.file, seg.start, data);
        }
    }
}

fn write_group(
    dir: &dyn Dir,
    file: &mut Arc<dyn File>,
    file_no: &mut u64,
    host: &HostName,
    segments: &[Segment],
    prealloc: u64,
) -> Result<(), LogError> {
    for seg in segments {
        if seg.file != *file_no {
            // Finish the old file before the new one exists: a durable record in N+1 must imply
            // that N is complete.
            let old = LogName::new(*file_no, host.clone()).to_string();
            file.sync_data().map_err(LogError::io(&old, "fdatasync"))?;
            // The finished logfile keeps only its bytes: its reservation (up to the rotate
            // size) would otherwise stay taken until the file is deleted, and an outage that
            // keeps many rotated logfiles would fill the root with reservations.
            file.release_reserve();
            let name = LogName::new(seg.file, host.clone()).to_string();
            *file = dir
                .open_direct(&name, OpenMode::CreateNew)
                .map_err(LogError::io(&name, "create"))?;
            // Appending into reserved blocks is much cheaper than allocating on every group.
            file.preallocate(prealloc);
            dir.sync().map_err(LogError::io(&name, "sync directory"))?;
            *file_no = seg.file;
        }
        if !seg.is_empty() {
            let name = LogName::new(seg.file, host.clone()).to_string();
            seg.write(&**file).map_err(LogError::io(&name, "write"))?;
        }
    }
    let name = LogName::new(*file_no, host.clone()).to_string();
    file.sync_data().map_err(LogError::io(&name, "fdatasync"))?;
    // The log is read back only by recovery and (later) by fetching secondaries; keeping what
    // was just written in the page cache would push the device's own data out. Whole blocks
    // went past it; this drops the partial blocks written through it (and everything where the
    // filesystem has no O_DIRECT).
    if let Some(seg) = segments.last().filter(|s| s.file == *file_no) {
        let first = segments.iter().find(|s| s.file == *file_no).unwrap_or(seg);
        file.drop_cache(first.offset, seg.end() - first.offset);
    }
    Ok(())
}
