//! AVX512_BF16 kernels for Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K and
//! Q6_K: 32 products per `vdpbf16ps`. (Q8_0 has none: an 8-bit code needs a conversion, not a
//! table lookup, and the f32 kernel already converts 16 codes in one instruction.)
//!
//! The f32 kernels of `avx512.rs` spend about four vector instructions per 16 weights on
//! widening, masking, converting and multiplying codes; on a small machine that, not memory,
//! bounds GGUF decode (Q4_K 11 GB/s on one core against 27 for the affine kernel). Here the
//! codes stay 16-bit: a byte widens to a word, a nibble or 6-bit code is looked up in a table of
//! bf16 values (`vpermw` / `vpermt2w`), and `vdpbf16ps` multiplies 32 of them with x and sums
//! pairs into 16 f32 lanes.
//!
//! Exactness: every code value (Q2_K: −2..1, Q3_K: −4..3, Q4_0, Q4_1 and Q4_K: −8..7, Q5_0,
//! Q5_1 and Q5_K: −16..15, Q6_K: −32..31, all centred; IQ4_NL/IQ4_XS: the levels −127..113) is
//! an integer of at most 7 significant bits,
//! so its bf16 value is exact, and bf16 × bf16 products are exact in f32. x is split once per
//! product into three bf16 parts (`hi = bf16(x)`, `mid = bf16(x − hi)`, `lo = bf16(x − hi −
//! mid)`, each difference exact), whose sum equals x to within 2⁻²⁷·|x|, below f32's own
//! rounding; each code is multiplied with all three. Two parts (the usual hi + lo) were measured
//! at 13× the logit error of the f32 kernels on the Q4_K_M fixture (docs/performance.md); three
//! match them. The instruction treats bf16 subnormals as zero (parts of an |x| below ~1e-30:
//! errors far below any f32 sum's rounding).

use std::arch::x86_64::*;

use super::GgmlType;
use super::avx512::{f16_at, prefetch_block};
use super::blocks::{self, KVALUES_IQ4NL, iq4_xs_scales, k4_scales_words, q3_k_scales};

/// x prepared for the kernels of this module, once per product (shared by all rows).
pub(super) struct SplitX {
    /// bf16 bits of `bf16(x)`, in the order the type's kernel reads x.
    hi: Vec<u16>,
    /// bf16 bits of `bf16(x − hi)`, same order.
    mid: Vec<u16>,
    /// bf16 bits of `bf16(x − hi − mid)`, same order.
    lo: Vec<u16>,
    /// Σ x over each run of `sum_width(ty)` elements (for the offsets of the types with
    /// minimums, see `k4`), in x's own order; empty for the others.
    sums: Vec<f32>,
}

/// Whether this module has a kernel for `ty`.
pub(super) fn handles(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q4_0 | Q4_1 | Q5_0 | Q5_1 | IQ4_NL | IQ4_XS | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
}

/// The types whose 32-element groups are stored as 16 bytes of nibbles (low: elements 0..16,
/// high: 16..32) and read two groups at a time.
fn nibble_groups(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q4_0 | Q4_1 | Q5_0 | Q5_1 | IQ4_NL | IQ4_XS)
}

/// The length of the runs of x whose sums `ty`'s kernel needs for its minimums, if it has any.
fn sum_width(ty: GgmlType) -> Option<usize> {
    use GgmlType::*;
    match ty {
        Q4_1 | Q5_1 | Q4_K | Q5_K => Some(32),
        Q2_K => Some(16),
        _ => None,
    }
}

