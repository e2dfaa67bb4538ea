// y = x·Wᵀ (+ bias) for a single row x (decode) and MLX affine 4- or 8-bit or ggml Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K weights (the formats `MtMlx`, `MtQ4_0`, … below), on
// tensor cores: a 4-bit weight costs 5/8 of an ALU instruction (its field ORed into the mantissa
// of an f16 as it lies, `fields_f16`), and the multiply-adds run as m16n8k16 mma.sync with f32
// accumulation instead of one FMA per weight.
// Each f16 carries an offset (1024 + q, or 64 + q for a field 4 bits up) that a chunk's dot
// sheds at once: Σ offset·x over the chunk's staged x is the same for all rows, so the staging
// computes it once a block (`F::offset`, the `cfold` array).
//
// A warp owns a tile of 16 rows; lane (g = lane/4, t = lane%4) loads 16 bytes (a "chunk": 32
// 4-bit or 16 8-bit fields, always inside one group) of rows g and g+8 per step, the four
// lanes of a quad adjacent chunks, so a warp load reads 64 contiguous bytes of 8 rows. Those
// fields are the lane's A fragment as they come (a dot product is unchanged by permuting k in
// both operands); x is staged once per block in shared memory as f16 in the matching order.
// Column c of B holds x only at the slots of lane t = c/2 (zero elsewhere), so lane (g, t)
// supplies B only when g/2 == t and every lane's C fragment is the dot of its own chunk: each
// lane then folds its chunk's group scale and bias in f32 (y += s·Σq·x + b·Σx) as the SIMT
// matvec does, with no group boundaries inside an mma. A Q4_0 chunk is one block of 32
// fields (its d the scale, no bias), the quad's four blocks loaded as 8-byte words.
//
// Bytes in flight: a warp's chunks are processed in stages of F::STAGE chunks per row, and the
// next stage's loads (words, raw scales and biases) are issued before the current one
// is computed (two register sets). A block owns `tiles` = ⌈⌈n/16⌉ / blocks⌉ 16-row tiles, and
// `kgroups` of its warps split each tile's k (steps of four chunks, interleaved) so that the
// grid fills the GPU (warps past tiles·kgroups idle); shared memory sums them at the end.
// GATED reads a second weight (the up projection) at the same rows and stores act(gate)·up.
// x: f16 rounding gives a relative error ≈ 2^−11 per product (the prefill tensor-core path
// rounds x alike); q is exact in f16 and the accumulation is f32.
// Launch: up to MT_WARPS·32 threads (one block an SM; half that, two an SM, for multi-wave
// grids), blocks such that tiles·kgroups ≤ warps, dynamic shared memory (`matvec_tc_plan`,
// matmul.rs); x 16-byte aligned, MLX w 16-byte aligned, Q4_0 rows 8-byte.
// The block's RMSNorm, if any, is split: x·(g + offset) is staged (mt_stage_x_parts,
// mt_stage_x_chunks) and the rows' sums are scaled by r = rsqrt(mean(x²) + eps) at the end,
// so no block-wide sum precedes the loop. The kernels wait for the previous kernel inside
// `matvec_tc`, after their first weight loads.
// UPDATE (`matvec_tc_normup_…`, with the norm): x is first the residual stream plus the previous
// block's normed output, x + y·(gu + offset)·rsqrt(mean(y²) + eps) (Gemma's sandwich norms),
// which every block forms alike while staging and block 0 stores for the later kernels. That
// one block-wide sum before the loop replaces a norm kernel of its own (`MtUpdate`).
// GATHER (`gather_matvec_tc_…`, MoE decode): block (x, slot) multiplies rows of the slot's
// expert, which the previous kernel chose or the block routes itself (`MtExpert`), so its first
// weights are requested after the wait; a plain product can also sum the token's slots into
// the MoE block's output (`MtCombine`). H200, 2026-11-28, Qwen3-30B-A3B shape decode after 128
// tokens: 449.5 → 572.9 tok/s against moe.cu's SIMT matvecs (ncu, the kernels alone: gated
// 14.1 → 10.3 µs, down 8.7 → 7.1), 578.3 with the routing in the gated kernel (387 → 339
// kernels a token), 584.4 (against 575.7) with the combine in the down kernel (291).

#define MT_WARPS 16
#define MT_CHUNK_WORDS 4  // one 16-byte load per row and chunk

// The fields of one word as f16 pairs in A-fragment order, each ORed into the mantissa of a
// power of two whose mantissa step is 1 at the field's bits. 4 bits: (e0,e4) (e1,e5) (e2,e6)
// (e3,e7), the even elements at bits 0–3 of 1024 (0x6400) as 1024 + q, the odd ones at bits 4–7
// of 64 (0x5400, step 1/16) as 64 + q; 8 bits: (e0,e2) (e1,e3) as 1024 + q. The offsets come off
// per chunk (`F::offset`), not per pair: with an f16x2 subtraction or FMA a pair (and the mask
// and OR as two logic ops), the 8B shape's decode read 471 tok/s, 495 so (H100, 2026-11-27).
template <int BITS>
__device__ __forceinline__ void fields_f16(u32 w, u32* h) {
    if constexpr (BITS == 4) {
        const u32 w2 = w >> 8;
        h[0] = and_or(w, 0x000f000fu, 0x64006400u);
        h[1] = and_or(w, 0x00f000f0u, 0x54005400u);
        h[2] = and_or(w2, 0x000f000fu, 0x64006400u);
        h[3] = and_or(w2, 0x00f000f0u, 0x54005400u);
    } else {
        h[0] = __byte_perm(w, 0x64u, 0x4240);
        h[1] = __byte_perm(w, 0x64u, 0x4341);
    }
}

// Loads of weights, scales and biases: read once, so through the non-coherent path, and with
// L2 fetching 256 bytes a miss (the row's next chunks and groups, which the tile's other k
// slices read next). H100, 2026-11-26, decode after 128 tokens: MLX 16-byte weight loads 8B
// +1.2% (+2.0% in a later build), 1B +0.3%; the scale and bias loads as well, 8B +1.1%; Q4_0's
// 8-byte weight loads, 8B Q4_0 +3.4%; the 1B shapes within noise for both. Without L1
// allocation as well: 8B −1.5%.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
    uint4 v;
    asm("ld.global.nc.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 load_stream8(const void* p) {
    uint2 v;
    asm("ld.global.nc.L2::256B.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 load_stream4(const void* p) {
    u32 v;
    asm("ld.global.nc.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 load_stream2(const void* p) {
    u16 v;
    asm("ld.global.nc.L2::256B.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// Scales and biases are loaded as raw bits with the weights and converted only when used, so
// that the conversion does not wait for a load issued a stage ahead.
template <int ST>
__device__ __forceinline__ u32 load_raw(const void* p, u32 i) {
    if constexpr (ST == FT_F32) return load_stream4((const u32*)p + i);
    else return load_stream2((const u16*)p + i);
}

template <int ST>
__device__ __forceinline__ float raw_float(u32 r) {
    if constexpr (ST == FT_F32) return __uint_as_float(r);
    else if constexpr (ST == FT_F16) return f16_to_f32((u16)r);
    else return __uint_as_float(r << 16);
}

struct MtWeight {
    const u8* w;
    const void* scales;  // MLX only
    const void* biases;
};

// Per-warp constants of the stream. Offsets are 32-bit indices from the weight's base (the
// planner keeps matrices under 2^32 elements), so that each address is one wide multiply-add
// of an index and a kernel argument: with 64-bit offsets, the gated 4-bit kernel spent about 45
// of its ~205 instructions a stage on addresses (sm_90 SASS; H100, 2026-11-27: 8B +0.8%).
struct MtStream {
    u32 unit_row[2];   // rows g and g+8 (clamped to n − 1) times the row's F::UNIT-byte units
    u32 group_row[2];  // MLX: the same rows times groups per row
    int chunks;        // chunks per row
    int first;         // the warp's first step
    int stride;        // steps between the warp's consecutive steps (kgroups)
    int cshift;        // MLX: log2(chunks per group)
    int t;             // lane % 4
};

__device__ __forceinline__ u32 word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// An integer below 2^23 as a float: its bits ORed into the mantissa of 2^23, which then comes
// off (two full-rate instructions; the conversion instruction runs at a quarter of the rate).
__device__ __forceinline__ float small_u32_float(u32 v) {
    return __uint_as_float(0x4b000000u | v) - 8388608.f;
}

// Σx over one staged uint4 of f16 pairs, from x as the mma reads it (rounded): for formats whose
// staged uint4 shares one field offset (K-quants' runs), which then multiplies the sum once.
__device__ __forceinline__ float mt_staged_sum(const u32* o) {
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) sum += f16_to_f32((u16)o[q]) + f16_to_f32((u16)(o[q] >> 16));
    return sum;
}

// Σ offset·x over one staged uint4 of f16 pairs, from x as the mma reads it (rounded).
template <class F>
__device__ __forceinline__ float mt_offsets(const u32* o) {
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q)
        sum = fmaf(F::offset(q), f16_to_f32((u16)o[q]) + f16_to_f32((u16)(o[q] >> 16)), sum);
    return sum;
}

// A weight format of the kernel: what a lane loads for one chunk of one row (`Raw`, issued a
// stage ahead), the f16 pairs of the chunk's j-th 8 fields (p[0], p[1]: the A registers of the
// first mma, p[2], p[3]: of the second), the x order that matches them (`slot`: the chunk
// element in slot e of the j-th staged uint4, slots paired as (0, 1) (2, 3) (4, 5) (6, 7), for the
// first chunk of a quad or another), what the fields of pair p hold besides their integers
// (`offset`: the chunk's dot less Σ offset·x is Σ q·x), and the fold of that into the row sum.
//
// MLX affine: a chunk is one 16-byte load (32 4-bit or 16 8-bit fields) inside one group.
template <int BITS, int ST>
struct MtMlx {
    static constexpr int CHUNK = MT_CHUNK_WORDS * 32 / BITS;
    static constexpr int UNIT = 16;  // bytes of a chunk
    static constexpr int STAGE = 2;  // chunks per row and stage, not gated
    static constexpr bool PARTS = true;  // x staged in parts of 8 elements (mt_stage_x_parts)
    static constexpr int SUBS = 1;       // scales a chunk
    using Fold = float2;                 // a chunk's staged sums: Σx, Σ offset·x
    struct Raw {
        uint4 w;
        u32 s, b;
    };
    static __device__ __forceinline__ void load(const MtWeight& wt, const MtStream& st, int h,
                                                int c, Raw& r) {
        r.w = load_stream16((const uint4*)wt.w + (st.unit_row[h] + c));
        const u32 gi = st.group_row[h] + (c >> st.cshift);
        r.s = load_raw<ST>(wt.scales, gi);
        r.b = load_raw<ST>(wt.biases, gi);
    }
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        if constexpr (BITS == 4) {
            fields_f16<4>(word(r.w, j), p);
        } else {
            fields_f16<8>(word(r.w, 2 * j), p);
            fields_f16<8>(word(r.w, 2 * j + 1), p + 2);
        }
    }
    static __device__ __forceinline__ int slot(bool, int j, int e) {
        const int q = e >> 1;  // the pair
        return BITS == 4 ? 8 * j + q + 4 * (e & 1) : 8 * j + 4 * (q >> 1) + (q & 1) + 2 * (e & 1);
    }
    static __device__ __forceinline__ float offset(int p) {
        return BITS == 4 && (p & 1) ? 64.f : 1024.f;
    }
    static __device__ __forceinline__ float fold(const Raw& r, float dot, float sx, float acc) {
        return fmaf(raw_float<ST>(r.s), dot, fmaf(raw_float<ST>(r.b), sx, acc));
    }
};

// ggml Q4_0 (18-byte blocks: f16 d, 16 bytes of nibbles, w = d·(q − 8)): a chunk is one block,
// so the quad's four chunks are 72 contiguous bytes, 8-byte aligned (the planner takes rows of
// k % 128 == 0 from an 8-byte aligned base). Lane t loads the three 8-byte words at byte 16t,
// which hold its block at byte 2t: three wide loads instead of the five 4-byte words that span
// a 2-byte aligned block (H200, 4096×14336: 23.7 µs before). Each quant word is one byte_perm
// of two loaded words; lane 0's block starts at byte 0, so its nibble words come whole from
// bytes 4..15 and its last one joins bytes 2, 3, 16, 17, an order x is staged in for the first
// chunk of each quad (`slot`). The nibbles become f16 as MLX 4-bit fields do; their offsets
// include the 8 (1032 and 72), so the fold is d·dot (no Σx). Q8_0 loads its quads alike
// (`MtQ8_0`).
struct MtQ4_0 {
    static constexpr int CHUNK = 32;
    static constexpr int BLOCK = 18;
    static constexpr int UNIT = 8;  // bytes of a load
    static constexpr int STAGE = 2;
    static constexpr bool PARTS = false;
    static constexpr int SUBS = 1;
    static constexpr int RUN = 32;  // contiguous elements of x a chunk (mt_stage_x_chunks)
    using Fold = float2;            // 0, Σ offset·x
    struct Raw {
        u32 w[6];  // bytes 16t .. 16t + 23 of the quad's blocks; lane 0: w[5] = w[0]
    };
    static __device__ __forceinline__ void load(const MtWeight& wt, const MtStream& st, int h,
                                                int c, Raw& r) {
        const uint2* p = (const uint2*)wt.w + (st.unit_row[h] + 4 * BLOCK / UNIT * (c >> 2) +
                                                2 * st.t);
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            const uint2 v = load_stream8(p + i);
            r.w[2 * i] = v.x;
            r.w[2 * i + 1] = v.y;
        }
        if (st.t == 0) r.w[5] = r.w[0];  // bytes 2, 3 of the last nibble word
    }
    // Byte b of quant word j: elements qb and qb + 16 (low and high nibble), qb = 4j + b, but
    // for lane 0 4j + b + 2 (j < 3), and 0, 1, 14, 15 (j = 3).
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        const u32 t = threadIdx.x & 3;
        const u32 sel = t < 2 ? 0x3210u : 0x3210u + 0x2222u * (t - 1);
        fields_f16<4>(__byte_perm(r.w[j + 1], r.w[j + 2], j == 3 && t == 0 ? 0x1076u : sel), p);
    }
    static __device__ __forceinline__ int slot(bool quad_first, int j, int e) {
        const int q = e >> 1, b = (q >> 1) + 2 * (e & 1);
        const int qb = !quad_first ? 4 * j + b : j < 3 ? 4 * j + b + 2 : b < 2 ? b : 12 + b;
        return qb + 16 * (q & 1);
    }
    static __device__ __forceinline__ float offset(int p) { return p & 1 ? 72.f : 1032.f; }
    static __device__ __forceinline__ i64 x_at(int c, int) { return (i64)c * CHUNK; }
    static __device__ __forceinline__ void stage_fold(int, const u32* o, const float*, Fold& f) {
        f.y += mt_offsets<MtQ4_0>(o);
    }
    static __device__ __forceinline__ float fold(const Raw& r, float dot, float, float acc) {
        const u32 t = threadIdx.x & 3;
        const u32 d = __byte_perm(r.w[0], r.w[1], 0x10u + 0x22u * t) & 0xffffu;
        return fmaf(f16_to_f32((u16)d), dot, acc);
    }
};

