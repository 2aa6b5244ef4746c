// GGML block types (llama.cpp's GGUF quantizations) on the GPU: decode GEMV (batched problems and
// the device-resolved expert GEMV), the grouped prefill GEMM, and rows dequantized to f32 (the
// cuBLAS prefill GEMM and the embedding lookup). x and y are f32, accumulation is f32; weights stay
// in the file's blocks.
//
// Every supported type is read in units of 32 consecutive elements: a 32-element block (Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) or one eighth of a 256-element super-block (Q2_K … Q6_K,
// IQ4_XS). `quad_values<T>` decodes four consecutive values of a unit with the same arithmetic as
// ggml's dequantize_row_* (and gguf-py, and the CPU kernels in crates/kernels/src/ggml/blocks.rs);
// T is the type's GGUF id. Blocks are 18 to 210 bytes, so a block is only 2-byte aligned: loads are
// 16-bit (two per 32-bit word).
//
// Compiled at run time by NVRTC; no headers. The argument structs repeat gemv.cu's / forward.cu's
// layouts (GemvProblem, ExpertsArgs, GemmMat), which the Rust side shares with both.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
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

__device__ __forceinline__ float f16f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u32 ld16(const u8* p) { return __ldg(reinterpret_cast<const u16*>(p)); }
// Four bytes at a 2-byte aligned address.
__device__ __forceinline__ u32 ld32(const u8* p) { return ld16(p) | (ld16(p + 2) << 16); }
__device__ __forceinline__ u32 ld8(const u8* p) { return __ldg(p); }

__device__ const float KVALUES_IQ4NL[16] = {-127.f, -104.f, -83.f, -65.f, -49.f, -35.f, -22.f, -10.f,
                                            1.f,    13.f,   25.f,  38.f,  53.f,  69.f,  89.f,  113.f};

// c − OFF as a float, for a code c < 2^23: OR-ing c into the mantissa of 2^23 gives 2^23 + c
// exactly, and one FADD removes 2^23 + OFF (exact: small integers). This replaces an int→float
// conversion, which runs at a fraction of the FMA rate, with two full-rate instructions.
template <int OFF>
__device__ __forceinline__ float code_f(u32 c) {
    return __uint_as_float(0x4B000000u | c) - (8388608.f + (float)OFF);
}

// Elements per block and bytes per block of type T (GGUF ids).
template <int T>
struct Blk;
template <> struct Blk<2> { static constexpr int QK = 32, TS = 18; };    // Q4_0
template <> struct Blk<3> { static constexpr int QK = 32, TS = 20; };    // Q4_1
template <> struct Blk<6> { static constexpr int QK = 32, TS = 22; };    // Q5_0
template <> struct Blk<7> { static constexpr int QK = 32, TS = 24; };    // Q5_1
template <> struct Blk<8> { static constexpr int QK = 32, TS = 34; };    // Q8_0
template <> struct Blk<10> { static constexpr int QK = 256, TS = 84; };  // Q2_K
template <> struct Blk<11> { static constexpr int QK = 256, TS = 110; }; // Q3_K
template <> struct Blk<12> { static constexpr int QK = 256, TS = 144; }; // Q4_K
template <> struct Blk<13> { static constexpr int QK = 256, TS = 176; }; // Q5_K
template <> struct Blk<14> { static constexpr int QK = 256, TS = 210; }; // Q6_K
template <> struct Blk<20> { static constexpr int QK = 32, TS = 18; };   // IQ4_NL
template <> struct Blk<23> { static constexpr int QK = 256, TS = 136; }; // IQ4_XS

// The (scale, min) pair `j` of a Q4_K/Q5_K super-block (`get_scale_min_k4` in ggml): six bits each,
// packed in the 12 bytes at s.
__device__ __forceinline__ void k4_scale_min(const u8* s, int j, u32& sc, u32& mn) {
    if (j < 4) {
        sc = ld8(s + j) & 63;
        mn = ld8(s + j + 4) & 63;
    } else {
        sc = (ld8(s + j + 4) & 15) | ((ld8(s + j - 4) >> 6) << 4);
        mn = (ld8(s + j + 4) >> 4) | ((ld8(s + j) >> 6) << 4);
    }
}