/// x split into three bf16 parts (see the module documentation), in the order `ty`'s kernel
/// reads it, with Q4_K/Q5_K's sub-block sums.
///
/// # Safety
/// AVX-512F, AVX512BW, AVX512_VBMI and AVX512_BF16 must be available; `handles(ty)`; `x.len()` is a whole
/// number of `ty` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
pub(super) unsafe fn split(ty: GgmlType, x: &[f32]) -> SplitX {
    debug_assert!(handles(ty) && x.len().is_multiple_of(ty.block_size()));
    let n = x.len();
    let mut out = SplitX { hi: vec![0; n], mid: vec![0; n], lo: vec![0; n], sums: Vec::new() };
    // The source of each 16-element span of the output (spans never straddle a block).
    let source = |span: usize| -> usize {
        let e = span * 16;
        if !nibble_groups(ty) {
            return e;
        }
        // Read two groups at a time: [g0 low 16 | g1 low 16 | g0 high 16 | g1 high 16]; a last
        // odd group (a row of an odd number of 32-element blocks) keeps its order.
        let pair = e / 64;
        if (pair + 1) * 64 > n {
            return e;
        }
        let base = pair * 64;
        base + [0, 32, 16, 48][(e - base) / 16]
    };
    for span in 0..n / 16 {
        // SAFETY: span and its source are 16-element spans inside x and the outputs.
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr().add(source(span)));
            // Each difference is exact in f32 (x and its nearest bf16 share the exponent range).
            let hi = _mm512_cvtneps_pbh(v);
            let rest = _mm512_sub_ps(v, _mm512_cvtpbh_ps(hi));
            let mid = _mm512_cvtneps_pbh(rest);
            let lo = _mm512_cvtneps_pbh(_mm512_sub_ps(rest, _mm512_cvtpbh_ps(mid)));
            for (dst, part) in [(&mut out.hi, hi), (&mut out.mid, mid), (&mut out.lo, lo)] {
                let bits = std::mem::transmute::<__m256bh, __m256i>(part);
                _mm256_storeu_si256(dst.as_mut_ptr().add(span * 16).cast(), bits);
            }
        }
    }
    if let Some(width) = sum_width(ty) {
        out.sums = x.chunks_exact(width).map(|c| c.iter().sum()).collect();
    }
    out
}

/// Σ w·x of one row of `ty` (`x.len()` elements; `sx` is `split(ty, x)`).
///
/// # Safety
/// As for [`split`]; `row` holds `x.len()` elements of `ty`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
pub(super) unsafe fn dot(ty: GgmlType, row: &[u8], x: &[f32], sx: &SplitX) -> f32 {
    let nb = x.len() / ty.block_size();
    debug_assert_eq!(row.len(), nb * ty.type_size());
    debug_assert_eq!(sx.hi.len(), x.len());
    let (r, xs) = (row.as_ptr(), Parts { hi: sx.hi.as_ptr(), mid: sx.mid.as_ptr(), lo: sx.lo.as_ptr() });
    let sums = sx.sums.as_ptr();
    let (four, five) = (bf16_values(&Q4_0_VALUES), bf16_table(-16));
    // SAFETY: per the contract, each kernel reads nb blocks of the row and the matching
    // elements of x, hi, mid, lo and sums.
    unsafe {
        use GgmlType::*;
        let (row, x) = (Row { ty, r, nb }, x.as_ptr());
        match ty {
            Q4_0 => pairs::<18, 2, 0, false>(row, x, xs, sums, &four, 8.0),
            Q4_1 => pairs::<20, 4, 0, true>(row, x, xs, sums, &four, 8.0),
            Q5_0 => pairs::<22, 6, 2, false>(row, x, xs, sums, &five, 16.0),
            Q5_1 => pairs::<24, 8, 4, true>(row, x, xs, sums, &five, 16.0),
            IQ4_NL => pairs::<18, 2, 0, false>(row, x, xs, sums, &bf16_values(&KVALUES_IQ4NL), 0.0),
            IQ4_XS => iq4_xs(r, xs, nb),
            Q2_K => q2_k(r, xs, sums, nb),
            Q3_K => q3_k(r, xs, nb),
            Q4_K => k4::<false>(r, xs, sums, nb),
            Q5_K => k4::<true>(r, xs, sums, nb),
            Q6_K => q6_k(r, xs, nb),
            _ => unreachable!("split() was called with a type this module handles"),
        }
    }
}

