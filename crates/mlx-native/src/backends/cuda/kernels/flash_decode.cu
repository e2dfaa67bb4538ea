// Decode attention on tensor cores over f16 caches (compiled after attention.cu: NewKeys,
// key_range, cap_score, rope.cuh), for one query row and a GQA group of 2 to 8 heads at head
// dim HD = 64 or 128. A block takes the group's heads over a split of the keys, so each K/V
// row is read once for all of them; its warps take 16 keys a step (FD_STEP), from warp 0 up.
// In a step S = Q·Kᵀ and O += P·V are m16n8k16 mma with f32 accumulators, the group's heads as
// the rows (lane/4 = head r; rows r + 8 stay zero), and the online softmax runs on the S
// fragments in f32, each head's row held by the 4 lanes of a quad. q·scale and p are rounded
// to f16 (unit roundoff 2^−11), as in the flash prefill. Thread c of a quad owns head dims
// [c·HD/4, (c+1)·HD/4) of q·k's sum, of the K rows it loads and of its output (the mma's k
// and n orders permuted to match), so that every K and V load is a 16-byte vector:
// - S's k-step s takes dims c·HD/4 + 4s + {0,1} as the fragment's k = 2c, 2c+1 and + {2,3}
//   as k = 2c+8, 2c+9: a thread's A (q) and B (K row lane/4) registers are consecutive words.
// - P·V's n-tile u takes dim (HD/8)·n + u as column n: the lane loads V rows 2c, 2c+1, 2c+8,
//   2c+9 of the step at dims [(HD/8)·(lane/4), +HD/8) and pairs their halves (`__byte_perm`).
// The prologue (q's rotation, head norms and staging, the new key's store), the split rule
// (`splits_by_keys` with the planner's arguments: every row, FLASH_DECODE_MIN_SPLIT_KEYS a
// split, from one wave of blocks at capture) and the merges (warps in shared memory, splits
// through partials counted on a counter per kv head) follow attn_decode's.

#define FD_WARPS 8
#define FD_STEP 16
#define FD_MAX_GROUP 8

// A step's K rows (lane/4 and 8 + lane/4 of the step: HD/4 halves each) and V rows (2c,
// 2c+1, 2c+8, 2c+9: HD/8 halves each), the lane's dims of each as 16-byte words; rows at or
// past `end` repeat row end − 1 (their scores are masked, so their p is 0).
template <int HD>
struct FdRows {
    uint4 k[2][HD / 32];
    uint4 v[4][HD / 64];
};

__device__ __forceinline__ int fd_key_row(int j0, int t, int r, int end) {
    return min(j0 + 8 * t + r, end - 1);
}

__device__ __forceinline__ int fd_val_row(int j0, int i, int c, int end) {
    return min(j0 + 2 * c + (i & 1) + (i >> 1) * 8, end - 1);
}

template <int HD>
__device__ __forceinline__ void fd_load(const u16* kb, const u16* vb, int j0, int end, int lane,
                                        FdRows<HD>& rows) {
    const int r = lane >> 2, c = lane & 3;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
        const uint4* p = (const uint4*)(kb + (i64)fd_key_row(j0, t, r, end) * HD + c * HD / 4);
#pragma unroll
        for (int w = 0; w < HD / 32; ++w) rows.k[t][w] = p[w];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint4* p = (const uint4*)(vb + (i64)fd_val_row(j0, i, c, end) * HD + r * HD / 8);
#pragma unroll
        for (int w = 0; w < HD / 64; ++w) rows.v[i][w] = p[w];
    }
}

// Word w (dims 2w, 2w+1 of the lane's run) of a row held as uint4s.
__device__ __forceinline__ u32 fd_word(const uint4* q, int w) {
    const uint4 x = q[w >> 2];
    const int e = w & 3;
    return e == 0 ? x.x : e == 1 ? x.y : e == 2 ? x.z : x.w;
}

