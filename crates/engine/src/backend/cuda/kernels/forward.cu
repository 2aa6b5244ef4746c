// Everything of the forward pass except the decode GEMV (gemv.cu): norms, RoPE, attention,
// GatedDeltaNet, router top-k, SwiGLU, expert combination, embedding lookup, and the multi-token
// quantized GEMM used by prefill. f32 activations and accumulation throughout, like the CPU
// backend (crates/engine/src/qwen35/forward.rs), whose code each kernel mirrors.
//
// Compiled at run time by NVRTC (cuda/context.rs). No headers.

typedef unsigned int u32;
typedef unsigned short u16;
#define INFINITY __int_as_float(0x7f800000)

// Programmatic dependent launch (sm_90+, see `CudaDevice::pdl`): a kernel may be launched while
// the previous one in the stream still runs. It waits here until that one has finished and its
// writes are visible, then lets the next kernel launch, so launch latency overlaps with work.
// Every kernel calls this first (without PDL both instructions are no-ops).
__device__ __forceinline__ void pdl_prologue() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

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
                                    float* __restrict__ out, int d, float eps) { pdl_prologue();
    const float* xr = x + (long long)blockIdx.x * d;
    float* orow = out + (long long)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// x[r] += y[r]; out[r] = rmsnorm(x[r])·w (the residual add after the mixer, fused with the
// post-attention norm). One block per row.
extern "C" __global__ void add_rms_norm(float* __restrict__ x, const float* __restrict__ y,
                                        const float* __restrict__ w, float* __restrict__ out, int d, float eps) { pdl_prologue();
    float* xr = x + (long long)blockIdx.x * d;
    const float* yr = y + (long long)blockIdx.x * d;
    float* orow = out + (long long)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = xr[i] + yr[i];
        xr[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// act[i] = silu(g[i]) · u[i].
extern "C" __global__ void swiglu(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ act,
                                  long long n) { pdl_prologue();
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x)
        act[j] = siluf_(g[j]) * u[j];
}

// Decode MoE output: x[i] += Σ_e w[e]·ys[e, i] + sigmoid(sg[0])·ys[k, i], where row k of ys is the
// shared expert (routed sum first, then the shared expert, as HF adds them). When `nw` is not
// null, also out = rmsnorm(x)·nw (the next layer's input norm, or the final norm). One block: a
// row is at most a few thousand floats, and one block's sum needs no grid-wide reduction (a
// fence, a counter and a second pass, which cost more than the arithmetic here).
// Expert e's output row is ys[e] or, where cpu_mask[e] is set (hybrid decode), cpu_rows[e]:
// the rows the CPU computed arrive in one copy beside the mask; the sum's order is the same.
extern "C" __global__ void __launch_bounds__(1024) moe_combine(float* __restrict__ x, const float* __restrict__ ys,
                                                               const float* __restrict__ wts, const float* __restrict__ sg,
                                                               int k, int h, const float* __restrict__ nw,
                                                               float* __restrict__ out, const int* __restrict__ cpu_mask,
                                                               const float* __restrict__ cpu_rows, float eps) { pdl_prologue();
    const float s = sigmoidf_(sg[0]);
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float r = 0.f;
        for (int e = 0; e < k; e++) {
            const float* row = (cpu_mask != nullptr && cpu_mask[e]) ? cpu_rows : ys;
            r += wts[e] * row[(long long)e * h + i];
        }
        const float v = x[i] + (r + s * ys[(long long)k * h + i]);
        x[i] = v;
        ss += v * v;
    }
    if (nw == nullptr) return;
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / h + eps);
    // Each thread reads back only the elements it wrote.
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[i] = x[i] * inv * nw[i];
}

// Rows row0 .. row0+nrows-1 of a matrix as f32 ([nrows, cols]), for the cuBLAS prefill GEMM.
// fmt 0: affine (bits, gs), 2: bf16. One thread per 32-bit word of codes (whole rows of words),
// its values written as float4s.
template <int BITS>
__device__ __forceinline__ void dequant_word(u32 word, float sc, float bi, float* o) {
    constexpr int VPW = 32 / BITS;
    constexpr u32 MASK = BITS == 8 ? 0xffu : ((1u << BITS) - 1u);
    float v[VPW];
#pragma unroll
    for (int i = 0; i < VPW; i++) v[i] = (float)((word >> (i * BITS)) & MASK) * sc + bi;
#pragma unroll
    for (int i = 0; i < VPW / 4; i++)
        reinterpret_cast<float4*>(o)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}
extern "C" __global__ void dequant_rows(const u32* __restrict__ w, const u16* __restrict__ s,
                                        const u16* __restrict__ b, int fmt, int bits, int gs, long long row0,
                                        long long nrows, int cols, float* __restrict__ out) { pdl_prologue();
    const int wpr = fmt == 0 ? cols / (32 / bits) : cols / 2;  // words per row
    const long long n = nrows * wpr;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / wpr;
        const int k = (int)(i % wpr);
        const u32 word = w[(row0 + r) * wpr + k];
        float* o = out + r * cols;
        if (fmt == 0) {
            const int c0 = k * (32 / bits);
            const long long g = (row0 + r) * (cols / gs) + c0 / gs;
            const float sc = bf16f(s[g]), bi = bf16f(b[g]);
            if (bits == 4) dequant_word<4>(word, sc, bi, o + c0);
            else if (bits == 8) dequant_word<8>(word, sc, bi, o + c0);
            else dequant_word<2>(word, sc, bi, o + c0);
        } else {
            reinterpret_cast<float2*>(o)[k] = make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
        }
    }
}

// Prefill: x[t, i] += sigmoid(sg[t]) · y[t, i] (the shared expert of every token).
extern "C" __global__ void add_gated_rows(float* __restrict__ x, const float* __restrict__ y,
                                          const float* __restrict__ sg, int h, int rows) { pdl_prologue();
    const long long n = (long long)rows * h;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x)
        x[j] += sigmoidf_(sg[j / h]) * y[j];
}

// Embedding rows of an MLX affine matrix: out[t] = dequant(row ids[t]). One block per token.
extern "C" __global__ void embed_affine(const u32* __restrict__ w, const u16* __restrict__ s,
                                        const u16* __restrict__ b, const int* __restrict__ ids,
                                        float* __restrict__ out, int cols, int bits, int gs) { pdl_prologue();
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
                                       float* __restrict__ out, int cols) { pdl_prologue();
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
                                     int half, const int* __restrict__ pos0p, float eps) { pdl_prologue();
    extern __shared__ float buf[];  // d floats
    const int t = blockIdx.y, j = blockIdx.x;
    const long long pos = *pos0p + t;
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
                                                              const int* __restrict__ pos0p, int ntok, float scale) { pdl_prologue();
    // The key range of the longest row (pos0 + ntok) is cut into gridDim.z splits; positions past a
    // row's causal limit are skipped. The position comes from device memory so a captured graph
    // replays at any position.
    const int j = blockIdx.x, t = blockIdx.y, z = blockIdx.z, splits = gridDim.z;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kvh = j / (nh / nkv);
    const int pos0 = *pos0p;
    const int len = pos0 + t + 1;
    const int chunk = (pos0 + ntok + splits - 1) / splits;
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
                                      float* __restrict__ out, int nh, int d, int splits) { pdl_prologue();
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
                                   int kc) { pdl_prologue();
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

// The gated delta rule over T tokens in order. Block (h, c) owns value head h's state columns
// 32c .. 32c+31 (S is [dk, dv] f32); its 8 warps split the dk rows, so each lane keeps dk/8
// values of one column in registers for all T tokens: the state is read once and written once
// per call. Per token: S ← decay·S; m = Sᵀk; δ = β(v − m); S ← S + k δᵀ; o = Sᵀq, with q and k
// (the head's key head) L2-normalized here (q also scaled by 1/√dk). o goes to y un-normalized;
// dn_gated_norm applies RMSNorm(o)·w·silu(z) per head. Requires dk % 8 == 0, dk ≤ 256,
// dv % 32 == 0. `tiled` picks the value-head order (DeltaNetWeights::value_heads_tiled).
#define DN_MAXR 32
extern "C" __global__ void __launch_bounds__(256) dn_recurrent(const float* __restrict__ conv_out,
                                                              const float* __restrict__ bb,
                                                              const float* __restrict__ aa,
                                                              const float* __restrict__ neg_a,
                                                              const float* __restrict__ dt_bias,
                                                              float* __restrict__ state, float* __restrict__ y,
                                                              int T, int hk, int hv, int dk, int dv,
                                                              int tiled) { pdl_prologue();
    __shared__ float qk[2 * 256];
    __shared__ float red[8][32];
    __shared__ float bcast[32];
    const int h = blockIdx.x;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int j = blockIdx.y * 32 + lane;
    // Grouped value heads (HF) read key head h / (hv/hk); tiled ones (llama.cpp's Qwen3.5 GGUFs)
    // read h mod hk.
    const int kh = tiled ? h % hk : h / (hv / hk);
    const int key_dim = hk * dk, conv_dim = 2 * key_dim + hv * dv;
    const int nr = dk / 8, i0 = w * nr;
    float* S = state + (long long)h * dk * dv;
    float s[DN_MAXR];
#pragma unroll
    for (int x = 0; x < DN_MAXR; x++)
        if (x < nr) s[x] = S[(long long)(i0 + x) * dv + j];
    const float qscale = 1.f / sqrtf((float)dk);
    for (int t = 0; t < T; t++) {
        const float* row = conv_out + (long long)t * conv_dim;
        float sq = 0.f, sk = 0.f;
        for (int i = threadIdx.x; i < dk; i += blockDim.x) {
            const float a = row[kh * dk + i], b = row[key_dim + kh * dk + i];
            qk[i] = a;
            qk[dk + i] = b;
            sq += a * a;
            sk += b * b;
        }
        sq = block_sum(sq);
        sk = block_sum(sk);
        const float iq = qscale / sqrtf(sq + 1e-6f), ik = 1.f / sqrtf(sk + 1e-6f);
        const float a = aa[(long long)t * hv + h] + dt_bias[h];
        const float sp = a > 20.f ? a : log1pf(expf(a));
        const float decay = expf(neg_a[h] * sp);
        const float beta = sigmoidf_(bb[(long long)t * hv + h]);
        float m = 0.f;
#pragma unroll
        for (int x = 0; x < DN_MAXR; x++)
            if (x < nr) {
                s[x] *= decay;
                m += s[x] * (qk[dk + i0 + x] * ik);
            }
        red[w][lane] = m;
        __syncthreads();
        if (w == 0) {
            float tot = 0.f;
            for (int x = 0; x < 8; x++) tot += red[x][lane];
            bcast[lane] = beta * (row[2 * key_dim + h * dv + j] - tot);
        }
        __syncthreads();
        const float delta = bcast[lane];
        float o = 0.f;
#pragma unroll
        for (int x = 0; x < DN_MAXR; x++)
            if (x < nr) {
                s[x] += (qk[dk + i0 + x] * ik) * delta;
                o += s[x] * (qk[i0 + x] * iq);
            }
        __syncthreads();
        red[w][lane] = o;
        __syncthreads();
        if (w == 0) {
            float tot = 0.f;
            for (int x = 0; x < 8; x++) tot += red[x][lane];
            y[(long long)t * hv * dv + (long long)h * dv + j] = tot;
        }
        __syncthreads();
    }
#pragma unroll
    for (int x = 0; x < DN_MAXR; x++)
        if (x < nr) S[(long long)(i0 + x) * dv + j] = s[x];
}

// ---- GatedDeltaNet prefill: the same arithmetic as dn_conv + dn_recurrent, laid out for many
// tokens (decode keeps the kernels above). dn_conv_tokens computes every (token, channel) in
// parallel from the window [state rows; new rows] (same summation order as dn_conv), then
// dn_conv_state shifts the window; dn_prep L2-normalizes q and k in place (q also by 1/√dk) and
// turns a into the decay and b into beta, all tokens at once; dn_recurrent_tokens then only runs
// the recurrence, which is sequential in tokens.

// out[t, ch] = silu(Σ_j w[ch, j] · E[t + j]) with E = [state (kc-1 rows); qkv (T rows)].
extern "C" __global__ void dn_conv_tokens(const float* __restrict__ qkv, const float* __restrict__ state,
                                          const float* __restrict__ convw, float* __restrict__ out, int T,
                                          int conv_dim, int kc) { pdl_prologue();
    const long long n = (long long)T * conv_dim;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(i / conv_dim), ch = (int)(i % conv_dim);
        float u = 0.f;
        for (int j = 0; j < kc; j++) {
            const int e = t + j;  // row of E
            const float in = e < kc - 1 ? state[(long long)e * conv_dim + ch] : qkv[(long long)(e - (kc - 1)) * conv_dim + ch];
            u += convw[(long long)ch * kc + j] * in;
        }
        out[i] = siluf_(u);
    }
}

