// The decode kernels: matvec.cuh's loop for a single row x, every layout.
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
