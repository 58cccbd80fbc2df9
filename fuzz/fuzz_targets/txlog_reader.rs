//! Arbitrary bytes as the only logfile of an in-memory resource directory, then recovery and a
//! full replay. Nothing may panic; beyond that, a successful recovery must leave a log that
//! replays cleanly, with exactly the records recovery counted, and recovering again must find
//! nothing left to cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_storage::mem::MemDir;
use mars_storage::{Dir, OpenMode};
use mars_txlog::{recover, replay, LogError, LogPos};

const NAME: &str = "log-000000001-alpha";

fuzz_target!(|data: &[u8]| {
    let dir = MemDir::new();
    dir.open(NAME, OpenMode::Create)
        .and_then(|f| f.write_at(data, 0))
        .expect("in-memory write");

    let Ok(rec) = recover(&dir) else {
        return;
    };
    let mut replayed = 0u64;
    let mut end = LogPos::ZERO;
    replay::<LogError>(&dir, &rec, LogPos::ZERO, |pos, r| {
        replayed += 1;
        end = LogPos::new(pos.file, pos.offset + r.header.record_len() as u64);
        Ok(())
    })
    .expect("a recovered log must replay");

    let counted: u64 = rec.files.iter().map(|f| f.records).sum();
    assert_eq!(
        replayed, counted,
        "replay saw a different number of records"
    );
    if replayed > 0 {
        assert_eq!(end, rec.end(), "replay ended elsewhere than recovery");
    } else {
        assert_eq!(
            rec.end().offset,
            0,
            "no records, yet a non-empty valid prefix"
        );
    }

    let again = recover(&dir).expect("recovering a recovered log");
    assert_eq!(again.truncated, None, "second recovery cut something");
    assert_eq!(again.files, rec.files, "second recovery disagrees");
});
