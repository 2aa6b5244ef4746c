//! AVX512_VNNI kernels for Q4_0, Q8_0, IQ4_NL, IQ4_XS and Q2_K…Q6_K: integer dot products of the codes with x
//! written per 32-element block as a 24-bit fixed-point number in three signed bytes (the
//! scheme of the affine kernel in `../avx512vnni.rs`, whose module documentation has the
//! exactness argument).
//!
//! The bf16 kernel (`avx512bf16.rs`) spends three `vdpbf16ps` per 32 codes (x in three bf16
//! parts) plus two table permutes per 64; here 64 bytes of codes (128 elements) cost two
//! nibble extractions, six `vpdpbusd` and four shifts for both halves, two subtractions
//! (centring), two conversions and two FMAs.
//!
//! Q4_0 (18-byte blocks: f16 d, 16 bytes whose low nibbles are elements 0..16 and high nibbles
//! 16..32): four blocks per step, their 64 code bytes gathered from two overlapping loads by
//! one two-source byte permute; lanes 4k..4k+4 belong to block k, whose low-nibble elements
//! are x 32k..32k+16 and high ones 32k+16..32k+32.
//!
//! Q6_K (per 128-element half h: 64 bytes `ql` of low nibbles, 32 bytes `qh` of 2-bit high
//! parts): a 64-byte load of `ql` gives the low four bits of elements 128h..128h+64 (low
//! nibbles) and 128h+64..128h+128 (high nibbles), in x's order; the high parts of each come
//! from `qh` (repeated in both halves of a vector) by a word shift that differs per half, so
//! each vector holds 6-bit codes 0..63 and Σ q·X over a lane's four products stays below 2^31
//! (4·63·127·2^16). Scales are per 16 elements: lanes 4k..4k+4 share one.
//!
//! Q4_K layout (32-byte chunk c of a super-block holds elements 64c..64c+32 in its low nibbles
//! and 64c+32..64c+64 in its high ones): a 64-byte load covers chunks 2h and 2h + 1, so its low
//! nibbles are [x 64(2h)..+32 | x 64(2h+1)..+32] in order and its high nibbles the other two
//! sub-blocks. Prepared x, per 128 elements (512 bytes): the digits X0, X1, X2 of the low-nibble
//! elements and of the high-nibble ones (six 64-byte vectors, alternating low, high), then per
//! 32-bit lane 8·Σ X of the lane's four elements, for the low and for the high vector (so that
//! Σ (q − 8)·X is exact in i32, see `k4` in `avx512bf16.rs` for why the codes are centred).

use std::arch::x86_64::*;

use super::GgmlType;
use super::avx512::{f16_at, prefetch_block};
use super::blocks::{self, KVALUES_IQ4NL, k4_scales_words, q3_k_scales};
use crate::avx512vnni::{dot_digits, group_scale, to_digits};
use crate::vbmi::{permute_bytes, permute2_bytes};

/// Prepared bytes per 128 elements.
const PAIR_BYTES: usize = 512;

/// x prepared for [`q4_0`] or [`q4_k`], once per product.
pub(super) struct FixedX {
    /// PAIR_BYTES per 128 elements (module documentation).
    bytes: Vec<u8>,
    /// 2^-e per 32-element sub-block (NaN for one holding a NaN or an infinity).
    factors: Vec<f32>,
    /// Σ x per 32 elements (Q2_K: per 16), in f32 (for the offsets of the minimums).
    sums: Vec<f32>,
}

