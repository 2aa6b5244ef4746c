//! `flashmoe`: the command-line front end. A thin layer over the engine library: parse flags,
//! call the engine, print. Every failure is one line on stderr and a non-zero exit.

mod bench_cmd;
mod chat_cmd;
#[cfg(feature = "cuda")]
mod gpubench_cmd;
#[cfg(feature = "cuda")]
mod selftest_cmd;

mod routing_cmd;
mod serve_cmd;
mod synth_cmd;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use flashmoe::experts::IoChoice;
use flashmoe::generate::{Engine, GenerateOptions, StopReason, peak_rss_bytes};
use flashmoe::memory::parse_size;
use flashmoe::packed::convert::{ConvertOptions, ConvertProgress, Target};
use flashmoe::qwen35::LoadOptions;
use flashmoe::{LogitsFor, Model};
use flashmoe_text::{ChatTemplate, SamplingParams, TextTokenizer};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value as Json, json};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;

#[derive(Parser)]
#[command(
    name = "flashmoe",
    version,
    about = "Run Mixture-of-Experts language models (Qwen3.5-MoE, Qwen3-Next) exactly, on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (chat template applied unless --raw) and print a summary line.
    Run(RunArgs),
    /// Print the logits the model gives for a list of token ids.
    Logits(LogitsArgs),
    /// Tokenize text (or, with --chat, render a chat request read from stdin).
    Tokenize(TokenizeArgs),
    /// Describe a model folder: architecture, layers, weight formats and sizes.
    Info(InfoArgs),
    /// Convert an HF / MLX / packed checkpoint into a packed model directory (experts one blob each).
    Convert(ConvertArgs),
    /// Check a packed model's sizes and checksums; names the first bad tensor or expert.
    Verify(VerifyArgs),
    /// Write a random-weight packed model with a real geometry (for benchmarks; no download).
    Synth(synth_cmd::SynthArgs),
    /// Routing statistics of a --trace-routing file: gini, top-20% coverage, overlap, LRU curves.
    RoutingStats(routing_cmd::RoutingStatsArgs),
    /// Perplexity of a model over a text file (windows of --window tokens, each from an empty state).
    Ppl(PplArgs),
    /// List compute devices (CPU SIMD level, CUDA GPUs when built with the `cuda` feature).
    Devices,
    /// Benchmarks: expert reads, end-to-end decode against its floor, RAM-cache sweeps.
    Bench(bench_cmd::BenchArgs),
    /// OpenAI- and Anthropic-compatible HTTP server (chat, completions, messages, tools, metrics).
    Serve(serve_cmd::ServeArgs),
    /// Interactive terminal chat with tools (bash, read_file) against a server (--url) or a model (--model).
    Chat(chat_cmd::ChatArgs),
    /// Check every GPU kernel against the CPU kernels on random inputs (non-zero exit on failure).
    #[cfg(feature = "cuda")]
    Selftest(selftest_cmd::SelftestArgs),
    /// GPU benchmarks: GEMV bandwidth against the device-to-device copy bandwidth.
    #[cfg(feature = "cuda")]
    Gpubench(gpubench_cmd::GpubenchArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Model folder (HF/MLX safetensors or packed). Default: the built-in small trained model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Feed the prompt as-is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Render the template with enable_thinking=false.
    #[arg(long)]
    no_think: bool,
    /// 0 = greedy (the default: deterministic).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Routed experts per token. Default: the model's own number (exact). Fewer is lossy.
    #[arg(long)]
    experts: Option<usize>,
    /// Refuse prompts longer than this many tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    max_context: Option<usize>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print a per-layer time breakdown averaged over the decode tokens.
    #[arg(long)]
    timing: bool,
    /// Write the experts chosen for every token and layer to FILE (JSON lines; see routing-stats).
    #[arg(long)]
    trace_routing: Option<PathBuf>,
    /// Read layer l+1's likely experts while layer l computes (its router applied to layer l's
    /// hidden state). Off by default: it only wins when reads are slow and guesses good.
    #[arg(long)]
    prefetch: bool,
}

