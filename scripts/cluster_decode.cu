// Could a small model's decode step run as ONE thread-block cluster walking its phases, with
// the weights streaming into shared memory across phase boundaries? The question behind a
// cluster megakernel for SmolLM2, whose 154 kernels a token are bound by the ~0.8 µs kernel
// boundary and by each kernel's chain of work, not by bytes (76 MB a token).
//
// The model: SmolLM2-135M's layers as phases (q/k/v, attention, o, gate/up, down; 4-bit-sized
// rows of k/2 bytes), attention as a phase whose "rows" are the KV cache positions (K and V of
// 3 heads × 64 dims in f32: 1,536 bytes a position, old keys never change, so they stream like
// weights) and whose outputs are each block's partials (9 heads × (64 + 2) floats). One
// cluster of C blocks (one an SM, 512 threads). In block b:
//   warp 0      streams the block's slice of every phase (rows b·n/C … (b+1)·n/C, contiguous)
//               into a ring of SLOTS shared-memory slots with bulk copies (cp.async.bulk,
//               mbarrier tx counts); it never waits for a phase's inputs, only for free slots;
//   warps 1–15  per phase: wait for x (the previous phase's outputs in the block's own shared
//               memory), reduce each row of each slot against x (a warp a row), write the
//               block's outputs into every block's next x (distributed shared memory), then
//               meet at an all-to-all barrier (a local mbarrier per block, one remote arrive
//               from every block, release/acquire at cluster scope).
// Modes: `barrier` (no weights: the barrier and the broadcast alone; also the hardware
// barrier.cluster by all threads), `stream` (the ring alone: per-SM bandwidth), `full` with a
// cheap reduction (`xor`: the stream, the phases and their overlap) and with the SIMT
// dequantization of matvec.cu (`simt`: AND, I2F and FMA a weight — issue-bound on C SMs).
// The lm head (16 MB) would stay a kernel of its own over the whole GPU and is left out.
// Build: nvcc -O3 -arch=sm_90a -o cluster_decode cluster_decode.cu
#ifndef __CUDACC_RTC__  // NVRTC compiles the kernels alone (a check without nvcc)
#include <cstdint>
#include "decode_chain.cuh"
#include "mbarrier.cuh"
#endif

constexpr int THREADS = 512, CONSUMER_WARPS = THREADS / 32 - 1;
constexpr int SLOTS = 8, SLOT_BYTES = 16384;
constexpr int MAX_X = 9 * 66 * 16;  // floats: attention partials of 16 blocks
constexpr int MAX_PHASES = 256;

struct ClusterPhase {
    const uint8_t* w;  // n rows of row_bytes, row-major
    int n, row_bytes, outs;
};

struct Smem {
    alignas(128) uint8_t ring[SLOTS][SLOT_BYTES];
    float x[2][MAX_X];
    float y[2048];  // the block's row results of a phase
    ClusterPhase phases[MAX_PHASES];
    alignas(8) uint64_t full[SLOTS], empty[SLOTS], done[2];
};

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ unsigned cluster_size() {
    unsigned n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    return n;
}

// Every thread of the cluster (barrier.cluster: release, then acquire).
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n barrier.cluster.wait.acquire.aligned;" ::
                     : "memory");
}

// The address of `p`'s counterpart in block `rank`'s shared memory (shared::cluster window).
__device__ __forceinline__ uint32_t remote_addr(const void* p, unsigned rank) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
    return remote;
}

__device__ __forceinline__ void store_remote(float* p, unsigned rank, float v) {
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote_addr(p, rank)), "f"(v) : "memory");
}

__device__ __forceinline__ void mbar_wait_cluster(uint64_t* bar, unsigned parity) {
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n"
        " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra WAIT_%=;\n}" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}

// Arrives on the mbarrier at `bar`'s offset in block `rank`'s shared memory.
__device__ __forceinline__ void mbar_arrive_remote(uint64_t* bar, unsigned rank) {
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(
                     remote_addr(bar, rank))
                 : "memory");
}

__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;" ::"r"(CONSUMER_WARPS * 32) : "memory");
}

// Block `rank`'s rows of a phase of n rows over C blocks.
__device__ __forceinline__ void slice(int n, int rank, int c, int& r0, int& r1) {
    r0 = (int)((long)n * rank / c);
    r1 = (int)((long)n * (rank + 1) / c);
}

