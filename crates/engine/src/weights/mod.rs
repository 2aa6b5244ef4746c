//! Weights: the mapped tensor store and the typed views (`Linear`) the model is built from.

pub mod linear;
pub mod store;

pub use linear::Linear;
pub use store::{RawTensor, TensorStore};
