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
    // Experts mapped in place rather than streamed: their matrices are then there to describe.
    let opts = flashmoe::LoadOptions { stream_experts: false, ..Default::default() };
    let model = Model::load_with(&a.model.model, &opts)?;
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
    println!("context      {} tokens (max_position_embeddings)", c.max_position_embeddings);
    // Each kind of matrix once: every layer's is listed, equal formats merged (conversion
    // treats layers alike, so this is usually one format per kind).
    let merged = |items: Vec<String>| {
        let mut seen: Vec<String> = Vec::new();
        for i in items {
            if !seen.contains(&i) {
                seen.push(i);
            }
        }
        seen.join(" + ")
    };
    let mut mixers = Vec::new();
    let mut routers = Vec::new();
    let mut shared = Vec::new();
    let mut experts = Vec::new();
    for l in &w.layers {
        match &l.mixer {
            flashmoe::qwen35::Mixer::Attention(m) => mixers.push(m.q_proj.format_name()),
            flashmoe::qwen35::Mixer::DeltaNet(d) => mixers.push(d.in_qkv.format_name()),
        }
        routers.push(l.moe.router.format_name());
        shared.push(l.moe.shared.up.format_name());
        if let Some(e) = l.moe.experts.resident().and_then(|v| v.first()) {
            experts.push(e.gate.format_name());
        }
    }
    println!("dtype        routed experts {}", merged(experts));
    println!("             embed {}; lm_head {}", w.embed.format_name(), w.lm_head.format_name());
    println!("             attention/GatedDeltaNet {}; router {}", merged(mixers), merged(routers));
    println!("             shared expert {}", merged(shared));
    Ok(())
}
