//! The forward pass (spec §3), for a batch of T consecutive tokens of one sequence. Prefill runs
//! the whole prompt as one batch per layer (each weight matrix, routed experts included, is read
//! once for all tokens); decode is the same code with T = 1. Activations, norms, softmaxes and the
//! delta-rule state are f32.

use super::Model;
use super::weights::{AttentionWeights, DeltaNetWeights, ExpertSet, ExpertWeights, LayerWeights, Mixer, MoeWeights};
use crate::error::Result;
use crate::experts::buffer::AlignedBuf;
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// Seconds spent in each part of one layer (accumulated over calls when timing is on).
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerTimes {
    /// Attention or GatedDeltaNet.
    pub mixer: f64,
    pub router: f64,
    /// Blocked on expert reads after the shared expert was done.
    pub io_wait: f64,
    /// Shared and routed expert compute.
    pub experts: f64,
    /// Norms, residuals, bookkeeping.
    pub other: f64,
}

impl LayerTimes {
    pub fn add(&mut self, o: &LayerTimes) {
        self.mixer += o.mixer;
        self.router += o.router;
        self.io_wait += o.io_wait;
        self.experts += o.experts;
        self.other += o.other;
    }
    pub fn total(&self) -> f64 {
        self.mixer + self.router + self.io_wait + self.experts + self.other
    }
}

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

/// Everything a sequence carries between calls.
#[derive(Clone)]
pub struct SequenceState {
    /// Number of tokens already processed (the position of the next token).
    pub pos: usize,
    pub layers: Vec<LayerState>,
    /// The GPU copy of the caches, authoritative when present (GPU models).
    #[cfg(feature = "cuda")]
    pub(crate) dev: Option<crate::cuda::model::DevSeqState>,
}

impl SequenceState {
    /// Bytes held by caches and states (on the GPU when the state lives there).
    pub fn bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.dev {
            return d.bytes();
        }
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Attention { keys, values } => (keys.capacity() + values.capacity()) * 4,
                LayerState::DeltaNet { conv, recurrent } => (conv.len() + recurrent.len()) * 4,
            })
            .sum()
    }
}

/// Which positions need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    All,
    Last,
    None,
}

/// Work below this many multiply-adds stays on the calling thread: rayon's hand-off costs more
/// than it saves on tiny models.
const PAR_THRESHOLD: usize = 1 << 16;

pub(super) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
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

impl Model {
    pub(super) fn layer_forward(
        &self,
        li: usize,
        x: &mut [f32],
        t: usize,
        pos0: usize,
        state: &mut LayerState,
    ) -> Result<()> {
        let start = Instant::now();
        let lw: &LayerWeights = &self.weights.layers[li];
        let h = self.config.hidden_size;
        let eps = self.config.rms_norm_eps;
        let mut normed = vec![0.0f32; t * h];
        rms_norm_rows(x, &lw.input_norm, eps, &mut normed);
        let mixer_start = Instant::now();
        let mixed = match (&lw.mixer, state) {
            (Mixer::Attention(a), LayerState::Attention { keys, values }) => {
                self.attention(a, &normed, t, pos0, keys, values)
            }
            (Mixer::DeltaNet(d), LayerState::DeltaNet { conv, recurrent }) => {
                self.delta_net(d, &normed, t, conv, recurrent)
            }
            _ => unreachable!("layer state does not match layer kind"),
        };
        let mixer_secs = mixer_start.elapsed().as_secs_f64();
        for (xv, m) in x.iter_mut().zip(&mixed) {
            *xv += m;
        }
        rms_norm_rows(x, &lw.post_attention_norm, eps, &mut normed);
        if self.prefetch && t == 1 {
            self.prefetch_next_layer(li, &normed);
        }
        let (moe, mut lt) = self.moe(&lw.moe, &normed, t, li, pos0)?;
        for (xv, m) in x.iter_mut().zip(&moe) {
            *xv += m;
        }
        if let Some(timings) = &self.timings {
            lt.mixer = mixer_secs;
            let total = start.elapsed().as_secs_f64();
            lt.other = (total - lt.mixer - lt.router - lt.io_wait - lt.experts).max(0.0);
            timings.lock().unwrap()[li].add(&lt);
        }
        Ok(())
    }

