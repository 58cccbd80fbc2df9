//! The control files of a resource directory: small files that decide what a restart does.
//!
//! Every write replaces the file atomically and durably ([`Dir::write_atomic`]: `NAME.tmp`,
//! fdatasync, rename over `NAME`, directory sync), every removal is durable (remove, directory
//! sync), and every failure is returned. A crash therefore leaves each file either as it was
//! before an operation or as the operation made it, never torn; a leftover `NAME.tmp` is
//! ignored (and replaced by the next write). Reading a file that exists but cannot be understood
//! is an [`Error::Malformed`] naming the file and what is wrong with it.
//!
//! Layouts (all text, UTF-8):
//!
//! | file | content | absent means |
//! |---|---|---|
//! | [`POSITION_FILE`] `writeback` | `"<logfile> <offset>\n"`, two decimal numbers (the primary's writeback position format, `mars_volume::position`) | no position yet |
//! | [`SYNC_FILE`] `sync.toml` | TOML of [`SyncFile`] | no full sync pending |
//! | [`NEEDS_SYNC_FILE`] `needs-sync` | the reason, free text | no full sync needed |
//! | [`CHAIN_START_FILE`] `chain-start` | `"<logfile>\n"`, decimal, 1 to `MAX_LOG_NO` | the log never restarted after a hole |
//! | markers ([`Marker`]): `replica`, `force-primary`, `emergency` | empty; presence = on | off |

use mars_config::HostName;
use mars_storage::{Dir, OpenMode};
use mars_txlog::{LogPos, MAX_LOG_NO};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The replay position of a secondary, in the format of the primary's writeback position (the
/// same directory can become a primary's).
pub const POSITION_FILE: &str = mars_volume::POSITION_FILE;
/// A pending or running full sync: [`SyncFile`] as TOML.
pub const SYNC_FILE: &str = "sync.toml";
/// Why only a full sync helps this replica: the reason as text.
pub const NEEDS_SYNC_FILE: &str = "needs-sync";
/// The logfile number where this host's log last continued after a hole (published as
/// `chain-start-HOST`): one decimal number and a newline.
pub const CHAIN_START_FILE: &str = "chain-start";
/// The reason reported for a `needs-sync` file without text (older versions wrote it
/// non-atomically, so a crash could leave it empty): a full sync is still needed.
pub const NO_REASON: &str = "a full sync is needed (the reason was not recorded)";

/// A marker file: present = on, content empty (and ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Marker {
    /// `replica`: the directory holds a replica (removed when it becomes a primary's). A
    /// restarted daemon that finds itself designated primary with this marker still has to
    /// catch up before it may open its volume.
    Replica,
    /// `force-primary`: a forced switch (`primary --force`) is pending here.
    ForcePrimary,
    /// `emergency`: this primary is in emergency mode (writes bypass the log). Found at open
    /// (a restart in emergency mode), nothing is replayed and the log continues after a hole
    /// before anything is written. The volume creates it itself ([`mars_volume::EMERGENCY_FILE`]).
    Emergency,
}

impl Marker {
    pub const ALL: [Marker; 3] = [Marker::Replica, Marker::ForcePrimary, Marker::Emergency];

    /// The marker's file name in the resource directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Marker::Replica => "replica",
            Marker::ForcePrimary => "force-primary",
            Marker::Emergency => mars_volume::EMERGENCY_FILE,
        }
    }
}

/// A full sync in progress, as persisted in `sync.toml`. The TOML layout is the serde one of
/// this struct (a `None` field is left out; `start`/`end` are tables `{ file, offset }`):
///
/// ```toml
/// done = 67108864
/// size = 1073741824
/// transferred = 1048576
/// from = "alpha"
///
/// [start]
/// file = 3
/// offset = 4096
/// ```
///
/// `transferred` and `from` may be missing (files written before they existed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFile {
    /// Log position at sync start (from the primary); replay starts here.
    pub start: Option<LogPos>,
    /// The device below this offset is copied.
    pub done: u64,
    /// Bytes to copy.
    pub size: u64,
    /// The primary's log position when the copy ended; consistent once replay passes it.
    pub end: Option<LogPos>,
    /// Bytes that actually travelled (chunks whose digests differed).
    #[serde(default)]
    pub transferred: u64,
    /// The host that gave `start` (and the data copied so far). `None` in files written before
    /// this field existed: taken as the current source.
    #[serde(default)]
    pub from: Option<HostName>,
}

