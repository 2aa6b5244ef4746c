// Everything of the forward pass except the decode GEMV (gemv.cu): norms, RoPE, attention,
// GatedDeltaNet, router top-k, SwiGLU, expert combination, embedding lookup, and the multi-token
// quantized GEMM used by prefill. f32 activations and accumulation throughout, like the CPU
// backend (crates/engine/src/qwen35/forward.rs), whose code each kernel mirrors.
//
// Compiled at run time by NVRTC (cuda/context.rs). No headers.

typedef unsigned int u32;
typedef unsigned short u16;
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16f(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float siluf_(float x) { return x * sigmoidf_(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    v = warp_sum(v);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    if (w == 0) {
        float s = lane < nw ? part[lane] : 0.f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------------
// Element-wise and row kernels.

// out[r] = x[r] · rsqrt(mean(x[r]²) + eps) · w. One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int d, float eps) {
    const float* xr = x + (long long)blockIdx.x * d;
    float* orow = out + (long long)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

extern "C" __global__ void add_inplace(float* __restrict__ x, const float* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// act[i] = silu(g[i]) · u[i].
extern "C" __global__ void swiglu(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ act,
                                  long long n) {
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x)
        act[j] = siluf_(g[j]) * u[j];
}

// Decode MoE output: x[i] += Σ_e w[e]·ys[e, i] + sigmoid(sg[0])·ys[k, i], where row k of ys is the
// shared expert (routed sum first, then the shared expert, as HF adds them).
extern "C" __global__ void moe_combine(float* __restrict__ x, const float* __restrict__ ys,
                                       const float* __restrict__ wts, const float* __restrict__ sg, int k, int h) {
    const float s = sigmoidf_(sg[0]);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < h; i += gridDim.x * blockDim.x) {
        float r = 0.f;
        for (int e = 0; e < k; e++) r += wts[e] * ys[(long long)e * h + i];
        x[i] += r + s * ys[(long long)k * h + i];
    }
}

// Prefill: x[t, i] += sigmoid(sg[t]) · y[t, i] (the shared expert of every token).
extern "C" __global__ void add_gated_rows(float* __restrict__ x, const float* __restrict__ y,
                                          const float* __restrict__ sg, int h, int rows) {
    const long long n = (long long)rows * h;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x)
        x[j] += sigmoidf_(sg[j / h]) * y[j];
}

// dst[r] = src[idx[r]] (rows of h floats).
extern "C" __global__ void gather_rows(const float* __restrict__ src, const int* __restrict__ idx,
                                       float* __restrict__ dst, int h, int rows) {
    const long long n = (long long)rows * h;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x)
        dst[j] = src[(long long)idx[j / h] * h + j % h];
}

// dst[idx[r]] += w[r] · src[r]. The rows of one call go to distinct tokens (one expert's tokens),
// so there is no write conflict.
extern "C" __global__ void scatter_add_rows(float* __restrict__ dst, const float* __restrict__ src,
                                            const int* __restrict__ idx, const float* __restrict__ w, int h,
                                            int rows) {
    const long long n = (long long)rows * h;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x) {
        const long long r = j / h;
        dst[(long long)idx[r] * h + j % h] += w[r] * src[j];
    }
}

// Embedding rows of an MLX affine matrix: out[t] = dequant(row ids[t]). One block per token.
extern "C" __global__ void embed_affine(const u32* __restrict__ w, const u16* __restrict__ s,
                                        const u16* __restrict__ b, const int* __restrict__ ids,
                                        float* __restrict__ out, int cols, int bits, int gs) {
    const long long r = ids[blockIdx.x];
    const u32* wr = w + r * (cols * bits / 32);
    const u16* sr = s + r * (cols / gs);
    const u16* br = b + r * (cols / gs);
    const u32 mask = bits == 32 ? 0xffffffffu : ((1u << bits) - 1u);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const long long bit = (long long)c * bits;
        const u32 q = (wr[bit >> 5] >> (bit & 31)) & mask;
        out[(long long)blockIdx.x * cols + c] = (float)q * bf16f(sr[c / gs]) + bf16f(br[c / gs]);
    }
}

