//! Routing statistics and RAM-cache policy simulation over routing traces
//! ([`flashmoe::routing`]).
//!
//! [`stats`] computes per layer: the gini coefficient of the expert activation counts, the top-20%
//! coverage (share of activations that go to the most used 20% of experts), the consecutive-token
//! overlap (mean |S_t ∩ S_{t−1}| / K) and LRU hit-rate curves, comparable with the real profiles
//! read by [`load_profile`]. [`simulate_cache`] replays a trace through a RAM expert cache policy.
//! [`tier_report`] replays it through two-tier (GPU + RAM) expert caches ([`replay_tiers`]) next to
//! the offline optimum for the same sizes ([`belady_hits`]).

use flashmoe::error::{Error, Result};
use flashmoe::routing::Trace;
use serde::Serialize;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;

// The statistics a saved routing profile carries too: one definition, in the engine.
pub use flashmoe::experts::profile::{gini, top_coverage};

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

// ---------------------------------------------------------------------------------------------
// Two-tier (GPU + RAM) replay

/// Where the experts of one (token, layer) step are looked up, in trace order: `keys[step_at[s]..
/// step_at[s + 1]]` are the keys (`layer · num_experts + expert`, one global key space as the
/// engine's caches use) of step `s = token · num_layers + layer`, without repeats.
#[derive(Clone, Debug)]
pub struct TierAccesses {
    pub num_layers: usize,
    pub num_keys: usize,
    pub tokens: usize,
    pub keys: Vec<u32>,
    pub step_at: Vec<usize>,
}

impl TierAccesses {
    /// Checks every token against the header: a clear error for a wrong layer count or an expert
    /// id out of range (traces built in memory skip [`flashmoe::routing::read_trace`]'s checks).
    pub fn new(trace: &Trace) -> Result<Self> {
        let h = &trace.header;
        let num_keys = h.num_layers.checked_mul(h.num_experts).filter(|&n| n < u32::MAX as usize).ok_or_else(|| {
            Error::input(format!("routing trace: {} layers × {} experts is too many keys", h.num_layers, h.num_experts))
        })?;
        let mut keys = Vec::with_capacity(trace.tokens.len() * h.num_layers * h.top_k.max(1));
        let mut step_at = Vec::with_capacity(trace.tokens.len() * h.num_layers + 1);
        step_at.push(0);
        for (t, tok) in trace.tokens.iter().enumerate() {
            if tok.experts.len() != h.num_layers {
                return Err(Error::input(format!(
                    "routing trace: token {t} (pos {}) has {} layers, the header says {}",
                    tok.pos,
                    tok.experts.len(),
                    h.num_layers
                )));
            }
            for (l, sel) in tok.experts.iter().enumerate() {
                let start = keys.len();
                for &e in sel {
                    if e as usize >= h.num_experts {
                        return Err(Error::input(format!(
                            "routing trace: token {t} (pos {}) layer {l}: expert {e} out of range (num_experts {})",
                            tok.pos, h.num_experts
                        )));
                    }
                    let k = (l * h.num_experts) as u32 + e;
                    if !keys[start..].contains(&k) {
                        keys.push(k);
                    }
                }
                step_at.push(keys.len());
            }
        }
        Ok(TierAccesses { num_layers: h.num_layers, num_keys, tokens: trace.tokens.len(), keys, step_at })
    }

    /// The keys of step `s`.
    pub fn step(&self, s: usize) -> &[u32] {
        &self.keys[self.step_at[s]..self.step_at[s + 1]]
    }

    /// The accesses of tokens `from..to`, flat.
    pub fn token_keys(&self, from: usize, to: usize) -> &[u32] {
        &self.keys[self.step_at[from * self.num_layers]..self.step_at[to * self.num_layers]]
    }

    /// Selection counts per key over tokens `from..to`.
    pub fn counts(&self, from: usize, to: usize) -> Vec<u64> {
        let mut c = vec![0u64; self.num_keys];
        for &k in self.token_keys(from, to) {
            c[k as usize] += 1;
        }
        c
    }
}

/// Tokens of the profile of the `first 25%` pre-warm (the rest is replayed).
pub fn profile_prefix(tokens: usize) -> usize {
    tokens.div_ceil(4)
}

/// How an expert cache hierarchy treats the two tiers; see [`replay_tiers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierPolicy {
    /// Two independent LFU-with-aging caches (the engine before exclusive tiers): a GPU miss
    /// reads RAM or disk, a disk read is inserted in RAM, every GPU miss is inserted in the GPU.
    Inclusive,
    /// An expert lives in one tier: RAM hits move to the GPU, the GPU's victim is demoted to RAM.
    Exclusive,
    /// As `Exclusive`, but a RAM hit stays in RAM and is computed by the CPU (hybrid auto).
    ExclusiveCpu,
}

