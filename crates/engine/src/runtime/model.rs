//! `Model`: a model family placed on a backend, with the options fixed at load (experts per
//! token, context length, fetch size, prefetch, timing, routing trace) and the hooks that collect
//! what every backend reports. Read-only while it runs: a sequence's caches live in a
//! [`SequenceState`] the caller owns.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaBackend};
use crate::backend::{AnyState, Backend, Bandwidths, DeviceChoice, DeviceOptions, TierInfo};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::experts::{ExpertStore, IoChoice, RoutingProfile, StoreOptions};
use crate::layers::{Hooks, LayerTimes, LogitsFor, PassInput, PassOutput, PassSpec, RoutingRecord};
use crate::models::{self, HostModel, PlacedModel, SourceOptions};
use crate::weights::Linear;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How to open a model. Everything that changes how the model runs is set here, before load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Fetch routed experts through the expert store (positioned reads + RAM cache + I/O
    /// accounting) rather than through the file mappings. For HF/MLX folders the reads are the
    /// experts' byte ranges in the safetensors files; for packed models, one blob each.
    pub stream_experts: bool,
    pub store: StoreOptions,
    /// Where the forward pass runs (default: the CPU).
    pub device: DeviceOptions,
    /// Routed experts per token; None = the model's own top-k (exact). Fewer is lossy.
    pub experts_per_token: Option<usize>,
    /// Longest sequence accepted (prompt + generated); None = the config's
    /// max_position_embeddings.
    pub max_context: Option<usize>,
    /// Most streamed expert buffers alive at once per layer, on every backend (the memory plan
    /// sets it to k); None = 32.
    pub fetch_chunk: Option<usize>,
    /// Read layer l+1's likely experts during layer l (streamed experts, decode).
    pub prefetch: bool,
    /// Accumulate per-layer times (`Model::timing_snapshot`).
    pub timing: bool,
    /// Record every routing decision (`Model::take_routing_trace`).
    pub trace_routing: bool,
    /// Which routing profile pre-warms the expert tiers, and where this run's counts go.
    pub routing_profile: ProfileSource,
}

/// Where the routing profile of a run comes from (`--routing-profile`).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ProfileSource {
    /// No pre-warm, nothing saved.
    #[default]
    Off,
    /// The profile earlier runs saved for this model in the cache folder (if any) pre-warms the
    /// tiers; this run's counts are added to it when the model is dropped.
    Auto,
    /// This file pre-warms the tiers (it is not written).
    File(std::path::PathBuf),
}

impl std::str::FromStr for ProfileSource {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "off" => ProfileSource::Off,
            "auto" => ProfileSource::Auto,
            "" => return Err("expected auto, off or a file".into()),
            f => ProfileSource::File(f.into()),
        })
    }
}

/// What the pre-warm was given: where the profile came from and how many experts it ranks.
#[derive(Clone, Debug)]
pub struct PrewarmInfo {
    /// The routing profile that ranked the experts; `None`: no profile yet, but GPU + RAM
    /// tiers hold every expert, so all of them are loaded in file order.
    pub source: Option<std::path::PathBuf>,
    /// Experts with a non-zero count (the pre-warm loads them hottest first until the tiers
    /// are full).
    pub ranked: usize,
    /// Of those, how many go to the backend's own tier (the GPU) before the RAM tier.
    pub to_backend: usize,
    /// Experts the pre-warm goes through, hottest first (it skips those a tier already holds).
    pub to_read: usize,
}

impl PrewarmInfo {
    /// One line for start-up output: what is loaded, in which order, into which tier.
    pub fn describe(&self) -> String {
        match &self.source {
            Some(profile) => format!(
                "{} experts ranked by {}, hottest {} to the GPU, then the RAM tier",
                self.ranked,
                profile.display(),
                self.to_backend
            ),
            None => format!(
                "all {} experts fit the GPU and RAM tiers: {} to the GPU, the rest to the RAM tier (no routing profile yet)",
                self.ranked, self.to_backend
            ),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            stream_experts: true,
            store: StoreOptions::default(),
            device: Default::default(),
            experts_per_token: None,
            max_context: None,
            fetch_chunk: None,
            prefetch: false,
            timing: false,
            trace_routing: false,
            routing_profile: ProfileSource::Off,
        }
    }
}

