// y = x·Wᵀ (+ bias) for a single row x (decode). A group of `kgroups` warps (1, 2 or 4: more
// for longer rows, so that enough loads are in flight) owns MV_ROWS output rows and splits
// their units of 32 elements. Each lane loads its unit of x once (eight 16-byte loads), forms
// Σx and the pre-scaled xs of layouts.cuh, and reuses them for all MV_ROWS rows, whose weights
// it reads with wide loads. Warp reductions, then shared memory across the group, finish
// each row.
// Launch: MV_WARPS·32 threads, ceil(n / (MV_ROWS·MV_WARPS/kgroups)) blocks; x 16-byte aligned.

#define MV_WARPS 4
#define MV_ROWS 4

template <class L>
__device__ __forceinline__ void matvec(const L& l, const float* __restrict__ x,
                                       const void* __restrict__ bias, int bias_type,
                                       float* __restrict__ out, int n, int kgroups) {
    __shared__ float partial[MV_WARPS][MV_ROWS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slice = warp % kgroups;
    const int row0 = (blockIdx.x * (MV_WARPS / kgroups) + warp / kgroups) * MV_ROWS;
    const int units = l.k / 32;
    float acc[MV_ROWS];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) acc[r] = 0.f;
    for (int u = slice * 32 + lane; u < units; u += 32 * kgroups) {
        float xs[32];
        const float4* xp = (const float4*)(x + u * 32);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float4 v = xp[i];
            xs[4 * i] = v.x; xs[4 * i + 1] = v.y; xs[4 * i + 2] = v.z; xs[4 * i + 3] = v.w;
        }
        float sx[2] = {0.f, 0.f};
#pragma unroll
        for (int e = 0; e < 32; ++e) {
            sx[e >> 4] += xs[e];
            xs[e] *= pow2_neg(L::shift(e));
        }
        // Rows past n (last block only) recompute row n−1 and are not stored.
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) acc[r] += l.dot(min(row0 + r, n - 1), u, xs, sx);
    }
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) acc[r] = warp_sum(acc[r]);
    if (kgroups > 1) {
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) partial[warp][r] = acc[r];
        }
        __syncthreads();
        if (slice != 0) return;
        for (int s = 1; s < kgroups; ++s) {
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) acc[r] += partial[warp + s][r];
        }
    }
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) {
        const int row = row0 + r;
        if (row < n) out[row] = bias ? acc[r] + load_float(bias, row, bias_type) : acc[r];
    }
}

#define MATVEC_MLX(BITS, ST, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32)                                    \
        matvec_mlx##BITS##_##NAME(const float* x, const u32* w, const void* scales,                \
                                  const void* biases, const void* bias, int bias_type,             \
                                  float* out, int n, int k, int group_shift, int kgroups) {        \
        const MlxAffine<BITS> l{w, scales, biases, ST, k, group_shift};                            \
        matvec(l, x, bias, bias_type, out, n, kgroups);                                            \
    }
#define MATVEC_MLX_ALL_TYPES(BITS)                                                                 \
    MATVEC_MLX(BITS, FT_F32, f32)                                                                  \
    MATVEC_MLX(BITS, FT_F16, f16)                                                                  \
    MATVEC_MLX(BITS, FT_BF16, bf16)
MATVEC_MLX_ALL_TYPES(2)
MATVEC_MLX_ALL_TYPES(3)
MATVEC_MLX_ALL_TYPES(4)
MATVEC_MLX_ALL_TYPES(5)
MATVEC_MLX_ALL_TYPES(6)
MATVEC_MLX_ALL_TYPES(8)

#define MATVEC_GGML(TYPE, NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32)                                    \
        matvec_##NAME(const float* x, const u8* w, const void* bias, int bias_type, float* out,    \
                      int n, int k, int kgroups) {                                                 \
        const TYPE l{w, k};                                                                        \
        matvec(l, x, bias, bias_type, out, n, kgroups);                                            \
    }
MATVEC_GGML(Q4_0, q4_0)
MATVEC_GGML(Q4_1, q4_1)
MATVEC_GGML(Q8_0, q8_0)
MATVEC_GGML(Q4_K, q4_k)
MATVEC_GGML(Q6_K, q6_k)

#define MATVEC_DENSE(FT, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32)                                    \
        matvec_dense_##NAME(const float* x, const void* w, const void* bias, int bias_type,        \
                            float* out, int n, int k, int kgroups) {                               \
        const Dense l{w, FT, k};                                                                   \
        matvec(l, x, bias, bias_type, out, n, kgroups);                                            \
    }
MATVEC_DENSE(FT_F32, f32)
MATVEC_DENSE(FT_F16, f16)
MATVEC_DENSE(FT_BF16, bf16)
