//! AVX-512F affine matvec: the same scheme as the AVX2 kernel (see
//! `permute_x` in lib.rs) with 16 words per vector.
//!
//! Decoding 2/4-bit codes costs an AND, a convert and an FMA per 8 elements
//! with AVX2, which on two cores is barely enough to keep up with DRAM;
//! 16 lanes halve the instruction count.

use std::arch::x86_64::*;

use crate::FloatType;
use crate::elem::Elem;

/// Largest group count per row the kernel's stack buffer holds; larger rows
/// use the AVX2 kernel.
pub(crate) const MAX_GROUPS: usize = 1024;

/// How far ahead of the current chunk to prefetch weights, in bytes. Rows
/// of one block are contiguous, so this runs ahead into the next row too.
pub(crate) const PREFETCH_DIST: usize = 1024;

/// Software prefetch into L1; never faults, so the address may lie past the
/// end of the weights. The hardware streamer alone leaves a measurable gap on
/// the DRAM-bound shapes (about 10 → 14 GB/s at 4 bits on a 2-core VM).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p.cast())
}

/// Whether this kernel handles the layout: a vector of 16 words must map to
/// one group per 4-word quarter in a pattern the scale expansion supports.
pub(crate) fn supports(bits: u32, group_size: usize, cols: usize) -> bool {
    let wpg = group_size / (32 / bits) as usize;
    (wpg == 4 || wpg == 8 || wpg.is_multiple_of(16)) && cols / group_size <= MAX_GROUPS
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn load16<E: Elem>(p: *const u8) -> __m512 {
    unsafe {
        match E::DTYPE {
            FloatType::F32 => _mm512_loadu_ps(p.cast()),
            FloatType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            FloatType::BF16 => {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
            }
        }
    }
}

/// Σ_k q_k·x'_k over one 16-word chunk (`lanes` < 16 for the final partial
/// chunk, whose x' block is `lanes` wide).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn chunk_dot<const B: u32, const FULL: bool>(wp: *const u8, xp: *const f32, lanes: usize) -> __m512 {
    let epw = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    let lm: __mmask16 = if FULL { 0xffff } else { (1u16 << lanes) - 1 };
    let stride = if FULL { 16 } else { lanes };
    unsafe {
        let v = if FULL { _mm512_loadu_si512(wp.cast()) } else { _mm512_maskz_loadu_epi32(lm, wp.cast()) };
        let mut a0 = _mm512_setzero_ps();
        let mut a1 = _mm512_setzero_ps();
        for k in 0..epw {
            let q = if k + 1 < epw {
                _mm512_and_si512(v, _mm512_set1_epi32((mask << (B as usize * k)) as i32))
            } else {
                _mm512_srl_epi32(v, _mm_cvtsi32_si128((32 - B) as i32))
            };
            let t = _mm512_cvtepi32_ps(q);
            let xv = if FULL { _mm512_loadu_ps(xp.add(k * 16)) } else { _mm512_maskz_loadu_ps(lm, xp.add(k * stride)) };
            if k % 2 == 0 {
                a0 = _mm512_fmadd_ps(t, xv, a0);
            } else {
                a1 = _mm512_fmadd_ps(t, xv, a1);
            }
        }
        _mm512_add_ps(a0, a1)
    }
}

/// Per-lane scales of a chunk whose first group is `first`, from the row's
/// f32 scales (padded by at least 4 entries): `idx` maps lanes to groups.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn chunk_scales(sb: *const f32, first: usize, idx: __m512i) -> __m512 {
    unsafe { _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(sb.add(first)))) }
}

