//! The CUDA backend: the ops of the layer graph on one GPU.
//!
//! Non-expert weights are uploaded once (the family's weight tree mapped to [`Device`]
//! tensors). Routed experts live in a pool of fixed-size slots in GPU memory ([`ExpertPool`]),
//! filled on demand from the host tier (the expert store: its RAM cache, then the SSD) through
//! pinned staging buffers on a copy stream. The sequence state (KV caches, conv windows,
//! delta-rule states) stays on the GPU.
//!
//! A decode step synchronizes with the host once per layer, to learn the routed expert ids; the
//! shared expert and the experts already in the pool are launched before the host looks at the
//! misses, so the GPU computes them while the misses are read and copied, and each missed
//! expert's compute waits only for its own copy (expert i's copy overlaps expert i−1's compute).
//! With every expert resident a step never waits for the host and is recorded once in a CUDA
//! graph and replayed ([`Backend::run`]). Prefill runs up to `prefill_chunk` tokens per pass
//! with multi-token GEMMs.
//!
//! Numerics: f32 activations and accumulation everywhere, like the CPU backend. Prefill's matrix
//! products run on tensor cores by default (`Precision::Tensor`) with every operand split into a
//! hi and a lo part (bf16 for cuBLAS, TF32 for the expert GEMM, whose codes are exact), so they
//! keep f32-grade accuracy; `Precision::F32` keeps them on CUDA cores, and then results differ
//! from the CPU by summation order only.

use super::context::{CudaDevice, CudaError, DevBuf, Result};
use super::gemv::{
    AffineVariant, BatchItem, DevFormat, DevMatrix, GemvKernels, MatView, TC_MIN_SUM_GROUP, TC_PAIRS, TcInput,
    float_of_ggml,
};
use super::ops::ForwardKernels;
use crate::backend::{
    Backend, BackendState, Bandwidths, DeviceOptions, GpuCache, Hybrid, PcieShare, Phase, Precision, TierCounters,
    TierInfo,
};
use crate::config::{LayerKind, ModelConfig};
use crate::experts::buffer::{AlignedBuf, BUF_ALIGN, HostMemory};
use crate::experts::cache::{CachePolicy, CacheValue, ExpertCache, ExpertKey};
use crate::experts::{ExpertSet, ExpertStore, ExpertWeights};
use crate::layers::{
    AttentionWeights, Convert, DeltaNetWeights, Host, LayerTimes, LogitsFor, MoeWeights, PassInput, PassOutput,
    PassSpec, Tensors,
};
use crate::weights::Linear;
use crate::weights::store::ByteSource;
use cudarc::driver::{CudaEvent, CudaStream};
use flashmoe_kernels::{FloatType, MatData, MatRef};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Counters since the model was put on the GPU.
#[derive(Default, Debug)]
struct GpuStats {
    pool_hits: AtomicU64,
    pool_misses: AtomicU64,
    /// Host-to-GPU expert bytes.
    h2d_bytes: AtomicU64,
    tokens: AtomicU64,
    /// GPU-cache misses computed by the CPU (hybrid decode).
    cpu_experts: AtomicU64,
    /// RAM-tier misses copied to transit memory and computed on the GPU (hybrid decode), and
    /// the host time choosing and queuing them (lookups, views, copies, launches).
    pcie_experts: AtomicU64,
    pcie_host_ns: AtomicU64,
    /// GPU-to-host bytes of evicted experts copied back into the RAM tier (exclusive tiers).
    d2h_bytes: AtomicU64,
    /// Experts the background pre-warm placed in the pool.
    prewarmed: AtomicU64,
    /// Host nanoseconds waiting for expert ids, and on the misses the CPU computes (lookups,
    /// views, the wait for the pool after issuing the PCIe share).
    ids_wait_ns: AtomicU64,
    cpu_ns: AtomicU64,
    /// The pool's expert kernels (overlapping the PCIe share's host work), and the RAM-tier
    /// lookups and views before them (part of `cpu_ns`).
    cpu_kernel_ns: AtomicU64,
    cpu_fetch_ns: AtomicU64,
    /// Host time queuing the CPU's expert outputs up to the GPU.
    upload_ns: AtomicU64,
    /// Host time inside the MoE op of decode steps with misses (waits, CPU experts, uploads,
    /// lookups, launches), and host time of those whole passes.
    moe_host_ns: AtomicU64,
    pass_host_ns: AtomicU64,
    /// Decode steps, and the GPU time from each one's first to its last operation (events).
    decode_steps: AtomicU64,
    decode_gpu_ns: AtomicU64,
    /// Prefill's MoE profile of the pass under way (`prefill_profile`).
    prefill: Mutex<PrefillProfile>,
}

/// Hand-over of pre-warmed experts from the store's reader thread to the pool.
type PrewarmFeed = (crate::experts::store::PrewarmRx, Arc<ExpertStore>);

/// Tensors on the GPU: matrices in their stored format, f32 vectors, and a layer's routed
/// experts as the host set they are copied from plus their slot layout.
pub struct Device;

impl Tensors for Device {
    type Mat = DevMatrix;
    type Vec = DevBuf;
    type Experts = DevExperts;
}

/// A layer's routed experts, seen from the GPU: where misses are read from, and where gate, up
/// and down sit inside a pool slot.
pub struct DevExperts {
    host: ExpertSet,
    layout: ExpertLayout,
}

// ---------------------------------------------------------------------------------------------
// Weights.

/// Host matrix → device matrix. Matrices made of several row ranges (Qwen3-Next's regrouped
/// projections) are concatenated; f16 is widened to f32 (the GPU kernels take f32, bf16, affine
/// and GGML block types); GGUF float tensors become float matrices.
fn upload_linear(dev: &CudaDevice, l: &Linear) -> Result<DevMatrix> {
    let mats: Vec<MatRef> = l
        .mats()
        .into_iter()
        .map(|m| match m.data {
            MatData::Ggml { ty, data } => MatRef { data: float_of_ggml(ty, data).unwrap_or(m.data), ..m },
            _ => m,
        })
        .collect();
    if mats.len() == 1 && !matches!(mats[0].data, MatData::Float { dtype: FloatType::F16, .. }) {
        return DevMatrix::upload(dev, &mats[0]);
    }
    let mut parts: [Vec<u8>; 3] = Default::default();
    let mut first: Option<MatData> = None;
    for m in &mats {
        match m.data {
            MatData::Affine { weight, scales, biases, .. } => {
                parts[0].extend_from_slice(weight);
                parts[1].extend_from_slice(scales);
                parts[2].extend_from_slice(biases);
            }
            MatData::Float { dtype: FloatType::F16, data } => {
                for c in data.chunks_exact(2) {
                    let v = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                    parts[0].extend_from_slice(&v.to_le_bytes());
                }
            }
            MatData::Float { data, .. } | MatData::Ggml { data, .. } => parts[0].extend_from_slice(data),
        }
        let same_kind = match (first, m.data) {
            (None, _) => true,
            (Some(MatData::Ggml { ty: a, .. }), MatData::Ggml { ty: b, .. }) => a == b,
            (Some(MatData::Float { dtype: a, .. }), MatData::Float { dtype: b, .. }) => a == b,
            (
                Some(MatData::Affine { bits: a, group_size: ga, .. }),
                MatData::Affine { bits: b, group_size: gb, .. },
            ) => (a, ga) == (b, gb),
            _ => false,
        };
        if !same_kind {
            return Err(CudaError::new("a matrix assembled from tensors of different types"));
        }
        first.get_or_insert(m.data);
    }
    let joined = match first.ok_or_else(|| CudaError::new("empty matrix"))? {
        MatData::Affine { bits, group_size, sb_dtype, .. } => {
            MatData::Affine { bits, group_size, weight: &parts[0], scales: &parts[1], biases: &parts[2], sb_dtype }
        }
        MatData::Float { dtype: FloatType::F16, .. } => MatData::Float { dtype: FloatType::F32, data: &parts[0] },
        MatData::Float { dtype, .. } => MatData::Float { dtype, data: &parts[0] },
        MatData::Ggml { ty, .. } => MatData::Ggml { ty, data: &parts[0] },
    };
    DevMatrix::upload(dev, &MatRef { data: joined, rows: l.rows(), cols: l.cols() })
}

// ---------------------------------------------------------------------------------------------
// Expert pool.

/// Byte offsets of one matrix inside a pool slot.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MatLayout {
    format: DevFormat,
    rows: usize,
    cols: usize,
    w: usize,
    s: usize,
    b: usize,
}

impl MatLayout {
    /// Offsets and shape as the expert kernels take them (`MatOff`).
    fn mat_off(&self) -> super::gemv::MatOff {
        super::gemv::MatOff {
            w: self.w as u64,
            s: self.s as u64,
            b: self.b as u64,
            rows: self.rows as i32,
            cols: self.cols as i32,
        }
    }

    fn offsets(&self) -> super::gemv::MatOffsets {
        super::gemv::MatOffsets {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            w: self.w as u64,
            s: self.s as u64,
            b: self.b as u64,
        }
    }

    fn view(&self, base: u64) -> MatView {
        let affine = matches!(self.format, DevFormat::Affine { .. });
        MatView {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            w: base + self.w as u64,
            s: if affine { base + self.s as u64 } else { 0 },
            b: if affine { base + self.b as u64 } else { 0 },
        }
    }
}

/// Where gate, up and down sit in a slot, and the bytes the slot holds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ExpertLayout {
    mats: [MatLayout; 3],
    bytes: usize,
}

const SLOT_ALIGN: usize = 256;

/// Bytes of last-level cache on the machine: the sum over its distinct L3 instances (one per
/// socket, or per CCD on AMD), from Linux sysfs; 64 MiB where it cannot be read. The threads
/// that read experts run anywhere, so overwriting one instance is not enough.
fn last_level_cache_bytes() -> usize {
    // (sysfs writes sizes as `32768K`.)
    let size = |s: &str| crate::units::parse_size(s).ok().and_then(|b| usize::try_from(b).ok());
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    let Ok(cpus) = std::fs::read_dir("/sys/devices/system/cpu") else { return 64 << 20 };
    for cpu in cpus.flatten() {
        let name = cpu.file_name();
        let name = name.to_string_lossy();
        if !name.strip_prefix("cpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        for i in 0..8 {
            let dir = cpu.path().join(format!("cache/index{i}"));
            if std::fs::read_to_string(dir.join("level")).ok().as_deref().map(str::trim) != Some("3") {
                continue;
            }
            let shared = std::fs::read_to_string(dir.join("shared_cpu_list")).unwrap_or_default();
            if seen.insert(shared.trim().to_string())
                && let Some(b) = std::fs::read_to_string(dir.join("size")).ok().as_deref().and_then(size)
            {
                total = total.saturating_add(b);
            }
        }
    }
    if total == 0 { 64 << 20 } else { total.clamp(8 << 20, 4 << 30) }
}

/// How long the CPU's threads spin at most through a hybrid layer's wait for its expert ids
/// ([`flashmoe_kernels::WarmThreads`]): the GPU's part of a layer takes ≈ 0.1 ms.
const WARM_LIMIT: std::time::Duration = std::time::Duration::from_millis(1);

/// Whether hybrid decode keeps the CPU's threads spinning through its waits
/// (`FLASHMOE_WARM_THREADS=0`: no, for measuring what it buys).
fn warm_threads() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHMOE_WARM_THREADS").map_or(true, |v| v != "0"))
}

/// The token's expert MLP as one launch (`FLASHMOE_FUSED_EXPERTS=0`: gate+up, then down, as two
/// batched launches; for comparison).
fn fused_experts() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHMOE_FUSED_EXPERTS").map(|v| v != "0").unwrap_or(true))
}

/// Slots filled by DMA straight from pinned RAM-tier buffers instead of through the staging
/// buffers (a host copy each); `FLASHMOE_DIRECT_FILL=0` turns it off, for comparison. A prefill
/// that borrows its experts from a pinned RAM tier is bound by the staging copies otherwise
/// (docs/performance.md, "Experts-in-RAM prefill").
fn direct_fill() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHMOE_DIRECT_FILL").map_or(true, |v| v != "0"))
}

/// `pieces` (slot offset, host bytes), all inside one host buffer, as fewer copies: pieces next
/// to each other in slot order whose slot and host offsets differ by the same amount become one
/// copy of the host range that spans them. What it also copies lies between two pieces in the
/// host buffer and lands between them in the slot, where nothing else is. A packed expert blob
/// (components in slot order, 64-byte aligned) whose sizes are multiples of the slot alignment
/// becomes one copy.
fn coalesce_pieces<'a>(pieces: &[(usize, &'a [u8])]) -> Vec<(usize, &'a [u8])> {
    let ranges = merge_ranges(pieces.iter().map(|&(off, p)| (off, p.as_ptr() as usize, p.len())).collect());
    // SAFETY: each merged range runs from the start of one piece to the end of another in the
    // same live host buffer (the caller's contract), so it lies in that buffer.
    ranges
        .into_iter()
        .map(|(off, at, len)| (off, unsafe { std::slice::from_raw_parts(at as *const u8, len) }))
        .collect()
}

/// The merge of [`coalesce_pieces`] on (slot offset, host offset or address, length) ranges:
/// sorted by slot offset, empty ones dropped, neighbours at the same distance joined. Only when
/// the ranges lie in the same order, without overlap, in the host buffer too: then the host
/// bytes between two neighbours hold no other range either, so a merged copy back (GPU → host)
/// overwrites nothing it should not.
fn merge_ranges(mut ranges: Vec<(usize, usize, usize)>) -> Vec<(usize, usize, usize)> {
    ranges.retain(|r| r.2 > 0);
    ranges.sort_by_key(|r| r.0);
    if !ranges.windows(2).all(|w| w[0].1 + w[0].2 <= w[1].1) {
        return ranges;
    }
    let mut out: Vec<(usize, usize, usize)> = Vec::with_capacity(ranges.len());
    for (off, at, len) in ranges {
        // (Sorted in both orders: `at` and `off` are at or past the last range's starts.)
        if let Some((o0, a0, l0)) = out.last_mut()
            && at - *a0 == off - *o0
        {
            *l0 = at + len - *a0;
            continue;
        }
        out.push((off, at, len));
    }
    out
}

/// Copies `ranges` (source address, destination address, length) on the host in parallel
/// pieces of 256 KiB: one memcpy stream is slower than PCIe, and with 1 MiB pieces an expert of
/// 35B-A3B's size (three 512 KiB weights) kept only three threads busy (staging fills ran at
/// 11 GB/s on 16 cores).
///
/// # Safety
/// Every source range must be readable and every destination range writable for the whole
/// call, and no destination range may overlap another range.
unsafe fn par_copy(ranges: impl Iterator<Item = (usize, usize, usize)>) {
    const PIECE: usize = 256 << 10;
    let pieces: Vec<(usize, usize, usize)> = ranges
        .flat_map(|(src, dst, len)| (0..len).step_by(PIECE).map(move |o| (src + o, dst + o, (len - o).min(PIECE))))
        .collect();
    use rayon::prelude::*;
    pieces.par_iter().for_each(|&(src, dst, len)| {
        // SAFETY: inside the caller's ranges, which are live and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
    });
}

/// Copies back to the RAM tier in flight at once (exclusive tiers, [`CudaBackend::demote`]);
/// the host waits for the oldest only when one more is needed.
const DEMOTES_IN_FLIGHT: usize = 8;

/// A copy back to the RAM tier in flight: its GPU → host DMA is queued on the copy stream
/// (after the fills before it, before the fill that reuses the slot, so stream order keeps the
/// slot's bytes until they are copied); when `done` fires the expert is copied out of staging
/// (if it landed there) and admitted to the RAM tier.
struct PendingDemote {
    store: Arc<ExpertStore>,
    /// Pool layer (its `demote_map`) and the store's layer and expert.
    layer: usize,
    store_layer: usize,
    expert: usize,
    buf: AlignedBuf,
    /// Where the DMA landed when `buf` is not pinned memory.
    stage: Option<Pinned>,
    done: CudaEvent,
}

/// Whether hybrid decode issues the PCIe share while the pool computes the CPU's share
/// (`FLASHMOE_PCIE_OVERLAP=0`: before it, for measuring what the overlap buys).
fn pcie_overlap() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHMOE_PCIE_OVERLAP").map_or(true, |v| v != "0"))
}

/// The host byte ranges of one matrix: (weight, scales, biases) — the last two empty for floats.
fn mat_pieces<'a>(l: &'a Linear, what: &str) -> Result<(MatLayout, [&'a [u8]; 3])> {
    let mats = l.mats();
    let [m] = mats.as_slice() else {
        return Err(CudaError(format!("expert {what} is assembled from several tensors")));
    };
    let (format, pieces) = match m.data {
        MatData::Affine { bits, group_size, weight, scales, biases, sb_dtype } => {
            if sb_dtype != FloatType::BF16 {
                return Err(CudaError(format!("GPU experts take bf16 scales/biases, not {sb_dtype:?}")));
            }
            (DevFormat::Affine { bits, group_size }, [weight, scales, biases])
        }
        MatData::Float { dtype: FloatType::F32, data } => (DevFormat::F32, [data, &[][..], &[][..]]),
        MatData::Float { dtype: FloatType::BF16, data } => (DevFormat::Bf16, [data, &[][..], &[][..]]),
        MatData::Float { dtype: FloatType::F16, .. } => {
            return Err(CudaError::new("GPU experts do not take f16 weights (convert the model to bf16 or 4-bit)"));
        }
        MatData::Ggml { ty, data } => match float_of_ggml(ty, data) {
            Some(MatData::Float { dtype: FloatType::F32, data }) => (DevFormat::F32, [data, &[][..], &[][..]]),
            Some(MatData::Float { dtype: FloatType::BF16, data }) => (DevFormat::Bf16, [data, &[][..], &[][..]]),
            Some(_) => return Err(CudaError::new("GPU experts do not take f16 weights (GGUF F16 experts)")),
            None => (DevFormat::Ggml(ty), [data, &[][..], &[][..]]),
        },
    };
    format.check(m.rows, m.cols)?;
    Ok((MatLayout { format, rows: m.rows, cols: m.cols, w: 0, s: 0, b: 0 }, pieces))
}

/// Host byte ranges and the slot offsets they go to.
type Pieces<'a> = Vec<(usize, &'a [u8])>;

/// The slot layout of an expert and its host pieces in slot order.
fn expert_layout(e: &ExpertWeights) -> Result<(ExpertLayout, Pieces<'_>)> {
    let mut off = 0;
    let mut copies = Vec::new();
    let mut mats = [MatLayout { format: DevFormat::F32, rows: 0, cols: 0, w: 0, s: 0, b: 0 }; 3];
    for (i, (l, what)) in [(&e.gate, "gate"), (&e.up, "up"), (&e.down, "down")].into_iter().enumerate() {
        let (mut ml, pieces) = mat_pieces(l, what)?;
        let place = |p: &[u8], off: &mut usize| -> usize {
            let at = *off;
            *off = (*off + p.len()).next_multiple_of(SLOT_ALIGN);
            at
        };
        ml.w = place(pieces[0], &mut off);
        copies.push((ml.w, pieces[0]));
        if !pieces[1].is_empty() {
            ml.s = place(pieces[1], &mut off);
            copies.push((ml.s, pieces[1]));
            ml.b = place(pieces[2], &mut off);
            copies.push((ml.b, pieces[2]));
        }
        mats[i] = ml;
    }
    Ok((ExpertLayout { mats, bytes: off }, copies))
}

/// Where gate, up and down sit in an expert's host buffer starting at `base` (copied whole to
/// transit memory and read in place), and the bytes to copy; None when a piece is not 16-byte
/// aligned there (the GEMV kernels' rows need it) or lies before `base`.
fn blob_layout(e: &ExpertWeights, base: usize) -> Result<Option<([MatLayout; 3], usize)>> {
    let mut mats = [MatLayout { format: DevFormat::F32, rows: 0, cols: 0, w: 0, s: 0, b: 0 }; 3];
    let mut end = 0;
    for (i, (l, what)) in [(&e.gate, "gate"), (&e.up, "up"), (&e.down, "down")].into_iter().enumerate() {
        let (mut ml, pieces) = mat_pieces(l, what)?;
        let mut offsets = [0usize; 3];
        for (o, p) in offsets.iter_mut().zip(pieces) {
            if p.is_empty() {
                continue;
            }
            match (p.as_ptr() as usize).checked_sub(base) {
                Some(off) if off % 16 == 0 => {
                    *o = off;
                    end = end.max(off + p.len());
                }
                _ => return Ok(None),
            }
        }
        [ml.w, ml.s, ml.b] = offsets;
        mats[i] = ml;
    }
    Ok(Some((mats, end)))
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    index: usize,
    bytes: u64,
}

