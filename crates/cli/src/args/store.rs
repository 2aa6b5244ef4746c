//! `--io --ram-cache --memory-budget --io-threads --cache-policy`: how a model's experts are read
//! and cached, and the memory plan of `--memory-budget`.

use crate::util::fmt_bytes;
use anyhow::{Result, anyhow, bail};
use clap::Args;
use flashmoe::LoadOptions;
use flashmoe::experts::IoChoice;
use flashmoe::memory::{MemoryPlan, parse_size};
use std::path::Path;

/// How a model's experts are read and cached.
#[derive(Args, Clone, Debug)]
pub struct StoreArgs {
    /// Expert reads: through the page cache, O_DIRECT, mmap (no reads: compute on the mapped
    /// files, the page cache being the only RAM tier; no --ram-cache, no routing profile), or
    /// auto: on the CPU with no --ram-cache or --memory-budget, mmap when the experts fit in
    /// memory; otherwise page or O_DIRECT, decided at start.
    #[arg(long, default_value = "auto")]
    pub io: IoChoice,
    /// RAM expert cache (e.g. 4G). Default: what --memory-budget leaves, else none (in page mode
    /// the OS page cache is the RAM tier).
    #[arg(long)]
    pub ram_cache: Option<String>,
    /// Bound on resident memory (e.g. 16G): weights + state + buffers + RAM expert cache.
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Expert reads in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub io_threads: usize,
    /// RAM cache eviction: lfu (with aging, half-life 32 tokens; the default, chosen by replaying
    /// routing traces, docs/performance.md), lfu:N (half-life N tokens) or lru.
    #[arg(long, default_value = "lfu")]
    pub cache_policy: flashmoe::experts::cache::CachePolicy,
    /// Pre-warm the expert tiers in the background, hottest first, from a routing profile:
    /// auto (the counts earlier runs of this model saved in the cache folder; this run's are
    /// added at exit), off, or a profile file written by flashmoe.
    #[arg(long, default_value = "auto")]
    pub routing_profile: flashmoe::runtime::ProfileSource,
    /// Do not check each expert against its manifest checksum on its first read from disk (the
    /// check is one xxh3 pass per expert per run, on the I/O threads).
    #[arg(long)]
    pub no_verify: bool,
}

/// What the memory plan of `--memory-budget` is sized for.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Longest sequence (prompt + reply) the state must hold.
    pub context_tokens: usize,
    /// Largest batch (prompt) processed at once.
    pub batch_tokens: usize,
    /// Rows of logits held at once: 1 when generating, the window for `ppl`, every id for `logits`.
    pub logits_rows: usize,
    /// Sequences whose states are held at once (a server's batch; 1 otherwise).
    pub sequences: usize,
}

impl StoreArgs {
    /// Load options with these store settings (and, under a budget, the fetch chunk), and the
    /// memory plan when a budget is set.
    pub fn load_options(&self, dir: &Path, plan: Plan) -> Result<(LoadOptions, Option<MemoryPlan>)> {
        let mut opts = LoadOptions::default();
        opts.store.io = self.io;
        opts.store.io_threads = self.io_threads;
        opts.store.cache_policy = self.cache_policy;
        opts.store.verify = !self.no_verify;
        opts.routing_profile = self.routing_profile.clone();
        if self.io == IoChoice::Mmap {
            if self.ram_cache.is_some() || self.memory_budget.is_some() {
                bail!(
                    "--io mmap reads experts in place (the page cache is the RAM tier): it takes no --ram-cache or --memory-budget"
                );
            }
            opts.stream_experts = false;
            return Ok((opts, None));
        }
        let mut memory_plan = None;
        if let Some(b) = &self.memory_budget {
            let budget = parse_size(b).map_err(|e| anyhow!("--memory-budget {e}"))?;
            // Under a budget, fetch one token's worth of experts at a time.
            let chunk = flashmoe::models::load_config(dir)?.experts_per_token;
            opts.fetch_chunk = Some(chunk);
            let plan = flashmoe::memory::plan(
                dir,
                budget,
                flashmoe::memory::Sequences { count: plan.sequences.max(1), tokens: plan.context_tokens },
                chunk,
                plan.batch_tokens,
                plan.logits_rows,
                self.io_threads,
            )?;
            opts.store.ram_cache_bytes = plan.ram_cache;
            if let Some(r) = &self.ram_cache {
                let r = parse_size(r).map_err(|e| anyhow!("--ram-cache {e}"))?;
                if r > plan.ram_cache {
                    bail!(
                        "--ram-cache {} does not fit the memory budget (room for {})",
                        fmt_bytes(r),
                        fmt_bytes(plan.ram_cache)
                    );
                }
                opts.store.ram_cache_bytes = r;
            }
            memory_plan = Some(plan);
        } else if let Some(r) = &self.ram_cache {
            opts.store.ram_cache_bytes = parse_size(r).map_err(|e| anyhow!("--ram-cache {e}"))?;
        }
        Ok((opts, memory_plan))
    }
}
