// out [m, n] = x [m, k] · Wᵀ (+ bias) on tensor cores, for prefill-sized m: 128×128 output
// tiles, 256 threads (8 warps as 2×4, each a 64×32 sub-tile of m16n8k16 mma.sync), k in steps
// of 64 through shared memory. Operands are f16 with f32 accumulation: x is rounded from f32
// and the weight tile is dequantized by its layout (layouts.cuh `tile`, two units per row) and
// rounded, so every layout shares the mma loop. f16 rather than bf16: 3 more mantissa bits
// (unit roundoff 2^−11); activations past ±65504 would overflow, which post-norm inputs of the
// supported models do not reach. The next k step's global loads and dequantization are issued
// before the current step's mma so they overlap; two blocks per SM hide the rest.
// Needs k % 4 == 0 and x 16-byte aligned (float4 loads). Launch: 256 threads,
// grid (ceil(n/128), ceil(m/128)).

#define TC_BM 128
#define TC_BN 128
#define TC_BK 64
#define TC_LD (TC_BK + 8)  // row stride in halves: 144 bytes keeps ldmatrix conflict-free

// This thread's share of the x tile at k0: rows (tid/16) + 16·i, columns 4·(tid%16)..+3,
// as f16 pairs; zero past m and k.
__device__ __forceinline__ void load_x(const float* __restrict__ x, int m, int k, int m0, int k0,
                                       u32* xr) {
    const int c = k0 + 4 * (threadIdx.x & 15);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = m0 + (threadIdx.x >> 4) + 16 * i;
        float4 v = {0.f, 0.f, 0.f, 0.f};
        if (row < m && c < k) v = *(const float4*)(x + (i64)row * k + c);
        xr[2 * i] = pack_f16x2(v.x, v.y);
        xr[2 * i + 1] = pack_f16x2(v.z, v.w);
    }
}

// This thread's share of the weight tile at k0: unit tid%2 of row tid/2 (columns past n stage
// row n−1, whose outputs are never stored; units past k are zero).
template <class L>
__device__ __forceinline__ void load_w(const L& l, int n, int n0, int k0, u32* wr) {
    const int row = min(n0 + (int)(threadIdx.x >> 1), n - 1);
    const int kk = k0 + 32 * (threadIdx.x & 1);
    float w[32];
    l.tile(row, min(kk, ((l.k - 1) / 32) * 32), w);
    const bool live = kk < l.k;
#pragma unroll
    for (int e = 0; e < 16; ++e) wr[e] = live ? pack_f16x2(w[2 * e], w[2 * e + 1]) : 0u;
}

template <class L>
__device__ __forceinline__ void matmul_tc(const L& l, const float* __restrict__ x,
                                          const void* __restrict__ bias, int bias_type,
                                          float* __restrict__ out, int m, int n) {
    __shared__ __align__(16) u16 xs[TC_BM][TC_LD];
    __shared__ __align__(16) u16 ws[TC_BN][TC_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    const int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
    const int k = l.k;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    u32 xr[16], wr[16];
    load_x(x, m, k, m0, 0, xr);
    load_w(l, n, n0, 0, wr);
    for (int k0 = 0; k0 < k; k0 += TC_BK) {
        __syncthreads();  // the previous step's readers are done with the tiles
#pragma unroll
        for (int i = 0; i < 8; ++i)
            *(uint2*)&xs[(tid >> 4) + 16 * i][4 * (tid & 15)] = uint2{xr[2 * i], xr[2 * i + 1]};
#pragma unroll
        for (int i = 0; i < 4; ++i)
            *(uint4*)&ws[tid >> 1][32 * (tid & 1) + 8 * i] =
                uint4{wr[4 * i], wr[4 * i + 1], wr[4 * i + 2], wr[4 * i + 3]};
        __syncthreads();
        if (k0 + TC_BK < k) {
            load_x(x, m, k, m0, k0 + TC_BK, xr);
            load_w(l, n, n0, k0 + TC_BK, wr);
        }
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            u32 a[4][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                ldmatrix_x4(a[i], &xs[wm + 16 * i + (lane & 15)][kk + 8 * (lane >> 4)]);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                u32 r[4];
                ldmatrix_x4(r, &ws[wn + 16 * j + (lane & 7) + 8 * (lane >> 4)]
                                  [kk + 8 * ((lane >> 3) & 1)]);
                b[2 * j][0] = r[0]; b[2 * j][1] = r[1];
                b[2 * j + 1][0] = r[2]; b[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_f16(acc[i][j], a[i], b[j]);
        }
    }

    // Accumulator fragment: rows lane/4 and lane/4 + 8, columns 2·(lane%4) and +1.
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm + 16 * i + (lane >> 2) + 8 * (e >> 1);
                const int col = n0 + wn + 8 * j + 2 * (lane & 3) + (e & 1);
                if (row < m && col < n)
                    out[(i64)row * n + col] =
                        bias ? acc[i][j][e] + load_float(bias, col, bias_type) : acc[i][j][e];
            }
}

#define MATMUL_TC_MLX(BITS)                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2)                                       \
        matmul_tc_mlx##BITS(const float* x, const u32* w, const void* scales,                  \
                            const void* biases, int scale_type, const void* bias,              \
                            int bias_type, float* out, int m, int n, int k, int group_shift) { \
        kernel_entry();                                                                        \
        const MlxAffine<BITS> l{w, scales, biases, scale_type, k, group_shift};                \
        matmul_tc(l, x, bias, bias_type, out, m, n);                                           \
    }
