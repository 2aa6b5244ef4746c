//! GGUF tensor names → the tensors of our weight tree, with the layout llama.cpp's converter gave
//! them (spec §2.4; conversion/qwen.py `Qwen3NextModel.modify_tensors`,
//! `_LinearAttentionVReorderBase`), and the byte range of every routed expert.
//!
//! Names on the right are the flat HF ones (`model.layers.{i}.…`, as Qwen3-Next checkpoints and
//! `qwen3_5_moe_text` use; ConditionalGeneration checkpoints put the same names under
//! `model.language_model.`). Stacked experts map to the `switch_mlp` names our loader already
//! reads for MLX checkpoints, whose [E, out, in] layout is the GGUF one. MTP blocks
//! (`blk.{L..}`, after the main layers) map to `mtp.*`.

use super::reader::TensorInfo;
use super::split::GgufParts;
use super::types::GgmlType;
use crate::config::{Family, LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::store::Bytes;
use std::path::Path;

/// The tensors a [`TensorMap`] is made from, named and shaped as llama.cpp's converter writes
/// them: a GGUF model's parts, or the tensor table of a packed model converted from one (whose
/// routed experts live in its expert files instead). One mapping for both is what makes the two
/// load into the same weight tree.
pub trait TensorListing {
    /// The file that errors about the model as a whole name.
    fn path(&self) -> &Path;
    /// The file of part `part`.
    fn part_path(&self, part: usize) -> &Path;
    /// Every tensor with its part, in storage order.
    fn tensors(&self) -> Box<dyn Iterator<Item = (usize, &TensorInfo)> + '_>;
    fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)>;
    /// The bytes at `loc` (a tensor's [`Location`] in this listing), kept mapped.
    fn bytes(&self, loc: Location) -> Bytes;
    /// Whether the routed experts are stacked tensors of this listing (`ffn_*_exps`, as in a
    /// GGUF file). When false none may be listed, and [`TensorMap::experts`] is empty.
    fn has_stacked_experts(&self) -> bool;
}

impl TensorListing for GgufParts {
    fn path(&self) -> &Path {
        GgufParts::path(self)
    }
    fn part_path(&self, part: usize) -> &Path {
        &self.parts[part].path
    }
    fn tensors(&self) -> Box<dyn Iterator<Item = (usize, &TensorInfo)> + '_> {
        Box::new(GgufParts::tensors(self))
    }
    fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        GgufParts::tensor(self, name)
    }
    fn bytes(&self, loc: Location) -> Bytes {
        self.parts[loc.part].range(loc.start, loc.len)
    }
    fn has_stacked_experts(&self) -> bool {
        true
    }
}

/// A transformation the converter applied that a loader must undo or respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Stored 1 + w for HF's zero-centred w (use the stored value as the multiplier directly).
    NormPlusOne,
    /// Value heads reordered from HF's grouped order (value head h belongs to key head h div r)
    /// to tiled order (h belongs to key head h mod Hk), along `axis`, for the span after the first
    /// `skip` rows/columns, in blocks of `head_width`. Qwen3.5 only, and only when Hv ≠ Hk.
    ValueHeadsTiled { axis: Axis, skip: u64, head_width: u64 },
    /// `ssm_a` holds −exp(A_log), not A_log.
    NegExpALog,
    /// The depthwise conv weight as GGUF dims [Kc, C]: flat index c·Kc + j, the same memory order
    /// as HF's [C, 1, Kc].
    ConvChannelsByKernel,
    /// Qwen3-Next `ssm_ba` = HF `in_proj_ba` unchanged: rows grouped by key head, [b for the r
    /// value heads of the group; a for the same heads].
    GroupedBetaAlpha,
    /// Experts stacked as GGUF dims [in, out, E]: expert e is rows e·out..(e+1)·out of the
    /// [E·out, in] matrix, one contiguous byte range (see [`ExpertSlice`]).
    StackedExperts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Rows,
    Columns,
}

