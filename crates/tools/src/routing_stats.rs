//! Routing statistics and RAM-cache policy simulation over routing traces
//! ([`flashmoe::routing`]).
//!
//! [`stats`] computes per layer: the gini coefficient of the expert activation counts, the top-20%
//! coverage (share of activations that go to the most used 20% of experts), the consecutive-token
//! overlap (mean |S_t ∩ S_{t−1}| / K) and LRU hit-rate curves, comparable with the real profiles
//! read by [`load_profile`]. [`simulate_cache`] replays a trace through a RAM expert cache policy.

use flashmoe::error::{Error, Result};
use flashmoe::routing::Trace;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Gini coefficient of non-negative counts: 0 when all are equal, (n−1)/n when one holds all.
pub fn gini(counts: &[u64]) -> f64 {
    let n = counts.len();
    let total: u64 = counts.iter().sum();
    if n == 0 || total == 0 {
        return 0.0;
    }
    let mut c = counts.to_vec();
    c.sort_unstable();
    let weighted: f64 = c.iter().enumerate().map(|(i, &x)| (i as f64 + 1.0) * x as f64).sum();
    2.0 * weighted / (n as f64 * total as f64) - (n as f64 + 1.0) / n as f64
}

/// Share of all activations that go to the most used `frac` of experts (at least one expert).
pub fn top_coverage(counts: &[u64], frac: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mut c = counts.to_vec();
    c.sort_unstable_by(|a, b| b.cmp(a));
    let m = ((counts.len() as f64 * frac).floor() as usize).max(1);
    c[..m].iter().sum::<u64>() as f64 / total as f64
}

/// LRU cache sizes reported by [`stats`] (capped at the number of experts).
pub const LRU_CAPACITIES: [usize; 6] = [8, 16, 32, 64, 128, 256];

#[derive(Clone, Debug, Serialize)]
pub struct LayerStats {
    pub gini: f64,
    pub top20: f64,
    /// Mean |S_t ∩ S_{t−1}| / K over consecutive tokens.
    pub overlap: f64,
    /// LRU hit rate for each of [`RoutingStats::capacities`].
    pub lru: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoutingStats {
    pub tokens: usize,
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub capacities: Vec<usize>,
    pub layers: Vec<LayerStats>,
    /// Mean over layers.
    pub mean: LayerStats,
}

/// Selection counts per layer: `counts[l][e]`.
pub fn layer_counts(trace: &Trace) -> Vec<Vec<u64>> {
    let h = &trace.header;
    let mut counts = vec![vec![0u64; h.num_experts]; h.num_layers];
    for t in &trace.tokens {
        for (l, sel) in t.experts.iter().enumerate() {
            for &e in sel {
                counts[l][e as usize] += 1;
            }
        }
    }
    counts
}

pub fn stats(trace: &Trace) -> RoutingStats {
    let h = &trace.header;
    let capacities: Vec<usize> = {
        let mut c: Vec<usize> = LRU_CAPACITIES.iter().map(|&c| c.min(h.num_experts)).collect();
        c.dedup();
        c
    };
    let counts = layer_counts(trace);
    let lru: Vec<Vec<f64>> = capacities
        .iter()
        .map(|&c| simulate_per_layer(trace, CachePolicy::Lru, c).iter().map(CacheResult::hit_rate).collect())
        .collect();
    let mut layers = Vec::with_capacity(h.num_layers);
    for l in 0..h.num_layers {
        let (mut inter, mut pairs) = (0usize, 0usize);
        for w in trace.tokens.windows(2) {
            let (a, b) = (&w[0].experts[l], &w[1].experts[l]);
            inter += b.iter().filter(|e| a.contains(e)).count();
            pairs += b.len().max(1);
        }
        layers.push(LayerStats {
            gini: gini(&counts[l]),
            top20: top_coverage(&counts[l], 0.2),
            overlap: if pairs == 0 { 0.0 } else { inter as f64 / pairs as f64 },
            lru: (0..capacities.len()).map(|c| lru[c][l]).collect(),
        });
    }
    let n = layers.len().max(1) as f64;
    let mean = LayerStats {
        gini: layers.iter().map(|s| s.gini).sum::<f64>() / n,
        top20: layers.iter().map(|s| s.top20).sum::<f64>() / n,
        overlap: layers.iter().map(|s| s.overlap).sum::<f64>() / n,
        lru: (0..capacities.len()).map(|c| layers.iter().map(|s| s.lru[c]).sum::<f64>() / n).collect(),
    };
    RoutingStats {
        tokens: trace.tokens.len(),
        num_layers: h.num_layers,
        num_experts: h.num_experts,
        top_k: h.top_k,
        capacities,
        layers,
        mean,
    }
}

/// One layer of a measured expert-activation profile (../shared/data/routing).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileLayer {
    pub gini: f64,
    pub top20: Option<f64>,
}

