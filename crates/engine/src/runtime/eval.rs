//! Perplexity: the quality yardstick for lossy modes (fewer experts, fewer bits). The text is
//! tokenized once and cut into non-overlapping windows, each run from an empty state as one
//! batched prefill; ppl = exp(mean next-token NLL over all predictions inside the windows).

use super::model::Model;
use crate::error::{Error, Result};
use crate::layers::LogitsFor;

#[derive(Clone, Debug)]
pub struct PerplexityReport {
    pub tokens: usize,
    pub windows: usize,
    pub predictions: usize,
    pub nll: f64,
    pub ppl: f64,
}

/// `on_window(done_tokens)` is called after each window (progress).
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    window: usize,
    mut on_window: impl FnMut(usize),
) -> Result<PerplexityReport> {
    if window < 2 {
        return Err(Error::input("--window must be at least 2 tokens"));
    }
    if ids.len() < 2 {
        return Err(Error::input(format!("need at least 2 tokens to measure perplexity, got {}", ids.len())));
    }
    let v = model.config.vocab_size;
    let (mut sum, mut n, mut windows) = (0.0f64, 0usize, 0usize);
    for chunk in ids.chunks(window) {
        if chunk.len() < 2 {
            break;
        }
        let mut state = model.new_state();
        let logits = model.forward(chunk, &mut state, LogitsFor::All)?;
        for (t, &next) in chunk[1..].iter().enumerate() {
            let row = &logits[t * v..(t + 1) * v];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            sum += lse - row[next as usize] as f64;
            n += 1;
        }
        windows += 1;
        on_window(windows * window);
    }
    let nll = sum / n as f64;
    Ok(PerplexityReport { tokens: ids.len(), windows, predictions: n, nll, ppl: nll.exp() })
}
