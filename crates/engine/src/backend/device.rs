//! Where the forward pass runs: `--device auto|cpu|cuda[:N]`. Without the `cuda` feature only
//! the CPU exists (asking for CUDA is a clear error); with it, `auto` takes the GPU when one
//! opens and the model fits, and falls back to the CPU with a note otherwise.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Auto,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            o => o
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("`{o}`: expected auto, cpu, cuda or cuda:N")),
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
        crate::memory::parse_size(s).map(GpuCache::Bytes).map_err(|e| format!("{e} (or auto)"))
    }
}

#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    pub device: DeviceChoice,
    pub gpu_cache: GpuCache,
}

impl crate::Model {
    /// Moves the model to the device `o` names. Returns a note when `auto` stayed on the CPU.
    pub fn place(&mut self, o: &DeviceOptions) -> Result<Option<String>> {
        match o.device {
            DeviceChoice::Cpu => Ok(None),
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Auto => Ok(None),
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda(_) => Err(Error::Device(
                "this flashmoe was built without CUDA support (cargo feature `cuda`); use --device cpu".into(),
            )),
            #[cfg(feature = "cuda")]
            DeviceChoice::Auto => {
                if let Err(e) = crate::cuda::CudaDevice::open(0) {
                    return Ok(Some(format!("no usable GPU ({e}); running on the CPU")));
                }
                let opts = crate::cuda::model::GpuOptions { cache: o.gpu_cache, ..Default::default() };
                match self.use_gpu(&opts) {
                    Ok(()) => Ok(None),
                    Err(e) => Ok(Some(format!("the GPU could not take this model ({e}); running on the CPU"))),
                }
            }
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda(n) => {
                let opts = crate::cuda::model::GpuOptions { ordinal: n, cache: o.gpu_cache, ..Default::default() };
                self.use_gpu(&opts).map(|()| None).map_err(|e| Error::Device(format!("cuda:{n}: {e}")))
            }
        }
    }
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
        assert_eq!("auto".parse::<GpuCache>().unwrap(), GpuCache::Auto);
        assert_eq!("2G".parse::<GpuCache>().unwrap(), GpuCache::Bytes(2 << 30));
        assert!("lots".parse::<GpuCache>().is_err());
    }

    #[test]
    fn auto_never_fails_and_cuda_is_a_clear_error_without_a_gpu() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen35-moe-tiny");
        let mut m = crate::Model::load(&dir).unwrap();
        let auto = m.place(&DeviceOptions { device: DeviceChoice::Auto, ..Default::default() });
        assert!(auto.is_ok(), "{auto:?}");
        if m.device_name() == "cpu" {
            let e = m.place(&DeviceOptions { device: DeviceChoice::Cuda(0), ..Default::default() }).unwrap_err();
            assert!(e.to_string().contains("cuda") || e.to_string().contains("CUDA"), "{e}");
        }
    }
}
