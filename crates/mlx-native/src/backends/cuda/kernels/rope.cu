// Rotary position embedding of the leading `rotary_dims` dims of each head; the other dims are
// copied. One thread per (row, head, rotated pair); the position of row 0 is read from device
// memory so that a captured graph stays valid as it advances.

extern "C" __global__ void rope(const float* __restrict__ x, const float* __restrict__ inv_freq,
                                const u32* __restrict__ pos, float* __restrict__ out, int rows,
                                int n_heads, int head_dim, int rotary_dims, int traditional,
                                float mscale) {
    const int half = rotary_dims / 2;
    // Threads beyond the rotated pairs of a head copy its pass-through dims.
    const int per_head = half + (head_dim - rotary_dims);
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)rows * n_heads * per_head) return;
    const int j = (int)(idx % per_head);
    const i64 head = idx / per_head;
    const int row = (int)(head / n_heads);
    const float* xh = x + head * head_dim;
    float* yh = out + head * head_dim;
    if (j >= half) {
        const int d = rotary_dims + (j - half);
        yh[d] = xh[d];
        return;
    }
    const float angle = (float)(pos[0] + (u32)row) * inv_freq[j];
    float s, c;
    sincosf(angle, &s, &c);
    s *= mscale;
    c *= mscale;
    const int i0 = traditional ? 2 * j : j;
    const int i1 = traditional ? 2 * j + 1 : j + half;
    const float x0 = xh[i0], x1 = xh[i1];
    yh[i0] = x0 * c - x1 * s;
    yh[i1] = x0 * s + x1 * c;
}
