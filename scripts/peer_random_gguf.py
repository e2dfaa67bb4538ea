"""Write a random-weight llama or qwen3moe GGUF of a known shape (Q4_0 or Q8_0 matrices, or
f16 ones, for `llama-quantize` to turn into K-quant mixes such as Q4_K_M (from Q8_0 with
--allow-requantize, which needs half the disk of f16); f32 norms and MoE routers, as llama.cpp's
converter writes them; no tokenizer) for llama-bench and `mlxn bench --model`, so peers are
measured on the same shapes as `mlxn bench --synthetic`, or on the very same files. `tiny`
(256 wide, one layer) and `tiny-moe` check the recipe in seconds. Needs numpy and llama.cpp's
gguf-py (in the llama-cpp-python sdist: vendor/llama.cpp/gguf-py).

usage: PYTHONPATH=.../gguf-py python3 peer_random_gguf.py SHAPE OUT.gguf [q4_0|q8_0|f16]
       SHAPE: smollm2-135m, llama-3.2-1b, llama-3.1-8b, qwen3-30b-a3b, tiny, tiny-q5, tiny-moe
"""
import sys
import numpy as np
import gguf

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "tiny": (256, 256, 1, 4, 2, 256, True),
    "tiny-q5": (256, 64, 1, 2, 1, 64, True),
    "qwen3-30b-a3b": (2048, 6144, 48, 32, 4, 151936, False),
    "tiny-moe": (256, 256, 2, 4, 2, 256, False),
}
# Head dims other than hidden / heads: `tiny-q5` keeps its attention rows short, so that the
# rows of 64 (attn_output, ffn_down) take llama-quantize's 32-block fallbacks.
HEAD_DIMS = {"tiny-q5": 32, "qwen3-30b-a3b": 128, "tiny-moe": 128}
# Mixture-of-experts shapes (qwen3moe: per-head q/k norms, every layer sparse): experts, used
# a token, rows of an expert's gate and up.
MOE = {"qwen3-30b-a3b": (128, 8, 768), "tiny-moe": (8, 2, 64)}
name, out = sys.argv[1], sys.argv[2]
layout = sys.argv[3] if len(sys.argv) > 3 else "q4_0"
hidden, inter, layers, heads, kv, vocab, tied = SHAPES[name]
hd = HEAD_DIMS.get(name, hidden // heads)
moe = MOE.get(name)
rng = np.random.default_rng(0)

def q4_0(n, k):
    """n rows of k random Q4_0 values: 18-byte blocks, f16 scale 0.01 then 16 nibble bytes."""
    blocks = rng.integers(0, 256, size=(n * k // 32, 18), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return blocks.reshape(n, k // 32 * 18)

def q8_0(n, k):
    """n rows of k random Q8_0 values: 34-byte blocks, f16 scale 0.001 then 32 int8 bytes."""
    blocks = rng.integers(0, 256, size=(n * k // 32, 34), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.001).tobytes(), dtype=np.uint8)
    return blocks.reshape(n, k // 32 * 34)

arch = "qwen3moe" if moe else "llama"
w = gguf.GGUFWriter(out, arch)
w.add_name(f"random {name}")
w.add_context_length(8192)
w.add_embedding_length(hidden)
w.add_feed_forward_length(inter)
w.add_block_count(layers)
w.add_head_count(heads)
w.add_head_count_kv(kv)
w.add_rope_freq_base(1000000.0 if moe else 500000.0)
w.add_layer_norm_rms_eps(1e-6 if moe else 1e-5)
w.add_rope_dimension_count(hd)
if hd != hidden // heads:
    w.add_key_length(hd)
    w.add_value_length(hd)
if moe:
    w.add_expert_count(moe[0])
    w.add_expert_used_count(moe[1])
    w.add_expert_feed_forward_length(moe[2])
w.add_vocab_size(vocab)
w.add_tokenizer_model("none")
QUANT = {"q4_0": (q4_0, gguf.GGMLQuantizationType.Q4_0), "q8_0": (q8_0, gguf.GGMLQuantizationType.Q8_0)}
def mat(tensor, n, k, experts=None):
    """An [n, k] matrix, or `experts` of them stacked (GGUF dims [k, n, experts])."""
    stack = experts or 1
    if layout == "f16":
        m = (rng.standard_normal((stack * n, k), dtype=np.float32) * 0.02).astype(np.float16)
        w.add_tensor(tensor, m.reshape(experts, n, k) if experts else m)
        return
    make, qtype = QUANT[layout]
    blocks = make(stack * n, k)
    if experts:
        blocks = blocks.reshape(experts, n, -1)
    w.add_tensor(tensor, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
mat("token_embd.weight", vocab, hidden)
for i in range(layers):
    p = f"blk.{i}."
    mat(p + "attn_q.weight", heads * hd, hidden)
    mat(p + "attn_k.weight", kv * hd, hidden)
    mat(p + "attn_v.weight", kv * hd, hidden)
    mat(p + "attn_output.weight", hidden, heads * hd)
    if moe:
        experts, _, expert_inter = moe
        router = rng.standard_normal((experts, hidden), dtype=np.float32) * 0.02
        w.add_tensor(p + "ffn_gate_inp.weight", router)
        mat(p + "ffn_gate_exps.weight", expert_inter, hidden, experts)
        mat(p + "ffn_up_exps.weight", expert_inter, hidden, experts)
        mat(p + "ffn_down_exps.weight", hidden, expert_inter, experts)
        w.add_tensor(p + "attn_q_norm.weight", np.ones(hd, dtype=np.float32))
        w.add_tensor(p + "attn_k_norm.weight", np.ones(hd, dtype=np.float32))
    else:
        mat(p + "ffn_gate.weight", inter, hidden)
        mat(p + "ffn_up.weight", inter, hidden)
        mat(p + "ffn_down.weight", hidden, inter)
    w.add_tensor(p + "attn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, dtype=np.float32))
w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
if not tied:
    mat("output.weight", vocab, hidden)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print("wrote", out)
