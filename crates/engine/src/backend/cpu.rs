//! The CPU backend: every op on host f32 activations, weights read in place from mapped files or
//! fetched expert buffers through the `flashmoe-kernels` matvec/matmul (AVX-512/AVX2/scalar).
//! Activations, norms, softmaxes and the delta-rule state are f32; a pass of T tokens runs each
//! weight matrix once over all T rows (prefill), decode is the same code with T = 1.

use super::{Backend, BackendState, Phase};
use crate::config::{LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::buffer::AlignedBuf;
use crate::experts::{ExpertSet, ExpertWeights};
use crate::layers::{
    AttentionWeights, Convert, DeltaNetWeights, Host, LayerTimes, LogitsFor, MoeWeights, PassInput, PassOutput,
    PassSpec, route_top_k, start_prefetch,
};
use crate::weights::Linear;
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// Per-layer sequence state: the KV cache of an attention layer, or the conv window and the
/// recurrent state of a GatedDeltaNet layer.
#[derive(Clone)]
pub enum LayerState {
    Attention {
        /// [positions, kv_heads, head_dim], RoPE already applied.
        keys: Vec<f32>,
        values: Vec<f32>,
    },
    DeltaNet {
        /// The last Kc−1 raw (pre-conv) qkv projections, oldest first: [Kc−1, conv_dim].
        conv: Vec<f32>,
        /// [value_heads, key_dim, value_dim], f32 as in HF.
        recurrent: Vec<f32>,
    },
}

/// A sequence's caches in host memory.
#[derive(Clone)]
pub struct CpuState {
    pub layers: Vec<LayerState>,
}

impl BackendState for CpuState {
    fn duplicate(&self) -> Self {
        self.clone()
    }

    fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Attention { keys, values } => (keys.capacity() + values.capacity()) * 4,
                LayerState::DeltaNet { conv, recurrent } => (conv.len() + recurrent.len()) * 4,
            })
            .sum()
    }
}

/// The CPU backend (rayon's global pool for the parallel parts).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// One pass on the CPU: [t, hidden] activations and the states it advances (one, or one per
/// sequence of a batch: `segments` says which rows are whose, and at which position).
pub struct CpuPass<'p> {
    spec: &'p PassSpec<'p>,
    states: Vec<&'p mut CpuState>,
    segments: Vec<(usize, usize)>,
    t: usize,
    x: Vec<f32>,
    normed: Vec<f32>,
    mixed: Vec<f32>,
    logits: Vec<f32>,
    /// Per-layer times of this pass (when the hooks want timing) and the last mark.
    times: Vec<LayerTimes>,
    marked: Instant,
}

impl CpuPass<'_> {
    pub fn spec(&self) -> &PassSpec<'_> {
        self.spec
    }
    /// Tokens in this pass.
    pub fn tokens(&self) -> usize {
        self.t
    }
    /// The residual stream, [t, hidden].
    pub fn x(&self) -> &[f32] {
        &self.x
    }
    /// The next op's input, [t, hidden].
    pub fn normed(&self) -> &[f32] {
        &self.normed
    }
    /// The last mixer's output, [t, hidden].
    pub fn mixed(&self) -> &[f32] {
        &self.mixed
    }
    /// The logits computed so far.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

/// Host tensors stay where they are: the CPU computes on the mapped views.
pub struct KeepOnHost;

impl Convert<Host, Host> for KeepOnHost {
    fn mat(&self, m: &Linear) -> Result<Linear> {
        Ok(m.clone())
    }
    fn vec(&self, v: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(v.clone())
    }
    fn experts(&self, _layer: usize, e: &ExpertSet) -> Result<ExpertSet> {
        Ok(e.clone())
    }
}

impl Backend for CpuBackend {
    type T = Host;
    type State = CpuState;
    type Pass<'p> = CpuPass<'p>;

    fn describe(&self) -> String {
        "cpu".into()
    }

