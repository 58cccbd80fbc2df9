//! A full sync session (fast full sync): copies the source's device, only chunks whose digests
//! differ travel.
//!
//! `SyncStart` → the source answers `SyncInfo` (its size, the log position the copy starts at,
//! its link of the logfile before); the session reports it and waits for the engine's
//! `SyncGo` (it persists the start first). Then it sends a digest per chunk (hashed on a
//! thread of its own, a window ahead), writes the chunks that come back different, and every
//! [`PERSIST`] bytes syncs the disk before reporting progress (which the engine persists). At
//! the end a second `SyncStart` asks where the source's log is now: the replica is consistent
//! once replay passes that position.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use mars_config::{HostName, ResourceName};
use mars_engine::resource::{Event, SessionId, SyncEvent};
use mars_replica::sync as disk_sync;
use mars_storage::File;
use mars_txlog::LogPos;
use mars_wire::{ClusterId, Message, RefuseKind, StreamKind};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::{Rates, Sink, Stop, SyncSlots};
use crate::peer;

/// Sync chunks in flight: keeps a long link busy without a round trip per chunk.
const WINDOW: usize = 32;
/// Progress of the copy is made durable and reported every this many bytes …
const PERSIST: u64 = 64 << 20;
/// … and shown (not durable) every this many.
const SHOW: u64 = 4 << 20;
/// How long the source may take to answer.
const ANSWER: std::time::Duration = std::time::Duration::from_secs(60);
/// A source that does not know us as a member yet (we joined the resource a moment ago) is
/// asked again every `NOT_MEMBER_RETRY` for this long before the refusal counts as a failure.
const NOT_MEMBER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);
const NOT_MEMBER_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

pub struct SyncJob {
    pub id: SessionId,
    pub res: ResourceName,
    pub me: HostName,
    pub cluster: ClusterId,
    /// `None` only with `--insecure`.
    pub tls: Option<Arc<mars_tls::PeerTls>>,
    pub source: HostName,
    pub addr: String,
    pub disk: Arc<dyn File>,
    /// The host's places for running syncs (`defaults/sync-limit`).
    pub slots: Arc<SyncSlots>,
    pub rates: Arc<Rates>,
    pub sink: Sink,
    pub stop: Stop,
    /// The engine's go (with where to copy from and to), or a stop.
    pub go: oneshot::Receiver<(u64, u64)>,
}

pub async fn run(job: SyncJob) {
    let id = job.id;
    let sink = job.sink.clone();
    let stop = job.stop.clone();
    let Some(_slot) = job.slots.try_acquire() else {
        let _ = sink.send(Event::Sync(id, SyncEvent::NoSlot)).await;
        return;
    };
    let r = tokio::select! {
        r = session(job) => r,
        _ = stop.wait() => Ok(()),
    };
    let error = r.err().map(|e| format!("{e:#}"));
    if error.is_some() {
        crate::traffic::count(crate::traffic::PeerError::SessionFailed);
    }
    let _ = sink.send(Event::Sync(id, SyncEvent::Ended { error })).await;
}

async fn emit(sink: &Sink, id: SessionId, e: SyncEvent) -> Result<()> {
    sink.send(Event::Sync(id, e))
        .await
        .map_err(|_| anyhow!("the resource's actor is gone"))
}

