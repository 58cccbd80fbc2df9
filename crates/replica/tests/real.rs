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
