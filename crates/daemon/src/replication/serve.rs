//! The serving side of log shipping and full sync: what this host does for other hosts'
//! replicas. Every decision (refuse, serve, skip, gone, wait, another history) is
//! `mars_engine::serve`'s; this file moves the bytes.
//!
//! **Fetch stream.** After one `FetchFrom`, this side pushes without being asked again:
//! `LogFile`, `LogData` chunks of whole records, `LogEnd` when a logfile is complete, then the
//! next, and finally it follows the current logfile as it grows. Only *durable* bytes are
//! shipped. Whenever the replica has everything durable here (and every [`CONFIRM_EVERY`]
//! while idle, and at once when the replica asks with a `Ping`), `LogCaughtUp` with the
//! current end and this host's clock says so. Throughput is
//! bounded by TCP flow control, not by round trips: the next chunk is read while one travels.
//! A primary's chunks come from its log's window of the newest group commits where that still
//! holds them (no `pread`, no disk read for a replica that follows closely), else from the
//! logfile.
//!
//! **Sync stream.** `SyncStart` rotates the log (unless the current logfile is empty) and
//! answers `SyncInfo` with the device size, the start of the new logfile and our link of the
//! logfile before it; the resource keeps that logfile until the replica's report pins it.
//! Each `SyncCheck` is answered with `SyncSame` or with the chunk's bytes, read through the
//! volume (the newest data) by a worker thread in request order. A second `SyncStart` asks for
//! the log position after a flush: the replica must replay at least to there.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mars_config::{HostName, ResourceName};
use mars_engine::resource::Event;
use mars_engine::serve::{self as decide, Next, ServerRole};
use mars_engine::ResourceMeta;
use mars_storage::real::RealDir;
use mars_storage::{Dir, File, OpenMode};
use mars_txlog::{LogName, LogPos};
use mars_volume::Volume;
use mars_wire::{Message, RefuseKind};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::Sink;
use crate::local::Shared;
use crate::peer::{
    self, refuse, send, send_packed, BoxRead, BoxWrite, FrameReader, Incoming, Packing,
};

/// Largest `LogData` chunk (more if a single record is larger).
const CHUNK: usize = 4 << 20;
/// While a replica is caught up, the confirmation is repeated this often (also a keepalive).
/// Each one costs both hosts a wakeup per resource: a primary of a thousand resources with two
/// replicas each sends 2,000 per round, so rounds are seconds apart. A confirmation stays valid
/// for `Timing::caught_up_valid` (more than two rounds); whoever needs a fresh one sooner
/// (`wait-resource uptodate`) asks with a `Ping` on the stream and gets it at once.
pub const CONFIRM_EVERY: Duration = Duration::from_secs(3);
/// The next round of idle confirmations. Rounds are aligned for every session of the process:
/// one wakeup of the runtime serves them all, where timers of their own would cost a wakeup
/// each (most of an idle primary's CPU with a thousand resources).
fn next_round() -> tokio::time::Instant {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    let every = CONFIRM_EVERY.as_millis();
    let rounds = epoch.elapsed().as_millis() / every + 1;
    epoch + Duration::from_millis(u64::try_from(rounds * every).unwrap_or(u64::MAX))
}

/// Largest sync chunk a replica may ask about.
pub const MAX_SYNC_CHUNK: u32 = 4 << 20;
/// Most sync requests a replica may have unanswered (it keeps a window of 32 chunks).
const MAX_SYNC_OUTSTANDING: usize = 256;
/// How long a session waits for the replica's next request.
const REQUEST_WAIT: Duration = Duration::from_secs(120);
/// Most full syncs this host serves at once (all resources, all peers); more are refused with
/// [`RefuseKind::Limit`] and their replicas try again later. Each holds a connection, a window
/// of chunk buffers and, while it reads, a blocking thread.
pub const MAX_SERVED_SYNCS: usize = 256;
static SERVED_SYNCS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_SERVED_SYNCS);

