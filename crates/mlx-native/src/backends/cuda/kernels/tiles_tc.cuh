// The generic tensor-core tile, for every weight layout: a block's BM×128 tile of x · Wᵀ,
// 256 threads of m16n8k16 mma.sync, k in steps of 64 through shared memory. BM = 128 (prefill):
// 8 warps as 2×4, each a 64×32 sub-tile. BM = 16 (a few rows: an MoE expert's slots in a short
// prompt, which 128-row tiles would pad 16-fold): 8 warps as 2×4 over the halves of each k step
// and 32-column strips, each 16×32 of one half, the halves summed at the end; the block then
// dequantizes as many weights a step for an eighth of the mma work.
// Operands are f16 with f32 accumulation: x is rounded from f32 and the
// weight tile is dequantized by its layout (layouts.cuh `tile`, two units per row) and rounded,
// so every layout shares the mma loop. f16 rather than bf16: 3 more mantissa bits (unit roundoff
// 2^−11); activations past ±65504 would overflow, which post-norm inputs of the supported models
// do not reach. The next k step's global loads and dequantization are issued before the current
// step's mma so they overlap; several blocks per SM hide the rest. Which rows the tile multiplies
// is the caller's: matmul_tc.cu's tiles take consecutive rows of x and W, moe.cu's an expert's
// slots and rows.

#define TC_BM 128
#define TC_BN 128
#define TC_BK 64
#define TC_LD (TC_BK + 8)  // row stride in halves: 144 bytes keeps ldmatrix conflict-free

// A tile of BM rows: MI m16 blocks a warp; SPLIT_K: warps 4–7 take the second half of each k
// step (rows 0.. of the tile) rather than rows 64.. of all of it.
template <int BM>
struct TcShape {
    static_assert(BM == 128 || BM == 16, "tile rows");
    static constexpr bool SPLIT_K = BM < 128;
    static constexpr int MI = SPLIT_K ? BM / 16 : 4;
};

// This thread's share of the x tile at k0: tile rows (tid/16) + 16·i, columns 4·(tid%16)..+3,
// as f16 pairs; tile row r reads row x_row(r) of x [·, k] (tile rows past the caller's rows
// read any row of x: their outputs are never stored), zero past k.
template <int BM, class XRow>
__device__ __forceinline__ void tc_load_x(const float* __restrict__ x, XRow x_row, int k, int k0,
                                          u32* xr) {
    const int c = k0 + 4 * (threadIdx.x & 15);
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) {
        const int row = x_row((threadIdx.x >> 4) + 16 * i);
        float4 v = {0.f, 0.f, 0.f, 0.f};
        if (c < k) v = *(const float4*)(x + (i64)row * k + c);
        xr[2 * i] = pack_f16x2(v.x, v.y);
        xr[2 * i + 1] = pack_f16x2(v.z, v.w);
    }
}

// This thread's share of the weight tile at k0: unit tid%2 of tile row tid/2, whose 32 weights
// from column k0 `w_tile(r, k0, w)` writes (units past k are zero).
template <class WTile>
__device__ __forceinline__ void tc_load_w(WTile w_tile, int k, int k0, u32* wr) {
    const int kk = k0 + 32 * (threadIdx.x & 1);
    float w[32];
    w_tile(threadIdx.x >> 1, min(kk, ((k - 1) / 32) * 32), w);
    const bool live = kk < k;
#pragma unroll
    for (int e = 0; e < 16; ++e) wr[e] = live ? pack_f16x2(w[2 * e], w[2 * e + 1]) : 0u;
}

