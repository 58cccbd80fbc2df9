//! The in-memory index of data that is in the log but not yet on the backing disk.
//!
//! A map from device offset to non-overlapping extents; a newer write cuts older extents where it
//! overlaps, so the index always holds exactly the newest version of every byte it covers (this
//! is the "coalescing": an overwritten range is written back once, with its final contents).
//! Beside it a queue of records in log order tells writeback what became durable.
//!
//! One subtlety makes crash recovery correct: when a record R that is not yet written back is cut
//! by a newer record S, R's bytes in the overlap are gone from memory. If writeback then applied
//! R (durable) but S was not yet durable, the disk would lack R's bytes there, and a writeback
//! position past R would lose them at a crash. So every cut is remembered in `shadowed`
//! (R → newest S that cut it) and the persisted position never passes R until S itself has
//! been written back; recovery then replays R and S again from the log.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use mars_txlog::LogPos;

/// What an extent reads as.
#[derive(Debug, Clone)]
pub enum Data {
    Bytes(Bytes),
    /// Zeros; `punch` = the backing store may deallocate the range.
    Zero {
        punch: bool,
    },
}

impl Data {
    fn slice(&self, from: usize, to: usize) -> Data {
        match self {
            Data::Bytes(b) => Data::Bytes(b.slice(from..to)),
            Data::Zero { punch } => Data::Zero { punch: *punch },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Extent {
    pub end: u64,
    /// Position of the record this piece comes from (unique per record).
    pub rec: LogPos,
    pub data: Data,
}

/// A record waiting for writeback.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    pub rec: LogPos,
    /// Position just after the record: it may be written back once the log is durable there.
    pub rec_end: LogPos,
    pub start: u64,
    pub end: u64,
    /// Bytes of memory the record holds (its payload length).
    pub mem: usize,
}

/// A piece of data to write to the disk.
#[derive(Debug, Clone)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub rec: LogPos,
    pub data: Data,
}

#[derive(Debug, Default)]
pub struct Index {
    map: BTreeMap<u64, Extent>,
    queue: VecDeque<Pending>,
    /// Record R → end of the newest record that cut R while R was still pending.
    shadowed: BTreeMap<LogPos, LogPos>,
    /// Memory held by pending records.
    pub mem: usize,
    /// Newest target handed out by `collect`.
    last_position: LogPos,
}

impl Index {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
    pub fn pending_records(&self) -> usize {
        self.queue.len()
    }
    #[cfg(test)]
    pub fn extents(&self) -> usize {
        self.map.len()
    }

    /// Records a new write of `data` over `[start, end)` from the record at `rec`.
    pub fn insert(&mut self, start: u64, end: u64, rec: LogPos, rec_end: LogPos, data: Data) {
        debug_assert!(start < end);
        self.cut(start, end, rec_end);
        let mem = match &data {
            Data::Bytes(b) => b.len(),
            Data::Zero { .. } => 0,
        };
        self.map.insert(start, Extent { end, rec, data });
        self.queue.push_back(Pending {
            rec,
            rec_end,
            start,
            end,
            mem,
        });
        self.mem += mem;
    }

