//! Decode GEMV on the GPU: `y = W·x` for MLX affine (2/4/8-bit codes, bf16 scales and biases,
//! groups of 32/64/128), bf16 and f32 matrices; x and y are f32, accumulation is f32.
//! The kernels are in `kernels/gemv.cu`; this file uploads matrices and launches them.

use super::context::{CudaDevice, CudaError, DevBuf, Result};
use super::kernels;
use cudarc::driver::CudaFunction;
use cudarc::driver::sys::CUfunction_attribute;
use flashmoe_kernels::ggml::GgmlType;
use flashmoe_kernels::{FloatType, MatData, MatRef};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Threads per block of the GEMV kernels (matches `__launch_bounds__(128)`).
const BLOCK: u32 = 128;

/// Largest x copy staged in shared memory (the default per-block limit, no opt-in needed).
const MAX_X_SMEM: usize = 48 << 10;

/// Storage format of a device matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevFormat {
    /// MLX affine: codes of `bits` bits, bf16 scale and bias per `group_size` inputs.
    Affine {
        bits: u32,
        group_size: usize,
    },
    Bf16,
    F32,
    /// A GGML block type of a GGUF file (one of [`GGML_GPU_TYPES`]), rows of whole blocks.
    Ggml(GgmlType),
}

/// Rows per warp of the GGML GEMV kernels by default (the expert GEMV's `GGML_RW` in ggml.cu).
const GGML_ROWS_PER_WARP: usize = 2;

/// The GGML block types the GPU kernels take (`kernels/ggml.cu`); F32, BF16 and F16 GGUF tensors
/// become [`DevFormat::F32`] / [`DevFormat::Bf16`] matrices instead.
pub const GGML_GPU_TYPES: [GgmlType; 12] = {
    use GgmlType::*;
    [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS]
};

impl DevFormat {
    pub fn name(&self) -> String {
        match self {
            DevFormat::Affine { bits, group_size } => format!("q{bits}g{group_size}"),
            DevFormat::Bf16 => "bf16".into(),
            DevFormat::F32 => "f32".into(),
            DevFormat::Ggml(ty) => ty.to_string(),
        }
    }

    /// Bytes of one row of `cols` values.
    pub fn row_bytes(&self, cols: usize) -> usize {
        match *self {
            DevFormat::Affine { bits, group_size } => cols * bits as usize / 8 + 4 * (cols / group_size),
            DevFormat::Bf16 => cols * 2,
            DevFormat::F32 => cols * 4,
            DevFormat::Ggml(ty) => ty.row_bytes(cols).unwrap_or(0),
        }
    }

    /// Checks that the GPU kernels take a `[rows, cols]` matrix of this format: rows must be
    /// whole 16-byte chunks (so every row starts 16-byte aligned).
    pub fn check(&self, rows: usize, cols: usize) -> Result<()> {
        if rows > i32::MAX as usize || cols > i32::MAX as usize {
            return Err(CudaError(format!("matrix [{rows}, {cols}] too large for the GEMV kernels")));
        }
        let (unit, what) = match *self {
            DevFormat::Affine { bits, group_size } => {
                if !matches!(bits, 2 | 4 | 8) || !matches!(group_size, 32 | 64 | 128) {
                    return Err(CudaError(format!(
                        "GPU affine GEMV takes 2/4/8 bits and groups of 32/64/128, not {bits} bits / {group_size}"
                    )));
                }
                if !cols.is_multiple_of(group_size) {
                    return Err(CudaError(format!("cols {cols} is not a multiple of group size {group_size}")));
                }
                (128 / bits as usize, "codes")
            }
            DevFormat::Bf16 => (8, "bf16 values"),
            DevFormat::F32 => (4, "f32 values"),
            DevFormat::Ggml(ty) => {
                if !GGML_GPU_TYPES.contains(&ty) {
                    return Err(CudaError(format!("{ty} weights (GGUF) have no GPU kernels")));
                }
                // Whole blocks per row (every block type holds 32 or 256 values).
                (ty.block_size(), "values (whole blocks)")
            }
        };
        if !cols.is_multiple_of(unit) {
            return Err(CudaError(format!(
                "GPU {} GEMV needs cols to be a multiple of {unit} (16 bytes of {what}), got {cols}",
                self.name()
            )));
        }
        Ok(())
    }
}

/// The float matrix a GGUF F32/BF16/F16 tensor is (None for block types).
pub(crate) fn float_of_ggml(ty: GgmlType, data: &[u8]) -> Option<MatData<'_>> {
    let dtype = match ty {
        GgmlType::F32 => FloatType::F32,
        GgmlType::BF16 => FloatType::BF16,
        GgmlType::F16 => FloatType::F16,
        _ => return None,
    };
    Some(MatData::Float { dtype, data })
}

/// A matrix in device memory.
pub struct DevMatrix {
    pub format: DevFormat,
    pub rows: usize,
    pub cols: usize,
    pub w: DevBuf,
    /// Affine only: `[rows, cols / group_size]` bf16.
    pub scales: Option<DevBuf>,
    pub biases: Option<DevBuf>,
}

impl DevMatrix {
    /// Copies a host matrix to the device. Affine scales/biases must be bf16 (as in MLX
    /// checkpoints); float weights f32 or bf16.
    pub fn upload(dev: &CudaDevice, m: &MatRef) -> Result<Self> {
        match m.data {
            MatData::Affine { bits, group_size, weight, scales, biases, sb_dtype } => {
                if sb_dtype != FloatType::BF16 {
                    return Err(CudaError(format!("GPU affine GEMV takes bf16 scales/biases, not {sb_dtype:?}")));
                }
                let format = DevFormat::Affine { bits, group_size };
                format.check(m.rows, m.cols)?;
                Ok(DevMatrix {
                    format,
                    rows: m.rows,
                    cols: m.cols,
                    w: dev.upload(weight)?,
                    scales: Some(dev.upload(scales)?),
                    biases: Some(dev.upload(biases)?),
                })
            }
            MatData::Float { dtype, data } => {
                let format = match dtype {
                    FloatType::F32 => DevFormat::F32,
                    FloatType::BF16 => DevFormat::Bf16,
                    FloatType::F16 => return Err(CudaError::new("GPU GEMV does not take f16 weights")),
                };
                format.check(m.rows, m.cols)?;
                Ok(DevMatrix { format, rows: m.rows, cols: m.cols, w: dev.upload(data)?, scales: None, biases: None })
            }
            MatData::Ggml { ty, data } => match float_of_ggml(ty, data) {
                Some(float) => Self::upload(dev, &MatRef { data: float, ..*m }),
                None => {
                    let format = DevFormat::Ggml(ty);
                    format.check(m.rows, m.cols)?;
                    Ok(DevMatrix {
                        format,
                        rows: m.rows,
                        cols: m.cols,
                        w: dev.upload(data)?,
                        scales: None,
                        biases: None,
                    })
                }
            },
        }
    }

    /// A matrix of random contents made on the device (benchmarks): random codes, bf16 scales,
    /// biases and weights in [-1, 1).
    pub fn random(
        dev: &CudaDevice,
        k: &GemvKernels,
        format: DevFormat,
        rows: usize,
        cols: usize,
        seed: u32,
    ) -> Result<Self> {
        format.check(rows, cols)?;
        match format {
            DevFormat::Affine { bits, group_size } => {
                let w = dev.alloc(rows * cols * bits as usize / 8)?;
                let sb = rows * (cols / group_size) * 2;
                let (s, b) = (dev.alloc(sb)?, dev.alloc(sb)?);
                k.fill_u32(dev, &w, seed)?;
                k.fill_bf16(dev, &s, seed ^ 0x5bd1_e995)?;
                k.fill_bf16(dev, &b, seed ^ 0x2718_2818)?;
                Ok(DevMatrix { format, rows, cols, w, scales: Some(s), biases: Some(b) })
            }
            DevFormat::Bf16 => {
                let w = dev.alloc(rows * cols * 2)?;
                k.fill_bf16(dev, &w, seed)?;
                Ok(DevMatrix { format, rows, cols, w, scales: None, biases: None })
            }
            DevFormat::F32 => {
                let w = dev.alloc(rows * cols * 4)?;
                k.fill_f32(dev, &w, seed)?;
                Ok(DevMatrix { format, rows, cols, w, scales: None, biases: None })
            }
            DevFormat::Ggml(ty) => {
                // Random bytes (benchmarks only: f16 scales may be infinities or NaNs, which
                // cost the kernels nothing extra).
                let bytes = rows * ty.row_bytes(cols).map_err(|e| CudaError(e.to_string()))?;
                let w = dev.alloc(bytes.next_multiple_of(4))?;
                k.fill_u32(dev, &w, seed)?;
                Ok(DevMatrix { format, rows, cols, w, scales: None, biases: None })
            }
        }
    }

