//! `flashmoe chat`: an interactive terminal client for an OpenAI-compatible
//! `/v1/chat/completions` server (flashmoe's own, or any other).
//!
//! * [`sse`]: Server-Sent Events framing and the streamed chunk format.
//! * [`client`]: HTTP requests, streaming a reply into content / reasoning / tool calls.
//! * [`tools`]: the `bash` and `read_file` tools (timeouts, output caps).
//! * [`store`]: conversations saved as JSONL under the data directory, resumable.
//! * [`markdown`]: a streaming markdown → ANSI renderer.
//! * [`terminal`]: untrusted text (model output, tool output) made safe to print.
//! * [`local`]: `--model`: a private `flashmoe serve` child on a free local port.
//! * [`app`]: the interactive loop (line editing, history, slash commands, approvals).

pub mod app;
pub mod client;
pub mod markdown;
pub mod sse;
pub mod store;
pub mod terminal;
pub mod tools;

pub use app::{Options, run};
