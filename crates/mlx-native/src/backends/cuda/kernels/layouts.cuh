// Weight layouts as the matmul and embedding kernels read them: row `row` of an [n, k] matrix
// in units of 32 consecutive elements (k is a multiple of 32 for every quantized layout).
// Each layout provides
//   dot(row, u, xs, sx)  Σ w·x over unit u, the matvec's inner loop (see `shift`);
//   tile(row, k0, w)     the 32 weights from column k0 as floats (zero past k), for the tiled
//                        matmul and the embedding gather;
//   shift(e)             the power of two carried by element e's integer in `dot`.
//
// Integers become floats without the int→float instruction (a quarter-rate unit on recent
// GPUs): `field` ORs the integer into the mantissa of 2^23 and subtracts 2^23. A field that ends
// above bit 23 is first moved down by 16 bits, so the float is q·2^s with s = shift(e) ≤ 16;
// the matvec multiplies x[e] by 2^−s once per unit and reuses it for all rows of its warp, so
// the per-weight cost is one logic op, one add and one FMA.

// q·2^field_shift(pos, bits) for the unsigned field at bits [pos, pos+bits) of hi:lo (pos < 32).
// The mask and the OR into 2^23 are one lop3 (`and_or`): as `&` and `|` they were two, a fifth
// of the instructions of the SIMT matvec's dot (H100, 2026-11-26: SmolLM2 shape's decode +1.1%
// as one).
__device__ __forceinline__ float field(u32 lo, u32 hi, int pos, int bits) {
    const u32 mask = (1u << bits) - 1u;
    const bool low = pos + bits <= 23;
    const u32 w = low ? lo : __funnelshift_r(lo, hi, 16);
    return __uint_as_float(and_or(w, mask << (low ? pos : pos - 16), 0x4B000000u)) - 8388608.f;
}

__device__ __forceinline__ int field_shift(int pos, int bits) {
    return pos + bits <= 23 ? pos : pos - 16;
}

// 2^−s, exact, for 0 ≤ s < 127.
__device__ __forceinline__ float pow2_neg(int s) { return __uint_as_float((u32)(127 - s) << 23); }

// A matvec's unit of x, made ready for `dot`: sx = its two half-sums (elements 0–15, 16–31),
// then each xs[e] multiplied by 2^−shift(e) of layout L, once for all the rows it meets.
template <class L>
__device__ __forceinline__ void prescale_unit(float* xs, float* sx) {
    sx[0] = sx[1] = 0.f;
#pragma unroll
    for (int e = 0; e < 32; ++e) {
        sx[e >> 4] += xs[e];
        xs[e] *= pow2_neg(L::shift(e));
    }
}

// Two little-endian u16 loads as one word (for blocks that are only 2-byte aligned).
__device__ __forceinline__ u32 load_u32_a2(const u8* p) {
    const u16* h = (const u16*)p;
    return (u32)h[0] | ((u32)h[1] << 16);
}

__device__ __forceinline__ float load_f16(const u8* p) { return f16_to_f32(*(const u16*)p); }

// ---------------------------------------------------------------------------------------------
// MLX affine: `w` u32 [n, k*BITS/32], element j of a row at bits [j*BITS, (j+1)*BITS) of the
// row's little-endian bit stream; scales and biases [n, k/group_size] of float type `st`;
// weight = scale·q + bias. A unit is exactly BITS words and lies inside one group.
template <int BITS>
struct MlxAffine {
    const u32* w;
    const void* scales;
    const void* biases;
    int st;
    int k;
    int group_shift;  // log2(group_size / 32)

    static __device__ __forceinline__ int shift(int e) { return field_shift((e * BITS) & 31, BITS); }

    // The unit's words with the widest loads its size allows (the matmul planner checks that
    // `w` is 16-byte aligned; every unit then is aligned to its load width).
    __device__ __forceinline__ void words(int row, int u, u32* q) const {
        const u32* p = w + ((i64)row * (k / 32) + u) * BITS;
        if constexpr (BITS % 4 == 0) {
#pragma unroll
            for (int i = 0; i < BITS / 4; ++i) {
                const uint4 v = ((const uint4*)p)[i];
                q[4 * i] = v.x; q[4 * i + 1] = v.y; q[4 * i + 2] = v.z; q[4 * i + 3] = v.w;
            }
        } else if constexpr (BITS % 2 == 0) {
#pragma unroll
            for (int i = 0; i < BITS / 2; ++i) {
                const uint2 v = ((const uint2*)p)[i];
                q[2 * i] = v.x; q[2 * i + 1] = v.y;
            }
        } else {
#pragma unroll
            for (int i = 0; i < BITS; ++i) q[i] = p[i];
        }
    }

