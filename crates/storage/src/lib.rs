//! The I/O boundary of the storage path.
//!
//! The transaction log and the volume never call `std::fs` directly: they see a [`Dir`] (a
//! directory of named files, e.g. `ROOT/resource-RES/`) and [`File`]s (a logfile, the backing
//! disk). Two implementations exist:
//!
//! * [`real`]: `std::fs` plus `fdatasync`, `fallocate` and block-device ioctls;
//! * [`mem`]: an in-memory world that remembers what was *synced* separately from what was
//!   *written*, and can produce a crash image (everything not synced is lost) at every sync point.
//!   The crash tests of `txlog` and `volume` run a workload once and then recover from each image.
//!
//! The contract mirrors POSIX: data written to a file is durable after [`File::sync_data`]; a
//! newly created, renamed or removed *name* is durable after [`Dir::sync`].

use std::io;
use std::sync::Arc;

pub mod mem;
pub mod real;

/// How [`Dir::open`] treats an existing or missing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The file must exist.
    Existing,
    /// Create it if missing.
    Create,
    /// It must not exist yet.
    CreateNew,
}

/// A directory of files, addressed by plain names (no slashes).
pub trait Dir: Send + Sync {
    fn open(&self, name: &str, mode: OpenMode) -> io::Result<Arc<dyn File>>;
    /// Like [`Dir::open`], for a file written mostly in large aligned pieces: where the
    /// filesystem allows, its [`File::write_at_direct`] bypasses the page cache (O_DIRECT).
    /// The default is [`Dir::open`].
    fn open_direct(&self, name: &str, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        self.open(name, mode)
    }
    /// Names of the regular files in the directory, unsorted.
    fn list(&self) -> io::Result<Vec<String>>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Atomically replaces `to` by `from`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable (fsync of the directory).
    fn sync(&self) -> io::Result<()>;
    /// Writes `data` to `name` atomically and durably: temporary file, sync, rename, sync dir.
    fn write_atomic(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = format!("{name}.tmp");
        let f = self.open(&tmp, OpenMode::Create)?;
        f.set_len(0)?;
        f.write_at(data, 0)?;
        f.sync_data()?;
        drop(f);
        self.rename(&tmp, name)?;
        self.sync()
    }
    /// Reads a whole (small) file; `None` when it does not exist.
    fn read_all(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let f = match self.open(name, OpenMode::Existing) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = usize::try_from(f.len()?).map_err(|_| io::Error::other("file too large"))?;
        let mut buf = vec![0; len];
        f.read_exact_at(&mut buf, 0)?;
        Ok(Some(buf))
    }
}

/// Whether an I/O error says that the filesystem is full (ENOSPC, or the quota's EDQUOT).
pub fn out_of_space(e: &io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

/// A file or block device with positional I/O. All methods take `&self` so that one handle can be
/// shared between threads (reads on request threads, writes on the writeback thread).
pub trait File: Send + Sync {
    /// Reads up to `buf.len()` bytes at `off`; returns how many (0 at or past the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `off`, extending a regular file if needed.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Like [`File::write_at`], but may bypass the page cache (O_DIRECT) when buffer address,
    /// offset and length are suitably aligned. Durability still needs [`File::sync_data`]. The
    /// default is the buffered write.
    fn write_at_direct(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_at(buf, off)
    }
    /// Writes `bufs` one after the other from `off`, like [`File::write_at_direct`] on their
    /// concatenation: adjacent pieces of a writeback batch go to the disk in one request instead
    /// of one each (fewer syscalls and device notifications). The default writes them one by
    /// one.
    fn write_vectored_at_direct(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        let mut at = off;
        for b in bufs {
            self.write_at_direct(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Truncates or extends (with zeros). Block devices refuse.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves space for `[0, len)` without changing the file's length, so that appending later
    /// does not pay for block allocation on every write. Best effort: refusals are ignored.
    fn preallocate(&self, _len: u64) {}
    /// Gives back the space reserved by [`File::preallocate`] beyond the file's length (a
    /// finished logfile keeps only what it holds). Best effort; the contents do not change.
    fn release_reserve(&self) {}
    /// Hints that `[off, off+len)` will not be read soon (after it was synced), so the page cache
    /// can drop it instead of evicting something useful. Best effort.
    fn drop_cache(&self, _off: u64, _len: u64) {}
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes `[off, off+len)` read as zeros. `punch` allows deallocating the range (a hole or a
    /// device discard that guarantees zeros); either way the result reads as zeros.
    fn write_zeroes(&self, off: u64, len: u64, punch: bool) -> io::Result<()>;

    /// Reads exactly `buf.len()` bytes; a short file is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read at offset {}", off + done as u64),
                ));
            }
            done += n;
        }
        Ok(())
    }
}

