"""MLX reference outputs for the CPU neural-net kernels (tests/nn_ops.rs).

usage: python3 tools/mlx_fixtures_nn.py [OUT_DIR]
(default OUT_DIR: crates/mlx-native/tests/fixtures/mlx_nn)

Writes one safetensors file per op family. Every case `NAME` stores its inputs and MLX's
output as `NAME.<tensor>`; the file's metadata maps `NAME` to a JSON object with the case's
parameters. Activations are laid out as the library stores them: rows = tokens, heads
concatenated (`[m, n_heads*head_dim]`); KV caches as `[n_kv_heads, positions, head_dim]`.
"""
import json
import math
import os
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

OUT = sys.argv[1] if len(sys.argv) > 1 else "crates/mlx-native/tests/fixtures/mlx_nn"
mx.random.seed(20240611)
mx.set_default_device(mx.cpu)


def save(name, arrays, meta):
    os.makedirs(OUT, exist_ok=True)
    arrays = {k: v.astype(mx.float32) for k, v in arrays.items()}
    mx.eval(arrays)
    path = os.path.join(OUT, name + ".safetensors")
    mx.save_safetensors(path, arrays, metadata={k: json.dumps(v) for k, v in meta.items()})
    print(f"{path}: {len(meta)} cases, {os.path.getsize(path)} bytes")


def heads_to_rows(t):
    """[1, heads, m, d] -> [m, heads*d]"""
    _, h, m, d = t.shape
    return t[0].transpose(1, 0, 2).reshape(m, h * d)


def rope_cases():
    arrays, meta = {}, {}
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 2048,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.0,
    }
    yarn_deepseek = {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    }
    # name: (n_heads, m, head_dim, dims, traditional, base, offset, scaling)
    cases = {
        "halves": (3, 5, 64, 64, False, 10000.0, 0, None),
        "pairs": (3, 5, 64, 64, True, 10000.0, 37, None),
        "halves_partial": (2, 4, 64, 32, False, 10000.0, 11, None),
        "pairs_partial_odd_head": (3, 3, 40, 24, True, 500000.0, 100, None),
        "halves_base500k": (2, 3, 64, 64, False, 500000.0, 1000, None),
        "linear": (2, 3, 32, 32, False, 10000.0, 70, {"rope_type": "linear", "factor": 2.5}),
        "llama3": (2, 4, 64, 64, False, 500000.0, 300, llama3),
        "yarn": (2, 3, 64, 64, False, 10000.0, 50, yarn),
        "yarn_pairs_partial": (2, 3, 48, 32, True, 10000.0, 700, yarn_deepseek),
    }
    for name, (h, m, hd, dims, trad, base, offset, scaling) in cases.items():
        rope = initialize_rope(dims, base, trad, scaling, max_position_embeddings=131072)
        x = mx.random.normal((1, h, m, hd))
        y = rope(x, offset=offset)
        arrays[name + ".x"] = heads_to_rows(x)
        arrays[name + ".out"] = heads_to_rows(y)
        if hasattr(rope, "_freqs"):
            # mlx-lm passes `freqs` (period factors) to mx.fast.rope: angle = pos / freqs.
            arrays[name + ".freqs"] = rope._freqs
        meta[name] = {
            "n_heads": h,
            "m": m,
            "head_dim": hd,
            "dims": dims,
            "traditional": trad,
            "base": base,
            "offset": offset,
            "scaling": scaling,
            "mscale": float(getattr(rope, "mscale", 1.0)),
        }
    save("rope", arrays, meta)


def norm_cases():
    arrays, meta = {}, {}
    x = mx.random.normal((7, 203)) * 2.0 + 0.3
    w = mx.random.normal((203,))
    arrays["rms.x"], arrays["rms.weight"] = x, w
    arrays["rms.out"] = mx.fast.rms_norm(x, w, 1e-5)
    meta["rms"] = {"eps": 1e-5, "unit_offset": False}
    # Gemma's (1 + w) convention, computed by MLX on the offset weight.
    arrays["rms_unit_offset.x"], arrays["rms_unit_offset.weight"] = x, w
    arrays["rms_unit_offset.out"] = mx.fast.rms_norm(x, 1.0 + w, 1e-6)
    meta["rms_unit_offset"] = {"eps": 1e-6, "unit_offset": True}
    x = mx.random.normal((5, 130)) * 3.0 - 1.0
    w, b = mx.random.normal((130,)), mx.random.normal((130,))
    arrays["layer.x"], arrays["layer.weight"], arrays["layer.bias"] = x, w, b
    arrays["layer.out"] = mx.fast.layer_norm(x, w, b, 1e-5)
    meta["layer"] = {"eps": 1e-5}
    save("norm", arrays, meta)


def attention_cases():
    arrays, meta = {}, {}
    # name: (n_heads, n_kv_heads, head_dim, pos, m, window)
    cases = {
        "decode_prefix": (6, 2, 64, 17, 3, None),
        "prefill_odd_head": (6, 2, 40, 0, 9, None),
        "window": (6, 2, 64, 25, 4, 8),
        "decode_window_odd_head": (6, 2, 40, 30, 1, 5),
    }
    for name, (h, kvh, hd, pos, m, window) in cases.items():
        s = pos + m
        q = mx.random.normal((1, h, m, hd))
        k = mx.random.normal((1, kvh, s, hd))
        v = mx.random.normal((1, kvh, s, hd))
        scale = 1.0 / math.sqrt(hd)
        qpos = pos + mx.arange(m)[:, None]
        kpos = mx.arange(s)[None, :]
        if window is None:
            mask = "causal"  # MLX aligns it bottom-right: query i sees keys <= pos + i
        else:
            mask = (kpos <= qpos) & (kpos > qpos - window)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        arrays[name + ".q"] = heads_to_rows(q)
        arrays[name + ".k"] = k[0]
        arrays[name + ".v"] = v[0]
        arrays[name + ".out"] = heads_to_rows(out)
        meta[name] = {
            "n_heads": h,
            "n_kv_heads": kvh,
            "head_dim": hd,
            "pos": pos,
            "m": m,
            "window": window,
            "scale": scale,
        }
    save("attention", arrays, meta)


def activation_cases():
    arrays, meta = {}, {}
    x = mx.concatenate([mx.linspace(-12.0, 12.0, 131)[None], mx.random.normal((8, 131)) * 3.0])
    arrays["unary.x"] = x
    arrays["unary.silu"] = nn.silu(x)
    arrays["unary.geluexact"] = nn.gelu(x)
    arrays["unary.gelutanh"] = nn.gelu_approx(x)
    meta["unary"] = {}
    gate = mx.random.normal((5, 97)) * 2.5
    up = mx.random.normal((5, 97))
    arrays["gated.gate"], arrays["gated.up"] = gate, up
    arrays["gated.silu"] = nn.silu(gate) * up
    arrays["gated.geluexact"] = nn.gelu(gate) * up
    arrays["gated.gelutanh"] = nn.gelu_approx(gate) * up
    meta["gated"] = {}
    # Large logits: a softmax without the max subtraction overflows.
    x = mx.random.normal((7, 333)) * 8.0 + 100.0
    arrays["softmax.x"] = x
    arrays["softmax.out"] = mx.softmax(x, axis=-1)
    meta["softmax"] = {}
    save("activations", arrays, meta)


rope_cases()
norm_cases()
attention_cases()
activation_cases()
