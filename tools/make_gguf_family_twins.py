"""GGUF twins of family fixtures: the same weights as an MLX fixture (dequantized by MLX, so
exactly the values the quantized checkpoint stands for) written as F32 tensors under
llama.cpp's names and metadata for that architecture, so that tests/families.rs can hold a
GGUF file to the fixture's mlx-lm logits.

Tensor names come from gguf-py's own map (`gguf.get_tensor_name_map`), as llama.cpp's
converter names them; it keeps q/k rows of qwen2/qwen3 as they are (NEOX RoPE), and so do we.
For llama it reorders each head's q/k rows from rotate-half to interleaved pairs, and writes
Llama 3 RoPE scaling as llama.cpp's converter does: no scaling keys, a `rope_freqs.weight`
of one period factor per rotated pair. Mixture-of-experts fixtures become llama.cpp's MoE files:
Qwen3-MoE as architecture `qwen3moe`, Mixtral as `llama`, with the expert counts in the
metadata, each layer's router as `ffn_gate_inp` and mlx-lm's stacked experts (already
`[experts, n, k]`) as `ffn_{gate,up,down}_exps`. Layers that Qwen3-MoE's `mlp_only_layers` keeps
dense keep their dense MLP, which llama.cpp's qwen3moe would not load but mlx-native does.
Gemma 2 and 3 are written as llama.cpp's converter writes them: every RMSNorm weight with its
+ 1 added, the soft-caps, the sliding window and RoPE bases under llama.cpp's keys, the
sliding-window pattern stated (llama.cpp's defaults are 2 and 6). A Gemma twin matches mlx-lm
only where the two runtimes agree: query_pre_attn_scalar = head_dim (the files state none) and
√hidden exact in bfloat16 for Gemma 3 (mlx-lm rounds the embedding scale, llama.cpp does not).
Phi-3 as its converter writes it: no key length (the head dim is hidden / heads), the rotated
dims as `rope.dimension_count`, LongRoPE as `rope_factors_long`/`_short` tensors with the
original context and the attention factor in the metadata.
Needs mlx and llama.cpp's gguf-py (vendor/llama.cpp/gguf-py of the llama-cpp-python sdist:
`scripts/peer_llamacpp.sh prepare` fetches it).

usage: PYTHONPATH=.../gguf-py python3 make_gguf_family_twins.py FIXTURES_DIR [NAME ...]
       (writes FIXTURES_DIR/NAME/twin.gguf; default names: qwen2_4bit qwen3_4bit llama_8bit
       qwen3_moe_4bit mixtral_4bit gemma2_8bit gemma3_text_8bit phi3_4bit;
       gguf-py is also `pip install gguf`)
"""
import json
import math
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

def float_tensors(directory, config):
    """Every tensor as float32, quantized matrices dequantized with the checkpoint's params (or a
    per-layer override's)."""
    weights = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        weights.update(mx.load(str(shard)))
    q = config.get("quantization", {})
    out = {}
    for name, w in weights.items():
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        prefix = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{prefix}.scales" in weights:
            # In float32, as mlx-lm's float32 reference run multiplies them.
            scales, biases = (weights[f"{prefix}.{p}"].astype(mx.float32) for p in ("scales", "biases"))
            params = q.get(prefix, q)  # a per-layer override (a router at 8 bits), or the default
            w = mx.dequantize(w, scales, biases, params["group_size"], params["bits"])
        out[name] = np.array(w.astype(mx.float32))
    return out