/// Where a tensor's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index of the split part (0 for a single file).
    pub part: usize,
    /// Absolute byte offset in that part.
    pub start: u64,
    pub len: u64,
}

/// One GGUF tensor and what it is in our weight tree.
#[derive(Clone, Debug, PartialEq)]
pub struct MappedTensor {
    pub gguf_name: String,
    pub hf_name: String,
    pub ggml_type: GgmlType,
    /// GGUF order (ne0 first).
    pub dims: Vec<u64>,
    pub location: Location,
    pub layout: Vec<Layout>,
}

/// One projection of one layer's routed experts, stacked.
///
/// GGUF stores ne = [in, out, E] with ne0 fastest, so the bytes are E blocks of `out` rows of
/// `row_bytes` each: expert e's rows e·out..(e+1)·out are the contiguous range
/// `first + e·stride .. first + (e+1)·stride` with stride = out·row_bytes. Quantized blocks never
/// straddle experts because a block lies within one row (in is a whole number of blocks).
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertSlice {
    pub tensor: String,
    pub ggml_type: GgmlType,
    pub part: usize,
    /// Output rows per expert.
    pub rows: u64,
    /// Input elements per row.
    pub cols: u64,
    /// Absolute offset of expert 0 in the part.
    pub first: u64,
    /// Bytes per expert.
    pub stride: u64,
    pub experts: u64,
}

impl ExpertSlice {
    /// Byte range of expert `e`: (part, absolute start, length).
    pub fn range(&self, e: u64) -> Location {
        assert!(e < self.experts, "expert {e} of {}", self.experts);
        Location { part: self.part, start: self.first + e * self.stride, len: self.stride }
    }
}

/// The routed experts of one layer.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerExperts {
    /// `ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps` (what the qwen35moe/qwen3next converters write).
    Separate { gate: ExpertSlice, up: ExpertSlice, down: ExpertSlice },
    /// `ffn_gate_up_exps` (gate rows then up rows per expert, as HF `gate_up_proj`) and `ffn_down_exps`.
    FusedGateUp { gate_up: ExpertSlice, down: ExpertSlice },
}

impl LayerExperts {
    /// Bytes one expert of this layer reads from disk, all projections together.
    pub fn bytes_per_expert(&self) -> u64 {
        match self {
            LayerExperts::Separate { gate, up, down } => gate.stride + up.stride + down.stride,
            LayerExperts::FusedGateUp { gate_up, down } => gate_up.stride + down.stride,
        }
    }

    /// The byte ranges of expert `e`, one per projection, in the order gate, up, down (or
    /// gate_up, down).
    pub fn ranges(&self, e: u64) -> Vec<Location> {
        match self {
            LayerExperts::Separate { gate, up, down } => vec![gate.range(e), up.range(e), down.range(e)],
            LayerExperts::FusedGateUp { gate_up, down } => vec![gate_up.range(e), down.range(e)],
        }
    }
}

/// Every tensor of the model, mapped.
#[derive(Clone, Debug)]
pub struct TensorMap {
    /// Embedding, final norm, lm_head.
    pub globals: Vec<MappedTensor>,
    /// Per main layer: its non-expert tensors (expert tensors included, with their whole range).
    pub layers: Vec<Vec<MappedTensor>>,
    /// Per main layer, its stacked routed experts (empty when the listing stores experts
    /// elsewhere: [`TensorListing::has_stacked_experts`]).
    pub experts: Vec<LayerExperts>,
    /// MTP blocks' tensors (not used by the forward pass).
    pub mtp: Vec<MappedTensor>,
}

struct Dims {
    h: u64,
    v: u64,
    q: u64,
    kv: u64,
    o: u64,
    d: u64,
    conv: u64,
    key_dim: u64,
    value_dim: u64,
    hv: u64,
    dv: u64,
    kc: u64,
    e: u64,
    i: u64,
    is: u64,
}

