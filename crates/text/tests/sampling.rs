//! Sampler behaviour with asserted values.

use flashmoe_text::{Sampler, SamplingParams};

fn params(temperature: f32) -> SamplingParams {
    SamplingParams { temperature, seed: Some(1234), ..SamplingParams::default() }
}

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

#[test]
fn greedy_picks_argmax_lowest_id_on_ties() {
    let mut s = Sampler::new(SamplingParams::default());
    assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[], &[]), 1);
    assert_eq!(s.sample(&mut [1.0, 5.0, 5.0, 5.0], &[], &[]), 1);
    assert_eq!(s.sample(&mut [f32::NAN, 0.0, -1.0], &[], &[]), 1);
}

#[test]
fn top_k_one_equals_greedy() {
    let mut greedy = Sampler::new(SamplingParams::default());
    let mut k1 =
        Sampler::new(SamplingParams { temperature: 1.5, top_k: 1, seed: Some(7), ..SamplingParams::default() });
    let mut state = 12345u64;
    for _ in 0..50 {
        let logits: Vec<f32> = (0..1000)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32 * 10.0
            })
            .collect();
        assert_eq!(greedy.sample(&mut logits.clone(), &[], &[]), k1.sample(&mut logits.clone(), &[], &[]));
    }
}

#[test]
fn seed_reproducibility() {
    let logits: Vec<f32> = (0..5000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        });
        (0..100).map(|_| s.sample(&mut logits.clone(), &[], &[])).collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn top_p_keeps_minimal_nucleus() {
    let probs = [0.05, 0.5, 0.15, 0.3];
    let mut s = Sampler::new(SamplingParams { top_p: 0.75, ..params(1.0) });
    let dist = s.probabilities(&mut logits_of(&probs), &[], &[]);
    // 0.5 + 0.3 = 0.8 ≥ 0.75: tokens 1 and 3, renormalized, most likely first.
    assert_eq!(dist.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 3]);
    assert!((dist[0].1 - 0.625).abs() < 1e-5 && (dist[1].1 - 0.375).abs() < 1e-5);

    s = Sampler::new(SamplingParams { top_p: 0.85, ..params(1.0) });
    let dist = s.probabilities(&mut logits_of(&probs), &[], &[]);
    assert_eq!(dist.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 3, 2]);
    // Draws never leave the nucleus.
    for _ in 0..2000 {
        assert_ne!(s.sample(&mut logits_of(&probs), &[], &[]), 0);
    }
}

#[test]
fn top_p_on_large_vocab_grows_window() {
    // Flat distribution over 10k tokens: the nucleus (9000 tokens) exceeds the first window.
    let mut s = Sampler::new(SamplingParams { top_p: 0.9, ..params(1.0) });
    let dist = s.probabilities(&mut vec![0.0; 10_000], &[], &[]);
    assert_eq!(dist.len(), 9000);
    // Ties are kept in id order.
    assert_eq!(dist[0].0, 0);
    assert_eq!(dist[8999].0, 8999);
}

#[test]
fn top_k_restricts() {
    let mut s = Sampler::new(SamplingParams { top_k: 2, ..params(1.0) });
    let probs = [0.1, 0.2, 0.3, 0.4];
    let mut dist = s.probabilities(&mut logits_of(&probs), &[], &[]);
    dist.sort_by_key(|d| d.0);
    assert_eq!(dist.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2, 3]);
    assert!((dist[0].1 - 3.0 / 7.0).abs() < 1e-5);
}

