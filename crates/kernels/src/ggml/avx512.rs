//! AVX-512F versions of the kernels in `avx2.rs` (same types, same block
//! decoding, 16 lanes: one 16-byte load widens to a full vector of codes).

use std::arch::x86_64::*;

use super::GgmlType;
use super::blocks::{KVALUES_IQ4NL, iq4_xs_scales, k4_scales, q3_k_scale_bytes};
use crate::avx512::{PREFETCH_DIST, prefetch};

/// Prefetches the `len` bytes that lie `PREFETCH_DIST` after the block at `b`, into L1: the
/// hardware streamer alone leaves the block kernels well short of DRAM bandwidth (as the affine
/// kernels, see `crate::avx512::prefetch`). Never faults, so `b + PREFETCH_DIST` may lie past the
/// row or the weights.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) fn prefetch_block(b: *const u8, len: usize) {
    let ahead = b.wrapping_add(PREFETCH_DIST);
    for line in 0..len.div_ceil(64) {
        prefetch(ahead.wrapping_add(64 * line));
    }
}

/// The dot product of a checked row for the types that have a kernel here,
/// `None` for the rest.
///
/// # Safety
/// AVX-512F, AVX2, FMA and F16C must be available; `row` must hold
/// `x.len()` elements of type `ty` (a whole number of blocks).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
            _ => return None,
        };
        Some(_mm512_reduce_add_ps(acc))
    }
}

/// The little-endian f16 at `p`, widened (F16C, not a software conversion).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes.
    let bits = u16::from_le_bytes(unsafe { p.cast::<[u8; 2]>().read_unaligned() });
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Sixteen bytes at `p`, zero-extended to i32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn u8x16(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees sixteen readable bytes.
    _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) })
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn x16(p: *const f32) -> __m512 {
    // SAFETY: the caller guarantees sixteen readable floats.
    unsafe { _mm512_loadu_ps(p) }
}

/// Q8_0: f16 scale, 32 signed bytes; w = q·d. The scales of 16 blocks come in one gather and
/// one conversion (a scalar load, move, conversion and broadcast per block cost more µops
/// than the block's codes); a block's scale is then spread with one permute.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q8_0(r: *const u8, x: *const f32, nb: usize) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 2];
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(34),
    );
    let block = |acc: &mut __m512, i: usize, d: __m512| {
        // SAFETY: block i spans r[34i..34i+34], x[32i..32i+32].
        unsafe {
            let (b, xb) = (r.add(i * 34), x.add(i * 32));
            prefetch_block(b, 34);
            let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2).cast()));
            let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(18).cast()));
            let s = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), x16(xb));
            let s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q1), x16(xb.add(16)), s);
            *acc = _mm512_fmadd_ps(d, s, *acc);
        }
    };
    let whole = nb / 16;
    for g in 0..whole {
        // SAFETY: the gather reads 4 bytes at 34k for k in 0..16 of blocks 16g.., the last at
        // byte 34·15 + 4 of the group, inside the row.
        let d = unsafe {
            let words = _mm512_i32gather_epi32::<1>(offsets, r.add(g * 16 * 34).cast());
            _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words))
        };
        for k in 0..16 {
            let dk = _mm512_permutexvar_ps(_mm512_set1_epi32(k as i32), d);
            block(&mut acc[k % 2], g * 16 + k, dk);
        }
    }
    for i in whole * 16..nb {
        // SAFETY: block i starts inside the row.
        let d = unsafe { f16_at(r.add(i * 34)) };
        block(&mut acc[i % 2], i, _mm512_set1_ps(d));
    }
    _mm512_add_ps(acc[0], acc[1])
}

/// The codes q − 8 of the Q4_0 block at `b`: elements 0..16, then 16..32.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_0_codes(b: *const u8) -> (__m512i, __m512i) {
    let (mask, eight) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(8));
    // SAFETY: the caller passes a whole block.
    let v = unsafe { u8x16(b.add(2)) };
    (_mm512_sub_epi32(_mm512_and_si512(v, mask), eight), _mm512_sub_epi32(_mm512_srli_epi32::<4>(v), eight))
}

/// Q4_0: f16 scale, 16 bytes (low nibbles: elements 0..16, high: 16..32);
/// w = (q - 8)·d.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_0(r: *const u8, x: *const f32, nb: usize) -> __m512 {
    let mut acc = _mm512_setzero_ps();
    for i in 0..nb {
        // SAFETY: block i spans r[18i..18i+18], x[32i..32i+32].
        unsafe {
            let (b, xb) = (r.add(i * 18), x.add(i * 32));
            prefetch_block(b, 18);
            let (lo, hi) = q4_0_codes(b);
            let s = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), x16(xb));
            let s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), x16(xb.add(16)), s);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(f16_at(b)), s, acc);
        }
    }
    acc
}

