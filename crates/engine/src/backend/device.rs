//! Where the forward pass runs: `--device auto|cpu|cuda[:N]|cuda:N,M,…|cuda:all`. Without the
//! `cuda` feature only the CPU exists (asking for CUDA is a clear error); with it, `auto` takes
//! the GPUs when they open and the model fits, and falls back to the CPU with a note otherwise.
//! Several GPUs split the layers between them (each its contiguous share, weights, state and
//! expert cache), the residual stream handed from one to the next; `auto` uses every GPU the
//! driver reports.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Auto,
    Cuda(usize),
    /// The layers split over these GPUs, in this order.
    CudaSplit(GpuList),
    /// The layers split over every GPU the driver reports.
    CudaAll,
}

/// GPU ordinals of a split, in layer order (at most [`GpuList::MAX`]). An ordinal may repeat:
/// two shares on one GPU run the hand-off on a machine with one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuList {
    len: u8,
    ordinals: [u8; GpuList::MAX],
}

impl GpuList {
    pub const MAX: usize = 16;

    pub fn new(ordinals: &[usize]) -> Option<GpuList> {
        if ordinals.is_empty() || ordinals.len() > Self::MAX || ordinals.iter().any(|&o| o > u8::MAX as usize) {
            return None;
        }
        let mut l = GpuList { len: ordinals.len() as u8, ordinals: [0; Self::MAX] };
        for (d, &o) in l.ordinals.iter_mut().zip(ordinals) {
            *d = o as u8;
        }
        Some(l)
    }

    pub fn ordinals(&self) -> Vec<usize> {
        self.ordinals[..self.len as usize].iter().map(|&o| o as usize).collect()
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            "cuda:all" => Ok(DeviceChoice::CudaAll),
            o => {
                let bad = || format!("`{o}`: expected auto, cpu, cuda, cuda:N, cuda:N,M,… or cuda:all");
                let list = o.strip_prefix("cuda:").ok_or_else(bad)?;
                let ords = list.split(',').map(|n| n.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>();
                match ords.as_deref() {
                    Ok([n]) => Ok(DeviceChoice::Cuda(*n)),
                    Ok(many) => GpuList::new(many)
                        .map(DeviceChoice::CudaSplit)
                        .ok_or_else(|| format!("`{o}`: at most {} GPUs, ordinals up to {}", GpuList::MAX, u8::MAX)),
                    Err(_) => Err(bad()),
                }
            }
        }
    }
}

/// Size of the GPU expert cache.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum GpuCache {
    /// Free GPU memory after weights, workspace and sequence state, minus a margin.
    #[default]
    Auto,
    Bytes(u64),
    /// This many experts (tests).
    Experts(usize),
}

impl std::str::FromStr for GpuCache {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(GpuCache::Auto);
        }
        crate::units::parse_size(s).map(GpuCache::Bytes).map_err(|e| format!("{e} (or auto)"))
    }
}

/// Where a decode step computes the routed experts the GPU cache does not hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hybrid {
    /// Copy every miss to the GPU (through pinned staging) and compute it there.
    #[default]
    Off,
    /// Misses the RAM tier holds are computed by the CPU in place (no copy; only the layer's
    /// input and the expert's output cross PCIe); misses read from disk are copied to the GPU.
    Auto,
    /// Every miss is computed by the CPU (read from disk into the RAM tier first when needed).
    Cpu,
}

impl std::str::FromStr for Hybrid {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" => Ok(Hybrid::Off),
            "auto" => Ok(Hybrid::Auto),
            "cpu" => Ok(Hybrid::Cpu),
            o => Err(format!("`{o}`: expected off, auto or cpu")),
        }
    }
}

/// With `--hybrid auto`: which share of the misses the RAM tier holds crosses PCIe (copied by DMA
/// from the RAM tier's pinned buffers into scratch GPU memory, computed there, not cached) while
/// the CPU computes the rest in place.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum PcieShare {
    /// From the CPU's expert rate and the PCIe rate measured at load: the split that ends both
    /// halves together.
    #[default]
    Auto,
    /// This fraction (0: all on the CPU, no pinned RAM tier; 1: all over PCIe).
    Fixed(f64),
}

impl std::str::FromStr for PcieShare {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(PcieShare::Auto);
        }
        match s.parse::<f64>() {
            Ok(f) if (0.0..=1.0).contains(&f) => Ok(PcieShare::Fixed(f)),
            _ => Err(format!("`{s}`: expected auto or a fraction from 0 to 1")),
        }
    }
}

/// Arithmetic of the GPU's multi-token (prefill) matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Tensor cores at f32-grade accuracy: operands split into hi + lo parts (bf16 for the
    /// dense cuBLAS products, TF32 for the expert GEMM, whose 4-bit codes are exact), products
    /// accumulated in f32. Decode GEMVs stay f32 on CUDA cores.
    #[default]
    Tensor,
    /// f32 FMA on CUDA cores everywhere, as the CPU backend computes.
    F32,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Tensor => "tensor",
            Precision::F32 => "f32",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tensor" => Ok(Precision::Tensor),
            "f32" => Ok(Precision::F32),
            o => Err(format!("`{o}`: expected tensor or f32")),
        }
    }
}