impl CacheValue for Slot {
    fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Page-locked host memory (so host-to-GPU copies run asynchronously at full PCIe speed).
struct Pinned {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain host allocation owned by the pool, used from the thread that holds the lock.
unsafe impl Send for Pinned {}

impl Pinned {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: plain allocation call; the pointer is checked below.
        let p = unsafe { cudarc::driver::result::malloc_host(len.max(1), 0) }
            .map_err(|e| CudaError(format!("cuMemHostAlloc of {} MiB: {e:?}", len >> 20)))?;
        Ok(Pinned { ptr: p.cast(), len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc, freed once.
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
    }
}

/// Pinned host memory for the expert store's buffers: a RAM-tier expert then crosses PCIe by
/// DMA straight from its buffer (no staging copy, no CPU time), which is what lets hybrid decode
/// send part of a layer's misses to the GPU while the CPU computes the rest.
struct PinnedHost {
    dev: Arc<CudaDevice>,
}

impl HostMemory for PinnedHost {
    fn alloc(&self, len: usize) -> Option<std::ptr::NonNull<u8>> {
        // The store's reader threads allocate too: they need the context bound.
        self.dev.bind().ok()?;
        // SAFETY: plain allocation call; the pointer is checked below. PORTABLE: pinned for
        // every context (a model split over GPUs shares one store).
        let p =
            unsafe { cudarc::driver::result::malloc_host(len, cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE) }.ok()?;
        let p = std::ptr::NonNull::new(p.cast::<u8>())?;
        if !(p.as_ptr() as usize).is_multiple_of(BUF_ALIGN) {
            // SAFETY: just allocated by cuMemHostAlloc, not handed out.
            let _ = unsafe { cudarc::driver::result::free_host(p.as_ptr().cast()) };
            return None;
        }
        Some(p)
    }

    unsafe fn free(&self, p: std::ptr::NonNull<u8>, _len: usize) {
        let _ = self.dev.bind();
        // SAFETY: allocated by cuMemHostAlloc in `alloc`, freed once (the caller's contract).
        let _ = unsafe { cudarc::driver::result::free_host(p.as_ptr().cast()) };
    }

    fn name(&self) -> &'static str {
        "pinned"
    }
}

/// GPU memory for the RAM-tier experts a hybrid decode step computes on the GPU without caching
/// them (its PCIe share): each is copied whole, as laid out in its host buffer, into one of
/// `slots` areas and read there by the GEMV kernels.
struct Transit {
    mem: DevBuf,
    stride: usize,
    slots: usize,
    /// Recorded on the copy stream after a layer's copies; the compute stream waits for it.
    done: CudaEvent,
    /// The host buffers of copies in flight: kept alive (not recycled by the RAM tier) until
    /// the host next waits for the GPU.
    hold: Vec<Arc<AlignedBuf>>,
}

/// Which of a layer's RAM-tier misses cross PCIe and which the CPU computes
/// (`CudaBackend::plan_pcie_share`).
struct PcieSharePlan {
    /// Indices into the layer's ids, in order, and their buffers when the plan fetched them.
    keep: Vec<usize>,
    keep_bufs: Option<Vec<Arc<AlignedBuf>>>,
    sends: Vec<PcieSend>,
}

/// One expert of the PCIe share: its row among the layer's k, its pinned buffer, the layout of
/// its three matrices in that buffer and the bytes to copy.
struct PcieSend {
    row: usize,
    buf: Arc<AlignedBuf>,
    mats: [MatLayout; 3],
    end: usize,
}

/// Hybrid decode's split of the RAM tier's misses between the CPU and PCIe, from rates measured
/// at load (or a fixed share).
#[derive(Clone, Copy, Debug)]
struct HybridSplit {
    /// Bytes per second: the CPU's expert kernels on all threads, and a pinned host-to-GPU copy.
    cpu_rate: f64,
    pcie_rate: f64,
    fixed: Option<f64>,
}

impl HybridSplit {
    /// Of `n` misses the CPU could compute, how many cross PCIe: the split that ends both
    /// sides soonest (ties go to the CPU: no copy), or the fixed share rounded.
    fn over_pcie(&self, n: usize) -> usize {
        if let Some(f) = self.fixed {
            return ((n as f64 * f).round() as usize).min(n);
        }
        let (c, p) = (self.cpu_rate.max(1.0), self.pcie_rate.max(1.0));
        (0..=n)
            .map(|m| (m, ((n - m) as f64 / c).max(m as f64 / p)))
            .fold((0, f64::MAX), |best, (m, t)| if t < best.1 * (1.0 - 1e-9) { (m, t) } else { best })
            .0
    }

    fn describe(&self, k: usize) -> String {
        match self.fixed {
            Some(f) => format!("hybrid: {:.0}% of the RAM tier's misses cross PCIe (fixed)", 100.0 * f),
            None => format!(
                "hybrid: CPU experts {:.1} GB/s, PCIe {:.1} GB/s (measured) → {} of {k} RAM-tier misses cross PCIe",
                self.cpu_rate / 1e9,
                self.pcie_rate / 1e9,
                self.over_pcie(k)
            ),
        }
    }
}

struct Staging {
    buf: Pinned,
    /// Recorded on the copy stream after this buffer's last copy.
    done: CudaEvent,
    in_flight: bool,
}

/// Routed experts in GPU memory: fixed-size slots, an eviction policy over (layer, expert), and
/// the copy path from the host tier.
struct ExpertPool {
    mem: DevBuf,
    /// [layer · experts] u64: the slot address of each expert on the GPU, 0 when it is not
    /// (read by the expert kernels, so a decode step needs no host round trip for hits).
    table: DevBuf,
    num_experts: usize,
    slot_bytes: usize,
    nslots: usize,
    map: ExpertCache<Slot>,
    free: Vec<usize>,
    layouts: Vec<ExpertLayout>,
    staging: Vec<Staging>,
    next_staging: usize,
    copy_stream: Arc<CudaStream>,
    /// Slots read by kernels launched since the host last waited for the GPU: refilling one of
    /// them first waits for the GPU.
    in_use: HashSet<usize>,
    /// Per slot: its expert is still in the RAM tier too (loaded by a prefill that borrowed
    /// it, `ExpertStore::borrow`), so evicting it drops the copy instead of copying it back.
    borrowed: Vec<bool>,
    /// The expert store's layer of each pool layer (they differ on a GPU that runs a later
    /// share of a split model: the pool numbers its layers from 0, the store from the model's).
    store_layers: Vec<usize>,
    /// Per layer, where each byte range of a slot sits in the RAM tier's expert buffer
    /// (slot offset, buffer offset, length): how an evicted expert is copied back (exclusive
    /// tiers). Learnt from the first expert of the layer loaded from the store.
    demote_map: Vec<Option<Vec<(usize, usize, usize)>>>,
    /// Those copies in flight, oldest first, and pinned landing buffers for the ones whose
    /// RAM-tier buffer is not pinned memory (free ones, kept for reuse).
    demotes: std::collections::VecDeque<PendingDemote>,
    d2h_free: Vec<Pinned>,
    /// Pinned memory for a hybrid step's small transfers (`HostIo`), made on first use.
    host_io: Option<Pinned>,
    /// Its device side for the CPU's expert outputs (`cpu_rows_dev`).
    cpu_rows: Option<DevBuf>,
    /// Hybrid decode's PCIe share: where those experts land (None: no share).
    transit: Option<Transit>,
    /// RAM-tier buffers in pinned memory copied into slots by DMA from where they are (no
    /// staging copy), kept alive until the host next waits for the GPU (`release_copied`).
    direct_hold: Vec<Arc<AlignedBuf>>,
    /// Recorded on the copy stream after each such copy; the compute stream waits for it.
    direct_done: Option<CudaEvent>,
    /// Where `load_missing` and `fill` spend host time (only grows: prefill's profile takes the
    /// difference over each MoE op).
    fill_prof: FillProfile,
}

/// Host time of [`ExpertPool::fill`]: waits for a staging buffer's previous DMA, the host copy
/// into staging, and how many fills went each way.
#[derive(Default, Clone, Copy, Debug)]
struct FillProfile {
    /// `load_missing`: reading the experts' buffers from the RAM tier or the disk, and placing
    /// them (claims, copies back of what they evict, fills, table updates).
    fetch_ns: u64,
    place_ns: u64,
    stage_wait_ns: u64,
    copy_ns: u64,
    /// Direct fills: issuing their DMAs (and the event the compute stream waits for).
    issue_ns: u64,
    /// `load_missing`: the experts' views and slot layouts.
    parse_ns: u64,
    /// `place`: claiming slots (with any wait for the GPU an eviction needs), and the slot
    /// table's updates (a one-thread launch each).
    claim_ns: u64,
    table_ns: u64,
    direct: u64,
    staged: u64,
}

impl FillProfile {
    fn since(self, before: FillProfile) -> FillProfile {
        FillProfile {
            fetch_ns: self.fetch_ns - before.fetch_ns,
            place_ns: self.place_ns - before.place_ns,
            stage_wait_ns: self.stage_wait_ns - before.stage_wait_ns,
            copy_ns: self.copy_ns - before.copy_ns,
            issue_ns: self.issue_ns - before.issue_ns,
            parse_ns: self.parse_ns - before.parse_ns,
            claim_ns: self.claim_ns - before.claim_ns,
            table_ns: self.table_ns - before.table_ns,
            direct: self.direct - before.direct,
            staged: self.staged - before.staged,
        }
    }
}

/// Prefill's MoE ops over one pass, host time by part (`FLASHMOE_PREFILL_PROFILE=1` prints it
/// on stderr after the pass's last layer): where a pass whose experts come from the RAM tier or
/// the disk spends its time (issue 11: that prefill runs at a ninth of PCIe, cause unmeasured).
#[derive(Default, Debug)]
struct PrefillProfile {
    start: Option<Instant>,
    layers: u64,
    /// Whole MoE ops, waiting for the router's ids (the GPU's work so far: the previous layer's
    /// copies and GEMMs), uploading each group's work items (a synchronous copy: it waits for the
    /// previous group's GEMMs and this group's copies into its slots), and launching the grouped
    /// GEMMs.
    moe_ns: u64,
    ids_wait_ns: u64,
    items_wait_ns: u64,
    launch_ns: u64,
    groups: u64,
    hits: u64,
    misses: u64,
    /// The pool's load counters when the pass's first MoE op began (the line shows the
    /// difference at its end).
    loads_at_start: FillProfile,
}

impl PrefillProfile {
    /// One line: the MoE ops' wall time (first MoE op to the pass's GPU work done) and the host
    /// time in each part (`l`: the pool's load counters over the pass), in ms, for a pass of `t`
    /// tokens.
    fn line(&self, t: usize, wall_ns: u64, l: &FillProfile) -> String {
        let ms = |ns: u64| ns as f64 / 1e6;
        format!(
            "[flashmoe] prefill profile: {t} tokens, {} layers | MoE wall {:.1} ms, host in MoE ops {:.1} | waiting for \
             router ids {:.1}, for the GPU before each group's GEMMs {:.1} | expert loads: read from RAM tier/disk \
             {:.1}, placing {:.1} (of which views {:.1}, slot claims {:.1}, table updates {:.1}, staging waits {:.1}, host copies \
             {:.1}, direct DMA issue {:.1}; {} staged, {} direct) | GEMM launches {:.1} | {} groups, {} hits, {} misses",
            self.layers,
            ms(wall_ns),
            ms(self.moe_ns),
            ms(self.ids_wait_ns),
            ms(self.items_wait_ns),
            ms(l.fetch_ns),
            ms(l.place_ns),
            ms(l.parse_ns),
            ms(l.claim_ns),
            ms(l.table_ns),
            ms(l.stage_wait_ns),
            ms(l.copy_ns),
            ms(l.issue_ns),
            l.staged,
            l.direct,
            ms(self.launch_ns),
            self.groups,
            self.hits,
            self.misses
        )
    }
}

fn prefill_profile() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHMOE_PREFILL_PROFILE").is_ok_and(|v| v == "1"))
}

impl Drop for ExpertPool {
    fn drop(&mut self) {
        // A DMA may still read a held buffer or write a pending copy back's (a pass that failed
        // midway): let it finish first.
        if !self.direct_hold.is_empty() || !self.demotes.is_empty() {
            let _ = self.copy_stream.synchronize();
        }
    }
}

/// A decode step's small transfers in pinned memory, laid out as [k expert ids (i32) | the
/// layer's MoE input (h f32) | which of the k experts the CPU computed (i32 0/1) | their outputs
/// (k rows of h f32)]. Reused by every layer: a layer writes its outputs here only after waiting
/// for the stream (its ids read), by which time the previous layer's copies out of it have run.
fn host_io(pool: &mut ExpertPool, k: usize, h: usize) -> Result<&mut [u8]> {
    let need = (2 * k + h + k * h) * 4;
    if pool.host_io.as_ref().is_none_or(|b| b.len < need) {
        pool.host_io = Some(Pinned::new(need)?);
    }
    Ok(&mut pool.host_io.as_mut().expect("allocated above").as_mut_slice()[..need])
}

/// Device address of the GPU side of the last two parts of `host_io` ([k mask ints | k rows]),
/// allocated on first use (an eager step, before any stretch is recorded).
fn cpu_rows_dev(pool: &mut ExpertPool, dev: &CudaDevice, k: usize, h: usize) -> Result<u64> {
    let need = (k + k * h) * 4;
    if pool.cpu_rows.as_ref().is_none_or(|b| b.len() < need) {
        pool.cpu_rows = Some(dev.alloc(need)?);
    }
    Ok(pool.cpu_rows.as_ref().expect("allocated above").ptr())
}

impl ExpertPool {
    /// The pool's layer of the store's layer `store_layer`, if this pool holds it.
    fn pool_layer(&self, store_layer: usize) -> Option<usize> {
        self.store_layers.iter().position(|&s| s == store_layer)
    }

    fn base(&self, slot: usize) -> u64 {
        self.mem.ptr() + (slot * self.slot_bytes) as u64
    }

    /// The slot of a cached expert (counts as a use).
    fn lookup(&mut self, layer: usize, e: usize) -> Option<usize> {
        self.map.get((layer as u32, e as u32)).map(|s| s.index)
    }

    /// A slot for `key`, evicting an expert `protected` does not name (returned, so its table
    /// entry can be cleared). Waits for the GPU when the victim's slot may still be read by
    /// launched kernels.
    fn claim(
        &mut self,
        dev: &CudaDevice,
        key: ExpertKey,
        protected: &dyn Fn(ExpertKey) -> bool,
    ) -> Result<(usize, Option<ExpertKey>)> {
        let (index, victim) = match self.free.pop() {
            Some(i) => (i, None),
            None => {
                let (vkey, victim) = self
                    .map
                    .evict_lowest(protected)
                    .ok_or_else(|| CudaError::new("GPU expert cache: every slot is in use by this step"))?;
                if self.in_use.contains(&victim.index) {
                    dev.synchronize()?;
                    self.in_use.clear();
                    self.release_copied();
                }
                (victim.index, Some(vkey))
            }
        };
        self.map.insert(key, Slot { index, bytes: self.slot_bytes as u64 });
        Ok((index, victim))
    }

    /// Every expert of the model is on the GPU: nothing can miss, so decode needs no host sync.
    fn all_resident(&self) -> bool {
        self.map.len() == self.layouts.len() * self.num_experts
    }

    fn table_index(&self, key: ExpertKey) -> usize {
        key.0 as usize * self.num_experts + key.1 as usize
    }

    /// The host has waited for the GPU since the last direct copies: their sources may go.
    fn release_copied(&mut self) {
        self.direct_hold.clear();
    }

    /// Copies an expert into `slot` and makes the compute stream wait for the copy; returns the
    /// bytes copied. `pieces` (slot offset, host bytes) come straight from `pinned`, the RAM-tier
    /// buffer they lie in, when it is in pinned memory (unless `FLASHMOE_DIRECT_FILL=0`: DMAs on
    /// the copy stream, pieces laid out alike merged into one, no host copy; the buffer is held
    /// until the host next waits for the GPU), else through a pinned staging buffer on the copy
    /// stream.
    fn fill(
        &mut self,
        dev: &CudaDevice,
        slot: usize,
        bytes: usize,
        pieces: &[(usize, &[u8])],
        pinned: Option<&Arc<AlignedBuf>>,
    ) -> Result<u64> {
        if let Some(src) = pinned.filter(|b| direct_fill() && b.host_memory().is_some()) {
            let dst = self.base(slot);
            // Held before the first copy is issued: if a later one fails, those already queued
            // still read a live buffer (and `Drop` waits for them).
            self.direct_hold.push(src.clone());
            let t0 = Instant::now();
            // (Every piece lies in `src`, so they may be merged.)
            for (off, p) in coalesce_pieces(pieces) {
                // SAFETY: `p` lies in `src`'s pinned allocation, held in `direct_hold` until the
                // host next waits for the GPU (after this copy and what reads it have run); the
                // destination range is inside the slot (offsets from the slot layout).
                unsafe { cudarc::driver::result::memcpy_htod_async(dst + off as u64, p, self.copy_stream.cu_stream()) }
                    .map_err(|e| CudaError(format!("cuMemcpyHtoDAsync (RAM tier to slot): {e:?}")))?;
            }
            if self.direct_done.is_none() {
                self.direct_done =
                    Some(dev.ctx.new_event(None).map_err(|e| CudaError(format!("cuEventCreate: {e:?}")))?);
            }
            let done = self.direct_done.as_ref().expect("made above");
            done.record(&self.copy_stream).map_err(|e| CudaError(format!("cuEventRecord: {e:?}")))?;
            dev.stream.wait(done).map_err(|e| CudaError(format!("cuStreamWaitEvent: {e:?}")))?;
            self.fill_prof.direct += 1;
            self.fill_prof.issue_ns += t0.elapsed().as_nanos() as u64;
            return Ok(pieces.iter().map(|(_, p)| p.len() as u64).sum());
        }
        let t0 = Instant::now();
        let si = self.next_staging;
        self.next_staging = (si + 1) % self.staging.len();
        let dst = self.base(slot);
        let st = &mut self.staging[si];
        if st.in_flight {
            st.done.synchronize().map_err(|e| CudaError(format!("cuEventSynchronize: {e:?}")))?;
            st.in_flight = false;
        }
        let t1 = Instant::now();
        let base = st.buf.as_mut_slice().as_mut_ptr() as usize;
        // SAFETY: the pieces are live host slices; each lands at a distinct in-bounds range of
        // the staging buffer (layout offsets were computed from these pieces, bytes ≤ its length).
        unsafe { par_copy(pieces.iter().map(|&(off, p)| (p.as_ptr() as usize, base + off, p.len()))) };
        self.fill_prof.stage_wait_ns += (t1 - t0).as_nanos() as u64;
        self.fill_prof.copy_ns += t1.elapsed().as_nanos() as u64;
        self.fill_prof.staged += 1;
        // SAFETY: the staging buffer is pinned and stays untouched until `done` fires; the
        // destination is inside the pool allocation (bytes ≤ slot size).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dst,
                &st.buf.as_mut_slice()[..bytes],
                self.copy_stream.cu_stream(),
            )
        }
        .map_err(|e| CudaError(format!("cuMemcpyHtoDAsync: {e:?}")))?;
        st.done.record(&self.copy_stream).map_err(|e| CudaError(format!("cuEventRecord: {e:?}")))?;
        st.in_flight = true;
        dev.stream.wait(&st.done).map_err(|e| CudaError(format!("cuStreamWaitEvent: {e:?}")))?;
        Ok(bytes as u64)
    }
}

// ---------------------------------------------------------------------------------------------
// Sequence state on the GPU.

enum DevLayerState {
    Attention { k: DevBuf, v: DevBuf, cap: usize },
    DeltaNet { conv: DevBuf, rec: DevBuf },
}

/// The GPU copy of a [`SequenceState`]'s caches (authoritative while present).
pub struct DevSeqState {
    dev: Arc<CudaDevice>,
    layers: Vec<DevLayerState>,
    /// Set when a copy failed: the state is unusable.
    broken: Option<String>,
}

impl DevSeqState {
    /// GPU bytes held (the server's prefix cache budgets cached states by this).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                DevLayerState::Attention { k, v, .. } => k.len() + v.len(),
                DevLayerState::DeltaNet { conv, rec } => conv.len() + rec.len(),
            })
            .sum()
    }
}

