"""The prepared GPU verification run: correctness on CUDA first, then the benchmark tables, then one report.

    bash benchmarks/gpu_check.sh OUT            # on a machine with one NVIDIA GPU (sm_80+), after the README set-up
    bash benchmarks/gpu_check.sh --dry-run OUT  # anywhere: list what would run, exit 0

Each step runs in its own process (a crash or hang of one cannot take the others down) with a time limit, and
writes its log (and, for the checks run here, a JSON result) into OUT. Correctness steps: ``es_kernels.selfcheck``
on CUDA, the launch count per ``evolved_select`` call (torch.profiler), CUDA-graph capture and replay of a training
step that calls ``evolved_select``, ``torch.compile(fullgraph=True)`` against eager, and the language-model
sequence losses (token logits and hidden states, every backend, against fp64). Benchmark steps: the select and prune
tables (pytest-benchmark, CUDA rows, value checks off), the ViT step benchmark on CUDA, and the language-model
scoring path (time and peak memory of the fused hidden-state path against materialised logits, Liger-Kernel and
Cut Cross-Entropy when installed).

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
BACKENDS = ("triton", "extension")


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # "correctness" or "benchmark"
    command: tuple[str, ...]
    timeout: int  # seconds
    description: str


def steps(out: Path) -> list[Step]:
    """The run in order; the time limits add up to 8 minutes (the sequence steps' limits are estimates: unmeasured
    on a GPU)."""
    python = sys.executable
    me = (python, "-m", "benchmarks.gpu_check")
    # B = 256 and 4096 at every C and dtype, value checks off (the kernels' own work), and every pruning size.
    rows = "cuda and not checkson and not B64 and not B1024"
    bench = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", rows)
    call_path = (python, "-m", "benchmarks.call_path")
    return [
        Step("selfcheck", "correctness", (python, "-m", "es_kernels.selfcheck", "--device", "cuda", "--no-timing"), 60,
             "es_kernels.selfcheck on CUDA: losses, exact state, sampling law, bad input, every backend"),
        Step("launches", "correctness", (*me, "--step", "launches", str(out)), 30,
             "kernel launches per evolved_select call (torch.profiler), checks off and at their default"),
        Step("cuda_graph", "correctness", (*me, "--step", "cuda_graph", str(out)), 40,
             "CUDA-graph capture and replay of a training step that calls evolved_select, checks off and default"),
        Step("compile", "correctness", (*me, "--step", "compile", str(out)), 60,
             "torch.compile(fullgraph=True) of a step calling evolved_select, against eager, checks off and default"),
        Step("sequence", "correctness", (*me, "--step", "sequence", str(out)), 40,
             "language-model per-sequence losses (token logits, hidden states) on CUDA, every backend, vs fp64"),
        Step("deferred", "correctness",
             (*call_path, "--sections", "deferred", "--json", str(out / "deferred.json")), 30,
             "deferred value checks on CUDA: a bad call leaves the state unchanged, its error comes at a later call "
             "and at state.check(); a captured step with the default checks replays, and a bad replay is caught"),
        Step("call_path", "benchmark",
             (*call_path, "--sections", "per_call", "auto", "vit_large", "--json", str(out / "call_path.json"),
              "--auto-table", str(out / "auto_table.py")), 90,
             "per-call cost against hand-written ES and Composer-style SB (host and kernel time beside wall-clock), "
             "auto per call form (writes auto_table.py), ViT-L/16 step: baseline, defaults, checks off, limit"),
        Step("bench_select_prune", "benchmark",
             (*bench, "benchmarks/test_select.py", "benchmarks/test_prune.py",
              f"--benchmark-json={out / 'bench.json'}"), 90,
             "select and prune tables, CUDA rows, triton / extension / torch, median per call"),
        Step("sequence_bench", "benchmark", (*me, "--step", "sequence_bench", str(out)), 40,
             "LM scoring: fused hidden-state path vs materialised logits, Liger-Kernel, Cut Cross-Entropy"),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------- in-process checks (CUDA)


def _select_inputs(batch=256, classes=1000, num_samples=10_000, device="cuda"):
    import torch

    from es_kernels import EvolvedState

    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, classes, device=device, generator=generator)
    labels = torch.randint(0, classes, (batch,), device=device, generator=generator)
    indices = torch.randperm(num_samples, device=device, generator=generator)[:batch]
    return EvolvedState(num_samples, device=device), indices, logits, labels


def _available(backend: str, problems: list[str], device: str = "cuda") -> bool:
    from es_kernels import backend_status

    reason = backend_status(device)[backend]
    if reason != "available":
        problems.append(f"{backend}: {reason}")
    return reason == "available"


def check_launches() -> dict:
    """Kernels launched per evolved_select call, value checks off (the launch path) and at their default (deferred
    on the GPU), per backend. A measurement; it fails only if the Triton backend's fused kernel runs other than
    exactly once per call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from es_kernels import evolved_select

    result, problems, calls = {}, [], 10
    for backend, checks in [(b, c) for b in BACKENDS for c in (False, True)]:
        if not _available(backend, problems):
            continue
        state, indices, logits, labels = _select_inputs()
        call = functools.partial(evolved_select, state, indices, 64, logits=logits, targets=labels,
                                 backend=backend, check_values=checks)  # fmt: skip
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
        counts: dict[str, float] = {}
        for event in profiler.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                counts[event.name] = counts.get(event.name, 0) + 1 / calls
        copies = sum(v for name, v in counts.items() if "memcpy" in name.lower() or "memset" in name.lower())
        result[f"{backend}, checks {'default' if checks else 'off'}"] = {
                           "launches_per_call": round(sum(counts.values()) - copies, 2),
                           "memcpy_memset_per_call": round(copies, 2),
                           "per_kernel": {name: round(v, 2) for name, v in sorted(counts.items())}}  # fmt: skip
        if backend == "triton":
            fused = sum(v for name, v in counts.items() if "fused_select_kernel" in name)
            if round(fused, 2) != 1:
                problems.append(f"triton: the fused kernel ran {fused:g} times per call, expected once")
    return {"backends": result, "problems": problems}


