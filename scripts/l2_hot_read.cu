// Does every SM reading the same small buffer from L2 at once (a decode matvec staging x) run
// slower than each SM reading its own copy? Each block of 512 threads reads `bytes` of
// copy (block % copies) with 16-byte L2-only loads, `iters` times. A thread's loads in a pass
// follow one another (the loop is not unrolled), so a pass measures latency under that load
// rather than bandwidth. H100, 2026-11-26: the same time for 1 and 132 copies at 8–56 KB
// (0.35 µs a pass at 8 KB), so the staging's cost is not a hot spot in L2.
#include <cstdio>
#include <cuda_runtime.h>

__global__ void hot_read(const float4* __restrict__ buf, int words, int copies, int iters, float* out) {
    const float4* x = buf + (size_t)(blockIdx.x % copies) * words;
    float acc = 0.f;
    int shift = 0;
    for (int it = 0; it < iters; ++it) {
        float s = 0.f;
        for (int i = threadIdx.x; i < words; i += blockDim.x) {
            float4 v;
            const float4* p = x + ((i + shift) % words);
            asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
            s += v.x + v.y + v.z + v.w;
        }
        acc += s;
        shift = (s != 12345.f) ? 0 : 1;  // a dependency on the pass, always 0
    }
    if (acc == 12345.f) out[blockIdx.x] = acc;
}

int main() {
    int sms;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const int max_bytes = 64 * 1024, max_copies = 256;
    float4* buf;
    float* out;
    cudaMalloc(&buf, (size_t)max_bytes * max_copies);
    cudaMemset(buf, 0, (size_t)max_bytes * max_copies);
    cudaMalloc(&out, 4096);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    const int iters = 200;
    printf("%8s %7s %9s %10s\n", "bytes", "copies", "us/pass", "GB/s(all)");
    for (int bytes : {8192, 16384, 28672, 57344}) {
        for (int copies : {1, 2, 4, 8, 132}) {
            const int words = bytes / 16;
            hot_read<<<sms, 512>>>(buf, words, copies, 2, out);
            cudaEventRecord(a);
            hot_read<<<sms, 512>>>(buf, words, copies, iters, out);
            cudaEventRecord(b);
            cudaEventSynchronize(b);
            float ms;
            cudaEventElapsedTime(&ms, a, b);
            const double us = ms * 1e3 / iters;
            printf("%8d %7d %9.3f %10.0f\n", bytes, copies, us, (double)bytes * sms / us / 1e3);
        }
    }
    return 0;
}
