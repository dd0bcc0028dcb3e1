"""The prepared GPU verification run: correctness on CUDA first, then the benchmark tables, then one report.

    bash benchmarks/gpu_check.sh OUT            # on a machine with one NVIDIA GPU (sm_80+), after the README set-up
    bash benchmarks/gpu_check.sh --dry-run OUT  # anywhere: list what would run, exit 0

Each step runs in its own process (a crash or hang of one cannot take the others down) with a time limit, and
writes its log (and, for the checks run here, a JSON result) into OUT. Correctness steps: ``es_kernels.selfcheck``
on CUDA, the launch count per ``evolved_select`` call (torch.profiler), CUDA-graph capture and replay of a training
step that calls ``evolved_select``, and ``torch.compile(fullgraph=True)`` against eager. Benchmark steps: the select
and prune tables (pytest-benchmark, CUDA rows, value checks off) and the ViT step benchmark on CUDA.

Any failed correctness step prints ``FAILED <step>: <reason>`` and makes the exit status 1; a failed benchmark is
reported (``BENCHMARK FAILED``) and the run goes on. OUT/summary.json holds every step's outcome and figures;
OUT/report.md is built from it alone (``python -m benchmarks.gpu_check --report OUT/summary.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Peak DRAM bandwidth (GB/s) by device name, where the driver's clock and bus width are not reported.
PEAK_BANDWIDTH_GBPS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                       "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0}  # fmt: skip
# Kernels one evolved_select call may launch: the Philox seed draw plus the fused kernel (Triton); the extension
# adds its top-k launches. More means a launch crept onto the path.
MAX_LAUNCHES = {"triton": 2, "extension": 6}
BACKENDS = ("triton", "extension")


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # "correctness" or "benchmark"
    command: tuple[str, ...]
    timeout: int  # seconds
    description: str


def steps(out: Path) -> list[Step]:
    """The run in order; the time limits add up to 8 minutes."""
    python = sys.executable
    me = (python, "-m", "benchmarks.gpu_check")
    # B = 256 and 4096 at every C and dtype, value checks off (the kernels' own work), and every pruning size.
    rows = "cuda and not checkson and not B64 and not B1024"
    bench = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", rows)
    return [
        Step("selfcheck", "correctness", (python, "-m", "es_kernels.selfcheck", "--device", "cuda", "--no-timing"), 90,
             "es_kernels.selfcheck on CUDA: losses, exact state, sampling law, bad input, every backend"),
        Step("launches", "correctness", (*me, "--step", "launches", str(out)), 45,
             "kernel launches per evolved_select call (torch.profiler)"),
        Step("cuda_graph", "correctness", (*me, "--step", "cuda_graph", str(out)), 45,
             "CUDA-graph capture and replay of a training step that calls evolved_select"),
        Step("compile", "correctness", (*me, "--step", "compile", str(out)), 60,
             "torch.compile(fullgraph=True) of a step calling evolved_select, against eager"),
        Step("bench_select_prune", "benchmark",
             (*bench, "benchmarks/test_select.py", "benchmarks/test_prune.py",
              f"--benchmark-json={out / 'bench.json'}"), 180,
             "select and prune tables, CUDA rows, triton / extension / torch, median per call"),
        Step("vit_step", "benchmark",
             (python, "-m", "benchmarks.vit_step", "--device", "cuda", "--json", str(out / "vit_step.json")), 60,
             "ViT step on CUDA: selection overhead, ES/baseline ratio against the analytic limit"),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------- in-process checks (CUDA)


def _select_inputs(batch=256, classes=1000, num_samples=10_000):
    import torch

    from es_kernels import EvolvedState

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, classes, device="cuda", generator=generator)
    labels = torch.randint(0, classes, (batch,), device="cuda", generator=generator)
    indices = torch.randperm(num_samples, device="cuda", generator=generator)[:batch]
    return EvolvedState(num_samples, device="cuda"), indices, logits, labels


def check_launches() -> dict:
    """Kernel launches per evolved_select call, value checks off (the launch path), per backend."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from es_kernels import backend_status, evolved_select

    result, problems = {}, []
    for backend in BACKENDS:
        if backend_status("cuda")[backend] != "available":
            problems.append(f"{backend}: {backend_status('cuda')[backend]}")
            continue
        state, indices, logits, labels = _select_inputs()
        call = functools.partial(evolved_select, state, indices, 64, logits=logits, targets=labels,
                                 backend=backend, check_values=False)  # fmt: skip
        call()
        torch.cuda.synchronize()
        calls = 10
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
        kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = len([e for e in kernels if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()])
        per_call = launches / calls
        result[backend] = {"launches_per_call": per_call, "kernels": sorted({e.name for e in kernels})}
        if per_call > MAX_LAUNCHES[backend]:
            problems.append(f"{backend}: {per_call:g} launches per call, expected at most {MAX_LAUNCHES[backend]}")
    return {"backends": result, "problems": problems}