def _graph_step(backend: str, k: int = 64, checks: bool = False):
    """A training step (scoring forward, evolved_select, forward + backward on the chosen rows) and its tensors."""
    import torch

    from es_kernels import evolved_select

    state, indices, _, labels = _select_inputs()
    model = torch.nn.Linear(64, 1000, device="cuda")
    images = torch.randn(len(indices), 64, device="cuda")

    def step():
        with torch.no_grad():
            logits = model(images)
        chosen, losses = evolved_select(state, indices, k, logits=logits, targets=labels, backend=backend,
                                        check_values=checks, return_losses=True)  # fmt: skip
        torch.nn.functional.cross_entropy(model(images[chosen]), labels[chosen]).backward()
        return chosen, losses

    return step, state, indices, model


def check_cuda_graph() -> dict:
    """Capture a training step that calls evolved_select (value checks off, and at their default: deferred) in one
    CUDA graph and replay it from the same state:
    every replay must draw k valid positions, update the state exactly as the reference update of the replay's own
    losses, and draw afresh (a frozen seed would repeat the draw)."""
    import torch

    from es_kernels import reference

    result, problems, replays, k = {}, [], 20, 64
    for backend, checks in [(b, c) for b in BACKENDS for c in (False, True)]:
        if not _available(backend, problems):
            continue
        step, state, indices, model = _graph_step(backend, k, checks)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the capture, as CUDA graphs require
                step()
        torch.cuda.current_stream().wait_stream(side)
        model.zero_grad(set_to_none=False)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chosen, losses = step()
        score0, weight0 = state.score.clone(), state.weight.clone()
        draws = set()
        for _ in range(replays):
            state.score.copy_(score0)
            state.weight.copy_(weight0)
            graph.replay()
            torch.cuda.synchronize()
            positions = chosen.clone()
            draws.add(tuple(positions.tolist()))
            ordered = bool((positions[1:] > positions[:-1]).all())
            if positions.numel() != k or not ordered or int(positions[0]) < 0 or int(positions[-1]) >= len(indices):
                problems.append(f"{backend}: a replay drew invalid positions {positions.tolist()[:8]}...")
                break
            score, weight = score0.clone(), weight0.clone()
            reference.update.ema_update_(score, weight, indices, losses, state.beta1, state.beta2)
            if not (torch.equal(score, state.score) and torch.equal(weight, state.weight)):
                problems.append(f"{backend}: a replay's state differs from the reference update of its losses")
                break
        if len(draws) < replays // 2:
            problems.append(f"{backend}: {replays} replays from one state gave {len(draws)} distinct draws")
        state.check()  # the deferred checks of every replay passed
        result[f"{backend}, checks {'default' if checks else 'off'}"] = {
            "replays": replays,
            "distinct_draws": len(draws),
        }
    return {"backends": result, "problems": problems}