// ggml Q8_0 (34-byte blocks: f16 d, 32 int8 q, w = d·q): a chunk is one block, a quad's four
// blocks 136 contiguous bytes (rows of k % 128 == 0 from an 8-byte aligned base, as Q4_0's).
// Lane t loads the five 8-byte words at byte 32t, which hold its block at byte 2t: its d is
// half of word 0 or 1, and quant word i one byte_perm of words i and i + 1 (t < 2) or i + 1 and
// i + 2, at a 2-byte or 4-byte shift. The int8 become q + 128 (one XOR a word) in MLX 8-bit's
// fields, offset 1152; the fold is d·dot, as Q4_0's. One chunk a stage.
// H100, 2026-11-28, decode after 128 tokens (from matvec.cu's kernels and their norm launches):
// 1B shape 1,057 → 1,431 tok/s (46.4 → 62.8% of the bound), 8B 236.2 → 293.0 (62.6 → 77.7%).
// Nine aligned 4-byte words a block (one byte_perm a quant word) read 1,259 and 256.8, two
// chunks a stage so 1,277 and 258.8: the wide loads carry it.
struct MtQ8_0 {
    static constexpr int CHUNK = 32;
    static constexpr int UNIT = 8;  // bytes of a load: a quad of blocks is 17
    static constexpr int STAGE = 1;
    static constexpr bool PARTS = false;
    static constexpr int SUBS = 1;
    static constexpr int RUN = 32;
    using Fold = float2;  // 0, Σ offset·x
    struct Raw {
        u32 w[10];  // bytes 32t .. 32t + 39 of the quad's blocks
    };
    static __device__ __forceinline__ void load(const MtWeight& wt, const MtStream& st, int h,
                                                int c, Raw& r) {
        const uint2* p = (const uint2*)wt.w + (st.unit_row[h] + 17 * (c >> 2) + 4 * st.t);
#pragma unroll
        for (int i = 0; i < 5; ++i) {
            const uint2 v = load_stream8(p + i);
            r.w[2 * i] = v.x;
            r.w[2 * i + 1] = v.y;
        }
    }
    // Quant word i (elements 4i … 4i + 3) as q + 128.
    static __device__ __forceinline__ u32 quants(const Raw& r, int i) {
        const u32 t = threadIdx.x & 3, sel = t & 1 ? 0x7654u : 0x5432u;
        const u32 v = t < 2 ? __byte_perm(r.w[i], r.w[i + 1], sel)
                            : __byte_perm(r.w[i + 1], r.w[i + 2], sel);
        return v ^ 0x80808080u;
    }
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        fields_f16<8>(quants(r, 2 * j), p);
        fields_f16<8>(quants(r, 2 * j + 1), p + 2);
    }
    static __device__ __forceinline__ int slot(bool, int j, int e) {
        return MtMlx<8, FT_F32>::slot(false, j, e);
    }
    static __device__ __forceinline__ float offset(int) { return 1152.f; }
    static __device__ __forceinline__ i64 x_at(int c, int) { return (i64)c * CHUNK; }
    static __device__ __forceinline__ void stage_fold(int, const u32* o, const float*, Fold& f) {
        f.y += mt_offsets<MtQ8_0>(o);
    }
    static __device__ __forceinline__ float fold(const Raw& r, float dot, float, float acc) {
        const u32 t = threadIdx.x & 3;
        const u32 d = ((t < 2 ? r.w[0] : r.w[1]) >> (16 * (t & 1))) & 0xffffu;
        return fmaf(f16_to_f32((u16)d), dot, acc);
    }
};

// ggml blocks of 32 elements whose rows are read in the aligned 4-byte words around each block
// (F: the format; WORDS: words a block; BLOCK: its bytes): rows of an even number of blocks
// from 4-byte aligned data (the planner's paired rows) are 4-byte aligned, so block c starts
// 2·(c % 2) bytes past a word and the words never pass the row's end (its last block is odd).
// A chunk is one block: its f16 d first, then the words at its bytes 2 + 4i, each a funnel
// shift of two loaded words (`word`); the fold is d·dot, the staged sum Σ offset·x.
template <class F, int WORDS, int BLOCK, int STAGE_>
struct MtWords {
    static constexpr int CHUNK = 32;
    static constexpr int UNIT = 2;  // bytes of a row unit
    static constexpr int STAGE = STAGE_;
    static constexpr bool PARTS = false;
    static constexpr int SUBS = 1;
    static constexpr int RUN = 32;
    using Fold = float2;  // 0, Σ offset·x
    struct Raw {
        u32 w[WORDS];
        u32 shift;  // 16 + 8 × the block's offset in its first word: bytes 2.. of the block
    };
    static __device__ __forceinline__ void load(const MtWeight& wt, const MtStream& st, int h,
                                                int c, Raw& r) {
        const u32 at = 2 * st.unit_row[h] + BLOCK * c;
        const u32* p = (const u32*)(wt.w + (at & ~3u));
#pragma unroll
        for (int i = 0; i < WORDS; ++i) r.w[i] = load_stream4(p + i);
        r.shift = 16 + 8 * (at & 2);
    }
    // The block's bytes 2 + 4i … 5 + 4i.
    static __device__ __forceinline__ u32 word(const Raw& r, int i) {
        return __funnelshift_rc(r.w[i], r.w[i + 1], r.shift);
    }
    static __device__ __forceinline__ i64 x_at(int c, int) { return (i64)c * CHUNK; }
    static __device__ __forceinline__ void stage_fold(int, const u32* o, const float*, Fold& f) {
        f.y += mt_offsets<F>(o);
    }
    static __device__ __forceinline__ float fold(const Raw& r, float dot, float, float acc) {
        const u32 d = (r.w[0] >> (r.shift - 16)) & 0xffffu;
        return fmaf(f16_to_f32((u16)d), dot, acc);
    }
};

// ggml Q4_0 rows that are not whole quads (k % 128 == 64, as SmolLM2's 576): five words a
// block, nibble word j in `MtQ4_1`'s order, `MtQ4_0`'s offsets.
struct MtQ4_0Words : MtWords<MtQ4_0Words, 5, 18, 2> {
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        fields_f16<4>(word(r, j), p);
    }
    static __device__ __forceinline__ int slot(bool, int j, int e) {
        return MtQ4_0::slot(false, j, e);
    }
    static __device__ __forceinline__ float offset(int p) { return MtQ4_0::offset(p); }
};