/// What the servers see of a resource's state (published by its actor after every event).
#[derive(Debug, Clone)]
pub struct ServeView {
    pub role: ServerRole,
    pub meta: Arc<ResourceMeta>,
    /// The replica's copies: number, durable length, complete.
    pub copies: Vec<(u64, u64, bool)>,
    /// Changes whenever the replica is replaced (a role change, a reopen).
    pub replica_gen: u64,
}

impl ServeView {
    pub fn empty(res: ResourceName) -> ServeView {
        ServeView {
            role: ServerRole::None,
            meta: Arc::new(ResourceMeta::empty(res)),
            copies: Vec::new(),
            replica_gen: 0,
        }
    }

    fn copy_state(&self, no: u64) -> Option<(u64, bool)> {
        let newest = self.copies.last()?.0;
        self.copies
            .iter()
            .find(|c| c.0 == no)
            .map(|c| (c.1, c.2 || no < newest))
    }
}

/// A resource as the servers reach it.
#[derive(Clone)]
pub struct Served {
    pub shared: Arc<Shared>,
    pub dir: PathBuf,
    pub view: watch::Receiver<Arc<ServeView>>,
    pub events: Sink,
}

/// Finds a resource by name (the registry, wired by the composition root).
pub trait Lookup: Send + Sync {
    fn served(&self, res: &str) -> Option<Served>;
}

async fn refused(w: &mut BoxWrite, kind: RefuseKind, reason: String) -> Result<()> {
    refuse(w, kind, reason.clone()).await?;
    bail!("refused: {reason}")
}

// ---------------------------------------------------------------- fetch

/// Where a fetch session's logfiles come from: the primary's log (durable part), or a
/// replica's verified copies (the catch-up during a handover: the old primary has left and
/// its final logfile is complete here; the new primary must have every byte of it).
enum Source {
    Volume(Weak<Volume>),
    Replica(u64),
}

pub async fn serve_fetch(lookup: Arc<dyn Lookup>, me: HostName, conn: Incoming) -> Result<()> {
    let Incoming {
        peer,
        mut w,
        mut frames,
        method,
        traffic,
        ..
    } = conn;
    let peer = peer.host;
    let (res, mut file_no, mut off, prev_link, tail) =
        match frames.next_within(REQUEST_WAIT).await? {
            Message::FetchFrom {
                res,
                file,
                offset,
                prev_link,
                tail,
            } => (res, file, offset, prev_link, tail),
            other => bail!(
                "{peer} opened a fetch stream with {}",
                peer::describe(&other)
            ),
        };
    let Some(served) = lookup.served(&res) else {
        return refused(
            &mut w,
            RefuseKind::NotHere,
            format!("resource {res} does not exist on {me}"),
        )
        .await;
    };
    let view = served.view.borrow().clone();
    if let Err((kind, why)) =
        decide::fetch_start(view.role, &view.meta, &me, &peer, file_no, &prev_link)
    {
        return refused(&mut w, kind, why).await;
    }
    let src = match view.role {
        ServerRole::Primary { .. } => match served.shared.volume() {
            Some(v) => Source::Volume(Arc::downgrade(&v)),
            None => {
                return refused(
                    &mut w,
                    RefuseKind::NotHere,
                    format!("{res} is not open on {me}"),
                )
                .await
            }
        },
        _ => Source::Replica(view.replica_gen),
    };
    tracing::info!("{res}: {peer} fetches from log {file_no} offset {off}");
    let dir: Arc<dyn Dir> = Arc::new(RealDir::open(&served.dir)?);
    let mut last_keepalive = Instant::now();
    let mut ctx = Ship {
        durable_rx: served.shared.durable.subscribe(),
        view_rx: served.view.clone(),
        served,
        src,
        me,
        frames,
        tail: (off > 0 && tail != [0; 16]).then_some((file_no, off, tail)),
        packing: Packing::new(method, traffic),
    };
    loop {
        let logs = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || mars_txlog::list_logs(&*dir)).await??
        };
        let view = ctx.served.view.borrow().clone();
        match decide::next_file(&logs, file_no, off, view.role, &view.meta, &ctx.me, false) {
            Next::Serve(name) => {
                send(
                    &mut w,
                    &Message::LogFile {
                        file: file_no,
                        origin: name.host.to_string(),
                    },
                )
                .await?;
                let f = dir
                    .open(&name.to_string(), OpenMode::Existing)
                    .with_context(|| format!("open {name}"))?;
                off = match ctx.ship_file(&name, f, off, &mut w).await? {
                    Ok(len) => len,
                    Err((kind, why)) => return refused(&mut w, kind, why).await,
                };
                send(
                    &mut w,
                    &Message::LogEnd {
                        file: file_no,
                        len: off,
                    },
                )
                .await?;
                file_no += 1;
                off = 0;
            }
            Next::Skip { to } => {
                file_no = to;
                off = 0;
            }
            Next::Wait => {
                // Nothing to send yet: a keepalive now and then, so that the replica can tell
                // a waiting source from a dead one.
                if last_keepalive.elapsed() >= CONFIRM_EVERY {
                    send(&mut w, &Message::Ping { stamp: 0 }).await?;
                    last_keepalive = Instant::now();
                }
                w.flush().await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                ctx.check()?;
            }
            Next::Gone { oldest } => {
                send(
                    &mut w,
                    &Message::LogGone {
                        file: file_no,
                        oldest,
                    },
                )
                .await?;
                w.flush().await?;
                return Ok(());
            }
            Next::Refuse((kind, why)) => return refused(&mut w, kind, why).await,
        }
    }
}