// The conv state after T rows: its kc-1 rows become E[T .. T+kc-2]. Ascending rows read E rows at
// or past their own, so the in-place shift never reads a row it already wrote.
extern "C" __global__ void dn_conv_state(const float* __restrict__ qkv, float* __restrict__ state, int T,
                                         int conv_dim, int kc) { pdl_prologue();
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= conv_dim) return;
    for (int i = 0; i < kc - 1; i++) {
        const int e = T + i;
        state[(long long)i * conv_dim + ch] =
            e < kc - 1 ? state[(long long)e * conv_dim + ch] : qkv[(long long)(e - (kc - 1)) * conv_dim + ch];
    }
}

// Block (token, head): heads < hk normalize q and k of key head `head` in conv_out (blockDim ≥
// dk... any size: strided); heads ≥ hk (one block per token) compute decay and beta of every
// value head into a and b.
extern "C" __global__ void dn_prep(float* __restrict__ conv_out, float* __restrict__ bb, float* __restrict__ aa,
                                   const float* __restrict__ neg_a, const float* __restrict__ dt_bias, int hk,
                                   int hv, int dk, int dv) { pdl_prologue();
    const int t = blockIdx.x, kh = blockIdx.y;
    const int key_dim = hk * dk, conv_dim = 2 * key_dim + hv * dv;
    if (kh == hk) {
        for (int h = threadIdx.x; h < hv; h += blockDim.x) {
            const float a = aa[(long long)t * hv + h] + dt_bias[h];
            const float sp = a > 20.f ? a : log1pf(expf(a));
            aa[(long long)t * hv + h] = expf(neg_a[h] * sp);
            bb[(long long)t * hv + h] = sigmoidf_(bb[(long long)t * hv + h]);
        }
        return;
    }
    float* q = conv_out + (long long)t * conv_dim + kh * dk;
    float* k = q + key_dim;
    float sq = 0.f, sk = 0.f;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        sq += q[i] * q[i];
        sk += k[i] * k[i];
    }
    sq = block_sum(sq);
    sk = block_sum(sk);
    const float iq = (1.f / sqrtf((float)dk)) / sqrtf(sq + 1e-6f), ik = 1.f / sqrtf(sk + 1e-6f);
    for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        q[i] *= iq;
        k[i] *= ik;
    }
}

// The delta rule over T tokens after dn_prep. A block of 4 warps owns 32 state columns of value
// head h, a warp 8 of them: lane = (column jj = lane % 8, quarter qr = lane / 8 of the dk rows),
// so a column's sums over dk are 4 partials joined by two shuffles and no block barrier. Rows per
// lane NR = dk / 4 (instances for dk 16, 32, 64, 128); dv a multiple of 32. The inputs of DN_TT
// tokens (q, k, the block's 32 values of v, decay, beta) are staged in shared memory at once, so
// the sequential loop reads no global memory.
#define DN_TT 32
template <int NR>
__device__ __forceinline__ void dn_recurrent_tokens(const float* __restrict__ conv_out,
                                                    const float* __restrict__ beta_t,
                                                    const float* __restrict__ decay_t, float* __restrict__ state,
                                                    float* __restrict__ y, int T, int hk, int hv, int dk, int dv,
                                                    int tiled) {
    constexpr int DK = 4 * NR;
    __shared__ float4 sq4[DN_TT * DK / 4];
    __shared__ float4 sk4[DN_TT * DK / 4];
    __shared__ float sv[DN_TT][32];
    __shared__ float sdec[DN_TT], sbeta[DN_TT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, jj = lane & 7, qr = lane >> 3;
    const int per_head = dv / 32;
    const int h = blockIdx.x / per_head, jb = (blockIdx.x % per_head) * 32;
    const int j = jb + warp * 8 + jj;
    const int kh = tiled ? h % hk : h / (hv / hk);
    const int key_dim = hk * dk, conv_dim = 2 * key_dim + hv * dv;
    const int r0 = qr * NR;
    float* S = state + (long long)h * dk * dv;
    float s[NR];
#pragma unroll
    for (int x = 0; x < NR; x++) s[x] = S[(long long)(r0 + x) * dv + j];
    float* sq = reinterpret_cast<float*>(sq4);
    float* sk = reinterpret_cast<float*>(sk4);
    for (int t0 = 0; t0 < T; t0 += DN_TT) {
        const int nt = min(DN_TT, T - t0);
        __syncthreads();  // the previous chunk's reads are done
        for (int i = threadIdx.x; i < nt * DK; i += blockDim.x) {
            const int tt = i / DK, c = i % DK;
            const float* row = conv_out + (long long)(t0 + tt) * conv_dim + kh * dk + c;
            sq[i] = row[0];
            sk[i] = row[key_dim];
        }
        for (int i = threadIdx.x; i < nt * 32; i += blockDim.x)
            sv[i / 32][i % 32] = conv_out[(long long)(t0 + i / 32) * conv_dim + 2 * key_dim + (long long)h * dv + jb + i % 32];
        for (int i = threadIdx.x; i < nt; i += blockDim.x) {
            sdec[i] = decay_t[(long long)(t0 + i) * hv + h];
            sbeta[i] = beta_t[(long long)(t0 + i) * hv + h];
        }
        __syncthreads();
        for (int tt = 0; tt < nt; tt++) {
            float k[NR], q[NR];
#pragma unroll
            for (int x = 0; x < NR / 4; x++) {
                const float4 a = sk4[(tt * DK + r0) / 4 + x], b = sq4[(tt * DK + r0) / 4 + x];
                k[4 * x] = a.x;
                k[4 * x + 1] = a.y;
                k[4 * x + 2] = a.z;
                k[4 * x + 3] = a.w;
                q[4 * x] = b.x;
                q[4 * x + 1] = b.y;
                q[4 * x + 2] = b.z;
                q[4 * x + 3] = b.w;
            }
            const float v = sv[tt][warp * 8 + jj], dec = sdec[tt], bet = sbeta[tt];
            float m[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int x = 0; x < NR; x++) {
                s[x] *= dec;
                m[x & 3] += s[x] * k[x];
            }
            float mm = (m[0] + m[1]) + (m[2] + m[3]);
            mm += __shfl_xor_sync(0xffffffffu, mm, 8);
            mm += __shfl_xor_sync(0xffffffffu, mm, 16);
            const float delta = bet * (v - mm);
            float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int x = 0; x < NR; x++) {
                s[x] += k[x] * delta;
                o[x & 3] += s[x] * q[x];
            }
            float oo = (o[0] + o[1]) + (o[2] + o[3]);
            oo += __shfl_xor_sync(0xffffffffu, oo, 8);
            oo += __shfl_xor_sync(0xffffffffu, oo, 16);
            if (qr == 0) y[(long long)(t0 + tt) * hv * dv + (long long)h * dv + j] = oo;
        }
    }
#pragma unroll
    for (int x = 0; x < NR; x++) S[(long long)(r0 + x) * dv + j] = s[x];
}