impl Clone for DevSeqState {
    fn clone(&self) -> Self {
        let copy = || -> Result<Vec<DevLayerState>> {
            self.dev.bind()?;
            let dup = |b: &DevBuf| -> Result<DevBuf> {
                let n = self.dev.alloc(b.len())?;
                self.dev.copy_dtod(b, &n, b.len())?;
                Ok(n)
            };
            self.layers
                .iter()
                .map(|l| {
                    Ok(match l {
                        DevLayerState::Attention { k, v, cap } => {
                            DevLayerState::Attention { k: dup(k)?, v: dup(v)?, cap: *cap }
                        }
                        DevLayerState::DeltaNet { conv, rec } => {
                            DevLayerState::DeltaNet { conv: dup(conv)?, rec: dup(rec)? }
                        }
                    })
                })
                .collect()
        };
        match copy() {
            Ok(layers) => DevSeqState { dev: self.dev.clone(), layers, broken: self.broken.clone() },
            Err(e) => DevSeqState {
                dev: self.dev.clone(),
                layers: Vec::new(),
                broken: Some(format!("copying the sequence state on the GPU failed: {e}")),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// cuBLAS (prefill GEMMs of the non-expert matrices).

/// A cuBLAS handle on the device's stream, in the default math mode: SGEMM is f32 arithmetic
/// (`--precision f32`); the tensor-core products are bf16 GEMMs of split operands (GemmEx with
/// f32 compute).
struct Blas(cudarc::cublas::sys::cublasHandle_t);

// SAFETY: the handle is used only under the GPU model's mutex, one thread at a time.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Blas {
    fn new(dev: &CudaDevice) -> Option<Blas> {
        // SAFETY: only tries to dlopen libcublas.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return None;
        }
        let h = cudarc::cublas::result::create_handle().ok()?;
        let blas = Blas(h);
        // SAFETY: a fresh handle and the device's live stream.
        unsafe { cudarc::cublas::result::set_stream(h, dev.stream.cu_stream() as _) }.ok()?;
        Some(blas)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { cudarc::cublas::result::destroy_handle(self.0) };
    }
}

/// The widest input of a prefill matrix product: the hidden state, the attention or delta-net
/// output, or an MLP's activations.
fn widest_prefill_input(c: &ModelConfig) -> usize {
    [
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.linear_value_heads * c.linear_value_dim,
        c.moe_intermediate,
        c.shared_intermediate,
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

/// Fewest tokens in a pass for which GGML blocks go to the tensor-core GEMM. Measured on an H200
/// (8-layer 35B-A3B geometry, Q4_0 file, 2026-12-03): with tensor cores prefill of 4–32 tokens
/// took 3–4 ms longer than with the CUDA-core GEMM (e.g. 32 tokens 18 vs 14 ms), from 64 tokens on
/// it is faster (64: 11 vs 14 ms; 512: 21 vs 37 ms).
const GGML_TC_MIN_TOKENS: usize = 64;

/// f32 scratch for dequantized weights (a matrix larger than this goes through in row blocks).
const DEQ_FLOATS: usize = 64 << 20;

// ---------------------------------------------------------------------------------------------
// Workspace.

/// Activations of one pass of up to `cap` tokens.
struct Workspace {
    x: DevBuf,
    normed: DevBuf,
    mixed: DevBuf,
    proj: DevBuf,
    k: DevBuf,
    v: DevBuf,
    z: DevBuf,
    b: DevBuf,
    a: DevBuf,
    q: DevBuf,
    gate: DevBuf,
    attn: DevBuf,
    conv_out: DevBuf,
    dn_y: DevBuf,
    part: DevBuf,
    rlogits: DevBuf,
    /// Decode prefetch: the next layer's router applied to this layer's post-attention state.
    plogits: DevBuf,
    ids: DevBuf,
    wts: DevBuf,
    gu: DevBuf,
    ys: DevBuf,
    sg: DevBuf,
    /// Prefill: gate, up, activation [pairs, inter]; expert outputs [pairs, hidden] (pairs are
    /// (token, expert) choices sorted by expert; the shared expert uses the first t rows).
    g: DevBuf,
    u: DevBuf,
    act: DevBuf,
    yd: DevBuf,
    /// Prefill pair bookkeeping: token of each pair, pair of each (token, rank), work items.
    xrow: DevBuf,
    pair_of: DevBuf,
    items: DevBuf,
    /// [pos0, token ids...] (i32): the position lives in device memory so a captured decode
    /// graph replays at any position.
    tok: DevBuf,
    /// [layers, k] (i32): the experts each layer chose for the current decode token.
    ids_all: DevBuf,
    logits: DevBuf,
    /// Dequantized weights for cuBLAS (prefill).
    deq: DevBuf,
    /// Prefill inputs split into bf16 [hi | lo | hi] for the tensor-core products (empty
    /// without them).
    xsplit: DevBuf,
    /// Inputs of the tensor-core expert GEMM split into TF32 hi / lo parts, and Σ x per group
    /// (empty without tensor cores).
    tc_hi: DevBuf,
    tc_lo: DevBuf,
    tc_sum: DevBuf,
}

/// Splits of the key range for single-token attention (more blocks for long contexts).
const MAX_SPLITS: usize = 32;

impl Workspace {
    /// The split input scratch of the tensor-core GEMMs.
    fn tc_input(&self) -> TcInput {
        TcInput { xh: self.tc_hi.ptr(), xl: self.tc_lo.ptr(), xsum: self.tc_sum.ptr() }
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        dev: &CudaDevice,
        c: &ModelConfig,
        k: usize,
        cap: usize,
        deq_floats: usize,
        split: bool,
        tensor_cores: bool,
    ) -> Result<Self> {
        let f = |n: usize| dev.alloc(n.max(1) * 4);
        let h = c.hidden_size;
        let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let hvdv = c.linear_value_heads * c.linear_value_dim;
        let imax = c.moe_intermediate.max(c.shared_intermediate);
        let in_max = widest_prefill_input(c);
        // Rows of any tensor-core GEMM input: t tokens × the widest input, or t·k expert pairs
        // × the expert width.
        let tc_floats = if tensor_cores { cap * in_max.max(k.max(1) * imax) } else { 0 };
        Ok(Workspace {
            x: f(cap * h)?,
            normed: f(cap * h)?,
            mixed: f(cap * h)?,
            proj: f(cap * (2 * nh * d).max(c.conv_dim()))?,
            k: f(cap * nkv * d)?,
            v: f(cap * nkv * d)?,
            z: f(cap * hvdv)?,
            b: f(cap * c.linear_value_heads)?,
            a: f(cap * c.linear_value_heads)?,
            q: f(cap * nh * d)?,
            gate: f(cap * nh * d)?,
            attn: f(cap * nh * d)?,
            conv_out: f(cap * c.conv_dim())?,
            dn_y: f(cap * hvdv)?,
            part: f(cap.max(MAX_SPLITS) * nh * (d + 2))?,
            rlogits: f(cap * c.num_experts)?,
            plogits: f(c.num_experts)?,
            ids: f(cap * k)?,
            wts: f(cap * k)?,
            gu: f((k + 1) * 2 * imax)?,
            ys: f((k + 1) * h)?,
            sg: f(cap)?,
            g: f(cap * k.max(1) * imax)?,
            u: f(cap * k.max(1) * imax)?,
            act: f(cap * k.max(1) * imax)?,
            yd: f(cap * k.max(1) * h)?,
            xrow: f(cap * k)?,
            pair_of: f(cap * k)?,
            items: f(cap * k * 4)?,
            tok: f(cap + 1)?,
            ids_all: f(c.num_layers * k)?,
            logits: f(c.vocab_size)?,
            deq: f(deq_floats)?,
            // 3 bf16 per input value = 1.5 floats.
            xsplit: f(if split { (cap * in_max * 3).div_ceil(2) } else { 0 })?,
            tc_hi: f(tc_floats)?,
            tc_lo: f(tc_floats)?,
            // Sums per group of ≥ TC_MIN_SUM_GROUP columns.
            tc_sum: f(tc_floats.div_ceil(TC_MIN_SUM_GROUP))?,
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// What a captured decode graph baked in: the state buffers it reads and writes, and whether it
/// ends with the lm_head.
#[derive(Clone, Debug, PartialEq)]
struct GraphKey {
    buffers: Vec<(u64, usize)>,
    logits: bool,
}

impl GraphKey {
    fn of(d: &DevSeqState, logits: bool) -> Self {
        let buffers = d
            .layers
            .iter()
            .map(|l| match l {
                DevLayerState::Attention { k, cap, .. } => (k.ptr(), *cap),
                DevLayerState::DeltaNet { rec, .. } => (rec.ptr(), 0),
            })
            .collect();
        GraphKey { buffers, logits }
    }
}

/// A decode step that waits for the host in every layer (a GPU cache with misses: the host
/// reads the expert ids, then the CPU computes or copies in what the GPU lacks) still has fixed
/// stretches of GPU work between those waits: from the MoE combine through the next layer's
/// mixer, norm and router to its top-k, and the GPU's own experts after the wait. Their launches
/// depend only on what [`StretchKey`] holds, so each stretch is recorded once as a graph and
/// replayed (one graph launch instead of ~15 kernel launches); the host's work between them
/// (waits, the CPU's experts, copies, the kernels of copied-in experts) stays as it is.
#[derive(Clone, Debug, PartialEq)]
struct StretchKey {
    graph: GraphKey,
    prefetch: bool,
    k: usize,
    input: u8,
    output: PassOutput,
}

/// One recorded stretch: its graph (None when it launched nothing) and how many launches it
/// recorded, checked against the launches a replay skips.
struct Stretch {
    graph: Option<super::Graph>,
    launches: u64,
}

/// Recording or replaying the stretches of one step.
enum StretchMode<'p> {
    Record(Vec<Stretch>),
    Replay(&'p [Stretch]),
}

struct StretchRun<'p> {
    mode: StretchMode<'p>,
    /// The next stretch's index.
    index: usize,
    /// A stretch is open (capturing, or skipping launches), and the launch count at its start.
    open: Option<u64>,
}

impl BackendState for DevSeqState {
    fn duplicate(&self) -> Self {
        self.clone()
    }
    fn bytes(&self) -> usize {
        DevSeqState::bytes(self)
    }
}

/// Everything the passes share: the expert pool, the workspace, the recorded decode graph.
struct Inner {
    pool: ExpertPool,
    ws: Workspace,
    /// Pinned host side of a pass's own transfers: [pos0, token ids (i32; prefill_chunk + 1) |
    /// last-row logits (f32; vocab)], so neither copy goes through the driver's pageable staging.
    step_io: Pinned,
    /// Pinned host side of a pipeline stage's residual stream ([t, hidden] f32 in or out),
    /// allocated on first use.
    hand_io: Option<Pinned>,
    /// The same rows kept on this GPU ([tokens, hidden] f32, grown on demand): what a pass with
    /// `PassOutput::HiddenOnDevice` leaves, and where `hand_over` puts the next GPU's input.
    hand_dev: Option<DevBuf>,
    /// Recorded on this GPU's stream when its rows are ready to go (`hand_over`), and when rows
    /// have arrived from the previous GPU (the sender's stream waits for it before reusing them).
    hand_ready: CudaEvent,
    hand_arrived: CudaEvent,
    /// Peer access to the next GPU's memory was asked for (once).
    peer_tried: bool,
    /// The last call returned with work in flight (its rows stayed on the GPU for the next
    /// stage): the next call waits for it first, then reads its step timer.
    unsynced: bool,
    timer_pending: bool,
    /// Brackets a decode step's GPU work (its span, for `bench decode`).
    step_timer: super::context::Timer,
    graph: Option<(GraphKey, super::Graph)>,
    /// Decode steps run without a graph since the last capture (the first one warms up).
    eager_steps: usize,
    /// The recorded stretches of a decode step with host waits, and eager such steps since.
    stretches: Option<(StretchKey, Vec<Stretch>)>,
    eager_stretch_steps: usize,
}

/// One GPU running the layer graph.
pub struct CudaBackend {
    pub dev: Arc<CudaDevice>,
    gemv: GemvKernels,
    ops: ForwardKernels,
    opts: DeviceOptions,
    /// Routed experts per token the workspace holds (the loaded model's k).
    max_k: usize,
    max_context: usize,
    blas: Option<Blas>,
    /// Bytes of resident (non-expert) weights uploaded.
    weight_bytes: AtomicU64,
    /// Floats of the largest matrix block prefill dequantizes for cuBLAS.
    largest_matrix: AtomicU64,
    /// Set by `prepare`: the pool, the workspace, the graph.
    inner: Option<Mutex<Inner>>,
    stats: GpuStats,
    total_experts: usize,
    /// Experts a pre-warm reads for the pool, taken between passes.
    prewarm: Mutex<Option<PrewarmFeed>>,
    /// Set by `prepare` when hybrid decode may send RAM-tier misses over PCIe.
    split: Option<HybridSplit>,
}

/// One pass on the GPU: the workspace's activations, the pool, the GPU state of the sequence (or,
/// continuous batching, of each row's sequence).
pub struct CudaPass<'p> {
    spec: &'p PassSpec<'p>,
    pool: &'p mut ExpertPool,
    ws: &'p Workspace,
    states: Vec<&'p mut DevSeqState>,
    /// A batched pass: device address of the rows' positions (i32 each); 0 for one sequence,
    /// whose rows start at the position in `ws.tok[0]`.
    positions: u64,
    t: usize,
    /// Every expert is in the pool: the step never waits for the host.
    resident: bool,
    /// Where the logits go (0 when none are wanted).
    logits: u64,
    /// Decode prefetch launched for (layer, its store, the store's layer): read at the next
    /// host synchronization.
    prefetch: Option<(usize, Arc<ExpertStore>, usize)>,
    /// Per-layer times when the hooks want them (marks synchronize the GPU).
    times: Vec<LayerTimes>,
    marked: Instant,
    /// The step's stretches between host waits are being recorded or replayed.
    stretch: Option<StretchRun<'p>>,
}

impl CudaPass<'_> {
    /// The sequences of this pass as (first row, rows, device address of the first row's
    /// position): one sequence from the position in `ws.tok[0]`, or a batch's one row each.
    fn segments(&self) -> Vec<(usize, usize, u64)> {
        if self.states.len() == 1 {
            vec![(0, self.t, self.ws.tok.ptr())]
        } else {
            (0..self.states.len()).map(|i| (i, 1, self.positions + 4 * i as u64)).collect()
        }
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles (or loads) the kernels. The pool and workspace are sized
    /// in `prepare`, once the weights are on the GPU.
    pub fn open(ordinal: usize, opts: &DeviceOptions, max_k: usize, max_context: usize) -> crate::Result<Self> {
        let dev = Arc::new(CudaDevice::open(ordinal)?);
        let gemv = GemvKernels::load(&dev)?;
        let ops = ForwardKernels::load(&dev)?;
        let prefill_chunk = opts.gpu.prefill_chunk.max(1);
        let blas = if prefill_chunk >= opts.gpu.blas_min_tokens { Blas::new(&dev) } else { None };
        Ok(CudaBackend {
            dev,
            gemv,
            ops,
            opts: opts.clone(),
            max_k,
            max_context,
            blas,
            weight_bytes: AtomicU64::new(0),
            largest_matrix: AtomicU64::new(0),
            inner: None,
            stats: GpuStats::default(),
            total_experts: 0,
            prewarm: Mutex::new(None),
            split: None,
        })
    }

    /// Adds a timed decode step (its GPU span, waited for) to the stats.
    fn count_step(&self, timer: &super::context::Timer) -> Result<()> {
        let ms = timer.ms()?;
        self.stats.decode_steps.fetch_add(1, Relaxed);
        self.stats.decode_gpu_ns.fetch_add((ms * 1e6) as u64, Relaxed);
        Ok(())
    }

    /// Bytes of memory on the GPU (how a split shares the layers out).
    pub fn total_memory(&self) -> usize {
        self.dev.total_memory
    }

    /// Whether prefill's matrix products may run on tensor cores (split operands).
    fn tensor_cores(&self) -> bool {
        self.opts.gpu.precision == Precision::Tensor && self.gemv.has_tensor_cores()
    }

    /// The prefill arithmetic that runs.
    fn precision_name(&self) -> &'static str {
        if self.tensor_cores() { "tensor cores (split operands, f32-grade)" } else { "f32 (CUDA cores)" }
    }

    fn check_geometry(&self, c: &ModelConfig) -> Result<()> {
        if !c.head_dim.is_multiple_of(32) || c.head_dim > 512 {
            return Err(CudaError(format!(
                "GPU attention needs head_dim a multiple of 32 up to 512, got {}",
                c.head_dim
            )));
        }
        if !c.linear_value_dim.is_multiple_of(32)
            || c.linear_value_dim > 1024
            || !c.linear_key_dim.is_multiple_of(8)
            || c.linear_key_dim > 256
            || c.conv_kernel > 8
        {
            return Err(CudaError(format!(
                "GPU GatedDeltaNet needs value_dim a multiple of 32 up to 1024, key_dim a multiple of 8 up to 256 and conv kernel ≤ 8, got {} / {} / {}",
                c.linear_value_dim, c.linear_key_dim, c.conv_kernel
            )));
        }
        if c.hidden_size > 4096 * 256 {
            return Err(CudaError(format!("GPU norms take hidden sizes up to {}, got {}", 4096 * 256, c.hidden_size)));
        }
        if c.num_experts > 1024 || self.max_k > 32 {
            return Err(CudaError(format!(
                "GPU router takes up to 1024 experts and 32 per token, got {} / {}",
                c.num_experts, self.max_k
            )));
        }
        Ok(())
    }

    fn inner(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .as_ref()
            .ok_or_else(|| CudaError::new("the GPU backend was used before its weights were placed"))?
            .lock()
            .map_err(|_| CudaError::new("GPU model lock poisoned"))
    }

    fn gemv(&self, m: &DevMatrix, x: u64, y: u64) -> Result<()> {
        self.gemv.gemv_raw(&self.dev, &m.view(), x, y, None, false, AffineVariant::default_for(m.format))
    }

    /// `y = m·x` for t tokens: GEMV for one; for many, when cuBLAS loaded, rows dequantized in
    /// blocks and multiplied by cuBLAS (SGEMM in f32; with tensor cores a bf16 GEMM of hi/lo split
    /// operands, see `dequant_rows_split` in forward.cu); the multi-token GEMM kernel in between.
    fn mm(&self, ws: &Workspace, m: &DevMatrix, x: u64, y: u64, t: usize) -> Result<()> {
        if t == 1 {
            return self.gemv(m, x, y);
        }
        let Some(blas) = self.blas.as_ref().filter(|_| t >= self.opts.gpu.blas_min_tokens.max(2)) else {
            // (GGML blocks: below cuBLAS's threshold the CUDA-core GEMM was measured faster, see
            // GGML_TC_MIN_TOKENS.)
            let ggml = matches!(m.format, DevFormat::Ggml(_));
            let tc = (self.tensor_cores() && !ggml).then(|| ws.tc_input());
            return self.gemv.gemm(&self.dev, &m.view(), x, y, t, tc.as_ref());
        };
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let (rows, cols) = (m.rows, m.cols);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let v = m.view();
        if self.tensor_cores() {
            use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
            // x as [t, 3·cols] bf16 [xh | xl | xh] in the workspace.
            let xs = ws.xsplit.ptr();
            self.ops.split_rows_x(&self.dev, x, xs, t, cols)?;
            // Row blocks as [n, 3·cols] bf16 [Wh | Wh | Wl]: after the f32 rows of formats that
            // are dequantized to f32 first (GGML blocks), or at the start of the scratch.
            let f32_first = matches!(m.format, DevFormat::Ggml(_));
            let per_row = cols * 6 + if f32_first { cols * 4 } else { 0 };
            let block = (ws.deq.len() / per_row.max(1)).max(1);
            let mut r0 = 0;
            while r0 < rows {
                let n = block.min(rows - r0);
                let split = ws.deq.ptr() + if f32_first { (n * cols * 4) as u64 } else { 0 };
                match m.format {
                    DevFormat::F32 => {
                        self.ops.dequant_rows_split(&self.dev, (v.w, 0, 0), 1, (32, 1), r0, n, cols, split)?
                    }
                    DevFormat::Affine { bits, group_size } => self.ops.dequant_rows_split(
                        &self.dev,
                        (v.w, v.s, v.b),
                        0,
                        (bits, group_size),
                        r0,
                        n,
                        cols,
                        split,
                    )?,
                    DevFormat::Bf16 => {
                        self.ops.dequant_rows_split(&self.dev, (v.w, 0, 0), 2, (16, 1), r0, n, cols, split)?
                    }
                    DevFormat::Ggml(ty) => {
                        let rows32 = ws.deq.ptr();
                        self.gemv.ggml_rows(&self.dev, ty, v.w, 0, r0, n, cols, rows32)?;
                        self.ops.dequant_rows_split(&self.dev, (rows32, 0, 0), 1, (32, 1), 0, n, cols, split)?
                    }
                }
                let k3 = (3 * cols) as i32;
                // SAFETY: split holds n·3·cols bf16 (rows r0.. of W), xs t·3·cols, y t·rows f32;
                // the handle runs on the device's stream.
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        blas.0,
                        CUBLAS_OP_T,
                        CUBLAS_OP_N,
                        n as i32,
                        t as i32,
                        k3,
                        (&alpha as *const f32).cast(),
                        split as *const std::ffi::c_void,
                        cudaDataType::CUDA_R_16BF,
                        k3,
                        xs as *const std::ffi::c_void,
                        cudaDataType::CUDA_R_16BF,
                        k3,
                        (&beta as *const f32).cast(),
                        (y + (r0 * 4) as u64) as *mut std::ffi::c_void,
                        cudaDataType::CUDA_R_32F,
                        rows as i32,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(|e| CudaError(format!("cublasGemmEx: {e:?}")))?;
                r0 += n;
            }
            return Ok(());
        }
        // Row-major Y[t, rows] = X[t, cols]·Wᵀ is column-major Y[rows, t] = Wᵀ[rows, cols]·X[cols, t].
        let sgemm = |a: u64, r0: usize, n: usize| -> Result<()> {
            // SAFETY: a holds n·cols f32 (row-major rows r0..r0+n of W), x t·cols, y t·rows;
            // the handle runs on the device's stream.
            unsafe {
                cudarc::cublas::result::sgemm(
                    blas.0,
                    CUBLAS_OP_T,
                    CUBLAS_OP_N,
                    n as i32,
                    t as i32,
                    cols as i32,
                    &alpha,
                    a as *const f32,
                    cols as i32,
                    x as *const f32,
                    cols as i32,
                    &beta,
                    (y + (r0 * 4) as u64) as *mut f32,
                    rows as i32,
                )
            }
            .map_err(|e| CudaError(format!("cublasSgemm: {e:?}")))
        };
        // Tiles of rows dequantized to f32 in the workspace, then multiplied.
        let dequant = |r0: usize, n: usize| -> Result<()> {
            let out = ws.deq.ptr();
            match m.format {
                DevFormat::F32 => Ok(()),
                DevFormat::Affine { bits, group_size } => {
                    self.ops.dequant_rows(&self.dev, (v.w, v.s, v.b), 0, (bits, group_size), r0, n, cols, out)
                }
                DevFormat::Bf16 => self.ops.dequant_rows(&self.dev, (v.w, v.s, v.b), 2, (16, 1), r0, n, cols, out),
                DevFormat::Ggml(ty) => self.gemv.ggml_rows(&self.dev, ty, v.w, 0, r0, n, cols, out),
            }
        };
        if m.format == DevFormat::F32 {
            return sgemm(v.w, 0, rows);
        }
        let block = (ws.deq.len() / 4 / cols.max(1)).max(1);
        let mut r0 = 0;
        while r0 < rows {
            let n = block.min(rows - r0);
            dequant(r0, n)?;
            sgemm(ws.deq.ptr(), r0, n)?;
            r0 += n;
        }
        Ok(())
    }

    /// Several GEMVs of one input in one launch when their formats agree (else one each).
    fn gemv_many(&self, x: u64, outs: &[(&DevMatrix, u64)]) -> Result<()> {
        let items: Vec<BatchItem> =
            outs.iter().map(|(m, y)| BatchItem { m: m.view(), x, y: *y, swiglu: false }).collect();
        let fits = items.iter().all(|it| match it.m.format {
            DevFormat::Affine { bits, .. } => GemvKernels::x_smem_bytes(bits, it.m.cols) <= 48 << 10,
            _ => true,
        });
        if fits {
            self.gemv.gemv_batch(&self.dev, &items)
        } else {
            outs.iter().try_for_each(|(m, y)| self.gemv(m, x, *y))
        }
    }

    /// Device-to-device copy bandwidth, read + write bytes per second (best of 5 copies of
    /// 256 MiB).
    pub fn measure_d2d_bandwidth(&self) -> Result<f64> {
        let n = 256 << 20;
        let (a, b) = (self.dev.alloc(n)?, self.dev.alloc(n)?);
        a.fill_bytes(1)?;
        let timer = self.dev.timer()?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            timer.start()?;
            self.dev.copy_dtod(&a, &b, n)?;
            timer.stop()?;
            best = best.min(timer.ms()?);
        }
        Ok(2.0 * n as f64 / (best * 1e-3))
    }

    /// Pinned host-to-device bandwidth, bytes per second (best of 5 copies of 64 MiB).
    pub fn measure_h2d_bandwidth(&self) -> Result<f64> {
        let n = 64 << 20;
        let mut host = Pinned::new(n)?;
        host.as_mut_slice().fill(1);
        let dst = self.dev.alloc(n)?;
        let timer = self.dev.timer()?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            timer.start()?;
            // SAFETY: pinned source and device destination of n bytes; synchronized by ms().
            unsafe {
                cudarc::driver::result::memcpy_htod_async(dst.ptr(), host.as_mut_slice(), self.dev.stream.cu_stream())
            }
            .map_err(|e| CudaError(format!("cuMemcpyHtoDAsync: {e:?}")))?;
            timer.stop()?;
            best = best.min(timer.ms()?);
        }
        Ok(n as f64 / (best * 1e-3))
    }

    /// Grows the attention caches to hold `need` positions (never inside a graph capture).
    fn ensure_capacity(&self, c: &ModelConfig, d: &mut DevSeqState, pos0: usize, need: usize) -> Result<()> {
        let row = c.num_kv_heads * c.head_dim * 4;
        for ls in d.layers.iter_mut() {
            if let DevLayerState::Attention { k: kc, v: vc, cap } = ls
                && need > *cap
            {
                let ncap = need.next_power_of_two().max(256).min(self.max_context.max(need));
                let nk = self.dev.alloc(ncap * row)?;
                let nv = self.dev.alloc(ncap * row)?;
                if pos0 > 0 {
                    self.dev.copy_dtod(kc, &nk, pos0 * row)?;
                    self.dev.copy_dtod(vc, &nv, pos0 * row)?;
                }
                *kc = nk;
                *vc = nv;
                *cap = ncap;
            }
        }
        Ok(())
    }

    /// Reads experts `ids` of layer `li` from the host tier and copies each into a claimed pool
    /// slot (the compute stream waits for each copy) and the slot table. Returns their slots.
    /// Copies experts `ids` of layer `li` into pool slots. `borrow` (a prefill pass, exclusive
    /// tiers): experts the RAM tier holds stay there and their GPU copies are dropped when
    /// evicted, rather than each one moving up and the one it evicts moving back down — a long
    /// prompt touches nearly every expert of a layer, and those round trips were most of its
    /// time with the experts in RAM.
    fn load_missing(
        &self,
        pool: &mut ExpertPool,
        experts: &DevExperts,
        li: usize,
        ids: &[usize],
        protected: &dyn Fn(ExpertKey) -> bool,
        borrow: bool,
    ) -> crate::Result<Vec<usize>> {
        let layout = experts.layout;
        let mut slots = Vec::with_capacity(ids.len());
        match &experts.host {
            ExpertSet::Resident(v) => {
                let t0 = Instant::now();
                for &e in ids {
                    let (l, pieces) = expert_layout(&v[e])?;
                    slots.push(self.place(pool, (li, e), layout, l, &pieces, protected, None, false, None)?);
                }
                pool.fill_prof.place_ns += t0.elapsed().as_nanos() as u64;
            }
            ExpertSet::Streamed { store, layer } => {
                // Exclusive tiers: the experts leave the RAM tier, and what the GPU evicts for
                // them goes back to it.
                let demote_to = self.opts.gpu.exclusive.then_some(store);
                // Copies back from earlier steps whose DMAs are done go to the RAM tier now.
                Self::finish_demotes(pool, 0)?;
                let t0 = Instant::now();
                let bufs: Vec<(Arc<AlignedBuf>, bool)> = match (demote_to.is_some(), borrow) {
                    // (Borrowed: the RAM tier keeps its copy.)
                    (true, true) => store.borrow(*layer, ids)?,
                    (true, false) => store.take(*layer, ids)?.into_iter().map(|(b, _)| (b, false)).collect(),
                    (false, _) => store.fetch(*layer, ids)?.into_iter().map(|b| (b, false)).collect(),
                };
                let t1 = Instant::now();
                pool.fill_prof.fetch_ns += (t1 - t0).as_nanos() as u64;
                for (&e, (buf, borrowed)) in ids.iter().zip(bufs) {
                    let t_parse = Instant::now();
                    let base = ByteSource::bytes(&*buf).as_ptr() as usize;
                    let ew = store.expert_weights(*layer, buf.clone())?;
                    let (l, pieces) = expert_layout(&ew)?;
                    pool.fill_prof.parse_ns += t_parse.elapsed().as_nanos() as u64;
                    if demote_to.is_some() && pool.demote_map[li].is_none() {
                        pool.demote_map[li] =
                            Some(pieces.iter().map(|&(off, p)| (off, p.as_ptr() as usize - base, p.len())).collect());
                    }
                    let src = Some(&buf);
                    slots.push(self.place(pool, (li, e), layout, l, &pieces, protected, demote_to, borrowed, src)?);
                }
                pool.fill_prof.place_ns += t1.elapsed().as_nanos() as u64;
            }
        }
        Ok(slots)
    }

    /// Claims a slot for expert `e` of layer `li` and copies `pieces` into it. The expert the
    /// claim evicts goes back to the RAM tier first when `demote_to` is given (exclusive tiers).
    #[allow(clippy::too_many_arguments)]
    fn place(
        &self,
        pool: &mut ExpertPool,
        (li, e): (usize, usize),
        layout: ExpertLayout,
        l: ExpertLayout,
        pieces: &[(usize, &[u8])],
        protected: &dyn Fn(ExpertKey) -> bool,
        demote_to: Option<&Arc<ExpertStore>>,
        borrowed: bool,
        src: Option<&Arc<AlignedBuf>>,
    ) -> crate::Result<usize> {
        if l != layout {
            return Err(CudaError(format!("layer {li} expert {e} differs in shape from expert 0")).into());
        }
        let key = (li as u32, e as u32);
        let t_claim = Instant::now();
        let (slot, victim) = pool.claim(&self.dev, key, protected)?;
        pool.fill_prof.claim_ns += t_claim.elapsed().as_nanos() as u64;
        if let Some(vk) = victim {
            let t_table = Instant::now();
            self.gemv.table_set(&self.dev, pool.table.ptr(), pool.table_index(vk), 0)?;
            pool.fill_prof.table_ns += t_table.elapsed().as_nanos() as u64;
            // (A borrowed expert's RAM copy is still there: nothing to copy back.)
            if let Some(store) = demote_to
                && !pool.borrowed[slot]
            {
                self.demote(pool, store, vk, slot)?;
            }
        }
        pool.borrowed[slot] = borrowed;
        let n = pool.fill(&self.dev, slot, l.bytes, pieces, src)?;
        let t_table = Instant::now();
        self.gemv.table_set(&self.dev, pool.table.ptr(), pool.table_index(key), pool.base(slot))?;
        pool.fill_prof.table_ns += t_table.elapsed().as_nanos() as u64;
        self.stats.h2d_bytes.fetch_add(n, Relaxed);
        Ok(slot)
    }

    /// Starts copying the expert `key` in `slot` (just evicted, not yet overwritten) back into
    /// the RAM tier: a GPU → host DMA on the copy stream (after the copies that filled the slot,
    /// before the one that refills it) into a store buffer at the blob offsets the store's views
    /// expect, or into pinned staging when that buffer is not pinned. [`Self::finish_demotes`]
    /// admits it to the RAM tier once the DMA is done.
    fn demote(&self, pool: &mut ExpertPool, store: &Arc<ExpertStore>, key: ExpertKey, slot: usize) -> Result<()> {
        let layer = key.0 as usize;
        if store.ram_cache_budget() == 0 {
            return Ok(());
        }
        let Some(Some(map)) = pool.demote_map.get(layer) else { return Ok(()) };
        let store_layer = pool.store_layers[layer];
        let bytes = map.iter().map(|&(so, _, len)| so + len).max().unwrap_or(0);
        let ranges = merge_ranges(map.clone());
        if pool.demotes.len() >= DEMOTES_IN_FLIGHT {
            Self::finish_demotes(pool, 1)?;
        }
        let src = pool.base(slot);
        let stream = pool.copy_stream.cu_stream();
        let done = self.dev.ctx.new_event(None).map_err(|e| CudaError(format!("cuEventCreate: {e:?}")))?;
        let mut buf = store.expert_buffer(store_layer);
        let mut stage = None;
        // Once a copy is queued, an error must not let `buf` or the staging buffer go back to
        // their pools (or be freed) under it: wait for the copy stream first.
        let issued = (|| -> Result<()> {
            if buf.host_memory().is_some() {
                // Pinned: the pieces land in the buffer itself, where the store's views expect them.
                let dst = buf.as_mut_slice();
                for &(so, bo, len) in &ranges {
                    // SAFETY: the ranges lie inside the slot (offsets from its layout) and inside
                    // the buffer (offsets from the store's own views), in the same order in both
                    // when merged; the buffer goes to the pending entry, untouched until the event
                    // recorded after this copy has fired (or the stream is synchronized on error).
                    unsafe {
                        cudarc::driver::result::memcpy_dtoh_async(&mut dst[bo..bo + len], src + so as u64, stream)
                    }
                    .map_err(|e| CudaError(format!("cuMemcpyDtoHAsync: {e:?}")))?;
                }
            } else {
                let mut st = match pool.d2h_free.pop() {
                    Some(st) => st,
                    None => Pinned::new(pool.slot_bytes)?,
                };
                // SAFETY: `src` is inside the pool allocation (bytes ≤ slot size); the pinned
                // buffer goes to the pending entry, read only after its event has fired.
                let r =
                    unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut st.as_mut_slice()[..bytes], src, stream) };
                stage = Some(st);
                r.map_err(|e| CudaError(format!("cuMemcpyDtoHAsync: {e:?}")))?;
            }
            done.record(&pool.copy_stream).map_err(|e| CudaError(format!("cuEventRecord: {e:?}")))
        })();
        if let Err(e) = issued {
            let _ = pool.copy_stream.synchronize();
            return Err(e);
        }
        pool.demotes.push_back(PendingDemote {
            store: store.clone(),
            layer,
            store_layer,
            expert: key.1 as usize,
            buf,
            stage,
            done,
        });
        self.stats.d2h_bytes.fetch_add(bytes as u64, Relaxed);
        Ok(())
    }

    /// Finishes up to `n` copies back, oldest first: waits for each one's DMA, copies it out of
    /// staging if it landed there, and admits it to the RAM tier. `n == 0`: only those already
    /// done, without waiting.
    fn finish_demotes(pool: &mut ExpertPool, n: usize) -> Result<()> {
        let mut finished = 0;
        while let Some(d) = pool.demotes.front() {
            if n == 0 {
                if !d.done.try_is_complete().map_err(|e| CudaError(format!("cuEventQuery: {e:?}")))? {
                    break;
                }
            } else if finished == n {
                break;
            }
            d.done.synchronize().map_err(|e| CudaError(format!("cuEventSynchronize: {e:?}")))?;
            let mut d = pool.demotes.pop_front().expect("checked above");
            if let Some(mut st) = d.stage.take() {
                let Some(Some(map)) = pool.demote_map.get(d.layer) else {
                    return Err(CudaError(format!("no copy-back map for layer {}", d.layer)));
                };
                let dst = d.buf.as_mut_slice().as_mut_ptr() as usize;
                let src = st.as_mut_slice().as_ptr() as usize;
                // SAFETY: the map's ranges lie inside the slot's bytes landed in staging and
                // inside the store's expert buffer (offsets from its own views), and never overlap.
                unsafe { par_copy(map.iter().map(|&(so, bo, len)| (src + so, dst + bo, len))) };
                pool.d2h_free.push(st);
            }
            // A miss on it while the copy was pending read it from disk into a slot again: the
            // GPU is its home, and the RAM tier stays without it (exclusive tiers).
            if !pool.map.contains((d.layer as u32, d.expert as u32)) {
                d.store.admit(d.store_layer, d.expert, d.buf);
            }
            finished += 1;
        }
        Ok(())
    }

    /// Moves experts the pre-warm thread has read into free pool slots, at most `limit` per
    /// call (a step is delayed by at most that many copies). Stops the feed when the pool is
    /// full.
    fn drain_prewarm(&self, pool: &mut ExpertPool, limit: usize) -> crate::Result<()> {
        let mut feed = self.prewarm.lock().unwrap_or_else(|p| p.into_inner());
        let Some((rx, store)) = feed.as_ref() else { return Ok(()) };
        let mut moved = 0;
        while moved < limit {
            if pool.free.is_empty() {
                // Full (on-demand loads took the slots first): what the pre-warm has already
                // read for the GPU goes to the RAM tier instead (dropping the feed tells the
                // reader to send the rest there too).
                while let Ok(((l, e), buf, rate)) = rx.try_recv() {
                    let held = pool.pool_layer(l as usize).is_some_and(|pl| pool.map.contains((pl as u32, e)));
                    if !held {
                        store.admit_shared(l as usize, e as usize, buf, Some(rate));
                    }
                }
                *feed = None;
                return Ok(());
            }
            let ((l, e), buf, _) = match rx.try_recv() {
                Ok(item) => item,
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                // The reader has handed over the GPU's share: on-demand loads may fill the rest.
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    *feed = None;
                    return Ok(());
                }
            };
            // The store numbers layers from the model's first, the pool from its own.
            let Some(pl) = pool.pool_layer(l as usize) else { continue };
            if pool.map.contains((pl as u32, e)) {
                continue;
            }
            let ew = store.expert_weights(l as usize, buf)?;
            let (lay, pieces) = expert_layout(&ew)?;
            self.place(pool, (pl, e as usize), pool.layouts[pl], lay, &pieces, &|_| true, None, false, None)?;
            self.stats.prewarmed.fetch_add(1, Relaxed);
            moved += 1;
        }
        Ok(())
    }