    /// Raw-pointer view of the matrix (for launches).
    pub fn view(&self) -> MatView {
        MatView {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            w: self.w.ptr(),
            s: self.scales.as_ref().map_or(0, |b| b.ptr()),
            b: self.biases.as_ref().map_or(0, |b| b.ptr()),
        }
    }

    /// Bytes one GEMV reads from the matrix: weights + scales + biases.
    pub fn bytes(&self) -> usize {
        self.w.len() + self.scales.as_ref().map_or(0, |b| b.len()) + self.biases.as_ref().map_or(0, |b| b.len())
    }
}

/// A matrix by device address: a [`DevMatrix`], or one matrix of an expert in a GPU cache slot.
#[derive(Clone, Copy, Debug)]
pub struct MatView {
    pub format: DevFormat,
    pub rows: usize,
    pub cols: usize,
    pub w: u64,
    /// Affine only (0 otherwise).
    pub s: u64,
    pub b: u64,
}

impl MatView {
    pub fn bytes(&self) -> usize {
        self.rows * self.format.row_bytes(self.cols)
    }
}

/// One problem of a batched GEMV launch (layout shared with `GemvProblem` in gemv.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GemvProblem {
    w: u64,
    s: u64,
    b: u64,
    x: u64,
    y: u64,
    rows: i32,
    cols: i32,
    /// x is [gate (cols); up (cols)] and the input is silu(gate)·up (SwiGLU fused into staging).
    swiglu: i32,
}

/// The two kernel families that take a batch of problems by value.
#[derive(Clone, Copy)]
enum BatchFamily {
    /// `GemvBatch`: pointers built on the host.
    Problems,
    /// `ExpertsArgs`: routed experts found through the GPU's slot table.
    Experts,
}

/// Problems per batched launch (`MAXP` in gemv.cu).
pub const MAX_BATCH: usize = 24;

#[repr(C)]
#[derive(Clone, Copy)]
struct GemvBatch {
    p: [GemvProblem; MAX_BATCH],
}

/// Byte offsets of one matrix inside an expert slot (`MatOff` in gemv.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MatOff {
    pub w: u64,
    pub s: u64,
    pub b: u64,
    pub rows: i32,
    pub cols: i32,
}

/// A matrix inside an expert slot: format, shape and byte offsets of weights, scales, biases.
#[derive(Clone, Copy, Debug)]
pub struct MatOffsets {
    pub format: DevFormat,
    pub rows: usize,
    pub cols: usize,
    pub w: u64,
    pub s: u64,
    pub b: u64,
}

/// Arguments of the device-resolved expert GEMV (`ExpertsArgs` in gemv.cu): routed expert j's
/// slot is `table[ids[j]]` (0: not on the GPU, skipped), the shared expert is problem k.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExpertsArgs {
    pub ids: u64,
    pub table: u64,
    pub x: u64,
    pub y: u64,
    pub x_stride: i64,
    pub y_stride: i64,
    pub mat: [MatOff; 2],
    pub shared: [GemvProblem; 2],
    pub k: i32,
    pub nmat: i32,
    pub swiglu: i32,
}

/// Gate/up rows per warp the fused expert kernel is built for (down: twice as many).
pub const FUSED_ROWS_PER_WARP: [usize; 2] = [2, 4];
const DEFAULT_FUSED_ROWS: usize = 2;

/// u32 words of the fused expert kernel's counters: ticket, blocks finished, one per expert.
const FUSED_SYNC_WORDS: usize = 64;

/// Arguments of the one-launch expert MLP (`FusedExpertsArgs` in gemv.cu): gate and up of the k
/// routed experts (slot `table[ids[j]]`, 0: not on the GPU) and of the shared one (`shared`, with
/// its x and y set), then their down projections. Routed expert j writes [gate; up] at
/// `gu + j·gu_stride` floats and its output at `ys + j·ys_stride`. `sync` is filled in by
/// [`GemvKernels::experts_fused`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FusedExpertsArgs {
    pub ids: u64,
    pub table: u64,
    pub x: u64,
    pub gu: u64,
    pub ys: u64,
    pub gu_stride: i64,
    pub ys_stride: i64,
    pub mat: [MatOff; 3],
    pub shared: [GemvProblem; 3],
    pub sync: u64,
    pub k: i32,
}

impl GemvProblem {
    /// `y = m·x` (or of silu(gate)·up when `swiglu`) as a batch problem.
    pub fn new(m: &MatView, x: u64, y: u64, swiglu: bool) -> Self {
        GemvProblem { w: m.w, s: m.s, b: m.b, x, y, rows: m.rows as i32, cols: m.cols as i32, swiglu: swiglu as i32 }
    }

    /// The problem a batch item describes.
    pub fn of(it: &BatchItem) -> Self {
        Self::new(&it.m, it.x, it.y, it.swiglu)
    }
}

/// A GEMV of a batch: `y = m·x`, or `y = m·(silu(g)⊙u)` with x = [g; u] when `swiglu`.
#[derive(Clone, Copy, Debug)]
pub struct BatchItem {
    pub m: MatView,
    pub x: u64,
    pub y: u64,
    pub swiglu: bool,
}

/// Inner-loop family of the affine kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AffineVariant {
    /// One LOP3 + FADD + FFMA per code (every bit width).
    Fadd,
    /// 4 bits only: codes shifted to bits 15..22, one LOP3 + FFMA per code plus 4 shifts per 8
    /// codes; the float offset is removed once per segment.
    Shift,
    /// 4 bits only: [`Self::Fadd`] math, next step's loads issued before the current step's math.
    Prefetch,
    /// 4 bits only: [`Self::Shift`] math with [`Self::Prefetch`] loads.
    ShiftPrefetch,
}

/// Every variant, in the order the benchmarks and self-test show them.
pub const AFFINE_VARIANTS: [AffineVariant; 4] =
    [AffineVariant::Fadd, AffineVariant::Shift, AffineVariant::Prefetch, AffineVariant::ShiftPrefetch];

impl AffineVariant {
    /// Suffix in kernel names shown by the benchmarks and self-test ("" or "s").
    pub fn suffix(self) -> &'static str {
        match self {
            AffineVariant::Fadd => "",
            AffineVariant::Shift => "s",
            AffineVariant::Prefetch => "p",
            AffineVariant::ShiftPrefetch => "sp",
        }
    }

    /// Whether this variant has kernels for `format`.
    pub fn applies(self, format: DevFormat) -> bool {
        match self {
            AffineVariant::Fadd => true,
            _ => matches!(format, DevFormat::Affine { bits: 4, .. }),
        }
    }

    /// The variant used when the caller does not choose (see docs/performance.md, "CUDA GEMV").
    pub fn default_for(format: DevFormat) -> Self {
        if DEFAULT_4BIT.applies(format) { DEFAULT_4BIT } else { AffineVariant::Fadd }
    }
}

/// The variant 4-bit matrices use by default.
const DEFAULT_4BIT: AffineVariant = AffineVariant::Fadd;

/// (kernel handle, dynamic shared-memory bytes, block size) of a persistent-grid launch.
type OccupancyKey = (usize, usize, u32);

/// Threads per block of the single-matrix affine GEMV: 128, or 256 with FLASHMOE_GEMV_BLOCK=256
/// (an experiment knob: a bigger block stages x once for twice the rows).
fn gemv_block() -> u32 {
    static B: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *B.get_or_init(|| match std::env::var("FLASHMOE_GEMV_BLOCK").as_deref() {
        Ok("256") => 256,
        _ => BLOCK,
    })
}

