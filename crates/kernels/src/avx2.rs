//! x86-64 AVX2 + FMA + F16C kernels.
//!
//! Every function here is `unsafe` because it must only run on a CPU with
//! those features; callers check via [`crate::cpu_features`]. Slice lengths
//! are asserted up front so the inner loops can use raw pointers.

use std::arch::x86_64::*;

use crate::FloatType;
use crate::elem::Elem;

/// Bytes ahead of the current position to prefetch weights (see avx512.rs).
pub(crate) const PREFETCH_DIST: usize = 1024;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p.cast())
}

/// Loads 8 elements of type `E` starting at `p` and widens them to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<E: Elem>(p: *const u8) -> __m256 {
    unsafe {
        match E::DTYPE {
            FloatType::F32 => _mm256_loadu_ps(p.cast()),
            FloatType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            FloatType::BF16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    // SAFETY: same target features as this function.
    unsafe { hsum128(s) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// # Safety
/// AVX2/FMA/F16C must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn float_matvec<E: Elem>(data: &[u8], cols: usize, x: &[f32], y: &mut [f32]) {
    let rb = cols * E::SIZE;
    assert!(data.len() >= y.len() * rb && x.len() == cols);
    let xp = x.as_ptr();
    for (r, yr) in y.iter_mut().enumerate() {
        // SAFETY: every load below stays inside row r (asserted above) or x.
        unsafe {
            let p = data.as_ptr().add(r * rb);
            let mut a = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 32 <= cols {
                for (i, ai) in a.iter_mut().enumerate() {
                    let o = c + 8 * i;
                    *ai = _mm256_fmadd_ps(load8::<E>(p.add(o * E::SIZE)), _mm256_loadu_ps(xp.add(o)), *ai);
                }
                c += 32;
            }
            while c + 8 <= cols {
                a[0] = _mm256_fmadd_ps(load8::<E>(p.add(c * E::SIZE)), _mm256_loadu_ps(xp.add(c)), a[0]);
                c += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let mut s = hsum(v);
            while c < cols {
                s += E::get_raw(p, c) * *xp.add(c);
                c += 1;
            }
            *yr = s;
        }
    }
}

/// # Safety
/// AVX2/FMA/F16C must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn float_row<E: Elem>(row: &[u8], out: &mut [f32]) {
    let cols = out.len();
    assert!(row.len() >= cols * E::SIZE);
    // SAFETY: loads stay within `row`, stores within `out`.
    unsafe {
        let p = row.as_ptr();
        let o = out.as_mut_ptr();
        let mut c = 0;
        while c + 8 <= cols {
            _mm256_storeu_ps(o.add(c), load8::<E>(p.add(c * E::SIZE)));
            c += 8;
        }
        while c < cols {
            *o.add(c) = E::get_raw(p, c);
            c += 1;
        }
    }
}

/// Σ_k q_k·x'_k for one aligned 8-word chunk, where x' is the chunk's slice
/// of the permuted input (see `permute_x`): lane i of step k uses code k of
/// word i, extracted by a single AND and left at its bit position. Returned
/// as two partial sums (even and odd k) so that the caller can scale each
/// into its own accumulator instead of spending an add on joining them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_dot_pair<const B: u32>(wp: *const u8, xp: *const f32) -> (__m256, __m256) {
    let epw = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    unsafe {
        let v = _mm256_loadu_si256(wp.cast());
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        for k in 0..epw {
            let q = if k + 1 < epw {
                _mm256_and_si256(v, _mm256_set1_epi32((mask << (B as usize * k)) as i32))
            } else {
                _mm256_srl_epi32(v, _mm_cvtsi32_si128((32 - B) as i32))
            };
            let t = _mm256_cvtepi32_ps(q);
            let xv = _mm256_loadu_ps(xp.add(k * 8));
            if k % 2 == 0 {
                a0 = _mm256_fmadd_ps(t, xv, a0);
            } else {
                a1 = _mm256_fmadd_ps(t, xv, a1);
            }
        }
        (a0, a1)
    }
}

/// [`chunk_dot_pair`] joined into one vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_dot<const B: u32>(wp: *const u8, xp: *const f32) -> __m256 {
    // SAFETY: same contract as chunk_dot_pair.
    let (a0, a1) = unsafe { chunk_dot_pair::<B>(wp, xp) };
    _mm256_add_ps(a0, a1)
}