    fn upload(&self) -> impl Convert<Host, Host> + '_ {
        KeepOnHost
    }

    fn new_state(&self, c: &ModelConfig) -> Result<CpuState> {
        let layers = c
            .layer_kinds
            .iter()
            .map(|k| match k {
                LayerKind::FullAttention => LayerState::Attention { keys: Vec::new(), values: Vec::new() },
                LayerKind::LinearAttention => LayerState::DeltaNet {
                    conv: vec![0.0; c.conv_kernel.saturating_sub(1) * c.conv_dim()],
                    recurrent: vec![0.0; c.linear_value_heads * c.linear_key_dim * c.linear_value_dim],
                },
            })
            .collect();
        Ok(CpuState { layers })
    }

    fn run(
        &self,
        spec: &PassSpec<'_>,
        state: &mut CpuState,
        graph: &mut dyn for<'p> FnMut(&mut CpuPass<'p>) -> Result<()>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if !spec.batch.is_empty() {
            return Err(Error::input("a batched pass needs one state per sequence (run_batch)"));
        }
        self.run_seqs(spec, vec![state], graph, out)
    }

    fn can_batch(&self) -> bool {
        true
    }

    fn run_batch(
        &self,
        spec: &PassSpec<'_>,
        states: &mut [&mut CpuState],
        graph: &mut dyn for<'p> FnMut(&mut CpuPass<'p>) -> Result<()>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if spec.batch.len() != states.len() || spec.tokens.len() != states.len() {
            return Err(Error::input(format!(
                "a batched pass of {} tokens got {} positions and {} states",
                spec.tokens.len(),
                spec.batch.len(),
                states.len()
            )));
        }
        self.run_seqs(spec, states.iter_mut().map(|s| &mut **s).collect(), graph, out)
    }

    fn embed(&self, p: &mut CpuPass<'_>, table: &Linear) -> Result<()> {
        let h = p.spec.cfg.hidden_size;
        for (i, &id) in p.spec.tokens.iter().enumerate() {
            table.row(id as usize, &mut p.x[i * h..(i + 1) * h]);
        }
        Ok(())
    }

    fn rms_norm(&self, p: &mut CpuPass<'_>, w: &Vec<f32>) -> Result<()> {
        rms_norm_rows(&p.x, w, p.spec.cfg.rms_norm_eps, &mut p.normed);
        Ok(())
    }

    fn attention(
        &self,
        p: &mut CpuPass<'_>,
        layer: usize,
        w: &AttentionWeights<Host>,
        inv_freq: &Vec<f32>,
    ) -> Result<()> {
        let mut seqs = Vec::with_capacity(p.states.len());
        for (st, &(rows, pos0)) in p.states.iter_mut().zip(&p.segments) {
            let LayerState::Attention { keys, values } = &mut st.layers[layer] else {
                return Err(state_mismatch(layer));
            };
            seqs.push(AttnSeq { rows, pos0, keys, values });
        }
        p.mixed = attention(p.spec.cfg, w, inv_freq, &p.normed, p.t, &mut seqs);
        Ok(())
    }

    fn delta_net(&self, p: &mut CpuPass<'_>, layer: usize, w: &DeltaNetWeights<Host>) -> Result<()> {
        let mut seqs = Vec::with_capacity(p.states.len());
        for (st, &(rows, _)) in p.states.iter_mut().zip(&p.segments) {
            let LayerState::DeltaNet { conv, recurrent } = &mut st.layers[layer] else {
                return Err(state_mismatch(layer));
            };
            seqs.push((rows, conv.as_mut_slice(), recurrent.as_mut_slice()));
        }
        p.mixed = delta_net(p.spec.cfg, w, &p.normed, p.t, &mut seqs);
        Ok(())
    }

    fn add_rms_norm(&self, p: &mut CpuPass<'_>, w: &Vec<f32>) -> Result<()> {
        for (xv, m) in p.x.iter_mut().zip(&p.mixed) {
            *xv += m;
        }
        rms_norm_rows(&p.x, w, p.spec.cfg.rms_norm_eps, &mut p.normed);
        Ok(())
    }

    fn prefetch(&self, p: &mut CpuPass<'_>, layer: usize, w: &MoeWeights<Host>) -> Result<()> {
        // The residual stream changes little between adjacent layers: layer l+1's router on
        // layer l's post-attention state guesses l+1's experts.
        let ExpertSet::Streamed { store, layer: sl } = &w.experts else { return Ok(()) };
        let logits = w.router.apply(&p.normed, 1);
        start_prefetch(p.spec.hooks, layer, &logits, p.spec.experts_per_token, store, *sl);
        Ok(())
    }

    fn moe(&self, p: &mut CpuPass<'_>, layer: usize, w: &MoeWeights<Host>, next_norm: Option<&Vec<f32>>) -> Result<()> {
        let (out, lt) = moe(p.spec, w, &p.normed, p.t, layer)?;
        for (xv, m) in p.x.iter_mut().zip(&out) {
            *xv += m;
        }
        // A NaN or Inf in the weights (or an overflow) would otherwise run on as fluent garbage;
        // the residual stream carries it from wherever it appeared, so one check per layer
        // names the first layer that produced it.
        if let Some(i) = p.x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "layer {layer}: non-finite activation ({} at token {} of the pass, element {}) by the end of the layer: the checkpoint holds NaN/Inf weights or the activations overflowed",
                p.x[i],
                i / p.spec.cfg.hidden_size,
                i % p.spec.cfg.hidden_size
            )));
        }
        if let Some(n) = next_norm {
            rms_norm_rows(&p.x, n, p.spec.cfg.rms_norm_eps, &mut p.normed);
        }
        if let Some(t) = p.times.get_mut(layer) {
            t.router += lt.router;
            t.io_wait += lt.io_wait;
            t.experts += lt.experts;
        }
        Ok(())
    }

    fn logits(&self, p: &mut CpuPass<'_>, lm_head: &Linear) -> Result<()> {
        let h = p.spec.cfg.hidden_size;
        let rows: &[f32] = match p.spec.want {
            LogitsFor::None => return Ok(()),
            LogitsFor::All => &p.normed,
            LogitsFor::Last => &p.normed[(p.t - 1) * h..],
        };
        let n = rows.len() / h;
        p.logits.clear();
        p.logits.resize(n * lm_head.rows(), 0.0);
        lm_head.forward(rows, n, &mut p.logits);
        Ok(())
    }

    fn mark(&self, p: &mut CpuPass<'_>, layer: usize, phase: Phase) {
        let now = Instant::now();
        let secs = now.duration_since(p.marked).as_secs_f64();
        p.marked = now;
        let Some(t) = p.times.get_mut(layer) else { return };
        match phase {
            Phase::LayerStart => {}
            Phase::Mixed => t.mixer += secs,
            // What the MoE op did not account for (residual adds, norms, bookkeeping).
            Phase::LayerEnd => t.other += (secs - (t.router + t.io_wait + t.experts)).max(0.0),
        }
    }
}

