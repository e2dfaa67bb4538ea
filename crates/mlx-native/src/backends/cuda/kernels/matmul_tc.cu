// out [m, n] = x [m, k] · Wᵀ (+ bias) on the generic tensor-core tiles of tiles_tc.cuh (every
// layout), for prefill-sized m: block (x, y) takes output columns 128x.., rows 128y..; grid z
// splits k (`split_steps`). Needs k % 4 == 0 and x 16-byte aligned (float4 loads). Launch: 256
// threads, grid (ceil(n/128), ceil(m/128), k splits).

// Split-K (grid z > 1, where the output tiles fill too few SMs: short prompts): block z takes
// steps [begin, end) of the k loop (`split_steps`, common.cuh) and stores its partial tile,
// without the bias, as slice z of `out` [gridDim.z][m][n]; `splitk_sum` adds the slices in order.

// Stores a block's 128×128 tile (+ bias), inside m and n.
__device__ __forceinline__ void store_tile(const float (&acc)[4][4][4],
                                           const void* __restrict__ bias, int bias_type,
                                           float* __restrict__ out, int m, int n) {
    const int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
    tc_outputs<TC_BM>(acc, [&](int r, int c, float v) {
        const int row = m0 + r, col = n0 + c;
        if (row < m && col < n)
            out[(i64)row * n + col] = bias ? v + load_float(bias, col, bias_type) : v;
    });
}

// store_tile, or with split-K the block's slice of the partials (no bias).
__device__ __forceinline__ void store_tile_split(const float (&acc)[4][4][4],
                                                 const void* __restrict__ bias, int bias_type,
                                                 float* __restrict__ out, int m, int n) {
    if (gridDim.z > 1)
        store_tile(acc, nullptr, 0, out + (i64)blockIdx.z * m * n, m, n);
    else
        store_tile(acc, bias, bias_type, out, m, n);
}

template <class L>
__device__ __forceinline__ void matmul_tc(const L& l, const float* __restrict__ x,
                                          const void* __restrict__ bias, int bias_type,
                                          float* __restrict__ out, int m, int n) {
    const int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
    int begin, end;  // this block's steps of k
    split_steps((l.k + TC_BK - 1) / TC_BK, begin, end);
    float acc[4][4][4];
    tc_accumulate<TC_BM>(
        x, [=](int r) { return min(m0 + r, m - 1); },
        [=](int r, int k0, float* w) { l.tile(min(n0 + r, n - 1), k0, w); }, l.k, begin, end,
        acc);
    store_tile_split(acc, bias, bias_type, out, m, n);
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
MATMUL_TC_GGML(Q5_0, q5_0)
MATMUL_TC_GGML(Q5_1, q5_1)
MATMUL_TC_GGML(Q8_0, q8_0)
MATMUL_TC_GGML(Q4_K, q4_k)
MATMUL_TC_GGML(Q5_K, q5_k)
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
//   into a ring of Tcq<BITS>::STAGES steps, so global loads run that many steps less one
//   ahead of the mma;
// - each thread dequantizes exactly the weights of its own mma B fragments from the raw words,
//   in f16x2 arithmetic: OR-ing a 4-bit field at bit 0 (or 4) of each half into the f16 1024
//   (0x6400, one lop3: `and_or`) gives 1024 + q (1024 + 16q), one subtraction (one FMA with
//   1/16, −64) gives q exactly, one FMA gives s·q + b rounded once, as the f32 path rounds it.
//   8-bit fields are moved next to 0x64 bytes with one byte permute.
// A B fragment pairs columns (2t, 2t+1) and (2t+8, 2t+9) of a 16-column chunk; the fields one
// word yields in pairs are (e, e+4) for 4 bits and (e, e+2) for 8 bits. So the columns of each
// 64-column step are permuted (`tcq_column`) to make every pair a fragment register, and x is
// staged in that order: the dot product does not depend on the order of k.

#define TCQ_SB_LD (TC_BN + 8)  // u32 words per (scale or bias, unit) row of scale windows

// Orders of the staged x (`order` of stage_x_f16), one per way the fragments take fields:
// nibbles of MLX 4-bit words, bytes (MLX 8-bit, Q8_0), nibbles of Q4_0 blocks, nibbles of a
// Q4_K sub-block pair; and x as it lies (cuBLAS, `dequant_f16_*` below).
#define TCQ_MLX4 0
#define TCQ_BYTES 1
#define TCQ_Q4_0 2
#define TCQ_Q4K 3
#define TCQ_NATURAL 4

// The x column (0..63, within its step) at position p of the staged step.
__device__ __forceinline__ int tcq_column(int p, int order) {
    const int c = p >> 4, t = (p >> 1) & 3, j = p & 1, h = (p >> 3) & 1;
    switch (order) {
        case TCQ_MLX4: return 16 * t + 8 * (c >> 1) + 2 * (c & 1) + h + 4 * j;
        case TCQ_BYTES: return 16 * t + 4 * c + 2 * j + h;
        case TCQ_Q4K: return 8 * t + 4 * (c >> 1) + (c & 1) + 2 * j + 32 * h;
        case TCQ_NATURAL: return p;
        default: return 32 * (t >> 1) + 8 * (t & 1) + 4 * (c >> 1) + (c & 1) + 2 * j + 16 * h;
    }
}

// xh [m, kp] (kp = k rounded up to 64) = x [m, k] (f32, or f16 where `xt` says so) as f16,
// each 64-column step permuted in `order`, zero past k. Launch: 256 threads, one 16-byte group
// of 8 outputs each.
extern "C" __global__ void stage_x_f16(const void* __restrict__ x, u16* __restrict__ xh, int m,
                                       int k, int kp, int order, int xt) {
    kernel_entry();
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const int per_row = kp / 8;
    if (i >= (i64)m * per_row) return;
    const i64 row = i / per_row;
    const int p = (int)(i - row * per_row) * 8, step = p & ~63;
    const i64 xr = row * k;
    u32 h[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int c0 = step + tcq_column((p & 63) + 2 * e, order);
        const int c1 = step + tcq_column((p & 63) + 2 * e + 1, order);
        h[e] = pack_f16x2(c0 < k ? load_float(x, xr + c0, xt) : 0.f,
                          c1 < k ? load_float(x, xr + c1, xt) : 0.f);
    }
    *(uint4*)(xh + row * kp + p) = uint4{h[0], h[1], h[2], h[3]};
}

// One step's slot of the shared-memory ring, as byte offsets: the x tile (TC_BM rows of TC_LD
// halves), the raw words (8·BITS bytes a row) and, per (scale or bias, 32-column unit, row),
// the aligned 4-byte word holding that value. 4-bit steps keep 4 slots in flight, 8-bit 3
// (two blocks per SM fit either).
template <int BITS>
struct Tcq {
    static constexpr int STAGES = BITS == 4 ? 4 : 3;
    static constexpr u32 W = TC_BM * TC_LD * 2;
    static constexpr u32 SB = W + TC_BN * 8 * BITS;
    static constexpr u32 BYTES = SB + 2 * 2 * TCQ_SB_LD * 4;
};

// Element offsets in xh of this thread's 4 x chunks at k0 = 0: rows tid/8 + 32i (the last row
// past m), columns 8·(tid%8).
__device__ __forceinline__ void tcq_x_offsets(int m, int m0, int kp, u32* xoff) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
        xoff[i] = (u32)min(m0 + (int)(threadIdx.x >> 3) + 32 * i, m - 1) * kp +
                  8 * (threadIdx.x & 7);
}

// Issues this thread's copies of the x tile at k0 (offsets from `tcq_x_offsets`) into the slot
// at shared address `slot`, which begins with the tile.
__device__ __forceinline__ void tcq_load_x(u32 slot, const u16* __restrict__ xh, const u32* xoff,
                                           int k0) {
    const int tid = threadIdx.x;
    const u32 xdst = slot + ((tid >> 3) * TC_LD + 8 * (tid & 7)) * 2;
#pragma unroll
    for (int i = 0; i < 4; ++i) cp_async16(xdst + i * 32 * TC_LD * 2, xh + xoff[i] + k0, true);
}

// A scale or bias from its aligned 4-byte word (`high`: the value is its upper half) as an
// f16 pair.
__device__ __forceinline__ u32 tcq_pair(u32 window, bool high, int st) {
    if (st == FT_F32) {
        const float v = __uint_as_float(window);
        return pack_f16x2(v, v);
    }
    const u32 h = high ? window >> 16 : window & 0xffffu;
    if (st == FT_F16) return h * 0x10001u;
    const float v = bf16_to_f32((u16)h);
    return pack_f16x2(v, v);
}