/// Affine matvec over `y.len()` rows; `xp` is x permuted by `permute_x` with
/// 16 lanes, `sx` the per-group sums of x. Requires [`supports`].
///
/// # Safety
/// AVX-512F/AVX2/FMA/F16C must be available.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
    assert!(supports(B, group_size, cols) && ng * group_size == cols);
    assert!(w.len() >= rows * nw * 4 && s.len() >= rows * ng * E::SIZE && b.len() >= rows * ng * E::SIZE);
    assert!(xp.len() == cols && sx.len() == ng);
    let nchunks = nw / 16;
    // Only meaningful when wpg < 16, i.e. 4 or 8 (a multiplication instead of
    // a division per chunk).
    let groups_per_chunk = 16 / wpg.min(16);
    let rem = nw % 16;
    let idx = if wpg == 4 {
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
    } else {
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
    };
    // Row scales widened to f32 once, so that per-chunk scale vectors are a
    // plain load plus one permute. Zero padding keeps the tail's reads in
    // bounds.
    let mut sbuf = [0f32; MAX_GROUPS + 16];
    let (xq, sxq) = (xp.as_ptr(), sx.as_ptr());
    for (r, yr) in y.iter_mut().enumerate() {
        // SAFETY: pointer offsets stay inside row r of w/s/b, inside xp/sx,
        // and inside sbuf (ng <= MAX_GROUPS), by the asserts above.
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
            if wpg.is_multiple_of(16) {
                let cpg = wpg / 16;
                for g in 0..ng {
                    let mut acc = _mm512_setzero_ps();
                    for c in g * cpg..(g + 1) * cpg {
                        prefetch(wr.wrapping_add(c * 64 + PREFETCH_DIST));
                        let d = chunk_dot::<B, true>(wr.add(c * 64), xq.add(c * 16 * epw), 16);
                        acc = _mm512_add_ps(acc, d);
                    }
                    racc = _mm512_fmadd_ps(acc, _mm512_set1_ps(*sb.add(g)), racc);
                }
            } else {
                for c in 0..nchunks {
                    prefetch(wr.wrapping_add(c * 64 + PREFETCH_DIST));
                    let d = chunk_dot::<B, true>(wr.add(c * 64), xq.add(c * 16 * epw), 16);
                    racc = _mm512_fmadd_ps(d, chunk_scales(sb, c * groups_per_chunk, idx), racc);
                }
                if rem > 0 {
                    let c = nchunks;
                    let d = chunk_dot::<B, false>(wr.add(c * 64), xq.add(c * 16 * epw), rem);
                    racc = _mm512_fmadd_ps(d, chunk_scales(sb, c * groups_per_chunk, idx), racc);
                }
            }

            let (bacc, bsum) = bias_terms::<E>(br, sxq, ng);
            *yr = _mm512_reduce_add_ps(_mm512_add_ps(racc, bacc)) + bsum;
        }
    }
}

/// Σ_g b_g·Σx_g of a row's `ng` group biases at `br` and x's group sums at `sx`: the whole
/// vectors of 16 groups as lanes of an f32 vector, the rest as a scalar sum (the row's total adds
/// both).
///
/// # Safety
/// AVX-512F/AVX2/FMA/F16C must be available; `br` holds `ng` elements and `sx` `ng` floats.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn bias_terms<E: Elem>(br: *const u8, sx: *const f32, ng: usize) -> (__m512, f32) {
    // SAFETY: the caller guarantees ng elements at br and ng floats at sx.
    unsafe {
        let mut bacc = _mm512_setzero_ps();
        let mut g = 0;
        while g + 16 <= ng {
            let bv = load16::<E>(br.add(g * E::SIZE));
            bacc = _mm512_fmadd_ps(bv, _mm512_loadu_ps(sx.add(g)), bacc);
            g += 16;
        }
        let mut bsum = 0.0;
        while g < ng {
            bsum += E::get_raw(br, g) * *sx.add(g);
            g += 1;
        }
        (bacc, bsum)
    }
}

