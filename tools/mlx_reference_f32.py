"""mlx-lm logits of the SmolLM2 4-bit checkpoint computed in float32 (scales, biases and norm
weights cast up; quantized values unchanged), teacher-forced along the shared reference's
greedy tokens: at each step the logits of the reference's top-20 ids.

The shared reference runs MLX in float16; this one isolates our float32 implementation from
f16 rounding, so tests can hold it to a tight tolerance.

usage: mlx_reference_f32.py MODEL_DIR REFERENCE.json OUT.json
"""
import json, sys
import mlx.core as mx
from mlx_lm import load
from mlx.utils import tree_map

model_dir, ref_path, out_path = sys.argv[1:4]
model, _ = load(model_dir)
model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p,
                      model.parameters()))
ref = json.load(open(ref_path))
cases = []
for c in ref["cases"]:
    ids = c["prompt_ids"] + c["greedy_ids"][:-1]
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    n = len(c["prompt_ids"])
    steps = []
    for s in range(len(c["greedy_ids"])):
        row = logits[n - 1 + s]
        steps.append([[int(i), float(row[int(i)])] for i, _ in c["top20"][s]])
    cases.append({"prompt": c["prompt"], "top20_f32": steps})
json.dump({"generator": "mlx-lm 0.32.2 / mlx 0.32.4 (CPU), float32", "cases": cases},
          open(out_path, "w"))