/// Codes 16k..16k+16 of sub-blocks 2c (low nibbles of 32-byte chunk c) and 2c + 1 (its high
/// nibbles) of a Q4_K/Q5_K super-block, with Q5_K's fifth bits (bits 2c and 2c + 1 of qh[j]);
/// `qh` is null for Q4_K.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k4_codes(qs: *const u8, qh: *const u8, c: usize, k: usize) -> (__m512i, __m512i) {
    let (mask, one) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(1));
    // SAFETY: the caller passes the block's code and fifth-bit bytes.
    unsafe {
        let v = u8x16(qs.add(c * 32 + 16 * k));
        let mut lo = _mm512_and_si512(v, mask);
        let mut hi = _mm512_srli_epi32::<4>(v); // v holds zero-extended bytes: no mask needed
        if !qh.is_null() {
            let h = u8x16(qh.add(16 * k));
            let h_lo = _mm512_and_si512(_mm512_srl_epi32(h, _mm_cvtsi32_si128(2 * c as i32)), one);
            let h_hi = _mm512_and_si512(_mm512_srl_epi32(h, _mm_cvtsi32_si128(2 * c as i32 + 1)), one);
            lo = _mm512_or_si512(lo, _mm512_slli_epi32::<4>(h_lo));
            hi = _mm512_or_si512(hi, _mm512_slli_epi32::<4>(h_hi));
        }
        (lo, hi)
    }
}

/// Codes q − 32 of elements 128h + 32t + 16·half .. +16 of a Q6_K super-block (layout in
/// `avx2::q6_k`).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q6_k_codes(ql: *const u8, qh: *const u8, h: usize, t: usize, half: usize) -> __m512i {
    let (mask4, mask2, bias) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(3), _mm512_set1_epi32(32));
    let lshift = _mm_cvtsi32_si128(4 * (t as i32 / 2));
    let hshift = _mm_cvtsi32_si128(2 * t as i32);
    // SAFETY: the caller passes the block's ql and qh bytes.
    unsafe {
        let l = _mm512_and_si512(_mm512_srl_epi32(u8x16(ql.add(h * 64 + (t % 2) * 32 + 16 * half)), lshift), mask4);
        let hb = _mm512_and_si512(_mm512_srl_epi32(u8x16(qh.add(h * 32 + 16 * half)), hshift), mask2);
        _mm512_sub_epi32(_mm512_or_si512(l, _mm512_slli_epi32::<4>(hb)), bias)
    }
}

/// Shared body of Q4_K and Q5_K (see `avx2::k4_block`); `qh` is null for Q4_K.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k4_block(b: *const u8, qh: *const u8, qs: *const u8, xb: *const f32, acc: &mut [__m512; 2]) {
    // SAFETY: the caller passes a whole block and its 256 floats of x.
    unsafe {
        let (d, dmin) = (f16_at(b), f16_at(b.add(2)));
        let (sc, mn) = k4_scales(std::slice::from_raw_parts(b.add(4), 12));
        for c in 0..4 {
            let (s_lo, s_hi) = (2 * c, 2 * c + 1);
            let a_lo = _mm512_set1_ps(d * sc[s_lo] as f32);
            let m_lo = _mm512_set1_ps(dmin * mn[s_lo] as f32);
            let a_hi = _mm512_set1_ps(d * sc[s_hi] as f32);
            let m_hi = _mm512_set1_ps(dmin * mn[s_hi] as f32);
            for k in 0..2 {
                let (lo, hi) = k4_codes(qs, qh, c, k);
                let w_lo = _mm512_fmsub_ps(_mm512_cvtepi32_ps(lo), a_lo, m_lo);
                let w_hi = _mm512_fmsub_ps(_mm512_cvtepi32_ps(hi), a_hi, m_hi);
                acc[0] = _mm512_fmadd_ps(w_lo, x16(xb.add(c * 64 + 16 * k)), acc[0]);
                acc[1] = _mm512_fmadd_ps(w_hi, x16(xb.add(c * 64 + 32 + 16 * k)), acc[1]);
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_k(r: *const u8, x: *const f32, nb: usize) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block i spans r[144i..144i+144], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 144);
            prefetch_block(b, 144);
            k4_block(b, std::ptr::null(), b.add(16), x.add(i * 256), &mut acc);
        }
    }
    _mm512_add_ps(acc[0], acc[1])
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q5_k(r: *const u8, x: *const f32, nb: usize) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block i spans r[176i..176i+176], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 176);
            prefetch_block(b, 176);
            k4_block(b, b.add(16), b.add(48), x.add(i * 256), &mut acc);
        }
    }
    _mm512_add_ps(acc[0], acc[1])
}

