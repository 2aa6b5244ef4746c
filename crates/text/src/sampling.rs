//! Token sampling: penalties → temperature → top-k → top-p → min-p → draw.
//!
//! Written for large vocabularies (248k for Qwen3.5): no full sort unless top-p needs one, and
//! then only of the part of the distribution that the nucleus can reach; scratch buffers are
//! reused between calls.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. `Default` is greedy decoding with every filter and penalty off.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) = greedy argmax.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches top_p; 1 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below min_p × the top probability; 0 = off.
    pub min_p: f32,
    /// HF semantics: for every distinct token already in the context (prompt + generated), a
    /// positive logit is divided by the penalty and a negative one multiplied; 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI semantics: subtracted once from every token that occurs in the generated output; 0 = off.
    pub presence_penalty: f32,
    /// OpenAI semantics: subtracted once per occurrence in the generated output; 0 = off.
    pub frequency_penalty: f32,
    /// RNG seed; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// OpenAI `logit_bias`: (token id, value) added to that token's logit after the penalties,
    /// before temperature (so greedy decoding sees it too). Ids past the vocabulary are ignored.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// True when sampling reduces to argmax (temperature 0 or top_k 1).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

impl SamplingParams {
    /// The sampling defaults a model ships in its `generation_config.json` (already parsed), the
    /// way vLLM applies them: temperature, top_p, top_k, min_p, repetition_penalty and
    /// presence_penalty replace the neutral values; fields the file lacks stay neutral
    /// (temperature 1 when the file samples). `do_sample: false` means greedy, as in transformers;
    /// a file with no `do_sample` samples when it sets a temperature or a filter (vLLM), and is
    /// greedy otherwise (transformers' default). Values of the wrong type or out of range are an
    /// error naming the field.
    pub fn from_generation_config(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let num = |key: &str, lo: f64, hi: f64| -> std::result::Result<Option<f32>, String> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => match x.as_f64() {
                    Some(f) if (lo..=hi).contains(&f) => Ok(Some(f as f32)),
                    _ => Err(format!("`{key}` must be a number between {lo} and {hi}, got {x}")),
                },
            }
        };
        let temperature = num("temperature", 0.0, 100.0)?;
        let top_p = num("top_p", 0.0, 1.0)?;
        let min_p = num("min_p", 0.0, 1.0)?;
        let repetition_penalty = num("repetition_penalty", 0.0, 100.0)?;
        let presence_penalty = num("presence_penalty", -2.0, 2.0)?;
        let top_k = match v.get("top_k") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(x.as_u64().ok_or_else(|| format!("`top_k` must be a non-negative integer, got {x}"))?),
        };
        let do_sample = match v.get("do_sample") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(x.as_bool().ok_or_else(|| format!("`do_sample` must be true or false, got {x}"))?),
        };
        let sets_sampling = temperature.is_some() || top_p.is_some() || top_k.is_some() || min_p.is_some();
        let neutral = Self::default();
        let samples = do_sample.unwrap_or(sets_sampling);
        Ok(Self {
            temperature: if samples { temperature.unwrap_or(1.0) } else { 0.0 },
            top_k: top_k.map_or(neutral.top_k, |k| usize::try_from(k).unwrap_or(usize::MAX)),
            top_p: top_p.unwrap_or(neutral.top_p),
            min_p: min_p.unwrap_or(neutral.min_p),
            repetition_penalty: repetition_penalty.unwrap_or(neutral.repetition_penalty),
            presence_penalty: presence_penalty.unwrap_or(neutral.presence_penalty),
            ..neutral
        })
    }

    /// A short description for summary lines: `greedy`, or the temperature and every filter and
    /// penalty that is on, e.g. `temp 0.7 top-p 0.8 top-k 20`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.is_greedy() {
            parts.push("greedy".to_string());
        } else {
            parts.push(format!("temp {}", self.temperature));
            if self.top_p < 1.0 {
                parts.push(format!("top-p {}", self.top_p));
            }
            if self.top_k > 0 {
                parts.push(format!("top-k {}", self.top_k));
            }
            if self.min_p > 0.0 {
                parts.push(format!("min-p {}", self.min_p));
            }
        }
        if self.repetition_penalty != 1.0 {
            parts.push(format!("repetition-penalty {}", self.repetition_penalty));
        }
        if self.presence_penalty != 0.0 {
            parts.push(format!("presence-penalty {}", self.presence_penalty));
        }
        if self.frequency_penalty != 0.0 {
            parts.push(format!("frequency-penalty {}", self.frequency_penalty));
        }
        if let (Some(seed), false) = (self.seed, self.is_greedy()) {
            parts.push(format!("seed {seed}"));
        }
        parts.join(" ")
    }
}