/// A layer tensor's name (after `blk.N.`): the HF name (after the layer prefix), expected GGUF
/// dims, and layout facts.
fn layer_entry(
    suffix: &str,
    family: Family,
    kind: Option<LayerKind>,
    d: &Dims,
    tiled: bool,
) -> Option<(&'static str, Vec<u64>, Vec<Layout>)> {
    let tile = |axis, skip, head_width| {
        if tiled { vec![Layout::ValueHeadsTiled { axis, skip, head_width }] } else { vec![] }
    };
    let full = kind != Some(LayerKind::LinearAttention);
    let linear = kind != Some(LayerKind::FullAttention);
    Some(match suffix {
        "attn_norm.weight" => ("input_layernorm.weight", vec![d.h], vec![Layout::NormPlusOne]),
        "post_attention_norm.weight" => ("post_attention_layernorm.weight", vec![d.h], vec![Layout::NormPlusOne]),
        "attn_q.weight" if full => ("self_attn.q_proj.weight", vec![d.h, d.q], vec![]),
        "attn_k.weight" if full => ("self_attn.k_proj.weight", vec![d.h, d.kv], vec![]),
        "attn_v.weight" if full => ("self_attn.v_proj.weight", vec![d.h, d.kv], vec![]),
        "attn_output.weight" if full => ("self_attn.o_proj.weight", vec![d.o, d.h], vec![]),
        "attn_q_norm.weight" if full => ("self_attn.q_norm.weight", vec![d.d], vec![Layout::NormPlusOne]),
        "attn_k_norm.weight" if full => ("self_attn.k_norm.weight", vec![d.d], vec![Layout::NormPlusOne]),
        "attn_qkv.weight" if linear => {
            ("linear_attn.in_proj_qkv.weight", vec![d.h, d.conv], tile(Axis::Rows, 2 * d.key_dim, d.dv))
        }
        "attn_gate.weight" if linear => {
            ("linear_attn.in_proj_z.weight", vec![d.h, d.value_dim], tile(Axis::Rows, 0, d.dv))
        }
        "ssm_beta.weight" if linear && family == Family::Qwen35Moe => {
            ("linear_attn.in_proj_b.weight", vec![d.h, d.hv], tile(Axis::Rows, 0, 1))
        }
        "ssm_alpha.weight" if linear && family == Family::Qwen35Moe => {
            ("linear_attn.in_proj_a.weight", vec![d.h, d.hv], tile(Axis::Rows, 0, 1))
        }
        "ssm_ba.weight" if linear && family == Family::Qwen3Next => {
            ("linear_attn.in_proj_ba.weight", vec![d.h, 2 * d.hv], vec![Layout::GroupedBetaAlpha])
        }
        "ssm_conv1d.weight" if linear => {
            let mut l = vec![Layout::ConvChannelsByKernel];
            l.extend(tile(Axis::Rows, 2 * d.key_dim, d.dv));
            ("linear_attn.conv1d.weight", vec![d.kc, d.conv], l)
        }
        "ssm_dt.bias" if linear => ("linear_attn.dt_bias", vec![d.hv], tile(Axis::Rows, 0, 1)),
        "ssm_a" if linear => {
            let mut l = vec![Layout::NegExpALog];
            l.extend(tile(Axis::Rows, 0, 1));
            ("linear_attn.A_log", vec![d.hv], l)
        }
        "ssm_norm.weight" if linear => ("linear_attn.norm.weight", vec![d.dv], vec![]),
        "ssm_out.weight" if linear => {
            ("linear_attn.out_proj.weight", vec![d.value_dim, d.h], tile(Axis::Columns, 0, d.dv))
        }
        "ffn_gate_inp.weight" => ("mlp.gate.weight", vec![d.h, d.e], vec![]),
        "ffn_gate_exps.weight" => {
            ("mlp.switch_mlp.gate_proj.weight", vec![d.h, d.i, d.e], vec![Layout::StackedExperts])
        }
        "ffn_up_exps.weight" => ("mlp.switch_mlp.up_proj.weight", vec![d.h, d.i, d.e], vec![Layout::StackedExperts]),
        "ffn_down_exps.weight" => {
            ("mlp.switch_mlp.down_proj.weight", vec![d.i, d.h, d.e], vec![Layout::StackedExperts])
        }
        "ffn_gate_up_exps.weight" => {
            ("mlp.experts.gate_up_proj", vec![d.h, 2 * d.i, d.e], vec![Layout::StackedExperts])
        }
        "ffn_gate_inp_shexp.weight" => ("mlp.shared_expert_gate.weight", vec![d.h], vec![]),
        "ffn_gate_shexp.weight" => ("mlp.shared_expert.gate_proj.weight", vec![d.h, d.is], vec![]),
        "ffn_up_shexp.weight" => ("mlp.shared_expert.up_proj.weight", vec![d.h, d.is], vec![]),
        "ffn_down_shexp.weight" => ("mlp.shared_expert.down_proj.weight", vec![d.is, d.h], vec![]),
        // MTP-only tensors (blk.{L..}.nextn.*), named as vLLM's qwen3_5_mtp reads them.
        "nextn.eh_proj.weight" if kind.is_none() => ("fc.weight", vec![2 * d.h, d.h], vec![]),
        "nextn.enorm.weight" if kind.is_none() => {
            ("pre_fc_norm_embedding.weight", vec![d.h], vec![Layout::NormPlusOne])
        }
        "nextn.hnorm.weight" if kind.is_none() => ("pre_fc_norm_hidden.weight", vec![d.h], vec![Layout::NormPlusOne]),
        "nextn.shared_head_norm.weight" if kind.is_none() => ("norm.weight", vec![d.h], vec![Layout::NormPlusOne]),
        _ => return None,
    })
}