    /// Removes `[start, end)` from the map, keeping what sticks out on either side.
    fn cut(&mut self, start: u64, end: u64, by: LogPos) {
        // An extent that starts before `start` and reaches into the range.
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            if e.end > start {
                let e = e.clone();
                let keep_left = e.data.slice(0, (start - s) as usize);
                self.note_shadow(e.rec, by);
                self.map.insert(
                    s,
                    Extent {
                        end: start,
                        rec: e.rec,
                        data: keep_left,
                    },
                );
                self.keep_right(s, &e, end);
            }
        }
        // Extents starting inside the range.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let e = self.map.remove(&s).expect("listed");
            self.note_shadow(e.rec, by);
            self.keep_right(s, &e, end);
        }
    }

    /// Re-inserts the part of extent `e` (starting at `s`) that lies beyond `end`, if any.
    fn keep_right(&mut self, s: u64, e: &Extent, end: u64) {
        if e.end > end {
            let right = e.data.slice((end - s) as usize, (e.end - s) as usize);
            self.map.insert(
                end,
                Extent {
                    end: e.end,
                    rec: e.rec,
                    data: right,
                },
            );
        }
    }

    fn note_shadow(&mut self, rec: LogPos, by: LogPos) {
        let v = self.shadowed.entry(rec).or_insert(by);
        if *v < by {
            *v = by;
        }
    }

    /// Copies what the index holds for `[off, off+buf.len())` into `buf`; returns the sub-ranges
    /// (absolute offsets) it does *not* cover, which must be read from the disk.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Vec<(u64, u64)> {
        let end = off + buf.len() as u64;
        let mut gaps = Vec::new();
        let mut cursor = off;
        let first = self
            .map
            .range(..=off)
            .next_back()
            .filter(|(_, e)| e.end > off)
            .map(|(&s, e)| (s, e));
        let rest = self
            .map
            .range(off.saturating_add(1)..end)
            .map(|(&s, e)| (s, e));
        for (s, e) in first.into_iter().chain(rest) {
            let a = s.max(off);
            let b = e.end.min(end);
            if a > cursor {
                gaps.push((cursor, a));
            }
            let dst = &mut buf[(a - off) as usize..(b - off) as usize];
            match &e.data {
                Data::Bytes(d) => dst.copy_from_slice(&d[(a - s) as usize..(b - s) as usize]),
                Data::Zero { .. } => dst.fill(0),
            }
            cursor = b;
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
        gaps
    }

    /// Takes the records that are durable in the log (`rec_end <= durable`) off the queue and
    /// returns the pieces of them still current, sorted by device offset, plus the position up to
    /// which the disk will be complete once the pieces are written (see the module docs).
    pub fn collect(&mut self, durable: LogPos, max_bytes: usize) -> Collected {
        let mut pieces = Vec::new();
        let mut target = None;
        let mut mem = 0;
        let mut records = 0;
        let mut bytes = 0usize;
        while let Some(p) = self.queue.front() {
            if p.rec_end > durable || (bytes >= max_bytes && target.is_some()) {
                break;
            }
            let p = self.queue.pop_front().expect("front exists");
            mem += p.mem;
            records += 1;
            target = Some(p.rec_end);
            let first = self
                .map
                .range(..=p.start)
                .next_back()
                .filter(|(_, e)| e.end > p.start)
                .map(|(&s, e)| (s, e));
            let rest = self.map.range(p.start + 1..p.end).map(|(&s, e)| (s, e));
            for (s, e) in first.into_iter().chain(rest) {
                if e.rec == p.rec {
                    bytes += (e.end - s) as usize;
                    pieces.push(Piece {
                        start: s,
                        end: e.end,
                        rec: e.rec,
                        data: e.data.clone(),
                    });
                }
            }
        }
        pieces.sort_by_key(|p| p.start);
        // With nothing left pending, every record before `durable` is covered: the position may
        // move to `durable` itself, e.g. into a new logfile after a rotation, so that the old
        // logfile counts as written back.
        let target = match target {
            _ if self.queue.is_empty() && durable > self.last_position => Some(durable),
            t => t,
        };
        let Some(target) = target else {
            return Collected::default();
        };
        self.last_position = target;
        // Cuts by records that are now being written back are resolved.
        self.shadowed.retain(|_, by| *by > target);
        let position = match self.shadowed.keys().next() {
            Some(&r) if r < target => r,
            _ => target,
        };
        Collected {
            pieces,
            position: Some(position),
            mem,
            records,
        }
    }

    /// Forgets every extent once all records are written back (emergency mode: writes go to the
    /// disk and reads must see them there). An extent can outlive its record: when a newer write
    /// cut it while its piece was being written, `release` leaves the part that stayed; it reads
    /// right as long as newer writes come through the index, which they no longer do.
    pub fn forget_written_back(&mut self) {
        debug_assert!(self.queue.is_empty());
        self.map.clear();
        self.shadowed.clear();
    }

    /// Drops the written pieces from the map (unless a newer write replaced them meanwhile) and
    /// releases the memory of the collected records.
    pub fn release(&mut self, c: &Collected) {
        for p in &c.pieces {
            if self
                .map
                .get(&p.start)
                .is_some_and(|e| e.rec == p.rec && e.end == p.end)
            {
                self.map.remove(&p.start);
            }
        }
        self.mem -= c.mem;
    }
}

/// One writeback batch.
#[derive(Debug, Default)]
pub struct Collected {
    pub pieces: Vec<Piece>,
    /// Position to persist once the pieces are on disk and synced.
    pub position: Option<LogPos>,
    mem: usize,
    /// Records taken off the queue.
    pub records: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u64) -> LogPos {
        LogPos::new(1, n * 100)
    }

    fn ins(ix: &mut Index, n: u64, start: u64, data: &[u8]) {
        ix.insert(
            start,
            start + data.len() as u64,
            p(n),
            p(n + 1),
            Data::Bytes(Bytes::copy_from_slice(data)),
        );
    }

    #[test]
    fn newest_wins_and_gaps_are_reported() {
        let mut ix = Index::default();
        ins(&mut ix, 1, 10, b"aaaaaaaaaa"); // 10..20
        ins(&mut ix, 2, 14, b"bb"); // 14..16
        ix.insert(18, 25, p(3), p(4), Data::Zero { punch: false });
        let mut buf = [b'.'; 30];
        let gaps = ix.read(0, &mut buf);
        assert_eq!(gaps, vec![(0, 10), (25, 30)]);
        assert_eq!(&buf[10..25], b"aaaabbaa\0\0\0\0\0\0\0");
        assert_eq!(ix.extents(), 4);
    }

    #[test]
    fn position_waits_for_shadowing_record() {
        let mut ix = Index::default();
        ins(&mut ix, 1, 0, b"xxxx");
        ins(&mut ix, 2, 2, b"yy"); // cuts record 1
                                   // Only record 1 is durable: its remaining piece is written, but the position must stay
                                   // at record 1 because record 2 (which hides part of it) is not on disk.
        let c = ix.collect(p(2), usize::MAX);
        assert_eq!(c.pieces.len(), 1);
        assert_eq!((c.pieces[0].start, c.pieces[0].end), (0, 2));
        assert_eq!(c.position, Some(p(1)));
        ix.release(&c);
        let c = ix.collect(p(3), usize::MAX);
        assert_eq!(c.position, Some(p(3)));
        ix.release(&c);
        assert!(ix.is_empty());
        assert_eq!(ix.mem, 0);
        assert_eq!(ix.extents(), 0);
    }
}
