// Causal attention with GQA over caches [n_kv_heads, capacity, head_dim] of kv_t (f32 or f16:
// kv_f32.cuh, kv_f16.cuh; values widen to f32 as they are read), and the cache append. Query
// row i is at position pos+i (pos read from device memory) and sees keys lo..=pos+i,
// lo > pos+i−window under a sliding window. Scores are scale·q·k, soft-capped
// when softcap > 0. HC chunks of 32 cover head_dim; in a decode pass lane l of a warp owns
// head dims `lane_dim(l, c)`, in prefill's P·V dims l, l + 32, ….

__device__ __forceinline__ void key_range(int qpos, int capacity, int window, int& lo, int& hi) {
    hi = min(qpos + 1, capacity);
    lo = window > 0 ? max(0, qpos - window + 1) : 0;
}

__device__ __forceinline__ float cap_score(float s, float softcap) {
    return softcap > 0.f ? softcap * tanhf(s / softcap) : s;
}

// ---------------------------------------------------------------------------------------------
// Decode (few query rows): split-K flash decoding. Grid (n_heads, n_splits, rows) of DEC_WARPS
// warps (one block per SM fits). n_splits is fixed when a graph is captured (blocks for one wave
// over the SMs, fewer for a short cache); at run time a row's keys (from pos) go to as many splits
// as hold 2^`split_shift` each once they reach `split_min_keys` (both the planner's; or, at head
// dims over 64, one a pass once a head would take three passes: `active_splits`), up to n_splits,
// and the other blocks exit: no split (and no merge) for shorter rows, a full wave of blocks for
// long ones, whose splits then take several passes. In a pass each warp takes KEYS = `dec_keys(HC)`
// consecutive keys (32 for hd ≤ 32, 16 for hd ≤ 64, 8 up to 128, 4 above), loading their K and V
// rows at once, and scores them onto lanes (`warp_scores`); a max and a sum over KEYS lanes update
// the online softmax, and for P·V the lanes own head dims, the probabilities broadcast by shuffle.
// A short context is bound by latency, not bandwidth: the K and V rows of the block's first
// DEC_WARPS·32 keys head for L2 before the wait for the previous kernel, and a pass costs one round
// trip for its loads. The warps merge in shared memory. One active split writes the output; several
// write (max, sum, unnormalised acc) partials and count themselves on a counter per (row, head),
// and the block that counts last merges them and resets the counter.

#define DEC_WARPS 16
#define DEC_MAX_ROWS 4          // DECODE_MAX_ROWS in attention.rs

// Sends the 128-byte lines of a cache row (hd ≤ 32·HC elements) towards L2.
template <int HC>
__device__ __forceinline__ void prefetch_row(const kv_t* row, int hd) {
    constexpr int LINE = 128 / sizeof(kv_t);
#pragma unroll
    for (int c = 0; c < (32 * HC + LINE - 1) / LINE; ++c) prefetch_l2(row + min(LINE * c, hd - 1));
    prefetch_l2(row + hd - 1);
}

// Threads that merge one head dim over the warps' partials: the most (a power of two) that
// leave every dim of 32·HC a group of the block's threads.
template <int HC>
__host__ __device__ constexpr int merge_lanes() {
    int p = 1;
    while (2 * p * HC <= DEC_WARPS) p *= 2;
    return p;
}

// Keys a warp takes in a pass: as many as keep a lane's K and V loads of the pass in 32
// registers each (KEYS·HC ≤ 32), so that both are issued at once: one round trip to L2 a
// pass, and at short contexts more warps with shorter chains.
__host__ __device__ constexpr int dec_keys(int hc) {
    return hc == 1 ? 32 : hc == 2 ? 16 : hc <= 4 ? 8 : 4;
}

#define DEC_PASS_SPLIT_MIN_HC 3  // DECODE_PASS_SPLIT_MIN_HC in attention.rs

