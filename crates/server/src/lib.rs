//! `flashmoe serve`: an OpenAI- and Anthropic-compatible HTTP server over the flashmoe engine.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/messages` (Anthropic),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//!
//! The engine runs on one dedicated worker thread fed by a queue (one generation at a time);
//! HTTP handlers render and tokenize the prompt, queue a job and relay the worker's pieces (SSE
//! when streaming). A job whose client went away (its receiver dropped) is cancelled before the
//! next forward step. Conversation state is reused through the session's prefix cache
//! (`--state-cache`), per client: a snapshot serves only requests with the same API key and the
//! same `user` / `metadata.user_id` ([`api::Client`]); without keys one local user is assumed.
//!
//! Connections are served by hyper directly (not `axum::serve`, which sets no timer): at most
//! `--max-connections` at once, hyper's header read timeout (idle keep-alive connections
//! included) and tower-http's request body timeout.
//!
//! Defaults of a request: sampling fields it leaves out take the model's generation_config.json
//! values (`Engine::default_sampling`; greedy without one); a chat completion without
//! `max_tokens` may use min(4096, what the context leaves) tokens (`openai::DEFAULT_MAX_TOKENS`),
//! legacy completions 16 (`/v1/messages` requires it, as Anthropic's API); a reply cut by either
//! bound reports `length` (`max_tokens` on `/v1/messages`).
//!
//! Test harness: with `scripted_replies` set (`--scripted-replies FILE`), every generation still
//! prefills the real prompt, but the tokens it emits are a scripted reply's instead of sampled
//! ones; see [`worker::Script`]. `/health` and the log say so.

mod anthropic;
mod api;
mod metrics;
mod openai;
pub mod worker;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flashmoe::LoadOptions;
use flashmoe::generate::Engine;
use flashmoe_text::toolcall::{ToolFormat, detect_format};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use metrics::Metrics;

/// Everything `flashmoe serve` is configured with.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub model_dir: PathBuf,
    pub load: LoadOptions,
    pub host: String,
    pub port: u16,
    /// Keys accepted as `Authorization: Bearer KEY` or `x-api-key: KEY` on /v1/* (none: no
    /// key needed). Each key is a client of its own: saved conversation states are never shared
    /// between keys (see [`api::Client`]).
    pub api_keys: Vec<String>,
    /// Bytes of sequence-state snapshots kept for reuse (0 = off).
    pub state_cache_bytes: usize,
    /// Name reported by /v1/models and expected in requests (default: the model folder's name).
    pub model_name: Option<String>,
    /// Answer requests naming any model (clients that hard-code a name); otherwise an unknown
    /// name is a 404 `model_not_found`.
    pub accept_any_model: bool,
    /// JSON file of scripted replies (test harness).
    pub scripted_replies: Option<PathBuf>,
    /// Think budget applied when a request sets none.
    pub think_budget: Option<usize>,
    /// Do not print the "serving …" line (an in-process server inside another program).
    pub quiet: bool,
    /// The memory plan of `--memory-budget`, described (logged in the start-up block).
    pub memory_plan: Option<String>,
    /// Host names requests may address (the `Host` header, and the `Origin` of a browser
    /// request) besides the loopback names a loopback-bound server always answers to; `*`
    /// turns the check off. See [`HostGuard`].
    pub allowed_hosts: Vec<String>,
    /// Open connections served at once; more wait in the kernel's accept queue (they hold no
    /// descriptor of this process until a slot frees).
    pub max_connections: usize,
    /// A connection that has not sent a whole request head within this time (idle keep-alive
    /// connections included) is closed.
    pub header_timeout: std::time::Duration,
    /// A request whose body sends no data for this long fails (its connection is closed).
    pub body_timeout: std::time::Duration,
    /// Requests generated at once (continuous batching, `flashmoe::batch`); more wait queued.
    /// None: [`DEFAULT_MAX_BATCH`] where batching pays (`Model::batch_pays`), else 1.
    pub max_batch: Option<usize>,
}

/// Default of [`ServerConfig::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 8;
/// Largest [`ServerConfig::max_batch`] accepted.
pub const MAX_BATCH_LIMIT: usize = 256;

