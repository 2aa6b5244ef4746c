//! Generation sessions for servers and interactive clients: one prompt in, streamed pieces out,
//! with conversation state reuse.
//!
//! * [`Session::generate`] prefills a prompt and decodes, like [`Engine::generate`], and adds what a
//!   server needs: stop strings (held back while they may still match), extra stop ids, a think
//!   budget (after N tokens inside `<think>`, `</think>` is inserted and the answer follows), a
//!   cancellation check before every forward step (so a dropped client frees the engine within
//!   one token), forced tokens (scripted replies for deterministic tests), and thinking text
//!   reported on its own channel.
//! * A grammar constraint ([`GenerateRequest::constraint`], llguidance): before each sampling
//!   step of the answer the tokens the grammar forbids are masked to -inf (penalties,
//!   temperature and filters then act on the allowed ones), the picked token advances the
//!   grammar, and the reply ends (`Finish::Stop`) when the grammar is complete. Thinking is not
//!   constrained: inside `<think>` only the stop tokens are masked (the model must close the
//!   block; the think budget bounds it), and the constraint starts after `</think>`. Scripted
//!   (forced) replies bypass it.
//! * Logprobs ([`GenerateRequest::logprobs`]): each generated token's log-probability under the
//!   model's raw distribution (log-softmax of the logits before penalties, bias, temperature and
//!   mask), with the top alternatives, in [`Generation::logprobs`] and through
//!   [`Session::generate_with_logprobs`]'s callback as they are produced. Tokens that were not
//!   sampled (scripted replies, the `</think>` the think budget inserts) have no entry.
//! * [`PrefixCache`]: snapshots of the sequence state taken at turn boundaries (end of the prompt,
//!   end of the generation), keyed by the request's scope (whose conversation: a server's client)
//!   and the exact tokens they cover, bounded in bytes (LRU). A
//!   GatedDeltaNet state cannot be rewound, so only an exact snapshot point can be resumed from: a
//!   new prompt resumes from the snapshot with the longest token prefix of it and prefills only the
//!   rest.

use super::generate::Engine;
use super::model::{Model, SequenceState};
use crate::error::{Error, Result};
use crate::experts::IoSnapshot;
use crate::layers::LogitsFor;
use flashmoe_text::{Constraint, Sampler, SamplingParams, StreamDecoder, TextTokenizer, TokenLogprob, token_logprob};
use std::collections::VecDeque;
use std::time::Instant;

/// Prompt tokens per forward call during prefill; the cancellation check runs between chunks.
pub const PREFILL_CHUNK: usize = 512;

/// Text inserted when the think budget runs out.
pub const THINK_CLOSE_TEXT: &str = "\n</think>\n\n";

/// Text inserted when the think budget runs out under a grammar constraint: the answer's first
/// token must be one the grammar allows, so no newlines are forced after the tag.
pub const THINK_CLOSE_TEXT_CONSTRAINED: &str = "\n</think>";

/// Most alternatives a request may ask per token (OpenAI's `top_logprobs` bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Counters of a [`PrefixCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that resumed from a snapshot.
    pub hits: u64,
    /// Lookups that found no usable snapshot.
    pub misses: u64,
    /// Prompt tokens not prefilled thanks to hits.
    pub reused_tokens: u64,
    /// Snapshots stored.
    pub inserts: u64,
    /// Snapshots dropped to stay within the byte bound.
    pub evictions: u64,
}

struct Snapshot {
    /// Whose conversation this is ([`GenerateRequest::cache_scope`]): only requests of the
    /// same scope resume from it.
    scope: String,
    tokens: Vec<u32>,
    state: SequenceState,
    /// Logits for the position after `tokens` (what the next token is sampled from).
    logits: Vec<f32>,
    bytes: usize,
    last_used: u64,
}

/// A resumable point found by [`PrefixCache::lookup`].
pub struct Resume {
    /// State after the first `tokens` prompt tokens.
    pub state: SequenceState,
    pub logits: Vec<f32>,
    pub tokens: usize,
}

