//! Measurements behind `flashmoe bench`: expert reads (+ compute) through the expert store, cold
//! and warm; end-to-end decode of a packed model with its floor (disk bytes per token ÷ disk
//! bandwidth + compute per token); and RAM-cache sweeps. The CLI only parses flags and prints.
//!
//! Everything here is deterministic for a seed (its own small generator, so results do not move
//! with a dependency's version).

use flashmoe::backend::{DeviceChoice, TierCounters};
use flashmoe::config::ModelConfig;
use flashmoe::error::{Error, Result};
use flashmoe::experts::ExpertWeights;
use flashmoe::experts::buffer::AlignedBuf;
use flashmoe::experts::{ExpertStore, IoChoice, IoMode, IoSnapshot, StoreOptions};
use flashmoe::packed::Manifest;
use flashmoe::weights::Linear;
use flashmoe::weights::store::{ByteSource, Bytes, RawTensor};
use flashmoe::{LoadOptions, LogitsFor, Model, Progress};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// splitmix64: tiny, fast, good enough to pick experts and token ids.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as usize
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Approximately standard normal (sum of four uniforms, rescaled).
    pub fn normal(&mut self) -> f32 {
        (self.unit() + self.unit() + self.unit() + self.unit()) * 0.866_025_4
    }
    /// `k` distinct values of 0..n, uniformly (partial Fisher–Yates).
    pub fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let k = k.min(n);
        let mut v: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            v.swap(i, j);
        }
        v.truncate(k);
        v
    }
}

/// Minimum, median and maximum of a set of samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(xs: &[f64]) -> Spread {
        if xs.is_empty() {
            return Spread::default();
        }
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) };
        Spread { min: v[0], median, max: v[n - 1] }
    }
}

/// How the page cache was emptied before a cold pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// `echo 1 > /proc/sys/vm/drop_caches` worked (after `sync`).
    DropCaches,
    /// drop_caches was refused (the reason is kept); the expert files' pages were dropped with
    /// posix_fadvise(POSIX_FADV_DONTNEED) instead.
    Fadvise(String),
    /// Neither worked: "cold" page-mode figures may include page-cache hits.
    Failed(String),
    /// Not attempted (direct I/O needs none, or the caller asked for none).
    NotNeeded,
}

impl Eviction {
    pub fn describe(&self) -> String {
        match self {
            Eviction::DropCaches => {
                "page cache dropped before each cold pass (echo 1 > /proc/sys/vm/drop_caches)".into()
            }
            Eviction::Fadvise(why) => format!(
                "drop_caches refused ({why}); expert files evicted with posix_fadvise(DONTNEED) before each cold pass"
            ),
            Eviction::Failed(why) => {
                format!("could NOT empty the page cache ({why}): cold page-mode figures may include cache hits")
            }
            Eviction::NotNeeded => "no page-cache eviction needed (O_DIRECT bypasses it)".into(),
        }
    }
}

/// The routed-expert files of a packed model.
pub fn expert_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(Manifest::load(dir)?.experts.iter().map(|e| dir.join(&e.file)).collect())
}

/// Empties the page cache of `files`: the global drop_caches first (what a cold start looks like),
/// else posix_fadvise on the files themselves.
pub fn evict_page_cache(files: &[PathBuf]) -> Eviction {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let global = std::fs::write("/proc/sys/vm/drop_caches", "1\n");
    let why = match global {
        Ok(()) => return Eviction::DropCaches,
        Err(e) => e.to_string(),
    };
    for f in files {
        use std::os::fd::AsRawFd;
        let r = std::fs::File::open(f).map(|file| {
            // SAFETY: valid open descriptor; whole-file range.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }
        });
        match r {
            Ok(0) => {}
            Ok(code) => return Eviction::Failed(format!("{why}; posix_fadvise on {}: error {code}", f.display())),
            Err(e) => return Eviction::Failed(format!("{why}; {}: {e}", f.display())),
        }
    }
    Eviction::Fadvise(why)
}

// ------------------------------------------------------------------------------------------------
// Experts only
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct ExpertBenchOptions {
    /// Experts per layer per simulated token (0: the model's own top-k).
    pub k: usize,
    pub tokens: usize,
    /// Layers used (0: all), the first ones.
    pub layers: usize,
    pub repeats: usize,
    pub seed: u64,
    /// Empty the page cache before cold passes (page mode).
    pub evict: bool,
    pub store: StoreOptions,
    /// Replay a routing trace (`--trace-routing` output) instead of uniform picks: repeat r uses
    /// the trace's tokens r·tokens.. (wrapping), each layer's experts as recorded (K = the trace's).
    pub trace: Option<PathBuf>,
}

impl Default for ExpertBenchOptions {
    fn default() -> Self {
        ExpertBenchOptions {
            k: 0,
            tokens: 16,
            layers: 0,
            repeats: 3,
            seed: 1,
            evict: true,
            store: StoreOptions { io: IoChoice::Page, ram_cache_bytes: 0, io_threads: 8, ..Default::default() },
            trace: None,
        }
    }
}

/// One timed pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassSample {
    pub secs: f64,
    /// Bytes read by the store in the pass (page mode reads a blob, direct mode its 4 KiB stride).
    pub read_bytes: u64,
    pub experts: u64,
    /// Wall time spent in `fetch` (reads) and in expert compute.
    pub fetch_secs: f64,
    pub compute_secs: f64,
}

impl PassSample {
    pub fn gb_s(&self) -> f64 {
        self.read_bytes as f64 / self.secs.max(1e-12) / 1e9
    }
    pub fn experts_s(&self) -> f64 {
        self.experts as f64 / self.secs.max(1e-12)
    }
}