#define DN_TOKENS(NR)                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) dn_recurrent_tokens_r##NR(                               \
        const float* __restrict__ conv_out, const float* __restrict__ beta_t, const float* __restrict__ decay_t, \
        float* __restrict__ state, float* __restrict__ y, int T, int hk, int hv, int dk, int dv, int tiled) { pdl_prologue();  \
        dn_recurrent_tokens<NR>(conv_out, beta_t, decay_t, state, y, T, hk, hv, dk, dv, tiled);              \
    }
DN_TOKENS(4)
DN_TOKENS(8)
DN_TOKENS(16)
DN_TOKENS(32)

// y[t, h] ← RMSNorm(y[t, h])·w·silu(z[t, h]) per value head (the gated norm of GatedDeltaNet).
// One block per (head, token).
extern "C" __global__ void dn_gated_norm(float* __restrict__ y, const float* __restrict__ z,
                                         const float* __restrict__ normw, int hv, int dv, float eps) { pdl_prologue();
    const long long base = ((long long)blockIdx.y * hv + blockIdx.x) * dv;
    float ss = 0.f;
    for (int j = threadIdx.x; j < dv; j += blockDim.x) ss += y[base + j] * y[base + j];
    ss = block_sum(ss);
    const float inv = 1.f / sqrtf(ss / dv + eps);
    for (int j = threadIdx.x; j < dv; j += blockDim.x) y[base + j] = y[base + j] * inv * normw[j] * siluf_(z[base + j]);
}

// ---------------------------------------------------------------------------------------------
// Router: softmax over e logits, top-k (ties to the lower index), weights renormalized over the
// k when `norm`. One warp per token, probabilities in registers (e ≤ 1024, k ≤ 32).
extern "C" __global__ void router_topk(const float* __restrict__ logits, int e, int k, int norm,
                                       int* __restrict__ ids, float* __restrict__ wts) { pdl_prologue();
    const int lane = threadIdx.x & 31;
    const long long tok = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const float* l = logits + tok * e;
    float p[32];
    float mx = -INFINITY;
#pragma unroll
    for (int x = 0; x < 32; x++) {
        const int i = x * 32 + lane;
        p[x] = i < e ? l[i] : -INFINITY;
        mx = fmaxf(mx, p[x]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int x = 0; x < 32; x++) {
        const int i = x * 32 + lane;
        p[x] = i < e ? expf(p[x] - mx) : 0.f;
        sum += p[x];
    }
    sum = warp_sum(sum);
    const float inv = 1.f / sum;
#pragma unroll
    for (int x = 0; x < 32; x++) p[x] = (x * 32 + lane) < e ? p[x] * inv : -1.f;
    float chosen = 0.f, mine = 0.f;
    int myid = 0;
    for (int r = 0; r < k; r++) {
        float best = -2.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int x = 0; x < 32; x++)
            if (p[x] > best) {  // strictly greater: the lowest index wins ties within a lane
                best = p[x];
                bi = x * 32 + lane;
            }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) {
                best = ov;
                bi = oi;
            }
        }
        chosen += best;
        if (lane == r) {
            mine = best;
            myid = bi;
        }
        if ((bi & 31) == lane) {
#pragma unroll
            for (int x = 0; x < 32; x++)
                if (x == (bi >> 5)) p[x] = -2.f;
        }
    }
    if (lane < k) {
        ids[tok * k + lane] = myid;
        wts[tok * k + lane] = mine / (norm ? chosen : 1.f);
    }
}

// ---------------------------------------------------------------------------------------------
// Multi-token GEMM for prefill: y[t, r] = W[r]·x[t]. One warp per row and up to TT inputs: each
// 16-byte chunk of the row is dequantized once into registers and used for the TT inputs, so
// weights are read once per TT inputs.
#define TT 8

// Dequantizes 16-byte chunk c of a row into wv (FMT 0: affine with BITS and group gs, row scales
// sr/biases br; 1: f32; 2: bf16).
template <int FMT, int BITS, int VPC>
__device__ __forceinline__ void chunk_values(const uint4 q, const u16* __restrict__ sr, const u16* __restrict__ br,
                                             int gs, int c, float* wv) {
    const u32 words[4] = {q.x, q.y, q.z, q.w};
    if constexpr (FMT == 0) {
        constexpr int VPW = 32 / BITS;
        constexpr u32 MASK = BITS == 8 ? 0xffu : ((1u << BITS) - 1u);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            // A word never straddles groups (groups are ≥ 32 codes); a chunk may (2 bits, g32).
            const int g = (c * VPC + k * VPW) / gs;
            const float s = bf16f(sr[g]), b = bf16f(br[g]);
#pragma unroll
            for (int v = 0; v < VPW; v++) wv[k * VPW + v] = (float)((words[k] >> (v * BITS)) & MASK) * s + b;
        }
    } else if constexpr (FMT == 1) {
#pragma unroll
        for (int k = 0; k < 4; k++) wv[k] = __uint_as_float(words[k]);
    } else {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            wv[2 * k] = __uint_as_float(words[k] << 16);
            wv[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
        }
    }
}

// One warp computes row `row` of W for nt ≤ TT inputs: the values of chunk c of input tt are at
// xs[tt] + c·XS (XS = VPC for rows in global memory, read with __ldg when LDG; VPC + 4 for the
// padded shared-memory copy); the results go to y[tt · ystride + row].
template <int FMT, int BITS, int XS, bool LDG>
__device__ __forceinline__ void gemm_row(const uint4* __restrict__ w, const u16* __restrict__ sc,
                                         const u16* __restrict__ bi, int gs, const float* const* xs, int nt,
                                         float* __restrict__ y, long long ystride, long long row, int cols) {
    constexpr int VPC = FMT == 0 ? 128 / BITS : (FMT == 1 ? 4 : 8);
    const int lane = threadIdx.x & 31;
    const int nch = cols / VPC;
    const uint4* wr = w + row * nch;
    const u16* sr = FMT == 0 ? sc + row * (cols / gs) : nullptr;
    const u16* br = FMT == 0 ? bi + row * (cols / gs) : nullptr;
    float acc[TT];
#pragma unroll
    for (int i = 0; i < TT; i++) acc[i] = 0.f;
    for (int c = lane; c < nch; c += 32) {
        float wv[VPC];
        chunk_values<FMT, BITS, VPC>(wr[c], sr, br, gs, c, wv);
#pragma unroll
        for (int tt = 0; tt < TT; tt++) {
            if (tt < nt) {
                const float4* xp = reinterpret_cast<const float4*>(xs[tt] + (long long)c * XS);
                float a = acc[tt];
#pragma unroll
                for (int v = 0; v < VPC / 4; v++) {
                    const float4 xv = LDG ? __ldg(xp + v) : xp[v];
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
        if (lane == 0 && tt < nt) y[tt * ystride + row] = v;
    }
}

// Grouped GEMM over the routed experts of a prefill pass: work item blockIdx.y is
// items[i] = (expert, first pair, pairs ≤ TT) of one expert; pair p reads input row
// x[xrow ? xrow[p] : p] and writes out[p]. The expert's matrix is at table[expert] + offsets.
// One launch covers every expert of the layer (or of a group of them that fits the GPU cache).
// A plain matrix over ntok inputs is the same with items and table null: item y is the y-th tile
// of TT inputs and the offsets are the matrix's own addresses.
struct GemmMat {
    unsigned long long w, s, b;  // byte offsets inside the slot (absolute when table is null)
    int rows, cols;
};

__device__ __forceinline__ int4 grouped_item(const int4* __restrict__ items, int ntok) {
    if (items) return items[blockIdx.y];
    const int t0 = blockIdx.y * TT;
    return make_int4(0, t0, min(TT, ntok - t0), 0);
}
template <int FMT, int BITS>
__device__ __forceinline__ void gemm_grouped(const unsigned long long* __restrict__ table, GemmMat m, int gs,
                                             const int4* __restrict__ items, const int* __restrict__ xrow,
                                             const float* __restrict__ x, float* __restrict__ out, int ntok) {
    constexpr int VPC = FMT == 0 ? 128 / BITS : (FMT == 1 ? 4 : 8);
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= m.rows) return;
    const int4 it = grouped_item(items, ntok);
    const unsigned long long base = table ? table[it.x] : 0ull;
    const float* xs[TT];
#pragma unroll
    for (int tt = 0; tt < TT; tt++) {
        const int p = it.y + (tt < it.z ? tt : 0);
        xs[tt] = x + (long long)(xrow ? xrow[p] : p) * m.cols;
    }
    gemm_row<FMT, BITS, VPC, true>(reinterpret_cast<const uint4*>(base + m.w),
                                   reinterpret_cast<const u16*>(base + m.s), reinterpret_cast<const u16*>(base + m.b),
                                   gs, xs, it.z, out + (long long)it.y * m.rows, m.rows, row, m.cols);
}

// The same with the item's inputs staged in shared memory (padded by 16 bytes per chunk of
// codes, so a warp's 16-byte reads fall in distinct banks) and GROUPED_ROWS rows per block: the
// x traffic is one staging per block instead of one read per weight chunk. Needs
// TT·(cols/VPC)·XS·4 bytes of dynamic shared memory (opt-in above 48 KiB).
#define GROUPED_ROWS 128
template <int FMT, int BITS>
__device__ __forceinline__ void gemm_grouped_sx(const unsigned long long* __restrict__ table, GemmMat m, int gs,
                                                const int4* __restrict__ items, const int* __restrict__ xrow,
                                                const float* __restrict__ x, float* __restrict__ out, int ntok) {
    constexpr int VPC = FMT == 0 ? 128 / BITS : (FMT == 1 ? 4 : 8);
    constexpr int XS = FMT == 0 ? VPC + 4 : VPC;
    extern __shared__ float4 gsx4[];
    float* sx = reinterpret_cast<float*>(gsx4);
    const int4 it = grouped_item(items, ntok);
    const int n = it.z;
    const int nch = m.cols / VPC;
    const int tstride = nch * XS;
    for (int tt = 0; tt < n; tt++) {
        const int p = it.y + tt;
        const float4* src = reinterpret_cast<const float4*>(x + (long long)(xrow ? xrow[p] : p) * m.cols);
        for (int i = threadIdx.x; i < m.cols / 4; i += blockDim.x) {
            const int e = 4 * i;
            reinterpret_cast<float4*>(sx + tt * tstride + (e / VPC) * XS + (e % VPC))[0] = __ldg(src + i);
        }
    }
    __syncthreads();
    const unsigned long long base = table ? table[it.x] : 0ull;
    const float* xs[TT];
#pragma unroll
    for (int tt = 0; tt < TT; tt++) xs[tt] = sx + tt * tstride;
    const long long r0 = (long long)blockIdx.x * GROUPED_ROWS;
    const long long r1 = min((long long)m.rows, r0 + GROUPED_ROWS);
    for (long long row = r0 + (threadIdx.x >> 5); row < r1; row += blockDim.x >> 5)
        gemm_row<FMT, BITS, XS, false>(reinterpret_cast<const uint4*>(base + m.w),
                                       reinterpret_cast<const u16*>(base + m.s),
                                       reinterpret_cast<const u16*>(base + m.b), gs, xs, n,
                                       out + (long long)it.y * m.rows, m.rows, row, m.cols);
}

#define GROUPED_ARGS                                                                                         \
    const unsigned long long *__restrict__ table, GemmMat m, int gs, const int4 *__restrict__ items,          \
        const int *__restrict__ xrow, const float *__restrict__ x, float *__restrict__ out, int ntok
#define GROUPED(NAME, FMT, BITS)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemm_grouped_##NAME(GROUPED_ARGS) { pdl_prologue();                    \
        gemm_grouped<FMT, BITS>(table, m, gs, items, xrow, x, out, ntok);                                    \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) gemm_grouped_sx_##NAME(GROUPED_ARGS) { pdl_prologue();                 \
        gemm_grouped_sx<FMT, BITS>(table, m, gs, items, xrow, x, out, ntok);                                 \
    }
