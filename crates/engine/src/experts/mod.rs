//! Expert storage, independent of compute: aligned buffers, the RAM cache tier, the store that
//! reads experts from the packed per-layer files (or in place from safetensors), and the expert
//! views compute receives.

pub mod buffer;
pub mod cache;
pub mod profile;
pub mod store;
pub mod weights;

pub use profile::RoutingProfile;
pub use store::{
    AUTO_DIRECT_MARGIN, AutoIoFacts, ExpertStore, IoChoice, IoMode, IoSamples, IoSnapshot, ScatteredFiles,
    StoreOptions, auto_io_fit, available_ram_bytes, choose_auto_io,
};
pub use weights::{ExpertSet, ExpertWeights};