async fn session(job: SyncJob) -> Result<()> {
    let SyncJob {
        id,
        res,
        me,
        cluster,
        tls,
        source,
        addr,
        disk,
        rates,
        sink,
        go,
        ..
    } = job;
    let start_msg = Message::SyncStart {
        res: res.to_string(),
    };
    let patience = tokio::time::Instant::now() + NOT_MEMBER_PATIENCE;
    let (mut s, size, file, offset, prev_link) = loop {
        let mut s = peer::connect(&addr, &me, cluster, StreamKind::Sync, tls.as_deref()).await?;
        if s.peer.host != source {
            bail!("{addr} answers as {}, expected {source}", s.peer.host);
        }
        peer::send(&mut s.w, &start_msg).await?;
        s.w.flush().await?;
        match s.frames.next_within(ANSWER).await? {
            Message::SyncInfo {
                size,
                file,
                offset,
                prev_link,
            } => break (s, size, file, offset, prev_link),
            // A member that just joined the resource asks before the source pulled its
            // membership (one metadata round trip): routine, asked again shortly.
            Message::Refuse {
                kind: RefuseKind::NotMember,
                reason,
            } if tokio::time::Instant::now() < patience => {
                tracing::debug!("{res}: sync from {source}: {reason}; asking again");
                tokio::time::sleep(NOT_MEMBER_RETRY).await;
            }
            Message::Refuse { reason, .. } => bail!("{reason}"),
            other => bail!("unexpected {}", peer::describe(&other)),
        }
    };
    emit(
        &sink,
        id,
        SyncEvent::Info {
            size,
            start: LogPos::new(file, offset),
            prev_link,
        },
    )
    .await?;
    let (mut done, size) = go
        .await
        .map_err(|_| anyhow!("the sync was not allowed to go on"))?;
    let mut next = done;
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut since_persist = 0u64;
    let mut since_shown = 0u64;
    let mut transferred = 0u64;
    // The local disk is read and hashed on a thread of its own, at most a window ahead of what
    // was sent, so that this work overlaps with the stream and the source's hashing (it ends
    // when this session drops the receiver).
    let mut digests = {
        let (tx, rx) = tokio::sync::mpsc::channel(WINDOW);
        let disk = disk.clone();
        tokio::task::spawn_blocking(move || hash_chunks(&*disk, done, size, &tx));
        rx
    };
    loop {
        if inflight.is_empty() && next >= size {
            break;
        }
        let msg = tokio::select! {
            d = digests.recv(), if inflight.len() < WINDOW && next < size => {
                let (at, len, digest) =
                    d.ok_or_else(|| anyhow!("the sync's hashing thread ended"))??;
                peer::send(
                    &mut s.w,
                    &Message::SyncCheck {
                        offset: at,
                        len: len as u32,
                        digest,
                    },
                )
                .await?;
                inflight.push_back((at, len));
                next = at + len;
                if inflight.len() >= WINDOW || next >= size {
                    s.w.flush().await?;
                }
                continue;
            }
            m = s.frames.next_within(ANSWER), if !inflight.is_empty() => {
                s.w.flush().await?;
                m?
            }
        };
        let Some(&(off, len)) = inflight.front() else {
            bail!("sync reply without a request: {}", peer::describe(&msg));
        };
        match msg {
            Message::SyncSame { offset } if offset == off => {}
            Message::SyncData { offset, data } if offset == off => {
                if data.len() as u64 != len {
                    bail!("sync chunk at {off}: {} bytes for {len}", data.len());
                }
                let d = disk.clone();
                tokio::task::spawn_blocking(move || disk_sync::write_chunk(&*d, off, &data))
                    .await??;
                transferred += len;
            }
            Message::Refuse { reason, .. } => bail!("{reason}"),
            other => bail!(
                "unexpected {} (expected chunk {off})",
                peer::describe(&other)
            ),
        }
        inflight.pop_front();
        done = off + len;
        since_persist += len;
        since_shown += len;
        Rates::add(&rates.sync, len);
        if since_persist >= PERSIST {
            let d = disk.clone();
            tokio::task::spawn_blocking(move || disk_sync::sync_disk(&*d)).await??;
            emit(
                &sink,
                id,
                SyncEvent::Progress {
                    done,
                    transferred,
                    durable: true,
                },
            )
            .await?;
            transferred = 0;
            since_persist = 0;
            since_shown = 0;
        } else if since_shown >= SHOW {
            // For `view` only: not durable yet.
            emit(
                &sink,
                id,
                SyncEvent::Progress {
                    done,
                    transferred: 0,
                    durable: false,
                },
            )
            .await?;
            since_shown = 0;
        }
    }
    // The copy is complete: ask where the source's log is now.
    peer::send(&mut s.w, &start_msg).await?;
    s.w.flush().await?;
    let end = match s.frames.next_within(ANSWER).await? {
        Message::SyncInfo { file, offset, .. } => LogPos::new(file, offset),
        Message::Refuse { reason, .. } => bail!("{reason}"),
        other => bail!("unexpected {}", peer::describe(&other)),
    };
    let d = disk.clone();
    tokio::task::spawn_blocking(move || disk_sync::sync_disk(&*d)).await??;
    emit(&sink, id, SyncEvent::Copied { end, transferred }).await?;
    Ok(())
}

type Digest = Result<(u64, u64, [u8; 16])>;

/// Reads and hashes `f` in chunks from `from` to `size`, sending `(offset, len, digest)` in
/// order; stops at the first error (sent too) or when the receiver is gone. One buffer for
/// every chunk: new memory costs more than the hashing where first touches are slow (a VM).
fn hash_chunks(f: &dyn File, from: u64, size: u64, tx: &tokio::sync::mpsc::Sender<Digest>) {
    let mut buf = vec![0u8; disk_sync::chunk_len(from, size) as usize];
    let mut at = from;
    while at < size {
        let len = disk_sync::chunk_len(at, size);
        let b = &mut buf[..len as usize];
        let r = disk_sync::hash_chunk(f, at, b)
            .map(|digest| (at, len, digest))
            .map_err(anyhow::Error::from);
        let failed = r.is_err();
        if tx.blocking_send(r).is_err() || failed {
            return;
        }
        at += len;
    }
}