impl CpuBackend {
    /// One pass over `states` (one per segment of `spec`).
    fn run_seqs<'s>(
        &self,
        spec: &PassSpec<'_>,
        states: Vec<&'s mut CpuState>,
        graph: &mut dyn for<'p> FnMut(&mut CpuPass<'p>) -> Result<()>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let t = spec.tokens.len();
        let h = spec.cfg.hidden_size;
        let timing = spec.hooks.wants_timing();
        let x = match spec.input {
            PassInput::Hidden(rows) if rows.len() != t * h => {
                return Err(Error::input(format!(
                    "a pipeline stage got {} floats of residual stream for {t} tokens of {h}",
                    rows.len()
                )));
            }
            PassInput::Hidden(rows) => rows.to_vec(),
            PassInput::Embed => vec![0.0; t * h],
            PassInput::HiddenOnDevice => return Err(Error::input("the CPU backend has no device hand-off buffer")),
        };
        let mut p = CpuPass {
            spec,
            states,
            segments: spec.segments(),
            t,
            x,
            normed: vec![0.0; t * h],
            mixed: Vec::new(),
            // The caller's vector, reused (no fresh 1 MB allocation per decode step).
            logits: {
                out.clear();
                std::mem::take(out)
            },
            times: if timing { vec![LayerTimes::default(); spec.cfg.num_layers] } else { Vec::new() },
            marked: Instant::now(),
        };
        graph(&mut p)?;
        for (li, lt) in p.times.iter().enumerate() {
            spec.hooks.layer_times(li, lt);
        }
        *out = match spec.output {
            PassOutput::Logits => std::mem::take(&mut p.logits),
            PassOutput::Hidden => std::mem::take(&mut p.x),
            PassOutput::HiddenOnDevice => return Err(Error::input("the CPU backend has no device hand-off buffer")),
        };
        Ok(())
    }
}

fn state_mismatch(layer: usize) -> Error {
    Error::input(format!("layer {layer}: the sequence state does not match the layer kind (a state of another model?)"))
}

/// Work below this many multiply-adds stays on the calling thread: rayon's hand-off costs more
/// than it saves on tiny models.
const PAR_THRESHOLD: usize = 1 << 16;

pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let inv = inv_rms(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let var = (ss / x.len() as f64) as f32;
    1.0 / (var + eps).sqrt()
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// torch.nn.functional.softplus with its default threshold of 20.
#[inline]
fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorise; the order differs from a plain
    // loop by rounding only.
    let mut acc = [0.0f32; 8];
    let n = a.len() / 8 * 8;
    for (ca, cb) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// One sequence's rows of an attention pass: `rows` consecutive rows from position `pos0`, and
/// its KV cache.
struct AttnSeq<'a> {
    rows: usize,
    pos0: usize,
    keys: &'a mut Vec<f32>,
    values: &'a mut Vec<f32>,
}