/// A kind of pass and its samples over the repeats.
#[derive(Clone, Debug)]
pub struct PassRow {
    pub name: &'static str,
    pub cold: bool,
    pub samples: Vec<PassSample>,
}

impl PassRow {
    pub fn gb_s(&self) -> Spread {
        Spread::of(&self.samples.iter().map(PassSample::gb_s).collect::<Vec<_>>())
    }
    pub fn experts_s(&self) -> Spread {
        Spread::of(&self.samples.iter().map(PassSample::experts_s).collect::<Vec<_>>())
    }
    /// Compute time per expert, seconds.
    pub fn compute_per_expert(&self) -> Spread {
        Spread::of(&self.samples.iter().map(|s| s.compute_secs / s.experts.max(1) as f64).collect::<Vec<_>>())
    }
}

#[derive(Clone, Debug)]
pub struct ExpertBenchReport {
    pub mode: IoMode,
    pub mode_note: String,
    pub k: usize,
    pub tokens: usize,
    pub layers: usize,
    pub io_threads: usize,
    /// Expert stride of layer 0 (the block size of one read in direct mode).
    pub stride: u64,
    pub eviction: Eviction,
    pub rows: Vec<PassRow>,
}

/// The names of the passes, in report order.
pub const PASS_LAYER: &str = "read, engine order (per layer: K in flight)";
pub const PASS_SUSTAINED: &str = "read, sustained (io-threads in flight, distinct experts)";
pub const PASS_COMPUTE: &str = "read + compute, engine order";
pub const PASS_PIPELINED: &str = "read + compute, next layer read during compute";

/// gate/up/SwiGLU/down of one expert on one input (what the MoE block does per routed expert).
/// One expert on one input (`Linear::apply` of gate, up, down).
pub fn expert_compute(w: &ExpertWeights, x: &[f32]) -> Vec<f32> {
    let mut g = w.gate.apply(x, 1);
    let u = w.up.apply(x, 1);
    for (gv, &uv) in g.iter_mut().zip(&u) {
        *gv = *gv / (1.0 + (-*gv).exp()) * uv;
    }
    w.down.apply(&g, 1)
}

pub fn open_store(dir: &Path, opts: &StoreOptions) -> Result<(ExpertStore, ModelConfig)> {
    let cfg = ModelConfig::load(dir)?;
    if !dir.join(flashmoe::packed::MANIFEST).exists() {
        return Err(Error::input(format!(
            "{} is not a packed model (no manifest.json): bench needs one, run `flashmoe convert {} OUT` or `flashmoe synth`",
            dir.display(),
            dir.display()
        )));
    }
    let manifest = Manifest::load(dir)?;
    let store = ExpertStore::open(dir, &manifest, &cfg, opts)?;
    Ok((store, cfg))
}

