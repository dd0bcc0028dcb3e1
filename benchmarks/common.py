"""Shared pieces of the benchmark suites: the size switch, thread pinning, device sync and the round count.

Full run (the README figures; about 4 minutes on 2 CPU cores, plus 1.5 for `python -m benchmarks.vit_step`):

    python -m pytest benchmarks/test_select.py benchmarks/test_prune.py benchmarks/test_vit_step.py \
        --benchmark-json=bench-full.json
    python -m benchmarks.report bench-full.json --plot bench-full.png

Reduced run (checks the harness in CI, under a minute): the same with ``ES_BENCH_SIZE=ci``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from es_kernels import backend_status


@dataclass(frozen=True)
class Size:
    name: str
    batches: tuple[int, ...]
    classes: tuple[int, ...]
    prune_sizes: tuple[int, ...]
    # Each row is timed for about this long (at least min_rounds, at most max_rounds calls, one call per round):
    # one call per round keeps the statistics per call, and the bounds keep tiny calls accurate and huge ones short.
    target_seconds: float
    min_rounds: int
    max_rounds: int


SIZES = {
    "full": Size("full", (64, 256, 1024, 4096), (10, 1000, 32000, 151936), (10**6, 10**7, 10**8), 1.0, 3, 2000),
    "ci": Size("ci", (64, 256), (10, 1000), (10**6,), 0.02, 2, 20),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
THREADS = 2


def size() -> Size:
    name = os.environ.get("ES_BENCH_SIZE", "full")
    if name not in SIZES:
        raise ValueError(f"ES_BENCH_SIZE must be one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]


def devices() -> list[str]:
    """CPU always; CUDA when present (then its rows are timed with a device sync inside the timed call)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(device: str) -> list[tuple[str, str | None]]:
    """Every concrete backend with the reason it cannot run on ``device`` (None if it can); rows of unavailable
    backends are skipped with that reason, so the JSON/terminal say why a row is missing."""
    reasons = []
    for name, status in backend_status(device).items():
        reason = None if status == "available" else status
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            reason = "TRITON_INTERPRET=1 runs Triton on the host for correctness only; never timed"
        reasons.append((name, reason))
    return reasons


def pin_threads() -> None:
    """2 intra-op threads (the figures are per 2 cores), and the process on 2 cores where the OS allows it."""
    torch.set_num_threads(THREADS)
    if hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) > THREADS:
            os.sched_setaffinity(0, cores[:THREADS])


def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def timed(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` followed by a device sync, so a CUDA row times the kernels and not only their launch."""
    sync = synchronizer(device)

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        sync()
        return out

    return call


def run(benchmark, fn: Callable[[], object], device: str = "cpu", *, setup=None):
    """Time ``fn`` with pytest-benchmark, one call per round, rounds from one warm-up call's duration."""
    call = timed(fn, device)
    args = setup() if setup is not None else ((), {})
    start = time.perf_counter()
    call(*args[0], **args[1])  # warm-up (allocator, lazy init, JIT caches) and the round estimate
    elapsed = max(time.perf_counter() - start, 1e-7)
    config = size()
    rounds = int(min(max(config.target_seconds / elapsed, config.min_rounds), config.max_rounds))
    return benchmark.pedantic(call, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)


def available_memory() -> int:
    """Bytes of memory available now (Linux); a large number where unknown, so no row is skipped by mistake."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
