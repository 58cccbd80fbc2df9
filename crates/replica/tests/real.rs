//! The same operations on real files (`mars_storage::real`): what a restart of the daemon
//! finds in a resource directory.

use std::sync::Arc;

use mars_config::HostName;
use mars_replica::control::{self, Marker, SyncFile};
use mars_replica::{Copies, Replay};
use mars_storage::real::{open_disk, RealDir};
use mars_storage::{Dir, File};
use mars_txlog::format::{encode, Header};
use mars_txlog::{Kind, LogName, LogPos};

#[test]
fn real_directory_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path().join("resource-r")).unwrap());
    let disk_path = t.path().join("disk.img");
    std::fs::File::create(&disk_path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk = open_disk(&disk_path).unwrap();
    let alpha = HostName::new("alpha").unwrap();

    // Control files.
    control::write_sync(&*dir, &SyncFile::pending(0, 1 << 20)).unwrap();
    control::write_needs_sync(&*dir, "why").unwrap();
    control::set_marker(&*dir, Marker::Replica, true).unwrap();
    control::write_chain_start(&*dir, 7).unwrap();
    let st = control::read_all(&*dir).unwrap();
    assert_eq!(st.sync, Some(SyncFile::pending(0, 1 << 20)));
    assert_eq!(st.needs_sync.as_deref(), Some("why"));
    assert!(st.replica && !st.force_primary && !st.emergency);
    assert_eq!(st.chain_start, Some(7));
    control::remove_needs_sync(&*dir).unwrap();
    control::set_marker(&*dir, Marker::Replica, false).unwrap();
    assert!(!t.path().join("resource-r/replica").exists());
    assert!(!t.path().join("resource-r/needs-sync").exists());

    // A copy: appended, synced, reopened, replayed.
    let (mut c, _) = Copies::open(dir.clone()).unwrap();
    let mut app = c.append(1, &alpha).unwrap();
    let mut chunk = Vec::new();
    for seq in 1..=3u64 {
        let h = Header {
            kind: Kind::Write,
            seq,
            stamp: seq,
            offset: seq * 4096,
            len: 512,
        };
        encode(&h, &[seq as u8; 512], &mut chunk).unwrap();
    }
    app.append(0, &chunk).unwrap();
    let len = app.sync().unwrap();
    c.note_durable(1, len);
    // Bytes that were never accounted as durable are cut when the copy is opened again.
    std::fs::OpenOptions::new()
        .append(true)
        .open(t.path().join("resource-r/log-000000001-alpha"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"MaRs\x01"))
        .unwrap();
    let (c, report) = Copies::open(dir.clone()).unwrap();
    assert_eq!(report.cut.len(), 1);
    assert_eq!(c.get(1).unwrap().len, len);
    let end = Replay::new(&*dir, &*disk, disk.len().unwrap())
        .apply(&LogName::new(1, alpha), 0, len, &mut || false, &mut |_| {})
        .unwrap();
    assert_eq!(end, LogPos::new(1, len));
    assert_eq!(control::read_position(&*dir).unwrap(), Some(end));
    let mut b = [0u8; 512];
    disk.read_exact_at(&mut b, 2 * 4096).unwrap();
    assert_eq!(b, [2u8; 512]);
}

