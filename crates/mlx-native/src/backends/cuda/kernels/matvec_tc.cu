// y = x·Wᵀ (+ bias) for a single row x (decode) and MLX affine 4- or 8-bit weights, on tensor
// cores: each weight costs about one ALU instruction (a field masked into an f16 with the
// 0x6400 = 1024 trick, then 1024 subtracted in f16x2), and the multiply-adds run as
// m16n8k16 mma.sync with f32 accumulation instead of one FMA per weight.
//
// A warp owns a tile of 16 rows; lane (g = lane/4, t = lane%4) loads 16 bytes (a "chunk": 32
// 4-bit or 16 8-bit fields, always inside one group) of rows g and g+8 per step, the four
// lanes of a quad adjacent chunks, so a warp load reads 64 contiguous bytes of 8 rows. Those
// fields are the lane's A fragment as they come (a dot product is unchanged by permuting k in
// both operands); x is staged once per block in shared memory as f16 in the matching order.
// Column c of B holds x only at the slots of lane t = c/2 (zero elsewhere), so lane (g, t)
// supplies B only when g/2 == t and every lane's C fragment is the dot of its own chunk: each
// lane then folds its chunk's group scale and bias in f32 (y += s·Σq·x + b·Σx) exactly as the
// SIMT matvec does, with no group boundaries inside an mma.
//
// Bytes in flight: a warp's chunks are processed in stages of MT_STAGE chunks per row, and the
// next stage's 16-byte loads (words, raw scales and biases) are issued before the current one
// is computed (two register sets). `kgroups` warps of a block split a tile's k (steps of four
// chunks, interleaved) so that the grid fills the GPU; shared memory sums them at the end.
// GATED reads a second weight (the up projection) at the same rows and stores act(gate)·up.
// x: f16 rounding gives a relative error ≈ 2^−11 per product (the prefill tensor-core path
// rounds x alike); q is exact in f16 and the accumulation is f32.
// Launch: MT_WARPS·32 threads, ceil(n / (16·MT_WARPS/kgroups)) blocks, dynamic shared memory
// `matvec_tc_shared_bytes` (matmul.rs); x 16-byte aligned, w 16-byte aligned.

#define MT_WARPS 8
#define MT_CHUNK_WORDS 4  // one 16-byte load per row and chunk

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// The fields of one word as f16 pairs in A-fragment order. 4 bits: (e0,e4) (e1,e5) (e2,e6)
// (e3,e7); 8 bits: (e0,e2) (e1,e3). OR-ing a field into the mantissa of 1024 (0x6400) gives
// 1024 + q; a field 4 bits up gives 1024 + 16q, scaled back by one f16x2 FMA.
template <int BITS>
__device__ __forceinline__ void fields_f16(u32 w, u32* h) {
    const u32 magic = 0x64006400u;  // 1024, 1024
    if constexpr (BITS == 4) {
        const u32 w2 = w >> 8;
        h[0] = hsub2((w & 0x000f000fu) | magic, magic);
        h[1] = hfma2((w & 0x00f000f0u) | magic, 0x2c002c00u, 0xd400d400u);  // ·1/16 − 64
        h[2] = hsub2((w2 & 0x000f000fu) | magic, magic);
        h[3] = hfma2((w2 & 0x00f000f0u) | magic, 0x2c002c00u, 0xd400d400u);
    } else {
        h[0] = hsub2(__byte_perm(w, 0x64u, 0x4240), magic);
        h[1] = hsub2(__byte_perm(w, 0x64u, 0x4341), magic);
    }
}

// Scales and biases are loaded as raw bits with the weights and converted only when used, so
// that the conversion does not wait for a load issued a stage ahead.
template <int ST>
__device__ __forceinline__ u32 load_raw(const void* p, i64 i) {
    if constexpr (ST == FT_F32) return ((const u32*)p)[i];
    else return ((const u16*)p)[i];
}