/// The two partial sums of group `g` of a row (`cpg` whole chunks per group),
/// prefetching the weight stream once per 64-byte line.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_dot_pair<const B: u32>(wr: *const u8, xq: *const f32, g: usize, cpg: usize) -> (__m256, __m256) {
    let epw = (32 / B) as usize;
    unsafe {
        let c0 = g * cpg;
        if c0.is_multiple_of(2) {
            prefetch(wr.wrapping_add(c0 * 32 + PREFETCH_DIST));
        }
        let (mut a0, mut a1) = chunk_dot_pair::<B>(wr.add(c0 * 32), xq.add(c0 * 8 * epw));
        for c in c0 + 1..c0 + cpg {
            if c.is_multiple_of(2) {
                prefetch(wr.wrapping_add(c * 32 + PREFETCH_DIST));
            }
            let (d0, d1) = chunk_dot_pair::<B>(wr.add(c * 32), xq.add(c * 8 * epw));
            a0 = _mm256_add_ps(a0, d0);
            a1 = _mm256_add_ps(a1, d1);
        }
        (a0, a1)
    }
}

/// As [`chunk_dot`] for a final 4-word chunk.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_chunk_dot<const B: u32>(wp: *const u8, xp: *const f32) -> __m128 {
    let epw = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    unsafe {
        let v = _mm_loadu_si128(wp.cast());
        let mut a = _mm_setzero_ps();
        for k in 0..epw {
            let q = if k + 1 < epw {
                _mm_and_si128(v, _mm_set1_epi32((mask << (B as usize * k)) as i32))
            } else {
                _mm_srl_epi32(v, _mm_cvtsi32_si128((32 - B) as i32))
            };
            a = _mm_fmadd_ps(_mm_cvtepi32_ps(q), _mm_loadu_ps(xp.add(k * 4)), a);
        }
        a
    }
}

