//! `flashmoe bench`: experts-only reads (+ compute), end-to-end decode with its floor, and
//! RAM-cache sweeps (CSV + SVG plot). The measuring lives in `flashmoe_tools::bench`; this file parses
//! flags and prints.

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use flashmoe::LoadOptions;
use flashmoe::experts::cache::CachePolicy;
use flashmoe::experts::{IoChoice, StoreOptions};
use flashmoe::memory::{fmt as fmt_bytes, parse_size};
use flashmoe_tools::bench::{self, DecodeBenchOptions, DecodeReport, ExpertBenchOptions, Routing, Spread, SweepPoint};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// K experts per layer per simulated token through the expert store: reads alone and with
    /// compute, cold (page cache emptied) and warm, in GB/s and experts/s.
    Experts(ExpertsArgs),
    /// Decode random token ids on a packed model; prints the summary line and the floor (disk
    /// bytes per token ÷ disk bandwidth + compute per token).
    Decode(DecodeArgs),
    /// Decode at several RAM-cache sizes (fresh store each, O_DIRECT); writes a CSV and an SVG plot.
    Sweep(SweepArgs),
    /// Decode several sequences together (continuous batching, as `serve --max-batch` does):
    /// aggregate and per-sequence tok/s, expert fetches and disk bytes per token, for each
    /// number of streams (fresh model and cache each). Routing is the model's own.
    Batch(BatchArgs),
}

#[derive(Args)]
struct BatchArgs {
    /// Packed model: a folder, `builtin`, or a Hub repo in the Hugging Face cache.
    #[arg(long, value_parser = crate::args::model::resolved_path)]
    model: PathBuf,
    /// Numbers of sequences decoded together, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    streams: Vec<usize>,
    /// Measured steps (each gives every sequence one token).
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Prompt tokens of each sequence (prefilled alone, not measured).
    #[arg(long, default_value_t = 16)]
    prefill: usize,
    /// Unmeasured batched steps first.
    #[arg(long, default_value_t = 8)]
    warmup: usize,
    #[arg(long, default_value = "page")]
    io: IoChoice,
    /// RAM expert cache: a size (4G, 512M) or a share of the expert bytes (25%).
    #[arg(long, default_value = "0")]
    ram_cache: String,
    /// Reads in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    io_threads: usize,
    /// RAM cache eviction policy: lru, lfu (LFU with aging, half-life 32 tokens) or lfu:N.
    #[arg(long, default_value = "lfu")]
    cache_policy: CachePolicy,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also print where a measured step's time went, summed over the layers (mixer, router,
    /// expert I/O wait, experts, the rest); on a GPU every phase synchronizes, which slows it.
    #[arg(long)]
    timing: bool,
    #[command(flatten)]
    engine: crate::args::EngineArgs,
    #[command(flatten)]
    device: crate::args::DeviceArgs,
}

