//! Runtime choice of the SIMD code path.
//!
//! Detection runs once; the result is cached because `is_x86_feature_detected!`
//! is cheap but not free and the kernels ask on every call.

use std::sync::OnceLock;

/// A SIMD implementation level. Every level is always correct; the faster ones
/// are only chosen when the CPU supports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// Portable Rust, no explicit vector code.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (all three ship together on every AVX2 CPU
    /// we care about, but each is checked).
    Avx2Fma,
    /// AVX-512F for the quantized matvec inner loop (twice the lanes per
    /// instruction, which matters because 2/4-bit decoding is compute-heavy);
    /// everything else uses the AVX2 code.
    Avx512,
    /// AVX-512 plus AVX512_BF16, AVX512BW, AVX512_VBMI and AVX512_VNNI (Zen 4 and later,
    /// Sapphire Rapids and later; not Cooper Lake, which lacks VBMI): the GGML block kernels
    /// multiply codes (exact as bf16) by x split into three bf16 parts with `vdpbf16ps` (32
    /// products per instruction), and the 4-bit group-64 affine kernel multiplies codes by x in
    /// 24-bit fixed point with `vpdpbusd`; every other kernel is the `Avx512` one.
    Avx512Bf16,
}

impl SimdLevel {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2Fma => "avx2+fma",
            SimdLevel::Avx512 => "avx512f+avx2+fma",
            SimdLevel::Avx512Bf16 => "avx512bf16+avx512f+avx2+fma",
        }
    }

    /// Whether this level can run on the current CPU.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            SimdLevel::Avx2Fma => avx2_supported(),
            SimdLevel::Avx512 => avx2_supported() && avx512_supported(),
            SimdLevel::Avx512Bf16 => avx2_supported() && avx512_supported() && avx512_bf16_supported(),
        }
    }

    /// Whether this level runs the AVX-512F kernels.
    pub fn has_avx512(self) -> bool {
        matches!(self, SimdLevel::Avx512 | SimdLevel::Avx512Bf16)
    }

    /// All levels, slowest first.
    pub const ALL: [SimdLevel; 4] = [SimdLevel::Scalar, SimdLevel::Avx2Fma, SimdLevel::Avx512, SimdLevel::Avx512Bf16];
}

#[cfg(target_arch = "x86_64")]
fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn avx512_supported() -> bool {
    is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
fn avx512_bf16_supported() -> bool {
    is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("avx512bf16")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_bf16_supported() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_supported() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_supported() -> bool {
    false
}

/// The level the public kernels use: the best supported one. The environment
/// variable `FLASHMOE_SIMD=scalar|avx2|avx512` caps it, which is handy when bisecting
/// a numerical difference or comparing speed.
pub fn detected() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("FLASHMOE_SIMD").as_deref() {
            Ok("scalar") => SimdLevel::Scalar,
            Ok("avx2") => SimdLevel::Avx2Fma,
            Ok("avx512") => SimdLevel::Avx512,
            _ => SimdLevel::Avx512Bf16,
        };
        SimdLevel::ALL.into_iter().rfind(|l| *l as u8 <= cap as u8 && l.is_supported()).unwrap_or(SimdLevel::Scalar)
    })
}

/// Name of the SIMD path the public kernels use, e.g. `"avx512f+avx2+fma"`, `"avx2+fma"` or `"scalar"`.
pub fn simd_level() -> &'static str {
    detected().name()
}