template <int ST>
__device__ __forceinline__ float raw_float(u32 r) {
    if constexpr (ST == FT_F32) return __uint_as_float(r);
    else if constexpr (ST == FT_F16) return f16_to_f32((u16)r);
    else return __uint_as_float(r << 16);
}

struct MtWeight {
    const u32* w;
    const void* scales;
    const void* biases;
};

// One stage of a lane's loads: MT_STAGE chunks of rows g and g+8 for each weight.
template <int M, int STAGE>
struct MtStage {
    uint4 w[STAGE][M][2];
    u32 s[STAGE][M][2], b[STAGE][M][2];
};

// Per-warp constants of the stream.
struct MtStream {
    i64 row[2];   // rows g and g+8, clamped to n − 1
    int chunks;   // chunks per row
    int first;    // the warp's first step
    int stride;   // steps between the warp's consecutive steps (kgroups)
    int words;    // words per row
    int groups;   // groups per row
    int cshift;   // log2(chunks per group)
    int t;        // lane % 4
};

template <int BITS, int ST, int M, int STAGE>
__device__ __forceinline__ void mt_load(const MtWeight* wt, const MtStream& st, int stage,
                                        MtStage<M, STAGE>& s) {
#pragma unroll
    for (int i = 0; i < STAGE; ++i) {
        const int step = st.first + st.stride * (stage * STAGE + i);
        const int c = min(4 * step + st.t, st.chunks - 1);
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                s.w[i][m][h] = ((const uint4*)(wt[m].w + st.row[h] * st.words))[c];
                const i64 gi = st.row[h] * st.groups + (c >> st.cshift);
                s.s[i][m][h] = load_raw<ST>(wt[m].scales, gi);
                s.b[i][m][h] = load_raw<ST>(wt[m].biases, gi);
            }
    }
}

__device__ __forceinline__ u32 word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Multiplies one loaded stage and folds each chunk's scale and bias into acc[m][h].
template <int BITS, int ST, int M, int STAGE>
__device__ __forceinline__ void mt_compute(const MtStage<M, STAGE>& s, const MtStream& st,
                                           int stage, const u32* xh, const u32* zero,
                                           const float* csum, bool supplies_b,
                                           float (&acc)[M][2]) {
    constexpr int CHUNK_U32 = MT_CHUNK_WORDS * 32 / BITS / 2;  // f16 pairs of x per chunk
#pragma unroll
    for (int i = 0; i < STAGE; ++i) {
        const int c = 4 * (st.first + st.stride * (stage * STAGE + i)) + st.t;
        const bool live = c < st.chunks;
        // Lanes that supply no B column, and chunks past the row, read zeros.
        const u32* xp = supplies_b && live ? xh + c * CHUNK_U32 : zero;
        float ca[M][4], cb[M][4];  // two accumulators: shorter mma dependency chains
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int e = 0; e < 4; ++e) ca[m][e] = cb[m][e] = 0.f;
#pragma unroll
        for (int j = 0; j < CHUNK_U32 / 4; ++j) {
            const uint4 xb = *(const uint4*)(xp + 4 * j);
            const u32 b0[2] = {xb.x, xb.y}, b1[2] = {xb.z, xb.w};
#pragma unroll
            for (int m = 0; m < M; ++m) {
                if constexpr (BITS == 4) {
                    // One word per row: two mma.
                    u32 hg[4], h8[4];
                    fields_f16<4>(word(s.w[i][m][0], j), hg);
                    fields_f16<4>(word(s.w[i][m][1], j), h8);
                    const u32 a0[4] = {hg[0], h8[0], hg[1], h8[1]};
                    const u32 a1[4] = {hg[2], h8[2], hg[3], h8[3]};
                    mma_f16(ca[m], a0, b0);
                    mma_f16(cb[m], a1, b1);
                } else {
                    // Two words per row: one mma each.
                    u32 hg[2], h8[2], ig[2], i8[2];
                    fields_f16<8>(word(s.w[i][m][0], 2 * j), hg);
                    fields_f16<8>(word(s.w[i][m][1], 2 * j), h8);
                    fields_f16<8>(word(s.w[i][m][0], 2 * j + 1), ig);
                    fields_f16<8>(word(s.w[i][m][1], 2 * j + 1), i8);
                    const u32 a0[4] = {hg[0], h8[0], hg[1], h8[1]};
                    const u32 a1[4] = {ig[0], i8[0], ig[1], i8[1]};
                    mma_f16(ca[m], a0, b0);
                    mma_f16(cb[m], a1, b1);
                }
            }
        }
        const float sx = live ? csum[c] : 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // c[0] = c[1]: row g; c[2] = c[3]: row g + 8.
                const float dot = ca[m][2 * h] + cb[m][2 * h];
                acc[m][h] = fmaf(raw_float<ST>(s.s[i][m][h]), dot,
                                 fmaf(raw_float<ST>(s.b[i][m][h]), sx, acc[m][h]));
            }
    }
}

