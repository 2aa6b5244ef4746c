//! The Qwen3.5-MoE family (35B-A3B, 122B-A10B, 397B-A17B) and Qwen3-Next-80B-A3B: one module,
//! config → weights → forward. Both families share the layer structure (GatedDeltaNet and gated
//! attention layers, each followed by a sparse MoE with a shared expert); Qwen3-Next differs only
//! in checkpoint layout, which `weights` normalises.

pub mod forward;
pub mod weights;

use crate::config::{LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::{ExpertStore, StoreOptions};
use crate::packed;
use crate::weights::TensorStore;
pub use forward::{LayerState, LayerTimes, LogitsFor, SequenceState};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One routing decision: the experts chosen for the token at `pos` in `layer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingRecord {
    pub layer: usize,
    pub pos: usize,
    pub experts: Vec<u32>,
}

/// How to open a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Fetch routed experts through the expert store (positioned reads + RAM cache + I/O
    /// accounting) rather than through the file mappings. For HF/MLX folders the reads are the
    /// experts' byte ranges in the safetensors files; for packed models, one blob each.
    pub stream_experts: bool,
    pub store: StoreOptions,
    /// Where the forward pass runs (default: the CPU).
    pub device: crate::device::DeviceOptions,
    /// Routed experts per token; None = the model's own top-k (exact). Fewer is lossy.
    pub experts_per_token: Option<usize>,
    /// Longest sequence accepted (prompt + generated); None = the config's
    /// max_position_embeddings.
    pub max_context: Option<usize>,
    /// Most streamed expert buffers alive at once per layer (the memory plan sets it to k);
    /// None = 32.
    pub fetch_chunk: Option<usize>,
    /// Read layer l+1's likely experts during layer l (streamed experts, decode).
    pub prefetch: bool,
    /// Accumulate per-layer times (`Model::timing_snapshot`).
    pub timing: bool,
    /// Record every routing decision (`Model::take_routing_trace`).
    pub trace_routing: bool,
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
        }
    }
}
pub use weights::{ModelWeights, SourceFormat};

pub struct Model {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    /// Routed experts per token. Defaults to the model's own top-k (exact); lower is lossy.
    experts_per_token: usize,
    /// Longest sequence this instance accepts (prompt + generated).
    max_context: usize,
    pub(crate) inv_freq: Vec<f32>,
    /// When set, the chosen experts of every token and layer are appended here (layer-major
    /// within a token).
    /// When set, every routing decision is appended here as (layer, position, experts).
    pub routing_trace: Option<Mutex<Vec<RoutingRecord>>>,
    /// The expert store of a streamed (packed) model.
    pub expert_store: Option<Arc<ExpertStore>>,
    /// Most streamed expert buffers alive at once per layer (bounds prefill memory).
    pub fetch_chunk: usize,
    /// Speculatively read layer l+1's likely experts during layer l (streamed models, decode).
    pub prefetch: bool,
    pub(crate) prefetch_guess: Mutex<Vec<Option<Vec<usize>>>>,
    /// Of the experts a layer used, how many the prefetch guessed (accuracy = hits / total).
    pub prefetch_hits: std::sync::atomic::AtomicU64,
    pub prefetch_total: std::sync::atomic::AtomicU64,
    /// Per-layer time accumulators, when timing is on (`enable_timing`).
    pub timings: Option<Mutex<Vec<LayerTimes>>>,
    /// Why `--device auto` stayed on the CPU, when it did.
    pub device_note: Option<String>,
    /// When set, `forward` runs on this GPU (see [`Model::use_gpu`]).
    #[cfg(feature = "cuda")]
    pub gpu: Option<crate::cuda::model::GpuModel>,
}

impl Model {
    /// Loads a model folder with default options (a packed model streams its experts).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::default())
    }

    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let mut m = Self::load_on_cpu(dir, opts)?;
        if let Some(k) = opts.experts_per_token {
            m.set_experts_per_token(k)?;
        }
        if let Some(n) = opts.max_context {
            m.set_max_context(n);
        }
        if let Some(n) = opts.fetch_chunk {
            m.fetch_chunk = n.max(1);
        }
        m.prefetch = opts.prefetch;
        if opts.timing {
            m.enable_timing();
        }
        if opts.trace_routing {
            m.routing_trace = Some(Default::default());
        }
        m.device_note = m.place(&opts.device)?;
        Ok(m)
    }

    fn load_on_cpu(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        if opts.stream_experts && dir.join(packed::MANIFEST).exists() {
            let manifest = packed::Manifest::load(dir)?;
            let store = packed::open_store_without_experts(dir, &manifest)?;
            let experts = Arc::new(ExpertStore::open(dir, &manifest, &config, &opts.store)?);
            let weights = ModelWeights::load_with_experts(&store, &config, Some(experts.clone()))?;
            let mut m = Self::from_parts(config, weights);
            m.expert_store = Some(experts);
            return Ok(m);
        }
        let store = TensorStore::open(dir)?;
        let mut weights = ModelWeights::load(&store, &config)?;
        let mut expert_store = None;
        if opts.stream_experts {
            // HF/MLX folder: experts are read in place from the checkpoint files through the
            // expert store, so they get the same accounting, caching and budget as packed ones.
            let lists: Vec<&[weights::ExpertWeights]> =
                weights.layers.iter().map(|l| l.moe.experts.resident().expect("loaded resident")).collect();
            let es = Arc::new(ExpertStore::open_scattered(&store, &lists, &config, &opts.store)?);
            for (i, l) in weights.layers.iter_mut().enumerate() {
                l.moe.experts = weights::ExpertSet::Streamed { store: es.clone(), layer: i };
            }
            expert_store = Some(es);
        }
        let mut m = Self::from_parts(config, weights);
        m.expert_store = expert_store;
        Ok(m)
    }

    pub fn from_parts(config: ModelConfig, weights: ModelWeights) -> Self {
        let num_layers = config.num_layers;
        let rot = config.rotary_dims();
        // HF: inv_freq = 1 / theta^(2i/rot), computed in f32.
        let inv_freq =
            (0..rot / 2).map(|i| 1.0f32 / (config.rope_theta as f32).powf((2 * i) as f32 / rot as f32)).collect();
        Model {
            experts_per_token: config.experts_per_token,
            max_context: config.max_position_embeddings,
            inv_freq,
            config,
            weights,
            routing_trace: None,
            expert_store: None,
            timings: None,
            fetch_chunk: 32,
            prefetch: false,
            prefetch_guess: Mutex::new(vec![None; num_layers]),
            prefetch_hits: Default::default(),
            prefetch_total: Default::default(),
            device_note: None,
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// Moves the forward pass to a GPU: uploads the non-expert weights and sets up the GPU expert
    /// cache. States made before this call are uploaded on their next use.
    #[cfg(feature = "cuda")]
    pub fn use_gpu(&mut self, opts: &crate::cuda::model::GpuOptions) -> Result<()> {
        self.gpu = None;
        let g = crate::cuda::model::GpuModel::new(self, opts)?;
        self.gpu = Some(g);
        Ok(())
    }

    /// The routing decisions recorded since the last call (empty unless `trace_routing`).
    pub fn take_routing_trace(&self) -> Vec<RoutingRecord> {
        self.routing_trace.as_ref().map(|t| std::mem::take(&mut *t.lock().unwrap())).unwrap_or_default()
    }

    /// One line: where the forward pass runs and, on a GPU, its weights and expert cache; on
    /// the CPU, why `--device auto` stayed there when it did.
    pub fn device_description(&self) -> String {
        if let Some(note) = &self.device_note {
            return format!("cpu ({note})");
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.describe(self);
        }
        "cpu".into()
    }

    /// "cpu", or the GPU's one-line description.
    pub fn device_name(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.dev.describe();
        }
        "cpu".into()
    }

    /// Uses `k` routed experts per token instead of the model's own number (lossy when smaller).
    pub fn set_experts_per_token(&mut self, k: usize) -> Result<()> {
        if k == 0 || k > self.config.num_experts {
            return Err(Error::input(format!(
                "--experts {k}: must be between 1 and the model's {} experts",
                self.config.num_experts
            )));
        }
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

    /// Starts (or restarts) per-layer timing.
    pub fn enable_timing(&mut self) {
        self.timings = Some(Mutex::new(vec![LayerTimes::default(); self.config.num_layers]));
    }

    /// Clears the timing accumulators (e.g. after the prefill, to time decode alone).
    pub fn reset_timing(&self) {
        if let Some(t) = &self.timings {
            t.lock().unwrap().iter_mut().for_each(|x| *x = LayerTimes::default());
        }
    }

    pub fn timing_snapshot(&self) -> Option<Vec<LayerTimes>> {
        self.timings.as_ref().map(|t| t.lock().unwrap().clone())
    }

    pub fn set_max_context(&mut self, n: usize) {
        self.max_context = n;
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn new_state(&self) -> SequenceState {
        let c = &self.config;
        let layers = c
            .layer_kinds
            .iter()
            .map(|k| match k {
                LayerKind::FullAttention => LayerState::Attention { keys: Vec::new(), values: Vec::new() },
                LayerKind::LinearAttention => LayerState::DeltaNet {
                    conv: vec![0.0; c.conv_kernel.saturating_sub(1) * c.conv_dim()],
                    recurrent: vec![0.0; c.linear_value_heads * c.linear_key_dim * c.linear_value_dim],
                },
            })
            .collect();
        SequenceState {
            pos: 0,
            layers,
            #[cfg(feature = "cuda")]
            dev: None,
        }
    }

    /// Runs `tokens` (consecutive positions starting at `state.pos`) through the model as one
    /// batch and returns logits for the requested positions ([n, vocab] row-major).
    pub fn forward(&self, tokens: &[u32], state: &mut SequenceState, want: LogitsFor) -> Result<Vec<f32>> {
        let c = &self.config;
        if tokens.is_empty() {
            return Ok(Vec::new());
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
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.forward(self, tokens, state, want);
        }
        let (t, h) = (tokens.len(), c.hidden_size);
        let mut x = vec![0.0f32; t * h];
        for (i, &id) in tokens.iter().enumerate() {
            self.weights.embed.row(id as usize, &mut x[i * h..(i + 1) * h]);
        }
        for (li, ls) in state.layers.iter_mut().enumerate() {
            self.layer_forward(li, &mut x, t, state.pos, ls)?;
        }
        state.pos += t;
        let rows: &[f32] = match want {
            LogitsFor::None => return Ok(Vec::new()),
            LogitsFor::All => &x,
            LogitsFor::Last => &x[(t - 1) * h..],
        };
        let n = rows.len() / h;
        let mut normed = vec![0.0f32; rows.len()];
        forward::rms_norm_rows(rows, &self.weights.final_norm, c.rms_norm_eps, &mut normed);
        Ok(self.weights.lm_head.apply(&normed, n))
    }
}
