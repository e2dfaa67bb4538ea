// RoPE arithmetic shared by the rope kernels and the attention kernel that rotates q and the
// new keys itself (rope_attention).

// cos and sin of rotated pair j at position p, both times mscale, from the pair's inverse
// frequency.
__device__ __forceinline__ void rope_freq_cos_sin(float inv_freq_j, u32 p, float mscale, float& c,
                                                  float& s) {
    const float angle = (float)p * inv_freq_j;
    sincosf(angle, &s, &c);
    s *= mscale;
    c *= mscale;
}

// cos and sin of rotated pair j at position p, both times mscale.
__device__ __forceinline__ void rope_cos_sin(const float* __restrict__ inv_freq, u32 p, int j,
                                             float mscale, float& c, float& s) {
    rope_freq_cos_sin(inv_freq[j], p, mscale, c, s);
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

// The rotated pair that dim d (< rotary_dims) belongs to. A compare, not d % half: decode
// attention computes it on its path, where the integer division took ~250 cycles (H100).
__device__ __forceinline__ int rope_pair_of(int d, int rotary_dims, int traditional) {
    const int half = rotary_dims / 2;
    return traditional ? d >> 1 : d < half ? d : d - half;
}

// Whether dim d (< rotary_dims) is the first member of its rotated pair (`rope_pair`).
__device__ __forceinline__ bool rope_first(int d, int rotary_dims, int traditional) {
    return traditional ? (d & 1) == 0 : d < rotary_dims / 2;
}

// The inverse frequency of dim d's rotated pair (0 past rotary_dims): the load of
// `rope_dim_cos_sin`, for a caller that issues it before the position is known.
__device__ __forceinline__ float rope_dim_freq(int d, const float* __restrict__ inv_freq,
                                               int rotary_dims, int traditional) {
    return d < rotary_dims ? inv_freq[rope_pair_of(d, rotary_dims, traditional)] : 0.f;
}

// `rope_dim_cos_sin` from dim d's `rope_dim_freq`.
__device__ __forceinline__ void rope_dim_freq_cos_sin(int d, float freq, u32 p, int rotary_dims,
                                                      float mscale, float& c, float& s) {
    if (d >= rotary_dims) {
        c = 1.f;
        s = 0.f;
        return;
    }
    rope_freq_cos_sin(freq, p, mscale, c, s);
}

// cos and sin (times mscale) that rotate dim d at position p: c = 1, s = 0 past rotary_dims,
// which pass through.
__device__ __forceinline__ void rope_dim_cos_sin(int d, u32 p, const float* __restrict__ inv_freq,
                                                 int rotary_dims, int traditional, float mscale,
                                                 float& c, float& s) {
    rope_dim_freq_cos_sin(d, rope_dim_freq(d, inv_freq, rotary_dims, traditional), p,
                          rotary_dims, mscale, c, s);
}

// Dim d of a head rotated by (c, s) of `rope_dim_cos_sin` from its value xd and its partner's
// xp (as loaded by `rope_partner`), with the arithmetic of the rope kernels.
__device__ __forceinline__ float rope_apply(float xd, float xp, int d, float c, float s,
                                            int rotary_dims, int traditional) {
    if (d >= rotary_dims) return xd;
    return rope_first(d, rotary_dims, traditional) ? xd * c - xp * s : xp * s + xd * c;
}
