// Causal attention with GQA over f32 caches [n_kv_heads, capacity, head_dim], and the cache
// append. Query row i is at position pos+i (pos read from device memory) and sees keys
// lo..=pos+i, lo > pos+i−window under a sliding window. Scores are scale·q·k, soft-capped
// when softcap > 0. In both kernels lane l of a warp owns head dims l, l+32, … (HC chunks of
// 32 cover head_dim).

__device__ __forceinline__ void key_range(int qpos, int capacity, int window, int& lo, int& hi) {
    hi = min(qpos + 1, capacity);
    lo = window > 0 ? max(0, qpos - window + 1) : 0;
}

__device__ __forceinline__ float cap_score(float s, float softcap) {
    return softcap > 0.f ? softcap * tanhf(s / softcap) : s;
}

// ---------------------------------------------------------------------------------------------
// Decode (few query rows): split-K flash decoding. Grid (n_heads, n_splits, rows); the keys a
// query sees are cut into n_splits equal ranges at run time (from pos), so the fixed grid of a
// captured graph stays balanced as the context grows. Each of the DEC_WARPS warps takes DEC_KEYS
// consecutive keys per step (independent loads and reductions in flight) with an online
// softmax; the warps merge in shared memory. One split writes the output; several write
// (max, sum, unnormalised acc) partials that `attn_combine` merges.
// The grid's n_splits is fixed when a graph is captured (for the cache's capacity); at run
// time only `active_splits` of them take keys, at least DEC_MIN_SPLIT_KEYS each, so that a
// short context is not spread over partials of a key or none. The other split blocks exit;
// with one active split its block writes the output and the combine does nothing.

#define DEC_WARPS 4
#define DEC_KEYS 4
#define DEC_MIN_SPLIT_KEYS 32

// The splits that take keys for a row seeing keys lo..hi.
__device__ __forceinline__ int active_splits(int lo, int hi, int n_splits) {
    return max(1, min(n_splits, (hi - lo + DEC_MIN_SPLIT_KEYS - 1) / DEC_MIN_SPLIT_KEYS));
}

template <int HC>
__device__ __forceinline__ void attn_decode(const float* __restrict__ q,
                                            const float* __restrict__ kc,
                                            const float* __restrict__ vc,
                                            const u32* __restrict__ pos, float* __restrict__ out,
                                            float* __restrict__ partial, int n_heads, int group,
                                            int hd, int capacity, float scale, int window,
                                            float softcap) {
    const int h = blockIdx.x, split = blockIdx.y, row = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int lo, hi;
    key_range((int)pos[0] + row, capacity, window, lo, hi);
    const int n_splits = active_splits(lo, hi, gridDim.y);
    if (split >= n_splits) return;
    const int per = max(0, (hi - lo + n_splits - 1) / n_splits);
    const int start = lo + split * per, end = min(hi, start + per);

    const float* qr = q + ((i64)row * n_heads + h) * hd;
    float qv[HC], acc[HC];
#pragma unroll
    for (int c = 0; c < HC; ++c) {
        const int d = lane + 32 * c;
        qv[c] = d < hd ? qr[d] * scale : 0.f;
        acc[c] = 0.f;
    }
    const i64 kv_base = (i64)(h / group) * capacity * hd;
    float m = NEG_INF, l = 0.f;
    for (int j0 = start + warp * DEC_KEYS; j0 < end; j0 += DEC_WARPS * DEC_KEYS) {
        float s[DEC_KEYS];
#pragma unroll
        for (int u = 0; u < DEC_KEYS; ++u) {
            const float* kr = kc + kv_base + (i64)min(j0 + u, end - 1) * hd;
            float dot = 0.f;
#pragma unroll
            for (int c = 0; c < HC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) dot = fmaf(qv[c], kr[d], dot);
            }
            s[u] = dot;
        }
        float m_new = m;
#pragma unroll
        for (int u = 0; u < DEC_KEYS; ++u) {
            s[u] = j0 + u < end ? cap_score(warp_sum(s[u]), softcap) : NEG_INF;
            m_new = fmaxf(m_new, s[u]);
        }
        const float corr = expf(m - m_new);  // 0 while m is −inf; m_new is finite here
        l *= corr;
#pragma unroll
        for (int c = 0; c < HC; ++c) acc[c] *= corr;
#pragma unroll
        for (int u = 0; u < DEC_KEYS; ++u) {
            const float p = expf(s[u] - m_new);
            l += p;
            const float* vr = vc + kv_base + (i64)min(j0 + u, end - 1) * hd;
#pragma unroll
            for (int c = 0; c < HC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) acc[c] = fmaf(p, vr[d], acc[c]);
            }
        }
        m = m_new;
    }

    __shared__ float warp_m[DEC_WARPS], warp_l[DEC_WARPS];
    __shared__ float warp_acc[DEC_WARPS][HC * 32];
    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < HC; ++c) warp_acc[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    if (warp != 0) return;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, warp_m[w]);
    float sum = 0.f, a[HC];
