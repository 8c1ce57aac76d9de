//! The process's allocator: the system's, with every block of 4 KiB or more on a 64-byte
//! line. The CPU's AMX products read and write their f32 output tiles in place only where
//! the output's rows start on lines (a tile row across two lines costs about 7x), and the
//! engine's buffers are plain `Vec<f32>`, aligned as the allocator places them.
//!
//! The binary installs it (`main.rs`), as do the unit tests; an integration test that counts
//! allocations wraps it.

use std::alloc::{GlobalAlloc, Layout, System};

/// See the module docs.
pub struct Aligned;

/// Blocks this large or larger start on a line.
const LARGE: usize = 4096;
const LINE: usize = 64;

/// The layout a block of `l` gets from the system.
fn placed(l: Layout) -> Layout {
    if l.size() >= LARGE && l.align() < LINE {
        // The size is unchanged and the alignment a power of two: valid whenever `l` is.
        Layout::from_size_align(l.size(), LINE).unwrap_or(l)
    } else {
        l
    }
}

// SAFETY: every block is allocated and freed by `System` with the same layout, `placed` of
// the caller's, which keeps its size and at least its alignment.
unsafe impl GlobalAlloc for Aligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: `placed` keeps a non-zero size.
        unsafe { System.alloc(placed(l)) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(placed(l)) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` with this `l`, so from `System` with `placed(l)`.
        unsafe { System.dealloc(p, placed(l)) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        // SAFETY: the caller gives a size valid with l's alignment.
        let grown = unsafe { Layout::from_size_align_unchecked(size, l.align()) };
        if placed(grown).align() == placed(l).align() {
            // SAFETY: `p` is System's with `placed(l)`, and the new block keeps its alignment.
            return unsafe { System.realloc(p, placed(l), size) };
        }
        // Across the threshold: a new block on the other alignment.
        // SAFETY: as `alloc`, then a copy of the bytes both blocks hold, then `dealloc`.
        unsafe {
            let q = self.alloc(grown);
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(size));
                self.dealloc(p, l);
            }
            q
        }
    }
}

#[cfg(test)]
mod tests {
    /// The unit tests run on this allocator (`lib.rs`): large blocks start on lines, across
    /// growth past the threshold too; small ones keep their own alignment.
    #[test]
    fn large_blocks_start_on_a_line() {
        for len in [1024usize, 1025, 5000, 1 << 20] {
            let v = vec![0f32; len];
            assert_eq!(v.as_ptr() as usize % 64, 0, "{len} f32");
        }
        let mut v: Vec<f32> = Vec::with_capacity(8);
        v.extend((0..3000).map(|i| i as f32));
        assert_eq!(v.as_ptr() as usize % 64, 0, "grown past the threshold");
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32), "kept its values");
        v.truncate(10);
        v.shrink_to_fit();
        assert_eq!(v, (0..10).map(|i| i as f32).collect::<Vec<_>>(), "shrunk below it");
    }
}
