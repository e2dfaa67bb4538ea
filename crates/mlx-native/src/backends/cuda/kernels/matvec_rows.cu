// out [m, n] = x [m, k]·Wᵀ (+ bias) for short prompts (2 to 8 rows of x), on matvec.cuh's
// loop: a warp owns MVR_ROWS weight rows and takes one unit a step (kgroups warps splitting the
// units), block (·, y) rows y·MV_XROWS … of x. Each lane's weight words serve the block's
// MV_XROWS rows of x, so the weights are read about once for them, where the tiled kernels
// would compute 64 or 128 padded rows. Launch: MV_WARPS·32 threads, grid
// (ceil(n / (MVR_ROWS·MV_WARPS/kgroups)), ceil(m / MV_XROWS)); x 16-byte aligned. The plain
// matvec's arguments (no norm), then m.

#define MVR_ROWS 4
#define MV_XROWS 4
#define MVR_MIN_BLOCKS 2
#define MVR_ARGS(L)                                                                                \
    L, L, x, PreNorm{nullptr, 0.f, 0.f}, bias, bias_type, out, nullptr, n, kgroups, 0, m

#define MATVEC_ROWS_MLX_KERNEL(BITS, ST, NAME)                                                     \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MVR_MIN_BLOCKS)                    \
        matvec_rows_mlx##BITS##_##NAME(const float* x, const u32* w, const void* scales,           \
                                       const void* biases, const void* bias, int bias_type,        \
                                       float* out, int n, int k, int group_shift, int kgroups,     \
                                       int m) {                                                    \
        const MlxAffine<BITS> l{w, scales, biases, ST, k, group_shift};                            \
        matvec<MVR_ROWS, 1, false, false, MlxAffine<BITS>, false, MV_XROWS>(MVR_ARGS(l));          \
    }
MLX_SCALE_TYPES(MATVEC_ROWS_MLX_KERNEL, 2)
MLX_SCALE_TYPES(MATVEC_ROWS_MLX_KERNEL, 3)
MLX_SCALE_TYPES(MATVEC_ROWS_MLX_KERNEL, 4)
MLX_SCALE_TYPES(MATVEC_ROWS_MLX_KERNEL, 5)
MLX_SCALE_TYPES(MATVEC_ROWS_MLX_KERNEL, 6)
MLX_SCALE_TYPES(MATVEC_ROWS_MLX_KERNEL, 8)

#define MATVEC_ROWS_GGML_KERNEL(TYPE, NAME)                                                        \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MVR_MIN_BLOCKS)                    \
        matvec_rows_##NAME(const float* x, const u8* w, const void* bias, int bias_type,           \
                           float* out, int n, int k, int kgroups, int m) {                         \
        const TYPE l{w, k};                                                                        \
        matvec<MVR_ROWS, 1, false, false, TYPE, false, MV_XROWS>(MVR_ARGS(l));                     \
    }
MATVEC_ROWS_GGML_KERNEL(Q4_0, q4_0)
MATVEC_ROWS_GGML_KERNEL(Q4_1, q4_1)
MATVEC_ROWS_GGML_KERNEL(Q5_0, q5_0)
MATVEC_ROWS_GGML_KERNEL(Q5_1, q5_1)
MATVEC_ROWS_GGML_KERNEL(Q8_0, q8_0)
MATVEC_ROWS_GGML_KERNEL(Q4_K, q4_k)
MATVEC_ROWS_GGML_KERNEL(Q5_K, q5_k)
MATVEC_ROWS_GGML_KERNEL(Q6_K, q6_k)

#define MATVEC_ROWS_DENSE_KERNEL(FT, NAME)                                                         \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * 32, MVR_MIN_BLOCKS)                    \
        matvec_rows_dense_##NAME(const float* x, const void* w, const void* bias, int bias_type,   \
                                 float* out, int n, int k, int kgroups, int m) {                   \
        const Dense l{w, FT, k};                                                                   \
        matvec<MVR_ROWS, 1, false, false, Dense, false, MV_XROWS>(MVR_ARGS(l));                    \
    }
MATVEC_ROWS_DENSE_KERNEL(FT_F32, f32)
MATVEC_ROWS_DENSE_KERNEL(FT_F16, f16)
MATVEC_ROWS_DENSE_KERNEL(FT_BF16, bf16)
