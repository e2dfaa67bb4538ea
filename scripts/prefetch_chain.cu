// What cross-kernel prefetch into shared memory buys the matvec chain of a decode step.
// Each phase streams its 4-bit-sized weight (n rows of k/2 bytes, 16-byte words) once, with a
// cheap data-dependent sum so that loads set the time, after staging the previous phase's
// output x in shared memory. One kernel per phase, one block per SM (the block owns a
// contiguous share of the rows), launched with programmatic stream serialization in a CUDA
// graph, as mlx-native's decode matvecs are. Variants:
//   late   the next kernel may launch once this one has passed its wait (today's kernels),
//          and the ring is filled after the wait;
//   early  the kernel lets the next one launch at its first instruction, so that its block
//          sits beside this one on the SM, and fills its ring before its wait: weights stream
//          during the previous kernel's tail, staging of x and reduction.
// How the weights come in:
//   ring THREADSxDxG  cp.async into a ring of D stages of G 16-byte words a thread;
//   bulk / tma        bulk copies into a ring of D slots a warp: one 1-D copy (cp.async.bulk)
//                     of W bytes a row, or one 2-D tensor copy (TMA) of 16 rows × W bytes.
// Build: nvcc -O3 -arch=sm_90 -o prefetch_chain prefetch_chain.cu -lcuda
#include <cuda.h>

#include "decode_chain.cuh"

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src));
}

__device__ __forceinline__ float word_value(uint4 q) {
    return (float)((q.x ^ q.y ^ q.z ^ q.w) & 0xff);
}

// Lets the next kernel launch and requests the first `depth` stages (`issue`), before the
// wait for the previous kernel (early) or after it (late).
template <class Issue>
__device__ __forceinline__ void wait_and_fill(int early, int depth, Issue issue) {
    if (early) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        for (int j = 0; j < depth; ++j) issue(j);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!early) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        for (int j = 0; j < depth; ++j) issue(j);
    }
}

// x staged in shared memory after the wait, with its sum of squares (as a normed matvec).
__device__ __forceinline__ float stage_x(const Phase& p, float* xs) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < p.k / 4; i += blockDim.x) {
        const float4 v = ((const float4*)p.x)[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        ((float4*)xs)[i] = v;
    }
    __syncthreads();
    return ss;
}

// Every row of the block's share written (small values, so that x stays finite along the
// chain), from the warps' sums.
template <int THREADS>
__device__ __forceinline__ void store_rows(const Phase& p, int r0, int r1, float acc) {
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ float partial[THREADS / 32];
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    for (int r = r0 + threadIdx.x; r < r1; r += THREADS)
        p.y[r] = partial[(r - r0) % (THREADS / 32)] * 1e-9f;
}

