// Token choice over the last row of the logits: argmax (one block of SAMPLE_THREADS threads),
// and sampling (a grid of SAMPLER_THREADS-thread blocks, one per SM) with the semantics of the
// CPU backend (backends/cpu/sampling.rs): mlx-lm's repetition penalty, then min-p, top-k and
// top-p on the penalised logits, then an inverse-CDF draw from softmax(logit / temperature)
// over the kept tokens in rank order (highest logit first, lowest id on ties), with u = a
// hash of (seed, pos).
//
// First, one pass histograms the tokens by their distance below the top logit (1/8 of a logit
// a bin): where top-k's count or top-p's mass is reached shows which tokens can be kept at all.
// When those are few (≤ SAMPLE_CANDIDATES, as where a model is confident or top-k is small),
// they are gathered, and one block sorts them by rank and walks the filters and the draw in
// order, as the CPU does (`draw_candidates`). H100, 2026-11-27, 151,936 logits: top-k 40,
// top-p 0.95 and a penalty on a flat row 103 → 40 µs; the real SmolLM2's decode at T = 0.7,
// top-p 0.9 +14.3%, top-k 40 +16.6%. Otherwise (a flat distribution, or no filter but the
// temperature): each filter and the draw is a descending radix selection (four 8-bit levels
// over an order-preserving key of the logit) of the value where a running count or mass
// reaches its target, then, inside that tie group, the member at the right rank by id. The
// masses are f64 as on the CPU; only their summation order differs. Each selection level
// passes over the whole vocabulary, which is why the sampler is a grid: one block took 442 µs
// for a draw over 151,936 logits on the H100, a block per SM 49 µs (2026-11-26).

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)  // the most warps a block of these kernels has
#define SAMPLER_THREADS 512
#define SAMPLER_WARPS (SAMPLER_THREADS / 32)
#define RADIX_BINS 256
#define CUT_BINS_PER_LOGIT 8.f
#define CUT_VALUES (2 * RADIX_BINS + 1)  // a block's counts and masses by bin, its whole mass
#define SAMPLE_CANDIDATES 2048

// ---------------------------------------------------------------------------------------------
// Block-wide reductions (results valid in every thread; up to SAMPLE_WARPS warps).

__device__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Exclusive prefix sum of `v` over the threads in index order (a fixed order of additions);
// `total` gets the sum.
template <class T>
__device__ T block_exclusive_scan(T v, T& total, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(FULL_MASK, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    T before = 0;
    total = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
        if (w < warp) before += scratch[w];
        total += scratch[w];
    }
    return before + x - v;
}

// Keeps the larger value, the lower id on ties; NaN never wins.
__device__ __forceinline__ void take_better(float& v, u32& id, float ov, u32 oid) {
    if (ov > v || (ov == v && oid < id)) {
        v = ov;
        id = oid;
    }
}

