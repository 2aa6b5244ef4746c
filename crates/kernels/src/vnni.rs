//! AVX-512 VNNI affine 4-bit matvec on integer dot products, exact to f32 precision.
//!
//! The f32 kernels spend an AND, an int→float conversion and an FMA on every 16 codes. Here
//! the codes stay bytes: `vpdpbusd` multiplies 64 unsigned bytes (codes) by 64 signed bytes
//! and adds each group of four products into a 32-bit lane, exactly. The signed bytes are x,
//! written once per input as a 24-bit fixed-point integer `xi ≈ x / S` (S = max|x| / (2^23 −
//! 2^16)) split into three signed base-256 digits, `xi = d0·2^16 + d1·2^8 + d2`. So
//! Σ q·xi = 2^16·Σ q·d0 + 2^8·Σ q·d1 + Σ q·d2 with every sum an exact integer, and the only
//! error against f32 arithmetic is x's rounding to 24 bits of its largest magnitude (the
//! relative error of an f32 accumulation, not the 8-bit activations of a Q8 kernel).
//!
//! Per 16-word chunk (128 codes, 64 bytes): two masks and a shift to split low and high
//! nibbles, six `vpdpbusd`, two shifts and two adds to join the digits, one conversion and one
//! FMA with the lanes' group scales: about 19 instructions where the f32 kernel needs about 29.
//!
//! Lane i of a chunk sums the products of word i (codes 8i..8i+7 of the chunk), so the lane's
//! group is known as in the f32 kernel, and the scale is applied per lane after the integer sum.

use std::arch::x86_64::*;

use crate::avx512::{MAX_GROUPS, PREFETCH_DIST, prefetch};
use crate::elem::Elem;

/// Bytes of prepared input per 16-word chunk: three digits × (low, high nibble) × 64 bytes.
pub(crate) const CHUNK_INPUT: usize = 384;

/// Largest |xi|: d0 then stays within ±127 (a signed byte), with room for rounding.
const XI_MAX: f32 = ((1 << 23) - (1 << 16)) as f32;

/// Whether this kernel handles the layout: 4-bit codes, whole 16-word chunks per row, and
/// groups the scale expansion supports (as the f32 AVX-512 kernel).
pub(crate) fn supports(bits: u32, group_size: usize, cols: usize) -> bool {
    bits == 4 && cols.is_multiple_of(128) && crate::avx512::supports(bits, group_size, cols)
}

/// Writes x as digits in the kernel's order (`cols / 128` chunks of `CHUNK_INPUT` bytes: for
/// digit p = 0, 1, 2, the 64 values x[2b] then the 64 values x[2b + 1], b = byte of the chunk)
/// and returns S, the value of one unit of xi. A non-finite x returns NaN, so that every output
/// is NaN, as the f32 kernels would make it.
pub(crate) fn prepare_input(x: &[f32], digits: &mut [i8]) -> f32 {
    assert!(x.len().is_multiple_of(128) && digits.len() == x.len() / 128 * CHUNK_INPUT);
    let max = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
    if !max.is_finite() || x.iter().any(|v| v.is_nan()) {
        return f32::NAN;
    }
    if max == 0.0 {
        digits.fill(0);
        return 1.0;
    }
    let s = max / XI_MAX;
    let inv = XI_MAX / max;
    // Nearest integer without a libm call (`f32::round` is one on baseline x86-64): truncate,
    // then step away from zero when the dropped fraction is at least one half.
    let to_int = |t: f32| -> i32 {
        let i = t as i32;
        let f = t - i as f32;
        let i = if f >= 0.5 {
            i + 1
        } else if f <= -0.5 {
            i - 1
        } else {
            i
        };
        i.clamp(-(XI_MAX as i32), XI_MAX as i32)
    };
    for (xc, dc) in x.chunks_exact(128).zip(digits.chunks_exact_mut(CHUNK_INPUT)) {
        let (d0s, rest) = dc.split_at_mut(128);
        let (d1s, d2s) = rest.split_at_mut(128);
        for (b, pair) in xc.chunks_exact(2).enumerate() {
            for (half, &v) in pair.iter().enumerate() {
                let xi = to_int(v * inv);
                // Balanced digits: each in [-128, 127], d0 in [-127, 127] by XI_MAX.
                let d2 = ((xi + 128) & 255) - 128;
                let r = (xi - d2) >> 8;
                let d1 = ((r + 128) & 255) - 128;
                let d0 = (r - d1) >> 8;
                let at = half * 64 + b;
                d0s[at] = d0 as i8;
                d1s[at] = d1 as i8;
                d2s[at] = d2 as i8;
            }
        }
    }
    s
}

