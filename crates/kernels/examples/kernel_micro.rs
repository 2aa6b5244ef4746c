//! Single-thread, cache-resident kernel throughput: isolates instruction
//! throughput from DRAM bandwidth. Reports the best of many calls, which is
//! the least disturbed by other processes sharing the machine.
//!
//! Also the GGUF types of the common Qwen GGUFs (same shape; d's and scales random f16 in
//! ±0.1, other bytes random), and 4-bit matmuls: 512×2048 over 4–64 tokens (the prefill of one
//! 35B-A3B expert matrix) and 2048×2048 over 512 (a dense projection), with the dequantization
//! of their rows alone. `FLASHMOE_MATMUL_KERNEL=tiles|panels` forces a matmul kernel.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo run --release -p flashmoe-kernels --example kernel_micro`

use std::hint::black_box;
use std::time::Instant;

use flashmoe_kernels::cpu_features::SimdLevel;
use flashmoe_kernels::ggml::{self, GgmlType};
use flashmoe_kernels::{FloatType, MatRef, dequant_row_at, matmul_at, matvec_at};

fn main() {
    let (rows, cols) = (64usize, 4096usize);
    let x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let mut y = vec![0f32; rows];
    let sb: Vec<u8> =
        (0..rows * cols / 64).flat_map(|i| half::bf16::from_f32(0.01 + (i % 13) as f32 * 1e-3).to_le_bytes()).collect();
    let levels: Vec<SimdLevel> = SimdLevel::ALL.into_iter().filter(|l| l.is_supported()).collect();
    for bits in [4u32, 2, 8] {
        let w: Vec<u8> =
            (0..rows * cols * bits as usize / 8).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let m = MatRef::affine(bits, 64, &w, &sb, &sb, FloatType::BF16, rows, cols).unwrap();
        for &level in &levels {
            let mut best = f64::MAX;
            for _ in 0..2000 {
                let t = Instant::now();
                matvec_at(level, &m, black_box(&x), &mut y);
                best = best.min(t.elapsed().as_secs_f64());
            }
            black_box(&y);
            println!(
                "{bits}-bit g64 {rows}x{cols} {:>8}: {:6.2} GB/s  {:7.1} ns/row",
                level.name(),
                m.bytes() as f64 / best / 1e9,
                best * 1e9 / rows as f64
            );
        }
    }

    // GGUF block types on the best level (one thread when run as the header says).
    let best_level = *levels.last().expect("scalar is always supported");
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ] {
        let rb = ty.row_bytes(cols).unwrap();
        let mut data: Vec<u8> = (0..rows * rb).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for (i, block) in data.chunks_exact_mut(ty.type_size()).enumerate() {
            for &off in f16_fields(ty) {
                let v = ((i * 7919) % 200) as f32 / 1000.0 - 0.1;
                block[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
        let mut best = f64::MAX;
        for _ in 0..2000 {
            let t = Instant::now();
            ggml::matvec_at(best_level, ty, &data, black_box(&x), &mut y).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        black_box(&y);
        println!(
            "{:<6} {rows}x{cols} {:>8}: {:6.2} GB/s  {:7.1} ns/row",
            ty.name(),
            best_level.name(),
            data.len() as f64 / best / 1e9,
            best * 1e9 / rows as f64
        );
    }

    // Prefill of one expert matrix (Qwen3.5-35B-A3B gate/up, 512×2048, 4-bit g64) over 16
    // tokens, weights and inputs in cache: the matmul kernel's compute rate.
    for (rows, cols, n) in [
        (512usize, 2048usize, 4usize),
        (512, 2048, 8),
        (512, 2048, 12),
        (512, 2048, 16),
        (512, 2048, 24),
        (512, 2048, 32),
        (512, 2048, 64),
        (2048, 2048, 512),
    ] {
        let w: Vec<u8> = (0..rows * cols / 2).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let sb: Vec<u8> = (0..rows * cols / 64)
            .flat_map(|i| half::bf16::from_f32(0.01 + (i % 13) as f32 * 1e-3).to_le_bytes())
            .collect();
        let m = MatRef::affine(4, 64, &w, &sb, &sb, FloatType::BF16, rows, cols).unwrap();
        let xs: Vec<f32> = (0..n * cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let mut ys = vec![0f32; n * rows];
        for &level in &levels {
            let mut best = f64::MAX;
            for _ in 0..(4e8 / (rows * cols * n) as f64).clamp(3.0, 100.0) as usize {
                let t = Instant::now();
                matmul_at(level, &m, black_box(&xs), n, &mut ys);
                best = best.min(t.elapsed().as_secs_f64());
            }
            black_box(&ys);
            let mut row = vec![0f32; cols];
            let mut dq = f64::MAX;
            for _ in 0..100 {
                let t = Instant::now();
                for r in 0..rows {
                    dequant_row_at(level, &m, r, &mut row);
                    black_box(&row);
                }
                dq = dq.min(t.elapsed().as_secs_f64());
            }
            println!("  dequantizing the {rows} rows alone: {:7.1} us", dq * 1e6);
            println!(
                "matmul 4-bit g64 {rows}x{cols} n={n} {:>8}: {:6.2} G FMA/s  {:7.1} us",
                level.name(),
                (rows * cols * n) as f64 / best / 1e9,
                best * 1e6
            );
        }
    }
}

/// Byte offsets of a block's f16 fields (d, dmin), which random bytes would make NaN or huge.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}