#[derive(Args)]
struct ExpertsArgs {
    /// Packed model: a folder, `builtin`, or a Hub repo in the Hugging Face cache.
    #[arg(long, value_parser = crate::args::model::resolved_path)]
    model: PathBuf,
    /// Experts per layer per token (default: the model's top-k).
    #[arg(long)]
    k: Option<usize>,
    /// Simulated tokens per pass.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Use only the first N layers (default: all).
    #[arg(long)]
    layers: Option<usize>,
    /// Repeats (each with its own expert selection); figures are min/median/max over them.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "page")]
    io: IoChoice,
    /// Reads in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    io_threads: usize,
    /// Do not empty the page cache before cold passes.
    #[arg(long)]
    no_evict: bool,
    /// Replay a routing trace (written by `run --trace-routing`) instead of uniform picks.
    #[arg(long)]
    trace: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct DecodeCommon {
    /// Packed model: a folder, `builtin`, or a Hub repo in the Hugging Face cache.
    #[arg(long, value_parser = crate::args::model::resolved_path)]
    model: PathBuf,
    /// Measured decode steps.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Prompt tokens (one prefill batch) before decoding.
    #[arg(long, default_value_t = 4)]
    prefill: usize,
    /// Unmeasured decode steps first (default: enough to fill the RAM cache, plus 2).
    #[arg(long)]
    warmup: Option<usize>,
    /// uniform: top-k drawn uniformly at random per token and layer; model: the model's routers.
    #[arg(long, default_value = "uniform")]
    routing: Routing,
    /// Reads in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    io_threads: usize,
    /// Disk bandwidth for the floor, GB/s (e.g. fio's). Default: measured here with O_DIRECT
    /// random reads of whole experts, io-threads in flight.
    #[arg(long, value_parser = crate::args::positive_number)]
    disk_bw: Option<f64>,
    /// RAM cache eviction policy: lru, lfu (LFU with aging, half-life 32 tokens) or lfu:N.
    #[arg(long, default_value = "lfu")]
    cache_policy: CachePolicy,
    /// Pre-warm the tiers from a routing profile: off (the default here, so runs do not depend
    /// on earlier ones), auto (the one saved for this model; this run's counts are added), or
    /// a file.
    #[arg(long, default_value = "off")]
    routing_profile: flashmoe::runtime::ProfileSource,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Do not check experts against the manifest checksums on their first read (to measure what
    /// the check costs).
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    engine: crate::args::EngineArgs,
    #[command(flatten)]
    trace: crate::args::TraceArgs,
    #[command(flatten)]
    device: crate::args::DeviceArgs,
}

#[derive(Args)]
struct DecodeArgs {
    #[command(flatten)]
    common: DecodeCommon,
    #[arg(long, default_value = "direct")]
    io: IoChoice,
    /// RAM expert cache: a size (4G, 512M) or a share of the expert bytes (25%).
    #[arg(long, default_value = "0")]
    ram_cache: String,
    /// Measure this many times (fresh model and cache each); tok/s is reported min/median/max.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Print a per-layer time breakdown of the measured steps (CPU device only: on a GPU it
    /// would synchronize at every phase, which is not what decode measures).
    #[arg(long)]
    timing: bool,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    common: DecodeCommon,
    /// Comma-separated cache sizes (0,1G,2G or 0,10%,25%,50%).
    #[arg(long)]
    ram_cache: String,
    #[arg(long)]
    csv: Option<PathBuf>,
    /// SVG plot of tok/s and RAM hit rate against cache size.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Plot title (default: the model folder's name and routing).
    #[arg(long)]
    title: Option<String>,
    /// GPU expert cache sizes to sweep too (with --device cuda), each at every --ram-cache size:
    /// comma-separated sizes or shares of the expert bytes (2G,8G or 10%,25%,50%), or `auto`.
    #[arg(long)]
    gpu_caches: Option<String>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        What::Experts(a) => experts(a),
        What::Decode(a) => decode(a),
        What::Sweep(a) => sweep(a),
        What::Batch(a) => batch(a),
    }
}

fn batch(a: BatchArgs) -> Result<()> {
    if a.streams.is_empty() || a.streams.iter().any(|&n| n == 0 || n > flashmoe_server::MAX_BATCH_LIMIT) {
        bail!("--streams: numbers from 1 to {}", flashmoe_server::MAX_BATCH_LIMIT);
    }
    let cache = cache_size(&a.ram_cache, expert_bytes(&a.model)?)?;
    let mut load = LoadOptions {
        store: StoreOptions {
            io: a.io,
            ram_cache_bytes: cache,
            io_threads: a.io_threads,
            cache_policy: a.cache_policy,
            verify: true,
        },
        device: a.device.options(),
        ..Default::default()
    };
    a.engine.apply(&mut load);
    eprintln!(
        "[flashmoe] bench batch | {} | {} measured steps after {} warm-up, prompts of {} tokens | io {:?}, RAM cache {} ({})",
        a.model.display(),
        a.tokens,
        a.warmup,
        a.prefill,
        a.io,
        fmt_bytes(cache),
        a.cache_policy.name()
    );
    println!(
        "{:>7}  {:>16}  {:>17}  {:>22}  {:>12}  {:>14}  {:>9}",
        "streams",
        "aggregate tok/s",
        "per-stream tok/s",
        "step ms min/med/max",
        "disk/token",
        "fetches/token",
        "RAM hit"
    );
    let mut first: Option<f64> = None;
    for &n in &a.streams {
        let mut model = crate::util::loading(&a.model, || {
            let m = flashmoe::Model::load_with(
                &a.model,
                &LoadOptions { stream_experts: a.io != IoChoice::Mmap, timing: a.timing, ..load.clone() },
            )?;
            anyhow::Ok(m)
        })?;
        let opts = bench::BatchBenchOptions {
            streams: n,
            tokens: a.tokens.max(1),
            prefill: a.prefill,
            warmup: a.warmup,
            seed: a.seed,
        };
        let r = bench::bench_batch(&mut model, &opts)?;
        if let Some(times) = model.timing_snapshot().filter(|_| a.timing) {
            let mut sum = flashmoe::LayerTimes::default();
            times.iter().for_each(|t| sum.add(t));
            let per = |x: f64| x * 1e3 / r.step_secs.len().max(1) as f64;
            let step: f64 = r.step_secs.iter().sum::<f64>() * 1e3 / r.step_secs.len().max(1) as f64;
            eprintln!(
                "[flashmoe]   {n} streams, ms per step: mixer {:.2}, router {:.2}, expert I/O wait {:.2}, experts {:.2}, other in layers {:.2}, outside the layers {:.2} (step {:.2})",
                per(sum.mixer),
                per(sum.router),
                per(sum.io_wait),
                per(sum.experts),
                per(sum.other),
                step - per(sum.mixer + sum.router + sum.io_wait + sum.experts + sum.other),
                step
            );
        }
        let st = Spread::of(&r.step_secs);
        let agg = r.aggregate_tok_s();
        let base = *first.get_or_insert(agg / n as f64);
        println!(
            "{:>7}  {:>9.2} ({:>4.2}×)  {:>17.2}  {:>22}  {:>12}  {:>14.1}  {:>8.0}%",
            n,
            agg,
            agg / base,
            r.per_stream_tok_s(),
            format!("{:.1} / {:.1} / {:.1}", st.min * 1e3, st.median * 1e3, st.max * 1e3),
            fmt_bytes(r.disk_bytes_per_token() as u64),
            r.fetches_per_token(),
            100.0 * r.io.ram_hit_rate()
        );
    }
    eprintln!(
        "[flashmoe] (×: aggregate tok/s over one stream's; fetches: expert reads from the RAM tier or disk per generated token)"
    );
    Ok(())
}

fn gb(x: f64) -> String {
    format!("{x:.3}")
}

fn spread(s: Spread, f: impl Fn(f64) -> String) -> String {
    format!("{} / {} / {}", f(s.min), f(s.median), f(s.max))
}

fn experts(a: ExpertsArgs) -> Result<()> {
    let opts = ExpertBenchOptions {
        k: a.k.unwrap_or(0),
        tokens: a.tokens.max(1),
        layers: a.layers.unwrap_or(0),
        repeats: a.repeats.max(1),
        seed: a.seed,
        evict: !a.no_evict,
        trace: a.trace.clone(),
        store: StoreOptions { io: a.io, ram_cache_bytes: 0, io_threads: a.io_threads.max(1), ..Default::default() },
    };
    let rep = bench::bench_experts(&a.model, &opts, |msg| eprintln!("[flashmoe] {msg}"))?;
    println!(
        "bench experts: {} | io {} | K={} per layer, {} layers, {} tokens, {} repeats | expert stride {} ({} B) | {} reads in flight",
        a.model.display(),
        rep.mode_note,
        rep.k,
        rep.layers,
        rep.tokens,
        opts.repeats,
        fmt_bytes(rep.stride),
        rep.stride,
        rep.io_threads
    );
    println!("page cache: {}", rep.eviction.describe());
    println!(
        "{:<58} {:<5} {:>26} {:>26} {:>16}",
        "pass", "", "GB/s min/med/max", "experts/s min/med/max", "compute ms/exp"
    );
    for row in &rep.rows {
        let comp = if row.samples.iter().any(|s| s.compute_secs > 0.0) {
            format!("{:.3}", row.compute_per_expert().median * 1e3)
        } else {
            "-".into()
        };
        println!(
            "{:<58} {:<5} {:>26} {:>26} {:>16}",
            row.name,
            if row.cold { "cold" } else { "warm" },
            spread(row.gb_s(), gb),
            spread(row.experts_s(), |x| format!("{x:.0}")),
            comp
        );
    }
    Ok(())
}

/// `25%` of the model's expert bytes, or a size.
fn cache_size(s: &str, expert_bytes: u64) -> Result<u64> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let f: f64 = p.trim().parse().map_err(|_| anyhow!("--ram-cache `{s}`: expected a size or a percentage"))?;
        return Ok((expert_bytes as f64 * f / 100.0) as u64);
    }
    parse_size(t).map_err(|e| anyhow!("--ram-cache {e}"))
}