// The block's best (value, id) in every thread; id 0 when every value is NaN, or 0xffffffff
// with `none_as_zero` false.
__device__ void block_argmax(float& v, u32& id, bool none_as_zero = true) {
    __shared__ float vals[SAMPLE_WARPS];
    __shared__ u32 ids[SAMPLE_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        take_better(v, id, __shfl_xor_sync(FULL_MASK, v, o), __shfl_xor_sync(FULL_MASK, id, o));
    __syncthreads();
    if (lane == 0) {
        vals[warp] = v;
        ids[warp] = id;
    }
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? vals[lane] : NEG_INF;
    id = lane < (int)(blockDim.x >> 5) ? ids[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        take_better(v, id, __shfl_xor_sync(FULL_MASK, v, o), __shfl_xor_sync(FULL_MASK, id, o));
    if (none_as_zero && id == 0xffffffffu) id = 0;
}

// Calls use(i, load(i)) for i = lo + threadIdx.x, +blockDim.x, … < n, in that order. A pass
// by one block is bound by load latency: each step issues PASS_UNROLL independent loads before
// using any, the last, partial step too. The full steps go unpredicated: one predicated loop
// for both cost SmolLM2's decode 1.0% (H100, 2026-11-27).
#define PASS_UNROLL 8

// One step of for_each_strided at i: PASS_UNROLL loads, then their uses; a PARTIAL step skips
// the indices from n on.
template <bool PARTIAL, class Load, class Use>
__device__ __forceinline__ void strided_step(int i, int n, Load load, Use use) {
    decltype(load(0)) x[PASS_UNROLL];
#pragma unroll
    for (int u = 0; u < PASS_UNROLL; ++u)
        if (!PARTIAL || i + u * (int)blockDim.x < n) x[u] = load(i + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < PASS_UNROLL; ++u)
        if (!PARTIAL || i + u * (int)blockDim.x < n) use(i + u * blockDim.x, x[u]);
}

template <class Load, class Use>
__device__ __forceinline__ void for_each_strided(int lo, int n, Load load, Use use) {
    int i = lo + threadIdx.x;
    for (; i + (PASS_UNROLL - 1) * (int)blockDim.x < n; i += PASS_UNROLL * blockDim.x)
        strided_step<false>(i, n, load, use);
    if (i < n) strided_step<true>(i, n, load, use);
}

// The same over the contiguous range [lo, hi), in order.
template <class Load, class Use>
__device__ __forceinline__ void for_each_in_range(int lo, int hi, Load load, Use use) {
    int i = lo;
    for (; i + PASS_UNROLL <= hi; i += PASS_UNROLL) {
        float x[PASS_UNROLL];
#pragma unroll
        for (int u = 0; u < PASS_UNROLL; ++u) x[u] = load(i + u);
#pragma unroll
        for (int u = 0; u < PASS_UNROLL; ++u) use(i + u, x[u]);
    }
    for (; i < hi; ++i) use(i, load(i));
}

// The end of a decode step (Op::EndStep): the token into its position's ring slot, where the
// host reads it (host-mapped memory: no copy between replays), then the position moves on.
__device__ __forceinline__ void finish_step(u32 id, u32* pos, u32* ring, int ring_len) {
    const u32 p = pos[0];
    ring[(p + 1) % (u32)ring_len] = id;
    pos[0] = p + 1;
}

// One block: a 16-byte aligned row is read as float4, PASS_UNROLL·16 bytes in flight a thread
// (128,256 logits in 4 round trips to L2 instead of 16). With `pos`, end_step as well: a
// greedy decode step's last kernel, so the step has one kernel fewer.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    argmax(const float* __restrict__ logits, u32* __restrict__ token, u32* __restrict__ pos,
           u32* __restrict__ ring, int ring_len, int vocab, int last_row) {
    kernel_entry();
    const float* x = logits + (i64)last_row * vocab;
    float v = NEG_INF;
    u32 id = 0xffffffffu;
    int scalar_from = 0;
    if (((size_t)x & 15) == 0) {
        const float4* x4 = (const float4*)x;
        scalar_from = vocab / 4 * 4;
        for_each_strided(0, vocab / 4, [&](int i) { return x4[i]; },
                         [&](int i, float4 q) {
                             take_better(v, id, q.x, (u32)(4 * i));
                             take_better(v, id, q.y, (u32)(4 * i + 1));
                             take_better(v, id, q.z, (u32)(4 * i + 2));
                             take_better(v, id, q.w, (u32)(4 * i + 3));
                         });
    }
    for (int i = scalar_from + threadIdx.x; i < vocab; i += blockDim.x)
        take_better(v, id, x[i], (u32)i);
    block_argmax(v, id);
    if (threadIdx.x == 0) {
        token[0] = id;
        if (pos) finish_step(id, pos, ring, ring_len);
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling

// a > b ⟺ order_key(a) > order_key(b), for non-NaN floats.
__device__ __forceinline__ u32 order_key(float v) {
    const u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}

// The float of an order key.
__device__ __forceinline__ float key_float(u32 key) {
    return __uint_as_float((key & 0x80000000u) ? key & 0x7fffffffu : ~key);
}

// The last row of logits with the repetition penalty applied to the tokens marked in `seen`.
struct Logits {
    const float* x;
    const u32* seen;  // null when not penalising
    float penalty;
    __device__ __forceinline__ float operator()(int i) const {
        const float v = x[i];
        if (seen && (seen[i >> 5] >> (i & 31)) & 1u) return v < 0.f ? v * penalty : v / penalty;
        return v;
    }
};

// Membership in the kept set as the filters are decided: logit ≥ floor (min-p) and not −∞
// (NaN fails both), ranked within the top k (key above key_k, or equal with id ≤ id_k), and
// at or above the top-p cut.
struct Kept {
    float floor;
    bool top_k;
    u32 key_k;
    int id_k;
    bool top_p;
    u32 key_p;
    __device__ __forceinline__ bool operator()(int i, float v, u32 key) const {
        if (!(v >= floor && v > NEG_INF)) return false;
        if (top_k && (key < key_k || (key == key_k && i > id_k))) return false;
        return !top_p || key >= key_p;
    }
};

// Weights of the selections: a count (top-k), softmax mass (top-p) and tempered mass (draw),
// each exp of an f32 difference taken in f64, as on the CPU.
#define WEIGHT_COUNT 0
#define WEIGHT_MASS 1
#define WEIGHT_TEMPERED 2

__device__ __forceinline__ double weight(int kind, float v, float top, double inv_t) {
    switch (kind) {
        case WEIGHT_COUNT: return 1.0;
        case WEIGHT_MASS: return exp((double)(v - top));
        default: return exp((double)(v - top) * inv_t);
    }
}

// ---------------------------------------------------------------------------------------------
// The sampler's grid: one block per SM (a cooperative launch, so that all are resident), block b
// owning the vocabulary slice [b·per, (b+1)·per). Grid-wide steps meet at `grid_sync`, and
// per-block values go through global scratch (`SamplerGrid`), read past L1 and combined in
// block order by every block alike, so that all blocks take the same decisions.

struct SamplerGrid {
    u32* barrier;     // [2]: grid_sync's count (zeroed at record time; left so), a pad
    double* parts;    // [2][gridDim.x] per-block values, two slots used in turns
    u32* ids;         // [2][gridDim.x] per-block ids or counts
    double* hist;     // [2][gridDim.x][RADIX_BINS] per-block histograms
    double* merged;   // [2][RADIX_BINS]
    int* found;       // [2]
    double* cut;      // [gridDim.x][CUT_VALUES] per-block distance histograms (candidate_cut)
    double* cut_merged;  // [CUT_VALUES]
    u64* cand;        // [SAMPLE_CANDIDATES] rank keys of the gathered candidates
    u32* cand_count;  // [1] candidates gathered (zeroed by block 0 as the kernel starts)
    int slot;         // uses so far (the same in every block); a slot is rewritten only after
                      // a later grid_sync, so every block has read it
    int lo, hi;       // this block's slice
};

__device__ __forceinline__ u32 load_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Every block's writes before it are visible to every block after it. One atomic a block and
// nothing to reset (cooperative groups' scheme): block 0 adds 2^31 − (G − 1), the others 1, so
// bit 31 of the count flips when the last block arrives and the low bits return to where they
// were. A count reset by the last block and a second word for the generation kept the others
// waiting for two more round trips to L2 (H100, 2026-11-27, 151,936 logits: a flat row's draw
// with top-p 0.9 and min-p 0.05 88 → 70 µs; synthetic SmolLM2 decode at T = 0.7, top-p 0.9
// +3.1%, the 1B +4.1%).
__device__ void grid_sync(u32* barrier) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        __threadfence();
        const u32 old = atomicAdd(barrier, add);
        while (((old ^ load_acquire(barrier)) & 0x80000000u) == 0) {
        }
        __threadfence();
    }
    __syncthreads();
}

// merged[v] = Σ over blocks of parts[block·values + v], for v < values, the same bits in
// every block: the grid meets, warp w of block b sums values b + G·w, … (lane l the blocks l,
// l + 32, … in order, then a fixed tree over the lanes: one round trip to L2, not one a block),
// and the grid meets again.
__device__ void grid_merge(const double* parts, int values, double* merged, u32* barrier) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    grid_sync(barrier);
    for (int v = blockIdx.x + gridDim.x * warp; v < values; v += gridDim.x * SAMPLER_WARPS) {
        double s = 0.0;
#pragma unroll 4
        for (int blk = lane; blk < (int)gridDim.x; blk += 32) s += __ldcg(parts + blk * values + v);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
        if (lane == 0) merged[v] = s;
    }
    grid_sync(barrier);
}