// Decodes values 4q .. 4q+3 (q < 8) of unit u of a row (row = the row's first block) into w.
// A warp's 32 lanes take 4 units × 8 quads: consecutive lanes, consecutive values, so the warp's
// float4 reads of x are contiguous (a lane per whole unit would read x 128 bytes apart: one
// L1 wavefront per lane).
template <int T>
__device__ __forceinline__ void quad_values(const u8* __restrict__ row, int u, int q, float* w) {
    constexpr int QK = Blk<T>::QK, TS = Blk<T>::TS;
    const u8* b = row + (long long)(u / (QK / 32)) * TS;
    const int sub = u % (QK / 32);
    const int l = 4 * q;       // first value inside the unit
    const int hi = q >> 2;     // second half of the unit (high nibbles / second scale)
    if constexpr (T == 2 || T == 3 || T == 20) {  // Q4_0, Q4_1, IQ4_NL: value j in byte j % 16
        const float d = f16f(ld16(b));
        const float m = T == 3 ? f16f(ld16(b + 2)) : 0.f;
        const u32 c4 = ld32(b + (T == 3 ? 4 : 2) + (l & 15)) >> (4 * hi);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const u32 c = (c4 >> (8 * k)) & 15;
            if constexpr (T == 2) w[k] = d * code_f<8>(c);
            else if constexpr (T == 3) w[k] = d * code_f<0>(c) + m;
            else w[k] = d * KVALUES_IQ4NL[c];
        }
    } else if constexpr (T == 6 || T == 7) {  // Q5_0, Q5_1: fifth bit of value j at bit j of qh
        const float d = f16f(ld16(b));
        const float m = T == 7 ? f16f(ld16(b + 2)) : 0.f;
        const u32 qh = ld32(b + (T == 7 ? 4 : 2)) >> l;
        const u32 c4 = ld32(b + (T == 7 ? 8 : 6) + (l & 15)) >> (4 * hi);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const u32 c = ((c4 >> (8 * k)) & 15) | (((qh >> k) & 1) << 4);
            if constexpr (T == 6) w[k] = d * code_f<16>(c);
            else w[k] = d * code_f<0>(c) + m;
        }
    } else if constexpr (T == 8) {  // Q8_0
        const float d = f16f(ld16(b));
        const u32 c4 = ld32(b + 2 + l);
#pragma unroll
        // The signed byte b is (b ^ 0x80) − 128.
        for (int k = 0; k < 4; k++) w[k] = code_f<128>(((c4 >> (8 * k)) & 0xFF) ^ 0x80) * d;
    } else if constexpr (T == 10) {  // Q2_K: scale byte per 16 values (low nibble scale, high min)
        const float d = f16f(ld16(b + 80)), dmin = f16f(ld16(b + 82));
        const u32 s = ld8(b + 2 * sub + hi);
        const float dl = d * code_f<0>(s & 15), ml = dmin * code_f<0>(s >> 4);
        const u32 c4 = ld32(b + 16 + (sub >> 2) * 32 + l) >> (2 * (sub & 3));
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = dl * code_f<0>((c4 >> (8 * k)) & 3) - ml;
    } else if constexpr (T == 11) {  // Q3_K: 2 low bits in qs, inverted high bit in hmask
        const float d = f16f(ld16(b + 108));
        const u8* sc = b + 96;
        const int i = 2 * sub + hi;
        const u32 low = i < 8 ? ld8(sc + i) & 15 : ld8(sc + i - 8) >> 4;
        const u32 high = (ld8(sc + 8 + i % 4) >> (2 * (i / 4))) & 3;
        const float dl = d * code_f<32>(low | (high << 4));
        const u32 c4 = ld32(b + 32 + (sub >> 2) * 32 + l) >> (2 * (sub & 3));
        const u32 h4 = ld32(b + l) >> sub;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            // low − 4 + 4·high: the high bit is stored inverted.
            w[k] = dl * code_f<4>(((c4 >> (8 * k)) & 3) | (((h4 >> (8 * k)) & 1) << 2));
        }
    } else if constexpr (T == 12 || T == 13) {  // Q4_K, Q5_K: sub-block sub, nibble sub & 1
        const float d = f16f(ld16(b)), dmin = f16f(ld16(b + 2));
        u32 sc, mn;
        k4_scale_min(b + 4, sub, sc, mn);
        const float dl = d * code_f<0>(sc), ml = dmin * code_f<0>(mn);
        const u32 c4 = ld32(b + (T == 12 ? 16 : 48) + (sub >> 1) * 32 + l) >> (4 * (sub & 1));
        u32 h4 = 0;
        if constexpr (T == 13) h4 = ld32(b + 16 + l) >> sub;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u32 c = (c4 >> (8 * k)) & 15;
            if constexpr (T == 13) c |= ((h4 >> (8 * k)) & 1) << 4;
            w[k] = dl * code_f<0>(c) - ml;
        }
    } else if constexpr (T == 14) {  // Q6_K: half h = sub/4, quarter t = sub%4
        const int h = sub >> 2, t = sub & 3;
        const float d = f16f(ld16(b + 208));
        const float dl = d * code_f<128>(ld8(b + 192 + 2 * sub + hi) ^ 0x80);
        const u32 lo4 = ld32(b + h * 64 + (t & 1) * 32 + l) >> (4 * (t >> 1));
        const u32 hi4 = ld32(b + 128 + h * 32 + l) >> (2 * t);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            w[k] = dl * code_f<32>(((lo4 >> (8 * k)) & 15) | (((hi4 >> (8 * k)) & 3) << 4));
        }
    } else if constexpr (T == 23) {  // IQ4_XS: 6-bit sub-block scale, non-linear codebook
        const float d = f16f(ld16(b));
        const u32 sh = ld16(b + 2);
        const u32 ls = ((ld8(b + 4 + sub / 2) >> (4 * (sub % 2))) & 15) | (((sh >> (2 * sub)) & 3) << 4);
        const float dl = d * code_f<32>(ls);
        const u32 c4 = ld32(b + 8 + sub * 16 + (l & 15)) >> (4 * hi);
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = dl * KVALUES_IQ4NL[(c4 >> (8 * k)) & 15];
    }
}

