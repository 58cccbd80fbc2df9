//! What every accept loop (peers, NBD over TCP and unix, the control socket) does when
//! `accept` fails: the usual cause is running out of file descriptors, which does not pass by
//! retrying at once, so the loop backs off instead of spinning, and the failure is logged once
//! until an accept succeeds again (a loop that logged each one wrote a gigabyte in seconds).
//! And how many connections a listener admits ([`Admission`]): in total and per address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long an accept loop waits after a failed accept.
pub const BACKOFF: Duration = Duration::from_millis(100);

/// The state of one accept loop's failures.
#[derive(Debug)]
pub struct AcceptErrors {
    what: &'static str,
    failing: bool,
    failures: u64,
}

impl AcceptErrors {
    pub fn new(what: &'static str) -> AcceptErrors {
        AcceptErrors {
            what,
            failing: false,
            failures: 0,
        }
    }

    /// An accept succeeded: a run of failures ends (and is summed up).
    pub fn accepted(&mut self) {
        if self.failing {
            tracing::info!(
                "{}: accepting again after {} failed accepts",
                self.what,
                self.failures
            );
        }
        self.failing = false;
        self.failures = 0;
    }

    /// An accept failed: logged if it starts a run of failures; then the back-off.
    pub async fn failed(&mut self, e: std::io::Error) {
        if !self.failing {
            tracing::error!(
                "{}: accept failed: {e} (retrying every {BACKOFF:?}; not logged again until \
                 an accept succeeds)",
                self.what
            );
        }
        self.failing = true;
        self.failures += 1;
        tokio::time::sleep(BACKOFF).await;
    }
}

/// The connection limits of one listener, in total and per remote address, so that one
/// address (a broken or hostile client) cannot take every slot. Refusals are logged at most
/// once per [`REFUSAL_LOG_EVERY`] with the number left unlogged.
#[derive(Debug)]
pub struct Admission {
    what: &'static str,
    total: usize,
    per_address: usize,
    state: Mutex<AdmissionState>,
}

#[derive(Debug, Default)]
struct AdmissionState {
    open: usize,
    by_address: HashMap<IpAddr, usize>,
    last_logged: Option<Instant>,
    unlogged: u64,
}

/// A budget for log lines about what peers do (refused handshakes, hellos, joins): a burst of
/// [`LogBudget::BURST`] lines, then one per second. A peer that opens connections as fast as it
/// can costs the log a line a second, not a line per connection; the lines that were left out
/// are counted in the next one.
#[derive(Debug)]
pub struct LogBudget {
    state: Mutex<LogBudgetState>,
}

#[derive(Debug)]
struct LogBudgetState {
    tokens: u32,
    refilled: Option<Instant>,
    left_out: u64,
}

impl LogBudget {
    pub const BURST: u32 = 20;
    pub const REFILL: Duration = Duration::from_secs(1);

    pub const fn new() -> LogBudget {
        LogBudget {
            state: Mutex::new(LogBudgetState {
                tokens: Self::BURST,
                refilled: None,
                left_out: 0,
            }),
        }
    }

    /// `Some(lines left out since the last one)` if a line may be written now.
    pub fn take(&self) -> Option<u64> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let since = st.refilled.get_or_insert(now);
        let earned = now.duration_since(*since).as_secs() / Self::REFILL.as_secs();
        if earned > 0 {
            st.tokens = (st.tokens as u64 + earned).min(Self::BURST as u64) as u32;
            st.refilled = Some(now);
        }
        if st.tokens == 0 {
            st.left_out += 1;
            return None;
        }
        st.tokens -= 1;
        Some(std::mem::take(&mut st.left_out))
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// Refusals of a listener are logged at most this often.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// An admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    pub fn new(what: &'static str, total: usize, per_address: usize) -> Arc<Admission> {
        Arc::new(Admission {
            what,
            total,
            per_address,
            state: Mutex::new(AdmissionState::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, AdmissionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a connection from `from`, or `None` (logged, rate-limited): the caller
    /// closes the connection.
    pub fn admit(self: &Arc<Self>, from: SocketAddr) -> Option<Slot> {
        let ip = from.ip();
        let mut st = self.state();
        let mine = st.by_address.get(&ip).copied().unwrap_or(0);
        let why = if st.open >= self.total {
            Some(format!("{} connections open", self.total))
        } else if mine >= self.per_address {
            Some(format!("{} connections open from {ip}", self.per_address))
        } else {
            None
        };
        if let Some(why) = why {
            let now = Instant::now();
            if st
                .last_logged
                .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY)
            {
                let more = std::mem::take(&mut st.unlogged);
                let more = if more > 0 {
                    format!(" ({more} more refused since the last message)")
                } else {
                    String::new()
                };
                tracing::warn!("{}: connection from {from} refused: {why}{more}", self.what);
                st.last_logged = Some(now);
            } else {
                st.unlogged += 1;
            }
            return None;
        }
        st.open += 1;
        *st.by_address.entry(ip).or_insert(0) += 1;
        Some(Slot {
            admission: self.clone(),
            ip,
        })
    }

    /// Connections admitted and not yet closed.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.state().open
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.admission.state();
        st.open -= 1;
        if let Some(n) = st.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.by_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_budget_allows_a_burst_then_one_line_a_second() {
        let b = LogBudget::new();
        let t0 = Instant::now();
        for _ in 0..LogBudget::BURST {
            assert_eq!(b.take_at(t0), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(b.take_at(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(b.take_at(t0 + Duration::from_secs(1)), Some(100));
        assert_eq!(b.take_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(b.take_at(t0 + Duration::from_secs(60)), Some(1));
    }

    #[test]
    fn one_address_cannot_take_every_place() {
        let a = Admission::new("test", 5, 2);
        let x: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let x2: SocketAddr = "10.0.0.1:1001".parse().unwrap();
        let y: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let s1 = a.admit(x).expect("first");
        let _s2 = a.admit(x2).expect("second, other port");
        assert!(a.admit(x).is_none(), "a third from one address");
        let ys: Vec<Slot> = (0..2)
            .map(|_| a.admit(y).expect("another address"))
            .collect();
        assert_eq!(a.open(), 4);
        drop(s1);
        let _s3 = a.admit(x).expect("a place freed");
        let z: SocketAddr = "10.0.0.3:1".parse().unwrap();
        let _z = a.admit(z).expect("the fifth");
        assert!(
            a.admit("10.0.0.4:1".parse().unwrap()).is_none(),
            "all taken"
        );
        drop(ys);
        assert_eq!(a.open(), 3);
        assert!(
            !a.state().by_address.contains_key(&y.ip()),
            "no entry left behind"
        );
    }

    #[tokio::test]
    async fn a_run_of_failures_backs_off_and_ends_with_a_success() {
        let mut e = AcceptErrors::new("test");
        let t = tokio::time::Instant::now();
        for _ in 0..3 {
            e.failed(std::io::Error::from_raw_os_error(libc::EMFILE))
                .await;
        }
        assert!(e.failing);
        assert_eq!(e.failures, 3);
        assert!(t.elapsed() >= BACKOFF * 3, "each failure waits");
        e.accepted();
        assert!(!e.failing);
        assert_eq!(e.failures, 0);
    }
}