/// Reads (and computes) K uniformly chosen experts per layer per simulated token.
///
/// Per repeat (each with its own expert selection), in order: engine-order reads cold then warm,
/// sustained reads cold then warm, read+compute cold then warm, pipelined read+compute cold then
/// warm. "Cold" passes start with the page cache emptied (page mode); "warm" passes repeat the
/// same selection right after (page cache hot; direct mode reads the device again). The store's
/// RAM cache is whatever `opts.store` says (0 by default, so every fetch is a read).
pub fn bench_experts(
    dir: &Path,
    opts: &ExpertBenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<ExpertBenchReport> {
    let (store, cfg) = open_store(dir, &opts.store)?;
    let files = expert_files(dir)?;
    let trace = match &opts.trace {
        Some(p) => {
            let t = flashmoe::routing::read_trace(p)?;
            if t.header.num_experts != cfg.num_experts {
                return Err(Error::file(
                    p,
                    format!(
                        "trace is for {} layers × {} experts; the model has {} × {}",
                        t.header.num_layers,
                        t.header.num_experts,
                        store.num_layers(),
                        cfg.num_experts
                    ),
                ));
            }
            if t.tokens.is_empty() {
                return Err(Error::file(p, "trace has no tokens"));
            }
            Some(t)
        }
        None => None,
    };
    let k = match &trace {
        Some(t) => t.header.top_k,
        None if opts.k == 0 => cfg.experts_per_token,
        None => opts.k.min(cfg.num_experts),
    };
    let mut layers = if opts.layers == 0 { store.num_layers() } else { opts.layers.min(store.num_layers()) };
    if let Some(t) = &trace {
        layers = layers.min(t.header.num_layers);
    }
    let (e, h) = (cfg.num_experts, cfg.hidden_size);
    let mut eviction = Eviction::NotNeeded;
    let names = [PASS_LAYER, PASS_SUSTAINED, PASS_COMPUTE, PASS_PIPELINED];
    let mut rows: Vec<PassRow> =
        names.iter().flat_map(|&name| [true, false].map(|cold| PassRow { name, cold, samples: Vec::new() })).collect();
    for r in 0..opts.repeats.max(1) {
        let mut rng = Rng::new(opts.seed.wrapping_add(r as u64 * 1_000_003));
        // sel[t][l]: experts of layer l for token t.
        let sel: Vec<Vec<Vec<usize>>> = match &trace {
            Some(t) => (0..opts.tokens)
                .map(|i| {
                    let tok = &t.tokens[(r * opts.tokens + i) % t.tokens.len()];
                    (0..layers)
                        .map(|l| tok.experts.get(l).map_or(Vec::new(), |v| v.iter().map(|&x| x as usize).collect()))
                        .collect()
                })
                .collect(),
            None => (0..opts.tokens).map(|_| (0..layers).map(|_| rng.distinct(e, k)).collect()).collect(),
        };
        let x: Vec<f32> = (0..h).map(|_| rng.unit()).collect();
        for (pi, &name) in names.iter().enumerate() {
            for cold in [true, false] {
                if cold && store.mode() == IoMode::Page && opts.evict {
                    eviction = evict_page_cache(&files);
                }
                progress(&format!(
                    "repeat {}/{}: {name} ({})",
                    r + 1,
                    opts.repeats,
                    if cold { "cold" } else { "warm" }
                ));
                let before = store.snapshot();
                let t0 = Instant::now();
                let (mut fetch_secs, mut compute_secs, mut experts) = (0.0, 0.0, 0u64);
                match name {
                    PASS_LAYER => {
                        for tok in &sel {
                            for (l, ids) in tok.iter().enumerate() {
                                let tf = Instant::now();
                                let bufs = store.fetch(l, ids)?;
                                fetch_secs += tf.elapsed().as_secs_f64();
                                experts += bufs.len() as u64;
                            }
                        }
                    }
                    PASS_SUSTAINED => {
                        for l in 0..layers {
                            let mut ids: Vec<usize> = sel.iter().flat_map(|tok| tok[l].iter().copied()).collect();
                            ids.sort_unstable();
                            ids.dedup();
                            // Shuffle so the reads are random, not ascending offsets.
                            for i in (1..ids.len()).rev() {
                                ids.swap(i, rng.below(i + 1));
                            }
                            // Bounded batches keep memory modest; each batch keeps the pool full.
                            for chunk in ids.chunks(64) {
                                let tf = Instant::now();
                                let bufs = store.fetch(l, chunk)?;
                                fetch_secs += tf.elapsed().as_secs_f64();
                                experts += bufs.len() as u64;
                            }
                        }
                    }
                    PASS_COMPUTE => {
                        for tok in &sel {
                            for (l, ids) in tok.iter().enumerate() {
                                let tf = Instant::now();
                                let bufs = store.fetch(l, ids)?;
                                fetch_secs += tf.elapsed().as_secs_f64();
                                let tc = Instant::now();
                                compute_layer(&store, l, &bufs, &x)?;
                                compute_secs += tc.elapsed().as_secs_f64();
                                experts += bufs.len() as u64;
                            }
                        }
                    }
                    _ => {
                        // Reads of the next (token, layer) overlap the compute of this one.
                        let steps: Vec<(usize, &Vec<usize>)> =
                            sel.iter().flat_map(|tok| tok.iter().enumerate()).collect();
                        let mut cur = store.fetch(steps[0].0, steps[0].1)?;
                        for i in 0..steps.len() {
                            let next = steps.get(i + 1);
                            let (nb, c) = rayon::join(
                                || next.map(|&(l, ids)| store.fetch(l, ids)).transpose(),
                                || {
                                    let tc = Instant::now();
                                    compute_layer(&store, steps[i].0, &cur, &x).map(|_| tc.elapsed().as_secs_f64())
                                },
                            );
                            compute_secs += c?;
                            experts += cur.len() as u64;
                            cur = nb?.unwrap_or_default();
                        }
                    }
                }
                let secs = t0.elapsed().as_secs_f64();
                let d = store.snapshot().since(&before);
                rows[pi * 2 + usize::from(!cold)].samples.push(PassSample {
                    secs,
                    read_bytes: d.disk_bytes,
                    experts,
                    fetch_secs,
                    compute_secs,
                });
            }
        }
    }
    if store.mode() == IoMode::Page && !opts.evict {
        eviction = Eviction::Failed("not attempted (--no-evict)".into());
    }
    Ok(ExpertBenchReport {
        mode: store.mode(),
        mode_note: store.mode_note.clone(),
        k,
        tokens: opts.tokens,
        layers,
        io_threads: opts.store.io_threads,
        stride: store.expert_stride(0),
        eviction,
        rows,
    })
}

/// The sum of a layer's fetched experts on one input.
fn compute_layer(store: &ExpertStore, layer: usize, bufs: &[Arc<AlignedBuf>], x: &[f32]) -> Result<Vec<f32>> {
    let mut acc = vec![0.0f32; x.len()];
    for b in bufs {
        let w = store.expert_weights(layer, b.clone())?;
        for (a, v) in acc.iter_mut().zip(expert_compute(&w, x)) {
            *a += v;
        }
    }
    Ok(acc)
}

/// Sustained random O_DIRECT (or page, after eviction) reads of whole experts with
/// `io_threads` in flight: the in-process disk bandwidth, bytes/s. Reads about `target_bytes`
/// of distinct experts spread over all layers.
pub fn measure_read_bandwidth(
    dir: &Path,
    io: IoChoice,
    io_threads: usize,
    target_bytes: u64,
    seed: u64,
) -> Result<f64> {
    let opts = StoreOptions { io, ram_cache_bytes: 0, io_threads, ..Default::default() };
    let (store, cfg) = open_store(dir, &opts)?;
    if store.mode() == IoMode::Page {
        evict_page_cache(&expert_files(dir)?);
    }
    let mut rng = Rng::new(seed);
    let n_layers = store.num_layers();
    let stride = store.expert_stride(0).max(1);
    let want = (target_bytes / stride).max(1) as usize;
    let per_layer = want.div_ceil(n_layers).min(cfg.num_experts);
    let t0 = Instant::now();
    let before = store.snapshot();
    for l in 0..n_layers {
        let ids = rng.distinct(cfg.num_experts, per_layer);
        for chunk in ids.chunks(64) {
            store.fetch(l, chunk)?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(store.snapshot().since(&before).disk_bytes as f64 / secs.max(1e-12))
}

// ------------------------------------------------------------------------------------------------
// Decode
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Each token picks top-k experts uniformly at random, independently per token and layer.
    Uniform,
    /// The model's own routers decide (for a synthetic model: its router weights).
    Model,
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "uniform" => Ok(Routing::Uniform),
            "model" => Ok(Routing::Model),
            o => Err(format!("`{o}`: expected uniform or model")),
        }
    }
}