def check_cuda_graph() -> dict:
    """Capture forward, evolved_select, loss on the chosen rows and backward in one CUDA graph; replay it and
    check each replay draws valid, fresh positions and moves the state like an eager step would."""
    import torch

    from es_kernels import backend_status, evolved_select

    result, problems = {}, []
    for backend in BACKENDS:
        if backend_status("cuda")[backend] != "available":
            problems.append(f"{backend}: {backend_status('cuda')[backend]}")
            continue
        state, indices, _, labels = _select_inputs()
        model = torch.nn.Linear(64, 1000, device="cuda")
        images = torch.randn(256, 64, device="cuda")
        k = 64

        def step(state=state, indices=indices, labels=labels, model=model, images=images, k=k, backend=backend):
            with torch.no_grad():
                logits = model(images)
            chosen = evolved_select(state, indices, k, logits=logits, targets=labels, backend=backend,
                                    check_values=False)  # fmt: skip
            loss = torch.nn.functional.cross_entropy(model(images[chosen]), labels[chosen])
            loss.backward()
            return chosen

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the capture, as CUDA graphs require
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        model.zero_grad(set_to_none=False)
        with torch.cuda.graph(graph):
            chosen = step()
        draws = []
        for _ in range(20):
            weight_before = state.weight.clone()
            graph.replay()
            torch.cuda.synchronize()
            positions = chosen.clone()
            draws.append(tuple(positions.tolist()))
            valid = positions.numel() == k and bool((positions[1:] > positions[:-1]).all())
            valid = valid and int(positions[0]) >= 0 and int(positions[-1]) < 256
            if not valid:
                problems.append(f"{backend}: replay drew invalid positions {positions.tolist()[:8]}...")
                break
            if torch.equal(weight_before, state.weight) and _ == 0:
                problems.append(f"{backend}: a replay did not update the state")
        distinct = len(set(draws))
        if distinct < 15:
            problems.append(f"{backend}: 20 replays gave only {distinct} distinct draws (randomness frozen?)")
        result[backend] = {"replays": len(draws), "distinct_draws": distinct}
    return {"backends": result, "problems": problems}


def check_compile() -> dict:
    """torch.compile(fullgraph=True) of a function calling evolved_select gives eager's draw and losses."""
    import torch

    from es_kernels import backend_status, evolved_select

    result, problems = {}, []
    for backend in ("triton", "auto"):
        if backend == "triton" and backend_status("cuda")["triton"] != "available":
            problems.append(f"triton: {backend_status('cuda')['triton']}")
            continue

        def select(state, indices, logits, labels, generator, backend=backend):
            return evolved_select(state, indices, 64, logits=logits, targets=labels, generator=generator,
                                  backend=backend, return_losses=True, check_values=False)  # fmt: skip

        compiled = torch.compile(select, fullgraph=True)
        outcomes = []
        for function in (select, compiled):
            state, indices, logits, labels = _select_inputs()
            generator = torch.Generator(device="cuda").manual_seed(7)
            positions, losses = function(state, indices, logits, labels, generator)
            outcomes.append((positions.cpu(), losses.cpu(), state.weight.cpu()))
        (eager_pos, eager_loss, eager_w), (comp_pos, comp_loss, comp_w) = outcomes
        same = torch.equal(eager_pos, comp_pos) and torch.equal(eager_w, comp_w)
        close = torch.allclose(eager_loss, comp_loss, rtol=1e-5, atol=1e-5)
        result[backend] = {"same_draw_and_state": same, "losses_close": close}
        if not (same and close):
            problems.append(f"{backend}: compiled draw/state/losses differ from eager")
    return {"backends": result, "problems": problems}


