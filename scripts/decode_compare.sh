#!/usr/bin/env bash
# On the GPU machine: the decode kernels, tests and `mlxn bench` decode speed of two builds,
# the baseline in .device-bin/bin and the candidate in .device-bin/cudadecode (stripped
# binaries built elsewhere, plus matvec_full.cu = common.cuh + layouts.cuh + matvec.cu for
# the ptxas resource report). Logs under $OUT, a short table at the end.
set -u
root=$PWD; D=$root/.device-bin/cudadecode; OLD=$root/.device-bin/bin
out=${OUT:-/tmp/out}; mkdir -p $out /work
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
# Test binaries find fixtures by the path they were built at.
for w in /work/main /work/wt-cudadecode; do [ -e $w ] || ln -s "$root" $w; done
export MLXN_SHARED_DIR=$root/.device-bin/shared MLXN_CRATE_DIR=$root/crates/mlx-native
nvidia-smi --query-gpu=name --format=csv,noheader
if [ -f $D/matvec_full.cu ]; then
  nvcc -cubin -arch=sm_90 -std=c++17 -Xptxas -v -o /tmp/mv.cubin $D/matvec_full.cu > $out/ptxas.txt 2>&1
  grep -A1 -E "Compiling entry function '(matvec_mlx4_bf16|matvec_mlx8_bf16|matvec_q4_0|matvec_q4_k|matvec_dense_bf16)'" $out/ptxas.txt | grep -oE "Compiling entry function '[a-z0-9_]+'|Used [0-9]+ registers|[0-9]+ bytes spill stores" | paste -sd' ' | sed 's/Compiling/\n/g'
  grep -c "spill stores" $out/ptxas.txt; grep -E "[1-9][0-9]* bytes spill" $out/ptxas.txt | head -3
fi
echo "== kernels $OLD"; $OLD/cuda_backend --ignored bench_decode_kernels --nocapture 2>&1 | grep -E "^matvec|panicked"
echo "== kernels $D"; $D/cuda_backend --ignored bench_decode_kernels --nocapture 2>&1 | grep -E "^matvec|panicked"
echo "== tests new"; $D/cuda_backend > $out/cuda_backend.log 2>&1; echo "cuda_backend exit $?"; grep -E "test result|FAILED|panicked" $out/cuda_backend.log | head
if [ -f $root/.device-bin/shared/models/smollm2-135m-instruct-4bit/model-00001-of-00003.safetensors ]; then
  $D/reference_smollm2 --nocapture > $out/reference.log 2>&1; echo "reference (cpu+cuda) exit $?"; grep -E "test result|max \|logit|panicked" $out/reference.log | head
fi
model=$root/.device-bin/shared/models/smollm2-135m-instruct-4bit
bench() { tag=$1; shift; timeout 240 $tag/mlxn bench --device cuda --json "$@" 2>&1 | grep '^{' | sed "s|^|$(basename $tag) |" >> $out/bench.txt; }
for b in $OLD $D; do
  [ -f $model/model-00001-of-00003.safetensors ] && bench $b --model $model --prompt-lens 16 --decode 256
  bench $b --synthetic llama-3.1-8b --quant mlx4g64 --prompt-lens 16 --decode 128 --reps 2
done
bench $D --synthetic llama-3.2-1b --quant mlx4g64 --prompt-lens 16 --decode 128 --reps 2
bench $D --synthetic llama-3.1-8b --quant q4_0 --prompt-lens 16 --decode 128 --reps 2
if [ -n "${NCU:-}" ]; then
  timeout 150 ncu --clock-control none -k regex:matvec_mlx4_bf16 -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats $D/cuda_backend --ignored bench_decode_kernels > $out/ncu.txt 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Grid Size" $out/ncu.txt | head -12
fi
python3 - $out/bench.txt <<'PY'
import json,sys
for line in open(sys.argv[1]):
    tag,js=line.split(' ',1); r=json.loads(js)
    print(f"{tag:10} {r['model'][-28:]:28} {r['decode_tokens_per_s']:8.1f} tok/s {r['decode_gb_per_s']:6.0f} GB/s {r['kernels_per_token']:4} k/tok")
PY