// x as f16 pairs in A-fragment order (per word of weights: 4 bits (x0,x4) (x1,x5) (x2,x6)
// (x3,x7), 8 bits (x0,x2) (x1,x3)), Σx per chunk in f32, and a chunk of zeros.
template <int BITS>
__device__ __forceinline__ void mt_stage_x(const float* __restrict__ x, int k, u32* xh,
                                           u32* zero, float* csum) {
    constexpr int CHUNK = MT_CHUNK_WORDS * 32 / BITS;  // elements per chunk
    const int chunks = k / CHUNK;
    // An RMSNorm prologue (x·w_norm·rsqrt(mean(x²) + eps)) goes here: a block_sum of x² over
    // k first, then each v[] scaled before it is rounded and summed.
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const float4* xp = (const float4*)(x + (i64)c * CHUNK);
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < CHUNK / 8; ++u) {
            const float4 p = xp[2 * u], q = xp[2 * u + 1];
            const float v[8] = {p.x, p.y, p.z, p.w, q.x, q.y, q.z, q.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) sum += v[e];
            uint4 o;
            if constexpr (BITS == 4)
                o = uint4{pack_f16x2(v[0], v[4]), pack_f16x2(v[1], v[5]),
                          pack_f16x2(v[2], v[6]), pack_f16x2(v[3], v[7])};
            else
                o = uint4{pack_f16x2(v[0], v[2]), pack_f16x2(v[1], v[3]),
                          pack_f16x2(v[4], v[6]), pack_f16x2(v[5], v[7])};
            *(uint4*)(xh + c * (CHUNK / 2) + 4 * u) = o;
        }
        csum[c] = sum;
    }
    if (threadIdx.x < CHUNK / 2) zero[threadIdx.x] = 0u;
}

