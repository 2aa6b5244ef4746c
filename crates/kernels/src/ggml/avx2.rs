//! AVX2 + FMA + F16C dot products for the types of the common Q4_K_M / Q8_0
//! mixes (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K), of the low-bit mixes (Q2_K, Q3_K,
//! IQ4_NL, IQ4_XS) and the older Q4_1, Q5_0, Q5_1. Each block is decoded into
//! registers (bytes widened to i32 lanes, codes masked out, converted to
//! f32) and multiplied into f32 accumulators against x; the block or
//! sub-block scale is applied once per partial sum where the format allows.

use std::arch::x86_64::*;

use super::GgmlType;
use super::blocks::{KVALUES_IQ4NL, iq4_xs_scales, k4_scales, q3_k_scale_bytes};
use crate::avx2::{PREFETCH_DIST, prefetch};

/// Prefetches the `len` bytes that lie `PREFETCH_DIST` after the block at `b` (see
/// `avx512::prefetch_block`). Never faults.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch_block(b: *const u8, len: usize) {
    let ahead = b.wrapping_add(PREFETCH_DIST);
    for line in 0..len.div_ceil(64) {
        prefetch(ahead.wrapping_add(64 * line));
    }
}

/// The dot product of a checked row for the types that have a kernel here,
/// `None` for the rest.
///
/// # Safety
/// AVX2/FMA/F16C must be available; `row` must hold `x.len()` elements of
/// type `ty` (a whole number of blocks).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(ty: GgmlType, row: &[u8], x: &[f32]) -> Option<f32> {
    let nb = x.len() / ty.block_size();
    debug_assert_eq!(row.len(), nb * ty.type_size());
    let (r, xp) = (row.as_ptr(), x.as_ptr());
    // SAFETY: per the contract, each kernel reads nb blocks of row and
    // nb * block_size floats of x.
    unsafe {
        let acc = match ty {
            GgmlType::Q8_0 => q8_0(r, xp, nb),
            GgmlType::Q4_0 => q4_0(r, xp, nb),
            GgmlType::Q4_K => q4_k(r, xp, nb),
            GgmlType::Q5_K => q5_k(r, xp, nb),
            GgmlType::Q6_K => q6_k(r, xp, nb),
            GgmlType::Q2_K => q2_k(r, xp, nb),
            GgmlType::Q3_K => q3_k(r, xp, nb),
            GgmlType::IQ4_NL => iq4_nl(r, xp, nb),
            GgmlType::IQ4_XS => iq4_xs(r, xp, nb),
            GgmlType::Q4_1 => q4_1(r, xp, nb),
            GgmlType::Q5_0 => q5_0(r, xp, nb),
            GgmlType::Q5_1 => q5_1(r, xp, nb),
            _ => return None,
        };
        Some(hsum(acc))
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The little-endian f16 at `p`, widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes.
    let bits = u16::from_le_bytes(unsafe { p.cast::<[u8; 2]>().read_unaligned() });
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Eight bytes at `p`, zero-extended to i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn u8x8(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees eight readable bytes.
    _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(p.cast()) })
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn x8(p: *const f32) -> __m256 {
    // SAFETY: the caller guarantees eight readable floats.
    unsafe { _mm256_loadu_ps(p) }
}

/// Q8_0: 2-byte f16 scale, 32 signed bytes; w = q·d.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i spans r[34i..34i+34], x[32i..32i+32].
        unsafe {
            let (b, xb) = (r.add(i * 34), x.add(i * 32));
            prefetch_block(b, 34);
            let mut s0 = _mm256_setzero_ps();
            let mut s1 = _mm256_setzero_ps();
            for k in (0..4).step_by(2) {
                let q0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + 8 * k).cast()));
                let q1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + 8 * k + 8).cast()));
                s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), x8(xb.add(8 * k)), s0);
                s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), x8(xb.add(8 * k + 8)), s1);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), _mm256_add_ps(s0, s1), acc);
        }
    }
    acc
}

/// Q4_0: f16 scale, 16 bytes; element j is the low nibble of byte j and
/// element j+16 the high nibble; w = (q - 8)·d.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let (mask, eight) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(8));
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i spans r[18i..18i+18], x[32i..32i+32].
        unsafe {
            let (b, xb) = (r.add(i * 18), x.add(i * 32));
            prefetch_block(b, 18);
            let mut s0 = _mm256_setzero_ps();
            let mut s1 = _mm256_setzero_ps();
            for k in 0..2 {
                let v = u8x8(b.add(2 + 8 * k));
                let lo = _mm256_sub_epi32(_mm256_and_si256(v, mask), eight);
                let hi = _mm256_sub_epi32(_mm256_srli_epi32::<4>(v), eight);
                s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), x8(xb.add(8 * k)), s0);
                s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), x8(xb.add(16 + 8 * k)), s1);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), _mm256_add_ps(s0, s1), acc);
        }
    }
    acc
}

