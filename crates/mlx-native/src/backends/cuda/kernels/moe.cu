// Mixture-of-experts kernels: routing, expert-indexed ("gathered") products and the weighted
// combine. Stacked experts [E, n, k] are read as one [E·n, k] matrix of a layouts.cuh layout:
// row r of expert e is row e·n + r. Expert ids come from a device buffer (written by
// moe_route), so a captured graph replays with each token's own routing; ids past the last
// expert are clamped to it.

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
        float acc = 0.f;
        for (int j = 0; j < top_k; ++j) acc += w[row * top_k + j] * y[(row * top_k + j) * n + c];
        out[i] = residual[i] + acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Decode: one slot's product per blockIdx.y, a warp per GMV_ROWS output rows of its expert,
// lanes over the units of 32 elements (layouts.cuh `dot`, x pre-scaled as the matvec does).
// GATED computes the expert's gate and up rows side by side and stores act(gate)·up. x row of
// a slot: the slot itself with `per_slot` (x [m·top_k, k]), else its token (x [m, k]); 16-byte
// aligned. NORM takes x through an RMSNorm first as matvec.cu's NORM does: x·(g + g_offset)
// as it is loaded, Σx² on the way (each warp covers all of k), the row sums scaled by
// r = rsqrt(mean(x²) + eps) at the end, so the MoE block's input norm needs no launch.
// Launch: GMV_WARPS·32 threads, grid (ceil(n / (GMV_WARPS·GMV_ROWS)), m·top_k).

#define GMV_WARPS 4
#define GMV_ROWS 4

