//! Model configuration: parses the `config.json` of Qwen3.5-MoE (nested `text_config` of a
//! ConditionalGeneration checkpoint, or the flat `qwen3_5_moe_text` form) and Qwen3-Next (flat).
//! Accepts both RoPE forms (`rope_parameters` or top-level fields) and both ways of giving the
//! layer pattern (`layer_types` or `full_attention_interval`). Anything we cannot run exactly is
//! refused with an error that names the field.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Qwen35Moe,
    Qwen3Next,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Qwen35Moe => "qwen3_5_moe",
            Family::Qwen3Next => "qwen3_next",
        }
    }
}

/// Bounds on config values (see `validate`): a real model is orders of magnitude below each.
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_DIM: usize = 1 << 18;
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_EXPERTS: usize = 1 << 14;
pub const MAX_VOCAB: usize = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// GatedDeltaNet ("linear_attention").
    LinearAttention,
    /// Gated softmax attention ("full_attention").
    FullAttention,
}

/// MLX affine quantization settings from `config.json["quantization"]`: a default and optional
/// per-module overrides keyed by the module path as written in the checkpoint.
#[derive(Clone, Debug, Default)]
pub struct QuantConfig {
    pub group_size: Option<usize>,
    pub bits: Option<u32>,
    pub overrides: BTreeMap<String, (usize, u32)>,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub family: Family,
    pub path: PathBuf,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub layer_kinds: Vec<LayerKind>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub linear_key_heads: usize,
    pub linear_value_heads: usize,
    pub linear_key_dim: usize,
    pub linear_value_dim: usize,
    pub conv_kernel: usize,
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub moe_intermediate: usize,
    pub shared_intermediate: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub rms_norm_eps: f32,
    pub norm_topk_prob: bool,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub max_position_embeddings: usize,
    pub quantization: Option<QuantConfig>,
}

impl ModelConfig {
    /// The config a backend running only layers `range` sees (a stage of a model split over
    /// several devices): those layers, numbered from 0.
    pub fn stage(&self, range: std::ops::Range<usize>) -> ModelConfig {
        let mut c = self.clone();
        c.layer_kinds = self.layer_kinds[range.clone()].to_vec();
        c.num_layers = range.len();
        c
    }

