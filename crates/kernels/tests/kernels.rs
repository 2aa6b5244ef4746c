//! Kernel results against a naive f64 reference that decodes the raw bytes
//! independently of the library code.

use flashmoe_kernels::cpu_features::SimdLevel;
use flashmoe_kernels::ggml::{self, GgmlType};
use flashmoe_kernels::{
    FloatType, KernelError, MatJob, MatRef, dequant_row_at, matmul, matmul_at, matmul_batch_at, matvec, matvec_at,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn levels() -> Vec<SimdLevel> {
    SimdLevel::ALL.into_iter().filter(|l| l.is_supported()).collect()
}

fn encode(dtype: FloatType, vals: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in vals {
        match dtype {
            FloatType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            FloatType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            FloatType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

fn decode(dtype: FloatType, bytes: &[u8], i: usize) -> f64 {
    match dtype {
        FloatType::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()) as f64,
        FloatType::F16 => half::f16::from_le_bytes(bytes[2 * i..2 * i + 2].try_into().unwrap()).to_f64(),
        FloatType::BF16 => half::bf16::from_le_bytes(bytes[2 * i..2 * i + 2].try_into().unwrap()).to_f64(),
    }
}

/// Copies `bytes` to an allocation at an odd offset so the slice is not
/// 4-byte aligned. The Vec is returned to keep the storage alive.
fn misalign(bytes: &[u8], offset: usize) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; bytes.len() + 8];
    let base = v.as_ptr() as usize;
    let start = (8 - base % 8) % 8 + offset;
    v[start..start + bytes.len()].copy_from_slice(bytes);
    (v, start)
}

/// Owned test matrix plus its naive f64 dequantization.
struct TestMat {
    bufs: Vec<(Vec<u8>, usize, usize)>,
    kind: Kind,
    rows: usize,
    cols: usize,
    dense: Vec<f64>,
}

enum Kind {
    Float(FloatType),
    Affine(u32, usize, FloatType),
    Ggml(GgmlType),
}

impl TestMat {
    fn float(rng: &mut StdRng, dtype: FloatType, rows: usize, cols: usize, off: usize) -> Self {
        let vals: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let bytes = encode(dtype, &vals);
        let dense = (0..rows * cols).map(|i| decode(dtype, &bytes, i)).collect();
        let (v, s) = misalign(&bytes, off);
        TestMat { bufs: vec![(v, s, bytes.len())], kind: Kind::Float(dtype), rows, cols, dense }
    }

    #[allow(clippy::too_many_arguments)]
    fn affine(rng: &mut StdRng, bits: u32, gs: usize, sbt: FloatType, rows: usize, cols: usize, off: usize) -> Self {
        let per_word = 32 / bits as usize;
        let nwords = rows * cols / per_word;
        let words: Vec<u32> = (0..nwords).map(|_| rng.random()).collect();
        let wbytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let ng = rows * cols / gs;
        let scales: Vec<f32> = (0..ng).map(|_| rng.random_range(0.001..0.1)).collect();
        // MLX stores bias ≈ -scale·2^(bits-1) (the group minimum), so the
        // Σq·x and Σx terms partly cancel; mimic that to stress precision.
        let biases: Vec<f32> =
            scales.iter().map(|s| -s * (1u32 << (bits - 1)) as f32 + rng.random_range(-0.01..0.01)).collect();
        let sb = encode(sbt, &scales);
        let bb = encode(sbt, &biases);
        let mask = (1u64 << bits) - 1;
        let dense = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let word = words[(r * cols + c) / per_word] as u64;
                let q = (word >> (bits as usize * (c % per_word))) & mask;
                let g = r * (cols / gs) + c / gs;
                q as f64 * decode(sbt, &sb, g) + decode(sbt, &bb, g)
            })
            .collect();
        let bufs = [wbytes, sb, bb]
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let (v, s) = misalign(&b, (off + i) % 4);
                (v, s, b.len())
            })
            .collect();
        TestMat { bufs, kind: Kind::Affine(bits, gs, sbt), rows, cols, dense }
    }

    /// Random blocks of a GGML type (finite f16 scales), densified by the crate's dequantizer
    /// (bit-exact to gguf-py: tests/gguf_quants.rs).
    fn ggml(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize, off: usize) -> Self {
        let mut bytes = vec![0u8; rows * ty.row_bytes(cols).unwrap()];
        rng.fill(&mut bytes[..]);
        let f16_fields: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            _ => unimplemented!("test matrices of {ty}"),
        };
        for block in bytes.chunks_exact_mut(ty.type_size()) {
            for &o in f16_fields {
                let v = rng.random_range(1e-3f32..0.1) * if rng.random() { 1.0 } else { -1.0 };
                block[o..o + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
        let mut row = vec![0f32; cols];
        let rb = ty.row_bytes(cols).unwrap();
        let mut dense = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            ggml::dequantize_row(ty, &bytes[r * rb..(r + 1) * rb], &mut row).unwrap();
            dense.extend(row.iter().map(|&v| v as f64));
        }
        let (v, s) = misalign(&bytes, off);
        TestMat { bufs: vec![(v, s, bytes.len())], kind: Kind::Ggml(ty), rows, cols, dense }
    }

    fn buf(&self, i: usize) -> &[u8] {
        let (v, s, l) = &self.bufs[i];
        &v[*s..s + l]
    }

    fn mat(&self) -> MatRef<'_> {
        match self.kind {
            Kind::Float(dt) => MatRef::float(dt, self.buf(0), self.rows, self.cols).unwrap(),
            Kind::Affine(bits, gs, sbt) => {
                MatRef::affine(bits, gs, self.buf(0), self.buf(1), self.buf(2), sbt, self.rows, self.cols).unwrap()
            }
            Kind::Ggml(ty) => MatRef::ggml(ty, self.buf(0), self.rows, self.cols).unwrap(),
        }
    }

    /// Checks y (len rows) against W·x with the tolerance 1e-5·Σ|W||x|.
    fn check(&self, x: &[f32], y: &[f32], what: &str) {
        assert_eq!(y.len(), self.rows);
        for (r, (row, &yr)) in self.dense.chunks_exact(self.cols).zip(y).enumerate() {
            let exact: f64 = row.iter().zip(x).map(|(w, &x)| w * x as f64).sum();
            let mag: f64 = row.iter().zip(x).map(|(w, &x)| (w * x as f64).abs()).sum();
            let err = (yr as f64 - exact).abs();
            assert!(
                err <= 1e-5 * mag + 1e-30,
                "{what}: row {r}: got {yr} want {exact} (err {err:e}, bound {:e})",
                1e-5 * mag
            );
        }
    }
}

