// y = x·Wᵀ (+ bias) for a single row x (decode). A tile of rows is split among the block's warps:
// a group of `kgroups` warps (1, 2 or 4, matmul.rs picks) owns MV_ROWS rows (GATED: MV_ROWS/2
// rows of gate and of up) and splits their units of 32 elements; lane l of slice s takes unit
// 32·(kgroups·j + s) + l at step j, so a row's loads in one step are contiguous. The grid is
// at most as many blocks as fit on the GPU at once; each block walks tiles blockIdx.x,
// blockIdx.x + gridDim.x, ...
//
// x is staged in shared memory, pre-scaled for the layout (`shift` in layouts.cuh) with Σx of
// every half unit, MV_CHUNK units at a time: once per block when k fits one chunk, else per
// chunk of each tile. The inner loop then reads x with a few conflict-free shared loads per
// unit and warp instead of every warp re-reading and re-scaling it. The loop over (tile, step)
// is software-pipelined: a step's weights (every layout's `Frag`) are loaded while the
// previous step computes, so each warp keeps one step of loads in flight from its first step
// to its last, across tiles, and compute overlaps memory. Units past the row are clamped and
// masked; rows past n recompute row n−1 and are not stored; every warp of a block runs the
// same steps, which keeps the block's barriers uniform. Warp reductions, then shared memory
// across the group, finish each row. GATED stores act(x·gate)·(x·up).
// Launch: MV_WARPS·32 threads; grid and dynamic shared memory from matmul.rs (`MatvecPlan`);
// x 16-byte aligned.

#define MV_WARPS 4
#define MV_ROWS 4
// Units of x in shared memory at a time: 8192 elements, 34 KB with the half sums.
#define MV_CHUNK 256
// Blocks per SM the register budget must allow (≤ 128 registers a thread).
#define MV_MIN_BLOCKS 4

extern __shared__ float4 mv_shared[];

// Units [u0, u0 + count) of x into shared memory: unit v's float4 slot i at 8v + (i ^ (v & 7))
// (the lanes of a quarter warp read slot i of 8 consecutive units from distinct banks), each
// element times 2^−shift(e), and Σx of each half unit at sx[2v + half].
template <class L>
__device__ __forceinline__ void stage_x(const float* __restrict__ x, int u0, int count,
                                        float4* xs, float* sx) {
    constexpr int THREADS = MV_WARPS * 32, BATCH = 4;
    const float4* src = (const float4*)x + (i64)u0 * 8;
    const int total = count * 8;
    // BATCH loads in flight per thread before any is used; whole warps run every iteration
    // (the half sums are shuffles over 4 lanes).
    for (int f0 = threadIdx.x; f0 - (int)(threadIdx.x & 31) < total; f0 += BATCH * THREADS) {
        float4 v[BATCH];
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const int f = f0 + i * THREADS;
            v[i] = f < total ? src[f] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const int f = f0 + i * THREADS;
            float s = (v[i].x + v[i].y) + (v[i].z + v[i].w);
            s += __shfl_xor_sync(FULL_MASK, s, 1);
            s += __shfl_xor_sync(FULL_MASK, s, 2);
            const int unit = f >> 3, slot = f & 7, e = 4 * slot;
            v[i].x *= pow2_neg(L::shift(e));
            v[i].y *= pow2_neg(L::shift(e + 1));
            v[i].z *= pow2_neg(L::shift(e + 2));
            v[i].w *= pow2_neg(L::shift(e + 3));
            if (f < total) {
                xs[8 * unit + (slot ^ (unit & 7))] = v[i];
                if ((slot & 3) == 0) sx[2 * unit + (slot >> 2)] = s;
            }
        }
    }
}