/// Everything a sequence carries between calls: its position and its caches on the backend
/// that made it.
pub struct SequenceState {
    /// Number of tokens already processed (the position of the next token).
    pub pos: usize,
    caches: Box<dyn AnyState>,
}

impl Clone for SequenceState {
    fn clone(&self) -> Self {
        SequenceState { pos: self.pos, caches: self.caches.duplicate_box() }
    }
}

impl SequenceState {
    /// Bytes held by caches and states (on the device that holds them).
    pub fn bytes(&self) -> usize {
        self.caches.bytes()
    }
}

/// What the runtime collects from the backends: the routing trace, per-layer times, prefetch
/// guesses and their accuracy.
struct RuntimeHooks {
    trace: Option<Mutex<Vec<RoutingRecord>>>,
    timings: Option<Mutex<Vec<LayerTimes>>>,
    prefetch: bool,
    guesses: Mutex<Vec<Option<Vec<usize>>>>,
    prefetch_hits: AtomicU64,
    prefetch_total: AtomicU64,
}

impl Hooks for RuntimeHooks {
    fn wants_routing(&self) -> bool {
        self.trace.is_some() || self.prefetch
    }

    fn routing(&self, layer: usize, pos: usize, experts: &[u32]) {
        if self.prefetch
            && let Some(guess) =
                self.guesses.lock().unwrap_or_else(|p| p.into_inner()).get_mut(layer).and_then(Option::take)
        {
            let hits = experts.iter().filter(|&&x| guess.contains(&(x as usize))).count();
            self.prefetch_hits.fetch_add(hits as u64, Relaxed);
            self.prefetch_total.fetch_add(experts.len() as u64, Relaxed);
        }
        if let Some(t) = &self.trace {
            t.lock().unwrap_or_else(|p| p.into_inner()).push(RoutingRecord { layer, pos, experts: experts.to_vec() });
        }
    }

    fn wants_timing(&self) -> bool {
        self.timings.is_some()
    }

    fn layer_times(&self, layer: usize, t: &LayerTimes) {
        if let Some(all) = &self.timings
            && let Some(slot) = all.lock().unwrap_or_else(|p| p.into_inner()).get_mut(layer)
        {
            slot.add(t);
        }
    }

    fn wants_prefetch(&self) -> bool {
        self.prefetch
    }

    fn prefetch_guess(&self, layer: usize, experts: &[usize]) {
        if let Some(g) = self.guesses.lock().unwrap_or_else(|p| p.into_inner()).get_mut(layer) {
            *g = Some(experts.to_vec());
        }
    }
}

pub struct Model {
    pub config: ModelConfig,
    placed: Box<dyn PlacedModel>,
    expert_store: Option<Arc<ExpertStore>>,
    /// Routed experts per token. Defaults to the model's own top-k (exact); lower is lossy.
    experts_per_token: usize,
    /// Longest sequence this instance accepts (prompt + generated).
    max_context: usize,
    fetch_chunk: usize,
    hooks: RuntimeHooks,
    /// Why `--device auto` stayed on the CPU, when it did.
    device_note: Option<String>,
    /// Where this run's routing counts are added when the model is dropped.
    profile_out: Option<std::path::PathBuf>,
    prewarm: Option<PrewarmInfo>,
    prewarm_thread: Option<std::thread::JoinHandle<()>>,
    /// Set when `--io auto` chose to compute on the mapped expert files (`map_on_cpu`).
    mapped_note: Option<String>,
}

impl Drop for Model {
    fn drop(&mut self) {
        if let Some(store) = &self.expert_store {
            store.stop_prewarm();
        }
        if let Err(e) = self.save_routing_profile() {
            tracing::warn!("routing profile not saved: {e}");
        }
    }
}

