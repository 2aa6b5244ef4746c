//! `--device`, `--gpu-cache`: where the forward pass runs.

use clap::Args;

/// Where the forward pass runs.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// auto (the GPUs when they work and the model fits, else the CPU), cpu, cuda, cuda:N, or
    /// several GPUs: cuda:0,1 or cuda:all (the layers split between them in proportion to their
    /// memory, each GPU with its own expert cache for its layers). auto uses every GPU the driver
    /// reports (CUDA_VISIBLE_DEVICES limits them).
    #[arg(long, default_value = "auto")]
    pub device: flashmoe::device::DeviceChoice,
    /// GPU memory for routed experts (e.g. 20G; per GPU when there are several), or auto: what
    /// is free after the weights, the workspace and 8K tokens of state, minus a margin.
    #[arg(long, default_value = "auto")]
    pub gpu_cache: flashmoe::device::GpuCache,
    /// Decode with a GPU: where experts the GPU cache misses are computed. auto: those the RAM
    /// tier holds are split between the CPU (in place, no copy) and the GPU (copied over PCIe
    /// by DMA, not cached: --pcie-share), disk reads go to free GPU slots, else the CPU; off:
    /// every miss copied into the GPU cache; cpu: every miss on the CPU. (auto was 2–3× off with
    /// experts in RAM in every regime measured: docs/performance.md.)
    #[arg(long, default_value = "auto")]
    pub hybrid: flashmoe::backend::Hybrid,
    /// With --hybrid auto: the share of the RAM tier's misses that cross PCIe (DMA from the RAM
    /// tier, which is then pinned memory; computed on the GPU, not cached there) while the CPU
    /// computes the rest. auto: from the CPU's expert rate and the PCIe rate measured at load
    /// (printed in the summary); 0: all on the CPU (and the RAM tier stays pageable).
    #[arg(long)]
    pub pcie_share: Option<flashmoe::backend::PcieShare>,
    /// GPU and RAM expert tiers: exclusive (an expert lives in one of them; GPU evictions are
    /// copied back to RAM, usable capacity = GPU + RAM) or inclusive (RAM keeps a copy of what
    /// it reads for the GPU).
    #[arg(long, default_value = "exclusive", value_parser = ["exclusive", "inclusive"])]
    pub tiers: String,
    /// Arithmetic of the GPU's prefill matrix products: tensor (tensor cores with operands split
    /// into hi + lo parts, f32 accumulation: f32-grade results) or f32 (CUDA cores, as the CPU).
    /// Decode is f32 either way.
    #[arg(long, default_value = "tensor")]
    pub precision: flashmoe::backend::Precision,
}

impl DeviceArgs {
    pub fn options(&self) -> flashmoe::device::DeviceOptions {
        let defaults = flashmoe::backend::GpuTuning::default();
        let gpu = flashmoe::backend::GpuTuning {
            hybrid: self.hybrid,
            // (Unset: the environment's FLASHMOE_PCIE_SHARE, else auto.)
            pcie_share: self.pcie_share.unwrap_or(defaults.pcie_share),
            exclusive: self.tiers == "exclusive",
            precision: self.precision,
            ..defaults
        };
        flashmoe::device::DeviceOptions { device: self.device, gpu_cache: self.gpu_cache, gpu }
    }
}