// Σ over blocks of each block's `v` (valid in thread 0), in block order.
__device__ double grid_sum(SamplerGrid& g, double v, double* scratch) {
    double* part = g.parts + (g.slot++ & 1) * gridDim.x;
    if (threadIdx.x == 0) part[blockIdx.x] = v;
    grid_sync(g.barrier);
    double s = 0.0;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) s += __ldcg(part + b);
    return block_sum_f64(s, scratch);  // a fixed tree over fixed partial sums
}

// The grid's best (value, id) from each block's (valid in thread 0), in every thread.
__device__ void grid_argmax(SamplerGrid& g, float& v, u32& id) {
    const int slot = g.slot++ & 1;
    double* part = g.parts + slot * gridDim.x;
    u32* ids = g.ids + slot * gridDim.x;
    if (threadIdx.x == 0) {
        part[blockIdx.x] = v;
        ids[blockIdx.x] = id;
    }
    grid_sync(g.barrier);
    v = NEG_INF;
    id = 0xffffffffu;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x)
        take_better(v, id, (float)__ldcg(part + b), __ldcg(ids + b));
    block_argmax(v, id);  // id 0 when no block holds a value
}

// Per-block counts (valid in thread 0): the blocks' total and the sum over blocks before this
// one, in every thread.
__device__ void grid_count(SamplerGrid& g, u32 count, long long& total, long long& before,
                           int* scratch) {
    u32* ids = g.ids + (g.slot++ & 1) * gridDim.x;
    if (threadIdx.x == 0) ids[blockIdx.x] = count;
    grid_sync(g.barrier);
    int t = 0, mine = 0;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
        const int c = (int)__ldcg(ids + b);
        t += c;
        if (b < (int)blockIdx.x) mine += c;
    }
    // The scans' totals are the block sums of every thread's share.
    int block_total;
    block_exclusive_scan(t, block_total, scratch);
    total = block_total;
    block_exclusive_scan(mine, block_total, scratch);
    before = block_total;
}

