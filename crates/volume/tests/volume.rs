//! The volume against a model, against real files, and crashed at every sync point.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mars_config::HostName;
use mars_storage::mem::MemDir;
use mars_storage::real::{open_disk, RealDir};
use mars_storage::{Dir, File, OpenMode};
use mars_txlog::AppenderConfig;
use mars_volume::{Volume, VolumeConfig, VolumeError};
use proptest::prelude::*;

const SIZE: u64 = 64 << 10;

fn cfg(max_dirty: usize) -> VolumeConfig {
    VolumeConfig {
        max_dirty,
        writeback_interval: Duration::from_millis(1),
        log: AppenderConfig {
            max_file_size: 16 << 10,
            group_delay: Duration::from_micros(300),
            ..AppenderConfig::default()
        },
        ..VolumeConfig::new(HostName::new("alpha").unwrap(), SIZE)
    }
}

fn mem_disk(dir: &MemDir) -> Arc<dyn File> {
    let f = dir.open("disk", OpenMode::Create).unwrap();
    f.set_len(SIZE).unwrap();
    f.sync_data().unwrap();
    dir.sync().unwrap();
    f
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
    Flush,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIZE - 1, 1usize..3000, any::<u8>()).prop_map(|(o, n, b)| {
            let n = n.min((SIZE - o) as usize);
            Op::Write(o, (0..n).map(|i| b.wrapping_add(i as u8)).collect())
        }),
        1 => (0..SIZE - 1, 1u64..5000).prop_map(|(o, n)| Op::Zero(o, n.min(SIZE - o))),
        1 => (0..SIZE - 1, 1u64..5000).prop_map(|(o, n)| Op::Discard(o, n.min(SIZE - o))),
        1 => Just(Op::Flush),
    ]
}

fn apply_model(m: &mut [u8], op: &Op) {
    match op {
        Op::Write(o, d) => m[*o as usize..*o as usize + d.len()].copy_from_slice(d),
        Op::Zero(o, n) | Op::Discard(o, n) => m[*o as usize..(*o + *n) as usize].fill(0),
        Op::Flush => {}
    }
}

fn run(v: &Volume, op: &Op) {
    match op {
        Op::Write(o, d) => {
            v.write(*o, Bytes::from(d.clone()), false).unwrap();
        }
        Op::Zero(o, n) => {
            v.write_zeroes(*o, *n, false, false).unwrap();
        }
        Op::Discard(o, n) => {
            v.discard(*o, *n, false).unwrap();
        }
        Op::Flush => {
            v.flush().unwrap();
        }
    }
}

fn read_all(v: &Volume) -> Vec<u8> {
    let mut buf = vec![0xee; SIZE as usize];
    v.read(0, &mut buf).unwrap();
    buf
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    /// Reads always see the newest data, whatever writeback is doing, and a reopened volume
    /// holds the same bytes.
    #[test]
    fn reads_match_model(ops in proptest::collection::vec(arb_op(), 1..120), max_dirty in 2000usize..40000) {
        let dir = MemDir::new();
        let disk = mem_disk(&dir);
        let d: Arc<dyn Dir> = Arc::new(dir.clone());
        let (v, _) = Volume::open(cfg(max_dirty), d.clone(), disk.clone()).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        for (i, op) in ops.iter().enumerate() {
            run(&v, op);
            apply_model(&mut model, op);
            if i % 17 == 0 {
                prop_assert!(read_all(&v) == model);
            }
            if let Op::Write(o, data) = op {
                let mut b = vec![0; data.len()];
                v.read(*o, &mut b).unwrap();
                prop_assert!(&b == data);
            }
        }
        prop_assert!(read_all(&v) == model);
        v.close().unwrap();
        let (v, report) = Volume::open(cfg(max_dirty), d, disk.clone()).unwrap();
        prop_assert_eq!(report.replayed, 0, "clean close leaves nothing to replay");
        prop_assert!(read_all(&v) == model);
        let mut raw = vec![0; SIZE as usize];
        disk.read_exact_at(&mut raw, 0).unwrap();
        prop_assert!(raw == model, "everything written back at close");
    }
}