impl TierPolicy {
    pub fn name(&self) -> &'static str {
        match self {
            TierPolicy::Inclusive => "inclusive",
            TierPolicy::Exclusive => "exclusive",
            TierPolicy::ExclusiveCpu => "exclusive+cpu",
        }
    }
}

/// Initial contents of the tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prewarm {
    /// Empty tiers, the whole trace replayed.
    Cold,
    /// Filled from the activation counts of the whole trace (an oracle-ish profile), the whole
    /// trace replayed.
    WholeTrace,
    /// Filled from the counts of the first 25% of the tokens ([`profile_prefix`]); only the
    /// remaining tokens are replayed.
    FirstQuarter,
}

impl Prewarm {
    pub fn suffix(&self) -> &'static str {
        match self {
            Prewarm::Cold => "",
            Prewarm::WholeTrace => ", pre-warmed (profile = this trace)",
            Prewarm::FirstQuarter => ", pre-warmed (profile = first 25%)",
        }
    }

    /// The tokens replayed, `from..tokens`.
    pub fn replay_from(&self, tokens: usize) -> usize {
        if *self == Prewarm::FirstQuarter { profile_prefix(tokens) } else { 0 }
    }
}

/// What a two-tier replay did, counted in experts (multiply by the expert size for bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TierCounts {
    /// Tokens replayed.
    pub tokens: usize,
    pub lookups: u64,
    pub gpu_hits: u64,
    pub ram_hits: u64,
    /// Lookups found in neither tier: read from disk.
    pub disk_reads: u64,
    /// RAM hits computed by the CPU (`exclusive+cpu`).
    pub cpu_experts: u64,
    /// Host-to-device expert copies (every expert placed on the GPU).
    pub h2d: u64,
    /// Device-to-host expert copies (GPU victims demoted to RAM).
    pub d2h: u64,
}

/// Decayed use counts (LFU with aging) exactly as the engine's `ExpertCache` keeps them: log2 of
/// the count referred to token 0, so ordering never changes between uses; history is kept after
/// eviction.
struct UseHistory {
    log: Vec<f64>,
    half_life: f64,
}

impl UseHistory {
    fn new(num_keys: usize, half_life: f64) -> Self {
        UseHistory { log: vec![f64::NEG_INFINITY; num_keys], half_life: half_life.max(1e-9) }
    }

    fn now(&self, t: usize) -> f64 {
        t as f64 / self.half_life
    }

    /// Records a use at token `t` and returns the key's new eviction score.
    fn touch(&mut self, k: u32, t: usize) -> u64 {
        let now = self.now(t);
        let old = self.log[k as usize];
        self.log[k as usize] = if old == f64::NEG_INFINITY {
            now
        } else {
            let m = old.max(now);
            m + ((old - m).exp2() + (now - m).exp2()).log2()
        };
        self.score(k)
    }

    /// The eviction score (lowest evicted first): non-negative, so the bit pattern orders like
    /// the value.
    fn score(&self, k: u32) -> u64 {
        self.log[k as usize].max(0.0).to_bits()
    }
}

/// One tier: its residents in a binary min-heap by (eviction score, key), indexed by key so that
/// a rescored or removed resident is fixed in place.
struct Tier {
    cap: usize,
    heap: Vec<(u64, u32)>,
    /// Index in `heap` of each key, `NOWHERE` when not resident.
    pos: Vec<u32>,
}

const NOWHERE: u32 = u32::MAX;

impl Tier {
    fn new(cap: usize, num_keys: usize) -> Self {
        Tier { cap, heap: Vec::with_capacity(cap.min(num_keys)), pos: vec![NOWHERE; num_keys] }
    }

    fn contains(&self, k: u32) -> bool {
        self.pos[k as usize] != NOWHERE
    }

    fn len(&self) -> usize {
        self.heap.len()
    }

    fn place(&mut self, i: usize, e: (u64, u32)) {
        self.heap[i] = e;
        self.pos[e.1 as usize] = i as u32;
    }