// Shared memory of the sampler (dynamic): per-warp histograms, the merged bins, small scratch.
struct SampleShared {
    double* hist;      // [SAMPLER_WARPS][RADIX_BINS]
    double* bins;      // [RADIX_BINS]
    double* dscratch;  // [SAMPLE_WARPS]
    int* iscratch;     // [SAMPLE_WARPS]
};

// Descending selection: the largest key v among kept tokens with Σ_{kept, key ≥ v} weight
// reaching `target` (> target when `strict`, ≥ otherwise); with `relative`, `target` is first
// multiplied by the kept tokens' total weight (and returned so). Returns false when no key
// does; else sets v and `above` = Σ_{kept, key > v} weight. With `clamp` a miss takes the
// lowest non-empty bin instead (the end of the rank order). Levels below the first re-add
// the chosen bin's weights in another order; should rounding there miss, they clamp too.
// A block's histogram is per warp (spreading the shared-memory atomics) over its slice; the
// blocks' histograms are merged bin by bin (block b merges bins b, b + G, …, each in a fixed
// order), and every block then walks the same merged bins.
__device__ bool select_desc(const Logits& logits, const Kept& kept, SamplerGrid& g, int kind,
                            float top, double inv_t, double& target, bool relative, bool strict,
                            bool clamp, const SampleShared& sh, u32& v, double& above) {
    __shared__ int chosen;
    __shared__ double chosen_above;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 prefix = 0;
    above = 0.0;
    for (int level = 0; level < 4; ++level) {
        const int shift = 24 - 8 * level;
        for (int i = threadIdx.x; i < SAMPLER_WARPS * RADIX_BINS; i += blockDim.x)
            sh.hist[i] = 0.0;
        __syncthreads();
        double* mine = sh.hist + warp * RADIX_BINS;
        for_each_strided(g.lo, g.hi, logits, [&](int i, float x) {
            const u32 key = order_key(x);
            if (!kept(i, x, key)) return;
            if (level > 0 && (key >> (shift + 8)) != (prefix >> (shift + 8))) return;
            atomicAdd(&mine[(key >> shift) & (RADIX_BINS - 1)], weight(kind, x, top, inv_t));
        });
        __syncthreads();
        const int slot = g.slot++ & 1;
        double* hist = g.hist + (i64)slot * gridDim.x * RADIX_BINS;
        double* merged = g.merged + slot * RADIX_BINS;
        if (threadIdx.x < RADIX_BINS) {
            double s = 0.0;
            for (int w = 0; w < SAMPLER_WARPS; ++w) s += sh.hist[w * RADIX_BINS + threadIdx.x];
            hist[blockIdx.x * RADIX_BINS + threadIdx.x] = s;
        }
        grid_merge(hist, RADIX_BINS, merged, g.barrier);
        if (threadIdx.x < RADIX_BINS) sh.bins[threadIdx.x] = __ldcg(merged + threadIdx.x);
        __syncthreads();
        if (level == 0 && relative) {
            double total = 0.0;
            for (int b = 0; b < RADIX_BINS; ++b) total += sh.bins[b];
            target *= total;
        }
        // Warp 0 walks the bins from the top: lane l owns bins 255−8l … 248−8l.
        if (warp == 0) {
            constexpr int PER_LANE = RADIX_BINS / 32;
            double chunk = 0.0;
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) chunk += sh.bins[RADIX_BINS - 1 - PER_LANE * lane - j];
            double before = chunk;  // inclusive prefix over lanes, then made exclusive
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const double y = __shfl_up_sync(FULL_MASK, before, o);
                if (lane >= o) before += y;
            }
            before -= chunk;
            int hit = -1, last = -1;
            double run = above + before, hit_above = 0.0, last_above = 0.0;
            for (int j = 0; j < PER_LANE; ++j) {
                const int b = RADIX_BINS - 1 - PER_LANE * lane - j;
                const double next = run + sh.bins[b];
                if (hit < 0 && (strict ? next > target : next >= target)) {
                    hit = b;
                    hit_above = run;
                }
                if (sh.bins[b] > 0.0) {
                    last = b;
                    last_above = run;
                }
                run = next;
            }
            const u32 hits = __ballot_sync(FULL_MASK, hit >= 0);
            const u32 filled = __ballot_sync(FULL_MASK, last >= 0);
            if (lane == 0) chosen = -1;
            __syncwarp();
            if (hits != 0) {
                if (lane == __ffs(hits) - 1) {
                    chosen = hit;
                    chosen_above = hit_above;
                }
            } else if ((clamp || level > 0) && filled != 0 && lane == 31 - __clz(filled)) {
                chosen = last;
                chosen_above = last_above;
            }
        }
        __syncthreads();
        const int d = chosen;
        if (d < 0) return false;
        prefix |= (u32)d << shift;
        above = chosen_above;
        __syncthreads();  // `chosen` is rewritten by the next level
    }
    v = prefix;
    return true;
}

