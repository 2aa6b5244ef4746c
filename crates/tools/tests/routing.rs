//! Routing traces and statistics: gini and coverage, hand-checked cache simulations, trace
//! round trips, profile reading, and stats on a generated trace with known structure.

use flashmoe::routing::{Trace, TraceHeader, TraceToken, TraceWriter, read_trace};
use flashmoe_tools::routing_stats::{CachePolicy, Capacity, gini, load_profile, simulate_cache, stats, top_coverage};
use flashmoe_tools::synth::Rng;
use std::path::PathBuf;

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
}

/// A one-layer trace from a list of per-token expert sets.
fn trace1(num_experts: usize, sets: &[&[u32]]) -> Trace {
    let k = sets.iter().map(|s| s.len()).max().unwrap_or(1);
    Trace {
        header: TraceHeader::new(1, num_experts, k),
        tokens: sets.iter().enumerate().map(|(i, s)| TraceToken { pos: i, experts: vec![s.to_vec()] }).collect(),
    }
}

#[test]
fn gini_and_coverage_of_known_distributions() {
    assert_eq!(gini(&[5; 10]), 0.0);
    for n in [2usize, 10, 512] {
        let mut one_hot = vec![0u64; n];
        one_hot[n / 2] = 42;
        assert!((gini(&one_hot) - (n as f64 - 1.0) / n as f64).abs() < 1e-12, "n = {n}");
        assert_eq!(top_coverage(&one_hot, 0.2), 1.0);
    }
    // Counts 1..=4: G = Σ_i Σ_j |x_i − x_j| / (2 n² mean) = 20 / (2·16·2.5) = 0.25.
    assert!((gini(&[3, 1, 4, 2]) - 0.25).abs() < 1e-12);
    assert_eq!(gini(&[0, 0, 0]), 0.0);
    // 20% of 10 experts = the top 2: (9 + 8) / 45.
    let c: Vec<u64> = (0..10).collect();
    assert!((top_coverage(&c, 0.2) - 17.0 / 45.0).abs() < 1e-12);
    assert!((top_coverage(&[7; 10], 0.2) - 0.2).abs() < 1e-12);
}

#[test]
fn lru_hit_rate_matches_hand_computation() {
    // Capacity 2: 0 m, 1 m, 0 h, 2 m (evicts 1), 1 m (evicts 0), 3 m (evicts 2), 0 m → 1/7.
    let t = trace1(4, &[&[0], &[1], &[0], &[2], &[1], &[3], &[0]]);
    let r = simulate_cache(&t, CachePolicy::Lru, Capacity::PerLayer(2));
    assert_eq!((r.hits, r.lookups), (1, 7));
    // Capacity 3: only 3 (after 0, 1, 2) evicts 0; hits at t=2 and t=4 → 2/7.
    let r = simulate_cache(&t, CachePolicy::Lru, Capacity::PerLayer(3));
    assert_eq!((r.hits, r.lookups), (2, 7));
    // Two experts per token, capacity 3: {0,1} m m; {1,2} h m (cache 0,1,2); {0,3} h, m evicting 1
    // (least recent); {1,3} m evicting 2, h → 3/8.
    let t = trace1(4, &[&[0, 1], &[1, 2], &[0, 3], &[1, 3]]);
    let r = simulate_cache(&t, CachePolicy::Lru, Capacity::PerLayer(3));
    assert_eq!((r.hits, r.lookups), (3, 8));
    // Global capacity in bytes: 3 slots of 100 bytes behave like one layer of 3.
    let g = simulate_cache(&t, CachePolicy::Lru, Capacity::GlobalBytes { bytes: 399, expert_bytes: 100 });
    assert_eq!(g, r);
}

#[test]
fn lfu_and_frequency_seeded_match_hand_computation() {
    let t = trace1(4, &[&[0], &[0], &[1], &[2], &[0], &[1]]);
    // LRU, capacity 2: m h m m(evicts 0) m(evicts 1) m → 1/6.
    assert_eq!(simulate_cache(&t, CachePolicy::Lru, Capacity::PerLayer(2)).hits, 1);
    // LFU without aging: 2 evicts 1 (count 1 < 2), 0 hits, 1 evicts 2 → 2/6.
    let lfu = CachePolicy::LfuAging { half_life: 1e12 };
    assert_eq!(simulate_cache(&t, lfu, Capacity::PerLayer(2)).hits, 2);
    // With fast aging the counts forget: behaves like LRU here.
    let aged = CachePolicy::LfuAging { half_life: 0.01 };
    assert_eq!(simulate_cache(&t, aged, Capacity::PerLayer(2)).hits, 1);
    // Frequency-seeded: the first quarter (2 tokens) makes 0 the pinned expert, resident from the
    // start: 0 h, 0 h, 1 m, 2 m (evicts 1), 0 h, 1 m → 3/6.
    assert_eq!(simulate_cache(&t, CachePolicy::FrequencySeeded, Capacity::PerLayer(2)).hits, 3);
}

