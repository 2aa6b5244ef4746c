//! `flashmoe ppl`: perplexity of a model over a text file.

use crate::args::{self, DeviceArgs, EngineArgs, ModelDir, Plan, StoreArgs, TraceArgs};
use crate::util::Bar;
use crate::util::{print_device, write_trace};
use anyhow::{Result, anyhow};
use clap::Args;
use flashmoe::Progress;
use flashmoe::generate::Engine;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    model: ModelDir,
    /// Plain-text file.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per window (2 at least: a window predicts its tokens after the first).
    #[arg(long, default_value_t = 512, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1 << 20))]
    window: usize,
    /// Use only the first N tokens of the file.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    // Trace positions are numbered across windows.
    #[command(flatten)]
    trace: TraceArgs,
}

pub fn run(a: PplArgs) -> Result<()> {
    let text = flashmoe_text::file::read_text(&a.file).map_err(|e| anyhow!("{}: {e}", a.file.display()))?;
    let dir = &a.model.dir()?;
    let plan = Plan { context_tokens: a.window, batch_tokens: a.window, logits_rows: a.window, sequences: 1 };
    let mut opts = args::load_options(dir, &a.store, &a.device, &a.engine, plan)?;
    a.trace.apply(&mut opts);
    let engine = crate::util::loading(dir, || Engine::load_with(dir, &opts))?;
    print_device(&engine.model);
    let mut ids = engine.encode(&text)?;
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    // Windows the engine runs: full ones, and a last partial one when it has a prediction.
    let windows = ids.len() / a.window.max(1) + usize::from(ids.len() % a.window.max(1) >= 2);
    let bar = Bar::counts("tokens");
    bar.start(ids.len() as u64, "ppl");
    let t0 = std::time::Instant::now();
    let mut records: Vec<(usize, usize, Vec<u32>)> = Vec::new();
    let m = &engine.model;
    let tracing = a.trace.trace_routing.is_some();
    let mut window = 0;
    let rep = flashmoe::eval::perplexity(m, &ids, a.window, |done| {
        window += 1;
        bar.0.set_position(done.min(ids.len()) as u64);
        bar.message(&format!("{window}/{windows} windows done"));
        // Window-relative positions become positions in the file.
        if tracing {
            let offset = done.saturating_sub(a.window);
            records.extend(m.take_routing_trace().into_iter().map(|r| (r.layer, r.pos + offset, r.experts)));
        }
    });
    bar.finish();
    let rep = rep?;
    if let Some(path) = &a.trace.trace_routing {
        write_trace(path, m, &records)?;
    }
    let experts = format!(
        "{}/{} ({})",
        m.experts_per_token(),
        m.config.num_experts,
        if m.routing_is_exact() { "exact" } else { "reduced, lossy" }
    );
    // Peak RSS: what --memory-budget bounds (the plan counts the window's logits).
    let peak = flashmoe::generate::peak_rss_bytes();
    if a.json {
        println!(
            "{}",
            json!({"ppl": rep.ppl, "nll": rep.nll, "tokens": rep.tokens, "predictions": rep.predictions,
                   "window": a.window, "experts_per_token": m.experts_per_token(), "exact_routing": m.routing_is_exact(),
                   "peak_rss_bytes": peak})
        );
    } else {
        println!(
            "perplexity {:.4} (nll {:.5}) over {} predictions in {} windows of {} tokens | experts {experts} | {:.1} s | peak RSS {}",
            rep.ppl,
            rep.nll,
            rep.predictions,
            rep.windows,
            a.window,
            t0.elapsed().as_secs_f64(),
            peak.map_or("n/a".into(), flashmoe::units::fmt_bytes)
        );
    }
    Ok(())
}
