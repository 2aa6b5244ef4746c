//! The engine's one worker thread: takes jobs from a queue, runs them through a
//! [`Session`](flashmoe::session::Session) (state reuse included) and sends the pieces back over a
//! channel per job. A job stops before its next forward step once its receiver is gone (the
//! client disconnected) or its cancel flag is set.

use crate::metrics::Metrics;
use anyhow::{Context, Result, bail};
use flashmoe::generate::Engine;
use flashmoe::session::{Channel, Finish, GenerateRequest, Generation, Session};
use flashmoe_text::TokenLogprob;
use serde_json::Value as Json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// What the worker reports for a job.
#[derive(Debug)]
pub enum Ev {
    /// The job left the queue; the prefill starts.
    Started,
    Piece(Channel, String),
    /// A generated token's logprob (when asked), sent before the token's text.
    Logprob(TokenLogprob),
    Done(Box<Generation>),
    Failed(String),
}

pub struct Job {
    pub req: GenerateRequest,
    /// Text the scripted replies are matched against (the last message's text).
    pub script_key: String,
    /// The route that queued it (for the request log).
    pub endpoint: &'static str,
    pub cancel: Arc<AtomicBool>,
    tx: UnboundedSender<Ev>,
}

/// The sending side of the job queue.
pub struct Queue {
    tx: std::sync::Mutex<mpsc::Sender<Job>>,
    metrics: Arc<Metrics>,
}

