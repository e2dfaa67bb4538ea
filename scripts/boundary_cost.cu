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
    return 0;
}