CHECKS = {"launches": check_launches, "cuda_graph": check_cuda_graph, "compile": check_compile}


def run_check(name: str, out: Path) -> int:
    try:
        outcome = CHECKS[name]()
    except Exception as error:  # the failure is the result; the runner reports it by name
        outcome = {"problems": [f"{type(error).__name__}: {error}"]}
    (out / f"{name}.json").write_text(json.dumps(outcome, indent=2))
    for problem in outcome["problems"]:
        print(f"{name}: {problem}")
    return 1 if outcome["problems"] else 0


# ------------------------------------------------------------------------------------------------ the runner


def device_facts() -> dict:
    import torch

    properties = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(properties, "memory_clock_rate", 0), getattr(properties, "memory_bus_width", 0)
    peak = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None  # double data rate
    if peak is None:
        peak = next((v for k, v in PEAK_BANDWIDTH_GBPS.items() if k in properties.name), None)
    return {"name": properties.name, "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": round(properties.total_memory / 2**30, 1), "peak_bandwidth_gbps": peak,
            "torch": torch.__version__, "cuda": torch.version.cuda}  # fmt: skip


def run_steps(out: Path) -> dict:
    summary = {"device": device_facts(), "steps": {}}
    for step in steps(out):
        start = time.perf_counter()
        log = out / f"{step.name}.log"
        print(f"== {step.name}: {step.description}", flush=True)
        try:
            with open(log, "w") as handle:
                done = subprocess.run(step.command, stdout=handle, stderr=subprocess.STDOUT, timeout=step.timeout)
            status, reason = ("passed", None) if done.returncode == 0 else ("failed", f"exit status {done.returncode}")
        except subprocess.TimeoutExpired:
            status, reason = "failed", f"timed out after {step.timeout} s"
        record = {"kind": step.kind, "status": status, "reason": reason, "seconds": time.perf_counter() - start}
        result_file = out / f"{step.name}.json"
        if result_file.exists():
            record["result"] = json.loads(result_file.read_text())
        if status == "failed":
            record["log_tail"] = log.read_text()[-2000:]
        summary["steps"][step.name] = record
    bench = out / "bench.json"
    if bench.exists():
        summary["benchmarks"] = benchmark_rows(json.loads(bench.read_text()))
    vit = out / "vit_step.json"
    if vit.exists():
        summary["vit_step"] = json.loads(vit.read_text())
    return summary


def benchmark_rows(data: dict) -> list[dict]:
    """One row per CUDA benchmark of a pytest-benchmark JSON: suite, shape, backend, median seconds, bytes."""
    rows = []
    for entry in data.get("benchmarks", []):
        info = entry.get("extra_info", {})
        if info.get("device") != "cuda":
            continue
        keep = ("suite", "backend", "batch", "classes", "dtype", "n", "keep", "bytes", "check_values")
        rows.append({**{key: info[key] for key in keep if key in info}, "median_s": entry["stats"]["median"]})
    return rows


def failures(summary: dict) -> tuple[list[str], list[str]]:
    """(failed correctness steps, failed benchmark steps), each as "<step>: <reason>" lines."""
    correctness, benchmarks = [], []
    for name, record in summary["steps"].items():
        if record["status"] != "failed":
            continue
        problems = record.get("result", {}).get("problems") or [record["reason"]]
        line = f"{name}: {'; '.join(problems)}"
        (correctness if record["kind"] == "correctness" else benchmarks).append(line)
    return correctness, benchmarks


