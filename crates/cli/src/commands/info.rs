//! `flashmoe info`: a model folder's architecture, layers, weight formats and sizes.

use crate::args::ModelDir;
use crate::util::fmt_bytes;
use anyhow::Result;
use clap::Args;
use flashmoe::Model;

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelDir,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let model = Model::load(&a.model.dir()?)?;
    let w = model
        .host_weights::<flashmoe::qwen35::ModelWeights>()
        .ok_or_else(|| anyhow::anyhow!("info knows the Qwen3.5-MoE family's weights only"))?;
    let c = &model.config;
    let full = c.layer_kinds.iter().filter(|k| **k == flashmoe::config::LayerKind::FullAttention).count();
    println!("model        {} ({:?} checkpoint)", c.family.name(), w.format);
    println!("layers       {} ({} GatedDeltaNet + {} full attention)", c.num_layers, c.num_layers - full, full);
    println!("hidden       {}  vocab {}", c.hidden_size, c.vocab_size);
    println!(
        "experts      {} routed, top-{} + 1 shared, intermediate {} (shared {})",
        c.num_experts, c.experts_per_token, c.moe_intermediate, c.shared_intermediate
    );
    println!("expert bytes {}", fmt_bytes(w.expert_bytes() as u64));
    println!("other bytes  {}", fmt_bytes(w.non_expert_bytes() as u64));
    println!("quantized    {}", if w.lm_head.is_quantized() { "yes (MLX affine)" } else { "no" });
    Ok(())
}
