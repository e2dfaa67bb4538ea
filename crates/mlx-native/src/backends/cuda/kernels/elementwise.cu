// Elementwise ops and the row softmax, f32. Activation functions are selected by a code
// (`activation` in common.cuh).

extern "C" __global__ void unary(const float* __restrict__ x, float* __restrict__ out, i64 n,
                                 int f) {
    kernel_entry();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x)
        out[i] = activation(x[i], f);
}

// op: 0 add, 1 mul.
extern "C" __global__ void binary(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ out, i64 n, int op, int early) {
    kernel_entry_early(early);
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x)
        out[i] = op == 0 ? a[i] + b[i] : a[i] * b[i];
}

extern "C" __global__ void gated_activation(const float* __restrict__ gate,
                                            const float* __restrict__ up,
                                            float* __restrict__ out, u16* __restrict__ out_h,
                                            i64 n, int f, int early) {
    kernel_entry_early(early);
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x) {
        const float y = activation(gate[i], f) * up[i];
        if (out) out[i] = y;
        store_half_copy(out_h, i, y);
    }
}

// out = x widened from f16 to f32 (f16 activations for a kernel that reads f32).
extern "C" __global__ void widen_f16(const u16* __restrict__ x, float* __restrict__ out, i64 n) {
    kernel_entry();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x)
        out[i] = f16_to_f32(x[i]);
}

extern "C" __global__ void softcap(const float* __restrict__ x, float* __restrict__ out, i64 n,
                                   float cap) {
    kernel_entry();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x)
        out[i] = cap * tanhf(x[i] / cap);
}

// One block per row.
extern "C" __global__ void softmax(const float* __restrict__ x, float* __restrict__ out, int d) {
    kernel_entry();
    const float* xr = x + (i64)blockIdx.x * d;
    float* yr = out + (i64)blockIdx.x * d;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m);
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += expf(xr[i] - m);
    const float inv = 1.f / block_sum(s);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = expf(xr[i] - m) * inv;
}
