//! The memory plan behind `--memory-budget`: what stays resident (non-expert weights, sequence
//! state, I/O buffers, the process itself) and how much is left for the RAM expert cache. Refuses
//! up front, with the numbers, when even the resident part does not fit.

use crate::config::{LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::packed::Manifest;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct MemoryPlan {
    pub budget: u64,
    /// Non-expert weights, mapped and touched every token (so resident).
    pub non_expert: u64,
    /// KV cache and delta-net state for `context_tokens`.
    pub state: u64,
    /// Expert buffers in flight plus activations.
    pub buffers: u64,
    /// Resident size of the process before the model (code, libraries, runtime).
    pub baseline: u64,
    pub ram_cache: u64,
    /// Expert buffers fetched at once (set the model's `fetch_chunk` to this).
    pub fetch_chunk: usize,
    /// All routed experts on disk.
    pub experts_on_disk: u64,
}

/// Current resident set size of this process (VmRSS).
pub fn current_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|x| x.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

pub use crate::units::{fmt_bytes as fmt, parse_size};

/// Saturating: an absurd context gives u64::MAX (which no budget fits), never a wrapped small
/// number.
pub fn state_bytes(cfg: &ModelConfig, context_tokens: usize) -> u64 {
    cfg.layer_kinds
        .iter()
        .map(|k| match k {
            LayerKind::FullAttention => {
                ((2 * cfg.num_kv_heads * cfg.head_dim * 4) as u64).saturating_mul(context_tokens as u64)
            }
            LayerKind::LinearAttention => {
                let rec = cfg.linear_value_heads * cfg.linear_key_dim * cfg.linear_value_dim;
                let conv = cfg.conv_kernel.saturating_sub(1) * cfg.conv_dim();
                ((rec + conv) * 4) as u64
            }
        })
        .fold(0u64, u64::saturating_add)
}

/// What a model folder holds: bytes of non-expert weights and of routed experts as stored.
#[derive(Clone, Debug)]
pub struct Footprint {
    pub config: ModelConfig,
    pub non_expert: u64,
    /// All routed experts.
    pub experts: u64,
    /// The largest single expert, rounded up to a page (the read buffer size).
    pub max_expert: u64,
}

/// Reads a model's footprint (packed manifest, or the HF/MLX/GGUF weights mapped, not read).
pub fn footprint(dir: &Path) -> Result<Footprint> {
    let resident_footprint = |config: ModelConfig, w: &crate::models::qwen35::ModelWeights| {
        let max_expert = w
            .layers
            .iter()
            .filter_map(|l| l.moe.experts.resident().and_then(|v| v.first()).map(|e| e.bytes() as u64))
            .max()
            .unwrap_or(0);
        Footprint {
            config,
            non_expert: w.non_expert_bytes() as u64,
            experts: w.expert_bytes() as u64,
            max_expert: max_expert.next_multiple_of(4096),
        }
    };
    if crate::gguf::is_gguf(dir) {
        // GGUF: experts are read in place from the file, like an HF folder's.
        let model = crate::gguf::GgufModel::open(dir)?;
        let w = crate::models::qwen35::ModelWeights::load_gguf(&model)?;
        return Ok(resident_footprint(model.config.clone(), &w));
    }
    let config = ModelConfig::load(dir)?;
    if dir.join(crate::packed::MANIFEST).exists() {
        let m = Manifest::load(dir)?;
        let (non_expert, max_expert, experts) = (
            m.tensors.iter().map(|t| t.nbytes).sum::<u64>(),
            m.experts.iter().map(|e| e.stride).max().unwrap_or(0),
            m.experts.iter().map(|e| e.stride * e.num_experts as u64).sum::<u64>(),
        );
        return Ok(Footprint { config, non_expert, experts, max_expert });
    }
    // HF/MLX folder: experts are read in place; everything else stays mapped and resident.
    let store = crate::packed::open_any(dir)?;
    let w = crate::models::qwen35::ModelWeights::load(&store, &config)?;
    Ok(resident_footprint(config, &w))
}

/// How a model would run on a machine with `ram` bytes of memory and, optionally, a GPU of
/// `gpu` bytes: the memory plan with the whole RAM as the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Weights, experts and state fit in GPU memory.
    AllOnGpu,
    /// Non-expert weights on the GPU (or in RAM without one) and every expert in the RAM tier.
    ExpertsInRam,
    /// Experts streamed from disk; the RAM tier holds `ram_cache` of `experts` bytes.
    Streamed { ram_cache: u64, experts: u64 },
    /// Not even the resident part fits; the plan's message says by how much.
    DoesNotFit(String),
}

