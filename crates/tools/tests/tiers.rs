//! Two-tier (GPU + RAM) expert-cache replay: Belady against a brute-force optimum, hand-counted
//! replays of a cyclic trace, the hybrid's PCIe traffic, pre-warming, every policy against its
//! optimum, and the replay's speed on a Zipf trace of a real model's shape.

use flashmoe::routing::{Trace, TraceHeader, TraceToken, TraceWriter};
use flashmoe_tools::routing_stats::{
    OPT_COLD, OPT_WARM, OPT_WARM_TAIL, Prewarm, TIER_POLICIES, TierAccesses, TierCounts, TierPolicy, TierSizes,
    belady_hits, replay_tiers, tier_report,
};
use flashmoe_tools::synth::Rng;
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

/// A trace of one layer, one expert per token.
fn sequence(num_experts: usize, seq: &[u32]) -> Trace {
    Trace {
        header: TraceHeader::new(1, num_experts, 1),
        tokens: seq.iter().enumerate().map(|(p, &e)| TraceToken { pos: p, experts: vec![vec![e]] }).collect(),
    }
}

/// Zipf-like routing: per layer a random ranking of the experts, expert of rank r drawn with
/// weight 1/(r+1)^s, k distinct per token; each slot repeats the previous token's expert with
/// probability `stay` (some temporal locality, as real routers have).
fn zipf_trace(tokens: usize, layers: usize, experts: usize, k: usize, s: f64, stay: f64, seed: u64) -> Trace {
    let mut rng = Rng::new(seed);
    let cdf: Vec<f64> = (0..experts)
        .scan(0.0, |acc, r| {
            *acc += 1.0 / ((r + 1) as f64).powf(s);
            Some(*acc)
        })
        .collect();
    let total = *cdf.last().unwrap();
    let ranking: Vec<Vec<u32>> = (0..layers)
        .map(|_| {
            let mut p: Vec<u32> = (0..experts as u32).collect();
            for i in (1..p.len()).rev() {
                p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            p
        })
        .collect();
    let mut prev: Vec<Vec<u32>> = vec![Vec::new(); layers];
    let mut out = Vec::with_capacity(tokens);
    for pos in 0..tokens {
        let mut token = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut set: Vec<u32> = Vec::with_capacity(k);
            for j in 0..k {
                if j < prev[l].len() && rng.uniform() < stay && !set.contains(&prev[l][j]) {
                    set.push(prev[l][j]);
                }
            }
            while set.len() < k {
                let u = rng.uniform() * total;
                let r = cdf.partition_point(|&c| c < u).min(experts - 1);
                let e = ranking[l][r];
                if !set.contains(&e) {
                    set.push(e);
                }
            }
            prev[l] = set.clone();
            token.push(set);
        }
        out.push(TraceToken { pos, experts: token });
    }
    Trace { header: TraceHeader::new(layers, experts, k), tokens: out }
}

/// The fewest misses of any cache of `cap` keys (bypass allowed) starting from `init`, by trying
/// every admission and eviction (memoized on the cache contents).
fn brute_misses(keys: &[u32], cap: usize, init: &BTreeSet<u32>) -> u64 {
    fn go(keys: &[u32], i: usize, cache: BTreeSet<u32>, cap: usize, memo: &mut HashMap<(usize, Vec<u32>), u64>) -> u64 {
        if i == keys.len() {
            return 0;
        }
        let id = (i, cache.iter().copied().collect::<Vec<_>>());
        if let Some(&m) = memo.get(&id) {
            return m;
        }
        let k = keys[i];
        let best = if cache.contains(&k) {
            go(keys, i + 1, cache, cap, memo)
        } else {
            let mut best = 1 + go(keys, i + 1, cache.clone(), cap, memo);
            if cache.len() < cap {
                let mut c = cache.clone();
                c.insert(k);
                best = best.min(1 + go(keys, i + 1, c, cap, memo));
            } else {
                for &v in &cache {
                    let mut c = cache.clone();
                    c.remove(&v);
                    c.insert(k);
                    best = best.min(1 + go(keys, i + 1, c, cap, memo));
                }
            }
            best
        };
        memo.insert(id, best);
        best
    }
    go(keys, 0, init.clone(), cap, &mut HashMap::new())
}