    fn sift_up(&mut self, mut i: usize) {
        let e = self.heap[i];
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[parent] <= e {
                break;
            }
            self.place(i, self.heap[parent]);
            i = parent;
        }
        self.place(i, e);
    }

    fn sift_down(&mut self, mut i: usize) {
        let e = self.heap[i];
        let n = self.heap.len();
        loop {
            let l = 2 * i + 1;
            if l >= n {
                break;
            }
            let c = if l + 1 < n && self.heap[l + 1] < self.heap[l] { l + 1 } else { l };
            if e <= self.heap[c] {
                break;
            }
            self.place(i, self.heap[c]);
            i = c;
        }
        self.place(i, e);
    }

    /// Inserts `k` or changes its score (room must have been made for an insert).
    fn set(&mut self, k: u32, s: u64) {
        match self.pos[k as usize] {
            NOWHERE => {
                debug_assert!(self.len() < self.cap);
                self.heap.push((s, k));
                self.sift_up(self.heap.len() - 1);
            }
            i => {
                let i = i as usize;
                let old = std::mem::replace(&mut self.heap[i].0, s);
                if s < old { self.sift_up(i) } else { self.sift_down(i) }
            }
        }
    }

    fn remove(&mut self, k: u32) {
        let i = std::mem::replace(&mut self.pos[k as usize], NOWHERE);
        if i == NOWHERE {
            return;
        }
        let last = self.heap.pop().expect("resident");
        let i = i as usize;
        if i < self.heap.len() {
            self.place(i, last);
            self.sift_up(i);
            let i = self.pos[last.1 as usize] as usize;
            self.sift_down(i);
        }
    }

    /// The lowest (score, key) whose key `protected` does not name: a best-first walk from the
    /// root that opens at most one node per protected key.
    fn lowest_except(&self, protected: &[u32]) -> Option<u32> {
        let root = *self.heap.first()?;
        if !protected.contains(&root.1) {
            return Some(root.1);
        }
        let mut open: Vec<usize> = vec![0];
        while !open.is_empty() {
            let j = (0..open.len()).min_by_key(|&j| self.heap[open[j]]).expect("non-empty");
            let i = open.swap_remove(j);
            let k = self.heap[i].1;
            if !protected.contains(&k) {
                return Some(k);
            }
            open.extend([2 * i + 1, 2 * i + 2].into_iter().filter(|&c| c < self.heap.len()));
        }
        None
    }

    /// Makes room for one more entry: `Some(None)` when a slot is free, `Some(Some(victim))`
    /// after evicting the lowest-scored entry `protected` does not name, `None` when nothing can
    /// go (no capacity, or every resident is protected).
    fn make_room(&mut self, protected: &[u32]) -> Option<Option<u32>> {
        if self.len() < self.cap {
            return Some(None);
        }
        let v = self.lowest_except(protected)?;
        self.remove(v);
        Some(Some(v))
    }
}

/// The state of a two-tier replay; [`replay_tiers`] drives it one (token, layer) step at a time.
struct TierSim {
    policy: TierPolicy,
    gpu: Tier,
    ram: Tier,
    /// Exclusive: the one use history of each expert (both tiers order by it; a demotion is not a
    /// use). Inclusive: the GPU cache's own history.
    uses: UseHistory,
    /// Inclusive: the RAM cache's own history.
    ram_uses: UseHistory,
    c: TierCounts,
}

impl TierSim {
    fn new(policy: TierPolicy, gpu_experts: usize, ram_experts: usize, num_keys: usize, half_life: f64) -> Self {
        TierSim {
            policy,
            gpu: Tier::new(gpu_experts, num_keys),
            ram: Tier::new(ram_experts, num_keys),
            uses: UseHistory::new(num_keys, half_life),
            ram_uses: UseHistory::new(num_keys, half_life),
            c: TierCounts::default(),
        }
    }

    /// Pre-warm: `hot` is the profile's keys, hottest first. Exclusive: the GPU takes the first
    /// ones, RAM the next. Inclusive: the GPU takes the first ones, RAM the first ones too.
    /// Each counts as used once at token `t0` (the replay's first token): the profile picks the
    /// contents, the live counts decide from then on. (Seeding with the profile counts would pin
    /// the profile's hot set for log2(count) half-lives, i.e. hundreds of tokens, which is the
    /// frequency-seeded pinning, not a warm start.) Ties among seeds are broken by hotness: the
    /// coldest unused seed is evicted first.
    fn prewarm(&mut self, hot: &[u32], t0: usize) {
        let g = self.gpu.cap.min(hot.len());
        let (gpu_keys, ram_keys) = match self.policy {
            TierPolicy::Inclusive => (&hot[..g], &hot[..self.ram.cap.min(hot.len())]),
            _ => (&hot[..g], &hot[g..(g + self.ram.cap).min(hot.len())]),
        };
        let now = self.uses.now(t0);
        // A count of 1 plus at most ~1e-3: orders the seeds without changing their weight.
        let seed = |rank: usize, n: usize| now + (n - rank) as f64 * 1e-9;
        for (i, &k) in gpu_keys.iter().enumerate() {
            self.uses.log[k as usize] = seed(i, gpu_keys.len());
            self.gpu.set(k, self.uses.score(k));
        }
        for (i, &k) in ram_keys.iter().enumerate() {
            let h = if self.policy == TierPolicy::Inclusive { &mut self.ram_uses } else { &mut self.uses };
            h.log[k as usize] = seed(i, ram_keys.len());
            let s = h.score(k);
            self.ram.set(k, s);
        }
    }

