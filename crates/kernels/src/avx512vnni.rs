//! AVX512_VNNI affine matvec for 4-bit codes in groups of 64 (the packed format's experts and
//! most of its other matrices): integer dot products of the codes with x written as a 24-bit
//! fixed-point number per group, in three signed bytes.
//!
//! The f32 kernel (`avx512.rs`) spends an AND, an int→float conversion and an FMA per 16
//! codes: about 25 vector instructions per 64-byte chunk of 128 codes. Here a chunk costs two
//! code extractions (low and high nibbles of each byte), six `vpdpbusd` (each 64 byte products
//! summed in fours into 16 i32 lanes), two shifts, one conversion and one FMA: about 13.
//!
//! Exactness. Per group g of 64 elements, x is scaled by a power of two 2^e_g chosen so that
//! max|x| · 2^e_g lies in [2^21, 127·2^16], and rounded to the integer X = x·2^e_g (the only
//! rounding: at most 2^-22 of the group's largest |x|, the size of f32's own rounding of that
//! element). X is split into balanced base-256 digits X = X0·2^16 + X1·2^8 + X2, each in
//! −128..127, and Σ q·X is computed exactly in i32 (|Σ| ≤ 8·15·127·2^16 < 2^31 per lane);
//! the sum is converted to f32 once per chunk and scaled by s_g·2^-e_g (exact: a power of
//! two). So a row's sum has the f32 kernel's accuracy. Groups whose largest |x| is below
//! 2^-100 count as zero (their products are far below any f32 sum's rounding); a group holding
//! a NaN or an infinity gets a NaN scale, so the output is NaN as the f32 kernel's would be.
//!
//! Prepared x (in the f32 buffer the other kernels keep their permuted x in): for chunk c
//! (elements 128c..128c+128, words 16c..16c+16 of a row), six 64-byte vectors [low digit
//! X0 of the even elements | X0 of the odd | X1 even | X1 odd | X2 even | X2 odd]: byte 4w + j
//! of an "even" vector is element 128c + 8w + 2j (nibble 2j of word w, byte j's low nibble),
//! of an "odd" one element 128c + 8w + 2j + 1 (byte j's high nibble). Then the factors 2^-e_g.

use std::arch::x86_64::*;

use crate::elem::Elem;

use super::avx512::{MAX_GROUPS, PREFETCH_DIST, bias_terms, prefetch};

/// Elements per group this kernel handles.
const GROUP: usize = 64;
/// Elements per 64-byte chunk of 4-bit codes.
const CHUNK: usize = 128;
/// Prepared bytes per chunk: three digits × (even, odd) × 64.
const CHUNK_BYTES: usize = 384;

/// Whether this kernel handles the layout.
pub(crate) fn supports(bits: u32, group_size: usize, cols: usize) -> bool {
    bits == 4 && group_size == GROUP && cols.is_multiple_of(CHUNK) && cols / GROUP <= MAX_GROUPS
}

