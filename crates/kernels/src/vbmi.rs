//! Byte permutes (AVX512_VBMI `vpermb`, `vpermt2b`) the compiler cannot rewrite.
//!
//! Given a constant index that moves bytes in pairs, LLVM turns `_mm512_permutexvar_epi8` into
//! `vpermw` and `_mm512_permutex2var_epi8` into `vpermt2w`: on Ice Lake and Sapphire Rapids those
//! are 2 and 3 µops on port 5 (latency 6 and 7), the byte forms 1 µop (latency 3). In the GGUF
//! Q4_0 kernel that was the port-5 bottleneck (llvm-mca: 13.2 cycles per two steps). Inline
//! assembly keeps the byte forms.

use std::arch::asm;
use std::arch::x86_64::__m512i;

/// `_mm512_permutexvar_epi8(idx, a)`: byte i of the result is byte `idx[i] & 63` of `a`.
///
/// # Safety
/// AVX512_VBMI must be available.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn permute_bytes(idx: __m512i, a: __m512i) -> __m512i {
    let out: __m512i;
    // SAFETY: register-only instruction; the caller guarantees AVX512_VBMI.
    unsafe {
        asm!("vpermb {out}, {idx}, {a}", out = lateout(zmm_reg) out, idx = in(zmm_reg) idx, a = in(zmm_reg) a, options(pure, nomem, nostack))
    };
    out
}

/// `_mm512_permutex2var_epi8(a, idx, b)`: byte i of the result is byte `idx[i] & 63` of `a`
/// when bit 6 of `idx[i]` is clear, of `b` when it is set.
///
/// # Safety
/// AVX512_VBMI must be available.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn permute2_bytes(a: __m512i, idx: __m512i, b: __m512i) -> __m512i {
    let mut out = a;
    // SAFETY: register-only instruction; the caller guarantees AVX512_VBMI.
    unsafe {
        asm!("vpermt2b {out}, {idx}, {b}", out = inout(zmm_reg) out, idx = in(zmm_reg) idx, b = in(zmm_reg) b, options(pure, nomem, nostack))
    };
    out
}

#[cfg(test)]
mod tests {
    use std::arch::x86_64::*;

    #[test]
    fn match_the_intrinsics() {
        if !(is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512bw")) {
            return;
        }
        let bytes = |f: &dyn Fn(usize) -> u8| -> [u8; 64] { std::array::from_fn(f) };
        let a = bytes(&|i| (i * 7 + 3) as u8);
        let b = bytes(&|i| (200 - i) as u8);
        let idx = bytes(&|i| ((i * 37 + 11) % 128) as u8);
        // SAFETY: features checked above; 64-byte arrays.
        unsafe {
            let load = |v: &[u8; 64]| _mm512_loadu_si512(v.as_ptr().cast());
            let (a, b, idx) = (load(&a), load(&b), load(&idx));
            let mut got = [[0u8; 64]; 4];
            _mm512_storeu_si512(got[0].as_mut_ptr().cast(), super::permute_bytes(idx, a));
            _mm512_storeu_si512(got[1].as_mut_ptr().cast(), _mm512_permutexvar_epi8(idx, a));
            _mm512_storeu_si512(got[2].as_mut_ptr().cast(), super::permute2_bytes(a, idx, b));
            _mm512_storeu_si512(got[3].as_mut_ptr().cast(), _mm512_permutex2var_epi8(a, idx, b));
            assert_eq!(got[0], got[1]);
            assert_eq!(got[2], got[3]);
        }
    }
}
