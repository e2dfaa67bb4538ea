// Prefill attention on tensor cores (flash-attention style), compiled after attention.cu
// (key_range, cap_score) and with its semantics: f32 q [rows, n_heads, HD], kv_t caches
// [n_kv_heads, capacity, HD], GQA, query row i at position pos+i seeing keys lo..=pos+i
// (sliding window), scores scale·q·k soft-capped when softcap > 0. A block takes FA_ROWS
// query rows of one head (16 per warp) and streams key tiles of FA_KEYS through shared memory
// as f16: S = Q·Kᵀ and O += P·V are m16n8k16 mma with f32 accumulators, the online softmax
// runs on the S fragments in f32 (each row is held by the 4 lanes of a quad), in base 2: q is
// pre-scaled by scale·log2(e) (and the softcap by log2(e)), so each probability is one MUFU.EX2
// (`fa_exp2`), where expf without fast math is a range reduction around it. q, k, v and p
// are rounded to f16 (unit roundoff 2^−11). Row blocks run latest first: they see
// the most keys. Needs HD % 16 == 0 and q, the caches and out 16-byte aligned. Launch:
// FA_WARPS·32 threads, grid (n_heads, ceil(rows/FA_ROWS)), dynamic shared memory
// (FA_ROWS + 2·FA_KEYS·stages)·(HD + 8)·2 bytes, stages FA_STAGES with f16 caches, else 1.
// (H200, 2026-11-28, f16 caches' tiles by cp.async against rounded loads: 2,048-token prefill
// Qwen3-0.6B +12.7%, 8B at 4,096 tokens +4.3%; 8 warps or 32-key tiles gained less.)

#define FA_WARPS 4
#define FA_ROWS (16 * FA_WARPS)
#define FA_KEYS 64
#define FA_STAGES 2  // K/V buffers with f16 caches: the tile multiplied and the next one

