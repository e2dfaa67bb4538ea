// What a split-K epilogue costs at a kernel boundary: B blocks each add a partial row of n
// values into one output row, deterministic (64-bit fixed point) or not, against blocks that
// store their partial rows and against blocks that store nothing. The question behind fusing
// the down projection into the gated matvec (each gated block holds a slice of down's k) and
// the o projection into decode attention (each head's block holds a slice of o's k).
// Each mode runs as a chain of 100 kernels launched with programmatic stream serialization and
// replayed as a graph; a kernel waits for its predecessor, forms its n values (cheap
// arithmetic), then
//   none     stores one value a block (the boundary alone);
//   store    stores its n values to its own partial row (f32);
//   red.u64  red.global.add.u64 of round(v·2^24) into the row (integer sums: replays agree);
//   red.f32  red.global.add.f32 into the row (the order of additions varies);
//   red.v4   red.global.add.v4.f32, four values an instruction;
//   bulk.u64 its n values as i64 in shared memory, then one cp.reduce.async.bulk add.u64 of
//            the row (the copy engine does the adds at L2);
//   red/4    red.global.add.u64 of n/4 values (a cluster of 4 that reduced in shared memory
//            first, without the cluster's barrier).
// Build: nvcc -O3 -arch=sm_90a -o reduce_cost reduce_cost.cu
#include "decode_chain.cuh"

constexpr int THREADS = 512, CHAIN = 100, MAX_N = 4096;

enum Mode { NONE, STORE, RED_U64, RED_F32, RED_V4, BULK_U64, RED_QUARTER, MODES };
const char* const MODE_NAMES[MODES] = {"none",   "store",    "red.u64", "red.f32",
                                       "red.v4", "bulk.u64", "red/4"};

__global__ void __launch_bounds__(THREADS, 1)
    epilogue(int mode, int n, float seed, float* part, unsigned long long* acc_u, float* acc_f) {
    __shared__ __align__(16) long long stage[MAX_N];
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const float base = seed + blockIdx.x * 0.25f;
    if (mode == NONE) {
        if (threadIdx.x == 0) part[blockIdx.x] = base;
        return;
    }
    if (mode == RED_V4) {
        for (int i = threadIdx.x; i < n / 4; i += THREADS) {
            const float v = base + i;
            asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(acc_f + 4 * i),
                         "f"(v), "f"(v + 1.f), "f"(v + 2.f), "f"(v + 3.f)
                         : "memory");
        }
        return;
    }
    const int count = mode == RED_QUARTER ? n / 4 : n;
    for (int i = threadIdx.x; i < count; i += THREADS) {
        const float v = base + i;
        const long long q = __float2ll_rn(v * 16777216.f);
        switch (mode) {
            case STORE: part[(size_t)blockIdx.x * n + i] = v; break;
            case RED_U64:
            case RED_QUARTER:
                asm volatile("red.global.add.u64 [%0], %1;" ::"l"(acc_u + i), "l"(q) : "memory");
                break;
            case RED_F32:
                asm volatile("red.global.add.f32 [%0], %1;" ::"l"(acc_f + i), "f"(v) : "memory");
                break;
            case BULK_U64: stage[i] = q; break;
        }
    }
    if (mode == BULK_U64) {
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        if (threadIdx.x == 0) {
            asm volatile(
                "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.u64 [%0], [%1], %2;" ::"l"(
                    acc_u),
                "r"((unsigned)__cvta_generic_to_shared(stage)), "r"(n * 8)
                : "memory");
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
        }
    }
}

int main() {
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    float *part, *acc_f;
    unsigned long long* acc_u;
    CHECK(cudaMalloc(&part, (size_t)256 * MAX_N * 4));
    CHECK(cudaMalloc(&acc_f, MAX_N * 4));
    CHECK(cudaMalloc(&acc_u, MAX_N * 8));
    CHECK(cudaMemset(acc_f, 0, MAX_N * 4));
    CHECK(cudaMemset(acc_u, 0, MAX_N * 8));
    struct Shape {
        const char* what;
        int blocks, n;
    };
    const Shape shapes[] = {
        {"1B down in gate/up", 128, 2048}, {"1B o in attention", 32, 2048},
        {"8B down in gate/up", 128, 4096}, {"8B o in attention", 32, 4096},
        {"SmolLM2 down", 96, 576},         {"SmolLM2 o in attention", 9, 576},
    };
    std::printf("µs a kernel in a chain of %d (median of 7 replays); columns: mode\n", CHAIN);
    std::printf("%-24s %6s %6s", "shape", "blocks", "n");
    for (const char* m : MODE_NAMES) std::printf(" %9s", m);
    std::printf("\n");
    for (const Shape& sh : shapes) {
        std::printf("%-24s %6d %6d", sh.what, sh.blocks, sh.n);
        for (int mode = 0; mode < MODES; ++mode) {
            const float us = replay_us(s, [&] {
                for (int i = 0; i < CHAIN; ++i)
                    launch_pdl(epilogue, dim3(sh.blocks), dim3(THREADS), 0, s, mode, sh.n,
                               (float)i, part, acc_u, acc_f);
            });
            std::printf(" %9.3f", us / CHAIN);
        }
        std::printf("\n");
    }
    return 0;
}
