// Mixture-of-experts routing of one row of router logits by one warp (route_row), for moe.cu's
// moe_route and for the gathered tensor-core matvec that routes its token itself
// (matvec_tc.cu); and the weighted sum of a token's slots that both files' combines take
// (weighted_slots). mode 0: the top_k logits, then a softmax over them (Mixtral); 1: a softmax
// over all experts, then the top_k probabilities; 2: as 1, then divided by their sum
// (norm_topk_prob). The warp scores each expert once into `score` (shared memory; lane owns
// experts lane, lane+32, …: at most 64 each, the planners check experts ≤ 2048) and each lane
// keeps its best expert not yet taken. Each of the top_k rounds takes the warp's best, the
// larger score first and the lower id among equal scores, so that slot order and ties match
// the CPU backend: two warp reductions (the largest score's order-preserving bits, then the
// lowest id holding it), after which only the winning lane rescans its experts. Lane j returns
// slot j (top_k ≤ 32, the planners check). H200, 2026-11-28: 128 experts, top 8, 9.5 → 5.7 µs
// a row (ncu, the kernel alone) against a loop of shuffles over scores recomputed each round.

// The bits of a score as an unsigned integer that orders as the floats do (−0 counted as +0,
// which compares equal to it).
__device__ __forceinline__ u32 ordered_bits(float v) {
    const u32 u = __float_as_uint(v + 0.f);
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

// The lane's best expert not in `taken` (bit i: expert lane + 32·i), or `experts` if none.
__device__ __forceinline__ int route_lane_best(const float* score, int experts, int lane,
                                               u64 taken) {
    float best = 0.f;
    int best_e = experts;
    for (int i = 0, e = lane; e < experts; ++i, e += 32) {
        if ((taken >> i) & 1) continue;
        const float v = score[e];
        if (best_e == experts || v > best) {  // ascending ids: equal scores keep the lower
            best = v;
            best_e = e;
        }
    }
    return best_e;
}

// The whole warp calls it; lane j < top_k gets slot j's expert id and weight.
__device__ __forceinline__ void route_row(const float* __restrict__ l, float* score, int experts,
                                          int top_k, int mode, u32& slot_id, float& slot_w) {
    const int lane = threadIdx.x & 31;
    float mx = NEG_INF;
    for (int e = lane; e < experts; e += 32) {
        score[e] = l[e];
        mx = fmaxf(mx, score[e]);
    }
    mx = warp_max(mx);
    if (mode != 0) {
        float sum = 0.f;
        for (int e = lane; e < experts; e += 32) sum += expf(score[e] - mx);
        sum = warp_sum(sum);
        for (int e = lane; e < experts; e += 32) score[e] = expf(score[e] - mx) / sum;
    }
    __syncwarp();
    u64 taken = 0;
    int mine = route_lane_best(score, experts, lane, taken);
    slot_id = 0;
    slot_w = 0.f;
    for (int j = 0; j < top_k; ++j) {
        const u32 key = mine < experts ? ordered_bits(score[mine]) : 0u;
        const u32 top = __reduce_max_sync(FULL_MASK, key);
        const u32 id = __reduce_min_sync(FULL_MASK, mine < experts && key == top ? mine : ~0u);
        const u32 e = min(id, (u32)experts - 1);
        if (lane == j) {
            slot_id = e;
            slot_w = score[e];
        }
        if (lane == (int)(id & 31)) {
            taken |= 1ull << (id >> 5);
            mine = route_lane_best(score, experts, lane, taken);
        }
    }
    const bool slot = lane < top_k;
    if (mode == 0) {
        // Slot 0 holds the largest logit.
        const float top = __shfl_sync(FULL_MASK, slot_w, 0);
        slot_w = slot ? expf(slot_w - top) : 0.f;
    }
    if (mode != 1) slot_w /= warp_sum(slot ? slot_w : 0.f);
    __syncwarp();  // `score` may be reused
}

// Σ_j w[j]·y[j·stride] over a token's top_k slots, in slot order as mlx-lm sums them, each y
// read through `load` (the tensor-core kernel reads rows other blocks of its grid stored).
template <class Load>
__device__ __forceinline__ float weighted_slots(const float* w, const float* y, i64 stride,
                                                int top_k, Load load) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) acc += w[j] * load(y + (i64)j * stride);
    return acc;
}
