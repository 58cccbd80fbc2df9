//! The sessions a resource's engine starts and the servers other hosts' sessions talk to:
//!
//! ```text
//!  primary ──fetch stream──► fetch.rs: local copies (verified on arrival, made durable)
//!                                  │
//!                                  ▼  replay.rs: in log order, the disk synced before the position
//!                              local disk
//!  primary ──sync stream───► sync.rs: local disk (fast full sync: only chunks whose digests differ)
//!  serve.rs: this host's side of both streams for other hosts (the decisions are
//!            `mars_engine::serve`'s)
//! ```
//!
//! Every session reports to its resource's actor as engine events (`Event::Fetch`, `Replay`,
//! `Sync`) and takes no decision of its own beyond the mechanics (verification, batching,
//! read-ahead). Each is started and stopped by the actor; stopping waits until the session
//! touches no file any more.

pub mod fetch;
pub mod replay;
pub mod serve;
pub mod sync;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mars_engine::resource::Event;
use tokio::sync::mpsc;

/// The `tail` of a fetch request: the xxh3-128 of the last [`mars_wire::TAIL_LEN`] bytes of
/// `f` before `off` (all zero at 0). Blocking.
pub fn tail_digest(f: &dyn mars_storage::File, off: u64) -> std::io::Result<[u8; 16]> {
    if off == 0 {
        return Ok([0; 16]);
    }
    let start = off.saturating_sub(mars_wire::TAIL_LEN);
    let mut buf = vec![0u8; (off - start) as usize];
    let mut got = 0;
    while got < buf.len() {
        let n = f.read_at(&mut buf[got..], start + got as u64)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{got} of {} bytes before offset {off}", buf.len()),
            ));
        }
        got += n;
    }
    Ok(xxhash_rust::xxh3::xxh3_128(&buf).to_le_bytes())
}

/// Where sessions send their events: the actor's queue for them.
pub type Sink = mpsc::Sender<Event>;

/// Bytes per second over the last few seconds, in buckets of 100 ms (cheap per record:
/// replay adds every MiB).
#[derive(Debug, Default, Clone)]
pub struct Rate {
    window: VecDeque<(Instant, u64)>,
}

impl Rate {
    pub fn add(&mut self, n: u64) {
        let now = Instant::now();
        match self.window.back_mut() {
            Some((t, sum)) if now.duration_since(*t) < Duration::from_millis(100) => *sum += n,
            _ => self.window.push_back((now, n)),
        }
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(5))
        {
            self.window.pop_front();
        }
    }

    pub fn per_sec(&mut self) -> u64 {
        self.trim(Instant::now());
        let Some((first, _)) = self.window.front() else {
            return 0;
        };
        let secs = first.elapsed().as_secs_f64().max(1.0);
        (self.window.iter().map(|(_, n)| n).sum::<u64>() as f64 / secs) as u64
    }
}

/// The rates of a replica's three activities.
#[derive(Debug, Default)]
pub struct Rates {
    pub fetch: Mutex<Rate>,
    pub replay: Mutex<Rate>,
    pub sync: Mutex<Rate>,
}

impl Rates {
    pub fn add(r: &Mutex<Rate>, n: u64) {
        r.lock().unwrap_or_else(|e| e.into_inner()).add(n);
    }

    pub fn get(r: &Mutex<Rate>) -> u64 {
        r.lock().unwrap_or_else(|e| e.into_inner()).per_sec()
    }
}

/// Stops a session: a flag the session looks at, and a notification that wakes it.
#[derive(Clone, Default)]
pub struct Stop(Arc<StopInner>);

#[derive(Default)]
struct StopInner {
    flag: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl Stop {
    pub fn stop(&self) {
        self.0
            .flag
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.wake.notify_waiters();
    }

    pub fn stopped(&self) -> bool {
        self.0.flag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once stopped.
    pub async fn wait(&self) {
        loop {
            let n = self.0.wake.notified();
            if self.stopped() {
                return;
            }
            n.await;
        }
    }
}

/// Places for running full syncs on this host (`defaults/sync-limit`, 0: unlimited).
#[derive(Debug, Default)]
pub struct SyncSlots {
    limit: std::sync::atomic::AtomicUsize,
    running: std::sync::atomic::AtomicUsize,
}

/// A running full sync's place; dropping it frees the place.
pub struct SyncSlot(Arc<SyncSlots>);

impl Drop for SyncSlot {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl SyncSlots {
    pub fn set_limit(&self, limit: usize) {
        self.limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// A place, unless `limit` syncs run already.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SyncSlot> {
        use std::sync::atomic::Ordering;
        let limit = self.limit.load(Ordering::Relaxed);
        let prev = self.running.fetch_add(1, Ordering::AcqRel);
        if limit > 0 && prev >= limit {
            self.running.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SyncSlot(self.clone()))
    }
}