/// Default of [`ServerConfig::max_connections`]: well below the usual 1024-descriptor limit,
/// which the model files and the expert store share.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default of [`ServerConfig::header_timeout`] and [`ServerConfig::body_timeout`] (hyper's own
/// header-read default).
pub const DEFAULT_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl ServerConfig {
    pub fn new(model_dir: PathBuf) -> Self {
        ServerConfig {
            model_dir,
            load: LoadOptions::default(),
            host: "127.0.0.1".into(),
            port: 8000,
            api_keys: Vec::new(),
            state_cache_bytes: 1 << 30,
            model_name: None,
            accept_any_model: false,
            scripted_replies: None,
            think_budget: None,
            quiet: false,
            memory_plan: None,
            allowed_hosts: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_IO_TIMEOUT,
            body_timeout: DEFAULT_IO_TIMEOUT,
            max_batch: None,
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub model_name: String,
    pub accept_any_model: bool,
    pub api_keys: Vec<String>,
    pub max_context: usize,
    pub tool_format: ToolFormat,
    pub think_budget: Option<usize>,
    pub scripted: bool,
    pub queue: worker::Queue,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    /// Where the forward pass runs (`Model::device_description`).
    pub device: String,
    /// How routed experts are read: `page`, `direct` or `mmap`, and why.
    pub io_mode: &'static str,
    pub io_reason: String,
    pub host_guard: HostGuard,
    pub health: Arc<worker::WorkerHealth>,
}

pub(crate) type Shared = Arc<AppState>;

/// The server's handling of a request body up to the point it would be queued — parse it,
/// validate every field, render the prompt with the model's template and tokenize it, build the
/// grammar constraint — with no worker, socket or generation: what the `api_request` fuzz target
/// (fuzz/) drives, and its corpus test.
pub struct RequestCheck {
    state: Shared,
}

impl RequestCheck {
    /// Answers as a server of `engine` that accepts any model name would.
    pub fn new(engine: Arc<Engine>) -> Self {
        let metrics = Arc::new(Metrics::default());
        // A queue nobody serves: a check never submits.
        let queue = worker::Queue::detached(metrics.clone());
        RequestCheck {
            state: Arc::new(AppState {
                tool_format: detect_format(engine.template.source()),
                max_context: engine.model.max_context(),
                model_name: "check".into(),
                accept_any_model: true,
                api_keys: Vec::new(),
                think_budget: None,
                scripted: false,
                queue,
                metrics,
                created: 0,
                device: engine.model.device_description(),
                io_mode: "page",
                io_reason: String::new(),
                host_guard: HostGuard::new(true, &[]),
                health: Arc::new(worker::WorkerHealth::default()),
                engine,
            }),
        }
    }

    /// `Ok` when a request to `path` (`/v1/chat/completions`, `/v1/completions`,
    /// `/v1/messages`) would be queued, else the message of the client error it gets.
    pub fn check(&self, path: &str, body: &[u8]) -> std::result::Result<(), String> {
        check_request(&self.state, path, body).map_err(|e| e.body().to_string())
    }
}

/// What the server does with a request body for `path` before queuing it (parse, validate every
/// field, render and tokenize the prompt, build the grammar constraint): the request check the
/// `api_request` fuzz target drives.
fn check_request(s: &Shared, path: &str, body: &[u8]) -> api::ApiResult<()> {
    let o = api::parse_body(body)?;
    let f = api::Fields(&o);
    match path {
        "/v1/chat/completions" => {
            openai::prepare_chat(s, &o)?;
            openai::token_names(s, &f)?;
            f.str("user")?;
        }
        "/v1/completions" => {
            openai::prepare_completion(s, &o)?;
        }
        "/v1/messages" => {
            anthropic::prepare(s, &o)?;
            if let Some(m) = f.object("metadata")? {
                api::Fields(m).str("user_id")?;
            }
        }
        other => return Err(api::ApiError::bad(format!("no endpoint {other}"))),
    }
    Ok(())
}

/// The listener with what serving it needs.
struct Prepared {
    listener: tokio::net::TcpListener,
    app: Router,
    health: Arc<worker::WorkerHealth>,
    limits: Limits,
}

#[derive(Clone, Copy)]
struct Limits {
    max_connections: usize,
    header_timeout: std::time::Duration,
    body_timeout: std::time::Duration,
}

/// Longest wait for open connections to finish once the server stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves HTTP/1 connections until `stop` resolves or the engine becomes unusable: at most
/// `max_connections` at once (the accept loop waits for a free slot), each with hyper's header
/// read timeout (which also closes idle keep-alive connections) and tower-http's body timeout.
async fn run_server(p: Prepared, stop: impl std::future::Future<Output = ()>) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let Prepared { listener, app, health, limits } = p;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let service = hyper_util::service::TowerToHyperService::new(tower_http::timeout::RequestBodyTimeout::new(
        app,
        limits.body_timeout,
    ));
    let engine_failed = health.shutdown.notified();
    tokio::pin!(stop, engine_failed);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.context("connection slots closed")?,
            _ = &mut stop => break,
            _ = &mut engine_failed => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept: wait a
                    // little instead of spinning, then go on.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
            _ = &mut engine_failed => break,
        };
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            // Errors here are the client's (a reset, a header timeout): nothing to report.
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {}
    }
    match health.failure() {
        Some(why) => bail!("the engine is unusable: {why}"),
        None => Ok(()),
    }
}

