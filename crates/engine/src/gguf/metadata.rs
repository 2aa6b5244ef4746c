//! GGUF metadata → [`ModelConfig`] for llama.cpp's `qwen35moe` and `qwen3next` architectures.
//! Keys as llama.cpp's converter writes them (conversion/qwen.py `Qwen3NextModel`,
//! `Qwen3_5MoeTextModel`, the `TextModel` base; gguf-py `Keys`):
//!
//! | HF config field | GGUF key |
//! |---|---|
//! | hidden_size | `{arch}.embedding_length` |
//! | num_hidden_layers | `{arch}.block_count` − `{arch}.nextn_predict_layers` (MTP blocks are counted in block_count) |
//! | num_attention_heads / num_key_value_heads | `{arch}.attention.head_count` / `head_count_kv` |
//! | head_dim | `{arch}.attention.key_length` |
//! | partial_rotary_factor | `{arch}.rope.dimension_count` / head_dim |
//! | rope_theta | `{arch}.rope.freq_base` |
//! | rms_norm_eps | `{arch}.attention.layer_norm_rms_epsilon` |
//! | num_experts / num_experts_per_tok | `{arch}.expert_count` / `expert_used_count` |
//! | moe / shared_expert intermediate | `{arch}.expert_feed_forward_length` / `expert_shared_feed_forward_length` |
//! | linear_conv_kernel_dim | `{arch}.ssm.conv_kernel` |
//! | linear_key_head_dim | `{arch}.ssm.state_size` |
//! | linear_num_key_heads | `{arch}.ssm.group_count` |
//! | linear_num_value_heads | `{arch}.ssm.time_step_rank` |
//! | linear_value_head_dim | `{arch}.ssm.inner_size` / time_step_rank |
//! | layer_types | `{arch}.attention.recurrent_layers` (one bool per layer, true = GatedDeltaNet) when present, else `{arch}.full_attention_interval` (layer i is full attention iff (i+1) % interval == 0) |
//! | max_position_embeddings | `{arch}.context_length` |
//! | vocab_size | rows of `token_embd.weight` (the converter pads the token list to it) |
//! | tie_word_embeddings | no `output.weight` tensor |
//! | eos_token_id | `tokenizer.ggml.eos_token_id` (+ `eot_token_id`) |

use super::split::GgufParts;
use crate::config::{Family, LayerKind, ModelConfig};
use crate::error::{Error, Result};
use std::path::Path;

/// The architectures we run, as `general.architecture` names them.
pub const ARCHITECTURES: [&str; 2] = ["qwen35moe", "qwen3next"];

const MAX_HYPERPARAMETER: usize = 1 << 24;

/// What the metadata says beyond the config.
#[derive(Clone, Debug)]
pub struct ModelFacts {
    pub architecture: String,
    pub name: Option<String>,
    /// `general.file_type` (llama.cpp's ftype id).
    pub file_type: Option<u32>,
    /// MTP (next-token prediction) blocks after the main layers.
    pub mtp_layers: usize,
}