// The decode kernels' split rule by key count, the planner's (`Splitting` in attention.rs):
// from `split_min_keys` keys one split for each 2^`split_shift` (a shift: no division before
// the first loads), else one.
__device__ __forceinline__ int splits_by_keys(int keys, int split_min_keys, int split_shift) {
    return keys >= split_min_keys ? keys >> split_shift : 1;
}

// Splits a row's `keys` take: from `split_min_keys` keys one for each 2^`split_shift` (the
// planner's `decode_splitting`), and for head dims over 64
// (where a pass takes DEC_WARPS·8 or ·4 keys) one a pass wherever a head would take three
// passes or more, up to `n_splits`: a later pass costs a round trip to L2 (~0.9 µs at head dim
// 256), more than a merge. H100, 2026-11-27, decode after 16 / 128 tokens, 256 new: Gemma-3-1B
// (head dim 256, 4 heads) +1.2% / +5.6% (every head of 2 passes or more split too: −0.4% /
// +5.6%; splits of two passes: −0.8% / +2.4%); at head dim 128 Qwen3-0.6B +0.1% / +0.7%, the
// 8B +0.5% after 128.
template <int HC>
__device__ __forceinline__ int active_splits(int keys, int n_splits, int split_min_keys,
                                             int split_shift) {
    constexpr int PASS = DEC_WARPS * dec_keys(HC);
    const int passes = (keys + PASS - 1) / PASS;
    const int by_pass = HC >= DEC_PASS_SPLIT_MIN_HC && passes >= 3 ? passes : 1;
    return max(1, min(n_splits, max(splits_by_keys(keys, split_min_keys, split_shift), by_pass)));
}

// A step of `warp_scores`' butterfly: lanes with bit O set keep rows j + O of each pair
// (j, j + O), the others rows j, and each adds its partner's share of the row it keeps.
template <int O, int N>
__device__ __forceinline__ void butterfly_step(float (&v)[N], int lane) {
    const bool upper = lane & O;
#pragma unroll
    for (int j = 0; j < O; ++j) {
        const float send = upper ? v[j] : v[j + O];
        v[j] = (upper ? v[j + O] : v[j]) + __shfl_xor_sync(FULL_MASK, send, O);
    }
}

