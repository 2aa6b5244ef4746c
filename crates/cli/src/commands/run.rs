//! `flashmoe run`: generate text from a prompt and print a summary line.

use crate::args::{self, DeviceArgs, EngineArgs, ModelArgs, Plan, SamplingArgs, StoreArgs, TraceArgs};
use crate::util::{fmt_bytes, print_device, print_timing, write_trace};
use anyhow::{Context, Result};
use clap::Args;
use flashmoe::generate::{Engine, GenerateOptions, peak_rss_bytes};
use flashmoe::session::Finish;
use flashmoe_text::GrammarSpec;
use serde_json::{Value as Json, json};
use std::io::Write;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; `-` reads it from stdin.
    #[arg(long, short = 'p', allow_hyphen_values = true)]
    prompt: String,
    /// Most new tokens (default 512).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Feed the prompt as-is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Render the template with enable_thinking=false.
    #[arg(long)]
    no_think: bool,
    /// Constrain the reply to JSON valid against the JSON schema in FILE (llguidance; after any
    /// thinking block). The reply ends when the JSON is complete.
    #[arg(long, value_name = "FILE", conflicts_with = "json")]
    json_schema: Option<std::path::PathBuf>,
    /// Constrain the reply to a JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print a per-layer time breakdown averaged over the decode tokens.
    #[arg(long)]
    timing: bool,
    #[command(flatten)]
    trace: TraceArgs,
}

/// `run`'s output cap when `--max-tokens` is not given: enough for a paragraph or a short
/// answer, and a bound on a reply that never emits a stop token.
pub const DEFAULT_MAX_TOKENS: usize = 512;