impl SyncFile {
    /// A sync that copies `[done, size)` and has not started yet.
    pub fn pending(done: u64, size: u64) -> Self {
        Self {
            start: None,
            done,
            size,
            end: None,
            transferred: 0,
            from: None,
        }
    }
}

/// Every control file of a resource directory, as a restart finds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlState {
    /// `writeback`.
    pub position: Option<LogPos>,
    /// `sync.toml`.
    pub sync: Option<SyncFile>,
    /// `needs-sync`.
    pub needs_sync: Option<String>,
    /// Marker `replica`.
    pub replica: bool,
    /// Marker `force-primary`.
    pub force_primary: bool,
    /// Marker `emergency`.
    pub emergency: bool,
    /// `chain-start`.
    pub chain_start: Option<u64>,
}

impl ControlState {
    pub fn marker(&self, m: Marker) -> bool {
        match m {
            Marker::Replica => self.replica,
            Marker::ForcePrimary => self.force_primary,
            Marker::Emergency => self.emergency,
        }
    }
}

/// Reads every control file; the first one that cannot be read or understood is the error.
pub fn read_all(dir: &dyn Dir) -> Result<ControlState> {
    Ok(ControlState {
        position: read_position(dir)?,
        sync: read_sync(dir)?,
        needs_sync: read_needs_sync(dir)?,
        replica: marker(dir, Marker::Replica)?,
        force_primary: marker(dir, Marker::ForcePrimary)?,
        emergency: marker(dir, Marker::Emergency)?,
        chain_start: read_chain_start(dir)?,
    })
}

// ------------------------------------------------------------------ helpers

fn read(dir: &dyn Dir, name: &'static str) -> Result<Option<Vec<u8>>> {
    dir.read_all(name).map_err(Error::io(name, "read"))
}

fn read_text(dir: &dyn Dir, name: &'static str) -> Result<Option<String>> {
    read(dir, name)?
        .map(|raw| {
            String::from_utf8(raw).map_err(|_| Error::Malformed {
                file: name,
                reason: "not UTF-8".into(),
            })
        })
        .transpose()
}

fn write(dir: &dyn Dir, name: &'static str, data: &[u8]) -> Result<()> {
    dir.write_atomic(name, data)
        .map_err(Error::io(name, "write"))
}

/// Removes `name` (if present) and syncs the directory, so that the removal is durable also
/// when an earlier removal was not synced.
fn remove(dir: &dyn Dir, name: &'static str) -> Result<()> {
    match dir.remove(name) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(name, "remove")(e)),
    }
    dir.sync().map_err(Error::io(name, "sync directory"))
}

fn exists(dir: &dyn Dir, name: &'static str) -> Result<bool> {
    match dir.open(name, OpenMode::Existing) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(name, "open")(e)),
    }
}

// ------------------------------------------------------------------ writeback

/// The replay (or writeback) position; `None` when there is none yet.
pub fn read_position(dir: &dyn Dir) -> Result<Option<LogPos>> {
    read(dir, POSITION_FILE)?
        .map(|raw| {
            mars_volume::parse_position(&raw).map_err(|reason| Error::Malformed {
                file: POSITION_FILE,
                reason,
            })
        })
        .transpose()
}

pub fn write_position(dir: &dyn Dir, pos: LogPos) -> Result<()> {
    write(
        dir,
        POSITION_FILE,
        mars_volume::format_position(pos).as_bytes(),
    )
}

// ------------------------------------------------------------------ sync.toml

pub fn read_sync(dir: &dyn Dir) -> Result<Option<SyncFile>> {
    read_text(dir, SYNC_FILE)?
        .map(|text| {
            toml::from_str(&text).map_err(|e| Error::Malformed {
                file: SYNC_FILE,
                reason: e.to_string().trim_end().to_string(),
            })
        })
        .transpose()
}

