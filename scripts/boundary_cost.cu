// What a kernel boundary of the replayed decode step costs, and whether a software handoff
// beats the hardware one. A chain of KERNELS tiny kernels (each thread reads the previous
// kernel's output and writes its own), timed as a replayed CUDA graph, µs per kernel:
//   plain      launches without programmatic serialization;
//   pdl        programmatic launch, griddepcontrol.wait then launch_dependents (mlx-native's
//              decode kernels);
//   flag       programmatic launch, but no griddepcontrol.wait: thread 0 polls a counter that
//              each block of the previous kernel bumps (release) after its writes;
//   flag-early the same with launch_dependents before the poll;
//   persistent one kernel of one block per SM walking the phases, the same counters as a grid
//              barrier between them.
// A second table has every block read the whole of the previous kernel's output (VEC values,
// as a matvec's blocks read x), with or without shared memory that holds an SM a block:
//   pdl        griddepcontrol.wait, then the reads;
//   tagged     no wait before the reads: outputs are (value, tag) pairs stored 8 bytes at once
//              and readers spin on their pairs until the tag is the launch's (NCCL's LL
//              protocol: no fence, no counter); griddepcontrol.wait before exiting, so that a
//              kernel's completion still implies its predecessors'.
// Build: nvcc -O3 -arch=sm_90 -o boundary_cost boundary_cost.cu
#include "decode_chain.cuh"

constexpr int KERNELS = 200;

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void add_release(unsigned* p, unsigned v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void wait_count(const unsigned* counter, unsigned target) {
    if (threadIdx.x == 0)
        while (load_acquire(counter) < target) {
        }
    __syncthreads();
}

__device__ __forceinline__ void count_block(unsigned* counter) {
    __syncthreads();  // every thread's writes are done
    if (threadIdx.x == 0) add_release(counter, 1u);
}

__device__ __forceinline__ void step(const float* x, float* y) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i] + 1.f;
}

__global__ void pdl_kernel(const float* x, float* y) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    step(x, y);
}

// mode 0: launch_dependents after the poll, 1: before it.
__global__ void flag_kernel(const float* x, float* y, unsigned* counters, int j, unsigned prev,
                            int early) {
    if (early) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (j > 0) wait_count(counters + j - 1, prev);
    if (!early) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    step(x, y);
    count_block(counters + j);
}

__global__ void persistent_kernel(float* a, float* b, unsigned* counter, int phases) {
    for (int j = 0; j < phases; ++j) {
        step(j & 1 ? b : a, j & 1 ? a : b);
        if (j + 1 < phases) {
            count_block(counter);
            wait_count(counter, (j + 1) * gridDim.x);
        }
    }
}

constexpr int VEC = 2048;

// Each block stores pairs i ≡ block (mod grid) of y, each the sum of a few of x.
__device__ __forceinline__ float vec_value(const float* xs, int i) {
    return xs[i] + xs[(i + 1) % VEC] * 0.5f;
}

__global__ void pdl_vec_kernel(const float* x, float* y) {
    extern __shared__ float hold[];  // dynamic size only holds the SM
    __shared__ float xs[VEC];
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    for (int i = threadIdx.x; i < VEC; i += blockDim.x) xs[i] = __ldcg(x + i);
    __syncthreads();
    for (int i = blockIdx.x + gridDim.x * threadIdx.x; i < VEC; i += gridDim.x * blockDim.x)
        y[i] = vec_value(xs, i) + (hold[0] = 0.f);
}

