//! The bytes just fetched, kept in memory for replay: when replay follows closely behind the
//! fetch (catching up, or in steady state), it takes its records from here instead of reading
//! the copy back from the file, so the copy is written once and never read (and can be
//! written past the page cache: `copies.rs`).
//!
//! A window over the copies: the verified chunks appended most recently, contiguous, at most
//! [`RECENT_CAP`] bytes (the oldest go first). Contiguous means: each chunk continues the one
//! before it in the same copy, or starts a later copy at offset 0 — the fetch moving on to the
//! next logfile keeps the previous copy's tail in the window, which replay is still behind on
//! (without that, replay read the last 100 MiB or so of every logfile back from the disk). Only bytes that are in the copy are in the
//! window: the appender adds a chunk after writing it, and every cut or removal of copies
//! empties it ([`crate::Copies`]). Replay only asks for bytes below the copy's durable length,
//! so what it finds here is exactly what the file holds. After a restart, or when replay lags
//! by more than the window, it reads the file as before.
//!
//! Only while replay follows a running fetch: the window is filled only while a fetch session
//! holds it open ([`Recent::open`]), and emptied when that session ends or a replay run is
//! stopped ([`Recent::close`]). A replica whose fetch or replay was paused therefore replays
//! from the copy, where damage done to the file meanwhile is found as before.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

/// Most bytes the window holds. Replay lags the fetch by one sync batch of the fetch plus its
/// own batch; twice that and some is enough.
pub const RECENT_CAP: usize = 256 << 20;

/// See the module docs.
#[derive(Debug)]
pub struct Recent {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// A fetch session fills the window ([`Recent::open`]).
    open: bool,
    /// `(copy, offset in the copy, bytes)`, contiguous (see the module docs) and ascending.
    chunks: VecDeque<(u64, u64, Bytes)>,
    bytes: usize,
}

impl Default for Recent {
    fn default() -> Self {
        Self::new(RECENT_CAP)
    }
}

impl Recent {
    /// A window of at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `data` was written at `offset` of copy `file`. A chunk that does not continue the
    /// window (a gap, an earlier copy, a later copy not at its start) starts it anew.
    pub fn push(&self, file: u64, offset: u64, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let mut w = self.lock();
        if !w.open {
            return;
        }
        let continues = w.chunks.back().is_some_and(|(f, o, b)| {
            (*f == file && o + b.len() as u64 == offset) || (file > *f && offset == 0)
        });
        if !continues {
            w.chunks.clear();
            w.bytes = 0;
        }
        w.bytes += data.len();
        w.chunks.push_back((file, offset, data));
        while w.bytes > self.cap {
            let Some((_, _, b)) = w.chunks.pop_front() else {
                break;
            };
            w.bytes -= b.len();
        }
    }

    /// The bytes of copy `file` from `offset` to the end of the chunk that holds it, if the
    /// window has them.
    pub fn get(&self, file: u64, offset: u64) -> Option<Bytes> {
        let w = self.lock();
        let i = w
            .chunks
            .partition_point(|(f, o, _)| (*f, *o) <= (file, offset));
        let (f, o, b) = w.chunks.get(i.checked_sub(1)?)?;
        if *f != file {
            return None;
        }
        let at = (offset - o) as usize;
        (at < b.len()).then(|| b.slice(at..))
    }

    /// Replay is done with copy `file` before `offset` (and so with every earlier copy): the
    /// chunks that end there go.
    pub fn release(&self, file: u64, offset: u64) {
        let mut w = self.lock();
        while let Some((f, o, b)) = w.chunks.front() {
            if *f > file || (*f == file && o + b.len() as u64 > offset) {
                break;
            }
            let n = b.len();
            w.chunks.pop_front();
            w.bytes -= n;
        }
    }

    /// A fetch session starts filling the window.
    pub fn open(&self) {
        let mut w = self.lock();
        w.chunks.clear();
        w.bytes = 0;
        w.open = true;
    }

    /// The fetch session ended or replay was stopped: the window is emptied and stays empty
    /// until the next [`Recent::open`].
    pub fn close(&self) {
        let mut w = self.lock();
        w.chunks.clear();
        w.bytes = 0;
        w.open = false;
    }

    /// Forgets everything (a copy was cut or removed).
    pub fn clear(&self) {
        let mut w = self.lock();
        w.chunks.clear();
        w.bytes = 0;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_keeps_the_newest_contiguous_bytes() {
        let r = Recent::new(100);
        // Closed: nothing is kept.
        r.push(1, 0, Bytes::from(vec![1; 40]));
        assert_eq!(r.get(1, 0), None);
        r.open();
        r.push(1, 0, Bytes::from(vec![1; 40]));
        r.push(1, 40, Bytes::from(vec![2; 40]));
        assert_eq!(r.get(1, 10).unwrap().len(), 30);
        assert_eq!(r.get(1, 40).unwrap()[0], 2);
        assert_eq!(r.get(1, 80), None);
        assert_eq!(r.get(2, 0), None);
        // Over the cap: the oldest chunk goes.
        r.push(1, 80, Bytes::from(vec![3; 40]));
        assert_eq!(r.get(1, 10), None);
        assert_eq!(r.get(1, 50).unwrap().len(), 30);
        // A gap starts anew.
        r.push(1, 200, Bytes::from(vec![4; 10]));
        assert_eq!(r.get(1, 50), None);
        assert_eq!(r.bytes(), 10);
        // The next copy from its start continues the window: the previous copy's tail stays
        // for replay, which is behind.
        r.push(2, 0, Bytes::from(vec![5; 10]));
        assert_eq!(r.get(1, 205).unwrap().len(), 5);
        assert_eq!(r.get(2, 3).unwrap()[..], [5; 7]);
        assert_eq!(r.get(1, 210), None);
        r.push(2, 10, Bytes::from(vec![6; 10]));
        // Done with copy 2 before 15: copy 1 goes as well.
        r.release(2, 15);
        assert_eq!(r.get(1, 205), None);
        assert_eq!(r.get(2, 5), None);
        assert_eq!(r.get(2, 15).unwrap().len(), 5);
        r.clear();
        assert_eq!(r.get(2, 15), None);
        r.push(2, 20, Bytes::from(vec![7; 10]));
        assert_eq!(r.bytes(), 10);
        // Not at its start, an earlier copy, or the same offset again: anew.
        r.push(3, 5, Bytes::from(vec![9; 10]));
        assert_eq!(r.get(2, 20), None);
        assert_eq!(r.bytes(), 10);
        r.push(1, 0, Bytes::from(vec![9; 10]));
        assert_eq!(r.get(3, 5), None);
        assert_eq!(r.bytes(), 10);
        r.push(1, 0, Bytes::from(vec![8; 10]));
        assert_eq!(r.bytes(), 10);
        assert_eq!(r.get(1, 0).unwrap()[0], 8);
        r.close();
        r.push(2, 30, Bytes::from(vec![8; 10]));
        assert_eq!(r.bytes(), 0);
    }
}
