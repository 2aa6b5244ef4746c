//! Single-thread, cache-resident kernel throughput: isolates instruction
//! throughput from DRAM bandwidth. Reports the best of many calls, which is
//! the least disturbed by other processes sharing the machine.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo run --release -p flashmoe-kernels --example kernel_micro`

use std::hint::black_box;
use std::time::Instant;

use flashmoe_kernels::cpu_features::SimdLevel;
use flashmoe_kernels::{FloatType, MatRef, matvec_at};

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
}
