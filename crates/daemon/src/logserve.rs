//! The serving side of log shipping and full sync: what the primary does for its replicas.
//!
//! **Fetch stream.** The replica sends one `FetchFrom{res, file, offset, prev_link}` (refused
//! when `prev_link`, the replica's link of logfile `file - 1`, differs from ours); from then on
//! this side pushes without being asked again: `LogFile` (name of the logfile), `LogData` chunks of whole
//! records, `LogEnd` when a logfile is complete, then the next logfile, and finally it follows the
//! current logfile as it grows. Only *durable* bytes are shipped, so a replica never holds a
//! record that the primary could lose in a crash. Throughput is bounded by TCP flow control, not
//! by round trips. Whenever the replica has everything durable here (and every 100 ms while
//! idle), `LogCaughtUp` with the current end and this host's clock says so: the replica may
//! call itself up to date only on this confirmation, and only as of its stamp.
//!
//! **Sync stream.** `SyncStart` rotates the log (unless the current logfile is empty) and answers
//! `SyncInfo` with the device size, the start of the new logfile and our link of the logfile
//! before it (the replica adopts it: its copy continues our history): replaying from there after
//! the copy makes the replica consistent. Then each `SyncCheck` (a chunk's digest on the replica)
//! is answered with `SyncSame` or with the chunk's bytes, read through the volume (so the newest
//! data, written back or not). A second `SyncStart` on the same connection asks for the current
//! log position: the replica must replay at least to there before it is consistent.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use mars_config::{HostName, ResourceName};
use mars_storage::real::RealDir;
use mars_storage::{Dir, File, OpenMode};
use mars_txlog::{LogName, LogPos};
use mars_volume::Volume;
use mars_wire::Message;
use tokio::io::AsyncWriteExt;

use crate::cluster::{send, BoxRead, BoxWrite, FrameReader};
use crate::state::Daemon;

/// Largest `LogData` chunk (more if a single record is larger).
const CHUNK: usize = 4 << 20;
/// While a replica is caught up, the confirmation is repeated this often: `wait-resource
/// uptodate` needs one younger than its start.
const CONFIRM_EVERY: Duration = Duration::from_millis(100);
/// Largest sync chunk a replica may ask about.
pub const MAX_SYNC_CHUNK: u32 = 4 << 20;

/// One line about a message, without its payload (log data can be megabytes).
pub fn describe(m: &Message) -> String {
    match m {
        Message::LogData { file, offset, data } => {
            format!(
                "LogData{{file {file}, offset {offset}, {} bytes}}",
                data.len()
            )
        }
        Message::SyncData { offset, data } => {
            format!("SyncData{{offset {offset}, {} bytes}}", data.len())
        }
        Message::Changes { upto, entries } => {
            format!("Changes{{upto {upto}, {} entries}}", entries.len())
        }
        other => format!("{other:?}"),
    }
}

fn primary_volume(
    d: &Daemon,
    res: &str,
) -> Result<(Arc<crate::resource::Resource>, Arc<Volume>), String> {
    let name = ResourceName::new(res).map_err(|e| format!("bad resource name: {e}"))?;
    let r = d
        .resource(&name)
        .ok_or_else(|| format!("resource {res} does not exist on {}", d.host))?;
    let v = r
        .volume()
        .ok_or_else(|| format!("{} is not primary of {res} (no open volume)", d.host))?;
    Ok((r, v))
}

fn emergency_refusal(d: &Daemon, res: &str) -> String {
    format!(
        "{} is in emergency mode for {res} (its root is nearly full): replication has stopped; \
         after space is freed there, `marsadm invalidate {res}` on each secondary",
        d.host
    )
}

fn upgrade(v: &std::sync::Weak<Volume>) -> Result<Arc<Volume>> {
    v.upgrade()
        .ok_or_else(|| anyhow!("this host left the primary role"))
}

