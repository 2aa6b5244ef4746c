//! A GGUF model (llama.cpp's `qwen35moe` / `qwen3next`) → the same weight tree a safetensors
//! checkpoint gives. Every matrix stays a view into the mapped file, in its GGML type (the CPU
//! kernels compute with the blocks directly); only the small vectors (norms, conv kernels, gates)
//! are read into f32. The converter's layout changes (`gguf::Layout`) are undone where that is
//! free and followed where it is not:
//! - norms stored as 1 + w are used as stored (the packed format's convention);
//! - `ssm_a` holds −exp(A_log): it is `neg_a` as stored;
//! - Qwen3.5's tiled value heads are run in that order (`DeltaNetWeights::value_heads_tiled`)
//!   rather than permuted back, since `ssm_out`'s columns cannot be permuted inside quant blocks;
//! - Qwen3-Next's `ssm_ba` keeps HF's grouping, regrouped by row views as for an HF checkpoint;
//! - stacked experts [E·out, in] give each expert a row range (one contiguous byte range).
//!
//! A packed model converted from a GGUF (`packed::TensorLayout::Gguf`) holds the same tensors
//! with the same bytes, and is loaded by this same code: its tensor table is mapped as the file's
//! is ([`TensorListing`]), only its routed experts come from its expert files.

use super::weights::{LayerWeights, Mixer, ModelWeights, SourceFormat};
use crate::config::{LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::{ExpertSet, ExpertWeights};
use crate::gguf::{GgufModel, LayerExperts, Layout, MappedTensor, TensorListing, TensorMap};
use crate::layers::{AttentionWeights, DeltaNetWeights, Host, MlpWeights, MoeWeights};
use crate::weights::Linear;
use std::collections::HashMap;

/// Where the routed experts of a tree of GGUF tensors come from.
pub enum RoutedExperts {
    /// The stacked `ffn_*_exps` tensors of the map (a GGUF file): each expert a row range.
    Stacked,
    /// One set per layer, made by the caller (a converted model's expert files, mapped or
    /// streamed).
    PerLayer(Vec<ExpertSet>),
}

struct GgufLoader<'a> {
    listing: &'a dyn TensorListing,
    tensors: &'a TensorMap,
    cfg: &'a ModelConfig,
    by_name: HashMap<&'a str, &'a MappedTensor>,
}

impl<'a> GgufLoader<'a> {
    fn new(listing: &'a dyn TensorListing, tensors: &'a TensorMap, cfg: &'a ModelConfig) -> Self {
        let by_name =
            tensors.globals.iter().chain(tensors.layers.iter().flatten()).map(|t| (t.hf_name.as_str(), t)).collect();
        GgufLoader { listing, tensors, cfg, by_name }
    }

