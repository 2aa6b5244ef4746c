//! Model families. A family is a folder: config → weights (checkpoint names → a weight tree of
//! host tensors) → forward (its layer loop, written once over the [`Backend`] ops). The runtime
//! talks to a placed model through [`PlacedModel`] and to the families through [`load_host`] and
//! [`place`]; a second family is one more folder and one more arm in those two functions.

pub mod qwen35;

use crate::backend::{AnyState, Backend, Bandwidths, TierInfo};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::ExpertStore;
use crate::layers::PassSpec;
use crate::weights::Linear;
use std::path::Path;
use std::sync::Arc;

/// How to read a checkpoint.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Fetch routed experts through the expert store (positioned reads + RAM cache + I/O
    /// accounting) rather than through the file mappings.
    pub stream_experts: bool,
    pub store: crate::experts::StoreOptions,
}

/// A checkpoint loaded into host memory (views into its mapped files), before placement.
pub enum HostModel {
    Qwen35(qwen35::Qwen35Host),
}

impl HostModel {
    pub fn config(&self) -> &ModelConfig {
        match self {
            HostModel::Qwen35(m) => &m.config,
        }
    }

    /// What a split over devices weighs ([`crate::memory::split_layers`]): each layer's bytes
    /// (weights and experts), the embedding's, and the head's (lm_head).
    pub fn split_bytes(&self) -> (Vec<u64>, u64, u64) {
        match self {
            HostModel::Qwen35(m) => {
                let w = &m.weights;
                let layers = (0..w.layers.len())
                    .map(|i| {
                        let (a, b) = w.layer_bytes(i);
                        (a + b) as u64
                    })
                    .collect();
                (layers, w.embed.bytes() as u64, w.lm_head.bytes() as u64)
            }
        }
    }

    /// The expert store, when routed experts stream.
    pub fn expert_store(&self) -> Option<&Arc<ExpertStore>> {
        match self {
            HostModel::Qwen35(m) => m.expert_store.as_ref(),
        }
    }
}

/// The config of a model folder (config.json) or of a GGUF file (its metadata).
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    if crate::gguf::is_gguf(path) {
        return Ok(crate::gguf::GgufModel::open(path)?.config);
    }
    ModelConfig::load(path)
}

/// Reads `dir` (HF/MLX safetensors folder, packed model, or a GGUF file) with the family its
/// config names.
pub fn load_host(dir: &Path, opts: &SourceOptions) -> Result<HostModel> {
    if crate::gguf::is_gguf(dir) {
        // Both GGUF architectures we accept (qwen35moe, qwen3next) are this one family.
        let model = crate::gguf::GgufModel::open(dir)?;
        return Ok(HostModel::Qwen35(qwen35::Qwen35Host::load_gguf(&model, opts)?));
    }
    let config = ModelConfig::load(dir)?;
    // Every architecture config.rs accepts (Qwen3.5-MoE, Qwen3-Next) is this one family.
    Ok(HostModel::Qwen35(qwen35::Qwen35Host::load(dir, config, opts)?))
}

/// Puts a host model on `backend` (uploads what the backend keeps on its device).
pub fn place<B: Backend>(host: &HostModel, backend: B) -> Result<Box<dyn PlacedModel>> {
    match host {
        HostModel::Qwen35(m) => Ok(Box::new(qwen35::Qwen35::place(m, backend)?)),
    }
}

/// Puts a host model on several backends, layers `range` of each pair on its backend (a model
/// split over GPUs).
pub fn place_split<B: Backend>(
    host: &HostModel,
    parts: Vec<(B, std::ops::Range<usize>)>,
) -> Result<Box<dyn PlacedModel>> {
    match host {
        HostModel::Qwen35(m) => Ok(Box::new(qwen35::Qwen35::place_split(m, parts)?)),
    }
}

/// Experts read ahead by a pre-warm, on their way to a backend's tier.
pub use crate::experts::store::PrewarmRx;

/// A model on a backend, as the runtime sees it: states, passes, and what it reports.
pub trait PlacedModel: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// "cpu", or the device's one-line description (weights, expert cache).
    fn describe(&self) -> String;
    fn new_state(&self) -> Result<Box<dyn AnyState>>;
    /// One pass of `spec.tokens` (validated by the caller) over `state`; the logits in `out`.
    fn forward(&self, spec: &PassSpec<'_>, state: &mut dyn AnyState, out: &mut Vec<f32>) -> Result<()>;
    /// Whether [`PlacedModel::forward_batch`] works on this placement (every backend batches).
    fn can_batch(&self) -> bool;
    /// Whether batching pays on this placement (see `Backend::batch_pays`): any stage that
    /// streams experts gains from it.
    fn batch_pays(&self) -> bool;
    /// One pass over the next token of each of several sequences (`spec.batch` holds their
    /// positions, row i goes with `states[i]`); logits for every row in `out`.
    fn forward_batch(
        &self,
        spec: &PassSpec<'_>,
        states: &mut [&mut (dyn AnyState + 'static)],
        out: &mut Vec<f32>,
    ) -> Result<()>;
    /// The host weight tree (downcast to the family's type: `qwen35::ModelWeights`).
    fn host_weights(&self) -> &dyn std::any::Any;
    /// Bytes of everything but the routed experts, and of the routed experts.
    fn weight_bytes(&self) -> (usize, usize);
    /// Replaces layer `layer`'s router (benchmarks that draw routing at random).
    fn set_router(&mut self, layer: usize, router: &Linear) -> Result<()>;
    fn tier(&self) -> Option<TierInfo>;
    /// Each stage's own tier with the layers it runs (one entry per GPU of a split model).
    fn stage_tiers(&self) -> Vec<(std::ops::Range<usize>, TierInfo)> {
        self.tier().map(|t| (0..self.config().num_layers, t)).into_iter().collect()
    }
    /// Fills the backend's expert tier (if it has one) in (layer, expert) order until it is full.
    fn preload_experts(&self, fetch_chunk: usize) -> Result<usize>;
    fn measure_bandwidths(&self) -> Result<Option<Bandwidths>>;
    /// Free room, in experts, in the backend's own expert tier (see `Backend::prewarm_room`).
    fn prewarm_room(&self) -> usize;
    /// Hands the backend the feed of a pre-warm (see `Backend::accept_prewarm`).
    fn accept_prewarm(&self, rx: PrewarmRx, store: std::sync::Arc<crate::experts::ExpertStore>);
    /// Bytes a decode step at position `pos` moves with every expert in place: every
    /// non-expert matrix but one embedding row, k routed experts per layer, the states.
    fn decode_bytes_per_token(&self, pos: usize, k: usize) -> f64;
}