// The B fragment registers of a 16-column chunk for one n row from the raw word holding its
// fields: for 4 bits, word c/2 of this thread's two (2t, 2t+1 of the row) moved down by
// 8·(c%2), whose fields (0, 4) and (1, 5) it takes; for 8 bits, word c of its four (4t..4t+3),
// fields (0, 2) and (1, 3).
template <int BITS>
__device__ __forceinline__ void tcq_fragment(u32 v, u32 s2, u32 b2, u32* b) {
    if constexpr (BITS == 4) {
        const u32 lo = and_or(v, 0x000f000fu, 0x64006400u);  // 1024 + q
        const u32 hi = and_or(v, 0x00f000f0u, 0x64006400u);  // 1024 + 16q
        b[0] = fma_f16x2(sub_f16x2(lo, 0x64006400u), s2, b2);
        b[1] = fma_f16x2(fma_f16x2(hi, 0x2c002c00u, 0xd400d400u), s2, b2);  // ·1/16 − 64
    } else {
        b[0] = fma_f16x2(sub_f16x2(__byte_perm(v, 0x64646464u, 0x4240), 0x64006400u), s2, b2);
        b[1] = fma_f16x2(sub_f16x2(__byte_perm(v, 0x64646464u, 0x4341), 0x64006400u), s2, b2);
    }
}

// This thread's place in a staged-f16 kernel's 128×128 output tile: lane (g, t) of the warp at
// (wm, wn) of the block's tile at (m0, n0).
struct TcqThread {
    int lane, g, t, wm, wn, m0, n0;
    __device__ __forceinline__ TcqThread()
        : lane(threadIdx.x & 31), g(lane >> 2), t(lane & 3), wm((threadIdx.x >> 7) * 64),
          wn(((threadIdx.x >> 5) & 3) * 32), m0(blockIdx.y * TC_BM), n0(blockIdx.x * TC_BN) {}
    // The tile row (0 … 127) of this thread's B fragments for n8 block j.
    __device__ __forceinline__ int row(int j) const { return wn + 8 * j + g; }
};

// What the ggml layouts on the ring (TcqGgml, TcqK, TcqQ6K) copy from: the weight, its bytes a
// row, its rows, and this thread's place; a slot's weight bytes start at W, after the x tile.
struct TcqRows {
    static constexpr u32 W = TC_BM * TC_LD * 2;
    const u8* w;
    i64 row_bytes;
    int n;
    TcqThread at;
    // Where tile row r starts in w (rows past n repeat row n − 1, whose outputs are never
    // stored).
    __device__ __forceinline__ i64 row_at(int r) const {
        return (i64)min(at.n0 + r, n - 1) * row_bytes;
    }
};

// This thread's share of a step's TC_BN·PIECES weight copies: `copy(r, q, id)` for piece q of
// tile row r, id = r·PIECES + q (256 threads).
template <int PIECES, class Copy>
__device__ __forceinline__ void tcq_row_copies(Copy copy) {
    constexpr int TOTAL = TC_BN * PIECES;
#pragma unroll
    for (int i = 0; i < (TOTAL + 255) / 256; ++i) {
        const int id = threadIdx.x + 256 * i;
        if (id < TOTAL) {
            const int r = id / PIECES;
            copy(r, id - PIECES * r, id);
        }
    }
}

// The short kernels' outputs: acc[i][j][2h + e] is x row 16i + g + 8h, weight row n0 + wn + 8j +
// 2t + e, for RF fragments of 16 rows; the second warp half's sums (wm = 64) are added to the
// first's through shared memory, which stores them (inside m and n; split: slice z, no bias).
template <int RF>
__device__ __forceinline__ void store_rows(const float (*acc)[4][4], const TcqThread& at,
                                           const void* __restrict__ bias, int bias_type,
                                           float* __restrict__ out, int m, int n) {
    __shared__ float upper[4][32][16 * RF];
    const int group = at.wn / 32;
    if (at.wm) {
#pragma unroll
        for (int i = 0; i < RF; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) upper[group][at.lane][16 * i + 4 * j + e] = acc[i][j][e];
    }
    __syncthreads();
    if (at.wm) return;
    const bool split = gridDim.z > 1;
    float* dst = out + (split ? (i64)blockIdx.z * m * n : 0);
#pragma unroll
    for (int i = 0; i < RF; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int x_row = 16 * i + at.g + 8 * (e >> 1);
                const int row = at.n0 + at.wn + 8 * j + 2 * at.t + (e & 1);
                if (x_row >= m || row >= n) continue;
                const float v = acc[i][j][e] + upper[group][at.lane][16 * i + 4 * j + e];
                dst[(i64)x_row * n + row] =
                    !split && bias ? v + load_float(bias, row, bias_type) : v;
            }
}

// The k loop of the staged-f16 kernels: a cp.async ring of L::STAGES slots of L::BYTES, each an
// x tile (128 rows × TC_LD halves) and then the layout's bytes of a 64-column step, and the
// tile's store. The layout L = layout(at) issues a step's weight copies (`load`), reads a slot's
// values for the step once (`prepare`) and makes the B fragments of 16-column chunk c of it
// (`fragments`). Launch: 256 threads, grid (ceil(n/128), ceil(m/128), k splits),
// L::STAGES·L::BYTES bytes of dynamic shared memory; xh from `stage_x_f16` with rows of kp (k
// rounded up to the step), in the layout's order, and m·kp < 2^32.
// SHORT (`matmul_tcq16_*`, 2–16 rows of x): no x tile; the two warp halves take chunks 0–1 and
// 2–3 of each step, their A fragments (x rows g and g + 8, rows past m repeating m − 1) read
// from the staged x through L1, and the halves' sums meet in shared memory at the end. Grid
// (ceil(n/128), 1, k splits).
template <bool SHORT = false, class Layout>
__device__ __forceinline__ void tcq_ring(Layout layout, const u16* __restrict__ xh,
                                         const void* __restrict__ bias, int bias_type,
                                         float* __restrict__ out, int m, int n, int kp) {
    extern __shared__ __align__(16) u8 tcq_smem[];
    const u32 smem = smem_addr(tcq_smem);
    const TcqThread at;
    int begin, end;
    split_steps(kp / TC_BK, begin, end);
    u32 xoff[4];
    tcq_x_offsets(m, at.m0, kp, xoff);
    const auto l = layout(at);
    using L = decltype(l);

    float acc[4][4][4];
    tc_zero(acc);

#pragma unroll
    for (int s = 0; s < L::STAGES - 1; ++s) {
        if (begin + s < end) {
            if constexpr (!SHORT) tcq_load_x(smem + s * L::BYTES, xh, xoff, (begin + s) * TC_BK);
            l.load(smem + s * L::BYTES, (begin + s) * TC_BK);
        }
        cp_async_commit();
    }
    const u32 a_off = ((at.wm + (at.lane & 15)) * TC_LD + 8 * (at.lane >> 4)) * 2;
    int slot = 0, fill = L::STAGES - 1;  // the slots of this step and of the one it issues
    for (int step = begin; step < end; ++step) {
        cp_async_wait<L::STAGES - 2>();
        __syncthreads();  // the step's copies are visible; the slot refilled below is free
        if (step + L::STAGES - 1 < end) {
            const int k0 = (step + L::STAGES - 1) * TC_BK;
            if constexpr (!SHORT) tcq_load_x(smem + fill * L::BYTES, xh, xoff, k0);
            l.load(smem + fill * L::BYTES, k0);
        }
        cp_async_commit();
        fill = fill + 1 == L::STAGES ? 0 : fill + 1;

        const u8* s = tcq_smem + slot * L::BYTES;
        const u32 sa = smem + slot * L::BYTES;
        slot = slot + 1 == L::STAGES ? 0 : slot + 1;
        typename L::Step st;
        l.prepare(s, step, st);
        if constexpr (SHORT) {
            // This thread's A rows of x (as u32 pairs) at the step; its warp half's chunks.
            const u16* xs = xh + step * TC_BK;
            const u32* x0 = (const u32*)(xs + (i64)min(at.g, m - 1) * kp);
            const u32* x8 = (const u32*)(xs + (i64)min(at.g + 8, m - 1) * kp);
            const int half = at.wm ? 1 : 0;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                if ((c >> 1) != half) continue;  // warp-uniform; c stays a constant
                u32 b[4][2];
                l.fragments(st, s, c, b);
                const u32 a[4] = {x0[8 * c + at.t], x8[8 * c + at.t], x0[8 * c + at.t + 4],
                                  x8[8 * c + at.t + 4]};
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_f16(acc[0][j], a, b[j]);
            }
        } else {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                u32 b[4][2];
                l.fragments(st, s, c, b);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    u32 a[4];
                    ldmatrix_x4_at(a, sa + a_off + i * 16 * TC_LD * 2 + c * 32);
#pragma unroll
                    for (int j = 0; j < 4; ++j) mma_f16(acc[i][j], a, b[j]);
                }
            }
        }
    }
    if constexpr (SHORT) store_rows<1>(acc, at, bias, bias_type, out, m, n);
    else store_tile_split(acc, bias, bias_type, out, m, n);
}

