#!/usr/bin/env bash
# On the GPU machine: build llama.cpp (CUDA) from the carried sdist archive and run
# llama-bench on the SmolLM2 Q4_1 GGUF and on random-weight Llama-3.2-1B / 3.1-8B Q4_0 GGUFs,
# the shapes `mlxn bench --synthetic` measures. Inputs in .device-bin/peer/ (see docs/gpu.md).
set -uo pipefail
peer=$PWD/.device-bin/peer
out=${OUT:-/tmp/out}
mkdir -p "$out"
work=/tmp/peer
scripts/peer_llamacpp.sh build cuda "$work" "$peer/llamacpp-src.tar.xz" || { tail -30 "$work/build.log"; exit 1; }
cat "$peer"/smollm2.gguf.part-* > /tmp/smollm2.gguf
export PYTHONPATH=$work/llama.cpp/gguf-py
python3 scripts/peer_random_gguf.py llama-3.2-1b /tmp/llama-1b.gguf
python3 scripts/peer_random_gguf.py llama-3.1-8b /tmp/llama-8b.gguf
for m in /tmp/smollm2.gguf /tmp/llama-1b.gguf /tmp/llama-8b.gguf; do
  scripts/peer_llamacpp.sh bench "$work" "$m" -p 2048 -n 128 -fa 1 -o md 2>/dev/null | tee -a "$out/llama_bench.md"
done
