//! The op vocabulary shared by model families and backends: the weights each op takes (generic
//! over where their tensors live), what a pass asks for, and the hooks every backend reports to.
//!
//! A weight struct is written once, generic over [`Tensors`]: [`Host`] views into mapped files
//! and fetched buffers (what a checkpoint loader builds, and what the CPU backend computes on),
//! or a backend's own device matrices (a GPU backend's uploaded copies). [`Convert`] walks a tree
//! from one to the other, so no backend copies the tree field by field.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::{ExpertSet, ExpertStore};
use crate::weights::Linear;

/// Where the tensors of a weight tree live.
pub trait Tensors: 'static {
    /// A weight matrix (y = W·x).
    type Mat: Send + Sync;
    /// A small f32 vector (norm weights, gates, conv taps).
    type Vec: Send + Sync;
    /// A layer's routed experts as the backend sees them.
    type Experts: Send + Sync;
}

/// Tensors in host memory: matrix views into mapped files, f32 vectors, the expert set.
pub struct Host;

impl Tensors for Host {
    type Mat = Linear;
    type Vec = Vec<f32>;
    type Experts = ExpertSet;
}

/// Gated attention (Qwen3.5 / Qwen3-Next full-attention layers).
pub struct AttentionWeights<T: Tensors> {
    /// Rows interleaved per head: [q_h (D); gate_h (D)].
    pub q_proj: T::Mat,
    pub k_proj: T::Mat,
    pub v_proj: T::Mat,
    pub o_proj: T::Mat,
    /// Effective multipliers (1+w already applied for HF sources).
    pub q_norm: T::Vec,
    pub k_norm: T::Vec,
}

/// GatedDeltaNet (linear-attention layers).
pub struct DeltaNetWeights<T: Tensors> {
    /// Output [q (key_dim); k (key_dim); v (value_dim)], the conv channel order.
    pub in_qkv: T::Mat,
    pub in_z: T::Mat,
    pub in_b: T::Mat,
    pub in_a: T::Mat,
    pub out_proj: T::Mat,
    /// Depthwise kernel, [conv_dim, Kc] flat; tap Kc-1 multiplies the current token.
    pub conv: T::Vec,
    pub dt_bias: T::Vec,
    /// As stored (kept for conversion); the forward pass uses `neg_a`.
    pub a_log: T::Vec,
    /// −exp(A_log), precomputed in f32 as HF does.
    pub neg_a: T::Vec,
    /// Gated-norm weight (plain, never zero-centred).
    pub norm: T::Vec,
    /// Order of the value heads (and of every tensor indexed by them: the v rows of `in_qkv`,
    /// `in_z`, `in_b`, `in_a`, `dt_bias`, `neg_a`, the v conv channels, `out_proj`'s columns and
    /// the recurrent state). False: HF's grouped order, value head h reads key head h / (Hv/Hk).
    /// True: tiled, value head h reads key head h mod Hk — llama.cpp's converter reorders
    /// Qwen3.5 GGUFs so (spec §2.4), and running in that order needs no copy of any weight.
    pub value_heads_tiled: bool,
}

impl<T: Tensors> DeltaNetWeights<T> {
    /// The key head value head `h` reads, given the layer's key and value head counts.
    pub fn key_head(&self, h: usize, key_heads: usize, value_heads: usize) -> usize {
        if self.value_heads_tiled { h % key_heads } else { h / (value_heads / key_heads) }
    }
}

/// A dense SwiGLU MLP: the shared expert (routed experts live in `T::Experts`).
pub struct MlpWeights<T: Tensors> {
    pub gate: T::Mat,
    pub up: T::Mat,
    pub down: T::Mat,
}

/// Sparse MoE block: router → top-k routed experts, plus a gated shared expert.
pub struct MoeWeights<T: Tensors> {
    pub router: T::Mat,
    pub experts: T::Experts,
    pub shared: MlpWeights<T>,
    pub shared_gate: T::Mat,
}

impl<From: Tensors> AttentionWeights<From> {
    pub fn map<To: Tensors>(&self, c: &impl Convert<From, To>) -> Result<AttentionWeights<To>> {
        Ok(AttentionWeights {
            q_proj: c.mat(&self.q_proj)?,
            k_proj: c.mat(&self.k_proj)?,
            v_proj: c.mat(&self.v_proj)?,
            o_proj: c.mat(&self.o_proj)?,
            q_norm: c.vec(&self.q_norm)?,
            k_norm: c.vec(&self.k_norm)?,
        })
    }
}