/// Reads a routing profile: a JSON object keyed by layer index whose values hold `gini` and the
/// top-20% coverage as `top20` (397B file) or `top20pct_coverage` (35B file).
pub fn load_profile(path: &Path) -> Result<Vec<ProfileLayer>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("malformed JSON: {e}")))?;
    let obj =
        v.as_object().ok_or_else(|| Error::file(path, "expected an object keyed by layer index (\"0\", \"1\", …)"))?;
    let mut layers = BTreeMap::new();
    for (k, val) in obj {
        let l: usize = k.parse().map_err(|_| Error::file(path, format!("key `{k}` is not a layer index")))?;
        let gini = val
            .get("gini")
            .and_then(|g| g.as_f64())
            .ok_or_else(|| Error::file(path, format!("layer {l}: no numeric `gini`")))?;
        let top20 = val.get("top20").or_else(|| val.get("top20pct_coverage")).and_then(|g| g.as_f64());
        layers.insert(l, ProfileLayer { gini, top20 });
    }
    if layers.is_empty() {
        return Err(Error::file(path, "profile holds no layers"));
    }
    let n = layers.len();
    if layers.keys().copied().ne(0..n) {
        return Err(Error::file(path, format!("layer indices must be 0..{n} without gaps")));
    }
    Ok(layers.into_values().collect())
}

