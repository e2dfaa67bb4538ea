#!/usr/bin/env bash
# What a kernel's loops issue, with no GPU: compiles the parts of one NVRTC source, in the order
# its `Source` lists them (e.g. kernels/matmul.rs: MATVEC_TC is common.cuh, mma.cuh,
# matvec_tc.cu), to sm_90 SASS as the library does (scripts/nvrtc_cubin.py), and prints for each
# named kernel every loop (a backward branch) with its instruction count and opcode histogram.
#   PARTS="common.cuh mma.cuh matvec_tc.cu" bash scripts/sass_loops.sh matvec_tc_gated_mlx4_f16
# Needs libnvrtc on LD_LIBRARY_PATH and cuobjdump on PATH: on the GPU machine both are under
# /usr/local/cuda; elsewhere the wheels nvidia-cuda-nvrtc and nvidia-cuda-cuobjdump hold them
# (nvidia/cu13/lib, nvidia/cu13/bin). NVRTC_OPTIONS adds options (e.g. -DSWITCH). The SASS of
# each kernel goes under $OUT. The sixteenth session counted this way that the tensor-core
# matvec spent 2.25 instructions a 4-bit weight on dequantization (docs/cuda-backend.md).
set -euo pipefail
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || { echo "usage: PARTS=\"…\" $0 KERNEL…" >&2; exit 2; }
here=$(dirname "$0")
dir=$here/../crates/mlx-native/src/backends/cuda/kernels
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PATH=$PATH:/usr/local/cuda/bin
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
parts=()
for part in ${PARTS:?name the source\'s parts in order}; do parts+=("$dir/$part"); done
options=()
for option in ${NVRTC_OPTIONS:-}; do options+=("--option=$option"); done
python3 "$here/nvrtc_cubin.py" "$out/kernels.cubin" "${parts[@]}" ${options[@]+"${options[@]}"}
cuobjdump -sass "$out/kernels.cubin" > "$out/kernels.sass"
for kernel in "${kernels[@]}"; do
  awk -v k="Function : $kernel\$" '$0 ~ k {p=1; next} /Function :/ {p=0} p' "$out/kernels.sass" \
    > "$out/$kernel.sass"
  if [ ! -s "$out/$kernel.sass" ]; then
    echo "no kernel $kernel; the source has:" $(sed -n 's/.*Function : //p' "$out/kernels.sass") >&2
    exit 1
  fi
  echo "== $kernel: $(grep -c '/\*[0-9a-f]\{4,\}\*/' "$out/$kernel.sass") instructions"
  python3 "$here/sass_loops.py" "$out/$kernel.sass"
done
