//! Helpers shared by the commands: byte sizes, progress bars, the per-layer timing table.

use flashmoe::{Model, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

pub fn fmt_bytes(b: u64) -> String {
    flashmoe::memory::fmt(b)
}

/// `--quiet` (global): no progress bars.
static QUIET: AtomicBool = AtomicBool::new(false);

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Relaxed);
}

/// Progress is drawn only for a person watching: stderr is a terminal and `--quiet` is off.
/// Logs, pipes and tests see the same output as without progress.
pub fn progress_visible() -> bool {
    !QUIET.load(Relaxed) && std::io::stderr().is_terminal()
}

fn draw_target() -> ProgressDrawTarget {
    if progress_visible() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() }
}

/// A progress bar on stderr (hidden unless `progress_visible`): what the CLI gives the engine's
/// long work as its `Progress`.
pub struct Bar(pub ProgressBar);

impl Bar {
    /// A bar counting bytes, with rate and ETA (convert, synth).
    pub fn bytes() -> Bar {
        Self::with_template(
            "{prefix} {spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
    }

    /// A bar counting `unit`s (tokens, steps, experts).
    pub fn counts(unit: &str) -> Bar {
        Self::with_template(&format!(
            "{{prefix}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ETA {{eta}} {{msg}}"
        ))
    }

    fn with_template(template: &str) -> Bar {
        let style = ProgressStyle::with_template(template).expect("valid template");
        // Dropped unfinished (an error, or a phase that never started): cleared, not left behind.
        Bar(ProgressBar::with_draw_target(Some(0), draw_target())
            .with_style(style)
            .with_finish(ProgressFinish::AndClear))
    }
}

impl Progress for Bar {
    fn start(&self, total: u64, label: &str) {
        // The label first: setting the length draws.
        self.0.set_prefix(label.to_string());
        self.0.set_length(total);
        self.0.set_position(0);
        self.0.reset_eta();
    }
    fn inc(&self, n: u64) -> bool {
        self.0.inc(n);
        true
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Runs `load` (opening a model) and, when it takes more than a second, shows a spinner with the
/// elapsed time on stderr until it returns (only where progress is visible).
pub fn loading<T>(what: &std::path::Path, load: impl FnOnce() -> T) -> T {
    if !progress_visible() {
        return load();
    }
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let label = format!("loading {}", what.display());
    let spinner = std::thread::spawn(move || {
        // Dropping `done` (the load returned) ends the wait early: no spinner for a quick load.
        if wait.recv_timeout(Duration::from_secs(1)) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            return;
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            .with_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"))
            .with_message(label)
            .with_elapsed(Duration::from_secs(1));
        bar.enable_steady_tick(Duration::from_millis(120));
        let _ = wait.recv();
        bar.finish_and_clear();
    });
    let out = load();
    drop(done);
    let _ = spinner.join();
    out
}

/// Prints where the model runs (and why `auto` stayed on the CPU, when it did).
pub fn print_device(m: &Model) {
    eprintln!("[flashmoe] device: {} | {} CPU compute threads", m.device_description(), rayon::current_num_threads());
    if let Some(p) = m.prewarm_info() {
        eprintln!("[flashmoe] pre-warm (background): {}", p.describe());
    }
}

/// The per-layer time table of `--timing`, averaged over `steps` decode tokens.
pub fn print_timing(times: &[flashmoe::LayerTimes], steps: usize, m: &Model) {
    print_layer_times(&format!("per-layer time per decode token, ms (averaged over {steps} tokens):"), times, steps, m);
}

/// A per-layer time table: `times` divided by `steps`, under `title`.
pub fn print_layer_times(title: &str, times: &[flashmoe::LayerTimes], steps: usize, m: &Model) {
    let n = steps.max(1) as f64;
    let ms = |x: f64| x * 1e3 / n;
    eprintln!("{title}");
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