/// Sequence-state snapshots keyed by the tokens they cover, bounded by bytes, least recently
/// used evicted first. A bound of 0 disables caching.
pub struct PrefixCache {
    max_bytes: usize,
    entries: Vec<Snapshot>,
    bytes: usize,
    clock: u64,
    stats: CacheStats,
}

impl PrefixCache {
    pub fn new(max_bytes: usize) -> Self {
        PrefixCache { max_bytes, entries: Vec::new(), bytes: 0, clock: 0, stats: CacheStats::default() }
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Bytes held by the snapshots.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Drops every snapshot (the counters stay).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The snapshot of `scope` covering the longest prefix of `prompt` (a copy of its state),
    /// counting a hit or a miss. The whole prompt may match: the stored logits then give the
    /// first token. Snapshots of other scopes are never used (nor is their presence visible).
    pub fn lookup(&mut self, scope: &str, prompt: &[u32]) -> Option<Resume> {
        self.clock += 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.scope == scope && !e.tokens.is_empty() && prompt.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len());
        match best {
            Some(e) => {
                e.last_used = self.clock;
                self.stats.hits += 1;
                self.stats.reused_tokens += e.tokens.len() as u64;
                Some(Resume { state: e.state.clone(), logits: e.logits.clone(), tokens: e.tokens.len() })
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Stores a snapshot of `state` (which covers exactly `tokens`), evicting the least recently
    /// used ones to stay within the bound. A snapshot larger than the whole bound is not stored.
    pub fn insert(&mut self, scope: &str, tokens: &[u32], state: &SequenceState, logits: &[f32]) {
        debug_assert_eq!(tokens.len(), state.pos);
        if tokens.is_empty() || self.max_bytes == 0 {
            return;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.scope == scope && e.tokens == tokens) {
            e.last_used = self.clock;
            return;
        }
        let state = state.clone();
        let bytes = state.bytes() + logits.len() * 4 + tokens.len() * 4 + scope.len();
        if bytes > self.max_bytes {
            return;
        }
        while self.bytes + bytes > self.max_bytes {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used).expect("non-empty");
            let e = self.entries.swap_remove(oldest);
            self.bytes -= e.bytes;
            self.stats.evictions += 1;
        }
        self.bytes += bytes;
        self.stats.inserts += 1;
        self.entries.push(Snapshot {
            scope: scope.to_string(),
            tokens: tokens.to_vec(),
            state,
            logits: logits.to_vec(),
            bytes,
            last_used: self.clock,
        });
    }
}

/// What to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the generation, added to the engine's own stop ids.
    pub extra_stop_ids: Vec<u32>,
    /// Strings that end the generation (checked on the answer text, not the thinking); the text
    /// is cut before the match.
    pub stop_strings: Vec<String>,
    /// Tokens of thinking after which `</think>` is inserted; `None` = unlimited.
    pub think_budget: Option<usize>,
    /// Emit these tokens (then a stop token) instead of sampling: a scripted reply. The prompt is
    /// still prefilled and every emitted token is fed through the model.
    pub forced: Option<Vec<u32>>,
    /// Report text inside `<think>…</think>` as [`Channel::Reasoning`] (the tags themselves are
    /// not emitted). When false, everything is plain text, tags included.
    pub split_reasoning: bool,
    /// The grammar the answer must match (compiled by [`flashmoe_text::Grammars`]).
    pub constraint: Option<Constraint>,
    /// Report each generated token's logprob with this many alternatives (at most
    /// [`MAX_TOP_LOGPROBS`]); `None` = no logprobs.
    pub logprobs: Option<usize>,
    /// Who the conversation belongs to (a server: the client's API key and user): the prefix
    /// cache resumes only from snapshots stored under the same scope, so one client's saved
    /// state (and the speed-up it gives) never serves, or reveals, another's prompt.
    pub cache_scope: String,
}

/// Which part of the reply a piece of text belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Content,
    Reasoning,
}

