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

// The dim that dim d is rotated with (d itself past rotary_dims, which pass through).
__device__ __forceinline__ int rope_partner(int d, int rotary_dims, int traditional) {
    if (d >= rotary_dims) return d;
    const int half = rotary_dims / 2;
    return traditional ? d ^ 1 : d < half ? d + half : d - half;
}

// Dim d of a head rotated at position p from its value xd and its partner's xp (as loaded by
// `rope_partner`), with the arithmetic of the rope kernels.
__device__ __forceinline__ float rope_rotate(float xd, float xp, int d, u32 p,
                                             const float* __restrict__ inv_freq, int rotary_dims,
                                             int traditional, float mscale) {
    if (d >= rotary_dims) return xd;
    const int j = traditional ? d >> 1 : d % (rotary_dims / 2);
    int i0, i1;
    rope_pair(j, rotary_dims, traditional, i0, i1);
    float c, s;
    rope_cos_sin(inv_freq, p, j, mscale, c, s);
    return d == i0 ? xd * c - xp * s : xp * s + xd * c;
}
