"""MLX affine quantization fixtures for crates/mlx-native/tests/mlx_quant.rs.

For every bits x group size, in float32 and float16: a weight matrix of 13 rows by three
groups, `mx.quantize` (packed words, scales, biases), `mx.dequantize`, and
`mx.quantized_matmul` (transpose=True) of x with 1 and 3 rows. Rows get different
magnitudes; one group is constant and one is all zero (MLX's q0 == 0 edge case).

usage: python3 tools/mlx_fixtures_quant.py [OUT_DIR]
"""
import os
import sys

import mlx.core as mx
import numpy as np

OUT = sys.argv[1] if len(sys.argv) > 1 else "crates/mlx-native/tests/fixtures/mlx_quant"
N = 13  # odd: exercises tile and block tails

mx.set_default_device(mx.cpu)
os.makedirs(OUT, exist_ok=True)
rng = np.random.default_rng(1234)

for bits in (2, 3, 4, 5, 6, 8):
    for gs in (32, 64, 128):
        k = 3 * gs
        w = rng.standard_normal((N, k)) * np.exp(rng.standard_normal((N, 1)))
        w[2, :gs] = 0.37  # constant group
        w[5, gs : 2 * gs] = 0.0  # zero group
        w[7] = np.abs(w[7])  # one-signed rows
        w[8] = -np.abs(w[8])
        x1 = rng.standard_normal((1, k))
        x3 = rng.standard_normal((3, k))
        for dtype, name in ((mx.float32, "f32"), (mx.float16, "f16")):
            wm = mx.array(w.astype(np.float32)).astype(dtype)
            wq, scales, biases = mx.quantize(wm, group_size=gs, bits=bits)
            deq = mx.dequantize(wq, scales, biases, group_size=gs, bits=bits)
            tensors = {"w": wm, "wq": wq, "scales": scales, "biases": biases, "deq": deq}
            for tag, x in (("x1", x1), ("x3", x3)):
                xm = mx.array(x.astype(np.float32)).astype(dtype)
                y = mx.quantized_matmul(
                    xm, wq, scales, biases, transpose=True, group_size=gs, bits=bits
                )
                tensors[tag] = xm
                tensors["y" + tag[1:]] = y
            mx.eval(tensors)
            mx.save_safetensors(os.path.join(OUT, f"b{bits}_g{gs}_{name}.safetensors"), tensors)
print("wrote", OUT)