impl Fit {
    pub fn describe(&self) -> String {
        match self {
            Fit::AllOnGpu => "all in GPU memory".into(),
            Fit::ExpertsInRam => "experts in RAM".into(),
            Fit::Streamed { ram_cache, experts } => format!(
                "experts streamed from disk (RAM caches {}, {:.0}%)",
                fmt(*ram_cache),
                100.0 * *ram_cache as f64 / (*experts).max(1) as f64
            ),
            Fit::DoesNotFit(why) => format!("does not fit: {why}"),
        }
    }
}

/// Context the fit of a listed model is judged for.
pub const FIT_CONTEXT: usize = 8192;

/// How the model in `dir` would run with `ram` bytes of RAM and a GPU of `gpu` bytes (the plan
/// of `--memory-budget` with the whole RAM as budget, for `FIT_CONTEXT` tokens).
pub fn fit(dir: &Path, ram: u64, gpu: Option<u64>) -> Result<Fit> {
    fit_at(dir, ram, gpu, current_rss_bytes())
}

/// `fit` for a process of `baseline` bytes (tests fix it: the live RSS moves as other threads
/// load libraries).
fn fit_at(dir: &Path, ram: u64, gpu: Option<u64>, baseline: u64) -> Result<Fit> {
    let f = footprint(dir)?;
    let state = state_bytes(&f.config, FIT_CONTEXT);
    // A tenth of the GPU for the workspace, activations and the driver.
    if let Some(g) = gpu
        && f.non_expert.saturating_add(f.experts).saturating_add(state) <= g - g / 10
    {
        return Ok(Fit::AllOnGpu);
    }
    let k = f.config.experts_per_token;
    match plan_at(&f, dir, ram, Sequences::one(FIT_CONTEXT), k, 512, 1, 8, baseline) {
        Ok(p) if p.ram_cache >= p.experts_on_disk => Ok(Fit::ExpertsInRam),
        Ok(p) => Ok(Fit::Streamed { ram_cache: p.ram_cache, experts: p.experts_on_disk }),
        Err(Error::Input(msg)) => Ok(Fit::DoesNotFit(msg)),
        Err(e) => Err(e),
    }
}

/// Total RAM of this machine (MemTotal), when /proc/meminfo says.
pub fn total_ram_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// The sequences a command keeps states for at once: `count` (a server's batch) of up to
/// `tokens` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sequences {
    pub count: usize,
    pub tokens: usize,
}

impl Sequences {
    /// One sequence of `tokens`.
    pub fn one(tokens: usize) -> Self {
        Sequences { count: 1, tokens }
    }
}

/// Plans a model under `budget` bytes. `fetch_chunk` is the most expert buffers fetched at
/// once; `batch_tokens` the largest batch (prompt) processed at once.
pub fn plan(
    dir: &Path,
    budget: u64,
    seqs: Sequences,
    fetch_chunk: usize,
    batch_tokens: usize,
    logits_rows: usize,
    io_threads: usize,
) -> Result<MemoryPlan> {
    plan_footprint(&footprint(dir)?, dir, budget, seqs, fetch_chunk, batch_tokens, logits_rows, io_threads)
}

/// `plan` for a footprint already read (`dir` names the model in the error).
#[allow(clippy::too_many_arguments)]
pub fn plan_footprint(
    f: &Footprint,
    dir: &Path,
    budget: u64,
    seqs: Sequences,
    fetch_chunk: usize,
    batch_tokens: usize,
    logits_rows: usize,
    io_threads: usize,
) -> Result<MemoryPlan> {
    plan_at(f, dir, budget, seqs, fetch_chunk, batch_tokens, logits_rows, io_threads, current_rss_bytes())
}

