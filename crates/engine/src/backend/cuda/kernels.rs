//! CUDA C sources, compiled at run time by NVRTC (see [`super::CudaDevice::module`]).

/// GEMV kernels (affine 2/4/8-bit, bf16, f32) and benchmark helpers.
pub const GEMV: (&str, &str) = ("gemv", include_str!("kernels/gemv.cu"));

/// Norms, RoPE, attention, GatedDeltaNet, router, MoE glue, embedding, prefill GEMM.
pub const FORWARD: (&str, &str) = ("forward", include_str!("kernels/forward.cu"));

/// GGML block types (GGUF files): decode GEMV, expert GEMV, grouped prefill GEMM, rows as f32.
pub const GGML: (&str, &str) = ("ggml", include_str!("kernels/ggml.cu"));
