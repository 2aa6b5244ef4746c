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

fn fmt_spread(s: &Spread) -> String {
    format!("{:7.0} [{:5.0}–{:5.0}]", s.median, s.min, s.max)
}

fn gemv(a: GemvBenchArgs) -> Result<()> {
    let dev = CudaDevice::open(parse_device(&a.device)?)?;
    let k = GemvKernels::load(&dev)?;
    println!("device  {}", dev.describe());
    let reps = a.reps.max(1);

    // Device-to-device copy of 1 GiB: read + write bytes per second.
    const GIB: usize = 1 << 30;
    let src = dev.alloc(GIB)?;
    let dst = dev.alloc(GIB)?;
    k.fill_u32(&dev, &src, 7)?;
    let copies = 10;
    let copy = time_reps(&dev, reps, copies, 2.0 * GIB as f64, || {
        for _ in 0..copies {
            dev.copy_dtod(&src, &dst, GIB)?;
        }
        Ok(())
    })?;
    drop(dst);
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