// The new key's row (stored by this block's prologue, as rounded) wherever the step's rows
// are at position p0: the step's loads were issued before the kernel wrote it.
template <int HD>
__device__ __forceinline__ void fd_patch_new(FdRows<HD>& rows, const u16* new_k, const u16* new_v,
                                             int j0, int end, int p0, int lane) {
    const int r = lane >> 2, c = lane & 3;
    const uint4* nk = (const uint4*)(new_k + c * HD / 4);
    const uint4* nv = (const uint4*)(new_v + r * HD / 8);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
        const bool at = fd_key_row(j0, t, r, end) == p0;
#pragma unroll
        for (int w = 0; w < HD / 32; ++w) rows.k[t][w] = at ? nk[w] : rows.k[t][w];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const bool at = fd_val_row(j0, i, c, end) == p0;
#pragma unroll
        for (int w = 0; w < HD / 64; ++w) rows.v[i][w] = at ? nv[w] : rows.v[i][w];
    }
}

// One step: the scores of keys j0 … j0+15 (those past `end` masked), the online softmax update
// of (m, l) and acc (n-tile u: acc[u][0], acc[u][1] at dims (HD/8)·2c + u and (HD/8)·(2c+1) + u).
template <int HD>
__device__ __forceinline__ void fd_step(const u32 (&qa)[HD / 16][2], const FdRows<HD>& rows,
                                        int j0, int end, int lane, float softcap, float& m,
                                        float& l, float (&acc)[HD / 8][2]) {
    const int c = lane & 3;
    float s[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[t][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
            const u32 a[4] = {qa[ks][0], 0u, qa[ks][1], 0u};
            const u32 b[2] = {fd_word(rows.k[t], 2 * ks), fd_word(rows.k[t], 2 * ks + 1)};
            mma_f16(s[t], a, b);
        }
    }
    float mx = NEG_INF;
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int key = j0 + 8 * t + 2 * c + e;
            s[t][e] = key < end ? cap_score(s[t][e], softcap) : NEG_INF;
            mx = fmaxf(mx, s[t][e]);
        }
    mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
    const float m_new = fmaxf(m, mx);  // finite: key j0 < end
    const float corr = expf(m - m_new);
    float p[2][2], sum = 0.f;
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            p[t][e] = expf(s[t][e] - m_new);
            sum += p[t][e];
        }
    sum += __shfl_xor_sync(FULL_MASK, sum, 1);
    sum += __shfl_xor_sync(FULL_MASK, sum, 2);
    l = l * corr + sum;
    m = m_new;
    const u32 pa[4] = {pack_f16x2(p[0][0], p[0][1]), 0u, pack_f16x2(p[1][0], p[1][1]), 0u};
#pragma unroll
    for (int u = 0; u < HD / 8; ++u) {
        // Column n = lane/4 of n-tile u is dim (HD/8)·n + u: element u of the lane's V runs.
        const int w = u >> 1;
        const u32 sel = (u & 1) ? 0x7632 : 0x5410;
        const u32 b[2] = {__byte_perm(fd_word(rows.v[0], w), fd_word(rows.v[1], w), sel),
                          __byte_perm(fd_word(rows.v[2], w), fd_word(rows.v[3], w), sel)};
        float d[4] = {acc[u][0] * corr, acc[u][1] * corr, 0.f, 0.f};
        mma_f16(d, pa, b);
        acc[u][0] = d[0];
        acc[u][1] = d[1];
    }
}

