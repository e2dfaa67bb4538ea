// What one kernel per matvec costs against one persistent kernel with grid barriers, for the
// matvec chain of a decode step (no attention): the question behind a decode megakernel.
// Each phase is y = W·x over 4-bit-sized rows (k/2 bytes, read as 16-byte words, a cheap
// data-dependent sum so that the loads, not the arithmetic, set the time), and its x is the
// previous phase's y. Ways to run a step, each timed as a replayed CUDA graph:
//   kernels     one kernel per phase, launched with programmatic stream serialization (PDL):
//               a block starts its first weights towards L2, then griddepcontrol.wait;
//   persistent  one kernel of (blocks per SM × SMs) blocks walking the phases, a grid barrier
//               (an atomic counter) between phases;
//   +prefetch   the same, and before each barrier a block sends its first rows of the next
//               phase towards L2 (weights never depend on the previous phase);
//   dataflow    one kernel of a block per SM, each block owning a contiguous row range of
//               every phase. A producer warp streams the block's rows of all phases, in order
//               and across phase boundaries, into a ring of shared-memory slots by bulk
//               copies (limited only by free slots), so HBM keeps streaming the next phase's
//               weights while a phase waits for its x; 16 consumer warps take x from the
//               previous phase (`Handoff`: a flag per block, or tagged data), stage it, reduce
//               each slot as it lands and store y. The last columns take parts away (timing
//               only, results wrong): the handoff, then the rows' arithmetic, x's staging and
//               the copies, leaving the loop's skeleton.
// Build: nvcc -O3 -arch=sm_90 -o persistent_decode persistent_decode.cu
#include "decode_chain.cuh"
#include "mbarrier.cuh"

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

// ---- dataflow: per-block flags, a bulk-copy ring that streams across phases ----------------
constexpr int DF_CONSUMER_WARPS = 16, DF_THREADS = 32 * (DF_CONSUMER_WARPS + 1);
constexpr int DF_SLOTS = 9, DF_SLOT = 16384, DF_X_MAX = 14336, DF_ROWS_MAX = 1024,
              DF_MAX_PHASES = 160;

__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;" ::"n"(32 * DF_CONSUMER_WARPS));
}

// How a phase's x reaches the blocks that read it.
enum Handoff : int {
    // flags[b] holds the epoch of the last phase block b stored (a fence, then a release store);
    // readers acquire every block's flag, then load x.
    DF_FLAGS,
    // Tagged data, as NCCL's LL protocol: y is stored as (value, epoch) pairs, 8 bytes at once,
    // and readers spin on their own x pairs until the tags match: no fence, no flag.
    DF_TAGGED,
    // Tagged data, but first thread t spins on the first pair block t stored, then every
    // thread reads (and checks) its pairs: far fewer loads in flight while the data is not
    // there yet.
    DF_TAGGED_FIRST,
    // No waiting at all (wrong results, timing only): what is left of a phase without a handoff.
    DF_NONE,
};

// A phase as one block sees it, worked out once at the kernel's start (integer divisions by
// run-time values in the phase loop cost up to ~0.2 µs a phase: docs/cuda-backend.md).
struct DfPhase {
    const unsigned char* w;
    const float* x;
    float* y;
    int k, r0, r1;  // the block's rows [r0, r1)
    int rb;         // bytes a row
    int rps;        // rows a slot
    int wpr;        // warps a row (rows of k ≥ 4,096 split their words)
    int per_warp;   // words a warp takes of a row
};

