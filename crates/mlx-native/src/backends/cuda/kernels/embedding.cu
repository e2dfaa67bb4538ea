// Embedding gather: out[t, :] = row ids[t] of the table, dequantized to f32, times `scale`;
// ids at or past the vocabulary give zero rows. One block per token.

template <class L>
__device__ __forceinline__ void gather(const L& l, const u32* __restrict__ ids,
                                       float* __restrict__ out, u32 vocab, float scale) {
    const u32 id = ids[blockIdx.x];
    float* y = out + (i64)blockIdx.x * l.k;
    for (int u = threadIdx.x; u < l.k / 32; u += blockDim.x) {
        float w[32];
        if (id < vocab) {
            l.tile((int)id, u * 32, w);
        } else {
#pragma unroll
            for (int e = 0; e < 32; ++e) w[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < 32; ++e) y[u * 32 + e] = w[e] * scale;
    }
}

#define EMBEDDING_MLX(BITS)                                                                     \
    extern "C" __global__ void embedding_mlx##BITS(const u32* ids, const u32* w,                \
                                                   const void* scales, const void* biases,      \
                                                   int scale_type, float* out, u32 vocab, int k,\
                                                   int group_shift, float scale, int early) {   \
        kernel_entry_early(early);                                                              \
        const MlxAffine<BITS> l{w, scales, biases, scale_type, k, group_shift};                 \
        gather(l, ids, out, vocab, scale);                                                      \
    }
EMBEDDING_MLX(2)
EMBEDDING_MLX(3)
EMBEDDING_MLX(4)
EMBEDDING_MLX(5)
EMBEDDING_MLX(6)
EMBEDDING_MLX(8)

#define EMBEDDING_GGML(TYPE, NAME)                                                              \
    extern "C" __global__ void embedding_##NAME(const u32* ids, const u8* w, float* out,        \
                                                u32 vocab, int k, float scale, int early) {     \
        kernel_entry_early(early);                                                              \
        const TYPE l{w, k};                                                                     \
        gather(l, ids, out, vocab, scale);                                                      \
    }
EMBEDDING_GGML(Q4_0, q4_0)
EMBEDDING_GGML(Q4_1, q4_1)
EMBEDDING_GGML(Q5_0, q5_0)
EMBEDDING_GGML(Q5_1, q5_1)
EMBEDDING_GGML(Q8_0, q8_0)
EMBEDDING_GGML(Q4_K, q4_k)
EMBEDDING_GGML(Q5_K, q5_k)
EMBEDDING_GGML(Q6_K, q6_k)

// Dense tables of any row length, one element per thread.
extern "C" __global__ void embedding_dense(const u32* __restrict__ ids, const void* __restrict__ w,
                                           int weight_type, float* __restrict__ out, u32 vocab,
                                           int k, float scale, int early) {
    kernel_entry_early(early);
    const u32 id = ids[blockIdx.x];
    float* y = out + (i64)blockIdx.x * k;
    for (int i = threadIdx.x; i < k; i += blockDim.x)
        y[i] = id < vocab ? load_float(w, (i64)id * k + i, weight_type) * scale : 0.f;
}