/// The tensors a main layer of `kind` must have (the experts are checked separately).
fn required(kind: LayerKind, family: Family) -> &'static [&'static str] {
    match (kind, family) {
        (LayerKind::FullAttention, _) => &[
            "attn_norm.weight",
            "post_attention_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "ffn_gate_inp.weight",
            "ffn_gate_inp_shexp.weight",
            "ffn_gate_shexp.weight",
            "ffn_up_shexp.weight",
            "ffn_down_shexp.weight",
        ],
        (LayerKind::LinearAttention, fam) => {
            if fam == Family::Qwen35Moe {
                &[
                    "attn_norm.weight",
                    "post_attention_norm.weight",
                    "attn_qkv.weight",
                    "attn_gate.weight",
                    "ssm_beta.weight",
                    "ssm_alpha.weight",
                    "ssm_conv1d.weight",
                    "ssm_dt.bias",
                    "ssm_a",
                    "ssm_norm.weight",
                    "ssm_out.weight",
                    "ffn_gate_inp.weight",
                    "ffn_gate_inp_shexp.weight",
                    "ffn_gate_shexp.weight",
                    "ffn_up_shexp.weight",
                    "ffn_down_shexp.weight",
                ]
            } else {
                &[
                    "attn_norm.weight",
                    "post_attention_norm.weight",
                    "attn_qkv.weight",
                    "attn_gate.weight",
                    "ssm_ba.weight",
                    "ssm_conv1d.weight",
                    "ssm_dt.bias",
                    "ssm_a",
                    "ssm_norm.weight",
                    "ssm_out.weight",
                    "ffn_gate_inp.weight",
                    "ffn_gate_inp_shexp.weight",
                    "ffn_gate_shexp.weight",
                    "ffn_up_shexp.weight",
                    "ffn_down_shexp.weight",
                ]
            }
        }
    }
}

fn tensor_err(parts: &dyn TensorListing, part: usize, name: &str, msg: impl Into<String>) -> Error {
    Error::Tensor { name: name.to_string(), file: parts.part_path(part).to_path_buf(), msg: msg.into() }
}

