//! The bytes just fetched, kept in memory for replay: when replay follows closely behind the
//! fetch (catching up, or in steady state), it takes its records from here instead of reading
//! the copy back from the file, so the copy is written once and never read (and can be
//! written past the page cache: `copies.rs`).
//!
//! A window over one copy: the verified chunks appended most recently, contiguous, at most
//! [`RECENT_CAP`] bytes (the oldest go first). Only bytes that are in the copy are in the
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
    /// The copy the chunks belong to.
    file: u64,
    /// `(offset in the copy, bytes)`, contiguous and ascending.
    chunks: VecDeque<(u64, Bytes)>,
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
    /// window (another copy, a gap) starts it anew.
    pub fn push(&self, file: u64, offset: u64, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let mut w = self.lock();
        if !w.open {
            return;
        }
        let continues = w.file == file
            && w.chunks
                .back()
                .is_some_and(|(o, b)| o + b.len() as u64 == offset);
        if !continues {
            w.chunks.clear();
            w.bytes = 0;
            w.file = file;
        }
        w.bytes += data.len();
        w.chunks.push_back((offset, data));
        while w.bytes > self.cap {
            let Some((_, b)) = w.chunks.pop_front() else {
                break;
            };
            w.bytes -= b.len();
        }
    }

    /// The bytes of copy `file` from `offset` to the end of the chunk that holds it, if the
    /// window has them.
    pub fn get(&self, file: u64, offset: u64) -> Option<Bytes> {
        let w = self.lock();
        if w.file != file {
            return None;
        }
        let i = w.chunks.partition_point(|(o, _)| *o <= offset);
        let (o, b) = w.chunks.get(i.checked_sub(1)?)?;
        let at = (offset - o) as usize;
        (at < b.len()).then(|| b.slice(at..))
    }

    /// Replay is done with copy `file` before `offset`: the chunks that end there go.
    pub fn release(&self, file: u64, offset: u64) {
        let mut w = self.lock();
        if w.file != file {
            return;
        }
        while let Some((o, b)) = w.chunks.front() {
            if o + b.len() as u64 > offset {
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
        // Another copy too.
        r.push(2, 0, Bytes::from(vec![5; 10]));
        assert_eq!(r.get(1, 200), None);
        r.push(2, 10, Bytes::from(vec![6; 10]));
        r.release(2, 15);
        assert_eq!(r.get(2, 5), None);
        assert_eq!(r.get(2, 15).unwrap().len(), 5);
        r.clear();
        assert_eq!(r.get(2, 15), None);
        r.push(2, 20, Bytes::from(vec![7; 10]));
        assert_eq!(r.bytes(), 10);
        r.close();
        r.push(2, 30, Bytes::from(vec![8; 10]));
        assert_eq!(r.bytes(), 0);
    }
}
