//! `--model`: a model folder or file, `builtin`, or a Hub repo (`OWNER/NAME[@REV][:QUANT]`) in the
//! Hugging Face cache; optional where the built-in model stands in.

use anyhow::Result;
use clap::Args;
use flashmoe::hub::{self, BUILTIN, HubCache, ModelRef, Resolved};
use std::path::PathBuf;

/// What `--model` accepts, for the help text.
const MODEL_HELP: &str = "Model: a folder (HF/MLX safetensors or packed), a .gguf file, `builtin`, or a Hub repo \
OWNER/NAME[@REVISION][:QUANT] from the Hugging Face cache (`flashmoe pull` downloads one)";

/// `--model`, optional: without it the built-in small trained model is used.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a folder (HF/MLX safetensors or packed), a .gguf file, `builtin`, or a Hub repo
    /// OWNER/NAME[@REVISION][:QUANT] from the Hugging Face cache. Default: builtin.
    #[arg(long)]
    pub model: Option<String>,
}

/// `--model`, required.
#[derive(Args, Clone, Debug)]
pub struct ModelDir {
    #[arg(long, help = MODEL_HELP)]
    pub model: String,
}

/// The small Qwen3.5-MoE chat model trained for flashmoe (models/qwen35-moe-tiny-chat: the base
/// model of models/qwen35-moe-tiny-trained fine-tuned to answer about Debian packages and call the
/// chat client's tools), embedded so that `run` and `chat` work with nothing downloaded.
pub const BUILTIN_NAME: &str = "qwen35-moe-tiny-chat";
#[cfg(feature = "builtin-model")]
const BUILTIN_FILES: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!("../../../../models/qwen35-moe-tiny-chat/config.json")),
    ("model.safetensors", include_bytes!("../../../../models/qwen35-moe-tiny-chat/model.safetensors")),
    ("tokenizer.json", include_bytes!("../../../../models/qwen35-moe-tiny-chat/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../../../models/qwen35-moe-tiny-chat/tokenizer_config.json")),
    ("chat_template.jinja", include_bytes!("../../../../models/qwen35-moe-tiny-chat/chat_template.jinja")),
    ("generation_config.json", include_bytes!("../../../../models/qwen35-moe-tiny-chat/generation_config.json")),
];
/// A build without the embedded model (`--no-default-features`): 15 MB smaller, for machines
/// binaries are carried to.
#[cfg(not(feature = "builtin-model"))]
const BUILTIN_FILES: &[(&str, &[u8])] = &[];

/// Where the built-in model is (or will be) unpacked, and the bytes embedded.
pub fn builtin_folder() -> (PathBuf, u64) {
    (flashmoe::builtin::folder(BUILTIN_NAME, BUILTIN_FILES), BUILTIN_FILES.iter().map(|(_, b)| b.len() as u64).sum())
}

/// Resolves a `--model` value to the folder or file to load and the model's name.
pub fn resolve(reference: &str) -> Result<Resolved> {
    match ModelRef::parse(reference) {
        ModelRef::Builtin => {
            if BUILTIN_FILES.is_empty() {
                anyhow::bail!(
                    "this flashmoe was built without the built-in model (cargo feature `builtin-model`); give --model"
                );
            }
            let dir = flashmoe::builtin::materialize(BUILTIN_NAME, BUILTIN_FILES)?;
            eprintln!(
                "[flashmoe] model: built-in {BUILTIN_NAME} (19.8M parameters, a chat model for Debian packages; packed at {})",
                dir.display()
            );
            Ok(Resolved { path: dir, name: BUILTIN.into() })
        }
        ModelRef::Path(p) => Ok(hub::resolve_path(&p)?),
        ModelRef::Hub { repo, revision, quant } => {
            let r = hub::resolve_hub(&HubCache::from_env(), &repo, revision.as_deref(), quant.as_deref())?;
            eprintln!("[flashmoe] model: {} ({})", r.name, r.path.display());
            Ok(r)
        }
    }
}

/// `resolve` as a clap value parser: the path to load.
pub fn resolved_path(reference: &str) -> std::result::Result<PathBuf, String> {
    resolve(reference).map(|r| r.path).map_err(|e| format!("{e:#}"))
}

impl ModelArgs {
    /// The model `--model` names, or the built-in one.
    pub fn resolve(&self) -> Result<Resolved> {
        resolve(self.model.as_deref().unwrap_or(BUILTIN))
    }

    /// The folder (or file) to load.
    pub fn dir(&self) -> Result<PathBuf> {
        self.resolve().map(|r| r.path)
    }
}

impl ModelDir {
    pub fn resolve(&self) -> Result<Resolved> {
        resolve(&self.model)
    }

    /// The folder (or file) to load.
    pub fn dir(&self) -> Result<PathBuf> {
        self.resolve().map(|r| r.path)
    }
}
