"""Random Q5_0, Q5_1 and Q5_K blocks with gguf-py's dequantization of them, for tests/gguf.rs.

Each type gets a tensor of 5 rows (`q5_0`, `q5_1`, `q5_k`) of random bytes with sane f16
scales (either sign for Q5_0 / Q5_1's d and m, non-negative for Q5_K's d and dmin, as
llama.cpp writes them), and beside it `NAME.dequantized`: the same rows in F32 as gguf-py's
numpy reference (gguf/quants.py) decodes them. mlx-native must read the blocks to exactly
these values, through the GGUF loader (type ids 6, 7, 13) and its CPU matmul.

usage: PYTHONPATH=.../gguf-py python3 tools/make_q5_blocks_fixture.py OUT.gguf
"""
import sys

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
# type, elements per row (several blocks), offsets of the f16 scales in a block
LAYOUTS = [
    (T.Q5_0, "q5_0", 96, [0]),
    (T.Q5_1, "q5_1", 160, [0, 2]),
    (T.Q5_K, "q5_k", 512, [0, 2]),
]
ROWS = 5

rng = np.random.default_rng(5)
writer = gguf.GGUFWriter(sys.argv[1], "q5-blocks")
for qtype, name, k, scale_offsets in LAYOUTS:
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(ROWS * k // block_size, block_bytes), dtype=np.uint8)
    for at in scale_offsets:
        if qtype == T.Q5_K:
            scales = rng.uniform(0.0, 0.01, size=len(blocks))
        else:
            scales = rng.uniform(-0.1, 0.1, size=len(blocks))
        blocks[:, at : at + 2] = scales.astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(ROWS, k // block_size * block_bytes)
    values = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    assert values.shape == (ROWS, k) and np.isfinite(values).all()
    writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.add_tensor(name + ".dequantized", values)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
print("wrote", sys.argv[1])