/// The kernels of one GGML block type (`kernels/ggml.cu`).
struct GgmlKernels {
    /// Batched GEMV (`GemvBatch`), also used for a single GEMV, with 1, 2 and 4 rows per warp
    /// ([`ROWS_PER_WARP`] order).
    batch: [CudaFunction; 3],
    /// Device-resolved expert GEMV (`ExpertsArgs`).
    experts: CudaFunction,
    /// Grouped prefill GEMM (the arguments of forward.cu's `gemm_grouped_*`).
    grouped: CudaFunction,
    /// Rows (or looked-up rows) as f32.
    rows: CudaFunction,
}

/// Most pairs (token, expert) of one work item of the tensor-core grouped GEMM (4 n-tiles of 8).
pub const TC_PAIRS: usize = 32;
/// The smallest group [`GemvKernels::tc_sum_group`] returns (Q2_K's sub-blocks): a [`TcInput`]'s
/// sums take `rows · cols / TC_MIN_SUM_GROUP` floats at most.
pub const TC_MIN_SUM_GROUP: usize = 16;

/// The input of a tensor-core GEMM split by [`GemvKernels::split_for_tc`]: `xh`, `xl` [rows,
/// cols] f32 (TF32 hi and lo parts) and, for affine weights taken as exact codes, `xsum`
/// [rows, cols / group] (Σ x per group).
#[derive(Clone, Copy, Debug)]
pub struct TcInput {
    pub xh: u64,
    pub xl: u64,
    pub xsum: u64,
}

impl TcInput {
    /// The same arrays from row `r` on.
    pub fn from_row(&self, r: usize, cols: usize, sum_group: usize) -> TcInput {
        TcInput {
            xh: self.xh + (r * cols * 4) as u64,
            xl: self.xl + (r * cols * 4) as u64,
            xsum: self.xsum + cols.checked_div(sum_group).map_or(0, |groups| (r * groups * 4) as u64),
        }
    }
}

/// The loaded GEMV module.
pub struct GemvKernels {
    /// GGML block types, by type.
    ggml: HashMap<GgmlType, GgmlKernels>,
    /// (bits, group, rows per warp) → (x in shared memory, x in global memory) kernels.
    affine: HashMap<(u32, usize, usize), (CudaFunction, CudaFunction)>,
    /// 4-bit kernels of the other variants by (variant, group, rows per warp).
    affine_v4: HashMap<(AffineVariant, usize, usize), (CudaFunction, CudaFunction)>,
    /// Resident blocks per SM of a shared-x kernel, by (kernel, smem bytes, block size).
    occupancy: Mutex<HashMap<OccupancyKey, u32>>,
    f32: CudaFunction,
    bf16: CudaFunction,
    /// Batched affine kernels by (bits, group, rows per warp); dense by f32/bf16.
    batch_affine: HashMap<(u32, usize, usize), CudaFunction>,
    batch_f32: CudaFunction,
    batch_bf16: CudaFunction,
    experts_affine: HashMap<(u32, usize, usize), CudaFunction>,
    /// One-launch expert MLP (`affine_experts_fused_b4_*`, 4-bit) by (group, gate/up rows per
    /// warp, lanes per down row).
    experts_fused: HashMap<(usize, usize, usize), CudaFunction>,
    /// Gate/up rows per warp of the fused kernel (one of [`FUSED_ROWS_PER_WARP`]).
    fused_rows: std::sync::atomic::AtomicUsize,
    /// Its ticket and per-expert counters (zero between launches: the last block resets them).
    fused_sync: DevBuf,
    experts_f32: CudaFunction,
    experts_bf16: CudaFunction,
    table_set: CudaFunction,
    grouped_affine: HashMap<u32, CudaFunction>,
    grouped_f32: CudaFunction,
    grouped_bf16: CudaFunction,
    /// The same with x staged in shared memory, by bits (0 = f32, 16 = bf16).
    grouped_sx: HashMap<u32, CudaFunction>,
    /// The same on tensor cores (TF32 operands split into hi + lo, f32-grade), by bits (0 = f32,
    /// 16 = bf16); empty before sm_80. Affine ones take the codes exactly (groups a multiple of a
    /// 4-word chunk, dividing 128).
    grouped_tc: HashMap<u32, CudaFunction>,
    /// Affine on tensor cores with the weights dequantized and split (other groups).
    grouped_tc_deq: HashMap<u32, CudaFunction>,
    /// GGML blocks on tensor cores, codes taken exactly (Q4_K, Q5_K, Q6_K: the expert matrices
    /// of Q4_K_M and Q5_K_M files; Q2_K, Q3_K of the 2- and 3-bit mixes; Q4_0, Q8_0, IQ4_NL,
    /// IQ4_XS); empty before sm_80.
    grouped_tc_ggml: HashMap<GgmlType, CudaFunction>,
    /// The tensor-core GEMM's input split (forward.cu's `split_x_tc`); None before sm_80.
    split_x_tc: Option<CudaFunction>,
    /// Largest dynamic shared memory a block may opt in to.
    smem_optin: usize,
    read_stream: CudaFunction,
    fill_u32: CudaFunction,
    fill_bf16: CudaFunction,
    fill_f32: CudaFunction,
}

/// Rows per warp the affine kernels are built for.
pub const ROWS_PER_WARP: [usize; 3] = [1, 2, 4];