    /// One pass over `states`: one sequence (rows at consecutive positions, in chunks of at
    /// most `prefill_chunk`), or a batch (`spec.batch`: row i is the next token of `states[i]`).
    fn run_seqs(
        &self,
        spec: &PassSpec<'_>,
        states: &mut [&mut DevSeqState],
        graph: &mut dyn for<'p> FnMut(&mut CudaPass<'p>) -> crate::Result<()>,
        out: &mut Vec<f32>,
    ) -> crate::Result<()> {
        for st in states.iter() {
            if let Some(why) = &st.broken {
                return Err(CudaError(why.clone()).into());
            }
        }
        let batched = !spec.batch.is_empty();
        self.dev.bind()?;
        let c = spec.cfg;
        let k = spec.experts_per_token;
        if k > self.max_k {
            return Err(CudaError(format!(
                "{k} experts per token: the GPU workspace was sized for {} (set it before load)",
                self.max_k
            ))
            .into());
        }
        let mut inner = self.inner()?;
        let Inner {
            pool,
            ws,
            step_io,
            hand_io,
            hand_dev,
            step_timer,
            graph: recorded,
            eager_steps,
            stretches,
            eager_stretch_steps,
            unsynced,
            timer_pending,
            ..
        } = &mut *inner;
        let ws = &*ws;
        if std::mem::take(unsynced) {
            // The last call left its rows to the next GPU without waiting; the host buffers it
            // used are reused below.
            self.dev.synchronize()?;
        }
        if std::mem::take(timer_pending) {
            self.count_step(step_timer)?;
        }
        // A bounded share of the pre-warm per call, so no step waits long for it.
        self.drain_prewarm(pool, 4 * (k + 1))?;
        let (n, v, h) = (spec.tokens.len(), c.vocab_size, c.hidden_size);
        let timing = spec.hooks.wants_timing();
        out.clear();
        match spec.input {
            PassInput::Hidden(rows) if rows.len() != n * h => {
                return Err(CudaError(format!(
                    "a pipeline stage got {} floats of residual stream for {n} tokens of {h}",
                    rows.len()
                ))
                .into());
            }
            PassInput::HiddenOnDevice if hand_dev.as_ref().is_none_or(|b| b.len() < n * h * 4) => {
                return Err(CudaError(format!("no residual rows for {n} tokens were handed to this GPU")).into());
            }
            _ => {}
        }
        if (matches!(spec.input, PassInput::Hidden(_)) || spec.output == PassOutput::Hidden) && hand_io.is_none() {
            *hand_io = Some(Pinned::new(self.opts.gpu.prefill_chunk.max(1) * h * 4)?);
        }
        if spec.output == PassOutput::HiddenOnDevice && hand_dev.as_ref().is_none_or(|b| b.len() < n * h * 4) {
            // (Grown only here and in `hand_over`, both after this GPU's stream has waited for
            // every copy out of the old buffer.)
            *hand_dev = Some(self.dev.alloc(n * h * 4)?);
        }
        let mut times = if timing { vec![LayerTimes::default(); c.num_layers] } else { Vec::new() };
        let mut done = 0;
        // Passes of at most `prefill_chunk` tokens (the workspace's size).
        while done < n {
            let t = (n - done).min(self.opts.gpu.prefill_chunk.max(1));
            let last_chunk = done + t == n;
            let want = match spec.want {
                LogitsFor::All => LogitsFor::All,
                LogitsFor::Last if last_chunk => LogitsFor::Last,
                _ => LogitsFor::None,
            };
            let sub = PassSpec { tokens: &spec.tokens[done..done + t], pos0: spec.pos0 + done, want, ..*spec };
            let pos0 = sub.pos0;
            if batched {
                for (st, &pos) in states.iter_mut().zip(spec.batch) {
                    self.ensure_capacity(c, st, pos, pos + 1)?;
                }
            } else {
                self.ensure_capacity(c, states[0], pos0, pos0 + t)?;
            }
            // [pos0, ids] up through pinned memory without a wait: the stream runs the copy
            // before the pass, and the host writes the buffer again only after this call's
            // final wait.
            // A batch appends each row's position after the ids.
            let head_len = (t + 1 + if batched { t } else { 0 }) * 4;
            {
                let io = step_io.as_mut_slice();
                io[..4].copy_from_slice(&(pos0 as i32).to_le_bytes());
                for (dst, &id) in io[4..(t + 1) * 4].chunks_exact_mut(4).zip(sub.tokens) {
                    dst.copy_from_slice(&(id as i32).to_le_bytes());
                }
                if batched {
                    for (dst, &pos) in io[(t + 1) * 4..head_len].chunks_exact_mut(4).zip(spec.batch) {
                        dst.copy_from_slice(&(pos as i32).to_le_bytes());
                    }
                }
            }
            let positions = if batched { ws.tok.ptr() + ((t + 1) * 4) as u64 } else { 0 };
            // SAFETY: a pinned source of head_len bytes that stays untouched until the stream has
            // run the copy (see above); `tok` holds prefill_chunk + 1 ints and t ≤ prefill_chunk.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    ws.tok.ptr(),
                    &step_io.as_mut_slice()[..head_len],
                    self.dev.stream.cu_stream(),
                )
            }
            .map_err(|e| CudaError(format!("cuMemcpyHtoDAsync (token ids): {e:?}")))?;
            if let PassInput::HiddenOnDevice = spec.input {
                let src = hand_dev.as_ref().ok_or_else(|| CudaError::new("no hand-off buffer"))?;
                // SAFETY: rows done..done+t of the hand-off buffer (checked to hold n rows) into
                // x (prefill_chunk rows, t ≤ prefill_chunk), stream-ordered after their arrival.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        ws.x.ptr(),
                        src.ptr() + (done * h * 4) as u64,
                        t * h * 4,
                        self.dev.stream.cu_stream(),
                    )
                }
                .map_err(|e| CudaError(format!("cuMemcpyDtoDAsync (residual stream in): {e:?}")))?;
            }
            if let (PassInput::Hidden(rows), Some(hand)) = (spec.input, hand_io.as_mut()) {
                // The previous stage's residual rows into x (the pass does not embed). The
                // buffer is written again only after this chunk's final wait.
                let bytes = &mut hand.as_mut_slice()[..t * h * 4];
                for (dst, x) in bytes.chunks_exact_mut(4).zip(&rows[done * h..(done + t) * h]) {
                    dst.copy_from_slice(&x.to_le_bytes());
                }
                // SAFETY: a pinned source of t·h floats left untouched until the stream has run
                // the copy; `x` holds prefill_chunk rows of h floats and t ≤ prefill_chunk.
                unsafe { cudarc::driver::result::memcpy_htod_async(ws.x.ptr(), &*bytes, self.dev.stream.cu_stream()) }
                    .map_err(|e| CudaError(format!("cuMemcpyHtoDAsync (residual stream): {e:?}")))?;
            }
            let timed_step = t == 1 && (want == LogitsFor::Last || spec.output != PassOutput::Logits);
            if timed_step {
                step_timer.start()?;
            }
            let resident = pool.all_resident();
            let all_out = if want == LogitsFor::All { Some(self.dev.alloc(t * v * 4)?) } else { None };
            let logits = match (&all_out, want) {
                (Some(b), _) => b.ptr(),
                (None, LogitsFor::Last) => ws.logits.ptr(),
                _ => 0,
            };
            // Runs the layer loop once; with `stretch`, its stretches between host waits are
            // recorded (returned) or replayed.
            let mut pass = |pool: &mut ExpertPool,
                            states: &mut [&mut DevSeqState],
                            times: &mut Vec<LayerTimes>,
                            stretch: Option<StretchRun<'_>>|
             -> (crate::Result<()>, Option<Vec<Stretch>>) {
                let mut p = CudaPass {
                    spec: &sub,
                    pool,
                    ws,
                    states: states.iter_mut().map(|s| &mut **s).collect(),
                    positions,
                    t,
                    resident,
                    logits,
                    prefetch: None,
                    times: std::mem::take(times),
                    marked: Instant::now(),
                    stretch,
                };
                let t_pass = Instant::now();
                let mut r = self.stretch_begin(&mut p).map_err(crate::Error::from);
                if r.is_ok() {
                    r = graph(&mut p);
                }
                if r.is_ok() {
                    r = self.stretch_end(&mut p).map_err(crate::Error::from);
                }
                if let (Ok(()), Some(StretchRun { mode: StretchMode::Replay(v), index, .. })) = (&r, &p.stretch)
                    && *index != v.len()
                {
                    r =
                        Err(CudaError(format!("a decode step replayed {index} of {} recorded stretches", v.len()))
                            .into());
                }
                if r.is_err() {
                    self.stretch_abort(&mut p);
                }
                if !resident && t == 1 {
                    self.stats.pass_host_ns.fetch_add(t_pass.elapsed().as_nanos() as u64, Relaxed);
                }
                *times = std::mem::take(&mut p.times);
                let recorded = match p.stretch.take() {
                    Some(StretchRun { mode: StretchMode::Record(v), .. }) => Some(v),
                    _ => None,
                };
                (r, recorded)
            };
            // Graphs bake in buffer addresses: not for `All`, whose output buffer is per call;
            // not when timing (marks synchronize).
            if t == 1 && !batched && resident && self.opts.gpu.graphs && want != LogitsFor::All && !timing {
                let key = GraphKey::of(states[0], want == LogitsFor::Last);
                if recorded.as_ref().is_some_and(|(k, _)| *k != key) {
                    *recorded = None;
                    *eager_steps = 0;
                }
                if recorded.is_none() && *eager_steps >= 1 {
                    let g = self.dev.capture(|| pass(&mut *pool, &mut *states, &mut times, None).0)?;
                    *recorded = Some((key, g));
                }
                match recorded {
                    Some((_, g)) => g.launch()?,
                    None => {
                        pass(&mut *pool, &mut *states, &mut times, None).0?;
                        *eager_steps += 1;
                    }
                }
            } else if t == 1
                && !batched
                && !resident
                && self.opts.gpu.graphs
                && self.opts.gpu.stretch_graphs
                && want != LogitsFor::All
                && !timing
            {
                let key = StretchKey {
                    graph: GraphKey::of(states[0], want == LogitsFor::Last),
                    prefetch: spec.hooks.wants_prefetch(),
                    k,
                    input: match spec.input {
                        PassInput::Embed => 0,
                        PassInput::Hidden(_) => 1,
                        PassInput::HiddenOnDevice => 2,
                    },
                    output: spec.output,
                };
                if stretches.as_ref().is_some_and(|(k, _)| *k != key) {
                    *stretches = None;
                    *eager_stretch_steps = 0;
                }
                let mode = match stretches.as_ref() {
                    Some((_, v)) => Some(StretchMode::Replay(v)),
                    None if *eager_stretch_steps >= 1 => Some(StretchMode::Record(Vec::new())),
                    None => None,
                };
                let replaying = matches!(mode, Some(StretchMode::Replay(_)));
                let run = mode.map(|mode| StretchRun { mode, index: 0, open: None });
                let (r, new) = pass(&mut *pool, &mut *states, &mut times, run);
                if r.is_err() {
                    // (A failed step may have stopped inside a stretch: record afresh.)
                    *stretches = None;
                    *eager_stretch_steps = 0;
                    return r;
                }
                match new {
                    Some(v) => *stretches = Some((key, v)),
                    None if !replaying => *eager_stretch_steps += 1,
                    None => {}
                }
            } else {
                pass(&mut *pool, &mut *states, &mut times, None).0?;
            }
            if resident && t == 1 {
                self.stats.pool_hits.fetch_add((k * c.num_layers) as u64, Relaxed);
                if spec.hooks.wants_routing() {
                    let ids = ws.ids_all.read_i32_n(c.num_layers * k)?;
                    for li in 0..c.num_layers {
                        let layer: Vec<u32> = ids[li * k..(li + 1) * k].iter().map(|&x| x as u32).collect();
                        spec.hooks.routing(li, pos0, &layer);
                    }
                }
            }
            self.stats.tokens.fetch_add(t as u64, Relaxed);
            match (want, all_out) {
                _ if spec.output == PassOutput::HiddenOnDevice => {
                    let dst = hand_dev.as_ref().ok_or_else(|| CudaError::new("no hand-off buffer"))?;
                    // SAFETY: x's first t rows into rows done..done+t of the hand-off buffer
                    // (sized for n rows above).
                    unsafe {
                        cudarc::driver::result::memcpy_dtod_async(
                            dst.ptr() + (done * h * 4) as u64,
                            ws.x.ptr(),
                            t * h * 4,
                            self.dev.stream.cu_stream(),
                        )
                    }
                    .map_err(|e| CudaError(format!("cuMemcpyDtoDAsync (residual stream out): {e:?}")))?;
                    if timed_step {
                        step_timer.stop()?;
                    }
                    if last_chunk {
                        // No wait: the next GPU's stream waits for this one (`hand_over`).
                        *unsynced = true;
                        *timer_pending = timed_step;
                    } else {
                        self.dev.synchronize()?;
                    }
                }
                _ if spec.output == PassOutput::Hidden => {
                    if timed_step {
                        step_timer.stop()?;
                    }
                    let hand = hand_io.as_mut().ok_or_else(|| CudaError::new("no hand-off buffer"))?;
                    let io = &mut hand.as_mut_slice()[..t * h * 4];
                    // SAFETY: a pinned destination of t·h floats, read by the host only after
                    // the stream is synchronized below; `x` holds at least t rows of h floats.
                    unsafe {
                        cudarc::driver::result::memcpy_dtoh_async(&mut *io, ws.x.ptr(), self.dev.stream.cu_stream())
                    }
                    .map_err(|e| CudaError(format!("cuMemcpyDtoHAsync (residual stream): {e:?}")))?;
                    self.dev.synchronize()?;
                    if timed_step {
                        self.count_step(step_timer)?;
                    }
                    super::context::extend_f32s_from_bytes(out, io);
                }
                (LogitsFor::None, _) => self.dev.synchronize()?,
                (LogitsFor::Last, _) => {
                    if timed_step {
                        step_timer.stop()?;
                    }
                    let io = &mut step_io.as_mut_slice()[head_len..head_len + v * 4];
                    // SAFETY: a pinned destination of exactly v floats, read by the host only
                    // after the stream is synchronized below; `logits` holds v floats.
                    unsafe {
                        cudarc::driver::result::memcpy_dtoh_async(
                            &mut *io,
                            ws.logits.ptr(),
                            self.dev.stream.cu_stream(),
                        )
                    }
                    .map_err(|e| CudaError(format!("cuMemcpyDtoHAsync (logits): {e:?}")))?;
                    self.dev.synchronize()?;
                    if timed_step {
                        self.count_step(step_timer)?;
                    }
                    out.clear();
                    super::context::extend_f32s_from_bytes(out, io);
                }
                (LogitsFor::All, Some(b)) => out.extend(b.read_f32_n(t * v)?),
                (LogitsFor::All, None) => unreachable!("allocated above"),
            }
            done += t;
        }
        Self::report_times(spec, &times);
        Ok(())
    }

    /// Opens a stretch of fixed GPU work (see [`StretchKey`]): recording starts a capture,
    /// replaying makes the launches that follow count-only.
    fn stretch_begin(&self, p: &mut CudaPass<'_>) -> Result<()> {
        let Some(run) = p.stretch.as_mut() else { return Ok(()) };
        if run.open.is_some() {
            return Err(CudaError::new("a decode stretch was opened twice"));
        }
        run.open = Some(self.dev.launch_count());
        match run.mode {
            StretchMode::Record(_) => self.dev.begin_capture()?,
            StretchMode::Replay(_) => self.dev.skip_launches(true),
        }
        Ok(())
    }

    /// Closes the open stretch and puts its work on the stream: the graph just recorded, or the
    /// recorded one whose launches the host has just walked through (the counts must agree: a
    /// step whose launches differ from the recording is an error, never a wrong replay).
    fn stretch_end(&self, p: &mut CudaPass<'_>) -> Result<()> {
        let Some(run) = p.stretch.as_mut() else { return Ok(()) };
        let Some(start) = run.open.take() else {
            return Err(CudaError::new("a decode stretch was closed without being opened"));
        };
        let launches = self.dev.launch_count() - start;
        match &mut run.mode {
            StretchMode::Record(v) => {
                let graph = self.dev.end_capture()?;
                if let Some(g) = &graph {
                    g.launch()?;
                }
                v.push(Stretch { graph, launches });
            }
            StretchMode::Replay(v) => {
                self.dev.skip_launches(false);
                let s =
                    v.get(run.index).ok_or_else(|| CudaError::new("a decode step has more stretches than recorded"))?;
                if s.launches != launches {
                    return Err(CudaError(format!(
                        "decode stretch {} made {launches} launches, the recording {}",
                        run.index, s.launches
                    )));
                }
                if let Some(g) = &s.graph {
                    g.launch()?;
                }
            }
        }
        run.index += 1;
        Ok(())
    }

    /// After a failed pass: ends an open capture or skip, so the stream is usable again.
    fn stretch_abort(&self, p: &mut CudaPass<'_>) {
        if let Some(run) = p.stretch.as_mut()
            && run.open.take().is_some()
        {
            match run.mode {
                StretchMode::Record(_) => drop(self.dev.end_capture()),
                StretchMode::Replay(_) => self.dev.skip_launches(false),
            }
        }
    }

    fn record_routing(p: &CudaPass<'_>, li: usize, pos: usize, experts: &[i32]) {
        if p.spec.hooks.wants_routing() {
            let ids: Vec<u32> = experts.iter().map(|&x| x as u32).collect();
            p.spec.hooks.routing(li, pos, &ids);
        }
    }

    /// One phase of the device-resolved expert GEMV: matrices `mats` (gate and up, or down) of
    /// the k routed experts whose ids are at `ids`, plus the shared expert's `shared` GEMVs (in
    /// the same launch when their format matches, else on their own).
    #[allow(clippy::too_many_arguments)]
    fn expert_phase(
        &self,
        ids: u64,
        table: u64,
        mats: &[MatLayout],
        shared: &[BatchItem],
        (x, x_stride): (u64, usize),
        (y, y_stride): (u64, usize),
        swiglu: bool,
        k: usize,
    ) -> Result<()> {
        use super::gemv::{ExpertsArgs, GemvProblem};
        if mats.len() == 2 && mats[0].format != mats[1].format {
            // Different formats cannot share a launch: one per matrix (`up` writes after gate).
            self.expert_phase(ids, table, &mats[..1], &shared[..1], (x, x_stride), (y, y_stride), swiglu, k)?;
            let y_up = y + (mats[0].rows * 4) as u64;
            return self.expert_phase(ids, table, &mats[1..], &shared[1..], (x, x_stride), (y_up, y_stride), swiglu, k);
        }
        let format = mats[0].format;
        let fused = shared.len() == mats.len() && shared.iter().all(|s| s.m.format == format);
        let mut args = ExpertsArgs {
            ids,
            table,
            x,
            y,
            x_stride: x_stride as i64,
            y_stride: y_stride as i64,
            k: k as i32,
            nmat: mats.len() as i32,
            swiglu: swiglu as i32,
            ..Default::default()
        };
        let (mut max_rows, mut max_cols) = (0, 0);
        for (o, l) in args.mat.iter_mut().zip(mats) {
            *o = l.mat_off();
            max_rows = max_rows.max(l.rows);
            max_cols = max_cols.max(l.cols);
        }
        if fused {
            for (p, it) in args.shared.iter_mut().zip(shared) {
                *p = GemvProblem::of(it);
                max_rows = max_rows.max(it.m.rows);
                max_cols = max_cols.max(it.m.cols);
            }
        } else {
            self.gemv.gemv_batch(&self.dev, shared)?;
        }
        self.gemv.experts(&self.dev, format, &args, max_rows, max_cols)
    }

    /// MoE block of one token: x += Σ routed + shared. Experts on the GPU are found by the
    /// kernels themselves (slot table); unless every expert is resident, the host then reads
    /// the ids, copies in the missing experts and runs them.
    #[allow(clippy::too_many_arguments)]
    fn moe_decode(
        &self,
        p: &mut CudaPass<'_>,
        li: usize,
        dl: &MoeWeights<Device>,
        next_norm: Option<(u64, u64)>,
    ) -> crate::Result<()> {
        let c = p.spec.cfg;
        let (ws, pos, resident) = (p.ws, p.spec.pos0, p.resident);
        let dev = &*self.dev;
        let (h, k, e) = (c.hidden_size, p.spec.experts_per_token, c.num_experts);
        let normed = ws.normed.ptr();
        let ids_ptr = ws.ids_all.ptr() + (li * k * 4) as u64;
        self.gemv_many(normed, &[(&dl.router, ws.rlogits.ptr()), (&dl.shared_gate, ws.sg.ptr())])?;
        self.ops.router_topk(dev, ws.rlogits.ptr(), e, k, c.norm_topk_prob, ids_ptr, ws.wts.ptr(), 1)?;
        let imax2 = 2 * c.moe_intermediate.max(c.shared_intermediate);
        let gu = |j: usize| ws.gu.ptr() + (j * imax2 * 4) as u64;
        let ys = |j: usize| ws.ys.ptr() + (j * h * 4) as u64;
        let layout = dl.experts.layout;
        let [gl, ul, dm] = layout.mats;
        let sh = &dl.shared;
        let table = p.pool.table.ptr() + (li * e * 8) as u64;
        let shared1 = [
            BatchItem { m: sh.gate.view(), x: normed, y: gu(k), swiglu: false },
            BatchItem { m: sh.up.view(), x: normed, y: gu(k) + (sh.gate.rows * 4) as u64, swiglu: false },
        ];
        let shared2 = [BatchItem { m: sh.down.view(), x: gu(k), y: ys(k), swiglu: true }];
        // The GPU's experts (every hit, found through the slot table, and the shared one): one
        // launch for the whole MLP when the formats allow, else gate+up then down.
        let fused = fused_experts()
            && self.gemv.fused_experts_fit(
                &[gl.view(0), ul.view(0), dm.view(0)],
                &[sh.gate.view(), sh.up.view(), sh.down.view()],
                k,
            );
        let gpu_experts = || -> Result<()> {
            if fused {
                use super::gemv::{FusedExpertsArgs, GemvProblem};
                let args = FusedExpertsArgs {
                    ids: ids_ptr,
                    table,
                    x: normed,
                    gu: gu(0),
                    ys: ys(0),
                    gu_stride: imax2 as i64,
                    ys_stride: h as i64,
                    mat: [gl.mat_off(), ul.mat_off(), dm.mat_off()],
                    shared: [GemvProblem::of(&shared1[0]), GemvProblem::of(&shared1[1]), GemvProblem::of(&shared2[0])],
                    sync: 0,
                    k: k as i32,
                };
                return self.gemv.experts_fused(dev, &args, gl.format);
            }
            self.expert_phase(ids_ptr, table, &[gl, ul], &shared1, (normed, 0), (gu(0), imax2), false, k)?;
            self.expert_phase(ids_ptr, table, &[dm], &shared2, (gu(0), imax2), (ys(0), h), true, k)
        };
        // (mask, rows) of the experts the CPU computed, on the GPU; None: all on the GPU.
        let mut cpu_rows = None;
        if resident {
            gpu_experts()?;
        } else {
            let t_moe = Instant::now();
            let mut cpu_outs: Vec<(usize, Vec<f32>)> = Vec::new();
            // The one host synchronization of the layer: which experts, and are they here? The
            // layer's input comes down with the ids (the CPU's share needs it), and the GPU's
            // experts are launched only after the wait, so that they run while the CPU computes.
            // The stretch since the last wait (combine, mixer, norm, router, top-k) ends here.
            self.stretch_end(p)?;
            // The CPU's threads spin through the wait and the GPU launches after it, so that its
            // share of the experts starts on running threads (dropped before that share, and
            // before anything else that needs the compute pool: the slot copies of disk reads).
            let mut warm = (self.opts.gpu.hybrid != Hybrid::Off && warm_threads())
                .then(|| flashmoe_kernels::WarmThreads::start(WARM_LIMIT));
            let (ids, x) = {
                let io = host_io(p.pool, k, h)?;
                let (id_bytes, rest) = io.split_at_mut(k * 4);
                // SAFETY: pinned destinations of exactly the copied sizes; the device ranges
                // are the layer's k ids and the h-float MoE input; the stream is synchronized
                // before the host reads them.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(id_bytes, ids_ptr, dev.stream.cu_stream())
                        .map_err(|e| CudaError(format!("cuMemcpyDtoHAsync (expert ids): {e:?}")))?;
                    cudarc::driver::result::memcpy_dtoh_async(&mut rest[..h * 4], normed, dev.stream.cu_stream())
                        .map_err(|e| CudaError(format!("cuMemcpyDtoHAsync (MoE input): {e:?}")))?;
                }
                let t_wait = Instant::now();
                dev.synchronize()?;
                self.stats.ids_wait_ns.fetch_add(t_wait.elapsed().as_nanos() as u64, Relaxed);
                (super::context::i32s_from_bytes(id_bytes), super::context::f32s_from_bytes(&rest[..h * 4]))
            };
            // (The prefetch guess is read before the launch: its read waits for the stream.)
            self.start_prefetch(p)?;
            self.stretch_begin(p)?;
            gpu_experts()?;
            self.stretch_end(p)?;
            Self::record_routing(p, li, pos, &ids);
            let pool = &mut *p.pool;
            pool.in_use.clear();
            // (The GPU has run everything queued before the ids: transit copies included.)
            if let Some(tr) = pool.transit.as_mut() {
                tr.hold.clear();
            }
            pool.release_copied();
            // (Copies back issued before the ids are done too: the RAM tier takes them before
            // anything below fetches from it. Not while the CPU's threads spin, which would
            // slow a staged copy's parallel copy-out: then at the next miss.)
            if warm.is_none() {
                Self::finish_demotes(pool, 0)?;
            }
            if let Some(&bad) = ids.iter().find(|&&x| x < 0 || x as usize >= e) {
                return Err(CudaError(format!("router produced expert id {bad} (non-finite activations?)")).into());
            }
            pool.map.set_clock(self.stats.tokens.load(Relaxed) as f64);
            let mut misses = Vec::new();
            for (j, &x) in ids.iter().enumerate() {
                match pool.lookup(li, x as usize) {
                    Some(slot) => {
                        pool.in_use.insert(slot);
                    }
                    None => misses.push(j),
                }
            }
            self.stats.pool_hits.fetch_add((k - misses.len()) as u64, Relaxed);
            self.stats.pool_misses.fetch_add(misses.len() as u64, Relaxed);
            if misses.is_empty() {
                // (Nothing for the CPU this layer.)
                drop(warm.take());
            }
            if let ExpertSet::Streamed { store, layer } = &dl.experts.host {
                let hits = ids.iter().enumerate().filter(|(j, _)| !misses.contains(j)).map(|(_, &x)| x as usize);
                store.note_uses(*layer, hits);
            }
            if !misses.is_empty() {
                let chosen: HashSet<u32> = ids.iter().map(|&x| x as u32).collect();
                let protect = |key: ExpertKey| key.0 == li as u32 && chosen.contains(&key.1);
                // Which misses the CPU computes in place (hybrid), which are copied to the GPU.
                // Auto with exclusive tiers: a disk read fills a free GPU slot while there is
                // one; once the GPU is full its contents (the pre-warmed hottest experts) stay,
                // and disk reads go to the RAM tier and the CPU: evicting a GPU expert would
                // cost a copy back to RAM and usually push out a hotter one than the newcomer.
                // While a pre-warm is handing the hottest experts to the GPU, its free slots are
                // theirs: a step's own disk reads would otherwise take them first-come.
                let feeding = self.prewarm.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                let mut free = if feeding { 0 } else { pool.free.len() };
                let exclusive = self.opts.gpu.exclusive;
                let (on_cpu, to_gpu): (Vec<usize>, Vec<usize>) =
                    misses.iter().partition(|&&j| match (self.opts.gpu.hybrid, &dl.experts.host) {
                        (Hybrid::Off, _) => false,
                        (Hybrid::Cpu, _) => true,
                        // Mapped checkpoint experts are read in place from memory too.
                        (Hybrid::Auto, ExpertSet::Resident(_)) => true,
                        (Hybrid::Auto, ExpertSet::Streamed { store, layer }) => {
                            if store.in_ram(*layer, ids[j] as usize) {
                                true
                            } else if free > 0 || !exclusive {
                                // (Inclusive tiers: every disk read goes to the GPU, as before.)
                                free = free.saturating_sub(1);
                                false
                            } else {
                                true
                            }
                        }
                    });
                if !to_gpu.is_empty() {
                    // (`ExpertPool::fill` and `demote` copy on the compute pool, which the
                    // spinners hold until dropped.)
                    drop(warm.take());
                    let miss_ids: Vec<usize> = to_gpu.iter().map(|&j| ids[j] as usize).collect();
                    let t_io = Instant::now();
                    let slots = self.load_missing(pool, &dl.experts, li, &miss_ids, &protect, false)?;
                    if let Some(t) = p.times.get_mut(li) {
                        t.io_wait += t_io.elapsed().as_secs_f64();
                    }
                    for (&j, &slot) in to_gpu.iter().zip(&slots) {
                        pool.in_use.insert(slot);
                        let base = pool.base(slot);
                        let first = [
                            BatchItem { m: gl.view(base), x: normed, y: gu(j), swiglu: false },
                            BatchItem { m: ul.view(base), x: normed, y: gu(j) + (gl.rows * 4) as u64, swiglu: false },
                        ];
                        self.gemv.gemv_batch(dev, &first)?;
                        self.gemv
                            .gemv_batch(dev, &[BatchItem { m: dm.view(base), x: gu(j), y: ys(j), swiglu: true }])?;
                    }
                }
                let share = self.plan_pcie_share(pool, &dl.experts.host, on_cpu, &ids)?;
                let mut sends = share.sends;
                // The CPU's share (zero-copy views of the RAM tier; only their outputs cross
                // PCIe) starts on the compute pool first; this thread then issues the PCIe
                // share's copies and launches while the pool computes, and waits for it after.
                // With nothing for the CPU, or `FLASHMOE_PCIE_OVERLAP=0` (for measuring what the
                // overlap buys), the PCIe share is issued first, the threads still spinning, as
                // before.
                let mut sent = Ok(());
                if !pcie_overlap() || share.keep.is_empty() {
                    sent = self.issue_pcie_share(pool, std::mem::take(&mut sends), normed, &gu, &ys);
                }
                let mut outs: Option<Vec<Vec<f32>>> = None;
                if share.keep.is_empty() {
                    drop(warm.take());
                } else {
                    let t_cpu = Instant::now();
                    let weights = self.cpu_weights(&dl.experts.host, &share.keep, &ids, share.keep_bufs)?;
                    let views = t_cpu.elapsed();
                    self.stats.cpu_fetch_ns.fetch_add(views.as_nanos() as u64, Relaxed);
                    drop(warm.take());
                    let mut host_done = Instant::now();
                    rayon::in_place_scope(|s| {
                        let (outs, weights, x, kernel_ns) = (&mut outs, &weights, &x, &self.stats.cpu_kernel_ns);
                        s.spawn(move |_| {
                            let t0 = Instant::now();
                            // One kernel batch for all of them (two parallel regions), not a
                            // parallel loop of experts each splitting its own matrices.
                            let jobs: Vec<crate::backend::cpu::MlpJob> = weights
                                .iter()
                                .map(|ew| crate::backend::cpu::MlpJob {
                                    gate: &ew.gate,
                                    up: &ew.up,
                                    down: &ew.down,
                                    xs: x,
                                    n: 1,
                                })
                                .collect();
                            *outs = Some(crate::backend::cpu::mlps_forward(&jobs));
                            kernel_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
                        });
                        if !sends.is_empty() {
                            sent = self.issue_pcie_share(pool, sends, normed, &gu, &ys);
                        }
                        host_done = Instant::now();
                    });
                    // (The host's time on the CPU's share: the views, and the wait for the pool
                    // after the PCIe share was issued; the kernels' own time is `cpu_kernel_ns`.)
                    self.stats.cpu_ns.fetch_add((views + host_done.elapsed()).as_nanos() as u64, Relaxed);
                }
                sent?;
                if let Some(outs) = outs {
                    self.stats.cpu_experts.fetch_add(share.keep.len() as u64, Relaxed);
                    cpu_outs = share.keep.iter().copied().zip(outs).collect();
                }
            }
            // Up in one copy through pinned memory, queued on the compute stream before the
            // combine (no wait: the next layer's ids read orders any reuse of the buffer): which
            // of the k rows the CPU computed (a mask, sent every layer, since the combine of a
            // replayed stretch always reads it) and those rows.
            let t_up = Instant::now();
            let dst = cpu_rows_dev(pool, dev, k, h)?;
            let io = host_io(&mut *pool, k, h)?;
            let (mask, rows) = io[(k + h) * 4..].split_at_mut(k * 4);
            mask.fill(0);
            let mut used = 0;
            for (j, y) in &cpu_outs {
                mask[j * 4..(j + 1) * 4].copy_from_slice(&1i32.to_le_bytes());
                rows[j * h * 4..(j + 1) * h * 4].copy_from_slice(super::context::f32_bytes(y));
                used = used.max(j + 1);
            }
            let src = &io[(k + h) * 4..(2 * k + h + used * h) * 4];
            // SAFETY: a pinned source left untouched until the stream has run this copy (see
            // `host_io`), into the device buffer of k mask ints and k rows (`cpu_rows_dev`).
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, dev.stream.cu_stream()) }
                .map_err(|e| CudaError(format!("cuMemcpyHtoDAsync (CPU expert outputs): {e:?}")))?;
            self.stats.upload_ns.fetch_add(t_up.elapsed().as_nanos() as u64, Relaxed);
            self.stats.moe_host_ns.fetch_add(t_moe.elapsed().as_nanos() as u64, Relaxed);
            cpu_rows = Some((dst, dst + (k * 4) as u64));
            // The next stretch: this combine through the next layer's top-k (or the logits).
            self.stretch_begin(p)?;
        }
        self.ops.moe_combine(
            dev,
            ws.x.ptr(),
            ws.ys.ptr(),
            ws.wts.ptr(),
            ws.sg.ptr(),
            k,
            h,
            next_norm,
            cpu_rows,
            c.rms_norm_eps,
        )?;
        Ok(())
    }

    /// MoE block of t > 1 tokens: the shared expert over all of them (GEMMs), then the routed
    /// experts with grouped GEMMs: every (token, expert) pair of the pass, sorted by expert, in
    /// three launches (gate, up, down) per group of experts that fits the GPU cache, and one
    /// deterministic combine.
    #[allow(clippy::too_many_arguments)]
    fn moe_prefill(&self, p: &mut CudaPass<'_>, li: usize, dl: &MoeWeights<Device>) -> crate::Result<()> {
        let (t_moe, loads_before) = (Instant::now(), p.pool.fill_prof);
        let (mut ids_wait, mut items_wait, mut launch) = (0u64, 0u64, 0u64);
        let (mut groups, mut hits, mut misses) = (0u64, 0u64, 0u64);
        let c = p.spec.cfg;
        let fetch_chunk = p.spec.fetch_chunk.max(1);
        let (ws, t, pos0) = (p.ws, p.t, p.spec.pos0);
        let dev = &*self.dev;
        let (h, k, e) = (c.hidden_size, p.spec.experts_per_token, c.num_experts);
        let normed = ws.normed.ptr();
        self.mm(ws, &dl.router, normed, ws.rlogits.ptr(), t)?;
        self.ops.router_topk(dev, ws.rlogits.ptr(), e, k, c.norm_topk_prob, ws.ids.ptr(), ws.wts.ptr(), t)?;
        self.mm(ws, &dl.shared_gate, normed, ws.sg.ptr(), t)?;
        let sh = &dl.shared;
        let si = sh.gate.rows;
        self.mm(ws, &sh.gate, normed, ws.g.ptr(), t)?;
        self.mm(ws, &sh.up, normed, ws.u.ptr(), t)?;
        self.ops.swiglu(dev, ws.g.ptr(), ws.u.ptr(), ws.act.ptr(), t * si)?;
        self.mm(ws, &sh.down, ws.act.ptr(), ws.yd.ptr(), t)?;
        self.ops.add_gated_rows(dev, ws.x.ptr(), ws.yd.ptr(), ws.sg.ptr(), h, t)?;

        // (The read waits for the stream: every copy it waited on has landed.)
        let t_ids = Instant::now();
        let ids = ws.ids.read_i32_n(t * k)?;
        ids_wait += t_ids.elapsed().as_nanos() as u64;
        p.pool.in_use.clear();
        p.pool.release_copied();
        // (Copies back issued before the ids are done too: each preceded a fill the stream
        // waited for.)
        Self::finish_demotes(p.pool, 0)?;
        if let Some(&bad) = ids.iter().find(|&&x| x < 0 || x as usize >= e) {
            return Err(CudaError(format!("router produced expert id {bad} (non-finite activations?)")).into());
        }
        for ti in 0..t {
            let pos = p.spec.batch.get(ti).copied().unwrap_or(pos0 + ti);
            Self::record_routing(p, li, pos, &ids[ti * k..(ti + 1) * k]);
        }
        let pool = &mut *p.pool;
        pool.map.set_clock(self.stats.tokens.load(Relaxed) as f64 + t as f64);
        // Pairs sorted by expert: pair p reads token xrow[p]; token t's j-th choice is pair_of[t·k+j].
        let mut per: Vec<Vec<usize>> = vec![Vec::new(); e];
        for (i, &x) in ids.iter().enumerate() {
            per[x as usize].push(i);
        }
        let chosen: Vec<usize> = (0..e).filter(|&x| !per[x].is_empty()).collect();
        let mut xrow = vec![0i32; t * k];
        let mut pair_of = vec![0i32; t * k];
        let mut first_pair = vec![0usize; e + 1];
        let mut p = 0;
        for &x in &chosen {
            first_pair[x] = p;
            for &i in &per[x] {
                xrow[p] = (i / k) as i32;
                pair_of[i] = p as i32;
                p += 1;
            }
        }
        let bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        ws.xrow.copy_from_host(&bytes(&xrow))?;
        ws.pair_of.copy_from_host(&bytes(&pair_of))?;
        let layout = dl.experts.layout;
        let [gl, ul, dm] = layout.mats;
        let inter = gl.rows;
        let ggml = layout.mats.iter().any(|m| matches!(m.format, DevFormat::Ggml(_)));
        let tc = self.tensor_cores()
            && layout.mats.iter().all(|m| self.gemv.tensor_core_fits(m.format, m.cols))
            && (!ggml || t >= GGML_TC_MIN_TOKENS);
        let table = pool.table.ptr() + (li * e * 8) as u64;
        // Experts of a group are all on the GPU at once; one group when the cache holds them.
        let group = (pool.nslots - 1).max(1);
        for grp in chosen.chunks(group) {
            let mut miss = Vec::new();
            for &x in grp {
                match pool.lookup(li, x) {
                    Some(slot) => {
                        pool.in_use.insert(slot);
                    }
                    None => miss.push(x),
                }
            }
            self.stats.pool_hits.fetch_add((grp.len() - miss.len()) as u64, Relaxed);
            self.stats.pool_misses.fetch_add(miss.len() as u64, Relaxed);
            (groups, hits, misses) = (groups + 1, hits + (grp.len() - miss.len()) as u64, misses + miss.len() as u64);
            if let ExpertSet::Streamed { store, layer } = &dl.experts.host {
                store.note_uses(*layer, grp.iter().copied().filter(|x| !miss.contains(x)));
            }
            if !miss.is_empty() {
                let members: HashSet<u32> = grp.iter().map(|&x| x as u32).collect();
                let protect = |key: ExpertKey| key.0 == li as u32 && members.contains(&key.1);
                for chunk in miss.chunks(fetch_chunk) {
                    for slot in
                        self.load_missing(pool, &dl.experts, li, chunk, &protect, self.opts.gpu.prefill_borrow)?
                    {
                        pool.in_use.insert(slot);
                    }
                }
            }
            // Work items: up to 8 pairs of one expert each (TC_PAIRS on tensor cores).
            let step = if tc { TC_PAIRS } else { 8 };
            let mut items: Vec<i32> = Vec::new();
            for &x in grp {
                let (p0, n) = (first_pair[x], per[x].len());
                for s0 in (0..n).step_by(step) {
                    items.extend_from_slice(&[x as i32, (p0 + s0) as i32, (n - s0).min(step) as i32, 0]);
                }
            }
            // (A synchronous copy: it waits for the previous group's GEMMs and this group's
            // copies into its slots.)
            let t_items = Instant::now();
            ws.items.copy_from_host(&bytes(&items))?;
            items_wait += t_items.elapsed().as_nanos() as u64;
            let t_launch = Instant::now();
            let nitems = items.len() / 4;
            let (pa, pb) =
                (first_pair[grp[0]], first_pair[*grp.last().expect("non-empty")] + per[grp[grp.len() - 1]].len());
            let g = |v: &MatLayout, x: u64, xrow: u64, out: u64, input: Option<&TcInput>| {
                self.gemv.gemm_grouped(dev, &v.offsets(), table, ws.items.ptr(), nitems, xrow, x, out, input)
            };
            // Tensor cores: the layer input split once for gate and up (their groups agree, else
            // once each), the activations of this group's pairs once for down.
            let scratch = ws.tc_input();
            let (gsum, usum, dsum) = (
                GemvKernels::tc_sum_group(gl.format),
                GemvKernels::tc_sum_group(ul.format),
                GemvKernels::tc_sum_group(dm.format),
            );
            if tc {
                self.gemv.split_for_tc(dev, normed, t, h, gsum, &scratch)?;
            }
            g(&gl, normed, ws.xrow.ptr(), ws.g.ptr(), tc.then_some(&scratch))?;
            if tc && usum != gsum {
                self.gemv.split_for_tc(dev, normed, t, h, usum, &scratch)?;
            }
            g(&ul, normed, ws.xrow.ptr(), ws.u.ptr(), tc.then_some(&scratch))?;
            let off = (pa * inter * 4) as u64;
            self.ops.swiglu(dev, ws.g.ptr() + off, ws.u.ptr() + off, ws.act.ptr() + off, (pb - pa) * inter)?;
            if tc {
                let rows = scratch.from_row(pa, inter, dsum);
                self.gemv.split_for_tc(dev, ws.act.ptr() + off, pb - pa, inter, dsum, &rows)?;
            }
            g(&dm, ws.act.ptr(), 0, ws.yd.ptr(), tc.then_some(&scratch))?;
            launch += t_launch.elapsed().as_nanos() as u64;
        }
        self.ops.moe_prefill_combine(dev, ws.x.ptr(), ws.yd.ptr(), ws.pair_of.ptr(), ws.wts.ptr(), k, h, t)?;
        if prefill_profile() {
            let mut pf = self.stats.prefill.lock().unwrap_or_else(|e| e.into_inner());
            if li == 0 {
                // (A pass that failed part way leaves its layers here.)
                *pf = PrefillProfile::default();
            }
            if pf.start.is_none() {
                (pf.start, pf.loads_at_start) = (Some(t_moe), loads_before);
            }
            pf.layers += 1;
            pf.moe_ns += t_moe.elapsed().as_nanos() as u64;
            (pf.ids_wait_ns, pf.items_wait_ns, pf.launch_ns) =
                (pf.ids_wait_ns + ids_wait, pf.items_wait_ns + items_wait, pf.launch_ns + launch);
            (pf.groups, pf.hits, pf.misses) = (pf.groups + groups, pf.hits + hits, pf.misses + misses);
            if li + 1 == c.num_layers {
                // The pass's GPU work done, so that the wall time is the MoE ops' whole span.
                dev.stream.synchronize().map_err(|e| CudaError(format!("stream synchronize: {e:?}")))?;
                let wall = pf.start.map_or(0, |s0| s0.elapsed().as_nanos() as u64);
                eprintln!("{}", pf.line(t, wall, &pool.fill_prof.since(pf.loads_at_start)));
                *pf = PrefillProfile::default();
            }
        }
        Ok(())
    }

    /// Hybrid auto's PCIe share of the misses `on_cpu` (indices into `ids`) the CPU would
    /// compute: which of them cross PCIe (as many as the split says, the last ones whose
    /// RAM-tier buffers are pinned and fit a transit slot) and their layouts. Nothing is copied
    /// or launched yet ([`Self::issue_pcie_share`]). The rest stay with the CPU, with their
    /// buffers when it fetched them.
    fn plan_pcie_share(
        &self,
        pool: &ExpertPool,
        host: &ExpertSet,
        on_cpu: Vec<usize>,
        ids: &[i32],
    ) -> crate::Result<PcieSharePlan> {
        let nothing = |keep| Ok(PcieSharePlan { keep, keep_bufs: None, sends: Vec::new() });
        let (Some(split), ExpertSet::Streamed { store, layer }) = (self.split, host) else { return nothing(on_cpu) };
        let Some(tr) = pool.transit.as_ref() else { return nothing(on_cpu) };
        let m = split.over_pcie(on_cpu.len()).min(tr.slots);
        if m == 0 || self.opts.gpu.hybrid != Hybrid::Auto {
            return nothing(on_cpu);
        }
        let t = Instant::now();
        let e_ids: Vec<usize> = on_cpu.iter().map(|&j| ids[j] as usize).collect();
        let bufs = store.fetch(*layer, &e_ids)?;
        let (mut keep, mut keep_bufs) = (Vec::with_capacity(on_cpu.len()), Vec::with_capacity(on_cpu.len()));
        let mut sends = Vec::with_capacity(m);
        // The last m that are in pinned memory (heap buffers from before the switch stay on the
        // CPU).
        for (&j, b) in on_cpu.iter().zip(bufs).rev() {
            let layout = if sends.len() < m && b.host_memory().is_some() {
                let base = ByteSource::bytes(&*b).as_ptr() as usize;
                blob_layout(&store.expert_weights(*layer, b.clone())?, base)?
            } else {
                None
            };
            match layout.filter(|(_, end)| *end <= tr.stride) {
                Some((mats, end)) => sends.push(PcieSend { row: j, buf: b, mats, end }),
                None => {
                    keep.push(j);
                    keep_bufs.push(b);
                }
            }
        }
        keep.reverse();
        keep_bufs.reverse();
        self.stats.pcie_host_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        Ok(PcieSharePlan { keep, keep_bufs: Some(keep_bufs), sends })
    }

    /// Issues the planned PCIe share: each expert copied whole by DMA from its pinned RAM-tier
    /// buffer into a transit slot (one copy each, on the copy stream) and computed there by two
    /// batched GEMV launches into the same output rows the GPU's own misses use (`gu`, `ys`):
    /// the combine reads them like any GPU expert. Nothing changes tier.
    fn issue_pcie_share(
        &self,
        pool: &mut ExpertPool,
        sends: Vec<PcieSend>,
        normed: u64,
        gu: &dyn Fn(usize) -> u64,
        ys: &dyn Fn(usize) -> u64,
    ) -> crate::Result<()> {
        if sends.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let dev = &*self.dev;
        let copy_stream = pool.copy_stream.clone();
        let tr = pool.transit.as_mut().expect("a plan with sends has transit memory");
        let (mut first, mut second) = (Vec::with_capacity(2 * sends.len()), Vec::with_capacity(sends.len()));
        let mut sent_bytes = 0;
        for (slot, PcieSend { row: j, buf: b, mats: [gl, ul, dm], end }) in sends.into_iter().enumerate() {
            let dst = tr.mem.ptr() + (slot * tr.stride) as u64;
            // SAFETY: a pinned source kept alive in `hold` until the host next waits for the
            // GPU (after this copy and the kernels reading it have run); the destination is
            // this slot's `stride` bytes of transit memory (end ≤ stride, checked by the plan;
            // slot < the transit's slots, the plan's bound on the number of sends).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(dst, &ByteSource::bytes(&*b)[..end], copy_stream.cu_stream())
            }
            .map_err(|e| CudaError(format!("cuMemcpyHtoDAsync (expert over PCIe): {e:?}")))?;
            tr.hold.push(b);
            sent_bytes += end;
            first.push(BatchItem { m: gl.view(dst), x: normed, y: gu(j), swiglu: false });
            first.push(BatchItem { m: ul.view(dst), x: normed, y: gu(j) + (gl.rows * 4) as u64, swiglu: false });
            second.push(BatchItem { m: dm.view(dst), x: gu(j), y: ys(j), swiglu: true });
        }
        tr.done.record(&copy_stream).map_err(|e| CudaError(format!("cuEventRecord: {e:?}")))?;
        dev.stream.wait(&tr.done).map_err(|e| CudaError(format!("cuStreamWaitEvent: {e:?}")))?;
        self.gemv.gemv_batch(dev, &first)?;
        self.gemv.gemv_batch(dev, &second)?;
        self.stats.pcie_experts.fetch_add(second.len() as u64, Relaxed);
        self.stats.h2d_bytes.fetch_add(sent_bytes as u64, Relaxed);
        self.stats.pcie_host_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        Ok(())
    }

    /// Hybrid auto with a RAM tier: makes the store's buffers pinned (so RAM-tier experts can
    /// cross PCIe by DMA from where they are), allocates transit memory for k experts, and sets
    /// the CPU / PCIe split from the rates it measures (the CPU's expert kernels on k experts of
    /// the first streamed layer; a pinned host-to-GPU copy).
    fn setup_pcie_share(&mut self, pool: &mut ExpertPool, experts: &[&DevExperts], k: usize) -> crate::Result<()> {
        let fixed = match self.opts.gpu.pcie_share {
            PcieShare::Fixed(f) if f <= 0.0 => return Ok(()),
            PcieShare::Fixed(f) => Some(f),
            PcieShare::Auto => None,
        };
        if self.opts.gpu.hybrid != Hybrid::Auto {
            return Ok(());
        }
        let streamed: Vec<(&Arc<ExpertStore>, usize)> = experts
            .iter()
            .filter_map(|e| match &e.host {
                ExpertSet::Streamed { store, layer } => Some((store, *layer)),
                ExpertSet::Resident(_) => None,
            })
            .collect();
        let Some(&(store, first)) = streamed.first() else { return Ok(()) };
        if store.ram_cache_budget() == 0 {
            return Ok(());
        }
        if store.host_memory().is_none() {
            // A forced share pins on every read (no wait for an idle moment to move entries).
            store.set_host_memory(Arc::new(PinnedHost { dev: self.dev.clone() }), fixed.is_some());
        }
        let stride = streamed
            .iter()
            .map(|&(s, l)| s.blob_bytes(l))
            .max()
            .unwrap_or(0)
            .next_multiple_of(SLOT_ALIGN)
            .max(SLOT_ALIGN);
        pool.transit = Some(Transit {
            mem: self.dev.alloc(k * stride)?,
            stride,
            slots: k,
            done: self.dev.ctx.new_event(None).map_err(|e| CudaError(format!("cuEventCreate: {e:?}")))?,
            hold: Vec::new(),
        });
        let (cpu_rate, pcie_rate) = match fixed {
            Some(_) => (0.0, 0.0),
            None => (Self::measure_cpu_expert_rate(store, first, k)?, self.measure_h2d_bandwidth()?),
        };
        self.split = Some(HybridSplit { cpu_rate, pcie_rate, fixed });
        Ok(())
    }

    /// Bytes per second of the CPU's expert kernels as hybrid decode runs them: on a share of
    /// about half of `k` distinct experts of `layer` at once, weights coming from DRAM (the
    /// share is RAM-tier entries, far more than the caches hold: the same k experts re-run back
    /// to back sit in L3 and measured 43–51 GB/s on the H200's host against 19–28 GB/s in
    /// decode, which sent too few misses over PCIe), threads awake. Best of 3, each on experts
    /// not used before and after the caches were overwritten.
    fn measure_cpu_expert_rate(store: &ExpertStore, layer: usize, k: usize) -> crate::Result<f64> {
        use rayon::prelude::*;
        let e = store.num_experts().max(1);
        let n = k.div_ceil(2).clamp(1, e);
        let mut flush = vec![0u8; (last_level_cache_bytes() / 2 * 3).min(512 << 20)];
        let mut best = f64::MAX;
        for rep in 0..3.min(e / n).max(1) {
            let ids: Vec<usize> = (rep * n..(rep + 1) * n).map(|i| i % e).collect();
            let bufs = store.fetch(layer, &ids)?;
            let weights: Vec<ExpertWeights> =
                bufs.into_iter().map(|b| store.expert_weights(layer, b)).collect::<crate::Result<_>>()?;
            let x = vec![0.01f32; weights.first().map_or(0, |w| w.gate.cols())];
            let jobs: Vec<crate::backend::cpu::MlpJob> = weights
                .iter()
                .map(|ew| crate::backend::cpu::MlpJob { gate: &ew.gate, up: &ew.up, down: &ew.down, xs: &x, n: 1 })
                .collect();
            // (In parallel: it also leaves the pool's threads awake, as decode keeps them.)
            flush.par_chunks_mut(1 << 20).for_each(|c| c.fill(rep as u8 + 1));
            let t = Instant::now();
            std::hint::black_box(crate::backend::cpu::mlps_forward(&jobs));
            best = best.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(&flush);
        Ok((n * store.blob_bytes(layer)) as f64 / best.max(1e-9))
    }

    /// Views of the experts `which` (indices into `ids`) the CPU computes: zero-copy from the
    /// RAM tier's buffers (`bufs` when the caller fetched them) or the mapped checkpoint.
    fn cpu_weights(
        &self,
        host: &ExpertSet,
        which: &[usize],
        ids: &[i32],
        bufs: Option<Vec<Arc<AlignedBuf>>>,
    ) -> crate::Result<Vec<ExpertWeights>> {
        match host {
            ExpertSet::Resident(v) => Ok(which.iter().map(|&j| v[ids[j] as usize].clone()).collect()),
            ExpertSet::Streamed { store, layer } => {
                let bufs = match bufs {
                    Some(b) => b,
                    None => store.fetch(*layer, &which.iter().map(|&j| ids[j] as usize).collect::<Vec<_>>())?,
                };
                bufs.into_iter().map(|b| store.expert_weights(*layer, b)).collect()
            }
        }
    }

    /// Reads the prefetch guess launched for the next layer (the GPU is idle up to here: the
    /// caller just read the expert ids) and starts reading those experts into the RAM tier.
    fn start_prefetch(&self, p: &mut CudaPass<'_>) -> Result<()> {
        let Some((layer, store, store_layer)) = p.prefetch.take() else { return Ok(()) };
        let logits = p.ws.plogits.read_f32_n(p.spec.cfg.num_experts)?;
        crate::layers::start_prefetch(p.spec.hooks, layer, &logits, p.spec.experts_per_token, &store, store_layer);
        Ok(())
    }

    /// Reports the per-layer times of a pass to the hooks.
    fn report_times(spec: &PassSpec<'_>, times: &[LayerTimes]) {
        for (li, t) in times.iter().enumerate() {
            spec.hooks.layer_times(li, t);
        }
    }
}

