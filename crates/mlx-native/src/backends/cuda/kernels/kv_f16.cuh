// KV caches of f16 (as MLX keeps them for f16 models): half the bytes a decode step's attention
// reads. Values are rounded to nearest on the way in and widened to f32 on the way out; all the
// arithmetic stays f32.
typedef u16 kv_t;
