"""The host cost of the Python call path, with the Triton kernel launch stubbed out (runs on any machine).

    python3 -m benchmarks.host_cost [--calls N] [--rounds R]

On a GPU the select's kernels take tens of microseconds, so the Python around them decides the per-call time. Here
``es_kernels.triton.launch.fused_select`` is replaced by a stub that returns preallocated outputs, and the rest of
the path runs as users call it on CPU tensors (Triton's interpreter mode only makes the backend count as available;
no kernel runs). Rows: the ``torch.library`` custom op's dispatch alone against the direct launch it wraps; the
whole ``evolved_select(backend="triton")`` with value checks off, deferred (what a GPU runs by default) and
immediate. Medians of interleaved rounds with their spread.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the backend then accepts CPU tensors

import argparse
import statistics
import sys
import time

import torch

from es_kernels import EvolvedState, evolved_select
from es_kernels.call import OP_ARGUMENTS, draw_seed
from es_kernels.triton import launch, ops


def _stub_launch(batch: int, k: int):
    positions = torch.arange(k, dtype=torch.int64)
    losses = torch.zeros(batch, dtype=torch.float32)

    def fused_select(**arguments):
        return positions, losses

    return fused_select


def measure(calls: int, rounds: int, batch: int = 256, classes: int = 1000) -> dict[str, tuple[float, float]]:
    torch.set_num_threads(1)
    k = batch // 4
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    indices = torch.randperm(10_000, generator=generator)[:batch]
    state = EvolvedState(10_000)
    arguments = (state.score, state.weight, indices, draw_seed(generator, indices.device), k, 0.2, 0.9, logits,
                 labels, None, None, 1.0, None, 0.0)  # fmt: skip
    named = dict(zip(OP_ARGUMENTS, arguments, strict=True))
    paths = {
        "custom op dispatch (torch.ops.es_kernels.fused_select)": lambda: ops.fused_select(*arguments),
        "direct launch (ops.launch_checked)": lambda: ops.launch_checked(named),
    }
    for checks in (False, "deferred", "immediate"):
        paths[f"evolved_select(backend='triton', check_values={checks!r})"] = lambda checks=checks: evolved_select(
            state, indices, k, logits=logits, targets=labels, backend="triton", check_values=checks
        )
    original = launch.fused_select
    launch.fused_select = _stub_launch(batch, k)
    try:
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for function in paths.values():
            function()
        for _ in range(rounds):
            for name, function in paths.items():
                start = time.perf_counter()
                for _ in range(calls):
                    function()
                samples[name].append((time.perf_counter() - start) / calls)
    finally:
        launch.fused_select = original
    return {
        name: (1e6 * statistics.median(values), 100 * (max(values) - min(values)) / statistics.median(values))
        for name, values in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    results = measure(args.calls, args.rounds)
    print("| path (B=256, C=1000, launch stubbed, 1 thread) | host us per call | spread |")
    print("|:---|---:|---:|")
    for name, (micros, spread) in results.items():
        print(f"| {name} | {micros:.1f} | {spread:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
