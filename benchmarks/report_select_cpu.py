"""Markdown table from a pytest-benchmark JSON of benchmarks/test_select_cpu.py: median per call and speed-up of
the extension over the reference backend.

Usage: python benchmarks/report_select_cpu.py benchmark-cpu.json [median|min|mean]"""

from __future__ import annotations

import json
import sys

# The median is the headline; on a shared machine also look at "min" (pass it as the second argument).
STATISTIC = sys.argv[2] if len(sys.argv) > 2 else "median"


def main(path: str) -> None:
    with open(path) as handle:
        benchmarks = json.load(handle)["benchmarks"]
    rows: dict[tuple, dict[str, float]] = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        key = (info["batch"], info["classes"], info["dtype"], info["check_values"])
        rows.setdefault(key, {})[info["backend"]] = bench["stats"][STATISTIC] * 1e6
    print(f"| B | C | logits | value checks | reference (µs, {STATISTIC}) | extension (µs, {STATISTIC}) | speed-up |")
    print("|---:|---:|:---|:---|---:|---:|---:|")
    for (batch, classes, dtype, checks), times in sorted(rows.items(), key=lambda item: (-item[0][0], item[0][1:])):
        if {"torch", "extension"} <= set(times):
            speedup = times["torch"] / times["extension"]
            print(
                f"| {batch} | {classes} | {dtype} | {'on' if checks else 'off'} | {times['torch']:.0f} "
                f"| {times['extension']:.0f} | {speedup:.1f}x |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
