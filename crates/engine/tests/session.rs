//! Sessions: state reuse must not change what is generated, the think budget closes thinking,
//! stop strings cut the text, cancellation stops within one token, scripted replies come out
//! exactly.

use flashmoe::generate::{Engine, GenerateOptions};
use flashmoe::session::{Channel, Finish, GenerateRequest, PrefixCache, Session};
use serde_json::json;
use std::path::PathBuf;

fn tiny() -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen35-moe-tiny");
    Engine::load(&dir).unwrap()
}

fn trained() -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen35-moe-tiny-trained");
    Engine::load(&dir).unwrap()
}

fn prompt(e: &Engine, messages: serde_json::Value) -> Vec<u32> {
    e.encode(&e.render_chat(&messages, None, None).unwrap()).unwrap()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt, max_tokens, split_reasoning: true, ..Default::default() }
}

fn run(s: &mut Session, req: &GenerateRequest) -> flashmoe::session::Generation {
    s.generate(req, || true, |_, _| true).unwrap()
}

#[test]
fn cold_generation_matches_engine_generate() {
    let e = tiny();
    let p = prompt(&e, json!([{"role": "user", "content": "Hello there"}]));
    let mut text = String::new();
    let stats = e
        .generate(&p, &GenerateOptions { max_tokens: 24, sampling: Default::default(), constraint: None }, |t| {
            text.push_str(t);
            true
        })
        .unwrap();
    let mut s = Session::new(&e, 0);
    let g = run(&mut s, &GenerateRequest { split_reasoning: false, ..greedy(p, 24) });
    assert_eq!(g.content, text);
    assert_eq!(g.completion_tokens, stats.completion_tokens);
    assert_eq!(g.tokens, stats.tokens);
}

