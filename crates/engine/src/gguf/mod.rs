//! GGUF input (llama.cpp's format) for `qwen35moe` and `qwen3next` models: the container parser
//! (`reader`), split files (`split`), metadata → [`ModelConfig`] (`metadata`), tensor names →
//! our weight tree with layout facts and per-expert byte ranges (`tensors`), and the tokenizer and
//! chat template the file carries. [`GgufModel::open`] gathers all of it; wiring it into the
//! forward pass (block-quant kernels, the expert store reading [`LayerExperts`] ranges) is the
//! loader's job.

pub mod metadata;
pub mod reader;
pub mod split;
pub mod tensors;
pub mod types;

pub use metadata::{ARCHITECTURES, ModelFacts};
pub use reader::{Array, GgufFile, Header, TensorInfo, Value};
pub use split::GgufParts;
pub use tensors::{ExpertSlice, LayerExperts, Layout, Location, MappedTensor, TensorListing, TensorMap};
pub use types::GgmlType;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::store::Bytes;
use flashmoe_text::{GgufVocab, TextTokenizer};
use std::path::Path;

/// True when `path` names a GGUF file (by extension; the parser checks the magic).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Everything a loader needs from a GGUF model: its parts, config, and tensor table.
#[derive(Debug)]
pub struct GgufModel {
    pub parts: GgufParts,
    pub config: ModelConfig,
    pub facts: ModelFacts,
    pub tensors: TensorMap,
}

impl GgufModel {
    /// Opens a GGUF model (any part of a split), reads its config and maps its tensors.
    pub fn open(path: &Path) -> Result<GgufModel> {
        let parts = GgufParts::open(path)?;
        let (config, facts) = metadata::model_config(&parts)?;
        let tensors = tensors::map_tensors(&parts, &config, facts.mtp_layers)?;
        Ok(GgufModel { parts, config, facts, tensors })
    }

    /// The bytes at `loc` (a tensor or one expert's slice), kept mapped.
    pub fn bytes(&self, loc: Location) -> Bytes {
        TensorListing::bytes(&self.parts, loc)
    }

    /// The tokenizer: a `tokenizer.json` beside the file when there is one (it is the model's own
    /// definition), else the vocabulary in the metadata.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        Self::tokenizer_of(&self.parts)
    }

    /// [`GgufModel::tokenizer`] of opened parts (no tensor map needed).
    pub fn tokenizer_of(parts: &GgufParts) -> Result<TextTokenizer> {
        let beside = parts.path().parent().unwrap_or(Path::new(".")).join("tokenizer.json");
        if beside.is_file() {
            return Ok(TextTokenizer::load(&beside)?);
        }
        tokenizer_from_metadata(parts)
    }

    /// `tokenizer.chat_template`, when the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.parts.get("tokenizer.chat_template").and_then(Value::as_str)
    }
}

/// The BOS and EOS token texts the metadata names by id (`tokenizer.ggml.{bos,eos}_token_id`), as
/// tokenizer_config.json's `bos_token` / `eos_token` (what a chat template sees); ids the
/// tokenizer does not know are left out.
pub fn special_tokens(parts: &GgufParts, tok: &TextTokenizer) -> serde_json::Map<String, serde_json::Value> {
    let mut special = serde_json::Map::new();
    for (key, meta) in [("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id")] {
        let text = parts
            .get(meta)
            .and_then(Value::as_int)
            .and_then(|id| u32::try_from(id).ok())
            .and_then(|id| tok.id_to_token(id));
        if let Some(t) = text {
            special.insert(key.into(), serde_json::Value::String(t));
        }
    }
    special
}

/// `general.sampling.*` (the sampler settings a GGUF's author recommends) in
/// generation_config.json's terms, when the file has any.
pub fn sampling_defaults(parts: &GgufParts) -> Option<serde_json::Value> {
    let mut v = serde_json::Map::new();
    for (meta, key) in [
        ("general.sampling.temp", "temperature"),
        ("general.sampling.top_p", "top_p"),
        ("general.sampling.top_k", "top_k"),
        ("general.sampling.min_p", "min_p"),
        ("general.sampling.penalty_repeat", "repetition_penalty"),
    ] {
        if let Some(x) = parts.get(meta) {
            // top_k is an integer; the others are floats (a converter may write either).
            let n = match key {
                "top_k" => serde_json::Value::from(u64::try_from(x.as_int()?).ok()?),
                _ => serde_json::Value::from(x.as_f64()?),
            };
            v.insert(key.into(), n);
        }
    }
    (!v.is_empty()).then_some(serde_json::Value::Object(v))
}

/// Builds the tokenizer described by `tokenizer.ggml.*` (byte-level BPE, `gpt2` model).
pub fn tokenizer_from_metadata(parts: &GgufParts) -> Result<TextTokenizer> {
    let path = parts.path();
    let err = |msg: String| Error::file(path, format!("GGUF tokenizer: {msg}"));
    let model = parts
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| err("no `tokenizer.ggml.model` in the metadata and no tokenizer.json beside the file".into()))?;
    if model != "gpt2" {
        return Err(err(format!("tokenizer model `{model}` is not supported (only `gpt2`, byte-level BPE)")));
    }
    let strings = |key: &str| -> Result<&[String]> {
        parts
            .get(key)
            .and_then(Value::as_array)
            .and_then(Array::strings)
            .ok_or_else(|| err(format!("`{key}` is missing or not an array of strings")))
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let token_types = match parts.get("tokenizer.ggml.token_type") {
        None => None,
        Some(v) => Some(
            v.as_array()
                .and_then(Array::ints)
                .map(|t| t.into_iter().map(|x| i32::try_from(x).unwrap_or(i32::MAX)).collect::<Vec<_>>())
                .ok_or_else(|| err("`tokenizer.ggml.token_type` is not an integer array".into()))?,
        ),
    };
    let pre = parts.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let vocab = GgufVocab { tokens, token_types: token_types.as_deref(), merges, pre };
    Ok(TextTokenizer::from_gguf_vocab(&vocab, &path.display().to_string())?)
}