/// 32 bf16 values from memory.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn bh32(p: *const u16) -> __m512bh {
    // SAFETY: the caller guarantees 32 readable values; __m512i and __m512bh are both 64 bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64-byte vectors of plain bits.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// Pointers to the three parts of a split x.
#[derive(Clone, Copy)]
struct Parts {
    hi: *const u16,
    mid: *const u16,
    lo: *const u16,
}

/// Σ over 32 products w·(hi + mid + lo) of x elements `e..e + 32`, summed in pairs into 16
/// lanes (smallest part first).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn dot32(w: __m512i, x: Parts, e: usize) -> __m512 {
    let w = as_bh(w);
    // SAFETY: the caller guarantees 32 readable values at e in each part.
    unsafe {
        let s = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, bh32(x.lo.add(e)));
        let s = _mm512_dpbf16_ps(s, w, bh32(x.mid.add(e)));
        _mm512_dpbf16_ps(s, w, bh32(x.hi.add(e)))
    }
}

/// A table of 32 words: the bf16 bits of `first + i` for i in 0..32.
fn bf16_table(first: i32) -> [u16; 32] {
    std::array::from_fn(|i| half::bf16::from_f32((first + i as i32) as f32).to_bits())
}

/// Per 16-bit lane: bits 0..4 of `low`, the other bits of `high`. Callers feed the result to a
/// table permute that reads only the index bits it needs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
fn merge_low_nibble(low: __m512i, high: __m512i) -> __m512i {
    merge_bits(low, high, 0xF)
}

/// Per 16-bit lane: the bits of `low` where `mask` is set, the other bits of `high` (one
/// `vpternlogd`, 0xE4 = "c ? a : b").
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
fn merge_bits(low: __m512i, high: __m512i, mask: i16) -> __m512i {
    _mm512_ternarylogic_epi32::<0xE4>(low, high, _mm512_set1_epi16(mask))
}

/// The values of Q4_0's codes: q − 8.
const Q4_0_VALUES: [i8; 16] = [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7];

/// A table of 32 words: the bf16 bits of `values[i % 16]`.
fn bf16_values(values: &[i8; 16]) -> [u16; 32] {
    std::array::from_fn(|i| half::bf16::from_f32(values[i % 16] as f32).to_bits())
}

/// A row: its type, first byte and number of blocks.
#[derive(Clone, Copy)]
struct Row {
    ty: GgmlType,
    r: *const u8,
    nb: usize,
}