/// Crash at every sync point of a workload: the recovered device equals the state after some
/// prefix of the writes (the log is replayed in order), and that prefix includes every write
/// acknowledged before the last FLUSH or FUA that completed before the crash.
/// One random operation of the crash tests, on `v` and on its model `m`: a zeroing, a discard
/// or a write (FUA one write in eight), overlapping in a small hot zone most of the time.
/// Returns `Some(fua)` for a write, `None` for a zeroing or discard.
fn random_op(rng: &mut rand::rngs::StdRng, v: &Volume, m: &mut [u8]) -> Option<bool> {
    use rand::Rng;
    let hot = rng.gen_bool(0.6);
    let o = if hot {
        rng.gen_range(0..4096)
    } else {
        rng.gen_range(0..SIZE - 2048)
    };
    let n = rng.gen_range(1..2048u64);
    let range = o as usize..(o + n) as usize;
    match rng.gen_range(0..10) {
        0 => {
            v.write_zeroes(o, n, rng.gen(), false).unwrap();
            m[range].fill(0);
            None
        }
        1 => {
            v.discard(o, n, false).unwrap();
            m[range].fill(0);
            None
        }
        k => {
            let b: u8 = rng.gen();
            let data: Vec<u8> = (0..n).map(|i| b ^ (i as u8)).collect();
            let fua = k == 9;
            v.write(o, Bytes::from(data.clone()), fua).unwrap();
            m[range].copy_from_slice(&data);
            Some(fua)
        }
    }
}

#[test]
fn crash_at_every_sync_point_recovers_a_prefix_with_all_flushed_writes() {
    use rand::{Rng, SeedableRng};
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = MemDir::new();
        let disk = mem_disk(&dir);
        let d: Arc<dyn Dir> = Arc::new(dir.clone());
        dir.capture_crash_images();
        // Small memory bound: writeback and shadowed records happen constantly.
        let (v, _) = Volume::open(cfg(6000), d, disk).unwrap();
        let mut states = vec![vec![0u8; SIZE as usize]];
        // (sync point when confirmed, writes confirmed)
        let mut confirmed: Vec<(u64, usize)> = Vec::new();
        for _ in 0..300 {
            let mut m = states.last().unwrap().clone();
            if let Some(fua) = random_op(&mut rng, &v, &mut m) {
                states.push(m);
                if fua {
                    confirmed.push((dir.sync_points(), states.len() - 1));
                }
                continue;
            }
            states.push(m);
            if rng.gen_bool(0.1) {
                v.flush().unwrap();
                confirmed.push((dir.sync_points(), states.len() - 1));
            }
            if rng.gen_bool(0.01) {
                v.rotate().unwrap();
            }
        }
        v.close().unwrap();
        let images = dir.take_crash_images();
        assert!(images.len() > 50, "only {} sync points", images.len());
        for img in &images {
            let crashed = MemDir::from_image(img);
            let disk = crashed.open("disk", OpenMode::Existing).unwrap();
            let cd: Arc<dyn Dir> = Arc::new(crashed.clone());
            let (v, _) = Volume::open(cfg(6000), cd, disk)
                .unwrap_or_else(|e| panic!("seed {seed} sync point {}: {e}", img.sync_point));
            let got = read_all(&v);
            let must = confirmed
                .iter()
                .filter(|(sp, _)| *sp <= img.sync_point)
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0);
            let matching = (must..states.len()).find(|&k| states[k] == got);
            assert!(
                matching.is_some(),
                "seed {seed} sync point {}: recovered device is no prefix state >= {must}",
                img.sync_point
            );
            drop(v);
        }
    }
}

