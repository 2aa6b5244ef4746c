//! The Qwen3.5-MoE / Qwen3-Next layer loop (spec §3), written once over the backend ops: embed →
//! per layer: [input norm] → mixer (gated attention or GatedDeltaNet) → residual add + post norm →
//! MoE (routed top-k + gated shared expert) + residual, fused with the next norm → logits.

use super::weights::{Mixer, ModelWeights};
use crate::backend::{Backend, Phase};
use crate::error::{Error, Result};
use crate::layers::{LogitsFor, PassSpec};

/// Runs one pass of `spec.tokens` through `w` on backend `b`; the logits in `out`.
pub fn forward<B: Backend>(
    b: &B,
    w: &ModelWeights<B::T>,
    spec: &PassSpec<'_>,
    state: &mut B::State,
    out: &mut Vec<f32>,
) -> Result<()> {
    let first = w.layers.first().ok_or_else(|| Error::input("the model has no layers"))?;
    let timing = spec.hooks.wants_timing();
    let prefetch = spec.hooks.wants_prefetch() && spec.tokens.len() == 1;
    let mut graph = |p: &mut B::Pass<'_>| {
        b.embed(p, &w.embed)?;
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
            // the last layer the final norm (when logits are wanted).
            let next_norm = match next {
                Some(n) => Some(&n.input_norm),
                None if spec.want != LogitsFor::None => Some(&w.final_norm),
                None => None,
            };
            b.moe(p, li, &lw.moe, next_norm)?;
            if timing {
                b.mark(p, li, Phase::LayerEnd);
            }
        }
        if spec.want != LogitsFor::None {
            b.logits(p, &w.lm_head)?;
        }
        Ok(())
    };
    b.run(spec, state, &mut graph, out)
}
