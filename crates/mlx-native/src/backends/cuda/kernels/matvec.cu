// y = x·Wᵀ (+ bias) for a single row x (decode). A group of `kgroups` warps (1, 2 or 4, chosen
// by the planner so that the grid fills the GPU) owns ROWS output rows and splits their
// units of 32 elements. Each lane takes UNITS units per step (GATED: one): it loads their x once (eight
// 16-byte loads each), forms Σx and the pre-scaled xs of layouts.cuh, and reuses them for all
// ROWS rows, whose weights it reads with wide loads. The step's body has no branches (units
// past the row are clamped and masked), so the compiler issues all ROWS·UNITS weight
// loads before the first FMA: bytes in flight per warp, not warps per SM, cover the memory
// latency. Warp reductions, then shared memory across the group, finish each row.
// Two shapes: `matvec_…` (4 rows a warp, 2 units a step) for long rows, where reusing x over
// more rows pays, and `matvec_short_…` (2 rows, 1 unit) for short ones, which are bound by
// the latency of each lane's chain of work rather than by bytes (SmolLM2's k = 576: each lane
// holds one unit, and half the rows a warp give twice the warps; H100, 2026-11-26).
// GATED reads a second weight `l_up` of the same layout at the same rows (the gated MLP's up
// projection beside its gate) and stores act(x·gate)·(x·up), and its f16 copy where `out_h` is
// given (for a tensor-core down projection, matvec_tc.cu).
// NORM takes x through an RMSNorm first, x·(g + g_offset)·r with r = rsqrt(mean(x²) + eps),
// without a pass of its own: the lanes multiply x by g as they load it and sum x² on the way
// (every warp group covers all of k), and the row sums are scaled by r at the end.
// Launch: MV_WARPS·32 threads, ceil(n / (ROWS·MV_WARPS/kgroups)) blocks; x 16-byte aligned.
// The kernels wait for the previous kernel inside `matvec`, after starting their first
// weights towards L2 (PREFETCH: MLX layouts).

#define MV_WARPS 4
// Blocks per SM the register budget must allow (≤ 128 registers a thread), so that a 4096-row
// matrix runs in one wave on a 132-SM GPU.
#define MV_MIN_BLOCKS 4