// MLX affine weights on the ring: a step is 64 columns of BITS-bit words (8·BITS bytes a row)
// and the scales and biases of its two 32-column units as aligned 4-byte words. Needs w 16-byte
// aligned.
template <int BITS>
struct TcqMlx : Tcq<BITS> {
    using T = Tcq<BITS>;
    const u32* wsrc[BITS / 4];  // the raw-word chunks this thread copies at k0 = 0
    i64 group0;                 // the first group of the scale/bias row tid % 128
    const u8 *scales, *biases;
    int st, esize, gshift, k;
    // This thread's fragments read the scales of rows at.row(j) in unit t/2 of each step;
    // bit j (4 + j) of `high`: whether that row's scale (bias) at group 0 is the upper half of
    // its word (2-byte types; group g's flips with g).
    int unit;
    TcqThread at;
    u32 high;
    struct Step {
        u32 s2[4], b2[4], words[4][2];  // 4 bits: both words of the step, loaded up front
    };

    __device__ __forceinline__ TcqMlx(const TcqThread& thread, const u32* __restrict__ w,
                                      const u8* scales, const u8* biases, int st, int n, int k,
                                      int gshift)
        : scales(scales), biases(biases), st(st), esize(st == FT_F32 ? 4 : 2), gshift(gshift),
          k(k), unit(thread.t >> 1), at(thread), high(0) {
        const int tid = threadIdx.x, groups = (k >> 5) >> gshift;
#pragma unroll
        for (int i = 0; i < BITS / 4; ++i) {
            const int id = tid + 256 * i, r = id / (BITS / 2), q = id % (BITS / 2);
            wsrc[i] = w + (i64)min(thread.n0 + r, n - 1) * (k / 32) * BITS + 4 * q;
        }
        group0 = (i64)min(thread.n0 + (tid & 127), n - 1) * groups;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const i64 gi = (i64)min(thread.n0 + at.row(j), n - 1) * groups;
            high |= (u32)((((u64)scales >> 1) + gi) & 1) << j;
            high |= (u32)((((u64)biases >> 1) + gi) & 1) << (4 + j);
        }
    }

    // Issues this thread's copies of the step at k0 into the slot at shared address `slot`:
    // rows past n repeat the last row (their outputs are never stored); units past k are
    // zero-filled, so x and weights both read 0 there. A 2-byte scale's aligned word may reach
    // 2 bytes past the tensor, never past its 256-byte-aligned allocation.
    __device__ __forceinline__ void load(u32 slot, int k0) const {
        const int tid = threadIdx.x;
        // 16-byte chunk q of a row's step holds 128/BITS columns, from unit q·4/BITS.
#pragma unroll
        for (int i = 0; i < BITS / 4; ++i) {
            const int id = tid + 256 * i, r = id / (BITS / 2), q = id % (BITS / 2);
            const bool live = k0 + 32 * (q * 4 / BITS) < k;
            cp_async16(slot + T::W + r * 8 * BITS + 16 * q,
                       wsrc[i] + (live ? k0 / 32 * BITS : 0), live);
        }
        const int r = tid & 127, unit = (tid >> 7) & 1, col = k0 + 32 * unit;
        const bool live = col < k;
        const i64 g = group0 + (live ? col >> (5 + gshift) : 0);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const u64 at = (u64)(i ? biases : scales) + g * esize;
            cp_async4(slot + T::SB + ((2 * i + unit) * TCQ_SB_LD + r) * 4,
                      (const void*)(at & ~(u64)3), live);
        }
    }

    __device__ __forceinline__ void prepare(const u8* s, int step, Step& p) const {
        const u32 grp = (u32)((step * TC_BK + 32 * unit) >> (5 + gshift));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = at.row(j);
            p.s2[j] = tcq_pair(*(const u32*)(s + T::SB + (unit * TCQ_SB_LD + r) * 4),
                               ((high >> j) ^ grp) & 1, st);
            p.b2[j] = tcq_pair(*(const u32*)(s + T::SB + ((2 + unit) * TCQ_SB_LD + r) * 4),
                               ((high >> (4 + j)) ^ grp) & 1, st);
            if constexpr (BITS == 4) {
                const uint2 v = *(const uint2*)(s + T::W + r * 32 + 8 * at.t);
                p.words[j][0] = v.x;
                p.words[j][1] = v.y;
            }
        }
    }

    __device__ __forceinline__ void fragments(const Step& p, const u8* s, int c,
                                              u32 (&b)[4][2]) const {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = at.row(j);
            const u32 v = BITS == 4 ? p.words[j][c >> 1] >> (8 * (c & 1))
                                    : *(const u32*)(s + T::W + r * 64 + 16 * at.t + 4 * c);
            tcq_fragment<BITS>(v, p.s2[j], p.b2[j], b[j]);
        }
    }
};

#define MATMUL_TCQ_MLX(BITS)                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 2)                                      \
        matmul_tcq_mlx##BITS(const u16* xh, const u32* w, const void* scales,                 \
                             const void* biases, int scale_type, const void* bias,            \
                             int bias_type, float* out, int m, int n, int k, int group_shift) { \
        kernel_entry();                                                                       \
        const auto layout = [&](const TcqThread& at) {                                        \
            return TcqMlx<BITS>(at, w, (const u8*)scales, (const u8*)biases, scale_type, n,   \
                                k, group_shift);                                              \
        };                                                                                    \
        tcq_ring(layout, xh, bias, bias_type, out, m, n, (k + TC_BK - 1) / TC_BK * TC_BK);    \
    }
MATMUL_TCQ_MLX(4)
MATMUL_TCQ_MLX(8)

// Short prompts (2–32 rows of x) of MLX 4- and 8-bit weights on tensor cores, where the ring's
// 128-row x tile would be mostly empty: x (f16 in the ring's staged order, rows past m
// repeating row m − 1) is the A operand, RF fragments of 16 rows (`matmul_tcq_rows_*` RF = 1
// for 2–16 rows, `matmul_tcq_rows32_*` RF = 2 for 17–32; a last fragment's rows 8–15 zero and
// not loaded where m leaves them empty); a weight row is a column of B. Each of the 8 warps
// owns 32 weight rows (4 n8 blocks: rows n0 + 32·(w%4) + 8j + g) and every other step of the
// block's steps (w/4); each thread loads its B fragments' raw words, scales and biases straight
// from global memory (no shared tile: every weight is read by one thread once) into a register
// ring D steps ahead of their mma, the scale and bias bits converted only when used (a
// conversion at the load would wait for it), and its A fragments:
// - RF = 1 from shared memory, where the block writes its k range of x, f32 or f16 as it lies,
//   converted and ordered, after the wait for the kernel that wrote x (`rows_stage_x`; read from
//   L2 at each step, x's loads held about half the stall samples of the 8B's 16-row down
//   projection). No `stage_x_f16` launch: H200, 2026-11-29, an 8-token prefill of the 1B in
//   ncu 1,901 → 1,631 µs serialized (this kernel 7.51 → 8.06 µs, 112 stagings of 2.96 gone),
//   prefill tok/s at 5 / 8 / 12 / 16 tokens 1B 2,973–3,036 / 4,725–4,792 / 6,632–6,908 /
//   8,630–8,983 → 3,260–3,301 / 5,151–5,168 / 7,327–7,400 / 9,322–9,612, Qwen3-0.6B
//   1,749–1,852 / 2,845–2,999 / 4,206–4,535 / 5,423–5,973 → 2,207–2,213 / 3,509–3,515 /
//   5,027–5,099 / 6,606–6,613 (its first form, 8 scalar loads a block of 8 and a branch on
//   x's type at each, took 11.97 µs).
// - RF = 2 from x staged by `stage_x_f16`, which L1 and L2 serve to all warps (its one block an
//   SM waits for the whole copy: H200, 2026-11-28, 8B prefill tok/s, x in shared memory against
//   L2 at 16 rows 2,522 / 2,497 against 2,265 / 2,348, at 32 rows 2,567 / 2,502 against 3,288 /
//   3,250).
// Weights become f16 as in the ring (`tcq_fragment`), so a weight costs ~1.5 ALU instructions
// whatever the rows of x, where matvec_rows.cu pays a multiply-add for every row. Launch: 256
// threads, two blocks an SM for RF = 1 (one for RF = 2, whose accumulators need the registers),
// grid (ceil(n/128), 1, k splits), RF = 1 with 4·16·(32·steps + ROWS_X_PAD) bytes of dynamic
// shared memory for the most steps a split takes (at least a 16 × 128 float tile in clusters);
// split: partial slices as `store_tile_split`'s, summed by `splitk_sum`, or (RF = 1, matmul.rs
// `cluster_sum`) the splits a cluster that sums them itself (`cluster_store_rows`). H200,
// 2026-11-28, prefill tok/s, this kernel's first form (one step ahead, scales converted at the
// load, the 128-row tiles' splits) against this: 8B MLX 4-bit at 2 / 16 rows 306 / 2,056 → 378 /
// 2,354, 1B 690 / 7,585 → 1,083 / 8,037; RF = 2 against cuBLAS at 17 / 24 / 32 rows: 8B 1,355 /
// 1,908 / 2,541 → 2,199 / 2,729 / 3,241, 8-bit at 24 / 32 1,828 / 2,414 → 2,473 / 2,995.
// Loading a step's x a step ahead as well (ring depth 3) gained nothing; summing the splits in
// each tile's last block instead of `splitk_sum` lost 10–28%.
template <int BITS>
struct RowsTcStep {
    u32 words[4][BITS / 2 > 2 ? 4 : 2];  // 4 bits: words 2t, 2t+1; 8 bits: 4t … 4t+3
    u32 s[4], b[4];                      // raw scale and bias bits, converted when used
};