#[test]
fn min_p_threshold() {
    // max 0.5; min_p 0.3 → threshold 0.15: keeps 0.5, 0.3 and 0.16, drops 0.04.
    let probs = [0.5, 0.3, 0.16, 0.04];
    let mut s = Sampler::new(SamplingParams { min_p: 0.3, ..params(1.0) });
    let mut dist = s.probabilities(&mut logits_of(&probs), &[], &[]);
    dist.sort_by_key(|d| d.0);
    assert_eq!(dist.iter().map(|d| d.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    s = Sampler::new(SamplingParams { min_p: 0.33, ..params(1.0) });
    let dist = s.probabilities(&mut logits_of(&probs), &[], &[]);
    assert_eq!(dist.len(), 2);
}

#[test]
fn repetition_penalty_hf_semantics() {
    let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::default() });
    let mut logits = vec![4.0, -1.0, 3.0, 1.0];
    // Token 0 appears twice in the context but is penalized once; token 1 (negative) is multiplied.
    let id = s.sample(&mut logits, &[0, 0, 1, 99], &[]);
    assert_eq!(logits, vec![2.0, -2.0, 3.0, 1.0]);
    assert_eq!(id, 2);
}

#[test]
fn presence_and_frequency_penalties() {
    let mut s =
        Sampler::new(SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..SamplingParams::default() });
    let mut logits = vec![1.0, 1.0, 1.0, 1.0];
    // Only generated tokens count: token 3 is in the context only.
    s.sample(&mut logits, &[3, 0, 0, 0, 2], &[0, 0, 0, 2]);
    assert_eq!(logits, vec![1.0 - 0.5 - 0.75, 1.0, 1.0 - 0.5 - 0.25, 1.0]);
}

#[test]
fn temperature_scales() {
    let mut s = Sampler::new(params(0.5));
    let probs = [0.2, 0.8];
    let dist = s.probabilities(&mut logits_of(&probs), &[], &[]);
    // p ∝ p^(1/T) = p²: 0.64 / 0.68.
    assert_eq!(dist[0].0, 1);
    assert!((dist[0].1 - 0.64 / 0.68).abs() < 1e-5);
}

#[test]
fn distribution_matches_softmax() {
    let probs = [0.1f32, 0.2, 0.3, 0.4];
    let mut s = Sampler::new(params(1.0));
    let n = 20_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[s.sample(&mut logits_of(&probs), &[], &[]) as usize] += 1;
    }
    for (c, p) in counts.iter().zip(probs) {
        let f = *c as f32 / n as f32;
        // 4 standard deviations of a binomial proportion at n = 20k is < 0.014.
        assert!((f - p).abs() < 0.015, "frequency {f} vs {p}: {counts:?}");
    }
}

#[test]
fn all_masked_falls_back_to_argmax() {
    let mut s = Sampler::new(params(1.0));
    let mut logits = vec![f32::NEG_INFINITY; 8];
    assert_eq!(s.sample(&mut logits, &[], &[]), 0);
}

#[test]
fn large_vocab_is_fast_enough() {
    // 248k logits, typical chat settings: a draw must stay far below a decode step.
    let n = 248_320;
    let mut state = 99u64;
    let logits: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 * 20.0
        })
        .collect();
    let context: Vec<u32> = (0..4000).map(|i| (i * 61) % n as u32).collect();
    let mut s = Sampler::new(SamplingParams {
        temperature: 0.7,
        top_k: 20,
        top_p: 0.95,
        min_p: 0.0,
        repetition_penalty: 1.05,
        presence_penalty: 1.5,
        ..params(0.7)
    });
    let t = std::time::Instant::now();
    for _ in 0..20 {
        let id = s.sample(&mut logits.clone(), &context, &context[..500]);
        assert!((id as usize) < n);
    }
    let per = t.elapsed() / 20;
    eprintln!("sample over 248k logits: {per:?}");
    assert!(per < std::time::Duration::from_millis(50), "{per:?}");
}

#[test]
fn top_k_exact_on_large_vocab_with_ties() {
    // Coarse values make many ties; the selection must equal a full sort (value desc, id asc).
    let n = 20_000;
    let mut state = 5u64;
    let logits: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) % 50) as f32
        })
        .collect();
    for k in [3, 40, 1000] {
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        let mut s = Sampler::new(SamplingParams { top_k: k, ..params(1.0) });
        let dist = s.probabilities(&mut logits.clone(), &[], &[]);
        let got: Vec<u32> = dist.iter().map(|d| d.0).collect();
        assert_eq!(got, order[..k], "k={k}");
    }
}