// ggml Q8_0 rows off quads: nine words a block, quant word i `word(i)`; otherwise `MtQ8_0`'s
// fields and offsets. One chunk a stage.
struct MtQ8_0Words : MtWords<MtQ8_0Words, 9, 34, 1> {
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        fields_f16<8>(word(r, 2 * j) ^ 0x80808080u, p);
        fields_f16<8>(word(r, 2 * j + 1) ^ 0x80808080u, p + 2);
    }
    static __device__ __forceinline__ int slot(bool, int j, int e) {
        return MtQ8_0::slot(false, j, e);
    }
    static __device__ __forceinline__ float offset(int) { return 1152.f; }
};

// ggml blocks of 32 elements with a minimum whose blocks are 4-byte aligned (F: the format,
// WORDS: 4-byte words a block; Q4_1, Q5_1): a chunk is one block, its words loaded whole, the
// first f16 d and m; chunks in `MtQ4_0`'s order, staged with Σx and Σ offset·x, folded as
// d·Σq·x + m·Σx (as MLX's).
template <class F, int WORDS>
struct MtAffine {
    static constexpr int CHUNK = 32;
    static constexpr int UNIT = 4;  // bytes of a load
    static constexpr int STAGE = 2;
    static constexpr bool PARTS = false;
    static constexpr int SUBS = 1;
    static constexpr int RUN = 32;
    using Fold = float2;  // Σx, Σ offset·x
    struct Raw {
        u32 w[WORDS];  // d and m, then the format's words
    };
    static __device__ __forceinline__ void load(const MtWeight& wt, const MtStream& st, int h,
                                                int c, Raw& r) {
        const u32* p = (const u32*)wt.w + (st.unit_row[h] + WORDS * c);
#pragma unroll
        for (int i = 0; i < WORDS; ++i) r.w[i] = load_stream4(p + i);
    }
    static __device__ __forceinline__ int slot(bool, int j, int e) {
        return MtQ4_0::slot(false, j, e);
    }
    static __device__ __forceinline__ i64 x_at(int c, int) { return (i64)c * CHUNK; }
    static __device__ __forceinline__ void stage_fold(int j, const u32* o, const float* v,
                                                      Fold& f) {
        float sum = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += v[slot(false, j, e)];
        f.x += sum;
        f.y += mt_offsets<F>(o);
    }
    static __device__ __forceinline__ float fold(const Raw& r, float dot, float sx, float acc) {
        const float d = f16_to_f32((u16)r.w[0]), m = f16_to_f32((u16)(r.w[0] >> 16));
        return fmaf(d, dot, fmaf(m, sx, acc));
    }
};

// ggml Q4_1 (20-byte blocks: f16 d and m, 16 bytes of nibbles, w = d·q + m): five words a block
// (`MtAffine`). Its nibbles lie as Q4_0's (element i in the low nibble of byte i, i + 16 in the
// high one), in the order of a Q4_0 chunk that is not first in its quad, as 1024 + q and 64 + q.
// H100, 2026-11-28, decode after 128 tokens (from matvec.cu's kernels, which also needed a norm
// launch in front of each normed matvec): Q4_1 1B shape 1,452 → 1,920 tok/s, 8B 338.4 → 417.8,
// SmolLM2's shape 2,185 → 2,893.
struct MtQ4_1 : MtAffine<MtQ4_1, 5> {
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        fields_f16<4>(r.w[1 + j], p);
    }
    static __device__ __forceinline__ float offset(int p) { return p & 1 ? 64.f : 1024.f; }
};

// The f16 pairs of a Q5_0 / Q5_1 chunk's j-th 8 fields, in `MtQ4_1`'s order (elements 4j + {0,
// 2}, 4j + 16 + {0, 2}, 4j + {1, 3}, 4j + 16 + {1, 3}): each byte of qs word j becomes two 5-bit
// codes, its low and high nibble with their fifth bits from qh at bit 4 (`fifth_bits`), ORed
// into 1024 as 1024 + q.
__device__ __forceinline__ void q5_pairs(u32 qh, u32 qs, int j, u32* p) {
    const u32 lo = (qs & 0x0f0f0f0fu) | fifth_bits(qh, j);
    const u32 hi = ((qs >> 4) & 0x0f0f0f0fu) | fifth_bits(qh, j + 4);
    p[0] = and_or(lo, 0x001f001fu, 0x64006400u);
    p[1] = and_or(hi, 0x001f001fu, 0x64006400u);
    p[2] = and_or(lo >> 8, 0x001f001fu, 0x64006400u);
    p[3] = and_or(hi >> 8, 0x001f001fu, 0x64006400u);
}

// ggml Q5_0 (22-byte blocks: f16 d, the 32 fifth bits qh, 16 bytes of nibbles as Q4_0's;
// w = d·(q − 16)) on paired rows (`MtWords`): six words a block, qh `word(0)`, nibble word j
// `word(1 + j)`; offsets 1024 + 16 (`q5_pairs`). H200, 2026-11-28, decode after 128 tokens
// (from matvec.cu's kernels and their norm launches): 1B shape 1,243 → 1,580 tok/s, 8B 298.3 →
// 343.8, SmolLM2's shape 2,096 → 2,505; Q5_1 (`MtQ5_1`) 1B 1,323 → 1,663.
struct MtQ5_0 : MtWords<MtQ5_0, 6, 22, 2> {
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        q5_pairs(word(r, 0), word(r, 1 + j), j, p);
    }
    static __device__ __forceinline__ int slot(bool, int j, int e) {
        return MtQ4_0::slot(false, j, e);
    }
    static __device__ __forceinline__ float offset(int) { return 1040.f; }
};

// ggml Q5_1 (24-byte blocks: f16 d and m, qh, then Q5_0's nibbles; w = d·q + m): six words a
// block (`MtAffine`, 4-byte aligned data), offsets 1024.
struct MtQ5_1 : MtAffine<MtQ5_1, 6> {
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        q5_pairs(r.w[1], r.w[2 + j], j, p);
    }
    static __device__ __forceinline__ float offset(int) { return 1024.f; }
};

// ggml Q4_K (144-byte super-blocks of 256 elements: f16 d and dmin, the 6-bit scales and mins
// of its eight sub-blocks of 32 in 12 bytes, then 128 bytes of nibbles; w = d·sc·q − dmin·m): a
// chunk is 16 bytes of nibbles, whose low nibbles are 16 elements of sub-block 2p (p: the
// chunk's pair of sub-blocks) and whose high nibbles the same 16 of sub-block 2p + 1, 32 further
// on in the row. x is staged as the low run's 16 elements, then the high run's (`x_at`, `slot`),
// so that each mma's k lies in one sub-block: the chunk's dot comes as two (SUBS), which fold
// with their own scales and mins. A quad's four chunks lie in one super-block (a row is whole
// super-blocks, k % 256 == 0): lane t loads word t of its 16-byte header, and the fold shares
// the words by shuffles, rather than every lane holding the whole header a row in registers.
// H100, 2026-11-28, decode after 128 tokens (from matvec.cu's kernels and their norm launches):
// Q4_K 1B shape 1,282 → 2,150 tok/s, 8B 300.1 → 483.7, Qwen3-0.6B 1,006 → 1,953.
struct MtQ4K {
    static constexpr int CHUNK = 32;
    static constexpr int UNIT = 16;  // bytes of a row unit: a super-block is 9
    static constexpr int STAGE = 2;
    static constexpr bool PARTS = false;
    static constexpr int SUBS = 2;
    static constexpr int RUN = 16;
    using Fold = float4;  // Σx of the low and high run, 1024·Σx and 64·Σx of them as staged
    struct Raw {
        uint4 w;
        u32 head;  // word t of the super-block's header
    };
    static __device__ __forceinline__ void load(const MtWeight& wt, const MtStream& st, int h,
                                                int c, Raw& r) {
        const u32 block = st.unit_row[h] + 9 * (c >> 3);
        r.w = load_stream16((const uint4*)wt.w + (block + 1 + (c & 7)));
        r.head = load_stream4((const u32*)wt.w + (4 * block + st.t));
    }
    // Words 2(j % 2) and 2(j % 2) + 1 of the chunk: the low run's nibbles for j < 2, the high
    // run's for j ≥ 2, as 1024 + q resp. 64 + q.
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        const u32 w0 = word(r.w, 2 * (j & 1)), w1 = word(r.w, 2 * (j & 1) + 1);
        const u32 mask = j < 2 ? 0x000f000fu : 0x00f000f0u;
        const u32 bits = j < 2 ? 0x64006400u : 0x54005400u;
        p[0] = and_or(w0, mask, bits);
        p[1] = and_or(w0 >> 8, mask, bits);
        p[2] = and_or(w1, mask, bits);
        p[3] = and_or(w1 >> 8, mask, bits);
    }
    // Pair q of the j-th uint4 holds the nibbles of bytes 8(j % 2) + {0, 2}, {1, 3}, {4, 6},
    // {5, 7} of the chunk.
    static __device__ __forceinline__ int slot(bool, int j, int e) {
        return 8 * j + (e & 4) + ((e & 1) << 1) + ((e >> 1) & 1);
    }
    // Where run r (low, high) of chunk c starts in x.
    static __device__ __forceinline__ i64 x_at(int c, int r) {
        return 256 * (i64)(c >> 3) + 64 * ((c & 7) >> 1) + 16 * (c & 1) + 32 * r;
    }
    static __device__ __forceinline__ void stage_fold(int j, const u32* o, const float* v,
                                                      Fold& f) {
        float sum = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += v[8 * j + e];
        const float staged = mt_staged_sum(o);
        if (j < 2) {
            f.x += sum;
            f.z = fmaf(1024.f, staged, f.z);
        } else {
            f.y += sum;
            f.w = fmaf(64.f, staged, f.w);
        }
    }
    // y += d·(sc·(dot − offset·Σx as staged)·inv) − dmin·(m·Σx) over the chunk's two sub-blocks
    // (chunk c: its pair is of sub-blocks 0–3 or 4–7, alike across the warp since a quad's
    // chunks are 4·step + t). The header's words come from the quad's lanes; the scales and
    // mins are selected, not branched on, and made floats by the exponent trick.
    static __device__ __forceinline__ float fold_subs(const Raw& r, int c, const float* dot,
                                                      const Fold& f, float inv, float acc) {
        const int quad = threadIdx.x & 28;
        const u32 w0 = __shfl_sync(FULL_MASK, r.head, quad);
        const u32 w1 = __shfl_sync(FULL_MASK, r.head, quad + 1);
        const u32 w2 = __shfl_sync(FULL_MASK, r.head, quad + 2);
        const u32 w3 = __shfl_sync(FULL_MASK, r.head, quad + 3);
        // Bytes 2(t / 2) and 2(t / 2) + 1 of the scale words: the pair's two sub-blocks.
        const u32 sh = 16 * ((threadIdx.x & 3) >> 1);
        const u32 b1 = w1 >> sh, b2 = w2 >> sh, b3 = w3 >> sh;
        const bool high = c & 4;  // sub-blocks 4–7: 4 bits in b3, the top 2 in b1 resp. b2
        const u32 sc = high ? (b3 & 0x0f0fu) | ((b1 >> 2) & 0x3030u) : b1 & 0x3f3fu;
        const u32 m = high ? ((b3 >> 4) & 0x0f0fu) | ((b2 >> 2) & 0x3030u) : b2 & 0x3f3fu;
        const float d = f16_to_f32((u16)w0), dmin = f16_to_f32((u16)(w0 >> 16));
        const float scaled = fmaf(small_u32_float(sc & 0xffu), dot[0] - f.z,
                                  small_u32_float(sc >> 8) * (dot[1] - f.w));
        const float mins = fmaf(small_u32_float(m & 0xffu), f.x, small_u32_float(m >> 8) * f.y);
        return fmaf(-dmin, mins, fmaf(d, scaled * inv, acc));
    }
};