/// Gated attention over `t` rows: the projections over all of them at once, then each sequence's
/// rows against its own cache, then o_proj over all of them.
fn attention(
    c: &ModelConfig,
    a: &AttentionWeights<Host>,
    inv_freq: &[f32],
    hs: &[f32],
    t: usize,
    seqs: &mut [AttnSeq<'_>],
) -> Vec<f32> {
    let (nh, d) = (c.num_heads, c.head_dim);
    let [qg, mut k, v] = Linear::apply_many([&a.q_proj, &a.k_proj, &a.v_proj], hs, t);
    let (qw, kvw) = (nh * d, c.num_kv_heads * d);
    let mut out = vec![0.0f32; t * qw];
    let mut r0 = 0;
    for s in seqs.iter_mut() {
        let r = r0..r0 + s.rows;
        attend(
            c,
            a,
            inv_freq,
            (&qg[r.start * 2 * qw..r.end * 2 * qw], &mut k[r.start * kvw..r.end * kvw], &v[r.start * kvw..r.end * kvw]),
            s,
            &mut out[r.start * qw..r.end * qw],
        );
        r0 = r.end;
    }
    a.o_proj.apply(&out, t)
}

/// One sequence's attention: q/k norms and RoPE on its projected rows, the keys and values
/// appended to its cache, causal GQA softmax attention and the sigmoid gate, into `out`.
fn attend(
    c: &ModelConfig,
    a: &AttentionWeights<Host>,
    inv_freq: &[f32],
    (qg, k, v): (&[f32], &mut [f32], &[f32]),
    s: &mut AttnSeq<'_>,
    out: &mut [f32],
) {
    let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let eps = c.rms_norm_eps;
    let (t, pos0) = (s.rows, s.pos0);
    // q_proj rows are interleaved per head: [q_h (D); gate_h (D)].
    let mut q = vec![0.0f32; t * nh * d];
    let mut gate = vec![0.0f32; t * nh * d];
    for ti in 0..t {
        for j in 0..nh {
            let src = &qg[ti * 2 * nh * d + j * 2 * d..][..2 * d];
            let dst = ti * nh * d + j * d;
            let inv = inv_rms(&src[..d], eps);
            for i in 0..d {
                q[dst + i] = src[i] * inv * a.q_norm[i];
            }
            gate[dst..dst + d].copy_from_slice(&src[d..]);
            rope(inv_freq, &mut q[dst..dst + d], pos0 + ti);
        }
        for m in 0..nkv {
            let kh = &mut k[ti * nkv * d + m * d..][..d];
            let inv = inv_rms(kh, eps);
            for (x, &w) in kh.iter_mut().zip(&a.k_norm) {
                *x = *x * inv * w;
            }
            rope(inv_freq, kh, pos0 + ti);
        }
    }
    s.keys.extend_from_slice(k);
    s.values.extend_from_slice(v);

    let group = nh / nkv;
    let scale = 1.0 / (d as f32).sqrt();
    let keys = &s.keys[..];
    let values = &s.values[..];
    let head = |idx: usize, o: &mut [f32]| {
        let (ti, j) = (idx / nh, idx % nh);
        let kvh = j / group;
        let len = pos0 + ti + 1;
        let qh = &q[idx * d..][..d];
        let mut scores: Vec<f32> = (0..len).map(|s| dot(qh, &keys[(s * nkv + kvh) * d..][..d]) * scale).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (s, &p) in scores.iter().enumerate() {
            let p = p * inv;
            let vh = &values[(s * nkv + kvh) * d..][..d];
            for (ov, &vv) in o.iter_mut().zip(vh) {
                *ov += p * vv;
            }
        }
        let g = &gate[idx * d..][..d];
        for (ov, &gv) in o.iter_mut().zip(g) {
            *ov *= sigmoid(gv);
        }
    };
    let work = t * nh * (pos0 + t) * d;
    if work >= PAR_THRESHOLD {
        out.par_chunks_mut(d).enumerate().for_each(|(idx, o)| head(idx, o));
    } else {
        out.chunks_mut(d).enumerate().for_each(|(idx, o)| head(idx, o));
    }
}

/// Rotate-half RoPE on the first `rotary_dims` of one head (spec §3.3 step 4).
fn rope(inv_freq: &[f32], x: &mut [f32], pos: usize) {
    let half = inv_freq.len();
    // Angles in f32 like HF (position × inv_freq), so long positions round the same way.
    let p = pos as f32;
    for i in 0..half {
        let ang = p * inv_freq[i];
        let (sin, cos) = ang.sin_cos();
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * cos - x2 * sin;
        x[i + half] = x2 * cos + x1 * sin;
    }
}

/// GatedDeltaNet over `t` rows (`seqs`: each sequence's rows, conv window and recurrent state,
/// in row order): the projections over all rows at once; the causal conv, its SiLU and the q/k
/// normalization of every row at once (each row reads only the previous `conv_kernel - 1`
/// inputs); then the recurrence as one task per (sequence, value head) that walks that
/// sequence's rows in order with the head's state in cache; out_proj over all rows. One parallel
/// region each, where stepping the rows one by one took a fork-join per row (a 512-token prefill
/// on 16 cores spent ≈ 0.33 ms per row, mostly in the joins). Every value is computed by the same
/// operations in the same order as row by row.
fn delta_net(
    c: &ModelConfig,
    w: &DeltaNetWeights<Host>,
    hs: &[f32],
    t: usize,
    seqs: &mut [(usize, &mut [f32], &mut [f32])],
) -> Vec<f32> {
    let (hk, hv, dk, dv) = (c.linear_key_heads, c.linear_value_heads, c.linear_key_dim, c.linear_value_dim);
    let (key_dim, conv_dim, kc) = (c.key_dim(), c.conv_dim(), c.conv_kernel);
    let eps = c.rms_norm_eps;
    let [qkv, z, b, a] = Linear::apply_many([&w.in_qkv, &w.in_z, &w.in_b, &w.in_a], hs, t);
    let q_scale = 1.0 / (dk as f32).sqrt();
    assert_eq!(seqs.iter().map(|s| s.0).sum::<usize>(), t, "the sequences' rows add up to the pass's");

    // Causal depthwise conv over [state rows..., the sequence's rows], SiLU, then q and k
    // normalized per head: every row at once, each sequence with its own conv state.
    let mut conv_out = vec![0.0f32; t * conv_dim];
    let mut row0 = 0;
    for (rows, conv_state, _) in seqs.iter_mut() {
        let rows = *rows;
        let input = &qkv[row0 * conv_dim..(row0 + rows) * conv_dim];
        let state = &**conv_state;
        let keep = kc - 1;
        let row = |(p, out): (usize, &mut [f32])| {
            // Tap j reads time p + j - keep: the state's row p + j while that is negative
            // (j < keep - p), the input's row p + j - keep after.
            let from_state = keep.saturating_sub(p);
            for (ch, o) in out.iter_mut().enumerate() {
                let wk = &w.conv[ch * kc..][..kc];
                let mut u = 0.0f32;
                for j in 0..from_state {
                    u += wk[j] * state[(p + j) * conv_dim + ch];
                }
                for j in from_state..keep {
                    u += wk[j] * input[(p + j - keep) * conv_dim + ch];
                }
                u += wk[keep] * input[p * conv_dim + ch];
                *o = silu(u);
            }
            let (qs, rest) = out.split_at_mut(key_dim);
            let ks = &mut rest[..key_dim];
            for hh in 0..hk {
                l2_normalize(&mut qs[hh * dk..][..dk], q_scale);
                l2_normalize(&mut ks[hh * dk..][..dk], 1.0);
            }
        };
        let out = &mut conv_out[row0 * conv_dim..(row0 + rows) * conv_dim];
        if rows * conv_dim * kc >= PAR_THRESHOLD {
            out.par_chunks_mut(conv_dim).enumerate().for_each(row);
        } else {
            out.chunks_mut(conv_dim).enumerate().for_each(row);
        }
        if kc > 1 {
            // The state becomes the last kc - 1 inputs of [state, rows].
            if rows >= keep {
                conv_state[..keep * conv_dim].copy_from_slice(&input[(rows - keep) * conv_dim..]);
            } else {
                conv_state.copy_within(rows * conv_dim..keep * conv_dim, 0);
                conv_state[(keep - rows) * conv_dim..keep * conv_dim].copy_from_slice(input);
            }
        }
        row0 += rows;
    }

    // The recurrence: one task per (sequence, value head), its rows in order.
    let mut y = vec![0.0f32; t * hv * dv];
    // Each task writes only its own head's dv values of each of its rows.
    let yp = flashmoe_kernels::SyncPtr(y.as_mut_ptr());
    let conv_out = &conv_out;
    let head_rows = |(row0, rows, h, s): (usize, usize, usize, &mut [f32])| {
        let key_head = w.key_head(h, hk, hv);
        let mut m = vec![0.0f32; dv];
        for ti in row0..row0 + rows {
            let cur = &conv_out[ti * conv_dim..][..conv_dim];
            let (qs, rest) = cur.split_at(key_dim);
            let (ks, vs) = rest.split_at(key_dim);
            // SAFETY: row ti's head h, dv values inside y ([t, hv·dv]); only this task writes them.
            let o = unsafe { std::slice::from_raw_parts_mut(yp.get().add(ti * hv * dv + h * dv), dv) };
            let g = w.neg_a[h] * softplus(a[ti * hv + h] + w.dt_bias[h]);
            let decay = g.exp();
            let beta = sigmoid(b[ti * hv + h]);
            let kh = &ks[key_head * dk..][..dk];
            let qh = &qs[key_head * dk..][..dk];
            let vh = &vs[h * dv..][..dv];
            // Decay first, then read m = Sᵀk from the decayed state.
            m.fill(0.0);
            for i in 0..dk {
                let row = &mut s[i * dv..][..dv];
                let ki = kh[i];
                for (sv, mv) in row.iter_mut().zip(m.iter_mut()) {
                    *sv *= decay;
                    *mv += *sv * ki;
                }
            }
            for (mv, &vv) in m.iter_mut().zip(vh) {
                *mv = beta * (vv - *mv);
            }
            // Rank-1 write, then read the output from the updated state.
            o.fill(0.0);
            for i in 0..dk {
                let row = &mut s[i * dv..][..dv];
                let (ki, qi) = (kh[i], qh[i]);
                for ((sv, &dl), ov) in row.iter_mut().zip(&m).zip(o.iter_mut()) {
                    *sv += ki * dl;
                    *ov += *sv * qi;
                }
            }
            // Gated RMSNorm per value head: RMS(o)·w·silu(z).
            let inv = inv_rms(o, eps);
            let zh = &z[ti * hv * dv + h * dv..][..dv];
            for ((ov, &nw), &zv) in o.iter_mut().zip(&w.norm).zip(zh) {
                *ov = *ov * inv * nw * silu(zv);
            }
        }
    };
    let mut tasks: Vec<(usize, usize, usize, &mut [f32])> = Vec::with_capacity(seqs.len() * hv);
    let mut row0 = 0;
    for (rows, _, s_all) in seqs.iter_mut() {
        for (h, s) in s_all.chunks_mut(dk * dv).take(hv).enumerate() {
            tasks.push((row0, *rows, h, s));
        }
        row0 += *rows;
    }
    if t * hv * dk * dv >= PAR_THRESHOLD {
        tasks.into_par_iter().for_each(head_rows);
    } else {
        tasks.into_iter().for_each(head_rows);
    }
    w.out_proj.apply(&y, t)
}

fn moe(
    spec: &PassSpec<'_>,
    m: &MoeWeights<Host>,
    hs: &[f32],
    t: usize,
    layer: usize,
) -> Result<(Vec<f32>, LayerTimes)> {
    let mut lt = LayerTimes::default();
    let t_router = Instant::now();
    let c = spec.cfg;
    let (h, e) = (c.hidden_size, c.num_experts);
    let k = spec.experts_per_token;
    let logits = m.router.apply(hs, t);
    let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
    let mut idx = Vec::with_capacity(e);
    let report = spec.hooks.wants_routing();
    for ti in 0..t {
        let (top, wts) = route_top_k(&logits[ti * e..][..e], k, c.norm_topk_prob, &mut idx);
        for (&x, &wt) in top.iter().zip(&wts) {
            per_expert[x].push((ti, wt));
        }
        if report {
            let ids: Vec<u32> = top.iter().map(|&x| x as u32).collect();
            spec.hooks.routing(layer, spec.pos0 + ti, &ids);
        }
    }
    let chosen: Vec<usize> = (0..e).filter(|&x| !per_expert[x].is_empty()).collect();
    lt.router = t_router.elapsed().as_secs_f64();

    let shared_job = || MlpJob { gate: &m.shared.gate, up: &m.shared.up, down: &m.shared.down, xs: hs, n: t };
    // The shared expert's output, gated by sigmoid(shared_gate·x).
    let gate_shared = |mut ys: Vec<f32>| {
        let sg = m.shared_gate.apply(hs, t);
        let gate_row = |(ti, row): (usize, &mut [f32])| {
            let s = sigmoid(sg[ti]);
            for v in row {
                *v *= s;
            }
        };
        if t * h >= PAR_THRESHOLD {
            ys.par_chunks_mut(h).enumerate().for_each(gate_row);
        } else {
            ys.chunks_mut(h).enumerate().for_each(gate_row);
        }
        ys
    };
    // The shared expert needs no routed weights: compute it while the routed ones are read.
    let shared = || {
        let t0 = Instant::now();
        let ys = gate_shared(mlps_forward(&[shared_job()]).pop().expect("one job, one output"));
        (ys, t0.elapsed().as_secs_f64())
    };
    let t_phase = Instant::now();
    let mut routed = vec![0.0f32; t * h];
    // Runs the routed experts `ids` (buffers `bufs` when streamed), and the shared expert when
    // `with_shared`, as one batch over their tokens (two parallel regions in all, see
    // `mlps_forward`), and adds the routed outputs, weighted, into `routed` in `chosen` order so
    // that results do not depend on chunking. Returns the shared expert's ungated output when
    // asked for, and the compute time.
    let run_experts = |ids: &[usize],
                       bufs: Option<&[Arc<AlignedBuf>]>,
                       with_shared: bool,
                       routed: &mut Vec<f32>|
     -> Result<(Option<Vec<f32>>, f64)> {
        let t0 = Instant::now();
        let streamed: Vec<ExpertWeights> = match (&m.experts, bufs) {
            (ExpertSet::Resident(_), _) => Vec::new(),
            (ExpertSet::Streamed { store, layer }, Some(bufs)) => {
                bufs.iter().take(ids.len()).map(|b| store.expert_weights(*layer, b.clone())).collect::<Result<_>>()?
            }
            _ => unreachable!("streamed experts come with their buffers"),
        };
        // Each expert's tokens' rows; with every token routed to it (decode), `hs` itself.
        // (Gathered in parallel for a prefill: thousands of rows.)
        let gather = |&ei: &usize| -> Vec<f32> {
            let toks = &per_expert[ei];
            if toks.len() == t {
                Vec::new()
            } else {
                toks.iter().flat_map(|&(ti, _)| &hs[ti * h..][..h]).copied().collect()
            }
        };
        let big = t * k * h >= PAR_THRESHOLD;
        let xs: Vec<Vec<f32>> =
            if big { ids.par_iter().map(gather).collect() } else { ids.iter().map(gather).collect() };
        let mut jobs: Vec<MlpJob> = ids
            .iter()
            .enumerate()
            .map(|(j, &ei)| {
                let ex = match &m.experts {
                    ExpertSet::Resident(v) => &v[ei],
                    ExpertSet::Streamed { .. } => &streamed[j],
                };
                let n = per_expert[ei].len();
                let x: &[f32] = if n == t { hs } else { &xs[j] };
                MlpJob { gate: &ex.gate, up: &ex.up, down: &ex.down, xs: x, n }
            })
            .collect();
        if with_shared {
            jobs.push(shared_job());
        }
        let mut ys = mlps_forward(&jobs);
        let shared_out = if with_shared { ys.pop() } else { None };
        // Each token's row adds its experts' weighted outputs in `ids` order (so every element
        // sums in the same order whether the rows run in parallel or not).
        let mut contributions: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); t];
        for (j, &ei) in ids.iter().enumerate() {
            for (r, &(ti, wgt)) in per_expert[ei].iter().enumerate() {
                contributions[ti].push((j, r, wgt));
            }
        }
        let add_row = |(ti, row): (usize, &mut [f32])| {
            for &(j, r, wgt) in &contributions[ti] {
                for (o, &v) in row.iter_mut().zip(&ys[j][r * h..][..h]) {
                    *o += wgt * v;
                }
            }
        };
        if big {
            routed.par_chunks_mut(h).enumerate().for_each(add_row);
        } else {
            routed.chunks_mut(h).enumerate().for_each(add_row);
        }
        Ok((shared_out, t0.elapsed().as_secs_f64()))
    };
    // The routed experts and the shared one as one batch (two parallel regions for the layer's
    // experts), its output gated: the whole phase when nothing has to be read.
    let one_batch = |bufs: Option<&[Arc<AlignedBuf>]>, routed: &mut Vec<f32>| -> Result<(Vec<f32>, f64)> {
        let (ys, r) = run_experts(&chosen, bufs, true, routed)?;
        let t0 = Instant::now();
        let ys = gate_shared(ys.expect("asked for the shared expert"));
        Ok((ys, r + t0.elapsed().as_secs_f64()))
    };
    let (mut out, compute_secs) = match &m.experts {
        ExpertSet::Resident(_) => one_batch(None, &mut routed)?,
        // Every chosen expert already in the RAM tier (a decode step once the tier is warm):
        // nothing to overlap with reads. (If one was evicted since the check, the fetch reads
        // it: slower, same result. The fetch's time counts as I/O wait below, as everything
        // outside the compute does.)
        ExpertSet::Streamed { store, layer }
            if chosen.len() <= spec.fetch_chunk.max(1) && chosen.iter().all(|&x| store.in_ram(*layer, x)) =>
        {
            one_batch(Some(&store.fetch(*layer, &chosen)?), &mut routed)?
        }
        ExpertSet::Streamed { store, layer } => {
            // At most `fetch_chunk` expert buffers alive at once (bounded memory for big
            // prefills); chunk i+1 is read while chunk i computes, and the first read overlaps
            // the shared expert.
            let chunks: Vec<&[usize]> = chosen.chunks(spec.fetch_chunk.max(1)).collect();
            let first = chunks.first().copied().unwrap_or(&[]);
            let (cur, (ys, sh)) = rayon::join(|| store.fetch(*layer, first), shared);
            let mut cur = cur?;
            let mut compute = sh;
            for ci in 0..chunks.len() {
                let next_ids = chunks.get(ci + 1).copied();
                let (next, r) = rayon::join(
                    || next_ids.map(|ids| store.fetch(*layer, ids)).transpose(),
                    || run_experts(chunks[ci], Some(&cur), false, &mut routed),
                );
                compute += r?.1;
                cur = next?.unwrap_or_default();
            }
            (ys, compute)
        }
    };
    // Routed sum first, then the shared expert, as HF adds them.
    // (f32 addition is commutative, so this is exactly routed + shared.)
    for (o, &r) in out.iter_mut().zip(&routed) {
        *o += r;
    }
    lt.experts = compute_secs;
    // Whatever the expert phase took beyond its compute was spent waiting for reads.
    lt.io_wait = (t_phase.elapsed().as_secs_f64() - compute_secs).max(0.0);
    Ok((out, lt))
}