/// The 32-element block types stored as an f16 scale d, Q4_1/Q5_1 an f16 minimum m, Q5_0/Q5_1 a
/// u32 of fifth bits `qh` (bit j: element j), and 16 bytes whose low nibbles are elements 0..16
/// and high nibbles 16..32 (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL; `BYTES` per block, the code bytes
/// at `CODES`, `qh` at `QH` or none for 0, m at 2 when `MIN`): w = d·table[q] (+ m), `table`
/// the bf16 code values (q − centre, or IQ4_NL's levels). Two blocks per step: one load, one
/// byte permute that zero-extends the pair's 32 code bytes to words (low nibbles [b0 0..16 |
/// b1 0..16], high nibbles [b0 16..32 | b1 16..32]: the order `split` laid x out in), one that
/// gathers the f16 scales (and minimums); lanes 0..8 of the sums scale by d0, 8..16 by d1.
///
/// A fifth bit goes to bit 4 of the lane's table index by a test against the lane's bit of the
/// block's `qh` half and a masked add (bit 4 is clear). A minimum is centred like `k4`'s: Σ w·x = d·Σ(q −
/// centre)·x + (m + centre·d)·Σ x, with the block sums of x.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn pairs<const BYTES: usize, const CODES: usize, const QH: usize, const MIN: bool>(
    row: Row,
    x: *const f32,
    xs: Parts,
    sums: *const f32,
    table: &[u16; 32],
    centre: f32,
) -> f32 {
    let Row { ty, r, nb } = row;
    // Byte 2w of the word vector is code byte w of the pair (block 0's at CODES.., block 1's at
    // BYTES + CODES..); odd bytes are zeroed by the mask.
    let codes: [u8; 64] = std::array::from_fn(|k| {
        let w = k / 2;
        (if w < 16 { CODES + w } else { BYTES + CODES + w - 16 }) as u8
    });
    // d0, d1, then m0, m1 in the low eight bytes.
    let scales: [u8; 64] =
        std::array::from_fn(|k| [0, 1, BYTES, BYTES + 1, 2, 3, BYTES + 2, BYTES + 3].get(k).map_or(0, |&v| v as u8));
    // Words of qh: lanes 0..16 the low half of block 0's, 16..32 of block 1's; then the high
    // halves. And each lane's bit of its half.
    let qh_word = |half: usize| -> [u16; 32] {
        std::array::from_fn(|w| ((if w < 16 { QH } else { BYTES + QH }) / 2 + half) as u16)
    };
    let (qh_low, qh_high) = (qh_word(0), qh_word(1));
    let lane_bit: [u16; 32] = std::array::from_fn(|w| 1 << (w % 16));
    // SAFETY: the tables are 32 words / 64 bytes; block pair p spans r[2·BYTES·p..] (the 64-byte
    // load is taken only where it stays inside the row, a masked one otherwise), x[64p..64p+64]
    // and sums[2p..2p+2].
    unsafe {
        let table = _mm512_loadu_si512(table.as_ptr().cast());
        let codes = _mm512_loadu_si512(codes.as_ptr().cast());
        let scales = _mm512_loadu_si512(scales.as_ptr().cast());
        let (qh_low, qh_high) =
            (_mm512_loadu_si512(qh_low.as_ptr().cast()), _mm512_loadu_si512(qh_high.as_ptr().cast()));
        let lane_bit = _mm512_loadu_si512(lane_bit.as_ptr().cast());
        let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let (nibble, sixteen) = (_mm512_set1_epi16(0xF), _mm512_set1_epi16(16));
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut offsets = _mm_setzero_ps();
        for p in 0..nb / 2 {
            let b = r.add(p * 2 * BYTES);
            prefetch_block(b, 2 * BYTES);
            // One 64-byte load where the row has 64 bytes from here (a masked load for every
            // pair measured 2× slower), a masked one at the row's end.
            let pair = if p * 2 * BYTES + 64 <= nb * BYTES {
                _mm512_loadu_si512(b.cast())
            } else {
                _mm512_maskz_loadu_epi8((1u64 << (2 * BYTES)) - 1, b.cast())
            };
            let v = _mm512_maskz_permutexvar_epi8(0x5555_5555_5555_5555, codes, pair);
            // A 4-bit table repeats its 16 values, so `vpermw` (which reads 5 index bits) needs
            // no mask on the low nibbles.
            let (mut lo, mut hi) = (v, _mm512_srli_epi16::<4>(v));
            if QH != 0 {
                lo = _mm512_and_si512(v, nibble);
                let (bits_lo, bits_hi) =
                    (_mm512_permutexvar_epi16(qh_low, pair), _mm512_permutexvar_epi16(qh_high, pair));
                lo = _mm512_mask_add_epi16(lo, _mm512_test_epi16_mask(bits_lo, lane_bit), lo, sixteen);
                hi = _mm512_mask_add_epi16(hi, _mm512_test_epi16_mask(bits_hi, lane_bit), hi, sixteen);
            }
            let lo = _mm512_permutexvar_epi16(lo, table);
            let hi = _mm512_permutexvar_epi16(hi, table);
            let e = p * 64;
            let s = _mm512_add_ps(dot32(lo, xs, e), dot32(hi, xs, e + 32));
            let dm = _mm_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi8(scales, pair)));
            let d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(dm));
            acc[p % 2] = _mm512_fmadd_ps(s, d, acc[p % 2]);
            if MIN {
                // Lanes 0, 1: m + centre·d of each block (centre·d exact, one rounding), times
                // the block's Σ x.
                let offset = _mm_fmadd_ps(dm, _mm_set1_ps(centre), _mm_movehl_ps(dm, dm));
                let block_sums = _mm_castpd_ps(_mm_load_sd(sums.add(2 * p).cast()));
                offsets = _mm_fmadd_ps(offset, block_sums, offsets);
            }
        }
        let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        if MIN {
            total += _mm_cvtss_f32(offsets) + _mm_cvtss_f32(_mm_movehdup_ps(offsets));
        }
        if nb % 2 == 1 {
            // The last block alone, in f32 (x of an odd last block is in its own order).
            let i = nb - 1;
            let mut w = [0f32; 32];
            blocks::dequantize(ty, std::slice::from_raw_parts(r.add(i * BYTES), BYTES), &mut w);
            total += w.iter().enumerate().map(|(j, wj)| wj * *x.add(i * 32 + j)).sum::<f32>();
        }
        total
    }
}

