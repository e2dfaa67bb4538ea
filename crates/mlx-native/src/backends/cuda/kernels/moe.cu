// Mixture-of-experts kernels: routing, the weighted combine, the grouping of slots by expert,
// and the expert-indexed ("gathered") products of gather.cuh for MLX affine and dense experts
// (moe_ggml.cu has ggml blocks'). Expert ids come from a device buffer (written by moe_route),
// so a captured graph replays with each token's own routing; ids past the last expert are
// clamped to it.

// ---------------------------------------------------------------------------------------------
// Routing (route.cuh): one warp per row. Launch: 128 threads, ceil(m / 4) blocks, 4·experts
// floats of dynamic shared memory.
extern "C" __global__ void moe_route(const float* __restrict__ logits, u32* __restrict__ ids,
                                     float* __restrict__ weights, int m, int experts, int top_k,
                                     int mode, int early) {
    kernel_entry_early(early);
    extern __shared__ float route_scores[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row = blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= m) return;  // the whole warp
    u32 slot_id;
    float slot_w;
    route_row(logits + (i64)row * experts, route_scores + warp * experts, experts, top_k, mode,
              slot_id, slot_w);
    if (lane < top_k) {
        ids[(i64)row * top_k + lane] = slot_id;
        weights[(i64)row * top_k + lane] = slot_w;
    }
}

// ---------------------------------------------------------------------------------------------
// out[slot] = residual + Σ_j w[row, j]·y[row, j] (the weighted slots summed first, as mlx-lm
// does). Launch: 256 threads, grid-stride over m·n.

extern "C" __global__ void moe_combine(const float* __restrict__ y, const float* __restrict__ w,
                                       const float* __restrict__ residual,
                                       float* __restrict__ out, int m, int n, int top_k,
                                       int early) {
    kernel_entry_early(early);
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)m * n;
         i += (i64)gridDim.x * blockDim.x) {
        const i64 row = i / n, c = i % n;
        out[i] = residual[i] + weighted_slots(w + row * top_k, y + row * top_k * n + c, n, top_k,
                                              [](const float* p) { return *p; });
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill groups the slots by expert first (gather.cuh's tiles read the groups).
// offsets[e]..offsets[e+1] of `order` are the slots routed to expert e (in no fixed order:
// every slot's result is computed alone, so the order changes nothing). One block; shared
// memory: (experts + 1) ints.
extern "C" __global__ void moe_bucket(const u32* __restrict__ ids, int slots, int experts,
                                      int* __restrict__ offsets, int* __restrict__ order) {
    kernel_entry();
    extern __shared__ int next[];
    for (int e = threadIdx.x; e <= experts; e += blockDim.x) next[e] = 0;
    __syncthreads();
    for (int s = threadIdx.x; s < slots; s += blockDim.x)
        atomicAdd(&next[min((int)ids[s], experts - 1)], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int e = 0; e < experts; ++e) {
            const int c = next[e];
            next[e] = offsets[e] = run;
            run += c;
        }
        offsets[experts] = run;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < slots; s += blockDim.x)
        order[atomicAdd(&next[min((int)ids[s], experts - 1)], 1)] = s;
}

// Kernels per layout. Common arguments: x, ids (matvec) or offsets and order (tiles), the
// weight's tensors (then the up weight's, GATED), out, n, k, experts, top_k, per_slot, act.
// The gated matvecs come plain and with the RMSNorm folded in (`…gated_norm_…`); both take the
// norm arguments (MATVEC_NORM_ARGS), which the plain one ignores.

#define GATHER_MLX_GATED_MATVEC(PREFIX, NORM, BITS, ST, NAME)                                     \
    extern "C" __global__ void __launch_bounds__(GMV_WARPS * 32)                                  \
        PREFIX##mlx##BITS##_##NAME(const float* x, const u32* ids, const u32* w,                  \
                                   const void* scales, const void* biases, const u32* w_up,       \
                                   const void* scales_up, const void* biases_up, float* out,      \
                                   int n, int k, int group_shift, int experts, int top_k,         \
                                   int act, MATVEC_NORM_ARGS) {                                   \
        kernel_entry();                                                                           \
        const MlxAffine<BITS> l{w, scales, biases, ST, k, group_shift};                           \
        const MlxAffine<BITS> l_up{w_up, scales_up, biases_up, ST, k, group_shift};               \
        gather_matvec<true, NORM>(l, l_up, x, MATVEC_PRE_NORM, ids, out, n, experts, top_k, 0,    \
                                  act);                                                           \
    }

#define GATHER_MLX_MATVEC(BITS, ST, NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(GMV_WARPS * 32)                                  \
        gather_matvec_mlx##BITS##_##NAME(const float* x, const u32* ids, const u32* w,            \
                                         const void* scales, const void* biases, float* out,     \
                                         int n, int k, int group_shift, int experts, int top_k,   \
                                         int per_slot) {                                          \
        kernel_entry();                                                                           \
        const MlxAffine<BITS> l{w, scales, biases, ST, k, group_shift};                           \
        gather_matvec<false, false>(l, l, x, PreNorm{}, ids, out, n, experts, top_k, per_slot,    \
                                    0);                                                           \
    }                                                                                             \
    GATHER_MLX_GATED_MATVEC(gather_matvec_gated_, false, BITS, ST, NAME)                          \
    GATHER_MLX_GATED_MATVEC(gather_matvec_gated_norm_, true, BITS, ST, NAME)