GROUPED(affine_b2, 0, 2)
GROUPED(affine_b4, 0, 4)
GROUPED(affine_b8, 0, 8)
GROUPED(f32, 1, 32)
GROUPED(bf16, 2, 16)

// ---------------------------------------------------------------------------------------------
// The grouped GEMM on tensor cores (sm_80 and later): mma.m16n8k8 on TF32 operands with f32
// accumulation, at f32-grade accuracy. x is split into two TF32 parts, x = xh + xl (xl the
// rounding rest: together 21+ mantissa bits), and every product is taken with both. Weights that
// TF32 holds exactly (affine codes, see CODES; bf16) are used as they are; others (f32, and affine
// values q·s + b where CODES does not apply) are split the same way, and the small·small product
// is dropped (2^-22 of the term). Same arguments and items as gemm_grouped, but an item holds up
// to TC_NT = 32 pairs (4 n-tiles of 8; n-tiles past the item's pairs are skipped) and a block of
// 4 warps computes TC_ROWS = 128 weight rows (2 m-tiles of 16 per warp).
//
// The order of the k (column) sum is free, so each k-step is laid out for the weights' storage:
// in a chunk of 4·PW columns lane (g, t) = (lane / 4, lane % 4) owns the PW consecutive columns
// [t·PW, t·PW + PW) — one 32-bit word of codes (PW = 32 / BITS), or two floats — and k-step j
// gives it columns t·PW + 2j and t·PW + 2j + 1 as the fragment's k = t and k = t + 4. B (x) uses
// the same map, so a lane reads x as float2 from the staged copies.
//
// CODES (affine; gs a multiple of the chunk and a divisor of TC_KC): A holds the codes
// themselves as the exact TF32 value 1 + q·2^-BITS (two integer instructions per code), summed per
// group into P; at the end of each group Σ (q·s + b)·x = s·2^BITS·P + (b − s·2^BITS)·X with
// X = Σ x over the group.
#if __CUDA_ARCH__ >= 800
#define TC_NT 32
#define TC_ROWS 128
#define TC_KC 128

__device__ __forceinline__ u32 tf32_bits(float v) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
}

__device__ __forceinline__ void mma_tf32(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The PW values of a row starting at column c (a multiple of PW): FMT 0 affine (BITS, group gs,
// the row's scales sr / biases br), 1 f32, 2 bf16.
template <int FMT, int BITS, int PW>
__device__ __forceinline__ void tc_piece(const unsigned char* __restrict__ wrow, const u16* __restrict__ sr,
                                         const u16* __restrict__ br, int gs, int c, float* v) {
    if constexpr (FMT == 0) {
        constexpr u32 MASK = BITS == 8 ? 0xffu : ((1u << BITS) - 1u);
        const u32 word = __ldg(reinterpret_cast<const u32*>(wrow) + c / PW);
        const int g = c / gs;
        const float s = bf16f(__ldg(sr + g)), b = bf16f(__ldg(br + g));
#pragma unroll
        for (int i = 0; i < PW; i++) v[i] = (float)((word >> (i * BITS)) & MASK) * s + b;
    } else if constexpr (FMT == 1) {
        const float2 f = __ldg(reinterpret_cast<const float2*>(wrow) + c / 2);
        v[0] = f.x;
        v[1] = f.y;
    } else {
        const u32 word = __ldg(reinterpret_cast<const u32*>(wrow) + c / 2);
        v[0] = __uint_as_float(word << 16);
        v[1] = __uint_as_float(word & 0xffff0000u);
    }
}

// The tensor-core GEMM's input, once per launch instead of once per block: rows of x split into
// xh = tf32(x) and xl = tf32(x − xh), and with gs > 0 xsum[r][g] = Σ over group g of row r of
// (xh + xl). gs a multiple of 4 dividing cols (gs = 0: no sums, chunks of 8).
extern "C" __global__ void split_x_tc(const float* __restrict__ x, float* __restrict__ xh, float* __restrict__ xl,
                                      float* __restrict__ xsum, long long rows, int cols, int gs) { pdl_prologue();
    const int chunk = gs > 0 ? gs : 8;
    const int nc = cols / chunk;
    const long long n = rows * nc;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long o = (i / nc) * cols + (long long)(i % nc) * chunk;
        const float4* src = reinterpret_cast<const float4*>(x + o);
        float4* dh = reinterpret_cast<float4*>(xh + o);
        float4* dl = reinterpret_cast<float4*>(xl + o);
        float a0 = 0.f, a1 = 0.f;
        for (int c = 0; c < chunk / 4; c++) {
            const float4 v = src[c];
            float4 h, l;
            h.x = __uint_as_float(tf32_bits(v.x));
            h.y = __uint_as_float(tf32_bits(v.y));
            h.z = __uint_as_float(tf32_bits(v.z));
            h.w = __uint_as_float(tf32_bits(v.w));
            l.x = __uint_as_float(tf32_bits(v.x - h.x));
            l.y = __uint_as_float(tf32_bits(v.y - h.y));
            l.z = __uint_as_float(tf32_bits(v.z - h.z));
            l.w = __uint_as_float(tf32_bits(v.w - h.w));
            dh[c] = h;
            dl[c] = l;
            a0 += (h.x + l.x) + (h.y + l.y);
            a1 += (h.z + l.z) + (h.w + l.w);
        }
        if (gs > 0) xsum[i] = a0 + a1;
    }
}

// The end of a group: acc += s[row]·P (+ b[row]·X with OFFSET, X = Σx of the group's inputs from
// xsum row xs_row[nf][e] at grp), then P = 0.
template <int NT, bool OFFSET>
__device__ __forceinline__ void tc_fold(const float (&s)[4], const float (&b)[4], const float* const (&xs_row)[4][2],
                                        int grp, float (&part)[2][4][4], float (&acc)[2][4][4]) {
#pragma unroll
    for (int nf = 0; nf < 4; nf++) {
        if (nf < NT) {
            const float x0 = OFFSET ? __ldg(xs_row[nf][0] + grp) : 0.f;
            const float x1 = OFFSET ? __ldg(xs_row[nf][1] + grp) : 0.f;
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int i = 2 * mt + h;
                    float* ac = acc[mt][nf];
                    float* pp = part[mt][nf];
                    if constexpr (OFFSET) {
                        ac[2 * h] = fmaf(s[i], pp[2 * h], fmaf(b[i], x0, ac[2 * h]));
                        ac[2 * h + 1] = fmaf(s[i], pp[2 * h + 1], fmaf(b[i], x1, ac[2 * h + 1]));
                    } else {
                        ac[2 * h] = fmaf(s[i], pp[2 * h], ac[2 * h]);
                        ac[2 * h + 1] = fmaf(s[i], pp[2 * h + 1], ac[2 * h + 1]);
                    }
                    pp[2 * h] = 0.f;
                    pp[2 * h + 1] = 0.f;
                }
        }
    }
}

// One mma step of exact codes against the staged x at column col of the n-tiles' rows (row
// stride TS), lo part first: P += A·(xl + xh). code(i, e) gives the TF32 bits of the warp's row i
// (0, 1: m-tile 0's rows g, g + 8; 2, 3: m-tile 1's) at k-slot e (0: k = t, 1: k = t + 4), which
// is where mma.m16n8k8 wants them: a0/a1 are k = t of rows g / g + 8, a2/a3 k = t + 4.
template <int NT, int TS, typename Code>
__device__ __forceinline__ void tc_codes_step(Code code, int col, int g, const float* __restrict__ xsh,
                                              const float* __restrict__ xsl, float (&part)[2][4][4]) {
    u32 a[2][4];
#pragma unroll
    for (int e = 0; e < 2; e++)
#pragma unroll
        for (int i = 0; i < 4; i++) a[i / 2][(i % 2) + 2 * e] = code(i, e);
#pragma unroll
    for (int nf = 0; nf < 4; nf++) {
        if (nf < NT) {
            const int o = (g + 8 * nf) * TS + col;
            const float2 h2 = *reinterpret_cast<const float2*>(xsh + o);
            const float2 l2 = *reinterpret_cast<const float2*>(xsl + o);
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                mma_tf32(part[mt][nf], a[mt], __float_as_uint(l2.x), __float_as_uint(l2.y));
                mma_tf32(part[mt][nf], a[mt], __float_as_uint(h2.x), __float_as_uint(h2.y));
            }
        }
    }
}

