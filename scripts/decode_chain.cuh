// The matvec chain of a decode step (no attention) for the device experiments
// persistent_decode.cu and prefetch_chain.cu: per layer q/k/v as one matrix, o, gate and up as
// one matrix, down; then the lm head. Weights are 4-bit-sized rows (k/2 bytes of 16-byte
// words), each phase's x is the previous phase's y. Host side plus the programmatic launch
// and timing of a replayed graph.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(x)                                                                           \
    do {                                                                                   \
        cudaError_t e = (x);                                                               \
        if (e != cudaSuccess) {                                                            \
            std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
            std::exit(1);                                                                  \
        }                                                                                  \
    } while (0)

// A value and its tag stored as one 8-byte (value, tag) pair, so that a reader that sees the tag
// sees the value (NCCL's LL protocol: no fence). `p` is 8-byte aligned.
__device__ __forceinline__ void store_tagged_pair(void* p, float v, unsigned tag) {
    asm volatile("st.volatile.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(__float_as_uint(v)),
                 "r"(tag)
                 : "memory");
}

struct Phase {
    const uint4* w;  // [n, k/32] 16-byte words (32 four-bit weights each)
    const float* x;  // [k]
    float* y;        // [n]
    int n, k;
};

struct ChainModel {
    const char* name;
    int hidden, qkv, inter, layers, vocab;
};

constexpr ChainModel CHAIN_MODELS[] = {
    {"smollm2-135m", 576, 960, 1536, 30, 49152},
    {"llama-3.2-1b", 2048, 3072, 8192, 16, 128256},
    {"llama-3.1-8b", 4096, 6144, 14336, 32, 128256},
};

struct Chain {
    std::vector<Phase> phases;
    size_t bytes = 0;  // weights of a step
    float* x0 = nullptr;
};

inline Chain build_chain(const ChainModel& m) {
    Chain c;
    CHECK(cudaMalloc(&c.x0, 65536 * 4));
    CHECK(cudaMemset(c.x0, 0, 65536 * 4));
    const float* x = c.x0;
    auto add = [&](int n, int k) {
        uint4* w;
        float* y;
        const size_t wb = (size_t)n * k / 2;
        CHECK(cudaMalloc(&w, wb));
        CHECK(cudaMemset(w, 0x5a, wb));
        // 8 bytes a row: room for persistent_decode.cu's (value, tag) pairs.
        CHECK(cudaMalloc(&y, (size_t)n * 8));
        CHECK(cudaMemset(y, 0, (size_t)n * 8));
        c.phases.push_back({w, x, y, n, k});
        c.bytes += wb;
        x = y;
    };
    for (int l = 0; l < m.layers; ++l) {
        add(m.qkv, m.hidden);
        add(m.hidden, m.hidden);
        add(2 * m.inter, m.hidden);
        add(m.hidden, m.inter);
    }
    add(m.vocab, m.hidden);
    return c;
}

inline void free_chain(Chain& c) {
    for (const Phase& p : c.phases) {
        CHECK(cudaFree((void*)p.w));
        CHECK(cudaFree(p.y));
    }
    CHECK(cudaFree(c.x0));
    c.phases.clear();
}

// Launches `kernel` with programmatic stream serialization, as mlx-native's decode kernels.
template <class... Params, class... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                Args&&... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// µs per replay of what `record` enqueues on `s`, captured once: the median of 7 runs of 20.
template <class F>
float replay_us(cudaStream_t s, F record) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    record();
    CHECK(cudaStreamEndCapture(s, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 5; ++i) CHECK(cudaGraphLaunch(ge, s));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    std::vector<float> runs;
    for (int r = 0; r < 7; ++r) {
        const int reps = 20;
        CHECK(cudaEventRecord(a, s));
        for (int i = 0; i < reps; ++i) CHECK(cudaGraphLaunch(ge, s));
        CHECK(cudaEventRecord(b, s));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        runs.push_back(ms * 1e3f / reps);
    }
    std::sort(runs.begin(), runs.end());
    CHECK(cudaEventDestroy(a));
    CHECK(cudaEventDestroy(b));
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaGraphDestroy(g));
    return runs[3];
}
