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
#include "decode_chain.cuh"

constexpr int THREADS = 256, WARPS = 8, ROWS_PER_WARP = 2, ROWS = WARPS * ROWS_PER_WARP;

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

int main() {
    int sms = 0, per_sm = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_kernel, THREADS, 0));
    std::printf("%d SMs, %d persistent blocks per SM; µs per step (replayed graph, median of 7 × 20)\n",
                sms, per_sm);
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned* counter;
    CHECK(cudaMalloc(&counter, 4));
    std::printf("%-14s %7s %9s %10s %12s %12s %12s\n", "model", "phases", "MB/step", "bound us",
                "kernels us", "persist us", "+prefetch us");
    for (const ChainModel& m : CHAIN_MODELS) {
        Chain c = build_chain(m);
        Phase* dev_phases;
        CHECK(cudaMalloc(&dev_phases, c.phases.size() * sizeof(Phase)));
        CHECK(cudaMemcpy(dev_phases, c.phases.data(), c.phases.size() * sizeof(Phase),
                         cudaMemcpyHostToDevice));
        float us[3];
        for (int mode = 0; mode < 3; ++mode) {
            us[mode] = replay_us(s, [&] {
                if (mode == 0) {
                    for (const Phase& p : c.phases)
                        launch_pdl(phase_kernel, dim3((p.n + ROWS - 1) / ROWS), dim3(THREADS), 0, s, p);
                } else {
                    CHECK(cudaMemsetAsync(counter, 0, 4, s));
                    persistent_kernel<<<sms * per_sm, THREADS, 0, s>>>(
                        dev_phases, (int)c.phases.size(), counter, mode == 2);
                    CHECK(cudaGetLastError());
                }
            });
        }
        std::printf("%-14s %7zu %9.1f %10.1f %12.1f %12.1f %12.1f\n", m.name, c.phases.size(),
                    c.bytes / 1e6, c.bytes / 3.0e12 * 1e6, us[0], us[1], us[2]);
        CHECK(cudaFree(dev_phases));
        free_chain(c);
    }
    return 0;
}
