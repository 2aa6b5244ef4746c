//! flashmoe engine: exact inference for the Qwen3.5-MoE family and Qwen3-Next.
//!
//! Layers, bottom up (no module imports one above it; `scripts/check_module_cycles.py` checks):
//! - `error`, `units`, `config` (config.json → ModelConfig), `progress` (the trait long work
//!   reports through);
//! - `weights` (mapped safetensors, typed matrix views), `packed` (our format: manifest, open,
//!   verify), `gguf` (llama.cpp's format: parser, splits, metadata → config, tensor map and
//!   expert ranges), `experts` (expert storage: store, RAM tier, buffers, expert views);
//! - `layers` (the op vocabulary: weight structs generic over where tensors live, pass spec,
//!   hooks), `backend` (the `Backend` trait; `cpu`; `cuda` with the `cuda` feature);
//! - `models` (families: `qwen35` = config → weights → its layer loop over the backend ops);
//! - `runtime` (Model = family on a backend + options + hooks; SequenceState; the generation
//!   loop; sessions with prefix reuse; perplexity), `memory` (the memory plan), `convert`
//!   (checkpoint → packed), `builtin` (the embedded model's cache folder), `hub` (model
//!   references: paths, `builtin`, Hub repos in the Hugging Face cache).
//!
//! Compute kernels live in the `flashmoe-kernels` crate, text handling in `flashmoe-text`; tools
//! (benchmarks, synthetic models, routing simulators) in `flashmoe-tools`.

pub mod backend;
pub mod builtin;
pub mod config;
pub mod convert;
pub mod error;
pub mod experts;
pub mod gguf;
pub mod hub;
pub mod layers;
pub mod mapped;
pub mod memory;
pub mod models;
pub mod packed;
pub mod paths;
pub mod progress;
pub mod routing;
pub mod runtime;
pub mod units;
pub mod weights;

#[cfg(feature = "cuda")]
pub use backend::cuda;
pub use backend::{DeviceChoice, DeviceOptions, GpuCache, device};
pub use config::ModelConfig;
pub use error::{Error, Result};
pub use layers::{LayerTimes, LogitsFor, RoutingRecord};
pub use models::qwen35;
pub use progress::Progress;
pub use runtime::generate::{Engine, GenerateOptions};
pub use runtime::session::{Channel, Finish, GenerateRequest, Generation, PrefixCache, Session};
pub use runtime::{LoadOptions, Model, SequenceState};
pub use runtime::{batch, eval, generate, session};
