"""Sums ncu's per-kernel times (`gpu__time_duration.sum`, CSV) by kernel name over one part of
a run: `decode` the last complete decode step (between the last two kernels that end a step:
the greedy argmax, or end_step after the sampler), a kernel's float-type suffix dropped;
`prefill` the first prefill (every kernel before the first argmax), cuBLAS's kernels included.
Usage: python3 scripts/ncu_kernel_times.py decode|prefill CSV..."""
import collections
import csv
import os
import re
import sys

STEP_ENDS = ("argmax", "end_step")


def kernel_times(path):
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            value = float(r["Metric Value"].replace(",", ""))
            yield r["Kernel Name"].split("(")[0], value * scale.get(r["Metric Unit"], 1.0)


def decode_step(rows):
    ends = [i for i, (name, _) in enumerate(rows) if name in STEP_ENDS]
    if len(ends) < 2:
        return None
    return [(re.sub(r"_(f32|f16|bf16)$", "", name), us) for name, us in rows[ends[-2] + 1 : ends[-1] + 1]]


def first_prefill(rows):
    first = next((i for i, (name, _) in enumerate(rows) if name == "argmax"), None)
    return None if first is None else rows[:first]


def main(part, paths):
    select = {"decode": decode_step, "prefill": first_prefill}[part]
    for path in paths:
        kernels = select(list(kernel_times(path)))
        if kernels is None:
            print(f"{path}: no complete {part}")
            continue
        per = collections.defaultdict(lambda: [0, 0.0])
        for name, us in kernels:
            per[name][0] += 1
            per[name][1] += us
        total = sum(us for _, us in kernels)
        name = os.path.splitext(os.path.basename(path))[0]
        print(f"== {name}: {len(kernels)} kernels, {total:.1f} us serialized")
        for kernel, (count, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            share = 100 * us / total if total else 0.0
            print(f"   {kernel[:40]:40s} {count:5d} x {us / count:8.2f} us = {us:9.1f} us ({share:4.1f}%)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