/// Shared body of Q4_K and Q5_K: super-blocks of 8 sub-blocks of 32, each
/// with its 6-bit scale and min; w = d·sc·q - dmin·m. `qh` is the block's
/// fifth-bit plane (Q5_K) or null (Q4_K).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_block(b: *const u8, qh: *const u8, qs: *const u8, xb: *const f32, acc: &mut [__m256; 2]) {
    let (mask, one) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(1));
    // SAFETY: the caller passes a whole block and its 256 floats of x.
    unsafe {
        let (d, dmin) = (f16_at(b), f16_at(b.add(2)));
        let (sc, mn) = k4_scales(std::slice::from_raw_parts(b.add(4), 12));
        // 32-byte chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high ones.
        for c in 0..4 {
            let (s_lo, s_hi) = (2 * c, 2 * c + 1);
            let a_lo = _mm256_set1_ps(d * sc[s_lo] as f32);
            let m_lo = _mm256_set1_ps(dmin * mn[s_lo] as f32);
            let a_hi = _mm256_set1_ps(d * sc[s_hi] as f32);
            let m_hi = _mm256_set1_ps(dmin * mn[s_hi] as f32);
            for k in 0..4 {
                let v = u8x8(qs.add(c * 32 + 8 * k));
                let mut lo = _mm256_and_si256(v, mask);
                let mut hi = _mm256_srli_epi32::<4>(v); // v holds zero-extended bytes: no mask needed
                if !qh.is_null() {
                    // Bit s of qh[l] is the fifth bit of element 32s + l.
                    let h = u8x8(qh.add(8 * k));
                    let h_lo = _mm256_and_si256(_mm256_srl_epi32(h, _mm_cvtsi32_si128(s_lo as i32)), one);
                    let h_hi = _mm256_and_si256(_mm256_srl_epi32(h, _mm_cvtsi32_si128(s_hi as i32)), one);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi32::<4>(h_lo));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi32::<4>(h_hi));
                }
                let w_lo = _mm256_fmsub_ps(_mm256_cvtepi32_ps(lo), a_lo, m_lo);
                let w_hi = _mm256_fmsub_ps(_mm256_cvtepi32_ps(hi), a_hi, m_hi);
                acc[0] = _mm256_fmadd_ps(w_lo, x8(xb.add(c * 64 + 8 * k)), acc[0]);
                acc[1] = _mm256_fmadd_ps(w_hi, x8(xb.add(c * 64 + 32 + 8 * k)), acc[1]);
            }
        }
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let mut acc = [_mm256_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block i spans r[144i..144i+144], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 144);
            prefetch_block(b, 144);
            k4_block(b, std::ptr::null(), b.add(16), x.add(i * 256), &mut acc);
        }
    }
    _mm256_add_ps(acc[0], acc[1])
}

/// Q5_K: as Q4_K plus 32 bytes of fifth bits before the nibbles.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let mut acc = [_mm256_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block i spans r[176i..176i+176], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 176);
            prefetch_block(b, 176);
            k4_block(b, b.add(16), b.add(48), x.add(i * 256), &mut acc);
        }
    }
    _mm256_add_ps(acc[0], acc[1])
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed
/// 8-bit scales (one per 16 elements), f16 d; w = d·sc·(q - 32).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let (mask4, mask2, bias) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(3), _mm256_set1_epi32(32));
    let mut acc = [_mm256_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block i spans r[210i..210i+210], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 210);
            prefetch_block(b, 210);
            let (ql, qh, sc) = (b, b.add(128), b.add(192));
            let d = f16_at(b.add(208));
            let xb = x.add(i * 256);
            // Half h of 128 elements, quarter t of 32: low nibble from
            // ql[64h + 32(t%2) + l] (shift 4·(t/2)), high bits from
            // qh[32h + l] (shift 2t).
            for h in 0..2 {
                for t in 0..4 {
                    let lshift = _mm_cvtsi32_si128(4 * (t as i32 / 2));
                    let hshift = _mm_cvtsi32_si128(2 * t as i32);
                    for (half, acc_half) in acc.iter_mut().enumerate() {
                        let mut s = _mm256_setzero_ps();
                        for k in 2 * half..2 * half + 2 {
                            let l = _mm256_and_si256(
                                _mm256_srl_epi32(u8x8(ql.add(h * 64 + (t % 2) * 32 + 8 * k)), lshift),
                                mask4,
                            );
                            let hb = _mm256_and_si256(_mm256_srl_epi32(u8x8(qh.add(h * 32 + 8 * k)), hshift), mask2);
                            let q = _mm256_sub_epi32(_mm256_or_si256(l, _mm256_slli_epi32::<4>(hb)), bias);
                            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), x8(xb.add(h * 128 + t * 32 + 8 * k)), s);
                        }
                        let scale = d * (*sc.add(h * 8 + t * 2 + half) as i8) as f32;
                        *acc_half = _mm256_fmadd_ps(_mm256_set1_ps(scale), s, *acc_half);
                    }
                }
            }
        }
    }
    _mm256_add_ps(acc[0], acc[1])
}

