//! Backends: where the ops of a layer run. A model family writes its layer loop once against
//! [`Backend`]; the CPU backend ([`cpu`]) and, with the `cuda` feature, the CUDA backend
//! ([`cuda`]) implement it. Ops sit where the GPU path fuses work (norms fused with the residual
//! add and with the MoE combine; the whole MoE of a layer as one op; the pass as one step that a
//! backend may record and replay), so the generic loop costs a backend nothing.
//!
//! A third backend is one folder implementing this trait (the `checking` backend in the engine's
//! tests is one: it runs the CPU ops and compares every activation against an f64 reference).

pub mod cpu;
// The one place the `cuda` feature is decided: without it, a stand-in whose `open` says so.
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_missing.rs"]
pub mod cuda;
pub mod device;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::{AttentionWeights, Convert, DeltaNetWeights, Host, MoeWeights, PassSpec, Tensors};

pub use device::{DeviceChoice, DeviceOptions, GpuCache, GpuList, GpuTuning, Hybrid, PcieShare, Precision};

/// Where one layer's time went, marked by the layer loop when timing is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before the mixer (the layer's input norm is already applied).
    LayerStart,
    /// After the mixer, before the residual add and the MoE.
    Mixed,
    /// After the MoE and the next norm.
    LayerEnd,
}

/// A sequence's caches on a backend (KV caches, conv windows, delta-rule states).
pub trait BackendState: Send + 'static {
    /// A copy that continues exactly as the original would (the server's prefix cache).
    fn duplicate(&self) -> Self
    where
        Self: Sized;
    /// Bytes held (on the device that holds them).
    fn bytes(&self) -> usize;
}

/// Counters of a backend's own expert tier (a GPU's expert cache), since load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TierCounters {
    pub hits: u64,
    pub misses: u64,
    /// Host-to-device expert bytes.
    pub h2d_bytes: u64,
    pub tokens: u64,
    /// Misses computed by the CPU instead (hybrid decode).
    pub cpu_experts: u64,
    /// Misses the RAM tier holds that crossed PCIe to be computed on the GPU without being
    /// cached there (hybrid decode's PCIe share), and the host time choosing and queuing them.
    pub pcie_experts: u64,
    pub pcie_host_ns: u64,
    /// Device-to-host bytes of evicted experts copied back to the RAM tier (exclusive tiers).
    pub d2h_bytes: u64,
    /// Experts a pre-warm placed in the tier.
    pub prewarmed: u64,
    /// Host time blocked on the GPU for a step's expert ids (decode with misses), nanoseconds.
    pub ids_wait_ns: u64,
    /// Host time on the GPU-cache misses the CPU computes (hybrid decode), nanoseconds: the
    /// RAM-tier lookups and views (`cpu_fetch_ns`), and the wait for the compute pool after the
    /// PCIe share was issued alongside it.
    pub cpu_ns: u64,
    /// The pool's expert kernels, wall time (overlapping the PCIe share's host work).
    pub cpu_kernel_ns: u64,
    pub cpu_fetch_ns: u64,
    /// Host time queuing the CPU's expert outputs up to the GPU, nanoseconds.
    pub upload_ns: u64,
    /// Host time inside the MoE op of decode steps with misses, and of those whole passes.
    pub moe_host_ns: u64,
    pub pass_host_ns: u64,
    /// Single-token passes with logits, and the GPU time from each one's first to its last
    /// operation, nanoseconds (what is left of a step is host work the GPU waited for).
    pub decode_steps: u64,
    pub decode_gpu_ns: u64,
}

impl TierCounters {
    pub fn since(&self, before: &TierCounters) -> TierCounters {
        TierCounters {
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            h2d_bytes: self.h2d_bytes - before.h2d_bytes,
            tokens: self.tokens - before.tokens,
            cpu_experts: self.cpu_experts - before.cpu_experts,
            pcie_experts: self.pcie_experts - before.pcie_experts,
            pcie_host_ns: self.pcie_host_ns - before.pcie_host_ns,
            d2h_bytes: self.d2h_bytes - before.d2h_bytes,
            prewarmed: self.prewarmed - before.prewarmed,
            ids_wait_ns: self.ids_wait_ns - before.ids_wait_ns,
            cpu_ns: self.cpu_ns - before.cpu_ns,
            cpu_kernel_ns: self.cpu_kernel_ns - before.cpu_kernel_ns,
            cpu_fetch_ns: self.cpu_fetch_ns - before.cpu_fetch_ns,
            upload_ns: self.upload_ns - before.upload_ns,
            moe_host_ns: self.moe_host_ns - before.moe_host_ns,
            pass_host_ns: self.pass_host_ns - before.pass_host_ns,
            decode_steps: self.decode_steps - before.decode_steps,
            decode_gpu_ns: self.decode_gpu_ns - before.decode_gpu_ns,
        }
    }

