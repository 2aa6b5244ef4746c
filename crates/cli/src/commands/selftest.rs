//! `flashmoe selftest --device cuda[:N]`: every GPU kernel against the CPU kernels
//! (`flashmoe_kernels::matvec`) on fresh random inputs and several shapes, odd ones included,
//! with the outputs poisoned (NaN) before each launch. Prints a pass/fail table; any failure (or
//! no GPU) is a non-zero exit.

use anyhow::{Result, anyhow, bail};
use clap::Args;
use flashmoe::cuda::gemv::{AFFINE_VARIANTS, GGML_GPU_TYPES};
use flashmoe::cuda::{AffineVariant, CudaDevice, DevFormat, DevMatrix, GemvKernels, gemv::ROWS_PER_WARP, parse_device};
use flashmoe_kernels::ggml::GgmlType;
use flashmoe_kernels::{FloatType, MatRef, matvec};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Largest accepted max|y − ref| / max|ref| (both sides accumulate in f32).
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print only failures and the summary: the global `--quiet`, set by main.
    #[arg(skip)]
    pub quiet: bool,
}

/// Tolerance of the shift variants (see the check below).
const SHIFT_TOLERANCE: f64 = 1e-2;

/// SplitMix64: inputs only need to be varied, not cryptographic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n.div_ceil(8)).flat_map(|_| self.next().to_le_bytes()).take(n).collect()
    }
    fn bf16s(&mut self, n: usize, lo: f32, hi: f32) -> Vec<u8> {
        (0..n).flat_map(|_| ((self.f32(lo, hi).to_bits() >> 16) as u16).to_le_bytes()).collect()
    }
}

/// Byte offsets of the f16 scale fields (d, and m/dmin where the type has one) in a block of `ty`.
fn ggml_f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[0],
    }
}

