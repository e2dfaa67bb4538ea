"""A llama.cpp K-quant file and its F32 twin, for tests/gguf_kquants.rs.

A random llama of width 256 (`scripts/peer_random_gguf.py tiny`, f16) is quantized by
llama.cpp's own `llama-quantize` to Q4_K_M: Q4_K matrices, Q6_K for the tied embedding,
attn_v and ffn_down. The twin holds the same tensors dequantized by gguf-py's reference
dequantizer, in F32, with the same metadata. mlx-native must read both to the same logits: a
check of its Q4_K and Q6_K decoding against llama.cpp's bytes and an independent dequantizer.
Needs numpy, llama.cpp's gguf-py and llama-quantize (build the sdist's
vendor/llama.cpp on the CPU: cmake … && cmake --build build --target llama-quantize).

usage: PYTHONPATH=.../gguf-py python3 tools/make_kquant_fixture.py LLAMA_QUANTIZE OUT_DIR
       (writes OUT_DIR/q4_k_m.gguf and OUT_DIR/twin.gguf)
"""
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

quantize, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
here = Path(__file__).resolve().parent
with tempfile.TemporaryDirectory() as tmp:
    f16 = Path(tmp) / "f16.gguf"
    subprocess.run([sys.executable, here.parent / "scripts" / "peer_random_gguf.py", "tiny", f16, "f16"], check=True)
    subprocess.run([quantize, f16, out / "q4_k_m.gguf", "Q4_K_M"], check=True, capture_output=True)

reader = gguf.GGUFReader(out / "q4_k_m.gguf")
writer = gguf.GGUFWriter(out / "twin.gguf", "llama")
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
print("q4_k_m.gguf tensor types:", dict(types))