/// Whether this module has a kernel for `ty`.
pub(super) fn handles(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q8_0
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS
            | GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

/// x (a whole number of `ty` blocks) prepared for `ty`'s kernel; elements after the last whole
/// 128 (Q4_0's last blocks when their count is not a multiple of four) are left to the kernel's
/// f32 tail.
///
/// # Safety
/// AVX-512F, AVX512BW, AVX512_VBMI, AVX512_VNNI, AVX2, FMA and F16C must be available;
/// `handles(ty)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn prepare(ty: GgmlType, x: &[f32]) -> FixedX {
    let n = x.len() / 128 * 128;
    // Where the 16 elements 32s + 16k..+16 of block s go in its 128-element step: the low- (0)
    // or high-nibble (1) vectors, and the byte offset in them.
    let place = |s: usize, k: usize| -> (usize, usize) {
        match ty {
            GgmlType::Q4_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => (k, 16 * (s % 4)),
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q6_K | GgmlType::Q8_0 => ((s % 4) / 2, 32 * (s % 2) + 16 * k),
            _ => (s % 2, 32 * ((s % 4) / 2) + 16 * k),
        }
    };
    // Q2_K's minimums are per 16 elements, Q4_K's and Q5_K's per 32.
    let width = if ty == GgmlType::Q2_K { 16 } else { 32 };
    // Codes up to 241 (the IQ4 types' table values + 128) or 255 (Q8_0's signed bytes + 128).
    let iq4 = matches!(ty, GgmlType::IQ4_NL | GgmlType::IQ4_XS);
    let wide = iq4 || ty == GgmlType::Q8_0;
    let sums = x[..n].chunks_exact(width).map(|c| c.iter().sum()).collect();
    let mut out = FixedX { bytes: vec![0; n / 128 * PAIR_BYTES], factors: vec![0.0; n / 32], sums };
    // SAFETY: sub-block s reads x[32s..32s+32] and writes 32 bytes of each digit vector of its
    // 128-element pair, inside `bytes`.
    unsafe {
        for s in 0..n / 32 {
            let v = [_mm512_loadu_ps(x.as_ptr().add(32 * s)), _mm512_loadu_ps(x.as_ptr().add(32 * s + 16))];
            let abs = [_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])];
            let largest = _mm512_reduce_max_ps(_mm512_max_ps(abs[0], abs[1]));
            let inf = _mm512_set1_ps(f32::INFINITY);
            let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(abs[0], inf) == 0xFFFF
                && _mm512_cmp_ps_mask::<_CMP_LT_OQ>(abs[1], inf) == 0xFFFF;
            let (scale, factor) = group_scale(largest, finite);
            // The IQ4 codes are the table values + 128 (1..241, unsigned for `vpdpbusd`) and
            // Q8_0's its signed bytes + 128 (0..255). i32 arithmetic wraps, so the sums of
            // (v + 128)·X may overflow: only the result Σ v·X = Σ (v + 128)·X − 128·Σ X must
            // fit. IQ4 lanes take eight products (`dot_digits`), |v| ≤ 127: x 2 bits shorter,
            // |X| ≤ 127·2^14, gives 8·127·127·2^14 < 2^31. Q8_0 lanes take four (`chain`),
            // |q| ≤ 128: 1 bit shorter, 4·128·127·2^15 < 2^31. Powers of two: exact.
            let (scale, factor) = if iq4 {
                (scale * 0.25, factor * 4.0)
            } else if ty == GgmlType::Q8_0 {
                (scale * 0.5, factor * 2.0)
            } else {
                (scale, factor)
            };
            out.factors[s] = factor;
            let step = out.bytes.as_mut_ptr().add((s / 4) * PAIR_BYTES);
            for (k, vk) in v.iter().enumerate() {
                let (vector, offset) = place(s, k);
                let at = step.add(64 * vector + offset);
                for (digit, d) in to_digits(*vk, scale).into_iter().enumerate() {
                    _mm_storeu_si128(at.add(128 * digit).cast(), _mm512_cvtepi32_epi8(d));
                }
            }
        }
        // 8·Σ X per lane of four elements (the IQ4 types and Q8_0: 128·Σ X), by the kernel's own
        // chain on codes of 8 (128). Where a block's low- and high-nibble lanes share its scale
        // (Q4_0, IQ4_NL, IQ4_XS), the kernel takes their sum (one subtraction per step), stored
        // in the first of the two slots.
        let centre = _mm512_set1_epi8(if wide { 128u8 as i8 } else { 8 });
        for p in 0..n / 128 {
            let xd = out.bytes.as_mut_ptr().add(p * PAIR_BYTES);
            let c = [chain(centre, xd), chain(centre, xd.add(64))];
            if matches!(ty, GgmlType::Q4_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS) {
                _mm512_storeu_si512(xd.add(384).cast(), _mm512_add_epi32(c[0], c[1]));
            } else {
                _mm512_storeu_si512(xd.add(384).cast(), c[0]);
                _mm512_storeu_si512(xd.add(448).cast(), c[1]);
            }
        }
    }
    out
}