    __device__ __forceinline__ float value(const u32* q, int e) const {
        const int b = e * BITS, word = b >> 5;
        return field(q[word], word + 1 < BITS ? q[word + 1] : 0u, b & 31, BITS);
    }

    // Starts the unit's words and group parameters towards L2 (before the grid dependency
    // wait: weights never change during a forward pass).
    __device__ __forceinline__ void prefetch(int row, int u) const {
        prefetch_l2(w + ((i64)row * (k / 32) + u) * BITS);
        const i64 g = (i64)row * ((k / 32) >> group_shift) + (u >> group_shift);
        prefetch_l2((const u8*)scales + g * (st == FT_F32 ? 4 : 2));
        prefetch_l2((const u8*)biases + g * (st == FT_F32 ? 4 : 2));
    }

    __device__ __forceinline__ void scale_bias(int row, int u, float& s, float& b) const {
        const i64 g = (i64)row * ((k / 32) >> group_shift) + (u >> group_shift);
        s = load_float(scales, g, st);
        b = load_float(biases, g, st);
    }

    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float* sx) const {
        u32 q[BITS];
        words(row, u, q);
        float acc = 0.f;
#pragma unroll
        for (int e = 0; e < 32; ++e) acc = fmaf(value(q, e), xs[e], acc);
        float s, b;
        scale_bias(row, u, s, b);
        return s * acc + b * (sx[0] + sx[1]);
    }

    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        const int u = k0 / 32;
        u32 q[BITS];
        words(row, u, q);
        float s, b;
        scale_bias(row, u, s, b);
#pragma unroll
        for (int e = 0; e < 32; ++e) out[e] = fmaf(s, value(q, e) * pow2_neg(shift(e)), b);
    }
};

// ---------------------------------------------------------------------------------------------
// ggml blocks, byte layouts as in ggml-common.h. `data` holds n rows of k/block_size blocks.

// dot and tile of a ggml block of 32 elements (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): the layout L
// gives the block's address (`block`), its WORDS words of codes (`words`) and their fields
// (`value`, `shift`). The weight is d·(q − OFFSET), d the block's first two bytes, or with
// OFFSET = BLOCK32_AFFINE d·q + m, d and m its first four.
constexpr int BLOCK32_AFFINE = -1;

template <int WORDS, int OFFSET, class L>
__device__ __forceinline__ float block32_dot(const L& l, int row, int u, const float* xs,
                                             const float* sx) {
    const u8* blk = l.block(row, u);
    u32 q[WORDS];
    l.words(blk, q);
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < 32; ++e) acc = fmaf(l.value(q, e), xs[e], acc);
    if constexpr (OFFSET == BLOCK32_AFFINE)
        return load_f16(blk) * acc + load_f16(blk + 2) * (sx[0] + sx[1]);
    else return load_f16(blk) * (acc - (float)OFFSET * (sx[0] + sx[1]));
}

template <int WORDS, int OFFSET, class L>
__device__ __forceinline__ void block32_tile(const L& l, int row, int k0, float* out) {
    const u8* blk = l.block(row, k0 / 32);
    u32 q[WORDS];
    l.words(blk, q);
    if constexpr (OFFSET == BLOCK32_AFFINE) {
        const float d = load_f16(blk), m = load_f16(blk + 2);
#pragma unroll
        for (int e = 0; e < 32; ++e) out[e] = fmaf(d, l.value(q, e) * pow2_neg(L::shift(e)), m);
    } else {
        const float d = load_f16(blk);
#pragma unroll
        for (int e = 0; e < 32; ++e)
            out[e] = d * (l.value(q, e) * pow2_neg(L::shift(e)) - (float)OFFSET);
    }
}

// block_q4_0 (18 bytes): f16 d; u8 qs[16]. Element e < 16 is the low nibble of qs[e], e ≥ 16
// the high nibble of qs[e−16]; weight = d·(q − 8).
struct Q4_0 {
    const u8* data;
    int k;

    static __device__ __forceinline__ int pos(int e) { return 8 * (e & 3) + 4 * (e >> 4); }
    static __device__ __forceinline__ int shift(int e) { return field_shift(pos(e), 4); }
    __device__ __forceinline__ const u8* block(int row, int u) const {
        return data + ((i64)row * (k / 32) + u) * 18;
    }
    __device__ __forceinline__ float value(const u32* q, int e) const {
        return field(q[(e & 15) >> 2], 0u, pos(e), 4);
    }
    __device__ __forceinline__ void words(const u8* blk, u32* q) const {
#pragma unroll
        for (int i = 0; i < 4; ++i) q[i] = load_u32_a2(blk + 2 + 4 * i);
    }
    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float* sx) const {
        return block32_dot<4, 8>(*this, row, u, xs, sx);
    }
    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        block32_tile<4, 8>(*this, row, k0, out);
    }
};