// Steps of the register ring a warp has in flight: 4 KB of weights a warp (4-bit: 32 rows of
// 32 bytes a step).
template <int BITS>
__device__ constexpr int rows_tc_depth() {
    return BITS == 4 ? 4 : 2;
}

__device__ __forceinline__ u32 load_raw_float(const void* p, i64 i, int ft) {
    return ft == FT_F32 ? ((const u32*)p)[i] : ((const u16*)p)[i];
}

__device__ __forceinline__ float raw_float_bits(u32 r, int ft) {
    return ft == FT_F16 ? f16_to_f32((u16)r) : __uint_as_float(ft == FT_BF16 ? r << 16 : r);
}

template <int BITS>
__device__ __forceinline__ void rows_tc_load(const u32* w, const u32 (&wrow)[4],
                                             const u32 (&grow)[4], const void* scales,
                                             const void* biases, int st, int t, int gshift,
                                             int k, int step, RowsTcStep<BITS>& p) {
    const int k0 = step * TC_BK, col = k0 + 32 * (t >> 1);
    const bool live = col < k;  // the unit past k (a last half step) reads zeros
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32* at = w + wrow[j] + (live ? k0 / 32 * BITS : 0);
        if constexpr (BITS == 4) {
            const uint2 v = live ? *(const uint2*)(at + 2 * t) : make_uint2(0, 0);
            p.words[j][0] = v.x;
            p.words[j][1] = v.y;
        } else {
            const uint4 v = live ? *(const uint4*)(at + 4 * t) : make_uint4(0, 0, 0, 0);
            p.words[j][0] = v.x;
            p.words[j][1] = v.y;
            p.words[j][2] = v.z;
            p.words[j][3] = v.w;
        }
        const u32 g = grow[j] + (col >> (5 + gshift));
        p.s[j] = live ? load_raw_float(scales, g, st) : 0u;
        p.b[j] = live ? load_raw_float(biases, g, st) : 0u;
    }
}

// One step's mma: the A fragments of its 4 chunks from the staged x rows (xr[i][h]: rows
// 16i + g + 8h; the last fragment's upper half zero unless `upper`), the B fragments from the
// step's words.
template <int BITS, int RF>
__device__ __forceinline__ void rows_tc_step(const RowsTcStep<BITS>& p,
                                             const u32* const (&xr)[RF][2], int off, bool upper,
                                             int st, int t, float (&acc)[RF][4][4]) {
    u32 s2[4], b2[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float s = raw_float_bits(p.s[j], st), b = raw_float_bits(p.b[j], st);
        s2[j] = pack_f16x2(s, s);
        b2[j] = pack_f16x2(b, b);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        u32 b[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 v = BITS == 4 ? p.words[j][c >> 1] >> (8 * (c & 1)) : p.words[j][c];
            tcq_fragment<BITS>(v, s2[j], b2[j], b[j]);
        }
#pragma unroll
        for (int i = 0; i < RF; ++i) {
            const u32 *lo = xr[i][0] + off + 8 * c, *hi = xr[i][1] + off + 8 * c;
            const bool live = i + 1 < RF || upper;
            const u32 a[4] = {lo[t], live ? hi[t] : 0u, lo[t + 4], live ? hi[t + 4] : 0u};
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_f16(acc[i][j], a, b[j]);
        }
    }
}

// Words of padding after a row of x in shared memory (`rows_stage_x`): rows 4 banks apart, so
// the A fragments' loads (rows g, columns t) hit 32 banks.
#define ROWS_X_PAD 4

// Blocks of 8 columns of x a thread loads before it converts and stores any (`rows_stage_x`):
// x comes from L2 just after the wait, so its loads go out together.
#define ROWS_STAGE_BATCH 4

// 8 elements of x (f32 or f16 as XT says, 16-byte aligned) from element `at` as floats, or
// zeros where not `live`.
template <int XT>
__device__ __forceinline__ void load_x8(const void* x, i64 at, bool live, float (&v)[8]) {
    if constexpr (XT == FT_F16) {
        const uint4 q = live ? *(const uint4*)((const u16*)x + at) : make_uint4(0, 0, 0, 0);
        const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = f16_to_f32((u16)(w[i] & 0xffffu));
            v[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
        }
    } else {
        const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
        const float4 a = live ? *(const float4*)((const float*)x + at) : zero;
        const float4 b = live ? *(const float4*)((const float*)x + at + 4) : zero;
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
}

// Writes steps [begin, end) of the first `rows` rows of x ([m, k], f32 or f16 as XT says, 16-byte
// aligned, k % 8 == 0; rows past m repeat row m − 1) into xs as f16, each step's columns in
// ORDER (TCQ_MLX4 or TCQ_BYTES; zero past k), `stride` words a row, and waits for the block's
// threads: what `stage_x_f16` would write, with no launch of its own. A thread takes blocks of 8
// columns (one or two 16-byte loads). In both orders block b of a step fills the step's words
// 16(b % 2) + b/2 + 8c + 4h (c, h = 0, 1), each with the columns `tcq_column` gives block 0's.
template <int XT, int ORDER>
__device__ __forceinline__ void rows_stage_x(const void* __restrict__ x, u32* xs, int stride,
                                             int rows, int m, int k, int begin, int end) {
    static_assert(ORDER == TCQ_MLX4 || ORDER == TCQ_BYTES, "the word rule above");
    const int per_row = (end - begin) * (TC_BK / 8);  // blocks of 8 in a row's range
    const int count = rows * per_row;
    for (int first = threadIdx.x; first < count; first += ROWS_STAGE_BATCH * blockDim.x) {
        float v[ROWS_STAGE_BATCH][8];
#pragma unroll
        for (int b = 0; b < ROWS_STAGE_BATCH; ++b) {
            const int i = first + b * blockDim.x, r = i / per_row;
            const int col = begin * TC_BK + 8 * (i - r * per_row);
            load_x8<XT>(x, (i64)min(r, m - 1) * k + col, i < count && col < k, v[b]);
        }
#pragma unroll
        for (int b = 0; b < ROWS_STAGE_BATCH; ++b) {
            const int i = first + b * blockDim.x, r = i / per_row, q = i - r * per_row;
            if (i >= count) break;
            u32* words = xs + r * stride + (q >> 3) * (TC_BK / 2) + 16 * (q & 1) + ((q & 7) >> 1);
#pragma unroll
            for (int c = 0; c < 2; ++c)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    words[8 * c + 4 * h] = pack_f16x2(v[b][tcq_column(16 * c + 8 * h, ORDER)],
                                                      v[b][tcq_column(16 * c + 8 * h + 1, ORDER)]);
        }
    }
    __syncthreads();
}

// Thread block clusters (sm_90): the blocks of this block's cluster, its rank among them, a
// barrier of all their threads (release, then acquire), and a float of rank `rank`'s shared
// memory at the address `p` has in this block's.
__device__ __forceinline__ u32 cluster_blocks() {
    u32 n = 1;
#if __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
#endif
    return n;
}

__device__ __forceinline__ u32 cluster_rank() {
    u32 r = 0;
#if __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
    return r;
}

__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::
            : "memory");
#endif
}