/// Host tensors → GPU tensors (the non-expert weights are uploaded; routed experts get their
/// slot layout, read from one real expert of the layer).
struct Upload<'a>(&'a CudaBackend);

impl Convert<Host, Device> for Upload<'_> {
    fn mat(&self, m: &Linear) -> crate::Result<DevMatrix> {
        self.0.dev.bind()?;
        let d = upload_linear(&self.0.dev, m)?;
        self.0.weight_bytes.fetch_add(d.bytes() as u64, Relaxed);
        let block = d.rows.min(DEQ_FLOATS / d.cols.max(1)) * d.cols;
        self.0.largest_matrix.fetch_max(block as u64, Relaxed);
        Ok(d)
    }

    fn vec(&self, v: &Vec<f32>) -> crate::Result<DevBuf> {
        self.0.dev.bind()?;
        Ok(self.0.dev.upload_f32(v)?)
    }

    fn experts(&self, layer: usize, e: &ExpertSet) -> crate::Result<DevExperts> {
        // Every expert of a layer has the same shapes and formats: expert 0 gives the layout.
        let layout = match e {
            ExpertSet::Resident(v) => {
                expert_layout(v.first().ok_or_else(|| CudaError(format!("layer {layer} has no experts")))?)?.0
            }
            ExpertSet::Streamed { store, layer: sl } => {
                let bufs = store.fetch(*sl, &[0])?;
                let buf = bufs.into_iter().next().ok_or_else(|| CudaError::new("expert fetch returned nothing"))?;
                expert_layout(&store.expert_weights(*sl, buf)?)?.0
            }
        };
        Ok(DevExperts { host: e.clone(), layout })
    }
}