fn is_packed(dir: &Path) -> bool {
    dir.join(flashmoe::packed::MANIFEST).exists()
}

fn expert_bytes(dir: &Path) -> Result<u64> {
    if !is_packed(dir) {
        // A GGUF file or an HF folder: experts are read in place.
        return Ok(flashmoe::memory::footprint(dir)?.experts);
    }
    let m = flashmoe::packed::Manifest::load(dir)?;
    Ok(m.experts.iter().map(|e| e.stride * e.num_experts as u64).sum())
}

fn disk_bandwidth(c: &DecodeCommon) -> Result<(f64, String)> {
    if let Some(g) = c.disk_bw {
        return Ok((g * 1e9, format!("{g:.3} GB/s (--disk-bw)")));
    }
    if !is_packed(&c.model) {
        // The O_DIRECT measurement reads a packed model's expert files; without one the floor
        // leaves the disk out.
        return Ok((f64::INFINITY, "not measured (not a packed model; --disk-bw sets it)".into()));
    }
    let target = expert_bytes(&c.model)?.min(2 << 30);
    let bw = bench::measure_read_bandwidth(&c.model, IoChoice::Direct, c.io_threads.max(1), target, c.seed ^ 0xd15c)
        .context("measuring disk bandwidth (O_DIRECT)")?;
    Ok((bw, format!("{:.3} GB/s (measured: O_DIRECT random expert reads, {} in flight)", bw / 1e9, c.io_threads)))
}