// The id of the j-th (0-based, by ascending id) kept token with key v; the last one when
// fewer exist. Threads own contiguous id ranges of their block's slice, so that a scan within
// the block and the blocks' counts before it order the matches.
__device__ int nth_with_key(const Logits& logits, const Kept& kept, SamplerGrid& g, u32 v,
                            long long j, const SampleShared& sh) {
    const int span = g.hi - g.lo;
    const int chunk = (span + blockDim.x - 1) / blockDim.x;
    const int lo = min(g.hi, g.lo + (int)threadIdx.x * chunk), hi = min(g.hi, lo + chunk);
    int count = 0;
    for_each_in_range(lo, hi, logits, [&](int i, float x) {
        const u32 key = order_key(x);
        count += key == v && kept(i, x, key);
    });
    int block_total;
    const int before = block_exclusive_scan(count, block_total, sh.iscratch);
    int* found = g.found + (g.slot++ & 1);
    if (blockIdx.x == 0 && threadIdx.x == 0) *found = 0;  // no match: id 0
    long long total, block_before;
    grid_count(g, (u32)block_total, total, block_before, sh.iscratch);
    const long long want = min(j, total - 1);
    const long long first = block_before + before;
    if (want >= first && want < first + count) {
        long long seen = first;
        for (int i = lo; i < hi; ++i) {
            const float x = logits(i);
            const u32 key = order_key(x);
            if (key == v && kept(i, x, key) && seen++ == want) *found = i;
        }
    }
    grid_sync(g.barrier);
    return __ldcg(found);
}

// ---------------------------------------------------------------------------------------------
// The candidates' path: when the tokens that can be kept are few, one block decides on them.

// A token's bin by its distance below the top logit, CUT_BINS_PER_LOGIT bins a logit, the last
// bin holding everything farther. Monotone in x, so each bin's tokens are consecutive in rank
// order (tied logits share one).
__device__ __forceinline__ int distance_bin(float top, float x) {
    const float d = (top - x) * CUT_BINS_PER_LOGIT;
    return d < (float)(RADIX_BINS - 1) ? (int)d : RADIX_BINS - 1;
}

// Where the kept tokens can end: the last distance bin that can hold one (top-k's k-th token's,
// or one past the bin where top-p's mass is reached, since the bins' masses are summed in
// another order than the walk's), how many tokens min-p keeps (`min_logit`) in it and the bins
// above, and the whole distribution's mass (top-p's reference).
struct Cut {
    int bin;
    long long count;
    double mass_all;
};

