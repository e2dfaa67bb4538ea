// RoPE arithmetic shared by the rope kernels and the attention kernel that rotates q and the
// new keys itself (rope_attention).

// cos and sin of rotated pair j at position p, both times mscale.
__device__ __forceinline__ void rope_cos_sin(const float* __restrict__ inv_freq, u32 p, int j,
                                             float mscale, float& c, float& s) {
    const float angle = (float)p * inv_freq[j];
    sincosf(angle, &s, &c);
    s *= mscale;
    c *= mscale;
}

// The first and second member of rotated pair j (traditional: adjacent dims; else the two
// halves of the rotated dims).
__device__ __forceinline__ void rope_pair(int j, int rotary_dims, int traditional, int& i0,
                                          int& i1) {
    i0 = traditional ? 2 * j : j;
    i1 = traditional ? 2 * j + 1 : j + rotary_dims / 2;
}

// Dim d of head xh rotated at position p (dims past rotary_dims pass through), with the
// arithmetic of the rope kernels.
__device__ __forceinline__ float rope_dim(const float* xh, int d, u32 p,
                                          const float* __restrict__ inv_freq, int rotary_dims,
                                          int traditional, float mscale) {
    if (d >= rotary_dims) return xh[d];
    const int j = traditional ? d >> 1 : d % (rotary_dims / 2);
    int i0, i1;
    rope_pair(j, rotary_dims, traditional, i0, i1);
    float c, s;
    rope_cos_sin(inv_freq, p, j, mscale, c, s);
    const float x0 = xh[i0], x1 = xh[i1];
    return d == i0 ? x0 * c - x1 * s : x0 * s + x1 * c;
}
