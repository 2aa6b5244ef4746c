//! One module per command: its flags (`…Args`) and `run`.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod devices;
#[cfg(feature = "cuda")]
pub mod gpubench;
pub mod info;
pub mod logits;
pub mod models;
pub mod ppl;
pub mod pull;
pub mod routing_stats;
pub mod run;
#[cfg(feature = "cuda")]
pub mod selftest;
pub mod serve;
pub mod synth;
pub mod tokenize;
pub mod verify;