// x and y: VEC (value, tag) pairs; the launch's tag is *step · KERNELS + j + 1 (tag 0 for the
// chain's input, whose tags are never checked).
__global__ void tagged_vec_kernel(const uint2* x, uint2* y, const unsigned* step, int j) {
    extern __shared__ float hold[];
    __shared__ float xs[VEC];
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const unsigned base = __ldcg(step) * KERNELS, want = base + j, tag = base + j + 1;
    for (int i = threadIdx.x; i < VEC; i += blockDim.x) {
        unsigned v, t;
        do {
            asm volatile("ld.volatile.global.v2.u32 {%0, %1}, [%2];"
                         : "=r"(v), "=r"(t)
                         : "l"(x + i));
        } while (j > 0 && t != want);
        xs[i] = __uint_as_float(v);
    }
    __syncthreads();
    for (int i = blockIdx.x + gridDim.x * threadIdx.x; i < VEC; i += gridDim.x * blockDim.x) {
        store_tagged_pair(y + i, vec_value(xs, i) + (hold[0] = 0.f), tag);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

// After the chain (a plain launch, so every kernel of it is done): the next replay's tags.
__global__ void bump_kernel(unsigned* step) { *step += 1; }

int main() {
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    float *a, *b;
    unsigned* counters;
    CHECK(cudaMalloc(&a, 1 << 22));
    CHECK(cudaMalloc(&b, 1 << 22));
    CHECK(cudaMemset(a, 0, 1 << 22));
    CHECK(cudaMemset(b, 0, 1 << 22));
    CHECK(cudaMalloc(&counters, KERNELS * 4));
    std::printf("%d SMs; µs per kernel over a chain of %d (replayed graph, median of 7 × 20)\n",
                sms, KERNELS);
    std::printf("%7s %7s %8s %8s %8s %10s %10s\n", "blocks", "threads", "plain", "pdl", "flag",
                "flag-early", "persistent");
    const int shapes[][2] = {{9, 512}, {66, 128}, {132, 128}, {132, 512}, {264, 128}};
    for (const auto& shape : shapes) {
        const dim3 grid(shape[0]), block(shape[1]);
        float us[5];
        for (int mode = 0; mode < 5; ++mode) {
            us[mode] = replay_us(s, [&] {
                if (mode >= 2) CHECK(cudaMemsetAsync(counters, 0, KERNELS * 4, s));
                if (mode == 4) {
                    if (shape[0] <= sms) {
                        persistent_kernel<<<grid, block, 0, s>>>(a, b, counters, KERNELS);
                        CHECK(cudaGetLastError());
                    }
                    return;
                }
                for (int j = 0; j < KERNELS; ++j) {
                    const float* x = j & 1 ? b : a;
                    float* y = j & 1 ? a : b;
                    if (mode == 0) {
                        pdl_kernel<<<grid, block, 0, s>>>(x, y);
                        CHECK(cudaGetLastError());
                    } else if (mode == 1) {
                        launch_pdl(pdl_kernel, grid, block, 0, s, x, y);
                    } else {
                        launch_pdl(flag_kernel, grid, block, 0, s, x, y, counters, j,
                                   (unsigned)shape[0], mode == 3 ? 1 : 0);
                    }
                }
            }) / KERNELS;
        }
        std::printf("%7d %7d %8.2f %8.2f %8.2f %10.2f %10.2f\n", shape[0], shape[1], us[0], us[1],
                    us[2], us[3], shape[0] <= sms ? us[4] : 0.f);
    }

    // Whole-vector reads: the PDL boundary against tagged data.
    uint2 *pa, *pb;
    unsigned* step;
    CHECK(cudaMalloc(&pa, VEC * 8));
    CHECK(cudaMalloc(&pb, VEC * 8));
    CHECK(cudaMemset(pa, 0, VEC * 8));
    CHECK(cudaMemset(pb, 0, VEC * 8));
    CHECK(cudaMalloc(&step, 4));
    CHECK(cudaMemset(step, 0, 4));
    const int hold = 160 * 1024;  // one block an SM
    CHECK(cudaFuncSetAttribute(pdl_vec_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, hold));
    CHECK(cudaFuncSetAttribute(tagged_vec_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               hold));
    std::printf("\nevery block reads all %d of x; µs per kernel\n", VEC);
    std::printf("%7s %7s %9s %8s %8s\n", "blocks", "threads", "SM each", "pdl", "tagged");
    const int vec_shapes[][3] = {{9, 512, 0}, {132, 512, 0}, {128, 512, 1}, {132, 512, 1}};
    for (const auto& shape : vec_shapes) {
        const dim3 grid(shape[0]), block(shape[1]);
        const size_t smem = shape[2] ? hold : 16;
        float us[2];
        for (int mode = 0; mode < 2; ++mode) {
            us[mode] = replay_us(s, [&] {
                for (int j = 0; j < KERNELS; ++j) {
                    if (mode == 0)
                        launch_pdl(pdl_vec_kernel, grid, block, smem, s,
                                   (const float*)(j & 1 ? pb : pa), (float*)(j & 1 ? pa : pb));
                    else
                        launch_pdl(tagged_vec_kernel, grid, block, smem, s,
                                   (const uint2*)(j & 1 ? pb : pa), j & 1 ? pa : pb,
                                   (const unsigned*)step, j);
                }
                bump_kernel<<<1, 1, 0, s>>>(step);
                CHECK(cudaGetLastError());
            }) / KERNELS;
        }
        std::printf("%7d %7d %9s %8.2f %8.2f\n", shape[0], shape[1], shape[2] ? "yes" : "no", us[0],
                    us[1]);
    }
    return 0;
}
