//! `--model`: the model folder, optional where the built-in model stands in.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// `--model`, optional: without it the built-in small trained model is used.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model folder (HF/MLX safetensors or packed). Default: the built-in small trained model.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// `--model`, required.
#[derive(Args, Clone, Debug)]
pub struct ModelDir {
    /// Model folder (HF/MLX safetensors or packed).
    #[arg(long)]
    pub model: PathBuf,
}

/// The small Qwen3.5-MoE model trained for flashmoe (models/qwen35-moe-tiny-trained), embedded
/// so that `run` works with nothing downloaded.
const BUILTIN_NAME: &str = "qwen35-moe-tiny-trained";
const BUILTIN_FILES: [(&str, &[u8]); 6] = [
    ("config.json", include_bytes!("../../../../models/qwen35-moe-tiny-trained/config.json")),
    ("model.safetensors", include_bytes!("../../../../models/qwen35-moe-tiny-trained/model.safetensors")),
    ("tokenizer.json", include_bytes!("../../../../models/qwen35-moe-tiny-trained/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../../../models/qwen35-moe-tiny-trained/tokenizer_config.json")),
    ("chat_template.jinja", include_bytes!("../../../../models/qwen35-moe-tiny-trained/chat_template.jinja")),
    ("generation_config.json", include_bytes!("../../../../models/qwen35-moe-tiny-trained/generation_config.json")),
];

impl ModelArgs {
    /// The model folder: `--model`, or the built-in model written out (once) to a cache folder.
    pub fn dir(&self) -> Result<PathBuf> {
        if let Some(m) = &self.model {
            return Ok(m.clone());
        }
        let dir = flashmoe::builtin::materialize(BUILTIN_NAME, &BUILTIN_FILES)?;
        eprintln!(
            "[flashmoe] model: built-in {BUILTIN_NAME} (19.8M parameters, trained on Debian documentation; packed at {})",
            dir.display()
        );
        Ok(dir)
    }
}