impl Backend for CudaBackend {
    type T = Device;
    type State = DevSeqState;
    type Pass<'p> = CudaPass<'p>;

    fn describe(&self) -> String {
        format!("{} | prefill {}", self.dev.describe(), self.precision_name())
    }

    fn upload(&self) -> impl Convert<Host, Device> + '_ {
        Upload(self)
    }

    fn prepare(&mut self, c: &ModelConfig, experts: &[&DevExperts]) -> crate::Result<()> {
        self.dev.bind()?;
        self.check_geometry(c)?;
        self.dev.synchronize()?;
        let layouts: Vec<ExpertLayout> = experts.iter().map(|e| e.layout).collect();
        let slot_bytes = layouts.iter().map(|l| l.bytes).max().unwrap_or(SLOT_ALIGN).next_multiple_of(SLOT_ALIGN);
        let k = self.max_k;
        let prefill_chunk = self.opts.gpu.prefill_chunk.max(1);
        // The largest block of dequantized rows a prefill GEMM needs (the scratch for cuBLAS).
        // Tensor cores take 6 bytes per weight for the split rows (+ 4 for the f32 rows of GGML
        // blocks) from the same scratch, in smaller row blocks; at least one row of the widest
        // input fits.
        let split = self.blas.is_some() && self.tensor_cores();
        let deq = match (self.blas.is_some(), split) {
            (false, _) => 0,
            (true, false) => self.largest_matrix.load(Relaxed) as usize,
            (true, true) => (self.largest_matrix.load(Relaxed) as usize).max(widest_prefill_input(c) * 3),
        };
        let ws = Workspace::new(&self.dev, c, k, prefill_chunk, deq, split, self.tensor_cores())?;
        let total_experts = c.num_layers * c.num_experts;
        let staging_n = (k + 1).max(8);
        let wanted = match self.opts.gpu_cache {
            GpuCache::Bytes(b) => b as usize / slot_bytes,
            GpuCache::Experts(n) => n,
            GpuCache::Auto => {
                let (free, _) =
                    cudarc::driver::result::mem_get_info().map_err(|e| CudaError(format!("cuMemGetInfo: {e:?}")))?;
                let kv_per_token = c.layer_kinds.iter().filter(|k| **k == LayerKind::FullAttention).count()
                    * 2
                    * c.num_kv_heads
                    * c.head_dim
                    * 4;
                let dn_state = c.layer_kinds.len()
                    * (c.linear_value_heads * c.linear_key_dim * c.linear_value_dim + 4 * c.conv_dim())
                    * 4;
                let reserve = kv_per_token * self.opts.gpu.reserve_context.min(self.max_context)
                    + dn_state
                    + (1 << 30)
                    + free / 50;
                free.saturating_sub(reserve) / slot_bytes
            }
        };
        let nslots = wanted.min(total_experts);
        if nslots < k + 1 {
            return Err(CudaError(format!(
                "the GPU expert cache holds {nslots} experts of {} MiB; a token needs at least {} (use --device cpu, or a larger --gpu-cache)",
                slot_bytes >> 20,
                k + 1
            ))
            .into());
        }
        let mem = self.dev.alloc(nslots * slot_bytes)?;
        let mut staging = Vec::with_capacity(staging_n);
        for _ in 0..staging_n {
            staging.push(Staging {
                buf: Pinned::new(slot_bytes)?,
                done: self.dev.ctx.new_event(None).map_err(|e| CudaError(format!("cuEventCreate: {e:?}")))?,
                in_flight: false,
            });
        }
        let table = self.dev.alloc(c.num_layers * c.num_experts * 8)?;
        table.fill_bytes(0)?;
        let mut pool = ExpertPool {
            mem,
            table,
            num_experts: c.num_experts,
            slot_bytes,
            nslots,
            map: ExpertCache::with_policy((nslots * slot_bytes) as u64, CachePolicy::LfuAging { half_life: 32.0 }),
            free: (0..nslots).rev().collect(),
            layouts,
            staging,
            next_staging: 0,
            copy_stream: self.dev.ctx.new_stream().map_err(|e| CudaError(format!("cuStreamCreate: {e:?}")))?,
            in_use: HashSet::new(),
            borrowed: vec![false; nslots],
            demote_map: vec![None; c.num_layers],
            store_layers: experts
                .iter()
                .enumerate()
                .map(|(li, e)| match &e.host {
                    ExpertSet::Streamed { layer, .. } => *layer,
                    ExpertSet::Resident(_) => li,
                })
                .collect(),
            demotes: Default::default(),
            d2h_free: Vec::new(),
            direct_hold: Vec::new(),
            direct_done: None,
            fill_prof: FillProfile::default(),
            host_io: None,
            cpu_rows: None,
            transit: None,
        };
        self.total_experts = total_experts;
        self.setup_pcie_share(&mut pool, experts, k)?;
        let step_io = Pinned::new((self.opts.gpu.prefill_chunk.max(1) + 1 + c.vocab_size) * 4)?;
        let step_timer = self.dev.timer()?;
        let event = || {
            self.dev
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(|e| CudaError(format!("cuEventCreate: {e:?}")))
        };
        self.inner = Some(Mutex::new(Inner {
            pool,
            ws,
            step_io,
            hand_io: None,
            hand_dev: None,
            hand_ready: event()?,
            hand_arrived: event()?,
            peer_tried: false,
            unsynced: false,
            timer_pending: false,
            step_timer,
            graph: None,
            eager_steps: 0,
            stretches: None,
            eager_stretch_steps: 0,
        }));
        Ok(())
    }

    fn new_state(&self, c: &ModelConfig) -> crate::Result<DevSeqState> {
        self.dev.bind()?;
        let row = c.num_kv_heads * c.head_dim * 4;
        let mut layers = Vec::with_capacity(c.layer_kinds.len());
        for kind in &c.layer_kinds {
            layers.push(match kind {
                LayerKind::FullAttention => {
                    let cap = 256usize.min(self.max_context.max(1));
                    DevLayerState::Attention { k: self.dev.alloc(cap * row)?, v: self.dev.alloc(cap * row)?, cap }
                }
                LayerKind::LinearAttention => {
                    let conv = self.dev.alloc(c.conv_kernel.saturating_sub(1) * c.conv_dim() * 4)?;
                    let rec = self.dev.alloc(c.linear_value_heads * c.linear_key_dim * c.linear_value_dim * 4)?;
                    conv.fill_bytes(0)?;
                    rec.fill_bytes(0)?;
                    DevLayerState::DeltaNet { conv, rec }
                }
            });
        }
        Ok(DevSeqState { dev: self.dev.clone(), layers, broken: None })
    }

    fn run(
        &self,
        spec: &PassSpec<'_>,
        state: &mut DevSeqState,
        graph: &mut dyn for<'p> FnMut(&mut CudaPass<'p>) -> crate::Result<()>,
        out: &mut Vec<f32>,
    ) -> crate::Result<()> {
        if !spec.batch.is_empty() {
            return Err(CudaError::new("a batched pass needs one state per sequence (run_batch)").into());
        }
        self.run_seqs(spec, &mut [state], graph, out)
    }

    fn can_batch(&self) -> bool {
        true
    }

    fn batch_pays(&self) -> bool {
        // Measured on an H200 (docs/performance.md): with every expert resident a batched step
        // of 2–8 rows takes 8–13 ms against 1.1 ms for one decode step (the multi-row kernels
        // are prefill's, with a fixed cost per layer); with experts streaming it saves fetches.
        let Some(inner) = self.inner.as_ref() else { return false };
        inner.lock().unwrap_or_else(|p| p.into_inner()).pool.nslots < self.total_experts
    }

    fn run_batch(
        &self,
        spec: &PassSpec<'_>,
        states: &mut [&mut DevSeqState],
        graph: &mut dyn for<'p> FnMut(&mut CudaPass<'p>) -> crate::Result<()>,
        out: &mut Vec<f32>,
    ) -> crate::Result<()> {
        let n = spec.tokens.len();
        if spec.batch.len() != states.len() || n != states.len() || spec.want != LogitsFor::All {
            return Err(CudaError(format!(
                "a batched pass of {n} tokens got {} positions and {} states",
                spec.batch.len(),
                states.len()
            ))
            .into());
        }
        // Token ids and positions share the pass's upload buffer ([0, ids…, positions…]).
        if 2 * n > self.opts.gpu.prefill_chunk.max(1) {
            return Err(CudaError(format!(
                "{n} sequences in one pass: the GPU workspace holds {} (half the prefill chunk)",
                self.opts.gpu.prefill_chunk.max(1) / 2
            ))
            .into());
        }
        self.run_seqs(spec, states, graph, out)
    }

    fn embed(&self, p: &mut CudaPass<'_>, table: &DevMatrix) -> crate::Result<()> {
        let (dev, ws, t, h) = (&*self.dev, p.ws, p.t, p.spec.cfg.hidden_size);
        let (ids_ptr, x) = (ws.tok.ptr() + 4, ws.x.ptr());
        match table.format {
            DevFormat::Affine { bits, group_size } => {
                let v = table.view();
                self.ops.embed_affine(dev, v.w, v.s, v.b, ids_ptr, x, t, h, bits, group_size)?
            }
            DevFormat::F32 => self.ops.embed_dense(dev, table.w.ptr(), 0, ids_ptr, x, t, h)?,
            DevFormat::Bf16 => self.ops.embed_dense(dev, table.w.ptr(), 1, ids_ptr, x, t, h)?,
            DevFormat::Ggml(ty) => self.gemv.ggml_rows(dev, ty, table.w.ptr(), ids_ptr, 0, t, h, x)?,
        }
        Ok(())
    }

    fn rms_norm(&self, p: &mut CudaPass<'_>, w: &DevBuf) -> crate::Result<()> {
        let c = p.spec.cfg;
        self.ops.rms_norm(&self.dev, p.ws.x.ptr(), w.ptr(), p.ws.normed.ptr(), p.t, c.hidden_size, c.rms_norm_eps)?;
        Ok(())
    }

    fn attention(
        &self,
        p: &mut CudaPass<'_>,
        layer: usize,
        w: &AttentionWeights<Device>,
        inv_freq: &DevBuf,
    ) -> crate::Result<()> {
        let (c, ws, t, dev) = (p.spec.cfg, p.ws, p.t, &*self.dev);
        let normed = ws.normed.ptr();
        let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        if t == 1 {
            self.gemv_many(normed, &[(&w.q_proj, ws.proj.ptr()), (&w.k_proj, ws.k.ptr()), (&w.v_proj, ws.v.ptr())])?;
        } else {
            self.mm(ws, &w.q_proj, normed, ws.proj.ptr(), t)?;
            self.mm(ws, &w.k_proj, normed, ws.k.ptr(), t)?;
            self.mm(ws, &w.v_proj, normed, ws.v.ptr(), t)?;
        }
        let half = c.rotary_dims() / 2;
        let (q_row, kv_row) = ((nh * d * 4) as u64, (nkv * d * 4) as u64);
        // Each sequence's rows against its own KV cache (a batch: one row per sequence).
        for ((r0, rows, pos_ptr), st) in p.segments().into_iter().zip(&p.states) {
            let DevLayerState::Attention { k: kc, v: vc, cap } = &st.layers[layer] else {
                return Err(CudaError::new("layer state does not match layer kind").into());
            };
            let r0 = r0 as u64;
            let (q, gate) = (ws.q.ptr() + q_row * r0, ws.gate.ptr() + q_row * r0);
            self.ops.attn_prep(
                dev,
                ws.proj.ptr() + 2 * q_row * r0,
                ws.k.ptr() + kv_row * r0,
                ws.v.ptr() + kv_row * r0,
                w.q_norm.ptr(),
                w.k_norm.ptr(),
                inv_freq.ptr(),
                q,
                gate,
                kc.ptr(),
                vc.ptr(),
                rows,
                (nh, nkv, d, half),
                pos_ptr,
                c.rms_norm_eps,
            )?;
            // One token: split the key range by the cache capacity (fixed between cache
            // growths, so graphs stay valid); prefill rows have parallelism enough.
            let splits = if rows == 1 { (*cap / 256).clamp(1, MAX_SPLITS) } else { 1 };
            let out = ws.attn.ptr() + q_row * r0;
            self.ops.attention(
                dev,
                q,
                kc.ptr(),
                vc.ptr(),
                ws.part.ptr(),
                gate,
                out,
                rows,
                (nh, nkv, d),
                pos_ptr,
                splits,
            )?;
        }
        self.mm(ws, &w.o_proj, ws.attn.ptr(), ws.mixed.ptr(), t)?;
        Ok(())
    }

    fn delta_net(&self, p: &mut CudaPass<'_>, layer: usize, w: &DeltaNetWeights<Device>) -> crate::Result<()> {
        let (c, ws, t, dev) = (p.spec.cfg, p.ws, p.t, &*self.dev);
        let normed = ws.normed.ptr();
        if t == 1 {
            let outs =
                [(&w.in_qkv, ws.proj.ptr()), (&w.in_z, ws.z.ptr()), (&w.in_b, ws.b.ptr()), (&w.in_a, ws.a.ptr())];
            self.gemv_many(normed, &outs)?;
        } else {
            self.mm(ws, &w.in_qkv, normed, ws.proj.ptr(), t)?;
            self.mm(ws, &w.in_z, normed, ws.z.ptr(), t)?;
            self.mm(ws, &w.in_b, normed, ws.b.ptr(), t)?;
            self.mm(ws, &w.in_a, normed, ws.a.ptr(), t)?;
        }
        let (hk, hv, dk, dv) = (c.linear_key_heads, c.linear_value_heads, c.linear_key_dim, c.linear_value_dim);
        let (conv_row, zy_row, ab_row) = ((c.conv_dim() * 4) as u64, (hv * dv * 4) as u64, (hv * 4) as u64);
        // Each sequence's rows through its own conv window and recurrent state (a batch: one
        // row per sequence).
        for ((r0, rows, _), st) in p.segments().into_iter().zip(&p.states) {
            let DevLayerState::DeltaNet { conv: cs, rec } = &st.layers[layer] else {
                return Err(CudaError::new("layer state does not match layer kind").into());
            };
            if rows > 1 && self.ops.dn_prefill_fits(dk, dv) {
                // (Only a pass over one sequence has several rows: they start at row 0.)
                self.ops.dn_prefill(
                    dev,
                    (ws.proj.ptr(), cs.ptr(), w.conv.ptr(), ws.conv_out.ptr()),
                    (ws.z.ptr(), ws.b.ptr(), ws.a.ptr(), w.neg_a.ptr(), w.dt_bias.ptr(), w.norm.ptr()),
                    rec.ptr(),
                    ws.dn_y.ptr(),
                    rows,
                    (hk, hv, dk, dv, c.conv_kernel),
                    w.value_heads_tiled,
                    c.rms_norm_eps,
                )?;
                continue;
            }
            let r0 = r0 as u64;
            let conv_out = ws.conv_out.ptr() + conv_row * r0;
            self.ops.dn_conv(
                dev,
                ws.proj.ptr() + conv_row * r0,
                cs.ptr(),
                w.conv.ptr(),
                conv_out,
                rows,
                c.conv_dim(),
                c.conv_kernel,
            )?;
            self.ops.dn_recurrent(
                dev,
                conv_out,
                ws.z.ptr() + zy_row * r0,
                ws.b.ptr() + ab_row * r0,
                ws.a.ptr() + ab_row * r0,
                w.neg_a.ptr(),
                w.dt_bias.ptr(),
                w.norm.ptr(),
                rec.ptr(),
                ws.dn_y.ptr() + zy_row * r0,
                rows,
                (hk, hv, dk, dv),
                w.value_heads_tiled,
                c.rms_norm_eps,
            )?;
        }
        self.mm(ws, &w.out_proj, ws.dn_y.ptr(), ws.mixed.ptr(), t)?;
        Ok(())
    }

    fn add_rms_norm(&self, p: &mut CudaPass<'_>, w: &DevBuf) -> crate::Result<()> {
        let (c, ws, t, dev) = (p.spec.cfg, p.ws, p.t, &*self.dev);
        let (x, mixed, normed, h, eps) = (ws.x.ptr(), ws.mixed.ptr(), ws.normed.ptr(), c.hidden_size, c.rms_norm_eps);
        self.ops.add_rms_norm(dev, x, mixed, w.ptr(), normed, t, h, eps)?;
        Ok(())
    }

    fn prefetch(&self, p: &mut CudaPass<'_>, layer: usize, w: &MoeWeights<Device>) -> crate::Result<()> {
        // Only a step that waits for the host anyway can act on a guess.
        let ExpertSet::Streamed { store, layer: sl } = &w.experts.host else { return Ok(()) };
        if p.resident || p.t != 1 {
            return Ok(());
        }
        self.gemv(&w.router, p.ws.normed.ptr(), p.ws.plogits.ptr())?;
        p.prefetch = Some((layer, store.clone(), *sl));
        Ok(())
    }

    fn moe(
        &self,
        p: &mut CudaPass<'_>,
        layer: usize,
        w: &MoeWeights<Device>,
        next_norm: Option<&DevBuf>,
    ) -> crate::Result<()> {
        if p.t == 1 {
            let next = next_norm.map(|n| (n.ptr(), p.ws.normed.ptr()));
            return self.moe_decode(p, layer, w, next);
        }
        self.moe_prefill(p, layer, w)?;
        if let Some(n) = next_norm {
            self.rms_norm(p, n)?;
        }
        Ok(())
    }

    fn logits(&self, p: &mut CudaPass<'_>, lm_head: &DevMatrix) -> crate::Result<()> {
        let (ws, t, h) = (p.ws, p.t, p.spec.cfg.hidden_size);
        match p.spec.want {
            LogitsFor::None => {}
            LogitsFor::Last => self.gemv(lm_head, ws.normed.ptr() + ((t - 1) * h * 4) as u64, p.logits)?,
            LogitsFor::All => self.mm(ws, lm_head, ws.normed.ptr(), p.logits, t)?,
        }
        Ok(())
    }

    fn mark(&self, p: &mut CudaPass<'_>, layer: usize, phase: Phase) {
        // Timing synchronizes at every mark, so each phase's GPU time is attributed to it (it
        // costs the overlap between phases; `--timing` says so).
        let _ = self.dev.synchronize();
        let now = Instant::now();
        let secs = now.duration_since(p.marked).as_secs_f64();
        p.marked = now;
        let Some(t) = p.times.get_mut(layer) else { return };
        match phase {
            Phase::LayerStart => {}
            Phase::Mixed => t.mixer += secs,
            // The MoE op measured its own waits for copies; the rest of the phase is compute.
            Phase::LayerEnd => t.experts += (secs - t.io_wait).max(0.0),
        }
    }

    fn tier(&self) -> Option<TierInfo> {
        let inner = self.inner.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
        let (slots, slot_bytes) = (inner.pool.nslots, inner.pool.slot_bytes);
        let total = self.total_experts;
        let mut description = format!(
            "{} | prefill {} | weights {} MiB | expert cache {} MiB = {} of {} experts ({:.0}%)",
            self.dev.describe(),
            self.precision_name(),
            self.weight_bytes.load(Relaxed) >> 20,
            (slots * slot_bytes) >> 20,
            slots,
            total,
            100.0 * slots as f64 / total.max(1) as f64
        );
        // (The split of hybrid decode's RAM-tier misses, and the rates it came from.)
        if let Some(split) = &self.split {
            description += &format!(" | {}", split.describe(self.max_k));
        }

        Some(TierInfo {
            description,
            device: self.dev.describe(),
            slots,
            slot_bytes,
            total_experts: total,
            counters: TierCounters {
                hits: self.stats.pool_hits.load(Relaxed),
                misses: self.stats.pool_misses.load(Relaxed),
                h2d_bytes: self.stats.h2d_bytes.load(Relaxed),
                tokens: self.stats.tokens.load(Relaxed),
                cpu_experts: self.stats.cpu_experts.load(Relaxed),
                pcie_experts: self.stats.pcie_experts.load(Relaxed),
                pcie_host_ns: self.stats.pcie_host_ns.load(Relaxed),
                d2h_bytes: self.stats.d2h_bytes.load(Relaxed),
                prewarmed: self.stats.prewarmed.load(Relaxed),
                ids_wait_ns: self.stats.ids_wait_ns.load(Relaxed),
                cpu_ns: self.stats.cpu_ns.load(Relaxed),
                cpu_kernel_ns: self.stats.cpu_kernel_ns.load(Relaxed),
                cpu_fetch_ns: self.stats.cpu_fetch_ns.load(Relaxed),
                upload_ns: self.stats.upload_ns.load(Relaxed),
                moe_host_ns: self.stats.moe_host_ns.load(Relaxed),
                pass_host_ns: self.stats.pass_host_ns.load(Relaxed),
                decode_steps: self.stats.decode_steps.load(Relaxed),
                decode_gpu_ns: self.stats.decode_gpu_ns.load(Relaxed),
            },
        })
    }

    fn preload_experts(&self, experts: &[&DevExperts], fetch_chunk: usize) -> crate::Result<usize> {
        self.dev.bind()?;
        let mut inner = self.inner()?;
        let mut n = 0;
        'outer: for (li, set) in experts.iter().enumerate() {
            let num = inner.pool.num_experts;
            let ids: Vec<usize> = (0..num).collect();
            for chunk in ids.chunks(fetch_chunk.max(1)) {
                if inner.pool.free.len() < chunk.len() {
                    break 'outer;
                }
                self.load_missing(&mut inner.pool, set, li, chunk, &|_| true, false)?;
                n += chunk.len();
            }
        }
        self.dev.synchronize()?;
        inner.pool.release_copied();
        Ok(n)
    }

    fn prewarm_room(&self) -> usize {
        self.inner().map(|i| i.pool.free.len()).unwrap_or(0)
    }

    fn accept_prewarm(&self, rx: crate::experts::store::PrewarmRx, store: Arc<ExpertStore>) {
        *self.prewarm.lock().unwrap_or_else(|p| p.into_inner()) = Some((rx, store));
    }

    fn can_hand_over(&self, next: &Self) -> bool {
        self.opts.gpu.peer_hand_off && next.opts.gpu.peer_hand_off
    }

    fn hand_over(&self, next: &Self, floats: usize) -> crate::Result<()> {
        let bytes = floats * 4;
        self.dev.bind()?;
        let mut me = self.inner()?;
        let src = me.hand_dev.as_ref().filter(|b| b.len() >= bytes).map(DevBuf::ptr);
        let src = src.ok_or_else(|| CudaError(format!("no {bytes} bytes of residual rows to hand over")))?;
        me.hand_ready.record(&self.dev.stream).map_err(|e| CudaError(format!("cuEventRecord: {e:?}")))?;
        let peer = (!me.peer_tried && self.dev.ordinal != next.dev.ordinal).then(|| self.dev.ctx.cu_ctx());
        me.peer_tried = true;
        next.dev.bind()?;
        if let Some(src_ctx) = peer {
            // Direct copies over NVLink / PCIe peer-to-peer when the GPUs allow it; otherwise
            // the driver stages the copy through host memory (still no host wait).
            // SAFETY: a plain driver call on the current (next GPU's) context.
            let r = unsafe { cudarc::driver::sys::cuCtxEnablePeerAccess(src_ctx, 0) };
            tracing::debug!("peer access cuda:{} → cuda:{}: {r:?}", next.dev.ordinal, self.dev.ordinal);
        }
        let mut nx = next.inner()?;
        if nx.hand_dev.as_ref().is_none_or(|b| b.len() < bytes) {
            nx.hand_dev = Some(next.dev.alloc(bytes)?);
        }
        let dst = nx.hand_dev.as_ref().map(DevBuf::ptr).expect("set above");
        next.dev.stream.wait(&me.hand_ready).map_err(|e| CudaError(format!("cuStreamWaitEvent: {e:?}")))?;
        // SAFETY: `bytes` lie inside both buffers (checked and sized above); the copy runs on the
        // next GPU's stream after this GPU's rows are written (the event), and this GPU's stream
        // waits for it below before it writes or frees its buffer again.
        unsafe {
            cudarc::driver::result::memcpy_peer_async(
                next.dev.ctx.cu_ctx(),
                dst,
                self.dev.ctx.cu_ctx(),
                src,
                bytes,
                next.dev.stream.cu_stream(),
            )
        }
        .map_err(|e| {
            CudaError(format!("cuMemcpyPeerAsync cuda:{} → cuda:{}: {e:?}", self.dev.ordinal, next.dev.ordinal))
        })?;
        nx.hand_arrived.record(&next.dev.stream).map_err(|e| CudaError(format!("cuEventRecord: {e:?}")))?;
        self.dev.bind()?;
        self.dev.stream.wait(&nx.hand_arrived).map_err(|e| CudaError(format!("cuStreamWaitEvent: {e:?}")))?;
        Ok(())
    }

    fn measure_bandwidths(&self) -> crate::Result<Option<Bandwidths>> {
        self.dev.bind()?;
        Ok(Some(Bandwidths { d2d: self.measure_d2d_bandwidth()?, h2d: self.measure_h2d_bandwidth()? }))
    }
}

