//! `flashmoe synth`: write a random-weight packed model with a real geometry.

use anyhow::Result;
use clap::Args;
use flashmoe_tools::synth::{Geometry, SynthOptions};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// qwen3.5-397b-a17b, qwen3.5-122b-a10b, qwen3.5-35b-a3b, qwen3-next-80b-a3b (or tiny, for tests).
    #[arg(long)]
    pub geometry: Geometry,
    /// Only the first N layers (default: all of the geometry's layers).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Bits of the routed experts: 4 or 2 (8 also accepted).
    #[arg(long, default_value_t = 4)]
    pub expert_bits: u32,
    /// Bits of the other matrices: 4 or 8 (routers and the shared-expert gate always 8).
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    #[arg(long, default_value_t = 64)]
    pub group_size: usize,
    /// A routing profile (JSON, as in ../shared/data/routing): shape the routers so each layer's
    /// gini of expert selection counts matches it.
    #[arg(long)]
    pub routing_like: Option<PathBuf>,
    /// Tokens simulated per layer to calibrate --routing-like.
    #[arg(long, default_value_t = 2048)]
    pub sim_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Vocabulary size (default: the geometry's real one).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Override the number of routed experts.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Override the experts per token.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Copy tokenizer.json (and chat template files) from this folder; its ids must fit the
    /// vocabulary. Without it the model has no tokenizer: drive it with token ids (logits, bench).
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// Output folder (written as OUT.partial, renamed when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

use crate::util::Bar;

pub fn run(a: SynthArgs) -> Result<()> {
    let opts = SynthOptions {
        geometry: a.geometry,
        layers: a.layers,
        expert_bits: a.expert_bits,
        bits: a.bits,
        group_size: a.group_size,
        routing_like: a.routing_like,
        seed: a.seed,
        vocab: a.vocab,
        experts: a.experts,
        top_k: a.top_k,
        tokenizer_from: a.tokenizer_from,
        sim_tokens: a.sim_tokens,
        out: a.out,
        force: a.force,
    };
    let bar = Bar::bytes();
    let rep = flashmoe_tools::synth::synth(&opts, &bar)?;
    if !rep.routing.is_empty() {
        eprintln!(
            "routing shaped like {} (simulated top-k on {} Gaussian router inputs per layer):",
            opts.routing_like.as_ref().unwrap().display(),
            opts.sim_tokens
        );
        eprintln!(
            "{:>5} {:>7}  {:>11} {:>11}  {:>12} {:>12}  {:>7}",
            "layer", "profile", "gini target", "achieved", "top20 target", "achieved", "spread"
        );
        for f in &rep.routing {
            let t20 = f.target_top20.map_or("-".to_string(), |t| format!("{t:.3}"));
            eprintln!(
                "{:>5} {:>7}  {:>11.3} {:>11.3}  {:>12} {:>12.3}  {:>7.3}",
                f.layer, f.profile_layer, f.target_gini, f.achieved_gini, t20, f.achieved_top20, f.spread
            );
        }
        let n = rep.routing.len() as f64;
        let mean = |g: &dyn Fn(&flashmoe_tools::synth::RoutingFit) -> f64| rep.routing.iter().map(g).sum::<f64>() / n;
        let t20: Vec<f64> = rep.routing.iter().filter_map(|f| f.target_top20).collect();
        eprintln!(
            "{:>5} {:>7}  {:>11.3} {:>11.3}  {:>12} {:>12.3}",
            "mean",
            "",
            mean(&|f| f.target_gini),
            mean(&|f| f.achieved_gini),
            if t20.is_empty() { "-".to_string() } else { format!("{:.3}", t20.iter().sum::<f64>() / t20.len() as f64) },
            mean(&|f| f.achieved_top20)
        );
    }
    let total = rep.non_expert_bytes + rep.expert_bytes;
    eprintln!(
        "wrote {} ({}, {} layers): non-expert {} + experts {} in {:.1} s, {:.2} GB/s{}",
        rep.dst.display(),
        opts.geometry,
        rep.config["num_hidden_layers"],
        fmt_bytes(rep.non_expert_bytes),
        fmt_bytes(rep.expert_bytes),
        rep.seconds,
        total as f64 / rep.seconds.max(1e-9) / 1e9,
        if rep.copied_files.is_empty() { "; no tokenizer (use token ids)".to_string() } else { String::new() }
    );
    Ok(())
}

use crate::util::fmt_bytes;
