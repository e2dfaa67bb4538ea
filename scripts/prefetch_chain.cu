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
// THREADSxDxG: threads a block, ring depth in stages, 16-byte words a stage and thread.
// Build: nvcc -O3 -arch=sm_90 -o prefetch_chain prefetch_chain.cu -lcuda
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <vector>
#include <cuda.h>
#include <cuda_runtime.h>

#define CHECK(x)                                                                           \
    do {                                                                                   \
        cudaError_t e = (x);                                                               \
        if (e != cudaSuccess) {                                                            \
            std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
            std::exit(1);                                                                  \
        }                                                                                  \
    } while (0)

struct Phase {
    const uint4* w;  // [n, k/32] 16-byte words
    const float* x;  // [k]
    float* y;        // [n]
    int n, k;
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src));
}

__device__ __forceinline__ float word_value(uint4 q) {
    return (float)((q.x ^ q.y ^ q.z ^ q.w) & 0xff);
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
    if (early) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        for (int j = 0; j < D; ++j) issue(j);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!early) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        for (int j = 0; j < D; ++j) issue(j);
    }
    // Stage x (its sum of squares too, as a normed matvec would).
    float* xs = (float*)(smem + D * G * THREADS);
    float ss = 0.f;
    for (int i = threadIdx.x; i < p.k / 4; i += THREADS) {
        const float4 v = ((const float4*)p.x)[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        ((float4*)xs)[i] = v;
    }
    __syncthreads();
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
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ float partial[THREADS / 32];
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    // Every row written (small values, so that x stays finite along the chain).
    for (int r = r0 + threadIdx.x; r < r1; r += THREADS)
        p.y[r] = partial[(r - r0) % (THREADS / 32)] * 1e-9f;
}

// Each warp streams its 16-row tiles through its own ring of D slots: per stage, lanes 0..15
// each copy W bytes of one row with one bulk copy (cp.async.bulk, the TMA unit), completing on
// the slot's mbarrier; no per-word load instructions, and D·16·W bytes in flight a warp.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