// Embedding rows of a float matrix (dtype 0 = f32, 1 = bf16).
extern "C" __global__ void embed_dense(const void* __restrict__ w, int dtype, const int* __restrict__ ids,
                                       float* __restrict__ out, int cols) {
    const long long r = ids[blockIdx.x];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = dtype == 0 ? reinterpret_cast<const float*>(w)[r * cols + c]
                                   : bf16f(reinterpret_cast<const u16*>(w)[r * cols + c]);
        out[(long long)blockIdx.x * cols + c] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// Gated attention.

// Per token t (blockIdx.y) and head (blockIdx.x < nh: query head; else key/value head):
// query heads take q from the interleaved [q_h; gate_h] projection, RMS-normalize with q_norm and
// rotate; the gate is copied out. Key heads are normalized with k_norm, rotated and written to the
// cache at position pos0 + t together with the values. Rotate-half RoPE on the first 2·half dims,
// angles pos·inv_freq in f32 like HF.
extern "C" __global__ void attn_prep(const float* __restrict__ qg, const float* __restrict__ k,
                                     const float* __restrict__ v, const float* __restrict__ q_norm,
                                     const float* __restrict__ k_norm, const float* __restrict__ inv_freq,
                                     float* __restrict__ q_out, float* __restrict__ gate_out,
                                     float* __restrict__ kcache, float* __restrict__ vcache, int nh, int nkv, int d,
                                     int half, int pos0, float eps) {
    extern __shared__ float buf[];  // d floats
    const int t = blockIdx.y, j = blockIdx.x;
    const long long pos = pos0 + t;
    const float* src;
    const float* nw;
    float* dst;
    if (j < nh) {
        src = qg + ((long long)t * nh + j) * 2 * d;
        nw = q_norm;
        dst = q_out + ((long long)t * nh + j) * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) gate_out[((long long)t * nh + j) * d + i] = src[d + i];
    } else {
        const int m = j - nh;
        src = k + ((long long)t * nkv + m) * d;
        nw = k_norm;
        dst = kcache + (pos * nkv + m) * d;
        const float* vs = v + ((long long)t * nkv + m) * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) vcache[(pos * nkv + m) * d + i] = vs[i];
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += src[i] * src[i];
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) buf[i] = src[i] * inv * nw[i];
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float r = buf[i];
        if (i < 2 * half) {
            const int f = i < half ? i : i - half;
            float sn, cs;
            sincosf((float)pos * inv_freq[f], &sn, &cs);
            r = i < half ? buf[i] * cs - buf[i + half] * sn : buf[i] * cs + buf[i - half] * sn;
        }
        dst[i] = r;
    }
}

// Causal attention, one block of 4 warps per (query head, token, split of the key range). Each
// warp keeps an online softmax over its positions (lane l holds dims l, l+32, ...); the block's
// warps are merged and the partial (max, sum, acc[d]) written to part[] for attn_merge.
// Requires d % 32 == 0 and d ≤ 512.
#define ATT_MAXV 16
extern "C" __global__ void __launch_bounds__(128) attn_partial(const float* __restrict__ q,
                                                              const float* __restrict__ kcache,
                                                              const float* __restrict__ vcache,
                                                              float* __restrict__ part, int nh, int nkv, int d,
                                                              int pos0, int splits, int chunk, float scale) {
    const int j = blockIdx.x, t = blockIdx.y, z = blockIdx.z;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kvh = j / (nh / nkv);
    const int len = pos0 + t + 1;
    const int s0 = z * chunk, s1 = min(len, s0 + chunk);
    const int nv = d / 32;
    const float* qh = q + ((long long)t * nh + j) * d;
    float qv[ATT_MAXV], acc[ATT_MAXV];
#pragma unroll
    for (int i = 0; i < ATT_MAXV; i++) {
        qv[i] = i < nv ? qh[lane + 32 * i] : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int s = s0 + w; s < s1; s += 4) {
        const float* kr = kcache + ((long long)s * nkv + kvh) * d;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < ATT_MAXV; i++)
            if (i < nv) dot += qv[i] * kr[lane + 32 * i];
        const float sc = warp_sum(dot) * scale;
        const float mn = fmaxf(m, sc);
        const float corr = expf(m - mn), p = expf(sc - mn);
        const float* vr = vcache + ((long long)s * nkv + kvh) * d;
#pragma unroll
        for (int i = 0; i < ATT_MAXV; i++)
            if (i < nv) acc[i] = acc[i] * corr + p * vr[lane + 32 * i];
        l = l * corr + p;
        m = mn;
    }
    __shared__ float sm[4], sl[4];
    __shared__ float sacc[4][512];
    if (lane == 0) {
        sm[w] = m;
        sl[w] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_MAXV; i++)
        if (i < nv) sacc[w][lane + 32 * i] = acc[i];
    __syncthreads();
    float mt = fmaxf(fmaxf(sm[0], sm[1]), fmaxf(sm[2], sm[3]));
    float* out = part + (((long long)t * nh + j) * splits + z) * (d + 2);
    if (mt == -INFINITY) {
        // Empty split (past the causal limit of this token).
        for (int i = threadIdx.x; i < d; i += blockDim.x) out[2 + i] = 0.f;
        if (threadIdx.x == 0) {
            out[0] = -INFINITY;
            out[1] = 0.f;
        }
        return;
    }
    float c[4];
    float lt = 0.f;
