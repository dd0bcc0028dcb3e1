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


# ----------------------------------------------------------------------------------------- interleaved comparison
#
#     taskset -c 0,1 python -m benchmarks.test_select_cpu [--rounds 15] [--calls 200]
#
# The contenders in one process, interleaved round by round (a loaded machine slows them alike), each round the
# median of `calls` calls; prints per contender the median over rounds and their spread (quartiles and minimum of
# the round medians; repeat on a loaded machine until the quartiles are close). "op" is the extension's dispatcher
# op alone (seed tensor included, as the Python path draws it); "evolved_select" adds the Python path; "torch ES"
# is the hand-written step: F.cross_entropy(reduction="none"), the EMA by index, torch.multinomial without
# replacement; "loss only" rows time the log-sum-exp passes alone.


def _contenders(batch: int, classes: int, dtype: torch.dtype) -> dict:
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    state = EvolvedState(NUM_SAMPLES)
    logits = torch.randn(batch, classes, generator=generator).to(dtype)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    indices = torch.randperm(NUM_SAMPLES, generator=generator)[:batch]
    score, weight = state.score.clone(), state.weight.clone()
    k = batch // 4
    ops = torch.ops.es_kernels_C
    tokens, token_labels = logits[:, None, :], labels[:, None]

    def op(check: bool):
        seed = torch.randint(0, 2**62, (1,), generator=generator)
        return ops.fused_select(state.score, state.weight, indices, seed, k, 0.2, 0.9, logits, labels, None, None,
                                1.0, None, 0.0, check, check)  # fmt: skip

    def select(check: bool):
        return evolved_select(state, indices, k, logits=logits, targets=labels, generator=generator,
                              backend="extension", check_values=check)  # fmt: skip

    def torch_es():
        losses = F.cross_entropy(logits, labels, reduction="none").float()
        old = score[indices]
        weight[indices] = old * 0.2 + losses * 0.8
        score[indices] = old * 0.9 + losses * 0.1
        return torch.multinomial(weight[indices] + 1e-12, k, replacement=False, generator=generator)

    return {
        "op, checks off": lambda: op(False),
        "op, checks on": lambda: op(True),
        "evolved_select, checks off": lambda: select(False),
        "torch ES (hand-written)": torch_es,
        # The loss pass alone: the extension's SIMD log-sum-exp (as token losses, T = 1) against torch's.
        "loss only: extension": lambda: ops.token_sequence_losses(tokens, token_labels, -100, "sum", 0.0),
        "loss only: F.cross_entropy": lambda: F.cross_entropy(logits, labels, reduction="none"),
    }


def _interleaved(rounds: int, calls: int, shapes: list[tuple[int, int, torch.dtype]]) -> None:
    import statistics
    import time

    torch.set_num_threads(2)
    for batch, classes, dtype in shapes:
        contenders = _contenders(batch, classes, dtype)
        medians: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, function in contenders.items():
                function()
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    function()
                    times.append(time.perf_counter() - start)
                medians[name].append(statistics.median(times) * 1e6)
        print(f"B={batch} C={classes} {str(dtype)[6:]}, 2 threads, {rounds} rounds x {calls} calls (µs per call)")
        for name, values in medians.items():
            low, _, high = statistics.quantiles(values, n=4)
            print(f"  {name:28s} median {statistics.median(values):8.1f}   quartiles {low:8.1f} .. {high:8.1f}"
                  f"   min {min(values):8.1f}")  # fmt: skip


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--shapes", default="256x1000xfloat32,64x10xfloat32,256x1000xbfloat16,1024x32000xfloat32")
    options = parser.parse_args()
    chosen = []
    for item in options.shapes.split(","):
        b, c, d = item.split("x")
        chosen.append((int(b), int(c), getattr(torch, d)))
    _interleaved(options.rounds, options.calls, chosen)
