//! CPU compute kernels: `y = W·x` for weights stored as f32 / f16 / bf16 or in
//! MLX affine-quantized form (2, 4 or 8 bits).
//!
//! Weight bytes come straight from memory-mapped safetensors files, so they are
//! little-endian and may be unaligned; every read goes through unaligned loads.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512vnni;
pub mod cpu_features;
mod elem;
pub mod ggml;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod vbmi;

use std::cell::RefCell;

use cpu_features::SimdLevel;
pub use cpu_features::simd_level;
use elem::{Elem, with_elem};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use avx512::{PANEL, XBLOCK};

/// Storage type of float weights, and of affine scales/biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
        }
    }
}

/// Raw bytes of a weight matrix.
#[derive(Clone, Copy, Debug)]
pub enum MatData<'a> {
    /// Row-major `[rows, cols]` floats.
    Float { dtype: FloatType, data: &'a [u8] },
    /// MLX affine quantization: `w = q * scale + bias` per group of
    /// `group_size` consecutive elements of a row.
    Affine {
        bits: u32,
        group_size: usize,
        /// u32 words, row-major `[rows, cols * bits / 32]`, codes packed LSB first.
        weight: &'a [u8],
        /// `[rows, cols / group_size]` in `sb_dtype`.
        scales: &'a [u8],
        /// `[rows, cols / group_size]` in `sb_dtype`.
        biases: &'a [u8],
        sb_dtype: FloatType,
    },
    /// GGML block-quantized rows, as a GGUF file stores them: row-major, each row
    /// `ty.row_bytes(cols)` bytes (see [`ggml::GgmlType`]).
    Ggml { ty: ggml::GgmlType, data: &'a [u8] },
}

/// A borrowed, validated `[rows, cols]` weight matrix.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: MatData<'a>,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("bad shape: {0}")]
    BadShape(String),
    #[error("unsupported quantization: {0}")]
    Unsupported(String),
}

fn checked_len(what: &str, dims: &[usize]) -> Result<usize, KernelError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| KernelError::BadShape(format!("{what}: size {dims:?} overflows usize")))
}