/// Σ q·X per 32-bit lane (four products each) for the codes `codes` (bytes 0..16 each) and the
/// digits at `xd`, `xd + 128`, `xd + 256`: exact in i32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
unsafe fn chain(codes: __m512i, xd: *const u8) -> __m512i {
    // SAFETY: the caller guarantees the three 64-byte vectors.
    unsafe {
        let dig = |k: usize| _mm512_loadu_si512(xd.add(128 * k).cast());
        let acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, dig(0));
        let acc = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(acc), codes, dig(1));
        _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(acc), codes, dig(2))
    }
}

/// Σ w·x of one Q4_K (or, `Q5`, Q5_K) row of `nb` super-blocks (x prepared by [`prepare`]).
///
/// # Safety
/// As for [`prepare`]; `row` holds nb whole super-blocks and `fx` was prepared from nb·256
/// elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn k4<const Q5: bool>(row: &[u8], fx: &FixedX, nb: usize) -> f32 {
    // Q5_K: 32 bytes of fifth bits `qh` before the codes; codes 0..31 centred by 16.
    let (block, qs_at, centre) = if Q5 { (176, 48, 16.0) } else { (144, 16, 8.0) };
    debug_assert!(row.len() == nb * block && fx.factors.len() == nb * 8);
    // Q5_K's fifth bits of pair h: bits 4h, 4h + 2 (low nibbles of chunks 2h, 2h + 1) and 4h + 1,
    // 4h + 3 (high nibbles) of qh[l], brought to bit 4 by a word shift per 32-byte half.
    let fifth_shifts = |h: i16| [counts(4 * h - 4, 4 * h - 2), counts(4 * h - 3, 4 * h - 1)];
    let fifth = [fifth_shifts(0), fifth_shifts(1)];
    // Lane → sub-block (of a super-block's eight) for the low- and high-nibble vectors of
    // pair h: lanes 0..8 hold chunk 2h, 8..16 chunk 2h + 1.
    let lanes = |h: i32, high: i32| -> __m512i {
        let (a, b) = (4 * h + high, 4 * h + 2 + high);
        _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
    };
    let idx = [[lanes(0, 0), lanes(0, 1)], [lanes(1, 0), lanes(1, 1)]];
    let nibbles = _mm512_set1_epi8(0xF);
    let r = row.as_ptr();
    // SAFETY: super-block i spans r[block·i..block·(i+1)], fx's bytes of pairs 2i, 2i + 1, and
    // its factors and sums 8i..8i+8.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut offsets = _mm256_setzero_ps();
        let bit4 = _mm512_set1_epi8(0x10);
        for i in 0..nb {
            let b = r.add(i * block);
            prefetch_block(b, block);
            let (d, dmin) = (f16_at(b), f16_at(b.add(2)));
            let (sc, mn) = k4_scales_words(std::slice::from_raw_parts(b.add(4), 12));
            let widen = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
            let a = _mm256_mul_ps(widen(sc), _mm256_set1_ps(d));
            let m = _mm256_mul_ps(widen(mn), _mm256_set1_ps(dmin));
            // centre·a is exact, so each offset rounds once.
            let offset = _mm256_fmsub_ps(a, _mm256_set1_ps(centre), m);
            offsets = _mm256_fmadd_ps(offset, _mm256_loadu_ps(fx.sums.as_ptr().add(8 * i)), offsets);
            let f = _mm512_castps256_ps512(_mm256_mul_ps(a, _mm256_loadu_ps(fx.factors.as_ptr().add(8 * i))));
            let qh = if Q5 { twice(_mm256_loadu_si256(b.add(16).cast())) } else { _mm512_setzero_si512() };
            for (h, idx) in idx.iter().enumerate() {
                let v = _mm512_loadu_si512(b.add(qs_at + 64 * h).cast());
                let mut codes = [_mm512_and_si512(v, nibbles), _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibbles)];
                if Q5 {
                    for (half, c) in codes.iter_mut().enumerate() {
                        *c = _mm512_or_si512(*c, _mm512_and_si512(shift_words(qh, fifth[h][half]), bit4));
                    }
                }
                let xd = fx.bytes.as_ptr().add((2 * i + h) * PAIR_BYTES);
                for (half, codes) in codes.into_iter().enumerate() {
                    // centre·Σ X from the prepared 8·Σ X.
                    let c8 = _mm512_loadu_si512(xd.add(384 + 64 * half).cast());
                    let c = if Q5 { _mm512_slli_epi32::<1>(c8) } else { c8 };
                    let s = _mm512_sub_epi32(chain(codes, xd.add(64 * half)), c);
                    let scale = _mm512_permutexvar_ps(idx[half], f);
                    acc[half] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[half]);
                }
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + {
            let o = _mm256_add_ps(offsets, _mm256_permute2f128_ps::<1>(offsets, offsets));
            let o = _mm256_hadd_ps(o, o);
            _mm_cvtss_f32(_mm256_castps256_ps128(_mm256_hadd_ps(o, o)))
        }
    }
}

