#!/usr/bin/env bash
# On the GPU machine: build llama.cpp (CUDA) from the carried sdist archive and run
# llama-bench on the SmolLM2 Q4_1 GGUF (if its parts were carried; else a random-weight Q4_0
# GGUF of its shape) and on random-weight Llama-3.2-1B / 3.1-8B Q4_0 GGUFs, the shapes
# `mlxn bench --synthetic` measures. Inputs in .device-bin/peer/ (see docs/gpu.md). With
# .device-bin/bin/mlxn carried too (or the binary MLXN names), mlxn runs the same shapes in the
# same call. KQUANT=Q4_K_M (llama-quantize types, comma-separated: Q4_K_M,Q6_K) adds the 1B and 8B
# shapes in those types: f16 random weights quantized by llama-quantize, and both engines on the
# very same file (llama_bench_kquant.md, mlxn_kquant.jsonl); `kquant` runs only those. `moe`
# runs only the Qwen3-30B-A3B shape: random Q8_0 weights (F32 routers) requantized by
# llama-quantize to Q4_K_M (~32 + 17 GB of disk), then both engines on that file
# (llama_bench_moe.md, mlxn_moe.jsonl).
#   [KQUANT=Q4_K_M] [MLXN=path] bash scripts/device_peers.sh [build|kquant|moe]
# The build takes 4 to 6 minutes, the rest about as long: `build` stops after it, and a second
# call while the machine is still warm finds llama-bench in .device-bin/peer-build (git-ignored,
# so kept between calls) and goes straight to the runs.
set -uo pipefail
peer=$PWD/.device-bin/peer
out=${OUT:-/tmp/out}
mkdir -p "$out"
work=$PWD/.device-bin/peer-build
if [ ! -x "$work/build/bin/llama-bench" ]; then
  rm -rf "$work"
  scripts/peer_llamacpp.sh build cuda "$work" "$peer/llamacpp-src.tar.xz" || { tail -30 "$work/build.log"; exit 1; }
fi
[ "${1:-}" = build ] && exit 0
export PYTHONPATH=$work/llama.cpp/gguf-py
mlxn=${MLXN:-$PWD/.device-bin/bin/mlxn}
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
if [ "${1:-}" = moe ]; then
  python3 scripts/peer_random_gguf.py qwen3-30b-a3b /tmp/moe-q8_0.gguf q8_0
  LD_LIBRARY_PATH=$work/build/bin "$work/build/bin/llama-quantize" --allow-requantize \
    /tmp/moe-q8_0.gguf /tmp/moe-q4_k_m.gguf Q4_K_M > "$out/quantize-moe.log" 2>&1
  rm -f /tmp/moe-q8_0.gguf
  scripts/peer_llamacpp.sh bench "$work" /tmp/moe-q4_k_m.gguf -p 512,2048 -n 128 -fa 1 -r 2 \
    -o md 2>/dev/null | tee -a "$out/llama_bench_moe.md"
  if [ -x "$mlxn" ]; then
    "$mlxn" bench --device cuda --json --model /tmp/moe-q4_k_m.gguf --prompt-lens 128,512,2048 \
      --decode 128 --reps 2 2>&1 | grep '^{' | tee -a "$out/mlxn_moe.jsonl"
  fi
  rm -f /tmp/moe-q4_k_m.gguf
  exit 0
fi
if [ "${1:-}" != kquant ]; then
if ls "$peer"/smollm2.gguf.part-* > /dev/null 2>&1; then
  cat "$peer"/smollm2.gguf.part-* > /tmp/smollm2.gguf
else
  python3 scripts/peer_random_gguf.py smollm2-135m /tmp/smollm2.gguf
fi
python3 scripts/peer_random_gguf.py llama-3.2-1b /tmp/llama-1b.gguf
python3 scripts/peer_random_gguf.py llama-3.1-8b /tmp/llama-8b.gguf
for m in /tmp/smollm2.gguf /tmp/llama-1b.gguf /tmp/llama-8b.gguf; do
  scripts/peer_llamacpp.sh bench "$work" "$m" -p 2048 -n 128 -fa 1 -o md 2>/dev/null | tee -a "$out/llama_bench.md"
done
if [ -x "$mlxn" ]; then
  for m in smollm2-135m llama-3.2-1b llama-3.1-8b; do
    for q in mlx4g64 q4_0; do
      "$mlxn" bench --device cuda --json --synthetic $m --quant $q --prompt-lens 16,2048 --decode 128 \
        --reps 2 2>&1 | grep '^{' | tee -a "$out/mlxn_same_call.jsonl"
    done
  done
fi
fi
if [ -n "${KQUANT:-}" ]; then
  for m in llama-3.2-1b llama-3.1-8b; do
    python3 scripts/peer_random_gguf.py $m /tmp/$m-f16.gguf f16
    for q in ${KQUANT//,/ }; do
      LD_LIBRARY_PATH=$work/build/bin "$work/build/bin/llama-quantize" /tmp/$m-f16.gguf \
        /tmp/$m-$q.gguf $q > "$out/quantize-$m-$q.log" 2>&1
      scripts/peer_llamacpp.sh bench "$work" /tmp/$m-$q.gguf -p 2048 -n 128 -fa 1 -o md 2>/dev/null \
        | tee -a "$out/llama_bench_kquant.md"
      if [ -x "$mlxn" ]; then
        "$mlxn" bench --device cuda --json --model /tmp/$m-$q.gguf --prompt-lens 16,2048 \
          --decode 128 --reps 2 2>&1 | grep '^{' | tee -a "$out/mlxn_kquant.jsonl"
      fi
      rm -f /tmp/$m-$q.gguf
    done
    rm -f /tmp/$m-f16.gguf
  done
fi
