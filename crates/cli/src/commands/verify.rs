//! `flashmoe verify`: a packed model's sizes and checksums.

use crate::util::fmt_bytes;
use anyhow::{Result, bail};
use clap::Args;
use std::path::Path;

#[derive(Args)]
pub struct VerifyArgs {
    /// Packed model: a folder, or `builtin`.
    dir: String,
}

pub fn run(a: VerifyArgs) -> Result<()> {
    let dir = crate::args::model::resolve(&a.dir)?.path;
    if dir.is_dir() && !dir.join(flashmoe::packed::MANIFEST).exists() {
        bail!(
            "{} is {}, not a packed model; verify checks packed models made by `flashmoe convert`",
            dir.display(),
            what_folder(&dir)
        );
    }
    let rep = flashmoe::packed::verify::verify(&dir)?;
    println!("ok: {} tensors, {} experts, {} checked", rep.tensors, rep.experts, fmt_bytes(rep.bytes));
    Ok(())
}

/// What a folder without a packed manifest holds, as far as its file names and config tell.
fn what_folder(dir: &Path) -> &'static str {
    let has_safetensors = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".safetensors")))
        .unwrap_or(false);
    if !has_safetensors {
        return "a folder without a manifest.json or safetensors files";
    }
    // MLX checkpoints carry their quantization in config.json (the same test the loader uses).
    let quantized = flashmoe_text::file::read_text(&dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("quantization").is_some());
    if quantized { "an MLX safetensors checkpoint" } else { "a Hugging Face safetensors checkpoint" }
}