    pub fn key_dim(&self) -> usize {
        self.linear_key_heads * self.linear_key_dim
    }
    pub fn value_dim(&self) -> usize {
        self.linear_value_heads * self.linear_value_dim
    }
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor).round() as usize
    }

    /// This config as a flat HF `config.json` (`qwen3_5_moe_text` or `qwen3_next`) that
    /// [`ModelConfig::from_value`] reads back: how a model whose config came from elsewhere (a
    /// GGUF's metadata) is written as a folder. Values `from_value` would not read back the same
    /// (e.g. a Qwen3.5 without top-k renormalisation) are the caller's to check. Quantization is
    /// left out (it is described per tensor).
    pub fn to_config_json(&self) -> Value {
        let kind = |k: &LayerKind| match k {
            LayerKind::FullAttention => "full_attention",
            LayerKind::LinearAttention => "linear_attention",
        };
        serde_json::json!({
            "model_type": match self.family {
                Family::Qwen35Moe => "qwen3_5_moe_text",
                Family::Qwen3Next => "qwen3_next",
            },
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "layer_types": self.layer_kinds.iter().map(kind).collect::<Vec<_>>(),
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_key_heads,
            "linear_num_value_heads": self.linear_value_heads,
            "linear_key_head_dim": self.linear_key_dim,
            "linear_value_head_dim": self.linear_value_dim,
            "linear_conv_kernel_dim": self.conv_kernel,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "moe_intermediate_size": self.moe_intermediate,
            "shared_expert_intermediate_size": self.shared_intermediate,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            // Widened exactly; read back as f64 and narrowed to the same f32.
            "rms_norm_eps": self.rms_norm_eps as f64,
            "norm_topk_prob": self.norm_topk_prob,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": self.eos_token_ids,
            "max_position_embeddings": self.max_position_embeddings,
        })
    }

    pub fn load(dir: &Path) -> Result<Self> {
        // Folder-only paths (convert, bench) come through here, so a GGUF file gets a clear word
        // instead of "FILE/config.json: Not a directory"; `models::load_config` reads both.
        if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Err(Error::config(
                dir,
                "is a GGUF file; this needs a model folder (safetensors or packed). GGUF files run as they are (`flashmoe run/serve/chat/logits --model FILE.gguf`)",
            ));
        }
        let path = dir.join("config.json");
        let text = flashmoe_text::file::read_text(&path).map_err(|e| Error::io(&path, e))?;
        let root: Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&path, format!("malformed JSON: {e}")))?;
        Self::from_value(&root, &path)
    }

    pub fn from_value(root: &Value, path: &Path) -> Result<Self> {
        let root_obj = root.as_object().ok_or_else(|| Error::config(path, "top level is not a JSON object"))?;
        let model_type = root_obj
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(path, "missing field `model_type`"))?;
        let (family, text, prefix) = match model_type {
            "qwen3_5_moe" => {
                let t = root_obj
                    .get("text_config")
                    .and_then(Value::as_object)
                    .ok_or_else(|| Error::config(path, "model_type `qwen3_5_moe` needs an object `text_config`"))?;
                if let Some(tt) = t.get("model_type").and_then(Value::as_str)
                    && tt != "qwen3_5_moe_text"
                {
                    return Err(Error::config(
                        path,
                        format!("unsupported `text_config.model_type` `{tt}` (expected `qwen3_5_moe_text`)"),
                    ));
                }
                (Family::Qwen35Moe, t, "text_config.")
            }
            "qwen3_5_moe_text" => (Family::Qwen35Moe, root_obj, ""),
            "qwen3_next" => (Family::Qwen3Next, root_obj, ""),
            other => {
                return Err(Error::config(
                    path,
                    format!("unsupported model_type `{other}` (supported: qwen3_5_moe, qwen3_5_moe_text, qwen3_next)"),
                ));
            }
        };
        let f = Fields { obj: text, root: root_obj, prefix, path };

        if let Some(act) = f.opt_str("hidden_act")?
            && act != "silu"
        {
            return Err(f.err("hidden_act", format!("unsupported value `{act}` (only `silu`)")));
        }
        if f.opt_bool("attention_bias")?.unwrap_or(false) {
            return Err(f.err("attention_bias", "attention biases are not supported"));
        }
        if family == Family::Qwen3Next {
            if let Some(step) = f.opt_usize("decoder_sparse_step")?
                && step != 1
            {
                return Err(f.err("decoder_sparse_step", format!("unsupported value {step} (only 1: every layer MoE)")));
            }
            if let Some(v) = f.obj.get("mlp_only_layers")
                && v.as_array().is_some_and(|a| !a.is_empty())
            {
                return Err(f.err("mlp_only_layers", "dense MLP layers are not supported"));
            }
        }

        let hidden_size = f.usize("hidden_size")?;
        let num_layers = f.usize("num_hidden_layers")?;
        // Checked here too, before the per-layer list below is allocated.
        if num_layers > MAX_LAYERS {
            return Err(f.err("num_hidden_layers", format!("{num_layers} is more than the {MAX_LAYERS} supported")));
        }
        let layer_kinds = match f.obj.get("layer_types") {
            Some(Value::Array(a)) => {
                let mut kinds = Vec::with_capacity(a.len());
                for (i, v) in a.iter().enumerate() {
                    kinds.push(match v.as_str() {
                        Some("linear_attention") => LayerKind::LinearAttention,
                        Some("full_attention") => LayerKind::FullAttention,
                        other => {
                            return Err(f.err(
                                "layer_types",
                                format!("entry {i} is {other:?}; expected \"linear_attention\" or \"full_attention\""),
                            ));
                        }
                    });
                }
                if kinds.len() != num_layers {
                    return Err(f.err(
                        "layer_types",
                        format!("has {} entries but num_hidden_layers is {num_layers}", kinds.len()),
                    ));
                }
                kinds
            }
            Some(Value::Null) | None => {
                let interval = f.opt_usize("full_attention_interval")?.unwrap_or(4);
                if interval == 0 {
                    return Err(f.err("full_attention_interval", "must be at least 1"));
                }
                (0..num_layers)
                    .map(
                        |i| {
                            if (i + 1) % interval == 0 { LayerKind::FullAttention } else { LayerKind::LinearAttention }
                        },
                    )
                    .collect()
            }
            Some(_) => return Err(f.err("layer_types", "must be an array of strings")),
        };

        // RoPE: the newer `rope_parameters` block wins over the older top-level fields.
        let (rope_theta, partial_rotary_factor) = match f.obj.get("rope_parameters").or(f.obj.get("rope_scaling")) {
            Some(Value::Object(rp)) => {
                if let Some(t) = rp.get("rope_type").or(rp.get("type")).and_then(Value::as_str)
                    && t != "default"
                {
                    return Err(
                        f.err("rope_parameters.rope_type", format!("unsupported RoPE type `{t}` (only `default`)"))
                    );
                }
                let theta = match rp.get("rope_theta") {
                    Some(v) => v.as_f64().ok_or_else(|| f.err("rope_parameters.rope_theta", "must be a number"))?,
                    None => f.opt_f64("rope_theta")?.ok_or_else(|| {
                        f.err("rope_theta", "missing (neither rope_parameters.rope_theta nor rope_theta given)")
                    })?,
                };
                let prf = match rp.get("partial_rotary_factor") {
                    Some(v) => {
                        v.as_f64().ok_or_else(|| f.err("rope_parameters.partial_rotary_factor", "must be a number"))?
                    }
                    None => f.opt_f64("partial_rotary_factor")?.unwrap_or(0.25),
                };
                (theta, prf)
            }
            _ => (f.opt_f64("rope_theta")?.unwrap_or(10000.0), f.opt_f64("partial_rotary_factor")?.unwrap_or(0.25)),
        };

        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.usize("num_key_value_heads")?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_heads.max(1),
        };
        let linear_key_heads = f.usize("linear_num_key_heads")?;
        let linear_value_heads = f.usize("linear_num_value_heads")?;
        let num_experts = f.usize("num_experts")?;
        let experts_per_token = f.usize("num_experts_per_tok")?;
        let eos_token_ids = match f.get("eos_token_id") {
            Some(Value::Number(n)) => {
                vec![
                    n.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| f.err("eos_token_id", "must be an integer in 0..2^32"))?,
                ]
            }
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| f.err("eos_token_id", "must hold integers in 0..2^32"))
                })
                .collect::<Result<_>>()?,
            _ => vec![],
        };
        let cfg = ModelConfig {
            family,
            path: path.to_path_buf(),
            hidden_size,
            num_layers,
            layer_kinds,
            num_heads,
            num_kv_heads,
            head_dim,
            linear_key_heads,
            linear_value_heads,
            linear_key_dim: f.usize("linear_key_head_dim")?,
            linear_value_dim: f.usize("linear_value_head_dim")?,
            conv_kernel: f.opt_usize("linear_conv_kernel_dim")?.unwrap_or(4),
            num_experts,
            experts_per_token,
            moe_intermediate: f.usize("moe_intermediate_size")?,
            shared_intermediate: f.usize("shared_expert_intermediate_size")?,
            vocab_size: f.usize("vocab_size")?,
            rope_theta,
            partial_rotary_factor,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            // Qwen3.5 always renormalises the top-k weights (its config has no such field).
            norm_topk_prob: match family {
                Family::Qwen35Moe => true,
                Family::Qwen3Next => f.opt_bool("norm_topk_prob")?.unwrap_or(true),
            },
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            eos_token_ids,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(262_144),
            quantization: parse_quantization(root_obj, path)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let p = &self.path;
        let bad = |field: &str, msg: String| Err(Error::config(p, format!("field `{field}`: {msg}")));
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("linear_num_key_heads", self.linear_key_heads),
            ("linear_num_value_heads", self.linear_value_heads),
            ("linear_key_head_dim", self.linear_key_dim),
            ("linear_value_head_dim", self.linear_value_dim),
            ("linear_conv_kernel_dim", self.conv_kernel),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.experts_per_token),
            ("moe_intermediate_size", self.moe_intermediate),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(name, "must be at least 1".into());
            }
        }
        // Upper bounds, far above any real model, so that every size derived from these (rows ×
        // columns × bytes of one matrix, cache and buffer sizes) fits in 64 bits and absurd
        // values are refused here instead of as an allocation failure later.
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_DIM),
            ("linear_num_key_heads", self.linear_key_heads, MAX_HEADS),
            ("linear_num_value_heads", self.linear_value_heads, MAX_HEADS),
            ("linear_key_head_dim", self.linear_key_dim, MAX_DIM),
            ("linear_value_head_dim", self.linear_value_dim, MAX_DIM),
            ("linear_conv_kernel_dim", self.conv_kernel, MAX_HEADS),
            ("num_experts", self.num_experts, MAX_EXPERTS),
            ("moe_intermediate_size", self.moe_intermediate, MAX_DIM),
            ("shared_expert_intermediate_size", self.shared_intermediate, MAX_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
        ] {
            if v > max {
                return bad(name, format!("{v} is more than the {max} supported"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(
                "num_attention_heads",
                format!("{} is not a multiple of num_key_value_heads {}", self.num_heads, self.num_kv_heads),
            );
        }
        if !self.linear_value_heads.is_multiple_of(self.linear_key_heads) {
            return bad(
                "linear_num_value_heads",
                format!(
                    "{} is not a multiple of linear_num_key_heads {}",
                    self.linear_value_heads, self.linear_key_heads
                ),
            );
        }
        if self.experts_per_token > self.num_experts {
            return bad(
                "num_experts_per_tok",
                format!("{} exceeds num_experts {}", self.experts_per_token, self.num_experts),
            );
        }
        let rot = self.head_dim as f64 * self.partial_rotary_factor;
        if rot.fract() != 0.0 || !(rot as usize).is_multiple_of(2) || rot as usize > self.head_dim {
            return bad(
                "partial_rotary_factor",
                format!("head_dim × factor = {rot} must be an even integer ≤ head_dim"),
            );
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad("rope_theta", format!("{} must be a positive finite number", self.rope_theta));
        }
        // eps ≤ 0 lets a zero row divide by zero: NaN everywhere after it.
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad("rms_norm_eps", format!("{} must be a positive finite number", self.rms_norm_eps));
        }
        Ok(())
    }
}