/// Why a generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token.
    Stop,
    /// A stop string (the string that matched).
    StopString(String),
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    Context,
    /// The cancellation check or the piece callback asked to stop.
    Cancelled,
}

/// The outcome of a generation ([`Session::generate`], [`Engine::generate`]).
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids fed to the model or pending (the stop token excluded).
    pub tokens: Vec<u32>,
    /// Answer text and thinking text, as streamed.
    pub content: String,
    pub reasoning: String,
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// Prompt tokens resumed from a snapshot instead of prefilled.
    pub reused_tokens: usize,
    /// Prompt tokens actually run through the model.
    pub prefilled_tokens: usize,
    /// Tokens produced, the stop token included (OpenAI's `completion_tokens`).
    pub completion_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub decode_steps: usize,
    /// The think budget ran out and `</think>` was inserted.
    pub think_budget_hit: bool,
    pub io_prefill: Option<IoSnapshot>,
    pub io_decode: Option<IoSnapshot>,
    /// One entry per generated token (stop token excluded) when the request asked for logprobs.
    pub logprobs: Vec<TokenLogprob>,
    /// Seconds spent in the grammar constraint (masks and advancing), and masks computed.
    pub constraint_secs: f64,
    pub constraint_steps: usize,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        if self.prefill_secs > 0.0 { self.prefilled_tokens as f64 / self.prefill_secs } else { 0.0 }
    }
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_secs > 0.0 { self.decode_steps as f64 / self.decode_secs } else { 0.0 }
    }
}

/// An engine plus its state cache: what a server worker or an in-process chat keeps between
/// requests.
pub struct Session<'e> {
    pub engine: &'e Engine,
    pub cache: PrefixCache,
}

impl<'e> Session<'e> {
    /// A session whose state cache holds at most `cache_bytes` (0 = no reuse).
    pub fn new(engine: &'e Engine, cache_bytes: usize) -> Self {
        Session { engine, cache: PrefixCache::new(cache_bytes) }
    }

    /// Prefills `req.prompt` (resuming from the best snapshot) and generates. `keep_going` is
    /// called before every forward step (prefill chunk or decode token): false stops the
    /// generation (`Finish::Cancelled`). `on_piece` receives decoded text as it completes; false
    /// stops too.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        keep_going: impl FnMut() -> bool,
        on_piece: impl FnMut(Channel, &str) -> bool,
    ) -> Result<Generation> {
        generate(self.engine, &mut self.cache, req, keep_going, on_piece, |_| {})
    }

    /// [`Session::generate`], with `on_logprob` called for each generated token when the request
    /// asks for logprobs (before the token's text reaches `on_piece`).
    pub fn generate_with_logprobs(
        &mut self,
        req: &GenerateRequest,
        keep_going: impl FnMut() -> bool,
        on_piece: impl FnMut(Channel, &str) -> bool,
        on_logprob: impl FnMut(&TokenLogprob),
    ) -> Result<Generation> {
        generate(self.engine, &mut self.cache, req, keep_going, on_piece, on_logprob)
    }
}

/// The generation loop (the only one: the CLI, the server and the chat client all run it).
/// Resumes from `cache`'s best snapshot of the prompt, prefills the rest in chunks, samples and
/// decodes, and stores snapshots at the end of the prompt and of the reply. The same steps as a
/// [`Stream`] that a batch scheduler drives, run alone.
pub(crate) fn generate(
    engine: &Engine,
    cache: &mut PrefixCache,
    req: &GenerateRequest,
    mut keep_going: impl FnMut() -> bool,
    mut on_piece: impl FnMut(Channel, &str) -> bool,
    mut on_logprob: impl FnMut(&TokenLogprob),
) -> Result<Generation> {
    let mut s = Stream::start(engine, cache, req.clone())?;
    while s.prefilling() {
        if !keep_going() {
            s.cancel();
            break;
        }
        s.prefill_step(cache)?;
    }
    while let Some(id) = s.next_token(&mut on_piece, &mut on_logprob)? {
        if !keep_going() {
            s.cancel();
            break;
        }
        s.feed(id)?;
    }
    s.finish(cache, &mut on_piece)
}