fn decode_once(c: &DecodeCommon, io: IoChoice, cache: u64, timing: bool) -> Result<DecodeReport> {
    decode_once_on(c, io, cache, timing, None)
}

/// [`decode_once`] with the GPU expert cache set to `gpu_cache` instead of the device flags' one.
fn decode_once_on(
    c: &DecodeCommon,
    io: IoChoice,
    cache: u64,
    timing: bool,
    gpu_cache: Option<flashmoe::device::GpuCache>,
) -> Result<DecodeReport> {
    let store = StoreOptions {
        io,
        ram_cache_bytes: cache,
        io_threads: c.io_threads.max(1),
        cache_policy: c.cache_policy,
        verify: !c.no_verify,
    };
    // The store flags of bench keep their own defaults (O_DIRECT, no RAM cache, sizes as a share
    // of the experts); the engine and device groups are the ones every command takes.
    let mut device = c.device.options();
    if let Some(g) = gpu_cache {
        device.gpu_cache = g;
    }
    let mut load = LoadOptions { store, device, routing_profile: c.routing_profile.clone(), ..Default::default() };
    c.engine.apply(&mut load);
    c.trace.apply(&mut load);
    let mut model = crate::util::loading(&c.model, || bench::load_streamed(&c.model, &load))?;
    crate::util::print_device(&model);
    let opts = DecodeBenchOptions {
        tokens: c.tokens.max(1),
        prefill: c.prefill,
        warmup: c.warmup,
        seed: c.seed,
        routing: c.routing,
    };
    let report = bench::bench_decode(&mut model, &opts, &crate::util::Bar::counts("experts"))?;
    if timing {
        if let Some(times) = &report.prefill_times {
            let title = format!("per-layer time of the prefill, ms ({} tokens in one pass):", report.prefill_tokens);
            crate::util::print_layer_times(&title, times, 1, &model);
        }
        match model.timing_snapshot() {
            Some(times) => crate::util::print_timing(&times, report.tokens, &model),
            None => eprintln!("[flashmoe] --timing: per-layer times are collected on the CPU device only"),
        }
    }
    if let Some(path) = &c.trace.trace_routing {
        let records: Vec<_> = model.take_routing_trace().into_iter().map(|r| (r.layer, r.pos, r.experts)).collect();
        crate::util::write_trace(path, &model, &records)?;
    }
    Ok(report)
}