/// Where the forward pass runs.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// auto (a GPU when one works and the model fits, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: flashmoe::device::DeviceChoice,
    /// GPU memory for routed experts (e.g. 20G), or auto: what is free after the weights, the
    /// workspace and 8K tokens of state, minus a margin.
    #[arg(long, default_value = "auto")]
    pub gpu_cache: flashmoe::device::GpuCache,
}

impl DeviceArgs {
    pub fn options(&self) -> flashmoe::device::DeviceOptions {
        flashmoe::device::DeviceOptions { device: self.device, gpu_cache: self.gpu_cache }
    }
}

/// Prints where the model runs (and why `auto` stayed on the CPU, when it did).
pub fn print_device(m: &Model) {
    if let Some(note) = &m.device_note {
        eprintln!("[flashmoe] device: cpu ({note})");
        return;
    }
    #[cfg(feature = "cuda")]
    if let Some(g) = &m.gpu {
        eprintln!("[flashmoe] device: {}", g.describe(m));
        return;
    }
    eprintln!("[flashmoe] device: cpu");
}

/// How a packed model's experts are read and cached.
#[derive(Args)]
struct StoreArgs {
    /// Expert reads: through the page cache, O_DIRECT, or auto (measured at start).
    #[arg(long, default_value = "auto")]
    io: IoChoice,
    /// RAM expert cache (e.g. 4G). Default: what --memory-budget leaves, else none (in page mode
    /// the OS page cache is the RAM tier).
    #[arg(long)]
    ram_cache: Option<String>,
    /// Bound on resident memory (e.g. 16G): weights + state + buffers + RAM expert cache.
    #[arg(long)]
    memory_budget: Option<String>,
    /// Expert reads in flight at once.
    #[arg(long, default_value_t = 8)]
    io_threads: usize,
    /// RAM cache eviction: lfu (with aging, half-life 32 tokens; the default, chosen by replaying
    /// routing traces, docs/performance.md), lfu:N (half-life N tokens) or lru.
    #[arg(long, default_value = "lfu")]
    cache_policy: flashmoe::experts::cache::CachePolicy,
}

impl StoreArgs {
    /// Load options (and the expert fetch chunk), after printing the memory plan when a budget
    /// is set.
    fn load_options(&self, dir: &Path, context_tokens: usize, batch_tokens: usize) -> Result<(LoadOptions, usize)> {
        let mut opts = LoadOptions::default();
        let mut chunk = 32;
        opts.store.io = self.io;
        opts.store.io_threads = self.io_threads;
        opts.store.cache_policy = self.cache_policy;
        if let Some(b) = &self.memory_budget {
            let budget = parse_size(b).map_err(|e| anyhow!("--memory-budget {e}"))?;
            // Under a budget, fetch one token's worth of experts at a time.
            chunk = flashmoe::ModelConfig::load(dir)?.experts_per_token;
            let plan = flashmoe::memory::plan(dir, budget, context_tokens, chunk, batch_tokens, self.io_threads)?;
            eprintln!("[flashmoe] plan: {}", plan.describe());
            opts.store.ram_cache_bytes = plan.ram_cache;
            if let Some(r) = &self.ram_cache {
                let r = parse_size(r).map_err(|e| anyhow!("--ram-cache {e}"))?;
                if r > plan.ram_cache {
                    bail!(
                        "--ram-cache {} does not fit the memory budget (room for {})",
                        fmt_bytes(r),
                        fmt_bytes(plan.ram_cache)
                    );
                }
                opts.store.ram_cache_bytes = r;
            }
        } else if let Some(r) = &self.ram_cache {
            opts.store.ram_cache_bytes = parse_size(r).map_err(|e| anyhow!("--ram-cache {e}"))?;
        }
        Ok((opts, chunk))
    }
}