/// Stateful sampler: the RNG plus scratch buffers sized to the vocabulary.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// (token id, scaled logit, later unnormalized probability) of the surviving candidates.
    cand: Vec<(u32, f32)>,
    /// Per-token marks/counts for the penalties; all zero between calls.
    counts: Vec<u32>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").field("params", &self.params).finish_non_exhaustive()
    }
}

impl Sampler {
    /// New sampler; seeded from `params.seed`, or from the OS when `None`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng, cand: Vec::new(), counts: Vec::new() }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` (one per vocabulary entry) receives the penalties in place
    /// (NaN becomes -inf); temperature and filters work on a copy of the survivors. `context` is every token so far (prompt + generated; used by the repetition
    /// penalty); `generated` only the generated ones (presence/frequency penalties).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], generated: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        self.apply_penalties(logits, context, generated);
        self.apply_bias(logits);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        if !self.filter(logits) {
            return argmax(logits);
        }
        let total: f64 = self.cand.iter().map(|&(_, w)| f64::from(w)).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(id, w) in &self.cand {
            u -= f64::from(w);
            if u < 0.0 {
                return id;
            }
        }
        // Rounding can leave u marginally ≥ 0 after the last candidate.
        self.cand.last().map_or(0, |&(id, _)| id)
    }

    /// The distribution `sample` would draw from: (id, probability) of every surviving token,
    /// probabilities summing to 1, most likely first (ties by id). Greedy gives `[(argmax, 1.0)]`.
    /// For logprobs and tests; it sorts the survivors, so it is slower than `sample`.
    pub fn probabilities(&mut self, logits: &mut [f32], context: &[u32], generated: &[u32]) -> Vec<(u32, f32)> {
        if logits.is_empty() {
            return Vec::new();
        }
        self.apply_penalties(logits, context, generated);
        self.apply_bias(logits);
        if self.params.is_greedy() || !self.filter(logits) {
            return vec![(argmax(logits), 1.0)];
        }
        let total: f64 = self.cand.iter().map(|&(_, w)| f64::from(w)).sum();
        self.cand.sort_unstable_by(desc);
        self.cand.iter().map(|&(id, w)| (id, (f64::from(w) / total) as f32)).collect()
    }

    /// `logit_bias`: added after the penalties (OpenAI applies it to the logits before sampling).
    fn apply_bias(&self, logits: &mut [f32]) {
        for &(id, b) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
    }

    /// Repetition penalty over distinct context tokens, then presence/frequency over generated
    /// tokens. NaN logits become -inf so they can never be chosen. Ids beyond the vocabulary are
    /// ignored.
    fn apply_penalties(&mut self, logits: &mut [f32], context: &[u32], generated: &[u32]) {
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        let n = logits.len();
        let p = &self.params;
        let rep = p.repetition_penalty;
        let (pres, freq) = (p.presence_penalty, p.frequency_penalty);
        if rep == 1.0 && pres == 0.0 && freq == 0.0 {
            return;
        }
        if self.counts.len() < n {
            self.counts.resize(n, 0);
        }
        if rep != 1.0 && rep > 0.0 {
            for &t in context {
                let t = t as usize;
                if t < n && self.counts[t] == 0 {
                    self.counts[t] = 1;
                    let l = &mut logits[t];
                    *l = if *l > 0.0 { *l / rep } else { *l * rep };
                }
            }
            for &t in context {
                if (t as usize) < n {
                    self.counts[t as usize] = 0;
                }
            }
        }
        if pres != 0.0 || freq != 0.0 {
            for &t in generated {
                if (t as usize) < n {
                    self.counts[t as usize] += 1;
                }
            }
            for &t in generated {
                let t = t as usize;
                if t < n && self.counts[t] > 0 {
                    logits[t] -= pres + freq * self.counts[t] as f32;
                    self.counts[t] = 0;
                }
            }
        }
    }

    /// Fills `self.cand` with (id, unnormalized probability) after temperature, top-k, top-p and
    /// min-p. Returns false when nothing has a finite logit (the caller falls back to argmax).
    fn filter(&mut self, logits: &[f32]) -> bool {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let n = logits.len();
        self.cand.clear();

        if p.top_k > 0 && p.top_k < n {
            // Streaming top-k: collect values above a running threshold and prune the buffer back
            // to k whenever it doubles. One pass over 248k logits with no full-size buffer.
            // Temperature is monotonic, so it is applied to the k survivors only.
            let k = p.top_k;
            let cap = (2 * k).max(64);
            let mut thr = f32::NEG_INFINITY;
            for (i, &l) in logits.iter().enumerate() {
                // Strictly greater: a later equal value has a higher id, so it ranks below the
                // current k-th and could never be selected.
                if l > thr {
                    self.cand.push((i as u32, l));
                    if self.cand.len() >= cap {
                        self.cand.select_nth_unstable_by(k - 1, desc);
                        self.cand.truncate(k);
                        thr = self.cand[k - 1].1;
                    }
                }
            }
            if self.cand.len() > k {
                self.cand.select_nth_unstable_by(k - 1, desc);
                self.cand.truncate(k);
            }
            for c in &mut self.cand {
                c.1 *= inv_t;
            }
        } else {
            self.cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)));
        }

        let max = self.cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return false;
        }
        for c in &mut self.cand {
            c.1 = (c.1 - max).exp();
        }

        if p.top_p < 1.0 {
            let total: f64 = self.cand.iter().map(|c| f64::from(c.1)).sum();
            let target = f64::from(p.top_p.max(0.0)) * total;
            // Sort only a growing prefix: the nucleus is usually a few dozen tokens out of 248k.
            let mut k = self.cand.len().min(256);
            loop {
                if k < self.cand.len() {
                    self.cand.select_nth_unstable_by(k - 1, desc);
                }
                self.cand[..k].sort_unstable_by(desc);
                let mut cum = 0.0f64;
                let mut cut = None;
                for (i, c) in self.cand[..k].iter().enumerate() {
                    cum += f64::from(c.1);
                    if cum >= target {
                        cut = Some(i + 1);
                        break;
                    }
                }
                match cut {
                    Some(c) => {
                        self.cand.truncate(c);
                        break;
                    }
                    None if k == self.cand.len() => break,
                    None => k = (k * 4).min(self.cand.len()),
                }
            }
        }

        if p.min_p > 0.0 {
            // Probabilities are relative to the maximum (exp(0) = 1), so the threshold is min_p.
            let min_p = p.min_p;
            self.cand.retain(|c| c.1 >= min_p);
        }
        !self.cand.is_empty()
    }
}