fn parse_quantization(root: &Map<String, Value>, path: &Path) -> Result<Option<QuantConfig>> {
    let Some(q) = root.get("quantization").or(root.get("quantization_config")) else {
        return Ok(None);
    };
    let Some(q) = q.as_object() else {
        return Err(Error::config(path, "field `quantization` must be an object"));
    };
    let mut out = QuantConfig::default();
    for (k, v) in q {
        match (k.as_str(), v) {
            ("group_size", Value::Number(n)) => out.group_size = n.as_u64().map(|x| x as usize),
            ("bits", Value::Number(n)) => out.bits = n.as_u64().map(|x| x as u32),
            (_, Value::Object(o)) => {
                let gs = o.get("group_size").and_then(Value::as_u64);
                let bits = o.get("bits").and_then(Value::as_u64);
                if let (Some(gs), Some(bits)) = (gs, bits) {
                    out.overrides.insert(k.clone(), (gs as usize, bits as u32));
                }
            }
            // `mode`, `quant_method` and boolean entries (modules kept in float) need no action:
            // we infer everything from the tensors that are actually present.
            _ => {}
        }
    }
    Ok(Some(out))
}

/// Field access with error messages that name the field as the user wrote it.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    root: &'a Map<String, Value>,
    prefix: &'static str,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl std::fmt::Display) -> Error {
        Error::config(self.path, format!("field `{}{field}`: {msg}", self.prefix))
    }
    /// Looks in the text config first, then at the top level (ConditionalGeneration checkpoints
    /// keep `tie_word_embeddings` and token ids there).
    fn get(&self, k: &str) -> Option<&Value> {
        self.obj.get(k).or_else(|| self.root.get(k)).filter(|v| !v.is_null())
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| Error::config(self.path, format!("missing field `{}{k}`", self.prefix)))
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, found {v}"))),
        }
    }
    fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(k, format!("expected a number, found {v}"))),
        }
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.err(k, format!("expected true or false, found {v}"))),
        }
    }
    fn opt_str(&self, k: &str) -> Result<Option<&str>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(k, format!("expected a string, found {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "qwen3_5_moe_text", "hidden_size": 64, "num_hidden_layers": 8,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
            "linear_value_head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "vocab_size": 320,
            "rope_theta": 1e7, "partial_rotary_factor": 0.25, "eos_token_id": 5
        })
    }

    #[test]
    fn derives_layer_types_from_interval() {
        let c = ModelConfig::from_value(&base(), Path::new("config.json")).unwrap();
        let full: Vec<usize> = (0..8).filter(|&i| c.layer_kinds[i] == LayerKind::FullAttention).collect();
        assert_eq!(full, vec![3, 7]);
        assert_eq!(c.rotary_dims(), 16);
        assert_eq!(c.conv_dim(), 2 * 32 + 128);
        assert_eq!(c.eos_token_ids, vec![5]);
    }

    #[test]
    fn nested_text_config_and_rope_parameters() {
        let mut t = base();
        t["model_type"] = json!("qwen3_5_moe_text");
        t["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5});
        let root = json!({"model_type": "qwen3_5_moe", "text_config": t, "tie_word_embeddings": true});
        let c = ModelConfig::from_value(&root, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 1e4);
        assert_eq!(c.rotary_dims(), 32);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_value(&v, Path::new("m/config.json")).unwrap_err().to_string();
        assert_eq!(e, "m/config.json: missing field `hidden_size`");
        let mut v = base();
        v["model_type"] = json!("llama");
        let e = ModelConfig::from_value(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("unsupported model_type `llama`"), "{e}");
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 1e4});
        let e = ModelConfig::from_value(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("rope_parameters.rope_type"), "{e}");
        let mut v = base();
        v["num_experts_per_tok"] = json!("two");
        let e = ModelConfig::from_value(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("`num_experts_per_tok`"), "{e}");
    }
}