struct Ship {
    served: Served,
    src: Source,
    me: HostName,
    /// Followed for the whole session, so that no change between reading the limit and
    /// waiting is missed.
    durable_rx: watch::Receiver<LogPos>,
    view_rx: watch::Receiver<Arc<ServeView>>,
    /// The replica's side of the stream: a `Ping` asks for a fresh confirmation; its end ends
    /// the session.
    frames: FrameReader<BoxRead>,
    /// Log data goes out packed where the session agreed on a compression method and it pays.
    packing: Packing,
    /// The asker's digest of its copy before its start (file, offset, digest), checked against
    /// ours once that much is durable here (see `mars_engine::serve::tail_differs`).
    tail: Option<(u64, u64, [u8; 16])>,
}

type Refusal = (RefuseKind, String);

impl Ship {
    /// The session must end: this host left the role it served in.
    fn check(&self) -> Result<()> {
        if self
            .served
            .shared
            .leaving
            .load(std::sync::atomic::Ordering::Acquire)
        {
            bail!("this host is leaving the primary role");
        }
        match &self.src {
            Source::Volume(v) => {
                if v.upgrade().is_none() {
                    bail!("this host left the primary role");
                }
            }
            Source::Replica(gen) => {
                // The replica whose copies this session serves was replaced: this host took
                // the primary role (its newer logfiles are not in those copies) or was set up
                // again. Its confirmations would say "caught up" at the end of a copy forever.
                let v = self.served.view.borrow();
                if v.replica_gen != *gen || v.role != ServerRole::Replica {
                    bail!("the replica serving this session is gone (this host's role changed)");
                }
            }
        }
        Ok(())
    }

    /// The primary's volume, whose log keeps its newest group commits in memory.
    fn volume(&self) -> Option<Arc<Volume>> {
        match &self.src {
            Source::Volume(v) => v.upgrade(),
            Source::Replica(_) => None,
        }
    }

