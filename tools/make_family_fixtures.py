"""Tiny random-weight checkpoints of each supported mlx-lm architecture, quantized and saved
by mlx-lm itself, with mlx-lm's logits as the reference (tests/families.rs).

For each (model_type, bits) this builds mlx-lm's own `Model(ModelArgs)` from a small config
(2-3 layers, GQA, odd sizes), randomizes it (norm weights and biases too, so no term is a
no-op), casts it to the family's usual dtype, quantizes it with `mlx_lm.utils.quantize_model`
and writes it with `save_model`/`save_config`. It then loads the directory back with
`mlx_lm.utils.load_model` and records, for a fixed prompt of 12 ids:
  - the greedy continuation of 8 tokens, decoded with mlx-lm's KV caches (`make_prompt_cache`,
    so sliding-window layers use its rotating caches), model run in float32 (float
    parameters cast up, quantized values unchanged);
  - the teacher-forced logits of prompt + continuation[:-1] (19 rows) in float32, and the
    same from the model run in its stored dtype (float16/bfloat16), for information;
  - the smallest top-1/top-2 logit gap along the greedy path (ties would make greedy
    equality a coin toss), and for MoE models the smallest router-logit gap between the
    last selected and the first unselected expert (a near tie would make the routing one).

usage: make_family_fixtures.py OUT_DIR [MODEL_TYPE | NAME ...]
       (writes OUT_DIR/<model_type>_<bits>bit/, for the given model types or fixture names
       only if any)
"""
import importlib
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

VOCAB = 331
PROMPT_LEN, NEW_TOKENS = 12, 8
GROUP_SIZE = 32
WEIGHT_GAIN = 2.5
MIN_GAP = 5e-3
MIN_ROUTER_GAP = 1e-3

BASE = dict(
    hidden_size=96,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
    max_position_embeddings=4096,
)

GEMMA3 = dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=5, sliding_window_pattern=2,
              rope_theta=1e6, rope_local_base_freq=1e4,
              rope_scaling=dict(rope_type="linear", factor=8.0))

# (model_type, bits, dtype, config overrides). Each config exercises what sets the family
# apart; the comments say what.
CASES = [
    # q/k/v biases; head_dim = hidden / heads (24); a sliding_window that qwen2 ignores.
    ("qwen2", (4, 8), "float16",
     dict(rope_theta=1e6, tie_word_embeddings=True, sliding_window=4, use_sliding_window=False)),
    # per-head q/k RMSNorm before RoPE; head_dim (32) unrelated to hidden / heads; untied head.
    ("qwen3", (4, 8), "float16",
     dict(head_dim=32, rope_theta=1e6, tie_word_embeddings=False)),
    # mistral is llama in mlx-lm: a configured sliding_window without layer_types is unused.
    ("mistral", (4, 8), "float16",
     dict(num_attention_heads=6, rope_theta=1e6, sliding_window=4, tie_word_embeddings=False)),
    # llama with sliding layers (layer_types), attention and MLP biases, explicit head_dim,
    # one kv head, llama3 RoPE scaling.
    ("llama", (4,), "float16",
     dict(num_attention_heads=3, num_key_value_heads=1, head_dim=32, attention_bias=True,
          mlp_bias=True, layer_types=["sliding_attention", "full_attention"], sliding_window=5,
          rope_theta=5e5, tie_word_embeddings=True,
          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=64))),
    # llama as Llama 3.x ships (no biases, GQA, llama3 RoPE scaling, bfloat16, tied head): the
    # fixture behind the GGUF twin with llama.cpp's `rope_freqs.weight`.
    ("llama", (8,), "bfloat16",
     dict(rope_theta=5e5, tie_word_embeddings=True,
          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=64))),
    # (1+w) norms, four norms a layer, GELU-tanh MLP, √hidden embedding scale,
    # query_pre_attn_scalar ≠ head_dim, attention and final logit soft-capping.
    ("gemma2", (4,), "bfloat16",
     dict(head_dim=32, query_pre_attn_scalar=20.0, attn_logit_softcapping=4.0,
          final_logit_softcapping=8.0, rope_theta=1e4)),
    # gemma3: q/k norms, alternating sliding (local RoPE base) and global layers (linear
    # RoPE scaling), bf16-rounded embedding scale; tied (no lm_head saved) and untied.
    ("gemma3_text", (4,), "bfloat16", dict(GEMMA3, tie_word_embeddings=True)),
    # Untied, and hidden 64, whose √hidden (8) bf16 keeps: llama.cpp scales GGUF embeddings
    # by √hidden in f32, so this fixture can stand behind a GGUF twin.
    ("gemma3_text", (8,), "bfloat16", dict(GEMMA3, hidden_size=64, tie_word_embeddings=False)),
    # gemma3 multimodal checkpoints: the text model under `language_model.`, its config in
    # text_config with the head counts and rms_norm_eps left to mlx-lm's defaults (as
    # Hugging Face configs do), vocab_size at the top.
    ("gemma3", (4,), "bfloat16", dict(GEMMA3, head_dim=16, query_pre_attn_scalar=16,
                                      tie_word_embeddings=True)),
    # phi3: fused qkv_proj and gate_up_proj, partial rotary dims, LongRoPE (long factors
    # and attention scale).
    ("phi3", (4, 8), "float16",
     dict(rope_theta=1e4, partial_rotary_factor=0.75, max_position_embeddings=4096,
          original_max_position_embeddings=512, tie_word_embeddings=False,
          rope_scaling=dict(type="longrope",
                            long_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8, 4.6],
                            short_factor=[1.0] * 9))),
    # mixtral: every layer a sparse MoE block (8 experts, top-2 of the router logits, then a
    # softmax over those two); experts stacked as SwitchGLU stores them.
    ("mixtral", (4, 8), "float16",
     dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
          tie_word_embeddings=False)),
    # qwen3_moe: softmax over all 8 experts, top-3, renormalized (norm_topk_prob); layer 1 a
    # dense MLP (mlp_only_layers) of its own width; q/k norms; the router quantized at 8 bits,
    # group 64 (mlx-lm's quant_predicate), so hidden is a multiple of 64.
    ("qwen3_moe", (4, 8), "bfloat16",
     dict(hidden_size=128, num_hidden_layers=3, head_dim=32, num_experts=8,
          num_experts_per_tok=3, decoder_sparse_step=1, mlp_only_layers=[1],
          moe_intermediate_size=64, norm_topk_prob=True, rope_theta=1e6,
          tie_word_embeddings=False)),
    # gemma2 with query_pre_attn_scalar = head_dim, as Gemma 2 2B and 9B ship (GGUF files state
    # no scalar: llama.cpp takes 1/√head_dim), the fixture behind a GGUF twin. (Last, so that
    # the cases before keep their seeds.)
    ("gemma2", (8,), "bfloat16",
     dict(head_dim=32, query_pre_attn_scalar=32.0, attn_logit_softcapping=4.0,
          final_logit_softcapping=8.0, rope_theta=1e4)),
]