#pragma unroll
    for (int x = 0; x < 4; x++) {
        c[x] = sm[x] == -INFINITY ? 0.f : expf(sm[x] - mt);
        lt += sl[x] * c[x];
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        out[2 + i] = sacc[0][i] * c[0] + sacc[1][i] * c[1] + sacc[2][i] * c[2] + sacc[3][i] * c[3];
    if (threadIdx.x == 0) {
        out[0] = mt;
        out[1] = lt;
    }
}

// Merges the splits of attn_partial and applies the output gate: o = sigmoid(gate)·Σ/Σ. One block
// per (head, token).
extern "C" __global__ void attn_merge(const float* __restrict__ part, const float* __restrict__ gate,
                                      float* __restrict__ out, int nh, int d, int splits) {
    const int j = blockIdx.x, t = blockIdx.y;
    const float* p = part + ((long long)t * nh + j) * splits * (d + 2);
    float mt = -INFINITY;
    for (int z = 0; z < splits; z++) mt = fmaxf(mt, p[z * (d + 2)]);
    float lt = 0.f;
    for (int z = 0; z < splits; z++) {
        const float mz = p[z * (d + 2)];
        if (mz != -INFINITY) lt += p[z * (d + 2) + 1] * expf(mz - mt);
    }
    const float inv = 1.f / lt;
    const long long o = ((long long)t * nh + j) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float a = 0.f;
        for (int z = 0; z < splits; z++) {
            const float mz = p[z * (d + 2)];
            if (mz != -INFINITY) a += p[z * (d + 2) + 2 + i] * expf(mz - mt);
        }
        out[o + i] = a * inv * sigmoidf_(gate[o + i]);
    }
}

// ---------------------------------------------------------------------------------------------
// GatedDeltaNet.

// Causal depthwise conv over [state rows (kc-1), T new rows], then SiLU; the state keeps the last
// kc-1 raw rows. One thread per channel, tokens in order. kc ≤ 8.
extern "C" __global__ void dn_conv(const float* __restrict__ qkv, float* __restrict__ state,
                                   const float* __restrict__ convw, float* __restrict__ out, int T, int conv_dim,
                                   int kc) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= conv_dim) return;
    float win[8];
    for (int j = 0; j < kc - 1; j++) win[j] = state[(long long)j * conv_dim + ch];
    float wk[8];
    for (int j = 0; j < kc; j++) wk[j] = convw[(long long)ch * kc + j];
    for (int t = 0; t < T; t++) {
        const float cur = qkv[(long long)t * conv_dim + ch];
        float u = 0.f;
        for (int j = 0; j < kc - 1; j++) u += wk[j] * win[j];
        u += wk[kc - 1] * cur;
        out[(long long)t * conv_dim + ch] = siluf_(u);
        for (int j = 0; j + 1 < kc - 1; j++) win[j] = win[j + 1];
        if (kc > 1) win[kc - 2] = cur;
    }
    for (int j = 0; j < kc - 1; j++) state[(long long)j * conv_dim + ch] = win[j];
}