/// Whether `len` bytes are all of logfile `no`, by the version links published for it (its
/// writer's and those of hosts that replayed it).
fn complete_by_link(d: &Daemon, res: &ResourceName, no: u64, len: u64) -> bool {
    let meta = d.meta(res);
    let Some(links) = meta.versions.get(&no) else {
        return false;
    };
    // One history (all links equal, not merely of equal length: found by mars-sim) of
    // exactly that length.
    let mut all = links.values();
    all.next().is_some_and(|first| {
        mars_engine::version::len_of(first) == Some(len) && all.all(|l| l == first)
    })
}

/// The asker's link of logfile `file - 1` against ours: a different one means its copies
/// continue another history, and serving it (or confirming "you have everything") would speak
/// for a position on a history this host does not hold (found by mars-sim). Either link
/// missing: nothing to compare, the chain checks at the logfile boundaries decide.
fn history_differs(d: &Daemon, res: &ResourceName, file: u64, theirs: &str) -> Option<String> {
    let prev = file.checked_sub(1).filter(|p| *p > 0)?;
    if theirs.is_empty() {
        return None;
    }
    let meta = d.meta(res);
    let ours = meta.version(prev, &d.host)?;
    (ours != theirs).then(|| {
        format!(
            "the asker's logfile {prev} is not this host's ({theirs} here {ours}): different \
             histories (split brain?)"
        )
    })
}

/// This host's version link of logfile `no` as published, or as it will be published (a
/// logfile just completed by rotation): what a full sync starting at `no + 1` continues.
fn own_link(d: &Daemon, r: &crate::resource::Resource, no: u64) -> Option<String> {
    let meta = d.meta(&r.cfg.name);
    if let Some(l) = meta.version(no, &d.host) {
        return Some(l.to_string());
    }
    let dir = RealDir::open(&r.dir).ok()?;
    let name = mars_txlog::list_logs(&dir)
        .ok()?
        .into_iter()
        .find(|n| n.no == no)?;
    let len = std::fs::metadata(r.dir.join(name.to_string())).ok()?.len();
    mars_engine::plan::my_link(&meta, &d.host, no, &name.host, len)
}

/// Where the fetch server's logfiles come from: the primary's log (durable part), or a
/// replica's verified copies. The latter serves the catch-up during a handover: the old
/// primary has left its role and its final logfile is complete here, and the new primary must
/// have every byte of it before it opens its volume.
#[derive(Clone)]
enum LogSource {
    /// Weak: a primary that leaves its role closes the volume, and a fetch session must not
    /// keep it open (the session ends instead; the replica reconnects to the new source).
    Volume(std::sync::Weak<Volume>),
    Replica(Arc<crate::replica::Replica>),
}

impl LogSource {
    fn open(d: &Daemon, res: &str) -> Result<(Arc<crate::resource::Resource>, Self), String> {
        let name = ResourceName::new(res).map_err(|e| format!("bad resource name: {e}"))?;
        let r = d
            .resource(&name)
            .ok_or_else(|| format!("resource {res} does not exist on {}", d.host))?;
        if let Some(v) = r.volume() {
            return Ok((r, LogSource::Volume(Arc::downgrade(&v))));
        }
        match r.replica() {
            Some(rep) => Ok((r, LogSource::Replica(rep))),
            None => Err(format!("{res} is not set up on {}", d.host)),
        }
    }

    /// How much of logfile `no` may be shipped now, and whether that is all of it.
    fn limit(&self, no: u64, f: &dyn File) -> Result<(u64, bool)> {
        Ok(match self {
            LogSource::Volume(v) => {
                let durable = upgrade(v)?.status().durable;
                if durable.file > no {
                    (f.len()?, true)
                } else if durable.file == no {
                    (durable.offset, false)
                } else {
                    (0, false)
                }
            }
            LogSource::Replica(rep) => rep.copy_state(no).unwrap_or((0, false)),
        })
    }