/// GPU settings below the user-facing flags (tests and benchmarks set them).
#[derive(Clone, Copy, Debug)]
pub struct GpuTuning {
    /// Most tokens per prefill pass (bounds the workspace).
    pub prefill_chunk: usize,
    /// Context the auto cache size leaves room for (KV cache).
    pub reserve_context: usize,
    /// Prefill passes of at least this many tokens run the non-expert matrices through
    /// dequantize + cuBLAS SGEMM; shorter ones through the multi-token GEMV kernel.
    pub blas_min_tokens: usize,
    /// Capture decode steps in CUDA graphs when every expert is resident.
    pub graphs: bool,
    /// With misses (the step waits for the host in every layer): record the fixed stretches of
    /// GPU work between the waits as graphs and replay them (`FLASHMOE_CUDA_STRETCHES=0`: eager
    /// launches, as before). Needs `graphs`.
    pub stretch_graphs: bool,
    /// Where decode computes GPU-cache misses.
    pub hybrid: Hybrid,
    /// Hybrid auto: the share of the RAM tier's misses that cross PCIe rather than being
    /// computed by the CPU (`FLASHMOE_PCIE_SHARE`, for benchmarks; the CLI's `--pcie-share`).
    pub pcie_share: PcieShare,
    /// Exclusive tiers: a prefill pass borrows the RAM tier's experts (copies them up and drops
    /// the GPU copy on eviction) instead of moving them up and the evicted ones back down
    /// (`FLASHMOE_PREFILL_BORROW=0`: move, as before; for A/B runs).
    pub prefill_borrow: bool,
    /// Exclusive tiers: an expert lives on the GPU or in the RAM tier, not both. Experts the
    /// GPU loads leave the RAM tier (disk reads for the GPU bypass it) and experts the GPU
    /// evicts are copied back into it. Off: the RAM tier keeps a copy of everything it reads
    /// (inclusive, the older behaviour).
    pub exclusive: bool,
    /// Prefill matrix products on tensor cores (split operands) or in f32 on CUDA cores.
    pub precision: Precision,
    /// A model split over GPUs hands the residual stream from one to the next device to device
    /// (peer copy, no host wait); off: through pinned host memory
    /// (`FLASHMOE_SPLIT_HANDOFF=host`).
    pub peer_hand_off: bool,
}

impl Default for GpuTuning {
    fn default() -> Self {
        GpuTuning {
            prefill_chunk: 512,
            reserve_context: 8192,
            blas_min_tokens: 64,
            graphs: std::env::var("FLASHMOE_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            stretch_graphs: std::env::var("FLASHMOE_CUDA_STRETCHES").map_or(true, |v| v != "0"),
            hybrid: Hybrid::Off,
            pcie_share: std::env::var("FLASHMOE_PCIE_SHARE").ok().and_then(|v| v.parse().ok()).unwrap_or_default(),
            prefill_borrow: std::env::var("FLASHMOE_PREFILL_BORROW").map_or(true, |v| v != "0"),
            exclusive: true,
            precision: Precision::default(),
            peer_hand_off: std::env::var("FLASHMOE_SPLIT_HANDOFF").map_or(true, |v| v != "host"),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    pub device: DeviceChoice,
    pub gpu_cache: GpuCache,
    pub gpu: GpuTuning,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_cache_specs_parse() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert_eq!("cuda:2".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(2));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert_eq!("cuda:all".parse::<DeviceChoice>().unwrap(), DeviceChoice::CudaAll);
        let split = "cuda:0,1".parse::<DeviceChoice>().unwrap();
        assert_eq!(split, DeviceChoice::CudaSplit(GpuList::new(&[0, 1]).unwrap()));
        let DeviceChoice::CudaSplit(l) = "cuda:1, 0,1".parse::<DeviceChoice>().unwrap() else { panic!() };
        assert_eq!(l.ordinals(), vec![1, 0, 1]);
        assert!("cuda:0,".parse::<DeviceChoice>().is_err());
        assert!("cuda:0,x".parse::<DeviceChoice>().is_err());
        assert!("cuda:0,300".parse::<DeviceChoice>().is_err());
        assert!("cuda:".parse::<DeviceChoice>().is_err());
        assert_eq!("auto".parse::<GpuCache>().unwrap(), GpuCache::Auto);
        assert_eq!("2G".parse::<GpuCache>().unwrap(), GpuCache::Bytes(2 << 30));
        assert!("lots".parse::<GpuCache>().is_err());
        assert_eq!("auto".parse::<Hybrid>().unwrap(), Hybrid::Auto);
        assert_eq!("cpu".parse::<Hybrid>().unwrap(), Hybrid::Cpu);
        assert_eq!("off".parse::<Hybrid>().unwrap(), Hybrid::Off);
        assert!("gpu".parse::<Hybrid>().is_err());
        assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
        assert_eq!("tensor".parse::<Precision>().unwrap(), Precision::Tensor);
        assert!("tf32".parse::<Precision>().is_err());
    }
}
