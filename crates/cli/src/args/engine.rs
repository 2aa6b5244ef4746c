//! Engine options set at load: `--experts`, `--max-context`, `--prefetch`; and the diagnostics
//! `--trace-routing`, `--timing` (commands that report them).

use clap::Args;
use flashmoe::LoadOptions;
use std::path::PathBuf;

#[derive(Args, Clone, Debug, Default)]
pub struct EngineArgs {
    /// Routed experts per token. Default: the model's own number (exact). Fewer is lossy; more is
    /// refused.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Longest prompt + reply in tokens (default: the model's max_position_embeddings). Longer
    /// prompts are refused.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Read layer l+1's likely experts while layer l computes (its router applied to layer l's
    /// hidden state). Off by default: it only wins when reads are slow and guesses good.
    #[arg(long)]
    pub prefetch: bool,
}

impl EngineArgs {
    pub fn apply(&self, opts: &mut LoadOptions) {
        opts.experts_per_token = self.experts;
        opts.max_context = self.max_context;
        opts.prefetch = self.prefetch;
    }
}

/// `--trace-routing FILE`.
#[derive(Args, Clone, Debug, Default)]
pub struct TraceArgs {
    /// Write the experts chosen for every token and layer to FILE (JSON lines; see routing-stats).
    #[arg(long)]
    pub trace_routing: Option<PathBuf>,
}

impl TraceArgs {
    pub fn apply(&self, opts: &mut LoadOptions) {
        opts.trace_routing = self.trace_routing.is_some();
    }
}