template <int ROWS, int UNITS, bool GATED, bool NORM, class L, bool PREFETCH = false>
__device__ __forceinline__ void matvec(const L& l, const L& l_up, const float* __restrict__ x,
                                       const PreNorm norm, const void* __restrict__ bias,
                                       int bias_type, float* __restrict__ out,
                                       u16* __restrict__ out_h, int n, int kgroups, int act) {
    // GATED: up rows after the gate rows; NORM: Σx² in the last slot.
    constexpr int ROW_ACC = GATED ? 2 * ROWS : ROWS;
    constexpr int ACC = ROW_ACC + (NORM ? 1 : 0);
    __shared__ float partial[MV_WARPS][ACC];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slice = warp % kgroups;
    const int row0 = (blockIdx.x * (MV_WARPS / kgroups) + warp / kgroups) * ROWS;
    const int units = l.k / 32;
    // Rows past n (last block only) recompute row n−1 and are not stored.
    int rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = min(row0 + r, n - 1);
    // The gated pair holds twice the rows' words: one unit per step keeps it in registers.
    constexpr int UNROLL = GATED ? 1 : UNITS;
    // The first step's weights head for L2 before the wait for the previous kernel (no kernel
    // writes weights; layouts without `prefetch` skip this).
    if constexpr (PREFETCH) {
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const int u = min(slice * 32 * UNROLL + lane + 32 * j, units - 1);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                l.prefetch(rows[r], u);
                if constexpr (GATED) l_up.prefetch(rows[r], u);
            }
        }
    }
    kernel_entry();
    launch_dependents();
    // The bias (often the residual stream, written by an earlier kernel) is loaded now, so its
    // latency hides behind the loop rather than following the reduction.
    float bias_v[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
        bias_v[r] = bias && lane == 0 ? load_float(bias, rows[r], bias_type) : 0.f;
    float acc[ACC];
#pragma unroll
    for (int r = 0; r < ACC; ++r) acc[r] = 0.f;
    for (int u0 = slice * 32 * UNROLL + lane; u0 < units; u0 += 32 * UNROLL * kgroups) {
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const int uj = u0 + 32 * j;
            const float keep = uj < units ? 1.f : 0.f;
            const int u = min(uj, units - 1);
            float xs[32];
            load_floats<32>(x + u * 32, xs);
            if constexpr (NORM) acc[ROW_ACC] = fmaf(keep, pre_norm_unit(norm, u, xs), acc[ROW_ACC]);
            float sx[2] = {0.f, 0.f};
#pragma unroll
            for (int e = 0; e < 32; ++e) {
                sx[e >> 4] += xs[e];
                xs[e] *= pow2_neg(L::shift(e));
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                acc[r] = fmaf(keep, l.dot(rows[r], u, xs, sx), acc[r]);
                if constexpr (GATED)
                    acc[ROWS + r] = fmaf(keep, l_up.dot(rows[r], u, xs, sx), acc[ROWS + r]);
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
    const float scale = NORM ? rsqrtf(acc[ROW_ACC] / l.k + norm.eps) : 1.f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = row0 + r;
        if (row >= n) continue;
        const float y = scale * acc[r];
        if constexpr (GATED) {
            out[row] = activation(y, act) * (scale * acc[ROWS + r]);
            store_half_copy(out_h, row, out[row]);
        } else
            out[row] = y + bias_v[r];
    }
}

// Each kernel comes in both shapes (`matvec_…` and `matvec_short_…`), plain and with the
// RMSNorm in front (`…norm_…`); all take the norm arguments (MATVEC_NORM_ARGS), which the
// plain ones ignore. MATVEC_SHAPES(F, …) calls F(prefix, NORM, ROWS, UNITS, …) for the four.
#define MATVEC_SHAPES(F, ...)                                                                      \
    F(matvec_, false, 4, 2, __VA_ARGS__)                                                           \
    F(matvec_norm_, true, 4, 2, __VA_ARGS__)                                                       \
    F(matvec_short_, false, 2, 1, __VA_ARGS__)                                                     \
    F(matvec_short_norm_, true, 2, 1, __VA_ARGS__)

#define MATVEC_MLX_KERNELS(PREFIX, NORM, ROWS, UNITS, BITS, ST, NAME)                              \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        PREFIX##mlx##BITS##_##NAME(const float* x, const u32* w, const void* scales,               \
                                   const void* biases, const void* bias, int bias_type,            \
                                   float* out, int n, int k, int group_shift, int kgroups,         \
                                   MATVEC_NORM_ARGS) {                                             \
        const MlxAffine<BITS> l{w, scales, biases, ST, k, group_shift};                            \
        matvec<ROWS, UNITS, false, NORM, MlxAffine<BITS>, true>(                                   \
            l, l, x, MATVEC_PRE_NORM, bias, bias_type, out, nullptr, n, kgroups, 0);               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        PREFIX##gated_mlx##BITS##_##NAME(const float* x, const u32* w, const void* scales,         \
                                         const void* biases, const u32* w_up,                      \
                                         const void* scales_up, const void* biases_up, float* out, \
                                         int n, int k, int group_shift, int kgroups, int act,      \
                                         MATVEC_NORM_ARGS, u16* out_h) {                           \
        const MlxAffine<BITS> l{w, scales, biases, ST, k, group_shift};                            \
        const MlxAffine<BITS> l_up{w_up, scales_up, biases_up, ST, k, group_shift};                \
        matvec<ROWS, UNITS, true, NORM, MlxAffine<BITS>, true>(                                    \
            l, l_up, x, MATVEC_PRE_NORM, nullptr, 0, out, out_h, n, kgroups, act);                 \
    }