/// Random blocks of `ty` for a `[rows, cols]` matrix: random codes and sub-block scales, f16
/// scales in ±0.05 (random bits would include infinities and NaNs).
fn ggml_random(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Result<Vec<u8>> {
    let mut w = rng.bytes(rows * ty.row_bytes(cols)?);
    for block in w.chunks_exact_mut(ty.type_size()) {
        for &o in ggml_f16_fields(ty) {
            let v = half::f16::from_f32(rng.f32(-0.05, 0.05));
            block[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    Ok(w)
}

/// max|got − want| / max|want|, NaN when any output is not finite (unwritten outputs are NaN).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut err, mut scale, mut finite) = (0f64, 0f64, true);
    for (g, r) in got.iter().zip(want) {
        finite &= g.is_finite();
        err = err.max((*g as f64 - *r as f64).abs());
        scale = scale.max((*r as f64).abs());
    }
    if finite { err / scale.max(f64::MIN_POSITIVE) } else { f64::NAN }
}

struct Outcome {
    kernel: String,
    rows_per_warp: usize,
    rows: usize,
    cols: usize,
    rel: f64,
    pass: bool,
}

pub fn run(a: SelftestArgs) -> Result<()> {
    if a.device == "cpu" {
        bail!("selftest checks the GPU kernels against the CPU ones: use --device cuda or cuda:N");
    }
    let ordinal = parse_device(&a.device)?;
    let dev = CudaDevice::open(ordinal)?;
    println!("device  {}", dev.describe());
    let t = Instant::now();
    let k = GemvKernels::load(&dev)?;
    println!(
        "kernels compiled or loaded from {} in {:.2} s",
        flashmoe::cuda::context::cache_dir().display(),
        t.elapsed().as_secs_f64()
    );

    let mut rng = Rng(a.seed);
    let mut results: Vec<Outcome> = Vec::new();
    let mut skipped = 0usize;
    let shapes: Vec<(usize, usize)> =
        [1usize, 7, 1000].iter().flat_map(|&r| [64usize, 192, 256, 512, 768, 4096].map(move |c| (r, c))).collect();
    let mut formats: Vec<DevFormat> = Vec::new();
    for bits in [2u32, 4, 8] {
        for group_size in [32usize, 64, 128] {
            formats.push(DevFormat::Affine { bits, group_size });
        }
    }
    formats.push(DevFormat::Bf16);
    formats.push(DevFormat::F32);
    formats.extend(GGML_GPU_TYPES.map(DevFormat::Ggml));
    if !a.quiet {
        println!("{:<10} {:>3} {:>6} {:>6} {:>11}  result", "kernel", "rpw", "rows", "cols", "rel err");
    }
    for format in formats {
        for &(rows, cols) in &shapes {
            if format.check(rows, cols).is_err() {
                skipped += 1;
                continue;
            }
            // Fresh random matrix per format and shape.
            let (w, s, b);
            let m = match format {
                DevFormat::Affine { bits, group_size } => {
                    w = rng.bytes(rows * cols * bits as usize / 8);
                    let ng = rows * cols / group_size;
                    // Scales of either sign, biases ~ -scale·2^(bits-1), as real checkpoints have.
                    s = rng.bf16s(ng, -0.05, 0.05);
                    b = rng.bf16s(ng, -0.4, 0.4);
                    MatRef::affine(bits, group_size, &w, &s, &b, FloatType::BF16, rows, cols)?
                }
                DevFormat::Bf16 => {
                    w = rng.bf16s(rows * cols, -1.0, 1.0);
                    MatRef::float(FloatType::BF16, &w, rows, cols)?
                }
                DevFormat::F32 => {
                    w = (0..rows * cols).flat_map(|_| rng.f32(-1.0, 1.0).to_le_bytes()).collect();
                    MatRef::float(FloatType::F32, &w, rows, cols)?
                }
                DevFormat::Ggml(ty) => {
                    w = ggml_random(&mut rng, ty, rows, cols)?;
                    MatRef::ggml(ty, &w, rows, cols)?
                }
            };
            let dm = DevMatrix::upload(&dev, &m)?;
            let affine = matches!(format, DevFormat::Affine { .. });
            // GGML: every rows-per-warp too (Q4_K's GEMV has its own kernel per 1, 2 and 4).
            let rpws: &[usize] = if affine || matches!(format, DevFormat::Ggml(_)) { &ROWS_PER_WARP } else { &[1] };
            // Affine: both x paths (padded shared-memory copy, and global memory).
            let paths: &[bool] = if affine { &[false, true] } else { &[false] };
            let variants: Vec<AffineVariant> = AFFINE_VARIANTS.into_iter().filter(|v| v.applies(format)).collect();
            let combos =
                variants.iter().flat_map(|&v| rpws.iter().flat_map(move |&r| paths.iter().map(move |&p| (v, r, p))));
            for (variant, rpw, x_global) in combos {
                let base = format!("{}{}", format.name(), variant.suffix());
                let name = if x_global { format!("{base}/gx") } else { base };
                // Fresh x for every launch.
                let x: Vec<f32> = (0..cols).map(|_| rng.f32(-1.0, 1.0)).collect();
                let mut want = vec![0f32; rows];
                matvec(&m, &x, &mut want);
                let dx = dev.upload_f32(&x)?;
                let dy = dev.alloc(rows * 4)?;
                dy.fill_bytes(0xFF)?; // every f32 a NaN: an unwritten output fails
                k.gemv_variant(&dev, &dm, &dx, &dy, Some(rpw), x_global, variant)?;
                let got = dy.read_f32()?;
                let rel = rel_err(&got, &want);
                // The shift variants (not the default) subtract 2^23·Σx once per segment, which
                // costs ~2^-16 of each term's magnitude: on a single short row that can exceed
                // 1e-4 of max|ref|, so they are held to SHIFT_TOLERANCE instead.
                let tol = if matches!(variant, AffineVariant::Fadd | AffineVariant::Prefetch) {
                    a.tolerance
                } else {
                    SHIFT_TOLERANCE
                };
                let pass = rel <= tol; // false for NaN
                if !a.quiet || !pass {
                    println!(
                        "{:<10} {:>3} {:>6} {:>6} {:>11.3e}  {}",
                        name,
                        rpw,
                        rows,
                        cols,
                        rel,
                        if pass { "ok" } else { "FAIL" }
                    );
                }
                results.push(Outcome { kernel: name, rows_per_warp: rpw, rows, cols, rel, pass });
            }
            // The batched GEMV of decode's experts (three problems, the second taking
            // silu(gate)·up) and the multi-token GEMM of prefill (9 tokens: one full tile of 8
            // and a partial one).
            let view = dm.view();
            let mut checks: Vec<(String, Vec<f32>, flashmoe::cuda::DevBuf)> = Vec::new();
            let mut items = Vec::new();
            let mut keep = Vec::new();
            for p in 0..3 {
                let swiglu = p == 1;
                let raw: Vec<f32> = (0..if swiglu { 2 * cols } else { cols }).map(|_| rng.f32(-1.0, 1.0)).collect();
                let x: Vec<f32> = if swiglu {
                    (0..cols).map(|i| raw[i] / (1.0 + (-raw[i]).exp()) * raw[cols + i]).collect()
                } else {
                    raw.clone()
                };
                let mut want = vec![0f32; rows];
                matvec(&m, &x, &mut want);
                let dx = dev.upload_f32(&raw)?;
                let dy = dev.alloc(rows * 4)?;
                dy.fill_bytes(0xFF)?;
                items.push(flashmoe::cuda::gemv::BatchItem { m: view, x: dx.ptr(), y: dy.ptr(), swiglu });
                keep.push(dx);
                checks.push((format!("batch/{}", format.name()), want, dy));
            }
            k.gemv_batch(&dev, &items)?;
            // t random inputs and the CPU kernels' products of them.
            let mut inputs = |t: usize| {
                let xs: Vec<f32> = (0..t * cols).map(|_| rng.f32(-1.0, 1.0)).collect();
                let mut want = vec![0f32; t * rows];
                for ti in 0..t {
                    matvec(&m, &xs[ti * cols..(ti + 1) * cols], &mut want[ti * rows..(ti + 1) * rows]);
                }
                (xs, want)
            };
            let t = 9;
            let (xs, want) = inputs(t);
            let dx = dev.upload_f32(&xs)?;
            let dy = dev.alloc(t * rows * 4)?;
            dy.fill_bytes(0xFF)?;
            k.gemm(&dev, &view, dx.ptr(), dy.ptr(), t, None)?;
            keep.push(dx);
            checks.push((format!("gemm/{}", format.name()), want, dy));
            if k.tensor_core_fits(format, cols) {
                // The same on tensor cores (split TF32 operands): 41 tokens, one full item of 32 pairs
                // and a partial one (an n-tile of 8 and one of a single pair).
                let t = 41;
                let (xs, want) = inputs(t);
                let dx = dev.upload_f32(&xs)?;
                let dy = dev.alloc(t * rows * 4)?;
                dy.fill_bytes(0xFF)?;
                let (hi, lo, sums) = (dev.alloc(t * cols * 4)?, dev.alloc(t * cols * 4)?, dev.alloc(t * cols)?);
                let scratch = flashmoe::cuda::gemv::TcInput { xh: hi.ptr(), xl: lo.ptr(), xsum: sums.ptr() };
                k.gemm(&dev, &view, dx.ptr(), dy.ptr(), t, Some(&scratch))?;
                keep.extend([dx, hi, lo, sums]);
                checks.push((format!("gemm-tc/{}", format.name()), want, dy));
            }
            if let DevFormat::Ggml(ty) = format {
                // Rows as f32 (the cuBLAS prefill's tiles and the embedding lookup): rows
                // 1, 0 and the last, looked up by id.
                let ids = [1.min(rows - 1) as i32, 0, (rows - 1) as i32];
                let mut want = vec![0f32; ids.len() * cols];
                for (&r, out) in ids.iter().zip(want.chunks_exact_mut(cols)) {
                    let rb = ty.row_bytes(cols)?;
                    flashmoe_kernels::ggml::dequantize_row(ty, &w[r as usize * rb..(r as usize + 1) * rb], out)?;
                }
                let dids = dev.upload(&ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>())?;
                let dy = dev.alloc(want.len() * 4)?;
                dy.fill_bytes(0xFF)?;
                k.ggml_rows(&dev, ty, view.w, dids.ptr(), 0, ids.len(), cols, dy.ptr())?;
                keep.push(dids);
                checks.push((format!("rows/{}", format.name()), want, dy));
            }
            for (name, want, dy) in checks {
                let got = dy.read_f32()?;
                let rel = rel_err(&got, &want);
                let pass = rel <= a.tolerance; // false for NaN
                if !a.quiet || !pass {
                    println!(
                        "{:<10} {:>3} {:>6} {:>6} {:>11.3e}  {}",
                        name,
                        0,
                        rows,
                        cols,
                        rel,
                        if pass { "ok" } else { "FAIL" }
                    );
                }
                results.push(Outcome { kernel: name, rows_per_warp: 0, rows, cols, rel, pass });
            }
        }
    }

    // Summary: one line per kernel.
    println!();
    println!(
        "summary (tolerance {:.0e} relative to max|ref|, {SHIFT_TOLERANCE:.0e} for the non-default shift variants s/sp; f32 accumulation on both sides; gemm-tc: tensor cores, split operands)",
        a.tolerance
    );
    println!("{:<10} {:>6} {:>6} {:>12}  worst case", "kernel", "checks", "failed", "worst rel");
    let mut names: Vec<String> = Vec::new();
    for r in &results {
        if !names.contains(&r.kernel) {
            names.push(r.kernel.clone());
        }
    }
    let mut failed = 0;
    for n in &names {
        let rs: Vec<&Outcome> = results.iter().filter(|r| &r.kernel == n).collect();
        let nf = rs.iter().filter(|r| !r.pass).count();
        failed += nf;
        let worst = rs
            .iter()
            .max_by(|x, y| {
                let (a, b) = (
                    if x.rel.is_nan() { f64::INFINITY } else { x.rel },
                    if y.rel.is_nan() { f64::INFINITY } else { y.rel },
                );
                a.total_cmp(&b)
            })
            .ok_or_else(|| anyhow!("no checks for {n}"))?;
        println!(
            "{:<10} {:>6} {:>6} {:>12.3e}  rpw {} [{}x{}]  {}",
            n,
            rs.len(),
            nf,
            worst.rel,
            worst.rows_per_warp,
            worst.rows,
            worst.cols,
            if nf == 0 { "PASS" } else { "FAIL" }
        );
    }
    println!(
        "{} checks, {} failed, {} format/shape pairs skipped (cols not a multiple of the group or of 16 bytes)",
        results.len(),
        failed,
        skipped
    );
    if failed > 0 {
        bail!("{failed} of {} GPU kernel checks failed", results.len());
    }
    println!("selftest: PASS");
    Ok(())
}
