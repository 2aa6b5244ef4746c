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
    /// Whether `default_sampling` came from a generation_config.json (for summary lines).
    pub sampling_from_generation_config: bool,
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
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::NotFound(tok_path));
        }
        let tokenizer = TextTokenizer::load(&tok_path)?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let mut stop_ids = model.config.eos_token_ids.clone();
        let gen_cfg = dir.join("generation_config.json");
        let mut default_sampling = SamplingParams::default();
        let mut sampling_from_generation_config = false;
        if let Ok(text) = std::fs::read_to_string(&gen_cfg) {
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

/// Peak resident set size of this process in bytes (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