// One pass over the logits, the blocks' histograms merged as in select_desc; the same Cut in
// every thread of every block.
__device__ Cut candidate_cut(const Logits& logits, float min_logit, float top, int top_k,
                             float top_p, SamplerGrid& g, const SampleShared& sh) {
    __shared__ u32 counts[RADIX_BINS];
    __shared__ Cut cut;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = threadIdx.x; i < SAMPLER_WARPS * RADIX_BINS; i += blockDim.x) sh.hist[i] = 0.0;
    for (int i = threadIdx.x; i < RADIX_BINS; i += blockDim.x) counts[i] = 0u;
    __syncthreads();
    double* mine = sh.hist + warp * RADIX_BINS;
    double mass = 0.0;
    for_each_strided(g.lo, g.hi, logits, [&](int, float x) {
        if (!(x > NEG_INF)) return;  // −∞ and NaN weigh nothing and are never kept
        const double w = weight(WEIGHT_MASS, x, top, 0.0);
        mass += w;
        if (!(x >= min_logit)) return;
        const int b = distance_bin(top, x);
        atomicAdd(&counts[b], 1u);
        atomicAdd(&mine[b], w);
    });
    mass = block_sum_f64(mass, sh.dscratch);  // its barriers complete the histograms
    double* part = g.cut + (i64)blockIdx.x * CUT_VALUES;
    for (int b = threadIdx.x; b < RADIX_BINS; b += blockDim.x) {
        double s = 0.0;
        for (int w = 0; w < SAMPLER_WARPS; ++w) s += sh.hist[w * RADIX_BINS + b];
        part[b] = (double)counts[b];
        part[RADIX_BINS + b] = s;
    }
    if (threadIdx.x == 0) part[2 * RADIX_BINS] = mass;
    grid_merge(g.cut, CUT_VALUES, g.cut_merged, g.barrier);
    if (warp == 0) {
        // Lane l owns bins 8l … 8l + 7 (bin 0 nearest the top); counts are exact in f64.
        constexpr int PER_LANE = RADIX_BINS / 32;
        double c[PER_LANE], m[PER_LANE], csum = 0.0, msum = 0.0;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            c[j] = __ldcg(g.cut_merged + PER_LANE * lane + j);
            m[j] = __ldcg(g.cut_merged + RADIX_BINS + PER_LANE * lane + j);
            csum += c[j];
            msum += m[j];
        }
        double cbefore = csum, mbefore = msum;  // inclusive over lanes, then made exclusive
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double cy = __shfl_up_sync(FULL_MASK, cbefore, o);
            const double my = __shfl_up_sync(FULL_MASK, mbefore, o);
            if (lane >= o) {
                cbefore += cy;
                mbefore += my;
            }
        }
        cbefore -= csum;
        mbefore -= msum;
        const double mass_all = __ldcg(g.cut_merged + 2 * RADIX_BINS);
        const double limit = (double)top_p * mass_all;
        int bin_k = RADIX_BINS, bin_p = RADIX_BINS;  // none
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            cbefore += c[j];
            mbefore += m[j];
            const int b = PER_LANE * lane + j;
            if (bin_k == RADIX_BINS && top_k > 0 && cbefore >= (double)top_k) bin_k = b;
            if (bin_p == RADIX_BINS && top_p < 1.f && mbefore >= limit) bin_p = b;
        }
        bin_k = __reduce_min_sync(FULL_MASK, bin_k);
        bin_p = __reduce_min_sync(FULL_MASK, bin_p);
        const int bin = min(min(bin_k, bin_p + 1), RADIX_BINS - 1);
        double through = 0.0;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) through += PER_LANE * lane + j <= bin ? c[j] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) through += __shfl_xor_sync(FULL_MASK, through, o);
        if (lane == 0) cut = Cut{bin, (long long)through, mass_all};
    }
    __syncthreads();
    return cut;
}

// Gathers the tokens min-p keeps in distance bins up to `bin` into g.cand as rank keys (the
// order key above, the id's complement below: a larger key ranks higher), in no particular
// order; the grid meets after.
__device__ void gather_candidates(const Logits& logits, float min_logit, float top, int bin,
                                  SamplerGrid& g) {
    for_each_strided(g.lo, g.hi, logits, [&](int i, float x) {
        if (!(x > NEG_INF && x >= min_logit) || distance_bin(top, x) > bin) return;
        const u32 at = atomicAdd(g.cand_count, 1u);
        if (at < SAMPLE_CANDIDATES) g.cand[at] = ((u64)order_key(x) << 32) | (u64)~(u32)i;
    });
    grid_sync(g.barrier);
}

// The first j < len whose Σ_{i ≤ j} w(i) (a fixed order of additions) reaches `target` (passes
// it with `strict`), len if none; with `relative` the target is a share of Σ_{i < len} w(i).
// Threads own consecutive j, so the block's scan orders the partial sums.
template <class W>
__device__ int first_reaching(int len, W w, double target, bool relative, bool strict,
                              const SampleShared& sh) {
    __shared__ int found;
    const int per = (len + blockDim.x - 1) / blockDim.x;
    const int lo = min(len, (int)threadIdx.x * per), hi = min(len, lo + per);
    double local = 0.0;
    for (int j = lo; j < hi; ++j) local += w(j);
    double total;
    const double before = block_exclusive_scan(local, total, sh.dscratch);
    if (relative) target *= total;
    if (threadIdx.x == 0) found = len;
    __syncthreads();
    double run = before;
    for (int j = lo; j < hi; ++j) {
        run += w(j);
        if (strict ? run > target : run >= target) {
            atomicMin(&found, j);
            break;
        }
    }
    __syncthreads();
    return found;
}

