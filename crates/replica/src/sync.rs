//! The full sync's disk side: read and hash a chunk, write a received chunk, make the disk
//! durable before the progress in `sync.toml` says so. Nothing networked.
//!
//! Digests are xxh3-128 of the chunk, as 16 little-endian bytes; the chunk is read as zeros
//! where the disk is shorter (the primary hashes its own disk the same way).

use mars_storage::{Dir, File};

use crate::{control, Error, Result, SyncFile};

/// Bytes per sync chunk: the unit of digest comparison.
pub const SYNC_CHUNK: u64 = 1 << 20;

/// The chunk at `at` of a copy up to `size`: its length (`SYNC_CHUNK`, shorter at the end).
pub fn chunk_len(at: u64, size: u64) -> u64 {
    SYNC_CHUNK.min(size.saturating_sub(at))
}

/// The digest of `data`: xxh3-128, little-endian.
pub fn digest(data: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

/// Reads `buf.len()` bytes of `disk` at `off` (zeros past its end) into `buf`.
pub fn read_chunk(disk: &dyn File, off: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = disk
            .read_at(&mut buf[done..], off + done as u64)
            .map_err(|source| Error::Disk {
                op: "read",
                offset: off + done as u64,
                source,
            })?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Reads the chunk at `off` into `buf` and returns its digest.
pub fn hash_chunk(disk: &dyn File, off: u64, buf: &mut [u8]) -> Result<[u8; 16]> {
    read_chunk(disk, off, buf)?;
    Ok(digest(buf))
}

/// Writes a received chunk (not durable until [`sync_disk`]).
pub fn write_chunk(disk: &dyn File, off: u64, data: &[u8]) -> Result<()> {
    disk.write_at(data, off).map_err(|source| Error::Disk {
        op: "write",
        offset: off,
        source,
    })
}

/// Makes every written chunk durable.
pub fn sync_disk(disk: &dyn File) -> Result<()> {
    disk.sync_data().map_err(|source| Error::Disk {
        op: "fdatasync",
        offset: 0,
        source,
    })
}

/// Persists the sync's progress: the disk first, then `sync.toml`, so that `done` never claims
/// chunks that are not durable on the disk.
pub fn persist(dir: &dyn Dir, disk: &dyn File, sync: &SyncFile) -> Result<()> {
    sync_disk(disk)?;
    control::write_sync(dir, sync)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mars_storage::mem::MemDir;
    use mars_storage::OpenMode;

    #[test]
    fn chunks() {
        let d = MemDir::new();
        let disk = d.open("disk", OpenMode::Create).unwrap();
        disk.set_len(SYNC_CHUNK + 10).unwrap();
        assert_eq!(chunk_len(0, SYNC_CHUNK + 10), SYNC_CHUNK);
        assert_eq!(chunk_len(SYNC_CHUNK, SYNC_CHUNK + 10), 10);
        assert_eq!(chunk_len(SYNC_CHUNK + 20, SYNC_CHUNK + 10), 0);
        let mut buf = vec![7u8; 20];
        // Past the end reads as zeros.
        let h = hash_chunk(&*disk, SYNC_CHUNK, &mut buf).unwrap();
        assert_eq!(h, digest(&[0u8; 20]));
        write_chunk(&*disk, SYNC_CHUNK, &[1u8; 10]).unwrap();
        let h2 = hash_chunk(&*disk, SYNC_CHUNK, &mut buf).unwrap();
        assert_ne!(h, h2);
        assert_eq!(&buf[..10], &[1u8; 10]);
        d.inject_faults(false, true);
        assert!(matches!(sync_disk(&*disk), Err(Error::Disk { .. })));
        assert!(persist(&d, &*disk, &SyncFile::pending(0, 1)).is_err());
        assert!(
            control::read_sync(&d).unwrap().is_none(),
            "no progress without a durable disk"
        );
    }
}