/// Σ w·x of one Q4_0 row (`NL`: IQ4_NL, the same layout with the codes through the
/// non-linear table) of `nb` blocks (x prepared by [`prepare`]; `x` itself for the blocks after
/// the last whole four).
///
/// Per step of four blocks: the codes' dot product with x's digits, one centring subtraction
/// (`prepare` stored 8·Σ X of both halves together), the four blocks' d (a byte permute of the
/// first load, one conversion) times x's factors, permuted to the blocks' lanes, one conversion
/// and one FMA into the accumulator of the step's parity.
///
/// # Safety
/// As for [`prepare`]; `row` holds nb whole blocks and `fx` was prepared from `x`, nb·32
/// elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4_0<const NL: bool>(row: &[u8], x: &[f32], fx: &FixedX, nb: usize) -> f32 {
    debug_assert!(row.len() == nb * 18 && x.len() == nb * 32);
    // Code byte j of block k (k < 3: byte 18k + 2 + j of the first load; block 3: byte
    // 54 + 2 + j − 8 of the second, which starts 8 bytes later and so stays inside the four
    // blocks).
    let codes: [u8; 64] = std::array::from_fn(|i| {
        let (k, j) = (i / 16, i % 16);
        (if k < 3 { 18 * k + 2 + j } else { 64 + 48 + j }) as u8
    });
    // The four f16 scales, from the first load.
    let scales: [u8; 64] = std::array::from_fn(|i| if i < 8 { (18 * (i / 2) + i % 2) as u8 } else { 0 });
    let r = row.as_ptr();
    let steps = nb / 4;
    // SAFETY: step p reads row bytes 72p..72p+72, fx's bytes of step p and factors 4p..4p+4;
    // the tail reads its blocks and x.
    unsafe {
        let codes = _mm512_loadu_si512(codes.as_ptr().cast());
        let scales = _mm512_loadu_si512(scales.as_ptr().cast());
        let lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let nibbles = _mm512_set1_epi8(0xF);
        let table = iq4_table();
        // Step p's term: its blocks' Σ (q − 8)·X (exact: |Σ q·X| < 2^30 per lane of eight
        // products), converted, and each lane's scale.
        let term = |p: usize| {
            let b = r.add(72 * p);
            let first = _mm512_loadu_si512(b.cast());
            let v = permute2_bytes(first, codes, _mm512_loadu_si512(b.add(8).cast()));
            let (lo, hi) = nibble_codes::<NL>(v, nibbles, table);
            let xd = fx.bytes.as_ptr().add(p * PAIR_BYTES);
            let s = _mm512_sub_epi32(dot_digits(lo, hi, xd), _mm512_loadu_si512(xd.add(384).cast()));
            let d = _mm_cvtph_ps(_mm512_castsi512_si128(permute_bytes(scales, first)));
            let f = _mm_mul_ps(d, _mm_loadu_ps(fx.factors.as_ptr().add(4 * p)));
            (_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(f)))
        };
        // Even steps into acc0, odd ones into acc1, two at a time so that both stay in
        // registers.
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut p = 0;
        while p + 2 <= steps {
            // The 144 bytes of these two steps, PREFETCH_DIST ahead.
            prefetch_block(r.wrapping_add(72 * p), 144);
            let (t0, s0) = term(p);
            let (t1, s1) = term(p + 1);
            acc0 = _mm512_fmadd_ps(t0, s0, acc0);
            acc1 = _mm512_fmadd_ps(t1, s1, acc1);
            p += 2;
        }
        if p < steps {
            let (t0, s0) = term(p);
            acc0 = _mm512_fmadd_ps(t0, s0, acc0);
        }
        let total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        let ty = if NL { GgmlType::IQ4_NL } else { GgmlType::Q4_0 };
        tail_blocks(ty, row, x, steps * 4, total)
    }
}

