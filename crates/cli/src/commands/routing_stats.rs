//! `flashmoe routing-stats`: statistics of a routing trace (`--trace-routing FILE`), optionally
//! next to a real profile, and a comparison of RAM cache policies.

use anyhow::Result;
use clap::Args;
use flashmoe::routing::read_trace;
use flashmoe_tools::routing_stats::{
    CachePolicy, Capacity, ProfileLayer, load_profile, profile_layer_for, simulate_cache, stats,
};
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RoutingStatsArgs {
    /// A routing trace written with --trace-routing.
    pub file: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// A routing profile (JSON, as in ../shared/data/routing) to print next to ours.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Also print hit rates of the cache policies (LRU, LFU with aging, frequency-seeded) across
    /// per-layer capacities.
    #[arg(long)]
    pub policies: bool,
    /// Half-life, in tokens, of the LFU-with-aging counts.
    #[arg(long, default_value_t = 32.0)]
    pub half_life: f64,
}

pub fn run(a: RoutingStatsArgs) -> Result<()> {
    let trace = read_trace(&a.file)?;
    let s = stats(&trace);
    let profile: Option<Vec<ProfileLayer>> = a.compare.as_deref().map(load_profile).transpose()?;
    let prof_for = |l: usize| profile.as_ref().map(|p| &p[profile_layer_for(l, s.num_layers, p.len())]);
    let policies = [CachePolicy::Lru, CachePolicy::LfuAging { half_life: a.half_life }, CachePolicy::FrequencySeeded];
    let policy_rows: Vec<(String, Vec<f64>)> = if a.policies {
        policies
            .iter()
            .map(|p| {
                (
                    p.name(),
                    s.capacities
                        .iter()
                        .map(|&c| simulate_cache(&trace, *p, Capacity::PerLayer(c)).hit_rate())
                        .collect(),
                )
            })
            .collect()
    } else {
        Vec::new()
    };

    if a.json {
        let mut v = serde_json::to_value(&s)?;
        if let Some(p) = &profile {
            v["compare"] = json!({
                "file": a.compare.as_ref().unwrap().display().to_string(),
                "layers": (0..s.num_layers).map(|l| {
                    let pl = profile_layer_for(l, s.num_layers, p.len());
                    json!({"profile_layer": pl, "gini": p[pl].gini, "top20": p[pl].top20})
                }).collect::<Vec<_>>(),
            });
        }
        if a.policies {
            v["policies"] = json!({
                "capacities_per_layer": s.capacities,
                "hit_rate": policy_rows.iter().map(|(n, r)| json!({"policy": n, "hit_rate": r})).collect::<Vec<_>>(),
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }

    println!("{} tokens, {} layers, {} experts, top-{}", s.tokens, s.num_layers, s.num_experts, s.top_k);
    let mut head = format!("{:>5} {:>6} {:>6} {:>7}", "layer", "gini", "top20", "overlap");
    if profile.is_some() {
        head += &format!(" {:>9} {:>9}", "prof.gini", "prof.top20");
    }
    for c in &s.capacities {
        head += &format!(" {:>7}", format!("lru{c}"));
    }
    println!("{head}");
    let row = |label: String, l: &flashmoe_tools::routing_stats::LayerStats, p: Option<(f64, Option<f64>)>| {
        let mut line = format!("{label:>5} {:>6.3} {:>6.3} {:>7.3}", l.gini, l.top20, l.overlap);
        if let Some((g, t)) = p {
            line += &format!(" {:>9.3} {:>10}", g, t.map_or("-".to_string(), |t| format!("{t:.3}")));
        }
        for h in &l.lru {
            line += &format!(" {:>7.3}", h);
        }
        println!("{line}");
    };
    for (i, l) in s.layers.iter().enumerate() {
        row(i.to_string(), l, prof_for(i).map(|p| (p.gini, p.top20)));
    }
    let mean_prof = profile.as_ref().map(|_| {
        let n = s.num_layers as f64;
        let g = (0..s.num_layers).map(|l| prof_for(l).unwrap().gini).sum::<f64>() / n;
        let t: Vec<f64> = (0..s.num_layers).filter_map(|l| prof_for(l).unwrap().top20).collect();
        (g, (!t.is_empty()).then(|| t.iter().sum::<f64>() / t.len() as f64))
    });
    row("mean".into(), &s.mean, mean_prof);
    if a.policies {
        println!();
        println!("cache hit rate by policy and per-layer capacity (experts):");
        let mut head = format!("{:<24}", "policy");
        for c in &s.capacities {
            head += &format!(" {:>7}", c);
        }
        println!("{head}");
        for (n, r) in &policy_rows {
            let mut line = format!("{n:<24}");
            for h in r {
                line += &format!(" {:>7.3}", h);
            }
            println!("{line}");
        }
    }
    Ok(())
}