def check_compile(device: str = "cuda", backends=("triton",), compiler: str = "inductor") -> dict:
    """torch.compile(fullgraph=True) (inductor) of a function calling evolved_select: eager's draw, state and
    losses from the same RNG state. (Other arguments: for the CPU test of this check.)"""
    import torch
    import torch._inductor.config

    from es_kernels import evolved_select

    # Inductor would otherwise replace torch.randint (the seed draw) with its own RNG stream.
    torch._inductor.config.fallback_random = True
    result, problems = {}, []
    for backend, checks in [(b, c) for b in backends for c in (False, True)]:
        if not _available(backend, problems, device):
            continue

        def select(state, indices, logits, labels, backend=backend, checks=checks):
            return evolved_select(state, indices, 64, logits=logits, targets=labels, backend=backend,
                                  return_losses=True, check_values=checks)  # fmt: skip

        outcomes = []
        for function in (select, torch.compile(select, fullgraph=True, backend=compiler)):
            state, indices, logits, labels = _select_inputs(device=device)
            torch.manual_seed(7)
            positions, losses = function(state, indices, logits, labels)
            outcomes.append((positions.cpu(), losses.cpu(), state.weight.cpu(), state.score.cpu()))
        eager, compiled = outcomes
        same = all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
        mode = f"{backend}, checks {'default' if checks else 'off'}"
        result[mode] = {"same_draw_losses_and_state": same}
        if not same:
            problems.append(f"{mode}: the compiled call's draw, losses or state differ from eager")
    return {"backends": result, "problems": problems}


# -------------------------------------------------------------------------------- language-model sequence losses


