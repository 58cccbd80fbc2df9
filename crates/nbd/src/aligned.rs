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
