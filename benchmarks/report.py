"""Markdown tables (and a plot) from the JSON of the benchmark suites; comparison of two such files.

    python -m benchmarks.report results.json                       # tables: select, prune, ViT step
    python -m benchmarks.report results.json --plot select.png     # + time per call against B per backend
    python -m benchmarks.report after.json --compare before.json   # + per-row change from before to after

The JSON is pytest-benchmark's ``--benchmark-json`` output of benchmarks/test_*.py. Times are the median per call
unless ``--stat`` says otherwise (on a shared machine, ``min`` is the least disturbed figure). Speed-up is the
reference's ("torch") time divided by the backend's, for the same shape, dtype and value-check setting; GB/s is the
bytes of logits (select) or weights (prune) one call reads, divided by its time.

Trust: a run whose recorded load average (at its start, or at its end net of its own threads) says other processes
competed for the cores gets a warning under the header; a speed-up whose rows' interquartile range exceeds half
their median reads "unreliable (spread)" instead of a ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from es_kernels import _timing

REFERENCE = "torch"
BACKEND_ORDER = ("torch", "extension", "triton")
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def load(path: str) -> dict:
    with open(path) as handle:
        data = json.load(handle)
    if "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' key)")
    return data


def _rows(data: dict, stat: str) -> list[dict]:
    """One flat record per benchmark: its extra_info plus the chosen statistic in seconds."""
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info", {}))
        if "suite" not in info and "batch" in info and "classes" in info:
            info["suite"] = "select"  # rows of benchmarks/test_select_cpu.py carry the same keys, no suite
        info.setdefault("device", "cpu")
        if "dtype" in info:
            info["dtype"] = _DTYPE_NAMES.get(info["dtype"], info["dtype"])
        if info.get("suite") == "select" and "bytes" not in info:
            info["bytes"] = None
        info["seconds"] = bench["stats"][stat]
        info["name"] = bench["name"]
        info["rounds"] = bench["stats"]["rounds"]
        info["spread"] = _timing.spread_of_stats(bench["stats"])
        rows.append(info)
    return rows


def _backends(rows: list[dict]) -> list[str]:
    present = {row["backend"] for row in rows}
    return [b for b in BACKEND_ORDER if b in present] + sorted(present - set(BACKEND_ORDER))


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _gbps(nbytes: int | None, seconds: float) -> str:
    return "" if not nbytes else f"{nbytes / seconds / 1e9:.3g}"


def _wide_table(rows: list[dict], keys: tuple[str, ...], headers: tuple[str, ...], stat: str) -> list[str]:
    """One line per key tuple; per backend its time, and for non-reference backends speed-up and GB/s."""
    backends = _backends(rows)
    grouped: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        grouped[tuple(row[k] for k in keys)][row["backend"]] = row
    head = list(headers)
    for backend in backends:
        label = "reference (torch)" if backend == REFERENCE else backend
        head.append(f"{label} {stat}")
        if backend != REFERENCE:
            head += [f"{backend} speed-up", f"{backend} GB/s"]
        else:
            head.append("torch GB/s")
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(":---" if i < len(keys) else "---:" for i in range(len(head))) + "|",
    ]
    for key in sorted(grouped, key=lambda k: tuple((0, v) if not isinstance(v, str) else (1, v) for v in k)):
        by_backend = grouped[key]
        reference = by_backend.get(REFERENCE)
        cells = [("on" if v else "off") if isinstance(v, bool) else str(v) for v in key]
        for backend in backends:
            row = by_backend.get(backend)
            if row is None:
                cells += ["skipped"] if backend == REFERENCE else ["skipped", "", ""]
                continue
            cells.append(_time(row["seconds"]))
            if backend != REFERENCE:
                if not reference:
                    cells.append("")
                elif max(reference["spread"], row["spread"]) > _timing.SPREAD_LIMIT:
                    cells.append("unreliable (spread)")  # rounds disagree: the ratio of two medians means little
                else:
                    cells.append(f"{reference['seconds'] / row['seconds']:.1f}x")
            cells.append(_gbps(row.get("bytes"), row["seconds"]))
        lines.append("| " + " | ".join(cells) + " |")
    if not any(row["device"] == "cuda" for row in rows):
        # Say so in the table itself: a reader must not take the CPU figures for GPU ones.
        gpu = (
            ["cuda", *["all"] * (len(keys) - 1)]
            + ["unmeasured (no GPU in this run)"]
            + [""] * (len(head) - len(keys) - 1)
        )
        lines.append("| " + " | ".join(gpu) + " |")
    return lines


def select_table(rows: list[dict], stat: str, checks: str = "both") -> list[str]:
    rows = [r for r in rows if r.get("suite") == "select"]
    if checks != "both":
        rows = [r for r in rows if bool(r["check_values"]) == (checks == "on")]
    if not rows:
        return []
    keys = ("device", "batch", "classes", "dtype", "check_values")
    return _wide_table(rows, keys, ("device", "B", "C", "logits", "value checks"), stat)


def prune_table(rows: list[dict], stat: str) -> list[str]:
    rows = [dict(r, n=f"{r['n']:.0e}") for r in rows if r.get("suite") == "prune"]
    if not rows:
        return []
    return _wide_table(rows, ("device", "n"), ("device", "n (keep 80%)"), stat)


def vit_table(rows: list[dict], stat: str) -> list[str]:
    from benchmarks.vit_step import PARTS, summarize

    lines = []
    by_device: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if row.get("suite") == "vit_step":
            by_device[row["device"]][row["part"]] = row
    for device, parts in sorted(by_device.items()):
        any_row = next(iter(parts.values()))
        lines += [f"ViT step parts on {device}, B = {any_row['batch']}, k = {any_row['keep']} ({stat}):", ""]
        lines += ["| part | time |", "|:---|---:|"]
        lines += [f"| {p} | {_time(parts[p]['seconds'])} |" for p in PARTS if p in parts]
        if set(PARTS) <= set(parts):
            figures = summarize({p: parts[p]["seconds"] for p in PARTS})
            lines += [
                "",
                f"selection = {figures['select_percent_of_es_step']:.4f}% of the ES step; ES/baseline = "
                f"{figures['es_over_baseline']:.3f}; analytic limit = {figures['analytic_limit']:.3f}; gap "
                f"{figures['gap_percent']:+.1f}% (rows timed one after another: use python -m benchmarks.vit_step "
                "for interleaved figures)",
            ]
        lines.append("")
    return lines


def compare_table(before: dict, after: dict, stat: str) -> list[str]:
    old = {b["name"]: b["stats"][stat] for b in before["benchmarks"]}
    new = {b["name"]: b["stats"][stat] for b in after["benchmarks"]}
    lines = [f"| benchmark | before ({stat}) | after ({stat}) | after/before |", "|:---|---:|---:|---:|"]
    for name in sorted(old.keys() & new.keys()):
        lines.append(f"| {name} | {_time(old[name])} | {_time(new[name])} | {new[name] / old[name]:.2f} |")
    only_old, only_new = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
    if only_old:
        lines += ["", f"only in before: {', '.join(only_old)}"]
    if only_new:
        lines += ["", f"only in after: {', '.join(only_new)}"]
    return lines


def load_warning(meta: dict) -> str | None:
    """Why the recorded run's figures are not trustworthy by the machine's load, or None (also when unrecorded)."""
    threads, num_cores = meta.get("threads"), meta.get("cores")
    if not isinstance(threads, int) or not isinstance(num_cores, int):
        return None
    # At the start the suites had not run yet; at the end the 1-minute load holds up to `threads` of their own.
    for key, own in (("loadavg_start", 0.0), ("loadavg", float(threads))):
        load = meta.get(key)
        if load:
            reason = _timing.load_reason(
                threads, load_source=lambda load=load: tuple(load), own=own, num_cores=num_cores
            )
            if reason is not None:
                return reason
    return None


def header(data: dict) -> list[str]:
    meta = data.get("es_kernels", {})
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "unknown CPU")
    load = meta.get("loadavg")
    load_text = f", load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at the end" if load else ""
    lines = [
        f"{cpu}; {meta.get('threads', '?')} threads; torch {meta.get('torch', '?')}; size "
        f"{meta.get('size', '?')}{load_text}; {data.get('datetime', '')}",
        "",
    ]
    reason = load_warning(meta)
    if reason is not None:
        lines += [f"**Warning: these figures are not trustworthy ({reason}); rerun on an idle machine.**", ""]
    return lines


def plot(rows: list[dict], path: str, stat: str) -> None:
    """Time per call against B, one panel per C, one line per backend and dtype (value checks off and on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("suite") == "select"]
    if not rows:
        raise ValueError("no select rows to plot")
    classes = sorted({r["classes"] for r in rows})
    figure, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.8), squeeze=False)
    for axis, c in zip(axes[0], classes, strict=True):
        lines: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if r["classes"] == c:
                lines[(r["device"], r["backend"], r["dtype"], r["check_values"])].append((r["batch"], r["seconds"]))
        series = sorted({key[:3] for key in lines})
        for (device, backend, dtype, checks), points in sorted(lines.items()):
            points.sort()
            axis.plot(
                [p[0] for p in points], [p[1] * 1e3 for p in points], marker="o",
                color=f"C{series.index((device, backend, dtype)) % 10}",  # checks on/off of one series: one colour
                linestyle=":" if checks else "-", label=f"{backend} {dtype} {device}" + (" checks" if checks else ""),
            )  # fmt: skip
        axis.set(xscale="log", yscale="log", xlabel="B (meta-batch)", title=f"C = {c}")
        axis.set_ylabel(f"time per call, ms ({stat})")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    figure.suptitle("evolved_select: time per call (dotted: value checks on)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--compare", metavar="BEFORE", help="an earlier JSON to compare the results against")
    parser.add_argument("--plot", metavar="PNG", help="write a plot of the select rows here")
    parser.add_argument(
        "--stat", default="median", choices=("median", "min", "mean"), help="which per-call time the tables show"
    )
    parser.add_argument(
        "--checks", default="both", choices=("both", "off", "on"), help="select rows with value checks off/on only"
    )
    args = parser.parse_args(argv)
    data = load(args.results)
    rows = _rows(data, args.stat)
    out = header(data)
    for title, table in (
        ("evolved_select", select_table(rows, args.stat, args.checks)),
        ("evolved_prune", prune_table(rows, args.stat)),
    ):
        if table:
            out += [f"### {title}", "", *table, ""]
    vit = vit_table(rows, args.stat)
    if vit:
        out += ["### ViT step", "", *vit]
    if args.compare:
        out += ["### Comparison", "", *compare_table(load(args.compare), data, args.stat), ""]
    print("\n".join(out).rstrip())
    if args.plot:
        plot(rows, args.plot, args.stat)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
