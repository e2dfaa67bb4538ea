// out [m, n] = x [m, k] · Wᵀ (+ bias) for many rows (prefill): 64×64 output tiles, 256 threads
// each computing 4×4 outputs, the k dimension in steps of 32 through shared memory. The weight
// tile is dequantized to f32 as it is staged (layouts.cuh `tile`), so every layout shares the
// inner loop. Launch: 256 threads, grid (ceil(n/64), ceil(m/64), k splits). Split-K (grid z > 1,
// where the tiles leave SMs idle: an F32 MoE router's 128 experts, short prompts of f32 weights):
// block z takes its share of the steps and stores its partial tile, without the bias, as slice
// z of `out` [gridDim.z][m][n]; matmul_tc.cu's `splitk_sum` adds the slices in order.

#define MM_BM 64
#define MM_BN 64
#define MM_BK 32

template <class L>
__device__ __forceinline__ void matmul(const L& l, const float* __restrict__ x,
                                       const void* __restrict__ bias, int bias_type,
                                       float* __restrict__ out, int m, int n) {
    __shared__ __align__(16) float xs[MM_BK][MM_BM + 4];
    __shared__ __align__(16) float ws[MM_BK][MM_BN + 4];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int m0 = blockIdx.y * MM_BM, n0 = blockIdx.x * MM_BN;
    const int k = l.k, steps = (k + MM_BK - 1) / MM_BK;
    const int per = (steps + gridDim.z - 1) / gridDim.z;
    const int k_begin = min(steps, (int)blockIdx.z * per) * MM_BK;
    const int k_end = min(k, k_begin + per * MM_BK);
    if (gridDim.z > 1) {
        out += (i64)blockIdx.z * m * n;
        bias = nullptr;
    }
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int k0 = k_begin; k0 < k_end; k0 += MM_BK) {
        {
            const int r = tid >> 2, c = (tid & 3) * 8, row = m0 + r;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int kk = k0 + c + i;
                xs[c + i][r] = row < m && kk < k ? x[(i64)row * k + kk] : 0.f;
            }
        }
        if (tid < MM_BN) {
            float w[32];
            // Columns past n stage row n−1; their outputs are never stored.
            l.tile(min(n0 + tid, n - 1), k0, w);
#pragma unroll
            for (int e = 0; e < 32; ++e) ws[e][tid] = w[e];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MM_BK; ++kk) {
            const float4 a = *(const float4*)&xs[kk][ty * 4];
            const float4 b = *(const float4*)&ws[kk][tx * 4];
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = m0 + ty * 4 + i;
        if (row >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx * 4 + j;
            if (col < n)
                out[(i64)row * n + col] =
                    bias ? acc[i][j] + load_float(bias, col, bias_type) : acc[i][j];
        }
    }
}

#define MATMUL_MLX(BITS)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        matmul_mlx##BITS(const float* x, const u32* w, const void* scales, const void* biases,  \
                         int scale_type, const void* bias, int bias_type, float* out, int m,    \
                         int n, int k, int group_shift) {                                       \
        kernel_entry();                                                                         \
        const MlxAffine<BITS> l{w, scales, biases, scale_type, k, group_shift};                 \
        matmul(l, x, bias, bias_type, out, m, n);                                               \
    }
MATMUL_MLX(2)
MATMUL_MLX(3)
MATMUL_MLX(4)
MATMUL_MLX(5)
MATMUL_MLX(6)
MATMUL_MLX(8)

#define MATMUL_GGML(TYPE, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        matmul_##NAME(const float* x, const u8* w, const void* bias, int bias_type, float* out, \
                      int m, int n, int k) {                                                    \
        kernel_entry();                                                                         \
        const TYPE l{w, k};                                                                     \
        matmul(l, x, bias, bias_type, out, m, n);                                               \
    }
MATMUL_GGML(Q4_0, q4_0)
MATMUL_GGML(Q4_1, q4_1)
MATMUL_GGML(Q5_0, q5_0)
MATMUL_GGML(Q5_1, q5_1)
MATMUL_GGML(Q8_0, q8_0)
MATMUL_GGML(Q4_K, q4_k)
MATMUL_GGML(Q5_K, q5_k)
MATMUL_GGML(Q6_K, q6_k)

extern "C" __global__ void __launch_bounds__(256)
    matmul_dense(const float* x, const void* w, int weight_type, const void* bias, int bias_type,
                 float* out, int m, int n, int k) {
    kernel_entry();
    const Dense l{w, weight_type, k};
    matmul(l, x, bias, bias_type, out, m, n);
}