/// down·(silu(gate·x) ⊙ up·x) for n inputs.
pub fn expert_forward(ex: &ExpertWeights, xs: &[f32], n: usize) -> Vec<f32> {
    mlps_forward(&[MlpJob { gate: &ex.gate, up: &ex.up, down: &ex.down, xs, n }]).pop().expect("one job, one output")
}

/// One gated MLP of a batch: down·(silu(gate·x) ⊙ up·x) for the `n` inputs `xs` ([n, cols]).
pub struct MlpJob<'a> {
    pub gate: &'a Linear,
    pub up: &'a Linear,
    pub down: &'a Linear,
    pub xs: &'a [f32],
    pub n: usize,
}

/// Runs gated MLPs (the routed experts of a layer, the shared expert) together: the gate and up
/// projections of all of them as one kernel batch, then all the down projections as another,
/// i.e. two parallel regions for a layer's experts instead of three per expert (a 35B-A3B
/// expert matrix is 0.5 MB, a few microseconds per core on 16 cores, about what a fork-join
/// costs). Returns each MLP's [n, down rows] output, the same values it would give alone.
pub fn mlps_forward(jobs: &[MlpJob]) -> Vec<Vec<f32>> {
    let mut g: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0.0; j.n * j.gate.rows()]).collect();
    let mut u: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0.0; j.n * j.up.rows()]).collect();
    let mut mats = Vec::with_capacity(2 * jobs.len());
    for ((j, gj), uj) in jobs.iter().zip(g.iter_mut()).zip(u.iter_mut()) {
        j.gate.push_jobs(j.xs, j.n, gj, &mut mats);
        j.up.push_jobs(j.xs, j.n, uj, &mut mats);
    }
    flashmoe_kernels::matmul_batch(&mut mats);
    drop(mats);
    let swiglu = |(gj, uj): (&mut Vec<f32>, &Vec<f32>)| {
        for (gv, &uv) in gj.iter_mut().zip(uj) {
            *gv = silu(*gv) * uv;
        }
    };
    if g.iter().map(Vec::len).sum::<usize>() >= PAR_THRESHOLD {
        g.par_iter_mut().zip(&u).for_each(swiglu);
    } else {
        g.iter_mut().zip(&u).for_each(swiglu);
    }
    let mut out: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0.0; j.n * j.down.rows()]).collect();
    let mut mats = Vec::with_capacity(jobs.len());
    for ((j, gj), oj) in jobs.iter().zip(&g).zip(out.iter_mut()) {
        j.down.push_jobs(gj, j.n, oj, &mut mats);
    }
    flashmoe_kernels::matmul_batch(&mut mats);
    out
}