    /// Puts `k` in RAM (evicting RAM's lowest that `protected` does not name, which is dropped);
    /// false when RAM cannot take it.
    fn ram_admit(&mut self, k: u32, s: u64, protected: &[u32]) -> bool {
        if self.ram.make_room(protected).is_some() {
            self.ram.set(k, s);
            true
        } else {
            false
        }
    }

    /// Exclusive: `k` goes to the GPU; its victim is demoted to RAM (a device-to-host copy).
    /// False when the GPU cannot take it.
    fn gpu_admit_exclusive(&mut self, k: u32, s: u64, step: &[u32]) -> bool {
        match self.gpu.make_room(step) {
            None => false,
            Some(victim) => {
                self.ram.remove(k);
                self.gpu.set(k, s);
                if let Some(v) = victim
                    && self.ram_admit(v, self.uses.score(v), step)
                {
                    self.c.d2h += 1;
                }
                true
            }
        }
    }

    /// One (token, layer) step at token `t`: the experts in `step` protect each other from
    /// eviction.
    fn step(&mut self, t: usize, step: &[u32]) {
        for &k in step {
            self.c.lookups += 1;
            match self.policy {
                TierPolicy::Inclusive => {
                    if self.gpu.contains(k) {
                        self.c.gpu_hits += 1;
                        let s = self.uses.touch(k, t);
                        self.gpu.set(k, s);
                        continue;
                    }
                    if self.ram.contains(k) {
                        self.c.ram_hits += 1;
                        let s = self.ram_uses.touch(k, t);
                        self.ram.set(k, s);
                    } else {
                        self.c.disk_reads += 1;
                        // The engine's RAM insert protects nothing (and records the use only
                        // when the expert fits).
                        if self.ram.make_room(&[]).is_some() {
                            let s = self.ram_uses.touch(k, t);
                            self.ram.set(k, s);
                        }
                    }
                    self.c.h2d += 1;
                    if self.gpu.make_room(step).is_some() {
                        let s = self.uses.touch(k, t);
                        self.gpu.set(k, s);
                    }
                }
                TierPolicy::Exclusive | TierPolicy::ExclusiveCpu => {
                    let s = self.uses.touch(k, t);
                    if self.gpu.contains(k) {
                        self.c.gpu_hits += 1;
                        self.gpu.set(k, s);
                    } else if self.ram.contains(k) {
                        self.c.ram_hits += 1;
                        if self.policy == TierPolicy::ExclusiveCpu {
                            self.c.cpu_experts += 1;
                            self.ram.set(k, s);
                        } else {
                            // Copied to the GPU for compute, and moved there when it has room
                            // (a zero-size GPU streams it and leaves it in RAM).
                            self.c.h2d += 1;
                            if !self.gpu_admit_exclusive(k, s, step) {
                                self.ram.set(k, s);
                            }
                        }
                    } else {
                        self.c.disk_reads += 1;
                        // Hybrid (as the engine): a disk read takes a free GPU slot, never
                        // evicts a GPU expert; with the GPU full it goes to RAM and the CPU.
                        let gpu_takes = self.policy == TierPolicy::Exclusive || self.gpu.len() < self.gpu.cap;
                        if gpu_takes && self.gpu_admit_exclusive(k, s, step) {
                            self.c.h2d += 1;
                        } else {
                            // No room on the GPU (no GPU tier, or every slot used by this step):
                            // the expert's home is RAM; hybrid computes it there, else it is
                            // copied to the GPU for this use only.
                            if self.policy == TierPolicy::ExclusiveCpu {
                                self.c.cpu_experts += 1;
                            } else {
                                self.c.h2d += 1;
                            }
                            self.ram_admit(k, s, step);
                        }
                    }
                }
            }
        }
    }
}

/// Keys used in tokens `from..to`, hottest first (ties by key).
fn hot_keys(acc: &TierAccesses, from: usize, to: usize) -> Vec<u32> {
    let counts = acc.counts(from, to);
    let mut hot: Vec<u32> = (0..acc.num_keys as u32).filter(|&k| counts[k as usize] > 0).collect();
    hot.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    hot
}

