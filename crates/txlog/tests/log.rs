//! The transaction log against real files and against the crash-simulating in-memory directory.

use std::sync::Arc;
use std::time::Duration;

use mars_config::HostName;
use mars_storage::mem::MemDir;
use mars_storage::real::RealDir;
use mars_storage::{Dir, OpenMode};
use mars_txlog::{
    recover, replay, Appender, AppenderConfig, Kind, LogError, LogName, LogPos, LogReader, Record,
};

fn host() -> HostName {
    HostName::new("alpha").unwrap()
}

fn cfg(max_file_size: u64) -> AppenderConfig {
    AppenderConfig {
        max_file_size,
        group_delay: Duration::from_micros(200),
        ..AppenderConfig::default()
    }
}

fn all_records(dir: &dyn Dir) -> Vec<(LogPos, Record)> {
    let rec = recover(dir).unwrap();
    let mut out = Vec::new();
    replay::<LogError>(dir, &rec, LogPos::ZERO, |p, r| {
        out.push((p, r.clone()));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn append_sync_read_back_with_rotation() {
    let t = tempfile::tempdir().unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path()).unwrap());
    let log = Appender::start(dir.clone(), host(), 1, 0, cfg(10_000)).unwrap();
    let mut expect = Vec::new();
    for i in 0..100u64 {
        let data = vec![i as u8; 500 + i as usize];
        let a = log
            .append(Kind::Write, i * 4096, data.len() as u64, &data)
            .unwrap();
        expect.push((a.pos, data));
        if i % 10 == 0 {
            log.append(Kind::Zero, 1 << 30, 1 << 20, &[]).unwrap();
        }
    }
    let before = log.current_file();
    let new = log.rotate().unwrap();
    assert_eq!(new, before.no + 1);
    let end = log.close().unwrap();
    assert_eq!(end, LogPos::new(new, 0));

    let names = mars_txlog::list_logs(&*dir).unwrap();
    assert!(names.len() > 5, "rotation by size happened: {names:?}");
    assert_eq!(names.last().unwrap(), &LogName::new(new, host()));
    let recs = all_records(&*dir);
    let writes: Vec<_> = recs
        .iter()
        .filter(|(_, r)| r.header.kind == Kind::Write)
        .map(|(p, r)| (*p, r.payload.clone()))
        .collect();
    assert_eq!(writes, expect);
    // The borrowing reader (replay's) sees exactly the same records, payloads included.
    let rec = recover(&*dir).unwrap();
    let mut borrowed = Vec::new();
    for fc in &rec.files {
        let f = dir.open(&fc.name.to_string(), OpenMode::Existing).unwrap();
        let mut r = LogReader::new(f, &fc.name, 0, fc.valid_len, None);
        while let Some(x) = r.next_ref().unwrap() {
            let p = LogPos::new(fc.name.no, x.file_offset);
            borrowed.push((p, x.header, x.payload.to_vec()));
        }
    }
    let copied: Vec<_> = recs
        .iter()
        .map(|(p, r)| (*p, r.header, r.payload.clone()))
        .collect();
    assert_eq!(borrowed, copied);
    // Stamps strictly increase across the whole log; seq restarts at 1 per file.
    for w in recs.windows(2) {
        assert!(w[1].1.header.stamp > w[0].1.header.stamp);
        if w[1].0.file == w[0].0.file {
            assert_eq!(w[1].1.header.seq, w[0].1.header.seq + 1);
        } else {
            assert_eq!(w[1].1.header.seq, 1);
        }
    }
}

/// Bytes a file occupies on disk (its blocks, reservations included).
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn rotated_and_recovered_logfiles_give_back_their_reservation() {
    let t = tempfile::tempdir().unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path()).unwrap());
    // 64 MiB reserved per logfile (capped at an eighth of the free space: the test machine has
    // more than enough), a few KiB written into each.
    let reserve = 64 << 20;
    let log = Appender::start(dir.clone(), host(), 1, 0, cfg(reserve)).unwrap();
    let path = |no: u64| t.path().join(LogName::new(no, host()).to_string());
    let data = vec![7u8; 4096];
    let a = log.append(Kind::Write, 0, 4096, &data).unwrap();
    log.sync_to(a.end).unwrap();
    if allocated(&path(1)) < reserve / 2 {
        eprintln!("SKIPPED: this filesystem does not preallocate (fallocate KEEP_SIZE)");
        return;
    }
    let second = log.rotate().unwrap();
    let a = log.append(Kind::Write, 4096, 4096, &data).unwrap();
    log.sync_to(a.end).unwrap();
    // The rotated logfile keeps its bytes, not its reservation; the current one is reserved.
    assert!(allocated(&path(1)) < 1 << 20, "{}", allocated(&path(1)));
    assert!(allocated(&path(second)) >= reserve / 2);
    drop(log);
    // A crash leaves the current logfile reserved: recovery gives it back, content unchanged.
    let before = std::fs::read(path(second)).unwrap();
    let rec = recover(&*dir).unwrap();
    assert_eq!(rec.files.len(), 2);
    assert!(allocated(&path(second)) < 1 << 20);
    assert_eq!(std::fs::read(path(second)).unwrap(), before);
    assert_eq!(all_records(&*dir).len(), 2);
}

