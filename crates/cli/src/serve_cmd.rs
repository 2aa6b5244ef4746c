//! `flashmoe serve`: the OpenAI- and Anthropic-compatible HTTP server (crate flashmoe-server).

use anyhow::{Result, anyhow};
use flashmoe::experts::IoChoice;
use flashmoe::experts::cache::CachePolicy;
use flashmoe::memory::parse_size;
use flashmoe_server::ServerConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model folder (HF/MLX safetensors or packed).
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback by default: expose it deliberately).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require this key (`Authorization: Bearer KEY` or `x-api-key: KEY`) on /v1/*.
    #[arg(long)]
    api_key: Option<String>,
    /// Longest prompt + reply in tokens (default: the model's max_position_embeddings). Longer
    /// prompts get a 400.
    #[arg(long)]
    max_context: Option<usize>,
    /// Memory for saved conversation states (e.g. 1G, 512M; 0 = no reuse). A request that
    /// extends an earlier conversation resumes from the longest saved prefix.
    #[arg(long, default_value = "1G")]
    state_cache: String,
    /// Model name reported by /v1/models and expected in requests (default: the folder's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Close thinking after N tokens (`</think>` inserted) when a request sets no budget.
    #[arg(long)]
    think_budget: Option<usize>,
    /// TEST HARNESS: a JSON list of assistant replies emitted instead of sampled tokens (the
    /// prompt is still prefilled). Items: "text" (used in order) or {"when": TEXT, "reply": TEXT}
    /// (used when the last message contains TEXT).
    #[arg(long)]
    scripted_replies: Option<PathBuf>,
    /// RAM expert cache of a packed model (e.g. 4G).
    #[arg(long)]
    ram_cache: Option<String>,
    /// Expert reads: page, direct or auto.
    #[arg(long, default_value = "auto")]
    io: IoChoice,
    #[arg(long, default_value_t = 8)]
    io_threads: usize,
    /// RAM cache eviction: lfu, lfu:N or lru.
    #[arg(long, default_value = "lfu")]
    cache_policy: CachePolicy,
    #[command(flatten)]
    device: crate::DeviceArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    flashmoe_server::serve(config(a)?)
}

/// The server configuration these flags describe.
pub fn config(a: ServeArgs) -> Result<ServerConfig> {
    let mut cfg = ServerConfig::new(a.model);
    cfg.host = a.host;
    cfg.port = a.port;
    cfg.api_key = a.api_key.filter(|k| !k.is_empty());
    cfg.max_context = a.max_context;
    cfg.state_cache_bytes = parse_size(&a.state_cache).map_err(|e| anyhow!("--state-cache {e}"))? as usize;
    cfg.model_name = a.model_name;
    cfg.think_budget = a.think_budget;
    cfg.scripted_replies = a.scripted_replies;
    cfg.load.store.io = a.io;
    cfg.load.store.io_threads = a.io_threads;
    cfg.load.store.cache_policy = a.cache_policy;
    cfg.load.device = a.device.options();
    if let Some(r) = &a.ram_cache {
        cfg.load.store.ram_cache_bytes = parse_size(r).map_err(|e| anyhow!("--ram-cache {e}"))?;
    }
    Ok(cfg)
}

/// `ServeArgs` parsed from a word list (for `chat --model … --serve-args "…"`).
#[derive(clap::Parser)]
#[command(name = "serve")]
pub struct ServeOnly {
    #[command(flatten)]
    pub args: ServeArgs,
}