/// The `run`-style summary line, plus the floor.
fn print_decode(r: &DecodeReport, disk_bw: f64, bw_note: &str, policy: &str) {
    let st = Spread::of(&r.step_secs);
    eprintln!(
        "[flashmoe] bench decode | prefill {} tok in {:.3} s ({:.1} tok/s) | decode {:.2} tok/s ({} tok after {} warm-up, step ms min/med/max {:.0}/{:.0}/{:.0}) | peak RSS {} | experts {}/{} per token ({} routing) | disk {}/token | RAM cache {} ({policy}) hit {:.0}% | pre-warmed {} | io {}",
        r.prefill_tokens,
        r.prefill_secs,
        r.prefill_tokens as f64 / r.prefill_secs.max(1e-12),
        r.tok_s(),
        r.tokens,
        r.warmup_tokens,
        st.min * 1e3,
        st.median * 1e3,
        st.max * 1e3,
        r.peak_rss.map_or("n/a".into(), fmt_bytes),
        r.experts_per_token,
        r.num_experts,
        r.routing.name(),
        fmt_bytes(r.disk_bytes_per_token() as u64),
        fmt_bytes(r.ram_cache_bytes),
        100.0 * r.io.ram_hit_rate(),
        r.prewarmed,
        r.io_mode
    );
    if let Some(g) = &r.gpu {
        print_gpu(r, g, disk_bw);
        return;
    }
    if let Some(c) = &r.cpu {
        let (t_mem, step) = (c.bytes_per_token / c.read_bw, r.decode_secs / r.tokens.max(1) as f64);
        eprintln!(
            "[flashmoe] roofline: {}/token ÷ {:.1} GB/s (memory read, {} threads, measured now) = {:.2} ms → {:.1} tok/s; achieved {:.2} ms/token = {:.0}% of the roofline",
            fmt_bytes(c.bytes_per_token as u64),
            c.read_bw / 1e9,
            c.threads,
            t_mem * 1e3,
            c.roofline_tok_s(),
            step * 1e3,
            100.0 * t_mem / step
        );
    }
    let f = r.floor(disk_bw);
    eprintln!(
        "[flashmoe] floor: disk {}/token ÷ {bw_note} = {:.1} ms + compute {:.1} ms/token (decode time minus I/O wait {:.1} ms) = {:.1} ms/token → {:.2} tok/s; achieved {:.2} tok/s = {:.0}% of the floor",
        fmt_bytes(r.disk_bytes_per_token() as u64),
        f.io_secs * 1e3,
        f.compute_secs * 1e3,
        r.io_wait_per_token() * 1e3,
        (f.io_secs + f.compute_secs) * 1e3,
        f.tok_s,
        f.achieved,
        100.0 * f.ratio()
    );
}