/// Every subset of `items` of size `n`.
fn subsets(items: &[u32], n: usize) -> Vec<BTreeSet<u32>> {
    if n == 0 {
        return vec![BTreeSet::new()];
    }
    if items.len() < n {
        return Vec::new();
    }
    let mut with: Vec<BTreeSet<u32>> = subsets(&items[1..], n - 1);
    for s in &mut with {
        s.insert(items[0]);
    }
    with.extend(subsets(&items[1..], n));
    with
}

#[test]
fn belady_is_optimal_against_brute_force() {
    // By hand, capacity 2 over the cycle 0 1 2 0 1 2: 0 and 1 admitted, 2 bypassed (used later
    // than both), 0 and 1 hit, 2 misses again: 2 hits. Warm: {0, 1} from the start: 4 hits.
    assert_eq!(belady_hits(&[0, 1, 2, 0, 1, 2], 3, 2, false), 2);
    assert_eq!(belady_hits(&[0, 1, 2, 0, 1, 2], 3, 2, true), 4);
    // 0 1 2 3 0 1 2 3 0 with room for 3: 0 1 2 admitted; 3 bypassed (next use 7, farther than
    // 6); 0 1 2 hit (1 and 2 are then dead); 3 misses and is never used again; 0 hits: 4 hits.
    assert_eq!(belady_hits(&[0, 1, 2, 3, 0, 1, 2, 3, 0], 4, 3, false), 4);
    assert_eq!(belady_hits(&[0, 1, 2, 3, 0, 1, 2, 3, 0], 4, 0, false), 0);
    assert_eq!(belady_hits(&[0, 1, 2, 3, 0, 1, 2, 3, 0], 4, 9, false), 5);

    let mut rng = Rng::new(42);
    for case in 0..150 {
        let n = 6 + case % 6;
        let distinct = 3 + case % 3;
        let keys: Vec<u32> = (0..n).map(|_| (rng.next_u64() % distinct as u64) as u32).collect();
        let used: Vec<u32> = keys.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
        for cap in 1..=3 {
            let total = keys.len() as u64;
            let cold = total - belady_hits(&keys, distinct, cap, false);
            assert_eq!(cold, brute_misses(&keys, cap, &BTreeSet::new()), "{keys:?} cap {cap}");
            let warm = total - belady_hits(&keys, distinct, cap, true);
            let best = subsets(&used, cap.min(used.len())).iter().map(|s| brute_misses(&keys, cap, s)).min().unwrap();
            assert_eq!(warm, best, "{keys:?} cap {cap}, best initial contents");
        }
    }
}

/// Expected counts: `[lookups, gpu_hits, ram_hits, disk_reads, cpu_experts, h2d, d2h]`.
fn counts(tokens: usize, c: [u64; 7]) -> TierCounts {
    let [lookups, gpu_hits, ram_hits, disk_reads, cpu_experts, h2d, d2h] = c;
    TierCounts { tokens, lookups, gpu_hits, ram_hits, disk_reads, cpu_experts, h2d, d2h }
}