template <int T>
__device__ __forceinline__ long long row_bytes(int cols) {
    return (long long)(cols / Blk<T>::QK) * Blk<T>::TS;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float silu_(float g) { return g / (1.f + expf(-g)); }

// ---------------------------------------------------------------------------------------------
// Decode GEMV: one warp per GGML_RW rows, lane l takes values 4l .. 4l+3 of every 128 (so the
// warp reads 4 consecutive units of each row and 512 contiguous bytes of x per step), grid-stride
// over row tiles. Layouts as in gemv.cu.
#define MAXP 24
struct GemvProblem {
    const u8* w;
    const u16* s;  // unused (affine only)
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
struct MatOff {
    u64 w, s, b;
    int rows, cols;
};
struct ExpertsArgs {
    const int* ids;
    const u64* table;
    const float* x;
    float* y;
    long long x_stride, y_stride;
    MatOff mat[2];
    GemvProblem shared[2];
    int k, nmat, swiglu;
};

// RW rows per warp share each x float4 (read once, used for every row).
#define GGML_U 4
template <int T, int RW>
__device__ __forceinline__ void ggml_gemv_problem(const GemvProblem& pr) {
    const int warps = blockDim.x >> 5;
    const int lane = threadIdx.x & 31;
    const long long rb = row_bytes<T>(pr.cols);
    const long long ntiles = ((long long)pr.rows + RW - 1) / RW;
    for (long long t = (long long)blockIdx.x * warps + (threadIdx.x >> 5); t < ntiles; t += (long long)gridDim.x * warps) {
        const long long row0 = t * RW;
        float acc[RW];
#pragma unroll
        for (int i = 0; i < RW; i++) acc[i] = 0.f;
        const u8* rowp[RW];
#pragma unroll
        for (int i = 0; i < RW; i++) rowp[i] = pr.w + (row0 + i < pr.rows ? row0 + i : pr.rows - 1) * rb;
        // Value v = 128·step + 4·lane: unit v/32, quad lane % 8. GGML_U steps per iteration,
        // branch-free (a step past the row repeats the first with x zeroed), so that the loads of
        // all GGML_U·RW quads are in flight together: one step's few bytes per lane cannot cover
        // the memory latency.
        for (int v0 = 4 * lane; v0 < pr.cols; v0 += 128 * GGML_U) {
            float w[GGML_U][RW][4];
            float4 xv[GGML_U];
#pragma unroll
            for (int s = 0; s < GGML_U; s++) {
                const int v = v0 + 128 * s;
                const bool in = v < pr.cols;
                const int vc = in ? v : v0;
#pragma unroll
                for (int i = 0; i < RW; i++) quad_values<T>(rowp[i], vc >> 5, (vc >> 2) & 7, w[s][i]);
                float4 t = __ldg(reinterpret_cast<const float4*>(pr.x + vc));
                if (pr.swiglu) {
                    const float4 g = __ldg(reinterpret_cast<const float4*>(pr.x + pr.cols + vc));
                    t = make_float4(silu_(t.x) * g.x, silu_(t.y) * g.y, silu_(t.z) * g.z, silu_(t.w) * g.w);
                }
                xv[s] = in ? t : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int s = 0; s < GGML_U; s++)
#pragma unroll
                for (int i = 0; i < RW; i++) {
                    float a = acc[i];
                    a = fmaf(w[s][i][0], xv[s].x, a);
                    a = fmaf(w[s][i][1], xv[s].y, a);
                    a = fmaf(w[s][i][2], xv[s].z, a);
                    a = fmaf(w[s][i][3], xv[s].w, a);
                    acc[i] = a;
                }
        }
#pragma unroll
        for (int i = 0; i < RW; i++) {
            const float sum = warp_sum(acc[i]);
            if (lane == 0 && row0 + i < pr.rows) pr.y[row0 + i] = sum;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_K decode GEMV (most tensors of a Q4_K_M file). The generic GEMV above decodes 4 values per
// lane per step and unpacks the super-block's header for each 4 (≈ 11 instructions a value:
// 16-bit loads, the 6-bit scale unpacking, a multiply per value), so it is bound by instructions,
// not bytes (15% of copy, docs/performance.md). Q4_K super-blocks are 144 bytes, a multiple of
// 16: when a row starts 16-byte aligned every super-block does, and a lane takes 32 values at
// once with two 16-byte loads: the header (d, dmin, 12 scale bytes) and 16 code bytes, whose low
// nibbles are 16 values of sub-block 2p and high nibbles 16 of sub-block 2p+1. Per sub-block the
// lane sums q·x (each code read in place as 2^23 + q·2^sh and the 2^23 taken off, so every
// product is exact up to x's rounding, as gemv.cu's chunk_sums) and Σx, then adds
// dl·Σq·x − ml·Σx with ggml's dl = d·sc, ml = dmin·m: the value dl·q − ml is not formed, so the
// result is ggml's dot product up to the order of f32 roundings. x is staged once per block in
// shared memory in the order the lanes read it (one conflict-free 16-byte read per 4 values,
// shared by the lane's RW rows; silu(gate)·up is formed there once). LPR lanes per row (32, 16
// or 8: 4, 2 or 1 super-blocks a step) keep a warp busy on narrow rows (the 512-input down
// projection of a 35B-A3B expert). Rows wider than KQ_MAXC or not 16-byte aligned take the
// generic kernel. The other types the same way (KQuant<T> below); kq_gemv is the loop they share.
#define KQ_MAXC 8192
__device__ __forceinline__ uint4 ldg128(const u8* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ float f4get(const float4& v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }
__device__ __forceinline__ u32 u4get(const uint4& v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }

// Σ over one code word's 8 nibbles: part[k] += q_k·2^sh_k · x_k (k even: sub-block A, byte k/2's
// low nibble; k odd: sub-block B, its high nibble). Nibbles 5–7 are read from the word's high
// half so that q·2^sh stays below 2^23.
__device__ __forceinline__ void q4k_word(u32 wd, const float4& xa, const float4& xb, float (&part)[8]) {
    const u32 hi = wd >> 16;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const u32 m = k <= 4 ? (wd & (15u << (4 * k))) : (hi & (15u << (4 * k - 16)));
        const float f = __uint_as_float(m | 0x4B000000u) - 8388608.0f;
        part[k] = fmaf(f, f4get(k & 1 ? xb : xa, k >> 1), part[k]);
    }
}

// ggml's dl = d·sc and ml = dmin·m of sub-blocks 2p and 2p + 1 of a Q4_K/Q5_K super-block whose
// first 16 bytes (d, dmin, 12 scale bytes) are hd.
__device__ __forceinline__ void q4k_dlml(const uint4& hd, int p, float (&dl)[2], float (&ml)[2]) {
    const float d = f16f(hd.x & 0xFFFF), dmin = f16f(hd.x >> 16);
#pragma unroll
    for (int e = 0; e < 2; e++) {
        // get_scale_min_k4 for j = 2p + e: bytes S[j'], S[4 + j'], S[8 + j'] with j' = j & 3.
        const int sh = 8 * ((2 * p + e) & 3);
        const u32 y = hd.y >> sh, z = hd.z >> sh, w = hd.w >> sh;
        const u32 sc = p < 2 ? (y & 63) : ((w & 15) | ((y >> 2) & 0x30));
        const u32 mn = p < 2 ? (z & 63) : (((w >> 4) & 15) | ((z >> 2) & 0x30));
        dl[e] = d * code_f<0>(sc);
        ml[e] = dmin * code_f<0>(mn);
    }
}

// dl·Σq·x − ml·Σx of one lane's two sub-blocks (j = 2p, 2p+1) of a super-block with header hd.
__device__ __forceinline__ float q4k_finish(const uint4& hd, int p, const float (&part)[8], float sxa, float sxb,
                                            float acc) {
    float dl[2], ml[2];
    q4k_dlml(hd, p, dl, ml);
    float sa = 0.f, sb = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int sh = k <= 4 ? 4 * k : 4 * k - 16;
        const float inv = __uint_as_float((u32)(127 - sh) << 23);
        if (k & 1) sb = fmaf(part[k], inv, sb);
        else sa = fmaf(part[k], inv, sa);
    }
    acc = fmaf(dl[0], sa, acc);
    acc = fmaf(-ml[0], sxa, acc);
    acc = fmaf(dl[1], sb, acc);
    return fmaf(-ml[1], sxb, acc);
}

// Σ over the four bytes of a code word, each a code ≤ MASK (2^B − 1), times x: part[k] +=
// c_k·2^sh_k · x_k, the code read in place as in q4k_word: bytes 0 and 1 from the word, byte 3
// from its high half, byte 2 from the word when MASK < 0x80 (in place it stays below 2^23) and
// from the high half otherwise. codes4_sum takes the 2^sh_k off (exact: powers of two).
template <u32 MASK>
__device__ __forceinline__ void codes4_fma(u32 c, const float4& xq, float (&part)[4]) {
    const u32 chi = c >> 16;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const u32 m = k <= 1 || (k == 2 && MASK < 0x80u) ? (c & (MASK << (8 * k))) : (chi & (MASK << (8 * (k - 2))));
        const float f = __uint_as_float(m | 0x4B000000u) - 8388608.0f;
        part[k] = fmaf(f, f4get(xq, k), part[k]);
    }
}
template <u32 MASK>
__device__ __forceinline__ float codes4_sum(const float (&part)[4]) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int sh = k <= 1 || (k == 2 && MASK < 0x80u) ? 8 * k : 8 * (k - 2);
        s = fmaf(part[k], __uint_as_float((u32)(127 - sh) << 23), s);
    }
    return s;
}

// A lane's share of one super-block, per K-quant type: KQuant<T>::Blk holds what the lane loads
// (load), xsums the Σx of its sub-blocks (once per step, shared by the lane's rows), dot adds its
// 32 values times x to acc. slot_value maps the staged-x slot of float4 f of lane l (within the
// lane's row group) to the value index inside the step's super-blocks: lane l reads float4 f of
// step st at xs[st·8·LPR + f·LPR + l].
template <int T>
struct KQuant;

// Q4_K: lane l takes p = (l >> 1) & 3, h = l & 1: 16 code bytes at 16 + 32p + 16h, whose low
// nibbles are values 64p + 16h + i of sub-block 2p and high nibbles 64p + 32 + 16h + i of 2p+1;
// float4 f < 4 holds 4 of the former, f ≥ 4 of the latter. Q5_K's lanes are the same (Q4KLane).
struct Q4KLane {
    static constexpr int NX = 2;
    int p, h;
    __device__ explicit Q4KLane(int l) : p((l >> 1) & 3), h(l & 1) {}
    __device__ static int slot_value(int f, int l) {
        return ((l >> 1) & 3) * 64 + (f >> 2) * 32 + (l & 1) * 16 + (f & 3) * 4;
    }
    __device__ static void xsums(const float4 (&xv)[8], float (&sx)[NX]) {
        sx[0] = sx[1] = 0.f;
#pragma unroll
        for (int f = 0; f < 4; f++) {
            sx[0] += (xv[f].x + xv[f].y) + (xv[f].z + xv[f].w);
            sx[1] += (xv[f + 4].x + xv[f + 4].y) + (xv[f + 4].z + xv[f + 4].w);
        }
    }
};
template <>
struct KQuant<12> : Q4KLane {
    static constexpr int TS = 144;
    struct Blk {
        uint4 hd, q;
    };
    __device__ explicit KQuant(int l) : Q4KLane(l) {}
    __device__ Blk load(const u8* b) const { return {ldg128(b), ldg128(b + 16 + p * 32 + h * 16)}; }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&sx)[NX], float acc) const {
        float part[8];
#pragma unroll
        for (int k = 0; k < 8; k++) part[k] = 0.f;
#pragma unroll
        for (int w = 0; w < 4; w++) q4k_word(u4get(b.q, w), xv[w], xv[w + 4], part);
        return q4k_finish(b.hd, p, part, sx[0], sx[1], acc);
    }
};