/// The GPU lines: cache tiers and the two limits (memory roofline; slowest tier).
fn print_gpu(r: &DecodeReport, g: &bench::GpuDecodeInfo, disk_bw: f64) {
    let n = r.tokens.max(1) as f64;
    let h2d = g.h2d_bytes as f64 / n;
    let (t_mem, t_disk, t_pcie) = (g.bytes_per_token / g.d2d_bw, r.disk_bytes_per_token() / disk_bw, h2d / g.h2d_bw);
    let step = r.decode_secs / n;
    eprintln!(
        "[flashmoe] gpu: expert cache {}/{} experts{} | hit {:.1}% | host→GPU {}/token | GPU→RAM {}/token | CPU-computed experts {:.1}/token, RAM tier → GPU over PCIe {:.1}/token | RAM hit {:.0}% | disk {}/token | pre-warmed {} on GPU, {} read",
        g.pool_slots,
        g.total_experts,
        if g.preloaded { " (all preloaded)" } else { "" },
        100.0 * g.hit_rate(),
        fmt_bytes(h2d as u64),
        fmt_bytes((g.d2h_bytes as f64 / n) as u64),
        g.cpu_experts as f64 / n,
        g.pcie_experts as f64 / n,
        100.0 * r.io.ram_hit_rate(),
        fmt_bytes(r.disk_bytes_per_token() as u64),
        g.prewarmed,
        r.prewarmed,
    );
    for share in &g.per_gpu {
        let hits = share.pool_hits + share.pool_misses;
        eprintln!(
            "[flashmoe] gpu layers {}–{} on {}: expert cache {}/{} experts | hit {:.1}% | host→GPU {}/token | GPU span {:.3} ms/step",
            share.layers.start,
            share.layers.end - 1,
            share.device,
            share.pool_slots,
            share.total_experts,
            if hits == 0 { 100.0 } else { 100.0 * share.pool_hits as f64 / hits as f64 },
            fmt_bytes((share.h2d_bytes as f64 / n) as u64),
            share.gpu_span_secs * 1e3,
        );
    }
    if g.ids_wait_secs > 0.0 || g.cpu_secs > 0.0 {
        eprintln!(
            "[flashmoe] host per token: waiting for expert ids {:.3} ms, on the misses the CPU computes {:.3} ms (their kernels on the pool {:.3} ms: {:.1} GB/s of expert bytes), of a {:.3} ms step",
            g.ids_wait_secs * 1e3 / n,
            g.cpu_secs * 1e3 / n,
            g.cpu_kernel_secs * 1e3 / n,
            g.cpu_experts as f64 * g.expert_bytes / g.cpu_kernel_secs.max(1e-12) / 1e9,
            step * 1e3
        );
        // Where the rest of a step's host time goes: the pass outside the MoE op (launches
        // or replays of the mixers, embedding, lm_head), and inside it what is not waiting
        // or the CPU's experts (lookups, the GPU's expert launches, the outputs' uploads).
        let ms = |s: f64| s * 1e3 / n;
        eprintln!(
            "[flashmoe] host per token: pass {:.3} ms = outside the MoE op {:.3} + MoE op {:.3} (ids wait {:.3}, CPU experts {:.3} = RAM-tier lookups, reads of experts not in RAM, views {:.3} + waiting for the pool {:.3} (its kernels {:.3}, alongside the PCIe share), PCIe share's lookups, copies and launches {:.3}, uploads {:.3}, other {:.3})",
            ms(g.pass_host_secs),
            ms(g.pass_host_secs - g.moe_host_secs),
            ms(g.moe_host_secs),
            ms(g.ids_wait_secs),
            ms(g.cpu_secs),
            ms(g.cpu_fetch_secs),
            ms(g.cpu_secs - g.cpu_fetch_secs),
            ms(g.cpu_kernel_secs),
            ms(g.pcie_host_secs),
            ms(g.upload_secs),
            ms(g.moe_host_secs - g.ids_wait_secs - g.cpu_secs - g.pcie_host_secs - g.upload_secs),
        );
    }
    if g.timed_steps > 0 {
        // The span runs from a step's first to its last GPU operation: the rest of the step is
        // host work (token upload, graph launch, logits copy and checks) the GPU waited for.
        let span = g.gpu_span_secs / g.timed_steps as f64;
        eprintln!(
            "[flashmoe] decode step: GPU span {:.3} ms of a {:.3} ms step ({:.0}%); host-only {:.3} ms",
            span * 1e3,
            step * 1e3,
            100.0 * span / step,
            (step - span).max(0.0) * 1e3
        );
    }
    eprintln!(
        "[flashmoe] roofline: {}/token ÷ {:.0} GB/s (D2D copy, read+write) = {:.3} ms → {:.1} tok/s; achieved {:.3} ms/token = {:.0}% of the roofline",
        fmt_bytes(g.bytes_per_token as u64),
        g.d2d_bw / 1e9,
        t_mem * 1e3,
        1.0 / t_mem,
        step * 1e3,
        100.0 * t_mem / step
    );
    let floor = t_mem.max(t_disk).max(t_pcie);
    eprintln!(
        "[flashmoe] tier floor: max(HBM {:.3} ms, disk {:.3} ms at {:.2} GB/s, PCIe {:.3} ms at {:.1} GB/s pinned) = {:.3} ms → {:.2} tok/s; achieved {:.2} tok/s = {:.0}% of the floor",
        t_mem * 1e3,
        t_disk * 1e3,
        disk_bw / 1e9,
        t_pcie * 1e3,
        g.h2d_bw / 1e9,
        floor * 1e3,
        1.0 / floor,
        1.0 / step,
        100.0 * floor / step
    );
}