// One staged window [k0, k0 + kc) of gemm_grouped_tc for a warp whose item has NT n-tiles (a
// compile-time count, so no mma.sync sits under a predicate).
template <int FMT, int BITS, bool CODES, int NT>
__device__ __forceinline__ void tc_window(int k0, int kc, int gs, int t, int g, const unsigned char* const (&wr)[4],
                                          const u16* const (&sr)[4], const u16* const (&br)[4],
                                          const bool (&live)[4], const float* __restrict__ xsh,
                                          const float* __restrict__ xsl, const float* const (&xs_row)[4][2],
                                          float (&acc)[2][4][4]) {
    constexpr int PW = FMT == 0 ? 32 / BITS : 2;
    constexpr int CW = 4 * PW;
    constexpr bool ASPLIT = !(CODES || FMT == 2);
    constexpr int TS = TC_KC + (PW == 2 ? 8 : 2);
    if constexpr (CODES) {
        // Code v of a word into the mantissa of 1.0: bits [23 − BITS, 23).
        constexpr int SH = 23 - BITS;
        constexpr u32 FIELD = ((1u << BITS) - 1u) << SH;
        float part[2][4][4];
#pragma unroll
        for (int a = 0; a < 2; a++)
#pragma unroll
            for (int b = 0; b < 4; b++)
#pragma unroll
                for (int c = 0; c < 4; c++) part[a][b][c] = 0.f;
        // Chunks left in the current group (groups start at the window's start: gs divides TC_KC).
        const int per_group = gs / CW;
        int left = per_group;
#pragma unroll 2
        for (int cc = 0; cc < kc; cc += CW) {
            const int c = k0 + cc + t * PW;
            u32 word[4];
#pragma unroll
            for (int i = 0; i < 4; i++) word[i] = live[i] ? __ldg(reinterpret_cast<const u32*>(wr[i]) + c / PW) : 0u;
#pragma unroll
            for (int j = 0; j < PW / 2; j++) {
                const auto code = [&](int i, int e) {
                    const int sh = (2 * j + e) * BITS - SH;  // compile-time after unrolling
                    const u32 wv = sh >= 0 ? (word[i] >> sh) : (word[i] << -sh);
                    return (wv & FIELD) | 0x3f800000u;
                };
                tc_codes_step<NT, TS>(code, cc + t * PW + 2 * j, g, xsh, xsl, part);
            }
            if (--left == 0) {
                left = per_group;
                // End of a group: fold P into the result with the rows' scale and bias.
                const int grp = (k0 + cc) / gs;
                float s2[4], bb[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const float sc = live[i] ? bf16f(__ldg(sr[i] + grp)) : 0.f;
                    s2[i] = sc * (float)(1 << BITS);
                    bb[i] = (live[i] ? bf16f(__ldg(br[i] + grp)) : 0.f) - s2[i];
                }
                tc_fold<NT, true>(s2, bb, xs_row, grp, part, acc);
            }
        }
    } else {
#pragma unroll 2
        for (int cc = 0; cc < kc; cc += CW) {
            const int c = k0 + cc + t * PW;
            float w[4][PW];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if (live[i]) {
                    tc_piece<FMT, BITS, PW>(wr[i], sr[i], br[i], gs, c, w[i]);
                } else {
#pragma unroll
                    for (int v = 0; v < PW; v++) w[i][v] = 0.f;
                }
            }
#pragma unroll
            for (int j = 0; j < PW / 2; j++) {
                u32 ah[2][4], al[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        // r: a0 (row g, k = t), a1 (row g + 8, k = t), a2 (row g, k = t + 4), a3.
                        const float v = w[2 * mt + (r & 1)][2 * j + (r >> 1)];
                        ah[mt][r] = ASPLIT ? tf32_bits(v) : __float_as_uint(v);
                        if constexpr (ASPLIT) al[mt][r] = tf32_bits(v - __uint_as_float(ah[mt][r]));
                    }
                }
#pragma unroll
                for (int nf = 0; nf < 4; nf++) {
                    if (nf < NT) {
                        const int o = (g + 8 * nf) * TS + cc + t * PW + 2 * j;
                        const float2 h2 = *reinterpret_cast<const float2*>(xsh + o);
                        const float2 l2 = *reinterpret_cast<const float2*>(xsl + o);
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            if constexpr (ASPLIT)
                                mma_tf32(acc[mt][nf], al[mt], __float_as_uint(h2.x), __float_as_uint(h2.y));
                            mma_tf32(acc[mt][nf], ah[mt], __float_as_uint(l2.x), __float_as_uint(l2.y));
                            mma_tf32(acc[mt][nf], ah[mt], __float_as_uint(h2.x), __float_as_uint(h2.y));
                        }
                    }
                }
            }
        }
    }
}

// ---- GGML blocks on tensor cores (FMT 3: Q4_K, 4: Q6_K, 5: Q5_K, 6: Q4_0, 7: Q8_0, 8: IQ4_NL,
// 9: IQ4_XS, 10: Q3_K, 11: Q2_K) ----
// A 128-column staging window is half a 256-value super-block (four 32-value blocks of Q4_0 and
// Q8_0). The codes go into A as exact TF32 values, as with affine CODES above: Q4_K as 1 + q/16
// and Q5_K as 1 + q/32 (sub-blocks of 32 with scale d·sc and offset −dmin·m: Σ = 2^B·d·sc·P −
// (2^B·d·sc + dmin·m)·X, X = Σx over the sub-block from xsum), Q6_K as (q − 32)/64 (sub-blocks
// of 16 with scale d·sc: Σ = 64·d·sc·P, no X), Q4_0 as (q − 8)/16 (Σ = 16·d·P), Q8_0 as q/256
// (Σ = 256·d·P) and IQ4_NL / IQ4_XS as level/256 (the non-linear levels −127..113 are integers:
// Σ = 256·d·P, IQ4_XS's d being the sub-block's d·(ls − 32)), Q3_K as (q − 4)/8 (sub-blocks of 16 with
// scale d·(sc − 32): Σ = 8·d·(sc − 32)·P) and Q2_K as 1 + q/4 (sub-blocks of 16 with scale d·sc and
// offset −dmin·m: Σ = 4·d·sc·P − (4·d·sc + dmin·m)·X). P is summed per (sub-)block on the tensor cores and folded into the result with
// f32 FMAs at its end.
// Which value a lane's k-slot holds follows the block layout, so that every mma step stays inside
// one sub-block and a lane's loads are whole words: step s, lane t, k-slot e (0: k = t, 1: k = t +
// 4) reads the staged x at 8·s + 2·t + e, and the window is staged in that order
// (tc_stage_pair). Q4_K: step 8p + 4G + s' (pair p of sub-blocks, G 0 = low nibbles / 1 = high,
// s' < 4) holds value 64p + 32G + 16(s'/2) + 4t + 2(s'%2) + e, the nibble of byte 2(s'%2) + e of
// qs word 16h + 8p + 4(s'/2) + t (Q5_K: its fifth bit, bit 2(2h + p) + G of the same byte of qh
// word 4(s'/2) + t). Q6_K: step 8H + 2Q + s'' holds value 32Q + 16H + 8s'' + 2t + e (ggml's q1..q4
// for Q = 0..3 at l = 16H + 8s'' + 2t + e), from the 16-bit loads at ql[l], ql[l + 32] and qh[l].
// Q4_0, Q8_0, IQ4_NL and IQ4_XS keep the values in order (step s holds 8s + 2t + e): byte j of a
// 4-bit block's qs holds values j and j + 16 of its (sub-)block, Q8_0's value j is byte j.