#[derive(Args)]
struct LogitsArgs {
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long)]
    ids: String,
    /// Feed the ids one at a time through the caches instead of one batched prefill.
    #[arg(long)]
    decode: bool,
    /// Print {"ids": [...], "logits": [[...], ...]} (otherwise a short human-readable summary).
    #[arg(long)]
    json: bool,
    #[arg(long)]
    experts: Option<usize>,
    #[arg(long)]
    max_context: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct TokenizeArgs {
    #[arg(long, conflicts_with = "tokenizer", required_unless_present = "tokenizer")]
    model: Option<PathBuf>,
    /// A tokenizer.json file.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Print a JSON array of ids.
    #[arg(long)]
    json: bool,
    /// Read an OpenAI-style {"messages": [...], "tools": [...]} from stdin and print the prompt
    /// rendered by the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Render with enable_thinking=false (with --chat).
    #[arg(long)]
    no_think: bool,
    /// Text to tokenize.
    #[arg(required_unless_present = "chat")]
    text: Option<String>,
}

#[derive(Args)]
struct ConvertArgs {
    /// Source model folder (HF safetensors, MLX, or packed).
    src: PathBuf,
    /// Destination folder (written as DST.partial, renamed when complete).
    dst: PathBuf,
    /// Routed experts: 2, 4, 8, bf16, f16, f32 or keep. Default: keep quantized experts, quantize float ones to 4 bits.
    #[arg(long)]
    expert_bits: Option<Target>,
    /// Everything else: 4, 8, bf16, f16, f32 or keep. Default: keep quantized tensors, quantize float ones to 8 bits.
    #[arg(long)]
    bits: Option<Target>,
    /// Group size of newly quantized matrices.
    #[arg(long, default_value_t = 64)]
    group_size: usize,
    /// Replace DST if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct PplArgs {
    #[arg(long)]
    model: PathBuf,
    /// Plain-text file.
    #[arg(long)]
    file: PathBuf,
    /// Routed experts per token (default: the model's own; fewer is lossy).
    #[arg(long)]
    experts: Option<usize>,
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Use only the first N tokens of the file.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Write the experts chosen for every token and layer to FILE (positions numbered across
    /// windows).
    #[arg(long)]
    trace_routing: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyArgs {
    dir: PathBuf,
}

#[derive(Args)]
struct InfoArgs {
    #[arg(long)]
    model: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Logits(a) => logits(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Info(a) => info(a),
        Command::Convert(a) => convert(a),
        Command::Verify(a) => verify(a),
        Command::Ppl(a) => ppl(a),
        Command::Synth(a) => synth_cmd::run(a),
        Command::RoutingStats(a) => routing_cmd::run(a),
        Command::Devices => devices(),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Serve(a) => serve_cmd::run(a),
        Command::Chat(a) => chat_cmd::run(a),
        #[cfg(feature = "cuda")]
        Command::Selftest(a) => selftest_cmd::run(a),
        #[cfg(feature = "cuda")]
        Command::Gpubench(a) => gpubench_cmd::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, so the file and the problem are both named.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The small Qwen3.5-MoE model trained for flashmoe (models/qwen35-moe-tiny-trained), embedded
/// so that `run` works with nothing downloaded.
const BUILTIN_NAME: &str = "qwen35-moe-tiny-trained";
const BUILTIN_FILES: [(&str, &[u8]); 5] = [
    ("config.json", include_bytes!("../../../models/qwen35-moe-tiny-trained/config.json")),
    ("model.safetensors", include_bytes!("../../../models/qwen35-moe-tiny-trained/model.safetensors")),
    ("tokenizer.json", include_bytes!("../../../models/qwen35-moe-tiny-trained/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../../models/qwen35-moe-tiny-trained/tokenizer_config.json")),
    ("chat_template.jinja", include_bytes!("../../../models/qwen35-moe-tiny-trained/chat_template.jinja")),
];

fn run(mut a: RunArgs) -> Result<()> {
    let model_dir = match a.model.take() {
        Some(m) => m,
        None => {
            let dir = flashmoe::builtin::materialize(BUILTIN_NAME, &BUILTIN_FILES)?;
            eprintln!(
                "[flashmoe] model: built-in {BUILTIN_NAME} (19.8M parameters, trained on Debian documentation; packed at {})",
                dir.display()
            );
            dir
        }
    };
    let a = RunArgs { model: Some(model_dir.clone()), ..a };
    let model_path = model_dir.as_path();
    // The plan needs a context size before the prompt is tokenized: the prompt text's bytes bound
    // its token count.
    let context =
        a.max_context.unwrap_or(0).max(a.prompt.len() + a.system.as_ref().map_or(0, |s| s.len()) + 64 + a.max_tokens);
    let (mut opts, chunk) = a.store.load_options(model_path, context, a.prompt.len() + 64)?;
    opts.device = a.device.options();
    let mut engine = Engine::load_with(model_path, &opts)?;
    print_device(&engine.model);
    engine.model.fetch_chunk = chunk;
    if let Some(store) = &engine.model.expert_store {
        eprintln!(
            "[flashmoe] experts: {} on disk, streamed; io {}; RAM cache {} ({})",
            fmt_bytes(store.total_expert_bytes()),
            store.mode_note,
            fmt_bytes(store.ram_cache_budget()),
            store.cache_policy().name()
        );
    }
    if a.timing {
        if engine.model.device_name() != "cpu" {
            eprintln!("[flashmoe] --timing: the per-layer breakdown is measured by the CPU backend only");
        }
        engine.model.enable_timing();
    }
    engine.model.prefetch = a.prefetch;
    if a.trace_routing.is_some() {
        engine.model.routing_trace = Some(Default::default());
    }
    if let Some(k) = a.experts {
        engine.model.set_experts_per_token(k)?;
    }
    if let Some(n) = a.max_context {
        engine.model.set_max_context(n);
    }
    let prompt_text = if a.raw {
        a.prompt.clone()
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": a.prompt}));
        engine.render_chat(&Json::Array(messages), None, if a.no_think { Some(false) } else { None })?
    };
    let ids = engine.encode(&prompt_text)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            presence_penalty: a.presence_penalty,
            seed: a.seed,
            ..SamplingParams::default()
        },
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let stats = engine.generate(&ids, &opts, |piece| {
        // A closed pipe (e.g. `| head`) stops generation instead of failing.
        out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_ok()
    })?;
    let _ = writeln!(out);
    drop(out);
    let m = &engine.model;
    if let (Some(path), Some(trace)) = (&a.trace_routing, &m.routing_trace) {
        let c = &m.config;
        let header = flashmoe::routing::TraceHeader::new(c.num_layers, c.num_experts, m.experts_per_token());
        let mut w = flashmoe::routing::TraceWriter::new(path, header)?;
        let records: Vec<(usize, usize, Vec<u32>)> =
            trace.lock().unwrap().iter().map(|r| (r.layer, r.pos, r.experts.clone())).collect();
        w.write_decisions(&records)?;
        w.flush()?;
    }
    if let Some(times) = m.timing_snapshot() {
        print_timing(&times, stats.decode_steps, m);
    }
    let io = match (&m.expert_store, &stats.io_decode) {
        (Some(store), Some(d)) => format!(
            " | disk {}/token | RAM cache hit {:.0}% | io {}",
            fmt_bytes(d.disk_bytes / stats.decode_steps.max(1) as u64),
            100.0 * d.ram_hit_rate(),
            store.mode().name()
        ),
        _ => " | experts mapped from the checkpoint (page cache)".to_string(),
    };
    let io = if m.prefetch {
        let (h, t) = (m.prefetch_hits.load(Relaxed), m.prefetch_total.load(Relaxed));
        let used = stats.io_decode.map_or(0, |d| d.prefetch_used);
        let issued = stats.io_decode.map_or(0, |d| d.prefetch_issued);
        format!("{io} | prefetch accuracy {:.0}% ({used}/{issued} reads used)", 100.0 * h as f64 / t.max(1) as f64)
    } else {
        io
    };
    #[cfg(feature = "cuda")]
    let io = match &m.gpu {
        // GPU expert cache over the whole run (prefill + decode): hit rate and bytes copied in.
        Some(g) => {
            let s = g.snapshot();
            format!(
                "{io} | GPU expert cache hit {:.0}%, host→GPU {}/token",
                100.0 * s.hit_rate(),
                fmt_bytes(s.h2d_bytes / s.tokens.max(1))
            )
        }
        None => io,
    };
    let stop = match stats.stop {
        StopReason::Stop => "stop token",
        StopReason::Length => "max tokens",
        StopReason::Context => "context full",
        StopReason::Cancelled => "output closed",
    };
    eprintln!(
        "[flashmoe] prompt {} tok | prefill {:.1} tok/s | decode {:.2} tok/s ({} tok, {}) | peak RSS {} | experts {}/{} per token ({}){io}",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.decode_tok_s(),
        stats.generated_tokens,
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

fn print_timing(times: &[flashmoe::qwen35::LayerTimes], steps: usize, m: &Model) {
    let n = steps.max(1) as f64;
    let ms = |x: f64| x * 1e3 / n;
    eprintln!("per-layer time per decode token, ms (averaged over {steps} tokens):");
    eprintln!(
        "{:>5} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "layer", "kind", "mixer", "router", "io wait", "experts", "other", "total"
    );
    let mut sum = flashmoe::qwen35::LayerTimes::default();
    for (i, t) in times.iter().enumerate() {
        let kind = match m.config.layer_kinds[i] {
            flashmoe::config::LayerKind::FullAttention => "attn",
            flashmoe::config::LayerKind::LinearAttention => "delta",
        };
        eprintln!(
            "{i:>5} {kind:>6} {:>9.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            ms(t.mixer),
            ms(t.router),
            ms(t.io_wait),
            ms(t.experts),
            ms(t.other),
            ms(t.total())
        );
        sum.add(t);
    }
    eprintln!(
        "{:>5} {:>6} {:>9.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
        "all",
        "",
        ms(sum.mixer),
        ms(sum.router),
        ms(sum.io_wait),
        ms(sum.experts),
        ms(sum.other),
        ms(sum.total())
    );
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u32>().map_err(|_| anyhow!("--ids: `{x}` is not a token id (non-negative integer)")))
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--ids: no token ids given");
    }
    Ok(ids)
}

fn logits(a: LogitsArgs) -> Result<()> {
    let ids = parse_ids(&a.ids)?;
    let opts = flashmoe::qwen35::LoadOptions { device: a.device.options(), ..Default::default() };
    let mut model = Model::load_with(&a.model, &opts)?;
    print_device(&model);
    if let Some(k) = a.experts {
        model.set_experts_per_token(k)?;
    }
    if let Some(n) = a.max_context {
        model.set_max_context(n);
    }
    let v = model.config.vocab_size;
    let mut state = model.new_state();
    let rows = if a.decode {
        let mut all = Vec::with_capacity(ids.len() * v);
        for &id in &ids {
            all.extend(model.forward(&[id], &mut state, LogitsFor::Last)?);
        }
        all
    } else {
        model.forward(&ids, &mut state, LogitsFor::All)?
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if a.json {
        let logits: Vec<&[f32]> = rows.chunks(v).collect();
        serde_json::to_writer(&mut out, &json!({"ids": ids, "logits": logits}))?;
        writeln!(out)?;
    } else {
        for (i, row) in rows.chunks(v).enumerate() {
            let mut top: Vec<usize> = (0..v).collect();
            top.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
            let best: Vec<String> = top[..5.min(v)].iter().map(|&t| format!("{t}:{:.4}", row[t])).collect();
            writeln!(out, "pos {i} id {}: top {}", ids[i], best.join(" "))?;
        }
    }
    out.flush()?;
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok_path = match (&a.model, &a.tokenizer) {
        (Some(m), _) => m.join("tokenizer.json"),
        (None, Some(t)) => t.clone(),
        (None, None) => bail!("give --model DIR or --tokenizer FILE"),
    };
    if a.chat {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).context("reading the chat request from stdin")?;
        let req: Json = serde_json::from_str(&input).map_err(|e| anyhow!("stdin: malformed JSON: {e}"))?;
        let messages = req.get("messages").ok_or_else(|| anyhow!("stdin: missing field `messages`"))?;
        let template = match &a.model {
            Some(m) => ChatTemplate::from_model_dir(m)?,
            None => {
                let cfg = tok_path.with_file_name("tokenizer_config.json");
                match ChatTemplate::from_tokenizer_config(&cfg) {
                    Ok(Some(t)) => t,
                    _ => ChatTemplate::chatml(),
                }
            }
        };
        let thinking =
            req.get("enable_thinking").and_then(Json::as_bool).or(if a.no_think { Some(false) } else { None });
        let add_gen = req.get("add_generation_prompt").and_then(Json::as_bool).unwrap_or(true);
        let text = template.render(messages, req.get("tools"), add_gen, thinking, None)?;
        if a.json {
            let tok = TextTokenizer::load(&tok_path)?;
            println!("{}", serde_json::to_string(&tok.encode(&text, false)?)?);
        } else {
            print!("{text}");
        }
        return Ok(());
    }
    let tok = TextTokenizer::load(&tok_path)?;
    let ids = tok.encode(a.text.as_deref().unwrap_or_default(), false)?;
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    }
    Ok(())
}

/// A progress bar for `convert` and `synth`.
pub(crate) struct Bar(pub(crate) ProgressBar);

impl ConvertProgress for Bar {
    fn start(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) -> bool {
        self.0.inc(bytes);
        true
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
}

fn convert(a: ConvertArgs) -> Result<()> {
    let mut opts = ConvertOptions { group_size: a.group_size, force: a.force, ..ConvertOptions::default() };
    if let Some(t) = a.expert_bits {
        opts.expert = t;
    }
    if let Some(t) = a.bits {
        if t == Target::Affine(2) {
            bail!("--bits 2 is not offered for non-expert weights (attention, embeddings, routers): use 4 or 8");
        }
        opts.other = t;
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    let bar = Bar(bar);
    let t0 = std::time::Instant::now();
    let rep = flashmoe::packed::convert::convert(&a.src, &a.dst, &opts, &bar)?;
    bar.0.finish_and_clear();
    if !rep.rmse.is_empty() {
        eprintln!("requantization error (RMSE against the source values, and the source RMS for scale):");
        eprintln!("{:>6}  {:<28} {:>12} {:>12}  {:>10} {:>10}", "layer", "projection", "from", "to", "rmse", "rms");
        for r in &rep.rmse {
            let layer = r.layer.map_or("-".to_string(), |l| l.to_string());
            eprintln!(
                "{layer:>6}  {:<28} {:>12} {:>12}  {:>10.3e} {:>10.3e}",
                r.projection, r.from, r.to, r.rmse, r.rms
            );
        }
    }
    eprintln!(
        "wrote {}: non-expert {} + experts {} in {:.1} s",
        rep.dst.display(),
        fmt_bytes(rep.non_expert_bytes),
        fmt_bytes(rep.expert_bytes),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn ppl(a: PplArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).map_err(|e| anyhow!("{}: {e}", a.file.display()))?;
    let (mut opts, chunk) = a.store.load_options(&a.model, a.window, a.window)?;
    opts.device = a.device.options();
    let mut engine = Engine::load_with(&a.model, &opts)?;
    print_device(&engine.model);
    engine.model.fetch_chunk = chunk;
    if let Some(k) = a.experts {
        engine.model.set_experts_per_token(k)?;
    }
    let mut ids = engine.encode(&text)?;
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    let bar = ProgressBar::new(ids.len() as u64).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} tokens {per_sec} ETA {eta}")
            .expect("valid template"),
    );
    if a.trace_routing.is_some() {
        engine.model.routing_trace = Some(Default::default());
    }
    let t0 = std::time::Instant::now();
    let mut records: Vec<(usize, usize, Vec<u32>)> = Vec::new();
    let model = &engine.model;
    let rep = flashmoe::eval::perplexity(model, &ids, a.window, |done| {
        bar.set_position(done as u64);
        // Window-relative positions become positions in the file.
        if let Some(t) = &model.routing_trace {
            let offset = done.saturating_sub(a.window);
            records.extend(t.lock().unwrap().drain(..).map(|r| (r.layer, r.pos + offset, r.experts)));
        }
    })?;
    bar.finish_and_clear();
    let m = &engine.model;
    if let Some(path) = &a.trace_routing {
        let c = &m.config;
        let header = flashmoe::routing::TraceHeader::new(c.num_layers, c.num_experts, m.experts_per_token());
        let mut w = flashmoe::routing::TraceWriter::new(path, header)?;
        w.write_decisions(&records)?;
        w.flush()?;
    }
    let experts = format!(
        "{}/{} ({})",
        m.experts_per_token(),
        m.config.num_experts,
        if m.routing_is_exact() { "exact" } else { "reduced, lossy" }
    );
    if a.json {
        println!(
            "{}",
            json!({"ppl": rep.ppl, "nll": rep.nll, "tokens": rep.tokens, "predictions": rep.predictions,
                   "window": a.window, "experts_per_token": m.experts_per_token(), "exact_routing": m.routing_is_exact()})
        );
    } else {
        println!(
            "perplexity {:.4} (nll {:.5}) over {} predictions in {} windows of {} tokens | experts {experts} | {:.1} s",
            rep.ppl,
            rep.nll,
            rep.predictions,
            rep.windows,
            a.window,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let rep = flashmoe::packed::verify::verify(&a.dir)?;
    println!("ok: {} tensors, {} experts, {} checked", rep.tensors, rep.experts, fmt_bytes(rep.bytes));
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let c = &model.config;
    let full = c.layer_kinds.iter().filter(|k| **k == flashmoe::config::LayerKind::FullAttention).count();
    println!("model        {} ({:?} checkpoint)", c.family.name(), model.weights.format);
    println!("layers       {} ({} GatedDeltaNet + {} full attention)", c.num_layers, c.num_layers - full, full);
    println!("hidden       {}  vocab {}", c.hidden_size, c.vocab_size);
    println!(
        "experts      {} routed, top-{} + 1 shared, intermediate {} (shared {})",
        c.num_experts, c.experts_per_token, c.moe_intermediate, c.shared_intermediate
    );
    println!("expert bytes {}", fmt_bytes(model.weights.expert_bytes() as u64));
    println!("other bytes  {}", fmt_bytes(model.weights.non_expert_bytes() as u64));
    println!("quantized    {}", if model.weights.lm_head.is_quantized() { "yes (MLX affine)" } else { "no" });
    Ok(())
}

fn devices() -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cpu: {threads} threads, kernels {}", flashmoe_kernels::simd_level());
    #[cfg(feature = "cuda")]
    match flashmoe::cuda::probe() {
        Ok(gpus) if gpus.is_empty() => println!("cuda: no GPU"),
        Ok(gpus) => {
            for g in gpus {
                println!("cuda:{}: {} ({})", g.ordinal, g.name, fmt_bytes(g.total_memory as u64));
            }
        }
        Err(e) => println!("cuda: unavailable ({e})"),
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not compiled in (build with --features cuda)");
    Ok(())
}

pub(crate) fn fmt_bytes(b: u64) -> String {
    flashmoe::memory::fmt(b)
}
