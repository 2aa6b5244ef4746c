//! `flashmoe convert`: an HF / MLX / packed checkpoint into a packed model directory; a GGUF file
//! into one that keeps its GGML blocks as they are.

use crate::util::{Bar, fmt_bytes};
use anyhow::{Result, bail};
use clap::Args;
use flashmoe::convert::{ConvertOptions, Target};
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertArgs {
    /// Source model: a folder (HF safetensors, MLX, or packed), a .gguf file (any part of a
    /// split; its blocks are kept as they are, so --expert-bits/--bits do not apply), `builtin`,
    /// or a Hub repo OWNER/NAME[@REVISION][:QUANT] from the Hugging Face cache.
    src: String,
    /// Destination folder (written as DST.partial, renamed when complete).
    dst: PathBuf,
    /// Routed experts: 2, 4, 8, bf16, f16, f32 or keep. Default: keep quantized experts, quantize float ones to 4 bits.
    #[arg(long)]
    expert_bits: Option<Target>,
    /// Everything else: 4, 8, bf16, f16, f32 or keep. Default: keep quantized tensors, quantize float ones to 8 bits.
    #[arg(long)]
    bits: Option<Target>,
    /// Group size of newly quantized matrices.
    #[arg(long, default_value_t = 64)]
    group_size: usize,
    /// Replace DST if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let mut opts = ConvertOptions { group_size: a.group_size, force: a.force, ..ConvertOptions::default() };
    if let Some(t) = a.expert_bits {
        opts.expert = t;
    }
    if let Some(t) = a.bits {
        if t == Target::Affine(2) {
            bail!("--bits 2 is not offered for non-expert weights (attention, embeddings, routers): use 4 or 8");
        }
        opts.other = t;
    }
    let bar = Bar::bytes();
    let t0 = std::time::Instant::now();
    let src = crate::args::model::resolve(&a.src)?.path;
    let rep = flashmoe::convert::convert(&src, &a.dst, &opts, &bar)?;
    if !rep.rmse.is_empty() {
        eprintln!("requantization error (RMSE against the source values, and the source RMS for scale):");
        eprintln!("{:>6}  {:<28} {:>12} {:>12}  {:>10} {:>10}", "layer", "projection", "from", "to", "rmse", "rms");
        for r in &rep.rmse {
            let layer = r.layer.map_or("-".to_string(), |l| l.to_string());
            eprintln!(
                "{layer:>6}  {:<28} {:>12} {:>12}  {:>10.3e} {:>10.3e}",
                r.projection, r.from, r.to, r.rmse, r.rms
            );
        }
    }
    eprintln!(
        "wrote {}: non-expert {} + experts {} in {:.1} s",
        rep.dst.display(),
        fmt_bytes(rep.non_expert_bytes),
        fmt_bytes(rep.expert_bytes),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