    /// The counters of two tiers together (a model split over GPUs).
    pub fn plus(&self, o: &TierCounters) -> TierCounters {
        TierCounters {
            hits: self.hits + o.hits,
            misses: self.misses + o.misses,
            h2d_bytes: self.h2d_bytes + o.h2d_bytes,
            // Every stage sees every token.
            tokens: self.tokens.max(o.tokens),
            cpu_experts: self.cpu_experts + o.cpu_experts,
            pcie_experts: self.pcie_experts + o.pcie_experts,
            pcie_host_ns: self.pcie_host_ns + o.pcie_host_ns,
            d2h_bytes: self.d2h_bytes + o.d2h_bytes,
            prewarmed: self.prewarmed + o.prewarmed,
            ids_wait_ns: self.ids_wait_ns + o.ids_wait_ns,
            cpu_ns: self.cpu_ns + o.cpu_ns,
            cpu_kernel_ns: self.cpu_kernel_ns + o.cpu_kernel_ns,
            cpu_fetch_ns: self.cpu_fetch_ns + o.cpu_fetch_ns,
            upload_ns: self.upload_ns + o.upload_ns,
            moe_host_ns: self.moe_host_ns + o.moe_host_ns,
            pass_host_ns: self.pass_host_ns + o.pass_host_ns,
            // Stages run one after the other: a step's GPU time is theirs added.
            decode_steps: self.decode_steps.max(o.decode_steps),
            decode_gpu_ns: self.decode_gpu_ns + o.decode_gpu_ns,
        }
    }

    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 { 1.0 } else { self.hits as f64 / n as f64 }
    }
}

/// What a backend with its own expert tier reports about it.
#[derive(Clone, Debug)]
pub struct TierInfo {
    /// One line: device, resident weights, expert cache.
    pub description: String,
    pub device: String,
    pub slots: usize,
    pub slot_bytes: usize,
    pub total_experts: usize,
    pub counters: TierCounters,
}

/// Bandwidths a backend measured on its device, bytes per second.
#[derive(Clone, Copy, Debug)]
pub struct Bandwidths {
    /// Device-to-device copy, read + write.
    pub d2d: f64,
    /// Pinned host to device.
    pub h2d: f64,
}