/// Loads the model, starts the worker and serves until interrupted.
pub fn serve(cfg: ServerConfig) -> Result<()> {
    // A model file truncated under the running server: one line naming the cause, not a silent
    // death by SIGBUS.
    flashmoe::mapped::install_sigbus_handler("the server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let prepared = prepare(cfg).await?;
        run_server(prepared, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}

/// A server running on its own threads inside this process (e.g. `flashmoe chat --model`).
/// Dropping it shuts the server down.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Loads the model and starts serving in the background; returns once the socket is bound
/// (`cfg.port` 0 picks a free port, reported in `addr`).
pub fn spawn(cfg: ServerConfig) -> Result<RunningServer> {
    let (tx_addr, rx_addr) = std::sync::mpsc::channel::<Result<SocketAddr>>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("flashmoe-server".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx_addr.send(Err(anyhow::anyhow!("starting the async runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let prepared = match prepare(cfg).await {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx_addr.send(Err(e));
                        return;
                    }
                };
                let _ = tx_addr.send(prepared.listener.local_addr().context("local address"));
                if let Err(e) = run_server(prepared, async {
                    let _ = stopped.await;
                })
                .await
                {
                    tracing::error!("{e:#}");
                }
            });
        })
        .context("starting the server thread")?;
    let addr = rx_addr.recv().context("the server thread ended while starting")??;
    Ok(RunningServer { addr, stop: Some(stop), thread: Some(thread) })
}