    /// How much of logfile `no` may be shipped now, and whether that is all of it.
    fn limit(&mut self, no: u64, f: &dyn File) -> Result<(u64, bool)> {
        Ok(match &self.src {
            Source::Volume(_) => {
                let durable = *self.durable_rx.borrow_and_update();
                if durable.file > no {
                    (f.len()?, true)
                } else if durable.file == no {
                    (durable.offset, false)
                } else {
                    (0, false)
                }
            }
            Source::Replica(_) => self
                .view_rx
                .borrow_and_update()
                .copy_state(no)
                .unwrap_or((0, false)),
        })
    }

    /// Waits until more may be shipped, `until`, or the replica asked for a fresh confirmation
    /// (then `true`).
    async fn wait_beyond(&mut self, until: tokio::time::Instant) -> Result<bool> {
        let Ship {
            src,
            durable_rx,
            view_rx,
            frames,
            ..
        } = self;
        let more = async {
            match src {
                Source::Volume(_) => {
                    let _ = tokio::time::timeout_at(until, durable_rx.changed()).await;
                }
                Source::Replica(_) => {
                    let _ = tokio::time::timeout_at(until, view_rx.changed()).await;
                }
            }
        };
        tokio::select! {
            () = more => Ok(false),
            // Cancel-safe: a frame half read stays in the reader's buffer.
            m = frames.next() => match m? {
                Message::Ping { .. } => Ok(true),
                other => bail!("unexpected {} on a fetch stream", peer::describe(&other)),
            },
        }
    }

    /// Ships logfile `name` from `off` until it is complete; returns its length, or (inner
    /// error) why the replica's copy cannot belong to this history.
    async fn ship_file(
        &mut self,
        name: &LogName,
        f: Arc<dyn File>,
        mut off: u64,
        w: &mut BoxWrite,
    ) -> Result<std::result::Result<u64, Refusal>> {
        // The stamp is taken just before the limit is read: at that moment nothing beyond it
        // was durable, which is what a caught-up confirmation may promise.
        let mut stamp = mars_meta::system_time_ns();
        let (mut limit, mut complete) = self.limit(name.no, &*f)?;
        let mut confirmed: Option<(u64, Instant)> = None;
        let mut asked = false;
        let mut ahead: Option<(u64, ReadTask)> = None;
        // Chunk buffers go round (read, sent, read into again): fresh megabytes per chunk cost
        // more than the copy itself where first-touched memory is slow (a VM).
        let mut spare: Vec<Vec<u8>> = Vec::new();
        loop {
            self.check()?;
            let role = self.served.view.borrow().role;
            if let ServerRole::Primary { passthrough: true } = role {
                return Ok(Err((
                    RefuseKind::Emergency,
                    format!(
                        "the primary entered emergency mode for {}: replication has stopped",
                        self.served.shared.name
                    ),
                )));
            }
            if let Some(why) = decide::asker_ahead(name, off, limit, complete) {
                return Ok(Err((RefuseKind::History, why)));
            }
            if let Some((no, at, theirs)) = self.tail {
                if no != name.no || off != at {
                    self.tail = None;
                } else if off <= limit {
                    self.tail = None;
                    let file = f.clone();
                    let ours = tokio::task::spawn_blocking(move || super::tail_digest(&*file, at))
                        .await??;
                    if ours != theirs {
                        return Ok(Err(decide::tail_differs(name, off)));
                    }
                }
            }
            if off < limit {
                let vol = self.volume();
                let (data, n) = match ahead.take() {
                    Some((at, task)) if at == off => task.await??,
                    _ => read_ahead(&f, vol.clone(), name.no, off, limit, spare.pop()).await??,
                };
                if n == 0 {
                    bail!("{name}: no whole record at offset {off}");
                }
                // Read the next chunk while this one travels: disk and link work at once.
                let next = off + n as u64;
                if next < limit {
                    ahead = Some((next, read_ahead(&f, vol, name.no, next, limit, spare.pop())));
                }
                let msg = Message::LogData {
                    file: name.no,
                    offset: off,
                    data,
                };
                let msg = send_packed(w, &mut self.packing, msg).await?;
                if let Message::LogData { data, .. } = msg {
                    spare.push(data);
                }
                off += n as u64;
                continue;
            }
            if complete {
                w.flush().await?;
                return Ok(Ok(off));
            }
            // Caught up: confirm it (again every CONFIRM_EVERY while idle, also a keepalive,
            // and at once when asked), stamped with the time the limit was read, not the
            // sending time: writes that finished in between must not count as included.
            if asked
                || confirmed.is_none_or(|(at, t)| at != off || t.elapsed() >= CONFIRM_EVERY / 2)
            {
                send(
                    w,
                    &Message::LogCaughtUp {
                        file: name.no,
                        offset: off,
                        stamp,
                    },
                )
                .await?;
                confirmed = Some((off, Instant::now()));
            }
            w.flush().await?;
            asked = self.wait_beyond(next_round()).await?;
            // Read again after the stamp (this also notices a rotation that wrote nothing yet).
            stamp = mars_meta::system_time_ns();
            (limit, complete) = self.limit(name.no, &*f)?;
        }
    }
}