/// The plan for a process that already holds `baseline` bytes.
#[allow(clippy::too_many_arguments)]
fn plan_at(
    f: &Footprint,
    dir: &Path,
    budget: u64,
    seqs: Sequences,
    fetch_chunk: usize,
    batch_tokens: usize,
    logits_rows: usize,
    io_threads: usize,
    baseline: u64,
) -> Result<MemoryPlan> {
    let (non_expert, max_stride, experts_on_disk) = (f.non_expert, f.max_expert, f.experts);
    let c = &f.config;
    // Widest per-token activations: projections, expert hidden, logits of one row.
    let act_per_token = 4 * (c.hidden_size * 4 + 2 * c.num_heads * c.head_dim + c.conv_dim() * 2 + c.value_dim() * 2)
        + 4 * c.moe_intermediate.max(c.shared_intermediate) * 3;
    // Two chunks are alive at once (the one computing and the one being read), plus the store's
    // free list of recycled read buffers (2 × I/O threads).
    let buffers = (2 * fetch_chunk as u64)
        .saturating_add(2 * io_threads as u64)
        .saturating_mul(max_stride)
        .saturating_add((batch_tokens as u64).saturating_mul(act_per_token as u64))
        // The logits a command holds at once: one row for generation (two: the sampler's copy),
        // a whole window for `ppl` and `logits` (`LogitsFor::All`).
        .saturating_add((logits_rows.max(2) as u64).saturating_mul(c.vocab_size as u64 * 4))
        .saturating_add(16 << 20);
    let state = state_bytes(c, seqs.tokens).saturating_mul(seqs.count as u64);
    let states = match seqs.count {
        1 => format!("state for {} tokens", seqs.tokens),
        n => format!("states of {n} sequences of {} tokens", seqs.tokens),
    };
    let fixed = non_expert.saturating_add(state).saturating_add(buffers).saturating_add(baseline);
    if fixed > budget {
        return Err(Error::input(format!(
            "memory budget {} is too small for {}: non-expert weights {} + {states} {} + buffers {} + process {} = {} before any expert cache",
            fmt(budget),
            dir.display(),
            fmt(non_expert),
            fmt(state),
            fmt(buffers),
            fmt(baseline),
            fmt(fixed)
        )));
    }
    Ok(MemoryPlan {
        budget,
        non_expert,
        state,
        buffers,
        baseline,
        ram_cache: (budget - fixed).min(experts_on_disk),
        fetch_chunk,
        experts_on_disk,
    })
}

impl MemoryPlan {
    pub fn describe(&self) -> String {
        format!(
            "budget {} = non-expert weights {} + state {} + buffers {} + process {} + RAM expert cache {} (experts on disk: {})",
            fmt(self.budget),
            fmt(self.non_expert),
            fmt(self.state),
            fmt(self.buffers),
            fmt(self.baseline),
            fmt(self.ram_cache),
            fmt(self.experts_on_disk)
        )
    }
}

