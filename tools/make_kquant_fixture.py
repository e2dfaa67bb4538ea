"""A llama.cpp K-quant file and its F32 twin, for tests/gguf_kquants.rs.

A random llama (`scripts/peer_random_gguf.py`, f16) is quantized by llama.cpp's own
`llama-quantize`; the twin holds the same tensors dequantized by gguf-py's reference
dequantizer, in F32, with the same metadata. mlx-native must read both to the same logits: a
check of its block decoding against llama.cpp's bytes and an independent dequantizer.
Recipes (file names in OUT_DIR):
  q4_k_m (default): the `tiny` llama (256 wide, one layer) as Q4_K_M: Q4_K matrices, Q6_K for
    the tied embedding, attn_v and ffn_down (q4_k_m.gguf, twin.gguf).
  q5_k_m: the `tiny-q5` llama (256 wide, but rows of 64 in attn_output and ffn_down) as
    Q5_K_M: Q5_K and Q6_K, and llama-quantize's fallbacks for the rows of 64, Q5_1 and Q8_0
    (q5_k_m.gguf, q5_k_m_twin.gguf).
  q5_0: the `tiny-q5` llama as Q5_0: Q5_0 matrices, a Q6_K embedding (q5_0.gguf,
    q5_0_twin.gguf).
Needs numpy, llama.cpp's gguf-py and llama-quantize (build the sdist's
vendor/llama.cpp on the CPU: cmake … && cmake --build build --target llama-quantize).

usage: PYTHONPATH=.../gguf-py python3 tools/make_kquant_fixture.py LLAMA_QUANTIZE OUT_DIR [RECIPE]
"""
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

RECIPES = {  # recipe: shape, llama-quantize type, quantized file, twin
    "q4_k_m": ("tiny", "Q4_K_M", "q4_k_m.gguf", "twin.gguf"),
    "q5_k_m": ("tiny-q5", "Q5_K_M", "q5_k_m.gguf", "q5_k_m_twin.gguf"),
    "q5_0": ("tiny-q5", "Q5_0", "q5_0.gguf", "q5_0_twin.gguf"),
}
quantize, out = sys.argv[1], Path(sys.argv[2])
shape, qtype, quantized, twin = RECIPES[sys.argv[3] if len(sys.argv) > 3 else "q4_k_m"]
out.mkdir(parents=True, exist_ok=True)
here = Path(__file__).resolve().parent
with tempfile.TemporaryDirectory() as tmp:
    f16 = Path(tmp) / "f16.gguf"
    subprocess.run([sys.executable, here.parent / "scripts" / "peer_random_gguf.py", shape, f16, "f16"], check=True)
    subprocess.run([quantize, f16, out / quantized, qtype], check=True, capture_output=True)

reader = gguf.GGUFReader(out / quantized)
writer = gguf.GGUFWriter(out / twin, "llama")
for field in reader.fields.values():
    name = field.name
    if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
        continue
    value = field.contents()
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
    else:
        writer.add_key_value(name, value, vtype)
types = Counter()
for t in reader.tensors:
    types[t.tensor_type.name] += 1
    values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    writer.add_tensor(t.name, values.reshape([int(d) for d in reversed(t.shape)]))
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
print(quantized, "tensor types:", dict(types))