#[test]
fn cyclic_trace_inclusive_rereads_exclusive_does_not() {
    // 5 experts in a cycle, 30 tokens, tiers of 4 each. A short half-life makes LFU-with-aging
    // evict the least recently used (the counts forget at once).
    let seq: Vec<u32> = (0..30).map(|t| t % 5).collect();
    let acc = TierAccesses::new(&sequence(5, &seq)).unwrap();
    let hl = 0.01;
    // Inclusive: both tiers are LRU of 4 over a cycle of 5: never a hit; every use is a disk read
    // and a copy to the GPU.
    let inc = replay_tiers(&acc, TierPolicy::Inclusive, Prewarm::Cold, 4, 4, hl);
    assert_eq!(inc, counts(30, [30, 0, 0, 30, 0, 30, 0]));
    // Exclusive: the union holds 8 ≥ 5: 5 cold reads, then every use is a RAM hit swapped with
    // the GPU's least recent (from token 4 on, every placement demotes one: 26).
    let exc = replay_tiers(&acc, TierPolicy::Exclusive, Prewarm::Cold, 4, 4, hl);
    assert_eq!(exc, counts(30, [30, 0, 25, 5, 0, 30, 26]));
    // Exclusive+cpu (the engine's hybrid auto): 0–3 fill the free GPU slots; 4 finds the GPU
    // full, so it goes to RAM and the CPU, where it is computed at every use (4, 9, …, 29).
    // PCIe: the 4 disk reads that filled the GPU; nothing is demoted.
    let cpu = replay_tiers(&acc, TierPolicy::ExclusiveCpu, Prewarm::Cold, 4, 4, hl);
    assert_eq!(cpu, counts(30, [30, 20, 5, 5, 6, 4, 0]));
    // With the default half-life the exclusive union still reads each expert once.
    assert_eq!(replay_tiers(&acc, TierPolicy::Exclusive, Prewarm::Cold, 4, 4, 32.0).disk_reads, 5);

    // The report: 100-byte experts, 4 per tier; the optimum reads 5.
    let r = tier_report(&acc, TierSizes { gpu_bytes: 499, ram_bytes: 400, expert_bytes: 100 }, hl);
    assert_eq!((r.gpu_experts, r.ram_experts), (4, 4));
    let row = |name: &str| r.rows.iter().find(|x| x.policy == name).unwrap_or_else(|| panic!("no row {name}"));
    let opt = row(OPT_COLD);
    assert_eq!((opt.disk_reads, opt.disk_bytes), (5, 500));
    // Belady over the GPU alone (4 of a cycle of 5): 0–3 admitted, 4 always bypassed (its next
    // use is the farthest): 6 misses of 4, 4 cold misses, 20 hits.
    assert_eq!((opt.gpu_hits, belady_hits(&seq, 5, 4, false)), (20, 20));
    assert_eq!(row("inclusive").disk_bytes, 3000);
    assert_eq!(row("inclusive").disk_vs_optimum, Some(6.0));
    assert_eq!(row("inclusive").pcie_bytes, Some(3000));
    assert_eq!(row("exclusive").disk_vs_optimum, Some(1.0));
    assert_eq!(row("exclusive").pcie_bytes, Some(5600));
    assert_eq!(row("exclusive+cpu").pcie_bytes, Some(400));
    assert_eq!(row("exclusive+cpu").cpu_experts_per_token, Some(6.0 / 30.0));
    assert!((row("exclusive").disk_mib_per_token - 500.0 / 30.0 / 1048576.0).abs() < 1e-15);
}