// The gated delta rule for one value head (blockIdx.x) over T tokens in order, thread j owning
// column j of the f32 state S[dk, dv] (blockDim.x == dv, a multiple of 32). Per token:
// S ← decay·S; m = Sᵀk; δ = β(v − m); S ← S + k δᵀ; o = Sᵀq; y = RMSNorm(o)·w·silu(z).
// q and k (the head's key head) are L2-normalized here (q also scaled by 1/√dk).
extern "C" __global__ void dn_recurrent(const float* __restrict__ conv_out, const float* __restrict__ z,
                                        const float* __restrict__ bb, const float* __restrict__ aa,
                                        const float* __restrict__ neg_a, const float* __restrict__ dt_bias,
                                        const float* __restrict__ normw, float* __restrict__ state,
                                        float* __restrict__ y, int T, int hk, int hv, int dk, int dv, float eps) {
    extern __shared__ float qk[];  // q[dk], k[dk]
    const int h = blockIdx.x, j = threadIdx.x;
    const int r = hv / hk, kh = h / r;
    const int key_dim = hk * dk, conv_dim = 2 * key_dim + hv * dv;
    float* S = state + (long long)h * dk * dv;
    const float qscale = 1.f / sqrtf((float)dk);
    for (int t = 0; t < T; t++) {
        const float* row = conv_out + (long long)t * conv_dim;
        float sq = 0.f, sk = 0.f;
        for (int i = j; i < dk; i += blockDim.x) {
            const float a = row[kh * dk + i], b = row[key_dim + kh * dk + i];
            qk[i] = a;
            qk[dk + i] = b;
            sq += a * a;
            sk += b * b;
        }
        sq = block_sum(sq);
        sk = block_sum(sk);
        const float iq = qscale / sqrtf(sq + 1e-6f), ik = 1.f / sqrtf(sk + 1e-6f);
        for (int i = j; i < dk; i += blockDim.x) {
            qk[i] *= iq;
            qk[dk + i] *= ik;
        }
        __syncthreads();
        const float a = aa[(long long)t * hv + h] + dt_bias[h];
        const float sp = a > 20.f ? a : log1pf(expf(a));
        const float decay = expf(neg_a[h] * sp);
        const float beta = sigmoidf_(bb[(long long)t * hv + h]);
        float m = 0.f;
        for (int i = 0; i < dk; i++) {
            const float s = S[(long long)i * dv + j] * decay;
            S[(long long)i * dv + j] = s;
            m += s * qk[dk + i];
        }
        const float delta = beta * (row[2 * key_dim + h * dv + j] - m);
        float o = 0.f;
        for (int i = 0; i < dk; i++) {
            const float s = S[(long long)i * dv + j] + qk[dk + i] * delta;
            S[(long long)i * dv + j] = s;
            o += s * qk[i];
        }
        const float ss = block_sum(o * o);
        const float inv = 1.f / sqrtf(ss / dv + eps);
        const long long yi = (long long)t * hv * dv + (long long)h * dv + j;
        y[yi] = o * inv * normw[j] * siluf_(z[yi]);
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// Router: softmax over e logits, top-k (ties to the lower index), weights renormalized over the
// k when `norm`. One block per token; probabilities staged in shared memory (e floats).
extern "C" __global__ void router_topk(const float* __restrict__ logits, int e, int k, int norm,
                                       int* __restrict__ ids, float* __restrict__ wts) {
    extern __shared__ float p[];
    __shared__ float bv[32];
    __shared__ int bi[32];
    __shared__ float chosen_sum;
    const float* l = logits + (long long)blockIdx.x * e;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < e; i += blockDim.x) mx = fmaxf(mx, l[i]);
    mx = warp_max(mx);
    __shared__ float wmax[32];
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (lane == 0) wmax[w] = mx;
    __syncthreads();
    mx = -INFINITY;
    for (int i = 0; i < nw; i++) mx = fmaxf(mx, wmax[i]);
    float s = 0.f;
    for (int i = threadIdx.x; i < e; i += blockDim.x) {
        const float v = expf(l[i] - mx);
        p[i] = v;
        s += v;
    }
    s = block_sum(s);
    for (int i = threadIdx.x; i < e; i += blockDim.x) p[i] /= s;
    if (threadIdx.x == 0) chosen_sum = 0.f;
    __syncthreads();
    for (int r = 0; r < k; r++) {
        float best = -1.f;
        int bidx = 0x7fffffff;
        for (int i = threadIdx.x; i < e; i += blockDim.x) {
            const float v = p[i];
            if (v > best || (v == best && i < bidx)) {
                best = v;
                bidx = i;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bidx, o);
            if (ov > best || (ov == best && oi < bidx)) {
                best = ov;
                bidx = oi;
            }
        }
        if (lane == 0) {
            bv[w] = best;
            bi[w] = bidx;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float b = bv[0];
            int x = bi[0];
            for (int i = 1; i < nw; i++)
                if (bv[i] > b || (bv[i] == b && bi[i] < x)) {
                    b = bv[i];
                    x = bi[i];
                }
            ids[(long long)blockIdx.x * k + r] = x;
            wts[(long long)blockIdx.x * k + r] = b;
            chosen_sum += b;
            p[x] = -2.f;  // below every probability: never chosen again
        }
        __syncthreads();
    }
    if (threadIdx.x < k) {
        const float d = norm ? chosen_sum : 1.f;
        wts[(long long)blockIdx.x * k + threadIdx.x] /= d;
    }
}

// ---------------------------------------------------------------------------------------------
// Multi-token GEMM for prefill: y[t, r] = W[r]·x[t] for T tokens. One warp per row and TT tokens
// (blockIdx.y picks the token tile): each 16-byte chunk of the row is dequantized once into
// registers and used for the TT tokens, so weights are read T/TT times instead of T times.
// x is read through L1 (all warps of a block share it).
#define TT 8
template <int FMT, int BITS>
__device__ __forceinline__ void gemm_rows(const uint4* __restrict__ w, const u16* __restrict__ sc,
                                          const u16* __restrict__ bi, int gs, const float* __restrict__ x,
                                          float* __restrict__ y, int rows, int cols, int T) {
    // FMT 0: affine (BITS), 1: f32, 2: bf16.
    constexpr int VPC = FMT == 0 ? 128 / BITS : (FMT == 1 ? 4 : 8);
    const int lane = threadIdx.x & 31;
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= rows) return;
    const int t0 = blockIdx.y * TT;
    const int nt = min(TT, T - t0);
    const int nch = cols / VPC;
    const uint4* wr = w + row * nch;
    float acc[TT];
#pragma unroll
    for (int i = 0; i < TT; i++) acc[i] = 0.f;
    for (int c = lane; c < nch; c += 32) {
        const uint4 q = wr[c];
        float wv[VPC];
        if constexpr (FMT == 0) {
            const u32 words[4] = {q.x, q.y, q.z, q.w};
            constexpr int VPW = 32 / BITS;
            constexpr u32 MASK = BITS == 8 ? 0xffu : ((1u << BITS) - 1u);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                // A word never straddles groups (groups are ≥ 32 codes); a chunk may (2 bits, g32).
                const long long g = row * (cols / gs) + (c * VPC + k * VPW) / gs;
                const float s = bf16f(sc[g]), b = bf16f(bi[g]);
#pragma unroll
                for (int v = 0; v < VPW; v++) wv[k * VPW + v] = (float)((words[k] >> (v * BITS)) & MASK) * s + b;
            }
        } else if constexpr (FMT == 1) {
            wv[0] = __uint_as_float(q.x);
            wv[1] = __uint_as_float(q.y);
            wv[2] = __uint_as_float(q.z);
            wv[3] = __uint_as_float(q.w);
        } else {
            const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                wv[2 * k] = __uint_as_float(words[k] << 16);
                wv[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
            }
        }
#pragma unroll
        for (int tt = 0; tt < TT; tt++) {
            if (tt < nt) {
                const float4* xp = reinterpret_cast<const float4*>(x + (long long)(t0 + tt) * cols + (long long)c * VPC);
                float a = acc[tt];
#pragma unroll
                for (int v = 0; v < VPC / 4; v++) {
                    const float4 xv = __ldg(xp + v);
                    a = fmaf(wv[4 * v], xv.x, a);
                    a = fmaf(wv[4 * v + 1], xv.y, a);
                    a = fmaf(wv[4 * v + 2], xv.z, a);
                    a = fmaf(wv[4 * v + 3], xv.w, a);
                }
                acc[tt] = a;
            }
        }
    }
