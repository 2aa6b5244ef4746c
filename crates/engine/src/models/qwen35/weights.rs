//! Builds the Qwen3.5-MoE / Qwen3-Next weight structure from a checkpoint folder, whatever its
//! naming: HF ConditionalGeneration (`model.language_model.*`), flat HF (`model.*`), or MLX
//! (`language_model.model.*` or `model.*`, experts as `switch_mlp`, affine-quantized).
//! Nothing large is copied: matrices are views into the mapped files.

use crate::config::{LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::{ExpertSet, ExpertStore, ExpertWeights};
use crate::layers::{AttentionWeights, Convert, DeltaNetWeights, Host, MlpWeights, MoeWeights, Tensors};
use crate::weights::{Linear, RawTensor, TensorStore};
use std::sync::Arc;

/// Where the checkpoint came from decides one numeric detail: HF stores zero-centred norm weights
/// w (the model multiplies by 1+w), MLX conversions store 1+w already (spec §3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    HuggingFace,
    Mlx,
    /// Our packed format (`flashmoe convert`): norms are stored as effective multipliers.
    Packed,
    /// A GGUF file (llama.cpp's converter): norms stored as 1 + w, block-quantized matrices.
    Gguf,
}

/// A layer's token mixer.
pub enum Mixer<T: Tensors = Host> {
    Attention(AttentionWeights<T>),
    DeltaNet(DeltaNetWeights<T>),
}

pub struct LayerWeights<T: Tensors = Host> {
    pub input_norm: T::Vec,
    pub post_attention_norm: T::Vec,
    pub mixer: Mixer<T>,
    pub moe: MoeWeights<T>,
}

/// The whole weight tree, generic over where its tensors live: [`Host`] as loaded from a
/// checkpoint, or a backend's device tensors after [`ModelWeights::map`].
pub struct ModelWeights<T: Tensors = Host> {
    pub format: SourceFormat,
    pub embed: T::Mat,
    pub layers: Vec<LayerWeights<T>>,
    pub final_norm: T::Vec,
    pub lm_head: T::Mat,
    /// RoPE inverse frequencies, 1 / theta^(2i/rot) in f32 as HF computes them.
    pub inv_freq: T::Vec,
}

/// What one backend holds of the tree: a contiguous range of layers (all of them unless the
/// model is split over several devices), the embedding when the range starts at the first
/// layer, the final norm and lm_head when it ends at the last.
pub struct StageWeights<T: Tensors> {
    /// The model's index of `layers[0]`.
    pub first_layer: usize,
    pub embed: Option<T::Mat>,
    pub layers: Vec<LayerWeights<T>>,
    pub final_norm: Option<T::Vec>,
    pub lm_head: Option<T::Mat>,
    /// RoPE inverse frequencies, 1 / theta^(2i/rot) in f32 as HF computes them.
    pub inv_freq: T::Vec,
}

impl<From: Tensors> ModelWeights<From> {
    /// Layers `range` (with the embedding or the head when the range reaches an end) with every
    /// tensor converted: a backend's upload.
    pub fn map_stage<To: Tensors>(
        &self,
        range: std::ops::Range<usize>,
        c: &impl Convert<From, To>,
    ) -> Result<StageWeights<To>> {
        let n = self.layers.len();
        if range.start >= range.end || range.end > n {
            return Err(Error::input(format!("layers {range:?} of a model of {n}")));
        }
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            let l = &self.layers[i];
            layers.push(LayerWeights {
                input_norm: c.vec(&l.input_norm)?,
                post_attention_norm: c.vec(&l.post_attention_norm)?,
                mixer: match &l.mixer {
                    Mixer::Attention(a) => Mixer::Attention(a.map(c)?),
                    Mixer::DeltaNet(d) => Mixer::DeltaNet(d.map(c)?),
                },
                moe: l.moe.map(i, c)?,
            });
        }
        let last = range.end == n;
        Ok(StageWeights {
            first_layer: range.start,
            embed: if range.start == 0 { Some(c.mat(&self.embed)?) } else { None },
            layers,
            final_norm: if last { Some(c.vec(&self.final_norm)?) } else { None },
            lm_head: if last { Some(c.mat(&self.lm_head)?) } else { None },
            inv_freq: c.vec(&self.inv_freq)?,
        })
    }
}