/// Writes zeros in bounded chunks: the fallback when a faster way to zero is refused.
pub(crate) fn write_zeroes_slow(f: &dyn File, mut off: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let end = off + len;
    while off < end {
        let n = (end - off).min(CHUNK) as usize;
        f.write_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Rejects names that would escape the directory.
pub(crate) fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid file name {name:?}"),
        ));
    }
    Ok(())
}

/// A zeroed buffer whose address is aligned for O_DIRECT ([`real::DIRECT_ALIGN`]), reused
/// across writes (the log copies' staging, replay's merged pieces).
///
/// Buffers of [`HUGE_PAGE`] or more are aligned to it and asked to be backed by transparent
/// huge pages (`MADV_HUGEPAGE`; this kernel's default is `madvise`): every O_DIRECT write pins
/// its buffer's pages first, and pinning a 4 MiB chunk page by page (`gup_fast_fallback`) was
/// 5 % of a catching-up secondary's CPU; with 2 MiB pages it is two entries, and the copies
/// into and out of the buffer miss the TLB less. Where the kernel has no huge pages to give,
/// the advice is ignored and the buffer works as before.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

/// Size and alignment of a transparent huge page on x86-64 (the common one elsewhere too; a
/// wrong guess only costs the advice's effect).
pub const HUGE_PAGE: usize = 2 << 20;

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads (`as_slice`); writing needs `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of at least `len` bytes (rounded up to whole blocks).
    pub fn new(len: usize) -> Self {
        let len = len.div_ceil(real::DIRECT_ALIGN).max(1) * real::DIRECT_ALIGN;
        let align = if len >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            real::DIRECT_ALIGN
        };
        let layout = std::alloc::Layout::from_size_align(len, align)
            .unwrap_or_else(|_| panic!("a buffer of {len} bytes is beyond the address space"));
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        if align == HUGE_PAGE {
            // Before the first touch, so that the pages faulted in by the zeroing below can
            // be huge ones. Only the whole huge pages: a huge page for the partial one at the
            // end would hold up to 2 MiB of memory past the buffer (a received 4 MiB chunk's
            // buffer is 4.25 MiB). Best effort: the result does not matter.
            let whole = len - len % HUGE_PAGE;
            // SAFETY: the range lies within the allocation just made and starts aligned.
            unsafe { libc::madvise(raw.cast(), whole, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `raw` is valid for `len` bytes; zeroed, every byte is initialised.
        unsafe { std::ptr::write_bytes(raw, 0, len) };
        Self { ptr, layout }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len()` initialised bytes owned by `self` (zeroed in `new`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Aligned buffers that come back for reuse (the secondary's receive buffers, `pooled`): shared
/// by the whole process, at most [`POOL_BYTES`]. Without reuse every received megabyte was a
/// fresh allocation that the kernel faulted in and zeroed page by page (14 % of a catching-up
/// secondary's CPU), since the replay window keeps hundreds of MiB alive and frees them again.
static POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

/// Bytes the pool keeps at most: a replay batch's worth of chunks comes back at once when
/// replay persists (`mars_replica::replay::REPLAY_BATCH`), and the fetch takes them again.
pub const POOL_BYTES: usize = 64 << 20;

/// Capacities are rounded up to this, so that chunks of slightly different sizes (whole log
/// records of about the same total) share buffers.
const POOL_GRAIN: usize = 256 << 10;

/// An aligned buffer of at least `len` bytes from the pool: reused, so its bytes are whatever
/// the last user left (the caller overwrites what it uses); it goes back to the pool when
/// dropped, e.g. when the last `bytes::Bytes` made of it with `Bytes::from_owner` goes.
pub fn pooled(len: usize) -> PooledBuf {
    let cap = len.max(1).next_multiple_of(POOL_GRAIN);
    let reused = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // Any buffer that fits and wastes at most a quarter.
        pool.iter()
            .position(|b| b.len() >= cap && b.len() - cap <= cap / 4)
            .map(|i| pool.swap_remove(i))
    };
    PooledBuf {
        buf: Some(reused.unwrap_or_else(|| AlignedBuf::new(cap))),
    }
}

/// A buffer from [`pooled`]; see there. Derefs to all of its bytes (`len()` ≥ what was asked).
pub struct PooledBuf {
    /// `None` only while dropped.
    buf: Option<AlignedBuf>,
}

impl PooledBuf {
    fn inner(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("present until dropped")
    }

    pub fn len(&self) -> usize {
        self.inner().len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        self.inner().as_slice()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf
            .as_mut()
            .expect("present until dropped")
            .as_mut_slice()
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuf({} bytes)", self.len())
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = pool.iter().map(AlignedBuf::len).sum();
        if held + buf.len() <= POOL_BYTES {
            pool.push(buf);
        }
    }
}

/// Rounds `n` down to a multiple of [`real::DIRECT_ALIGN`].
pub fn align_down(n: u64) -> u64 {
    n & !(real::DIRECT_ALIGN as u64 - 1)
}

/// Writes `buf[from..to]` at `base + from`, where `base` is aligned and `buf` is an
/// [`AlignedBuf`]'s slice: the whole blocks in the middle go the direct way
/// ([`File::write_at_direct`]), a partial block at either end through the page cache (the
/// kernel keeps the two coherent: a direct write flushes and drops cached pages it covers).
pub fn write_split(f: &dyn File, buf: &[u8], base: u64, from: usize, to: usize) -> io::Result<()> {
    debug_assert_eq!(align_down(base), base);
    if from >= to {
        return Ok(());
    }
    let a = (from.next_multiple_of(real::DIRECT_ALIGN)).min(to);
    let b = align_down(to as u64) as usize;
    if a >= b {
        return f.write_at(&buf[from..to], base + from as u64);
    }
    if from < a {
        f.write_at(&buf[from..a], base + from as u64)?;
    }
    f.write_at_direct(&buf[a..b], base + a as u64)?;
    if b < to {
        f.write_at(&buf[b..to], base + b as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod aligned_tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_aligned_reused_and_bounded() {
        let mut a = pooled(300_000);
        assert!(a.len() >= 300_000);
        assert_eq!(a.as_slice().as_ptr() as usize % real::DIRECT_ALIGN, 0);
        a.as_mut_slice()[0] = 7;
        let p = a.as_slice().as_ptr();
        drop(a);
        // (other tests may take buffers from the pool meanwhile: look for ours among a few)
        let again: Vec<PooledBuf> = (0..4).map(|_| pooled(290_000)).collect();
        assert!(again.iter().any(|b| b.as_slice().as_ptr() == p));
        // A much larger request does not get a small buffer, nor a small one a huge buffer.
        let big = pooled(4 << 20);
        assert!(big.len() >= 4 << 20 && big.len() <= 5 << 20);
        drop(again);
        let held = || {
            POOL.lock()
                .unwrap()
                .iter()
                .map(AlignedBuf::len)
                .sum::<usize>()
        };
        let many: Vec<PooledBuf> = (0..40).map(|_| pooled(4 << 20)).collect();
        drop(many);
        assert!(held() <= POOL_BYTES);
    }

    #[test]
    fn aligned_buffer_and_split_writes() {
        // Large ones are aligned for huge pages, and zeroed like the small ones.
        let huge = AlignedBuf::new(HUGE_PAGE + 1);
        assert_eq!(huge.len(), HUGE_PAGE + real::DIRECT_ALIGN);
        assert_eq!(huge.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
        assert!(huge.as_slice().iter().all(|&x| x == 0));
        let mut b = AlignedBuf::new(10_000);
        assert_eq!(b.len(), 3 * real::DIRECT_ALIGN);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        assert_eq!(b.as_slice().as_ptr() as usize % real::DIRECT_ALIGN, 0);
        for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
            *x = i as u8;
        }
        let d = mem::MemDir::new();
        let f = d.open("f", OpenMode::Create).unwrap();
        // Every split of a range lands where it belongs.
        for (from, to) in [(0, 12288), (100, 200), (100, 9000), (4096, 8192), (5, 4096)] {
            write_split(&*f, b.as_slice(), 8192, from, to).unwrap();
            let mut got = vec![0; to - from];
            f.read_exact_at(&mut got, 8192 + from as u64).unwrap();
            assert_eq!(got, &b.as_slice()[from..to]);
        }
    }
}