impl Model {
    /// Loads a model folder with default options (experts stream, on the CPU).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::default())
    }

    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let host = load_host(dir, opts)?;
        let (k, max_context) = run_limits(host.config(), opts)?;
        let (placed, device_note) = place(&host, &opts.device, k, max_context)?;
        if let Some(why) = map_on_cpu(opts, &host, placed.as_ref()) {
            // Same model, experts as views of the mapped files, on the CPU it was placed on.
            let mapped = LoadOptions { stream_experts: false, ..opts.clone() };
            let host = load_host(dir, &mapped)?;
            let (placed, _) =
                place(&host, &DeviceOptions { device: DeviceChoice::Cpu, ..opts.device.clone() }, k, max_context)?;
            let mut m = Self::assemble(&host, placed, device_note, &mapped, k, max_context);
            m.mapped_note = Some(why);
            return Ok(m);
        }
        let mut m = Self::assemble(&host, placed, device_note, opts, k, max_context);
        m.start_prewarm(dir, &opts.routing_profile)?;
        Ok(m)
    }

    /// Why the experts are computed on the mapped files when `--io auto` chose that (CPU, no
    /// RAM tier asked for, the experts fit in available memory).
    pub fn mapped_note(&self) -> Option<&str> {
        self.mapped_note.as_deref()
    }

    /// Loads `dir` onto a backend the caller made (`opts.device` is not used): how a backend
    /// that lives outside the engine runs the model.
    pub fn load_on<B: Backend>(dir: &Path, opts: &LoadOptions, backend: B) -> Result<Self> {
        let host = load_host(dir, opts)?;
        let (k, max_context) = run_limits(host.config(), opts)?;
        let placed = models::place(&host, backend)?;
        let mut m = Self::assemble(&host, placed, None, opts, k, max_context);
        m.start_prewarm(dir, &opts.routing_profile)?;
        Ok(m)
    }

    /// Loads `dir` split by layers over backends the caller made, in order: each its
    /// contiguous share of the bytes (equal shares; `--device cuda:N,M` weighs them by each
    /// GPU's memory). One backend is [`Model::load_on`].
    pub fn load_on_split<B: Backend>(dir: &Path, opts: &LoadOptions, backends: Vec<B>) -> Result<Self> {
        let host = load_host(dir, opts)?;
        let (k, max_context) = run_limits(host.config(), opts)?;
        let (layers, head, tail) = host.split_bytes();
        let ranges = crate::memory::split_layers(&layers, head, tail, &vec![1; backends.len()])?;
        let placed = models::place_split(&host, backends.into_iter().zip(ranges).collect())?;
        let mut m = Self::assemble(&host, placed, None, opts, k, max_context);
        m.start_prewarm(dir, &opts.routing_profile)?;
        Ok(m)
    }

    /// Starts filling the expert tiers from a routing profile in the background (hottest
    /// first: the backend's own tier, then the RAM tier), and sets where this run's counts go.
    /// A saved profile that no longer fits the model is ignored with a warning; a file the user
    /// named must fit.
    fn start_prewarm(&mut self, dir: &Path, source: &ProfileSource) -> Result<()> {
        let Some(store) = self.expert_store.clone() else { return Ok(()) };
        let c = &self.config;
        let path = match source {
            ProfileSource::Off => return Ok(()),
            ProfileSource::Auto => {
                let p = RoutingProfile::default_path(dir);
                self.profile_out = Some(p.clone());
                p
            }
            ProfileSource::File(f) => f.clone(),
        };
        let loaded = RoutingProfile::load(&path, c.num_layers, c.num_experts);
        let room = self.placed.prewarm_room();
        if room == 0 && store.ram_cache_budget() == 0 {
            // No tier of our own to fill (the page cache is the only one); a named profile
            // that does not fit this model is still an error.
            return loaded.map(|_| ()).or_else(|e| if *source == ProfileSource::Auto { Ok(()) } else { Err(e) });
        }
        let (profile, ranked_by) = match loaded {
            Ok(p) => (p, Some(path)),
            Err(e) if *source == ProfileSource::Auto => {
                if path.exists() {
                    tracing::warn!("ignoring the saved routing profile: {e}");
                }
                // No ranking yet. When the tiers hold every expert, the order does not matter:
                // load them all now rather than paying a disk read on each one's first use.
                let total = store.total_expert_bytes();
                let experts = (c.num_layers * c.num_experts).max(1) as u64;
                if store.ram_cache_budget().saturating_add(room as u64 * (total / experts)) < total {
                    return Ok(());
                }
                (RoutingProfile { counts: vec![vec![1; c.num_experts]; c.num_layers] }, None)
            }
            Err(e) => return Err(e),
        };
        let ranked = profile.hottest().len();
        let keys = profile.ranking_with_rates(self.experts_per_token);
        let feed = if room > 0 {
            let (tx, rx) = std::sync::mpsc::sync_channel(self.fetch_chunk.max(8));
            self.placed.accept_prewarm(rx, store.clone());
            Some(tx)
        } else {
            None
        };
        self.prewarm =
            Some(PrewarmInfo { source: ranked_by, ranked, to_backend: room.min(keys.len()), to_read: keys.len() });
        self.prewarm_thread = Some(store.start_prewarm(keys, feed, room));
        Ok(())
    }

    /// Whether the background pre-warm is still reading experts.
    pub fn prewarm_running(&self) -> bool {
        self.prewarm_thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits, up to `limit`, while RAM-tier entries move into pinned memory
    /// (`ExpertStore::settling`: that happens only while no pass runs). Returns the time waited.
    pub fn settle(&self, limit: std::time::Duration) -> std::time::Duration {
        let t = std::time::Instant::now();
        while self.expert_store.as_ref().is_some_and(|s| s.settling()) && t.elapsed() < limit {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        t.elapsed()
    }

    /// What the pre-warm was given, when one started.
    pub fn prewarm_info(&self) -> Option<&PrewarmInfo> {
        self.prewarm.as_ref()
    }

    /// Adds this run's routing counts to the saved profile (`ProfileSource::Auto`). Returns the
    /// file written, if any. A saved profile of another geometry is replaced.
    pub fn save_routing_profile(&self) -> Result<Option<std::path::PathBuf>> {
        let (Some(path), Some(store)) = (&self.profile_out, &self.expert_store) else { return Ok(None) };
        let mut counts = store.profile();
        if counts.total() == 0 {
            return Ok(None);
        }
        if let Ok(old) = RoutingProfile::load(path, self.config.num_layers, self.config.num_experts) {
            counts.merge(&old);
        }
        counts.save(path)?;
        Ok(Some(path.clone()))
    }

    fn assemble(
        host: &HostModel,
        placed: Box<dyn PlacedModel>,
        device_note: Option<String>,
        opts: &LoadOptions,
        experts_per_token: usize,
        max_context: usize,
    ) -> Self {
        let config = host.config().clone();
        let n = config.num_layers;
        Model {
            expert_store: host.expert_store().cloned(),
            placed,
            experts_per_token,
            max_context,
            fetch_chunk: opts.fetch_chunk.unwrap_or(32).max(1),
            hooks: RuntimeHooks {
                trace: opts.trace_routing.then(Default::default),
                timings: opts.timing.then(|| Mutex::new(vec![LayerTimes::default(); n])),
                prefetch: opts.prefetch,
                guesses: Mutex::new(vec![None; n]),
                prefetch_hits: AtomicU64::new(0),
                prefetch_total: AtomicU64::new(0),
            },
            device_note,
            config,
            profile_out: None,
            prewarm: None,
            prewarm_thread: None,
            mapped_note: None,
        }
    }

    /// The family's host weight tree, when it is of type `W` (e.g. `models::qwen35::ModelWeights`).
    pub fn host_weights<W: 'static>(&self) -> Option<&W> {
        self.placed.host_weights().downcast_ref::<W>()
    }

    /// The expert store, when routed experts stream.
    pub fn expert_store(&self) -> Option<&Arc<ExpertStore>> {
        self.expert_store.as_ref()
    }

    /// Bytes of everything but the routed experts, and of the routed experts.
    pub fn weight_bytes(&self) -> (usize, usize) {
        self.placed.weight_bytes()
    }

    /// One line: where the forward pass runs and, on a GPU, its weights and expert cache; on
    /// the CPU, why `--device auto` stayed there when it did.
    pub fn device_description(&self) -> String {
        match &self.device_note {
            Some(note) => format!("cpu ({note})"),
            None => self.placed.describe(),
        }
    }

    /// "cpu", or the device's one-line description.
    pub fn device_name(&self) -> String {
        self.placed.describe()
    }

    /// The backend's own expert tier (a GPU's expert cache), when it has one.
    pub fn tier(&self) -> Option<TierInfo> {
        self.placed.tier()
    }

    /// Each GPU's own expert tier with the layers it runs (one entry unless the model is split
    /// over several GPUs).
    pub fn stage_tiers(&self) -> Vec<(std::ops::Range<usize>, TierInfo)> {
        self.placed.stage_tiers()
    }

    /// Fills the backend's expert tier in (layer, expert) order until it is full.
    pub fn preload_experts(&self) -> Result<usize> {
        self.placed.preload_experts(self.fetch_chunk)
    }

    pub fn measure_bandwidths(&self) -> Result<Option<Bandwidths>> {
        self.placed.measure_bandwidths()
    }

    /// Bytes a decode step at position `pos` moves with every expert in place.
    pub fn decode_bytes_per_token(&self, pos: usize) -> f64 {
        self.placed.decode_bytes_per_token(pos, self.experts_per_token)
    }

    /// Replaces layer `layer`'s router on the backend (benchmarks that draw routing at random).
    pub fn set_router(&mut self, layer: usize, router: &Linear) -> Result<()> {
        self.placed.set_router(layer, router)
    }

    /// Uses `k` routed experts per token instead of the model's own number (lossy when smaller).
    pub fn set_experts_per_token(&mut self, k: usize) -> Result<()> {
        check_experts_per_token(k, &self.config)?;
        self.experts_per_token = k;
        Ok(())
    }

    pub fn experts_per_token(&self) -> usize {
        self.experts_per_token
    }

    /// True when routing uses the model's own top-k.
    pub fn routing_is_exact(&self) -> bool {
        self.experts_per_token == self.config.experts_per_token
    }

    pub fn set_max_context(&mut self, n: usize) {
        self.max_context = n;
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Most streamed expert buffers alive at once per layer.
    pub fn fetch_chunk(&self) -> usize {
        self.fetch_chunk
    }

    /// Clears the timing accumulators (e.g. after the prefill, to time decode alone).
    pub fn reset_timing(&self) {
        if let Some(t) = &self.hooks.timings {
            t.lock().unwrap_or_else(|p| p.into_inner()).iter_mut().for_each(|x| *x = LayerTimes::default());
        }
    }

    /// Per-layer times accumulated since load or the last reset (None unless `timing`).
    pub fn timing_snapshot(&self) -> Option<Vec<LayerTimes>> {
        self.hooks.timings.as_ref().map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The routing decisions recorded since the last call (empty unless `trace_routing`).
    pub fn take_routing_trace(&self) -> Vec<RoutingRecord> {
        self.hooks
            .trace
            .as_ref()
            .map(|t| std::mem::take(&mut *t.lock().unwrap_or_else(|p| p.into_inner())))
            .unwrap_or_default()
    }

    /// Of the experts the layers used, how many the prefetch guessed: (hits, total).
    pub fn prefetch_accuracy(&self) -> (u64, u64) {
        (self.hooks.prefetch_hits.load(Relaxed), self.hooks.prefetch_total.load(Relaxed))
    }

    pub fn new_state(&self) -> SequenceState {
        self.try_new_state().unwrap_or_else(|e| SequenceState { pos: 0, caches: Box::new(BrokenState(e.to_string())) })
    }

    /// A fresh sequence state on this model's backend.
    pub fn try_new_state(&self) -> Result<SequenceState> {
        Ok(SequenceState { pos: 0, caches: self.placed.new_state()? })
    }

    /// Runs `tokens` (consecutive positions starting at `state.pos`) through the model as one
    /// batch and returns logits for the requested positions ([n, vocab] row-major).
    pub fn forward(&self, tokens: &[u32], state: &mut SequenceState, want: LogitsFor) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_into(tokens, state, want, &mut logits)?;
        Ok(logits)
    }

    /// [`Model::forward`] into the caller's vector (cleared first): decode loops reuse one, as
    /// a fresh 1 MB vector per step costs page faults (0.17 ms a step on the GPU machine).
    pub fn forward_into(
        &self,
        tokens: &[u32],
        state: &mut SequenceState,
        want: LogitsFor,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let c = &self.config;
        logits.clear();
        if tokens.is_empty() {
            return Ok(());
        }
        if let Some(BrokenState(why)) = state.caches.as_any_mut().downcast_ref::<BrokenState>() {
            return Err(Error::input(format!("this sequence state could not be made: {why}")));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::input(format!(
                "token id {bad} is outside the vocabulary (the model has {} rows, ids 0..{})",
                c.vocab_size,
                c.vocab_size - 1
            )));
        }
        if state.pos + tokens.len() > self.max_context {
            return Err(Error::input(format!(
                "{} tokens (after {} already in context) exceed the context length of {} tokens",
                tokens.len(),
                state.pos,
                self.max_context
            )));
        }
        let spec = PassSpec {
            cfg: c,
            tokens,
            pos0: state.pos,
            want,
            experts_per_token: self.experts_per_token,
            fetch_chunk: self.fetch_chunk,
            hooks: &self.hooks,
            input: PassInput::Embed,
            output: PassOutput::Logits,
            batch: &[],
        };
        self.placed.forward(&spec, &mut *state.caches, logits)?;
        check_finite(logits, c.vocab_size)?;
        state.pos += tokens.len();
        Ok(())
    }

    /// Whether [`Model::forward_batch`] works on this placement (continuous batching).
    pub fn can_batch(&self) -> bool {
        self.placed.can_batch()
    }

    /// Whether batching is faster than one sequence at a time on this placement (a server's
    /// default `--max-batch`).
    pub fn batch_pays(&self) -> bool {
        self.placed.batch_pays()
    }

    /// Continuous batching: runs `tokens[i]`, the next token of the sequence `states[i]`, for
    /// every i in one pass (each matrix and each routed expert read once for all of them) and
    /// leaves in `logits` one row per sequence ([n, vocab]). Each sequence advances by one.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        states: &mut [&mut SequenceState],
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let c = &self.config;
        logits.clear();
        if tokens.len() != states.len() {
            return Err(Error::input(format!("{} tokens for {} sequences", tokens.len(), states.len())));
        }
        if tokens.is_empty() {
            return Ok(());
        }
        if let ([one], [state]) = (tokens, &mut *states) {
            // One sequence: the ordinary decode step (on a GPU, its recorded graph).
            return self.forward_into(&[*one], state, LogitsFor::Last, logits);
        }
        for (s, &id) in states.iter_mut().zip(tokens) {
            if let Some(BrokenState(why)) = s.caches.as_any_mut().downcast_ref::<BrokenState>() {
                return Err(Error::input(format!("this sequence state could not be made: {why}")));
            }
            if id as usize >= c.vocab_size {
                return Err(Error::input(format!(
                    "token id {id} is outside the vocabulary (the model has {} rows, ids 0..{})",
                    c.vocab_size,
                    c.vocab_size - 1
                )));
            }
            if s.pos + 1 > self.max_context {
                return Err(Error::input(format!(
                    "a sequence of {} tokens is at the context length of {} tokens",
                    s.pos, self.max_context
                )));
            }
        }
        let positions: Vec<usize> = states.iter().map(|s| s.pos).collect();
        let spec = PassSpec {
            cfg: c,
            tokens,
            pos0: 0,
            want: LogitsFor::All,
            experts_per_token: self.experts_per_token,
            fetch_chunk: self.fetch_chunk,
            hooks: &self.hooks,
            input: PassInput::Embed,
            output: PassOutput::Logits,
            batch: &positions,
        };
        let mut caches: Vec<&mut (dyn AnyState + 'static)> = states.iter_mut().map(|s| &mut *s.caches).collect();
        self.placed.forward_batch(&spec, &mut caches, logits)?;
        check_finite(logits, c.vocab_size)?;
        for s in states.iter_mut() {
            s.pos += 1;
        }
        Ok(())
    }
}