impl Routing {
    pub fn name(self) -> &'static str {
        match self {
            Routing::Uniform => "uniform",
            Routing::Model => "model",
        }
    }
}

#[derive(Clone, Debug)]
pub struct DecodeBenchOptions {
    /// Decode steps measured.
    pub tokens: usize,
    /// Prompt tokens run as one prefill batch first.
    pub prefill: usize,
    /// Decode steps run (unmeasured) before the measured ones, to fill the RAM cache. None: enough
    /// steps to fill it under uniform routing, plus two.
    pub warmup: Option<usize>,
    pub seed: u64,
    pub routing: Routing,
}

impl Default for DecodeBenchOptions {
    fn default() -> Self {
        DecodeBenchOptions { tokens: 32, prefill: 4, warmup: None, seed: 1, routing: Routing::Uniform }
    }
}

#[derive(Clone, Debug)]
pub struct DecodeReport {
    pub prefill_tokens: usize,
    pub prefill_secs: f64,
    /// Per-layer times of the prefill pass (with `timing`).
    pub prefill_times: Option<Vec<flashmoe::LayerTimes>>,
    pub warmup_tokens: usize,
    pub tokens: usize,
    pub decode_secs: f64,
    /// Wall time of each measured step.
    pub step_secs: Vec<f64>,
    /// Store counters over the measured steps.
    pub io: IoSnapshot,
    /// `page`, `direct`, or `mmap` (no store: computed on the mapped files).
    pub io_mode: &'static str,
    pub io_note: String,
    pub ram_cache_bytes: u64,
    pub expert_bytes: u64,
    /// Σ over layers of the time blocked on expert reads, measured steps.
    pub io_wait_secs: f64,
    pub peak_rss: Option<u64>,
    pub routing: Routing,
    pub experts_per_token: usize,
    pub num_experts: usize,
    /// GPU figures over the measured steps, when the model ran on a GPU.
    pub gpu: Option<GpuDecodeInfo>,
    /// The CPU's memory roofline, when the model ran on the CPU.
    pub cpu: Option<CpuDecodeInfo>,
    /// Experts the pre-warm read (GPU and RAM tiers), since load.
    pub prewarmed: u64,
}

/// The limit a CPU decode is held against: the bytes a token reads (non-expert weights, k routed
/// experts per layer, recurrent states, KV cache) at the memory read bandwidth measured in the
/// same run, on the same threads.
#[derive(Clone, Debug, Default)]
pub struct CpuDecodeInfo {
    pub threads: usize,
    pub bytes_per_token: f64,
    /// Bytes per second, best of several parallel read passes over a buffer far larger than the
    /// last-level cache.
    pub read_bw: f64,
}

impl CpuDecodeInfo {
    /// Decode rate if every byte a token touches came from memory at `read_bw` and nothing else
    /// took time.
    pub fn roofline_tok_s(&self) -> f64 {
        self.read_bw / self.bytes_per_token.max(1.0)
    }
}

