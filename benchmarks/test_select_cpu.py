"""CPU benchmark of one ``evolved_select`` call: the C++ extension against the reference backend, 2 threads.

    taskset -c 0,1 python -m pytest benchmarks/test_select_cpu.py --benchmark-only \
        --benchmark-json=benchmark-cpu.json
    python -m benchmarks.report benchmark-cpu.json                 # markdown table with speed-ups

A benchmark, not a timed test: nothing here fails on speed. The default ``check_values=True`` rows include the
value checks (Python reductions for the reference, the extension's own pass on CPU); ``check_values=False`` rows
time the backends' own work.
"""

from __future__ import annotations

import os

import pytest
import torch

from es_kernels import EvolvedState, evolved_select
from es_kernels.extension import unavailable_reason

_REASON = unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"extension unavailable: {_REASON}")

NUM_SAMPLES = 1_000_000
CASES = [(256, 1000, torch.float32), (64, 10, torch.float32), (256, 1000, torch.bfloat16)]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """2 intra-op threads, and the process pinned to 2 cores where the OS allows it."""
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(2)
    if affinity is not None and len(affinity) > 2:
        os.sched_setaffinity(0, sorted(affinity)[:2])
    yield
    torch.set_num_threads(threads)
    if affinity is not None:
        os.sched_setaffinity(0, affinity)


@pytest.mark.parametrize("check_values", [False, True], ids=["checks-off", "checks-on"])
@pytest.mark.parametrize("backend", ["extension", "torch"])
@pytest.mark.parametrize("batch, classes, dtype", CASES, ids=[f"B{b}-C{c}-{str(d)[6:]}" for b, c, d in CASES])
def test_evolved_select_cpu(benchmark, batch, classes, dtype, backend, check_values):
    generator = torch.Generator().manual_seed(0)
    state = EvolvedState(NUM_SAMPLES)
    logits = torch.randn(batch, classes, generator=generator).to(dtype)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    indices = torch.randperm(NUM_SAMPLES, generator=generator)[:batch]
    benchmark.group = f"B={batch} C={classes} {str(dtype)[6:]} {'checks on' if check_values else 'checks off'}"
    benchmark.extra_info.update(batch=batch, classes=classes, dtype=str(dtype)[6:], backend=backend,
                                check_values=check_values)  # fmt: skip

    def call():
        return evolved_select(
            state, indices, batch // 4, logits=logits, targets=labels, generator=generator,
            backend=backend, check_values=check_values,
        )  # fmt: skip

    chosen = benchmark(call)
    assert chosen.numel() == batch // 4
