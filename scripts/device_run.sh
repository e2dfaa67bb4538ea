#!/usr/bin/env bash
# On the GPU machine (see docs/gpu.md): run the CUDA tests and benchmarks from binaries built
# elsewhere and carried in .device-bin/, logs under $OUT, a short table at the end.
set -uo pipefail
root=$PWD
bin=$root/.device-bin/bin
out=${OUT:-/tmp/out}
mkdir -p "$out" /work
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
# Test binaries find fixtures by the path they were built at, models through MLXN_SHARED_DIR.
[ -e /work/main ] || ln -s "$root" /work/main
export MLXN_SHARED_DIR=$root/.device-bin/shared MLXN_CRATE_DIR=$root/crates/mlx-native
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nvcc -O2 -o /tmp/copy_bandwidth scripts/copy_bandwidth.cu && /tmp/copy_bandwidth | tee "$out/bandwidth.txt"
"$bin/cuda_backend" > "$out/cuda_backend.log" 2>&1; echo "cuda_backend tests: exit $?" | tee -a "$out/summary.txt"
"$bin/reference_smollm2" cuda --nocapture > "$out/reference.log" 2>&1; echo "reference (cuda) tests: exit $?" | tee -a "$out/summary.txt"
"$bin/families" cuda --nocapture > "$out/families.log" 2>&1; echo "families (cuda) tests: exit $?" | tee -a "$out/summary.txt"
"$bin/moe" > "$out/moe.log" 2>&1; echo "moe tests: exit $?" | tee -a "$out/summary.txt"
grep -E "test result|max \|logit|near tie" "$out/cuda_backend.log" "$out/reference.log" "$out/families.log" "$out/moe.log" | tee -a "$out/summary.txt"
model=$root/.device-bin/shared/models/smollm2-135m-instruct-4bit
bench() { "$bin/mlxn" bench --device cuda --json "$@" 2>&1 | tee -a "$out/bench.jsonl"; }
bench --model "$model" --prompt-lens 16,128,512 --decode 256
bench --model "$model" --prompt-lens 128 --decode 256 --no-graph
for q in mlx4g64 q4_0 q4_k; do
  bench --synthetic llama-3.2-1b --quant $q --prompt-lens 128,2048 --decode 128
  bench --synthetic llama-3.1-8b --quant $q --prompt-lens 128,2048 --decode 128 --reps 2
done
for m in qwen3-0.6b gemma-3-1b qwen3-30b-a3b; do
  bench --synthetic $m --quant mlx4g64 --prompt-lens 128,2048 --decode 128 --reps 2
done
# Sampled decode (the sampler runs on the GPU; greedy above).
bench --model "$model" --prompt-lens 128 --decode 256 --temp 0.7 --top-p 0.9
bench --synthetic llama-3.2-1b --quant mlx4g64 --prompt-lens 128 --decode 128 --temp 0.7 --top-p 0.9
bench --synthetic llama-3.1-8b --quant mlx4g64 --prompt-lens 128 --decode 128 --reps 2 --temp 0.7 --top-p 0.9
python3 - "$out/bench.jsonl" <<'PY'
import json, sys
print(f"{'model':34} {'graph':5} {'T':>4} {'prompt':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'GB/s':>7} {'% bound':>7} {'kern/tok':>8}")
for line in open(sys.argv[1]):
    if not line.startswith("{"): continue
    r = json.loads(line)
    print(f"{r['model'][-34:]:34} {str(r['graph']):5} {r.get('temperature', 0):>4} {r['prompt_tokens']:>6} {r['prefill_tokens_per_s']:>14.0f} {r['decode_tokens_per_s']:>13.1f} {r['decode_gb_per_s']:>7.0f} {100 * r['decode_bound_fraction']:>7.1f} {r['kernels_per_token']:>8}")
PY
