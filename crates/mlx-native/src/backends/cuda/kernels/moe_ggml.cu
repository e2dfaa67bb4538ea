// Gathered products (gather.cuh) of experts stored as ggml blocks (layouts.cuh's Q4_0 … Q6_K),
// as llama.cpp's `ffn_*_exps` tensors hold them: each expert's n rows of k / block_size blocks
// follow the previous expert's. A program of its own, so that MLX models do not compile these.
// Arguments as moe.cu's dense kernels take them, without the float type: x, ids (matvec) or
// offsets and order (tiles), the blocks (then the up weight's, gated), out, n, k, experts,
// top_k, then per_slot (plain) or act (gated); the gated matvecs then the norm's
// (MATVEC_NORM_ARGS, ignored by `gather_matvec_gated_…`).

#define GATHER_GGML_GATED_MATVEC(PREFIX, NORM, L, NAME)                                           \
    extern "C" __global__ void __launch_bounds__(GMV_WARPS * 32)                                  \
        PREFIX##NAME(const float* x, const u32* ids, const u8* w, const u8* w_up, float* out,     \
                     int n, int k, int experts, int top_k, int act, MATVEC_NORM_ARGS) {           \
        kernel_entry();                                                                           \
        const L l{w, k}, l_up{w_up, k};                                                           \
        gather_matvec<true, NORM>(l, l_up, x, MATVEC_PRE_NORM, ids, out, n, experts, top_k, 0,    \
                                  act);                                                           \
    }

// gather_matmul_NAME and gather_matmul_gated_NAME on the SIMT tiles (PREFIX gather_matmul_) or
// on tensor cores (gather_matmul_tc_), FN the one or the other.
#define GATHER_GGML_TILES(PREFIX, FN, L, NAME, BLOCKS)                                            \
    extern "C" __global__ void __launch_bounds__(256, BLOCKS)                                     \
        PREFIX##NAME(const float* x, const int* offsets, const int* order, const u8* w,           \
                     float* out, int n, int k, int experts, int top_k, int per_slot) {            \
        kernel_entry();                                                                           \
        const L l{w, k};                                                                          \
        FN<false>(l, l, x, offsets, order, out, n, top_k, per_slot, 0);                           \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, BLOCKS)                                     \
        PREFIX##gated_##NAME(const float* x, const int* offsets, const int* order, const u8* w,   \
                             const u8* w_up, float* out, int n, int k, int experts, int top_k,    \
                             int act) {                                                           \
        kernel_entry();                                                                           \
        const L l{w, k}, l_up{w_up, k};                                                           \
        FN<true>(l, l_up, x, offsets, order, out, n, top_k, 0, act);                              \
    }

#define GATHER_GGML(L, NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(GMV_WARPS * 32)                                  \
        gather_matvec_##NAME(const float* x, const u32* ids, const u8* w, float* out, int n,      \
                             int k, int experts, int top_k, int per_slot) {                       \
        kernel_entry();                                                                           \
        const L l{w, k};                                                                          \
        gather_matvec<false, false>(l, l, x, PreNorm{}, ids, out, n, experts, top_k, per_slot,    \
                                    0);                                                           \
    }                                                                                             \
    GATHER_GGML_GATED_MATVEC(gather_matvec_gated_, false, L, NAME)                                \
    GATHER_GGML_GATED_MATVEC(gather_matvec_gated_norm_, true, L, NAME)                            \
    GATHER_GGML_TILES(gather_matmul_, gather_matmul, L, NAME, 1)                                  \
    GATHER_GGML_TILES(gather_matmul_tc_, gather_matmul_tc128, L, NAME, 2)                         \
    GATHER_GGML_TILES(gather_matmul_tc16_, gather_matmul_tc16, L, NAME, 4)
GATHER_GGML(Q4_0, q4_0)
GATHER_GGML(Q4_1, q4_1)
GATHER_GGML(Q5_0, q5_0)
GATHER_GGML(Q5_1, q5_1)
GATHER_GGML(Q8_0, q8_0)
GATHER_GGML(Q4_K, q4_k)
GATHER_GGML(Q5_K, q5_k)
GATHER_GGML(Q6_K, q6_k)