// block_q4_1 (20 bytes): f16 d; f16 m; u8 qs[16]; nibbles as Q4_0; weight = d·q + m.
// The planner checks 4-byte alignment, so qs is read in words.
struct Q4_1 {
    const u8* data;
    int k;

    static __device__ __forceinline__ int pos(int e) { return 8 * (e & 3) + 4 * (e >> 4); }
    static __device__ __forceinline__ int shift(int e) { return field_shift(pos(e), 4); }
    __device__ __forceinline__ const u8* block(int row, int u) const {
        return data + ((i64)row * (k / 32) + u) * 20;
    }
    __device__ __forceinline__ float value(const u32* q, int e) const {
        return field(q[(e & 15) >> 2], 0u, pos(e), 4);
    }
    __device__ __forceinline__ void words(const u8* blk, u32* q) const {
        const u32* p = (const u32*)(blk + 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) q[i] = p[i];
    }
    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float* sx) const {
        return block32_dot<4, BLOCK32_AFFINE>(*this, row, u, xs, sx);
    }
    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        block32_tile<4, BLOCK32_AFFINE>(*this, row, k0, out);
    }
};

// A Q5_0 / Q5_1 block's 5-bit codes, one per byte in element order, from its word qh and the
// four words of qs.
__device__ __forceinline__ void q5_words(u32 qh, const u32* qs, u32* q) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        q[i] = (qs[i] & 0x0F0F0F0Fu) | fifth_bits(qh, i);
        q[i + 4] = ((qs[i] >> 4) & 0x0F0F0F0Fu) | fifth_bits(qh, i + 4);
    }
}

// block_q5_0 (22 bytes): f16 d; u8 qh[4]; u8 qs[16]. Element e's nibble as Q4_0's, bit e of the
// little-endian word qh above it; weight = d·(q − 16). Blocks are only 2-byte aligned.
struct Q5_0 {
    const u8* data;
    int k;

    static __device__ __forceinline__ int shift(int e) { return field_shift(8 * (e & 3), 5); }
    __device__ __forceinline__ const u8* block(int row, int u) const {
        return data + ((i64)row * (k / 32) + u) * 22;
    }
    __device__ __forceinline__ float value(const u32* q, int e) const {
        return field(q[e >> 2], 0u, 8 * (e & 3), 5);
    }
    __device__ __forceinline__ void words(const u8* blk, u32* q) const {
        u32 qs[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) qs[i] = load_u32_a2(blk + 6 + 4 * i);
        q5_words(load_u32_a2(blk + 2), qs, q);
    }
    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float* sx) const {
        return block32_dot<8, 16>(*this, row, u, xs, sx);
    }
    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        block32_tile<8, 16>(*this, row, k0, out);
    }
};

// block_q5_1 (24 bytes): f16 d; f16 m; u8 qh[4]; u8 qs[16]; codes as Q5_0; weight = d·q + m.
// The planner checks 4-byte alignment, so qh and qs are read in words.
struct Q5_1 {
    const u8* data;
    int k;

    static __device__ __forceinline__ int shift(int e) { return field_shift(8 * (e & 3), 5); }
    __device__ __forceinline__ const u8* block(int row, int u) const {
        return data + ((i64)row * (k / 32) + u) * 24;
    }
    __device__ __forceinline__ float value(const u32* q, int e) const {
        return field(q[e >> 2], 0u, 8 * (e & 3), 5);
    }
    __device__ __forceinline__ void words(const u8* blk, u32* q) const {
        const u32* p = (const u32*)(blk + 4);
        u32 qs[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) qs[i] = p[1 + i];
        q5_words(p[0], qs, q);
    }
    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float* sx) const {
        return block32_dot<8, BLOCK32_AFFINE>(*this, row, u, xs, sx);
    }
    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        block32_tile<8, BLOCK32_AFFINE>(*this, row, k0, out);
    }
};

// block_q8_0 (34 bytes): f16 d; i8 qs[32]; weight = d·q. Bytes are flipped to q + 128 so that
// they read as unsigned fields; the 128 is taken off through Σx.
struct Q8_0 {
    const u8* data;
    int k;