#[test]
fn hybrid_pcie_comes_only_from_disk_reads_and_demotions() {
    let t = zipf_trace(400, 4, 64, 4, 0.9, 0.3, 3);
    let acc = TierAccesses::new(&t).unwrap();
    for (g, r) in [(16, 32), (4, 100), (64, 8), (40, 0)] {
        let c = replay_tiers(&acc, TierPolicy::ExclusiveCpu, Prewarm::Cold, g, r, 32.0);
        // Disk reads fill free GPU slots only (at most g copies, never a demotion); the rest,
        // and every RAM hit, are computed by the CPU.
        assert!(c.h2d <= g as u64 && c.h2d <= c.disk_reads, "g={g} r={r}: {c:?}");
        assert_eq!(c.d2h, 0, "g={g} r={r}");
        assert_eq!(c.cpu_experts, c.ram_hits + c.disk_reads - c.h2d, "g={g} r={r}");
        assert!(c.ram_hits > 0 || r == 0, "g={g} r={r}: {c:?}");
        // The plain exclusive policy moves RAM hits over the bus as well.
        let e = replay_tiers(&acc, TierPolicy::Exclusive, Prewarm::Cold, g, r, 32.0);
        assert_eq!(e.h2d, e.disk_reads + e.ram_hits, "g={g} r={r}");
        assert!(e.h2d + e.d2h > c.h2d + c.d2h || r == 0, "g={g} r={r}");
    }
    // No GPU at all: the hybrid computes everything from RAM, nothing crosses PCIe; without the
    // CPU every use does.
    let c = replay_tiers(&acc, TierPolicy::ExclusiveCpu, Prewarm::Cold, 0, 50, 32.0);
    assert_eq!((c.h2d, c.d2h, c.gpu_hits), (0, 0, 0));
    assert_eq!(c.cpu_experts, c.lookups);
    let e = replay_tiers(&acc, TierPolicy::Exclusive, Prewarm::Cold, 0, 50, 32.0);
    assert_eq!((e.h2d, e.d2h, e.disk_reads, e.ram_hits), (e.lookups, 0, c.disk_reads, c.ram_hits));
}

#[test]
fn prewarm_with_the_whole_trace_and_room_for_everything_reads_nothing() {
    let t = zipf_trace(300, 3, 32, 4, 1.0, 0.2, 5);
    let acc = TierAccesses::new(&t).unwrap();
    let distinct = acc.counts(0, acc.tokens).iter().filter(|&&c| c > 0).count();
    assert!(distinct > 40, "{distinct}");
    let g = distinct / 3;
    for policy in [TierPolicy::Exclusive, TierPolicy::ExclusiveCpu] {
        let c = replay_tiers(&acc, policy, Prewarm::WholeTrace, g, distinct - g, 32.0);
        assert_eq!(c.disk_reads, 0, "{policy:?}");
        assert_eq!(c.lookups, c.gpu_hits + c.ram_hits);
        // Cold, the same tiers read each expert once; one short they read more.
        let cold = replay_tiers(&acc, policy, Prewarm::Cold, g, distinct - g, 32.0);
        assert_eq!(cold.disk_reads, distinct as u64, "{policy:?}");
        assert!(replay_tiers(&acc, policy, Prewarm::WholeTrace, g, distinct - g - 1, 32.0).disk_reads > 0);
    }
    // The first-25% profile replays the last 75% only.
    let c = replay_tiers(&acc, TierPolicy::Exclusive, Prewarm::FirstQuarter, g, distinct - g, 32.0);
    assert_eq!(c.tokens, 225);
    assert_eq!(c.lookups as usize, acc.token_keys(75, 300).len());
    let eb = 1000;
    let r = tier_report(
        &acc,
        TierSizes { gpu_bytes: (g as u64) * eb, ram_bytes: (distinct - g) as u64 * eb, expert_bytes: eb },
        32.0,
    );
    let row = r.rows.iter().find(|x| x.policy == "exclusive, pre-warmed (profile = this trace)").unwrap();
    assert_eq!((row.disk_bytes, row.optimum.as_str(), row.disk_vs_optimum), (0, OPT_WARM, Some(1.0)));
}