GEMMA = ("gemma2", "gemma3_text", "gemma3")


def randomize(model, model_type, seed):
    """Random norm weights and biases (mlx-lm initializes them to constants)."""
    key = mx.random.key(seed)
    flat = []
    for i, (path, p) in enumerate(tree_flatten(model.parameters())):
        k = mx.random.fold_in(key, i) if hasattr(mx.random, "fold_in") else mx.random.key(seed * 1000 + i)
        if "norm" in path:
            noise = 0.2 * mx.random.normal(p.shape, key=k)
            # Gemma norms scale by (1 + w); others by w.
            p = noise if model_type in GEMMA else 1.0 + noise
        elif path.endswith(".bias"):
            p = 0.2 * mx.random.normal(p.shape, key=k)
        elif "embed_tokens" in path and model_type in GEMMA:
            # Gemma scales the embedding by √hidden; a smaller table keeps the input token
            # from dominating the (tied) output, as it would at mlx-lm's init.
            p = 0.25 * p
        elif "embed_tokens" not in path:
            # Larger than mlx-lm's init so that the layers, not the input embedding, decide
            # the next token (tied heads otherwise keep repeating the last one).
            p = WEIGHT_GAIN * p
        flat.append((path, p))
    model.update(tree_unflatten(flat))


def to_f32(model):
    model.update(tree_map(lambda p: p.astype(mx.float32)
                          if p.dtype in (mx.float16, mx.bfloat16) else p, model.parameters()))