// The same barrier with no ordering of memory: every block has arrived (for a block's shared
// memory that others have finished reading: their loads have returned before they arrive).
__device__ __forceinline__ void cluster_sync_relaxed() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::
                     : "memory");
#endif
}

__device__ __forceinline__ float cluster_load(const float* p, u32 rank) {
    float v = 0.f;
#if __CUDA_ARCH__ >= 900
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                 : "=r"(remote)
                 : "r"(smem_addr(p)), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote));
#endif
    return v;
}

// The most blocks of a cluster (the portable size; launch.rs's MAX_CLUSTER).
#define MAX_CLUSTER 8

// `store_rows` of a short kernel (RF = 1) whose k splits are a cluster (grid z = its blocks,
// ranks the splits): each block writes its partial tile (both warp halves' sums) to `tile` in
// its shared memory (16 × 128 floats), and after the cluster's barrier sums its share of the
// tile's live rows over the cluster's tiles in rank order, adds the bias and stores it: the
// values `splitk_sum` adds from slices in global memory, with no launch. A second barrier keeps
// each tile until every block has read it (relaxed: the reads have returned by then).
__device__ __forceinline__ void cluster_store_rows(const float (*acc)[4][4], const TcqThread& at,
                                                   float* tile, const void* __restrict__ bias,
                                                   int bias_type, float* __restrict__ out,
                                                   int m, int n) {
    // acc[0][j][e] is element (x row g + 8(e/2), tile row wn + 8j + 2t + e % 2).
    const auto slot = [&](int j, int e) -> float& {
        return tile[(at.g + 8 * (e >> 1)) * TC_BN + at.wn + 8 * j + 2 * at.t + (e & 1)];
    };
    __syncthreads();  // every warp is done with the x range that `tile` overlays
    if (at.wm) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) slot(j, e) = acc[0][j][e];
    }
    __syncthreads();
    if (!at.wm) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) slot(j, e) += acc[0][j][e];
    }
    cluster_sync();
    const int blocks = (int)cluster_blocks(), live = min(m, 16) * TC_BN;
    const int share = (live + blocks - 1) / blocks, first = (int)cluster_rank() * share;
    for (int i = first + threadIdx.x; i < min(live, first + share); i += blockDim.x) {
        const int x_row = i / TC_BN, row = at.n0 + i % TC_BN;
        float part[MAX_CLUSTER];  // all requested before the first is added
#pragma unroll
        for (int z = 0; z < MAX_CLUSTER; ++z)
            part[z] = z < blocks ? cluster_load(tile + i, z) : 0.f;
        float sum = 0.f;
#pragma unroll
        for (int z = 0; z < MAX_CLUSTER; ++z)
            if (z < blocks) sum += part[z];
        if (row < n)
            out[(i64)x_row * n + row] = bias ? sum + load_float(bias, row, bias_type) : sum;
    }
    cluster_sync_relaxed();
}

// x: RF = 1 x as it lies (f32 or f16, `xt`), RF = 2 x staged by `stage_x_f16` (xt unused).
// `early`: let the next kernel launch once x is readable (`kernel_entry_early`).
template <int BITS, int RF>
__device__ __forceinline__ void matmul_tcq_rows(const void* __restrict__ x, int xt, int early,
                                                const u32* __restrict__ w, const void* scales,
                                                const void* biases, int st,
                                                const void* __restrict__ bias, int bias_type,
                                                float* __restrict__ out, int m, int n, int k,
                                                int gshift) {
    constexpr int D = rows_tc_depth<BITS>();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int half = warp >> 2, n0 = blockIdx.x * TC_BN + 32 * (warp & 3);
    const int kp = (k + TC_BK - 1) / TC_BK * TC_BK, groups = (k >> 5) >> gshift;
    u32 wrow[4], grow[4];  // word and group offsets of the rows (matmul.rs keeps them 32-bit)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int row = min(n0 + 8 * j + g, n - 1);
        wrow[j] = (u32)row * (k / 32) * BITS;
        grow[j] = (u32)row * groups;
    }
    constexpr bool SHARED_X = RF == 1;             // x in shared memory
    extern __shared__ __align__(16) u32 rows_x[];  // the block's k range of x (SHARED_X)
    const bool upper = m > 16 * RF - 8;
    int begin, end;
    split_steps(kp / TC_BK, begin, end);
    const int stride = (end - begin) * (TC_BK / 2) + ROWS_X_PAD;
    const u32* xr[RF][2];
#pragma unroll
    for (int i = 0; i < RF; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = 16 * i + 8 * h + g;
            xr[i][h] = SHARED_X ? rows_x + r * stride
                                : (const u32*)((const u16*)x + (i64)min(r, m - 1) * kp);
        }
    float acc[RF][4][4];
    tc_zero(acc);
    // A ring of D steps in registers (the warp's steps begin + half, + 2, …): a slot is
    // refilled with the step D ahead as soon as its mma is issued. The first D steps' weights
    // are requested before the wait for the kernel that staged x (no kernel writes weights).
    RowsTcStep<BITS> ring[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
        const int step = begin + half + 2 * d;
        if (step < end)
            rows_tc_load<BITS>(w, wrow, grow, scales, biases, st, t, gshift, k, step, ring[d]);
    }
    kernel_entry_early(early);
    // (A last fragment's rows 8–15 are not read where m leaves them empty.)
    if constexpr (SHARED_X) {
        constexpr int ORDER = BITS == 4 ? TCQ_MLX4 : TCQ_BYTES;
        const int rows = upper ? 16 : 8;
        if (xt == FT_F16)
            rows_stage_x<FT_F16, ORDER>(x, rows_x, stride, rows, m, k, begin, end);
        else
            rows_stage_x<FT_F32, ORDER>(x, rows_x, stride, rows, m, k, begin, end);
    }
    const int first = SHARED_X ? begin : 0;  // the step at xr
    for (int base = begin + half; base < end; base += 2 * D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            const int step = base + 2 * d;
            if (step >= end) break;
            rows_tc_step<BITS, RF>(ring[d], xr, (step - first) * TC_BK / 2, upper, st, t, acc);
            if (step + 2 * D < end)
                rows_tc_load<BITS>(w, wrow, grow, scales, biases, st, t, gshift, k, step + 2 * D,
                                   ring[d]);
        }
    }
    if constexpr (SHARED_X) {
        if (cluster_blocks() > 1) {
            cluster_store_rows(acc, TcqThread(), (float*)rows_x, bias, bias_type, out, m, n);
            return;
        }
    }
    store_rows<RF>(acc, TcqThread(), bias, bias_type, out, m, n);
}

// `matmul_tcq_rows_mlx*` (2–16 rows of x, f32 or f16 as `xt` says) and
// `matmul_tcq_rows32_mlx*` (17–32, x staged by `stage_x_f16`).
#define TCQ_ROWS_MLX_PARAMS                                                                    \
    const u32* w, const void* scales, const void* biases, int st, const void* bias,            \
        int bias_type, float* out, int m, int n, int k, int group_shift
#define TCQ_ROWS_MLX_ARGS w, scales, biases, st, bias, bias_type, out, m, n, k, group_shift
#define MATMUL_TCQ_ROWS_MLX_KERNELS(BITS)                                                      \
    extern "C" __global__ void __launch_bounds__(256, 2)                                       \
        matmul_tcq_rows_mlx##BITS(const void* x, int xt, int early, TCQ_ROWS_MLX_PARAMS) {    \
        matmul_tcq_rows<BITS, 1>(x, xt, early, TCQ_ROWS_MLX_ARGS);                             \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 1)                                       \
        matmul_tcq_rows32_mlx##BITS(const u16* xh, TCQ_ROWS_MLX_PARAMS) {                     \
        matmul_tcq_rows<BITS, 2>(xh, FT_F16, 0, TCQ_ROWS_MLX_ARGS);                            \
    }
MATMUL_TCQ_ROWS_MLX_KERNELS(4)
MATMUL_TCQ_ROWS_MLX_KERNELS(8)