// Zeroes a thread's accumulators (MI×4 m16n8 C fragments).
template <int MI>
__device__ __forceinline__ void tc_zero(float (&acc)[MI][4][4]) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// acc = the tile's steps [begin, end) of k: tile row r of x is `x_row(r)`, tile row r of W is
// what `w_tile(r, k0, w)` writes (see tc_load_x, tc_load_w). Starts with a barrier, so a block
// may call it again for another tile. With SPLIT_K only warps 0–3 hold the sums on return.
template <int BM, class XRow, class WTile>
__device__ __forceinline__ void tc_accumulate(const float* __restrict__ x, XRow x_row,
                                              WTile w_tile, int k, int begin, int end,
                                              float (&acc)[TcShape<BM>::MI][4][4]) {
    using S = TcShape<BM>;
    constexpr int KK_STEPS = (S::SPLIT_K ? TC_BK / 2 : TC_BK) / 16;
    __shared__ __align__(16) u16 xs[BM][TC_LD];
    __shared__ __align__(16) u16 ws[TC_BN][TC_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = S::SPLIT_K ? 0 : (warp >> 2) * 64, wn = (warp & 3) * 32;
    const int kk0 = S::SPLIT_K ? (warp >> 2) * (TC_BK / 2) : 0;

    tc_zero(acc);

    u32 xr[BM / 8], wr[16];
    tc_load_x<BM>(x, x_row, k, begin * TC_BK, xr);
    tc_load_w(w_tile, k, begin * TC_BK, wr);
    for (int k0 = begin * TC_BK; k0 < end * TC_BK; k0 += TC_BK) {
        __syncthreads();  // the previous step's readers are done with the tiles
#pragma unroll
        for (int i = 0; i < BM / 16; ++i)
            *(uint2*)&xs[(tid >> 4) + 16 * i][4 * (tid & 15)] = uint2{xr[2 * i], xr[2 * i + 1]};
#pragma unroll
        for (int i = 0; i < 4; ++i)
            *(uint4*)&ws[tid >> 1][32 * (tid & 1) + 8 * i] =
                uint4{wr[4 * i], wr[4 * i + 1], wr[4 * i + 2], wr[4 * i + 3]};
        __syncthreads();
        if (k0 + TC_BK < end * TC_BK) {
            tc_load_x<BM>(x, x_row, k, k0 + TC_BK, xr);
            tc_load_w(w_tile, k, k0 + TC_BK, wr);
        }
#pragma unroll
        for (int step = 0; step < KK_STEPS; ++step) {
            const int kk = kk0 + 16 * step;
            u32 a[S::MI][4], b[4][2];
#pragma unroll
            for (int i = 0; i < S::MI; ++i)
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
            for (int i = 0; i < S::MI; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_f16(acc[i][j], a[i], b[j]);
        }
    }
    if constexpr (S::SPLIT_K) {
        // Warps 4–7 hand their half of k to warps 0–3 through the weight tile's memory.
        constexpr int N = S::MI * 16;
        float* red = (float*)&ws[0][0];
        static_assert(4 * N * 32 * 4 <= sizeof(ws), "the halves fit the weight tile");
        __syncthreads();
        if (warp >= 4) {
#pragma unroll
            for (int v = 0; v < N; ++v) red[((warp - 4) * N + v) * 32 + lane] = (&acc[0][0][0])[v];
        }
        __syncthreads();
        if (warp < 4) {
#pragma unroll
            for (int v = 0; v < N; ++v) (&acc[0][0][0])[v] += red[(warp * N + v) * 32 + lane];
        }
    }
}

// Where accumulator acc[i][j][e] of this thread lies in the BM×128 tile: row `tc_row`,
// column `tc_col` (the mma C fragment of the warp's sub-tile).
template <int BM>
__device__ __forceinline__ int tc_row(int i, int e) {
    const int wm = TcShape<BM>::SPLIT_K ? 0 : (threadIdx.x >> 7) * 64;
    return wm + 16 * i + ((threadIdx.x & 31) >> 2) + 8 * (e >> 1);
}
__device__ __forceinline__ int tc_col(int j, int e) {
    return ((threadIdx.x >> 5) & 3) * 32 + 8 * j + 2 * (threadIdx.x & 3) + (e & 1);
}

// Whether this thread holds outputs of the tile after tc_accumulate (all but SPLIT_K's
// warps 4–7).
template <int BM>
__device__ __forceinline__ bool tc_holds_outputs() {
    return !TcShape<BM>::SPLIT_K || threadIdx.x < 128;
}

// Calls f(r, c, v) for each of this thread's accumulators v at tile row r, column c.
template <int BM, class F>
__device__ __forceinline__ void tc_outputs(const float (&acc)[TcShape<BM>::MI][4][4], F f) {
    if (!tc_holds_outputs<BM>()) return;
#pragma unroll
    for (int i = 0; i < TcShape<BM>::MI; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) f(tc_row<BM>(i, e), tc_col(j, e), acc[i][j][e]);
}