/// Every backend: logits are finite or the pass is an error (never fluent garbage). A
/// branch-free pass first (it vectorizes: ~10× faster than `position` over a 248k-row
/// vocabulary, where the scalar scan cost ~0.1 ms of every step); the position only on failure.
fn check_finite(logits: &[f32], vocab: usize) -> Result<()> {
    let all_finite = logits.chunks(1024).all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()));
    if let Some(i) = (!all_finite).then(|| logits.iter().position(|v| !v.is_finite())).flatten() {
        return Err(Error::NonFinite(format!(
            "non-finite logit ({} for token id {} of output row {}): the checkpoint holds NaN/Inf weights or the activations overflowed",
            logits[i],
            i % vocab,
            i / vocab
        )));
    }
    Ok(())
}

/// `--io auto` on the CPU with no RAM tier and no memory budget: when every expert fits in the
/// memory available, compute on views of the mapped expert files instead of streaming them.
/// Streaming would copy each chosen expert out of the page cache every token (and, with no RAM
/// tier, keep nothing of its own): on 16 cores that ran decode at 128 tok/s against 298 on the
/// mappings (docs/performance.md). Returns why, for the run's summary; None to keep streaming.
fn map_on_cpu(opts: &LoadOptions, host: &HostModel, placed: &dyn PlacedModel) -> Option<String> {
    let store = host.expert_store()?;
    let asked_for_streaming = opts.store.io != IoChoice::Auto || opts.store.ram_cache_bytes > 0;
    if !opts.stream_experts || asked_for_streaming || opts.fetch_chunk.is_some() || placed.tier().is_some() {
        return None;
    }
    cpu_maps_experts(store.total_expert_bytes(), crate::experts::available_ram_bytes())
}

