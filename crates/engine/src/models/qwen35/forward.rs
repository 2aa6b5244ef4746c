//! The Qwen3.5-MoE / Qwen3-Next layer loop (spec §3), written once over the backend ops: embed →
//! per layer: [input norm] → mixer (gated attention or GatedDeltaNet) → residual add + post norm →
//! MoE (routed top-k + gated shared expert) + residual, fused with the next norm → logits.
//!
//! A backend runs a contiguous range of the layers (all of them, or its share when the model is
//! split over several devices): a stage after the first starts from the residual stream the
//! previous one handed over (`PassSpec::input`) and applies its first layer's input norm; a
//! stage before the last ends with its last layer's residual and hands it on
//! (`PassSpec::output`).

use super::weights::{Mixer, StageWeights};
use crate::backend::{Backend, Phase};
use crate::error::{Error, Result};
use crate::layers::{LogitsFor, PassInput, PassOutput, PassSpec};

/// Runs one pass of `spec.tokens` through the stage `w` on backend `b`; the logits (or the
/// hand-off rows) in `out`. Layers are numbered from the stage's first.
pub fn forward<B: Backend>(
    b: &B,
    w: &StageWeights<B::T>,
    spec: &PassSpec<'_>,
    state: &mut B::State,
    out: &mut Vec<f32>,
) -> Result<()> {
    layer_loop(b, w, spec, |graph| b.run(spec, state, graph, out))
}

/// [`forward`] over the next token of several sequences at once (`spec.batch`, continuous
/// batching): the same layer loop, run by `Backend::run_batch` with one state per sequence.
pub fn forward_batch<B: Backend>(
    b: &B,
    w: &StageWeights<B::T>,
    spec: &PassSpec<'_>,
    states: &mut [&mut B::State],
    out: &mut Vec<f32>,
) -> Result<()> {
    layer_loop(b, w, spec, |graph| b.run_batch(spec, states, graph, out))
}

type Graph<'g, B> = dyn for<'p> FnMut(&mut <B as Backend>::Pass<'p>) -> Result<()> + 'g;

/// Builds the stage's layer loop and hands it to `run` (which sets up a pass and calls it).
fn layer_loop<B: Backend>(
    b: &B,
    w: &StageWeights<B::T>,
    spec: &PassSpec<'_>,
    run: impl FnOnce(&mut Graph<'_, B>) -> Result<()>,
) -> Result<()> {
    let first = w.layers.first().ok_or_else(|| Error::input("the model has no layers"))?;
    if w.embed.is_some() != matches!(spec.input, PassInput::Embed) {
        return Err(Error::input("a pipeline stage needs either the embedding or the previous stage's output"));
    }
    let head = match (spec.output, spec.want, &w.final_norm, &w.lm_head) {
        (_, LogitsFor::None, _, _) => None,
        (PassOutput::Logits, _, Some(norm), Some(lm_head)) => Some((norm, lm_head)),
        _ => return Err(Error::input("logits asked of a pipeline stage that does not end the model")),
    };
    let timing = spec.hooks.wants_timing();
    let prefetch = spec.hooks.wants_prefetch() && spec.tokens.len() == 1;
    let mut graph = |p: &mut B::Pass<'_>| {
        if let Some(embed) = &w.embed {
            b.embed(p, embed)?;
        }
        b.rms_norm(p, &first.input_norm)?;
        for (li, lw) in w.layers.iter().enumerate() {
            if timing {
                b.mark(p, li, Phase::LayerStart);
            }
            match &lw.mixer {
                Mixer::Attention(a) => b.attention(p, li, a, &w.inv_freq)?,
                Mixer::DeltaNet(d) => b.delta_net(p, li, d)?,
            }
            if timing {
                b.mark(p, li, Phase::Mixed);
            }
            b.add_rms_norm(p, &lw.post_attention_norm)?;
            let next = w.layers.get(li + 1);
            if prefetch && let Some(n) = next {
                b.prefetch(p, li + 1, &n.moe)?;
            }
            // The MoE combine also applies the next norm: the next layer's input norm, or after
            // the model's last layer the final norm (when logits are wanted). A stage that hands
            // off leaves x as it is: the next stage norms it with its first layer's input norm.
            let next_norm = match next {
                Some(n) => Some(&n.input_norm),
                None => head.map(|(norm, _)| norm),
            };
            b.moe(p, li, &lw.moe, next_norm)?;
            if timing {
                b.mark(p, li, Phase::LayerEnd);
            }
        }
        if let Some((_, lm_head)) = head {
            b.logits(p, lm_head)?;
        }
        Ok(())
    };
    run(&mut graph)
}
