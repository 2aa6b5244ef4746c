#!/usr/bin/env python3
"""Sums kernel durations from `ncu --csv --metrics gpu__time_duration.sum` output by kernel name.

usage: ncu_summary.py NCU_CSV [TOKENS]   (TOKENS: divide totals by this many decode steps)
"""
import csv
import sys
from collections import defaultdict

path = sys.argv[1]
tokens = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
rows = []
with open(path, newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    v = float(r["Metric Value"].replace(",", ""))
    unit = r.get("Metric Unit", "ns")
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(unit, 1e-3)
    rows.append((r["Kernel Name"].split("(")[0], v * scale))
tot = defaultdict(float)
cnt = defaultdict(int)
for name, us in rows:
    tot[name] += us
    cnt[name] += 1
all_us = sum(tot.values())
print(f"{len(rows)} kernels, {all_us:.1f} us total, {all_us / tokens:.1f} us per token")
for name in sorted(tot, key=lambda n: -tot[n]):
    print(f"{tot[name] / tokens:10.1f} us/token {cnt[name] / tokens:7.1f} launches/token  {name}")