type ReadTask = tokio::task::JoinHandle<Result<(Vec<u8>, usize)>>;

/// Starts reading the chunk at `off` of logfile `no` on a blocking thread, into `buf` if one is
/// given: from the log's window of its newest group commits where `vol` (the primary's
/// volume) still holds them, else from the file.
fn read_ahead(
    f: &Arc<dyn File>,
    vol: Option<Arc<Volume>>,
    no: u64,
    off: u64,
    limit: u64,
    buf: Option<Vec<u8>>,
) -> ReadTask {
    let f = f.clone();
    let want = ((limit - off) as usize).min(CHUNK);
    tokio::task::spawn_blocking(move || {
        let mut buf = buf.unwrap_or_default();
        if let Some(v) = vol {
            if v.read_recent_log(no, off, limit, want, &mut buf) {
                // The window holds whole groups of records as they were written and synced;
                // the headers are checked as for bytes read from the file.
                let s = mars_txlog::format::scan(&buf, None, false).map_err(|(_, e)| anyhow!(e))?;
                if s.len != buf.len() {
                    bail!("log {no}: the window's bytes at {off} end inside a record");
                }
                let n = buf.len();
                return Ok((buf, n));
            }
        }
        read_records(&*f, off, want, limit, buf)
    })
}

/// Reads whole records starting at `off` into `buf`: about `want` bytes, more if one record is
/// larger, never beyond `limit`.
fn read_records(
    f: &dyn File,
    off: u64,
    want: usize,
    limit: u64,
    mut buf: Vec<u8>,
) -> Result<(Vec<u8>, usize)> {
    buf.resize(want, 0);
    f.read_exact_at(&mut buf, off)?;
    let s = mars_txlog::format::scan(&buf, None, false).map_err(|(_, e)| anyhow!(e))?;
    if s.len > 0 {
        buf.truncate(s.len);
        return Ok((buf, s.len));
    }
    // One record larger than `want`: read exactly that record.
    if buf.len() < mars_txlog::format::HEADER_LEN {
        bail!("short record header at {off}");
    }
    let h = mars_txlog::format::decode(&buf[..mars_txlog::format::HEADER_LEN]);
    let need = match h {
        Err(mars_txlog::DecodeError::Incomplete { needed, .. }) => needed,
        Ok(h) => h.record_len(),
        Err(e) => bail!("record at {off}: {e}"),
    };
    if off + need as u64 > limit {
        bail!("record at {off} extends beyond the durable end {limit}");
    }
    buf.resize(need, 0);
    f.read_exact_at(&mut buf, off)?;
    Ok((buf, need))
}

// ---------------------------------------------------------------- sync