// ggml Q5_K (176-byte super-blocks: Q4_K's 16-byte header, then qh[32], then Q4_K's 128 bytes
// of nibbles; element l of sub-block j takes bit j of qh[l] as its fifth bit). A chunk is Q4_K's
// 16 bytes of nibbles (units 3 … 10 of the super-block) and the 16 bytes of qh at the same l
// (unit 1 or 2), whose bits 2p and 2p + 1 complete its low and high fields: at bit 4 of 1024 + q
// resp. bit 8 of 64 + q (a step of 1/16), so the offsets, the staging and the fold are Q4_K's.
// One chunk a stage: a lane's 36 bytes a chunk and row are about Q4_K's two chunks in flight.
// The gated kernels hold 128 registers and spill 40 bytes, yet gain over gate and up on
// matvec.cu. H100, 2026-11-28, decode after 128 tokens: 1B shape 1,185 → 1,715 tok/s (33.8 →
// 49.0% of the bound; 1,522 with the gated pairs left on matvec.cu), 8B 280.2 → 387.5 (48.1 →
// 66.5%; 355.6).
struct MtQ5K : MtQ4K {
    static constexpr int STAGE = 1;
    struct Raw : MtQ4K::Raw {
        uint4 h;  // qh at the chunk's 16 values of l
        u32 bit;  // 2p: the low run's bit of each qh byte
    };
    static __device__ __forceinline__ void load(const MtWeight& wt, const MtStream& st, int h,
                                                int c, Raw& r) {
        const u32 block = st.unit_row[h] + 11 * (c >> 3);
        r.w = load_stream16((const uint4*)wt.w + (block + 3 + (c & 7)));
        r.h = load_stream16((const uint4*)wt.w + (block + 1 + (c & 1)));
        r.head = load_stream4((const u32*)wt.w + (4 * block + st.t));
        r.bit = 2 * ((c & 7) >> 1);
    }
    // MtQ4K's pairs with each field's fifth bit ORed in.
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        MtQ4K::pairs(r, j, p);
        const bool high = j >= 2;
        const u32 up = high ? 8 : 4, mask = high ? 0x01000100u : 0x00100010u;
        const u32 h0 = word(r.h, 2 * (j & 1)) >> (r.bit + (high ? 1 : 0));
        const u32 h1 = word(r.h, 2 * (j & 1) + 1) >> (r.bit + (high ? 1 : 0));
        p[0] |= (h0 << up) & mask;
        p[1] |= ((h0 >> 8) << up) & mask;
        p[2] |= (h1 << up) & mask;
        p[3] |= ((h1 >> 8) << up) & mask;
    }
};

// ggml Q6_K (210-byte super-blocks of 256 elements: 128 bytes of low nibbles `ql`, 64 of high
// 2-bit pairs `qh`, 16 int8 scales a 16 elements, f16 d; w = d·sc·(q − 32)): element
// 128h + 32g + l takes nibble g / 2 of ql[64h + 32(g % 2) + l] and bits 2g of qh[32h + l]. A
// chunk is 8 values of l (l0 = 8t for lane t of a quad) in the four groups g of half h: the
// bytes ql[64h + l0 …], ql[64h + 32 + l0 …] and qh[32h + l0 …] (24 bytes for 32 elements, each
// loaded once), x staged as four runs of 8 (one a group, each its own scale: SUBS = 4). A
// super-block is only 2-byte aligned (every other one 4-byte aligned, from 4-byte aligned
// data), so each 8 bytes come as three aligned words realigned at use by funnel shifts
// (`shift`, 0 or 16), rows of an odd number of super-blocks included, and every load stays
// inside the matrix (its last super-block is an odd one: the planners take matrices of an even
// number of super-blocks). 6-bit fields: the nibble and the two bits moved beside it, ORed
// into 1024 (low nibbles) or 64 (high, a step of 1/16), offsets 1024 + 32 and 64 + 32 with the
// −32. Plain kernels only: a stage holds 14 words a row, too many for the gated kernel's two
// weights (Q4_K_M files keep gate and up in Q4_K). H100, 2026-11-28, decode after 128 tokens of
// uniform Q6_K models (gate and up on matvec.cu): 1B shape 830.8 → 1,128 tok/s, 8B 184.6 →
// 248.3 (37.8 → 50.9% of the bound).
struct MtQ6K {
    static constexpr int CHUNK = 32;
    static constexpr int UNIT = 1;  // row offsets in bytes: a super-block is 210
    static constexpr int STAGE = 1;
    static constexpr bool PARTS = false;
    static constexpr int SUBS = 4;
    static constexpr int RUN = 8;
    using Fold = float4;  // each group's offset times its Σx as staged
    struct Raw {
        // Aligned words around ql (groups 0 and 2), ql (1 and 3), qh, and the half's scales.
        u32 lo[3], hi[3], qh[3], sc[3];
        u32 d;  // the aligned word holding d
        u32 shift;  // 8 × the super-block's misalignment
    };
    static __device__ __forceinline__ void load3(const u8* w, u32 at, u32* v) {
        const u32* p = (const u32*)(w + (at & ~3u));
#pragma unroll
        for (int i = 0; i < 3; ++i) v[i] = load_stream4(p + i);
    }
    static __device__ __forceinline__ void load(const MtWeight& wt, const MtStream& st, int h,
                                                int c, Raw& r) {
        const u32 block = st.unit_row[h] + 210 * (c >> 3), half = (c >> 2) & 1;
        const u32 l0 = 8 * st.t;
        load3(wt.w, block + 64 * half + l0, r.lo);
        load3(wt.w, block + 64 * half + 32 + l0, r.hi);
        load3(wt.w, block + 128 + 32 * half + l0, r.qh);
        load3(wt.w, block + 192 + 8 * half, r.sc);
        r.d = load_stream4((const u32*)(wt.w + ((block + 208) & ~3u)));
        r.shift = 8 * (block & 3);
    }
    // The 6-bit fields of group j's elements 4i + {0, 2} and 4i + {1, 3} (i = 0, 1).
    static __device__ __forceinline__ void pairs(const Raw& r, int j, u32* p) {
        const u32* q = j & 1 ? r.hi : r.lo;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const u32 w = __funnelshift_r(q[i], q[i + 1], r.shift);
            const u32 hb = __funnelshift_r(r.qh[i], r.qh[i + 1], r.shift);
            // Bits 2j of each qh byte beside the nibble: at 4–5 (low nibbles) or 8–9 (high).
            const int up = j == 0 || j == 2 ? 4 : 2;
            if (j < 2) {
                p[2 * i] = ((w & 0x000f000fu) | 0x64006400u) | ((hb << up) & 0x00300030u);
                p[2 * i + 1] =
                    (((w >> 8) & 0x000f000fu) | 0x64006400u) | ((hb >> (8 - up)) & 0x00300030u);
            } else {
                p[2 * i] = ((w & 0x00f000f0u) | 0x54005400u) | ((hb << up) & 0x03000300u);
                p[2 * i + 1] =
                    (((w >> 8) & 0x00f000f0u) | 0x54005400u) | ((hb >> (8 - up)) & 0x03000300u);
            }
        }
    }
    static __device__ __forceinline__ int slot(bool, int j, int e) {
        return MtQ4K::slot(false, j, e);
    }
    // Where group r's run of chunk c starts in x.
    static __device__ __forceinline__ i64 x_at(int c, int r) {
        return 256 * (i64)(c >> 3) + 128 * ((c >> 2) & 1) + 32 * r + 8 * (c & 3);
    }
    static __device__ __forceinline__ void stage_fold(int j, const u32* o, const float*,
                                                      Fold& f) {
        const float staged = mt_staged_sum(o);
        const float offset = j < 2 ? 1056.f : 96.f;
        if (j == 0) f.x = offset * staged;
        else if (j == 1) f.y = offset * staged;
        else if (j == 2) f.z = offset * staged;
        else f.w = offset * staged;
    }
    // y += d·Σ_g sc_g·(dot_g − offset·Σx as staged)·inv; the group's scale is byte
    // 2g + t / 2 of the half's eight.
    static __device__ __forceinline__ float fold_subs(const Raw& r, int, const float* dot,
                                                      const Fold& f, float inv, float acc) {
        const u32 s0 = __funnelshift_r(r.sc[0], r.sc[1], r.shift);
        const u32 s1 = __funnelshift_r(r.sc[1], r.sc[2], r.shift);
        const u32 b = 8 * ((threadIdx.x & 3) >> 1);
        const float d = f16_to_f32((u16)(r.d >> r.shift));
        const float offs[4] = {f.x, f.y, f.z, f.w};
        float sum = 0.f;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const u32 byte = ((g < 2 ? s0 : s1) >> (b + 16 * (g & 1))) & 0xffu;
            const float sc = small_u32_float(byte ^ 0x80u) - 128.f;  // the int8, exactly
            sum = fmaf(sc, dot[g] - offs[g], sum);
        }
        return fmaf(d, sum * inv, acc);
    }
};

// One stage of a lane's loads: STAGE chunks of rows g and g+8 for each weight.
template <class F, int M, int STAGE>
struct MtStage {
    typename F::Raw r[STAGE][M][2];
};

template <class F, int M, int STAGE>
__device__ __forceinline__ void mt_load(const MtWeight* wt, const MtStream& st, int stage,
                                        MtStage<F, M, STAGE>& s) {
#pragma unroll
    for (int i = 0; i < STAGE; ++i) {
        const int step = st.first + st.stride * (stage * STAGE + i);
        const int c = min(4 * step + st.t, st.chunks - 1);
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) F::load(wt[m], st, h, c, s.r[i][m][h]);
    }
}