struct Meta<'a> {
    parts: &'a GgufParts,
    arch: &'a str,
    path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::config(self.path, format!("GGUF key `{key}`: {msg}"))
    }
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }
    /// A count: a non-negative integer, or a per-layer array whose non-zero entries agree
    /// (llama.cpp accepts both for head counts).
    fn opt_usize(&self, suffix: &str) -> Result<Option<usize>> {
        let key = self.key(suffix);
        let Some(v) = self.parts.get(&key) else { return Ok(None) };
        if let Some(i) = v.as_int() {
            return self.count(&key, i).map(Some);
        }
        if let Some(items) = v.as_array().and_then(|a| a.ints()) {
            let mut found: Option<i128> = None;
            for x in items.into_iter().filter(|&x| x != 0) {
                if found.is_some_and(|f| f != x) {
                    return Err(self.err(&key, "per-layer values differ; only uniform models are supported"));
                }
                found = Some(x);
            }
            return found.map(|x| self.count(&key, x)).transpose();
        }
        Err(self.err(&key, format!("expected an integer, found {} ({})", v.brief(), v.type_name())))
    }
    /// Hyperparameters of real models are far below 2^24; refusing larger ones keeps every
    /// product of two of them (matrix sizes) far from overflow.
    fn count(&self, key: &str, i: i128) -> Result<usize> {
        match usize::try_from(i) {
            Ok(n) if n <= MAX_HYPERPARAMETER => Ok(n),
            Ok(_) => Err(self.err(key, format!("{i} is absurdly large"))),
            Err(_) => Err(self.err(key, format!("{i} is not a count"))),
        }
    }
    fn usize(&self, suffix: &str) -> Result<usize> {
        self.opt_usize(suffix)?
            .ok_or_else(|| Error::config(self.path, format!("GGUF key `{}` is missing", self.key(suffix))))
    }
    fn opt_f64(&self, suffix: &str) -> Result<Option<f64>> {
        let key = self.key(suffix);
        match self.parts.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(&key, format!("expected a number, found {} ({})", v.brief(), v.type_name()))),
        }
    }
}