/// Memory read bandwidth of this process's compute threads (the rayon pool), bytes per second:
/// the best of `reps` passes summing a `bytes` buffer in parallel (`flashmoe_kernels::parallel_sum`;
/// first touched by the same threads, so its pages sit where they read it).
pub fn host_read_bandwidth(bytes: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let n = (bytes / 4).max(1 << 20);
    let chunk = 1 << 16;
    let mut buf = vec![0f32; n];
    buf.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| c.fill((i % 7) as f32));
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::hint::black_box(flashmoe_kernels::parallel_sum(&buf));
        best = best.max((n * 4) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// What a GPU decode moved and the limits it is held against.
#[derive(Clone, Debug, Default)]
pub struct GpuDecodeInfo {
    pub device: String,
    pub pool_slots: usize,
    pub total_experts: usize,
    /// Every expert was loaded into the GPU cache before measuring.
    pub preloaded: bool,
    pub pool_hits: u64,
    pub pool_misses: u64,
    pub h2d_bytes: u64,
    /// Misses the CPU computed instead of copying them (hybrid decode).
    pub cpu_experts: u64,
    /// RAM-tier misses that crossed PCIe to be computed on the GPU, uncached (hybrid decode).
    pub pcie_experts: u64,
    /// Evicted experts copied back to the RAM tier (exclusive tiers), GPU-to-host bytes.
    pub d2h_bytes: u64,
    /// Experts the pre-warm placed on the GPU, since load.
    pub prewarmed: u64,
    /// Host seconds blocked on the GPU for expert ids, and spent on the misses the CPU computes
    /// (their lookups and views, then the wait for the compute pool after issuing the PCIe
    /// share).
    pub ids_wait_secs: f64,
    pub cpu_secs: f64,
    /// The pool's expert kernels (wall time, overlapping the PCIe share's host work), and, of
    /// `cpu_secs`, the RAM-tier lookups and views.
    pub cpu_kernel_secs: f64,
    pub cpu_fetch_secs: f64,
    /// Host seconds queuing the CPU's outputs up to the GPU; inside the MoE op of steps with
    /// misses; of those whole passes.
    pub upload_secs: f64,
    /// Host seconds choosing and queuing hybrid decode's PCIe share.
    pub pcie_host_secs: f64,
    pub moe_host_secs: f64,
    pub pass_host_secs: f64,
    /// Decode steps the GPU timed, and their GPU spans (first to last operation), seconds.
    pub timed_steps: u64,
    pub gpu_span_secs: f64,
    /// One routed expert's matrix bytes (the first layer's).
    pub expert_bytes: f64,
    /// Bytes the GPU must read (and state it must write) per decode token with every expert
    /// resident: non-expert weights, k routed experts per layer, recurrent states, KV cache.
    pub bytes_per_token: f64,
    /// Device-to-device copy bandwidth, read + write bytes per second (the memory roofline).
    pub d2d_bw: f64,
    /// Pinned host-to-device copy bandwidth, bytes per second (the PCIe limit).
    pub h2d_bw: f64,
    /// Each GPU's share when the model is split over several (empty otherwise).
    pub per_gpu: Vec<GpuShare>,
}

/// One GPU of a split model during the measured steps.
#[derive(Clone, Debug, Default)]
pub struct GpuShare {
    pub layers: std::ops::Range<usize>,
    pub device: String,
    pub pool_slots: usize,
    pub total_experts: usize,
    pub pool_hits: u64,
    pub pool_misses: u64,
    pub h2d_bytes: u64,
    pub gpu_span_secs: f64,
}

impl GpuDecodeInfo {
    pub fn hit_rate(&self) -> f64 {
        let n = self.pool_hits + self.pool_misses;
        if n == 0 { 1.0 } else { self.pool_hits as f64 / n as f64 }
    }
}

impl DecodeReport {
    pub fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.decode_secs.max(1e-12)
    }
    pub fn disk_bytes_per_token(&self) -> f64 {
        self.io.disk_bytes as f64 / self.tokens.max(1) as f64
    }
    /// Decode time not spent waiting for reads, per token (mixer, router, expert compute, norms,
    /// embedding and lm_head).
    pub fn compute_secs_per_token(&self) -> f64 {
        (self.decode_secs - self.io_wait_secs).max(0.0) / self.tokens.max(1) as f64
    }
    pub fn io_wait_per_token(&self) -> f64 {
        self.io_wait_secs / self.tokens.max(1) as f64
    }
    /// The floor: every disk byte read at `disk_bw` bytes/s, then the compute, nothing overlapped.
    pub fn floor(&self, disk_bw: f64) -> Floor {
        let io = self.disk_bytes_per_token() / disk_bw.max(1.0);
        let compute = self.compute_secs_per_token();
        Floor { io_secs: io, compute_secs: compute, tok_s: 1.0 / (io + compute).max(1e-12), achieved: self.tok_s() }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Floor {
    pub io_secs: f64,
    pub compute_secs: f64,
    pub tok_s: f64,
    pub achieved: f64,
}

impl Floor {
    pub fn ratio(&self) -> f64 {
        self.achieved / self.tok_s
    }
}

/// Resets the process's peak-RSS mark (VmHWM), so a later peak describes what follows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A bf16 [rows, cols] matrix owned in memory.
struct OwnedBytes(Vec<u8>);

impl ByteSource for OwnedBytes {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A router whose top-k is a fresh uniform random subset for any nonzero input: only column `c`
/// is nonzero, holding i.i.d. values, so the logits are x[c]·g (top-k or bottom-k of g by the
/// sign of x[c]: a uniform subset either way). Rebuilt before every step.
/// A bf16 `Linear` over bytes built in memory.
fn uniform_router(rows: usize, cols: usize, col: usize, rng: &mut Rng) -> Result<Linear> {
    let mut data = vec![0u8; rows * cols * 2];
    for r in 0..rows {
        let v = half::bf16::from_f32(rng.normal()).to_le_bytes();
        let at = (r * cols + col) * 2;
        data[at..at + 2].copy_from_slice(&v);
    }
    let len = data.len();
    let t = RawTensor {
        name: "bench.uniform_router".into(),
        dtype: safetensors::Dtype::BF16,
        shape: vec![rows, cols],
        bytes: Bytes::new(Arc::new(OwnedBytes(data)), 0, len),
        file: PathBuf::from("<bench>"),
    };
    Linear::float(&t, rows, cols)
}

/// Replaces every layer's router (on whatever backend the model runs).
fn set_uniform_routers(model: &mut Model, rng: &mut Rng) -> Result<()> {
    let (e, h) = (model.config.num_experts, model.config.hidden_size);
    for li in 0..model.config.num_layers {
        // Column 0 could be tiny for some hidden state; any column works, pick one at random.
        let router = uniform_router(e, h, rng.below(h), rng)?;
        model.set_router(li, &router)?;
    }
    Ok(())
}

/// Loads a packed model streaming its experts (or, with `--io mmap`, computing on views of the
/// mapped expert files: no reads, no store). Per-layer timing is on for the CPU only (on a GPU it
/// synchronizes at every phase and turns graphs off, which is not what decode measures).
pub fn load_streamed(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    let timing = opts.device.device == DeviceChoice::Cpu;
    let mapped = opts.store.io == IoChoice::Mmap;
    let model = Model::load_with(dir, &LoadOptions { stream_experts: !mapped, timing, ..opts.clone() })?;
    if !mapped && model.expert_store().is_none() {
        return Err(Error::input(format!(
            "{} is not a packed model: bench decode streams experts from a packed model (`flashmoe convert` or `flashmoe synth`)",
            dir.display()
        )));
    }
    Ok(model)
}

/// Waits (up to 2 min) while the RAM tier's entries move into pinned memory, and says so when
/// that took a noticeable time (`when`: where in the run, for the message).
fn settle(model: &Model, when: &str) {
    let settled = model.settle(std::time::Duration::from_secs(120));
    if settled.as_secs_f64() > 0.1 {
        eprintln!("[flashmoe] waited {:.1} s{when} for the RAM tier to move into pinned memory", settled.as_secs_f64());
    }
}

/// Decodes random token ids: a short prefill, `warmup` steps, then `tokens` measured T=1 steps.
/// `progress` hears the background pre-warm while the warm-up waits for it (phase `pre-warm`:
/// experts read, of those it goes through).
pub fn bench_decode(model: &mut Model, opts: &DecodeBenchOptions, progress: &dyn Progress) -> Result<DecodeReport> {
    // None with `--io mmap`: the experts are views of the mapped files, nothing is read or cached.
    let store = model.expert_store().cloned();
    let cfg = model.config.clone();
    let mut rng = Rng::new(opts.seed);
    let k = model.experts_per_token();
    let warmup = opts.warmup.unwrap_or_else(|| match &store {
        Some(store) => {
            let per_token: u64 = (0..store.num_layers()).map(|l| store.expert_stride(l) * k as u64).sum();
            (store.ram_cache_budget().div_ceil(per_token.max(1)) as usize) + 2
        }
        // Mapped: enough steps to fault in the pages of the experts most tokens use.
        None => 32,
    });
    let total = opts.prefill.max(1) + warmup + opts.tokens;
    // Room for a warm-up that waits for a pre-warm to end.
    if total + 4096 > model.max_context() {
        model.set_max_context(total + 4096);
    }
    reset_peak_rss();
    // Everything fits in the backend's tier: measure the all-resident case, not first-touch copies.
    let preloaded = match model.tier() {
        Some(t) if t.slots == t.total_experts => {
            model.preload_experts()?;
            true
        }
        _ => false,
    };
    let mut state = model.new_state();
    let tok = |rng: &mut Rng| rng.below(cfg.vocab_size) as u32;
    let prompt: Vec<u32> = (0..opts.prefill.max(1)).map(|_| tok(&mut rng)).collect();
    if opts.routing == Routing::Uniform {
        set_uniform_routers(model, &mut rng)?;
    }
    if model.tier().is_some() {
        // Load the GPU's lazily loaded libraries and kernels (cuBLAS) outside the timed prefill.
        let mut scratch = model.new_state();
        model.forward(&prompt, &mut scratch, LogitsFor::Last)?;
        // That pass read into the RAM tier whatever it had to; its entries move into pinned
        // memory once no pass runs (GPU fills then DMA from them): measure the prefill on the
        // tiers as a long-running process has them, as the decode steps below are.
        settle(model, " before the prefill");
    }
    model.reset_timing();
    let t0 = Instant::now();
    // One logits vector for every step, as the generation loop does.
    let mut logits = model.forward(&prompt, &mut state, LogitsFor::Last)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let prefill_times = model.timing_snapshot();
    // Warm up for `warmup` steps and, while a pre-warm is still filling the tiers, until it
    // ends (the measured steps see the tiers it leaves).
    let mut warmup = warmup;
    let mut step = 0;
    let mut prewarm_shown = 0;
    let showing_prewarm = model.prewarm_running();
    if let Some(p) = model.prewarm_info().filter(|_| showing_prewarm) {
        progress.start(p.to_read as u64, "pre-warm");
    }
    while step < warmup || (model.prewarm_running() && state.pos + opts.tokens + 1 < model.max_context()) {
        let id = tok(&mut rng);
        if opts.routing == Routing::Uniform {
            set_uniform_routers(model, &mut rng)?;
        }
        model.forward_into(&[id], &mut state, LogitsFor::Last, &mut logits)?;
        step += 1;
        if showing_prewarm {
            // The store counts pre-warm reads since load: the pre-warm's own total.
            let placed = store.as_ref().map_or(0, |s| s.snapshot().prewarmed);
            progress.inc(placed - prewarm_shown);
            prewarm_shown = placed;
            progress.message(&format!("warm-up step {step}"));
        }
    }
    if showing_prewarm {
        progress.finish();
    }
    // RAM-tier entries move into pinned memory (hybrid decode's PCIe share) only while no pass
    // runs: measure the tiers as they are once that is done.
    settle(model, "");
    warmup = warmup.max(step);
    model.reset_timing();
    let before = store.as_ref().map(|s| s.snapshot()).unwrap_or_default();
    let tier_before = model.tier().map(|t| t.counters);
    let stages_before: Vec<_> = model.stage_tiers().into_iter().map(|(_, t)| t.counters).collect();
    let mut step_secs = Vec::with_capacity(opts.tokens);
    for _ in 0..opts.tokens {
        let id = tok(&mut rng);
        if opts.routing == Routing::Uniform {
            set_uniform_routers(model, &mut rng)?;
        }
        let t = Instant::now();
        model.forward_into(&[id], &mut state, LogitsFor::Last, &mut logits)?;
        step_secs.push(t.elapsed().as_secs_f64());
    }
    let io = store.as_ref().map(|s| s.snapshot().since(&before)).unwrap_or_default();
    let io_wait_secs = model.timing_snapshot().map_or(io.wait_secs, |v| v.iter().map(|t| t.io_wait).sum());
    let gpu = match tier_before {
        Some(b) => decode_info(model, store.as_ref(), &b, &stages_before, preloaded, state.pos)?,
        None => None,
    };
    // On the CPU the limit is memory: measured now, on the threads that decoded (1 GiB, larger
    // than any last-level cache, so it comes from DRAM as a token's weights do).
    let cpu = gpu.is_none().then(|| CpuDecodeInfo {
        threads: rayon::current_num_threads(),
        bytes_per_token: model.decode_bytes_per_token(state.pos),
        read_bw: host_read_bandwidth(1 << 30, 5),
    });
    Ok(DecodeReport {
        prefill_tokens: prompt.len(),
        prefill_secs,
        prefill_times,
        warmup_tokens: warmup,
        tokens: opts.tokens,
        decode_secs: step_secs.iter().sum(),
        step_secs,
        io,
        io_mode: store.as_ref().map_or("mmap", |s| s.mode().name()),
        io_note: store.as_ref().map_or_else(|| "mapped expert files (requested)".into(), |s| s.mode_note.clone()),
        ram_cache_bytes: store.as_ref().map_or(0, |s| s.ram_cache_budget()),
        expert_bytes: store.as_ref().map_or(0, |s| s.total_expert_bytes()),
        io_wait_secs,
        peak_rss: flashmoe::generate::peak_rss_bytes(),
        routing: opts.routing,
        experts_per_token: k,
        num_experts: cfg.num_experts,
        gpu,
        cpu,
        prewarmed: store.as_ref().map_or(0, |s| s.snapshot().prewarmed),
    })
}

/// The device figures of a decode run: expert-tier counters since `before`, bytes moved per
/// token and the bandwidths measured on the device.
fn decode_info(
    model: &Model,
    store: Option<&Arc<ExpertStore>>,
    before: &TierCounters,
    stages_before: &[TierCounters],
    preloaded: bool,
    pos: usize,
) -> Result<Option<GpuDecodeInfo>> {
    let (Some(t), Some(bw)) = (model.tier(), model.measure_bandwidths()?) else { return Ok(None) };
    // One expert's matrix bytes (layer 0's; not the padded stride on disk).
    let expert_bytes = store.and_then(|s| s.expert_matrix_bytes(0)).unwrap_or(0) as f64;
    let d = t.counters.since(before);
    Ok(Some(GpuDecodeInfo {
        device: t.device,
        pool_slots: t.slots,
        total_experts: t.total_experts,
        preloaded,
        pool_hits: d.hits,
        pool_misses: d.misses,
        h2d_bytes: d.h2d_bytes,
        cpu_experts: d.cpu_experts,
        pcie_experts: d.pcie_experts,
        d2h_bytes: d.d2h_bytes,
        prewarmed: t.counters.prewarmed,
        ids_wait_secs: d.ids_wait_ns as f64 * 1e-9,
        cpu_secs: d.cpu_ns as f64 * 1e-9,
        cpu_kernel_secs: d.cpu_kernel_ns as f64 * 1e-9,
        cpu_fetch_secs: d.cpu_fetch_ns as f64 * 1e-9,
        upload_secs: d.upload_ns as f64 * 1e-9,
        pcie_host_secs: d.pcie_host_ns as f64 * 1e-9,
        moe_host_secs: d.moe_host_ns as f64 * 1e-9,
        pass_host_secs: d.pass_host_ns as f64 * 1e-9,
        timed_steps: d.decode_steps,
        gpu_span_secs: d.decode_gpu_ns as f64 * 1e-9,
        expert_bytes,
        bytes_per_token: model.decode_bytes_per_token(pos),
        d2d_bw: bw.d2d,
        h2d_bw: bw.h2d,
        per_gpu: match model.stage_tiers() {
            stages if stages.len() > 1 => stages
                .into_iter()
                .zip(stages_before)
                .map(|((layers, t), b)| {
                    let d = t.counters.since(b);
                    GpuShare {
                        layers,
                        device: t.device,
                        pool_slots: t.slots,
                        total_experts: t.total_experts,
                        pool_hits: d.hits,
                        pool_misses: d.misses,
                        h2d_bytes: d.h2d_bytes,
                        gpu_span_secs: d.decode_gpu_ns as f64 * 1e-9 / d.decode_steps.max(1) as f64,
                    }
                })
                .collect(),
            _ => Vec::new(),
        },
    }))
}

// ------------------------------------------------------------------------------------------------
// Sweep
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct SweepPoint {
    /// RAM tier size.
    pub cache_bytes: u64,
    /// The GPU expert cache as given (`bench sweep --gpu-caches`), None when not swept.
    pub gpu_cache: Option<String>,
    pub report: DecodeReport,
}

/// One CSV row per point. The GPU columns (the cache as given, its slots, its hit rate, experts
/// computed by the CPU and sent over PCIe per token) are empty for a run without a GPU.
pub fn sweep_csv(points: &[SweepPoint], disk_bw: f64) -> String {
    let mut s = String::from(
        "cache_bytes,cache_fraction,tok_s,ram_hit_rate,disk_bytes_per_token,compute_s_per_token,io_wait_s_per_token,floor_tok_s,peak_rss_bytes,gpu_cache,gpu_slots,gpu_hit_rate,cpu_experts_per_token,pcie_experts_per_token\n",
    );
    for p in points {
        let r = &p.report;
        let f = r.floor(disk_bw);
        let gpu = match &r.gpu {
            Some(g) => {
                let lookups = (g.pool_hits + g.pool_misses).max(1) as f64;
                let per_token = |n: u64| n as f64 / r.tokens.max(1) as f64;
                format!(
                    "{},{:.4},{:.3},{:.3}",
                    g.pool_slots,
                    g.pool_hits as f64 / lookups,
                    per_token(g.cpu_experts),
                    per_token(g.pcie_experts)
                )
            }
            None => ",,,".into(),
        };
        s.push_str(&format!(
            "{},{:.4},{:.4},{:.4},{:.0},{:.5},{:.5},{:.4},{},{},{}\n",
            p.cache_bytes,
            p.cache_bytes as f64 / r.expert_bytes.max(1) as f64,
            r.tok_s(),
            r.io.ram_hit_rate(),
            r.disk_bytes_per_token(),
            r.compute_secs_per_token(),
            r.io_wait_per_token(),
            f.tok_s,
            r.peak_rss.unwrap_or(0),
            p.gpu_cache.as_deref().unwrap_or(""),
            gpu
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_picks_distinct_uniformly() {
        let mut r = Rng::new(7);
        let mut counts = [0usize; 16];
        for _ in 0..4000 {
            let v = r.distinct(16, 4);
            let mut s = v.clone();
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), 4);
            for x in v {
                counts[x] += 1;
            }
        }
        // 1000 expected each.
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn spread_median() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 2.0, 4.0, 3.0]).median, 2.5);
    }

    #[test]
    fn uniform_router_top_k_is_uniform() {
        let mut rng = Rng::new(3);
        let (e, h, k) = (8, 16, 2);
        let x: Vec<f32> = (0..h).map(|i| 0.1 + i as f32).collect();
        let mut counts = vec![0usize; e];
        for _ in 0..2000 {
            let r = uniform_router(e, h, rng.below(h), &mut rng).unwrap();
            let y = r.apply(&x, 1);
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|&a, &b| y[b].total_cmp(&y[a]));
            for &i in &idx[..k] {
                counts[i] += 1;
            }
        }
        assert!(counts.iter().all(|&c| (400..600).contains(&c)), "{counts:?}");
    }
}