/// The ops of one layer graph. Activations live in the backend's [`Backend::Pass`]: `x` (the
/// residual stream), `normed` (the input of the next op) and `mixed` (the mixer's output), each
/// [t, hidden] for the t tokens of the pass.
pub trait Backend: Send + Sync + Sized + 'static {
    /// Where this backend's weights live.
    type T: Tensors;
    /// A sequence's caches.
    type State: BackendState;
    /// One pass's activations, with the sequence state it updates.
    type Pass<'p>;

    /// "cpu", or the device's one-line description.
    fn describe(&self) -> String;

    /// Uploads host tensors (the CPU backend keeps the host views).
    fn upload(&self) -> impl Convert<Host, Self::T> + '_;

    /// Called once after the weights were uploaded, with each layer's routed experts: size the
    /// caches and workspaces that depend on them.
    fn prepare(&mut self, _cfg: &ModelConfig, _experts: &[&<Self::T as Tensors>::Experts]) -> Result<()> {
        Ok(())
    }

    fn new_state(&self, cfg: &ModelConfig) -> Result<Self::State>;

    /// Runs one pass of `spec.tokens` over `state`: sets up the activations, calls `graph` (the
    /// family's layer loop, made of the ops below) — or replays a recording of an earlier call
    /// with the same shape — and leaves in `out` the logits `spec.want` asks for ([n, vocab];
    /// empty for none). `out` is the caller's, reused across steps: a fresh 1 MB vector per
    /// decode step cost 0.17 ms of page faults on the GPU machine.
    fn run(
        &self,
        spec: &PassSpec<'_>,
        state: &mut Self::State,
        graph: &mut dyn for<'p> FnMut(&mut Self::Pass<'p>) -> Result<()>,
        out: &mut Vec<f32>,
    ) -> Result<()>;

    /// Whether [`Backend::run_batch`] runs several sequences in one pass.
    fn can_batch(&self) -> bool {
        false
    }

    /// Whether batching sequences is faster here than decoding them one at a time (a server's
    /// default): where every expert stays in GPU memory, the multi-row kernels cost more than
    /// the decode steps they replace (docs/performance.md).
    fn batch_pays(&self) -> bool {
        self.can_batch()
    }

    /// Continuous batching: one pass over the next token of each of several sequences
    /// (`spec.batch` holds their positions; row i goes with `states[i]`), with logits for every
    /// row (`spec.want` is `All`). Mixers run per sequence on its own caches; every matrix and
    /// each routed expert is read once for all the rows. Each row's result is what a pass over
    /// that sequence alone gives (the same operations on the same numbers).
    fn run_batch(
        &self,
        _spec: &PassSpec<'_>,
        _states: &mut [&mut Self::State],
        _graph: &mut dyn for<'p> FnMut(&mut Self::Pass<'p>) -> Result<()>,
        _out: &mut Vec<f32>,
    ) -> Result<()> {
        Err(crate::error::Error::input(format!("{} cannot run several sequences in one pass", self.describe())))
    }

    /// x = rows `tokens` of `table`.
    fn embed(&self, p: &mut Self::Pass<'_>, table: &<Self::T as Tensors>::Mat) -> Result<()>;
    /// normed = RMSNorm(x)·w.
    fn rms_norm(&self, p: &mut Self::Pass<'_>, w: &<Self::T as Tensors>::Vec) -> Result<()>;
    /// mixed = gated attention over normed, appending to layer `layer`'s KV cache.
    fn attention(
        &self,
        p: &mut Self::Pass<'_>,
        layer: usize,
        w: &AttentionWeights<Self::T>,
        inv_freq: &<Self::T as Tensors>::Vec,
    ) -> Result<()>;
    /// mixed = GatedDeltaNet over normed, advancing layer `layer`'s conv and recurrent state.
    fn delta_net(&self, p: &mut Self::Pass<'_>, layer: usize, w: &DeltaNetWeights<Self::T>) -> Result<()>;
    /// x += mixed; normed = RMSNorm(x)·w.
    fn add_rms_norm(&self, p: &mut Self::Pass<'_>, w: &<Self::T as Tensors>::Vec) -> Result<()>;
    /// Decode only: guess layer `layer`'s experts from normed (its router applied to the
    /// current layer's post-attention state) and start fetching them.
    fn prefetch(&self, _p: &mut Self::Pass<'_>, _layer: usize, _w: &MoeWeights<Self::T>) -> Result<()> {
        Ok(())
    }
    /// x += MoE(normed) (routed top-k + gated shared expert); then, when `next_norm` is given,
    /// normed = RMSNorm(x)·next_norm (the next layer's input norm, or the final norm).
    fn moe(
        &self,
        p: &mut Self::Pass<'_>,
        layer: usize,
        w: &MoeWeights<Self::T>,
        next_norm: Option<&<Self::T as Tensors>::Vec>,
    ) -> Result<()>;
    /// Logits of the rows `want` names: lm_head·normed (normed holds the final norm of x).
    fn logits(&self, p: &mut Self::Pass<'_>, lm_head: &<Self::T as Tensors>::Mat) -> Result<()>;
    /// Timing marks (called only when the hooks want timing).
    fn mark(&self, _p: &mut Self::Pass<'_>, _layer: usize, _phase: Phase) {}

    /// A model split over devices: whether [`Backend::hand_over`] can move this backend's rows
    /// to `next` without the host (false: the caller passes them through host memory).
    fn can_hand_over(&self, _next: &Self) -> bool {
        false
    }

    /// After a pass that left `floats` floats of residual stream on this backend's device
    /// (`PassOutput::HiddenOnDevice`), makes them the input of `next`'s next pass
    /// (`PassInput::HiddenOnDevice`): a device-to-device copy ordered after this backend's work
    /// and before `next`'s, with no host wait.
    fn hand_over(&self, _next: &Self, _floats: usize) -> Result<()> {
        Err(crate::error::Error::input("this backend hands rows over through host memory only"))
    }

    /// The backend's own expert tier, when it has one.
    fn tier(&self) -> Option<TierInfo> {
        None
    }
    /// Fills the backend's expert tier in (layer, expert) order until it is full; returns how
    /// many experts it holds. `experts` gives each layer's host expert set.
    fn preload_experts(&self, _experts: &[&<Self::T as Tensors>::Experts], _fetch_chunk: usize) -> Result<usize> {
        Ok(0)
    }
    /// Bandwidths measured on the device (None on the CPU).
    /// Free room, in experts, in the backend's own expert tier for a pre-warm (0: none).
    fn prewarm_room(&self) -> usize {
        0
    }

    /// Takes pre-warmed experts (read from `store`) from `rx` between passes, until its tier is
    /// full. Only called when `prewarm_room` is not 0.
    fn accept_prewarm(
        &self,
        _rx: crate::experts::store::PrewarmRx,
        _store: std::sync::Arc<crate::experts::ExpertStore>,
    ) {
    }

    fn measure_bandwidths(&self) -> Result<Option<Bandwidths>> {
        Ok(None)
    }
}

/// A backend's sequence state with its type erased (what the runtime's `SequenceState` holds).
pub trait AnyState: Send {
    fn duplicate_box(&self) -> Box<dyn AnyState>;
    fn bytes(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl<S: BackendState> AnyState for S {
    fn duplicate_box(&self) -> Box<dyn AnyState> {
        Box::new(self.duplicate())
    }
    fn bytes(&self) -> usize {
        BackendState::bytes(self)
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
