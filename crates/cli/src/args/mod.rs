//! Flag groups shared by the commands that load a model (`#[command(flatten)]`), so that every
//! such command takes the same flags with the same defaults, and the one `LoadOptions` they
//! describe is built in one place.

pub mod device;
pub mod engine;
pub mod model;
pub mod sampling;
pub mod store;

pub use device::DeviceArgs;
pub use engine::{EngineArgs, TraceArgs};
pub use model::{ModelArgs, ModelDir};
pub use sampling::SamplingArgs;
pub use store::{Plan, StoreArgs};

use anyhow::Result;
use flashmoe::LoadOptions;
use flashmoe::memory::MemoryPlan;
use std::path::Path;

/// A flag that must be a positive finite number (a half-life, a bandwidth): NaN, infinities, 0
/// and negative values are refused by clap with this message.
pub fn positive_number(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if x > 0.0 && x.is_finite() { Ok(x) } else { Err(format!("must be a positive finite number, got {s}")) }
}

/// The load options of a command that loads a model: the store (and the memory plan, printed
/// when a budget is set), the device and the engine options. `context_tokens` and `batch_tokens`
/// size the memory plan.
pub fn load_options(
    dir: &Path,
    store: &StoreArgs,
    device: &DeviceArgs,
    engine: &EngineArgs,
    plan: Plan,
) -> Result<LoadOptions> {
    let (opts, memory_plan) = load_options_and_plan(dir, store, device, engine, plan)?;
    if let Some(p) = memory_plan {
        eprintln!("[flashmoe] plan: {}", p.describe());
    }
    Ok(opts)
}

/// `load_options` without printing: the options and the memory plan, when a budget is set.
pub fn load_options_and_plan(
    dir: &Path,
    store: &StoreArgs,
    device: &DeviceArgs,
    engine: &EngineArgs,
    plan: Plan,
) -> Result<(LoadOptions, Option<MemoryPlan>)> {
    let (mut opts, memory_plan) = store.load_options(dir, plan)?;
    opts.device = device.options();
    engine.apply(&mut opts);
    Ok((opts, memory_plan))
}
