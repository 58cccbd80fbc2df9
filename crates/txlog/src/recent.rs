//! The newest durable bytes of a log, kept in memory for the secondaries that fetch them.
//!
//! The primary writes its log past the page cache (`segment.rs`), so every fetch stream that
//! follows the log read each group back with a `pread` of its own: a syscall, the page-cache
//! lookups and, where the pages were dropped, a read from the disk, twice over with two
//! secondaries (`docs/performance.md`, "NBD writes with two secondaries replicating"). This
//! window holds copies of the last group commits' records, so a reader that follows the log
//! closely takes its bytes from memory instead.
//!
//! Bounds: at most [`RECENT_CAP`] bytes per log, and nothing at all unless some reader asked
//! within [`WANTED_FOR`] (an idle resource, or one without secondaries, keeps no copy). A
//! reader copies out what it takes and holds nothing, so a slow reader never pins the window:
//! what it needs and the window has dropped, it reads from the file as before.
//!
//! Only bytes of a successful group commit (written and synced) enter, as whole groups, so an
//! entry always starts and ends at a record boundary, and its bytes are exactly the file's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most bytes one log's window holds (at 30k random 4 KiB writes a second, about 130 ms of
/// log: a reader that is further behind reads the file).
pub const RECENT_CAP: usize = 16 << 20;

/// The window is filled for this long after the last read that asked for it.
pub const WANTED_FOR: Duration = Duration::from_secs(5);

struct Entry {
    file: u64,
    /// Offset of the first record in the logfile.
    start: u64,
    data: Vec<u8>,
}

impl Entry {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

#[derive(Default)]
pub(crate) struct Recent {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Filled while this is in the future.
    wanted_until: Option<Instant>,
}

impl Recent {
    /// Whether a group commit should copy its records in.
    pub fn wanted(&mut self, now: Instant) -> bool {
        let wanted = self.wanted_until.is_some_and(|t| now < t);
        if !wanted && !self.entries.is_empty() {
            self.clear();
        }
        wanted
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Adds the records of one group commit in logfile `file` from offset `start`. Entries of a
    /// logfile continue contiguously; one that does not (which a single appender never
    /// produces) empties the window first rather than leave a hole a reader could step over.
    pub fn push(&mut self, file: u64, start: u64, data: Vec<u8>) {
        if data.is_empty() || data.len() > RECENT_CAP {
            return;
        }
        if let Some(last) = self.entries.back() {
            let continues =
                (last.file == file && last.end() == start) || (file > last.file && start == 0);
            if !continues {
                self.clear();
            }
        }
        self.bytes += data.len();
        self.entries.push_back(Entry { file, start, data });
        while self.bytes > RECENT_CAP {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= e.data.len();
        }
    }

    /// Copies the window's bytes of logfile `file` from `off` (a record boundary) into `out`:
    /// whole entries only, at most `max` bytes, never beyond `limit`. Returns `false` (and
    /// leaves `out` empty) when the window does not hold `off`, or the entry there alone is
    /// larger than `max`; the caller reads the file then. Marks the window as wanted.
    pub fn read(
        &mut self,
        now: Instant,
        file: u64,
        off: u64,
        limit: u64,
        max: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        self.wanted_until = Some(now + WANTED_FOR);
        out.clear();
        let Some(i) = self
            .entries
            .iter()
            .position(|e| e.file == file && e.start <= off && off < e.end())
        else {
            return false;
        };
        let mut at = off;
        for e in self.entries.iter().skip(i) {
            // The first entry holds `at`; each following one must start where it ended.
            if e.file != file || !(e.start <= at && at < e.end()) || e.end() > limit {
                break;
            }
            let from = (at - e.start) as usize;
            let n = e.data.len() - from;
            if out.len() + n > max {
                break;
            }
            out.extend_from_slice(&e.data[from..]);
            at = e.end();
        }
        !out.is_empty()
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_whole_entries_in_order_and_stays_bounded() {
        let now = Instant::now();
        let mut r = Recent::default();
        let mut out = Vec::new();
        // Not wanted yet: nothing is kept.
        assert!(!r.wanted(now));
        assert!(!r.read(now, 1, 0, 100, 100, &mut out));
        assert!(r.wanted(now));
        r.push(1, 0, vec![1; 10]);
        r.push(1, 10, vec![2; 20]);
        r.push(1, 30, vec![3; 5]);
        // From inside the first entry: its rest and the following ones.
        assert!(r.read(now, 1, 4, 100, 100, &mut out));
        assert_eq!(out.len(), 31);
        assert_eq!(&out[..6], &[1; 6]);
        assert_eq!(&out[26..], &[3; 5]);
        // Bounded by `max` (whole entries only) and by `limit`.
        assert!(r.read(now, 1, 0, 100, 29, &mut out));
        assert_eq!(out, vec![1; 10]);
        assert!(r.read(now, 1, 0, 30, 100, &mut out));
        assert_eq!(out.len(), 30);
        // An entry larger than `max` alone: the file has to serve it.
        assert!(!r.read(now, 1, 10, 100, 19, &mut out));
        assert!(out.is_empty());
        // Not held: another file, or past the end.
        assert!(!r.read(now, 2, 0, 100, 100, &mut out));
        assert!(!r.read(now, 1, 35, 100, 100, &mut out));
        // The next logfile continues from 0; a gap empties the window.
        r.push(2, 0, vec![4; 8]);
        assert!(r.read(now, 1, 30, 100, 100, &mut out));
        assert_eq!(out, vec![3; 5]);
        assert!(r.read(now, 2, 0, 100, 100, &mut out));
        r.push(2, 100, vec![5; 8]);
        assert!(!r.read(now, 2, 0, 1000, 100, &mut out));
        assert!(r.read(now, 2, 100, 1000, 100, &mut out));
        // The cap drops the oldest entries.
        for i in 0..40u64 {
            r.push(2, 108 + i * (1 << 20), vec![6; 1 << 20]);
        }
        assert!(r.held() <= RECENT_CAP);
        assert!(!r.read(now, 2, 100, u64::MAX, usize::MAX, &mut out));
        // Unwanted again: emptied.
        assert!(!r.wanted(now + WANTED_FOR * 2));
        assert_eq!(r.held(), 0);
    }
}
