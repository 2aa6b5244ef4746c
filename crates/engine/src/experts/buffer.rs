//! Page-aligned heap buffers: what O_DIRECT reads need (address, offset and length aligned to the
//! logical block size; 4096 covers every NVMe we target), and good for page-cache reads too.
//!
//! Buffers come from a `BufPool` and go back to it when dropped: a fresh multi-megabyte
//! allocation is a new mapping whose pages fault in (and are zeroed) in the I/O thread before the
//! read even reaches the device, which measurably cost read bandwidth (docs/performance.md).

use crate::weights::store::ByteSource;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

pub const BUF_ALIGN: usize = 4096;

struct Raw(NonNull<u8>, usize);

// SAFETY: a raw allocation owned by whoever holds it; moved between threads whole.
unsafe impl Send for Raw {}

impl Raw {
    fn alloc(len: usize) -> Raw {
        let layout = Layout::from_size_align(len.max(1), BUF_ALIGN).expect("valid layout");
        // SAFETY: non-zero size, valid alignment.
        let p = unsafe { alloc_zeroed(layout) };
        Raw(NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout)), len)
    }
    fn free(self) {
        let layout = Layout::from_size_align(self.1.max(1), BUF_ALIGN).expect("valid layout");
        // SAFETY: allocated in `alloc` with the same layout.
        unsafe { dealloc(self.0.as_ptr(), layout) }
    }
}

/// A bounded free list of buffers, reused by size.
pub struct BufPool {
    free: Mutex<Vec<Raw>>,
    max_free_bytes: usize,
}

impl BufPool {
    pub fn new(max_free_bytes: usize) -> Arc<Self> {
        Arc::new(BufPool { free: Mutex::new(Vec::new()), max_free_bytes })
    }

    /// A buffer of `len` bytes (contents unspecified when reused: callers overwrite what they use).
    pub fn get(self: &Arc<Self>, len: usize) -> AlignedBuf {
        let reused = {
            let mut f = self.free.lock().unwrap();
            f.iter().position(|r| r.1 == len).map(|i| f.swap_remove(i))
        };
        AlignedBuf { raw: Some(reused.unwrap_or_else(|| Raw::alloc(len))), pool: Arc::downgrade(self) }
    }

    fn put(&self, raw: Raw) {
        let mut f = self.free.lock().unwrap();
        let held: usize = f.iter().map(|r| r.1).sum();
        if held + raw.1 <= self.max_free_bytes {
            f.push(raw);
        } else {
            drop(f);
            raw.free();
        }
    }

    /// Bytes held in the free list.
    pub fn free_bytes(&self) -> usize {
        self.free.lock().unwrap().iter().map(|r| r.1).sum()
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        for r in self.free.get_mut().unwrap().drain(..) {
            r.free();
        }
    }
}

pub struct AlignedBuf {
    raw: Option<Raw>,
    pool: Weak<BufPool>,
}

// SAFETY: the buffer is plain bytes owned uniquely by this value; shared access is read-only.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer outside any pool.
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf { raw: Some(Raw::alloc(len)), pool: Weak::new() }
    }

    pub fn len(&self) -> usize {
        self.raw.as_ref().map_or(0, |r| r.1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let r = self.raw.as_ref().expect("live buffer");
        // SAFETY: ptr is valid for len bytes and uniquely borrowed here.
        unsafe { std::slice::from_raw_parts_mut(r.0.as_ptr(), r.1) }
    }
}

impl ByteSource for AlignedBuf {
    fn bytes(&self) -> &[u8] {
        let r = self.raw.as_ref().expect("live buffer");
        // SAFETY: ptr is valid for len bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(r.0.as_ptr(), r.1) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            match self.pool.upgrade() {
                Some(p) => p.put(raw),
                None => raw.free(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_buffers_within_its_bound() {
        let pool = BufPool::new(2 * 8192);
        let a = pool.get(8192);
        let addr = a.bytes().as_ptr();
        assert_eq!(addr as usize % BUF_ALIGN, 0);
        drop(a);
        assert_eq!(pool.free_bytes(), 8192);
        let b = pool.get(8192);
        assert_eq!(b.bytes().as_ptr(), addr, "same allocation reused");
        let c = pool.get(8192);
        let d = pool.get(8192);
        drop((b, c, d));
        assert_eq!(pool.free_bytes(), 2 * 8192, "free list bounded");
        let e = pool.get(4096); // another size: fresh
        assert_eq!(e.len(), 4096);
    }
}
