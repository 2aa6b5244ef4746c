//! GGML / GGUF block quantization: the tensor types a GGUF file names, their
//! block geometry, and CPU kernels (row dequantization, row dot product,
//! matvec) for the types common in Qwen3.5 / Qwen3-Next GGUFs.
//!
//! A quantized row is a sequence of blocks; each block stores `block_size`
//! elements in `type_size` bytes (little-endian, possibly unaligned, straight
//! from a memory-mapped file). [`dequantize_row`] reproduces gguf-py's
//! `gguf.quants.dequantize` bit for bit: same float32 operations in the same
//! order, no fused multiply-adds.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
#[cfg(target_arch = "x86_64")]
mod avx512vnni;
mod blocks;

use rayon::prelude::*;

use crate::cpu_features::{self, SimdLevel};
use crate::{FloatType, KernelError, MatRef};

/// Elements per super-block of the k-quants (`QK_K` in ggml).
pub const QK_K: usize = 256;

/// A GGML tensor type as numbered in GGUF files (`ggml_type` in ggml.h,
/// `GGMLQuantizationType` in gguf-py). Ids 4, 5 and 31–33, 36–38 were
/// removed from the format and are not listed.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// (type, GGUF id, elements per block, bytes per block). Sizes follow
/// `GGML_QUANT_SIZES` in gguf-py 0.17.1 (MXFP4 from ggml.h: 1 byte E8M0
/// scale + 16 bytes of 4-bit codes; NVFP4 and Q1_0 from gguf-py 0.19.0).
/// The one table of GGML types in the workspace: the GGUF reader checks
/// tensor sizes with it too.
const TABLE: [(GgmlType, u32, usize, usize); 34] = {
    use GgmlType::*;
    [
        (F32, 0, 1, 4),
        (F16, 1, 1, 2),
        (Q4_0, 2, 32, 2 + 16),
        (Q4_1, 3, 32, 2 + 2 + 16),
        (Q5_0, 6, 32, 2 + 4 + 16),
        (Q5_1, 7, 32, 2 + 2 + 4 + 16),
        (Q8_0, 8, 32, 2 + 32),
        (Q8_1, 9, 32, 4 + 4 + 32),
        (Q2_K, 10, QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
        (Q3_K, 11, QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
        (Q4_K, 12, QK_K, 2 + 2 + QK_K / 2 + 12),
        (Q5_K, 13, QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
        (Q6_K, 14, QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
        (Q8_K, 15, QK_K, 4 + QK_K + QK_K / 8),
        (IQ2_XXS, 16, QK_K, 2 + QK_K / 4),
        (IQ2_XS, 17, QK_K, 2 + QK_K / 4 + QK_K / 32),
        (IQ3_XXS, 18, QK_K, 2 + QK_K / 4 + QK_K / 8),
        (IQ1_S, 19, QK_K, 2 + QK_K / 8 + QK_K / 16),
        (IQ4_NL, 20, 32, 2 + 16),
        (IQ3_S, 21, QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
        (IQ2_S, 22, QK_K, 2 + QK_K / 4 + QK_K / 16),
        (IQ4_XS, 23, QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
        (I8, 24, 1, 1),
        (I16, 25, 1, 2),
        (I32, 26, 1, 4),
        (I64, 27, 1, 8),
        (F64, 28, 1, 8),
        (IQ1_M, 29, QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
        (BF16, 30, 1, 2),
        (TQ1_0, 34, QK_K, 2 + 4 * 13),
        (TQ2_0, 35, QK_K, 2 + 64),
        (MXFP4, 39, 32, 1 + 16),
        (NVFP4, 40, 64, 36),
        (Q1_0, 41, 128, 18),
    ]
};

// `GgmlType::entry` indexes TABLE by discriminant: keep the two in one order.
const _: () = {
    let mut i = 0;
    while i < TABLE.len() {
        assert!(TABLE[i].0 as usize == i, "TABLE order differs from GgmlType order");
        i += 1;
    }
};

impl GgmlType {
    /// Every known type, in id order.
    pub const ALL: [GgmlType; 34] = {
        let mut all = [GgmlType::F32; 34];
        let mut i = 0;
        while i < TABLE.len() {
            all[i] = TABLE[i].0;
            i += 1;
        }
        all
    };

    /// The types the kernels of this module compute with.
    pub const SUPPORTED: [GgmlType; 15] = {
        use GgmlType::*;
        [F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS]
    };

    fn entry(self) -> (u32, usize, usize) {
        // The enum and TABLE list the types in the same order.
        let (_, id, bs, ts) = TABLE[self as usize];
        (id, bs, ts)
    }

    /// The type with GGUF id `id`; an error names ids that no GGML type has.
    pub fn from_id(id: u32) -> Result<Self, KernelError> {
        TABLE.iter().find(|e| e.1 == id).map(|e| e.0).ok_or_else(|| {
            KernelError::Unsupported(format!("unknown GGML tensor type id {id} (not a type this build knows)"))
        })
    }

    /// The GGUF id.
    pub fn id(self) -> u32 {
        self.entry().0
    }

    /// Name as ggml and gguf-py spell it, e.g. `"Q4_K"`.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }

    /// The type [`GgmlType::name`] spells `name` (exactly, case included), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Elements per block (1 for the plain float and integer types).
    pub fn block_size(self) -> usize {
        self.entry().1
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.entry().2
    }

    /// Whether [`dequantize_row`], [`dot_row`] and [`matvec`] handle this type.
    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }

    /// Errors with "not supported yet" for a type the kernels lack.
    pub fn check_supported(self) -> Result<(), KernelError> {
        if self.is_supported() {
            Ok(())
        } else {
            Err(KernelError::Unsupported(format!(
                "GGML type {} (id {}) is not supported yet; supported: {}",
                self.name(),
                self.id(),
                Self::SUPPORTED.map(|t| t.name()).join(", ")
            )))
        }
    }

    /// Bytes of a row of `cols` elements; errors when `cols` is not a whole
    /// number of blocks or the size overflows.
    pub fn row_bytes(self, cols: usize) -> Result<usize, KernelError> {
        let bs = self.block_size();
        if !cols.is_multiple_of(bs) {
            return Err(KernelError::BadShape(format!(
                "{} row of {cols} elements is not a whole number of {bs}-element blocks",
                self.name()
            )));
        }
        (cols / bs).checked_mul(self.type_size()).ok_or_else(|| {
            KernelError::BadShape(format!("{} row of {cols} elements: byte size overflows", self.name()))
        })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks that `ty` is supported and that `bytes` is exactly one row of
/// `cols` elements.
fn check_row(ty: GgmlType, bytes: &[u8], cols: usize) -> Result<(), KernelError> {
    ty.check_supported()?;
    let want = ty.row_bytes(cols)?;
    if bytes.len() != want {
        return Err(KernelError::BadShape(format!(
            "{ty} row of {cols} elements needs {want} bytes, got {}",
            bytes.len()
        )));
    }
    Ok(())
}

/// Dequantizes one row: `bytes` holds `out.len()` elements of type `ty`.
/// Bit-exact to gguf-py's `gguf.quants.dequantize`.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    dequantize_row_at(cpu_features::detected(), ty, bytes, out)
}

/// [`dequantize_row`] on an explicit SIMD level (for tests and benchmarks; every level gives
/// the same bits). Panics if the CPU lacks `level`.
#[doc(hidden)]
pub fn dequantize_row_at(level: SimdLevel, ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    assert!(level.is_supported(), "SIMD level {} is not supported on this CPU", level.name());
    dequantize_checked_level(level, ty, bytes, out)
}

/// [`dequantize_row_at`] for a caller that checked `level` against the CPU already (the matmul
/// path decodes one row per call).
pub(crate) fn dequantize_checked_level(
    level: SimdLevel,
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_row(ty, bytes, out.len())?;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has `level` (checked by the callers), which includes AVX-512F; the row was
    // checked.
    if level.has_avx512() && unsafe { avx512::dequantize(ty, bytes, out) } {
        return Ok(());
    }
    blocks::dequantize(ty, bytes, out);
    Ok(())
}

/// Σ_i w_i·x_i for one quantized row `row` of `x.len()` elements, accumulated
/// in f32 on the best SIMD level of this CPU. Tested to stay within
/// 1e-5·Σ|w_i·x_i| of [`dequantize_row`] followed by an f64 dot product on
/// every level (the SIMD kernels scale per block, so they are not bit-equal
/// to it).
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    dot_row_at(cpu_features::detected(), ty, row, x)
}

/// [`dot_row`] on an explicit SIMD level (for tests and benchmarks).
/// Panics if the CPU lacks `level`.
#[doc(hidden)]
pub fn dot_row_at(level: SimdLevel, ty: GgmlType, row: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    assert!(level.is_supported(), "SIMD level {} is not supported on this CPU", level.name());
    check_row(ty, row, x.len())?;
    let mut y = [0.0f32];
    matvec_rows(level, ty, row, x, &PreparedX::new(level, ty, x), &mut y);
    Ok(y[0])
}

/// The crate's float storage type matching a plain float GGML type.
fn float_type(ty: GgmlType) -> Option<FloatType> {
    match ty {
        GgmlType::F32 => Some(FloatType::F32),
        GgmlType::F16 => Some(FloatType::F16),
        GgmlType::BF16 => Some(FloatType::BF16),
        _ => None,
    }
}

/// Dot product of a row already checked by [`check_row`], by the kernels that need no prepared x
/// ([`matvec_rows`] runs the bf16 ones).
fn dot_unchecked(level: SimdLevel, ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    if let Some(ft) = float_type(ty) {
        // Plain float rows are the crate's float matrices of one row.
        let mut y = [0.0f32];
        let m = MatRef::float(ft, row, 1, x.len()).expect("row length checked by check_row");
        crate::matvec_at(level, &m, x, &mut y);
        return y[0];
    }
    #[cfg(target_arch = "x86_64")]
    if level.has_avx512() {
        // SAFETY: the caller checked that the CPU has AVX-512F (and the
        // AVX2 set); `row` holds x.len() elements of `ty`.
        if let Some(v) = unsafe { avx512::dot(ty, row, x) } {
            return v;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if level != SimdLevel::Scalar {
        // SAFETY: the caller checked that the CPU has `level`, which
        // includes AVX2, FMA and F16C; `row` holds x.len() elements of `ty`.
        if let Some(v) = unsafe { avx2::dot(ty, row, x) } {
            return v;
        }
    }
    let _ = level;
    blocks::dot(ty, row, x)
}

/// x prepared once for every row of a product with `ty` weights (Q4_0, Q8_0, Q2_K…Q6_K: fixed point for the
/// VNNI kernel; the bf16 split where the level has a bf16 kernel for the type; nothing
/// otherwise), shared by the row blocks that threads compute.
pub(crate) struct PreparedX {
    #[cfg(target_arch = "x86_64")]
    split: Option<avx512bf16::SplitX>,
    #[cfg(target_arch = "x86_64")]
    fixed: Option<avx512vnni::FixedX>,
}

impl PreparedX {
    /// `x` (a whole number of `ty` blocks) prepared for `ty`'s kernel on `level`.
    pub(crate) fn new(level: SimdLevel, ty: GgmlType, x: &[f32]) -> Self {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (level, ty, x);
        #[cfg(target_arch = "x86_64")]
        let fixed = level == SimdLevel::Avx512Bf16 && avx512vnni::handles(ty);
        PreparedX {
            #[cfg(target_arch = "x86_64")]
            // SAFETY (both): the level was checked against the CPU by the callers (it includes
            // AVX512_VNNI); x is a whole number of blocks (checked rows or matrices).
            split: (level == SimdLevel::Avx512Bf16 && avx512bf16::handles(ty) && !fixed)
                .then(|| unsafe { avx512bf16::split(ty, x) }),
            #[cfg(target_arch = "x86_64")]
            fixed: fixed.then(|| unsafe { avx512vnni::prepare(ty, x) }),
        }
    }
}

/// `y[r] = row r · x` for the rows of `data` (`y.len()` whole rows of `x.len()` elements of
/// `ty`, checked by the caller), on the calling thread; `px` is `PreparedX::new(level, ty, x)`.
pub(crate) fn matvec_rows(level: SimdLevel, ty: GgmlType, data: &[u8], x: &[f32], px: &PreparedX, y: &mut [f32]) {
    let rb = data.len() / y.len().max(1);
    for (r, yr) in y.iter_mut().enumerate() {
        let row = &data[r * rb..(r + 1) * rb];
        #[cfg(target_arch = "x86_64")]
        if let Some(fx) = &px.fixed {
            // SAFETY: prepared only on a level with AVX512_VNNI, for a type the module handles;
            // the row is whole.
            *yr = unsafe {
                match ty {
                    GgmlType::Q4_0 => avx512vnni::q4_0::<false>(row, x, fx, x.len() / 32),
                    GgmlType::Q8_0 => avx512vnni::q8_0(row, x, fx, x.len() / 32),
                    GgmlType::IQ4_NL => avx512vnni::q4_0::<true>(row, x, fx, x.len() / 32),
                    GgmlType::IQ4_XS => avx512vnni::iq4_xs(row, fx, x.len() / QK_K),
                    GgmlType::Q2_K => avx512vnni::sixteen::<{ avx512vnni::Q2 }>(row, fx, x.len() / QK_K),
                    GgmlType::Q3_K => avx512vnni::sixteen::<{ avx512vnni::Q3 }>(row, fx, x.len() / QK_K),
                    GgmlType::Q6_K => avx512vnni::sixteen::<{ avx512vnni::Q6 }>(row, fx, x.len() / QK_K),
                    GgmlType::Q5_K => avx512vnni::k4::<true>(row, fx, x.len() / QK_K),
                    _ => avx512vnni::k4::<false>(row, fx, x.len() / QK_K),
                }
            };
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(sx) = &px.split {
            // SAFETY: the split exists only on a level with AVX512_BF16 and for a type the module
            // handles; the row is whole.
            *yr = unsafe { avx512bf16::dot(ty, row, x, sx) };
            continue;
        }
        let _ = px;
        *yr = dot_unchecked(level, ty, row, x);
    }
}

/// Below this many weight elements a matvec runs on the calling thread
/// (splitting across rayon costs more than a small matvec takes).
const PAR_MIN_ELEMS: usize = 1 << 18;

/// `y[r] = Σ_c W[r,c]·x[c]` for a row-major `[y.len(), x.len()]` matrix of
/// type `ty` in `data`; rows run in parallel on rayon for large matrices.
pub fn matvec(ty: GgmlType, data: &[u8], x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    matvec_at(cpu_features::detected(), ty, data, x, y)
}

/// [`matvec`] on an explicit SIMD level (for tests and benchmarks).
/// Panics if the CPU lacks `level`.
#[doc(hidden)]
pub fn matvec_at(level: SimdLevel, ty: GgmlType, data: &[u8], x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    assert!(level.is_supported(), "SIMD level {} is not supported on this CPU", level.name());
    ty.check_supported()?;
    let (rows, cols) = (y.len(), x.len());
    let rb = ty.row_bytes(cols)?;
    let want = rb
        .checked_mul(rows)
        .ok_or_else(|| KernelError::BadShape(format!("{ty} matrix [{rows}, {cols}]: byte size overflows")))?;
    if data.len() != want {
        return Err(KernelError::BadShape(format!(
            "{ty} matrix [{rows}, {cols}] needs {want} bytes, got {}",
            data.len()
        )));
    }
    if cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    if let Some(ft) = float_type(ty) {
        let m = MatRef::float(ft, data, rows, cols)?;
        crate::matvec_at(level, &m, x, y);
        return Ok(());
    }
    // x is prepared once per product, not once per row.
    let px = PreparedX::new(level, ty, x);
    let rows_dot = |r0: usize, ys: &mut [f32]| matvec_rows(level, ty, &data[r0 * rb..(r0 + ys.len()) * rb], x, &px, ys);
    if rows.saturating_mul(cols) >= PAR_MIN_ELEMS && rows >= 2 && rayon::current_num_threads() > 1 {
        let block = rows.div_ceil(rayon::current_num_threads() * 4).max(1);
        y.par_chunks_mut(block).enumerate().for_each(|(i, ys)| rows_dot(i * block, ys));
    } else {
        rows_dot(0, y);
    }
    Ok(())
}
