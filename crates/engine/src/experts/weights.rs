//! What compute sees of a routed expert: three matrix views (gate, up, down), and where a layer's
//! experts come from (views into mapped checkpoint files, or fetched per token by the store).

use super::store::ExpertStore;
use crate::weights::Linear;
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