/// Q2_K (84-byte super-blocks of 256: 16 bytes of (scale, min) nibble pairs, 64 bytes of 2-bit
/// codes, f16 d, f16 dmin; element 128h + 32s + l is bits 2s..2s+2 of qs[32h + l], in the
/// 16-element sub-block 8h + 2s + l/16 with w = a·q − m, a = d·(sc & 15), m = dmin·(sc >> 4)).
/// Codes centred as in `k4` (q − 2, the offsets (2a − m)·Σ x per sub-block). A code is bits
/// 2s.. of its byte shifted down; the table repeats the four values, so `vpermw` needs no mask.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn q2_k(r: *const u8, xs: Parts, sums: *const f32, nb: usize) -> f32 {
    let table: [u16; 32] = std::array::from_fn(|i| half::bf16::from_f32((i & 3) as f32 - 2.0).to_bits());
    let scale_idx = sub_block_lanes();
    // SAFETY: the table is 32 words; super-block i spans r[84i..84i+84], x[256i..256i+256] and
    // sums[16i..16i+16].
    unsafe {
        let table = _mm512_loadu_si512(table.as_ptr().cast());
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut offsets = _mm512_setzero_ps();
        for i in 0..nb {
            let b = r.add(i * 84);
            prefetch_block(b, 84);
            let (d, dmin) = (f16_at(b.add(80)), f16_at(b.add(82)));
            let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.cast()));
            let a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(0xF))), _mm512_set1_ps(d));
            let m = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(sc)), _mm512_set1_ps(dmin));
            // 2·a is exact, so each offset rounds once.
            let offset = _mm512_fmsub_ps(a, _mm512_set1_ps(2.0), m);
            offsets = _mm512_fmadd_ps(offset, _mm512_loadu_ps(sums.add(i * 16)), offsets);
            for h in 0..2 {
                let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(b.add(16 + 32 * h).cast()));
                let codes = [v, _mm512_srli_epi16::<2>(v), _mm512_srli_epi16::<4>(v), _mm512_srli_epi16::<6>(v)];
                for (s, code) in codes.into_iter().enumerate() {
                    let w = _mm512_permutexvar_epi16(code, table);
                    let e = i * 256 + 128 * h + 32 * s;
                    let idx = _mm512_loadu_si512(scale_idx[4 * h + s].as_ptr().cast());
                    let scale = _mm512_permutexvar_ps(idx, a);
                    acc[s % 2] = _mm512_fmadd_ps(dot32(w, xs, e), scale, acc[s % 2]);
                }
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), offsets))
    }
}

