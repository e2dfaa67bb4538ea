// Expert-indexed ("gathered") products over stacked experts [E, n, k], read as one [E·n, k]
// matrix of a layouts.cuh layout L: row r of expert e is row e·n + r. The kernels that
// instantiate them per layout: moe.cu (MLX affine, dense) and moe_ggml.cu (ggml blocks).

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
        float sx[2];
        prescale_unit<L>(xs, sx);
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
// layout but f32 weights): per expert, tiles of BM of its slots (128, or 16 where the experts
// hold a few slots each). Block (x, y, e): tiles y, y + gridDim.y, … of expert e's slots. A
// tile's x rows are its slots' (or their tokens') rows, its results go to those slots' rows of
// out. GATED: a warp's 32 weight rows are 16 gate rows and then the up rows of the same
// outputs, so n8 blocks j and j + 2 of a thread's accumulators are gate and up of one output,
// stored as act(gate)·up: 64 output columns a block (128 without GATED). Needs k % 4 == 0 and
// x 16-byte aligned. Launch: 256 threads.
// Either tile dequantizes each selected expert's weights once a tile, and that (not the mma)
// is its time: the loads of a k step are waited for before the step's mma, ~0.9 TB/s. H200,
// 2026-11-28, Qwen3-30B-A3B MLX 4-bit prefill, 128-slot → 16-slot tiles: 256 tokens 7,522 →
// 8,235 tok/s; 128 tokens unchanged (gated 240 → 258 µs a layer, plain 120 → 100), 1,024
// tokens (64 slots an expert, four 16-slot tiles) 16,046 → 12,716. Requesting the weights
// four steps ahead towards L2 lost 6–8%.
template <int BM, bool GATED, class L>
__device__ __forceinline__ void gather_matmul_tc(const L& l, const L& l_up,
                                                 const float* __restrict__ x,
                                                 const int* __restrict__ offsets,
                                                 const int* __restrict__ order,
                                                 float* __restrict__ out, int n, int top_k,
                                                 int per_slot, int act) {
    __shared__ int slot_of[BM], x_row_of[BM];
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
    for (int t0 = blockIdx.y * BM; t0 < count; t0 += gridDim.y * BM) {
        __syncthreads();  // the previous tile's stores are done with slot_of
        // Tile rows from `rows` on repeat the last slot; they are not stored.
        const int rows = count - t0;
        if (threadIdx.x < BM) {
            const int s = order[begin + t0 + min((int)threadIdx.x, rows - 1)];
            slot_of[threadIdx.x] = s;
            x_row_of[threadIdx.x] = per_slot ? s : s / top_k;
        }
        __syncthreads();
        float acc[TcShape<BM>::MI][4][4];
        tc_accumulate<BM>(x, x_row, w_tile, k, 0, (k + TC_BK - 1) / TC_BK, acc);
        if constexpr (GATED) {
            if (!tc_holds_outputs<BM>()) continue;
            // A warp's 16 outputs: the columns of its n8 blocks 0 and 1.
            const int c0 = n0 + ((threadIdx.x >> 5) & 3) * 16;
#pragma unroll
            for (int i = 0; i < TcShape<BM>::MI; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const int r = tc_row<BM>(i, q), col = c0 + (tc_col(j, q) & 31);
                        if (r < rows && col < n)
                            out[(i64)slot_of[r] * n + col] =
                                activation(acc[i][j][q], act) * acc[i][j + 2][q];
                    }
        } else {
            tc_outputs<BM>(acc, [&](int r, int c, float v) {
                const int col = n0 + c;
                if (r < rows && col < n) out[(i64)slot_of[r] * n + col] = v;
            });
        }
    }
}

// The kernels' tile functions by name: FN<GATED>(…) for FN the SIMT `gather_matmul`, or these.
template <bool GATED, class L, class... A>
__device__ __forceinline__ void gather_matmul_tc128(const L& l, const L& l_up, A... a) {
    gather_matmul_tc<TC_BM, GATED>(l, l_up, a...);
}
template <bool GATED, class L, class... A>
__device__ __forceinline__ void gather_matmul_tc16(const L& l, const L& l_up, A... a) {
    gather_matmul_tc<16, GATED>(l, l_up, a...);
}
