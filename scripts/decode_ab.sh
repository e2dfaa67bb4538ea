#!/usr/bin/env bash
# On the GPU machine: decode and prefill speed of two builds (or more), and of kernel variants
# of the last (NVRTC -D switches through MLXN_NVRTC_OPTIONS), interleaved in one call, because
# between calls the same build reads differently. Carry the stripped mlxn binaries.
#   BASE=.device-bin/base NEW=.device-bin/bin \
#   VARIANTS=$'new -DNONE\nfast -DMY_SWITCH' MODELS="smollm2-135m llama-3.2-1b" \
#   bash scripts/decode_ab.sh
# Each variant line is a tag and its NVRTC options. BUILDS="tag=dir …" adds builds run
# between the base and the new one; REAL=dir adds a checkpoint directory (e.g. the carried
# SmolLM2 files) to the synthetic MODELS. PROMPT (lengths, comma-separated), DECODE, REPS and
# ROUNDS set the runs, BENCH_ARGS adds `mlxn bench` options (`--device-time`: the prefill's
# time on the device alone, the `device` column); each process is pinned to core PIN (5; empty:
# not pinned). Short prompts' wall figures depend on the host, whose speed differs between
# processes: compare kernel changes by `device`, wall figures over ROUNDS=2 or more, reading each
# row's `record` (ms planning and enqueuing the prefill) beside them (docs/gpu.md). Raw JSON
# lines and the table under $OUT.
set -u
base=${BASE:-.device-bin/base}
new=${NEW:-.device-bin/bin}
builds=${BUILDS:-}
models=${MODELS:-smollm2-135m llama-3.2-1b llama-3.1-8b qwen3-0.6b}
variants=${VARIANTS:-new -DNONE}
pin=${PIN-5}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name --format=csv,noheader
run() {
  local tag=$1 opts=$2 bin=$3
  shift 3
  local pinned=()
  [ -n "$pin" ] && pinned=(taskset -c "$pin")
  MLXN_NVRTC_OPTIONS="$opts" timeout 150 ${pinned[@]+"${pinned[@]}"} "$bin/mlxn" "$@" 2>&1 |
    grep '^{' |
    sed "s/^/$tag /" >> "$out/ab.txt"
}
for round in $(seq "${ROUNDS:-1}"); do
  for m in $models ${REAL:+real}; do
    if [ "$m" = real ]; then
      args=(bench --device cuda --json --model "$REAL")
    else
      args=(bench --device cuda --json --synthetic "$m" --quant "${QUANT:-mlx4g64}")
    fi
    args+=(--prompt-lens "${PROMPT:-128}" --decode "${DECODE:-128}" --reps "${REPS:-2}")
    args+=(${BENCH_ARGS:-})
    run base "" "$base" "${args[@]}"
    for b in $builds; do run "${b%%=*}" "" "${b#*=}" "${args[@]}"; done
    while read -r tag opts; do
      [ -n "$tag" ] && run "$tag" "$opts" "$new" "${args[@]}"
    done <<< "$variants"
  done
done
python3 - "$out/ab.txt" <<'PY' | tee "$out/ab_table.txt"
import json, sys
for line in open(sys.argv[1]):
    tag, js = line.split(" ", 1)
    r = json.loads(js)
    device = r.get('prefill_device_tokens_per_s')
    device = f" device {device:9.0f}" if device else ""
    print(f"{tag:8s} {r['model'][-32:]:32s} p={r['prompt_tokens']:5d} prefill {r['prefill_tokens_per_s']:9.0f} "
          f"record {r['prefill_record_ms']:5.2f}{device} decode {r['decode_tokens_per_s']:8.1f} "
          f"kernels/token {r['kernels_per_token']}")
PY
