//! The runtime: a placed model with its options and hooks ([`model`]), the one generation loop
//! the CLI, the server and the chat client share ([`generate`] / [`session`]), continuous
//! batching of several requests over it ([`batch`]), perplexity.

pub mod batch;
pub mod eval;
pub mod generate;
pub mod model;
pub mod session;

pub use model::{LoadOptions, Model, PrewarmInfo, ProfileSource, SequenceState};