struct Loader<'a> {
    store: &'a TensorStore,
    cfg: &'a ModelConfig,
    format: SourceFormat,
    experts: Option<Arc<ExpertStore>>,
}

impl ModelWeights<Host> {
    /// Bytes of layer `i`'s tensors: (everything but the routed experts, the routed experts).
    pub fn layer_bytes(&self, i: usize) -> (usize, usize) {
        let l = &self.layers[i];
        let mixer = match &l.mixer {
            Mixer::Attention(a) => a.q_proj.bytes() + a.k_proj.bytes() + a.v_proj.bytes() + a.o_proj.bytes(),
            Mixer::DeltaNet(d) => {
                d.in_qkv.bytes() + d.in_z.bytes() + d.in_a.bytes() + d.in_b.bytes() + d.out_proj.bytes()
            }
        };
        let moe = l.moe.router.bytes()
            + l.moe.shared.gate.bytes()
            + l.moe.shared.up.bytes()
            + l.moe.shared.down.bytes()
            + l.moe.shared_gate.bytes();
        (mixer + moe, l.moe.experts.bytes())
    }

    pub fn load(store: &TensorStore, cfg: &ModelConfig) -> Result<Self> {
        Self::load_with_experts(store, cfg, None)
    }

    /// Like `load`, with the routed experts served by `experts` instead of the tensor store.
    pub fn load_with_experts(
        store: &TensorStore,
        cfg: &ModelConfig,
        experts: Option<Arc<ExpertStore>>,
    ) -> Result<Self> {
        const ROOTS: [&str; 3] = ["model.language_model.", "language_model.model.", "model."];
        let root = ROOTS.iter().find(|r| store.contains(&format!("{r}embed_tokens.weight"))).ok_or_else(|| {
            Error::file(
                &store.dir,
                format!(
                    "no embedding tensor found (looked for {}) in {}",
                    ROOTS.map(|r| format!("`{r}embed_tokens.weight`")).join(", "),
                    store.describe_location()
                ),
            )
        })?;
        let mlx = *root == "language_model.model."
            || cfg.quantization.is_some()
            || store.names().any(|n| n.contains(".switch_mlp.") || n.ends_with(".scales"));
        let format = if store.is_packed() {
            SourceFormat::Packed
        } else if mlx {
            SourceFormat::Mlx
        } else {
            SourceFormat::HuggingFace
        };
        let l = Loader { store, cfg, format, experts };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);

        let embed = l.linear(&format!("{root}embed_tokens"), &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            let head = ["lm_head", "language_model.lm_head"]
                .into_iter()
                .find(|p| store.contains(&format!("{p}.weight")))
                .ok_or_else(|| {
                    Error::file(
                        &store.dir,
                        format!(
                            "tensor `lm_head.weight` not found in {} (and tie_word_embeddings is false)",
                            store.describe_location()
                        ),
                    )
                })?;
            l.linear(head, &[v, h])?
        };
        // A checkpoint with more layers than config.json names would otherwise run fewer, quietly.
        let layer_prefix = format!("{root}layers.");
        let deepest =
            store.names().filter_map(|n| n.strip_prefix(&layer_prefix)?.split('.').next()?.parse::<usize>().ok()).max();
        if let Some(d) = deepest
            && d >= cfg.num_layers
        {
            return Err(Error::file(
                &store.dir,
                format!(
                    "the checkpoint has tensors of layer {d} but config.json's num_hidden_layers is {} ({})",
                    cfg.num_layers,
                    store.describe_location()
                ),
            ));
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(l.layer(&format!("{root}layers.{i}."), cfg.layer_kinds[i])?);
        }
        let final_norm = l.norm(&format!("{root}norm"), h, true)?;
        let rot = cfg.rotary_dims();
        let inv_freq =
            (0..rot / 2).map(|i| 1.0f32 / (cfg.rope_theta as f32).powf((2 * i) as f32 / rot as f32)).collect();
        Ok(ModelWeights { format, embed, layers, final_norm, lm_head, inv_freq })
    }

    /// Bytes of everything but the routed experts (what stays resident when experts stream).
    pub fn non_expert_bytes(&self) -> usize {
        self.embed.bytes() + self.lm_head.bytes() + (0..self.layers.len()).map(|i| self.layer_bytes(i).0).sum::<usize>()
    }

    pub fn expert_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.moe.experts.bytes()).sum()
    }
}