/// Dots `tr` (≤ 4) decoded rows with `n` inputs, 4 rows × 4 inputs at a time
/// (16 accumulators; AVX-512 has 32 registers) so each load feeds 2 FMAs.
///
/// # Safety
/// AVX-512F/AVX2/FMA/F16C must be available.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
        let rowp = |j: usize| w.as_ptr().add(j * cols);
        let mut t = 0;
        while t < n {
            let nt = (n - t).min(4);
            let xin = |i: usize| x.as_ptr().add((t + i) * cols);
            if tr == 4 && nt == 4 {
                let r = tile::<4, 4>([rowp(0), rowp(1), rowp(2), rowp(3)], [xin(0), xin(1), xin(2), xin(3)], cols);
                for (j, rj) in r.iter().enumerate() {
                    for (i, v) in rj.iter().enumerate() {
                        put(t + i, j, *v);
                    }
                }
            } else if tr == 4 {
                for i in 0..nt {
                    let r = tile::<4, 1>([rowp(0), rowp(1), rowp(2), rowp(3)], [xin(i)], cols);
                    for (j, rj) in r.iter().enumerate() {
                        put(t + i, j, rj[0]);
                    }
                }
            } else {
                for i in 0..nt {
                    for j in 0..tr {
                        put(t + i, j, tile::<1, 1>([rowp(j)], [xin(i)], cols)[0][0]);
                    }
                }
            }
            t += nt;
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn tile<const R: usize, const T: usize>(w: [*const f32; R], x: [*const f32; T], cols: usize) -> [[f32; T]; R] {
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut step = |c: usize, m: __mmask16| {
            let mut xv = [_mm512_setzero_ps(); T];
            for i in 0..T {
                xv[i] = _mm512_maskz_loadu_ps(m, x[i].add(c));
            }
            for j in 0..R {
                let wv = _mm512_maskz_loadu_ps(m, w[j].add(c));
                for i in 0..T {
                    acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);
                }
            }
        };
        let mut c = 0;
        while c + 16 <= cols {
            step(c, 0xffff);
            c += 16;
        }
        if c < cols {
            // Masked-off lanes load as zero and are never touched in memory.
            step(c, (1u16 << (cols - c)) - 1);
        }
        let mut out = [[0.0f32; T]; R];
        for j in 0..R {
            for i in 0..T {
                out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
            }
        }
        out
    }
}

/// Float matvec; bf16/f16 widening is a few instructions per 16 elements,
/// which at AVX2 width is enough to fall behind DRAM on a busy core.
///
/// # Safety
/// AVX-512F/AVX2/FMA/F16C must be available.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn float_matvec<E: Elem>(data: &[u8], cols: usize, x: &[f32], y: &mut [f32]) {
    let rb = cols * E::SIZE;
    assert!(data.len() >= y.len() * rb && x.len() == cols);
    let xp = x.as_ptr();
    for (r, yr) in y.iter_mut().enumerate() {
        // SAFETY: every load below stays inside row r (asserted above) or x.
        unsafe {
            let p = data.as_ptr().add(r * rb);
            let mut a = [_mm512_setzero_ps(); 4];
            let mut c = 0;
            while c + 64 <= cols {
                let pb = p.wrapping_add(c * E::SIZE + PREFETCH_DIST);
                for line in 0..E::SIZE {
                    prefetch(pb.wrapping_add(line * 64));
                }
                for (i, ai) in a.iter_mut().enumerate() {
                    let o = c + 16 * i;
                    let wv = load16::<E>(p.add(o * E::SIZE));
                    *ai = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(o)), *ai);
                }
                c += 64;
            }
            while c + 16 <= cols {
                let wv = load16::<E>(p.add(c * E::SIZE));
                a[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(c)), a[0]);
                c += 16;
            }
            let v = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            let mut s = _mm512_reduce_add_ps(v);
            while c < cols {
                s += E::get_raw(p, c) * *xp.add(c);
                c += 1;
            }
            *yr = s;
        }
    }
}

/// Rows of one panel of the matmul kernel: two vectors, so each broadcast input value feeds two
/// FMAs.
pub(crate) const PANEL: usize = 32;

/// Inputs of one block of the packed x the panel kernel reads (see `pack_inputs` in lib.rs): 12
/// inputs × 2 vectors of rows = 24 accumulators, which with the two weight vectors and a
/// broadcast fit the 32 registers.
pub(crate) const XBLOCK: usize = 12;