// ---------------------------------------------------------------------------------------------
// ggml blocks of 32 elements (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) on the same ring. A 64-column step
// is two blocks of a row (2·BLOCK bytes), 4-byte aligned when k % 64 == 0 and the data is,
// copied as 4-byte words (Q4_0, Q5_0 and Q8_0 blocks are only 2-byte aligned). Thread t takes
// block t/2 of the step and its quant words 2(t % 2), 2(t % 2) + 1 (Q8_0: 4(t % 2) … + 3); a
// word that straddles two copied words is a funnel shift of them (`sh`, 0 or 16 bits). Its d is
// half `dhalf` of word `dword`, the minimum m (Q4_1, Q5_1) the other half, the fifth bits (Q5_0,
// Q5_1) the word qh at `qh_base` shifted by `qh_sh`. Nibble fields become 1024 + q (1024 + 16q)
// by one lop3, their fifth bits ORed in at bit 4 (8), then q − 8 (Q4_0), q − 16 (Q5_0) or q
// exactly in f16 by one subtraction (one FMA with 1/16), and one multiply by d (one FMA with d
// and m) rounds the weight once; Q8_0's bytes are flipped to q + 128 and moved next to 0x64
// bytes. x is staged in the order of those fields (TCQ_Q4_0, TCQ_BYTES).
#define TCQ_GGML_Q4_0 0
#define TCQ_GGML_Q4_1 1
#define TCQ_GGML_Q5_0 2
#define TCQ_GGML_Q5_1 3
#define TCQ_GGML_Q8_0 4
template <int TYPE>
struct TcqGgml : TcqRows {
    static constexpr bool BYTES8 = TYPE == TCQ_GGML_Q8_0;
    static constexpr bool FIFTH = TYPE == TCQ_GGML_Q5_0 || TYPE == TCQ_GGML_Q5_1;
    static constexpr bool MIN = TYPE == TCQ_GGML_Q4_1 || TYPE == TCQ_GGML_Q5_1;
    static constexpr int STAGES = BYTES8 ? 3 : 4;
    static constexpr int BLOCK = TYPE == TCQ_GGML_Q4_0   ? 18
                                 : TYPE == TCQ_GGML_Q4_1 ? 20
                                 : TYPE == TCQ_GGML_Q5_0 ? 22
                                 : TYPE == TCQ_GGML_Q5_1 ? 24
                                                         : 34;
    static constexpr int QS = BLOCK - (BYTES8 ? 32 : 16);  // where a block's quants start
    static constexpr int ROW = 2 * BLOCK;                  // bytes of a row per step
    static constexpr int WORDS = ROW / 4;                  // 9, 10, 11, 12 or 17
    static constexpr u32 BYTES = W + TC_BN * ROW;
    // This thread's block of the step: its quant word i is word base + i of the row's step
    // shifted right by `sh` bits with word base + i + `next` above it (aligned words have no
    // next word, which for the last word would lie past the row).
    int next, base, dword, qh_base, qh_next;
    u32 sh, dhalf, qh_sh, qh_bit;
    struct Step {
        // d in both halves (Q4_1, Q5_1: and m), the thread's two quant words (4-bit) and qh.
        u32 d2[4], m2[4], words[4][2], qh[4];
    };

    // Needs k % 64 == 0 and w 4-byte aligned.
    __device__ __forceinline__ TcqGgml(const TcqThread& thread, const u8* __restrict__ w, int n,
                                       int k)
        : TcqRows{w, (i64)(k / 32) * BLOCK, n, thread} {
        // Block 0 starts the step (word-aligned), block 1 BLOCK bytes on (2 past a word for
        // Q4_0, Q5_0 and Q8_0): each offset is a constant plus blk times another.
        constexpr int PER = BYTES8 ? 4 : 2;  // quant words a thread
        constexpr int SH0 = 8 * (QS % 4), SH1 = 8 * ((BLOCK + QS) % 4);
        const int blk = thread.t >> 1;
        base = QS / 4 + PER * thread.t + blk * ((BLOCK + QS) / 4 - QS / 4 - 2 * PER);
        next = (SH0 ? 1 : 0) + blk * ((SH1 ? 1 : 0) - (SH0 ? 1 : 0));
        sh = blk ? SH1 : SH0;
        dhalf = 8 * (BLOCK % 4) * blk;
        dword = blk ? BLOCK / 4 : 0;
        if constexpr (FIFTH) {
            constexpr int QH = MIN ? 4 : 2;  // where a block's qh starts
            qh_base = blk ? (BLOCK + QH) / 4 : QH / 4;
            qh_sh = blk ? 8 * ((BLOCK + QH) % 4) : 8 * (QH % 4);
            qh_next = qh_sh ? 1 : 0;
            qh_bit = 8 * (thread.t & 1);
        }
    }

    // Issues this thread's copies of the weight words of the step at k0.
    __device__ __forceinline__ void load(u32 slot, int k0) const {
        tcq_row_copies<WORDS>([&](int r, int q, int id) {
            const u8* src = w + row_at(r) + k0 / TC_BK * ROW + 4 * q;
            cp_async4(slot + W + 4 * id, src, true);
        });
    }

    __device__ __forceinline__ void prepare(const u8* s, int, Step& p) const {
        const u32* ws = (const u32*)(s + W);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32* r = ws + at.row(j) * WORDS;
            p.d2[j] = ((r[dword] >> dhalf) & 0xffffu) * 0x10001u;
            if constexpr (MIN) p.m2[j] = (r[dword] >> 16) * 0x10001u;
            if constexpr (FIFTH) p.qh[j] = __funnelshift_r(r[qh_base], r[qh_base + qh_next], qh_sh);
            if constexpr (!BYTES8) {
                const u32 a = r[base], b = r[base + 1], c = r[base + 1 + next];
                p.words[j][0] = __funnelshift_r(a, b, sh);
                p.words[j][1] = __funnelshift_r(b, c, sh);
            }
        }
    }

    // d·q, or d·q + m, of the fields q of n8 block j, rounded once.
    static __device__ __forceinline__ u32 scaled(u32 q, const Step& p, int j) {
        if constexpr (MIN) return fma_f16x2(q, p.d2[j], p.m2[j]);
        else return mul_f16x2(q, p.d2[j]);
    }

    __device__ __forceinline__ void fragments(const Step& p, const u8* s, int c,
                                              u32 (&b)[4][2]) const {
        const u32* ws = (const u32*)(s + W);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if constexpr (!BYTES8) {
                const u32 v = p.words[j][c >> 1] >> (8 * (c & 1));
                u32 lo = and_or(v, 0x000f000fu, 0x64006400u);  // 1024 + q
                u32 hi = and_or(v, 0x00f000f0u, 0x64006400u);  // 1024 + 16q
                if constexpr (FIFTH) {
                    // Elements e and e + 2 (e = 8(t % 2) + 4(c / 2) + c % 2) and e + 16, e + 18.
                    const u32 h = p.qh[j] >> (qh_bit + 4 * (c >> 1) + (c & 1));
                    lo |= ((h & 1u) << 4) | ((h & 4u) << 18);
                    hi |= ((h & 0x10000u) >> 8) | ((h & 0x40000u) << 6);
                }
                // q less Q4_0's 8 or Q5_0's 16; the high fields as 1/16 of 1024 + 16q, less 64.
                constexpr u32 LO = TYPE == TCQ_GGML_Q4_0   ? 0x64086408u
                                   : TYPE == TCQ_GGML_Q5_0 ? 0x64106410u
                                                           : 0x64006400u;
                constexpr u32 HI = TYPE == TCQ_GGML_Q4_0   ? 0xd480d480u
                                   : TYPE == TCQ_GGML_Q5_0 ? 0xd500d500u
                                                           : 0xd400d400u;
                b[j][0] = scaled(sub_f16x2(lo, LO), p, j);
                b[j][1] = scaled(fma_f16x2(hi, 0x2c002c00u, HI), p, j);
            } else {
                const u32* r = ws + at.row(j) * WORDS + base + c;
                const u32 v = __funnelshift_r(r[0], r[next], sh) ^ 0x80808080u;  // q + 128
                b[j][0] = mul_f16x2(
                    sub_f16x2(__byte_perm(v, 0x64646464u, 0x4240), 0x64806480u), p.d2[j]);
                b[j][1] = mul_f16x2(
                    sub_f16x2(__byte_perm(v, 0x64646464u, 0x4341), 0x64806480u), p.d2[j]);
            }
        }
    }
};

// `matmul_tcq_NAME` for a ggml layout struct LAYOUT(thread, w, n, k) on the ring.
// (and, SHORT, `matmul_tcq16_NAME`)
#define MATMUL_TCQ_GGML_KERNEL(PREFIX, SHORT, LAYOUT, NAME)                                   \
    extern "C" __global__ void __launch_bounds__(256, 2)                                      \
        PREFIX##NAME(const u16* xh, const u8* w, const void* bias, int bias_type, float* out, \
                     int m, int n, int k) {                                                   \
        kernel_entry();                                                                       \
        const auto layout = [&](const TcqThread& at) { return LAYOUT(at, w, n, k); };         \
        tcq_ring<SHORT>(layout, xh, bias, bias_type, out, m, n, k);                           \
    }
#define MATMUL_TCQ_GGML(LAYOUT, NAME)                                                         \
    MATMUL_TCQ_GGML_KERNEL(matmul_tcq_, false, LAYOUT, NAME)                                  \
    MATMUL_TCQ_GGML_KERNEL(matmul_tcq16_, true, LAYOUT, NAME)