impl Loader<'_> {
    fn tensor(&self, name: &str) -> Result<&RawTensor> {
        self.store.get(name).ok_or_else(|| {
            Error::file(&self.store.dir, format!("tensor `{name}` not found in {}", self.store.describe_location()))
        })
    }

    /// A matrix of logical shape `shape` = [.., out, in] stored under `base` (+ `.weight`, and
    /// `.scales`/`.biases` when quantized). Leading dims (experts) are folded into rows.
    fn linear(&self, base: &str, shape: &[usize]) -> Result<Linear> {
        let wname = format!("{base}.weight");
        let name = if !self.store.contains(&wname) && self.store.contains(base) { base.to_string() } else { wname };
        self.linear_named(&name, base, shape)
    }

    fn linear_named(&self, wname: &str, base: &str, shape: &[usize]) -> Result<Linear> {
        let w = self.tensor(wname)?;
        let cols = *shape.last().unwrap();
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let sname = format!("{base}.scales");
        if let Some(s) = self.store.get(&sname) {
            let b = self.tensor(&format!("{base}.biases"))?;
            let lead = &shape[..shape.len() - 1];
            if w.shape.len() != shape.len() || &w.shape[..lead.len()] != lead {
                return Err(w.err(format!(
                    "shape {:?} does not match the expected [{}, {cols}·bits/32]",
                    w.shape,
                    fmt_dims(lead)
                )));
            }
            if s.shape.len() != shape.len() || &s.shape[..lead.len()] != lead || b.shape != s.shape {
                return Err(
                    s.err(format!("scales {:?} / biases {:?} do not match weight {:?}", s.shape, b.shape, w.shape))
                );
            }
            let (wc, sc) = (*w.shape.last().unwrap(), *s.shape.last().unwrap());
            // bits = 32·packed_cols / cols and group = cols / scale_cols, from the shapes alone.
            if sc == 0 || !cols.is_multiple_of(sc) || !(wc * 32).is_multiple_of(cols) {
                return Err(w.err(format!(
                    "cannot infer quantization: {cols} input columns, {wc} packed words, {sc} groups per row"
                )));
            }
            let bits = (wc * 32 / cols) as u32;
            let group = cols / sc;
            if let Some(q) = &self.cfg.quantization {
                let expect = q.overrides.get(base).copied().or(match (q.group_size, q.bits) {
                    (Some(g), Some(b)) => Some((g, b)),
                    _ => None,
                });
                if let Some((g, b)) = expect
                    && (g, b) != (group, bits)
                    && q.overrides.contains_key(base)
                {
                    return Err(w.err(format!(
                        "config.json quantization says {b} bits / group {g}, but the tensor shapes give {bits} bits / group {group}"
                    )));
                }
            }
            if ![2, 3, 4, 5, 6, 8].contains(&bits) {
                return Err(w.err(format!("inferred {bits}-bit quantization, which is not supported")));
            }
            return Linear::affine(w, s, b, bits, group, rows, cols);
        }
        if w.shape != shape {
            return Err(w.err(format!("shape {:?}, expected [{}]", w.shape, fmt_dims(shape))));
        }
        Linear::float(w, rows, cols)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        if t.numel() != len || t.shape.iter().filter(|&&d| d != 1).count() > 1 {
            return Err(t.err(format!("shape {:?}, expected [{len}]", t.shape)));
        }
        t.to_f32_vec()
    }

    fn norm(&self, base: &str, len: usize, zero_centred: bool) -> Result<Vec<f32>> {
        let mut w = self.vector(&format!("{base}.weight"), len)?;
        if zero_centred && self.format == SourceFormat::HuggingFace {
            for x in &mut w {
                *x += 1.0;
            }
        }
        Ok(w)
    }

    fn layer(&self, p: &str, kind: LayerKind) -> Result<LayerWeights<Host>> {
        let c = self.cfg;
        let h = c.hidden_size;
        let mixer = match kind {
            LayerKind::FullAttention => {
                let a = format!("{p}self_attn.");
                let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
                Mixer::Attention(AttentionWeights {
                    q_proj: self.linear(&format!("{a}q_proj"), &[2 * nh * d, h])?,
                    k_proj: self.linear(&format!("{a}k_proj"), &[nkv * d, h])?,
                    v_proj: self.linear(&format!("{a}v_proj"), &[nkv * d, h])?,
                    o_proj: self.linear(&format!("{a}o_proj"), &[h, nh * d])?,
                    q_norm: self.norm(&format!("{a}q_norm"), d, true)?,
                    k_norm: self.norm(&format!("{a}k_norm"), d, true)?,
                })
            }
            LayerKind::LinearAttention => Mixer::DeltaNet(self.delta_net(&format!("{p}linear_attn."))?),
        };
        Ok(LayerWeights {
            input_norm: self.norm(&format!("{p}input_layernorm"), h, true)?,
            post_attention_norm: self.norm(&format!("{p}post_attention_layernorm"), h, true)?,
            mixer,
            moe: self.moe(&format!("{p}mlp."))?,
        })
    }

    fn delta_net(&self, a: &str) -> Result<DeltaNetWeights<Host>> {
        let c = self.cfg;
        let h = c.hidden_size;
        let (hk, hv, dk, dv) = (c.linear_key_heads, c.linear_value_heads, c.linear_key_dim, c.linear_value_dim);
        let (key_dim, value_dim, conv_dim) = (c.key_dim(), c.value_dim(), c.conv_dim());
        let (in_qkv, in_z, in_b, in_a) = if self.store.contains(&format!("{a}in_proj_qkvz.weight")) {
            // Qwen3-Next: rows grouped by key head g: [q_g (Dk), k_g (Dk), v_g (r·Dv), z_g (r·Dv)],
            // and in_proj_ba as [b_g (r), a_g (r)]. Regroup into the Qwen3.5 order by row views.
            let r = hv / hk;
            let group = 2 * dk + 2 * r * dv;
            let qkvz = self.linear(&format!("{a}in_proj_qkvz"), &[hk * group, h])?;
            let ba = self.linear(&format!("{a}in_proj_ba"), &[2 * hv, h])?;
            let pick = |m: &Linear, stride: usize, off: usize, len: usize| -> Vec<Linear> {
                (0..hk).map(|g| m.select_rows(g * stride + off, len)).collect()
            };
            let mut qkv = pick(&qkvz, group, 0, dk);
            qkv.extend(pick(&qkvz, group, dk, dk));
            qkv.extend(pick(&qkvz, group, 2 * dk, r * dv));
            (
                Linear::concat_rows(&qkv),
                Linear::concat_rows(&pick(&qkvz, group, 2 * dk + r * dv, r * dv)),
                Linear::concat_rows(&pick(&ba, 2 * r, 0, r)),
                Linear::concat_rows(&pick(&ba, 2 * r, r, r)),
            )
        } else {
            (
                self.linear(&format!("{a}in_proj_qkv"), &[conv_dim, h])?,
                self.linear(&format!("{a}in_proj_z"), &[value_dim, h])?,
                self.linear(&format!("{a}in_proj_b"), &[hv, h])?,
                self.linear(&format!("{a}in_proj_a"), &[hv, h])?,
            )
        };
        let _ = key_dim;
        let conv_t = self.tensor(&format!("{a}conv1d.weight"))?;
        let k = c.conv_kernel;
        // HF stores [C, 1, Kc], MLX [C, Kc, 1]: the same flat order.
        if conv_t.shape != [conv_dim, 1, k] && conv_t.shape != [conv_dim, k, 1] && conv_t.shape != [conv_dim, k] {
            return Err(
                conv_t.err(format!("shape {:?}, expected [{conv_dim}, 1, {k}] or [{conv_dim}, {k}, 1]", conv_t.shape))
            );
        }
        let conv = conv_t.to_f32_vec()?;
        let a_log = self.vector(&format!("{a}A_log"), hv)?;
        Ok(DeltaNetWeights {
            in_qkv,
            in_z,
            in_b,
            in_a,
            out_proj: self.linear(&format!("{a}out_proj"), &[h, value_dim])?,
            conv,
            dt_bias: self.vector(&format!("{a}dt_bias"), hv)?,
            neg_a: a_log.iter().map(|x| -x.exp()).collect(),
            a_log,
            norm: self.norm(&format!("{a}norm"), dv, false)?,
            value_heads_tiled: false,
        })
    }

    fn moe(&self, m: &str) -> Result<MoeWeights<Host>> {
        let c = self.cfg;
        let (h, e, i, is) = (c.hidden_size, c.num_experts, c.moe_intermediate, c.shared_intermediate);
        let experts = if let Some(store) = &self.experts {
            let layer: usize = m
                .trim_end_matches(".mlp.")
                .rsplit('.')
                .next()
                .and_then(|x| x.parse().ok())
                .expect("layer prefix ends in its index");
            ExpertSet::Streamed { store: store.clone(), layer }
        } else if self.store.contains(&format!("{m}experts.gate_up_proj")) {
            // HF fused: gate_up [E, 2I, H] (gate = first I rows of each expert), down [E, H, I].
            let gu = self.linear(&format!("{m}experts.gate_up_proj"), &[e, 2 * i, h])?;
            let down = self.linear(&format!("{m}experts.down_proj"), &[e, h, i])?;
            let v: Vec<ExpertWeights> = (0..e)
                .map(|x| ExpertWeights {
                    gate: gu.select_rows(x * 2 * i, i),
                    up: gu.select_rows(x * 2 * i + i, i),
                    down: down.select_rows(x * h, h),
                })
                .collect();
            ExpertSet::Resident(v)
        } else if self.store.contains(&format!("{m}switch_mlp.gate_proj.weight")) {
            let g = self.linear(&format!("{m}switch_mlp.gate_proj"), &[e, i, h])?;
            let u = self.linear(&format!("{m}switch_mlp.up_proj"), &[e, i, h])?;
            let d = self.linear(&format!("{m}switch_mlp.down_proj"), &[e, h, i])?;
            let v: Vec<ExpertWeights> = (0..e)
                .map(|x| ExpertWeights {
                    gate: g.select_rows(x * i, i),
                    up: u.select_rows(x * i, i),
                    down: d.select_rows(x * h, h),
                })
                .collect();
            ExpertSet::Resident(v)
        } else if self.store.contains(&format!("{m}experts.0.gate_proj.weight")) {
            let v: Vec<ExpertWeights> = (0..e)
                .map(|x| {
                    let p = format!("{m}experts.{x}.");
                    Ok(ExpertWeights {
                        gate: self.linear(&format!("{p}gate_proj"), &[i, h])?,
                        up: self.linear(&format!("{p}up_proj"), &[i, h])?,
                        down: self.linear(&format!("{p}down_proj"), &[h, i])?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            ExpertSet::Resident(v)
        } else {
            return Err(Error::file(
                &self.store.dir,
                format!(
                    "no expert tensors for `{m}` (looked for experts.gate_up_proj, switch_mlp.gate_proj.weight, experts.0.gate_proj.weight) in {}",
                    self.store.describe_location()
                ),
            ));
        };
        let s = format!("{m}shared_expert.");
        Ok(MoeWeights {
            router: self.linear(&format!("{m}gate"), &[e, h])?,
            experts,
            shared: MlpWeights {
                gate: self.linear(&format!("{s}gate_proj"), &[is, h])?,
                up: self.linear(&format!("{s}up_proj"), &[is, h])?,
                down: self.linear(&format!("{s}down_proj"), &[h, is])?,
            },
            shared_gate: self.linear(&format!("{m}shared_expert_gate"), &[1, h])?,
        })
    }
}

fn fmt_dims(d: &[usize]) -> String {
    d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}