/// The profile layer that layer `layer` of a model with `num_layers` layers is compared with:
/// the same index when the profile is at least as deep (a model's first layers are compared with
/// the profile's first layers), else the same relative depth.
pub fn profile_layer_for(layer: usize, num_layers: usize, profile_len: usize) -> usize {
    if num_layers <= profile_len {
        layer.min(profile_len - 1)
    } else {
        (layer * profile_len / num_layers).min(profile_len - 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Cache policy simulation

/// RAM expert-cache replacement policies compared by [`simulate_cache`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CachePolicy {
    /// Evict the least recently used expert.
    Lru,
    /// Evict the expert with the lowest exponentially decayed access count (each access adds 1;
    /// counts halve every `half_life` tokens; history is kept for evicted experts too).
    LfuAging { half_life: f64 },
    /// Half the capacity is pinned to the most frequently used experts of the first quarter of
    /// the trace (a profile from an earlier run), the other half is LRU; the cache starts filled
    /// with the most frequent experts.
    FrequencySeeded,
}

impl CachePolicy {
    pub fn name(&self) -> String {
        match self {
            CachePolicy::Lru => "lru".into(),
            CachePolicy::LfuAging { half_life } => format!("lfu-aging(hl={half_life})"),
            CachePolicy::FrequencySeeded => "frequency-seeded".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Capacity {
    /// Each layer has its own cache of this many experts.
    PerLayer(usize),
    /// One cache for all layers holding `bytes / expert_bytes` experts.
    GlobalBytes { bytes: u64, expert_bytes: u64 },
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CacheResult {
    pub lookups: u64,
    pub hits: u64,
}

impl CacheResult {
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 { 0.0 } else { self.hits as f64 / self.lookups as f64 }
    }
}

/// Replays the trace through a cache; a lookup hits when the expert is resident before the token
/// that needs it. Misses are always admitted (the expert has been read for compute anyway).
pub fn simulate_cache(trace: &Trace, policy: CachePolicy, capacity: Capacity) -> CacheResult {
    match capacity {
        Capacity::PerLayer(c) => simulate_per_layer(trace, policy, c)
            .into_iter()
            .fold(CacheResult::default(), |a, r| CacheResult { lookups: a.lookups + r.lookups, hits: a.hits + r.hits }),
        Capacity::GlobalBytes { bytes, expert_bytes } => {
            let slots = (bytes / expert_bytes.max(1)) as usize;
            let e = trace.header.num_experts;
            let keys: Vec<Vec<u32>> = trace
                .tokens
                .iter()
                .map(|t| {
                    t.experts.iter().enumerate().flat_map(|(l, s)| s.iter().map(move |&x| (l * e) as u32 + x)).collect()
                })
                .collect();
            run_policy(&keys, trace.header.num_layers * e, policy, slots)
        }
    }
}

/// Per-layer caches of `capacity` experts each: one result per layer.
pub fn simulate_per_layer(trace: &Trace, policy: CachePolicy, capacity: usize) -> Vec<CacheResult> {
    (0..trace.header.num_layers)
        .map(|l| {
            let keys: Vec<Vec<u32>> = trace.tokens.iter().map(|t| t.experts[l].clone()).collect();
            run_policy(&keys, trace.header.num_experts, policy, capacity)
        })
        .collect()
}

/// `accesses[t]`: the keys (< `num_keys`) token t needs.
fn run_policy(accesses: &[Vec<u32>], num_keys: usize, policy: CachePolicy, capacity: usize) -> CacheResult {
    let mut r = CacheResult::default();
    if capacity == 0 {
        r.lookups = accesses.iter().map(|a| a.len() as u64).sum();
        return r;
    }
    // Resident keys ordered by an eviction score (lowest evicted first).
    let mut order: BTreeMap<(u64, u32), ()> = BTreeMap::new();
    let mut score_of: Vec<Option<u64>> = vec![None; num_keys];
    let mut pinned = vec![false; num_keys];
    let mut free_slots = capacity;
    // LFU state: log2 of the decayed count referred to time 0 (so ordering never changes
    // between accesses), and whether the key was ever seen.
    let mut lfu_log = vec![f64::NEG_INFINITY; num_keys];

    if policy == CachePolicy::FrequencySeeded {
        let prefix = accesses.len().div_ceil(4);
        let mut counts = vec![0u64; num_keys];
        for a in &accesses[..prefix] {
            for &k in a {
                counts[k as usize] += 1;
            }
        }
        let mut by_freq: Vec<u32> = (0..num_keys as u32).filter(|&k| counts[k as usize] > 0).collect();
        by_freq.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        let n_pinned = capacity / 2;
        for (i, &k) in by_freq.iter().take(capacity).enumerate() {
            if i < n_pinned {
                pinned[k as usize] = true;
                score_of[k as usize] = Some(u64::MAX);
            } else {
                // Initially resident, LRU-managed, oldest first.
                let s = i as u64;
                score_of[k as usize] = Some(s);
                order.insert((s, k), ());
            }
            free_slots -= 1;
        }
    }

    let base_clock = num_keys as u64 + 1;
    for (t, keys) in accesses.iter().enumerate() {
        for (j, &k) in keys.iter().enumerate() {
            let ku = k as usize;
            r.lookups += 1;
            let resident = score_of[ku].is_some();
            if resident {
                r.hits += 1;
            }
            if pinned[ku] {
                continue;
            }
            let new_score = match policy {
                CachePolicy::Lru | CachePolicy::FrequencySeeded => base_clock + (t * 64 + j.min(63)) as u64,
                CachePolicy::LfuAging { half_life } => {
                    // count(t) = count(last)·2^(−Δ/hl) + 1; in log2 referred to time 0:
                    // L = log2(2^L_old + 2^(t/hl)).
                    let now = t as f64 / half_life.max(1e-9);
                    let old = lfu_log[ku];
                    let l = if old == f64::NEG_INFINITY {
                        now
                    } else {
                        let m = old.max(now);
                        m + ((old - m).exp2() + (now - m).exp2()).log2()
                    };
                    lfu_log[ku] = l;
                    // Non-negative, so the bit pattern orders like the value.
                    l.max(0.0).to_bits()
                }
            };
            if let Some(old) = score_of[ku] {
                order.remove(&(old, k));
            } else if free_slots > 0 {
                free_slots -= 1;
            } else if let Some((&(_, victim), _)) = order.iter().next() {
                order.remove(&(score_of[victim as usize].unwrap(), victim));
                score_of[victim as usize] = None;
            } else {
                // Every slot is pinned: the expert is used and dropped.
                continue;
            }
            score_of[ku] = Some(new_score);
            order.insert((new_score, k), ());
        }
    }
    r
}
