//! flashmoe engine: exact inference for the Qwen3.5-MoE family and Qwen3-Next.
//!
//! Layers: `config` (config.json) → `weights` (mapped safetensors, typed matrix views) →
//! `qwen35` (model weights and forward pass) → `generate` (prompting, sampling loop, stats).
//! Compute kernels live in the `flashmoe-kernels` crate, text handling in `flashmoe-text`.

pub mod builtin;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod eval;
pub mod experts;
pub mod generate;
pub mod memory;
pub mod packed;
pub mod qwen35;
pub mod routing;
pub mod session;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use qwen35::{LogitsFor, Model, SequenceState};
