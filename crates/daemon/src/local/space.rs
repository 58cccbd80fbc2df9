//! What the logfiles of a resource directory take of the root filesystem, how fast they grow,
//! and the stamp of the record at a log position (for lag in seconds). Blocking file-system
//! reads only; the layers above call them on blocking threads.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mars_config::HostName;
use mars_txlog::format::{HEADER_LEN, MAGIC, OFF_MAGIC, OFF_STAMP};
use mars_txlog::{LogName, LogPos};

/// The logfiles of one directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogUsage {
    pub logfiles: u64,
    /// Their lengths.
    pub log_bytes: u64,
    /// Allocated on disk beyond their lengths (`fallocate` with `KEEP_SIZE` ahead of the
    /// writer): already taken from the free space, not yet holding records.
    pub preallocated_bytes: u64,
}

/// One logfile: its name and length.
struct Entry {
    name: LogName,
    path: PathBuf,
    len: u64,
    allocated: u64,
}

fn entries(dir: &Path) -> Vec<Entry> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return v;
    };
    for e in rd.flatten() {
        let Ok(Some(name)) = LogName::parse(&e.file_name().to_string_lossy()) else {
            continue;
        };
        let Ok(m) = e.metadata() else { continue };
        v.push(Entry {
            name,
            path: e.path(),
            len: m.len(),
            // st_blocks counts 512-byte units whatever the filesystem's block size.
            allocated: m.blocks() * 512,
        });
    }
    v.sort_by(|a, b| (a.name.no, &a.name.host).cmp(&(b.name.no, &b.name.host)));
    v
}

/// One listing of a resource directory's logfiles, for several questions about them.
pub struct Logfiles(Vec<Entry>);

impl Logfiles {
    pub fn scan(dir: &Path) -> Logfiles {
        Logfiles(entries(dir))
    }

    /// What the logfiles take.
    pub fn usage(&self) -> LogUsage {
        let mut u = LogUsage::default();
        for e in &self.0 {
            u.logfiles += 1;
            u.log_bytes += e.len;
            u.preallocated_bytes += e.allocated.saturating_sub(e.len);
        }
        u
    }

    /// The stamp (Lamport nanoseconds since the Unix epoch, `txlog::format`) of the record
    /// that starts at `pos` in the logfile of that number, or of the first record of the next
    /// logfile when `pos` is at the end of its file. Among several files of one number (a
    /// split brain leaves them) the one of `origin` wins. `None`: no such record here.
    pub fn stamp_at(&self, pos: LogPos, origin: Option<&HostName>) -> Option<u64> {
        let all = &self.0;
        let pick = |no: u64| {
            let mut same: Vec<&Entry> = all.iter().filter(|e| e.name.no == no).collect();
            if same.len() > 1 {
                if let Some(o) = origin {
                    same.retain(|e| e.name.host == *o);
                }
            }
            same.first().copied()
        };
        let e = pick(pos.file)?;
        let (e, offset) = if pos.offset + HEADER_LEN as u64 <= e.len {
            (e, pos.offset)
        } else {
            // At (or within a header of) the end: the next record is the next logfile's first.
            let next = all.iter().map(|e| e.name.no).find(|n| *n > pos.file)?;
            (pick(next)?, 0)
        };
        let f = std::fs::File::open(&e.path).ok()?;
        let mut h = [0u8; HEADER_LEN];
        f.read_exact_at(&mut h, offset).ok()?;
        if h[OFF_MAGIC..OFF_MAGIC + 4] != MAGIC {
            return None;
        }
        Some(u64::from_le_bytes(
            h[OFF_STAMP..OFF_STAMP + 8].try_into().expect("8 bytes"),
        ))
    }
}

/// How fast logfiles grow: every logfile's length is compared with the last sample; what was
/// appended (or fetched) counts, a deleted file does not count against it.
#[derive(Debug, Default)]
pub struct Growth {
    last: Option<(Instant, BTreeMap<PathBuf, u64>)>,
    /// Bytes per second, exponentially averaged.
    rate: f64,
}

