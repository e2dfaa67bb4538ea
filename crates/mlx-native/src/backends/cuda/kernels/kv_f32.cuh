// KV caches of f32: the element type of the caches that attention.cu and rope.cu read and write
// (kv_f16.cuh in the other build of each).
typedef float kv_t;