/// `bench batch`: decode with several sequences at once (continuous batching).
#[derive(Clone, Debug)]
pub struct BatchBenchOptions {
    /// Sequences decoded together (one measurement each).
    pub streams: usize,
    /// Measured decode steps (each gives every sequence one token).
    pub tokens: usize,
    /// Prompt tokens of each sequence, prefilled alone first.
    pub prefill: usize,
    /// Unmeasured batched steps first.
    pub warmup: usize,
    pub seed: u64,
}

/// What one `bench batch` measurement saw.
#[derive(Clone, Debug)]
pub struct BatchReport {
    pub streams: usize,
    /// Wall time of each measured step (one token for every sequence).
    pub step_secs: Vec<f64>,
    /// Expert-store traffic of the measured steps (zero with mapped experts).
    pub io: IoSnapshot,
    /// The backend's own tier (a GPU's expert cache) over the measured steps.
    pub tier: Option<TierCounters>,
}

impl BatchReport {
    /// Tokens per second over all sequences: streams / median step.
    pub fn aggregate_tok_s(&self) -> f64 {
        self.streams as f64 / Spread::of(&self.step_secs).median.max(1e-12)
    }
    /// Tokens per second each sequence sees: 1 / median step.
    pub fn per_stream_tok_s(&self) -> f64 {
        1.0 / Spread::of(&self.step_secs).median.max(1e-12)
    }
    /// Expert bytes read from disk per generated token.
    pub fn disk_bytes_per_token(&self) -> f64 {
        self.io.disk_bytes as f64 / (self.streams * self.step_secs.len()).max(1) as f64
    }
    /// Expert fetches (RAM hits and disk reads) per generated token.
    pub fn fetches_per_token(&self) -> f64 {
        (self.io.ram_hits + self.io.ram_misses) as f64 / (self.streams * self.step_secs.len()).max(1) as f64
    }
}

