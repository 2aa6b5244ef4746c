//! `flashmoe gpubench gemv`: GEMV bandwidth on the GPU for the qwen3.5-397b shapes, next to the
//! device-to-device copy bandwidth (and a read-only stream) measured in the same run.
//!
//! Bytes counted for a GEMV: the matrix's weights + scales + biases (x and y are noise next to
//! them). Each configuration cycles through several copies of the matrix (≥ 256 MiB in all, so
//! the 50 MB L2 cannot serve the small shapes from the previous call), is warmed up, then timed
//! with CUDA events over many calls per repetition; min/median/max over the repetitions. Two
//! launch modes: plain stream launches, and the same launches captured into a CUDA graph and
//! replayed (what a decode step will do; it removes most of the launch gaps).

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use flashmoe::cuda::gemv::AFFINE_VARIANTS;
use flashmoe::cuda::{AffineVariant, CudaDevice, DevBuf, DevFormat, DevMatrix, GemvKernels, parse_device};
use flashmoe_tools::bench::Spread;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GpubenchArgs {
    #[command(subcommand)]
    pub what: GpubenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum GpubenchWhat {
    /// Quantized and dense GEMV GB/s against the copy bandwidth, for the 397B shapes.
    Gemv(GemvBenchArgs),
    /// A decode token's expert MLPs (k routed from a pool of slots + the shared one), as decode
    /// launches them: GB/s of expert bytes against the copy bandwidth, one launch against two.
    Experts(ExpertsBenchArgs),
}

#[derive(Args, Debug)]
pub struct ExpertsBenchArgs {
    /// cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Expert shapes: qwen3.5-35b-a3b (2048×512, 8 of 256 + shared) and/or qwen3.5-397b-a17b
    /// (4096×1024, 10 of 512 + shared).
    #[arg(long, value_delimiter = ',', default_value = "qwen3.5-35b-a3b,qwen3.5-397b-a17b")]
    pub geometry: Vec<String>,
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    #[arg(long, default_value_t = 64)]
    pub group_size: usize,
    /// Repetitions (each 64 tokens' expert phases replayed from a graph, many times).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
}

#[derive(Args, Debug)]
pub struct GemvBenchArgs {
    /// cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Affine bit widths to time.
    #[arg(long, value_delimiter = ',', default_value = "4,2,8")]
    pub bits: Vec<u32>,
    #[arg(long, default_value_t = 64)]
    pub group_size: usize,
    /// Rows per warp of the affine kernels to time (each of 1, 2, 4), besides the default choice.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub rows_per_warp: Vec<usize>,
    /// Repetitions (each many calls) per configuration.
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// GGML block types to time too (e.g. Q4_0,Q4_K,Q6_K,Q8_0), on random bytes.
    #[arg(long, value_delimiter = ',')]
    pub ggml: Vec<String>,
    /// Skip the bf16 / f32 dense GEMVs.
    #[arg(long)]
    pub no_dense: bool,
    /// Skip the affine variant that reads x from global memory (shown as `/gx`) where the
    /// shared-memory one applies.
    #[arg(long)]
    pub no_global_x: bool,
    /// Shapes as IN:OUT (default: the qwen3.5-397b-a17b ones).
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// Write every measurement as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(a: GpubenchArgs) -> Result<()> {
    match a.what {
        GpubenchWhat::Gemv(g) => gemv(g),
        GpubenchWhat::Experts(e) => experts(e),
    }
}

const SHAPES_397B: [(usize, usize); 5] = [(4096, 1024), (1024, 4096), (4096, 16384), (8192, 4096), (4096, 248320)];

fn gbs(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

/// Times `reps` repetitions of `body` (which enqueues `calls` operations of `bytes` each) and
/// returns the GB/s spread.
fn time_reps(
    dev: &CudaDevice,
    reps: usize,
    calls: usize,
    bytes: f64,
    mut body: impl FnMut() -> Result<()>,
) -> Result<Spread> {
    let t = dev.timer()?;
    body()?; // warm-up
    dev.synchronize()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        t.start()?;
        body()?;
        t.stop()?;
        v.push(gbs(bytes * calls as f64, t.ms()?));
    }
    Ok(Spread::of(&v))
}

/// Device-to-device copies of `src` (whole), 10 per repetition: read + written bytes per second.
fn copy_bandwidth(dev: &CudaDevice, src: &DevBuf, reps: usize) -> Result<Spread> {
    let dst = dev.alloc(src.len())?;
    time_reps(dev, reps, 10, 2.0 * src.len() as f64, || {
        for _ in 0..10 {
            dev.copy_dtod(src, &dst, src.len())?;
        }
        Ok(())
    })
}

fn fmt_spread(s: &Spread) -> String {
    format!("{:7.0} [{:5.0}–{:5.0}]", s.median, s.min, s.max)
}

fn gemv(a: GemvBenchArgs) -> Result<()> {
    let dev = CudaDevice::open(parse_device(&a.device)?)?;
    let k = GemvKernels::load(&dev)?;
    println!("device  {}", dev.describe());
    let reps = a.reps.max(1);

    const GIB: usize = 1 << 30;
    let src = dev.alloc(GIB)?;
    k.fill_u32(&dev, &src, 7)?;
    let copies = 10;
    let copy = copy_bandwidth(&dev, &src, reps)?;
    // Read-only stream over the same 1 GiB.
    let blocks = (dev.sm_count * 8) as u32;
    let scratch = dev.alloc(blocks as usize * 4)?;
    let read = time_reps(&dev, reps, copies, GIB as f64, || {
        for _ in 0..copies {
            k.read_stream(&dev, &src, &scratch, blocks)?;
        }
        Ok(())
    })?;
    drop(src);
    println!("copy    cuMemcpyDtoD 1 GiB, (read + written bytes)/s: GB/s {}", fmt_spread(&copy));
    println!("read    read-only stream kernel 1 GiB, read bytes/s:  GB/s {}", fmt_spread(&read));
    println!("        GEMV % below = GEMV GB/s / copy's read+write GB/s (median over median)");
    println!();

    let shapes: Vec<(usize, usize)> = if a.shapes.is_empty() {
        SHAPES_397B.to_vec()
    } else {
        a.shapes
            .iter()
            .map(|s| {
                let (i, o) = s.split_once(':').ok_or_else(|| anyhow::anyhow!("shape {s:?} is not IN:OUT"))?;
                Ok((i.parse()?, o.parse()?))
            })
            .collect::<Result<_>>()?
    };
    let mut formats: Vec<DevFormat> =
        a.bits.iter().map(|&bits| DevFormat::Affine { bits, group_size: a.group_size }).collect();
    if !a.no_dense {
        formats.push(DevFormat::Bf16);
        formats.push(DevFormat::F32);
    }
    for name in &a.ggml {
        let ty = flashmoe_kernels::ggml::GgmlType::ALL
            .into_iter()
            .find(|t| t.to_string().eq_ignore_ascii_case(name))
            .ok_or_else(|| anyhow::anyhow!("unknown GGML type {name:?}"))?;
        formats.push(DevFormat::Ggml(ty));
    }
    for rw in &a.rows_per_warp {
        if !flashmoe::cuda::gemv::ROWS_PER_WARP.contains(rw) {
            bail!("--rows-per-warp takes 1, 2 or 4, not {rw}");
        }
    }

    println!(
        "{:<12} {:<10} {:>3} {:>4} {:>9} {:>6}  {:>21} {:>21} {:>6} {:>5}",
        "in→out",
        "format",
        "rpw",
        "regs",
        "MB",
        "copies",
        "stream GB/s med[min–max]",
        "graph GB/s med[min–max]",
        "%copy",
        "µs"
    );
    let mut records = Vec::new();
    let mut best: Vec<(String, String, usize, Spread, f64)> = Vec::new();
    let total_mem = dev.total_memory;
    for &(cols, rows) in &shapes {
        let x = dev.alloc(cols * 4)?;
        k.fill_f32(&dev, &x, 11)?;
        let y = dev.alloc(rows * 4)?;
        for &format in &formats {
            format.check(rows, cols)?;
            // Enough copies to keep every call out of L2, within a third of the GPU's memory.
            let one = DevMatrix::random(&dev, &k, format, rows, cols, 1)?;
            let bytes = one.bytes();
            let want = (256usize << 20).div_ceil(bytes).clamp(1, 64);
            let ncopies = want.min((total_mem / 3 / bytes).max(1));
            let mut mats = vec![one];
            for i in 1..ncopies {
                mats.push(DevMatrix::random(&dev, &k, format, rows, cols, 1 + i as u32)?);
            }
            // Calls per repetition: ≥ 2 GiB of matrix traffic, ≥ 20 calls, a whole number of cycles.
            let calls = ((2usize << 30).div_ceil(bytes).max(20)).div_ceil(ncopies) * ncopies;
            let default_rw = GemvKernels::default_rows_per_warp(&dev, rows);
            let affine = matches!(format, DevFormat::Affine { .. });
            let rws: Vec<usize> = match format {
                DevFormat::Affine { .. } | DevFormat::Ggml(_) => a.rows_per_warp.clone(),
                _ => vec![1],
            };
            // Affine: x staged in shared memory (the default) and, for comparison, read from global.
            let x_paths: Vec<bool> = match format {
                DevFormat::Affine { bits, .. } => {
                    if GemvKernels::x_smem_bytes(bits, cols) > 48 << 10 {
                        vec![true]
                    } else if a.no_global_x {
                        vec![false]
                    } else {
                        vec![false, true]
                    }
                }
                _ => vec![true],
            };
            let mut best_here: Option<(usize, String, Spread)> = None;
            let variants: Vec<AffineVariant> = AFFINE_VARIANTS.into_iter().filter(|v| v.applies(format)).collect();
            let default_variant = AffineVariant::default_for(format);
            let mut combos: Vec<(AffineVariant, usize, bool)> = Vec::new();
            for &v in &variants {
                for &r in &rws {
                    combos.extend(x_paths.iter().map(|&g| (v, r, g)));
                }
            }
            for (variant, rw, x_global) in combos {
                let (regs, local) = k.resources(format, rw, x_global, variant)?;
                let launch_all = |mats: &[DevMatrix], x: &DevBuf, y: &DevBuf| -> Result<()> {
                    for m in mats {
                        k.gemv_variant(&dev, m, x, y, Some(rw), x_global, variant)?;
                    }
                    Ok(())
                };
                let stream = time_reps(&dev, reps, calls, bytes as f64, || {
                    for _ in 0..calls / ncopies {
                        launch_all(&mats, &x, &y)?;
                    }
                    Ok(())
                })?;
                let graph =
                    dev.capture(|| launch_all(&mats, &x, &y).map_err(|e| flashmoe::cuda::CudaError(e.to_string())))?;
                let graph_s = time_reps(&dev, reps, calls, bytes as f64, || {
                    for _ in 0..calls / ncopies {
                        graph.launch()?;
                    }
                    Ok(())
                })?;
                let pct = 100.0 * graph_s.median / copy.median;
                let us = bytes as f64 / (graph_s.median * 1e9) * 1e6;
                let base = format!("{}{}", format.name(), variant.suffix());
                let fname = if affine && x_global { format!("{base}/gx") } else { base };
                println!(
                    "{:<12} {:<10} {:>3} {:>4} {:>9.1} {:>6}  {:>21} {:>21} {:>5.0}% {:>5.1}{}{}",
                    format!("{cols}→{rows}"),
                    fname,
                    rw,
                    regs,
                    bytes as f64 / 1e6,
                    ncopies,
                    fmt_spread(&stream),
                    fmt_spread(&graph_s),
                    pct,
                    us,
                    if local > 0 { format!("  (local {local} B)") } else { String::new() },
                    if rw == default_rw && affine && !x_global && variant == default_variant {
                        "  *default"
                    } else {
                        ""
                    }
                );
                records.push(json!({
                    "in": cols, "out": rows, "format": format.name(), "variant": variant.suffix(), "x_global": affine && x_global, "rows_per_warp": rw, "default_rows_per_warp": default_rw,
                    "regs": regs, "local_bytes": local, "bytes": bytes, "copies": ncopies, "calls_per_rep": calls,
                    "stream_gbs": {"min": stream.min, "median": stream.median, "max": stream.max},
                    "graph_gbs": {"min": graph_s.min, "median": graph_s.median, "max": graph_s.max},
                    "pct_of_copy": pct,
                }));
                if best_here.as_ref().is_none_or(|(_, _, b)| graph_s.median > b.median) {
                    best_here = Some((rw, fname, graph_s));
                }
            }
            if let Some((rw, name, s)) = best_here {
                best.push((format!("{cols}→{rows}"), name, rw, s, bytes as f64));
            }
        }
    }

    println!();
    println!(
        "summary: best rows/warp per shape, CUDA-graph replay, GB/s of weight+scale+bias bytes; copy {:.0} GB/s (r+w), read-only {:.0} GB/s",
        copy.median, read.median
    );
    println!(
        "{:<12} {:<10} {:>3} {:>21} {:>6} {:>6} {:>7}",
        "in→out", "format", "rpw", "GB/s med[min–max]", "%copy", "%read", "µs/call"
    );
    for (shape, f, rw, s, bytes) in &best {
        println!(
            "{:<12} {:<10} {:>3} {:>21} {:>5.0}% {:>5.0}% {:>7.1}",
            shape,
            f,
            rw,
            fmt_spread(s),
            100.0 * s.median / copy.median,
            100.0 * s.median / read.median,
            bytes / (s.median * 1e9) * 1e6
        );
    }
    if let Some(p) = &a.json {
        let doc = json!({
            "device": dev.name, "arch": dev.arch(), "sm_count": dev.sm_count, "l2_bytes": dev.l2_bytes,
            "copy_gbs_read_plus_write": {"min": copy.min, "median": copy.median, "max": copy.max},
            "read_stream_gbs": {"min": read.min, "median": read.median, "max": read.max},
            "reps": reps, "gemv": records,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc)?)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// (hidden, expert intermediate, shared intermediate, routed per token, experts per layer).
fn expert_geometry(name: &str) -> Result<(usize, usize, usize, usize, usize)> {
    Ok(match name {
        "qwen3.5-35b-a3b" => (2048, 512, 512, 8, 256),
        "qwen3.5-397b-a17b" => (4096, 1024, 1024, 10, 512),
        _ => bail!("unknown geometry {name:?} (qwen3.5-35b-a3b, qwen3.5-397b-a17b)"),
    })
}

fn experts(a: ExpertsBenchArgs) -> Result<()> {
    use flashmoe::cuda::gemv::{ExpertsArgs, FusedExpertsArgs, GemvProblem, MatOff};
    let dev = CudaDevice::open(parse_device(&a.device)?)?;
    let kern = GemvKernels::load(&dev)?;
    println!("device  {}", dev.describe());
    let reps = a.reps.max(1);
    let copy = {
        let src = dev.alloc(1 << 30)?;
        kern.fill_u32(&dev, &src, 7)?;
        copy_bandwidth(&dev, &src, reps)?
    };
    println!("copy    cuMemcpyDtoD 1 GiB, (read + written bytes)/s: GB/s {}", fmt_spread(&copy));
    let format = DevFormat::Affine { bits: a.bits, group_size: a.group_size };
    const TOKENS: usize = 64;
    for name in &a.geometry {
        let (h, inter, shared_inter, k, n_experts) = expert_geometry(name)?;
        // One slot per expert: gate, up, down (codes, scales, biases each), 256-byte aligned.
        let mat_bytes = |rows: usize, cols: usize| {
            let w = rows * cols * a.bits as usize / 8;
            let sb = rows * (cols / a.group_size) * 2;
            (w, sb)
        };
        let mut off = 0usize;
        let mut mats = [MatOff::default(); 3];
        for (m, (rows, cols)) in mats.iter_mut().zip([(inter, h), (inter, h), (h, inter)]) {
            let (w, sb) = mat_bytes(rows, cols);
            *m = MatOff {
                w: off as u64,
                s: (off + w) as u64,
                b: (off + w + sb) as u64,
                rows: rows as i32,
                cols: cols as i32,
            };
            off = (off + w + 2 * sb).next_multiple_of(256);
        }
        let slot = off;
        let pool = dev.alloc(slot * n_experts)?;
        // Random bf16 everywhere: finite scales and biases, any bits as codes.
        kern.fill_bf16(&dev, &pool, 3)?;
        let table: Vec<u64> = (0..n_experts).map(|e| pool.ptr() + (e * slot) as u64).collect();
        let table_buf = dev.upload(&bytemuck_u64(&table))?;
        // TOKENS selections of k distinct experts (a fixed LCG).
        let mut ids = Vec::with_capacity(TOKENS * k);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..TOKENS {
            let mut pick: Vec<i32> = Vec::with_capacity(k);
            while pick.len() < k {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let e = ((state >> 33) % n_experts as u64) as i32;
                if !pick.contains(&e) {
                    pick.push(e);
                }
            }
            ids.extend(pick);
        }
        let ids_buf = dev.upload(&ids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
        let sh = [
            DevMatrix::random(&dev, &kern, format, shared_inter, h, 41)?,
            DevMatrix::random(&dev, &kern, format, shared_inter, h, 42)?,
            DevMatrix::random(&dev, &kern, format, h, shared_inter, 43)?,
        ];
        let x = dev.alloc(h * 4)?;
        kern.fill_f32(&dev, &x, 11)?;
        let imax2 = 2 * inter.max(shared_inter);
        let gu = dev.alloc((k + 1) * imax2 * 4)?;
        let ys = dev.alloc((k + 1) * h * 4)?;
        let gu_at = |j: usize| gu.ptr() + (j * imax2 * 4) as u64;
        let ys_at = |j: usize| ys.ptr() + (j * h * 4) as u64;
        let shared_p = [
            GemvProblem::new(&sh[0].view(), x.ptr(), gu_at(k), false),
            GemvProblem::new(&sh[1].view(), x.ptr(), gu_at(k) + (shared_inter * 4) as u64, false),
            GemvProblem::new(&sh[2].view(), gu_at(k), ys_at(k), true),
        ];
        let bytes_per_token = (k * slot + sh.iter().map(|m| m.bytes()).sum::<usize>()) as f64;
        let ids_at = |t: usize| ids_buf.ptr() + (t * k * 4) as u64;
        let two = |t: usize| -> Result<()> {
            let mut gate_up = ExpertsArgs {
                ids: ids_at(t),
                table: table_buf.ptr(),
                x: x.ptr(),
                y: gu_at(0),
                x_stride: 0,
                y_stride: imax2 as i64,
                k: k as i32,
                nmat: 2,
                swiglu: 0,
                ..Default::default()
            };
            gate_up.mat = [mats[0], mats[1]];
            gate_up.shared = [shared_p[0], shared_p[1]];
            kern.experts(&dev, format, &gate_up, inter.max(shared_inter), h)?;
            let mut down = ExpertsArgs {
                x: gu_at(0),
                y: ys_at(0),
                x_stride: imax2 as i64,
                y_stride: h as i64,
                nmat: 1,
                swiglu: 1,
                ..gate_up
            };
            down.mat = [mats[2], MatOff::default()];
            down.shared = [shared_p[2], GemvProblem::default()];
            kern.experts(&dev, format, &down, h, inter.max(shared_inter))?;
            Ok(())
        };
        let fused = |t: usize| -> Result<()> {
            let args = FusedExpertsArgs {
                ids: ids_at(t),
                table: table_buf.ptr(),
                x: x.ptr(),
                gu: gu_at(0),
                ys: ys_at(0),
                gu_stride: imax2 as i64,
                ys_stride: h as i64,
                mat: mats,
                shared: shared_p,
                sync: 0,
                k: k as i32,
            };
            kern.experts_fused(&dev, &args, format)?;
            Ok(())
        };
        let mat_views = |m: &MatOff| flashmoe::cuda::MatView {
            format,
            rows: m.rows as usize,
            cols: m.cols as usize,
            w: m.w,
            s: m.s,
            b: m.b,
        };
        let fits = kern.fused_experts_fit(
            &[mat_views(&mats[0]), mat_views(&mats[1]), mat_views(&mats[2])],
            &[sh[0].view(), sh[1].view(), sh[2].view()],
            k,
        );
        // The same outputs either way (same sums in the same order): checked on every token,
        // for every variant of the fused kernel.
        let mut want = Vec::with_capacity(TOKENS);
        for t in 0..TOKENS {
            two(t)?;
            want.push(ys.read_f32()?);
        }
        // Bit for bit (a NaN on either side counts as a difference).
        let (mut differ, mut compared) = (0usize, 0usize);
        if fits {
            for rw in flashmoe::cuda::gemv::FUSED_ROWS_PER_WARP {
                kern.set_fused_rows(rw)?;
                for (t, want) in want.iter().enumerate() {
                    fused(t)?;
                    for (g, w) in ys.read_f32()?.iter().zip(want) {
                        differ += usize::from(g.to_bits() != w.to_bits() || g.is_nan());
                        compared += 1;
                    }
                }
            }
        }
        println!();
        println!(
            "{name}: {k} of {n_experts} experts + shared, {h}×{inter} ({}), {:.2} MB of expert bytes per token; fused vs two launches: {differ} of {compared} outputs differ in any bit{}",
            format.name(),
            bytes_per_token / 1e6,
            if fits { "" } else { " (the fused kernel does not take this shape)" }
        );
        let mut runs: Vec<(String, Option<usize>)> = vec![("two launches".into(), None)];
        if fits {
            for rw in flashmoe::cuda::gemv::FUSED_ROWS_PER_WARP {
                runs.push((format!("one launch, rw {rw}"), Some(rw)));
            }
        }
        for (label, rw) in runs {
            if let Some(rw) = rw {
                kern.set_fused_rows(rw)?;
            }
            let f: &dyn Fn(usize) -> Result<()> = if rw.is_some() { &fused } else { &two };
            let graph =
                dev.capture(|| (0..TOKENS).try_for_each(f).map_err(|e| flashmoe::cuda::CudaError(e.to_string())))?;
            let replays = 16;
            let s = time_reps(&dev, reps, replays * TOKENS, bytes_per_token, || {
                for _ in 0..replays {
                    graph.launch()?;
                }
                Ok(())
            })?;
            println!(
                "  {label:<20} GB/s {}  = {:.0}% of copy, {:.1} µs per token",
                fmt_spread(&s),
                100.0 * s.median / copy.median,
                bytes_per_token / (s.median * 1e9) * 1e6
            );
        }
    }
    Ok(())
}

fn bytemuck_u64(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
