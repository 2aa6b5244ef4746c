// GEMV kernels for decode: y = W·x with W in MLX affine form (2/4/8-bit codes, bf16 scale and
// bias per group of GS inputs), bf16 or f32; x and y f32, f32 accumulation.
//
// Compiled at run time by NVRTC for the device's architecture (see cuda/context.rs). No headers:
// bf16 is converted by hand (its bits are the top half of an f32).
//
// Layout (MLX): row r of the codes is cols*BITS/32 u32 words, values packed LSB first; scales and
// biases are [rows, cols/GS] bf16. w = q*scale + bias, so
//     y[r] = Σ_g scale_g·(Σ_{c in g} q_c·x_c) + bias_g·(Σ_{c in g} x_c)
// and the inner loop is one FMA per code: the dequantization never materializes.
//
// Work split: one warp per RW rows. Lane l reads 16-byte chunks l, l+32, ... of each of its rows
// (coalesced: a warp reads 512 contiguous bytes per row per step); the x values a chunk needs
// are read once and reused for the RW rows, from a padded copy of x in shared memory (the `sx`
// kernels) or, when x does not fit there, from global memory (`gx`). Code extraction without shifts or int->float
// conversions: for a code at bit offset s < 23-BITS, (word & (MASK<<s)) | 0x4B000000 is the
// float 2^23 + q·2^s, so one LOP3 and one FADD give q·2^s exactly; each bit position keeps its own
// accumulator, scaled by 2^-s once per segment (exact: powers of two).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

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

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Streaming 16-byte load of weights: read-only path, not kept in L1 (x lives there).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ u32 word_of(const uint4& q, int i) {
    return i == 0 ? q.x : (i == 1 ? q.y : (i == 2 ? q.z : q.w));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Issues the loads of chunks c0, c0+32, ... (U of them, those < nch) of the RW rows, with the
// scales and biases of their segments.
template <int U, int RW, int SEGS, int VPC, int SEGV, int GS, int SUB = 32>
__device__ __forceinline__ void load_chunks(const uint4* (&wr)[RW], const u16* (&sr)[RW], const u16* (&br)[RW], int c0,
                                            int nch, uint4 (&q)[U][RW], u16 (&sc)[U][RW][SEGS],
                                            u16 (&bi)[U][RW][SEGS]) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = c0 + SUB * u;
        if (c < nch) {
#pragma unroll
            for (int i = 0; i < RW; i++) {
                q[u][i] = ld_stream(wr[i] + c);
#pragma unroll
                for (int s = 0; s < SEGS; s++) {
                    const int g = (c * VPC + s * SEGV) / GS;
                    sc[u][i][s] = __ldg(sr[i] + g);
                    bi[u][i][s] = __ldg(br[i] + g);
                }
            }
        }
    }
}

// x values of chunk c, word wi (VPW of them) into xv: from global memory through the read-only
// path when XSTRIDE == VPC, else from the padded shared-memory copy.
template <int VPW, int VPC, int XSTRIDE>
__device__ __forceinline__ void x_word(const float* __restrict__ x, int c, int wi, float (&xv)[VPW]) {
    const float4* xp = reinterpret_cast<const float4*>(x + (long long)c * XSTRIDE + wi * VPW);
#pragma unroll
    for (int v = 0; v < VPW / 4; v++) {
        const float4 t = XSTRIDE == VPC ? __ldg(xp + v) : xp[v];
        xv[4 * v] = t.x;
        xv[4 * v + 1] = t.y;
        xv[4 * v + 2] = t.z;
        xv[4 * v + 3] = t.w;
    }
}

