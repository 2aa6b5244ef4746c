//! Launchers of the forward-pass kernels in `kernels/forward.cu` (everything but the GEMVs).
//! Arguments are device addresses (u64) and sizes; the caller sizes the buffers (the GPU model's
//! workspace does), which is why these are crate-internal.

use super::context::{CudaDevice, CudaError, Result};
use super::kernels;
use cudarc::driver::CudaFunction;
use std::ffi::c_void;

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KArg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

impl From<u64> for KArg {
    fn from(v: u64) -> Self {
        KArg::P(v)
    }
}
impl From<i32> for KArg {
    fn from(v: i32) -> Self {
        KArg::I(v)
    }
}
impl From<usize> for KArg {
    fn from(v: usize) -> Self {
        KArg::I(v as i32)
    }
}
impl From<f32> for KArg {
    fn from(v: f32) -> Self {
        KArg::F(v)
    }
}

macro_rules! kargs {
    ($($a:expr),* $(,)?) => { vec![$(KArg::from($a)),*] };
}

pub(crate) struct ForwardKernels {
    rms_norm: CudaFunction,
    add_inplace: CudaFunction,
    swiglu: CudaFunction,
    moe_combine: CudaFunction,
    add_gated_rows: CudaFunction,
    gather_rows: CudaFunction,
    scatter_add_rows: CudaFunction,
    embed_affine: CudaFunction,
    embed_dense: CudaFunction,
    attn_prep: CudaFunction,
    attn_partial: CudaFunction,
    attn_merge: CudaFunction,
    dn_conv: CudaFunction,
    dn_recurrent: CudaFunction,
    router_topk: CudaFunction,
}

/// Blocks for a grid-stride element-wise kernel over n elements.
fn blocks_for(dev: &CudaDevice, n: usize) -> u32 {
    n.div_ceil(256).clamp(1, dev.sm_count * 8) as u32
}

impl ForwardKernels {
    pub fn load(dev: &CudaDevice) -> Result<Self> {
        let m = dev.module(kernels::FORWARD)?;
        let f = |n: &str| dev.function(&m, n);
        Ok(ForwardKernels {
            rms_norm: f("rms_norm")?,
            add_inplace: f("add_inplace")?,
            swiglu: f("swiglu")?,
            moe_combine: f("moe_combine")?,
            add_gated_rows: f("add_gated_rows")?,
            gather_rows: f("gather_rows")?,
            scatter_add_rows: f("scatter_add_rows")?,
            embed_affine: f("embed_affine")?,
            embed_dense: f("embed_dense")?,
            attn_prep: f("attn_prep")?,
            attn_partial: f("attn_partial")?,
            attn_merge: f("attn_merge")?,
            dn_conv: f("dn_conv")?,
            dn_recurrent: f("dn_recurrent")?,
            router_topk: f("router_topk")?,
        })
    }