    static __device__ __forceinline__ int shift(int e) { return field_shift(8 * (e & 3), 8); }
    __device__ __forceinline__ const u8* block(int row, int u) const {
        return data + ((i64)row * (k / 32) + u) * 34;
    }
    __device__ __forceinline__ void words(const u8* blk, u32* q) const {
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = load_u32_a2(blk + 2 + 4 * i) ^ 0x80808080u;
    }
    __device__ __forceinline__ float value(const u32* q, int e) const {
        return field(q[e >> 2], 0u, 8 * (e & 3), 8);
    }
    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float* sx) const {
        return block32_dot<8, 128>(*this, row, u, xs, sx);
    }
    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        block32_tile<8, 128>(*this, row, k0, out);
    }
};

// The 6-bit scale and min of sub-block j of a Q4_K or Q5_K block at `blk`, packed in its 12
// bytes from offset 4 (ggml's get_scale_min_k4).
__device__ __forceinline__ void k_scale_min(const u8* blk, int j, float& sc, float& m) {
    const u8* s = blk + 4;
    if (j < 4) {
        sc = (float)(s[j] & 63);
        m = (float)(s[j + 4] & 63);
    } else {
        sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// block_q4_K (144 bytes): f16 d; f16 dmin; u8 scales[12] (eight 6-bit scale/min pairs);
// u8 qs[128]. Sub-block j (32 elements) is the low (j even) or high (j odd) nibbles of
// qs[32·(j/2) ..]; weight = d·sc_j·q − dmin·m_j.
// block_q5_K (176 bytes): f16 d; f16 dmin; u8 scales[12] (as Q4_K); u8 qh[32]; u8 qs[128]:
// Q4_K's nibbles with bit j of qh[l] above element l of sub-block j.
// The planner checks 16-byte alignment, which both block sizes keep.
template <int BITS>  // 4: Q4_K, 5: Q5_K
struct KQuantScaleMin {
    const u8* data;
    int k;

    static constexpr int BLOCK = BITS == 4 ? 144 : 176;
    static constexpr int QS = BITS == 4 ? 16 : 48;  // where the nibbles start
    static __device__ __forceinline__ int shift(int e) { return field_shift(8 * (e & 3), BITS); }
    __device__ __forceinline__ const u8* block(int row, int u) const {
        return data + ((i64)row * (k / 256) + (u >> 3)) * BLOCK;
    }
    // Sub-block j's codes, one per byte (Q4_K: each in the low half of its byte).
    __device__ __forceinline__ void words(const u8* blk, int j, u32* q) const {
        const uint4* p = (const uint4*)(blk + QS + 32 * (j >> 1));
        if constexpr (BITS == 4) {
            const uint4 a = p[0], b = p[1];
            const int s = 4 * (j & 1);
            q[0] = a.x >> s; q[1] = a.y >> s; q[2] = a.z >> s; q[3] = a.w >> s;
            q[4] = b.x >> s; q[5] = b.y >> s; q[6] = b.z >> s; q[7] = b.w >> s;
        } else {
            const uint4* h = (const uint4*)(blk + 16);
            const uint4 a = p[0], b = p[1], ha = h[0], hb = h[1];
            const u32 lo[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            const u32 hi[8] = {ha.x, ha.y, ha.z, ha.w, hb.x, hb.y, hb.z, hb.w};
            const int s = 4 * (j & 1);
#pragma unroll
            for (int i = 0; i < 8; ++i)
                q[i] = ((lo[i] >> s) & 0x0F0F0F0Fu) | (((hi[i] >> j) & 0x01010101u) << 4);
        }
    }
    __device__ __forceinline__ float value(const u32* q, int e) const {
        return field(q[e >> 2], 0u, 8 * (e & 3), BITS);
    }
    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float* sx) const {
        const u8* blk = block(row, u);
        const int j = u & 7;
        u32 q[8];
        words(blk, j, q);
        float acc = 0.f;
#pragma unroll
        for (int e = 0; e < 32; ++e) acc = fmaf(value(q, e), xs[e], acc);
        float sc, m;
        k_scale_min(blk, j, sc, m);
        return load_f16(blk) * sc * acc - load_f16(blk + 2) * m * (sx[0] + sx[1]);
    }
    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        const int u = k0 / 32, j = u & 7;
        const u8* blk = block(row, u);
        u32 q[8];
        words(blk, j, q);
        float sc, m;
        k_scale_min(blk, j, sc, m);
        const float d = load_f16(blk) * sc, dm = load_f16(blk + 2) * m;
#pragma unroll
        for (int e = 0; e < 32; ++e) out[e] = d * (value(q, e) * pow2_neg(shift(e))) - dm;
    }
};
using Q4_K = KQuantScaleMin<4>;
using Q5_K = KQuantScaleMin<5>;

// block_q6_K (210 bytes): u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d. In each half of 128
// elements, quarter t holds element l at the (t/2 ? high : low) nibble of ql[32·(t%2) + l]
// with bits 2t..2t+1 of qh[l] above it; weight = d·scale[e/16]·(q − 32).
struct Q6_K {
    const u8* data;
    int k;

    static __device__ __forceinline__ int shift(int e) { return field_shift(8 * (e & 3), 6); }
    __device__ __forceinline__ const u8* block(int row, int u) const {
        return data + ((i64)row * (k / 256) + (u >> 3)) * 210;
    }
    // The unit's 6-bit values, one per byte. Blocks are only 2-byte aligned.
    __device__ __forceinline__ void words(const u8* blk, int j, u32* q) const {
        const int half = j >> 2, t = j & 3;
        const u8* ql = blk + 64 * half + 32 * (t & 1);
        const u8* qh = blk + 128 + 32 * half;
        const int ls = 4 * (t >> 1), hs = 2 * t;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u32 lo = (load_u32_a2(ql + 4 * i) >> ls) & 0x0F0F0F0Fu;
            const u32 hi = (load_u32_a2(qh + 4 * i) >> hs) & 0x03030303u;
            q[i] = lo | (hi << 4);
        }
    }
    __device__ __forceinline__ float value(const u32* q, int e) const {
        return field(q[e >> 2], 0u, 8 * (e & 3), 6);
    }
    __device__ __forceinline__ const i8* scales(const u8* blk, int j) const {
        return (const i8*)(blk + 192 + 8 * (j >> 2) + 2 * (j & 3));
    }
    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float* sx) const {
        const u8* blk = block(row, u);
        const int j = u & 7;
        u32 q[8];
        words(blk, j, q);
        float lo = 0.f, hi = 0.f;
#pragma unroll
        for (int e = 0; e < 16; ++e) lo = fmaf(value(q, e), xs[e], lo);
#pragma unroll
        for (int e = 16; e < 32; ++e) hi = fmaf(value(q, e), xs[e], hi);
        const i8* sc = scales(blk, j);
        return load_f16(blk + 208) *
               ((float)sc[0] * (lo - 32.f * sx[0]) + (float)sc[1] * (hi - 32.f * sx[1]));
    }
    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        const int u = k0 / 32, j = u & 7;
        const u8* blk = block(row, u);
        u32 q[8];
        words(blk, j, q);
        const i8* sc = scales(blk, j);
        const float d = load_f16(blk + 208);
        const float d0 = d * (float)sc[0], d1 = d * (float)sc[1];