    fn tensor(&self, hf_name: &str) -> Result<&'a MappedTensor> {
        self.by_name.get(hf_name).copied().ok_or_else(|| {
            Error::file(self.listing.path(), format!("GGUF: no tensor for `{hf_name}` (llama.cpp name unknown)"))
        })
    }

    fn err(&self, t: &MappedTensor, msg: impl Into<String>) -> Error {
        Error::Tensor {
            name: t.gguf_name.clone(),
            file: self.listing.part_path(t.location.part).to_path_buf(),
            msg: msg.into(),
        }
    }

    /// A [rows, cols] matrix (leading GGUF dims folded into rows).
    fn linear(&self, hf_name: &str, rows: usize, cols: usize) -> Result<Linear> {
        let t = self.tensor(hf_name)?;
        let numel: u64 = t.dims.iter().product();
        if t.dims.first() != Some(&(cols as u64)) || numel != (rows * cols) as u64 {
            return Err(self.err(t, format!("GGUF dims {:?} do not hold a [{rows}, {cols}] matrix", t.dims)));
        }
        Linear::ggml(t.ggml_type, self.listing.bytes(t.location), rows, cols, &t.gguf_name)
    }

    /// A small tensor of `len` values as f32.
    fn vector(&self, hf_name: &str, len: usize) -> Result<(Vec<f32>, &'a MappedTensor)> {
        let t = self.tensor(hf_name)?;
        let numel: u64 = t.dims.iter().product();
        if numel != len as u64 {
            return Err(self.err(t, format!("GGUF dims {:?}, expected {len} values", t.dims)));
        }
        let mut out = vec![0.0f32; len];
        flashmoe_kernels::ggml::dequantize_row(t.ggml_type, self.listing.bytes(t.location).as_slice(), &mut out)
            .map_err(|e| self.err(t, e.to_string()))?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(self.err(t, format!("value {i} is {} (a corrupt file?)", out[i])));
        }
        Ok((out, t))
    }

    /// Layer `i`; its routed experts are `experts`, or the map's stacked ones when None.
    fn layer(&self, i: usize, kind: LayerKind, experts: Option<ExpertSet>) -> Result<LayerWeights<Host>> {
        let c = self.cfg;
        let h = c.hidden_size;
        let p = format!("model.layers.{i}.");
        let mixer = match kind {
            LayerKind::FullAttention => {
                let a = format!("{p}self_attn.");
                let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
                Mixer::Attention(AttentionWeights {
                    q_proj: self.linear(&format!("{a}q_proj.weight"), 2 * nh * d, h)?,
                    k_proj: self.linear(&format!("{a}k_proj.weight"), nkv * d, h)?,
                    v_proj: self.linear(&format!("{a}v_proj.weight"), nkv * d, h)?,
                    o_proj: self.linear(&format!("{a}o_proj.weight"), h, nh * d)?,
                    q_norm: self.vector(&format!("{a}q_norm.weight"), d)?.0,
                    k_norm: self.vector(&format!("{a}k_norm.weight"), d)?.0,
                })
            }
            LayerKind::LinearAttention => Mixer::DeltaNet(self.delta_net(&format!("{p}linear_attn."))?),
        };
        Ok(LayerWeights {
            input_norm: self.vector(&format!("{p}input_layernorm.weight"), h)?.0,
            post_attention_norm: self.vector(&format!("{p}post_attention_layernorm.weight"), h)?.0,
            mixer,
            moe: self.moe(i, &format!("{p}mlp."), experts)?,
        })
    }

    fn delta_net(&self, a: &str) -> Result<DeltaNetWeights<Host>> {
        let c = self.cfg;
        let h = c.hidden_size;
        let (hk, hv) = (c.linear_key_heads, c.linear_value_heads);
        let in_qkv_name = format!("{a}in_proj_qkv.weight");
        let tiled = self.tensor(&in_qkv_name)?.layout.iter().any(|l| matches!(l, Layout::ValueHeadsTiled { .. }));
        let (in_b, in_a) = if self.by_name.contains_key(format!("{a}in_proj_ba.weight").as_str()) {
            // Qwen3-Next: rows grouped by key head g as [b_g (r rows), a_g (r rows)].
            let r = hv / hk;
            let ba = self.linear(&format!("{a}in_proj_ba.weight"), 2 * hv, h)?;
            let pick = |off: usize| -> Vec<Linear> { (0..hk).map(|g| ba.select_rows(g * 2 * r + off, r)).collect() };
            (Linear::concat_rows(&pick(0)), Linear::concat_rows(&pick(r)))
        } else {
            (self.linear(&format!("{a}in_proj_b.weight"), hv, h)?, self.linear(&format!("{a}in_proj_a.weight"), hv, h)?)
        };
        // ConvChannelsByKernel: GGUF [Kc, C] is HF's [C, 1, Kc] in memory.
        let (conv, _) = self.vector(&format!("{a}conv1d.weight"), c.conv_dim() * c.conv_kernel)?;
        let (neg_a, a_t) = self.vector(&format!("{a}A_log"), hv)?;
        if !a_t.layout.contains(&Layout::NegExpALog) {
            return Err(self.err(a_t, "expected −exp(A_log) (llama.cpp's `ssm_a`)"));
        }
        if let Some(v) = neg_a.iter().find(|v| **v >= 0.0) {
            return Err(self.err(a_t, format!("holds {v}, but −exp(A_log) is always negative")));
        }
        Ok(DeltaNetWeights {
            in_qkv: self.linear(&in_qkv_name, c.conv_dim(), h)?,
            in_z: self.linear(&format!("{a}in_proj_z.weight"), c.value_dim(), h)?,
            in_b,
            in_a,
            out_proj: self.linear(&format!("{a}out_proj.weight"), h, c.value_dim())?,
            conv,
            dt_bias: self.vector(&format!("{a}dt_bias"), hv)?.0,
            a_log: neg_a.iter().map(|v| (-v).ln()).collect(),
            neg_a,
            norm: self.vector(&format!("{a}norm.weight"), c.linear_value_dim)?.0,
            value_heads_tiled: tiled,
        })
    }

    fn moe(&self, layer: usize, m: &str, experts: Option<ExpertSet>) -> Result<MoeWeights<Host>> {
        let c = self.cfg;
        let (h, e, is) = (c.hidden_size, c.num_experts, c.shared_intermediate);
        let experts = match experts {
            Some(given) => given,
            None => ExpertSet::Resident(self.stacked_experts(layer, m)?),
        };
        let s = format!("{m}shared_expert.");
        Ok(MoeWeights {
            router: self.linear(&format!("{m}gate.weight"), e, h)?,
            experts,
            shared: MlpWeights {
                gate: self.linear(&format!("{s}gate_proj.weight"), is, h)?,
                up: self.linear(&format!("{s}up_proj.weight"), is, h)?,
                down: self.linear(&format!("{s}down_proj.weight"), h, is)?,
            },
            shared_gate: self.linear(&format!("{m}shared_expert_gate.weight"), 1, h)?,
        })
    }

    /// Every expert of layer `layer` as row ranges of its stacked tensors.
    fn stacked_experts(&self, layer: usize, m: &str) -> Result<Vec<ExpertWeights>> {
        let c = self.cfg;
        let (h, e, i) = (c.hidden_size, c.num_experts, c.moe_intermediate);
        let stacked = self
            .tensors
            .experts
            .get(layer)
            .ok_or_else(|| Error::file(self.listing.path(), format!("layer {layer}: no stacked expert tensors")))?;
        Ok(match stacked {
            LayerExperts::Separate { .. } => {
                let g = self.linear(&format!("{m}switch_mlp.gate_proj.weight"), e * i, h)?;
                let u = self.linear(&format!("{m}switch_mlp.up_proj.weight"), e * i, h)?;
                let d = self.linear(&format!("{m}switch_mlp.down_proj.weight"), e * h, i)?;
                (0..e)
                    .map(|x| ExpertWeights {
                        gate: g.select_rows(x * i, i),
                        up: u.select_rows(x * i, i),
                        down: d.select_rows(x * h, h),
                    })
                    .collect()
            }
            LayerExperts::FusedGateUp { .. } => {
                let gu = self.linear(&format!("{m}experts.gate_up_proj"), e * 2 * i, h)?;
                let d = self.linear(&format!("{m}switch_mlp.down_proj.weight"), e * h, i)?;
                (0..e)
                    .map(|x| ExpertWeights {
                        gate: gu.select_rows(x * 2 * i, i),
                        up: gu.select_rows(x * 2 * i + i, i),
                        down: d.select_rows(x * h, h),
                    })
                    .collect()
            }
        })
    }
}

