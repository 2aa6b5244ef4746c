//! MoE expert compute at the Qwen3.5-35B-A3B shapes (hidden 2048, expert intermediate 512, top-8,
//! 4-bit affine g64, bf16 scales), on 1 and 2 threads (or `--threads N,M,...`):
//!
//! - one matvec of an expert's gate/up (2048→512) and down (512→2048) matrix;
//! - one decode layer's routed experts (8 × gate, up, SiLU·, down) run matrix by matrix, each
//!   matrix its own parallel region (`per-matrix`), and as two batches over all 8 experts
//!   (`batched`: gate+up of all, then down of all);
//! - a prefill layer: the same 8 experts with 16 tokens each (512 tokens × 8 / 256 experts);
//! - a dense prefill (2048→8192 over 256 tokens) and the non-expert decode shapes (attention /
//!   GatedDeltaNet projections, shared expert).
//!
//! Weights cycle through distinct copies (≥ 3× the L3 cache) so that they come from DRAM, as
//! they do when decoding. GB/s = weight + scale + bias bytes read per second.
//!
//! Run: `cargo run --release -p flashmoe-kernels --example expert_bench [-- --reps N --threads 1,2]`

use std::hint::black_box;
use std::time::Instant;

use flashmoe_kernels::{FloatType, MatJob, MatRef, matmul, matmul_batch, matvec};

const HIDDEN: usize = 2048;
const INTER: usize = 512;
const TOP_K: usize = 8;
const GROUP: usize = 64;
const PREFILL_TOKENS_PER_EXPERT: usize = 16;

/// One 4-bit affine matrix's bytes.
struct Mat {
    w: Vec<u8>,
    s: Vec<u8>,
    b: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Mat {
    fn random(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut r = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            r ^= r >> 12;
            r ^= r << 25;
            r ^= r >> 27;
            r.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let w: Vec<u8> = (0..rows * cols / 2).map(|_| next() as u8).collect();
        let groups = rows * cols / GROUP;
        let bf = |v: f32| half::bf16::from_f32(v).to_le_bytes();
        let s: Vec<u8> = (0..groups).flat_map(|_| bf(0.002 + (next() % 1000) as f32 * 1e-5)).collect();
        let b: Vec<u8> = (0..groups).flat_map(|_| bf(-0.016 + (next() % 1000) as f32 * 1e-5)).collect();
        Mat { w, s, b, rows, cols }
    }
    fn r(&self) -> MatRef<'_> {
        MatRef::affine(4, GROUP, &self.w, &self.s, &self.b, FloatType::BF16, self.rows, self.cols).unwrap()
    }
    fn bytes(&self) -> usize {
        self.w.len() + self.s.len() + self.b.len()
    }
}

struct Expert {
    gate: Mat,
    up: Mat,
    down: Mat,
}

fn l3_bytes() -> usize {
    (0..8)
        .filter_map(|i| {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
            let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
            let kib: usize = size.trim().strip_suffix('K')?.parse().ok()?;
            (level.trim() == "3").then_some(kib << 10)
        })
        .max()
        .unwrap_or(32 << 20)
}