// Every weight word goes through a ring of D stages of G words a thread in shared memory
// (cp.async, each thread reading back its own slots, so no barriers): D·G·16·THREADS bytes
// in flight.
template <int THREADS, int D, int G>
__global__ void __launch_bounds__(THREADS) chain_kernel(Phase p, int early) {
    extern __shared__ uint4 smem[];
    const int rows = (p.n + gridDim.x - 1) / gridDim.x;
    const int r0 = blockIdx.x * rows, r1 = min(p.n, r0 + rows);
    const uint4* base = p.w + (size_t)r0 * (p.k / 32);
    const int total = max(0, r1 - r0) * (p.k / 32);
    const int mine = total > (int)threadIdx.x ? (total - threadIdx.x + THREADS - 1) / THREADS : 0;
    const int stages = (mine + G - 1) / G;
    auto issue = [&](int j) {
#pragma unroll
        for (int e = 0; e < G; ++e)
            if (j * G + e < mine)
                cp_async16(smem + ((j % D) * G + e) * THREADS + threadIdx.x,
                           base + threadIdx.x + (size_t)(j * G + e) * THREADS);
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    wait_and_fill(early, D, issue);
    float* xs = (float*)(smem + D * G * THREADS);
    const float ss = stage_x(p, xs);
    const int kmask = (1 << (31 - __clz(p.k))) - 1;  // x index of a word: cheap, in range
    float acc = ss * 1e-9f;
    for (int j = 0; j < stages; ++j) {
        asm volatile("cp.async.wait_group %0;" ::"n"(D - 1) : "memory");
        uint4 q[G];
#pragma unroll
        for (int e = 0; e < G; ++e) q[e] = smem[((j % D) * G + e) * THREADS + threadIdx.x];
        issue(j + D);
#pragma unroll
        for (int e = 0; e < G; ++e)
            if (j * G + e < mine)
                acc += xs[((threadIdx.x + (j * G + e) * THREADS) * 32) & kmask] * word_value(q[e]);
    }
    store_rows<THREADS>(p, r0, r1, acc);
}

// Each warp streams its 16-row tiles through its own ring of D slots, one mbarrier a slot:
// per stage, lanes 0..15 each copy W bytes of one row (1-D bulk copies), or lane 0 copies the
// 16 rows × W bytes box of `map` (TENSOR, a 2-D tensor copy, zero-filled past the tensor).
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

template <int THREADS, int W, int D, bool TENSOR>
__global__ void __launch_bounds__(THREADS) copy_kernel(Phase p, const __grid_constant__ CUtensorMap map,
                                                       int early) {
    extern __shared__ __align__(128) uint4 smem[];
    constexpr int WARPS = THREADS / 32;
    __shared__ __align__(8) unsigned long long bar[WARPS][D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows = ((p.n + gridDim.x - 1) / gridDim.x + 15) / 16 * 16;
    const int r0 = blockIdx.x * rows, r1 = min(p.n, r0 + rows);
    const int row_bytes = p.k / 2;
    const int tiles = max(0, (r1 - r0 + 15) / 16);
    const int per_tile = (row_bytes + W - 1) / W;
    const int my_tiles = tiles > warp ? (tiles - warp + WARPS - 1) / WARPS : 0;
    const int my_stages = my_tiles * per_tile;
    unsigned char* ring = (unsigned char*)smem + warp * D * 16 * W;
    if (lane < D)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&bar[warp][lane])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncwarp();
    // A stage's bytes: the box is whole even past the row's end or n.
    auto stage_size = [&](int j) { return TENSOR ? W : min(W, row_bytes - (j % per_tile) * W); };
    auto issue = [&](int j) {
        if (j >= my_stages) return;
        const int tile = warp + (j / per_tile) * WARPS, off = (j % per_tile) * W;
        const unsigned b = smem_addr(&bar[warp][j % D]);
        const unsigned dst = smem_addr(ring + (j % D) * 16 * W);
        if (lane == 0)
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b),
                         "r"(16 * stage_size(j))
                         : "memory");
        if constexpr (TENSOR) {
            if (lane == 0)
                asm volatile(
                    "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
                    "[%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
                    "l"(&map), "r"(off), "r"(r0 + tile * 16), "r"(b)
                    : "memory");
        } else {
            __syncwarp();
            if (lane < 16) {
                const int row = min(r0 + tile * 16 + lane, p.n - 1);
                const unsigned char* src = (const unsigned char*)p.w + (size_t)row * row_bytes + off;
                asm volatile(
                    "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], "
                    "%2, [%3];" ::"r"(dst + lane * W),
                    "l"(src), "r"(stage_size(j)), "r"(b)
                    : "memory");
            }
        }
    };
    wait_and_fill(early, D, issue);
    float* xs = (float*)((unsigned char*)smem + WARPS * D * 16 * W);
    const float ss = stage_x(p, xs);
    const int kmask = (1 << (31 - __clz(p.k))) - 1;
    float acc = ss * 1e-9f;
    for (int j = 0; j < my_stages; ++j) {
        const unsigned b = smem_addr(&bar[warp][j % D]);
        const unsigned parity = (j / D) & 1;
        unsigned done = 0;
        while (!done)
            asm volatile(
                "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, "
                "1, 0, p; }"
                : "=r"(done)
                : "r"(b), "r"(parity)
                : "memory");
        // Row r's words sit at r·W/16: word i of the stage is row i / words, word i % words.
        const int words = stage_size(j) / 16;
        const uint4* slot = (const uint4*)(ring + (j % D) * 16 * W);
        for (int i = lane; i < 16 * words; i += 32) {
            const int r = words == W / 16 ? i / (W / 16) : i / words, c = i - r * words;
            acc += xs[((j * W + c * 16) * 2) & kmask] * word_value(slot[r * (W / 16) + c]);
        }
        __syncwarp();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        issue(j + D);
    }
    store_rows<THREADS>(p, r0, r1, acc);
}