// Multiplies one loaded stage and folds each chunk into acc[r][m][h] (x row r of XR). NORM:
// each chunk's dot is scaled back by the power of two its x was staged at (`cinv`). xh: the
// staged row this lane's B column holds (XR ≥ 2: row g % 2, output column 2t + g % 2), the
// rows a row's chunks apart, as are cfold's sums; XR = 4: a second mma set a fragment takes
// rows 2 and 3, on weights converted once.
template <class F, bool NORM, int XR, int M, int STAGE>
__device__ __forceinline__ void mt_compute(const MtStage<F, M, STAGE>& s, const MtStream& st,
                                           int stage, const u32* xh, const u32* zero,
                                           const typename F::Fold* cfold, const float* cinv,
                                           bool supplies_b, float (&acc)[XR][M][2]) {
    constexpr int CHUNK_U32 = F::CHUNK / 2;  // f16 pairs of x per chunk
    constexpr int SUBS = F::SUBS, J = CHUNK_U32 / 4;  // the j-th uint4 of x is in sub j·SUBS/J
    constexpr int P = (XR + 1) / 2;                   // pairs of x rows, one mma set each
    const int row_u32 = st.chunks * CHUNK_U32;
#pragma unroll
    for (int i = 0; i < STAGE; ++i) {
        const int c = 4 * (st.first + st.stride * (stage * STAGE + i)) + st.t;
        const bool live = c < st.chunks;
        // Lanes that supply no B column, and chunks past the row, read zeros.
        const u32* xp[P];
#pragma unroll
        for (int p = 0; p < P; ++p)
            xp[p] = supplies_b && live ? xh + 2 * p * row_u32 + c * CHUNK_U32 : zero;
        // Two accumulators a sub-dot: shorter mma dependency chains.
        float ca[SUBS][M][P][4], cb[SUBS][M][P][4];
#pragma unroll
        for (int u = 0; u < SUBS; ++u)
#pragma unroll
            for (int m = 0; m < M; ++m)
#pragma unroll
                for (int p = 0; p < P; ++p)
#pragma unroll
                    for (int e = 0; e < 4; ++e) ca[u][m][p][e] = cb[u][m][p][e] = 0.f;
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int u = j * SUBS / J;
            u32 b0[P][2], b1[P][2];
#pragma unroll
            for (int p = 0; p < P; ++p) {
                const uint4 xb = *(const uint4*)(xp[p] + 4 * j);
                b0[p][0] = xb.x;
                b0[p][1] = xb.y;
                b1[p][0] = xb.z;
                b1[p][1] = xb.w;
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
                u32 pg[4], p8[4];  // rows g and g + 8
                F::pairs(s.r[i][m][0], j, pg);
                F::pairs(s.r[i][m][1], j, p8);
                const u32 a0[4] = {pg[0], p8[0], pg[1], p8[1]};
                const u32 a1[4] = {pg[2], p8[2], pg[3], p8[3]};
#pragma unroll
                for (int p = 0; p < P; ++p) {
                    mma_f16(ca[u][m][p], a0, b0[p]);
                    mma_f16(cb[u][m][p], a1, b1[p]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < XR; ++r) {
            const typename F::Fold cf = live ? cfold[r * st.chunks + c] : typename F::Fold{};
            const float inv = NORM && live ? cinv[c] : 1.f;
            const int p = r / 2, e = r % 2;
#pragma unroll
            for (int m = 0; m < M; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    // c[2h + e]: weight row g + 8h, x row 2p + e (XR = 1: c[0] = c[1], c[2] =
                    // c[3]).
                    if constexpr (SUBS == 1) {
                        // cf: Σx, Σ offset·x
                        const float dot = ca[0][m][p][2 * h + e] - cf.y + cb[0][m][p][2 * h + e];
                        acc[r][m][h] =
                            F::fold(s.r[i][m][h], NORM ? dot * inv : dot, cf.x, acc[r][m][h]);
                    } else {
                        float dots[SUBS];
#pragma unroll
                        for (int u = 0; u < SUBS; ++u)
                            dots[u] = ca[u][m][p][2 * h + e] + cb[u][m][p][2 * h + e];
                        acc[r][m][h] = F::fold_subs(s.r[i][m][h], c, dots, cf, inv, acc[r][m][h]);
                    }
                }
        }
    }
}

// x (times the norm weight, if NORM) is staged once a block after the wait, in shared memory
// as f16 pairs in the format's fragment order, with Σx (formats with biases) and Σ offset·x of
// the staged values (`mt_offsets`) per chunk in f32 (`cfold`).
// NORM: the norm weight is in shared memory (`gs`, copied before the wait: no kernel writes
// it), each chunk is staged at its own power of two (`cinv` the inverse), and the staging
// returns the thread's Σx², whence the block's r is formed during the loop and applied to the
// row sums. Every block normalises x itself, which costs less than a norm launch in front of
// the kernel, and with no block-wide sum before the loop (H100, 2026-11-26: the knockout of
// that sum read the 1B shape's decode +2.1%, the 8B's +0.9%; this staging with the weights'
// L2 hint, 1B +0.9%, 8B +1.6%, Qwen3-0.6B +0.5%).
// These reads of x, by every SM at once right after the wait, are the kernel's largest fixed
// cost (H100, 2026-11-26, knockouts: without staging the 1B shape's decode read 1,867 → 2,256
// tok/s, the 8B's 433 → 491), and it is latency more than bytes: staged from half the bytes
// the normed inputs read ≤ 0.4% faster, while shorter chains a thread paid (MLX staged in
// parts of 8 elements by every thread instead of whole chunks by the first k/CHUNK threads:
// 8B +1.3%, 1B +1.3%, Qwen3-0.6B +2.1%). Without a norm, x comes from the f16 copy its
// producer wrote where there is one (`x_h`, common.cuh's store_half_copy): the values this
// staging would round x to. Thread block clusters that split the staging and shared it through
// distributed shared memory were slower, and so was x brought by a bulk copy
// (docs/cuda-backend.md).

// v·(g + g_offset) in place, g (N floats) in shared memory; returns Σv² of v as given and sets
// `top` to the largest |v·(g + g_offset)|.
template <int N>
__device__ __forceinline__ float mt_norm_values(float* v, const float* g_sh, const PreNorm& norm,
                                                float& top) {
    float g[N];
    load_floats<N>(g_sh, g);
    float ss = 0.f;
    top = 0.f;
#pragma unroll
    for (int e = 0; e < N; ++e) {
        ss = fmaf(v[e], v[e], ss);
        v[e] *= g[e] + norm.g_offset;
        top = fmaxf(top, fabsf(v[e]));
    }
    return ss;
}

// The power of two that takes a chunk's largest |v| (`top`) into [2^14, 2^15), and its
// inverse. Staged so, x·g stays inside f16's range (a residual stream can pass 65,504) and
// keeps f16's relative precision (small x would otherwise fall into subnormals).
__device__ __forceinline__ void mt_f16_scale(float top, float& scale, float& inv) {
    // top in [2^(e−127), 2^(e−126)): scale 2^(141−e), kept normal (zero: any scale).
    const int shift = min(max(141 - (int)(__float_as_uint(top) >> 23), -100), 100);
    scale = __uint_as_float((u32)(127 + shift) << 23);
    inv = __uint_as_float((u32)(127 - shift) << 23);
}

// Before the staging's first use of the norm weight (NORM), after its first loads of x: gs,
// which every thread copied a part of before the wait.
template <bool NORM>
__device__ __forceinline__ void await_norm_weight(bool first) {
    if constexpr (NORM) {
        if (first) {
            cp_async_wait<0>();
            __syncthreads();
        }
    }
}

// The residual update in front of the norm (UPDATE): y, the block output to add normed, and
// where block 0 stores the updated x; its norm weight is staged in shared memory (`gu`) beside
// the input norm's, and it shares the input norm's eps and offset.
struct MtUpdate {
    const float* y;
    const float* g;
    float* out;
};
#define MATVEC_UPDATE_ARGS const float *upd_y, const float *upd_g, float *upd_out
#define MATVEC_UPDATE MtUpdate{upd_y, upd_g, upd_out}

// x += y·(gu + offset)·rsqrt(mean(y²) + eps) for the thread's R parts of 8 (v, loaded; all of
// x's parts in this one round, which the planner ensures: k ≤ 32·blockDim); block 0 stores the
// result. Also waits for the norm weights' copies (the barrier its sum needs anyway).
template <int R>
__device__ __forceinline__ void mt_update_parts(float (&v)[R][8], int p0, int parts, int k,
                                                const MtUpdate& upd, const PreNorm& norm,
                                                const float* gu) {
    __shared__ float red[MT_WARPS];  // the warps' Σy²
    float u[R][8];
    float su = 0.f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int p = p0 + i * blockDim.x + threadIdx.x;
        if (p < parts) load_floats<8>(upd.y + (i64)p * 8, u[i]);
        else
#pragma unroll
            for (int e = 0; e < 8; ++e) u[i][e] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) su = fmaf(u[i][e], u[i][e], su);
    }
    su = warp_sum(su);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = su;
    cp_async_wait<0>();
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < MT_WARPS; ++w) total += w < (int)(blockDim.x >> 5) ? red[w] : 0.f;
    const float r = rsqrtf(total / k + norm.eps);
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int p = p0 + i * blockDim.x + threadIdx.x;
        if (p >= parts) continue;
        float g[8];
        load_floats<8>(gu + p * 8, g);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[i][e] += u[i][e] * r * (g[e] + norm.g_offset);
        if (blockIdx.x == 0) {
            float4* o = (float4*)(upd.out + (i64)p * 8);
            o[0] = float4{v[i][0], v[i][1], v[i][2], v[i][3]};
            o[1] = float4{v[i][4], v[i][5], v[i][6], v[i][7]};
        }
    }
}

// Formats whose chunks split into parts of 8 contiguous elements, one uint4 of the chunk's f16
// pairs each (F::PARTS: MLX). Consecutive threads stage consecutive parts, P = CHUNK/8 lanes
// a chunk, which meet by shuffles for the chunk's sums and largest |v|; R parts a thread are
// loaded before any is used. Returns the thread's Σx² (NORM).
template <class F, bool NORM, bool UPDATE>
__device__ __forceinline__ float mt_stage_x_parts(const float* __restrict__ x,
                                                  const u16* __restrict__ x_h, int k,
                                                  const PreNorm& norm, const float* gs, u32* xh,
                                                  float2* cfold, float* cinv, const MtUpdate& upd,
                                                  const float* gu) {
    constexpr int CHUNK = F::CHUNK, P = CHUNK / 8, R = 4;
    const int parts = k / 8;
    const bool half = !NORM && x_h;
    float ss = 0.f;
    for (int p0 = 0; p0 < parts; p0 += R * blockDim.x) {  // block-uniform: the barrier below
        float v[R][8];
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int p = p0 + i * blockDim.x + threadIdx.x;
            if (p < parts) {
                if (half) load_halves<8>(x_h + (i64)p * 8, FT_F16, v[i]);
                else load_floats<8>(x + (i64)p * 8, v[i]);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) v[i][e] = 0.f;
            }
        }
        if constexpr (UPDATE) mt_update_parts<R>(v, p0, parts, k, upd, norm, gu);
        else await_norm_weight<NORM>(p0 == 0);