    /// Waits until more may be shipped (or `timeout`).
    async fn wait_beyond(&self, no: u64, seen: u64, timeout: Duration) -> Result<()> {
        match self {
            LogSource::Volume(v) => {
                let v = upgrade(v)?;
                let at = LogPos::new(no, seen).min(v.status().durable);
                tokio::task::spawn_blocking(move || v.wait_durable_beyond(at, timeout)).await??;
            }
            LogSource::Replica(_) => {
                tokio::time::sleep(timeout.min(Duration::from_millis(50))).await
            }
        }
        Ok(())
    }
}

async fn refuse(w: &mut BoxWrite, reason: String) -> Result<()> {
    send(
        w,
        &Message::Refuse {
            reason: reason.clone(),
        },
    )
    .await?;
    w.flush().await?;
    bail!("refused: {reason}")
}

pub async fn serve_fetch(
    d: Arc<Daemon>,
    mut frames: FrameReader<BoxRead>,
    mut w: BoxWrite,
    peer: HostName,
) -> Result<()> {
    let (res, mut file_no, mut off, prev_link) = match frames.next().await? {
        Message::FetchFrom {
            res,
            file,
            offset,
            prev_link,
        } => (res, file, offset, prev_link),
        other => bail!("{peer} opened a fetch stream with {}", describe(&other)),
    };
    let (r, src) = match LogSource::open(&d, &res) {
        Ok(x) => x,
        Err(e) => return refuse(&mut w, e).await,
    };
    if let Some(why) = history_differs(&d, &r.cfg.name, file_no, &prev_link) {
        return refuse(&mut w, why).await;
    }
    if r.volume().is_some_and(|v| v.passthrough()) {
        return refuse(&mut w, emergency_refusal(&d, &res)).await;
    }
    tracing::info!("{res}: {peer} fetches from log {file_no} offset {off}");
    let dir: Arc<dyn Dir> = Arc::new(RealDir::open(&r.dir)?);
    loop {
        let logs = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || mars_txlog::list_logs(&*dir)).await??
        };
        let Some(name) = logs.iter().find(|n| n.no == file_no).cloned() else {
            let oldest = logs.first().map_or(0, |n| n.no);
            let newest = logs.last().map_or(0, |n| n.no);
            if logs.is_empty() && matches!(src, LogSource::Replica(_)) {
                // A replica that has nothing yet (it just left the primary role, or reclaimed
                // everything): nothing to serve, but nothing is lost either.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if file_no + 1 == oldest && complete_by_link(&d, &r.cfg.name, file_no, off) {
                // The replica has all of a logfile deleted here since: its length matches the
                // version link, so it goes on with the next one.
                file_no = oldest;
                off = 0;
                continue;
            }
            if file_no < oldest || logs.is_empty() {
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
            if file_no == newest + 1 && off == 0 {
                // The replica is ahead by an empty logfile that does not exist here yet.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            return refuse(
                &mut w,
                format!(
                    "log {file_no} is beyond this host's newest log {newest}: different histories?"
                ),
            )
            .await;
        };
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
        off = match ship_file(&r, &src, &name, f, off, &mut w).await? {
            Ok(len) => len,
            Err(diverged) => return refuse(&mut w, diverged).await,
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
}

/// Ships logfile `name` from `off` until it is complete; returns its length, or (inner error)
/// why the replica's copy cannot belong to this history.
async fn ship_file(
    r: &crate::resource::Resource,
    src: &LogSource,
    name: &LogName,
    f: Arc<dyn File>,
    mut off: u64,
    w: &mut BoxWrite,
) -> Result<std::result::Result<u64, String>> {
    // The stamp is taken just before the limit is read: at that moment nothing beyond it was
    // durable, which is what a caught-up confirmation may promise.
    let mut stamp = mars_meta::system_time_ns();
    let (mut limit, mut complete) = src.limit(name.no, &*f)?;
    let mut confirmed: Option<(u64, std::time::Instant)> = None;
    let mut ahead: Option<(u64, ReadTask)> = None;
    // Chunk buffers go round (read, sent, read into again): fresh megabytes per chunk cost
    // more than the copy itself where first-touched memory is slow (a VM).
    let mut spare: Vec<Vec<u8>> = Vec::new();
    loop {
        if r.leaving() {
            bail!("this host is leaving the primary role");
        }
        if let LogSource::Replica(rep) = src {
            // The replica whose copies this session serves was replaced: this host took the
            // primary role (its newer logfiles are not in those copies) or was set up again.
            // Its confirmations would say "caught up" at the end of a copy forever.
            if !r.replica().is_some_and(|cur| Arc::ptr_eq(&cur, rep)) {
                bail!("the replica serving this session is gone (this host's role changed)");
            }
        }
        if r.volume().is_some_and(|v| v.passthrough()) {
            return Ok(Err(format!(
                "the primary entered emergency mode for {}: replication has stopped",
                r.cfg.name
            )));
        }
        if off > limit && (complete || limit > 0) {
            return Ok(Err(format!(
                "the replica's copy of {name} has {off} bytes, this host only {limit}: \
                 different histories (split brain?)"
            )));
        }
        if off < limit {
            let (data, n) = match ahead.take() {
                Some((at, task)) if at == off => task.await??,
                _ => read_ahead(&f, off, limit, spare.pop()).await??,
            };
            if n == 0 {
                bail!("{name}: no whole record at offset {off}");
            }
            // Read the next chunk while this one travels: disk and link work at the same time.
            let next = off + n as u64;
            if next < limit {
                ahead = Some((next, read_ahead(&f, next, limit, spare.pop())));
            }
            let msg = Message::LogData {
                file: name.no,
                offset: off,
                data,
            };
            send(w, &msg).await?;
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
        // Caught up: confirm it (again every CONFIRM_EVERY while idle, also a keepalive).
        if confirmed.is_none_or(|(at, t)| at != off || t.elapsed() >= CONFIRM_EVERY) {
            // (stamped with the time the limit was read, not the sending time: writes that
            // finished in between must not count as included)
            send(
                w,
                &Message::LogCaughtUp {
                    file: name.no,
                    offset: off,
                    stamp,
                },
            )
            .await?;
            confirmed = Some((off, std::time::Instant::now()));
        }
        w.flush().await?;
        src.wait_beyond(name.no, off, CONFIRM_EVERY).await?;
        // Read again after the stamp (this also notices a rotation that wrote nothing yet).
        stamp = mars_meta::system_time_ns();
        (limit, complete) = src.limit(name.no, &*f)?;
    }
}

type ReadTask = tokio::task::JoinHandle<Result<(Vec<u8>, usize)>>;

/// Starts reading the chunk at `off` on a blocking thread, into `buf` if one is given.
fn read_ahead(f: &Arc<dyn File>, off: u64, limit: u64, buf: Option<Vec<u8>>) -> ReadTask {
    let f = f.clone();
    let want = ((limit - off) as usize).min(CHUNK);
    tokio::task::spawn_blocking(move || {
        read_records(&*f, off, want, limit, buf.unwrap_or_default())
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

pub async fn serve_sync(
    d: Arc<Daemon>,
    mut frames: FrameReader<BoxRead>,
    mut w: BoxWrite,
    peer: HostName,
) -> Result<()> {
    let res = match frames.next().await? {
        Message::SyncStart { res } => res,
        other => bail!("{peer} opened a sync stream with {}", describe(&other)),
    };
    let (r, vol) = match primary_volume(&d, &res) {
        Ok(x) => x,
        Err(e) => return refuse(&mut w, e).await,
    };
    if vol.passthrough() {
        return refuse(&mut w, emergency_refusal(&d, &res)).await;
    }
    // Held weakly between messages: a primary leaving its role must be able to close it.
    let weak = Arc::downgrade(&vol);
    let start: LogPos = {
        let v = vol.clone();
        tokio::task::spawn_blocking(move || v.rotate_if_used()).await??
    };
    // Keep the logfiles from `start` on until the replica's report pins them.
    d.pin_for(&r.cfg.name, &peer, start.file);
    tracing::info!("{res}: full sync for {peer} starts at log position {start}");
    let prev_link = match start.file.checked_sub(1).filter(|p| *p > 0) {
        Some(prev) => {
            let (d2, r2) = (d.clone(), r.clone());
            tokio::task::spawn_blocking(move || own_link(&d2, &r2, prev))
                .await?
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
    // Chunks are read and hashed on a thread of their own, in request order, while this task
    // keeps receiving requests and sending replies: disk, hashing and network overlap.
    let (jobs, job_rx) = tokio::sync::mpsc::unbounded_channel();
    let (reply_tx, mut replies) = tokio::sync::mpsc::channel(4);
    {
        let weak = weak.clone();
        tokio::task::spawn_blocking(move || sync_worker(weak, job_rx, reply_tx));
    }
    let mut outstanding = 0usize;
    loop {
        tokio::select! {
            msg = frames.next() => {
                let msg = msg?;
                if weak.upgrade().is_some_and(|v| v.passthrough()) {
                    return refuse(&mut w, emergency_refusal(&d, &res)).await;
                }
                let Some(vol) = weak.upgrade().filter(|_| !r.leaving()) else {
                    return refuse(&mut w, format!("{} left the primary role of {res}", d.host))
                        .await;
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
                            return refuse(
                                &mut w,
                                format!(
                                    "sync chunk {offset}+{len} is outside the {}-byte device",
                                    vol.size()
                                ),
                            )
                            .await;
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
                        describe(&other)
                    ),
                };
                outstanding += 1;
                if outstanding > MAX_SYNC_OUTSTANDING {
                    return refuse(
                        &mut w,
                        format!("more than {MAX_SYNC_OUTSTANDING} sync requests unanswered"),
                    )
                    .await;
                }
                if jobs.send(job).is_err() {
                    bail!("the sync worker for {peer} ended");
                }
            }
            reply = replies.recv() => {
                let reply = reply.ok_or_else(|| anyhow!("the sync worker for {peer} ended"))??;
                outstanding -= 1;
                if let Message::Refuse { reason } = reply {
                    return refuse(&mut w, reason).await;
                }
                send(&mut w, &reply).await?;
                // Flush only when nothing else is ready: keeps frames batched.
                if replies.is_empty() && frames.buffered() == 0 {
                    w.flush().await?;
                }
            }
        }
    }
}

/// Most sync requests a replica may have unanswered (it keeps a window of 32 chunks).
const MAX_SYNC_OUTSTANDING: usize = 256;

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

/// Answers sync jobs until either channel closes. One read buffer for the whole session: a
/// fresh megabyte per chunk cost more than reading and hashing it where first touches of new
/// memory are slow (a VM).
fn sync_worker(
    vol: std::sync::Weak<Volume>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<SyncJob>,
    replies: tokio::sync::mpsc::Sender<Result<Message>>,
) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(job) = jobs.blocking_recv() {
        let reply = match upgrade(&vol) {
            Err(e) => Ok(Message::Refuse {
                reason: e.to_string(),
            }),
            Ok(vol) => match job {
                SyncJob::Check {
                    offset,
                    len,
                    digest,
                } => {
                    buf.resize(len as usize, 0);
                    vol.read(offset, &mut buf)
                        .map_err(anyhow::Error::from)
                        .map(|()| {
                            if xxhash_rust::xxh3::xxh3_128(&buf).to_le_bytes() == digest {
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
                // naming the position the replica must replay to, or a crash of this host
                // could take back writes the replica already holds (found by mars-sim).
                SyncJob::End => {
                    vol.flush()
                        .map_err(anyhow::Error::from)
                        .map(|now| Message::SyncInfo {
                            size: vol.size(),
                            file: now.file,
                            offset: now.offset,
                            prev_link: String::new(),
                        })
                }
            },
        };
        if replies.blocking_send(reply).is_err() {
            return;
        }
    }
}