/// Replays the trace through a GPU tier of `gpu_experts` and a RAM tier of `ram_experts` (one
/// global cache each over all (layer, expert) keys). Each token's layers are successive steps;
/// the experts of one step protect each other from eviction; the token clock of the LFU aging is
/// the token index. Every expert placed on the GPU is one host-to-device copy (also disk reads:
/// they pass through host memory).
///
/// - `Inclusive`: GPU hit → nothing moves. GPU miss: RAM hit, or a disk read inserted in RAM (RAM
///   evicts its lowest); either way a copy to the GPU, inserted there (the GPU evicts its lowest
///   not in the step). Each cache scores only the uses it sees (its own LFU history).
/// - `Exclusive`: RAM hit → moved to the GPU; disk read → to the GPU; the GPU's victim (lowest
///   not in the step) is demoted to RAM (a device-to-host copy; RAM drops its lowest to make
///   room). One LFU history per expert orders both tiers; a demotion is not a use. A zero-size
///   GPU leaves everything in RAM and copies every use to the GPU.
/// - `ExclusiveCpu` (the engine's `--hybrid auto`): as `Exclusive` but a RAM hit stays in RAM
///   and is computed by the CPU, and a disk read takes a GPU slot only while one is free: once
///   the GPU is full, disk reads go to the RAM tier (which evicts its lowest) and the CPU, so
///   the GPU keeps what it holds and nothing is copied back.
pub fn replay_tiers(
    acc: &TierAccesses,
    policy: TierPolicy,
    prewarm: Prewarm,
    gpu_experts: usize,
    ram_experts: usize,
    half_life: f64,
) -> TierCounts {
    let mut sim = TierSim::new(policy, gpu_experts, ram_experts, acc.num_keys, half_life);
    let from = prewarm.replay_from(acc.tokens);
    match prewarm {
        Prewarm::Cold => {}
        Prewarm::WholeTrace => sim.prewarm(&hot_keys(acc, 0, acc.tokens), 0),
        Prewarm::FirstQuarter => sim.prewarm(&hot_keys(acc, 0, from), from),
    }
    for t in from..acc.tokens {
        for l in 0..acc.num_layers {
            sim.step(t, acc.step(t * acc.num_layers + l));
        }
    }
    sim.c.tokens = acc.tokens - from;
    sim.c
}

/// Hits of Belady's MIN with bypass over a cache of `capacity` keys on the access sequence
/// `keys`: a miss is admitted only when its next use comes sooner than that of some resident,
/// which it then evicts (the resident used farthest in the future). This is the most hits any
/// cache of that size can get. `warm`: the cache starts holding the `capacity` keys used first
/// (the best possible initial contents), else empty. O(n log capacity).
pub fn belady_hits(keys: &[u32], num_keys: usize, capacity: usize, warm: bool) -> u64 {
    const NEVER: u32 = u32::MAX;
    assert!(keys.len() < NEVER as usize, "trace too long for u32 indices");
    let mut next = vec![NEVER; keys.len()];
    let mut upcoming = vec![NEVER; num_keys];
    for i in (0..keys.len()).rev() {
        let k = keys[i] as usize;
        next[i] = upcoming[k];
        upcoming[k] = i as u32;
    }
    if capacity == 0 {
        return 0;
    }
    // Residents by next use in a max-heap with lazy deletion: an entry (next, key) is current
    // while the key is resident and `due[key] == next`. A resident whose next use is NEVER is
    // dropped at once.
    let mut due = vec![NEVER; num_keys];
    let mut len = 0usize;
    let mut heap: BinaryHeap<(u32, u32)> = BinaryHeap::new();
    if warm {
        let mut first: Vec<(u32, u32)> = (0..num_keys as u32)
            .filter(|&k| upcoming[k as usize] != NEVER)
            .map(|k| (upcoming[k as usize], k))
            .collect();
        first.sort_unstable();
        for &(i, k) in first.iter().take(capacity) {
            heap.push((i, k));
            due[k as usize] = i;
            len += 1;
        }
    }
    let mut hits = 0;
    for (i, &k) in keys.iter().enumerate() {
        let ku = k as usize;
        if due[ku] != NEVER {
            // Resident (its due use is this one).
            hits += 1;
            due[ku] = next[i];
            if next[i] == NEVER {
                len -= 1;
            } else {
                heap.push((next[i], k));
            }
        } else if next[i] != NEVER {
            if len >= capacity {
                // The resident used farthest in the future, or bypass when that is this one.
                while let Some(&(n, v)) = heap.peek() {
                    if due[v as usize] == n {
                        break;
                    }
                    heap.pop();
                }
                let &(far, victim) = heap.peek().expect("capacity > 0 residents");
                if far <= next[i] {
                    continue;
                }
                heap.pop();
                due[victim as usize] = NEVER;
                len -= 1;
            }
            heap.push((next[i], k));
            due[ku] = next[i];
            len += 1;
        }
        if heap.len() > 2 * len + 64 {
            heap.retain(|&(n, v)| due[v as usize] == n);
        }
    }
    hits
}