impl<From: Tensors> DeltaNetWeights<From> {
    pub fn map<To: Tensors>(&self, c: &impl Convert<From, To>) -> Result<DeltaNetWeights<To>> {
        Ok(DeltaNetWeights {
            in_qkv: c.mat(&self.in_qkv)?,
            in_z: c.mat(&self.in_z)?,
            in_b: c.mat(&self.in_b)?,
            in_a: c.mat(&self.in_a)?,
            out_proj: c.mat(&self.out_proj)?,
            conv: c.vec(&self.conv)?,
            dt_bias: c.vec(&self.dt_bias)?,
            a_log: c.vec(&self.a_log)?,
            neg_a: c.vec(&self.neg_a)?,
            norm: c.vec(&self.norm)?,
            value_heads_tiled: self.value_heads_tiled,
        })
    }
}

impl<From: Tensors> MlpWeights<From> {
    pub fn map<To: Tensors>(&self, c: &impl Convert<From, To>) -> Result<MlpWeights<To>> {
        Ok(MlpWeights { gate: c.mat(&self.gate)?, up: c.mat(&self.up)?, down: c.mat(&self.down)? })
    }
}

impl<From: Tensors> MoeWeights<From> {
    pub fn map<To: Tensors>(&self, layer: usize, c: &impl Convert<From, To>) -> Result<MoeWeights<To>> {
        Ok(MoeWeights {
            router: c.mat(&self.router)?,
            experts: c.experts(layer, &self.experts)?,
            shared: self.shared.map(c)?,
            shared_gate: c.mat(&self.shared_gate)?,
        })
    }
}

/// Turns tensors of one kind into another (a backend's upload of host tensors).
pub trait Convert<From: Tensors, To: Tensors> {
    fn mat(&self, m: &From::Mat) -> Result<To::Mat>;
    fn vec(&self, v: &From::Vec) -> Result<To::Vec>;
    fn experts(&self, layer: usize, e: &From::Experts) -> Result<To::Experts>;
}

/// Which positions of a pass need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    All,
    Last,
    None,
}

/// One routing decision: the experts chosen for the token at `pos` in `layer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingRecord {
    pub layer: usize,
    pub pos: usize,
    pub experts: Vec<u32>,
}

/// Seconds spent in each part of one layer (accumulated over calls when timing is on).
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerTimes {
    /// Attention or GatedDeltaNet.
    pub mixer: f64,
    pub router: f64,
    /// Blocked on expert reads (or host-to-GPU copies) after the work that did not need them.
    pub io_wait: f64,
    /// Shared and routed expert compute.
    pub experts: f64,
    /// Norms, residuals, bookkeeping.
    pub other: f64,
}

impl LayerTimes {
    pub fn add(&mut self, o: &LayerTimes) {
        self.mixer += o.mixer;
        self.router += o.router;
        self.io_wait += o.io_wait;
        self.experts += o.experts;
        self.other += o.other;
    }
    pub fn total(&self) -> f64 {
        self.mixer + self.router + self.io_wait + self.experts + self.other
    }
}

/// What every backend reports while it runs a pass: routing decisions, per-layer times, prefetch
/// guesses. The runtime implements it (trace file, `--timing`, prefetch accuracy); a backend
/// calls it the same way whatever it runs on, so these features behave alike everywhere.
pub trait Hooks: Sync {
    /// Routing decisions are wanted (a backend that would otherwise not read expert ids back
    /// from its device does so).
    fn wants_routing(&self) -> bool {
        false
    }
    fn routing(&self, _layer: usize, _pos: usize, _experts: &[u32]) {}
    /// Per-layer times are wanted (a backend may give up some overlap to measure them).
    fn wants_timing(&self) -> bool {
        false
    }
    fn layer_times(&self, _layer: usize, _t: &LayerTimes) {}
    /// Guess layer l+1's experts during layer l and start reading them.
    fn wants_prefetch(&self) -> bool {
        false
    }
    fn prefetch_guess(&self, _layer: usize, _experts: &[usize]) {}
}

/// Hooks that want nothing.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// The hooks of a pipeline stage that runs the model's layers `first..`: the stage numbers its
/// layers from 0, the hooks hear the model's numbers.
pub struct StageHooks<'a> {
    pub inner: &'a dyn Hooks,
    pub first: usize,
}