template <int THREADS, int W, int D>
__global__ void __launch_bounds__(THREADS) bulk_kernel(Phase p, int early) {
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
    auto issue = [&](int j) {
        if (j >= my_stages) return;
        const int tile = warp + (j / per_tile) * WARPS, off = (j % per_tile) * W;
        const int size = min(W, row_bytes - off);
        const unsigned b = smem_addr(&bar[warp][j % D]);
        if (lane == 0)
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(16 * size)
                         : "memory");
        __syncwarp();
        if (lane < 16) {
            const int row = min(r0 + tile * 16 + lane, p.n - 1);
            const unsigned char* src = (const unsigned char*)p.w + (size_t)row * row_bytes + off;
            asm volatile(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                    smem_addr(ring + (j % D) * 16 * W + lane * W)),
                "l"(src), "r"(size), "r"(b)
                : "memory");
        }
    };
    if (early) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        for (int j = 0; j < D; ++j) issue(j);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!early) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        for (int j = 0; j < D; ++j) issue(j);
    }
    float* xs = (float*)((unsigned char*)smem + WARPS * D * 16 * W);
    float ss = 0.f;
    for (int i = threadIdx.x; i < p.k / 4; i += THREADS) {
        const float4 v = ((const float4*)p.x)[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        ((float4*)xs)[i] = v;
    }
    __syncthreads();
    const int kmask = (1 << (31 - __clz(p.k))) - 1;
    float acc = ss * 1e-9f;
    for (int j = 0; j < my_stages; ++j) {
        const unsigned b = smem_addr(&bar[warp][j % D]);
        const unsigned parity = (j / D) & 1;
        unsigned done = 0;
        while (!done)
            asm volatile(
                "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                : "=r"(done)
                : "r"(b), "r"(parity)
                : "memory");
        const int size = min(W, row_bytes - (j % per_tile) * W);
        const uint4* slot = (const uint4*)(ring + (j % D) * 16 * W);
        // Row r's words sit at r·W/16: word i of the stage is row i / (size/16), word i % (size/16).
        const int words = size / 16;
        for (int i = lane; i < 16 * words; i += 32) {
            const int r = size == W ? i / (W / 16) : i / words, c = i - r * words;
            acc += xs[((j * W + c * 16) * 2) & kmask] * word_value(slot[r * (W / 16) + c]);
        }
        __syncwarp();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        issue(j + D);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ float partial[WARPS];
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    for (int r = r0 + threadIdx.x; r < r1; r += THREADS) p.y[r] = partial[(r - r0) % WARPS] * 1e-9f;
}

// The same with one 2-D tensor copy a stage (TMA, a [16 rows][W bytes] box of the weight's
// tensor map), issued by lane 0: 16·W bytes an instruction instead of W.
template <int THREADS, int W, int D>
__global__ void __launch_bounds__(THREADS) tensor_kernel(Phase p, const __grid_constant__ CUtensorMap map,
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
    auto issue = [&](int j) {
        if (j >= my_stages || lane != 0) return;
        const int tile = warp + (j / per_tile) * WARPS, off = (j % per_tile) * W;
        const unsigned b = smem_addr(&bar[warp][j % D]);
        // The box is whole even past the row's end or n (zero-filled), so its bytes are fixed.
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(16 * W) : "memory");
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
                smem_addr(ring + (j % D) * 16 * W)),
            "l"(&map), "r"(off), "r"(r0 + tile * 16), "r"(b)
            : "memory");
    };
    if (early) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        for (int j = 0; j < D; ++j) issue(j);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!early) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        for (int j = 0; j < D; ++j) issue(j);
    }
    float* xs = (float*)((unsigned char*)smem + WARPS * D * 16 * W);
    float ss = 0.f;
    for (int i = threadIdx.x; i < p.k / 4; i += THREADS) {
        const float4 v = ((const float4*)p.x)[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        ((float4*)xs)[i] = v;
    }
    __syncthreads();
    const int kmask = (1 << (31 - __clz(p.k))) - 1;
    float acc = ss * 1e-9f;
    for (int j = 0; j < my_stages; ++j) {
        const unsigned b = smem_addr(&bar[warp][j % D]);
        const unsigned parity = (j / D) & 1;
        unsigned done = 0;
        while (!done)
            asm volatile(
                "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                : "=r"(done)
                : "r"(b), "r"(parity)
                : "memory");
        const uint4* slot = (const uint4*)(ring + (j % D) * 16 * W);
        for (int i = lane; i < W; i += 32) {  // 16 rows of W/16 words
            const int c = i & (W / 16 - 1);
            acc += xs[((j * W + c * 16) * 2) & kmask] * word_value(slot[i]);
        }
        __syncwarp();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        issue(j + D);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ float partial[WARPS];
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    for (int r = r0 + threadIdx.x; r < r1; r += THREADS) p.y[r] = partial[(r - r0) % WARPS] * 1e-9f;
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
    int threads, depth, group, early;
    int bulk_w;  // bytes a row and stage of bulk_kernel (group unused), 0: chain_kernel
    int tensor;  // with bulk_w: tensor_kernel instead
};

int main() {
    struct Model {
        const char* name;
        int hidden, qkv, inter, layers, vocab;
    };
    const Model models[] = {
        {"smollm2-135m", 576, 960, 1536, 30, 49152},
        {"llama-3.2-1b", 2048, 3072, 8192, 16, 128256},
        {"llama-3.1-8b", 4096, 6144, 14336, 32, 128256},
    };
    const Variant variants[] = {
        {"late 1024x4x1", 1024, 4, 1, 0, 0, 0},
        {"early 1024x3x1", 1024, 3, 1, 1, 0, 0},
        {"late bulk 512 W256 D2", 512, 2, 0, 0, 256, 0},
        {"late tma 512 W256 D2", 512, 2, 0, 0, 256, 1},
        {"early tma 512 W256 D2", 512, 2, 0, 1, 256, 1},
        {"late tma 512 W128 D4", 512, 4, 0, 0, 128, 1},
        {"early tma 512 W128 D4", 512, 4, 0, 1, 128, 1},
        {"late tma 256 W256 D3", 256, 3, 0, 0, 256, 1},
        {"early tma 256 W256 D3", 256, 3, 0, 1, 256, 1},
        {"early tma 256 W256 D2", 256, 2, 0, 1, 256, 1},
        {"early tma 128 W256 D4", 128, 4, 0, 1, 256, 1},
    };
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int max_smem = 220 * 1024;  // dynamic, beside the static arrays
    CHECK(cudaFuncSetAttribute(chain_kernel<1024, 3, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    CHECK(cudaFuncSetAttribute(chain_kernel<1024, 4, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    CHECK(cudaFuncSetAttribute(bulk_kernel<512, 256, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    CHECK(cudaFuncSetAttribute(tensor_kernel<128, 256, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    CHECK(cudaFuncSetAttribute(tensor_kernel<256, 256, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    CHECK(cudaFuncSetAttribute(tensor_kernel<256, 256, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    CHECK(cudaFuncSetAttribute(tensor_kernel<512, 128, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    CHECK(cudaFuncSetAttribute(tensor_kernel<512, 256, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    std::printf("%d SMs; µs per step (replayed graph, median of 7 × 20)\n", sms);
    std::printf("%-14s %-16s %9s %9s %9s %7s\n", "model", "variant", "MB/step", "bound us", "step us",
                "share");
    for (const Model& m : models) {
        std::vector<Phase> phases;
        size_t bytes = 0;
        float* x0;
        CHECK(cudaMalloc(&x0, 65536 * 4));
        CHECK(cudaMemset(x0, 0, 65536 * 4));
        const float* x = x0;
        auto add = [&](int n, int k) {
            uint4* w;
            float* y;
            const size_t wb = (size_t)n * k / 2;
            CHECK(cudaMalloc(&w, wb));
            CHECK(cudaMemset(w, 0x5a, wb));
            CHECK(cudaMalloc(&y, (size_t)max(n, 65536) * 4));
            CHECK(cudaMemset(y, 0, (size_t)max(n, 65536) * 4));
            phases.push_back({w, x, y, n, k});
            bytes += wb;
            x = y;
        };
        for (int l = 0; l < m.layers; ++l) {
            add(m.qkv, m.hidden);
            add(m.hidden, m.hidden);
            add(2 * m.inter, m.hidden);
            add(m.hidden, m.inter);
        }
        add(m.vocab, m.hidden);
        for (const Variant& v : variants) {
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
            for (const Phase& p : phases) {
                cudaLaunchConfig_t cfg = {};
                cfg.gridDim = dim3(min(sms, (p.n + 15) / 16));
                cfg.blockDim = dim3(v.threads);
                cfg.dynamicSmemBytes = (v.bulk_w ? v.threads / 32 * v.depth * 16 * v.bulk_w : v.threads * v.depth * v.group * 16) + p.k * 4;
                cfg.stream = s;
                cudaLaunchAttribute attr;
                attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
                attr.val.programmaticStreamSerializationAllowed = 1;
                cfg.attrs = &attr;
                cfg.numAttrs = 1;
                if (!v.bulk_w && v.threads == 1024 && v.depth == 3 && v.group == 1) CHECK(cudaLaunchKernelEx(&cfg, chain_kernel<1024, 3, 1>, p, v.early));
                if (!v.bulk_w && v.threads == 1024 && v.depth == 4 && v.group == 1) CHECK(cudaLaunchKernelEx(&cfg, chain_kernel<1024, 4, 1>, p, v.early));
                if (!v.tensor && v.bulk_w == 256 && v.threads == 512 && v.depth == 2) CHECK(cudaLaunchKernelEx(&cfg, bulk_kernel<512, 256, 2>, p, v.early));
                if (v.tensor && v.bulk_w == 256 && v.threads == 128 && v.depth == 4) CHECK(cudaLaunchKernelEx(&cfg, tensor_kernel<128, 256, 4>, p, weight_map(p, 256), v.early));
                if (v.tensor && v.bulk_w == 256 && v.threads == 256 && v.depth == 2) CHECK(cudaLaunchKernelEx(&cfg, tensor_kernel<256, 256, 2>, p, weight_map(p, 256), v.early));
                if (v.tensor && v.bulk_w == 256 && v.threads == 256 && v.depth == 3) CHECK(cudaLaunchKernelEx(&cfg, tensor_kernel<256, 256, 3>, p, weight_map(p, 256), v.early));
                if (v.tensor && v.bulk_w == 128 && v.threads == 512 && v.depth == 4) CHECK(cudaLaunchKernelEx(&cfg, tensor_kernel<512, 128, 4>, p, weight_map(p, 128), v.early));
                if (v.tensor && v.bulk_w == 256 && v.threads == 512 && v.depth == 2) CHECK(cudaLaunchKernelEx(&cfg, tensor_kernel<512, 256, 2>, p, weight_map(p, 256), v.early));
            }
            CHECK(cudaStreamEndCapture(s, &g));
            CHECK(cudaGraphInstantiate(&ge, g, 0));
            for (int i = 0; i < 5; ++i) CHECK(cudaGraphLaunch(ge, s));
            std::vector<float> runs;
            cudaEvent_t a, b;
            CHECK(cudaEventCreate(&a));
            CHECK(cudaEventCreate(&b));
            for (int r = 0; r < 7; ++r) {
                const int reps = 20;
                CHECK(cudaEventRecord(a, s));
                for (int i = 0; i < reps; ++i) CHECK(cudaGraphLaunch(ge, s));
                CHECK(cudaEventRecord(b, s));
                CHECK(cudaEventSynchronize(b));
                float ms;
                CHECK(cudaEventElapsedTime(&ms, a, b));
                runs.push_back(ms * 1e3f / reps);
            }
            std::sort(runs.begin(), runs.end());
            const double bound = bytes / 3.0e12 * 1e6;
            std::printf("%-14s %-16s %9.1f %9.1f %9.1f %6.1f%%\n", m.name, v.name, bytes / 1e6, bound,
                        runs[3], 100.0 * bound / runs[3]);
            CHECK(cudaGraphExecDestroy(ge));
            CHECK(cudaGraphDestroy(g));
        }
        for (const Phase& p : phases) {
            CHECK(cudaFree((void*)p.w));
            CHECK(cudaFree(p.y));
        }
        CHECK(cudaFree(x0));
    }
    return 0;
}