template <int BITS, int ST, bool GATED>
__device__ __forceinline__ void matvec_tc(const MtWeight* wt, const float* __restrict__ x,
                                          const void* __restrict__ bias, int bias_type,
                                          float* __restrict__ out, int n, int k, int group_shift,
                                          int kgroups, int act) {
    constexpr int M = GATED ? 2 : 1;
    constexpr int STAGE = GATED ? 1 : 2;  // chunks per row and stage: 64 bytes in flight a lane
    constexpr int CHUNK = MT_CHUNK_WORDS * 32 / BITS;
    extern __shared__ __align__(16) u32 smem[];
    __shared__ float partial[MT_WARPS][M][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tiles = MT_WARPS / kgroups;
    const int tile = warp / kgroups, slice = warp % kgroups;
    const int row0 = (blockIdx.x * tiles + tile) * 16;

    MtStream st;
    st.row[0] = min(row0 + g, n - 1);
    st.row[1] = min(row0 + g + 8, n - 1);
    st.chunks = k / CHUNK;
    st.first = slice;
    st.stride = kgroups;
    st.words = k * BITS / 32;
    st.groups = (k / 32) >> group_shift;
    st.cshift = group_shift + (BITS == 8 ? 1 : 0);
    st.t = lane & 3;
    const int steps = (st.chunks + 3) / 4;
    const int mine = slice < steps ? (steps - slice + kgroups - 1) / kgroups : 0;
    const int stages = max(1, (mine + STAGE - 1) / STAGE);

    u32* xh = smem;
    u32* zero = xh + st.chunks * (CHUNK / 2);
    float* csum = (float*)(zero + CHUNK / 2);

    MtStage<M, STAGE> sa, sb;
    mt_load<BITS, ST>(wt, st, 0, sa);  // the first loads fly while x is staged
    mt_stage_x<BITS>(x, k, xh, zero, csum);
    __syncthreads();

    float acc[M][2];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = 0.f;
    const bool supplies_b = (g >> 1) == st.t;
    for (int s = 0; s < stages; s += 2) {
        if (s + 1 < stages) mt_load<BITS, ST>(wt, st, s + 1, sb);
        mt_compute<BITS, ST>(sa, st, s, xh, zero, csum, supplies_b, acc);
        if (s + 1 >= stages) break;
        if (s + 2 < stages) mt_load<BITS, ST>(wt, st, s + 2, sa);
        mt_compute<BITS, ST>(sb, st, s + 1, xh, zero, csum, supplies_b, acc);
    }

    // Sum the quad's chunks, then the tile's k slices.
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            acc[m][h] += __shfl_xor_sync(FULL_MASK, acc[m][h], 1);
            acc[m][h] += __shfl_xor_sync(FULL_MASK, acc[m][h], 2);
            if (st.t == 0) partial[warp][m][g + 8 * h] = acc[m][h];
        }
    __syncthreads();
    for (int r = threadIdx.x; r < tiles * 16; r += blockDim.x) {
        const int row = blockIdx.x * tiles * 16 + r;
        if (row >= n) break;
        const int w0 = (r >> 4) * kgroups;
        float y[M];
#pragma unroll
        for (int m = 0; m < M; ++m) {
            y[m] = 0.f;
            for (int s = 0; s < kgroups; ++s) y[m] += partial[w0 + s][m][r & 15];
        }
        if constexpr (GATED)
            out[row] = activation(y[0], act) * y[M - 1];
        else
            out[row] = bias ? y[0] + load_float(bias, row, bias_type) : y[0];
    }
}

#define MATVEC_TC(BITS, ST, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 2)                                 \
        matvec_tc_mlx##BITS##_##NAME(const float* x, const u32* w, const void* scales,             \
                                     const void* biases, const void* bias, int bias_type,          \
                                     float* out, int n, int k, int group_shift, int kgroups) {     \
        kernel_entry();                                                                            \
        const MtWeight wt[1] = {{w, scales, biases}};                                              \
        matvec_tc<BITS, ST, false>(wt, x, bias, bias_type, out, n, k, group_shift, kgroups, 0);    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 2)                                 \
        matvec_tc_gated_mlx##BITS##_##NAME(const float* x, const u32* w, const void* scales,       \
                                           const void* biases, const u32* w_up,                    \
                                           const void* scales_up, const void* biases_up,           \
                                           float* out, int n, int k, int group_shift, int kgroups, \
                                           int act) {                                              \
        kernel_entry();                                                                            \
        const MtWeight wt[2] = {{w, scales, biases}, {w_up, scales_up, biases_up}};                \
        matvec_tc<BITS, ST, true>(wt, x, nullptr, 0, out, n, k, group_shift, kgroups, act);        \
    }
#define MATVEC_TC_ALL_TYPES(BITS)                                                                  \
    MATVEC_TC(BITS, FT_F32, f32)                                                                   \
    MATVEC_TC(BITS, FT_F16, f16)                                                                   \
    MATVEC_TC(BITS, FT_BF16, bf16)
MATVEC_TC_ALL_TYPES(4)
MATVEC_TC_ALL_TYPES(8)