/// Affine matvec over `y.len()` rows. `xp` is x permuted by `permute_x`,
/// `sx` the per-group sums of x. Requires `(group_size / epw) % 4 == 0`.
///
/// # Safety
/// AVX2/FMA/F16C must be available.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn affine_matvec<E: Elem, const B: u32>(
    group_size: usize,
    w: &[u8],
    s: &[u8],
    b: &[u8],
    cols: usize,
    xp: &[f32],
    sx: &[f32],
    y: &mut [f32],
) {
    let epw = (32 / B) as usize;
    let nw = cols / epw;
    let ng = cols / group_size;
    let wpg = group_size / epw;
    let rows = y.len();
    assert!(wpg.is_multiple_of(4) && ng * group_size == cols);
    assert!(w.len() >= rows * nw * 4 && s.len() >= rows * ng * E::SIZE && b.len() >= rows * ng * E::SIZE);
    assert!(xp.len() == cols && sx.len() == ng);
    let nchunks = nw / 8;
    let has_tail = !nw.is_multiple_of(8);
    let (xq, sxq) = (xp.as_ptr(), sx.as_ptr());
    for (r, yr) in y.iter_mut().enumerate() {
        // SAFETY: pointer offsets stay inside row r of w/s/b and inside
        // xp/sx, by the asserts above.
        unsafe {
            let wr = w.as_ptr().add(r * nw * 4);
            let sr = s.as_ptr().add(r * ng * E::SIZE);
            let br = b.as_ptr().add(r * ng * E::SIZE);
            let mut racc = _mm256_setzero_ps();
            if wpg.is_multiple_of(8) {
                // Whole chunks per group. Each group's two partial sums go into two row
                // accumulators (no add to join them), and the group scales are widened eight
                // at a time and broadcast by a lane permute instead of being read one by one
                // as scalars: about 15% fewer instructions per group at 4-bit g64.
                let cpg = wpg / 8;
                let mut racc1 = _mm256_setzero_ps();
                let mut g = 0;
                while g + 8 <= ng {
                    let sv = load8::<E>(sr.add(g * E::SIZE));
                    for j in 0..8 {
                        // One chunk per group (4-bit g64, the common case) without the
                        // chunk loop: g is a multiple of 8, so the prefetch parity is known.
                        let (a0, a1) = if cpg == 1 {
                            if j % 2 == 0 {
                                prefetch(wr.wrapping_add((g + j) * 32 + PREFETCH_DIST));
                            }
                            chunk_dot_pair::<B>(wr.add((g + j) * 32), xq.add((g + j) * 8 * epw))
                        } else {
                            group_dot_pair::<B>(wr, xq, g + j, cpg)
                        };
                        let sg = _mm256_permutevar8x32_ps(sv, _mm256_set1_epi32(j as i32));
                        racc = _mm256_fmadd_ps(a0, sg, racc);
                        racc1 = _mm256_fmadd_ps(a1, sg, racc1);
                    }
                    g += 8;
                }
                while g < ng {
                    let (a0, a1) = group_dot_pair::<B>(wr, xq, g, cpg);
                    let sg = _mm256_set1_ps(E::get_raw(sr, g));
                    racc = _mm256_fmadd_ps(a0, sg, racc);
                    racc1 = _mm256_fmadd_ps(a1, sg, racc1);
                    g += 1;
                }
                racc = _mm256_add_ps(racc, racc1);
            } else {
                // Each 4-word half of a chunk lies within one group, but the
                // two halves may belong to different groups.
                for c in 0..nchunks {
                    prefetch(wr.wrapping_add(c * 32 + PREFETCH_DIST));
                    let acc = chunk_dot::<B>(wr.add(c * 32), xq.add(c * 8 * epw));
                    // wpg == 4 is the common case (2-bit, group 64);
                    // avoid two divisions per chunk for it.
                    let (glo, ghi) = if wpg == 4 { (2 * c, 2 * c + 1) } else { (c * 8 / wpg, (c * 8 + 4) / wpg) };
                    let lo = E::get_raw(sr, glo);
                    let hi = E::get_raw(sr, ghi);
                    racc = _mm256_fmadd_ps(acc, _mm256_set_m128(_mm_set1_ps(hi), _mm_set1_ps(lo)), racc);
                }
            }
            let mut tail = 0.0;
            if has_tail {
                let c = nchunks;
                let acc = half_chunk_dot::<B>(wr.add(c * 32), xq.add(c * 8 * epw));
                tail = hsum128(acc) * E::get_raw(sr, c * 8 / wpg);
            }
            let mut bacc = _mm256_setzero_ps();
            let mut g = 0;
            while g + 8 <= ng {
                bacc = _mm256_fmadd_ps(load8::<E>(br.add(g * E::SIZE)), _mm256_loadu_ps(sxq.add(g)), bacc);
                g += 8;
            }
            let mut bsum = 0.0;
            while g < ng {
                bsum += E::get_raw(br, g) * *sxq.add(g);
                g += 1;
            }
            *yr = hsum(_mm256_add_ps(racc, bacc)) + tail + bsum;
        }
    }
}

