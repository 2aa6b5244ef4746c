//! Portable kernels. Always correct, used when no SIMD level is available and
//! as the reference the SIMD paths are tested against.

use crate::elem::{Elem, get_u32};

/// Dot product with four partial sums, which lets the compiler pipeline the
/// adds and keeps rounding error lower than one long chain.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 4];
    let ca = a.chunks_exact(4);
    let cb = b.chunks_exact(4);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..4 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

pub(crate) fn float_matvec<E: Elem>(data: &[u8], cols: usize, x: &[f32], y: &mut [f32]) {
    let rb = cols * E::SIZE;
    for (r, yr) in y.iter_mut().enumerate() {
        let row = &data[r * rb..(r + 1) * rb];
        let mut acc = [0.0f32; 4];
        let mut c = 0;
        while c + 4 <= cols {
            for i in 0..4 {
                acc[i] += E::get(row, c + i) * x[c + i];
            }
            c += 4;
        }
        let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        for (cc, &xv) in x.iter().enumerate().skip(c) {
            s += E::get(row, cc) * xv;
        }
        *yr = s;
    }
}

pub(crate) fn float_row<E: Elem>(row: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = E::get(row, i);
    }
}

/// Σ_g (scale_g·Σ q·x + bias_g·Σ x), with `sx[g]` = Σ x over group g.
#[allow(clippy::too_many_arguments)]
pub(crate) fn affine_matvec<E: Elem, const B: u32>(
    group_size: usize,
    w: &[u8],
    s: &[u8],
    b: &[u8],
    cols: usize,
    x: &[f32],
    sx: &[f32],
    y: &mut [f32],
) {
    let epw = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    let wpr = cols / epw;
    let ng = cols / group_size;
    let wpg = group_size / epw;
    for (r, yr) in y.iter_mut().enumerate() {
        let wrow = &w[r * wpr * 4..(r + 1) * wpr * 4];
        let mut total = 0.0f32;
        for (g, &sxg) in sx.iter().enumerate().take(ng) {
            let mut acc = 0.0f32;
            for j in g * wpg..(g + 1) * wpg {
                let word = get_u32(wrow, j);
                let xw = &x[j * epw..(j + 1) * epw];
                for (k, &xv) in xw.iter().enumerate() {
                    acc += ((word >> (B as usize * k)) & mask) as f32 * xv;
                }
            }
            total += E::get(s, r * ng + g) * acc + E::get(b, r * ng + g) * sxg;
        }
        *yr = total;
    }
}

pub(crate) fn affine_row<E: Elem, const B: u32>(group_size: usize, w: &[u8], s: &[u8], b: &[u8], out: &mut [f32]) {
    let epw = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    for (g, og) in out.chunks_exact_mut(group_size).enumerate() {
        let (sc, bi) = (E::get(s, g), E::get(b, g));
        for (jj, ow) in og.chunks_exact_mut(epw).enumerate() {
            let word = get_u32(w, g * (group_size / epw) + jj);
            for (k, o) in ow.iter_mut().enumerate() {
                *o = ((word >> (B as usize * k)) & mask) as f32 * sc + bi;
            }
        }
    }
}
