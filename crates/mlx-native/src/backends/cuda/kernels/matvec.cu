// y = x·Wᵀ (+ bias) for a single row x (decode). A group of `kgroups` warps (1, 2 or 4, chosen
// by the planner so that the grid fills the GPU) owns MV_ROWS output rows and splits their
// units of 32 elements. Each lane takes MV_UNROLL units per step: it loads their x once (eight
// 16-byte loads each), forms Σx and the pre-scaled xs of layouts.cuh, and reuses them for all
// MV_ROWS rows, whose weights it reads with wide loads. The step's body has no branches (units
// past the row are clamped and masked), so the compiler issues all MV_ROWS·MV_UNROLL weight
// loads before the first FMA: bytes in flight per warp, not warps per SM, cover the memory
// latency. Warp reductions, then shared memory across the group, finish each row.
// GATED reads a second weight `l_up` of the same layout at the same rows (the gated MLP's up
// projection beside its gate) and stores act(x·gate)·(x·up).
// Launch: MV_WARPS·32 threads, ceil(n / (MV_ROWS·MV_WARPS/kgroups)) blocks; x 16-byte aligned.

#define MV_WARPS 4
#define MV_ROWS 4
#define MV_UNROLL 2
// Blocks per SM the register budget must allow (≤ 128 registers a thread), so that a 4096-row
// matrix runs in one wave on a 132-SM GPU.
#define MV_MIN_BLOCKS 4

template <bool GATED, class L>
__device__ __forceinline__ void matvec(const L& l, const L& l_up, const float* __restrict__ x,
                                       const void* __restrict__ bias, int bias_type,
                                       float* __restrict__ out, int n, int kgroups, int act) {
    constexpr int ACC = GATED ? 2 * MV_ROWS : MV_ROWS;
    __shared__ float partial[MV_WARPS][ACC];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slice = warp % kgroups;
    const int row0 = (blockIdx.x * (MV_WARPS / kgroups) + warp / kgroups) * MV_ROWS;
    const int units = l.k / 32;
    // Rows past n (last block only) recompute row n−1 and are not stored.
    int rows[MV_ROWS];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) rows[r] = min(row0 + r, n - 1);
    float acc[ACC];  // GATED: up rows after the gate rows
#pragma unroll
    for (int r = 0; r < ACC; ++r) acc[r] = 0.f;
    // The gated pair holds twice the rows' words: one unit per step keeps it in registers.
    constexpr int UNROLL = GATED ? 1 : MV_UNROLL;
    for (int u0 = slice * 32 * UNROLL + lane; u0 < units; u0 += 32 * UNROLL * kgroups) {
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const int uj = u0 + 32 * j;
            const float keep = uj < units ? 1.f : 0.f;
            const int u = min(uj, units - 1);
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
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                acc[r] = fmaf(keep, l.dot(rows[r], u, xs, sx), acc[r]);
                if constexpr (GATED)
                    acc[MV_ROWS + r] = fmaf(keep, l_up.dot(rows[r], u, xs, sx), acc[MV_ROWS + r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ACC; ++r) acc[r] = warp_sum(acc[r]);
    if (kgroups > 1) {
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < ACC; ++r) partial[warp][r] = acc[r];
        }
        __syncthreads();
        if (slice != 0) return;
        for (int s = 1; s < kgroups; ++s) {
#pragma unroll
            for (int r = 0; r < ACC; ++r) acc[r] += partial[warp + s][r];
        }
    }
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) {
        const int row = row0 + r;
        if (row >= n) continue;
        if constexpr (GATED)
            out[row] = activation(acc[r], act) * acc[MV_ROWS + r];
        else
            out[row] = bias ? acc[r] + load_float(bias, row, bias_type) : acc[r];
    }
}

#define MATVEC_MLX(BITS, ST, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        matvec_mlx##BITS##_##NAME(const float* x, const u32* w, const void* scales,                \
                                  const void* biases, const void* bias, int bias_type,             \
                                  float* out, int n, int k, int group_shift, int kgroups) {        \
        const MlxAffine<BITS> l{w, scales, biases, ST, k, group_shift};                            \
        matvec<false>(l, l, x, bias, bias_type, out, n, kgroups, 0);                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        matvec_gated_mlx##BITS##_##NAME(const float* x, const u32* w, const void* scales,          \
                                        const void* biases, const u32* w_up,                       \
                                        const void* scales_up, const void* biases_up, float* out,  \
                                        int n, int k, int group_shift, int kgroups, int act) {     \
        const MlxAffine<BITS> l{w, scales, biases, ST, k, group_shift};                            \
        const MlxAffine<BITS> l_up{w_up, scales_up, biases_up, ST, k, group_shift};                \
        matvec<true>(l, l_up, x, nullptr, 0, out, n, kgroups, act);                                \
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
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        matvec_##NAME(const float* x, const u8* w, const void* bias, int bias_type, float* out,    \
                      int n, int k, int kgroups) {                                                 \
        const TYPE l{w, k};                                                                        \
        matvec<false>(l, l, x, bias, bias_type, out, n, kgroups, 0);                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        matvec_gated_##NAME(const float* x, const u8* w, const u8* w_up, float* out, int n, int k, \
                            int kgroups, int act) {                                                \
        const TYPE l{w, k}, l_up{w_up, k};                                                         \
        matvec<true>(l, l_up, x, nullptr, 0, out, n, kgroups, act);                                \
    }
MATVEC_GGML(Q4_0, q4_0)
MATVEC_GGML(Q4_1, q4_1)
MATVEC_GGML(Q8_0, q8_0)
MATVEC_GGML(Q4_K, q4_k)
MATVEC_GGML(Q6_K, q6_k)

#define MATVEC_DENSE(FT, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        matvec_dense_##NAME(const float* x, const void* w, const void* bias, int bias_type,        \
                            float* out, int n, int k, int kgroups) {                               \
        const Dense l{w, FT, k};                                                                   \
        matvec<false>(l, l, x, bias, bias_type, out, n, kgroups, 0);                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        matvec_gated_dense_##NAME(const float* x, const void* w, const void* w_up, float* out,     \
                                  int n, int k, int kgroups, int act) {                            \
        const Dense l{w, FT, k}, l_up{w_up, FT, k};                                                \
        matvec<true>(l, l_up, x, nullptr, 0, out, n, kgroups, act);                                \
    }
MATVEC_DENSE(FT_F32, f32)
MATVEC_DENSE(FT_F16, f16)
MATVEC_DENSE(FT_BF16, bf16)