fn rand_x(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// matvec, matmul (several n) and dequant_row on every SIMD level.
fn exercise(tm: &TestMat, rng: &mut StdRng, label: &str) {
    let m = tm.mat();
    let x = rand_x(rng, tm.cols);
    for level in levels() {
        let what = format!("{label} {level:?}");
        let mut y = vec![f32::NAN; tm.rows];
        matvec_at(level, &m, &x, &mut y);
        tm.check(&x, &y, &format!("{what} matvec"));

        for n in [2usize, 3, 5] {
            let xs = rand_x(rng, n * tm.cols);
            let mut ys = vec![f32::NAN; n * tm.rows];
            matmul_at(level, &m, &xs, n, &mut ys);
            for t in 0..n {
                tm.check(
                    &xs[t * tm.cols..(t + 1) * tm.cols],
                    &ys[t * tm.rows..(t + 1) * tm.rows],
                    &format!("{what} matmul n={n} t={t}"),
                );
            }
        }

        let mut out = vec![f32::NAN; tm.cols];
        for r in [0, tm.rows / 2, tm.rows - 1] {
            dequant_row_at(level, &m, r, &mut out);
            for (c, &o) in out.iter().enumerate() {
                let want = tm.dense[r * tm.cols + c];
                assert!(
                    (o as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{what} dequant_row r={r} c={c}: {o} vs {want}"
                );
            }
        }
    }
}

const SB_TYPES: [FloatType; 3] = [FloatType::BF16, FloatType::F16, FloatType::F32];

#[test]
fn affine_all_bits_groups_dtypes() {
    let mut rng = StdRng::seed_from_u64(1);
    for bits in [2u32, 4, 8] {
        for gs in [32usize, 64, 128] {
            for (i, sbt) in SB_TYPES.into_iter().enumerate() {
                for (rows, cols) in [(1, gs), (7, 3 * gs), (5, 512), (3, 1024)] {
                    let tm = TestMat::affine(&mut rng, bits, gs, sbt, rows, cols, i + 1);
                    exercise(&tm, &mut rng, &format!("affine b{bits} gs{gs} {sbt:?} {rows}x{cols}"));
                }
            }
        }
    }
}

#[test]
fn affine_odd_shapes_and_group_sizes() {
    let mut rng = StdRng::seed_from_u64(2);
    // (bits, gs, cols): cols=96 with gs=32; group sizes whose word count per
    // group is not a multiple of 8 (mixed-group SIMD chunks, 4-word tails)
    // or not a multiple of 4 (scalar fallback inside the SIMD level).
    let cases = [
        (4, 32, 96),
        (2, 32, 96),
        (8, 32, 96),
        (4, 32, 32),
        (4, 96, 288),
        (2, 64, 192),
        (8, 16, 48),
        (4, 8, 24),
        (4, 16, 80),
        (2, 16, 48),
        (8, 4, 12),
        (8, 128, 128),
        (4, 64, 64),
    ];
    for (bits, gs, cols) in cases {
        for rows in [1usize, 7, 13] {
            let tm = TestMat::affine(&mut rng, bits, gs, FloatType::BF16, rows, cols, rows % 4);
            exercise(&tm, &mut rng, &format!("affine b{bits} gs{gs} {rows}x{cols}"));
        }
    }
}

#[test]
fn affine_large_threaded() {
    let mut rng = StdRng::seed_from_u64(3);
    // rows*cols above the parallel threshold so the rayon path runs.
    for bits in [2u32, 4, 8] {
        let tm = TestMat::affine(&mut rng, bits, 64, FloatType::BF16, 301, 2048, 3);
        exercise(&tm, &mut rng, &format!("affine large b{bits}"));
    }
}

#[test]
fn float_all_dtypes() {
    let mut rng = StdRng::seed_from_u64(4);
    for dt in SB_TYPES {
        for (rows, cols) in [(1, 1), (1, 64), (7, 37), (64, 64), (3, 96), (9, 4096), (300, 1000)] {
            for off in [0usize, 1, 3] {
                let tm = TestMat::float(&mut rng, dt, rows, cols, off);
                exercise(&tm, &mut rng, &format!("float {dt:?} {rows}x{cols}+{off}"));
            }
        }
    }
}

#[test]
fn matmul_matches_repeated_matvec() {
    let mut rng = StdRng::seed_from_u64(5);
    let mats = [
        TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 45, 512, 1),
        TestMat::affine(&mut rng, 2, 64, FloatType::BF16, 130, 2048, 2),
        TestMat::float(&mut rng, FloatType::BF16, 33, 256, 1),
    ];
    for tm in &mats {
        let m = tm.mat();
        let n = 7;
        let xs = rand_x(&mut rng, n * tm.cols);
        let mut ys = vec![0.0; n * tm.rows];
        matmul(&m, &xs, n, &mut ys);
        for t in 0..n {
            let mut y = vec![0.0; tm.rows];
            matvec(&m, &xs[t * tm.cols..(t + 1) * tm.cols], &mut y);
            for r in 0..tm.rows {
                let (a, b) = (ys[t * tm.rows + r], y[r]);
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "t={t} r={r}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn rows_slice_and_bytes() {
    let mut rng = StdRng::seed_from_u64(6);
    let tms = [
        TestMat::affine(&mut rng, 4, 32, FloatType::BF16, 10, 96, 1),
        TestMat::affine(&mut rng, 8, 64, FloatType::F32, 10, 128, 2),
        TestMat::float(&mut rng, FloatType::F16, 10, 40, 3),
    ];
    for tm in &tms {
        let m = tm.mat();
        let x = rand_x(&mut rng, tm.cols);
        let mut full = vec![0.0; tm.rows];
        matvec(&m, &x, &mut full);
        let sub = m.rows_slice(3, 4);
        assert_eq!((sub.rows, sub.cols), (4, tm.cols));
        assert_eq!(sub.bytes() * 10, m.bytes() * 4);
        let mut part = vec![0.0; 4];
        matvec(&sub, &x, &mut part);
        assert_eq!(part, full[3..7]);
        assert_eq!(m.rows_slice(10, 0).rows, 0);
    }
    let tm = &tms[0];
    // 10 rows × 96 cols at 4 bits = 480 B; 10×3 scales and biases of 2 B.
    assert_eq!(tm.mat().bytes(), 480 + 60 + 60);
}

#[test]
#[should_panic]
fn rows_slice_out_of_range_panics() {
    let data = vec![0u8; 4 * 4 * 4];
    let m = MatRef::float(FloatType::F32, &data, 4, 4).unwrap();
    let _ = m.rows_slice(2, 3);
}

#[test]
fn zero_sized() {
    let m = MatRef::float(FloatType::F32, &[], 3, 0).unwrap();
    let mut y = vec![1.0; 3];
    matvec(&m, &[], &mut y);
    assert_eq!(y, [0.0; 3]);
    let m = MatRef::float(FloatType::F32, &[], 0, 5).unwrap();
    matvec(&m, &[0.0; 5], &mut []);
    matmul(&m, &[0.0; 10], 2, &mut []);
}

#[test]
fn construction_errors() {
    let w = vec![0u8; 4 * 64 / 8 * 2];
    let sb = vec![0u8; 2 * 2];
    let ok = MatRef::affine(4, 64, &w, &sb, &sb, FloatType::BF16, 2, 64);
    assert!(ok.is_ok());
    let bad = |r: Result<MatRef, KernelError>| {
        let e = r.unwrap_err();
        assert!(!e.to_string().is_empty());
    };
    bad(MatRef::affine(3, 64, &w, &sb, &sb, FloatType::BF16, 2, 64));
    bad(MatRef::affine(4, 0, &w, &sb, &sb, FloatType::BF16, 2, 64));
    bad(MatRef::affine(4, 12, &w, &sb, &sb, FloatType::BF16, 2, 60));
    bad(MatRef::affine(4, 32, &w, &sb, &sb, FloatType::BF16, 2, 48));
    bad(MatRef::affine(4, 64, &w[1..], &sb, &sb, FloatType::BF16, 2, 64));
    bad(MatRef::affine(4, 64, &w, &sb[1..], &sb, FloatType::BF16, 2, 64));
    bad(MatRef::affine(4, 64, &w, &sb, &sb[..2], FloatType::BF16, 2, 64));
    bad(MatRef::affine(4, 64, &w, &sb, &sb, FloatType::F32, 2, 64));
    bad(MatRef::float(FloatType::BF16, &w, 3, 3));
    bad(MatRef::float(FloatType::F32, &w, usize::MAX, 2));
    assert!(MatRef::float(FloatType::F16, &w, 4, 8).is_ok());
}

#[test]
fn simd_level_reported() {
    let name = flashmoe_kernels::simd_level();
    assert!(SimdLevel::ALL.iter().any(|l| l.name() == name), "{name}");
}

#[test]
fn affine_group_blocks_and_remainders() {
    // The AVX2 path for whole-chunk groups widens scales eight groups at a time: 11 and 19
    // groups exercise full blocks plus 3 left-over groups, 1 group the left-overs alone.
    let mut rng = StdRng::seed_from_u64(6);
    for (bits, gs) in [(4u32, 64usize), (2, 128), (8, 32), (4, 128)] {
        for ng in [1usize, 8, 11, 19] {
            for sbt in SB_TYPES {
                let tm = TestMat::affine(&mut rng, bits, gs, sbt, 5, ng * gs, 1);
                exercise(&tm, &mut rng, &format!("affine b{bits} gs{gs} {sbt:?} groups {ng}"));
            }
        }
    }
}

/// Inputs that stress a kernel which writes x in fixed point per group of 64 (the AVX512_VNNI
/// 4-bit kernel): a group with one large value among small ones, groups of values far apart in
/// size, tiny and huge values, zeros; every level within the f64 reference's tolerance. A NaN
/// or an infinity in x gives a NaN or infinite output, not a finite number.
#[test]
fn affine_4bit_inputs_of_every_range() {
    let mut rng = StdRng::seed_from_u64(9);
    let tm = TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 7, 1024, 1);
    let m = tm.mat();
    let base = rand_x(&mut rng, 1024);
    let cases: Vec<(&str, Vec<f32>)> = vec![
        (
            "outlier per group",
            base.iter().enumerate().map(|(i, &v)| if i % 64 == 5 { 3.0e3 } else { v * 1e-2 }).collect(),
        ),
        (
            "groups 1e-30 to 1e30",
            base.iter().enumerate().map(|(i, &v)| v * 10f32.powi((i / 64) as i32 * 4 - 30)).collect(),
        ),
        ("subnormal group", base.iter().enumerate().map(|(i, &v)| if i < 64 { v * 1e-39 } else { v }).collect()),
        ("zeros", base.iter().enumerate().map(|(i, &v)| if i % 128 < 64 { 0.0 } else { v }).collect()),
        ("largest finite", base.iter().map(|&v| v * 1e36).collect()),
    ];
    for (what, x) in &cases {
        for level in levels() {
            let mut y = vec![f32::NAN; tm.rows];
            matvec_at(level, &m, x, &mut y);
            tm.check(x, &y, &format!("{what} on {level:?}"));
        }
    }
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = base.clone();
        x[300] = bad;
        for level in levels() {
            let mut y = vec![0.0f32; tm.rows];
            matvec_at(level, &m, &x, &mut y);
            assert!(y.iter().all(|v| !v.is_finite()), "x holding {bad} on {level:?}: {y:?}");
        }
    }
}

/// A batch of mixed products (affine of every width, float, GGML blocks, one input and several,
/// jobs sharing an input, an empty matrix) on 1 and 3 threads: every output against the f64
/// reference, and equal to what `matvec`/`matmul` give for that job alone.
#[test]
fn matmul_batch_mixed_jobs() {
    let mut rng = StdRng::seed_from_u64(7);
    // (matrix, tokens, input id): jobs with the same input id share one x slice.
    let mats = [
        (TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 512, 2048, 0), 1, 0),
        (TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 512, 2048, 1), 1, 0),
        (TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 2048, 512, 2), 1, 1),
        (TestMat::affine(&mut rng, 2, 64, FloatType::F16, 77, 2048, 3), 1, 0),
        (TestMat::affine(&mut rng, 8, 32, FloatType::F32, 130, 2048, 0), 1, 0),
        (TestMat::affine(&mut rng, 4, 32, FloatType::BF16, 9, 96, 1), 1, 2),
        (TestMat::float(&mut rng, FloatType::BF16, 300, 2048, 1), 1, 0),
        (TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 255, 512, 2), 6, 3),
        (TestMat::float(&mut rng, FloatType::F32, 61, 512, 0), 6, 3),
        (TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 0, 512, 0), 1, 1),
        (TestMat::ggml(&mut rng, GgmlType::Q4_K, 512, 2048, 1), 1, 0),
        (TestMat::ggml(&mut rng, GgmlType::Q4_K, 512, 2048, 2), 1, 0),
        (TestMat::ggml(&mut rng, GgmlType::Q6_K, 2048, 512, 3), 1, 1),
        (TestMat::ggml(&mut rng, GgmlType::Q4_0, 40, 96, 0), 1, 2),
        (TestMat::ggml(&mut rng, GgmlType::Q8_0, 70, 512, 1), 1, 1),
        (TestMat::ggml(&mut rng, GgmlType::Q4_K, 33, 512, 0), 6, 3),
        // Enough inputs for the panel kernel.
        (TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 100, 512, 1), 30, 4),
        (TestMat::ggml(&mut rng, GgmlType::Q4_0, 70, 512, 2), 30, 4),
    ];
    let inputs: Vec<Vec<f32>> = vec![
        rand_x(&mut rng, 2048),
        rand_x(&mut rng, 512),
        rand_x(&mut rng, 96),
        rand_x(&mut rng, 6 * 512),
        rand_x(&mut rng, 30 * 512),
    ];
    for threads in [1usize, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for level in levels() {
            let mut ys: Vec<Vec<f32>> = mats.iter().map(|(tm, n, _)| vec![f32::NAN; n * tm.rows]).collect();
            let mut jobs: Vec<MatJob> = mats
                .iter()
                .zip(ys.iter_mut())
                .map(|((tm, n, xi), y)| MatJob { m: tm.mat(), x: &inputs[*xi], n: *n, y })
                .collect();
            pool.install(|| matmul_batch_at(level, &mut jobs));
            drop(jobs);
            for (k, ((tm, n, xi), y)) in mats.iter().zip(&ys).enumerate() {
                let x = &inputs[*xi];
                for t in 0..*n {
                    tm.check(
                        &x[t * tm.cols..(t + 1) * tm.cols],
                        &y[t * tm.rows..(t + 1) * tm.rows],
                        &format!("batch job {k} {level:?} threads {threads} t={t}"),
                    );
                }
                let mut alone = vec![f32::NAN; n * tm.rows];
                matmul_at(level, &tm.mat(), x, *n, &mut alone);
                assert!(
                    alone.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "batch job {k} {level:?} threads {threads}: differs from the same product alone"
                );
            }
        }
    }
}

