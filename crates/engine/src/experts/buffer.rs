//! Page-aligned heap buffers: what O_DIRECT reads need (address, offset and length aligned to the
//! logical block size; 4096 covers every NVMe we target), and good for page-cache reads too.
//!
//! Buffers come from a `BufPool` and go back to it when dropped: a fresh multi-megabyte
//! allocation is a new mapping whose pages fault in (and are zeroed) in the I/O thread before the
//! read even reaches the device, which measurably cost read bandwidth (docs/performance.md).
//!
//! A GPU backend can give the pool its own host memory ([`HostMemory`]: CUDA pinned memory), so
//! that an expert in the RAM tier crosses PCIe by DMA straight from its buffer, with no staging
//! copy and no CPU time.

use crate::weights::store::ByteSource;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, RwLock, Weak};

pub const BUF_ALIGN: usize = 4096;

/// Host memory other than the heap for a pool's buffers (kept in the storage layer as a trait so
/// that it knows nothing of the device that provides it).
pub trait HostMemory: Send + Sync {
    /// `len` bytes aligned to [`BUF_ALIGN`], or None (the pool then uses the heap).
    fn alloc(&self, len: usize) -> Option<NonNull<u8>>;
    /// Frees what `alloc` returned.
    ///
    /// # Safety
    /// `p` came from this value's `alloc(len)` and is not used afterwards.
    unsafe fn free(&self, p: NonNull<u8>, len: usize);
    /// For reports: what kind of memory this is.
    fn name(&self) -> &'static str;
}

struct Raw {
    ptr: NonNull<u8>,
    len: usize,
    /// Where it came from when not the heap.
    mem: Option<Arc<dyn HostMemory>>,
}

// SAFETY: a raw allocation owned by whoever holds it; moved between threads whole.
unsafe impl Send for Raw {}

impl Raw {
    fn alloc(len: usize, mem: Option<&Arc<dyn HostMemory>>) -> Raw {
        if let Some(m) = mem
            && let Some(ptr) = m.alloc(len.max(1))
        {
            debug_assert_eq!(ptr.as_ptr() as usize % BUF_ALIGN, 0);
            // SAFETY: `alloc` returned at least len bytes; zeroed like the heap's buffers.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
            return Raw { ptr, len, mem: Some(m.clone()) };
        }
        let layout = Layout::from_size_align(len.max(1), BUF_ALIGN).expect("valid layout");
        // SAFETY: non-zero size, valid alignment.
        let p = unsafe { alloc_zeroed(layout) };
        Raw { ptr: NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout)), len, mem: None }
    }
    fn free(self) {
        match &self.mem {
            // SAFETY: allocated by this HostMemory with this length.
            Some(m) => unsafe { m.free(self.ptr, self.len.max(1)) },
            None => {
                let layout = Layout::from_size_align(self.len.max(1), BUF_ALIGN).expect("valid layout");
                // SAFETY: allocated in `alloc` with the same layout.
                unsafe { dealloc(self.ptr.as_ptr(), layout) }
            }
        }
    }
}

/// A bounded free list of buffers, reused by size.
pub struct BufPool {
    free: Mutex<Vec<Raw>>,
    max_free_bytes: usize,
    /// Where new buffers come from (the heap when None).
    mem: RwLock<Option<Arc<dyn HostMemory>>>,
    heap_allocs: std::sync::atomic::AtomicU64,
    /// `get_fast` allocates from `mem` too.
    eager: std::sync::atomic::AtomicBool,
}