/// Q2_K: 16 bytes of 4-bit (scale, min) pairs, 64 bytes of 2-bit codes, f16
/// d and dmin. Element 128h + 32s + l is bits 2s..2s+2 of qs[32h + l];
/// its sub-block of 16 has w = d·(sc & 15)·q - dmin·(sc >> 4).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_k(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let three = _mm256_set1_epi32(3);
    let mut acc = [_mm256_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block i spans r[84i..84i+84], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 84);
            prefetch_block(b, 84);
            let (sc, qs) = (b, b.add(16));
            let (d, dmin) = (f16_at(b.add(80)), f16_at(b.add(82)));
            let xb = x.add(i * 256);
            for h in 0..2 {
                for s in 0..4 {
                    let shift = _mm_cvtsi32_si128(2 * s as i32);
                    for (half, acc_half) in acc.iter_mut().enumerate() {
                        let scm = *sc.add(h * 8 + s * 2 + half);
                        let a = _mm256_set1_ps(d * (scm & 0xF) as f32);
                        let m = _mm256_set1_ps(dmin * (scm >> 4) as f32);
                        for k in 2 * half..2 * half + 2 {
                            let q = _mm256_and_si256(_mm256_srl_epi32(u8x8(qs.add(h * 32 + 8 * k)), shift), three);
                            let w = _mm256_fmsub_ps(_mm256_cvtepi32_ps(q), a, m);
                            *acc_half = _mm256_fmadd_ps(w, x8(xb.add(h * 128 + s * 32 + 8 * k)), *acc_half);
                        }
                    }
                }
            }
        }
    }
    _mm256_add_ps(acc[0], acc[1])
}

/// Q3_K: 32 bytes of high bits, 64 bytes of 2-bit low parts, 12 bytes of
/// 6-bit scales, f16 d. Element e = 128h + 32s + l has low bits 2s..2s+2 of
/// qs[32h + l] and high bit e/32 of hmask[l]; q = (low | high << 2) - 4.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3_k(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let (three, one, four) = (_mm256_set1_epi32(3), _mm256_set1_epi32(1), _mm256_set1_epi32(4));
    let mut acc = [_mm256_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block i spans r[110i..110i+110], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 110);
            prefetch_block(b, 110);
            let (hmask, qs) = (b, b.add(32));
            let sc = q3_k_scale_bytes(std::slice::from_raw_parts(b.add(96), 12));
            let d = f16_at(b.add(108));
            let xb = x.add(i * 256);
            for h in 0..2 {
                for s in 0..4 {
                    let lshift = _mm_cvtsi32_si128(2 * s as i32);
                    let hshift = _mm_cvtsi32_si128((4 * h + s) as i32);
                    for (half, acc_half) in acc.iter_mut().enumerate() {
                        let a = _mm256_set1_ps(d * (sc[h * 8 + s * 2 + half] as i32 - 32) as f32);
                        let mut sum = _mm256_setzero_ps();
                        for k in 2 * half..2 * half + 2 {
                            let lo = _mm256_and_si256(_mm256_srl_epi32(u8x8(qs.add(h * 32 + 8 * k)), lshift), three);
                            let hi = _mm256_and_si256(_mm256_srl_epi32(u8x8(hmask.add(8 * k)), hshift), one);
                            let q = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32::<2>(hi)), four);
                            sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), x8(xb.add(h * 128 + s * 32 + 8 * k)), sum);
                        }
                        *acc_half = _mm256_fmadd_ps(a, sum, *acc_half);
                    }
                }
            }
        }
    }
    _mm256_add_ps(acc[0], acc[1])
}

/// Σ kvalue(q)·x over 32 elements whose 4-bit codes are the 16 bytes at
/// `qs` (low nibbles: elements 0..16, high: 16..32): the code-to-value table
/// is one byte shuffle.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq4_32(qs: *const u8, xb: *const f32) -> __m256 {
    // SAFETY: the caller guarantees 16 bytes at qs and 32 floats at xb.
    unsafe {
        let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr().cast());
        let v = _mm_loadu_si128(qs.cast());
        let mask = _mm_set1_epi8(0xF);
        let lo = _mm_shuffle_epi8(table, _mm_and_si128(v, mask));
        let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16::<4>(v), mask));
        let mut s0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), x8(xb));
        let mut s1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo))), x8(xb.add(8)));
        s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), x8(xb.add(16)), s0);
        s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi))), x8(xb.add(24)), s1);
        _mm256_add_ps(s0, s1)
    }
}