#[cfg(test)]
mod tests {
    use super::{HybridSplit, coalesce_pieces, merge_ranges};

    #[test]
    fn pieces_at_the_same_distance_in_host_and_slot_become_one_copy() {
        let buf: Vec<u8> = (0..=255).collect();
        let at = |o: usize, n: usize| &buf[o..o + n];
        let offs = |v: &[(usize, &[u8])]| -> Vec<(usize, usize, usize)> {
            v.iter().map(|&(o, p)| (o, p.as_ptr() as usize - buf.as_ptr() as usize, p.len())).collect()
        };
        // A blob laid out like its slot (pieces 64 apart in both, out of order): one copy from
        // the first piece's start to the last one's end.
        let one = coalesce_pieces(&[(64, at(64, 32)), (0, at(0, 48)), (128, at(128, 16))]);
        assert_eq!(offs(&one), [(0, 0, 144)]);
        // The second piece sits 16 bytes further in the slot than in the host buffer: two
        // copies; the third follows the second at the same distance and joins it.
        let two = coalesce_pieces(&[(0, at(0, 32)), (80, at(64, 16)), (112, at(96, 8))]);
        assert_eq!(offs(&two), [(0, 0, 32), (80, 64, 40)]);
        // Host order against slot order, overlap, and empty pieces: never merged.
        let kept = coalesce_pieces(&[(0, at(100, 10)), (32, at(0, 10)), (64, at(0, 0))]);
        assert_eq!(offs(&kept), [(0, 100, 10), (32, 0, 10)]);
        let overlap = coalesce_pieces(&[(0, at(0, 20)), (10, at(10, 20))]);
        assert_eq!(offs(&overlap), [(0, 0, 20), (10, 10, 20)]);
        // The same on a copy-back map (slot offset, buffer offset, length).
        assert_eq!(merge_ranges(vec![(128, 192, 20), (0, 64, 100), (200, 300, 0)]), [(0, 64, 148)]);
        assert_eq!(merge_ranges(vec![(0, 0, 100), (256, 128, 50)]), [(0, 0, 100), (256, 128, 50)]);
        // Slot order not host order: a merge of the last two would copy over the first one's
        // host bytes, so nothing merges.
        let crossed = vec![(0, 100, 10), (256, 0, 10), (512, 256, 10)];
        assert_eq!(merge_ranges(crossed.clone()), crossed);
    }

