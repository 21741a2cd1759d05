#!/usr/bin/env python3
"""kernel_table.py: one training step's kernels from Nsight Compute, grouped.

    python3 tools/kernel_table.py profile.csv

profile.csv: `ncu --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum`
over the step that `debug.profile_step` brackets (tools/device_attention.sh, stage profile). Prints
each kernel (name up to its template arguments) with its launches, total time, share of the step,
DRAM bytes and the bandwidth they were moved at, largest first, then the sum.
"""
import csv
import sys
from collections import defaultdict


def short(name):
    for cut in ("(", "<"):
        if cut in name:
            name = name[: name.index(cut)]
    name = name.replace("void ", "").strip()
    return name[:48]


def main(path):
    rows = [r for r in csv.reader(open(path, newline="")) if len(r) > 10]
    if not rows:
        sys.exit(f"{path}: no kernel rows (see the .err file next to it)")
    head, rows = rows[0], rows[1:]
    ix = {k: head.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
    per_id = defaultdict(dict)
    names = {}
    for r in rows:
        v = float(r[ix["Metric Value"]].replace(",", "") or 0)
        unit = r[ix["Metric Unit"]]
        scale = {"ns": 1e-6, "us": 1e-3, "usecond": 1e-3, "nsecond": 1e-6, "ms": 1.0, "msecond": 1.0,
                 "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit, 1.0)
        per_id[r[ix["ID"]]][r[ix["Metric Name"]]] = v * scale
        names[r[ix["ID"]]] = short(r[ix["Kernel Name"]])
    groups = defaultdict(lambda: [0, 0.0, 0.0])
    for i, m in per_id.items():
        g = groups[names[i]]
        g[0] += 1
        g[1] += m.get("gpu__time_duration.sum", 0.0)
        g[2] += m.get("dram__bytes_read.sum", 0.0) + m.get("dram__bytes_write.sum", 0.0)
    total = sum(g[1] for g in groups.values())
    print(f"{len(per_id)} kernels, {total:.3f} ms of kernel time (serialised by the profiler)")
    print(f"{'kernel':48} {'calls':>6} {'ms':>8} {'share':>6} {'GB':>7} {'GB/s':>7}")
    for n, (c, ms, b) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        bw = b / 1e9 / (ms / 1e3) if ms > 0 else 0.0
        print(f"{n:48} {c:6d} {ms:8.3f} {100 * ms / total:5.1f}% {b / 1e9:7.3f} {bw:7.0f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
