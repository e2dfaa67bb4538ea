#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-quantize from the llama-cpp-python sdist (the peer we
# compare with) and run llama-bench on a GGUF file. The sdist comes through pip, by package name.
#   scripts/peer_llamacpp.sh build cpu|cuda BUILD_DIR     (needs cmake; cuda needs nvcc)
#   scripts/peer_llamacpp.sh bench BUILD_DIR MODEL.gguf [llama-bench args...]
# On the GPU machine, which has no network: run `prepare OUT.tar.xz` here first, carry the
# archive, then `build cuda BUILD_DIR OUT.tar.xz` there.
set -euo pipefail
version=0.3.36
case "${1:-}" in
  prepare)
    out=$(realpath -m "$2"); tmp=$(mktemp -d)
    mkdir -p "$(dirname "$out")"
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --no-build-isolation \
      -d "$tmp" "llama-cpp-python==$version"
    tar -xzf "$tmp"/llama_cpp_python-$version.tar.gz -C "$tmp"
    src="$tmp/llama_cpp_python-$version/vendor/llama.cpp"
    rm -rf "$src/models" "$src/docs" "$src/examples" "$src/.git"*
    tar -C "$src/.." -cJf "$out" llama.cpp
    rm -rf "$tmp";;
  build)
    kind=$2; dir=$3; archive=${4:-}
    mkdir -p "$dir"
    if [ -n "$archive" ]; then tar -xJf "$archive" -C "$dir"; else "$0" prepare "$dir/src.tar.xz"; tar -xJf "$dir/src.tar.xz" -C "$dir"; fi
    flags=(-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release)
    if [ "$kind" = cuda ]; then flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90); fi
    cmake -S "$dir/llama.cpp" -B "$dir/build" "${flags[@]}" > "$dir/cmake.log" 2>&1
    cmake --build "$dir/build" --target llama-bench llama-quantize -j "$(nproc)" > "$dir/build.log" 2>&1
    echo "built $dir/build/bin/llama-bench";;
  bench)
    dir=$2; model=$3; shift 3
    "$dir/build/bin/llama-bench" -m "$model" "$@";;
  *) sed -n 2,8p "$0"; exit 2;;
esac