#pragma unroll
        for (int i = 0; i < R; ++i) {
            if (p0 + i * (int)blockDim.x >= parts) break;  // block-uniform: shuffles below
            const int p = p0 + i * blockDim.x + threadIdx.x;
            const bool mine = p < parts;  // a chunk's P lanes alike
            const int c = p / P, j = p % P;
            float scale = 1.f;
            if constexpr (NORM) {
                float top;
                ss += mt_norm_values<8>(v[i], gs + (mine ? p : 0) * 8, norm, top);
#pragma unroll
                for (int o = 1; o < P; o <<= 1)
                    top = fmaxf(top, __shfl_xor_sync(FULL_MASK, top, o));
                float inv;
                mt_f16_scale(top, scale, inv);
                if (mine && j == 0) cinv[c] = inv;
            }
            u32 o4[4];
#pragma unroll
            for (int q = 0; q < 4; ++q)
                o4[q] = pack_f16x2(v[i][F::slot(false, 0, 2 * q)] * scale,
                                   v[i][F::slot(false, 0, 2 * q + 1)] * scale);
            if (mine) *(uint4*)(xh + c * (CHUNK / 2) + 4 * j) = uint4{o4[0], o4[1], o4[2], o4[3]};
            float sum = 0.f, offsets = mt_offsets<F>(o4);
#pragma unroll
            for (int e = 0; e < 8; ++e) sum += v[i][e];
#pragma unroll
            for (int o = 1; o < P; o <<= 1) {
                sum += __shfl_xor_sync(FULL_MASK, sum, o);
                offsets += __shfl_xor_sync(FULL_MASK, offsets, o);
            }
            if (mine && j == 0) cfold[c] = float2{sum, offsets};
        }
    }
    return ss;
}

// Formats staged in whole chunks (Q4_0, whose first chunk of a quad takes its elements out of
// order, and which has no Σx; Q4_1, in Q4_0's order; Q4_K, whose chunk is two runs of x):
// thread t stages chunks t, t + blockDim, …, each from its runs of F::RUN contiguous elements
// (`F::x_at`), and forms the chunk's sums uint4 by uint4 (`F::stage_fold`). Returns the
// thread's Σx² (NORM).
template <class F, bool NORM>
__device__ __forceinline__ float mt_stage_x_chunks(const float* __restrict__ x,
                                                   const u16* __restrict__ x_h, int k,
                                                   const PreNorm& norm, const float* gs, u32* xh,
                                                   typename F::Fold* cfold, float* cinv) {
    constexpr int CHUNK = F::CHUNK, RUN = F::RUN;
    const int chunks = k / CHUNK;
    float ss = 0.f;
    for (int c0 = 0; c0 < chunks; c0 += blockDim.x) {  // block-uniform: the barrier below
        const int c = c0 + threadIdx.x;
        const bool mine = c < chunks;
        float v[CHUNK];
        float scale = 1.f;
        if (mine) {
#pragma unroll
            for (int r = 0; r < CHUNK / RUN; ++r) {
                const i64 at = F::x_at(c, r);
                if (!NORM && x_h) load_halves<RUN>(x_h + at, FT_F16, v + r * RUN);
                else load_floats<RUN>(x + at, v + r * RUN);
            }
        }
        if constexpr (NORM) {
            await_norm_weight<NORM>(c0 == 0);
            if (mine) {
                float top;
#pragma unroll
                for (int r = 0; r < CHUNK / RUN; ++r) {
                    float run_top;
                    ss += mt_norm_values<RUN>(v + r * RUN, gs + F::x_at(c, r), norm, run_top);
                    top = r == 0 ? run_top : fmaxf(top, run_top);
                }
                mt_f16_scale(top, scale, cinv[c]);
            }
        }
        if (!mine) continue;
        const bool first = (c & 3) == 0;  // the first chunk of its quad
        typename F::Fold fold{};
#pragma unroll
        for (int j = 0; j < CHUNK / 8; ++j) {
            u32 o[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int e = 2 * q;  // both orders indexed by constants: v stays in registers
                const float lo = first ? v[F::slot(true, j, e)] : v[F::slot(false, j, e)];
                const float hi = first ? v[F::slot(true, j, e + 1)] : v[F::slot(false, j, e + 1)];
                o[q] = pack_f16x2(lo * scale, hi * scale);
            }
            *(uint4*)(xh + c * (CHUNK / 2) + 4 * j) = uint4{o[0], o[1], o[2], o[3]};
            F::stage_fold(j, o, v, fold);
        }
        cfold[c] = fold;
    }
    return ss;
}

// A gathered product (MoE decode): the rows are those of one expert in a stack of `experts`
// matrices of n rows each: *id, written by the kernel before (moe_route; ids past the last are
// clamped to it), or, given the token's router `logits`, the one this kernel routes the slot
// to (route.cuh, warp 0 of every block; block (0, the token's first slot) stores the token's
// ids and weights for the kernels after). Either way the weights are requested after the wait.
struct MtExpert {
    const u32* id;
    int experts;
    const float* logits;  // or null
    u32* ids;             // the token's slots (routed here)
    float* weights;
    int top_k, mode, slot;  // slot: of the token's
};

// The MoE block's output formed by a gathered product's blocks (MoE decode's down
// projection): the last of the token's top_k slot blocks over the same rows (`last_to_count`
// on counters[blockIdx.x]) stores out[row] = residual[row] + Σ_j w[j]·y[j, row], summed in slot
// order as moe_combine does, from the rows the slots stored in y. Off where out is null.
struct MtCombine {
    const float* w;  // the token's routing weights [top_k]
    const float* residual;
    float* out;
    u32* counters;  // [gridDim.x], zero, left zero
    int top_k;
};

template <class F, bool GATED, bool NORM, bool UPDATE = false, bool GATHER = false, int XR = 1>
__device__ __forceinline__ void matvec_tc(const MtWeight* wt, const float* __restrict__ x,
                                          const u16* __restrict__ x_h, const PreNorm& norm,
                                          const MtUpdate& upd,
                                          const void* __restrict__ bias, int bias_type,
                                          float* __restrict__ out, u16* __restrict__ out_h, int n,
                                          int k, int row_units, int group_shift, int kgroups,
                                          int act, const MtExpert expert = MtExpert{},
                                          const MtCombine combine = MtCombine{},
                                          int x_rows = XR) {
    static_assert(!UPDATE || (NORM && F::PARTS), "the update is staged with a norm, in parts");
    static_assert(XR == 1 || ((XR == 2 || XR == 4) && !GATED && !NORM && !GATHER),
                  "two or four x rows: plain products only");
    constexpr int M = GATED ? 2 : 1;
    constexpr int STAGE = GATED ? 1 : F::STAGE;  // ≈ 64 bytes in flight a lane
    constexpr int CHUNK = F::CHUNK;
    extern __shared__ __align__(16) u32 smem[];
    __shared__ float partial[MT_WARPS][XR * M][16], ssq[MT_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tiles = ((n + 15) / 16 + gridDim.x - 1) / gridDim.x;
    const int tile = warp / kgroups, slice = warp % kgroups;
    const bool active = tile < tiles;
    const int row0 = (blockIdx.x * tiles + tile) * 16;

    MtStream st;
    const u32 rows[2] = {(u32)min(row0 + g, n - 1), (u32)min(row0 + g + 8, n - 1)};
    const u32 groups = (k / 32) >> group_shift;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        st.unit_row[h] = rows[h] * row_units;
        st.group_row[h] = rows[h] * groups;
    }
    st.chunks = k / CHUNK;
    st.first = slice;
    st.stride = kgroups;
    st.cshift = group_shift + (CHUNK == 16 ? 1 : 0);
    st.t = lane & 3;
    const int steps = (st.chunks + 3) / 4;
    const int mine = slice < steps ? (steps - slice + kgroups - 1) / kgroups : 0;
    const int stages = active ? max(1, (mine + STAGE - 1) / STAGE) : 0;

    float* gs = (float*)smem;  // the norm weight (NORM), copied before the wait
    float* gu = gs + k;        // the update's norm weight (UPDATE), likewise
    u32* xh = smem + (NORM ? k : 0) + (UPDATE ? k : 0);
    u32* zero = xh + XR * st.chunks * (CHUNK / 2);  // the XR rows' staged x before it
    auto* cfold = (typename F::Fold*)(zero + CHUNK / 2);  // 16-byte aligned: k % 16 == 0
    float* cinv = (float*)(cfold + XR * st.chunks);  // NORM: each chunk's 1/scale

    MtStage<F, M, STAGE> sa, sb;
    // The first stage's weights are requested before the wait for the previous kernel (no
    // kernel writes weights), so they fly while it finishes and while x is staged.
    if (!GATHER && active) mt_load(wt, st, 0, sa);
    if constexpr (NORM) {
        // Consecutive threads copy consecutive 16 bytes. (Each thread the 128 bytes of the chunk
        // it stages, so that it would need no barrier before reading them, cost the 1B shape's
        // decode 6%: a warp's copies then touch 32 lines each. H100, 2026-11-26.)
        for (int i = threadIdx.x; i < k / 4; i += blockDim.x) {
            cp_async16((u32)__cvta_generic_to_shared(gs + 4 * i), norm.g + 4 * i, true);
            if constexpr (UPDATE)
                cp_async16((u32)__cvta_generic_to_shared(gu + 4 * i), upd.g + 4 * i, true);
        }
        cp_async_commit();
    }
    kernel_entry();
    launch_dependents();
    if constexpr (GATHER) {
        __shared__ u32 routed;
        u32 e;
        if (expert.logits) {
            // A row of scores after what the staging uses.
            float* scores = cinv + (NORM ? st.chunks : 0);
            if (warp == 0) {
                u32 id;
                float w;
                route_row(expert.logits, scores, expert.experts, expert.top_k, expert.mode, id, w);
                if (lane == expert.slot) routed = id;
                if (blockIdx.x == 0 && expert.slot == 0 && lane < expert.top_k) {
                    expert.ids[lane] = id;
                    expert.weights[lane] = w;
                }
            }
            __syncthreads();
            e = routed;
        } else {
            e = min(*expert.id, (u32)expert.experts - 1);
        }
        const u32 first = e * (u32)n;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            st.unit_row[h] += first * row_units;
            st.group_row[h] += first * groups;
        }
        if (active) mt_load(wt, st, 0, sa);
    }
    // Thread r stores row r of the block (tiles·16 ≤ blockDim): its bias (often the residual
    // stream, written by an earlier kernel) is loaded now, not after the reduction.
    const int r = threadIdx.x, row = blockIdx.x * tiles * 16 + r;
    const float bias_v = bias ? load_float(bias, min(row, n - 1), bias_type) : 0.f;
    if (threadIdx.x < CHUNK / 2) zero[threadIdx.x] = 0u;
    float staged_ss;  // the thread's Σx² (NORM)