/// Q3_K (110-byte super-blocks of 256: 32 bytes of high bits `hmask`, 64 bytes of 2-bit low
/// parts, 12 bytes of sixteen 6-bit scales, f16 d; element e = 128h + 32s + l has low bits
/// 2s..2s+2 of qs[32h + l] and high bit 4h + s of hmask[l], q = low + 4·high − 4 (−4..3), in the
/// 16-element sub-block 8h + 2s + l/16 with w = d·(scale − 32)·q). The high bit is shifted to
/// bit 2 and merged under the low two with one bit-select; the table reads index bits 0..3 only.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn q3_k(r: *const u8, xs: Parts, nb: usize) -> f32 {
    let table: [u16; 32] = std::array::from_fn(|i| half::bf16::from_f32((i & 7) as f32 - 4.0).to_bits());
    let scale_idx = sub_block_lanes();
    // SAFETY: the table is 32 words; super-block i spans r[110i..110i+110], x[256i..256i+256].
    unsafe {
        let table = _mm512_loadu_si512(table.as_ptr().cast());
        let mut acc = [_mm512_setzero_ps(); 2];
        for i in 0..nb {
            let b = r.add(i * 110);
            prefetch_block(b, 110);
            let d = f16_at(b.add(108));
            let (first, second) = q3_k_scales(std::slice::from_raw_parts(b.add(96), 12));
            let sc = _mm512_cvtepu8_epi32(_mm_set_epi64x(second as i64, first as i64));
            let a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sc, _mm512_set1_epi32(32))), _mm512_set1_ps(d));
            let hm = _mm512_cvtepu8_epi16(_mm256_loadu_si256(b.cast()));
            // High bit 4h + s at bit 2.
            let high = [
                _mm512_slli_epi16::<2>(hm),
                _mm512_slli_epi16::<1>(hm),
                hm,
                _mm512_srli_epi16::<1>(hm),
                _mm512_srli_epi16::<2>(hm),
                _mm512_srli_epi16::<3>(hm),
                _mm512_srli_epi16::<4>(hm),
                _mm512_srli_epi16::<5>(hm),
            ];
            for h in 0..2 {
                let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(b.add(32 + 32 * h).cast()));
                let low = [v, _mm512_srli_epi16::<2>(v), _mm512_srli_epi16::<4>(v), _mm512_srli_epi16::<6>(v)];
                for (s, low) in low.into_iter().enumerate() {
                    let w = _mm512_permutexvar_epi16(merge_bits(low, high[4 * h + s], 3), table);
                    let e = i * 256 + 128 * h + 32 * s;
                    let idx = _mm512_loadu_si512(scale_idx[4 * h + s].as_ptr().cast());
                    let scale = _mm512_permutexvar_ps(idx, a);
                    acc[s % 2] = _mm512_fmadd_ps(dot32(w, xs, e), scale, acc[s % 2]);
                }
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }
}

/// For each 32-element group g of a 256-element super-block (Q2_K, Q3_K, Q6_K: sub-blocks of
/// 16), the index of each sum lane's scale: lanes 0..8 of `dot32`'s sums cover elements 0..16,
/// sub-block 2g, lanes 8..16 sub-block 2g + 1.
fn sub_block_lanes() -> [[i32; 16]; 8] {
    std::array::from_fn(|g| std::array::from_fn(|lane| (2 * g + lane / 8) as i32))
}

/// IQ4_XS (136-byte super-blocks of 256: f16 d, 16 bits of scale high parts, 4 bytes of scale
/// low parts, 128 bytes of codes; 32-element sub-block s is stored as 16 bytes at 16s, low
/// nibbles elements 0..16 and high nibbles 16..32; w = d·(ls_s − 32)·values[q] with IQ4_NL's
/// levels). Two sub-blocks per step from one contiguous 32-byte load, laid out as Q4_0's pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn iq4_xs(r: *const u8, xs: Parts, nb: usize) -> f32 {
    let table = bf16_values(&KVALUES_IQ4NL);
    // SAFETY: the table is 32 words; super-block i spans r[136i..136i+136], x[256i..256i+256].
    unsafe {
        let table = _mm512_loadu_si512(table.as_ptr().cast());
        let mask = _mm512_set1_epi16(0xF);
        let mut acc = [_mm512_setzero_ps(); 2];
        for i in 0..nb {
            let b = r.add(i * 136);
            prefetch_block(b, 136);
            let d = f16_at(b);
            let ls = iq4_xs_scales(std::slice::from_raw_parts(b, 8));
            let mut a = [0f32; 8];
            let lsv = _mm256_cvtepi32_ps(_mm256_loadu_si256(ls.as_ptr().cast()));
            _mm256_storeu_ps(a.as_mut_ptr(), _mm256_mul_ps(lsv, _mm256_set1_ps(d)));
            for c in 0..4 {
                let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(b.add(8 + 32 * c).cast()));
                let lo = _mm512_permutexvar_epi16(_mm512_and_si512(v, mask), table);
                let hi = _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(v), table);
                let e = i * 256 + 64 * c;
                let s = _mm512_add_ps(dot32(lo, xs, e), dot32(hi, xs, e + 32));
                let scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a[2 * c]), _mm512_set1_ps(a[2 * c + 1]));
                acc[c % 2] = _mm512_fmadd_ps(s, scale, acc[c % 2]);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }
}