// Adds chunk c of RW rows (codes q, their segments' scales sc and biases bi) times x to acc,
// exactly: per segment, each code position's products are summed in f32 on their own (the code
// read as 2^23 + q·2^sk and the 2^23 taken off before the multiply, so every product is exact
// up to x's rounding), then scaled by 2^-sk, then scale·Σ + bias·Σx. Every kernel that must give
// the batched kernels' results bit for bit (the fused expert kernel) computes its rows with this.
template <int BITS, int GS, int RW, int XSTRIDE, int SEGS>
__device__ __forceinline__ void chunk_sums(const uint4 (&q)[RW], const u16 (&sc)[RW][SEGS], const u16 (&bi)[RW][SEGS],
                                           const float* __restrict__ x, int c, float (&acc)[RW]) {
    constexpr int VPW = 32 / BITS;
    constexpr int VPC = 4 * VPW;
    constexpr int SEGV = GS < VPC ? GS : VPC;
    constexpr int WPS = SEGV / VPW;
    constexpr u32 MASK = (BITS == 8) ? 0xFFu : ((1u << BITS) - 1u);
#pragma unroll
    for (int s = 0; s < SEGS; s++) {
        float part[RW][VPW];
#pragma unroll
        for (int i = 0; i < RW; i++)
#pragma unroll
            for (int k = 0; k < VPW; k++) part[i][k] = 0.f;
        float xs = 0.f;
#pragma unroll
        for (int j = 0; j < WPS; j++) {
            const int wi = s * WPS + j;
            float xv[VPW];
            x_word<VPW, VPC, XSTRIDE>(x, c, wi, xv);
#pragma unroll
            for (int k = 0; k < VPW; k++) xs += xv[k];
#pragma unroll
            for (int i = 0; i < RW; i++) {
                const u32 wd = word_of(q[i], wi);
                const u32 hi = wd >> 16;
#pragma unroll
                for (int k = 0; k < VPW; k++) {
                    const int sk = k * BITS;
                    const u32 m = (sk + BITS <= 23) ? (wd & (MASK << sk)) : (hi & (MASK << (sk >= 16 ? sk - 16 : 0)));
                    const float f = __uint_as_float(m | 0x4B000000u) - 8388608.0f;
                    part[i][k] = fmaf(f, xv[k], part[i][k]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < RW; i++) {
            float d = 0.f;
#pragma unroll
            for (int k = 0; k < VPW; k++) {
                const int sk = k * BITS;
                const int sh = (sk + BITS <= 23) ? sk : sk - 16;
                d = fmaf(part[i][k], __uint_as_float((u32)(127 - sh) << 23), d);
            }
            acc[i] = fmaf(bf16_to_f32(sc[i][s]), d, fmaf(bf16_to_f32(bi[i][s]), xs, acc[i]));
        }
    }
}

// chunk_sums for 4-bit codes without the FADD per code (the "shift" variants, see affine_rows):
// not bit-identical to chunk_sums (the 2^23·Σx offset comes off once per segment).
template <int GS, int RW, int XSTRIDE, int SEGS>
__device__ __forceinline__ void chunk_sums_shift4(const uint4 (&q)[RW], const u16 (&sc)[RW][SEGS],
                                                  const u16 (&bi)[RW][SEGS], const float* __restrict__ x, int c,
                                                  float (&acc)[RW]) {
    constexpr int VPW = 8, VPC = 32;
    constexpr int SEGV = GS < VPC ? GS : VPC;
    constexpr int WPS = SEGV / VPW;
#pragma unroll
    for (int s = 0; s < SEGS; s++) {
        float part[RW][VPW];
#pragma unroll
        for (int i = 0; i < RW; i++)
#pragma unroll
            for (int k = 0; k < VPW; k++) part[i][k] = 0.f;
        float xe = 0.f, xo = 0.f;
#pragma unroll
        for (int j = 0; j < WPS; j++) {
            const int wi = s * WPS + j;
            float xv[VPW];
            x_word<VPW, VPC, XSTRIDE>(x, c, wi, xv);
#pragma unroll
            for (int k = 0; k < VPW; k += 2) {
                xe += xv[k];
                xo += xv[k + 1];
            }
#pragma unroll
            for (int i = 0; i < RW; i++) {
                const u32 wd = word_of(q[i], wi);
                const u32 v[4] = {wd << 15, wd << 7, wd >> 1, wd >> 9};
#pragma unroll
                for (int p = 0; p < 4; p++) {
                    const float f0 = __uint_as_float((v[p] & (0xFu << 15)) | 0x4B000000u);
                    const float f1 = __uint_as_float((v[p] & (0xFu << 19)) | 0x4B000000u);
                    part[i][2 * p] = fmaf(f0, xv[2 * p], part[i][2 * p]);
                    part[i][2 * p + 1] = fmaf(f1, xv[2 * p + 1], part[i][2 * p + 1]);
                }
            }
        }
        const float xs = xe + xo;
#pragma unroll
        for (int i = 0; i < RW; i++) {
            float e = 0.f, o = 0.f;
#pragma unroll
            for (int k = 0; k < VPW; k += 2) {
                e += part[i][k];
                o += part[i][k + 1];
            }
            e = fmaf(-8388608.0f, xe, e);
            o = fmaf(-8388608.0f, xo, o);
            const float d = fmaf(o, 1.0f / 524288.0f, e * (1.0f / 32768.0f));
            acc[i] = fmaf(bf16_to_f32(sc[i][s]), d, fmaf(bf16_to_f32(bi[i][s]), xs, acc[i]));
        }
    }
}

// One warp computes rows row0 .. row0+RW-1. x values of chunk c, offset o are read at
// xv[c * XSTRIDE + o]: XSTRIDE = VPC for x in global memory, VPC + 4 for the padded copy in shared
// memory (the 16-byte pad per chunk makes the warp's 16-byte reads, VPC*4 bytes apart per lane,
// fall in distinct banks).
//
// V bit 1 (4 bits only, "prefetch" variants `affine_gemv_p_*` / `_sp_*`): the loads of the
// next step's chunks are issued before the current ones are used (twice the bytes in flight).
// V bit 0 (4 bits only, "shift" variants `affine_gemv_s_*` / `_sp_*`): no FADD per code. The word is
// shifted so that codes 2p and 2p+1 sit at bits 15..18 and 19..22 (4 shifts per 8 codes); then
// (v & 0xF<<15) | 0x4B000000 = 2^23 + q·2^15 (or q·2^19) goes straight into the FFMA, and the
// 2^23·Σx the offset adds is taken off once per segment (the q part is ≥ 2^-8 of the float, so
// f32 rounding of the products costs ~2^-16 of a term). 20 instead of 25 ops per 8 codes.
//
// SUB (a power of two, 8..32): lanes per row. A warp is 32/SUB sub-warps, each computing its own RW
// rows (the caller offsets row0 by the sub-warp); short rows (fewer than 32 chunks, e.g. an
// expert's down projection) then keep every lane busy. Every lane of the warp must call this
// (the final sum shuffles across the whole warp); rows past `rows` are read clamped, not written.
template <int BITS, int GS, int RW, int XSTRIDE, int V, int SUB = 32>
__device__ __forceinline__ void affine_rows(const uint4* __restrict__ w, const u16* __restrict__ scales,
                                            const u16* __restrict__ biases, const float* __restrict__ x,
                                            float* __restrict__ y, int rows, int cols, long long row0) {
    constexpr int VPW = 32 / BITS;              // codes per u32 word
    constexpr int VPC = 4 * VPW;                // codes per 16-byte chunk
    constexpr int SEGV = GS < VPC ? GS : VPC;   // codes per segment (inside one group)
    constexpr int WPS = SEGV / VPW;             // words per segment
    constexpr int SEGS = 4 / WPS;               // segments per chunk
    constexpr int U = RW >= 4 ? 1 : 4 / RW;     // chunks per lane in flight per row

    const int lane = threadIdx.x & (SUB - 1);
    const int nch = cols / VPC;
    const int ngroups = cols / GS;

    const uint4* wr[RW];
    const u16* sr[RW];
    const u16* br[RW];
#pragma unroll
    for (int i = 0; i < RW; i++) {
        long long r = row0 + i < rows ? row0 + i : rows - 1;
        wr[i] = w + r * nch;
        sr[i] = scales + r * ngroups;
        br[i] = biases + r * ngroups;
    }
    float acc[RW];
#pragma unroll
    for (int i = 0; i < RW; i++) acc[i] = 0.f;

    uint4 nq[U][RW];
    u16 nsc[U][RW][SEGS], nbi[U][RW][SEGS];
    if constexpr ((V & 2) != 0) load_chunks<U, RW, SEGS, VPC, SEGV, GS, SUB>(wr, sr, br, lane, nch, nq, nsc, nbi);
    for (int c0 = lane; c0 < nch; c0 += SUB * U) {
        uint4 q[U][RW];
        u16 sc[U][RW][SEGS], bi[U][RW][SEGS];
        if constexpr ((V & 2) != 0) {
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int i = 0; i < RW; i++) {
                    q[u][i] = nq[u][i];
#pragma unroll
                    for (int s = 0; s < SEGS; s++) {
                        sc[u][i][s] = nsc[u][i][s];
                        bi[u][i][s] = nbi[u][i][s];
                    }
                }
            load_chunks<U, RW, SEGS, VPC, SEGV, GS, SUB>(wr, sr, br, c0 + SUB * U, nch, nq, nsc, nbi);
        } else {
            load_chunks<U, RW, SEGS, VPC, SEGV, GS, SUB>(wr, sr, br, c0, nch, q, sc, bi);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + SUB * u;
            if (c >= nch) break;
            if constexpr ((V & 1) != 0 && BITS == 4) {
                chunk_sums_shift4<GS, RW, XSTRIDE, SEGS>(q[u], sc[u], bi[u], x, c, acc);
            } else {
                chunk_sums<BITS, GS, RW, XSTRIDE, SEGS>(q[u], sc[u], bi[u], x, c, acc);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RW; i++) {
        float v = acc[i];
#pragma unroll
        for (int o = SUB / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0 && row0 + i < rows) y[row0 + i] = v;
    }
}

// x read from global memory (L1): one warp per RW rows, grid covers all rows. For any cols.
template <int BITS, int GS, int RW, int V>
__device__ __forceinline__ void affine_gemv_gx(const uint4* __restrict__ w, const u16* __restrict__ scales,
                                               const u16* __restrict__ biases, const float* __restrict__ x,
                                               float* __restrict__ y, int rows, int cols) {
    constexpr int VPC = 128 / BITS;
    const long long row0 = (((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * RW;
    if (row0 < rows) affine_rows<BITS, GS, RW, VPC, V>(w, scales, biases, x, y, rows, cols, row0);
}

// x staged once per block into padded shared memory (dynamic, (cols/VPC)*(VPC+4) floats), then a
// persistent loop over tiles of (warps per block * RW) rows. Without the staging, the strided
// 16-byte x reads of a warp touch 32 cache lines each and L1 becomes the bottleneck.
template <int BITS, int GS, int RW, int V>
__device__ __forceinline__ void affine_gemv_sx(const uint4* __restrict__ w, const u16* __restrict__ scales,
                                               const u16* __restrict__ biases, const float* __restrict__ x,
                                               float* __restrict__ y, int rows, int cols) {
    constexpr int VPC = 128 / BITS;
    extern __shared__ float4 xsm4[];
    float* xsm = reinterpret_cast<float*>(xsm4);
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int i = threadIdx.x; i < cols / 4; i += blockDim.x) {
        const int e = 4 * i;
        reinterpret_cast<float4*>(xsm + (e / VPC) * (VPC + 4) + (e % VPC))[0] = __ldg(x4 + i);
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    const int wib = threadIdx.x >> 5;
    const long long ntiles = ((long long)rows + (long long)warps * RW - 1) / ((long long)warps * RW);
    for (long long t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const long long row0 = (t * warps + wib) * RW;
        if (row0 < rows) affine_rows<BITS, GS, RW, VPC + 4, V>(w, scales, biases, xsm, y, rows, cols, row0);
    }
}

#define AFFINE(B, G, R)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) affine_gemv_b##B##_g##G##_r##R(                        \
        const uint4* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ b,                       \
        const float* __restrict__ x, float* __restrict__ y, int rows, int cols) { pdl_prologue();                               \
        affine_gemv_sx<B, G, R, 0>(w, s, b, x, y, rows, cols);                                                     \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) affine_gemv_gx_b##B##_g##G##_r##R(                     \
        const uint4* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ b,                       \
        const float* __restrict__ x, float* __restrict__ y, int rows, int cols) { pdl_prologue();                               \
        affine_gemv_gx<B, G, R, 0>(w, s, b, x, y, rows, cols);                                                     \
    }
#define AFFINE_RW(B, G) AFFINE(B, G, 1) AFFINE(B, G, 2) AFFINE(B, G, 4)
#define AFFINE_G(B) AFFINE_RW(B, 32) AFFINE_RW(B, 64) AFFINE_RW(B, 128)
AFFINE_G(2)
AFFINE_G(4)
AFFINE_G(8)

// 4-bit variants (V = 1 shift, 2 prefetch, 3 both; see affine_rows).
#define AFFINE_V(N, V, G, R)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128) affine_gemv_##N##_b4_g##G##_r##R(                       \
        const uint4* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ b,                       \
        const float* __restrict__ x, float* __restrict__ y, int rows, int cols) { pdl_prologue();                               \
        affine_gemv_sx<4, G, R, V>(w, s, b, x, y, rows, cols);                                                  \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) affine_gemv_##N##_gx_b4_g##G##_r##R(                    \
        const uint4* __restrict__ w, const u16* __restrict__ s, const u16* __restrict__ b,                       \
        const float* __restrict__ x, float* __restrict__ y, int rows, int cols) { pdl_prologue();                               \
        affine_gemv_gx<4, G, R, V>(w, s, b, x, y, rows, cols);                                                  \
    }
#define AFFINE_V_RW(N, V, G) AFFINE_V(N, V, G, 1) AFFINE_V(N, V, G, 2) AFFINE_V(N, V, G, 4)
#define AFFINE_V_G(N, V) AFFINE_V_RW(N, V, 32) AFFINE_V_RW(N, V, 64) AFFINE_V_RW(N, V, 128)
AFFINE_V_G(s, 1)
AFFINE_V_G(p, 2)
AFFINE_V_G(sp, 3)

// Dense GEMV, one warp per row, 16-byte loads, 4 chunks in flight per lane.
// T = 0: f32 weights (4 per chunk); T = 1: bf16 weights (8 per chunk). cols % (4 or 8) == 0.
template <int T>
__device__ __forceinline__ void dense_gemv(const uint4* __restrict__ w, const float* __restrict__ x,
                                           float* __restrict__ y, int rows, int cols) {
    constexpr int VPC = T == 0 ? 4 : 8;
    constexpr int U = 4;
    const int lane = threadIdx.x & 31;
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= rows) return;
    const int nch = cols / VPC;
    const uint4* wr = w + row * nch;
    float acc = 0.f;
    for (int c0 = lane; c0 < nch; c0 += 32 * U) {
        uint4 q[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
            if (c < nch) q[u] = ld_stream(wr + c);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
            if (c >= nch) break;
            const float4* xp = reinterpret_cast<const float4*>(x + (long long)c * VPC);
            if (T == 0) {
                const float4 t = __ldg(xp);
                acc = fmaf(__uint_as_float(q[u].x), t.x, acc);
                acc = fmaf(__uint_as_float(q[u].y), t.y, acc);
                acc = fmaf(__uint_as_float(q[u].z), t.z, acc);
                acc = fmaf(__uint_as_float(q[u].w), t.w, acc);
            } else {
                const float4 a = __ldg(xp), b = __ldg(xp + 1);
                acc = fmaf(__uint_as_float(q[u].x << 16), a.x, acc);
                acc = fmaf(__uint_as_float(q[u].x & 0xFFFF0000u), a.y, acc);
                acc = fmaf(__uint_as_float(q[u].y << 16), a.z, acc);
                acc = fmaf(__uint_as_float(q[u].y & 0xFFFF0000u), a.w, acc);
                acc = fmaf(__uint_as_float(q[u].z << 16), b.x, acc);
                acc = fmaf(__uint_as_float(q[u].z & 0xFFFF0000u), b.y, acc);
                acc = fmaf(__uint_as_float(q[u].w << 16), b.z, acc);
                acc = fmaf(__uint_as_float(q[u].w & 0xFFFF0000u), b.w, acc);
            }
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

extern "C" __global__ void __launch_bounds__(128) dense_gemv_f32(const uint4* __restrict__ w, const float* __restrict__ x,
                                                                 float* __restrict__ y, int rows, int cols) { pdl_prologue();
    dense_gemv<0>(w, x, y, rows, cols);
}
extern "C" __global__ void __launch_bounds__(128) dense_gemv_bf16(const uint4* __restrict__ w, const float* __restrict__ x,
                                                                  float* __restrict__ y, int rows, int cols) { pdl_prologue();
    dense_gemv<1>(w, x, y, rows, cols);
}

// Benchmark helpers. read_stream: reads n 16-byte words once (grid-stride) and writes one word
// per block, so the reads cannot be optimized away: the device's read-only bandwidth.
extern "C" __global__ void read_stream(const uint4* __restrict__ p, u64 n, u32* __restrict__ out) { pdl_prologue();
    u32 a = 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 v0 = ld_stream(p + i), v1 = ld_stream(p + i + stride);
        const uint4 v2 = ld_stream(p + i + 2 * stride), v3 = ld_stream(p + i + 3 * stride);
        a ^= v0.x ^ v0.y ^ v0.z ^ v0.w ^ v1.x ^ v1.y ^ v1.z ^ v1.w;
        a ^= v2.x ^ v2.y ^ v2.z ^ v2.w ^ v3.x ^ v3.y ^ v3.z ^ v3.w;
    }
    for (; i < n; i += stride) {
        const uint4 v = ld_stream(p + i);
        a ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    for (int o = 16; o > 0; o >>= 1) a ^= __shfl_xor_sync(0xffffffffu, a, o);
    if ((threadIdx.x & 31) == 0) atomicXor(out + blockIdx.x, a);
}

__device__ __forceinline__ u32 hash32(u64 i, u32 seed) {
    u64 z = i * 0x9E3779B97F4A7C15ull + seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (u32)(z ^ (z >> 31));
}

// Random u32 words (any bits: valid affine codes).
extern "C" __global__ void fill_random_u32(u32* __restrict__ p, u64 n, u32 seed) { pdl_prologue();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        p[i] = hash32(i, seed);
}

// Random bf16 in [-1, 1) (finite: for dense weights, scales and biases).
extern "C" __global__ void fill_random_bf16(u16* __restrict__ p, u64 n, u32 seed) { pdl_prologue();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float f = (float)(hash32(i, seed) >> 8) * (1.0f / 8388608.0f) - 1.0f;
        p[i] = (u16)(__float_as_uint(f) >> 16);
    }
}

// Random f32 in [-1, 1).
extern "C" __global__ void fill_random_f32(float* __restrict__ p, u64 n, u32 seed) { pdl_prologue();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        p[i] = (float)(hash32(i, seed) >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

// ---------------------------------------------------------------------------------------------
// Batched GEMV: up to MAXP independent problems (one matrix, one x, one y each) of the same format
// in one launch; blockIdx.y picks the problem. Decode runs the gate and up projections of all of a
// token's experts (routed and shared) in one launch and their down projections in another. The
// descriptors travel by value in the kernel parameters (no host-to-device copy, graph-capturable).
#define MAXP 24

__device__ __forceinline__ float silu_(float g) { return g / (1.f + expf(-g)); }
__device__ __forceinline__ float4 swiglu4(float4 g, float4 u) {
    return make_float4(silu_(g.x) * u.x, silu_(g.y) * u.y, silu_(g.z) * u.z, silu_(g.w) * u.w);
}
struct GemvProblem {
    const uint4* w;
    const u16* s;
    const u16* b;
    const float* x;
    float* y;
    int rows;
    int cols;
    int swiglu;  // x is [gate (cols); up (cols)]; the input is silu(gate)·up
};
struct GemvBatch {
    GemvProblem p[MAXP];
};

// Affine, x staged in shared memory (the caller sizes it for the largest cols of the batch).
template <int BITS, int GS, int RW>
__device__ __forceinline__ void affine_gemv_problem(const GemvProblem& pr) {
    constexpr int VPC = 128 / BITS;
    const int warps = blockDim.x >> 5;
    const long long ntiles = ((long long)pr.rows + (long long)warps * RW - 1) / ((long long)warps * RW);
    // Blocks beyond this problem's tiles (a batch's grid fits its largest problem) leave before
    // staging x.
    if (blockIdx.x >= ntiles) return;
    extern __shared__ float4 xsm4[];
    float* xsm = reinterpret_cast<float*>(xsm4);
    const float4* x4 = reinterpret_cast<const float4*>(pr.x);
    for (int i = threadIdx.x; i < pr.cols / 4; i += blockDim.x) {
        const int e = 4 * i;
        float4 v = __ldg(x4 + i);
        if (pr.swiglu) v = swiglu4(v, __ldg(x4 + pr.cols / 4 + i));
        reinterpret_cast<float4*>(xsm + (e / VPC) * (VPC + 4) + (e % VPC))[0] = v;
    }
    __syncthreads();
    const int wib = threadIdx.x >> 5;
    for (long long t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const long long row0 = (t * warps + wib) * RW;
        if (row0 < pr.rows)
            affine_rows<BITS, GS, RW, VPC + 4, 0>(pr.w, pr.s, pr.b, xsm, pr.y, pr.rows, pr.cols, row0);
    }
}

// Decode's experts with the expert pointers resolved on the GPU: blockIdx.y = j·nmat + which
// for routed expert j < k (its id read from ids[j], its pool slot from table[id]; a block whose
// expert is not on the GPU does nothing, and the host computes that expert after copying it in)
// and k·nmat + which for the shared expert (shared[which]). Matrix `which` of routed expert j
// reads x + j·x_stride and writes y + j·y_stride + which·mat[0].rows.
struct MatOff {
    u64 w, s, b;  // byte offsets inside the slot
    int rows, cols;
};
struct ExpertsArgs {
    const int* ids;
    const u64* table;
    const float* x;
    float* y;
    long long x_stride, y_stride;  // floats
    MatOff mat[2];
    GemvProblem shared[2];
    int k, nmat, swiglu;
};

__device__ __forceinline__ bool expert_problem(const ExpertsArgs& a, GemvProblem& pr) {
    const int j = blockIdx.y / a.nmat, which = blockIdx.y % a.nmat;
    if (j == a.k) {
        pr = a.shared[which];
        return true;
    }
    const u64 base = a.table[a.ids[j]];
    if (base == 0) return false;
    const MatOff& m = a.mat[which];
    pr.w = reinterpret_cast<const uint4*>(base + m.w);
    pr.s = reinterpret_cast<const u16*>(base + m.s);
    pr.b = reinterpret_cast<const u16*>(base + m.b);
    pr.x = a.x + j * a.x_stride;
    pr.y = a.y + j * a.y_stride + which * a.mat[0].rows;
    pr.rows = m.rows;
    pr.cols = m.cols;
    pr.swiglu = a.swiglu;
    return true;
}

#define AFFINE_BATCH(B, G, R)                                                                                \
    extern "C" __global__ void __launch_bounds__(128) affine_gemv_batch_b##B##_g##G##_r##R(GemvBatch batch) { pdl_prologue(); \
        affine_gemv_problem<B, G, R>(batch.p[blockIdx.y]);                                                    \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) affine_gemv_experts_b##B##_g##G##_r##R(ExpertsArgs a) { pdl_prologue(); \
        GemvProblem pr;                                                                                       \
        if (expert_problem(a, pr)) affine_gemv_problem<B, G, R>(pr);                                          \
    }
#define AFFINE_BATCH_RW(B, G) AFFINE_BATCH(B, G, 1) AFFINE_BATCH(B, G, 2)
#define AFFINE_BATCH_G(B) AFFINE_BATCH_RW(B, 32) AFFINE_BATCH_RW(B, 64) AFFINE_BATCH_RW(B, 128)
AFFINE_BATCH_G(2)
AFFINE_BATCH_G(4)
AFFINE_BATCH_G(8)

// ---------------------------------------------------------------------------------------------
// One launch for a token's whole expert MLP (affine 4-bit, every matrix of one format): the gate
// and up projections of the k routed experts and the shared one, then their down projections, on
// a persistent grid that takes work tiles from a ticket counter.
//
// Why: as two launches (gate+up, then down) the experts of a 35B-A3B token (16 MB) moved at
// ≈ 0.8 TB/s: every 8-row tile paid the ids → slot table → weights chain of dependent loads, an x
// staged for it alone, and its weights were requested only after that; the down projection
// (512 inputs: 16 chunks a row) left half of each warp idle. Here a block reads the k+1 slot
// addresses once, requests a tile's weights before anything it waits for (x staging, the gate/up
// results a down tile needs, the next ticket), stages the MoE input once for all its gate/up
// tiles, and runs down tiles on sub-warps sized to the row.
//
// Tickets are handed out in order: every gate/up tile (expert by expert), then every down tile.
// A down tile of expert j waits until all of j's gate/up tiles are written (a counter per expert,
// raised after a fence). No deadlock without co-residency: a block that waits holds a ticket taken
// after every gate/up ticket, and whoever took those is running and waits for nothing. The last
// block to finish resets the counters, so the launch can be replayed from a graph.
//
// The arithmetic per row is affine_rows's with V = 0 (the same sums in the same order as the
// batched kernels: the outputs are bit-identical).
struct FusedExpertsArgs {
    const int* ids;
    const u64* table;
    const float* x;               // the MoE input (every gate/up problem's x)
    float* gu;                    // expert j's [gate rows; up rows] at gu + j·gu_stride
    float* ys;                    // expert j's output at ys + j·ys_stride
    long long gu_stride, ys_stride;
    MatOff mat[3];                // gate, up, down inside a slot
    GemvProblem shared[3];        // the shared expert's gate, up, down (x and y set by the host)
    u32* sync;                    // [0] ticket, [1] blocks finished, [2 + j] gate/up tiles done of expert j
    int k;
};

#define FUSED_MAX_K 61

// Problem `which` (0 gate, 1 up, 2 down) of expert j (j == k: the shared one) at slot `base`.
__device__ __forceinline__ void fused_problem(const FusedExpertsArgs& a, int j, int which, u64 base, GemvProblem& pr) {
    if (j == a.k) {
        pr = a.shared[which];
        return;
    }
    const MatOff& m = a.mat[which];
    pr.w = reinterpret_cast<const uint4*>(base + m.w);
    pr.s = reinterpret_cast<const u16*>(base + m.s);
    pr.b = reinterpret_cast<const u16*>(base + m.b);
    pr.rows = m.rows;
    pr.cols = m.cols;
    pr.swiglu = which == 2;
    if (which == 2) {
        pr.x = a.gu + j * a.gu_stride;
        pr.y = a.ys + j * a.ys_stride;
    } else {
        pr.x = a.x;
        pr.y = a.gu + j * a.gu_stride + which * a.mat[0].rows;
    }
}

__device__ __forceinline__ float4 ld_l2(const float4* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}

// Stages x (or silu(gate)·up when swiglu) into the padded shared-memory layout affine_rows reads.
// `coherent`: x was written by other blocks of this launch (read through L2, not the read-only path).
template <int VPC>
__device__ __forceinline__ void stage_x(float* xsm, const float* x, int cols, bool swiglu, bool coherent) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int i = threadIdx.x; i < cols / 4; i += blockDim.x) {
        const int e = 4 * i;
        float4 v = coherent ? ld_l2(x4 + i) : __ldg(x4 + i);
        if (swiglu) v = swiglu4(v, coherent ? ld_l2(x4 + cols / 4 + i) : __ldg(x4 + cols / 4 + i));
        reinterpret_cast<float4*>(xsm + (e / VPC) * (VPC + 4) + (e % VPC))[0] = v;
    }
}

// RW rows of 4-bit codes on a sub-warp of SUB lanes, each lane holding all of its chunks (at most
// CH per row: cols ≤ CH·SUB·32) in registers: they are requested first, then `ready()` runs (a
// block-wide step: every thread of the block calls this), then the sums, as affine_rows computes
// them (chunk_sums). Rows past `rows` are read clamped and not written. (The loads are a
// non-volatile asm the compiler could in principle sink past `ready()`; the SASS shows it does
// not: every LDG of a tile is issued before its BAR.SYNC, see scripts/cuda/nvrtc_check.py.)
template <int GS, int RW, int SUB, int CH, typename Ready>
__device__ __forceinline__ void affine_tile4(const uint4* __restrict__ w, const u16* __restrict__ scales,
                                             const u16* __restrict__ biases, const float* xsm, float* __restrict__ y,
                                             int rows, int cols, long long row0, Ready ready) {
    constexpr int VPW = 8, VPC = 32;
    constexpr int SEGV = GS < VPC ? GS : VPC;
    constexpr int WPS = SEGV / VPW;
    constexpr int SEGS = 4 / WPS;
    constexpr int XSTRIDE = VPC + 4;
    const int lane = threadIdx.x & (SUB - 1);
    const int nch = cols / VPC;
    const int ngroups = cols / GS;
    uint4 q[CH][RW];
    u16 sc[CH][RW][SEGS], bi[CH][RW][SEGS];
#pragma unroll
    for (int i = 0; i < RW; i++) {
        const long long r = row0 + i < rows ? row0 + i : rows - 1;
        const uint4* wr = w + r * nch;
        const u16* sr = scales + r * ngroups;
        const u16* br = biases + r * ngroups;
#pragma unroll
        for (int u = 0; u < CH; u++) {
            const int c = lane + SUB * u;
            if (c < nch) {
                q[u][i] = ld_stream(wr + c);
#pragma unroll
                for (int sg = 0; sg < SEGS; sg++) {
                    const int g = (c * VPC + sg * SEGV) / GS;
                    sc[u][i][sg] = __ldg(sr + g);
                    bi[u][i][sg] = __ldg(br + g);
                }
            }
        }
    }
    ready();
    float acc[RW];
#pragma unroll
    for (int i = 0; i < RW; i++) acc[i] = 0.f;
#pragma unroll
    for (int u = 0; u < CH; u++) {
        const int c = lane + SUB * u;
        if (c >= nch) break;
        chunk_sums<4, GS, RW, XSTRIDE, SEGS>(q[u], sc[u], bi[u], xsm, c, acc);
    }
#pragma unroll
    for (int i = 0; i < RW; i++) {
        float v = acc[i];
#pragma unroll
        for (int o = SUB / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0 && row0 + i < rows) y[row0 + i] = v;
    }
}

// Tiles: RW_A rows per warp on gate/up (whole warps per row, CH_A chunks per lane per row),
// (32 / SUB_B)·RW_B rows per warp on down (one chunk per lane per row), RW_B = 2·RW_A.
template <int GS, int CH_A, int RW_A, int SUB_B>
__device__ __forceinline__ void fused_experts4(const FusedExpertsArgs& a) {
    constexpr int VPC = 32;
    constexpr int RW_B = 2 * RW_A;
    extern __shared__ float4 xsm4[];
    float* xsm = reinterpret_cast<float*>(xsm4);
    __shared__ u64 base_s[FUSED_MAX_K + 1];
    __shared__ int ticket_s[2];
    const int warps = blockDim.x >> 5, wib = threadIdx.x >> 5;
    const int tile_a = warps * RW_A, tile_b = warps * (32 / SUB_B) * RW_B;
    // Tiles per expert (routed, then the shared one).
    const int ga_r = (a.mat[0].rows + tile_a - 1) / tile_a, ua_r = (a.mat[1].rows + tile_a - 1) / tile_a;
    const int ga_s = (a.shared[0].rows + tile_a - 1) / tile_a, ua_s = (a.shared[1].rows + tile_a - 1) / tile_a;
    const int b_r = (a.mat[2].rows + tile_b - 1) / tile_b, b_s = (a.shared[2].rows + tile_b - 1) / tile_b;
    const int n_a = a.k * (ga_r + ua_r) + ga_s + ua_s;
    const int n_b = a.k * b_r + b_s;
    // The slots of this token's experts (0: not on the GPU), read once per block.
    if (threadIdx.x <= a.k) base_s[threadIdx.x] = threadIdx.x == a.k ? 1 : a.table[a.ids[threadIdx.x]];
    if (threadIdx.x == 0) ticket_s[0] = (int)atomicAdd(a.sync, 1u);
    int staged = -2;  // -1: the MoE input; j ≥ 0: silu(gate)·up of expert j
    for (int it = 0;; it ^= 1) {
        __syncthreads();  // every thread is done with the previous tile's shared memory and ticket
        const int t = ticket_s[it];
        if (t >= n_a + n_b) break;
        // The next ticket, asked for now and read at the next turn.
        if (threadIdx.x == 0) ticket_s[it ^ 1] = (int)atomicAdd(a.sync, 1u);
        GemvProblem pr;
        if (t < n_a) {
            int j, r;
            if (t < a.k * (ga_r + ua_r)) {
                j = t / (ga_r + ua_r);
                r = t % (ga_r + ua_r);
            } else {
                j = a.k;
                r = t - a.k * (ga_r + ua_r);
            }
            const int ga = j == a.k ? ga_s : ga_r;
            const int which = r < ga ? 0 : 1;
            const int tile = r < ga ? r : r - ga;
            const u64 base = base_s[j];
            if (base != 0) {
                fused_problem(a, j, which, base, pr);
                const long long row0 = ((long long)tile * warps + wib) * RW_A;
                affine_tile4<GS, RW_A, 32, CH_A>(pr.w, pr.s, pr.b, xsm, pr.y, pr.rows, pr.cols, row0, [&] {
                    if (staged != -1) {
                        stage_x<VPC>(xsm, pr.x, pr.cols, false, false);
                        staged = -1;
                    }
                    __syncthreads();
                });
            }
            // Written (or nothing to write): count the tile for expert j's down projection. Each
            // writer fences its own stores before the count is raised.
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) atomicAdd(a.sync + 2 + j, 1u);
        } else {
            const int u = t - n_a;
            const int j = u < a.k * b_r ? u / b_r : a.k;
            const int tile = u < a.k * b_r ? u % b_r : u - a.k * b_r;
            const u64 base = base_s[j];
            if (base == 0) continue;
            fused_problem(a, j, 2, base, pr);
            const int sub = (threadIdx.x & 31) / SUB_B;
            const long long row0 = (((long long)tile * warps + wib) * (32 / SUB_B) + sub) * RW_B;
            affine_tile4<GS, RW_B, SUB_B, 1>(pr.w, pr.s, pr.b, xsm, pr.y, pr.rows, pr.cols, row0, [&] {
                if (staged != j) {
                    if (threadIdx.x == 0) {
                        const u32 need = (u32)(j == a.k ? ga_s + ua_s : ga_r + ua_r);
                        volatile u32* done = a.sync + 2 + j;
                        // Bounded: a counter that never fills (a bug) fails the launch instead of hanging it.
                        for (long long spins = 0; *done < need; spins++) {
                            if (spins > (1ll << 26)) __trap();
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 700)
                            __nanosleep(32);
#endif
                        }
                        __threadfence();
                    }
                    __syncthreads();
                    stage_x<VPC>(xsm, pr.x, pr.cols, true, true);
                    staged = j;
                }
                __syncthreads();
            });
        }
    }
    // The last block out resets the counters for the next launch.
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(a.sync + 1, 1u) == gridDim.x - 1) {
            a.sync[0] = 0;
            a.sync[1] = 0;
            for (int j = 0; j <= a.k; j++) a.sync[2 + j] = 0;
            __threadfence();
        }
    }
}