/// `total` plus Σ w·x over the 32-element blocks `first..` of a `ty` row (the blocks after a
/// kernel's last whole step of four), dequantized and dotted in f32.
fn tail_blocks(ty: GgmlType, row: &[u8], x: &[f32], first: usize, mut total: f32) -> f32 {
    let bs = ty.type_size();
    for i in first..x.len() / 32 {
        let mut w = [0f32; 32];
        blocks::dequantize(ty, &row[bs * i..bs * (i + 1)], &mut w);
        total += w.iter().zip(&x[32 * i..32 * i + 32]).map(|(a, b)| a * b).sum::<f32>();
    }
    total
}

/// Σ w·x of one Q8_0 row of `nb` blocks (x prepared by [`prepare`]; `x` itself for the blocks
/// after the last whole four).
///
/// Q8_0 (34-byte blocks: f16 d, 32 signed bytes; x one bit shorter than for Q4_0, see
/// [`prepare`]): a step of four blocks is 136 bytes, read as
/// three 64-byte loads at 0, 64 and 72 (the last ends at the step's end). Two byte permutes
/// gather the code vectors of blocks 0, 1 and 2, 3, a third the four d; each code byte's sign
/// bit flipped makes it q + 128 for `vpdpbusd`, and the chains with x's digits less the prepared
/// 128·Σ X give Σ q·X per lane (exact: the sums wrap, the result fits). Lanes 0..8 of a vector
/// belong to its first block, 8..16
/// to its second: their scale is that block's d times x's factor.
///
/// # Safety
/// As for [`prepare`]; `row` holds nb whole blocks and `fx` was prepared from `x`, nb·32
/// elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q8_0(row: &[u8], x: &[f32], fx: &FixedX, nb: usize) -> f32 {
    debug_assert!(row.len() == nb * 34 && x.len() == nb * 32);
    // Byte i of code vector 0: byte 2 + i (block 0) or 36 + (i − 32) (block 1) of the step, from
    // the load at 0 (indices < 64) or the one at 64 (64 + offset). Vector 1: bytes 70..102 from
    // the load at 64, 104..136 from the one at 72.
    let first: [u8; 64] = std::array::from_fn(|i| (if i < 32 { 2 + i } else { 4 + i }) as u8);
    let second: [u8; 64] = std::array::from_fn(|i| (if i < 32 { 6 + i } else { 64 + i }) as u8);
    // The four d: bytes 0, 1, 34, 35 of the load at 0 and 68, 69, 102, 103 (4, 5, 38, 39 of the
    // load at 64).
    let ds: [u8; 64] = std::array::from_fn(|i| [0, 1, 34, 35, 68, 69, 102, 103].get(i).copied().unwrap_or(0));
    let r = row.as_ptr();
    let steps = nb / 4;
    // SAFETY: step p reads row bytes 136p..136p+136, fx's bytes of step p and factors 4p..4p+4;
    // the tail reads its blocks and x.
    unsafe {
        let (first, second, ds) = (
            _mm512_loadu_si512(first.as_ptr().cast()),
            _mm512_loadu_si512(second.as_ptr().cast()),
            _mm512_loadu_si512(ds.as_ptr().cast()),
        );
        let sign = _mm512_set1_epi8(0x80u8 as i8);
        let lanes = [
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
            _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
        ];
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for p in 0..steps {
            let b = r.add(136 * p);
            prefetch_block(b, 136);
            let (l0, l64, l72) = (
                _mm512_loadu_si512(b.cast()),
                _mm512_loadu_si512(b.add(64).cast()),
                _mm512_loadu_si512(b.add(72).cast()),
            );
            let codes = [
                _mm512_xor_si512(permute2_bytes(l0, first, l64), sign),
                _mm512_xor_si512(permute2_bytes(l64, second, l72), sign),
            ];
            let d = _mm_cvtph_ps(_mm512_castsi512_si128(permute2_bytes(l0, ds, l64)));
            let f = _mm512_castps128_ps512(_mm_mul_ps(d, _mm_loadu_ps(fx.factors.as_ptr().add(4 * p))));
            let xd = fx.bytes.as_ptr().add(p * PAIR_BYTES);
            let term = |v: usize| {
                let s =
                    _mm512_sub_epi32(chain(codes[v], xd.add(64 * v)), _mm512_loadu_si512(xd.add(384 + 64 * v).cast()));
                (_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(lanes[v], f))
            };
            let (t0, s0) = term(0);
            let (t1, s1) = term(1);
            acc0 = _mm512_fmadd_ps(t0, s0, acc0);
            acc1 = _mm512_fmadd_ps(t1, s1, acc1);
        }
        let total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        tail_blocks(GgmlType::Q8_0, row, x, steps * 4, total)
    }
}

