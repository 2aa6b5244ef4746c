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

/// A number in (0, hi]: 0 has no meaning here (a repetition penalty of 0 would divide by zero,
/// and the sampler would ignore it; the server refuses it too).
fn positive_up_to(hi: f32) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let x: f32 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
        if x > 0.0 && x <= hi { Ok(x) } else { Err(format!("must be between 0 (excluded) and {hi}, got {s}")) }
    }
}

/// Each flag overrides the model's own default (its generation_config.json; greedy without one).
#[derive(Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// 0 = greedy (deterministic). 0 to 2. Default: the model's generation_config.json.
    #[arg(long, value_parser = in_range(0.0, 2.0))]
    pub temperature: Option<f32>,
    /// 0 to 1 (1 = off; 0 keeps only the most likely token, as the server takes it). Default: the
    /// model's generation_config.json.
    #[arg(long, value_parser = in_range(0.0, 1.0))]
    pub top_p: Option<f32>,
    /// 0 = off. Default: the model's generation_config.json.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=u32::MAX as u64))]
    pub top_k: Option<usize>,
    /// 0 to 1 (0 = off). Default: the model's generation_config.json.
    #[arg(long, value_parser = in_range(0.0, 1.0))]
    pub min_p: Option<f32>,
    /// Above 0, at most 10 (1 = off). Default: the model's generation_config.json.
    #[arg(long, value_parser = positive_up_to(10.0))]
    pub repetition_penalty: Option<f32>,
    /// -2 to 2 (0 = off). Default: the model's generation_config.json.
    #[arg(long, value_parser = in_range(-2.0, 2.0), allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    /// Seed of the sampler's random numbers: the same seed gives the same text. Default: random.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The model's defaults with every flag given put over them.
    pub fn params(&self, defaults: &SamplingParams) -> SamplingParams {
        let d = defaults;
        SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            seed: self.seed.or(d.seed),
            ..d.clone()
        }
    }

    /// True when any sampling value was given on the command line (the seed aside).
    fn any_given(&self) -> bool {
        self.temperature.is_some()
            || self.top_p.is_some()
            || self.top_k.is_some()
            || self.min_p.is_some()
            || self.repetition_penalty.is_some()
            || self.presence_penalty.is_some()
    }

    /// `sampler …` for summary lines: what the sampler does and where its settings came from.
    /// `model_source` names where a model keeps its defaults ("generation_config.json").
    pub fn describe(&self, params: &SamplingParams, from_model: bool, model_source: &str) -> String {
        let source = match (from_model, self.any_given()) {
            (true, false) => model_source.to_string(),
            (true, true) => format!("{model_source} and flags"),
            (false, true) => "flags".into(),
            (false, false) => format!("no {model_source}"),
        };
        format!("sampler {} ({source})", params.describe())
    }
}
