//! CUDA availability probe (feature `cuda`). The CUDA backend itself (kernels, expert tiers) is
//! separate work; this module only answers "is there a usable GPU?" without ever panicking on a
//! machine that has no driver: cudarc loads libcuda dynamically, and its loader panics when the
//! library is missing, so we check for the library first.

use cudarc::driver::CudaContext;

#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
}

/// Lists the CUDA devices, or says why there are none.
pub fn probe() -> Result<Vec<GpuInfo>, String> {
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
