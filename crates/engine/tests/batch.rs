//! Continuous batching: requests generated together give what each gives alone (greedy), a
//! batched pass's logits are each sequence's own (bit for bit on the CPU; within the GPU's
//! tolerance on CUDA, whose batch runs the multi-row kernels), requests join and leave at any
//! round, and cancellation is per request. The first two run on every backend available.

use flashmoe::batch::{Batcher, Sink};
use flashmoe::generate::Engine;
use flashmoe::session::{Channel, Finish, GenerateRequest, Generation, Session};
use flashmoe::{LoadOptions, LogitsFor};
use serde_json::json;
use std::path::PathBuf;

fn load(rel: &str) -> Engine {
    load_on(rel, &LoadOptions::default())
}

fn load_on(rel: &str, o: &LoadOptions) -> Engine {
    Engine::load_with(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel), o).unwrap()
}

/// (name, load options, whether a batched row is bit-identical to the sequence alone).
fn backends() -> Vec<(&'static str, LoadOptions, bool)> {
    #[allow(unused_mut)]
    let mut v = vec![("cpu", LoadOptions::default(), true)];
    #[cfg(feature = "cuda")]
    if flashmoe::cuda::CudaDevice::open(0).is_ok() {
        use flashmoe::backend::{DeviceChoice, DeviceOptions};
        let device = DeviceOptions { device: DeviceChoice::Cuda(0), ..Default::default() };
        v.push(("cuda", LoadOptions { device, ..Default::default() }, false));
    }
    v
}

fn chat(e: &Engine, text: &str) -> Vec<u32> {
    e.encode(&e.render_chat(&json!([{"role": "user", "content": text}]), None, None).unwrap()).unwrap()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt, max_tokens, ..Default::default() }
}

#[derive(Default)]
struct Collect {
    text: String,
    pieces: usize,
    /// Stop after this many pieces.
    cancel_after: Option<usize>,
}

impl Sink for Collect {
    fn keep_going(&mut self) -> bool {
        self.cancel_after.is_none_or(|n| self.pieces < n)
    }
    fn piece(&mut self, _: Channel, text: &str) -> bool {
        self.text.push_str(text);
        self.pieces += 1;
        true
    }
}

fn solo(e: &Engine, req: &GenerateRequest) -> Generation {
    Session::new(e, 0).generate(req, || true, |_, _| true).unwrap()
}

/// Runs rounds until every request has ended; returns (sink, generation) in the order they
/// ended, and the largest decode batch seen.
fn drain(b: &mut Batcher<'_, Collect>) -> (Vec<(Collect, Generation)>, usize) {
    let mut done = Vec::new();
    let mut widest = 0;
    while !b.is_empty() {
        let (stats, ended) = b.step();
        widest = widest.max(stats.decoded);
        for (sink, g) in ended {
            done.push((sink, g.unwrap()));
        }
    }
    (done, widest)
}

#[test]
fn batched_requests_generate_what_each_generates_alone() {
    for (backend, o, _) in backends() {
        for rel in ["models/qwen35-moe-tiny-trained", "testdata/models/qwen35-moe-tiny"] {
            batched_equals_solo(backend, &load_on(rel, &o), rel);
        }
    }
}

fn batched_equals_solo(backend: &str, e: &Engine, rel: &str) {
    {
        let prompts = [
            "What is a package manager?",
            "Tell me about the history of Unix and the GNU project in a few words.",
            "Hello",
            "Which file holds the list of mounted file systems? Explain how to read it, and what each column means.",
        ];
        let reqs: Vec<GenerateRequest> =
            prompts.iter().enumerate().map(|(i, p)| greedy(chat(e, p), 12 + 6 * i)).collect();
        let alone: Vec<Generation> = reqs.iter().map(|r| solo(e, r)).collect();

        // Two join at once, two more after a few rounds (while the first are decoding).
        let mut b = Batcher::new(e, 0, 8);
        for r in &reqs[..2] {
            b.admit(r.clone(), Collect::default()).map_err(|(_, e)| e).unwrap();
        }
        let mut done = Vec::new();
        let mut widest = 0;
        for _ in 0..4 {
            let (stats, ended) = b.step();
            widest = widest.max(stats.decoded);
            done.extend(ended.into_iter().map(|(s, g)| (s, g.unwrap())));
        }
        for r in &reqs[2..] {
            b.admit(r.clone(), Collect::default()).map_err(|(_, e)| e).unwrap();
        }
        let (rest, w) = drain(&mut b);
        done.extend(rest);
        widest = widest.max(w);
        // (The random model stops one request early, before the last two join.)
        let expect = if rel.starts_with("models/") { 4 } else { 3 };
        assert_eq!(widest, expect, "{backend} {rel}: requests decoded together in one pass");
        assert_eq!(done.len(), 4);
        for (sink, g) in &done {
            let i = alone.iter().position(|a| a.prompt_tokens == g.prompt_tokens).unwrap();
            assert_eq!(g.tokens, alone[i].tokens, "{backend} {rel}: request {i}");
            assert_eq!(g.content, alone[i].content, "{backend} {rel}: request {i}");
            assert_eq!(sink.text, alone[i].content);
            assert_eq!(g.finish, alone[i].finish);
            assert_eq!(g.completion_tokens, alone[i].completion_tokens);
        }
    }
}