/// x ← x·scale / sqrt(Σx² + 1e-6) (FLA/HF `l2norm`, eps inside the root).
fn l2_normalize(x: &mut [f32], scale: f32) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let inv = 1.0 / ((ss as f32) + 1e-6).sqrt();
    for v in x.iter_mut() {
        *v = *v * inv * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::{MlpJob, mlps_forward};
    use crate::weights::Linear;
    use crate::weights::store::{ByteSource, Bytes, RawTensor};
    use safetensors::Dtype;
    use std::sync::Arc;

    struct Owned(Vec<u8>);
    impl ByteSource for Owned {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
    }

    /// An f32 [rows, cols] Linear of deterministic pseudo-random values, and the values.
    fn linear(rows: usize, cols: usize, seed: u64) -> (Linear, Vec<f32>) {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let vals: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 0.2 - 0.1
            })
            .collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let len = bytes.len();
        let t = RawTensor {
            name: format!("w{seed}"),
            dtype: Dtype::F32,
            shape: vec![rows, cols],
            bytes: Bytes::new(Arc::new(Owned(bytes)), 0, len),
            file: "test".into(),
        };
        (Linear::float(&t, rows, cols).unwrap(), vals)
    }

    fn matvec_f64(w: &[f32], cols: usize, x: &[f64]) -> Vec<f64> {
        w.chunks_exact(cols).map(|r| r.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum()).collect()
    }

    /// Several MLPs in one batch (one input and three, a gate made of two stored row ranges, as
    /// `concat_rows` builds) against an f64 recomputation of down·(silu(gate·x) ⊙ up·x).
    #[test]
    fn mlps_forward_matches_f64() {
        let (h, i) = (256, 96);
        let (g1a, v1a) = linear(40, h, 1);
        let (g1b, v1b) = linear(i - 40, h, 2);
        let gate1 = Linear::concat_rows(&[g1a, g1b]);
        let gate1_vals: Vec<f32> = v1a.into_iter().chain(v1b).collect();
        let (up1, vu1) = linear(i, h, 3);
        let (down1, vd1) = linear(h, i, 4);
        let (gate2, vg2) = linear(i, h, 5);
        let (up2, vu2) = linear(i, h, 6);
        let (down2, vd2) = linear(h, i, 7);
        let xs: Vec<f32> = (0..3 * h).map(|k| ((k * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let cases = [
            (&gate1, &gate1_vals, &up1, &vu1, &down1, &vd1, 1usize),
            (&gate1, &gate1_vals, &up1, &vu1, &down1, &vd1, 3),
            (&gate2, &vg2, &up2, &vu2, &down2, &vd2, 3),
            (&gate2, &vg2, &up2, &vu2, &down2, &vd2, 1),
        ];
        let jobs: Vec<MlpJob> = cases
            .iter()
            .map(|&(g, _, u, _, d, _, n)| MlpJob { gate: g, up: u, down: d, xs: &xs[..n * h], n })
            .collect();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let outs = pool.install(|| mlps_forward(&jobs));
            for (c, (&(_, vg, _, vu, _, vd, n), out)) in cases.iter().zip(&outs).enumerate() {
                assert_eq!(out.len(), n * h);
                for t in 0..n {
                    let x: Vec<f64> = xs[t * h..(t + 1) * h].iter().map(|&v| v as f64).collect();
                    let g = matvec_f64(vg, h, &x);
                    let u = matvec_f64(vu, h, &x);
                    let a: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
                    let want = matvec_f64(vd, i, &a);
                    for (r, (&got, &w)) in out[t * h..(t + 1) * h].iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "case {c} t {t} row {r}: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
