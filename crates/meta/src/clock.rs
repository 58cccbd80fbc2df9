//! The physical Lamport clock (MARS `kernel/lamport.c`).

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::MetaError;

/// A Lamport stamp: nanoseconds since the Unix epoch, made strictly monotonic per host.
pub type Stamp = u64;

/// Where the clock reads real time (nanoseconds since the epoch); injectable for tests.
pub type TimeSource = Arc<dyn Fn() -> u64 + Send + Sync>;

/// How far ahead of local real time a stamp may be: 30 days, MARS's `max_lamport_future`.
pub const DEFAULT_MAX_FUTURE_NS: u64 = 30 * 24 * 3600 * 1_000_000_000;

/// Real time in nanoseconds since the epoch (0 if the system clock is before 1970).
pub fn system_time_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A physical Lamport clock: stamps are `max(real time, last + 1)`; stamps seen from other hosts
/// advance it unless they are too far in the future.
#[derive(Clone)]
pub struct Clock {
    now: TimeSource,
    last: Stamp,
    max_future_ns: u64,
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock")
            .field("last", &self.last)
            .field("max_future_ns", &self.max_future_ns)
            .finish_non_exhaustive()
    }
}

impl Clock {
    /// A clock that has issued nothing yet, with the default future limit.
    pub fn new(now: TimeSource) -> Self {
        Clock {
            now,
            last: 0,
            max_future_ns: DEFAULT_MAX_FUTURE_NS,
        }
    }

    /// The same clock with another future limit.
    pub fn with_max_future(mut self, max_future_ns: u64) -> Self {
        self.max_future_ns = max_future_ns;
        self
    }

    /// Local real time, from the time source.
    pub fn now(&self) -> u64 {
        (self.now)()
    }

    /// The last stamp issued or observed.
    pub fn last(&self) -> Stamp {
        self.last
    }

    /// The future limit in nanoseconds.
    pub fn max_future_ns(&self) -> u64 {
        self.max_future_ns
    }

    /// A new stamp, strictly greater than every stamp issued or observed before.
    pub fn tick(&mut self) -> Stamp {
        self.last = self.now().max(self.last.saturating_add(1));
        self.last
    }

    /// Refuses a stamp further than the future limit ahead of local real time.
    pub fn check(&self, stamp: Stamp) -> Result<(), MetaError> {
        let now = self.now();
        if stamp > now.saturating_add(self.max_future_ns) {
            return Err(MetaError::StampTooFarInFuture {
                stamp,
                now,
                max_future_ns: self.max_future_ns,
            });
        }
        Ok(())
    }

    /// Advances the clock to a stamp seen elsewhere; a refused stamp leaves it unchanged.
    pub fn observe(&mut self, stamp: Stamp) -> Result<(), MetaError> {
        self.check(stamp)?;
        self.last = self.last.max(stamp);
        Ok(())
    }

    /// Restores the last stamp from persistent state (never moves backwards).
    pub(crate) fn restore(&mut self, last: Stamp) {
        self.last = self.last.max(last);
    }

    /// Sets the last stamp to `last` even if that is lower: only for
    /// [`crate::Store::rebase_future`], which re-stamps every entry above it in order.
    pub(crate) fn rebase(&mut self, last: Stamp) {
        self.last = last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn manual(start: u64) -> (Arc<AtomicU64>, Clock) {
        let t = Arc::new(AtomicU64::new(start));
        let t2 = t.clone();
        (t, Clock::new(Arc::new(move || t2.load(Ordering::SeqCst))))
    }

    #[test]
    fn tick_is_strictly_monotonic_even_when_time_goes_back() {
        let (t, mut c) = manual(100);
        assert_eq!(c.tick(), 100);
        assert_eq!(c.tick(), 101);
        t.store(50, Ordering::SeqCst);
        assert_eq!(c.tick(), 102);
        t.store(1_000, Ordering::SeqCst);
        assert_eq!(c.tick(), 1_000);
    }

    #[test]
    fn observe_advances_and_refuses_far_future() {
        let (_t, mut c) = manual(1_000);
        c.observe(5_000).unwrap();
        assert_eq!(c.last(), 5_000);
        assert_eq!(c.tick(), 5_001);
        c.observe(10).unwrap();
        assert_eq!(c.last(), 5_001);
        let far = 1_000 + DEFAULT_MAX_FUTURE_NS + 1;
        assert!(matches!(
            c.observe(far),
            Err(MetaError::StampTooFarInFuture { stamp, .. }) if stamp == far
        ));
        assert_eq!(c.last(), 5_001, "refused stamp must not move the clock");
        c.observe(1_000 + DEFAULT_MAX_FUTURE_NS).unwrap();

        let (_t, mut c) = manual(1_000);
        let mut c2 = c.clone().with_max_future(10);
        assert!(c2.observe(1_011).is_err());
        c2.observe(1_010).unwrap();
        c.observe(1_011).unwrap();
    }
}