/// Q6_K (layout in `avx2::q6_k`): 16 elements share one 8-bit scale, so one
/// vector of codes is scaled once.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q6_k(r: *const u8, x: *const f32, nb: usize) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 2];
    for i in 0..nb {
        // SAFETY: block i spans r[210i..210i+210], x[256i..256i+256].
        unsafe {
            let b = r.add(i * 210);
            prefetch_block(b, 210);
            let (ql, qh, sc) = (b, b.add(128), b.add(192));
            let d = f16_at(b.add(208));
            let xb = x.add(i * 256);
            for h in 0..2 {
                for t in 0..4 {
                    for (half, acc_half) in acc.iter_mut().enumerate() {
                        let q = q6_k_codes(ql, qh, h, t, half);
                        let scale = d * (*sc.add(h * 8 + t * 2 + half) as i8) as f32;
                        let w = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(scale));
                        *acc_half = _mm512_fmadd_ps(w, x16(xb.add(h * 128 + t * 32 + 16 * half)), *acc_half);
                    }
                }
            }
        }
    }
    _mm512_add_ps(acc[0], acc[1])
}

/// The 2-bit codes of elements e0..e0+16 of a Q2_K/Q3_K super-block whose 64 `qs` bytes are at
/// `qs`: element e is bit pair (e % 128) / 32 of byte e % 32 of half e / 128 (e0 a multiple of 16).
///
/// # Safety
/// AVX-512F; `qs` holds 64 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn k_plane2(qs: *const u8, e0: usize) -> __m512i {
    // SAFETY: bytes e0 % 32 .. +16 of one 32-byte half, inside the 64 the caller guarantees.
    let v = unsafe { u8x16(qs.add(e0 / 128 * 32 + e0 % 32)) };
    _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(2 * (e0 % 128 / 32) as i32)), _mm512_set1_epi32(3))
}