#[test]
fn group_commit_many_writers_few_syncs() {
    let dir = MemDir::new();
    let d: Arc<dyn Dir> = Arc::new(dir.clone());
    let log = Arc::new(Appender::start(d, host(), 1, 0, cfg(1 << 30)).unwrap());
    let before = dir.sync_points();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let a = log
                        .append(Kind::Write, (t * 1000 + i) * 512, 512, &[t as u8; 512])
                        .unwrap();
                    log.sync_to(a.end).unwrap(); // every write is FUA
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let syncs = dir.sync_points() - before;
    assert!(
        syncs < 1600,
        "{syncs} syncs for 1600 FUA writes: no grouping"
    );
    assert_eq!(all_records(&dir).len(), 1600);
}

fn write_log(dir: &MemDir, n: u64) -> Vec<LogPos> {
    let d: Arc<dyn Dir> = Arc::new(dir.clone());
    let log = Appender::start(d, host(), 1, 0, cfg(1 << 30)).unwrap();
    let pos = (0..n)
        .map(|i| {
            log.append(Kind::Write, i * 100, 100, &[7; 100])
                .unwrap()
                .pos
        })
        .collect();
    log.close().unwrap();
    pos
}

fn flip(dir: &MemDir, name: &str, at: u64) {
    let f = dir.open(name, OpenMode::Existing).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_at(&[b[0] ^ 0x40], at).unwrap();
}

#[test]
fn corruption_in_the_middle_names_file_and_offset() {
    let dir = MemDir::new();
    let pos = write_log(&dir, 20);
    // Damage the payload of record 10: recovery must refuse, naming where.
    flip(&dir, "log-000000001-alpha", pos[10].offset + 60);
    let before = dir.contents("log-000000001-alpha").unwrap();
    let err = recover(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, LogError::Corrupt { offset, .. } if *offset == pos[10].offset),
        "{msg}"
    );
    assert!(msg.contains("log-000000001-alpha"), "{msg}");
    assert!(msg.contains(&format!("offset {}", pos[10].offset)), "{msg}");
    // Nothing was changed by the refusal.
    assert_eq!(dir.contents("log-000000001-alpha").unwrap(), before);

    // Damage to a header's length field is caught the same way.
    let dir = MemDir::new();
    let pos = write_log(&dir, 20);
    flip(&dir, "log-000000001-alpha", pos[5].offset + 38);
    assert!(
        matches!(recover(&dir), Err(LogError::Corrupt { offset, .. }) if offset == pos[5].offset)
    );
}

#[test]
fn torn_tail_is_cut_silently() {
    for cut in [1u64, 10, 47, 48, 100, 147] {
        let dir = MemDir::new();
        let pos = write_log(&dir, 20);
        let f = dir.open("log-000000001-alpha", OpenMode::Existing).unwrap();
        let len = f.len().unwrap();
        f.set_len(len - cut).unwrap();
        // and garbage that is not a record after a torn header is still a torn tail
        let rec = recover(&dir).unwrap();
        assert_eq!(rec.files[0].records, 19, "cut {cut}");
        assert_eq!(rec.end(), pos[19]);
        assert!(rec.truncated.is_some());
        assert_eq!(f.len().unwrap(), pos[19].offset);
        // idempotent
        assert_eq!(recover(&dir).unwrap().truncated, None);
    }
}

#[test]
fn torn_tail_of_older_file_is_an_error() {
    let dir = MemDir::new();
    write_log(&dir, 5);
    let d: Arc<dyn Dir> = Arc::new(dir.clone());
    let log = Appender::start(d, host(), 2, 0, cfg(1 << 30)).unwrap();
    log.append(Kind::Write, 0, 3, b"abc").unwrap();
    log.close().unwrap();
    let f = dir.open("log-000000001-alpha", OpenMode::Existing).unwrap();
    f.set_len(f.len().unwrap() - 3).unwrap();
    assert!(matches!(
        recover(&dir),
        Err(LogError::TruncatedMiddle { .. })
    ));
}