#pragma unroll
    for (int xr = 0; xr < XR; ++xr) {  // XR > 1: no norm, no f16 copy of x
        const float* x_r = x + min(xr, x_rows - 1) * k;  // rows past x_rows repeat the last
        u32* xh_r = xh + xr * st.chunks * (CHUNK / 2);
        auto* cfold_r = cfold + xr * st.chunks;
        if constexpr (F::PARTS)
            staged_ss = mt_stage_x_parts<F, NORM, UPDATE>(x_r, x_h, k, norm, gs, xh_r, cfold_r,
                                                          cinv, upd, gu);
        else staged_ss = mt_stage_x_chunks<F, NORM>(x_r, x_h, k, norm, gs, xh_r, cfold_r, cinv);
    }
    if constexpr (NORM) {
        staged_ss = warp_sum(staged_ss);
        if (lane == 0) ssq[warp] = staged_ss;
    }
    __syncthreads();

    float acc[XR][M][2];
#pragma unroll
    for (int xr = 0; xr < XR; ++xr)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[xr][m][0] = acc[xr][m][1] = 0.f;
    const bool supplies_b = (g >> 1) == st.t;
    const u32* xh_b = xh + (XR > 1 ? (g & 1) * st.chunks * (CHUNK / 2) : 0);
    // The norm's r from the warps' Σx², formed while the first stage's weights are in flight.
    float norm_r = 1.f;
    if constexpr (NORM) {
        float ss = 0.f;
#pragma unroll
        for (int w = 0; w < MT_WARPS; ++w) ss += w < (int)(blockDim.x >> 5) ? ssq[w] : 0.f;
        norm_r = rsqrtf(ss / k + norm.eps);
    }
    for (int s = 0; s < stages; s += 2) {
        if (s + 1 < stages) mt_load(wt, st, s + 1, sb);
        mt_compute<F, NORM>(sa, st, s, xh_b, zero, cfold, cinv, supplies_b, acc);
        if (s + 1 >= stages) break;
        if (s + 2 < stages) mt_load(wt, st, s + 2, sa);
        mt_compute<F, NORM>(sb, st, s + 1, xh_b, zero, cfold, cinv, supplies_b, acc);
    }

    // Sum the quad's chunks, then the tile's k slices.
#pragma unroll
    for (int xr = 0; xr < XR; ++xr)
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float& a = acc[xr][m][h];
                a += __shfl_xor_sync(FULL_MASK, a, 1);
                a += __shfl_xor_sync(FULL_MASK, a, 2);
                if (st.t == 0) partial[warp][xr * M + m][g + 8 * h] = a;
            }
    __syncthreads();
    if (r < tiles * 16 && row < n) {
        const int w0 = (r >> 4) * kgroups;
        float y[XR * M];
#pragma unroll
        for (int m = 0; m < XR * M; ++m) {
            y[m] = 0.f;
            // Unrolled to the most slices, so that every load is issued before the first add
            // (the loop by kgroups issued four at a time; H100, 2026-11-26, decode after 128
            // tokens: 1B shape +2.8%, Qwen3-0.6B +3.5%, 8B +0.8%).
#pragma unroll
            for (int s = 0; s < MT_WARPS; ++s)
                if (s < kgroups) y[m] += partial[w0 + s][m][r & 15];
            y[m] *= norm_r;
        }
        if constexpr (GATED) {
            out[row] = activation(y[0], act) * y[M - 1];
            store_half_copy(out_h, row, out[row]);
        } else {
#pragma unroll
            for (int xr = 0; xr < XR; ++xr)
                if (xr < x_rows) out[(i64)xr * n + row] = y[xr] + bias_v;
        }
    }
    if (GATHER && combine.out && last_to_count(combine.counters + blockIdx.x, combine.top_k)) {
        __threadfence();
        if (r < tiles * 16 && row < n) {
            // out points at this slot's row of y; slot s's row is s − slot rows away.
            const float* y0 = out - (i64)blockIdx.y % combine.top_k * n;
            combine.out[row] = combine.residual[row] +
                               weighted_slots(combine.w, y0 + row, n, combine.top_k,
                                              [](const float* p) { return __ldcg(p); });
        }
        if (threadIdx.x == 0) combine.counters[blockIdx.x] = 0;
    }
}

// Each kernel comes plain, with the RMSNorm applied to x first (`matvec_tc_norm_…`, which
// holds more registers), and for MLX with the residual update before the norm as well
// (`matvec_tc_normup_…`); all take the norm arguments (MATVEC_NORM_ARGS), then the plain
// kernels x's f16 copy (`x_h`, or null; read only without a norm), the gated ones where to
// write the f16 copy of their output (`out_h`, or null), and last the update's
// (MATVEC_UPDATE_ARGS); kernels without a norm or update ignore theirs.
#define MATVEC_TC_KERNELS(BITS, ST, NAME, PREFIX, NORM, UPDATE)                                    \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        PREFIX##mlx##BITS##_##NAME(const float* x, const u8* w, const void* scales,                \
                                   const void* biases, const void* bias, int bias_type,            \
                                   float* out, int n, int k, int group_shift, int kgroups,         \
                                   MATVEC_NORM_ARGS, const u16* x_h, MATVEC_UPDATE_ARGS) {         \
        const MtWeight wt[1] = {{w, scales, biases}};                                              \
        matvec_tc<MtMlx<BITS, ST>, false, NORM, UPDATE>(wt, x, x_h, MATVEC_PRE_NORM,               \
                                                        MATVEC_UPDATE, bias, bias_type, out,       \
                                                        nullptr, n, k, k * BITS / 128,             \
                                                        group_shift, kgroups, 0);                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        PREFIX##gated_mlx##BITS##_##NAME(const float* x, const u8* w, const void* scales,          \
                                         const void* biases, const u8* w_up,                       \
                                         const void* scales_up, const void* biases_up,             \
                                         float* out, int n, int k, int group_shift, int kgroups,   \
                                         int act, MATVEC_NORM_ARGS, u16* out_h,                    \
                                         MATVEC_UPDATE_ARGS) {                                     \
        const MtWeight wt[2] = {{w, scales, biases}, {w_up, scales_up, biases_up}};                \
        matvec_tc<MtMlx<BITS, ST>, true, NORM, UPDATE>(wt, x, nullptr, MATVEC_PRE_NORM,            \
                                                       MATVEC_UPDATE, nullptr, 0, out, out_h, n,   \
                                                       k, k * BITS / 128, group_shift, kgroups,    \
                                                       act);                                       \
    }
#define MATVEC_TC(BITS, ST, NAME)                                                                  \
    MATVEC_TC_KERNELS(BITS, ST, NAME, matvec_tc_, false, false)                                    \
    MATVEC_TC_KERNELS(BITS, ST, NAME, matvec_tc_norm_, true, false)                                \
    MATVEC_TC_KERNELS(BITS, ST, NAME, matvec_tc_normup_, true, true)
MLX_SCALE_TYPES(MATVEC_TC, 4)
MLX_SCALE_TYPES(MATVEC_TC, 8)

// Two rows of x (a 2-token prompt) at a decode matvec's cost: the B column that repeats a
// lane's chunk of x in the one-row kernel (output columns 2t and 2t + 1 alike) holds the chunk
// of the second row, so the same mma give both rows' dots (`matvec_tc` with XR = 2); x [2, k],
// out [2, n], no norm, no f16 copy of x. `matvec_tc_x4_*`: 3 or 4 rows (x_rows; a third row
// repeats as the fourth, which is not stored), two mma sets a fragment (`mt_compute`).
#define MATVEC_TC_X2(BITS, ST, NAME)                                                               \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        matvec_tc_x2_mlx##BITS##_##NAME(const float* x, const u8* w, const void* scales,           \
                                        const void* biases, const void* bias, int bias_type,       \
                                        float* out, int n, int k, int group_shift, int kgroups) {  \
        const MtWeight wt[1] = {{w, scales, biases}};                                              \
        matvec_tc<MtMlx<BITS, ST>, false, false, false, false, 2>(                                 \
            wt, x, nullptr, PreNorm{}, MtUpdate{}, bias, bias_type, out, nullptr, n, k,            \
            k * BITS / 128, group_shift, kgroups, 0);                                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        matvec_tc_x4_mlx##BITS##_##NAME(const float* x, const u8* w, const void* scales,           \
                                        const void* biases, const void* bias, int bias_type,       \
                                        float* out, int n, int k, int group_shift, int kgroups,    \
                                        int x_rows) {                                              \
        const MtWeight wt[1] = {{w, scales, biases}};                                              \
        matvec_tc<MtMlx<BITS, ST>, false, false, false, false, 4>(                                 \
            wt, x, nullptr, PreNorm{}, MtUpdate{}, bias, bias_type, out, nullptr, n, k,            \
            k * BITS / 128, group_shift, kgroups, 0, MtExpert{}, MtCombine{}, x_rows);             \
    }
MLX_SCALE_TYPES(MATVEC_TC_X2, 4)
MLX_SCALE_TYPES(MATVEC_TC_X2, 8)

// Gathered products of one token (MoE decode): block (x, slot) multiplies the x row of `slot`
// by rows of its expert, ids[slot], into row `slot` of out [slots, n]; x is the slot's own row
// with `per_slot` (x [slots, k]), else its token's (x [slots / top_k, k]). The gated product
// routes its token itself where given the router logits [slots / top_k, experts] (else null:
// ids are given), storing the routed weights beside the ids, by `mode` (route.cuh); the plain
// product forms the MoE block's output where given `combined` (`MtCombine`: the routing
// weights, the residual, and the counters; one token), else null.
template <class F, bool NORM>
__device__ __forceinline__ void gather_tc_gated(const MtWeight* wt, const float* x, u32* ids,
                                                float* out, int n, int k, int row_units,
                                                int group_shift, int experts, int top_k,
                                                int act, int kgroups, const PreNorm& norm,
                                                const float* logits, float* weights, int mode) {
    const int slot = blockIdx.y, token = slot / top_k;
    const MtExpert expert{ids + slot,
                          experts,
                          logits ? logits + (i64)token * experts : nullptr,
                          ids + (i64)token * top_k,
                          logits ? weights + (i64)token * top_k : nullptr,
                          top_k,
                          mode,
                          slot % top_k};
    matvec_tc<F, true, NORM, false, true>(wt, x + (i64)token * k, nullptr, norm, MtUpdate{},
                                          nullptr, 0, out + (i64)slot * n, nullptr, n, k,
                                          row_units, group_shift, kgroups, act, expert);
}

template <class F>
__device__ __forceinline__ void gather_tc_plain(const MtWeight* wt, const float* x,
                                                const u32* ids, float* out, int n, int k,
                                                int row_units, int group_shift, int experts,
                                                int top_k, int per_slot, int kgroups,
                                                const float* weights, const float* residual,
                                                float* combined, u32* counters) {
    const int slot = blockIdx.y, token = slot / top_k;
    const MtCombine combine =
        combined ? MtCombine{weights, residual, combined, counters, top_k} : MtCombine{};
    matvec_tc<F, false, false, false, true>(
        wt, x + (i64)(per_slot ? slot : token) * k, nullptr, PreNorm{}, MtUpdate{}, nullptr, 0,
        out + (i64)slot * n, nullptr, n, k, row_units, group_shift, kgroups, 0,
        MtExpert{ids + slot, experts, nullptr, nullptr, nullptr, top_k, 0, 0}, combine);
}