/// Q4_K and Q5_K (super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins,
/// Q5_K: 32 bytes of fifth bits `qh`, then 128 bytes of nibbles; 32-byte chunk c holds elements
/// 64c..64c+32 in its low nibbles and 64c+32..64c+64 in its high ones, whose fifth bits are bits
/// 2c and 2c+1 of qh[j]; w = a·q − m per 32-element sub-block, a = d·sc, m = dmin·mn).
///
/// The codes are centred (q − 8, or q − 16 for 5 bits; still exact in bf16) and the rest goes
/// through the sub-block sums of x: Σ w·x = a·Σ (q − 8)·x + (8a − m)·Σ x. Writing it as
/// a·Σ q·x − m·Σ x instead cancels two large terms (m is close to 8a for weights centred on zero,
/// and activations have dimensions of one sign), which measured 30× the f32 kernel's logit error
/// on the Q4_K_M fixture; centred, the second term is small.
///
/// A 5-bit code indexes a 32-word table with `vpermw`, which ignores the index's higher bits, so
/// the fifth bit is shifted to bit 4 and merged with one bit-select, unmasked.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn k4<const Q5: bool>(r: *const u8, xs: Parts, sums: *const f32, nb: usize) -> f32 {
    let (block, qs_at, centre) = if Q5 { (176, 48, 16) } else { (144, 16, 8) };
    let table = bf16_table(-centre);
    // SAFETY: the table is 32 words; super-block i spans r[block·i..block·(i+1)],
    // x[256i..256i+256] and sums[8i..8i+8].
    unsafe {
        let table = _mm512_loadu_si512(table.as_ptr().cast());
        let nibble = _mm512_set1_epi16(0xF);
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut offsets = _mm256_setzero_ps();
        for i in 0..nb {
            let b = r.add(i * block);
            prefetch_block(b, block);
            let (d, dmin) = (f16_at(b), f16_at(b.add(2)));
            let (sc, mn) = k4_scales_words(std::slice::from_raw_parts(b.add(4), 12));
            let widen = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
            let m = _mm256_mul_ps(widen(mn), _mm256_set1_ps(dmin));
            let av = _mm256_mul_ps(widen(sc), _mm256_set1_ps(d));
            // centre·a is exact (a power of two times a), so each offset rounds once.
            let offset = _mm256_fmsub_ps(av, _mm256_set1_ps(centre as f32), m);
            offsets = _mm256_fmadd_ps(offset, _mm256_loadu_ps(sums.add(i * 8)), offsets);
            let mut a = [0f32; 8];
            _mm256_storeu_ps(a.as_mut_ptr(), av);
            let qs = b.add(qs_at);
            let qh =
                if Q5 { _mm512_cvtepu8_epi16(_mm256_loadu_si256(b.add(16).cast())) } else { _mm512_setzero_si512() };
            for c in 0..4 {
                let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(qs.add(32 * c).cast()));
                let mut lo = _mm512_and_si512(v, nibble);
                let mut hi = _mm512_srli_epi16::<4>(v);
                if Q5 {
                    // Bit 2c of qh to bit 4 for the low nibbles, bit 2c + 1 for the high ones.
                    let (to_lo, to_hi) = match c {
                        0 => (_mm512_slli_epi16::<4>(qh), _mm512_slli_epi16::<3>(qh)),
                        1 => (_mm512_slli_epi16::<2>(qh), _mm512_slli_epi16::<1>(qh)),
                        2 => (qh, _mm512_srli_epi16::<1>(qh)),
                        _ => (_mm512_srli_epi16::<2>(qh), _mm512_srli_epi16::<3>(qh)),
                    };
                    (lo, hi) = (merge_low_nibble(v, to_lo), merge_low_nibble(hi, to_hi));
                }
                let lo = _mm512_permutexvar_epi16(lo, table);
                let hi = _mm512_permutexvar_epi16(hi, table);
                let e = i * 256 + 64 * c;
                acc[0] = _mm512_fmadd_ps(dot32(lo, xs, e), _mm512_set1_ps(a[2 * c]), acc[0]);
                acc[1] = _mm512_fmadd_ps(dot32(hi, xs, e + 32), _mm512_set1_ps(a[2 * c + 1]), acc[1]);
            }
        }
        let total = _mm512_add_ps(acc[0], acc[1]);
        _mm512_reduce_add_ps(_mm512_add_ps(total, _mm512_zextps256_ps512(offsets)))
    }
}