template <bool GATED, bool NORM, class L>
__device__ __forceinline__ void gather_matvec(const L& l, const L& l_up, const float* __restrict__ x,
                                              const PreNorm norm, const u32* __restrict__ ids,
                                              float* __restrict__ out, int n, int experts,
                                              int top_k, int per_slot, int act) {
    // GATED: up rows after the gate rows; NORM: Σx² in the last slot.
    constexpr int ROW_ACC = GATED ? 2 * GMV_ROWS : GMV_ROWS;
    constexpr int ACC = ROW_ACC + (NORM ? 1 : 0);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slot = blockIdx.y;
    const int r0 = (blockIdx.x * GMV_WARPS + warp) * GMV_ROWS;
    if (r0 >= n) return;  // the whole warp
    const int e = min((int)ids[slot], experts - 1);
    const float* xr = x + (i64)(per_slot ? slot : slot / top_k) * l.k;
    const int units = l.k / 32;
    int rows[GMV_ROWS];
#pragma unroll
    for (int r = 0; r < GMV_ROWS; ++r) rows[r] = e * n + min(r0 + r, n - 1);
    float acc[ACC];
#pragma unroll
    for (int r = 0; r < ACC; ++r) acc[r] = 0.f;
    for (int u = lane; u < units; u += 32) {
        float xs[32];
        load_floats<32>(xr + u * 32, xs);
        if constexpr (NORM) acc[ROW_ACC] += pre_norm_unit(norm, u, xs);
        float sx[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            sx[i >> 4] += xs[i];
            xs[i] *= pow2_neg(L::shift(i));
        }
#pragma unroll
        for (int r = 0; r < GMV_ROWS; ++r) {
            acc[r] += l.dot(rows[r], u, xs, sx);
            if constexpr (GATED) acc[GMV_ROWS + r] += l_up.dot(rows[r], u, xs, sx);
        }
    }
#pragma unroll
    for (int r = 0; r < ACC; ++r) acc[r] = warp_sum(acc[r]);
    if (lane != 0) return;
    const float scale = NORM ? rsqrtf(acc[ROW_ACC] / l.k + norm.eps) : 1.f;
#pragma unroll
    for (int r = 0; r < GMV_ROWS; ++r) {
        if (r0 + r >= n) continue;
        float* o = out + (i64)slot * n + r0 + r;
        if constexpr (GATED)
            *o = activation(scale * acc[r], act) * (scale * acc[GMV_ROWS + r]);
        else
            *o = scale * acc[r];
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill: the slots grouped by expert (moe_bucket), then per expert tiles over the rows of x
// its slots select: on tensor cores (`gather_matmul_tc`, below), or (f32 weights, x not
// float4-aligned, under 17 tokens) matmul.cu's scheme of 64×64 output tiles (256 threads, 4×4
// outputs each, k in steps of 32 through shared memory). Each selected expert's weights are thus read once per
// tile of its slots rather than once per slot.

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

#define GMM_BM 64
#define GMM_BN 64
#define GMM_BK 32

// Block (x, y, e): columns 64·x.., tiles y, y + gridDim.y, … of expert e's slots.
template <bool GATED, class L>
__device__ __forceinline__ void gather_matmul(const L& l, const L& l_up, const float* __restrict__ x,
                                              const int* __restrict__ offsets,
                                              const int* __restrict__ order,
                                              float* __restrict__ out, int n, int top_k,
                                              int per_slot, int act) {
    __shared__ __align__(16) float xs[GMM_BK][GMM_BM + 4];
    __shared__ __align__(16) float ws[GATED ? 2 : 1][GMM_BK][GMM_BN + 4];
    __shared__ int slot_of[GMM_BM];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int e = blockIdx.z, n0 = blockIdx.x * GMM_BN, k = l.k;
    const int begin = offsets[e], count = offsets[e + 1] - begin;
    for (int t0 = blockIdx.y * GMM_BM; t0 < count; t0 += gridDim.y * GMM_BM) {
        __syncthreads();  // the previous tile is done with slot_of
        if (tid < GMM_BM) slot_of[tid] = t0 + tid < count ? order[begin + t0 + tid] : -1;
        __syncthreads();
        float acc[GATED ? 2 : 1][4][4];
#pragma unroll
        for (int g = 0; g < (GATED ? 2 : 1); ++g)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[g][i][j] = 0.f;
        for (int k0 = 0; k0 < k; k0 += GMM_BK) {
            {
                const int r = tid >> 2, c = (tid & 3) * 8, s = slot_of[r];
                const i64 row = s < 0 ? -1 : per_slot ? s : s / top_k;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const int kk = k0 + c + i;
                    xs[c + i][r] = row >= 0 && kk < k ? x[row * k + kk] : 0.f;
                }
            }
            // Threads 0..63 stage the gate (or only) weight tile, 64..127 the up tile.
            if (tid < (GATED ? 2 : 1) * GMM_BN) {
                const int g = tid / GMM_BN, c = tid % GMM_BN;
                float w[32];
                // Columns past n stage row n−1; their outputs are never stored.
                (g == 0 ? l : l_up).tile(e * n + min(n0 + c, n - 1), k0, w);
#pragma unroll
                for (int i = 0; i < 32; ++i) ws[g][i][c] = w[i];
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < GMM_BK; ++kk) {
                const float4 a = *(const float4*)&xs[kk][ty * 4];
                const float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                for (int g = 0; g < (GATED ? 2 : 1); ++g) {
                    const float4 b = *(const float4*)&ws[g][kk][tx * 4];
                    const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int j = 0; j < 4; ++j) acc[g][i][j] = fmaf(av[i], bv[j], acc[g][i][j]);
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int s = slot_of[ty * 4 + i];
            if (s < 0) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = n0 + tx * 4 + j;
                if (col >= n) continue;
                float v = acc[0][i][j];
                if constexpr (GATED) v = activation(v, act) * acc[GATED ? 1 : 0][i][j];
                out[(i64)s * n + col] = v;
            }
        }
    }
}

// The same groups of slots on tensor cores (tiles_tc.cuh), for operands f16 can carry (every
// layout but f32 weights): per expert, tiles of 128 of its slots. Block (x, y, e): tiles y,
// y + gridDim.y, … of expert e's slots. A tile's x rows are its slots' (or their tokens') rows,
// its results go to those slots' rows of out. GATED: a warp's 32 weight rows are 16 gate rows
// and then the up rows of the same outputs, so n8 blocks j and j + 2 of a thread's
// accumulators are gate and up of one output, stored as act(gate)·up: 64 output columns a
// block (128 without GATED). Needs k % 4 == 0 and x 16-byte aligned. Launch: 256 threads.
template <bool GATED, class L>
__device__ __forceinline__ void gather_matmul_tc(const L& l, const L& l_up,
                                                 const float* __restrict__ x,
                                                 const int* __restrict__ offsets,
                                                 const int* __restrict__ order,
                                                 float* __restrict__ out, int n, int top_k,
                                                 int per_slot, int act) {
    __shared__ int slot_of[TC_BM], x_row_of[TC_BM];
    const int e = blockIdx.z, k = l.k;
    const int n0 = blockIdx.x * (GATED ? TC_BN / 2 : TC_BN);
    const int begin = offsets[e], count = offsets[e + 1] - begin;
    const auto x_row = [&](int r) { return x_row_of[r]; };
    const auto w_tile = [&](int r, int k0, float* w) {
        if constexpr (GATED) {
            // r & 16 is uniform across a warp's loads (tc_load_w: 16 tile rows a warp).
            const int col = min(n0 + 16 * (r >> 5) + (r & 15), n - 1);
            if (r & 16) l_up.tile(e * n + col, k0, w);
            else l.tile(e * n + col, k0, w);
        } else {
            l.tile(e * n + min(n0 + r, n - 1), k0, w);
        }
    };
    for (int t0 = blockIdx.y * TC_BM; t0 < count; t0 += gridDim.y * TC_BM) {
        __syncthreads();  // the previous tile's stores are done with slot_of
        // Tile rows from `rows` on repeat the last slot; they are not stored.
        const int rows = count - t0;
        if (threadIdx.x < TC_BM) {
            const int s = order[begin + t0 + min((int)threadIdx.x, rows - 1)];
            slot_of[threadIdx.x] = s;
            x_row_of[threadIdx.x] = per_slot ? s : s / top_k;
        }
        __syncthreads();
        float acc[4][4][4];
        tc_accumulate(x, x_row, w_tile, k, 0, (k + TC_BK - 1) / TC_BK, acc);
        if constexpr (GATED) {
            // A warp's 16 outputs: the columns of its n8 blocks 0 and 1.
            const int c0 = n0 + ((threadIdx.x >> 5) & 3) * 16;
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const int r = tc_row(i, q), col = c0 + (tc_col(j, q) & 31);
                        if (r < rows && col < n)
                            out[(i64)slot_of[r] * n + col] =
                                activation(acc[i][j][q], act) * acc[i][j + 2][q];
                    }
        } else {
            tc_outputs(acc, [&](int r, int c, float v) {
                const int col = n0 + c;
                if (r < rows && col < n) out[(i64)slot_of[r] * n + col] = v;
            });
        }
    }
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
    GATHER_MLX_MATVEC(BITS, FT_F32, f32)                                                          \
    GATHER_MLX_MATVEC(BITS, FT_F16, f16)                                                          \
    GATHER_MLX_MATVEC(BITS, FT_BF16, bf16)                                                        \
    GATHER_MLX_TILES(gather_matmul_, gather_matmul, BITS, 1)                                      \
    GATHER_MLX_TILES(gather_matmul_tc_, gather_matmul_tc, BITS, 2)
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
GATHER_DENSE_TILES(gather_matmul_tc_, gather_matmul_tc, 2)
