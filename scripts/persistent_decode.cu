// What one kernel per matvec costs against one persistent kernel with grid barriers, for the
// matvec chain of a decode step (no attention): the question behind a decode megakernel.
// Each phase is y = W·x over 4-bit-sized rows (k/2 bytes, read as 16-byte words, a cheap
// data-dependent sum so that the loads, not the arithmetic, set the time), and its x is the
// previous phase's y. Three ways to run a step, each timed as a replayed CUDA graph:
//   kernels     one kernel per phase, launched with programmatic stream serialization (PDL):
//               a block starts its first weights towards L2, then griddepcontrol.wait;
//   persistent  one kernel of (blocks per SM × SMs) blocks walking the phases, a grid barrier
//               (an atomic counter) between phases;
//   +prefetch   the same, and before each barrier a block sends its first rows of the next
//               phase towards L2 (weights never depend on the previous phase).
// Build: nvcc -O3 -arch=sm_90 -o persistent_decode persistent_decode.cu
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(x)                                                                   \
    do {                                                                           \
        cudaError_t e = (x);                                                       \
        if (e != cudaSuccess) {                                                    \
            std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
            std::exit(1);                                                          \
        }                                                                          \
    } while (0)

constexpr int THREADS = 256, WARPS = 8, ROWS_PER_WARP = 2, ROWS = WARPS * ROWS_PER_WARP;

struct Phase {
    const uint4* w;  // [n, k/32] 16-byte words (32 four-bit weights each)
    const float* x;  // [k]
    float* y;        // [n]
    int n, k;
};

__device__ __forceinline__ int blocks_of(const Phase& p) { return (p.n + ROWS - 1) / ROWS; }

__device__ __forceinline__ void prefetch_rows(const Phase& p, int vb) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, words = p.k / 32;
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int row = min(vb * ROWS + warp * ROWS_PER_WARP + r, p.n - 1);
        const uint4* w = p.w + (size_t)row * words;
        for (int u = lane * 8; u < words; u += 256)  // one 128-byte line a lane
            asm volatile("prefetch.global.L2 [%0];" ::"l"(w + u));
    }
}

// One block's 16 rows: warp w owns rows 2w and 2w+1, lanes stride the row's words, all loads
// of a step issued before their use.
__device__ __forceinline__ void matvec_block(const Phase& p, int vb) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, words = p.k / 32;
    const int row0 = vb * ROWS + warp * ROWS_PER_WARP;
    float acc[ROWS_PER_WARP] = {};
    for (int u0 = lane; u0 < words; u0 += 32 * 4) {
        uint4 q[ROWS_PER_WARP][4];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int u = min(u0 + 32 * j, words - 1);
                q[r][j] = __ldg(p.w + (size_t)min(row0 + r, p.n - 1) * words + u);
            }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int u = u0 + 32 * j;
            if (u >= words) break;
            const float xv = p.x[u * 32];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r)
                acc[r] += xv * (float)((q[r][j].x ^ q[r][j].y ^ q[r][j].z ^ q[r][j].w) & 0xff);
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        // Small outputs so that x stays finite along the chain.
        if (lane == 0 && row0 + r < p.n) p.y[row0 + r] = v * 1e-6f;
    }
}

__global__ void __launch_bounds__(THREADS) phase_kernel(Phase p) {
    prefetch_rows(p, blockIdx.x);
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    matvec_block(p, blockIdx.x);
}

__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
        unsigned seen;
        do {
            asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(seen) : "l"(counter));
        } while (seen < target);
    }
    __syncthreads();
}

__global__ void __launch_bounds__(THREADS) persistent_kernel(const Phase* phases, int count,
                                                             unsigned* counter, bool prefetch) {
    for (int i = 0; i < count; ++i) {
        const Phase p = phases[i];
        for (int vb = blockIdx.x; vb < blocks_of(p); vb += gridDim.x) matvec_block(p, vb);
        if (i + 1 < count) {
            if (prefetch) {
                const Phase next = phases[i + 1];
                if (blockIdx.x < blocks_of(next)) prefetch_rows(next, blockIdx.x);
            }
            grid_barrier(counter, (i + 1) * gridDim.x);
        }
    }
}

