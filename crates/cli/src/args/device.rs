//! `--device`, `--gpu-cache`: where the forward pass runs.

use clap::Args;

/// Where the forward pass runs.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// auto (a GPU when one works and the model fits, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: flashmoe::device::DeviceChoice,
    /// GPU memory for routed experts (e.g. 20G), or auto: what is free after the weights, the
    /// workspace and 8K tokens of state, minus a margin.
    #[arg(long, default_value = "auto")]
    pub gpu_cache: flashmoe::device::GpuCache,
}

impl DeviceArgs {
    pub fn options(&self) -> flashmoe::device::DeviceOptions {
        flashmoe::device::DeviceOptions { device: self.device, gpu_cache: self.gpu_cache, ..Default::default() }
    }
}