def interleave_pairs(w, heads):
    """Rows of each head from rotate-half order (pair i = rows i and i + d/2) to interleaved
    pairs (rows 2i, 2i + 1), as llama.cpp's converter permutes llama's q and k."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_period_factors(config, head_dim):
    """Llama 3 RoPE scaling as one factor per rotated pair (its period is multiplied by it):
    unchanged above the high-frequency wavelength, slowed by `factor` below the low one, and
    a smooth blend between."""
    s = config["rope_scaling"]
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for wavelen in 2 * np.pi / inv_freq:
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# llama.cpp's architecture of each mlx-lm model type that differs in name.
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "mixtral": "llama", "gemma3_text": "gemma3"}
# mlx-lm's mixture-of-experts parts and llama.cpp's names for them.
MOE_PARTS = {
    "gate": "ffn_gate_inp",
    "switch_mlp.gate_proj": "ffn_gate_exps",
    "switch_mlp.up_proj": "ffn_up_exps",
    "switch_mlp.down_proj": "ffn_down_exps",
}


def moe_name(name):
    """llama.cpp's name of an MoE tensor (`model.layers.N.{mlp,block_sparse_moe}.PART.weight`),
    or None."""
    parts = name.split(".")
    if len(parts) < 6 or parts[3] not in ("mlp", "block_sparse_moe"):
        return None
    part = MOE_PARTS.get(".".join(parts[4:-1]))
    return part and f"blk.{parts[2]}.{part}.weight"


def gemma_metadata(w, arch, config):
    """Gemma's soft-caps, sliding window and pattern, and local RoPE base, as llama.cpp reads
    them (its converter writes all but the pattern, whose defaults fit the released models)."""
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
        # mlx-lm gives Gemma 2 full attention: a window past the fixture's sequence agrees.
        w.add_sliding_window(config.get("sliding_window", 4096))
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", 2)
    else:
        w.add_sliding_window(config["sliding_window"])
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", config["sliding_window_pattern"])
        w.add_float32(f"{arch}.rope.freq_base_swa", config["rope_local_base_freq"])
        scaling = config.get("rope_scaling")
        if scaling:
            assert scaling["rope_type"] == "linear"
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(scaling["factor"])


def phi3_metadata(w, config, head_dim):
    """Phi-3's partial rotation and LongRoPE, as llama.cpp's converter writes them."""
    rope_dims = int(config.get("partial_rotary_factor", 1.0) * head_dim)
    w.add_rope_dimension_count(rope_dims)
    scaling = config["rope_scaling"]
    assert scaling["type"] in ("longrope", "su")
    original = config["original_max_position_embeddings"]
    stretch = config["max_position_embeddings"] / original
    attn_factor = math.sqrt(1 + math.log(stretch) / math.log(original)) if stretch > 1 else 1.0
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_rope_scaling_attn_factors(attn_factor)
    for which in ("long", "short"):
        w.add_tensor(f"rope_factors_{which}.weight",
                     np.array(scaling[f"{which}_factor"], dtype=np.float32))


def write_twin(directory):
    config = json.loads((directory / "config.json").read_text())
    arch = GGUF_ARCH.get(config["model_type"], config["model_type"])
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim", config["hidden_size"] // heads)
    w = gguf.GGUFWriter(str(directory / "twin.gguf"), arch)
    w.add_name(f"twin of {directory.name}")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(config["num_key_value_heads"])
    if arch != "phi3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(config.get("rope_theta", 1e6))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    if arch in ("gemma2", "gemma3"):
        gemma_metadata(w, arch, config)
    if arch == "phi3":
        phi3_metadata(w, config, head_dim)
    experts = config.get("num_experts", config.get("num_local_experts"))
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    llama_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for name, t in sorted(float_tensors(directory, config).items()):
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp's converter folds Gemma's (1 + w) into the weight
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            kv = config["num_key_value_heads"]
            t = interleave_pairs(t, heads if name.endswith("q_proj.weight") else kv)
        suffixes = (".weight", ".bias")
        # qwen3moe's map has no dense MLP (mlp_only_layers): llama's names serve for those.
        gguf_name = (moe_name(name) or names.get_name(name, try_suffixes=suffixes)
                     or llama_names.get_name(name, try_suffixes=suffixes))
        w.add_tensor(gguf_name, t)
    if config.get("rope_scaling", {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_period_factors(config, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(directory / "twin.gguf", file=sys.stderr)


def main():
    fixtures = Path(sys.argv[1])
    for name in sys.argv[2:] or ["qwen2_4bit", "qwen3_4bit", "llama_8bit", "qwen3_moe_4bit",
                                 "mixtral_4bit", "gemma2_8bit", "gemma3_text_8bit", "phi3_4bit"]:
        write_twin(fixtures / name)


if __name__ == "__main__":
    main()
