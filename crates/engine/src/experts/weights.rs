//! What compute sees of a routed expert: three matrix views (gate, up, down), and where a layer's
//! experts come from (views into mapped checkpoint files, or fetched per token by the store).

use super::store::ExpertStore;
use crate::weights::Linear;
use crate::weights::store::{ByteSource, Bytes};
use std::sync::Arc;

/// One expert's matrices: y = down·(silu(gate·x) ⊙ up·x).
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl ExpertWeights {
    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }
}

/// The layout of a layer's expert blobs without their bytes: made once per layer from one parsed
/// expert, then applied to each fetched buffer. Every expert of a layer has the same components
/// at the same offsets, so a fetch needs no parsing, names or checks per token (they cost ≈ 3 µs
/// an expert on the dev box; on the H200's host 0.08–0.11 ms of a 3.9–4.7 ms hybrid decode
/// step, besides those the PCIe share built).
#[derive(Clone, Debug)]
pub(crate) struct ExpertTemplate(ExpertWeights);

impl ExpertTemplate {
    pub fn of(w: &ExpertWeights) -> Self {
        let m = |l: &Linear| l.map_bytes(&mut |b: &Bytes| Some(b.detached())).expect("detaching never refuses");
        ExpertTemplate(ExpertWeights { gate: m(&w.gate), up: m(&w.up), down: m(&w.down) })
    }

    /// The expert whose blob is `buf`; None when a range of the layout does not lie inside it.
    pub fn apply(&self, buf: &Arc<dyn ByteSource>) -> Option<ExpertWeights> {
        let mut rebase = |b: &Bytes| b.rebased(buf);
        Some(ExpertWeights {
            gate: self.0.gate.map_bytes(&mut rebase)?,
            up: self.0.up.map_bytes(&mut rebase)?,
            down: self.0.down.map_bytes(&mut rebase)?,
        })
    }
}

/// Where a layer's routed experts come from.
#[derive(Clone)]
pub enum ExpertSet {
    /// Views into mapped checkpoint files (HF/MLX folders, or packed files mapped whole).
    Resident(Vec<ExpertWeights>),
    /// Fetched per token from the expert store (positioned reads behind the RAM tier).
    Streamed { store: Arc<ExpertStore>, layer: usize },
}

impl ExpertSet {
    pub fn bytes(&self) -> usize {
        match self {
            ExpertSet::Resident(v) => v.iter().map(ExpertWeights::bytes).sum(),
            ExpertSet::Streamed { store, layer } => store.layer_bytes(*layer) as usize,
        }
    }

    /// The resident experts (None when streamed).
    pub fn resident(&self) -> Option<&[ExpertWeights]> {
        match self {
            ExpertSet::Resident(v) => Some(v),
            ExpertSet::Streamed { .. } => None,
        }
    }

    /// The store serving these experts, when they stream.
    pub fn store(&self) -> Option<&Arc<ExpertStore>> {
        match self {
            ExpertSet::Resident(_) => None,
            ExpertSet::Streamed { store, .. } => Some(store),
        }
    }

    /// One expert's bytes (streamed experts: its stride on disk).
    pub fn expert_bytes(&self) -> usize {
        match self {
            ExpertSet::Resident(v) => v.first().map_or(0, ExpertWeights::bytes),
            ExpertSet::Streamed { store, layer } => store.expert_stride(*layer) as usize,
        }
    }
}