pub async fn serve_sync(lookup: Arc<dyn Lookup>, me: HostName, conn: Incoming) -> Result<()> {
    let Incoming {
        peer,
        mut w,
        mut frames,
        method,
        traffic,
        ..
    } = conn;
    let mut packing = Packing::new(method, traffic);
    let peer = peer.host;
    let res = match frames.next_within(REQUEST_WAIT).await? {
        Message::SyncStart { res } => res,
        other => bail!(
            "{peer} opened a sync stream with {}",
            peer::describe(&other)
        ),
    };
    let Ok(_place) = SERVED_SYNCS.try_acquire() else {
        let why = format!("{me} already serves {MAX_SERVED_SYNCS} full syncs; try again later");
        return refused(&mut w, RefuseKind::Limit, why).await;
    };
    let Some(served) = lookup.served(&res) else {
        return refused(
            &mut w,
            RefuseKind::NotHere,
            format!("resource {res} does not exist on {me}"),
        )
        .await;
    };
    let view = served.view.borrow().clone();
    if let Err((kind, why)) = decide::sync_start(view.role, &view.meta, &me, &peer) {
        return refused(&mut w, kind, why).await;
    }
    let Some(vol) = served.shared.volume() else {
        return refused(
            &mut w,
            RefuseKind::NotHere,
            format!("{me} is not primary of {res} (no open volume)"),
        )
        .await;
    };
    // Held weakly between messages: a primary leaving its role must be able to close it.
    let weak = Arc::downgrade(&vol);
    let start: LogPos = {
        let v = vol.clone();
        tokio::task::spawn_blocking(move || v.rotate_if_used()).await??
    };
    // Keep the logfiles from `start` on until the replica's report pins them.
    let _ = served
        .events
        .send(Event::ServingSync {
            peer: peer.clone(),
            start_file: start.file,
        })
        .await;
    tracing::info!("{res}: full sync for {peer} starts at log position {start}");
    let prev_link = match start.file.checked_sub(1).filter(|p| *p > 0) {
        Some(prev) => {
            let dir = served.dir.clone();
            let local = tokio::task::spawn_blocking(move || {
                crate::local::volume::logs_in(&dir)
                    .into_iter()
                    .find(|l| l.no == prev)
            })
            .await?;
            let meta = served.view.borrow().meta.clone();
            decide::own_link(&meta, &me, prev, local.as_ref().map(|l| (&l.origin, l.len)))
                .unwrap_or_default()
        }
        None => String::new(),
    };
    send(
        &mut w,
        &Message::SyncInfo {
            size: vol.size(),
            file: start.file,
            offset: start.offset,
            prev_link,
        },
    )
    .await?;
    w.flush().await?;
    drop(vol);
    // Chunks are read and hashed by a task of their own, in request order, while this task
    // keeps receiving requests and sending replies: disk, hashing and network overlap. It
    // takes a blocking thread only while it reads and hashes a chunk, so idle or slow sessions
    // hold none.
    let (jobs, job_rx) = tokio::sync::mpsc::channel(MAX_SYNC_OUTSTANDING);
    let (reply_tx, mut replies) = tokio::sync::mpsc::channel(4);
    tokio::spawn(sync_worker(weak.clone(), job_rx, reply_tx));
    let mut outstanding = 0usize;
    loop {
        tokio::select! {
            msg = frames.next_within(REQUEST_WAIT) => {
                let msg = msg?;
                let role = served.view.borrow().role;
                if let ServerRole::Primary { passthrough: true } = role {
                    let why = format!(
                        "{me} is in emergency mode for {res}: replication has stopped"
                    );
                    return refused(&mut w, RefuseKind::Emergency, why).await;
                }
                let leaving = served.shared.leaving.load(std::sync::atomic::Ordering::Acquire);
                let Some(vol) = weak.upgrade().filter(|_| !leaving) else {
                    let why = format!("{me} left the primary role of {res}");
                    return refused(&mut w, RefuseKind::Left, why).await;
                };
                let job = match msg {
                    Message::SyncCheck {
                        offset,
                        len,
                        digest,
                    } => {
                        if len > MAX_SYNC_CHUNK
                            || offset
                                .checked_add(u64::from(len))
                                .is_none_or(|e| e > vol.size())
                        {
                            let why = format!(
                                "sync chunk {offset}+{len} is outside the {}-byte device",
                                vol.size()
                            );
                            return refused(&mut w, RefuseKind::Limit, why).await;
                        }
                        SyncJob::Check {
                            offset,
                            len,
                            digest,
                        }
                    }
                    Message::SyncStart { .. } => SyncJob::End,
                    other => bail!(
                        "unexpected message on the sync stream from {peer}: {}",
                        peer::describe(&other)
                    ),
                };
                outstanding += 1;
                if outstanding > MAX_SYNC_OUTSTANDING {
                    let why = format!("more than {MAX_SYNC_OUTSTANDING} sync requests unanswered");
                    return refused(&mut w, RefuseKind::Limit, why).await;
                }
                if jobs.send(job).await.is_err() {
                    bail!("the sync worker for {peer} ended");
                }
            }
            reply = replies.recv() => {
                let reply = reply.ok_or_else(|| anyhow!("the sync worker for {peer} ended"))??;
                outstanding -= 1;
                if let Message::Refuse { kind, reason } = reply {
                    return refused(&mut w, kind, reason).await;
                }
                send_packed(&mut w, &mut packing, reply).await?;
                // Flush only when nothing else is ready: keeps frames batched.
                if replies.is_empty() && frames.buffered() == 0 {
                    w.flush().await?;
                }
            }
        }
    }
}