/// The catch-up path on real files: chunks of any size staged and written past the page cache
/// (partial blocks rewritten), syncs at random points, a copy continued after reopening at an
/// unaligned end; replay fed partly from the window of bytes just fetched (too small for all
/// of them, so it falls back to the file) and coalescing overlapping writes in its batches.
/// The copy holds exactly the bytes appended, and the disk ends as applying every record in
/// order would leave it.
#[test]
fn staged_copy_and_window_replay_match_the_records() {
    use mars_replica::Recent;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const DISK: u64 = 4 << 20;
    let mut rng = StdRng::seed_from_u64(18);
    let t = tempfile::tempdir().unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path().join("resource-r")).unwrap());
    let disk_path = t.path().join("disk.img");
    std::fs::File::create(&disk_path)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let disk = open_disk(&disk_path).unwrap();
    let alpha = HostName::new("alpha").unwrap();

    // Records: writes of random sizes and places (many overlap), some zeroing.
    let mut log = Vec::new();
    let mut model = vec![0u8; DISK as usize];
    for seq in 1..=600u64 {
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..600u64),
            1 => 4096 * rng.gen_range(1..8u64),
            _ => rng.gen_range(1..40_000u64),
        };
        let offset = if rng.gen_bool(0.5) {
            rng.gen_range(0..DISK - len)
        } else {
            // Sequential-ish, as a burst is.
            (seq * 20_000) % (DISK - len)
        };
        let kind = if rng.gen_range(0..10) == 0 {
            Kind::Zero
        } else {
            Kind::Write
        };
        let h = Header {
            kind,
            seq,
            stamp: seq,
            offset,
            len,
        };
        let payload: Vec<u8> = match kind {
            Kind::Write => (0..len).map(|_| rng.gen()).collect(),
            _ => Vec::new(),
        };
        let r = &mut model[offset as usize..(offset + len) as usize];
        match kind {
            Kind::Write => r.copy_from_slice(&payload),
            _ => r.fill(0),
        }
        encode(&h, &payload, &mut log).unwrap();
    }
    let bounds = {
        let mut b = vec![0usize];
        let mut at = 0;
        while at < log.len() {
            at += mars_txlog::format::decode(&log[at..]).unwrap().record_len();
            b.push(at);
        }
        b
    };

    // Appended in chunks of whole records; synced now and then; the copy reopened halfway.
    let (mut c, _) = Copies::open(dir.clone()).unwrap();
    let mut app = c.append(1, &alpha).unwrap();
    let mut i = 0;
    let mut reopened = false;
    while i + 1 < bounds.len() {
        let j = (i + rng.gen_range(1..12)).min(bounds.len() - 1);
        let chunk = bytes::Bytes::copy_from_slice(&log[bounds[i]..bounds[j]]);
        app.append_shared(bounds[i] as u64, chunk).unwrap();
        i = j;
        if rng.gen_range(0..6) == 0 {
            let len = app.sync().unwrap();
            assert!(c.note_durable(1, len));
        }
        if !reopened && i > bounds.len() / 2 {
            reopened = true;
            let len = app.sync().unwrap();
            c.note_durable(1, len);
            drop(app);
            let (c2, report) = Copies::open(dir.clone()).unwrap();
            assert!(report.cut.is_empty(), "{report:?}");
            c = c2;
            app = c.append(1, &alpha).unwrap();
            assert_eq!(app.end(), bounds[i] as u64);
        }
    }
    let len = app.sync().unwrap();
    c.note_durable(1, len);
    assert_eq!(len, log.len() as u64);
    let on_file = std::fs::read(t.path().join("resource-r/log-000000001-alpha")).unwrap();
    assert!(on_file == log, "the copy differs from what was appended");

    // Replay in runs, as the engine starts them, with a window smaller than the log.
    let recent = Recent::new(log.len() / 3);
    recent.open();
    // The window as the appender would have left it: the newest chunks.
    let mut k = 0;
    while k + 1 < bounds.len() {
        let j = (k + 7).min(bounds.len() - 1);
        recent.push(
            1,
            bounds[k] as u64,
            bytes::Bytes::copy_from_slice(&log[bounds[k]..bounds[j]]),
        );
        k = j;
    }
    let mut r = Replay::new(&*dir, &*disk, DISK);
    r.recent = Some(&recent);
    r.batch = 200_000;
    let mut pos = 0u64;
    while pos < len {
        let next = bounds.partition_point(|b| (*b as u64) <= pos);
        let to = bounds[(next + rng.gen_range(0..100)).min(bounds.len() - 1)] as u64;
        pos = r
            .apply(
                &LogName::new(1, alpha.clone()),
                pos,
                to,
                &mut || false,
                &mut |_| {},
            )
            .unwrap()
            .offset;
    }
    assert_eq!(pos, len);
    let got = std::fs::read(&disk_path).unwrap();
    assert!(
        got == model,
        "the disk differs from the records applied in order"
    );
}

