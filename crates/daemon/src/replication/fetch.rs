//! A fetch session: streams the source's logfiles into the local copies.
//!
//! The replica asks once (`FetchFrom` with its position and its version link of the logfile
//! before); the source then pushes `LogFile`, `LogData` (whole records), `LogEnd`, the next
//! logfile, and follows the current one as it grows, confirming with `LogCaughtUp` whenever
//! this replica has everything durable there. A `Ping` from this side asks for a fresh
//! confirmation at once ([`FetchJob::ask`]). Each chunk is verified on arrival (checksums,
//! contiguous sequence numbers, offset = end of the copy) and counts as fetched only after its
//! `fdatasync` here; syncs run in the background while receiving goes on.
//!
//! A pipeline of bounded depth: while one chunk is verified and written on a blocking thread
//! (into the copy past the page cache, and into the window replay takes it from:
//! `mars_replica::recent`), the next one is received; at most one write and one sync are
//! under way at a time. Large chunks are received straight into aligned buffers from a pool
//! (`peer::FrameReader::next_fetch`): the copy is written O_DIRECT from that buffer, which then
//! is the window's, and the frame's checksum is checked against the records' own from the same
//! pass over the data (`CopyAppender::append_received`).
//!
//! Which logfile may be appended to or created is the engine's decision: the session reports
//! `FetchEvent::Offer` and waits for the `CopyDecision` the actor forwards.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use mars_config::{HostName, ResourceName};
use mars_engine::resource::{CopyDecision, Event, FetchEvent, SessionId};
use mars_replica::{CopyAppender, CopySync};
use mars_txlog::LogPos;
use mars_wire::{ClusterId, Message, StreamKind};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{Rates, Sink, Stop};
use crate::local::ReplicaDir;
use crate::peer::{self, Fetched};

/// Received data is made durable at least every this many bytes (replay follows what is
/// durable, from memory while it is in `mars_replica::recent::RECENT_CAP`) …
const SYNC_BYTES: u64 = 32 << 20;
/// … or when the stream pauses this long.
const SYNC_IDLE: Duration = Duration::from_millis(10);
/// A source silent for this long is gone (it confirms every few seconds while idle:
/// `serve::CONFIRM_EVERY`).
const SILENCE: Duration = Duration::from_secs(15);
/// How long the session waits for the engine's decision about a logfile.
const DECISION_WAIT: Duration = Duration::from_secs(30);

/// What one fetch session needs.
pub struct FetchJob {
    pub id: SessionId,
    pub res: ResourceName,
    pub me: HostName,
    pub cluster: ClusterId,
    /// `None` only with `--insecure`.
    pub tls: Option<Arc<mars_tls::PeerTls>>,
    pub source: HostName,
    pub addr: String,
    pub from: LogPos,
    pub prev_link: String,
    pub replica: Arc<ReplicaDir>,
    pub rates: Arc<Rates>,
    pub sink: Sink,
    pub stop: Stop,
    pub decisions: mpsc::Receiver<(u64, CopyDecision)>,
    /// Someone wants a fresh confirmation: a `Ping` on the stream asks the source for one.
    pub ask: Arc<tokio::sync::Notify>,
}

/// Runs the session until it ends or is stopped; its end is reported as
/// `FetchEvent::Ended`.
pub async fn run(mut job: FetchJob) {
    let id = job.id;
    let sink = job.sink.clone();
    let stop = job.stop.clone();
    // Replay takes what this session writes from memory (`mars_replica::recent`), only while
    // it runs: afterwards replay reads the copy.
    let recent = job.replica.copies().recent().clone();
    recent.open();
    let r = tokio::select! {
        r = session(&mut job) => r,
        _ = stop.wait() => Ok(()),
    };
    recent.close();
    // Whatever is durable but not yet accounted stays uncounted: the next session truncates
    // the copy to what the engine knows and fetches it again.
    let error = r.err().map(|e| format!("{e:#}"));
    if error.is_some() {
        crate::traffic::count(crate::traffic::PeerError::SessionFailed);
    }
    let _ = sink
        .send(Event::Fetch(id, FetchEvent::Ended { error }))
        .await;
}

/// The copy being received, and its durability.
struct Current {
    no: u64,
    /// `None` only while it is on a blocking thread.
    w: Option<CopyAppender>,
    /// The chunk being written on a blocking thread: the appender comes back with the result
    /// and the chunk's length.
    writing: Option<tokio::task::JoinHandle<Written>>,
    /// Appended but not yet synced.
    unsynced: u64,
    /// A background fdatasync and the length it makes durable.
    inflight: Option<(u64, tokio::task::JoinHandle<mars_replica::Result<u64>>)>,
    /// Durable and reported.
    reported: u64,
}

async fn emit(job: &FetchJob, e: FetchEvent) -> Result<()> {
    job.sink
        .send(Event::Fetch(job.id, e))
        .await
        .map_err(|_| anyhow!("the resource's actor is gone"))
}

