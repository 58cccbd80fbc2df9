//! Page-aligned payload buffers.

use std::alloc::Layout;
use std::ptr::NonNull;

use bytes::Bytes;

/// Alignment of payload buffers: the page size, which satisfies O_DIRECT on every device.
pub const ALIGN: usize = 4096;

/// Payloads from this size on get an aligned buffer; smaller writes are cheaper through the page
/// cache anyway, where the kernel batches them.
pub const MIN_ALIGNED_PAYLOAD: usize = 64 << 10;

/// A zero-initialised buffer whose start is aligned to [`ALIGN`]: an anonymous memory mapping
/// of its own. The kernel hands out mapped pages zeroed as they are first touched; the
/// allocator's aligned `alloc_zeroed` zeroed the whole buffer again with `memset` (3.6 % of the
/// daemon's CPU in a sequential `/dev/mars` write, where most buffers are fresh: the index
/// holds more payloads than the pool keeps). Unmapped when dropped, so memory goes back to
/// the system at once.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

/// Size classes the pool keeps: capacities `MIN_ALIGNED_PAYLOAD << k` for `k < CLASSES`
/// (64 KiB .. 1 GiB); larger buffers are never pooled.
const CLASSES: usize = 15;
const MIN_CLASS_SHIFT: u32 = MIN_ALIGNED_PAYLOAD.trailing_zeros();

/// Payload buffers kept for reuse, per size class, by every connection and device of the
/// process together, at most [`POOL_BYTES`] of them. A sequential writer's payloads live until
/// writeback wrote them (hundreds of MiB); without reuse every one was a fresh allocation that
/// the kernel faults in and zeroes page by page, and that the allocator zeroed again. Taking
/// and returning a buffer are O(1) under the lock (a free list per class and a running total):
/// the lock is taken twice per large write by every writer thread.
static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    held: 0,
});

struct Pool {
    /// Free buffers per size class (index: log2(capacity / MIN_ALIGNED_PAYLOAD)).
    free: [Vec<AlignedBuf>; CLASSES],
    /// Bytes of all buffers in `free`.
    held: usize,
}

/// The size class of a capacity (a power of two), if it is pooled.
fn class_of(cap: usize) -> Option<usize> {
    let k = cap.trailing_zeros().checked_sub(MIN_CLASS_SHIFT)? as usize;
    (k < CLASSES).then_some(k)
}

/// Bytes the pool holds at most.
pub const POOL_BYTES: usize = 64 << 20;

/// A payload buffer of `len` bytes from the pool (its capacity is `len` rounded up to a power
/// of two, at least [`MIN_ALIGNED_PAYLOAD`]): reused, so its bytes are whatever the last user
/// left; the caller overwrites them all. It goes back to the pool when the last
/// [`bytes::Bytes`] made of it is dropped.
pub fn pooled(len: usize) -> Pooled {
    let cap = len.max(MIN_ALIGNED_PAYLOAD).next_power_of_two();
    let reused = class_of(cap).and_then(|k| {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let b = pool.free[k].pop()?;
        pool.held -= b.len;
        Some(b)
    });
    Pooled {
        buf: Some(reused.unwrap_or_else(|| AlignedBuf::zeroed(cap))),
        len,
    }
}

/// `data` copied into a page-aligned buffer from the pool, as [`Bytes`] (one copy, the same as
/// `Bytes::copy_from_slice`): a writer whose payload arrives in someone else's buffer (a FUSE
/// request) gets what the NBD server reads into, a payload the disk can take with O_DIRECT.
pub fn copy_aligned(data: &[u8]) -> Bytes {
    let mut buf = pooled(data.len());
    buf.as_mut().copy_from_slice(data);
    Bytes::from_owner(buf)
}

/// A buffer from [`pooled`]; see there.
pub struct Pooled {
    buf: Option<AlignedBuf>,
    len: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("present until dropped").as_ref()[..self.len]
    }
}

impl AsMut<[u8]> for Pooled {
    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buf.as_mut().expect("present until dropped").as_mut()[..len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let Some(k) = class_of(buf.len) else { return };
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.held + buf.len <= POOL_BYTES {
            pool.held += buf.len;
            pool.free[k].push(buf);
        }
        // Otherwise `buf` is freed here, after the lock is released (dropped last).
    }
}

// SAFETY: the buffer is uniquely owned plain memory; nothing about it is tied to a thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only through `as_ref`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (a length of 0 maps one page).
    pub fn zeroed(len: usize) -> Self {
        let map_len = len.max(1);
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            // Out of memory (or address space): the same end as a failed heap allocation.
            let layout = Layout::from_size_align(map_len, ALIGN).unwrap_or(Layout::new::<u8>());
            std::alloc::handle_alloc_error(layout);
        }
        let ptr = NonNull::new(raw.cast::<u8>()).expect("mmap does not return null on success");
        // mmap returns whole pages, and pages are at least ALIGN bytes.
        debug_assert!((ptr.as_ptr() as usize).is_multiple_of(ALIGN));
        Self { ptr, len }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed, then written) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: mapped in `zeroed` with this address and length, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len.max(1)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_aligned_and_come_back() {
        let mut a = pooled(100_000);
        assert_eq!(a.as_ref().len(), 100_000);
        assert_eq!(a.as_ref().as_ptr() as usize % ALIGN, 0);
        a.as_mut()[99_999] = 9;
        let bytes = bytes::Bytes::from_owner(a);
        assert_eq!(bytes[99_999], 9);
        drop(bytes);
        // Same size class (128 KiB): the buffer comes back (other tests may take it first, so
        // only alignment and length are certain).
        let b = pooled(70_000);
        assert_eq!(b.as_ref().len(), 70_000);
        assert_eq!(b.as_ref().as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn size_classes() {
        assert_eq!(class_of(MIN_ALIGNED_PAYLOAD), Some(0));
        assert_eq!(class_of(MIN_ALIGNED_PAYLOAD * 2), Some(1));
        assert_eq!(
            class_of(MIN_ALIGNED_PAYLOAD << (CLASSES - 1)),
            Some(CLASSES - 1)
        );
        assert_eq!(class_of(MIN_ALIGNED_PAYLOAD << CLASSES), None);
        assert_eq!(class_of(4096), None);
        // Small requests share the smallest class instead of a pool of tiny buffers.
        let small = pooled(5);
        assert_eq!(small.buf.as_ref().map(|b| b.len), Some(MIN_ALIGNED_PAYLOAD));
        assert_eq!(small.as_ref().len(), 5);
    }

    #[test]
    fn copy_aligned_copies_exactly() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let b = copy_aligned(&data);
        assert_eq!(&b[..], &data[..]);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn pool_stays_within_its_budget() {
        // Returning more than the budget keeps at most POOL_BYTES (other tests share the pool,
        // so only the bound is certain).
        let bufs: Vec<Pooled> = (0..(POOL_BYTES / (1 << 20)) + 8)
            .map(|_| pooled(1 << 20))
            .collect();
        drop(bufs);
        let pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        assert!(pool.held <= POOL_BYTES, "{}", pool.held);
        let counted: usize = pool.free.iter().flatten().map(|b| b.len).sum();
        let held = pool.held;
        drop(pool);
        assert_eq!(counted, held);
    }

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(10_000);
        assert_eq!(b.as_ref().as_ptr() as usize % ALIGN, 0);
        assert!(b.as_ref().iter().all(|&x| x == 0));
        b.as_mut()[9_999] = 7;
        let bytes = bytes::Bytes::from_owner(b);
        assert_eq!(bytes[9_999], 7);
        assert_eq!(bytes.len(), 10_000);
    }
}
