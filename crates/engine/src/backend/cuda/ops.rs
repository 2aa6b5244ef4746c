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
    add_rms_norm: CudaFunction,
    dequant_rows: CudaFunction,
    dequant_rows_split: CudaFunction,
    split_rows_x: CudaFunction,
    swiglu: CudaFunction,
    moe_combine: CudaFunction,
    add_gated_rows: CudaFunction,
    moe_prefill_combine: CudaFunction,
    embed_affine: CudaFunction,
    embed_dense: CudaFunction,
    attn_prep: CudaFunction,
    attn_partial: CudaFunction,
    attn_merge: CudaFunction,
    dn_conv: CudaFunction,
    dn_recurrent: CudaFunction,
    dn_gated_norm: CudaFunction,
    dn_conv_tokens: CudaFunction,
    dn_conv_state: CudaFunction,
    dn_prep: CudaFunction,
    /// `dn_recurrent_tokens_r{NR}` by rows per lane (dk / 4).
    dn_recurrent_tokens: std::collections::HashMap<usize, CudaFunction>,
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
            add_rms_norm: f("add_rms_norm")?,
            dequant_rows: f("dequant_rows")?,
            dequant_rows_split: f("dequant_rows_split")?,
            split_rows_x: f("split_rows_x")?,
            swiglu: f("swiglu")?,
            moe_combine: f("moe_combine")?,
            add_gated_rows: f("add_gated_rows")?,
            moe_prefill_combine: f("moe_prefill_combine")?,
            embed_affine: f("embed_affine")?,
            embed_dense: f("embed_dense")?,
            attn_prep: f("attn_prep")?,
            attn_partial: f("attn_partial")?,
            attn_merge: f("attn_merge")?,
            dn_conv: f("dn_conv")?,
            dn_recurrent: f("dn_recurrent")?,
            dn_gated_norm: f("dn_gated_norm")?,
            dn_conv_tokens: f("dn_conv_tokens")?,
            dn_conv_state: f("dn_conv_state")?,
            dn_prep: f("dn_prep")?,
            dn_recurrent_tokens: [4usize, 8, 16, 32]
                .into_iter()
                .map(|nr| Ok((nr, f(&format!("dn_recurrent_tokens_r{nr}"))?)))
                .collect::<Result<_>>()?,
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
        unsafe { dev.launch_3d(f, grid, block, smem, &mut ptrs) }
            .map_err(|e| CudaError(format!("cuLaunchKernel: {e:?}")))
    }

    /// `out[r] = rmsnorm(x[r])·w` for `rows` rows of `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(&self, dev: &CudaDevice, x: u64, w: u64, out: u64, rows: usize, d: usize, eps: f32) -> Result<()> {
        Self::launch(dev, &self.rms_norm, (rows as u32, 1, 1), 1024, 0, kargs![x, w, out, d, eps])
    }

    /// `x += y; out = rmsnorm(x)·w` for `rows` rows of `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        &self,
        dev: &CudaDevice,
        x: u64,
        y: u64,
        w: u64,
        out: u64,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        Self::launch(dev, &self.add_rms_norm, (rows as u32, 1, 1), 1024, 0, kargs![x, y, w, out, d, eps])
    }

    /// Rows `row0 .. row0+nrows` of an affine (fmt 0) or bf16 (fmt 2) matrix as f32 into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn dequant_rows(
        &self,
        dev: &CudaDevice,
        w: (u64, u64, u64),
        fmt: i32,
        q: (u32, usize),
        row0: usize,
        nrows: usize,
        cols: usize,
        out: u64,
    ) -> Result<()> {
        let words = if fmt == 0 { nrows * cols / (32 / q.0 as usize) } else { nrows * cols / 2 };
        Self::launch_rows(dev, &self.dequant_rows, words, w, fmt, q, (row0, nrows, cols), out)
    }

    /// Rows `row0 .. row0+nrows` of an affine (fmt 0), f32 (1) or bf16 (2) matrix as bf16
    /// `[nrows, 3·cols]` = [hi | hi | lo] into `out` (the split operand of a tensor-core product).
    #[allow(clippy::too_many_arguments)]
    pub fn dequant_rows_split(
        &self,
        dev: &CudaDevice,
        w: (u64, u64, u64),
        fmt: i32,
        q: (u32, usize),
        row0: usize,
        nrows: usize,
        cols: usize,
        out: u64,
    ) -> Result<()> {
        let words = if fmt == 0 { nrows * cols / (32 / q.0 as usize) } else { nrows * cols / 2 };
        Self::launch_rows(dev, &self.dequant_rows_split, words, w, fmt, q, (row0, nrows, cols), out)
    }

    /// Both row dequantizers take (w, s, b, fmt, bits, gs, row0, nrows, cols, out), one thread per
    /// 32-bit word of the source (`words` in all, grid-stride beyond the cap).
    #[allow(clippy::too_many_arguments)]
    fn launch_rows(
        dev: &CudaDevice,
        f: &CudaFunction,
        words: usize,
        (w, s, b): (u64, u64, u64),
        fmt: i32,
        (bits, gs): (u32, usize),
        (row0, nrows, cols): (usize, usize, usize),
        out: u64,
    ) -> Result<()> {
        Self::launch(
            dev,
            f,
            (blocks_for(dev, words), 1, 1),
            256,
            0,
            vec![
                KArg::P(w),
                KArg::P(s),
                KArg::P(b),
                KArg::I(fmt),
                KArg::I(bits as i32),
                KArg::I(gs as i32),
                KArg::L(row0 as i64),
                KArg::L(nrows as i64),
                KArg::I(cols as i32),
                KArg::P(out),
            ],
        )
    }

    /// `x` [t, cols] f32 as bf16 `[t, 3·cols]` = [hi | lo | hi] into `out`.
    pub fn split_rows_x(&self, dev: &CudaDevice, x: u64, out: u64, t: usize, cols: usize) -> Result<()> {
        Self::launch(
            dev,
            &self.split_rows_x,
            (blocks_for(dev, t * cols), 1, 1),
            256,
            0,
            vec![KArg::P(x), KArg::P(out), KArg::L(t as i64), KArg::I(cols as i32)],
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

    /// Decode: `x += Σ_e w[e]·ys[e] + sigmoid(sg)·ys[k]`; then, when `norm` is Some((w, out)),
    /// `out = rmsnorm(x)·w` (the next layer's input norm or the final norm). One block.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine(
        &self,
        dev: &CudaDevice,
        x: u64,
        ys: u64,
        wts: u64,
        sg: u64,
        k: usize,
        h: usize,
        norm: Option<(u64, u64)>,
        cpu_rows: Option<(u64, u64)>,
        eps: f32,
    ) -> Result<()> {
        let (nw, out) = norm.unwrap_or((0, 0));
        let (mask, rows) = cpu_rows.unwrap_or((0, 0));
        Self::launch(dev, &self.moe_combine, (1, 1, 1), 1024, 0, kargs![x, ys, wts, sg, k, h, nw, out, mask, rows, eps])
    }

    /// `x[t] += sigmoid(sg[t])·y[t]`.
    pub fn add_gated_rows(&self, dev: &CudaDevice, x: u64, y: u64, sg: u64, h: usize, rows: usize) -> Result<()> {
        Self::launch(dev, &self.add_gated_rows, (blocks_for(dev, h * rows), 1, 1), 256, 0, kargs![x, y, sg, h, rows])
    }

    /// Prefill: `x[t] += Σ_j w[t·k+j]·yd[pair_of[t·k+j]]`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_prefill_combine(
        &self,
        dev: &CudaDevice,
        x: u64,
        yd: u64,
        pair_of: u64,
        w: u64,
        k: usize,
        h: usize,
        t: usize,
    ) -> Result<()> {
        Self::launch(
            dev,
            &self.moe_prefill_combine,
            (blocks_for(dev, h * t), 1, 1),
            256,
            0,
            kargs![x, yd, pair_of, w, k, h, t],
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
        pos0: u64,
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

    /// Split attention (see attn_partial): part holds t·nh·splits·(d+2) f32. `pos0` points at the
    /// position of the first token (device memory, so graphs replay at any position).
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
        pos0: u64,
        splits: usize,
    ) -> Result<()> {
        let scale = 1.0 / (d as f32).sqrt();
        Self::launch(
            dev,
            &self.attn_partial,
            (nh as u32, t as u32, splits as u32),
            128,
            0,
            kargs![q, kcache, vcache, part, nh, nkv, d, pos0, t, scale],
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
        value_heads_tiled: bool,
        eps: f32,
    ) -> Result<()> {
        let tiled = value_heads_tiled as i32;
        Self::launch(
            dev,
            &self.dn_recurrent,
            (hv as u32, (dv / 32) as u32, 1),
            256,
            0,
            kargs![conv_out, b, a, neg_a, dt_bias, state, y, t, hk, hv, dk, dv, tiled],
        )?;
        Self::launch(
            dev,
            &self.dn_gated_norm,
            (hv as u32, t as u32, 1),
            dv.min(1024) as u32,
            0,
            kargs![y, z, normw, hv, dv, eps],
        )
    }

    /// Whether [`Self::dn_prefill`] takes this geometry (dk 16, 32, 64 or 128; dv a multiple of 32).
    pub fn dn_prefill_fits(&self, dk: usize, dv: usize) -> bool {
        dk.is_multiple_of(4) && self.dn_recurrent_tokens.contains_key(&(dk / 4)) && dv.is_multiple_of(32)
    }

    /// GatedDeltaNet over t > 1 tokens: [`Self::dn_conv`] + [`Self::dn_recurrent`] laid out for
    /// many tokens (conv over every token at once, q/k norms, decay and beta precomputed, a warp
    /// per 8 state columns, inputs staged in shared memory 32 tokens at a time). Overwrites the q/k part of `conv_out`, `a` (→ decay) and `b` (→ beta).
    #[allow(clippy::too_many_arguments)]
    pub fn dn_prefill(
        &self,
        dev: &CudaDevice,
        (qkv, conv_state, convw, conv_out): (u64, u64, u64, u64),
        (z, b, a, neg_a, dt_bias, normw): (u64, u64, u64, u64, u64, u64),
        state: u64,
        y: u64,
        t: usize,
        (hk, hv, dk, dv, kc): (usize, usize, usize, usize, usize),
        value_heads_tiled: bool,
        eps: f32,
    ) -> Result<()> {
        let conv_dim = 2 * hk * dk + hv * dv;
        Self::launch(
            dev,
            &self.dn_conv_tokens,
            (blocks_for(dev, t * conv_dim), 1, 1),
            256,
            0,
            kargs![qkv, conv_state, convw, conv_out, t, conv_dim, kc],
        )?;
        Self::launch(
            dev,
            &self.dn_conv_state,
            (conv_dim.div_ceil(128) as u32, 1, 1),
            128,
            0,
            kargs![qkv, conv_state, t, conv_dim, kc],
        )?;
        Self::launch(
            dev,
            &self.dn_prep,
            (t as u32, (hk + 1) as u32, 1),
            dk.clamp(32, 256).next_multiple_of(32) as u32,
            0,
            kargs![conv_out, b, a, neg_a, dt_bias, hk, hv, dk, dv],
        )?;
        let f = self
            .dn_recurrent_tokens
            .get(&(dk / 4))
            .ok_or_else(|| CudaError(format!("no token-parallel delta rule for dk {dk}")))?;
        let tiled = value_heads_tiled as i32;
        Self::launch(
            dev,
            f,
            ((hv * dv / 32) as u32, 1, 1),
            128,
            0,
            kargs![conv_out, b, a, state, y, t, hk, hv, dk, dv, tiled],
        )?;
        Self::launch(
            dev,
            &self.dn_gated_norm,
            (hv as u32, t as u32, 1),
            dv.min(1024) as u32,
            0,
            kargs![y, z, normw, hv, dv, eps],
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
        Self::launch(dev, &self.router_topk, (t as u32, 1, 1), 32, 0, kargs![logits, e, k, norm as i32, ids, wts])
    }
}