#[test]
fn trace_round_trips_and_bad_traces_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.jsonl");
    let header = TraceHeader::new(3, 16, 2);
    let tokens: Vec<TraceToken> = (0..5)
        .map(|p| TraceToken {
            pos: p,
            experts: (0..3).map(|l| vec![(p + l) as u32 % 16, (p * 3 + l + 1) as u32 % 16]).collect(),
        })
        .collect();
    {
        let mut w = TraceWriter::new(&path, header.clone()).unwrap();
        for t in &tokens {
            w.write_token(t.pos, &t.experts).unwrap();
        }
        w.flush().unwrap();
        assert!(w.write_token(9, &[vec![1]]).is_err(), "wrong number of layers");
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first, serde_json::json!({"flashmoe_routing_trace": 1, "num_layers": 3, "num_experts": 16, "top_k": 2}));
    assert_eq!(text.lines().nth(1).unwrap(), r#"{"pos":0,"experts":[[0,1],[1,2],[2,3]]}"#);
    let back = read_trace(&path).unwrap();
    assert_eq!(back, Trace { header, tokens });

    // The engine's records (layer, pos, experts), prefill layer-major: grouped into the same lines.
    let path2 = tmp.path().join("t2.jsonl");
    {
        let mut w = TraceWriter::new(&path2, back.header.clone()).unwrap();
        let mut recs = Vec::new();
        for l in 0..3 {
            for t in &back.tokens {
                recs.push((l, t.pos, t.experts[l].clone()));
            }
        }
        w.write_decisions(&recs).unwrap();
        assert!(w.write_decisions(&[(0, 99, vec![1, 2])]).is_err(), "position 99 lacks layers 1, 2");
    }
    assert_eq!(read_trace(&path2).unwrap(), back);

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"flashmoe_routing_trace\": 1, \"num_layers\": 1, \"num_experts\": 4, \"top_k\": 1}\n{\"pos\":0,\"experts\":[[7]]}\n").unwrap();
    let e = read_trace(&bad).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("expert 7 out of range"), "{e}");
    std::fs::write(&bad, "{\"pos\":0}\n").unwrap();
    let e = read_trace(&bad).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("routing trace header"), "{e}");
}

#[test]
fn both_profile_formats_are_read() {
    let p397 = load_profile(&repo("testdata/routing/qwen3.5-397b-expert-activation-profile.json")).unwrap();
    assert_eq!(p397.len(), 60);
    assert!((p397[0].gini - 0.5071708333333332).abs() < 1e-12);
    assert!((p397[0].top20.unwrap() - 0.5256666666666667).abs() < 1e-12);
    let p35 = load_profile(&repo("testdata/routing/qwen3.5-35b-expert-activation-profile.json")).unwrap();
    assert_eq!(p35.len(), 40);
    assert!((p35[0].gini - 0.4024962890625).abs() < 1e-12);
    assert!((p35[0].top20.unwrap() - 0.45267500000000005).abs() < 1e-12);
    assert!(p35.iter().chain(&p397).all(|l| (0.0..1.0).contains(&l.gini) && l.top20.is_some()));
}

#[test]
fn stats_on_a_generated_trace_reflect_its_structure() {
    // Layer 0: uniform random; layer 1: always drawn from experts 0..8; layer 2: the same set as
    // the previous token 90% of the time.
    let (e, k, n) = (64usize, 4usize, 3000usize);
    let mut rng = Rng::new(1);
    let pick = |range: usize, rng: &mut Rng| {
        let mut s: Vec<u32> = Vec::new();
        while s.len() < k {
            let x = (rng.next_u64() % range as u64) as u32;
            if !s.contains(&x) {
                s.push(x);
            }
        }
        s
    };
    let mut tokens = Vec::new();
    let mut prev = pick(e, &mut rng);
    for p in 0..n {
        let l0 = pick(e, &mut rng);
        let l1 = pick(8, &mut rng);
        if rng.uniform() >= 0.9 {
            prev = pick(e, &mut rng);
        }
        tokens.push(TraceToken { pos: p, experts: vec![l0, l1, prev.clone()] });
    }
    let t = Trace { header: TraceHeader::new(3, e, k), tokens };
    let s = stats(&t);
    assert_eq!(s.tokens, n);
    assert_eq!(s.capacities, vec![8, 16, 32, 64], "capacities capped at E");
    let (l0, l1, l2) = (&s.layers[0], &s.layers[1], &s.layers[2]);
    assert!(l0.gini < 0.1, "{l0:?}");
    // 8 of 64 experts carry everything: gini = 1 − 8/64 = 0.875, top 12 experts cover all.
    assert!((l1.gini - 0.875).abs() < 0.02 && l1.top20 == 1.0, "{l1:?}");
    assert!((l0.overlap - k as f64 / e as f64).abs() < 0.02, "{l0:?}");
    assert!(l2.overlap > 0.85, "{l2:?}");
    // LRU of 8 on layer 1 holds its whole working set; at capacity E everything but the first
    // touches hits.
    assert!(l1.lru[0] > 0.99 && l0.lru[3] > 0.98);
    assert!((l0.lru[0] - 8.0 / 64.0).abs() < 0.03, "LRU-8 of uniform 64 hits ≈ 8/64: {l0:?}");
    assert!(l2.lru[0] > 0.85);
    assert!(l0.lru.windows(2).all(|w| w[0] <= w[1]), "hit rate grows with capacity");
    assert!((s.mean.gini - (l0.gini + l1.gini + l2.gini) / 3.0).abs() < 1e-12);
    // Policies on the same trace: all hit more with more room.
    for p in [CachePolicy::Lru, CachePolicy::LfuAging { half_life: 32.0 }, CachePolicy::FrequencySeeded] {
        let small = simulate_cache(&t, p, Capacity::PerLayer(8)).hit_rate();
        let big = simulate_cache(&t, p, Capacity::PerLayer(32)).hit_rate();
        assert!(small < big && big <= 1.0, "{p:?}: {small} {big}");
    }
}