MATMUL_TC_MLX(2)
MATMUL_TC_MLX(3)
MATMUL_TC_MLX(4)
MATMUL_TC_MLX(5)
MATMUL_TC_MLX(6)
MATMUL_TC_MLX(8)

#define MATMUL_TC_GGML(TYPE, NAME)                                                             \
    extern "C" __global__ void __launch_bounds__(256, 2)                                       \
        matmul_tc_##NAME(const float* x, const u8* w, const void* bias, int bias_type,         \
                         float* out, int m, int n, int k) {                                    \
        kernel_entry();                                                                        \
        const TYPE l{w, k};                                                                    \
        matmul_tc(l, x, bias, bias_type, out, m, n);                                           \
    }
MATMUL_TC_GGML(Q4_0, q4_0)
MATMUL_TC_GGML(Q4_1, q4_1)
MATMUL_TC_GGML(Q8_0, q8_0)
MATMUL_TC_GGML(Q4_K, q4_k)
MATMUL_TC_GGML(Q6_K, q6_k)

extern "C" __global__ void __launch_bounds__(256, 2)
    matmul_tc_dense(const float* x, const void* w, int weight_type, const void* bias,
                    int bias_type, float* out, int m, int n, int k) {
    kernel_entry();
    const Dense l{w, weight_type, k};
    matmul_tc(l, x, bias, bias_type, out, m, n);
}

// ---------------------------------------------------------------------------------------------
// MLX affine 4- and 8-bit weights, the bulk of prefill. The same 128×128 tiles and warp layout,
// but nothing is dequantized into shared memory and every load is asynchronous:
// - x arrives as f16 (`stage_x_f16`, one pass before the matmul), so its tile is a plain
//   cp.async copy;
// - the raw weight words and each row's scale/bias word of the step are cp.async copies too,
//   into a ring of TCQ_STAGES steps, so global loads run TCQ_STAGES − 1 steps ahead of the mma;
// - each thread dequantizes exactly the weights of its own mma B fragments from the raw words,
//   in f16x2 arithmetic: OR-ing a 4-bit field at bit 0 (or 4) of each half into the f16 1024
//   (0x6400) gives 1024 + q (1024 + 16q), one subtraction (one FMA with 1/16, −64) gives q
//   exactly, one FMA gives s·q + b rounded once, as the f32 path rounds it. 8-bit fields are
//   moved next to 0x64 bytes with one byte permute.
// A B fragment pairs columns (2t, 2t+1) and (2t+8, 2t+9) of a 16-column chunk; the fields one
// word yields in pairs are (e, e+4) for 4 bits and (e, e+2) for 8 bits. So the columns of each
// 64-column step are permuted (`tcq_column`) to make every pair a fragment register, and x is
// staged in that order: the dot product does not depend on the order of k.

#define TCQ_STAGES 3
#define TCQ_SB_LD (TC_BN + 8)  // u32 words per (scale or bias, unit) row of scale windows

// The x column (0..63, within its step) at position p of the staged step.
__device__ __forceinline__ int tcq_column(int p, int bits) {
    const int c = p >> 4, t = (p >> 1) & 3, j = p & 1, h = (p >> 3) & 1;
    return bits == 4 ? 16 * t + 8 * (c >> 1) + 2 * (c & 1) + h + 4 * j
                     : 16 * t + 4 * c + 2 * j + h;
}

