#!/usr/bin/env bash
# On the GPU machine: where one decode step's time goes. ncu times every kernel (serialized:
# no PDL overlap, so a step reads longer than in graph replay) of `mlxn bench --synthetic SHAPE
# --prompt-lens 128 --decode 3`, and the last complete step (between the last two kernels that
# end a step: the greedy argmax, or end_step after the sampler) is summed per kernel.
# Usage: [QUANT=q4_k_m] scripts/decode_profile.sh [MLXN] [SHAPE...]; carry the stripped mlxn
# binary (default .device-bin/bin/mlxn); QUANT is the weights' layout (default mlx4g64). Raw
# CSV and the table under $OUT.
set -u
mlxn=${1:-.device-bin/bin/mlxn}
shift || true
shapes=${*:-smollm2-135m llama-3.2-1b}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name --format=csv,noheader
for shape in $shapes; do
  timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$out/ncu_$shape.csv" "$mlxn" bench --device cuda --synthetic "$shape" \
    --quant "${QUANT:-mlx4g64}" --prompt-lens 128 --decode 3 --reps 1 > /dev/null 2>&1
  echo "$shape: ncu exit $?"
done
python3 scripts/ncu_kernel_times.py decode "$out"/ncu_*.csv | tee "$out/decode_profile.txt"