fn decode(a: DecodeArgs) -> Result<()> {
    let c = &a.common;
    let total = expert_bytes(&c.model)?;
    let cache = cache_size(&a.ram_cache, total)?;
    let (bw, note) = disk_bandwidth(c)?;
    eprintln!(
        "[flashmoe] experts {} on disk; RAM cache {} ({:.0}%); disk bandwidth {note}",
        fmt_bytes(total),
        fmt_bytes(cache),
        100.0 * cache as f64 / total.max(1) as f64
    );
    let mut rates = Vec::new();
    let mut ratios = Vec::new();
    for i in 0..a.repeats.max(1) {
        let mut cc = c.clone();
        cc.seed = c.seed.wrapping_add(i as u64);
        let r = decode_once(&cc, a.io, cache, a.timing)?;
        print_decode(&r, bw, &note, &c.cache_policy.name());
        rates.push(r.tok_s());
        ratios.push(match &r.gpu {
            Some(g) => {
                let n = r.tokens.max(1) as f64;
                let floor = (g.bytes_per_token / g.d2d_bw)
                    .max(r.disk_bytes_per_token() / bw)
                    .max(g.h2d_bytes as f64 / n / g.h2d_bw);
                floor / (r.decode_secs / n)
            }
            None => r.floor(bw).ratio(),
        });
    }
    if rates.len() > 1 {
        let (s, q) = (Spread::of(&rates), Spread::of(&ratios));
        eprintln!(
            "[flashmoe] over {} runs: decode tok/s min/median/max {:.3} / {:.3} / {:.3}; of the floor {:.0}% / {:.0}% / {:.0}%",
            rates.len(),
            s.min,
            s.median,
            s.max,
            100.0 * q.min,
            100.0 * q.median,
            100.0 * q.max
        );
    }
    Ok(())
}

fn sweep(a: SweepArgs) -> Result<()> {
    let c = &a.common;
    let total = expert_bytes(&c.model)?;
    let sizes: Vec<u64> =
        a.ram_cache.split(',').filter(|s| !s.trim().is_empty()).map(|s| cache_size(s, total)).collect::<Result<_>>()?;
    if sizes.is_empty() {
        bail!("--ram-cache: give at least one size, e.g. 0,1G,2G");
    }
    // GPU cache sizes: the device flags' one, or each of --gpu-caches (with its label).
    let gpus: Vec<Option<(String, flashmoe::device::GpuCache)>> = match &a.gpu_caches {
        None => vec![None],
        Some(list) => {
            if matches!(c.device.options().device, flashmoe::device::DeviceChoice::Cpu) {
                bail!("--gpu-caches sweeps the GPU's expert cache: add --device cuda");
            }
            let v = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    let g = if s == "auto" {
                        flashmoe::device::GpuCache::Auto
                    } else {
                        flashmoe::device::GpuCache::Bytes(cache_size(s, total)?)
                    };
                    Ok(Some((s.to_string(), g)))
                })
                .collect::<Result<Vec<_>>>()?;
            if v.is_empty() {
                bail!("--gpu-caches: give at least one size, e.g. 10%,25% or 4G,8G");
            }
            v
        }
    };
    let (bw, note) = disk_bandwidth(c)?;
    eprintln!("[flashmoe] experts {} on disk; disk bandwidth {note}", fmt_bytes(total));
    let mut points = Vec::new();
    for gpu in &gpus {
        for &size in &sizes {
            match gpu {
                Some((label, _)) => eprintln!(
                    "[flashmoe] GPU cache {label}, RAM cache {} ({:.0}%)",
                    fmt_bytes(size),
                    100.0 * size as f64 / total.max(1) as f64
                ),
                None => eprintln!(
                    "[flashmoe] RAM cache {} ({:.0}%)",
                    fmt_bytes(size),
                    100.0 * size as f64 / total.max(1) as f64
                ),
            }
            let r = decode_once_on(c, IoChoice::Direct, size, false, gpu.as_ref().map(|g| g.1))?;
            if gpu.is_some() && r.gpu.is_none() {
                // (`--device auto` found no GPU.)
                bail!("--gpu-caches sweeps the GPU's expert cache, but the model ran on the CPU");
            }
            print_decode(&r, bw, &note, &c.cache_policy.name());
            points.push(SweepPoint { cache_bytes: size, gpu_cache: gpu.as_ref().map(|g| g.0.clone()), report: r });
        }
    }
    let csv = bench::sweep_csv(&points, bw);
    match &a.csv {
        Some(p) => std::fs::write(p, &csv).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{csv}"),
    }
    if let Some(p) = &a.plot {
        let name = c.model.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned());
        let title = a.title.clone().unwrap_or_else(|| match a.gpu_caches {
            Some(_) => format!("{name}: decode vs GPU and RAM caches ({} routing, O_DIRECT)", c.routing.name()),
            None => format!("{name}: decode vs RAM cache ({} routing, O_DIRECT)", c.routing.name()),
        });
        plot(p, &title, &points, bw, total).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// tok/s and RAM hit rate against the RAM tier's size: one line per GPU cache size when those
