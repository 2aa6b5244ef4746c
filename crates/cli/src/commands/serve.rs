//! `flashmoe serve`: the OpenAI- and Anthropic-compatible HTTP server (crate flashmoe-server).

use crate::args::{self, DeviceArgs, EngineArgs, ModelArgs, Plan, StoreArgs};
use anyhow::{Result, anyhow, bail};
use flashmoe::hub::Resolved;
use flashmoe::memory::parse_size;
use flashmoe_server::ServerConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Log lines on stderr as text, or as one JSON object per line (for log collectors).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

/// The server's own flags (also what `chat --model … --serve-args "…"` takes).
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    /// Address to listen on (loopback by default: expose it deliberately).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require a key (`Authorization: Bearer KEY` or `x-api-key: KEY`) on /v1/* and /metrics;
    /// repeat for several clients. Saved conversation states are kept per key and per the
    /// request's `user` (OpenAI) / `metadata.user_id` (Anthropic): one client's prompt never
    /// speeds up, or shows in the `cached_tokens` of, another's. Without a key a single local
    /// user is assumed and only `user` separates conversations.
    #[arg(long = "api-key", value_name = "KEY")]
    api_keys: Vec<String>,
    /// Memory for saved conversation states (e.g. 1G, 512M; 0 = no reuse). A request that
    /// extends an earlier conversation of the same client (see --api-key) resumes from the
    /// longest saved prefix.
    #[arg(long, default_value = "1G")]
    state_cache: String,
    /// Model name reported by /v1/models and expected in requests (default: `builtin`, the
    /// Hub repo, or the folder's name).
    #[arg(long, alias = "model-name")]
    served_model_name: Option<String>,
    /// Answer requests whatever model name they ask for (for clients that hard-code one);
    /// by default an unknown name is a 404 `model_not_found`, as OpenAI answers.
    #[arg(long)]
    accept_any_model: bool,
    /// Also answer to this host name (repeatable). A server on a loopback address answers only
    /// to localhost, 127.0.0.1 and ::1 in `Host` and in a browser's `Origin`, so that web pages
    /// cannot reach it through DNS rebinding or cross-site requests; `*` accepts any name. On
    /// another address, with no --allowed-host, any name is accepted.
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// Connections served at once; further ones wait to be accepted (so idle or slow clients
    /// cannot use up the process's file descriptors).
    #[arg(long, default_value_t = flashmoe_server::DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    max_connections: usize,
    /// Close a connection that has not sent a whole request head within this time, idle
    /// keep-alive connections included (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    header_timeout: String,
    /// Fail a request whose body sends no data for this long.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    body_timeout: String,
    /// Requests generated at once (continuous batching): their decode steps run as one forward
    /// pass, so each weight and each routed expert is read once per step for all of them. More
    /// requests wait in the queue. Each one holds its own sequence state (the memory plan of
    /// --memory-budget counts N). 1 runs requests one after another.
    /// Default: 8 where batching pays — on the CPU, or on a GPU whose expert cache does not hold
    /// every expert; 1 (one request at a time) where every expert sits in GPU memory, since
    /// there a batched step costs more than a decode step per request (docs/performance.md).
    #[arg(long, value_name = "N")]
    max_batch: Option<usize>,
    /// Close thinking after N tokens (`</think>` inserted) when a request sets no budget.
    #[arg(long)]
    think_budget: Option<usize>,
    /// TEST HARNESS: a JSON list of assistant replies emitted instead of sampled tokens (the
    /// prompt is still prefilled). Items: "text" (used in order) or {"when": TEXT, "reply": TEXT}
    /// (used when the last message contains TEXT). Fault injection: {"when": TEXT, "panic": MESSAGE}
    /// panics inside that generation (the request gets a 500, the server goes on); with
    /// "unusable": true the engine is then treated as broken (/health 503, exit non-zero).
    #[arg(long)]
    scripted_replies: Option<PathBuf>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let model = a.model.resolve()?;
    let mut cfg = config(&model, a.server, &a.engine, &a.store, &a.device)?;
    // JSON logs: every stderr line is a JSON object (the "listening on" log line says it all).
    cfg.quiet = a.log_format == LogFormat::Json;
    flashmoe_server::serve(cfg)
}

/// Context the memory plan of `--memory-budget` is sized for when `--max-context` is not given.
const PLAN_CONTEXT: usize = 8192;

/// The server configuration these flags describe.
pub fn config(
    model: &Resolved,
    a: ServerArgs,
    engine: &EngineArgs,
    store: &StoreArgs,
    device: &DeviceArgs,
) -> Result<ServerConfig> {
    let mut cfg = ServerConfig::new(model.path.clone());
    cfg.host = a.host;
    cfg.port = a.port;
    if a.api_keys.iter().any(|k| k.trim().is_empty()) {
        bail!("--api-key is empty: give a key, or leave the flag out for no key");
    }
    cfg.api_keys = a.api_keys;
    cfg.state_cache_bytes = parse_size(&a.state_cache).map_err(|e| anyhow!("--state-cache {e}"))? as usize;
    cfg.model_name = Some(a.served_model_name.unwrap_or_else(|| model.name.clone()));
    cfg.accept_any_model = a.accept_any_model;
    cfg.allowed_hosts = a.allowed_hosts;
    cfg.think_budget = a.think_budget;
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    cfg.max_connections = a.max_connections;
    if a.max_batch.is_some_and(|n| !(1..=flashmoe_server::MAX_BATCH_LIMIT).contains(&n)) {
        bail!("--max-batch must be between 1 and {}", flashmoe_server::MAX_BATCH_LIMIT);
    }
    cfg.max_batch = a.max_batch;
    cfg.header_timeout = parse_duration("--header-timeout", &a.header_timeout)?;
    cfg.body_timeout = parse_duration("--body-timeout", &a.body_timeout)?;
    cfg.scripted_replies = a.scripted_replies;
    let context = engine.max_context.unwrap_or(PLAN_CONTEXT);
    // Each request of a batch holds a state and a row of logits (plus the pass's own rows).
    let plan = Plan {
        context_tokens: context,
        batch_tokens: context,
        logits_rows: 2 * cfg.max_batch.unwrap_or(flashmoe_server::DEFAULT_MAX_BATCH),
        sequences: cfg.max_batch.unwrap_or(flashmoe_server::DEFAULT_MAX_BATCH),
    };
    // The plan goes into the server's start-up block (logged) instead of a line of its own.
    let (load, memory_plan) = args::load_options_and_plan(&model.path, store, device, engine, plan)?;
    cfg.load = load;
    cfg.memory_plan = memory_plan.map(|p| p.describe());
    Ok(cfg)
}

/// A duration flag: a number with `ms`, `s` or `m` (`30s`, `500ms`, `2m`), more than zero.
fn parse_duration(flag: &str, text: &str) -> Result<std::time::Duration> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        bail!("{flag} {text}: give a unit, e.g. 30s, 500ms or 2m");
    };
    let secs =
        num.trim().parse::<f64>().map_err(|_| anyhow!("{flag} {text}: not a duration (e.g. 30s, 500ms)"))? * scale;
    if !(secs > 0.0 && secs <= 86_400.0) {
        bail!("{flag} {text}: must be more than 0 and at most a day");
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// `ServerArgs` parsed from a word list (`chat --model … --serve-args "…"`).
#[derive(clap::Parser)]
#[command(name = "serve")]
pub struct ServeOnly {
    #[command(flatten)]
    pub args: ServerArgs,
}