// Dim d of a head's output from its n_splits partials (max, sum, acc[…]) at base, `stride`
// floats apart, read MERGE_LOADS splits at a time past L1 (other blocks wrote them): one round
// trip to L2 for up to MERGE_LOADS splits (attn_decode writes the same loop out).
__device__ __forceinline__ float merge_splits(const float* base, int stride, int n_splits,
                                              int d) {
    constexpr int MERGE_LOADS = 16;
    float m_all = NEG_INF, l_all = 0.f, merged = 0.f;
    for (int s0 = 0; s0 < n_splits; s0 += MERGE_LOADS) {
        float ms[MERGE_LOADS], ls[MERGE_LOADS], as[MERGE_LOADS];
#pragma unroll
        for (int i = 0; i < MERGE_LOADS; ++i) {
            const float* ps = base + min(s0 + i, n_splits - 1) * stride;
            ms[i] = __ldcg(ps);
            ls[i] = __ldcg(ps + 1);
            as[i] = __ldcg(ps + 2 + d);
        }
        float m_new = m_all;
#pragma unroll
        for (int i = 0; i < MERGE_LOADS; ++i) m_new = fmaxf(m_new, ms[i]);  // repeats: no change
        const float corr = m_all == NEG_INF ? 0.f : expf(m_all - m_new);
        l_all *= corr;
        merged *= corr;
#pragma unroll
        for (int i = 0; i < MERGE_LOADS; ++i) {
            const float wt = s0 + i >= n_splits || ms[i] == NEG_INF ? 0.f : expf(ms[i] - m_new);
            l_all = fmaf(ls[i], wt, l_all);
            merged = fmaf(as[i], wt, merged);
        }
        m_all = m_new;
    }
    return l_all > 0.f ? merged / l_all : 0.f;
}

