//! Text in, text out: an `Engine` bundles a model with its tokenizer and chat template; its
//! `generate` is the session loop ([`super::session`]) without state reuse.

use super::model::{LoadOptions, Model};
use super::session::{self, Channel, GenerateRequest, Generation, PrefixCache};
use crate::error::{Error, Result};
use flashmoe_text::{ChatTemplate, Constraint, Grammars, SamplingParams, TextTokenizer};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub struct Engine {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub model_dir: PathBuf,
    /// Token ids that end a generation: the config's EOS ids, generation_config.json's, and the
    /// tokenizer's `<|im_end|>` / `<|endoftext|>` when present.
    pub stop_ids: Vec<u32>,
    /// Sampling when a request or the command line sets nothing: the model's
    /// generation_config.json ([`SamplingParams::from_generation_config`]), greedy without one.
    pub default_sampling: SamplingParams,
    /// Whether `default_sampling` came from the model (generation_config.json, or a GGUF's
    /// `general.sampling.*`), for summary lines.
    pub sampling_from_generation_config: bool,
    /// Where the model's sampling defaults live: "generation_config.json" or "GGUF general.sampling".
    pub sampling_source: &'static str,
    /// The grammar compiler over this tokenizer, built on first use (constrained decoding,
    /// token bytes for logprobs); the error is kept when it cannot be built.
    grammars: OnceLock<std::result::Result<Grammars, String>>,
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// A grammar the reply must match ([`Engine::grammars`]); thinking, if the prompt opens it,
    /// stays free and is passed to `on_text` without its tags.
    pub constraint: Option<Constraint>,
}

impl Engine {
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::default())
    }

    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let model = Model::load_with(dir, opts)?;
        let mut stop_ids = model.config.eos_token_ids.clone();
        let mut default_sampling = SamplingParams::default();
        let mut sampling_from_generation_config = false;
        let (tokenizer, template) = if crate::gguf::is_gguf(dir) {
            // Everything but the weights comes from the file's metadata (a tokenizer.json beside
            // it wins: it is the model's own definition).
            let parts = crate::gguf::GgufParts::open(dir)?;
            let tokenizer = crate::gguf::GgufModel::tokenizer_of(&parts)?;
            let template = gguf_chat_template(&parts, &tokenizer)?;
            if let Some(v) = crate::gguf::sampling_defaults(&parts) {
                default_sampling = SamplingParams::from_generation_config(&v)
                    .map_err(|e| Error::file(dir, format!("GGUF general.sampling.*: {e}")))?;
                sampling_from_generation_config = true;
            }
            (tokenizer, template)
        } else {
            let tok_path = dir.join("tokenizer.json");
            if !tok_path.exists() {
                return Err(Error::NotFound(tok_path));
            }
            let tokenizer = TextTokenizer::load(&tok_path)?;
            let template = ChatTemplate::from_model_dir(dir)?;
            let gen_cfg = dir.join("generation_config.json");
            if gen_cfg.exists() {
                let text = flashmoe_text::file::read_text(&gen_cfg).map_err(|e| Error::io(&gen_cfg, e))?;
                let v: Json =
                    serde_json::from_str(&text).map_err(|e| Error::file(&gen_cfg, format!("malformed JSON: {e}")))?;
                default_sampling = SamplingParams::from_generation_config(&v).map_err(|e| Error::file(&gen_cfg, e))?;
                sampling_from_generation_config = true;
                match v.get("eos_token_id") {
                    Some(Json::Number(n)) => stop_ids.extend(n.as_u64().map(|x| x as u32)),
                    Some(Json::Array(a)) => stop_ids.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32))),
                    _ => {}
                }
            }
            (tokenizer, template)
        };
        for s in ["<|im_end|>", "<|endoftext|>"] {
            stop_ids.extend(tokenizer.token_to_id(s));
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Engine {
            model,
            tokenizer,
            template,
            model_dir: dir.to_path_buf(),
            sampling_source: if crate::gguf::is_gguf(dir) { "GGUF general.sampling" } else { "generation_config.json" },
            stop_ids,
            default_sampling,
            sampling_from_generation_config,
            grammars: OnceLock::new(),
        })
    }

    /// The grammar compiler for this model's tokenizer (built once, about a second for a
    /// 248k vocabulary).
    pub fn grammars(&self) -> Result<&Grammars> {
        self.grammars
            .get_or_init(|| Grammars::new(&self.tokenizer, self.model.config.vocab_size, &self.stop_ids))
            .as_ref()
            .map_err(|e| Error::input(format!("constrained decoding is unavailable for this tokenizer: {e}")))
    }

    /// Renders OpenAI-style messages with the model's own chat template.
    pub fn render_chat(&self, messages: &Json, tools: Option<&Json>, enable_thinking: Option<bool>) -> Result<String> {
        Ok(self.template.render(messages, tools, true, enable_thinking, None)?)
    }

    /// Renders OpenAI-style messages with the model's own chat template (generation prompt
    /// appended) and tokenizes them; special-token strings inside the messages' content are
    /// plain text, only the template's markup is control tokens
    /// ([`ChatTemplate::encode_chat`](flashmoe_text::ChatTemplate::encode_chat)).
    pub fn encode_chat(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        enable_thinking: Option<bool>,
        extra: Option<&serde_json::Map<String, Json>>,
    ) -> Result<Vec<u32>> {
        Ok(self.template.encode_chat(&self.tokenizer, messages, tools, true, enable_thinking, extra)?)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false)?)
    }

    /// Prefills `prompt` and generates up to `max_tokens`, calling `on_text` with each decoded
    /// piece of text (return false to stop). Thinking tags are plain text here.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let req = GenerateRequest {
            prompt: prompt.to_vec(),
            max_tokens: opts.max_tokens,
            sampling: opts.sampling.clone(),
            // The constraint starts after `</think>`: the loop must see the thinking block.
            split_reasoning: opts.constraint.is_some(),
            constraint: opts.constraint.clone(),
            ..Default::default()
        };
        session::generate(self, &mut PrefixCache::new(0), &req, || true, |_: Channel, text: &str| on_text(text), |_| {})
    }
}

/// The chat template a GGUF carries (`tokenizer.chat_template`), with its BOS/EOS token texts as
/// the template's special tokens; ChatML when it has none.
fn gguf_chat_template(parts: &crate::gguf::GgufParts, tok: &TextTokenizer) -> Result<ChatTemplate> {
    let mut tpl = match parts.get("tokenizer.chat_template").and_then(crate::gguf::Value::as_str) {
        Some(src) => ChatTemplate::from_source(src)?,
        None => ChatTemplate::chatml(),
    };
    tpl.set_special_tokens_from_config(&Json::Object(crate::gguf::special_tokens(parts, tok)));
    Ok(tpl)
}

/// Peak resident set size of this process in bytes (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