/// Writes x's digits and group factors (module documentation) into `xp` (`x.len()` floats,
/// which hold 3·len bytes of digits and len/64 factors).
///
/// # Safety
/// As for [`affine_matvec`]; `x.len()` is a multiple of 128 and `xp.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn prepare(x: &[f32], xp: &mut [f32]) {
    let cols = x.len();
    assert!(cols.is_multiple_of(CHUNK) && xp.len() == cols);
    let (digits, factors) = xp.split_at_mut(3 * cols / 4);
    let digits = digits.as_mut_ptr().cast::<u8>();
    // After the two saturating packs (exact: digits are in −128..127), byte 16L + 4v + i holds
    // element 16v + 4L + i of a group's four vectors; the permute puts its even elements in
    // order in bytes 0..32 and its odd ones in 32..64.
    let order: [u8; 64] = std::array::from_fn(|k| {
        let t = if k < 32 { 2 * k } else { 2 * (k - 32) + 1 };
        (16 * ((t % 16) / 4) + 4 * (t / 16) + t % 4) as u8
    });
    // SAFETY: group g reads x[64g..64g+64] and writes its halves of chunk g/2's six vectors,
    // bytes 384(g/2) + 64k + 32(g % 2) + 0..32, inside the first 3·cols bytes of xp.
    unsafe {
        let order = _mm512_loadu_si512(order.as_ptr().cast());
        for (g, factor) in factors[..cols / GROUP].iter_mut().enumerate() {
            let xg = x.as_ptr().add(g * GROUP);
            let v: [__m512; 4] = std::array::from_fn(|k| _mm512_loadu_ps(xg.add(16 * k)));
            let abs = |a: __m512| _mm512_abs_ps(a);
            let largest = _mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_max_ps(abs(v[0]), abs(v[1])),
                _mm512_max_ps(abs(v[2]), abs(v[3])),
            ));
            let finite = (0..4).all(|k| {
                // Not NaN and not infinite: |v| < ∞ is false for both.
                _mm512_cmp_ps_mask::<_CMP_LT_OQ>(abs(v[k]), _mm512_set1_ps(f32::INFINITY)) == 0xFFFF
            });
            let (scale, f) = group_scale(largest, finite);
            *factor = f;
            // Digits per vector, then per digit the group's four vectors.
            let per_vector: [[__m512i; 3]; 4] = std::array::from_fn(|k| to_digits(v[k], scale));
            let d: [[__m512i; 4]; 3] = std::array::from_fn(|digit| std::array::from_fn(|k| per_vector[k][digit]));
            let at = digits.add((g / 2) * CHUNK_BYTES + (g % 2) * 32);
            for (digit, dv) in d.iter().enumerate() {
                let words = [_mm512_packs_epi32(dv[0], dv[1]), _mm512_packs_epi32(dv[2], dv[3])];
                let bytes = _mm512_permutexvar_epi8(order, _mm512_packs_epi16(words[0], words[1]));
                _mm256_storeu_si256(at.add(128 * digit).cast(), _mm512_castsi512_si256(bytes));
                _mm256_storeu_si256(at.add(128 * digit + 64).cast(), _mm512_extracti64x4_epi64::<1>(bytes));
            }
        }
    }
}

/// 2^e for e in −126..=127.
pub(crate) fn pow2(e: i32) -> f32 {
    debug_assert!((-126..=127).contains(&e));
    f32::from_bits(((127 + e) as u32) << 23)
}

/// For a group whose largest |x| is `largest` (`finite`: it holds no NaN or infinity): the
/// scale 2^e that writes it as fixed point, with largest·2^e in [2^21, 127·2^16] (from the
/// exponent of `largest`, one lower where 2^22 would pass 127·2^16), and the factor 2^-e that
/// undoes it. A group below 2^-100 counts as zero (scale and factor 0); a non-finite one gets a
/// zero scale and a NaN factor, so that the output is NaN.
pub(crate) fn group_scale(largest: f32, finite: bool) -> (f32, f32) {
    if !finite {
        return (0.0, f32::NAN);
    }
    if largest < f32::from_bits((127 - 100) << 23) {
        return (0.0, 0.0);
    }
    let exp = ((largest.to_bits() >> 23) & 0xFF) as i32 - 127;
    let e = 22 - exp;
    let e = if largest * pow2(e) > (127 << 16) as f32 { e - 1 } else { e };
    (pow2(e), pow2(-e))
}

/// The balanced base-256 digits [X0, X1, X2] (each in −128..127, X = X0·2^16 + X1·2^8 + X2) of
/// X = v·scale rounded to the nearest integer (ties to even; the product is exact, `scale`
/// being a power of two from [`group_scale`]), in i32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(crate) fn to_digits(v: __m512, scale: f32) -> [__m512i; 3] {
    let (byte, half) = (_mm512_set1_epi32(255), _mm512_set1_epi32(128));
    let full = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(scale)));
    let low = |a: __m512i| _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(a, half), byte), half);
    let d2 = low(full);
    let rest = _mm512_srai_epi32::<8>(_mm512_sub_epi32(full, d2));
    let d1 = low(rest);
    [_mm512_srai_epi32::<8>(_mm512_sub_epi32(rest, d1)), d1, d2]
}

