//! The engine's one worker thread: takes jobs from a queue and generates them together, up to
//! `max_batch` at a time, through a [`Batcher`] (continuous batching: each round one prefill
//! chunk of one request, then one forward pass with the next token of every decoding request;
//! state reuse included), sending the pieces back over a channel per job. A job joins at the next
//! round and stops before its next forward step once its receiver is gone (the client
//! disconnected) or its cancel flag is set; the others go on.
//!
//! A panic inside a round (a bug in the engine) is caught: the requests in flight are answered
//! with a 500 naming the panic, the saved states are dropped (they may be half-written), a
//! one-token probe checks the engine still computes, and the worker goes on. If the probe fails
//! the engine is unusable: [`WorkerHealth`] says so (`/health` answers 503), every queued and
//! later job fails at once, and the server shuts down so that the process exits non-zero.

use crate::metrics::Metrics;
use anyhow::{Context, Result, bail};
use flashmoe::batch::{Batcher, Sink};
use flashmoe::generate::Engine;
use flashmoe::session::{Channel, Finish, GenerateRequest, Generation};
use flashmoe_text::TokenLogprob;
use serde_json::Value as Json;
use std::panic::{AssertUnwindSafe, catch_unwind};
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

/// Whether the engine still works, shared by the worker and the HTTP side.
#[derive(Default)]
pub struct WorkerHealth {
    /// Why the engine is unusable (set once, never cleared).
    failed: std::sync::OnceLock<String>,
    /// Wakes the server's shutdown when `failed` is set.
    pub shutdown: tokio::sync::Notify,
}

impl WorkerHealth {
    /// None while the engine works; else why it does not.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    fn fail(&self, why: String) {
        let _ = self.failed.set(why);
        // notify_one stores a permit: the shutdown future wakes even if it is not polled yet.
        self.shutdown.notify_one();
    }
}

/// Scripted replies (test harness, `--scripted-replies FILE`): a JSON list whose items are either
/// a string (used in order, cycling, by requests no `when` entry matches) or
/// `{"when": TEXT, "reply": TEXT}` (used whenever the request's last message contains `when`).
/// The prompt is still prefilled through the engine; the reply's tokens (then a stop token) are
/// emitted and fed instead of sampled ones.
///
/// Fault injection (tests of the worker's recovery): `{"when": TEXT, "panic": MESSAGE}` panics
/// inside the generation, at its first piece of text; `"unusable": true` besides makes the probe
/// that follows fail, as if the panic had left the engine broken.
pub struct Script {
    keyed: Vec<(String, Reply)>,
    ordered: Vec<Reply>,
    next: usize,
}