#pragma unroll
        for (int e = 0; e < 32; ++e)
            out[e] = (e < 16 ? d0 : d1) * (value(q, e) * pow2_neg(shift(e)) - 32.f);
    }
};

// ---------------------------------------------------------------------------------------------
// Dense rows of float type `ft` (f32, f16, bf16; GGUF F32/F16/BF16 tensors too). `dot` reads
// whole 16-byte vectors: the planner uses it only when k is a multiple of 32 and the weight
// is 16-byte aligned; `tile` reads any k, with vector loads where the unit allows.
struct Dense {
    const void* w;
    int ft;
    int k;

    static __device__ __forceinline__ int shift(int) { return 0; }
    __device__ __forceinline__ float dot(int row, int u, const float* xs, const float*) const {
        const i64 base = (i64)row * k + u * 32;
        float acc = 0.f;
        if (ft == FT_F32) {
            const float4* p = (const float4*)((const float*)w + base);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float4 v = p[i];
                acc = fmaf(v.x, xs[4 * i], acc);
                acc = fmaf(v.y, xs[4 * i + 1], acc);
                acc = fmaf(v.z, xs[4 * i + 2], acc);
                acc = fmaf(v.w, xs[4 * i + 3], acc);
            }
        } else {
            float wv[32];
            load_halves<32>((const u16*)w + base, ft, wv);
#pragma unroll
            for (int e = 0; e < 32; ++e) acc = fmaf(wv[e], xs[e], acc);
        }
        return acc;
    }
    __device__ __forceinline__ void tile(int row, int k0, float* out) const {
        const i64 base = (i64)row * k + k0;
        // Half-precision units that lie inside the row and on 16 bytes: four vector loads.
        if (ft != FT_F32 && k0 + 32 <= k && ((u64)((const u16*)w + base) & 15) == 0) {
            load_halves<32>((const u16*)w + base, ft, out);
            return;
        }
#pragma unroll
        for (int e = 0; e < 32; ++e) out[e] = k0 + e < k ? load_float(w, base + e, ft) : 0.f;
    }
};