impl GemvKernels {
    /// Compiles (or reads from the cache) and loads the GEMV kernels.
    pub fn load(dev: &CudaDevice) -> Result<Self> {
        let m = dev.module(kernels::GEMV)?;
        let mut affine = HashMap::new();
        for bits in [2u32, 4, 8] {
            for gs in [32usize, 64, 128] {
                for rw in ROWS_PER_WARP {
                    let sx = dev.function(&m, &format!("affine_gemv_b{bits}_g{gs}_r{rw}"))?;
                    let gx = dev.function(&m, &format!("affine_gemv_gx_b{bits}_g{gs}_r{rw}"))?;
                    affine.insert((bits, gs, rw), (sx, gx));
                }
            }
        }
        let mut affine_v4 = HashMap::new();
        for v in AFFINE_VARIANTS.into_iter().filter(|&v| v != AffineVariant::Fadd) {
            let n = v.suffix();
            for gs in [32usize, 64, 128] {
                for rw in ROWS_PER_WARP {
                    let sx = dev.function(&m, &format!("affine_gemv_{n}_b4_g{gs}_r{rw}"))?;
                    let gx = dev.function(&m, &format!("affine_gemv_{n}_gx_b4_g{gs}_r{rw}"))?;
                    affine_v4.insert((v, gs, rw), (sx, gx));
                }
            }
        }
        let mut batch_affine = HashMap::new();
        let mut experts_affine = HashMap::new();
        for bits in [2u32, 4, 8] {
            for gs in [32usize, 64, 128] {
                for rw in [1usize, 2] {
                    batch_affine
                        .insert((bits, gs, rw), dev.function(&m, &format!("affine_gemv_batch_b{bits}_g{gs}_r{rw}"))?);
                    experts_affine
                        .insert((bits, gs, rw), dev.function(&m, &format!("affine_gemv_experts_b{bits}_g{gs}_r{rw}"))?);
                }
            }
        }
        let mut experts_fused = HashMap::new();
        for gs in [32usize, 64, 128] {
            for rw in FUSED_ROWS_PER_WARP {
                for sub in [8usize, 16, 32] {
                    experts_fused.insert(
                        (gs, rw, sub),
                        dev.function(&m, &format!("affine_experts_fused_b4_g{gs}_r{rw}_s{sub}"))?,
                    );
                }
            }
        }
        // (Zeroed in stream order: a synchronous copy here could meet another stage's capture.)
        let fused_sync = dev.alloc(FUSED_SYNC_WORDS * 4)?;
        fused_sync.fill_bytes(0)?;
        let fw = dev.module(kernels::FORWARD)?;
        let mut grouped_affine = HashMap::new();
        for bits in [2u32, 4, 8] {
            grouped_affine.insert(bits, dev.function(&fw, &format!("gemm_grouped_affine_b{bits}"))?);
        }
        let smem_optin = dev
            .ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| CudaError(format!("shared memory limit: {e:?}")))?
            .max(48 << 10) as usize;
        let gm = dev.module(kernels::GGML)?;
        let mut ggml = HashMap::new();
        for ty in GGML_GPU_TYPES {
            let n = ty.to_string().to_ascii_lowercase();
            let f = |kind: &str| dev.function(&gm, &format!("ggml_{kind}_{n}"));
            let batch = [f("batch_r1")?, f("batch_r2")?, f("batch_r4")?];
            ggml.insert(ty, GgmlKernels { batch, experts: f("experts")?, grouped: f("grouped")?, rows: f("rows")? });
        }
        let mut grouped_sx = HashMap::new();
        for (key, name) in [
            (2u32, "gemm_grouped_sx_affine_b2"),
            (4, "gemm_grouped_sx_affine_b4"),
            (8, "gemm_grouped_sx_affine_b8"),
            (0, "gemm_grouped_sx_f32"),
            (16, "gemm_grouped_sx_bf16"),
        ] {
            let f = dev.function(&fw, name)?;
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_optin as i32)
                .map_err(|e| CudaError(format!("{name}: shared memory opt-in: {e:?}")))?;
            grouped_sx.insert(key, f);
        }
        // Tensor-core kernels exist from sm_80 on (forward.cu compiles them only there).
        let mut grouped_tc = HashMap::new();
        let mut grouped_tc_deq = HashMap::new();
        let mut grouped_tc_ggml = HashMap::new();
        if dev.cc.0 >= 8 {
            for (ty, name) in [
                (GgmlType::Q4_K, "gemm_grouped_tc_q4_k"),
                (GgmlType::Q5_K, "gemm_grouped_tc_q5_k"),
                (GgmlType::Q6_K, "gemm_grouped_tc_q6_k"),
                (GgmlType::Q4_0, "gemm_grouped_tc_q4_0"),
                (GgmlType::Q8_0, "gemm_grouped_tc_q8_0"),
                (GgmlType::IQ4_NL, "gemm_grouped_tc_iq4_nl"),
                (GgmlType::IQ4_XS, "gemm_grouped_tc_iq4_xs"),
                (GgmlType::Q3_K, "gemm_grouped_tc_q3_k"),
                (GgmlType::Q2_K, "gemm_grouped_tc_q2_k"),
            ] {
                grouped_tc_ggml.insert(ty, dev.function(&fw, name)?);
            }
            for bits in [2u32, 4, 8] {
                grouped_tc_deq.insert(bits, dev.function(&fw, &format!("gemm_grouped_tc_deq_affine_b{bits}"))?);
            }
            for (key, name) in [
                (2u32, "gemm_grouped_tc_affine_b2"),
                (4, "gemm_grouped_tc_affine_b4"),
                (8, "gemm_grouped_tc_affine_b8"),
                (0, "gemm_grouped_tc_f32"),
                (16, "gemm_grouped_tc_bf16"),
            ] {
                grouped_tc.insert(key, dev.function(&fw, name)?);
            }
        }
        let split_x_tc = if dev.cc.0 >= 8 { Some(dev.function(&fw, "split_x_tc")?) } else { None };
        Ok(GemvKernels {
            ggml,
            grouped_tc,
            grouped_tc_deq,
            grouped_tc_ggml,
            split_x_tc,
            batch_affine,
            batch_f32: dev.function(&m, "dense_gemv_batch_f32")?,
            batch_bf16: dev.function(&m, "dense_gemv_batch_bf16")?,
            experts_affine,
            experts_fused,
            fused_rows: std::sync::atomic::AtomicUsize::new(
                std::env::var("FLASHMOE_FUSED_ROWS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .filter(|r| FUSED_ROWS_PER_WARP.contains(r))
                    .unwrap_or(DEFAULT_FUSED_ROWS),
            ),
            fused_sync,
            experts_f32: dev.function(&m, "dense_gemv_experts_f32")?,
            experts_bf16: dev.function(&m, "dense_gemv_experts_bf16")?,
            table_set: dev.function(&m, "table_set")?,
            grouped_affine,
            grouped_sx,
            smem_optin,
            grouped_f32: dev.function(&fw, "gemm_grouped_f32")?,
            grouped_bf16: dev.function(&fw, "gemm_grouped_bf16")?,
            affine,
            affine_v4,
            occupancy: Mutex::new(HashMap::new()),
            f32: dev.function(&m, "dense_gemv_f32")?,
            bf16: dev.function(&m, "dense_gemv_bf16")?,
            read_stream: dev.function(&m, "read_stream")?,
            fill_u32: dev.function(&m, "fill_random_u32")?,
            fill_bf16: dev.function(&m, "fill_random_bf16")?,
            fill_f32: dev.function(&m, "fill_random_f32")?,
        })
    }

    /// Rows per warp used when the caller does not choose. Measured on an H100 (docs/performance.md,
    /// "CUDA GEMV"): with x in shared memory, 2 rows per warp is best or within 4% of best at every
    /// 397B shape and bit width while that still gives ≥ 8 warps per SM; below that, 1 (more warps).
    pub fn default_rows_per_warp(dev: &CudaDevice, rows: usize) -> usize {
        if rows / 2 >= dev.sm_count * 8 { 2 } else { 1 }
    }

    /// Registers per thread and local (spilled) bytes of the kernel for `format`.
    pub fn resources(
        &self,
        format: DevFormat,
        rw: usize,
        x_global: bool,
        variant: AffineVariant,
    ) -> Result<(i32, i32)> {
        let f = self.func(format, rw, x_global, variant)?;
        let regs = f
            .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS)
            .map_err(|e| CudaError(format!("{e:?}")))?;
        let local = f
            .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)
            .map_err(|e| CudaError(format!("{e:?}")))?;
        Ok((regs, local))
    }

    fn func(&self, format: DevFormat, rw: usize, x_global: bool, variant: AffineVariant) -> Result<&CudaFunction> {
        match format {
            DevFormat::Affine { bits: 4, group_size } if variant != AffineVariant::Fadd => self
                .affine_v4
                .get(&(variant, group_size, rw))
                .map(|(sx, gx)| if x_global { gx } else { sx })
                .ok_or_else(|| {
                    CudaError(format!("no 4-bit {variant:?} kernel for group {group_size}, {rw} rows/warp"))
                }),
            _ if variant != AffineVariant::Fadd => {
                Err(CudaError(format!("no {variant:?} kernel for {}", format.name())))
            }
            DevFormat::Affine { bits, group_size } => {
                self.affine.get(&(bits, group_size, rw)).map(|(sx, gx)| if x_global { gx } else { sx }).ok_or_else(
                    || CudaError(format!("no affine kernel for {bits} bits, group {group_size}, {rw} rows/warp")),
                )
            }
            DevFormat::Bf16 => Ok(&self.bf16),
            DevFormat::F32 => Ok(&self.f32),
            DevFormat::Ggml(ty) => {
                let i = ROWS_PER_WARP
                    .iter()
                    .position(|&r| r == rw)
                    .ok_or_else(|| CudaError(format!("no {ty} GEMV with {rw} rows per warp")))?;
                Ok(&self.ggml_kernels(ty)?.batch[i])
            }
        }
    }

    fn ggml_kernels(&self, ty: GgmlType) -> Result<&GgmlKernels> {
        self.ggml.get(&ty).ok_or_else(|| CudaError(format!("{ty} weights (GGUF) have no GPU kernels")))
    }

    /// `out[i] = row (ids[i] when ids is not 0, else row0 + i)` of a GGML matrix as f32, for
    /// `nrows` rows of `cols` values: the embedding lookup and the cuBLAS prefill's tiles.
    #[allow(clippy::too_many_arguments)]
    pub fn ggml_rows(
        &self,
        dev: &CudaDevice,
        ty: GgmlType,
        w: u64,
        ids: u64,
        row0: usize,
        nrows: usize,
        cols: usize,
        out: u64,
    ) -> Result<()> {
        if nrows == 0 {
            return Ok(());
        }
        let f = &self.ggml_kernels(ty)?.rows;
        // One thread per four values (ggml.cu's `ggml_rows`), grid-stride beyond the cap.
        let threads = nrows * (cols / 4);
        let grid = u32::try_from(threads.div_ceil(256).min(dev.sm_count * 32)).unwrap_or(u32::MAX);
        let (mut w, mut ids, mut row0, mut nrows, mut cols, mut out) =
            (w, ids, row0 as i64, nrows as i64, cols as i32, out);
        let mut args: [*mut c_void; 6] = [
            (&mut w as *mut u64).cast(),
            (&mut ids as *mut u64).cast(),
            (&mut row0 as *mut i64).cast(),
            (&mut nrows as *mut i64).cast(),
            (&mut cols as *mut i32).cast(),
            (&mut out as *mut u64).cast(),
        ];
        // SAFETY: arguments match ggml_rows_* (w, ids, row0, nrows, cols, out); the caller sizes out
        // for nrows·cols f32 and keeps the rows inside the matrix.
        unsafe { dev.launch(f, grid, 256, 0, &mut args) }
    }

    /// Enqueues `y = m·x` on the device's stream. `x` holds `cols` f32, `y` `rows` f32.
    /// `rows_per_warp` (affine only: 1, 2 or 4) defaults to [`Self::default_rows_per_warp`].
    pub fn gemv(
        &self,
        dev: &CudaDevice,
        m: &DevMatrix,
        x: &DevBuf,
        y: &DevBuf,
        rows_per_warp: Option<usize>,
    ) -> Result<()> {
        self.gemv_with(dev, m, x, y, rows_per_warp, false)
    }

    /// Shared-memory bytes the shared-x affine kernel needs for `cols` inputs of `bits` bits
    /// (x padded by 16 bytes per 16-byte chunk of codes).
    pub fn x_smem_bytes(bits: u32, cols: usize) -> usize {
        let vpc = 128 / bits as usize;
        cols / vpc * (vpc + 4) * 4
    }

    /// [`Self::gemv`], optionally forcing the affine kernel that reads x from global memory (it is
    /// used anyway when x does not fit in 48 KiB of shared memory).
    pub fn gemv_with(
        &self,
        dev: &CudaDevice,
        m: &DevMatrix,
        x: &DevBuf,
        y: &DevBuf,
        rows_per_warp: Option<usize>,
        x_global: bool,
    ) -> Result<()> {
        self.gemv_variant(dev, m, x, y, rows_per_warp, x_global, AffineVariant::default_for(m.format))
    }

    /// [`Self::gemv_with`] with the affine kernel family chosen by the caller (it must
    /// [apply](AffineVariant::applies) to the matrix's format).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_variant(
        &self,
        dev: &CudaDevice,
        m: &DevMatrix,
        x: &DevBuf,
        y: &DevBuf,
        rows_per_warp: Option<usize>,
        x_global: bool,
        variant: AffineVariant,
    ) -> Result<()> {
        if x.len() < m.cols * 4 || y.len() < m.rows * 4 {
            return Err(CudaError(format!(
                "gemv [{}, {}]: x has {} bytes, y {} (need {} and {})",
                m.rows,
                m.cols,
                x.len(),
                y.len(),
                m.cols * 4,
                m.rows * 4
            )));
        }
        self.gemv_raw(dev, &m.view(), x.ptr(), y.ptr(), rows_per_warp, x_global, variant)
    }

    /// `y = m·x` on device addresses: x must hold `cols` f32 and y `rows` f32 (not checked).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_raw(
        &self,
        dev: &CudaDevice,
        m: &MatView,
        x: u64,
        y: u64,
        rows_per_warp: Option<usize>,
        x_global: bool,
        variant: AffineVariant,
    ) -> Result<()> {
        if m.rows == 0 {
            return Ok(());
        }
        if let DevFormat::Ggml(_) = m.format {
            // One problem of the batched kernel with the chosen rows per warp.
            let rw = rows_per_warp.unwrap_or(GGML_ROWS_PER_WARP);
            let f = self.func(m.format, rw, true, variant)?;
            let mut batch = GemvBatch { p: [GemvProblem::default(); MAX_BATCH] };
            batch.p[0] = GemvProblem::new(m, x, y, false);
            let grid = m.rows.div_ceil((BLOCK as usize / 32) * rw).min(dev.sm_count * 16);
            let mut args: [*mut c_void; 1] = [(&mut batch as *mut GemvBatch).cast()];
            // SAFETY: the kernel takes one GemvBatch by value (same repr(C) layout); problem 0
            // is this GEMV, whose sizes the caller checked.
            return unsafe { dev.launch(f, grid as u32, BLOCK, 0, &mut args) };
        }
        let (rw, smem, x_global) = match m.format {
            DevFormat::Affine { bits, .. } => {
                let smem = Self::x_smem_bytes(bits, m.cols);
                let rw = rows_per_warp.unwrap_or_else(|| Self::default_rows_per_warp(dev, m.rows));
                let xg = x_global || smem > MAX_X_SMEM;
                (rw, if xg { 0 } else { smem }, xg)
            }
            _ => (1, 0, true),
        };
        let f = self.func(m.format, rw, x_global, variant)?;
        let warps = m.rows.div_ceil(rw);
        let block = if matches!(m.format, DevFormat::Affine { .. }) { gemv_block() } else { BLOCK };
        let mut grid = (warps * 32).div_ceil(block as usize);
        if matches!(m.format, DevFormat::Affine { .. }) && !x_global {
            // Persistent grid: x is staged once per block, so launch only what stays resident.
            let per_sm = self.occupancy_of(f, smem, block)?;
            grid = grid.min(dev.sm_count * per_sm as usize);
        }
        let grid = u32::try_from(grid).map_err(|_| CudaError::new("gemv grid too large"))?;
        let smem = smem as u32;
        let (mut pw, mut px, mut py) = (m.w, x, y);
        let (mut rows, mut cols) = (m.rows as i32, m.cols as i32);
        match m.format {
            DevFormat::Affine { .. } => {
                let (mut ps, mut pb) = (m.s, m.b);
                let mut args: [*mut c_void; 7] = [
                    (&mut pw as *mut u64).cast(),
                    (&mut ps as *mut u64).cast(),
                    (&mut pb as *mut u64).cast(),
                    (&mut px as *mut u64).cast(),
                    (&mut py as *mut u64).cast(),
                    (&mut rows as *mut i32).cast(),
                    (&mut cols as *mut i32).cast(),
                ];
                // SAFETY: arguments match affine_gemv_*: (w, scales, biases, x, y, rows, cols);
                // sizes were checked at upload and above.
                unsafe { dev.launch(f, grid, block, smem, &mut args) }
            }
            _ => {
                let mut args: [*mut c_void; 5] = [
                    (&mut pw as *mut u64).cast(),
                    (&mut px as *mut u64).cast(),
                    (&mut py as *mut u64).cast(),
                    (&mut rows as *mut i32).cast(),
                    (&mut cols as *mut i32).cast(),
                ];
                // SAFETY: arguments match dense_gemv_*: (w, x, y, rows, cols).
                unsafe { dev.launch(f, grid, BLOCK, 0, &mut args) }
            }
        }
    }

    /// Enqueues every GEMV of `items` in as few launches as the formats allow (one per format and
    /// per [`MAX_BATCH`] items). Sizes are not checked: x and y must hold what each matrix needs.
    pub fn gemv_batch(&self, dev: &CudaDevice, items: &[BatchItem]) -> Result<()> {
        let mut formats: Vec<DevFormat> = Vec::new();
        for it in items {
            if !formats.contains(&it.m.format) {
                formats.push(it.m.format);
            }
        }
        for f in formats {
            let group: Vec<&BatchItem> = items.iter().filter(|it| it.m.format == f).collect();
            for chunk in group.chunks(MAX_BATCH) {
                self.launch_batch(dev, f, chunk)?;
            }
        }
        Ok(())
    }

    /// Stream-ordered `table[i] = v` (the GPU's expert slot table).
    pub fn table_set(&self, dev: &CudaDevice, table: u64, i: usize, v: u64) -> Result<()> {
        let (mut p, mut i, mut v) = (table, i as i64, v);
        let mut args: [*mut c_void; 3] =
            [(&mut p as *mut u64).cast(), (&mut i as *mut i64).cast(), (&mut v as *mut u64).cast()];
        // SAFETY: (u64* table, long long index, u64 value); the caller keeps i inside the table.
        unsafe { dev.launch(&self.table_set, 1, 1, 0, &mut args) }
    }

    /// Launches the device-resolved expert GEMV over `k` routed experts and the shared one, for
    /// matrices of `format` (routed and shared must share it). `max_rows`/`max_cols` bound every
    /// problem's shape.
    pub fn experts(
        &self,
        dev: &CudaDevice,
        format: DevFormat,
        args: &ExpertsArgs,
        max_rows: usize,
        max_cols: usize,
    ) -> Result<()> {
        let np = ((args.k + 1) * args.nmat) as usize;
        let mut a = *args;
        let arg: *mut c_void = (&mut a as *mut ExpertsArgs).cast();
        // SAFETY: the kernel takes one ExpertsArgs by value (same repr(C) layout); the table holds
        // slot addresses (or 0) and the offsets stay inside a slot.
        unsafe { self.launch_problems(dev, BatchFamily::Experts, format, np, max_rows, max_cols, arg) }
    }

    /// The fused kernel for these shapes: (group, gate/up rows per warp, lanes per down row), or
    /// None when it does not take them. Gate/up inputs of at most 2048 values (2 chunks a lane):
    /// at 4096 (Qwen3.5-397B) the two batched launches measured faster (docs/performance.md).
    fn fused_shape(&self, format: DevFormat, up_cols: &[usize], down_cols: &[usize]) -> Option<(usize, usize, usize)> {
        let DevFormat::Affine { bits: 4, group_size } = format else { return None };
        // 32 codes per 16-byte chunk; every row whole chunks.
        if up_cols.iter().chain(down_cols).any(|&c| c == 0 || c % 32 != 0) {
            return None;
        }
        let up = up_cols.iter().map(|c| c / 32).max()?;
        let down = down_cols.iter().map(|c| c / 32).max()?;
        if up > 64 {
            return None;
        }
        let sub = [8usize, 16, 32].into_iter().find(|&s| down <= s)?;
        let rw = self.fused_rows.load(std::sync::atomic::Ordering::Relaxed);
        self.experts_fused.contains_key(&(group_size, rw, sub)).then_some((group_size, rw, sub))
    }

    /// Sets the fused kernel's gate/up rows per warp (benchmarks compare them).
    pub fn set_fused_rows(&self, rows: usize) -> Result<()> {
        if !FUSED_ROWS_PER_WARP.contains(&rows) {
            return Err(CudaError(format!(
                "fused expert kernel: {rows} rows per warp (takes {FUSED_ROWS_PER_WARP:?})"
            )));
        }
        self.fused_rows.store(rows, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether [`Self::experts_fused`] takes experts of these matrices (gate, up, down; routed
    /// and shared): affine 4-bit, one format for all, gate/up inputs of at most 2048 values and
    /// down inputs of at most 1024, both whole 16-byte chunks, gate and up of one shape.
    pub fn fused_experts_fit(&self, mats: &[MatView; 3], shared: &[MatView; 3], k: usize) -> bool {
        let all = || mats.iter().chain(shared);
        k + 3 <= FUSED_SYNC_WORDS
            && all().all(|m| m.format == mats[0].format && m.rows > 0)
            && mats[0].cols == shared[0].cols
            && mats[0].cols == mats[1].cols
            && mats[0].rows == mats[1].rows
            && shared[0].cols == shared[1].cols
            && shared[0].rows == shared[1].rows
            && mats[2].cols == mats[0].rows
            && shared[2].cols == shared[0].rows
            && self.fused_shape(mats[0].format, &[mats[0].cols], &[mats[2].cols, shared[2].cols]).is_some()
            && all().map(|m| Self::x_smem_bytes(4, m.cols)).max().unwrap_or(0) <= MAX_X_SMEM
    }

    /// Launches the one-launch expert MLP (see `fused_experts4` in gemv.cu) on a persistent grid.
    /// The caller checked [`Self::fused_experts_fit`]; `args.mat` are the routed experts' gate,
    /// up, down (as offsets in a slot) and `args.shared` the shared expert's problems.
    pub fn experts_fused(&self, dev: &CudaDevice, args: &FusedExpertsArgs, format: DevFormat) -> Result<()> {
        let down = [args.mat[2].cols as usize, args.shared[2].cols as usize];
        let up = [args.mat[0].cols as usize];
        let key = self
            .fused_shape(format, &up, &down)
            .ok_or_else(|| CudaError(format!("no fused expert kernel for {} at these shapes", format.name())))?;
        let f = &self.experts_fused[&key];
        let cols = args.mat.iter().map(|m| m.cols).chain(args.shared.iter().map(|p| p.cols)).max().unwrap_or(0);
        let smem = Self::x_smem_bytes(4, cols as usize);
        let per_sm = self.occupancy_of(f, smem, BLOCK)?;
        let grid = (dev.sm_count * per_sm as usize).max(1) as u32;
        let mut a = *args;
        a.sync = self.fused_sync.ptr();
        let mut params: [*mut c_void; 1] = [(&mut a as *mut FusedExpertsArgs).cast()];
        // SAFETY: the kernel takes one FusedExpertsArgs by value (same repr(C) layout); the table
        // holds slot addresses (or 0), the offsets stay inside a slot, the counters are ours.
        unsafe { dev.launch(f, grid, BLOCK, smem as u32, &mut params) }
            .map_err(|e| CudaError(format!("fused expert kernel: {e}")))
    }

    /// Resident blocks per SM of `f` with `smem` bytes of dynamic shared memory and `block`
    /// threads (cached).
    fn occupancy_of(&self, f: &CudaFunction, smem: usize, block: u32) -> Result<u32> {
        let key = (f.cu_function() as usize, smem, block);
        let mut occ = self.occupancy.lock().map_err(|_| CudaError::new("occupancy cache poisoned"))?;
        if let Some(&n) = occ.get(&key) {
            return Ok(n);
        }
        let n = f
            .occupancy_max_active_blocks_per_multiprocessor(block, smem, None)
            .map_err(|e| CudaError(format!("occupancy query: {e:?}")))?
            .max(1);
        occ.insert(key, n);
        Ok(n)
    }

    /// Launches a batched-GEMV family over `np` problems (grid y) of `format`, bounded by
    /// `max_rows` × `max_cols`: affine kernels stage x in shared memory on a persistent grid;
    /// dense ones read x from global memory.
    ///
    /// # Safety
    /// `arg` must point at the family's one by-value kernel argument (`GemvBatch` or
    /// `ExpertsArgs`), whose pointers cover every problem.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_problems(
        &self,
        dev: &CudaDevice,
        family: BatchFamily,
        format: DevFormat,
        np: usize,
        max_rows: usize,
        max_cols: usize,
        arg: *mut c_void,
    ) -> Result<()> {
        let (affine, f32k, bf16k, what) = match family {
            BatchFamily::Problems => (&self.batch_affine, &self.batch_f32, &self.batch_bf16, "batched GEMV"),
            BatchFamily::Experts => (&self.experts_affine, &self.experts_f32, &self.experts_bf16, "expert GEMV"),
        };
        let warps = (BLOCK / 32) as usize;
        let (f, smem, grid_x) = match format {
            DevFormat::Affine { bits, group_size } => {
                let smem = Self::x_smem_bytes(bits, max_cols);
                if smem > MAX_X_SMEM {
                    return Err(CudaError(format!("{what}: {max_cols} inputs do not fit in shared memory")));
                }
                let rw = if max_rows * np / 2 >= dev.sm_count * 8 { 2 } else { 1 };
                let f = affine
                    .get(&(bits, group_size, rw))
                    .ok_or_else(|| CudaError(format!("no {what} kernel for {bits} bits, group {group_size}")))?;
                let per_sm = self.occupancy_of(f, smem, BLOCK)?;
                let tiles = max_rows.div_ceil(warps * rw);
                let resident = (dev.sm_count * per_sm as usize).div_ceil(np);
                (f, smem as u32, tiles.min(resident).max(1))
            }
            DevFormat::F32 => (f32k, 0, max_rows.div_ceil(warps).min(dev.sm_count * 16)),
            DevFormat::Bf16 => (bf16k, 0, max_rows.div_ceil(warps).min(dev.sm_count * 16)),
            DevFormat::Ggml(ty) => {
                let g = self.ggml_kernels(ty)?;
                let f = match family {
                    BatchFamily::Problems => &g.batch[1],
                    BatchFamily::Experts => &g.experts,
                };
                (f, 0, max_rows.div_ceil(warps * GGML_ROWS_PER_WARP).min(dev.sm_count * 16))
            }
        };
        let mut args: [*mut c_void; 1] = [arg];
        // SAFETY: the caller passes the family's argument (see above).
        unsafe { dev.launch_3d(f, (grid_x as u32, np as u32, 1), BLOCK, smem, &mut args) }
            .map_err(|e| CudaError(format!("cuLaunchKernel ({what}): {e:?}")))
    }

    fn launch_batch(&self, dev: &CudaDevice, format: DevFormat, items: &[&BatchItem]) -> Result<()> {
        let mut batch = GemvBatch { p: [GemvProblem::default(); MAX_BATCH] };
        for (p, it) in batch.p.iter_mut().zip(items) {
            *p = GemvProblem::of(it);
        }
        let max_rows = items.iter().map(|it| it.m.rows).max().unwrap_or(0);
        let max_cols = items.iter().map(|it| it.m.cols).max().unwrap_or(0);
        if max_rows == 0 {
            return Ok(());
        }
        let arg: *mut c_void = (&mut batch as *mut GemvBatch).cast();
        // SAFETY: the kernel takes one GemvBatch by value (same repr(C) layout); the caller
        // guarantees every pointer covers its problem.
        unsafe { self.launch_problems(dev, BatchFamily::Problems, format, items.len(), max_rows, max_cols, arg) }
    }

    /// Whether this device has the tensor-core GEMM kernels (sm_80 and later).
    pub fn has_tensor_cores(&self) -> bool {
        !self.grouped_tc.is_empty()
    }

    /// Whether the tensor-core grouped GEMM takes a matrix of this format and width: affine,
    /// f32 and bf16 weights, columns a multiple of a lane piece's 4 words (32 at 4 bits), and
    /// GGML Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q8_0, IQ4_NL and IQ4_XS blocks in whole 128-column windows
    /// that are also whole blocks (256 columns for the 256-value super-blocks); sm_80+.
    pub fn tensor_core_fits(&self, format: DevFormat, cols: usize) -> bool {
        let (key, piece) = match format {
            DevFormat::Affine { bits, .. } => (bits, 32 / bits as usize),
            DevFormat::F32 => (0, 2),
            DevFormat::Bf16 => (16, 2),
            DevFormat::Ggml(ty) => {
                let window = if matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL) { 128 } else { 256 };
                return self.grouped_tc_ggml.contains_key(&ty) && cols > 0 && cols.is_multiple_of(window);
            }
        };
        self.grouped_tc.contains_key(&key) && cols > 0 && cols.is_multiple_of(4 * piece)
    }

    /// The group over which the tensor-core GEMM wants Σ x (affine weights taken as exact codes:
    /// groups a multiple of a lane's 4-word chunk that tile the 128-column staging window; Q4_K's
    /// and Q5_K's sub-blocks of 32 and Q2_K's of 16, whose min is an offset), or 0. Never below
    /// [`TC_MIN_SUM_GROUP`], which sizes the sums' scratch.
    pub fn tc_sum_group(format: DevFormat) -> usize {
        match format {
            DevFormat::Ggml(GgmlType::Q4_K | GgmlType::Q5_K) => 32,
            DevFormat::Ggml(GgmlType::Q2_K) => TC_MIN_SUM_GROUP,
            DevFormat::Affine { bits, group_size }
                if group_size.is_multiple_of(4 * 32 / bits as usize) && 128usize.is_multiple_of(group_size) =>
            {
                group_size
            }
            _ => 0,
        }
    }

    /// Splits `rows` rows of `x` ([rows, cols] f32) into `dst` for a tensor-core GEMM whose
    /// weights want sums over `sum_group` columns (0: none).
    pub fn split_for_tc(
        &self,
        dev: &CudaDevice,
        x: u64,
        rows: usize,
        cols: usize,
        sum_group: usize,
        dst: &TcInput,
    ) -> Result<()> {
        let f = self.split_x_tc.as_ref().ok_or_else(|| CudaError::new("no tensor cores on this device"))?;
        if rows == 0 {
            return Ok(());
        }
        let chunk = if sum_group > 0 { sum_group } else { 8 };
        let (mut x, mut xh, mut xl, mut xs) = (x, dst.xh, dst.xl, dst.xsum);
        let (mut rows, mut cols, mut gs) = (rows as i64, cols as i32, sum_group as i32);
        let mut args: [*mut c_void; 7] = [
            (&mut x as *mut u64).cast(),
            (&mut xh as *mut u64).cast(),
            (&mut xl as *mut u64).cast(),
            (&mut xs as *mut u64).cast(),
            (&mut rows as *mut i64).cast(),
            (&mut cols as *mut i32).cast(),
            (&mut gs as *mut i32).cast(),
        ];
        let n = rows as usize * (cols as usize / chunk);
        let blocks = n.div_ceil(128).clamp(1, dev.sm_count * 8) as u32;
        // SAFETY: (x, xh, xl, xsum, rows, cols, gs) as split_x_tc takes them; the caller sized
        // every array for rows × cols (and rows × cols / gs sums).
        unsafe { dev.launch(f, blocks, 128, 0, &mut args) }
    }

    /// `y[t] = m·x[t]` for `t` tokens (x is [t, cols], y [t, rows]): the prefill GEMM. Weights are
    /// read once per 8 tokens, or on tensor cores (`tc`: scratch for the split input, used when
    /// [`Self::tensor_core_fits`]) once per [`TC_PAIRS`]. Sizes are not checked.
    pub fn gemm(&self, dev: &CudaDevice, m: &MatView, x: u64, y: u64, t: usize, tc: Option<&TcInput>) -> Result<()> {
        // The grouped kernel with no slot table and no item list: absolute addresses, tiles of 8.
        let off = MatOffsets { format: m.format, rows: m.rows, cols: m.cols, w: m.w, s: m.s, b: m.b };
        match tc.filter(|_| self.tensor_core_fits(m.format, m.cols)) {
            Some(scratch) => {
                self.split_for_tc(dev, x, t, m.cols, Self::tc_sum_group(m.format), scratch)?;
                self.launch_grouped_tc(dev, &off, 0, 0, t.div_ceil(TC_PAIRS), t, 0, scratch, y)
            }
            None => self.launch_grouped(dev, &off, 0, 0, t.div_ceil(8), t, 0, x, y),
        }
    }

    /// Grouped prefill GEMM over routed experts (see `gemm_grouped` in forward.cu): `nitems` work
    /// items at `items` (expert, first pair, pairs ≤ 8, or ≤ [`TC_PAIRS`] with `tc`), matrix `m`
    /// at byte offsets inside the slot `table[expert]`; pair p reads `x` row `xrow[p]` (or p when
    /// `xrow` is 0), writes `out` row p. `tc`: on tensor cores from `x` already split by
    /// [`Self::split_for_tc`] (the caller checked [`Self::tensor_core_fits`]).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_grouped(
        &self,
        dev: &CudaDevice,
        m: &MatOffsets,
        table: u64,
        items: u64,
        nitems: usize,
        xrow: u64,
        x: u64,
        out: u64,
        tc: Option<&TcInput>,
    ) -> Result<()> {
        match tc {
            Some(input) => self.launch_grouped_tc(dev, m, table, items, nitems, 0, xrow, input, out),
            None => self.launch_grouped(dev, m, table, items, nitems, 0, xrow, x, out),
        }
    }

    /// [`Self::gemm_grouped`], or with `items` 0 a plain GEMM over `ntok` inputs (`table` 0,
    /// absolute addresses in `m`).
    #[allow(clippy::too_many_arguments)]
    fn launch_grouped(
        &self,
        dev: &CudaDevice,
        m: &MatOffsets,
        table: u64,
        items: u64,
        nitems: usize,
        ntok: usize,
        xrow: u64,
        x: u64,
        out: u64,
    ) -> Result<()> {
        if nitems == 0 || m.rows == 0 {
            return Ok(());
        }
        // Staged x (8 inputs, padded chunks) when it fits the shared memory a block may have.
        let (vpc, pad, key, gs) = match m.format {
            DevFormat::Affine { bits, group_size } => (128 / bits as usize, 4, bits, group_size as i32),
            DevFormat::F32 => (4, 0, 0, 0),
            DevFormat::Bf16 => (8, 0, 16, 0),
            DevFormat::Ggml(_) => (32, 0, 0, 0),
        };
        let smem = 8 * (m.cols / vpc) * (vpc + pad) * 4;
        // GGML blocks have no staged variant: their inputs are read from global memory.
        let staged = smem <= self.smem_optin && !matches!(m.format, DevFormat::Ggml(_));
        let f = match m.format {
            DevFormat::Ggml(ty) => &self.ggml_kernels(ty)?.grouped,
            _ if staged => self.grouped_sx.get(&key).ok_or_else(|| CudaError::new("no staged grouped GEMM"))?,
            DevFormat::Affine { bits, .. } => {
                self.grouped_affine.get(&bits).ok_or_else(|| CudaError(format!("no grouped GEMM for {bits} bits")))?
            }
            DevFormat::F32 => &self.grouped_f32,
            DevFormat::Bf16 => &self.grouped_bf16,
        };
        let mut mat = MatOff { w: m.w, s: m.s, b: m.b, rows: m.rows as i32, cols: m.cols as i32 };
        let (mut table, mut gs, mut items, mut xrow, mut x, mut out) = (table, gs, items, xrow, x, out);
        let mut ntok = ntok as i32;
        let mut args: [*mut c_void; 8] = [
            (&mut table as *mut u64).cast(),
            (&mut mat as *mut MatOff).cast(),
            (&mut gs as *mut i32).cast(),
            (&mut items as *mut u64).cast(),
            (&mut xrow as *mut u64).cast(),
            (&mut x as *mut u64).cast(),
            (&mut out as *mut u64).cast(),
            (&mut ntok as *mut i32).cast(),
        ];
        let (grid, smem) = if staged {
            ((m.rows.div_ceil(128) as u32, nitems as u32, 1), smem as u32)
        } else {
            (((m.rows * 32).div_ceil(256) as u32, nitems as u32, 1), 0)
        };
        // SAFETY: arguments match gemm_grouped_* (table, GemmMat by value — same layout as
        // MatOff —, gs, items, xrow, x, out, ntok); the caller sized every buffer for its pairs.
        unsafe { dev.launch_3d(f, grid, 256, smem, &mut args) }
            .map_err(|e| CudaError(format!("cuLaunchKernel (grouped GEMM): {e:?}")))
    }

    /// [`Self::launch_grouped`] on tensor cores: blocks of 128 threads, 128 rows each.
    #[allow(clippy::too_many_arguments)]
    fn launch_grouped_tc(
        &self,
        dev: &CudaDevice,
        m: &MatOffsets,
        table: u64,
        items: u64,
        nitems: usize,
        ntok: usize,
        xrow: u64,
        input: &TcInput,
        out: u64,
    ) -> Result<()> {
        if nitems == 0 || m.rows == 0 {
            return Ok(());
        }
        if !self.tensor_core_fits(m.format, m.cols) {
            return Err(CudaError(format!("no tensor-core GEMM for {} x {} {:?}", m.rows, m.cols, m.format)));
        }
        let (key, gs) = match m.format {
            DevFormat::Affine { bits, group_size } => (bits, group_size as i32),
            DevFormat::F32 => (0, 0),
            DevFormat::Bf16 => (16, 0),
            DevFormat::Ggml(_) => (0, Self::tc_sum_group(m.format) as i32),
        };
        // Exact codes when a lane's 4-word chunk stays inside a group and groups tile the
        // 128-column staging window (then the input carries Σ x per group).
        let codes = match m.format {
            DevFormat::Affine { .. } => Self::tc_sum_group(m.format) > 0,
            _ => true,
        };
        let f = match m.format {
            DevFormat::Ggml(ty) => &self.grouped_tc_ggml[&ty],
            _ if codes => &self.grouped_tc[&key],
            _ => &self.grouped_tc_deq[&key],
        };
        let mut mat = MatOff { w: m.w, s: m.s, b: m.b, rows: m.rows as i32, cols: m.cols as i32 };
        let (mut table, mut gs, mut items, mut xrow, mut out) = (table, gs, items, xrow, out);
        let (mut xh, mut xl, mut xsum) = (input.xh, input.xl, input.xsum);
        let mut ntok = ntok as i32;
        let mut args: [*mut c_void; 10] = [
            (&mut table as *mut u64).cast(),
            (&mut mat as *mut MatOff).cast(),
            (&mut gs as *mut i32).cast(),
            (&mut items as *mut u64).cast(),
            (&mut xrow as *mut u64).cast(),
            (&mut xh as *mut u64).cast(),
            (&mut xl as *mut u64).cast(),
            (&mut xsum as *mut u64).cast(),
            (&mut out as *mut u64).cast(),
            (&mut ntok as *mut i32).cast(),
        ];
        // SAFETY: arguments match gemm_grouped_tc_* (table, GemmMat, gs, items, xrow, xh, xl, xsum,
        // out, ntok); the caller sized every buffer for its pairs.
        unsafe { dev.launch_3d(f, (m.rows.div_ceil(128) as u32, nitems as u32, 1), 128, 0, &mut args) }
            .map_err(|e| CudaError(format!("cuLaunchKernel (tensor-core grouped GEMM): {e:?}")))
    }

    /// Reads every 16-byte word of `buf` once (the read-only bandwidth probe); `scratch` must hold
    /// 4 bytes per block (`blocks`).
    pub fn read_stream(&self, dev: &CudaDevice, buf: &DevBuf, scratch: &DevBuf, blocks: u32) -> Result<()> {
        if scratch.len() < blocks as usize * 4 {
            return Err(CudaError::new("read_stream scratch too small"));
        }
        let (mut p, mut n, mut o) = (buf.ptr(), (buf.len() / 16) as u64, scratch.ptr());
        let mut args: [*mut c_void; 3] =
            [(&mut p as *mut u64).cast(), (&mut n as *mut u64).cast(), (&mut o as *mut u64).cast()];
        // SAFETY: (p, n 16-byte words, out[blocks]) as read_stream takes them.
        unsafe { dev.launch(&self.read_stream, blocks, 256, 0, &mut args) }
    }

    fn fill(&self, dev: &CudaDevice, f: &CudaFunction, buf: &DevBuf, elem: usize, seed: u32) -> Result<()> {
        let (mut p, mut n, mut s) = (buf.ptr(), (buf.len() / elem) as u64, seed);
        let mut args: [*mut c_void; 3] =
            [(&mut p as *mut u64).cast(), (&mut n as *mut u64).cast(), (&mut s as *mut u32).cast()];
        let blocks = (dev.sm_count * 8) as u32;
        // SAFETY: (pointer, element count inside the buffer, seed) as the fill kernels take them.
        unsafe { dev.launch(f, blocks, 256, 0, &mut args) }
    }

    pub fn fill_u32(&self, dev: &CudaDevice, buf: &DevBuf, seed: u32) -> Result<()> {
        self.fill(dev, &self.fill_u32, buf, 4, seed)
    }

    pub fn fill_bf16(&self, dev: &CudaDevice, buf: &DevBuf, seed: u32) -> Result<()> {
        self.fill(dev, &self.fill_bf16, buf, 2, seed)
    }

    pub fn fill_f32(&self, dev: &CudaDevice, buf: &DevBuf, seed: u32) -> Result<()> {
        self.fill(dev, &self.fill_f32, buf, 4, seed)
    }
}
