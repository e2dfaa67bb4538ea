// Read-pattern microbenchmark for the decode matvec (docs/cuda-backend.md, third session):
// does reading 16-row tiles in 64-byte pieces per row limit HBM bandwidth? On the GPU machine:
// nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/pattern scripts/matvec_read_patterns.cu && /tmp/pattern
#include <cstdio>
#include <cuda_runtime.h>
typedef unsigned int u32;
#define ROWS 28672
#define ROWB 2048
#define NBUF 4
// P0: linear streaming, each warp a contiguous tile, 4 loads in flight per lane.
__global__ void p_linear(const uint4* __restrict__ w, u32* out, int tiles_per_warp_rows) {
  int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  const uint4* p = w + (size_t)warp * 16 * ROWB / 16 * tiles_per_warp_rows;
  int n = 16 * ROWB / 16 * tiles_per_warp_rows;
  u32 acc = 0;
  for (int i = lane; i < n; i += 32 * 4) {
    uint4 v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = (i + 32 * j < n) ? p[i + 32 * j] : make_uint4(0,0,0,0);
#pragma unroll
    for (int j = 0; j < 4; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  }
  if (acc == 0x12345678) out[0] = acc;
}
// P1: TC-kernel pattern: warp owns 16 rows; lane (g,t) reads rows g, g+8 at 16*(4*step+t); DEPTH steps in flight.
template <int DEPTH>
__global__ void p_quad(const unsigned char* __restrict__ w, u32* out, int kgroups) {
  int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  int tile = warp / kgroups, slice = warp % kgroups;
  int g = lane >> 2, t = lane & 3;
  const unsigned char* r0 = w + (size_t)(tile * 16 + g) * ROWB;
  const unsigned char* r1 = r0 + 8 * ROWB;
  u32 acc = 0;
  const int steps = ROWB / 64;
  for (int s = slice; s < steps; s += kgroups * DEPTH) {
    uint4 v[DEPTH][2];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      int st = min(s + d * kgroups, steps - 1);
      v[d][0] = *(const uint4*)(r0 + 64 * st + 16 * t);
      v[d][1] = *(const uint4*)(r1 + 64 * st + 16 * t);
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) acc ^= v[d][0].x ^ v[d][1].y ^ v[d][0].z ^ v[d][1].w;
  }
  if (acc == 0x12345678) out[0] = acc;
}
// P2: warp reads one row's 512 contiguous bytes per instruction, 16 rows of the tile per k-window; kgroups split windows.
__global__ void p_row512(const unsigned char* __restrict__ w, u32* out, int kgroups) {
  int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  int tile = warp / kgroups, slice = warp % kgroups;
  const unsigned char* base = w + (size_t)tile * 16 * ROWB;
  u32 acc = 0;
  for (int win = slice; win < ROWB / 512; win += kgroups) {
    uint4 v[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) v[r] = *(const uint4*)(base + (size_t)r * ROWB + 512 * win + 16 * lane);
#pragma unroll
    for (int r = 0; r < 16; ++r) acc ^= v[r].x ^ v[r].w;
  }
  if (acc == 0x12345678) out[0] = acc;
}
int main() {
  size_t bytes = (size_t)ROWS * ROWB;  // 58.7 MB, like the gated 14336x4096 pair
  unsigned char* buf[NBUF]; u32* out; cudaMalloc(&out, 4);
  for (int i = 0; i < NBUF; ++i) { cudaMalloc(&buf[i], bytes); cudaMemset(buf[i], i + 1, bytes); }
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto timeit = [&](const char* name, auto launch) {
    for (int i = 0; i < 4; ++i) launch(buf[i % NBUF]);
    cudaEventRecord(a);
    const int reps = 40;
    for (int i = 0; i < reps; ++i) launch(buf[i % NBUF]);
    cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    double us = ms * 1000 / reps;
    printf("%-28s %8.1f us %8.0f GB/s\n", name, us, bytes / us / 1e3);
  };
  const int tiles = ROWS / 16;  // 1792 warps-tiles
  timeit("linear (1 tile/warp)", [&](unsigned char* p) { p_linear<<<tiles / 8, 256>>>((const uint4*)p, out, 1); });
  for (int kg = 1; kg <= 4; kg *= 2) {
    char nm[64];
    sprintf(nm, "quad64 depth2 kg%d", kg);
    timeit(nm, [&](unsigned char* p) { p_quad<2><<<tiles * kg / 8, 256>>>(p, out, kg); });
    sprintf(nm, "quad64 depth8 kg%d", kg);
    timeit(nm, [&](unsigned char* p) { p_quad<8><<<tiles * kg / 8, 256>>>(p, out, kg); });
    sprintf(nm, "row512 kg%d", kg);
    timeit(nm, [&](unsigned char* p) { p_row512<<<tiles * kg / 8, 256>>>(p, out, kg); });
  }
  cudaError_t e = cudaDeviceSynchronize(); printf("status: %s\n", cudaGetErrorString(e));
}