// Max and sum over the KEYS lanes of a pass's keys (every group of KEYS lanes holds the same
// scores).
template <int KEYS>
__device__ __forceinline__ float keys_max(float v) {
#pragma unroll
    for (int o = KEYS / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

template <int KEYS>
__device__ __forceinline__ float keys_sum(float v) {
#pragma unroll
    for (int o = KEYS / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// The head dims a lane owns in a decode pass (attention.rs's decode_cache_alignment repeats
// the rule; cuda_backend.rs's decode_attention_takes_caches_at_the_alignment_it_checks ties the
// two): runs of V = 4, 2 or 1 (the largest that divides HC) at V·lane + 32·V·r, so that a
// warp loads a row's dims as coalesced 16- or 8-byte vectors (HC = 1 or odd: dims lane + 32c,
// as before). H100, 2026-11-27, decode after 128 tokens, runs of HC dims a lane: Qwen3-0.6B
// (hd 128) +2.2%, 8B +0.7%, SmolLM2 shape ±0.5% (+1.8% after 1,024 tokens); Gemma-3-1B (hd
// 256) lost 1.4% with runs of 8 (two 16-byte loads a lane 16 bytes apart: every warp load half
// a line), hence runs of at most 4.
template <int HC>
__host__ __device__ constexpr int dims_run() {
    return HC % 4 == 0 ? 4 : HC % 2 == 0 ? 2 : 1;
}

template <int HC>
__device__ __forceinline__ int lane_dim(int lane, int c) {
    constexpr int V = dims_run<HC>();
    return V * lane + 32 * V * (c / V) + c % V;
}

// V consecutive elements at p (aligned to V elements) as floats, in one load.
template <int V>
__device__ __forceinline__ void load_run(const float* p, float* r) {
    if constexpr (V == 4) {
        const float4 t = *(const float4*)p;
        r[0] = t.x, r[1] = t.y, r[2] = t.z, r[3] = t.w;
    } else if constexpr (V == 2) {
        const float2 t = *(const float2*)p;
        r[0] = t.x, r[1] = t.y;
    } else {
        r[0] = *p;
    }
}

template <int V>
__device__ __forceinline__ void load_run(const u16* p, float* r) {
    if constexpr (V == 4) {
        const uint2 t = *(const uint2*)p;
        r[0] = f16_to_f32((u16)t.x), r[1] = f16_to_f32((u16)(t.x >> 16));
        r[2] = f16_to_f32((u16)t.y), r[3] = f16_to_f32((u16)(t.y >> 16));
    } else if constexpr (V == 2) {
        const u32 t = *(const u32*)p;
        r[0] = f16_to_f32((u16)t), r[1] = f16_to_f32((u16)(t >> 16));
    } else {
        r[0] = f16_to_f32(*p);
    }
}

// A lane's HC dims of a row (of a cache, or staged in shared memory as f32).
template <int HC, typename T>
__device__ __forceinline__ void load_dims(const T* row, int lane, float (&r)[HC]) {
    constexpr int V = dims_run<HC>();
#pragma unroll
    for (int c = 0; c < HC; c += V) load_run<V>(row + lane_dim<HC>(lane, c), r + c);
}

// Scale·q·k of a pass's KEYS rows from their loaded dims (k[j][c]: row j, lane_dim(lane, c)),
// q·scale in shared memory (zero past hd). A transposing butterfly over the low lane bits,
// then a sum over the high ones, leaves row j's total on the lanes l with l % KEYS = j.
template <int HC, int KEYS>
__device__ __forceinline__ float warp_scores(const float* __restrict__ qs,
                                             const float (&k)[KEYS][HC], int lane) {
    float v[KEYS];
#pragma unroll
    for (int j = 0; j < KEYS; ++j) v[j] = 0.f;
    float qd[HC];
    load_dims<HC>(qs, lane, qd);
#pragma unroll
    for (int c = 0; c < HC; ++c)
#pragma unroll
        for (int j = 0; j < KEYS; ++j) v[j] = fmaf(qd[c], k[j][c], v[j]);
    if constexpr (KEYS >= 32) butterfly_step<16>(v, lane);
    if constexpr (KEYS >= 16) butterfly_step<8>(v, lane);
    if constexpr (KEYS >= 8) butterfly_step<4>(v, lane);
    if constexpr (KEYS >= 4) butterfly_step<2>(v, lane);
    butterfly_step<1>(v, lane);
#pragma unroll
    for (int o = 16; o >= KEYS; o >>= 1) v[0] += __shfl_xor_sync(FULL_MASK, v[0], o);
    return v[0];
}

// Rows j0 … j0+KEYS−1 of a cache (the first n real, the others repeating row n−1), dims
// lane_dim(lane, c) (clamped to hd). WHOLE: hd = 32·HC, so a lane's dims load as vectors (the
// planner checks the caches' alignment: attention.rs, decode_cache_alignment); ALL_KEYS as
// well: n = KEYS, so every load is a constant offset from one address.
template <int HC, int KEYS, bool WHOLE, bool ALL_KEYS>
__device__ __forceinline__ void load_rows(const kv_t* rows, int n, int hd, int lane,
                                          float (&r)[KEYS][HC]) {
#pragma unroll
    for (int j = 0; j < KEYS; ++j) {
        const int row = ALL_KEYS ? j : min(j, n - 1);
        if constexpr (WHOLE) {
            load_dims<HC>(rows + row * 32 * HC, lane, r[j]);
        } else {
#pragma unroll
            for (int c = 0; c < HC; ++c)
                r[j][c] = elem_f32(rows[(i64)row * hd + min(lane_dim<HC>(lane, c), hd - 1)]);
        }
    }
}

// A pass's K and V rows (keys j0 … j0+n−1, n ≤ KEYS), loaded at once.
template <int HC, int KEYS>
__device__ __forceinline__ void load_pass(const kv_t* kb, const kv_t* vb, int j0, int n, int hd,
                                          int lane, float (&k)[KEYS][HC], float (&v)[KEYS][HC]) {
    const kv_t *ks = kb + (i64)j0 * hd, *vs = vb + (i64)j0 * hd;
    if (hd == 32 * HC && n == KEYS) {
        load_rows<HC, KEYS, true, true>(ks, n, hd, lane, k);
        load_rows<HC, KEYS, true, true>(vs, n, hd, lane, v);
    } else if (hd == 32 * HC) {
        load_rows<HC, KEYS, true, false>(ks, n, hd, lane, k);
        load_rows<HC, KEYS, true, false>(vs, n, hd, lane, v);
    } else {
        load_rows<HC, KEYS, false, false>(ks, n, hd, lane, k);
        load_rows<HC, KEYS, false, false>(vs, n, hd, lane, v);
    }
}

// One pass of a warp over the loaded keys j0 … j0+n−1: the scores onto lanes, the online
// softmax update of (m, l, acc), and P·V with lanes owning head dims (acc[c]: lane_dim(lane, c)),
// the probabilities broadcast by shuffle.
template <int HC, int KEYS>
__device__ __forceinline__ void decode_pass(const float* __restrict__ qs,
                                            const float (&k)[KEYS][HC],
                                            const float (&v)[KEYS][HC], int n, int lane,
                                            float softcap, float& m, float& l, float (&acc)[HC]) {
    float s = warp_scores<HC, KEYS>(qs, k, lane);
    s = (lane & (KEYS - 1)) < n ? cap_score(s, softcap) : NEG_INF;
    const float m_new = fmaxf(m, keys_max<KEYS>(s));  // finite: lane 0 holds a key
    const float corr = expf(m - m_new);               // 0 while m is −inf
    const float p = expf(s - m_new);                  // 0 past the keys (their V rows repeat
                                                      // a real one: 0·v adds nothing)
    l = l * corr + keys_sum<KEYS>(p);
#pragma unroll
    for (int c = 0; c < HC; ++c) acc[c] *= corr;
#pragma unroll
    for (int j = 0; j < KEYS; ++j) {
        const float pj = __shfl_sync(FULL_MASK, p, j);
#pragma unroll
        for (int c = 0; c < HC; ++c) acc[c] = fmaf(pj, v[j][c], acc[c]);
    }
    m = m_new;
}

// With `NewKeys::k` set (rope_attention), q, k and v arrive as projected: each block rotates
// its q head while staging it, and a block whose split holds new positions (pos..pos+rows−1)
// stores their rotated keys and values into the caches before it reads them. Every block of a
// kv head's heads and rows that holds a position stores the same bits there, so no block
// waits for another. With `q_norm` set too (one row only), q and the new key are RMS-normed
// per head before the rotation, with norm.cu's arithmetic (x·r·(w + w_offset)).
struct NewKeys {
    const float* k;  // [rows, n_kv·hd]; null: the caches hold every key (plain attention)
    const float* v;
    const float* inv_freq;
    int rotary_dims;
    int traditional;
    float mscale;
    const float* q_norm;  // [hd]; null: no head norms
    const float* k_norm;  // [hd]
    float eps;
    float w_offset;
};

// The head norms' weights (+ w_offset) of q and k at dim d and its rotation partner dp, or
// zeros (`load` false): constants, which decode kernels load before their wait.
struct NormWeights {
    float qd = 0.f, qp = 0.f, kd = 0.f, kp = 0.f;
    __device__ __forceinline__ NormWeights(const NewKeys& nk, bool load, int d, int dp) {
        if (!load) return;
        qd = nk.q_norm[d] + nk.w_offset;
        qp = nk.q_norm[dp] + nk.w_offset;
        kd = nk.k_norm[d] + nk.w_offset;
        kp = nk.k_norm[dp] + nk.w_offset;
    }
};

// Σ of a and of b over the block's threads 0 ≤ d < 32·HC (the others pass 0 or stay out), in
// the same order in every thread: one warp sum each, then the HC warps' sums from shared memory.
template <int HC>
__device__ __forceinline__ void head_sums(float& a, float& b, int d) {
    __shared__ float sums[2][HC];
    if (d >= 0 && d < 32 * HC) {
        a = warp_sum(a);
        b = warp_sum(b);
        if ((d & 31) == 0) {
            sums[0][d >> 5] = a;
            sums[1][d >> 5] = b;
        }
    }
    __syncthreads();
    a = 0.f;
    b = 0.f;
#pragma unroll
    for (int w = 0; w < HC; ++w) {
        a += sums[0][w];
        b += sums[1][w];
    }
}

// The caches are read through plain (coherent) loads: with NewKeys the kernel writes them.
template <int HC>
__device__ __forceinline__ void attn_decode(const float* __restrict__ q, const NewKeys nk,
                                            kv_t* kc, kv_t* vc, const u32* __restrict__ pos,
                                            float* __restrict__ out, u16* __restrict__ out_h,
                                            float* __restrict__ partial, u32* __restrict__ counters,
                                            int n_heads, int group, int hd, int capacity,
                                            float scale, int window, float softcap,
                                            int split_min_keys, int split_shift) {
    __shared__ __align__(16) float qs[HC * 32], new_k[DEC_MAX_ROWS][HC * 32],
        new_v[DEC_MAX_ROWS][HC * 32], warp_acc[DEC_WARPS][HC * 32];
    __shared__ float warp_m[DEC_WARPS], warp_l[DEC_WARPS];
    const int h = blockIdx.x, split = blockIdx.y, row = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int d = threadIdx.x, g = h / group, n_kv = n_heads / group;
    // The prologue (q's rotation and staging, the new keys' stores) runs on the block's last HC
    // warps, head dim pd on thread pd of them: passes take keys from warp 0 up, so at short
    // contexts those warps hold none and rotate while the first warps issue their key loads.
    // H100, 2026-11-27, SmolLM2 shape at 200 keys, clock64 stamps: warps 0 and 1 doing both
    // reached the wait ~800 cycles after the others, and the prologue's barrier came ~2,600
    // cycles after the wait (~1,600 now). With rope.cuh's division-free pairs and the selects
    // of the new keys below, decode after 128 tokens: SmolLM2 shape +4.4%, 1B +1.6%,
    // Qwen3-0.6B +1.3%, Gemma-3-1B +1.8%; ±0 after 1,024.
    const int pd = d - (DEC_WARPS - HC) * 32;
    const bool pro = pd >= 0, owns_dim = pro && pd < hd;
    const i64 kv_base = (i64)g * capacity * hd;
    // pos changes only between decode steps (a step's last kernel, argmax or end_step, or
    // the host), never in the kernel just before this one, so it is read before the wait for
    // that kernel.
    // So is everything that depends on it alone: the RoPE angle of the block's row, and each
    // warp's first pass of K and V rows (old keys: no kernel of a step rewrites them; rows at
    // new positions, pos and after, are replaced after the wait). Later passes' rows head for L2.
    // (Split 0's first passes requested before pos's read returns, since without a window they
    // start at key 0, read up to 1.5% slower: H100, 2026-11-27.)
    const u32 p0 = pos[0];
    // The prologue's RoPE frequency does not depend on pos: its load flies beside pos's.
    const bool rot = nk.k != nullptr, normed = nk.q_norm != nullptr;
    const float freq =
        rot && owns_dim ? rope_dim_freq(pd, nk.inv_freq, nk.rotary_dims, nk.traditional) : 0.f;
    int lo, hi;
    key_range((int)p0 + row, capacity, window, lo, hi);
    const int n_splits = active_splits<HC>(hi - lo, gridDim.y, split_min_keys, split_shift);
    if (split >= n_splits) return;
    int per = hi - lo;  // one split (short contexts): no integer division before the loads
    if (n_splits > 1) per = (per + n_splits - 1) / n_splits;
    const int start = lo + split * per, end = min(hi, start + per);
    const kv_t* kb = kc + kv_base;
    const kv_t* vb = vc + kv_base;
    constexpr int KEYS = dec_keys(HC);
    const int j_first = start + warp * KEYS, n_first = min(KEYS, end - j_first);
    float k[KEYS][HC], v[KEYS][HC];
    if (n_first > 0) load_pass<HC, KEYS>(kb, vb, j_first, n_first, hd, lane, k, v);
    if (const int ahead = start + DEC_WARPS * KEYS + d; ahead < end) {  // blockDim = DEC_WARPS·32
        prefetch_row<HC>(kb + (i64)ahead * hd, hd);
        prefetch_row<HC>(vb + (i64)ahead * hd, hd);
    }
    // One sincos a thread: the block's row rotates q and, at the same position, its own new
    // key (a decode step's only one); other rows' keys take their own. The head norms' weights
    // of dims d and dp are constants: loaded before the wait too.
    const int dp = rot && owns_dim ? rope_partner(pd, nk.rotary_dims, nk.traditional) : pd;
    float c = 1.f, s = 0.f;
    if (rot && owns_dim)
        rope_dim_freq_cos_sin(pd, freq, p0 + row, nk.rotary_dims, nk.mscale, c, s);
    const NormWeights nw(nk, normed && owns_dim, pd, dp);
    kernel_entry();
    launch_dependents();
    // Prologue thread pd stages dim pd of q and, with NewKeys, stores dim pd of the new keys
    // and values (row 0's new key, the one a decode step has, loaded up front) into the caches
    // and into new_k/new_v (zero past hd), whence the first passes take them.
    const float* qr = q + ((i64)row * n_heads + h) * hd;
    const float* k0 = rot ? nk.k + (i64)g * hd : nullptr;
    float qd = 0.f, qp = 0.f, kd = 0.f, kp = 0.f, vd = 0.f;
    if (owns_dim) {
        qd = qr[pd];
        if (rot) {
            qp = qr[dp];
            kd = k0[pd];
            kp = k0[dp];
            vd = nk.v[(i64)g * hd + pd];
        }
    }
    if (normed) {  // block-uniform; rows = 1, so k0 is the only new key
        float sq = qd * qd, sk = kd * kd;
        head_sums<HC>(sq, sk, pd);
        const float rq = rsqrtf(sq / hd + nk.eps), rk = rsqrtf(sk / hd + nk.eps);
        qd = qd * rq * nw.qd;
        qp = qp * rq * nw.qp;
        kd = kd * rk * nw.kd;
        kp = kp * rk * nw.kp;
    }
    if (pro) {
        const float x = rot ? rope_apply(qd, qp, pd, c, s, nk.rotary_dims, nk.traditional) : qd;
        qs[pd] = owns_dim ? x * scale : 0.f;
    }
    if (rot && pro) {
        for (int i = max(start - (int)p0, 0); i < min(end - (int)p0, (int)gridDim.z); ++i) {
            float kr = 0.f, vr = 0.f;
            if (owns_dim) {
                float a = kd, b = kp;  // row 0's, loaded up front
                vr = vd;
                if (i != 0) {  // a later row (several query rows): off a decode step's path
                    const i64 at = ((i64)i * n_kv + g) * hd;
                    a = nk.k[at + pd];
                    b = nk.k[at + dp];
                    vr = nk.v[at + pd];
                }
                float ci = c, si = s;
                if (i != row)
                    rope_dim_cos_sin(pd, p0 + i, nk.inv_freq, nk.rotary_dims, nk.traditional,
                                     nk.mscale, ci, si);
                // As stored: the first passes take the new rows from shared memory.
                kr = round_as<kv_t>(rope_apply(a, b, pd, ci, si, nk.rotary_dims, nk.traditional));
                vr = round_as<kv_t>(vr);
                const i64 to = kv_base + ((i64)p0 + i) * hd;
                store_elem(kc + to + pd, kr);
                store_elem(vc + to + pd, vr);
            }
            new_k[i][pd] = kr;
            new_v[i][pd] = vr;
        }
    }
    __syncthreads();  // q staged, new rows stored (and visible to the block)

    float m = NEG_INF, l = 0.f, acc[HC];
#pragma unroll
    for (int c = 0; c < HC; ++c) acc[c] = 0.f;
    for (int j0 = j_first; j0 < end; j0 += DEC_WARPS * KEYS) {
        const int n = min(KEYS, end - j0);
        if (j0 != j_first) {
            load_pass<HC, KEYS>(kb, vb, j0, n, hd, lane, k, v);
        } else if (j0 + n > (int)p0) {  // the first pass holds new positions
            if (rot && end - (int)p0 == 1) {
                // One new key, the pass's last row (and the rows past n, which repeat it): a
                // decode step's. Kept by selects: with a branch a row, the warp holding the new
                // key ended its pass ~1,000 cycles after the others (H100, 2026-11-27, clock64).
                float nk0[HC], nv0[HC];
                load_dims<HC>(new_k[0], lane, nk0);
                load_dims<HC>(new_v[0], lane, nv0);
#pragma unroll
                for (int j = 0; j < KEYS; ++j)
#pragma unroll
                    for (int c = 0; c < HC; ++c) {
                        k[j][c] = j >= n - 1 ? nk0[c] : k[j][c];
                        v[j][c] = j >= n - 1 ? nv0[c] : v[j][c];
                    }
            } else if (rot) {  // several new rows: each row its own
#pragma unroll
                for (int j = 0; j < KEYS; ++j) {
                    const int i = j0 + min(j, n - 1) - (int)p0;  // as load_rows
                    float nkj[HC], nvj[HC];
                    load_dims<HC>(new_k[max(i, 0)], lane, nkj);
                    load_dims<HC>(new_v[max(i, 0)], lane, nvj);
#pragma unroll
                    for (int c = 0; c < HC; ++c) {
                        k[j][c] = i >= 0 ? nkj[c] : k[j][c];
                        v[j][c] = i >= 0 ? nvj[c] : v[j][c];
                    }
                }
            } else {  // plain attention: the kernel before this one appended them
                load_pass<HC, KEYS>(kb, vb, j0, n, hd, lane, k, v);
            }
        }
        decode_pass<HC, KEYS>(qs, k, v, n, lane, softcap, m, l, acc);
    }

    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < HC; ++c) warp_acc[warp][lane_dim<HC>(lane, c)] = acc[c];
    __syncthreads();
    // The warps' partials merge after this one barrier: P adjacent threads take a head dim
    // (t / P), each weighing WPT warps against the block's max, which every thread forms from
    // all the warps' maxima, and the P lanes sum by shuffle. Before, warp 0 weighed the warps
    // between two barriers and each thread then merged its dim over all of them (a knockout of
    // that merge read the SmolLM2 shape +5%); every thread weighing all the warps, 16 exps a
    // thread, was slower. H100, 2026-11-27, decode after 128 tokens: SmolLM2 shape +1.2%, 1B
    // +1.4%, Qwen3-0.6B ±0.
    constexpr int P = merge_lanes<HC>(), WPT = DEC_WARPS / P;
    const int dim = threadIdx.x / P, part = threadIdx.x % P, at = min(dim, 32 * HC - 1);
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, warp_m[w]);  // finite: warp 0 holds a key
    float a = 0.f, sum = 0.f;
#pragma unroll
    for (int i = 0; i < WPT; ++i) {
        const int w = part * WPT + i;
        const float mw = warp_m[w];
        const float wt = mw == NEG_INF ? 0.f : expf(mw - mx);
        sum = fmaf(warp_l[w], wt, sum);
        a = fmaf(warp_acc[w][at], wt, a);
    }
#pragma unroll
    for (int o = 1; o < P; o <<= 1) {
        a += __shfl_xor_sync(FULL_MASK, a, o);
        sum += __shfl_xor_sync(FULL_MASK, sum, o);
    }
    const bool writes = part == 0 && dim < hd;
    const i64 o_at = ((i64)row * n_heads + h) * hd;  // the head's output, and its f16 copy
    float* o = out + o_at;
    if (n_splits == 1) {
        if (writes) {
            o[dim] = sum > 0.f ? a / sum : 0.f;
            store_half_copy(out_h, o_at + dim, o[dim]);
        }
        return;
    }
    const int stride = hd + 2;
    float* base = partial + ((i64)row * n_heads + h) * gridDim.y * stride;
    if (writes) base[split * stride + 2 + dim] = a;
    if (threadIdx.x == 0) {
        base[split * stride] = mx;
        base[split * stride + 1] = sum;
    }
    u32* counter = counters + (i64)row * n_heads + h;
    if (!last_to_count(counter, n_splits) || d >= hd) return;
    __threadfence();
    if (d == 0) *counter = 0;  // every split has counted
    // merge_splits' loop, written out: called here, it cost this kernel 48 instructions of
    // address arithmetic (sm_90 SASS) and Qwen3-0.6B 0.4% (H100, 2026-11-27).
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
    o[d] = l_all > 0.f ? merged / l_all : 0.f;
    store_half_copy(out_h, o_at + d, o[d]);
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
                                             const kv_t* __restrict__ kc,
                                             const kv_t* __restrict__ vc,
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
            ks[j * (hd + 1) + d] = in ? elem_f32(kc[kv_base + (i64)key * hd + d]) : 0.f;
            vs[i] = in ? elem_f32(vc[kv_base + (i64)key * hd + d]) : 0.f;
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

// The decode kernels' parameters (attention.rs's `launch_decode`; flash_decode.cu's kernels
// take them too), and the NewKeys they carry.
#define DECODE_PARAMS                                                                            \
    const float *q, const float *k_new, const float *v_new, const float *inv_freq,              \
        int rotary_dims, int traditional, float mscale, const float *q_norm,                     \
        const float *k_norm, float eps, float w_offset, kv_t *kc, kv_t *vc, const u32 *pos,      \
        float *out, u16 *out_h, float *partial, u32 *counters, int n_heads, int group, int hd,   \
        int capacity, float scale, int window, float softcap, int split_min_keys,                \
        int split_shift
#define DECODE_NEW_KEYS                                                                          \
    NewKeys {                                                                                    \
        k_new, v_new, inv_freq, rotary_dims, traditional, mscale, q_norm, k_norm, eps, w_offset \
    }

#define ATTENTION(HC)                                                                           \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32, 1)                             \
        attn_decode_##HC(DECODE_PARAMS) {                                                       \
        attn_decode<HC>(q, DECODE_NEW_KEYS, kc, vc, pos, out, out_h, partial, counters, n_heads, \
                        group, hd, capacity, scale, window, softcap, split_min_keys,            \
                        split_shift);                                                           \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) attn_prefill_##HC(              \
        const float* q, const kv_t* kc, const kv_t* vc, const u32* pos, float* out,             \
        int n_heads, int group, int hd, int capacity, float scale, int window, float softcap,   \
        int rows, int early) {                                                                  \
        kernel_entry_early(early);                                                              \
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
                                     kv_t* __restrict__ cache, int rows, int n_kv, int hd,
                                     int capacity) {
    kernel_entry();
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)rows * n_kv * hd) return;
    const int d = (int)(idx % hd);
    const int g = (int)((idx / hd) % n_kv);
    const int r = (int)(idx / ((i64)hd * n_kv));
    const i64 p = (i64)pos[0] + r;
    if (p >= capacity) return;
    store_elem(cache + ((i64)g * capacity + p) * hd + d, x[idx]);
}