/// The rule of [`map_on_cpu`] on its facts (also what `flashmoe info` reports): the experts'
/// bytes within 90% of the memory available. Returns the reason, or None to stream.
pub fn cpu_maps_experts(expert_bytes: u64, available: Option<u64>) -> Option<String> {
    let available = available?;
    (expert_bytes <= available / 10 * 9).then(|| {
        format!(
            "auto: computed in place on the mapped files ({} of experts fit in the {} available; no copy per token)",
            crate::memory::fmt(expert_bytes),
            crate::memory::fmt(available)
        )
    })
}

fn load_host(dir: &Path, opts: &LoadOptions) -> Result<HostModel> {
    models::load_host(dir, &SourceOptions { stream_experts: opts.stream_experts, store: opts.store.clone() })
}

/// Routed experts per token (checked) and the longest sequence, from the options or the config.
fn run_limits(c: &ModelConfig, opts: &LoadOptions) -> Result<(usize, usize)> {
    let k = opts.experts_per_token.unwrap_or(c.experts_per_token);
    check_experts_per_token(k, c)?;
    Ok((k, opts.max_context.unwrap_or(c.max_position_embeddings)))
}

fn check_experts_per_token(k: usize, c: &ModelConfig) -> Result<()> {
    // More experts than the router was trained with is not a mode of the model: the routing
    // weights would be renormalised over experts it never chose. Fewer is the lossy speed-up.
    if k == 0 || k > c.experts_per_token {
        return Err(Error::input(format!(
            "--experts {k}: must be between 1 and the model's {} experts per token (fewer is lossy; more is not supported)",
            c.experts_per_token
        )));
    }
    Ok(())
}