// Q5_K (176-byte super-blocks: d, dmin, 12 scale bytes, qh[32], qs[128]) is Q4_K with a fifth bit:
// value 64p + i (i < 32) has low nibble qs[32p + i] & 15 and bit 2p of qh[i], value 64p + 32 + i
// the high nibble and bit 2p + 1 (ggml's dequantize_row_q5_K). The lane reads Q4_K's 16 code
// bytes (at 48 + 32p + 16h) and the 16 qh bytes of the same i (at 16 + 16h), all 16-byte aligned,
// and forms 5-bit codes four to a word.
template <>
struct KQuant<13> : Q4KLane {
    static constexpr int TS = 176;
    struct Blk {
        uint4 hd, qh, q;
    };
    __device__ explicit KQuant(int l) : Q4KLane(l) {}
    __device__ Blk load(const u8* b) const {
        return {ldg128(b), ldg128(b + 16 + h * 16), ldg128(b + 48 + p * 32 + h * 16)};
    }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&sx)[NX], float acc) const {
        float pa[4] = {0.f, 0.f, 0.f, 0.f}, pb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < 4; w++) {
            const u32 qw = u4get(b.q, w), hw = u4get(b.qh, w) >> (2 * p);
            codes4_fma<0x1F>((qw & 0x0F0F0F0Fu) | ((hw << 4) & 0x10101010u), xv[w], pa);
            codes4_fma<0x1F>(((qw >> 4) & 0x0F0F0F0Fu) | ((hw << 3) & 0x10101010u), xv[w + 4], pb);
        }
        float dl[2], ml[2];
        q4k_dlml(b.hd, p, dl, ml);
        acc = fmaf(dl[0], codes4_sum<0x1F>(pa), acc);
        acc = fmaf(-ml[0], sx[0], acc);
        acc = fmaf(dl[1], codes4_sum<0x1F>(pb), acc);
        return fmaf(-ml[1], sx[1], acc);
    }
};

// Q2_K, Q3_K and Q6_K keep 128-value halves whose byte i carries value 32g + i of the half in its
// bits (g = 0..3: ggml's shift 2g, or Q6_K's q1..q4). Lane l of a super-block's 8 takes half
// n = (l >> 2) & 1 and bytes l0 .. l0 + 7 (l0 = 8·(l & 3)) of it: values 128n + 32g + l0 + i,
// float4 f = 2g + w holding 32g + 4w .. +3. Group g lies in one 16-value sub-block,
// 8n + 2g + hb with hb = l0 / 16 (Q6_K: 8n + hb + 2g, the same), whose Σx is sx[g].
struct Half8Lane {
    static constexpr int NX = 4;
    int n, l0, hb;
    __device__ explicit Half8Lane(int l) : n((l >> 2) & 1), l0((l & 3) * 8), hb(((l & 3) * 8) >> 4) {}
    __device__ static int slot_value(int f, int l) {
        return ((l >> 2) & 1) * 128 + (f >> 1) * 32 + (l & 3) * 8 + (f & 1) * 4;
    }
    __device__ static void xsums(const float4 (&xv)[8], float (&sx)[NX]) {
#pragma unroll
        for (int g = 0; g < 4; g++) {
            const float4 p0 = xv[2 * g], p1 = xv[2 * g + 1];
            sx[g] = ((p0.x + p0.y) + (p0.z + p0.w)) + ((p1.x + p1.y) + (p1.z + p1.w));
        }
    }
};

// Q6_K (the output matrix and half the down projections of a Q4_K_M file). A super-block is 210
// bytes (only 2-byte aligned): ql[128] (low 4 bits), qh[64] (high 2 bits), 16 int8 scales (one
// per 16 values), d. The lane's 8 bytes each of ql[64n + l0], ql[64n + 32 + l0] and qh[32n + l0]
// give its 32 values, four 6-bit codes per word after two masks and a shift, read in place by
// codes4_fma. Group g's sum is d·sc·(Σq·x − 32·Σx), ggml's d·sc·(q − 32) up to the order of f32
// roundings. The loads are 16-bit (ld32 is two).
template <>
struct KQuant<14> : Half8Lane {
    static constexpr int TS = 210;
    struct Blk {
        u32 a[2], b[2], hq[2], sc[2], dd;
    };
    __device__ explicit KQuant(int l) : Half8Lane(l) {}
    __device__ Blk load(const u8* blk) const {
        Blk r;
#pragma unroll
        for (int w = 0; w < 2; w++) {
            r.a[w] = ld32(blk + 64 * n + l0 + 4 * w);
            r.b[w] = ld32(blk + 64 * n + 32 + l0 + 4 * w);
            r.hq[w] = ld32(blk + 128 + 32 * n + l0 + 4 * w);
            r.sc[w] = ld32(blk + 192 + 8 * n + 4 * w);
        }
        r.dd = ld16(blk + 208);
        return r;
    }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&sx)[NX], float acc) const {
        float part[4][4];
#pragma unroll
        for (int g = 0; g < 4; g++)
#pragma unroll
            for (int k = 0; k < 4; k++) part[g][k] = 0.f;
#pragma unroll
        for (int w = 0; w < 2; w++) {
            const u32 aw = b.a[w], bw = b.b[w], hw = b.hq[w];
            const u32 cw[4] = {(aw & 0x0F0F0F0Fu) | ((hw << 4) & 0x30303030u),
                               (bw & 0x0F0F0F0Fu) | ((hw << 2) & 0x30303030u),
                               ((aw >> 4) & 0x0F0F0F0Fu) | (hw & 0x30303030u),
                               ((bw >> 4) & 0x0F0F0F0Fu) | ((hw >> 2) & 0x30303030u)};
#pragma unroll
            for (int g = 0; g < 4; g++) codes4_fma<0x3F>(cw[g], xv[2 * g + w], part[g]);
        }
        const float d = f16f(b.dd);
#pragma unroll
        for (int g = 0; g < 4; g++) {
            // Scale byte hb + 2g of the 8 at 192 + 8n: word g >> 1, byte hb + 2·(g & 1).
            const u32 sbyte = (b.sc[g >> 1] >> (8 * (hb + 2 * (g & 1)))) & 0xFF;
            const float dl = d * code_f<128>(sbyte ^ 0x80);
            acc = fmaf(dl, codes4_sum<0x3F>(part[g]), acc);
            acc = fmaf(-32.f * dl, sx[g], acc);
        }
        return acc;
    }
};