// xh [m, kp] (kp = k rounded up to 64) = x [m, k] as f16, each 64-column step permuted for
// `bits`, zero past k. Launch: 256 threads, one 16-byte group of 8 outputs each.
extern "C" __global__ void stage_x_f16(const float* __restrict__ x, u16* __restrict__ xh, int m,
                                       int k, int kp, int bits) {
    kernel_entry();
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const int per_row = kp / 8;
    if (i >= (i64)m * per_row) return;
    const i64 row = i / per_row;
    const int p = (int)(i - row * per_row) * 8, step = p & ~63;
    const float* xr = x + row * k;
    u32 h[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int c0 = step + tcq_column((p & 63) + 2 * e, bits);
        const int c1 = step + tcq_column((p & 63) + 2 * e + 1, bits);
        h[e] = pack_f16x2(c0 < k ? xr[c0] : 0.f, c1 < k ? xr[c1] : 0.f);
    }
    *(uint4*)(xh + row * kp + p) = uint4{h[0], h[1], h[2], h[3]};
}

// One step's share of shared memory: the x tile, the raw words (8·BITS bytes a row) and, per
// (scale or bias, 32-column unit, row), the aligned 4-byte word holding that value.
template <int BITS>
struct TcqStage {
    u16 x[TC_BM][TC_LD];
    u32 w[TC_BN][2 * BITS];
    u32 sb[2][2][TCQ_SB_LD];
};

// Issues the copies of the step at k0 into `s`. Rows past m or n repeat the last row (their
// outputs are never stored); units past k are zero-filled, so x and weights both read 0 there.
template <int BITS>
__device__ __forceinline__ void tcq_load(TcqStage<BITS>& s, const u16* __restrict__ xh,
                                         const u32* __restrict__ w, const u8* scales,
                                         const u8* biases, int st, int m, int n, int k, int kp,
                                         int gshift, int m0, int n0, int k0) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int id = tid + 256 * i, r = id >> 3, c = 8 * (id & 7);
        const int row = min(m0 + r, m - 1);
        cp_async16(&s.x[r][c], xh + (i64)row * kp + k0 + c, true);
    }
    // 16-byte chunk q of a row's step holds 128/BITS columns, from unit q·4/BITS.
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
        const int id = tid + 256 * i, r = id / (BITS / 2), q = id % (BITS / 2);
        const int row = min(n0 + r, n - 1);
        const bool live = k0 + 32 * (q * 4 / BITS) < k;
        const u32* src = w + (i64)row * (k / 32) * BITS + (live ? k0 / 32 * BITS + 4 * q : 0);
        cp_async16(&s.w[r][4 * q], src, live);
    }
    const int esize = st == FT_F32 ? 4 : 2, groups = (k >> 5) >> gshift;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int id = tid + 256 * i, r = id & 127, unit = (id >> 7) & 1, which = id >> 8;
        const int row = min(n0 + r, n - 1), col = k0 + 32 * unit;
        const bool live = col < k;
        const i64 g = (i64)row * groups + (live ? col >> (5 + gshift) : 0);
        const u64 at = (u64)(which ? biases : scales) + g * esize;
        cp_async4(&s.sb[which][unit][r], (const void*)(at & ~(u64)3), live);
    }
}

