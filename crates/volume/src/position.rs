//! The persisted writeback position: everything in the log before it is on the backing disk.
//!
//! Stored as one line `<logfile number> <offset>` in `ROOT/resource-RES/writeback`, replaced
//! atomically (temporary file, fdatasync, rename, directory sync), so a crash leaves either the
//! old or the new position, never a mix.

use mars_storage::Dir;
use mars_txlog::LogPos;

use crate::VolumeError;

pub const POSITION_FILE: &str = "writeback";

/// The content of [`POSITION_FILE`] for `pos`: `"<file> <offset>\n"` in decimal.
pub fn format_position(pos: LogPos) -> String {
    format!("{} {}\n", pos.file, pos.offset)
}

/// Parses the content of [`POSITION_FILE`]: two decimal numbers separated by whitespace,
/// nothing else. The error says what is wrong.
pub fn parse_position(raw: &[u8]) -> Result<LogPos, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "not UTF-8".to_string())?;
    let mut it = text.split_whitespace();
    let mut parse = || -> Result<u64, String> {
        it.next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("malformed content {text:?}"))
    };
    let file = parse()?;
    let offset = parse()?;
    if it.next().is_some() {
        return Err(format!("malformed content {text:?}"));
    }
    Ok(LogPos::new(file, offset))
}

pub fn read_position(dir: &dyn Dir) -> Result<Option<LogPos>, VolumeError> {
    let Some(raw) = dir
        .read_all(POSITION_FILE)
        .map_err(|e| VolumeError::BadPosition(format!("read: {e}")))?
    else {
        return Ok(None);
    };
    parse_position(&raw)
        .map(Some)
        .map_err(VolumeError::BadPosition)
}

pub fn write_position(dir: &dyn Dir, pos: LogPos) -> Result<(), VolumeError> {
    dir.write_atomic(POSITION_FILE, format_position(pos).as_bytes())
        .map_err(|e| VolumeError::BadPosition(format!("write: {e}")))
}
