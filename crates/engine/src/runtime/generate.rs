//! Text in, text out: an `Engine` bundles a model with its tokenizer and chat template and runs
//! the prefill + decode loop with sampling, streaming decoded text to a callback and measuring
//! what the summary line reports.

use crate::error::{Error, Result};
use crate::experts::IoSnapshot;
use crate::qwen35::{LoadOptions, LogitsFor, Model};
use flashmoe_text::{ChatTemplate, Sampler, SamplingParams, TextTokenizer};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Engine {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub model_dir: PathBuf,
    /// Token ids that end a generation: the config's EOS ids, generation_config.json's, and the
    /// tokenizer's `<|im_end|>` / `<|endoftext|>` when present.
    pub stop_ids: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    Context,
    /// The callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    /// Time of the decode steps (every generated token after the first, which comes from the
    /// prefill's logits).
    pub decode_secs: f64,
    pub decode_steps: usize,
    pub stop: StopReason,
    /// Expert I/O during the prefill and during decode (streamed models only).
    pub io_prefill: Option<IoSnapshot>,
    pub io_decode: Option<IoSnapshot>,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
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
        if let Ok(text) = std::fs::read_to_string(&gen_cfg) {
            let v: Json =
                serde_json::from_str(&text).map_err(|e| Error::file(&gen_cfg, format!("malformed JSON: {e}")))?;
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
        Ok(Engine { model, tokenizer, template, model_dir: dir.to_path_buf(), stop_ids })
    }

    /// Renders OpenAI-style messages with the model's own chat template.
    pub fn render_chat(&self, messages: &Json, tools: Option<&Json>, enable_thinking: Option<bool>) -> Result<String> {
        Ok(self.template.render(messages, tools, true, enable_thinking, None)?)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false)?)
    }

    /// Prefills `prompt` and generates up to `max_tokens`, calling `on_text` with each decoded
    /// piece of text (return false to stop).
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        if prompt.is_empty() {
            return Err(Error::input("the prompt is empty (0 tokens)"));
        }
        let mut state = self.model.new_state();
        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut stream = self.tokenizer.stream_decoder(true);
        let io = |m: &Model| m.expert_store.as_ref().map(|s| s.snapshot());
        let io0 = io(&self.model);
        let t0 = Instant::now();
        let mut logits = self.model.forward(prompt, &mut state, LogitsFor::Last)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let io1 = io(&self.model);
        // Timing and per-token I/O describe decode alone.
        self.model.reset_timing();
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: 0,
            prefill_secs,
            decode_secs: 0.0,
            decode_steps: 0,
            stop: StopReason::Length,
            io_prefill: io1.zip(io0).map(|(b, a)| b.since(&a)),
            io_decode: None,
        };
        let mut generated: Vec<u32> = Vec::new();
        let mut context: Vec<u32> = prompt.to_vec();
        let t1 = Instant::now();
        while stats.generated_tokens < opts.max_tokens {
            let id = sampler.sample(&mut logits, &context, &generated);
            stats.generated_tokens += 1;
            if self.stop_ids.contains(&id) {
                stats.stop = StopReason::Stop;
                break;
            }
            generated.push(id);
            context.push(id);
            let piece = stream.push(id)?;
            if !piece.is_empty() && !on_text(&piece) {
                stats.stop = StopReason::Cancelled;
                break;
            }
            if stats.generated_tokens >= opts.max_tokens {
                break;
            }
            if state.pos >= self.model.max_context() {
                stats.stop = StopReason::Context;
                break;
            }
            logits = self.model.forward(&[id], &mut state, LogitsFor::Last)?;
            stats.decode_steps += 1;
        }
        stats.decode_secs = t1.elapsed().as_secs_f64();
        stats.io_decode = io(&self.model).zip(io1).map(|(b, a)| b.since(&a));
        let tail = stream.finish()?;
        if !tail.is_empty() {
            on_text(&tail);
        }
        Ok(stats)
    }
}

/// Peak resident set size of this process in bytes (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
