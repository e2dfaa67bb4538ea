// Device helpers shared by every kernel family. NVRTC compiles without system headers, so the
// fixed-width types and the half-precision conversions are defined here.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

#define FULL_MASK 0xffffffffu

// Programmatic dependent launch (sm_90+). Every kernel calls this before it touches memory
// that an earlier kernel may write: it waits until the previous kernel of the stream has
// finished and its writes are visible. Launched with programmatic stream serialization
// (launch.rs), a kernel is launched once every block of the one before it has exited or
// called `launch_dependents`; launched plainly, the wait is a no-op.
__device__ __forceinline__ void kernel_entry() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel of the stream launch now, while this one runs: its blocks can then
// start loading weights (which no kernel writes) before their own `kernel_entry`. The decode
// matvecs and decode attention call it; called by every kernel, it cost prefill 30% (H100,
// 2026-11-26; presumably dependent blocks parked on SMs that multi-wave grids need).
__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// `kernel_entry`, then `launch_dependents` where the host says `early` (`Args::early_launch`:
// decode's row and short prompts' rows, whose grids are one wave): the small kernels between
// decode matvecs (norms, the embedding, MoE routing) and a short prompt's kernels then let the
// next product start its weights. Longer prompts keep the plain order: every grid of at most
// one block an SM doing it cost prefill of 128 tokens up to 11% (H100, 2026-11-26).
__device__ __forceinline__ void kernel_entry_early(int early) {
    kernel_entry();
    if (early) launch_dependents();
}

// Whether this block is the last of n_blocks to count itself on `counter`, and so merges
// their partials (published before the call; read them with __ldcg, past L1). As a grid
// barrier does: the block's writes, a barrier, then one thread's fence and atomic. The merging
// threads then fence, and one of them resets the counter. Every thread of the block calls it.
__device__ __forceinline__ bool last_to_count(u32* counter, int n_blocks) {
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(counter, 1u) == (u32)n_blocks - 1;
    }
    __syncthreads();
    return last;
}

// Starts the line at p towards L2, without waiting for it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

#define NEG_INF __int_as_float(0xff800000)

// N floats from p (16-byte aligned) into registers, as float4 loads.
template <int N>
__device__ __forceinline__ void load_floats(const float* p, float* v) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
        const float4 q = ((const float4*)p)[i];
        v[4 * i] = q.x; v[4 * i + 1] = q.y; v[4 * i + 2] = q.z; v[4 * i + 3] = q.w;
    }
}

// The RMSNorm a decode matvec applies to x first, x·(g + g_offset)·rsqrt(mean(x²) + eps), as
// the kernels' trailing arguments (g f32 [k], or null for none).
struct PreNorm {
    const float* g;
    float g_offset;
    float eps;
};
#define MATVEC_NORM_ARGS const float *norm_g, float norm_offset, float norm_eps
#define MATVEC_PRE_NORM PreNorm{norm_g, norm_offset, norm_eps}

// Unit u (32 elements) of x, loaded into xs, times the norm weight (g + g_offset) as a matvec
// folding the norm reads it; returns the unit's Σx², of which the row's r = rsqrt(mean(x²) +
// eps) that scales the row sums at the end is formed.
__device__ __forceinline__ float pre_norm_unit(const PreNorm& norm, int u, float (&xs)[32]) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        float gs[4];
        load_floats<4>(norm.g + u * 32 + 4 * i, gs);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            float& xe = xs[4 * i + c];
            ss = fmaf(xe, xe, ss);
            xe *= gs[c] + norm.g_offset;
        }
    }
    return ss;
}

// Storage types of float operands (weights, scales, biases, norm weights); the numbering is
// `float_type` in launch.rs.
#define FT_F32 0
#define FT_F16 1
#define FT_BF16 2
// KERNELS(BITS, ST, NAME) for each type of MLX scales and biases.
#define MLX_SCALE_TYPES(KERNELS, BITS)                                                             \
    KERNELS(BITS, FT_F32, f32)                                                                     \
    KERNELS(BITS, FT_F16, f16)                                                                     \
    KERNELS(BITS, FT_BF16, bf16)

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// (w & mask) | bits as one lop3. Written as `&` and `|` with two constants it takes two logic
// instructions (ptxas keeps one immediate a lop3); as asm operands, one constant becomes the
// immediate and the other a register, shared by every call.
__device__ __forceinline__ u32 and_or(u32 w, u32 mask, u32 bits) {
    u32 v;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(w), "r"(mask), "r"(bits));  // (a & b) | c
    return v;
}