    fn launch(
        dev: &CudaDevice,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        mut args: Vec<KArg>,
    ) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = args
            .iter_mut()
            .map(|a| match a {
                KArg::P(v) => (v as *mut u64).cast(),
                KArg::I(v) => (v as *mut i32).cast(),
                KArg::L(v) => (v as *mut i64).cast(),
                KArg::F(v) => (v as *mut f32).cast(),
            })
            .collect();
        // SAFETY: every launcher below passes the argument list of its kernel in forward.cu, in
        // order and with matching types; device addresses come from the workspace, the weights
        // or the sequence state, sized by the GPU model for the shapes it launches.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem,
                dev.stream.cu_stream(),
                &mut ptrs,
            )
        }
        .map_err(|e| CudaError(format!("cuLaunchKernel: {e:?}")))
    }

    /// `out[r] = rmsnorm(x[r])·w` for `rows` rows of `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(&self, dev: &CudaDevice, x: u64, w: u64, out: u64, rows: usize, d: usize, eps: f32) -> Result<()> {
        Self::launch(dev, &self.rms_norm, (rows as u32, 1, 1), 256, 0, kargs![x, w, out, d, eps])
    }

    pub fn add_inplace(&self, dev: &CudaDevice, x: u64, y: u64, n: usize) -> Result<()> {
        Self::launch(
            dev,
            &self.add_inplace,
            (blocks_for(dev, n), 1, 1),
            256,
            0,
            vec![KArg::P(x), KArg::P(y), KArg::L(n as i64)],
        )
    }

    /// `act = silu(g)·u` over n elements.
    pub fn swiglu(&self, dev: &CudaDevice, g: u64, u: u64, act: u64, n: usize) -> Result<()> {
        Self::launch(
            dev,
            &self.swiglu,
            (blocks_for(dev, n), 1, 1),
            256,
            0,
            vec![KArg::P(g), KArg::P(u), KArg::P(act), KArg::L(n as i64)],
        )
    }

    /// Decode: `x += Σ_e w[e]·ys[e] + sigmoid(sg)·ys[k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine(&self, dev: &CudaDevice, x: u64, ys: u64, wts: u64, sg: u64, k: usize, h: usize) -> Result<()> {
        Self::launch(dev, &self.moe_combine, (blocks_for(dev, h), 1, 1), 256, 0, kargs![x, ys, wts, sg, k, h])
    }

    /// `x[t] += sigmoid(sg[t])·y[t]`.
    pub fn add_gated_rows(&self, dev: &CudaDevice, x: u64, y: u64, sg: u64, h: usize, rows: usize) -> Result<()> {
        Self::launch(dev, &self.add_gated_rows, (blocks_for(dev, h * rows), 1, 1), 256, 0, kargs![x, y, sg, h, rows])
    }

    pub fn gather_rows(&self, dev: &CudaDevice, src: u64, idx: u64, dst: u64, h: usize, rows: usize) -> Result<()> {
        Self::launch(dev, &self.gather_rows, (blocks_for(dev, h * rows), 1, 1), 256, 0, kargs![src, idx, dst, h, rows])
    }

    #[allow(clippy::too_many_arguments)]
    pub fn scatter_add_rows(
        &self,
        dev: &CudaDevice,
        dst: u64,
        src: u64,
        idx: u64,
        w: u64,
        h: usize,
        rows: usize,
    ) -> Result<()> {
        Self::launch(
            dev,
            &self.scatter_add_rows,
            (blocks_for(dev, h * rows), 1, 1),
            256,
            0,
            kargs![dst, src, idx, w, h, rows],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn embed_affine(
        &self,
        dev: &CudaDevice,
        w: u64,
        s: u64,
        b: u64,
        ids: u64,
        out: u64,
        t: usize,
        cols: usize,
        bits: u32,
        gs: usize,
    ) -> Result<()> {
        Self::launch(
            dev,
            &self.embed_affine,
            (t as u32, 1, 1),
            256,
            0,
            kargs![w, s, b, ids, out, cols, bits as i32, gs],
        )
    }

    /// dtype 0 = f32, 1 = bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn embed_dense(
        &self,
        dev: &CudaDevice,
        w: u64,
        dtype: i32,
        ids: u64,
        out: u64,
        t: usize,
        cols: usize,
    ) -> Result<()> {
        Self::launch(dev, &self.embed_dense, (t as u32, 1, 1), 256, 0, kargs![w, dtype, ids, out, cols])
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attn_prep(
        &self,
        dev: &CudaDevice,
        qg: u64,
        k: u64,
        v: u64,
        q_norm: u64,
        k_norm: u64,
        inv_freq: u64,
        q_out: u64,
        gate_out: u64,
        kcache: u64,
        vcache: u64,
        t: usize,
        (nh, nkv, d, half): (usize, usize, usize, usize),
        pos0: usize,
        eps: f32,
    ) -> Result<()> {
        Self::launch(
            dev,
            &self.attn_prep,
            ((nh + nkv) as u32, t as u32, 1),
            128,
            (d * 4) as u32,
            kargs![qg, k, v, q_norm, k_norm, inv_freq, q_out, gate_out, kcache, vcache, nh, nkv, d, half, pos0, eps],
        )
    }

    /// Split attention (see attn_partial): part holds t·nh·splits·(d+2) f32.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        dev: &CudaDevice,
        q: u64,
        kcache: u64,
        vcache: u64,
        part: u64,
        gate: u64,
        out: u64,
        t: usize,
        (nh, nkv, d): (usize, usize, usize),
        pos0: usize,
        splits: usize,
    ) -> Result<()> {
        let longest = pos0 + t;
        let chunk = longest.div_ceil(splits);
        let scale = 1.0 / (d as f32).sqrt();
        Self::launch(
            dev,
            &self.attn_partial,
            (nh as u32, t as u32, splits as u32),
            128,
            0,
            kargs![q, kcache, vcache, part, nh, nkv, d, pos0, splits, chunk, scale],
        )?;
        Self::launch(dev, &self.attn_merge, (nh as u32, t as u32, 1), 128, 0, kargs![part, gate, out, nh, d, splits])
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dn_conv(
        &self,
        dev: &CudaDevice,
        qkv: u64,
        state: u64,
        convw: u64,
        out: u64,
        t: usize,
        conv_dim: usize,
        kc: usize,
    ) -> Result<()> {
        Self::launch(
            dev,
            &self.dn_conv,
            (conv_dim.div_ceil(128) as u32, 1, 1),
            128,
            0,
            kargs![qkv, state, convw, out, t, conv_dim, kc],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dn_recurrent(
        &self,
        dev: &CudaDevice,
        conv_out: u64,
        z: u64,
        b: u64,
        a: u64,
        neg_a: u64,
        dt_bias: u64,
        normw: u64,
        state: u64,
        y: u64,
        t: usize,
        (hk, hv, dk, dv): (usize, usize, usize, usize),
        eps: f32,
    ) -> Result<()> {
        Self::launch(
            dev,
            &self.dn_recurrent,
            (hv as u32, 1, 1),
            dv as u32,
            (2 * dk * 4) as u32,
            kargs![conv_out, z, b, a, neg_a, dt_bias, normw, state, y, t, hk, hv, dk, dv, eps],
        )
    }

    /// Softmax + top-k per token: ids [t, k] i32, wts [t, k] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn router_topk(
        &self,
        dev: &CudaDevice,
        logits: u64,
        e: usize,
        k: usize,
        norm: bool,
        ids: u64,
        wts: u64,
        t: usize,
    ) -> Result<()> {
        let block = 256u32.max((k as u32).div_ceil(32) * 32);
        Self::launch(
            dev,
            &self.router_topk,
            (t as u32, 1, 1),
            block,
            (e * 4) as u32,
            kargs![logits, e, k, norm as i32, ids, wts],
        )
    }
}