#[test]
fn every_policy_reads_at_least_its_optimum() {
    let t = zipf_trace(600, 6, 64, 6, 0.8, 0.3, 11);
    let acc = TierAccesses::new(&t).unwrap();
    for (g, r) in [(6, 0), (12, 40), (40, 12), (0, 64), (100, 100), (6, 300)] {
        let report = tier_report(&acc, TierSizes { gpu_bytes: g * 10, ram_bytes: r * 10, expert_bytes: 10 }, 32.0);
        assert_eq!(report.rows.len(), TIER_POLICIES.len() + 4);
        for row in &report.rows {
            let opt = report.rows.iter().find(|x| x.policy == row.optimum).unwrap();
            assert_eq!((row.tokens, row.lookups), (opt.tokens, opt.lookups), "{}", row.policy);
            assert!(
                row.disk_reads >= opt.disk_reads,
                "g={g} r={r} {}: {} < {}",
                row.policy,
                row.disk_reads,
                opt.disk_reads
            );
            assert!(row.gpu_hits <= opt.gpu_hits, "g={g} r={r} {}: GPU hits above the bound", row.policy);
            if row.policy.contains("first 25%") {
                assert_eq!(row.optimum, OPT_WARM_TAIL);
            }
        }
    }
}

/// 2,000 tokens × 12 layers × 512 experts, top-10 (240k lookups): the whole report (seven
/// replays, eight Belady runs) for three size pairs. Set FLASHMOE_TIER_TRACE=FILE to keep the
/// trace (for `flashmoe routing-stats FILE --policies …`).
#[test]
fn tier_report_on_a_zipf_trace_is_fast() {
    let t = zipf_trace(2000, 12, 512, 10, 1.0, 0.3, 1);
    if let Ok(path) = std::env::var("FLASHMOE_TIER_TRACE") {
        let mut w = TraceWriter::new(std::path::Path::new(&path), t.header.clone()).unwrap();
        for tok in &t.tokens {
            w.write_token(tok.pos, &tok.experts).unwrap();
        }
        w.flush().unwrap();
    }
    let acc = TierAccesses::new(&t).unwrap();
    let eb = 6 << 20;
    let start = Instant::now();
    for (g, r) in [(300u64, 600u64), (600, 1800), (100, 3000)] {
        let report = tier_report(&acc, TierSizes { gpu_bytes: g * eb, ram_bytes: r * eb, expert_bytes: eb }, 32.0);
        let opt = report.rows.iter().find(|x| x.policy == OPT_COLD).unwrap();
        let inc = report.rows.iter().find(|x| x.policy == "inclusive").unwrap();
        let exc = report.rows.iter().find(|x| x.policy == "exclusive").unwrap();
        assert!(opt.disk_reads <= exc.disk_reads && exc.disk_reads <= inc.disk_reads, "g={g} r={r}");
    }
    eprintln!("tier reports, 3 size pairs, 240k lookups: {:.2?}", start.elapsed());
}

/// 10,000 tokens × 60 layers, top-10 (6M lookups), one size pair: run it in release with
/// `cargo test --release -p flashmoe-tools --test tiers -- --ignored --nocapture`.
#[test]
#[ignore]
fn tier_report_on_six_million_lookups() {
    let t = zipf_trace(10_000, 60, 512, 10, 1.0, 0.3, 2);
    let acc = TierAccesses::new(&t).unwrap();
    let eb = 6 << 20;
    let start = Instant::now();
    let c = replay_tiers(&acc, TierPolicy::Exclusive, Prewarm::Cold, 2000, 6000, 32.0);
    eprintln!("one replay (exclusive), {} lookups: {:.2?}", c.lookups, start.elapsed());
    let start = Instant::now();
    let hits = belady_hits(&acc.keys, acc.num_keys, 8000, false);
    eprintln!("one Belady run, {} hits: {:.2?}", hits, start.elapsed());
    let start = Instant::now();
    let report = tier_report(&acc, TierSizes { gpu_bytes: 2000 * eb, ram_bytes: 6000 * eb, expert_bytes: eb }, 32.0);
    eprintln!("tier report (7 replays, 8 Belady runs), {} lookups: {:.2?}", acc.keys.len(), start.elapsed());
    for row in &report.rows {
        eprintln!("{:<48} disk {:.2} MiB/token, {:?}", row.policy, row.disk_mib_per_token, row.disk_vs_optimum);
    }
}
