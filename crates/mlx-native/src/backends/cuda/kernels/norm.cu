// RMSNorm and LayerNorm over the last dimension: one block per row, f32 activations, weights
// and biases of any float type (`wt`).

// out[i] = v as f32, or as f16 where `half_out` (f16 activations for a matmul that reads them).
__device__ __forceinline__ void store_activation(void* out, i64 i, float v, int half_out) {
    if (half_out)
        ((u16*)out)[i] = f32_to_f16(v);
    else
        ((float*)out)[i] = v;
}

// With `residual` (else null) out = residual + the norm, the norm rounded first (no fused
// multiply-add), as a norm launch and an add launch compute it. out is f32, or f16 where
// `half_out`.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const void* __restrict__ w,
                                    const float* __restrict__ residual, void* __restrict__ out,
                                    int d, int wt, float eps, float w_offset, int half_out,
                                    int early) {
    kernel_entry_early(early);
    const i64 row = (i64)blockIdx.x * d;
    const float* xr = x + row;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    const float r = rsqrtf(block_sum(ss) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float y = xr[i] * r * (load_float(w, i, wt) + w_offset);
        store_activation(out, row + i, residual ? __fadd_rn(residual[row + i], y) : y, half_out);
    }
}

// sum = a + b (f32), then normed = sum·rsqrt(mean(sum²) + eps)·(w + w_offset), f32 or f16 where
// `half_out`: a residual add and the next norm in one pass, each value as `binary` and `rms_norm`
// compute it (the same sums of squares in the same order). One block a row.
extern "C" __global__ void add_rms_norm(const float* __restrict__ a, const float* __restrict__ b,
                                        const void* __restrict__ w, float* __restrict__ sum,
                                        void* __restrict__ normed, int d, int wt, float eps,
                                        float w_offset, int half_out, int early) {
    kernel_entry_early(early);
    const i64 row = (i64)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float s = a[row + i] + b[row + i];
        sum[row + i] = s;
        ss += s * s;
    }
    const float r = rsqrtf(block_sum(ss) / d + eps);
    // Each thread reads back the sums it wrote itself.
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        store_activation(normed, row + i, sum[row + i] * r * (load_float(w, i, wt) + w_offset),
                         half_out);
    }
}

// Two passes (mean, then the centred sum of squares) as the CPU reference does.
extern "C" __global__ void layer_norm(const float* __restrict__ x, const void* __restrict__ w,
                                      const void* __restrict__ b, float* __restrict__ out,
                                      int d, int wt, int bt, float eps) {
    kernel_entry();
    const float* xr = x + (i64)blockIdx.x * d;
    float* yr = out + (i64)blockIdx.x * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s) / d;
    float v = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = xr[i] - mean;
        v += c * c;
    }
    const float r = rsqrtf(block_sum(v) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        yr[i] = (xr[i] - mean) * r * load_float(w, i, wt) + load_float(b, i, bt);
}