/// `y[i][j] = Σ_k panel[k·32 + j] · xb[k·T + i]` for the `T` inputs of one packed block and the
/// 32 rows of one panel, each sum taken in order of k in one f32 accumulator (one FMA per
/// product). An outer product per k: two weight loads and `T` broadcasts feed `2T` FMAs, where
/// the dot-product form (`tile`) needs one load per FMA pair and is held to the L2's rate.
/// Stores rows `0..rows` of inputs `0..inputs`; y of input i starts at `y + i·ystride`.
///
/// # Safety
/// AVX-512F must be available; `panel` covers `32·cols` floats, `xb` `T·cols`, and the stores
/// stay inside the caller's output.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn panel_tile<const T: usize>(
    panel: *const f32,
    xb: *const f32,
    cols: usize,
    y: *mut f32,
    ystride: usize,
    rows: usize,
    inputs: usize,
) {
    unsafe {
        let mut lo = [_mm512_setzero_ps(); T];
        let mut hi = [_mm512_setzero_ps(); T];
        let mut w = panel;
        let mut x = xb;
        for _ in 0..cols {
            let w0 = _mm512_loadu_ps(w);
            let w1 = _mm512_loadu_ps(w.add(16));
            for i in 0..T {
                let v = _mm512_set1_ps(*x.add(i));
                lo[i] = _mm512_fmadd_ps(w0, v, lo[i]);
                hi[i] = _mm512_fmadd_ps(w1, v, hi[i]);
            }
            w = w.add(PANEL);
            x = x.add(T);
        }
        let m0: __mmask16 = if rows >= 16 { 0xffff } else { (1u16 << rows) - 1 };
        let m1: __mmask16 = if rows >= 32 {
            0xffff
        } else if rows > 16 {
            (1u16 << (rows - 16)) - 1
        } else {
            0
        };
        for i in 0..inputs.min(T) {
            let yi = y.add(i * ystride);
            _mm512_mask_storeu_ps(yi, m0, lo[i]);
            _mm512_mask_storeu_ps(yi.add(16), m1, hi[i]);
        }
    }
}

/// Writes the first `rows` (≤ 16) rows of a row-major block (`cols` values per row, row i at
/// `src + i·stride`) column-major into one half of a panel: column k's values at
/// `dst + k·PANEL + i`, zeros for rows `rows..16`. Sixteen columns at a time through an
/// in-register 16×16 transpose (64 shuffles per 256 values), where scalar stores a panel's
/// width apart would each miss L1.
///
/// # Safety
/// AVX-512F must be available; `src` covers the rows read, `dst` `PANEL·cols` floats.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn transpose_into_panel(src: *const f32, stride: usize, rows: usize, cols: usize, dst: *mut f32) {
    unsafe {
        let mut k0 = 0;
        while k0 < cols {
            let nk = (cols - k0).min(16);
            let m: __mmask16 = if nk == 16 { 0xffff } else { (1u16 << nk) - 1 };
            let mut a = [_mm512_setzero_ps(); 16];
            for (i, ai) in a.iter_mut().enumerate().take(rows) {
                *ai = _mm512_maskz_loadu_ps(m, src.add(i * stride + k0));
            }
            // Pairs of rows interleaved (32-bit), then pairs of pairs (64-bit): c[4g + q], lane L,
            // holds column 4L + q of rows 4g..4g+4.
            let mut b = [_mm512_setzero_ps(); 16];
            for p in 0..8 {
                b[2 * p] = _mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]);
                b[2 * p + 1] = _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]);
            }
            let mut c = [_mm512_setzero_ps(); 16];
            for g in 0..4 {
                let (b0, b1, b2, b3) = (
                    _mm512_castps_pd(b[4 * g]),
                    _mm512_castps_pd(b[4 * g + 1]),
                    _mm512_castps_pd(b[4 * g + 2]),
                    _mm512_castps_pd(b[4 * g + 3]),
                );
                c[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(b0, b2));
                c[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(b0, b2));
                c[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b1, b3));
                c[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b1, b3));
            }
            // For each q, the 128-bit lanes of c[q], c[4 + q], c[8 + q], c[12 + q] transposed
            // as a 4×4 matrix: output lane g of column 4L + q is lane L of c[4g + q].
            for q in 0..4 {
                let (x0, x1, x2, x3) = (c[q], c[4 + q], c[8 + q], c[12 + q]);
                let e0 = _mm512_shuffle_f32x4::<0x44>(x0, x1);
                let e1 = _mm512_shuffle_f32x4::<0xEE>(x0, x1);
                let e2 = _mm512_shuffle_f32x4::<0x44>(x2, x3);
                let e3 = _mm512_shuffle_f32x4::<0xEE>(x2, x3);
                let o = [
                    _mm512_shuffle_f32x4::<0x88>(e0, e2),
                    _mm512_shuffle_f32x4::<0xDD>(e0, e2),
                    _mm512_shuffle_f32x4::<0x88>(e1, e3),
                    _mm512_shuffle_f32x4::<0xDD>(e1, e3),
                ];
                for (l, ol) in o.iter().enumerate() {
                    let k = 4 * l + q;
                    if k < nk {
                        _mm512_storeu_ps(dst.add((k0 + k) * PANEL), *ol);
                    }
                }
            }
            k0 += 16;
        }
    }
}