impl<'a> MatRef<'a> {
    /// A float matrix; `data` must hold exactly `rows * cols` elements.
    pub fn float(dtype: FloatType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let want = checked_len("float matrix", &[rows, cols, dtype.size()])?;
        if data.len() != want {
            return Err(KernelError::BadShape(format!(
                "{dtype:?} matrix [{rows}, {cols}] needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(MatRef { data: MatData::Float { dtype, data }, rows, cols })
    }

    /// An MLX affine-quantized matrix. Checks `bits`, the divisibility of
    /// `cols` and `group_size`, and the exact byte length of every buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn affine(
        bits: u32,
        group_size: usize,
        weight: &'a [u8],
        scales: &'a [u8],
        biases: &'a [u8],
        sb_dtype: FloatType,
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if !matches!(bits, 2 | 4 | 8) {
            return Err(KernelError::Unsupported(format!("affine bits must be 2, 4 or 8, got {bits}")));
        }
        let per_word = (32 / bits) as usize;
        if group_size == 0 || !group_size.is_multiple_of(per_word) {
            return Err(KernelError::Unsupported(format!(
                "group_size {group_size} must be a positive multiple of {per_word} for {bits}-bit codes"
            )));
        }
        if !cols.is_multiple_of(group_size) {
            return Err(KernelError::BadShape(format!("cols {cols} is not a multiple of group_size {group_size}")));
        }
        let want_w = checked_len("affine weight", &[rows, cols / per_word, 4])?;
        if weight.len() != want_w {
            return Err(KernelError::BadShape(format!(
                "{bits}-bit weight [{rows}, {cols}] needs {want_w} bytes, got {}",
                weight.len()
            )));
        }
        let want_sb = checked_len("affine scales", &[rows, cols / group_size, sb_dtype.size()])?;
        for (name, buf) in [("scales", scales), ("biases", biases)] {
            if buf.len() != want_sb {
                return Err(KernelError::BadShape(format!(
                    "{name} [{rows}, {}] of {sb_dtype:?} needs {want_sb} bytes, got {}",
                    cols / group_size,
                    buf.len()
                )));
            }
        }
        Ok(MatRef { data: MatData::Affine { bits, group_size, weight, scales, biases, sb_dtype }, rows, cols })
    }

    /// A GGML block-quantized matrix (a GGUF tensor): checks that the type has kernels, that
    /// `cols` is a whole number of blocks and the exact byte length.
    pub fn ggml(ty: ggml::GgmlType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        ty.check_supported()?;
        let want = checked_len("GGML matrix", &[rows, ty.row_bytes(cols)?])?;
        if data.len() != want {
            return Err(KernelError::BadShape(format!(
                "{ty} matrix [{rows}, {cols}] needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(MatRef { data: MatData::Ggml { ty, data }, rows, cols })
    }

    /// View of rows `start..start + len`. Panics when out of range.
    pub fn rows_slice(&self, start: usize, len: usize) -> MatRef<'a> {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.rows),
            "rows_slice({start}, {len}) out of range for {} rows",
            self.rows
        );
        let data = match self.data {
            MatData::Float { dtype, data } => {
                let rb = self.cols * dtype.size();
                MatData::Float { dtype, data: &data[start * rb..(start + len) * rb] }
            }
            MatData::Affine { bits, group_size, weight, scales, biases, sb_dtype } => {
                let wb = self.cols * bits as usize / 8;
                let sb = self.cols / group_size * sb_dtype.size();
                MatData::Affine {
                    bits,
                    group_size,
                    weight: &weight[start * wb..(start + len) * wb],
                    scales: &scales[start * sb..(start + len) * sb],
                    biases: &biases[start * sb..(start + len) * sb],
                    sb_dtype,
                }
            }
            MatData::Ggml { ty, data } => {
                let rb = ty.row_bytes(self.cols).expect("validated at construction");
                MatData::Ggml { ty, data: &data[start * rb..(start + len) * rb] }
            }
        };
        MatRef { data, rows: len, cols: self.cols }
    }

    /// Bytes one full pass over the matrix reads.
    pub fn bytes(&self) -> usize {
        match self.data {
            MatData::Float { data, .. } | MatData::Ggml { data, .. } => data.len(),
            MatData::Affine { weight, scales, biases, .. } => weight.len() + scales.len() + biases.len(),
        }
    }
}

/// Below this many weight elements a matrix is processed on the calling
/// thread: splitting work across rayon costs a few microseconds, which is more
/// than a small matvec takes.
const PAR_MIN_ELEMS: usize = 1 << 18;

/// Row tile of the matmul kernel: rows decoded together, then dotted with
/// each input so that each input load feeds several FMAs.
const MM_TILE: usize = 4;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a zeroed-or-stale scratch buffer of `len` floats, reusing a
/// per-thread allocation. If the thread's buffer is already in use (a nested
/// call, e.g. rayon running another task on this thread while we wait), a
/// fresh one is allocated instead.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut f = Some(f);
    let res = SCRATCH.with(|cell| {
        let mut guard = cell.try_borrow_mut().ok()?;
        if guard.len() < len {
            guard.resize(len, 0.0);
        }
        Some((f.take().unwrap())(&mut guard[..len]))
    });
    match res {
        Some(r) => r,
        None => (f.take().unwrap())(&mut vec![0.0; len]),
    }
}

fn use_parallel(work: usize, rows: usize) -> bool {
    work >= PAR_MIN_ELEMS && rows >= 2 && rayon::current_num_threads() > 1
}

/// Splits `y` (one entry per row of `m`) into row blocks, in parallel when
/// the matrix is large.
fn for_row_blocks(m: &MatRef, y: &mut [f32], f: impl Fn(&MatRef, &mut [f32]) + Sync) {
    if use_parallel(m.rows * m.cols, m.rows) {
        let blocks = rayon::current_num_threads() * 4;
        let block = m.rows.div_ceil(blocks).max(1);
        y.par_chunks_mut(block).enumerate().for_each(|(i, yc)| {
            f(&m.rows_slice(i * block, yc.len()), yc);
        });
    } else {
        f(m, y);
    }
}

/// Which affine matvec kernel runs for a layout on a SIMD level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AffineKernel {
    Scalar,
    /// Needs each 4-word quarter of an 8-word vector inside one group.
    Avx2,
    Avx512,
    /// Integer dot products on x in fixed point (4-bit codes in groups of 64; `avx512vnni.rs`).
    Avx512Vnni,
}

impl AffineKernel {
    fn pick(level: SimdLevel, bits: u32, group_size: usize, cols: usize) -> Self {
        let wpg = group_size / (32 / bits) as usize;
        #[cfg(target_arch = "x86_64")]
        if level == SimdLevel::Avx512Bf16 && avx512vnni::supports(bits, group_size, cols) {
            return AffineKernel::Avx512Vnni;
        }
        #[cfg(target_arch = "x86_64")]
        if level.has_avx512() && avx512::supports(bits, group_size, cols) {
            return AffineKernel::Avx512;
        }
        let _ = cols;
        if level != SimdLevel::Scalar && wpg.is_multiple_of(4) { AffineKernel::Avx2 } else { AffineKernel::Scalar }
    }

    /// Vector width in words, which sets the layout of the permuted x.
    fn lanes(self) -> usize {
        match self {
            AffineKernel::Scalar => 0,
            AffineKernel::Avx2 => 8,
            AffineKernel::Avx512 | AffineKernel::Avx512Vnni => 16,
        }
    }
}

/// y[r] = Σ_c W[r,c]·x[c].  x.len()==cols, y.len()==rows (assert). Overwrites y.
pub fn matvec(m: &MatRef, x: &[f32], y: &mut [f32]) {
    matvec_at(cpu_features::detected(), m, x, y);
}

/// Batched: x is [n, cols] row-major, y is [n, rows] row-major:
/// y[t][r] = Σ_c W[r,c]·x[t][c]. Each weight row is decoded once for all n inputs.
pub fn matmul(m: &MatRef, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_at(cpu_features::detected(), m, x, n, y);
}

/// Dequantize/convert one row into `out` (len cols).
pub fn dequant_row(m: &MatRef, row: usize, out: &mut [f32]) {
    dequant_row_at(cpu_features::detected(), m, row, out);
}

fn check_level(level: SimdLevel) {
    assert!(level.is_supported(), "SIMD level {} is not supported on this CPU", level.name());
}

/// [`matvec`] on an explicit SIMD level (for tests and benchmarks).
/// Panics if the CPU lacks `level`.
#[doc(hidden)]
pub fn matvec_at(level: SimdLevel, m: &MatRef, x: &[f32], y: &mut [f32]) {
    check_level(level);
    assert_eq!(x.len(), m.cols, "matvec: x.len() != cols");
    assert_eq!(y.len(), m.rows, "matvec: y.len() != rows");
    if m.rows == 0 {
        return;
    }
    if m.cols == 0 {
        y.fill(0.0);
        return;
    }
    match m.data {
        MatData::Float { dtype, .. } => with_elem!(dtype, E => {
            for_row_blocks(m, y, |sub, ys| float_matvec_block::<E>(level, sub, x, ys));
        }),
        MatData::Affine { bits, group_size, sb_dtype, .. } => {
            let ng = m.cols / group_size;
            let kernel = AffineKernel::pick(level, bits, group_size, m.cols);
            let simd = kernel != AffineKernel::Scalar;
            let xp_len = if simd { m.cols } else { 0 };
            with_scratch(xp_len + ng, |buf| {
                let (xp, sx) = buf.split_at_mut(xp_len);
                prepare_affine_input(bits, group_size, kernel, x, xp, sx);
                let (xp, sx) = (&*xp, &*sx);
                with_elem!(sb_dtype, E => {
                    for_row_blocks(m, y, |sub, ys| {
                        affine_matvec_block::<E>(kernel, sub, x, xp, sx, ys)
                    });
                });
            });
        }
        MatData::Ggml { ty, data } => {
            ggml::matvec_at(level, ty, data, x, y).expect("validated at construction");
        }
    }
}

fn float_matvec_block<E: Elem>(level: SimdLevel, m: &MatRef, x: &[f32], y: &mut [f32]) {
    let MatData::Float { data, .. } = m.data else { unreachable!() };
    match level {
        SimdLevel::Scalar => scalar::float_matvec::<E>(data, m.cols, x, y),
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both): check_level verified the CPU features.
        SimdLevel::Avx2Fma => unsafe { avx2::float_matvec::<E>(data, m.cols, x, y) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Bf16 => unsafe { avx512::float_matvec::<E>(data, m.cols, x, y) },
        #[cfg(not(target_arch = "x86_64"))]
        SimdLevel::Avx2Fma | SimdLevel::Avx512 | SimdLevel::Avx512Bf16 => unreachable!(),
    }
}

fn affine_matvec_block<E: Elem>(kernel: AffineKernel, m: &MatRef, x: &[f32], xp: &[f32], sx: &[f32], y: &mut [f32]) {
    let MatData::Affine { bits, group_size, weight, scales, biases, .. } = m.data else { unreachable!() };
    let cols = m.cols;
    if kernel == AffineKernel::Scalar {
        match bits {
            2 => scalar::affine_matvec::<E, 2>(group_size, weight, scales, biases, cols, x, sx, y),
            4 => scalar::affine_matvec::<E, 4>(group_size, weight, scales, biases, cols, x, sx, y),
            8 => scalar::affine_matvec::<E, 8>(group_size, weight, scales, biases, cols, x, sx, y),
            _ => unreachable!("validated at construction"),
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: check_level verified the CPU features; the buffers were
    // validated against rows/cols at construction.
    unsafe {
        let (gs, w, s, b) = (group_size, weight, scales, biases);
        match (kernel, bits) {
            (AffineKernel::Avx512Vnni, _) => avx512vnni::affine_matvec::<E>(w, s, b, cols, xp, sx, y),
            (AffineKernel::Avx512, 2) => avx512::affine_matvec::<E, 2>(gs, w, s, b, cols, xp, sx, y),
            (AffineKernel::Avx512, 4) => avx512::affine_matvec::<E, 4>(gs, w, s, b, cols, xp, sx, y),
            (AffineKernel::Avx512, 8) => avx512::affine_matvec::<E, 8>(gs, w, s, b, cols, xp, sx, y),
            (_, 2) => avx2::affine_matvec::<E, 2>(gs, w, s, b, cols, xp, sx, y),
            (_, 4) => avx2::affine_matvec::<E, 4>(gs, w, s, b, cols, xp, sx, y),
            (_, 8) => avx2::affine_matvec::<E, 8>(gs, w, s, b, cols, xp, sx, y),
            _ => unreachable!("validated at construction"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xp;
}

/// Rearranges x into the order the SIMD affine kernel consumes it.
///
/// The kernel loads consecutive u32 words into the lanes of a vector and
/// extracts code `k` of every lane at once with a single AND (no shift): lane
/// `i` then holds `q·2^(bits·k)` for element `(word_i)·epw + k`. To undo the
/// `2^(bits·k)` factor for free, x is pre-scaled by the exact power of two
/// `2^-(bits·k)`. The top code of a word cannot be masked in place (it would
/// read as a negative i32), so it is shifted down instead and left unscaled.
///
/// Layout: for every aligned chunk of `lanes` words, for `k` in `0..epw`, the
/// values of each lane; a final partial chunk of `l` words uses `l` lanes.
fn permute_x(bits: u32, lanes: usize, x: &[f32], xp: &mut [f32]) {
    let epw = (32 / bits) as usize;
    let nw = x.len() / epw;
    let scale = |k: usize| -> f32 { if k + 1 == epw { 1.0 } else { f32::from_bits((127 - bits * k as u32) << 23) } };
    let mut out = 0;
    let mut w0 = 0;
    while w0 < nw {
        let l = (nw - w0).min(lanes);
        for k in 0..epw {
            let s = scale(k);
            for i in 0..l {
                xp[out] = x[(w0 + i) * epw + k] * s;
                out += 1;
            }
        }
        w0 += l;
    }
    debug_assert_eq!(out, x.len());
}

/// A raw output pointer shared by parallel workers that write disjoint elements of one buffer
/// (matmul row blocks here; the engine's per-head GatedDeltaNet tasks). Whoever dereferences
/// it promises, in its own `unsafe` block, that no two workers write the same element and that
/// the buffer outlives the parallel section.
#[derive(Clone, Copy)]
pub struct SyncPtr(pub *mut f32);
// SAFETY: the pointer itself is only an address; every write through it is an `unsafe` block
// of the user's that upholds the promise above.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    /// (A method, so that closures capture the whole `Sync` wrapper, not its field.)
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Keeps the compute pool's threads awake, spinning, from [`WarmThreads::start`] until the value
/// is dropped (at most `limit`), so that the parallel region that follows starts on threads
/// that are already running. Rayon puts an idle worker to sleep after a few dozen rounds of
/// looking for work (tens of microseconds); waking 16 of them for a region of ≈ 100 µs is a
/// large part of it (measured on the 2-core dev box: 4 experts of Qwen3.5-35B-A3B after 1 ms
/// idle, 515 µs cold against 306 µs warm). For a thread that waits briefly on something else (a
/// GPU) right before the CPU's share of the work. The spinners yield every few microseconds, so the
/// waiting thread gets a core where the pool has them all.
pub struct WarmThreads {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl WarmThreads {
    pub fn start(limit: std::time::Duration) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if rayon::current_num_threads() > 1 {
            let flag = stop.clone();
            rayon::spawn_broadcast(move |_| {
                let t0 = std::time::Instant::now();
                // (The flag is read every spin; the clock and a yield every 256 spins, a few µs.)
                'spin: while t0.elapsed() < limit {
                    for _ in 0..256 {
                        if flag.load(Relaxed) {
                            break 'spin;
                        }
                        std::hint::spin_loop();
                    }
                    std::thread::yield_now();
                }
            });
        }
        WarmThreads { stop }
    }
}

impl Drop for WarmThreads {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// [`matmul`] on an explicit SIMD level (for tests and benchmarks).
/// Panics if the CPU lacks `level`.
#[doc(hidden)]
pub fn matmul_at(level: SimdLevel, m: &MatRef, x: &[f32], n: usize, y: &mut [f32]) {
    check_level(level);
    let (rows, cols) = (m.rows, m.cols);
    assert_eq!(x.len(), n * cols, "matmul: x.len() != n * cols");
    assert_eq!(y.len(), n * rows, "matmul: y.len() != n * rows");
    if n == 1 {
        return matvec_at(level, m, x, y);
    }
    if n == 0 || rows == 0 {
        return;
    }
    if small_batch(m, n) {
        let mut job = [MatJob { m: *m, x, n, y }];
        return matmul_batch_at(level, &mut job);
    }
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let yp = SyncPtr(y.as_mut_ptr());
    let parallel = use_parallel(rows * cols * n, rows);
    let kernel = MatmulKernel::pick(level, n);
    let xpk = PackedX::new(kernel, x, n, cols, parallel);
    let tile = kernel.row_tile();
    // SAFETY: yp points at y, [n, rows], and the row ranges are disjoint.
    let run = |r0: usize, r1: usize| unsafe { matmul_rows_with(level, m, x, &xpk, n, yp, r0, r1) };
    if parallel {
        let blocks = rayon::current_num_threads() * 4;
        let block = rows.div_ceil(blocks).next_multiple_of(tile);
        (0..rows.div_ceil(block)).into_par_iter().for_each(|b| run(b * block, ((b + 1) * block).min(rows)));
    } else {
        run(0, rows);
    }
}

/// Inputs from which a matmul on AVX-512 takes the panel kernel (`avx512::panel_tile`): below
/// it, decoding and transposing the weights into panels costs about what the dot-product tiles
/// lose (`kernel_micro`, one thread, 512×2048: about even at 16–32 inputs, 1.2× at 64, 3× at 512).
const PANEL_MIN_INPUTS: usize = 24;

#[cfg(not(target_arch = "x86_64"))]
const PANEL: usize = 32;
#[cfg(not(target_arch = "x86_64"))]
const XBLOCK: usize = 12;

/// The kernel of a matrix product over several inputs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MatmulKernel {
    /// Decoded rows dotted with the inputs in 4 × 4 tiles (`dot_tiles`): every level.
    Tiles,
    /// AVX-512, many inputs: `avx512::panel_tile` (rows in the lanes, inputs broadcast).
    Panels,
}

impl MatmulKernel {
    /// `FLASHMOE_MATMUL_KERNEL=tiles|panels` forces one (where the level allows it, from 9
    /// inputs) for A/B measurements in one binary; read once.
    fn pick(level: SimdLevel, n: usize) -> Self {
        static FORCED: std::sync::OnceLock<Option<MatmulKernel>> = std::sync::OnceLock::new();
        let forced = *FORCED.get_or_init(|| match std::env::var("FLASHMOE_MATMUL_KERNEL").as_deref() {
            Ok("tiles") => Some(MatmulKernel::Tiles),
            Ok("panels") => Some(MatmulKernel::Panels),
            _ => None,
        });
        let avx512 = cfg!(target_arch = "x86_64") && matches!(level, SimdLevel::Avx512 | SimdLevel::Avx512Bf16);
        match forced {
            _ if !avx512 || n <= SMALL_BATCH => MatmulKernel::Tiles,
            Some(k) => k,
            None if n >= PANEL_MIN_INPUTS => MatmulKernel::Panels,
            None => MatmulKernel::Tiles,
        }
    }

    /// Row blocks of parallel tasks are multiples of this.
    fn row_tile(self) -> usize {
        match self {
            MatmulKernel::Tiles => MM_TILE,
            MatmulKernel::Panels => PANEL,
        }
    }
}

/// x as the kernel picked for a product reads it.
enum PackedX {
    None,
    Panels(Vec<f32>),
}

impl PackedX {
    fn new(kernel: MatmulKernel, x: &[f32], n: usize, cols: usize, parallel: bool) -> Self {
        match kernel {
            MatmulKernel::Tiles => PackedX::None,
            MatmulKernel::Panels => PackedX::Panels(pack_inputs(x, n, cols, parallel)),
        }
    }
}

/// Rows `r0..r1` of a matmul by the kernel `xpk` was packed for.
///
/// # Safety
/// As [`matmul_rows`].
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_rows_with(
    level: SimdLevel,
    m: &MatRef,
    x: &[f32],
    xpk: &PackedX,
    n: usize,
    yp: SyncPtr,
    r0: usize,
    r1: usize,
) {
    // SAFETY (both): passed on from the caller.
    match xpk {
        PackedX::None => unsafe { matmul_rows(level, m, x, n, yp, r0, r1) },
        PackedX::Panels(p) => unsafe { matmul_panels(level, m, p, n, yp, r0, r1) },
    }
}

/// Inputs the panel kernel takes for a block of `w` inputs (it is compiled for 4, 8 and 12).
fn panel_width(w: usize) -> usize {
    w.next_multiple_of(4).min(XBLOCK)
}

/// x `[n, cols]` rearranged for the panel kernel: blocks of `XBLOCK` inputs, block b at
/// `b·XBLOCK·cols`, holding `x[b·XBLOCK + i][k]` at `k·s + i` where s is the block's
/// [`panel_width`] (padding inputs are zero).
fn pack_inputs(x: &[f32], n: usize, cols: usize, parallel: bool) -> Vec<f32> {
    let mut out = vec![0f32; n.div_ceil(XBLOCK) * XBLOCK * cols];
    let fill = |(b, ob): (usize, &mut [f32])| {
        let t0 = b * XBLOCK;
        let w = (n - t0).min(XBLOCK);
        let s = panel_width(w);
        for i in 0..w {
            for (k, &v) in x[(t0 + i) * cols..(t0 + i + 1) * cols].iter().enumerate() {
                ob[k * s + i] = v;
            }
        }
    };
    if parallel {
        out.par_chunks_mut(XBLOCK * cols).enumerate().for_each(fill);
    } else {
        out.chunks_mut(XBLOCK * cols).enumerate().for_each(fill);
    }
    out
}

/// Rows `r0..r1` of `y = W·x` for `n` inputs packed by [`pack_inputs`]: decodes `PANEL` weight
/// rows at a time into a column-major panel (the 32 rows' values of column k side by side), then
/// runs the panel kernel over every block of inputs. Each output is one in-order f32 sum over k.
///
/// # Safety
/// `yp` must point at a `[n, m.rows]` output that no one else writes rows `r0..r1` of; the
/// level must be an AVX-512 one the CPU has.
unsafe fn matmul_panels(level: SimdLevel, m: &MatRef, xpk: &[f32], n: usize, yp: SyncPtr, r0: usize, r1: usize) {
    let (rows, cols) = (m.rows, m.cols);
    assert!(xpk.len() >= n.div_ceil(XBLOCK) * XBLOCK * cols);
    // Half a panel of rows decoded row-major, then the panel; 16 floats of slack so that the
    // panel can start on a cache line.
    let half = PANEL / 2;
    with_scratch(half * cols + PANEL * cols + 16, |buf| {
        let (rowbuf, rest) = buf.split_at_mut(half * cols);
        let off = rest.as_ptr().align_offset(64).min(16);
        let panel = &mut rest[off..off + PANEL * cols];
        let mut r = r0;
        while r < r1 {
            let pr = (r1 - r).min(PANEL);
            for h in 0..2 {
                // Rows past the end are computed and not stored; the transpose makes them zero.
                let hr = pr.saturating_sub(h * half).min(half);
                for j in 0..hr {
                    dequant_row_at(level, m, r + h * half + j, &mut rowbuf[j * cols..(j + 1) * cols]);
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: rowbuf holds hr rows of cols floats; the panel PANEL·cols floats from
                // column offset h·half.
                unsafe {
                    avx512::transpose_into_panel(rowbuf.as_ptr(), cols, hr, cols, panel.as_mut_ptr().add(h * half))
                };
            }
            for t0 in (0..n).step_by(XBLOCK) {
                let w = (n - t0).min(XBLOCK);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the panel holds PANEL·cols floats, block t0/XBLOCK of xpk w' = panel_width(w)
                // inputs of cols values (asserted above); the stores write rows r..r+pr of inputs
                // t0..t0+w, inside y and inside this caller's rows.
                unsafe {
                    let (p, xb, y) = (panel.as_ptr(), xpk.as_ptr().add(t0 * cols), yp.get().add(t0 * rows + r));
                    match panel_width(w) {
                        4 => avx512::panel_tile::<4>(p, xb, cols, y, rows, pr, w),
                        8 => avx512::panel_tile::<8>(p, xb, cols, y, rows, pr, w),
                        _ => avx512::panel_tile::<12>(p, xb, cols, y, rows, pr, w),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (w, level);
            }
            r += pr;
        }
    });
}

/// Rows `r0..r1` of `y = W·x` for `n` inputs: decodes `MM_TILE` weight rows at a time into
/// scratch, then dots them with every input.
///
/// # Safety
/// `yp` must point at a `[n, m.rows]` output that no one else writes rows `r0..r1` of.
unsafe fn matmul_rows(level: SimdLevel, m: &MatRef, x: &[f32], n: usize, yp: SyncPtr, r0: usize, r1: usize) {
    let (rows, cols) = (m.rows, m.cols);
    with_scratch(MM_TILE * cols, |buf| {
        let mut r = r0;
        while r < r1 {
            let tr = (r1 - r).min(MM_TILE);
            for j in 0..tr {
                dequant_row_at(level, m, r + j, &mut buf[j * cols..(j + 1) * cols]);
            }
            let put = |t: usize, j: usize, v: f32| {
                // SAFETY: t < n and r + j < r1 <= rows, so in bounds; rows r0..r1 belong to
                // this caller alone.
                unsafe { *yp.get().add(t * rows + r + j) = v };
            };
            dot_tiles(level, &buf[..tr * cols], tr, x, n, cols, put);
            r += tr;
        }
    });
}

/// Fills what the affine matvec kernels read besides the weights: `sx`, Σx per group (shared by
/// every row for the bias term; f64 because it is cheap here and the bias term can be large),
/// and for a SIMD kernel `xp`, x in the order the kernel consumes it (see [`permute_x`]).
fn prepare_affine_input(bits: u32, group_size: usize, kernel: AffineKernel, x: &[f32], xp: &mut [f32], sx: &mut [f32]) {
    for (s, xs) in sx.iter_mut().zip(x.chunks_exact(group_size)) {
        *s = xs.iter().map(|&v| v as f64).sum::<f64>() as f32;
    }
    match kernel {
        AffineKernel::Scalar => {}
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel is picked only on a level with AVX512_VNNI (and the rest), for
        // rows of whole 128-element chunks; xp has x.len() floats.
        AffineKernel::Avx512Vnni => unsafe { avx512vnni::prepare(x, xp) },
        _ => permute_x(bits, kernel.lanes(), x, xp),
    }
}

/// Σx over the compute threads, in chunks of 64 Ki values with eight partial sums each (so the
/// loop vectorizes rather than waiting on one add chain): how the benchmarks read memory at the
/// rate the threads can, for the roofline the matvecs are held against.
pub fn parallel_sum(x: &[f32]) -> f32 {
    x.par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0f32; 8];
            for w in c.chunks_exact(8) {
                for i in 0..8 {
                    acc[i] += w[i];
                }
            }
            acc.iter().sum::<f32>() + c.chunks_exact(8).remainder().iter().sum::<f32>()
        })
        .sum()
}

/// One product of a batch: `y = W·x` for `n` inputs, x `[n, m.cols]` and y `[n, m.rows]`
/// row-major, as [`matmul`] (or [`matvec`] when `n == 1`).
pub struct MatJob<'a> {
    pub m: MatRef<'a>,
    pub x: &'a [f32],
    pub n: usize,
    pub y: &'a mut [f32],
}

/// Row tasks per thread in a batch: enough that uneven finishing times even out, few enough that
/// each task is still tens of microseconds of work at the expert shapes.
const BATCH_TASKS_PER_THREAD: usize = 4;

/// Runs independent products (e.g. the gate and up projections of every expert a token chose) in
/// one parallel region, with the rows of all of them split into about equal tasks, instead of one
/// region per matrix: an expert matrix of a 35B-A3B model is 0.5 MB, a few microseconds per
/// thread on 16 cores, which is what a fork-join costs. Each output element is computed by the
/// same kernel, in the same order, as [`matmul`] on that job alone would, so results are identical.
/// Matvec jobs that share `x` (same slice) share its prepared copy.
pub fn matmul_batch(jobs: &mut [MatJob]) {
    matmul_batch_at(cpu_features::detected(), jobs);
}

/// Inputs up to which a matrix product runs as one matvec per input over each block of rows,
/// rather than dequantizing tiles for a matmul: the weights are read from memory once (a block
/// stays in cache for the next input), the arithmetic per input is the one-input kernel's —
/// so a row of a decode batch gets exactly the numbers it gets alone — and for a few inputs
/// it is faster than dequantizing. GGUF blocks keep their own matmul.
pub const SMALL_BATCH: usize = 8;

/// Weight bytes a task of a small batch covers at most (fits a core's L2 with room to spare).
const SMALL_BATCH_BLOCK_BYTES: usize = 256 << 10;

/// Bytes of one row of weights (codes, or values; scales and biases left out).
fn weight_bytes_per_row(m: &MatRef) -> usize {
    match m.data {
        MatData::Float { data, .. } | MatData::Affine { weight: data, .. } | MatData::Ggml { data, .. } => {
            data.len() / m.rows.max(1)
        }
    }
}

fn small_batch(m: &MatRef, n: usize) -> bool {
    (2..=SMALL_BATCH).contains(&n) && !matches!(m.data, MatData::Ggml { .. })
}

/// Input prepared once for the affine matvec jobs of a batch that share one x and one layout.
struct AffineInput {
    /// (x address, x length, bits, group size, kernel): jobs with equal keys read the same data.
    key: (usize, usize, u32, usize, AffineKernel),
    xp: Vec<f32>,
    sx: Vec<f32>,
}

/// Input prepared once for the GGML matvec jobs of a batch that share one x and one type.
struct GgmlInput {
    /// (x address, x length, type).
    key: (usize, usize, ggml::GgmlType),
    px: ggml::PreparedX,
}

/// [`matmul_batch`] on an explicit SIMD level (for tests and benchmarks).
/// Panics if the CPU lacks `level`.
#[doc(hidden)]
pub fn matmul_batch_at(level: SimdLevel, jobs: &mut [MatJob]) {
    check_level(level);
    for j in jobs.iter_mut() {
        assert_eq!(j.x.len(), j.n * j.m.cols, "matmul_batch: x.len() != n * cols");
        assert_eq!(j.y.len(), j.n * j.m.rows, "matmul_batch: y.len() != n * rows");
        if j.m.cols == 0 {
            j.y.fill(0.0);
        }
    }
    // The outputs as raw pointers (tasks write disjoint rows of them), the rest as shared views.
    let outs: Vec<SyncPtr> = jobs.iter_mut().map(|j| SyncPtr(j.y.as_mut_ptr())).collect();
    let specs: Vec<(MatRef, &[f32], usize)> = jobs.iter().map(|j| (j.m, j.x, j.n)).collect();

    let mut inputs: Vec<AffineInput> = Vec::new();
    let mut ggml_inputs: Vec<GgmlInput> = Vec::new();
    // For each job run as matvecs (one input, or a small batch): the prepared input of each of
    // its rows of x (an index into `inputs` for affine jobs, into `ggml_inputs` for GGML ones).
    let mut input_of: Vec<Vec<usize>> = vec![Vec::new(); specs.len()];
    for (i, (m, x, n)) in specs.iter().enumerate() {
        if let MatData::Ggml { ty, .. } = m.data {
            if *n == 1 && m.rows > 0 && m.cols > 0 {
                let key = (x.as_ptr() as usize, x.len(), ty);
                input_of[i].push(match ggml_inputs.iter().position(|p| p.key == key) {
                    Some(p) => p,
                    None => {
                        ggml_inputs.push(GgmlInput { key, px: ggml::PreparedX::new(level, ty, x) });
                        ggml_inputs.len() - 1
                    }
                });
            }
            continue;
        }
        let MatData::Affine { bits, group_size, .. } = m.data else { continue };
        if !(*n == 1 || small_batch(m, *n)) || m.rows == 0 || m.cols == 0 {
            continue;
        }
        let kernel = AffineKernel::pick(level, bits, group_size, m.cols);
        for xt in x.chunks_exact(m.cols) {
            let key = (xt.as_ptr() as usize, xt.len(), bits, group_size, kernel);
            input_of[i].push(match inputs.iter().position(|p| p.key == key) {
                Some(p) => p,
                None => {
                    let xp_len = if kernel == AffineKernel::Scalar { 0 } else { m.cols };
                    let mut inp = AffineInput { key, xp: vec![0.0; xp_len], sx: vec![0.0; m.cols / group_size] };
                    prepare_affine_input(bits, group_size, kernel, xt, &mut inp.xp, &mut inp.sx);
                    inputs.push(inp);
                    inputs.len() - 1
                }
            });
        }
    }

    let work = |(m, _, n): &(MatRef, &[f32], usize)| m.rows * m.cols * n;
    let total: usize = specs.iter().map(work).sum();
    let threads = rayon::current_num_threads();
    let parallel = total >= PAR_MIN_ELEMS && threads > 1;
    // The inputs of the jobs that take an AVX-512 matmul kernel, packed once per job (in
    // parallel over the jobs: a prefill's experts hold thousands of rows of x between them).
    let kernel_of = |(m, _, n): &(MatRef, &[f32], usize)| {
        if *n > 1 && !small_batch(m, *n) && m.rows > 0 && m.cols > 0 {
            MatmulKernel::pick(level, *n)
        } else {
            MatmulKernel::Tiles
        }
    };
    let pack = |spec: &(MatRef, &[f32], usize)| PackedX::new(kernel_of(spec), spec.1, spec.2, spec.0.cols, false);
    let packed: Vec<PackedX> =
        if parallel { specs.par_iter().map(pack).collect() } else { specs.iter().map(pack).collect() };
    let target = if parallel { (total / (threads * BATCH_TASKS_PER_THREAD)).max(1) } else { usize::MAX };
    // (job, first row, end row)
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (m, _, n) = spec;
        if m.rows == 0 || m.cols == 0 || *n == 0 {
            continue;
        }
        let pieces = work(spec).div_ceil(target).clamp(1, m.rows);
        let mut block = m.rows.div_ceil(pieces);
        if *n > 1 && !small_batch(m, *n) {
            block = block.next_multiple_of(kernel_of(spec).row_tile());
        }
        if small_batch(m, *n) {
            // Small enough to stay in cache while each input goes over it.
            block = block.min((SMALL_BATCH_BLOCK_BYTES / weight_bytes_per_row(m).max(1)).max(1));
        }
        let mut r0 = 0;
        while r0 < m.rows {
            let r1 = (r0 + block).min(m.rows);
            tasks.push((i, r0, r1));
            r0 = r1;
        }
    }
    let run = |&(i, r0, r1): &(usize, usize, usize)| {
        let (m, x, n) = specs[i];
        if n == 1 || small_batch(&m, n) {
            // A small batch runs the one-input kernel once per input over this block of rows
            // (still in cache for the later inputs): the same arithmetic as each input alone.
            let sub = m.rows_slice(r0, r1 - r0);
            for (t, xt) in x.chunks_exact(m.cols).enumerate() {
                // SAFETY: outs[i] points at job i's y ([n, m.rows]); rows r0..r1 of each input
                // belong to this task alone, and the jobs' outputs are distinct `&mut` slices.
                let ys = unsafe { std::slice::from_raw_parts_mut(outs[i].get().add(t * m.rows + r0), r1 - r0) };
                match (input_of[i].get(t), sub.data) {
                    (Some(&p), MatData::Affine { bits, group_size, sb_dtype, .. }) => {
                        let kernel = AffineKernel::pick(level, bits, group_size, m.cols);
                        let inp = &inputs[p];
                        with_elem!(sb_dtype, E => affine_matvec_block::<E>(kernel, &sub, xt, &inp.xp, &inp.sx, ys));
                    }
                    (Some(&p), MatData::Ggml { ty, data }) => {
                        ggml::matvec_rows(level, ty, data, xt, &ggml_inputs[p].px, ys);
                    }
                    (_, MatData::Float { dtype, .. }) if n > 1 => {
                        with_elem!(dtype, E => float_matvec_block::<E>(level, &sub, xt, ys))
                    }
                    _ => matvec_at(level, &sub, xt, ys),
                }
            }
        } else {
            // SAFETY: as above, for the [n, rows] layout of a matmul output.
            unsafe { matmul_rows_with(level, &m, x, &packed[i], n, outs[i], r0, r1) };
        }
    };
    if parallel {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// Dots `tr` decoded rows in `w` with each of the `n` inputs in `x`.
fn dot_tiles(
    level: SimdLevel,
    w: &[f32],
    tr: usize,
    x: &[f32],
    n: usize,
    cols: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    match level {
        SimdLevel::Scalar => {
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                for j in 0..tr {
                    put(t, j, scalar::dot(&w[j * cols..(j + 1) * cols], xt));
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both): check_level verified the CPU features; slices are
        // sized tr*cols and n*cols as asserted by the caller.
        SimdLevel::Avx2Fma => unsafe { avx2::dot_tiles(w, tr, x, n, cols, &mut put) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx512Bf16 => unsafe { avx512::dot_tiles(w, tr, x, n, cols, &mut put) },
        #[cfg(not(target_arch = "x86_64"))]
        SimdLevel::Avx2Fma | SimdLevel::Avx512 | SimdLevel::Avx512Bf16 => unreachable!(),
    }
}

/// [`dequant_row`] on an explicit SIMD level (for tests and benchmarks).
/// Panics if the CPU lacks `level`.
#[doc(hidden)]
pub fn dequant_row_at(level: SimdLevel, m: &MatRef, row: usize, out: &mut [f32]) {
    check_level(level);
    assert!(row < m.rows, "dequant_row: row {row} >= rows {}", m.rows);
    assert_eq!(out.len(), m.cols, "dequant_row: out.len() != cols");
    let cols = m.cols;
    match m.data {
        MatData::Float { dtype, data } => with_elem!(dtype, E => {
            let bytes = &data[row * cols * E::SIZE..(row + 1) * cols * E::SIZE];
            match level {
                SimdLevel::Scalar => scalar::float_row::<E>(bytes, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: check_level verified the CPU features.
                SimdLevel::Avx2Fma | SimdLevel::Avx512 | SimdLevel::Avx512Bf16 => unsafe { avx2::float_row::<E>(bytes, out) },
                #[cfg(not(target_arch = "x86_64"))]
                SimdLevel::Avx2Fma | SimdLevel::Avx512 | SimdLevel::Avx512Bf16 => unreachable!(),
            }
        }),
        MatData::Affine { bits, group_size, weight, scales, biases, sb_dtype } => with_elem!(sb_dtype, E => {
            let wb = cols * bits as usize / 8;
            let ng = cols / group_size;
            let w = &weight[row * wb..(row + 1) * wb];
            let s = &scales[row * ng * E::SIZE..(row + 1) * ng * E::SIZE];
            let b = &biases[row * ng * E::SIZE..(row + 1) * ng * E::SIZE];
            match (level, bits) {
                (SimdLevel::Scalar, 2) => scalar::affine_row::<E, 2>(group_size, w, s, b, out),
                (SimdLevel::Scalar, 4) => scalar::affine_row::<E, 4>(group_size, w, s, b, out),
                (SimdLevel::Scalar, 8) => scalar::affine_row::<E, 8>(group_size, w, s, b, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY (all three): check_level verified the CPU features;
                // slice lengths match cols as validated at construction.
                (SimdLevel::Avx2Fma | SimdLevel::Avx512 | SimdLevel::Avx512Bf16, 2) => unsafe { avx2::affine_row::<E, 2>(group_size, w, s, b, out) },
                #[cfg(target_arch = "x86_64")]
                (SimdLevel::Avx2Fma | SimdLevel::Avx512 | SimdLevel::Avx512Bf16, 4) => unsafe { avx2::affine_row::<E, 4>(group_size, w, s, b, out) },
                #[cfg(target_arch = "x86_64")]
                (SimdLevel::Avx2Fma | SimdLevel::Avx512 | SimdLevel::Avx512Bf16, 8) => unsafe { avx2::affine_row::<E, 8>(group_size, w, s, b, out) },
                _ => unreachable!("bits validated at construction"),
            }
        }),
        MatData::Ggml { ty, data } => {
            let rb = ty.row_bytes(cols).expect("validated at construction");
            // check_level ran above.
            ggml::dequantize_checked_level(level, ty, &data[row * rb..(row + 1) * rb], out)
                .expect("validated at construction");
        }
    }
}