/// Affine 4-bit matvec over `y.len()` rows on the prepared input (`digits`, `xs` = S from
/// [`prepare_input`]) and `sx`, the per-group sums of x. Requires [`supports`].
///
/// # Safety
/// AVX-512F/BW/VNNI must be available.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn affine4_matvec<E: Elem>(
    group_size: usize,
    w: &[u8],
    s: &[u8],
    b: &[u8],
    cols: usize,
    digits: &[i8],
    xs: f32,
    sx: &[f32],
    y: &mut [f32],
) {
    let nw = cols / 8;
    let ng = cols / group_size;
    let wpg = group_size / 8;
    let rows = y.len();
    assert!(supports(4, group_size, cols) && ng * group_size == cols);
    assert!(w.len() >= rows * nw * 4 && s.len() >= rows * ng * E::SIZE && b.len() >= rows * ng * E::SIZE);
    assert!(digits.len() == cols / 128 * CHUNK_INPUT && sx.len() == ng);
    let nchunks = cols / 128;
    let groups_per_chunk = 16 / wpg.min(16);
    let chunks_per_group = (wpg / 16).max(1);
    let idx = if wpg == 4 {
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
    } else {
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
    };
    let low = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let mut sbuf = [0f32; MAX_GROUPS + 16];
    let (dq, sxq) = (digits.as_ptr(), sx.as_ptr());
    for (r, yr) in y.iter_mut().enumerate() {
        // SAFETY: pointer offsets stay inside row r of w/s/b, inside digits/sx and inside sbuf
        // (ng <= MAX_GROUPS), by the asserts above.
        unsafe {
            let wr = w.as_ptr().add(r * nw * 4);
            let sr = s.as_ptr().add(r * ng * E::SIZE);
            let br = b.as_ptr().add(r * ng * E::SIZE);
            let sb = sbuf.as_mut_ptr();
            let mut g = 0;
            while g + 16 <= ng {
                _mm512_storeu_ps(sb.add(g), load16::<E>(sr.add(g * E::SIZE)));
                g += 16;
            }
            while g < ng {
                *sb.add(g) = E::get_raw(sr, g);
                g += 1;
            }
            let sb = sb.cast_const();

            let mut racc = _mm512_setzero_ps();
            for c in 0..nchunks {
                prefetch(wr.wrapping_add(c * 64 + PREFETCH_DIST));
                let v = _mm512_loadu_si512(wr.add(c * 64).cast());
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                let d = dq.add(c * CHUNK_INPUT);
                let ld = |o: usize| _mm512_loadu_si512(d.add(o).cast());
                let a0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, ld(0)), hi, ld(64));
                let a1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, ld(128)), hi, ld(192));
                let a2 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, ld(256)), hi, ld(320));
                // |a0| ≤ 8·15·127, so a0·2^16 + a1·2^8 + a2 < 2^30: exact in i32.
                let t = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32::<16>(a0), _mm512_slli_epi32::<8>(a1)), a2);
                let sc = if wpg >= 16 {
                    _mm512_set1_ps(*sb.add(c / chunks_per_group))
                } else {
                    _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(sb.add(c * groups_per_chunk))))
                };
                racc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, racc);
            }

            let mut bacc = _mm512_setzero_ps();
            let mut g = 0;
            while g + 16 <= ng {
                let bv = load16::<E>(br.add(g * E::SIZE));
                bacc = _mm512_fmadd_ps(bv, _mm512_loadu_ps(sxq.add(g)), bacc);
                g += 16;
            }
            let mut bsum = 0.0;
            while g < ng {
                bsum += E::get_raw(br, g) * *sxq.add(g);
                g += 1;
            }
            *yr = _mm512_reduce_add_ps(racc) * xs + _mm512_reduce_add_ps(bacc) + bsum;
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn load16<E: Elem>(p: *const u8) -> __m512 {
    // SAFETY: same contract as the f32 kernel's load (16 scales readable at p).
    unsafe { crate::avx512::load16::<E>(p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// The digits put x back within about one unit (half a unit of rounding to an integer, plus
    /// the f32 rounding of x/S and of S itself), stay signed bytes, and a zero or non-finite
    /// input gives the documented scale.
    #[test]
    fn digits_reconstruct_x() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        for scale in [1e-30f32, 1e-3, 1.0, 3e4] {
            let mut x: Vec<f32> = (0..512).map(|_| rng(&mut seed) * scale).collect();
            x[17] = scale; // the largest magnitude, exactly
            x[300] = -scale;
            let mut d = vec![0i8; 512 / 128 * CHUNK_INPUT];
            let s = prepare_input(&x, &mut d);
            for (i, &v) in x.iter().enumerate() {
                let (c, j) = (i / 128, i % 128);
                let at = |p: usize| d[c * CHUNK_INPUT + p * 128 + (j % 2) * 64 + j / 2] as i64;
                let xi = (at(0) << 16) + (at(1) << 8) + at(2);
                let back = xi as f64 * s as f64;
                let bound = s as f64 + (v as f64).abs() * 2f64.powi(-22);
                assert!((back - v as f64).abs() <= bound, "x[{i}] = {v}: {back}");
            }
        }
        let z = vec![0f32; 128];
        let mut d = vec![1i8; CHUNK_INPUT];
        assert_eq!(prepare_input(&z, &mut d), 1.0);
        assert!(d.iter().all(|&v| v == 0));
        let mut bad = vec![0.5f32; 128];
        bad[3] = f32::INFINITY;
        assert!(prepare_input(&bad, &mut d).is_nan());
        bad[3] = f32::NAN;
        assert!(prepare_input(&bad, &mut d).is_nan());
    }

    /// The kernel's arithmetic lane by lane in scalar code (the digit layout, the nibble split,
    /// the joins and the group of each lane), against an f64 dot product, so that the layout is
    /// checked on machines without VNNI too; `affine4_matvec` itself runs in the crate's kernel
    /// tests where the CPU has it.
    #[test]
    fn lane_arithmetic_matches_f64() {
        let mut seed = 0x0ddb_a11u64;
        let (cols, gs) = (512usize, 64usize);
        let codes: Vec<u8> = (0..cols).map(|_| ((rng(&mut seed) + 1.0) * 7.99) as u8).collect();
        let scales: Vec<f32> = (0..cols / gs).map(|_| rng(&mut seed) * 0.1).collect();
        let x: Vec<f32> = (0..cols).map(|_| rng(&mut seed)).collect();
        // Packed as the checkpoint stores them: word i holds codes 8i..8i+7, code k at bits 4k.
        let mut w = vec![0u8; cols / 2];
        for (i, &q) in codes.iter().enumerate() {
            w[i / 2] |= q << (4 * (i % 2));
        }
        let mut d = vec![0i8; cols / 128 * CHUNK_INPUT];
        let s = prepare_input(&x, &mut d);
        let mut acc = 0f64;
        for c in 0..cols / 128 {
            for lane in 0..16 {
                let mut a = [0i64; 3];
                for byte in 4 * lane..4 * lane + 4 {
                    let v = w[c * 64 + byte];
                    let (lo, hi) = ((v & 15) as i64, (v >> 4) as i64);
                    for (p, ap) in a.iter_mut().enumerate() {
                        *ap += lo * d[c * CHUNK_INPUT + p * 128 + byte] as i64;
                        *ap += hi * d[c * CHUNK_INPUT + p * 128 + 64 + byte] as i64;
                    }
                }
                let t = (a[0] << 16) + (a[1] << 8) + a[2];
                assert!(t.abs() < 1 << 30);
                let group = (c * 128 + 8 * lane) / gs;
                acc += t as f64 * scales[group] as f64;
            }
        }
        let got = acc * s as f64;
        let want: f64 = (0..cols).map(|i| codes[i] as f64 * scales[i / gs] as f64 * x[i] as f64).sum();
        let mag: f64 = (0..cols).map(|i| (codes[i] as f64 * scales[i / gs] as f64 * x[i] as f64).abs()).sum();
        assert!((got - want).abs() <= 1e-6 * mag, "{got} vs {want}");
    }
}
