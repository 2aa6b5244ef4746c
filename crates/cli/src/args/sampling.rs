//! Sampling flags: `--temperature --top-p --top-k --min-p --repetition-penalty
//! --presence-penalty --seed`.

use clap::Args;
use flashmoe_text::SamplingParams;

/// A number in [lo, hi] (NaN and infinities refused): the same ranges the server's OpenAI
/// endpoints accept.
fn in_range(lo: f32, hi: f32) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let x: f32 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
        if (lo..=hi).contains(&x) { Ok(x) } else { Err(format!("must be between {lo} and {hi}, got {s}")) }
    }
}

#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// 0 = greedy (the default: deterministic). 0 to 2.
    #[arg(long, default_value_t = 0.0, value_parser = in_range(0.0, 2.0))]
    pub temperature: f32,
    /// 0 to 1.
    #[arg(long, default_value_t = 1.0, value_parser = in_range(0.0, 1.0))]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 0 to 1.
    #[arg(long, default_value_t = 0.0, value_parser = in_range(0.0, 1.0))]
    pub min_p: f32,
    /// 0 to 10.
    #[arg(long, default_value_t = 1.0, value_parser = in_range(0.0, 10.0))]
    pub repetition_penalty: f32,
    /// -2 to 2.
    #[arg(long, default_value_t = 0.0, value_parser = in_range(-2.0, 2.0), allow_negative_numbers = true)]
    pub presence_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }
}