def _bench_table(rows: list[dict], peak: float | None) -> list[str]:
    select = [r for r in rows if r.get("suite") == "select"]
    prune = [r for r in rows if r.get("suite") == "prune"]
    lines = []
    if select:
        lines += [
            "| B | C | dtype | backend | median per call | GB/s of logits read | % of peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(select, key=lambda r: (r["batch"], r["classes"], r["dtype"], r["backend"])):
            gbps = r["bytes"] / r["median_s"] / 1e9
            share = f"{100 * gbps / peak:.0f}%" if peak else "-"
            lines.append(f"| {r['batch']} | {r['classes']} | {r['dtype']} | {r['backend']} | "
                         f"{r['median_s'] * 1e6:.1f} µs | {gbps:.0f} | {share} |")  # fmt: skip
        lines.append("")
    if prune:
        lines += ["| n | keep | backend | median per call | GB/s of weights read |", "|---|---|---|---|---|"]
        for r in sorted(prune, key=lambda r: (r["n"], r["backend"])):
            lines.append(f"| {r['n']} | {r['keep']} | {r['backend']} | {r['median_s'] * 1e3:.2f} ms | "
                         f"{r['bytes'] / r['median_s'] / 1e9:.0f} |")  # fmt: skip
        lines.append("")
    return lines


def report(summary: dict) -> str:
    device = summary["device"]
    peak = device.get("peak_bandwidth_gbps")
    correctness, benchmarks = failures(summary)
    lines = [
        "# es_kernels GPU check",
        "",
        f"Device: {device['name']} (sm_{''.join(map(str, device['capability']))}, {device['memory_gib']} GiB, "
        f"peak DRAM bandwidth {peak:.0f} GB/s), torch {device['torch']}, CUDA {device['cuda']}."
        if peak
        else f"Device: {device['name']}, torch {device['torch']}, CUDA {device['cuda']}.",
        "",
        "**Correctness: " + ("FAILED**" if correctness else "passed**"),
        "",
        "| step | kind | status | seconds | detail |",
        "|---|---|---|---|---|",
    ]
    for name, record in summary["steps"].items():
        result = record.get("result", {})
        detail = "; ".join(result.get("problems", [])) or record.get("reason") or ""
        if name == "launches" and "backends" in result:
            detail = ", ".join(f"{b}: {v['launches_per_call']:g} per call" for b, v in result["backends"].items())
        lines.append(f"| {name} | {record['kind']} | {record['status']} | {record['seconds']:.0f} | {detail} |")
    lines.append("")
    if summary.get("benchmarks"):
        lines += ["## Select and prune (CUDA, value checks off)", "", *_bench_table(summary["benchmarks"], peak)]
    vit = summary.get("vit_step")
    if vit:
        lines += ["## ViT step (CUDA)", "", "```", json.dumps(vit, indent=1)[:3000], "```", ""]
    for line in correctness:
        lines.append(f"FAILED {line}")
    for line in benchmarks:
        lines.append(f"BENCHMARK FAILED {line}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash benchmarks/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="folder for the logs, summary.json and report.md")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    parser.add_argument("--step", choices=sorted(CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--report", metavar="SUMMARY_JSON", help="print the report built from a summary.json")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())), end="")
        return 0
    if not args.out:
        parser.error("the output folder OUT is required")
    out = Path(args.out)
    if args.step:
        return run_check(args.step, out)
    if args.dry_run:
        print(f"dry run: would write logs, summary.json and report.md to {out}/")
        for step in steps(out):
            print(f"[{step.kind}] {step.name} (limit {step.timeout} s): {step.description}")
            print(f"    {shlex.join(step.command)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("FAILED setup: no CUDA device visible to torch (this command needs one NVIDIA GPU)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled Triton kernels, never the interpreter
    summary = run_steps(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary))
    correctness, benchmarks = failures(summary)
    for line in benchmarks:
        print(f"BENCHMARK FAILED {line}")
    for line in correctness:
        print(f"FAILED {line}")
    print(f"report: {out / 'report.md'}")
    return 1 if correctness else 0


if __name__ == "__main__":
    sys.exit(main())