/// A queued job's handle: its events, and a flag that cancels it when the handle is dropped.
pub struct Ticket {
    pub rx: UnboundedReceiver<Ev>,
    cancel: Arc<AtomicBool>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Queue {
    pub fn submit(&self, req: GenerateRequest, script_key: String, endpoint: &'static str) -> Result<Ticket> {
        let (tx, rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job { req, script_key, endpoint, cancel: cancel.clone(), tx };
        self.metrics.queued(1);
        if self.tx.lock().unwrap().send(job).is_err() {
            self.metrics.queued(-1);
            bail!("the engine worker has stopped");
        }
        Ok(Ticket { rx, cancel })
    }
}

/// Scripted replies (test harness, `--scripted-replies FILE`): a JSON list whose items are either
/// a string (used in order, cycling, by requests no `when` entry matches) or
/// `{"when": TEXT, "reply": TEXT}` (used whenever the request's last message contains `when`).
/// The prompt is still prefilled through the engine; the reply's tokens (then a stop token) are
/// emitted and fed instead of sampled ones.
pub struct Script {
    keyed: Vec<(String, String)>,
    ordered: Vec<String>,
    next: usize,
}

impl Script {
    pub fn load(path: &Path) -> Result<Script> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Json = serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", path.display()))?;
        Self::from_json(&v).with_context(|| path.display().to_string())
    }

    pub fn from_json(v: &Json) -> Result<Script> {
        let list = v.as_array().context("scripted replies must be a JSON array")?;
        let mut s = Script { keyed: Vec::new(), ordered: Vec::new(), next: 0 };
        for (i, item) in list.iter().enumerate() {
            match item {
                Json::String(r) => s.ordered.push(r.clone()),
                Json::Object(o) => {
                    let reply =
                        o.get("reply").and_then(Json::as_str).with_context(|| format!("item {i}: no `reply`"))?;
                    match o.get("when").and_then(Json::as_str) {
                        Some(w) => s.keyed.push((w.to_string(), reply.to_string())),
                        None => s.ordered.push(reply.to_string()),
                    }
                }
                _ => bail!("item {i}: expected a string or {{\"when\", \"reply\"}}"),
            }
        }
        if s.keyed.is_empty() && s.ordered.is_empty() {
            bail!("the scripted reply list is empty");
        }
        Ok(s)
    }

    fn pick(&mut self, key: &str) -> String {
        if let Some((_, r)) = self.keyed.iter().find(|(w, _)| key.contains(w.as_str())) {
            return r.clone();
        }
        if self.ordered.is_empty() {
            return String::new();
        }
        let r = self.ordered[self.next % self.ordered.len()].clone();
        self.next += 1;
        r
    }
}

/// Starts the worker thread.
pub fn start(engine: Arc<Engine>, cache_bytes: usize, script: Option<Script>, metrics: Arc<Metrics>) -> Result<Queue> {
    let (tx, rx) = mpsc::channel::<Job>();
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("flashmoe-engine".into())
        .spawn(move || run(&engine, cache_bytes, script, rx, &m))
        .context("starting the engine thread")?;
    Ok(Queue { tx: std::sync::Mutex::new(tx), metrics })
}

fn run(engine: &Engine, cache_bytes: usize, mut script: Option<Script>, rx: mpsc::Receiver<Job>, m: &Metrics) {
    let mut session = Session::new(engine, cache_bytes);
    m.set_cache(session.cache.stats(), session.cache.bytes(), session.cache.len(), cache_bytes);
    let mut request = 0u64;
    while let Ok(mut job) = rx.recv() {
        m.queued(-1);
        request += 1;
        let gone = |j: &Job| j.tx.is_closed() || j.cancel.load(Ordering::Relaxed);
        if gone(&job) {
            m.cancelled();
            tracing::info!(request, endpoint = %job.endpoint, "cancelled while queued (client gone)");
            continue;
        }
        let _ = job.tx.send(Ev::Started);
        if let Some(s) = script.as_mut() {
            let reply = s.pick(&job.script_key);
            match engine.encode(&reply) {
                Ok(ids) => job.req.forced = Some(ids),
                Err(e) => {
                    let _ = job.tx.send(Ev::Failed(format!("tokenizing the scripted reply: {e}")));
                    continue;
                }
            }
        }
        m.set_active(true);
        let t0 = std::time::Instant::now();
        let tx = &job.tx;
        let cancel = &job.cancel;
        let result = session.generate_with_logprobs(
            &job.req,
            || !(tx.is_closed() || cancel.load(Ordering::Relaxed)),
            |ch, text| tx.send(Ev::Piece(ch, text.to_string())).is_ok(),
            |lp| {
                let _ = tx.send(Ev::Logprob(lp.clone()));
            },
        );
        m.set_active(false);
        let c = &session.cache;
        m.set_cache(c.stats(), c.bytes(), c.len(), c.max_bytes());
        match result {
            Ok(g) => {
                m.record(&g);
                log_request(request, job.endpoint, &g, t0.elapsed().as_secs_f64());
                let _ = job.tx.send(Ev::Done(Box::new(g)));
            }
            Err(e) => {
                m.failed();
                tracing::warn!(request, endpoint = %job.endpoint, "failed: {e}");
                let _ = job.tx.send(Ev::Failed(e.to_string()));
            }
        }
    }
}

/// One log line per finished generation (level info): tokens in and out as the API's usage
/// reports them, how much of the prompt came from a saved conversation state, speeds, why it
/// ended.
fn log_request(request: u64, endpoint: &str, g: &Generation, secs: f64) {
    let finish = match &g.finish {
        Finish::Stop => "stop",
        Finish::StopString(_) => "stop_string",
        Finish::Length => "length",
        Finish::Context => "context",
        Finish::Cancelled => "cancelled",
    };
    tracing::info!(
        request,
        endpoint = %endpoint,
        prompt_tokens = g.prompt_tokens,
        completion_tokens = g.completion_tokens,
        reused_tokens = g.reused_tokens,
        prefill_tok_s = round_to(g.prefill_tok_s(), 1),
        decode_tok_s = round_to(g.decode_tok_s(), 2),
        finish = %finish,
        constraint_ms_per_token = round_to(constraint_ms_per_token(g), 3),
        secs = round_to(secs, 3),
        "done"
    );
}

/// Milliseconds per generated token spent in the grammar constraint (0 without one).
fn constraint_ms_per_token(g: &Generation) -> f64 {
    if g.constraint_steps == 0 { 0.0 } else { g.constraint_secs * 1e3 / g.constraint_steps as f64 }
}

/// `x` rounded to `digits` decimals: numbers (also in JSON logs) without float noise.
fn round_to(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}