// gather_matmul_mlxBITS and gather_matmul_gated_mlxBITS on the SIMT tiles (PREFIX
// gather_matmul_) or on tensor cores (gather_matmul_tc_), FN the one or the other.
#define GATHER_MLX_TILES(PREFIX, FN, BITS, BLOCKS)                                              \
    extern "C" __global__ void __launch_bounds__(256, BLOCKS)                                     \
        PREFIX##mlx##BITS(const float* x, const int* offsets, const int* order, const u32* w,     \
                          const void* scales, const void* biases, int scale_type, float* out,     \
                          int n, int k, int group_shift, int experts, int top_k, int per_slot) {  \
        kernel_entry();                                                                           \
        const MlxAffine<BITS> l{w, scales, biases, scale_type, k, group_shift};                   \
        FN<false>(l, l, x, offsets, order, out, n, top_k, per_slot, 0);                           \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, BLOCKS) PREFIX##gated_mlx##BITS(            \
        const float* x, const int* offsets, const int* order, const u32* w, const void* scales,   \
        const void* biases, const u32* w_up, const void* scales_up, const void* biases_up,        \
        int scale_type, float* out, int n, int k, int group_shift, int experts, int top_k,        \
        int act) {                                                                                \
        kernel_entry();                                                                           \
        const MlxAffine<BITS> l{w, scales, biases, scale_type, k, group_shift};                   \
        const MlxAffine<BITS> l_up{w_up, scales_up, biases_up, scale_type, k, group_shift};       \
        FN<true>(l, l_up, x, offsets, order, out, n, top_k, 0, act);                              \
    }

#define GATHER_MLX(BITS)                                                                          \
    MLX_SCALE_TYPES(GATHER_MLX_MATVEC, BITS)                                                      \
    GATHER_MLX_TILES(gather_matmul_, gather_matmul, BITS, 1)                                      \
    GATHER_MLX_TILES(gather_matmul_tc_, gather_matmul_tc128, BITS, 2)                             \
    GATHER_MLX_TILES(gather_matmul_tc16_, gather_matmul_tc16, BITS, 4)
GATHER_MLX(2)
GATHER_MLX(3)
GATHER_MLX(4)
GATHER_MLX(5)
GATHER_MLX(6)
GATHER_MLX(8)

#define GATHER_DENSE_GATED_MATVEC(PREFIX, NORM, FT, NAME)                                         \
    extern "C" __global__ void __launch_bounds__(GMV_WARPS * 32)                                  \
        PREFIX##dense_##NAME(const float* x, const u32* ids, const void* w, const void* w_up,     \
                             float* out, int n, int k, int experts, int top_k, int act,           \
                             MATVEC_NORM_ARGS) {                                                  \
        kernel_entry();                                                                           \
        const Dense l{w, FT, k}, l_up{w_up, FT, k};                                               \
        gather_matvec<true, NORM>(l, l_up, x, MATVEC_PRE_NORM, ids, out, n, experts, top_k, 0,    \
                                  act);                                                           \
    }

#define GATHER_DENSE_MATVEC(FT, NAME)                                                             \
    extern "C" __global__ void __launch_bounds__(GMV_WARPS * 32)                                  \
        gather_matvec_dense_##NAME(const float* x, const u32* ids, const void* w, float* out,     \
                                   int n, int k, int experts, int top_k, int per_slot) {          \
        kernel_entry();                                                                           \
        const Dense l{w, FT, k};                                                                  \
        gather_matvec<false, false>(l, l, x, PreNorm{}, ids, out, n, experts, top_k, per_slot,    \
                                    0);                                                           \
    }                                                                                             \
    GATHER_DENSE_GATED_MATVEC(gather_matvec_gated_, false, FT, NAME)                              \
    GATHER_DENSE_GATED_MATVEC(gather_matvec_gated_norm_, true, FT, NAME)
GATHER_DENSE_MATVEC(FT_F32, f32)
GATHER_DENSE_MATVEC(FT_F16, f16)
GATHER_DENSE_MATVEC(FT_BF16, bf16)

#define GATHER_DENSE_TILES(PREFIX, FN, BLOCKS)                                                   \
    extern "C" __global__ void __launch_bounds__(256, BLOCKS)                                     \
        PREFIX##dense(const float* x, const int* offsets, const int* order, const void* w,        \
                      int weight_type, float* out, int n, int k, int experts, int top_k,          \
                      int per_slot) {                                                             \
        kernel_entry();                                                                           \
        const Dense l{w, weight_type, k};                                                         \
        FN<false>(l, l, x, offsets, order, out, n, top_k, per_slot, 0);                           \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, BLOCKS)                                     \
        PREFIX##gated_dense(const float* x, const int* offsets, const int* order, const void* w,  \
                            const void* w_up, int weight_type, float* out, int n, int k,          \
                            int experts, int top_k, int act) {                                    \
        kernel_entry();                                                                           \
        const Dense l{w, weight_type, k}, l_up{w_up, weight_type, k};                             \
        FN<true>(l, l_up, x, offsets, order, out, n, top_k, 0, act);                              \
    }
GATHER_DENSE_TILES(gather_matmul_, gather_matmul, 1)
GATHER_DENSE_TILES(gather_matmul_tc_, gather_matmul_tc128, 2)
GATHER_DENSE_TILES(gather_matmul_tc16_, gather_matmul_tc16, 4)