/// Prefills `streams` sequences with random prompts (alone), then decodes them together with
/// [`Model::forward_batch`]: `warmup` unmeasured steps, then `tokens` measured ones, each step
/// one random token per sequence. Routing is the model's own (a synthetic model's routers are
/// shaped like the real profiles), so sequences share experts as real ones do.
pub fn bench_batch(model: &mut Model, opts: &BatchBenchOptions) -> Result<BatchReport> {
    if opts.streams == 0 || opts.tokens == 0 {
        return Err(Error::input("bench batch needs at least one stream and one measured step"));
    }
    if opts.streams > 1 && !model.can_batch() {
        return Err(Error::input(format!(
            "{} cannot run several sequences in one pass (continuous batching runs on the CPU backend)",
            model.device_description()
        )));
    }
    let store = model.expert_store().cloned();
    let cfg = model.config.clone();
    let mut rng = Rng::new(opts.seed);
    let total = opts.prefill.max(1) + opts.warmup + opts.tokens;
    if total + 16 > model.max_context() {
        model.set_max_context(total + 16);
    }
    if let Some(t) = model.tier()
        && t.slots == t.total_experts
    {
        model.preload_experts()?;
    }
    let tok = |rng: &mut Rng| rng.below(cfg.vocab_size) as u32;
    let mut states = Vec::with_capacity(opts.streams);
    for _ in 0..opts.streams {
        let prompt: Vec<u32> = (0..opts.prefill.max(1)).map(|_| tok(&mut rng)).collect();
        let mut s = model.new_state();
        model.forward(&prompt, &mut s, LogitsFor::Last)?;
        states.push(s);
    }
    let mut logits = Vec::new();
    let mut step = |model: &Model, rng: &mut Rng, states: &mut Vec<flashmoe::SequenceState>| -> Result<f64> {
        let ids: Vec<u32> = (0..states.len()).map(|_| tok(rng)).collect();
        let t = Instant::now();
        if states.len() == 1 {
            model.forward_into(&ids, &mut states[0], LogitsFor::Last, &mut logits)?;
        } else {
            let mut refs: Vec<&mut flashmoe::SequenceState> = states.iter_mut().collect();
            model.forward_batch(&ids, &mut refs, &mut logits)?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    for _ in 0..opts.warmup {
        step(model, &mut rng, &mut states)?;
    }
    let before = store.as_ref().map(|s| s.snapshot()).unwrap_or_default();
    let tier_before = model.tier().map(|t| t.counters);
    model.reset_timing();
    let mut step_secs = Vec::with_capacity(opts.tokens);
    for _ in 0..opts.tokens {
        step_secs.push(step(model, &mut rng, &mut states)?);
    }
    let io = store.as_ref().map(|s| s.snapshot().since(&before)).unwrap_or_default();
    let tier = tier_before.and_then(|b| model.tier().map(|t| t.counters.since(&b)));
    Ok(BatchReport { streams: opts.streams, step_secs, io, tier })
}