// Rows a slot holds.
__device__ __forceinline__ int slot_rows(const ClusterPhase& p) {
    return max(1, SLOT_BYTES / p.row_bytes);
}

// Warp 0's lane 0: the block's rows of every phase into the ring, in order.
__device__ __forceinline__ void produce(Smem& s, int count, int rank, int c) {
    int it = 0;
    for (int p = 0; p < count; ++p) {
        const ClusterPhase ph = s.phases[p];
        int r0, r1;
        slice(ph.n, rank, c, r0, r1);
        for (int r = r0; r < r1; r += slot_rows(ph), ++it) {
            const int slot = it % SLOTS, rows = min(slot_rows(ph), r1 - r);
            if (it >= SLOTS) mbar_wait(&s.empty[slot], ((it / SLOTS) - 1) & 1);
            bulk_copy(s.ring[slot], ph.w + (size_t)r * ph.row_bytes,
                      (unsigned)(rows * ph.row_bytes), &s.full[slot]);
        }
    }
}

enum Mode { BARRIER_ONLY = 0, HW_BARRIER = 1, STREAM_ONLY = 2, FULL_XOR = 3, FULL_SIMT = 4 };

template <int MODE>
__device__ __forceinline__ float row_dot(const uint8_t* row, int row_bytes, const float* x,
                                         int k_floats, int lane) {
    float acc = 0.f;
    for (int u = lane; u < row_bytes / 16; u += 32) {
        const uint4 w = reinterpret_cast<const uint4*>(row)[u];
        const float* xu = x + (u * 32) % k_floats;
        if constexpr (MODE == FULL_SIMT) {
            const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    acc = fmaf((float)(ws[q] & (15u << (4 * e))), xu[8 * q + e], acc);
        } else {
            acc = fmaf((float)((w.x ^ w.y ^ w.z ^ w.w) & 0xff), xu[0], acc);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

template <int MODE>
__global__ void __launch_bounds__(THREADS, 1)
    cluster_step(const ClusterPhase* phases, int count, int k_first) {
    extern __shared__ __align__(128) uint8_t smem_raw[];
    Smem& s = *reinterpret_cast<Smem*>(smem_raw);
    const int rank = (int)cluster_rank(), c = (int)cluster_size();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < count; i += THREADS) s.phases[i] = phases[i];
    for (int i = threadIdx.x; i < MAX_X; i += THREADS) s.x[0][i] = 1e-3f;
    if (threadIdx.x == 0) {
        for (int i = 0; i < SLOTS; ++i) {
            mbar_init(&s.full[i], 1);
            mbar_init(&s.empty[i], CONSUMER_WARPS);
        }
        mbar_init(&s.done[0], c);
        mbar_init(&s.done[1], c);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    cluster_sync();  // barriers initialised everywhere before any remote arrive

    if constexpr (MODE == HW_BARRIER) {
        for (int p = 0; p < count; ++p) cluster_sync();
        return;
    }
    const bool streams = MODE != BARRIER_ONLY;
    if (warp == 0) {
        if (streams && lane == 0) produce(s, count, rank, c);
        __syncwarp();
        cluster_sync();
        return;
    }
    // Consumers.
    const int cw = warp - 1, ct = threadIdx.x - 32;
    int it = 0, k_floats = k_first;
    for (int p = 0; p < count; ++p) {
        const ClusterPhase ph = s.phases[p];
        const float* x = s.x[p & 1];
        int r0, r1;
        slice(ph.n, rank, c, r0, r1);
        if (streams) {
            for (int r = r0; r < r1; r += slot_rows(ph), ++it) {
                const int slot = it % SLOTS, rows = min(slot_rows(ph), r1 - r);
                mbar_wait(&s.full[slot], (it / SLOTS) & 1);
                if constexpr (MODE != STREAM_ONLY) {
                    for (int j = cw; j < rows; j += CONSUMER_WARPS) {
                        const float v = row_dot<MODE>(s.ring[slot] + j * ph.row_bytes,
                                                      ph.row_bytes, x, k_floats, lane);
                        if (lane == 0) s.y[(r - r0 + j) & 2047] = v * 1e-6f;
                    }
                }
                __syncwarp();
                if (lane == 0) mbar_arrive(&s.empty[slot]);
            }
        }
        if constexpr (MODE == STREAM_ONLY) continue;
        // The block's share of the outputs into every block's next x, then the barrier.
        consumers_sync();
        int o0, o1;
        slice(ph.outs, rank, c, o0, o1);
        float* next = s.x[(p + 1) & 1];
        for (int i = ct; i < (o1 - o0) * c; i += CONSUMER_WARPS * 32) {
            const int dst = i / (o1 - o0), o = o0 + i % (o1 - o0);
            store_remote(next + o, dst, s.y[(o - o0) & 2047] + x[o % 64]);
        }
        consumers_sync();
        if (ct < c) mbar_arrive_remote(&s.done[p & 1], ct);
        mbar_wait_cluster(&s.done[p & 1], (p >> 1) & 1);
        k_floats = ph.outs;
    }
    cluster_sync();
}

#ifndef __CUDACC_RTC__
struct ClusterChain {
    std::vector<ClusterPhase> phases;
    std::vector<void*> buffers;
    size_t bytes = 0;
};

// SmolLM2-135M's layers; attention reads `keys` positions (none: no attention phase).
ClusterChain smollm2_chain(int keys, int layers) {
    ClusterChain ch;
    auto add = [&](int n, int row_bytes, int outs) {
        uint8_t* w;
        const size_t b = (size_t)n * row_bytes;
        CHECK(cudaMalloc(&w, b));
        CHECK(cudaMemset(w, 0x5a, b));
        ch.buffers.push_back(w);
        ch.phases.push_back({w, n, row_bytes, outs});
        ch.bytes += b;
    };
    for (int l = 0; l < layers; ++l) {
        add(960, 576 / 2, 960);
        if (keys > 0) add(keys, 3 * 64 * 4 * 2, 9 * 66 * 16);
        add(576, 576 / 2, 576);
        add(3072, 576 / 2, 1536);
        add(576, 1536 / 2, 576);
    }
    return ch;
}

template <int MODE>
float time_mode(cudaStream_t st, const ClusterChain& ch, ClusterPhase* dev, int c) {
    auto kernel = cluster_step<MODE>;
    const size_t smem = sizeof(Smem);
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(c);
    cfg.blockDim = dim3(THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = c;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters < 1) {
        cudaGetLastError();
        return -1.f;
    }
    return replay_us(st, [&] {
        CHECK(cudaLaunchKernelEx(&cfg, kernel, (const ClusterPhase*)dev, (int)ch.phases.size(),
                                 576));
    });
}

int main() {
    cudaStream_t st;
    CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    std::printf("shared memory a block: %zu bytes; µs per step (replayed graph, median of 7 × 20)\n",
                sizeof(Smem));
    std::printf("%-5s %3s %7s %8s %9s %9s %9s %9s %9s %8s\n", "keys", "C", "phases", "MB",
                "barrier", "hw-barr", "stream", "full-xor", "full-simt", "GB/s");
    const int key_counts[] = {0, 128, 1024};
    for (int keys : key_counts) {
        ClusterChain ch = smollm2_chain(keys, 30);
        ClusterPhase* dev;
        CHECK(cudaMalloc(&dev, ch.phases.size() * sizeof(ClusterPhase)));
        CHECK(cudaMemcpy(dev, ch.phases.data(), ch.phases.size() * sizeof(ClusterPhase),
                         cudaMemcpyHostToDevice));
        for (int c : {8, 16}) {
            const float us[5] = {time_mode<BARRIER_ONLY>(st, ch, dev, c),
                                 time_mode<HW_BARRIER>(st, ch, dev, c),
                                 time_mode<STREAM_ONLY>(st, ch, dev, c),
                                 time_mode<FULL_XOR>(st, ch, dev, c),
                                 time_mode<FULL_SIMT>(st, ch, dev, c)};
            std::printf("%-5d %3d %7zu %8.1f %9.1f %9.1f %9.1f %9.1f %9.1f %8.0f\n", keys, c,
                        ch.phases.size(), ch.bytes / 1e6, us[0], us[1], us[2], us[3], us[4],
                        us[2] > 0 ? ch.bytes / (us[2] * 1e3) : 0.0);
        }
        CHECK(cudaFree(dev));
        for (void* b : ch.buffers) CHECK(cudaFree(b));
    }
    return 0;
}
#endif