#[test]
fn gaps_duplicates_and_bad_names_are_refused() {
    let dir = MemDir::new();
    dir.open("log-000000001-alpha", OpenMode::Create).unwrap();
    dir.open("log-000000003-alpha", OpenMode::Create).unwrap();
    assert!(matches!(recover(&dir), Err(LogError::Gap { .. })));
    let dir = MemDir::new();
    dir.open("log-000000001-alpha", OpenMode::Create).unwrap();
    dir.open("log-000000001-beta", OpenMode::Create).unwrap();
    assert!(matches!(recover(&dir), Err(LogError::Duplicate { .. })));
    let dir = MemDir::new();
    dir.open("log-1-alpha", OpenMode::Create).unwrap();
    assert!(matches!(recover(&dir), Err(LogError::BadName(_))));
}

/// Crash at every sync point: every record whose durability was confirmed before the crash is
/// in the recovered log, in order, and nothing else is invented.
#[test]
fn crash_at_every_sync_point_keeps_confirmed_records() {
    let dir = MemDir::new();
    dir.capture_crash_images();
    let d: Arc<dyn Dir> = Arc::new(dir.clone());
    let log = Appender::start(d, host(), 1, 0, cfg(3000)).unwrap();
    // (sync point count at confirmation, number of records confirmed)
    let mut confirmed = Vec::new();
    let mut appended = 0u64;
    for i in 0..120u64 {
        let payload = vec![(i % 251) as u8; 1 + (i as usize * 37) % 400];
        let a = log
            .append(Kind::Write, i * 1000, payload.len() as u64, &payload)
            .unwrap();
        appended += 1;
        if i % 7 == 3 {
            log.sync_to(a.end).unwrap();
            confirmed.push((dir.sync_points(), appended));
        }
        if i == 60 {
            log.rotate().unwrap();
            confirmed.push((dir.sync_points(), appended));
        }
    }
    log.close().unwrap();
    let images = dir.take_crash_images();
    assert!(images.len() > 20);
    for img in &images {
        let crashed = MemDir::from_image(img);
        let rec =
            recover(&crashed).unwrap_or_else(|e| panic!("sync point {}: {e}", img.sync_point));
        let mut got = Vec::new();
        replay::<LogError>(&crashed, &rec, LogPos::ZERO, |_, r| {
            got.push(r.header.offset / 1000);
            Ok(())
        })
        .unwrap();
        let must: u64 = confirmed
            .iter()
            .filter(|(sp, _)| *sp <= img.sync_point)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        assert!(
            got.len() as u64 >= must,
            "sync point {}: {} < {must}",
            img.sync_point,
            got.len()
        );
        assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>());
    }
}

/// A failing fdatasync must never be reported as durability: the waiter gets the error, and the
/// log refuses everything afterwards instead of pretending.
#[test]
fn sync_failure_fails_waiters_and_every_later_append() {
    let dir = MemDir::new();
    let d: Arc<dyn Dir> = Arc::new(dir.clone());
    let log = Appender::start(d, host(), 1, 0, cfg(1 << 30)).unwrap();
    let a = log.append(Kind::Write, 0, 3, b"abc").unwrap();
    log.sync_to(a.end).unwrap();
    dir.inject_faults(false, true);
    let b = log.append(Kind::Write, 3, 3, b"def").unwrap();
    let err = log.sync_to(b.end).unwrap_err();
    assert!(
        matches!(err, LogError::Failed(ref m) if m.contains("injected")),
        "{err}"
    );
    assert!(matches!(
        log.append(Kind::Write, 6, 1, b"g"),
        Err(LogError::Failed(_))
    ));
    assert!(log.durable() < b.end);
}

/// A full filesystem is not a failure of the log (MARS's emergency mode): waiters hear `Full`,
/// appends are refused with `Full`, the durable end stays where it was, and the log starts
/// again after a hole once there is space; what it could not take stays behind the hole.
#[test]
fn a_full_filesystem_stops_the_log_until_it_restarts_after_a_hole() {
    let dir = MemDir::new();
    let d: Arc<dyn Dir> = Arc::new(dir.clone());
    let log = Appender::start(d.clone(), host(), 1, 0, cfg(1 << 30)).unwrap();
    let a = log.append(Kind::Write, 0, 3, b"abc").unwrap();
    log.sync_to(a.end).unwrap();
    dir.fill_up(true);
    let b = log.append(Kind::Write, 3, 3, b"def").unwrap();
    let err = log.sync_to(b.end).unwrap_err();
    assert!(matches!(err, LogError::Full(_)), "{err}");
    assert!(log.full().is_some());
    assert!(matches!(
        log.append(Kind::Write, 6, 1, b"g"),
        Err(LogError::Full(_))
    ));
    assert!(matches!(log.rotate(), Err(LogError::Full(_))));
    assert_eq!(log.durable(), a.end);
    // What is durable stays readable; the lost record is not in the log.
    assert_eq!(all_records(&*d).len(), 1);
    dir.fill_up(false);
    let next = log.rotate_skipping(1).unwrap();
    assert_eq!(next, 3, "logfile 2 is the hole");
    assert!(log.full().is_none());
    let c = log.append(Kind::Write, 9, 3, b"xyz").unwrap();
    log.sync_to(c.end).unwrap();
    assert_eq!(c.pos, LogPos::new(3, 0));
    let names: Vec<u64> = mars_txlog::list_logs_unchecked(&*d)
        .unwrap()
        .iter()
        .map(|n| n.no)
        .collect();
    assert_eq!(names, vec![1, 3]);
}