/// Q6_K (210-byte super-blocks of 256: 128 bytes of low nibbles `ql`, 64 bytes of 2-bit high
/// parts `qh`, 16 signed 8-bit scales, f16 d; per 128-element half h and l in 0..32, element
/// 128h + 32t + l has the code (t=0: ql[l] low, t=1: ql[l+32] low, t=2: ql[l] high, t=3:
/// ql[l+32] high) | (bits 2t..2t+2 of qh[l]) << 4, minus 32, and scale sc[8h + 2t + l/16]).
/// A 6-bit code indexes a 64-word table with `vpermt2w`, which ignores the index's higher bits,
/// so the two parts are merged with one bit-select and no masking of the high part.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
unsafe fn q6_k(r: *const u8, xs: Parts, nb: usize) -> f32 {
    let (t_lo, t_hi) = (bf16_table(-32), bf16_table(0));
    let scale_idx = sub_block_lanes();
    // SAFETY: the tables are 32 words each; super-block i spans r[210i..210i+210] and
    // x[256i..256i+256].
    unsafe {
        let (t_lo, t_hi) = (_mm512_loadu_si512(t_lo.as_ptr().cast()), _mm512_loadu_si512(t_hi.as_ptr().cast()));
        let mut acc = [_mm512_setzero_ps(); 2];
        for i in 0..nb {
            let b = r.add(i * 210);
            prefetch_block(b, 210);
            let (ql, qh) = (b, b.add(128));
            let d = f16_at(b.add(208));
            let scales = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(192).cast()))),
                _mm512_set1_ps(d),
            );
            for h in 0..2 {
                let q0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(ql.add(64 * h).cast()));
                let q1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(ql.add(64 * h + 32).cast()));
                let hb = _mm512_cvtepu8_epi16(_mm256_loadu_si256(qh.add(32 * h).cast()));
                let codes = [
                    merge_low_nibble(q0, _mm512_slli_epi16::<4>(hb)),
                    merge_low_nibble(q1, _mm512_slli_epi16::<2>(hb)),
                    merge_low_nibble(_mm512_srli_epi16::<4>(q0), hb),
                    merge_low_nibble(_mm512_srli_epi16::<4>(q1), _mm512_srli_epi16::<2>(hb)),
                ];
                for (t, code) in codes.into_iter().enumerate() {
                    let w = _mm512_permutex2var_epi16(t_lo, code, t_hi);
                    let e = i * 256 + 128 * h + 32 * t;
                    let idx = _mm512_loadu_si512(scale_idx[4 * h + t].as_ptr().cast());
                    let s = _mm512_permutexvar_ps(idx, scales);
                    acc[t % 2] = _mm512_fmadd_ps(dot32(w, xs, e), s, acc[t % 2]);
                }
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }
}