/// matmul with token counts around its 2-input tiles and beyond, row counts around its 4-row
/// tiles, column counts around the 8-wide vectors, against the f64 reference on every SIMD level;
/// from 24 inputs on AVX-512 the panel kernel: rows around its 32-row panels and 16-row
/// transposes, inputs around its blocks of 12 (widths 4, 8, 12), columns around 16.
#[test]
fn matmul_blocked_shapes() {
    let mut rng = StdRng::seed_from_u64(8);
    let mats = [
        TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 13, 576, 1),
        TestMat::affine(&mut rng, 4, 32, FloatType::F16, 21, 96, 2),
        TestMat::float(&mut rng, FloatType::F32, 11, 37, 3),
        TestMat::float(&mut rng, FloatType::BF16, 9, 263, 0),
        TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 77, 192, 1),
        TestMat::float(&mut rng, FloatType::F32, 48, 33, 2),
        TestMat::ggml(&mut rng, GgmlType::Q4_0, 40, 96, 0),
        TestMat::ggml(&mut rng, GgmlType::Q4_K, 33, 256, 1),
    ];
    for tm in &mats {
        for n in [2usize, 4, 14, 15, 16, 17, 24, 25, 29, 31, 46, 64] {
            let xs = rand_x(&mut rng, n * tm.cols);
            for level in levels() {
                let mut ys = vec![f32::NAN; n * tm.rows];
                matmul_at(level, &tm.mat(), &xs, n, &mut ys);
                for t in 0..n {
                    tm.check(
                        &xs[t * tm.cols..(t + 1) * tm.cols],
                        &ys[t * tm.rows..(t + 1) * tm.rows],
                        &format!("{}x{} n={n} t={t} {level:?}", tm.rows, tm.cols),
                    );
                }
            }
        }
    }
}