__device__ __forceinline__ float f16f_tc(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// The staged float2 index of the window's value pair c2 (values 2·c2, 2·c2 + 1).
template <int FMT>
__device__ __forceinline__ int tc_stage_pair(int c2) {
    const int v = 2 * c2;
    if constexpr (FMT == 3 || FMT == 5) {
        const int a = v & 31;
        return ((v & 96) + 8 * (2 * (a >> 4) + ((a >> 1) & 1)) + 2 * ((a >> 2) & 3)) >> 1;
    } else if constexpr (FMT == 4 || FMT == 10 || FMT == 11) {
        return (64 * ((v >> 4) & 1) + 16 * (v >> 5) + (v & 15)) >> 1;
    } else {
        return c2;
    }
}

// Q4_K sub-block j's 6-bit scale and min from the super-block header hd (d, dmin, scales[12]);
// ggml's get_scale_min_k4.
__device__ __forceinline__ void q4k_scale_min(const uint4& hd, int j, float& sc, float& mn) {
    const int sh = 8 * (j & 3);
    const u32 y = hd.y >> sh, z = hd.z >> sh, w = hd.w >> sh;
    sc = (float)(j < 4 ? (y & 63) : ((w & 15) | ((y >> 2) & 0x30)));
    mn = (float)(j < 4 ? (z & 63) : (((w >> 4) & 15) | ((z >> 2) & 0x30)));
}

// The TF32 bits of 1 + (level + 128)/256 for IQ4_NL / IQ4_XS nibble q, where level is ggml's
// kvalues_iq4nl[q]: the sixteen level + 128 bytes (1 … 241) live in four immediate words and a
// byte permute picks one from the low or the high eight (__byte_perm uses 3 bits of a selector
// nibble; bit 3 of q chooses between the two).
__device__ __forceinline__ u32 iq4_level_tf32(u32 q) {
    const u32 lo = __byte_perm(0x3F2D1801u, 0x766A5D4Fu, q & 7u);
    const u32 hi = __byte_perm(0xA6998D81u, 0xF1D9C5B5u, q & 7u);
    return (((q & 8u) ? hi : lo) & 0xFFu) << 15 | 0x3f800000u;
}

__device__ __forceinline__ u32 shift_field(u32 v, int sh) { return sh >= 0 ? (v >> sh) : (v << -sh); }

// The window [k0, k0 + 128) of gemm_grouped_tc for GGML rows (FMT 3..11, see above).
template <int FMT, int NT>
__device__ __forceinline__ void tc_window_kq(int k0, int t, int g, const unsigned char* const (&wr)[4],
                                             const bool (&live)[4], const float* __restrict__ xsh,
                                             const float* __restrict__ xsl, const float* const (&xs_row)[4][2],
                                             float (&acc)[2][4][4]) {
    const int sb = k0 >> 8, hf = (k0 >> 7) & 1;
    float part[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) part[a][b][c] = 0.f;
    if constexpr (FMT == 3 || FMT == 5) {
        // Q4_K: header (d, dmin, scales[12]) and qs[128]; Q5_K: the same with qh[32] between.
        constexpr int BYTES = FMT == 3 ? 144 : 176, QS = FMT == 3 ? 16 : 48, B = FMT == 3 ? 4 : 5;
        constexpr int SH = 23 - B;  // the code's place in the mantissa of 1.0
        uint4 hd[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            hd[i] = live[i] ? __ldg(reinterpret_cast<const uint4*>(wr[i] + BYTES * sb)) : make_uint4(0, 0, 0, 0);
        // (Q5_K: one pair at a time, else its extra words push the kernel past 255 registers.)
#pragma unroll(FMT == 5 ? 1 : 2)
        for (int p = 0; p < 2; p++) {
            // Q5_K: the qh words of the lane's bytes, shifted so that this pair's two bits sit at
            // bits 2p, 2p + 1 of each byte (loaded per pair: fewer live registers).
            [[maybe_unused]] u32 qh[4][2];
            if constexpr (FMT == 5) {
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int q = 0; q < 2; q++)
                        qh[i][q] = live[i] ? __ldg(reinterpret_cast<const u32*>(wr[i] + BYTES * sb + 16) + 4 * q + t) >>
                                                 (4 * hf)
                                           : 0u;
            }
            u32 w[4][2];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int q = 0; q < 2; q++)
                    w[i][q] = live[i] ? __ldg(reinterpret_cast<const u32*>(wr[i] + BYTES * sb + QS) + 16 * hf + 8 * p +
                                              4 * q + t)
                                      : 0u;
#pragma unroll
            for (int G = 0; G < 2; G++) {
#pragma unroll
                for (int sp = 0; sp < 4; sp++) {
                    const auto code = [&](int i, int e) {
                        const int b = 2 * (sp & 1) + e;  // byte of the word
                        u32 v = (shift_field(w[i][sp >> 1], 8 * b + 4 * G - SH) & (0xFu << SH)) | 0x3f800000u;
                        if constexpr (FMT == 5) v |= shift_field(qh[i][sp >> 1], 8 * b + 2 * p + G - 22) & (1u << 22);
                        return v;
                    };
                    tc_codes_step<NT, TC_KC + 8>(code, 8 * (8 * p + 4 * G + sp) + 2 * t, g, xsh, xsl, part);
                }
                // End of sub-block j: fold P with 2^B·d·sc and X with −(2^B·d·sc + dmin·m).
                const int j = 4 * hf + 2 * p + G, grp = 8 * sb + j;
                float s2[4], bb[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float sc, mn;
                    q4k_scale_min(hd[i], j, sc, mn);
                    s2[i] = (float)(1 << B) * f16f_tc(hd[i].x & 0xFFFF) * sc;
                    bb[i] = -fmaf(f16f_tc(hd[i].x >> 16), mn, s2[i]);
                }
                tc_fold<NT, true>(s2, bb, xs_row, grp, part, acc);
            }
        }
    } else if constexpr (FMT == 4) {
        // Q6_K: 210-byte super-blocks, 2-byte aligned: 16-bit loads.
        const unsigned char* blk[4];
        float d64[4];
        u32 scw[4][4];  // the window's 8 int8 scales, two per 16-bit word
#pragma unroll
        for (int i = 0; i < 4; i++) {
            blk[i] = wr[i] + 210 * sb;
            const u16* hw = reinterpret_cast<const u16*>(blk[i]);
            d64[i] = live[i] ? 64.f * f16f_tc(__ldg(hw + 104)) : 0.f;
#pragma unroll
            for (int k = 0; k < 4; k++) scw[i][k] = live[i] ? __ldg(hw + 96 + 4 * hf + k) : 0u;
        }
#pragma unroll
        for (int H = 0; H < 2; H++) {
            u32 lo[4][2], hi[4][2], qh[4][2];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int s2 = 0; s2 < 2; s2++) {
                    const u16* hw = reinterpret_cast<const u16*>(blk[i]);
                    const int l = 16 * H + 8 * s2 + 2 * t;
                    lo[i][s2] = live[i] ? __ldg(hw + (64 * hf + l) / 2) : 0u;
                    hi[i][s2] = live[i] ? __ldg(hw + (64 * hf + l + 32) / 2) : 0u;
                    qh[i][s2] = live[i] ? __ldg(hw + (128 + 32 * hf + l) / 2) : 0u;
                }
#pragma unroll
            for (int Q = 0; Q < 4; Q++) {
#pragma unroll
                for (int s2 = 0; s2 < 2; s2++) {
                    const auto code = [&](int i, int e) {
                        const u32 src = (Q & 1) ? hi[i][s2] : lo[i][s2];
                        const u32 v = (shift_field(src, 8 * e + 4 * (Q >> 1) - 17) & (0xFu << 17)) |
                                      (shift_field(qh[i][s2], 8 * e + 2 * Q - 21) & (3u << 21)) | 0x3f800000u;
                        // 1 + q/64 − 1.5 = (q − 32)/64, exact.
                        return __float_as_uint(__uint_as_float(v) - 1.5f);
                    };
                    tc_codes_step<NT, TC_KC + 8>(code, 8 * (8 * H + 2 * Q + s2) + 2 * t, g, xsh, xsl, part);
                }
                // End of the 16-value sub-block 2Q + H of the window: fold P with 64·d·sc.
                const int si = 2 * Q + H;
                float s64[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int sc = (int)(signed char)((scw[i][si >> 1] >> (8 * (si & 1))) & 0xFF);
                    s64[i] = d64[i] * (float)sc;
                }
                tc_fold<NT, false>(s64, s64, xs_row, 0, part, acc);
            }
        }
    } else if constexpr (FMT == 10 || FMT == 11) {
        // Q3_K (110 bytes, 2-byte aligned: hmask[32], qs[64], scales[12], d) and Q2_K (84 bytes:
        // scales[16], qs[64], d, dmin): the window is half hf of a super-block, whose qs byte l
        // (l < 32) holds values 32Q + l in bits 2Q, Q = 0..3 (Q3_K: the high bit at bit 4hf + Q of
        // hmask[l]), so the steps are Q6_K's (16-bit loads at l = 16H + 8s'' + 2t). Q3_K's code
        // goes in as (q − 4)/8 (q = low | high << 2) and needs no Σx; Q2_K's as 1 + q/4, with its
        // sub-block min as an offset over sums of 16.
        constexpr int BYTES = FMT == 10 ? 110 : 84, QS = FMT == 10 ? 32 : 16;
        const u16* hw[4];
        float dd[4];
        [[maybe_unused]] float dm[4];
        u32 scw[4][FMT == 10 ? 6 : 4];  // Q3_K: the 12 scale bytes; Q2_K: the half's 8
#pragma unroll
        for (int i = 0; i < 4; i++) {
            hw[i] = reinterpret_cast<const u16*>(wr[i] + (long long)BYTES * sb);
            if constexpr (FMT == 10) {
                dd[i] = live[i] ? 8.f * f16f_tc(__ldg(hw[i] + 54)) : 0.f;
#pragma unroll
                for (int k = 0; k < 6; k++) scw[i][k] = live[i] ? __ldg(hw[i] + 48 + k) : 0u;
            } else {
                dd[i] = live[i] ? 4.f * f16f_tc(__ldg(hw[i] + 40)) : 0.f;
                dm[i] = live[i] ? f16f_tc(__ldg(hw[i] + 41)) : 0.f;
#pragma unroll
                for (int k = 0; k < 4; k++) scw[i][k] = live[i] ? __ldg(hw[i] + 4 * hf + k) : 0u;
            }
        }
#pragma unroll
        for (int H = 0; H < 2; H++) {
            u32 qv[4][2];
            [[maybe_unused]] u32 hv[4][2];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int s2 = 0; s2 < 2; s2++) {
                    const int l = 16 * H + 8 * s2 + 2 * t;
                    qv[i][s2] = live[i] ? __ldg(hw[i] + (QS + 32 * hf + l) / 2) : 0u;
                    if constexpr (FMT == 10) hv[i][s2] = live[i] ? __ldg(hw[i] + l / 2) : 0u;
                }
#pragma unroll
            for (int Q = 0; Q < 4; Q++) {
#pragma unroll
                for (int s2 = 0; s2 < 2; s2++) {
                    const auto code = [&](int i, int e) {
                        if constexpr (FMT == 10) {
                            const u32 v = (shift_field(qv[i][s2], 8 * e + 2 * Q - 20) & (3u << 20)) |
                                          (shift_field(hv[i][s2], 8 * e + 4 * hf + Q - 22) & (1u << 22)) | 0x3f800000u;
                            // 1 + q/8 − 1.5 = (q − 4)/8, exact.
                            return __float_as_uint(__uint_as_float(v) - 1.5f);
                        } else {
                            return (shift_field(qv[i][s2], 8 * e + 2 * Q - 21) & (3u << 21)) | 0x3f800000u;
                        }
                    };
                    tc_codes_step<NT, TC_KC + 8>(code, 8 * (8 * H + 2 * Q + s2) + 2 * t, g, xsh, xsl, part);
                }
                // End of the 16-value sub-block si = 2Q + H of the half (8hf + si of the super-block).
                const int si = 2 * Q + H;
                float sc[4];
                [[maybe_unused]] float bb[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    if constexpr (FMT == 10) {
                        // ggml's kmask unpacking: the low nibble in byte si (nibble hf), the top
                        // two bits in byte 8 + (si & 3) at bits 2·(2hf + Q / 2); minus 32.
                        const u32 lo = (scw[i][si >> 1] >> (8 * (si & 1) + 4 * hf)) & 15;
                        const int hb = 8 + (si & 3);
                        const u32 hi = (scw[i][hb >> 1] >> (8 * (hb & 1) + 2 * (2 * hf + (Q >> 1)))) & 3;
                        sc[i] = dd[i] * (float)((int)(lo | (hi << 4)) - 32);
                    } else {
                        const u32 b = (scw[i][Q] >> (8 * H)) & 0xFF;
                        sc[i] = dd[i] * (float)(b & 15);
                        bb[i] = -fmaf(dm[i], (float)(b >> 4), sc[i]);
                    }
                }
                if constexpr (FMT == 10) tc_fold<NT, false>(sc, sc, xs_row, 0, part, acc);
                else tc_fold<NT, true>(sc, bb, xs_row, 16 * sb + 8 * hf + si, part, acc);
            }
        }
    } else {
        // Q4_0 and IQ4_NL (18-byte blocks: d, qs[16]), Q8_0 (34 bytes: d, qs[32] int8) and IQ4_XS
        // (136-byte super-blocks: d, scales_h, scales_l[4], qs[128], sub-blocks of 32 laid out as
        // IQ4_NL's qs): four (sub-)blocks per window, values in order, 16-bit loads (blocks are 2-byte
        // aligned).
        constexpr int BYTES = FMT == 7 ? 34 : 18;
        [[maybe_unused]] u32 xs_head[4][2];
        if constexpr (FMT == 9) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const u32* hp = reinterpret_cast<const u32*>(wr[i] + 136LL * sb);
                xs_head[i][0] = live[i] ? __ldg(hp) : 0u;
                xs_head[i][1] = live[i] ? __ldg(hp + 1) : 0u;
            }
        }