pub fn write_sync(dir: &dyn Dir, sync: &SyncFile) -> Result<()> {
    let text = toml::to_string(sync).map_err(|e| Error::Malformed {
        file: SYNC_FILE,
        reason: format!("cannot serialize: {e}"),
    })?;
    write(dir, SYNC_FILE, text.as_bytes())
}

/// The full sync is over (or forgotten).
pub fn remove_sync(dir: &dyn Dir) -> Result<()> {
    remove(dir, SYNC_FILE)
}

// ------------------------------------------------------------------ needs-sync

/// Why only a full sync helps (`None`: it is not needed). An empty file reads as [`NO_REASON`].
pub fn read_needs_sync(dir: &dyn Dir) -> Result<Option<String>> {
    Ok(read_text(dir, NEEDS_SYNC_FILE)?.map(|t| {
        if t.trim().is_empty() {
            NO_REASON.to_string()
        } else {
            t
        }
    }))
}

pub fn write_needs_sync(dir: &dyn Dir, why: &str) -> Result<()> {
    write(dir, NEEDS_SYNC_FILE, why.as_bytes())
}

pub fn remove_needs_sync(dir: &dyn Dir) -> Result<()> {
    remove(dir, NEEDS_SYNC_FILE)
}

// ------------------------------------------------------------------ markers

/// Is the marker present?
pub fn marker(dir: &dyn Dir, m: Marker) -> Result<bool> {
    exists(dir, m.file_name())
}

/// Creates (`on`) or removes the marker, durably. Idempotent: an existing marker is left as is
/// (its name is made durable by a directory sync, in case an earlier creation was not).
pub fn set_marker(dir: &dyn Dir, m: Marker, on: bool) -> Result<()> {
    let name = m.file_name();
    if !on {
        return remove(dir, name);
    }
    if exists(dir, name)? {
        dir.sync().map_err(Error::io(name, "sync directory"))
    } else {
        write(dir, name, b"")
    }
}

// ------------------------------------------------------------------ chain-start

pub fn read_chain_start(dir: &dyn Dir) -> Result<Option<u64>> {
    read_text(dir, CHAIN_START_FILE)?
        .map(|text| {
            text.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=MAX_LOG_NO).contains(n))
                .ok_or_else(|| Error::Malformed {
                    file: CHAIN_START_FILE,
                    reason: format!("{text:?} is not a logfile number (1 to {MAX_LOG_NO})"),
                })
        })
        .transpose()
}