/// Chunks received straight into aligned buffers (`append_received`), large ones written from
/// there O_DIRECT with the partial blocks before and after carried over, small ones staged,
/// mixed with copied chunks (`append_shared`), syncs and a reopen, at unaligned offsets: the
/// copy holds exactly the bytes appended and the window hands out the same bytes. A chunk whose
/// frame checksum does not match its records, or whose records are damaged, is refused and
/// nothing of it is written.
#[test]
fn received_chunks_are_written_from_their_buffers() {
    use mars_replica::{Error, Received};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let mut rng = StdRng::seed_from_u64(1818);
    let t = tempfile::tempdir().unwrap();
    let dir: Arc<dyn Dir> = Arc::new(RealDir::create(t.path().join("resource-r")).unwrap());
    let alpha = HostName::new("alpha").unwrap();
    let mut log = Vec::new();
    let mut bounds = vec![0usize];
    for seq in 1..=200u64 {
        let len = match rng.gen_range(0..3) {
            0 => rng.gen_range(1..5000u64),
            1 => 128 << 10,
            _ => rng.gen_range(1..300_000u64),
        };
        let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let h = Header {
            kind: Kind::Write,
            seq,
            stamp: seq,
            offset: seq * 4096,
            len,
        };
        encode(&h, &payload, &mut log).unwrap();
        bounds.push(log.len());
    }
    let received = |offset: usize, end: usize| {
        let data = &log[offset..end];
        let (mut buf, lead) = Received::buffer(offset as u64, data.len());
        buf.as_mut_slice()[lead..lead + data.len()].copy_from_slice(data);
        Received {
            offset: offset as u64,
            buf,
            len: data.len(),
            // What an intact frame implies: the data's own crc32c.
            data_crc: crc32c::crc32c(data),
        }
    };
    let (mut c, _) = Copies::open(dir.clone()).unwrap();
    c.recent().open();
    let mut app = c.append(1, &alpha).unwrap();
    let file = t.path().join("resource-r/log-000000001-alpha");
    let (mut i, mut reopened, mut refused) = (0, false, 0);
    while i + 1 < bounds.len() {
        let j = (i + rng.gen_range(1..25)).min(bounds.len() - 1);
        let (from, to) = (bounds[i], bounds[j]);
        if rng.gen_range(0..4) == 0 {
            app.append_shared(from as u64, bytes::Bytes::copy_from_slice(&log[from..to]))
                .unwrap();
        } else {
            // Now and then a damaged frame or record first: refused, nothing written.
            if rng.gen_range(0..5) == 0 {
                let synced = app.sync().unwrap();
                let mut bad = received(from, to);
                let damage_record = rng.gen_bool(0.5);
                if damage_record {
                    let k = bad.lead() + rng.gen_range(0..bad.len);
                    bad.buf.as_mut_slice()[k] ^= 0x20;
                } else {
                    bad.data_crc ^= 1;
                }
                let e = app.append_received(bad).unwrap_err();
                match e {
                    Error::Damaged { .. } => assert!(damage_record, "{e}"),
                    Error::FrameChecksum { offset, .. } => {
                        assert!(!damage_record);
                        assert_eq!(offset, from as u64);
                    }
                    e => panic!("{e}"),
                }
                assert_eq!(app.end(), from as u64);
                assert_eq!(std::fs::metadata(&file).unwrap().len(), synced);
                refused += 1;
            }
            app.append_received(received(from, to)).unwrap();
        }
        // The window has what was just appended.
        let w = c.recent().get(1, from as u64).unwrap();
        assert!(w[..] == log[from..to]);
        i = j;
        if rng.gen_range(0..5) == 0 {
            let len = app.sync().unwrap();
            assert!(c.note_durable(1, len));
        }
        if !reopened && i > bounds.len() / 2 {
            reopened = true;
            let len = app.sync().unwrap();
            c.note_durable(1, len);
            drop(app);
            let (c2, report) = Copies::open(dir.clone()).unwrap();
            assert!(report.cut.is_empty(), "{report:?}");
            c = c2;
            c.recent().open();
            app = c.append(1, &alpha).unwrap();
            assert_eq!(app.end(), bounds[i] as u64);
        }
    }
    assert!(refused > 0);
    let len = app.sync().unwrap();
    assert_eq!(len, log.len() as u64);
    let on_file = std::fs::read(&file).unwrap();
    assert!(on_file == log, "the copy differs from what was appended");
}