/// min / median / max of `reps` timed calls of `f(i)`, in seconds.
fn time(reps: usize, mut f: impl FnMut(usize)) -> (f64, f64, f64) {
    f(0);
    let mut t: Vec<f64> = (1..=reps)
        .map(|i| {
            let t0 = Instant::now();
            f(i);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[t.len() / 2], t[t.len() - 1])
}

fn report(what: &str, bytes: usize, (min, med, max): (f64, f64, f64)) {
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    println!(
        "  {what:<44} {:8.1} us median | GB/s {:5.2} min {:5.2} median {:5.2} max",
        med * 1e6,
        gbs(max),
        gbs(med),
        gbs(min)
    );
}

fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (gv, &uv) in g.iter_mut().zip(u) {
        *gv = *gv / (1.0 + (-*gv).exp()) * uv;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let reps: usize = arg("--reps").map(|v| v.parse().expect("--reps N")).unwrap_or(200);
    let threads: Vec<usize> = arg("--threads")
        .map(|v| v.split(',').map(|t| t.parse().expect("--threads N,M")).collect())
        .unwrap_or_else(|| vec![1, 2]);

    let expert_bytes = 3 * HIDDEN * INTER / 2 + 3 * 2 * 2 * HIDDEN * INTER / GROUP;
    let copies = (3 * l3_bytes()).div_ceil(expert_bytes).max(2 * TOP_K).next_multiple_of(TOP_K);
    eprintln!("building {copies} experts ({:.0} MiB)...", (copies * expert_bytes) as f64 / (1 << 20) as f64);
    let experts: Vec<Expert> = (0..copies as u64)
        .map(|i| Expert {
            gate: Mat::random(INTER, HIDDEN, 3 * i),
            up: Mat::random(INTER, HIDDEN, 3 * i + 1),
            down: Mat::random(HIDDEN, INTER, 3 * i + 2),
        })
        .collect();
    let x: Vec<f32> = (0..HIDDEN).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let xs: Vec<f32> =
        (0..PREFILL_TOKENS_PER_EXPERT * HIDDEN).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let layer_bytes = TOP_K * expert_bytes;
    let layers = copies / TOP_K;

    for &nt in &threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(nt).build().unwrap();
        pool.install(|| {
            println!("threads {nt}, 4-bit affine g64 bf16 (SIMD {})", flashmoe_kernels::simd_level());
            let mut y = vec![0f32; HIDDEN];
            report(
                "matvec gate/up 2048->512",
                experts[0].gate.bytes(),
                time(reps * 4, |i| matvec(&experts[i % copies].gate.r(), black_box(&x), &mut y[..INTER])),
            );
            let xi = &x[..INTER];
            report(
                "matvec down 512->2048",
                experts[0].down.bytes(),
                time(reps * 4, |i| matvec(&experts[i % copies].down.r(), black_box(xi), &mut y)),
            );

            // Decode: 8 experts, one token.
            let mut g = vec![vec![0f32; INTER]; TOP_K];
            let mut u = vec![vec![0f32; INTER]; TOP_K];
            let mut d = vec![vec![0f32; HIDDEN]; TOP_K];
            report(
                "decode layer, 8 experts, per-matrix",
                layer_bytes,
                time(reps, |i| {
                    for j in 0..TOP_K {
                        let e = &experts[(i % layers) * TOP_K + j];
                        matvec(&e.gate.r(), &x, &mut g[j]);
                        matvec(&e.up.r(), &x, &mut u[j]);
                        silu_mul(&mut g[j], &u[j]);
                        matvec(&e.down.r(), &g[j], &mut d[j]);
                    }
                }),
            );
            report(
                "decode layer, 8 experts, batched",
                layer_bytes,
                time(reps, |i| {
                    let es = &experts[(i % layers) * TOP_K..][..TOP_K];
                    let mut jobs: Vec<MatJob> = Vec::with_capacity(2 * TOP_K);
                    for ((e, gj), uj) in es.iter().zip(g.iter_mut()).zip(u.iter_mut()) {
                        jobs.push(MatJob { m: e.gate.r(), x: &x, n: 1, y: gj });
                        jobs.push(MatJob { m: e.up.r(), x: &x, n: 1, y: uj });
                    }
                    matmul_batch(&mut jobs);
                    drop(jobs);
                    for (gj, uj) in g.iter_mut().zip(&u) {
                        silu_mul(gj, uj);
                    }
                    let mut jobs: Vec<MatJob> = es
                        .iter()
                        .zip(&g)
                        .zip(d.iter_mut())
                        .map(|((e, gj), dj)| MatJob { m: e.down.r(), x: gj, n: 1, y: dj })
                        .collect();
                    matmul_batch(&mut jobs);
                }),
            );

            // Prefill: 8 experts, 16 tokens each.
            let n = PREFILL_TOKENS_PER_EXPERT;
            let mut g = vec![vec![0f32; n * INTER]; TOP_K];
            let mut u = vec![vec![0f32; n * INTER]; TOP_K];
            let mut d = vec![vec![0f32; n * HIDDEN]; TOP_K];
            let preps = (reps / 10).max(5);
            let per_matrix = time(preps, |i| {
                for j in 0..TOP_K {
                    let e = &experts[(i % layers) * TOP_K + j];
                    matmul(&e.gate.r(), &xs, n, &mut g[j]);
                    matmul(&e.up.r(), &xs, n, &mut u[j]);
                    silu_mul(&mut g[j], &u[j]);
                    matmul(&e.down.r(), &g[j], n, &mut d[j]);
                }
            });
            report(&format!("prefill layer, 8 experts x {n} tok, per-matrix"), layer_bytes, per_matrix);
            let batched = time(preps, |i| {
                let es = &experts[(i % layers) * TOP_K..][..TOP_K];
                let mut jobs: Vec<MatJob> = Vec::with_capacity(2 * TOP_K);
                for ((e, gj), uj) in es.iter().zip(g.iter_mut()).zip(u.iter_mut()) {
                    jobs.push(MatJob { m: e.gate.r(), x: &xs, n, y: gj });
                    jobs.push(MatJob { m: e.up.r(), x: &xs, n, y: uj });
                }
                matmul_batch(&mut jobs);
                drop(jobs);
                for (gj, uj) in g.iter_mut().zip(&u) {
                    silu_mul(gj, uj);
                }
                let mut jobs: Vec<MatJob> = es
                    .iter()
                    .zip(&g)
                    .zip(d.iter_mut())
                    .map(|((e, gj), dj)| MatJob { m: e.down.r(), x: gj, n, y: dj })
                    .collect();
                matmul_batch(&mut jobs);
            });
            report(&format!("prefill layer, 8 experts x {n} tok, batched"), layer_bytes, batched);
            println!(
                "  prefill token-experts/s: per-matrix {:.0}, batched {:.0} (median)",
                (TOP_K * n) as f64 / per_matrix.1,
                (TOP_K * n) as f64 / batched.1
            );

            // Non-expert prefill: one dense 2048→8192 matrix (in_qkv / q_proj) over 256 tokens.
            {
                let (rows, cols, n) = (8192, HIDDEN, 256);
                let mat = Mat::random(rows, cols, 999);
                let xn: Vec<f32> = (0..n * cols).map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0).collect();
                let mut yn = vec![0f32; n * rows];
                let tm = time(3, |_| matmul(&mat.r(), black_box(&xn), n, &mut yn));
                report(&format!("prefill dense 2048->8192 x {n} tok"), mat.bytes(), tm);
                println!("  prefill dense: {:.1} G FMA/s (median)", (rows * cols * n) as f64 / tm.1 / 1e9);
            }

            // Non-expert decode shapes (one matrix, cycled through copies of the same size).
            for (name, rows, cols) in [
                ("in_qkv / q_proj 2048->8192", 8192, HIDDEN),
                ("in_z 2048->4096", 4096, HIDDEN),
                ("out_proj / o_proj 4096->2048", HIDDEN, 4096),
                ("shared gate/up, k/v 2048->512", 512, HIDDEN),
            ] {
                let one = rows * cols / 2 + 2 * 2 * rows * cols / GROUP;
                let nm = (3 * l3_bytes()).div_ceil(one).max(2);
                let mats: Vec<Mat> = (0..nm as u64).map(|s| Mat::random(rows, cols, 1000 + s)).collect();
                let xin: Vec<f32> = (0..cols).map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0).collect();
                let mut yo = vec![0f32; rows];
                report(
                    &format!("matvec {name}"),
                    one,
                    time(reps, |i| matvec(&mats[i % nm].r(), black_box(&xin), &mut yo)),
                );
            }
        });
    }
}