/// Where a [`Stream`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamPhase {
    Prefill,
    Decode,
    Ended,
}

/// One request on its way through the model, between forward steps: its sequence state, the
/// logits its next token is sampled from, and the sampler, constraint, stop and output state of
/// [`generate`]. A scheduler drives several at once (continuous batching): it calls
/// [`Stream::prefill_step`] while [`Stream::prefilling`], then repeatedly [`Stream::next_token`]
/// and feeds the token back, alone ([`Stream::feed`]) or with the next tokens of other streams in
/// one pass ([`feed_batch`]); [`Stream::finish`] gives the [`Generation`].
pub struct Stream<'e> {
    engine: &'e Engine,
    req: GenerateRequest,
    phase: StreamPhase,
    g: Generation,
    state: SequenceState,
    logits: Vec<f32>,
    /// Prompt tokens in the state so far (prefill).
    done: usize,
    t0: Instant,
    t1: Instant,
    io0: Option<IoSnapshot>,
    io1: Option<IoSnapshot>,
    think_open: Option<u32>,
    think_close: Option<u32>,
    channel: Channel,
    constraint: Option<Constraint>,
    close_tokens: Vec<u32>,
    stop_ids: Vec<u32>,
    forced: VecDeque<u32>,
    scripted: bool,
    out: Output<'e>,
    sampler: Sampler,
    context: Vec<u32>,
    fed: Vec<u32>,
    think_tokens: usize,
}