/// The state `new_state` returns when the backend could not make one (GPU memory): every use
/// is an error naming why.
struct BrokenState(String);

impl crate::backend::BackendState for BrokenState {
    fn duplicate(&self) -> Self {
        BrokenState(self.0.clone())
    }
    fn bytes(&self) -> usize {
        0
    }
}

/// Puts the host model on the device `o` names. Returns a note when `auto` stayed on the CPU.
fn place(
    host: &HostModel,
    o: &DeviceOptions,
    experts_per_token: usize,
    max_context: usize,
) -> Result<(Box<dyn PlacedModel>, Option<String>)> {
    let cpu = || models::place(host, CpuBackend);
    let open = |n: usize| CudaBackend::open(n, o, experts_per_token, max_context);
    match o.device {
        DeviceChoice::Cpu => Ok((cpu()?, None)),
        DeviceChoice::Auto if !cuda::COMPILED => Ok((cpu()?, None)),
        DeviceChoice::Auto => {
            // Several GPUs: the layers split over all of them (as llama.cpp does by default;
            // CUDA_VISIBLE_DEVICES or cuda:N picks fewer). If they cannot take the model
            // together, GPU 0 alone, then the CPU.
            let gpus = cuda::device_count().unwrap_or(0);
            if gpus > 1 {
                let all: Vec<usize> = (0..gpus).collect();
                match place_split(host, &all, o, experts_per_token, max_context) {
                    Ok(m) => return Ok((m, None)),
                    Err(e) => tracing::warn!("the {gpus} GPUs could not take this model together ({e}); trying GPU 0"),
                }
            }
            let backend = match open(0) {
                Ok(b) => b,
                Err(e) => return Ok((cpu()?, Some(format!("no usable GPU ({e}); running on the CPU")))),
            };
            match models::place(host, backend) {
                Ok(m) => Ok((m, None)),
                Err(e) => Ok((cpu()?, Some(format!("the GPU could not take this model ({e}); running on the CPU")))),
            }
        }
        DeviceChoice::Cuda(n) if !cuda::COMPILED => Err(open(n).err().unwrap_or_else(|| Error::input("no CUDA"))),
        DeviceChoice::Cuda(n) => {
            let on_gpu = || -> Result<Box<dyn PlacedModel>> { models::place(host, open(n)?) };
            on_gpu().map(|m| (m, None)).map_err(|e| Error::Device(format!("cuda:{n}: {e}")))
        }
        DeviceChoice::CudaAll => {
            let n = cuda::device_count()?;
            if n == 0 {
                return Err(Error::Device("cuda:all: the driver reports no GPU".into()));
            }
            let all: Vec<usize> = (0..n).collect();
            place_split(host, &all, o, experts_per_token, max_context).map(|m| (m, None))
        }
        DeviceChoice::CudaSplit(list) => {
            place_split(host, &list.ordinals(), o, experts_per_token, max_context).map(|m| (m, None))
        }
    }
}