#[test]
fn real_files_survive_reopen_and_refuse_bad_input() {
    let t = tempfile::tempdir().unwrap();
    let disk_path = t.path().join("disk.img");
    std::fs::File::create(&disk_path)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path().join("res")).unwrap());
    let disk: Arc<dyn File> = open_disk(&disk_path).unwrap();
    let (v, _) = Volume::open(cfg(1 << 20), dir.clone(), disk.clone()).unwrap();
    v.write(100, Bytes::from_static(b"hello"), true).unwrap();
    assert!(matches!(
        v.write(SIZE - 2, Bytes::from_static(b"abc"), false),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.discard(u64::MAX, 2, false),
        Err(VolumeError::OutOfRange { .. })
    ));
    let mut b = [0u8; 5];
    v.read(100, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    // A process crash leaves exactly what is in the files now: copy them while the volume
    // runs, and recover from the copy.
    let crash = t.path().join("crash");
    std::fs::create_dir(&crash).unwrap();
    for e in std::fs::read_dir(t.path().join("res")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), crash.join(e.file_name())).unwrap();
    }
    std::fs::copy(&disk_path, crash.join("disk.img")).unwrap();
    let cdir: Arc<dyn Dir> = Arc::new(RealDir::open(&crash).unwrap());
    let cdisk: Arc<dyn File> = open_disk(&crash.join("disk.img")).unwrap();
    let (v2, report) = Volume::open(cfg(1 << 20), cdir, cdisk).unwrap();
    let mut b = [0u8; 5];
    v2.read(100, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    assert!(report.current.is_some());
    v2.close().unwrap();
    v.close().unwrap();

    let big = VolumeConfig::new(HostName::new("alpha").unwrap(), SIZE * 2);
    assert!(matches!(
        Volume::open(big, dir, disk),
        Err(VolumeError::DiskTooSmall { .. })
    ));
}

