//! Text side of flashmoe: tokenizer, chat template and sampling.
//!
//! * [`TextTokenizer`] / [`StreamDecoder`]: HF `tokenizer.json` encode/decode, incremental
//!   UTF-8-safe detokenization.
//! * [`ChatTemplate`]: renders OpenAI-style messages exactly as transformers' `apply_chat_template`.
//! * [`Sampler`] / [`SamplingParams`]: penalties, temperature, top-k, top-p, min-p.
//! * [`file`]: opening a model folder's files (regular files only, bounded reads).
//! * [`constraint`]: grammar-constrained decoding (JSON, JSON schema, forced tool calls) with llguidance.

pub mod chat;
pub mod constraint;
mod error;
pub mod file;
mod gguf_vocab;
mod pyfmt;
pub mod sampling;
mod time;
pub mod tokenizer;
pub mod toolcall;

pub use chat::{CHATML_TEMPLATE, ChatMessage, ChatRequest, ChatTemplate, normalize_messages};
pub use constraint::{Constraint, GrammarSpec, Grammars};
pub use error::{Result, TextError};
pub use gguf_vocab::GgufVocab;
pub use sampling::{Sampler, SamplingParams, TokenLogprob, token_logprob};
pub use tokenizer::{StreamDecoder, TextTokenizer};
