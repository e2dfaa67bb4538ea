"""Sums ncu's per-kernel times (`gpu__time_duration.sum`, CSV) of a run's first prefill (every
kernel before the first `argmax`) by kernel name, cuBLAS's kernels under their own names."""
import collections
import csv
import os
import sys


def kernel_times(path):
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
        yield r["Kernel Name"].split("(")[0], value * scale.get(r["Metric Unit"], 1.0)


def main(paths):
    for path in paths:
        rows = list(kernel_times(path))
        first = next((i for i, (name, _) in enumerate(rows) if name == "argmax"), None)
        if first is None:
            print(f"{path}: no argmax, so no complete prefill")
            continue
        per = collections.defaultdict(lambda: [0, 0.0])
        for name, us in rows[:first]:
            per[name][0] += 1
            per[name][1] += us
        total = sum(us for _, us in rows[:first])
        print(f"== {os.path.basename(path)[12:-4]}: {first} kernels, {total / 1000:.2f} ms serialized")
        for name, (count, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            share = 100 * us / total if total else 0.0
            print(f"   {name[:40]:40s} {count:5d} x {us / count:8.1f} us = {us / 1000:7.2f} ms ({share:4.1f}%)")


if __name__ == "__main__":
    main(sys.argv[1:])