// The tensor map of a phase's weight: n rows of k/2 bytes, boxes of 16 rows × w bytes.
static CUtensorMap weight_map(const Phase& p, int w) {
    CUtensorMap map;
    const cuuint64_t dims[2] = {(cuuint64_t)p.k / 2, (cuuint64_t)p.n};
    const cuuint64_t strides[1] = {(cuuint64_t)p.k / 2};
    const cuuint32_t box[2] = {(cuuint32_t)w, 16}, elem[2] = {1, 1};
    const CUresult r = cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, (void*)p.w, dims,
                                              strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                              CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        std::fprintf(stderr, "cuTensorMapEncodeTiled: %d (n %d, k %d, w %d)\n", (int)r, p.n, p.k, w);
        std::exit(1);
    }
    return map;
}

struct Variant {
    const char* name;
    int threads, depth;
    int group;  // ring: 16-byte words a stage and thread
    int width;  // bulk / tma: bytes a row and stage
    bool tensor, early;
};

// The kernel of a variant (the instantiations measured), or null.
static void (*copy_kernel_of(const Variant& v))(Phase, CUtensorMap, int) {
#define COPY(T, W, D)                                                                              \
    if (v.threads == T && v.width == W && v.depth == D)                                            \
        return v.tensor ? copy_kernel<T, W, D, true> : copy_kernel<T, W, D, false>;
    COPY(512, 256, 2)
    COPY(512, 128, 4)
    COPY(256, 256, 3)
    COPY(256, 256, 2)
    COPY(128, 256, 4)
#undef COPY
    return nullptr;
}

static void (*ring_kernel_of(const Variant& v))(Phase, int) {
    if (v.threads == 1024 && v.depth == 4 && v.group == 1) return chain_kernel<1024, 4, 1>;
    if (v.threads == 1024 && v.depth == 3 && v.group == 1) return chain_kernel<1024, 3, 1>;
    if (v.threads == 512 && v.depth == 2 && v.group == 4) return chain_kernel<512, 2, 4>;
    return nullptr;
}

int main() {
    const Variant variants[] = {
        {"late ring 1024x4x1", 1024, 4, 1, 0, false, false},
        {"early ring 1024x3x1", 1024, 3, 1, 0, false, true},
        {"early ring 512x2x4", 512, 2, 4, 0, false, true},
        {"late bulk 512 W256 D2", 512, 2, 0, 256, false, false},
        {"late tma 512 W256 D2", 512, 2, 0, 256, true, false},
        {"early tma 512 W256 D2", 512, 2, 0, 256, true, true},
        {"late tma 512 W128 D4", 512, 4, 0, 128, true, false},
        {"early tma 512 W128 D4", 512, 4, 0, 128, true, true},
        {"late tma 256 W256 D3", 256, 3, 0, 256, true, false},
        {"early tma 256 W256 D3", 256, 3, 0, 256, true, true},
        {"early tma 256 W256 D2", 256, 2, 0, 256, true, true},
        {"early tma 128 W256 D4", 128, 4, 0, 256, true, true},
    };
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int max_smem = 220 * 1024;  // dynamic, beside the static arrays
    for (const Variant& v : variants) {
        if (auto k = copy_kernel_of(v))
            CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
        else if (auto k = ring_kernel_of(v))
            CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    }
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    std::printf("%d SMs; µs per step (replayed graph, median of 7 × 20)\n", sms);
    std::printf("%-14s %-24s %9s %9s %9s %7s\n", "model", "variant", "MB/step", "bound us", "step us",
                "share");
    for (const ChainModel& m : CHAIN_MODELS) {
        Chain c = build_chain(m);
        for (const Variant& v : variants) {
            const float us = replay_us(s, [&] {
                for (const Phase& p : c.phases) {
                    const dim3 grid(std::min(sms, (p.n + 15) / 16));
                    if (v.width) {
                        const size_t smem = (size_t)v.threads / 32 * v.depth * 16 * v.width + p.k * 4;
                        const CUtensorMap map = v.tensor ? weight_map(p, v.width) : CUtensorMap{};
                        launch_pdl(copy_kernel_of(v), grid, dim3(v.threads), smem, s, p, map,
                                   (int)v.early);
                    } else {
                        const size_t smem = (size_t)v.threads * v.depth * v.group * 16 + p.k * 4;
                        launch_pdl(ring_kernel_of(v), grid, dim3(v.threads), smem, s, p, (int)v.early);
                    }
                }
            });
            const double bound = c.bytes / 3.0e12 * 1e6;
            std::printf("%-14s %-24s %9.1f %9.1f %9.1f %6.1f%%\n", m.name, v.name, c.bytes / 1e6,
                        bound, us, 100.0 * bound / us);
        }
        free_chain(c);
    }
    return 0;
}
