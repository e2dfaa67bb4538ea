// Token choice over the last row of the logits, one block of SAMPLE_THREADS threads.

#define SAMPLE_THREADS 1024

// Keeps the larger value, the lower id on ties.
__device__ __forceinline__ void take_better(float& v, u32& id, float ov, u32 oid) {
    if (ov > v || (ov == v && oid < id)) {
        v = ov;
        id = oid;
    }
}

// The block's best (value, id); thread 0 gets the result.
__device__ u32 block_argmax(float v, u32 id) {
    __shared__ float vals[32];
    __shared__ u32 ids[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        take_better(v, id, __shfl_xor_sync(FULL_MASK, v, o), __shfl_xor_sync(FULL_MASK, id, o));
    if (lane == 0) {
        vals[warp] = v;
        ids[warp] = id;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? vals[lane] : NEG_INF;
        id = lane < (int)(blockDim.x >> 5) ? ids[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            take_better(v, id, __shfl_xor_sync(FULL_MASK, v, o), __shfl_xor_sync(FULL_MASK, id, o));
    }
    // No id wins only when every logit is NaN; answer 0 then.
    return id == 0xffffffffu ? 0u : id;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    argmax(const float* __restrict__ logits, u32* __restrict__ token, int vocab, int last_row) {
    const float* x = logits + (i64)last_row * vocab;
    float v = NEG_INF;
    u32 id = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) take_better(v, id, x[i], (u32)i);
    const u32 best = block_argmax(v, id);
    if (threadIdx.x == 0) token[0] = best;
}

// Greedy sampling (temperature 0) with mlx-lm's repetition penalty: each distinct token among
// the history's last `window` entries (positions ≤ pos) has its logit divided by `penalty`
// when positive and multiplied when negative. The pick goes to token[0] and history[pos+1].
// Dynamic shared memory: a bit per vocabulary entry (ceil(vocab/32) words) when penalising.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_greedy(const float* __restrict__ logits, const u32* __restrict__ pos,
                  u32* __restrict__ token, u32* __restrict__ history, int vocab, int last_row,
                  int capacity, float penalty, int window) {
    extern __shared__ u32 seen[];
    const float* x = logits + (i64)last_row * vocab;
    const i64 p = pos[0];
    const bool penalize = penalty != 1.f && window > 0;
    if (penalize) {
        const int words = (vocab + 31) / 32;
        for (int i = threadIdx.x; i < words; i += blockDim.x) seen[i] = 0u;
        __syncthreads();
        const i64 last = min(p, (i64)capacity - 1);
        for (i64 i = max((i64)0, p + 1 - window) + threadIdx.x; i <= last; i += blockDim.x) {
            const u32 t = history[i];
            if (t < (u32)vocab) atomicOr(&seen[t >> 5], 1u << (t & 31));
        }
        __syncthreads();
    }
    float v = NEG_INF;
    u32 id = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float xi = x[i];
        if (penalize && (seen[i >> 5] >> (i & 31)) & 1u) xi = xi < 0.f ? xi * penalty : xi / penalty;
        take_better(v, id, xi, (u32)i);
    }
    const u32 best = block_argmax(v, id);
    if (threadIdx.x == 0) {
        token[0] = best;
        if (p + 1 < capacity) history[p + 1] = best;
    }
}