/// Descending by value, ties by ascending id (deterministic).
fn desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Index of the largest logit, the lowest id among ties. NaN is never chosen.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// A generated token's log-probability and the most likely alternatives at its position, under
/// the model's own distribution: log-softmax of the raw logits, before penalties, `logit_bias`,
/// temperature, filters and any grammar mask (what OpenAI's `logprobs` report).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The `top_n` most likely tokens as (id, logprob), most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprob`] of token `id` from one position's raw `logits`. The normaliser is summed in
/// f64; NaN logits count as -inf.
pub fn token_logprob(logits: &[f32], id: u32, top_n: usize) -> TokenLogprob {
    let clean = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = logits.iter().copied().map(clean).fold(f32::NEG_INFINITY, f32::max);
    let lse = if max == f32::NEG_INFINITY {
        0.0
    } else {
        let m = f64::from(max);
        m + logits.iter().map(|&l| (f64::from(clean(l)) - m).exp()).sum::<f64>().ln()
    };
    let lp = |l: f32| (f64::from(clean(l)) - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        // One pass keeping the best `top_n` in a short sorted list (top_n ≤ 20 in the APIs).
        for (i, &l) in logits.iter().enumerate() {
            let l = clean(l);
            if top.len() == top_n && l <= top[top_n - 1].1 {
                continue;
            }
            let at = top.partition_point(|&(_, v)| v >= l);
            top.insert(at, (i as u32, l));
            top.truncate(top_n);
        }
    }
    TokenLogprob {
        id,
        logprob: logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: top.into_iter().map(|(i, l)| (i, lp(l))).collect(),
    }
}