/// Dequantizes one affine row in natural element order.
///
/// # Safety
/// AVX2/FMA/F16C must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn affine_row<E: Elem, const B: u32>(
    group_size: usize,
    w: &[u8],
    s: &[u8],
    b: &[u8],
    out: &mut [f32],
) {
    let cols = out.len();
    let epw = (32 / B) as usize;
    let ng = cols / group_size;
    let wpg = group_size / epw;
    assert!(ng * group_size == cols);
    assert!(w.len() >= cols / epw * 4 && s.len() >= ng * E::SIZE && b.len() >= ng * E::SIZE);
    // SAFETY: loads stay within w/s/b, stores within out (asserted above).
    unsafe {
        let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
        let m = _mm256_set1_epi32(((1u32 << B) - 1) as i32);
        for g in 0..ng {
            let sc = E::get_raw(s.as_ptr(), g);
            let bi = E::get_raw(b.as_ptr(), g);
            let (sv, bv) = (_mm256_set1_ps(sc), _mm256_set1_ps(bi));
            for j in g * wpg..(g + 1) * wpg {
                let word = wp.add(j * 4).cast::<u32>().read_unaligned().to_le() as i32;
                let o = op.add(j * epw);
                match B {
                    8 => {
                        let q = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word));
                        let d = _mm_fmadd_ps(_mm_cvtepi32_ps(q), _mm_set1_ps(sc), _mm_set1_ps(bi));
                        _mm_storeu_ps(o, d);
                    }
                    4 => {
                        let sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
                        let q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), sh), m);
                        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), sv, bv));
                    }
                    _ => {
                        let v = _mm256_set1_epi32(word);
                        let sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
                        let sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
                        let q0 = _mm256_and_si256(_mm256_srlv_epi32(v, sh0), m);
                        let q1 = _mm256_and_si256(_mm256_srlv_epi32(v, sh1), m);
                        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), sv, bv));
                        _mm256_storeu_ps(o.add(8), _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), sv, bv));
                    }
                }
            }
        }
    }
}

/// Dots `tr` (≤ 4) decoded rows with `n` inputs, 4 rows × 2 inputs at a time
/// so that each loaded vector feeds several FMAs.
///
/// # Safety
/// AVX2/FMA/F16C must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_tiles(
    w: &[f32],
    tr: usize,
    x: &[f32],
    n: usize,
    cols: usize,
    put: &mut impl FnMut(usize, usize, f32),
) {
    assert!(w.len() >= tr * cols && x.len() >= n * cols && tr <= 4);
    // SAFETY: all row/input pointers cover `cols` elements inside w/x.
    unsafe {
        let mut t = 0;
        while t < n {
            let nt = (n - t).min(2);
            let rowp = |j: usize| w.as_ptr().add(j * cols);
            let xin = |i: usize| x.as_ptr().add((t + i) * cols);
            if tr == 4 && nt == 2 {
                let r = tile::<4, 2>([rowp(0), rowp(1), rowp(2), rowp(3)], [xin(0), xin(1)], cols);
                for (j, rj) in r.iter().enumerate() {
                    for (i, v) in rj.iter().enumerate() {
                        put(t + i, j, *v);
                    }
                }
            } else {
                for i in 0..nt {
                    for j in 0..tr {
                        let r = tile::<1, 1>([rowp(j)], [xin(i)], cols);
                        put(t + i, j, r[0][0]);
                    }
                }
            }
            t += nt;
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const T: usize>(w: [*const f32; R], x: [*const f32; T], cols: usize) -> [[f32; T]; R] {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut c = 0;
        while c + 8 <= cols {
            let mut xv = [_mm256_setzero_ps(); T];
            for i in 0..T {
                xv[i] = _mm256_loadu_ps(x[i].add(c));
            }
            for j in 0..R {
                let wv = _mm256_loadu_ps(w[j].add(c));
                for i in 0..T {
                    acc[j][i] = _mm256_fmadd_ps(wv, xv[i], acc[j][i]);
                }
            }
            c += 8;
        }
        let mut out = [[0.0f32; T]; R];
        for j in 0..R {
            for i in 0..T {
                let mut s = hsum(acc[j][i]);
                for cc in c..cols {
                    s += *w[j].add(cc) * *x[i].add(cc);
                }
                out[j][i] = s;
            }
        }
        out
    }
}