// Q2_K (84-byte super-blocks, 4-byte aligned on an aligned row: scales[16], qs[64], d, dmin):
// value 128n + 32g + i is bits 2g of qs[32n + i]; sub-block s's scale byte has the scale in its
// low nibble and the min in its high one, d·sc·q − dmin·m (ggml's dequantize_row_q2_K). The lane
// reads the 8 scale bytes of its half, its 8 qs bytes and d, dmin: five 32-bit loads.
template <>
struct KQuant<10> : Half8Lane {
    static constexpr int TS = 84;
    struct Blk {
        u32 sc[2], q[2], dd;
    };
    __device__ explicit KQuant(int l) : Half8Lane(l) {}
    __device__ Blk load(const u8* blk) const {
        const u32* p = reinterpret_cast<const u32*>(blk);
        return {{__ldg(p + 2 * n), __ldg(p + 2 * n + 1)},
                {__ldg(p + 4 + 8 * n + (l0 >> 2)), __ldg(p + 5 + 8 * n + (l0 >> 2))},
                __ldg(p + 20)};
    }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&sx)[NX], float acc) const {
        const float d = f16f(b.dd & 0xFFFFu), dmin = f16f(b.dd >> 16);
#pragma unroll
        for (int g = 0; g < 4; g++) {
            float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int w = 0; w < 2; w++) codes4_fma<0x03>((b.q[w] >> (2 * g)) & 0x03030303u, xv[2 * g + w], part);
            // Scale byte hb + 2g of the half's 8: word g >> 1, byte hb + 2·(g & 1).
            const u32 s = b.sc[g >> 1] >> (8 * (hb + 2 * (g & 1)));
            acc = fmaf(d * code_f<0>(s & 15), codes4_sum<0x03>(part), acc);
            acc = fmaf(-(dmin * code_f<0>((s >> 4) & 15)), sx[g], acc);
        }
        return acc;
    }
};

// N 32-bit words from a 2-byte aligned address: N + 1 aligned loads and funnel shifts.
template <int N>
__device__ __forceinline__ void ld_words_2al(const u8* p, u32 (&out)[N]) {
    const u32* q = reinterpret_cast<const u32*>(reinterpret_cast<u64>(p) & ~3ull);
    const u32 sh = (reinterpret_cast<u64>(p) & 2) * 8;
    u32 w[N + 1];
#pragma unroll
    for (int k = 0; k <= N; k++) w[k] = __ldg(q + k);
#pragma unroll
    for (int k = 0; k < N; k++) out[k] = __funnelshift_r(w[k], w[k + 1], sh);
}

// Q3_K (110-byte super-blocks, only 2-byte aligned: hmask[32], qs[64], scales[12], d): value
// 128n + 32g + i has low bits 2g of qs[32n + i] and, at bit 4n + g of hmask[i], a high bit that
// is set when the value is not lowered by 4: q = (low | high << 2) − 4. The 16 six-bit scales
// (minus 32) are packed in 12 bytes: scale s has its low nibble in byte s & 7 (high nibble when
// s ≥ 8) and its top two bits at bits 2·(s >> 2) of byte 8 + (s & 3) (ggml's kmask unpacking).
// The lane reads its 8 hmask and 8 qs bytes, the 12 scale bytes and d as aligned words and
// funnel shifts (ld_words_2al), within the aligned words that hold the block: never a word past it.
template <>
struct KQuant<11> : Half8Lane {
    static constexpr int TS = 110;
    struct Blk {
        u32 hm[2], q[2], sc[3], dd;
    };
    __device__ explicit KQuant(int l) : Half8Lane(l) {}
    __device__ Blk load(const u8* blk) const {
        Blk r;
        ld_words_2al<2>(blk + l0, r.hm);
        ld_words_2al<2>(blk + 32 + 32 * n + l0, r.q);
        // The 12 scale bytes at 96: three words from four aligned ones when the block is half a
        // word off, from three (the fourth load repeats the third) when it is not, so nothing
        // past the block is read; d with a 16-bit load.
        const u32* q = reinterpret_cast<const u32*>(reinterpret_cast<u64>(blk + 96) & ~3ull);
        const u32 sh = (reinterpret_cast<u64>(blk) & 2) * 8;
        const u32 w0 = __ldg(q), w1 = __ldg(q + 1), w2 = __ldg(q + 2), w3 = __ldg(q + (sh ? 3 : 2));
        r.sc[0] = __funnelshift_r(w0, w1, sh);
        r.sc[1] = __funnelshift_r(w1, w2, sh);
        r.sc[2] = __funnelshift_r(w2, w3, sh);
        r.dd = ld16(blk + 108);
        return r;
    }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&sx)[NX], float acc) const {
        const float d = f16f(b.dd);
#pragma unroll
        for (int g = 0; g < 4; g++) {
            float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int w = 0; w < 2; w++) {
                const u32 c = ((b.q[w] >> (2 * g)) & 0x03030303u) | (((b.hm[w] >> (4 * n + g)) & 0x01010101u) << 2);
                codes4_fma<0x07>(c, xv[2 * g + w], part);
            }
            // Scale s = 8n + 2g + hb: low nibble in byte 2g + hb (nibble n), top bits in byte
            // 8 + ((2g + hb) & 3) at bits 2·(2n + (g >> 1)).
            const int lb = 2 * g + hb, hbyte = 8 + (lb & 3);
            const u32 low = (b.sc[lb >> 2] >> (8 * (lb & 3) + 4 * n)) & 15;
            const u32 high = (b.sc[hbyte >> 2] >> (8 * (hbyte & 3) + 2 * (2 * n + (g >> 1)))) & 3;
            const float dl = d * code_f<32>(low | (high << 4));
            acc = fmaf(dl, codes4_sum<0x07>(part), acc);
            acc = fmaf(-4.f * dl, sx[g], acc);
        }
        return acc;
    }
};