#pragma unroll
        for (int bi = 0; bi < 4; bi++) {
            const int ib = 4 * hf + bi; // IQ4_XS: the sub-block within the super-block
            const long long blk_off = FMT == 9 ? 136LL * sb + 16 * ib + 8 : (long long)BYTES * ((k0 >> 5) + bi);
            u32 q16[4][4];
            float dd[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const u16* qw = reinterpret_cast<const u16*>(wr[i] + blk_off) + (FMT == 9 ? 0 : 1);
                if constexpr (FMT == 9) {
                    // ggml's dequantize_row_iq4_xs: a 6-bit scale ls from scales_l (4 bits) and
                    // scales_h (2), the sub-block's scale d·(ls − 32).
                    const int ls = ((xs_head[i][1] >> (8 * (ib >> 1) + 4 * (ib & 1))) & 15) |
                                   (((xs_head[i][0] >> (16 + 2 * ib)) & 3) << 4);
                    dd[i] = 256.f * f16f_tc((u16)(xs_head[i][0] & 0xFFFFu)) * (float)(ls - 32);
                } else {
                    dd[i] = live[i] ? (FMT == 6 ? 16.f : 256.f) * f16f_tc(__ldg(qw - 1)) : 0.f;
                }
#pragma unroll
                for (int sp = 0; sp < 4; sp++) {
                    // 4-bit blocks: bytes 2t (steps 0, 2) and 8 + 2t (1, 3); Q8_0: bytes 8·sp + 2t.
                    const int byte = FMT == 7 ? 8 * sp + 2 * t : 8 * (sp & 1) + 2 * t;
                    q16[i][sp] = live[i] && (FMT == 7 || sp < 2) ? __ldg(qw + byte / 2) : 0u;
                }
            }
#pragma unroll
            for (int sp = 0; sp < 4; sp++) {
                const auto code = [&](int i, int e) {
                    u32 v;
                    if constexpr (FMT == 6) {
                        // 1 + q/16 − 1.5 = (q − 8)/16: low nibbles in steps 0, 1, high in 2, 3.
                        v = (shift_field(q16[i][sp & 1], 8 * e + 4 * (sp >> 1) - 19) & (0xFu << 19)) | 0x3f800000u;
                    } else if constexpr (FMT == 7) {
                        // 1 + (q + 128)/256 − 1.5 = q/256 (q int8: flipping the sign bit adds 128).
                        v = (shift_field(q16[i][sp] ^ 0x8080u, 8 * e - 15) & (0xFFu << 15)) | 0x3f800000u;
                    } else {
                        // 1 + (level + 128)/256 − 1.5 = level/256, the nibble's level looked up
                        // in registers (low nibbles in steps 0, 1, high in 2, 3).
                        v = iq4_level_tf32((q16[i][sp & 1] >> (8 * e + 4 * (sp >> 1))) & 15u);
                    }
                    return __float_as_uint(__uint_as_float(v) - 1.5f);
                };
                tc_codes_step<NT, TC_KC + 8>(code, 8 * (4 * bi + sp) + 2 * t, g, xsh, xsl, part);
            }
            tc_fold<NT, false>(dd, dd, xs_row, 0, part, acc);
        }
    }
}

template <int FMT, int BITS, bool CODES>
__device__ __forceinline__ void gemm_grouped_tc(const unsigned long long* __restrict__ table, GemmMat m, int gs,
                                                const int4* __restrict__ items, const int* __restrict__ xrow,
                                                const float* __restrict__ xh, const float* __restrict__ xl,
                                                const float* __restrict__ xsum, float* __restrict__ out, int ntok) {
    constexpr int PW = FMT == 0 ? 32 / BITS : 2;
    [[maybe_unused]] constexpr int CW = 4 * PW;
    [[maybe_unused]] constexpr bool ASPLIT = !(CODES || FMT == 2);
    // Σx per group read by the fold: affine codes (group gs), Q4_K and Q5_K (sub-blocks of 32),
    // Q2_K (sub-blocks of 16).
    constexpr bool SUMS = (FMT == 0 && CODES) || FMT == 3 || FMT == 5 || FMT == 11;
    // Row stride of the staged x in floats: the 16 float2 reads of a half warp (g < 4, t < 4 at
    // g·TS + t·PW + 2j) fall in distinct bank pairs for PW 8 (TS ≡ 2 mod 32) and PW 2 (≡ 8; the
    // K-quant windows read at g·TS + 2t + 8s).
    constexpr int TS = TC_KC + (PW == 2 ? 8 : 2);
    __shared__ float xsh[TC_NT * TS];
    __shared__ float xsl[TC_NT * TS];
    int4 it;
    if (items) {
        it = items[blockIdx.y];
    } else {
        const int t0 = blockIdx.y * TC_NT;
        it = make_int4(0, t0, min(TC_NT, ntok - t0), 0);
    }
    const int n = it.z, ntiles = (n + 7) >> 3;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const unsigned long long base = table ? table[it.x] : 0ull;
    const long long r0 = (long long)blockIdx.x * TC_ROWS + warp * 32;
    // This lane's rows: r0 + 16·(i / 2) + 8·(i % 2) + g, i < 4 (a0/a2 and a1/a3 of m-tile i / 2).
    const unsigned char* wr[4];
    const u16* sr[4];
    const u16* br[4];
    bool live[4];
    const long long row_bytes = FMT == 3   ? (long long)(m.cols / 256) * 144
                                : FMT == 4 ? (long long)(m.cols / 256) * 210
                                : FMT == 5 ? (long long)(m.cols / 256) * 176
                                : FMT == 6 ? (long long)(m.cols / 32) * 18
                                : FMT == 7 ? (long long)(m.cols / 32) * 34
                                : FMT == 8 ? (long long)(m.cols / 32) * 18
                                : FMT == 9 ? (long long)(m.cols / 256) * 136
                                : FMT == 10 ? (long long)(m.cols / 256) * 110
                                : FMT == 11 ? (long long)(m.cols / 256) * 84
                                           : (long long)m.cols * (FMT == 0 ? BITS : (FMT == 1 ? 32 : 16)) / 8;
    // CODES: the rows of xsum (Σ x per group, [row of x][cols / gs]) of this lane's output pairs
    // 8·nf + 2t and 8·nf + 2t + 1.
    const float* xs_row[4][2];
#pragma unroll
    for (int nf = 0; nf < 4; nf++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int tok = 8 * nf + 2 * t + e, p = it.y + (tok < n ? tok : 0);
            xs_row[nf][e] = SUMS ? xsum + (long long)(xrow ? xrow[p] : p) * (m.cols / gs) : nullptr;
        }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const long long row = r0 + 16 * (i / 2) + 8 * (i % 2) + g;
        live[i] = row < m.rows;
        const long long r = live[i] ? row : 0;
        wr[i] = reinterpret_cast<const unsigned char*>(base + m.w) + r * row_bytes;
        sr[i] = FMT == 0 ? reinterpret_cast<const u16*>(base + m.s) + r * (m.cols / gs) : nullptr;
        br[i] = FMT == 0 ? reinterpret_cast<const u16*>(base + m.b) + r * (m.cols / gs) : nullptr;
    }
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;
    for (int k0 = 0; k0 < m.cols; k0 += TC_KC) {
        const int kc = min(TC_KC, m.cols - k0);
        __syncthreads();  // the previous window's reads are done
        // Stage xh and xl [pairs][k0, k0 + kc) (split by split_x_tc); rows past the item's pairs
        // are zero. A thread copies one float2 column of several pairs.
        const int half = kc / 2, per = blockDim.x / half;
        if (threadIdx.x < per * half) {
            const int c2 = threadIdx.x % half;
            for (int tok = threadIdx.x / half; tok < TC_NT; tok += per) {
                float2 hv = make_float2(0.f, 0.f), lv = make_float2(0.f, 0.f);
                if (tok < n) {
                    const int p = it.y + tok;
                    const long long o = (long long)(xrow ? xrow[p] : p) * m.cols + k0;
                    hv = __ldg(reinterpret_cast<const float2*>(xh + o) + c2);
                    lv = __ldg(reinterpret_cast<const float2*>(xl + o) + c2);
                }
                const int c2s = tc_stage_pair<FMT>(c2);
                reinterpret_cast<float2*>(xsh + tok * TS)[c2s] = hv;
                reinterpret_cast<float2*>(xsl + tok * TS)[c2s] = lv;
            }
        }
        __syncthreads();
        if (r0 >= m.rows) continue;  // warp-uniform: this warp has no rows (it still syncs)
        if constexpr (FMT >= 3) {
            switch (ntiles) {
                case 1: tc_window_kq<FMT, 1>(k0, t, g, wr, live, xsh, xsl, xs_row, acc); break;
                case 2: tc_window_kq<FMT, 2>(k0, t, g, wr, live, xsh, xsl, xs_row, acc); break;
                case 3: tc_window_kq<FMT, 3>(k0, t, g, wr, live, xsh, xsl, xs_row, acc); break;
                default: tc_window_kq<FMT, 4>(k0, t, g, wr, live, xsh, xsl, xs_row, acc); break;
            }
        } else {
            switch (ntiles) {
                case 1: tc_window<FMT, BITS, CODES, 1>(k0, kc, gs, t, g, wr, sr, br, live, xsh, xsl, xs_row, acc); break;
                case 2: tc_window<FMT, BITS, CODES, 2>(k0, kc, gs, t, g, wr, sr, br, live, xsh, xsl, xs_row, acc); break;
                case 3: tc_window<FMT, BITS, CODES, 3>(k0, kc, gs, t, g, wr, sr, br, live, xsh, xsl, xs_row, acc); break;
                default: tc_window<FMT, BITS, CODES, 4>(k0, kc, gs, t, g, wr, sr, br, live, xsh, xsl, xs_row, acc); break;
            }
        }
    }
    if (r0 >= m.rows) return;
    float* o = out + (long long)it.y * m.rows;
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int nf = 0; nf < 4; nf++) {
            const int tok = 8 * nf + 2 * t;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (!live[2 * mt + h]) continue;
                const long long row = r0 + 16 * mt + 8 * h + g;
                if (tok < n) o[(long long)tok * m.rows + row] = acc[mt][nf][2 * h];
                if (tok + 1 < n) o[(long long)(tok + 1) * m.rows + row] = acc[mt][nf][2 * h + 1];
            }
        }
    }
}