/// Cache sizes of a two-tier replay, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TierSizes {
    pub gpu_bytes: u64,
    pub ram_bytes: u64,
    /// Bytes of one expert (> 0).
    pub expert_bytes: u64,
}

impl TierSizes {
    pub fn gpu_experts(&self) -> usize {
        (self.gpu_bytes / self.expert_bytes.max(1)) as usize
    }
    pub fn ram_experts(&self) -> usize {
        (self.ram_bytes / self.expert_bytes.max(1)) as usize
    }
}

/// One row of a [`TierReport`]: a policy, or an optimum (then the PCIe, RAM and CPU figures are
/// `None` and `gpu_hits` is Belady's over the GPU capacity alone, an upper bound).
#[derive(Clone, Debug, Serialize)]
pub struct TierRow {
    pub policy: String,
    /// Tokens replayed (the last 75% for the first-25% rows).
    pub tokens: usize,
    pub lookups: u64,
    pub disk_reads: u64,
    pub gpu_hits: u64,
    pub ram_hits: Option<u64>,
    pub cpu_experts: Option<u64>,
    pub h2d: Option<u64>,
    pub d2h: Option<u64>,
    pub disk_bytes: u64,
    /// Host-to-device plus device-to-host.
    pub pcie_bytes: Option<u64>,
    pub disk_mib_per_token: f64,
    pub pcie_mib_per_token: Option<f64>,
    /// Share of lookups.
    pub gpu_hit_rate: f64,
    pub ram_hit_rate: Option<f64>,
    pub cpu_experts_per_token: Option<f64>,
    /// The optimum this row is compared with (same tokens, same start: cold or best contents).
    pub optimum: String,
    /// disk bytes ÷ the optimum's (`None` when the optimum reads nothing and this row does).
    pub disk_vs_optimum: Option<f64>,
}

/// Every policy of [`replay_tiers`] and the optima for one pair of sizes.
#[derive(Clone, Debug, Serialize)]
pub struct TierReport {
    pub gpu_bytes: u64,
    pub ram_bytes: u64,
    pub expert_bytes: u64,
    pub gpu_experts: usize,
    pub ram_experts: usize,
    pub half_life: f64,
    pub tokens: usize,
    /// Tokens in the profile of the first-25% rows (they replay the rest).
    pub profile_tokens: usize,
    pub rows: Vec<TierRow>,
}

pub const OPT_COLD: &str = "optimum (Belady)";
pub const OPT_WARM: &str = "optimum (Belady), pre-warmed";
pub const OPT_COLD_TAIL: &str = "optimum (Belady), last 75%";
pub const OPT_WARM_TAIL: &str = "optimum (Belady), pre-warmed, last 75%";

/// The policies of a [`TierReport`], in order.
pub const TIER_POLICIES: [(TierPolicy, Prewarm); 7] = [
    (TierPolicy::Inclusive, Prewarm::Cold),
    (TierPolicy::Exclusive, Prewarm::Cold),
    (TierPolicy::ExclusiveCpu, Prewarm::Cold),
    (TierPolicy::Exclusive, Prewarm::WholeTrace),
    (TierPolicy::ExclusiveCpu, Prewarm::WholeTrace),
    (TierPolicy::Exclusive, Prewarm::FirstQuarter),
    (TierPolicy::ExclusiveCpu, Prewarm::FirstQuarter),
];

fn mib_per_token(bytes: u64, tokens: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / tokens.max(1) as f64
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    match (a, b) {
        (0, 0) => Some(1.0),
        (_, 0) => None,
        _ => Some(a as f64 / b as f64),
    }
}