/// Shares a model's layers out over devices (a model split over GPUs): contiguous ranges, in
/// order, at least one layer each, chosen so the fullest device — its share of the bytes
/// (`layers[i]`: a layer's weights and experts; `head` on the first device: the embedding;
/// `tail` on the last: the final norm and lm_head) over its `room` — is as empty as it can be.
/// Each device then holds the same fraction of its memory when they differ in size, and the
/// expert cache of each covers the same fraction of its layers' experts.
pub fn split_layers(layers: &[u64], head: u64, tail: u64, room: &[u64]) -> Result<Vec<std::ops::Range<usize>>> {
    let (n, d) = (layers.len(), room.len());
    if d == 0 || d > n {
        return Err(Error::input(format!("{d} devices for {n} layers: each device needs at least one layer")));
    }
    if room.contains(&0) {
        return Err(Error::input("a device reports no memory"));
    }
    let mut prefix = vec![0u64; n + 1];
    for (i, &b) in layers.iter().enumerate() {
        prefix[i + 1] = prefix[i] + b;
    }
    let load = |dev: usize, a: usize, b: usize| {
        let extra = if dev == 0 { head } else { 0 } + if dev == d - 1 { tail } else { 0 };
        (prefix[b] - prefix[a] + extra) as f64 / room[dev] as f64
    };
    // best[k][j]: the least fullest-device load splitting the first j layers over devices 0..k;
    // cut[k][j]: where device k-1's range starts in it.
    let mut best = vec![vec![f64::INFINITY; n + 1]; d + 1];
    let mut cut = vec![vec![0usize; n + 1]; d + 1];
    best[0][0] = 0.0;
    for k in 1..=d {
        for j in k..=n - (d - k) {
            for a in (k - 1)..j {
                let v = best[k - 1][a].max(load(k - 1, a, j));
                if v < best[k][j] {
                    best[k][j] = v;
                    cut[k][j] = a;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(d);
    let mut j = n;
    for k in (1..=d).rev() {
        let a = cut[k][j];
        ranges.push(a..j);
        j = a;
    }
    ranges.reverse();
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fit_follows_the_plan_from_gpu_to_ram_to_disk() {
        use super::{FIT_CONTEXT, Fit, Sequences, fit, fit_at, footprint, plan_at};
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen35-moe-tiny");
        assert_eq!(fit(&dir, 1 << 40, Some(1 << 40)).unwrap(), Fit::AllOnGpu);
        assert_eq!(fit(&dir, 1 << 40, None).unwrap(), Fit::ExpertsInRam);
        assert_eq!(fit(&dir, 1 << 40, Some(1 << 10)).unwrap(), Fit::ExpertsInRam);
        // Budgets around the resident part: not fitting, then experts partly cached (streamed),
        // then all cached. The process's size is fixed here: the live RSS jumps when another
        // test thread loads a library (the CUDA driver did, on the GPU machine).
        let baseline = 100 << 20;
        let k = crate::ModelConfig::load(&dir).unwrap().experts_per_token;
        let p = plan_at(&footprint(&dir).unwrap(), &dir, 1 << 40, Sequences::one(FIT_CONTEXT), k, 512, 1, 8, baseline)
            .unwrap();
        let resident = p.non_expert + p.state + p.buffers + p.baseline;
        let step = 64 << 10;
        let mut seen = Vec::new();
        let mut budget = resident.saturating_sub(8 << 20);
        while budget < resident + p.experts_on_disk + (8 << 20) {
            let f = fit_at(&dir, budget, None, baseline).unwrap();
            if let Fit::Streamed { ram_cache, experts } = &f {
                assert_eq!(*experts, p.experts_on_disk);
                assert!(*ram_cache < *experts, "{ram_cache} of {experts}");
            }
            let class = match f {
                Fit::DoesNotFit(_) => 0,
                Fit::Streamed { .. } => 1,
                Fit::ExpertsInRam => 2,
                Fit::AllOnGpu => 3,
            };
            if seen.last() != Some(&class) {
                seen.push(class);
            }
            budget += step;
        }
        assert_eq!(seen, [0, 1, 2], "classes by growing budget");
        assert!(matches!(fit(&dir, 1 << 20, None).unwrap(), Fit::DoesNotFit(m) if m.contains("too small")));
    }

    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(super::parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(super::parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(super::parse_size("4096B").unwrap(), 4096);
        assert_eq!(super::parse_size("0").unwrap(), 0);
        assert!(super::parse_size("4").unwrap_err().contains("write 4G"));
        assert!(super::parse_size("lots").is_err());
        assert!(super::parse_size("3X").is_err());
    }
    #[test]
    fn layers_split_by_bytes_over_room() {
        use super::split_layers;
        // Equal layers, equal GPUs: halves; the embedding and head tip an odd count.
        assert_eq!(split_layers(&[10; 8], 0, 0, &[1, 1]).unwrap(), vec![0..4, 4..8]);
        assert_eq!(split_layers(&[10; 7], 15, 0, &[1, 1]).unwrap(), vec![0..3, 3..7]);
        assert_eq!(split_layers(&[10; 7], 0, 15, &[1, 1]).unwrap(), vec![0..4, 4..7]);
        // A GPU with twice the memory takes twice the layers.
        assert_eq!(split_layers(&[10; 9], 0, 0, &[2, 1]).unwrap(), vec![0..6, 6..9]);
        // Uneven layers (full attention among delta-net layers).
        assert_eq!(split_layers(&[1, 1, 1, 9, 1, 1, 1, 9], 0, 0, &[1, 1]).unwrap(), vec![0..4, 4..8]);
        // Three devices, each at least one layer.
        assert_eq!(split_layers(&[100, 1, 1], 0, 0, &[1, 1, 1]).unwrap(), vec![0..1, 1..2, 2..3]);
        assert_eq!(split_layers(&[5; 3], 0, 0, &[1]).unwrap(), vec![0..3]);
        assert!(split_layers(&[5; 3], 0, 0, &[1; 4]).is_err());
        assert!(split_layers(&[5; 3], 0, 0, &[1, 0]).is_err());
        assert!(split_layers(&[5; 3], 0, 0, &[]).is_err());
    }
}