#define MATVEC_MLX_ALL_TYPES(BITS)                                                                 \
    MATVEC_SHAPES(MATVEC_MLX_KERNELS, BITS, FT_F32, f32)                                           \
    MATVEC_SHAPES(MATVEC_MLX_KERNELS, BITS, FT_F16, f16)                                           \
    MATVEC_SHAPES(MATVEC_MLX_KERNELS, BITS, FT_BF16, bf16)
MATVEC_MLX_ALL_TYPES(2)
MATVEC_MLX_ALL_TYPES(3)
MATVEC_MLX_ALL_TYPES(4)
MATVEC_MLX_ALL_TYPES(5)
MATVEC_MLX_ALL_TYPES(6)
MATVEC_MLX_ALL_TYPES(8)

#define MATVEC_GGML_KERNELS(PREFIX, NORM, ROWS, UNITS, TYPE, NAME)                                 \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        PREFIX##NAME(const float* x, const u8* w, const void* bias, int bias_type, float* out,     \
                     int n, int k, int kgroups, MATVEC_NORM_ARGS) {                                \
        const TYPE l{w, k};                                                                        \
        matvec<ROWS, UNITS, false, NORM>(l, l, x, MATVEC_PRE_NORM, bias, bias_type, out, nullptr,  \
                                         n, kgroups, 0);                                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        PREFIX##gated_##NAME(const float* x, const u8* w, const u8* w_up, float* out, int n,       \
                             int k, int kgroups, int act, MATVEC_NORM_ARGS, u16* out_h) {          \
        const TYPE l{w, k}, l_up{w_up, k};                                                         \
        matvec<ROWS, UNITS, true, NORM>(l, l_up, x, MATVEC_PRE_NORM, nullptr, 0, out, out_h, n,    \
                                        kgroups, act);                                             \
    }
MATVEC_SHAPES(MATVEC_GGML_KERNELS, Q4_0, q4_0)
MATVEC_SHAPES(MATVEC_GGML_KERNELS, Q4_1, q4_1)
MATVEC_SHAPES(MATVEC_GGML_KERNELS, Q5_0, q5_0)
MATVEC_SHAPES(MATVEC_GGML_KERNELS, Q5_1, q5_1)
MATVEC_SHAPES(MATVEC_GGML_KERNELS, Q8_0, q8_0)
MATVEC_SHAPES(MATVEC_GGML_KERNELS, Q4_K, q4_k)
MATVEC_SHAPES(MATVEC_GGML_KERNELS, Q5_K, q5_k)
MATVEC_SHAPES(MATVEC_GGML_KERNELS, Q6_K, q6_k)

#define MATVEC_DENSE_KERNELS(PREFIX, NORM, ROWS, UNITS, FT, NAME)                                  \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        PREFIX##dense_##NAME(const float* x, const void* w, const void* bias, int bias_type,       \
                             float* out, int n, int k, int kgroups, MATVEC_NORM_ARGS) {            \
        const Dense l{w, FT, k};                                                                   \
        matvec<ROWS, UNITS, false, NORM>(l, l, x, MATVEC_PRE_NORM, bias, bias_type, out, nullptr,  \
                                         n, kgroups, 0);                                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MV_MIN_BLOCKS)                     \
        PREFIX##gated_dense_##NAME(const float* x, const void* w, const void* w_up, float* out,    \
                                   int n, int k, int kgroups, int act, MATVEC_NORM_ARGS,           \
                                   u16* out_h) {                                                   \
        const Dense l{w, FT, k}, l_up{w_up, FT, k};                                                \
        matvec<ROWS, UNITS, true, NORM>(l, l_up, x, MATVEC_PRE_NORM, nullptr, 0, out, out_h, n,    \
                                        kgroups, act);                                             \
    }
MATVEC_SHAPES(MATVEC_DENSE_KERNELS, FT_F32, f32)
MATVEC_SHAPES(MATVEC_DENSE_KERNELS, FT_F16, f16)
MATVEC_SHAPES(MATVEC_DENSE_KERNELS, FT_BF16, bf16)
