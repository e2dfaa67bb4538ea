#!/usr/bin/env bash
# On the GPU machine: where one prefill's time goes. ncu times every kernel (serialized, cuBLAS's
# GEMM kernels included) of `mlxn bench --synthetic SHAPE --quant QUANT --prompt-lens TOKENS`,
# and the first prefill (every kernel before the first greedy argmax, which picks its token) is
# summed per kernel (scripts/ncu_kernel_times.py).
# Usage: scripts/prefill_profile.sh [MLXN] [TOKENS] [SHAPE:QUANT...]; carry the stripped mlxn
# binary (default .device-bin/bin/mlxn). Raw CSV and the table under $OUT.
set -u
mlxn=${1:-.device-bin/bin/mlxn}
tokens=${2:-2048}
shift 2 || shift $#
cases=${*:-llama-3.2-1b:mlx4g64 llama-3.1-8b:mlx4g64}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name --format=csv,noheader
for c in $cases; do
  shape=${c%%:*} quant=${c#*:}
  timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$out/prefill_${shape}_$quant.csv" "$mlxn" bench --device cuda \
    --synthetic "$shape" --quant "$quant" --prompt-lens "$tokens" --decode 1 --reps 1 \
    > /dev/null 2>&1
  echo "$shape $quant: ncu exit $?"
done
python3 scripts/ncu_kernel_times.py prefill "$out"/prefill_*.csv | tee "$out/prefill_profile.txt"