// The kernels take moe.cu's gathered matvecs' arguments, then kgroups; the gated ones then the
// norm's (MATVEC_NORM_ARGS, ignored by `gather_matvec_tc_gated_…`) and the routing's (logits,
// weights, mode), the plain one the combine's (weights, residual, combined, counters).
#define GATHER_MATVEC_TC_GATED(BITS, ST, NAME, PREFIX, NORM)                                       \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        PREFIX##mlx##BITS##_##NAME(const float* x, u32* ids, const u8* w, const void* scales,      \
                                   const void* biases, const u8* w_up, const void* scales_up,      \
                                   const void* biases_up, float* out, int n, int k,                \
                                   int group_shift, int experts, int top_k, int act, int kgroups,  \
                                   MATVEC_NORM_ARGS, const float* logits, float* weights,          \
                                   int mode) {                                                     \
        const MtWeight wt[2] = {{w, scales, biases}, {w_up, scales_up, biases_up}};                \
        gather_tc_gated<MtMlx<BITS, ST>, NORM>(wt, x, ids, out, n, k, k * BITS / 128, group_shift, \
                                               experts, top_k, act, kgroups, MATVEC_PRE_NORM,      \
                                               logits, weights, mode);                             \
    }
#define GATHER_MATVEC_TC(BITS, ST, NAME)                                                           \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        gather_matvec_tc_mlx##BITS##_##NAME(const float* x, const u32* ids, const u8* w,           \
                                            const void* scales, const void* biases, float* out,    \
                                            int n, int k, int group_shift, int experts, int top_k, \
                                            int per_slot, int kgroups, const float* weights,       \
                                            const float* residual, float* combined,                \
                                            u32* counters) {                                       \
        const MtWeight wt[1] = {{w, scales, biases}};                                              \
        gather_tc_plain<MtMlx<BITS, ST>>(wt, x, ids, out, n, k, k * BITS / 128, group_shift,       \
                                         experts, top_k, per_slot, kgroups, weights, residual,     \
                                         combined, counters);                                      \
    }                                                                                              \
    GATHER_MATVEC_TC_GATED(BITS, ST, NAME, gather_matvec_tc_gated_, false)                         \
    GATHER_MATVEC_TC_GATED(BITS, ST, NAME, gather_matvec_tc_gated_norm_, true)
MLX_SCALE_TYPES(GATHER_MATVEC_TC, 4)
MLX_SCALE_TYPES(GATHER_MATVEC_TC, 8)

// The ggml formats' kernels (format F, kernel name NAME, ROW_UNITS: F::UNIT-byte units a row):
// a Q4_0 row is k / 32 blocks of 18 bytes, k / 128 · 9 units of 8 bytes (k % 128 == 0; off
// quads 9 units of 2 bytes a block); a Q4_1 row k / 32 blocks of 20 bytes, 5 units of 4 bytes
// each; Q5_0 blocks of 22 bytes, 11 units of 2 bytes; Q5_1 blocks of 24 bytes, 6 units of 4
// bytes; a Q8_0 row k / 128 quads of blocks, 17 units of 8 bytes each (off quads, k / 32 blocks
// of 17 units of 2 bytes); a Q4_K row k / 256 super-blocks of 144 bytes, 9 units of 16 bytes
// each, a Q5_K row of 176 bytes, 11 units; a Q6_K row of 210 bytes (units of one byte).
#define MATVEC_TC_GGML_PLAIN(F, NAME, ROW_UNITS, PREFIX, NORM)                                     \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        PREFIX##NAME(const float* x, const u8* w, const void* bias, int bias_type, float* out,     \
                     int n, int k, int kgroups, MATVEC_NORM_ARGS, const u16* x_h,                  \
                     MATVEC_UPDATE_ARGS) {                                                         \
        const MtWeight wt[1] = {{w, nullptr, nullptr}};                                            \
        matvec_tc<F, false, NORM>(wt, x, x_h, MATVEC_PRE_NORM, MATVEC_UPDATE, bias, bias_type,     \
                                  out, nullptr, n, k, ROW_UNITS, 0, kgroups, 0);                   \
    }
#define MATVEC_TC_GGML(F, NAME, ROW_UNITS, PREFIX, NORM)                                           \
    MATVEC_TC_GGML_PLAIN(F, NAME, ROW_UNITS, PREFIX, NORM)                                         \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        PREFIX##gated_##NAME(const float* x, const u8* w, const u8* w_up, float* out, int n,       \
                             int k, int kgroups, int act, MATVEC_NORM_ARGS, u16* out_h,            \
                             MATVEC_UPDATE_ARGS) {                                                 \
        const MtWeight wt[2] = {{w, nullptr, nullptr}, {w_up, nullptr, nullptr}};                  \
        matvec_tc<F, true, NORM>(wt, x, nullptr, MATVEC_PRE_NORM, MATVEC_UPDATE, nullptr, 0, out,  \
                                 out_h, n, k, ROW_UNITS, 0, kgroups, act);                         \
    }
// A format's kernels (KERNELS: MATVEC_TC_GGML, or _PLAIN without the gated ones), without and
// with the folded norm.
#define MATVEC_TC_GGML_NORMS(KERNELS, F, NAME, ROW_UNITS)                                          \
    KERNELS(F, NAME, ROW_UNITS, matvec_tc_, false)                                                 \
    KERNELS(F, NAME, ROW_UNITS, matvec_tc_norm_, true)

// The gathered ggml kernels (MoE decode of llama.cpp's `ffn_*_exps`): as the MLX ones, without
// scales, biases and group shift.
#define GATHER_MATVEC_TC_GGML_PLAIN(F, NAME, ROW_UNITS)                                            \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        gather_matvec_tc_##NAME(const float* x, const u32* ids, const u8* w, float* out, int n,    \
                                int k, int experts, int top_k, int per_slot, int kgroups,          \
                                const float* weights, const float* residual, float* combined,      \
                                u32* counters) {                                                   \
        const MtWeight wt[1] = {{w, nullptr, nullptr}};                                            \
        gather_tc_plain<F>(wt, x, ids, out, n, k, ROW_UNITS, 0, experts, top_k, per_slot, kgroups, \
                           weights, residual, combined, counters);                                 \
    }
#define GATHER_MATVEC_TC_GGML_GATED(F, NAME, ROW_UNITS, PREFIX, NORM)                              \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        PREFIX##NAME(const float* x, u32* ids, const u8* w, const u8* w_up, float* out, int n,     \
                     int k, int experts, int top_k, int act, int kgroups, MATVEC_NORM_ARGS,        \
                     const float* logits, float* weights, int mode) {                              \
        const MtWeight wt[2] = {{w, nullptr, nullptr}, {w_up, nullptr, nullptr}};                  \
        gather_tc_gated<F, NORM>(wt, x, ids, out, n, k, ROW_UNITS, 0, experts, top_k, act,         \
                                 kgroups, MATVEC_PRE_NORM, logits, weights, mode);                 \
    }
#define GATHER_MATVEC_TC_GGML(F, NAME, ROW_UNITS)                                                  \
    GATHER_MATVEC_TC_GGML_PLAIN(F, NAME, ROW_UNITS)                                                \
    GATHER_MATVEC_TC_GGML_GATED(F, NAME, ROW_UNITS, gather_matvec_tc_gated_, false)                \
    GATHER_MATVEC_TC_GGML_GATED(F, NAME, ROW_UNITS, gather_matvec_tc_gated_norm_, true)
#define DENSE_AND_GATHERED(F, NAME, ROW_UNITS)                                                     \
    MATVEC_TC_GGML_NORMS(MATVEC_TC_GGML, F, NAME, ROW_UNITS)                                       \
    GATHER_MATVEC_TC_GGML(F, NAME, ROW_UNITS)
DENSE_AND_GATHERED(MtQ4_0, q4_0, k / 128 * 9)
DENSE_AND_GATHERED(MtQ4_1, q4_1, k / 32 * 5)
DENSE_AND_GATHERED(MtQ5_0, q5_0, k / 32 * 11)
DENSE_AND_GATHERED(MtQ5_1, q5_1, k / 32 * 6)
DENSE_AND_GATHERED(MtQ8_0, q8_0, k / 128 * 17)
DENSE_AND_GATHERED(MtQ4_0Words, q4_0_words, k / 32 * 9)
DENSE_AND_GATHERED(MtQ8_0Words, q8_0_words, k / 32 * 17)
DENSE_AND_GATHERED(MtQ4K, q4_k, k / 256 * 9)
DENSE_AND_GATHERED(MtQ5K, q5_k, k / 256 * 11)
// Q6_K's gated products run as two plain ones (the planners send no gated pair here).
MATVEC_TC_GGML_NORMS(MATVEC_TC_GGML_PLAIN, MtQ6K, q6_k, k / 256 * 210)
GATHER_MATVEC_TC_GGML_PLAIN(MtQ6K, q6_k, k / 256 * 210)

// Two rows of x on the ggml formats (`matvec_tc_x2_NAME`), as the MLX ones.
#define MATVEC_TC_X2_GGML(F, NAME, ROW_UNITS)                                                      \
    extern "C" __global__ void __launch_bounds__(MT_WARPS * 32, 1)                                 \
        matvec_tc_x2_##NAME(const float* x, const u8* w, const void* bias, int bias_type,          \
                            float* out, int n, int k, int kgroups) {                               \
        const MtWeight wt[1] = {{w, nullptr, nullptr}};                                            \
        matvec_tc<F, false, false, false, false, 2>(wt, x, nullptr, PreNorm{}, MtUpdate{}, bias,   \
                                                    bias_type, out, nullptr, n, k, ROW_UNITS, 0,   \
                                                    kgroups, 0);                                   \
    }
MATVEC_TC_X2_GGML(MtQ4_0, q4_0, k / 128 * 9)
MATVEC_TC_X2_GGML(MtQ4_1, q4_1, k / 32 * 5)
MATVEC_TC_X2_GGML(MtQ5_0, q5_0, k / 32 * 11)
MATVEC_TC_X2_GGML(MtQ5_1, q5_1, k / 32 * 6)
MATVEC_TC_X2_GGML(MtQ8_0, q8_0, k / 128 * 17)
MATVEC_TC_X2_GGML(MtQ4_0Words, q4_0_words, k / 32 * 9)
MATVEC_TC_X2_GGML(MtQ8_0Words, q8_0_words, k / 32 * 17)
MATVEC_TC_X2_GGML(MtQ4K, q4_k, k / 256 * 9)
MATVEC_TC_X2_GGML(MtQ5K, q5_k, k / 256 * 11)
MATVEC_TC_X2_GGML(MtQ6K, q6_k, k / 256 * 210)