#pragma unroll
    for (int tt = 0; tt < TT; tt++) {
        const float v = warp_sum(acc[tt]);
        if (lane == 0 && tt < nt) y[(long long)(t0 + tt) * rows + row] = v;
    }
}

#define GEMM_AFFINE(B)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) gemm_affine_b##B(                                     \
        const uint4* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ b, int gs,             \
        const float* __restrict__ x, float* __restrict__ y, int rows, int cols, int T) {                      \
        gemm_rows<0, B>(w, s, b, gs, x, y, rows, cols, T);                                                    \
    }
GEMM_AFFINE(2)
GEMM_AFFINE(4)
GEMM_AFFINE(8)

extern "C" __global__ void __launch_bounds__(256) gemm_f32(const uint4* __restrict__ w, const u16* __restrict__ s,
                                                           const u16* __restrict__ b, int gs,
                                                           const float* __restrict__ x, float* __restrict__ y,
                                                           int rows, int cols, int T) {
    gemm_rows<1, 32>(w, s, b, gs, x, y, rows, cols, T);
}

extern "C" __global__ void __launch_bounds__(256) gemm_bf16(const uint4* __restrict__ w, const u16* __restrict__ s,
                                                            const u16* __restrict__ b, int gs,
                                                            const float* __restrict__ x, float* __restrict__ y,
                                                            int rows, int cols, int T) {
    gemm_rows<2, 16>(w, s, b, gs, x, y, rows, cols, T);
}