MATMUL_TCQ_GGML(TcqGgml<TCQ_GGML_Q4_0>, q4_0)
MATMUL_TCQ_GGML(TcqGgml<TCQ_GGML_Q4_1>, q4_1)
MATMUL_TCQ_GGML(TcqGgml<TCQ_GGML_Q5_0>, q5_0)
MATMUL_TCQ_GGML(TcqGgml<TCQ_GGML_Q5_1>, q5_1)
MATMUL_TCQ_GGML(TcqGgml<TCQ_GGML_Q8_0>, q8_0)

// ggml Q4_K and Q5_K weights on the same ring. A 64-column step is one pair p of a
// super-block's eight sub-blocks: the super-block's 16-byte header (f16 d and dmin, the packed
// 6-bit scales and mins), the pair's 32 bytes of nibbles and, for Q5_K, the 32 bytes of qh (bits
// 2p and 2p + 1 are the pair's fifth bits): 48 or 80 bytes a row, copied as 16-byte chunks (rows
// are 16-byte aligned: 144- or 176-byte super-blocks from a 16-byte aligned base). Thread t
// takes bytes 8t … 8t + 7 of the nibbles (and of qh): their low nibbles are elements 8t … of
// sub-block 2p, their high ones the same of sub-block 2p + 1, 32 columns on (x staged in that
// order, TCQ_Q4K). Each row's two scales d·sc and mins dmin·m are formed in f32 once a step and
// rounded to f16, and a weight is q·(d·sc) − dmin·m in one f16 FMA.
template <int BITS>  // 4: Q4_K, 5: Q5_K
struct TcqK : TcqRows {
    static constexpr int STAGES = BITS == 4 ? 4 : 3;  // two blocks an SM either way
    static constexpr int BLOCK = BITS == 4 ? 144 : 176;
    static constexpr int QS = BITS == 4 ? 16 : 48;  // where a super-block's nibbles start
    static constexpr int CHUNKS = BITS == 4 ? 3 : 5;  // 16-byte copies a row per step
    static constexpr int ROW = 16 * CHUNKS;  // header, nibbles (and qh) of a row per step
    static constexpr u32 BYTES = W + TC_BN * ROW;
    struct Step {
        u32 ds[4][2], dm[4][2], words[4][2], fifth[4][2];
    };

    // Needs k % 256 == 0 and w 16-byte aligned; x staged in TCQ_Q4K order.
    __device__ __forceinline__ TcqK(const TcqThread& thread, const u8* __restrict__ w, int n,
                                    int k)
        : TcqRows{w, (i64)(k / 256) * BLOCK, n, thread} {}

    // Issues this thread's copies of the header, nibbles (and qh) of the step at k0.
    __device__ __forceinline__ void load(u32 slot, int k0) const {
        tcq_row_copies<CHUNKS>([&](int r, int q, int) {
            const u8* blk = w + row_at(r) + (i64)(k0 / 256) * BLOCK;
            // Chunk 0: the header; 1, 2: the pair's nibbles; 3, 4: qh.
            const u8* src = q == 0  ? blk
                            : q < 3 ? blk + QS + 32 * ((k0 / TC_BK) & 3) + 16 * (q - 1)
                                    : blk + 16 * (q - 2);
            cp_async16(slot + W + ROW * r + 16 * q, src, true);
        });
    }

    __device__ __forceinline__ void prepare(const u8* s, int step, Step& p) const;
    __device__ __forceinline__ void fragments(const Step& p, const u8*, int c,
                                              u32 (&b)[4][2]) const;
};

// The f16x2 pairs (d·sc, d·sc) and (−dmin·m, −dmin·m) of sub-blocks 2p and 2p + 1 from a
// super-block's header words h[0..3] (p uniform across the block: branches cost nothing).
__device__ __forceinline__ void tcq_k_scales(const u32* h, int p, u32* ds, u32* dm) {
    u32 sc, mn;  // bytes 0 and 1: sub-blocks 2p and 2p + 1
    if (p < 2) {
        const u32 sh = 16 * p;
        sc = (h[1] >> sh) & 0x3f3fu;
        mn = (h[2] >> sh) & 0x3f3fu;
    } else {
        const u32 sh = 16 * (p - 2), b1 = h[1] >> sh, b2 = h[2] >> sh, b3 = h[3] >> sh;
        sc = (b3 & 0x0f0fu) | ((b1 >> 2) & 0x3030u);
        mn = ((b3 >> 4) & 0x0f0fu) | ((b2 >> 2) & 0x3030u);
    }
    const float d = f16_to_f32((u16)h[0]), dmin = f16_to_f32((u16)(h[0] >> 16));
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        const float a = d * (float)((sc >> (8 * s)) & 0xffu);
        const float b = -dmin * (float)((mn >> (8 * s)) & 0xffu);
        ds[s] = pack_f16x2(a, a);
        dm[s] = pack_f16x2(b, b);
    }
}

template <int BITS>
__device__ __forceinline__ void TcqK<BITS>::prepare(const u8* s, int step, Step& p) const {
    const u32* ws = (const u32*)(s + W);
    const int pair = step & 3;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32* r = ws + at.row(j) * (ROW / 4);
        const u32 h[4] = {r[0], r[1], r[2], r[3]};
        tcq_k_scales(h, pair, p.ds[j], p.dm[j]);
        p.words[j][0] = r[4 + 2 * at.t];
        p.words[j][1] = r[5 + 2 * at.t];
        if constexpr (BITS == 5) {
            // qh's bytes at the same l: bits 2p, 2p + 1 of each moved to bits 0, 1.
            p.fifth[j][0] = r[12 + 2 * at.t] >> (2 * pair);
            p.fifth[j][1] = r[13 + 2 * at.t] >> (2 * pair);
        }
    }
}

template <int BITS>
__device__ __forceinline__ void TcqK<BITS>::fragments(const Step& p, const u8*, int c,
                                                      u32 (&b)[4][2]) const {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 v = p.words[j][c >> 1] >> (8 * (c & 1));
        u32 lo = and_or(v, 0x000f000fu, 0x64006400u);  // 1024 + q
        u32 hi = and_or(v, 0x00f000f0u, 0x64006400u);  // 1024 + 16q
        if constexpr (BITS == 5) {
            const u32 f = p.fifth[j][c >> 1] >> (8 * (c & 1));
            lo |= (f << 4) & 0x00100010u;  // bit 2p at bit 4: + 16
            hi |= (f << 7) & 0x01000100u;  // bit 2p + 1 at bit 8: + 256 = 16·16
        }
        b[j][0] = fma_f16x2(sub_f16x2(lo, 0x64006400u), p.ds[j][0], p.dm[j][0]);
        b[j][1] = fma_f16x2(fma_f16x2(hi, 0x2c002c00u, 0xd400d400u), p.ds[j][1], p.dm[j][1]);
    }
}

MATMUL_TCQ_GGML(TcqK<4>, q4_k)
MATMUL_TCQ_GGML(TcqK<5>, q5_k)

// ggml Q6_K weights on the same ring (210-byte super-blocks: ql[128], qh[64], 16 int8 scales, f16
// d; element 128h + 32g + l takes nibble g / 2 of ql[64h + 32(g % 2) + l], bits 2g and 2g + 1 of
// qh[32h + l] above it and scale sc[8h + 2g + l / 16]: w = d·sc·(q − 32)). Rows of k % 2,048 ==
// 0 from 16-byte aligned data are 16-byte aligned, so super-block b of every row starts
// 2·(b % 8) bytes past an 8-byte boundary. A 64-column step s of a super-block is groups g =
// 2(s % 2) and g + 1 of half h = s / 2: ql[64h + l] and ql[64h + 32 + l] (their nibbles s % 2;
// columns l and 32 + l), qh[32h + l] (bits 4(s % 2) … 4(s % 2) + 3), the four scales at
// 8h + 4(s % 2), and d. A row's step is copied as 8-byte words from the aligned addresses at or
// below its half's ql (9 words), its qh (5) and the scales (3, d in the last): 136 bytes for
// 102. The fields lie `mis` = 0, 2, 4 or 6 bytes into each copy and are read as words realigned
// by a funnel shift. Every word holds a byte of its super-block, so the tensor's last word
// reaches at most 6 bytes past it, inside the aligned 8 bytes that hold its last bytes. Thread t
// takes l = 8t … 8t + 7 of both groups (x staged in TCQ_Q4K order, as a Q4_K pair): a field
// is 1024 + q in f16 (the nibble, qh's two bits at bits 4 and 5) and a weight (q − 32)·(d·sc),
// d·sc rounded to f16 once a step. `scripts/emulate_q6k_ring.py` checks the copies, fields, scales
// and x order against ggml's dequantization.
struct TcqQ6K : TcqRows {
    static constexpr int STAGES = 3;
    static constexpr int BLOCK = 210;
    static constexpr int WORDS = 17;         // 8-byte copies a row per step
    static constexpr int ROW = 8 * WORDS;    // bytes a row per step
    static constexpr int QH = 72, SC = 112;  // where the qh and scale copies start in a row
    static constexpr u32 BYTES = W + TC_BN * ROW;
    struct Step {
        u32 dsc[4][2];            // (d·sc, d·sc) of group g and g + 1
        u32 lo[4][2], hi[4][2];   // ql at l = 8t … 8t + 7 of group g, of group g + 1
        u32 qh[4][2];             // qh at the same l
        u32 shift;                // 4·(s % 2): the nibble and qh bits of the step's groups
    };