/// The IQ4 table values + 128 (unsigned bytes 1..241), in each 128-bit lane for `vpshufb`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
fn iq4_table() -> __m512i {
    let t: [u8; 16] = std::array::from_fn(|i| (KVALUES_IQ4NL[i] as i16 + 128) as u8);
    // SAFETY: 16 readable bytes.
    _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(t.as_ptr().cast()) })
}

/// The low- and high-nibble codes of 64 code bytes: the nibbles themselves (Q4_0, centred by 8
/// later), or (`NL`) their IQ4 table values + 128 (centred by 128 later).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
fn nibble_codes<const NL: bool>(v: __m512i, nibbles: __m512i, table: __m512i) -> (__m512i, __m512i) {
    let (lo, hi) = (_mm512_and_si512(v, nibbles), _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibbles));
    if NL { (_mm512_shuffle_epi8(table, lo), _mm512_shuffle_epi8(table, hi)) } else { (lo, hi) }
}

/// Σ w·x of one IQ4_XS row of `nb` super-blocks (x prepared by [`prepare`]).
///
/// A super-block (136 bytes: f16 d, 16 bits of high scale bits, 4 bytes of low ones, 128 code
/// bytes) is eight of IQ4_NL's blocks with the codes contiguous (sub-block j: bytes 16j..16j+16,
/// low nibbles elements 32j..32j+16, high ones 32j+16..32j+32) and a 6-bit scale ls − 32 each:
/// two steps of four sub-blocks, each one 64-byte load (no permute), the codes through the
/// table, the scales (d·(ls − 32), as gguf-py multiplies them, times x's factors) worked out
/// per super-block.
///
/// # Safety
/// As for [`prepare`]; `row` holds nb whole super-blocks and `fx` was prepared from nb·256
/// elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn iq4_xs(row: &[u8], fx: &FixedX, nb: usize) -> f32 {
    debug_assert!(row.len() == nb * 136);
    let r = row.as_ptr();
    // SAFETY: super-block i reads row bytes 136i..136i+136, fx's bytes of steps 2i, 2i + 1 and
    // factors 8i..8i+8.
    unsafe {
        // Lane l of half h's vector belongs to sub-block 4h + l / 4.
        let lane_block = [
            _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
            _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
        ];
        // Sub-block j's scale bits: 4 at bit 4j of scales_l (bytes 4..8), 2 at bit 2j of
        // scales_h (bytes 2..4).
        let (low_at, high_at) =
            (_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
        let nibbles = _mm512_set1_epi8(0xF);
        let table = iq4_table();
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in 0..nb {
            let b = r.add(136 * i);
            prefetch_block(b, 136);
            let d = f16_at(b);
            // The eight ls − 32 of blocks::iq4_xs_scales at once, then (d·(ls − 32))·factor in
            // that order, as the scalar form multiplies them.
            let low = _mm256_srlv_epi32(_mm256_set1_epi32(b.add(4).cast::<i32>().read_unaligned()), low_at);
            let high = _mm256_srlv_epi32(_mm256_set1_epi32(b.add(2).cast::<u16>().read_unaligned() as i32), high_at);
            let ls = _mm256_or_si256(
                _mm256_and_si256(low, _mm256_set1_epi32(15)),
                _mm256_slli_epi32::<4>(_mm256_and_si256(high, _mm256_set1_epi32(3))),
            );
            let ls = _mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32)));
            let scales = _mm512_castps256_ps512(_mm256_mul_ps(
                _mm256_mul_ps(_mm256_set1_ps(d), ls),
                _mm256_loadu_ps(fx.factors.as_ptr().add(8 * i)),
            ));
            let term = |h: usize| {
                let v = _mm512_loadu_si512(b.add(8 + 64 * h).cast());
                let (lo, hi) = nibble_codes::<true>(v, nibbles, table);
                let xd = fx.bytes.as_ptr().add((2 * i + h) * PAIR_BYTES);
                // Σ (v + 128)·X − 128·Σ X = Σ v·X, exact (|Σ (v + 128)·X| < 2^31 per lane).
                let s = _mm512_sub_epi32(dot_digits(lo, hi, xd), _mm512_loadu_si512(xd.add(384).cast()));
                (_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(lane_block[h], scales))
            };
            let (t0, s0) = term(0);
            let (t1, s1) = term(1);
            acc0 = _mm512_fmadd_ps(t0, s0, acc0);
            acc1 = _mm512_fmadd_ps(t1, s1, acc1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }
}