// The value of group g held in `window` (its aligned 4-byte word), as an f16 pair.
__device__ __forceinline__ u32 tcq_pair(u32 window, const u8* base, i64 g, int st) {
    float v;
    if (st == FT_F32) {
        v = __uint_as_float(window);
    } else {
        const u16 h = (((u64)base >> 1) + g) & 1 ? (u16)(window >> 16) : (u16)window;
        v = st == FT_F16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
    return pack_f16x2(v, v);
}

// The B fragment registers of chunk c (16 columns) for one n row from its raw step words.
template <int BITS>
__device__ __forceinline__ void tcq_fragment(const u32* words, int t, int c, u32 s2, u32 b2,
                                             u32* b) {
    if constexpr (BITS == 4) {
        // Word 2t + c/2 of the step; chunk c takes fields (2(c%2), +4) and (2(c%2)+1, +4).
        const u32 v = words[2 * t + (c >> 1)] >> (8 * (c & 1));
        const u32 lo = (v & 0x000f000fu) | 0x64006400u;  // 1024 + q
        const u32 hi = (v & 0x00f000f0u) | 0x64006400u;  // 1024 + 16q
        b[0] = fma_f16x2(sub_f16x2(lo, 0x64006400u), s2, b2);
        b[1] = fma_f16x2(fma_f16x2(hi, 0x2c002c00u, 0xd400d400u), s2, b2);  // ·1/16 − 64
    } else {
        // Word 4t + c; fields (0, 2) and (1, 3) next to 0x64 bytes.
        const u32 v = words[4 * t + c];
        b[0] = fma_f16x2(sub_f16x2(__byte_perm(v, 0x64646464u, 0x4240), 0x64006400u), s2, b2);
        b[1] = fma_f16x2(sub_f16x2(__byte_perm(v, 0x64646464u, 0x4341), 0x64006400u), s2, b2);
    }
}

// Launch: 256 threads, grid (ceil(n/128), ceil(m/128)), TCQ_STAGES·sizeof(TcqStage<BITS>)
// bytes of dynamic shared memory. Needs w 16-byte aligned and xh from `stage_x_f16`.
template <int BITS>
__device__ __forceinline__ void matmul_tcq(const u16* __restrict__ xh, const u32* __restrict__ w,
                                           const u8* scales, const u8* biases, int st,
                                           const void* __restrict__ bias, int bias_type,
                                           float* __restrict__ out, int m, int n, int k,
                                           int gshift) {
    extern __shared__ __align__(16) u8 tcq_smem[];
    TcqStage<BITS>* stages = (TcqStage<BITS>*)tcq_smem;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    const int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
    const int kp = (k + TC_BK - 1) / TC_BK * TC_BK, steps = kp / TC_BK;
    const int groups = (k >> 5) >> gshift;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
    for (int s = 0; s < TCQ_STAGES - 1; ++s) {
        if (s < steps)
            tcq_load(stages[s], xh, w, scales, biases, st, m, n, k, kp, gshift, m0, n0,
                     s * TC_BK);
        cp_async_commit();
    }
    for (int step = 0; step < steps; ++step) {
        cp_async_wait<TCQ_STAGES - 2>();
        __syncthreads();  // the step's copies are visible; the slot refilled below is free
        {
            const int next = step + TCQ_STAGES - 1;
            if (next < steps)
                tcq_load(stages[next % TCQ_STAGES], xh, w, scales, biases, st, m, n, k, kp,
                         gshift, m0, n0, next * TC_BK);
            cp_async_commit();
        }
        const TcqStage<BITS>& s = stages[step % TCQ_STAGES];
        const int k0 = step * TC_BK, unit = t >> 1;  // this thread's fields lie in one unit
        u32 s2[4], b2[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = wn + 8 * j + g;
            const i64 gi = (i64)min(n0 + r, n - 1) * groups + ((k0 + 32 * unit) >> (5 + gshift));
            s2[j] = tcq_pair(s.sb[0][unit][r], scales, gi, st);
            b2[j] = tcq_pair(s.sb[1][unit][r], biases, gi, st);
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            u32 b[4][2];
#pragma unroll
            for (int j = 0; j < 4; ++j)
                tcq_fragment<BITS>(s.w[wn + 8 * j + g], t, c, s2[j], b2[j], b[j]);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                u32 a[4];
                ldmatrix_x4(a, &s.x[wm + 16 * i + (lane & 15)][16 * c + 8 * (lane >> 4)]);
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_f16(acc[i][j], a, b[j]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm + 16 * i + g + 8 * (e >> 1);
                const int col = n0 + wn + 8 * j + 2 * t + (e & 1);
                if (row < m && col < n)
                    out[(i64)row * n + col] =
                        bias ? acc[i][j][e] + load_float(bias, col, bias_type) : acc[i][j][e];
            }
}

#define MATMUL_TCQ_MLX(BITS)                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 2)                                      \
        matmul_tcq_mlx##BITS(const u16* xh, const u32* w, const void* scales,                 \
                             const void* biases, int scale_type, const void* bias,            \
                             int bias_type, float* out, int m, int n, int k, int group_shift) { \
        kernel_entry();                                                                       \
        matmul_tcq<BITS>(xh, w, (const u8*)scales, (const u8*)biases, scale_type, bias,       \
                         bias_type, out, m, n, k, group_shift);                               \
    }
MATMUL_TCQ_MLX(4)
MATMUL_TCQ_MLX(8)
