//! Helpers shared by the commands: byte sizes, progress bars, the per-layer timing table.

use flashmoe::Model;
use flashmoe::convert::ConvertProgress;
use indicatif::{ProgressBar, ProgressStyle};

pub fn fmt_bytes(b: u64) -> String {
    flashmoe::memory::fmt(b)
}

/// A progress bar for `convert` and `synth`.
pub struct Bar(pub ProgressBar);

impl Bar {
    /// A byte-counting bar with this indicatif template.
    pub fn bytes(template: &str) -> Bar {
        Bar(ProgressBar::new(0).with_style(ProgressStyle::with_template(template).expect("valid template")))
    }
}

impl ConvertProgress for Bar {
    fn start(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) -> bool {
        self.0.inc(bytes);
        true
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
}

/// Prints where the model runs (and why `auto` stayed on the CPU, when it did).
pub fn print_device(m: &Model) {
    eprintln!("[flashmoe] device: {} | {} CPU compute threads", m.device_description(), rayon::current_num_threads());
    if let Some(p) = m.prewarm_info() {
        match &p.source {
            Some(profile) => eprintln!(
                "[flashmoe] pre-warm (background): {} experts ranked by {}, hottest {} to the GPU, then the RAM tier",
                p.ranked,
                profile.display(),
                p.to_backend
            ),
            None => eprintln!(
                "[flashmoe] pre-warm (background): all {} experts fit the GPU and RAM tiers: {} to the GPU, the rest to the RAM tier (no routing profile yet)",
                p.ranked, p.to_backend
            ),
        }
    }
}

/// The per-layer time table of `--timing`, averaged over `steps` decode tokens.
pub fn print_timing(times: &[flashmoe::LayerTimes], steps: usize, m: &Model) {
    let n = steps.max(1) as f64;
    let ms = |x: f64| x * 1e3 / n;
    eprintln!("per-layer time per decode token, ms (averaged over {steps} tokens):");
    eprintln!(
        "{:>5} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "layer", "kind", "mixer", "router", "io wait", "experts", "other", "total"
    );
    let mut sum = flashmoe::LayerTimes::default();
    for (i, t) in times.iter().enumerate() {
        let kind = match m.config.layer_kinds[i] {
            flashmoe::config::LayerKind::FullAttention => "attn",
            flashmoe::config::LayerKind::LinearAttention => "delta",
        };
        eprintln!(
            "{i:>5} {kind:>6} {:>9.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            ms(t.mixer),
            ms(t.router),
            ms(t.io_wait),
            ms(t.experts),
            ms(t.other),
            ms(t.total())
        );
        sum.add(t);
    }
    eprintln!(
        "{:>5} {:>6} {:>9.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
        "all",
        "",
        ms(sum.mixer),
        ms(sum.router),
        ms(sum.io_wait),
        ms(sum.experts),
        ms(sum.other),
        ms(sum.total())
    );
}

/// Writes routing decisions as a trace file (`--trace-routing`).
pub fn write_trace(path: &std::path::Path, m: &Model, records: &[(usize, usize, Vec<u32>)]) -> anyhow::Result<()> {
    let c = &m.config;
    let header = flashmoe::routing::TraceHeader::new(c.num_layers, c.num_experts, m.experts_per_token());
    let mut w = flashmoe::routing::TraceWriter::new(path, header)?;
    w.write_decisions(records)?;
    w.flush()?;
    Ok(())
}
