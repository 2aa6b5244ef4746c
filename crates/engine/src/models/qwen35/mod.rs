//! The Qwen3.5-MoE family (35B-A3B, 122B-A10B, 397B-A17B) and Qwen3-Next-80B-A3B: config →
//! weights → forward. Both share the layer structure (GatedDeltaNet and gated attention layers,
//! each followed by a sparse MoE with a shared expert); Qwen3-Next differs only in checkpoint
//! layout, which `weights` normalises.

pub mod forward;
pub mod gguf;
pub mod weights;

pub use weights::{LayerWeights, Mixer, ModelWeights, SourceFormat};

use super::{PlacedModel, SourceOptions};
use crate::backend::{AnyState, Backend, Bandwidths, TierInfo};
use crate::config::{LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::{ExpertSet, ExpertStore, ExpertWeights, ScatteredFiles};
use crate::gguf::GgufModel;
use crate::layers::{Convert, Host, PassSpec, Tensors};
use crate::packed;
use crate::weights::Linear;
use crate::weights::store::Bytes;
use std::path::Path;
use std::sync::Arc;

/// A checkpoint of this family in host memory.
pub struct Qwen35Host {
    pub config: ModelConfig,
    pub weights: Arc<ModelWeights<Host>>,
    /// The expert store of a model whose experts stream.
    pub expert_store: Option<Arc<ExpertStore>>,
}

impl Qwen35Host {
    pub fn load(dir: &Path, config: ModelConfig, opts: &SourceOptions) -> Result<Self> {
        if opts.stream_experts && dir.join(packed::MANIFEST).exists() {
            let manifest = packed::Manifest::load(dir)?;
            let store = packed::open_store_without_experts(dir, &manifest)?;
            if opts.store.verify {
                packed::check_resident(&store, &manifest)?;
            }
            let experts = Arc::new(ExpertStore::open(dir, &manifest, &config, &opts.store)?);
            let weights = ModelWeights::load_with_experts(&store, &config, Some(experts.clone()))?;
            return Ok(Qwen35Host { config, weights: Arc::new(weights), expert_store: Some(experts) });
        }
        let store = packed::open_any(dir)?;
        if store.is_packed() && opts.store.verify {
            packed::check_resident(&store, &packed::Manifest::load(dir)?)?;
        }
        let mut weights = ModelWeights::load(&store, &config)?;
        let mut expert_store = None;
        if opts.stream_experts {
            // HF/MLX folder: experts are read in place from the checkpoint files through the
            // expert store, so they get the same accounting, caching and budget as packed ones.
            let files = ScatteredFiles {
                dir,
                paths: &store.files,
                file_of: &|b: &Bytes| store.file_index_of(b),
                kind: "safetensors",
            };
            expert_store = Some(stream_resident_experts(&mut weights, &files, &config, opts)?);
        }
        Ok(Qwen35Host { config, weights: Arc::new(weights), expert_store })
    }
}

impl Qwen35Host {
    /// A GGUF model (any part of a split). With `stream_experts`, experts are read in place from
    /// the file's byte ranges through the expert store; otherwise they are views of the mapping.
    pub fn load_gguf(model: &GgufModel, opts: &SourceOptions) -> Result<Self> {
        let config = model.config.clone();
        let mut weights = ModelWeights::load_gguf(model)?;
        let mut expert_store = None;
        if opts.stream_experts {
            let paths: Vec<_> = model.parts.parts.iter().map(|p| p.path.clone()).collect();
            let owners: Vec<*const u8> = model.parts.parts.iter().map(|p| p.range(0, 0).owner_addr()).collect();
            let file_of = |b: &Bytes| owners.iter().position(|&o| o == b.owner_addr());
            let files = ScatteredFiles { dir: model.parts.path(), paths: &paths, file_of: &file_of, kind: "GGUF" };
            expert_store = Some(stream_resident_experts(&mut weights, &files, &config, opts)?);
        }
        Ok(Qwen35Host { config, weights: Arc::new(weights), expert_store })
    }
}

/// Moves every layer's resident experts behind one expert store reading them in place.
fn stream_resident_experts(
    weights: &mut ModelWeights<Host>,
    files: &ScatteredFiles<'_>,
    config: &ModelConfig,
    opts: &SourceOptions,
) -> Result<Arc<ExpertStore>> {
    let mut lists: Vec<&[ExpertWeights]> = Vec::with_capacity(weights.layers.len());
    for (i, l) in weights.layers.iter().enumerate() {
        lists.push(
            l.moe
                .experts
                .resident()
                .ok_or_else(|| Error::input(format!("layer {i}: experts are neither resident nor streamed")))?,
        );
    }
    let es = Arc::new(ExpertStore::open_scattered(files, &lists, config, &opts.store)?);
    for (i, l) in weights.layers.iter_mut().enumerate() {
        l.moe.experts = ExpertSet::Streamed { store: es.clone(), layer: i };
    }
    Ok(es)
}

/// This family on backend `B`: the backend's copy of the weights, and the host tree it came from
/// (experts are sourced from it; tests and reports read it).
pub struct Qwen35<B: Backend> {
    backend: B,
    config: ModelConfig,
    host: Arc<ModelWeights<Host>>,
    weights: ModelWeights<B::T>,
}

impl<B: Backend> Qwen35<B> {
    pub fn place(host: &Qwen35Host, mut backend: B) -> Result<Self> {
        let weights = host.weights.map(&backend.upload())?;
        let experts: Vec<&<B::T as Tensors>::Experts> = weights.layers.iter().map(|l| &l.moe.experts).collect();
        backend.prepare(&host.config, &experts)?;
        Ok(Qwen35 { backend, config: host.config.clone(), host: host.weights.clone(), weights })
    }
}

impl<B: Backend> PlacedModel for Qwen35<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn describe(&self) -> String {
        self.backend.tier().map_or_else(|| self.backend.describe(), |t| t.description)
    }

    fn new_state(&self) -> Result<Box<dyn AnyState>> {
        Ok(Box::new(self.backend.new_state(&self.config)?))
    }

    fn forward(&self, spec: &PassSpec<'_>, state: &mut dyn AnyState, out: &mut Vec<f32>) -> Result<()> {
        let state = state.as_any_mut().downcast_mut::<B::State>().ok_or_else(|| {
            Error::input(format!("this sequence state belongs to another backend than {}", self.backend.describe()))
        })?;
        forward::forward(&self.backend, &self.weights, spec, state, out)
    }

    fn host_weights(&self) -> &dyn std::any::Any {
        &*self.host
    }

    fn weight_bytes(&self) -> (usize, usize) {
        (self.host.non_expert_bytes(), self.host.expert_bytes())
    }

    fn set_router(&mut self, layer: usize, router: &Linear) -> Result<()> {
        let l = self.weights.layers.get_mut(layer).ok_or_else(|| Error::input(format!("no layer {layer}")))?;
        l.moe.router = self.backend.upload().mat(router)?;
        Ok(())
    }

    fn tier(&self) -> Option<TierInfo> {
        self.backend.tier()
    }

    fn preload_experts(&self, fetch_chunk: usize) -> Result<usize> {
        let sets: Vec<&<B::T as Tensors>::Experts> = self.weights.layers.iter().map(|l| &l.moe.experts).collect();
        self.backend.preload_experts(&sets, fetch_chunk)
    }

    fn measure_bandwidths(&self) -> Result<Option<Bandwidths>> {
        self.backend.measure_bandwidths()
    }

    fn prewarm_room(&self) -> usize {
        self.backend.prewarm_room()
    }

    fn accept_prewarm(&self, rx: crate::models::PrewarmRx, store: std::sync::Arc<crate::experts::ExpertStore>) {
        self.backend.accept_prewarm(rx, store)
    }

    fn decode_bytes_per_token(&self, pos: usize, k: usize) -> f64 {
        let c = &self.config;
        let w = &self.host;
        let embed_row = w.embed.bytes() / c.vocab_size.max(1);
        let weights = w.non_expert_bytes() - w.embed.bytes() + embed_row;
        // One expert's matrix bytes (not its padded stride on disk), per layer.
        let expert: usize = w
            .layers
            .iter()
            .map(|l| match &l.moe.experts {
                ExpertSet::Resident(v) => v.first().map_or(0, ExpertWeights::bytes),
                ExpertSet::Streamed { store, layer } => {
                    store.expert_matrix_bytes(*layer).unwrap_or(store.expert_stride(*layer) as usize)
                }
            })
            .sum();
        let mut state = 0usize;
        for kind in &c.layer_kinds {
            state += match kind {
                LayerKind::FullAttention => 2 * (pos + 1) * c.num_kv_heads * c.head_dim * 4,
                LayerKind::LinearAttention => {
                    2 * (c.linear_value_heads * c.linear_key_dim * c.linear_value_dim
                        + c.conv_kernel.saturating_sub(1) * c.conv_dim())
                        * 4
                }
            };
        }
        (weights + k * expert + state) as f64
    }
}