#define FUSED_EXPERTS(G, R, S)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) affine_experts_fused_b4_g##G##_r##R##_s##S(FusedExpertsArgs a) { \
        pdl_prologue();                                                                                          \
        fused_experts4<G, 2, R, S>(a);                                                                           \
    }
#define FUSED_EXPERTS_S(G, R) FUSED_EXPERTS(G, R, 8) FUSED_EXPERTS(G, R, 16) FUSED_EXPERTS(G, R, 32)
#define FUSED_EXPERTS_R(G) FUSED_EXPERTS_S(G, 2) FUSED_EXPERTS_S(G, 4)
FUSED_EXPERTS_R(32)
FUSED_EXPERTS_R(64)
FUSED_EXPERTS_R(128)

// Dense (T = 0 f32, 1 bf16): one warp per row, grid-stride over rows.
template <int T>
__device__ __forceinline__ void dense_gemv_problem(const GemvProblem& pr) {
    const int warps = blockDim.x >> 5;
    for (long long r0 = (long long)blockIdx.x * warps; r0 < pr.rows; r0 += (long long)gridDim.x * warps) {
        const long long row = r0 + (threadIdx.x >> 5);
        if (row >= pr.rows) continue;
        const int lane = threadIdx.x & 31;
        constexpr int VPC = T == 0 ? 4 : 8;
        const int nch = pr.cols / VPC;
        const uint4* wr = pr.w + row * nch;
        float acc = 0.f;
        for (int c = lane; c < nch; c += 32) {
            const uint4 q = ld_stream(wr + c);
            const float4* xp = reinterpret_cast<const float4*>(pr.x + (long long)c * VPC);
            const float4* up = reinterpret_cast<const float4*>(pr.x + pr.cols + (long long)c * VPC);
            if (T == 0) {
                float4 t = __ldg(xp);
                if (pr.swiglu) t = swiglu4(t, __ldg(up));
                acc = fmaf(__uint_as_float(q.x), t.x, acc);
                acc = fmaf(__uint_as_float(q.y), t.y, acc);
                acc = fmaf(__uint_as_float(q.z), t.z, acc);
                acc = fmaf(__uint_as_float(q.w), t.w, acc);
            } else {
                float4 a = __ldg(xp), b = __ldg(xp + 1);
                if (pr.swiglu) {
                    a = swiglu4(a, __ldg(up));
                    b = swiglu4(b, __ldg(up + 1));
                }
                acc = fmaf(__uint_as_float(q.x << 16), a.x, acc);
                acc = fmaf(__uint_as_float(q.x & 0xFFFF0000u), a.y, acc);
                acc = fmaf(__uint_as_float(q.y << 16), a.z, acc);
                acc = fmaf(__uint_as_float(q.y & 0xFFFF0000u), a.w, acc);
                acc = fmaf(__uint_as_float(q.z << 16), b.x, acc);
                acc = fmaf(__uint_as_float(q.z & 0xFFFF0000u), b.y, acc);
                acc = fmaf(__uint_as_float(q.w << 16), b.z, acc);
                acc = fmaf(__uint_as_float(q.w & 0xFFFF0000u), b.w, acc);
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) pr.y[row] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(128) dense_gemv_batch_f32(GemvBatch batch) { pdl_prologue();
    dense_gemv_problem<0>(batch.p[blockIdx.y]);
}
extern "C" __global__ void __launch_bounds__(128) dense_gemv_batch_bf16(GemvBatch batch) { pdl_prologue();
    dense_gemv_problem<1>(batch.p[blockIdx.y]);
}
extern "C" __global__ void __launch_bounds__(128) dense_gemv_experts_f32(ExpertsArgs a) { pdl_prologue();
    GemvProblem pr;
    if (expert_problem(a, pr)) dense_gemv_problem<0>(pr);
}
extern "C" __global__ void __launch_bounds__(128) dense_gemv_experts_bf16(ExpertsArgs a) { pdl_prologue();
    GemvProblem pr;
    if (expert_problem(a, pr)) dense_gemv_problem<1>(pr);
}

// table[i] = v (stream-ordered update of the expert slot table).
extern "C" __global__ void table_set(u64* table, long long i, u64 v) { pdl_prologue(); table[i] = v; }