/// Weight of the newest sample in the average: with one sample every 5 s, a sample's weight
/// halves in about half a minute.
const ALPHA: f64 = 0.1;

impl Growth {
    /// Takes a sample of the logfiles in `dirs` at `now`.
    pub fn sample(&mut self, now: Instant, dirs: &[PathBuf]) {
        let mut lens = BTreeMap::new();
        for d in dirs {
            for e in entries(d) {
                lens.insert(e.path, e.len);
            }
        }
        if let Some((then, before)) = &self.last {
            let secs = now.duration_since(*then).as_secs_f64();
            if secs > 0.0 {
                let grown: u64 = lens
                    .iter()
                    .map(|(p, len)| len.saturating_sub(before.get(p).copied().unwrap_or(0)))
                    .sum();
                let r = grown as f64 / secs;
                self.rate = if self.rate == 0.0 && r > 0.0 {
                    // The first growth counts fully: a sudden load shows at once.
                    r
                } else {
                    ALPHA * r + (1.0 - ALPHA) * self.rate
                };
                // Below a byte per second the estimate is noise: not growing.
                if self.rate < 1.0 {
                    self.rate = 0.0;
                }
            }
        }
        self.last = Some((now, lens));
    }

    /// Bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(stamp: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; HEADER_LEN + len];
        v[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC);
        v[OFF_STAMP..OFF_STAMP + 8].copy_from_slice(&stamp.to_le_bytes());
        v
    }

    #[test]
    fn stamp_at_a_position_and_across_the_end_of_a_logfile() {
        let d = tempfile::tempdir().unwrap();
        let mut f1 = record(100, 16);
        f1.extend(record(200, 0));
        std::fs::write(d.path().join("log-000000001-a"), &f1).unwrap();
        std::fs::write(d.path().join("log-000000002-a"), record(300, 0)).unwrap();
        let at = |file, offset| Logfiles::scan(d.path()).stamp_at(LogPos { file, offset }, None);
        assert_eq!(at(1, 0), Some(100));
        assert_eq!(at(1, (HEADER_LEN + 16) as u64), Some(200));
        assert_eq!(at(1, f1.len() as u64), Some(300));
        assert_eq!(at(2, HEADER_LEN as u64), None);
        assert_eq!(at(3, 0), None);
        // Not a record start: no stamp rather than a wrong one.
        assert_eq!(at(1, 1), None);
        let u = Logfiles::scan(d.path()).usage();
        assert_eq!((u.logfiles, u.log_bytes), (2, f1.len() as u64 + 48));
    }

    #[test]
    fn growth_counts_appends_not_deletions() {
        let d = tempfile::tempdir().unwrap();
        let dirs = vec![d.path().to_path_buf()];
        let t = Instant::now();
        let mut g = Growth::default();
        std::fs::write(d.path().join("log-000000001-a"), vec![0u8; 1000]).unwrap();
        g.sample(t, &dirs);
        assert_eq!(g.rate(), 0.0);
        std::fs::write(d.path().join("log-000000001-a"), vec![0u8; 6000]).unwrap();
        g.sample(t + Duration::from_secs(5), &dirs);
        assert_eq!(g.rate(), 1000.0);
        // The old file deleted, a new one with 5000 bytes: still 1000/s, not negative.
        std::fs::remove_file(d.path().join("log-000000001-a")).unwrap();
        std::fs::write(d.path().join("log-000000002-a"), vec![0u8; 5000]).unwrap();
        g.sample(t + Duration::from_secs(10), &dirs);
        assert!((g.rate() - 1000.0).abs() < 1e-6, "{}", g.rate());
        // Nothing more: it decays towards 0.
        for i in 3..200 {
            g.sample(t + Duration::from_secs(5 * i), &dirs);
        }
        assert_eq!(g.rate(), 0.0);
    }
}
