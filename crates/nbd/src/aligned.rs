//! Page-aligned payload buffers.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of payload buffers: the page size, which satisfies O_DIRECT on every device.
pub const ALIGN: usize = 4096;

/// Payloads from this size on get an aligned buffer; smaller writes are cheaper through the page
/// cache anyway, where the kernel batches them.
pub const MIN_ALIGNED_PAYLOAD: usize = 64 << 10;

/// A zero-initialised heap buffer whose start is aligned to [`ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

/// Payload buffers kept for reuse, per size class (a power of two from
/// [`MIN_ALIGNED_PAYLOAD`] on), by every connection of the process together, at most
/// [`POOL_BYTES`] of them. A sequential writer's payloads live until writeback wrote them
/// (hundreds of MiB); without reuse every one was a fresh allocation that the kernel faults in
/// and zeroes page by page, and that the allocator zeroed again.
static POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

/// Bytes the pool holds at most.
pub const POOL_BYTES: usize = 64 << 20;

/// A payload buffer of `len` bytes from the pool (its capacity is `len` rounded up to a power
/// of two): reused, so its bytes are whatever the last user left; the caller overwrites them
/// all. It goes back to the pool when the last [`bytes::Bytes`] made of it is dropped.
pub fn pooled(len: usize) -> Pooled {
    let cap = len.max(1).next_power_of_two();
    let reused = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.iter()
            .position(|b| b.len == cap)
            .map(|i| pool.swap_remove(i))
    };
    Pooled {
        buf: Some(reused.unwrap_or_else(|| AlignedBuf::zeroed(cap))),
        len,
    }
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
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = pool.iter().map(|b| b.len).sum();
        if held + buf.len <= POOL_BYTES {
            pool.push(buf);
        }
    }
}

// SAFETY: the buffer is uniquely owned plain memory; nothing about it is tied to a thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only through `as_ref`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` must be non-zero (payloads below [`ALIGN`] use ordinary buffers).
    pub fn zeroed(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), ALIGN).expect("payload size is bounded");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len, layout }
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
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
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
