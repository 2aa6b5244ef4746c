//! Expert storage, independent of compute: aligned buffers, the RAM cache tier, and the store
//! that reads experts from the packed per-layer files.

pub mod buffer;
pub mod cache;
pub mod store;

pub use store::{ExpertStore, IoChoice, IoMode, IoSnapshot, StoreOptions};