template <bool GATED, class L>
__device__ __forceinline__ void matvec(const L& l, const L& l_up, const float* __restrict__ x,
                                       const void* __restrict__ bias, int bias_type,
                                       float* __restrict__ out, int n, int kgroups, int act) {
    constexpr int ROWS = GATED ? MV_ROWS / 2 : MV_ROWS;
    constexpr int ACC = GATED ? 2 * ROWS : ROWS;  // GATED: up rows after the gate rows
    typedef typename L::Frag Frag;
    __shared__ float partial[MV_WARPS][ACC];
    const int units = l.k / 32;
    float4* xs = mv_shared;
    float* sx = (float*)(mv_shared + 8 * min(units, MV_CHUNK));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slice = warp % kgroups, group = warp / kgroups;
    const int tile_rows = ROWS * (MV_WARPS / kgroups);
    const int tiles = (n + tile_rows - 1) / tile_rows;
    const int stride = 32 * kgroups;
    const int steps = (units + stride - 1) / stride;                   // per tile
    const int chunk_steps = MV_CHUNK / stride;
    const int total = (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x * steps;  // this block's
    const int first_row = group * ROWS;

    // Flat step g: tile blockIdx.x + (g / steps)·gridDim.x, step g % steps of it.
    auto row0_of = [&](int g) {
        return (blockIdx.x + g / steps * gridDim.x) * tile_rows + first_row;
    };
    auto fetch = [&](Frag* f, int g) {
        g = min(g, total - 1);  // past the end: the last step again (never computed)
        const int row0 = row0_of(g);
        const int u = min(g % steps * stride + 32 * slice + lane, units - 1);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            l.fetch(min(row0 + r, n - 1), u, f[r]);
            if constexpr (GATED) l_up.fetch(min(row0 + r, n - 1), u, f[ROWS + r]);
        }
    };
    float acc[ACC];
#pragma unroll
    for (int r = 0; r < ACC; ++r) acc[r] = 0.f;
    auto step = [&](const Frag* f, int g) {
        const int j = g % steps;
        if (j % chunk_steps == 0 && (g == 0 || units > MV_CHUNK)) {
            if (g > 0) __syncthreads();  // every warp is done with the previous chunk
            const int u0 = j / chunk_steps * MV_CHUNK;
            stage_x<L>(x, u0, min(units - u0, MV_CHUNK), xs, sx);
            __syncthreads();
        }
        const int uj = j * stride + 32 * slice + lane;
        const float keep = uj < units ? 1.f : 0.f;
        const int v = min(uj, units - 1) % MV_CHUNK;  // unit within the staged chunk
        float part[ACC][2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float xh[16];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float4 t = xs[8 * v + ((4 * h + i) ^ (v & 7))];
                xh[4 * i] = t.x; xh[4 * i + 1] = t.y; xh[4 * i + 2] = t.z; xh[4 * i + 3] = t.w;
            }
#pragma unroll
            for (int r = 0; r < ACC; ++r) part[r][h] = (r < ROWS ? l : l_up).half_dot(f[r], h, xh);
        }
        const float2 s = ((const float2*)sx)[v];
#pragma unroll
        for (int r = 0; r < ACC; ++r) {
            const float d = (r < ROWS ? l : l_up).finish(f[r], part[r][0], part[r][1], s.x, s.y);
            acc[r] = fmaf(keep, d, acc[r]);
        }
        if (j + 1 < steps) return;
        // The tile's last step: reduce and store its rows.
#pragma unroll
        for (int r = 0; r < ACC; ++r) acc[r] = warp_sum(acc[r]);
        if (kgroups > 1) {
            if (lane == 0) {
#pragma unroll
                for (int r = 0; r < ACC; ++r) partial[warp][r] = acc[r];
            }
            __syncthreads();
            if (slice == 0) {
                for (int t = 1; t < kgroups; ++t) {
#pragma unroll
                    for (int r = 0; r < ACC; ++r) acc[r] += partial[warp + t][r];
                }
            }
            __syncthreads();  // `partial` is free for the next tile
        }
        if (slice == 0 && lane == 0) {
            const int row0 = row0_of(g);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int row = row0 + r;
                if (row >= n) continue;
                if constexpr (GATED)
                    out[row] = activation(acc[r], act) * acc[ROWS + r];
                else
                    out[row] = bias ? acc[r] + load_float(bias, row, bias_type) : acc[r];
            }
        }
#pragma unroll
        for (int r = 0; r < ACC; ++r) acc[r] = 0.f;
    };

    // Two register sets of a step's Frags, used in turn; the first loads go out before x is
    // staged.
    Frag a[ACC], b[ACC];
    fetch(a, 0);
    for (int g = 0; g < total; g += 2) {
        fetch(b, g + 1);
        step(a, g);
        if (g + 1 >= total) break;
        fetch(a, g + 2);
        step(b, g + 1);
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
