//! A replay run: applies records `[from, to)` of one local copy onto the disk on a blocking
//! thread (`mars_replica::Replay`: verified again while read, taken from the bytes just
//! fetched while they are in memory, coalesced and sorted per batch, the disk synced before the
//! position is persisted), reporting the persisted positions.

use std::sync::Arc;

use mars_config::HostName;
use mars_engine::resource::{Event, ReplayEnd, ReplayEvent, SessionId};
use mars_txlog::{LogName, LogPos};

use super::{Rates, Sink, Stop};
use crate::local::ReplicaDir;

pub struct ReplayJob {
    pub id: SessionId,
    pub file: u64,
    pub origin: HostName,
    pub from: u64,
    pub to: u64,
    /// The device's size as the engine knows it.
    pub size: u64,
    pub replica: Arc<ReplicaDir>,
    pub rates: Arc<Rates>,
    pub sink: Sink,
    pub stop: Stop,
}

/// Runs on a blocking thread until the run ends or is stopped.
pub fn run(job: ReplayJob) {
    let name = LogName::new(job.file, job.origin.clone());
    let recent = job.replica.copies().recent().clone();
    let mut replay = mars_replica::Replay::new(&*job.replica.dir, &*job.replica.disk, job.size);
    // Records just fetched come from memory instead of being read back from the copy.
    replay.recent = Some(&recent);
    let mut last = LogPos::new(job.file, job.from);
    let sink = job.sink.clone();
    let id = job.id;
    let rates = job.rates.clone();
    let stop = job.stop.clone();
    let result = replay.apply(
        &name,
        job.from,
        job.to,
        &mut || stop.stopped(),
        &mut |e| match e {
            mars_replica::ReplayEvent::Applied(n) => Rates::add(&rates.replay, n),
            mars_replica::ReplayEvent::Persisted(p) => {
                last = p;
                let _ = sink.blocking_send(Event::Replay(id, ReplayEvent::Progress { pos: p }));
            }
        },
    );
    if stop.stopped() {
        // Paused or stopped: when replay resumes it reads the copy (`mars_replica::recent`).
        recent.close();
    }
    let (pos, end) = match result {
        Ok(p) => (p, ReplayEnd::Done),
        Err(mars_replica::Error::BeyondDevice { at, end, .. }) => (
            LogPos::new(job.file, at),
            ReplayEnd::BeyondDevice { at, end },
        ),
        Err(e) => {
            let detail = e.to_string();
            match e.damage_offset() {
                Some(offset) => (last, ReplayEnd::Damaged { offset, detail }),
                None => (last, ReplayEnd::Failed { detail }),
            }
        }
    };
    let _ = job
        .sink
        .blocking_send(Event::Replay(id, ReplayEvent::Stopped { pos, end }));
}
