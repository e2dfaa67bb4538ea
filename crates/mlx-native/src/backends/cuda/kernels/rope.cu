// Rotary position embedding of the leading `rotary_dims` dims of each head; the other dims are
// copied. One thread per (row, head, rotated pair or copied dim); the position of row 0 is read
// from device memory so that a captured graph stays valid as it advances.

// Thread j of a head (0 ≤ j < rotary_dims/2 + head_dim − rotary_dims) at position p: rotates
// pair j of `xh` into `yh` (f32, or a kv_t cache row), or, past the pairs, copies one
// pass-through dim.
template <typename T>
__device__ __forceinline__ void rope_head_thread(const float* __restrict__ xh, T* __restrict__ yh,
                                                 const float* __restrict__ inv_freq, u32 p, int j,
                                                 int rotary_dims, int traditional, float mscale) {
    const int half = rotary_dims / 2;
    if (j >= half) {
        const int d = rotary_dims + (j - half);
        store_elem(yh + d, xh[d]);
        return;
    }
    float c, s;
    rope_cos_sin(inv_freq, p, j, mscale, c, s);
    int i0, i1;
    rope_pair(j, rotary_dims, traditional, i0, i1);
    const float x0 = xh[i0], x1 = xh[i1];
    store_elem(yh + i0, x0 * c - x1 * s);
    store_elem(yh + i1, x0 * s + x1 * c);
}

extern "C" __global__ void rope(const float* __restrict__ x, const float* __restrict__ inv_freq,
                                const u32* __restrict__ pos, float* __restrict__ out, int rows,
                                int n_heads, int head_dim, int rotary_dims, int traditional,
                                float mscale) {
    kernel_entry();
    const int per_head = rotary_dims / 2 + (head_dim - rotary_dims);
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)rows * n_heads * per_head) return;
    const i64 head = idx / per_head;
    const u32 p = pos[0] + (u32)(head / n_heads);
    rope_head_thread(x + head * head_dim, out + head * head_dim, inv_freq, p, (int)(idx % per_head),
                     rotary_dims, traditional, mscale);
}

// The attention's input stage for rows at positions pos..pos+rows: q rotated into q_out, k
// rotated into k_cache and v copied into v_cache (caches [n_kv, capacity, head_dim] of
// kv_t). Per row, threads cover the q heads' and k heads' rope threads, then v's elements. Rows past the
// capacity are dropped (the engine never sends them).
extern "C" __global__ void rope_kv_append(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v,
                                          const float* __restrict__ inv_freq,
                                          const u32* __restrict__ pos, float* __restrict__ q_out,
                                          kv_t* __restrict__ k_cache, kv_t* __restrict__ v_cache,
                                          int rows, int n_heads, int n_kv, int head_dim,
                                          int rotary_dims, int traditional, float mscale,
                                          int capacity, int early) {
    kernel_entry_early(early);
    const int per_head = rotary_dims / 2 + (head_dim - rotary_dims);
    const int roped = (n_heads + n_kv) * per_head;
    const int per_row = roped + n_kv * head_dim;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)rows * per_row) return;
    const int r = (int)(idx / per_row), t = (int)(idx % per_row);
    const u32 p = pos[0] + (u32)r;
    if (t >= roped) {
        if (p >= (u32)capacity) return;
        const int e = t - roped, g = e / head_dim, d = e % head_dim;
        store_elem(v_cache + ((i64)g * capacity + p) * head_dim + d, v[(i64)r * n_kv * head_dim + e]);
        return;
    }
    const int h = t / per_head, j = t % per_head;
    if (h < n_heads) {
        const i64 at = ((i64)r * n_heads + h) * head_dim;
        rope_head_thread(q + at, q_out + at, inv_freq, p, j, rotary_dims, traditional, mscale);
    } else if (p < (u32)capacity) {
        const int g = h - n_heads;
        rope_head_thread(k + ((i64)r * n_kv + g) * head_dim,
                         k_cache + ((i64)g * capacity + p) * head_dim, inv_freq, p, j, rotary_dims,
                         traditional, mscale);
    }
}

// The most head dims `rope_kv_append_normed` takes (its shared memory: a head a warp).
#define ROPE_NORMED_MAX_HD 256
#define ROPE_NORMED_WARPS 8

// `rope_kv_append` with each q and k head RMS-normed before its rotation (q/k norms, as Qwen3's
// and Gemma 3's: x·rsqrt(mean(x²) + eps)·(w + w_offset), weights f32 [head_dim]), each value as
// an `rms_norm` launch over the heads computes it (the sum of squares in another order). A
// prompt's q/k norms then cost no launches of their own (prompts of more than 16 rows: shorter
// ones keep two norm launches, which launch early there and measured faster, attention.rs).
// One block of ROPE_NORMED_WARPS warps a row: each warp takes whole heads (q's, then k's), lane
// l dims l, l + 32, …, writes the normed head to shared memory and rotates it from there (a
// dim's partner may be another lane's); then the block copies v.
extern "C" __global__ void __launch_bounds__(ROPE_NORMED_WARPS * 32)
    rope_kv_append_normed(const float* __restrict__ q, const float* __restrict__ k,
                          const float* __restrict__ v, const float* __restrict__ inv_freq,
                          const u32* __restrict__ pos, float* __restrict__ q_out,
                          kv_t* __restrict__ k_cache, kv_t* __restrict__ v_cache, int n_heads,
                          int n_kv, int head_dim, int rotary_dims, int traditional, float mscale,
                          int capacity, const float* __restrict__ q_w,
                          const float* __restrict__ k_w, float eps, float w_offset, int early) {
    kernel_entry_early(early);
    __shared__ float normed[ROPE_NORMED_WARPS][ROPE_NORMED_MAX_HD];
    const int r = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 p = pos[0] + (u32)r;
    const bool cached = p < (u32)capacity;  // rows past the capacity are dropped
    float* head = normed[warp];
    for (int h = warp; h < n_heads + (cached ? n_kv : 0); h += ROPE_NORMED_WARPS) {
        const bool is_q = h < n_heads;
        const int g = h - n_heads;
        const float* x = is_q ? q + ((i64)r * n_heads + h) * head_dim
                              : k + ((i64)r * n_kv + g) * head_dim;
        const float* w = is_q ? q_w : k_w;
        float ss = 0.f;
        for (int d = lane; d < head_dim; d += 32) ss += x[d] * x[d];
        const float rs = rsqrtf(warp_sum(ss) / head_dim + eps);
        for (int d = lane; d < head_dim; d += 32) head[d] = x[d] * rs * (w[d] + w_offset);
        __syncwarp();
        for (int d = lane; d < head_dim; d += 32) {
            float c, s;
            rope_dim_cos_sin(d, p, inv_freq, rotary_dims, traditional, mscale, c, s);
            const float y = rope_apply(head[d], head[rope_partner(d, rotary_dims, traditional)], d,
                                       c, s, rotary_dims, traditional);
            if (is_q)
                q_out[((i64)r * n_heads + h) * head_dim + d] = y;
            else
                store_elem(k_cache + ((i64)g * capacity + p) * head_dim + d, y);
        }
        __syncwarp();  // the head's readers are done before the warp's next head
    }
    if (!cached) return;
    for (int e = threadIdx.x; e < n_kv * head_dim; e += blockDim.x) {
        const int g = e / head_dim, d = e % head_dim;
        store_elem(v_cache + ((i64)g * capacity + p) * head_dim + d,
                   v[(i64)r * n_kv * head_dim + e]);
    }
}
