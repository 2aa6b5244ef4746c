//! `flashmoe info`: a model folder's (or GGUF file's) architecture, layers, weight formats and
//! sizes.

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
    let dir = a.model.dir()?;
    if flashmoe::gguf::is_gguf(&dir) {
        return gguf_info(&dir);
    }
    // Experts mapped in place rather than streamed: their matrices are then there to describe.
    let opts = flashmoe::LoadOptions { stream_experts: false, ..Default::default() };
    let model = Model::load_with(&dir, &opts)?;
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
    // lm_head stands for the model: quantized (MLX affine, or GGML blocks from a GGUF) or not.
    let quantized = if w.lm_head.is_quantized() { format!("yes ({})", w.lm_head.format_name()) } else { "no".into() };
    println!("quantized    {quantized}");
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
    // What `--io auto` (the default) does with this folder on this machine, without a RAM tier:
    // on the CPU, compute on the mapped files when the experts fit; otherwise (and on a GPU)
    // stream them as below.
    let available = flashmoe::experts::available_ram_bytes();
    if let Some(why) = flashmoe::runtime::model::cpu_maps_experts(w.expert_bytes() as u64, available) {
        println!("io auto      on the CPU: {}", why.trim_start_matches("auto: "));
    }
    let io = if w.format != flashmoe::qwen35::SourceFormat::Packed {
        "page (experts read in place from the safetensors files; O_DIRECT needs `flashmoe convert`)".to_string()
    } else {
        let facts = flashmoe::experts::AutoIoFacts {
            expert_bytes: w.expert_bytes() as u64,
            ram_cache_bytes: 0,
            available_ram: available,
        };
        match flashmoe::experts::auto_io_fit(&facts) {
            Ok(reason) => format!("page ({reason})"),
            Err(why) => format!(
                "measured at load ({why}): O_DIRECT when {}× faster than page reads",
                flashmoe::experts::AUTO_DIRECT_MARGIN
            ),
        }
    };
    println!("io auto      streamed (a GPU, a RAM tier or a memory budget): {io}");
    Ok(())
}

/// A GGUF model: what the metadata says, the tensor types, the routed experts' bytes, the parts.
fn gguf_info(path: &std::path::Path) -> Result<()> {
    use flashmoe::gguf::{GgufModel, types::file_type_name};
    use std::collections::BTreeMap;
    let m = GgufModel::open(path)?;
    let c = &m.config;
    let full = c.layer_kinds.iter().filter(|k| **k == flashmoe::config::LayerKind::FullAttention).count();
    let file_type = m.facts.file_type.map(|t| file_type_name(t).map_or(format!("type {t}"), str::to_string));
    println!(
        "model        {} (GGUF architecture `{}`){}",
        c.family.name(),
        m.facts.architecture,
        m.facts.name.as_ref().map_or(String::new(), |n| format!(": {n}"))
    );
    println!("file type    {}", file_type.as_deref().unwrap_or("not given"));
    println!(
        "layers       {} ({} GatedDeltaNet + {} full attention){}",
        c.num_layers,
        c.num_layers - full,
        full,
        if m.facts.mtp_layers > 0 { format!(" + {} MTP", m.facts.mtp_layers) } else { String::new() }
    );
    println!("hidden       {}  vocab {}  context {}", c.hidden_size, c.vocab_size, c.max_position_embeddings);
    println!(
        "attention    {} heads ({} KV), head dim {}, rotary {}, theta {}",
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.rotary_dims(),
        c.rope_theta
    );
    println!(
        "deltanet     {} key heads × {}, {} value heads × {}, conv {}",
        c.linear_key_heads, c.linear_key_dim, c.linear_value_heads, c.linear_value_dim, c.conv_kernel
    );
    println!(
        "experts      {} routed, top-{} + 1 shared, intermediate {} (shared {})",
        c.num_experts, c.experts_per_token, c.moe_intermediate, c.shared_intermediate
    );
    let mut types: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for (_, t) in m.parts.tensors() {
        let e = types.entry(t.ggml_type.name()).or_default();
        e.0 += 1;
        e.1 += t.len;
    }
    let hist: Vec<String> =
        types.iter().map(|(name, (n, bytes))| format!("{name} {n} ({})", fmt_bytes(*bytes))).collect();
    println!("tensors      {}: {}", m.parts.tensor_count(), hist.join(", "));
    let per_layer: Vec<u64> = m.tensors.experts.iter().map(|e| e.bytes_per_expert()).collect();
    let total: u64 = per_layer.iter().map(|b| b * c.num_experts as u64).sum();
    let (lo, hi) = (per_layer.iter().min().copied().unwrap_or(0), per_layer.iter().max().copied().unwrap_or(0));
    let each = if lo == hi { fmt_bytes(lo) } else { format!("{} to {}", fmt_bytes(lo), fmt_bytes(hi)) };
    println!(
        "expert bytes {} per expert, {} per layer, {} in all",
        each,
        fmt_bytes(hi * c.num_experts as u64),
        fmt_bytes(total)
    );
    for (i, p) in m.parts.parts.iter().enumerate() {
        println!(
            "part {}/{}     {} ({} tensors, {})",
            i + 1,
            m.parts.parts.len(),
            p.path.display(),
            p.header.tensors.len(),
            fmt_bytes(p.header.file_len)
        );
    }
    let beside = path.parent().unwrap_or(std::path::Path::new(".")).join("tokenizer.json");
    let tokenizer = if beside.is_file() {
        "tokenizer.json beside the file".to_string()
    } else {
        match m.parts.get("tokenizer.ggml.model").and_then(|v| v.as_str()) {
            Some(model) => format!(
                "in the file ({model}, pre `{}`)",
                m.parts.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default")
            ),
            None => "none".into(),
        }
    };
    println!("tokenizer    {tokenizer}; chat template {}", if m.chat_template().is_some() { "yes" } else { "no" });
    Ok(())
}
