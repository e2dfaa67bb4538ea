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
// XROWS > 1 (`matvec_rows_…`, short prompts: 2 to 8 rows of x, plain products only): block
// (·, y) multiplies rows y·XROWS … y·XROWS + XROWS − 1 of x (those past m recompute row m − 1
// and are not stored), each lane taking a unit of every x row against the same weight words,
// so the weights are read once for XROWS rows (their repeated loads are the same thread's, from
// L1) and the tiles' 64 or 128 padded rows are not computed.

#define MV_WARPS 4
// Blocks per SM the register budget must allow (≤ 128 registers a thread), so that a 4096-row
// matrix runs in one wave on a 132-SM GPU.
#define MV_MIN_BLOCKS 4

template <int ROWS, int UNITS, bool GATED, bool NORM, class L, bool PREFETCH = false,
          int XROWS = 1>
__device__ __forceinline__ void matvec(const L& l, const L& l_up, const float* __restrict__ x,
                                       const PreNorm norm, const void* __restrict__ bias,
                                       int bias_type, float* __restrict__ out,
                                       u16* __restrict__ out_h, int n, int kgroups, int act,
                                       int m = 1) {
    static_assert(XROWS == 1 || (!GATED && !NORM), "several x rows: plain products only");
    // GATED: up rows after the gate rows; NORM: Σx² in the last slot.
    constexpr int ROW_ACC = GATED ? 2 * ROWS : ROWS;
    constexpr int ACC = ROW_ACC + (NORM ? 1 : 0);
    __shared__ float partial[MV_WARPS][XROWS][ACC];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int slice = warp % kgroups;
    const int row0 = (blockIdx.x * (MV_WARPS / kgroups) + warp / kgroups) * ROWS;
    const int units = l.k / 32;
    // Rows past n (last block only) recompute row n−1 and are not stored.
    int rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = min(row0 + r, n - 1);
    // This block's x rows (XROWS > 1): offsets of x, clamped to the last row.
    const int xrow0 = blockIdx.y * XROWS;
    i64 x_at[XROWS];
#pragma unroll
    for (int t = 0; t < XROWS; ++t) x_at[t] = XROWS == 1 ? 0 : (i64)min(xrow0 + t, m - 1) * l.k;
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
    float acc[XROWS][ACC];
#pragma unroll
    for (int t = 0; t < XROWS; ++t)
#pragma unroll
        for (int r = 0; r < ACC; ++r) acc[t][r] = 0.f;
    for (int u0 = slice * 32 * UNROLL + lane; u0 < units; u0 += 32 * UNROLL * kgroups) {
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const int uj = u0 + 32 * j;
            const float keep = uj < units ? 1.f : 0.f;
            const int u = min(uj, units - 1);
#pragma unroll
            for (int t = 0; t < XROWS; ++t) {
                float xs[32];
                load_floats<32>(x + x_at[t] + u * 32, xs);
                if constexpr (NORM)
                    acc[t][ROW_ACC] = fmaf(keep, pre_norm_unit(norm, u, xs), acc[t][ROW_ACC]);
                float sx[2];
                prescale_unit<L>(xs, sx);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    acc[t][r] = fmaf(keep, l.dot(rows[r], u, xs, sx), acc[t][r]);
                    if constexpr (GATED)
                        acc[t][ROWS + r] =
                            fmaf(keep, l_up.dot(rows[r], u, xs, sx), acc[t][ROWS + r]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < XROWS; ++t)
#pragma unroll
        for (int r = 0; r < ACC; ++r) acc[t][r] = warp_sum(acc[t][r]);
    if (kgroups > 1) {
        if (lane == 0) {
#pragma unroll
            for (int t = 0; t < XROWS; ++t)
#pragma unroll
                for (int r = 0; r < ACC; ++r) partial[warp][t][r] = acc[t][r];
        }
        __syncthreads();
        if (slice != 0) return;
        for (int s = 1; s < kgroups; ++s) {
#pragma unroll
            for (int t = 0; t < XROWS; ++t)
#pragma unroll
                for (int r = 0; r < ACC; ++r) acc[t][r] += partial[warp + s][t][r];
        }
    }
    if (lane != 0) return;
#pragma unroll
    for (int t = 0; t < XROWS; ++t) {
        if (XROWS > 1 && xrow0 + t >= m) return;
        float* out_t = XROWS == 1 ? out : out + (i64)(xrow0 + t) * n;
        const float scale = NORM ? rsqrtf(acc[t][ROW_ACC] / l.k + norm.eps) : 1.f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = row0 + r;
            if (row >= n) continue;
            const float y = scale * acc[t][r];
            if constexpr (GATED) {
                out_t[row] = activation(y, act) * (scale * acc[t][ROWS + r]);
                store_half_copy(out_h, row, out_t[row]);
            } else
                out_t[row] = y + bias_v[r];
        }
    }
}