struct Model {
    const char* name;
    int hidden, qkv, inter, layers, vocab;
};

int main() {
    const Model models[] = {
        {"smollm2-135m", 576, 960, 1536, 30, 49152},
        {"llama-3.2-1b", 2048, 3072, 8192, 16, 128256},
        {"llama-3.1-8b", 4096, 6144, 14336, 32, 128256},
    };
    int sms = 0, per_sm = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_kernel, THREADS, 0));
    std::printf("%d SMs, %d persistent blocks per SM\n", sms, per_sm);
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned* counter;
    CHECK(cudaMalloc(&counter, 4));
    std::printf("%-14s %7s %9s %10s %12s %12s %12s\n", "model", "phases", "MB/step", "bound us",
                "kernels us", "persist us", "+prefetch us");
    for (const Model& m : models) {
        // Per layer: qkv (n = q + k + v heads), o, gate and up as one matrix, down; then the lm head.
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
            CHECK(cudaMalloc(&y, (size_t)n * 4));
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
        Phase* dev_phases;
        CHECK(cudaMalloc(&dev_phases, phases.size() * sizeof(Phase)));
        CHECK(cudaMemcpy(dev_phases, phases.data(), phases.size() * sizeof(Phase),
                         cudaMemcpyHostToDevice));

        auto graph_of = [&](int mode) {
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
            if (mode == 0) {
                for (const Phase& p : phases) {
                    cudaLaunchConfig_t cfg = {};
                    cfg.gridDim = dim3((p.n + ROWS - 1) / ROWS);
                    cfg.blockDim = dim3(THREADS);
                    cfg.stream = s;
                    cudaLaunchAttribute attr;
                    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
                    attr.val.programmaticStreamSerializationAllowed = 1;
                    cfg.attrs = &attr;
                    cfg.numAttrs = 1;
                    CHECK(cudaLaunchKernelEx(&cfg, phase_kernel, p));
                }
            } else {
                CHECK(cudaMemsetAsync(counter, 0, 4, s));
                persistent_kernel<<<sms * per_sm, THREADS, 0, s>>>(dev_phases, (int)phases.size(),
                                                                   counter, mode == 2);
                CHECK(cudaGetLastError());
            }
            CHECK(cudaStreamEndCapture(s, &g));
            CHECK(cudaGraphInstantiate(&ge, g, 0));
            return ge;
        };
        float us[3];
        for (int mode = 0; mode < 3; ++mode) {
            cudaGraphExec_t ge = graph_of(mode);
            for (int i = 0; i < 5; ++i) CHECK(cudaGraphLaunch(ge, s));
            cudaEvent_t a, b;
            CHECK(cudaEventCreate(&a));
            CHECK(cudaEventCreate(&b));
            const int reps = 50;
            CHECK(cudaEventRecord(a, s));
            for (int i = 0; i < reps; ++i) CHECK(cudaGraphLaunch(ge, s));
            CHECK(cudaEventRecord(b, s));
            CHECK(cudaEventSynchronize(b));
            float ms;
            CHECK(cudaEventElapsedTime(&ms, a, b));
            us[mode] = ms * 1e3f / reps;
        }
        std::printf("%-14s %7zu %9.1f %10.1f %12.1f %12.1f %12.1f\n", m.name, phases.size(),
                    bytes / 1e6, bytes / 3.0e12 * 1e6, us[0], us[1], us[2]);
        for (const Phase& p : phases) {
            CHECK(cudaFree((void*)p.w));
            CHECK(cudaFree(p.y));
        }
        CHECK(cudaFree(dev_phases));
        CHECK(cudaFree(x0));
    }
    return 0;
}