// The 32-value types Q4_0 and IQ4_NL (18-byte blocks: d, qs[16]; byte i holds values i and
// i + 16) go through kq_gemv too, eight blocks (144 bytes, as a Q4_K super-block) to a step's
// "super-block": lane l takes block l, whose values 4f .. 4f + 3 are float4 f (in order). A block
// is 2-byte aligned, but at 18·l it starts on a word (l even) or half a word past one (l odd),
// so five aligned 32-bit loads from 18·l rounded down to a word hold it: for l odd, d is the high
// half of word 0 and qs words 1 .. 4; for l even, d is word 0's low half and each qs word straddles
// two (a funnel shift). That needs a word-aligned row (cols a multiple of 256 makes the rows
// 144·n bytes), against nine 16-bit loads per block in the generic kernel.
struct Blk18 {
    u32 w[5];
};
__device__ __forceinline__ Blk18 load_blk18(const u8* sb, int l) {
    const u32* p = reinterpret_cast<const u32*>(sb + ((18 * l) & ~3));
    Blk18 r;
#pragma unroll
    for (int k = 0; k < 5; k++) r.w[k] = __ldg(p + k);
    return r;
}
// d's bits and the four qs words of a block loaded by load_blk18 for lane l.
__device__ __forceinline__ u32 blk18_words(const Blk18& b, int l, u32 (&qw)[4]) {
    const bool odd = l & 1;
#pragma unroll
    for (int k = 0; k < 4; k++) qw[k] = __funnelshift_rc(b.w[k], b.w[k + 1], odd ? 32 : 16);
    return odd ? b.w[0] >> 16 : b.w[0] & 0xFFFFu;
}

// IQ4_NL / IQ4_XS: Σ level·x over 32 values, from four qs words (byte i of word k: values 4k + i
// (low nibble, float4 k) and 16 + 4k + i (high, float4 k + 4)). Four levels at a time: the nibbles'
// low 3 bits packed into one byte-permute selector pick level + 128 from the low and the high
// eight of the table (the same four immediate words as forward.cu's iq4_level_tf32), a mask
// from each nibble's bit 3 chooses between them, and each byte becomes 2^23 + byte in one more
// permute; one FADD leaves the level, exactly. ≈ 5 instructions a value, against a shared-memory
// table load and an int→float conversion.
__device__ __forceinline__ u32 iq4_bytes(u32 nib4) {
    const u32 x = nib4 | (nib4 >> 4);
    const u32 sel = __byte_perm(x, 0u, 0x4420u) & 0x7777u;
    const u32 lo = __byte_perm(0x3F2D1801u, 0x766A5D4Fu, sel), hi = __byte_perm(0xA6998D81u, 0xF1D9C5B5u, sel);
    // 0xFF in the bytes whose nibble is ≥ 8 (__byte_perm reads only 3 bits of a selector nibble:
    // no sign replication, so the mask is made by a multiply).
    const u32 m = ((nib4 >> 3) & 0x01010101u) * 0xFFu;
    return (hi & m) | (lo & ~m);
}
__device__ __forceinline__ float iq4_dot32(const u32 (&qw)[4], const float4 (&xv)[8]) {
    float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int k = 0; k < 4; k++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const u32 u4 = iq4_bytes((qw[k] >> (4 * half)) & 0x0F0F0F0Fu);
            const float4 xq = xv[k + 4 * half];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float lv = __uint_as_float(__byte_perm(u4, 0x4B000000u, 0x7440u + i)) - 8388736.f;
                part[i] = fmaf(lv, f4get(xq, i), part[i]);
            }
        }
    }
    return (part[0] + part[1]) + (part[2] + part[3]);
}

// Lane l (of a super-block's 8) takes the step's 32-value (sub-)block l, its values in order
// (float4 f holds values 4f .. 4f + 3): Q4_0, IQ4_NL, Q8_0 and IQ4_XS.
struct BlockLane {
    int l;
    __device__ explicit BlockLane(int L) : l(L & 7) {}
    __device__ static int slot_value(int f, int l) { return (l & 7) * 32 + 4 * f; }
};

// What Q4_0 and IQ4_NL share: eight 18-byte blocks to a step.
struct Blk18Lane : BlockLane {
    static constexpr int TS = 144, NX = 1;
    using Blk = Blk18;
    __device__ explicit Blk18Lane(int L) : BlockLane(L) {}
    __device__ Blk load(const u8* b) const { return load_blk18(b, l); }
};

// Q4_0: Σ(q − 8)·d·x = d·(Σq·x − 8·Σx), Σq·x with q read in place as in q4k_word.
template <>
struct KQuant<2> : Blk18Lane {
    __device__ explicit KQuant(int L) : Blk18Lane(L) {}
    __device__ static void xsums(const float4 (&xv)[8], float (&sx)[NX]) {
        float s = 0.f;
#pragma unroll
        for (int f = 0; f < 8; f++) s += (xv[f].x + xv[f].y) + (xv[f].z + xv[f].w);
        sx[0] = s;
    }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&sx)[NX], float acc) const {
        u32 qw[4];
        const float d = f16f(blk18_words(b, l, qw));
        float part[8];
#pragma unroll
        for (int k = 0; k < 8; k++) part[k] = 0.f;
#pragma unroll
        for (int w = 0; w < 4; w++) q4k_word(qw[w], xv[w], xv[w + 4], part);
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int sh = k <= 4 ? 4 * k : 4 * k - 16;
            sq = fmaf(part[k], __uint_as_float((u32)(127 - sh) << 23), sq);
        }
        acc = fmaf(d, sq, acc);
        return fmaf(-8.f * d, sx[0], acc);
    }
};

// IQ4_NL: d·Σ level·x per block.
template <>
struct KQuant<20> : Blk18Lane {
    __device__ explicit KQuant(int L) : Blk18Lane(L) {}
    __device__ static void xsums(const float4 (&)[8], float (&sx)[NX]) { sx[0] = 0.f; }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&)[NX], float acc) const {
        u32 qw[4];
        const float d = f16f(blk18_words(b, l, qw));
        return fmaf(d, iq4_dot32(qw, xv), acc);
    }
};

// IQ4_XS (136-byte super-blocks: d, scales_h, scales_l[4], qs[128]; sub-block j's 16 qs bytes at
// 8 + 16j laid out as IQ4_NL's): lane l takes sub-block l, scale d·(ls − 32) with ls from 4 bits
// of scales_l and 2 of scales_h (ggml's dequantize_row_iq4_xs). Super-blocks are 8-byte aligned
// when the row is: 8-byte loads.
template <>
struct KQuant<23> : BlockLane {
    static constexpr int TS = 136, NX = 1;
    struct Blk {
        uint2 hd, q0, q1;
    };
    __device__ explicit KQuant(int L) : BlockLane(L) {}
    __device__ Blk load(const u8* b) const {
        const uint2* p = reinterpret_cast<const uint2*>(b);
        return {__ldg(p), __ldg(p + 1 + 2 * l), __ldg(p + 2 + 2 * l)};
    }
    __device__ static void xsums(const float4 (&)[8], float (&sx)[NX]) { sx[0] = 0.f; }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&)[NX], float acc) const {
        const u32 qw[4] = {b.q0.x, b.q0.y, b.q1.x, b.q1.y};
        const int ls = ((b.hd.y >> (4 * l)) & 15) | (((b.hd.x >> (16 + 2 * l)) & 3) << 4);
        return fmaf(f16f(b.hd.x & 0xFFFFu) * (float)(ls - 32), iq4_dot32(qw, xv), acc);
    }
};