impl ModelWeights<Host> {
    /// The weight tree of a GGUF model, every expert resident (views into the file); the caller
    /// moves them behind an expert store to stream them.
    pub fn load_gguf(model: &GgufModel) -> Result<Self> {
        Self::load_ggml(&model.parts, &model.tensors, &model.config, RoutedExperts::Stacked, SourceFormat::Gguf)
    }

    /// The weight tree of GGUF tensors mapped from `listing` (`tensors`, made by
    /// `gguf::tensors::map_tensors`): a GGUF file's, or a packed model's converted from one.
    pub fn load_ggml(
        listing: &dyn TensorListing,
        tensors: &TensorMap,
        config: &ModelConfig,
        experts: RoutedExperts,
        format: SourceFormat,
    ) -> Result<Self> {
        let l = GgufLoader::new(listing, tensors, config);
        let c = l.cfg;
        let mut given = match experts {
            RoutedExperts::Stacked => None,
            RoutedExperts::PerLayer(sets) if sets.len() == c.num_layers => Some(sets.into_iter()),
            RoutedExperts::PerLayer(sets) => {
                return Err(Error::file(
                    listing.path(),
                    format!("expert sets for {} layers, the model has {}", sets.len(), c.num_layers),
                ));
            }
        };
        let (h, v) = (c.hidden_size, c.vocab_size);
        let embed = l.linear("model.embed_tokens.weight", v, h)?;
        let lm_head = if c.tie_word_embeddings { embed.clone() } else { l.linear("lm_head.weight", v, h)? };
        let mut layers = Vec::with_capacity(c.num_layers);
        for (i, kind) in c.layer_kinds.iter().enumerate() {
            layers.push(l.layer(i, *kind, given.as_mut().and_then(Iterator::next))?);
        }
        let final_norm = l.vector("model.norm.weight", h)?.0;
        let rot = c.rotary_dims();
        let inv_freq = (0..rot / 2).map(|i| 1.0f32 / (c.rope_theta as f32).powf((2 * i) as f32 / rot as f32)).collect();
        Ok(ModelWeights { format, embed, layers, final_norm, lm_head, inv_freq })
    }
}
