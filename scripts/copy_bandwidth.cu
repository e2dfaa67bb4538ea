// Device-to-device copy bandwidth (bytes read + written per second): the memory ceiling
// that decode speed is compared against. Build: nvcc -O2 -o copy_bandwidth copy_bandwidth.cu
#include <cstdio>
#include <cuda_runtime.h>

int main() {
    const size_t bytes = size_t(2) << 30;
    void *a, *b;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
        std::fprintf(stderr, "cudaMalloc failed\n");
        return 1;
    }
    cudaMemset(a, 1, bytes);
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);  // warm-up
    const int reps = 20;
    cudaEventRecord(start);
    for (int i = 0; i < reps; ++i) cudaMemcpy(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    if (cudaGetLastError() != cudaSuccess) return 1;
    std::printf("copy bandwidth: %.0f GB/s (read + write)\n", 2.0 * bytes * reps / (ms * 1e-3) / 1e9);
    return 0;
}