/// `[H]` and `[H, 1]` are the same vector (HF's shared_expert_gate is [1, H]).
fn dims_match(got: &[u64], want: &[u64]) -> bool {
    let trim = |d: &[u64]| -> Vec<u64> {
        let mut v = d.to_vec();
        while v.len() > 1 && v.last() == Some(&1) {
            v.pop();
        }
        v
    };
    trim(got) == trim(want)
}

fn mapped(part: usize, t: &TensorInfo, hf_name: String, layout: Vec<Layout>) -> MappedTensor {
    MappedTensor {
        gguf_name: t.name.clone(),
        hf_name,
        ggml_type: t.ggml_type,
        dims: t.dims.clone(),
        location: Location { part, start: t.start, len: t.len },
        layout,
    }
}

/// Maps every tensor of `parts` for the model `cfg` describes, checking names and dims.
pub fn map_tensors(parts: &dyn TensorListing, cfg: &ModelConfig, mtp_layers: usize) -> Result<TensorMap> {
    let u = |x: usize| x as u64;
    let d = Dims {
        h: u(cfg.hidden_size),
        v: u(cfg.vocab_size),
        q: u(2 * cfg.num_heads * cfg.head_dim),
        kv: u(cfg.num_kv_heads * cfg.head_dim),
        o: u(cfg.num_heads * cfg.head_dim),
        d: u(cfg.head_dim),
        conv: u(cfg.conv_dim()),
        key_dim: u(cfg.key_dim()),
        value_dim: u(cfg.value_dim()),
        hv: u(cfg.linear_value_heads),
        dv: u(cfg.linear_value_dim),
        kc: u(cfg.conv_kernel),
        e: u(cfg.num_experts),
        i: u(cfg.moe_intermediate),
        is: u(cfg.shared_intermediate),
    };
    // llama.cpp reorders value heads for Qwen3.5 only (`_LinearAttentionVReorderBase`), and only
    // when there are more value heads than key heads.
    let tiled = cfg.family == Family::Qwen35Moe && cfg.linear_value_heads != cfg.linear_key_heads;
    let mut globals = Vec::new();
    let mut layers: Vec<Vec<MappedTensor>> = vec![Vec::new(); cfg.num_layers];
    let mut mtp = Vec::new();
    let check = |part: usize, t: &TensorInfo, want: &[u64]| -> Result<()> {
        if dims_match(&t.dims, want) {
            Ok(())
        } else {
            Err(tensor_err(parts, part, &t.name, format!("GGUF dims {:?}, expected {:?}", t.dims, want)))
        }
    };
    for (part, t) in parts.tensors() {
        let name = t.name.as_str();
        let global = match name {
            "token_embd.weight" => Some(("model.embed_tokens.weight", vec![d.h, d.v], vec![])),
            "output.weight" => Some(("lm_head.weight", vec![d.h, d.v], vec![])),
            "output_norm.weight" => Some(("model.norm.weight", vec![d.h], vec![Layout::NormPlusOne])),
            _ => None,
        };
        if let Some((hf, want, layout)) = global {
            check(part, t, &want)?;
            globals.push(mapped(part, t, hf.to_string(), layout));
            continue;
        }
        let Some((layer, suffix)) = name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, s)| Some((n.parse::<usize>().ok()?, s)))
        else {
            return Err(tensor_err(parts, part, name, "not a tensor of a qwen35moe/qwen3next model"));
        };
        if suffix == "ssm_in.weight" {
            return Err(tensor_err(
                parts,
                part,
                name,
                "fused `ssm_in` (in_proj_qkvz) is an older qwen3next conversion; re-convert with a current llama.cpp, which writes attn_qkv + attn_gate",
            ));
        }
        if layer >= cfg.num_layers + mtp_layers {
            return Err(tensor_err(
                parts,
                part,
                name,
                format!("layer {layer}, but the model has {} layers + {mtp_layers} MTP", cfg.num_layers),
            ));
        }
        let kind = (layer < cfg.num_layers).then(|| cfg.layer_kinds[layer]);
        let Some((hf, want, layout)) = layer_entry(suffix, cfg.family, kind, &d, tiled) else {
            let what = match kind {
                Some(LayerKind::FullAttention) => "a full-attention layer",
                Some(LayerKind::LinearAttention) => "a GatedDeltaNet layer",
                None => "an MTP block",
            };
            return Err(tensor_err(parts, part, name, format!("unexpected in {what} of {}", cfg.family.name())));
        };
        check(part, t, &want)?;
        if layout.contains(&Layout::StackedExperts) && !parts.has_stacked_experts() {
            return Err(tensor_err(parts, part, name, "stacked experts where the experts are stored per expert"));
        }
        match kind {
            Some(_) => layers[layer].push(mapped(part, t, format!("model.layers.{layer}.{hf}"), layout)),
            None if suffix.starts_with("nextn.") => mtp.push(mapped(part, t, format!("mtp.{hf}"), layout)),
            None => mtp.push(mapped(part, t, format!("mtp.layers.{}.{hf}", layer - cfg.num_layers), layout)),
        }
    }
    for g in ["token_embd.weight", "output_norm.weight"] {
        if parts.tensor(g).is_none() {
            return Err(Error::file(parts.path(), format!("GGUF: tensor `{g}` not found")));
        }
    }
    let mut experts = Vec::with_capacity(cfg.num_layers);
    for (i, kind) in cfg.layer_kinds.iter().enumerate() {
        for r in required(*kind, cfg.family) {
            let name = format!("blk.{i}.{r}");
            if parts.tensor(&name).is_none() {
                let what = match kind {
                    LayerKind::FullAttention => "full attention",
                    LayerKind::LinearAttention => "GatedDeltaNet",
                };
                return Err(Error::file(
                    parts.path(),
                    format!("GGUF: tensor `{name}` not found (layer {i} is {what} by the full_attention_interval)"),
                ));
            }
        }
        if parts.has_stacked_experts() {
            experts.push(layer_experts(parts, i, &d)?);
        }
    }
    Ok(TensorMap { globals, layers, experts, mtp })
}

