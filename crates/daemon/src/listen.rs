//! What every accept loop (peers, NBD over TCP and unix, the control socket) does when
//! `accept` fails: the usual cause is running out of file descriptors, which does not pass by
//! retrying at once, so the loop backs off instead of spinning, and the failure is logged once
//! until an accept succeeds again (a loop that logged each one wrote a gigabyte in seconds).

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
