//! Memory bandwidth vs. matvec throughput on Qwen3.5-397B projection shapes.
//!
//! Run: `cargo run --release -p flashmoe-kernels --example matvec_bench`
//! Optional args: `--quick` (fewer repetitions), `--gib N` (size of the
//! bandwidth buffers, default 1), `--only BITS ROWS` (one affine shape).

use std::hint::black_box;
use std::time::{Duration, Instant};

use flashmoe_kernels::cpu_features::{self, SimdLevel};
use flashmoe_kernels::{FloatType, MatRef, matmul, matvec, matvec_at};
use rayon::prelude::*;

/// Working set for each matvec configuration: several times the last-level
/// cache (at least 256 MiB), so the weights stream from DRAM as they do during
/// decoding. Some server CPUs have 300+ MiB of L3.
fn working_set() -> usize {
    let llc = (0..8)
        .filter_map(|i| {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
            let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
            let size = size.trim();
            let kib: usize = size.strip_suffix('K')?.parse().ok()?;
            (level.trim() == "3").then_some(kib << 10)
        })
        .max()
        .unwrap_or(0);
    (3 * llc).max(256 << 20)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: fast enough to fill gigabytes, quality irrelevant here.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn fill_random(buf: &mut [u8], seed: u64) {
    buf.par_chunks_mut(1 << 20).enumerate().for_each(|(i, c)| {
        let mut r = Rng(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for w in c.chunks_mut(8) {
            let v = r.next().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    });
}

/// Fills with valid floats of `dtype` in ±[0.5, 1): random bit patterns
/// would include NaNs and subnormals, which slow some CPUs down.
fn fill_floats(buf: &mut [u8], dtype: FloatType, seed: u64) {
    let sz = dtype.size();
    buf.par_chunks_mut(sz << 16).enumerate().for_each(|(i, c)| {
        let mut r = Rng(seed ^ (i as u64 + 7).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for e in c.chunks_mut(sz) {
            let v = r.f32() * 0.5 + 0.75 * r.f32().signum();
            match dtype {
                FloatType::F32 => e.copy_from_slice(&v.to_le_bytes()),
                FloatType::F16 => e.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                FloatType::BF16 => e.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
    });
}

struct Stats {
    min: f64,
    med: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats { min: v[0], med: v[v.len() / 2], max: v[v.len() - 1] }
}

/// Best-of-`reps` bandwidths in GB/s: (copy counting read + write bytes as
/// STREAM does, read-only sum).
fn memory_bandwidth(bytes: usize, reps: usize) -> (Stats, Stats) {
    let n = bytes / 4;
    let mut src = vec![0f32; n];
    let mut dst = vec![0f32; n];
    src.par_chunks_mut(1 << 16).for_each(|c| c.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32));
    dst.par_chunks_mut(1 << 16).for_each(|c| c.fill(1.0));
    let chunk = n / (rayon::current_num_threads() * 16);
    let mut copy = Vec::new();
    let mut read = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        copy.push(2.0 * (n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        black_box(&dst);

        let t = Instant::now();
        let s = flashmoe_kernels::parallel_sum(&src);
        read.push((n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        black_box(s);
    }
    (stats(copy), stats(read))
}

/// Owned copies of one matrix configuration.
struct Copies {
    bufs: Vec<[Vec<u8>; 3]>,
    kind: Kind,
    rows: usize,
    cols: usize,
}

#[derive(Clone, Copy)]
enum Kind {
    Affine(u32),
    Float(FloatType),
}

impl Copies {
    fn new(kind: Kind, rows: usize, cols: usize, seed: u64, working_set: usize) -> Self {
        let (wb, sb) = match kind {
            Kind::Affine(bits) => (rows * cols * bits as usize / 8, rows * cols / 64 * 2),
            Kind::Float(dt) => (rows * cols * dt.size(), 0),
        };
        let per = wb + 2 * sb;
        let copies = working_set.div_ceil(per).max(1);
        let bufs = (0..copies)
            .map(|i| {
                let mut w = vec![0u8; wb];
                let mut s = vec![0u8; sb];
                let mut b = vec![0u8; sb];
                let seed = seed.wrapping_add(i as u64 * 3);
                match kind {
                    Kind::Affine(_) => fill_random(&mut w, seed),
                    Kind::Float(dt) => fill_floats(&mut w, dt, seed),
                }
                fill_floats(&mut s, FloatType::BF16, seed + 1);
                fill_floats(&mut b, FloatType::BF16, seed + 2);
                [w, s, b]
            })
            .collect();
        Copies { bufs, kind, rows, cols }
    }

    fn mat(&self, i: usize) -> MatRef<'_> {
        let [w, s, b] = &self.bufs[i % self.bufs.len()];
        match self.kind {
            Kind::Affine(bits) => MatRef::affine(bits, 64, w, s, b, FloatType::BF16, self.rows, self.cols).unwrap(),
            Kind::Float(dt) => MatRef::float(dt, w, self.rows, self.cols).unwrap(),
        }
    }

    fn label(&self) -> String {
        match self.kind {
            Kind::Affine(bits) => format!("{bits}-bit g64"),
            Kind::Float(dt) => format!("{dt:?}"),
        }
    }
}

/// Times calls of `f` on successive copies until `min_time` has passed (and
/// at least one full cycle through the copies plus 20 calls). Returns GB/s
/// per call.
fn time_calls(c: &Copies, min_time: Duration, mut f: impl FnMut(&MatRef)) -> Vec<f64> {
    // One untimed pass so page faults and first-touch effects are excluded.
    for i in 0..c.bufs.len() {
        f(&c.mat(i));
    }
    let bytes = c.mat(0).bytes() as f64;
    let mut out = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < min_time || out.len() < (c.bufs.len() + 20) {
        let m = c.mat(i);
        let t = Instant::now();
        f(&m);
        out.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        i += 1;
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let gib: f64 = args
        .iter()
        .position(|a| a == "--gib")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().expect("--gib N"))
        .unwrap_or(1.0);
    let min_time = Duration::from_millis(if quick { 300 } else { 1500 });
    // `--only BITS ROWS`: a single affine configuration, for A/B experiments.
    let only_affine: Option<(u32, usize)> = args.iter().position(|a| a == "--only").map(|i| {
        let p = |j: usize| args.get(i + j).and_then(|s| s.parse().ok()).expect("--only BITS ROWS");
        (p(1) as u32, p(2))
    });
    let ws = working_set();

    println!(
        "simd: {}  rayon threads: {}  matvec working set: {} MiB",
        cpu_features::simd_level(),
        rayon::current_num_threads(),
        ws >> 20
    );
    let (copy, read) = memory_bandwidth((gib * (1u64 << 30) as f64) as usize, if quick { 3 } else { 8 });
    println!(
        "memory bandwidth ({gib} GiB buffers): copy {:.1} GB/s (best; median {:.1}), read-only sum {:.1} GB/s (best; median {:.1})",
        copy.max, copy.med, read.max, read.med
    );
    let copy_bw = copy.max;
    println!();
    println!(
        "| shape (in→out) | weights | MB/matrix | copies | GB/s min | GB/s median | GB/s max | median / copy | median / read |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");

    let x_max: Vec<f32> = {
        let mut r = Rng(42);
        (0..16 * 16384).map(|_| r.f32()).collect()
    };
    let report = |c: &Copies, v: Vec<f64>, note: &str| {
        let s = stats(v);
        println!(
            "| {}→{}{note} | {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.0}% | {:.0}% |",
            c.cols,
            c.rows,
            c.label(),
            c.mat(0).bytes() as f64 / 1e6,
            c.bufs.len(),
            s.min,
            s.med,
            s.max,
            100.0 * s.med / copy_bw,
            100.0 * s.med / read.max,
        );
    };

    let shapes = [(1024usize, 4096usize), (4096, 1024), (16384, 4096), (248320, 4096)];
    let mut seed = 1;
    for bits in [4u32, 2, 8] {
        for (rows, cols) in shapes {
            if only_affine.is_some_and(|(b, r)| (b, r) != (bits, rows)) {
                continue;
            }
            let c = Copies::new(Kind::Affine(bits), rows, cols, seed, ws);
            seed += 1000;
            let x = &x_max[..cols];
            let mut y = vec![0f32; rows];
            let v = time_calls(&c, min_time, |m| matvec(m, x, &mut y));
            report(&c, v, "");
        }
    }
    if only_affine.is_some() {
        return;
    }
    for dt in [FloatType::BF16, FloatType::F32] {
        let c = Copies::new(Kind::Float(dt), 1024, 4096, seed, ws);
        seed += 1000;
        let mut y = vec![0f32; 1024];
        let v = time_calls(&c, min_time, |m| matvec(m, &x_max[..4096], &mut y));
        report(&c, v, "");
    }
    {
        let c = Copies::new(Kind::Affine(4), 1024, 4096, seed, ws);
        seed += 1000;
        let mut y = vec![0f32; 1024];
        let v = time_calls(&c, min_time, |m| matvec_at(SimdLevel::Scalar, m, &x_max[..4096], &mut y));
        report(&c, v, " (scalar path)");
    }

    println!();
    let n = 16;
    let c = Copies::new(Kind::Affine(4), 16384, 4096, seed, ws);
    let mut y = vec![0f32; n * 16384];
    let v = time_calls(&c, min_time, |m| matmul(m, &x_max[..n * 4096], n, &mut y));
    let s = stats(v);
    let bytes = c.mat(0).bytes() as f64;
    let flops = 2.0 * 16384.0 * 4096.0 * n as f64;
    println!(
        "matmul n={n}, 4096→16384 4-bit g64: weight GB/s min/median/max {:.1}/{:.1}/{:.1}, {:.1} GFLOP/s median, {:.3} ms per call = {:.3} ms per token",
        s.min,
        s.med,
        s.max,
        flops / (bytes / s.med),
        bytes / s.med / 1e6,
        bytes / s.med / 1e6 / n as f64
    );
}
