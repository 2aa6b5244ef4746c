//! `flashmoe routing-stats`: statistics of a routing trace (`--trace-routing FILE`), optionally
//! next to a real profile, a comparison of RAM cache policies, and a replay through two-tier
//! (GPU + RAM) expert caches next to the offline optimum.

use anyhow::{Result, anyhow, bail};
use clap::Args;
use flashmoe::memory::{fmt as fmt_bytes, parse_size};
use flashmoe::routing::read_trace;
use flashmoe_tools::routing_stats::{
    CachePolicy, Capacity, ProfileLayer, TierAccesses, TierReport, TierSizes, load_profile, profile_layer_for,
    simulate_cache, stats, tier_report,
};
use serde_json::json;
use std::io::{BufWriter, Write};
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
    /// per-layer capacities, and with --gpu-cache/--ram-cache the two-tier replay.
    #[arg(long)]
    pub policies: bool,
    /// Half-life, in tokens, of the LFU-with-aging counts.
    #[arg(long, default_value_t = 32.0, value_parser = crate::args::positive_number)]
    pub half_life: f64,
    /// GPU expert cache size(s) for the two-tier replay (with --policies), e.g. 14G or 4.8G,14G.
    /// Every GPU size is paired with every --ram-cache size (cross product). Default 0.
    #[arg(long, value_delimiter = ',', requires = "policies", value_name = "SIZE[,SIZE…]")]
    pub gpu_cache: Vec<String>,
    /// RAM expert cache size(s) for the two-tier replay (with --policies), e.g. 24G or 10G,24G.
    /// Default 0.
    #[arg(long, value_delimiter = ',', requires = "policies", value_name = "SIZE[,SIZE…]")]
    pub ram_cache: Vec<String>,
    /// Bytes of one expert (e.g. 6.75M): needed with --gpu-cache/--ram-cache; each cache holds
    /// floor(size / expert bytes) experts.
    #[arg(long, requires = "policies", value_name = "SIZE")]
    pub expert_bytes: Option<String>,
}

fn sizes(flag: &str, list: &[String]) -> Result<Vec<u64>> {
    if list.is_empty() {
        return Ok(vec![0]);
    }
    list.iter().map(|s| parse_size(s).map_err(|e| anyhow!("--{flag} {e}"))).collect()
}

/// The (GPU, RAM) size pairs of the two-tier replay: every GPU size with every RAM size.
fn tier_sizes(a: &RoutingStatsArgs) -> Result<Vec<TierSizes>> {
    if a.gpu_cache.is_empty() && a.ram_cache.is_empty() {
        if a.expert_bytes.is_some() {
            bail!("--expert-bytes is only used with --gpu-cache and/or --ram-cache");
        }
        return Ok(Vec::new());
    }
    let eb = a.expert_bytes.as_deref().ok_or_else(|| {
        anyhow!("--gpu-cache/--ram-cache need --expert-bytes SIZE (the bytes of one expert, e.g. --expert-bytes 6.75M)")
    })?;
    let expert_bytes = parse_size(eb).map_err(|e| anyhow!("--expert-bytes {e}"))?;
    if expert_bytes == 0 {
        bail!("--expert-bytes must be at least 1 byte");
    }
    let (gpu, ram) = (sizes("gpu-cache", &a.gpu_cache)?, sizes("ram-cache", &a.ram_cache)?);
    Ok(gpu
        .iter()
        .flat_map(|&g| ram.iter().map(move |&r| TierSizes { gpu_bytes: g, ram_bytes: r, expert_bytes }))
        .collect())
}

/// Whether `e` is a write to a closed pipe (`routing-stats … | head`): a normal end.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

pub fn run(a: RoutingStatsArgs) -> Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    match print(a, &mut out).and_then(|()| out.flush().map_err(Into::into)) {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        r => r,
    }
}