#pragma unroll
    for (int c = 0; c < HC; ++c) a[c] = 0.f;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) {
        const float wt = warp_m[w] == NEG_INF ? 0.f : expf(warp_m[w] - mx);
        sum += warp_l[w] * wt;
#pragma unroll
        for (int c = 0; c < HC; ++c) a[c] += warp_acc[w][lane + 32 * c] * wt;
    }
    if (n_splits == 1) {
        float* o = out + ((i64)row * n_heads + h) * hd;
#pragma unroll
        for (int c = 0; c < HC; ++c) {
            const int d = lane + 32 * c;
            if (d < hd) o[d] = sum > 0.f ? a[c] / sum : 0.f;
        }
        return;
    }
    float* p = partial + (((i64)row * n_heads + h) * gridDim.y + split) * (hd + 2);
    if (lane == 0) {
        p[0] = mx;
        p[1] = sum;
    }
#pragma unroll
    for (int c = 0; c < HC; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) p[2 + d] = a[c];
    }
}

// Merges the active split partials of one (head, row): grid (n_heads, rows); `n_splits` is
// the decode grid's, pos, capacity and window give each row's active count as there.
extern "C" __global__ void attn_combine(const float* __restrict__ partial, float* __restrict__ out,
                                        const u32* __restrict__ pos, int n_heads, int hd,
                                        int n_splits, int capacity, int window) {
    kernel_entry();
    launch_dependents();
    const int h = blockIdx.x, row = blockIdx.y;
    int lo, hi;
    key_range((int)pos[0] + row, capacity, window, lo, hi);
    const int active = active_splits(lo, hi, n_splits);
    if (active == 1) return;  // the split block wrote the output
    const int stride = hd + 2;
    const float* p = partial + ((i64)row * n_heads + h) * n_splits * stride;
    float mx = NEG_INF;
    for (int s = 0; s < active; ++s) mx = fmaxf(mx, p[s * stride]);
    float sum = 0.f;
    for (int s = 0; s < active; ++s) {
        const float ms = p[s * stride];
        if (ms != NEG_INF) sum += p[s * stride + 1] * expf(ms - mx);
    }
    float* o = out + ((i64)row * n_heads + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < active; ++s) {
            const float ms = p[s * stride];
            if (ms != NEG_INF) a += p[s * stride + 2 + d] * expf(ms - mx);
        }
        o[d] = sum > 0.f ? a / sum : 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill (many query rows): a block takes PF_WARPS·PF_ROWS consecutive query rows of one head
// and streams the keys they see through shared memory in tiles of PF_KEYS. Scores: lane j
// takes key j of the tile for each of its warp's PF_ROWS rows (the K tile is padded to hd+1
// floats a row, so these reads hit distinct banks). P·V: lanes own head dims, the
// probabilities are broadcast by shuffle. Dynamic shared memory:
// (PF_WARPS·PF_ROWS·hd + PF_KEYS·(hd+1) + PF_KEYS·hd) floats.

#define PF_WARPS 4
#define PF_ROWS 4
#define PF_KEYS 32

template <int HC>
__device__ __forceinline__ void attn_prefill(const float* __restrict__ q,
                                             const float* __restrict__ kc,
                                             const float* __restrict__ vc,
                                             const u32* __restrict__ pos, float* __restrict__ out,
                                             int n_heads, int group, int hd, int capacity,
                                             float scale, int window, float softcap, int rows) {
    extern __shared__ float smem[];
    float* qs = smem;
    float* ks = qs + PF_WARPS * PF_ROWS * hd;
    float* vs = ks + PF_KEYS * (hd + 1);
    const int h = blockIdx.x, r0 = blockIdx.y * PF_WARPS * PF_ROWS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int p0 = (int)pos[0];
    const i64 kv_base = (i64)(h / group) * capacity * hd;

    for (int i = threadIdx.x; i < PF_WARPS * PF_ROWS * hd; i += blockDim.x) {
        const int row = r0 + i / hd;
        qs[i] = row < rows ? q[((i64)row * n_heads + h) * hd + i % hd] * scale : 0.f;
    }
    // Keys any row of the block sees: from the first row's lower bound to the last row's end.
    int lo_block, hi_block, unused;
    key_range(p0 + r0, capacity, window, lo_block, unused);
    key_range(p0 + min(r0 + PF_WARPS * PF_ROWS, rows) - 1, capacity, window, unused, hi_block);

    int lo[PF_ROWS], hi[PF_ROWS];
    float m[PF_ROWS], l[PF_ROWS], acc[PF_ROWS][HC];
#pragma unroll
    for (int r = 0; r < PF_ROWS; ++r) {
        key_range(p0 + r0 + warp * PF_ROWS + r, capacity, window, lo[r], hi[r]);
        m[r] = NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < HC; ++c) acc[r][c] = 0.f;
    }
    const float* qw = qs + warp * PF_ROWS * hd;

    for (int t0 = lo_block; t0 < hi_block; t0 += PF_KEYS) {
        __syncthreads();  // the previous tile is consumed (and q is staged)
        for (int i = threadIdx.x; i < PF_KEYS * hd; i += blockDim.x) {
            const int j = i / hd, d = i % hd, key = t0 + j;
            const bool in = key < hi_block;
            ks[j * (hd + 1) + d] = in ? kc[kv_base + (i64)key * hd + d] : 0.f;
            vs[i] = in ? vc[kv_base + (i64)key * hd + d] : 0.f;
        }
        __syncthreads();

        float s[PF_ROWS];
#pragma unroll
        for (int r = 0; r < PF_ROWS; ++r) s[r] = 0.f;
        const float* kr = ks + lane * (hd + 1);
#pragma unroll 4
        for (int d = 0; d < hd; ++d) {
            const float kd = kr[d];
#pragma unroll
            for (int r = 0; r < PF_ROWS; ++r) s[r] = fmaf(qw[r * hd + d], kd, s[r]);
        }
        const int key = t0 + lane;
        float p[PF_ROWS];
#pragma unroll
        for (int r = 0; r < PF_ROWS; ++r) {
            const float sr = key >= lo[r] && key < hi[r] ? cap_score(s[r], softcap) : NEG_INF;
            const float m_new = fmaxf(m[r], warp_max(sr));
            // Rows that have seen no key yet keep m = −inf and add nothing.
            const float corr = m_new == NEG_INF ? 1.f : expf(m[r] - m_new);
            p[r] = m_new == NEG_INF ? 0.f : expf(sr - m_new);
            l[r] = l[r] * corr + warp_sum(p[r]);
#pragma unroll
            for (int c = 0; c < HC; ++c) acc[r][c] *= corr;
            m[r] = m_new;
        }
        for (int j = 0; j < PF_KEYS; ++j) {
            float pj[PF_ROWS];
#pragma unroll
            for (int r = 0; r < PF_ROWS; ++r) pj[r] = __shfl_sync(FULL_MASK, p[r], j);
#pragma unroll
            for (int c = 0; c < HC; ++c) {
                const int d = lane + 32 * c;
                const float v = d < hd ? vs[j * hd + d] : 0.f;
#pragma unroll
                for (int r = 0; r < PF_ROWS; ++r) acc[r][c] = fmaf(pj[r], v, acc[r][c]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < PF_ROWS; ++r) {
        const int row = r0 + warp * PF_ROWS + r;
        if (row >= rows) continue;
        float* o = out + ((i64)row * n_heads + h) * hd;
#pragma unroll
        for (int c = 0; c < HC; ++c) {
            const int d = lane + 32 * c;
            if (d < hd) o[d] = l[r] > 0.f ? acc[r][c] / l[r] : 0.f;
        }
    }
}

#define ATTENTION(HC)                                                                           \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) attn_decode_##HC(              \
        const float* q, const float* kc, const float* vc, const u32* pos, float* out,           \
        float* partial, int n_heads, int group, int hd, int capacity, float scale, int window,  \
        float softcap) {                                                                        \
        kernel_entry();                                                                         \
        launch_dependents();                                                                    \
        attn_decode<HC>(q, kc, vc, pos, out, partial, n_heads, group, hd, capacity, scale,      \
                        window, softcap);                                                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) attn_prefill_##HC(              \
        const float* q, const float* kc, const float* vc, const u32* pos, float* out,           \
        int n_heads, int group, int hd, int capacity, float scale, int window, float softcap,   \
        int rows) {                                                                             \
        kernel_entry();                                                                         \
        attn_prefill<HC>(q, kc, vc, pos, out, n_heads, group, hd, capacity, scale, window,      \
                         softcap, rows);                                                        \
    }
ATTENTION(1)
ATTENTION(2)
ATTENTION(3)
ATTENTION(4)
ATTENTION(5)
ATTENTION(6)
ATTENTION(7)
ATTENTION(8)

// cache[g, pos+r, d] = x[r, g·hd + d]; rows past the capacity are dropped (the engine never
// sends them).
extern "C" __global__ void kv_append(const float* __restrict__ x, const u32* __restrict__ pos,
                                     float* __restrict__ cache, int rows, int n_kv, int hd,
                                     int capacity) {
    kernel_entry();
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)rows * n_kv * hd) return;
    const int d = (int)(idx % hd);
    const int g = (int)((idx / hd) % n_kv);
    const int r = (int)(idx / ((i64)hd * n_kv));
    const i64 p = (i64)pos[0] + r;
    if (p >= capacity) return;
    cache[((i64)g * capacity + p) * hd + d] = x[idx];
}
