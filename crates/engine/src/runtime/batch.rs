//! Continuous batching: several requests generate at once. Each round of [`Batcher::step`]
//! runs one prefill chunk of one request whose prompt is not in yet (round-robin, so a long
//! prompt delays the others by one chunk per round, not by its whole length) and then one
//! decode step for every request that is decoding, all of them in one forward pass: each
//! matrix and each routed expert is read (and, when experts stream, fetched) once for the whole
//! batch instead of once per request.
//!
//! A request joins at any round and leaves when it ends; cancellation is per request (its
//! [`Sink::keep_going`] is asked before each of its forward steps). Sampling, stop handling and
//! output are each request's own ([`Stream`]). On a placement that cannot batch (today: the
//! CUDA backend) the scheduler still interleaves the requests, feeding each token alone.
//!
//! Exactness: a row of a batched pass goes through the same operations as a pass over its
//! sequence alone. On the CPU, up to `flashmoe_kernels::SMALL_BATCH` (8) rows every matrix
//! product runs the one-row kernel once per row over cache-sized blocks of weights (the weights
//! still come from memory once), so each sequence gets bit for bit the logits it gets alone and
//! the same text, sampled or greedy. Above 8 rows the products dequantize tiles for all rows at
//! once, which can differ in the last bits.

use super::generate::Engine;
use super::session::{Channel, Generation, PrefixCache, Stream, feed_batch};
use crate::error::{Error, Result};
use flashmoe_text::TokenLogprob;
use std::cell::RefCell;

/// Where a request's output goes (a server: the client's channel).
pub trait Sink {
    /// False when the request is to stop (client gone, cancelled): asked before each of its
    /// forward steps.
    fn keep_going(&mut self) -> bool;
    /// Decoded text of a channel; false stops the request.
    fn piece(&mut self, channel: Channel, text: &str) -> bool;
    /// A generated token's logprob (when the request asked for them), before its text.
    fn logprob(&mut self, _lp: &TokenLogprob) {}
}

struct Active<'e, S> {
    stream: Stream<'e>,
    sink: S,
}

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Prompt tokens prefilled (one chunk of one request, or none).
    pub prefilled: usize,
    /// Requests that got a token in this round's decode pass.
    pub decoded: usize,
}

/// The requests being generated, and the state cache they share.
pub struct Batcher<'e, S: Sink> {
    engine: &'e Engine,
    pub cache: PrefixCache,
    active: Vec<Active<'e, S>>,
    max_batch: usize,
    /// Round-robin position among the requests still prefilling.
    next_prefill: usize,
    /// The decode pass's logits, reused across rounds.
    logits: Vec<f32>,
}

impl<'e, S: Sink> Batcher<'e, S> {
    /// At most `max_batch` requests at once (1 when the placement cannot batch and
    /// `max_batch` is 0).
    pub fn new(engine: &'e Engine, cache_bytes: usize, max_batch: usize) -> Self {
        Batcher {
            engine,
            cache: PrefixCache::new(cache_bytes),
            active: Vec::new(),
            max_batch: max_batch.max(1),
            next_prefill: 0,
            logits: Vec::new(),
        }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Whether another request can join now.
    pub fn has_room(&self) -> bool {
        self.active.len() < self.max_batch
    }

    /// Starts a request (resuming from the cache's best snapshot of its prompt). A request the
    /// engine refuses (empty or too long prompt…) comes back with its sink and the error.
    pub fn admit(&mut self, req: super::session::GenerateRequest, sink: S) -> std::result::Result<(), (S, Error)> {
        match Stream::start(self.engine, &mut self.cache, req) {
            Ok(stream) => {
                self.active.push(Active { stream, sink });
                Ok(())
            }
            Err(e) => Err((sink, e)),
        }
    }

    /// Ends every request in flight with `why` (after a panic: their states may be half
    /// written), dropping the cache's snapshots too.
    pub fn abort_all(&mut self) -> Vec<S> {
        self.cache.clear();
        self.active.drain(..).map(|a| a.sink).collect()
    }

    /// One round: cancellations, one prefill chunk, one decode step for every decoding request.
    /// Returns the requests that ended in it, with their generations (or errors).
    pub fn step(&mut self) -> (RoundStats, Vec<(S, Result<Generation>)>) {
        let mut stats = RoundStats::default();
        let mut ended: Vec<usize> = Vec::new();
        let mut errors: Vec<(usize, Error)> = Vec::new();
        for a in self.active.iter_mut() {
            if !a.stream.ended() && !a.sink.keep_going() {
                a.stream.cancel();
            }
        }

        // One chunk of one prompt.
        let prefilling: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].stream.prefilling() && !self.active[i].stream.ended())
            .collect();
        if !prefilling.is_empty() {
            let i = prefilling[self.next_prefill % prefilling.len()];
            self.next_prefill = self.next_prefill.wrapping_add(1);
            let left = self.active[i].stream.prefill_left();
            match self.active[i].stream.prefill_step(&mut self.cache) {
                Ok(()) => stats.prefilled = left - self.active[i].stream.prefill_left(),
                Err(e) => errors.push((i, e)),
            }
        }

        // The next token of every decoding request, then one pass over all of them.
        let mut ids = Vec::new();
        let mut rows = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate() {
            if a.stream.prefilling() || a.stream.ended() || errors.iter().any(|(j, _)| *j == i) {
                continue;
            }
            // Two callbacks over one sink, never running at the same time.
            let sink = RefCell::new(&mut a.sink);
            let mut on_piece = |c: Channel, t: &str| sink.borrow_mut().piece(c, t);
            let mut on_logprob = |lp: &TokenLogprob| sink.borrow_mut().logprob(lp);
            match a.stream.next_token(&mut on_piece, &mut on_logprob) {
                Ok(Some(id)) => {
                    ids.push(id);
                    rows.push(i);
                }
                Ok(None) => {}
                Err(e) => errors.push((i, e)),
            }
        }
        if !rows.is_empty() {
            let r = if self.engine.model.can_batch() {
                let mut streams: Vec<&mut Stream<'e>> = (self.active.iter_mut().enumerate())
                    .filter(|(i, _)| rows.contains(i))
                    .map(|(_, a)| &mut a.stream)
                    .collect();
                feed_batch(&mut streams, &ids, &mut self.logits).map(|_| Vec::new())
            } else {
                // One pass per request; a failure is that request's alone.
                let mut failed = Vec::new();
                for (&i, &id) in rows.iter().zip(&ids) {
                    if let Err(e) = self.active[i].stream.feed(id) {
                        failed.push((i, e));
                    }
                }
                Ok(failed)
            };
            match r {
                Ok(failed) => {
                    stats.decoded = rows.len() - failed.len();
                    errors.extend(failed);
                }
                // A batched pass fails as a whole: every request in it fails with the error.
                Err(e) => {
                    let msg = e.to_string();
                    for &i in &rows {
                        errors.push((i, Error::input(format!("the batched decode step failed: {msg}"))));
                    }
                }
            }
        }

        for (i, a) in self.active.iter().enumerate() {
            if a.stream.ended() || errors.iter().any(|(j, _)| *j == i) {
                ended.push(i);
            }
        }
        let mut out = Vec::new();
        for &i in ended.iter().rev() {
            let Active { stream, mut sink } = self.active.remove(i);
            let result = match errors.iter().position(|(j, _)| *j == i) {
                Some(p) => Err(errors.swap_remove(p).1),
                None => stream.finish(&mut self.cache, &mut |c: Channel, t: &str| sink.piece(c, t)),
            };
            out.push((sink, result));
        }
        out.reverse();
        (stats, out)
    }
}
