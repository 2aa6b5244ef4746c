//! `flashmoe`: the command-line front end. A thin layer over the engine library: parse flags,
//! call the engine, print. Every failure is one line on stderr and a non-zero exit.
//!
//! Flag groups shared by the commands that load a model are in `args/`; one file per command in
//! `commands/`; shared printing helpers in `util.rs`.

mod args;
mod commands;
mod util;

use clap::{Parser, Subcommand};
use commands::*;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flashmoe",
    version,
    about = "Run Mixture-of-Experts language models (Qwen3.5-MoE, Qwen3-Next) exactly, on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU compute threads (the rayon pool of the kernels, conversion and statistics; expert
    /// reads have their own, --io-threads). Default: one per CPU core.
    #[arg(long, global = true, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    threads: Option<usize>,
    /// No progress bars (they are drawn on stderr only when it is a terminal anyway).
    #[arg(long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (chat template applied unless --raw) and print a summary line.
    Run(run::RunArgs),
    /// Print the logits the model gives for a list of token ids.
    Logits(logits::LogitsArgs),
    /// Tokenize text (or, with --chat, render a chat request read from stdin).
    Tokenize(tokenize::TokenizeArgs),
    /// List the models on this machine (built-in, flashmoe's cache, the Hugging Face cache): format,
    /// size, and whether and how each fits this machine's RAM and GPU.
    Models(models::ModelsArgs),
    /// Download a model repo from the Hugging Face Hub into the Hugging Face cache (resumable).
    Pull(pull::PullArgs),
    /// Describe a model folder: architecture, layers, weight formats and sizes.
    Info(info::InfoArgs),
    /// Convert an HF / MLX / packed checkpoint into a packed model directory (experts one blob each).
    Convert(convert::ConvertArgs),
    /// Check a packed model's sizes and checksums; names the first bad tensor or expert.
    Verify(verify::VerifyArgs),
    /// Write a random-weight packed model with a real geometry (for benchmarks; no download).
    Synth(synth::SynthArgs),
    /// Routing statistics of a --trace-routing file: gini, top-20% coverage, overlap, LRU curves.
    RoutingStats(routing_stats::RoutingStatsArgs),
    /// Perplexity of a model over a text file (windows of --window tokens, each from an empty state).
    Ppl(ppl::PplArgs),
    /// List compute devices (CPU SIMD level, CUDA GPUs when built with the `cuda` feature).
    Devices,
    /// Benchmarks: expert reads, end-to-end decode against its floor, RAM-cache sweeps.
    Bench(bench::BenchArgs),
    /// OpenAI- and Anthropic-compatible HTTP server (chat, completions, messages, tools, metrics).
    Serve(serve::ServeArgs),
    /// Interactive terminal chat with tools (bash, read_file) against a server (--url) or a model (--model).
    Chat(chat::ChatArgs),
    /// Check every GPU kernel against the CPU kernels on random inputs (non-zero exit on failure).
    #[cfg(feature = "cuda")]
    Selftest(selftest::SelftestArgs),
    /// GPU benchmarks: GEMV bandwidth against the device-to-device copy bandwidth.
    #[cfg(feature = "cuda")]
    Gpubench(gpubench::GpubenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // Before any command work, so that the first parallel loop finds this pool and not the
        // default one.
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("error: --threads {n}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let serving = match &cli.command {
        Command::Serve(a) => Some(a.log_format()),
        _ => None,
    };
    init_logging(serving);
    util::set_quiet(cli.quiet);
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Models(a) => models::run(a),
        Command::Pull(a) => pull::run(a),
        Command::Info(a) => info::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Synth(a) => synth::run(a),
        Command::RoutingStats(a) => routing_stats::run(a),
        Command::Ppl(a) => ppl::run(a),
        Command::Devices => devices::run(),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Chat(a) => chat::run(a),
        #[cfg(feature = "cuda")]
        Command::Selftest(mut a) => {
            a.quiet = cli.quiet;
            selftest::run(a)
        }
        #[cfg(feature = "cuda")]
        Command::Gpubench(a) => gpubench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, so the file and the problem are both named.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines on stderr through `tracing`: the engine's warnings (a damaged cache rebuilt, a saved
/// profile ignored) for every command, and for `serve` (`Some(format)`) its own start-up block
/// and request lines (level info, with timestamps; `--log-format json`: one JSON object per line
/// with the fields at the top level). RUST_LOG replaces these defaults.
fn init_logging(serving: Option<serve::LogFormat>) {
    use std::io::IsTerminal;
    let default = if serving.is_some() { "warn,flashmoe_server=info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a log file or a pipe gets plain `key=value` text.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match serving {
        Some(serve::LogFormat::Json) => fmt.json().flatten_event(true).try_init(),
        Some(serve::LogFormat::Text) => fmt.try_init(),
        None => fmt.without_time().try_init(),
    };
}