// 2^x by the special-function unit alone (ex2.approx.ftz: relative error ~2^−22, subnormal
// results flushed to 0, 2^−∞ = 0); exp2f adds a rescale for subnormal results around it.
__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Four values at p (f32 or f16, aligned to four elements: attention.cu's load_run) times
// `mul`, as packed f16.
template <typename T>
__device__ __forceinline__ uint2 f16x4(const T* p, float mul) {
    float v[4];
    load_run<4>(p, v);
    return uint2{pack_f16x2(v[0] * mul, v[1] * mul), pack_f16x2(v[2] * mul, v[3] * mul)};
}

// rows × HD values from `src` (row stride `stride` elements) into f16 `dst` (row stride HD + 8),
// times `mul`; rows at or past `valid` are zero.
template <int HD, typename T>
__device__ __forceinline__ void fa_stage(u16* dst, const T* __restrict__ src, i64 stride,
                                         int n_rows, int valid, float mul) {
    for (int i = threadIdx.x; i < n_rows * HD / 4; i += FA_WARPS * 32) {
        const int r = i / (HD / 4), c = 4 * (i % (HD / 4));
        *(uint2*)&dst[r * (HD + 8) + c] = r < valid ? f16x4(src + r * stride + c, mul) : uint2{0, 0};
    }
}

// Issues cp.async copies of rows × HD f16 values from `src` (rows of HD) into `dst` (row stride
// HD + 8); rows at or past `valid` (≥ 1) are zero-filled.
template <int HD>
__device__ __forceinline__ void fa_copy(u16* dst, const u16* __restrict__ src, int n_rows,
                                        int valid) {
    for (int i = threadIdx.x; i < n_rows * HD / 8; i += FA_WARPS * 32) {
        const int r = i / (HD / 8), c = 8 * (i % (HD / 8));
        cp_async16(smem_addr(dst + r * (HD + 8) + c), src + min(r, valid - 1) * HD + c, r < valid);
    }
}

template <int HD>
__device__ __forceinline__ void attn_flash(const float* __restrict__ q,
                                           const kv_t* __restrict__ kc,
                                           const kv_t* __restrict__ vc,
                                           const u32* __restrict__ pos, float* __restrict__ out,
                                           int n_heads, int group, int capacity, float scale,
                                           int window, float softcap, int rows) {
    constexpr int LD = HD + 8;  // 16 bytes of padding keeps ldmatrix rows on distinct banks
    extern __shared__ __align__(16) u16 fa_smem[];
    // f16 caches are copied as they lie, asynchronously: the next tile's K and V land while
    // the current one is multiplied (FA_STAGES buffers each); f32 ones are rounded on the way.
    constexpr bool ASYNC = sizeof(kv_t) == 2;
    u16* qs = fa_smem;
    u16* ks = qs + FA_ROWS * LD;
    u16* vs = ks + (ASYNC ? FA_STAGES : 1) * FA_KEYS * LD;
    const int h = blockIdx.x, r0 = (gridDim.y - 1 - blockIdx.y) * FA_ROWS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, quad = lane & 3;
    const int p0 = (int)pos[0];
    const i64 kv_base = (i64)(h / group) * capacity * HD;

    constexpr float LOG2E = 1.4426950408889634f;
    fa_stage<HD>(qs, q + ((i64)r0 * n_heads + h) * HD, (i64)n_heads * HD, FA_ROWS, rows - r0,
                 scale * LOG2E);
    // cap·tanh(s / cap) of base-2 scores s = log2(e)·s_e is log2(e) times the natural one's.
    const float softcap2 = softcap * LOG2E;
    int lo_block, hi_block, unused;
    key_range(p0 + r0, capacity, window, lo_block, unused);
    key_range(p0 + min(r0 + FA_ROWS, rows) - 1, capacity, window, unused, hi_block);

    // This thread's two rows: lane/4 and lane/4 + 8 of its warp's 16.
    const int row_a = r0 + 16 * warp + (lane >> 2);
    int lo[2], hi[2];
    key_range(p0 + row_a, capacity, window, lo[0], hi[0]);
    key_range(p0 + row_a + 8, capacity, window, lo[1], hi[1]);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = 0.f;

    // (Only with ASYNC: kc and vc are then f16.)
    const auto copy_tile = [&](int t, int buf) {
        fa_copy<HD>(ks + buf * FA_KEYS * LD, (const u16*)kc + kv_base + (i64)t * HD, FA_KEYS,
                    hi_block - t);
        fa_copy<HD>(vs + buf * FA_KEYS * LD, (const u16*)vc + kv_base + (i64)t * HD, FA_KEYS,
                    hi_block - t);
        cp_async_commit();
    };
    if constexpr (ASYNC)
        if (lo_block < hi_block) copy_tile(lo_block, 0);
    for (int t0 = lo_block, buf = 0; t0 < hi_block; t0 += FA_KEYS) {
        __syncthreads();  // the previous tiles are consumed (and q is staged)
        if constexpr (ASYNC) {
            if (t0 + FA_KEYS < hi_block) copy_tile(t0 + FA_KEYS, buf ^ 1);
            else cp_async_commit();
            cp_async_wait<1>();  // this tile's copies are done; the next one's may fly
        } else {
            fa_stage<HD>(ks, kc + kv_base + (i64)t0 * HD, HD, FA_KEYS, hi_block - t0, 1.f);
            fa_stage<HD>(vs, vc + kv_base + (i64)t0 * HD, HD, FA_KEYS, hi_block - t0, 1.f);
        }
        __syncthreads();
        const u16* kt = ks + buf * FA_KEYS * LD;
        const u16* vt = vs + buf * FA_KEYS * LD;
        if constexpr (ASYNC) buf ^= 1;

        float s[FA_KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD; kk += 16) {
            u32 a[4];
            ldmatrix_x4(a, &qs[(16 * warp + (lane & 15)) * LD + kk + 8 * (lane >> 4)]);
#pragma unroll
            for (int j = 0; j < FA_KEYS / 16; ++j) {
                u32 b[4];
                ldmatrix_x4(b, &kt[(16 * j + (lane & 7) + 8 * (lane >> 4)) * LD + kk +
                                   8 * ((lane >> 3) & 1)]);
                mma_f16(s[2 * j], a, b);
                mma_f16(s[2 * j + 1], a, b + 2);
            }
        }

        // Online softmax per row (e/2 picks the row); the quad's 4 lanes hold a row's keys.
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = NEG_INF;
#pragma unroll
            for (int j = 0; j < FA_KEYS / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = t0 + 8 * j + 2 * quad + e;
                    float& v = s[j][2 * r + e];
                    v = key >= lo[r] && key < hi[r] ? cap_score(v, softcap2) : NEG_INF;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            const float m_new = fmaxf(m[r], mx);
            // Rows that have seen no key yet keep m = −inf and add nothing.
            corr[r] = m_new == NEG_INF ? 1.f : fa_exp2(m[r] - m_new);
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < FA_KEYS / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& v = s[j][2 * r + e];
                    v = m_new == NEG_INF ? 0.f : fa_exp2(v - m_new);
                    sum += v;
                }
            l[r] = l[r] * corr[r] + sum;  // this lane's keys; the quad is summed at the end
            m[r] = m_new;
        }
#pragma unroll
        for (int j = 0; j < HD / 8; ++j) {
            o[j][0] *= corr[0];
            o[j][1] *= corr[0];
            o[j][2] *= corr[1];
            o[j][3] *= corr[1];
        }

        // O += P·V: the S accumulators of key tiles 2t, 2t+1 are the A fragment of k-step t.
#pragma unroll
        for (int t = 0; t < FA_KEYS / 16; ++t) {
            const u32 a[4] = {pack_f16x2(s[2 * t][0], s[2 * t][1]),
                              pack_f16x2(s[2 * t][2], s[2 * t][3]),
                              pack_f16x2(s[2 * t + 1][0], s[2 * t + 1][1]),
                              pack_f16x2(s[2 * t + 1][2], s[2 * t + 1][3])};
#pragma unroll
            for (int j = 0; j < HD / 16; ++j) {
                u32 b[4];
                ldmatrix_x4_trans(b, &vt[(16 * t + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD +
                                         16 * j + 8 * (lane >> 4)]);
                mma_f16(o[2 * j], a, b);
                mma_f16(o[2 * j + 1], a, b + 2);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
        const int row = row_a + 8 * r;
        if (row >= rows) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        float* orow = out + ((i64)row * n_heads + h) * HD;
#pragma unroll
        for (int j = 0; j < HD / 8; ++j)
            *(float2*)&orow[8 * j + 2 * quad] = float2{o[j][2 * r] * inv, o[j][2 * r + 1] * inv};
    }
}

#define ATTN_FLASH(HD)                                                                        \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) attn_flash_##HD(              \
        const float* q, const kv_t* kc, const kv_t* vc, const u32* pos, float* out,           \
        int n_heads, int group, int capacity, float scale, int window, float softcap,         \
        int rows, int early) {                                                                \
        kernel_entry_early(early);                                                            \
        attn_flash<HD>(q, kc, vc, pos, out, n_heads, group, capacity, scale, window, softcap, \
                       rows);                                                                 \
    }
ATTN_FLASH(64)
ATTN_FLASH(80)
ATTN_FLASH(96)
ATTN_FLASH(128)