def _lm_inputs(batch, time, vocab, dim, dtype, device, seed=0):
    """Shifted views as a causal LM passes them (``hidden[:, :-1]``, ``labels[:, 1:]``), a third of the targets
    ignored and, with B > 1, one sequence of only ignored targets."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(batch, time + 1, dim, device=device, generator=generator).to(dtype)[:, :-1]
    weight = (torch.randn(vocab, dim, device=device, generator=generator) / dim**0.5 * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, time + 1), device=device, generator=generator)
    labels[torch.rand(batch, time + 1, device=device, generator=generator) < 0.3] = -100
    if batch > 1:
        labels[1] = -100
    return hidden, weight, labels[:, 1:]


def _fp64_sequence_losses(logits, targets, reduction="mean"):
    import torch.nn.functional as F

    vocab = logits.shape[2]
    tokens = F.cross_entropy(logits.double().reshape(-1, vocab), targets.reshape(-1), reduction="none")
    tokens = tokens.view(targets.shape)
    counts = (targets != -100).sum(1).clamp(min=1)
    return tokens.sum(1) if reduction == "sum" else tokens.sum(1) / counts


def check_sequence(device: str = "cuda", backends=(*BACKENDS, "torch"), shapes=((3, 129, 32769, 96), (1, 7, 2, 8))):
    """Per-sequence losses through the language-model form, ``sequence_losses`` then ``evolved_select(losses=...,
    return_losses=True)``, for both sources (token logits, hidden states), fp32 and bf16, each backend, against fp64
    ``F.cross_entropy`` reduced per sequence; and the state equal to the reference update of those losses."""
    import torch

    from es_kernels import EvolvedState, evolved_select, reference, sequence_losses

    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
    result, problems = {}, []
    for backend in backends:
        if not _available(backend, problems, device):
            continue
        worst = {}
        for (batch, length, vocab, dim), dtype, form, reduction in (
            (shape, dtype, form, reduction) for shape in shapes for dtype in tolerance
            for form in ("logits", "hidden") for reduction in ("mean", "sum")
        ):  # fmt: skip
            hidden, weight, targets = _lm_inputs(batch, length, vocab, dim, dtype, device)
            state = EvolvedState(batch + 2, device=device)
            indices = torch.arange(batch, device=device)
            if form == "logits":
                logits = (hidden.float() @ weight.float().t()).to(dtype)
                given = {"logits": logits}
            else:
                logits = hidden.double() @ weight.double().t()
                given = {"hidden_states": hidden, "lm_head_weight": weight}
            scored = sequence_losses(targets, sequence_reduction=reduction, backend=backend, **given)
            _, losses = evolved_select(state, indices, 1, losses=scored, backend=backend, return_losses=True)
            expected = _fp64_sequence_losses(logits, targets, reduction)
            error = ((losses.double() - expected).abs() / (expected.abs() + 1)).max().item()
            name = f"{form} {str(dtype).split('.')[-1]} {reduction} B={batch} T={length} V={vocab} D={dim}"
            worst[name] = error
            if not error <= tolerance[dtype]:
                problems.append(f"{backend}: {name}: relative error {error:.2e} > {tolerance[dtype]:g}")
            twin = EvolvedState(batch + 2, device=device)
            reference.ema_update_(twin.score, twin.weight, indices, losses, twin.beta1, twin.beta2)
            if not (torch.equal(twin.score, state.score) and torch.equal(twin.weight, state.weight)):
                problems.append(f"{backend}: {name}: the state differs from the reference update of its losses")
        result[backend] = {"max_relative_error": max(worst.values()), "cases": len(worst)}
    return {"backends": result, "problems": problems}


def _peak_and_time(function, repeats=5) -> dict:
    """Median milliseconds per call (CUDA events) and peak memory the call adds on top of its inputs."""
    import statistics

    import torch

    function()  # warm-up: compiles, cuBLAS workspaces
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    peak = torch.cuda.max_memory_allocated() - before
    return {"median_ms": statistics.median(times), "peak_extra_mib": peak / 2**20}


def _peer_paths(hidden, weight, targets) -> dict:
    """Per-sequence losses by Liger-Kernel's and Cut Cross-Entropy's fused linear cross-entropy (reduction="none",
    then the per-sequence reduction, which neither fuses), as callables; a string says why a peer is absent."""
    from es_kernels.reference.sequence import reduce_per_sequence

    flat_hidden, flat_targets, scored = hidden.reshape(-1, hidden.shape[2]), targets.reshape(-1), targets != -100

    def per_sequence(token_losses):
        return reduce_per_sequence(token_losses.float().view(targets.shape), scored, "mean")

    peers = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger_path():
            out = liger(weight, flat_hidden, flat_targets)
            return per_sequence(out[0] if isinstance(out, tuple) else out)

        peers["Liger-Kernel fused linear CE (reduction='none')"] = liger_path
    except ImportError:
        peers["Liger-Kernel fused linear CE (reduction='none')"] = "not installed"
    try:
        from cut_cross_entropy import linear_cross_entropy

        peers["Cut Cross-Entropy (reduction='none')"] = lambda: per_sequence(
            linear_cross_entropy(flat_hidden, weight, flat_targets, reduction="none")
        )
    except ImportError:
        peers["Cut Cross-Entropy (reduction='none')"] = "not installed"
    return peers


def bench_sequence(device: str = "cuda", shape=(8, 1024, 2048, 32000), dtype_name: str = "bfloat16") -> dict:
    """The scoring path at a language-model shape: per call time and peak extra memory of the fused hidden-state
    path (``sequence_losses`` from the hidden states, then the state update and draw of ``evolved_select`` on
    them) per backend, against materialising
    the logits, ``F.cross_entropy(reduction="none")`` and reducing, and the peers when installed."""
    import torch
    import torch.nn.functional as F

    from es_kernels import EvolvedState, evolved_select, sequence_losses
    from es_kernels.reference.sequence import reduce_per_sequence

    batch, length, dim, vocab = shape
    dtype = getattr(torch, dtype_name)
    hidden, weight, targets = _lm_inputs(batch, length, vocab, dim, dtype, device)
    hidden = hidden.contiguous()
    state = EvolvedState(batch, device=device)
    indices = torch.arange(batch, device=device)
    logits_bytes = batch * length * vocab * hidden.element_size()

    def materialised():
        logits = hidden @ weight.t()
        tokens = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        return reduce_per_sequence(tokens.view_as(targets), targets != -100, "mean")

    def fused(backend):
        losses = sequence_losses(targets, hidden_states=hidden, lm_head_weight=weight, backend=backend,
                                 check_values=False)  # fmt: skip
        return evolved_select(state, indices, batch // 4, losses=losses, backend=backend, check_values=False)

    paths = {"materialised logits + F.cross_entropy(reduction='none')": materialised}
    for backend in (*BACKENDS, "torch"):
        if _available(backend, [], device):
            paths[f"sequence_losses hidden_states + evolved_select ({backend})"] = functools.partial(fused, backend)
    paths.update(_peer_paths(hidden, weight, targets))
    rows, problems = [], []
    for name, function in paths.items():
        if isinstance(function, str):
            rows.append({"path": name, "status": function})
            continue
        try:
            rows.append({"path": name, "status": "measured", **_peak_and_time(function)})
        except Exception as error:  # a peer's API drift or an out-of-memory is this row's result, not the run's
            rows.append({"path": name, "status": f"failed: {type(error).__name__}: {error}"[:300]})
            problems.append(f"{name}: {type(error).__name__}")
    shape_text = {"batch": batch, "time": length, "dim": dim, "vocab": vocab, "dtype": dtype_name}
    return {"shape": shape_text, "logits_mib": logits_bytes / 2**20, "rows": rows, "problems": problems}


def run_sequence_bench() -> dict:
    outcome = bench_sequence()
    # A failed peer is reported in its row; only our own paths failing fails the step.
    outcome["problems"] = [p for p in outcome["problems"] if p.startswith(("sequence_losses", "materialised"))]
    return outcome


CHECKS = {"launches": check_launches, "cuda_graph": check_cuda_graph, "compile": check_compile,
          "sequence": check_sequence, "sequence_bench": run_sequence_bench}  # fmt: skip


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
    for name in ("vit_step", "call_path", "deferred"):
        if (out / f"{name}.json").exists():
            summary[name] = json.loads((out / f"{name}.json").read_text())
    sequence = out / "sequence_bench.json"
    if sequence.exists():
        summary["sequence_bench"] = json.loads(sequence.read_text())
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


def _sequence_table(sequence: dict) -> list[str]:
    shape = sequence["shape"]
    lines = [
        f"## Language-model scoring (CUDA): B={shape['batch']}, T={shape['time']}, D={shape['dim']}, "
        f"V={shape['vocab']}, {shape['dtype']}; the logits alone are {sequence['logits_mib']:.0f} MiB",
        "",
        "| path | median per call | peak extra memory | status |",
        "|---|---|---|---|",
    ]
    for row in sequence["rows"]:
        time_text = f"{row['median_ms']:.2f} ms" if "median_ms" in row else "-"
        memory = f"{row['peak_extra_mib']:.0f} MiB" if "peak_extra_mib" in row else "-"
        lines.append(f"| {row['path']} | {time_text} | {memory} | {row['status']} |")
    return [*lines, ""]


def _call_path_lines(call_path: dict) -> list[str]:
    """The per-call table (wall-clock, host and kernel time), auto's figures per call form, the ViT-L/16 step."""
    lines = []
    for row in call_path.get("per_call") or []:
        lines += [f"## One call, B={row['batch']} x C={row['classes']} {row['dtype']} (CUDA)", "",
                  "| path | per call | spread | host per call | kernels per call |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, entry in row["paths"].items():
            lines.append(f"| {name} | {entry['us']:.1f} µs | {entry['spread_percent']:.0f}% | "
                         f"{entry['host_us']:.1f} µs | {entry.get('kernel_us', float('nan')):.1f} µs |")  # fmt: skip
        lines.append("")
    auto = call_path.get("auto")
    if isinstance(auto, dict) and "error" not in auto:
        lines += [
            "## auto's figures per call form (default checks)",
            "",
            "| form | shape | µs per call |",
            "|---|---|---|",
        ]
        for form, entry in auto.items():
            figures = ", ".join(
                f"{name} {value:.0f}" for name, value in sorted(entry["us"].items(), key=lambda x: x[1])
            )
            lines.append(f"| {form} | {entry['shape']} | {figures} |")
        lines.append("")
    vit = call_path.get("vit_large")
    if isinstance(vit, dict) and "ms" in vit:
        lines += ["## ViT-L/16 step, 224 px, B=128, k=32, bf16, fused AdamW", "", "| part | ms |", "|---|---|"]
        lines += [f"| {name} | {value:.2f} |" for name, value in vit["ms"].items()]
        lines += ["", f"ES (defaults) / baseline {vit['es_defaults_over_baseline']:.3f}; ES (checks off) / baseline "
                  f"{vit['es_checks_off_over_baseline']:.3f}; defaults / checks off "
                  f"{vit['defaults_over_checks_off']:.3f}; analytic limit (no optimizer) "
                  f"{vit['analytic_limit_without_optimizer']:.3f}", ""]  # fmt: skip
    for section, entry in call_path.items():
        if isinstance(entry, dict) and "error" in entry:
            lines.append(f"call_path section {section} failed: {entry['error']}")
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
    lines += _call_path_lines(summary.get("call_path") or {})
    sequence = summary.get("sequence_bench")
    if sequence and sequence.get("rows"):
        lines += _sequence_table(sequence)
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