// Q8_0 (34-byte blocks: d, 32 int8 qs): eight blocks (272 bytes) to a step, lane l block l, its
// values in order, as Q4_0. A block starts on a word (l even) or half a word past one (l odd):
// nine aligned words from 34·l rounded down hold it, d at the low or high half of word 0 and the
// qs words straight (l odd) or by funnel shifts (l even). Each signed byte, its sign bit flipped,
// goes into the mantissa of 2^23 by one byte permute; one FADD leaves q exactly, so the sum is
// d·Σq·x (ggml's vec_dot_q8_0 up to the order of f32 roundings).
template <>
struct KQuant<8> : BlockLane {
    static constexpr int TS = 272, NX = 1;
    struct Blk {
        u32 w[9];
    };
    __device__ explicit KQuant(int L) : BlockLane(L) {}
    __device__ Blk load(const u8* sb) const {
        const u32* p = reinterpret_cast<const u32*>(sb + ((34 * l) & ~3));
        Blk r;
#pragma unroll
        for (int k = 0; k < 9; k++) r.w[k] = __ldg(p + k);
        return r;
    }
    __device__ static void xsums(const float4 (&)[8], float (&sx)[NX]) { sx[0] = 0.f; }
    __device__ float dot(const Blk& b, const float4 (&xv)[8], const float (&)[NX], float acc) const {
        const bool odd = l & 1;
        float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const u32 c = (odd ? b.w[k + 1] : __funnelshift_r(b.w[k], b.w[k + 1], 16)) ^ 0x80808080u;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float q = __uint_as_float(__byte_perm(c, 0x4B000000u, 0x7440u + i)) - 8388736.f;
                part[i] = fmaf(q, f4get(xv[k], i), part[i]);
            }
        }
        const float d = f16f(odd ? b.w[0] >> 16 : b.w[0] & 0xFFFFu);
        return fmaf(d, (part[0] + part[1]) + (part[2] + part[3]), acc);
    }
};

// x for one problem into shared memory in the lanes' order (slot_value); silu(gate)·up where the
// problem takes it. Slots past the row's end are zero.
template <int T, int LPR>
__device__ __forceinline__ void kq_stage_x(const GemvProblem& pr, float4* __restrict__ xs) {
    constexpr int SB = LPR / 8, SQ = 8 * LPR;
    const int nsb = pr.cols >> 8;
    const int slots = (nsb + SB - 1) / SB * SQ;
    for (int s = threadIdx.x; s < slots; s += blockDim.x) {
        const int st = s / SQ, r = s % SQ, f = r / LPR, l = r % LPR;
        const int v = (st * SB + (l >> 3)) * 256 + KQuant<T>::slot_value(f, l);
        float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
        if (v < pr.cols) {
            t = __ldg(reinterpret_cast<const float4*>(pr.x + v));
            if (pr.swiglu) {
                const float4 u = __ldg(reinterpret_cast<const float4*>(pr.x + pr.cols + v));
                t = make_float4(silu_(t.x) * u.x, silu_(t.y) * u.y, silu_(t.z) * u.z, silu_(t.w) * u.w);
            }
        }
        xs[s] = t;
    }
}