/// Σ w·x of one Q6_K, Q3_K or Q2_K row (`KIND`: [`Q6`], [`Q3`], [`Q2`]) of `nb` super-blocks
/// (x prepared by [`prepare`]): the types with a scale per 16 elements.
///
/// Q3_K (110-byte super-blocks: 32 bytes `hmask`, 64 bytes `qs`, 12 bytes of 6-bit scales, f16
/// d): per half h, `qs[32h..32h + 32]` twice gives the low two bits of elements 128h + 32s + l
/// (bits 2s of byte l, s = 0, 1 in the low vector, 2, 3 in the high one) and `hmask` twice the
/// third (bit 4h + s of byte l); codes 0..7, centred by 4.
///
/// Q2_K (84-byte super-blocks: 16 bytes of (scale, min) nibble pairs, 64 bytes `qs`, f16 d,
/// f16 dmin): the low two bits as Q3_K's, no third; codes 0..3 centred by 2, and the minimums
/// through the offsets (2a − m)·Σ x per 16 elements, as in the bf16 kernel.
///
/// # Safety
/// As for [`prepare`]; `row` holds nb whole super-blocks and `fx` was prepared from nb·256
/// elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn sixteen<const KIND: u8>(row: &[u8], fx: &FixedX, nb: usize) -> f32 {
    let (q3, q2) = (KIND == Q3, KIND == Q2);
    let block = [210, 110, 84][KIND as usize];
    debug_assert!(row.len() == nb * block && fx.factors.len() == nb * 8);
    // Per half h and vector (low: elements 128h..+64; high: 128h+64..+128): each lane's scale
    // (one per 16 elements) and x factor (one per 32).
    let lanes = |per: usize, first: usize| -> __m512i {
        let v: [i32; 16] = std::array::from_fn(|l| (first + l / per) as i32);
        // SAFETY: 16 i32 are 64 bytes.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    };
    let sidx = [[lanes(4, 0), lanes(4, 4)], [lanes(4, 8), lanes(4, 12)]];
    let fidx = [[lanes(8, 0), lanes(8, 2)], [lanes(8, 4), lanes(8, 6)]];
    // Q6_K: word shifts that bring qh's bits 2t, 2t + 1 to bits 4, 5 for the two 32-element
    // halves of each vector: t = 0, 1 (low nibbles), 2, 3 (high nibbles).
    let q6_high = [counts(-4, -2), counts(0, 2)];
    // Q3_K: qs's bits 2s, 2s + 1 to bits 0, 1; hmask's bit 4h + s to bit 2.
    let q3_low = [counts(0, 2), counts(4, 6)];
    let q3_high = [[counts(-2, -1), counts(0, 1)], [counts(2, 3), counts(4, 5)]];
    let qs_at = if q2 { 16 } else { 32 };
    let (nibbles, top) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(0x30));
    let (two, third) = (_mm512_set1_epi8(0x3), _mm512_set1_epi8(0x4));
    let r = row.as_ptr();
    // SAFETY: super-block i spans r[block·i..block·(i+1)], fx's bytes of steps 2i, 2i + 1 and
    // its factors 8i..8i+8.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut offsets = _mm512_setzero_ps();
        for i in 0..nb {
            let b = r.add(i * block);
            prefetch_block(b, block);
            let sc = if q2 {
                let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.cast()));
                let a = _mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(0xF)));
                let a = _mm512_mul_ps(a, _mm512_set1_ps(f16_at(b.add(80))));
                let m = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(sc));
                let m = _mm512_mul_ps(m, _mm512_set1_ps(f16_at(b.add(82))));
                // 2·a is exact, so each offset rounds once.
                let offset = _mm512_fmsub_ps(a, _mm512_set1_ps(2.0), m);
                offsets = _mm512_fmadd_ps(offset, _mm512_loadu_ps(fx.sums.as_ptr().add(16 * i)), offsets);
                a
            } else if q3 {
                let (first, second) = q3_k_scales(std::slice::from_raw_parts(b.add(96), 12));
                let sc = _mm512_cvtepu8_epi32(_mm_set_epi64x(second as i64, first as i64));
                let sc = _mm512_cvtepi32_ps(_mm512_sub_epi32(sc, _mm512_set1_epi32(32)));
                _mm512_mul_ps(sc, _mm512_set1_ps(f16_at(b.add(108))))
            } else {
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(192).cast())));
                _mm512_mul_ps(sc, _mm512_set1_ps(f16_at(b.add(208))))
            };
            let fac = _mm512_castps256_ps512(_mm256_loadu_ps(fx.factors.as_ptr().add(8 * i)));
            let hmask = if q3 { twice(_mm256_loadu_si256(b.cast())) } else { _mm512_setzero_si512() };
            for h in 0..2 {
                let codes: [__m512i; 2] = if q3 || q2 {
                    let qs = twice(_mm256_loadu_si256(b.add(qs_at + 32 * h).cast()));
                    std::array::from_fn(|half| {
                        let low = _mm512_and_si512(shift_words(qs, q3_low[half]), two);
                        if q2 {
                            low
                        } else {
                            _mm512_or_si512(low, _mm512_and_si512(shift_words(hmask, q3_high[h][half]), third))
                        }
                    })
                } else {
                    let ql = _mm512_loadu_si512(b.add(64 * h).cast());
                    let qh = twice(_mm256_loadu_si256(b.add(128 + 32 * h).cast()));
                    let low = [_mm512_and_si512(ql, nibbles), _mm512_and_si512(_mm512_srli_epi16::<4>(ql), nibbles)];
                    std::array::from_fn(|half| {
                        _mm512_or_si512(low[half], _mm512_and_si512(shift_words(qh, q6_high[half]), top))
                    })
                };
                let xd = fx.bytes.as_ptr().add((2 * i + h) * PAIR_BYTES);
                for (half, codes) in codes.into_iter().enumerate() {
                    // Σ (q − centre)·X, centre·Σ X from the prepared 8·Σ X (Q6_K: 32, Q3_K: 4,
                    // Q2_K: 2; exact shifts of a multiple of 8).
                    let c8 = _mm512_loadu_si512(xd.add(384 + 64 * half).cast());
                    let centre = match KIND {
                        Q3 => _mm512_srai_epi32::<1>(c8),
                        Q2 => _mm512_srai_epi32::<2>(c8),
                        _ => _mm512_slli_epi32::<2>(c8),
                    };
                    let s = _mm512_sub_epi32(chain(codes, xd.add(64 * half)), centre);
                    let scale = _mm512_mul_ps(
                        _mm512_permutexvar_ps(sidx[h][half], sc),
                        _mm512_permutexvar_ps(fidx[h][half], fac),
                    );
                    acc[half] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[half]);
                }
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), offsets))
    }
}