fn expert_slice(parts: &dyn TensorListing, name: &str, d: &Dims) -> Result<Option<ExpertSlice>> {
    let Some((part, t)) = parts.tensor(name) else { return Ok(None) };
    // Dims were checked against [in, out, E] when mapped.
    let (cols, rows, experts) = (t.dims[0], t.dims[1], t.dims[2]);
    debug_assert_eq!(experts, d.e);
    let stride = rows * t.row_bytes();
    debug_assert_eq!(stride * experts, t.len);
    Ok(Some(ExpertSlice {
        tensor: name.to_string(),
        ggml_type: t.ggml_type,
        part,
        rows,
        cols,
        first: t.start,
        stride,
        experts,
    }))
}

fn layer_experts(parts: &dyn TensorListing, i: usize, d: &Dims) -> Result<LayerExperts> {
    let p = format!("blk.{i}.");
    let down = expert_slice(parts, &format!("{p}ffn_down_exps.weight"), d)?;
    let gate = expert_slice(parts, &format!("{p}ffn_gate_exps.weight"), d)?;
    let up = expert_slice(parts, &format!("{p}ffn_up_exps.weight"), d)?;
    let gate_up = expert_slice(parts, &format!("{p}ffn_gate_up_exps.weight"), d)?;
    match (gate, up, gate_up, down) {
        (Some(gate), Some(up), None, Some(down)) => Ok(LayerExperts::Separate { gate, up, down }),
        (None, None, Some(gate_up), Some(down)) => Ok(LayerExperts::FusedGateUp { gate_up, down }),
        _ => Err(Error::file(
            parts.path(),
            format!(
                "GGUF: layer {i} needs `{p}ffn_gate_exps`, `{p}ffn_up_exps` and `{p}ffn_down_exps` (or `{p}ffn_gate_up_exps` and `{p}ffn_down_exps`)"
            ),
        )),
    }
}