pub fn write_chain_start(dir: &dyn Dir, no: u64) -> Result<()> {
    write(dir, CHAIN_START_FILE, format!("{no}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mars_storage::mem::MemDir;

    fn put(d: &MemDir, name: &str, data: &[u8]) {
        d.write_atomic(name, data).unwrap();
    }

    #[test]
    fn round_trips_and_absence() {
        let d = MemDir::new();
        assert_eq!(read_all(&d).unwrap(), ControlState::default());
        write_position(&d, LogPos::new(3, 4096)).unwrap();
        let mut sf = SyncFile::pending(0, 1 << 30);
        sf.start = Some(LogPos::new(3, 0));
        sf.from = Some(HostName::new("alpha").unwrap());
        write_sync(&d, &sf).unwrap();
        write_needs_sync(&d, "log 4 is gone").unwrap();
        write_chain_start(&d, 17).unwrap();
        for m in Marker::ALL {
            set_marker(&d, m, true).unwrap();
            set_marker(&d, m, true).unwrap();
        }
        let st = read_all(&d).unwrap();
        assert_eq!(
            st,
            ControlState {
                position: Some(LogPos::new(3, 4096)),
                sync: Some(sf),
                needs_sync: Some("log 4 is gone".into()),
                replica: true,
                force_primary: true,
                emergency: true,
                chain_start: Some(17),
            }
        );
        assert_eq!(d.contents("writeback").unwrap(), b"3 4096\n");
        assert_eq!(d.contents("chain-start").unwrap(), b"17\n");
        remove_sync(&d).unwrap();
        remove_sync(&d).unwrap();
        remove_needs_sync(&d).unwrap();
        for m in Marker::ALL {
            set_marker(&d, m, false).unwrap();
            set_marker(&d, m, false).unwrap();
            assert!(!marker(&d, m).unwrap());
        }
        let st = read_all(&d).unwrap();
        assert_eq!(st.sync, None);
        assert_eq!(st.needs_sync, None);
        assert!(!st.replica && !st.force_primary && !st.emergency);
    }

    /// `sync.toml` as written by earlier versions (no `transferred`, no `from`) still loads.
    #[test]
    fn old_sync_files_load() {
        let d = MemDir::new();
        put(
            &d,
            SYNC_FILE,
            b"done = 5\nsize = 10\n\n[start]\nfile = 2\noffset = 48\n",
        );
        let sf = read_sync(&d).unwrap().unwrap();
        assert_eq!(sf.start, Some(LogPos::new(2, 48)));
        assert_eq!((sf.done, sf.size, sf.transferred), (5, 10, 0));
        assert_eq!((sf.end, sf.from), (None, None));
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() {
        let cases: &[(&str, &[u8])] = &[
            (SYNC_FILE, b"this is = not [toml"),
            (SYNC_FILE, b"done = \"many\"\nsize = 1\n"),
            (SYNC_FILE, b"done = 1\n"),
            (SYNC_FILE, b"done = 1\nsize = 2\nfrom = \"Not A Host\"\n"),
            (SYNC_FILE, b"\xff\xfe"),
            (POSITION_FILE, b"garbage"),
            (POSITION_FILE, b"1"),
            (POSITION_FILE, b"1 2 3"),
            (POSITION_FILE, b"-1 2"),
            (POSITION_FILE, b"\xff 1"),
            (CHAIN_START_FILE, b""),
            (CHAIN_START_FILE, b"0"),
            (CHAIN_START_FILE, b"1000000000"),
            (CHAIN_START_FILE, b"twelve"),
            (CHAIN_START_FILE, b"12 13"),
            (NEEDS_SYNC_FILE, b"\xff"),
        ];
        for (file, data) in cases {
            let d = MemDir::new();
            put(&d, file, data);
            let e = read_all(&d).expect_err(&format!("{file} {data:?} accepted"));
            match &e {
                Error::Malformed { file: f, .. } => assert_eq!(f, file, "{e}"),
                other => panic!("{file}: {other}"),
            }
            assert!(e.to_string().contains(file), "{e}");
        }
    }

    proptest::proptest! {
        /// Whatever bytes a control file holds, reading never panics: a value or an error
        /// naming the file.
        #[test]
        fn arbitrary_content_never_panics(
            which in 0usize..4,
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let file = [POSITION_FILE, SYNC_FILE, NEEDS_SYNC_FILE, CHAIN_START_FILE][which];
            let d = MemDir::new();
            put(&d, file, &data);
            if let Err(e) = read_all(&d) {
                proptest::prop_assert!(e.to_string().contains(file), "{}", e);
            }
        }
    }

    #[test]
    fn empty_needs_sync_still_needs_a_sync() {
        let d = MemDir::new();
        put(&d, NEEDS_SYNC_FILE, b"");
        assert_eq!(read_needs_sync(&d).unwrap().as_deref(), Some(NO_REASON));
    }

    #[test]
    fn failures_are_returned() {
        let d = MemDir::new();
        d.inject_faults(true, false);
        assert!(matches!(
            write_position(&d, LogPos::new(1, 0)),
            Err(Error::Io { .. })
        ));
        assert!(set_marker(&d, Marker::Replica, true).is_err());
        assert!(write_chain_start(&d, 3).is_err());
        assert!(write_needs_sync(&d, "x").is_err());
        assert!(write_sync(&d, &SyncFile::pending(0, 1)).is_err());
        d.inject_faults(false, true);
        assert!(write_sync(&d, &SyncFile::pending(0, 1)).is_err());
    }
}