/// Large records of odd sizes, appended by several writers with syncs in between, on a real
/// filesystem: the group commits write whole blocks past the page cache and rewrite partial
/// blocks whole (`segment.rs`); every record reads back intact, across a rotation.
#[test]
fn large_records_on_a_real_file_read_back_after_direct_group_commits() {
    let t = tempfile::tempdir().unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path()).unwrap());
    let log = Arc::new(Appender::start(dir.clone(), host(), 1, 0, cfg(8 << 20)).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|w| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..12u64 {
                    let len = 4096 * (1 + (w * 13 + i * 7) % 300) as usize + (i * 37 + w) as usize;
                    let data: Vec<u8> = (0..len).map(|b| (b as u64 * (w + 3) + i) as u8).collect();
                    let a = log
                        .append(Kind::Write, (w << 32) + i * (4 << 20), len as u64, &data)
                        .unwrap();
                    if i % 3 == w % 3 {
                        log.sync_to(a.end).unwrap();
                    }
                    mine.push((a.pos, data));
                }
                mine
            })
        })
        .collect();
    let mut expect: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    expect.sort_by_key(|(p, _)| *p);
    let log = Arc::try_unwrap(log).ok().expect("the writers are done");
    log.close().unwrap();
    assert!(mars_txlog::list_logs(&*dir).unwrap().len() > 1, "rotated");
    let got: Vec<_> = all_records(&*dir)
        .into_iter()
        .map(|(p, r)| (p, r.payload))
        .collect();
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "records differ after reading back");
}

/// The window of recent group commits gives exactly the logfile's bytes, whole records only,
/// across partial blocks and a rotation; it is empty until a reader asks, and never holds what
/// is not durable.
#[test]
fn the_recent_window_serves_the_files_bytes_once_asked() {
    let t = tempfile::tempdir().unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path()).unwrap());
    let log = Appender::start(dir.clone(), host(), 1, 0, cfg(200_000)).unwrap();
    let mut out = Vec::new();
    let write = |i: u64| {
        let data = vec![i as u8; 3000 + (i as usize * 37) % 5000];
        log.append(Kind::Write, i * 4096, data.len() as u64, &data)
            .unwrap()
    };
    let first = write(0);
    log.sync_all().unwrap();
    // Nobody asked: nothing kept.
    assert!(!log.read_recent(1, 0, first.end.offset, 1 << 20, &mut out));
    // Asked now: the following groups are kept (each sync a group of a few records).
    let mut from = log.durable();
    let mut got: Vec<(u64, u64, Vec<u8>)> = Vec::new();
    for i in 1..200u64 {
        write(i);
        if i % 3 == 0 {
            log.sync_all().unwrap();
            let d = log.durable();
            // Whole records from where the reader is, never beyond the durable end.
            while from < d {
                let limit = if d.file > from.file {
                    u64::MAX
                } else {
                    d.offset
                };
                if log.read_recent(from.file, from.offset, limit, 64 << 10, &mut out) {
                    let s = mars_txlog::format::scan(&out, None, true).unwrap();
                    assert_eq!(s.len, out.len(), "whole records");
                    got.push((from.file, from.offset, out.clone()));
                    from.offset += out.len() as u64;
                } else if from.file < d.file {
                    from = LogPos::new(from.file + 1, 0);
                } else {
                    panic!("the window lacks {from} below the durable end {d}");
                }
            }
        }
    }
    log.sync_all().unwrap();
    assert!(got.iter().map(|g| g.0).max().unwrap() > 1, "rotated");
    for (file, off, bytes) in &got {
        let f = dir
            .open(&LogName::new(*file, host()).to_string(), OpenMode::Existing)
            .unwrap();
        let mut back = vec![0u8; bytes.len()];
        f.read_exact_at(&mut back, *off).unwrap();
        assert_eq!(&back, bytes, "log {file} at {off}");
    }
    log.close().unwrap();
}