/// Loads the model, starts the engine worker and binds the listener.
async fn prepare(cfg: ServerConfig) -> Result<Prepared> {
    // The longest prompt + reply is `cfg.load.max_context` (default: the model's
    // max_position_embeddings).
    if cfg.load.max_context == Some(0) {
        bail!("--max-context must be at least 1");
    }
    tracing::info!("loading {}", cfg.model_dir.display());
    let t0 = std::time::Instant::now();
    let engine = Engine::load_with(&cfg.model_dir, &cfg.load)
        .with_context(|| format!("loading the model {}", cfg.model_dir.display()))?;
    let load_secs = t0.elapsed().as_secs_f64();
    let script = match &cfg.scripted_replies {
        Some(p) => Some(worker::Script::load(p)?),
        None => None,
    };
    let scripted = script.is_some();
    let model_name = cfg.model_name.clone().unwrap_or_else(|| {
        cfg.model_dir
            .canonicalize()
            .unwrap_or(cfg.model_dir.clone())
            .file_name()
            .map_or("flashmoe".into(), |n| n.to_string_lossy().into_owned())
    });
    let (io_mode, io_reason) = match engine.model.expert_store() {
        Some(store) => (store.mode().name(), store.mode_note.clone()),
        None => (
            "mmap",
            engine.model.mapped_note().map_or_else(
                || "experts computed in place from the mapped files; the page cache is the RAM tier".into(),
                String::from,
            ),
        ),
    };
    log_startup(&engine, &cfg, &model_name, load_secs, &io_reason);
    let engine = Arc::new(engine);
    // Build the grammar compiler's token trie now, off the request path: the first request with
    // a response_format, a forced tool call or logprobs then does not wait for it.
    let warm = engine.clone();
    let _ = std::thread::Builder::new().name("flashmoe-grammars".into()).spawn(move || {
        if let Err(e) = warm.grammars() {
            tracing::warn!("constrained decoding unavailable: {e}");
        }
    });
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(worker::WorkerHealth::default());
    let m = &engine.model;
    let max_batch = match cfg.max_batch {
        _ if !m.can_batch() => {
            tracing::info!("requests run one at a time: this placement cannot batch sequences");
            1
        }
        Some(n) => n,
        None if m.batch_pays() => DEFAULT_MAX_BATCH,
        None => {
            tracing::info!(
                "requests run one at a time: with every expert in GPU memory a batched step costs more than a decode step per request (--max-batch N batches anyway)"
            );
            1
        }
    };
    if max_batch > 1 {
        tracing::info!("continuous batching: up to {max_batch} requests decode together (--max-batch)");
    }
    let queue =
        worker::start(engine.clone(), cfg.state_cache_bytes, max_batch, script, metrics.clone(), health.clone())?;
    let engine_device = engine.model.device_description();
    let addr: SocketAddr = format!("{}:{}", cfg.host, cfg.port)
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(cfg.host.as_str(), cfg.port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("--host {}: not an address", cfg.host))?;
    let host_guard = HostGuard::new(addr.ip().is_loopback(), &cfg.allowed_hosts);
    if let Some(names) = host_guard.names() {
        tracing::info!("answering to host names {} (--allowed-host adds more)", names.join(", "));
    }
    let state = Arc::new(AppState {
        tool_format: detect_format(engine.template.source()),
        max_context: engine.model.max_context(),
        engine,
        model_name,
        accept_any_model: cfg.accept_any_model,
        api_keys: cfg.api_keys.clone(),
        think_budget: cfg.think_budget,
        scripted,
        queue,
        metrics,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        device: engine_device,
        io_mode,
        io_reason,
        host_guard,
        health: health.clone(),
    });
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;

    tracing::info!("listening on http://{}", listener.local_addr()?);
    if !cfg.quiet {
        eprintln!(
            "[flashmoe] serving {} on http://{}{}{}",
            state.model_name,
            listener.local_addr()?,
            if state.api_keys.is_empty() { "" } else { " (API key required)" },
            if scripted { " — SCRIPTED REPLIES (test harness): output is not sampled from the model" } else { "" }
        );
    }
    let limits = Limits {
        max_connections: cfg.max_connections,
        header_timeout: cfg.header_timeout,
        body_timeout: cfg.body_timeout,
    };
    Ok(Prepared { listener, app: router(state), health, limits })
}

/// The start-up block (log level info): what was loaded, where it runs, how experts are read and
/// why, and what memory goes where.
fn log_startup(engine: &Engine, cfg: &ServerConfig, name: &str, load_secs: f64, io_reason: &str) {
    let m = &engine.model;
    let c = &m.config;
    let fmt = flashmoe::memory::fmt;
    let format = m.host_weights::<flashmoe::qwen35::ModelWeights>().map_or("unknown".to_string(), |w| {
        match w.format {
            flashmoe::qwen35::SourceFormat::HuggingFace => "Hugging Face safetensors",
            flashmoe::qwen35::SourceFormat::Mlx => "MLX safetensors",
            flashmoe::qwen35::SourceFormat::Packed => "packed (flashmoe convert)",
            flashmoe::qwen35::SourceFormat::Gguf => "GGUF",
        }
        .to_string()
    });
    tracing::info!(
        "model {name}: {} from {} ({format}), {} layers, {} experts, top-{}{}, loaded in {load_secs:.2} s",
        c.family.name(),
        cfg.model_dir.display(),
        c.num_layers,
        c.num_experts,
        m.experts_per_token(),
        if m.routing_is_exact() { " (exact)" } else { " (REDUCED: lossy)" }
    );
    tracing::info!("device: {}", m.device_description());
    if let Some(t) = m.tier() {
        tracing::info!(
            "GPU expert tier: {} of {} experts ({} each)",
            t.slots,
            t.total_experts,
            fmt(t.slot_bytes as u64)
        );
    }
    let (non_expert, experts) = m.weight_bytes();
    match m.expert_store() {
        Some(store) => tracing::info!(
            "experts: {} on disk, streamed; RAM tier {} ({}); io {io_reason}",
            fmt(store.total_expert_bytes()),
            fmt(store.ram_cache_budget()),
            store.cache_policy().name()
        ),
        None => tracing::info!("experts: {} mapped in place; io mmap ({io_reason})", fmt(experts as u64)),
    }
    if let Some(p) = m.prewarm_info() {
        tracing::info!("pre-warm (background): {}", p.describe());
    }
    tracing::info!(
        "memory: non-expert weights {}, conversation-state cache up to {}, context up to {} tokens, resident now {}",
        fmt(non_expert as u64),
        fmt(cfg.state_cache_bytes as u64),
        m.max_context(),
        fmt(flashmoe::memory::current_rss_bytes())
    );
    if let Some(plan) = &cfg.memory_plan {
        tracing::info!("memory plan: {plan}");
    }
}

fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        // With a key, the counters are private too (they show what others are doing).
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard_hosts))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Which host names the server answers to. A server on a loopback address is reachable only
/// from this machine, but a web page in the user's browser can still reach it: by a request
/// from its own origin (cross-site POSTs need no CORS permission to be *sent*), or by DNS
/// rebinding (its own name re-pointed at 127.0.0.1, so the browser treats the server as
/// same-origin). Both carry a foreign name, in `Origin` or in `Host`; checking them stops both
/// (as llama.cpp's and Jupyter's servers do). Clients that are not browsers send no `Origin`
/// and address the server by the name they were given, so they are unaffected.
#[derive(Clone, Debug)]
pub struct HostGuard {
    /// Lower-case names without port; None: any name (a server bound to another address,
    /// exposed on purpose, with no --allowed-host; or `--allowed-host '*'`).
    allowed: Option<Vec<String>>,
}

impl HostGuard {
    pub fn new(loopback: bool, extra: &[String]) -> Self {
        if extra.iter().any(|h| h == "*") || (!loopback && extra.is_empty()) {
            return HostGuard { allowed: None };
        }
        let mut names: Vec<String> =
            if loopback { ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec() } else { Vec::new() };
        names.extend(extra.iter().map(|h| h.trim().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()));
        HostGuard { allowed: Some(names) }
    }

    /// The names accepted, or None when any is.
    pub fn names(&self) -> Option<&[String]> {
        self.allowed.as_deref()
    }

    /// Whether `authority` (`name`, `name:port`, `[v6]:port`) names this server.
    pub fn allows(&self, authority: &str) -> bool {
        let Some(names) = &self.allowed else { return true };
        let a = authority.trim();
        let host = if let Some(rest) = a.strip_prefix('[') {
            rest.split(']').next().unwrap_or("")
        } else if a.matches(':').count() > 1 {
            a // a bare IPv6 address
        } else {
            a.split(':').next().unwrap_or("")
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        // RFC 6761: every name under .localhost is the loopback host.
        let loopback_alias = host.ends_with(".localhost") && names.iter().any(|n| n == "localhost");
        loopback_alias || names.contains(&host)
    }

    /// Whether an `Origin` header value (`scheme://authority`, or `null`) is one of ours.
    pub fn allows_origin(&self, origin: &str) -> bool {
        if self.allowed.is_none() {
            return true;
        }
        match origin.trim().split_once("://") {
            Some((_, authority)) => self.allows(authority.trim_end_matches('/')),
            None => false, // `null` (sandboxed frames, file:// pages) or garbage
        }
    }
}

/// A random API key (143 bits from the OS-seeded CSPRNG) for a private in-process server.
pub fn random_api_key() -> String {
    api::new_id("fm-")
}

/// Refuses requests addressed to a name the server does not answer to ([`HostGuard`]), and POST
/// bodies that do not say they are JSON.
async fn guard_hosts(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let header_text = |name: header::HeaderName| h.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
    let refused = match (header_text(header::HOST), header_text(header::ORIGIN)) {
        (Some(host), _) if !s.host_guard.allows(&host) => Some(("Host", host)),
        (_, Some(origin)) if !s.host_guard.allows_origin(&origin) => Some(("Origin", origin)),
        _ => None,
    };
    // A POST body must say it is JSON: a web page can send `text/plain` or form bodies to any
    // address without asking (no CORS preflight), but not `application/json`.
    if req.method() == axum::http::Method::POST && refused.is_none() {
        let ct = header_text(header::CONTENT_TYPE).unwrap_or_default();
        let media = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if media != "application/json" {
            let got = if ct.is_empty() { "no Content-Type".to_string() } else { format!("Content-Type `{ct}`") };
            return api::ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "request bodies are JSON: send `Content-Type: application/json` (got {got}; with curl, \
                     add -H 'Content-Type: application/json')"
                ),
            )
            .code("unsupported_media_type")
            .flavor(api::Flavor::of_path(req.uri().path()))
            .into_response();
        }
    }
    if let Some((what, value)) = refused {
        let names = s.host_guard.names().unwrap_or_default().join(", ");
        tracing::warn!("refused a request with {what} `{value}`");
        return api::ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{what} `{value}` is not a name this server answers to ({names}); a web page cannot use \
                 a local server through another name (DNS rebinding, cross-site requests). Add a name \
                 with `flashmoe serve --allowed-host NAME`, or `--allowed-host '*'` to accept any"
            ),
        )
        .code("forbidden_host")
        .flavor(api::Flavor::of_path(req.uri().path()))
        .into_response();
    }
    next.run(req).await
}