// The K-quant GEMV: warps take tiles of G·RW rows (G row groups of LPR lanes, RW rows each),
// a lane walks its row group's super-blocks LPR/8 at a time, U steps of loads in flight.
template <int T, int RW, int LPR>
__device__ __forceinline__ void kq_gemv(const GemvProblem& pr, const float4* __restrict__ xs) {
    using K = KQuant<T>;
    constexpr int G = 32 / LPR, SB = LPR / 8, SQ = 8 * LPR, U = 2;
    const int warps = blockDim.x >> 5;
    const int lane = threadIdx.x & 31, g = lane / LPR, L = lane % LPR;
    const K kq(L);
    const int nsb = pr.cols >> 8;
    const int nsteps = (nsb + SB - 1) / SB;
    const long long rb = (long long)nsb * K::TS;
    const long long ntiles = ((long long)pr.rows + RW * G - 1) / (RW * G);
    for (long long t = (long long)blockIdx.x * warps + (threadIdx.x >> 5); t < ntiles; t += (long long)gridDim.x * warps) {
        const long long row0 = t * (RW * G) + g * RW;
        const u8* rowp[RW];
        float acc[RW];
#pragma unroll
        for (int i = 0; i < RW; i++) {
            rowp[i] = pr.w + (row0 + i < pr.rows ? row0 + i : pr.rows - 1) * rb;
            acc[i] = 0.f;
        }
        for (int st0 = 0; st0 < nsteps; st0 += U) {
            // The loads of U steps and RW rows first, so that they are in flight together; a step
            // or lane past the row's end reads super-block 0 and adds nothing.
            typename K::Blk blk[U][RW];
            bool in[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int sb = (st0 + u) * SB + (L >> 3);
                in[u] = st0 + u < nsteps && sb < nsb;
#pragma unroll
                for (int i = 0; i < RW; i++) blk[u][i] = kq.load(rowp[i] + (long long)(in[u] ? sb : 0) * K::TS);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (!in[u]) continue;
                const float4* xp = xs + (st0 + u) * SQ + L;
                float4 xv[8];
#pragma unroll
                for (int f = 0; f < 8; f++) xv[f] = xp[f * LPR];
                float sx[K::NX];
                K::xsums(xv, sx);
#pragma unroll
                for (int i = 0; i < RW; i++) acc[i] = kq.dot(blk[u][i], xv, sx, acc[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < RW; i++) {
            float v = acc[i];
#pragma unroll
            for (int o = LPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (L == 0 && row0 + i < pr.rows) pr.y[row0 + i] = v;
        }
    }
}

template <int T, int RW, int LPR>
__device__ __forceinline__ void kq_stage_and_gemv(const GemvProblem& pr, float4* __restrict__ xs) {
    kq_stage_x<T, LPR>(pr, xs);
    __syncthreads();
    kq_gemv<T, RW, LPR>(pr, xs);
}

// The decode GEMV of one problem (the whole block takes the same one): the K-quants, Q4_0, Q8_0,
// IQ4_NL and IQ4_XS through kq_gemv where it applies, every type through ggml_gemv_problem
// otherwise (Q4_1, Q5_0, Q5_1 always).
template <int T, int RW>
__device__ __forceinline__ void ggml_gemv_block(const GemvProblem& pr) {
    if constexpr (T == 2 || T == 8 || T == 10 || T == 11 || T == 12 || T == 13 || T == 14 || T == 20 || T == 23) {
        __shared__ float4 kq_x[KQ_MAXC / 4];
        const int nsb = pr.cols >> 8;
        // The loads' alignment: Q4_K and Q5_K 16 bytes, IQ4_XS 8, Q4_0, IQ4_NL, Q8_0 and Q2_K 4 (a
        // whole row of them when cols is a multiple of 256), Q3_K 2 (every block is), Q6_K's
        // 16-bit loads none checked.
        constexpr u64 AL = T == 12 || T == 13 ? 15 : T == 23 ? 7 : T == 14 ? 0 : T == 11 ? 1 : 3;
        const bool aligned = (reinterpret_cast<u64>(pr.w) & AL) == 0;
        if (aligned && (pr.cols & 255) == 0 && (nsb + 3) / 4 * 1024 <= KQ_MAXC) {
            if (nsb >= 3) kq_stage_and_gemv<T, RW, 32>(pr, kq_x);
            else if (nsb == 2) kq_stage_and_gemv<T, RW, 16>(pr, kq_x);
            else kq_stage_and_gemv<T, RW, 8>(pr, kq_x);
            return;
        }
    }
    ggml_gemv_problem<T, RW>(pr);
}

__device__ __forceinline__ bool expert_problem(const ExpertsArgs& a, GemvProblem& pr) {
    const int j = blockIdx.y / a.nmat, which = blockIdx.y % a.nmat;
    if (j == a.k) {
        pr = a.shared[which];
        return true;
    }
    const u64 base = a.table[a.ids[j]];
    if (base == 0) return false;
    const MatOff& m = a.mat[which];
    pr.w = reinterpret_cast<const u8*>(base + m.w);
    pr.s = nullptr;
    pr.b = nullptr;
    pr.x = a.x + j * a.x_stride;
    pr.y = a.y + j * a.y_stride + which * a.mat[0].rows;
    pr.rows = m.rows;
    pr.cols = m.cols;
    pr.swiglu = a.swiglu;
    return true;
}

// ---------------------------------------------------------------------------------------------
// Prefill: the grouped GEMM of forward.cu (work items of ≤ TT inputs of one expert, or tiles of a
// plain matrix when items is null), each unit decoded once for the item's inputs.
#define TT 8
struct GemmMat {
    u64 w, s, b;
    int rows, cols;
};

template <int T>
__device__ __forceinline__ void ggml_gemm_grouped(const u64* __restrict__ table, GemmMat m,
                                                  const int4* __restrict__ items, const int* __restrict__ xrow,
                                                  const float* __restrict__ x, float* __restrict__ out, int ntok) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= m.rows) return;
    int4 it;
    if (items) {
        it = items[blockIdx.y];
    } else {
        const int t0 = blockIdx.y * TT;
        it = make_int4(0, t0, min(TT, ntok - t0), 0);
    }
    const u64 base = table ? table[it.x] : 0ull;
    const float* xs[TT];
#pragma unroll
    for (int tt = 0; tt < TT; tt++) {
        const int p = it.y + (tt < it.z ? tt : 0);
        xs[tt] = x + (long long)(xrow ? xrow[p] : p) * m.cols;
    }
    const int lane = threadIdx.x & 31;
    const u8* wr = reinterpret_cast<const u8*>(base + m.w) + row * row_bytes<T>(m.cols);
    float acc[TT];
#pragma unroll
    for (int i = 0; i < TT; i++) acc[i] = 0.f;
    for (int v = 4 * lane; v < m.cols; v += 128) {
        float w[4];
        quad_values<T>(wr, v >> 5, (v >> 2) & 7, w);
#pragma unroll
        for (int tt = 0; tt < TT; tt++) {
            if (tt < it.z) {
                const float4 xv = __ldg(reinterpret_cast<const float4*>(xs[tt] + v));
                float a = acc[tt];
                a = fmaf(w[0], xv.x, a);
                a = fmaf(w[1], xv.y, a);
                a = fmaf(w[2], xv.z, a);
                a = fmaf(w[3], xv.w, a);
                acc[tt] = a;
            }
        }
    }
    float* y = out + (long long)it.y * m.rows;
#pragma unroll
    for (int tt = 0; tt < TT; tt++) {
        const float v = warp_sum(acc[tt]);
        if (lane == 0 && tt < it.z) y[(long long)tt * m.rows + row] = v;
    }
}

// Rows of a matrix as f32: out[i] = row (ids ? ids[i] : row0 + i), i < nrows. One thread per
// four values. The cuBLAS prefill GEMM dequantizes tiles of rows with it; the embedding looks up tokens.
template <int T>
__device__ __forceinline__ void ggml_rows(const u8* __restrict__ w, const int* __restrict__ ids, long long row0,
                                          long long nrows, int cols, float* __restrict__ out) {
    const int nq = cols / 4;
    const long long rb = row_bytes<T>(cols);
    const long long n = nrows * nq;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x) {
        const long long i = j / nq;
        const int v = 4 * (int)(j % nq);
        const long long r = ids ? (long long)ids[i] : row0 + i;
        float q[4];
        quad_values<T>(w + r * rb, v >> 5, (v >> 2) & 7, q);
        reinterpret_cast<float4*>(out + i * cols + v)[0] = make_float4(q[0], q[1], q[2], q[3]);
    }
}

// Rows per warp of the expert GEMV (the batched GEMV comes with 1, 2 and 4; the launch divides
// the rows by it).
#define GGML_RW 2
#define GGML_KERNELS(NAME, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) ggml_batch_r1_##NAME(GemvBatch batch) { pdl_prologue();                 \
        ggml_gemv_block<T, 1>(batch.p[blockIdx.y]);                                                         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) ggml_batch_r2_##NAME(GemvBatch batch) { pdl_prologue();                 \
        ggml_gemv_block<T, 2>(batch.p[blockIdx.y]);                                                         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) ggml_batch_r4_##NAME(GemvBatch batch) { pdl_prologue();                 \
        ggml_gemv_block<T, 4>(batch.p[blockIdx.y]);                                                         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) ggml_experts_##NAME(ExpertsArgs a) { pdl_prologue();                    \
        GemvProblem pr;                                                                                        \
        if (expert_problem(a, pr)) ggml_gemv_block<T, GGML_RW>(pr);                                          \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        ggml_grouped_##NAME(const u64* __restrict__ table, GemmMat m, int gs, const int4* __restrict__ items,  \
                            const int* __restrict__ xrow, const float* __restrict__ x, float* __restrict__ out, \
                            int ntok) { pdl_prologue();                                                                        \
        ggml_gemm_grouped<T>(table, m, items, xrow, x, out, ntok);                                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) ggml_rows_##NAME(                                        \
        const u8* __restrict__ w, const int* __restrict__ ids, long long row0, long long nrows, int cols,      \
        float* __restrict__ out) { pdl_prologue();                                                                             \
        ggml_rows<T>(w, ids, row0, nrows, cols, out);                                                          \
    }
GGML_KERNELS(q4_0, 2)
GGML_KERNELS(q4_1, 3)
GGML_KERNELS(q5_0, 6)
GGML_KERNELS(q5_1, 7)
GGML_KERNELS(q8_0, 8)
GGML_KERNELS(q2_k, 10)
GGML_KERNELS(q3_k, 11)
GGML_KERNELS(q4_k, 12)
GGML_KERNELS(q5_k, 13)
GGML_KERNELS(q6_k, 14)
GGML_KERNELS(iq4_nl, 20)
GGML_KERNELS(iq4_xs, 23)