/// A second turn that extends the first (prompt + reply + next user message) resumes from the
/// snapshot at the end of the first generation and gives the same tokens as a cold run.
#[test]
fn resumed_turn_matches_cold_run() {
    for e in [tiny(), trained()] {
        let turn1 = json!([{"role": "user", "content": "What is a package manager?"}]);
        let p1 = prompt(&e, turn1.clone());
        let mut warm = Session::new(&e, 64 << 20);
        let g1 = run(&mut warm, &greedy(p1.clone(), 16));
        assert_eq!(g1.reused_tokens, 0);
        assert_eq!(warm.cache.stats().misses, 1);
        // Second turn: the rendered prompt starts with turn 1's prompt + its reply tokens when the
        // reply re-tokenizes to the same ids; else at least with turn 1's prompt.
        let reply = e.tokenizer.decode(&g1.tokens, false).unwrap();
        let turn2 = json!([
            {"role": "user", "content": "What is a package manager?"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And apt?"}
        ]);
        let p2 = prompt(&e, turn2);
        assert!(p2.starts_with(&p1));
        let g2 = run(&mut warm, &greedy(p2.clone(), 16));
        assert!(g2.reused_tokens >= p1.len(), "reused {} of {}", g2.reused_tokens, p2.len());
        assert_eq!(g2.prefilled_tokens + g2.reused_tokens, p2.len());
        let st = warm.cache.stats();
        assert_eq!(st.hits, 1);
        assert_eq!(st.reused_tokens, g2.reused_tokens as u64);

        let mut cold = Session::new(&e, 0);
        let c2 = run(&mut cold, &greedy(p2.clone(), 16));
        assert_eq!(c2.reused_tokens, 0);
        assert_eq!(c2.tokens, g2.tokens, "resumed generation differs from a cold run");
        assert_eq!(c2.content, g2.content);

        // The same prompt again resumes entirely (no prefill) and still gives the same tokens.
        let g3 = run(&mut warm, &greedy(p2.clone(), 16));
        assert_eq!(g3.reused_tokens, p2.len());
        assert_eq!(g3.prefilled_tokens, 0);
        assert_eq!(g3.tokens, c2.tokens);
    }
}

#[test]
fn cache_is_bounded_lru() {
    let e = tiny();
    let a = prompt(&e, json!([{"role": "user", "content": "aaaa"}]));
    let b = prompt(&e, json!([{"role": "user", "content": "bbbb"}]));
    let mut st = e.model.new_state();
    let la = e.model.forward(&a, &mut st, flashmoe::LogitsFor::Last).unwrap();
    let one = st.bytes() + la.len() * 4 + a.len() * 4;
    let mut cache = PrefixCache::new(one + one / 2);
    cache.insert("", &a, &st, &la);
    assert_eq!(cache.len(), 1);
    let mut st_b = e.model.new_state();
    let lb = e.model.forward(&b, &mut st_b, flashmoe::LogitsFor::Last).unwrap();
    cache.insert("", &b, &st_b, &lb);
    assert_eq!(cache.len(), 1, "the bound holds one snapshot");
    assert!(cache.bytes() <= cache.max_bytes());
    assert!(cache.lookup("", &a).is_none());
    let r = cache.lookup("", &b).unwrap();
    assert_eq!(r.tokens, b.len());
    assert_eq!(r.logits, lb);
    assert_eq!(cache.stats().evictions, 1);
    // Nothing is stored in a zero-size cache.
    let mut none = PrefixCache::new(0);
    none.insert("", &a, &st, &la);
    assert!(none.is_empty());
}

/// A snapshot serves only requests of its own scope (a server's client): another scope misses,
/// even for the very same prompt, and the snapshot stays for its owner.
#[test]
fn cache_lookup_is_scoped() {
    let e = tiny();
    let a = prompt(&e, json!([{"role": "user", "content": "secret"}]));
    let mut st = e.model.new_state();
    let la = e.model.forward(&a, &mut st, flashmoe::LogitsFor::Last).unwrap();
    let mut cache = PrefixCache::new(1 << 30);
    cache.insert("alice", &a, &st, &la);
    assert!(cache.lookup("bob", &a).is_none());
    assert!(cache.lookup("", &a).is_none());
    assert_eq!(cache.lookup("alice", &a).map(|r| r.tokens), Some(a.len()));
    // The same tokens stored for bob are a second snapshot, not a refresh of alice's.
    cache.insert("bob", &a, &st, &la);
    assert_eq!(cache.len(), 2);
}

#[test]
fn scripted_reply_is_emitted_exactly() {
    let e = tiny();
    let p = prompt(&e, json!([{"role": "user", "content": "hi"}]));
    let reply = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>";
    let ids = e.encode(reply).unwrap();
    let mut s = Session::new(&e, 1 << 20);
    let req = GenerateRequest { forced: Some(ids.clone()), ..greedy(p.clone(), 1000) };
    let g = run(&mut s, &req);
    assert_eq!(g.content, reply);
    assert_eq!(g.tokens, ids);
    assert_eq!(g.finish, Finish::Stop);
    assert_eq!(g.completion_tokens, ids.len() + 1);
    // Truncated by max_tokens.
    let g = run(&mut s, &GenerateRequest { max_tokens: 5, ..req });
    assert_eq!(g.finish, Finish::Length);
    assert_eq!(g.tokens, ids[..5]);
}

#[test]
fn think_budget_closes_thinking() {
    let e = tiny();
    // The prompt opens a thinking block, as Qwen3.5's template does with thinking on.
    let mut p = prompt(&e, json!([{"role": "user", "content": "think"}]));
    p.extend(e.encode("<think>\n").unwrap());
    let mut s = Session::new(&e, 0);
    let mut pieces = Vec::new();
    let req = GenerateRequest { think_budget: Some(2), extra_stop_ids: vec![], ..greedy(p, 30) };
    let g = s
        .generate(
            &req,
            || true,
            |c, t| {
                pieces.push((c, t.to_string()));
                true
            },
        )
        .unwrap();
    assert!(g.think_budget_hit, "{:?} {:?}", g.tokens, g.finish);
    let close = e.tokenizer.token_to_id("</think>").unwrap();
    let at = g.tokens.iter().position(|&t| t == close).expect("</think> inserted");
    // The close comes right after the budget: 2 thinking tokens, then "\n" (forced).
    assert!(at <= 3, "</think> at {at}");
    assert!(pieces.iter().all(|(c, _)| matches!(c, Channel::Reasoning | Channel::Content)));
    let reasoning: String = pieces.iter().filter(|(c, _)| *c == Channel::Reasoning).map(|(_, t)| t.as_str()).collect();
    assert_eq!(reasoning, g.reasoning);
    assert!(!g.reasoning.contains("think>"));
}

#[test]
fn stop_strings_cut_text_and_cancel_stops_within_one_token() {
    let e = tiny();
    let p = prompt(&e, json!([{"role": "user", "content": "hi"}]));
    let reply = "alpha beta STOP gamma";
    let ids = e.encode(reply).unwrap();
    let mut s = Session::new(&e, 0);
    let mut streamed = String::new();
    let req = GenerateRequest {
        forced: Some(ids),
        stop_strings: vec!["STOP".into(), "zzz".into()],
        ..greedy(p.clone(), 100)
    };
    let g = s
        .generate(
            &req,
            || true,
            |_, t| {
                streamed.push_str(t);
                true
            },
        )
        .unwrap();
    assert_eq!(g.content, "alpha beta ");
    assert_eq!(streamed, "alpha beta ");
    assert_eq!(g.finish, Finish::StopString("STOP".into()));

    // Cancel after 3 forward steps: no further forward runs.
    let mut calls = 0;
    let g = s
        .generate(
            &greedy(p, 100),
            || {
                calls += 1;
                calls <= 4
            },
            |_, _| true,
        )
        .unwrap();
    assert_eq!(g.finish, Finish::Cancelled);
    assert_eq!(g.decode_steps, 3);
}

/// The JSON schema of the constrained-generation tests: every value bounded, so even the tiny
/// random model finishes the object in a few dozen tokens.
fn bounded_schema() -> serde_json::Value {
    json!({"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "ok": {"type": "boolean"}},
        "required": ["city", "days", "ok"], "additionalProperties": false})
}

fn check_bounded(content: &str) {
    let v: serde_json::Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
    assert!(["Paris", "Rome"].contains(&v["city"].as_str().unwrap()), "{v}");
    assert!((1..=9).contains(&v["days"].as_u64().unwrap()), "{v}");
    assert!(v["ok"].is_boolean(), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
}

#[test]
fn a_grammar_constraint_shapes_sampled_replies_and_ends_them() {
    use flashmoe_text::GrammarSpec;
    let e = tiny();
    let p = prompt(&e, json!([{"role": "user", "content": "weather?"}]));
    let mut s = Session::new(&e, 0);
    for seed in 0..3 {
        let constraint = Some(e.grammars().unwrap().compile(&GrammarSpec::JsonSchema(bounded_schema())).unwrap());
        let sampling = flashmoe_text::SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() };
        let req = GenerateRequest { constraint, sampling, ..greedy(p.clone(), 200) };
        let g = run(&mut s, &req);
        // Ended by the grammar (or a stop token where it allows one), not by the limit.
        assert_eq!(g.finish, Finish::Stop, "{:?}", g.content);
        check_bounded(&g.content);
        assert_eq!(g.constraint_steps, g.tokens.len() + usize::from(g.completion_tokens > g.tokens.len()));
    }
}

#[test]
fn the_constraint_starts_after_thinking() {
    use flashmoe_text::GrammarSpec;
    let e = tiny();
    let mut p = prompt(&e, json!([{"role": "user", "content": "think"}]));
    p.extend(e.encode("<think>\n").unwrap());
    let constraint = Some(e.grammars().unwrap().compile(&GrammarSpec::JsonSchema(bounded_schema())).unwrap());
    let req = GenerateRequest { constraint, think_budget: Some(4), ..greedy(p, 200) };
    let g = run(&mut Session::new(&e, 0), &req);
    assert!(g.think_budget_hit, "{:?}", g.reasoning);
    assert_eq!(g.finish, Finish::Stop);
    check_bounded(&g.content);
}

#[test]
fn logprobs_are_the_log_softmax_of_the_raw_logits_at_each_step() {
    let e = trained();
    let p = prompt(&e, json!([{"role": "user", "content": "What is apt?"}]));
    // A repetition penalty changes what is picked, not what is reported.
    let sampling = flashmoe_text::SamplingParams { repetition_penalty: 1.3, ..Default::default() };
    let req = GenerateRequest { logprobs: Some(3), sampling, ..greedy(p.clone(), 6) };
    let mut streamed = Vec::new();
    let g =
        Session::new(&e, 0).generate_with_logprobs(&req, || true, |_, _| true, |lp| streamed.push(lp.clone())).unwrap();
    assert_eq!(g.logprobs, streamed);
    assert_eq!(g.logprobs.len(), g.tokens.len());
    // Reference: one batched prefill of prompt + reply, log-softmax in f64 per position.
    let mut all = p.clone();
    all.extend(&g.tokens);
    let mut state = e.model.new_state();
    let logits = e.model.forward(&all, &mut state, flashmoe::layers::LogitsFor::All).unwrap();
    let v = e.model.config.vocab_size;
    for (i, lp) in g.logprobs.iter().enumerate() {
        let row = &logits[(p.len() - 1 + i) * v..(p.len() + i) * v];
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        assert_eq!(lp.id, g.tokens[i]);
        assert!((lp.logprob as f64 - (row[lp.id as usize] as f64 - lse)).abs() < 1e-3, "{i}");
        assert_eq!(lp.top.len(), 3);
        let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(lp.top[0].0 as usize, best);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    assert!(
        Session::new(&e, 0).generate(&GenerateRequest { logprobs: Some(21), ..req }, || true, |_, _| true).is_err()
    );
}
