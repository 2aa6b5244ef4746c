//! Counters behind `GET /metrics` (Prometheus text format 0.0.4).

use flashmoe::generate::Engine;
use flashmoe::session::{CacheStats, Finish, Generation};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Default)]
struct Totals {
    prompt_tokens: u64,
    completion_tokens: u64,
    prefill_tokens: u64,
    prefill_secs: f64,
    decode_tokens: u64,
    decode_secs: f64,
    last_prefill_tok_s: f64,
    last_decode_tok_s: f64,
    generations: u64,
    finish: BTreeMap<&'static str, u64>,
    cache: CacheStats,
    cache_bytes: usize,
    cache_entries: usize,
    cache_max_bytes: usize,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    totals: Mutex<Totals>,
    queue: AtomicI64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    /// Requests being generated (the batch), decode passes run and the rows they carried.
    in_flight: AtomicI64,
    decode_passes: AtomicU64,
    decode_rows: AtomicU64,
}

impl Metrics {
    pub fn count_request(&self, path: &str, status: u16) {
        let known = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/models", "/health", "/metrics"];
        let p = if path.starts_with("/v1/models/") {
            "/v1/models"
        } else {
            known.iter().find(|k| **k == path).copied().unwrap_or("other")
        };
        *self.requests.lock().unwrap().entry((p.to_string(), status)).or_default() += 1;
    }

    pub fn queued(&self, d: i64) {
        self.queue.fetch_add(d, Relaxed);
    }

    pub fn queue_length(&self) -> i64 {
        self.queue.load(Relaxed).max(0)
    }

