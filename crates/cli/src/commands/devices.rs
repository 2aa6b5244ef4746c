//! `flashmoe devices`: compute devices (CPU SIMD level; CUDA GPUs when built with `cuda`).

#[cfg(feature = "cuda")]
use crate::util::fmt_bytes;
use anyhow::Result;

pub fn run() -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cpu: {threads} threads, kernels {}", flashmoe_kernels::simd_level());
    #[cfg(feature = "cuda")]
    match flashmoe::cuda::probe() {
        Ok(gpus) if gpus.is_empty() => println!("cuda: no GPU"),
        Ok(gpus) => {
            for g in gpus {
                println!("cuda:{}: {} ({})", g.ordinal, g.name, fmt_bytes(g.total_memory as u64));
            }
        }
        Err(e) => println!("cuda: unavailable ({e})"),
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not compiled in (build with --features cuda)");
    Ok(())
}