#[test]
fn a_batched_pass_gives_each_sequence_its_own_logits() {
    for (backend, o, exact) in backends() {
        own_logits(backend, &load_on("models/qwen35-moe-tiny-trained", &o), exact);
    }
}

fn own_logits(backend: &str, e: &Engine, exact: bool) {
    let m = &e.model;
    let v = m.config.vocab_size;
    // Sequences at different positions (3, 9 and 17 tokens of context).
    let prompts: Vec<Vec<u32>> =
        [3usize, 9, 17].iter().map(|&n| (0..n as u32).map(|i| 100 + 37 * i).collect()).collect();
    let next = [500u32, 600, 700];
    let mut states = Vec::new();
    let mut solo = Vec::new();
    for (p, &id) in prompts.iter().zip(&next) {
        let mut s = m.new_state();
        m.forward(p, &mut s, LogitsFor::None).unwrap();
        let mut alone = s.clone();
        solo.push(m.forward(&[id], &mut alone, LogitsFor::Last).unwrap());
        states.push(s);
    }
    let mut refs: Vec<&mut flashmoe::SequenceState> = states.iter_mut().collect();
    let mut logits = Vec::new();
    m.forward_batch(&next, &mut refs, &mut logits).unwrap();
    assert_eq!(logits.len(), 3 * v);
    for (i, s) in solo.iter().enumerate() {
        let row = &logits[i * v..(i + 1) * v];
        if exact {
            // Up to flashmoe_kernels::SMALL_BATCH rows every product runs the one-row kernel
            // per row: the very same numbers as the sequence alone.
            let differ = row.iter().zip(s).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            assert_eq!(differ, 0, "{backend} sequence {i}: {differ} logits differ from the solo pass");
        } else {
            // The GPU tolerance against transformers (1e-3 of max |logit|) holds between the
            // batch's multi-row kernels and the decode GEMV too.
            let max = s.iter().fold(0f32, |a, x| a.max(x.abs()));
            let err = row.iter().zip(s).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            eprintln!("{backend} sequence {i}: max |Δ| {err:.3e} (max |logit| {max:.3})");
            assert!(err <= 1e-3 * max, "{backend} sequence {i}: max |Δ| {err} against max |logit| {max}");
        }
        assert_eq!(argmax(row), argmax(s), "{backend} sequence {i}");
    }
    for (s, p) in states.iter().zip(&prompts) {
        assert_eq!(s.pos, p.len() + 1);
    }
    // A sequence at the end of its context is refused, not run.
    assert!(m.forward_batch(&[1, 2], &mut states.iter_mut().take(1).collect::<Vec<_>>(), &mut logits).is_err());
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap()
}

#[test]
fn cancellation_is_per_request_and_bad_requests_are_refused_at_the_door() {
    let e = load("models/qwen35-moe-tiny-trained");
    let a = greedy(chat(&e, "What is a package manager?"), 24);
    let b = greedy(chat(&e, "Hello"), 24);
    let alone = solo(&e, &b);
    let mut batch = Batcher::new(&e, 0, 4);
    batch.admit(a, Collect { cancel_after: Some(3), ..Default::default() }).map_err(|(_, e)| e).unwrap();
    batch.admit(b, Collect::default()).map_err(|(_, e)| e).unwrap();
    let (empty, e2) = match batch.admit(greedy(Vec::new(), 4), Collect::default()) {
        Err((sink, err)) => (sink, err),
        Ok(()) => panic!("an empty prompt was admitted"),
    };
    assert!(empty.text.is_empty());
    assert!(e2.to_string().contains("empty"), "{e2}");
    assert_eq!(batch.len(), 2);
    let (done, _) = drain(&mut batch);
    let cancelled = done.iter().find(|(s, _)| s.cancel_after.is_some()).unwrap();
    assert_eq!(cancelled.1.finish, Finish::Cancelled);
    assert_eq!(cancelled.0.pieces, 3);
    let other = done.iter().find(|(s, _)| s.cancel_after.is_none()).unwrap();
    assert_eq!(other.1.tokens, alone.tokens);
    assert_eq!(other.1.finish, alone.finish);
}

#[test]
fn the_shared_state_cache_serves_a_resumed_turn_inside_a_batch() {
    let e = load("models/qwen35-moe-tiny-trained");
    let p = chat(&e, "What is a package manager?");
    let mut batch = Batcher::new(&e, 64 << 20, 4);
    batch.admit(greedy(p.clone(), 8), Collect::default()).map_err(|(_, e)| e).unwrap();
    let (first, _) = drain(&mut batch);
    // The same prompt again, with another request beside it: resumed whole from the snapshot.
    batch.admit(greedy(p.clone(), 8), Collect::default()).map_err(|(_, e)| e).unwrap();
    batch.admit(greedy(chat(&e, "Hello"), 8), Collect::default()).map_err(|(_, e)| e).unwrap();
    let (second, _) = drain(&mut batch);
    let again = second.iter().find(|(_, g)| g.prompt_tokens == p.len()).unwrap();
    assert_eq!(again.1.reused_tokens, p.len());
    assert_eq!(again.1.tokens, first[0].1.tokens);
}
