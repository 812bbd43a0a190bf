//! [`AlignedBuf`]: a zero-filled, page-aligned heap buffer for O_DIRECT I/O.
//!
//! Invariant: the allocation behind a buffer is at least as long as the buffer (and at least
//! one byte), aligned to [`AlignedBuf::ALIGN`], and freed with the very layout it was allocated
//! with; no slice longer than the allocation is ever handed out. A length for which no such
//! allocation exists is refused ([`AlignedBuf::try_zeroed`]) instead of being served by a
//! smaller one.

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;

/// A page-aligned heap buffer, usable for O_DIRECT I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The layout `ptr` was allocated with: `layout.size() >= len.max(1)`,
    /// `layout.align() == ALIGN`.
    layout: Layout,
}

// SAFETY: an AlignedBuf owns its allocation exclusively (nothing else holds `ptr`), like a
// Vec<u8>, so moving it to another thread moves the only access to the bytes with it.
unsafe impl Send for AlignedBuf {}
// SAFETY: through `&AlignedBuf` only `&[u8]` is handed out (mutation needs `&mut self`), and
// shared reads of plain bytes from several threads are sound.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    /// A zero-filled buffer of `len` bytes. Panics, like `vec![0u8; len]`, when `len` is too
    /// large for any allocation (over `isize::MAX` rounded down to the alignment); callers
    /// that take the length from outside use [`AlignedBuf::try_zeroed`].
    pub fn zeroed(len: usize) -> Self {
        match Self::try_zeroed(len) {
            Ok(buf) => buf,
            Err(e) => panic!("{e}"),
        }
    }

    /// A zero-filled buffer of `len` bytes, or an `OutOfMemory` error when `len` is too large
    /// for an allocation. A failing allocator aborts, as for every other heap allocation.
    pub fn try_zeroed(len: usize) -> io::Result<Self> {
        let Some(layout) = Self::layout(len) else {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("an aligned buffer of {len} bytes is larger than any allocation"),
            ));
        };
        // SAFETY: `layout` has a non-zero size (`layout` guarantees at least one byte), which
        // is all `alloc_zeroed` requires.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Ok(AlignedBuf { ptr, len, layout })
    }

    /// The layout of a `len`-byte buffer: `len` bytes (at least one, so that the allocation is
    /// never zero-sized) aligned to [`Self::ALIGN`]. `None` when the size rounded up to the
    /// alignment would overflow `isize`: there is no allocation that long, and a smaller one
    /// must never stand in for it.
    fn layout(len: usize) -> Option<Layout> {
        Layout::from_size_align(len.max(1), Self::ALIGN).ok()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of `layout.size() >= len` bytes (the struct's
        // invariant), all initialised (zeroed at allocation, and only ever written through
        // `&mut [u8]` since), alive until `drop`; `len <= layout.size() <= isize::MAX`; the
        // returned borrow of `self` forbids mutation and freeing while the slice lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only access to the bytes while
        // the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated by the global allocator with exactly `self.layout` (in
        // `try_zeroed`) and is freed only here, once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    /// The layout always covers the whole buffer. The layout used to fall back to a 4096-byte
    /// one for a length with no valid layout while the buffer kept that length: `zeroed(len)`
    /// for `len` above `isize::MAX - 4095` then allocated 4096 bytes and `as_slice` made a
    /// slice of `len` bytes over them. That slice cannot be observed without undefined
    /// behaviour (building it is already UB, reading it reads past the allocation), so the
    /// test checks the layout, which the slice's soundness rests on, and the refusal.
    #[test]
    fn the_allocation_always_covers_the_buffer() {
        let max = isize::MAX as usize;
        for len in [
            0,
            1,
            4095,
            4096,
            1 << 20,
            max - 4095,
            max - 4094,
            max,
            usize::MAX,
        ] {
            match AlignedBuf::layout(len) {
                Some(l) => {
                    assert!(l.size() >= len.max(1), "layout of {len} bytes: {l:?}");
                    assert_eq!(l.align(), AlignedBuf::ALIGN);
                }
                None => assert!(len > max - 4095, "{len} bytes must have a layout"),
            }
        }
        let huge = AlignedBuf::try_zeroed(usize::MAX);
        assert!(
            huge.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::OutOfMemory),
            "a buffer longer than any allocation is refused"
        );
        let caught = std::panic::catch_unwind(|| AlignedBuf::zeroed(max).len());
        assert!(
            caught.is_err(),
            "zeroed panics rather than hand out a short buffer"
        );
    }

    #[test]
    fn buffers_are_aligned_zeroed_and_as_long_as_asked() {
        for len in [0, 1, 512, 4096, 5000] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % AlignedBuf::ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.iter_mut().for_each(|x| *x = 7);
            assert!(b.as_slice().iter().all(|&x| x == 7));
        }
    }
}