/// Replays every policy of [`TIER_POLICIES`] and computes the optima: Belady over one cache of
/// GPU + RAM experts (an exclusive hierarchy's union is one cache of that size, and no policy's
/// union holds more) for the disk reads, Belady over the GPU alone for the GPU hit bound; each
/// cold and with the best initial contents (the floor of any pre-warm), over the whole trace
/// and over the tokens after the first-25% profile. A pre-warmed row is compared with the
/// pre-warmed optimum, a cold one with the cold optimum, over the same tokens.
pub fn tier_report(acc: &TierAccesses, sizes: TierSizes, half_life: f64) -> TierReport {
    use rayon::prelude::*;
    let (g, r, eb) = (sizes.gpu_experts(), sizes.ram_experts(), sizes.expert_bytes);
    let prefix = profile_prefix(acc.tokens);
    let opts: [(&str, usize, bool); 4] =
        [(OPT_COLD, 0, false), (OPT_WARM, 0, true), (OPT_COLD_TAIL, prefix, false), (OPT_WARM_TAIL, prefix, true)];
    let opt_rows: Vec<TierRow> = opts
        .par_iter()
        .map(|&(name, from, warm)| {
            let keys = acc.token_keys(from, acc.tokens);
            let tokens = acc.tokens - from;
            let lookups = keys.len() as u64;
            let disk_reads = lookups - belady_hits(keys, acc.num_keys, g + r, warm);
            let gpu_hits = belady_hits(keys, acc.num_keys, g, warm);
            TierRow {
                policy: name.into(),
                tokens,
                lookups,
                disk_reads,
                gpu_hits,
                ram_hits: None,
                cpu_experts: None,
                h2d: None,
                d2h: None,
                disk_bytes: disk_reads * eb,
                pcie_bytes: None,
                disk_mib_per_token: mib_per_token(disk_reads * eb, tokens),
                pcie_mib_per_token: None,
                gpu_hit_rate: if lookups == 0 { 0.0 } else { gpu_hits as f64 / lookups as f64 },
                ram_hit_rate: None,
                cpu_experts_per_token: None,
                optimum: name.into(),
                disk_vs_optimum: Some(1.0),
            }
        })
        .collect();
    let mut rows: Vec<TierRow> = TIER_POLICIES
        .par_iter()
        .map(|&(policy, prewarm)| {
            let c = replay_tiers(acc, policy, prewarm, g, r, half_life);
            let optimum = match prewarm {
                Prewarm::Cold => &opt_rows[0],
                Prewarm::WholeTrace => &opt_rows[1],
                Prewarm::FirstQuarter => &opt_rows[3],
            };
            let (disk, pcie) = (c.disk_reads * eb, (c.h2d + c.d2h) * eb);
            let rate = |x: u64| if c.lookups == 0 { 0.0 } else { x as f64 / c.lookups as f64 };
            TierRow {
                policy: format!("{}{}", policy.name(), prewarm.suffix()),
                tokens: c.tokens,
                lookups: c.lookups,
                disk_reads: c.disk_reads,
                gpu_hits: c.gpu_hits,
                ram_hits: Some(c.ram_hits),
                cpu_experts: Some(c.cpu_experts),
                h2d: Some(c.h2d),
                d2h: Some(c.d2h),
                disk_bytes: disk,
                pcie_bytes: Some(pcie),
                disk_mib_per_token: mib_per_token(disk, c.tokens),
                pcie_mib_per_token: Some(mib_per_token(pcie, c.tokens)),
                gpu_hit_rate: rate(c.gpu_hits),
                ram_hit_rate: Some(rate(c.ram_hits)),
                cpu_experts_per_token: Some(c.cpu_experts as f64 / c.tokens.max(1) as f64),
                optimum: optimum.policy.clone(),
                disk_vs_optimum: ratio(disk, optimum.disk_bytes),
            }
        })
        .collect();
    rows.extend(opt_rows);
    TierReport {
        gpu_bytes: sizes.gpu_bytes,
        ram_bytes: sizes.ram_bytes,
        expert_bytes: eb,
        gpu_experts: g,
        ram_experts: r,
        half_life,
        tokens: acc.tokens,
        profile_tokens: prefix,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashmoe::routing::{TraceHeader, TraceToken};

    /// splitmix64: a seeded source of uniforms for test traces.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed)
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn random_trace(tokens: usize, layers: usize, experts: usize, k: usize, seed: u64) -> Trace {
        let mut rng = Rng::new(seed);
        let tokens = (0..tokens)
            .map(|p| TraceToken {
                pos: p,
                experts: (0..layers)
                    .map(|_| {
                        let mut s: Vec<u32> = Vec::new();
                        while s.len() < k {
                            // Skewed: squaring a uniform favours low ids.
                            let x = (rng.uniform().powi(2) * experts as f64) as u32;
                            if !s.contains(&x) {
                                s.push(x);
                            }
                        }
                        s
                    })
                    .collect(),
            })
            .collect();
        Trace { header: TraceHeader::new(layers, experts, k), tokens }
    }

    /// After every step: no expert in both tiers, tiers within capacity and consistent, the
    /// step's experts resident (on the GPU for `exclusive` when it has room for a step).
    #[test]
    fn exclusive_tiers_never_hold_an_expert_twice() {
        let trace = random_trace(300, 3, 8, 3, 7);
        let acc = TierAccesses::new(&trace).unwrap();
        for policy in [TierPolicy::Exclusive, TierPolicy::ExclusiveCpu] {
            for (g, r) in [(5, 7), (3, 4), (0, 6), (6, 0), (24, 0), (4, 30)] {
                for prewarm in [Prewarm::Cold, Prewarm::WholeTrace] {
                    let mut sim = TierSim::new(policy, g, r, acc.num_keys, 32.0);
                    if prewarm == Prewarm::WholeTrace {
                        sim.prewarm(&hot_keys(&acc, 0, acc.tokens), 0);
                    }
                    let mut moves = 0;
                    for s in 0..acc.tokens * acc.num_layers {
                        let before = sim.c;
                        let step = acc.step(s);
                        sim.step(s / acc.num_layers, step);
                        let what = format!("{policy:?} g={g} r={r} {prewarm:?} step {s}");
                        for k in 0..acc.num_keys as u32 {
                            assert!(!(sim.gpu.contains(k) && sim.ram.contains(k)), "{what}: key {k} in both tiers");
                        }
                        for (tier, cap) in [(&sim.gpu, g), (&sim.ram, r)] {
                            assert!(tier.len() <= cap, "{what}");
                            assert_eq!(tier.len(), tier.pos.iter().filter(|&&x| x != NOWHERE).count(), "{what}");
                            for (i, &(_, k)) in tier.heap.iter().enumerate() {
                                assert_eq!(tier.pos[k as usize], i as u32, "{what}");
                                assert!(i == 0 || tier.heap[(i - 1) / 2] < tier.heap[i], "{what}: heap order");
                            }
                        }
                        for &k in step {
                            if g >= step.len() && policy == TierPolicy::Exclusive {
                                assert!(sim.gpu.contains(k), "{what}: {k} not moved to the GPU");
                            }
                            if g >= step.len() && r >= step.len() {
                                assert!(sim.gpu.contains(k) || sim.ram.contains(k), "{what}: {k} dropped");
                            }
                        }
                        let c = sim.c;
                        assert_eq!(c.lookups, c.gpu_hits + c.ram_hits + c.disk_reads, "{what}");
                        moves += c.ram_hits - before.ram_hits;
                    }
                    if r > 0 && g > 0 {
                        assert!(moves > 0, "{policy:?} g={g} r={r}: the RAM tier was never hit");
                    }
                }
            }
        }
    }

    /// The indexed heap against a sorted set: the same victims under random inserts, rescores,
    /// removals and protected sets.
    #[test]
    fn tier_heap_evicts_like_a_sorted_set() {
        let mut rng = Rng::new(3);
        let (n, cap) = (40u32, 12usize);
        let mut tier = Tier::new(cap, n as usize);
        let mut set: std::collections::BTreeSet<(u64, u32)> = Default::default();
        let mut score = vec![None; n as usize];
        for _ in 0..20_000 {
            let k = (rng.next_u64() % n as u64) as u32;
            let s = rng.next_u64() % 50;
            match rng.next_u64() % 4 {
                0 => {
                    if let Some(old) = score[k as usize].take() {
                        set.remove(&(old, k));
                    }
                    tier.remove(k);
                }
                _ => {
                    let protected: Vec<u32> =
                        (0..rng.next_u64() % 4).map(|_| (rng.next_u64() % n as u64) as u32).collect();
                    if score[k as usize].is_none() && set.len() >= cap {
                        let want = set.iter().find(|(_, v)| !protected.contains(v)).map(|&(_, v)| v);
                        let got = tier.make_room(&protected);
                        assert_eq!(got, want.map(Some));
                        let Some(v) = want else { continue };
                        set.remove(&(score[v as usize].take().unwrap(), v));
                    }
                    if let Some(old) = score[k as usize].replace(s) {
                        set.remove(&(old, k));
                    }
                    set.insert((s, k));
                    tier.set(k, s);
                }
            }
            assert_eq!(tier.len(), set.len());
            assert!((0..n).all(|k| tier.contains(k) == score[k as usize].is_some()));
        }
    }

    #[test]
    fn out_of_range_experts_and_wrong_layer_counts_are_errors() {
        let mut t = random_trace(3, 2, 8, 2, 1);
        t.tokens[1].experts[1][0] = 8;
        let e = TierAccesses::new(&t).unwrap_err().to_string();
        assert!(e.contains("token 1") && e.contains("layer 1") && e.contains("expert 8 out of range"), "{e}");
        let mut t = random_trace(3, 2, 8, 2, 1);
        t.tokens[2].experts.pop();
        let e = TierAccesses::new(&t).unwrap_err().to_string();
        assert!(e.contains("token 2") && e.contains("1 layers, the header says 2"), "{e}");
        // Repeats within one step are one lookup.
        let mut t = random_trace(1, 1, 8, 2, 1);
        t.tokens[0].experts[0] = vec![3, 3, 5];
        assert_eq!(TierAccesses::new(&t).unwrap().keys, vec![3, 5]);
    }
}