template <int HD>
__device__ __forceinline__ void flash_decode(const float* __restrict__ q, const NewKeys nk,
                                             u16* kc, u16* vc, const u32* __restrict__ pos,
                                             float* __restrict__ out, u16* __restrict__ out_h,
                                             float* __restrict__ partial,
                                             u32* __restrict__ counters, int group, int capacity,
                                             float scale, int window, float softcap,
                                             int split_min_keys, int split_shift) {
    constexpr int SLOTS = FD_WARPS * 32 / HD;  // heads the prologue takes a round
    // Rows padded (q by 16 bytes, the warps' acc by a float every 32) so that a warp's
    // fragment reads of q and its acc stores, whose lanes' dims are 32c (+u) or 16c apart,
    // fall on distinct banks.
    constexpr int QLD = HD + 8, ALD = HD + HD / 32;
    __shared__ __align__(16) u16 qs[FD_MAX_GROUP][QLD], new_k[HD], new_v[HD];
    __shared__ __align__(16) float wacc[FD_WARPS][FD_MAX_GROUP][ALD];
    __shared__ float wm[FD_WARPS][FD_MAX_GROUP], wl[FD_WARPS][FD_MAX_GROUP];
    __shared__ float sums[FD_MAX_GROUP + 1][HD / 32];  // head norms: q's heads, then k
    const int g = blockIdx.x, split = blockIdx.y, h0 = g * group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, c = lane & 3;
    const int d = threadIdx.x % HD, slot = threadIdx.x / HD;
    const i64 kv_base = (i64)g * capacity * HD;
    const u32 p0 = pos[0];
    const bool rot = nk.k != nullptr, normed = nk.q_norm != nullptr;
    const float freq = rot ? rope_dim_freq(d, nk.inv_freq, nk.rotary_dims, nk.traditional) : 0.f;
    int lo, hi;
    key_range((int)p0, capacity, window, lo, hi);
    const int n_splits =
        max(1, min((int)gridDim.y, splits_by_keys(hi - lo, split_min_keys, split_shift)));
    if (split >= n_splits) return;
    int per = hi - lo;
    if (n_splits > 1) per = (per + n_splits - 1) / n_splits;
    const int start = lo + split * per, end = min(hi, start + per);
    const u16* kb = kc + kv_base;
    const u16* vb = vc + kv_base;
    // Each warp's first step of rows is loaded before the wait (old keys: no kernel of a step
    // rewrites them; the new key's row is patched after the prologue stores it), later ones
    // head for L2.
    const int j_first = start + warp * FD_STEP;
    FdRows<HD> rows;
    if (j_first < end) fd_load<HD>(kb, vb, j_first, end, lane, rows);
    for (int j = start + FD_WARPS * FD_STEP + threadIdx.x; j < end; j += FD_WARPS * 32) {
        prefetch_l2(kb + (i64)j * HD);  // a row's 128-byte lines: one at HD 64, two at 128
        prefetch_l2(kb + (i64)j * HD + HD - 1);
        prefetch_l2(vb + (i64)j * HD);
        prefetch_l2(vb + (i64)j * HD + HD - 1);
    }
    const int dp = rot ? rope_partner(d, nk.rotary_dims, nk.traditional) : d;
    float cs = 1.f, sn = 0.f;
    if (rot) rope_dim_freq_cos_sin(d, freq, p0, nk.rotary_dims, nk.mscale, cs, sn);
    const NormWeights nw(nk, normed, d, dp);
    kernel_entry();
    launch_dependents();
    // Prologue: thread (slot, d) stages dim d of heads h0 + i, i = slot + k·SLOTS, as f16
    // q·scale (rows past the group zero), all its loads issued at once; slot 0 of the split
    // that holds p0 also rotates the new key and stores it.
    constexpr int ROUNDS = FD_MAX_GROUP / SLOTS;
    const bool holds_new = rot && (int)p0 >= start && (int)p0 < end;
    const bool key = holds_new && slot == 0;
    float qd[ROUNDS], qp[ROUNDS], kd = 0.f, kp = 0.f, vd = 0.f;
#pragma unroll
    for (int k = 0; k < ROUNDS; ++k) {
        const int i = slot + k * SLOTS;
        const float* qr = q + (i64)(h0 + min(i, group - 1)) * HD;
        qd[k] = i < group ? qr[d] : 0.f;
        qp[k] = i < group && rot ? qr[dp] : 0.f;
    }
    if (key) {
        kd = nk.k[(i64)g * HD + d];
        kp = nk.k[(i64)g * HD + dp];
        vd = nk.v[(i64)g * HD + d];
    }
    if (normed) {  // block-uniform
#pragma unroll
        for (int k = 0; k < ROUNDS; ++k) {
            const float sq = warp_sum(qd[k] * qd[k]);
            if (lane == 0) sums[slot + k * SLOTS][d >> 5] = sq;
        }
        const float sk = warp_sum(kd * kd);
        if (lane == 0 && slot == 0) sums[FD_MAX_GROUP][d >> 5] = sk;
        __syncthreads();
        float ssk = 0.f;
#pragma unroll
        for (int w = 0; w < HD / 32; ++w) ssk += sums[FD_MAX_GROUP][w];
        const float rk = rsqrtf(ssk / HD + nk.eps);
        kd *= rk * nw.kd;
        kp *= rk * nw.kp;
#pragma unroll
        for (int k = 0; k < ROUNDS; ++k) {
            float sq = 0.f;
#pragma unroll
            for (int w = 0; w < HD / 32; ++w) sq += sums[slot + k * SLOTS][w];
            const float rq = rsqrtf(sq / HD + nk.eps);
            qd[k] *= rq * nw.qd;
            qp[k] *= rq * nw.qp;
        }
    }
#pragma unroll
    for (int k = 0; k < ROUNDS; ++k) {
        const int i = slot + k * SLOTS;
        const float x = rot ? rope_apply(qd[k], qp[k], d, cs, sn, nk.rotary_dims, nk.traditional)
                            : qd[k];
        qs[i][d] = i < group ? f32_to_f16(x * scale) : 0;
    }
    if (key) {
        const u16 kr = f32_to_f16(rope_apply(kd, kp, d, cs, sn, nk.rotary_dims, nk.traditional));
        const u16 vr = f32_to_f16(vd);
        const i64 to = kv_base + (i64)p0 * HD + d;
        kc[to] = kr;
        vc[to] = vr;
        new_k[d] = kr;
        new_v[d] = vr;
    }
    __syncthreads();  // q staged, the new key stored (and visible to the block)

    // q's A fragments (row r; rows r + 8 are zero): k-step s holds dims c·HD/4 + 4s … + 3.
    u32 qa[HD / 16][2];
    const u32* qw = (const u32*)&qs[r][c * HD / 4];  // 16-byte aligned: QLD and HD/4 halves
#pragma unroll
    for (int s = 0; s < HD / 16; ++s) {
        qa[s][0] = qw[2 * s];
        qa[s][1] = qw[2 * s + 1];
    }
    float m = NEG_INF, l = 0.f, acc[HD / 8][2];
#pragma unroll
    for (int u = 0; u < HD / 8; ++u) acc[u][0] = acc[u][1] = 0.f;
    for (int j0 = j_first; j0 < end; j0 += FD_WARPS * FD_STEP) {
        if (j0 != j_first) fd_load<HD>(kb, vb, j0, end, lane, rows);
        else if (holds_new && j0 + FD_STEP > (int)p0)
            fd_patch_new<HD>(rows, new_k, new_v, j0, end, (int)p0, lane);
        fd_step<HD>(qa, rows, j0, end, lane, softcap, m, l, acc);
    }
    // The warps' (m, l, acc) of each head into shared memory (warps without keys: −inf, 0, 0).
    if (c == 0) {
        wm[warp][r] = m;
        wl[warp][r] = l;
    }
#pragma unroll
    for (int u = 0; u < HD / 8; ++u) {
        const int d0 = (HD / 8) * 2 * c + u, d1 = d0 + HD / 8;
        wacc[warp][r][d0 + d0 / 32] = acc[u][0];
        wacc[warp][r][d1 + d1 / 32] = acc[u][1];
    }
    __syncthreads();
    // Thread t merges (head i, dim dd) = (t / HD + k·SLOTS, t % HD) over the warps.
    const int stride = HD + 2;
    for (int i = slot; i < group; i += SLOTS) {
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < FD_WARPS; ++w) mx = fmaxf(mx, wm[w][i]);
        float a = 0.f, sum = 0.f;
#pragma unroll
        for (int w = 0; w < FD_WARPS; ++w) {
            const float wt = wm[w][i] == NEG_INF ? 0.f : expf(wm[w][i] - mx);
            sum = fmaf(wl[w][i], wt, sum);
            a = fmaf(wacc[w][i][d + d / 32], wt, a);
        }
        const i64 o_at = (i64)(h0 + i) * HD + d;
        if (n_splits == 1) {
            out[o_at] = sum > 0.f ? a / sum : 0.f;
            store_half_copy(out_h, o_at, out[o_at]);
        } else {
            float* base = partial + ((i64)(h0 + i) * gridDim.y + split) * stride;
            base[2 + d] = a;
            if (d == 0) {
                base[0] = mx;
                base[1] = sum;
            }
        }
    }
    if (n_splits == 1 || !last_to_count(counters + g, n_splits)) return;
    __threadfence();
    if (threadIdx.x == 0) counters[g] = 0;  // every split has counted
#pragma unroll
    for (int k = 0; k < ROUNDS; ++k) {  // unrolled, so that the heads' loads can fly together
        const int i = slot + k * SLOTS;
        if (i >= group) break;
        const i64 o_at = (i64)(h0 + i) * HD + d;
        const float* base = partial + (i64)(h0 + i) * gridDim.y * stride;
        out[o_at] = merge_splits(base, stride, n_splits, d);
        store_half_copy(out_h, o_at, out[o_at]);
    }
}

// attn_decode's parameters (n_heads and hd unused: HD is the kernel's).
#define FLASH_DECODE(HD)                                                                        \
    extern "C" __global__ void __launch_bounds__(FD_WARPS * 32, 1)                              \
        attn_flash_decode_##HD(DECODE_PARAMS) {                                                 \
        flash_decode<HD>(q, DECODE_NEW_KEYS, kc, vc, pos, out, out_h, partial, counters, group, \
                         capacity, scale, window, softcap, split_min_keys, split_shift);        \
    }
FLASH_DECODE(64)
FLASH_DECODE(128)