fn print(a: RoutingStatsArgs, out: &mut impl Write) -> Result<()> {
    let tiers = tier_sizes(&a)?;
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
    let reports: Vec<TierReport> = if tiers.is_empty() {
        Vec::new()
    } else {
        let acc = TierAccesses::new(&trace)?;
        tiers.iter().map(|&t| tier_report(&acc, t, a.half_life)).collect()
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
        if !reports.is_empty() {
            v["tiers"] = serde_json::to_value(&reports)?;
        }
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
        return Ok(());
    }

    writeln!(out, "{} tokens, {} layers, {} experts, top-{}", s.tokens, s.num_layers, s.num_experts, s.top_k)?;
    let mut head = format!("{:>5} {:>6} {:>6} {:>7}", "layer", "gini", "top20", "overlap");
    if profile.is_some() {
        head += &format!(" {:>9} {:>9}", "prof.gini", "prof.top20");
    }
    for c in &s.capacities {
        head += &format!(" {:>7}", format!("lru{c}"));
    }
    writeln!(out, "{head}")?;
    let row = |out: &mut dyn Write,
               label: String,
               l: &flashmoe_tools::routing_stats::LayerStats,
               p: Option<(f64, Option<f64>)>| {
        let mut line = format!("{label:>5} {:>6.3} {:>6.3} {:>7.3}", l.gini, l.top20, l.overlap);
        if let Some((g, t)) = p {
            line += &format!(" {:>9.3} {:>10}", g, t.map_or("-".to_string(), |t| format!("{t:.3}")));
        }
        for h in &l.lru {
            line += &format!(" {:>7.3}", h);
        }
        writeln!(out, "{line}")
    };
    for (i, l) in s.layers.iter().enumerate() {
        row(out, i.to_string(), l, prof_for(i).map(|p| (p.gini, p.top20)))?;
    }
    let mean_prof = profile.as_ref().map(|_| {
        let n = s.num_layers as f64;
        let g = (0..s.num_layers).map(|l| prof_for(l).unwrap().gini).sum::<f64>() / n;
        let t: Vec<f64> = (0..s.num_layers).filter_map(|l| prof_for(l).unwrap().top20).collect();
        (g, (!t.is_empty()).then(|| t.iter().sum::<f64>() / t.len() as f64))
    });
    row(out, "mean".into(), &s.mean, mean_prof)?;
    if a.policies {
        writeln!(out)?;
        writeln!(out, "cache hit rate by policy and per-layer capacity (experts):")?;
        let mut head = format!("{:<24}", "policy");
        for c in &s.capacities {
            head += &format!(" {:>7}", c);
        }
        writeln!(out, "{head}")?;
        for (n, r) in &policy_rows {
            let mut line = format!("{n:<24}");
            for h in r {
                line += &format!(" {:>7.3}", h);
            }
            writeln!(out, "{line}")?;
        }
    }
    for r in &reports {
        writeln!(out)?;
        print_tiers(out, r)?;
    }
    Ok(())
}

/// One two-tier table: rows = policies and optima.
fn print_tiers(out: &mut impl Write, r: &TierReport) -> Result<()> {
    writeln!(
        out,
        "two-tier replay: GPU {} ({} experts) + RAM {} ({} experts), expert {}; LFU half-life {} tokens",
        fmt_bytes(r.gpu_bytes),
        r.gpu_experts,
        fmt_bytes(r.ram_bytes),
        r.ram_experts,
        fmt_bytes(r.expert_bytes),
        r.half_life
    )?;
    writeln!(
        out,
        "{:<48} {:>7} {:>10} {:>10} {:>7} {:>7} {:>8} {:>10}",
        "policy", "tokens", "disk MiB", "PCIe MiB", "GPU %", "RAM %", "CPU exp", "disk"
    )?;
    writeln!(
        out,
        "{:<48} {:>7} {:>10} {:>10} {:>7} {:>7} {:>8} {:>10}",
        "", "", "/token", "/token", "hits", "hits", "/token", "vs opt"
    )?;
    let dash = || "-".to_string();
    for row in &r.rows {
        let is_opt = row.pcie_bytes.is_none();
        let vs = match (is_opt, row.disk_vs_optimum) {
            (true, _) => "opt".to_string(),
            (false, Some(x)) => format!("{x:.2}× opt"),
            (false, None) => "∞× opt".to_string(),
        };
        writeln!(
            out,
            "{:<48} {:>7} {:>10.2} {:>10} {:>7} {:>7} {:>8} {:>10}",
            row.policy,
            row.tokens,
            row.disk_mib_per_token,
            row.pcie_mib_per_token.map_or_else(dash, |x| format!("{x:.2}")),
            if is_opt {
                format!("≤{:.1}", 100.0 * row.gpu_hit_rate)
            } else {
                format!("{:.1}", 100.0 * row.gpu_hit_rate)
            },
            row.ram_hit_rate.map_or_else(dash, |x| format!("{:.1}", 100.0 * x)),
            row.cpu_experts_per_token.map_or_else(dash, |x| format!("{x:.2}")),
            vs
        )?;
    }
    let notes = [
        "hits: % of lookups. PCIe: host-to-device copies (every expert placed on the GPU, disk reads included)"
            .to_string(),
        "  + device-to-host demotions. CPU exp: RAM hits computed in place (exclusive+cpu).".to_string(),
        "optimum: Belady's MIN with bypass over one cache of GPU + RAM experts (no policy's two tiers hold more);"
            .to_string(),
        "  its GPU % is Belady over the GPU alone, an upper bound. Pre-warmed rows are compared with the optimum"
            .to_string(),
        format!(
            "  that starts from the best contents; the first-25% rows replay only the last {} tokens.",
            r.tokens - r.profile_tokens
        ),
    ];
    for n in notes {
        writeln!(out, "{n}")?;
    }
    Ok(())
}