#define GROUPED_TC(NAME, FMT, BITS, CODES)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) gemm_grouped_tc_##NAME(                                 \
        const unsigned long long* __restrict__ table, GemmMat m, int gs, const int4* __restrict__ items,       \
        const int* __restrict__ xrow, const float* __restrict__ xh, const float* __restrict__ xl,              \
        const float* __restrict__ xsum, float* __restrict__ out, int ntok) { pdl_prologue();                                   \
        gemm_grouped_tc<FMT, BITS, CODES>(table, m, gs, items, xrow, xh, xl, xsum, out, ntok);               \
    }
GROUPED_TC(affine_b2, 0, 2, true)
GROUPED_TC(affine_b4, 0, 4, true)
GROUPED_TC(affine_b8, 0, 8, true)
GROUPED_TC(deq_affine_b2, 0, 2, false)
GROUPED_TC(deq_affine_b4, 0, 4, false)
GROUPED_TC(deq_affine_b8, 0, 8, false)
GROUPED_TC(f32, 1, 32, false)
GROUPED_TC(bf16, 2, 16, false)
GROUPED_TC(q4_k, 3, 4, true)
GROUPED_TC(q6_k, 4, 6, true)
GROUPED_TC(q5_k, 5, 5, true)
GROUPED_TC(q4_0, 6, 4, true)
GROUPED_TC(q8_0, 7, 8, true)
GROUPED_TC(iq4_nl, 8, 4, true)
GROUPED_TC(iq4_xs, 9, 4, true)
GROUPED_TC(q3_k, 10, 3, true)
GROUPED_TC(q2_k, 11, 2, true)
#endif

// ---------------------------------------------------------------------------------------------
// Dense prefill products on tensor cores at f32-grade accuracy: W and x are split into bf16
// hi + lo parts, and one bf16 GEMM (f32 accumulation) over a 3× longer k takes
// [Wh | Wh | Wl] · [xh ; xl ; xh] = Wh·xh + Wh·xl + Wl·xh (the lo·lo term, 2^-16 of the product,
// is dropped). bf16 products are exact in f32.

__device__ __forceinline__ u16 bf16_rn(float v) {
    const u32 u = __float_as_uint(v);
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // finite inputs
}

__device__ __forceinline__ void split_bf16(float v, u16& hi, u16& lo) {
    hi = bf16_rn(v);
    lo = bf16_rn(v - bf16f(hi));
}

// The VPW values of one word of codes, split, into the three segments of an output row: one
// 16-byte store per segment at 4 bits (8 bytes at 8 bits, two at 2 bits).
template <int BITS>
__device__ __forceinline__ void split_word(u32 word, float sc, float bi, u16* o, int cols, int c0) {
    constexpr int VPW = 32 / BITS;
    constexpr u32 MASK = BITS == 8 ? 0xffu : ((1u << BITS) - 1u);
    u32 hh[VPW / 2], ll[VPW / 2];
#pragma unroll
    for (int j = 0; j < VPW; j += 2) {
        u16 h0, l0, h1, l1;
        split_bf16((float)((word >> (j * BITS)) & MASK) * sc + bi, h0, l0);
        split_bf16((float)((word >> ((j + 1) * BITS)) & MASK) * sc + bi, h1, l1);
        hh[j / 2] = (u32)h0 | ((u32)h1 << 16);
        ll[j / 2] = (u32)l0 | ((u32)l1 << 16);
    }
    if constexpr (VPW == 4) {
        *reinterpret_cast<uint2*>(o + c0) = make_uint2(hh[0], hh[1]);
        *reinterpret_cast<uint2*>(o + cols + c0) = make_uint2(hh[0], hh[1]);
        *reinterpret_cast<uint2*>(o + 2 * cols + c0) = make_uint2(ll[0], ll[1]);
    } else {
#pragma unroll
        for (int j = 0; j < VPW / 8; j++) {
            const uint4 h = make_uint4(hh[4 * j], hh[4 * j + 1], hh[4 * j + 2], hh[4 * j + 3]);
            const uint4 l = make_uint4(ll[4 * j], ll[4 * j + 1], ll[4 * j + 2], ll[4 * j + 3]);
            reinterpret_cast<uint4*>(o + c0)[j] = h;
            reinterpret_cast<uint4*>(o + cols + c0)[j] = h;
            reinterpret_cast<uint4*>(o + 2 * cols + c0)[j] = l;
        }
    }
}

// Rows row0 .. row0+nrows-1 as [nrows, 3·cols] bf16 [Wh | Wh | Wl]: fmt 0 affine (bits, gs),
// 1 f32 (w is [rows, cols] f32), 2 bf16 (exact: Wl = 0). One thread per 32-bit word (two values
// for f32 / bf16).
extern "C" __global__ void dequant_rows_split(const u32* __restrict__ w, const u16* __restrict__ s,
                                              const u16* __restrict__ b, int fmt, int bits, int gs, long long row0,
                                              long long nrows, int cols, u16* __restrict__ out) { pdl_prologue();
    const int vpw = fmt == 0 ? 32 / bits : 2;
    const int wpr = cols / vpw;
    const long long n = nrows * wpr;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / wpr;
        const int k = (int)(i % wpr);
        const int c0 = k * vpw;
        u16* o = out + r * 3 * cols;
        if (fmt == 0) {
            const u32 word = w[(row0 + r) * wpr + k];
            const long long g = (row0 + r) * (cols / gs) + c0 / gs;
            const float sc = bf16f(s[g]), bi = bf16f(b[g]);
            if (bits == 4) split_word<4>(word, sc, bi, o, cols, c0);
            else if (bits == 8) split_word<8>(word, sc, bi, o, cols, c0);
            else split_word<2>(word, sc, bi, o, cols, c0);
        } else {
            float v0, v1;
            if (fmt == 1) {
                const float2 f = reinterpret_cast<const float2*>(w)[(row0 + r) * wpr + k];
                v0 = f.x;
                v1 = f.y;
            } else {
                const u32 word = w[(row0 + r) * wpr + k];
                v0 = __uint_as_float(word << 16);
                v1 = __uint_as_float(word & 0xffff0000u);
            }
            u16 h0, l0, h1, l1;
            split_bf16(v0, h0, l0);
            split_bf16(v1, h1, l1);
            const u32 hh = (u32)h0 | ((u32)h1 << 16), ll = (u32)l0 | ((u32)l1 << 16);
            reinterpret_cast<u32*>(o)[c0 / 2] = hh;
            reinterpret_cast<u32*>(o + cols)[c0 / 2] = hh;
            reinterpret_cast<u32*>(o + 2 * cols)[c0 / 2] = ll;
        }
    }
}

// x [t, cols] f32 → [t, 3·cols] bf16 [xh | xl | xh].
extern "C" __global__ void split_rows_x(const float* __restrict__ x, u16* __restrict__ out, long long t, int cols) { pdl_prologue();
    const long long n = t * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / cols;
        const int c = (int)(i % cols);
        u16 hi, lo;
        split_bf16(x[i], hi, lo);
        u16* o = out + r * 3 * cols;
        o[c] = hi;
        o[cols + c] = lo;
        o[2 * cols + c] = hi;
    }
}

// Prefill MoE output: x[t] += Σ_j w[t·k+j] · yd[pair_of[t·k+j]] over the token's k experts in
// rank order (deterministic: no atomics).
extern "C" __global__ void moe_prefill_combine(float* __restrict__ x, const float* __restrict__ yd,
                                               const int* __restrict__ pair_of, const float* __restrict__ w, int k,
                                               int h, int T) { pdl_prologue();
    const long long n = (long long)T * h;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / h;
        const int c = (int)(i % h);
        float r = 0.f;
        for (int j = 0; j < k; j++) r += w[t * k + j] * yd[(long long)pair_of[t * k + j] * h + c];
        x[i] += r;
    }
}