async fn session(job: &mut FetchJob) -> Result<()> {
    // What an earlier session made durable after the engine stopped listening to it (a pause
    // during a stream) is not counted: cut the copies back to where this session starts, as
    // the engine knows them, so that the data the source sends fits on.
    let (replica, from) = (job.replica.clone(), job.from);
    let tail = tokio::task::spawn_blocking(move || -> Result<[u8; 16]> {
        let mut c = replica.copies();
        if c.end().is_some_and(|end| end > from) {
            let removed = c.truncate(from)?;
            tracing::debug!("copies cut back to {from} (removed {removed:?}): not counted");
        }
        // What we hold of the logfile we continue: the source checks it is its own.
        match c.name(from.file) {
            Some(name) if from.offset > 0 => {
                let f = c
                    .dir()
                    .open(&name.to_string(), mars_storage::OpenMode::Existing)?;
                // A copy shorter than the engine's position (it should not be): ask without
                // the check rather than never; the source's other history checks still hold.
                Ok(super::tail_digest(&*f, from.offset).unwrap_or_else(|e| {
                    tracing::warn!("{name}: no digest of the bytes before {from}: {e}");
                    [0; 16]
                }))
            }
            _ => Ok([0; 16]),
        }
    })
    .await??;
    let mut s = peer::connect(
        &job.addr,
        &job.me,
        job.cluster,
        StreamKind::Fetch,
        job.tls.as_deref(),
    )
    .await?;
    if s.peer.host != job.source {
        bail!(
            "{} answers as {}, expected {}",
            job.addr,
            s.peer.host,
            job.source
        );
    }
    peer::send(
        &mut s.w,
        &Message::FetchFrom {
            res: job.res.to_string(),
            file: job.from.file,
            offset: job.from.offset,
            prev_link: job.prev_link.clone(),
            tail,
        },
    )
    .await?;
    s.w.flush().await?;
    let mut cur: Option<Current> = None;
    let mut connected = false;
    let ask = job.ask.clone();
    loop {
        let busy = cur
            .as_ref()
            .is_some_and(|c| c.unsynced > 0 || c.inflight.is_some() || c.writing.is_some());
        let msg = tokio::select! {
            m = s.frames.next_fetch_within(SILENCE) => m?,
            _ = tokio::time::sleep(SYNC_IDLE), if busy => {
                make_durable(job, &mut cur).await?;
                continue;
            }
            () = ask.notified() => {
                peer::send(&mut s.w, &Message::Ping { stamp: 0 }).await?;
                s.w.flush().await?;
                continue;
            }
        };
        if !connected {
            connected = true;
            emit(job, FetchEvent::Connected).await?;
        }
        let msg = match msg {
            Fetched::Message(m) => m,
            Fetched::Chunk { file, chunk } => {
                let c = current_for(&mut cur, file)?;
                settle(job, c).await?;
                let n = chunk.len as u64;
                // Verified (records, and the frame's checksum from the same pass) and written
                // from its own buffer on a blocking thread while the next chunk is received.
                let mut w = c.w.take().ok_or_else(|| anyhow!("no appender"))?;
                c.writing = Some(tokio::task::spawn_blocking(move || {
                    let r = w.append_received(chunk);
                    (w, r, n)
                }));
                continue;
            }
        };
        match msg {
            Message::LogFile { file, origin } => {
                make_durable(job, &mut cur).await?;
                let origin = HostName::new(&origin).map_err(|e| anyhow!("bad origin: {e}"))?;
                emit(
                    job,
                    FetchEvent::Offer {
                        no: file,
                        origin: origin.clone(),
                    },
                )
                .await?;
                let decision = wait_decision(job, file).await?;
                let replica = job.replica.clone();
                let w = tokio::task::spawn_blocking(move || -> Result<Option<CopyAppender>> {
                    let mut c = replica.copies();
                    match decision {
                        CopyDecision::Reject => Ok(None),
                        CopyDecision::ReplaceEmpty { .. } => {
                            c.remove_empty(file)?;
                            Ok(Some(c.append(file, &origin)?))
                        }
                        CopyDecision::Append | CopyDecision::Create => {
                            Ok(Some(c.append(file, &origin)?))
                        }
                    }
                })
                .await??;
                let Some(w) = w else {
                    return Ok(());
                };
                let reported = w.end();
                cur = Some(Current {
                    no: file,
                    w: Some(w),
                    writing: None,
                    unsynced: 0,
                    inflight: None,
                    reported,
                });
            }
            Message::LogData { file, offset, data } => {
                let c = current_for(&mut cur, file)?;
                // The previous chunk's write is done first (order, and one at a time).
                settle(job, c).await?;
                let n = data.len() as u64;
                // Verified on arrival (checksums, sequence numbers, offset); written on a
                // blocking thread, the appender going there and back, while the next chunk
                // is received.
                let mut w = c.w.take().ok_or_else(|| anyhow!("no appender"))?;
                c.writing = Some(tokio::task::spawn_blocking(move || {
                    let r = w.append_shared(offset, data.into());
                    (w, r, n)
                }));
            }
            Message::LogEnd { file, len } => {
                make_durable(job, &mut cur).await?;
                if cur.as_ref().map(|c| c.no) == Some(file) {
                    cur = None;
                }
                emit(job, FetchEvent::End { no: file, len }).await?;
            }
            Message::LogCaughtUp {
                file,
                offset,
                stamp,
            } => {
                // "You have everything durable here, as of `stamp`" — the source's wall
                // clock, made ours: with the source's clock behind, its word would look stale
                // at once (never caught up); ahead, fresh for too long.
                make_durable(job, &mut cur).await?;
                let stamp = crate::meta::cluster::to_local_wall(&job.source, stamp);
                emit(
                    job,
                    FetchEvent::CaughtUp {
                        pos: LogPos::new(file, offset),
                        stamp,
                    },
                )
                .await?;
            }
            // The source waits for a logfile to begin: it is alive.
            Message::Ping { .. } => {}
            Message::LogGone { file, oldest } => {
                emit(job, FetchEvent::Gone { file, oldest }).await?;
                return Ok(());
            }
            Message::Refuse { kind, reason } => {
                emit(
                    job,
                    FetchEvent::Refused {
                        kind,
                        reason: reason.clone(),
                    },
                )
                .await?;
                bail!("{reason}");
            }
            other => bail!("unexpected {}", peer::describe(&other)),
        }
    }
}