def greedy(model, prompt):
    """mlx-lm's cached greedy decode: tokens and the logits that picked each."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[0, -1].astype(mx.float32)
    tokens, rows = [], []
    for _ in range(NEW_TOKENS):
        mx.eval(logits)
        rows.append(np.array(logits))
        tokens.append(int(np.argmax(rows[-1])))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1].astype(mx.float32)
    return tokens, np.stack(rows)


class RouterProbe(nn.Module):
    """Wraps an MoE block's router and records, per token, the gap between the top_k-th and
    the (top_k+1)-th logit."""

    def __init__(self, gate, top_k, gaps):
        super().__init__()
        self.inner = gate
        self.top_k = top_k
        self.gaps = gaps

    def __call__(self, x):
        logits = self.inner(x)
        s = np.sort(np.array(logits.astype(mx.float32)), axis=-1)
        self.gaps.append(float((s[..., -self.top_k] - s[..., -self.top_k - 1]).min()))
        return logits


def probe_routers(model):
    """Router probes on every MoE block; returns the list they append to."""
    gaps = []
    for layer in model.layers:
        block = getattr(layer, "block_sparse_moe", None) or getattr(layer, "mlp", None)
        if hasattr(block, "switch_mlp"):
            top_k = getattr(block, "num_experts_per_tok", None) or block.top_k
            block.gate = RouterProbe(block.gate, top_k, gaps)
    return gaps


def teacher_forced(model, ids):
    out = model(mx.array(ids)[None])[0].astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def make(out_dir: Path, model_type, bits, dtype, overrides, seed):
    name = f"{model_type}_{bits}bit"
    path = out_dir / name
    if path.exists():
        shutil.rmtree(path)
    config = dict(BASE, model_type=model_type, **overrides)
    if model_type == "gemma3":
        text = {k: v for k, v in config.items() if k not in
                ("model_type", "vocab_size", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps")}
        config = dict(model_type="gemma3", vocab_size=VOCAB,
                      text_config=dict(text, model_type="gemma3_text"))
    module = importlib.import_module(f"mlx_lm.models.{model_type if model_type != 'mistral' else 'llama'}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # mlx-lm ties gemma3's head to the embedding when the checkpoint has no lm_head.
    if model_type == "gemma3_text" and config["tie_word_embeddings"]:
        model.pop("lm_head")
    if model_type == "gemma3":
        model.language_model.pop("lm_head")
    randomize(model, model_type, seed)
    model.set_dtype(getattr(mx, dtype))
    model, config = quantize_model(model, config, GROUP_SIZE, bits)
    save_model(path, model)
    if model_type == "gemma3":
        # mlx-lm's ModelArgs wrote its defaults into text_config: leave them out again.
        for key in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
            config["text_config"].pop(key)
    save_config(config, path / "config.json")

    model, _ = load_model(path)
    rng = np.random.RandomState(seed)
    prompt = [int(t) for t in rng.randint(0, VOCAB, PROMPT_LEN)]
    native = teacher_forced(model, prompt)  # run before the cast, in the stored dtype
    to_f32(model)
    tokens, step_logits = greedy(model, prompt)
    seq = prompt + tokens[:-1]
    router_gaps = probe_routers(model)
    full = teacher_forced(model, seq)
    router_gap = min(router_gaps, default=float("inf"))
    cached_vs_full = float(np.abs(full[PROMPT_LEN - 1:] - step_logits).max())
    top2 = np.sort(step_logits, axis=-1)[:, -2:]
    gap = float((top2[:, 1] - top2[:, 0]).min())

    # The same teacher-forced sequence in the stored dtype (its own greedy path may differ).
    model, _ = load_model(path)
    native_full = teacher_forced(model, seq)
    native_tokens, _ = greedy(model, prompt)
    f16_err = float(np.abs(native_full - full).max())

    mx.save_safetensors(str(path / "reference.safetensors"), {
        "logits_f32": mx.array(full),
        "logits_native": mx.array(native_full).astype(mx.float16),
    })
    meta = {
        "generator": "tools/make_family_fixtures.py, mlx-lm 0.32.2 / mlx 0.32.4 (CPU)",
        "model_type": model_type, "bits": bits, "group_size": GROUP_SIZE, "dtype": dtype,
        "prompt_ids": prompt, "greedy_ids": tokens, "greedy_ids_native": native_tokens,
        "seed": seed, "min_top2_gap": gap,
        **({"min_router_gap": router_gap} if router_gaps else {}),
        "cached_vs_full_max_abs": cached_vs_full,
        "native_vs_f32_max_abs": f16_err,
        "logits_rows": "teacher-forced prompt_ids + greedy_ids[:-1]; reference.safetensors",
    }
    json.dump(meta, open(path / "reference.json", "w"), indent=1)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"{name}: {size / 1024:.0f} KB, greedy {tokens}, gap {gap:.4f}, "
          f"cached-vs-full {cached_vs_full:.2e}, native-vs-f32 {f16_err:.3f}"
          f"{f', router gap {router_gap:.4f}' if router_gaps else ''}"
          f"{'' if native_tokens == tokens else ' (native greedy differs)'}", file=sys.stderr)
    assert cached_vs_full < 1e-4, "mlx-lm's cached and full forward passes disagree"
    return size if gap > MIN_GAP and router_gap > MIN_ROUTER_GAP else None


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[2:])
    total = 0
    for i, (model_type, bit_list, dtype, overrides) in enumerate(CASES):
        for bits in bit_list:
            if only and not only & {model_type, f"{model_type}_{bits}bit"}:
                continue
            # A greedy path with a near tie would make token equality a coin toss: reseed.
            for seed in range(1000 * i + bits, 1000 * (i + 1), 10):
                size = make(out_dir, model_type, bits, dtype, overrides, seed)
                if size is not None:
                    total += size
                    break
    print(f"total {total / 1024:.0f} KB", file=sys.stderr)


if __name__ == "__main__":
    main()