/// A decode batch of up to `SMALL_BATCH` rows gets, row by row, exactly the numbers each row
/// gets alone (the one-row kernel per row), through `matmul` and through `matmul_batch`; a
/// larger batch stays within rounding of the reference.
#[test]
fn small_batches_give_each_row_the_numbers_it_gets_alone() {
    let mut rng = StdRng::seed_from_u64(77);
    let mats = [
        TestMat::affine(&mut rng, 4, 64, FloatType::BF16, 300, 512, 0),
        TestMat::affine(&mut rng, 8, 64, FloatType::F16, 96, 256, 1),
        TestMat::affine(&mut rng, 2, 32, FloatType::BF16, 64, 128, 0),
        TestMat::float(&mut rng, FloatType::BF16, 130, 192, 0),
        TestMat::float(&mut rng, FloatType::F32, 70, 64, 0),
    ];
    for level in levels() {
        for tm in &mats {
            let m = tm.mat();
            for n in [2, 3, 8, 9] {
                let x = rand_x(&mut rng, n * m.cols);
                let mut alone = vec![0.0f32; n * m.rows];
                for t in 0..n {
                    matvec_at(level, &m, &x[t * m.cols..(t + 1) * m.cols], &mut alone[t * m.rows..(t + 1) * m.rows]);
                }
                let mut together = vec![0.0f32; n * m.rows];
                matmul_at(level, &m, &x, n, &mut together);
                let mut batched = vec![0.0f32; n * m.rows];
                matmul_batch_at(level, &mut [MatJob { m, x: &x, n, y: &mut batched }]);
                if n <= flashmoe_kernels::SMALL_BATCH {
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&together), bits(&alone), "{level:?} {n} rows: matmul");
                    assert_eq!(bits(&batched), bits(&alone), "{level:?} {n} rows: matmul_batch");
                } else {
                    for t in 0..n {
                        tm.check(&x[t * m.cols..(t + 1) * m.cols], &together[t * m.rows..(t + 1) * m.rows], "matmul");
                    }
                }
            }
        }
    }
}