pub fn run(mut a: RunArgs) -> Result<()> {
    if a.prompt == "-" {
        a.prompt = read_stdin_prompt()?;
    }
    let max_tokens = a.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let model_dir = a.model.dir()?;
    let model_path = model_dir.as_path();
    // The plan needs a context size before the prompt is tokenized: the prompt text's bytes bound
    // its token count.
    let context = a.engine.max_context.unwrap_or(0).max(
        a.prompt
            .len()
            .saturating_add(a.system.as_ref().map_or(0, |s| s.len()))
            .saturating_add(64)
            .saturating_add(max_tokens),
    );
    let plan =
        Plan { context_tokens: context, batch_tokens: a.prompt.len().saturating_add(64), logits_rows: 1, sequences: 1 };
    let mut opts = args::load_options(model_path, &a.store, &a.device, &a.engine, plan)?;
    opts.timing = a.timing;
    a.trace.apply(&mut opts);
    let engine = crate::util::loading(model_path, || Engine::load_with(model_path, &opts))?;
    print_device(&engine.model);
    if let Some(store) = engine.model.expert_store() {
        eprintln!(
            "[flashmoe] experts: {} on disk, streamed; io {}; RAM cache {} ({})",
            fmt_bytes(store.total_expert_bytes()),
            store.mode_note,
            fmt_bytes(store.ram_cache_budget()),
            store.cache_policy().name()
        );
    } else if let Some(note) = engine.model.mapped_note() {
        eprintln!("[flashmoe] experts: io {note}");
    }
    if a.timing && engine.model.tier().is_some() {
        eprintln!(
            "[flashmoe] --timing: the GPU synchronizes at every layer phase to time it (no graphs, less overlap)"
        );
    }
    // --raw text is the whole prompt, control tokens included; the chat prompt's text is
    // content, and only the template's own markup becomes control tokens.
    let ids = if a.raw {
        engine.encode(&a.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": a.prompt}));
        engine.encode_chat(&Json::Array(messages), None, if a.no_think { Some(false) } else { None }, None)?
    };
    let sampling = a.sampling.params(&engine.default_sampling);
    let sampler = a.sampling.describe(&sampling, engine.sampling_from_generation_config, engine.sampling_source);
    let spec = match (&a.json_schema, a.json) {
        (Some(path), _) => {
            let text = flashmoe_text::file::read_text(path).with_context(|| format!("reading {}", path.display()))?;
            let schema: Json =
                serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
            Some((GrammarSpec::JsonSchema(schema), path.display().to_string()))
        }
        (None, true) => Some((GrammarSpec::JsonObject, "--json".to_string())),
        (None, false) => None,
    };
    let constraint = match spec {
        Some((spec, origin)) => Some(
            engine
                .grammars()?
                .compile(&spec)
                .map_err(|e| anyhow::anyhow!("{origin}: cannot constrain the reply: {e}"))?,
        ),
        None => None,
    };
    let opts = GenerateOptions { max_tokens, sampling, constraint };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let stats = engine.generate(&ids, &opts, |piece| {
        // A closed pipe (e.g. `| head`) stops generation instead of failing.
        out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_ok()
    })?;
    let _ = writeln!(out);
    drop(out);
    let m = &engine.model;
    if let Some(path) = &a.trace.trace_routing {
        let records: Vec<(usize, usize, Vec<u32>)> =
            m.take_routing_trace().into_iter().map(|r| (r.layer, r.pos, r.experts)).collect();
        write_trace(path, m, &records)?;
    }
    if let Some(times) = m.timing_snapshot() {
        print_timing(&times, stats.decode_steps, m);
    }
    let io = match (m.expert_store(), &stats.io_decode) {
        (Some(store), Some(d)) => format!(
            " | disk {}/token | RAM cache hit {:.0}% | io {}",
            fmt_bytes(d.disk_bytes / stats.decode_steps.max(1) as u64),
            100.0 * d.ram_hit_rate(),
            store.mode().name()
        ),
        _ => " | experts mapped from the checkpoint (page cache)".to_string(),
    };
    let io = if a.engine.prefetch {
        let (h, t) = m.prefetch_accuracy();
        let used = stats.io_decode.map_or(0, |d| d.prefetch_used);
        let issued = stats.io_decode.map_or(0, |d| d.prefetch_issued);
        format!("{io} | prefetch accuracy {:.0}% ({used}/{issued} reads used)", 100.0 * h as f64 / t.max(1) as f64)
    } else {
        io
    };
    let io = match m.tier() {
        // GPU expert cache over the whole run (prefill + decode): hit rate and bytes copied in.
        Some(t) => {
            let s = t.counters;
            let per_token = |n: u64| n as f64 / s.tokens.max(1) as f64;
            let cpu = if s.cpu_experts > 0 || s.pcie_experts > 0 {
                format!(
                    ", CPU computed {:.1} experts/token, {:.1} crossed PCIe",
                    per_token(s.cpu_experts),
                    per_token(s.pcie_experts)
                )
            } else {
                String::new()
            };
            // A model split over GPUs: each one's hit rate too.
            let stages = m.stage_tiers();
            let per_gpu = if stages.len() > 1 {
                let each: Vec<String> = stages
                    .iter()
                    .map(|(r, t)| format!("layers {}–{} {:.0}%", r.start, r.end - 1, 100.0 * t.counters.hit_rate()))
                    .collect();
                format!(" ({})", each.join(", "))
            } else {
                String::new()
            };
            format!(
                "{io} | GPU expert cache hit {:.0}%{per_gpu}, host→GPU {}/token{cpu}",
                100.0 * s.hit_rate(),
                fmt_bytes(s.h2d_bytes / s.tokens.max(1))
            )
        }
        None => io,
    };
    let stop = match stats.finish {
        Finish::Stop | Finish::StopString(_) => "stop token".to_string(),
        Finish::Length if a.max_tokens.is_none() => {
            format!("default max tokens {DEFAULT_MAX_TOKENS}, --max-tokens N for more")
        }
        Finish::Length => "max tokens".to_string(),
        Finish::Context => "context full".to_string(),
        Finish::Cancelled => "output closed".to_string(),
    };
    eprintln!(
        "[flashmoe] prompt {} tok | prefill {:.1} tok/s | decode {:.2} tok/s ({} tok, {}) | {sampler} | peak RSS {} | experts {}/{} per token ({}){io}",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.decode_tok_s(),
        stats.completion_tokens,
        stop,
        peak_rss_bytes().map_or("n/a".into(), fmt_bytes),
        m.experts_per_token(),
        m.config.num_experts,
        if m.routing_is_exact() {
            "exact".to_string()
        } else {
            format!("REDUCED from the model's {}: lossy", m.config.experts_per_token)
        },
    );
    Ok(())
}

/// `--prompt -`: the whole of stdin, without its final newline (what `echo` and here-strings add).
fn read_stdin_prompt() -> Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .map_err(|e| anyhow::anyhow!("--prompt -: cannot read the prompt from stdin: {e}"))?;
    let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_string();
    if text.is_empty() {
        anyhow::bail!("--prompt -: stdin was empty (pipe the prompt in, e.g. `echo hi | flashmoe run --prompt -`)");
    }
    Ok(text)
}
