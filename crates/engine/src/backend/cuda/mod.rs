//! CUDA backend (feature `cuda`).
//!
//! - [`probe`] answers "is there a usable GPU?" without ever panicking on a machine that has no
//!   driver: cudarc loads libcuda dynamically, and its loader panics when the library is missing,
//!   so we check for the library first.
//! - [`CudaDevice`] (context.rs): context, stream, NVRTC compilation of the `.cu` sources in
//!   `kernels/` for the device's architecture with an on-disk cubin cache, device buffers, timing.
//! - [`gemv`]: the decode GEMV kernels (MLX affine 2/4/8-bit, bf16, f32), batched GEMV (all of
//!   a token's experts in one launch) and the multi-token GEMM of prefill.
//! - `ops`: launchers of the other forward kernels (norms, RoPE, attention, GatedDeltaNet,
//!   router top-k, MoE glue, embedding).
//! - [`backend`]: [`CudaBackend`], the layer-graph ops on the GPU, its sequence state and the GPU
//!   expert pool.

pub mod backend;
pub mod context;
pub mod gemv;
mod kernels;
mod ops;

pub use backend::{CudaBackend, CudaPass, DevExperts, DevSeqState, Device};

/// True: this build has the CUDA backend.
pub const COMPILED: bool = true;
pub use context::{CudaDevice, CudaError, DevBuf, Graph, Result, Timer};
pub use gemv::{AffineVariant, BatchItem, DevFormat, DevMatrix, GemvKernels, MatView};

use cudarc::driver::CudaContext;

/// CUDA errors reach the engine's error type whole (kept as its source).
impl From<CudaError> for crate::error::Error {
    fn from(e: CudaError) -> Self {
        crate::error::Error::Backend(Box::new(e))
    }
}

#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
}

/// Lists the CUDA devices, or says why there are none.
pub fn probe() -> std::result::Result<Vec<GpuInfo>, String> {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made if it is absent.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda.so) found".into());
    }
    let n = CudaContext::device_count().map_err(|e| format!("CUDA driver error: {e}"))?;
    let mut out = Vec::new();
    for i in 0..n.max(0) as usize {
        let ctx = CudaContext::new(i).map_err(|e| format!("cannot open GPU {i}: {e}"))?;
        out.push(GpuInfo {
            ordinal: i,
            name: ctx.name().unwrap_or_else(|_| "unknown".into()),
            total_memory: ctx.total_mem().unwrap_or(0),
        });
    }
    Ok(out)
}

/// How many GPUs the driver reports (`--device cuda:all`).
pub fn device_count() -> crate::Result<usize> {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made if it is absent.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::new("no CUDA device: the driver library (libcuda.so) was not found").into());
    }
    let n = CudaContext::device_count().map_err(|e| CudaError(format!("cuDeviceGetCount: {e}")))?;
    Ok(n.max(0) as usize)
}

/// Parses a device spec: `cuda` (GPU 0) or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<usize> {
    match spec {
        "cuda" => Ok(0),
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| CudaError::new(format!("device must be cuda or cuda:N, got {s:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_device_never_panics() {
        // On a machine without a GPU this is an error ("no CUDA device ..."); with one, a device.
        match CudaDevice::open(0) {
            Ok(d) => assert!(d.sm_count > 0),
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
        }
        assert!(CudaDevice::open(1 << 20).is_err());
    }

    #[test]
    fn device_specs_and_layouts() {
        assert_eq!(parse_device("cuda").unwrap(), 0);
        assert_eq!(parse_device("cuda:3").unwrap(), 3);
        assert!(parse_device("gpu").is_err());
        let q2 = DevFormat::Affine { bits: 2, group_size: 32 };
        assert!(q2.check(7, 64).is_ok());
        assert!(q2.check(7, 96).is_err()); // rows of 24 bytes: not whole 16-byte chunks
        assert!(DevFormat::Affine { bits: 4, group_size: 64 }.check(1, 192).is_ok());
        assert!(DevFormat::Affine { bits: 3, group_size: 64 }.check(1, 192).is_err());
        assert!(DevFormat::Bf16.check(1, 12).is_err());
        assert_eq!(GemvKernels::x_smem_bytes(4, 4096), 4096 / 32 * 36 * 4);
    }
}