/// Σ q·X per i32 lane for two code vectors (`even`, `odd`: unsigned bytes) against the digit
/// vectors at `xd` laid out [X0 even | X0 odd | X1 even | X1 odd | X2 even | X2 odd], 64 bytes
/// each: exact while a lane's eight products stay below 2^31.
///
/// # Safety
/// AVX512_VNNI must be available; `xd` holds 384 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn dot_digits(even: __m512i, odd: __m512i, xd: *const u8) -> __m512i {
    // SAFETY: the caller guarantees the six 64-byte vectors.
    unsafe {
        let dig = |k: usize| _mm512_loadu_si512(xd.add(64 * k).cast());
        let mut acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, dig(0));
        acc = _mm512_dpbusd_epi32(acc, odd, dig(1));
        acc = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(acc), even, dig(2));
        acc = _mm512_dpbusd_epi32(acc, odd, dig(3));
        acc = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(acc), even, dig(4));
        _mm512_dpbusd_epi32(acc, odd, dig(5))
    }
}

/// Affine matvec over `y.len()` rows of 4-bit codes in groups of 64 (see [`supports`]); `xp`
/// is x prepared by [`prepare`], `sx` the per-group sums of x (for the biases).
///
/// # Safety
/// AVX-512F, AVX512BW, AVX512_VBMI, AVX512_VNNI, AVX2, FMA and F16C must be available.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn affine_matvec<E: Elem>(
    w: &[u8],
    s: &[u8],
    b: &[u8],
    cols: usize,
    xp: &[f32],
    sx: &[f32],
    y: &mut [f32],
) {
    let ng = cols / GROUP;
    let nchunks = cols / CHUNK;
    let rows = y.len();
    assert!(supports(4, GROUP, cols));
    assert!(w.len() >= rows * cols / 2 && s.len() >= rows * ng * E::SIZE && b.len() >= rows * ng * E::SIZE);
    assert!(xp.len() == cols && sx.len() == ng);
    // Lanes 0..8 of a chunk are words of its first group, 8..16 of its second.
    let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let nibbles = _mm512_set1_epi32(0x0F0F_0F0F);
    let digits = xp.as_ptr().cast::<u8>();
    let factors = xp[3 * cols / 4..].as_ptr();
    // Per row: its group scales times x's group factors, so that a chunk's is one permute.
    let mut sbuf = [0f32; MAX_GROUPS + 16];
    let sxq = sx.as_ptr();
    for (r, yr) in y.iter_mut().enumerate() {
        // SAFETY: pointer offsets stay inside row r of w/s/b, inside xp/sx and inside sbuf
        // (ng ≤ MAX_GROUPS), by the asserts above.
        unsafe {
            let wr = w.as_ptr().add(r * cols / 2);
            let sr = s.as_ptr().add(r * ng * E::SIZE);
            let br = b.as_ptr().add(r * ng * E::SIZE);
            let sb = sbuf.as_mut_ptr();
            let mut g = 0;
            while g + 16 <= ng {
                let v = _mm512_mul_ps(load16::<E>(sr.add(g * E::SIZE)), _mm512_loadu_ps(factors.add(g)));
                _mm512_storeu_ps(sb.add(g), v);
                g += 16;
            }
            while g < ng {
                *sb.add(g) = E::get_raw(sr, g) * *factors.add(g);
                g += 1;
            }
            let sb = sb.cast_const();

            let mut racc = [_mm512_setzero_ps(); 2];
            for c in 0..nchunks {
                prefetch(wr.wrapping_add(c * 64 + PREFETCH_DIST));
                let v = _mm512_loadu_si512(wr.add(c * 64).cast());
                let even = _mm512_and_si512(v, nibbles);
                let odd = _mm512_and_si512(_mm512_srli_epi32::<4>(v), nibbles);
                let acc = dot_digits(even, odd, digits.add(c * CHUNK_BYTES));
                let scale = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(sb.add(2 * c))));
                racc[c % 2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, racc[c % 2]);
            }

            let (bacc, bsum) = bias_terms::<E>(br, sxq, ng);
            *yr = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(racc[0], racc[1]), bacc)) + bsum;
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c")]
unsafe fn load16<E: Elem>(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 16 readable elements.
    unsafe { super::avx512::load16::<E>(p) }
}