    #[test]
    fn the_pcie_share_ends_both_sides_soonest_and_ties_stay_on_the_cpu() {
        let split = |cpu: f64, pcie: f64| HybridSplit { cpu_rate: cpu * 1e9, pcie_rate: pcie * 1e9, fixed: None };
        // 35 GB/s of CPU kernels against 50 GB/s of PCIe: 4 of 7 cross (3/35 ≥ 4/50 > 2/35).
        assert_eq!(split(35.0, 50.0).over_pcie(7), 4);
        // Equal rates, even count: half; odd: the extra one stays on the CPU.
        assert_eq!(split(40.0, 40.0).over_pcie(8), 4);
        assert_eq!(split(40.0, 40.0).over_pcie(1), 0);
        // A slow link sends nothing; nothing to split sends nothing.
        assert_eq!(split(40.0, 2.0).over_pcie(8), 0);
        assert_eq!(split(35.0, 50.0).over_pcie(0), 0);
        // A fixed share is rounded.
        let fixed = |f: f64| HybridSplit { cpu_rate: 0.0, pcie_rate: 0.0, fixed: Some(f) };
        assert_eq!(fixed(1.0).over_pcie(7), 7);
        assert_eq!(fixed(0.5).over_pcie(7), 4);
        assert_eq!(fixed(0.0).over_pcie(7), 0);
    }
}