impl BufPool {
    pub fn new(max_free_bytes: usize) -> Arc<Self> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            max_free_bytes,
            mem: RwLock::new(None),
            heap_allocs: Default::default(),
            eager: Default::default(),
        })
    }

    /// New buffers from [`BufPool::get`] come from `mem` from now on, and from
    /// [`BufPool::get_fast`] too when `eager` (buffers already made, free or not, stay as they
    /// are and are reused).
    pub fn set_host_memory(&self, mem: Arc<dyn HostMemory>, eager: bool) {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        self.eager.store(eager, std::sync::atomic::Ordering::Relaxed);
    }

    /// The name of the host memory new buffers come from, when not the heap.
    pub fn host_memory(&self) -> Option<&'static str> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|m| m.name())
    }

    /// A buffer of `len` bytes (contents unspecified when reused: callers overwrite what they
    /// use): a free one (one in host memory first), else a new one from the host memory when
    /// the pool has one. Allocating pinned memory takes milliseconds per megabyte: for threads
    /// that can wait (a background pre-warm).
    pub fn get(self: &Arc<Self>, len: usize) -> AlignedBuf {
        self.take(len, true)
    }

    /// As [`BufPool::get`], but a new buffer comes from the heap (fast): for a step's own reads.
    pub fn get_fast(self: &Arc<Self>, len: usize) -> AlignedBuf {
        self.take(len, self.eager.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A buffer of `len` bytes in the pool's host memory (a free one, else a new one), or None
    /// when the pool has none or it cannot allocate.
    pub fn get_in_host_memory(self: &Arc<Self>, len: usize) -> Option<AlignedBuf> {
        let reused = {
            let mut f = self.free.lock().unwrap();
            f.iter().position(|r| r.len == len && r.mem.is_some()).map(|i| f.swap_remove(i))
        };
        let raw = match reused {
            Some(r) => r,
            None => {
                let mem = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()?;
                let r = Raw::alloc(len, Some(&mem));
                if r.mem.is_none() {
                    r.free();
                    return None;
                }
                r
            }
        };
        Some(AlignedBuf { raw: Some(raw), pool: Arc::downgrade(self) })
    }

    /// Heap buffers made by [`BufPool::get_fast`] while the pool had host memory: a count
    /// that says when there may be buffers to move into it.
    pub fn heap_allocations(&self) -> u64 {
        self.heap_allocs.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(self: &Arc<Self>, len: usize, may_use_host_memory: bool) -> AlignedBuf {
        let reused = {
            let mut f = self.free.lock().unwrap();
            let same = |r: &Raw| r.len == len;
            f.iter()
                .position(|r| same(r) && r.mem.is_some())
                .or_else(|| f.iter().position(same))
                .map(|i| f.swap_remove(i))
        };
        let raw = reused.unwrap_or_else(|| {
            let mem = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone();
            if mem.is_some() && !may_use_host_memory {
                self.heap_allocs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Raw::alloc(len, None);
            }
            Raw::alloc(len, mem.as_ref())
        });
        AlignedBuf { raw: Some(raw), pool: Arc::downgrade(self) }
    }

    fn put(&self, raw: Raw) {
        let mut f = self.free.lock().unwrap();
        let held: usize = f.iter().map(|r| r.len).sum();
        if held + raw.len <= self.max_free_bytes {
            f.push(raw);
        } else {
            drop(f);
            raw.free();
        }
    }

    /// Bytes held in the free list.
    pub fn free_bytes(&self) -> usize {
        self.free.lock().unwrap().iter().map(|r| r.len).sum()
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
        AlignedBuf { raw: Some(Raw::alloc(len, None)), pool: Weak::new() }
    }

    pub fn len(&self) -> usize {
        self.raw.as_ref().map_or(0, |r| r.len)
    }

    /// The name of the host memory it lives in when not the heap (e.g. "pinned": a GPU can
    /// copy it by DMA directly).
    pub fn host_memory(&self) -> Option<&'static str> {
        self.raw.as_ref().and_then(|r| r.mem.as_ref()).map(|m| m.name())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let r = self.raw.as_ref().expect("live buffer");
        // SAFETY: ptr is valid for len bytes and uniquely borrowed here.
        unsafe { std::slice::from_raw_parts_mut(r.ptr.as_ptr(), r.len) }
    }
}

impl ByteSource for AlignedBuf {
    fn bytes(&self) -> &[u8] {
        let r = self.raw.as_ref().expect("live buffer");
        // SAFETY: ptr is valid for len bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(r.ptr.as_ptr(), r.len) }
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

    /// Host memory from the heap that counts what it hands out (a stand-in for pinned memory).
    struct Counting(std::sync::atomic::AtomicUsize);

    impl HostMemory for Counting {
        fn alloc(&self, len: usize) -> Option<NonNull<u8>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let layout = Layout::from_size_align(len, BUF_ALIGN).ok()?;
            // SAFETY: non-zero size (the pool asks for at least 1), valid alignment.
            NonNull::new(unsafe { std::alloc::alloc(layout) })
        }
        unsafe fn free(&self, p: NonNull<u8>, len: usize) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p.as_ptr(), Layout::from_size_align(len, BUF_ALIGN).unwrap()) }
        }
        fn name(&self) -> &'static str {
            "counting"
        }
    }

    #[test]
    fn host_memory_serves_new_buffers_and_free_ones_are_reused_host_memory_first() {
        let pool = BufPool::new(4 * 8192);
        let heap = pool.get(8192);
        let mem = Arc::new(Counting(Default::default()));
        pool.set_host_memory(mem.clone(), false);
        assert_eq!(pool.host_memory(), Some("counting"));
        let a = pool.get(8192);
        assert_eq!(a.host_memory(), Some("counting"));
        assert!(a.bytes().iter().all(|&b| b == 0), "fresh buffers are zeroed");
        assert_eq!(a.bytes().as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(heap.host_memory(), None);
        // A step's own read never waits for the slow allocator.
        let fast = pool.get_fast(8192);
        assert_eq!(fast.host_memory(), None);
        let addr = a.bytes().as_ptr();
        drop((heap, fast, a));
        assert_eq!(pool.free_bytes(), 3 * 8192);
        // Both kinds are reused; host memory first, for fast gets too.
        let b = pool.get_fast(8192);
        assert_eq!(b.bytes().as_ptr(), addr, "the host-memory buffer is reused first");
        let c = pool.get(8192);
        assert_eq!(c.host_memory(), None, "then a free heap buffer rather than a new allocation");
        assert_eq!(mem.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        drop((b, c));
        drop(pool);
        assert_eq!(mem.0.load(std::sync::atomic::Ordering::Relaxed), 0, "everything handed back");
    }
}