    fn attention(
        &self,
        a: &AttentionWeights,
        hs: &[f32],
        t: usize,
        pos0: usize,
        keys: &mut Vec<f32>,
        values: &mut Vec<f32>,
    ) -> Vec<f32> {
        let c = &self.config;
        let (nh, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let eps = c.rms_norm_eps;
        let qg = a.q_proj.apply(hs, t);
        let mut k = a.k_proj.apply(hs, t);
        let v = a.v_proj.apply(hs, t);

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
                self.rope(&mut q[dst..dst + d], pos0 + ti);
            }
            for m in 0..nkv {
                let kh = &mut k[ti * nkv * d + m * d..][..d];
                let inv = inv_rms(kh, eps);
                for (x, &w) in kh.iter_mut().zip(&a.k_norm) {
                    *x = *x * inv * w;
                }
                self.rope(kh, pos0 + ti);
            }
        }
        keys.extend_from_slice(&k);
        values.extend_from_slice(&v);

        let group = nh / nkv;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0f32; t * nh * d];
        let keys = &keys[..];
        let values = &values[..];
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
        a.o_proj.apply(&out, t)
    }

    /// Rotate-half RoPE on the first `rotary_dims` of one head (spec §3.3 step 4).
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        // Angles in f32 like HF (position × inv_freq), so long positions round the same way.
        let p = pos as f32;
        for i in 0..half {
            let ang = p * self.inv_freq[i];
            let (sin, cos) = ang.sin_cos();
            let (x1, x2) = (x[i], x[i + half]);
            x[i] = x1 * cos - x2 * sin;
            x[i + half] = x2 * cos + x1 * sin;
        }
    }

    fn delta_net(
        &self,
        w: &DeltaNetWeights,
        hs: &[f32],
        t: usize,
        conv_state: &mut [f32],
        s_all: &mut [f32],
    ) -> Vec<f32> {
        let c = &self.config;
        let (hk, hv, dk, dv) = (c.linear_key_heads, c.linear_value_heads, c.linear_key_dim, c.linear_value_dim);
        let (key_dim, conv_dim, kc) = (c.key_dim(), c.conv_dim(), c.conv_kernel);
        let r = hv / hk;
        let eps = c.rms_norm_eps;
        let qkv = w.in_qkv.apply(hs, t);
        let z = w.in_z.apply(hs, t);
        let b = w.in_b.apply(hs, t);
        let a = w.in_a.apply(hs, t);
        let q_scale = 1.0 / (dk as f32).sqrt();
        let mut y = vec![0.0f32; t * hv * dv];
        let mut conv_out = vec![0.0f32; conv_dim];
        for ti in 0..t {
            let cur = &qkv[ti * conv_dim..][..conv_dim];
            // Causal depthwise conv over [state rows..., current], then SiLU.
            for ch in 0..conv_dim {
                let wk = &w.conv[ch * kc..][..kc];
                let mut u = 0.0f32;
                for j in 0..kc - 1 {
                    u += wk[j] * conv_state[j * conv_dim + ch];
                }
                u += wk[kc - 1] * cur[ch];
                conv_out[ch] = silu(u);
            }
            if kc > 1 {
                conv_state.copy_within(conv_dim.., 0);
                conv_state[(kc - 2) * conv_dim..].copy_from_slice(cur);
            }
            let (qs, rest) = conv_out.split_at_mut(key_dim);
            let (ks, vs) = rest.split_at_mut(key_dim);
            for hh in 0..hk {
                l2_normalize(&mut qs[hh * dk..][..dk], q_scale);
                l2_normalize(&mut ks[hh * dk..][..dk], 1.0);
            }
            let (qs, ks, vs) = (&*qs, &*ks, &*vs);
            let bt = &b[ti * hv..][..hv];
            let at = &a[ti * hv..][..hv];
            let yt = &mut y[ti * hv * dv..][..hv * dv];
            let zt = &z[ti * hv * dv..][..hv * dv];
            let step = |h: usize, s: &mut [f32], o: &mut [f32]| {
                let g = w.neg_a[h] * softplus(at[h] + w.dt_bias[h]);
                let decay = g.exp();
                let beta = sigmoid(bt[h]);
                let kh = &ks[(h / r) * dk..][..dk];
                let qh = &qs[(h / r) * dk..][..dk];
                let vh = &vs[h * dv..][..dv];
                // Decay first, then read m = Sᵀk from the decayed state.
                let mut m = vec![0.0f32; dv];
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
                let zh = &zt[h * dv..][..dv];
                for ((ov, &nw), &zv) in o.iter_mut().zip(&w.norm).zip(zh) {
                    *ov = *ov * inv * nw * silu(zv);
                }
            };
            if hv * dk * dv >= PAR_THRESHOLD {
                s_all
                    .par_chunks_mut(dk * dv)
                    .zip(yt.par_chunks_mut(dv))
                    .enumerate()
                    .for_each(|(h, (s, o))| step(h, s, o));
            } else {
                s_all.chunks_mut(dk * dv).zip(yt.chunks_mut(dv)).enumerate().for_each(|(h, (s, o))| step(h, s, o));
            }
        }
        w.out_proj.apply(&y, t)
    }

    fn moe(&self, m: &MoeWeights, hs: &[f32], t: usize, layer: usize, pos0: usize) -> Result<(Vec<f32>, LayerTimes)> {
        let mut lt = LayerTimes::default();
        let t_router = Instant::now();
        let c = &self.config;
        let (h, e) = (c.hidden_size, c.num_experts);
        let k = self.experts_per_token;
        let logits = m.router.apply(hs, t);
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        let mut idx: Vec<usize> = (0..e).collect();
        for ti in 0..t {
            let l = &logits[ti * e..][..e];
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut p: Vec<f32> = l.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = p.iter().sum();
            for v in p.iter_mut() {
                *v /= sum;
            }
            // Top-k by probability; ties go to the lower expert index.
            idx.sort_by(|&x, &y| p[y].total_cmp(&p[x]).then(x.cmp(&y)));
            let top = &idx[..k];
            let norm = if c.norm_topk_prob { top.iter().map(|&x| p[x]).sum::<f32>() } else { 1.0 };
            for &x in top {
                per_expert[x].push((ti, p[x] / norm));
            }
            if let Some(trace) = &self.routing_trace {
                trace.lock().unwrap().push(super::RoutingRecord {
                    layer,
                    pos: pos0 + ti,
                    experts: top.iter().map(|&x| x as u32).collect(),
                });
            }
        }
        let chosen: Vec<usize> = (0..e).filter(|&x| !per_expert[x].is_empty()).collect();
        if let Some(guess) = self.prefetch_guess.lock().unwrap()[layer].take() {
            let hits = guess.iter().filter(|g| chosen.contains(g)).count();
            self.prefetch_hits.fetch_add(hits as u64, std::sync::atomic::Ordering::Relaxed);
            self.prefetch_total.fetch_add(chosen.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        lt.router = t_router.elapsed().as_secs_f64();

        // The shared expert needs no routed weights: compute it while the routed ones are read.
        let shared = || {
            let t0 = Instant::now();
            let mut ys = expert_forward(&m.shared, hs, t);
            let sg = m.shared_gate.apply(hs, t);
            for ti in 0..t {
                let s = sigmoid(sg[ti]);
                for v in &mut ys[ti * h..][..h] {
                    *v *= s;
                }
            }
            (ys, t0.elapsed().as_secs_f64())
        };
        let t_phase = Instant::now();
        let mut routed = vec![0.0f32; t * h];
        // Runs the routed experts `ids` (buffers `bufs` when streamed) over their tokens and adds
        // their weighted outputs into `routed`, in `chosen` order so results do not depend on
        // chunking. Returns its compute time.
        let run_experts = |ids: &[usize], bufs: Option<&[Arc<AlignedBuf>]>, routed: &mut Vec<f32>| -> Result<f64> {
            let t0 = Instant::now();
            let mut xs = Vec::new();
            for (j, &ei) in ids.iter().enumerate() {
                let toks = &per_expert[ei];
                xs.clear();
                for &(ti, _) in toks {
                    xs.extend_from_slice(&hs[ti * h..][..h]);
                }
                let y = match (&m.experts, bufs) {
                    (ExpertSet::Resident(v), _) => expert_forward(&v[ei], &xs, toks.len()),
                    (ExpertSet::Streamed { store, layer }, Some(bufs)) => {
                        expert_forward(&store.expert_weights(*layer, bufs[j].clone())?, &xs, toks.len())
                    }
                    _ => unreachable!("streamed experts come with their buffers"),
                };
                for (r, &(ti, wgt)) in toks.iter().enumerate() {
                    for (o, &v) in routed[ti * h..][..h].iter_mut().zip(&y[r * h..][..h]) {
                        *o += wgt * v;
                    }
                }
            }
            Ok(t0.elapsed().as_secs_f64())
        };
        let (mut out, compute_secs) = match &m.experts {
            ExpertSet::Resident(_) => {
                let (ys, sh) = shared();
                let r = run_experts(&chosen, None, &mut routed)?;
                (ys, sh + r)
            }
            ExpertSet::Streamed { store, layer } => {
                // At most `fetch_chunk` expert buffers alive at once (bounded memory for big
                // prefills); chunk i+1 is read while chunk i computes, and the first read overlaps
                // the shared expert.
                let chunks: Vec<&[usize]> = chosen.chunks(self.fetch_chunk.max(1)).collect();
                let first = chunks.first().copied().unwrap_or(&[]);
                let (cur, (ys, sh)) = rayon::join(|| store.fetch(*layer, first), shared);
                let mut cur = cur?;
                let mut compute = sh;
                for ci in 0..chunks.len() {
                    let next_ids = chunks.get(ci + 1).copied();
                    let (next, r) = rayon::join(
                        || next_ids.map(|ids| store.fetch(*layer, ids)).transpose(),
                        || run_experts(chunks[ci], Some(&cur), &mut routed),
                    );
                    compute += r?;
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
}

impl Model {
    /// Guesses layer li+1's experts by applying its router to layer li's post-attention hidden
    /// state (the residual stream changes little between adjacent layers) and starts reading them.
    fn prefetch_next_layer(&self, li: usize, normed: &[f32]) {
        let Some(next) = self.weights.layers.get(li + 1) else { return };
        let ExpertSet::Streamed { store, layer } = &next.moe.experts else { return };
        let logits = next.moe.router.apply(normed, 1);
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        idx.truncate(self.experts_per_token);
        store.prefetch(*layer, &idx);
        self.prefetch_guess.lock().unwrap()[*layer] = Some(idx);
    }
}

/// down·(silu(gate·x) ⊙ up·x) for n inputs.
fn expert_forward(ex: &ExpertWeights, xs: &[f32], n: usize) -> Vec<f32> {
    let mut g = ex.gate.apply(xs, n);
    let u = ex.up.apply(xs, n);
    for (gv, &uv) in g.iter_mut().zip(&u) {
        *gv = silu(*gv) * uv;
    }
    ex.down.apply(&g, n)
}

/// x ← x·scale / sqrt(Σx² + 1e-6) (FLA/HF `l2norm`, eps inside the root).
fn l2_normalize(x: &mut [f32], scale: f32) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let inv = 1.0 / ((ss as f32) + 1e-6).sqrt();
    for v in x.iter_mut() {
        *v = *v * inv * scale;
    }
}