// The fifth bits of elements 4i..4i+3 of a Q5_0 / Q5_1 block (bits 4i..4i+3 of its word qh),
// each moved to bit 4 of its byte (layouts.cuh's codes, matvec_tc.cu's fields): the copies
// h·2^(7b) of the nibble h do not overlap, so the product holds bit b of h at bit 8b with no
// carries.
__device__ __forceinline__ u32 fifth_bits(u32 qh, int i) {
    return ((((qh >> (4 * i)) & 0xFu) * 0x00204081u) & 0x01010101u) << 4;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float((u32)h << 16); }

// N 16-bit floats of type `ft` (FT_F16 or FT_BF16) from p (16-byte aligned) as floats, read
// with 16-byte loads.
template <int N>
__device__ __forceinline__ void load_halves(const u16* p, int ft, float* v) {
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
        const uint4 q = ((const uint4*)p)[i];
        const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u16 lo = (u16)(w[j] & 0xffff), hi = (u16)(w[j] >> 16);
            v[8 * i + 2 * j] = ft == FT_F16 ? f16_to_f32(lo) : bf16_to_f32(lo);
            v[8 * i + 2 * j + 1] = ft == FT_F16 ? f16_to_f32(hi) : bf16_to_f32(hi);
        }
    }
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// An element of a float or f16 (u16 bits) array as f32; an f32 stored into one, rounded to
// nearest; and an f32 rounded as that store rounds it. For the KV caches (kv_t).
__device__ __forceinline__ float elem_f32(float x) { return x; }
__device__ __forceinline__ float elem_f32(u16 h) { return f16_to_f32(h); }
__device__ __forceinline__ void store_elem(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_elem(u16* p, float x) { *p = f32_to_f16(x); }
template <typename T>
__device__ __forceinline__ float round_as(float x) {
    if constexpr (sizeof(T) == 2) return f16_to_f32(f32_to_f16(x));
    return x;
}

// An f16 copy of a row some decode matvecs write beside their f32 output (`out_h`, or null):
// the tensor-core matvec that reads the row next stages it from there, half the bytes
// (matvec_tc.cu).
__device__ __forceinline__ void store_half_copy(u16* out_h, i64 i, float v) {
    if (out_h) out_h[i] = f32_to_f16(v);
}

// Element i of a float array stored as `ft`. With a constant `ft` the switch folds away.
__device__ __forceinline__ float load_float(const void* p, i64 i, int ft) {
    switch (ft) {
        case FT_F16: return f16_to_f32(((const u16*)p)[i]);
        case FT_BF16: return bf16_to_f32(((const u16*)p)[i]);
        default: return ((const float*)p)[i];
    }
}

// Block z's share of a loop of `steps` split over the grid's z (split-K): steps [begin, end).
__device__ __forceinline__ void split_steps(int steps, int& begin, int& end) {
    const int per = (steps + gridDim.z - 1) / gridDim.z;
    begin = min(steps, (int)blockIdx.z * per);
    end = min(steps, begin + per);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call's readers are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
    return warp_sum(v);
}

// Maximum over the block (blockDim.x a multiple of 32); every thread gets it.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : NEG_INF;
    return warp_max(v);
}

// Activation function by code (`unary_code` in elementwise.rs): 0 SiLU, 1 exact (erf) GELU,
// 2 tanh GELU.
__device__ __forceinline__ float activation(float x, int f) {
    switch (f) {
        case 0: return x / (1.f + expf(-x));
        case 1: return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
        default: {
            const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            return 0.5f * x * (1.f + tanhf(inner));
        }
    }
}