/// Splits the layers over GPUs `ordinals` (in that order): each its contiguous share, sized by
/// [`crate::memory::split_layers`] in proportion to the GPU's memory; each GPU's expert cache
/// (`--gpu-cache`, per GPU) serves its own layers.
fn place_split(
    host: &HostModel,
    ordinals: &[usize],
    o: &DeviceOptions,
    experts_per_token: usize,
    max_context: usize,
) -> Result<Box<dyn PlacedModel>> {
    let name = format!("cuda:{}", ordinals.iter().map(usize::to_string).collect::<Vec<_>>().join(","));
    if let [n] = ordinals {
        return models::place(host, CudaBackend::open(*n, o, experts_per_token, max_context)?)
            .map_err(|e| Error::Device(format!("{name}: {e}")));
    }
    let split = || -> Result<Box<dyn PlacedModel>> {
        let mut backends = Vec::with_capacity(ordinals.len());
        for &n in ordinals {
            backends.push(
                CudaBackend::open(n, o, experts_per_token, max_context)
                    .map_err(|e| Error::Device(format!("cuda:{n}: {e}")))?,
            );
        }
        // A GPU named twice shares its memory between its shares.
        let room: Vec<u64> = backends
            .iter()
            .zip(ordinals)
            .map(|(b, n)| b.total_memory() as u64 / ordinals.iter().filter(|&m| m == n).count() as u64)
            .collect();
        let (layers, head, tail) = host.split_bytes();
        let ranges = crate::memory::split_layers(&layers, head, tail, &room)?;
        tracing::info!(
            "layers split over {name}: {}",
            ranges.iter().map(|r| format!("{}..{}", r.start, r.end)).collect::<Vec<_>>().join(", ")
        );
        models::place_split(host, backends.into_iter().zip(ranges).collect())
    };
    split().map_err(|e| match e {
        Error::Device(_) => e,
        e => Error::Device(format!("{name}: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--io auto` maps a CPU run's experts when they fit in 90% of the memory available, and
    /// streams them when they do not or when the memory is unknown (not Linux).
    #[test]
    fn cpu_maps_experts_that_fit_in_nine_tenths_of_available_memory() {
        let why = cpu_maps_experts(900 << 20, Some(1000 << 20)).expect("fits");
        assert!(why.starts_with("auto: computed in place on the mapped files (900.0 MiB"), "{why}");
        assert!(cpu_maps_experts(901 << 20, Some(1000 << 20)).is_none());
        assert!(cpu_maps_experts(1, None).is_none());
    }

    #[test]
    fn auto_never_fails_and_cuda_is_a_clear_error_without_a_gpu() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen35-moe-tiny");
        let auto = LoadOptions {
            device: DeviceOptions { device: DeviceChoice::Auto, ..Default::default() },
            ..Default::default()
        };
        let m = Model::load_with(&dir, &auto);
        assert!(m.is_ok(), "{:?}", m.err());
        if m.unwrap().device_name() == "cpu" {
            let cuda = LoadOptions {
                device: DeviceOptions { device: DeviceChoice::Cuda(0), ..Default::default() },
                ..Default::default()
            };
            let e = Model::load_with(&dir, &cuda).err().expect("no GPU here");
            assert!(e.to_string().contains("cuda") || e.to_string().contains("CUDA"), "{e}");
        }
    }
}