/// were swept too (the disk floor only for a single series, where it means one thing).
fn plot(path: &Path, title: &str, points: &[SweepPoint], bw: f64, total: u64) -> Result<()> {
    use plotters::prelude::*;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    // Series in the order swept: points of one GPU cache size.
    let mut series: Vec<(Option<String>, Vec<&SweepPoint>)> = Vec::new();
    for p in points {
        match series.iter_mut().find(|(g, _)| *g == p.gpu_cache) {
            Some((_, v)) => v.push(p),
            None => series.push((p.gpu_cache.clone(), vec![p])),
        }
    }
    let single = series.len() == 1;
    let xmax = points.iter().map(|p| gib(p.cache_bytes)).fold(0.0, f64::max).max(gib(total).min(1e-3)) * 1.05 + 1e-9;
    let floors: Vec<(f64, f64)> = points.iter().map(|p| (gib(p.cache_bytes), p.report.floor(bw).tok_s)).collect();
    let ymax = points
        .iter()
        .map(|p| p.report.tok_s())
        .chain(floors.iter().filter(|_| single).map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.15
        + 1e-9;
    let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)
        .map_err(|e| err(&e))?
        .set_secondary_coord(0.0..xmax, 0.0..100.0);
    chart
        .configure_mesh()
        .x_desc(format!("RAM expert cache, GiB (experts on disk: {:.1} GiB)", gib(total)))
        .y_desc("decode tok/s")
        .draw()
        .map_err(|e| err(&e))?;
    chart.configure_secondary_axes().y_desc("RAM cache hit rate, %").draw().map_err(|e| err(&e))?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
        RGBColor(23, 190, 207),
    ];
    let gray = RGBColor(120, 120, 120);
    let red = RGBColor(214, 39, 40);
    for (i, (gpu, pts)) in series.iter().enumerate() {
        let color = palette[i % palette.len()];
        let toks: Vec<(f64, f64)> = pts.iter().map(|p| (gib(p.cache_bytes), p.report.tok_s())).collect();
        let hits: Vec<(f64, f64)> =
            pts.iter().map(|p| (gib(p.cache_bytes), 100.0 * p.report.io.ram_hit_rate())).collect();
        let name = match gpu {
            Some(g) => format!("decode tok/s, GPU cache {g}"),
            None => "decode tok/s".into(),
        };
        chart
            .draw_series(LineSeries::new(toks.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(toks.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
        // One series: the hit rate in red as before; several: in the series' colour, thin.
        let (hit_color, width) = if single { (red, 2) } else { (color, 1) };
        let hit_name = match gpu {
            Some(g) if !single => format!("RAM cache hit rate, GPU cache {g} (right axis)"),
            _ => "RAM cache hit rate (right axis)".into(),
        };
        chart
            .draw_secondary_series(LineSeries::new(hits.clone(), hit_color.stroke_width(width)))
            .map_err(|e| err(&e))?
            .label(hit_name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], hit_color.stroke_width(width)));
        chart
            .draw_secondary_series(hits.iter().map(|&p| TriangleMarker::new(p, 5, hit_color.filled())))
            .map_err(|e| err(&e))?;
    }
    if single {
        chart
            .draw_series(LineSeries::new(floors, gray.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label("floor tok/s (disk bytes ÷ bandwidth + compute)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], gray.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
