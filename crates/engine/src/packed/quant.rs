//! MLX-layout affine quantization of f32 rows: per group of `group_size` consecutive inputs,
//! scale = (max − min) / (2^bits − 1) and bias = min, both rounded to bf16 *before* the codes are
//! chosen (so the codes are optimal for the values actually stored); codes packed LSB-first into
//! little-endian u32 words. Dequantization is q·scale + bias, as the kernels compute it.

use half::bf16;

/// Quantizes one row. `codes` receives cols·bits/32 words, `scales`/`biases` cols/group values.
pub fn quantize_row(row: &[f32], bits: u32, group: usize, codes: &mut [u32], scales: &mut [bf16], biases: &mut [bf16]) {
    let levels = ((1u32 << bits) - 1) as f32;
    codes.fill(0);
    for (g, chunk) in row.chunks_exact(group).enumerate() {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in chunk {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let scale = bf16::from_f32((hi - lo) / levels);
        let bias = bf16::from_f32(lo);
        scales[g] = scale;
        biases[g] = bias;
        let (s, b) = (scale.to_f32(), bias.to_f32());
        for (j, &v) in chunk.iter().enumerate() {
            let q = if s > 0.0 { ((v - b) / s).round().clamp(0.0, levels) as u32 } else { 0 };
            let i = g * group + j;
            let bit = i * bits as usize;
            codes[bit / 32] |= q << (bit % 32);
        }
    }
}

/// Inverse of [`quantize_row`] (reference implementation, used for error reports and tests).
pub fn dequantize_row(codes: &[u32], scales: &[bf16], biases: &[bf16], bits: u32, group: usize, out: &mut [f32]) {
    let mask = (1u32 << bits) - 1;
    for (i, o) in out.iter_mut().enumerate() {
        let bit = i * bits as usize;
        let q = (codes[bit / 32] >> (bit % 32)) & mask;
        let g = i / group;
        *o = q as f32 * scales[g].to_f32() + biases[g].to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let cols = 256;
        let row: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for bits in [2u32, 4, 8] {
            for group in [32usize, 64, 128] {
                let mut codes = vec![0u32; cols * bits as usize / 32];
                let mut s = vec![bf16::ZERO; cols / group];
                let mut b = vec![bf16::ZERO; cols / group];
                quantize_row(&row, bits, group, &mut codes, &mut s, &mut b);
                let mut back = vec![0.0; cols];
                dequantize_row(&codes, &s, &b, bits, group, &mut back);
                for (i, (&x, &y)) in row.iter().zip(&back).enumerate() {
                    let step = s[i / group].to_f32();
                    // Half a step, plus the bf16 rounding of bias and scale·levels.
                    let tol = 0.5 * step + 0.01 * (x.abs() + step * ((1 << bits) - 1) as f32);
                    assert!((x - y).abs() <= tol, "bits {bits} group {group} i {i}: {x} vs {y} (step {step})");
                }
            }
        }
    }

    #[test]
    fn packing_is_lsb_first() {
        // 8 codes of 4 bits: element n in bits [4n, 4n+3] of word 0.
        let row: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
        let mut codes = vec![0u32; 4];
        let mut s = vec![bf16::ZERO; 1];
        let mut b = vec![bf16::ZERO; 1];
        quantize_row(&row, 4, 32, &mut codes, &mut s, &mut b);
        assert_eq!(s[0].to_f32(), 1.0);
        assert_eq!(b[0].to_f32(), 0.0);
        assert_eq!(codes[0], 0x7654_3210);
        assert_eq!(codes[1], 0xfedc_ba98);
    }
}