    /// Requests the worker is generating now (its batch).
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as i64, Relaxed);
    }

    /// Whether the worker is running a generation now.
    pub fn active(&self) -> bool {
        self.in_flight.load(Relaxed) > 0
    }

    /// After a round of the batch: `decoded` requests got a token in one pass.
    pub fn round(&self, decoded: usize) {
        if decoded > 0 {
            self.decode_passes.fetch_add(1, Relaxed);
            self.decode_rows.fetch_add(decoded as u64, Relaxed);
        }
    }

    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }

    pub fn set_cache(&self, s: CacheStats, bytes: usize, entries: usize, max_bytes: usize) {
        let mut t = self.totals.lock().unwrap();
        t.cache = s;
        t.cache_bytes = bytes;
        t.cache_entries = entries;
        t.cache_max_bytes = max_bytes;
    }

    pub fn record(&self, g: &Generation) {
        if g.finish == Finish::Cancelled {
            self.cancelled();
        }
        let mut t = self.totals.lock().unwrap();
        t.generations += 1;
        t.prompt_tokens += g.prompt_tokens as u64;
        t.completion_tokens += g.completion_tokens as u64;
        t.prefill_tokens += g.prefilled_tokens as u64;
        t.prefill_secs += g.prefill_secs;
        t.decode_tokens += g.decode_steps as u64;
        t.decode_secs += g.decode_secs;
        if g.prefilled_tokens > 0 {
            t.last_prefill_tok_s = g.prefill_tok_s();
        }
        if g.decode_steps > 0 {
            t.last_decode_tok_s = g.decode_tok_s();
        }
        let reason = match g.finish {
            Finish::Stop => "stop",
            Finish::StopString(_) => "stop_string",
            Finish::Length => "length",
            Finish::Context => "context",
            Finish::Cancelled => "cancelled",
        };
        *t.finish.entry(reason).or_default() += 1;
    }

    pub fn render(&self, engine: &Engine) -> String {
        let mut o = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(o, "# HELP flashmoe_{name} {help}\n# TYPE flashmoe_{name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(o, "flashmoe_{name}{labels} {v}");
            }
        };
        let one = |v: f64| vec![(String::new(), v)];
        let reqs: Vec<(String, f64)> = self
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|((p, s), n)| (format!("{{path=\"{p}\",status=\"{s}\"}}"), *n as f64))
            .collect();
        metric("http_requests_total", "counter", "HTTP requests by route and status.", reqs);
        let t = self.totals.lock().unwrap();
        metric("generations_total", "counter", "Generations run by the engine.", one(t.generations as f64));
        let fin = t.finish.iter().map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n as f64)).collect();
        metric("generations_by_finish_total", "counter", "Generations by how they ended.", fin);
        metric(
            "generations_cancelled_total",
            "counter",
            "Generations cancelled because the client went away (including queued ones).",
            one(self.cancelled.load(Relaxed) as f64),
        );
        metric(
            "generations_failed_total",
            "counter",
            "Generations that failed.",
            one(self.failed.load(Relaxed) as f64),
        );
        metric("prompt_tokens_total", "counter", "Prompt tokens of generations.", one(t.prompt_tokens as f64));
        metric(
            "completion_tokens_total",
            "counter",
            "Tokens generated (stop tokens included).",
            one(t.completion_tokens as f64),
        );
        metric("prefill_tokens_total", "counter", "Prompt tokens run through the model.", one(t.prefill_tokens as f64));
        metric("prefill_seconds_total", "counter", "Time spent in prefill.", one(t.prefill_secs));
        metric("decode_tokens_total", "counter", "Decode steps.", one(t.decode_tokens as f64));
        metric("decode_seconds_total", "counter", "Time spent decoding.", one(t.decode_secs));
        let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        metric(
            "prefill_tokens_per_second",
            "gauge",
            "Prefill throughput over all generations.",
            one(rate(t.prefill_tokens, t.prefill_secs)),
        );
        metric(
            "decode_tokens_per_second",
            "gauge",
            "Decode throughput over all generations.",
            one(rate(t.decode_tokens, t.decode_secs)),
        );
        metric(
            "last_prefill_tokens_per_second",
            "gauge",
            "Prefill throughput of the last generation.",
            one(t.last_prefill_tok_s),
        );
        metric(
            "last_decode_tokens_per_second",
            "gauge",
            "Decode throughput of the last generation.",
            one(t.last_decode_tok_s),
        );
        metric("queue_length", "gauge", "Requests waiting for the engine.", one(self.queue_length() as f64));
        metric("generation_active", "gauge", "1 while the engine is generating.", one(self.active() as u8 as f64));
        metric(
            "requests_in_flight",
            "gauge",
            "Requests being generated together.",
            one(self.in_flight.load(Relaxed) as f64),
        );
        metric(
            "decode_passes_total",
            "counter",
            "Decode forward passes (each carries the next token of every request in flight).",
            one(self.decode_passes.load(Relaxed) as f64),
        );
        metric(
            "decode_rows_total",
            "counter",
            "Tokens decoded by those passes (rows / passes = the mean batch).",
            one(self.decode_rows.load(Relaxed) as f64),
        );
        metric("state_cache_hits_total", "counter", "Prompts resumed from a saved state.", one(t.cache.hits as f64));
        metric("state_cache_misses_total", "counter", "Prompts prefilled from scratch.", one(t.cache.misses as f64));
        metric(
            "state_cache_reused_tokens_total",
            "counter",
            "Prompt tokens not prefilled thanks to saved states.",
            one(t.cache.reused_tokens as f64),
        );
        let hit_rate = |h: u64, m: u64| if h + m > 0 { h as f64 / (h + m) as f64 } else { 0.0 };
        metric("state_cache_hit_rate", "gauge", "hits / (hits + misses).", one(hit_rate(t.cache.hits, t.cache.misses)));
        metric("state_cache_evictions_total", "counter", "Saved states evicted.", one(t.cache.evictions as f64));
        metric("state_cache_bytes", "gauge", "Bytes of saved states.", one(t.cache_bytes as f64));
        metric(
            "state_cache_max_bytes",
            "gauge",
            "Bound on saved states (--state-cache).",
            one(t.cache_max_bytes as f64),
        );
        metric("state_cache_entries", "gauge", "Saved states.", one(t.cache_entries as f64));
        drop(t);
        if let Some(store) = engine.model.expert_store() {
            let s = store.snapshot();
            metric(
                "expert_cache_hits_total",
                "counter",
                "Expert fetches served from the RAM cache.",
                one(s.ram_hits as f64),
            );
            metric("expert_cache_misses_total", "counter", "Expert fetches read from disk.", one(s.ram_misses as f64));
            metric("expert_cache_hit_rate", "gauge", "RAM expert cache hit rate.", one(s.ram_hit_rate()));
            metric("expert_disk_bytes_total", "counter", "Expert bytes read from disk.", one(s.disk_bytes as f64));
            metric("expert_disk_reads_total", "counter", "Expert reads from disk.", one(s.disk_reads as f64));
        }
        o
    }
}