// *step: replays so far (block 0 bumps it at its end, after every block has read it: the last
// phase waits for all blocks). A phase's epoch is step · count + phase + 1.
__global__ void __launch_bounds__(DF_THREADS, 1)
    dataflow_kernel(const Phase* phases, int count, unsigned* flags, unsigned* step,
                    Handoff handoff, int probe) {
    extern __shared__ __align__(128) unsigned char df_smem[];
    unsigned char* ring = df_smem;
    float* xs = (float*)(ring + (size_t)DF_SLOTS * DF_SLOT);
    float* acc = xs + DF_X_MAX;
    uint64_t* full = (uint64_t*)(acc + DF_ROWS_MAX);
    uint64_t* empty = full + DF_SLOTS;
    DfPhase* ps = (DfPhase*)(empty + DF_SLOTS);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, b = blockIdx.x, g = gridDim.x;
    for (int i = tid; i < count; i += blockDim.x) {
        const Phase p = phases[i];
        DfPhase& d = ps[i];
        d.w = (const unsigned char*)p.w;
        d.x = p.x;
        d.y = p.y;
        d.k = p.k;
        d.r0 = (int)((long long)p.n * b / g);
        d.r1 = (int)((long long)p.n * (b + 1) / g);
        d.rb = p.k / 2;
        d.rps = DF_SLOT / d.rb;
        d.wpr = max(1, DF_CONSUMER_WARPS / d.rps);
        d.per_warp = p.k / 32 / d.wpr;
    }
    if (tid == 0) {
        for (int s = 0; s < DF_SLOTS; ++s) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, DF_CONSUMER_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    for (int i = tid; i < DF_ROWS_MAX; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const unsigned base = __ldcg(step) * (unsigned)count;
    if (warp == DF_CONSUMER_WARPS) {  // producer: every phase's rows, as fast as slots free up
        if (lane != 0 || (probe & 8)) return;
        int s = 0;
        unsigned round = 0;  // turns of the ring completed
        for (int i = 0; i < count; ++i) {
            const DfPhase p = ps[i];  // by value: asm "memory" clobbers would reload fields
            for (int r = p.r0; r < p.r1; r += p.rps) {
                if (round > 0) mbar_wait(empty + s, (round - 1) & 1);
                bulk_copy(ring + (size_t)s * DF_SLOT, p.w + (size_t)r * p.rb,
                          (unsigned)(min(p.rps, p.r1 - r) * p.rb), full + s);
                if (++s == DF_SLOTS) {
                    s = 0;
                    ++round;
                }
            }
        }
        return;
    }
    int s = 0;
    unsigned parity = 0;
    for (int i = 0; i < count; ++i) {
        const DfPhase p = ps[i];  // by value: asm "memory" clobbers would reload fields
        const unsigned want = base + (unsigned)i;  // phase i − 1 stored
        if (handoff == DF_TAGGED_FIRST && i > 0 && tid < g) {
            const int first = (int)((long long)p.k * tid / g);  // block tid's first row of x
            unsigned tag;
            do {
                asm volatile("ld.volatile.global.u32 %0, [%1];"
                             : "=r"(tag)
                             : "l"(p.x + 2 * first + 1));
            } while (tag != want);
        }
        if (handoff == DF_TAGGED_FIRST) consumers_sync();
        if (probe & 4) {
        } else if (handoff == DF_TAGGED || handoff == DF_TAGGED_FIRST) {
            // Two (value, tag) pairs a load; phase 0's x (the step's input) carries no tags.
            for (int j = tid * 2; j < p.k; j += 32 * DF_CONSUMER_WARPS * 2) {
                unsigned v0, t0, v1, t1;
                do {
                    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                                 : "=r"(v0), "=r"(t0), "=r"(v1), "=r"(t1)
                                 : "l"(p.x + 2 * j));
                } while (i > 0 && (t0 != want || t1 != want));
                xs[j] = __uint_as_float(v0);
                xs[j + 1] = __uint_as_float(v1);
            }
        } else {
            // Thread t acquires block t's flag; the barrier passes that on to the other threads.
            if (i > 0 && tid < g && handoff == DF_FLAGS) {
                unsigned seen;
                do {
                    asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(seen) : "l"(flags + tid));
                } while ((int)(seen - want) < 0);
            }
            consumers_sync();
            for (int j = tid * 4; j < p.k; j += 32 * DF_CONSUMER_WARPS * 4)
                *(float4*)(xs + j) = __ldcg((const float4*)(p.x + j));
        }
        consumers_sync();
        const int words = p.k / 32, part = warp % p.wpr, row_step = DF_CONSUMER_WARPS / p.wpr;
        for (int r = p.r0; r < p.r1; r += p.rps) {
            if (!(probe & 8)) mbar_wait(full + s, parity);
            for (int row = warp / p.wpr; !(probe & 2) && row < min(p.rps, p.r1 - r);
                 row += row_step) {
                const uint4* w = (const uint4*)(ring + (size_t)s * DF_SLOT) + row * words;
                float v = 0.f;
                for (int u = part * p.per_warp + lane; u < (part + 1) * p.per_warp; u += 32) {
                    const uint4 q = w[u];
                    v += xs[u] * (float)((q.x ^ q.y ^ q.z ^ q.w) & 0xff);
                }
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0 && p.wpr == 1) acc[(r - p.r0) + row] = v;
                else if (lane == 0) atomicAdd(acc + (r - p.r0) + row, v);
            }
            __syncwarp();
            if (lane == 0 && !(probe & 8)) mbar_arrive(empty + s);
            if (++s == DF_SLOTS) {
                s = 0;
                parity ^= 1;
            }
        }
        consumers_sync();
        for (int j = tid; j < p.r1 - p.r0; j += 32 * DF_CONSUMER_WARPS) {
            const float y = acc[j] * 1e-6f;
            acc[j] = 0.f;
            if (handoff == DF_TAGGED || handoff == DF_TAGGED_FIRST)
                store_tagged_pair(p.y + 2 * (p.r0 + j), y, want + 1);
            else
                p.y[p.r0 + j] = y;
        }
        if (handoff == DF_FLAGS) {
            consumers_sync();
            if (tid == 0) {
                __threadfence();
                asm volatile("st.release.gpu.u32 [%0], %1;" ::"l"(flags + b), "r"(want + 1)
                             : "memory");
            }
        }
    }
    if (b == 0 && tid == 0) atomicAdd(step, 1u);
}