/// The copy being received, which log data for `file` must belong to.
fn current_for(cur: &mut Option<Current>, file: u64) -> Result<&mut Current> {
    let Some(c) = cur.as_mut() else {
        bail!("log data before a log name");
    };
    if c.no != file {
        bail!("log data for {file} while receiving {}", c.no);
    }
    Ok(c)
}

/// The engine's answer about logfile `no`.
async fn wait_decision(job: &mut FetchJob, no: u64) -> Result<CopyDecision> {
    let deadline = tokio::time::Instant::now() + DECISION_WAIT;
    loop {
        let d = tokio::time::timeout_at(deadline, job.decisions.recv())
            .await
            .map_err(|_| anyhow!("no decision about log {no}"))?
            .ok_or_else(|| anyhow!("the resource's actor is gone"))?;
        if d.0 == no {
            return Ok(d.1);
        }
    }
}

/// What a chunk's write on a blocking thread gives back.
type Written = (CopyAppender, mars_replica::Result<()>, u64);

/// Waits for the chunk being written, if any; starts a sync once enough piled up.
async fn settle(job: &FetchJob, c: &mut Current) -> Result<()> {
    let Some(t) = c.writing.take() else {
        return Ok(());
    };
    let (w, r, n) = t.await?;
    c.w = Some(w);
    r.map_err(|e| anyhow!("log {} from {}: {e}", c.no, job.source))?;
    c.unsynced += n;
    if c.unsynced >= SYNC_BYTES {
        sync_in_background(job, c).await?;
    }
    Ok(())
}

/// The sync of what was appended so far: the appender writes what it still stages on a
/// blocking thread and hands out the fdatasync to run.
async fn detach_sync(c: &mut Current) -> Result<CopySync> {
    let mut w = c.w.take().ok_or_else(|| anyhow!("no appender"))?;
    let (w, r) = tokio::task::spawn_blocking(move || {
        let r = w.pending_sync();
        (w, r)
    })
    .await?;
    c.w = Some(w);
    Ok(r?)
}

/// Starts an fdatasync of what was received so far on a blocking thread, so that receiving
/// goes on meanwhile (the link and the disk work at the same time). One at a time: if the
/// previous one is still running, it is waited for only once twice the batch piled up.
async fn sync_in_background(job: &FetchJob, c: &mut Current) -> Result<()> {
    if let Some((covered, task)) = c.inflight.take() {
        if task.is_finished() || c.unsynced >= 2 * SYNC_BYTES {
            let len = task.await??;
            account(job, c, len.max(covered)).await?;
        } else {
            c.inflight = Some((covered, task));
            return Ok(());
        }
    }
    let sync: CopySync = detach_sync(c).await?;
    let upto = sync.upto();
    c.inflight = Some((upto, tokio::task::spawn_blocking(move || sync.run())));
    c.unsynced = 0;
    Ok(())
}

/// Makes everything received for the current copy durable and reports it.
async fn make_durable(job: &FetchJob, cur: &mut Option<Current>) -> Result<()> {
    let Some(c) = cur.as_mut() else {
        return Ok(());
    };
    settle(job, c).await?;
    if let Some((covered, task)) = c.inflight.take() {
        let len = task.await??;
        account(job, c, len.max(covered)).await?;
    }
    if c.unsynced > 0 {
        let sync = detach_sync(c).await?;
        let len = tokio::task::spawn_blocking(move || sync.run()).await??;
        c.unsynced = 0;
        account(job, c, len).await?;
    }
    Ok(())
}

/// `len` bytes of the current copy are durable here.
async fn account(job: &FetchJob, c: &mut Current, len: u64) -> Result<()> {
    if len <= c.reported {
        return Ok(());
    }
    let n = len - c.reported;
    c.reported = len;
    let still_there = job.replica.copies().note_durable(c.no, len);
    if !still_there {
        bail!("the local copy of log {} was removed", c.no);
    }
    Rates::add(&job.rates.fetch, n);
    emit(job, FetchEvent::Durable { no: c.no, len }).await
}