// One block: sorts the gathered candidates by rank (a bitonic sort in shared memory), then
// keeps top-k's first k, top-p's prefix (mass ranked above below top_p of the whole, and the
// ties of the last kept) and draws u of the kept tokens' tempered mass, as the CPU does.
__device__ int draw_candidates(const SamplerGrid& g, float top, int top_k, float top_p,
                               double mass_all, double inv_t, double u, const SampleShared& sh) {
    u64* keys = (u64*)sh.hist;  // SAMPLE_CANDIDATES · 8 bytes of the histograms' room
    const int count = min((int)__ldcg(g.cand_count), SAMPLE_CANDIDATES);  // ≥ 1: the top
    int n = 1;
    while (n < count) n <<= 1;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        keys[i] = i < count ? __ldcg(g.cand + i) : 0ull;  // 0 ranks below every token
    __syncthreads();
    for (int size = 2; size <= n; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
                const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
                const u64 a = keys[lo], b = keys[hi];
                if ((a < b) == ((lo & size) == 0)) {  // descending where the bit is clear
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
    const auto value = [&](int j) { return key_float((u32)(keys[j] >> 32)); };
    const int ranked = top_k > 0 ? min(top_k, count) : count;
    int kept = ranked;
    if (top_p < 1.f) {
        const int last = first_reaching(
            ranked, [&](int j) { return weight(WEIGHT_MASS, value(j), top, 0.0); },
            (double)top_p * mass_all, false, false, sh);
        kept = min(last + 1, ranked);
        while (kept < ranked && value(kept) == value(kept - 1)) ++kept;  // ties of the last kept
    }
    const int j = first_reaching(
        kept, [&](int j) { return weight(WEIGHT_TEMPERED, value(j), top, inv_t); }, u, true, true,
        sh);
    return (int)~(u32)keys[min(j, kept - 1)];
}

// The uniform draw in [0, 1) for (seed, pos): one splitmix64 step from seed ⊕ pos·γ (the CPU
// backend's `uniform`).
__device__ double uniform(u64 seed, u64 pos) {
    const u64 gamma = 0x9e3779b97f4a7c15ull;
    u64 z = (seed ^ (pos * gamma)) + gamma;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;  // 2^53
}

// The selections' path (many tokens can be kept): top-k, then top-p, then the draw, each a
// radix selection over the whole vocabulary; the pick, valid in every thread.
__device__ int sample_by_selection(const Logits& logits, SamplerGrid& g, const SampleShared& sh,
                                   float top, float min_logit, int top_k, float top_p,
                                   double mass_all, double inv_t, double u) {
    Kept kept{min_logit, false, 0u, 0, false, 0u};
    if (top_k > 0) {
        int count = 0;
        for_each_strided(g.lo, g.hi, logits,
                         [&](int i, float x) { count += kept(i, x, order_key(x)); });
        int block_total;
        block_exclusive_scan(count, block_total, sh.iscratch);
        long long total, unused;
        grid_count(g, (u32)block_total, total, unused, sh.iscratch);
        u32 key;
        double above, target = (double)top_k;
        if (top_k < total && select_desc(logits, kept, g, WEIGHT_COUNT, top, 0.0, target, false,
                                         false, false, sh, key, above)) {
            const int id = nth_with_key(logits, kept, g, key, top_k - 1 - (long long)above, sh);
            kept.top_k = true;
            kept.key_k = key;
            kept.id_k = id;
        }
    }
    if (top_p < 1.f) {
        // The top-p limit is a share of the whole distribution's mass.
        double limit = (double)top_p * mass_all;
        u32 key;
        double above;
        if (select_desc(logits, kept, g, WEIGHT_MASS, top, 0.0, limit, false, false, false, sh,
                        key, above)) {
            // Everything tied with the crossing token stays, and ties compare as floats (as
            // on the CPU): −0 ties +0, the key just below it.
            kept.top_p = true;
            kept.key_p = key == order_key(0.f) ? order_key(-0.f) : key;
        }
    }
    // The draw: u of the kept tokens' tempered mass, found in rank order. The selection clamps,
    // so rounding past the end lands on the last token, as on the CPU.
    double target = u;
    u32 key;
    double above;
    select_desc(logits, kept, g, WEIGHT_TEMPERED, top, inv_t, target, true, true, true, sh, key,
                above);
    // Tied tokens weigh the same: the draw lands on member ⌊(target − above)/w⌋.
    const float x = key_float(key);
    const double w = weight(WEIGHT_TEMPERED, x, top, inv_t);
    const long long m = max(0ll, (long long)floor((target - above) / w));
    return nth_with_key(logits, kept, g, key, m, sh);
}

// The pick goes to token[0] and history[pos+1]. A cooperative grid of SAMPLER_THREADS-thread
// blocks; `scratch` as `SamplerGrid` (sampling.rs). Dynamic shared memory: the histograms
// (SAMPLER_WARPS+1)·RADIX_BINS doubles, then a bit per vocabulary entry when penalising.
extern "C" __global__ void __launch_bounds__(SAMPLER_THREADS, 1)  // one block an SM: no spills
    sample(const float* __restrict__ logits_in, const u32* __restrict__ pos_in,
           u32* __restrict__ token, u32* __restrict__ history, int vocab, int last_row,
           int capacity, float penalty, int window, float temperature, int top_k, float top_p,
           float min_p, u64 seed, u8* scratch) {
    kernel_entry();
    extern __shared__ double smem[];
    __shared__ double dscratch[SAMPLE_WARPS];
    __shared__ int iscratch[SAMPLE_WARPS];
    const SampleShared sh{smem, smem + SAMPLER_WARPS * RADIX_BINS, dscratch, iscratch};
    u32* seen = (u32*)(smem + (SAMPLER_WARPS + 1) * RADIX_BINS);
    const int blocks = gridDim.x, per = (vocab + blocks - 1) / blocks;
    SamplerGrid g;
    g.barrier = (u32*)scratch;
    g.parts = (double*)(scratch + 8);
    g.ids = (u32*)(g.parts + 2 * blocks);
    g.found = (int*)(g.ids + 2 * blocks);
    g.hist = (double*)(g.found + 2);  // 8-byte aligned: 16 + 24·blocks bytes in
    g.merged = g.hist + 2 * blocks * RADIX_BINS;
    g.cut = g.merged + 2 * RADIX_BINS;
    g.cut_merged = g.cut + blocks * CUT_VALUES;
    g.cand = (u64*)(g.cut_merged + CUT_VALUES);
    g.cand_count = (u32*)(g.cand + SAMPLE_CANDIDATES);
    if (blockIdx.x == 0 && threadIdx.x == 0) *g.cand_count = 0u;  // read after grid syncs
    g.slot = 0;
    g.lo = min(vocab, (int)blockIdx.x * per);
    g.hi = min(vocab, g.lo + per);
    const i64 pos = pos_in[0];

    const bool penalize = penalty != 1.f && window > 0;
    if (penalize) {
        // Every block marks the window's ids (a few) that fall in its slice, in its own bitmap:
        // it reads only its slice's bits (every pass over the logits stays in [lo, hi)).
        for (int i = (g.lo >> 5) + threadIdx.x; i < (g.hi + 31) >> 5; i += blockDim.x)
            seen[i] = 0u;
        __syncthreads();
        const i64 last = min(pos, (i64)capacity - 1);
        for (i64 i = max((i64)0, pos + 1 - window) + threadIdx.x; i <= last; i += blockDim.x) {
            const u32 t = history[i];
            if (t >= (u32)g.lo && t < (u32)g.hi) atomicOr(&seen[t >> 5], 1u << (t & 31));
        }
        __syncthreads();
    }
    const Logits logits{logits_in + (i64)last_row * vocab, penalize ? seen : nullptr, penalty};

    float top = NEG_INF;
    u32 best = 0xffffffffu;
    for_each_strided(g.lo, g.hi, logits,
                     [&](int i, float x) { take_better(top, best, x, (u32)i); });
    block_argmax(top, best, false);
    grid_argmax(g, top, best);
    int pick = (int)best;

    if (temperature != 0.f && isfinite(top)) {
        const float min_logit = min_p > 0.f ? top + logf(min_p) : NEG_INF;
        const double inv_t = 1.0 / (double)temperature;
        // With no filter every finite token is kept, too many for the candidates' path.
        const bool filtered = top_k > 0 || top_p < 1.f || min_p > 0.f;
        const Cut cut = filtered ? candidate_cut(logits, min_logit, top, top_k, top_p, g, sh)
                                 : Cut{RADIX_BINS - 1, SAMPLE_CANDIDATES + 1ll, 0.0};
        if (cut.count <= SAMPLE_CANDIDATES) {
            gather_candidates(logits, min_logit, top, cut.bin, g);
            if (blockIdx.x != 0) return;  // no grid-wide step follows
            pick = draw_candidates(g, top, top_k, top_p, cut.mass_all, inv_t,
                                   uniform(seed, (u64)pos), sh);
        } else {
            pick = sample_by_selection(logits, g, sh, top, min_logit, top_k, top_p, cut.mass_all,
                                       inv_t, uniform(seed, (u64)pos));
        }
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        token[0] = (u32)pick;
        if (pos + 1 < capacity) history[pos + 1] = (u32)pick;
    }
}

extern "C" __global__ void end_step(const u32* __restrict__ token, u32* __restrict__ pos,
                                    u32* __restrict__ ring, int ring_len) {
    kernel_entry();
    if (threadIdx.x == 0) finish_step(token[0], pos, ring, ring_len);
}
