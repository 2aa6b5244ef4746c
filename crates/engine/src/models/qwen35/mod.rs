//! The Qwen3.5-MoE family (35B-A3B, 122B-A10B, 397B-A17B) and Qwen3-Next-80B-A3B: config →
//! weights → forward. Both share the layer structure (GatedDeltaNet and gated attention layers,
//! each followed by a sparse MoE with a shared expert); Qwen3-Next differs only in checkpoint
//! layout, which `weights` normalises.

pub mod forward;
pub mod gguf;
pub mod weights;

pub use weights::{LayerWeights, Mixer, ModelWeights, SourceFormat, StageWeights};

use super::{PlacedModel, SourceOptions};
use crate::backend::{AnyState, Backend, BackendState, Bandwidths, TierCounters, TierInfo};
use crate::config::{LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::{ExpertSet, ExpertStore, ExpertWeights, ScatteredFiles};
use crate::gguf::GgufModel;
use crate::layers::{Convert, Host, LogitsFor, PassInput, PassOutput, PassSpec, StageHooks, Tensors};
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
        let manifest = if dir.join(packed::MANIFEST).exists() { Some(packed::Manifest::load(dir)?) } else { None };
        if let Some(manifest) = manifest.as_ref().filter(|m| m.layout == packed::TensorLayout::Gguf) {
            return Self::load_packed_gguf(dir, config, manifest, opts);
        }
        if opts.stream_experts
            && let Some(manifest) = &manifest
        {
            let store = packed::open_store_without_experts(dir, manifest)?;
            if opts.store.verify {
                packed::check_resident(&store, manifest)?;
            }
            let experts = Arc::new(ExpertStore::open(dir, manifest, &config, &opts.store)?);
            let weights = ModelWeights::load_with_experts(&store, &config, Some(experts.clone()))?;
            return Ok(Qwen35Host { config, weights: Arc::new(weights), expert_store: Some(experts) });
        }
        let store = packed::open_any(dir)?;
        if let Some(manifest) = manifest.as_ref().filter(|_| opts.store.verify) {
            packed::check_resident(&store, manifest)?;
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
    /// A packed model converted from a GGUF: the GGUF's tensors mapped and built into a tree by
    /// the same code as the file's ([`ModelWeights::load_ggml`]); the routed experts from the
    /// expert files, streamed through the expert store or as views of the mapped files.
    fn load_packed_gguf(
        dir: &Path,
        config: ModelConfig,
        manifest: &packed::Manifest,
        opts: &SourceOptions,
    ) -> Result<Self> {
        let table = packed::GgmlTable::open(dir, manifest)?;
        if opts.store.verify {
            table.check_resident(manifest)?;
        }
        // MTP blocks are not converted (the forward pass does not use them).
        let tensors = crate::gguf::tensors::map_tensors(&table, &config, 0)?;
        let (sets, expert_store) = if opts.stream_experts {
            let store = Arc::new(ExpertStore::open(dir, manifest, &config, &opts.store)?);
            let sets =
                (0..config.num_layers).map(|layer| ExpertSet::Streamed { store: store.clone(), layer }).collect();
            (sets, Some(store))
        } else {
            if manifest.experts.len() != config.num_layers {
                return Err(Error::file(
                    dir.join(packed::MANIFEST),
                    format!(
                        "lists expert files for {} layers, config.json has {}",
                        manifest.experts.len(),
                        config.num_layers
                    ),
                ));
            }
            let mut sets = Vec::with_capacity(config.num_layers);
            for (i, ef) in manifest.experts.iter().enumerate() {
                if ef.layer != i {
                    return Err(Error::file(
                        dir.join(packed::MANIFEST),
                        format!("expert file {} is for layer {}, expected {i}", ef.file, ef.layer),
                    ));
                }
                sets.push(ExpertSet::Resident(crate::experts::store::mapped_experts(dir, ef, &config)?));
            }
            (sets, None)
        };
        let weights = ModelWeights::load_ggml(
            &table,
            &tensors,
            &config,
            gguf::RoutedExperts::PerLayer(sets),
            SourceFormat::Packed,
        )?;
        Ok(Qwen35Host { config, weights: Arc::new(weights), expert_store })
    }

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

/// One backend's share of the model: a contiguous range of its layers.
struct Stage<B: Backend> {
    backend: B,
    range: std::ops::Range<usize>,
    /// The config the backend sees: the stage's layers only, numbered from 0.
    config: ModelConfig,
    weights: StageWeights<B::T>,
}

/// The sequence states of a model's stages, one per backend, in layer order.
pub struct StageStates<S>(pub Vec<S>);

impl<S: BackendState> BackendState for StageStates<S> {
    fn duplicate(&self) -> Self {
        StageStates(self.0.iter().map(S::duplicate).collect())
    }
    fn bytes(&self) -> usize {
        self.0.iter().map(S::bytes).sum()
    }
}

/// This family on one backend, or split by layers over several of the same kind (one per GPU):
/// each holds its layers' weights, state and expert tier, and a pass runs the stages in order,
/// each handing the residual stream of its last layer to the next. The host tree the weights
/// came from is kept (experts are sourced from it; tests and reports read it).
pub struct Qwen35<B: Backend> {
    stages: Vec<Stage<B>>,
    config: ModelConfig,
    host: Arc<ModelWeights<Host>>,
}

impl<B: Backend> Qwen35<B> {
    pub fn place(host: &Qwen35Host, backend: B) -> Result<Self> {
        let n = host.config.num_layers;
        Self::place_split(host, vec![(backend, 0..n)])
    }

    /// Places layers `range` of each pair on its backend; the ranges must cover the layers in
    /// order without gaps.
    pub fn place_split(host: &Qwen35Host, parts: Vec<(B, std::ops::Range<usize>)>) -> Result<Self> {
        let n = host.config.num_layers;
        let mut next = 0;
        for (_, r) in &parts {
            if r.start != next || r.end <= r.start {
                return Err(Error::input(format!(
                    "layer ranges {:?} do not split the model's {n} layers in order",
                    parts.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>()
                )));
            }
            next = r.end;
        }
        if next != n {
            return Err(Error::input(format!("the layer ranges end at {next}, the model has {n} layers")));
        }
        let mut stages = Vec::with_capacity(parts.len());
        for (mut backend, range) in parts {
            let weights = host.weights.map_stage(range.clone(), &backend.upload())?;
            let config = host.config.stage(range.clone());
            let experts: Vec<&<B::T as Tensors>::Experts> = weights.layers.iter().map(|l| &l.moe.experts).collect();
            backend.prepare(&config, &experts)?;
            stages.push(Stage { backend, range, config, weights });
        }
        Ok(Qwen35 { stages, config: host.config.clone(), host: host.weights.clone() })
    }
}

/// Layers `r` as people count them ("layers 0–11").
fn layer_span(r: &std::ops::Range<usize>) -> String {
    format!("layers {}–{}", r.start, r.end - 1)
}

impl<B: Backend> Qwen35<B> {
    /// Runs the stages in order through `pass` (stage index, stage, its pass spec, output), the
    /// residual stream handed from each to the next.
    fn run_stages(
        &self,
        spec: &PassSpec<'_>,
        out: &mut Vec<f32>,
        mut pass: impl FnMut(usize, &Stage<B>, &PassSpec<'_>, &mut Vec<f32>) -> Result<()>,
    ) -> Result<()> {
        // The residual stream ([t, hidden] floats: 16 KiB a decode token at hidden 4096) goes
        // from one stage to the next device to device when the backends can (CUDA: a peer copy
        // ordered by events, no host wait), else through host memory.
        let on_device = self.stages.windows(2).all(|p| p[0].backend.can_hand_over(&p[1].backend));
        let floats = spec.tokens.len() * self.config.hidden_size;
        let (mut hand, mut next) = (Vec::new(), Vec::new());
        let last = self.stages.len() - 1;
        for (i, s) in self.stages.iter().enumerate() {
            let hooks = StageHooks { inner: spec.hooks, first: s.range.start };
            let sub = PassSpec {
                cfg: &s.config,
                want: if i == last { spec.want } else { LogitsFor::None },
                hooks: &hooks,
                input: match i {
                    0 => PassInput::Embed,
                    _ if on_device => PassInput::HiddenOnDevice,
                    _ => PassInput::Hidden(&hand),
                },
                output: match i {
                    _ if i == last => PassOutput::Logits,
                    _ if on_device => PassOutput::HiddenOnDevice,
                    _ => PassOutput::Hidden,
                },
                ..*spec
            };
            if i == last {
                pass(i, s, &sub, out)?;
            } else {
                pass(i, s, &sub, &mut next)?;
                if on_device {
                    s.backend.hand_over(&self.stages[i + 1].backend, floats)?;
                } else {
                    std::mem::swap(&mut hand, &mut next);
                }
            }
        }
        Ok(())
    }
}

impl<B: Backend> PlacedModel for Qwen35<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn describe(&self) -> String {
        let one = |s: &Stage<B>| s.backend.tier().map_or_else(|| s.backend.describe(), |t| t.description);
        match &self.stages[..] {
            [s] => one(s),
            stages => {
                stages.iter().map(|s| format!("{}: {}", layer_span(&s.range), one(s))).collect::<Vec<_>>().join("; ")
            }
        }
    }

    fn new_state(&self) -> Result<Box<dyn AnyState>> {
        let states = self.stages.iter().map(|s| s.backend.new_state(&s.config)).collect::<Result<Vec<_>>>()?;
        Ok(Box::new(StageStates(states)))
    }

    fn forward(&self, spec: &PassSpec<'_>, state: &mut dyn AnyState, out: &mut Vec<f32>) -> Result<()> {
        let describe = || self.stages.iter().map(|s| s.backend.describe()).collect::<Vec<_>>().join(", ");
        let states = state
            .as_any_mut()
            .downcast_mut::<StageStates<B::State>>()
            .filter(|s| s.0.len() == self.stages.len())
            .ok_or_else(|| {
                Error::input(format!("this sequence state belongs to another placement than {}", describe()))
            })?;
        if let ([s], [st]) = (&self.stages[..], &mut states.0[..]) {
            return forward::forward(&s.backend, &s.weights, spec, st, out);
        }
        self.run_stages(spec, out, |i, s, sub, o| forward::forward(&s.backend, &s.weights, sub, &mut states.0[i], o))
    }

    fn can_batch(&self) -> bool {
        self.stages.iter().all(|s| s.backend.can_batch())
    }

    fn batch_pays(&self) -> bool {
        self.can_batch() && self.stages.iter().any(|s| s.backend.batch_pays())
    }

    fn forward_batch(
        &self,
        spec: &PassSpec<'_>,
        states: &mut [&mut (dyn AnyState + 'static)],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if !self.can_batch() {
            return Err(Error::input(format!("{} cannot run several sequences in one pass", self.describe())));
        }
        let n = self.stages.len();
        let mut typed = Vec::with_capacity(states.len());
        for s in states.iter_mut() {
            let st = s.as_any_mut().downcast_mut::<StageStates<B::State>>().filter(|s| s.0.len() == n);
            typed.push(st.ok_or_else(|| Error::input("a sequence state of the batch belongs to another placement"))?);
        }
        self.run_stages(spec, out, |i, s, sub, o| {
            let mut per: Vec<&mut B::State> = typed.iter_mut().map(|t| &mut t.0[i]).collect();
            forward::forward_batch(&s.backend, &s.weights, sub, &mut per, o)
        })
    }

    fn host_weights(&self) -> &dyn std::any::Any {
        &*self.host
    }

    fn weight_bytes(&self) -> (usize, usize) {
        (self.host.non_expert_bytes(), self.host.expert_bytes())
    }

    fn set_router(&mut self, layer: usize, router: &Linear) -> Result<()> {
        let at = self.stages.iter().position(|s| s.range.contains(&layer));
        let s = at.map(|i| &mut self.stages[i]).ok_or_else(|| Error::input(format!("no layer {layer}")))?;
        let local = layer - s.range.start;
        s.weights.layers[local].moe.router = s.backend.upload().mat(router)?;
        Ok(())
    }

    fn tier(&self) -> Option<TierInfo> {
        let tiers: Vec<TierInfo> = self.stages.iter().filter_map(|s| s.backend.tier()).collect();
        match &tiers[..] {
            [] => None,
            [t] if self.stages.len() == 1 => Some(t.clone()),
            _ => Some(TierInfo {
                description: self.describe(),
                device: tiers.iter().map(|t| t.device.as_str()).collect::<Vec<_>>().join(" + "),
                slots: tiers.iter().map(|t| t.slots).sum(),
                slot_bytes: tiers.iter().map(|t| t.slot_bytes).max().unwrap_or(0),
                total_experts: tiers.iter().map(|t| t.total_experts).sum(),
                counters: tiers.iter().fold(TierCounters::default(), |a, t| a.plus(&t.counters)),
            }),
        }
    }

    fn stage_tiers(&self) -> Vec<(std::ops::Range<usize>, TierInfo)> {
        self.stages.iter().filter_map(|s| s.backend.tier().map(|t| (s.range.clone(), t))).collect()
    }

    fn preload_experts(&self, fetch_chunk: usize) -> Result<usize> {
        let mut n = 0;
        for s in &self.stages {
            let sets: Vec<&<B::T as Tensors>::Experts> = s.weights.layers.iter().map(|l| &l.moe.experts).collect();
            n += s.backend.preload_experts(&sets, fetch_chunk)?;
        }
        Ok(n)
    }

    fn measure_bandwidths(&self) -> Result<Option<Bandwidths>> {
        self.stages[0].backend.measure_bandwidths()
    }

    fn prewarm_room(&self) -> usize {
        self.stages.iter().map(|s| s.backend.prewarm_room()).sum()
    }

    fn accept_prewarm(&self, rx: crate::models::PrewarmRx, store: std::sync::Arc<crate::experts::ExpertStore>) {
        if let [s] = &self.stages[..] {
            return s.backend.accept_prewarm(rx, store);
        }
        // One feed per stage with room; a thread sorts the experts by layer. An expert whose
        // stage is full (its feed closed) or has no room goes to the RAM tier, scored at its
        // profiled rate (the reader never sees a refusal here, so it cannot do that itself).
        let mut feeds = Vec::new();
        for s in &self.stages {
            if s.backend.prewarm_room() > 0 {
                let (tx, srx) = std::sync::mpsc::sync_channel(8);
                s.backend.accept_prewarm(srx, store.clone());
                feeds.push((s.range.clone(), tx));
            }
        }
        let spawned = std::thread::Builder::new().name("prewarm-split".into()).spawn(move || {
            for item in rx {
                let layer = (item.0).0 as usize;
                let refused = match feeds.iter().find(|(r, _)| r.contains(&layer)) {
                    Some((_, tx)) => tx.send(item).err().map(|e| e.0),
                    None => Some(item),
                };
                if let Some(((l, e), buf, rate)) = refused {
                    store.admit_shared(l as usize, e as usize, buf, Some(rate));
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("GPU pre-warm not started: {e}");
        }
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
