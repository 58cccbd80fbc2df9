//! The persisted writeback position: everything in the log before it is on the backing disk.
//!
//! Stored as one line `<logfile number> <offset>` in `ROOT/resource-RES/writeback`, replaced
//! atomically (temporary file, fdatasync, rename, directory sync), so a crash leaves either the
//! old or the new position, never a mix.

use mars_storage::Dir;
use mars_txlog::LogPos;

use crate::VolumeError;

pub const POSITION_FILE: &str = "writeback";

pub fn read_position(dir: &dyn Dir) -> Result<Option<LogPos>, VolumeError> {
    let Some(raw) = dir
        .read_all(POSITION_FILE)
        .map_err(|e| VolumeError::BadPosition(format!("read: {e}")))?
    else {
        return Ok(None);
    };
    let text = String::from_utf8(raw).map_err(|_| VolumeError::BadPosition("not UTF-8".into()))?;
    let mut it = text.split_whitespace();
    let parse = |v: Option<&str>| -> Result<u64, VolumeError> {
        v.and_then(|s| s.parse().ok())
            .ok_or_else(|| VolumeError::BadPosition(format!("malformed content {text:?}")))
    };
    let file = parse(it.next())?;
    let offset = parse(it.next())?;
    if it.next().is_some() {
        return Err(VolumeError::BadPosition(format!(
            "malformed content {text:?}"
        )));
    }
    Ok(Some(LogPos::new(file, offset)))
}

pub fn write_position(dir: &dyn Dir, pos: LogPos) -> Result<(), VolumeError> {
    dir.write_atomic(
        POSITION_FILE,
        format!("{} {}\n", pos.file, pos.offset).as_bytes(),
    )
    .map_err(|e| VolumeError::BadPosition(format!("write: {e}")))
}