/// Dequantizes a checked row with the float operations of `blocks.rs` (gguf-py's, in its order:
/// a product and a difference stay two roundings, no fused multiply-add), so the values are
/// bit-identical to it, 16 at a time; `false` for the types without a vector decoder here.
/// The matmul path (prefill) decodes a row per weight row and tile: for expert matrices with
/// few tokens each, the scalar decoder was most of the product's time.
///
/// # Safety
/// AVX-512F, AVX2, FMA and F16C must be available; `row` holds `out.len()` elements of `ty`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn dequantize(ty: GgmlType, row: &[u8], out: &mut [f32]) -> bool {
    let nb = out.len() / ty.block_size();
    debug_assert_eq!(row.len(), nb * ty.type_size());
    let (r, o) = (row.as_ptr(), out.as_mut_ptr());
    // SAFETY: block i of the row and its elements of out are in bounds per the contract.
    unsafe {
        match ty {
            GgmlType::Q8_0 => {
                for i in 0..nb {
                    let (b, ob) = (r.add(i * 34), o.add(i * 32));
                    let d = _mm512_set1_ps(f16_at(b));
                    for k in 0..2 {
                        let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2 + 16 * k).cast())));
                        _mm512_storeu_ps(ob.add(16 * k), _mm512_mul_ps(q, d));
                    }
                }
            }
            GgmlType::Q4_0 => {
                for i in 0..nb {
                    let (b, ob) = (r.add(i * 18), o.add(i * 32));
                    let d = _mm512_set1_ps(f16_at(b));
                    let (lo, hi) = q4_0_codes(b);
                    _mm512_storeu_ps(ob, _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)));
                    _mm512_storeu_ps(ob.add(16), _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)));
                }
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let q5 = ty == GgmlType::Q5_K;
                let (block, qs_at) = if q5 { (176, 48) } else { (144, 16) };
                for i in 0..nb {
                    let (b, ob) = (r.add(i * block), o.add(i * 256));
                    let (d, dmin) = (f16_at(b), f16_at(b.add(2)));
                    let (sc, mn) = k4_scales(std::slice::from_raw_parts(b.add(4), 12));
                    let qh = if q5 { b.add(16) } else { std::ptr::null() };
                    // w = (d·sc)·q − dmin·mn, the sub-block's two products rounded first.
                    let a = |sub: usize| _mm512_set1_ps(d * sc[sub] as f32);
                    let m = |sub: usize| _mm512_set1_ps(dmin * mn[sub] as f32);
                    for c in 0..4 {
                        for k in 0..2 {
                            let (lo, hi) = k4_codes(b.add(qs_at), qh, c, k);
                            for (sub, q) in [(2 * c, lo), (2 * c + 1, hi)] {
                                let w = _mm512_sub_ps(_mm512_mul_ps(a(sub), _mm512_cvtepi32_ps(q)), m(sub));
                                _mm512_storeu_ps(ob.add(32 * sub + 16 * k), w);
                            }
                        }
                    }
                }
            }
            GgmlType::Q6_K => {
                for i in 0..nb {
                    let (b, ob) = (r.add(i * 210), o.add(i * 256));
                    let (ql, qh, sc) = (b, b.add(128), b.add(192));
                    let d = f16_at(b.add(208));
                    for h in 0..2 {
                        for t in 0..4 {
                            for half in 0..2 {
                                let q = q6_k_codes(ql, qh, h, t, half);
                                let s = _mm512_set1_ps(d * (*sc.add(h * 8 + t * 2 + half) as i8) as f32);
                                _mm512_storeu_ps(
                                    ob.add(h * 128 + t * 32 + 16 * half),
                                    _mm512_mul_ps(s, _mm512_cvtepi32_ps(q)),
                                );
                            }
                        }
                    }
                }
            }
            // Sixteen elements at a time, which share their sub-block e0 / 16.
            GgmlType::Q2_K => {
                // w = (d·(s & 15))·q − dmin·(s >> 4), products rounded first.
                for i in 0..nb {
                    let (b, ob) = (r.add(i * 84), o.add(i * 256));
                    let (d, dmin) = (f16_at(b.add(80)), f16_at(b.add(82)));
                    for e0 in (0..256).step_by(16) {
                        let s = *b.add(e0 / 16);
                        let dl = _mm512_set1_ps(d * (s & 0xF) as f32);
                        let ml = _mm512_set1_ps(dmin * (s >> 4) as f32);
                        let q = k_plane2(b.add(16), e0);
                        _mm512_storeu_ps(ob.add(e0), _mm512_sub_ps(_mm512_mul_ps(dl, _mm512_cvtepi32_ps(q)), ml));
                    }
                }
            }
            GgmlType::Q3_K => {
                // w = (d·(scale − 32))·q, q = low − 4 where the (inverted) high bit is clear.
                for i in 0..nb {
                    let (b, ob) = (r.add(i * 110), o.add(i * 256));
                    let d = f16_at(b.add(108));
                    let sc = q3_k_scale_bytes(std::slice::from_raw_parts(b.add(96), 12));
                    for e0 in (0..256).step_by(16) {
                        let dl = _mm512_set1_ps(d * (sc[e0 / 16] as i32 - 32) as f32);
                        let high = _mm512_and_si512(
                            _mm512_srlv_epi32(u8x16(b.add(e0 % 32)), _mm512_set1_epi32((e0 / 32) as i32)),
                            _mm512_set1_epi32(1),
                        );
                        let q = _mm512_sub_epi32(
                            _mm512_add_epi32(k_plane2(b.add(32), e0), _mm512_slli_epi32::<2>(high)),
                            _mm512_set1_epi32(4),
                        );
                        _mm512_storeu_ps(ob.add(e0), _mm512_mul_ps(dl, _mm512_cvtepi32_ps(q)));
                    }
                }
            }
            GgmlType::IQ4_NL | GgmlType::IQ4_XS => {
                // The sixteen levels as floats in one register, looked up by the 4-bit codes
                // (low nibbles: elements 0..16 of a 32-element block, high: 16..32).
                let table = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr().cast())));
                let mask = _mm512_set1_epi32(0xF);
                let levels = |p: *const u8| {
                    let v = u8x16(p);
                    (
                        _mm512_permutexvar_ps(_mm512_and_si512(v, mask), table),
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table),
                    )
                };
                if ty == GgmlType::IQ4_NL {
                    // w = d·level.
                    for i in 0..nb {
                        let (b, ob) = (r.add(i * 18), o.add(i * 32));
                        let d = _mm512_set1_ps(f16_at(b));
                        let (lo, hi) = levels(b.add(2));
                        _mm512_storeu_ps(ob, _mm512_mul_ps(d, lo));
                        _mm512_storeu_ps(ob.add(16), _mm512_mul_ps(d, hi));
                    }
                } else {
                    // w = (d·scale)·level, the sub-block's product rounded first.
                    for i in 0..nb {
                        let (b, ob) = (r.add(i * 136), o.add(i * 256));
                        let d = f16_at(b);
                        let ls = iq4_xs_scales(std::slice::from_raw_parts(b, 8));
                        for (ib, &l) in ls.iter().enumerate() {
                            let s = _mm512_set1_ps(d * l as f32);
                            let (lo, hi) = levels(b.add(8 + 16 * ib));
                            _mm512_storeu_ps(ob.add(32 * ib), _mm512_mul_ps(s, lo));
                            _mm512_storeu_ps(ob.add(32 * ib + 16), _mm512_mul_ps(s, hi));
                        }
                    }
                }
            }
            _ => return false,
        }
    }
    true
}
