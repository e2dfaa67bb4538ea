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