/// What the sync worker does for one request, in the order the requests came.
enum SyncJob {
    /// Compare the chunk with the replica's digest: `SyncSame`, or `SyncData` with our bytes.
    Check {
        offset: u64,
        len: u32,
        digest: [u8; 16],
    },
    /// The copy is complete: name the log position the replica must replay to (`SyncInfo`).
    End,
}

/// Answers sync jobs until either channel closes. One read buffer for the whole session.
async fn sync_worker(
    vol: Weak<Volume>,
    mut jobs: tokio::sync::mpsc::Receiver<SyncJob>,
    replies: tokio::sync::mpsc::Sender<Result<Message>>,
) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(job) = jobs.recv().await {
        let vol = vol.clone();
        let mut b = std::mem::take(&mut buf);
        let reply = match tokio::task::spawn_blocking(move || {
            let r = answer(&vol, job, &mut b);
            (r, b)
        })
        .await
        {
            Ok((r, b)) => {
                buf = b;
                r
            }
            Err(e) => Err(anyhow!("sync read: {e}")),
        };
        if replies.send(reply).await.is_err() {
            return;
        }
    }
}

/// One sync job on a blocking thread; `buf` is the session's read buffer.
fn answer(vol: &Weak<Volume>, job: SyncJob, buf: &mut Vec<u8>) -> Result<Message> {
    match vol.upgrade() {
        None => Ok(Message::Refuse {
            kind: RefuseKind::Left,
            reason: "this host left the primary role".into(),
        }),
        Some(vol) => match job {
            SyncJob::Check {
                offset,
                len,
                digest,
            } => {
                buf.resize(len as usize, 0);
                vol.read(offset, buf)
                    .map_err(anyhow::Error::from)
                    .map(|()| {
                        if mars_replica::sync::digest(buf) == digest {
                            Message::SyncSame { offset }
                        } else {
                            Message::SyncData {
                                offset,
                                data: buf.clone(),
                            }
                        }
                    })
            }
            // The copy read the newest data, durable or not: make it all durable before
            // naming the position the replica must replay to, or a crash of this host could
            // take back writes the replica already holds (found by mars-sim).
            SyncJob::End => vol
                .flush()
                .map_err(anyhow::Error::from)
                .map(|now| Message::SyncInfo {
                    size: vol.size(),
                    file: now.file,
                    offset: now.offset,
                    prev_link: String::new(),
                }),
        },
    }
}
