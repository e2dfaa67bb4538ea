"""mlx-lm's greedy chat reply on an exact MLX twin of a GGUF file, in float32: the reference
for a GGUF model run with exact f32 arithmetic on its quantized weights.

The twin keeps the GGUF's quantized values (4-bit groups of 32 for Q4_0/Q4_1 layers, 8-bit
for Q8_0) and is made by
    python3 ../shared/tools/make_smollm2_fixture.py GGUF TWIN_DIR exact
(plus the GGUF's tokenizer files in TWIN_DIR). Scales and biases (f16) are cast to f32, as
tools/mlx_reference_f32.py does, so that MLX computes in float32.

usage: mlx_gguf_twin_greedy.py TWIN_DIR OUT.json N_TOKENS MESSAGE
"""
import json, sys
import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from mlx.utils import tree_map

twin, out, n, message = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model, tok = load(twin)
model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p,
                      model.parameters()))
text = tok.apply_chat_template([{"role": "user", "content": message}],
                               add_generation_prompt=True, tokenize=False)
ids = tok.encode(text)
cache = make_prompt_cache(model)
logits = model(mx.array(ids)[None], cache=cache)[0, -1].astype(mx.float32)
gen, gaps = [], []
for _ in range(n):
    top = mx.argsort(-logits)[:2].tolist()
    gen.append(top[0])
    gaps.append(round(float(logits[top[0]] - logits[top[1]]), 4))
    if top[0] == tok.eos_token_id:
        break
    logits = model(mx.array([[top[0]]]), cache=cache)[0, -1].astype(mx.float32)
json.dump({"generator": "mlx-lm 0.32.2 / mlx (CPU), float32, on an exact MLX twin",
           "message": message, "prompt_ids": ids, "greedy_ids": gen,
           "greedy_text": tok.decode(gen), "top2_gaps": gaps}, open(out, "w"), indent=1)
print(repr(tok.decode(gen)), "gaps", gaps, file=sys.stderr)
