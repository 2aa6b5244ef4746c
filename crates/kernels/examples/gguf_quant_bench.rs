//! Throughput of the GGUF block-quantization kernels on a 4096×4096 matrix,
//! per type, against the MLX affine 4-bit (group 64, bf16 scales) matvec.
//!
//! Run: `cargo run --release -p flashmoe-kernels --example gguf_quant_bench`
//! Prints, per type: bytes per weight, matvec GB/s on all rayon threads
//! (best SIMD level and scalar), and on one thread (best level, and plain
//! AVX-512F where the best level is AVX512_BF16, whose GGML kernels differ).
//! GB/s counts the matrix bytes read per call.

use std::hint::black_box;
use std::time::{Duration, Instant};

use flashmoe_kernels::cpu_features::{self, SimdLevel};
use flashmoe_kernels::ggml::{self, GgmlType};
use flashmoe_kernels::{FloatType, MatRef, matvec_at};

const N: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: quality irrelevant, speed matters.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Byte offsets of the f16 scales per block (ggml-common.h): they get finite
/// values so the timed data holds no NaN/Inf.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL | IQ4_XS => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

fn random_matrix(ty: GgmlType, rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; N * ty.row_bytes(N).unwrap()];
    for (i, b) in data.iter_mut().enumerate() {
        if i % 8 == 0 {
            rng.next();
        }
        *b = (rng.0 >> (8 * (i % 8))) as u8;
    }
    for block in data.chunks_exact_mut(ty.type_size()) {
        match ty {
            GgmlType::F16 => block.copy_from_slice(&half::f16::from_f32(rng.f32()).to_le_bytes()),
            GgmlType::BF16 => block.copy_from_slice(&half::bf16::from_f32(rng.f32()).to_le_bytes()),
            _ => {
                for &off in f16_fields(ty) {
                    block[off..off + 2].copy_from_slice(&half::f16::from_f32(rng.f32() * 0.1).to_le_bytes());
                }
            }
        }
    }
    data
}

/// Median seconds per call of `f` over at least `min` of calls.
fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut v = Vec::new();
    let start = Instant::now();
    while start.elapsed() < min || v.len() < 5 {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let min = Duration::from_millis(if quick { 100 } else { 500 });
    let best = cpu_features::detected();
    println!(
        "{N}x{N} matvec, {} rayon threads, best level {}; GB/s of matrix bytes",
        rayon::current_num_threads(),
        best.name()
    );
    println!(
        "{:<22} {:>9} {:>14} {:>14} {:>14} {:>14}",
        "type", "bytes/w", "matvec best", "matvec scalar", "1-thread best", "1-thread f32"
    );
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    // The plain AVX-512F kernels, when the best level adds bf16 ones.
    let f32_level = (best == SimdLevel::Avx512Bf16).then_some(SimdLevel::Avx512);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let x: Vec<f32> = (0..N).map(|_| rng.f32()).collect();
    let mut y = vec![0.0f32; N];

    // Baseline: the crate's MLX affine 4-bit matvec (group 64, bf16 scales and biases).
    let w: Vec<u8> = (0..N * N / 2).map(|_| rng.next() as u8).collect();
    let sb: Vec<u8> = (0..N * N / 64).flat_map(|_| half::bf16::from_f32(rng.f32() * 0.1).to_le_bytes()).collect();
    let m = MatRef::affine(4, 64, &w, &sb, &sb, FloatType::BF16, N, N).unwrap();
    let gb = m.bytes() as f64 / 1e9;
    let t_best = time(min, || matvec_at(best, &m, &x, &mut y));
    let t_scalar = time(min, || matvec_at(SimdLevel::Scalar, &m, &x, &mut y));
    let t_one = one.install(|| time(min, || matvec_at(best, &m, &x, &mut y)));
    println!(
        "{:<22} {:>9.4} {:>14.2} {:>14.2} {:>14.2} {:>14}",
        "affine 4-bit g64 bf16",
        m.bytes() as f64 / (N * N) as f64,
        gb / t_best,
        gb / t_scalar,
        gb / t_one,
        "-"
    );

    for ty in GgmlType::SUPPORTED {
        let data = random_matrix(ty, &mut rng);
        let rb = ty.row_bytes(N).unwrap();
        let gb = data.len() as f64 / 1e9;
        let t_best = time(min, || ggml::matvec_at(best, ty, &data, &x, &mut y).unwrap());
        let t_scalar = time(min, || ggml::matvec_at(SimdLevel::Scalar, ty, &data, &x, &mut y).unwrap());
        let t_one = one.install(|| time(min, || ggml::matvec_at(best, ty, &data, &x, &mut y).unwrap()));
        let f32_one = f32_level.map_or("-".to_string(), |level| {
            let t = one.install(|| time(min, || ggml::matvec_at(level, ty, &data, &x, &mut y).unwrap()));
            format!("{:.2}", gb / t)
        });
        println!(
            "{:<22} {:>9.4} {:>14.2} {:>14.2} {:>14.2} {:>14}",
            ty.name(),
            rb as f64 / N as f64,
            gb / t_best,
            gb / t_scalar,
            gb / t_one,
            f32_one
        );
        black_box(&y);
    }
}