/// Reads `general.architecture` and the model's hyperparameters.
pub fn model_config(parts: &GgufParts) -> Result<(ModelConfig, ModelFacts)> {
    let path = parts.path();
    let arch = match parts.get("general.architecture") {
        None => return Err(Error::config(path, "GGUF key `general.architecture` is missing")),
        Some(v) => v.as_str().ok_or_else(|| {
            Error::config(
                path,
                format!("GGUF key `general.architecture` is {} ({}), not a string", v.brief(), v.type_name()),
            )
        })?,
    };
    let family = match arch {
        "qwen35moe" => Family::Qwen35Moe,
        "qwen3next" => Family::Qwen3Next,
        other => {
            return Err(Error::config(
                path,
                format!("GGUF architecture `{other}` is not supported (supported: {})", ARCHITECTURES.join(", ")),
            ));
        }
    };
    let m = Meta { parts, arch, path };
    if let Some(v) = parts.get(&m.key("rope.scaling.type"))
        && v.as_str() != Some("none")
    {
        return Err(m.err(&m.key("rope.scaling.type"), format!("RoPE scaling {} is not supported", v.brief())));
    }

    let blocks = m.usize("block_count")?;
    let mtp_layers = m.opt_usize("nextn_predict_layers")?.unwrap_or(0);
    let num_layers = blocks.checked_sub(mtp_layers).filter(|&n| n > 0).ok_or_else(|| {
        m.err(&m.key("nextn_predict_layers"), format!("{mtp_layers} MTP blocks leave no layers of {blocks}"))
    })?;
    // Every layer has a dozen tensors; a block count beyond the tensor count is a broken header
    // (and would size per-layer tables by it).
    if blocks > parts.tensor_count() {
        return Err(m.err(
            &m.key("block_count"),
            format!("{blocks} blocks, but the file has only {} tensors", parts.tensor_count()),
        ));
    }
    // The converter writes the per-layer kinds when the checkpoint names them (`layer_types`),
    // which need not follow the interval; the interval is the older form.
    let recurrent_key = m.key("attention.recurrent_layers");
    let layer_kinds: Vec<LayerKind> = match parts.get(&recurrent_key) {
        Some(v) => {
            let flags = v
                .as_array()
                .and_then(|a| a.bools())
                .ok_or_else(|| m.err(&recurrent_key, format!("is {}, expected an array of bools", v.type_name())))?;
            // One entry per block; MTP blocks (after the main layers) may be listed too.
            if flags.len() != num_layers && flags.len() != blocks {
                return Err(m.err(&recurrent_key, format!("has {} entries for {num_layers} layers", flags.len())));
            }
            flags[..num_layers]
                .iter()
                .map(|&r| if r { LayerKind::LinearAttention } else { LayerKind::FullAttention })
                .collect()
        }
        None => {
            let interval = m.opt_usize("full_attention_interval")?.unwrap_or(4);
            if interval == 0 {
                return Err(m.err(&m.key("full_attention_interval"), "must be at least 1"));
            }
            (0..num_layers)
                .map(|i| if (i + 1) % interval == 0 { LayerKind::FullAttention } else { LayerKind::LinearAttention })
                .collect()
        }
    };

    let hidden_size = m.usize("embedding_length")?;
    let num_heads = m.usize("attention.head_count")?;
    let head_dim = match m.opt_usize("attention.key_length")? {
        Some(d) => d,
        None => hidden_size / num_heads.max(1),
    };
    if let Some(v) = m.opt_usize("attention.value_length")?
        && v != head_dim
    {
        return Err(m.err(&m.key("attention.value_length"), format!("{v} differs from key_length {head_dim}")));
    }
    let rotary = m.opt_usize("rope.dimension_count")?.unwrap_or(head_dim / 4);
    let linear_value_heads = m.usize("ssm.time_step_rank")?;
    let inner = m.usize("ssm.inner_size")?;
    if linear_value_heads == 0 || !inner.is_multiple_of(linear_value_heads) {
        return Err(m.err(
            &m.key("ssm.inner_size"),
            format!("{inner} is not a multiple of ssm.time_step_rank {linear_value_heads}"),
        ));
    }
    let vocab_size = match parts.tensor("token_embd.weight") {
        Some((_, t)) if t.dims.len() == 2 => t.dims[1] as usize,
        Some((_, t)) => {
            return Err(Error::config(path, format!("tensor `token_embd.weight` has dims {:?}, expected 2", t.dims)));
        }
        None => match m.opt_usize("vocab_size")? {
            Some(v) => v,
            None => return Err(Error::config(path, "tensor `token_embd.weight` not found")),
        },
    };
    let token_id = |key: &str| -> Result<Option<u32>> {
        match parts.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_int()
                .and_then(|i| u32::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| Error::config(path, format!("GGUF key `{key}`: {} is not a token id", v.brief()))),
        }
    };
    let mut eos_token_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = token_id(key)?
            && !eos_token_ids.contains(&id)
        {
            eos_token_ids.push(id);
        }
    }
    let norm_topk_prob = match parts.get(&m.key("expert_weights_norm")) {
        None => true,
        Some(v) => v.as_bool().ok_or_else(|| m.err(&m.key("expert_weights_norm"), "expected a bool"))?,
    };
    let cfg = ModelConfig {
        family,
        path: path.to_path_buf(),
        hidden_size,
        num_layers,
        layer_kinds,
        num_heads,
        num_kv_heads: m.usize("attention.head_count_kv")?,
        head_dim,
        linear_key_heads: m.usize("ssm.group_count")?,
        linear_value_heads,
        linear_key_dim: m.usize("ssm.state_size")?,
        linear_value_dim: inner / linear_value_heads,
        conv_kernel: m.opt_usize("ssm.conv_kernel")?.unwrap_or(4),
        num_experts: m.usize("expert_count")?,
        experts_per_token: m.usize("expert_used_count")?,
        moe_intermediate: m.usize("expert_feed_forward_length")?,
        shared_intermediate: m.usize("expert_shared_feed_forward_length")?,
        vocab_size,
        rope_theta: m.opt_f64("rope.freq_base")?.unwrap_or(10000.0),
        partial_rotary_factor: rotary as f64 / head_dim.max(1) as f64,
        rms_norm_eps: m.opt_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6) as f32,
        norm_topk_prob,
        tie_word_embeddings: parts.tensor("output.weight").is_none(),
        eos_token_ids,
        max_position_embeddings: m.opt_usize("context_length")?.unwrap_or(262_144),
        quantization: None,
    };
    cfg.validate()?;
    let facts = ModelFacts {
        architecture: arch.to_string(),
        name: parts.get("general.name").and_then(|v| v.as_str()).map(str::to_string),
        file_type: parts.get("general.file_type").and_then(|v| v.as_int()).and_then(|i| u32::try_from(i).ok()),
        mtp_layers,
    };
    Ok((cfg, facts))
}