/// [`sixteen`]'s kinds.
pub(super) const Q6: u8 = 0;
pub(super) const Q3: u8 = 1;
pub(super) const Q2: u8 = 2;

/// A per-word shift of a vector: its first 16 words right by `a` (left by −a when negative), the
/// other 16 by `b` (a count per 32-byte half), as two vectors of counts made once.
#[derive(Clone, Copy)]
struct WordShift {
    right: __m512i,
    left: __m512i,
}

/// [`WordShift`] for counts `a` (words 0..16) and `b` (16..32).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
fn counts(a: i16, b: i16) -> WordShift {
    let count = |w: usize| if w < 16 { a } else { b };
    let right: [i16; 32] = std::array::from_fn(|w| count(w).max(0));
    let left: [i16; 32] = std::array::from_fn(|w| (-count(w)).max(0));
    // SAFETY: 32 i16 are 64 bytes.
    unsafe {
        WordShift { right: _mm512_loadu_si512(right.as_ptr().cast()), left: _mm512_loadu_si512(left.as_ptr().cast()) }
    }
}

/// The 32 bytes twice.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
fn twice(v: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(v), v)
}

/// Each 16-bit word of `v` shifted by its count. A byte receives bits from its neighbour in the
/// word (the high byte's low bits on a right shift, the low byte's high bits on a left one),
/// which the callers mask off: they keep, of each byte, only bits that came from that byte.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
fn shift_words(v: __m512i, by: WordShift) -> __m512i {
    _mm512_sllv_epi16(_mm512_srlv_epi16(v, by.right), by.left)
}