/// IQ4_NL: f16 d, 16 bytes of non-linear 4-bit codes; w = d·kvalue(q).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq4_nl(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i spans r[18i..18i+18], x[32i..32i+32].
        unsafe {
            let b = r.add(i * 18);
            prefetch_block(b, 18);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), iq4_32(b.add(2), x.add(i * 32)), acc);
        }
    }
    acc
}

/// IQ4_XS: f16 d, 6-bit sub-block scales (2 + 4 bytes), then eight runs of
/// 16 bytes laid out as IQ4_NL blocks; w = d·(ls - 32)·kvalue(q).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq4_xs(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i spans r[136i..136i+136], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 136);
            prefetch_block(b, 136);
            let d = f16_at(b);
            let ls = iq4_xs_scales(std::slice::from_raw_parts(b, 8));
            for (ib, &l) in ls.iter().enumerate() {
                let s = iq4_32(b.add(8 + 16 * ib), x.add(i * 256 + 32 * ib));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * l as f32), s, acc);
            }
        }
    }
    acc
}

/// For a 32-element block of 4-bit codes at `qs` (low nibbles: elements
/// 0..16, high: 16..32), with bit j of `qh` as the fifth bit of element j
/// when `FIVE`: (Σ (q - SUB)·x, Σ x), the second only when `SUMX`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nib32<const FIVE: bool, const SUB: i32, const SUMX: bool>(
    qs: *const u8,
    qh: u32,
    xb: *const f32,
) -> (__m256, __m256) {
    let (mask, one, sub) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(1), _mm256_set1_epi32(SUB));
    let hv = _mm256_set1_epi32(qh as i32);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let (mut sq, mut sx) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for k in 0..2 {
        // SAFETY: the caller guarantees 16 bytes at qs and 32 floats at xb.
        let (v, x_lo, x_hi) = unsafe { (u8x8(qs.add(8 * k)), x8(xb.add(8 * k)), x8(xb.add(16 + 8 * k))) };
        let mut lo = _mm256_and_si256(v, mask);
        let mut hi = _mm256_srli_epi32::<4>(v);
        if FIVE {
            let j_lo = _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * k as i32));
            let j_hi = _mm256_add_epi32(j_lo, _mm256_set1_epi32(16));
            lo = _mm256_or_si256(lo, _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srlv_epi32(hv, j_lo), one)));
            hi = _mm256_or_si256(hi, _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srlv_epi32(hv, j_hi), one)));
        }
        if SUB != 0 {
            lo = _mm256_sub_epi32(lo, sub);
            hi = _mm256_sub_epi32(hi, sub);
        }
        sq = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), x_lo, sq);
        sq = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), x_hi, sq);
        if SUMX {
            sx = _mm256_add_ps(sx, _mm256_add_ps(x_lo, x_hi));
        }
    }
    (sq, sx)
}

/// The little-endian u32 at `p`.
#[inline]
unsafe fn u32_at(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees four readable bytes.
    u32::from_le_bytes(unsafe { p.cast::<[u8; 4]>().read_unaligned() })
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; w = d·q + m.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i spans r[20i..20i+20], x[32i..32i+32].
        unsafe {
            let b = r.add(i * 20);
            prefetch_block(b, 20);
            let (sq, sx) = nib32::<false, 0, true>(b.add(4), 0, x.add(i * 32));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), sq, acc);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b.add(2))), sx, acc);
        }
    }
    acc
}

/// Q5_0: f16 d, u32 of fifth bits, 16 bytes of nibbles; w = d·(q - 16).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i spans r[22i..22i+22], x[32i..32i+32].
        unsafe {
            let b = r.add(i * 22);
            prefetch_block(b, 22);
            let (sq, _) = nib32::<true, 16, false>(b.add(6), u32_at(b.add(2)), x.add(i * 32));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), sq, acc);
        }
    }
    acc
}

/// Q5_1: f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles; w = d·q + m.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1(r: *const u8, x: *const f32, nb: usize) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i spans r[24i..24i+24], x[32i..32i+32].
        unsafe {
            let b = r.add(i * 24);
            prefetch_block(b, 24);
            let (sq, sx) = nib32::<true, 0, true>(b.add(8), u32_at(b.add(4)), x.add(i * 32));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), sq, acc);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b.add(2))), sx, acc);
        }
    }
    acc
}