#[test]
fn reclaim_deletes_only_written_back_logfiles_and_recovery_still_works() {
    let dir = MemDir::new();
    let disk = mem_disk(&dir);
    let d: Arc<dyn Dir> = Arc::new(dir.clone());
    let (v, _) = Volume::open(cfg(1 << 20), d.clone(), disk.clone()).unwrap();
    for i in 0..40u64 {
        v.write(i * 1000, Bytes::from(vec![i as u8; 1000]), false)
            .unwrap();
        if i % 10 == 9 {
            v.rotate().unwrap();
        }
    }
    v.flush().unwrap();
    // Wait until writeback reached the current logfile.
    let current = v.status().current_log.no;
    for _ in 0..500 {
        if v.status().written_back.file == current {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let removed = v.reclaim_logs(None).unwrap();
    assert_eq!(removed.len() as u64, current - 1, "{removed:?}");
    let left = mars_txlog::list_logs(&dir).unwrap();
    assert_eq!(left.first().unwrap().no, current);
    let model: Vec<u8> = (0..SIZE)
        .map(|o| if o < 40_000 { (o / 1000) as u8 } else { 0 })
        .collect();
    assert!(read_all(&v) == model);
    // A crash now: recovery starts from the remaining logfiles.
    let crashed = MemDir::from_image(&dir.crash_image());
    let cdisk = crashed.open("disk", OpenMode::Existing).unwrap();
    let (v2, _) = Volume::open(cfg(1 << 20), Arc::new(crashed.clone()), cdisk).unwrap();
    assert!(read_all(&v2) == model);
    drop(v2);
    v.close().unwrap();
}

/// The backing disk starts failing: writeback stops and reports, nothing acknowledged is lost
/// (it is all in the log), new writes are refused with an error, and after the disk is
/// repaired a restart replays the log onto it.
#[test]
fn disk_write_errors_stop_writeback_without_losing_data() {
    let logdir = MemDir::new();
    let diskdir = MemDir::new();
    let disk = mem_disk(&diskdir);
    let d: Arc<dyn Dir> = Arc::new(logdir.clone());
    let (v, _) = Volume::open(cfg(1 << 20), d.clone(), disk.clone()).unwrap();
    v.write(0, Bytes::from_static(b"before"), true).unwrap();
    diskdir.inject_faults(true, false);
    v.write(100, Bytes::from_static(b"during"), true).unwrap();
    let mut failed = false;
    for _ in 0..500 {
        if v.status().error.is_some() {
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(failed, "writeback did not notice the failing disk");
    assert!(matches!(
        v.write(200, Bytes::from_static(b"after"), false),
        Err(VolumeError::WritebackFailed(_))
    ));
    assert!(v.status().error.unwrap().contains("injected"));
    assert!(v.close().is_err());
    diskdir.inject_faults(false, false);
    let (v, report) = Volume::open(cfg(1 << 20), d, disk).unwrap();
    assert!(report.replayed >= 1);
    let mut b = [0u8; 6];
    v.read(0, &mut b).unwrap();
    assert_eq!(&b, b"before");
    v.read(100, &mut b).unwrap();
    assert_eq!(&b, b"during");
    v.close().unwrap();
}

/// Emergency mode: after everything is written back, writes go straight to the disk (the log
/// stops growing); flushed ones survive a crash. Leaving it continues the log after a hole and
/// deletes the older logfiles; a reopen replays nothing and sees every write.
#[test]
fn passthrough_writes_bypass_the_log_and_survive_a_crash_and_the_log_restarts_after_a_hole() {
    let dir = MemDir::new();
    let disk = mem_disk(&dir);
    let d: Arc<dyn Dir> = Arc::new(dir.clone());
    let (v, _) = Volume::open(cfg(1 << 20), d.clone(), disk.clone()).unwrap();
    for i in 0..8u64 {
        v.write(i * 1000, Bytes::from(vec![i as u8 + 1; 1000]), false)
            .unwrap();
    }
    v.enter_passthrough(Duration::from_secs(10)).unwrap();
    assert!(v.passthrough());
    let log_before = v.status().appended;
    for i in 8..16u64 {
        v.write(i * 1000, Bytes::from(vec![i as u8 + 1; 1000]), false)
            .unwrap();
    }
    v.write_zeroes(0, 1000, false, false).unwrap();
    v.flush().unwrap();
    assert_eq!(v.status().appended, log_before, "the log did not grow");
    let model: Vec<u8> = (0..SIZE)
        .map(|o| match o {
            0..1000 => 0,
            o if o < 16_000 => (o / 1000) as u8 + 1,
            _ => 0,
        })
        .collect();
    assert!(read_all(&v) == model);
    // A crash now: the flushed passthrough writes are on the disk.
    let crashed = MemDir::from_image(&dir.crash_image());
    let cdisk = crashed.open("disk", OpenMode::Existing).unwrap();
    let (v2, _) = Volume::open(cfg(1 << 20), Arc::new(crashed), cdisk).unwrap();
    assert!(read_all(&v2) == model);
    drop(v2);
    // Leaving: a hole of one logfile number, older logfiles gone, logging again.
    let before = v.status().current_log.no;
    let next = v.restart_log_after_gap().unwrap();
    assert_eq!(next, before + 2);
    assert!(!v.passthrough());
    let names = mars_txlog::list_logs(&dir).unwrap();
    assert_eq!(names.iter().map(|n| n.no).collect::<Vec<_>>(), vec![next]);
    v.write(20_000, Bytes::from(vec![9u8; 1000]), true).unwrap();
    assert_eq!(v.status().durable.file, next);
    v.close().unwrap();
    let (v3, rep) = Volume::open(cfg(1 << 20), d, disk).unwrap();
    assert_eq!(rep.replayed, 0);
    let mut m = model;
    m[20_000..21_000].fill(9);
    assert!(read_all(&v3) == m);
    v3.close().unwrap();
}

/// The log's filesystem fills up (no file may grow): no write fails. The volume enters emergency
/// mode by itself: every record the log could not take goes to the disk, the marker is created,
/// then writes bypass the log and FLUSH syncs the disk. A crash at every sync point keeps every
/// flushed write; the recovered device is a state of the write sequence, except for at most one
/// sync point inside the switch, where each byte still holds its value of some state at or
/// after the last completed FLUSH (the block-device contract). A reopen in emergency mode
/// replays nothing; once space is back the log continues after a hole.
#[test]
fn a_full_filesystem_switches_to_emergency_mode_and_no_write_fails() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = MemDir::new();
        let disk = mem_disk(&dir);
        let d: Arc<dyn Dir> = Arc::new(dir.clone());
        dir.capture_crash_images();
        let (v, _) = Volume::open(cfg(6000), d.clone(), disk.clone()).unwrap();
        let told = Arc::new(AtomicBool::new(false));
        {
            let told = told.clone();
            v.on_emergency(Arc::new(move || told.store(true, Ordering::SeqCst)));
        }
        let mut states = vec![vec![0u8; SIZE as usize]];
        let mut confirmed: Vec<(u64, usize)> = Vec::new();
        for i in 0..300 {
            if i == 120 {
                dir.fill_up(true);
            }
            let mut m = states.last().unwrap().clone();
            let fua = random_op(&mut rng, &v, &mut m) == Some(true);
            states.push(m);
            if fua {
                confirmed.push((dir.sync_points(), states.len() - 1));
            } else if rng.gen_bool(0.1) {
                v.flush().unwrap();
                confirmed.push((dir.sync_points(), states.len() - 1));
            }
            if i < 120 && rng.gen_bool(0.01) {
                v.rotate().unwrap();
            }
        }
        v.flush().unwrap();
        assert!(v.passthrough(), "seed {seed}: no emergency mode");
        // The owner hears of it right after the switch (on the writeback thread).
        for _ in 0..500 {
            if told.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            told.load(Ordering::SeqCst),
            "seed {seed}: the owner was not told"
        );
        assert!(dir.contents(mars_volume::EMERGENCY_FILE).is_some());
        let now = read_all(&v);
        let want = states.last().unwrap();
        if let Some(at) = (0..now.len()).find(|&i| now[i] != want[i]) {
            let k = (0..states.len()).rev().find(|&k| states[k][at] == now[at]);
            panic!(
                "seed {seed}: byte {at} is {} (state {k:?}), want {}",
                now[at], want[at]
            );
        }
        let images = dir.take_crash_images();
        let mut mixed = 0;
        for img in &images {
            let crashed = MemDir::from_image(img);
            let cdisk = crashed.open("disk", OpenMode::Existing).unwrap();
            let (cv, rep) = Volume::open(cfg(6000), Arc::new(crashed.clone()), cdisk)
                .unwrap_or_else(|e| panic!("seed {seed} sync point {}: {e}", img.sync_point));
            assert_eq!(rep.emergency, cv.passthrough());
            if rep.emergency {
                assert_eq!(rep.replayed, 0);
            }
            let got = read_all(&cv);
            drop(cv);
            let must = confirmed
                .iter()
                .filter(|(sp, _)| *sp <= img.sync_point)
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0);
            if (must..states.len()).any(|k| states[k] == got) {
                continue;
            }
            mixed += 1;
            for (b, &g) in got.iter().enumerate() {
                assert!(
                    states[must..].iter().any(|s| s[b] == g),
                    "seed {seed} sync point {}: byte {b} holds no value written at or after \
                     the last FLUSH",
                    img.sync_point
                );
            }
        }
        assert!(
            mixed <= 1,
            "seed {seed}: {mixed} crash images are no state of the write sequence"
        );
        // Space is back: the log continues after a hole and holds the writes again.
        dir.fill_up(false);
        let before = v.status().current_log.no;
        let next = v.restart_log_after_gap().unwrap();
        assert!(next >= before + 2);
        assert!(!v.passthrough());
        assert!(dir.contents(mars_volume::EMERGENCY_FILE).is_none());
        let mut m = states.last().unwrap().clone();
        v.write(100, Bytes::from(vec![7u8; 500]), true).unwrap();
        m[100..600].fill(7);
        assert_eq!(v.status().durable.file, next);
        drop(v);
        let (v, rep) = Volume::open(cfg(6000), d, disk).unwrap();
        assert!(!rep.emergency);
        assert!(read_all(&v) == m, "seed {seed}: reopened device differs");
        v.close().unwrap();
    }
}

/// A page-aligned payload (what the NBD server and `/dev/mars` hand in for large writes), so
/// that writeback takes the O_DIRECT way.
struct AlignedPayload {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: uniquely owned plain memory.
unsafe impl Send for AlignedPayload {}
impl AlignedPayload {
    fn bytes(fill: impl Fn(usize) -> u8, len: usize) -> Bytes {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero layout; freed in drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `len` bytes we own.
        let s = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        for (i, b) in s.iter_mut().enumerate() {
            *b = fill(i);
        }
        Bytes::from_owner(AlignedPayload { ptr, len })
    }
}
impl AsRef<[u8]> for AlignedPayload {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}
impl Drop for AlignedPayload {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

/// Writeback joins adjacent pieces into one vectored write (direct when every piece is
/// aligned, buffered otherwise), split by zero ranges, overwrites and gaps: the disk must end
/// up exactly as the writes say, and so must a copy recovered from the files.
#[test]
fn adjacent_pieces_written_back_together_land_exactly() {
    const DISK: u64 = 8 << 20;
    let t = tempfile::tempdir().unwrap();
    let disk_path = t.path().join("disk.img");
    std::fs::File::create(&disk_path)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path().join("res")).unwrap());
    let disk: Arc<dyn File> = open_disk(&disk_path).unwrap();
    let config = VolumeConfig {
        max_dirty: 64 << 20,
        // Long enough for a whole sequence to be written back in one batch.
        writeback_interval: Duration::from_millis(200),
        ..VolumeConfig::new(HostName::new("alpha").unwrap(), DISK)
    };
    let (v, _) = Volume::open(config, dir, disk).unwrap();
    let mut model = vec![0u8; DISK as usize];
    let write = |off: u64, data: Bytes, model: &mut Vec<u8>| {
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        v.write(off, data, false).unwrap();
    };
    // Sixteen adjacent aligned 256 KiB pieces (4 MiB: one run, direct).
    for i in 0..16u64 {
        let b = AlignedPayload::bytes(|k| (k as u64 * 7 + i) as u8, 256 << 10);
        write(i * (256 << 10), b, &mut model);
    }
    // An overwrite in the middle of that run, aligned but small (the run is cut there).
    write(
        1 << 20,
        AlignedPayload::bytes(|k| (k % 13) as u8 + 100, 64 << 10),
        &mut model,
    );
    // Adjacent unaligned small pieces at an odd offset (one buffered run), more than one
    // pwritev takes in a run.
    for i in 0..300u64 {
        let data: Vec<u8> = (0..1000).map(|k| (k as u64 + i * 3) as u8).collect();
        write((5 << 20) + 17 + i * 1000, Bytes::from(data), &mut model);
    }
    // A zero range splitting adjacent pieces, and a piece right after it.
    v.write_zeroes((5 << 20) + 17 + 50_000, 10_000, false, false)
        .unwrap();
    model[(5 << 20) + 17 + 50_000..(5 << 20) + 17 + 60_000].fill(0);
    write(
        (5 << 20) + 17 + 60_000,
        Bytes::from(vec![0xee; 5000]),
        &mut model,
    );
    v.flush().unwrap();
    v.close().unwrap();
    let on_disk = std::fs::read(&disk_path).unwrap();
    assert!(on_disk == model, "the disk differs from the writes");
}