/// The sampling defaults of a real model's generation_config.json (Qwen3.5, testdata/generation)
/// reach `SamplingParams`; absent fields stay neutral.
#[test]
fn qwen35_generation_config_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/generation/qwen3.5-generation_config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let p = SamplingParams::from_generation_config(&v).unwrap();
    assert_eq!((p.temperature, p.top_k, p.top_p), (0.6, 20, 0.95));
    assert_eq!((p.min_p, p.repetition_penalty, p.presence_penalty, p.seed), (0.0, 1.0, 0.0, None));
    assert!(!p.is_greedy());
    assert_eq!(p.describe(), "temp 0.6 top-p 0.95 top-k 20");
}

#[test]
fn generation_config_do_sample_and_absent_fields() {
    let parse = |s: &str| SamplingParams::from_generation_config(&serde_json::from_str(s).unwrap());
    // do_sample false: greedy whatever the temperature (transformers).
    let p = parse(r#"{"do_sample": false, "temperature": 0.7, "top_k": 20}"#).unwrap();
    assert!(p.is_greedy());
    assert_eq!(p.describe(), "greedy");
    // No do_sample but sampling values: sample with them (vLLM).
    let p = parse(r#"{"temperature": 0.7, "top_p": 0.8}"#).unwrap();
    assert_eq!((p.temperature, p.top_p, p.top_k), (0.7, 0.8, 0));
    // do_sample true without a temperature: transformers' 1.0.
    let p = parse(r#"{"do_sample": true, "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 1.5}"#).unwrap();
    assert_eq!((p.temperature, p.min_p, p.repetition_penalty, p.presence_penalty), (1.0, 0.05, 1.1, 1.5));
    // Only stop ids: greedy (transformers' default do_sample false).
    assert!(parse(r#"{"eos_token_id": [1, 2]}"#).unwrap().is_greedy());
    // Wrong types and ranges name the field.
    assert!(parse(r#"{"temperature": "hot"}"#).unwrap_err().contains("`temperature`"));
    assert!(parse(r#"{"top_p": 1.5}"#).unwrap_err().contains("`top_p`"));
    assert!(parse(r#"{"top_k": -1}"#).unwrap_err().contains("`top_k`"));
    assert!(parse(r#"{"do_sample": "yes"}"#).unwrap_err().contains("`do_sample`"));
}

#[test]
fn logit_bias_is_added_after_penalties_and_reaches_greedy() {
    // Greedy picks 2; +3 on token 0 makes it the top (1.0 + 3 > 3.5); -100 on it removes it.
    let logits = [1.0f32, 0.5, 3.5, -2.0];
    let mut greedy = Sampler::new(SamplingParams { logit_bias: vec![(0, 3.0)], ..Default::default() });
    assert_eq!(greedy.sample(&mut logits.clone(), &[], &[]), 0);
    let mut banned = Sampler::new(SamplingParams { logit_bias: vec![(2, -100.0)], ..Default::default() });
    assert_eq!(banned.sample(&mut logits.clone(), &[], &[]), 0);
    // An id past the vocabulary is ignored, not a panic.
    let mut past = Sampler::new(SamplingParams { logit_bias: vec![(99, 5.0)], ..Default::default() });
    assert_eq!(past.sample(&mut logits.clone(), &[], &[]), 2);
    // Sampled: a -100 bias leaves the token a probability of about e^-100, i.e. none.
    let mut sampled = Sampler::new(SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        logit_bias: vec![(2, -100.0)],
        ..Default::default()
    });
    let probs = sampled.probabilities(&mut logits.clone(), &[], &[]);
    assert!(probs.iter().all(|&(id, p)| id != 2 || p < 1e-30), "{probs:?}");
    // After the repetition penalty (3.5 / 2 = 1.75 for a repeated token 2), +0.8 on token 0 wins.
    let mut both =
        Sampler::new(SamplingParams { repetition_penalty: 2.0, logit_bias: vec![(0, 0.8)], ..Default::default() });
    assert_eq!(both.sample(&mut logits.clone(), &[2], &[2]), 0);
}
