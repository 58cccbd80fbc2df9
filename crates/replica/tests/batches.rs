//! Replay batches larger than one merge buffer: merged on one thread while the buffer before is
//! written on another (`replay.rs`, `Batch::write`). The disk must end exactly as applying the
//! records in order leaves it, from the copy and from the window alike, and a disk that fails
//! its writes must fail the replay without persisting a position.

use std::sync::Arc;

use mars_config::HostName;
use mars_replica::{control, Copies, Recent, Replay};
use mars_storage::mem::MemDir;
use mars_storage::{Dir, File, OpenMode};
use mars_txlog::format::{encode, Header};
use mars_txlog::{Kind, LogName};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Big enough for several 8 MiB merge buffers in one batch.
const DISK: u64 = 40 << 20;

struct Log {
    bytes: Vec<u8>,
    /// Where each record starts, and the end.
    bounds: Vec<usize>,
    /// The disk after every record, applied in order.
    model: Vec<u8>,
}

/// A burst: mostly sequential writes of 4 KiB..256 KiB at unaligned and aligned offsets
/// (adjacent ones merge into long runs), some rewriting earlier ranges, some zeroing.
fn burst(seed: u64) -> Log {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut bytes = Vec::new();
    let mut model = vec![0u8; DISK as usize];
    let mut bounds = vec![0];
    let mut at = 0u64;
    let mut seq = 1;
    while at < DISK - (1 << 20) {
        let len = if rng.gen_bool(0.5) {
            4096 * rng.gen_range(1..64u64)
        } else {
            rng.gen_range(1..256 << 10)
        };
        let (offset, kind) = match rng.gen_range(0..20) {
            0 => (rng.gen_range(0..DISK - len), Kind::Write),
            1 => (rng.gen_range(0..DISK - len), Kind::Zero),
            _ => {
                let o = at;
                at += len;
                (o, Kind::Write)
            }
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
        let h = Header {
            kind,
            seq,
            stamp: seq,
            offset,
            len,
        };
        seq += 1;
        encode(&h, &payload, &mut bytes).unwrap();
        bounds.push(bytes.len());
    }
    Log {
        bytes,
        bounds,
        model,
    }
}

/// The copy of `log` in a fresh directory, durable; and the disk.
fn setup(log: &Log) -> (MemDir, Arc<dyn File>) {
    let d = MemDir::new();
    let (mut c, _) = Copies::open(Arc::new(d.clone())).unwrap();
    let mut app = c.append(1, &HostName::new("alpha").unwrap()).unwrap();
    let mut i = 0;
    while i + 1 < log.bounds.len() {
        let j = (i + 16).min(log.bounds.len() - 1);
        let chunk = bytes::Bytes::copy_from_slice(&log.bytes[log.bounds[i]..log.bounds[j]]);
        app.append_shared(log.bounds[i] as u64, chunk).unwrap();
        i = j;
    }
    let len = app.sync().unwrap();
    assert!(c.note_durable(1, len));
    let disk = d.open("disk", OpenMode::Create).unwrap();
    disk.set_len(DISK).unwrap();
    (d, disk)
}

#[test]
fn batches_of_several_merge_buffers_replay_as_in_order() {
    let log = burst(18);
    assert!(
        log.bytes.len() > 32 << 20,
        "several merge buffers per batch"
    );
    let name = LogName::new(1, HostName::new("alpha").unwrap());
    let len = log.bytes.len() as u64;
    // From the copy, one batch of the whole log; then from the window, in 24 MiB batches.
    for from_window in [false, true] {
        let (d, disk) = setup(&log);
        let recent = Recent::new(usize::MAX);
        let mut r = Replay::new(&d, &*disk, DISK);
        if from_window {
            recent.open();
            recent.push(1, 0, bytes::Bytes::copy_from_slice(&log.bytes));
            r.recent = Some(&recent);
            r.batch = 24 << 20;
        } else {
            r.batch = u64::MAX;
        }
        let pos = r.apply(&name, 0, len, &mut || false, &mut |_| {}).unwrap();
        assert_eq!(pos.offset, len);
        assert_eq!(control::read_position(&d).unwrap(), Some(pos));
        let got = d.contents("disk").unwrap();
        assert!(
            got == log.model,
            "the disk differs from the records applied in order (window: {from_window})"
        );
    }
}

#[test]
fn a_failing_disk_fails_a_large_batch_and_persists_nothing() {
    let log = burst(19);
    let name = LogName::new(1, HostName::new("alpha").unwrap());
    let (d, disk) = setup(&log);
    d.inject_faults(true, false);
    let mut r = Replay::new(&d, &*disk, DISK);
    r.batch = u64::MAX;
    let e = r
        .apply(&name, 0, log.bytes.len() as u64, &mut || false, &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(e, mars_replica::Error::Disk { op: "write", .. }),
        "{e}"
    );
    d.inject_faults(false, false);
    assert_eq!(control::read_position(&d).unwrap(), None);
}
