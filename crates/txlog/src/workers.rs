//! A few threads shared by every log and every volume of the process.
//!
//! The group commits of each log (write, fdatasync: `writer.rs`) and the writeback of each
//! volume (`mars_volume`) run here as [`Job`]s, so that a host with a thousand resources has a
//! handful of such threads, not two per resource, and an idle resource has none busy.
//!
//! A job runs on one thread at a time. It does one bounded piece of work (one group commit, one
//! writeback round) and says when it wants to run again; whoever has new work for it schedules
//! it ([`JobHandle::schedule`]). A job never waits for another job (that could occupy every
//! thread): it returns, and the other job's completion schedules it again.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

/// A piece of work that runs on the shared threads.
pub trait Job: Send + Sync + 'static {
    /// Does one piece of work. `Some(at)`: run again at `at` at the latest; `None`: idle until
    /// scheduled.
    fn run(&self) -> Option<Instant>;
}

/// The shared threads.
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    q: Mutex<Queue>,
    cv: Condvar,
}

#[derive(Default)]
struct Queue {
    /// Due times; an entry whose job's `due` differs is stale and skipped.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    jobs: HashMap<u64, Entry>,
    next_id: u64,
}

struct Entry {
    job: Weak<dyn Job>,
    due: Option<Instant>,
    running: bool,
    /// Scheduled while running: run again right after.
    again: bool,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered job. Dropping it unregisters the job.
pub struct JobHandle {
    id: u64,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobHandle({})", self.id)
    }
}

impl JobHandle {
    /// Runs the job at `at` at the latest.
    pub fn schedule(&self, at: Instant) {
        schedule(&self.inner, self.id, at);
    }

    /// Runs the job as soon as a thread is free.
    pub fn now(&self) {
        self.schedule(Instant::now());
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        lock(&self.inner.q).jobs.remove(&self.id);
    }
}

fn schedule(inner: &Inner, id: u64, at: Instant) {
    let mut q = lock(&inner.q);
    let Some(e) = q.jobs.get_mut(&id) else {
        return;
    };
    if e.running {
        e.again = e.again || at <= Instant::now();
        if e.again {
            return;
        }
    }
    if e.due.is_some_and(|d| d <= at) {
        return;
    }
    e.due = Some(at);
    q.heap.push(Reverse((at, id)));
    drop(q);
    inner.cv.notify_one();
}

impl Workers {
    /// The process's shared threads (started on first use): `MARS_IO_THREADS`, or twice the
    /// cores, between 4 and 16.
    pub fn global() -> &'static Workers {
        static W: OnceLock<Workers> = OnceLock::new();
        W.get_or_init(|| {
            let n = std::env::var("MARS_IO_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map_or(4, |n| n.get() * 2)
                        .clamp(4, 16)
                });
            Workers::new(n)
        })
    }

    /// A new set of `threads` threads (they run for the life of the process).
    pub fn new(threads: usize) -> Workers {
        let inner = Arc::new(Inner {
            q: Mutex::new(Queue::default()),
            cv: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let inner = inner.clone();
            let _ = std::thread::Builder::new()
                .name(format!("mars-io-{i}"))
                .spawn(move || worker(&inner));
        }
        Workers { inner }
    }

    /// Registers a job (idle until scheduled).
    pub fn register(&self, job: Weak<dyn Job>) -> JobHandle {
        let mut q = lock(&self.inner.q);
        let id = q.next_id;
        q.next_id += 1;
        q.jobs.insert(
            id,
            Entry {
                job,
                due: None,
                running: false,
                again: false,
            },
        );
        JobHandle {
            id,
            inner: self.inner.clone(),
        }
    }
}

fn worker(inner: &Inner) {
    let mut q = lock(&inner.q);
    loop {
        let Some(&Reverse((at, id))) = q.heap.peek() else {
            q = inner.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let valid = q.jobs.get(&id).is_some_and(|e| e.due == Some(at));
        if !valid {
            q.heap.pop();
            continue;
        }
        let now = Instant::now();
        if at > now {
            q = inner
                .cv
                .wait_timeout(q, at - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        q.heap.pop();
        let e = q.jobs.get_mut(&id).expect("valid");
        e.due = None;
        if e.running {
            e.again = true;
            continue;
        }
        e.running = true;
        let job = e.job.clone();
        drop(q);
        // More due work may wait: let another thread look while this one runs.
        inner.cv.notify_one();
        let next = job.upgrade().and_then(|j| j.run());
        q = lock(&inner.q);
        if let Some(e) = q.jobs.get_mut(&id) {
            e.running = false;
            let again = std::mem::take(&mut e.again);
            let at = if again { Some(Instant::now()) } else { next };
            if let Some(at) = at {
                if e.due.is_none_or(|d| at < d) {
                    e.due = Some(at);
                    q.heap.push(Reverse((at, id)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    struct Count {
        n: AtomicU32,
        more: AtomicU32,
    }

    impl Job for Count {
        fn run(&self) -> Option<Instant> {
            self.n.fetch_add(1, Ordering::SeqCst);
            if self.more.load(Ordering::SeqCst) > 0 {
                self.more.fetch_sub(1, Ordering::SeqCst);
                return Some(Instant::now() + Duration::from_millis(5));
            }
            None
        }
    }

    fn wait_for(c: &Count, n: u32) {
        let t = Instant::now();
        while c.n.load(Ordering::SeqCst) < n {
            assert!(t.elapsed() < Duration::from_secs(5), "job did not run");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_job_runs_when_scheduled_and_when_it_asks() {
        let w = Workers::new(2);
        let c = Arc::new(Count {
            n: AtomicU32::new(0),
            more: AtomicU32::new(2),
        });
        let weak: Weak<dyn Job> = Arc::downgrade(&c) as Weak<dyn Job>;
        let h = w.register(weak);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(c.n.load(Ordering::SeqCst), 0, "idle until scheduled");
        h.now();
        wait_for(&c, 3);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.n.load(Ordering::SeqCst), 3, "idle again");
        drop(h);
        // Unregistered: scheduling through another handle of it is impossible, and the job
        // may be dropped.
        drop(c);
    }

    #[test]
    fn many_jobs_share_few_threads() {
        let w = Workers::new(2);
        let jobs: Vec<Arc<Count>> = (0..100)
            .map(|_| {
                Arc::new(Count {
                    n: AtomicU32::new(0),
                    more: AtomicU32::new(0),
                })
            })
            .collect();
        let handles: Vec<JobHandle> = jobs
            .iter()
            .map(|j| w.register(Arc::downgrade(j) as Weak<dyn Job>))
            .collect();
        for h in &handles {
            h.now();
        }
        for j in &jobs {
            wait_for(j, 1);
        }
    }
}
