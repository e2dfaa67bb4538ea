#!/usr/bin/env bash
# On the GPU machine: where one decode step's time goes. ncu times every kernel (serialized:
# no PDL overlap, so a step reads longer than in graph replay) of `mlxn bench --synthetic SHAPE
# --prompt-lens 128 --decode 3`, and the last complete step (between the last two kernels that
# end a step: the greedy argmax, or end_step after the sampler) is summed per kernel.
# Usage: scripts/decode_profile.sh [MLXN] [SHAPE...]; carry the stripped mlxn binary (default
# .device-bin/bin/mlxn). Raw CSV and the table under $OUT.
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
    --quant mlx4g64 --prompt-lens 128 --decode 3 --reps 1 > /dev/null 2>&1
  echo "$shape: ncu exit $?"
done
python3 - "$out" <<'PY' | tee "$out/decode_profile.txt"
import collections, csv, glob, os, re, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "ncu_*.csv"))):
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    rows = []
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            v = float(r["Metric Value"].replace(",", ""))
            rows.append((r["Kernel Name"].split("(")[0], v / 1000 if r["Metric Unit"] == "ns" else v))
    ends = [i for i, (name, _) in enumerate(rows) if name in ("argmax", "end_step")]
    if len(ends) < 2:
        print(f"{path}: no complete decode step")
        continue
    step = rows[ends[-2] + 1 : ends[-1] + 1]
    per = collections.defaultdict(lambda: [0, 0.0])
    for name, us in step:
        key = re.sub(r"_(f32|f16|bf16)$", "", name)
        per[key][0] += 1
        per[key][1] += us
    total = sum(us for _, us in step)
    print(f"== {os.path.basename(path)[4:-4]}: {len(step)} kernels, {total:.1f} us serialized")
    for name, (count, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"   {name:28s} {count:4d} x {us / count:6.2f} us = {us:7.1f} us")
PY