impl Hooks for StageHooks<'_> {
    fn wants_routing(&self) -> bool {
        self.inner.wants_routing()
    }
    fn routing(&self, layer: usize, pos: usize, experts: &[u32]) {
        self.inner.routing(self.first + layer, pos, experts)
    }
    fn wants_timing(&self) -> bool {
        self.inner.wants_timing()
    }
    fn layer_times(&self, layer: usize, t: &LayerTimes) {
        self.inner.layer_times(self.first + layer, t)
    }
    fn wants_prefetch(&self) -> bool {
        self.inner.wants_prefetch()
    }
    fn prefetch_guess(&self, layer: usize, experts: &[usize]) {
        self.inner.prefetch_guess(self.first + layer, experts)
    }
}

/// Everything about one pass that is not weights or state.
pub struct PassSpec<'a> {
    pub cfg: &'a ModelConfig,
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`.
    pub pos0: usize,
    pub want: LogitsFor,
    /// Routed experts per token (the model's own top-k unless reduced, lossy).
    pub experts_per_token: usize,
    /// Most streamed expert buffers alive at once per layer.
    pub fetch_chunk: usize,
    pub hooks: &'a dyn Hooks,
    /// Where the residual stream starts: the embedding of `tokens`, or (a later stage of a model
    /// split over devices) the rows the previous stage handed over; `tokens` still give the count
    /// and the positions.
    pub input: PassInput<'a>,
    /// What the pass leaves: logits (`want`), or (a stage before the last, `want` is `None`) the
    /// residual stream after its last layer.
    pub output: PassOutput,
    /// Continuous batching: empty for a pass over one sequence (`tokens` at `pos0`, `pos0 + 1`,
    /// …); otherwise row i of `tokens` is the next token of its own sequence (the i-th state of
    /// `Backend::run_batch`), at position `batch[i]`, and `pos0` is unused. The mixers run per
    /// sequence; every matrix, the router and each routed expert run once over all the rows.
    pub batch: &'a [usize],
}

impl PassSpec<'_> {
    /// The sequences of this pass as (rows, position of the first row), in row order.
    pub fn segments(&self) -> Vec<(usize, usize)> {
        if self.batch.is_empty() {
            vec![(self.tokens.len(), self.pos0)]
        } else {
            self.batch.iter().map(|&p| (1, p)).collect()
        }
    }
}

/// Where a pass's residual stream starts.
#[derive(Clone, Copy, Debug)]
pub enum PassInput<'a> {
    /// The embedding of the pass's tokens (a model's first stage).
    Embed,
    /// The previous stage's rows ([tokens, hidden]) in host memory.
    Hidden(&'a [f32]),
    /// The previous stage's rows, already in this backend's hand-off buffer on its device
    /// (`Backend::hand_over`).
    HiddenOnDevice,
}

/// What a pass leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassOutput {
    /// The logits `want` asks for, in the caller's vector.
    Logits,
    /// The residual stream after the pass's last layer ([tokens, hidden]) in the caller's vector.
    Hidden,
    /// The same rows left in the backend's hand-off buffer on its device, for
    /// `Backend::hand_over` (the caller's vector stays empty; work may still be in flight).
    HiddenOnDevice,
}

/// Top-k of one row of router logits, HF order: softmax, the k largest probabilities (ties to
/// the lower index), renormalised when the config says so. Returns (ids, weights).
pub fn route_top_k(logits: &[f32], k: usize, normalize: bool, idx: &mut Vec<usize>) -> (Vec<usize>, Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = p.iter().sum();
    for v in p.iter_mut() {
        *v /= sum;
    }
    idx.clear();
    idx.extend(0..logits.len());
    idx.sort_by(|&x, &y| p[y].total_cmp(&p[x]).then(x.cmp(&y)));
    let top: Vec<usize> = idx[..k].to_vec();
    let norm = if normalize { top.iter().map(|&x| p[x]).sum::<f32>() } else { 1.0 };
    let w = top.iter().map(|&x| p[x] / norm).collect();
    (top, w)
}

/// Decode prefetch, shared by every backend: from layer `layer`'s router logits (applied to the
/// previous layer's post-attention state) guess its k experts — the k largest logits, ties to the
/// lower index — start reading them into the RAM tier and tell the hooks.
pub fn start_prefetch(
    hooks: &dyn Hooks,
    layer: usize,
    logits: &[f32],
    k: usize,
    store: &std::sync::Arc<ExpertStore>,
    store_layer: usize,
) {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.truncate(k);
    store.prefetch(store_layer, &idx);
    hooks.prefetch_guess(layer, &idx);
}