/// API key check for /v1/*: `Authorization: Bearer KEY` (OpenAI) or `x-api-key: KEY` (Anthropic),
/// any of the `--api-key`s. The handlers get which one as an [`api::Client`].
async fn auth(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    let mut client = api::Client::default();
    if !s.api_keys.is_empty() {
        let h = req.headers();
        let bearer = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let x = h.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim);
        match s.api_keys.iter().position(|k| bearer == Some(k.as_str()) || x == Some(k.as_str())) {
            Some(i) => client.key = Some(i),
            None => {
                let given = bearer.is_some() || x.is_some();
                let msg = if given {
                    "Incorrect API key provided."
                } else {
                    "Missing API key: send `Authorization: Bearer KEY`."
                };
                return api::ApiError::new(StatusCode::UNAUTHORIZED, msg)
                    .code("invalid_api_key")
                    .flavor(api::Flavor::of_path(req.uri().path()))
                    .into_response();
            }
        }
    }
    req.extensions_mut().insert(client);
    next.run(req).await
}

async fn count_requests(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    s.metrics.count_request(&path, resp.status().as_u16());
    resp
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    api::ApiError::new(StatusCode::NOT_FOUND, format!("no route {} {path}", req.method()))
        .code("not_found")
        .flavor(api::Flavor::of_path(&path))
        .into_response()
}

async fn health(State(s): State<Shared>) -> Response {
    if let Some(why) = s.health.failure() {
        let body = serde_json::json!({"status": "error", "ready": false, "model": s.model_name, "error": why});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    // The listener is bound only once the model is loaded and the worker runs: answering at all
    // means ready.
    axum::Json(serde_json::json!({
        "status": "ok",
        "ready": true,
        "model": s.model_name,
        "device": s.device,
        "io": {"mode": s.io_mode, "reason": s.io_reason},
        "generating": s.metrics.active(),
        "scripted": s.scripted,
        "generation": if s.scripted { "scripted replies (test harness)" } else { "sampled" },
        "queue_length": s.metrics.queue_length(),
        "max_context": s.max_context,
    }))
    .into_response()
}

async fn metrics_text(State(s): State<Shared>) -> Response {
    let body = s.metrics.render(&s.engine);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

#[cfg(test)]
mod host_guard_tests {
    use super::HostGuard;

    #[test]
    fn loopback_server_answers_to_loopback_names_only() {
        let g = HostGuard::new(true, &[]);
        for ok in
            ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "::1", "LOCALHOST:1", "app.localhost:80"]
        {
            assert!(g.allows(ok), "{ok}");
        }
        for bad in ["evil.com:8000", "127.0.0.1.evil.com", "localhost.evil.com:8000", "10.0.0.1:8000", ""] {
            assert!(!g.allows(bad), "{bad}");
        }
        assert!(g.allows_origin("http://localhost:3000"));
        assert!(g.allows_origin("https://127.0.0.1"));
        assert!(!g.allows_origin("http://evil.com"));
        assert!(!g.allows_origin("null"));
    }

    #[test]
    fn extra_names_and_star() {
        let g = HostGuard::new(true, &["MyBox.lan".into(), "[fd00::2]".into()]);
        assert!(g.allows("mybox.lan:8000") && g.allows("[fd00::2]:8000") && g.allows("localhost"));
        assert!(!g.allows("other.lan"));
        let any = HostGuard::new(true, &["*".into()]);
        assert!(any.allows("evil.com") && any.allows_origin("null") && any.names().is_none());
        // Bound to a LAN address on purpose: any name unless names are given.
        assert!(HostGuard::new(false, &[]).allows("192.168.1.5:8000"));
        let named = HostGuard::new(false, &["gpu-box".into()]);
        assert!(named.allows("gpu-box:8000") && !named.allows("localhost"));
    }
}