impl<'e> Stream<'e> {
    /// Checks the request and resumes from `cache`'s best snapshot of its prompt.
    pub fn start(engine: &'e Engine, cache: &mut PrefixCache, req: GenerateRequest) -> Result<Stream<'e>> {
        let model = &engine.model;
        let prompt = &req.prompt;
        if prompt.is_empty() {
            return Err(Error::input("the prompt is empty (0 tokens)"));
        }
        if prompt.len() > model.max_context() {
            return Err(Error::input(format!(
                "the prompt has {} tokens, which exceed the context length of {} tokens",
                prompt.len(),
                model.max_context()
            )));
        }
        if req.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::input(format!("at most {MAX_TOP_LOGPROBS} top logprobs per token can be asked")));
        }
        let g = Generation {
            tokens: Vec::new(),
            content: String::new(),
            reasoning: String::new(),
            finish: Finish::Length,
            prompt_tokens: prompt.len(),
            reused_tokens: 0,
            prefilled_tokens: 0,
            completion_tokens: 0,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            decode_steps: 0,
            think_budget_hit: false,
            io_prefill: None,
            io_decode: None,
            logprobs: Vec::new(),
            constraint_secs: 0.0,
            constraint_steps: 0,
        };
        let io0 = io(model);
        let t0 = Instant::now();
        let (state, logits, reused) = match cache.lookup(&req.cache_scope, prompt) {
            Some(r) => (r.state, r.logits, r.tokens),
            None => (model.new_state(), Vec::new(), 0),
        };
        let tok = &engine.tokenizer;
        let think_open = tok.token_to_id("<think>").filter(|_| req.split_reasoning);
        let think_close = tok.token_to_id("</think>").filter(|_| req.split_reasoning);
        let channel = match (think_open, think_close) {
            (Some(o), Some(c)) if prompt_ends_in_thinking(prompt, o, c, tok.token_to_id("<|im_start|>")) => {
                Channel::Reasoning
            }
            _ => Channel::Content,
        };
        let constraint = req.constraint.clone();
        let close_tokens = match think_close {
            Some(_) if constraint.is_some() => engine.encode(THINK_CLOSE_TEXT_CONSTRAINED)?,
            Some(_) => engine.encode(THINK_CLOSE_TEXT)?,
            None => Vec::new(),
        };
        let mut stop_ids = engine.stop_ids.clone();
        stop_ids.extend(&req.extra_stop_ids);
        let mut forced: VecDeque<u32> = VecDeque::new();
        if let Some(f) = &req.forced {
            forced.extend(f);
            forced.push_back(
                stop_ids.first().copied().ok_or_else(|| {
                    Error::input("a scripted reply needs a stop token, and the model has no stop ids")
                })?,
            );
        }
        let out = Output::new(tok, &req.stop_strings, channel == Channel::Reasoning);
        Ok(Stream {
            engine,
            phase: StreamPhase::Prefill,
            g: Generation { reused_tokens: reused, ..g },
            state,
            logits,
            done: reused,
            t0,
            t1: t0,
            io0,
            io1: None,
            think_open,
            think_close,
            channel,
            close_tokens,
            stop_ids,
            scripted: req.forced.is_some(),
            forced,
            out,
            sampler: Sampler::new(req.sampling.clone()),
            context: prompt.clone(),
            fed: prompt.clone(),
            think_tokens: 0,
            constraint,
            req,
        })
    }

    /// True until the prompt is in (a prompt resumed whole from a snapshot still takes one
    /// [`Stream::prefill_step`], which runs nothing).
    pub fn prefilling(&self) -> bool {
        self.phase == StreamPhase::Prefill
    }

    /// Prompt tokens left to prefill.
    pub fn prefill_left(&self) -> usize {
        if self.phase == StreamPhase::Prefill { self.req.prompt.len() - self.done } else { 0 }
    }

    /// Runs the next chunk (at most [`PREFILL_CHUNK`] tokens) of the prompt; after the last one
    /// stores the prompt's snapshot in `cache` and gets ready to decode.
    pub fn prefill_step(&mut self, cache: &mut PrefixCache) -> Result<()> {
        if self.phase != StreamPhase::Prefill {
            return Ok(());
        }
        let model = &self.engine.model;
        let prompt = &self.req.prompt;
        if self.done < prompt.len() {
            let end = (self.done + PREFILL_CHUNK).min(prompt.len());
            let want = if end == prompt.len() { LogitsFor::Last } else { LogitsFor::None };
            self.logits = model.forward(&prompt[self.done..end], &mut self.state, want)?;
            self.done = end;
        }
        if self.done == prompt.len() {
            self.g.prefilled_tokens = prompt.len() - self.g.reused_tokens;
            self.g.prefill_secs = self.t0.elapsed().as_secs_f64();
            self.io1 = io(model);
            self.g.io_prefill = self.io1.zip(self.io0).map(|(b, a)| b.since(&a));
            if self.g.prefilled_tokens > 0 {
                cache.insert(&self.req.cache_scope, prompt, &self.state, &self.logits);
            }
            model.reset_timing();
            self.t1 = Instant::now();
            self.phase = StreamPhase::Decode;
        }
        Ok(())
    }

    /// Stops the generation where it is (`Finish::Cancelled`).
    pub fn cancel(&mut self) {
        if self.phase == StreamPhase::Prefill {
            self.g.prefill_secs = self.t0.elapsed().as_secs_f64();
            self.g.prefilled_tokens = self.done - self.g.reused_tokens;
            // Nothing was decoded: no decode time either.
            self.t1 = Instant::now();
        }
        self.g.finish = Finish::Cancelled;
        self.phase = StreamPhase::Ended;
    }

    /// True once the generation has ended (stop, limit, cancellation).
    pub fn ended(&self) -> bool {
        self.phase == StreamPhase::Ended
    }

    /// Picks the next token from the current logits (a scripted one, or sampled under the
    /// request's constraint) and emits its text; `Some(id)` when `id` must now be fed to the
    /// model, `None` when the generation has ended (stop token or string, constraint complete,
    /// token limit, full context, or `on_piece` said stop).
    pub fn next_token(
        &mut self,
        on_piece: &mut impl FnMut(Channel, &str) -> bool,
        on_logprob: &mut impl FnMut(&TokenLogprob),
    ) -> Result<Option<u32>> {
        if self.phase != StreamPhase::Decode {
            return Ok(None);
        }
        let r = self.choose(on_piece, on_logprob);
        if !matches!(r, Ok(Some(_))) {
            self.phase = StreamPhase::Ended;
        }
        r
    }

    fn choose(
        &mut self,
        on_piece: &mut impl FnMut(Channel, &str) -> bool,
        on_logprob: &mut impl FnMut(&TokenLogprob),
    ) -> Result<Option<u32>> {
        let (req, g) = (&self.req, &mut self.g);
        if g.completion_tokens >= req.max_tokens {
            return Ok(None);
        }
        let id = match self.forced.pop_front() {
            Some(id) => id,
            None if self.scripted => {
                g.finish = Finish::Stop;
                return Ok(None);
            }
            None => {
                let logits = &mut self.logits;
                let raw = req.logprobs.map(|_| logits.clone());
                match self.constraint.as_mut() {
                    Some(c) if self.channel == Channel::Content => c.mask_logits(logits).map_err(Error::input)?,
                    // Thinking is free, but must end before the reply does.
                    Some(_) => {
                        for &s in &self.stop_ids {
                            if let Some(l) = logits.get_mut(s as usize) {
                                *l = f32::NEG_INFINITY;
                            }
                        }
                    }
                    None => {}
                }
                let id = self.sampler.sample(logits, &self.context, &g.tokens);
                if let (Some(raw), Some(n)) = (raw, req.logprobs)
                    && !self.stop_ids.contains(&id)
                {
                    let lp = token_logprob(&raw, id, n);
                    on_logprob(&lp);
                    g.logprobs.push(lp);
                }
                id
            }
        };
        g.completion_tokens += 1;
        if self.stop_ids.contains(&id) {
            g.finish = Finish::Stop;
            return Ok(None);
        }
        let constrained_token = !self.scripted && self.channel == Channel::Content && Some(id) != self.think_open;
        if let Some(c) = self.constraint.as_mut().filter(|_| constrained_token) {
            c.accept(id).map_err(Error::input)?;
        }
        g.tokens.push(id);
        self.context.push(id);
        if Some(id) == self.think_open && self.channel == Channel::Content {
            self.out.switch(g, on_piece, Channel::Reasoning)?;
            self.channel = Channel::Reasoning;
            self.think_tokens = 0;
        } else if Some(id) == self.think_close && self.channel == Channel::Reasoning {
            self.out.switch(g, on_piece, Channel::Content)?;
            self.channel = Channel::Content;
        } else {
            if self.channel == Channel::Reasoning {
                self.think_tokens += 1;
            }
            if !self.out.push(g, on_piece, self.channel, id)? {
                return Ok(None);
            }
        }
        if constrained_token && self.constraint.as_ref().is_some_and(|c| c.is_finished()) {
            g.finish = Finish::Stop;
            return Ok(None);
        }
        if self.channel == Channel::Reasoning
            && !self.scripted
            && self.forced.is_empty()
            && req.think_budget.is_some_and(|b| self.think_tokens >= b)
            && !self.close_tokens.is_empty()
        {
            g.think_budget_hit = true;
            self.forced.extend(&self.close_tokens);
        }
        if g.completion_tokens >= req.max_tokens {
            g.finish = Finish::Length;
            return Ok(None);
        }
        if self.state.pos >= self.engine.model.max_context() {
            g.finish = Finish::Context;
            return Ok(None);
        }
        Ok(Some(id))
    }

    /// Feeds `id` (what [`Stream::next_token`] returned) through the model alone.
    pub fn feed(&mut self, id: u32) -> Result<()> {
        self.engine.model.forward_into(&[id], &mut self.state, LogitsFor::Last, &mut self.logits)?;
        self.fed_one(id);
        Ok(())
    }

    fn fed_one(&mut self, id: u32) {
        self.fed.push(id);
        self.g.decode_steps += 1;
    }

    /// Ends the generation: flushes the text held back, stores the reply's snapshot in `cache`
    /// and returns what was generated.
    pub fn finish(
        mut self,
        cache: &mut PrefixCache,
        on_piece: &mut impl FnMut(Channel, &str) -> bool,
    ) -> Result<Generation> {
        if self.phase == StreamPhase::Prefill {
            return Err(Error::input("a generation was finished before its prompt was prefilled"));
        }
        let g = &mut self.g;
        g.decode_secs = self.t1.elapsed().as_secs_f64();
        if let Some(c) = &self.constraint {
            (g.constraint_secs, g.constraint_steps) = c.cost();
        }
        g.io_decode = io(&self.engine.model).zip(self.io1).map(|(b, a)| b.since(&a));
        self.out.finish(g, on_piece, self.channel)?;
        if self.fed.len() > self.req.prompt.len() && !self.logits.is_empty() {
            cache.insert(&self.req.cache_scope, &self.fed, &self.state, &self.logits);
        }
        Ok(self.g)
    }
}