#[derive(Clone)]
struct Reply {
    text: String,
    panic: Option<String>,
    unusable: bool,
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
                Json::String(r) => s.ordered.push(Reply { text: r.clone(), panic: None, unusable: false }),
                Json::Object(o) => {
                    let panic = o.get("panic").and_then(Json::as_str).map(str::to_string);
                    let text = match o.get("reply").and_then(Json::as_str) {
                        Some(r) => r.to_string(),
                        // A panic needs some text to reach its first piece.
                        None if panic.is_some() => "…".to_string(),
                        None => bail!("item {i}: no `reply`"),
                    };
                    let unusable = o.get("unusable").and_then(Json::as_bool).unwrap_or(false);
                    let reply = Reply { text, panic, unusable };
                    match o.get("when").and_then(Json::as_str) {
                        Some(w) => s.keyed.push((w.to_string(), reply)),
                        None => s.ordered.push(reply),
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

    fn pick(&mut self, key: &str) -> Reply {
        if let Some((_, r)) = self.keyed.iter().find(|(w, _)| key.contains(w.as_str())) {
            return r.clone();
        }
        if self.ordered.is_empty() {
            return Reply { text: String::new(), panic: None, unusable: false };
        }
        let r = self.ordered[self.next % self.ordered.len()].clone();
        self.next += 1;
        r
    }
}

impl Queue {
    /// A queue with no worker behind it (`RequestCheck`, which never submits).
    pub(crate) fn detached(metrics: Arc<Metrics>) -> Queue {
        let (tx, _) = mpsc::channel();
        Queue { tx: std::sync::Mutex::new(tx), metrics }
    }
}

/// Starts the worker thread.
pub fn start(
    engine: Arc<Engine>,
    cache_bytes: usize,
    max_batch: usize,
    script: Option<Script>,
    metrics: Arc<Metrics>,
    health: Arc<WorkerHealth>,
) -> Result<Queue> {
    let (tx, rx) = mpsc::channel::<Job>();
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("flashmoe-engine".into())
        .spawn(move || run(&engine, cache_bytes, max_batch, script, rx, &m, &health))
        .context("starting the engine thread")?;
    Ok(Queue { tx: std::sync::Mutex::new(tx), metrics })
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Whether the engine still computes: one token through a fresh state, finite logits.
fn probe(engine: &Engine) -> std::result::Result<(), String> {
    let run = || {
        let token = engine.stop_ids.first().copied().unwrap_or(0);
        let mut state = engine.model.new_state();
        engine.model.forward(&[token], &mut state, flashmoe::LogitsFor::Last)
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(logits)) if !logits.is_empty() && logits.iter().all(|x| x.is_finite()) => Ok(()),
        Ok(Ok(_)) => Err("the probe's logits are not finite".into()),
        Ok(Err(e)) => Err(format!("the probe failed: {e}")),
        Err(p) => Err(format!("the probe panicked: {}", panic_message(p.as_ref()))),
    }
}

/// A job in the batch: where its output goes, and what the fault injection asks of it.
struct JobSink {
    request: u64,
    endpoint: &'static str,
    cancel: Arc<AtomicBool>,
    tx: UnboundedSender<Ev>,
    /// Scripted fault: panic at the first piece of text.
    panic: Option<String>,
    /// Scripted fault: the probe after that panic fails.
    unusable: bool,
    t0: std::time::Instant,
}

impl Sink for JobSink {
    fn keep_going(&mut self) -> bool {
        !(self.tx.is_closed() || self.cancel.load(Ordering::Relaxed))
    }
    fn piece(&mut self, ch: Channel, text: &str) -> bool {
        if let Some(msg) = &self.panic {
            panic!("{msg}");
        }
        self.tx.send(Ev::Piece(ch, text.to_string())).is_ok()
    }
    fn logprob(&mut self, lp: &TokenLogprob) {
        let _ = self.tx.send(Ev::Logprob(lp.clone()));
    }
}

fn run(
    engine: &Engine,
    cache_bytes: usize,
    max_batch: usize,
    mut script: Option<Script>,
    rx: mpsc::Receiver<Job>,
    m: &Metrics,
    health: &WorkerHealth,
) {
    let mut batch: Batcher<'_, JobSink> = Batcher::new(engine, cache_bytes, max_batch);
    m.set_cache(batch.cache.stats(), batch.cache.bytes(), batch.cache.len(), cache_bytes);
    let mut request = 0u64;
    loop {
        // Idle: wait for a job. Busy: take what is queued, up to the batch's room.
        let mut incoming = Vec::new();
        if batch.is_empty() {
            match rx.recv() {
                Ok(job) => incoming.push(job),
                Err(_) => return,
            }
        }
        while batch.len() + incoming.len() < batch.max_batch() {
            match rx.try_recv() {
                Ok(job) => incoming.push(job),
                Err(_) => break,
            }
        }
        for job in incoming {
            request += 1;
            admit(engine, &mut batch, &mut script, job, request, m, health);
        }
        if batch.is_empty() {
            continue;
        }
        m.set_in_flight(batch.len());
        let outcome = catch_unwind(AssertUnwindSafe(|| batch.step()));
        match outcome {
            Ok((round, ended)) => {
                m.round(round.decoded);
                for (sink, result) in ended {
                    match result {
                        Ok(g) => {
                            m.record(&g);
                            log_request(sink.request, sink.endpoint, &g, sink.t0.elapsed().as_secs_f64());
                            let _ = sink.tx.send(Ev::Done(Box::new(g)));
                        }
                        Err(e) => {
                            m.failed();
                            tracing::warn!(request = sink.request, endpoint = %sink.endpoint, "failed: {e}");
                            let _ = sink.tx.send(Ev::Failed(e.to_string()));
                        }
                    }
                }
            }
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                // Saved states may have been half-written when it unwound: start afresh.
                let sinks = batch.abort_all();
                let probed = if sinks.iter().any(|s| s.unusable && s.panic.is_some()) {
                    Err("the scripted fault made the engine unusable (test harness)".to_string())
                } else {
                    probe(engine)
                };
                for sink in sinks {
                    m.failed();
                    tracing::error!(request = sink.request, endpoint = %sink.endpoint, "the engine panicked: {msg}");
                    let _ = sink.tx.send(Ev::Failed(format!(
                        "internal error: the engine panicked while generating this reply ({msg}); {}",
                        if probed.is_ok() {
                            "its state was reset and the server goes on serving"
                        } else {
                            "the engine is unusable and the server is shutting down"
                        }
                    )));
                }
                if let Err(why) = probed {
                    tracing::error!("the engine is unusable after a panic: {why}; shutting down");
                    health.fail(format!("after a panic ({msg}): {why}"));
                }
            }
        }
        m.set_in_flight(batch.len());
        let c = &batch.cache;
        m.set_cache(c.stats(), c.bytes(), c.len(), c.max_bytes());
    }
}

/// A job leaving the queue: refused when the engine is unusable or the client is gone; else
/// given its scripted reply (test harness) and started in the batch.
fn admit(
    engine: &Engine,
    batch: &mut Batcher<'_, JobSink>,
    script: &mut Option<Script>,
    mut job: Job,
    request: u64,
    m: &Metrics,
    health: &WorkerHealth,
) {
    m.queued(-1);
    if let Some(why) = health.failure() {
        let _ = job.tx.send(Ev::Failed(format!("the engine is unusable ({why}); the server is shutting down")));
        return;
    }
    if job.tx.is_closed() || job.cancel.load(Ordering::Relaxed) {
        m.cancelled();
        tracing::info!(request, endpoint = %job.endpoint, "cancelled while queued (client gone)");
        return;
    }
    let _ = job.tx.send(Ev::Started);
    let mut fault: Option<Reply> = None;
    if let Some(s) = script.as_mut() {
        let reply = s.pick(&job.script_key);
        match engine.encode(&reply.text) {
            Ok(ids) => job.req.forced = Some(ids),
            Err(e) => {
                let _ = job.tx.send(Ev::Failed(format!("tokenizing the scripted reply: {e}")));
                return;
            }
        }
        fault = Some(reply).filter(|r| r.panic.is_some());
    }
    let sink = JobSink {
        request,
        endpoint: job.endpoint,
        cancel: job.cancel,
        tx: job.tx,
        panic: fault.as_ref().and_then(|r| r.panic.clone()),
        unusable: fault.is_some_and(|r| r.unusable),
        t0: std::time::Instant::now(),
    };
    if let Err((sink, e)) = batch.admit(job.req, sink) {
        m.failed();
        tracing::warn!(request, endpoint = %sink.endpoint, "failed: {e}");
        let _ = sink.tx.send(Ev::Failed(e.to_string()));
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