    // Needs k % 2,048 == 0 and w 16-byte aligned; x staged in TCQ_Q4K order.
    __device__ __forceinline__ TcqQ6K(const TcqThread& thread, const u8* __restrict__ w, int n,
                                      int k)
        : TcqRows{w, (i64)(k / 256) * BLOCK, n, thread} {}

    // Issues this thread's copies of the step at k0.
    __device__ __forceinline__ void load(u32 slot, int k0) const {
        const int half = (k0 / TC_BK >> 1) & 1;
        tcq_row_copies<WORDS>([&](int r, int q, int) {
            const i64 blk = row_at(r) + (i64)(k0 / 256) * BLOCK;
            // Words 0–8: from the half's ql; 9–13: from its qh; 14–16: the scales and d.
            const i64 start = q < 9    ? blk + 64 * half
                              : q < 14 ? blk + 128 + 32 * half
                                       : blk + 192;
            const int first = q < 9 ? 0 : q < 14 ? 9 : 14;
            cp_async8(slot + W + ROW * r + 8 * q, w + ((start & ~(i64)7) + 8 * (q - first)),
                      true);
        });
    }

    __device__ __forceinline__ void prepare(const u8* s, int step, Step& p) const {
        const int sub = step & 3, half = sub >> 1;
        const u32 mis = (2 * (step >> 2)) & 6;  // 210·b mod 8 for super-block b = step / 4
        const u32 sh = 8 * (mis & 3);
        p.shift = 4 * (sub & 1);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u8* row = s + W + ROW * at.row(j);
            // The 4 bytes at `off` of the row's copies (2-byte aligned).
            const auto word = [&](u32 off) {
                const u32* a = (const u32*)(row + (off & ~3u));
                return __funnelshift_r(a[0], a[1], sh);
            };
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                p.lo[j][i] = word(mis + 8 * at.t + 4 * i);
                p.hi[j][i] = word(mis + 32 + 8 * at.t + 4 * i);
                p.qh[j][i] = word(QH + mis + 8 * at.t + 4 * i);
            }
            const u32 scales = word(SC + mis + 8 * half + 4 * (sub & 1));
            const float d = f16_to_f32(*(const u16*)(row + SC + mis + 16));
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int byte = 2 * hh + (at.t >> 1);
                const float v = d * (float)(signed char)(scales >> (8 * byte));
                p.dsc[j][hh] = pack_f16x2(v, v);
            }
        }
    }

    __device__ __forceinline__ void fragments(const Step& p, const u8*, int c,
                                              u32 (&b)[4][2]) const {
        const u32 sh = 8 * (c & 1) + p.shift;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 vq = p.qh[j][c >> 1] >> sh;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const u32 v = (hh ? p.hi : p.lo)[j][c >> 1] >> sh;
                const u32 field = and_or(v, 0x000f000fu, 0x64006400u) |
                                  (((vq >> (2 * hh)) & 0x00030003u) << 4);  // 1024 + q
                // (q − 32)·(d·sc)
                b[j][hh] = mul_f16x2(sub_f16x2(field, 0x64206420u), p.dsc[j][hh]);
            }
        }
    }
};

MATMUL_TCQ_GGML(TcqQ6K, q6_k)

// out [m, n] = Σ_z partial[z] (+ bias), the slices in order: the sum of a split-K tcq matmul.
extern "C" __global__ void splitk_sum(const float* __restrict__ partial, int splits,
                                      const void* __restrict__ bias, int bias_type,
                                      float* __restrict__ out, int m, int n, int early) {
    kernel_entry_early(early);
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x, mn = (i64)m * n;
    if (i >= mn) return;
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += partial[z * mn + i];
    out[i] = bias ? s + load_float(bias, i % n, bias_type) : s;
}

// ---------------------------------------------------------------------------------------------
// Long prompts through cuBLAS (matmul.rs `dequant_gemm`): the weight, dequantized by its layout
// (layouts.cuh `tile`), as f16 rows of kp columns (k rounded up to 64, zero past k), which a
// cuBLAS GEMM multiplies with x staged as f16 in its own order (`stage_x_f16`, TCQ_NATURAL).
// The rows are scratch of one dispatch: weights stay stored as the file stores them. Rounded to
// f16 as the tensor-core tiles round them. Thread i dequantizes unit i % (kp/32) of row
// i / (kp/32), whose 32 halves are out[32i ..]: a warp's units are 2 KB of out, which it
// stores through shared memory as 16-byte words, lane l the words l, l + 32, … (one thread's
// four 16-byte stores 64 bytes apart left every sector half-written by each store). Launch:
// 256 threads, ⌈n·kp/32 / 256⌉ blocks.
template <class L>
__device__ __forceinline__ void dequant_f16(const L& l, u16* __restrict__ out, int n, int kp) {
    __shared__ uint4 staged[8][32 * 4];
    const int units = kp / 32, lane = threadIdx.x & 31;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x, total = (i64)n * units;
    uint4* mine = staged[threadIdx.x >> 5];
    if (i < total) {
        const int row = (int)(i / units), k0 = (int)(i - (i64)row * units) * 32;
        float w[32];
        if (k0 < l.k) l.tile(row, k0, w);
        else
#pragma unroll
            for (int e = 0; e < 32; ++e) w[e] = 0.f;
#pragma unroll
        for (int q = 0; q < 4; ++q)
            mine[4 * lane + q] =
                uint4{pack_f16x2(w[8 * q], w[8 * q + 1]), pack_f16x2(w[8 * q + 2], w[8 * q + 3]),
                      pack_f16x2(w[8 * q + 4], w[8 * q + 5]), pack_f16x2(w[8 * q + 6], w[8 * q + 7])};
    }
    __syncwarp();
    const i64 first = i - lane;  // the warp's first unit
    uint4* o = (uint4*)(out + first * 32);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int word = 32 * q + lane;  // four words a unit
        if (first + word / 4 < total) o[word] = mine[word];
    }
}

#define DEQUANT_F16_MLX(BITS)                                                                  \
    extern "C" __global__ void dequant_f16_mlx##BITS(const u32* w, const void* scales,         \
                                                     const void* biases, int scale_type,       \
                                                     u16* out, int n, int k, int kp,           \
                                                     int group_shift) {                        \
        kernel_entry();                                                                        \
        dequant_f16(MlxAffine<BITS>{w, scales, biases, scale_type, k, group_shift}, out, n, kp); \
    }
DEQUANT_F16_MLX(2)
DEQUANT_F16_MLX(3)
DEQUANT_F16_MLX(4)
DEQUANT_F16_MLX(5)
DEQUANT_F16_MLX(6)
DEQUANT_F16_MLX(8)

#define DEQUANT_F16_GGML(TYPE, NAME)                                                           \
    extern "C" __global__ void dequant_f16_##NAME(const u8* w, u16* out, int n, int k, int kp) { \
        kernel_entry();                                                                        \
        dequant_f16(TYPE{w, k}, out, n, kp);                                                   \
    }
DEQUANT_F16_GGML(Q4_0, q4_0)
DEQUANT_F16_GGML(Q4_1, q4_1)
DEQUANT_F16_GGML(Q5_0, q5_0)
DEQUANT_F16_GGML(Q5_1, q5_1)
DEQUANT_F16_GGML(Q8_0, q8_0)
DEQUANT_F16_GGML(Q4_K, q4_k)
DEQUANT_F16_GGML(Q5_K, q5_k)
DEQUANT_F16_GGML(Q6_K, q6_k)

extern "C" __global__ void dequant_f16_dense(const void* w, int weight_type, u16* out, int n,
                                             int k, int kp) {
    kernel_entry();
    dequant_f16(Dense{w, weight_type, k}, out, n, kp);
}