/// Feeds the next token of several streams (`ids[i]`, from `streams[i].next_token`) through the
/// model in one pass: each matrix and each routed expert is read once for all of them. Each
/// stream's logits are its own row of the pass.
pub fn feed_batch(streams: &mut [&mut Stream<'_>], ids: &[u32], logits: &mut Vec<f32>) -> Result<()> {
    let Some(first) = streams.first() else { return Ok(()) };
    let model = &first.engine.model;
    if streams.len() == 1 {
        return streams[0].feed(ids[0]);
    }
    let mut states: Vec<&mut SequenceState> = streams.iter_mut().map(|s| &mut s.state).collect();
    model.forward_batch(ids, &mut states, logits)?;
    let v = model.config.vocab_size;
    for (i, (s, &id)) in streams.iter_mut().zip(ids).enumerate() {
        s.logits.clear();
        s.logits.extend_from_slice(&logits[i * v..(i + 1) * v]);
        s.fed_one(id);
    }
    Ok(())
}

fn io(m: &Model) -> Option<IoSnapshot> {
    m.expert_store().map(|s| s.snapshot())
}

/// True when the prompt leaves the model inside a thinking block: the last `<think>` after the
/// last `<|im_start|>` is not closed.
fn prompt_ends_in_thinking(prompt: &[u32], open: u32, close: u32, im_start: Option<u32>) -> bool {
    let turn = im_start.and_then(|s| prompt.iter().rposition(|&t| t == s)).unwrap_or(0);
    let tail = &prompt[turn..];
    match (tail.iter().rposition(|&t| t == open), tail.iter().rposition(|&t| t == close)) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Turns generated ids into channel pieces: UTF-8-safe decoding, newline trimming around the
/// thinking block, stop strings held back while they may still match.
struct Output<'t> {
    decoder: StreamDecoder<'t>,
    tokenizer: &'t TextTokenizer,
    stops: Vec<String>,
    /// Answer text not yet emitted (may be the start of a stop string).
    held: String,
    /// Trailing newlines of the thinking text, emitted only if more thinking follows.
    held_newlines: String,
    /// At the start of a channel's text: leading newlines are dropped.
    at_start: bool,
    stopped: bool,
}

impl<'t> Output<'t> {
    fn new(tokenizer: &'t TextTokenizer, stops: &[String], in_reasoning: bool) -> Self {
        Output {
            decoder: tokenizer.stream_decoder(true),
            tokenizer,
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            held_newlines: String::new(),
            at_start: in_reasoning,
            stopped: false,
        }
    }

    /// Feeds one id of `channel`; false when the generation must stop (stop string or the
    /// callback said so).
    fn push(
        &mut self,
        g: &mut Generation,
        on_piece: &mut impl FnMut(Channel, &str) -> bool,
        channel: Channel,
        id: u32,
    ) -> Result<bool> {
        let piece = self.decoder.push(id)?;
        self.text(g, on_piece, channel, &piece)
    }

    fn text(
        &mut self,
        g: &mut Generation,
        on_piece: &mut impl FnMut(Channel, &str) -> bool,
        channel: Channel,
        piece: &str,
    ) -> Result<bool> {
        if piece.is_empty() || self.stopped {
            return Ok(!self.stopped);
        }
        let mut piece = piece;
        if self.at_start {
            piece = piece.trim_start_matches('\n');
            if piece.is_empty() {
                return Ok(true);
            }
            self.at_start = false;
        }
        match channel {
            Channel::Reasoning => {
                let body = piece.trim_end_matches('\n');
                let mut emit = std::mem::take(&mut self.held_newlines);
                if body.is_empty() {
                    self.held_newlines = emit + piece;
                    return Ok(true);
                }
                emit.push_str(body);
                self.held_newlines = piece[body.len()..].to_string();
                g.reasoning.push_str(&emit);
                if !on_piece(Channel::Reasoning, &emit) {
                    g.finish = Finish::Cancelled;
                    self.stopped = true;
                }
            }
            Channel::Content => {
                self.held.push_str(piece);
                let (emit_len, stop) = self.scan_stops();
                let emit: String = self.held.drain(..emit_len).collect();
                if let Some(s) = stop {
                    self.held.clear();
                    g.finish = Finish::StopString(s);
                    self.stopped = true;
                }
                if !emit.is_empty() {
                    g.content.push_str(&emit);
                    if !on_piece(Channel::Content, &emit) {
                        g.finish = Finish::Cancelled;
                        self.stopped = true;
                    }
                }
            }
        }
        Ok(!self.stopped)
    }

    /// How much of `held` can be emitted, and the stop string found (text up to it is emitted).
    fn scan_stops(&self) -> (usize, Option<String>) {
        let h = &self.held;
        let first = self.stops.iter().filter_map(|s| h.find(s.as_str()).map(|i| (i, s))).min_by_key(|(i, _)| *i);
        if let Some((i, s)) = first {
            return (i, Some(s.clone()));
        }
        // Hold back the longest suffix that is a proper prefix of a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (cut, _) in s.char_indices().skip(1) {
                if cut > keep && h.ends_with(&s[..cut]) {
                    keep = cut;
                }
            }
        }
        (h.len() - keep, None)
    }

    /// Flushes the decoder into the old channel and starts `to`.
    fn switch(
        &mut self,
        g: &mut Generation,
        on_piece: &mut impl FnMut(Channel, &str) -> bool,
        to: Channel,
    ) -> Result<()> {
        let from = if to == Channel::Reasoning { Channel::Content } else { Channel::Reasoning };
        let tail = self.decoder.finish()?;
        self.text(g, on_piece, from, &tail)?;
        if from == Channel::Content {
            self.flush_held(g, on_piece);
        }
        self.held_newlines.clear();
        self.decoder = self.tokenizer.stream_decoder(true);
        self.at_start = true;
        Ok(())
    }

    fn flush_held(&mut self, g: &mut Generation, on_piece: &mut impl FnMut(Channel, &str) -> bool) {
        if !self.stopped && !self.held.is_empty() {
            let emit = std::mem::take(&mut self.held);
            g.content.push_str(&emit);
            if !on_piece(Channel::Content, &emit) {
                g.finish = Finish::Cancelled;
                self.stopped = true;
            }
        }
    }

    fn finish(
        &mut self,
        g: &mut Generation,
        on_piece: &mut impl FnMut(Channel, &str) -> bool,
        channel: Channel,
    ) -> Result<()> {
        let tail = self.decoder.finish()?;
        self.text(g, on_piece, channel, &tail)?;
        self.flush_held(g, on_piece);
        Ok(())
    }
}
