//! `flashmoe chat`: the interactive terminal client (crate `flashmoe-chat`).

use crate::args::{DeviceArgs, EngineArgs, StoreArgs};
use crate::commands::serve;
use anyhow::{Context, Result};
use clap::Args;
use flashmoe_chat::tools::ToolLimits;
use flashmoe_chat::{Options, store};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ChatArgs {
    /// Server to talk to (OpenAI-compatible; default $FLASHMOE_URL when set, else the engine in
    /// this process with --model).
    #[arg(long, conflicts_with = "model")]
    url: Option<String>,
    /// Model to run in this process behind a private server (127.0.0.1, a free port): a folder,
    /// a .gguf file, `builtin` or a Hub repo OWNER/NAME[@REVISION][:QUANT]. Default: builtin
    /// (unless $FLASHMOE_URL names a server).
    #[arg(long)]
    model: Option<String>,
    /// Continue a saved conversation (ids are shown at start and exit; /resume lists them).
    #[arg(long)]
    resume: Option<String>,
    /// System prompt read from a file.
    #[arg(long)]
    system_file: Option<PathBuf>,
    /// Ask for answers without thinking (enable_thinking=false).
    #[arg(long)]
    no_think: bool,
    /// Thinking tokens before `</think>` is forced.
    #[arg(long)]
    think_budget: Option<usize>,
    /// Run tool calls without asking.
    #[arg(long)]
    auto_approve: bool,
    /// API key sent as `Authorization: Bearer KEY` (default $FLASHMOE_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Do not show the model's thinking (toggle with /think).
    #[arg(long)]
    hide_thinking: bool,
    /// Most tokens per reply (default: the server's, min(4096, what the context leaves)).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Sampling temperature, 0 to 2 (default: the model's generation_config.json; 0 = greedy).
    #[arg(long, value_parser = temperature)]
    temperature: Option<f64>,
    /// Sampling seed sent with every request (the server's `seed`): the same conversation
    /// gets the same sampled replies.
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds a `bash` tool call may run (0.1 to 86400).
    #[arg(long, default_value_t = 60.0, value_parser = tool_timeout)]
    tool_timeout: f64,
    /// Bytes of tool output returned to the model.
    #[arg(long, default_value_t = 16 * 1024)]
    tool_output_cap: usize,
    // The engine options of --model's private server: the same flags as `serve` and `run`.
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Extra server flags for the private server of --model (e.g. "--scripted-replies F").
    #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
    serve_args: Vec<String>,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let data_dir = store::data_dir();
    let mut local = None;
    let mut private_key = None;
    let env_url = std::env::var("FLASHMOE_URL").ok().filter(|u| !u.is_empty());
    let url = match (&a.url, &a.model, env_url) {
        (Some(u), _, _) => u.clone(),
        (None, None, Some(u)) => u,
        (None, model, _) => {
            let reference = model.as_deref().unwrap_or(flashmoe::hub::BUILTIN);
            // The engine runs in this process: a private server on 127.0.0.1 and a free port.
            let mut words: Vec<String> = vec!["serve".into()];
            words.extend(["--host".into(), "127.0.0.1".into(), "--port".into(), "0".into()]);
            words.extend(a.serve_args.iter().filter(|s| !s.is_empty()).cloned());
            // Keyed even when the user gave none: other users of this machine can reach
            // 127.0.0.1 too, and should not use (or read the prefix cache of) this session.
            let key = a.api_key.clone().unwrap_or_else(flashmoe_server::random_api_key);
            words.extend(["--api-key".to_string(), key.clone()]);
            private_key = Some(key);
            let parsed = <serve::ServeOnly as clap::Parser>::try_parse_from(&words)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "--serve-args: {} (it takes the server's own flags; engine, store and device flags such as --ram-cache go to `chat` itself)",
                        e.to_string().lines().next().unwrap_or("")
                    )
                })?;
            let resolved = crate::args::model::resolve(reference)?;
            let mut cfg = serve::config(&resolved, parsed.args, &a.engine, &a.store, &a.device)?;
            cfg.quiet = true;
            // The in-process server logs only warnings: the plan is printed here, as `run` does.
            if let Some(plan) = &cfg.memory_plan {
                eprintln!("[flashmoe] plan: {plan}");
            }
            eprintln!("[flashmoe] loading {} …", resolved.name);
            let s = flashmoe_server::spawn(cfg)?;
            let u = format!("http://{}", s.addr);
            local = Some(s);
            u
        }
    };
    let system = match &a.system_file {
        Some(p) => Some(
            flashmoe_text::file::read_text(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string(),
        ),
        None => None,
    };
    let mut o = Options::new(&url);
    o.api_key = private_key
        .or_else(|| a.api_key.clone())
        .or_else(|| std::env::var("FLASHMOE_API_KEY").ok().filter(|k| !k.is_empty()));
    o.resume = a.resume;
    o.system = system;
    o.no_think = a.no_think;
    o.think_budget = a.think_budget;
    o.auto_approve = a.auto_approve;
    o.show_thinking = !a.hide_thinking;
    o.max_tokens = a.max_tokens;
    o.temperature = a.temperature;
    o.seed = a.seed;
    o.data_dir = data_dir;
    o.limits =
        ToolLimits { max_output: a.tool_output_cap.max(1), timeout: Duration::from_secs_f64(a.tool_timeout.max(0.1)) };
    let r = flashmoe_chat::run(o);
    drop(local);
    r
}

/// `--temperature`: the range the server accepts (NaN and infinities refused).
fn temperature(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=2.0).contains(&x) { Ok(x) } else { Err(format!("must be between 0 and 2, got {s}")) }
}

/// `--tool-timeout`: a finite number of seconds (an infinite one would panic the timer and let a
/// tool call hang the chat for ever).
fn tool_timeout(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if (0.1..=86_400.0).contains(&x) { Ok(x) } else { Err(format!("must be between 0.1 and 86400 seconds, got {s}")) }
}