int main() {
    int sms = 0, per_sm = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_kernel, THREADS, 0));
    std::printf("%d SMs, %d persistent blocks per SM; µs per step (replayed graph, median of 7 × 20)\n",
                sms, per_sm);
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned *counter, *flags, *step;
    CHECK(cudaMalloc(&counter, 4));
    CHECK(cudaMalloc(&flags, sms * 4));
    CHECK(cudaMalloc(&step, 4));
    CHECK(cudaMemset(flags, 0, sms * 4));
    CHECK(cudaMemset(step, 0, 4));
    // Dataflow variants: (handoff, probe bits, timing only: 2 = no row work, 4 = no staging of
    // x, 8 = no copies).
    constexpr int DF_VARIANTS = 7;
    const Handoff df_handoff[DF_VARIANTS] = {DF_FLAGS, DF_TAGGED, DF_TAGGED_FIRST, DF_NONE,
                                             DF_NONE,  DF_NONE,   DF_NONE};
    const int df_probe[DF_VARIANTS] = {0, 0, 0, 0, 2, 6, 14};
    const size_t df_shared = (size_t)DF_SLOTS * DF_SLOT + 4 * (DF_X_MAX + DF_ROWS_MAX) +
                             16 * DF_SLOTS + sizeof(DfPhase) * DF_MAX_PHASES;
    CHECK(cudaFuncSetAttribute(dataflow_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)df_shared));
    std::printf("%-14s %7s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s\n", "model", "phases",
                "MB/step", "bound", "kernels", "persist", "+prefetch", "df flags", "df tagged",
                "tag first", "no handoff", "+no rows", "+no x", "+no copy");
    for (const ChainModel& m : CHAIN_MODELS) {
        Chain c = build_chain(m);
        Phase* dev_phases;
        CHECK(cudaMalloc(&dev_phases, c.phases.size() * sizeof(Phase)));
        CHECK(cudaMemcpy(dev_phases, c.phases.data(), c.phases.size() * sizeof(Phase),
                         cudaMemcpyHostToDevice));
        // The dataflow kernel's shared memory holds a phase table, x and a block's rows, and a
        // slot a row at least: chains past that are not run (0 in the table).
        bool df_fits = c.phases.size() <= DF_MAX_PHASES;
        for (const Phase& p : c.phases)
            df_fits = df_fits && p.k <= DF_X_MAX && p.k / 2 <= DF_SLOT && (p.k / 2) % 16 == 0 &&
                      (p.n + sms - 1) / sms <= DF_ROWS_MAX;
        float us[3 + DF_VARIANTS] = {};
        for (int mode = 0; mode < 3 + DF_VARIANTS; ++mode) {
            if (mode >= 3 && !df_fits) continue;
            us[mode] = replay_us(s, [&] {
                if (mode == 0) {
                    for (const Phase& p : c.phases)
                        launch_pdl(phase_kernel, dim3((p.n + ROWS - 1) / ROWS), dim3(THREADS), 0, s, p);
                } else if (mode < 3) {
                    CHECK(cudaMemsetAsync(counter, 0, 4, s));
                    persistent_kernel<<<sms * per_sm, THREADS, 0, s>>>(
                        dev_phases, (int)c.phases.size(), counter, mode == 2);
                    CHECK(cudaGetLastError());
                } else {
                    const int v = mode - 3;
                    dataflow_kernel<<<sms, DF_THREADS, df_shared, s>>>(
                        dev_phases, (int)c.phases.size(), flags, step, df_handoff[v], df_probe[v]);
                    CHECK(cudaGetLastError());
                }
            });
        }
        std::printf("%-14s %7zu %9.1f %9.1f", m.name, c.phases.size(), c.bytes / 1e6,
                    c.bytes / 3.0e12 * 1e6);
        for (float u : us) std::printf(" %9.1f", u);
        std::printf("\n");
        CHECK(cudaFree(dev_phases));
        free_chain(c);
    }
    return 0;
}
